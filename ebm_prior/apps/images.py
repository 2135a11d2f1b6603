r"""Images for the NVAE applications: torchvision datasets, an image folder, or an ``.npz``.

:func:`load_images` returns a float tensor with shape :math:`(N, C, H, W)` in :math:`[0, 1]`;
:func:`fit_to` brings it to a backbone's input shape the way NVAE's loaders do (MNIST-like
28x28 images padded to 32x32 and binarised; others resized).
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ebm_prior.apps._common import require
from ebm_prior.hub import atomic_write

#: torchvision dataset names accepted by :func:`load_images`
TORCHVISION = {
    "cifar10": "CIFAR10",
    "mnist": "MNIST",
    "fashion-mnist": "FashionMNIST",
    "svhn": "SVHN",
    "celeba": "CelebA",
}
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def load_images(
    source: str,
    root: str = "data",
    split: str = "train",
    download: bool = False,
    limit: int | None = None,
) -> torch.Tensor:
    r"""Loads images as a tensor with shape :math:`(N, C, H, W)`, values in :math:`[0, 1]`.

    Arguments:
        source: A torchvision dataset name (``cifar10``, ``mnist``, ``fashion-mnist``,
            ``svhn``, ``celeba``; stored under ``root``), a folder of image files (searched
            recursively, all resized to the first image's size), or an ``.npz`` file whose array
            ``x`` (or ``images``, or its only array) has shape :math:`(N, H, W)`,
            :math:`(N, H, W, C)` or :math:`(N, C, H, W)`, as ``uint8`` or floats in [0, 1].
        root: Where torchvision datasets live.
        split: ``train`` or ``test`` for torchvision datasets.
        download: Let torchvision download the dataset.
        limit: Keep the first ``limit`` images.
    """

    if source in TORCHVISION:
        x = _torchvision(source, root, split, download, limit)
    elif source.endswith(".npz"):
        x = _npz(source)
    elif os.path.isdir(source):
        x = _folder(source, limit)
    else:
        raise ValueError(
            f"{source!r} is neither a dataset name ({', '.join(TORCHVISION)}), an .npz file, nor "
            "a folder of images"
        )
    return x[:limit] if limit is not None else x


def image_source(text: str) -> str:
    r"""An argument type: a dataset name of :func:`load_images`, an existing ``.npz`` file or an
    existing folder (checked before anything is loaded)."""

    if text in TORCHVISION:
        return text
    if text.endswith(".npz"):
        if not os.path.isfile(text):
            raise argparse.ArgumentTypeError(f"no such .npz file: {text!r}")
        return text
    if os.path.isdir(text):
        return text
    raise argparse.ArgumentTypeError(
        f"{text!r} is neither a dataset name ({', '.join(TORCHVISION)}), an existing .npz file, "
        "nor a folder of images"
    )


def _torchvision(name: str, root: str, split: str, download: bool, limit: int | None):
    tvd = require("torchvision.datasets", "nvae", f"loading {name!r}")
    cls = getattr(tvd, TORCHVISION[name])
    if name in ("svhn", "celeba"):
        ds = cls(root, split=split if name == "svhn" else {"test": "test"}.get(split, "train"),
                 download=download)  # fmt: skip
    else:
        ds = cls(root, train=split == "train", download=download)
    data = getattr(ds, "data", None)
    if isinstance(data, np.ndarray | torch.Tensor) and name != "celeba":
        arr = torch.as_tensor(np.asarray(data)[:limit])
        return _from_array(arr.numpy(), channels_last=name == "cifar10")
    n = len(ds) if limit is None else min(limit, len(ds))
    return torch.stack([_pil_to_tensor(ds[i][0]) for i in range(n)])


def _npz(path: str) -> torch.Tensor:
    with np.load(path, allow_pickle=False) as f:
        keys = list(f.keys())
        key = next((k for k in ("x", "images") if k in keys), keys[0] if len(keys) == 1 else None)
        if key is None:
            raise ValueError(f"{path} has arrays {keys}; name the images 'x' or 'images'")
        arr = f[key]
    return _from_array(arr)


def _from_array(arr: np.ndarray, channels_last: bool | None = None) -> torch.Tensor:
    if arr.ndim == 3:
        arr = arr[:, None]
    elif arr.ndim == 4:
        if channels_last is None:
            channels_last = arr.shape[-1] in (1, 3) and arr.shape[1] not in (1, 3)
        if channels_last:
            arr = arr.transpose(0, 3, 1, 2)
    else:
        raise ValueError(f"images must have 3 or 4 dimensions, got shape {arr.shape}")
    x = torch.from_numpy(np.ascontiguousarray(arr))
    if x.dtype == torch.uint8:
        return x.float() / 255.0
    x = x.float()
    if x.min() < 0 or x.max() > 1:
        raise ValueError(
            f"float images must lie in [0, 1], got [{x.min():.3g}, {x.max():.3g}]; "
            "store uint8 or rescale"
        )
    return x


def _pil_to_tensor(img) -> torch.Tensor:
    arr = np.asarray(img)
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    return torch.from_numpy(np.array(arr, copy=True)).float() / 255.0


def _folder(path: str, limit: int | None) -> torch.Tensor:
    Image = require("PIL.Image", "nvae", "reading an image folder")
    files = sorted(
        os.path.join(d, f)
        for d, _, names in os.walk(path)
        for f in names
        if f.lower().endswith(_IMAGE_SUFFIXES)
    )[:limit]
    if not files:
        raise ValueError(f"no image files ({', '.join(_IMAGE_SUFFIXES)}) under {path}")
    first = Image.open(files[0])
    mode, size = ("L" if first.mode in ("L", "1") else "RGB"), first.size
    return torch.stack([_pil_to_tensor(Image.open(f).convert(mode).resize(size)) for f in files])


def fit_to(x: torch.Tensor, shape: tuple[int, int, int], seed: int = 0) -> torch.Tensor:
    r"""Brings images to a model's input ``shape`` :math:`(C, S, S)` as NVAE's loaders do.

    One-channel 28x28 images for a 32x32 model (MNIST, Omniglot) are padded by 2 pixels and
    binarised with a fixed draw (``seed``); others are converted between grey and RGB if needed
    and resized (bilinear, antialiased) to :math:`S \times S`.
    """

    c, h, w = shape
    if x.shape[1] != c:
        if x.shape[1] == 1 and c == 3:
            x = x.expand(-1, 3, -1, -1)
        elif x.shape[1] == 3 and c == 1:
            x = (x * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
        else:
            raise ValueError(f"images have {x.shape[1]} channels, the model expects {c}")
    if c == 1 and (h, w) == (32, 32) and tuple(x.shape[2:]) == (28, 28):
        x = F.pad(x, (2, 2, 2, 2))
        g = torch.Generator().manual_seed(seed)
        return torch.bernoulli(x, generator=g)
    if tuple(x.shape[2:]) != (h, w):
        x = F.interpolate(x, size=(h, w), mode="bilinear", antialias=True, align_corners=False)
    return x.clamp(0, 1).contiguous()


def save_npz(path: str, images: torch.Tensor) -> None:
    r"""Writes images :math:`(N, C, H, W)` in [0, 1] as the ``uint8`` array ``x``, atomically."""

    arr = (images.detach().cpu().clamp(0, 1) * 255).round().to(torch.uint8).numpy()

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file object: numpy appends no ".npz"
            np.savez_compressed(f, x=arr)

    atomic_write(path, write)


def tile(x: torch.Tensor, ncol: int, border: float = 1.0) -> torch.Tensor:
    r"""Images :math:`(N, C, H, W)` in [0, 1] as one :math:`(H', W')` (grey) or
    :math:`(H', W', C)` array, ``ncol`` per row, separated by 1-pixel borders of value
    ``border`` (white by default); :math:`H' = \lceil N / ncol \rceil (H + 1) + 1`,
    :math:`W' = ncol (W + 1) + 1`."""

    x = x.detach().cpu().float()
    n, c, h, w = x.shape
    nrow = math.ceil(n / ncol)
    img = torch.full((c, nrow * (h + 1) + 1, ncol * (w + 1) + 1), float(border))
    for k in range(n):
        r, col = divmod(k, ncol)
        img[:, 1 + r * (h + 1) : (r + 1) * (h + 1), 1 + col * (w + 1) : (col + 1) * (w + 1)] = x[k]
    return img[0] if c == 1 else img.permute(1, 2, 0)


def panels(
    path: str, items: Sequence[tuple[torch.Tensor, int, str]], title: str = "", dpi: int = 110
) -> None:
    r"""Writes one figure of side-by-side image grids: ``items`` holds ``(images, ncol, name)``
    with images :math:`(N, C, H, W)` in [0, 1] (needs matplotlib)."""

    require("matplotlib", "examples", "the figures").use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(items), figsize=(4.2 * len(items), 4.6), squeeze=False)
    for ax, (images, ncol, name) in zip(axes[0], items):
        ax.imshow(tile(images.clamp(0, 1), ncol).numpy(), cmap="gray", vmin=0, vmax=1)
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def save_grid(path: str, images: torch.Tensor, nrow: int | None = None, title: str = "") -> None:
    r"""Writes a PNG grid of images :math:`(N, C, H, W)` in [0, 1], ``nrow`` per row (default
    about :math:`\sqrt{N}`), grey borders (needs matplotlib)."""

    require("matplotlib", "examples", "sample grids").use("Agg")
    import matplotlib.pyplot as plt

    n = images.shape[0]
    nrow = nrow or max(1, math.ceil(math.sqrt(n)))
    grid = tile(images.clamp(0, 1), nrow, border=0.5)
    c = images.shape[1]
    aspect = grid.shape[0] / grid.shape[1]
    fig = plt.figure(figsize=(6, 6 * aspect + 0.3))
    plt.imshow(grid.numpy(), cmap="gray" if c == 1 else None, vmin=0, vmax=1)
    plt.axis("off")
    if title:
        plt.title(title, fontsize=8)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
