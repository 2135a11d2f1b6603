r"""Langevin samplers: generic, epsilon-space (prior) and z-space (posterior)."""

from __future__ import annotations

__all__ = [
    "EpsLangevin",
    "Langevin",
    "LangevinDivergenceError",
    "LangevinResult",
    "PosteriorLangevin",
    "ula_gaussian_bias",
]

import math
from collections.abc import Callable, Sequence
from typing import Literal, NamedTuple

import torch
import torch.nn as nn
from torch import Tensor
from tqdm.auto import tqdm

from ._utils import check_latents, flat_sum, frozen
from .backbone import Backbone

LogDensity = Callable[[list[Tensor]], Tensor]


class LangevinDivergenceError(FloatingPointError):
    r"""Raised when a Langevin chain produces a non-finite log-density or gradient.

    Attributes:
        step: The first step (0-based; -1 for the initial state) at which a chain diverged.
        chains: Indices of the chains that diverged.
    """

    def __init__(self, step: int, chains: list[int]):
        self.step, self.chains = step, chains
        shown = chains[:10] + (["..."] if len(chains) > 10 else [])
        super().__init__(
            f"Langevin diverged: non-finite log-density or gradient at step {step} in "
            f"{len(chains)} chain(s) {shown}. Lower the step size, clip gradients "
            f"(clip_grad=...), or use on_nonfinite='reject'."
        )


class LangevinResult(NamedTuple):
    r"""What a Langevin run returns.

    Attributes:
        x: Final chain state, one tensor per group (eps for :class:`EpsLangevin`).
        z: :math:`T_b(\epsilon)` for :class:`EpsLangevin`, else the same as ``x``.
        acceptance: Per-chain acceptance rate with shape :math:`(B,)` (MALA), else ``None``.
        log_density: Trace of :math:`\log \pi` at the state entering every step,
            shape :math:`(S, B)` (empty when ``trace=False``).
        grad_norm: Trace of :math:`\|\nabla \log \pi\|` at the same states, shape
            :math:`(S, B)`.
        rejected_nonfinite: Per-chain count of proposals rejected for being non-finite
            (``on_nonfinite="reject"``), shape :math:`(B,)`.
    """

    x: list[Tensor]
    z: list[Tensor]
    acceptance: Tensor | None
    log_density: Tensor
    grad_norm: Tensor
    rejected_nonfinite: Tensor


