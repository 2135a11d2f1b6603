"""Hub round trips against a local Hub-compatible server, in subprocesses as a user runs them.

``huggingface_hub`` reads ``HF_ENDPOINT``, ``HF_HOME`` and ``HF_HUB_OFFLINE`` when it is
imported, so every scenario runs in a fresh interpreter with those variables set, exactly as a
user's script would; the server runs in the test process.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hub_server import HubServer

from ebm_prior import HierarchicalVAE, JointEBMPrior
from ebm_prior.hub import (
    SCHEMA_VERSION,
    IncompatiblePriorError,
    PriorFileError,
    check_compatible,
    migrate_config,
)

ROOT = Path(__file__).resolve().parents[1]

PRELUDE = """
import json, sys, torch
from pathlib import Path
from ebm_prior import HierarchicalVAE, JointEBMPrior
from ebm_prior.hub import load_prior, push_prior, PriorFileError, IncompatiblePriorError
from huggingface_hub import HfApi
from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

def make(seed):
    torch.manual_seed(seed)
    vae = HierarchicalVAE.from_config("digits")
    vae.checkpoint_hash = "abc123"
    prior = JointEBMPrior(vae.latent_shapes, nef=7, sampler_config={"step_size": 0.3})
    return vae, prior

def probe(prior):
    torch.manual_seed(0)
    return prior([torch.randn(4, 8), torch.randn(4, 16)])
