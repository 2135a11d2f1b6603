r"""Saving, loading and sharing priors: safetensors, config.json, the Hub, compatibility."""

from __future__ import annotations

__all__ = [
    "SAMPLER_CONFIG_KEYS",
    "SCHEMA_VERSION",
    "HubMixin",
    "IncompatiblePriorError",
    "PriorFileError",
    "atomic_write",
    "check_compatible",
    "check_sampler_config",
    "file_sha256",
    "load_prior",
    "local_folder",
    "migrate_config",
    "model_card",
    "push_prior",
]

import hashlib
import inspect
import json
import math
import numbers
import os
import secrets
import shutil
import stat
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from huggingface_hub import EvalResult, ModelCardData, PyTorchModelHubMixin
from huggingface_hub import hf_hub_download as _hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ._utils import as_int
from ._version import __version__
from .backbone import Backbone

if TYPE_CHECKING:
    from .prior import JointEBMPrior

#: Version of the ``config.json`` layout written by this library.
SCHEMA_VERSION = 1
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
CARD_NAME = "README.md"
#: Prefix of the folder a save writes into before it swaps the files into place.
STAGING_PREFIX = ".ebm-prior-save-"

#: The ``sampler_config`` keys: JSON-representable keyword arguments of
#: :class:`~ebm_prior.EpsLangevin`, so that ``EpsLangevin(prior, backbone,
#: **prior.sampler_config)`` rebuilds the recorded sampler.
SAMPLER_CONFIG_KEYS = (
    "step_size",
    "steps",
    "mala",
    "clip_grad",
    "t",
    "target",
    "on_nonfinite",
    "check_every",
    "trace",
    "progress",
)

CITATION = """@inproceedings{cui2023joint,
  title     = {Learning Joint Latent Space EBM Prior Model for Multi-layer Generator},
  author    = {Cui, Jiali and Wu, Ying Nian and Han, Tian},
  booktitle = {CVPR},
  year      = {2023}
}"""
PAPER_URL = "https://arxiv.org/abs/2306.06323"


class IncompatiblePriorError(ValueError):
    r"""A prior does not fit a backbone (latent shapes or fingerprint differ)."""


class PriorFileError(OSError):
    r"""A saved prior is missing, truncated, corrupted, invalid, or from a newer schema."""


# -- writing files ---------------------------------------------------------------------------


def _new_temp_file(path: Path) -> Path:
    r"""Creates an empty file next to ``path`` with mode ``0o666 & ~umask`` (as ``open`` does)."""

    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
        try:
            os.close(os.open(tmp, flags, 0o666))
        except FileExistsError:
            continue
        return tmp
    raise FileExistsError(f"could not create a temporary file next to {path}")


def _fsync_dir(path: Path) -> None:
    r"""Flushes a folder's entries (renames) to disk where the platform allows it."""

    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open folders
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[str], object]) -> None:
    r"""Calls ``write(tmp)`` on a temporary file next to ``path``, flushes it to disk
    (``fsync``), then renames it over ``path`` (``os.replace``): readers see the old file or the
    new one, never a partial one, also after a crash. The file gets the mode a plain
    ``open(path, "w")`` would give a new file (``0o666`` less the umask)."""

    path = Path(path)
    tmp = _new_temp_file(path)
    try:
        mode = stat.S_IMODE(tmp.stat().st_mode)
        write(str(tmp))
        if stat.S_IMODE(tmp.stat().st_mode) != mode:  # the writer made a file of its own
            os.chmod(tmp, mode)
        with open(tmp, "r+b") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def file_sha256(path: str | os.PathLike) -> str:
    r"""Returns the SHA-256 hex digest of a file (the checkpoint hash of fingerprints)."""

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _replace_all(staging: Path, directory: Path, names: Sequence[str]) -> None:
    for name in names:
        if (staging / name).exists():
            os.replace(staging / name, directory / name)


