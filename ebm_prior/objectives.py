r"""Learning objectives for the joint EBM prior, as helpers for the user's own loop."""

from __future__ import annotations

__all__ = [
    "EBMLoss",
    "JointLoss",
    "PriorLoss",
    "backbone_prior_loss",
    "ebm_loss",
    "joint_loss",
    "two_stage_loss",
]

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from .backbone import Backbone, Posterior

Energy = Callable[[list[Tensor]], Tensor]


class EBMLoss(NamedTuple):
    r"""Contrastive EBM loss and its diagnostics (all scalars).

    Attributes:
        loss: :math:`\overline{f(z^-)} - \overline{f(z^+)}`.
        f_pos: Mean energy on the positives :math:`z^+`.
        f_neg: Mean energy on the negatives :math:`z^-`.
    """

    loss: Tensor
    f_pos: Tensor
    f_neg: Tensor


class PriorLoss(NamedTuple):
    r"""Backbone-prior loss (supplement Eq. 6) and its diagnostics (all scalars)."""

    loss: Tensor
    log_p_pos: Tensor
    log_p_neg: Tensor


class JointLoss(NamedTuple):
    r"""Variational joint objective and its diagnostics (all scalars).

    Attributes:
        loss: The objective to minimise (see :func:`joint_loss`).
        elbo: Mean Gaussian-prior ELBO :math:`\log p(x|z) + \log p_b(z) - \log q(z|x)`.
        log_likelihood: Mean :math:`\log p(x \mid z)`.
        f_pos: Mean :math:`f_a(z^+)` on posterior samples.
        f_neg: Mean :math:`f_a(z^-)` on prior samples.
        log_p_neg: Mean :math:`\log p_b(z^-)`.
    """

    loss: Tensor
    elbo: Tensor
    log_likelihood: Tensor
    f_pos: Tensor
    f_neg: Tensor
    log_p_neg: Tensor


def _detach(z: Sequence[Tensor]) -> list[Tensor]:
    return [zi.detach() for zi in z]


def ebm_loss(
    prior: Energy, z_pos: Sequence[Tensor], z_neg: Sequence[Tensor], reg: float = 0.0
) -> EBMLoss:
    r"""Returns the contrastive loss whose gradient is the EBM's maximum-likelihood gradient.

    .. math:: \mathcal{L}_a = \mathbb{E}_{z^-}[f_a(z^-)] - \mathbb{E}_{z^+}[f_a(z^+)]
              + \lambda \big(\mathbb{E}_{z^-}[f_a(z^-)^2] + \mathbb{E}_{z^+}[f_a(z^+)^2]\big)

    so that :math:`-\nabla_a \mathcal{L}_a = \mathbb{E}_+[\nabla f_a] - \mathbb{E}_-[\nabla f_a]`
    when :math:`\lambda = 0`. Both inputs are detached: only the energy's parameters receive
    gradients.

    Arguments:
        prior: The energy :math:`f_a` (e.g. a :class:`JointEBMPrior`), list -> :math:`(B,)`.
        z_pos: Posterior samples, one tensor per group.
        z_neg: Prior samples (eps-space Langevin, then :math:`T_b`), one tensor per group.
        reg: :math:`\lambda`, an L2 penalty on the energy values that keeps short-run
            negatives able to follow the energy (Du & Mordatch, 2019); 0 disables it.
    """

    f_pos = prior(_detach(z_pos))
    f_neg = prior(_detach(z_neg))
    loss = f_neg.mean() - f_pos.mean()
    if reg:
        loss = loss + reg * ((f_pos**2).mean() + (f_neg**2).mean())
    return EBMLoss(loss, f_pos.mean().detach(), f_neg.mean().detach())


def backbone_prior_loss(
    backbone: Backbone, z_pos: Sequence[Tensor], z_neg: Sequence[Tensor]
) -> PriorLoss:
    r"""Returns the backbone-prior loss of supplement Eq. 6 (learning :math:`b` under the EBM).

    .. math:: \mathcal{L}_b = \mathbb{E}_{z^-}[\log p_b(\mathrm{sg}(z^-))]
              - \mathbb{E}_{z^+}[\log p_b(z^+)]

    Arguments:
        backbone: The backbone whose prior parameters :math:`b` are learned.
        z_pos: Posterior samples (gradients flow to them if they carry any).
        z_neg: Prior samples (detached).
    """

    lp_pos = backbone.log_prior(list(z_pos)).mean()
    lp_neg = backbone.log_prior(_detach(z_neg)).mean()
    return PriorLoss(lp_neg - lp_pos, lp_pos.detach(), lp_neg.detach())


def joint_loss(
    prior: Energy,
    backbone: Backbone,
    x: Tensor,
    z_neg: Sequence[Tensor],
    posterior: Posterior | None = None,
    reg: float = 0.0,
) -> JointLoss:
    r"""Returns the variational joint-learning objective.

    .. math:: \mathcal{L} = -\mathbb{E}_{q}\big[\log p(x|z) + f_a(z) + \log p_b(z)
              - \log q(z|x)\big] + \mathbb{E}_{z^-}\big[f_a(\mathrm{sg}\,z^-)
              + \log p_b(\mathrm{sg}\,z^-)\big]

    Its gradient is the ELBO gradient under the EBM prior with :math:`\nabla \log Z(a, b)`
    estimated from the negatives; it trains the encoder, decoder, backbone prior and energy
    at once.

    Arguments:
        prior: The energy :math:`f_a`.
        backbone: The backbone.
        x: Data batch, with shape :math:`(B, *)`.
        z_neg: Prior samples (detached inside).
        posterior: A reparameterised posterior sample of ``x`` to reuse (drawn if ``None``).
        reg: L2 penalty :math:`\lambda` on the energy values, as in :func:`ebm_loss`:
            :math:`\lambda \big(\mathbb{E}[f_a(\mathrm{sg}\,z^+)^2]
            + \mathbb{E}[f_a(\mathrm{sg}\,z^-)^2]\big)`. It is computed on detached
            :math:`z^+`, so it trains only the energy and never reshapes :math:`q`; the main
            :math:`f_a(z^+)` term keeps its gradient to the encoder.
    """

    post = backbone.posterior(x) if posterior is None else posterior
    ll = backbone.log_likelihood(x, post.z)
    lp = backbone.log_prior(post.z)
    f_pos = prior(post.z)
    z_neg = _detach(z_neg)
    f_neg = prior(z_neg)
    lp_neg = backbone.log_prior(z_neg)
    loss = -(ll + f_pos + lp - post.log_q).mean() + (f_neg + lp_neg).mean()
    if reg:
        f_pos_sg = prior(_detach(post.z))
        loss = loss + reg * ((f_pos_sg**2).mean() + (f_neg**2).mean())
    return JointLoss(
        loss,
        (ll + lp - post.log_q).mean().detach(),
        ll.mean().detach(),
        f_pos.mean().detach(),
        f_neg.mean().detach(),
        lp_neg.mean().detach(),
    )


def two_stage_loss(
    prior: Energy, backbone: Backbone, x: Tensor, z_neg: Sequence[Tensor], reg: float = 0.0
) -> EBMLoss:
    r"""Returns the EBM loss for two-stage fine-tuning on a frozen backbone.

    The positives are drawn from the frozen backbone's :math:`q(z \mid x)` without gradients;
    the loss is :func:`ebm_loss`, so only :math:`a` is learned.
    """

    with torch.no_grad():
        z_pos = backbone.posterior(x).z
    return ebm_loss(prior, z_pos, z_neg, reg)
