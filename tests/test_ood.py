"""OOD scores and detection metrics of the core (reference backbone; metrics vs scikit-learn)."""

import math

import numpy as np
import pytest
import torch
from toys import QuadraticEnergy

import ebm_prior.ood
from ebm_prior import GroupwiseBackbone, HierarchicalVAE, JointEBMPrior, Posterior
from ebm_prior.ood import (
    OODMetrics,
    auprc,
    auroc,
    fpr_at_tpr,
    hierarchical_bound,
    llr_score,
    log_joint_score,
    ood_metrics,
    paired_auroc_difference,
)

LOG_2PI = math.log(2 * math.pi)

metrics = pytest.importorskip("sklearn.metrics", reason="scikit-learn checks the metrics")


def _sklearn(neg, pos):
    y = np.r_[np.zeros(len(neg)), np.ones(len(pos))]
    s = np.r_[neg, pos]
    fpr, tpr, _ = metrics.roc_curve(y, s, drop_intermediate=False)
    return (
        metrics.roc_auc_score(y, s),
        metrics.average_precision_score(y, s),
        fpr[np.nonzero(tpr >= 0.8)[0][0]],
    )


@pytest.mark.parametrize("ties", [False, True])
def test_metrics_match_sklearn(ties):
    rng = np.random.default_rng(0)
    for _ in range(100):
        n, m = rng.integers(1, 40, size=2)
        neg = rng.normal(size=n)
        pos = rng.normal(0.7, size=m)
        if ties:
            neg, pos = np.round(neg), np.round(pos)
        ours = ood_metrics(neg, pos)
        assert isinstance(ours, OODMetrics)
        np.testing.assert_allclose(ours, _sklearn(neg, pos), rtol=0, atol=1e-12)


def test_metrics_known_values_and_tensors():
    assert auroc([0, 1], [2, 3]) == 1.0
    assert auroc([2, 3], [0, 1]) == 0.0
    assert auroc([1, 1], [1, 1]) == 0.5
    assert auprc(torch.tensor([0.0, 1.0]), torch.tensor([2.0, 3.0])) == 1.0
    assert fpr_at_tpr([0.1, 0.2, 0.3], [0.25, 0.9, 1.0]) == pytest.approx(1 / 3)
    assert fpr_at_tpr([0.1, 0.2, 0.3], [0.25, 0.9, 1.0], tpr=0.5) == 0.0


def test_metrics_bad_input():
    with pytest.raises(ValueError, match="scores_in is empty"):
        auroc([], [1.0])
    with pytest.raises(ValueError, match="scores_out has 1 non-finite"):
        auroc([0.0], [float("nan")])
    with pytest.raises(ValueError, match="tpr must be"):
        fpr_at_tpr([0.0], [1.0], tpr=0.0)


# -- scores -------------------------------------------------------------------------------------


@pytest.fixture
def vae():
    torch.manual_seed(0)
    return HierarchicalVAE.from_config("digits").eval()


@pytest.fixture
def x():
    return torch.rand(6, 1, 8, 8).bernoulli()


# -- scores: a linear-Gaussian hierarchy with closed-form expectations ---------------------------


