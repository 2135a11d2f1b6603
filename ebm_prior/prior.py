r"""The joint latent-space energy-based prior and its per-group energy networks."""

from __future__ import annotations

__all__ = ["ConvEnergy", "JointEBMPrior", "MLPEnergy"]

import json
import math
import numbers
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn as nn
from huggingface_hub import ModelCard
from torch import Tensor

from . import hub
from ._utils import Shape, as_int, check_latents, module_device, normalize_shapes
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
    (supplement Table 5, with ``channels=64`` and ``nef=200``). Every convolution halves both
    sides, so a side of 1 while the other is still above 4 (e.g. ``(c, 1, 8)``) cannot work and
    raises ``ValueError``; a map already at most 4x4 (``(c, 1, 4)``) needs no convolution.
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
            if h < 2 or w < 2:
                raise ValueError(
                    f"latent shape {tuple(shape)} cannot go through the conv energy: it halves "
                    "both sides (conv k=4, stride 2, padding 1) until each is at most 4, and a "
                    f"side of 1 cannot be halved (here {h}x{w}); use a shape whose sides stay "
                    ">= 2 until both are <= 4, or a vector group"
                )
            convs += [nn.Conv2d(c, channels, 4, 2, 1), nn.LeakyReLU(slope)]
            c, h, w = channels, max(h // 2, 1), max(w // 2, 1)
        self.convs = nn.Sequential(*convs)
        self.head = MLPEnergy(c * h * w, nef, num_layers, slope)

    def forward(self, z: Tensor) -> Tensor:
        return self.head(self.convs(z).flatten(1))


def _per_group(value: int | Sequence[int], n: int, name: str, minimum: int) -> tuple[int, ...]:
    many = isinstance(value, Iterable) and not isinstance(value, (str, bytes))
    values = tuple(value) if many else (value,) * n
    if len(values) != n:
        raise ValueError(f"{name} has {len(values)} entries, expected one per group ({n})")
    out = []
    for i, v in enumerate(values):
        try:
            v = as_int(v)
        except TypeError:
            raise TypeError(
                f"{name} must be an integer or one integer per group, got {value!r}"
            ) from None
        if v < minimum:
            kind = "positive" if minimum == 1 else "non-negative"
            raise ValueError(f"{name}: group {i} must be {kind}, got {v}")
        out.append(v)
    return tuple(out)


def _autocast_enabled(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4
        if device_type == "cpu":
            return torch.is_autocast_cpu_enabled()
        return torch.is_autocast_enabled()


class JointEBMPrior(
    nn.Module,
    hub.HubMixin,
    library_name="ebm-prior",
    tags=["ebm-prior", "energy-based-model", "vae", "latent-prior"],
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

    Every argument is checked here: shapes and sizes must be integers (``2.5`` or ``"3"`` raise
    ``TypeError``), ``nef`` and ``channels`` positive, ``num_layers`` non-negative, and a
    spatial group must fit the conv energy (see :class:`ConvEnergy`); errors name the group.
    Latents must have the dtype of the prior's weights (outside :func:`torch.autocast`).

    Arguments:
        latent_shapes: One shape per group, ``(d,)`` or ``(c, h, w)``, top group first.
        nef: Hidden width of the MLP layers, one int or one per group.
        num_layers: Number of hidden MLP layers, one int or one per group.
        channels: Conv channels for spatial groups, one int or one per group.
        slope: LeakyReLU negative slope.
        sampler_config: Keyword arguments of :class:`~ebm_prior.EpsLangevin` the prior was
            trained or evaluated with (recorded, not used here), so that
            ``EpsLangevin(prior, backbone, **prior.sampler_config)`` rebuilds that sampler;
            checked by :func:`ebm_prior.hub.check_sampler_config` (unknown keys and wrong types
            are refused).
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
        self.nef = _per_group(nef, n, "nef", 1)
        self.num_layers = _per_group(num_layers, n, "num_layers", 0)
        self.channels = _per_group(channels, n, "channels", 1)
        if isinstance(slope, bool) or not isinstance(slope, numbers.Real):
            raise TypeError(f"slope must be a number, got {slope!r}")
        if not math.isfinite(slope):
            raise ValueError(f"slope must be finite, got {slope!r}")
        self.slope = float(slope)
        self.sampler_config = hub.check_sampler_config(sampler_config)
        if backbone is not None:
            if not isinstance(backbone, dict):
                raise TypeError(f"backbone must be a fingerprint dict, got {backbone!r}")
            try:
                json.dumps(backbone, allow_nan=False)
            except (TypeError, ValueError) as e:
                raise TypeError(f"backbone fingerprint is not JSON: {e}") from None
        self.backbone = dict(backbone) if backbone is not None else None
        if not isinstance(library_version, str):
            raise TypeError(f"library_version must be a string, got {library_version!r}")
        self.library_version = library_version
        nets = []
        for i, (s, e, k, c) in enumerate(
            zip(self.latent_shapes, self.nef, self.num_layers, self.channels)
        ):
            try:
                nets.append(
                    MLPEnergy(s[0], e, k, self.slope)
                    if len(s) == 1
                    else ConvEnergy(s, e, k, c, self.slope)
                )
            except ValueError as err:
                raise ValueError(f"group {i}: {err}") from None
        self.nets = nn.ModuleList(nets)

    @property
    def num_groups(self) -> int:
        r"""Number of latent groups."""

        return len(self.latent_shapes)

    def check(self, z: Sequence[Tensor]) -> int:
        r"""Validates ``z`` (groups, shapes, dtype, device); returns the batch size."""

        batch = check_latents(z, self.latent_shapes, "z", device=module_device(self))
        dtype = next(iter(self.parameters())).dtype
        if z[0].dtype != dtype and not _autocast_enabled(z[0].device.type):
            raise TypeError(
                f"z[0] has dtype {z[0].dtype}, but the prior's weights are {dtype}: convert the "
                f"latents (zi.to({dtype})) or the prior (prior.to({z[0].dtype}))"
            )
        return batch

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

    # -- saving and loading (see ebm_prior.hub.HubMixin) ----------------------------------------

    _hub_weights_metadata = {"format": "pt"}
    _hub_schema_version = hub.SCHEMA_VERSION
    _hub_required = ("latent_shapes",)
    _hub_config_types = {
        "latent_shapes": hub.SHAPES,
        "nef": hub.INT_OR_INTS,
        "num_layers": hub.INT_OR_INTS,
        "channels": hub.INT_OR_INTS,
        "slope": hub.NUMBER,
        "sampler_config": hub.SAMPLER_CONFIG,
        "backbone": hub.FINGERPRINT,
    }

    def _hub_config(self) -> dict[str, Any]:
        return {**self.config, "sampler_config": hub.check_sampler_config(self.sampler_config)}

    @classmethod
    def _hub_migrate(cls, config: dict[str, Any], where: str) -> dict[str, Any]:
        return hub.migrate_config(config, where)

    def generate_model_card(self, *args, **kwargs) -> ModelCard:
        return ModelCard(hub.model_card(self, *args, **kwargs))

    def _energies(self, z: Sequence[Tensor]) -> Tensor:
        return torch.stack([net(zi) for net, zi in zip(self.nets, z)], dim=1)

    def _forward(self, z: Sequence[Tensor]) -> Tensor:
        out = self.nets[0](z[0])
        for net, zi in zip(self.nets[1:], z[1:]):
            out = out + net(zi)
        return out
