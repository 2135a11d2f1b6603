r"""NVAE (NVlabs/NVAE) as an :class:`ebm_prior.Backbone`, over an unmodified clone.

How to obtain the backbone: ``git clone https://github.com/NVlabs/NVAE`` and point the adapter at
the clone (``nvae_root=...`` or the ``NVAE_ROOT`` environment variable). NVAE is released under
the NVIDIA Source Code License (non-commercial use only); this project never copies its code,
the adapter imports it from your clone. NVAE's own imports need ``tensorboardX``
(``pip install "ebm-prior[nvae]"``).

What the adapter does with NVAE's modules:

* **Imports** NVAE's generic top-level modules (``model``, ``utils``, ``distributions``,
  ``neural_operations``, ``neural_ar_operations``, ``thirdparty``) from the clone and then takes
  them out of ``sys.modules`` again, restoring any modules of yours with the same names
  (:func:`import_nvae`).
* **Groups** in decoder order (top first): one per ``combiner_dec`` cell of ``dec_tower``, each of
  shape ``(num_latent_per_group, h, w)``; the top group's prior is NVAE's
  :math:`\mathcal{N}(0, 1.01^2)` (``Normal(0, log_sigma=0)``, whose sigma is
  :math:`e^0 + 0.01`).
* :math:`T_b` runs NVAE's own top-down modules: ``prior_ftr0``, the ``dec_tower`` cells and
  ``dec_sampler``, with each conditional built by NVAE's ``distributions.Normal(mu, log_sigma,
  temp=t)`` and :math:`z_i = \mu_i + t \sigma_i \epsilon_i` (``sample_given_eps``).
  ``z_to_eps`` is the same pass teacher-forced with the given :math:`z`; ``log_prior`` is the
  sum of NVAE's ``Normal.log_p`` at :math:`t = 1`, the ``log_p`` of NVAE's ``forward``.
* ``posterior(x)`` runs NVAE's ``forward`` and reads each group's :math:`z` (after the posterior
  flows when ``num_nf > 0``) from the decoder's combiner cells; ``log_q`` is ``forward``'s.
* ``log_likelihood`` and ``decode`` use ``decoder_output`` for all three decoders (Bernoulli for
  MNIST/Omniglot, ``NormalDecoder`` with ``num_mixture_dec == 1``, ``DiscMixLogistic``
  otherwise), with NVAE's cropping of 32x32-padded MNIST and its ``num_x_bits`` quantisation.
  ``decode`` returns the mean image in :math:`[0, 1]` at the model's input size.

Devices: NVAE assumes CUDA in a few places. Without editing its files, the adapter

* builds the model with ``Tensor.cuda`` redirected to the target device (NVAE's
  autoregressive-conv masks are created with ``.cuda()``), then turns each mask into a
  non-persistent buffer so that ``.to(device)`` moves it;
* replaces, on each instance, the forward of the fused BatchNorm+Swish
  (``SyncBatchNormSwish``, which refuses CPU tensors) by batch norm followed by
  :math:`x \sigma(x)` (the same function); NVAE's synchronised kernel is still used when it
  is needed: CUDA, training mode and more than one process;
* marks NVAE's data-dependent initialisation as done (it all-reduces across processes, and a
  loaded checkpoint must never be re-initialised).

Batch norm: the model stays in eval mode (running statistics), whatever ``train()`` is called
on the wrapper. :meth:`NVAEBackbone.readjust_bn` re-estimates the statistics from prior samples
as NVAE's ``evaluate.py --readjust_bn`` does.

Checkpoints: :meth:`NVAEBackbone.from_checkpoint` reads the ``checkpoint.pt`` that NVAE's
``train.py`` writes (``{'epoch', 'state_dict', 'optimizer', 'global_step', 'args',
'arch_instance', 'scheduler', 'grad_scalar'}``) with ``torch.load(weights_only=True)``, allowing
only ``argparse.Namespace`` beyond tensors and plain containers; it back-fills the arguments old
checkpoints lack, as NVAE's ``evaluate.py`` does, and rebuilds the architecture from
``args.arch_instance``.

Warning:
    Adapters follow third-party code and may change faster than the core.
"""

from __future__ import annotations

__all__ = [
    "NVAEBackbone",
    "NVAECode",
    "import_nvae",
    "load_checkpoint",
    "nvae_args",
    "save_checkpoint",
]

import argparse
import contextlib
import io
import os
import subprocess
import sys
import threading
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ebm_prior import Backbone, Posterior
from ebm_prior.hub import atomic_write, file_sha256

