r"""Out-of-distribution scores: :math:`L^{>k}`, :math:`LLR^{>k}` and their detection metrics."""

from __future__ import annotations

__all__ = [
    "GroupwiseBackbone",
    "OODMetrics",
    "OODScore",
    "PairedInterval",
    "auprc",
    "auroc",
    "fpr_at_tpr",
    "hierarchical_bound",
    "llr_score",
    "log_joint_score",
    "ood_metrics",
    "paired_auroc_difference",
]

import math
from collections.abc import Callable, Sequence
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
from torch import Tensor

from .backbone import Backbone, GroupwiseBackbone, check_k
from .likelihood import LogPartition
from .sample import EpsLangevin

Energy = Callable[[list[Tensor]], Tensor]
ArrayLike = Sequence[float] | np.ndarray | Tensor


class OODScore(NamedTuple):
    r"""Likelihood-ratio score of one batch.

    Attributes:
        elbo: :math:`L^{>0}(x)`, with shape :math:`(B,)`.
        elbo_k: :math:`L^{>k}(x)`, with shape :math:`(B,)`.
        llr: :math:`LLR^{>k}(x) = L^{>0}(x) - L^{>k}(x)`, with shape :math:`(B,)`; larger means
            more out-of-distribution.
    """

    elbo: Tensor
    elbo_k: Tensor
    llr: Tensor


class OODMetrics(NamedTuple):
    r"""Detection metrics, out-of-distribution data as the positive class.

    Attributes:
        auroc: Area under the ROC curve.
        auprc: Area under the precision-recall curve (average precision).
        fpr80: False-positive rate at the first threshold reaching 80% true-positive rate.
    """

    auroc: float
    auprc: float
    fpr80: float


class PairedInterval(NamedTuple):
    r"""A paired difference of a metric with its bootstrap percentile interval.

    Attributes:
        difference: The metric of the second scores minus that of the first, on all data.
        low: Lower end of the interval.
        high: Upper end of the interval.
        level: Coverage of the interval (e.g. 0.95).
    """

    difference: float
    low: float
    high: float
    level: float


# -- scores -------------------------------------------------------------------------------------


def _check_samples(samples: int) -> None:
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples must be a positive int, got {samples!r}")


def _log_mean_exp(x: Tensor) -> Tensor:
    return torch.logsumexp(x, dim=0) - math.log(x.shape[0])


def _log_z_value(log_z: float | LogPartition | None) -> float:
    if log_z is None:
        return 0.0
    value = float(log_z.value if isinstance(log_z, LogPartition) else log_z)
    if not math.isfinite(value):
        raise ValueError(f"log_z must be finite, got {value!r}")
    return value


def _energy(prior: Energy | None, z: list[Tensor]) -> Tensor | float:
    return 0.0 if prior is None else prior(z)


def _lower_eps(
    backbone: Backbone, ref: Tensor, top: int, generator: torch.Generator | None
) -> list[Tensor]:
    r"""Draws :math:`\epsilon_{\leq k} \sim \mathcal{N}(0, I)` for the bottom groups only."""

    return [
        torch.randn((ref.shape[0], *s), generator=generator, device=ref.device, dtype=ref.dtype)
        for s in backbone.latent_shapes[top:]
    ]


def _log_mean_exp_f(
    backbone: GroupwiseBackbone,
    prior: Energy,
    eps_top: list[Tensor],
    draws: int,
    generator: torch.Generator | None,
) -> Tensor:
    r""":math:`\log \frac{1}{M} \sum_m e^{f(z_{>k}, z^m_{\leq k})}`,
    :math:`z^m_{\leq k} \sim p_b(z_{\leq k} \mid z_{>k})`: the inner Monte Carlo estimate of
    :math:`\log E_{p_b(z_{\leq k} | z_{>k})}[e^{f(z)}]`, so that
    :math:`\log p_{a,b}(z_{>k}) = \log p_b(z_{>k}) + \text{this} - \log Z`."""

    terms = []
    for _ in range(draws):
        lower = _lower_eps(backbone, eps_top[0], len(eps_top), generator)
        terms.append(prior(backbone.eps_to_z([*eps_top, *lower])))
    return _log_mean_exp(torch.stack(terms))


