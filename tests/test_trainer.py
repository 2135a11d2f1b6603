"""The two-stage trainer: exact resume, world-size invariance, atomic checkpoints, errors."""

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from ebm_prior import HierarchicalVAE, JointEBMPrior, TrainingDivergenceError, TwoStageTrainer
from ebm_prior import trainer as trainer_module

HERE = Path(__file__).resolve().parent


def data(n: int = 48) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    return torch.rand(n, 1, 8, 8, generator=gen).round().double()


def make(*, init_seed: int = 0, joint: bool = False, x=None, **kwargs) -> TwoStageTrainer:
    torch.manual_seed(123)  # the backbone: the same in every call
    vae = HierarchicalVAE.from_config("digits").double()
    torch.manual_seed(init_seed)  # the prior's initial weights
    prior = JointEBMPrior(vae.latent_shapes, nef=16).double()
    options = dict(
        batch_size=8, chunk_size=4, lr=1e-3, betas=(0.5, 0.999), weight_decay=1e-4, reg=0.01,
        langevin_steps=4, step_size=0.2, seed=7, progress=False,
    )  # fmt: skip
    if joint:
        options["backbone_prior_params"] = vae.prior_nets.parameters()
    options.update(kwargs)
    return TwoStageTrainer(prior, vae, data() if x is None else x, **options)


def state(trainer: TwoStageTrainer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in trainer.prior.state_dict().items()}


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("joint", [False, True])
def test_resume_is_exact(tmp_path, joint):
    straight = make(joint=joint, checkpoint_dir=tmp_path / "a", checkpoint_every=2)
    straight.fit(5)
    first = make(joint=joint, checkpoint_dir=tmp_path / "b", checkpoint_every=2)
    first.fit(3)  # checkpoints at 2 and at the end (3)
    # a fresh process: other initial weights, overwritten by the checkpoint
    resumed = make(joint=joint, init_seed=99, checkpoint_dir=tmp_path / "b", checkpoint_every=2)
    assert resumed.step == 0
    resumed.fit(5)
    assert resumed.step == 5
    assert_same(state(straight), state(resumed))
    if joint:
        for p, q in zip(straight.b_params, resumed.b_params, strict=True):
            assert torch.equal(p, q)
    assert [h["loss"] for h in straight.history] == [h["loss"] for h in resumed.history]
    # the optimizer's moments came back too (otherwise the steps after 3 would differ)
    assert resumed.optimizer.state_dict()["state"][0]["step"] == 5


def test_training_changes_the_prior_and_only_the_prior():
    trainer = make()
    before = state(trainer)
    backbone = {k: v.clone() for k, v in trainer.backbone.state_dict().items()}
    history = trainer.fit(2)
    assert len(history) == 2 and all(torch.isfinite(torch.tensor(h["loss"])) for h in history)
    after = state(trainer)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert_same(backbone, trainer.backbone.state_dict())
    assert all(p.grad is None for p in trainer.backbone.parameters())


def test_joint_prior_fine_tunes_only_the_given_backbone_parameters():
    trainer = make(joint=True, backbone_prior_lr=1e-2)
    vae = trainer.backbone
    prior_nets = {k: v.clone() for k, v in vae.prior_nets.state_dict().items()}
    decoder = {k: v.clone() for k, v in vae.decoder.state_dict().items()}
    stats = trainer.fit(2)[-1]
    assert {"log_p_pos", "log_p_neg"} <= stats.keys()
    assert_same(decoder, vae.decoder.state_dict())
    assert any(not torch.equal(prior_nets[k], v) for k, v in vae.prior_nets.state_dict().items())
    assert trainer.optimizer.param_groups[1]["lr"] == 1e-2


def test_chunks_accumulate_the_full_batch_gradient():
    # one chunk of 8 vs two chunks of 4 with the sampler off: the same positives and
    # negatives up to the random streams, so compare against a hand-computed gradient
    trainer = make(chunk_size=4, langevin_steps=0)
    trainer.optimizer.zero_grad()
    x = trainer._fetch(trainer.batch_indices(0))
    for c in range(2):
        trainer._chunk(0, c, x[4 * c : 4 * c + 4])
    got = [p.grad.clone() for p in trainer.prior.parameters()]
    trainer.optimizer.zero_grad()
    total = 0
    for c in range(2):
        gen = torch.Generator().manual_seed(trainer_module.derive_seed(7, 1, 0, c))
        z_neg = trainer.backbone.eps_to_z(trainer.backbone.sample_eps(4, generator=gen))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(trainer_module.derive_seed(7, 2, 0, c))
            with torch.no_grad():
                z_pos = trainer.backbone.posterior(x[4 * c : 4 * c + 4]).z
        f_pos, f_neg = trainer.prior(z_pos), trainer.prior(z_neg)
        total = total + (f_neg - f_pos).sum() + 0.01 * (f_neg**2 + f_pos**2).sum()
    (total / 8).backward()
    for g, p in zip(got, trainer.prior.parameters(), strict=True):
        torch.testing.assert_close(g, p.grad, rtol=1e-12, atol=1e-12)


def test_batches_cover_each_epoch_once():
    trainer = make(batch_size=8, x=data(20))  # 2 full batches per epoch, 4 examples dropped
    assert trainer.steps_per_epoch == 2
    epoch0 = torch.cat([trainer.batch_indices(0), trainer.batch_indices(1)])
    assert len(set(epoch0.tolist())) == 16
    assert not torch.equal(trainer.batch_indices(0), trainer.batch_indices(2))
    assert torch.equal(trainer.batch_indices(3), make(x=data(20)).batch_indices(3))


