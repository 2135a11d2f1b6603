"""The OOD examples run at tiny sizes on random data (no dataset needed)."""

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

import _data  # noqa: E402
import ood  # noqa: E402

TINY = [
    "--n-train", "40", "--n-test", "20", "--epochs", "1", "--two-stage-epochs", "1",
    "--langevin-steps", "2", "--score-steps", "2", "--samples", "2", "--channels", "4",
    "--batch-size", "20", "--nef", "8",
]  # fmt: skip


@pytest.fixture
def fake_data(monkeypatch):
    """Replaces the dataset loader with random 28x28 images: a bright and a dark 'dataset'."""

    def load_images(name, split="test", root="data", download=False):
        gen = torch.Generator().manual_seed(hash((name, split)) % 2**31)
        scale = 0.6 if name == "fashion-mnist" else 0.2
        return scale * torch.rand(60, 1, 28, 28, generator=gen)

    monkeypatch.setattr(_data, "load_images", load_images)


def test_ood_example_reference_tiny(tmp_path, capsys, fake_data):
    out = ood.main([*TINY, "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert "| Gaussian, Eq. 20 (f = 0)" in printed and "| EBM prior, Eq. 20" in printed
    rows = out["rows"]
    assert [(r["k"], r["score"]) for r in rows] == [(0, "L>k"), (1, "LLR>k")] * 2
    for r in rows:
        assert 0 <= r["auroc"] <= 1 and 0 <= r["auprc"] <= 1 and 0 <= r["fpr80"] <= 1
    # bright vs dark images: the likelihood separates them (either way round)
    assert abs(rows[0]["auroc"] - 0.5) > 0.3
    assert Path(out["histogram"]).stat().st_size > 1000


@pytest.mark.skipif(
    not os.environ.get("OODD_ROOT"), reason="OODD_ROOT (a clone of hvae-oodd) is not set"
)
def test_ood_example_oodd_tiny(tmp_path, capsys, fake_data):
    out = ood.main([*TINY, "--backbone", "oodd", "--no-plot", "--out", str(tmp_path)])
    assert "| Gaussian, hvae-oodd bound" in capsys.readouterr().out
    assert [r["k"] for r in out["rows"]] == [0, 1, 2, 0, 1, 2]


@pytest.mark.skipif(
    not os.environ.get("OODD_ROOT"), reason="OODD_ROOT (a clone of hvae-oodd) is not set"
)
def test_finetune_oodd_tiny(tmp_path):
    import finetune_oodd

    out = finetune_oodd.main(
        ["--train-tiny", "--data", "random", "--epochs", "1", "--langevin-steps", "2",
         "--sample-steps", "3", "--n-train", "40", "--batch-size", "20", "--out", str(tmp_path)]
    )  # fmt: skip
    assert (tmp_path / "prior" / "config.json").exists()
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
