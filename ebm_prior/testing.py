r"""The backbone contract suite, for every backbone: the reference one, the adapters, and yours.

A backbone that passes it can be used with the prior, the samplers, the objectives and the
trainer: :math:`T_b` round-trips and is triangular with the scales the temperature sets,
:code:`log_prior` agrees with the change of variables (and with the backbone's own numbers),
gradients reach every :math:`\epsilon` group, sampling leaves the parameters alone, and bad
inputs are refused.

The checks are plain functions that raise :class:`AssertionError` (no test framework needed);
:func:`check_backbone` runs them all. For pytest, :class:`BackboneContract` is a base class
with one test per check (it imports pytest only to skip a check that cannot run):

.. code-block:: python

    from ebm_prior.testing import BackboneContract

    class TestMyBackbone(BackboneContract):
        @pytest.fixture
        def backbone(self):
            return MyAdapter(...).eval()  # a Backbone, in eval mode

        @pytest.fixture
        def x(self, backbone):
            return torch.rand(3, 1, 28, 28)  # a data batch of size 3

Override ``own_log_prior(self, backbone, x)`` to compare ``log_prior`` with the backbone's own
numbers (e.g. NVAE's ``log_p`` from its forward pass): it returns ``(z, log_p)`` or ``None``.
"""

from __future__ import annotations

__all__ = [
    "BackboneContract",
    "ContractReport",
    "check_backbone",
    "check_bad_inputs",
    "check_batch_sizes",
    "check_deterministic",
    "check_gradients_reach_every_eps_group",
    "check_latent_shapes",
    "check_log_prior_change_of_variables",
    "check_log_prior_matches_backbone",
    "check_posterior_and_likelihood",
    "check_round_trip",
    "check_sampling_leaves_parameters_alone",
    "check_temperature_scales_sigma",
    "conditional_sigmas",
]

import math
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, NamedTuple

import torch
from torch import Tensor

from .backbone import Backbone
from .prior import JointEBMPrior
from .sample import EpsLangevin

#: ``own_log_prior(backbone, x) -> (z, log_p)``, or ``None`` where the backbone has no
#: separate computation to compare with
OwnLogPrior = Callable[[Backbone, Tensor], "tuple[Sequence[Tensor], Tensor] | None"]


class ContractReport(NamedTuple):
    r"""What :func:`check_backbone` ran.

    Attributes:
        passed: Names of the checks that passed (``"round_trip"`` for
            :func:`check_round_trip`, ...).
        skipped: Names of the checks that could not run (``"log_prior_matches_backbone"``
            without ``own_log_prior``).
    """

    passed: tuple[str, ...]
    skipped: tuple[str, ...]


def _expect(condition: bool, message: str) -> None:
    if not condition:
        raise AssertionError(message)


def _expect_error(kind: type[Exception], pattern: str, fn: Callable[[], Any], what: str) -> None:
    try:
        fn()
    except kind as e:
        _expect(
            re.search(pattern, str(e)) is not None,
            f"{what}: raised {kind.__name__}, but its message {str(e)!r} does not match "
            f"{pattern!r}",
        )
        return
    raise AssertionError(f"{what}: expected a {kind.__name__} matching {pattern!r}, got none")


@contextmanager
def _seeded(backbone: Backbone, seed: int) -> Iterator[None]:
    r"""Seeds the global generators for one check and restores them afterwards."""

    device = backbone.device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def _flat(x: Tensor) -> Tensor:
    return x.reshape(x.shape[0], -1)


def _check_backbone(backbone: Backbone) -> None:
    if not isinstance(backbone, Backbone):
        raise TypeError(f"backbone must be an ebm_prior.Backbone, got {type(backbone).__name__}")


def _small_prior(backbone: Backbone) -> JointEBMPrior:
    prior = JointEBMPrior(backbone.latent_shapes, nef=8, num_layers=1, channels=4)
    return prior.to(device=backbone.device, dtype=backbone.dtype)