def write_folder(
    directory: str | os.PathLike,
    state: dict[str, torch.Tensor],
    config: dict[str, Any],
    card: str | None = None,
    metadata: dict[str, str] | None = None,
) -> str:
    r"""Writes ``model.safetensors``, ``config.json`` (with the weights' SHA-256) and the card
    ``README.md`` into ``directory`` so that it loads as the old model or the new one whatever
    happens; returns the weights' SHA-256.

    Everything is serialised first (a non-JSON value fails before the folder is touched), then
    written into a temporary folder inside ``directory`` and flushed to disk; only then are the
    files moved into place with ``os.replace``, weights first. An error or ``KeyboardInterrupt``
    before that point leaves the folder as it was and removes the temporary folder; one during
    the moves completes them (every file is already written). Should the process die between
    the moves, the folder holds the new weights and the old ``config.json``, whose SHA-256 no
    longer matches: the loader then takes the new ``config.json`` from the temporary folder
    (:func:`_staged_config`). The next successful save removes such leftovers.
    """

    directory = Path(directory)
    json.dumps(config, allow_nan=False)  # a value JSON cannot hold fails before any I/O
    directory.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=directory))
    names = [WEIGHTS_NAME, CONFIG_NAME] + ([CARD_NAME] if card is not None else [])
    try:
        weights = staging / WEIGHTS_NAME
        atomic_write(weights, lambda tmp: save_file(state, tmp, metadata=metadata))
        sha = file_sha256(weights)
        text = json.dumps({**config, "weights_sha256": sha}, sort_keys=True, indent=2) + "\n"
        atomic_write(staging / CONFIG_NAME, lambda tmp: Path(tmp).write_text(text, "utf-8"))
        if card is not None:
            atomic_write(staging / CARD_NAME, lambda tmp: Path(tmp).write_text(card, "utf-8"))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    try:
        _replace_all(staging, directory, names)
    except BaseException:
        _replace_all(staging, directory, names)  # finish the swap; if this fails, see above
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        _fsync_dir(directory)
    shutil.rmtree(staging, ignore_errors=True)
    for stale in directory.glob(STAGING_PREFIX + "*"):
        shutil.rmtree(stale, ignore_errors=True)
    return sha


def _staged_config(directory: Path, weights_sha256: str) -> dict[str, Any] | None:
    r"""The config of an interrupted save whose weights are ``weights_sha256``, if any."""

    for path in sorted(directory.glob(f"{STAGING_PREFIX}*/{CONFIG_NAME}")):
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(config, dict) and config.get("weights_sha256") == weights_sha256:
            return config
    return None


def read_weights(path: str | os.PathLike, expected_sha256: str | None) -> dict[str, torch.Tensor]:
    r"""Loads a safetensors file, checking its SHA-256 against the config when recorded."""

    if expected_sha256 is not None and file_sha256(path) != expected_sha256:
        raise PriorFileError(
            f"{WEIGHTS_NAME} does not match the SHA-256 recorded in config.json "
            "(truncated or corrupted file)"
        )
    try:
        return load_file(path)
    except SafetensorError as e:
        raise PriorFileError(f"{WEIGHTS_NAME} is not a valid safetensors file: {e}") from e


# -- config checks ---------------------------------------------------------------------------


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_real(v: object) -> bool:
    r"""A real number of any kind (``int``, ``float``, NumPy scalars), not a bool."""

    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _expect(ok: Callable[[Any], bool], what: str) -> Callable[[Any], None]:
    def check(value: Any) -> None:
        if not ok(value):
            raise TypeError(f"must be {what}, got {value!r}")

    return check


def _is_ints(v: object) -> bool:
    return isinstance(v, list) and all(map(_is_int, v))


INT = _expect(_is_int, "an integer")
INTS = _expect(_is_ints, "a list of integers")
INT_OR_INTS = _expect(lambda v: _is_int(v) or _is_ints(v), "an integer or a list of integers")
NUMBER = _expect(_is_number, "a number")
STR = _expect(lambda v: isinstance(v, str), "a string")
SHAPES = _expect(
    lambda v: isinstance(v, list) and len(v) > 0 and all(map(_is_ints, v)),
    "a non-empty list of shapes (lists of integers)",
)


def FINGERPRINT(value: Any) -> None:
    r"""Checks a backbone fingerprint read from a config (``None`` when unknown)."""

    if value is None:
        return
    if not isinstance(value, dict):
        raise TypeError(f"must be a fingerprint dict or null, got {value!r}")
    for key in ("adapter", "checkpoint_hash"):
        if value.get(key) is not None and not isinstance(value[key], str):
            raise TypeError(f"entry {key!r} must be a string or null, got {value[key]!r}")
    if "latent_shapes" in value:
        SHAPES(value["latent_shapes"])


