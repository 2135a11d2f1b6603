"""The hvae-oodd adapter against the real hvae-oodd code (opt-in: set OODD_ROOT to a clone)."""

import math
import os

import pytest
import torch

if not os.environ.get("OODD_ROOT"):
    pytest.skip(
        "OODD_ROOT is not set: point it at a clone of JakobHavtorn/hvae-oodd to run these tests",
        allow_module_level=True,
    )

from ebm_prior import EpsLangevin, JointEBMPrior  # noqa: E402
from ebm_prior.adapters.oodd import (  # noqa: E402
    OODDBackbone,
    data_dependent_init,
    import_oodd,
    load_checkpoint,
    stochastic_layers,
)
from ebm_prior.ood import hierarchical_bound, llr_score  # noqa: E402
from ebm_prior.testing import BackboneContract  # noqa: E402

try:
    oodd = import_oodd()
except ImportError as e:  # pragma: no cover - depends on the environment
    pytest.skip(f"hvae-oodd cannot be imported from OODD_ROOT: {e}", allow_module_level=True)

import oodd.losses  # noqa: E402
import oodd.models.dvae as dvae  # noqa: E402

FAMILIES = {"vae": dvae.VAE, "lvae": dvae.LVAE, "biva": dvae.BIVA}


def _det(stride):
    return [
        {
            "block": "ResBlockConv2d",
            "out_channels": 8,
            "kernel_size": 3,
            "stride": stride,
            "weightnorm": True,
            "gated": False,
        }
    ]


CONFIG = {
    "input_shape": (1, 8, 8),
    "likelihood_module": "BernoulliLikelihoodConv2d",
    "config_deterministic": [_det(2), _det(2), _det(1)],
    "config_stochastic": [
        {"block": "GaussianConv2d", "latent_features": 2, "weightnorm": True},
        {"block": "GaussianDense", "latent_features": 4, "weightnorm": True},
        {"block": "GaussianDense", "latent_features": 3, "weightnorm": True},
    ],
    "activation": "ReLU",
}


def tiny(family: str = "lvae") -> torch.nn.Module:
    torch.manual_seed(0)
    model = FAMILIES[family](**CONFIG)
    return data_dependent_init(model, binary(8))


def binary(batch: int) -> torch.Tensor:
    return torch.rand(batch, 1, 8, 8).bernoulli()


def package_bound(model, x, k, samples=1):
    """hvae-oodd's own L>k, written as its scripts/ood-llr.py computes it."""

    mask = [True] * k + [False] * (len(model.stages) - k)
    criterion = oodd.losses.ELBO()
    out = []
    for _ in range(samples):
        likelihood_data, stage_datas = model(x, decode_from_p=mask, use_mode=mask)
        kls = [s.loss.kl_elementwise for s in stage_datas if s.loss.kl_elementwise is not None]
        _, elbo, _, _ = criterion(
            likelihood_data.likelihood,
            kls,
            samples=1,
            free_nats=0,
            beta=1,
            sample_reduction=None,
            batch_reduction=None,
        )
        out.append(elbo)
    return oodd.utils.log_sum_exp(torch.stack(out), axis=0)


class _OODDContract(BackboneContract):
    def own_log_prior(self, backbone, x):
        """log p_b(z) from the package's forward pass: p_logprob of each stage's KL."""

        with torch.no_grad():
            _, stage_datas = backbone.model(x)
        data = stage_datas[::-1]  # the package lists its stages bottom-up
        z = [s.q.z for s in data]
        log_p = sum(s.loss.p_logprob.flatten(1).sum(1) for s in data)
        return z, log_p


class TestVAE(_OODDContract):
    @pytest.fixture
    def backbone(self):
        return OODDBackbone(tiny("vae")).eval()

    @pytest.fixture
    def x(self, backbone):
        return binary(self.batch)


class TestLVAE(TestVAE):
    @pytest.fixture
    def backbone(self):
        return OODDBackbone(tiny("lvae")).eval()


class TestBIVA(_OODDContract):
    @pytest.fixture
    def backbone(self):
        return OODDBackbone(tiny("biva")).eval()

    @pytest.fixture
    def x(self, backbone):
        return binary(self.batch)


# -- adapter specifics --------------------------------------------------------------------------