def conditional_sigmas(backbone: Backbone, eps: list[Tensor], t: float = 1.0) -> list[Tensor]:
    r"""Recovers :math:`t\sigma_i` of every conditional from :math:`T_b` alone.

    :math:`z_i` is affine in :math:`\epsilon_i` given the groups above, and the groups below do
    not influence it, so shifting all of :math:`\epsilon_i` by :math:`\delta` shifts
    :math:`z_i` by exactly :math:`t \sigma_i \delta`.

    Arguments:
        backbone: The backbone.
        eps: Noise, one tensor per group with shape :math:`(B, *)`.
        t: Temperature.

    Returns:
        :math:`t \sigma_i` per group, same shapes as ``eps``.
    """

    with torch.no_grad():
        z = backbone.eps_to_z(eps, t)
        out = []
        for i in range(len(eps)):
            shifted = [e + (1.0 if j == i else 0.0) for j, e in enumerate(eps)]
            out.append(backbone.eps_to_z(shifted, t)[i] - z[i])
    return out


# -- shapes ------------------------------------------------------------------------------------


def check_latent_shapes(backbone: Backbone, batch: int = 3, seed: int = 0) -> None:
    r"""``latent_shapes`` lists ``(d,)`` or ``(c, h, w)`` groups, and :math:`T_b` returns them."""

    _check_backbone(backbone)
    shapes = backbone.latent_shapes
    _expect(len(shapes) >= 1, "latent_shapes lists no group")
    for i, s in enumerate(shapes):
        _expect(
            len(s) in (1, 3) and all(isinstance(d, int) and d > 0 for d in s),
            f"latent_shapes[{i}] is {s!r}: expected (d,) or (c, h, w) with positive ints",
        )
    with _seeded(backbone, seed):
        z = backbone.eps_to_z(backbone.sample_eps(batch))
    got = [tuple(zi.shape) for zi in z]
    want = [(batch, *s) for s in shapes]
    _expect(got == want, f"eps_to_z returned shapes {got}, latent_shapes say {want}")


def check_batch_sizes(backbone: Backbone, batches: Sequence[int] = (1, 5), seed: int = 0) -> None:
    r"""``log_prior`` and ``decode`` follow the batch size, including a batch of one."""

    _check_backbone(backbone)
    for batch in batches:
        with _seeded(backbone, seed):
            z = backbone.eps_to_z(backbone.sample_eps(batch))
            shape = tuple(backbone.log_prior(z).shape)
            _expect(shape == (batch,), f"batch {batch}: log_prior has shape {shape}")
            n = backbone.decode(z).shape[0]
            _expect(n == batch, f"batch {batch}: decode returned a batch of {n}")


# -- the map T_b -------------------------------------------------------------------------------


def check_round_trip(
    backbone: Backbone,
    temperatures: Sequence[float] = (1.0, 0.7),
    batch: int = 3,
    rtol: float = 1e-4,
    atol: float = 1e-4,
    seed: int = 0,
) -> None:
    r""":math:`T_b^{-1}(T_b(\epsilon)) = \epsilon` at every temperature."""

    _check_backbone(backbone)
    for t in temperatures:
        with _seeded(backbone, seed), torch.no_grad():
            eps = backbone.sample_eps(batch)
            back = backbone.z_to_eps(backbone.eps_to_z(eps, t), t)
        for i, (a, b) in enumerate(zip(eps, back)):
            torch.testing.assert_close(
                b, a, rtol=rtol, atol=atol, msg=lambda m, i=i, t=t: f"t={t}, group {i}: {m}"
            )


def check_deterministic(backbone: Backbone, batch: int = 3, seed: int = 0) -> None:
    r""":math:`T_b` is a function: the same :math:`\epsilon` gives the same :math:`z`."""

    _check_backbone(backbone)
    with _seeded(backbone, seed), torch.no_grad():
        eps = backbone.sample_eps(batch)
        a, b = backbone.eps_to_z(eps), backbone.eps_to_z(eps)
    for i, (za, zb) in enumerate(zip(a, b)):
        torch.testing.assert_close(za, zb, msg=lambda m, i=i: f"group {i}: {m}")


def check_temperature_scales_sigma(backbone: Backbone, batch: int = 3, seed: int = 0) -> None:
    r"""The top group has no parents: its :math:`\sigma` at :math:`t` is :math:`t` times its
    :math:`\sigma` at 1 (NVAE's convention)."""

    _check_backbone(backbone)
    with _seeded(backbone, seed):
        eps = backbone.sample_eps(batch)
        s1 = conditional_sigmas(backbone, eps, 1.0)
        s_half = conditional_sigmas(backbone, eps, 0.5)
    torch.testing.assert_close(
        s_half[0], 0.5 * s1[0], rtol=1e-3, atol=1e-4, msg=lambda m: f"top sigma at t=0.5: {m}"
    )


