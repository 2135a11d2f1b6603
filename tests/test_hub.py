"""Hub round trips against a local Hub-compatible server, in subprocesses as a user runs them.

``huggingface_hub`` reads ``HF_ENDPOINT``, ``HF_HOME`` and ``HF_HUB_OFFLINE`` when it is
imported, so every scenario runs in a fresh interpreter with those variables set, exactly as a
user's script would; the server runs in the test process.
"""

import json
import os
import re
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hub_server import HubServer
from huggingface_hub import ModelCard

import ebm_prior.hub as hub_module
from ebm_prior import HierarchicalVAE, JointEBMPrior
from ebm_prior.hub import (
    SCHEMA_VERSION,
    IncompatiblePriorError,
    PriorFileError,
    atomic_write,
    check_compatible,
    load_prior,
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
    data = ModelCard(card).data
    assert data.library_name == "ebm-prior" and data.datasets == ["digits"]
    assert "reference" in data.tags and data.eval_results[0].metric_type == "test_nll"
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


# -- re-saving, file modes, the model card ------------------------------------------------------


def _listing(folder):
    return sorted(str(p.relative_to(folder)) for p in Path(folder).rglob("*"))


def _pair(folder):
    return {n: (Path(folder) / n).read_bytes() for n in ("config.json", "model.safetensors")}


def _assert_loads_as(folder, prior):
    loaded = JointEBMPrior.from_pretrained(folder)
    assert loaded.config == prior.config
    state = loaded.state_dict()
    assert state.keys() == prior.state_dict().keys()
    for key, value in prior.state_dict().items():
        assert torch.equal(state[key], value), key


@pytest.mark.parametrize("failure", ["non_json", "writer_raises", "keyboard_interrupt"])
def test_failed_resave_keeps_the_old_prior(tmp_path, monkeypatch, failure):
    old = JointEBMPrior([(3,), (2, 8, 8)], nef=4, channels=3, sampler_config={"step_size": 0.1})
    old.save_pretrained(tmp_path)
    files, pair = _listing(tmp_path), _pair(tmp_path)
    new = JointEBMPrior([(3,), (2, 8, 8)], nef=6, channels=3)
    if failure == "non_json":
        new.sampler_config["step_size"] = torch.tensor(0.2)  # set after the constructor's check
        expected = (TypeError, ValueError)
    else:
        error = RuntimeError("No space left on device")
        if failure == "keyboard_interrupt":
            error = KeyboardInterrupt()

        def writer(*args, **kwargs):
            raise error

        monkeypatch.setattr(hub_module, "save_file", writer)
        expected = type(error)
    with pytest.raises(expected):
        new.save_pretrained(tmp_path)
    assert _listing(tmp_path) == files, "temporary files left behind"
    assert _pair(tmp_path) == pair
    _assert_loads_as(tmp_path, old)


def test_interrupted_swap_still_loads(tmp_path, monkeypatch):
    # an interruption between the replaces of the re-save (after the new weights are in place)
    old = JointEBMPrior([(3,), (5,)], nef=4)
    old.save_pretrained(tmp_path)
    files = _listing(tmp_path)
    new = JointEBMPrior([(3,), (5,)], nef=6)
    replace, failed = os.replace, []

    def interrupted(src, dst):
        if Path(dst) == tmp_path / "config.json" and not failed:
            failed.append(dst)
            raise KeyboardInterrupt
        return replace(src, dst)

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        new.save_pretrained(tmp_path)
    monkeypatch.undo()
    assert failed and _listing(tmp_path) == files
    _assert_loads_as(tmp_path, new)  # the save completed: every file had been written


def test_crash_between_the_replaces_still_loads(tmp_path, monkeypatch):
    # config.json cannot be replaced at all (as after a crash between the replaces): the folder
    # holds the new weights and the old config, and loads as the new prior
    old = JointEBMPrior([(3,), (5,)], nef=4)
    old.save_pretrained(tmp_path)
    new = JointEBMPrior([(3,), (5,)], nef=6)
    replace = os.replace

    def broken(src, dst):
        if Path(dst) == tmp_path / "config.json":
            raise PermissionError(f"cannot write {dst}")
        return replace(src, dst)

    monkeypatch.setattr(os, "replace", broken)
    with pytest.raises(PermissionError):
        new.save_pretrained(tmp_path)
    monkeypatch.undo()
    assert json.loads((tmp_path / "config.json").read_text())["nef"] == [4, 4]
    _assert_loads_as(tmp_path, new)
    newer = JointEBMPrior([(3,), (5,)], nef=5)
    newer.save_pretrained(tmp_path)  # the next save cleans up
    assert _listing(tmp_path) == ["README.md", "config.json", "model.safetensors"]
    _assert_loads_as(tmp_path, newer)


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_saved_files_respect_the_umask(tmp_path, umask):
    previous = os.umask(umask)
    try:
        JointEBMPrior([(3,)], nef=2).save_pretrained(tmp_path / "prior")
        atomic_write(tmp_path / "file.bin", lambda tmp: Path(tmp).write_bytes(b"x"))
    finally:
        os.umask(previous)
    files = [*(tmp_path / "prior").iterdir(), tmp_path / "file.bin"]
    assert len(files) == 4
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path.name


def test_model_card_metadata_and_resave(tmp_path):
    fingerprint = {"adapter": "reference", "latent_shapes": [[3], [5]], "checkpoint_hash": None}
    old = JointEBMPrior([(3,), (5,)], nef=4, backbone=fingerprint)
    metrics = {"test_nll": 16.65, "fid": 25.9}
    old.save_pretrained(tmp_path, model_card_kwargs={"metrics": metrics, "datasets": ["digits"]})
    card = ModelCard.load(tmp_path / "README.md")
    data = card.data
    assert data.library_name == "ebm-prior" and "reference" in data.tags
    assert data.datasets == ["digits"]
    index = data.to_dict()["model-index"]
    results = index[0]["results"]
    assert {m["type"]: m["value"] for r in results for m in r["metrics"]} == metrics
    assert {r["dataset"]["name"] for r in results} == {"digits"}
    assert {(e.metric_type, e.metric_value) for e in data.eval_results} == set(metrics.items())
    for placeholder in ("path/to/this/folder", "github.com/ebm-prior"):
        assert placeholder not in card.content
    assert "width 4" in card.text

    # a re-save writes the new prior's card, not the old one
    JointEBMPrior([(3,), (5,)], nef=9).save_pretrained(tmp_path)
    card = ModelCard.load(tmp_path / "README.md")
    assert "width 9" in card.text and "width 4" not in card.text
    assert card.data.eval_results is None and "reference" not in card.data.tags


# -- loading: local paths and invalid configs -----------------------------------------------------


@pytest.mark.parametrize(
    "name", ["{tmp}/missing", "./missing", "~/no-such-ebm-prior-folder", "runs/prior", "a/b/c"]
)
def test_missing_local_path_is_an_error_naming_it(tmp_path, monkeypatch, name):
    def no_hub(*args, **kwargs):
        raise AssertionError("a local path was looked up on the Hub")

    import ebm_prior.prior

    monkeypatch.setattr(ebm_prior.prior, "hf_hub_download", no_hub, raising=False)
    monkeypatch.setattr(hub_module, "_hf_hub_download", no_hub, raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    name = name.format(tmp=tmp_path)
    with pytest.raises(FileNotFoundError, match=re.escape(name)):
        load_prior(name)
    with pytest.raises(FileNotFoundError, match=re.escape(str(Path(name)))):
        JointEBMPrior.from_pretrained(Path(name))


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: "{not json", r"not valid JSON"),
        (lambda c: [1, 2], r"not a JSON object"),
        (lambda c: {**c, "schema_version": 99}, r"schema_version 99.*upgrade ebm-prior"),
        (lambda c: {**c, "schema_version": -1}, r"'schema_version'.*-1"),
        (lambda c: {**c, "schema_version": 1.5}, r"'schema_version'.*1\.5"),
        (lambda c: {**c, "schema_version": "1"}, r"'schema_version'.*'1'"),
        (lambda c: {**c, "schema_version": True}, r"'schema_version'.*True"),
        (lambda c: {**c, "dropout": 0.1}, r"unknown key 'dropout'"),
        (lambda c: {**c, "nef": "100"}, r"'nef'.*'100'"),
        (lambda c: {**c, "nef": [4, "4"]}, r"'nef'"),
        (lambda c: {**c, "slope": "0.2"}, r"'slope'.*'0.2'"),
        (lambda c: {**c, "latent_shapes": [["3"], [5]]}, r"'latent_shapes'"),
        (lambda c: {**c, "num_layers": -1}, r"num_layers"),
        (lambda c: {**c, "sampler_config": {"train_steps": 2}}, r"'train_steps'"),
        (lambda c: {**c, "sampler_config": {"steps": "2"}}, r"'steps'"),
        (lambda c: {**c, "backbone": "reference"}, r"'backbone'"),
        (lambda c: {**c, "weights_sha256": 12}, r"'weights_sha256'"),
    ],
)
def test_invalid_config_is_refused_naming_file_and_key(tmp_path, edit, message):
    JointEBMPrior([(3,), (5,)], nef=4).save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    config = edit(json.loads(path.read_text()))
    path.write_text(config if isinstance(config, str) else json.dumps(config))
    with pytest.raises(PriorFileError, match=message) as info:
        JointEBMPrior.from_pretrained(tmp_path)
    assert str(path) in str(info.value)


