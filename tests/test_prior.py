"""JointEBMPrior: architecture, validation and the local save/load round trip."""

import ast
import inspect
from pathlib import Path

import pytest
import torch

from ebm_prior import Backbone, ConvEnergy, EpsLangevin, JointEBMPrior, Langevin, MLPEnergy
from ebm_prior.backbone import Posterior

SHAPES = [(8,), (4, 16, 16), (2, 4, 4)]


def _z(batch=3, shapes=SHAPES):
    return [torch.randn(batch, *s) for s in shapes]


def test_architecture_follows_table5():
    prior = JointEBMPrior(SHAPES, nef=[10, 20, 30], num_layers=[1, 2, 3], channels=[8, 16, 4])
    assert isinstance(prior.nets[0], MLPEnergy) and isinstance(prior.nets[1], ConvEnergy)
    assert [m.out_features for m in prior.nets[0].net if isinstance(m, torch.nn.Linear)] == [10, 1]
    convs = [m for m in prior.nets[1].convs if isinstance(m, torch.nn.Conv2d)]
    assert [(c.out_channels, c.kernel_size, c.stride) for c in convs] == [(16, (4, 4), (2, 2))] * 2
    assert len([m for m in prior.nets[2].convs if isinstance(m, torch.nn.Conv2d)]) == 0  # 4x4
    z = _z()
    e = prior.energies(z)
    assert e.shape == (3, 3)
    torch.testing.assert_close(prior(z), e.sum(1))


def test_validation_names_group_and_shape():
    prior = JointEBMPrior(SHAPES)
    z = _z()
    with pytest.raises(ValueError, match=r"z has 2 groups, expected 3"):
        prior(z[:2])
    bad = list(z)
    bad[1] = torch.randn(3, 4, 8, 8)
    with pytest.raises(
        ValueError, match=r"z\[1\] has shape \(3, 4, 8, 8\), expected \(B, 4, 16, 16\)"
    ):
        prior(bad)
    bad = list(z)
    bad[2] = bad[2].to(torch.int64)
    with pytest.raises(TypeError, match=r"z\[2\].*dtype torch.int64"):
        prior(bad)
    bad = list(z)
    bad[0] = torch.randn(4, 8)
    with pytest.raises(ValueError, match=r"z\[0\] has batch size 4|z\[1\] has batch size 3"):
        prior(bad)
    with pytest.raises(TypeError, match="list"):
        prior(z[0])
    with pytest.raises(ValueError, match="nef has 2 entries, expected one per group"):
        JointEBMPrior(SHAPES, nef=[1, 2])
    with pytest.raises(ValueError, match=r"group 0: a latent shape is \(d,\) or \(c, h, w\)"):
        JointEBMPrior([(3, 4)])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA to test a device mismatch")
def test_device_mismatch():
    prior = JointEBMPrior(SHAPES).cuda()
    with pytest.raises(ValueError, match=r"z\[0\] is on cpu, expected cuda"):
        prior(_z())


def test_save_load_round_trip_strict(tmp_path):
    kwargs = dict(
        latent_shapes=SHAPES,
        nef=[11, 12, 13],
        num_layers=[3, 1, 2],
        channels=[5, 6, 7],
        slope=0.1,
        sampler_config={"step_size": 0.2, "steps": 7, "mala": True},
        backbone={"adapter": "reference", "latent_shapes": [list(s) for s in SHAPES]},
    )
    prior = JointEBMPrior(**kwargs)
    prior.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists() and (tmp_path / "config.json").exists()
    assert not list(tmp_path.glob("*.bin")) and not list(tmp_path.glob("*.pt"))
    with torch.random.fork_rng():
        torch.manual_seed(123)  # a different init: loading must overwrite every weight
        loaded = JointEBMPrior.from_pretrained(tmp_path, strict=True)
    for key in ("nef", "num_layers", "channels", "slope", "sampler_config", "backbone"):
        assert getattr(loaded, key) == getattr(prior, key), key
    assert loaded.latent_shapes == tuple(SHAPES)
    z = _z()
    torch.testing.assert_close(loaded(z), prior(z))


