r"""Train the reference 2-layer VAE on scikit-learn's digits with a Gaussian and a joint EBM prior.

Runs on a CPU in a few minutes with no download (the 8x8 digits ship with scikit-learn). Three
models on the same architecture: (A) the VAE with its Gaussian prior, (B) the joint EBM prior
fitted two-stage on the frozen model A, (C) backbone and EBM prior learned jointly (variational
joint learning). Prints the test ELBO and importance-weighted log-likelihood in nats (a bound for
the Gaussian prior; for EBM priors an estimate, normalised by an estimate of log Z printed with its
standard error, method and ESS), writes a sample grid per model and a Langevin-transition figure
(base prior -> EBM prior). Every model trains through :class:`ebm_prior.Trainer`, checkpointed
in ``OUT/checkpoints/{A,B,C}``: a stopped run started again with the same arguments resumes where
it stopped (other arguments are refused, naming what differs; use another ``--out``).

    ebm-prior train-digits                 # full run, outputs in runs/digits
    ebm-prior train-digits --epochs 2 --eval-samples 4 --out /tmp/x   # smoke run

(``python examples/train_digits.py`` runs the same.) Needs ``pip install "ebm-prior[examples]"``.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from ebm_prior import EpsLangevin, HierarchicalVAE, JointEBMPrior, log_likelihood, log_partition
from ebm_prior.apps._common import (
    nonnegative_float,
    output_dir,
    parser,
    positive_float,
    positive_int,
    require,
)
from ebm_prior.apps.training import fit_elbo, fit_joint, fit_two_stage


def load_digits_binary(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Returns binarised 8x8 digits (pixel >= 8 of 16), split 1500/297, shape (N, 1, 8, 8)."""

    datasets = require("sklearn.datasets", "examples", "the digits data set")
    x = torch.tensor(datasets.load_digits().images >= 8, dtype=torch.float32).unsqueeze(1)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x = x[perm]
    return x[:1500], x[1500:]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = parser(__doc__)
    p.add_argument("--epochs", type=positive_int, default=300, help="training epochs per model")
    p.add_argument(
        "--two-stage-epochs", type=positive_int, default=100, help="EBM epochs, frozen VAE"
    )
    p.add_argument("--batch-size", type=positive_int, default=100)
    p.add_argument("--lr", type=positive_float, default=1e-3, help="backbone learning rate")
    p.add_argument(
        "--ebm-lr", type=positive_float, default=1e-4, help="energy-network learning rate"
    )
    p.add_argument(
        "--energy-reg", type=nonnegative_float, default=0.01, help="L2 penalty on energies"
    )
    p.add_argument("--nef", type=positive_int, default=64, help="energy-network width")
    p.add_argument(
        "--langevin-steps", type=positive_int, default=50, help="prior Langevin steps (train)"
    )
    p.add_argument("--step-size", type=positive_float, default=0.3, help="Langevin step size s")
    p.add_argument("--eval-langevin-steps", type=positive_int, default=200)
    p.add_argument("--eval-samples", type=positive_int, default=500, help="importance samples K")
    p.add_argument("--log-z-samples", type=positive_int, default=100_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--out", type=output_dir, default="runs/digits", help="output directory for the figures"
    )
    p.add_argument("--no-figures", action="store_true")
    p.add_argument("--push-to-hub", metavar="REPO", help="push prior B (two-stage) to the Hub")
    return p.parse_args(argv)


def train_gaussian(
    vae: HierarchicalVAE, data: torch.Tensor, args: argparse.Namespace, checkpoint_dir=None
) -> None:
    r"""Maximises the ELBO under the backbone's Gaussian prior (:func:`fit_elbo`)."""

    fit_elbo(vae, data, args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
             checkpoint_dir=checkpoint_dir)  # fmt: skip


def train_joint(
    vae: HierarchicalVAE,
    prior: JointEBMPrior,
    data: torch.Tensor,
    args: argparse.Namespace,
    checkpoint_dir=None,
) -> None:
    r"""Variational joint learning of backbone and EBM prior (:func:`fit_joint`)."""

    fit_joint(
        vae, prior, data, args.epochs, batch_size=args.batch_size, lr=args.lr,
        ebm_lr=args.ebm_lr, reg=args.energy_reg, step_size=args.step_size,
        steps=args.langevin_steps, seed=args.seed, checkpoint_dir=checkpoint_dir,
    )  # fmt: skip