"""


def run(code: str, env: dict, tmp: Path) -> str:
    script = tmp / "scenario.py"
    script.write_text(PRELUDE + textwrap.dedent(code))
    base = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    out = subprocess.run(
        [sys.executable, str(script)],
        env={**base, **env, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


@pytest.fixture
def hub(tmp_path):
    server = HubServer().__enter__()
    env = {"HF_ENDPOINT": server.url, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_DISABLE_XET": "1"}
    yield server, env
    try:
        server.stop()
    except Exception:
        pass


def test_push_pull_revisions_card_private_offline(hub, tmp_path):
    server, env = hub
    out = run(
        """
        vae, p1 = make(1)
        url1 = push_prior(p1, "alice/digits-prior", backbone=vae, metrics={"test_nll": 16.65},
                          datasets=["digits"], token="alice-token")
        rev1 = url1.rsplit("/", 1)[-1]
        card = Path(HfApi().hf_hub_download("alice/digits-prior", "README.md")).read_text()
        q = load_prior("alice/digits-prior", backbone=vae)
        assert torch.equal(probe(q), probe(p1))
        assert q.backbone == vae.fingerprint() and q.sampler_config == {"step_size": 0.3}

        _, p2 = make(2)
        push_prior(p2, "alice/digits-prior", backbone=vae, token="alice-token")
        assert torch.equal(probe(JointEBMPrior.from_pretrained("alice/digits-prior")), probe(p2))
        old = JointEBMPrior.from_pretrained("alice/digits-prior", revision=rev1)
        assert torch.equal(probe(old), probe(p1))
        try:
            JointEBMPrior.from_pretrained("alice/digits-prior", revision="f" * 40)
            raise SystemExit("a missing revision must fail")
        except RevisionNotFoundError:
            pass

        torch.save(probe(p2), sys.argv[0] + ".expected.pt")

        # private repo: invisible without the token
        push_prior(p1, "alice/secret", private=True, token="alice-token")
        try:
            JointEBMPrior.from_pretrained("alice/secret")
            raise SystemExit("a private repo must not load without its token")
        except RepositoryNotFoundError:
            pass
        assert torch.equal(probe(JointEBMPrior.from_pretrained("alice/secret",
                                                                token="alice-token")), probe(p1))
        print(json.dumps({"card": card}))
        """,
        env,
        tmp_path,
    )
    card = json.loads(out.splitlines()[-1])["card"]
    assert card.startswith("---\nlibrary_name: ebm-prior\n")
    assert "- digits" in card and "test_nll" in card and "reference" in card
    assert 'JointEBMPrior.from_pretrained("alice/digits-prior")' in card
    assert "Cui, Jiali" in card and "| 1 | (16,) | MLP" in card

    # the usage snippet of the card works as written
    snippet = card.split("```python\n")[1].split("```")[0]
    run(snippet + "\nassert prior.latent_shapes == ((8,), (16,))\n", env, tmp_path)

    # offline, after the server is gone: the cache serves the last pulled revision
    server.stop()
    run(
        """
        expected = torch.load(sys.argv[0] + ".expected.pt")
        assert torch.equal(probe(JointEBMPrior.from_pretrained("alice/digits-prior")), expected)
        """,
        {**env, "HF_HUB_OFFLINE": "1"},
        tmp_path,
    )
    assert ("POST", "/api/repos/create") in server.state.requests


def _snapshot_files(env, repo):
    root = Path(env["HF_HOME"]) / "hub" / f"models--{repo.replace('/', '--')}"
    return sorted(p.name for p in root.rglob("*") if p.is_file()) if root.exists() else []


def test_failures_are_clear_and_leave_nothing_behind(hub, tmp_path):
    server, env = hub
    run(
        """
        vae, p = make(3)
        for repo in ("bob/truncated", "bob/corrupted", "bob/newer", "bob/ok"):
            push_prior(p, repo, backbone=vae)
        api = HfApi()
        api.create_repo("bob/empty")
        api.upload_file(path_or_fileobj=b"# nothing here", path_in_repo="README.md",
                        repo_id="bob/empty")
        cfg = json.loads(Path(api.hf_hub_download("bob/newer", "config.json")).read_text())
        cfg["schema_version"] = 99
        api.upload_file(path_or_fileobj=json.dumps(cfg).encode(), path_in_repo="config.json",
                        repo_id="bob/newer")
        """,
        env,
        tmp_path,
    )
    server.corrupt("bob/truncated", "model.safetensors", keep=40)
    server.corrupt("bob/corrupted", "model.safetensors")
    out = run(
        """
        def error(repo, **kw):
            try:
                load_prior(repo, **kw)
            except Exception as e:
                return f"{type(e).__name__}: {e}"
            raise SystemExit(f"{repo} must fail")

        other = HierarchicalVAE(latent_dims=(8, 12))
        print(json.dumps({
            "missing_repo": error("bob/nope"),
            "missing_file": error("bob/empty"),
            "truncated": error("bob/truncated"),
            "corrupted": error("bob/corrupted"),
            "newer": error("bob/newer"),
            "wrong_backbone": error("bob/ok", backbone=other),
        }))
        """,
        env,
        tmp_path,
    )
    errors = json.loads(out.splitlines()[-1])
    assert (
        errors["missing_repo"].startswith("RepositoryNotFoundError")
        and "bob/nope" in (errors["missing_repo"])
    )
    assert (
        errors["missing_file"].startswith("PriorFileError")
        and "has no config.json" in (errors["missing_file"])
    )
    for key in ("truncated", "corrupted"):
        assert errors[key].startswith("PriorFileError") and "SHA-256" in errors[key], errors[key]
        repo = f"bob/{key}"
        assert "model.safetensors" not in _snapshot_files(env, repo), "bad download kept"
        assert not [f for f in _snapshot_files(env, repo) if f.endswith(".incomplete")]
    assert "schema_version 99" in errors["newer"] and "upgrade ebm-prior" in errors["newer"]
    assert errors["wrong_backbone"].startswith("IncompatiblePriorError")
    assert (
        "group 1: the prior expects latent shape (16,), the backbone has (12,)"
        in (errors["wrong_backbone"])
    )


# -- in-process checks (no network) --------------------------------------------------------------


def test_local_round_trip_is_atomic_and_checked(tmp_path):
    prior = JointEBMPrior([(3,), (2, 8, 8)], nef=4, channels=3)
    prior.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "README.md", "config.json", "model.safetensors"
    ]  # fmt: skip
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["schema_version"] == SCHEMA_VERSION and len(config["weights_sha256"]) == 64
    # a corrupted local file is refused, never half-loaded
    data = bytearray((tmp_path / "model.safetensors").read_bytes())
    data[-5] ^= 0xFF
    (tmp_path / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(PriorFileError, match="SHA-256"):
        JointEBMPrior.from_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(PriorFileError, match="no model.safetensors"):
        JointEBMPrior.from_pretrained(tmp_path)


def test_migrate_old_schema(tmp_path):
    prior = JointEBMPrior([(3,), (5,)], nef=4)
    prior.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    for key in ("schema_version", "library_version", "sampler_config", "backbone"):
        config.pop(key)
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = JointEBMPrior.from_pretrained(tmp_path)
    assert loaded.library_version == "unknown" and loaded.sampler_config == {}
    z = [torch.randn(2, 3), torch.randn(2, 5)]
    torch.testing.assert_close(loaded(z), prior(z))
    assert migrate_config({"latent_shapes": [[3]]})["schema_version"] == SCHEMA_VERSION
    with pytest.raises(PriorFileError, match="schema_version 7"):
        migrate_config({"latent_shapes": [[3]], "schema_version": 7})


def test_check_compatible():
    vae = HierarchicalVAE.from_config("digits")
    prior = JointEBMPrior(vae.latent_shapes, backbone=vae.fingerprint())
    check_compatible(prior, vae)
    with pytest.raises(
        IncompatiblePriorError, match="prior has 3 latent groups, the backbone has 2"
    ):
        check_compatible(JointEBMPrior([(8,), (16,), (2,)]), vae)
    vae.checkpoint_hash = "x"
    prior.backbone = {**vae.fingerprint(), "checkpoint_hash": "y"}
    with pytest.raises(IncompatiblePriorError, match="checkpoint y"):
        check_compatible(prior, vae)
    check_compatible(prior, vae, check_hash=False)
    prior.backbone = {**vae.fingerprint(), "adapter": "nvae"}
    with pytest.raises(IncompatiblePriorError, match="'nvae' backbone"):
        check_compatible(prior, vae)


def test_examples_push_then_sample_by_repo_id(hub, tmp_path):
    server, env = hub
    out = tmp_path / "digits"
    run(
        f"""
        import runpy
        sys.argv = ["train_digits.py", "--epochs", "1", "--two-stage-epochs", "1",
                    "--langevin-steps", "2", "--eval-samples", "2", "--log-z-samples", "100",
                    "--no-figures", "--out", r"{out}", "--push-to-hub", "carol/digits-prior"]
        runpy.run_path(r"{ROOT / "examples" / "train_digits.py"}", run_name="__main__")
        sys.argv = ["sample_digits.py", "--prior", "carol/digits-prior", "--backbone",
                    r"{out / "vae_A.safetensors"}", "--steps", "3", "--n", "16",
                    "--out", r"{out / "pulled.png"}"]
        runpy.run_path(r"{ROOT / "examples" / "sample_digits.py"}", run_name="__main__")
        # a different backbone checkpoint is refused by its hash
        from safetensors.torch import load_file, save_file
        state = load_file(r"{out / "vae_A.safetensors"}")
        state = {{k: v + 0.01 for k, v in state.items()}}
        save_file(state, r"{out / "other.safetensors"}")
        sys.argv[4] = r"{out / "other.safetensors"}"
        try:
            runpy.run_path(r"{ROOT / "examples" / "sample_digits.py"}", run_name="__main__")
            raise SystemExit("a prior for another checkpoint must be refused")
        except IncompatiblePriorError as e:
            assert "checkpoint" in str(e)
        """,
        env,
        tmp_path,
    )
    assert (out / "pulled.png").stat().st_size > 1000
    assert (out / "prior_B" / "model.safetensors").exists()
    assert "carol/digits-prior" in server.state.repos
