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
* the global batch is split into chunks of ``chunk_size`` (gradient accumulation), each fetched
  by a :class:`~torch.utils.data.DataLoader` whose batch sampler yields the chunks of this
  process only (optionally in ``num_workers`` worker processes); chunk
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

__all__ = ["Trainer", "TrainingDivergenceError", "TwoStageTrainer", "plot_history", "read_history"]

import contextlib
import csv
import functools
import hashlib
import importlib.util
import io
import logging
import math
import os
import re
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm.auto import tqdm

from .backbone import Backbone
from .hub import _new_temp_file, atomic_write
from .objectives import backbone_prior_loss, ebm_loss, joint_loss, mle_loss, sample_posterior
from .prior import JointEBMPrior
from .sample import EpsLangevin, LangevinDivergenceError, ula_gaussian_bias

CHECKPOINT_NAME = "trainer.pt"
CHECKPOINT_FORMAT = 1
HISTORY_NAME = "history.csv"
FIGURE_NAME = "history.png"
#: Temporary files of :func:`~ebm_prior.hub.atomic_write` next to the trainer's files.
_STALE = re.compile(r"\.(trainer\.pt|history\.csv|history\.png)\.[0-9a-f]{12}\.tmp")
#: Seconds after which such a file, no longer being written, is taken as a crashed write's.
_STALE_AGE = 600.0
_PRIOR_KEYS = ("latent_shapes", "nef", "num_layers", "channels", "slope")
REGIMES = ("mle", "joint", "two_stage")
Regime = Literal["mle", "joint", "two_stage"]

