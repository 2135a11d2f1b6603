r"""Learning objectives for the joint EBM prior, as helpers for the user's own loop."""

from __future__ import annotations

__all__ = [
    "EBMLoss",
    "GeneratorLoss",
    "JointLoss",
    "MLELoss",
    "PriorLoss",
    "backbone_prior_loss",
    "ebm_loss",
    "generator_loss",
    "joint_loss",
    "mle_loss",
    "sample_posterior",
    "two_stage_loss",
]

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from .backbone import Backbone, Posterior
from .sample import LangevinResult, PosteriorLangevin

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


class GeneratorLoss(NamedTuple):
    r"""Generator (decoder) loss of maximum-likelihood learning and its diagnostic (scalars).

    Attributes:
        loss: :math:`-\overline{\log p(x \mid \mathrm{sg}\,z^+)}`.
        log_likelihood: Mean :math:`\log p(x \mid z^+)`.
    """

    loss: Tensor
    log_likelihood: Tensor


class MLELoss(NamedTuple):
    r"""Maximum-likelihood objective (supplement 1.1) and its diagnostics (all scalars).

    Attributes:
        loss: The objective to minimise (see :func:`mle_loss`).
        log_likelihood: Mean :math:`\log p(x \mid z^+)`.
        f_pos: Mean :math:`f_a(z^+)` on posterior samples (0 without an energy).
        f_neg: Mean :math:`f_a(z^-)` on prior samples (0 without an energy).
        log_p_pos: Mean :math:`\log p_b(z^+)`.
        log_p_neg: Mean :math:`\log p_b(z^-)`.
    """

    loss: Tensor
    log_likelihood: Tensor
    f_pos: Tensor
    f_neg: Tensor
    log_p_pos: Tensor
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


def sample_posterior(
    prior: Energy | None,
    backbone: Backbone,
    x: Tensor,
    z: Sequence[Tensor] | None = None,
    *,
    steps: int = 40,
    step_size: float = 0.1,
    generator: torch.Generator | None = None,
    **kwargs: Any,
) -> LangevinResult:
    r"""Draws the positives of maximum-likelihood learning: short-run z-space Langevin on the
    posterior under the EBM prior,

    .. math:: \log \pi(z \mid x) = \log p(x \mid z) + f_a(z) + \log p_b(z) + c,

    started from :math:`z \sim \mathcal{N}(0, I)` (every group), or from ``z`` (persistent
    chains). No encoder is used: ``backbone.posterior`` is never called. The defaults are the
    authors' 2-layer settings (40 steps, :math:`s = 0.1`, the noise standard deviation). As with
    every sampler, no parameter ``.grad`` is created or changed.

    Arguments:
        prior: The energy :math:`f_a`, or ``None`` for the Gaussian-prior posterior.
        backbone: The backbone giving :math:`p(x \mid z)` and :math:`p_b`.
        x: Observations, with shape :math:`(B, *)`.
        z: Starting state, one tensor per group; ``None`` draws :math:`\mathcal{N}(0, I)` with
            ``generator``.
        steps: Langevin steps.
        step_size: The step size :math:`s`.
        generator: A :class:`torch.Generator` for the starting state and the noise.
        kwargs: Further options of :class:`~ebm_prior.PosteriorLangevin` (``mala``,
            ``clip_grad``, ``on_nonfinite``, ``trace``, ...).

    Returns:
        The :class:`~ebm_prior.LangevinResult`; its ``z`` are the positives :math:`z^+`.
    """

    if z is None:
        z = backbone.sample_eps(x.shape[0], generator=generator, device=x.device)
    sampler = PosteriorLangevin(
        prior, backbone, x, steps=steps, step_size=step_size, generator=generator, **kwargs
    )
    return sampler(z)


def generator_loss(backbone: Backbone, x: Tensor, z_pos: Sequence[Tensor]) -> GeneratorLoss:
    r"""Returns the generator loss of maximum-likelihood learning.

    .. math:: \mathcal{L}_\theta = -\mathbb{E}_{z^+}\big[
              \log p_\theta(x \mid \mathrm{sg}\,z^+)\big]

    With :math:`z^+ \sim p(z \mid x)` its gradient is :math:`-\nabla_\theta \log p(x)` for the
    decoder's parameters :math:`\theta` (Fisher's identity). The positives are detached.

    Arguments:
        backbone: The backbone whose decoder :math:`p_\theta(x \mid z)` is learned.
        x: Data batch, with shape :math:`(B, *)`.
        z_pos: Posterior samples (e.g. :func:`sample_posterior`), one tensor per group.
    """

    ll = backbone.log_likelihood(x, _detach(z_pos)).mean()
    return GeneratorLoss(-ll, ll.detach())


