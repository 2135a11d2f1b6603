"""Statistical and behavioural tests of the Langevin samplers against exact laws."""

import numpy as np
import pytest
import torch
from contract import BackboneContract
from scipy import stats
from toys import (
    Heteroscedastic,
    LinearGaussian,
    NonQuadraticEnergy,
    QuadraticEnergy,
    hetero_exact_marginals,
    interp_cdf,
    linear_eps_law,
    lyapunov,
)

from ebm_prior import (
    EpsLangevin,
    HierarchicalVAE,
    JointEBMPrior,
    Langevin,
    LangevinDivergenceError,
    PosteriorLangevin,
)

ALPHA = 1e-4  # tiny alpha: a correct sampler fails one KS test in 10,000


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# -- the toys satisfy the contract too --


class TestLinearGaussianContract(BackboneContract):
    @pytest.fixture
    def backbone(self):
        return LinearGaussian()

    @pytest.fixture
    def x(self, backbone):
        return torch.randn(self.batch, 3, dtype=torch.float64)


class TestHeteroscedasticContract(BackboneContract):
    @pytest.fixture
    def backbone(self):
        return Heteroscedastic()

    @pytest.fixture
    def x(self, backbone):
        return torch.randn(self.batch, 1, dtype=torch.float64)


# -- ULA pins the step-size convention --


@pytest.mark.parametrize("s, v0", [(0.5, 0.3), (0.3, 0.1)])
def test_ula_quadratic_closed_form(s, v0):
    r"""ULA on :math:`E = z^2/(2 v_0)` with :math:`z' = z - a\nabla E + b\xi`, :math:`a = s^2/2`,
    :math:`b = s`, has stationary variance :math:`b^2 / (1 - (1 - a/v_0)^2)`."""

    a, b = s**2 / 2, s
    var = b**2 / (1 - (1 - a / v0) ** 2)
    sampler = Langevin(
        lambda x: -0.5 * x[0][:, 0] ** 2 / v0, step_size=s, steps=150, generator=_gen(0)
    )
    x = sampler([torch.zeros(20_000, 1, dtype=torch.float64)]).x[0][:, 0].numpy()
    assert stats.kstest(x, stats.norm(scale=np.sqrt(var)).cdf).pvalue > ALPHA
    # the same test rejects the exact law (ULA's bias) and the delta = s convention
    assert stats.kstest(x, stats.norm(scale=np.sqrt(v0)).cdf).pvalue < 1e-6
    a2 = s / 2
    var2 = s / (1 - (1 - a2 / v0) ** 2)
    assert stats.kstest(x, stats.norm(scale=np.sqrt(var2)).cdf).pvalue < 1e-6


def test_ula_eps_space_linear_gaussian_closed_form():
    r"""ULA in eps space for a linear-Gaussian hierarchy with a quadratic energy:
    :math:`\epsilon' = (I - \tfrac{s^2}{2}P)\epsilon + \tfrac{s^2}{2}P\mu + s\xi`, whose
    stationary covariance solves a discrete Lyapunov equation."""

    vae = LinearGaussian(d=2)
    rng = np.random.default_rng(0)
    c = np.diag(rng.uniform(0.5, 2.0, 4))
    m = rng.normal(size=4)
    prec, mean = linear_eps_law(vae, c, m)
    s = 0.6
    a = np.eye(4) - 0.5 * s**2 * prec
    cov = lyapunov(a, s**2 * np.eye(4))
    out = EpsLangevin(QuadraticEnergy(c, m), vae, step_size=s, steps=200, generator=_gen(1))(
        vae.sample_eps(20_000, generator=_gen(2))
    )
    eps = torch.cat(out.x, 1).numpy()
    for j in range(4):
        law = stats.norm(mean[j], np.sqrt(cov[j, j]))
        assert stats.kstest(eps[:, j], law.cdf).pvalue > ALPHA, j
    np.testing.assert_allclose(np.cov(eps.T), cov, atol=0.05)


# -- MALA is exact --


