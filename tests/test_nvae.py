"""The NVAE adapter against the real NVAE code (opt-in: NVAE_ROOT names a clone of NVlabs/NVAE)."""

import argparse
import os
import sys
import types

import pytest
import torch

if not os.environ.get("NVAE_ROOT"):
    pytest.skip(
        "NVAE_ROOT is not set: point it at a clone of NVlabs/NVAE to run these tests",
        allow_module_level=True,
    )

from ebm_prior import EpsLangevin, JointEBMPrior  # noqa: E402
from ebm_prior.adapters.nvae import (  # noqa: E402
    NVAEBackbone,
    import_nvae,
    load_checkpoint,
    nvae_args,
    save_checkpoint,
)
from ebm_prior.testing import BackboneContract  # noqa: E402

try:
    CODE = import_nvae()
except ImportError as e:  # pragma: no cover - depends on the environment
    pytest.skip(f"NVAE cannot be imported from NVAE_ROOT: {e}", allow_module_level=True)

#: the smallest NVAE: 4 channels, one pre/post-processing cell
TINY = dict(
    num_latent_per_group=3,
    num_channels_enc=4,
    num_channels_dec=4,
    num_preprocess_blocks=1,
    num_preprocess_cells=1,
    num_postprocess_blocks=1,
    num_postprocess_cells=1,
    num_cell_per_cond_enc=1,
    num_cell_per_cond_dec=1,
)

#: name -> (args, expected latent shapes in decoder order)
CONFIGS = {
    # Bernoulli decoder (MNIST, padded to 32x32), 2 scales, adaptive groups (2 then 1), a flow
    "mnist-2scales-ada-nf": (
        dict(dataset="mnist", num_latent_scales=2, num_groups_per_scale=2, ada_groups=True,
             num_nf=1, use_se=True, res_dist=True),
        [(3, 8, 8), (3, 16, 16), (3, 16, 16)],
    ),
    # NormalDecoder (num_mixture_dec == 1), 1 scale, 2 groups, no flow
    "cifar-normal-1scale": (
        dict(dataset="cifar10", num_latent_scales=1, num_groups_per_scale=2, num_mixture_dec=1),
        [(3, 16, 16), (3, 16, 16)],
    ),
    # DiscMixLogistic, 3 scales without adaptive groups, 2 flows, residual posterior
    "cifar-dml-3scales-nf2": (
        dict(dataset="cifar10", num_latent_scales=3, num_groups_per_scale=1, num_mixture_dec=2,
             num_nf=2, res_dist=True, num_preprocess_blocks=1),
        [(3, 4, 4), (3, 8, 8), (3, 16, 16)],
    ),
    # the 'vanilla VAE' branch of NVAE: one scale, one group, stem_decoder
    "vanilla": (
        dict(dataset="cifar10", num_latent_scales=1, num_groups_per_scale=1, num_mixture_dec=1),
        [(3, 16, 16)],
    ),
    # the other cell family (res_bnelu: SyncBatchNorm + ELU) and 3 adaptive scales
    "mnist-bnelu-3scales": (
        dict(dataset="mnist", arch_instance="res_bnelu", num_latent_scales=3,
             num_groups_per_scale=4, ada_groups=True, min_groups_per_scale=1),
        [(3, 4, 4), (3, 8, 8), (3, 8, 8), (3, 16, 16), (3, 16, 16), (3, 16, 16), (3, 16, 16)],
    ),
}  # fmt: skip


def tiny(name: str, seed: int = 0) -> tuple[NVAEBackbone, argparse.Namespace]:
    args = nvae_args(**{**TINY, **CONFIGS[name][0]})
    torch.manual_seed(seed)
    backbone = NVAEBackbone.build(args)
    _randomise_bn(backbone)
    return backbone, args


def _randomise_bn(backbone: NVAEBackbone) -> None:
    """Non-trivial running statistics, so that eval-mode batch norm is not the identity."""

    g = torch.Generator().manual_seed(1)
    for m in backbone.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
            m.running_var.copy_(1 + 0.2 * torch.rand(m.running_var.shape, generator=g))