def save_backbone(vae: HierarchicalVAE, path: str) -> str:
    r"""Saves the VAE's weights as safetensors (atomically); returns the file's SHA-256."""

    from safetensors.torch import save_file

    from ebm_prior.hub import atomic_write, file_sha256

    state = {k: v.contiguous() for k, v in vae.state_dict().items()}
    atomic_write(Path(path), lambda tmp: save_file(state, tmp))
    return file_sha256(path)


def load_backbone(path: str) -> HierarchicalVAE:
    r"""Loads a digits VAE saved by :func:`save_backbone`, with its checkpoint hash set."""

    from safetensors.torch import load_file

    from ebm_prior.hub import file_sha256

    vae = HierarchicalVAE.from_config("digits")
    vae.load_state_dict(load_file(path), strict=True)
    vae.checkpoint_hash = file_sha256(path)
    return vae.eval()


@torch.no_grad()
def evaluate(vae, prior, test, args, log_z=None) -> dict:
    r"""Test ELBO and importance-weighted log-likelihood (nats per image, test-set mean)."""

    torch.manual_seed(args.seed + 1)
    elbo = log_likelihood(vae, test, prior, log_z, num_samples=1).value.mean().item()
    iw = log_likelihood(vae, test, prior, log_z, num_samples=args.eval_samples).value
    return {"elbo": elbo, "iw": iw.mean().item()}


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    if not args.no_figures:  # before training, not after it
        require("matplotlib", "examples", "the figures (or pass --no-figures)")
    os.makedirs(args.out, exist_ok=True)
    torch.manual_seed(args.seed)
    train, test = load_digits_binary(args.seed)

    base = HierarchicalVAE.from_config("digits")
    gauss = copy.deepcopy(base)
    checkpoints = os.path.join(args.out, "checkpoints")
    train_gaussian(gauss, train, args, os.path.join(checkpoints, "A"))
    gauss.eval()
    gauss.checkpoint_hash = save_backbone(gauss, os.path.join(args.out, "vae_A.safetensors"))

    def new_prior(vae):
        return JointEBMPrior(
            vae.latent_shapes,
            nef=args.nef,
            sampler_config={"step_size": args.step_size, "steps": args.langevin_steps},
            backbone=vae.fingerprint(),
        )

    torch.manual_seed(args.seed)
    two_stage = new_prior(gauss)
    fit_two_stage(
        two_stage, gauss, train, args.two_stage_epochs, batch_size=args.batch_size,
        lr=args.ebm_lr, reg=args.energy_reg, step_size=args.step_size,
        steps=args.langevin_steps, seed=args.seed, checkpoint_dir=os.path.join(checkpoints, "B"),
    )  # fmt: skip

    torch.manual_seed(args.seed)
    joint_vae = copy.deepcopy(base)
    joint = new_prior(joint_vae)
    train_joint(joint_vae, joint, train, args, os.path.join(checkpoints, "C"))
    joint_vae.eval(), joint.eval(), two_stage.eval()

    def log_z(prior, vae):
        g = torch.Generator().manual_seed(args.seed)
        return log_partition(
            prior, vae, args.log_z_samples, batch_size=10_000, generator=g, method="auto"
        )

    z_two, z_joint = log_z(two_stage, gauss), log_z(joint, joint_vae)
    rows = {
        "A  Gaussian prior (VAE)": (evaluate(gauss, None, test, args), None),
        "B  A + two-stage EBM prior": (evaluate(gauss, two_stage, test, args, z_two), z_two),
        "C  joint EBM prior": (evaluate(joint_vae, joint, test, args, z_joint), z_joint),
        "C' C's backbone, EBM removed": (evaluate(joint_vae, None, test, args), None),
    }
    k = args.eval_samples
    print(f"\nbinarised digits, {len(test)} test images; nats per image (higher is better)")
    print("(Gaussian rows: lower bounds; EBM rows: estimates sharing the error of their log Z)")
    print(
        f"| {'model':<30} | {'test ELBO':>9} | {f'log p(x) (K={k})':>16} "
        f"| {'log Z +- s.e.':>15} | {'method, ESS':>12} |"
    )
    print(f"|{'-' * 32}|{'-' * 11}|{'-' * 18}|{'-' * 17}|{'-' * 14}|")
    for name, (r, lz) in rows.items():
        z = f"{lz.value:.3f} +- {lz.std_error:.3f}" if lz is not None else "-"
        how = f"{lz.method}, {lz.ess:.0f}" if lz is not None else "-"
        print(f"| {name:<30} | {r['elbo']:>9.2f} | {r['iw']:>16.2f} | {z:>15} | {how:>12} |")

    two_stage.save_pretrained(os.path.join(args.out, "prior_B"))
    if args.push_to_hub:
        from ebm_prior import push_prior

        metrics = {
            "test_log_likelihood_nats": round(rows["B  A + two-stage EBM prior"][0]["iw"], 3),
            "log_z_std_error_nats": round(z_two.std_error, 3),
        }
        url = push_prior(
            two_stage,
            args.push_to_hub,
            backbone=gauss,
            metrics=metrics,
            datasets=["sklearn-digits"],
        )
        print(f"pushed prior B to {url}")
    if not args.no_figures:
        figures(gauss, two_stage, joint_vae, joint, args, test)
        print(f"figures written to {args.out}/")
    return {"rows": {name: r for name, (r, _) in rows.items()}, "log_z": (z_two, z_joint)}


