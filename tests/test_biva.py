"""The BIVA adapter against the real biva-pytorch (VAE, LVAE and BIVA variants)."""

import doctest
import json
import os
import pickle

import pytest
import torch

biva = pytest.importorskip(
    "biva", reason="biva-pytorch is not installed (pip install biva-pytorch)"
)

from biva import BIVA, LVAE, VAE, ConvNormal, DenseNormal  # noqa: E402

from ebm_prior import EpsLangevin, JointEBMPrior  # noqa: E402
from ebm_prior.adapters.biva import (  # noqa: E402
    BIVABackbone,
    data_dependent_init,
    load_hyperparameters,
    stochastic_layers,
)
from ebm_prior.testing import BackboneContract  # noqa: E402

FAMILIES = {"vae": VAE, "lvae": LVAE, "biva": BIVA}
LATENTS = [{"N": 2, "kernel": 3, "block": ConvNormal}, {"N": 3, "block": DenseNormal}]
STAGES = [[[8, 3, 1], [8, 3, 2]], [[8, 3, 1], [8, 3, 2]]]


def tiny(family: str, channels: int = 1, features_out=None, log_var_act=torch.nn.Softplus):
    torch.manual_seed(0)
    model = FAMILIES[family](
        tensor_shp=(-1, channels, 8, 8),
        stages=STAGES,
        latents=LATENTS,
        features_out=features_out,
        log_var_act=log_var_act,
    )
    x = torch.rand(6, channels, 8, 8)
    x = x.bernoulli() if features_out is None else 2 * x - 1
    return data_dependent_init(model, x)


def binary(batch, shape):
    return torch.rand(batch, *shape).bernoulli()


class _BIVAContract(BackboneContract):
    def own_log_prior(self, backbone, x):
        """log p_b(z) from the package's own KL outputs: log p = log q - kl, per layer."""

        records = {}

        def hook(name):
            def fn(module, args, kwargs, output):
                if kwargs.get("inference"):
                    records[name] = output[1]

            return fn

        handles = [
            m.register_forward_hook(hook(n), with_kwargs=True)
            for n, m in backbone.model.named_modules()
            if isinstance(m, (DenseNormal, ConvNormal))
        ]
        try:
            with torch.no_grad():
                out = backbone.model(x)
        finally:
            for h in handles:
                h.remove()
        names = [n for n, _ in stochastic_layers(backbone.model)]
        z = [records[n]["z"] for n in names]
        log_q = [records[n]["dist"].log_prob(records[n]["z"]).flatten(1).sum(1) for n in names]
        kl = out["kl"][::-1]  # the package lists its KLs bottom-up
        assert len(kl) == len(names)
        return z, sum(q - k for q, k in zip(log_q, kl))


class TestBernoulli(_BIVAContract):
    @pytest.fixture(params=list(FAMILIES))
    def backbone(self, request):
        return BIVABackbone(tiny(request.param)).eval()

    @pytest.fixture
    def x(self, backbone):
        return binary(self.batch, backbone.x_shape)


class TestDiscretizedLogistic(_BIVAContract):
    @pytest.fixture
    def backbone(self):
        return BIVABackbone(tiny("biva", 3, features_out=20), "discretized_logistic").eval()

    @pytest.fixture
    def x(self, backbone):
        return torch.randint(0, 256, (self.batch, *backbone.x_shape)) / 127.5 - 1


class TestNoSoftplus(_BIVAContract):
    @pytest.fixture
    def backbone(self):
        return BIVABackbone(tiny("lvae", log_var_act=None)).eval()

    @pytest.fixture
    def x(self, backbone):
        return binary(self.batch, backbone.x_shape)


# -- adapter specifics --------------------------------------------------------------------------


