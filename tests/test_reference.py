"""The reference backbone through the shared contract suite."""

import pytest
import torch
from torch.distributions import Normal

from ebm_prior import HierarchicalVAE
from ebm_prior.testing import BackboneContract


class _ReferenceContract(BackboneContract):
    def own_log_prior(self, vae, x):
        """log p_b(z) at a posterior sample, written independently with torch.distributions."""

        z = vae.posterior(x).z
        out = Normal(0.0, 1.0).log_prob(z[0]).sum(1)
        for k, net in enumerate(vae.prior_nets):
            mu, sigma = net(z[k])
            out = out + Normal(mu, sigma).log_prob(z[k + 1]).sum(1)
        return z, out


class TestReferenceContract(_ReferenceContract):
    @pytest.fixture(params=["digits", "mnist"])
    def backbone(self, request):
        torch.manual_seed(0)
        return HierarchicalVAE.from_config(request.param).eval()

    @pytest.fixture
    def x(self, backbone):
        return (torch.rand(self.batch, *backbone.x_shape) > 0.5).float()


class TestThreeGroups(_ReferenceContract):
    @pytest.fixture
    def backbone(self):
        torch.manual_seed(0)
        return HierarchicalVAE(latent_dims=(2, 3, 5), likelihood="gaussian").eval()

    @pytest.fixture
    def x(self, backbone):
        return torch.randn(self.batch, *backbone.x_shape)


@pytest.mark.parametrize("name", ["cifar10", "celeba64"])
def test_paper_configs(name):
    vae = HierarchicalVAE.from_config(name).eval()
    assert vae.latent_shapes == ((100,), (128,))
    x = torch.randn(2, *vae.x_shape)
    assert vae.elbo(x).shape == (2,)
    assert vae.decode(vae.eps_to_z(vae.sample_eps(2))).shape == (2, *vae.x_shape)


def test_bad_configs():
    with pytest.raises(ValueError, match="at least 2 latent groups"):
        HierarchicalVAE(latent_dims=(4,))
    with pytest.raises(ValueError, match="unknown config 'cifar'"):
        HierarchicalVAE.from_config("cifar")
    with pytest.raises(ValueError, match="likelihood"):
        HierarchicalVAE(likelihood="poisson")
