r"""The joint latent-space energy-based prior and its per-group energy networks."""

from __future__ import annotations

__all__ = ["ConvEnergy", "JointEBMPrior", "MLPEnergy"]

import inspect
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from huggingface_hub import ModelCard, PyTorchModelHubMixin, hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError
from torch import Tensor

from . import hub
from ._utils import Shape, check_latents, module_device, normalize_shapes
from ._version import __version__


class MLPEnergy(nn.Module):
    r"""Creates an energy network :math:`f(z) \in \mathbb{R}` for a vector group.

    ``num_layers`` hidden ``Linear(nef)`` + ``LeakyReLU(0.2)`` blocks, then ``Linear(1)``
    (supplement Table 5).

    Arguments:
        features: The group size :math:`d`; inputs have shape :math:`(B, d)`.
        nef: Hidden width.
        num_layers: Number of hidden layers.
    """

    def __init__(self, features: int, nef: int = 100, num_layers: int = 2, slope: float = 0.2):
        super().__init__()
        layers: list[nn.Module] = []
        width = features
        for _ in range(num_layers):
            layers += [nn.Linear(width, nef), nn.LeakyReLU(slope)]
            width = nef
        layers.append(nn.Linear(width, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Tensor:
        return self.net(z).squeeze(-1)


class ConvEnergy(nn.Module):
    r"""Creates an energy network for a spatial group of shape :math:`(c, h, w)`.

    Repeated ``Conv2d(k=4, stride=2, padding=1, channels)`` + ``LeakyReLU(0.2)`` until the map
    is at most 4x4, flatten, ``num_layers`` ``Linear(nef)`` + ``LeakyReLU``, ``Linear(1)``
    (supplement Table 5, with ``channels=64`` and ``nef=200``).
    """

    def __init__(
        self,
        shape: Shape,
        nef: int = 200,
        num_layers: int = 1,
        channels: int = 64,
        slope: float = 0.2,
    ):
        super().__init__()
        c, h, w = shape
        convs: list[nn.Module] = []
        while h > 4 or w > 4:
            convs += [nn.Conv2d(c, channels, 4, 2, 1), nn.LeakyReLU(slope)]
            c, h, w = channels, max(h // 2, 1), max(w // 2, 1)
        self.convs = nn.Sequential(*convs)
        self.head = MLPEnergy(c * h * w, nef, num_layers, slope)

    def forward(self, z: Tensor) -> Tensor:
        return self.head(self.convs(z).flatten(1))


def _per_group(value: int | Sequence[int], n: int, name: str) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * n
    value = tuple(int(v) for v in value)
    if len(value) != n:
        raise ValueError(f"{name} has {len(value)} entries, expected one per group ({n})")
    return value


class JointEBMPrior(
    nn.Module,
    PyTorchModelHubMixin,
    library_name="ebm-prior",
    tags=["ebm-prior", "energy-based-model", "vae", "latent-prior"],
    repo_url="https://github.com/ebm-prior/ebm-prior",
):
    r"""Creates a joint latent-space EBM prior over the groups of a hierarchical VAE.

    The prior tilts the backbone's hierarchical Gaussian prior :math:`p_b` by one energy
    network per group (Cui, Wu & Han, 2023):

    .. math:: p_{a,b}(z) = \frac{1}{Z(a, b)} \exp\Big(\sum_i f_{a_i}(z_i)\Big) p_b(z)

    A higher :math:`f` means more probable. Vector groups get an :class:`MLPEnergy`, spatial
    groups a :class:`ConvEnergy`.

    References:
        | Learning Joint Latent Space EBM Prior Model for Multi-layer Generator
          (Cui, Wu & Han, 2023)
        | https://arxiv.org/abs/2306.06323

    Arguments:
        latent_shapes: One shape per group, ``(d,)`` or ``(c, h, w)``, top group first.
        nef: Hidden width of the MLP layers, one int or one per group.
        num_layers: Number of hidden MLP layers, one int or one per group.
        channels: Conv channels for spatial groups, one int or one per group.
        slope: LeakyReLU negative slope.
        sampler_config: Langevin settings the prior was trained with (recorded, not used).
        backbone: The backbone's fingerprint (see :meth:`Backbone.fingerprint`), if known.
        library_version: Version of ``ebm-prior`` that wrote the config (set automatically).

    Example:
        >>> prior = JointEBMPrior([(8,), (4, 8, 8)], nef=32)
        >>> z = [torch.randn(5, 8), torch.randn(5, 4, 8, 8)]
        >>> prior(z).shape
        torch.Size([5])
        >>> prior.energies(z).shape
        torch.Size([5, 2])
    """

    def __init__(
        self,
        latent_shapes: Sequence[Sequence[int]],
        nef: int | Sequence[int] = 100,
        num_layers: int | Sequence[int] = 2,
        channels: int | Sequence[int] = 64,
        slope: float = 0.2,
        sampler_config: dict[str, Any] | None = None,
        backbone: dict[str, Any] | None = None,
        library_version: str = __version__,
    ):
        super().__init__()
        self.latent_shapes = normalize_shapes(latent_shapes)
        n = len(self.latent_shapes)
        self.nef = _per_group(nef, n, "nef")
        self.num_layers = _per_group(num_layers, n, "num_layers")
        self.channels = _per_group(channels, n, "channels")
        self.slope = float(slope)
        self.sampler_config = dict(sampler_config or {})
        self.backbone = dict(backbone) if backbone is not None else None
        self.library_version = library_version
        self.nets = nn.ModuleList(
            MLPEnergy(s[0], e, k, self.slope)
            if len(s) == 1
            else ConvEnergy(s, e, k, c, self.slope)
            for s, e, k, c in zip(self.latent_shapes, self.nef, self.num_layers, self.channels)
        )

    @property
    def num_groups(self) -> int:
        r"""Number of latent groups."""

        return len(self.latent_shapes)

    def check(self, z: Sequence[Tensor]) -> int:
        r"""Validates ``z`` (groups, shapes, dtype, device); returns the batch size."""

        return check_latents(z, self.latent_shapes, "z", device=module_device(self))

    def energies(self, z: Sequence[Tensor]) -> Tensor:
        r"""Returns the per-group energies :math:`f_{a_i}(z_i)`, with shape :math:`(B, L)`."""

        self.check(z)
        return self._energies(z)

    def forward(self, z: Sequence[Tensor]) -> Tensor:
        r"""Returns :math:`f_a(z) = \sum_i f_{a_i}(z_i)`, with shape :math:`(B,)`.

        Arguments:
            z: One tensor per group, top first, each with shape :math:`(B, *)`.
        """

        self.check(z)
        return self._energies(z).sum(dim=1)

    @property
    def config(self) -> dict[str, Any]:
        r"""Everything needed to rebuild the prior (written to ``config.json``)."""

        return {
            "latent_shapes": [list(s) for s in self.latent_shapes],
            "nef": list(self.nef),
            "num_layers": list(self.num_layers),
            "channels": list(self.channels),
            "slope": self.slope,
            "sampler_config": self.sampler_config,
            "backbone": self.backbone,
            "library_version": __version__,
            "schema_version": hub.SCHEMA_VERSION,
        }

    # -- Hub mixin hooks (see ebm_prior.hub) ----------------------------------------------------

    def _save_pretrained(self, save_directory: Path) -> None:
        hub.write_pretrained(self, Path(save_directory))

    def generate_model_card(self, *args, **kwargs) -> ModelCard:
        return ModelCard(hub.model_card(self, **kwargs))

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | Path,
        *,
        force_download: bool = False,
        token: str | bool | None = None,
        cache_dir: str | Path | None = None,
        local_files_only: bool = False,
        revision: str | None = None,
        **model_kwargs,
    ) -> JointEBMPrior:
        r"""Loads a prior saved by :meth:`save_pretrained` from a folder or a Hub repo id.

        Only ``model.safetensors`` is ever read (never a pickle); its SHA-256 is checked
        against ``config.json``, and older config schemas are migrated
        (:func:`ebm_prior.hub.migrate_config`). ``strict`` defaults to ``True`` and
        ``map_location`` to ``"cpu"``. To check the prior against a backbone, use
        :func:`ebm_prior.hub.load_prior`.
        """

        hub_kwargs = dict(
            revision=revision, cache_dir=cache_dir, force_download=force_download,
            token=token, local_files_only=local_files_only,
        )  # fmt: skip
        path = _resolve(str(pretrained_model_name_or_path), hub.CONFIG_NAME, hub_kwargs)
        with open(path, encoding="utf-8") as f:
            config = hub.migrate_config(json.load(f))
        params = inspect.signature(cls.__init__).parameters
        for key, value in config.items():
            if key in params and key != "library_version":
                model_kwargs.setdefault(key, value)
        model_kwargs.setdefault("library_version", config["library_version"])
        model_kwargs["weights_sha256"] = config.get("weights_sha256")
        model_kwargs.setdefault("strict", True)
        return super().from_pretrained(pretrained_model_name_or_path, **hub_kwargs, **model_kwargs)

    @classmethod
    def _from_pretrained(
        cls,
        *,
        model_id: str,
        revision: str | None,
        cache_dir: str | Path | None,
        force_download: bool,
        local_files_only: bool,
        token: str | bool | None,
        map_location: str | torch.device = "cpu",
        strict: bool = True,
        weights_sha256: str | None = None,
        **model_kwargs,
    ) -> JointEBMPrior:
        hub_kwargs = dict(
            revision=revision, cache_dir=cache_dir, force_download=force_download,
            token=token, local_files_only=local_files_only,
        )  # fmt: skip
        path = _resolve(model_id, hub.WEIGHTS_NAME, hub_kwargs)
        try:
            state = hub.read_weights(path, weights_sha256)
        except hub.PriorFileError:
            if not os.path.isdir(model_id):  # drop the bad download from the cache
                Path(os.path.realpath(path)).unlink(missing_ok=True)
                Path(path).unlink(missing_ok=True)
            raise
        model = cls(**model_kwargs)
        model.load_state_dict(state, strict=strict)
        return model.to(map_location)

    def _energies(self, z: Sequence[Tensor]) -> Tensor:
        return torch.stack([net(zi) for net, zi in zip(self.nets, z)], dim=1)

    def _forward(self, z: Sequence[Tensor]) -> Tensor:
        out = self.nets[0](z[0])
        for net, zi in zip(self.nets[1:], z[1:]):
            out = out + net(zi)
        return out


def _resolve(model_id: str, filename: str, hub_kwargs: dict) -> str:
    r"""Returns the local path of ``filename`` in a folder or a Hub repository."""

    if os.path.isdir(model_id):
        path = os.path.join(model_id, filename)
        if not os.path.isfile(path):
            raise hub.PriorFileError(f"no {filename} in {model_id}: not a saved ebm-prior")
        return path
    try:
        return hf_hub_download(repo_id=model_id, filename=filename, **hub_kwargs)
    except EntryNotFoundError as e:
        if isinstance(e, LocalEntryNotFoundError):  # offline or unreachable: not our call
            raise
        rev = hub_kwargs.get("revision") or "main"
        raise hub.PriorFileError(
            f"{model_id}@{rev} has no {filename}: not an ebm-prior repository "
            "(ebm-prior reads only config.json and model.safetensors, never pickles)"
        ) from e