class ScalarHierarchy(GroupwiseBackbone):
    r"""Two scalar groups, top first: :math:`z_1 \sim N(0, 1)`, :math:`z_2 | z_1 \sim
    N(a z_1, s^2)`, :math:`x | z_2 \sim N(c z_2, s_x^2)`, with a top-down Gaussian posterior
    :math:`q(z_1|x) = N(\alpha x, v_1)`, :math:`q(z_2|z_1, x) = N(\gamma z_1 + \delta x, v_2)`
    (the exact posterior with ``exact=True``). Written here, independently of the core."""

    a, s, c, sx = 0.9, 0.6, 1.3, 0.5

    def __init__(self, exact: bool = False):
        super().__init__()
        self.register_buffer("dummy", torch.zeros((), dtype=torch.float64))
        if exact:
            a, s, c, sx = self.a, self.s, self.c, self.sx
            vx = c**2 * (a**2 + s**2) + sx**2
            self.alpha, self.v1 = c * a / vx, 1 - (c * a) ** 2 / vx
            cross = np.array([a, c * (a**2 + s**2)])
            cov = np.array([[1.0, c * a], [c * a, vx]])
            self.gamma, self.delta = np.linalg.solve(cov, cross)
            self.v2 = a**2 + s**2 - cross @ np.linalg.solve(cov, cross)
        else:
            self.alpha, self.v1, self.gamma, self.delta, self.v2 = 0.5, 0.3, 0.7, 0.2, 0.2

    @property
    def latent_shapes(self):
        return ((1,), (1,))

    def _eps_to_z(self, eps, t):
        return [t * eps[0], self.a * t * eps[0] + t * self.s * eps[1]]

    def _z_to_eps(self, z, t):
        return [z[0] / t, (z[1] - self.a * z[0]) / (t * self.s)]

    def _log_prior_groups(self, z):
        return [_normal(z[0], 0.0, 1.0), _normal(z[1], self.a * z[0], self.s**2)]

    def _log_prior(self, z):
        return sum(self._log_prior_groups(z))

    def _posterior_top(self, x, k):
        z1 = self.alpha * x + math.sqrt(self.v1) * torch.randn_like(x)
        log_q = _normal(z1, self.alpha * x, self.v1)
        if k == 1:
            return Posterior([z1], log_q)
        mean2 = self.gamma * z1 + self.delta * x
        z2 = mean2 + math.sqrt(self.v2) * torch.randn_like(x)
        return Posterior([z1, z2], log_q + _normal(z2, mean2, self.v2))

    def _posterior(self, x):
        return self._posterior_top(x, 0)

    def _log_likelihood(self, x, z):
        return _normal(x, self.c * z[1], self.sx**2)

    def _decode(self, z):
        return self.c * z[1]


def _normal(z, mean, var):
    var = torch.as_tensor(var, dtype=z.dtype)
    return (-0.5 * (z - mean) ** 2 / var - 0.5 * var.log() - 0.5 * LOG_2PI).sum(1)


def _expected_bound(m: ScalarHierarchy, x: float, k: int, lam: float, bottom: str) -> float:
    r"""Closed form of :math:`E[\log w]` for one importance sample (S = 1), energy
    :math:`f = -\lambda (z_1^2 + z_2^2) / 2`: Havtorn's weight with the EBM prior's top
    marginal, so that the bound's expectation is known exactly."""

    a, s, c, sx, lam = m.a, m.s, m.c, m.sx, lam
    m1 = m.alpha * x
    ez1, ez11 = m1, m.v1 + m1**2
    if k == 0:  # z ~ q
        ez2 = m.gamma * m1 + m.delta * x
        ez22 = m.gamma**2 * m.v1 + m.v2 + ez2**2
        ez12 = m.gamma * ez11 + m.delta * x * m1
    elif bottom == "sample":  # z2 ~ p_b(z2 | z1)
        ez2, ez22 = a * ez1, a**2 * ez11 + s**2
    elif bottom == "mode":  # z2 at the base conditional's mode
        ez2, ez22 = a * ez1, a**2 * ez11
    else:  # "langevin": z2 ~ p_{a,b}(z2 | z1) = N(r z1, v) with precision 1/s^2 + lam
        v = 1 / (1 / s**2 + lam)
        r = v * a / s**2
        ez2, ez22 = r * ez1, r**2 * ez11 + v
    out = -0.5 * (x**2 - 2 * c * x * ez2 + c**2 * ez22) / sx**2 - math.log(sx) - 0.5 * LOG_2PI
    out += -0.5 * ez11 - 0.5 * LOG_2PI  # log p(z1)
    out -= -0.5 - 0.5 * math.log(2 * math.pi * m.v1)  # - log q(z1 | x)
    if k == 0:
        ez_res = ez22 - 2 * a * ez12 + a**2 * ez11  # E (z2 - a z1)^2
        out += -0.5 * ez_res / s**2 - math.log(s) - 0.5 * LOG_2PI  # log p(z2 | z1)
        out -= -0.5 - 0.5 * math.log(2 * math.pi * m.v2)  # - log q(z2 | z1, x)
        return out - 0.5 * lam * (ez11 + ez22)
    if bottom == "sample":  # the weight carries e^f at the drawn point
        return out - 0.5 * lam * (ez11 + ez22)
    # the weight carries the marginal factor E_{p_b(z2|z1)} e^f, in closed form:
    # log E e^f = -lam z1^2 / 2 - log(1 + lam s^2) / 2 - lam a^2 z1^2 / (2 (1 + lam s^2))
    g = 1 + lam * s**2
    return out - 0.5 * lam * ez11 - 0.5 * math.log(g) - 0.5 * lam * a**2 * ez11 / g


