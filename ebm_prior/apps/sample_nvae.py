r"""Sample from a joint EBM prior on a pretrained NVAE (a prior from the Hub or a folder).

    ebm-prior sample-nvae --nvae-root NVAE --checkpoint cifar10/checkpoint.pt \
        --prior you/nvae-cifar10-ebm-prior --num-samples 64 --t 1.0 --steps 40 --step-size 6.3e-3

    # hierarchical sampling: keep the top 10 groups of each test image's posterior, draw the rest
    ebm-prior sample-nvae ... --fixed-top 10 --data cifar10 --split test

    # the backbone's own prior, for comparison
    ebm-prior sample-nvae ... --prior none

The prior is checked against the NVAE checkpoint (group shapes, adapter, checkpoint SHA-256)
before sampling. Writes ``samples.npz`` (uint8 images, array ``x``), ``samples.png`` and, with
``--transitions``, ``transitions.png`` (decoded snapshots along the chains, supp. Fig. 7/9).
Step size ``s`` is the noise scale of ``eps += s^2/2 grad + s noise``; the authors' NVAE code's
``delta`` is ``s^2`` (docs/nvae.md). The grids need ``ebm-prior[examples]``;
``python examples/sample_nvae.py`` runs the same.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

import torch

from ebm_prior import EpsLangevin, load_prior
from ebm_prior.adapters.nvae import NVAEBackbone
from ebm_prior.apps._common import (
    nonnegative_int,
    output_dir,
    parser,
    positive_float,
    positive_int,
    prior_or_none,
    require,
)
from ebm_prior.apps.images import fit_to, image_source, load_images, save_grid, save_npz


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = parser(__doc__)
    p.add_argument("--nvae-root", default=None, help="clone of NVlabs/NVAE (default: NVAE_ROOT)")
    p.add_argument("--checkpoint", required=True, help="NVAE checkpoint.pt")
    p.add_argument(
        "--prior", type=prior_or_none, required=True, help="Hub repo id, folder, or 'none'"
    )
    p.add_argument("--revision", default=None, help="branch, tag or commit on the Hub")
    p.add_argument("--num-samples", type=positive_int, default=64)
    p.add_argument("--batch-size", type=positive_int, default=16)
    p.add_argument(
        "--t", type=positive_float, default=1.0, help="temperature (scales every sigma)"
    )
    p.add_argument(
        "--steps", type=positive_int, default=40, help="Langevin steps (authors: 40 at test)"
    )
    p.add_argument("--step-size", type=positive_float, default=6.3e-3, help="s = sqrt(delta)")
    p.add_argument("--mala", action="store_true", help="Metropolis-adjusted (exact) Langevin")
    p.add_argument("--target", choices=["exact", "anchor"], default="exact")
    p.add_argument(
        "--clip-grad", type=positive_float, default=None, help="per-chain gradient clip"
    )
    p.add_argument(
        "--readjust-bn",
        type=nonnegative_int,
        default=0,
        metavar="ITERS",
        help="re-estimate BN statistics at --t with ITERS batches first (NVAE: 500)",
    )
    p.add_argument(
        "--fixed-top",
        type=nonnegative_int,
        default=0,
        help="hold the top K groups at each --data image's posterior",
    )
    p.add_argument("--data", type=image_source, default=None, help="images for --fixed-top")
    p.add_argument("--data-root", default="data")
    p.add_argument("--split", default="test")
    p.add_argument(
        "--transitions",
        type=nonnegative_int,
        default=0,
        metavar="K",
        help="also save K decoded snapshots along the first chains",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=output_dir, default="runs/nvae-samples")
    args = p.parse_args(argv)
    if args.fixed_top and args.data is None:
        p.error("--fixed-top needs --data (the images whose top groups are kept)")
    return args


def main(argv: Sequence[str] | None = None) -> torch.Tensor:
    args = parse_args(argv)
    require("matplotlib", "examples", "the sample grids")
    os.makedirs(args.out, exist_ok=True)
    backbone = NVAEBackbone.from_checkpoint(args.checkpoint, args.nvae_root, device=args.device)
    g = torch.Generator(device=args.device).manual_seed(args.seed)
    if args.readjust_bn:
        backbone.readjust_bn(args.readjust_bn, args.batch_size, args.t, generator=g, progress=True)
    prior = None
    if args.prior.lower() != "none":
        prior = load_prior(args.prior, backbone=backbone, revision=args.revision)
    if args.fixed_top:
        if not 0 < args.fixed_top < backbone.num_groups:
            raise SystemExit(f"--fixed-top must be in 1..{backbone.num_groups - 1}")
        data = load_images(args.data, args.data_root, args.split, limit=args.num_samples)
        data = fit_to(data, backbone.x_shape, seed=args.seed).to(args.device)

    images, snapshots = [], []
    for start in range(0, args.num_samples, args.batch_size):
        n = min(args.batch_size, args.num_samples - start)
        eps = backbone.sample_eps(n, generator=g)
        if args.fixed_top:
            with torch.no_grad():
                top = backbone.z_to_eps(backbone.posterior(data[start : start + n]).z, args.t)
            eps = top[: args.fixed_top] + eps[args.fixed_top :]
            fixed = list(range(args.fixed_top))
        else:
            fixed = []
        if prior is None:  # the backbone's own prior: no Langevin
            z = [zi.detach() for zi in _no_grad(backbone.eps_to_z, eps, args.t)]
        else:
            sampler = EpsLangevin(
                prior, backbone, step_size=args.step_size, steps=args.steps, t=args.t,
                mala=args.mala, clip_grad=args.clip_grad, target=args.target, generator=g,
                progress=args.num_samples <= args.batch_size,
            )  # fmt: skip
            if args.transitions and start == 0:
                snapshots = _transitions(sampler, backbone, eps, fixed, args)
            z = sampler(eps, fixed_groups=fixed).z
        with torch.no_grad():
            images.append(backbone.decode(z).cpu())
    x = torch.cat(images)

    save_npz(os.path.join(args.out, "samples.npz"), x)
    name = "base NVAE prior" if prior is None else f"EBM prior {args.prior}"
    save_grid(os.path.join(args.out, "samples.png"), x[:64], title=f"{name}, t={args.t}")
    if args.fixed_top:
        both = torch.stack([data[: len(x)].cpu(), x], 1).flatten(0, 1)[:64]
        title = f"data | top {args.fixed_top} groups kept, the rest from the prior"
        save_grid(os.path.join(args.out, "hierarchical.png"), both, nrow=8, title=title)
    if snapshots:
        grid = torch.stack(snapshots, 1).flatten(0, 1)  # rows: chains, columns: time
        title = "Langevin transitions, base prior (left) to EBM prior (right)"
        save_grid(
            os.path.join(args.out, "transitions.png"), grid, nrow=len(snapshots), title=title
        )
    print(f"wrote {len(x)} samples to {args.out}")
    return x


def _no_grad(fn, *a):
    with torch.no_grad():
        return fn(*a)


def _transitions(sampler, backbone, eps, fixed, args) -> list[torch.Tensor]:
    r"""Decoded images of 8 chains at ``args.transitions`` evenly spaced points of the run."""

    eps = [e[:8].clone() for e in eps]
    k = max(1, args.transitions - 1)
    per = max(1, args.steps // k)
    part = EpsLangevin(
        sampler.prior, backbone, step_size=args.step_size, steps=per, t=args.t, mala=args.mala,
        clip_grad=args.clip_grad, target=args.target, generator=sampler.generator,
    )  # fmt: skip
    snaps = [backbone.decode(_no_grad(backbone.eps_to_z, eps, args.t)).detach().cpu()]
    for _ in range(k):
        eps = part(eps, fixed_groups=fixed).x
        snaps.append(backbone.decode(_no_grad(backbone.eps_to_z, eps, args.t)).detach().cpu())
    return snaps


if __name__ == "__main__":
    main()