def test_group_order_and_shapes():
    bb = OODDBackbone(tiny("biva"))
    assert bb.layer_names == [
        "stages.2.stochastic",
        "stages.1.td_stochastic",
        "stages.1.bu_stochastic",
        "stages.0.td_stochastic",
        "stages.0.bu_stochastic",
    ]
    assert bb.latent_shapes == ((3,), (4,), (4,), (2, 4, 4), (2, 4, 4))
    assert OODDBackbone(tiny("vae")).latent_shapes == ((3,), (4,), (2, 4, 4))
    assert bb.fingerprint()["adapter"] == "hvae-oodd"
    assert [n for n, _, _ in stochastic_layers(bb.model)] == bb.layer_names


@pytest.mark.parametrize("family", ["vae", "lvae", "biva"])
def test_eps_to_z_matches_package_prior_sampling(family):
    """With eps drawn as the package draws it, T_b reproduces sample_from_prior."""

    bb = OODDBackbone(tiny(family)).eval()
    torch.manual_seed(3)
    with torch.no_grad():
        ref, _ = bb.model.sample_from_prior(4)
    # re-draw the same noise: the package calls rsample once per layer, top first
    torch.manual_seed(3)
    eps = []

    def read(i, mu, sigma):
        eps.append(torch.randn_like(mu))
        return mu + sigma * eps[-1]

    with torch.no_grad():
        bb._top_down(read, 4)
        mean = bb.decode(bb.eps_to_z(eps))
    torch.testing.assert_close(mean, ref.mean, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", ["vae", "lvae", "biva"])
def test_posterior_matches_package_elbo(family):
    bb = OODDBackbone(tiny(family)).eval()
    x = binary(4)
    torch.manual_seed(5)
    with torch.no_grad():
        post = bb.posterior(x)
        ours = bb.log_likelihood(x, post.z) + bb.log_prior(post.z) - post.log_q
        torch.manual_seed(5)
        theirs = package_bound(bb.model, x, 0)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("family,k", [("vae", 1), ("vae", 2), ("lvae", 1), ("lvae", 2)])
@pytest.mark.parametrize("samples", [1, 3])
def test_hierarchical_bound_matches_package(family, k, samples):
    """Our L>k (Gaussian prior, through the contract) equals hvae-oodd's on the same draws."""

    bb = OODDBackbone(tiny(family)).eval()
    x = binary(5)
    torch.manual_seed(11)
    ours = hierarchical_bound(bb, x, k, samples=samples)
    torch.manual_seed(11)
    with torch.no_grad():
        theirs = package_bound(bb.model, x, k, samples)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-3)
    # and it is a different number from the full bound
    torch.manual_seed(11)
    assert not torch.allclose(ours, hierarchical_bound(bb, x, 0, samples=samples), atol=1e-2)


def test_biva_bound_whole_stages_only():
    bb = OODDBackbone(tiny("biva")).eval()
    x = binary(3)
    torch.manual_seed(2)
    ours = hierarchical_bound(bb, x, 2)  # both groups of stage 0
    torch.manual_seed(2)
    with torch.no_grad():
        theirs = package_bound(bb.model, x, 1)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-3)
    with pytest.raises(ValueError, match="splits a BIVA stage"):
        hierarchical_bound(bb, x, 1)


def test_ebm_llr_runs_on_oodd_and_zero_energy_is_the_package_bound():
    bb = OODDBackbone(tiny("lvae")).eval()
    prior = JointEBMPrior(bb.latent_shapes, nef=8, num_layers=1, channels=4,
                          sampler_config={"step_size": 0.05, "steps": 3})  # fmt: skip
    x = binary(4)
    for options in ({}, {"lower": "sample"}, {"lower": "sample", "bottom": "langevin"}):
        s = llr_score(bb, x, 1, prior, samples=2, **options)
        assert s.llr.shape == (4,) and torch.isfinite(s.llr).all()
        torch.testing.assert_close(s.llr, s.elbo - s.elbo_k)
    # the same estimator with f = 0 is hvae-oodd's own L>k on the same draws
    zero = JointEBMPrior(bb.latent_shapes, nef=8, num_layers=1, channels=4)
    with torch.no_grad():
        for p in zero.parameters():
            p.zero_()
    torch.manual_seed(11)
    ours = hierarchical_bound(bb, x, 2, zero, samples=2)
    torch.manual_seed(11)
    with torch.no_grad():
        theirs = package_bound(bb.model, x, 2, 2)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-3)
    for p in (*bb.parameters(), *prior.parameters()):
        assert p.grad is None


