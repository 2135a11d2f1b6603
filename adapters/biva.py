r"""BIVA, LVAE and VAE models of ``biva-pytorch`` as an :class:`ebm_prior.Backbone`.

How to obtain the backbone: ``pip install biva-pytorch`` (MIT licence; it imports
``torchvision``, so install a ``torch``/``torchvision`` pair that load together). Its ``DeepVae``
class builds the three families of the package: ``VAE`` (``VaeStage``), ``LVAE``
(``LvaeStage``) and ``BIVA`` (``BivaStage``). The adapter wraps a built, *initialised*
``DeepVae`` (or loads a training session of the package's ``run_deepvae.py`` with
:meth:`BIVABackbone.from_logdir`); it never copies code from the package.

The adapter reads :math:`z`, :math:`\epsilon` and the prior parameters
:math:`(\mu_i, \sigma_i)` with forward hooks on the package's stochastic layers
(``DenseNormal`` / ``ConvNormal``) and writes :math:`z_i = \mu_i + t \sigma_i \epsilon_i` back
through the same hooks while the package's own top-down pass runs. The hooks live only for the
duration of one call: the wrapped model is left as it was.

Group order: ``biva-pytorch`` lists its latents bottom-up (``kl = [z_1, ..., z_L]``); the
adapter lists them **top first** (generation order). A BIVA intermediate stage has two groups,
generated top-down first (``td_stochastic``) then bottom-up (``bu_stochastic``).

Quirks of ``biva-pytorch`` 0.1.4 worth knowing:

* the log-variance goes through ``Softplus`` by default (``log_var_act``), so every conditional
  :math:`\sigma_i \geq 1` (the top prior is :math:`\mathcal{N}(0, I)`); pass
  ``log_var_act=None`` at construction for unconstrained variances;
* weight-normalised layers initialise themselves from the data on their *first* forward pass;
  a batch of one gives NaN (variance over one sample). The adapter refuses an uninitialised
  model; run :func:`data_dependent_init` on a data batch of two or more, or load a checkpoint;
* ``copy.deepcopy`` of a model fails once it has run (``torch.nn.utils.weight_norm`` stores a
  non-leaf ``weight``): rebuild from the constructor arguments and ``load_state_dict`` instead;
* the README's constructor example (``VAE(..., dropout=0.5)``) fails with "got multiple values
  for keyword argument 'dropout'": use ``q_dropout`` / ``p_dropout``.

Warning:
    Adapters follow third-party code and may change faster than the core.
"""

from __future__ import annotations

__all__ = ["BIVABackbone", "data_dependent_init", "load_hyperparameters"]

import hashlib
import importlib
import io
import json
import math
import os
import pickle
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ebm_prior import GroupwiseBackbone, Posterior

Likelihood = Literal["bernoulli", "discretized_logistic"]

_STOCHASTIC = ("DenseNormal", "ConvNormal")


def _biva():
    try:
        import biva
        import biva.model
        import biva.utils.discretized_mixture_logits
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the BIVA adapter needs biva-pytorch: pip install biva-pytorch (with a torch and "
            "torchvision pair that load together)"
        ) from e
    return biva


class _Stop(Exception):
    r"""Raised from a hook to end the package's forward pass once every group is read."""


def stochastic_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    r"""Lists the stochastic layers of a ``DeepVae`` in generation order (top group first)."""

    out = []
    for k in reversed(range(len(model.stages))):
        stage = model.stages[k]
        if hasattr(stage, "td_stochastic"):  # BIVA intermediate stage: td, then bu
            out.append((f"stages.{k}.td_stochastic", stage.td_stochastic))
            out.append((f"stages.{k}.bu_stochastic", stage.bu_stochastic))
        else:
            out.append((f"stages.{k}.stochastic", stage.stochastic))
    return out


def _uninitialised(model: nn.Module) -> list[str]:
    return [
        name
        for name, buf in model.named_buffers()
        if name.endswith("initialized") and not bool(buf)
    ]