def _langevin_options(prior: Energy, sampler_options: dict[str, Any] | None) -> dict[str, Any]:
    options = dict(getattr(prior, "sampler_config", None) or {})
    options.update(sampler_options or {})
    for key in ("step_size", "steps"):
        if key not in options:
            raise ValueError(
                f"bottom='langevin' runs the chain the prior was trained with, but the prior "
                f"records no {key!r} in its sampler_config; pass sampler_options="
                "dict(step_size=..., steps=...)"
            )
    if float(options.get("t", 1.0)) != 1.0:
        raise ValueError(
            f"L>k scores the untempered prior: the chain's temperature must be 1, got "
            f"t={options['t']!r} (override it with sampler_options=dict(t=1.0))"
        )
    options.pop("t", None)
    options.setdefault("trace", False)
    return options


@torch.no_grad()
def hierarchical_bound(
    backbone: GroupwiseBackbone,
    x: Tensor,
    k: int,
    prior: Energy | None = None,
    samples: int = 1,
    lower: Literal["mode", "sample"] = "mode",
    bottom: Literal["base", "langevin"] = "base",
    marginal_samples: int = 16,
    log_z: float | LogPartition | None = None,
    generator: torch.Generator | None = None,
    sampler_options: dict[str, Any] | None = None,
) -> Tensor:
    r"""Returns the :math:`L^{>k}` bound of Havtorn et al. (2021) under the Gaussian prior
    (``prior=None``) or the joint EBM prior, with one and the same estimator.

    The top :math:`L - k` groups come from the posterior, the :math:`k` bottom groups from the
    prior's conditional given them, and the importance weights leave the bottom groups out:

    .. math:: L^{>k}(x) = \log \frac{1}{S} \sum_{s=1}^S
              \frac{p(x \mid z^s) \, p(z^s_{>k})}{q(z^s_{>k} \mid x)}, \qquad
              z^s_{>k} \sim q(z_{>k} \mid x), \quad
              z^s_{\leq k} \sim p(z_{\leq k} \mid z^s_{>k}).

    Under the EBM prior :math:`p_{a,b}(z) = e^{f(z)} p_b(z) / Z` the marginal of the top
    groups is :math:`p_{a,b}(z_{>k}) = p_b(z_{>k})\, E_{p_b(z_{\leq k} | z_{>k})}[e^{f(z)}] / Z`
    and :math:`p_{a,b}(z_{>k})\, E_{p_{a,b}(z_{\leq k} | z_{>k})}[p(x|z)] =
    p_b(z_{>k})\, E_{p_b(z_{\leq k} | z_{>k})}[p(x|z)\, e^{f(z)}] / Z`, so with bottom draws from
    the *base* conditional (``bottom="base"``, the default) each weight is

    .. math:: w^s = \frac{p_b(z^s_{>k})}{q(z^s_{>k} \mid x)} \cdot
              \frac{1}{M} \sum_{m=1}^M p(x \mid z^{s,m})\, e^{f(z^{s,m})} \cdot \frac{1}{Z},
              \qquad z^{s,m}_{\leq k} \sim p_b(z_{\leq k} \mid z^s_{>k}),

    an unbiased estimate of the integrand (``M = marginal_samples`` inner draws). With
    :math:`f = 0` this *is* Havtorn's weight (for ``M = 1``, on the same draws), which is why
    the base conditional is the default: the two priors differ only by the factor
    :math:`e^{f}`, there is no sampler bias (no chain has to converge) and no step size to tune.
    Its cost: when :math:`e^{f}` varies strongly over :math:`p_b(z_{\leq k} | z_{>k})` the inner
    average needs more draws. ``bottom="langevin"`` draws :math:`z_{\leq k}` from the EBM
    conditional instead (conditional eps-space Langevin, the top groups' :math:`\epsilon` held
    fixed, started from :math:`\mathcal{N}(0, I)`, with the settings the prior was trained
    with: ``prior.sampler_config``, overridden by ``sampler_options``) and weights them by
    :math:`p(x \mid z)\, p_b(z_{>k}) \hat E[e^f] / q(z_{>k} \mid x)`, with :math:`\hat E[e^f]`
    the same inner average over base draws (it is needed for the marginal either way); it is
    exact only for chains at equilibrium. With ``prior=None`` the conditional is the base one,
    which is drawn exactly (the chain's target, without the chain).

    ``lower="mode"`` (hvae-oodd's ``use_mode``, used by its ``scripts/ood-llr.py``, so the
    default) decodes at the mode of the base conditional, :math:`\epsilon_{\leq k} = 0`, for
    both priors; the EBM prior then enters through its top marginal only,
    :math:`w^s = p(x | z^s_{mode})\, p_b(z^s_{>k})\, \hat E[e^f] / (Z\, q(z^s_{>k} | x))`.
    ``lower="sample"`` draws the bottom groups as above. At :math:`k = 0` the score is the
    importance-weighted bound :math:`\log \frac{1}{S}\sum_s p(x|z^s) e^{f(z^s)} p_b(z^s) /
    (Z\, q(z^s|x))`, :math:`z^s \sim q(z \mid x)`.

    :math:`\log Z` is the same for every :math:`x` and every :math:`k`: it cancels in
    :math:`LLR^{>k} = L^{>0} - L^{>k}` and shifts every :math:`L^{>k}` alike, so no detection
    metric depends on it. It matters only for reading :math:`L^{>k}` in nats, e.g. to compare
    the EBM prior's :math:`L^{>0}` with the Gaussian one; pass ``log_z`` for that (then the
    value carries the uncertainty of :math:`\log \hat Z`, see
    :func:`ebm_prior.log_partition`). Without it the EBM scores are reported up to
    :math:`-\log Z`.

    The bottom groups are written through the contract: :math:`\epsilon_{>k}` of the posterior
    sample (:meth:`Backbone.z_to_eps`) with new :math:`\epsilon_{\leq k}`, then
    :meth:`Backbone.eps_to_z`.

    Arguments:
        backbone: A :class:`GroupwiseBackbone` (needs :math:`\log q` of the top groups alone).
        x: A data batch with shape :math:`(B, *)`.
        k: Number of bottom groups drawn from the prior, :math:`0 \leq k < L`.
        prior: The energy :math:`f_a` (e.g. a :class:`JointEBMPrior`), or ``None`` for the
            Gaussian prior.
        samples: Number of importance samples :math:`S`.
        lower: ``"mode"`` or ``"sample"`` (above).
        bottom: ``"base"`` or ``"langevin"`` (above; only with ``lower="sample"``).
        marginal_samples: Inner draws :math:`M` per importance sample, for
            :math:`\hat E[e^f]` (and the bottom groups with ``"sample"``, ``"base"``).
        log_z: :math:`\log Z` of the EBM prior (a float or a :class:`LogPartition`), subtracted
            from the score; ``None`` leaves it out.
        generator: Random generator for the bottom groups and the chains; posterior draws use
            the backbone's.
        sampler_options: Overrides of ``prior.sampler_config`` for ``bottom="langevin"``.

    Returns:
        :math:`L^{>k}(x)`, with shape :math:`(B,)`.

    References:
        | Hierarchical VAEs Know What They Don't Know (Havtorn et al., 2021)
        | https://arxiv.org/abs/2102.08248
        | Learning Joint Latent Space EBM Prior Model for Multi-layer Generator
          (Cui et al., 2023)
        | https://arxiv.org/abs/2306.06323

    Example:
        >>> from ebm_prior import HierarchicalVAE, JointEBMPrior
        >>> vae = HierarchicalVAE.from_config("digits").eval()
        >>> prior = JointEBMPrior(vae.latent_shapes, nef=16)
        >>> x = torch.rand(4, 1, 8, 8).bernoulli()
        >>> hierarchical_bound(vae, x, k=1, prior=prior, samples=2).shape
        torch.Size([4])
    """

    if not isinstance(backbone, GroupwiseBackbone):
        raise TypeError(
            "hierarchical_bound needs log q of the top groups alone, which the base Backbone "
            f"contract does not give; {type(backbone).__name__} is not a GroupwiseBackbone "
            "(implement posterior_top and log_prior_groups, see ebm_prior.GroupwiseBackbone)"
        )
    n = backbone.num_groups
    check_k(k, n)
    _check_samples(samples)
    if lower not in ("mode", "sample"):
        raise ValueError(f"lower must be 'mode' or 'sample', got {lower!r}")
    if bottom not in ("base", "langevin"):
        raise ValueError(f"bottom must be 'base' or 'langevin', got {bottom!r}")
    if bottom == "langevin" and lower != "sample":
        raise ValueError("bottom='langevin' draws the bottom groups: use it with lower='sample'")
    if isinstance(marginal_samples, bool) or not isinstance(marginal_samples, int):
        raise ValueError(f"marginal_samples must be a positive int, got {marginal_samples!r}")
    if marginal_samples < 1:
        raise ValueError(f"marginal_samples must be a positive int, got {marginal_samples!r}")
    shift = _log_z_value(log_z) if prior is not None else 0.0
    if prior is None and log_z is not None:
        raise ValueError("log_z belongs to an EBM prior: pass prior=... or leave log_z out")
    sampler = None
    if bottom == "langevin" and k > 0 and prior is not None:  # f = 0: drawn exactly below
        options = _langevin_options(prior, sampler_options)
        sampler = EpsLangevin(prior, backbone, generator=generator, **options)
    top = n - k
    # all posterior draws first, so that the bottom groups' draws (from ``generator``, or the
    # global stream without one) never shift them: both priors see the same posterior samples
    posts = [backbone.posterior_top(x, k) for _ in range(samples)]
    out = []
    for post in posts:
        if k == 0:
            z = list(post.z)
            lw = backbone.log_likelihood(x, z) + backbone.log_prior(z) - post.log_q
            out.append(lw + _energy(prior, z))
            continue
        batch, ref = post.z[0].shape[0], post.z[0]
        zeros = [ref.new_zeros((batch, *s)) for s in backbone.latent_shapes[top:]]
        eps_top = backbone.z_to_eps([*post.z, *zeros])[:top]  # triangular: zeros stay below
        z_mode = backbone.eps_to_z([*eps_top, *zeros])
        lw = sum(backbone.log_prior_groups(z_mode)[:top]) - post.log_q
        if lower == "mode":
            lw = lw + backbone.log_likelihood(x, z_mode)
            if prior is not None:
                lw = lw + _log_mean_exp_f(backbone, prior, eps_top, marginal_samples, generator)
        elif sampler is None:  # bottom groups from the base conditional, weighted by e^f
            terms = []
            for _ in range(marginal_samples):
                z = backbone.eps_to_z([*eps_top, *_lower_eps(backbone, ref, top, generator)])
                terms.append(backbone.log_likelihood(x, z) + _energy(prior, z))
            lw = lw + _log_mean_exp(torch.stack(terms))
        else:  # bottom groups from the EBM conditional
            start = _lower_eps(backbone, ref, top, generator)
            z = sampler([*eps_top, *start], fixed_groups=range(top)).z
            lw = lw + backbone.log_likelihood(x, z)
            lw = lw + _log_mean_exp_f(backbone, prior, eps_top, marginal_samples, generator)
        out.append(lw)
    return _log_mean_exp(torch.stack(out)) - shift