def test_hooks_removed_and_global_rng_untouched():
    bb = OODDBackbone(tiny("lvae")).eval()
    eps = bb.sample_eps(3)
    x = binary(3)

    def hooks():
        return [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in bb.model.modules()]

    before = hooks()
    state = torch.get_rng_state()
    with torch.no_grad():
        z = bb.eps_to_z(eps)
        bb.z_to_eps(z)
        bb.log_prior(z)
        bb.decode(z)
        bb.log_likelihood(x, z)
    assert torch.equal(torch.get_rng_state(), state)
    assert hooks() == before


def test_eps_to_z_differentiable_unlike_sample_from_prior():
    bb = OODDBackbone(tiny("vae")).eval()
    eps = [e.requires_grad_(True) for e in bb.sample_eps(2)]
    z = bb.eps_to_z(eps)
    bb.log_likelihood(binary(2), z).sum().backward()
    assert all(e.grad is not None and e.grad.abs().sum() > 0 for e in eps)


def test_log_prior_groups_sum_and_top_prior():
    bb = OODDBackbone(tiny("lvae")).eval()
    eps = bb.sample_eps(4)
    with torch.no_grad():
        z = bb.eps_to_z(eps)
        groups = bb.log_prior_groups(z)
        total = bb.log_prior(z)
    torch.testing.assert_close(sum(groups), total)
    # the top prior is N(0, I): log N(z_top) in closed form
    expected = (-0.5 * z[0] ** 2 - 0.5 * math.log(2 * math.pi)).sum(1)
    torch.testing.assert_close(groups[0], expected)


def test_conditional_sampling_keeps_top_groups():
    bb = OODDBackbone(tiny("lvae")).eval()
    prior = JointEBMPrior(bb.latent_shapes, nef=8, num_layers=1, channels=4)
    with torch.no_grad():
        eps_top = bb.z_to_eps(bb.posterior(binary(3)).z)
    out = EpsLangevin(prior, bb, step_size=0.1, steps=3)(eps_top, fixed_groups=[0, 1])
    got = bb.z_to_eps(out.z)
    for i in (0, 1):
        torch.testing.assert_close(got[i], eps_top[i], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(got[2], eps_top[2])


def test_bad_construction():
    with pytest.raises(TypeError, match="DeepVAE"):
        OODDBackbone(torch.nn.Linear(2, 2))
    torch.manual_seed(0)
    with pytest.raises(ValueError, match="not initialised.*data_dependent_init"):
        OODDBackbone(dvae.LVAE(**CONFIG))
    with pytest.raises(ValueError, match="at least 2"):
        data_dependent_init(dvae.LVAE(**CONFIG), binary(1))
    bb = OODDBackbone(tiny("vae"))
    with pytest.raises(ValueError, match=r"x must have shape \(B, 1, 8, 8\)"):
        bb.posterior(torch.rand(2, 1, 9, 9))
    with pytest.raises(ValueError, match="k must be"):
        bb.posterior_top(binary(2), 3)


# -- the package's checkpoint format ------------------------------------------------------------


def test_checkpoint_round_trip(tmp_path):
    model = tiny("lvae").eval()
    model.save(str(tmp_path))  # hvae-oodd's own BaseModule.save
    bb = OODDBackbone.from_checkpoint(tmp_path)
    ref = OODDBackbone(model)
    assert len(bb.checkpoint_hash) == 64 and type(bb.model).__name__ == "LVAE"
    eps = ref.sample_eps(3)
    with torch.no_grad():
        torch.testing.assert_close(bb.eps_to_z(eps), ref.eps_to_z(eps))
        torch.testing.assert_close(bb.decode(ref.eps_to_z(eps)), ref.decode(ref.eps_to_z(eps)))


def test_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not an hvae-oodd checkpoint"):
        load_checkpoint(tmp_path)
    tiny("vae").save(str(tmp_path))
    torch.save("Linear", tmp_path / "model_class_name.pt")
    with pytest.raises(ValueError, match="not a DeepVAE class"):
        load_checkpoint(tmp_path)

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save("VAE", tmp_path / "model_class_name.pt")
    torch.save({"kwargs": {"x": Evil()}}, tmp_path / "model_kwargs.pt")
    with pytest.raises(ValueError, match="refusing to unpickle"):
        load_checkpoint(tmp_path)
