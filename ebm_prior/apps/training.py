r"""The training runs the applications share, each one :class:`ebm_prior.Trainer` call.

* :func:`fit_elbo`: any backbone by its own ELBO under the Gaussian prior
  (``regime="joint"``, ``prior=None``); :func:`fit_elbo_to_plateau` the same until the
  validation ELBO stops improving;
* :func:`fit_joint`: the reference VAE and the joint EBM prior together (variational joint
  learning, ``regime="joint"``);
* :func:`fit_two_stage`: the joint EBM prior on a frozen backbone (``regime="two_stage"``).

All three run over whole epochs (``len(data) // batch_size`` full batches each; the batch size
is capped at ``len(data)``), keep the trainer's guarantees (divergence raised with the step,
exact resume from ``checkpoint_dir``, atomic checkpoints, ``history.csv``) and return the
:class:`~ebm_prior.Trainer`, whose ``history`` holds the per-step statistics.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import Tensor, nn

from ebm_prior import Backbone, HierarchicalVAE, JointEBMPrior, Trainer
from ebm_prior.hub import atomic_write

__all__ = [
    "elbo_trainer",
    "fit_elbo",
    "fit_elbo_to_plateau",
    "fit_joint",
    "fit_two_stage",
    "parameter_groups",
    "validation_elbo",
]


def parameter_groups(backbone: Backbone) -> dict[str, list[nn.Parameter]]:
    r"""The trainer's parameter groups of a whole backbone.

    The reference VAE splits into its generator (decoder), encoder and prior networks. The
    backbone contract does not say which parameters of an adapted model are which, so any other
    backbone gives all its parameters as one group (``generator_params``), trained at one rate.
    """

    if isinstance(backbone, HierarchicalVAE):
        return {
            "generator_params": list(backbone.decoder.parameters()),
            "encoder_params": [*backbone.encoder_x.parameters(), *backbone.encoder_z.parameters()],
            "backbone_prior_params": list(backbone.prior_nets.parameters()),
        }
    return {"generator_params": list(backbone.parameters())}


def _rates(groups: dict[str, Iterable[nn.Parameter]], lr: float) -> dict[str, float]:
    return {f"{k[: -len('_params')]}_lr": lr for k in groups}


def _steps(trainer: Trainer, epochs: int) -> int:
    return epochs * trainer.steps_per_epoch


def fit_elbo(
    backbone: Backbone,
    data: Tensor,
    epochs: int,
    *,
    batch_size: int = 100,
    lr: float = 1e-3,
    seed: int = 0,
    checkpoint_dir: str | os.PathLike | None = None,
    progress: bool | None = None,
) -> Trainer:
    r"""Trains every parameter of ``backbone`` by Adam (``lr``) on the ELBO
    :math:`\log p(x \mid z) + \log p_b(z) - \log q(z \mid x)`, :math:`z \sim q(z \mid x)`
    reparameterised, for ``epochs`` epochs. The backbone is left in eval mode."""

    trainer = elbo_trainer(backbone, data, batch_size=batch_size, lr=lr, seed=seed,
                           checkpoint_dir=checkpoint_dir, progress=progress)  # fmt: skip
    trainer.fit(_steps(trainer, epochs))
    backbone.requires_grad_(False)
    return trainer


def elbo_trainer(
    backbone: Backbone,
    data: Tensor,
    *,
    batch_size: int = 100,
    lr: float = 1e-3,
    seed: int = 0,
    checkpoint_dir: str | os.PathLike | None = None,
    progress: bool | None = None,
) -> Trainer:
    r"""The :class:`~ebm_prior.Trainer` of :func:`fit_elbo`, not yet run."""

    groups = parameter_groups(backbone)
    return Trainer(
        None, backbone, data, regime="joint", batch_size=min(batch_size, len(data)), seed=seed,
        checkpoint_dir=checkpoint_dir, progress=progress, **groups, **_rates(groups, lr),
    )  # fmt: skip


@torch.no_grad()
def validation_elbo(backbone: Backbone, x: Tensor, seed: int = 0) -> float:
    r"""The mean single-sample ELBO of ``x`` in nats, with the posterior draws of ``seed``
    (the same draws at every call, so that successive values differ by the model only)."""

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        total = 0.0
        for c in x.split(500):
            post = backbone.posterior(c)
            elbo = backbone.log_likelihood(c, post.z) + backbone.log_prior(post.z) - post.log_q
            total += float(elbo.sum())
    return total / len(x)


def fit_elbo_to_plateau(
    backbone: Backbone,
    data: Tensor,
    validation: Tensor,
    *,
    max_epochs: int,
    patience: int = 3,
    min_delta: float = 0.1,
    batch_size: int = 100,
    lr: float = 1e-3,
    seed: int = 0,
    checkpoint_dir: str | os.PathLike | None = None,
    progress: bool | None = None,
) -> tuple[Trainer, list[float | None]]:
    r""":func:`fit_elbo` one epoch at a time until the validation ELBO
    (:func:`validation_elbo`) has not improved on its best by ``min_delta`` nats for
    ``patience`` epochs, or ``max_epochs`` have run. Returns the trainer (at the last epoch) and
    the validation ELBO after every epoch. With a ``checkpoint_dir``, the curve is saved next to
    the trainer's checkpoint (``plateau.json``, atomically), so a stopped run resumes it (an
    epoch checkpointed but not yet in the curve is recorded as ``None``)."""

    trainer = elbo_trainer(backbone, data, batch_size=batch_size, lr=lr, seed=seed,
                           checkpoint_dir=checkpoint_dir, progress=progress)  # fmt: skip
    path = None if checkpoint_dir is None else Path(checkpoint_dir) / "plateau.json"
    curve: list[float | None] = []
    if path is not None and path.exists():
        curve = json.loads(path.read_text())["validation_elbo"]
    # one figure at the end, not one per epoch (it costs more than an epoch on a small model)
    trainer.fit(len(curve) * trainer.steps_per_epoch, plot=False)  # loads the checkpoint
    # a run stopped between the checkpoint and plateau.json: those epochs' values are unknown
    curve += [None] * (-(-trainer.step // trainer.steps_per_epoch) - len(curve))

    def stalled() -> bool:
        known = [v for v in curve if v is not None]
        if len(known) <= patience:
            return False
        return max(known[-patience:]) < max(known[:-patience]) + min_delta

    while len(curve) < max_epochs and not stalled():
        trainer.fit((len(curve) + 1) * trainer.steps_per_epoch, plot=False)
        curve.append(validation_elbo(backbone, validation, seed))
        if path is not None:
            text = json.dumps({"validation_elbo": curve, "patience": patience,
                               "min_delta": min_delta})  # fmt: skip
            atomic_write(path, lambda tmp, text=text: Path(tmp).write_text(text))
    trainer.draw_history()
    backbone.requires_grad_(False)
    return trainer, curve


def fit_joint(
    vae: HierarchicalVAE,
    prior: JointEBMPrior,
    data: Tensor,
    epochs: int,
    *,
    batch_size: int = 100,
    lr: float = 1e-3,
    ebm_lr: float = 1e-4,
    reg: float = 0.01,
    step_size: float = 0.3,
    steps: int = 50,
    seed: int = 0,
    checkpoint_dir: str | os.PathLike | None = None,
    progress: bool | None = None,
) -> Trainer:
    r"""Variational joint learning of the reference VAE (rate ``lr``) and the energy (rate
    ``ebm_lr``): the negative ELBO under the EBM prior, :func:`ebm_prior.joint_loss`, with
    negatives by ``steps`` of eps-space Langevin (step size ``step_size``) and the energy
    penalty ``reg``. Adam with betas (0.9, 0.999) for every group."""

    groups = parameter_groups(vae)
    trainer = Trainer(
        prior, vae, data, regime="joint", batch_size=min(batch_size, len(data)), lr=ebm_lr,
        reg=reg, langevin_steps=steps, step_size=step_size, seed=seed,
        checkpoint_dir=checkpoint_dir, progress=progress, **groups, **_rates(groups, lr),
    )  # fmt: skip
    trainer.fit(_steps(trainer, epochs))
    vae.requires_grad_(False)
    return trainer


def fit_two_stage(
    prior: JointEBMPrior,
    backbone: Backbone,
    data: Tensor,
    epochs: int,
    *,
    batch_size: int = 100,
    lr: float = 1e-4,
    reg: float = 0.01,
    step_size: float = 0.3,
    steps: int = 50,
    seed: int = 0,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int = 1000,
    progress: bool | None = None,
) -> Trainer:
    r"""Fits the energy on the frozen ``backbone`` (supplement 1.2): positives from its
    posterior, negatives by ``steps`` of eps-space Langevin (step size ``step_size``) from
    :math:`\mathcal{N}(0, I)`, loss :func:`ebm_prior.two_stage_loss` with the energy penalty
    ``reg``; Adam (``lr``, betas (0.5, 0.999)). Build the prior with
    ``sampler_config={"step_size": step_size, "steps": steps}`` to record that chain. With
    ``checkpoint_dir`` it checkpoints every ``checkpoint_every`` updates and resumes from there."""

    trainer = Trainer(
        prior, backbone, data, regime="two_stage", batch_size=min(batch_size, len(data)), lr=lr,
        betas=(0.5, 0.999), reg=reg, langevin_steps=steps, step_size=step_size, seed=seed,
        checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every, progress=progress,
    )  # fmt: skip
    trainer.fit(_steps(trainer, epochs))
    return trainer