@torch.no_grad()
def log_joint_score(
    backbone: Backbone,
    x: Tensor,
    prior: Energy | None = None,
    samples: int = 1,
    posterior: Literal["encoder", "langevin"] = "encoder",
    *,
    posterior_steps: int = 40,
    posterior_step_size: float = 0.1,
    generator: torch.Generator | None = None,
    return_energy: bool = False,
    **sampler_options: Any,
) -> Tensor | tuple[Tensor, Tensor]:
    r"""Returns the expected log joint at posterior samples (Pang et al.'s decision function).

    .. math:: s(x) = \frac{1}{S} \sum_{s=1}^S \Big[\log p(x \mid z^s) + \log p_b(z^s)
              + f_a(z^s)\Big]

    with :math:`z^s \sim q(z \mid x)` (``posterior="encoder"``: the backbone's inference
    network) or :math:`z^s` drawn by ``posterior_steps`` of z-space Langevin on the model's own
    posterior :math:`\log p(x \mid z) + f_a(z) + \log p_b(z)` from :math:`\mathcal{N}(0, I)`
    (``posterior="langevin"``, :func:`~ebm_prior.sample_posterior`; the sampler of
    maximum-likelihood learning, for models learned without an encoder, as in Pang et al.).
    An unnormalised score (:math:`\log Z` left out, the same for every :math:`x`), used for
    held-out-class anomaly detection; it is not a bound on :math:`\log p(x)`. For the
    out-of-distribution ratio :math:`LLR^{>k}` use :func:`llr_score`.

    Arguments:
        backbone: The backbone.
        x: A data batch with shape :math:`(B, *)`.
        prior: The energy :math:`f_a`, or ``None`` for the Gaussian prior.
        samples: Number of posterior samples :math:`S` (independent chains with
            ``"langevin"``).
        posterior: Where :math:`z^s` comes from: ``"encoder"`` or ``"langevin"``.
        posterior_steps, posterior_step_size: The chains' length and step size
            (``"langevin"``).
        generator: Seeds the chains (``"langevin"``).
        return_energy: Also return the energy's share of the score,
            :math:`\frac{1}{S} \sum_s f_a(z^s)` at the same samples (zeros without a prior):
            how much the prior moves each image's score, and whether it reorders them.
        sampler_options: Further options of :func:`~ebm_prior.sample_posterior` (``mala``,
            ``clip_grad``, ...).

    Returns:
        :math:`s(x)`, with shape :math:`(B,)`; with ``return_energy``, the pair
        :math:`(s(x), \bar f(x))`, both with shape :math:`(B,)`.

    References:
        | Learning Latent Space Energy-Based Prior Model (Pang et al., 2020)
        | https://arxiv.org/abs/2006.08205
    """

    from .objectives import sample_posterior

    _check_samples(samples)
    if posterior not in ("encoder", "langevin"):
        raise ValueError(f"posterior must be 'encoder' or 'langevin', got {posterior!r}")
    if posterior == "encoder" and (sampler_options or generator is not None):
        raise ValueError("generator and sampler options apply to posterior='langevin' only")
    total, energy = 0.0, 0.0
    for _ in range(samples):
        if posterior == "encoder":
            z = backbone.posterior(x).z
        else:
            z = sample_posterior(
                prior, backbone, x, steps=posterior_steps, step_size=posterior_step_size,
                generator=generator, trace=False, **sampler_options,
            ).z  # fmt: skip
        with torch.no_grad():
            f = _energy(prior, z)
            total = total + backbone.log_likelihood(x, z) + backbone.log_prior(z) + f
            energy = energy + f
    if not return_energy:
        return total / samples
    return total / samples, torch.zeros_like(total) + energy / samples