logger = logging.getLogger(__name__)

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
    count up for good, the first timeout warns and turns the wait off. (A script that ends with
    ``dist.barrier()`` and ``dist.destroy_process_group()`` is safe without the wait: destroying
    the group joins gloo's worker threads. The wait protects scripts that end otherwise.)
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


def _warn_chain_bias(backbone: Backbone, step_size: float, steps: int, **_: Any) -> None:
    r"""Warns when the unadjusted prior chain's own bias (:func:`ula_gaussian_bias`), which Eq.
    6 would absorb into the backbone prior, exceeds 0.1 nats."""

    dim = sum(math.prod(shape) for shape in backbone.latent_shapes)
    if not 0 < step_size < 2 or (bias := ula_gaussian_bias(dim, step_size, steps)) <= 0.1:
        return
    warnings.warn(
        f"the backbone prior is learned (Eq. 6) from unadjusted Langevin negatives ({steps} "
        f"steps of s = {step_size} over {dim} latent dimensions) whose discretisation alone puts "
        f"them {bias:.2f} nats below the base prior: Eq. 6 will shrink the prior's scales to "
        "close that gap, whatever the data. Use mala=True (--mala), or a smaller step size",
        UserWarning,
        stacklevel=3,
    )


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
    ``prior=None`` trains the backbone by its own ELBO under the Gaussian prior,
    :math:`\mathcal{L} = -\overline{\log p_\theta(x_i \mid z_i^+) + \log p_b(z_i^+)
    - \log q_\phi(z_i^+ \mid x_i)}`, with no negatives (:math:`p_b` is normalised): the
    Gaussian baseline of the variational regime, with the same resume and DDP guarantees.

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

    The unadjusted prior chain has a bias of its own that grows with the latent dimension
    :math:`D`: from :math:`\epsilon \sim \mathcal{N}(0, I)` it over-disperses the base, and its
    negatives sit :func:`~ebm_prior.ula_gaussian_bias` nats below it even where
    :math:`f_a = 0` (1.0 nat at the ``mle`` row's settings with :math:`D = 48`; 89 nats for a
    32x32 NVAE with :math:`D = 9216`, 20 steps of :math:`s = 0.3`). Eq. 6 then shrinks the
    backbone prior's scales to close that gap, whatever the data; the trainer warns when the
    backbone prior is learned from such a chain and the bias exceeds 0.1 nats. ``mala=True``
    removes it (exact at any step size).

    Arguments:
        prior: The energy to train, a :class:`JointEBMPrior` (on the backbone's device);
            ``None`` (the Gaussian prior alone) with ``regime="mle"`` or ``"joint"``.
        backbone: The backbone.
        data: A floating-point tensor :math:`(N, *)` or a map-style dataset whose items are
            ``x`` or tuples whose first element is ``x``, with finite values in the backbone's
            :attr:`~ebm_prior.Backbone.data_range` (checked: a tensor at construction, every
            chunk loaded on the CPU before its step; integer images are refused).
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
        num_workers: Worker processes of the :class:`~torch.utils.data.DataLoader` that
            fetches each process's chunks (``0``: in the main process). A tensor on an
            accelerator needs ``0``.
        checkpoint_dir: Directory of ``trainer.pt`` (written atomically by rank 0),
            ``history.csv`` (one row per step, appended as the steps run) and, with matplotlib
            installed, ``history.png`` (:func:`plot_history`, at the end of :meth:`fit`). It is
            created if needed and must be writable (checked at construction); temporary files
            of an interrupted write (untouched for 10 minutes) are removed.
        checkpoint_every: Steps between checkpoints (and one at the end of :meth:`fit`).
        progress: Show a tqdm progress bar on rank 0: ``None`` (default) when standard error
            is a terminal, ``True`` always, ``False`` never.
        on_step: Called on rank 0 after every step as ``on_step(trainer, stats)``.

    Example:
        >>> from ebm_prior import HierarchicalVAE, JointEBMPrior
        >>> vae = HierarchicalVAE.from_config("digits")
        >>> prior = JointEBMPrior(vae.latent_shapes, nef=16)
        >>> x = torch.rand(64, 1, 8, 8).round()
        >>> trainer = Trainer(prior, vae, x, regime="mle", batch_size=16,
        ...                   generator_params=vae.decoder.parameters(),
        ...                   backbone_prior_params=vae.prior_nets.parameters(),
        ...                   langevin_steps=5, posterior_steps=5, mala=True, progress=False)
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
        num_workers: int = 0,
        checkpoint_dir: str | os.PathLike | None = None,
        checkpoint_every: int = 1000,
        progress: bool | None = None,
        on_step: Callable[[Trainer, dict[str, float]], None] | None = None,
    ):
        if regime not in REGIMES:
            raise ValueError(f"regime must be one of {list(REGIMES)}, got {regime!r}")
        if not isinstance(backbone, Backbone):
            raise TypeError(f"backbone must be a Backbone, got {type(backbone).__name__}")
        if prior is None and regime == "two_stage":
            raise ValueError(
                "regime='two_stage' needs a prior; prior=None works with 'mle' and 'joint'"
            )
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
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"num_workers must be an int >= 0, got {num_workers!r}")
        if isinstance(data, Tensor):
            if num_workers and data.device.type != "cpu":
                raise ValueError(
                    f"the data is on {data.device}, which worker processes cannot share: use "
                    "num_workers=0, or keep the data on the CPU"
                )
            problem = _data_problem(data, backbone.data_range)
            if problem is not None:
                raise ValueError(_data_error(problem, None, backbone))
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
        folder = None if checkpoint_dir is None else Path(checkpoint_dir)
        self.checkpoint_path = None if folder is None else folder / CHECKPOINT_NAME
        self.history_path = None if folder is None else folder / HISTORY_NAME
        self.checkpoint_every = int(checkpoint_every)
        self.num_workers = num_workers
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
        if prior is not None and self.b_params and not mala:
            _warn_chain_bias(backbone, **self.sampler_kwargs)
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
            "joint": ["loss", "elbo", "log_likelihood"]
            + ([] if prior is None else ["f_pos", "f_neg", "log_p_neg"]),
        }[regime]
        self.step = 0
        self.history: list[dict[str, float]] = []
        self._order: tuple[int, Tensor] | None = None  # (epoch, its permutation)
        if folder is not None and self.rank == 0:
            _prepare_folder(folder)
        self._broadcast_parameters()

    # -- data and randomness ---------------------------------------------------------------------

    @property
    def steps_per_epoch(self) -> int:
        r"""Full global batches per pass over the data (the remainder is dropped)."""

        return len(self.data) // self.batch_size

    def batch_indices(self, step: int) -> Tensor:
        r"""Returns the global batch of step ``step`` as indices into the data, shape ``(B,)``."""

        epoch, k = divmod(step, self.steps_per_epoch)
        if self._order is None or self._order[0] != epoch:
            gen = torch.Generator().manual_seed(derive_seed(self.seed, 0, epoch))
            self._order = epoch, torch.randperm(len(self.data), generator=gen)
        return self._order[1][k * self.batch_size : (k + 1) * self.batch_size]

    def _chunks(self) -> list[int]:
        n = self.batch_size // self.chunk_size
        return list(range(self.rank, n, self.world_size))

    def _batches(self, start: int, stop: int) -> Iterator[tuple[Tensor, _Problem | None]]:
        r"""Yields this process's chunks of steps ``start`` to ``stop - 1``, in order, as
        ``(x, problem)``: ``x`` on the CPU (or where a tensor ``data`` lives) and the first
        non-finite or out-of-range example of the chunk, if any (see :func:`_data_problem`)."""

        on_cpu = not isinstance(self.data, Tensor) or self.data.device.type == "cpu"
        loader = torch.utils.data.DataLoader(
            _TensorItems(self.data) if isinstance(self.data, Tensor) else self.data,
            batch_sampler=_ChunkSampler(self, start, stop),
            num_workers=self.num_workers,
            collate_fn=_Collate(on_cpu, self.backbone.data_range),
            # worker seeds from a keyed generator: the global RNG is left alone
            generator=torch.Generator().manual_seed(derive_seed(self.seed, 5, start)),
        )
        yield from loader

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
        # the Gaussian-prior ELBO needs no negatives: p_b is normalised, so no gradient of log Z
        elbo_only = self.regime == "joint" and self.prior is None
        z_neg = None if elbo_only else self._negatives(step, c, len(x))
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
            if elbo_only:
                ll = self.backbone.log_likelihood(x, post.z)
                elbo = ll + self.backbone.log_prior(post.z) - post.log_q
                loss = -elbo.mean()
                stats = [loss.detach(), elbo.mean().detach(), ll.mean().detach()]
            else:
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
        (means over the global batch, identical on every rank). (:meth:`fit` keeps one data
        loader for all its steps; this method starts one for the step.)"""

        with contextlib.closing(self._batches(self.step, self.step + 1)) as batches:
            return self._train_step(batches)

    def _train_step(self, batches: Iterator[tuple[Tensor, _Problem | None]]) -> dict[str, float]:
        t0 = time.perf_counter()
        step = self.step
        idx = self.batch_indices(step)
        xs = {}  # every chunk of this process is loaded and checked before the step starts
        for c in self._chunks():
            x, problem = next(batches)
            if problem is not None:
                rows = idx[c * self.chunk_size : (c + 1) * self.chunk_size]
                where = _data_error(problem, rows, self.backbone)
                raise ValueError(f"step {step}, chunk {c}: {where}")
            xs[c] = x.to(self.device, self.backbone.dtype, non_blocking=True)
        self.optimizer.zero_grad(set_to_none=False)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        stats = torch.zeros(len(self.stat_names), device=self.device, dtype=torch.float64)
        chains = [torch.zeros((self.batch_size, *z.shape[1:]), device=z.device, dtype=z.dtype)
                  for z in self.chains]  # fmt: skip
        for c, x in xs.items():
            rows = slice(c * self.chunk_size, (c + 1) * self.chunk_size)
            chunk_stats, z_new = self._chunk(step, c, x, idx[rows])
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

    def fit(self, steps: int, resume: bool = True, plot: bool = True) -> list[dict[str, float]]:
        r"""Trains until ``self.step == steps`` (resuming from ``checkpoint_dir`` first when
        ``resume`` and a checkpoint exists); checkpoints every ``checkpoint_every`` steps and
        at the end. Returns the statistics of every step run so far.

        With a ``checkpoint_dir``, rank 0 rewrites ``history.csv`` from the history it starts
        from (so a resumed run continues it without duplicate rows, and a row cut short by a
        crash is dropped), appends one row per step, and, with ``plot``, draws
        ``history.png`` at the end (:meth:`draw_history`). A loop that calls :meth:`fit` once
        per epoch passes ``plot=False`` and draws once at its end: on a small model the figure
        costs more than an epoch. Resuming and writing are logged to the ``"ebm_prior"``
        logger."""

        if resume and self.checkpoint_path is not None and self.checkpoint_path.exists():
            self.load_checkpoint(self.checkpoint_path)
            if self.rank == 0:
                logger.info("resumed from %s at step %d", self.checkpoint_path, self.step)
        csv_path = self.history_path if self.rank == 0 else None
        if csv_path is not None:
            _write_history(csv_path, self._history_fields(), self.history)
        disable = None if self.progress is None else not self.progress  # None: on a terminal
        disable = True if self.rank != 0 else disable
        desc = {"mle": "MLE", "joint": "joint learning", "two_stage": "two-stage EBM prior"}
        bar = tqdm(total=steps, initial=self.step, desc=desc[self.regime], disable=disable)
        with bar, contextlib.closing(self._batches(self.step, steps)) as batches:
            while self.step < steps:
                stats = self._train_step(batches)
                if csv_path is not None:
                    _append_history(csv_path, self._history_fields(), stats)
                bar.update(1)
                shown = ("loss", "log_likelihood", "f_pos", "f_neg")
                bar.set_postfix({k: f"{stats[k]:.3g}" for k in shown if k in stats})
                if self.on_step is not None and self.rank == 0:
                    self.on_step(self, stats)
                if self.checkpoint_path is not None and self.step % self.checkpoint_every == 0:
                    self.save_checkpoint()
        if self.checkpoint_path is not None and self.step % self.checkpoint_every:
            self.save_checkpoint()
        if plot:
            self.draw_history()
        return self.history

    def draw_history(self) -> Path | None:
        r"""Draws ``history.png`` next to ``history.csv`` (:func:`plot_history`) on rank 0 when
        there is a ``checkpoint_dir`` and matplotlib is installed; returns its path, else
        ``None``."""

        if self.rank != 0 or self.history_path is None:
            return None
        if importlib.util.find_spec("matplotlib") is None:
            return None
        figure = plot_history(self.history_path, self.history_path.with_name(FIGURE_NAME))
        logger.info("wrote %s", figure)
        return figure

    def _history_fields(self) -> list[str]:
        return ["step", *self.stat_names, "grad_norm", "seconds"]

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
            logger.info("wrote checkpoint %s at step %d", path, self.step)
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
        num_workers: int = 0,
        checkpoint_dir: str | os.PathLike | None = None,
        checkpoint_every: int = 1000,
        progress: bool | None = None,
        on_step: Callable[[Trainer, dict[str, float]], None] | None = None,
    ):
        super().__init__(
            prior, backbone, data, regime="two_stage", batch_size=batch_size,
            chunk_size=chunk_size, lr=lr, betas=betas, weight_decay=weight_decay, reg=reg,
            langevin_steps=langevin_steps, step_size=step_size, t=t, target=target, mala=mala,
            clip_grad=clip_grad, backbone_prior_params=backbone_prior_params,
            backbone_prior_lr=backbone_prior_lr, seed=seed, num_workers=num_workers,
            checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every, progress=progress,
            on_step=on_step,
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


# -- data ----------------------------------------------------------------------------------------

#: What is wrong with a batch: the first bad example's row (``None``: the whole batch) and what.
_Problem = tuple[int | None, str]


def _data_problem(x: Tensor, data_range: tuple[float, float] | None) -> _Problem | None:
    r"""Returns the first example (row) of ``x`` that is not finite or lies outside
    ``data_range``, with what is wrong, or ``None``; ``x`` must be floating point. One pass over
    ``x`` (its minimum and maximum, which NaN propagates to) when nothing is wrong."""

    if not x.is_floating_point():
        return None, f"has dtype {x.dtype}"
    low, high = (float(v) for v in torch.aminmax(x))
    lo, hi = (-math.inf, math.inf) if data_range is None else data_range
    if math.isfinite(low) and math.isfinite(high) and lo <= low and high <= hi:
        return None
    flat = x.reshape(len(x), -1)
    for what, bad in (("NaN values", flat.isnan()), ("infinite values", flat.isinf())):
        rows = bad.any(1).nonzero()
        if len(rows):
            return int(rows[0]), f"has {what}"
    row = int(((flat < lo) | (flat > hi)).any(1).nonzero()[0])
    return row, f"has values in [{float(flat[row].min()):.4g}, {float(flat[row].max()):.4g}]"


def _data_error(problem: _Problem, indices: Tensor | None, backbone: Backbone) -> str:
    r"""The message for a :func:`_data_problem`, naming the example by its index in the data
    (``indices[row]``, or ``row`` without ``indices``)."""

    row, what = problem
    expected = (
        "the range the backbone expects"
        if backbone.data_range is None
        else f"the backbone's data range [{backbone.data_range[0]:g}, "
        f"{backbone.data_range[1]:g}] ({type(backbone).__name__}.data_range)"
    )
    if row is None:
        example = {(0.0, 1.0): "x.float() / 255", (-1.0, 1.0): "x.float() / 127.5 - 1"}
        hint = example.get(tuple(map(float, backbone.data_range or ())), "")
        hint = f", e.g. {hint} for 8-bit images" if hint else ""
        return f"the data {what}: convert it to floating point in {expected}{hint}"
    where = f"data[{row if indices is None else int(indices[row])}] {what}"
    if what.startswith("has values"):
        return f"{where}, outside {expected}: rescale the data"
    return f"{where}: the data is not finite (this is not a training divergence)"


class _TensorItems(torch.utils.data.Dataset):
    r"""A tensor as a dataset whose batches are one indexing operation."""

    def __init__(self, data: Tensor):
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitems__(self, indices: list[int]) -> Tensor:
        return self.data[torch.as_tensor(indices, device=self.data.device)]


class _ChunkSampler(torch.utils.data.Sampler):
    r"""The indices of this process's chunks of steps ``start`` to ``stop - 1``, chunk by chunk
    (:meth:`Trainer.batch_indices`, split into chunks; rank :math:`r` of :math:`W` takes the
    chunks :math:`c \equiv r \pmod W`)."""

    def __init__(self, trainer: Trainer, start: int, stop: int):
        self.order, self.steps = trainer.batch_indices, range(start, stop)
        n = trainer.chunk_size
        self.rows = [slice(c * n, (c + 1) * n) for c in trainer._chunks()]

    def __len__(self) -> int:
        return len(self.steps) * len(self.rows)

    def __iter__(self) -> Iterator[list[int]]:
        for step in self.steps:
            idx = self.order(step)
            for rows in self.rows:
                yield idx[rows].tolist()


class _Collate:
    r"""Stacks a chunk's examples (the first element of tuple items) and, with ``check``, looks
    for the first non-finite or out-of-range example (in the loader's worker, on the CPU)."""

    def __init__(self, check: bool, data_range: tuple[float, float] | None):
        self.check, self.data_range = check, data_range

    def __call__(self, items: Tensor | list[Any]) -> tuple[Tensor, _Problem | None]:
        if isinstance(items, Tensor):  # a _TensorItems batch
            x = items
        else:
            items = [it[0] if isinstance(it, (tuple, list)) else it for it in items]
            x = torch.stack([torch.as_tensor(it) for it in items])
            if not x.is_floating_point():
                return x, _data_problem(x, self.data_range)
        return x, _data_problem(x, self.data_range) if self.check else None


# -- files ---------------------------------------------------------------------------------------


def _prepare_folder(folder: Path) -> None:
    r"""Creates the checkpoint folder if needed, checks that it is a writable directory and
    removes the temporary files of interrupted atomic writes: those not modified for
    ``_STALE_AGE`` seconds, so that the writes in progress of another process sharing the
    folder (two runs loading one finished backbone) are left alone."""

    if folder.exists() and not folder.is_dir():
        raise ValueError(f"checkpoint_dir {folder} exists and is not a directory")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"checkpoint_dir {folder} cannot be created: {e}") from e
    try:
        _new_temp_file(folder / CHECKPOINT_NAME).unlink()
    except OSError as e:
        raise ValueError(f"checkpoint_dir {folder} is not writable: {e}") from e
    now = time.time()
    for path in sorted(folder.iterdir()):
        if not (_STALE.fullmatch(path.name) and path.is_file()):
            continue
        try:
            age = now - path.stat().st_mtime
            if age < _STALE_AGE:  # another process sharing the folder may be writing it
                logger.info("left %s (modified %.0f s ago: a write in progress?)", path, age)
                continue
            path.unlink()
        except FileNotFoundError:  # renamed or removed by its writer meanwhile
            continue
        logger.warning("removed %s, left by an interrupted write", path)