def _energy(lam: float) -> QuadraticEnergy:
    return QuadraticEnergy(lam * np.eye(2), np.zeros(2))


CASES = [
    (k, lower, bottom, lam)
    for lam in (0.0, 0.8)
    for k, lower, bottom in [(0, "mode", "base"), (1, "sample", "base"), (1, "mode", "base")]
]
CASES.append((1, "sample", "langevin", 0.8))  # the EBM conditional needs an energy


@pytest.mark.parametrize("k,lower,bottom,lam", CASES)
def test_bound_expectation_matches_closed_form(k, lower, bottom, lam):
    """E[L>k] for one importance sample equals its closed form, Gaussian and EBM prior alike.

    Catches the old Eq.-20 score (no -log q term, log p_b of the bottom groups added): it is
    off by E[log p_b(z2|z1)] + E[log q(z1|x)], several nats here, against a tolerance of 5
    standard errors (a few hundredths of a nat)."""

    m = ScalarHierarchy()
    prior = _energy(lam) if lam else None
    if prior is not None and bottom == "langevin":
        prior.sampler_config = {"step_size": 0.9, "steps": 60, "mala": True}
    n, x = 40_000, 1.7
    xs = torch.full((n, 1), x, dtype=torch.float64)
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    kind = "mode" if lower == "mode" else ("langevin" if bottom == "langevin" else "sample")
    inner = 1 if kind == "sample" else 256  # the closed form of E[log w] is for M = 1 there
    score = hierarchical_bound(
        m, xs, k, prior, samples=1, lower=lower, bottom=bottom, marginal_samples=inner,
        generator=gen,
    )  # fmt: skip
    exact = _expected_bound(m, x, k, lam, kind)
    mean, se = score.mean().item(), score.std().item() / math.sqrt(n)
    assert se < 0.02
    assert abs(mean - exact) < 5 * se + 2e-3, (mean, exact, se)


def test_bound_large_samples_tends_to_log_px():
    """Every L>k is a stochastic lower bound on log p(x): with many importance samples, the
    weights' mean is p(x) itself (for any k), here in closed form under the EBM prior."""

    m, lam = ScalarHierarchy(exact=True), 0.8
    # EBM prior of a linear-Gaussian model: (z1, z2) Gaussian with precision P_b + lam I
    a, s, c, sx = m.a, m.s, m.c, m.sx
    mm = np.array([[1.0, 0.0], [a, s]])  # z = M eps
    cov_b = mm @ mm.T
    cov = np.linalg.inv(np.linalg.inv(cov_b) + lam * np.eye(2))
    log_z = 0.5 * (np.linalg.slogdet(cov)[1] - np.linalg.slogdet(cov_b)[1])
    x = 1.1
    vx = c**2 * cov[1, 1] + sx**2
    log_px = -0.5 * x**2 / vx - 0.5 * math.log(2 * math.pi * vx)
    xs = torch.full((4, 1), x, dtype=torch.float64)
    torch.manual_seed(3)
    gen = torch.Generator().manual_seed(3)
    prior = _energy(lam)
    for k in (0, 1):
        value = hierarchical_bound(
            m, xs, k, prior, samples=4000, lower="sample", marginal_samples=1, log_z=log_z,
            generator=gen,
        )  # fmt: skip
        assert (value < log_px + 0.02).all() and (value > log_px - 0.05).all(), (k, value)


def test_llr_sign_far_data_scores_higher():
    """A sign test: data 3-4 standard deviations from the model's marginal is more OOD by
    LLR>1 (hvae-oodd's mode variant) and by -L>0, under both priors. A negated score gives
    AUROC below 0.1 and fails."""

    m = ScalarHierarchy(exact=True)
    sd = math.sqrt(m.c**2 * (m.a**2 + m.s**2) + m.sx**2)
    g = torch.Generator().manual_seed(0)
    x_in = sd * torch.randn(2000, 1, generator=g, dtype=torch.float64)
    sign = 2.0 * torch.randint(0, 2, (2000, 1), generator=g, dtype=torch.float64) - 1
    x_out = sign * sd * (3 + torch.rand(2000, 1, generator=g, dtype=torch.float64))
    torch.manual_seed(0)
    for prior in (None, _energy(0.5)):
        s_in = llr_score(m, x_in, 1, prior, samples=4, lower="mode")
        s_out = llr_score(m, x_out, 1, prior, samples=4, lower="mode")
        assert auroc(s_in.llr, s_out.llr) > 0.9
        assert auroc(-s_in.elbo, -s_out.elbo) > 0.9


