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
difference; the energy at the last epoch's posterior and prior chains (how much it learned),
and its share of the EBM model's score (its spread over the test images against the score's,
the AUPRC of the energy alone, and the AUPRC with the energy removed at the same samples).
``--ebm-lr`` trains the EBM models at another energy learning rate (own folders and rows),
paired with the same Gaussian models. A fit the trainer stops for divergence is a row saying
so, named under its table and left out of it (resuming it would diverge again). Rows go to
``<out>/anomaly.jsonl`` as they are measured; models train through checkpoints (a stopped run
resumes)::

    python benchmarks/anomaly.py --classes 1,4,5,7,9 --seeds 0,1,2,3 --epochs 4 --threads 1
    python benchmarks/anomaly.py --classes 9 --epochs 4 --ebm-lr 1e-4    # a faster energy
    python benchmarks/anomaly.py --report --out runs/anomaly
    python benchmarks/anomaly.py --tiny --out /some/dir       # smoke run (tests)
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Sequence

import numpy as np
import torch

from ebm_prior import auprc, log_joint_score, paired_auroc_difference
from ebm_prior.trainer import DEFAULTS

if __package__:  # imported as benchmarks.anomaly
    from . import claim1
else:
    import claim1

MODELS = ("gaussian_mle", "ebm_mle")
#: The energy's learning rate of the authors' settings (:data:`ebm_prior.trainer.DEFAULTS`).
DEFAULT_EBM_LR = float(DEFAULTS["mle"]["lr"])


def _lr(row: dict) -> float:
    return row.get("ebm_lr", DEFAULT_EBM_LR)  # rows from before the option: the default


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
    p.add_argument(
        "--ebm-lr",
        type=float,
        help="the energy's learning rate (default: the authors' 2e-5); another rate "
        "trains its own EBM models, paired with the same Gaussian ones",
    )
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


def scores(vae, prior, x: torch.Tensor, stats: dict, args, seed: int) -> tuple:
    r"""Anomaly scores (higher: more anomalous) and the energy's share of the log joint
    (:math:`\bar f(x)`, zeros for the Gaussian prior), numpy arrays of shape ``(N,)``."""

    gen = torch.Generator().manual_seed(seed + 40_000)
    parts = [
        log_joint_score(vae, c, prior, samples=args.samples, posterior="langevin",
                        posterior_steps=stats["posterior_steps"],
                        posterior_step_size=stats["posterior_step_size"], generator=gen,
                        return_energy=True)
        for c in x.split(1000)
    ]  # fmt: skip
    return -torch.cat([s for s, _ in parts]).numpy(), torch.cat([f for _, f in parts]).numpy()


def run(args: argparse.Namespace) -> list[dict]:
    os.makedirs(args.out, exist_ok=True)
    data = claim1.load_data(args)
    x_all, y = data["train"] * 2 - 1, data["train_y"]
    path = os.path.join(args.out, "anomaly.jsonl")
    lr = DEFAULT_EBM_LR if args.ebm_lr is None else args.ebm_lr
    done = {(r["k"], r["seed"]) for r in claim1.read_rows(path)
            if r["epochs"] == args.epochs and _lr(r) == lr}  # fmt: skip
    rows = []
    for k in args.classes:
        train, test_in, test_out = split(y, k)
        for seed in args.seeds:
            if (k, seed) in done:
                print(f"  held-out {k} seed {seed}: measured already", flush=True)
                continue
            row = {"k": k, "seed": seed, "epochs": args.epochs, "ebm_lr": lr,
                   "train_images": len(train), "normal": len(test_in),
                   "anomalies": len(test_out)}  # fmt: skip
            got = {}
            for model in MODELS:
                name = model.split("_")[0]
                # an EBM at another rate has its own folder; the Gaussian model is shared
                other = model == "ebm_mle" and lr != DEFAULT_EBM_LR
                folder = f"heldout{k}_ebm_lr{lr:g}" if other else f"heldout{k}"
                try:
                    vae, prior, stats = claim1.train(
                        model, seed, x_all[train], args, os.path.join(args.out, "models", folder),
                        prior_lr=lr if model == "ebm_mle" else None,
                    )  # fmt: skip
                except FloatingPointError as e:  # the trainer's divergence checks
                    row[f"diverged_{name}"] = " ".join([str(e), *getattr(e, "__notes__", [])])
                    break  # recorded: resuming would diverge again
                t0 = time.time()
                s_in, f_in = scores(vae, prior, x_all[test_in], stats, args, seed)
                s_out, f_out = scores(vae, prior, x_all[test_out], stats, args, seed)
                got[model] = (s_in, s_out)
                row[f"auprc_{name}"] = auprc(s_in, s_out)
                row[f"train_s_{name}"], row[f"score_s_{name}"] = stats["train_s"], time.time() - t0
                if prior is None:
                    continue
                # the energy's share of the score (does it reorder?), and its value at the
                # last epoch's chains
                row["f_sd_ebm"] = float(np.concatenate([f_in, f_out]).std())
                row["score_sd_ebm"] = float(np.concatenate([s_in, s_out]).std())
                row["auprc_ebm_without_f"] = auprc(s_in + f_in, s_out + f_out)
                row["auprc_f_only"] = auprc(-f_in, -f_out)
                for key in ("f_pos", "f_neg"):
                    if f"last_epoch_{key}" in stats:
                        row[f"{key}_{name}"] = stats[f"last_epoch_{key}"]
            if len(got) == len(MODELS):
                ci = paired_auroc_difference(
                    got["gaussian_mle"],
                    got["ebm_mle"],
                    resamples=args.resamples,
                    seed=seed,
                    metric="auprc",
                )
                row.update(diff=ci.difference, diff_low=ci.low, diff_high=ci.high)  # fmt: skip
                row["positive_rate"] = len(test_out) / (len(test_in) + len(test_out))
                print(f"  held-out {k} seed {seed}: AUPRC Gaussian {row['auprc_gaussian']:.3f}, "
                      f"EBM {row['auprc_ebm']:.3f}, EBM - Gaussian {ci.difference:+.3f} "
                      f"[{ci.low:+.3f}, {ci.high:+.3f}]", flush=True)  # fmt: skip
            else:
                print(f"  held-out {k} seed {seed}: a fit diverged ({row})", flush=True)
            rows.append(row)
            claim1.append_row(path, row)
    return rows


