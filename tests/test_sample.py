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
    hetero_conditional,
    hetero_exact_marginals,
    hetero_marginals,
    interp_cdf,
    linear_eps_law,
    linear_posterior,
    lyapunov,
)

from ebm_prior import (
    EpsLangevin,
    HierarchicalVAE,
    JointEBMPrior,
    Langevin,
    LangevinDivergenceError,
    PosteriorLangevin,
    ula_gaussian_bias,
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

    def pvalues(cov):
        return [
            stats.kstest(eps[:, j], stats.norm(mean[j], np.sqrt(cov[j, j])).cdf).pvalue
            for j in range(4)
        ]

    assert min(pvalues(cov)) > ALPHA
    np.testing.assert_allclose(np.cov(eps.T), cov, atol=0.03)
    # the same test rejects the exact law (ULA's bias) and the delta = s convention
    assert min(pvalues(np.linalg.inv(prec))) < 1e-6
    assert min(pvalues(lyapunov(np.eye(4) - 0.5 * s * prec, s * np.eye(4)))) < 1e-6


@pytest.mark.parametrize("s, steps", [(0.5, 10), (0.3, 20), (0.4, None)])
def test_ula_gaussian_bias_is_the_chains_law_from_the_base(s, steps):
    r"""From :math:`\mathcal{N}(0, I)` on :math:`\log \pi = -\lVert x\rVert^2/2`, ULA's state
    after :math:`T` steps is :math:`\mathcal{N}(0, v_T)` with the :func:`ula_gaussian_bias`
    variance, so its mean log-density is that many nats (per :math:`D`) below the base's; MALA's
    stays the base law."""

    d, n = 16, 50_000
    bias = ula_gaussian_bias(d, s, steps)
    v = 1 + 2 * bias / d
    x0 = torch.randn(n, d, generator=_gen(5), dtype=torch.float64)

    def run(mala):
        sampler = Langevin(lambda x: -0.5 * x[0].pow(2).sum(1), step_size=s, mala=mala,
                           steps=400 if steps is None else steps, generator=_gen(6))  # fmt: skip
        return sampler([x0]).x[0]

    x = run(False)
    assert stats.kstest(x[:, 0].numpy(), stats.norm(scale=np.sqrt(v)).cdf).pvalue > ALPHA
    r2 = x.pow(2).sum(1)
    assert stats.kstest(r2.numpy(), stats.chi2(d).cdf).pvalue < 1e-6  # the bias is real
    # sum_j x_j^2 / v ~ chi2(d): the log-density gap is the returned nats, to a 5-s.e. margin
    assert stats.kstest((r2 / v).numpy(), stats.chi2(d).cdf).pvalue > ALPHA
    gap = 0.5 * (r2.mean().item() - d)
    assert abs(gap - bias) < 5 * (d / 2) ** 0.5 * v / n**0.5
    y = run(True)  # MALA: no bias at the same step size
    assert stats.kstest((y.pow(2).sum(1)).numpy(), stats.chi2(d).cdf).pvalue > ALPHA
    with pytest.raises(ValueError, match=r"in \(0, 2\)"):
        ula_gaussian_bias(d, 2.0, 5)


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


@pytest.mark.parametrize("with_energy", [False, True])
def test_mala_posterior_linear_gaussian_exact(with_energy):
    r"""z-space posterior Langevin: :math:`\log p(x|z) + f(z) + \log p_b(z)` is Gaussian here,
    with :math:`f = 0` (``prior=None``, the Gaussian-prior posterior) or a quadratic energy."""

    vae = LinearGaussian(d=2)
    rng = np.random.default_rng(6)
    c = np.diag(rng.uniform(0.2, 1.0, 4))
    m = rng.normal(size=4)
    energy = (c, m) if with_energy else (None, None)
    x = np.array([0.5, -1.0, 2.0])
    n = 8_000
    xs = torch.tensor(x).expand(n, 3)
    prior = QuadraticEnergy(c, m) if with_energy else None
    sampler = PosteriorLangevin(
        prior, vae, xs, step_size=0.35, steps=300, mala=True, generator=_gen(7)
    )
    z0 = [torch.randn(n, 2, dtype=torch.float64, generator=_gen(8)) for _ in range(2)]
    out = sampler(z0)
    assert out.acceptance.mean() > 0.7
    z = torch.cat(out.z, 1).numpy()

    def pvalues(mean, cov):
        return [
            stats.kstest(z[:, j], stats.norm(mean[j], np.sqrt(cov[j, j])).cdf).pvalue
            for j in range(4)
        ]

    assert min(pvalues(*linear_posterior(vae, x, *energy))) > ALPHA
    # the same test rejects the posterior of another x, and the energy left out (or added)
    assert min(pvalues(*linear_posterior(vae, np.array([-0.5, 1.0, 0.0]), *energy))) < 1e-10
    other = (None, None) if with_energy else (c, m)
    assert min(pvalues(*linear_posterior(vae, x, *other))) < 1e-10


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


@pytest.mark.parametrize("t", [1.0, 0.7])
def test_anchor_and_exact_differ_by_log_jacobian(t):
    r"""At every temperature, anchor - exact :math:`= -\sum_i \log(t\sigma_i) - \tfrac{D}{2}
    \log 2\pi` (here :math:`D = 2`, :math:`\sigma_1 = 1`)."""

    vae = Heteroscedastic()
    eps = vae.sample_eps(50, generator=_gen(0))
    kw = dict(step_size=0.1, steps=1, t=t)
    exact = EpsLangevin(NonQuadraticEnergy(), vae, **kw).log_density(eps)
    anchor = EpsLangevin(NonQuadraticEnergy(), vae, target="anchor", **kw).log_density(eps)
    log_jac = np.log(t) + (t * vae.sigma(t * eps[0])).log()[:, 0]
    torch.testing.assert_close(anchor - exact, -log_jac - np.log(2 * np.pi))


def test_anchor_target_is_tempered():
    r"""At :math:`t \neq 1` the anchor target tempers the Normal, :math:`\mathcal{N}(\mu_i,
    (t\sigma_i)^2)`, as the authors' code and VAEBM do: MALA matches the quadrature law of
    :math:`f(z) + \log p_b^t(z)`; the untempered :math:`f(z) + \log p_b(z)` is rejected."""

    vae, t = Heteroscedastic(), 0.7

    class Untempered(EpsLangevin):
        def log_density(self, eps):
            z = self.backbone.eps_to_z(eps, self.t)
            return self.prior(z) + self.backbone.log_prior(z)

    cdfs = [interp_cdf(cdf) for cdf in hetero_marginals("anchor", t)]
    pvalues = {}
    for cls in (EpsLangevin, Untempered):
        sampler = cls(
            NonQuadraticEnergy(),
            vae,
            t=t,
            target="anchor",
            step_size=0.8,
            steps=300,
            mala=True,
            generator=_gen(21),
        )
        out = sampler(vae.sample_eps(8_000, generator=_gen(22)))
        assert out.acceptance.mean() > 0.7
        eps = torch.cat(out.x, 1).numpy()
        pvalues[cls] = [stats.kstest(eps[:, j], cdf).pvalue for j, cdf in enumerate(cdfs)]
    assert min(pvalues[EpsLangevin]) > ALPHA
    assert min(pvalues[Untempered]) < 1e-10


# -- every mode against an exact law, each with a negative control --


class _RoundedMH(Langevin):
    """The accept/reject test on the autocast (rounded) log-density: MALA is then exact only for
    the rounded density."""

    def _value_and_grad(self, x, free, exact=False, check_shape=False):
        return super()._value_and_grad(x, free, exact=False, check_shape=check_shape)


@pytest.mark.parametrize(
    "dtype, offset", [(torch.bfloat16, 1000.0), (torch.float16, 30000.0)], ids=["bf16", "fp16"]
)
def test_mala_autocast_targets_the_full_precision_density(dtype, offset):
    r""":math:`\log\pi(x) = c - 0.45 x^2` through a matmul, which autocast runs in low precision:
    near :math:`c` the spacing is 4 (bf16 at 1000) or 16 (fp16 at 30000), so the rounded
    density is a staircase. The drift comes from the autocast gradient (slightly off: -0.45
    rounds); the MH ratio from the float32 value, so the law is :math:`\mathcal{N}(0, 1/0.9)`."""

    w = torch.tensor([[-0.45], [offset]])

    def log_density(x):
        feats = torch.stack([x[0].pow(2).sum(1), torch.ones_like(x[0][:, 0])], 1)
        return (feats @ w)[:, 0]

    with torch.autocast("cpu", dtype=dtype):
        rounded = log_density([torch.full((1, 1), 0.3)]).dtype == dtype
    if not rounded:
        pytest.skip(f"this torch has no CPU autocast to {dtype}")
    law = stats.norm(scale=np.sqrt(1 / 0.9))
    pvalues = {}
    for cls in (Langevin, _RoundedMH):
        sampler = cls(
            log_density, step_size=1.0, steps=200, mala=True, autocast=dtype, generator=_gen(31)
        )
        out = sampler([torch.randn(10_000, 1, generator=_gen(32))])
        assert out.x[0].dtype == torch.float32
        pvalues[cls] = stats.kstest(out.x[0][:, 0].numpy(), law.cdf).pvalue
    assert pvalues[Langevin] > ALPHA
    assert pvalues[_RoundedMH] < 1e-10


def test_mala_with_clip_grad_is_exact():
    r"""MALA with an active clip (the clipped drift enters both proposal densities) samples
    :math:`\mathcal{N}(0, I)` exactly; ULA with the same clip and step size does not."""

    clip = 0.5

    def run(mala):
        sampler = Langevin(
            lambda x: -0.5 * x[0].pow(2).sum(1),
            step_size=1.0,
            steps=300,
            mala=mala,
            clip_grad=clip,
            generator=_gen(41),
        )
        out = sampler([torch.randn(10_000, 2, generator=_gen(42), dtype=torch.float64)])
        assert (out.grad_norm > clip).double().mean() > 0.5, "the clip must be active"
        x = out.x[0].numpy()
        return [stats.kstest(x[:, j], stats.norm().cdf).pvalue for j in range(2)]

    assert min(run(mala=True)) > ALPHA
    assert min(run(mala=False)) < 1e-10


def test_fixed_groups_sample_the_conditional_law():
    r"""With :math:`\epsilon_1` held at 1, MALA on :math:`\epsilon_2` matches
    :math:`\pi(\epsilon_2 \mid \epsilon_1 = 1)` of a non-Gaussian model (1-D quadrature); the
    same test rejects the conditional at :math:`\epsilon_1 = -1` and the marginal law."""

    vae, n = Heteroscedastic(), 8_000
    eps0 = [torch.ones(n, 1, dtype=torch.float64), vae.sample_eps(n, generator=_gen(52))[1]]
    sampler = EpsLangevin(
        NonQuadraticEnergy(), vae, step_size=0.8, steps=300, mala=True, generator=_gen(51)
    )
    out = sampler(eps0, fixed_groups=[0])
    assert torch.equal(out.x[0], eps0[0])
    assert out.acceptance.mean() > 0.7
    e2 = out.x[1][:, 0].numpy()
    assert stats.kstest(e2, interp_cdf(hetero_conditional(1.0))).pvalue > ALPHA
    assert stats.kstest(e2, interp_cdf(hetero_conditional(-1.0))).pvalue < 1e-10
    assert stats.kstest(e2, interp_cdf(hetero_marginals()[1])).pvalue < 1e-10


@pytest.mark.parametrize("outside", [-np.inf, np.nan])
def test_mala_reject_samples_the_truncated_law(outside):
    r""":math:`\mathcal{N}(0, I_2)` truncated to :math:`x_1 + x_2 > 0`, with a log-density that is
    -inf or NaN outside. MALA with ``on_nonfinite="reject"`` from a point: :math:`x_j` follows
    the skew-normal :math:`2\phi(x)\Phi(x)` and :math:`(x_1 + x_2)/\sqrt2` the half-normal; the
    untruncated :math:`\mathcal{N}(0, 1)` is rejected."""

    def log_density(x):
        return torch.where(x[0].sum(1) > 0, -0.5 * x[0].pow(2).sum(1), outside)

    sampler = Langevin(
        log_density, step_size=1.0, steps=300, mala=True, on_nonfinite="reject", generator=_gen(61)
    )
    out = sampler([torch.full((10_000, 2), 0.5, dtype=torch.float64)])
    assert (out.rejected_nonfinite > 0).all()
    x = out.x[0].numpy()
    assert (x.sum(1) > 0).all()
    pvalues = [stats.kstest(x[:, j], stats.skewnorm(1).cdf).pvalue for j in range(2)]
    pvalues.append(stats.kstest(x.sum(1) / np.sqrt(2), stats.halfnorm().cdf).pvalue)
    assert min(pvalues) > ALPHA
    assert stats.kstest(x[:, 0], stats.norm().cdf).pvalue < 1e-10


def test_ula_reject_samples_the_uniform_law():
    r"""ULA with ``on_nonfinite="reject"`` on a log-density that is 0 on :math:`(0, 1)` and -inf
    outside: the drift is zero, so it is random-walk Metropolis for the uniform law. The same
    test rejects the law of re-proposing until finite, whose density is
    :math:`\propto \Phi((1 - x)/s) - \Phi(-x/s)`."""

    def log_density(x):
        inside = (x[0][:, 0] > 0) & (x[0][:, 0] < 1)
        return torch.where(inside, 0.0 * x[0][:, 0], -np.inf)

    s = 0.3
    sampler = Langevin(
        log_density, step_size=s, steps=300, on_nonfinite="reject", generator=_gen(71)
    )
    out = sampler([torch.full((10_000, 1), 0.5, dtype=torch.float64)])
    assert (out.rejected_nonfinite > 0).all()
    x = out.x[0][:, 0].numpy()
    assert stats.kstest(x, stats.uniform().cdf).pvalue > ALPHA
    grid = np.linspace(0, 1, 4001)
    cdf = np.cumsum(stats.norm.cdf((1 - grid) / s) - stats.norm.cdf(-grid / s))
    cdf = (cdf - cdf[0]) / (cdf[-1] - cdf[0])
    assert stats.kstest(x, lambda v: np.interp(v, grid, cdf)).pvalue < 1e-10


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


@pytest.mark.parametrize("mala", [True, False])
def test_traces_and_acceptance(model, mala):
    r"""The traces hold :math:`\log\pi` and :math:`\|\nabla\log\pi\|` at the state entering each
    step, and the acceptance rate is the fraction of steps that moved each chain (checked
    against shorter runs from the same seed, which repeat the first steps exactly)."""

    vae, prior = model
    eps0 = vae.sample_eps(6, generator=_gen(0))

    def run(steps):
        sampler = EpsLangevin(prior, vae, step_size=0.9, steps=steps, mala=mala, generator=_gen(1))
        return sampler, sampler(eps0)

    sampler, out = run(7)
    assert out.log_density.shape == (7, 6) and out.grad_norm.shape == (7, 6)
    states = [run(k)[1].x for k in range(8)]
    for k in range(7):
        eps = [e.clone().requires_grad_(True) for e in states[k]]
        logp = sampler.log_density(eps)
        grad = torch.autograd.grad(logp.sum(), eps)
        norm = torch.cat([g.flatten(1) for g in grad], 1).norm(dim=1)
        torch.testing.assert_close(out.log_density[k], logp.detach())
        torch.testing.assert_close(out.grad_norm[k], norm)
    assert all(torch.equal(a, b) for a, b in zip(out.x, states[7]))
    if not mala:
        assert out.acceptance is None
        return
    moved = torch.stack(
        [
            torch.stack([(a != b).flatten(1).any(1) for a, b in zip(x1, x0)]).any(0)
            for x0, x1 in zip(states[:-1], states[1:])
        ]
    )
    assert out.acceptance.shape == (6,)
    torch.testing.assert_close(out.acceptance, moved.float().mean(0))
    assert 0 < out.acceptance.mean() < 1, "the check needs both accepted and rejected steps"


def test_clip_grad_bounds_the_drift():
    r"""One ULA step is :math:`x + \frac{s^2}{2}\,g\,\min(1, c/\|g\|) + s\xi` per chain, with
    :math:`\xi` the generator's first draw: the clip acts on the whole per-chain gradient norm
    (here :math:`\|g\| = 10^6\sqrt3` clipped to 1, and :math:`\|g\| = 0.5` left alone)."""

    s, clip = 0.1, 1.0
    w = torch.ones(8, 3, dtype=torch.float64)
    w[:4] *= 1e6
    w[4:] *= 0.5 / np.sqrt(3)
    sampler = Langevin(
        lambda x: (w * x[0]).sum(1), step_size=s, steps=1, clip_grad=clip, generator=_gen(3)
    )
    x = sampler([torch.zeros(8, 3, dtype=torch.float64)]).x[0]
    noise = torch.randn(8, 3, generator=_gen(3), dtype=torch.float64)
    scale = (clip / w.norm(dim=1, keepdim=True)).clamp(max=1.0)
    torch.testing.assert_close(x - s * noise, 0.5 * s**2 * scale * w)


def test_divergence_is_reported_with_step_and_chains():
    def finite(x):
        return -0.5 * (x[0] ** 2).sum(1) + 10 * x[0][:, 0]

    def log_density(x):
        bad = (x[0][:, 0] > 2.0) & (torch.arange(x[0].shape[0]) == 3)
        return torch.where(bad, torch.nan, finite(x))

    # chain 3's path without the NaN: the same noise, so the same path up to the first bad state
    seen = []

    class Spy(Langevin):
        def log_density(self, x):
            seen.append(float(x[0][3, 0].detach()))
            return finite(x)

    x0 = [torch.zeros(8, 1)]
    Spy(step_size=0.5, steps=60, generator=_gen(0))(x0)
    first = next(k for k, v in enumerate(seen) if v > 2.0)  # the state entering step `first`
    assert first > 1
    for check_every in (1, 7, 10, 60):
        with pytest.raises(
            LangevinDivergenceError, match=rf"step {first - 1} in 1 chain\(s\) \[3\]"
        ) as err:
            Langevin(
                log_density, step_size=0.5, steps=60, generator=_gen(0), check_every=check_every
            )(x0)
        assert err.value.chains == [3] and err.value.step == first - 1  # the step producing it
    out = Langevin(log_density, step_size=0.5, steps=60, generator=_gen(0), on_nonfinite="reject")(
        x0
    )
    others = torch.arange(8) != 3
    assert out.rejected_nonfinite[3] > 0 and (out.rejected_nonfinite[others] == 0).all()
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


def test_samplers_call_the_prior_module(model):
    """The samplers call ``prior(z)``, as the losses do: forward hooks and ``forward``
    overrides apply."""

    vae, prior = model
    calls = []
    handle = prior.register_forward_hook(lambda module, args, out: calls.append(out.shape))
    try:
        EpsLangevin(prior, vae, step_size=0.1, steps=3)(vae.sample_eps(4))
        assert calls == [torch.Size([4])] * 3
        PosteriorLangevin(prior, vae, torch.rand(4, 1, 8, 8), step_size=0.01, steps=2)(
            vae.sample_eps(4)
        )
        assert len(calls) == 5
    finally:
        handle.remove()

    class Shifted(JointEBMPrior):
        def forward(self, z):
            return super().forward(z) + 3.0 * z[0][:, 0]

    shifted = Shifted(vae.latent_shapes, nef=16)
    shifted.load_state_dict(prior.state_dict())
    eps = vae.sample_eps(4, generator=_gen(0))
    z = vae.eps_to_z(eps)
    x = torch.rand(4, 1, 8, 8)
    cases = [
        (lambda p: EpsLangevin(p, vae, step_size=0.1, steps=1), eps, eps[0]),
        (
            lambda p: EpsLangevin(p, vae, step_size=0.1, steps=1, t=0.8, target="anchor"),
            eps,
            0.8 * eps[0],
        ),
        (lambda p: PosteriorLangevin(p, vae, x, step_size=0.1, steps=1), z, z[0]),
    ]
    for make, state, z0 in cases:
        diff = make(shifted).log_density(state) - make(prior).log_density(state)
        torch.testing.assert_close(diff, 3.0 * z0[:, 0])


@pytest.mark.parametrize(
    "mala, autocast",
    [(False, None), (True, None), (True, torch.bfloat16)],
    ids=["ula", "mala", "mala-bf16"],
)
@pytest.mark.parametrize("shape", ["scalar", "column"])
def test_log_density_shape_is_checked(mala, autocast, shape):
    """A scalar would freeze every MALA chain and (B, 1) would crash in an expand: both are
    refused with the shape returned and the one expected."""

    def log_density(x):
        out = -0.5 * x[0].pow(2).sum(1)
        return out.sum() if shape == "scalar" else out[:, None]

    got = r"\(\)" if shape == "scalar" else r"\(8, 1\)"
    sampler = Langevin(log_density, step_size=0.1, steps=3, mala=mala, autocast=autocast)
    with pytest.raises(ValueError, match=rf"returned shape {got}, expected \(B,\) = \(8,\)"):
        sampler([torch.zeros(8, 2)])


def test_energy_of_shape_b1_is_refused(model):
    vae, _ = model
    sampler = EpsLangevin(lambda z: z[0][:, :1].sum(1, keepdim=True), vae, step_size=0.1, steps=1)
    with pytest.raises(ValueError, match=r"returned shape \(4, 4\), expected \(B,\) = \(4,\)"):
        sampler(vae.sample_eps(4))


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
    # the rounding error is small next to the energy's whole effect on the chains
    base = EpsLangevin(None, vae, step_size=0.1, steps=5, generator=_gen(1))(eps0)
    effect = max((a - b).abs().max() for a, b in zip(full.x, base.x))
    error = max((a - b).abs().max() for a, b in zip(full.x, half.x))
    assert 0 < error < 0.25 * effect
    with pytest.raises(ValueError, match="autocast"):
        EpsLangevin(prior, vae, step_size=0.1, steps=1, autocast=torch.float64)