def data(backbone: NVAEBackbone, batch: int) -> torch.Tensor:
    x = torch.rand(batch, *backbone.x_shape)
    return x.bernoulli() if backbone.nvae.dataset == "mnist" else x


class TestNVAEContract(BackboneContract):
    @pytest.fixture(params=list(CONFIGS))
    def backbone(self, request):
        return tiny(request.param)[0]

    @pytest.fixture
    def x(self, backbone):
        return data(backbone, self.batch)

    def own_log_prior(self, backbone, x):
        """NVAE's own log p(z) from its forward pass, at the z that forward drew."""

        with torch.no_grad():
            z, _, log_p = backbone.own_forward(x)
        return z, log_p


@pytest.mark.parametrize("name", list(CONFIGS))
def test_latent_shapes_in_decoder_order(name):
    backbone, _ = tiny(name)
    assert [tuple(s) for s in backbone.latent_shapes] == CONFIGS[name][1]


def test_top_prior_is_nvaes_normal():
    """NVAE's top prior is Normal(0, log_sigma=0), whose sigma is e^0 + 0.01 = 1.01."""

    backbone, _ = tiny("cifar-normal-1scale")
    eps = backbone.sample_eps(4)
    with torch.no_grad():
        z = backbone.eps_to_z(eps, t=0.5)
    torch.testing.assert_close(z[0], 0.5 * 1.01 * eps[0])


def test_log_likelihood_is_nvaes_reconstruction_loss():
    """log p(x|z) equals minus NVAE's utils.reconstruction_loss on the forward pass's output."""

    for name in ("mnist-2scales-ada-nf", "cifar-normal-1scale", "cifar-dml-3scales-nf2"):
        backbone, _ = tiny(name)
        x = data(backbone, 3)
        torch.manual_seed(3)
        with torch.no_grad(), CODE.active():
            z, _, _ = backbone.own_forward(x)
            torch.manual_seed(3)
            logits, *_ = backbone.nvae(x)
            own = -CODE.utils.reconstruction_loss(
                backbone.nvae.decoder_output(logits), x, crop=backbone.nvae.crop_output
            )
            ours = backbone.log_likelihood(x, z)
        torch.testing.assert_close(ours, own, rtol=1e-5, atol=1e-3, msg=name)


def test_posterior_log_q_includes_flows():
    """With flows, log q differs from the Gaussian part by the flows' log-determinants (0 for
    NVAE's additive flows), and z is read after the flows."""

    backbone, _ = tiny("cifar-dml-3scales-nf2")
    x = data(backbone, 2)
    post = backbone.posterior(x)
    assert [tuple(z.shape[1:]) for z in post.z] == list(backbone.latent_shapes)
    # the posterior is reparameterised: gradients reach the encoder
    post.log_q.sum().backward()
    assert backbone.nvae.enc_sampler[0].weight.grad is not None


def test_decode_ranges_and_shapes():
    for name in ("mnist-2scales-ada-nf", "cifar-normal-1scale", "cifar-dml-3scales-nf2"):
        backbone, _ = tiny(name)
        with torch.no_grad():
            img = backbone.decode(backbone.eps_to_z(backbone.sample_eps(2)))
        assert img.shape == (2, *backbone.x_shape)
        assert img.min() >= 0 and img.max() <= 1, name


