r"""Normalising constant of the EBM prior and importance-weighted likelihood bounds."""

from __future__ import annotations

__all__ = ["LogPartition", "log_likelihood_bound", "log_partition"]

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .backbone import Backbone

Energy = Callable[[list[Tensor]], Tensor]


class LogPartition(NamedTuple):
    r"""An importance-sampling estimate of :math:`\log Z`.

    Attributes:
        value: :math:`\log \hat Z`.
        std_error: Delta-method standard error of :math:`\log \hat Z`,
            :math:`\mathrm{sd}(w) / (\sqrt{n}\, \bar w)`.
        ess: Effective sample size :math:`(\sum w)^2 / \sum w^2`.
        num_samples: :math:`n`.
    """

    value: float
    std_error: float
    ess: float
    num_samples: int


@torch.no_grad()
def log_partition(
    prior: Energy,
    backbone: Backbone,
    num_samples: int = 10_000,
    batch_size: int = 1_000,
    t: float = 1.0,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> LogPartition:
    r"""Estimates :math:`\log Z(a, b)` by importance sampling from the base prior.

    .. math:: Z(a, b) = \mathbb{E}_{\epsilon \sim \mathcal{N}(0, I)}
              \big[\exp f_a(T_b(\epsilon))\big], \quad
              \log \hat Z = \log \frac{1}{n} \sum_k \exp f_a(T_b(\epsilon_k))

    The estimate is unbiased for :math:`Z` (and, by Jensen, biased low for :math:`\log Z`);
    a small ``ess`` relative to ``num_samples`` means the energy is too strong for this
    estimator.

    Arguments:
        prior: The energy :math:`f_a`.
        backbone: The backbone providing :math:`T_b`.
        num_samples: Number of base-prior samples :math:`n`.
        batch_size: Samples per forward pass.
        t: Temperature of :math:`T_b`.
        generator: A :class:`torch.Generator` for the base samples.
    """

    if num_samples < 2:
        raise ValueError(f"num_samples must be >= 2, got {num_samples}")
    fs = []
    for start in tqdm(range(0, num_samples, batch_size), disable=not progress, desc="log Z"):
        n = min(batch_size, num_samples - start)
        z = backbone.eps_to_z(backbone.sample_eps(n, generator=generator), t)
        fs.append(prior(z).double())
    f = torch.cat(fs)
    if not torch.isfinite(f).all():
        raise FloatingPointError("non-finite energy on base-prior samples while estimating log Z")
    m = f.max()
    w = (f - m).exp()
    mean_w = w.mean()
    log_z = (m + mean_w.log()).item()
    se = (w.std() / (math.sqrt(num_samples) * mean_w)).item()
    ess = (w.sum() ** 2 / (w**2).sum()).item()
    return LogPartition(log_z, se, ess, num_samples)


@torch.no_grad()
def log_likelihood_bound(
    backbone: Backbone,
    x: Tensor,
    prior: Energy | None = None,
    log_z: float | LogPartition | None = None,
    num_samples: int = 64,
) -> Tensor:
    r"""Returns the importance-weighted bound on :math:`\log p(x)` in nats, shape :math:`(B,)`.

    .. math:: \log p(x) \ge \mathbb{E}\Big[\log \frac{1}{K} \sum_k
              \frac{p(x|z_k)\, e^{f_a(z_k)} p_b(z_k)}{Z(a,b)\, q(z_k|x)}\Big],
              \quad z_k \sim q(z \mid x)

    With ``prior=None`` this is the IWAE bound of the Gaussian-prior backbone, so the two
    numbers are directly comparable. ``K = 1`` gives the ELBO.

    Arguments:
        backbone: The backbone.
        x: Data batch, with shape :math:`(B, *)`.
        prior: The energy :math:`f_a`, or ``None`` for the Gaussian prior.
        log_z: :math:`\log Z(a, b)` (required with a prior), see :func:`log_partition`.
        num_samples: Number of importance samples :math:`K`.
    """

    if prior is not None and log_z is None:
        raise ValueError("a prior's likelihood needs log_z (estimate it with log_partition)")
    log_z = float(log_z.value if isinstance(log_z, LogPartition) else (log_z or 0.0))
    terms = []
    for _ in range(num_samples):
        z, log_q = backbone.posterior(x)
        lw = backbone.log_likelihood(x, z) + backbone.log_prior(z) - log_q
        if prior is not None:
            lw = lw + prior(z) - log_z
        terms.append(lw.double())
    lw = torch.stack(terms)
    return (torch.logsumexp(lw, dim=0) - math.log(num_samples)).to(x.dtype)