# -- construction checks ---------------------------------------------------------------------


def test_latents_of_another_dtype_get_a_clear_error():
    prior = JointEBMPrior(SHAPES)
    z = [zi.double() for zi in _z()]
    with pytest.raises(TypeError, match=r"z\[0\] has dtype torch.float64.*torch.float32"):
        prior(z)
    with pytest.raises(TypeError, match=r"z\[0\] has dtype torch.float64.*torch.float32"):
        prior.energies(z)
    torch.testing.assert_close(prior.double()(z), prior.double().energies(z).sum(1))


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(latent_shapes=[(2.5,)]), TypeError, r"group 0: .*integers.*2\.5"),
        (dict(latent_shapes=[(3,), ("3",)]), TypeError, r"group 1: .*integers.*'3'"),
        (dict(latent_shapes=[(4, 8.0, 8)]), TypeError, r"group 0: .*integers"),
        (dict(latent_shapes=[(True,)]), TypeError, r"group 0: .*integers"),
        (dict(nef=0), ValueError, r"nef.*group 0.*positive.*0"),
        (dict(nef=[4, -1, 4]), ValueError, r"nef.*group 1.*positive.*-1"),
        (dict(nef=2.5), TypeError, r"nef.*integer.*2\.5"),
        (dict(nef="100"), TypeError, r"nef.*integer.*'100'"),
        (dict(num_layers=-1), ValueError, r"num_layers.*group 0.*non-negative.*-1"),
        (dict(channels=0), ValueError, r"channels.*group 0.*positive"),
        (dict(slope="0.2"), TypeError, r"slope.*number"),
        (dict(latent_shapes=[(8,), (2, 1, 8)]), ValueError, r"group 1: .*\(2, 1, 8\).*conv"),
        (dict(latent_shapes=[(2, 2, 32)]), ValueError, r"group 0: .*\(2, 2, 32\).*conv"),
        (dict(latent_shapes=[(1, 2, 16)]), ValueError, r"group 0: .*\(1, 2, 16\).*conv"),
    ],
)
def test_construction_refuses_what_cannot_work(kwargs, error, message):
    kwargs = {"latent_shapes": [(3,), (4, 8, 8), (2, 4, 4)], **kwargs}
    with pytest.raises(error, match=message):
        JointEBMPrior(**kwargs)


@pytest.mark.parametrize("shape", [(2, 1, 4), (2, 1, 1), (3, 4, 1), (1, 2, 8), (2, 3, 5)])
def test_small_spatial_groups_that_work_are_accepted(shape):
    prior = JointEBMPrior([shape], nef=4, channels=3)
    assert prior([torch.randn(2, *shape)]).shape == (2,)
    assert prior.num_layers == (2,)


# -- sampler_config: keyword arguments of EpsLangevin ----------------------------------------

ROOT = Path(__file__).resolve().parents[1]


class _Spatial(Backbone):
    r"""Identity :math:`T_b` over NVAE-like spatial groups (enough to build a sampler)."""

    adapter_name = "toy-spatial"

    @property
    def latent_shapes(self):
        return ((4, 4, 4), (2, 8, 8))

    def _eps_to_z(self, eps, t):
        return [t * e for e in eps]

    def _z_to_eps(self, z, t):
        return [zi / t for zi in z]

    def _log_prior(self, z):
        return sum(-0.5 * zi.flatten(1).pow(2).sum(1) for zi in z)

    def _posterior(self, x):
        z = [torch.randn(x.shape[0], *s) for s in self.latent_shapes]
        return Posterior(z, torch.zeros(x.shape[0]))

    def _log_likelihood(self, x, z):
        return torch.zeros(x.shape[0])

    def _decode(self, z):
        return z[-1]