#: NVAE's top-level modules, imported from the clone and then hidden again
_MODULES = ("model", "utils", "distributions", "neural_operations", "neural_ar_operations")
_PACKAGES = ("thirdparty",)
_LOCK = threading.Lock()
_CACHE: dict[str, NVAECode] = {}

#: arguments of ``train.py`` that ``AutoEncoder`` reads, with ``train.py``'s defaults
_ARGS: dict[str, Any] = dict(
    dataset="mnist",
    arch_instance="res_mbconv",
    num_nf=0,
    num_x_bits=8,
    num_latent_scales=1,
    num_groups_per_scale=10,
    num_latent_per_group=20,
    ada_groups=False,
    min_groups_per_scale=1,
    num_channels_enc=32,
    num_preprocess_blocks=2,
    num_preprocess_cells=3,
    num_cell_per_cond_enc=1,
    num_channels_dec=32,
    num_postprocess_blocks=2,
    num_postprocess_cells=3,
    num_cell_per_cond_dec=1,
    num_mixture_dec=10,
    use_se=False,
    res_dist=False,
)
#: what NVAE's ``evaluate.py`` back-fills for checkpoints written before these arguments existed
_BACKFILL = dict(ada_groups=False, min_groups_per_scale=1, num_mixture_dec=10)


@dataclass(frozen=True)
class NVAECode:
    r"""NVAE's modules, imported from one clone (see :func:`import_nvae`)."""

    root: str
    commit: str | None
    model: types.ModuleType
    utils: types.ModuleType
    distributions: types.ModuleType
    neural_operations: types.ModuleType
    neural_ar_operations: types.ModuleType
    sync_batchnorm: types.ModuleType

    @contextlib.contextmanager
    def active(self) -> Iterator[NVAECode]:
        r"""Puts NVAE's modules back in ``sys.modules`` for the duration of the block.

        Needed only to call NVAE functions that import lazily (e.g.
        ``utils.reconstruction_loss`` imports ``distributions`` when called); your modules of
        the same names are restored afterwards.
        """

        names = {n: getattr(self, n) for n in _MODULES}
        with _LOCK:
            saved = {k: sys.modules[k] for k in names if k in sys.modules}
            sys.modules.update(names)
            try:
                yield self
            finally:
                for k in names:
                    del sys.modules[k]
                sys.modules.update(saved)


def _ours(name: str) -> bool:
    return name in _MODULES or any(name == p or name.startswith(p + ".") for p in _PACKAGES)


