r"""Sample from a joint EBM prior pulled from the Hub (or a folder) on the digits VAE.

    ebm-prior train-digits --push-to-hub you/digits-ebm-prior
    ebm-prior sample-digits --prior you/digits-ebm-prior \
        --backbone runs/digits/vae_A.safetensors --steps 200 --t 1.0

The prior is checked against the backbone (latent shapes, adapter and checkpoint hash) before
sampling; a PNG grid of the decoded samples is written (needs ``ebm-prior[examples]``).
``python examples/sample_digits.py`` runs the same.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from ebm_prior import EpsLangevin, load_prior
from ebm_prior.apps._common import (
    existing_file,
    output_file,
    parser,
    positive_float,
    positive_int,
    prior_source,
    require,
)
from ebm_prior.apps.train_digits import _grid, load_backbone


def main(argv: Sequence[str] | None = None) -> torch.Tensor:
    p = parser(__doc__)
    p.add_argument("--prior", type=prior_source, required=True,
                   help="Hub repo id or folder of a saved prior")  # fmt: skip
    p.add_argument("--revision", default=None, help="branch, tag or commit on the Hub")
    p.add_argument("--backbone", type=existing_file, required=True,
                   help="vae_A.safetensors from train-digits")  # fmt: skip
    p.add_argument("--steps", type=positive_int, default=200)
    p.add_argument("--step-size", type=positive_float, default=0.3)
    p.add_argument("--t", type=positive_float, default=1.0, help="temperature")
    p.add_argument("--mala", action="store_true")
    p.add_argument("--n", type=positive_int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=output_file, default="runs/digits/samples_from_hub.png")
    args = p.parse_args(argv)
    require("matplotlib", "examples", "the sample grid")

    vae = load_backbone(args.backbone)
    prior = load_prior(args.prior, backbone=vae, revision=args.revision)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
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

    _grid(plt, x, args.out, title=f"EBM prior from {args.prior}")
    print(f"wrote {args.out}")
    return x


if __name__ == "__main__":
    main()