class Langevin:
    r"""Creates a Langevin sampler for a log-density over a list of tensors.

    Unadjusted Langevin (ULA) with step size :math:`s` (the noise standard deviation):

    .. math:: x \leftarrow x + \frac{s^2}{2} \nabla \log \pi(x) + s \, \xi,
              \quad \xi \sim \mathcal{N}(0, I)

    The authors' 2-layer code (hierarchical-joint-ebm) uses the same :math:`s`, the noise
    standard deviation, with the same update, so its step sizes carry over unchanged. Their
    NVAE code and VAEBM write the update with :math:`\delta = s^2`
    (``x + delta/2 * grad + sqrt(delta) * xi``): a step size :math:`\delta` there is our
    :math:`s = \sqrt{\delta}`.

    With ``mala=True`` every proposal is accepted with probability
    :math:`\min(1, \pi(x') q(x \mid x') / \pi(x) q(x' \mid x))` per chain (Metropolis-adjusted
    Langevin), which makes the chain exact for any step size. The proposal's drift (clipped or
    computed under ``autocast``) may be any deterministic function of the state, since the same
    drift enters both proposal densities; the ratio :math:`\pi(x') / \pi(x)` is always
    evaluated in the state's dtype, without autocast.

    The log-density must return shape :math:`(B,)`; this is checked at the first evaluation of
    every call (a ``ValueError`` names the shape returned).

    Gradients flow to the chain state only: parameters of ``modules`` are frozen while
    sampling, so no parameter ``.grad`` is created or changed. The state is detached every
    step, so memory does not grow with the number of steps. Non-finite values are tracked on
    device and checked every ``check_every`` steps and at the end: ``on_nonfinite="raise"``
    raises :class:`LangevinDivergenceError` naming the first step and the chains;
    ``"reject"`` rejects every non-finite proposal (the chain keeps its state; exact for
    MALA, where such a proposal has zero density) and counts them per chain.

    Arguments:
        log_density: A function from a list of tensors (each :math:`(B, *)`) to :math:`(B,)`.
            Subclasses override :meth:`log_density` instead.
        step_size: The step size :math:`s > 0`.
        steps: Number of Langevin steps.
        mala: Metropolis adjustment.
        clip_grad: If set, the per-chain gradient norm (over the free groups) is clipped to
            this value before the drift (also inside MALA's proposal density).
        generator: A :class:`torch.Generator` for the noise and the MH uniforms.
        on_nonfinite: ``"raise"`` or ``"reject"`` (see above).
        check_every: Steps between host-side divergence checks.
        trace: Record the log-density and gradient-norm traces.
        progress: Show a tqdm progress bar.
        autocast: Evaluate the log-density's gradient (backbone and energies) under
            :func:`torch.autocast` with this dtype (``torch.bfloat16`` or ``torch.float16``).
            The chain state and the update stay in the state's dtype; with ``mala=True`` the
            accept/reject test uses :math:`\log \pi` evaluated again in the state's dtype,
            without autocast (one extra forward pass per step, no backward), so MALA stays
            exact for the true density rather than the rounded one.
        modules: Modules whose parameters are frozen while sampling.

    Example:
        >>> sampler = Langevin(lambda x: -0.5 * x[0].pow(2).sum(1), step_size=0.5, steps=50)
        >>> out = sampler([torch.zeros(1000, 2)])
        >>> out.x[0].shape
        torch.Size([1000, 2])
    """

    def __init__(
        self,
        log_density: LogDensity | None = None,
        *,
        step_size: float,
        steps: int,
        mala: bool = False,
        clip_grad: float | None = None,
        generator: torch.Generator | None = None,
        on_nonfinite: Literal["raise", "reject"] = "raise",
        check_every: int = 50,
        trace: bool = True,
        progress: bool = False,
        autocast: torch.dtype | None = None,
        modules: Sequence[nn.Module] = (),
    ):
        if not step_size > 0 or not math.isfinite(step_size):
            raise ValueError(f"step_size must be a positive finite number, got {step_size!r}")
        if not isinstance(steps, int) or steps < 0:
            raise ValueError(f"steps must be a non-negative int, got {steps!r}")
        if clip_grad is not None and not clip_grad > 0:
            raise ValueError(f"clip_grad must be positive or None, got {clip_grad!r}")
        if on_nonfinite not in ("raise", "reject"):
            raise ValueError(f"on_nonfinite must be 'raise' or 'reject', got {on_nonfinite!r}")
        if autocast not in (None, torch.float16, torch.bfloat16):
            raise ValueError(
                f"autocast must be None, torch.float16 or torch.bfloat16, got {autocast}"
            )
        if check_every < 1:
            raise ValueError(f"check_every must be >= 1, got {check_every}")
        self._fn = log_density
        self.step_size = float(step_size)
        self.steps = steps
        self.mala = mala
        self.clip_grad = clip_grad
        self.generator = generator
        self.on_nonfinite = on_nonfinite
        self.check_every = check_every
        self.trace = trace
        self.progress = progress
        self.autocast = autocast
        self.modules = tuple(modules)

    # -- to override ----------------------------------------------------------------------------

    def log_density(self, x: list[Tensor]) -> Tensor:
        r"""Returns :math:`\log \pi(x)` up to a constant, with shape :math:`(B,)`."""

        if self._fn is None:
            raise NotImplementedError("pass log_density=... or override log_density()")
        return self._fn(x)

    def validate(self, x: list[Tensor]) -> None:
        r"""Checks a starting state (subclasses check group shapes)."""

        if isinstance(x, Tensor) or not isinstance(x, (list, tuple)) or not x:
            raise TypeError("the chain state must be a non-empty list of tensors, one per group")
        for i, xi in enumerate(x):
            if not isinstance(xi, Tensor) or not xi.is_floating_point():
                raise TypeError(f"state[{i}] must be a floating point tensor")

    def transform(self, x: list[Tensor]) -> list[Tensor]:
        r"""Maps the final state to the returned ``z`` (identity here)."""

        return x

    # -- machinery ------------------------------------------------------------------------------

    def __call__(self, x0: Sequence[Tensor], fixed_groups: Sequence[int] = ()) -> LangevinResult:
        r"""Runs the chains from ``x0``.

        Arguments:
            x0: Starting state, one tensor per group, each with shape :math:`(B, *)`.
            fixed_groups: Indices of groups held fixed at their value in ``x0``
                (conditional sampling).

        Returns:
            A :class:`LangevinResult`.
        """

        x = [xi.detach().clone() for xi in x0]
        self.validate(x)
        n = len(x)
        fixed = sorted({int(i) % n if -n <= int(i) < n else int(i) for i in fixed_groups})
        if any(not 0 <= i < n for i in fixed):
            raise ValueError(f"fixed_groups {list(fixed_groups)} out of range for {n} groups")
        free = [i for i in range(n) if i not in fixed]
        if not free:
            raise ValueError("all groups are fixed: nothing to sample")

        batch, device, dtype = x[0].shape[0], x[0].device, x[0].dtype
        steps = self.steps
        zeros = torch.zeros(batch, device=device, dtype=torch.long)
        log_trace = torch.empty((steps if self.trace else 0, batch), device=device, dtype=dtype)
        norm_trace = torch.empty_like(log_trace)
        accepted = torch.zeros(batch, device=device, dtype=dtype)
        rejected = zeros.clone()
        first_bad = torch.full_like(zeros, -2)  # -2: never diverged

        with frozen(*self.modules):
            if self.mala or self.on_nonfinite == "reject":
                x, accepted, rejected, first_bad = self._run_selecting(
                    x, free, log_trace, norm_trace, accepted, rejected, first_bad
                )
            else:
                x, first_bad = self._run_ula(x, free, log_trace, norm_trace, first_bad)
            with torch.no_grad():
                z = [zi.detach() for zi in self.transform(x)]
            if self.on_nonfinite == "raise":
                last = ~torch.stack([_finite(t) for t in (*x, *z)]).all(0)
                first_bad = torch.where(last & (first_bad == -2), steps - 1, first_bad)
                self._check(first_bad)

        return LangevinResult(
            x=x,
            z=z,
            acceptance=accepted / max(steps, 1) if self.mala else None,
            log_density=log_trace,
            grad_norm=norm_trace,
            rejected_nonfinite=rejected,
        )

    def _run_ula(self, x, free, log_trace, norm_trace, first_bad):
        r"""ULA that raises on divergence: one evaluation per step, at the current state, and
        an in-place update.

        The log-density of every step goes to a small ring buffer on the device, scanned every
        ``check_every`` steps; a non-finite value at the state entering step ``k`` is reported
        as step ``k - 1`` (the step that produced it; -1 is the initial state). Gradient norms
        are computed only when traced or clipped (and then checked too); otherwise a
        non-finite gradient shows up one step later, as a non-finite log-density or state.
        """

        s, c = self.step_size, 0.5 * self.step_size**2
        need_norm = self.trace or self.clip_grad is not None
        ring = torch.empty((self.check_every, x[0].shape[0]), device=x[0].device)
        x = list(x)
        bar = tqdm(range(self.steps), disable=not self.progress, desc="Langevin", leave=False)
        for k in bar:
            logp, grad = self._value_and_grad(x, free, check_shape=k == 0)
            if need_norm:
                norm = _norm(grad)
                ring[k % self.check_every] = logp + norm
                if self.trace:
                    log_trace[k] = logp
                    norm_trace[k] = norm
                grad = self._drift(grad, norm) if self.clip_grad is not None else grad
                cj = 1.0 if self.clip_grad is not None else c
            else:
                ring[k % self.check_every] = logp
                cj = c
            for j, i in enumerate(free):
                x[i].add_(grad[j], alpha=cj).add_(self._randn(x[i]), alpha=s)
            if (k + 1) % self.check_every == 0 or k + 1 == self.steps:
                n = k % self.check_every + 1
                bad = ~torch.isfinite(ring[:n])
                if bool(bad.any()):
                    chains = bad.any(0)
                    step = (k + 1 - n) + bad.int().argmax(0) - 1
                    first_bad = torch.where(chains & (first_bad == -2), step, first_bad)
                    self._check(first_bad)
        return x, first_bad

    def _run_selecting(self, x, free, log_trace, norm_trace, accepted, rejected, first_bad):
        r"""MALA, or ULA with ``on_nonfinite="reject"``: every proposal is evaluated before it
        is accepted, and the evaluation is cached for the next step."""

        s, batch = self.step_size, x[0].shape[0]
        exact = self.mala and self.autocast is not None
        logp, grad = self._value_and_grad(x, free, exact=exact, check_shape=True)
        norm = _norm(grad)
        bad = ~torch.isfinite(logp) | ~torch.isfinite(norm)
        if bool(bad.any()):
            raise LangevinDivergenceError(-1, bad.nonzero().flatten().tolist())
        drift = self._drift(grad, norm)
        bar = tqdm(range(self.steps), disable=not self.progress, desc="Langevin", leave=False)
        for k in bar:
            if self.trace:
                log_trace[k] = logp
                norm_trace[k] = norm
            noise = [self._randn(x[i]) for i in free]
            prop = list(x)
            for j, i in enumerate(free):
                prop[i] = x[i] + drift[j] + s * noise[j]
            logp_p, grad_p = self._value_and_grad(prop, free, exact=exact)
            norm_p = _norm(grad_p)
            drift_p = self._drift(grad_p, norm_p)
            bad = ~torch.isfinite(logp_p) | ~torch.isfinite(norm_p)
            first_bad = torch.where(bad & (first_bad == -2), k, first_bad)
            ok = ~bad
            if self.mala:
                log_q_fwd = -0.5 * sum(flat_sum(e**2) for e in noise)
                log_q_bwd = -sum(
                    flat_sum((x[i] - prop[i] - drift_p[j]) ** 2) for j, i in enumerate(free)
                ) / (2 * s**2)
                log_alpha = logp_p - logp + log_q_bwd - log_q_fwd
                u = torch.rand(
                    batch, generator=self.generator, device=logp.device, dtype=logp.dtype
                )
                ok = ok & (u.log() < torch.nan_to_num(log_alpha, nan=-math.inf))
            accepted += ok.to(accepted.dtype)
            rejected += bad.long()
            x = [_where(ok, p, c) for p, c in zip(prop, x)]
            logp = torch.where(ok, logp_p, logp)
            norm = torch.where(ok, norm_p, norm)
            drift = [_where(ok, dp, d) for dp, d in zip(drift_p, drift)]
            if self.on_nonfinite == "raise" and (k + 1) % self.check_every == 0:
                self._check(first_bad)
        return x, accepted, rejected, first_bad

    def _value_and_grad(
        self, x: list[Tensor], free: list[int], exact: bool = False, check_shape: bool = False
    ) -> tuple[Tensor, list[Tensor]]:
        r"""Returns :math:`\log \pi(x)`, shape :math:`(B,)`, and its gradient over the free
        groups.

        Under ``autocast`` both come from the autocast pass, unless ``exact`` is set: then the
        value is evaluated again in the state's dtype, without autocast and without a graph
        (MALA's accept/reject test needs the true density; the drift does not).
        """

        x = [xi.detach().requires_grad_(i in free) for i, xi in enumerate(x)]
        with torch.enable_grad():
            if self.autocast is None:
                logp = self.log_density(x)
            else:
                with torch.autocast(x[0].device.type, dtype=self.autocast):
                    logp = self.log_density(x)
            if check_shape:
                _check_log_density(logp, x[0].shape[0])
            logp = logp.to(x[0].dtype)
            grad = torch.autograd.grad(logp.sum(), [x[i] for i in free])
        if exact and self.autocast is not None:
            with torch.no_grad():
                logp = self.log_density([xi.detach() for xi in x])
            if check_shape:
                _check_log_density(logp, x[0].shape[0])
        return logp.detach(), [g.detach() for g in grad]

    def _drift(self, grad: list[Tensor], norm: Tensor | None) -> list[Tensor]:
        c = 0.5 * self.step_size**2
        if self.clip_grad is not None:
            scale = (self.clip_grad / norm.clamp_min(1e-12)).clamp(max=1.0)
            scale = torch.nan_to_num(scale, nan=1.0)
            return [c * _bcast(scale, g) * g for g in grad]
        return [c * g for g in grad]

    def _randn(self, like: Tensor) -> Tensor:
        return torch.randn(
            like.shape, generator=self.generator, device=like.device, dtype=like.dtype
        )

    def _check(self, first_bad: Tensor) -> None:
        if bool((first_bad != -2).any()):
            chains = (first_bad != -2).nonzero().flatten()
            raise LangevinDivergenceError(int(first_bad[chains].min()), chains.tolist())


