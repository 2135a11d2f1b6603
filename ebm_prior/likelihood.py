r"""Normalising constant of the EBM prior (importance sampling, AIS) and likelihood estimates."""

from __future__ import annotations

__all__ = [
    "LikelihoodEstimate",
    "LogPartition",
    "LowESSWarning",
    "log_likelihood",
    "log_likelihood_bound",
    "log_partition",
]

import math
import warnings
from collections.abc import Callable, Sequence
from typing import Literal, NamedTuple

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ._utils import flat_sum, frozen
from .backbone import Backbone

Energy = Callable[[list[Tensor]], Tensor]


class LowESSWarning(UserWarning):
    r"""Warns that a :math:`\log Z` estimate rests on too few effective samples to be trusted.

    Raised by :func:`log_partition` when the effective sample size of its weights is below
    ``min_ess``: the estimate and its standard error are then both unreliable.
    """


class LogPartition(NamedTuple):
    r"""An estimate of :math:`\log Z` and its diagnostics.

    Attributes:
        value: :math:`\log \hat Z`, the log-mean-exp of the log-weights.
        std_error: Delta-method standard error of :math:`\log \hat Z`,
            :math:`\mathrm{sd}(w) / (\sqrt{n}\, \bar w)` over the :math:`n` weights.
        ess: Effective sample size of the weights, :math:`(\sum w)^2 / \sum w^2`.
        num_samples: :math:`n`, the number of independent weights (base samples for
            ``"is"``, chains for ``"ais"``).
        method: ``"is"`` or ``"ais"``, the estimator that produced ``value``.
        t: Temperature of :math:`T_b` the estimate is for.
        log_weight_var: Sample variance of the log-weights :math:`\log w`.
        acceptance: Mean MALA acceptance over the chains and transitions (``"ais"``),
            else ``None``.
        num_temperatures: Number of annealing steps :math:`K` (``"ais"``), else 0.
        log_weights: The log-weights, with shape :math:`(n,)`, float64 (``None`` if not kept).
    """

    value: float
    std_error: float
    ess: float
    num_samples: int
    method: str = "is"
    t: float = 1.0
    log_weight_var: float = math.nan
    acceptance: float | None = None
    num_temperatures: int = 0
    log_weights: Tensor | None = None


class LikelihoodEstimate(NamedTuple):
    r"""An importance-weighted estimate of :math:`\log p(x)` in nats.

    Attributes:
        value: The estimate per observation, with shape :math:`(B,)`.
        log_z: The :math:`\log Z` that was subtracted (0 without an EBM prior).
        log_z_std_error: Standard error of ``log_z`` (0 when it is exact or absent); it
            shifts every entry of ``value`` alike.
        is_bound: Whether ``value`` is a stochastic lower bound on :math:`\log p(x)`
            (true without a prior or with an exact :math:`\log Z`; false with an estimate).
    """

    value: Tensor
    log_z: float
    log_z_std_error: float
    is_bound: bool


def _weight_stats(log_w: Tensor) -> tuple[float, float, float, float]:
    r"""Returns the log-mean-exp, its delta-method standard error, the ESS and the variance
    of a vector of log-weights, computed in float64 after subtracting the maximum."""

    log_w = log_w.double().flatten()
    n = log_w.numel()
    top = log_w.max()
    w = (log_w - top).exp()
    mean_w = w.mean()
    value = top + mean_w.log()
    std_error = w.std() / (math.sqrt(n) * mean_w)
    ess = w.sum() ** 2 / (w**2).sum()
    return value.item(), std_error.item(), ess.item(), log_w.var().item()


