r"""The reference backbone: a multi-layer hierarchical VAE implementing the contract natively."""

from __future__ import annotations

__all__ = ["CONFIGS", "HierarchicalVAE"]

import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from huggingface_hub import ModelCard
from torch import Tensor

from . import hub
from ._utils import flat_sum
from ._version import __version__
from .backbone import GroupwiseBackbone, Posterior

LOG_2PI = math.log(2 * math.pi)

#: Named configurations. ``cifar10``/``celeba64`` follow the paper's 2-layer generator
#: (supplement Table 5): z2 (100) -> MLP 4x200 -> z1 (128) -> transposed-conv decoder,
#: Gaussian likelihood with sigma 0.3 on images in [-1, 1].
CONFIGS: dict[str, dict[str, Any]] = {
    "digits": dict(
        x_shape=(1, 8, 8), latent_dims=(8, 16), hidden=128, num_layers=2,
        net="mlp", likelihood="bernoulli",
    ),
    "mnist": dict(
        x_shape=(1, 28, 28), latent_dims=(16, 32), hidden=256, num_layers=2,
        net="conv", likelihood="bernoulli", channels=32,
    ),
    "cifar10": dict(
        x_shape=(3, 32, 32), latent_dims=(100, 128), hidden=200, num_layers=4,
        net="conv", likelihood="gaussian", sigma_x=0.3, channels=64,
    ),
    "celeba64": dict(
        x_shape=(3, 64, 64), latent_dims=(100, 128), hidden=200, num_layers=4,
        net="conv", likelihood="gaussian", sigma_x=0.3, channels=64,
    ),
}  # fmt: skip


