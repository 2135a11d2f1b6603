r"""The backbone contract: how the core sees any hierarchical VAE."""

from __future__ import annotations

__all__ = ["Backbone", "GroupwiseBackbone", "Posterior"]

import abc
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn as nn
from torch import Tensor

from ._utils import Shape, check_latents, module_device, module_dtype, normalize_shapes


class Posterior(NamedTuple):
    r"""A reparameterised sample of :math:`q(z \mid x)`.

    Attributes:
        z: One tensor per group, generation order (top first), each with shape :math:`(B, *)`.
        log_q: :math:`\log q(z \mid x)` at that sample, with shape :math:`(B,)`.
    """

    z: list[Tensor]
    log_q: Tensor


class Backbone(nn.Module, abc.ABC):
    r"""Abstract hierarchical VAE as seen by the core.

    A backbone has latent groups :math:`z = (z_1, \dots, z_L)` listed in **generation order**
    (top group first, as NVAE's decoder), a hierarchical Gaussian prior
    :math:`p_b(z) = p(z_{top}) \prod p_b(z_i \mid z_{above})`, its triangular
    reparameterisation :math:`T_b`

    .. math:: z_i = \mu_i(z_{<i}) + t \, \sigma_i(z_{<i}) \, \epsilon_i,
              \quad \epsilon_i \sim \mathcal{N}(0, I),

    an amortised posterior :math:`q(z \mid x)` and a decoder :math:`p(x \mid z)`.

    Public methods validate their inputs once (number of groups, shapes, dtype, device) and
    raise errors naming the group and the expected shape; subclasses implement the private
    ``_``-prefixed methods and the :attr:`latent_shapes` property. Latents travel as lists of
    tensors, one per group, batch first.
    """

    #: Short name of the backbone family, recorded in a prior's fingerprint.
    adapter_name: str = "custom"
    #: Hash of the checkpoint the backbone was loaded from, when known.
    checkpoint_hash: str | None = None
    #: The range ``(low, high)`` of the data ``x`` the backbone's encoder and likelihood expect
    #: (e.g. ``(0, 1)`` for a Bernoulli likelihood), or ``None`` (unchecked). The trainer
    #: refuses data outside it, integer data, and non-finite values.
    data_range: tuple[float, float] | None = None

    # -- to implement -------------------------------------------------------------------------

    @property
    @abc.abstractmethod
    def latent_shapes(self) -> tuple[Shape, ...]:
        r"""One shape per group, ``(d,)`` or ``(c, h, w)``, top group first."""

    @abc.abstractmethod
    def _eps_to_z(self, eps: list[Tensor], t: float) -> list[Tensor]: ...

    @abc.abstractmethod
    def _z_to_eps(self, z: list[Tensor], t: float) -> list[Tensor]: ...

    @abc.abstractmethod
    def _log_prior(self, z: list[Tensor]) -> Tensor: ...

    @abc.abstractmethod
    def _posterior(self, x: Tensor) -> Posterior: ...

    @abc.abstractmethod
    def _log_likelihood(self, x: Tensor, z: list[Tensor]) -> Tensor: ...

    @abc.abstractmethod
    def _decode(self, z: list[Tensor]) -> Tensor: ...

    # -- public, validating -------------------------------------------------------------------

    @property
    def num_groups(self) -> int:
        r"""Number of latent groups :math:`L`."""

        return len(self.latent_shapes)

    @property
    def device(self) -> torch.device:
        r"""Device of the backbone's parameters."""

        return module_device(self)

    @property
    def dtype(self) -> torch.dtype:
        r"""Floating dtype of the backbone's parameters."""

        return module_dtype(self)

    def check(self, latents: Sequence[Tensor], name: str = "z") -> int:
        r"""Validates per-group latents against :attr:`latent_shapes`; returns the batch size."""

        return check_latents(latents, normalize_shapes(self.latent_shapes), name)

    def eps_to_z(self, eps: Sequence[Tensor], t: float = 1.0) -> list[Tensor]:
        r"""Applies :math:`z = T_b(\epsilon)` at temperature ``t`` (differentiable in eps).

        Arguments:
            eps: Standard normal noise, one tensor per group with shape :math:`(B, *)`.
            t: Temperature; scales every :math:`\sigma_i` (NVAE's convention).

        Returns:
            The latents :math:`z`, same shapes as ``eps``.
        """

        self.check(eps, "eps")
        _check_t(t)
        return list(self._eps_to_z(list(eps), t))

    def z_to_eps(self, z: Sequence[Tensor], t: float = 1.0) -> list[Tensor]:
        r"""Applies :math:`\epsilon = T_b^{-1}(z)` (teacher-forced pass through the prior)."""

        self.check(z, "z")
        _check_t(t)
        return list(self._z_to_eps(list(z), t))

    def log_prior(self, z: Sequence[Tensor]) -> Tensor:
        r"""Returns :math:`\log p_b(z)` under the backbone's own prior, with shape :math:`(B,)`."""

        self.check(z, "z")
        return self._log_prior(list(z))

    def posterior(self, x: Tensor) -> Posterior:
        r"""Draws :math:`z \sim q(z \mid x)` (reparameterised) and returns it with
        :math:`\log q(z \mid x)`."""

        _check_x(x)
        return self._posterior(x)

    def log_likelihood(self, x: Tensor, z: Sequence[Tensor]) -> Tensor:
        r"""Returns :math:`\log p(x \mid z)` with shape :math:`(B,)`."""

        _check_x(x)
        batch = self.check(z, "z")
        if x.shape[0] != batch:
            raise ValueError(f"x has batch size {x.shape[0]} but z has {batch}")
        return self._log_likelihood(x, list(z))

    def decode(self, z: Sequence[Tensor]) -> Tensor:
        r"""Returns the mean of :math:`p(x \mid z)` (an image batch)."""

        self.check(z, "z")
        return self._decode(list(z))

    def sample_eps(
        self,
        batch: int,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> list[Tensor]:
        r"""Draws :math:`\epsilon \sim \mathcal{N}(0, I)` for every group, batch size ``batch``."""

        device = self.device if device is None else torch.device(device)
        dtype = self.dtype if dtype is None else dtype
        return [
            torch.randn((batch, *s), generator=generator, device=device, dtype=dtype)
            for s in normalize_shapes(self.latent_shapes)
        ]

    def fingerprint(self) -> dict:
        r"""Identifies the backbone: adapter name, latent shapes and checkpoint hash."""

        return {
            "adapter": self.adapter_name,
            "latent_shapes": [list(s) for s in normalize_shapes(self.latent_shapes)],
            "checkpoint_hash": self.checkpoint_hash,
        }


class GroupwiseBackbone(Backbone):
    r"""A backbone that also exposes its posterior and prior *per group*.

    The hierarchical bound of Havtorn et al. (2021), :func:`ebm_prior.ood.hierarchical_bound`,
    needs :math:`\log q(z_{>k} \mid x)` for the top groups alone and the prior terms
    :math:`\log p_b(z_i \mid z_{<i})` one by one; the base contract only gives their sums.
    Adapters that can split them subclass this class instead of :class:`Backbone` and implement
    :meth:`_posterior_top` and :meth:`_log_prior_groups`.
    """

    @abc.abstractmethod
    def _posterior_top(self, x: Tensor, k: int) -> Posterior: ...

    @abc.abstractmethod
    def _log_prior_groups(self, z: list[Tensor]) -> list[Tensor]: ...

    def posterior_top(self, x: Tensor, k: int) -> Posterior:
        r"""Draws the top :math:`L - k` groups from :math:`q` and returns their log-density.

        Backbones whose inference runs bottom-up (hvae-oodd's ``VAE``, the reference
        :class:`~ebm_prior.HierarchicalVAE`) condition the top groups on the *mode* of
        :math:`q` for the :math:`k` bottom groups, as hvae-oodd does.

        Arguments:
            x: A data batch with shape :math:`(B, *)`.
            k: Number of bottom groups left out, :math:`0 \leq k < L`.

        Returns:
            A :class:`Posterior` whose ``z`` lists the :math:`L - k` top groups (top first) and
            whose ``log_q`` is :math:`\log q(z_{>k} \mid x)`, with shape :math:`(B,)`.
        """

        check_k(k, self.num_groups)
        _check_x(x)
        return self._posterior_top(x, int(k))

    def log_prior_groups(self, z: Sequence[Tensor]) -> list[Tensor]:
        r"""Returns :math:`\log p_b(z_i \mid z_{<i})` per group (top first), each :math:`(B,)`."""

        self.check(z, "z")
        return list(self._log_prior_groups(list(z)))


def check_k(k: int, num_groups: int) -> None:
    r"""Checks the number of bottom groups :math:`k` of an :math:`L^{>k}` score."""

    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < num_groups:
        raise ValueError(
            f"k must be an int with 0 <= k < {num_groups} (the number of latent groups), got {k!r}"
        )


def _check_t(t: float) -> None:
    if not isinstance(t, (int, float)) or not t > 0:
        raise ValueError(f"temperature t must be a positive number, got {t!r}")


def _check_x(x: Tensor) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a tensor, got {type(x).__name__}")
    if x.dim() < 2:
        raise ValueError(f"x must be batch first with shape (B, *), got shape {tuple(x.shape)}")