def mle_loss(
    prior: Energy | None,
    backbone: Backbone,
    x: Tensor,
    z_pos: Sequence[Tensor],
    z_neg: Sequence[Tensor],
    reg: float = 0.0,
) -> MLELoss:
    r"""Returns the maximum-likelihood objective of supplement 1.1 (no encoder).

    .. math:: \mathcal{L} = -\mathbb{E}_{z^+}[\log p_\theta(x \mid \mathrm{sg}\,z^+)]
              + \underbrace{\mathbb{E}_{z^-}[f_a(\mathrm{sg}\,z^-)]
              - \mathbb{E}_{z^+}[f_a(\mathrm{sg}\,z^+)]}_{\text{Eq. 5}}
              + \underbrace{\mathbb{E}_{z^-}[\log p_b(\mathrm{sg}\,z^-)]
              - \mathbb{E}_{z^+}[\log p_b(\mathrm{sg}\,z^+)]}_{\text{Eq. 6}}

    the sum of :func:`generator_loss`, :func:`ebm_loss` and :func:`backbone_prior_loss`, all on
    detached samples. With :math:`z^+ \sim p_{\theta,a,b}(z \mid x)` and
    :math:`z^- \sim p_{a,b}(z)` its gradient is :math:`-\nabla \log p(x)` for every parameter
    (decoder :math:`\theta`, energy :math:`a`, backbone prior :math:`b`), since
    :math:`\nabla \log p(x) = \mathbb{E}_{p(z|x)}[\nabla \log p(x|z) + \nabla f_a + \nabla
    \log p_b] - \nabla \log Z(a, b)` and
    :math:`\nabla \log Z = \mathbb{E}_{p_{a,b}}[\nabla f_a + \nabla \log p_b]`; so it is also
    right when the decoder and the prior share parameters. Which parameters learn, and at what
    rate, is the optimizer's business (the authors: Adam, :math:`2 \cdot 10^{-5}` for the
    energy, :math:`10^{-4}` for the generator and the backbone prior).

    Arguments:
        prior: The energy :math:`f_a`, or ``None`` (a Gaussian prior; no Eq. 5 term).
        backbone: The backbone.
        x: Data batch, with shape :math:`(B, *)`.
        z_pos: Posterior samples, e.g. ``sample_posterior(prior, backbone, x).z``.
        z_neg: Prior samples, e.g. from :class:`~ebm_prior.EpsLangevin` (or, without an
            energy, :math:`T_b(\epsilon)` with :math:`\epsilon \sim \mathcal{N}(0, I)`).
        reg: L2 penalty :math:`\lambda` on the energy values, as in :func:`ebm_loss`.

    Example:
        >>> from ebm_prior import EpsLangevin, HierarchicalVAE, JointEBMPrior
        >>> vae = HierarchicalVAE.from_config("digits")
        >>> prior = JointEBMPrior(vae.latent_shapes, nef=16)
        >>> optimizer = torch.optim.Adam([
        ...     {"params": prior.parameters(), "lr": 2e-5},
        ...     {"params": vae.decoder.parameters(), "lr": 1e-4},
        ...     {"params": vae.prior_nets.parameters(), "lr": 1e-4},
        ... ])
        >>> x = torch.rand(16, 1, 8, 8).round()
        >>> z_pos = sample_posterior(prior, vae, x, steps=5).z
        >>> z_neg = EpsLangevin(prior, vae, step_size=0.4, steps=5)(vae.sample_eps(16)).z
        >>> out = mle_loss(prior, vae, x, z_pos, z_neg)
        >>> optimizer.zero_grad(); out.loss.backward(); optimizer.step()
        >>> out.log_likelihood.shape
        torch.Size([])
    """

    z_pos, z_neg = _detach(z_pos), _detach(z_neg)
    gen = generator_loss(backbone, x, z_pos)
    b = backbone_prior_loss(backbone, z_pos, z_neg)
    loss = gen.loss + b.loss
    if prior is not None:
        a = ebm_loss(prior, z_pos, z_neg, reg=reg)
        loss, f_pos, f_neg = loss + a.loss, a.f_pos, a.f_neg
    else:
        f_pos = f_neg = torch.zeros((), device=x.device, dtype=gen.log_likelihood.dtype)
    return MLELoss(loss, gen.log_likelihood, f_pos, f_neg, b.log_p_pos, b.log_p_neg)
