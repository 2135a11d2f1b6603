"""The reference backbone through the shared contract suite, plus its own checks."""

import pytest
import torch
from contract import BackboneContract

from ebm_prior import HierarchicalVAE


@pytest.fixture(params=["digits", "mnist"])
def config(request):
    return request.param


class TestReferenceContract(BackboneContract):
    @pytest.fixture
    def backbone(self, config):
        torch.manual_seed(0)
        return HierarchicalVAE.from_config(config).eval()

    @pytest.fixture
    def x(self, backbone):
        return (torch.rand(self.batch, *backbone.x_shape) > 0.5).float()


class TestThreeGroups(BackboneContract):
    @pytest.fixture
    def backbone(self):
        torch.manual_seed(0)
        return HierarchicalVAE(latent_dims=(2, 3, 5), likelihood="gaussian").eval()

    @pytest.fixture
    def x(self, backbone):
        return torch.randn(self.batch, *backbone.x_shape)


def _own_log_prior(vae, z):
    """log p_b(z) written independently with torch.distributions."""
    from torch.distributions import Normal

    out = Normal(0.0, 1.0).log_prob(z[0]).sum(1)
    for k, net in enumerate(vae.prior_nets):
        mu, sigma = net(z[k])
        out = out + Normal(mu, sigma).log_prob(z[k + 1]).sum(1)
    return out


TestReferenceContract.own_log_prior = lambda self, vae, x: (
    (z := vae.posterior(x).z),
    _own_log_prior(vae, z),
)
TestThreeGroups.own_log_prior = TestReferenceContract.own_log_prior