def test_mala_linear_gaussian_exact():
    vae = LinearGaussian(d=2)
    rng = np.random.default_rng(3)
    c = np.diag(rng.uniform(0.5, 2.0, 4))
    m = rng.normal(size=4)
    prec, mean = linear_eps_law(vae, c, m)
    cov = np.linalg.inv(prec)
    mm = vae.matrix()
    z_mean, z_cov = mm @ mean, mm @ cov @ mm.T
    s = 1.2 / np.sqrt(np.linalg.eigvalsh(prec).max())
    sampler = EpsLangevin(
        QuadraticEnergy(c, m), vae, step_size=s, steps=300, mala=True, generator=_gen(4)
    )
    out = sampler(vae.sample_eps(10_000, generator=_gen(5)))
    assert out.acceptance.mean() > 0.7, "the test needs a step size with high acceptance"
    z = torch.cat(out.z, 1).numpy()
    for j in range(4):
        law = stats.norm(z_mean[j], np.sqrt(z_cov[j, j]))
        assert stats.kstest(z[:, j], law.cdf).pvalue > ALPHA, j
    np.testing.assert_allclose(np.cov(z.T), z_cov, atol=0.06)
    # the same statistics reject ULA at this (large) step size
    ula = EpsLangevin(QuadraticEnergy(c, m), vae, step_size=s, steps=300, generator=_gen(4))
    z_ula = torch.cat(ula(vae.sample_eps(10_000, generator=_gen(5))).z, 1).numpy()
    pvals = [
        stats.kstest(z_ula[:, j], stats.norm(z_mean[j], np.sqrt(z_cov[j, j])).cdf).pvalue
        for j in range(4)
    ]
    assert min(pvals) < 1e-6


def test_mala_posterior_linear_gaussian_exact():
    r"""z-space posterior Langevin: :math:`\log p(x|z) + f(z) + \log p_b(z)` is Gaussian here."""

    vae = LinearGaussian(d=2)
    rng = np.random.default_rng(6)
    c = np.diag(rng.uniform(0.2, 1.0, 4))
    m = rng.normal(size=4)
    x = torch.tensor([[0.5, -1.0, 2.0]], dtype=torch.float64)
    mm = vae.matrix()
    prior_cov = mm @ mm.T
    w = np.zeros((3, 4))
    w[:, 2:] = vae.W.numpy()
    q = np.linalg.inv(prior_cov) + c + w.T @ w / vae.sigma_x**2
    cov = np.linalg.inv(q)
    mean = cov @ (c @ m + w.T @ x.numpy()[0] / vae.sigma_x**2)
    n = 8_000
    xs = x.expand(n, 3)
    sampler = PosteriorLangevin(
        QuadraticEnergy(c, m), vae, xs, step_size=0.35, steps=300, mala=True, generator=_gen(7)
    )
    z0 = [torch.randn(n, 2, dtype=torch.float64, generator=_gen(8)) for _ in range(2)]
    out = sampler(z0)
    assert out.acceptance.mean() > 0.7
    z = torch.cat(out.z, 1).numpy()
    for j in range(4):
        assert stats.kstest(z[:, j], stats.norm(mean[j], np.sqrt(cov[j, j])).cdf).pvalue > ALPHA


# -- the exact target vs the anchors' Jacobian-biased target --


@pytest.fixture(scope="module")
def hetero_runs():
    vae = Heteroscedastic()
    out = {}
    for target in ("exact", "anchor"):
        sampler = EpsLangevin(
            NonQuadraticEnergy(),
            vae,
            step_size=0.8,
            steps=400,
            mala=True,
            target=target,
            generator=_gen(11),
        )
        res = sampler(vae.sample_eps(8_000, generator=_gen(12)))
        assert res.acceptance.mean() > 0.7
        out[target] = torch.cat(res.x, 1).numpy()
    return out


@pytest.mark.parametrize("target", ["exact", "anchor"])
def test_heteroscedastic_matches_quadrature(hetero_runs, target):
    eps = hetero_runs[target]
    for j, cdf in enumerate(hetero_exact_marginals(target)):
        assert stats.kstest(eps[:, j], interp_cdf(cdf)).pvalue > ALPHA, (target, j)


