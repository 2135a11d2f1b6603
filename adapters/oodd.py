r"""hvae-oodd's ``DeepVAE`` models (``VAE``, ``LVAE``, ``BIVA``) as an :class:`ebm_prior.Backbone`.

How to obtain the backbone: clone https://github.com/JakobHavtorn/hvae-oodd (it has no licence
file, so this adapter copies none of its code and imports it from your clone at run time) and
point the environment variable ``OODD_ROOT`` at the clone (or put its ``oodd`` package on the
Python path). Importing its models needs ``numpy``, ``torchvision``, ``matplotlib``, ``seaborn``,
``pyyaml`` and ``tqdm`` (``pip install seaborn pyyaml`` on top of this library's extras).

The adapter reads :math:`z` and the parameters :math:`(\mu_i, \sigma_i)` of every conditional with
forward hooks on the package's stochastic layers (``stages[i].stochastic``, and
``td_stochastic`` / ``bu_stochastic`` in BIVA's intermediate stages) and writes
:math:`z_i = \mu_i + t \sigma_i \epsilon_i` back through the same hooks while the package's own
top-down pass (``DeepVAE.generate``) runs. Two things of the package it works around:

* ``sample_from_prior`` runs under ``torch.no_grad``, so :math:`T_b` would not be differentiable
  through it: the adapter calls ``generate`` directly;
* its ``forced_latent`` argument sets :math:`z`, not :math:`\epsilon`, and a forced latent of
  an upper group changes the conditionals below it: the adapter writes each group only once the
  package has computed that group's :math:`(\mu_i, \sigma_i)` from the groups above, and asks
  the layers not to draw (``sample=False``), so the global random state is left alone.

Group order: hvae-oodd lists its latents bottom-up (``stage_datas`` is ``[z_1, ..., z_L]``);
the adapter lists them **top first** (generation order). A BIVA intermediate stage has two
groups, generated top-down first (``td_stochastic``) then bottom-up (``bu_stochastic``).

The adapter is a :class:`ebm_prior.ood.GroupwiseBackbone`: it also gives
:math:`\log q(z_{>k} \mid x)` of the top groups alone, computed by the package's own pass with
the bottom stages decoded from the prior mode, exactly as its ``scripts/ood-llr.py`` does, so
:func:`ebm_prior.ood.hierarchical_bound` reproduces hvae-oodd's :math:`L^{>k}`.

Warning:
    Adapters follow third-party code and may change faster than the core.
"""

from __future__ import annotations

__all__ = ["OODDBackbone", "data_dependent_init", "import_oodd", "load_checkpoint"]

import hashlib
import importlib
import io
import math
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import ModuleType

import torch
import torch.nn as nn
from torch import Tensor

from ebm_prior import Posterior
from ebm_prior.ood import GroupwiseBackbone

#: Files of a checkpoint folder written by hvae-oodd's ``BaseModule.save``.
CLASS_FILE = "model_class_name.pt"
KWARGS_FILE = "model_kwargs.pt"
STATE_FILE = "model_state_dict.pt"


def import_oodd() -> ModuleType:
    r"""Imports hvae-oodd's ``oodd`` package (from ``OODD_ROOT`` when set) and returns it."""

    root = os.environ.get("OODD_ROOT")
    if root:
        root = os.path.abspath(os.path.expanduser(root))
        if not os.path.isdir(os.path.join(root, "oodd")):
            raise ImportError(
                f"OODD_ROOT={root!r} is not a clone of JakobHavtorn/hvae-oodd (no oodd/ folder)"
            )
        if root not in sys.path:
            sys.path.insert(0, root)
    try:
        oodd = importlib.import_module("oodd")
        importlib.import_module("oodd.models")
        importlib.import_module("oodd.layers.stages")
    except ImportError as e:
        raise ImportError(
            "the hvae-oodd adapter needs a clone of https://github.com/JakobHavtorn/hvae-oodd: "
            "set OODD_ROOT to it (its models also import seaborn and pyyaml: pip install "
            f"seaborn pyyaml); import failed with: {e}"
        ) from e
    return oodd


class _Stop(Exception):
    r"""Raised from a hook to end the package's pass once every group is read."""