def _mlp(d_in: int, d_out: int, hidden: int, num_layers: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(num_layers):
        layers += [nn.Linear(d_in, hidden), nn.LeakyReLU(0.2)]
        d_in = hidden
    layers.append(nn.Linear(d_in, d_out))
    return nn.Sequential(*layers)


def _conv_encoder(x_shape: Sequence[int], d_out: int, ch: int) -> nn.Sequential:
    c, h, w = x_shape
    layers: list[nn.Module] = [nn.Conv2d(c, ch, 3, 1, 1), nn.LeakyReLU(0.2)]
    while h > 8:
        layers += [nn.Conv2d(ch, ch * 2, 4, 2, 1), nn.LeakyReLU(0.2)]
        ch, h, w = ch * 2, h // 2, w // 2
    layers += [nn.Flatten(), nn.Linear(ch * h * w, d_out)]
    return nn.Sequential(*layers)


def _conv_decoder(d_in: int, x_shape: Sequence[int], ch: int) -> nn.Sequential:
    c, h, w = x_shape
    n_up = 0
    while h > 8:
        h, w, n_up = h // 2, w // 2, n_up + 1
    top = ch * 2**n_up
    layers: list[nn.Module] = [nn.Unflatten(1, (d_in, 1, 1))]
    layers += [nn.ConvTranspose2d(d_in, top, (h, w), 1, 0), nn.LeakyReLU(0.2)]
    for _ in range(n_up):
        layers += [nn.ConvTranspose2d(top, top // 2, 4, 2, 1), nn.LeakyReLU(0.2)]
        top //= 2
    layers.append(nn.Conv2d(top, c, 3, 1, 1))
    return nn.Sequential(*layers)


class _Gaussian(nn.Module):
    r"""Maps features to :math:`(\mu, \sigma)` with :math:`\sigma = \mathrm{softplus} + 0.01`."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, h: Tensor) -> tuple[Tensor, Tensor]:
        mu, raw = self.net(h).chunk(2, dim=-1)
        return mu, F.softplus(raw) + 1e-2


def _normal_log_prob(z: Tensor, mu: Tensor, sigma: Tensor) -> Tensor:
    return flat_sum(-0.5 * ((z - mu) / sigma) ** 2 - sigma.log() - 0.5 * LOG_2PI)


class HierarchicalVAE(
    GroupwiseBackbone,
    hub.HubMixin,
    library_name="ebm-prior",
    tags=["ebm-prior", "vae", "hierarchical-vae"],
):
    r"""Creates a multi-layer hierarchical VAE with vector latent groups.

    Generation (top group first, ``latent_dims[0]`` is the top):

    .. math:: z_1 \sim \mathcal{N}(0, I), \quad
              z_{k+1} \mid z_k \sim \mathcal{N}(\mu_k(z_k), \sigma_k(z_k)^2), \quad
              x \mid z_L \sim p(x \mid z_L)

    Every conditional's :math:`\sigma` depends on the group above (heteroscedastic, as in the
    paper). Inference is bottom-up and Markov,
    :math:`q(z \mid x) = q(z_L \mid x) \prod_{k<L} q(z_k \mid z_{k+1})`. It is a
    :class:`~ebm_prior.GroupwiseBackbone`: for the :math:`L^{>k}` scores of
    :mod:`ebm_prior.ood`, :meth:`posterior_top` holds the :math:`k` bottom groups at the mean of
    :math:`q` and draws the top groups given them (hvae-oodd's choice for its bottom-up ``VAE``).

    Arguments:
        x_shape: Data shape :math:`(c, h, w)`.
        latent_dims: Group sizes, top first (at least 2 groups).
        hidden: Hidden width of the MLPs.
        num_layers: Hidden layers of every MLP.
        net: ``"mlp"`` or ``"conv"`` encoder/decoder for :math:`x`.
        likelihood: ``"bernoulli"`` (data in [0, 1], logits decoder) or ``"gaussian"``
            (fixed standard deviation ``sigma_x``, data in [-1, 1]); sets :attr:`data_range`.
        sigma_x: Standard deviation of the Gaussian likelihood.
        channels: Base channel count of the conv encoder/decoder.

    Example:
        >>> vae = HierarchicalVAE.from_config("digits")
        >>> vae.latent_shapes
        ((8,), (16,))
        >>> z = vae.eps_to_z(vae.sample_eps(4))
        >>> vae.decode(z).shape
        torch.Size([4, 1, 8, 8])
    """

    adapter_name = "reference"

    def __init__(
        self,
        x_shape: Sequence[int] = (1, 8, 8),
        latent_dims: Sequence[int] = (8, 16),
        hidden: int = 128,
        num_layers: int = 2,
        net: Literal["mlp", "conv"] = "mlp",
        likelihood: Literal["bernoulli", "gaussian"] = "bernoulli",
        sigma_x: float = 0.3,
        channels: int = 32,
    ):
        super().__init__()
        if len(latent_dims) < 2:
            raise ValueError(f"need at least 2 latent groups, got latent_dims={latent_dims}")
        if net not in ("mlp", "conv"):
            raise ValueError(f"net must be 'mlp' or 'conv', got {net!r}")
        if likelihood not in ("bernoulli", "gaussian"):
            raise ValueError(f"likelihood must be 'bernoulli' or 'gaussian', got {likelihood!r}")
        self.x_shape = tuple(int(s) for s in x_shape)
        self.latent_dims = tuple(int(d) for d in latent_dims)
        self.likelihood = likelihood
        self.data_range = (0.0, 1.0) if likelihood == "bernoulli" else (-1.0, 1.0)
        self.sigma_x = float(sigma_x)
        self.config = dict(
            x_shape=self.x_shape, latent_dims=self.latent_dims, hidden=hidden,
            num_layers=num_layers, net=net, likelihood=likelihood, sigma_x=sigma_x,
            channels=channels,
        )  # fmt: skip
        dims, x_dim = self.latent_dims, math.prod(self.x_shape)
        # generative: p(z_{k+1} | z_k), then p(x | z_L)
        self.prior_nets = nn.ModuleList(
            _Gaussian(_mlp(dims[k], 2 * dims[k + 1], hidden, num_layers))
            for k in range(len(dims) - 1)
        )
        # inference: q(z_L | x), then q(z_k | z_{k+1})
        if net == "mlp":
            self.decoder = nn.Sequential(
                _mlp(dims[-1], x_dim, hidden, num_layers), nn.Unflatten(1, self.x_shape)
            )
            enc = nn.Sequential(nn.Flatten(), _mlp(x_dim, 2 * dims[-1], hidden, num_layers))
        else:
            self.decoder = _conv_decoder(dims[-1], self.x_shape, channels)
            enc = _conv_encoder(self.x_shape, 2 * dims[-1], channels)
        self.encoder_x = _Gaussian(enc)
        self.encoder_z = nn.ModuleList(
            _Gaussian(_mlp(dims[k + 1], 2 * dims[k], hidden, num_layers))
            for k in range(len(dims) - 1)
        )

    @classmethod
    def from_config(cls, name: str, **overrides: Any) -> HierarchicalVAE:
        r"""Creates a model from a named config of :data:`CONFIGS` (``digits``, ``mnist``,
        ``cifar10``, ``celeba64``), with keyword overrides."""

        if name not in CONFIGS:
            raise ValueError(f"unknown config {name!r}; available: {sorted(CONFIGS)}")
        return cls(**{**CONFIGS[name], **overrides})

    @property
    def latent_shapes(self) -> tuple[tuple[int, ...], ...]:
        return tuple((d,) for d in self.latent_dims)

    def _eps_to_z(self, eps: list[Tensor], t: float) -> list[Tensor]:
        z = [t * eps[0]]
        for k, net in enumerate(self.prior_nets):
            mu, sigma = net(z[-1])
            z.append(mu + t * sigma * eps[k + 1])
        return z

    def _z_to_eps(self, z: list[Tensor], t: float) -> list[Tensor]:
        eps = [z[0] / t]
        for k, net in enumerate(self.prior_nets):
            mu, sigma = net(z[k])
            eps.append((z[k + 1] - mu) / (t * sigma))
        return eps

    def _log_prior(self, z: list[Tensor]) -> Tensor:
        return sum(self._log_prior_groups(z))

    def _posterior(self, x: Tensor) -> Posterior:
        mu, sigma = self.encoder_x(x)
        z = [mu + sigma * torch.randn_like(mu)]
        log_q = _normal_log_prob(z[0], mu, sigma)
        for net in reversed(self.encoder_z):
            mu, sigma = net(z[0])
            z.insert(0, mu + sigma * torch.randn_like(mu))
            log_q = log_q + _normal_log_prob(z[0], mu, sigma)
        return Posterior(z, log_q)

    def _posterior_top(self, x: Tensor, k: int) -> Posterior:
        # Bottom-up inference: the k bottom groups sit at the mode (mean) of q, as hvae-oodd's
        # VAE does; the top groups are drawn given them and only they enter log q.
        n, top = self.num_groups, self.num_groups - k
        mu, sigma = self.encoder_x(x)
        z, log_q = [], torch.zeros(x.shape[0], dtype=mu.dtype, device=mu.device)
        nets = [*self.encoder_z, self.encoder_x]  # nets[i] gives q(z_i | group below, or x)
        for i in reversed(range(n)):
            if i < n - 1:
                mu, sigma = nets[i](z[0])
            if i >= top:
                z.insert(0, mu)
            else:
                z.insert(0, mu + sigma * torch.randn_like(mu))
                log_q = log_q + _normal_log_prob(z[0], mu, sigma)
        return Posterior(z[:top], log_q)

    def _log_prior_groups(self, z: list[Tensor]) -> list[Tensor]:
        out = [flat_sum(-0.5 * z[0] ** 2 - 0.5 * LOG_2PI)]
        for k, net in enumerate(self.prior_nets):
            mu, sigma = net(z[k])
            out.append(_normal_log_prob(z[k + 1], mu, sigma))
        return out

    def _log_likelihood(self, x: Tensor, z: list[Tensor]) -> Tensor:
        out = self.decoder(z[-1])
        if self.likelihood == "bernoulli":
            return -flat_sum(F.binary_cross_entropy_with_logits(out, x, reduction="none"))
        s = self.sigma_x
        return flat_sum(-0.5 * ((x - out) / s) ** 2 - math.log(s) - 0.5 * LOG_2PI)

    def _decode(self, z: list[Tensor]) -> Tensor:
        out = self.decoder(z[-1])
        return torch.sigmoid(out) if self.likelihood == "bernoulli" else out

    def elbo(self, x: Tensor) -> Tensor:
        r"""Returns the single-sample ELBO :math:`\log p(x|z) + \log p_b(z) - \log q(z|x)`,
        with shape :math:`(B,)`, under the Gaussian prior."""

        z, log_q = self.posterior(x)
        return self._log_likelihood(x, z) + self._log_prior(z) - log_q

    # -- saving and loading, as the prior (see ebm_prior.hub.HubMixin) --------------------------
    # save_pretrained / from_pretrained / push_to_hub write and read model.safetensors and
    # config.json (never a pickle, SHA-256 checked); after either, checkpoint_hash is the
    # weights file's SHA-256, so a prior bound to this model checks it on load_prior.

    _hub_model_type = "hierarchical-vae"
    _hub_config_types = {
        "x_shape": hub.INTS, "latent_dims": hub.INTS, "hidden": hub.INT, "num_layers": hub.INT,
        "net": hub.STR, "likelihood": hub.STR, "sigma_x": hub.NUMBER, "channels": hub.INT,
    }  # fmt: skip
    _hub_required = tuple(_hub_config_types)

    def _hub_config(self) -> dict[str, Any]:
        config = {k: list(v) if isinstance(v, tuple) else v for k, v in self.config.items()}
        return {
            "model_type": self._hub_model_type, **config,
            "library_version": __version__, "schema_version": self._hub_schema_version,
        }  # fmt: skip

    def _hub_weights_written(self, sha256: str) -> None:
        self.checkpoint_hash = sha256

    def generate_model_card(self, *args, **kwargs) -> ModelCard:
        return ModelCard(hub.backbone_card(self, *args, **kwargs))