def test_group_order_and_shapes():
    bb = BIVABackbone(tiny("biva"))
    # BIVA: top stage, then td and bu of the lower stage
    assert bb.layer_names == [
        "stages.1.stochastic",
        "stages.0.td_stochastic",
        "stages.0.bu_stochastic",
    ]
    assert bb.latent_shapes == ((3,), (2, 4, 4), (2, 4, 4))
    assert BIVABackbone(tiny("vae")).latent_shapes == ((3,), (2, 4, 4))
    assert bb.fingerprint()["adapter"] == "biva"


def test_softplus_sigmas_at_least_one():
    """The package's default Softplus log-variance gives sigma >= 1 below the top group."""

    bb = BIVABackbone(tiny("biva")).eval()
    sigmas = []

    def read(i, mu, sigma):
        sigmas.append(sigma)
        return mu

    with torch.no_grad():
        bb._top_down(read, 4, stop=True)
    assert torch.equal(sigmas[0], torch.ones_like(sigmas[0]))
    assert all((s >= 1).all() for s in sigmas[1:])


def test_eps_to_z_matches_package_prior_sampling():
    """With eps drawn as the package draws it, T_b reproduces sample_from_prior exactly."""

    bb = BIVABackbone(tiny("lvae")).eval()
    torch.manual_seed(3)
    with torch.no_grad():
        ref = bb.model.sample_from_prior(4)["x_"]
    # re-draw the same noise: the package calls rsample once per layer, top first
    torch.manual_seed(3)
    eps = []

    def read(i, mu, sigma):
        eps.append(torch.randn_like(mu))
        return mu + sigma * eps[-1]

    with torch.no_grad():
        bb._top_down(read, 4, stop=True)
        x_ = torch.logit(bb.decode(bb.eps_to_z(eps)), eps=1e-12)
    torch.testing.assert_close(x_, ref, rtol=1e-4, atol=1e-3)


def test_hooks_removed_and_global_rng_untouched():
    bb = BIVABackbone(tiny("biva")).eval()
    eps = bb.sample_eps(3)

    def hooks():
        return [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in bb.model.modules()]

    before = hooks()
    state = torch.get_rng_state()
    with torch.no_grad():
        z = bb.eps_to_z(eps)
        bb.z_to_eps(z)
        bb.log_prior(z)
        bb.decode(z)
    assert torch.equal(torch.get_rng_state(), state)
    assert hooks() == before  # weight norm's own pre-hooks stay, ours are gone


def test_posterior_matches_package_elbo():
    """log p(x|z) + log p_b(z) - log q(z|x) at our posterior sample equals the package's ELBO."""

    bb = BIVABackbone(tiny("biva")).eval()
    x = binary(4, bb.x_shape)
    torch.manual_seed(5)
    with torch.no_grad():
        post = bb.posterior(x)
        ours = bb.log_likelihood(x, post.z) + bb.log_prior(post.z) - post.log_q
        torch.manual_seed(5)
        out = bb.model(x)
    nll = torch.nn.functional.binary_cross_entropy_with_logits(out["x_"], x, reduction="none")
    theirs = -nll.flatten(1).sum(1) - sum(out["kl"])
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-3)


def test_discretized_logistic_decode_in_range():
    bb = BIVABackbone(tiny("vae", 3, features_out=30), "discretized_logistic").eval()
    assert bb.nr_mix == 3
    with torch.no_grad():
        img = bb.decode(bb.eps_to_z(bb.sample_eps(2)))
    assert img.shape == (2, 3, 8, 8) and img.min() >= -1 and img.max() <= 1
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        bb.log_likelihood(torch.full((2, 3, 8, 8), 2.0), bb.eps_to_z(bb.sample_eps(2)))


def test_conditional_sampling_keeps_top_groups():
    bb = BIVABackbone(tiny("biva")).eval()
    prior = JointEBMPrior(bb.latent_shapes, nef=8, num_layers=1, channels=4)
    with torch.no_grad():
        eps_top = bb.z_to_eps(bb.posterior(binary(3, bb.x_shape)).z)
    out = EpsLangevin(prior, bb, step_size=0.1, steps=3)(eps_top, fixed_groups=[0])
    torch.testing.assert_close(bb.z_to_eps(out.z)[0], eps_top[0], rtol=1e-4, atol=1e-4)