def test_anchor_target_misses_exact_law(hetero_runs):
    r"""The default sampler matches the exact eps-space law; the anchors' target does not."""

    exact_cdf = interp_cdf(hetero_exact_marginals("exact")[0])
    assert stats.kstest(hetero_runs["exact"][:, 0], exact_cdf).pvalue > ALPHA
    assert stats.kstest(hetero_runs["anchor"][:, 0], exact_cdf).pvalue < 1e-10


def test_anchor_and_exact_differ_by_log_jacobian():
    vae = Heteroscedastic()
    eps = vae.sample_eps(50, generator=_gen(0))
    kw = dict(step_size=0.1, steps=1)
    exact = EpsLangevin(NonQuadraticEnergy(), vae, **kw).log_density(eps)
    anchor = EpsLangevin(NonQuadraticEnergy(), vae, target="anchor", **kw).log_density(eps)
    log_jac = vae.sigma(eps[0]).log()[:, 0]
    torch.testing.assert_close(anchor - exact, -log_jac - np.log(2 * np.pi))


# -- behaviour --


@pytest.fixture
def model():
    torch.manual_seed(0)
    vae = HierarchicalVAE.from_config("digits").eval()
    return vae, JointEBMPrior(vae.latent_shapes, nef=16)


def test_no_parameter_gradients_are_touched(model):
    vae, prior = model
    for p in prior.parameters():
        p.grad = torch.ones_like(p)
    EpsLangevin(prior, vae, step_size=0.1, steps=5, mala=True)(vae.sample_eps(4))
    PosteriorLangevin(prior, vae, torch.rand(4, 1, 8, 8), step_size=0.01, steps=3)(
        vae.sample_eps(4)
    )
    assert all(torch.equal(p.grad, torch.ones_like(p)) for p in prior.parameters())
    assert all(p.grad is None for p in vae.parameters())
    assert all(p.requires_grad for p in (*vae.parameters(), *prior.parameters()))


def test_no_graph_accumulates_across_steps(model):
    """Every step starts from a leaf: the autograd graph (and memory) cannot grow with steps."""

    vae, prior = model
    seen = []

    class Spy(EpsLangevin):
        def log_density(self, eps):
            seen.append(all(e.grad_fn is None and e.is_leaf for e in eps))
            return super().log_density(eps)

    out = Spy(prior, vae, step_size=0.1, steps=20)(vae.sample_eps(4))
    assert len(seen) == 20 and all(seen)  # ULA: one evaluation per step
    assert all(e.grad_fn is None and not e.requires_grad for e in out.x + out.z)


def test_generator_reproducible(model):
    vae, prior = model

    def run(seed):
        s = EpsLangevin(prior, vae, step_size=0.2, steps=10, mala=True, generator=_gen(seed))
        return s(s.init(8)).x

    a, b, c = run(0), run(0), run(1)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


def test_fixed_groups_are_held(model):
    vae, prior = model
    eps0 = vae.sample_eps(6)
    out = EpsLangevin(prior, vae, step_size=0.3, steps=10)(eps0, fixed_groups=[0])
    assert torch.equal(out.x[0], eps0[0])
    assert not torch.equal(out.x[1], eps0[1])
    with pytest.raises(ValueError, match="all groups are fixed"):
        EpsLangevin(prior, vae, step_size=0.3, steps=1)(eps0, fixed_groups=[0, 1])
    with pytest.raises(ValueError, match="out of range"):
        EpsLangevin(prior, vae, step_size=0.3, steps=1)(eps0, fixed_groups=[5])


def test_traces_and_acceptance(model):
    vae, prior = model
    out = EpsLangevin(prior, vae, step_size=0.2, steps=7, mala=True)(vae.sample_eps(5))
    assert out.log_density.shape == (7, 5) and out.grad_norm.shape == (7, 5)
    assert out.acceptance.shape == (5,) and ((0 <= out.acceptance) & (out.acceptance <= 1)).all()
    big = EpsLangevin(prior, vae, step_size=5.0, steps=20, mala=True)(vae.sample_eps(200))
    assert big.acceptance.mean() < out.acceptance.mean()
    assert EpsLangevin(prior, vae, step_size=0.2, steps=3)(vae.sample_eps(5)).acceptance is None


