r"""Small backbones and energies with closed-form laws, for the sampler tests.

They complement the reference backbone (they do not replace the real adapters' tests): each
has a law we can compute exactly, so the samplers can be tested against it.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor

from ebm_prior import Backbone, Posterior

LOG_2PI = math.log(2 * math.pi)


class LinearGaussian(Backbone):
    r"""Two groups of size ``d``: :math:`z_1 = t\epsilon_1`,
    :math:`z_2 = A z_1 + t\sigma\epsilon_2`, :math:`x = W z_2 + \sigma_x \nu`;
    the posterior :math:`q(z|x)` is a fixed standard Gaussian."""

    adapter_name = "toy-linear"

    def __init__(self, d: int = 2, seed: int = 0, dtype: torch.dtype = torch.float64):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.d = d
        self.register_buffer("A", 0.8 * torch.randn(d, d, generator=g, dtype=dtype))
        self.register_buffer("sigma", 0.5 + torch.rand(d, generator=g, dtype=dtype))
        self.register_buffer("W", torch.randn(3, d, generator=g, dtype=dtype))
        self.sigma_x = 0.7

    @property
    def latent_shapes(self):
        return ((self.d,), (self.d,))

    def matrix(self, t: float = 1.0) -> np.ndarray:
        r"""The linear map :math:`M` with :math:`z = M \epsilon` (z and eps concatenated)."""

        d, a, s = self.d, self.A.numpy(), self.sigma.numpy()
        m = np.zeros((2 * d, 2 * d))
        m[:d, :d] = t * np.eye(d)
        m[d:, :d] = t * a
        m[d:, d:] = t * np.diag(s)
        return m

    def _eps_to_z(self, eps, t):
        z1 = t * eps[0]
        return [z1, z1 @ self.A.T + t * self.sigma * eps[1]]

    def _z_to_eps(self, z, t):
        return [z[0] / t, (z[1] - z[0] @ self.A.T) / (t * self.sigma)]

    def _log_prior(self, z):
        lp1 = (-0.5 * z[0] ** 2 - 0.5 * LOG_2PI).sum(1)
        r = (z[1] - z[0] @ self.A.T) / self.sigma
        return lp1 + (-0.5 * r**2 - self.sigma.log() - 0.5 * LOG_2PI).sum(1)

    def _posterior(self, x):
        b = x.shape[0]
        z = [torch.randn(b, self.d, dtype=x.dtype), torch.randn(b, self.d, dtype=x.dtype)]
        log_q = sum((-0.5 * zi**2 - 0.5 * LOG_2PI).sum(1) for zi in z)
        return Posterior(z, log_q)

    def _log_likelihood(self, x, z):
        r = (x - z[1] @ self.W.T) / self.sigma_x
        return (-0.5 * r**2 - math.log(self.sigma_x) - 0.5 * LOG_2PI).sum(1)

    def _decode(self, z):
        return z[1] @ self.W.T


class Heteroscedastic(Backbone):
    r"""Two scalar groups: :math:`z_1 = t\epsilon_1`,
    :math:`z_2 = \tfrac12 z_1 + t \sigma(z_1) \epsilon_2` with :math:`\sigma(z_1) = e^{0.6 z_1}`:
    the lower sigma depends on the upper group."""

    adapter_name = "toy-hetero"

    def __init__(self, dtype: torch.dtype = torch.float64):
        super().__init__()
        self.register_buffer("k", torch.tensor(0.6, dtype=dtype))

    @property
    def latent_shapes(self):
        return ((1,), (1,))

    def sigma(self, z1: Tensor) -> Tensor:
        return torch.exp(self.k * z1)

    def _eps_to_z(self, eps, t):
        z1 = t * eps[0]
        return [z1, 0.5 * z1 + t * self.sigma(z1) * eps[1]]

    def _z_to_eps(self, z, t):
        return [z[0] / t, (z[1] - 0.5 * z[0]) / (t * self.sigma(z[0]))]

    def _log_prior(self, z):
        s = self.sigma(z[0])
        r = (z[1] - 0.5 * z[0]) / s
        return (-0.5 * z[0] ** 2 - 0.5 * r**2 - s.log() - LOG_2PI).sum(1)

    def _posterior(self, x):
        z = [torch.randn(x.shape[0], 1, dtype=x.dtype) for _ in range(2)]
        return Posterior(z, sum((-0.5 * zi**2 - 0.5 * LOG_2PI).sum(1) for zi in z))

    def _log_likelihood(self, x, z):
        return (-0.5 * (x - z[1]) ** 2 - 0.5 * LOG_2PI).sum(1)

    def _decode(self, z):
        return z[1]


class QuadraticEnergy(nn.Module):
    r""":math:`f(z) = -\tfrac12 (z - m)^\top C (z - m)` over the concatenated groups."""

    def __init__(self, c: np.ndarray, m: np.ndarray):
        super().__init__()
        self.register_buffer("c", torch.as_tensor(c))
        self.register_buffer("m", torch.as_tensor(m))

    def forward(self, z):
        r = torch.cat([zi.flatten(1) for zi in z], 1) - self.m
        return -0.5 * ((r @ self.c) * r).sum(1)


class NonQuadraticEnergy(nn.Module):
    r""":math:`f(z) = 2 \tanh(z_2) + \cos(z_1)`: smooth, bounded, not quadratic."""

    def forward(self, z):
        return 2.0 * torch.tanh(z[1][:, 0]) + torch.cos(z[0][:, 0])


def hetero_exact_marginals(target: str = "exact", n: int = 1601, lim: float = 8.0):
    r"""Marginal CDFs of :math:`\epsilon_1, \epsilon_2` under the eps-space law of
    :class:`Heteroscedastic` with :class:`NonQuadraticEnergy`, by quadrature on a grid.

    ``target="exact"``: :math:`f(T\epsilon) - |\epsilon|^2/2`; ``"anchor"`` adds
    :math:`-\log\sigma(z_1)` (the anchors' target).
    """

    e = np.linspace(-lim, lim, n)
    e1, e2 = np.meshgrid(e, e, indexing="ij")
    z1 = e1
    z2 = 0.5 * z1 + np.exp(0.6 * z1) * e2
    logp = 2.0 * np.tanh(z2) + np.cos(z1) - 0.5 * (e1**2 + e2**2)
    if target == "anchor":
        logp = logp - 0.6 * z1
    p = np.exp(logp - logp.max())
    cdfs = []
    for axis in (1, 0):  # marginal of e1 (sum over e2), then of e2
        m = p.sum(axis=axis)
        c = np.cumsum(m)
        cdfs.append((e, c / c[-1]))
    return cdfs


def _hetero_log_density(e1, e2, target: str, t: float):
    r"""Unnormalised eps-space log-density of :class:`Heteroscedastic` with
    :class:`NonQuadraticEnergy` at temperature ``t`` (numpy, broadcasting)."""

    if target not in ("exact", "anchor"):
        raise ValueError(f"target must be 'exact' or 'anchor', got {target!r}")
    z1 = t * e1
    z2 = 0.5 * z1 + t * np.exp(0.6 * z1) * e2
    logp = 2.0 * np.tanh(z2) + np.cos(z1) - 0.5 * (e1**2 + e2**2)
    if target == "anchor":  # the tempered Normal's log-Jacobian, -log(t sigma(z1)), less log t
        logp = logp - 0.6 * z1
    return logp


def hetero_marginals(target: str = "exact", t: float = 1.0, n: int = 1601, lim: float = 8.0):
    r"""Marginal CDFs of :math:`\epsilon_1, \epsilon_2` under the eps-space law of
    :class:`Heteroscedastic` with :class:`NonQuadraticEnergy` at temperature ``t``, by
    quadrature on a grid.

    ``target="exact"``: :math:`f(T_t\epsilon) - |\epsilon|^2/2`; ``"anchor"``:
    :math:`f(z) + \log p_b^t(z)` with the tempered Normal, i.e. the exact target plus the
    log-Jacobian :math:`-\log(t\sigma(z_1))`. At ``t=1`` it equals
    :func:`hetero_exact_marginals`.
    """

    e = np.linspace(-lim, lim, n)
    e1, e2 = np.meshgrid(e, e, indexing="ij")
    logp = _hetero_log_density(e1, e2, target, t)
    p = np.exp(logp - logp.max())
    cdfs = []
    for axis in (1, 0):  # marginal of e1 (sum over e2), then of e2
        c = np.cumsum(p.sum(axis=axis))
        cdfs.append((e, c / c[-1]))
    return cdfs


def hetero_conditional(e1: float, t: float = 1.0, n: int = 4001, lim: float = 8.0):
    r"""CDF of :math:`\epsilon_2` given :math:`\epsilon_1` under the exact eps-space law of
    :class:`Heteroscedastic` with :class:`NonQuadraticEnergy`, by 1-D quadrature.

    (The anchor target has the same conditional: its extra term depends on :math:`z_1` only.)
    """

    e = np.linspace(-lim, lim, n)
    logp = _hetero_log_density(np.float64(e1), e, "exact", t)
    c = np.cumsum(np.exp(logp - logp.max()))
    return e, c / c[-1]


def linear_posterior(
    backbone: LinearGaussian,
    x: np.ndarray,
    c: np.ndarray | None = None,
    m: np.ndarray | None = None,
):
    r"""Mean and covariance of :math:`p(z \mid x) \propto p(x \mid z) e^{f(z)} p_b(z)` for
    :class:`LinearGaussian` (z concatenated), with :math:`f = 0` or the
    :class:`QuadraticEnergy` ``(c, m)``: a Gaussian with precision
    :math:`(MM^\top)^{-1} + C + W_2^\top W_2 / \sigma_x^2`."""

    mm = backbone.matrix()
    d2 = mm.shape[0]
    w = np.zeros((backbone.W.shape[0], d2))
    w[:, backbone.d :] = backbone.W.numpy()
    c = np.zeros((d2, d2)) if c is None else c
    m = np.zeros(d2) if m is None else m
    prec = np.linalg.inv(mm @ mm.T) + c + w.T @ w / backbone.sigma_x**2
    cov = np.linalg.inv(prec)
    return cov @ (c @ m + w.T @ np.asarray(x) / backbone.sigma_x**2), cov


def interp_cdf(grid_cdf):
    e, c = grid_cdf
    return lambda x: np.interp(x, e, c)


def lyapunov(a: np.ndarray, q: np.ndarray, iters: int = 20_000) -> np.ndarray:
    r"""Solves :math:`\Sigma = A \Sigma A^\top + Q` by fixed-point iteration (A stable)."""

    s = q.copy()
    for _ in range(iters):
        s_new = a @ s @ a.T + q
        if np.abs(s_new - s).max() < 1e-14:
            return s_new
        s = s_new
    return s


def linear_eps_law(backbone: LinearGaussian, c: np.ndarray, m: np.ndarray):
    r"""Precision and mean of the exact eps-space law :math:`f(M\epsilon) - |\epsilon|^2/2`."""

    mm = backbone.matrix()
    prec = np.eye(mm.shape[0]) + mm.T @ c @ mm
    mean = np.linalg.solve(prec, mm.T @ c @ m)
    return prec, mean


__all__ = [
    "Heteroscedastic",
    "LinearGaussian",
    "NonQuadraticEnergy",
    "QuadraticEnergy",
    "hetero_conditional",
    "hetero_exact_marginals",
    "hetero_marginals",
    "interp_cdf",
    "linear_eps_law",
    "linear_posterior",
    "lyapunov",
]
