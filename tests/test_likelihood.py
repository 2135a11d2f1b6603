"""log Z and the likelihood estimate: closed forms and exact identities."""

import math

import numpy as np
import pytest
import torch
from toys import LinearGaussian, QuadraticEnergy, linear_eps_law

from ebm_prior import HierarchicalVAE, JointEBMPrior, log_likelihood_bound, log_partition


@pytest.fixture
def f64():
    torch.manual_seed(0)
    vae = HierarchicalVAE(latent_dims=(3, 4), hidden=8, num_layers=1).double().eval()
    prior = JointEBMPrior(vae.latent_shapes, nef=6, num_layers=2).double()
    return vae, prior


def test_log_partition_matches_closed_form():
    r"""For a linear-Gaussian backbone and a quadratic energy,
    :math:`Z = \det(P)^{-1/2} \exp(-\tfrac12 m^\top C m + \tfrac12 b^\top P^{-1} b)`."""

    vae = LinearGaussian(d=2)
    rng = np.random.default_rng(0)
    c = np.diag(rng.uniform(0.1, 0.5, 4))
    m = rng.normal(size=4)
    prec, _ = linear_eps_law(vae, c, m)
    b = vae.matrix().T @ c @ m
    exact = (
        -0.5 * np.linalg.slogdet(prec)[1] - 0.5 * m @ c @ m + 0.5 * b @ np.linalg.solve(prec, b)
    )
    est = log_partition(
        QuadraticEnergy(c, m), vae, num_samples=200_000, batch_size=50_000,
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    assert 0 < est.std_error < 0.02
    assert abs(est.value - exact) < 5 * est.std_error + 1e-3
    assert est.ess > 1000


def test_likelihood_bound_identities(f64):
    vae, prior = f64
    x = (torch.rand(4, 1, 8, 8) > 0.5).double()

    class Const(torch.nn.Module):
        def forward(self, z):
            return torch.full((z[0].shape[0],), 3.0, dtype=z[0].dtype)

    torch.manual_seed(5)
    gauss = log_likelihood_bound(vae, x, num_samples=16)
    torch.manual_seed(5)
    const = log_likelihood_bound(vae, x, prior=Const(), log_z=3.0, num_samples=16)
    torch.testing.assert_close(gauss, const)
    lz = log_partition(Const(), vae, num_samples=100)
    assert lz.value == pytest.approx(3.0) and lz.std_error == pytest.approx(0.0, abs=1e-12)
    # more importance samples give a tighter (larger on average) bound
    torch.manual_seed(0)
    k1 = torch.stack([log_likelihood_bound(vae, x, num_samples=1) for _ in range(50)]).mean()
    k64 = torch.stack([log_likelihood_bound(vae, x, num_samples=64) for _ in range(5)]).mean()
    assert k64 > k1
    with pytest.raises(ValueError, match="log_z"):
        log_likelihood_bound(vae, x, prior=prior)
    assert math.isfinite(float(log_likelihood_bound(vae, x, prior, log_z=0.1).mean()))