def check_log_prior_change_of_variables(backbone: Backbone, batch: int = 3, seed: int = 1) -> None:
    r""":math:`\log p_b(T_b(\epsilon)) = \log \mathcal{N}(\epsilon) - \sum_i \log \sigma_i`."""

    _check_backbone(backbone)
    with _seeded(backbone, seed):
        eps = backbone.sample_eps(batch)
        with torch.no_grad():
            z = backbone.eps_to_z(eps)
            log_p = backbone.log_prior(z)
        sig = conditional_sigmas(backbone, eps)
    expected = sum(
        (-0.5 * _flat(e) ** 2 - 0.5 * math.log(2 * math.pi) - _flat(s).abs().log()).sum(1)
        for e, s in zip(eps, sig)
    )
    torch.testing.assert_close(
        log_p,
        expected,
        rtol=1e-3,
        atol=1e-2 * max(1, log_p.numel()),
        msg=lambda m: f"log_prior against the change of variables of T_b: {m}",
    )


def check_log_prior_matches_backbone(
    backbone: Backbone,
    z: Sequence[Tensor],
    log_p: Tensor,
    rtol: float = 1e-4,
    atol: float = 1e-2,
) -> None:
    r"""``log_prior(z)`` equals ``log_p``, the backbone's own :math:`\log p_b(z)` (computed by
    its own code, e.g. from its forward pass)."""

    _check_backbone(backbone)
    with torch.no_grad():
        ours = backbone.log_prior(list(z))
    torch.testing.assert_close(
        ours, log_p, rtol=rtol, atol=atol, msg=lambda m: f"log_prior against the backbone's: {m}"
    )


def check_gradients_reach_every_eps_group(
    backbone: Backbone, batch: int = 3, seed: int = 0
) -> None:
    r"""Gradients of :math:`f_a(T_b(\epsilon)) + \log p_b(T_b(\epsilon))` reach every group
    (computed for :math:`\epsilon` alone: no parameter's ``.grad`` is touched)."""

    _check_backbone(backbone)
    with _seeded(backbone, seed):
        eps = [e.requires_grad_(True) for e in backbone.sample_eps(batch)]
        z = backbone.eps_to_z(eps)
        prior = _small_prior(backbone)
        total = prior(z).sum() + backbone.log_prior(z).sum()
        grads = torch.autograd.grad(total, eps, allow_unused=True)
    for i, g in enumerate(grads):
        _expect(g is not None, f"no gradient reaches eps[{i}]")
        _expect(bool(torch.isfinite(g).all()), f"non-finite gradient on eps[{i}]")
        _expect(bool(g.abs().sum() > 0), f"the gradient on eps[{i}] is zero")


# -- posterior and decoder ---------------------------------------------------------------------


def check_posterior_and_likelihood(backbone: Backbone, x: Tensor, seed: int = 0) -> None:
    r"""``posterior``, ``log_likelihood`` and ``decode`` accept a data batch ``x``."""

    _check_backbone(backbone)
    b = x.shape[0]
    with _seeded(backbone, seed), torch.no_grad():
        post = backbone.posterior(x)
        _expect(backbone.check(post.z) == b, "posterior(x).z has the wrong batch size")
        _expect(tuple(post.log_q.shape) == (b,), f"log_q has shape {tuple(post.log_q.shape)}")
        _expect(bool(torch.isfinite(post.log_q).all()), "log_q is not finite")
        ll = backbone.log_likelihood(x, post.z)
        _expect(tuple(ll.shape) == (b,), f"log_likelihood has shape {tuple(ll.shape)}")
        _expect(bool(torch.isfinite(ll).all()), "log_likelihood is not finite")
        n = backbone.decode(post.z).shape[0]
        _expect(n == b, f"decode returned a batch of {n} for {b} latents")


# -- sampling ----------------------------------------------------------------------------------