@torch.no_grad()
def data_dependent_init(model: nn.Module, x: Tensor) -> nn.Module:
    r"""Runs the package's data-dependent initialisation of its weight-normalised layers.

    Arguments:
        model: A freshly built ``DeepVae`` (``VAE``, ``LVAE`` or ``BIVA``).
        x: A data batch with shape :math:`(B, C, H, W)`, :math:`B \geq 2` (a batch of one
            gives NaN: the initialisation divides by a variance over the batch).

    Returns:
        The same model, initialised, in the training mode it had.
    """

    if not isinstance(x, Tensor) or x.dim() < 2 or x.shape[0] < 2:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(
            f"data-dependent initialisation needs a data batch of at least 2, got {shape}"
        )
    training = model.training
    model.train()
    model(x)
    model.train(training)
    bad = _uninitialised(model)
    if bad:
        raise RuntimeError(f"layers still uninitialised after a forward pass: {bad}")
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            raise RuntimeError(f"data-dependent initialisation gave non-finite {name}")
    return model


class BIVABackbone(GroupwiseBackbone):
    r"""Creates the backbone contract over a ``biva-pytorch`` ``DeepVae``.

    The hierarchical prior and its reparameterisation, in generation order (group 0 on top),

    .. math:: p_b(z) = \mathcal{N}(z_0; 0, I) \prod_{i \geq 1}
              \mathcal{N}(z_i; \mu_i(z_{<i}), \sigma_i^2(z_{<i})), \qquad
              z_i = \mu_i(z_{<i}) + t \, \sigma_i(z_{<i}) \, \epsilon_i,

    with :math:`\sigma_i = \exp(\frac{1}{2} a(\ell_i))`, :math:`a` the model's ``log_var_act``
    (``Softplus`` by default), are read from the package's own top-down pass.

    It is a :class:`~ebm_prior.GroupwiseBackbone` (for the OOD scores
    :func:`ebm_prior.ood.hierarchical_bound`): :meth:`log_prior_groups` gives each
    :math:`\log p_b(z_i \mid z_{<i})`, and :meth:`posterior_top` draws the top :math:`L - k`
    groups with the :math:`k` bottom groups at the *mode* of :math:`q` wherever the inference
    pass uses them (a BIVA or VAE stage's bottom-up latent feeds the stages above it), as
    hvae-oodd's ``use_mode`` does; an LVAE's top groups do not depend on the bottom ones.

    The decoder output ``x_`` is interpreted by ``likelihood``:

    * ``"bernoulli"``: logits of independent Bernoulli pixels, :math:`x \in [0, 1]`
      (binarised MNIST in the package's experiments);
      :math:`\log p(x \mid z) = \sum x \log \sigma(\ell) + (1 - x) \log \sigma(-\ell)`.
    * ``"discretized_logistic"``: a mixture of ``K`` discretised logistics per RGB pixel
      (PixelCNN++ parameterisation, ``10 K`` output channels), :math:`x \in [-1, 1]`;
      evaluated with the package's ``discretized_mix_logistic_loss``. :meth:`decode` returns
      the mixture mean, clipped to :math:`[-1, 1]`.

    Arguments:
        model: An initialised ``DeepVae`` (see :func:`data_dependent_init`).
        likelihood: How to read the decoder output (above); sets :attr:`data_range`.
        checkpoint_hash: Hash of the checkpoint the weights came from, when known.

    Example:
        >>> from biva import BIVA, ConvNormal, DenseNormal
        >>> latents = [{"N": 2, "kernel": 3, "block": ConvNormal}, {"N": 3, "block": DenseNormal}]
        >>> stages = [[[8, 3, 1], [8, 3, 2]], [[8, 3, 1], [8, 3, 2]]]
        >>> model = BIVA(tensor_shp=(-1, 1, 8, 8), stages=stages, latents=latents)
        >>> model = data_dependent_init(model, torch.rand(4, 1, 8, 8).bernoulli())
        >>> backbone = BIVABackbone(model).eval()
        >>> backbone.latent_shapes
        ((3,), (2, 4, 4), (2, 4, 4))
        >>> z = backbone.eps_to_z(backbone.sample_eps(5))
        >>> backbone.log_prior(z).shape
        torch.Size([5])
    """

    adapter_name = "biva"

    def __init__(
        self,
        model: nn.Module,
        likelihood: Likelihood = "bernoulli",
        checkpoint_hash: str | None = None,
    ):
        super().__init__()
        biva = _biva()
        if not isinstance(model, biva.model.DeepVae):
            raise TypeError(
                f"model must be a biva DeepVae (VAE, LVAE or BIVA), got {type(model).__name__}"
            )
        bad = _uninitialised(model)
        if bad:
            raise ValueError(
                f"the BIVA model is not initialised ({len(bad)} weight-normalised layers, e.g. "
                f"{bad[0]!r}, have never run): call data_dependent_init(model, x) with a data "
                "batch of at least 2, or load a trained state_dict, before wrapping it"
            )
        self.model = model
        self._layers = stochastic_layers(model)
        for name, layer in self._layers:
            if type(layer).__name__ not in _STOCHASTIC:
                raise TypeError(
                    f"{name} is a {type(layer).__name__}; the adapter supports the package's "
                    f"Gaussian layers {_STOCHASTIC}"
                )
        self._shapes = tuple(
            tuple(int(d) for d in layer.output_shape[1:]) for _, layer in self._layers
        )

        shp = tuple(int(d) for d in model.input_tensor_shape[1:])
        self._x_shape = shp
        out_channels = self._out_channels()
        if likelihood == "bernoulli":
            if out_channels != shp[0]:
                raise ValueError(
                    f"likelihood 'bernoulli' needs one logit per input channel ({shp[0]}), but "
                    f"the model outputs {out_channels} channels"
                )
            self.nr_mix = None
        elif likelihood == "discretized_logistic":
            if shp[0] != 3 or out_channels % 10:
                raise ValueError(
                    "likelihood 'discretized_logistic' needs RGB inputs (3 channels) and 10 * K "
                    f"output channels; got {shp[0]} input and {out_channels} output channels"
                )
            self.nr_mix = out_channels // 10
        else:
            raise ValueError(
                f"likelihood must be 'bernoulli' or 'discretized_logistic', got {likelihood!r}"
            )
        self.likelihood = likelihood
        self.data_range = (0.0, 1.0) if likelihood == "bernoulli" else (-1.0, 1.0)
        self.checkpoint_hash = checkpoint_hash

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def from_logdir(
        cls,
        logdir: str | os.PathLike,
        likelihood: Likelihood | None = None,
        map_location: str | torch.device = "cpu",
    ) -> BIVABackbone:
        r"""Loads a training session written by the package's ``run_deepvae.py``.

        A session directory holds ``hyperparameters.p`` (the ``DeepVae`` keyword arguments,
        pickled), ``config.json`` (the command-line options) and ``model.pth`` (a state dict).
        The pickle is read with an allow-list (``biva`` classes, ``torch.nn`` activations and
        plain containers only) and the weights with ``torch.load(weights_only=True)``.

        Arguments:
            logdir: The session directory.
            likelihood: Overrides the likelihood read from ``config.json`` (``binmnist`` ->
                ``"bernoulli"``, ``cifar10`` -> ``"discretized_logistic"``).
            map_location: Where to load the weights.
        """

        biva = _biva()
        hyper = load_hyperparameters(os.path.join(logdir, "hyperparameters.p"))
        if likelihood is None:
            config_path = os.path.join(logdir, "config.json")
            dataset = None
            if os.path.exists(config_path):
                with open(config_path) as f:
                    dataset = json.load(f).get("dataset")
            known = {"binmnist": "bernoulli", "cifar10": "discretized_logistic"}
            if dataset not in known:
                raise ValueError(
                    f"cannot tell the likelihood of the session in {logdir!s} (dataset "
                    f"{dataset!r}); pass likelihood='bernoulli' or 'discretized_logistic'"
                )
            likelihood = known[dataset]
        model = biva.model.DeepVae(**hyper)
        weights = os.path.join(logdir, "model.pth")
        with open(weights, "rb") as f:
            blob = f.read()
        state = torch.load(io.BytesIO(blob), map_location=map_location, weights_only=True)
        model.load_state_dict(state)
        model.to(map_location)
        return cls(model, likelihood, checkpoint_hash=hashlib.sha256(blob).hexdigest())

    # -- contract -----------------------------------------------------------------------------

    @property
    def latent_shapes(self) -> tuple[tuple[int, ...], ...]:
        return self._shapes

    @property
    def x_shape(self) -> tuple[int, ...]:
        r"""Shape of one data point, :math:`(C, H, W)`."""

        return self._x_shape

    @property
    def layer_names(self) -> list[str]:
        r"""Names of the package's stochastic layers, one per group, top first."""

        return [name for name, _ in self._layers]

    def _eps_to_z(self, eps: list[Tensor], t: float) -> list[Tensor]:
        def write(i: int, mu: Tensor, sigma: Tensor) -> Tensor:
            return mu + t * sigma * eps[i]

        return self._top_down(write, len(eps[0]), stop=True)[0]

    def _z_to_eps(self, z: list[Tensor], t: float) -> list[Tensor]:
        eps = [None] * len(z)

        def read(i: int, mu: Tensor, sigma: Tensor) -> Tensor:
            eps[i] = (z[i] - mu) / (t * sigma)
            return z[i]

        self._top_down(read, len(z[0]), stop=True)
        return eps

    def _log_prior(self, z: list[Tensor]) -> Tensor:
        return sum(self._log_prior_groups(z))

    def _log_prior_groups(self, z: list[Tensor]) -> list[Tensor]:
        out: list[Tensor | None] = [None] * len(z)

        def read(i: int, mu: Tensor, sigma: Tensor) -> Tensor:
            out[i] = _normal_log_prob(z[i], mu, sigma)
            return z[i]

        self._top_down(read, len(z[0]), stop=True)
        return out

    def _posterior(self, x: Tensor) -> Posterior:
        return self._posterior_top(x, 0)

    def _posterior_top(self, x: Tensor, k: int) -> Posterior:
        r"""Runs the package's inference pass; the ``k`` bottom groups are replaced by the mean
        of their :math:`q` where it draws them, the others are recorded with their
        :math:`\log q`; stops once the top :math:`L - k` groups are drawn."""

        self._check_x_shape(x)
        top = len(self._layers) - k
        z: list[Tensor | None] = [None] * top
        log_q: list[Tensor | None] = [None] * top

        def hook(i: int):
            def fn(module, args, kwargs, output):
                if not kwargs.get("inference", False):
                    return None
                zi, data = output
                if i >= top:  # a bottom group: its mode, for the groups above that use it
                    mode = data["dist"].loc
                    return mode, {**data, "z": mode}
                z[i] = zi
                log_q[i] = _flat_sum(data["dist"].log_prob(zi))
                if all(v is not None for v in z):
                    raise _Stop
                return None

            return fn

        with self._hooks(post=hook):
            try:
                self.model(x)
            except _Stop:
                pass
        missing = [self.layer_names[i] for i, v in enumerate(z) if v is None]
        if missing:  # pragma: no cover - would be a change in the package
            raise RuntimeError(f"the posterior pass never sampled {missing}")
        return Posterior(z, sum(log_q))

    def _log_likelihood(self, x: Tensor, z: list[Tensor]) -> Tensor:
        self._check_x_shape(x)
        logits = self._logits(z)
        if self.likelihood == "bernoulli":
            if x.min() < 0 or x.max() > 1:
                raise ValueError("likelihood 'bernoulli' needs x in [0, 1]")
            ll = -F.binary_cross_entropy_with_logits(logits, x, reduction="none")
            return _flat_sum(ll)
        if x.min() < -1 or x.max() > 1:
            raise ValueError("likelihood 'discretized_logistic' needs x scaled to [-1, 1]")
        # ``biva.utils`` is shadowed by ``biva.model.utils`` after ``import biva``
        loss = importlib.import_module(
            "biva.utils.discretized_mixture_logits"
        ).discretized_mix_logistic_loss
        return -_flat_sum(loss(x, logits))

    def _decode(self, z: list[Tensor]) -> Tensor:
        logits = self._logits(z)
        if self.likelihood == "bernoulli":
            return torch.sigmoid(logits)
        return _mixture_mean(logits, self.nr_mix)

    # -- helpers ------------------------------------------------------------------------------

    def _logits(self, z: list[Tensor]) -> Tensor:
        def read(i: int, mu: Tensor, sigma: Tensor) -> Tensor:
            return z[i]

        return self._top_down(read, len(z[0]), stop=False)[1]

    def _top_down(
        self, fn: Callable[[int, Tensor, Tensor], Tensor], batch: int, stop: bool
    ) -> tuple[list[Tensor], Tensor | None]:
        r"""Runs the package's prior pass, replacing the sample of group ``i`` by
        ``fn(i, mu_i, sigma_i)``; returns the groups and, unless ``stop``, the decoder output."""

        n = len(self._layers)
        z: list[Tensor | None] = [None] * n

        def pre(i: int):
            def fn_pre(module, args, kwargs):
                if kwargs.get("inference", True):  # pragma: no cover - package change
                    raise RuntimeError(f"{self.layer_names[i]} ran in inference mode")
                return args, {**kwargs, "sample": False}  # no draw from the global RNG

            return fn_pre

        def post(i: int):
            def fn_post(module, args, kwargs, output):
                dist = output[1]["dist"]
                zi = fn(i, dist.loc, dist.scale)
                z[i] = zi
                if stop and i == n - 1:
                    raise _Stop
                return zi, {**output[1], "z": zi}

            return fn_post

        out = None
        with self._hooks(pre=pre, post=post):
            try:
                out = self.model.generate(None, N=batch)["x_"]
            except _Stop:
                pass
        return z, out

    @contextmanager
    def _hooks(self, pre=None, post=None) -> Iterator[None]:
        handles = []
        try:
            for i, (_, layer) in enumerate(self._layers):
                if pre is not None:
                    handles.append(layer.register_forward_pre_hook(pre(i), with_kwargs=True))
                if post is not None:
                    handles.append(layer.register_forward_hook(post(i), with_kwargs=True))
            yield
        finally:
            for h in handles:
                h.remove()

    def _out_channels(self) -> int:
        last = [
            m for m in self.model.projection.modules() if isinstance(m, nn.modules.conv._ConvNd)
        ]
        return int(last[-1].out_channels)

    def _check_x_shape(self, x: Tensor) -> None:
        if tuple(x.shape[1:]) != self._x_shape:
            raise ValueError(
                f"x must have shape (B, {', '.join(map(str, self._x_shape))}) for this BIVA "
                f"model, got {tuple(x.shape)}"
            )