def llr_score(
    backbone: GroupwiseBackbone,
    x: Tensor,
    k: int,
    prior: Energy | None = None,
    samples: int = 1,
    **options: Any,
) -> OODScore:
    r"""Returns :math:`L^{>0}`, :math:`L^{>k}` and :math:`LLR^{>k} = L^{>0} - L^{>k}`.

    Both bounds come from :func:`hierarchical_bound` with the same prior and options, so the
    Gaussian (``prior=None``) and the EBM scores are the same estimator; :math:`\log Z`
    cancels in the ratio. A larger :math:`LLR^{>k}` means more out-of-distribution.

    Arguments:
        backbone: A :class:`GroupwiseBackbone`.
        x: A data batch with shape :math:`(B, *)`.
        k: Number of bottom groups drawn from the prior, :math:`1 \leq k < L` (``k = 0`` gives
            a zero ratio, allowed for tables).
        prior: The energy :math:`f_a`, or ``None`` for the Gaussian prior.
        samples: Importance samples per bound.
        options: Further keyword arguments of :func:`hierarchical_bound` (``lower``,
            ``bottom``, ``marginal_samples``, ``generator``, ``sampler_options``).

    Returns:
        An :class:`OODScore`.

    Example:
        >>> from ebm_prior import HierarchicalVAE
        >>> vae = HierarchicalVAE.from_config("digits").eval()
        >>> x = torch.rand(4, 1, 8, 8).bernoulli()
        >>> score = llr_score(vae, x, k=1, samples=2)
        >>> score.llr.shape
        torch.Size([4])
    """

    if "log_z" in options:
        raise ValueError("log Z cancels in the likelihood ratio: do not pass log_z")
    elbo = hierarchical_bound(backbone, x, 0, prior, samples, **options)
    elbo_k = elbo if k == 0 else hierarchical_bound(backbone, x, k, prior, samples, **options)
    return OODScore(elbo, elbo_k, elbo - elbo_k)