def _sampler_value(key: str, value: Any) -> Any:
    def fail(what: str, error: type[Exception] = TypeError) -> Exception:
        return error(f"sampler_config[{key!r}] must be {what}, got {value!r}")

    if key in ("mala", "trace", "progress"):
        if not isinstance(value, bool):
            raise fail("a bool")
        return value
    if key in ("steps", "check_every"):
        try:
            value = as_int(value)
        except TypeError:
            raise fail("an integer") from None
        minimum = 0 if key == "steps" else 1
        if value < minimum:
            raise fail(f"an integer >= {minimum}", ValueError)
        return value
    if key in ("step_size", "t", "clip_grad"):
        if value is None and key == "clip_grad":
            return None
        if not _is_real(value):
            raise fail("a positive number" + (" or None" if key == "clip_grad" else ""))
        value = float(value)
        if not (math.isfinite(value) and value > 0):
            raise fail("a positive finite number", ValueError)
        return value
    choices = {"target": ("exact", "anchor"), "on_nonfinite": ("raise", "reject")}[key]
    if value not in choices:
        raise fail(" or ".join(map(repr, choices)), ValueError)
    return value


def check_sampler_config(config: dict[str, Any] | None) -> dict[str, Any]:
    r"""Validates a prior's ``sampler_config`` and returns it with plain Python values.

    ``sampler_config`` holds keyword arguments of :class:`~ebm_prior.EpsLangevin` (the
    JSON-representable ones, :data:`SAMPLER_CONFIG_KEYS`), so
    ``EpsLangevin(prior, backbone, **prior.sampler_config)`` rebuilds the sampler the prior was
    trained or evaluated with. Unknown keys raise ``ValueError`` naming the key; values of the
    wrong type (a string for a number, a tensor, ...) raise ``TypeError``, values out of range
    ``ValueError``, both naming the key.
    """

    if config is None:
        return {}
    if not isinstance(config, dict):
        raise TypeError(f"sampler_config must be a dict, got {type(config).__name__}")
    out = {}
    for key, value in config.items():
        if key in ("generator", "autocast", "modules"):
            raise ValueError(
                f"sampler_config[{key!r}] is not recorded (not JSON): pass it to EpsLangevin "
                "directly"
            )
        if key not in SAMPLER_CONFIG_KEYS:
            raise ValueError(
                f"unknown sampler_config key {key!r}: sampler_config holds keyword arguments of "
                f"EpsLangevin ({', '.join(SAMPLER_CONFIG_KEYS)}); record other settings "
                "elsewhere (e.g. the model card's metrics)"
            )
        out[key] = _sampler_value(key, value)
    return out


def _sampler_config(value: Any) -> None:
    if not isinstance(value, dict):
        raise TypeError(f"must be a dict, got {value!r}")
    check_sampler_config(value)


SAMPLER_CONFIG = _sampler_config


def _schema_version(config: dict[str, Any], where: str, current: int) -> int | None:
    r"""The config's ``schema_version`` (``None`` if absent), refused unless an integer in
    ``[0, current]``."""

    if "schema_version" not in config:
        return None
    version = config["schema_version"]
    if not _is_int(version) or version < 0:
        raise PriorFileError(
            f"{where}: 'schema_version' must be a non-negative integer, got {version!r}"
        )
    if version > current:
        raise PriorFileError(
            f"{where} has schema_version {version}, newer than this ebm-prior {__version__} "
            f"supports ({current}); upgrade ebm-prior to load it"
        )
    return version


def migrate_config(config: dict[str, Any], where: str = CONFIG_NAME) -> dict[str, Any]:
    r"""Brings a prior's ``config.json`` of any older schema to :data:`SCHEMA_VERSION`.

    Schema 0 (no ``schema_version`` key) had no ``library_version``, ``sampler_config`` or
    ``backbone`` entries; they are filled with their defaults. A ``schema_version`` that is not
    a non-negative integer, or one from a newer schema than this library knows, raises
    :class:`PriorFileError` (the latter asking to upgrade).
    """

    if not isinstance(config, dict):
        raise PriorFileError(f"{where}: not a JSON object, got {type(config).__name__}")
    config = dict(config)
    version = _schema_version(config, where, SCHEMA_VERSION) or 0
    if version == 0:
        config.setdefault("library_version", "unknown")
        config.setdefault("sampler_config", {})
        config.setdefault("backbone", None)
        version = 1
    config["schema_version"] = version
    if "latent_shapes" not in config:
        raise PriorFileError(f"{where} has no 'latent_shapes': not an ebm-prior config")
    return config


