r"""Out-of-distribution scores: :math:`L^{>k}`, :math:`LLR^{>k}` and their detection metrics."""

from __future__ import annotations

__all__ = [
    "GroupwiseBackbone",
    "OODMetrics",
    "OODScore",
    "auprc",
    "auroc",
    "fpr_at_tpr",
    "hierarchical_bound",
    "joint_score",
    "llr_score",
    "ood_metrics",
]

import abc
import math
from collections.abc import Callable, Sequence
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
from torch import Tensor

from .backbone import Backbone, Posterior
from .sample import EpsLangevin

Energy = Callable[[list[Tensor]], Tensor]
ArrayLike = Sequence[float] | np.ndarray | Tensor


class GroupwiseBackbone(Backbone):
    r"""A backbone that also exposes its posterior and prior *per group*.

    The hierarchical bound of Havtorn et al. (2021), :func:`hierarchical_bound`, needs
    :math:`\log q(z_{>k} \mid x)` for the top groups alone and the prior terms
    :math:`\log p_b(z_i \mid z_{<i})` one by one; the base contract only gives their sums.
    Adapters that can split them subclass this class instead of :class:`Backbone` and implement
    :meth:`_posterior_top` and :meth:`_log_prior_groups`.
    """

    @abc.abstractmethod
    def _posterior_top(self, x: Tensor, k: int) -> Posterior: ...

    @abc.abstractmethod
    def _log_prior_groups(self, z: list[Tensor]) -> list[Tensor]: ...

    def posterior_top(self, x: Tensor, k: int) -> Posterior:
        r"""Draws the top :math:`L - k` groups from :math:`q` and returns their log-density.

        Backbones whose inference runs bottom-up (hvae-oodd's ``VAE``) condition the top groups
        on the *mode* of :math:`q` for the :math:`k` bottom groups, as hvae-oodd does.

        Arguments:
            x: A data batch with shape :math:`(B, *)`.
            k: Number of bottom groups left out, :math:`0 \leq k < L`.

        Returns:
            A :class:`Posterior` whose ``z`` lists the :math:`L - k` top groups (top first) and
            whose ``log_q`` is :math:`\log q(z_{>k} \mid x)`, with shape :math:`(B,)`.
        """

        _check_k(k, self.num_groups)
        if not isinstance(x, Tensor) or x.dim() < 2:
            raise ValueError("x must be a batch-first tensor with shape (B, *)")
        return self._posterior_top(x, int(k))

    def log_prior_groups(self, z: Sequence[Tensor]) -> list[Tensor]:
        r"""Returns :math:`\log p_b(z_i \mid z_{<i})` per group (top first), each :math:`(B,)`."""

        self.check(z, "z")
        return list(self._log_prior_groups(list(z)))


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


# -- scores -------------------------------------------------------------------------------------