# -- metrics ------------------------------------------------------------------------------------


def _as_array(x: ArrayLike, name: str) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach().cpu().double().numpy()
    a = np.asarray(x, dtype=np.float64).reshape(-1)
    if a.size == 0:
        raise ValueError(f"{name} is empty")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} has {int((~np.isfinite(a)).sum())} non-finite scores")
    return a


def _curve(scores_in: ArrayLike, scores_out: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    r"""Cumulative true and false positives at each distinct threshold, highest first."""

    neg = _as_array(scores_in, "scores_in")
    pos = _as_array(scores_out, "scores_out")
    scores = np.concatenate([pos, neg])
    labels = np.concatenate([np.ones_like(pos), np.zeros_like(neg)])
    order = np.argsort(-scores, kind="mergesort")
    scores, labels = scores[order], labels[order]
    last = np.r_[np.nonzero(np.diff(scores))[0], scores.size - 1]  # end of each tie block
    tp = np.cumsum(labels)[last]
    fp = (last + 1) - tp
    return tp, fp


def auroc(scores_in: ArrayLike, scores_out: ArrayLike) -> float:
    r"""Returns the area under the ROC curve, out-of-distribution as positives.

    Equal to :math:`P(s_{out} > s_{in}) + \frac{1}{2} P(s_{out} = s_{in})` (ties count half).

    Arguments:
        scores_in: Scores of in-distribution data, shape :math:`(N,)`.
        scores_out: Scores of out-of-distribution data, shape :math:`(M,)`; higher scores
            should mean more out-of-distribution.
    """

    tp, fp = _curve(scores_in, scores_out)
    tpr = np.r_[0.0, tp / tp[-1]]
    fpr = np.r_[0.0, fp / fp[-1]]
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))