# -- scores: the reference backbone ---------------------------------------------------------------


def test_reference_backbone_is_groupwise(vae, x):
    torch.manual_seed(1)
    full = vae.posterior(x)
    torch.manual_seed(1)
    top0 = vae.posterior_top(x, 0)
    torch.testing.assert_close(top0.z, full.z)
    torch.testing.assert_close(top0.log_q, full.log_q)
    z = vae.eps_to_z(vae.sample_eps(6))
    torch.testing.assert_close(sum(vae.log_prior_groups(z)), vae.log_prior(z))


@pytest.mark.parametrize("lower", ["mode", "sample"])
@pytest.mark.parametrize("samples", [1, 3])
def test_gaussian_bound_matches_hand_written_havtorn_on_reference(vae, x, lower, samples):
    """prior=None is Havtorn's L>1, written out here from the reference VAE's own networks."""

    torch.manual_seed(5)
    ours = hierarchical_bound(vae, x, 1, None, samples, lower=lower, marginal_samples=1,
                              generator=torch.Generator().manual_seed(7))  # fmt: skip
    torch.manual_seed(5)
    gen = torch.Generator().manual_seed(7)
    ref = []
    with torch.no_grad():
        for _ in range(samples):
            mu2, _ = vae.encoder_x(x)  # the bottom group at the mode of q
            mu1, s1 = vae.encoder_z[0](mu2)
            z1 = mu1 + s1 * torch.randn_like(mu1)
            log_q = _normal(z1, mu1, s1**2)
            mu_p, s_p = vae.prior_nets[0](z1)
            eps2 = torch.randn(len(x), 16, generator=gen) if lower == "sample" else 0.0
            z2 = mu_p + s_p * eps2
            log_p1 = _normal(z1, torch.zeros_like(z1), torch.ones_like(z1))
            ref.append(vae.log_likelihood(x, [z1, z2]) + log_p1 - log_q)
    ref = torch.logsumexp(torch.stack(ref), 0) - math.log(samples)
    torch.testing.assert_close(ours, ref)


class ZeroEnergy(torch.nn.Module):
    def forward(self, z):
        return z[0].new_zeros(z[0].shape[0])


@pytest.mark.parametrize("lower", ["mode", "sample"])
def test_zero_energy_is_the_gaussian_score_on_the_same_draws(vae, x, lower):
    """One estimator for both priors: an EBM prior with f = 0 gives the Gaussian number."""

    scores = []
    for prior in (None, ZeroEnergy()):
        torch.manual_seed(2)
        gen = torch.Generator().manual_seed(3)
        scores.append(llr_score(vae, x, 1, prior, samples=2, lower=lower, marginal_samples=1,
                                generator=gen))  # fmt: skip
    for a, b in zip(*scores):
        torch.testing.assert_close(a, b)


def test_energy_changes_the_score_and_leaves_parameters_alone(vae, x):
    prior = JointEBMPrior(vae.latent_shapes, nef=8, num_layers=1)
    with torch.no_grad():
        for p in prior.parameters():
            p.mul_(3.0)  # a noticeable energy
    torch.manual_seed(0)
    e = hierarchical_bound(vae, x, 1, prior, samples=2, lower="sample")
    torch.manual_seed(0)
    g = hierarchical_bound(vae, x, 1, None, samples=2, lower="sample")
    assert e.shape == (6,) and torch.isfinite(e).all() and not torch.allclose(e, g)
    for p in (*vae.parameters(), *prior.parameters()):
        assert p.grad is None


def test_langevin_bottom_runs_the_chain_the_prior_was_trained_with(vae, x, monkeypatch):
    seen = []
    real = ebm_prior.ood.EpsLangevin

    def spy(*args, **kwargs):
        seen.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(ebm_prior.ood, "EpsLangevin", spy)
    config = {"step_size": 0.25, "steps": 7, "mala": True}
    prior = JointEBMPrior(vae.latent_shapes, nef=8, sampler_config=config)
    s = hierarchical_bound(vae, x, 1, prior, lower="sample", bottom="langevin")
    assert s.shape == (6,) and torch.isfinite(s).all()
    assert {k: seen[0][k] for k in config} == config
    hierarchical_bound(vae, x, 1, prior, lower="sample", bottom="langevin",
                       sampler_options={"steps": 3})  # fmt: skip
    assert seen[1]["steps"] == 3 and seen[1]["step_size"] == 0.25
    bare = JointEBMPrior(vae.latent_shapes, nef=8)
    with pytest.raises(ValueError, match="records no 'step_size'"):
        hierarchical_bound(vae, x, 1, bare, lower="sample", bottom="langevin")
    hot = JointEBMPrior(vae.latent_shapes, nef=8, sampler_config={**config, "t": 0.8})
    with pytest.raises(ValueError, match="temperature must be 1"):
        hierarchical_bound(vae, x, 1, hot, lower="sample", bottom="langevin")