def _read_json(path: str | os.PathLike, where: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise PriorFileError(f"{where} is not valid JSON: {e}") from e


# -- where a model lives ---------------------------------------------------------------------


def local_folder(name_or_path: str | os.PathLike) -> Path | None:
    r"""Returns the folder ``name_or_path`` names, or ``None`` when it is a Hub repo id.

    An existing folder is local. Otherwise ``name_or_path`` is read as a local path, and
    ``FileNotFoundError`` naming it is raised, when it is a :class:`~pathlib.Path` (any
    ``os.PathLike``), is absolute, starts with ``.`` or ``~``, has more separators than
    ``owner/name`` (or a backslash on Windows), or when the folder it would be in exists (as
    ``runs`` for ``runs/prior``). Anything else (``name`` or ``owner/name``) is a Hub repo id.
    """

    explicit = isinstance(name_or_path, os.PathLike)
    name = os.fspath(name_or_path)
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    native = os.sep != "/" and os.sep in name
    reason = None
    if explicit:
        reason = "it is a Path"
    elif os.path.isabs(name) or path.is_absolute():
        reason = "it is absolute"
    elif name.startswith((".", "~")):
        reason = f"it starts with {name[0]!r}"
    elif name.count("/") > 1 or native:
        reason = "a Hub repo id is 'owner/name'"
    elif path.exists():
        reason = "it exists"
    elif ("/" in name or native) and path.parent.is_dir():
        reason = f"{str(path.parent)!r} is a local folder"
    if reason is None:
        return None
    if path.exists():
        raise NotADirectoryError(f"{name!r} is a file, not a folder written by save_pretrained")
    raise FileNotFoundError(f"no such folder: {name!r} (read as a local path because {reason})")


def _download(model_id: str, filename: str, hub_kwargs: dict) -> str:
    try:
        return _hf_hub_download(repo_id=model_id, filename=filename, **hub_kwargs)
    except EntryNotFoundError as e:
        if isinstance(e, LocalEntryNotFoundError):  # offline or unreachable: not our call
            raise
        rev = hub_kwargs.get("revision") or "main"
        raise PriorFileError(
            f"{model_id}@{rev} has no {filename}: not an ebm-prior repository "
            "(ebm-prior reads only config.json and model.safetensors, never pickles)"
        ) from e


# -- model cards -----------------------------------------------------------------------------


def _card_data(
    base: ModelCardData,
    tags: Sequence[str],
    name: str,
    metrics: dict[str, float] | None,
    datasets: Sequence[str] | None,
) -> ModelCardData:
    if datasets is not None:
        if isinstance(datasets, str) or not all(isinstance(d, str) for d in datasets):
            raise TypeError(f"datasets must be a list of names, got {datasets!r}")
        datasets = list(datasets)
    results = None
    if metrics:
        if not isinstance(metrics, dict) or not all(
            isinstance(k, str) and _is_real(v) for k, v in metrics.items()
        ):
            raise TypeError(f"metrics must map names to numbers, got {metrics!r}")
        dataset = datasets[0] if datasets else "unspecified"
        results = [
            EvalResult(
                task_type="unconditional-image-generation",
                dataset_type=dataset,
                dataset_name=dataset,
                metric_type=k,
                metric_name=k,
                metric_value=float(v),
            )
            for k, v in metrics.items()
        ]
    data = base.to_dict()
    data.pop("model-index", None)
    return ModelCardData(
        **{k: v for k, v in data.items() if k not in ("tags", "datasets", "eval_results")},
        tags=sorted({*(base.tags or []), *tags}),
        datasets=datasets or None,
        model_name=name if results else None,
        eval_results=results,
    )


def _card(data: ModelCardData, body: list[str]) -> str:
    return "\n".join(["---", data.to_yaml(), "---", "", *body, ""])


def _usage_name(repo_id: str | None, folder: str | None) -> tuple[str, str]:
    r"""The name for the usage snippet, and a comment saying what it is."""

    if repo_id:
        return repo_id, ""
    if folder:
        return folder, "  # this folder, or its Hub repo id once pushed"
    return "owner/name", "  # the Hub repo id or the folder of this card"


def _metrics_lines(metrics: dict[str, float] | None, datasets: Sequence[str] | None) -> list[str]:
    if not metrics:
        return []
    on = f" (on {datasets[0]})" if datasets else ""
    lines = ["", "## Metrics", "", f"| metric{on} | value |", "|---|---|"]
    return lines + [f"| {k} | {v} |" for k, v in metrics.items()]


def model_card(
    prior: JointEBMPrior,
    repo_id: str | None = None,
    metrics: dict[str, float] | None = None,
    datasets: Sequence[str] | None = None,
    folder: str | None = None,
) -> str:
    r"""Returns a model card (``README.md`` with Hub metadata) for a prior.

    The metadata is built with :class:`huggingface_hub.ModelCardData`: ``library_name``,
    ``tags`` (with the backbone's adapter), ``datasets``, and the ``metrics`` as
    :class:`huggingface_hub.EvalResult` entries of ``model-index`` (reported on the first of
    ``datasets``). The usage snippet loads ``repo_id``, else ``folder``.
    """

    fp = prior.backbone or {}
    tags = [str(fp["adapter"])] if fp.get("adapter") else []
    name, comment = _usage_name(repo_id, folder)
    data = _card_data(prior._hub_mixin_info.model_card_data, tags, name, metrics, datasets)
    lines = [
        "# Joint latent-space EBM prior",
        "",
        "A joint latent-space energy-based prior (Cui, Wu & Han, CVPR 2023, "
        f"[paper]({PAPER_URL})) for a hierarchical VAE, trained with the `ebm-prior` library.",
        "",
        "## Backbone",
        "",
        f"- adapter: `{fp.get('adapter', 'unknown')}`",
        f"- checkpoint hash: `{fp.get('checkpoint_hash')}`",
        "",
        "| group (top first) | latent shape | energy net |",
        "|---|---|---|",
    ]
    for i, (shape, nef, depth) in enumerate(zip(prior.latent_shapes, prior.nef, prior.num_layers)):
        kind = "MLP" if len(shape) == 1 else "conv + MLP"
        lines.append(f"| {i} | {tuple(shape)} | {kind}, width {nef}, {depth} hidden layers |")
    if prior.sampler_config:
        lines += ["", "## Sampler settings", ""]
        lines += [f"- `{k}`: {v}" for k, v in sorted(prior.sampler_config.items())]
    lines += _metrics_lines(metrics, datasets)
    lines += [
        "",
        "## Usage",
        "",
        "```python",
        "from ebm_prior import EpsLangevin, JointEBMPrior",
        "from ebm_prior.hub import load_prior",
        "",
        f'prior = JointEBMPrior.from_pretrained("{name}"){comment}',
        f'# or, checked against your backbone: prior = load_prior("{name}", backbone=backbone)',
        "# sampler = EpsLangevin(prior, backbone, **prior.sampler_config)",
        "```",
        "",
        f"Written by ebm-prior {prior.library_version}, config schema {SCHEMA_VERSION}.",
        "",
        "## Citation",
        "",
        "```bibtex",
        CITATION,
        "```",
    ]
    return _card(data, lines)


def backbone_card(
    model: HubMixin,
    repo_id: str | None = None,
    metrics: dict[str, float] | None = None,
    datasets: Sequence[str] | None = None,
    folder: str | None = None,
) -> str:
    r"""Returns a model card for a backbone saved with :class:`HubMixin` (the reference
    :class:`~ebm_prior.HierarchicalVAE`): its config, checkpoint hash and a usage snippet."""

    cls = type(model).__name__
    name, comment = _usage_name(repo_id, folder)
    data = _card_data(model._hub_mixin_info.model_card_data, [], name, metrics, datasets)
    lines = [
        f"# {cls} (ebm-prior reference backbone)",
        "",
        "A hierarchical VAE from the `ebm-prior` library, the backbone that joint latent-space "
        f"EBM priors (Cui, Wu & Han, CVPR 2023, [paper]({PAPER_URL})) are trained on.",
        "",
        "| setting | value |",
        "|---|---|",
    ]
    lines += [f"| `{k}` | {v} |" for k, v in model._hub_config().items() if k != "model_type"]
    lines += _metrics_lines(metrics, datasets)
    lines += [
        "",
        "## Usage",
        "",
        "```python",
        f"from ebm_prior import {cls}, load_prior",
        "",
        f'backbone = {cls}.from_pretrained("{name}"){comment}',
        "# prior = load_prior(prior_repo_or_folder, backbone=backbone)  # checks the hash",
        "```",
        "",
        "## Citation",
        "",
        "```bibtex",
        CITATION,
        "```",
    ]
    return _card(data, lines)


# -- the shared save/load behaviour -----------------------------------------------------------


class HubMixin(PyTorchModelHubMixin):
    r"""Saving and loading as ``model.safetensors`` + ``config.json``, for the prior and the
    reference backbone.

    On top of :class:`huggingface_hub.PyTorchModelHubMixin`: the config is the model's own
    (:meth:`_hub_config`), checked key by key on load (unknown keys, wrong types and
    out-of-range schema versions are refused naming the key and the file); only
    ``model.safetensors`` is ever read (never a pickle), after its SHA-256 is checked against
    ``config.json``; ``from_pretrained`` defaults to ``strict=True`` and ``map_location="cpu"``;
    a save is atomic (:func:`write_folder`) and rewrites the model card; local paths are told
    apart from Hub repo ids by :func:`local_folder`.
    """

    #: ``config.json``'s ``model_type`` (``None``: no such key, as in a prior's config).
    _hub_model_type: ClassVar[str | None] = None
    #: Newest config schema this class writes and reads.
    _hub_schema_version: ClassVar[int] = 1
    #: The config's own keys and their checks (besides the keys every config has).
    _hub_config_types: ClassVar[dict[str, Callable[[Any], None]]] = {}
    #: Keys a config must have.
    _hub_required: ClassVar[tuple[str, ...]] = ()
    #: ``metadata`` of the safetensors file.
    _hub_weights_metadata: ClassVar[dict[str, str] | None] = None

    # -- hooks ----------------------------------------------------------------------------------

    def _hub_config(self) -> dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def _hub_migrate(cls, config: dict[str, Any], where: str) -> dict[str, Any]:
        if _schema_version(config, where, cls._hub_schema_version) is None:
            raise PriorFileError(f"{where} has no 'schema_version': not an ebm-prior config")
        return config

    def _hub_weights_written(self, sha256: str) -> None:
        r"""Called with the weights' SHA-256 after a save and after a load."""

    # -- saving ---------------------------------------------------------------------------------

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        *,
        config: dict | None = None,
        repo_id: str | None = None,
        push_to_hub: bool = False,
        model_card_kwargs: dict[str, Any] | None = None,
        **push_to_hub_kwargs,
    ) -> str | None:
        r"""Saves ``model.safetensors``, ``config.json`` and a model card ``README.md`` in a
        folder, atomically: whatever fails or interrupts the save, the folder still loads (the
        old model, or the new one once all its files were written). The card describes this
        model (an existing ``README.md`` is replaced); ``model_card_kwargs`` may give
        ``repo_id``, ``metrics`` and ``datasets``. With ``push_to_hub=True`` the folder is then
        pushed to ``repo_id`` (default: the folder's name)."""

        if config is not None:
            raise TypeError(f"the config of a {type(self).__name__} is its own: drop config=")
        save_directory = Path(save_directory)
        card_kwargs = {"folder": save_directory.name, **(model_card_kwargs or {})}
        if repo_id is not None:
            card_kwargs.setdefault("repo_id", repo_id)
        card = str(self.generate_model_card(**card_kwargs))
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        sha = write_folder(
            save_directory, state, self._hub_config(), card, self._hub_weights_metadata
        )
        self._hub_weights_written(sha)
        if push_to_hub:
            return self.push_to_hub(
                repo_id or save_directory.name, model_card_kwargs=model_card_kwargs,
                **push_to_hub_kwargs,
            )  # fmt: skip
        return None

    def push_to_hub(
        self, repo_id: str, *, model_card_kwargs: dict[str, Any] | None = None, **kwargs
    ) -> str:
        r"""Pushes the saved files to ``repo_id`` in one commit (see
        :meth:`huggingface_hub.ModelHubMixin.push_to_hub`); the card's usage snippet names the
        repository."""

        card_kwargs = {"repo_id": repo_id, **(model_card_kwargs or {})}
        return super().push_to_hub(repo_id, model_card_kwargs=card_kwargs, **kwargs)

    def _save_pretrained(self, save_directory: Path) -> None:
        self.save_pretrained(save_directory)

    # -- loading --------------------------------------------------------------------------------

    @classmethod
    def _hub_init_kwargs(cls, config: Any, where: str) -> dict[str, Any]:
        r"""Checks a parsed ``config.json``; returns the constructor's keyword arguments."""

        if not isinstance(config, dict):
            raise PriorFileError(f"{where}: not a JSON object, got {type(config).__name__}")
        model_type = config.get("model_type")
        if model_type != cls._hub_model_type:
            what = f"a {model_type!r} model" if model_type else "a joint EBM prior"
            raise PriorFileError(
                f"{where} describes {what}, not a {cls.__name__} (its 'model_type' is "
                f"{model_type!r}, expected {cls._hub_model_type!r})"
            )
        config = cls._hub_migrate(config, where)
        common = {"schema_version", "library_version", "weights_sha256"}
        if cls._hub_model_type is not None:
            common.add("model_type")
        known = common | set(cls._hub_config_types)
        for key in config:
            if key not in known:
                raise PriorFileError(
                    f"{where}: unknown key {key!r} (a {cls.__name__} config of schema "
                    f"{config['schema_version']} has {', '.join(sorted(known))})"
                )
        for key in cls._hub_required:
            if key not in config:
                raise PriorFileError(f"{where}: missing key {key!r}")
        checks = {**cls._hub_config_types, "library_version": STR}
        for key, check in checks.items():
            if key in config:
                try:
                    check(config[key])
                except (TypeError, ValueError) as e:
                    raise PriorFileError(f"{where}: {key!r} {e}") from None
        sha = config.get("weights_sha256")
        if sha is not None and not (isinstance(sha, str) and len(sha) == 64):
            raise PriorFileError(f"{where}: 'weights_sha256' must be a SHA-256 hex digest")
        params = inspect.signature(cls.__init__).parameters
        return {k: v for k, v in config.items() if k in params}

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *,
        force_download: bool = False,
        token: str | bool | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool = False,
        revision: str | None = None,
        map_location: str | torch.device = "cpu",
        strict: bool = True,
        **model_kwargs,
    ):
        r"""Loads a model saved by :meth:`save_pretrained` from a folder or a Hub repo id.

        Only ``model.safetensors`` is ever read (never a pickle); its SHA-256 is checked
        against ``config.json`` (a bad download is dropped from the cache), and the config is
        checked key by key. ``model_kwargs`` override the config's constructor arguments. A
        local path that does not exist raises ``FileNotFoundError`` (see
        :func:`local_folder` for what counts as a local path).
        """

        name = pretrained_model_name_or_path
        folder = local_folder(name)
        if folder is not None:
            config_path, weights_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
            for path in (config_path, weights_path):
                if not path.is_file():
                    raise PriorFileError(
                        f"no {path.name} in {os.fspath(name)}: not a folder written by "
                        "save_pretrained (ebm-prior reads only config.json and "
                        "model.safetensors, never pickles)"
                    )
            where = str(config_path)
            config = _read_json(config_path, where)
            actual = file_sha256(weights_path)
            if isinstance(config, dict) and config.get("weights_sha256") not in (None, actual):
                config = _staged_config(folder, actual) or config  # an interrupted save
            kwargs = cls._hub_init_kwargs(config, where)
            sha = config.get("weights_sha256")
            if sha is not None and sha != actual:
                raise PriorFileError(
                    f"{weights_path} does not match the SHA-256 recorded in {where} "
                    "(truncated or corrupted file)"
                )
            state = read_weights(weights_path, None)
        else:
            hub_kwargs = dict(
                revision=revision, cache_dir=cache_dir, force_download=force_download,
                token=token, local_files_only=local_files_only,
            )  # fmt: skip
            name = str(name)
            where = f"config.json of {name}@{revision or 'main'}"
            config = _read_json(_download(name, CONFIG_NAME, hub_kwargs), where)
            kwargs = cls._hub_init_kwargs(config, where)
            sha = config.get("weights_sha256")
            path = _download(name, WEIGHTS_NAME, hub_kwargs)
            try:
                state = read_weights(path, sha)
            except PriorFileError:  # drop the bad download from the cache
                Path(os.path.realpath(path)).unlink(missing_ok=True)
                Path(path).unlink(missing_ok=True)
                raise
        kwargs.update(model_kwargs)
        try:
            model = cls(**kwargs)
        except (TypeError, ValueError) as e:
            raise PriorFileError(f"{where}: cannot build a {cls.__name__}: {e}") from e
        model.load_state_dict(state, strict=strict)
        if sha is not None:
            model._hub_weights_written(sha)
        return model.to(map_location)

    @classmethod
    def _from_pretrained(cls, *, model_id: str, **kwargs):
        kwargs.pop("proxies", None)
        kwargs.pop("resume_download", None)
        return cls.from_pretrained(model_id, **kwargs)