@pytest.mark.parametrize(
    "config, error, message",
    [
        ({"step_size": 0.1, "train_steps": 20}, ValueError, r"'train_steps'.*EpsLangevin"),
        ({"step_size": "0.1"}, TypeError, r"'step_size'.*number.*'0.1'"),
        ({"steps": 2.5}, TypeError, r"'steps'.*integer"),
        ({"steps": -1}, ValueError, r"'steps'.*-1"),
        ({"mala": 1}, TypeError, r"'mala'.*bool"),
        ({"t": 0.0}, ValueError, r"'t'.*positive"),
        ({"target": "vaebm"}, ValueError, r"'target'.*'exact'.*'anchor'"),
        ({"clip_grad": float("nan")}, ValueError, r"'clip_grad'"),
        ({"generator": torch.Generator()}, ValueError, r"'generator'.*JSON"),
        ({"step_size": torch.tensor(0.1)}, TypeError, r"'step_size'"),
        ([("step_size", 0.1)], TypeError, r"sampler_config must be a dict"),
    ],
)
def test_sampler_config_is_validated_at_construction(config, error, message):
    with pytest.raises(error, match=message):
        JointEBMPrior([(3,)], sampler_config=config)


def test_sampler_config_keys_are_eps_langevin_arguments():
    from ebm_prior.hub import SAMPLER_CONFIG_KEYS

    params = set(inspect.signature(EpsLangevin.__init__).parameters)
    params |= set(inspect.signature(Langevin.__init__).parameters)
    assert set(SAMPLER_CONFIG_KEYS) <= params - {"self", "prior", "backbone", "log_density"}
    full = {
        "step_size": 0.1, "steps": 2, "mala": True, "clip_grad": 5, "t": 0.8,
        "target": "anchor", "on_nonfinite": "reject", "check_every": 3, "trace": False,
        "progress": False,
    }  # fmt: skip
    assert set(full) == set(SAMPLER_CONFIG_KEYS)
    backbone = _Spatial()
    prior = JointEBMPrior(backbone.latent_shapes, nef=4, channels=3, sampler_config=full)
    out = EpsLangevin(prior, backbone, **prior.sampler_config)(backbone.sample_eps(2))
    assert out.acceptance is not None and out.x[0].shape == (2, 4, 4, 4)


def _sampler_configs_in_scripts():
    r"""Every literal ``sampler_config={...}`` dict in the applications, examples/ and
    benchmarks/."""

    found = []
    scripts = ("ebm_prior/apps/*.py", "examples/*.py", "benchmarks/*.py")
    for path in sorted(p for pattern in scripts for p in ROOT.glob(pattern)):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.keyword) and node.arg == "sampler_config":
                assert isinstance(node.value, ast.Dict), f"{path.name}: not a dict literal"
                keys = [k.value for k in node.value.keys if isinstance(k, ast.Constant)]
                assert len(keys) == len(node.value.keys), f"{path.name}: non-literal keys"
                found.append((path.name, keys))
    return found


def test_examples_write_valid_sampler_configs():
    # the NVAE example's prior, built exactly as it builds it, drives EpsLangevin as recorded
    from ebm_prior.apps import finetune_nvae

    args = finetune_nvae.parse_args(["--checkpoint", "unused.pt", "--data", "cifar10"])
    backbone = _Spatial()
    prior = finetune_nvae.build_prior(backbone, args)
    # the chain the prior was trained with (what the OOD scores' chains reuse), not the
    # longer test-time chain
    assert prior.sampler_config["steps"] == args.langevin_steps != args.test_langevin_steps
    sampler = EpsLangevin(prior, backbone, **prior.sampler_config)
    assert sampler.steps == args.langevin_steps and sampler.t == args.t
    argv = ["--checkpoint", "x.pt", "--data", "cifar10", "--clip-grad", "2"]
    clipped = finetune_nvae.build_prior(backbone, finetune_nvae.parse_args(argv))
    assert EpsLangevin(clipped, backbone, **clipped.sampler_config).clip_grad == 2.0

    # every other script's literal dict
    from ebm_prior.hub import SAMPLER_CONFIG_KEYS

    found = _sampler_configs_in_scripts()
    assert {name for name, _ in found} >= {"train_digits.py", "finetune_nvae.py", "quality.py"}
    for name, keys in found:
        assert set(keys) <= set(SAMPLER_CONFIG_KEYS), (name, keys)
        assert {"step_size", "steps"} <= set(keys), (name, keys)
