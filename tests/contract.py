r"""The backbone contract suite: every backbone, the reference one included, must pass it.

Use it by subclassing :class:`BackboneContract` in a test module and providing two fixtures:

    class TestMyBackbone(BackboneContract):
        @pytest.fixture
        def backbone(self):
            return MyAdapter(...).eval()        # a Backbone, in eval mode

        @pytest.fixture
        def x(self, backbone):
            return torch.rand(3, 1, 28, 28)      # a data batch of size 3

Optionally override :meth:`BackboneContract.own_log_prior` to compare ``log_prior`` with the
backbone's own numbers (e.g. NVAE's ``log_p`` from its forward pass).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from ebm_prior import Backbone, EpsLangevin, JointEBMPrior


def _flat(x: Tensor) -> Tensor:
    return x.reshape(x.shape[0], -1)


def conditional_sigmas(backbone: Backbone, eps: list[Tensor], t: float = 1.0) -> list[Tensor]:
    r"""Recovers :math:`t\sigma_i` of every conditional from :math:`T_b` alone.

    :math:`z_i` is affine in :math:`\epsilon_i` given the groups above, and the groups below do
    not influence it, so shifting all of :math:`\epsilon_i` by :math:`\delta` shifts
    :math:`z_i` by exactly :math:`t \sigma_i \delta`.
    """

    with torch.no_grad():
        z = backbone.eps_to_z(eps, t)
        out = []
        for i in range(len(eps)):
            shifted = [e + (1.0 if j == i else 0.0) for j, e in enumerate(eps)]
            out.append(backbone.eps_to_z(shifted, t)[i] - z[i])
    return out


class BackboneContract:
    r"""Contract tests shared by every backbone (see the module docstring)."""

    batch = 3
    #: tolerances in float32 (NVAE-size models accumulate more round-off)
    rtol = 1e-4
    atol = 1e-4

    @pytest.fixture
    def backbone(self) -> Backbone:  # pragma: no cover - overridden
        raise NotImplementedError

    @pytest.fixture
    def x(self, backbone: Backbone) -> Tensor:  # pragma: no cover - overridden
        raise NotImplementedError

    def own_log_prior(self, backbone: Backbone, x: Tensor) -> tuple[list[Tensor], Tensor] | None:
        r"""Returns ``(z, log_p)`` computed by the backbone's own code, or ``None`` to skip."""

        return None

    # -- shapes --------------------------------------------------------------------------------

    def test_latent_shapes(self, backbone: Backbone):
        shapes = backbone.latent_shapes
        assert len(shapes) >= 1
        for s in shapes:
            assert len(s) in (1, 3) and all(isinstance(d, int) and d > 0 for d in s)
        eps = backbone.sample_eps(self.batch)
        z = backbone.eps_to_z(eps)
        assert [tuple(zi.shape) for zi in z] == [(self.batch, *s) for s in shapes]

    @pytest.mark.parametrize("batch", [1, 5])
    def test_batch_sizes(self, backbone: Backbone, batch: int):
        z = backbone.eps_to_z(backbone.sample_eps(batch))
        assert backbone.log_prior(z).shape == (batch,)
        assert backbone.decode(z).shape[0] == batch

    # -- the map T_b ---------------------------------------------------------------------------

    @pytest.mark.parametrize("t", [1.0, 0.7])
    def test_round_trip(self, backbone: Backbone, t: float):
        torch.manual_seed(0)
        eps = backbone.sample_eps(self.batch)
        with torch.no_grad():
            back = backbone.z_to_eps(backbone.eps_to_z(eps, t), t)
        for i, (a, b) in enumerate(zip(eps, back)):
            torch.testing.assert_close(b, a, rtol=self.rtol, atol=self.atol, msg=f"group {i}")

    def test_deterministic(self, backbone: Backbone):
        eps = backbone.sample_eps(self.batch)
        with torch.no_grad():
            a, b = backbone.eps_to_z(eps), backbone.eps_to_z(eps)
        for za, zb in zip(a, b):
            torch.testing.assert_close(za, zb)

    def test_temperature_scales_sigma(self, backbone: Backbone):
        eps = backbone.sample_eps(self.batch)
        s1 = conditional_sigmas(backbone, eps, 1.0)
        # the top group has no parents: its sigma at t is t times its sigma at 1
        s_half = conditional_sigmas(backbone, eps, 0.5)
        torch.testing.assert_close(s_half[0], 0.5 * s1[0], rtol=1e-3, atol=1e-4)

    def test_log_prior_change_of_variables(self, backbone: Backbone):
        r""":math:`\log p_b(T(\epsilon)) = \log \mathcal{N}(\epsilon) - \sum \log \sigma_i`."""

        torch.manual_seed(1)
        eps = backbone.sample_eps(self.batch)
        with torch.no_grad():
            z = backbone.eps_to_z(eps)
            log_p = backbone.log_prior(z)
        sig = conditional_sigmas(backbone, eps)
        expected = sum(
            (-0.5 * _flat(e) ** 2 - 0.5 * math.log(2 * math.pi) - _flat(s).abs().log()).sum(1)
            for e, s in zip(eps, sig)
        )
        torch.testing.assert_close(log_p, expected, rtol=1e-3, atol=1e-2 * max(1, log_p.numel()))

    def test_log_prior_matches_backbone(self, backbone: Backbone, x: Tensor):
        own = self.own_log_prior(backbone, x)
        if own is None:
            pytest.skip("this backbone has no separate log-prior computation to compare with")
        z, log_p = own
        with torch.no_grad():
            ours = backbone.log_prior(z)
        torch.testing.assert_close(ours, log_p, rtol=1e-4, atol=1e-2)

    def test_gradients_reach_every_eps_group(self, backbone: Backbone):
        eps = [e.requires_grad_(True) for e in backbone.sample_eps(self.batch)]
        z = backbone.eps_to_z(eps)
        prior = JointEBMPrior(backbone.latent_shapes, nef=8, num_layers=1, channels=4)
        prior.to(device=eps[0].device, dtype=eps[0].dtype)
        (prior(z).sum() + backbone.log_prior(z).sum()).backward()
        for i, e in enumerate(eps):
            assert e.grad is not None and torch.isfinite(e.grad).all(), f"group {i}"
            assert e.grad.abs().sum() > 0, f"no gradient reaches eps[{i}]"

    # -- posterior and decoder -----------------------------------------------------------------

    def test_posterior_and_likelihood(self, backbone: Backbone, x: Tensor):
        with torch.no_grad():
            post = backbone.posterior(x)
            assert backbone.check(post.z) == x.shape[0]
            assert post.log_q.shape == (x.shape[0],) and torch.isfinite(post.log_q).all()
            ll = backbone.log_likelihood(x, post.z)
            assert ll.shape == (x.shape[0],) and torch.isfinite(ll).all()
            assert backbone.decode(post.z).shape[0] == x.shape[0]

    # -- sampling ------------------------------------------------------------------------------

    def test_sampling_leaves_parameters_alone(self, backbone: Backbone):
        prior = JointEBMPrior(backbone.latent_shapes, nef=8, num_layers=1, channels=4)
        prior.to(device=backbone.device, dtype=backbone.dtype)
        before = {n: p.requires_grad for n, p in backbone.named_parameters()}
        out = EpsLangevin(prior, backbone, step_size=0.05, steps=3, mala=True)(
            backbone.sample_eps(self.batch)
        )
        assert all(torch.isfinite(z).all() for z in out.z)
        for module in (backbone, prior):
            for n, p in module.named_parameters():
                assert p.grad is None, f"sampling created a gradient on {n}"
        assert {n: p.requires_grad for n, p in backbone.named_parameters()} == before

    # -- bad inputs ----------------------------------------------------------------------------

    def test_bad_inputs(self, backbone: Backbone):
        eps = backbone.sample_eps(self.batch)
        shapes = backbone.latent_shapes
        with pytest.raises(TypeError, match="list"):
            backbone.eps_to_z(eps[0])
        with pytest.raises(ValueError, match=f"expected {len(shapes)}"):
            backbone.eps_to_z(eps[:-1])
        last = len(eps) - 1
        wrong = list(eps)
        wrong[last] = torch.zeros(self.batch, *[d + 1 for d in shapes[last]])
        with pytest.raises(ValueError, match=rf"eps\[{last}\].*expected \(B, "):
            backbone.eps_to_z(wrong)
        wrong = list(eps)
        wrong[0] = wrong[0].long()
        with pytest.raises(TypeError, match=r"eps\[0\].*dtype"):
            backbone.eps_to_z(wrong)
        with pytest.raises(ValueError, match="temperature"):
            backbone.eps_to_z(eps, t=0.0)
