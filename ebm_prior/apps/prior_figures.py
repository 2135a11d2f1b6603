r"""The supplement's figures for a prior fitted on a trained BIVA, hvae-oodd or NVAE checkpoint.

Loads the backbone (``--backbone biva|oodd|nvae --checkpoint ...``, the checkpoint its own
training code wrote) and a prior fitted on it (a folder or Hub repository; its recorded backbone
fingerprint must match), and writes, from the same base draws :math:`\epsilon_0` for both priors:

- ``samples.png``: the Gaussian prior (:math:`\epsilon_0` decoded) next to the EBM prior
  (:math:`\epsilon_0` moved by the prior's eps-space Langevin chain);
- ``transitions.png`` (supplement Fig. 7): decoded snapshots of 8 chains, base prior (left) to
  EBM prior (right);
- ``temperature.png`` (Fig. 10): both priors at temperatures ``--temperatures`` (every
  :math:`\sigma` of the backbone's prior scaled by :math:`t`, the EBM chain targeting
  :math:`f_a(z) + \log p_b^t(z)`);
- ``hierarchical.png`` (Fig. 5, with ``--data-file`` or ``--images``): test images, their
  reconstruction, then the lower :math:`m` groups resampled from the EBM prior with the
  inferred top groups held fixed, for :math:`m = 1, \dots, L`.

    ebm-prior prior-figures --backbone biva --checkpoint runs/binmnist-biva-seed42 \
        --prior runs/biva-prior/seed0/ebm-prior --data-file test.npy --out runs/biva-figures
    ebm-prior prior-figures --backbone nvae --checkpoint runs/eval-mnist/checkpoint.pt \
        --prior runs/nvae-prior/seed0/ebm-prior --images mnist --out runs/nvae-figures

Needs ``ebm-prior[examples]`` (matplotlib) and the backbone's extra (``biva``; hvae-oodd and
NVAE from a clone named by ``OODD_ROOT`` / ``NVAE_ROOT`` or ``--code-root``);
``python examples/prior_figures.py`` runs the same.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Sequence

import torch
from torch import Tensor

from ebm_prior import Backbone, EpsLangevin, JointEBMPrior
from ebm_prior.apps._common import (
    existing_file,
    nonnegative_int,
    output_dir,
    parser,
    positive_float,
    positive_int,
    require,
)
from ebm_prior.apps.data import load_array, load_images
from ebm_prior.apps.images import fit_to, panels

__all__ = ["load_backbone", "main", "to_unit"]

BACKBONES = ("biva", "oodd", "nvae")


def load_backbone(kind: str, checkpoint: str, code_root: str | None = None) -> Backbone:
    r"""Loads a frozen backbone from the checkpoint its own training code wrote.

    Arguments:
        kind: ``"biva"`` (a ``run_deepvae.py`` session folder), ``"oodd"`` (an hvae-oodd
            checkpoint folder) or ``"nvae"`` (NVAE's ``checkpoint.pt``).
        checkpoint: The path.
        code_root: NVAE's clone (default ``NVAE_ROOT``); hvae-oodd's is read from
            ``OODD_ROOT``.
    """

    if kind == "biva":
        from ebm_prior.adapters.biva import BIVABackbone

        backbone = BIVABackbone.from_logdir(checkpoint)
    elif kind == "oodd":
        from ebm_prior.adapters.oodd import OODDBackbone

        backbone = OODDBackbone.from_checkpoint(checkpoint)
    elif kind == "nvae":
        from ebm_prior.adapters.nvae import NVAEBackbone

        backbone = NVAEBackbone.from_checkpoint(checkpoint, code_root)
    else:
        raise ValueError(f"unknown backbone {kind!r}; known: {BACKBONES}")
    return backbone.eval().requires_grad_(False)


def to_unit(backbone: Backbone, x: Tensor) -> Tensor:
    r"""Maps decoded means to [0, 1] (backbones whose data range is [-1, 1] are shifted)."""

    if tuple(getattr(backbone, "data_range", (0.0, 1.0))) == (-1.0, 1.0):
        x = (x + 1) / 2
    return x.clamp(0, 1)


def _decode(backbone: Backbone, eps: Sequence[Tensor], t: float = 1.0) -> Tensor:
    with torch.no_grad():
        return to_unit(backbone, backbone.decode(backbone.eps_to_z(eps, t))).cpu()


def test_images(
    backbone: Backbone, data_file: str | None, images: str | None, n: int | None = None
) -> Tensor:
    r"""The first ``n`` test images in the model's range, shape :math:`(n, *x\_shape)`:
    ``data_file`` (.npy/.pt) as written, or the test split of ``images`` (``"mnist"`` /
    ``"fashion-mnist"``) brought to :attr:`backbone.x_shape` by ``fit_to`` (NVAE's loaders)."""

    if data_file is not None:
        return load_array(data_file)[:n]
    return fit_to(load_images(images, "test")[:n], backbone.x_shape)


def _sampler(prior: JointEBMPrior, backbone: Backbone, args, gen, **kw) -> EpsLangevin:
    options = {**prior.sampler_config, **kw}
    if args.steps is not None and "steps" not in kw:
        options["steps"] = args.steps
    return EpsLangevin(prior, backbone, generator=gen, trace=False, **options)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = parser(__doc__)
    p.add_argument("--backbone", choices=BACKBONES, required=True)
    p.add_argument("--checkpoint", required=True, help="the backbone's checkpoint (see above)")
    p.add_argument("--code-root", default=None, help="NVAE clone (default: NVAE_ROOT)")
    p.add_argument("--prior", required=True, help="a saved prior folder or a Hub repository")
    p.add_argument("--revision", default=None, help="Hub revision of --prior")
    p.add_argument(
        "--data-file",
        type=existing_file,
        default=None,
        help="test images in the model's range (.npy/.pt) for hierarchical.png",
    )
    p.add_argument(
        "--images",
        choices=("mnist", "fashion-mnist"),
        default=None,
        help="instead of --data-file: that data set's test images, brought to the model's "
        "input as NVAE's loaders do (28x28 padded to 32x32 and binarised for NVAE MNIST)",
    )
    p.add_argument("--samples", type=positive_int, default=64)
    p.add_argument("--steps", type=positive_int, default=None,
                   help="Langevin steps (default: the prior's sampler_config)")  # fmt: skip
    p.add_argument("--snapshots", type=positive_int, default=6, help="columns of transitions.png")
    p.add_argument("--temperatures", default="0.4,0.6,0.8,1.0")
    p.add_argument("--rows", type=positive_int, default=8, help="images per column of the grids")
    p.add_argument("--repeats", type=nonnegative_int, default=1,
                   help="samples per number of resampled groups in hierarchical.png")  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=output_dir, default="runs/figures", help="output directory")
    args = p.parse_args(argv)
    try:
        args.temperatures = [positive_float(t) for t in args.temperatures.split(",")]
    except argparse.ArgumentTypeError as e:
        p.error(f"--temperatures: {e}")
    if args.data_file is not None and args.images is not None:
        p.error("give --data-file or --images, not both")
    if args.snapshots < 2:
        p.error("--snapshots must be at least 2 (the start and the end of the chain)")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, str]:
    args = parse_args(argv)
    require("matplotlib", "examples", "the figures")
    from ebm_prior import load_prior

    os.makedirs(args.out, exist_ok=True)
    backbone = load_backbone(args.backbone, args.checkpoint, args.code_root)
    prior = load_prior(args.prior, backbone=backbone, revision=args.revision)
    prior = prior.eval().requires_grad_(False)
    gen = torch.Generator().manual_seed(args.seed)
    paths = {}

    # samples: the same eps_0 decoded, and moved by the prior's chain
    eps0 = backbone.sample_eps(args.samples, generator=gen)
    ebm = to_unit(backbone, backbone.decode(_sampler(prior, backbone, args, gen)(eps0).z).detach())
    paths["samples"] = os.path.join(args.out, "samples.png")
    ncol = math.ceil(math.sqrt(args.samples))
    panels(paths["samples"],
           [(_decode(backbone, eps0), ncol, "Gaussian prior"),
            (ebm.cpu(), ncol, "joint EBM prior (same base draws)")],
           f"{args.backbone}: the backbone's prior vs the EBM prior")  # fmt: skip

    # transitions (Fig. 7): one chain cut in segments on the same generator
    steps = args.steps or prior.sampler_config.get("steps", 100)
    marks = [round(i * steps / (args.snapshots - 1)) for i in range(args.snapshots)]
    x = [e[: args.rows] for e in backbone.sample_eps(args.rows, generator=gen)]
    snaps = [_decode(backbone, x)]
    for a, b in zip(marks, marks[1:]):
        if b > a:
            x = _sampler(prior, backbone, args, gen, steps=b - a)(x).x
        snaps.append(_decode(backbone, x))
    paths["transitions"] = os.path.join(args.out, "transitions.png")
    grid = torch.stack(snaps, 1).flatten(0, 1)
    panels(paths["transitions"], [(grid, args.snapshots, f"steps {marks}")],
           "Langevin transitions: base prior (left) to EBM prior (right)")  # fmt: skip

    # temperature (Fig. 10): columns of one panel per prior
    base = backbone.sample_eps(args.rows, generator=gen)
    cols_g, cols_e = [], []
    for t in args.temperatures:
        cols_g.append(_decode(backbone, base, t))
        out = _sampler(prior, backbone, args, gen, t=t)(base)
        cols_e.append(to_unit(backbone, backbone.decode(out.z).detach()).cpu())
    k = len(args.temperatures)
    paths["temperature"] = os.path.join(args.out, "temperature.png")
    panels(paths["temperature"],
           [(torch.stack(cols_g, 1).flatten(0, 1), k, "Gaussian prior"),
            (torch.stack(cols_e, 1).flatten(0, 1), k, "joint EBM prior")],
           f"temperature t = {', '.join(map(str, args.temperatures))} (columns)")  # fmt: skip

    # hierarchical sampling with the top groups fixed (Fig. 5)
    if (args.data_file is not None or args.images is not None) and args.repeats > 0:
        from ebm_prior.apps.hierarchical_reconstruction import hierarchical_reconstructions

        data = test_images(backbone, args.data_file, args.images, args.rows)
        data = data.to(backbone.device, backbone.dtype)
        options = {**prior.sampler_config}
        grid = hierarchical_reconstructions(
            prior, backbone, data, repeats=args.repeats,
            step_size=options.get("step_size", 0.3), steps=args.steps or options.get("steps", 100),
            generator=gen,
        )  # fmt: skip
        grid = to_unit(backbone, grid.flatten(0, 1)).cpu()
        paths["hierarchical"] = os.path.join(args.out, "hierarchical.png")
        panels(paths["hierarchical"], [(grid, grid.shape[0] // len(data), "")],
               "data | reconstruction | lowest m = 1..L groups\nresampled from the EBM "
               "prior, the top groups kept")  # fmt: skip
    for name, path in paths.items():
        print(f"wrote {name}: {path}")
    return paths


if __name__ == "__main__":
    main()
