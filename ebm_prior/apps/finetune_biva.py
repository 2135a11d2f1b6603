r"""Fit a joint EBM prior two-stage on a pretrained BIVA, then sample from it.

Loads a training session of ``run_deepvae.py`` (the training script of the biva-pytorch GitHub
repository, not in the PyPI package; see docs/biva.md), a directory with ``hyperparameters.p``,
``config.json`` and ``model.pth``, with ``BIVABackbone.from_logdir``; freezes it, fits the energy
networks on its posterior samples (supplement 1.2), saves the prior with ``save_pretrained`` and
writes a grid of samples from the Gaussian prior and from the EBM prior (same starting noise).

Without ``--logdir`` it first trains a small BIVA on scikit-learn's 8x8 digits (no download) and
writes it in that script's session format, so the whole path runs offline. With ``--logdir``,
pass the data the model was trained on as ``--data-file`` (a ``.npy`` or ``.pt`` array of shape
``(N, C, H, W)``, in the model's range: {0, 1} for Bernoulli, [-1, 1] for discretised logistics).

    ebm-prior finetune-biva                                 # demo, outputs in runs/biva
    ebm-prior finetune-biva --logdir runs/binmnist-biva-seed42 --data-file train.npy

Needs ``ebm-prior[biva,examples]``; ``python examples/finetune_biva.py`` runs the same.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pickle
from collections.abc import Sequence

import torch
from torch import Tensor

from ebm_prior import EpsLangevin, JointEBMPrior
from ebm_prior.adapters.biva import BIVABackbone
from ebm_prior.apps._common import (
    add_checkpoint_every,
    existing_file,
    nonnegative_float,
    output_dir,
    parser,
    positive_float,
    positive_int,
    require,
)
from ebm_prior.apps.data import load_array
from ebm_prior.apps.hierarchical_reconstruction import tiny_biva, train_backbone
from ebm_prior.apps.images import panels
from ebm_prior.apps.train_digits import load_digits_binary
from ebm_prior.apps.training import fit_two_stage


def write_demo_session(path: str, data: Tensor, epochs: int) -> None:
    r"""Trains a small BIVA on ``data`` and writes it as ``run_deepvae.py`` would."""

    from biva.model.stage import BivaStage

    model = tiny_biva(data[:100])
    train_backbone(BIVABackbone(model), data, epochs)
    hyper = {
        "Stage": BivaStage,
        "tensor_shp": (-1, *data.shape[1:]),
        "stages": [[[16, 3, 1], [16, 3, 2]], [[16, 3, 1], [16, 3, 2]]],
        "latents": [
            {"N": 4, "kernel": 3, "block": type(model.stages[0].td_stochastic)},
            {"N": 8, "block": type(model.stages[1].stochastic)},
        ],
        "nonlinearity": "elu",
        "q_dropout": 0.0,
        "p_dropout": 0.0,
        "type": "biva",
        "features_out": data.shape[1],
        "no_skip": False,
        "log_var_act": torch.nn.Softplus,
    }
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "hyperparameters.p"), "wb") as f:
        pickle.dump(hyper, f)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"dataset": "binmnist", "model_type": "biva"}, f)
    torch.save(model.state_dict(), os.path.join(path, "model.pth"))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = parser(__doc__)
    p.add_argument("--logdir", default=None, help="a run_deepvae.py session (default: demo)")
    p.add_argument(
        "--data-file",
        type=existing_file,
        default=None,
        help="training data for --logdir (.npy/.pt)",
    )
    p.add_argument("--demo-epochs", type=positive_int, default=50, help="BIVA epochs for the demo")
    p.add_argument("--ebm-epochs", type=positive_int, default=30, help="two-stage EBM epochs")
    p.add_argument("--batch-size", type=positive_int, default=100)
    p.add_argument("--nef", type=positive_int, default=64, help="energy-network width")
    p.add_argument("--ebm-lr", type=positive_float, default=2e-5)
    p.add_argument(
        "--energy-reg", type=nonnegative_float, default=0.1, help="L2 penalty on energies"
    )
    p.add_argument(
        "--train-steps", type=positive_int, default=30, help="Langevin steps while fitting"
    )
    p.add_argument(
        "--steps", type=positive_int, default=100, help="Langevin steps for the samples"
    )
    p.add_argument("--step-size", type=positive_float, default=0.3, help="Langevin step size s")
    p.add_argument("--samples", type=positive_int, default=36)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=output_dir, default="runs/biva", help="output directory")
    add_checkpoint_every(p)
    p.add_argument("--push-to-hub", metavar="REPO", help="push the fitted prior to the Hub")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    require("biva", "biva", "a BIVA backbone")
    require("matplotlib", "examples", "the sample grid")
    torch.manual_seed(args.seed)
    os.makedirs(args.out, exist_ok=True)

    if args.logdir is None:
        data, _ = load_digits_binary(args.seed)
        logdir = os.path.join(args.out, "demo-session")
        write_demo_session(logdir, data, args.demo_epochs)
    else:
        if args.data_file is None:
            raise SystemExit("--logdir needs --data-file (the data the model was trained on)")
        logdir, data = args.logdir, load_array(args.data_file)

    backbone = BIVABackbone.from_logdir(logdir).eval().requires_grad_(False)
    print(f"loaded {logdir}: {backbone.num_groups} groups {backbone.latent_shapes}")
    prior = JointEBMPrior(
        backbone.latent_shapes,
        nef=args.nef,
        sampler_config={"step_size": args.step_size, "steps": args.train_steps},
        backbone=backbone.fingerprint(),
    )
    fit_two_stage(
        prior,
        backbone,
        data,
        args.ebm_epochs,
        seed=args.seed,
        batch_size=args.batch_size,
        lr=args.ebm_lr,
        reg=args.energy_reg,
        step_size=args.step_size,
        steps=args.train_steps,
        checkpoint_dir=os.path.join(args.out, "checkpoints"),
        checkpoint_every=args.checkpoint_every,
    )
    prior.eval().requires_grad_(False)
    prior_dir = os.path.join(args.out, "ebm-prior")
    prior.save_pretrained(prior_dir)
    if args.push_to_hub:
        from ebm_prior import push_prior

        print(f"pushed to {push_prior(prior, args.push_to_hub, backbone=backbone)}")

    gen = torch.Generator().manual_seed(args.seed)
    eps0 = backbone.sample_eps(args.samples, generator=gen)
    out = EpsLangevin(prior, backbone, step_size=args.step_size, steps=args.steps, generator=gen)(
        eps0
    )
    with torch.no_grad():
        base = backbone.decode(backbone.eps_to_z(eps0))
        ebm = backbone.decode(out.z)
    if backbone.likelihood == "discretized_logistic":
        base, ebm = (base + 1) / 2, (ebm + 1) / 2
    path = os.path.join(args.out, "samples_biva.png")
    ncol = math.ceil(math.sqrt(args.samples))
    panels(path, [(base, ncol, "Gaussian prior"), (ebm, ncol, "EBM prior (Langevin)")],
           "BIVA: same starting noise, base prior vs Langevin on the EBM prior")  # fmt: skip
    print(f"wrote {path} and {prior_dir}")
    return {"prior_dir": prior_dir, "samples": ebm, "path": path, "backbone": backbone}


if __name__ == "__main__":
    main()
