"""The BIVA fine-tuning and hierarchical-reconstruction examples run at tiny sizes."""

from pathlib import Path

import pytest
import torch

from ebm_prior import HierarchicalVAE, JointEBMPrior
from ebm_prior.apps import hierarchical_reconstruction as hrec

pytest.importorskip("matplotlib", reason="the examples' figures need matplotlib")
pytest.importorskip("sklearn", reason="the examples train on scikit-learn's digits")

TINY = ["--epochs", "1", "--ebm-epochs", "1", "--train-steps", "2", "--steps", "2"]


def test_hierarchical_reconstruction_reference(tmp_path):
    out = hrec.main([*TINY, "--rows", "3", "--repeats", "2", "--out", str(tmp_path)])
    # data + reconstruction + 2 repeats for each of the 2 groups
    assert out["grid"].shape == (3, 2 + 2 * 2, 1, 8, 8)
    assert torch.isfinite(out["grid"]).all()
    assert Path(out["path"]).stat().st_size > 1000


def test_hierarchical_reconstruction_biva(tmp_path):
    pytest.importorskip("biva", reason="biva-pytorch is not installed (pip install biva-pytorch)")
    out = hrec.main([*TINY, "--backbone", "biva", "--rows", "2", "--repeats", "1"]
                    + ["--out", str(tmp_path)])  # fmt: skip
    assert out["backbone"].num_groups == 3
    assert out["grid"].shape == (2, 2 + 3, 1, 8, 8)
    assert Path(out["path"]).stat().st_size > 1000


def test_reconstructions_keep_the_fixed_groups():
    """Column 0 is the data; the resampled columns differ from the reconstruction."""

    torch.manual_seed(0)
    vae = HierarchicalVAE.from_config("digits").eval()
    prior = JointEBMPrior(vae.latent_shapes, nef=8)
    x = (torch.rand(4, 1, 8, 8) > 0.5).float()
    grid = hrec.hierarchical_reconstructions(prior, vae, x, repeats=3, steps=3)
    assert grid.shape == (4, 2 + 2 * 3, 1, 8, 8)
    torch.testing.assert_close(grid[:, 0], x)
    d1 = (grid[:, 2:5] - grid[:, 1:2]).abs().mean()
    assert d1 > 0
    with pytest.raises(ValueError, match="unknown backbone"):
        hrec.build_backbone("nvae", x)


def test_finetune_biva_demo(tmp_path):
    pytest.importorskip("biva", reason="biva-pytorch is not installed (pip install biva-pytorch)")
    from ebm_prior.apps import finetune_biva

    out = finetune_biva.main(
        ["--demo-epochs", "1", "--ebm-epochs", "1", "--train-steps", "2", "--steps", "3",
         "--samples", "4", "--out", str(tmp_path)]
    )  # fmt: skip
    assert out["samples"].shape == (4, 1, 8, 8) and torch.isfinite(out["samples"]).all()
    assert Path(out["path"]).stat().st_size > 1000
    prior = JointEBMPrior.from_pretrained(out["prior_dir"])
    assert prior.backbone["adapter"] == "biva"
    assert prior.backbone["checkpoint_hash"] == out["backbone"].checkpoint_hash
    assert [tuple(s) for s in prior.backbone["latent_shapes"]] == [(8,), (4, 4, 4), (4, 4, 4)]


def test_finetune_biva_needs_data_for_a_logdir(tmp_path):
    pytest.importorskip("biva", reason="biva-pytorch is not installed (pip install biva-pytorch)")
    from ebm_prior.apps import finetune_biva

    with pytest.raises(SystemExit, match="--data-file"):
        finetune_biva.main(["--logdir", str(tmp_path)])
    with pytest.raises(ValueError, match=".npy or .pt"):
        finetune_biva.load_data(str(tmp_path / "x.csv"))
