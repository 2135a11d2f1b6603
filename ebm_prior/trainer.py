r"""One trainer for the joint EBM prior: maximum likelihood, variational joint learning and
two-stage fine-tuning, with exact resume and DDP.

:class:`Trainer` runs one of the learning regimes of supplement 1.1 and 1.2 over any
:class:`~ebm_prior.Backbone` (see its docstring for the maths of each): ``"mle"``, maximum
likelihood with short-run posterior Langevin and no encoder (the paper's Table 1); ``"joint"``,
variational joint learning of the encoder, decoder, backbone prior and energy; ``"two_stage"``,
the energy alone on a frozen, pretrained backbone (optionally with the backbone's prior).
:class:`TwoStageTrainer` is ``Trainer(..., regime="two_stage")`` under its original signature.
Each regime is also available as helpers for a user's own loop
(:func:`~ebm_prior.mle_loss`, :func:`~ebm_prior.joint_loss`, :func:`~ebm_prior.two_stage_loss`).

Reproducibility is by construction:

* step :math:`k` uses the global batch of indices ``k * batch_size`` to
  ``(k + 1) * batch_size`` of a stream of permutations, one per epoch, each drawn from a
  generator seeded by ``(seed, epoch)`` (the last partial batch of an epoch is dropped);
* the global batch is split into chunks of ``chunk_size`` (gradient accumulation); chunk
  :math:`c` of step :math:`k` draws all its randomness (the posterior sample or posterior
  Langevin noise, the prior Langevin noise) from seeds derived from ``(seed, k, c)``;
  persistent posterior chains start from a draw seeded by ``seed`` and are saved in the
  checkpoint;
* with ``torch.distributed`` initialised, rank :math:`r` of :math:`W` runs the chunks
  :math:`c \equiv r \pmod W` and the gradients (and the persistent chains' new states) are
  summed with ``all_reduce``.

So a resumed run repeats the uninterrupted one exactly, and what is learned does not depend on
the number of processes (up to the order of floating-point sums). ``chunk_size`` is part of the
recipe: it decides which random streams the examples share, so changing it changes the draws
(not their law).
"""

from __future__ import annotations

__all__ = ["Trainer", "TrainingDivergenceError", "TwoStageTrainer"]
import functools
import hashlib
import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm.auto import tqdm

from .backbone import Backbone
from .hub import atomic_write
from .objectives import backbone_prior_loss, ebm_loss, joint_loss, mle_loss, sample_posterior
from .prior import JointEBMPrior
from .sample import EpsLangevin, LangevinDivergenceError

CHECKPOINT_NAME = "trainer.pt"
CHECKPOINT_FORMAT = 1
_PRIOR_KEYS = ("latent_shapes", "nef", "num_layers", "channels", "slope")
REGIMES = ("mle", "joint", "two_stage")
Regime = Literal["mle", "joint", "two_stage"]

#: Defaults of the options left as ``None``, per regime. ``"mle"``: the authors' 2-layer
#: settings (hierarchical-joint-ebm, ``train_cifar10.py``); ``"joint"``: the same (no released
#: settings exist for it); ``"two_stage"``: those of :class:`TwoStageTrainer`.
DEFAULTS: dict[str, dict[str, float | int | None]] = {
    "mle": dict(
        lr=2e-5, generator_lr=1e-4, backbone_prior_lr=1e-4, langevin_steps=60, step_size=0.4,
        posterior_steps=40, posterior_step_size=0.1,
    ),
    "joint": dict(
        lr=2e-5, generator_lr=1e-4, encoder_lr=1e-4, backbone_prior_lr=1e-4, langevin_steps=60,
        step_size=0.4,
    ),
    "two_stage": dict(lr=1e-4, langevin_steps=20, step_size=0.1),
}  # fmt: skip


class TrainingDivergenceError(FloatingPointError):
    r"""A loss or gradient became NaN or infinite; names the step and the quantity."""

    def __init__(self, step: int, what: str):
        self.step, self.what = step, what
        super().__init__(
            f"training diverged at step {step}: {what} is not finite; lower the learning rate "
            "or the Langevin step size, or raise the energy penalty reg"
        )


