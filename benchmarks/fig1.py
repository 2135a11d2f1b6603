r"""Supplement Fig. 1: does the joint EBM prior match the aggregate posterior on MNIST 0 and 1?

The 2-layer generator of ``claim1.py`` with two groups of 2-d latents, learned by maximum
likelihood (the authors' algorithm, :class:`ebm_prior.Trainer` with ``regime="mle"``) on the
MNIST training images of digits 0 and 1, once with the Gaussian prior (``gaussian_mle``) and
once with the joint EBM prior (``ebm_mle``), from the same initialisation and data order.

For each model, ``--n`` training images give posterior samples :math:`z^+` by the training
posterior chain (z-space Langevin from :math:`\mathcal{N}(0, I)`; their law is the aggregate
posterior the prior should match), and ``--n`` prior samples: the base prior :math:`p_b`, and
for the EBM model also the EBM prior (eps-space Langevin with the training chain). Reported,
on the 4-d concatenated latents: the squared MMD (Gaussian kernel, median bandwidth) between
posterior and prior samples, with a permutation p-value (``--permutations``); per seed and as
paired differences over seeds (EBM model's EBM prior minus Gaussian model's prior, 95% t
interval). One scatter figure per group for the first seed. Rows go to ``<out>/fig1.jsonl``
as they are measured, models train through checkpoints (a stopped run resumes)::

    python benchmarks/fig1.py --seeds 0,1,2,3 --epochs 20 --threads 1
    python benchmarks/fig1.py --report --out runs/fig1
    python benchmarks/fig1.py --tiny --out /some/dir       # smoke run (tests)
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Sequence

import numpy as np
import torch

from ebm_prior import EpsLangevin, sample_posterior

if __package__:  # imported as benchmarks.fig1
    from . import claim1, metrics
else:
    import claim1
    import metrics

MODELS = ("gaussian_mle", "ebm_mle")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--dataset", default="mnist", choices=("mnist", "digits"))
    p.add_argument("--classes", default="0,1", help="the digits to train on")
    p.add_argument("--seeds", default="0,1,2,3")
    p.add_argument("--out", default="runs/fig1")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--n", type=int, default=2000, help="posterior and prior samples per test")
    p.add_argument("--permutations", type=int, default=500)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--nef", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--checkpoint-every", type=int, default=100)
    p.add_argument("--threads", type=int)
    p.add_argument("--progress", action="store_true")
    p.add_argument("--report", action="store_true", help="only print the tables of --out")
    p.add_argument("--tiny", action="store_true", help="tiny budget (checks the pipeline only)")
    p.add_argument("--download", action="store_true")
    p.add_argument("--data-root", default="data")
    args = p.parse_args(argv)
    args.classes = [int(c) for c in args.classes.split(",")]
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.latent_dims, args.train_size, args.vae_lr = (2, 2), None, 1e-3
    if args.tiny:
        args.dataset, args.epochs, args.n, args.permutations = "digits", 1, 64, 19
        args.hidden, args.nef, args.checkpoint_every = 32, 16, 1
        args.seeds = args.seeds if args.seeds != [0, 1, 2, 3] else [0, 1]
    return args


def latents(vae, prior, x: torch.Tensor, stats: dict, args, seed: int) -> dict[str, np.ndarray]:
    r"""``(n, 4)`` samples: the posterior by the training chain, the base prior and, with an
    energy, the EBM prior (the base draws are the same for both models of a seed)."""

    gen = torch.Generator().manual_seed(seed + 20_000)
    idx = torch.randperm(len(x), generator=gen)[: args.n]
    post = torch.cat([
        torch.cat(sample_posterior(prior, vae, c, steps=stats["posterior_steps"],
                                   step_size=stats["posterior_step_size"], generator=gen,
                                   trace=False).z, 1)
        for c in x[idx].split(500)
    ])  # fmt: skip
    eps = vae.sample_eps(args.n, generator=torch.Generator().manual_seed(seed + 30_000))
    with torch.no_grad():
        out = {"posterior": post, "base": torch.cat(vae.eps_to_z(eps), 1)}
    if prior is not None:
        sampler = EpsLangevin(prior, vae, generator=gen, trace=False, **prior.sampler_config)
        out["ebm"] = torch.cat(sampler(eps).z, 1)
    return {k: v.detach().numpy() for k, v in out.items()}


def run(args: argparse.Namespace) -> list[dict]:
    os.makedirs(args.out, exist_ok=True)
    data = claim1.load_data(argparse.Namespace(**{**vars(args), "dataset": args.dataset}))
    keep = torch.isin(data["train_y"], torch.tensor(args.classes))
    x = data["train"][keep] * 2 - 1
    print(f"{args.dataset}, classes {args.classes}: {len(x)} training images", flush=True)
    path = os.path.join(args.out, "fig1.jsonl")
    done = {(r["model"], r["seed"]) for r in claim1.read_rows(path) if r["epochs"] == args.epochs}
    rows = []
    for seed in args.seeds:
        for model in MODELS:
            if (model, seed) in done:
                print(f"  {model} seed {seed}: measured already", flush=True)
                continue
            models_dir = os.path.join(args.out, "models")
            vae, prior, stats = claim1.train(model, seed, x, args, models_dir)
            t0 = time.time()
            z = latents(vae, prior, x, stats, args, seed)
            row = {"model": model, "seed": seed, "epochs": args.epochs, "images": len(x),
                   "n": args.n, **stats}  # fmt: skip
            for name in ("base", "ebm"):
                if name in z:
                    mmd, p = metrics.mmd_permutation_test(
                        z["posterior"], z[name], permutations=args.permutations, seed=seed
                    )
                    row[f"mmd_{name}"], row[f"p_{name}"] = mmd, p
            row["eval_s"] = time.time() - t0
            rows.append(row)
            claim1.append_row(path, row)
            print(f"  {model} seed {seed}: " + ", ".join(
                f"{k} {row[k]:.4g}" for k in row if k[:4] in ("mmd_", "p_ba", "p_eb")
            ), flush=True)  # fmt: skip
            if seed == args.seeds[0]:
                scatter(z, os.path.join(args.out, f"fig1_{model}.png"), model)
    return rows


def scatter(z: dict[str, np.ndarray], path: str, title: str) -> None:
    r"""Per group (rows), the posterior and each prior's samples (columns)."""

    try:
        import matplotlib
    except ImportError:
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [k for k in ("base", "ebm", "posterior") if k in z]
    fig, axes = plt.subplots(2, len(names), figsize=(3 * len(names), 6), squeeze=False)
    lim = float(np.quantile(np.abs(np.concatenate(list(z.values()))), 0.995)) * 1.05
    for g in range(2):
        for j, name in enumerate(names):
            ax = axes[g, j]
            ax.scatter(z[name][:, 2 * g], z[name][:, 2 * g + 1], s=2, alpha=0.4)
            ax.set(xlim=(-lim, lim), ylim=(-lim, lim), title=f"{name}, group {g + 1}")
            ax.set_aspect("equal")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def report(out: str) -> str:
    rows = claim1.read_rows(os.path.join(out, "fig1.jsonl"))
    lines = []
    for epochs in sorted({r["epochs"] for r in rows}):
        sub = [r for r in rows if r["epochs"] == epochs]
        by = {m: {r["seed"]: r for r in sub if r["model"] == m} for m in MODELS}
        lines += [f"\n{epochs} epochs, {sub[0]['images']} images, n = {sub[0]['n']} "
                  "(mean +- std over seeds; p: permutation p-values, max over seeds)\n",
                  "| model | seeds | MMD^2 posterior vs base prior | p | "
                  "MMD^2 posterior vs EBM prior | p |", "|---|---|---|---|---|---|"]  # fmt: skip
        for m, got in by.items():
            if not got:
                continue
            cells = [m, str(len(got))]
            for key in ("base", "ebm"):
                v = [r[f"mmd_{key}"] for r in got.values() if f"mmd_{key}" in r]
                p = [r[f"p_{key}"] for r in got.values() if f"p_{key}" in r]
                cells += [claim1._ms(v, ".4f"), f"{max(p):.3g}" if p else "-"]
            lines.append("| " + " | ".join(cells) + " |")
        common = sorted(set(by["ebm_mle"]) & set(by["gaussian_mle"]))
        if common:
            d = [by["ebm_mle"][s]["mmd_ebm"] - by["gaussian_mle"][s]["mmd_base"] for s in common]
            m, sd, lo, hi = claim1.paired_interval(d)
            lines.append(f"\nPaired, EBM model's EBM prior minus Gaussian model's prior "
                         f"({len(common)} seeds): {m:.4f} +- {sd:.4f}, 95% t interval "
                         f"[{lo:.4f}, {hi:.4f}] (negative: the EBM prior is closer)")  # fmt: skip
    text = "\n".join(lines)
    with open(os.path.join(out, "fig1.md"), "w") as f:
        f.write(text + "\n")
    print(text)
    return text


main = claim1.main_of(parse_args, run, report)


if __name__ == "__main__":
    main()