def auprc(scores_in: ArrayLike, scores_out: ArrayLike) -> float:
    r"""Returns the average precision, out-of-distribution as positives.

    .. math:: AP = \sum_n (R_n - R_{n-1}) P_n

    over the distinct thresholds :math:`n` (the step-wise area, as scikit-learn's
    ``average_precision_score``).
    """

    tp, fp = _curve(scores_in, scores_out)
    precision = tp / (tp + fp)
    recall = np.r_[0.0, tp / tp[-1]]
    return float(np.sum(np.diff(recall) * precision))


def fpr_at_tpr(scores_in: ArrayLike, scores_out: ArrayLike, tpr: float = 0.8) -> float:
    r"""Returns the false-positive rate at the first threshold whose true-positive rate
    reaches ``tpr`` (FPR80 for ``tpr=0.8``), out-of-distribution as positives.

    Every distinct threshold counts (scikit-learn's ``roc_curve(..., drop_intermediate=False)``).
    hvae-oodd's ``scripts/ood-llr-results.py`` reads FPR80 off the default
    ``drop_intermediate=True`` curve, which can drop that threshold when it lies on a straight
    segment of the curve and then reports a larger rate.
    """

    if not 0 < tpr <= 1:
        raise ValueError(f"tpr must be in (0, 1], got {tpr!r}")
    tp, fp = _curve(scores_in, scores_out)
    rates = tp / tp[-1]
    i = int(np.argmax(rates >= tpr - 1e-12))
    return float(fp[i] / fp[-1]) if fp[-1] > 0 else 0.0


