"""The OOD examples run at tiny sizes on random data (no dataset needed)."""

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from ebm_prior.apps import data as _data
from ebm_prior.apps import ood

TINY = [
    "--n-train", "40", "--n-test", "20", "--epochs", "1", "--two-stage-epochs", "1",
    "--langevin-steps", "2", "--samples", "2", "--marginal-samples", "2", "--channels", "4",
    "--batch-size", "20", "--nef", "8",
]  # fmt: skip


@pytest.fixture
def fake_data(monkeypatch):
    """Replaces the dataset loader with random 28x28 images: the in-distribution 'dataset' has
    its left half on and its right half off, the OOD one the other way round."""

    def load_images(name, split="test", root="data", download=False):
        gen = torch.Generator().manual_seed(hash((name, split)) % 2**31)
        x = 0.05 + 0.05 * torch.rand(60, 1, 28, 28, generator=gen)
        half = slice(0, 14) if name == "fashion-mnist" else slice(14, 28)
        x[..., half] = 0.9
        return x

    monkeypatch.setattr(_data, "load_images", load_images)


@pytest.mark.parametrize("lower", ["mode", "sample"])
def test_ood_example_reference_tiny(tmp_path, capsys, fake_data, lower):
    out = ood.main([*TINY, "--epochs", "10", "--lower", lower, "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert "| Gaussian prior" in printed and "| EBM prior" in printed
    assert f"hvae-oodd's L>k for both priors (2 importance samples, lower={lower}" in printed
    rows = out["rows"]
    assert [(r["k"], r["score"]) for r in rows] == [(0, "L>k"), (1, "LLR>k")] * 2
    for r in rows:
        assert 0 <= r["auroc"] <= 1 and 0 <= r["auprc"] <= 1 and 0 <= r["fpr80"] <= 1
    # the OOD images (the wrong half on) get a lower likelihood: -L>0 ranks them first under
    # both priors (a negated score would give an AUROC near 0 and fail)
    assert rows[0]["auroc"] > 0.95 and rows[2]["auroc"] > 0.95
    # the EBM rows carry the paired AUROC difference to the Gaussian row of the same k
    for gauss, ebm in zip(rows[:2], rows[2:]):
        assert ebm["d_auroc"] == pytest.approx(ebm["auroc"] - gauss["auroc"])
        assert ebm["d_auroc_low"] <= ebm["d_auroc"] <= ebm["d_auroc_high"]
    saved = np.load(out["scores"])
    keys = [f"{part}_{prior}_L{k}" for part in ("in", "out") for prior in ("ebm", "gauss")
            for k in (0, 1)]  # fmt: skip
    assert sorted(saved) == keys
    assert saved["in_gauss_L0"].shape == (20,)
    assert Path(out["histogram"]).stat().st_size > 1000


def test_ood_example_langevin_bottom(tmp_path, fake_data):
    out = ood.main([*TINY, "--lower", "sample", "--bottom", "langevin", "--no-plot",
                    "--out", str(tmp_path)])  # fmt: skip
    assert len(out["rows"]) == 4
    with pytest.raises(SystemExit, match="use it with --lower sample"):
        ood.main([*TINY, "--bottom", "langevin", "--no-plot", "--out", str(tmp_path)])


@pytest.mark.skipif(
    not os.environ.get("OODD_ROOT"), reason="OODD_ROOT (a clone of hvae-oodd) is not set"
)
def test_ood_example_oodd_tiny(tmp_path, capsys, fake_data):
    out = ood.main([*TINY, "--backbone", "oodd", "--no-plot", "--out", str(tmp_path)])
    assert "| Gaussian prior" in capsys.readouterr().out
    assert [r["k"] for r in out["rows"]] == [0, 1, 2, 0, 1, 2]


@pytest.mark.skipif(
    not os.environ.get("OODD_ROOT"), reason="OODD_ROOT (a clone of hvae-oodd) is not set"
)
def test_finetune_oodd_tiny(tmp_path):
    from ebm_prior.apps import finetune_oodd

    out = finetune_oodd.main(
        ["--train-tiny", "--data", "random", "--epochs", "1", "--langevin-steps", "2",
         "--sample-steps", "3", "--n-train", "40", "--batch-size", "20", "--out", str(tmp_path)]
    )  # fmt: skip
    assert (tmp_path / "prior" / "config.json").exists()
    assert (tmp_path / "checkpoints" / "trainer.pt").exists()  # a rerun resumes there
    assert (tmp_path / "samples.png").stat().st_size > 1000
    assert out["samples"].shape == (16, 1, 28, 28)


def test_data_helpers():
    x = torch.rand(10, 1, 4, 4)
    b = _data.binarize(x, 0)
    assert torch.equal(b, _data.binarize(x, 0)) and set(b.unique().tolist()) <= {0.0, 1.0}
    assert len(_data.subset(x, 3)) == 3 and _data.subset(x, None) is x
    with pytest.raises(ValueError, match="unknown dataset"):
        _data.load_images("imagenet")


def test_mixed_shapes_refused(fake_data):
    with pytest.raises(ValueError, match="same image shape"):
        ood.main([*TINY, "--out-dist", "svhn"])