def test_clip_grad_bounds_the_drift():
    s = Langevin(lambda x: -1e6 * x[0].sum(1), step_size=0.1, steps=1, clip_grad=1.0, trace=False)
    x = s([torch.zeros(1000, 3)]).x[0]
    # drift norm is s^2/2 * 1 = 0.005; the noise has std 0.1 per coordinate
    assert x.mean(0).abs().max() < 0.02


def test_divergence_is_reported_with_step_and_chains():
    def log_density(x):
        bad = (x[0][:, 0] > 2.0) & (torch.arange(x[0].shape[0]) == 3)
        return torch.where(bad, torch.nan, -0.5 * (x[0] ** 2).sum(1) + 10 * x[0][:, 0])

    x0 = [torch.zeros(8, 1)]
    with pytest.raises(LangevinDivergenceError, match=r"step \d+ in 1 chain\(s\) \[3\]") as err:
        Langevin(log_density, step_size=0.5, steps=60, generator=_gen(0), check_every=10)(x0)
    assert err.value.chains == [3] and err.value.step >= 0
    out = Langevin(log_density, step_size=0.5, steps=60, generator=_gen(0), on_nonfinite="reject")(
        x0
    )
    assert out.rejected_nonfinite[3] > 0 and (out.rejected_nonfinite[:3] == 0).all()
    assert torch.isfinite(out.x[0]).all()
    with pytest.raises(LangevinDivergenceError, match="step -1"):
        Langevin(lambda x: x[0].sum(1) * torch.nan, step_size=0.1, steps=1)(x0)


def test_bad_arguments(model):
    vae, prior = model
    with pytest.raises(ValueError, match="step_size"):
        EpsLangevin(prior, vae, step_size=0.0, steps=1)
    with pytest.raises(ValueError, match="target"):
        EpsLangevin(prior, vae, step_size=0.1, steps=1, target="vaebm")
    with pytest.raises(TypeError, match="Backbone"):
        EpsLangevin(prior, object(), step_size=0.1, steps=1)
    with pytest.raises(ValueError, match=r"eps\[1\] has shape \(4, 3\), expected \(B, 16\)"):
        EpsLangevin(prior, vae, step_size=0.1, steps=1)([torch.zeros(4, 8), torch.zeros(4, 3)])
    with pytest.raises(ValueError, match="on_nonfinite"):
        Langevin(lambda x: x[0].sum(1), step_size=0.1, steps=1, on_nonfinite="ignore")


def test_temperature_and_base_prior(model):
    vae, _ = model
    sampler = EpsLangevin(None, vae, step_size=0.3, steps=5, t=0.5)
    out = sampler(vae.sample_eps(4))
    for z, zt in zip(out.z, vae.eps_to_z(out.x, 0.5)):
        torch.testing.assert_close(z, zt)
    with pytest.raises(ValueError, match="temperature"):
        EpsLangevin(None, vae, step_size=0.3, steps=5, t=0.0)


def test_autocast_bfloat16_keeps_state_dtype(model):
    vae, prior = model
    eps0 = vae.sample_eps(64, generator=_gen(0))

    def run(autocast):
        s = EpsLangevin(prior, vae, step_size=0.1, steps=5, generator=_gen(1), autocast=autocast)
        return s(eps0)

    full, half = run(None), run(torch.bfloat16)
    assert all(x.dtype == torch.float32 for x in half.x + half.z)
    for a, b in zip(full.x, half.x):
        torch.testing.assert_close(b, a, rtol=0, atol=0.05)
    assert not all(torch.equal(a, b) for a, b in zip(full.x, half.x))
    with pytest.raises(ValueError, match="autocast"):
        EpsLangevin(prior, vae, step_size=0.1, steps=1, autocast=torch.float64)
