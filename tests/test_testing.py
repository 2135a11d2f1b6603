"""ebm_prior.testing: the contract suite as plain functions, for users' own adapters."""

import subprocess
import sys

import pytest
import torch
from torch.distributions import Normal

from ebm_prior import HierarchicalVAE
from ebm_prior.testing import ContractReport, check_backbone

ALL = (
    "latent_shapes", "batch_sizes", "round_trip", "deterministic", "temperature_scales_sigma",
    "log_prior_change_of_variables", "log_prior_matches_backbone",
    "gradients_reach_every_eps_group", "posterior_and_likelihood",
    "sampling_leaves_parameters_alone", "bad_inputs",
)  # fmt: skip


def small(cls=HierarchicalVAE):
    torch.manual_seed(0)
    return cls(x_shape=(4,), latent_dims=(2, 3), hidden=8, likelihood="gaussian").eval()


def own_log_prior(vae, x):
    """log p_b(z) at a posterior sample, written independently with torch.distributions."""

    z = vae.posterior(x).z
    mu, sigma = vae.prior_nets[0](z[0])
    return z, Normal(0.0, 1.0).log_prob(z[0]).sum(1) + Normal(mu, sigma).log_prob(z[1]).sum(1)


def test_importing_needs_no_pytest(tmp_path):
    code = (
        "import sys, torch, ebm_prior, ebm_prior.testing as t\n"
        "assert 'pytest' not in sys.modules\n"
        "vae = ebm_prior.HierarchicalVAE.from_config('digits').eval()\n"
        "t.check_backbone(vae, torch.rand(3, 1, 8, 8).bernoulli())\n"
        "assert 'pytest' not in sys.modules\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr


def test_report():
    vae, x = small(), torch.randn(3, 4)
    state = torch.get_rng_state()
    report = check_backbone(vae, x, own_log_prior=own_log_prior)
    assert isinstance(report, ContractReport)
    assert report.passed == ALL and report.skipped == ()
    report = check_backbone(vae, x)
    assert report.skipped == ("log_prior_matches_backbone",)
    assert report.passed == tuple(n for n in ALL if n not in report.skipped)
    assert torch.equal(torch.get_rng_state(), state), "the checks must not move the global seed"
    assert all(p.grad is None for p in vae.parameters()), "the checks must leave .grad alone"


class RoundTripOff(HierarchicalVAE):
    def _z_to_eps(self, z, t):
        return [e * 1.01 for e in super()._z_to_eps(z, t)]


class LogPriorOff(HierarchicalVAE):
    def _log_prior(self, z):
        return super()._log_prior(z) + 1.0


class Detached(HierarchicalVAE):
    def _eps_to_z(self, eps, t):
        z = super()._eps_to_z(eps, t)
        return [*z[:-1], z[-1].detach()]


class Unvalidated(HierarchicalVAE):
    def eps_to_z(self, eps, t=1.0):
        return self._eps_to_z(eps, t)


@pytest.mark.parametrize(
    "cls, check",
    [
        (RoundTripOff, "round_trip"),
        (LogPriorOff, "log_prior_change_of_variables"),
        (Detached, "gradients_reach_every_eps_group"),
        (Unvalidated, "bad_inputs"),
    ],
)
def test_broken_backbones_fail(cls, check):
    with pytest.raises(AssertionError, match=f"check_{check}"):
        check_backbone(small(cls), torch.randn(3, 4))


def test_own_log_prior_mismatch_fails():
    def off(vae, x):
        z, log_p = own_log_prior(vae, x)
        return z, log_p + 1.0

    with pytest.raises(AssertionError, match="check_log_prior_matches_backbone"):
        check_backbone(small(), torch.randn(3, 4), own_log_prior=off)


def test_bad_arguments():
    with pytest.raises(TypeError, match="ebm_prior.Backbone"):
        check_backbone(torch.nn.Linear(2, 2), torch.randn(3, 2))
    with pytest.raises(TypeError, match="tensor"):
        check_backbone(small(), [1.0, 2.0])