def check_sampling_leaves_parameters_alone(
    backbone: Backbone, batch: int = 3, seed: int = 0
) -> None:
    r"""A MALA chain of :class:`~ebm_prior.EpsLangevin` leaves every parameter's ``.grad``
    (of the backbone and of the prior) and ``requires_grad`` as it was."""

    _check_backbone(backbone)
    with _seeded(backbone, seed):
        prior = _small_prior(backbone)
        params = [*backbone.named_parameters(), *prior.named_parameters(prefix="prior")]
        flags = [p.requires_grad for _, p in params]
        grads = [None if p.grad is None else p.grad.clone() for _, p in params]
        out = EpsLangevin(prior, backbone, step_size=0.05, steps=3, mala=True)(
            backbone.sample_eps(batch)
        )
    _expect(all(bool(torch.isfinite(z).all()) for z in out.z), "the chain produced non-finite z")
    for (n, p), flag, grad in zip(params, flags, grads):
        _expect(p.requires_grad == flag, f"sampling changed requires_grad of {n}")
        if grad is None:
            _expect(p.grad is None, f"sampling created a gradient on {n}")
        else:
            _expect(p.grad is not None and torch.equal(p.grad, grad), f"sampling changed {n}.grad")


# -- bad inputs --------------------------------------------------------------------------------


def check_bad_inputs(backbone: Backbone, batch: int = 3, seed: int = 0) -> None:
    r"""``eps_to_z`` refuses a bare tensor, a wrong number of groups, a wrong shape, an integer
    dtype and a non-positive temperature, with errors that say so."""

    _check_backbone(backbone)
    with _seeded(backbone, seed):
        eps = backbone.sample_eps(batch)
    shapes = backbone.latent_shapes
    last = len(eps) - 1
    wrong_shape = list(eps)
    wrong_shape[last] = torch.zeros(batch, *[d + 1 for d in shapes[last]])
    wrong_dtype = list(eps)
    wrong_dtype[0] = wrong_dtype[0].long()
    cases = [
        (TypeError, "list", eps[0], "a bare tensor"),
        (ValueError, f"expected {len(shapes)}", eps[:-1], "one group too few"),
        (ValueError, rf"eps\[{last}\].*expected \(B, ", wrong_shape, f"a wrong eps[{last}] shape"),
        (TypeError, r"eps\[0\].*dtype", wrong_dtype, "an integer eps[0]"),
    ]
    for kind, pattern, arg, what in cases:
        _expect_error(kind, pattern, lambda arg=arg: backbone.eps_to_z(arg), f"eps_to_z({what})")
    _expect_error(
        ValueError, "temperature", lambda: backbone.eps_to_z(eps, t=0.0), "eps_to_z(t=0)"
    )


# -- all of them -------------------------------------------------------------------------------