def _check_k(k: int, num_groups: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < num_groups:
        raise ValueError(
            f"k must be an int with 0 <= k < {num_groups} (the number of latent groups), got {k!r}"
        )


def _check_samples(samples: int) -> None:
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples must be a positive int, got {samples!r}")


def _log_mean_exp(x: Tensor) -> Tensor:
    return torch.logsumexp(x, dim=0) - math.log(x.shape[0])


@torch.no_grad()
def hierarchical_bound(
    backbone: GroupwiseBackbone,
    x: Tensor,
    k: int,
    samples: int = 1,
    lower: Literal["mode", "sample"] = "mode",
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""Returns the :math:`L^{>k}` bound of Havtorn et al. (2021) under the Gaussian prior.

    The top :math:`L - k` groups come from the posterior, the :math:`k` bottom groups from the
    conditional prior given them, and the importance weights leave the bottom groups out:

    .. math:: L^{>k}(x) = \log \frac{1}{S} \sum_{s=1}^S
              \frac{p(x \mid z^s) \, p_b(z^s_{>k})}{q(z^s_{>k} \mid x)}, \qquad
              z^s_{>k} \sim q(z_{>k} \mid x), \quad
              z^s_{\leq k} \sim p_b(z_{\leq k} \mid z^s_{>k}).

    Here :math:`z_{>k}` are the top :math:`L - k` entries of the latent list. With
    ``lower="mode"`` (hvae-oodd's choice, ``use_mode`` in its ``scripts/ood-llr.py``) the bottom
    groups are the means of their conditionals, :math:`\epsilon_{\leq k} = 0`; with
    ``"sample"`` they are drawn, :math:`\epsilon_{\leq k} \sim \mathcal{N}(0, I)`. At
    :math:`k = 0` this is the importance-weighted ELBO.

    The bottom groups are written through the contract: :math:`\epsilon_{>k}` of the posterior
    sample (:meth:`Backbone.z_to_eps`) with new :math:`\epsilon_{\leq k}`, then
    :meth:`Backbone.eps_to_z`.

    Arguments:
        backbone: A :class:`GroupwiseBackbone` (needs :math:`\log q` of the top groups alone).
        x: A data batch with shape :math:`(B, *)`.
        k: Number of bottom groups drawn from the prior, :math:`0 \leq k < L`.
        samples: Number of importance samples :math:`S`.
        lower: ``"mode"`` or ``"sample"`` (above).
        generator: Random generator for ``lower="sample"``; posterior draws use the backbone's.

    Returns:
        :math:`L^{>k}(x)`, with shape :math:`(B,)`.

    References:
        | Hierarchical VAEs Know What They Don't Know (Havtorn et al., 2021)
        | https://arxiv.org/abs/2102.08248
    """

    if not isinstance(backbone, GroupwiseBackbone):
        raise TypeError(
            "hierarchical_bound needs log q of the top groups alone, which the base Backbone "
            f"contract does not give; {type(backbone).__name__} is not a GroupwiseBackbone "
            "(use joint_score for any backbone)"
        )
    n = backbone.num_groups
    _check_k(k, n)
    _check_samples(samples)
    if lower not in ("mode", "sample"):
        raise ValueError(f"lower must be 'mode' or 'sample', got {lower!r}")
    top = n - k
    out = []
    for _ in range(samples):
        post = backbone.posterior_top(x, k)
        batch = post.z[0].shape[0]
        if k == 0:
            z = list(post.z)
        else:
            ref = post.z[0]
            zeros = [ref.new_zeros((batch, *s)) for s in backbone.latent_shapes[top:]]
            eps = backbone.z_to_eps([*post.z, *zeros])  # triangular: zeros do not reach the top
            if lower == "mode":
                lower_eps = zeros
            else:
                lower_eps = backbone.sample_eps(
                    batch, generator, post.z[0].device, post.z[0].dtype
                )[top:]
            z = backbone.eps_to_z([*eps[:top], *lower_eps])
        log_p = sum(backbone.log_prior_groups(z)[:top])
        out.append(backbone.log_likelihood(x, z) + log_p - post.log_q)
    return _log_mean_exp(torch.stack(out))


def joint_score(
    backbone: Backbone,
    x: Tensor,
    k: int,
    prior: Energy | None = None,
    samples: int = 1,
    step_size: float = 0.1,
    steps: int = 50,
    mala: bool = False,
    generator: torch.Generator | None = None,
    **sampler_options: Any,
) -> Tensor:
    r"""Returns :math:`L^{>k}` of the main paper's Eq. 20, for any backbone.

    .. math:: L^{>k}(x) = \mathbb{E}_{z_{>k} \sim q(z \mid x),\,
              z_{\leq k} \sim p_{a,b}(z_{\leq k} \mid z_{>k})}
              \Big[\log p(x \mid z) + \log p_b(z) + \sum_i f_{a_i}(z_i)\Big]

    :math:`z_{>k}` are the top :math:`L - k` groups of a posterior sample; the :math:`k` bottom
    groups are drawn from the EBM prior conditioned on them by eps-space Langevin
    (:class:`EpsLangevin` with the top groups' :math:`\epsilon` held fixed, started from
    :math:`\epsilon_{\leq k} \sim \mathcal{N}(0, I)`). With ``prior=None`` the energy is zero
    and the bottom groups are exact draws of the Gaussian conditional :math:`p_b`. The
    expectation is a Monte Carlo average over ``samples`` draws. :math:`\log Z` is left out:
    it does not depend on :math:`x` and cancels in :math:`LLR^{>k}`.

    Arguments:
        backbone: The backbone.
        x: A data batch with shape :math:`(B, *)`.
        k: Number of bottom groups drawn from the prior, :math:`0 \leq k < L`.
        prior: The energy :math:`f_a` (e.g. a :class:`JointEBMPrior`), or ``None``.
        samples: Number of Monte Carlo samples.
        step_size: Langevin step size :math:`s` (the noise standard deviation).
        steps: Langevin steps per sample.
        mala: Metropolis-adjust the Langevin chains.
        generator: Random generator for the bottom groups' starting noise and the chains.
        sampler_options: Further options of :class:`EpsLangevin` (e.g. ``clip_grad``).

    Returns:
        :math:`L^{>k}(x)`, with shape :math:`(B,)`.

    References:
        | Learning Joint Latent Space EBM Prior Model for Multi-layer Generator
          (Cui et al., 2023)
        | https://arxiv.org/abs/2306.06323
    """

    n = backbone.num_groups
    _check_k(k, n)
    _check_samples(samples)
    top = n - k
    sampler = None
    if prior is not None and k > 0:
        sampler = EpsLangevin(
            prior,
            backbone,
            step_size=step_size,
            steps=steps,
            mala=mala,
            generator=generator,
            **sampler_options,
        )
    total = 0.0
    for _ in range(samples):
        with torch.no_grad():
            post = backbone.posterior(x)
            eps = backbone.z_to_eps(post.z)
        if k > 0:
            fresh = backbone.sample_eps(len(x), generator, eps[0].device, eps[0].dtype)
            eps = [*eps[:top], *fresh[top:]]
        if sampler is not None:
            z = sampler(eps, fixed_groups=range(top)).z
        else:
            with torch.no_grad():
                z = backbone.eps_to_z(eps)
        with torch.no_grad():
            value = backbone.log_likelihood(x, z) + backbone.log_prior(z)
            if prior is not None:
                value = value + prior(z)
        total = total + value
    return total / samples


def llr_score(
    backbone: Backbone,
    x: Tensor,
    k: int,
    prior: Energy | None = None,
    method: Literal["hierarchical", "joint"] | None = None,
    samples: int = 1,
    **options: Any,
) -> OODScore:
    r"""Returns :math:`L^{>0}`, :math:`L^{>k}` and :math:`LLR^{>k} = L^{>0} - L^{>k}`.

    Arguments:
        backbone: The backbone.
        x: A data batch with shape :math:`(B, *)`.
        k: Number of bottom groups drawn from the prior, :math:`1 \leq k < L` (``k = 0`` gives
            a zero ratio, allowed for tables).
        prior: The energy :math:`f_a`, for ``method="joint"``.
        method: ``"hierarchical"`` (:func:`hierarchical_bound`, Gaussian prior, hvae-oodd's
            definition) or ``"joint"`` (:func:`joint_score`, Eq. 20). By default
            ``"joint"`` when ``prior`` is given, else ``"hierarchical"``.
        samples: Importance (or Monte Carlo) samples per bound.
        options: Further keyword arguments of the chosen function.

    Returns:
        An :class:`OODScore`.

    Example:
        >>> from ebm_prior import HierarchicalVAE
        >>> vae = HierarchicalVAE.from_config("digits").eval()
        >>> x = torch.rand(4, 1, 8, 8).bernoulli()
        >>> score = llr_score(vae, x, k=1, method="joint", samples=2)
        >>> score.llr.shape
        torch.Size([4])
    """

    if method is None:
        method = "hierarchical" if prior is None else "joint"
    if method == "hierarchical":
        if prior is not None:
            raise ValueError("method 'hierarchical' is the Gaussian-prior bound: pass prior=None")
        elbo = hierarchical_bound(backbone, x, 0, samples=samples, **options)
        elbo_k = elbo if k == 0 else hierarchical_bound(backbone, x, k, samples, **options)
    elif method == "joint":
        elbo = joint_score(backbone, x, 0, prior, samples=samples, **options)
        elbo_k = elbo if k == 0 else joint_score(backbone, x, k, prior, samples, **options)
    else:
        raise ValueError(f"method must be 'hierarchical' or 'joint', got {method!r}")
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
