r"""Out-of-distribution detection with L>k and LLR>k: Gaussian prior vs the joint EBM prior.

Trains (or loads) a hierarchical VAE on the in-distribution training set, fits the joint EBM
prior on it two-stage (backbone frozen), scores the in-distribution and the OOD test sets with

hvae-oodd's importance-weighted :math:`L^{>k}` bound (:func:`ebm_prior.ood.hierarchical_bound`)
under the Gaussian prior and under the EBM prior, with the same estimator and the same options
for both (the EBM prior enters through its marginal over the top groups, and with
``--lower sample`` through the weight :math:`e^{f}` of the bottom groups' draws, or their
conditional Langevin draws with ``--bottom langevin``, run with the settings the prior was trained
with), and prints a table in the style of the supplement's Table 4 (AUROC / AUPRC / FPR80 of
:math:`-L^{>k}` and :math:`LLR^{>k}` for ``k = 0 .. L-1``, OOD as positives), plus score
histograms.

    ebm-prior ood                          # Fashion-MNIST vs MNIST, reference VAE
    ebm-prior ood --in-dist mnist --out-dist fashion-mnist
    OODD_ROOT=... ebm-prior ood --backbone oodd   # a small hvae-oodd LVAE
    OODD_ROOT=... ebm-prior ood --backbone oodd --checkpoint models/FashionMNIST-...
    ebm-prior ood --backbone biva --checkpoint runs/binmnist-biva-seed42 \
        --in-dist mnist --out-dist fashion-mnist --prior runs/biva-prior/seed0/ebm-prior

``--prior`` scores a prior already fitted on the checkpoint (``ebm-prior finetune-biva`` /
``finetune-oodd``; its recorded backbone fingerprint must match) instead of fitting one here.
    ebm-prior ood --in-dist cifar10 --out-dist svhn --download   # with torchvision

Data: see ``ebm_prior.apps.data`` (offline Fashion-MNIST / MNIST, or torchvision). The
histograms need ``ebm-prior[examples]``. ``python examples/ood.py`` runs the same.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ebm_prior import GroupwiseBackbone, HierarchicalVAE, JointEBMPrior
from ebm_prior.apps import data as _data
from ebm_prior.apps._common import (
    nonnegative_float,
    nonnegative_int,
    output_dir,
    parser,
    positive_float,
    positive_int,
    require,
)
from ebm_prior.apps.prior_figures import load_backbone
from ebm_prior.apps.training import fit_elbo, fit_two_stage
from ebm_prior.hub import atomic_write
from ebm_prior.ood import hierarchical_bound, ood_metrics, paired_auroc_difference


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = parser(__doc__)
    p.add_argument("--in-dist", default="fashion-mnist", choices=_data.DATASETS)
    p.add_argument("--out-dist", default="mnist", choices=_data.DATASETS)
    p.add_argument("--backbone", default="reference", choices=["reference", "oodd", "biva"])
    p.add_argument(
        "--checkpoint",
        default=None,
        help="an hvae-oodd checkpoint folder, or a BIVA run_deepvae.py session (--backbone biva)",
    )
    p.add_argument(
        "--prior", default=None, help="a prior fitted on --checkpoint (folder or Hub repository)"
    )
    p.add_argument(
        "--channels", type=positive_int, default=32, help="width of the trained backbone"
    )
    p.add_argument(
        "--n-train", type=nonnegative_int, default=10_000, help="training images (0: all)"
    )
    p.add_argument("--n-test", type=positive_int, default=1_000, help="test images per dataset")
    p.add_argument("--epochs", type=positive_int, default=10, help="backbone ELBO epochs")
    p.add_argument("--lr", type=positive_float, default=1e-3)
    p.add_argument("--batch-size", type=positive_int, default=100)
    p.add_argument("--two-stage-epochs", type=positive_int, default=10, help="EBM prior epochs")
    p.add_argument("--ebm-lr", type=positive_float, default=1e-4)
    p.add_argument("--energy-reg", type=nonnegative_float, default=0.01)
    p.add_argument("--nef", type=positive_int, default=64, help="energy-network width")
    p.add_argument(
        "--langevin-steps", type=positive_int, default=30, help="Langevin steps (training)"
    )
    p.add_argument("--step-size", type=positive_float, default=0.3, help="Langevin step size s")
    p.add_argument("--samples", type=positive_int, default=4, help="importance samples per bound")
    p.add_argument(
        "--lower",
        default="mode",
        choices=["mode", "sample"],
        help="bottom groups at the base conditional's mode (hvae-oodd) or drawn",
    )
    p.add_argument(
        "--bottom",
        default="base",
        choices=["base", "langevin"],
        help="with --lower sample: draws from the base conditional weighted by "
        "e^f, or conditional Langevin with the prior's training settings",
    )
    p.add_argument(
        "--marginal-samples",
        type=positive_int,
        default=16,
        help="inner draws for the EBM prior's marginal over the top groups",
    )
    p.add_argument("--root", default="data", help="torchvision data folder")
    p.add_argument("--download", action="store_true", help="let torchvision download data")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--out", type=output_dir, default="runs/ood", help="output folder (scores, histograms)"
    )
    p.add_argument("--no-plot", action="store_true")
    return p.parse_args(argv)


# -- data and backbone --------------------------------------------------------------------------


def load(args) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    grey = {"fashion-mnist", "mnist"}
    if (args.in_dist in grey) != (args.out_dist in grey):
        raise ValueError("compare datasets of the same image shape (28x28 grey or 32x32 RGB)")
    n_train = None if args.n_train <= 0 else args.n_train
    train = _data.subset(_data.load_images(args.in_dist, "train", args.root, args.download),
                         n_train, args.seed)  # fmt: skip
    test_in = _data.subset(_data.load_images(args.in_dist, "test", args.root, args.download),
                           args.n_test, args.seed + 1)  # fmt: skip
    test_out = _data.subset(_data.load_images(args.out_dist, "test", args.root, args.download),
                            args.n_test, args.seed + 2)  # fmt: skip
    if args.in_dist in grey:  # binarised, as hvae-oodd's FashionMNIST/MNIST experiments
        return (_data.binarize(train, args.seed), _data.binarize(test_in, args.seed + 1),
                _data.binarize(test_out, args.seed + 2))  # fmt: skip
    return train, test_in, test_out


def oodd_lvae(channels: int, shape: tuple[int, ...]):
    r"""A small 3-stage hvae-oodd LVAE for 28x28 binary images (its README's layout, narrower)."""

    from ebm_prior.adapters.oodd import import_oodd

    oodd = import_oodd()

    def det(stride):
        return [{"block": "ResBlockConv2d", "out_channels": channels, "kernel_size": 3,
                 "stride": stride, "weightnorm": True, "gated": False}]  # fmt: skip

    return oodd.models.dvae.LVAE(
        input_shape=shape,
        likelihood_module="BernoulliLikelihoodConv2d",
        config_deterministic=[det(2), det(2), det(1)],
        config_stochastic=[
            {"block": "GaussianConv2d", "latent_features": 8, "weightnorm": True},
            {"block": "GaussianDense", "latent_features": 16, "weightnorm": True},
            {"block": "GaussianDense", "latent_features": 8, "weightnorm": True},
        ],
        activation="ReLU",
    )


def make_backbone(args, train: torch.Tensor) -> tuple[GroupwiseBackbone, bool]:
    r"""Returns the backbone and whether it still needs training."""

    if args.backbone == "biva" and not args.checkpoint:
        raise ValueError("--backbone biva needs --checkpoint (a run_deepvae.py session)")
    if args.backbone in ("biva", "oodd") and args.checkpoint:
        return load_backbone(args.backbone, args.checkpoint), False
    if args.backbone == "oodd":
        from ebm_prior.adapters.oodd import OODDBackbone, data_dependent_init

        model = data_dependent_init(oodd_lvae(args.channels, tuple(train.shape[1:])), train[:64])
        return OODDBackbone(model), True
    if args.checkpoint:
        raise ValueError("--checkpoint loads hvae-oodd checkpoint folders: use --backbone oodd")
    if train.shape[1:] == (1, 28, 28):
        return HierarchicalVAE.from_config("mnist", channels=args.channels), True
    return HierarchicalVAE.from_config("cifar10", channels=args.channels), True


def train_elbo(backbone: GroupwiseBackbone, data: torch.Tensor, args) -> None:
    r"""Maximises the ELBO :math:`\log p(x|z) + \log p_b(z) - \log q(z|x)` through the contract
    (:func:`~ebm_prior.apps.training.fit_elbo`)."""

    fit_elbo(backbone, data, args.epochs, batch_size=args.batch_size, lr=args.lr,
             seed=getattr(args, "seed", 0))  # fmt: skip
    backbone.eval()


# -- scores -------------------------------------------------------------------------------------


def scores(backbone: GroupwiseBackbone, prior: JointEBMPrior, x: torch.Tensor, args) -> dict:
    r"""Returns ``{("gauss"|"ebm", k): L^{>k}}`` for ``k = 0 .. L-1``, each with shape (N,):
    one estimator, :func:`hierarchical_bound`, for both priors."""

    out = {}
    gen = torch.Generator().manual_seed(args.seed)
    for key in [(p, k) for p in ("gauss", "ebm") for k in range(backbone.num_groups)]:
        parts = []
        for xb in x.split(args.batch_size):
            parts.append(
                hierarchical_bound(
                    backbone,
                    xb,
                    key[1],
                    prior if key[0] == "ebm" else None,
                    samples=args.samples,
                    lower=args.lower,
                    bottom=args.bottom,
                    marginal_samples=args.marginal_samples,
                    generator=gen,
                )  # fmt: skip
            )
        out[key] = torch.cat(parts)
    return out


def _score(s: dict, prior: str, k: int) -> torch.Tensor:
    r"""The detection score, higher = more OOD: :math:`-L^{>0}`, or :math:`LLR^{>k}`."""

    return -s[(prior, 0)] if k == 0 else s[(prior, 0)] - s[(prior, k)]


def table(s_in: dict, s_out: dict, n: int, resamples: int = 2000) -> list[dict]:
    r"""One row per prior and ``k``; the EBM rows carry the paired difference of AUROC to the
    Gaussian row of the same ``k`` (same test images) with a 95% bootstrap interval."""

    rows = []
    for prior in ("gauss", "ebm"):
        for k in range(n):
            a, b = _score(s_in, prior, k), _score(s_out, prior, k)
            label = "Gaussian prior" if prior == "gauss" else "EBM prior"
            score = "L>k" if k == 0 else "LLR>k"
            row = dict(prior=label, k=k, score=score, **ood_metrics(a, b)._asdict())
            if prior == "ebm":
                gauss = (_score(s_in, "gauss", k), _score(s_out, "gauss", k))
                ci = paired_auroc_difference(gauss, (a, b), resamples=resamples, seed=k)
                row.update(d_auroc=ci.difference, d_auroc_low=ci.low, d_auroc_high=ci.high)
            rows.append(row)
    return rows


def print_table(rows: list[dict], title: str) -> None:
    print(f"\n{title}\n")
    print(
        f"| {'prior':<16} | k | {'score':<5} | AUROC | AUPRC | FPR80 | AUROC - Gaussian [95% CI] |"
    )
    print(f"|{'-' * 18}|---|{'-' * 7}|-------|-------|-------|---------------------------|")
    for r in rows:
        diff = "-"
        if "d_auroc" in r:
            diff = f"{r['d_auroc']:+.3f} [{r['d_auroc_low']:+.3f}, {r['d_auroc_high']:+.3f}]"
        print(f"| {r['prior']:<16} | {r['k']} | {r['score']:<5} | {r['auroc']:.3f} | "
              f"{r['auprc']:.3f} | {r['fpr80']:.3f} | {diff:<25} |")  # fmt: skip


def save_scores(s_in: dict, s_out: dict, path: str) -> None:
    r"""Writes every :math:`L^{>k}` of both priors and both test sets to an ``.npz`` file."""

    arrays = {f"{part}_{prior}_L{k}": s[(prior, k)].numpy()
              for part, s in (("in", s_in), ("out", s_out)) for prior, k in s}  # fmt: skip
    np.savez_compressed(path, **arrays)


def histograms(s_in: dict, s_out: dict, n: int, args) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, n, figsize=(4 * n, 6), squeeze=False)
    for row, prior in enumerate(("gauss", "ebm")):
        for k in range(n):
            ax = axes[row][k]
            if k == 0:
                a, b, name = s_in[(prior, 0)], s_out[(prior, 0)], "L>0"
            else:
                a = s_in[(prior, 0)] - s_in[(prior, k)]
                b = s_out[(prior, 0)] - s_out[(prior, k)]
                name = f"LLR>{k}"
            ax.hist(a.numpy(), bins=40, alpha=0.6, density=True, label=f"{args.in_dist} (in)")
            ax.hist(b.numpy(), bins=40, alpha=0.6, density=True, label=f"{args.out_dist} (OOD)")
            ax.set_title(f"{'Gaussian' if prior == 'gauss' else 'EBM'} prior: {name}")
            ax.legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"ood_{args.in_dist}_vs_{args.out_dist}.png")
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.bottom == "langevin" and args.lower != "sample":
        raise SystemExit("--bottom langevin draws the bottom groups: use it with --lower sample")
    if not args.no_plot:  # before training, not after it
        require("matplotlib", "examples", "the histograms (or pass --no-plot)")
        os.makedirs(args.out, exist_ok=True)
    if args.prior is not None and not args.checkpoint:
        raise SystemExit("--prior scores a prior fitted on --checkpoint: pass both")
    if args.backbone == "biva":
        require("biva", "biva", "a BIVA backbone")
    torch.manual_seed(args.seed)
    start = time.time()
    train, test_in, test_out = load(args)
    backbone, needs_training = make_backbone(args, train)
    if needs_training:
        train_elbo(backbone, train, args)
    backbone.eval()
    if args.prior is not None:
        from ebm_prior import load_prior

        prior = load_prior(args.prior, backbone=backbone)
    else:
        # the settings recorded here are the ones the scores' chains run with (--bottom langevin)
        prior = JointEBMPrior(
            backbone.latent_shapes,
            nef=args.nef,
            sampler_config={"step_size": args.step_size, "steps": args.langevin_steps},
        )
        fit_two_stage(prior, backbone, train, args.two_stage_epochs, batch_size=args.batch_size,
                      lr=args.ebm_lr, reg=args.energy_reg, step_size=args.step_size,
                      steps=args.langevin_steps, seed=args.seed)  # fmt: skip
    prior.eval().requires_grad_(False)
    s_in = scores(backbone, prior, test_in, args)
    s_out = scores(backbone, prior, test_out, args)
    n = backbone.num_groups
    rows = table(s_in, s_out, n)
    estimator = f"lower={args.lower}" + (
        f", bottom={args.bottom}" if args.lower == "sample" else ""
    )
    print_table(
        rows,
        f"{args.in_dist} (in) vs {args.out_dist} (OOD), {args.backbone} backbone, "
        f"{len(test_in)} + {len(test_out)} test images; hvae-oodd's L>k for both priors "
        f"({args.samples} importance samples, {estimator})",
    )
    out = {"rows": rows, "seconds": time.time() - start}
    os.makedirs(args.out, exist_ok=True)
    out["scores"] = os.path.join(args.out, f"scores_{args.in_dist}_vs_{args.out_dist}.npz")
    save_scores(s_in, s_out, out["scores"])
    rows_path = os.path.join(args.out, f"rows_{args.in_dist}_vs_{args.out_dist}.json")
    text = json.dumps({"args": vars(args), "rows": rows}, indent=1, default=str)
    atomic_write(rows_path, lambda tmp: Path(tmp).write_text(text))
    print(f"\nscores: {out['scores']}")
    if not args.no_plot:
        out["histogram"] = histograms(s_in, s_out, n, args)
        print(f"\nhistograms: {out['histogram']}")
    print(f"total time: {out['seconds']:.0f} s")
    return out


if __name__ == "__main__":
    main()