def _commit(root: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def import_nvae(root: str | os.PathLike | None = None) -> NVAECode:
    r"""Imports NVAE's modules from a clone without clobbering modules of the same names.

    NVAE's modules have generic top-level names (``model``, ``utils``, ``distributions``, ...).
    They are imported with the clone first on ``sys.path``, then removed from ``sys.modules``;
    modules that were there before (yours) are put back. NVAE's modules keep working: they hold
    references to each other, not names. Imports are cached per clone.

    Arguments:
        root: The clone's folder; defaults to the ``NVAE_ROOT`` environment variable.

    Raises:
        ValueError: When no clone is named or the folder is not an NVAE clone.
        ImportError: When NVAE's own imports fail (e.g. ``tensorboardX`` is missing).
    """

    root = root if root is not None else os.environ.get("NVAE_ROOT")
    if not root:
        raise ValueError(
            "no NVAE clone given: pass nvae_root=... or set NVAE_ROOT to a clone of "
            "https://github.com/NVlabs/NVAE"
        )
    root = os.path.realpath(os.fspath(root))
    for name in ("model.py", "distributions.py", "neural_operations.py", "thirdparty"):
        if not os.path.exists(os.path.join(root, name)):
            raise ValueError(f"{root} is not a clone of NVlabs/NVAE: it has no {name}")
    with _LOCK:
        if root in _CACHE:
            return _CACHE[root]
        saved = {k: sys.modules.pop(k) for k in list(sys.modules) if _ours(k)}
        sys.path.insert(0, root)
        try:
            try:
                import importlib

                mods = {name: importlib.import_module(name) for name in _MODULES}
                sbn = importlib.import_module("thirdparty.inplaced_sync_batchnorm")
            except ImportError as e:
                raise ImportError(
                    f"importing NVAE from {root} failed: {e}. NVAE imports tensorboardX: "
                    'pip install "ebm-prior[nvae]"'
                ) from e
        finally:
            sys.path.remove(root)
            for k in [k for k in sys.modules if _ours(k)]:
                del sys.modules[k]
            sys.modules.update(saved)
        code = NVAECode(root=root, commit=_commit(root), sync_batchnorm=sbn, **mods)
        _CACHE[root] = code
        return code


def nvae_args(**overrides: Any) -> argparse.Namespace:
    r"""Returns the ``Namespace`` NVAE's ``AutoEncoder`` reads, with ``train.py``'s defaults.

    Example:
        >>> args = nvae_args(dataset="cifar10", num_latent_scales=2, num_groups_per_scale=3)
        >>> args.num_latent_per_group
        20
    """

    unknown = set(overrides) - set(_ARGS)
    if unknown:
        raise ValueError(f"unknown NVAE arguments {sorted(unknown)}; known: {sorted(_ARGS)}")
    return argparse.Namespace(**{**_ARGS, **overrides})


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict:
    r"""Reads an NVAE ``checkpoint.pt`` safely: tensors, plain containers and ``Namespace`` only.

    Arguments old checkpoints lack are back-filled as NVAE's ``evaluate.py`` does
    (``ada_groups=False``, ``min_groups_per_scale=1``, ``num_mixture_dec=10``).

    Raises:
        ValueError: When the file is not an NVAE checkpoint or holds other Python objects.
    """

    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # UnpicklingError and friends: name the file and the cause
        raise ValueError(
            f"{path} cannot be read as an NVAE checkpoint with weights_only=True (only tensors, "
            f"plain containers and argparse.Namespace are allowed): {e}"
        ) from e
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "args" not in ckpt:
        keys = sorted(ckpt) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(
            f"{path} is not an NVAE checkpoint: expected a dict with 'state_dict' and 'args' "
            f"(as train.py writes), got {keys}"
        )
    if not isinstance(ckpt["args"], argparse.Namespace):
        raise ValueError(f"{path}: 'args' is a {type(ckpt['args']).__name__}, not a Namespace")
    for k, v in _BACKFILL.items():
        if not hasattr(ckpt["args"], k):
            setattr(ckpt["args"], k, v)
    return ckpt


def save_checkpoint(model: nn.Module, args: argparse.Namespace, path: str, **extra: Any) -> None:
    r"""Writes ``model`` in the layout of NVAE's ``train.py`` (atomically).

    ``extra`` fills the other keys (``epoch``, ``optimizer``, ``global_step``, ``scheduler``,
    ``grad_scalar``); missing ones are written as ``train.py`` would at step 0 without state.
    """

    if isinstance(model, NVAEBackbone):
        model = model.nvae
    ckpt = {
        "epoch": 0,
        "state_dict": model.state_dict(),
        "optimizer": {},
        "global_step": 0,
        "args": args,
        "arch_instance": model.arch_instance,
        "scheduler": {},
        "grad_scalar": {},
    }
    ckpt.update(extra)
    atomic_write(path, lambda tmp: torch.save(ckpt, tmp))


@contextlib.contextmanager
def _cuda_to(device: torch.device) -> Iterator[None]:
    r"""While NVAE builds its modules, ``Tensor.cuda()`` moves to ``device`` instead."""

    if device.type == "cuda":
        yield
        return
    original = torch.Tensor.cuda

    def cuda(self, *args, **kwargs):
        return self.to(device)

    torch.Tensor.cuda = cuda
    try:
        yield
    finally:
        torch.Tensor.cuda = original


def _bn_swish_forward(self, input: Tensor) -> Tensor:
    r"""Batch norm then :math:`x \sigma(x)`: NVAE's fused ``SyncBatchNormSwish`` on any device."""

    dist = torch.distributed
    if (
        input.is_cuda
        and self.training
        and dist.is_available()
        and dist.is_initialized()
        and dist.get_world_size() > 1
    ):
        return type(self).forward(self, input)  # NVAE's synchronised CUDA kernel
    factor = 0.0 if self.momentum is None else self.momentum
    if self.training and self.track_running_stats:
        self.num_batches_tracked.add_(1)
        if self.momentum is None:
            factor = 1.0 / float(self.num_batches_tracked)
    out = F.batch_norm(
        input,
        self.running_mean,
        self.running_var,
        self.weight,
        self.bias,
        self.training or not self.track_running_stats,
        factor,
        self.eps,
    )
    return out * torch.sigmoid(out)


def _make_portable(model: nn.Module, code: NVAECode) -> None:
    sbn = code.sync_batchnorm.SyncBatchNormSwish
    conv, arconv = code.neural_operations.Conv2D, code.neural_ar_operations.ARConv2d
    for m in model.modules():
        if isinstance(m, sbn) and "forward" not in m.__dict__:
            m.forward = types.MethodType(_bn_swish_forward, m)
        elif isinstance(m, arconv) and m.masked and "mask" not in m._buffers:
            mask = m.__dict__.pop("mask")
            m.register_buffer("mask", mask, persistent=False)
        if isinstance(m, conv) and m.data_init:
            m.init_done = True


def _crop(x: Tensor) -> Tensor:
    return x[:, :, 2:30, 2:30]


class NVAEBackbone(Backbone):
    r"""Creates the backbone view of an NVAE ``model.AutoEncoder``.

    Groups are in decoder order (top first), each ``(num_latent_per_group, h, w)``. Data ``x``
    has the model's input shape ``(C, S, S)`` with values in :math:`[0, 1]` (MNIST and Omniglot
    padded to 32x32, binary, as NVAE's data loaders give them); it is quantised to
    ``num_x_bits`` as NVAE's ``train.py`` does before the encoder and the likelihood.

    Arguments:
        model: A built ``AutoEncoder`` of the clone ``code`` (see :meth:`build` and
            :meth:`from_checkpoint`).
        code: The NVAE modules the model was built with (:func:`import_nvae`).
        args: The ``Namespace`` the model was built from (recorded in :attr:`args`).
        checkpoint_hash: SHA-256 of the checkpoint the weights came from, when known.

    Example:
        >>> backbone = NVAEBackbone.from_checkpoint("checkpoint.pt")  # doctest: +SKIP
        >>> [tuple(s) for s in backbone.latent_shapes][:2]  # doctest: +SKIP
        [(20, 16, 16), (20, 16, 16)]
    """

    adapter_name = "nvae"
    #: NVAE's data loaders give images in [0, 1] (``ToTensor``), where ``utils.pre_process``
    #: quantises them.
    data_range = (0.0, 1.0)

    def __init__(
        self,
        model: nn.Module,
        code: NVAECode,
        args: argparse.Namespace | None = None,
        checkpoint_hash: str | None = None,
    ):
        super().__init__()
        if not isinstance(model, code.model.AutoEncoder):
            raise TypeError(
                f"model is a {type(model).__name__}, expected model.AutoEncoder from the NVAE "
                f"clone at {code.root}"
            )
        _make_portable(model, code)
        self.nvae = model.eval()
        self.code = code
        self.args = args
        self.checkpoint_hash = checkpoint_hash
        self._shapes = self._group_shapes()
        if len(self._shapes) == 0:
            raise ValueError("the NVAE model has no latent groups")

    # -- construction --------------------------------------------------------------------------

    @classmethod
    def build(
        cls,
        args: argparse.Namespace,
        nvae_root: str | os.PathLike | None = None,
        device: str | torch.device = "cpu",
    ) -> NVAEBackbone:
        r"""Builds a randomly initialised NVAE from ``args`` (see :func:`nvae_args`)."""

        code = import_nvae(nvae_root)
        return cls(_build(code, args, torch.device(device)), code, args).to(device)

    @classmethod
    def from_checkpoint(
        cls,
        path: str | os.PathLike,
        nvae_root: str | os.PathLike | None = None,
        device: str | torch.device = "cpu",
    ) -> NVAEBackbone:
        r"""Loads an NVAE ``checkpoint.pt`` (the layout of ``train.py``) onto ``device``.

        The architecture is rebuilt from ``args.arch_instance``; every parameter and buffer of
        the model must be in the checkpoint and nothing else may be (a mismatch names the keys).
        """

        code = import_nvae(nvae_root)
        ckpt = load_checkpoint(path)
        args = ckpt["args"]
        model = _build(code, args, torch.device(device))
        result = model.load_state_dict(ckpt["state_dict"], strict=False)
        # NVAE's own loading is not strict because of Conv2D.weight_normalized (not a buffer)
        missing = [k for k in result.missing_keys if not k.endswith("weight_normalized")]
        unexpected = [k for k in result.unexpected_keys if not k.endswith("weight_normalized")]
        if missing or unexpected:
            raise ValueError(
                f"{path} does not match the architecture rebuilt from its args "
                f"(arch_instance={args.arch_instance!r}): missing {missing[:5]}, "
                f"unexpected {unexpected[:5]}"
            )
        return cls(model, code, args, checkpoint_hash=file_sha256(path)).to(device)

    # -- contract ------------------------------------------------------------------------------

    @property
    def latent_shapes(self) -> tuple[tuple[int, ...], ...]:
        return self._shapes

    @property
    def x_shape(self) -> tuple[int, int, int]:
        r"""The input shape ``(C, S, S)`` the model expects."""

        c = 1 if self.nvae.dataset in {"mnist", "omniglot"} else 3
        return (c, self.nvae.input_size, self.nvae.input_size)

    def train(self, mode: bool = True) -> NVAEBackbone:
        r"""Sets the wrapper's flag only: NVAE's batch norms keep their running statistics."""

        self.training = mode
        self.nvae.eval()
        return self

    def _eps_to_z(self, eps: list[Tensor], t: float) -> list[Tensor]:
        write = lambda i, dist: dist.sample_given_eps(eps[i])  # noqa: E731
        return self._top_down(write, len(eps), t, eps[0].shape[0])[0]

    def _z_to_eps(self, z: list[Tensor], t: float) -> list[Tensor]:
        out: list[Tensor] = []

        def read(i: int, dist) -> Tensor:
            out.append((z[i] - dist.mu) / dist.sigma)
            return z[i]

        self._top_down(read, len(z), t, z[0].shape[0])
        return out

    def _log_prior(self, z: list[Tensor]) -> Tensor:
        total: list[Tensor] = []

        def read(i: int, dist) -> Tensor:
            total.append(dist.log_p(z[i]).flatten(1).sum(1))
            return z[i]

        self._top_down(read, len(z), 1.0, z[0].shape[0])
        return torch.stack(total, 0).sum(0)

    def _posterior(self, x: Tensor) -> Posterior:
        z, log_q, _ = self.own_forward(x)
        return Posterior(z, log_q)

    def _log_likelihood(self, x: Tensor, z: list[Tensor]) -> Tensor:
        self._check_x(x)
        out = self.nvae.decoder_output(self._logits(z))
        log_px = out.log_prob(self._quantise(x))
        if self.nvae.crop_output:
            log_px = _crop(log_px)
        return log_px.flatten(1).sum(1)

    def _decode(self, z: list[Tensor]) -> Tensor:
        out = self.nvae.decoder_output(self._logits(z))
        if isinstance(out, torch.distributions.Bernoulli):
            return out.probs
        if isinstance(out, self.code.distributions.NormalDecoder):
            return out.dist.mu.clamp(-1.0, 1.0) / 2.0 + 0.5
        return out.mean()

    # -- extras --------------------------------------------------------------------------------

    def own_forward(self, x: Tensor) -> tuple[list[Tensor], Tensor, Tensor]:
        r"""Runs NVAE's ``forward``; returns the posterior ``z`` it drew, ``log_q`` and ``log_p``.

        ``log_p`` is NVAE's own :math:`\log p_b(z)`, which :meth:`log_prior` reproduces.
        """

        self._check_x(x)
        z: list[Tensor] = []
        with self._reading_z(z):
            _, log_q, log_p, _, _ = self.nvae(self._quantise(x))
        return z, log_q, log_p

    @torch.no_grad()
    def readjust_bn(
        self,
        iters: int = 500,
        batch_size: int = 2,
        t: float = 1.0,
        generator: torch.Generator | None = None,
        progress: bool = False,
    ) -> None:
        r"""Re-estimates the decoder's batch-norm statistics from prior samples at temperature t.

        As NVAE's ``evaluate.py --readjust_bn``: ``iters`` decoder passes of ``batch_size``
        samples with batch norm in training mode (NVAE's momentum 0.05), then eval mode again.
        NVAE's evaluation uses ``iters=500`` with ``batch_size=2`` (FID) or 16 (samples).
        """

        from tqdm.auto import tqdm

        self.nvae.train()
        try:
            for _ in tqdm(range(iters), desc="re-estimating BN statistics", disable=not progress):
                eps = self.sample_eps(batch_size, generator=generator)
                write = lambda i, dist, eps=eps: dist.sample_given_eps(eps[i])  # noqa: E731
                self._post_process(self._top_down(write, len(eps), t, batch_size, full=True)[1])
        finally:
            self.nvae.eval()

    def prior_parameters(self) -> Iterator[nn.Parameter]:
        r"""The parameters :math:`b` that only the prior uses: the ``dec_sampler`` cells that
        map the decoder state to each lower group's :math:`(\mu, \log \sigma)`.

        ``prior_ftr0`` and the ``dec_tower`` cells also shape :math:`p(x \mid z)`, so they are
        not included. NVAE's posterior is residual on these parameters
        (:math:`q = \mathcal{N}(\mu_p + \Delta\mu, \sigma_p \Delta\sigma)`), so fine-tuning
        them (``TwoStageTrainer(backbone_prior_params=...)``) moves :math:`q` as well.
        """

        return self.nvae.dec_sampler.parameters()

    # -- internals -----------------------------------------------------------------------------

    def _group_shapes(self) -> tuple[tuple[int, ...], ...]:
        m = self.nvae
        c, h, w = (int(v) for v in m.z0_size)
        if m.vanilla_vae:
            return ((c, h, w),)
        shapes = []
        for cell in m.dec_tower:
            if cell.cell_type == "combiner_dec":
                shapes.append((c, h, w))
            elif cell.cell_type == "up_dec":
                h, w = 2 * h, 2 * w
        return tuple(shapes)

    def _top_down(
        self,
        write: Callable[[int, Any], Tensor],
        n: int,
        t: float,
        batch: int,
        full: bool = False,
    ) -> tuple[list[Tensor], Tensor | None]:
        r"""NVAE's top-down pass; ``write(i, dist)`` returns group ``i``'s :math:`z`.

        ``dist`` is NVAE's ``Normal`` of group ``i`` given the groups above, at temperature
        ``t``. Returns the :math:`z` and, with ``full``, the decoder state after the tower.
        """

        m, Normal = self.nvae, self.code.distributions.Normal
        ref = m.prior_ftr0
        zeros = torch.zeros((batch, *self._shapes[0]), device=ref.device, dtype=ref.dtype)
        z = [write(0, Normal(zeros, zeros, t))]
        if m.vanilla_vae:
            return z, (m.stem_decoder(z[0]) if full else None)
        s = m.prior_ftr0.unsqueeze(0).expand(batch, -1, -1, -1)
        idx = 0
        for cell in m.dec_tower:
            if cell.cell_type == "combiner_dec":
                if idx > 0:
                    mu, log_sigma = torch.chunk(m.dec_sampler[idx - 1](s), 2, dim=1)
                    z.append(write(idx, Normal(mu, log_sigma, t)))
                s = cell(s, z[idx])
                idx += 1
                if idx == n and not full:
                    return z, None
            else:
                s = cell(s)
        return z, s

    def _logits(self, z: list[Tensor]) -> Tensor:
        r"""The decoder's output parameters for given :math:`z` (teacher-forced)."""

        _, s = self._top_down(lambda i, dist: z[i], len(z), 1.0, z[0].shape[0], full=True)
        return self._post_process(s)

    def _post_process(self, s: Tensor) -> Tensor:
        for cell in self.nvae.post_process:
            s = cell(s)
        return self.nvae.image_conditional(s)

    def _quantise(self, x: Tensor) -> Tensor:
        return self.code.utils.pre_process(x, self.nvae.num_bits)

    def _check_x(self, x: Tensor) -> None:
        if tuple(x.shape[1:]) != self.x_shape:
            raise ValueError(
                f"x has shape {tuple(x.shape)}, expected (B, {', '.join(map(str, self.x_shape))})"
                f" for NVAE's {self.nvae.dataset!r} model"
                + (" (MNIST/Omniglot are padded to 32x32)" if self.x_shape[1] == 32 else "")
            )

    @contextlib.contextmanager
    def _reading_z(self, out: list[Tensor]) -> Iterator[None]:
        m = self.nvae
        if m.vanilla_vae:  # the only group goes straight into stem_decoder(z)
            cells, arg = [m.stem_decoder], 0
        else:  # combiner_dec cells are called as cell(s, z)
            cells, arg = [c for c in m.dec_tower if c.cell_type == "combiner_dec"], 1

        def hook(module, args):
            out.append(args[arg])

        handles = [c.register_forward_pre_hook(hook) for c in cells]
        try:
            yield
        finally:
            for h in handles:
                h.remove()


def _build(code: NVAECode, args: argparse.Namespace, device: torch.device) -> nn.Module:
    missing = [k for k in _ARGS if not hasattr(args, k)]
    if missing:
        raise ValueError(f"the NVAE args lack {missing}; see nvae_args() for the defaults")
    arch = code.utils.get_arch_cells(args.arch_instance)
    with _cuda_to(device), contextlib.redirect_stdout(io.StringIO()):
        model = code.model.AutoEncoder(args, None, arch)
    return model
