r"""Hierarchical reconstructions with a joint EBM prior (supplement Fig. 5).

Encode test images, keep the inferred eps of the top groups, and resample the lower groups from
the EBM prior by epsilon-space Langevin with the top groups held fixed, for an increasing number
``m`` of resampled groups: ``m = 0`` is the plain reconstruction, ``m = L`` an unconditional
sample. Columns of the PNG grid: the data, then ``--repeats`` samples for each ``m``.

Works with any ``Backbone``. The default trains the reference ``HierarchicalVAE`` briefly on
scikit-learn's 8x8 digits (no download) and fits the EBM prior two-stage on it; ``--backbone
biva`` does the same with a small BIVA from ``biva-pytorch`` (three latent groups).

    ebm-prior hierarchical-reconstruction                     # outputs in runs/hrec
    ebm-prior hierarchical-reconstruction --backbone biva
    ebm-prior hierarchical-reconstruction --epochs 1 --ebm-epochs 1 --steps 2 --out x

Needs ``ebm-prior[examples]`` (and ``biva`` for the BIVA backbones);
``python examples/hierarchical_reconstruction.py`` runs the same.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

import torch
from torch import Tensor

from ebm_prior import (
    Backbone,
    EpsLangevin,
    HierarchicalVAE,
    JointEBMPrior,
)
from ebm_prior.apps._common import (
    nonnegative_int,
    output_dir,
    parser,
    positive_float,
    positive_int,
    prior_source,
    require,
)
from ebm_prior.apps.train_digits import load_digits_binary
from ebm_prior.apps.training import fit_elbo, fit_two_stage


def tiny_biva(x: Tensor, family: str = "biva", filters: int = 16):
    r"""Builds a small ``biva-pytorch`` model for 8x8 images and initialises it on ``x``.

    Two stages: a convolutional group :math:`(4, 4, 4)` below a dense group :math:`(8,)`; BIVA
    splits the lower stage into a top-down and a bottom-up group (three groups in all).
    """

    from biva import BIVA, LVAE, VAE, ConvNormal, DenseNormal

    from ebm_prior.adapters.biva import data_dependent_init

    cls = {"vae": VAE, "lvae": LVAE, "biva": BIVA}[family]
    latents = [{"N": 4, "kernel": 3, "block": ConvNormal}, {"N": 8, "block": DenseNormal}]
    stages = [[[filters, 3, 1], [filters, 3, 2]], [[filters, 3, 1], [filters, 3, 2]]]
    model = cls(tensor_shp=(-1, *x.shape[1:]), stages=stages, latents=latents)
    return data_dependent_init(model, x)


def elbo(backbone: Backbone, x: Tensor) -> Tensor:
    r"""Single-sample ELBO through the contract alone, with shape :math:`(B,)`.

    .. math:: \log p(x \mid z) + \log p_b(z) - \log q(z \mid x), \quad z \sim q(z \mid x)
    """

    post = backbone.posterior(x)
    return backbone.log_likelihood(x, post.z) + backbone.log_prior(post.z) - post.log_q


def train_backbone(
    backbone: Backbone, data: Tensor, epochs: int, batch_size: int = 100, lr: float = 1e-3
) -> None:
    r"""Trains any backbone by maximising :func:`elbo` with Adam (:func:`fit_elbo`)."""

    trainer = fit_elbo(backbone, data, epochs, batch_size=batch_size, lr=lr)
    n = trainer.steps_per_epoch
    for epoch in range(epochs):
        elbo = sum(r["elbo"] for r in trainer.history[epoch * n : (epoch + 1) * n]) / n
        print(f"backbone epoch {epoch + 1}/{epochs}: ELBO {elbo:.2f} nats")


def hierarchical_reconstructions(
    prior: JointEBMPrior | None,
    backbone: Backbone,
    x: Tensor,
    repeats: int = 2,
    step_size: float = 0.3,
    steps: int = 100,
    t: float = 1.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""Resamples the lower groups of the posterior from the EBM prior, more and more of them.

    For :math:`m = 0, \dots, L` the top :math:`L - m` groups keep the eps of a posterior sample,
    :math:`\epsilon_{\leq L-m} = T_b^{-1}(z)_{\leq L-m}` with :math:`z \sim q(z \mid x)`, and the
    lower :math:`m` groups are drawn from the conditional EBM prior
    :math:`\pi(\epsilon_{>L-m} \mid \epsilon_{\leq L-m})` by Langevin from
    :math:`\mathcal{N}(0, I)`.

    Arguments:
        prior: The energy; ``None`` resamples from the backbone's own prior.
        backbone: Any backbone.
        x: A data batch with shape :math:`(N, *)`.
        repeats: Samples per :math:`m` (:math:`m = 0` is shown once).

    Returns:
        Images with shape :math:`(N, 1 + 1 + L \cdot \text{repeats}, *)`: the data, the
        reconstruction, then ``repeats`` samples for each :math:`m = 1, \dots, L`.
    """

    n, groups = len(x), backbone.num_groups
    with torch.no_grad():
        eps_post = backbone.z_to_eps(backbone.posterior(x).z, t)
        cols = [x, backbone.decode(backbone.eps_to_z(eps_post, t))]
    sampler = EpsLangevin(
        prior, backbone, step_size=step_size, steps=steps, t=t, generator=generator
    )
    for m in range(1, groups + 1):
        keep = groups - m
        for _ in range(repeats):
            fresh = backbone.sample_eps(n, generator=generator)
            eps0 = eps_post[:keep] + fresh[keep:]
            out = sampler(eps0, fixed_groups=range(keep)) if steps > 0 else None
            z = out.z if out is not None else backbone.eps_to_z(eps0, t)
            with torch.no_grad():
                cols.append(backbone.decode(z))
    return torch.stack([c.detach().reshape(x.shape) for c in cols], 1)


