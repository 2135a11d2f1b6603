r"""A reusable two-stage trainer: fit the joint EBM prior on a frozen backbone.

:class:`TwoStageTrainer` runs supplement 1.2's two-stage learning over any
:class:`~ebm_prior.Backbone`: positives :math:`z^+ \sim q(z \mid x)` from the frozen backbone,
negatives :math:`z^- = T_b(\epsilon)` from :class:`~ebm_prior.EpsLangevin` started at
:math:`\epsilon \sim \mathcal{N}(0, I)`, and the loss :func:`~ebm_prior.two_stage_loss`.
Optionally the backbone's prior parameters :math:`b` are fine-tuned too, with the loss of
supplement Eq. 6 (:func:`~ebm_prior.backbone_prior_loss`).

Reproducibility is by construction:

* step :math:`k` uses the global batch of indices ``k * batch_size`` to
  ``(k + 1) * batch_size`` of a stream of permutations, one per epoch, each drawn from a
  generator seeded by ``(seed, epoch)`` (the last partial batch of an epoch is dropped);
* the global batch is split into chunks of ``chunk_size`` (gradient accumulation); chunk
  :math:`c` of step :math:`k` draws all its randomness (the posterior sample and the Langevin
  noise) from seeds derived from ``(seed, k, c)``;
* with ``torch.distributed`` initialised, rank :math:`r` of :math:`W` runs the chunks
  :math:`c \equiv r \pmod W` and the gradients are summed with ``all_reduce``.

So a resumed run repeats the uninterrupted one exactly, and the learned prior does not depend on
the number of processes (up to the order of floating-point sums). ``chunk_size`` is part of the
recipe: it decides which random streams the examples share, so changing it changes the draws
(not their law).
"""

from __future__ import annotations

__all__ = ["TrainingDivergenceError", "TwoStageTrainer"]

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
from .objectives import backbone_prior_loss, ebm_loss
from .prior import JointEBMPrior
from .sample import EpsLangevin

CHECKPOINT_NAME = "trainer.pt"
CHECKPOINT_FORMAT = 1
_PRIOR_KEYS = ("latent_shapes", "nef", "num_layers", "channels", "slope")


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


