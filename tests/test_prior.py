"""JointEBMPrior: architecture, validation and the local save/load round trip."""

import pytest
import torch

from ebm_prior import ConvEnergy, JointEBMPrior, MLPEnergy

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