def _write_history(path: Path, fields: list[str], rows: list[dict[str, float]]) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fields, restval="", extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)

    atomic_write(path, write)


def _append_history(path: Path, fields: list[str], row: dict[str, float]) -> None:
    line = io.StringIO()
    csv.DictWriter(line, fields, restval="", extrasaction="ignore").writerow(row)
    if not path.exists():  # removed while training: start it again
        _write_history(path, fields, [])
    with open(path, "a", newline="") as f:
        f.write(line.getvalue())  # one write per row: a crash leaves whole rows, or a cut one


def read_history(path: str | os.PathLike) -> list[dict[str, float]]:
    r"""Reads the ``history.csv`` a :class:`Trainer` writes: one dict per step (``step`` as an
    int, the rest as floats). A last row cut short (by a crash while it was written) is left out.

    Example:
        >>> import tempfile
        >>> from ebm_prior import HierarchicalVAE, JointEBMPrior
        >>> vae = HierarchicalVAE.from_config("digits")
        >>> prior = JointEBMPrior(vae.latent_shapes, nef=8)
        >>> folder = tempfile.mkdtemp()
        >>> trainer = Trainer(prior, vae, torch.rand(32, 1, 8, 8).round(), regime="two_stage",
        ...                   batch_size=16, langevin_steps=2, checkpoint_dir=folder)
        >>> _ = trainer.fit(2)
        >>> [row["step"] for row in read_history(f"{folder}/history.csv")]
        [1, 2]
        >>> plot_history(f"{folder}/history.csv").name  # doctest: +SKIP
        'history.png'
    """

    text = Path(path).read_text()
    if not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]
    rows = list(csv.DictReader(io.StringIO(text)))
    return [
        {k: int(v) if k == "step" else float(v) for k, v in row.items() if v not in ("", None)}
        for row in rows
    ]


