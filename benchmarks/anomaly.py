r"""Held-out-digit anomaly detection with Pang et al.'s protocol (main paper Table 4).

For each held-out class :math:`k` (1, 4, 5, 7, 9 by default) of the MNIST training set: the
images of the other nine classes are split 80 / 20 (a fixed split per class); the 2-layer
generator of ``claim1.py`` is learned by maximum likelihood (the authors' algorithm,
``regime="mle"``) on the 80%, once with the Gaussian prior (``gaussian_mle``) and once with the
joint EBM prior (``ebm_mle``), from the same initialisation and data order; the test set is the
20% (normal) and every image of class :math:`k` (anomalies, the positives).

The score of an image is Pang et al.'s decision function, the negative log joint at posterior
samples drawn by the training posterior chain (:func:`ebm_prior.log_joint_score` with
``posterior="langevin"``): :math:`-\frac1S \sum_s [\log p(x|z^s) + \log p_b(z^s) + f_a(z^s)]`.
Reported per class and seed: AUPRC of both models, their difference with a paired bootstrap
interval (the same test images resampled for both, :func:`ebm_prior.paired_auroc_difference`
with ``metric="auprc"``); per class over seeds: mean, std and the 95% t interval of the paired
difference. Rows go to ``<out>/anomaly.jsonl`` as they are measured; models train through
checkpoints (a stopped run resumes)::

    python benchmarks/anomaly.py --classes 1,4,5,7,9 --seeds 0,1,2,3 --epochs 4 --threads 1
    python benchmarks/anomaly.py --report --out runs/anomaly
    python benchmarks/anomaly.py --tiny --out /some/dir       # smoke run (tests)
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Sequence

import torch

from ebm_prior import auprc, log_joint_score, paired_auroc_difference

if __package__:  # imported as benchmarks.anomaly
    from . import claim1
else:
    import claim1

MODELS = ("gaussian_mle", "ebm_mle")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--dataset", default="mnist", choices=("mnist", "fashion-mnist", "digits"))
    p.add_argument("--classes", default="1,4,5,7,9", help="held-out classes")
    p.add_argument("--seeds", default="0,1,2,3")
    p.add_argument("--out", default="runs/anomaly")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--samples", type=int, default=4, help="posterior chains per test image")
    p.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--latent-dims", default="16,32")
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
    args.latent_dims = tuple(int(s) for s in args.latent_dims.split(","))
    args.train_size, args.vae_lr = None, 1e-3
    if args.tiny:
        args.dataset, args.epochs, args.samples, args.resamples = "digits", 1, 1, 50
        args.hidden, args.nef, args.checkpoint_every = 32, 16, 1
        args.classes = args.classes if args.classes != [1, 4, 5, 7, 9] else [1]
        args.seeds = args.seeds if args.seeds != [0, 1, 2, 3] else [0, 1]
    return args


def split(y: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""Indices of the training 80% of the normal classes, the test 20%, and class ``k``."""

    normal = (y != k).nonzero().squeeze(1)
    normal = normal[torch.randperm(len(normal), generator=torch.Generator().manual_seed(k))]
    cut = int(0.8 * len(normal))
    return normal[:cut], normal[cut:], (y == k).nonzero().squeeze(1)


def scores(vae, prior, x: torch.Tensor, stats: dict, args, seed: int) -> torch.Tensor:
    r"""Anomaly scores (higher: more anomalous), shape ``(N,)``."""

    gen = torch.Generator().manual_seed(seed + 40_000)
    return torch.cat([
        -log_joint_score(vae, c, prior, samples=args.samples, posterior="langevin",
                         posterior_steps=stats["posterior_steps"],
                         posterior_step_size=stats["posterior_step_size"], generator=gen)
        for c in x.split(1000)
    ])  # fmt: skip


def run(args: argparse.Namespace) -> list[dict]:
    os.makedirs(args.out, exist_ok=True)
    data = claim1.load_data(args)
    x_all, y = data["train"] * 2 - 1, data["train_y"]
    path = os.path.join(args.out, "anomaly.jsonl")
    done = {(r["k"], r["seed"]) for r in claim1.read_rows(path) if r["epochs"] == args.epochs}
    rows = []
    for k in args.classes:
        train, test_in, test_out = split(y, k)
        for seed in args.seeds:
            if (k, seed) in done:
                print(f"  held-out {k} seed {seed}: measured already", flush=True)
                continue
            row = {"k": k, "seed": seed, "epochs": args.epochs, "train_images": len(train),
                   "normal": len(test_in), "anomalies": len(test_out)}  # fmt: skip
            got = {}
            for model in MODELS:
                models_dir = os.path.join(args.out, "models", f"heldout{k}")
                vae, prior, stats = claim1.train(model, seed, x_all[train], args, models_dir)
                t0 = time.time()
                s_in = scores(vae, prior, x_all[test_in], stats, args, seed).numpy()
                s_out = scores(vae, prior, x_all[test_out], stats, args, seed).numpy()
                got[model] = (s_in, s_out)
                name = model.split("_")[0]
                row[f"auprc_{name}"] = auprc(s_in, s_out)
                row[f"train_s_{name}"], row[f"score_s_{name}"] = stats["train_s"], time.time() - t0
            ci = paired_auroc_difference(
                got["gaussian_mle"],
                got["ebm_mle"],
                resamples=args.resamples,
                seed=seed,
                metric="auprc",
            )
            row.update(diff=ci.difference, diff_low=ci.low, diff_high=ci.high)  # fmt: skip
            row["positive_rate"] = len(test_out) / (len(test_in) + len(test_out))
            rows.append(row)
            claim1.append_row(path, row)
            print(f"  held-out {k} seed {seed}: AUPRC Gaussian {row['auprc_gaussian']:.3f}, EBM "
                  f"{row['auprc_ebm']:.3f}, EBM - Gaussian {ci.difference:+.3f} "
                  f"[{ci.low:+.3f}, {ci.high:+.3f}]", flush=True)  # fmt: skip
    return rows


def report(out: str) -> str:
    rows = claim1.read_rows(os.path.join(out, "anomaly.jsonl"))
    lines = []
    for epochs in sorted({r["epochs"] for r in rows}):
        sub = [r for r in rows if r["epochs"] == epochs]
        lines += [f"\n{epochs} epochs (mean +- std over seeds; paired difference EBM - Gaussian "
                  "with its 95% t interval over seeds; per-seed bootstrap intervals in the "
                  "JSON lines)\n",
                  "| held-out class | seeds | positives | AUPRC Gaussian | AUPRC EBM | "
                  "EBM - Gaussian (x1e3) | 95% t interval (x1e3) |",
                  "|---|---|---|---|---|---|---|"]  # fmt: skip
        for k in sorted({r["k"] for r in sub}):
            rs = [r for r in sub if r["k"] == k]
            m, sd, lo, hi = claim1.paired_interval([1e3 * r["diff"] for r in rs])
            lines.append(
                f"| {k} | {len(rs)} | {rs[0]['positive_rate']:.3f} | "
                f"{claim1._ms([r['auprc_gaussian'] for r in rs], '.3f')} | "
                f"{claim1._ms([r['auprc_ebm'] for r in rs], '.3f')} | {m:+.2f} +- {sd:.2f} | "
                f"[{lo:+.2f}, {hi:+.2f}] |"
            )
    text = "\n".join(lines)
    with open(os.path.join(out, "anomaly.md"), "w") as f:
        f.write(text + "\n")
    print(text)
    return text


main = claim1.main_of(parse_args, run, report)


if __name__ == "__main__":
    main()