@torch.no_grad()
def figures(gauss, two_stage, joint_vae, joint, args, test) -> None:
    r"""Sample grids for the three models and a Langevin-transition figure (model B)."""

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    g = torch.Generator().manual_seed(args.seed)
    n = 100

    def langevin(prior, vae, eps, steps):
        sampler = EpsLangevin(prior, vae, step_size=args.step_size, steps=steps, generator=g)
        return sampler(eps).x

    # transition of model B: snapshots every few steps from the base prior
    eps = gauss.sample_eps(n, generator=g)
    snaps, steps = [eps], [0]
    every = max(1, args.eval_langevin_steps // 8)
    for k in range(every, args.eval_langevin_steps + 1, every):
        eps = langevin(two_stage, gauss, eps, every)
        snaps.append(eps)
        steps.append(k)
    eps_joint = langevin(joint, joint_vae, joint_vae.sample_eps(n, generator=g), steps[-1])
    grids = {
        "data_test_digits.png": test[:n],
        "samples_A_gaussian_prior.png": gauss.decode(gauss.eps_to_z(snaps[0])),
        "samples_B_two_stage_ebm_prior.png": gauss.decode(gauss.eps_to_z(eps)),
        "samples_C_joint_ebm_prior.png": joint_vae.decode(joint_vae.eps_to_z(eps_joint)),
    }
    for name, x in grids.items():
        title = name.split("_", 1)[1][:-4].replace("_", " ")
        _grid(plt, x, os.path.join(args.out, name), title=title)

    rows = 8
    fig, axes = plt.subplots(rows, len(snaps), figsize=(len(snaps) * 0.9, rows * 0.9))
    for j, (e, k) in enumerate(zip(snaps, steps)):
        imgs = gauss.decode(gauss.eps_to_z(e))
        axes[0, j].set_title(str(k), fontsize=7)
        for i in range(rows):
            axes[i, j].imshow(imgs[i, 0].numpy(), cmap="gray", vmin=0, vmax=1)
            axes[i, j].axis("off")
    fig.suptitle("Langevin transition (B): base prior (step 0) -> EBM prior", fontsize=8)
    fig.savefig(os.path.join(args.out, "langevin_transition.png"), dpi=120)
    plt.close(fig)


def _grid(plt, x: torch.Tensor, path: str, title: str) -> None:
    n, h = int(math.sqrt(len(x))), x.shape[-1]
    img = torch.full((n * (h + 1) + 1, n * (h + 1) + 1), 0.5)  # grey 1-pixel borders
    for k in range(n * n):
        r, c = divmod(k, n)
        img[1 + r * (h + 1) : (r + 1) * (h + 1), 1 + c * (h + 1) : (c + 1) * (h + 1)] = x[k, 0]
    fig = plt.figure(figsize=(4, 4.3))
    plt.imshow(img.numpy(), cmap="gray", vmin=0, vmax=1)
    plt.axis("off")
    plt.title(title, fontsize=8)
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