# -- the reference backbone on disk and on the Hub ------------------------------------------------


def test_reference_vae_save_load(tmp_path):
    from safetensors.torch import save_file

    from ebm_prior.hub import file_sha256

    torch.manual_seed(0)
    vae = HierarchicalVAE.from_config("mnist", latent_dims=(4, 6), hidden=16, channels=4)
    vae.save_pretrained(tmp_path / "vae")
    assert _listing(tmp_path / "vae") == ["README.md", "config.json", "model.safetensors"]
    config = json.loads((tmp_path / "vae" / "config.json").read_text())
    assert config["model_type"] == "hierarchical-vae" and config["latent_dims"] == [4, 6]
    # the checkpoint hash is the weights file's SHA-256, the same as a plain save_file's
    save_file(vae.state_dict(), tmp_path / "plain.safetensors")
    digest = file_sha256(tmp_path / "plain.safetensors")
    assert config["weights_sha256"] == digest == vae.checkpoint_hash

    with torch.random.fork_rng():
        torch.manual_seed(1)
        loaded = HierarchicalVAE.from_pretrained(tmp_path / "vae")
    assert loaded.config == vae.config and loaded.fingerprint() == vae.fingerprint()
    for key, value in vae.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key

    # a prior bound to it loads onto the pulled VAE, not onto another checkpoint
    prior = JointEBMPrior(vae.latent_shapes, nef=4, backbone=vae.fingerprint())
    prior.save_pretrained(tmp_path / "prior")
    load_prior(tmp_path / "prior", backbone=loaded)
    other = HierarchicalVAE.from_config("mnist", latent_dims=(4, 6), hidden=16, channels=4)
    other_dir = tmp_path / "other"
    other.save_pretrained(other_dir)
    with pytest.raises(IncompatiblePriorError, match="checkpoint"):
        load_prior(tmp_path / "prior", backbone=HierarchicalVAE.from_pretrained(other_dir))

    # each class refuses the other's folder; a corrupted file is refused
    with pytest.raises(PriorFileError, match="hierarchical-vae"):
        JointEBMPrior.from_pretrained(tmp_path / "vae")
    with pytest.raises(PriorFileError, match="model_type"):
        HierarchicalVAE.from_pretrained(tmp_path / "prior")
    data = bytearray((tmp_path / "vae" / "model.safetensors").read_bytes())
    data[-3] ^= 0xFF
    (tmp_path / "vae" / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(PriorFileError, match="SHA-256"):
        HierarchicalVAE.from_pretrained(tmp_path / "vae")
    (tmp_path / "vae" / "model.safetensors").unlink()
    (tmp_path / "vae" / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(PriorFileError, match="no model.safetensors"):
        HierarchicalVAE.from_pretrained(tmp_path / "vae")


def test_reference_vae_push_pull(hub, tmp_path):
    server, env = hub
    run(
        """
        from ebm_prior import EpsLangevin
        vae, prior = make(4)
        vae.checkpoint_hash = None
        vae.push_to_hub("erin/digits-vae")
        push_prior(prior, "erin/digits-prior", backbone=vae)
        torch.save(probe(prior), sys.argv[0] + ".expected.pt")
        torch.save(vae.state_dict(), sys.argv[0] + ".vae.pt")
        other, _ = make(5)
        other.push_to_hub("erin/other-vae")
        """,
        env,
        tmp_path,
    )
    out = run(
        """
        from ebm_prior import EpsLangevin
        vae = HierarchicalVAE.from_pretrained("erin/digits-vae")
        expected = torch.load(sys.argv[0] + ".vae.pt")
        assert all(torch.equal(vae.state_dict()[k], v) for k, v in expected.items())
        prior = load_prior("erin/digits-prior", backbone=vae)
        assert torch.equal(probe(prior), torch.load(sys.argv[0] + ".expected.pt"))
        out = EpsLangevin(prior, vae, **prior.sampler_config, steps=2)(vae.sample_eps(3))
        assert vae.decode(out.z).shape == (3, 1, 8, 8)
        try:
            load_prior("erin/digits-prior", backbone=HierarchicalVAE.from_pretrained(
                "erin/other-vae"))
            raise SystemExit("a prior for another checkpoint must be refused")
        except IncompatiblePriorError as e:
            assert "checkpoint" in str(e)
        card = Path(HfApi().hf_hub_download("erin/digits-vae", "README.md")).read_text()
        print(json.dumps({"card": card, "hash": vae.checkpoint_hash}))
        """,
        env,
        tmp_path,
    )
    result = json.loads(out.splitlines()[-1])
    assert len(result["hash"]) == 64
    assert 'HierarchicalVAE.from_pretrained("erin/digits-vae")' in result["card"]