def test_dataset_input_matches_tensor_input():
    x = data()
    dataset = torch.utils.data.TensorDataset(x, torch.zeros(len(x)))  # items are (x, y)
    a, b = make(x=x), make(x=dataset)
    a.fit(2)
    b.fit(2)
    assert_same(state(a), state(b))


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    trainer = make(checkpoint_dir=tmp_path, checkpoint_every=1)
    trainer.fit(1)
    path = tmp_path / "trainer.pt"
    good = path.read_bytes()

    def broken_save(obj, f):
        Path(f).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(trainer_module.torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        trainer.fit(2)
    assert path.read_bytes() == good
    assert sorted(os.listdir(tmp_path)) == ["trainer.pt"]  # no temporary file left behind
    monkeypatch.undo()
    fresh = make(checkpoint_dir=tmp_path)
    fresh.load_checkpoint()
    assert fresh.step == 1


def test_resume_with_another_configuration_names_the_difference(tmp_path):
    make(checkpoint_dir=tmp_path).fit(1)
    other = make(checkpoint_dir=tmp_path, lr=5e-4, langevin_steps=9)
    with pytest.raises(ValueError, match=r"lr: checkpoint 0\.001, now 0\.0005") as info:
        other.fit(2)
    assert "sampler.steps: checkpoint 4, now 9" in str(info.value)
    make(checkpoint_dir=tmp_path, lr=5e-4).fit(1, resume=False)  # explicit fresh start works


def test_corrupt_checkpoint_is_reported(tmp_path):
    (tmp_path / "trainer.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read trainer checkpoint"):
        make(checkpoint_dir=tmp_path).fit(1)


def test_non_finite_loss_names_the_step():
    x = data()
    trainer = make(x=x)
    trainer.fit(2)
    x[:] = float("nan")  # every later batch is NaN
    with pytest.raises(TrainingDivergenceError, match="step 2: the loss of chunk 0"):
        trainer.fit(3)
    assert trainer.step == 2


def test_non_finite_gradient_names_the_parameter():
    trainer = make(langevin_steps=0)
    name, param = list(trainer.prior.named_parameters())[-1]
    param.register_hook(lambda g: g * float("nan"))  # a finite loss whose backward breaks
    with pytest.raises(
        TrainingDivergenceError, match=rf"step 0: the gradient of prior\.{name} is not"
    ):
        trainer.fit(1)
    assert trainer.step == 0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"chunk_size": 3}, "chunk_size must be a positive int dividing batch_size=8"),
        ({"batch_size": 100}, "fewer than batch_size"),
        ({"checkpoint_every": 0}, "checkpoint_every"),
        ({"backbone_prior_params": [torch.nn.Parameter(torch.zeros(1))]}, r"\[0\] is not a"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make(**kwargs)


def test_prior_must_fit_the_backbone():
    vae = HierarchicalVAE.from_config("digits")
    with pytest.raises(ValueError, match=r"prior latent shapes \[\(4,\), \(16,\)\]"):
        TwoStageTrainer(JointEBMPrior([(4,), (16,)]), vae, torch.zeros(8, 1, 8, 8), batch_size=8)


def _torchrun(tmp_path: Path, nproc: int, chunk: int | str) -> dict:
    out = tmp_path / f"prior-{nproc}.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(HERE / "_ddp_trainer.py"), str(out), str(chunk)]
    if nproc > 1:
        cmd[1:1] = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    subprocess.run(cmd, check=True, env=env, timeout=300, cwd=tmp_path)
    return torch.load(out, weights_only=True)


def test_two_processes_learn_the_same_prior_as_one(tmp_path):
    one = _torchrun(tmp_path, 1, chunk=4)
    two = _torchrun(tmp_path, 2, chunk=4)  # rank r runs chunk r of each global batch of 8
    for k in one["prior"]:
        torch.testing.assert_close(one["prior"][k], two["prior"][k], rtol=1e-12, atol=1e-12)
    for a, b in zip(one["history"], two["history"], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-12, abs=1e-12)


def test_collectives_return_after_gloo_lets_go_of_the_tensors(tmp_path):
    # gloo's worker thread drops its tensor references after the work completes; if that
    # happens during interpreter shutdown the process aborts. A plain all_reduce returns before
    # the drop in a good fraction of calls; the trainer's collectives must never do.
    released = _torchrun(tmp_path, 2, chunk="release")["released"]
    assert len(released) == 200 and all(released), f"{released.count(False)} of 200 not released"


def test_collective_stops_waiting_for_a_release_that_never_comes(monkeypatch):
    held, sleeps = [], []

    class Work:
        def wait(self):
            return True

    def op(t, async_op):  # a backend that never lets go of the tensor
        held.append(t)
        return Work()

    monkeypatch.setattr(trainer_module, "_WAIT_FOR_RELEASE", True)
    monkeypatch.setattr(trainer_module, "_RELEASE_TIMEOUT_S", 0.05)
    sleep = trainer_module.time.sleep
    monkeypatch.setattr(trainer_module.time, "sleep", lambda s: sleeps.append(s) or sleep(s))
    t = torch.zeros(3)
    with pytest.warns(RuntimeWarning, match="still holds the tensors"):
        trainer_module._collective([t], op)
    assert trainer_module._WAIT_FOR_RELEASE is False and len(sleeps) > 0
    waited = len(sleeps)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trainer_module._collective([t], op)  # no second wait, no second warning
    assert len(sleeps) == waited and len(held) == 2