def _flat_sum(x: Tensor) -> Tensor:
    return x.reshape(x.shape[0], -1).sum(1)


def _normal_log_prob(z: Tensor, mu: Tensor, sigma: Tensor) -> Tensor:
    return _flat_sum(-0.5 * ((z - mu) / sigma) ** 2 - sigma.log() - 0.5 * math.log(2 * math.pi))


def _mixture_mean(logits: Tensor, nr_mix: int) -> Tensor:
    r"""Mean of the PixelCNN++ mixture of logistics (RGB, channel coupling), clipped to [-1, 1].

    Within component :math:`k`, :math:`E[x_1] = m_1 + c_0 E[x_0]` and
    :math:`E[x_2] = m_2 + c_1 E[x_0] + c_2 E[x_1]`; the mixture mean weights them by
    :math:`\mathrm{softmax}(\pi)`.
    """

    b, _, h, w = logits.shape
    pi = logits[:, :nr_mix].softmax(1)  # (B, K, H, W)
    # unpacked as in the package: (B, H, W, 3 channels, 3K) = K means, K log-scales, K coeffs
    rest = logits[:, nr_mix:].permute(0, 2, 3, 1).reshape(b, h, w, 3, 3 * nr_mix)
    means = rest[..., :nr_mix]
    coeffs = torch.tanh(rest[..., 2 * nr_mix :])
    m0 = means[..., 0, :]
    m1 = means[..., 1, :] + coeffs[..., 0, :] * m0
    m2 = means[..., 2, :] + coeffs[..., 1, :] * m0 + coeffs[..., 2, :] * m1
    comp = torch.stack([m0, m1, m2], 1)  # (B, 3, H, W, K)
    mean = (comp * pi.permute(0, 2, 3, 1).unsqueeze(1)).sum(-1)
    return mean.clamp(-1, 1)


class _Unpickler(pickle.Unpickler):
    _TORCH = {
        ("torch.nn.modules.activation", n) for n in ("Softplus", "Tanh", "ELU", "ReLU", "Identity")
    }

    def find_class(self, module: str, name: str) -> Any:
        if module == "biva" or module.startswith("biva.") or (module, name) in self._TORCH:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"refusing to load {module}.{name} from a BIVA hyperparameter file (only biva "
            "classes and torch.nn activations are allowed)"
        )


def load_hyperparameters(path: str | os.PathLike) -> dict:
    r"""Reads the ``DeepVae`` keyword arguments pickled by ``run_deepvae.py``, safely.

    Only ``biva`` classes, a few ``torch.nn`` activations and plain containers are allowed;
    anything else raises :class:`pickle.UnpicklingError`.
    """

    _biva()
    with open(path, "rb") as f:
        hyper = _Unpickler(f).load()
    if not isinstance(hyper, dict):
        raise ValueError(f"{os.fspath(path)!s} does not hold a dict of DeepVae arguments")
    return hyper