def test_conditional_sampling_keeps_top_groups():
    backbone, _ = tiny("mnist-2scales-ada-nf")
    prior = JointEBMPrior(backbone.latent_shapes, nef=8, num_layers=1, channels=4)
    with torch.no_grad():
        eps_top = backbone.z_to_eps(backbone.posterior(data(backbone, 3)).z)
    out = EpsLangevin(prior, backbone, step_size=0.1, steps=3)(eps_top, fixed_groups=[0])
    torch.testing.assert_close(backbone.z_to_eps(out.z)[0], eps_top[0], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(out.x[1], eps_top[1])


# -- batch norm ---------------------------------------------------------------------------------


def test_batch_norm_stays_in_eval_mode():
    backbone, _ = tiny("mnist-2scales-ada-nf")
    backbone.train()
    assert backbone.training and not backbone.nvae.training
    eps = backbone.sample_eps(1)
    with torch.no_grad():  # batch of 1 through eval-mode BN: the same as in a larger batch
        a = backbone.eps_to_z(eps)
        b = backbone.eps_to_z([torch.cat([e, torch.randn_like(e)]) for e in eps])
    for za, zb in zip(a, b):
        torch.testing.assert_close(za[0], zb[0])


def test_readjust_bn_changes_statistics_and_returns_to_eval():
    backbone, _ = tiny("cifar-normal-1scale")
    bns = [
        m
        for m in backbone.nvae.dec_tower.modules()
        if isinstance(m, CODE.sync_batchnorm.SyncBatchNormSwish)
    ]
    assert bns, "the res_mbconv decoder has fused BN+Swish layers"
    before = [m.running_mean.clone() for m in bns]
    backbone.readjust_bn(iters=3, batch_size=4, t=0.8, generator=torch.Generator().manual_seed(0))
    assert not backbone.nvae.training
    assert any(not torch.equal(b, m.running_mean) for b, m in zip(before, bns))
    assert all(int(m.num_batches_tracked) == 3 for m in bns)


def test_portable_bn_swish_is_batch_norm_then_swish():
    backbone, _ = tiny("cifar-normal-1scale")
    m = next(
        m for m in backbone.modules() if isinstance(m, CODE.sync_batchnorm.SyncBatchNormSwish)
    )
    x = torch.randn(5, m.num_features, 4, 4)
    ref = torch.nn.functional.batch_norm(x, m.running_mean, m.running_var, m.weight, m.bias)
    torch.testing.assert_close(m(x), ref * torch.sigmoid(ref))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    backbone, _ = tiny("cifar-dml-3scales-nf2")
    eps = backbone.sample_eps(3)
    with torch.no_grad():
        z_cpu = backbone.eps_to_z(eps)
        img_cpu = backbone.decode(z_cpu)
        backbone.cuda()
        z_gpu = backbone.eps_to_z([e.cuda() for e in eps])
        img_gpu = backbone.decode(z_gpu)
    for a, b in zip(z_cpu, z_gpu):
        torch.testing.assert_close(b.cpu(), a, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(img_gpu.cpu(), img_cpu, rtol=1e-3, atol=1e-4)


# -- imports ------------------------------------------------------------------------------------


def test_import_does_not_clobber_user_modules():
    mine = {name: types.ModuleType(name) for name in ("model", "utils", "distributions")}
    saved = {name: sys.modules.get(name) for name in mine}
    sys.modules.update(mine)
    try:
        from ebm_prior.adapters import nvae

        nvae._CACHE.clear()
        code = import_nvae()
        for name, module in mine.items():
            assert sys.modules[name] is module, f"NVAE's {name} replaced the user's"
        assert code.model is not CODE.model  # a fresh import, not the cached one
        assert code.model.__file__.startswith(code.root)
        backbone = NVAEBackbone.build(nvae_args(**{**TINY, **CONFIGS["vanilla"][0]}))
        assert backbone.latent_shapes == ((3, 16, 16),)
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
        nvae._CACHE.clear()


def test_import_errors_are_clear(tmp_path):
    with pytest.raises(ValueError, match="not a clone of NVlabs/NVAE: it has no model.py"):
        import_nvae(tmp_path)


def test_wrong_model_type():
    with pytest.raises(TypeError, match="expected model.AutoEncoder"):
        NVAEBackbone(torch.nn.Linear(2, 2), CODE)


def test_bad_x_names_the_expected_shape():
    backbone, _ = tiny("mnist-2scales-ada-nf")
    with pytest.raises(ValueError, match=r"expected \(B, 1, 32, 32\).*padded to 32x32"):
        backbone.posterior(torch.rand(2, 1, 28, 28))


def test_unknown_args():
    with pytest.raises(ValueError, match="unknown NVAE arguments"):
        nvae_args(num_latent_groups=3)


# -- checkpoints --------------------------------------------------------------------------------


def write_train_py_checkpoint(path, backbone, args, drop=()):
    """The exact layout of NVAE's train.py: its keys, an Adamax optimizer's state, a cosine
    scheduler and a grad scaler, and the args Namespace (optionally without some fields)."""

    model = backbone.nvae
    opt = torch.optim.Adamax(model.parameters(), 1e-2, weight_decay=3e-4, eps=1e-3)
    model.prior_ftr0.grad = torch.zeros_like(model.prior_ftr0)
    opt.step()
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 10.0, eta_min=1e-4)
    scaler = torch.amp.GradScaler("cpu", 2**10)
    args = argparse.Namespace(**vars(args))
    args.save, args.distributed, args.num_total_iter = "/expr/eval-x", False, 123
    for k in drop:
        delattr(args, k)
    torch.save(
        {
            "epoch": 4,
            "state_dict": model.state_dict(),
            "optimizer": opt.state_dict(),
            "global_step": 400,
            "args": args,
            "arch_instance": CODE.utils.get_arch_cells(args.arch_instance),
            "scheduler": sched.state_dict(),
            "grad_scalar": scaler.state_dict(),
        },
        path,
    )


def test_checkpoint_round_trip(tmp_path):
    backbone, args = tiny("mnist-2scales-ada-nf")
    path = tmp_path / "checkpoint.pt"
    write_train_py_checkpoint(path, backbone, args)
    loaded = NVAEBackbone.from_checkpoint(path)
    assert len(loaded.checkpoint_hash) == 64
    assert loaded.fingerprint()["adapter"] == "nvae"
    x = data(backbone, 3)
    eps = backbone.sample_eps(3)
    with torch.no_grad():
        for a, b in zip(backbone.eps_to_z(eps), loaded.eps_to_z(eps)):
            torch.testing.assert_close(a, b)
        z = backbone.eps_to_z(eps)
        torch.testing.assert_close(loaded.log_likelihood(x, z), backbone.log_likelihood(x, z))
        torch.testing.assert_close(loaded.log_prior(z), backbone.log_prior(z))


def test_old_checkpoint_args_are_back_filled(tmp_path):
    backbone, args = tiny("cifar-dml-3scales-nf2")
    assert args.ada_groups is False and args.min_groups_per_scale == 1
    path = tmp_path / "checkpoint.pt"
    write_train_py_checkpoint(path, backbone, args, drop=("ada_groups", "min_groups_per_scale"))
    ckpt = load_checkpoint(path)
    assert ckpt["args"].ada_groups is False and ckpt["args"].min_groups_per_scale == 1
    assert NVAEBackbone.from_checkpoint(path).latent_shapes == backbone.latent_shapes


def test_save_checkpoint_writes_train_py_layout(tmp_path):
    backbone, args = tiny("vanilla")
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(backbone, args, str(path), epoch=2)
    ckpt = load_checkpoint(path)
    assert set(ckpt) == {
        "epoch", "state_dict", "optimizer", "global_step", "args", "arch_instance", "scheduler",
        "grad_scalar",
    }  # fmt: skip
    assert ckpt["epoch"] == 2 and not any(
        p.name.startswith("checkpoint.pt.tmp") for p in tmp_path.iterdir()
    )


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_checkpoint_with_other_objects_is_refused(tmp_path):
    backbone, args = tiny("vanilla")
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": backbone.nvae.state_dict(), "args": args, "x": _Evil()}, path)
    with pytest.raises(ValueError, match="weights_only=True"):
        NVAEBackbone.from_checkpoint(path)


def test_checkpoint_not_nvae(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"weights": torch.zeros(2)}, path)
    with pytest.raises(ValueError, match="not an NVAE checkpoint.*'state_dict' and 'args'"):
        load_checkpoint(path)


def test_checkpoint_architecture_mismatch_names_keys(tmp_path):
    backbone, args = tiny("vanilla")
    other = argparse.Namespace(**{**vars(args), "num_groups_per_scale": 2})
    path = tmp_path / "checkpoint.pt"
    torch.save({"state_dict": backbone.nvae.state_dict(), "args": other}, path)
    with pytest.raises(ValueError, match="does not match the architecture.*missing"):
        NVAEBackbone.from_checkpoint(path)