def ula_gaussian_bias(dim: int, step_size: float, steps: int | None = None) -> float:
    r"""Nats by which unadjusted Langevin lowers the mean log-density of its samples of
    :math:`\mathcal{N}(0, I_D)`, the base of every eps-space chain, where the energy is 0.

    The unadjusted step on :math:`\log \pi = -\lVert\epsilon\rVert^2 / 2`,
    :math:`\epsilon_{k+1} = a \epsilon_k + s \xi_k` with :math:`a = 1 - s^2/2`, started at
    :math:`\mathcal{N}(0, I)`, leaves every coordinate Gaussian with variance

    .. math:: v_T = a^{2T} + \frac{1 - a^{2T}}{1 - s^2/4}
              \xrightarrow{T \to \infty} \frac{1}{1 - s^2/4} > 1,

    so :math:`\mathbb{E}[\log \mathcal{N}(\epsilon_T)] - \mathbb{E}_{\mathcal{N}(0, I)}
    [\log \mathcal{N}(\epsilon)] = -D (v_T - 1) / 2`, which this returns with the sign
    flipped. It grows with the dimension :math:`D`: the negatives of Eq. 5 and Eq. 6 sit this
    many nats below the base prior even when :math:`f_a = 0`, and learning the backbone prior
    from them (Eq. 6) shrinks its scales to close the gap. MALA (``mala=True``) removes it.

    Arguments:
        dim: The total latent dimension :math:`D`.
        step_size: The step size :math:`s` (the noise standard deviation), in :math:`(0, 2)`.
        steps: :math:`T`, or ``None`` for the stationary law (a chain run to convergence).

    Example:
        >>> round(ula_gaussian_bias(9216, 0.3, 20), 1)  # NVAE on 32x32, s = 0.3, 20 steps
        89.3
        >>> round(ula_gaussian_bias(48, 0.4, 60), 2)  # the authors' 2-layer settings
        1.0
    """

    if not 0 < step_size < 2:
        raise ValueError(f"step_size must be in (0, 2) for a stable chain, got {step_size!r}")
    stationary = 1.0 / (1.0 - step_size**2 / 4)
    decay = 0.0 if steps is None else (1.0 - step_size**2 / 2) ** (2 * int(steps))
    return 0.5 * dim * (decay + (1.0 - decay) * stationary - 1.0)