def report(out: str) -> str:
    rows = claim1.read_rows(os.path.join(out, "anomaly.jsonl"))
    lines = []
    for epochs, lr in sorted({(r["epochs"], _lr(r)) for r in rows}):
        sub = [r for r in rows if r["epochs"] == epochs and _lr(r) == lr]
        failed = [r for r in sub if "diff" not in r]
        sub = [r for r in sub if "diff" in r]
        lines += [f"\n{epochs} epochs, energy learning rate {lr:g} (mean +- std over seeds; "
                  "paired difference EBM - Gaussian with its 95% t interval over seeds; "
                  "per-seed bootstrap intervals in the JSON lines; f at the last epoch's "
                  "posterior and prior chains)\n",
                  "| held-out class | seeds | positives | AUPRC Gaussian | AUPRC EBM | "
                  "EBM - Gaussian (x1e3) | 95% t interval (x1e3) | f(z+) | f(z+) - f(z-) |",
                  "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for k in sorted({r["k"] for r in sub}):
            rs = [r for r in sub if r["k"] == k]
            m, sd, lo, hi = claim1.paired_interval([1e3 * r["diff"] for r in rs])
            f = [r for r in rs if "f_pos_ebm" in r]  # rows from before f was recorded: none
            fp = claim1._ms([r["f_pos_ebm"] for r in f], ".2f") if f else "-"
            fg = claim1._ms([r["f_pos_ebm"] - r["f_neg_ebm"] for r in f], ".3f") if f else "-"
            lines.append(
                f"| {k} | {len(rs)} | {rs[0]['positive_rate']:.3f} | "
                f"{claim1._ms([r['auprc_gaussian'] for r in rs], '.3f')} | "
                f"{claim1._ms([r['auprc_ebm'] for r in rs], '.3f')} | {m:+.2f} +- {sd:.2f} | "
                f"[{lo:+.2f}, {hi:+.2f}] | {fp} | {fg} |"
            )
        for r in failed:
            why = " ".join(v for key, v in r.items() if key.startswith("diverged_"))
            lines.append(
                f"\nheld-out {r['k']} seed {r['seed']} is left out, its fit diverged: {why}"
            )
    share = [r for r in rows if "f_sd_ebm" in r]  # rows from before it was recorded: none
    if share:
        lines += ["\nThe energy's share of the EBM model's score at its own posterior samples "
                  "(mean +- std over seeds): its spread over the test images against the "
                  "score's, the AUPRC of the energy alone (-f as the score), and what "
                  "removing f from the score at the same samples changes\n",
                  "| held-out class | epochs | energy lr | seeds | sd of f | sd of the score | "
                  "AUPRC of -f | AUPRC EBM - without f (x1e3) | 95% t interval (x1e3) |",
                  "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for key in sorted({(r["k"], r["epochs"], _lr(r)) for r in share}):
            rs = [r for r in share if (r["k"], r["epochs"], _lr(r)) == key]
            m, sd, lo, hi = claim1.paired_interval(
                [1e3 * (r["auprc_ebm"] - r["auprc_ebm_without_f"]) for r in rs]
            )
            lines.append(
                f"| {key[0]} | {key[1]} | {key[2]:g} | {len(rs)} | "
                f"{claim1._ms([r['f_sd_ebm'] for r in rs], '.2f')} | "
                f"{claim1._ms([r['score_sd_ebm'] for r in rs], '.1f')} | "
                f"{claim1._ms([r['auprc_f_only'] for r in rs], '.3f')} | "
                f"{m:+.2f} +- {sd:.2f} | [{lo:+.2f}, {hi:+.2f}] |"
            )
    text = "\n".join(lines)
    with open(os.path.join(out, "anomaly.md"), "w") as f:
        f.write(text + "\n")
    print(text)
    return text


main = claim1.main_of(parse_args, run, report)


if __name__ == "__main__":
    main()