def test_bad_construction():
    with pytest.raises(TypeError, match="DeepVae"):
        BIVABackbone(torch.nn.Linear(2, 2))
    fresh = VAE(tensor_shp=(-1, 1, 8, 8), stages=STAGES, latents=LATENTS)
    with pytest.raises(ValueError, match="not initialised.*data_dependent_init"):
        BIVABackbone(fresh)
    with pytest.raises(ValueError, match="at least 2"):
        data_dependent_init(fresh, torch.rand(1, 1, 8, 8))
    with pytest.raises(ValueError, match="likelihood must be"):
        BIVABackbone(tiny("vae"), "gaussian")
    with pytest.raises(ValueError, match="RGB"):
        BIVABackbone(tiny("vae"), "discretized_logistic")
    bb = BIVABackbone(tiny("vae"))
    with pytest.raises(ValueError, match=r"x must have shape \(B, 1, 8, 8\)"):
        bb.posterior(torch.rand(2, 1, 9, 9))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        bb.log_likelihood(torch.full((2, 1, 8, 8), 3.0), bb.eps_to_z(bb.sample_eps(2)))


# -- the package's checkpoint format ------------------------------------------------------------


def write_session(path, model, hyper, dataset="binmnist"):
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "hyperparameters.p"), "wb") as f:
        pickle.dump(hyper, f)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"dataset": dataset}, f)
    torch.save(model.state_dict(), os.path.join(path, "model.pth"))


def test_from_logdir_round_trip(tmp_path):
    from biva.model.stage import BivaStage

    hyper = {
        "Stage": BivaStage,
        "tensor_shp": (-1, 1, 8, 8),
        "stages": STAGES,
        "latents": LATENTS,
        "nonlinearity": "elu",
        "q_dropout": 0.0,
        "p_dropout": 0.0,
        "type": "biva",
        "features_out": 1,
        "no_skip": False,
        "log_var_act": torch.nn.Softplus,
    }
    torch.manual_seed(0)
    model = data_dependent_init(biva.model.DeepVae(**hyper), binary(6, (1, 8, 8)))
    write_session(tmp_path, model, hyper)
    bb = BIVABackbone.from_logdir(tmp_path)
    ref = BIVABackbone(model)
    assert bb.likelihood == "bernoulli" and len(bb.checkpoint_hash) == 64
    eps = ref.sample_eps(3)
    with torch.no_grad():
        torch.testing.assert_close(bb.eps_to_z(eps), ref.eps_to_z(eps))
        torch.testing.assert_close(bb.decode(ref.eps_to_z(eps)), ref.decode(ref.eps_to_z(eps)))


