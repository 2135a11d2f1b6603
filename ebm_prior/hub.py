r"""Saving, loading and sharing priors: safetensors, config.json, the Hub, compatibility."""

from __future__ import annotations

__all__ = [
    "SCHEMA_VERSION",
    "IncompatiblePriorError",
    "PriorFileError",
    "atomic_write",
    "check_compatible",
    "file_sha256",
    "load_prior",
    "migrate_config",
    "model_card",
    "push_prior",
]

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ._version import __version__
from .backbone import Backbone

if TYPE_CHECKING:
    from .prior import JointEBMPrior

#: Version of the ``config.json`` layout written by this library.
SCHEMA_VERSION = 1
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"

CITATION = """@inproceedings{cui2023joint,
  title     = {Learning Joint Latent Space EBM Prior Model for Multi-layer Generator},
  author    = {Cui, Jiali and Wu, Ying Nian and Han, Tian},
  booktitle = {CVPR},
  year      = {2023}
}"""


class IncompatiblePriorError(ValueError):
    r"""A prior does not fit a backbone (latent shapes or fingerprint differ)."""


class PriorFileError(OSError):
    r"""A saved prior is missing, truncated, corrupted, or from a newer schema."""


# -- config ----------------------------------------------------------------------------------


def migrate_config(config: dict[str, Any]) -> dict[str, Any]:
    r"""Brings a ``config.json`` of any older schema to :data:`SCHEMA_VERSION`.

    Schema 0 (no ``schema_version`` key) had no ``library_version``, ``sampler_config`` or
    ``backbone`` entries; they are filled with their defaults. A config from a newer schema
    than this library knows raises :class:`PriorFileError` asking to upgrade.
    """

    config = dict(config)
    version = int(config.get("schema_version", 0))
    if version > SCHEMA_VERSION:
        raise PriorFileError(
            f"config.json has schema_version {version}, newer than this ebm-prior "
            f"{__version__} supports ({SCHEMA_VERSION}); upgrade ebm-prior to load it"
        )
    if version == 0:
        config.setdefault("library_version", "unknown")
        config.setdefault("sampler_config", {})
        config.setdefault("backbone", None)
        version = 1
    config["schema_version"] = version
    if "latent_shapes" not in config:
        raise PriorFileError("config.json has no 'latent_shapes': not an ebm-prior config")
    return config


def atomic_write(path: str | os.PathLike, write: Callable[[str], object]) -> None:
    r"""Calls ``write(tmp)`` on a temporary file next to ``path``, flushes it to disk
    (``fsync``), then renames it over ``path`` (``os.replace``): readers see the old file or the
    new one, never a partial one, also after a crash."""

    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "r+b") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def file_sha256(path: str | Path) -> str:
    r"""Returns the SHA-256 hex digest of a file (the checkpoint hash of fingerprints)."""

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_pretrained(prior: JointEBMPrior, directory: Path) -> None:
    r"""Writes ``model.safetensors`` and ``config.json`` (with the weights' SHA-256), each
    atomically (temporary file in the same directory, then ``os.replace``)."""

    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in prior.state_dict().items()}
    weights = directory / WEIGHTS_NAME
    atomic_write(weights, lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
    config = {**prior.config, "weights_sha256": file_sha256(weights)}
    text = json.dumps(config, sort_keys=True, indent=2)
    atomic_write(directory / CONFIG_NAME, lambda tmp: Path(tmp).write_text(text))


def read_weights(path: str, expected_sha256: str | None) -> dict[str, torch.Tensor]:
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


# -- model card ------------------------------------------------------------------------------


def model_card(
    prior: JointEBMPrior,
    repo_id: str | None = None,
    metrics: dict[str, float] | None = None,
    datasets: Sequence[str] | None = None,
) -> str:
    r"""Returns a model card (``README.md`` with Hub metadata) for a prior."""

    fp = prior.backbone or {}
    tags = ["ebm-prior", "energy-based-model", "vae", "latent-prior"]
    if fp.get("adapter"):
        tags.append(str(fp["adapter"]))
    meta = ["---", "library_name: ebm-prior", "tags:"] + [f"- {t}" for t in tags]
    if datasets:
        meta += ["datasets:"] + [f"- {d}" for d in datasets]
    if metrics:
        meta += ["metrics:"] + [f"- {k}" for k in metrics]
    meta.append("---")
    name = repo_id or "path/to/this/folder"
    lines = [
        *meta,
        "",
        "# Joint latent-space EBM prior",
        "",
        "A joint latent-space energy-based prior (Cui, Wu & Han, CVPR 2023) for a hierarchical "
        "VAE, trained with [ebm-prior](https://github.com/ebm-prior/ebm-prior).",
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
    if metrics:
        lines += ["", "## Metrics", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in metrics.items()]
    lines += [
        "",
        "## Usage",
        "",
        "```python",
        "from ebm_prior import EpsLangevin, JointEBMPrior",
        "from ebm_prior.hub import load_prior",
        "",
        f'prior = JointEBMPrior.from_pretrained("{name}")',
        f'# or, checked against your backbone: prior = load_prior("{name}", backbone=backbone)',
        "# sampler = EpsLangevin(prior, backbone, step_size=..., steps=...)",
        "```",
        "",
        f"Written by ebm-prior {prior.library_version}, config schema {SCHEMA_VERSION}.",
        "",
        "## Citation",
        "",
        "```bibtex",
        CITATION,
        "```",
        "",
    ]
    return "\n".join(lines)


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
    name_or_path: str | Path,
    backbone: Backbone | None = None,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | Path | None = None,
    local_files_only: bool = False,
    force_download: bool = False,
    check_hash: bool = True,
    map_location: str | torch.device = "cpu",
) -> JointEBMPrior:
    r"""Loads a prior from a local folder or a Hub repository, checked against ``backbone``.

    Arguments:
        name_or_path: A folder written by ``save_pretrained`` or a Hub repo id.
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
        metrics: Numbers for the model card (e.g. ``{"fid": 25.9}``).
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