def stochastic_layers(model: nn.Module) -> list[tuple[str, nn.Module, int]]:
    r"""Lists ``(name, layer, stage index)`` of a ``DeepVAE``'s stochastic layers, top first."""

    stages = importlib.import_module("oodd.layers.stages")
    out = []
    for k in reversed(range(len(model.stages))):
        stage = model.stages[k]
        if isinstance(stage, stages.BivaIntermediateStage):
            out.append((f"stages.{k}.td_stochastic", stage.td_stochastic, k))
            out.append((f"stages.{k}.bu_stochastic", stage.bu_stochastic, k))
        else:
            out.append((f"stages.{k}.stochastic", stage.stochastic, k))
    return out


def _uninitialised(model: nn.Module) -> list[str]:
    return [
        name
        for name, buf in model.named_buffers()
        if name.endswith("initialized") and not bool(buf)
    ]


@torch.no_grad()
def data_dependent_init(model: nn.Module, x: Tensor) -> nn.Module:
    r"""Runs hvae-oodd's data-dependent initialisation of its weight-normalised layers.

    Arguments:
        model: A freshly built ``DeepVAE``.
        x: A data batch with shape :math:`(B, C, H, W)`, :math:`B \geq 2`.

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
    return model


def load_checkpoint(
    path: str | os.PathLike, map_location: str | torch.device = "cpu"
) -> tuple[nn.Module, str]:
    r"""Loads a checkpoint folder written by hvae-oodd (``model.save(path)`` in its
    ``scripts/dvae_run.py``) without unpickling arbitrary objects.

    The folder holds ``model_class_name.pt`` (the class name), ``model_kwargs.pt`` (the
    constructor arguments: strings, numbers, lists and dicts) and ``model_state_dict.pt``; all
    three are read with ``torch.load(weights_only=True)``.

    Returns:
        The model (in eval mode) and the SHA-256 of its state-dict file.
    """

    oodd = import_oodd()
    path = os.fspath(path)
    files = [os.path.join(path, f) for f in (CLASS_FILE, KWARGS_FILE, STATE_FILE)]
    missing = [f for f in files if not os.path.exists(f)]
    if missing:
        raise FileNotFoundError(
            f"{path!s} is not an hvae-oodd checkpoint folder: missing "
            f"{[os.path.basename(f) for f in missing]}"
        )
    name = torch.load(files[0], weights_only=True)
    cls = getattr(oodd.models, name, None) if isinstance(name, str) else None
    if cls is None or not (isinstance(cls, type) and issubclass(cls, oodd.models.DeepVAE)):
        raise ValueError(f"{files[0]} names {name!r}, not a DeepVAE class of oodd.models")
    try:
        kwargs = torch.load(files[1], weights_only=True)
    except Exception as e:
        raise ValueError(
            f"{files[1]} holds more than plain constructor arguments (refusing to unpickle "
            f"arbitrary objects): {e}"
        ) from e
    kwargs = dict(kwargs)
    args = kwargs.pop("args", [])
    inner = kwargs.pop("kwargs", {})
    model = cls(*args, **inner, **kwargs)
    with open(files[2], "rb") as f:
        blob = f.read()
    state = torch.load(io.BytesIO(blob), map_location=map_location, weights_only=True)
    model.load_state_dict(state)
    model.to(map_location)
    return model.eval(), hashlib.sha256(blob).hexdigest()


class OODDBackbone(GroupwiseBackbone):
    r"""Creates the backbone contract over an hvae-oodd ``DeepVAE`` (``VAE``, ``LVAE``, ``BIVA``).

    In generation order (group 0 on top) the prior and its reparameterisation are

    .. math:: p_b(z) = \mathcal{N}(z_0; \mu_0, \sigma_0^2) \prod_{i \geq 1}
              \mathcal{N}(z_i; \mu_i(z_{<i}), \sigma_i^2(z_{<i})), \qquad
              z_i = \mu_i(z_{<i}) + t \, \sigma_i(z_{<i}) \, \epsilon_i,

    with :math:`(\mu_0, \sigma_0)` the package's top prior (standard normal unless it was
    learned), read from its own top-down pass. :math:`\log p(x \mid z)` and :meth:`decode` use
    the model's likelihood module (``likelihood_data.likelihood`` and ``.mean``), on data in the
    package's own scaling (binarised in :math:`\{0, 1\}`, or :math:`[0, 1]`).
    :attr:`data_range` is :math:`[0, 1]` for the likelihoods whose code fixes it (Bernoulli,
    Beta, and the discretised logistics, which map :math:`[0, 1]` to :math:`[-1, 1]`
    themselves), ``None`` (unchecked) for the Gaussian ones.

    Arguments:
        model: An initialised ``DeepVAE`` (see :func:`data_dependent_init`, or
            :meth:`from_checkpoint`).
        checkpoint_hash: Hash of the checkpoint the weights came from, when known.
    """

    adapter_name = "hvae-oodd"

    def __init__(self, model: nn.Module, checkpoint_hash: str | None = None):
        super().__init__()
        oodd = import_oodd()
        if not isinstance(model, oodd.models.DeepVAE):
            raise TypeError(
                f"model must be an hvae-oodd DeepVAE (VAE, LVAE or BIVA), got "
                f"{type(model).__name__}"
            )
        bad = _uninitialised(model)
        if bad:
            raise ValueError(
                f"the hvae-oodd model is not initialised ({len(bad)} weight-normalised layers, "
                f"e.g. {bad[0]!r}, have never run): call data_dependent_init(model, x) with a "
                "data batch of at least 2, or load a checkpoint, before wrapping it"
            )
        gaussian = importlib.import_module("oodd.layers.stochastic").GaussianStochasticModule
        self.model = model
        self._layers = stochastic_layers(model)
        for name, layer, _ in self._layers:
            if not isinstance(layer, gaussian):
                raise TypeError(
                    f"{name} is a {type(layer).__name__}; the adapter supports the package's "
                    "Gaussian stochastic layers (GaussianDense, GaussianConv2d)"
                )
        self._shapes = tuple(
            tuple(int(d) for d in layer.out_shape) for _, layer, _ in self._layers
        )
        self._x_shape = tuple(int(d) for d in model.input_shape)
        unit = ("Bernoulli", "Beta", "DiscretizedLogistic")
        if type(model.likelihood).__name__.startswith(unit):
            self.data_range = (0.0, 1.0)
        self.checkpoint_hash = checkpoint_hash

    @classmethod
    def from_checkpoint(
        cls, path: str | os.PathLike, map_location: str | torch.device = "cpu"
    ) -> OODDBackbone:
        r"""Loads an hvae-oodd checkpoint folder (see :func:`load_checkpoint`)."""

        model, digest = load_checkpoint(path, map_location)
        return cls(model, checkpoint_hash=digest)

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

        return [name for name, _, _ in self._layers]

    def _eps_to_z(self, eps: list[Tensor], t: float) -> list[Tensor]:
        def write(i: int, mu: Tensor, sigma: Tensor) -> Tensor:
            return mu + t * sigma * eps[i]

        return self._top_down(write, len(eps[0]))[0]

    def _z_to_eps(self, z: list[Tensor], t: float) -> list[Tensor]:
        eps: list[Tensor | None] = [None] * len(z)

        def read(i: int, mu: Tensor, sigma: Tensor) -> Tensor:
            eps[i] = (z[i] - mu) / (t * sigma)
            return z[i]

        self._top_down(read, len(z[0]))
        return eps

    def _log_prior_groups(self, z: list[Tensor]) -> list[Tensor]:
        out: list[Tensor | None] = [None] * len(z)

        def read(i: int, mu: Tensor, sigma: Tensor) -> Tensor:
            out[i] = _normal_log_prob(z[i], mu, sigma)
            return z[i]

        self._top_down(read, len(z[0]))
        return out

    def _log_prior(self, z: list[Tensor]) -> Tensor:
        return sum(self._log_prior_groups(z))

    def _posterior(self, x: Tensor) -> Posterior:
        z, log_q = self._infer(x, 0)
        return Posterior(z, sum(log_q))

    def _posterior_top(self, x: Tensor, k: int) -> Posterior:
        z, log_q = self._infer(x, k)
        top = len(z) - k
        return Posterior(z[:top], sum(log_q[:top]))

    def _log_likelihood(self, x: Tensor, z: list[Tensor]) -> Tensor:
        self._check_x_shape(x)
        if self.model.lambda_init is not None:
            x = self.model.lambda_init(x)
        return self._generate(z, x).likelihood

    def _decode(self, z: list[Tensor]) -> Tensor:
        return self._generate(z, None).mean

    # -- helpers ------------------------------------------------------------------------------

    def _stage_mask(self, k: int) -> list[bool]:
        r"""hvae-oodd's per-stage ``decode_from_p`` for the ``k`` bottom *groups*."""

        n = len(self._layers)
        bottom = {stage for _, _, stage in self._layers[n - k :]}
        upper = {stage for _, _, stage in self._layers[: n - k]}
        if bottom & upper:
            raise ValueError(
                f"k={k} splits a BIVA stage (its td and bu groups); hvae-oodd decodes whole "
                "stages from the prior: pick k so that both groups of a stage are on one side"
            )
        return [s in bottom for s in range(len(self.model.stages))]

    def _infer(self, x: Tensor, k: int) -> tuple[list[Tensor], list[Tensor | None]]:
        r"""Runs the package's forward pass (its ``L>k`` pass for ``k > 0``) and records the
        posterior sample and :math:`\log q` of every group it infers."""

        self._check_x_shape(x)
        n = len(self._layers)
        z: list[Tensor | None] = [None] * n
        log_q: list[Tensor | None] = [None] * n

        def post(i: int):
            def fn(module, args, kwargs, output):
                if kwargs.get("inference") is True:
                    zi, data = output
                    z[i] = zi
                    log_q[i] = _flat_sum(data.dist.log_prob(zi))
                return None

            return fn

        mask = self._stage_mask(k) if k > 0 else False
        with self._hooks(post=post):
            self.model(x, use_mode=mask, decode_from_p=mask)
        top = n - k
        missing = [self.layer_names[i] for i in range(top) if z[i] is None]
        if missing:  # pragma: no cover - would be a change in the package
            raise RuntimeError(f"the posterior pass never sampled {missing}")
        if k > 0:  # the bottom groups were decoded from the prior: not posterior samples
            z = [*z[:top], *[None] * k]
        return z, log_q

    def _top_down(
        self, fn: Callable[[int, Tensor, Tensor], Tensor], batch: int
    ) -> tuple[list[Tensor], None]:
        r"""Runs the package's prior pass up to the last group, replacing the sample of group
        ``i`` by ``fn(i, mu_i, sigma_i)``."""

        n = len(self._layers)
        z: list[Tensor | None] = [None] * n

        def post(i: int):
            def fn_post(module, args, kwargs, output):
                data = output[1]
                zi = fn(i, data.dist.loc, data.dist.scale)
                z[i] = zi
                if i == n - 1:
                    raise _Stop
                return zi, data._replace(z=zi)

            return fn_post

        with self._hooks(pre=self._prior_pre, post=post):
            try:
                self.model.generate(None, n_prior_samples=batch)
            except _Stop:
                pass
        return z, None

    def _generate(self, z: list[Tensor], x: Tensor | None):
        r"""Runs the package's prior pass with every group set to ``z`` and its likelihood
        module; returns the package's ``LikelihoodData``."""

        def post(i: int):
            def fn_post(module, args, kwargs, output):
                return z[i], output[1]._replace(z=z[i])

            return fn_post

        device = z[0].device
        devices = [device] if device.type == "cuda" else []
        # the likelihood module draws a sample we do not use: keep the global RNG as it was
        with self._hooks(pre=self._prior_pre, post=post), torch.random.fork_rng(devices):
            likelihood_data, _ = self.model.generate(None, x=x, n_prior_samples=len(z[0]))
        return likelihood_data

    def _prior_pre(self, i: int):
        name = self.layer_names[i]

        def fn_pre(module, args, kwargs):
            if kwargs.get("inference", True) is not False:  # pragma: no cover - package change
                raise RuntimeError(f"{name} ran in inference mode during a prior pass")
            return args, {**kwargs, "sample": False, "use_mode": False, "forced_latent": None}

        return fn_pre

    @contextmanager
    def _hooks(self, pre=None, post=None) -> Iterator[None]:
        handles = []
        try:
            for i, (_, layer, _) in enumerate(self._layers):
                if pre is not None:
                    handles.append(layer.register_forward_pre_hook(pre(i), with_kwargs=True))
                if post is not None:
                    handles.append(layer.register_forward_hook(post(i), with_kwargs=True))
            yield
        finally:
            for h in handles:
                h.remove()

    def _check_x_shape(self, x: Tensor) -> None:
        if tuple(x.shape[1:]) != self._x_shape:
            raise ValueError(
                f"x must have shape (B, {', '.join(map(str, self._x_shape))}) for this hvae-oodd "
                f"model, got {tuple(x.shape)}"
            )


def _flat_sum(x: Tensor) -> Tensor:
    return x.reshape(x.shape[0], -1).sum(1)


def _normal_log_prob(z: Tensor, mu: Tensor, sigma: Tensor) -> Tensor:
    return _flat_sum(-0.5 * ((z - mu) / sigma) ** 2 - sigma.log() - 0.5 * math.log(2 * math.pi))