def _check_log_density(logp: object, batch: int) -> None:
    if not isinstance(logp, Tensor):
        raise TypeError(
            f"the log-density must return a tensor of shape (B,) = ({batch},), "
            f"got {type(logp).__name__}"
        )
    shape = tuple(logp.shape)
    if shape != (batch,):
        hint = (
            " (a term of shape (B, 1) added to one of shape (B,))" if shape == (batch,) * 2 else ""
        )
        raise ValueError(
            f"the log-density returned shape {shape}, expected (B,) = ({batch},), one value per "
            f"chain{hint}"
        )


def _bcast(v: Tensor, like: Tensor) -> Tensor:
    return v.reshape(-1, *([1] * (like.dim() - 1)))


def _where(cond: Tensor, a: Tensor, b: Tensor) -> Tensor:
    return torch.where(_bcast(cond, a), a, b)


def _finite(x: Tensor) -> Tensor:
    return torch.isfinite(x).flatten(1).all(1)


def _norm(grad: list[Tensor]) -> Tensor:
    return sum(flat_sum(g**2) for g in grad).sqrt()


class EpsLangevin(Langevin):
    r"""Creates an epsilon-space Langevin sampler for the joint EBM prior.

    Samples :math:`\epsilon` from the exact EBM prior in epsilon space (supplement 1.3),

    .. math:: \log \pi(\epsilon) = f_a(T_b(\epsilon)) - \tfrac{1}{2}\|\epsilon\|^2 + c,

    and returns :math:`z = T_b(\epsilon)`, with :math:`T_b` at temperature :math:`t`.

    With ``target="anchor"`` it targets :math:`f_a(z) + \log p_b^t(z)` at
    :math:`z = T_b(\epsilon)` instead, as the authors' NVAE code and VAEBM do, where
    :math:`p_b^t` is the backbone prior with every conditional tempered to
    :math:`\mathcal{N}(\mu_i, (t \sigma_i)^2)`. Since
    :math:`(z_i - \mu_i) / \sigma_i = t \epsilon_i`, it is computed through the backbone
    contract as

    .. math:: \log p_b^t(z) = \log p_b(z) + \frac{t^2 - 1}{2} \|\epsilon\|^2 - D \log t

    (:math:`D` the total latent dimension). At every :math:`t` the anchor target differs from
    the exact one by exactly the log-Jacobian :math:`-\sum_i \log(t \sigma_i)`, the sum over
    every latent coordinate, up to the additive constant :math:`-\tfrac{D}{2} \log 2\pi`. It
    samples a distorted distribution whenever a :math:`\sigma_i` depends on the groups above;
    use it only to reproduce published numbers.

    The energy is called as a module, ``prior(z)``, so its ``forward`` overrides and forward
    hooks apply, as in the losses.

    Arguments:
        prior: The energy :math:`f_a`, a :class:`JointEBMPrior` or any module mapping a list
            of latents to :math:`(B,)`; ``None`` samples the base prior.
        backbone: The backbone providing :math:`T_b`.
        t: Temperature of :math:`T_b`.
        target: ``"exact"`` (default) or ``"anchor"``.
        kwargs: The options of :class:`Langevin`.

    Example:
        >>> from ebm_prior import HierarchicalVAE, JointEBMPrior
        >>> vae = HierarchicalVAE.from_config("digits")
        >>> prior = JointEBMPrior(vae.latent_shapes)
        >>> sampler = EpsLangevin(prior, vae, step_size=0.1, steps=10)
        >>> out = sampler(vae.sample_eps(16))
        >>> [z.shape for z in out.z]
        [torch.Size([16, 8]), torch.Size([16, 16])]
    """

    def __init__(
        self,
        prior: Callable[[list[Tensor]], Tensor] | None,
        backbone: Backbone,
        *,
        t: float = 1.0,
        target: Literal["exact", "anchor"] = "exact",
        **kwargs,
    ):
        if not isinstance(backbone, Backbone):
            raise TypeError(f"backbone must be a Backbone, got {type(backbone).__name__}")
        if target not in ("exact", "anchor"):
            raise ValueError(f"target must be 'exact' or 'anchor', got {target!r}")
        if not t > 0:
            raise ValueError(f"temperature t must be positive, got {t!r}")
        modules = [m for m in (prior, backbone) if isinstance(m, nn.Module)]
        super().__init__(modules=modules, **kwargs)
        self.prior, self.backbone, self.t, self.target = prior, backbone, float(t), target

    def validate(self, x: list[Tensor]) -> None:
        self.backbone.check(x, "eps")
        if self.prior is not None and hasattr(self.prior, "check"):
            self.prior.check(x)

    def log_density(self, eps: list[Tensor]) -> Tensor:
        z = self.backbone._eps_to_z(eps, self.t)
        f = self.prior(z) if self.prior is not None else 0.0
        if self.target == "exact":
            return f - 0.5 * sum(flat_sum(e**2) for e in eps)
        log_p = self.backbone._log_prior(z)
        if self.t != 1.0:  # temper every conditional: N(mu_i, (t sigma_i)^2)
            t2, dim = self.t**2, sum(math.prod(e.shape[1:]) for e in eps)
            log_p = log_p + 0.5 * (t2 - 1.0) * sum(flat_sum(e**2) for e in eps)
            log_p = log_p - dim * math.log(self.t)
        return f + log_p

    def transform(self, eps: list[Tensor]) -> list[Tensor]:
        return self.backbone._eps_to_z(eps, self.t)

    def init(self, batch: int) -> list[Tensor]:
        r"""Draws starting points :math:`\epsilon \sim \mathcal{N}(0, I)` with ``generator``."""

        return self.backbone.sample_eps(batch, generator=self.generator)


