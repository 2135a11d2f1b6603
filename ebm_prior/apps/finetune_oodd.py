r"""Fit the joint EBM prior two-stage on an hvae-oodd checkpoint, then sample from it.

Loads a checkpoint folder written by hvae-oodd's ``scripts/dvae_run.py`` (``model.save``:
``model_class_name.pt``, ``model_kwargs.pt``, ``model_state_dict.pt``; read without unpickling
arbitrary objects), freezes it, fits the EBM prior on its posterior samples (supplement 1.2,
two-stage), saves the prior (safetensors + ``config.json``, with the backbone's fingerprint) and
writes a grid of samples from the Gaussian prior and from the EBM prior (eps-space Langevin).

    export OODD_ROOT=path/to/hvae-oodd
    ebm-prior finetune-oodd --checkpoint models/FashionMNIST-21-01-15-15-35-21.236574
    ebm-prior finetune-oodd --train-tiny --data random --out runs/x   # smoke run

``--train-tiny`` builds and briefly trains a small LVAE, saves it in hvae-oodd's own format and
loads it back, so the whole path runs without a trained checkpoint. The sample grid needs
``ebm-prior[examples]``; ``python examples/finetune_oodd.py`` runs the same.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

import torch

from ebm_prior import EpsLangevin, JointEBMPrior
from ebm_prior.apps import data as _data
from ebm_prior.apps._common import (
    add_checkpoint_every,
    nonnegative_float,
    output_dir,
    parser,
    positive_float,
    positive_int,
    require,
)
from ebm_prior.apps.images import panels
from ebm_prior.apps.ood import oodd_lvae, train_elbo
from ebm_prior.apps.training import fit_two_stage


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = parser(__doc__)
    p.add_argument("--checkpoint", default=None, help="hvae-oodd checkpoint folder")
    p.add_argument("--train-tiny", action="store_true", help="train a small LVAE first")
    p.add_argument("--data", default="fashion-mnist", choices=[*_data.DATASETS, "random"])
    p.add_argument("--n-train", type=positive_int, default=10_000)
    p.add_argument("--backbone-epochs", type=positive_int, default=1, help="for --train-tiny")
    p.add_argument("--epochs", type=positive_int, default=5, help="EBM prior epochs")
    p.add_argument("--batch-size", type=positive_int, default=100)
    p.add_argument("--lr", type=positive_float, default=1e-3, help="backbone lr (--train-tiny)")
    p.add_argument("--ebm-lr", type=positive_float, default=1e-4)
    p.add_argument("--energy-reg", type=nonnegative_float, default=0.01)
    p.add_argument("--nef", type=positive_int, default=64)
    p.add_argument("--langevin-steps", type=positive_int, default=30)
    p.add_argument("--step-size", type=positive_float, default=0.3)
    p.add_argument(
        "--sample-steps", type=positive_int, default=100, help="Langevin steps for samples"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=output_dir, default="runs/finetune_oodd")
    add_checkpoint_every(p)
    return p.parse_args(argv)


def load_data(args) -> torch.Tensor:
    if args.data == "random":
        gen = torch.Generator().manual_seed(args.seed)
        return torch.rand(args.n_train, 1, 28, 28, generator=gen).lt(0.3).float()
    x = _data.subset(_data.load_images(args.data, "train"), args.n_train, args.seed)
    return _data.binarize(x, args.seed)


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    from ebm_prior.adapters.oodd import OODDBackbone, data_dependent_init

    if (args.checkpoint is None) == (not args.train_tiny):
        raise SystemExit("pass exactly one of --checkpoint PATH or --train-tiny")
    require("matplotlib", "examples", "the sample grid")
    os.makedirs(args.out, exist_ok=True)
    torch.manual_seed(args.seed)
    data = load_data(args)
    checkpoint = args.checkpoint
    if args.train_tiny:
        model = data_dependent_init(oodd_lvae(16, tuple(data.shape[1:])), data[:64])
        train_args = argparse.Namespace(
            lr=args.lr, epochs=args.backbone_epochs, batch_size=args.batch_size, seed=args.seed
        )
        train_elbo(OODDBackbone(model), data, train_args)
        checkpoint = os.path.join(args.out, "backbone")
        model.save(checkpoint)  # hvae-oodd's own checkpoint format
    backbone = OODDBackbone.from_checkpoint(checkpoint)
    print(f"backbone: {type(backbone.model).__name__}, groups {backbone.latent_shapes}")

    prior = JointEBMPrior(
        backbone.latent_shapes,
        nef=args.nef,
        backbone=backbone.fingerprint(),
        sampler_config={"step_size": args.step_size, "steps": args.langevin_steps},
    )
    fit_two_stage(prior, backbone, data, args.epochs, batch_size=args.batch_size,
                  lr=args.ebm_lr, reg=args.energy_reg, step_size=args.step_size,
                  steps=args.langevin_steps, seed=args.seed,
                  checkpoint_dir=os.path.join(args.out, "checkpoints"),
                  checkpoint_every=args.checkpoint_every)  # fmt: skip
    prior.eval()
    prior.save_pretrained(os.path.join(args.out, "prior"))

    gen = torch.Generator().manual_seed(args.seed)
    eps = backbone.sample_eps(16, generator=gen)
    with torch.no_grad():
        gaussian = backbone.decode(backbone.eps_to_z(eps))
    sampler = EpsLangevin(
        prior, backbone, step_size=args.step_size, steps=args.sample_steps, generator=gen
    )
    z = sampler(eps).z
    with torch.no_grad():
        samples = backbone.decode(z)
    path = os.path.join(args.out, "samples.png")
    panels(path, [(gaussian, 4, "Gaussian prior"), (samples, 4, "EBM prior (Langevin)")],
           "hvae-oodd: same starting noise, base prior vs Langevin on the EBM prior")  # fmt: skip
    print(f"prior: {os.path.join(args.out, 'prior')}\nsamples: {path}")
    return {"samples": samples, "gaussian": gaussian, "prior": prior}


if __name__ == "__main__":
    main()