def save_grid(images: Tensor, path: str, titles: Sequence[str], title: str = "") -> None:
    r"""Writes a grid of images with shape :math:`(N, K, C, H, W)` (rows, columns) to a PNG."""

    require("matplotlib", "examples", "the figure").use("Agg")
    import matplotlib.pyplot as plt

    rows, cols = images.shape[:2]
    fig, axes = plt.subplots(rows, cols, figsize=(1.1 * cols, 1.1 * rows + 0.4), squeeze=False)
    for r in range(rows):
        for c in range(cols):
            img = images[r, c].float().clamp(0, 1)
            img = img[0] if img.shape[0] == 1 else img.permute(1, 2, 0)
            ax = axes[r, c]
            ax.imshow(img.cpu().numpy(), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(titles[c], fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def column_titles(groups: int, repeats: int) -> list[str]:
    r"""Titles for :func:`hierarchical_reconstructions`' columns."""

    return ["data", "recon."] + [
        f"{m} resampled" for m in range(1, groups + 1) for _ in range(repeats)
    ]


BACKBONES = ("reference", "biva", "lvae", "vae")


def build_backbone(name: str, train: Tensor) -> Backbone:
    r"""The reference VAE (``digits`` config) or a small BIVA, untrained."""

    if name == "reference":
        return HierarchicalVAE.from_config("digits")
    if name in ("biva", "lvae", "vae"):
        from ebm_prior.adapters.biva import BIVABackbone

        return BIVABackbone(tiny_biva(train[:100], family=name))
    raise ValueError(f"unknown backbone {name!r}; choose reference, biva, lvae or vae")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = parser(__doc__)
    p.add_argument("--backbone", default="reference", choices=BACKBONES, help="the backbone")
    p.add_argument("--epochs", type=positive_int, default=100, help="backbone ELBO epochs")
    p.add_argument("--ebm-epochs", type=positive_int, default=30, help="two-stage EBM epochs")
    p.add_argument(
        "--prior",
        type=prior_source,
        default=None,
        help="load a saved JointEBMPrior instead of fitting",
    )
    p.add_argument("--nef", type=positive_int, default=64, help="energy-network width")
    p.add_argument(
        "--train-steps", type=positive_int, default=30, help="Langevin steps while fitting"
    )
    p.add_argument(
        "--steps", type=nonnegative_int, default=100, help="Langevin steps for the figure"
    )
    p.add_argument("--step-size", type=positive_float, default=0.3, help="Langevin step size s")
    p.add_argument("--rows", type=positive_int, default=8, help="test images (grid rows)")
    p.add_argument("--repeats", type=positive_int, default=2, help="samples per number of groups")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=output_dir, default="runs/hrec", help="output directory")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    require("matplotlib", "examples", "the figure")
    if args.backbone != "reference":
        require("biva", "biva", f"the {args.backbone!r} backbone")
    torch.manual_seed(args.seed)
    os.makedirs(args.out, exist_ok=True)
    train, test = load_digits_binary(args.seed)

    backbone = build_backbone(args.backbone, train)
    train_backbone(backbone, train, args.epochs)
    if args.prior is not None:
        prior = JointEBMPrior.from_pretrained(args.prior)
    else:
        prior = JointEBMPrior(
            backbone.latent_shapes,
            nef=args.nef,
            sampler_config={"step_size": args.step_size, "steps": args.train_steps},
            backbone=backbone.fingerprint(),
        )
        fit_two_stage(
            prior, backbone, train, args.ebm_epochs, step_size=args.step_size,
            steps=args.train_steps, seed=args.seed,
        )  # fmt: skip
    prior.eval().requires_grad_(False)

    gen = torch.Generator().manual_seed(args.seed)
    grid = hierarchical_reconstructions(
        prior, backbone, test[: args.rows], args.repeats, args.step_size, args.steps, generator=gen
    )
    path = os.path.join(args.out, f"hierarchical_reconstruction_{args.backbone}.png")
    save_grid(
        grid,
        path,
        column_titles(backbone.num_groups, args.repeats),
        f"{args.backbone}: top groups kept, m lower groups resampled from the EBM prior",
    )
    print(f"wrote {path}")
    return {"grid": grid, "path": path, "backbone": backbone, "prior": prior}


if __name__ == "__main__":
    main()