# -- compatibility, loading, pushing ---------------------------------------------------------


def check_compatible(prior: JointEBMPrior, backbone: Backbone, check_hash: bool = True) -> None:
    r"""Raises :class:`IncompatiblePriorError` when ``prior`` does not fit ``backbone``.

    Compares the number of groups and every group's shape (naming the first that differs),
    then the recorded fingerprint (adapter name, and the checkpoint hash when both are known
    and ``check_hash``).
    """

    ours, theirs = tuple(prior.latent_shapes), tuple(tuple(s) for s in backbone.latent_shapes)
    if len(ours) != len(theirs):
        raise IncompatiblePriorError(
            f"the prior has {len(ours)} latent groups, the backbone has {len(theirs)}"
        )
    for i, (a, b) in enumerate(zip(ours, theirs)):
        if tuple(a) != tuple(b):
            raise IncompatiblePriorError(
                f"group {i}: the prior expects latent shape {tuple(a)}, the backbone has {b}"
            )
    fp, bfp = prior.backbone or {}, backbone.fingerprint()
    if fp.get("adapter") not in (None, bfp["adapter"]):
        raise IncompatiblePriorError(
            f"the prior was trained on a '{fp['adapter']}' backbone, this one is "
            f"'{bfp['adapter']}' (prior fingerprint {fp}, backbone fingerprint {bfp})"
        )
    if check_hash and None not in (fp.get("checkpoint_hash"), bfp["checkpoint_hash"]):
        if fp["checkpoint_hash"] != bfp["checkpoint_hash"]:
            raise IncompatiblePriorError(
                f"the prior was trained on checkpoint {fp['checkpoint_hash']}, the backbone was "
                f"loaded from {bfp['checkpoint_hash']}; pass check_hash=False to load anyway"
            )


