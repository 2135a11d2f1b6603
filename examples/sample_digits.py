r"""Sample from a joint EBM prior pulled from the Hub (or a folder) on the digits VAE.

    python examples/train_digits.py --push-to-hub you/digits-ebm-prior
    python examples/sample_digits.py --prior you/digits-ebm-prior \
        --backbone runs/digits/vae_A.safetensors --steps 200 --t 1.0

The prior is checked against the backbone (latent shapes, adapter and checkpoint hash) before
sampling; a PNG grid of the decoded samples is written.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_digits import _grid, load_backbone  # noqa: E402

from ebm_prior import EpsLangevin, load_prior  # noqa: E402


def main(argv: Sequence[str] | None = None) -> torch.Tensor:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--prior", required=True, help="Hub repo id or folder of a saved prior")
    p.add_argument("--revision", default=None, help="branch, tag or commit on the Hub")
    p.add_argument("--backbone", required=True, help="vae_A.safetensors from train_digits.py")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--step-size", type=float, default=0.3)
    p.add_argument("--t", type=float, default=1.0, help="temperature")
    p.add_argument("--mala", action="store_true")
    p.add_argument("--n", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/digits/samples_from_hub.png")
    args = p.parse_args(argv)

    vae = load_backbone(args.backbone)
    prior = load_prior(args.prior, backbone=vae, revision=args.revision)
    g = torch.Generator().manual_seed(args.seed)
    sampler = EpsLangevin(
        prior, vae, step_size=args.step_size, steps=args.steps, t=args.t, mala=args.mala,
        generator=g, progress=True,
    )  # fmt: skip
    out = sampler(vae.sample_eps(args.n, generator=g))
    with torch.no_grad():
        x = vae.decode(out.z)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    _grid(plt, x, args.out, title=f"EBM prior from {args.prior}")
    print(f"wrote {args.out}")
    return x


if __name__ == "__main__":
    main()