def test_from_logdir_refuses_unsafe_pickle(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    with open(tmp_path / "hyperparameters.p", "wb") as f:
        pickle.dump({"Stage": Evil()}, f)
    with pytest.raises(pickle.UnpicklingError, match="refusing to load"):
        load_hyperparameters(tmp_path / "hyperparameters.p")


def test_from_logdir_unknown_dataset(tmp_path):
    from biva.model.stage import VaeStage

    model = tiny("vae")
    hyper = {"Stage": VaeStage, "tensor_shp": (-1, 1, 8, 8), "stages": STAGES, "latents": LATENTS}
    write_session(tmp_path, model, hyper, dataset="svhn")
    with pytest.raises(ValueError, match="cannot tell the likelihood"):
        BIVABackbone.from_logdir(tmp_path)
    bb = BIVABackbone.from_logdir(tmp_path, likelihood="bernoulli")
    assert bb.latent_shapes == ((3,), (2, 4, 4))


def test_docstring_example():
    import ebm_prior.adapters.biva

    torch.manual_seed(0)
    result = doctest.testmod(ebm_prior.adapters.biva, extraglobs={"torch": torch})
    assert result.attempted >= 5 and result.failed == 0


# -- the groupwise parts, for the OOD scores -------------------------------------------------


@pytest.mark.parametrize("family", list(FAMILIES))
def test_log_prior_groups_sum_and_top_prior(family):
    bb = BIVABackbone(tiny(family)).eval()
    with torch.no_grad():
        z = bb.eps_to_z(bb.sample_eps(4))
        groups = bb.log_prior_groups(z)
        total = bb.log_prior(z)
    assert len(groups) == bb.num_groups and all(g.shape == (4,) for g in groups)
    torch.testing.assert_close(sum(groups), total)
    top = torch.distributions.Normal(0.0, 1.0).log_prob(z[0]).flatten(1).sum(1)
    torch.testing.assert_close(groups[0], top)


def _top_layer_q(bb, x, k, seed):
    """posterior_top(x, k) with the top layer's q parameters recorded by a hook of our own."""

    seen = []

    def hook(module, args, kwargs, output):
        if kwargs.get("inference"):
            seen.append((output[1]["dist"].loc.clone(), output[1]["dist"].scale.clone()))

    layer = stochastic_layers(bb.model)[0][1]
    handle = layer.register_forward_hook(hook, with_kwargs=True)
    try:
        torch.manual_seed(seed)
        with torch.no_grad():
            post = bb.posterior_top(x, k) if k is not None else bb.posterior(x)
    finally:
        handle.remove()
    return post, seen[-1]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_posterior_top_conditions_on_the_mode_of_the_bottom_groups(family):
    """With k > 0 the top group's q no longer depends on the draws of the bottom groups (two
    seeds, the same q); log q is that q's density at the draw; k = 0 is the posterior."""

    bb = BIVABackbone(tiny(family)).eval()
    x = binary(5, bb.x_shape)
    n = bb.num_groups
    full, (loc0, _) = _top_layer_q(bb, x, None, 1)
    same, _ = _top_layer_q(bb, x, 0, 1)
    for a, b in zip(full.z, same.z, strict=True):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(full.log_q, same.log_q)
    _, (loc0b, _) = _top_layer_q(bb, x, None, 2)
    depends = not torch.allclose(loc0, loc0b)  # top q varies with the bottom-up draws
    assert depends == (family != "lvae")
    for k in range(1, n):
        a, (loc_a, scale_a) = _top_layer_q(bb, x, k, 1)
        b, (loc_b, scale_b) = _top_layer_q(bb, x, k, 2)
        assert len(a.z) == n - k and a.log_q.shape == (5,)
        torch.testing.assert_close(loc_a, loc_b)
        torch.testing.assert_close(scale_a, scale_b)
        if k == n - 1:  # only the top group: log q is its density at the draw
            q = torch.distributions.Normal(loc_a, scale_a).log_prob(a.z[0]).flatten(1).sum(1)
            torch.testing.assert_close(a.log_q, q)
    if family == "lvae":  # top-down inference: the top draws are the posterior's own
        torch.testing.assert_close(_top_layer_q(bb, x, n - 1, 1)[0].z[0], full.z[0])


def test_hierarchical_bound_on_biva():
    """The OOD scores run on BIVA for every k; at k = 0 with the Gaussian prior the score is
    the importance-weighted bound of the same posterior draws."""

    from ebm_prior import log_likelihood
    from ebm_prior.ood import hierarchical_bound

    bb = BIVABackbone(tiny("biva")).eval()
    x = binary(4, bb.x_shape)
    prior = JointEBMPrior(bb.latent_shapes, nef=8)
    with torch.no_grad():
        torch.manual_seed(3)
        l0 = hierarchical_bound(bb, x, 0, None, samples=3)
        torch.manual_seed(3)
        iw = log_likelihood(bb, x, None, num_samples=3).value
        torch.testing.assert_close(l0, iw)
        for k in range(bb.num_groups):
            for p in (None, prior):
                score = hierarchical_bound(bb, x, k, p, samples=2, marginal_samples=2)
                assert score.shape == (4,) and torch.isfinite(score).all()