def ood_metrics(scores_in: ArrayLike, scores_out: ArrayLike) -> OODMetrics:
    r"""Returns AUROC, AUPRC and FPR80 of separating ``scores_out`` (positives, higher) from
    ``scores_in``.

    Example:
        >>> ood_metrics([0.1, 0.2, 0.3], [0.25, 0.9, 1.0])
        OODMetrics(auroc=0.888..., auprc=0.916..., fpr80=0.333...)
    """

    return OODMetrics(
        auroc(scores_in, scores_out),
        auprc(scores_in, scores_out),
        fpr_at_tpr(scores_in, scores_out, 0.8),
    )


def paired_auroc_difference(
    first: tuple[ArrayLike, ArrayLike],
    second: tuple[ArrayLike, ArrayLike],
    resamples: int = 2000,
    level: float = 0.95,
    seed: int = 0,
    metric: Literal["auroc", "auprc"] | Callable[[np.ndarray, np.ndarray], float] = "auroc",
) -> PairedInterval:
    r"""Returns :math:`AUROC_2 - AUROC_1` of two scores of the *same* data, with a paired
    bootstrap percentile interval (or the same for another ``metric``: ``"auprc"`` for
    :func:`auprc`, or any ``metric(scores_in, scores_out)``).

    Each resample draws the in-distribution and the out-of-distribution points with
    replacement (separately, keeping the class sizes) and scores both methods on the same draw,
    so the interval reflects the variation of the difference, not of each AUROC.

    Arguments:
        first: ``(scores_in, scores_out)`` of the first method, shapes :math:`(N,)`, :math:`(M,)`.
        second: The same points scored by the second method.
        resamples: Number of bootstrap resamples.
        level: Coverage of the percentile interval.
        seed: Seed of the resampling.
        metric: ``"auroc"``, ``"auprc"`` or a function of ``(scores_in, scores_out)``.

    Example:
        >>> g = np.random.default_rng(0)
        >>> a_in, a_out = g.normal(size=300), g.normal(0.5, size=300)
        >>> b_in, b_out = a_in + 0.1 * g.normal(size=300), a_out + 0.5
        >>> ci = paired_auroc_difference((a_in, a_out), (b_in, b_out))
        >>> ci.low > 0
        True
    """

    a_in, a_out = _as_array(first[0], "first[0]"), _as_array(first[1], "first[1]")
    b_in, b_out = _as_array(second[0], "second[0]"), _as_array(second[1], "second[1]")
    if a_in.shape != b_in.shape or a_out.shape != b_out.shape:
        raise ValueError(
            "paired scores must score the same points: got in-distribution sizes "
            f"{a_in.size} and {b_in.size}, out-of-distribution sizes {a_out.size} and {b_out.size}"
        )
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    if isinstance(resamples, bool) or not isinstance(resamples, int) or resamples < 1:
        raise ValueError(f"resamples must be a positive int, got {resamples!r}")
    metric = {"auroc": auroc, "auprc": auprc}.get(metric, metric)  # type: ignore[arg-type]
    if not callable(metric):
        raise ValueError(f"metric must be 'auroc', 'auprc' or a callable, got {metric!r}")
    rng = np.random.default_rng(seed)
    diffs = np.empty(resamples)
    for r in range(resamples):
        i = rng.integers(0, a_in.size, a_in.size)
        o = rng.integers(0, a_out.size, a_out.size)
        diffs[r] = metric(b_in[i], b_out[o]) - metric(a_in[i], a_out[o])
    tail = (1 - level) / 2
    low, high = np.quantile(diffs, [tail, 1 - tail])
    return PairedInterval(
        metric(b_in, b_out) - metric(a_in, a_out), float(low), float(high), float(level)
    )