def test_log_z_shifts_every_bound_and_cancels_in_the_ratio(vae, x):
    prior = JointEBMPrior(vae.latent_shapes, nef=8)
    torch.manual_seed(0)
    a = hierarchical_bound(vae, x, 1, prior, samples=2)
    torch.manual_seed(0)
    b = hierarchical_bound(vae, x, 1, prior, samples=2, log_z=1.5)
    torch.testing.assert_close(a - 1.5, b)
    with pytest.raises(ValueError, match="log Z cancels"):
        llr_score(vae, x, 1, prior, log_z=1.5)
    with pytest.raises(ValueError, match="log_z belongs to an EBM prior"):
        hierarchical_bound(vae, x, 1, None, log_z=1.5)


def test_log_joint_score(vae, x):
    prior = JointEBMPrior(vae.latent_shapes, nef=8)
    torch.manual_seed(1)
    ours = log_joint_score(vae, x, prior, samples=3)
    torch.manual_seed(1)
    ref, f = [], []
    with torch.no_grad():
        for _ in range(3):
            z = vae.posterior(x).z
            f.append(prior(z))
            ref.append(vae.log_likelihood(x, z) + vae.log_prior(z) + f[-1])
    torch.testing.assert_close(ours, torch.stack(ref).mean(0))
    # the energy's share, at the same samples as the score
    torch.manual_seed(1)
    score, energy = log_joint_score(vae, x, prior, samples=3, return_energy=True)
    torch.testing.assert_close(score, ours)
    torch.testing.assert_close(energy, torch.stack(f).mean(0))
    assert energy.abs().max() > 0
    torch.manual_seed(1)
    score, energy = log_joint_score(vae, x, samples=3, return_energy=True)
    assert energy.shape == score.shape == (6,) and not energy.any()


def test_llr_k0_is_zero(vae, x):
    s0 = llr_score(vae, x, 0)
    assert torch.equal(s0.llr, torch.zeros(6))


def test_bound_needs_groupwise_backbone():
    from toys import LinearGaussian

    bb = LinearGaussian()
    xs = torch.zeros(2, 3, dtype=torch.float64)
    with pytest.raises(TypeError, match="not a GroupwiseBackbone"):
        hierarchical_bound(bb, xs, 1)
    with pytest.raises(TypeError, match="not a GroupwiseBackbone"):
        llr_score(bb, xs, 1)


def test_score_bad_arguments(vae, x):
    prior = JointEBMPrior(vae.latent_shapes, nef=8)
    with pytest.raises(ValueError, match="k must be"):
        hierarchical_bound(vae, x, 2)
    with pytest.raises(ValueError, match="k must be"):
        hierarchical_bound(vae, x, -1)
    with pytest.raises(ValueError, match="samples must be"):
        hierarchical_bound(vae, x, 1, samples=0)
    with pytest.raises(ValueError, match="marginal_samples must be"):
        hierarchical_bound(vae, x, 1, prior, marginal_samples=0)
    with pytest.raises(ValueError, match="lower must be"):
        hierarchical_bound(vae, x, 1, lower="mean")
    with pytest.raises(ValueError, match="bottom must be"):
        hierarchical_bound(vae, x, 1, bottom="other")
    with pytest.raises(ValueError, match="use it with lower='sample'"):
        hierarchical_bound(vae, x, 1, prior, bottom="langevin")
    with pytest.raises(ValueError, match="samples must be"):
        log_joint_score(vae, x, samples=0)