def check_backbone(
    backbone: Backbone,
    x: Tensor,
    own_log_prior: OwnLogPrior | None = None,
    *,
    batch: int = 3,
    rtol: float = 1e-4,
    atol: float = 1e-4,
) -> ContractReport:
    r"""Runs the whole contract suite on ``backbone`` (no test framework needed).

    Each check seeds the global generators for itself and restores them afterwards. Put the
    backbone in eval mode first (batch norm and dropout would make :math:`T_b` batch-dependent
    or random).

    Arguments:
        backbone: The backbone to check.
        x: A data batch with shape :math:`(B, *)`, for the posterior and the decoder.
        own_log_prior: Optionally, ``own_log_prior(backbone, x) -> (z, log_p)``: a
            :math:`z` and :math:`\log p_b(z)` computed by the backbone's own code, which
            ``log_prior`` must reproduce. Without it that check is skipped.
        batch: Batch size of the noise the checks draw.
        rtol: Relative tolerance of the round trip (float32: NVAE-size models accumulate
            more round-off than small ones).
        atol: Absolute tolerance of the round trip.

    Returns:
        The checks that passed and those skipped.

    Raises:
        AssertionError: The first check that fails, named in the message.

    Example:
        >>> from ebm_prior.testing import check_backbone
        >>> vae = HierarchicalVAE.from_config("digits").eval()
        >>> report = check_backbone(vae, torch.rand(3, 1, 8, 8).bernoulli())
        >>> report.skipped
        ('log_prior_matches_backbone',)
    """

    _check_backbone(backbone)
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a data batch (a tensor), got {type(x).__name__}")

    def matches_backbone() -> bool:
        if own_log_prior is None:
            return False
        with _seeded(backbone, 0):
            own = own_log_prior(backbone, x)
        if own is None:
            return False
        check_log_prior_matches_backbone(backbone, *own)
        return True

    checks: list[tuple[str, Callable[[], bool | None]]] = [
        ("latent_shapes", lambda: check_latent_shapes(backbone, batch)),
        ("batch_sizes", lambda: check_batch_sizes(backbone)),
        ("round_trip", lambda: check_round_trip(backbone, batch=batch, rtol=rtol, atol=atol)),
        ("deterministic", lambda: check_deterministic(backbone, batch)),
        ("temperature_scales_sigma", lambda: check_temperature_scales_sigma(backbone, batch)),
        (
            "log_prior_change_of_variables",
            lambda: check_log_prior_change_of_variables(backbone, batch),
        ),
        ("log_prior_matches_backbone", matches_backbone),
        (
            "gradients_reach_every_eps_group",
            lambda: check_gradients_reach_every_eps_group(backbone, batch),
        ),
        ("posterior_and_likelihood", lambda: check_posterior_and_likelihood(backbone, x)),
        (
            "sampling_leaves_parameters_alone",
            lambda: check_sampling_leaves_parameters_alone(backbone, batch),
        ),
        ("bad_inputs", lambda: check_bad_inputs(backbone, batch)),
    ]
    passed, skipped = [], []
    for name, check in checks:
        try:
            ran = check()
        except Exception as e:
            raise AssertionError(f"backbone contract, check_{name}: {e}") from e
        (skipped if ran is False else passed).append(name)
    return ContractReport(tuple(passed), tuple(skipped))


# -- pytest ------------------------------------------------------------------------------------


class BackboneContract:
    r"""The contract suite as pytest tests, one per check: subclass it in a test module (as
    ``Test...``) and provide two fixtures, ``backbone`` (a :class:`~ebm_prior.Backbone` in eval
    mode) and ``x`` (a data batch of :attr:`batch` items); see the module docstring.

    The class itself needs no pytest: it only calls :func:`pytest.skip` where a check cannot
    run.
    """

    #: batch size of the noise the checks draw
    batch = 3
    #: round-trip tolerances in float32 (NVAE-size models accumulate more round-off)
    rtol = 1e-4
    atol = 1e-4

    def own_log_prior(self, backbone: Backbone, x: Tensor) -> tuple[list[Tensor], Tensor] | None:
        r"""Returns ``(z, log_p)`` computed by the backbone's own code, or ``None`` to skip."""

        return None

    def test_latent_shapes(self, backbone: Backbone):
        check_latent_shapes(backbone, self.batch)

    def test_batch_sizes(self, backbone: Backbone):
        check_batch_sizes(backbone, (1, 5))

    def test_round_trip(self, backbone: Backbone):
        check_round_trip(backbone, (1.0, 0.7), self.batch, rtol=self.rtol, atol=self.atol)

    def test_deterministic(self, backbone: Backbone):
        check_deterministic(backbone, self.batch)

    def test_temperature_scales_sigma(self, backbone: Backbone):
        check_temperature_scales_sigma(backbone, self.batch)

    def test_log_prior_change_of_variables(self, backbone: Backbone):
        check_log_prior_change_of_variables(backbone, self.batch)

    def test_log_prior_matches_backbone(self, backbone: Backbone, x: Tensor):
        own = self.own_log_prior(backbone, x)
        if own is None:
            import pytest

            pytest.skip("this backbone has no separate log-prior computation to compare with")
        check_log_prior_matches_backbone(backbone, *own)

    def test_gradients_reach_every_eps_group(self, backbone: Backbone):
        check_gradients_reach_every_eps_group(backbone, self.batch)

    def test_posterior_and_likelihood(self, backbone: Backbone, x: Tensor):
        check_posterior_and_likelihood(backbone, x)

    def test_sampling_leaves_parameters_alone(self, backbone: Backbone):
        check_sampling_leaves_parameters_alone(backbone, self.batch)

    def test_bad_inputs(self, backbone: Backbone):
        check_bad_inputs(backbone, self.batch)