class TwoStageTrainer:
    r"""Fits a :class:`JointEBMPrior` two-stage on a frozen backbone, with exact resume and DDP.

    Each step minimises, over the global batch :math:`x_{1:B}`,

    .. math:: \mathcal{L}_a = \tfrac{1}{B} \sum_i \big(f_a(z_i^-) - f_a(z_i^+)\big)
              + \lambda \tfrac{1}{B} \sum_i \big(f_a(z_i^-)^2 + f_a(z_i^+)^2\big)

    with :math:`z_i^+ \sim q(z \mid x_i)` and :math:`z_i^-` from ``langevin_steps`` of
    eps-space Langevin, using Adam. With ``backbone_prior_params`` it also minimises
    :math:`\mathcal{L}_b = \tfrac{1}{B} \sum_i \log p_b(z_i^-) - \log p_b(z_i^+)` over those
    parameters (supplement Eq. 6), with learning rate ``backbone_prior_lr``.

    Arguments:
        prior: The prior to train (on the backbone's device).
        backbone: The frozen backbone (put in eval mode, parameters frozen except
            ``backbone_prior_params``).
        data: A tensor :math:`(N, *)` or a map-style dataset whose items are ``x`` or tuples
            whose first element is ``x``, in the range ``backbone.posterior`` expects.
        batch_size: Global batch size :math:`B` per step (over all processes).
        chunk_size: Examples per forward/backward pass (gradient accumulation); divides
            ``batch_size``; defaults to ``batch_size``.
        lr, betas, weight_decay: Adam settings for the energy networks.
        reg: L2 penalty :math:`\lambda` on the energy values.
        langevin_steps, step_size, t, target, mala, clip_grad: The negatives' sampler
            (see :class:`EpsLangevin`).
        backbone_prior_params: Parameters :math:`b` of the backbone's prior to fine-tune
            (e.g. ``NVAEBackbone.prior_parameters()``); ``None`` keeps the backbone frozen.
        backbone_prior_lr: Their learning rate (default ``lr``).
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
        on_step: Callable[[TwoStageTrainer, dict[str, float]], None] | None = None,
    ):
        if not isinstance(backbone, Backbone):
            raise TypeError(f"backbone must be a Backbone, got {type(backbone).__name__}")
        if not isinstance(prior, nn.Module):
            raise TypeError(f"prior must be an nn.Module, got {type(prior).__name__}")
        if hasattr(prior, "latent_shapes") and tuple(prior.latent_shapes) != tuple(
            backbone.latent_shapes
        ):
            raise ValueError(
                f"prior latent shapes {list(prior.latent_shapes)} do not match the backbone's "
                f"{list(backbone.latent_shapes)}"
            )
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
        self.prior, self.backbone, self.data = prior, backbone, data
        self.batch_size, self.chunk_size = batch_size, chunk_size
        self.reg, self.seed = float(reg), int(seed)
        self.sampler_kwargs = dict(
            step_size=float(step_size), steps=int(langevin_steps), t=float(t), target=target,
            mala=bool(mala), clip_grad=clip_grad,
        )  # fmt: skip
        self.checkpoint_path = (
            None if checkpoint_dir is None else Path(checkpoint_dir) / CHECKPOINT_NAME
        )
        self.checkpoint_every = int(checkpoint_every)
        self.progress, self.on_step = progress, on_step
        self.rank, self.world_size = _world()
        self.device = backbone.device
        for name, p in prior.named_parameters():
            if p.device != self.device:
                raise ValueError(
                    f"prior parameter {name} is on {p.device}, the backbone on {self.device}"
                )

        backbone.eval().requires_grad_(False)
        self.b_params = [] if backbone_prior_params is None else list(backbone_prior_params)
        owned = {id(p) for p in backbone.parameters()}
        for i, p in enumerate(self.b_params):
            if id(p) not in owned:
                raise ValueError(f"backbone_prior_params[{i}] is not a parameter of the backbone")
            p.requires_grad_(True)
        names = {id(p): n for n, p in backbone.named_parameters()}
        self.b_names = [names[id(p)] for p in self.b_params]
        groups = [{"params": list(prior.parameters()), "lr": lr}]
        if self.b_params:
            groups.append({"params": self.b_params, "lr": lr if backbone_prior_lr is None else
                           backbone_prior_lr})  # fmt: skip
        self.optimizer = torch.optim.Adam(groups, betas=tuple(betas), weight_decay=weight_decay)
        self.config = {
            "seed": self.seed, "batch_size": batch_size, "chunk_size": chunk_size,
            "num_examples": len(data),
            "lr": float(lr), "betas": [float(b) for b in betas],
            "weight_decay": float(weight_decay), "reg": self.reg,
            "sampler": {k: v for k, v in self.sampler_kwargs.items()},
            "backbone_prior_params": self.b_names,
            "backbone_prior_lr": None if backbone_prior_lr is None else float(backbone_prior_lr),
            "prior": {k: v for k, v in getattr(prior, "config", {}).items() if k in _PRIOR_KEYS},
            "backbone": backbone.fingerprint(),
        }  # fmt: skip
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

    def _chunk(self, step: int, c: int, x: Tensor) -> Tensor:
        r"""Runs chunk ``c`` of step ``step``: backward of its share of the loss; returns
        ``[loss, f_pos, f_neg, log_p_pos, log_p_neg]`` weighted by the chunk's share."""

        device = self.device
        gen = torch.Generator(device).manual_seed(derive_seed(self.seed, 1, step, c))
        sampler = EpsLangevin(
            self.prior, self.backbone, generator=gen, trace=False, **self.sampler_kwargs
        )
        z_neg = sampler(sampler.init(len(x))).z
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            torch.manual_seed(derive_seed(self.seed, 2, step, c))
            z_pos = self.backbone.posterior(x).z
        out = ebm_loss(self.prior, z_pos, z_neg, reg=self.reg)
        share = len(x) / self.batch_size
        loss = out.loss
        stats = [out.loss.detach(), out.f_pos, out.f_neg]
        if self.b_params:
            b = backbone_prior_loss(self.backbone, z_pos, z_neg)
            loss = loss + b.loss
            stats += [b.log_p_pos, b.log_p_neg]
        if not torch.isfinite(loss):
            raise TrainingDivergenceError(step, f"the loss of chunk {c} ({loss.item()})")
        (loss * share).backward()
        return torch.stack([s.detach().double() * share for s in stats])

    def train_step(self) -> dict[str, float]:
        r"""Runs one optimisation step on the next global batch; returns its statistics
        (means over the global batch, identical on every rank)."""

        t0 = time.perf_counter()
        step = self.step
        x_all = self._fetch(self.batch_indices(step))
        self.optimizer.zero_grad(set_to_none=False)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        n_stats = 5 if self.b_params else 3
        stats = torch.zeros(n_stats, device=self.device, dtype=torch.float64)
        for c in self._chunks():
            x = x_all[c * self.chunk_size : (c + 1) * self.chunk_size]
            stats += self._chunk(step, c, x)
        if self.world_size > 1:
            flat = torch.cat([p.grad.reshape(-1) for p in params])
            _collective([flat, stats], dist.all_reduce)
            offset = 0
            for p in params:
                p.grad.copy_(flat[offset : offset + p.numel()].view_as(p))
                offset += p.numel()
        grad_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))
        if not torch.isfinite(grad_norm):
            bad = [n for n, p in self._named_trained() if not torch.isfinite(p.grad).all()]
            raise TrainingDivergenceError(step, f"the gradient of {', '.join(bad)}")
        self.optimizer.step()
        self.step += 1
        names = ["loss", "f_pos", "f_neg", "log_p_pos", "log_p_neg"][:n_stats]
        out = {"step": self.step, **dict(zip(names, stats.tolist(), strict=True))}
        out["grad_norm"] = float(grad_norm)
        out["seconds"] = time.perf_counter() - t0
        self.history.append(out)
        return out

    def _named_trained(self) -> list[tuple[str, nn.Parameter]]:
        named = [(f"prior.{n}", p) for n, p in self.prior.named_parameters()]
        return named + [(f"backbone.{n}", p) for n, p in zip(self.b_names, self.b_params)]

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
        bar = tqdm(total=steps, initial=self.step, desc="two-stage EBM prior", disable=not show)
        with bar:
            while self.step < steps:
                stats = self.train_step()
                bar.update(1)
                bar.set_postfix(
                    loss=f"{stats['loss']:.3f}", f_pos=f"{stats['f_pos']:.2f}",
                    f_neg=f"{stats['f_neg']:.2f}",
                )  # fmt: skip
                if self.on_step is not None and self.rank == 0:
                    self.on_step(self, stats)
                if self.checkpoint_path is not None and self.step % self.checkpoint_every == 0:
                    self.save_checkpoint()
        if self.checkpoint_path is not None and self.step % self.checkpoint_every:
            self.save_checkpoint()
        return self.history

    # -- checkpoints -----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        r"""Everything needed to resume exactly: the step, the prior, the fine-tuned backbone
        parameters, the optimizer, the history and the configuration."""

        return {
            "format": CHECKPOINT_FORMAT,
            "step": self.step,
            "prior": {k: v.detach().cpu() for k, v in self.prior.state_dict().items()},
            "backbone_prior": {
                n: p.detach().cpu() for n, p in zip(self.b_names, self.b_params, strict=True)
            },
            "optimizer": self.optimizer.state_dict(),
            "history": self.history,
            "config": self.config,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        r"""Restores :meth:`state_dict`; the configuration must match this trainer's."""

        if state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"not a trainer checkpoint of format {CHECKPOINT_FORMAT}")
        diff = _diff(state["config"], self.config)
        if diff:
            raise ValueError(
                "the checkpoint was written with a different configuration: "
                + "; ".join(f"{k}: checkpoint {a!r}, now {b!r}" for k, a, b in diff)
                + " (use another checkpoint_dir, or resume=False)"
            )
        self.prior.load_state_dict(state["prior"], strict=True)
        with torch.no_grad():
            for n, p in zip(self.b_names, self.b_params, strict=True):
                p.copy_(state["backbone_prior"][n])
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
