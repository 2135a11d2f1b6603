"""OOD scores and detection metrics of the core (reference backbone; metrics vs scikit-learn)."""

import numpy as np
import pytest
import torch

from ebm_prior import HierarchicalVAE, JointEBMPrior
from ebm_prior.ood import (
    OODMetrics,
    auprc,
    auroc,
    fpr_at_tpr,
    hierarchical_bound,
    joint_score,
    llr_score,
    ood_metrics,
)

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


def test_joint_score_k0_is_expected_log_joint(vae, x):
    """At k = 0 with no energy, Eq. 20 is E_q[log p(x|z) + log p_b(z)]: same draws, same number."""

    torch.manual_seed(1)
    ours = joint_score(vae, x, 0, samples=3)
    torch.manual_seed(1)
    ref = []
    with torch.no_grad():
        for _ in range(3):
            z = vae.posterior(x).z
            ref.append(vae.log_likelihood(x, z) + vae.log_prior(z))
    torch.testing.assert_close(ours, torch.stack(ref).mean(0))


def test_joint_score_bottom_groups_from_prior(vae, x):
    """For k >= 1 the bottom groups are fresh prior draws given the posterior's top eps."""

    gen = torch.Generator().manual_seed(4)
    torch.manual_seed(2)
    ours = joint_score(vae, x, 1, generator=gen)
    torch.manual_seed(2)
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        eps = vae.z_to_eps(vae.posterior(x).z)
        fresh = vae.sample_eps(len(x), gen)
        z = vae.eps_to_z([*eps[:-1], fresh[-1]])
        ref = vae.log_likelihood(x, z) + vae.log_prior(z)
    torch.testing.assert_close(ours, ref)


def test_joint_score_with_energy_adds_f_and_runs_langevin(vae, x):
    prior = JointEBMPrior(vae.latent_shapes, nef=8, num_layers=1)
    with torch.no_grad():
        for p in prior.parameters():
            p.mul_(3.0)  # a noticeable energy
    gen = torch.Generator().manual_seed(0)
    s = joint_score(vae, x, 1, prior, samples=2, steps=5, step_size=0.1, generator=gen)
    g = joint_score(vae, x, 1, None, samples=2, generator=torch.Generator().manual_seed(0))
    assert s.shape == (6,) and torch.isfinite(s).all()
    assert not torch.allclose(s, g)
    for p in (*vae.parameters(), *prior.parameters()):
        assert p.grad is None


def test_llr_score_joint(vae, x):
    prior = JointEBMPrior(vae.latent_shapes, nef=8, num_layers=1)
    s = llr_score(vae, x, 1, prior, samples=2, steps=3)
    assert s.llr.shape == (6,)
    torch.testing.assert_close(s.llr, s.elbo - s.elbo_k)
    s0 = llr_score(vae, x, 0, method="joint")
    assert torch.equal(s0.llr, torch.zeros(6))


def test_hierarchical_bound_needs_groupwise_backbone(vae, x):
    with pytest.raises(TypeError, match="not a GroupwiseBackbone"):
        hierarchical_bound(vae, x, 1)
    with pytest.raises(TypeError, match="not a GroupwiseBackbone"):
        llr_score(vae, x, 1)


def test_score_bad_arguments(vae, x):
    with pytest.raises(ValueError, match="k must be"):
        joint_score(vae, x, 2)
    with pytest.raises(ValueError, match="k must be"):
        joint_score(vae, x, -1)
    with pytest.raises(ValueError, match="samples must be"):
        joint_score(vae, x, 1, samples=0)
    with pytest.raises(ValueError, match="method must be"):
        llr_score(vae, x, 1, method="other")
    with pytest.raises(ValueError, match="prior=None"):
        llr_score(vae, x, 1, JointEBMPrior(vae.latent_shapes, nef=8), method="hierarchical")