def _betas(schedule: str | Sequence[float] | Tensor, num_temperatures: int) -> Tensor:
    r"""Returns the inverse temperatures :math:`0 = \beta_0 < \dots < \beta_K = 1`."""

    if isinstance(schedule, str):
        k = num_temperatures
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"num_temperatures must be a positive int, got {k!r}")
        u = torch.linspace(0.0, 1.0, k + 1, dtype=torch.float64)
        if schedule == "linear":
            return u
        if schedule == "sigmoid":
            s = torch.sigmoid(4.0 * (2.0 * u - 1.0))
            return (s - s[0]) / (s[-1] - s[0])
        if schedule == "geometric":
            betas = torch.logspace(-4.0, 0.0, k, dtype=torch.float64)
            return torch.cat([torch.zeros(1, dtype=torch.float64), betas])
        raise ValueError(
            f"schedule must be 'sigmoid', 'geometric', 'linear' or a sequence, got {schedule!r}"
        )
    betas = torch.as_tensor(schedule, dtype=torch.float64).flatten()
    if (
        betas.numel() < 2
        or betas[0] != 0.0
        or betas[-1] != 1.0
        or not bool((betas[1:] > betas[:-1]).all())
    ):
        raise ValueError("a schedule must increase strictly from 0 to 1 (at least 2 entries)")
    return betas