def load_prior(
    name_or_path: str | os.PathLike,
    backbone: Backbone | None = None,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
    force_download: bool = False,
    check_hash: bool = True,
    map_location: str | torch.device = "cpu",
) -> JointEBMPrior:
    r"""Loads a prior from a local folder or a Hub repository, checked against ``backbone``.

    Arguments:
        name_or_path: A folder written by ``save_pretrained`` or a Hub repo id (see
            :func:`local_folder` for how the two are told apart).
        backbone: If given, the prior must fit it (see :func:`check_compatible`) and is moved to
            its device.
        revision: A branch, tag or commit sha on the Hub.
        token, cache_dir, local_files_only, force_download: As in ``huggingface_hub``.
        check_hash: Also require the recorded checkpoint hash to match the backbone's.
    """

    from .prior import JointEBMPrior

    prior = JointEBMPrior.from_pretrained(
        name_or_path,
        revision=revision,
        token=token,
        cache_dir=cache_dir,
        local_files_only=local_files_only,
        force_download=force_download,
        map_location=map_location,
        strict=True,
    )
    if backbone is not None:
        check_compatible(prior, backbone, check_hash)
        prior.to(backbone.device)
    return prior


def push_prior(
    prior: JointEBMPrior,
    repo_id: str,
    *,
    backbone: Backbone | None = None,
    metrics: dict[str, float] | None = None,
    datasets: Sequence[str] | None = None,
    private: bool | None = None,
    token: str | None = None,
    branch: str | None = None,
    commit_message: str = "Upload joint EBM prior",
) -> str:
    r"""Pushes a prior to the Hub (weights, config and a model card) in one commit.

    Arguments:
        prior: The prior.
        repo_id: ``"user/name"``; created if it does not exist.
        backbone: Records its fingerprint in the config (after checking compatibility).
        metrics: Numbers for the model card, written to its ``model-index``
            (e.g. ``{"fid": 25.9}``), reported on the first of ``datasets``.
        datasets: Dataset names for the model card metadata.
        private, token, branch, commit_message: As in ``huggingface_hub``.

    Returns:
        The URL of the commit.
    """

    if backbone is not None:
        check_compatible(prior, backbone)
        prior.backbone = backbone.fingerprint()
    card = {"repo_id": repo_id, "metrics": metrics, "datasets": datasets}
    return str(
        prior.push_to_hub(
            repo_id,
            private=private,
            token=token,
            branch=branch,
            commit_message=commit_message,
            model_card_kwargs=card,
        )
    )
