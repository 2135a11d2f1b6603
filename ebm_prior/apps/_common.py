r"""Argument types, output checks and optional imports shared by the applications.

The argument types raise :class:`argparse.ArgumentTypeError`, so a bad value is reported by
argparse (usage line, exit status 2) before anything is loaded, trained or sampled.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import math
import os
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

__all__ = [
    "MissingExtraError",
    "existing_file",
    "nonnegative_float",
    "nonnegative_int",
    "output_dir",
    "output_file",
    "parser",
    "positive_float",
    "positive_int",
    "prior_or_none",
    "prior_source",
    "program",
    "require",
]

_PROG: list[str] = []


@contextlib.contextmanager
def program(name: str) -> Iterator[None]:
    r"""Names the program in the usage lines of the parsers built inside the block."""

    _PROG.append(name)
    try:
        yield
    finally:
        _PROG.pop()


def parser(doc: str | None) -> argparse.ArgumentParser:
    r"""An argument parser with ``doc`` as its description, named as :func:`program` says."""

    return argparse.ArgumentParser(
        prog=_PROG[-1] if _PROG else None,
        description=doc,
        formatter_class=argparse.RawTextHelpFormatter,
    )


def add_checkpoint_every(p: argparse.ArgumentParser, default: int = 100) -> None:
    r"""Adds ``--checkpoint-every N``: EBM updates between the trainer's checkpoints (written
    atomically to ``OUT/checkpoints``; a rerun with the same ``--out`` resumes there)."""

    p.add_argument(
        "--checkpoint-every",
        type=positive_int,
        default=default,
        help="EBM updates between checkpoints (in OUT/checkpoints; a rerun resumes there)",
    )


# -- numbers ------------------------------------------------------------------------------------


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None


def _float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be finite, got {text!r}")
    return value


def positive_int(text: str) -> int:
    r"""An integer :math:`\geq 1` (counts: epochs, steps, samples, batch sizes)."""

    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def nonnegative_int(text: str) -> int:
    r"""An integer :math:`\geq 0` (counts where 0 turns something off)."""

    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {text}")
    return value


def positive_float(text: str) -> float:
    r"""A finite number :math:`> 0` (step sizes, learning rates, temperatures)."""

    value = _float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def nonnegative_float(text: str) -> float:
    r"""A finite number :math:`\geq 0` (penalties)."""

    value = _float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be non-negative, got {text}")
    return value


# -- paths --------------------------------------------------------------------------------------


def _creatable(path: Path, text: str) -> None:
    r"""Raises unless ``path`` is a folder, or one that can be created, that we may write to."""

    existing = path.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        where = "it" if existing == path.absolute() else repr(str(existing))
        raise argparse.ArgumentTypeError(f"cannot use {text!r} as a folder: {where} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"cannot write {text!r}: {str(existing)!r} is read-only")


def output_dir(text: str) -> str:
    r"""An output folder that exists or can be created (it is not created here)."""

    _creatable(Path(text).expanduser(), text)
    return text


def output_file(text: str) -> str:
    r"""An output file whose folder exists or can be created; not an existing folder."""

    path = Path(text).expanduser()
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a folder, not a file name")
    _creatable(path.parent, str(path.parent))
    return text


def existing_file(text: str) -> str:
    r"""A path that names an existing file (a checkpoint, a data file)."""

    if not os.path.isfile(os.path.expanduser(text)):
        what = "is a folder" if os.path.isdir(os.path.expanduser(text)) else "does not exist"
        raise argparse.ArgumentTypeError(f"{text!r} {what}: expected a file")
    return text


def prior_source(text: str) -> str:
    r"""A Hub repo id, or a folder written by ``save_pretrained`` (checked here, not loaded)."""

    from ebm_prior.hub import CONFIG_NAME, WEIGHTS_NAME, local_folder

    try:
        folder = local_folder(text)
    except OSError as e:  # a missing folder, or a file
        raise argparse.ArgumentTypeError(str(e)) from None
    if folder is None:  # a Hub repo id: checked when it is downloaded
        return text
    missing = [name for name in (CONFIG_NAME, WEIGHTS_NAME) if not (folder / name).is_file()]
    if missing:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a saved prior: it has no {' and no '.join(missing)} "
            "(a folder written by save_pretrained)"
        )
    try:
        with open(folder / CONFIG_NAME, encoding="utf-8") as f:
            config = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise argparse.ArgumentTypeError(f"{text!r}: {CONFIG_NAME} is not valid JSON: {e}") from e
    if not isinstance(config, dict) or "latent_shapes" not in config:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a saved prior: its {CONFIG_NAME} has no 'latent_shapes'"
        )
    return text


def prior_or_none(text: str) -> str:
    r"""As :func:`prior_source`, or ``none`` (any case) for the backbone's own prior."""

    return text if text.lower() == "none" else prior_source(text)


# -- optional dependencies ----------------------------------------------------------------------


_DISTRIBUTIONS = {"sklearn": "scikit-learn", "PIL": "Pillow", "biva": "biva-pytorch"}


class MissingExtraError(ImportError):
    r"""An optional dependency is missing; the message names the extra that installs it."""


def require(module: str, extra: str, what: str) -> ModuleType:
    r"""Imports ``module``, or raises :class:`MissingExtraError` naming ``ebm-prior[extra]``."""

    try:
        return importlib.import_module(module)
    except ImportError as e:
        top = module.split(".")[0]
        raise MissingExtraError(
            f'{what} needs {_DISTRIBUTIONS.get(top, top)}: pip install "ebm-prior[{extra}]"'
        ) from e