class PosteriorLangevin(Langevin):
    r"""Creates a z-space Langevin sampler for the posterior under the EBM prior.

    .. math:: \log \pi(z \mid x) = \log p(x \mid z) + f_a(z) + \log p_b(z) + c

    used for posterior sampling in MLE learning (short-run chains from :math:`q(z \mid x)`
    or from a persistent state). The energy is called as a module, ``prior(z)``.

    Arguments:
        prior: The energy :math:`f_a`, or ``None`` for the Gaussian-prior posterior.
        backbone: The backbone providing :math:`p(x \mid z)` and :math:`p_b`.
        x: Observations, with shape :math:`(B, *)`.
        kwargs: The options of :class:`Langevin`.
    """

    def __init__(
        self,
        prior: Callable[[list[Tensor]], Tensor] | None,
        backbone: Backbone,
        x: Tensor,
        **kwargs,
    ):
        if not isinstance(backbone, Backbone):
            raise TypeError(f"backbone must be a Backbone, got {type(backbone).__name__}")
        modules = [m for m in (prior, backbone) if isinstance(m, nn.Module)]
        super().__init__(modules=modules, **kwargs)
        self.prior, self.backbone, self.x = prior, backbone, x

    def validate(self, z: list[Tensor]) -> None:
        batch = check_latents(z, self.backbone.latent_shapes, "z")
        if batch != self.x.shape[0]:
            raise ValueError(f"z has batch size {batch} but x has {self.x.shape[0]}")

    def log_density(self, z: list[Tensor]) -> Tensor:
        out = self.backbone._log_likelihood(self.x, z) + self.backbone._log_prior(z)
        return out + self.prior(z) if self.prior is not None else out

    def init(self) -> list[Tensor]:
        r"""Starts from a posterior sample :math:`z \sim q(z \mid x)`."""

        with torch.no_grad():
            return [z.detach() for z in self.backbone.posterior(self.x).z]