@torch.no_grad()
def log_partition(
    prior: Energy,
    backbone: Backbone,
    num_samples: int = 10_000,
    batch_size: int = 1_000,
    t: float = 1.0,
    generator: torch.Generator | None = None,
    progress: bool = False,
    *,
    method: Literal["auto", "is", "ais"] = "auto",
    min_ess: float = 100.0,
    num_chains: int = 1_000,
    num_temperatures: int = 500,
    schedule: Literal["sigmoid", "geometric", "linear"] | Sequence[float] = "sigmoid",
    mala_steps: int = 1,
    step_size: float | None = None,
    target_acceptance: float = 0.65,
    pilot_chains: int = 128,
    keep_log_weights: bool = True,
) -> LogPartition:
    r"""Estimates :math:`\log Z(a, b)`, the log normalising constant of the EBM prior.

    .. math:: Z(a, b) = \mathbb{E}_{\epsilon \sim \mathcal{N}(0, I)}
              \big[\exp f_a(T_b(\epsilon, t))\big]

    **Importance sampling** (``method="is"``) averages :math:`w_k = \exp f_a(T_b(\epsilon_k))`
    over base-prior samples. :math:`\hat Z` is unbiased, :math:`\log \hat Z` biased low (Jensen).
    When the energy is strong, a few samples carry all the weight: the estimate is then low by
    nats while the standard error, computed from the same few weights, stays small.

    **Annealed importance sampling** (``method="ais"``; Neal, 2001) moves every chain along the
    geometric path from the base prior to the EBM prior in epsilon space,

    .. math:: \log \pi_\beta(\epsilon) = \beta f_a(T_b(\epsilon, t))
              - \tfrac12 \|\epsilon\|^2, \quad 0 = \beta_0 < \beta_1 < \dots < \beta_K = 1,

    starting from :math:`\epsilon_0 \sim \mathcal{N}(0, I)`, accumulating
    :math:`\log w \mathrel{+}= (\beta_k - \beta_{k-1}) f_a(T_b(\epsilon_{k-1}))` and then moving
    :math:`\epsilon_{k-1} \to \epsilon_k` by ``mala_steps`` MALA transitions that leave
    :math:`\pi_{\beta_k}` invariant. :math:`\mathbb{E}[w] = Z` for every chain, so
    :math:`\log \hat Z` is the log-mean-exp of the chains' log-weights, with the same
    standard error and ESS formulas over chains. ``schedule="sigmoid"`` is
    :math:`\beta_k \propto \sigma(4 (2k/K - 1))` rescaled to :math:`[0, 1]` (Wu et al., 2017),
    dense at both ends; ``"geometric"`` spaces :math:`\beta_1 = 10^{-4}, \dots, 1`
    geometrically; ``"linear"`` evenly; a sequence gives the :math:`\beta_k` themselves.

    Step size: with ``step_size=None`` it is adapted, without giving up unbiasedness.
    ``pilot_chains`` extra chains run alongside the first batch and are discarded; after every
    temperature, :math:`\log s \mathrel{+}= \bar a - a^*` with :math:`\bar a` the pilot
    chains' acceptance at that temperature and :math:`a^*` = ``target_acceptance``. The
    chains that enter the estimate use the schedule of step sizes so obtained, which depends on
    the pilot chains only, never on themselves: given the schedule every transition is a fixed
    :math:`\pi_{\beta_k}`-invariant kernel, and AIS is exactly unbiased. (Adapting from the
    estimating chains' own acceptance would make each kernel depend on the chain it moves.)
    The pilot starts at :math:`s = \min(1, 1.65\, d^{-1/6})`, the optimal MALA scale for
    :math:`\mathcal{N}(0, I_d)` (Roberts & Rosenthal, 1998). A float ``step_size`` fixes it.

    **Choosing** (``method="auto"``, the default): plain IS with ``num_samples`` samples is
    accepted when its ESS is at least ``min_ess``; otherwise the result of AIS is returned
    (``method`` in the result says which). ``min_ess = 100`` because:

    * The delta-method standard error is a function of the ESS alone,
      :math:`\mathrm{se}^2 = \frac{n}{n-1} (1/\mathrm{ESS} - 1/n) \approx 1/\mathrm{ESS}`:
      at ESS = 100 it is about 0.1 nat, where the linearisation behind it holds and the
      Jensen bias of :math:`\log \hat Z` (about :math:`\mathrm{se}^2/2`) is 0.005 nat.
    * :math:`\mathrm{ESS} = 1 / \sum_k \bar w_k^2 \le 1 / \max_k \bar w_k^2` for normalised
      weights :math:`\bar w`, so at ESS = 100 no single sample carries over 10% of the estimate;
      below it, the mean is a sum of a handful of terms and its CLT is not reached.
    * Simulating log-normal weights (:math:`n = 10^3 .. 10^5`), intervals of
      :math:`\pm 2` standard errors cover the truth 82-90% of the time at an ESS of about 100
      and 92-96% from about 500, but only 60-75% below about 30, where :math:`\log \hat Z`
      is low by tenths of a nat; heavier-tailed weights (strong energies) do worse. What
      matters is the ESS itself, not ESS / n.

    The rule is necessary, not sufficient: a mode of the EBM prior that no sample visits is
    invisible to every diagnostic. A result whose ESS is below ``min_ess`` (forced ``"is"``, or
    AIS in any mode) comes with a :class:`LowESSWarning`.

    Arguments:
        prior: The energy :math:`f_a`.
        backbone: The backbone providing :math:`T_b`.
        num_samples: Number of base-prior samples :math:`n` for importance sampling.
        batch_size: Samples (or chains) per forward pass.
        t: Temperature of :math:`T_b`; the estimate is of the tempered constant and records
            it (:func:`log_likelihood` refuses :math:`t \ne 1`).
        generator: A :class:`torch.Generator` for all the randomness.
        progress: Show a tqdm progress bar.
        method: ``"auto"``, ``"is"`` or ``"ais"``.
        min_ess: The ESS below which an estimate is not trusted (see above).
        num_chains: Number of AIS chains (weights) that enter the estimate.
        num_temperatures: Number of AIS steps :math:`K` (for a named schedule).
        schedule: ``"sigmoid"``, ``"geometric"``, ``"linear"``, or the :math:`\beta_k`.
        mala_steps: MALA transitions per intermediate temperature.
        step_size: MALA step size :math:`s` (noise standard deviation, as
            :class:`~ebm_prior.Langevin`), or ``None`` to adapt it (see above).
        target_acceptance: Acceptance rate the adaptation aims at.
        pilot_chains: Number of discarded chains the step size is adapted on.
        keep_log_weights: Return the log-weights in the result.

    Returns:
        A :class:`LogPartition`.

    Raises:
        FloatingPointError: A non-finite energy or gradient (naming the temperature and chains).

    References:
        | Annealed Importance Sampling (Neal, 2001)
        | https://arxiv.org/abs/physics/9803008

        | On the Quantitative Analysis of Decoder-Based Generative Models (Wu et al., 2017)
        | https://arxiv.org/abs/1611.04273

        | Optimal Scaling of Discrete Approximations to Langevin Diffusions
          (Roberts & Rosenthal, 1998)
        | https://doi.org/10.1111/1467-9868.00123

        | The Sample Size Required in Importance Sampling (Chatterjee & Diaconis, 2018)
        | https://arxiv.org/abs/1511.01437

    Example:
        >>> vae = HierarchicalVAE.from_config("digits")
        >>> prior = JointEBMPrior(vae.latent_shapes, nef=8)
        >>> lz = log_partition(prior, vae, num_samples=2_000)
        >>> lz.method, lz.num_samples, lz.ess > 100
        ('is', 2000, True)
        >>> ais = log_partition(prior, vae, method="ais", num_chains=200, num_temperatures=20)
        >>> ais.method, ais.num_temperatures, 0 < ais.acceptance <= 1
        ('ais', 20, True)
    """

    if method not in ("auto", "is", "ais"):
        raise ValueError(f"method must be 'auto', 'is' or 'ais', got {method!r}")
    if not isinstance(backbone, Backbone):
        raise TypeError(f"backbone must be a Backbone, got {type(backbone).__name__}")
    if not t > 0:
        raise ValueError(f"temperature t must be positive, got {t!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not min_ess >= 1:
        raise ValueError(f"min_ess must be >= 1, got {min_ess!r}")
    if num_chains < 2:
        raise ValueError(f"num_chains must be >= 2, got {num_chains}")
    if not isinstance(mala_steps, int) or mala_steps < 1:
        raise ValueError(f"mala_steps must be a positive int, got {mala_steps!r}")
    if step_size is not None and not (step_size > 0 and math.isfinite(step_size)):
        raise ValueError(f"step_size must be a positive finite number or None, got {step_size}")
    if not 0 < target_acceptance < 1:
        raise ValueError(f"target_acceptance must be in (0, 1), got {target_acceptance}")
    if step_size is None and pilot_chains < 1:
        raise ValueError(f"pilot_chains must be >= 1 to adapt the step size, got {pilot_chains}")
    betas = _betas(schedule, num_temperatures)
    if method != "ais":
        if num_samples < 2:
            raise ValueError(f"num_samples must be >= 2, got {num_samples}")
        out = _importance_sampling(prior, backbone, num_samples, batch_size, t, generator,
                                   progress, keep_log_weights)  # fmt: skip
        if out.ess >= min_ess:
            return out
        if method == "is":
            warnings.warn(
                f"log Z by importance sampling from the base prior: ESS = {out.ess:.1f} of "
                f"{num_samples} samples (< min_ess = {min_ess:g}). log Z = {out.value:.3f} "
                f"+- {out.std_error:.3f} is unreliable: "
                + (
                    "increase num_samples"
                    if out.ess >= num_samples / 2
                    else "a few samples carry the estimate and its standard error; use "
                    "method='ais'"
                ),
                LowESSWarning,
                stacklevel=3,
            )
            return out
    out = _annealed_importance_sampling(
        prior, backbone, betas, num_chains, batch_size, t, generator, progress, mala_steps,
        step_size, target_acceptance, pilot_chains, keep_log_weights,
    )  # fmt: skip
    if out.ess < min_ess:
        warnings.warn(
            f"log Z by AIS: ESS = {out.ess:.1f} of {num_chains} chains (< min_ess = "
            f"{min_ess:g}), variance of the log-weights {out.log_weight_var:.2f}, mean "
            f"acceptance {out.acceptance:.2f}. log Z = {out.value:.3f} +- {out.std_error:.3f} "
            f"is unreliable: "
            + (
                "increase num_chains"
                if out.ess >= num_chains / 2
                else "increase num_temperatures (or mala_steps)"
            ),
            LowESSWarning,
            stacklevel=3,
        )
    return out


def _importance_sampling(
    prior, backbone, num_samples, batch_size, t, generator, progress, keep
) -> LogPartition:
    fs = []
    for start in tqdm(range(0, num_samples, batch_size), disable=not progress, desc="log Z"):
        n = min(batch_size, num_samples - start)
        z = backbone.eps_to_z(backbone.sample_eps(n, generator=generator), t)
        fs.append(prior(z).double())
    f = torch.cat(fs)
    if not torch.isfinite(f).all():
        bad = (~torch.isfinite(f)).nonzero().flatten().tolist()
        raise FloatingPointError(
            f"non-finite energy on {len(bad)} base-prior sample(s) (first: {bad[:10]}) while "
            f"estimating log Z"
        )
    value, std_error, ess, var = _weight_stats(f)
    return LogPartition(
        value, std_error, ess, num_samples, "is", float(t), var, None, 0,
        f.cpu() if keep else None,
    )  # fmt: skip


def _annealed_importance_sampling(
    prior, backbone, betas, num_chains, batch_size, t, generator, progress, mala_steps,
    step_size, target, pilot, keep,
) -> LogPartition:  # fmt: skip
    energy = prior  # the module call, as the samplers and losses use (hooks, overrides)
    dim = sum(math.prod(s) for s in backbone.latent_shapes)
    log_s0 = math.log(step_size if step_size is not None else min(1.0, 1.65 * dim ** (-1 / 6)))
    # per-temperature step sizes: fixed, or set by the pilot chains of the first batch
    steps = None if step_size is None else torch.full((betas.numel() - 2,), float(step_size))
    log_ws, accepted = [], 0.0
    modules = [m for m in (prior, backbone) if isinstance(m, torch.nn.Module)]
    with frozen(*modules):
        for start in range(0, num_chains, batch_size):
            n = min(batch_size, num_chains - start)
            extra = pilot if step_size is None and steps is None else 0
            log_w, acc, steps = _ais_batch(
                prior, energy, backbone, betas, n, extra, t, generator, progress, mala_steps,
                log_s0, steps, target,
            )  # fmt: skip
            log_ws.append(log_w)
            accepted += float(acc.sum())
    log_w = torch.cat(log_ws)
    value, std_error, ess, var = _weight_stats(log_w)
    k = betas.numel() - 1
    transitions = (k - 1) * mala_steps * num_chains
    acceptance = accepted / transitions if transitions else math.nan
    return LogPartition(
        value, std_error, ess, num_chains, "ais", float(t), var, acceptance, k,
        log_w.cpu() if keep else None,
    )  # fmt: skip


def _ais_batch(
    prior, energy, backbone, betas, n, extra, t, generator, progress, mala_steps, log_s0,
    steps, target, check_every: int = 50,
):  # fmt: skip
    r"""Runs ``n`` estimating chains (plus ``extra`` pilot chains first, which adapt the step
    size when ``steps`` is None) through all temperatures; returns their log-weights, their
    per-chain acceptance counts, and the per-temperature step sizes."""

    def value_and_grad(eps, checked=False):
        eps = [e.detach().requires_grad_(True) for e in eps]
        with torch.enable_grad():
            if checked:  # the public, validating path, once per batch
                f = prior(backbone.eps_to_z(eps, t))
            else:
                f = energy(backbone._eps_to_z(eps, t))
            grad = torch.autograd.grad(f.sum(), eps)
        return f.detach(), [g.detach() for g in grad]

    eps = backbone.sample_eps(n + extra, generator=generator)
    device, dtype = eps[0].device, eps[0].dtype
    f, grad = value_and_grad(eps, checked=True)
    first_bad = torch.where(_finite(f, grad), -1, 0)
    _check(first_bad, betas, extra)
    log_w = torch.zeros(n + extra, dtype=torch.float64, device=device)
    accepted = torch.zeros(n + extra, dtype=dtype, device=device)
    adapt = steps is None
    steps = None if adapt else steps.to(device, dtype)
    log_s = torch.tensor(log_s0, dtype=torch.float64, device=device)
    used = []
    k_max = betas.numel() - 1
    bar = tqdm(range(1, k_max + 1), disable=not progress, desc="AIS", leave=False)
    for k in bar:
        log_w += (betas[k] - betas[k - 1]).item() * f.double()
        if k == k_max:
            break
        s = log_s.exp().to(dtype) if adapt else steps[k - 1]
        used.append(s)
        beta = betas[k].item()
        level = torch.zeros_like(accepted)
        for _ in range(mala_steps):
            eps, f, grad, ok, bad = _mala(eps, f, grad, beta, s, value_and_grad, generator)
            level += ok.to(dtype)
            first_bad = torch.where(bad & (first_bad < 0), k, first_bad)
        accepted += level
        if adapt:
            rate = level[:extra].mean() / mala_steps
            log_s = log_s + (rate.double() - target)
        if k % check_every == 0:
            _check(first_bad, betas, extra)
    _check(first_bad, betas, extra)
    if adapt:
        steps = torch.stack(used) if used else torch.empty(0, dtype=dtype, device=device)
    return log_w[extra:], accepted[extra:], steps


def _mala(eps, f, grad, beta, s, value_and_grad, generator):
    r"""One MALA transition for :math:`\beta f(T_b(\epsilon)) - \|\epsilon\|^2 / 2` from the
    cached energy and energy gradient at the current state."""

    c = 0.5 * s * s
    noise = [torch.randn(e.shape, generator=generator, device=e.device, dtype=e.dtype)
             for e in eps]  # fmt: skip
    prop = [e + c * (beta * g - e) + s * xi for e, g, xi in zip(eps, grad, noise)]
    f_p, grad_p = value_and_grad(prop)
    # log pi(prop) - log pi(eps), with |p|^2 - |e|^2 = (p - e) . (p + e) for accuracy
    log_ratio = beta * (f_p - f) - 0.5 * sum(
        flat_sum((p - e) * (p + e)) for p, e in zip(prop, eps)
    )
    log_fwd = -0.5 * sum(flat_sum(xi**2) for xi in noise)
    log_bwd = -sum(
        flat_sum((e - p - c * (beta * g - p)) ** 2) for e, p, g in zip(eps, prop, grad_p)
    ) / (2 * s * s)
    log_alpha = log_ratio + log_bwd - log_fwd
    u = torch.rand(f.shape, generator=generator, device=f.device, dtype=f.dtype)
    bad = ~_finite(f_p, grad_p)
    ok = ~bad & (u.log() < torch.nan_to_num(log_alpha, nan=-math.inf))
    eps = [torch.where(_bcast(ok, p), p, e) for p, e in zip(prop, eps)]
    grad = [torch.where(_bcast(ok, gp), gp, g) for gp, g in zip(grad_p, grad)]
    return eps, torch.where(ok, f_p, f), grad, ok, bad


def _finite(f: Tensor, grad: list[Tensor]) -> Tensor:
    return torch.isfinite(f) & torch.isfinite(sum(flat_sum(g * g) for g in grad))


def _bcast(v: Tensor, like: Tensor) -> Tensor:
    return v.reshape(-1, *([1] * (like.dim() - 1)))


def _check(first_bad: Tensor, betas: Tensor, extra: int) -> None:
    bad = first_bad >= 0
    if bool(bad.any()):
        chains = bad.nonzero().flatten()
        k = int(first_bad[chains].min())
        shown = [int(i) - extra for i in chains[:10]]
        raise FloatingPointError(
            f"AIS diverged: non-finite energy or gradient at temperature {k} (beta = "
            f"{betas[k].item():.4g}) in {len(chains)} chain(s) {shown} (negative: pilot "
            f"chains). Lower step_size (or let it adapt), or check the energy for overflow."
        )


def _log_z_of(log_z: float | LogPartition | None, prior: Energy | None) -> tuple[float, float]:
    r"""Validates ``log_z`` against ``prior`` and returns its value and standard error."""

    if prior is None:
        return 0.0, 0.0
    if log_z is None:
        raise ValueError("a prior's likelihood needs log_z (estimate it with log_partition)")
    if isinstance(log_z, LogPartition):
        if log_z.t != 1.0:
            raise ValueError(
                f"log_z was estimated at temperature t = {log_z.t}, but the likelihood is under "
                f"the untempered prior: estimate it with log_partition(..., t=1.0)"
            )
        if not math.isfinite(log_z.value):
            raise ValueError(f"log_z is not finite: {log_z.value}")
        return float(log_z.value), float(log_z.std_error)
    value = float(log_z)
    if not math.isfinite(value):
        raise ValueError(f"log_z is not finite: {value}")
    return value, 0.0


@torch.no_grad()
def log_likelihood(
    backbone: Backbone,
    x: Tensor,
    prior: Energy | None = None,
    log_z: float | LogPartition | None = None,
    num_samples: int = 64,
) -> LikelihoodEstimate:
    r"""Estimates :math:`\log p(x)` in nats under the backbone with the EBM prior.

    The model is :math:`p(x) = \int p(x \mid z)\, e^{f_a(z)} p_b(z) / Z(a, b)\, dz`; with
    :math:`z_k \sim q(z \mid x)` the importance-weighted estimate is

    .. math:: \hat\ell(x) = \log \frac{1}{K} \sum_{k=1}^K
              \frac{p(x \mid z_k)\, e^{f_a(z_k)}\, p_b(z_k)}{q(z_k \mid x)} - \log \hat Z .

    With ``prior=None`` (the Gaussian-prior backbone, :math:`f = 0`, :math:`Z = 1`) or an
    exact :math:`\log Z` (a float), :math:`\mathbb{E}[\hat\ell(x)] \le \log p(x)`: the IWAE
    bound (Burda et al., 2016), ``is_bound=True``; :math:`K = 1` gives the ELBO. With an
    *estimated* :math:`\log \hat Z` (a :class:`LogPartition`) it is not a bound:
    :math:`\log \hat Z` is biased low (Jensen; badly so for importance sampling at a low ESS),
    so :math:`\hat\ell(x)` is biased up by that bias, and its error is shared by every
    :math:`x`. The result then has ``is_bound=False`` and carries the standard error of
    :math:`\log \hat Z`; report it, and prefer ``log_partition(..., method="auto")``, which
    switches to AIS when importance sampling cannot be trusted.

    Arguments:
        backbone: The backbone.
        x: Data batch, with shape :math:`(B, *)`.
        prior: The energy :math:`f_a`, or ``None`` for the Gaussian prior.
        log_z: :math:`\log Z(a, b)`, required with a prior: a :class:`LogPartition` from
            :func:`log_partition` (at ``t=1``), or a float taken as exact. Ignored without a
            prior.
        num_samples: Number of importance samples :math:`K`.

    Returns:
        A :class:`LikelihoodEstimate` with ``value`` of shape :math:`(B,)`.

    References:
        | Importance Weighted Autoencoders (Burda et al., 2016)
        | https://arxiv.org/abs/1509.00519

    Example:
        >>> vae = HierarchicalVAE.from_config("digits")
        >>> prior = JointEBMPrior(vae.latent_shapes, nef=8)
        >>> x = (torch.rand(4, 1, 8, 8) > 0.5).float()
        >>> out = log_likelihood(vae, x, prior, log_partition(prior, vae, 2_000), 8)
        >>> out.value.shape, out.is_bound
        (torch.Size([4]), False)
    """

    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
    value, std_error = _log_z_of(log_z, prior)
    terms = []
    for _ in range(num_samples):
        z, log_q = backbone.posterior(x)
        lw = backbone.log_likelihood(x, z) + backbone.log_prior(z) - log_q
        if prior is not None:
            lw = lw + prior(z) - value
        terms.append(lw.double())
    lw = torch.stack(terms)
    est = (torch.logsumexp(lw, dim=0) - math.log(num_samples)).to(x.dtype)
    is_bound = prior is None or not isinstance(log_z, LogPartition)
    return LikelihoodEstimate(est, value, std_error, is_bound)


def log_likelihood_bound(
    backbone: Backbone,
    x: Tensor,
    prior: Energy | None = None,
    log_z: float | LogPartition | None = None,
    num_samples: int = 64,
) -> Tensor:
    r"""Returns ``log_likelihood(backbone, x, prior, log_z, num_samples).value``, shape
    :math:`(B,)`.

    Deprecated: the name promises a bound, which the value is only without a prior or with an
    exact :math:`\log Z`. Use :func:`log_likelihood`, which says which it is and carries the
    standard error of :math:`\log \hat Z`.
    """

    warnings.warn(
        "log_likelihood_bound is deprecated: use log_likelihood(...), whose result says whether "
        "it is a bound and carries the standard error of log Z (.value is this tensor)",
        DeprecationWarning,
        stacklevel=2,
    )
    return log_likelihood(backbone, x, prior, log_z, num_samples).value