def test_paired_auroc_difference_covers_the_truth():
    """The paired bootstrap interval covers the true AUROC difference at about its level, and
    a wrong truth (shifted by 0.05) is covered far less often."""

    from scipy.stats import norm

    d1, shift, n = 0.8, 0.4, 300
    truth = norm.cdf((d1 + shift) / math.sqrt(2)) - norm.cdf(d1 / math.sqrt(2))
    rng = np.random.default_rng(0)
    hits = wrong = 0
    for sim in range(60):
        a_in, a_out = rng.normal(size=n), rng.normal(d1, size=n)
        b_in, b_out = a_in, a_out + shift  # the same points, the second score shifts OOD up
        ci = paired_auroc_difference((a_in, a_out), (b_in, b_out), resamples=200, seed=sim)
        hits += ci.low <= truth <= ci.high
        wrong += ci.low <= truth + 0.05 <= ci.high
    assert hits >= 50 and wrong <= 20, (hits, wrong)


def test_paired_auroc_difference_sign_and_checks():
    g = np.random.default_rng(1)
    a = (g.normal(size=200), g.normal(1.0, size=200))
    worse = (a[0], a[1] - 0.5)
    ci = paired_auroc_difference(a, worse, resamples=300)
    assert ci.difference < 0 and ci.high < 0 and ci.level == 0.95
    same = paired_auroc_difference(a, a, resamples=50)
    assert same == (0.0, 0.0, 0.0, 0.95)
    with pytest.raises(ValueError, match="same points"):
        paired_auroc_difference(a, (a[0][:10], a[1]))
    with pytest.raises(ValueError, match="level must be"):
        paired_auroc_difference(a, a, level=1.0)
    # another metric: the AUPRC difference, with the difference on all data equal to auprc's
    ci = paired_auroc_difference(a, worse, resamples=300, metric="auprc")
    assert ci.difference == pytest.approx(auprc(*worse) - auprc(*a), abs=1e-12)
    assert ci.high < 0
    with pytest.raises(ValueError, match="metric must be"):
        paired_auroc_difference(a, a, metric="f1")


@pytest.mark.parametrize("lam", [0.0, 0.8])
def test_log_joint_score_langevin_matches_closed_form(lam):
    r"""Pang et al.'s score at posterior-Langevin samples: with long MALA chains, z ~ p(z|x)
    exactly, so E[s(x)] = E_{p(z|x)}[log p~(x, z)] = log p~(x) - H[p(z|x)], with p~ the
    unnormalised joint (Gaussian here: posterior precision P_b + lam I + (c/sx)^2 e2 e2^T).
    Short ULA chains (3 steps) miss it by far more than the tolerance."""

    m = ScalarHierarchy()
    a, s, c, sx = m.a, m.s, m.c, m.sx
    mm = np.array([[1.0, 0.0], [a, s]])
    prec_b = np.linalg.inv(mm @ mm.T)
    x = 1.4
    prec = prec_b + lam * np.eye(2) + np.diag([0.0, c**2 / sx**2])
    cov = np.linalg.inv(prec)
    mean = cov @ np.array([0.0, c * x / sx**2])

    def log_joint(z):  # log p(x|z) + log p_b(z) - lam |z|^2 / 2, z: (2,)
        lx = -0.5 * (x - c * z[1]) ** 2 / sx**2 - math.log(sx) - 0.5 * LOG_2PI
        lz = -0.5 * z @ prec_b @ z - 0.5 * np.linalg.slogdet(mm @ mm.T)[1] - LOG_2PI
        return lx + lz - 0.5 * lam * z @ z

    # E[log p~(x, z)] for z ~ N(mean, cov): a quadratic, so log p~(x, mean) - tr(prec cov) / 2
    exact = log_joint(mean) - 0.5 * np.trace(prec @ cov)
    n = 4000
    xs = torch.full((n, 1), x, dtype=torch.float64)
    prior = _energy(lam) if lam else None
    gen = torch.Generator().manual_seed(0)
    score = log_joint_score(m, xs, prior, posterior="langevin", posterior_steps=200,
                            posterior_step_size=0.3, mala=True, generator=gen)  # fmt: skip
    mean_s, se = score.mean().item(), score.std().item() / math.sqrt(n)
    assert abs(mean_s - exact) < 5 * se + 2e-3, (mean_s, exact, se)
    short = log_joint_score(m, xs, prior, posterior="langevin", posterior_steps=3,
                            posterior_step_size=0.05, generator=gen)  # fmt: skip
    assert abs(short.mean().item() - exact) > 20 * se
    with pytest.raises(ValueError, match="posterior must be"):
        log_joint_score(m, xs, prior, posterior="mcmc")
    with pytest.raises(ValueError, match="apply to posterior='langevin' only"):
        log_joint_score(m, xs, prior, mala=True)
