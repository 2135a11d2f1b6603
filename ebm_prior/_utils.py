r"""Private helpers: input validation, parameter freezing."""

from __future__ import annotations

import contextlib
import operator
from collections.abc import Iterable, Iterator, Sequence

import torch
import torch.nn as nn
from torch import Tensor

Shape = tuple[int, ...]


def as_int(value: object) -> int:
    r"""Returns ``value`` as an ``int`` if it is an integer (``int``, NumPy or 0-d tensor
    integers), else raises ``TypeError``: floats (even ``2.0``), strings and bools are refused."""

    if isinstance(value, bool):
        raise TypeError(f"expected an integer, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"expected an integer, got {value!r}") from None


def normalize_shapes(latent_shapes: Sequence[Sequence[int]]) -> tuple[Shape, ...]:
    r"""Returns ``latent_shapes`` as a tuple of tuples of positive ints (JSON gives lists).

    Sizes must be integers (``int``, NumPy integers, ``torch.Size`` entries): a float such as
    ``2.5`` or a string such as ``"3"`` raises ``TypeError`` naming the group.
    """

    if isinstance(latent_shapes, (str, bytes)) or len(latent_shapes) == 0:
        raise ValueError(
            f"latent_shapes must be a non-empty list of shapes, got {latent_shapes!r}"
        )
    shapes = []
    for i, shape in enumerate(latent_shapes):
        if isinstance(shape, int) and not isinstance(shape, bool):
            shape = (shape,)
        if isinstance(shape, (str, bytes)) or not isinstance(shape, Iterable):
            raise TypeError(f"group {i}: a latent shape is a sequence of integers, got {shape!r}")
        try:
            shape = tuple(as_int(s) for s in shape)
        except TypeError:
            raise TypeError(
                f"group {i}: a latent shape is a sequence of integers, got {tuple(shape)!r}"
            ) from None
        if len(shape) not in (1, 3) or any(s <= 0 for s in shape):
            raise ValueError(
                f"group {i}: a latent shape is (d,) or (c, h, w) with positive sizes, got {shape}"
            )
        shapes.append(shape)
    return tuple(shapes)


def check_latents(
    latents: Sequence[Tensor],
    shapes: Sequence[Shape],
    name: str = "z",
    device: torch.device | None = None,
) -> int:
    r"""Checks a list of per-group latents against ``shapes`` and returns the batch size.

    Raises ``TypeError``/``ValueError`` naming the group, the expected shape, the dtype or the
    device that is wrong.
    """

    if isinstance(latents, Tensor) or not isinstance(latents, (list, tuple)):
        raise TypeError(
            f"{name} must be a list with one tensor per latent group "
            f"({len(shapes)} groups, shapes {list(shapes)}), got {type(latents).__name__}"
        )
    if len(latents) != len(shapes):
        raise ValueError(
            f"{name} has {len(latents)} groups, expected {len(shapes)} (shapes {list(shapes)})"
        )
    batch = None
    for i, (x, shape) in enumerate(zip(latents, shapes)):
        if not isinstance(x, Tensor):
            raise TypeError(f"{name}[{i}] must be a tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"{name}[{i}] must be a floating point tensor, got dtype {x.dtype}")
        if tuple(x.shape[1:]) != tuple(shape) or x.dim() != len(shape) + 1:
            expected = ", ".join(map(str, shape))
            raise ValueError(f"{name}[{i}] has shape {tuple(x.shape)}, expected (B, {expected})")
        if batch is None:
            batch = x.shape[0]
        elif x.shape[0] != batch:
            raise ValueError(f"{name}[{i}] has batch size {x.shape[0]}, but {name}[0] has {batch}")
        if x.dtype != latents[0].dtype:
            raise TypeError(
                f"{name}[{i}] has dtype {x.dtype}, but {name}[0] has {latents[0].dtype}"
            )
        if device is not None and x.device.type != torch.device(device).type:
            raise ValueError(f"{name}[{i}] is on {x.device}, expected {device}")
        if x.device != latents[0].device:
            raise ValueError(
                f"{name}[{i}] is on {x.device}, but {name}[0] is on {latents[0].device}"
            )
    return int(batch)


def module_device(module: nn.Module) -> torch.device:
    r"""Returns the device of the first parameter or buffer of ``module`` (CPU if none)."""

    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.device("cpu")


def module_dtype(module: nn.Module) -> torch.dtype:
    r"""Returns the floating dtype of the first floating parameter (or buffer) of ``module``."""

    for t in (*module.parameters(), *module.buffers()):
        if t.is_floating_point():
            return t.dtype
    return torch.get_default_dtype()


@contextlib.contextmanager
def frozen(*modules: object) -> Iterator[None]:
    r"""Temporarily sets ``requires_grad=False`` on every parameter of the given modules.

    Inside, autograd tracks only the sampler's state: no parameter ``.grad`` is created or
    changed, and no graph is built through the weights. The flags are restored on exit.
    """

    params = []
    for m in modules:
        if isinstance(m, nn.Module):
            params.extend(p for p in m.parameters() if p.requires_grad)
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def flat_sum(x: Tensor) -> Tensor:
    r"""Sums all but the batch dimension: :math:`(B, *) \to (B,)`."""

    return x.reshape(x.shape[0], -1).sum(dim=1)