def plot_history(csv_path: str | os.PathLike, png_path: str | os.PathLike | None = None) -> Path:
    r"""Draws the curves of a trainer's ``history.csv`` against the step, one panel per
    quantity (``f_pos`` with ``f_neg``, ``log_p_pos`` with ``log_p_neg``), and writes them to
    ``png_path`` (default: the CSV's path with the suffix ``.png``). Needs matplotlib, an
    optional extra (``pip install "ebm-prior[examples]"``).

    Returns:
        The path of the figure.
    """

    try:
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError(
            'plot_history needs matplotlib, an optional extra: pip install "ebm-prior[examples]"'
            " (or pip install matplotlib)"
        ) from e
    csv_path = Path(csv_path)
    png_path = csv_path.with_suffix(".png") if png_path is None else Path(png_path)
    rows = read_history(csv_path)
    names = [k for k in (rows[0] if rows else {}) if k not in ("step", "seconds")]
    panels: list[list[str]] = []
    for name in names:
        pair = {"f_neg": "f_pos", "log_p_neg": "log_p_pos"}.get(name)
        if pair in names:
            next(p for p in panels if p[0] == pair).append(name)
        else:
            panels.append([name])
    cols = min(3, max(1, len(panels)))
    nrows = max(1, math.ceil(len(panels) / cols))
    fig = Figure(figsize=(4 * cols, 2.8 * nrows), layout="constrained")
    axes = fig.subplots(nrows, cols, squeeze=False).ravel()
    steps = [r["step"] for r in rows]
    for ax, panel in zip(axes, panels):
        for name in panel:
            ax.plot(steps, [r.get(name, math.nan) for r in rows], label=name)
        ax.set_xlabel("step")
        ax.set_title(", ".join(panel))
        if len(panel) > 1:
            ax.legend()
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    atomic_write(png_path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    return png_path