def derive_seed(*keys: int) -> int:
    r"""Returns a 63-bit seed that is a hash of the integer ``keys`` (stable across runs)."""

    digest = hashlib.sha256("/".join(str(int(k)) for k in keys).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


_WAIT_FOR_RELEASE = True  # turned off by the first timeout of _collective
_RELEASE_TIMEOUT_S = 1.0


def _collective(tensors: list[Tensor], op: Callable[..., Any]) -> None:
    r"""Runs ``op(t, async_op=True)`` on every tensor, waits, and returns only once the
    communication threads have let go of the tensors.

    A gloo worker thread releases its reference to a tensor after the work is marked complete,
    and that release takes the GIL (the tensor's Python object is decref'd). When it happens
    after the main thread has begun interpreter shutdown (a collective followed closely by the
    end of the script), the worker thread cannot take the GIL and the process aborts
    ("terminate called without an active exception"). While a C++ reference is alive the tensor
    holds one reference to its Python object, so the Python reference count falls back to its
    value before the collective exactly when the last C++ reference is gone; we wait for that
    (releasing the GIL) for at most ``_RELEASE_TIMEOUT_S``. Should a torch version keep the
    count up for good, the first timeout warns and turns the wait off.
    """

    global _WAIT_FOR_RELEASE
    before = _refcounts(tensors)
    works = [op(t, async_op=True) for t in tensors]
    while works:  # no name may keep a finished work (and so its tensor) alive
        works.pop().wait()
    if not _WAIT_FOR_RELEASE:
        return
    deadline = time.monotonic() + _RELEASE_TIMEOUT_S
    while _refcounts(tensors) != before:
        if time.monotonic() > deadline:
            _WAIT_FOR_RELEASE = False
            warnings.warn(
                "the communication backend still holds the tensors of a finished collective; "
                "no longer waiting for their release (a process may abort at exit)",
                RuntimeWarning,
                stacklevel=3,
            )
            return
        time.sleep(1e-4)


def _refcounts(tensors: list[Tensor]) -> list[int]:
    return [sys.getrefcount(t) for t in tensors]


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class Trainer:
    r"""Trains the joint EBM prior (and, by regime, the backbone) with exact resume and DDP.

    Every step draws negatives :math:`z^- = T_b(\epsilon)` by ``langevin_steps`` of eps-space
    Langevin (:class:`~ebm_prior.EpsLangevin`, step size ``step_size``, started at
    :math:`\epsilon \sim \mathcal{N}(0, I)`) and positives :math:`z^+` by regime, then takes one
    Adam step on the global batch :math:`x_{1:B}` with a learning rate per parameter group. With
    :math:`\overline{g} = \tfrac1B \sum_i g_i` and :math:`\mathrm{sg}` the stop-gradient:

    ``regime="mle"`` (maximum likelihood, supplement 1.1; no encoder, ``backbone.posterior``
    is never called): :math:`z_i^+` by ``posterior_steps`` of z-space Langevin with step size
    ``posterior_step_size`` on :math:`\log p(x_i \mid z) + f_a(z) + \log p_b(z)`, started at
    :math:`z \sim \mathcal{N}(0, I)` every step, or, with ``persistent=True``, at the state the
    example's chain reached at its previous visit (:func:`~ebm_prior.sample_posterior`). The loss
    (:func:`~ebm_prior.mle_loss`)

    .. math:: \mathcal{L} = -\overline{\log p_\theta(x_i \mid \mathrm{sg}\,z_i^+)}
              + \big(\overline{f_a(z_i^-)} - \overline{f_a(z_i^+)}\big)
              + \big(\overline{\log p_b(z_i^-)} - \overline{\log p_b(z_i^+)}\big)

    has gradient :math:`-\nabla \log p(x)` in every parameter when the chains have converged:
    the generator :math:`\theta` (``generator_params``, ``generator_lr``), the energy :math:`a`
    (``lr``, Eq. 5) and the backbone prior :math:`b` (``backbone_prior_params``,
    ``backbone_prior_lr``, Eq. 6). ``prior=None`` learns the generator under the Gaussian prior
    :math:`p_b` alone; the negatives are then exact draws :math:`T_b(\epsilon)`.

    ``regime="joint"`` (variational joint learning): :math:`z_i^+ \sim q_\phi(z \mid x_i)`,
    reparameterised, and the loss (:func:`~ebm_prior.joint_loss`)

    .. math:: \mathcal{L} = -\overline{\log p_\theta(x_i \mid z_i^+) + f_a(z_i^+)
              + \log p_b(z_i^+) - \log q_\phi(z_i^+ \mid x_i)}
              + \overline{f_a(\mathrm{sg}\,z_i^-) + \log p_b(\mathrm{sg}\,z_i^-)},

    the negative ELBO under the EBM prior with :math:`\nabla \log Z(a, b)` estimated from the
    negatives, over the encoder :math:`\phi` (``encoder_params``, ``encoder_lr``), the generator
    :math:`\theta`, the backbone prior :math:`b` and the energy :math:`a` at once.

    ``regime="two_stage"`` (supplement 1.2): :math:`z_i^+ \sim q(z \mid x_i)` from the frozen
    backbone and the loss :math:`\overline{f_a(z_i^-)} - \overline{f_a(z_i^+)}`, plus Eq. 6 over
    ``backbone_prior_params`` when given.

    Every regime adds :math:`\lambda \big(\overline{f_a(\mathrm{sg}\,z_i^-)^2}
    + \overline{f_a(\mathrm{sg}\,z_i^+)^2}\big)` with :math:`\lambda` = ``reg``. The backbone is
    put in eval mode with every parameter frozen except those of the groups named; a parameter
    belongs to one group at most. Options left as ``None`` take the regime's defaults
    (:data:`DEFAULTS`):

    =============  ======  ===========================  ===============  ================
    regime         ``lr``  generator, encoder and       negatives        positives
                           backbone-prior rates         (steps, ``s``)   (steps, ``s``)
    =============  ======  ===========================  ===============  ================
    ``mle``        2e-5    1e-4                         60, 0.4          40, 0.1
    ``joint``      2e-5    1e-4                         60, 0.4          :math:`q(z|x)`
    ``two_stage``  1e-4    ``lr`` (backbone prior)      20, 0.1          frozen :math:`q`
    =============  ======  ===========================  ===============  ================

    The ``mle`` row is the authors' 2-layer setting (Adam with betas (0.9, 0.999); ``s`` is the
    noise standard deviation, as in their code). Their code runs the prior chain in z space on
    :math:`f_a(z) + \log p_b(z)` from :math:`z \sim \mathcal{N}(0, I)`: the same target law as
    the exact eps-space target here, in other coordinates and from another start
    (:math:`\epsilon \sim \mathcal{N}(0, I)`, i.e. :math:`z \sim p_b`), so short chains of
    the same length and step size differ. Short-run posterior chains are themselves biased
    (not mixed, and ULA's step bias): the fixed point of the updates is the maximum-likelihood
    one only as the chains converge; ``persistent=True`` (with ``posterior_mala=True``) is
    the variant that reaches it on a linear-Gaussian model (see the tests).

    Arguments:
        prior: The energy to train, a :class:`JointEBMPrior` (on the backbone's device);
            ``None`` only with ``regime="mle"``.
        backbone: The backbone.
        data: A tensor :math:`(N, *)` or a map-style dataset whose items are ``x`` or tuples
            whose first element is ``x``, in the range the backbone expects.
        regime: ``"mle"``, ``"joint"`` or ``"two_stage"``.
        batch_size: Global batch size :math:`B` per step (over all processes).
        chunk_size: Examples per forward/backward pass (gradient accumulation); divides
            ``batch_size``; defaults to ``batch_size``.
        lr, betas, weight_decay: Adam settings; ``lr`` is the energy's learning rate.
        reg: L2 penalty :math:`\lambda` on the energy values.
        langevin_steps, step_size, t, target, mala, clip_grad: The negatives' sampler
            (see :class:`EpsLangevin`).
        generator_params: Parameters :math:`\theta` of the decoder :math:`p(x \mid z)`
            (``"mle"``, ``"joint"``; e.g. ``vae.decoder.parameters()``); ``None`` freezes them.
        generator_lr: Their learning rate.
        encoder_params: Parameters :math:`\phi` of :math:`q(z \mid x)` (``"joint"`` only).
        encoder_lr: Their learning rate.
        backbone_prior_params: Parameters :math:`b` of the backbone's prior (e.g.
            ``NVAEBackbone.prior_parameters()``, ``vae.prior_nets.parameters()``).
        backbone_prior_lr: Their learning rate (``"two_stage"``: default ``lr``).
        posterior_steps, posterior_step_size, posterior_mala: The positives' z-space sampler
            (``"mle"`` only).
        persistent: Keep one posterior chain per example across epochs (``"mle"`` only); the
            chains, :math:`N \times \dim z` values, live on the backbone's device and are saved
            in the checkpoint.
        seed: Seeds the data order and all sampling (see the module docstring).
        checkpoint_dir: Directory of ``trainer.pt``, written atomically by rank 0.
        checkpoint_every: Steps between checkpoints (and one at the end of :meth:`fit`).
        progress: Show a tqdm progress bar on rank 0.
        on_step: Called on rank 0 after every step as ``on_step(trainer, stats)``.

    Example:
        >>> from ebm_prior import HierarchicalVAE, JointEBMPrior
        >>> vae = HierarchicalVAE.from_config("digits")
        >>> prior = JointEBMPrior(vae.latent_shapes, nef=16)
        >>> x = torch.rand(64, 1, 8, 8).round()
        >>> trainer = Trainer(prior, vae, x, regime="mle", batch_size=16,
        ...                   generator_params=vae.decoder.parameters(),
        ...                   backbone_prior_params=vae.prior_nets.parameters(),
        ...                   langevin_steps=5, posterior_steps=5, progress=False)
        >>> history = trainer.fit(2)
        >>> sorted(history[-1])  # doctest: +NORMALIZE_WHITESPACE
        ['f_neg', 'f_pos', 'grad_norm', 'log_likelihood', 'log_p_neg', 'log_p_pos', 'loss',
         'seconds', 'step']
    """

    def __init__(
        self,
        prior: JointEBMPrior | None,
        backbone: Backbone,
        data: Tensor | torch.utils.data.Dataset,
        *,
        regime: Regime,
        batch_size: int,
        chunk_size: int | None = None,
        lr: float | None = None,
        betas: tuple[float, float] = (0.9, 0.999),
        weight_decay: float = 0.0,
        reg: float = 0.0,
        langevin_steps: int | None = None,
        step_size: float | None = None,
        t: float = 1.0,
        target: Literal["exact", "anchor"] = "exact",
        mala: bool = False,
        clip_grad: float | None = None,
        generator_params: Iterable[nn.Parameter] | None = None,
        generator_lr: float | None = None,
        encoder_params: Iterable[nn.Parameter] | None = None,
        encoder_lr: float | None = None,
        backbone_prior_params: Iterable[nn.Parameter] | None = None,
        backbone_prior_lr: float | None = None,
        posterior_steps: int | None = None,
        posterior_step_size: float | None = None,
        posterior_mala: bool = False,
        persistent: bool = False,
        seed: int = 0,
        checkpoint_dir: str | os.PathLike | None = None,
        checkpoint_every: int = 1000,
        progress: bool = True,
        on_step: Callable[[Trainer, dict[str, float]], None] | None = None,
    ):
        if regime not in REGIMES:
            raise ValueError(f"regime must be one of {list(REGIMES)}, got {regime!r}")
        if not isinstance(backbone, Backbone):
            raise TypeError(f"backbone must be a Backbone, got {type(backbone).__name__}")
        if prior is None and regime != "mle":
            raise ValueError(f"regime={regime!r} needs a prior; prior=None works with 'mle' only")
        if prior is not None and not isinstance(prior, nn.Module):
            raise TypeError(f"prior must be an nn.Module, got {type(prior).__name__}")
        if hasattr(prior, "latent_shapes") and tuple(prior.latent_shapes) != tuple(
            backbone.latent_shapes
        ):
            raise ValueError(
                f"prior latent shapes {list(prior.latent_shapes)} do not match the backbone's "
                f"{list(backbone.latent_shapes)}"
            )
        misplaced = {
            "generator_params": generator_params is not None and regime == "two_stage",
            "encoder_params": encoder_params is not None and regime != "joint",
            "posterior_steps": posterior_steps is not None and regime != "mle",
            "posterior_step_size": posterior_step_size is not None and regime != "mle",
            "posterior_mala": bool(posterior_mala) and regime != "mle",
            "persistent": bool(persistent) and regime != "mle",
        }
        misplaced = [k for k, v in misplaced.items() if v]
        if misplaced:
            raise ValueError(f"{', '.join(misplaced)}: not an option of regime={regime!r}")
        chunk_size = batch_size if chunk_size is None else chunk_size
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if not isinstance(chunk_size, int) or chunk_size < 1 or batch_size % chunk_size:
            raise ValueError(
                f"chunk_size must be a positive int dividing batch_size={batch_size}, "
                f"got {chunk_size!r}"
            )
        if len(data) < batch_size:
            raise ValueError(f"the data has {len(data)} examples, fewer than batch_size")
        if checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be >= 1, got {checkpoint_every}")
        defaults = DEFAULTS[regime]
        lr = float(defaults["lr"] if lr is None else lr)
        self.regime = regime
        self.prior, self.backbone, self.data = prior, backbone, data
        self.batch_size, self.chunk_size = batch_size, chunk_size
        self.reg, self.seed = float(reg), int(seed)
        self.sampler_kwargs = dict(
            step_size=float(defaults["step_size"] if step_size is None else step_size),
            steps=int(defaults["langevin_steps"] if langevin_steps is None else langevin_steps),
            t=float(t), target=target, mala=bool(mala), clip_grad=clip_grad,
        )  # fmt: skip
        self.posterior_kwargs: dict[str, Any] = {}
        if regime == "mle":
            self.posterior_kwargs = dict(
                steps=int(defaults["posterior_steps"] if posterior_steps is None
                          else posterior_steps),
                step_size=float(defaults["posterior_step_size"] if posterior_step_size is None
                                else posterior_step_size),
                mala=bool(posterior_mala),
            )  # fmt: skip
        self.persistent = bool(persistent)
        self.checkpoint_path = (
            None if checkpoint_dir is None else Path(checkpoint_dir) / CHECKPOINT_NAME
        )
        self.checkpoint_every = int(checkpoint_every)
        self.progress, self.on_step = progress, on_step
        self.rank, self.world_size = _world()
        self.device = backbone.device
        prior_params = [] if prior is None else list(prior.named_parameters())
        for name, p in prior_params:
            if p.device != self.device:
                raise ValueError(
                    f"prior parameter {name} is on {p.device}, the backbone on {self.device}"
                )

        # parameter groups: the energy, then the backbone's prior, generator and encoder
        backbone.eval().requires_grad_(False)
        names = {id(p): n for n, p in backbone.named_parameters()}
        seen = {id(p): "the prior" for _, p in prior_params}
        self.groups: dict[str, list[nn.Parameter]] = {}
        for group, params in (
            ("backbone_prior_params", backbone_prior_params),
            ("generator_params", generator_params),
            ("encoder_params", encoder_params),
        ):
            params = [] if params is None else list(params)
            for i, p in enumerate(params):
                if id(p) not in names:
                    raise ValueError(f"{group}[{i}] is not a parameter of the backbone")
                if id(p) in seen:
                    raise ValueError(
                        f"{group}[{i}] (backbone.{names[id(p)]}) is also in {seen[id(p)]}: "
                        "give every parameter one group"
                    )
                seen[id(p)] = group
                p.requires_grad_(True)
            self.groups[group] = params
        self.b_params = self.groups["backbone_prior_params"]
        self.b_names = [names[id(p)] for p in self.b_params]
        self.g_names = [names[id(p)] for p in self.groups["generator_params"]]
        self.e_names = [names[id(p)] for p in self.groups["encoder_params"]]
        if not prior_params and not any(self.groups.values()):
            raise ValueError("nothing to train: the prior has no parameters and no group is given")
        b_lr = defaults.get("backbone_prior_lr", None)
        b_lr = b_lr if backbone_prior_lr is None else backbone_prior_lr
        lrs = {
            "backbone_prior_params": lr if b_lr is None else float(b_lr),
            "generator_params": float(
                defaults.get("generator_lr", lr) if generator_lr is None else generator_lr
            ),
            "encoder_params": float(
                defaults.get("encoder_lr", lr) if encoder_lr is None else encoder_lr
            ),
        }
        groups = [{"params": [p for _, p in prior_params], "lr": lr}] if prior_params else []
        groups += [{"params": ps, "lr": lrs[g]} for g, ps in self.groups.items() if ps]
        self.optimizer = torch.optim.Adam(groups, betas=tuple(betas), weight_decay=weight_decay)
        self.config = {
            "seed": self.seed, "batch_size": batch_size, "chunk_size": chunk_size,
            "num_examples": len(data),
            "lr": lr, "betas": [float(b) for b in betas],
            "weight_decay": float(weight_decay), "reg": self.reg,
            "sampler": {k: v for k, v in self.sampler_kwargs.items()},
            "backbone_prior_params": self.b_names,
            "backbone_prior_lr": None if backbone_prior_lr is None else float(backbone_prior_lr),
            "prior": {k: v for k, v in getattr(prior, "config", {}).items() if k in _PRIOR_KEYS},
            "backbone": backbone.fingerprint(),
            "regime": regime,
        }  # fmt: skip
        if regime != "two_stage":  # two-stage checkpoints keep their original configuration
            self.config.update(
                prior_trained=prior is not None,
                backbone_prior_lr=lrs["backbone_prior_params"],
                generator_params=self.g_names, generator_lr=lrs["generator_params"],
                encoder_params=self.e_names, encoder_lr=lrs["encoder_params"],
                posterior={**self.posterior_kwargs, "persistent": self.persistent},
            )  # fmt: skip
        self.chains: list[Tensor] = []
        if self.persistent:  # N(0, I) drawn on the CPU: the same on every device and rank
            gen = torch.Generator().manual_seed(derive_seed(self.seed, 4))
            self.chains = [
                z.to(self.device)
                for z in backbone.sample_eps(len(data), generator=gen, device="cpu")
            ]
        self.stat_names = {
            "two_stage": ["loss", "f_pos", "f_neg"]
            + (["log_p_pos", "log_p_neg"] if self.b_params else []),
            "mle": ["loss", "log_likelihood", "f_pos", "f_neg", "log_p_pos", "log_p_neg"],
            "joint": ["loss", "elbo", "log_likelihood", "f_pos", "f_neg", "log_p_neg"],
        }[regime]
        self.step = 0
        self.history: list[dict[str, float]] = []
        self._broadcast_parameters()

    # -- data and randomness ---------------------------------------------------------------------

    @property
    def steps_per_epoch(self) -> int:
        r"""Full global batches per pass over the data (the remainder is dropped)."""

        return len(self.data) // self.batch_size

    def batch_indices(self, step: int) -> Tensor:
        r"""Returns the global batch of step ``step`` as indices into the data, shape ``(B,)``."""

        epoch, k = divmod(step, self.steps_per_epoch)
        gen = torch.Generator().manual_seed(derive_seed(self.seed, 0, epoch))
        perm = torch.randperm(len(self.data), generator=gen)
        return perm[k * self.batch_size : (k + 1) * self.batch_size]

    def _fetch(self, idx: Tensor) -> Tensor:
        if isinstance(self.data, Tensor):
            x = self.data[idx]
        else:
            items = [self.data[int(i)] for i in idx]
            items = [it[0] if isinstance(it, (tuple, list)) else it for it in items]
            x = torch.stack([torch.as_tensor(it) for it in items])
        return x.to(self.device, self.backbone.dtype, non_blocking=True)

    def _chunks(self) -> list[int]:
        n = self.batch_size // self.chunk_size
        return list(range(self.rank, n, self.world_size))

    # -- one step --------------------------------------------------------------------------------

    def _negatives(self, step: int, c: int, n: int) -> list[Tensor]:
        r"""The prior samples of chunk ``c`` of step ``step``: eps-space Langevin, or exact draws
        :math:`T_b(\epsilon)` without an energy."""

        gen = torch.Generator(self.device).manual_seed(derive_seed(self.seed, 1, step, c))
        if self.prior is None:
            with torch.no_grad():
                eps = self.backbone.sample_eps(n, generator=gen)
                return self.backbone.eps_to_z(eps, self.sampler_kwargs["t"])
        sampler = EpsLangevin(
            self.prior, self.backbone, generator=gen, trace=False, **self.sampler_kwargs
        )
        return sampler(sampler.init(n)).z

    def _chunk(
        self, step: int, c: int, x: Tensor, idx: Tensor
    ) -> tuple[Tensor, list[Tensor] | None]:
        r"""Runs chunk ``c`` of step ``step``: backward of its share of the loss; returns the
        statistics of :attr:`stat_names` weighted by the chunk's share, and the persistent
        chains' new states (``None`` without persistent chains)."""

        try:
            return self._chunk_loss(step, c, x, idx)
        except LangevinDivergenceError as e:
            if sys.version_info >= (3, 11):
                e.add_note(f"(in chunk {c} of training step {step})")
            raise

    def _chunk_loss(
        self, step: int, c: int, x: Tensor, idx: Tensor
    ) -> tuple[Tensor, list[Tensor] | None]:
        z_neg = self._negatives(step, c, len(x))
        z_new = None
        if self.regime == "two_stage":
            devices = [self.device] if self.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices), torch.no_grad():
                torch.manual_seed(derive_seed(self.seed, 2, step, c))
                z_pos = self.backbone.posterior(x).z
            out = ebm_loss(self.prior, z_pos, z_neg, reg=self.reg)
            loss = out.loss
            stats = [out.loss.detach(), out.f_pos, out.f_neg]
            if self.b_params:
                b = backbone_prior_loss(self.backbone, z_pos, z_neg)
                loss = loss + b.loss
                stats += [b.log_p_pos, b.log_p_neg]
        elif self.regime == "mle":
            gen = torch.Generator(self.device).manual_seed(derive_seed(self.seed, 3, step, c))
            z0 = [z[idx.to(z.device)] for z in self.chains] if self.persistent else None
            z_pos = sample_posterior(
                self.prior, self.backbone, x, z0, generator=gen, trace=False,
                **self.posterior_kwargs,
            ).z  # fmt: skip
            z_new = z_pos if self.persistent else None
            out = mle_loss(self.prior, self.backbone, x, z_pos, z_neg, reg=self.reg)
            loss = out.loss
            stats = [loss.detach(), *out[1:]]
        else:
            devices = [self.device] if self.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(derive_seed(self.seed, 2, step, c))
                post = self.backbone.posterior(x)
            out = joint_loss(self.prior, self.backbone, x, z_neg, posterior=post, reg=self.reg)
            loss = out.loss
            stats = [loss.detach(), *out[1:]]
        if not torch.isfinite(loss):
            raise TrainingDivergenceError(step, f"the loss of chunk {c} ({loss.item()})")
        share = len(x) / self.batch_size
        (loss * share).backward()
        return torch.stack([s.detach().double() * share for s in stats]), z_new

    def train_step(self) -> dict[str, float]:
        r"""Runs one optimisation step on the next global batch; returns its statistics
        (means over the global batch, identical on every rank)."""

        t0 = time.perf_counter()
        step = self.step
        idx = self.batch_indices(step)
        x_all = self._fetch(idx)
        self.optimizer.zero_grad(set_to_none=False)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        stats = torch.zeros(len(self.stat_names), device=self.device, dtype=torch.float64)
        chains = [torch.zeros((self.batch_size, *z.shape[1:]), device=z.device, dtype=z.dtype)
                  for z in self.chains]  # fmt: skip
        for c in self._chunks():
            rows = slice(c * self.chunk_size, (c + 1) * self.chunk_size)
            chunk_stats, z_new = self._chunk(step, c, x_all[rows], idx[rows])
            stats += chunk_stats
            for new, z in zip(chains, z_new or [], strict=False):
                new[rows] = z
        if self.world_size > 1:
            flat = torch.cat([p.grad.reshape(-1) for p in params])
            _collective([flat, stats, *chains], dist.all_reduce)  # a chain's row: one rank
            offset = 0
            for p in params:
                p.grad.copy_(flat[offset : offset + p.numel()].view_as(p))
                offset += p.numel()
        grad_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))
        if not torch.isfinite(grad_norm):
            bad = [n for n, p in self._named_trained() if not torch.isfinite(p.grad).all()]
            raise TrainingDivergenceError(step, f"the gradient of {', '.join(bad)}")
        self.optimizer.step()
        for store, new in zip(self.chains, chains, strict=True):
            store[idx.to(store.device)] = new
        self.step += 1
        out = {"step": self.step, **dict(zip(self.stat_names, stats.tolist(), strict=True))}
        out["grad_norm"] = float(grad_norm)
        out["seconds"] = time.perf_counter() - t0
        self.history.append(out)
        return out

    def _named_trained(self) -> list[tuple[str, nn.Parameter]]:
        named = [] if self.prior is None else list(self.prior.named_parameters())
        named = [(f"prior.{n}", p) for n, p in named]
        for names, group in (
            (self.b_names, "backbone_prior_params"),
            (self.g_names, "generator_params"),
            (self.e_names, "encoder_params"),
        ):
            named += [(f"backbone.{n}", p) for n, p in zip(names, self.groups[group], strict=True)]
        return named

    def _broadcast_parameters(self) -> None:
        if self.world_size > 1:
            data = [p.data for _, p in self._named_trained()]
            _collective(data, functools.partial(dist.broadcast, src=0))

    # -- the loop --------------------------------------------------------------------------------

    def fit(self, steps: int, resume: bool = True) -> list[dict[str, float]]:
        r"""Trains until ``self.step == steps`` (resuming from ``checkpoint_dir`` first when
        ``resume`` and a checkpoint exists); checkpoints every ``checkpoint_every`` steps and
        at the end. Returns the statistics of every step run so far."""

        if resume and self.checkpoint_path is not None and self.checkpoint_path.exists():
            self.load_checkpoint(self.checkpoint_path)
        show = self.progress and self.rank == 0
        desc = {"mle": "MLE", "joint": "joint learning", "two_stage": "two-stage EBM prior"}
        bar = tqdm(total=steps, initial=self.step, desc=desc[self.regime], disable=not show)
        with bar:
            while self.step < steps:
                stats = self.train_step()
                bar.update(1)
                shown = ("loss", "log_likelihood", "f_pos", "f_neg")
                bar.set_postfix({k: f"{stats[k]:.3g}" for k in shown if k in stats})
                if self.on_step is not None and self.rank == 0:
                    self.on_step(self, stats)
                if self.checkpoint_path is not None and self.step % self.checkpoint_every == 0:
                    self.save_checkpoint()
        if self.checkpoint_path is not None and self.step % self.checkpoint_every:
            self.save_checkpoint()
        return self.history

    # -- checkpoints -----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        r"""Everything needed to resume exactly: the step, the prior, the trained backbone
        parameters, the persistent chains, the optimizer, the history and the configuration."""

        def named(names: list[str], params: list[nn.Parameter]) -> dict[str, Tensor]:
            return {n: p.detach().cpu() for n, p in zip(names, params, strict=True)}

        state = {
            "format": CHECKPOINT_FORMAT,
            "step": self.step,
            "prior": {}
            if self.prior is None
            else {k: v.detach().cpu() for k, v in self.prior.state_dict().items()},
            "backbone_prior": named(self.b_names, self.b_params),
            "optimizer": self.optimizer.state_dict(),
            "history": self.history,
            "config": self.config,
        }
        if self.regime != "two_stage":
            state["generator"] = named(self.g_names, self.groups["generator_params"])
            state["encoder"] = named(self.e_names, self.groups["encoder_params"])
            state["chains"] = [z.detach().cpu() for z in self.chains]
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        r"""Restores :meth:`state_dict`; the configuration must match this trainer's."""

        if state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"not a trainer checkpoint of format {CHECKPOINT_FORMAT}")
        config = {"regime": "two_stage", **state["config"]}  # written before regimes existed
        diff = _diff(config, self.config)
        if diff:
            raise ValueError(
                "the checkpoint was written with a different configuration: "
                + "; ".join(f"{k}: checkpoint {a!r}, now {b!r}" for k, a, b in diff)
                + " (use another checkpoint_dir, or resume=False)"
            )
        if self.prior is not None:
            self.prior.load_state_dict(state["prior"], strict=True)
        with torch.no_grad():
            for key, names, group in (
                ("backbone_prior", self.b_names, "backbone_prior_params"),
                ("generator", self.g_names, "generator_params"),
                ("encoder", self.e_names, "encoder_params"),
            ):
                for n, p in zip(names, self.groups[group], strict=True):
                    p.copy_(state[key][n])
            for store, saved in zip(self.chains, state.get("chains", []), strict=True):
                store.copy_(saved)
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        self.history = list(state["history"])

    def save_checkpoint(self, path: str | os.PathLike | None = None) -> Path | None:
        r"""Writes :meth:`state_dict` atomically (rank 0; other ranks wait at a barrier)."""

        path = self.checkpoint_path if path is None else Path(path)
        if path is None:
            raise ValueError("no checkpoint path: pass one or set checkpoint_dir")
        if self.rank == 0:
            path.parent.mkdir(parents=True, exist_ok=True)
            state = self.state_dict()
            atomic_write(path, lambda tmp: torch.save(state, tmp))
        if self.world_size > 1:
            dist.barrier()
        return path

    def load_checkpoint(self, path: str | os.PathLike | None = None) -> None:
        r"""Reads a checkpoint written by :meth:`save_checkpoint` (``weights_only=True``)."""

        path = self.checkpoint_path if path is None else Path(path)
        try:
            state = torch.load(path, map_location=self.device, weights_only=True)
        except Exception as e:  # noqa: BLE001 - re-raised with the file named
            raise ValueError(f"cannot read trainer checkpoint {path}: {e}") from e
        self.load_state_dict(state)


class TwoStageTrainer(Trainer):
    r"""Fits a :class:`JointEBMPrior` two-stage on a frozen backbone, with exact resume and DDP:
    ``Trainer(..., regime="two_stage")`` under its original signature (and checkpoints).

    Each step minimises, over the global batch :math:`x_{1:B}`,

    .. math:: \mathcal{L}_a = \tfrac{1}{B} \sum_i \big(f_a(z_i^-) - f_a(z_i^+)\big)
              + \lambda \tfrac{1}{B} \sum_i \big(f_a(z_i^-)^2 + f_a(z_i^+)^2\big)

    with :math:`z_i^+ \sim q(z \mid x_i)` and :math:`z_i^-` from ``langevin_steps`` of
    eps-space Langevin, using Adam. With ``backbone_prior_params`` it also minimises
    :math:`\mathcal{L}_b = \tfrac{1}{B} \sum_i \log p_b(z_i^-) - \log p_b(z_i^+)` over those
    parameters (supplement Eq. 6), with learning rate ``backbone_prior_lr`` (default ``lr``).
    The arguments are those of :class:`Trainer`.

    Example:
        >>> from ebm_prior import HierarchicalVAE, JointEBMPrior
        >>> vae = HierarchicalVAE.from_config("digits")
        >>> prior = JointEBMPrior(vae.latent_shapes, nef=16)
        >>> x = torch.rand(64, 1, 8, 8).round()
        >>> trainer = TwoStageTrainer(prior, vae, x, batch_size=16, chunk_size=8,
        ...                           langevin_steps=5, step_size=0.1, progress=False)
        >>> history = trainer.fit(3)
        >>> trainer.step, sorted(history[-1])
        (3, ['f_neg', 'f_pos', 'grad_norm', 'loss', 'seconds', 'step'])
    """

    def __init__(
        self,
        prior: JointEBMPrior,
        backbone: Backbone,
        data: Tensor | torch.utils.data.Dataset,
        *,
        batch_size: int,
        chunk_size: int | None = None,
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        weight_decay: float = 0.0,
        reg: float = 0.0,
        langevin_steps: int = 20,
        step_size: float = 0.1,
        t: float = 1.0,
        target: Literal["exact", "anchor"] = "exact",
        mala: bool = False,
        clip_grad: float | None = None,
        backbone_prior_params: Iterable[nn.Parameter] | None = None,
        backbone_prior_lr: float | None = None,
        seed: int = 0,
        checkpoint_dir: str | os.PathLike | None = None,
        checkpoint_every: int = 1000,
        progress: bool = True,
        on_step: Callable[[Trainer, dict[str, float]], None] | None = None,
    ):
        super().__init__(
            prior, backbone, data, regime="two_stage", batch_size=batch_size,
            chunk_size=chunk_size, lr=lr, betas=betas, weight_decay=weight_decay, reg=reg,
            langevin_steps=langevin_steps, step_size=step_size, t=t, target=target, mala=mala,
            clip_grad=clip_grad, backbone_prior_params=backbone_prior_params,
            backbone_prior_lr=backbone_prior_lr, seed=seed, checkpoint_dir=checkpoint_dir,
            checkpoint_every=checkpoint_every, progress=progress, on_step=on_step,
        )  # fmt: skip


def _diff(a: Any, b: Any, key: str = "") -> list[tuple[str, Any, Any]]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k), b.get(k), f"{key}.{k}" if key else k)
        return out
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        a, b = list(a), list(b)
    if isinstance(a, float) and isinstance(b, float) and math.isclose(a, b, rel_tol=1e-12):
        return []
    return [] if a == b else [(key, a, b)]
