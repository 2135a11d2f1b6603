"""The trainer in every regime: exact resume, chunked gradients, world-size invariance, atomic
checkpoints, errors."""

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from ebm_prior import (
    EpsLangevin,
    HierarchicalVAE,
    JointEBMPrior,
    LangevinDivergenceError,
    Posterior,
    Trainer,
    TrainingDivergenceError,
    TwoStageTrainer,
    backbone_prior_loss,
    ebm_loss,
    joint_loss,
    mle_loss,
    sample_posterior,
)
from ebm_prior import trainer as trainer_module

HERE = Path(__file__).resolve().parent

#: Every regime, with the backbone parameter groups it trains: b = the backbone's prior,
#: g = the generator (decoder), e = the encoder.
VARIANTS = {
    "two_stage": dict(regime="two_stage", groups=""),
    "two_stage+b": dict(regime="two_stage", groups="b"),
    "mle": dict(regime="mle", groups="gb"),
    "mle+persistent": dict(regime="mle", groups="gb", persistent=True, posterior_mala=True),
    "mle-gaussian": dict(regime="mle", groups="gb", prior=None),
    "joint": dict(regime="joint", groups="gbe"),
}
DDP_VARIANTS = ["two_stage+b", "mle+persistent", "joint"]


def data(n: int = 48) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    return torch.rand(n, 1, 8, 8, generator=gen).round().double()


def modules(vae: HierarchicalVAE) -> dict[str, list[torch.nn.Module]]:
    return {"b": [vae.prior_nets], "g": [vae.decoder], "e": [vae.encoder_x, vae.encoder_z]}


def make(variant: str = "two_stage", *, init_seed: int = 0, x=None, **kwargs) -> Trainer:
    spec = dict(VARIANTS[variant])
    regime, groups = spec.pop("regime"), spec.pop("groups")
    torch.manual_seed(123)  # the backbone: the same in every call
    vae = HierarchicalVAE.from_config("digits").double()
    torch.manual_seed(init_seed)  # the prior's initial weights, and those of the trained groups
    prior = JointEBMPrior(vae.latent_shapes, nef=16).double()
    if spec.pop("prior", prior) is None:
        prior = None
    if init_seed:
        with torch.no_grad():
            for key in groups:
                for m in modules(vae)[key]:
                    for p in m.parameters():
                        p.add_(0.1 * torch.randn_like(p))
    options = dict(
        batch_size=8, chunk_size=4, lr=1e-3, betas=(0.5, 0.999), weight_decay=1e-4, reg=0.01,
        langevin_steps=4, step_size=0.2, seed=7, progress=False,
    )  # fmt: skip
    params = {key: [p for m in modules(vae)[key] for p in m.parameters()] for key in groups}
    if "b" in params:
        options["backbone_prior_params"] = params["b"]
    if regime == "two_stage":
        options.update(kwargs)
        return TwoStageTrainer(prior, vae, data() if x is None else x, **options)
    if "g" in params:
        options.update(generator_params=params["g"], generator_lr=2e-3)
    if "e" in params:
        options.update(encoder_params=params["e"], encoder_lr=3e-3)
    if regime == "mle":
        options.update(posterior_steps=3, posterior_step_size=0.1)
    options.update(backbone_prior_lr=1.5e-3, **spec)
    options.update(kwargs)
    return Trainer(prior, vae, data() if x is None else x, regime=regime, **options)


def trained(trainer: Trainer) -> dict[str, torch.Tensor]:
    r"""Every trained tensor: the energy, the trained backbone groups, the persistent chains."""

    out = {n: p.detach().clone() for n, p in trainer._named_trained()}
    out.update({f"chains.{i}": z.clone() for i, z in enumerate(trainer.chains)})
    return out


def state(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in trainer.prior.state_dict().items()}


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("variant", VARIANTS)
def test_resume_is_exact(tmp_path, variant):
    straight = make(variant, checkpoint_dir=tmp_path / "a", checkpoint_every=2)
    straight.fit(5)
    first = make(variant, checkpoint_dir=tmp_path / "b", checkpoint_every=2)
    first.fit(3)  # checkpoints at 2 and at the end (3)
    # a fresh process: other initial weights (energy and trained backbone groups), overwritten
    # by the checkpoint; persistent chains come from the checkpoint too
    resumed = make(variant, init_seed=99, checkpoint_dir=tmp_path / "b", checkpoint_every=2)
    assert resumed.step == 0
    assert any(not torch.equal(a, b) for a, b in zip(trained(first).values(),
                                                     trained(resumed).values()))  # fmt: skip
    resumed.fit(5)
    assert resumed.step == 5
    assert_same(trained(straight), trained(resumed))
    assert [h["loss"] for h in straight.history] == [h["loss"] for h in resumed.history]
    # the optimizer's moments came back too (otherwise the steps after 3 would differ)
    assert resumed.optimizer.state_dict()["state"][0]["step"] == 5


def full_batch_gradient(trainer: Trainer, step: int = 0) -> list[torch.Tensor]:
    r"""The gradient of step ``step``'s loss over the whole global batch at once, computed with
    the public losses from the chunks' keyed draws (the documented scheme)."""

    derive, seed, n = trainer_module.derive_seed, trainer.seed, trainer.chunk_size
    prior, vae = trainer.prior, trainer.backbone
    idx = trainer.batch_indices(step)
    x = trainer._fetch(idx)
    z_pos, z_neg, log_q = [], [], []
    for c in range(trainer.batch_size // n):
        xc, ic = x[c * n : (c + 1) * n], idx[c * n : (c + 1) * n]
        gen = torch.Generator().manual_seed(derive(seed, 1, step, c))
        if prior is None:
            z_neg.append(vae.eps_to_z(vae.sample_eps(n, generator=gen)))
        else:
            sampler = EpsLangevin(prior, vae, generator=gen, **trainer.sampler_kwargs)
            z_neg.append(sampler(vae.sample_eps(n, generator=gen)).z)
        if trainer.regime == "mle":
            gen = torch.Generator().manual_seed(derive(seed, 3, step, c))
            z0 = [z[ic] for z in trainer.chains] if trainer.persistent else None
            z_pos.append(
                sample_posterior(prior, vae, xc, z0, generator=gen, **trainer.posterior_kwargs).z
            )
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(derive(seed, 2, step, c))
                post = vae.posterior(xc)
            z_pos.append(post.z)
            log_q.append(post.log_q)
    z_pos = [torch.cat(z) for z in zip(*z_pos)]
    z_neg = [torch.cat(z) for z in zip(*z_neg)]
    if trainer.regime == "two_stage":
        loss = ebm_loss(prior, z_pos, z_neg, reg=trainer.reg).loss
        if trainer.b_params:
            loss = loss + backbone_prior_loss(vae, [z.detach() for z in z_pos], z_neg).loss
    elif trainer.regime == "mle":
        loss = mle_loss(prior, vae, x, z_pos, z_neg, reg=trainer.reg).loss
    else:
        post = Posterior(z_pos, torch.cat(log_q))
        loss = joint_loss(prior, vae, x, z_neg, posterior=post, reg=trainer.reg).loss
    params = [p for _, p in trainer._named_trained()]
    return list(torch.autograd.grad(loss, params))


@pytest.mark.parametrize("variant", VARIANTS)
def test_chunks_accumulate_the_full_batch_gradient(variant):
    r"""Two chunks of 4, each back-propagating its share, give the gradient of the loss over the
    batch of 8 computed at once from the same draws (float64, to 1e-12)."""

    trainer = make(variant, chunk_size=4)
    trainer.fit(1)  # start from a trained state (moved chains, non-zero optimizer moments)
    expected = full_batch_gradient(trainer, step=1)
    trainer.train_step()  # leaves the accumulated gradient in .grad
    got = [p.grad for _, p in trainer._named_trained()]
    assert len(got) == len(expected) > 0
    for (name, _), g, e in zip(trainer._named_trained(), got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12, msg=name)
    assert any(e.abs().sum() > 0 for e in expected)
    # the same comparison fails for a draw the documented scheme does not make
    other = make(variant, chunk_size=4, seed=8)
    other.fit(1)
    assert any(not torch.allclose(a, b) for a, b in zip(full_batch_gradient(other, 1), got))


@pytest.mark.parametrize("variant", VARIANTS)
def test_training_changes_exactly_the_named_parameters(variant):
    trainer = make(variant)
    vae = trainer.backbone
    groups = VARIANTS[variant]["groups"]
    before = {k: [p.clone() for m in ms for p in m.parameters()] for k, ms in modules(vae).items()}
    prior_before = None if trainer.prior is None else state(trainer)
    history = trainer.fit(2)
    assert len(history) == 2 and all(torch.isfinite(torch.tensor(h["loss"])) for h in history)
    for key, ms in modules(vae).items():
        after = [p for m in ms for p in m.parameters()]
        changed = any(not torch.equal(a, b) for a, b in zip(before[key], after, strict=True))
        assert changed == (key in groups), key
        if key not in groups:
            assert all(p.grad is None and not p.requires_grad for p in after), key
    if prior_before is not None:
        assert any(not torch.equal(prior_before[k], v) for k, v in state(trainer).items())
    lrs = [g["lr"] for g in trainer.optimizer.param_groups]
    expected = {  # energy, backbone prior, generator, encoder
        "two_stage": [1e-3], "two_stage+b": [1e-3, 1e-3], "mle-gaussian": [1.5e-3, 2e-3],
        "joint": [1e-3, 1.5e-3, 2e-3, 3e-3],
    }.get(variant, [1e-3, 1.5e-3, 2e-3])  # fmt: skip
    assert lrs == expected
    assert trainer.backbone.training is False


def test_two_stage_trainer_is_the_two_stage_regime():
    a = make("two_stage+b")
    assert isinstance(a, Trainer) and a.regime == "two_stage"
    torch.manual_seed(123)
    vae = HierarchicalVAE.from_config("digits").double()
    torch.manual_seed(0)
    prior = JointEBMPrior(vae.latent_shapes, nef=16).double()
    b = Trainer(
        prior, vae, data(), regime="two_stage", batch_size=8, chunk_size=4, lr=1e-3,
        betas=(0.5, 0.999), weight_decay=1e-4, reg=0.01, langevin_steps=4, step_size=0.2,
        seed=7, progress=False, backbone_prior_params=vae.prior_nets.parameters(),
    )  # fmt: skip
    assert a.config == b.config
    a.fit(2)
    b.fit(2)
    assert_same(trained(a), trained(b))


def test_regime_defaults_are_the_documented_ones():
    torch.manual_seed(0)
    vae = HierarchicalVAE.from_config("digits")
    prior = JointEBMPrior(vae.latent_shapes, nef=8)
    x = torch.zeros(8, 1, 8, 8)
    mle = Trainer(prior, vae, x, regime="mle", batch_size=8,
                  generator_params=vae.decoder.parameters(),
                  backbone_prior_params=vae.prior_nets.parameters())  # fmt: skip
    assert [g["lr"] for g in mle.optimizer.param_groups] == [2e-5, 1e-4, 1e-4]
    assert mle.optimizer.defaults["betas"] == (0.9, 0.999)
    assert (mle.sampler_kwargs["steps"], mle.sampler_kwargs["step_size"]) == (60, 0.4)
    assert mle.posterior_kwargs == {"steps": 40, "step_size": 0.1, "mala": False}
    two = Trainer(prior, vae, x, regime="two_stage", batch_size=8)
    assert [g["lr"] for g in two.optimizer.param_groups] == [1e-4]
    assert (two.sampler_kwargs["steps"], two.sampler_kwargs["step_size"]) == (20, 0.1)


@pytest.mark.parametrize("variant", ["two_stage", "mle+persistent"])
def test_dataset_input_matches_tensor_input(variant):
    x = data()
    dataset = torch.utils.data.TensorDataset(x, torch.zeros(len(x)))  # items are (x, y)
    a, b = make(variant, x=x), make(variant, x=dataset)
    a.fit(2)
    b.fit(2)
    assert_same(trained(a), trained(b))


def test_persistent_chains_move_and_persist():
    trainer = make("mle+persistent")
    start = [z.clone() for z in trainer.chains]
    trainer.fit(1)
    idx = trainer.batch_indices(0)
    rest = torch.ones(len(start[0]), dtype=torch.bool)
    rest[idx] = False
    for z0, z in zip(start, trainer.chains, strict=True):
        assert not torch.equal(z0[idx], z[idx])  # the batch's chains moved
        assert torch.equal(z0[rest], z[rest])  # the others did not


def test_batches_cover_each_epoch_once():
    trainer = make(x=data(20))  # 2 full batches per epoch, 4 examples dropped
    assert trainer.steps_per_epoch == 2
    epoch0 = torch.cat([trainer.batch_indices(0), trainer.batch_indices(1)])
    assert len(set(epoch0.tolist())) == 16
    assert not torch.equal(trainer.batch_indices(0), trainer.batch_indices(2))
    assert torch.equal(trainer.batch_indices(3), make(x=data(20)).batch_indices(3))


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


def test_resume_in_another_regime_names_the_difference(tmp_path):
    make("mle+persistent", checkpoint_dir=tmp_path).fit(1)
    with pytest.raises(ValueError, match="posterior.persistent: checkpoint True, now False"):
        make("mle", checkpoint_dir=tmp_path).fit(2)
    with pytest.raises(ValueError, match="regime: checkpoint 'mle', now 'joint'"):
        make("joint", checkpoint_dir=tmp_path).fit(2)
    with pytest.raises(ValueError, match="regime: checkpoint 'mle', now 'two_stage'"):
        make("two_stage", checkpoint_dir=tmp_path).fit(2)


def test_checkpoints_written_before_regimes_still_resume(tmp_path):
    r"""Two-stage checkpoints carry no ``regime`` and no new keys; they resume exactly."""

    straight = make("two_stage+b")
    straight.fit(3)
    first = make("two_stage+b", checkpoint_dir=tmp_path)
    first.fit(2)
    old = torch.load(tmp_path / "trainer.pt", weights_only=True)
    del old["config"]["regime"]
    assert set(old) == {"format", "step", "prior", "backbone_prior", "optimizer", "history",
                        "config"}  # fmt: skip
    torch.save(old, tmp_path / "trainer.pt")
    resumed = make("two_stage+b", init_seed=5, checkpoint_dir=tmp_path)
    resumed.fit(3)
    assert_same(trained(straight), trained(resumed))


def test_corrupt_checkpoint_is_reported(tmp_path):
    (tmp_path / "trainer.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read trainer checkpoint"):
        make(checkpoint_dir=tmp_path).fit(1)


@pytest.mark.parametrize("variant", ["two_stage", "joint"])
def test_non_finite_loss_names_the_step(variant):
    x = data()
    trainer = make(variant, x=x)
    trainer.fit(2)
    before = trained(trainer)
    x[:] = float("nan")  # every later batch is NaN
    with pytest.raises(TrainingDivergenceError, match="step 2: the loss of chunk 0"):
        trainer.fit(3)
    assert trainer.step == 2
    assert_same(before, trained(trainer))


def test_diverging_posterior_chains_name_the_step_and_chunk():
    x = data()
    trainer = make("mle+persistent", x=x)
    trainer.fit(1)
    before = trained(trainer)
    x[:] = float("nan")
    with pytest.raises(LangevinDivergenceError) as info:
        trainer.fit(2)
    if sys.version_info >= (3, 11):
        assert "(in chunk 0 of training step 1)" in info.value.__notes__
    assert trainer.step == 1
    assert_same(before, trained(trainer))  # nor the chains nor the weights moved


@pytest.mark.parametrize(
    "variant, module", [("two_stage", "prior"), ("mle", "decoder"), ("joint", "encoder_x")]
)
def test_non_finite_gradient_names_the_parameter(variant, module):
    trainer = make(variant, langevin_steps=0)
    name, param = [(n, p) for n, p in trainer._named_trained() if f".{module}." in f".{n}"][-1]
    param.register_hook(lambda g: g * float("nan"))  # a finite loss whose backward breaks
    with pytest.raises(TrainingDivergenceError, match=rf"step 0: the gradient of {name} is not"):
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


def test_bad_regime_options():
    torch.manual_seed(0)
    vae = HierarchicalVAE.from_config("digits")
    prior = JointEBMPrior(vae.latent_shapes, nef=8)
    x = torch.zeros(8, 1, 8, 8)
    dec, enc = list(vae.decoder.parameters()), list(vae.encoder_x.parameters())

    def build(regime, prior=prior, **kwargs):
        return Trainer(prior, vae, x, regime=regime, batch_size=8, **kwargs)

    with pytest.raises(ValueError, match="regime must be one of"):
        build("vae")
    with pytest.raises(ValueError, match="regime='joint' needs a prior"):
        build("joint", prior=None, generator_params=dec)
    with pytest.raises(ValueError, match="encoder_params: not an option of regime='mle'"):
        build("mle", encoder_params=enc)
    with pytest.raises(ValueError, match="generator_params, persistent: not an option of"):
        build("two_stage", generator_params=dec, persistent=True)
    with pytest.raises(ValueError, match="posterior_steps: not an option of regime='joint'"):
        build("joint", posterior_steps=3)
    with pytest.raises(ValueError, match=r"generator_params\[0\] \(backbone\.decoder\..*\) is "
                       "also in backbone_prior_params"):  # fmt: skip
        build("mle", backbone_prior_params=dec, generator_params=dec[:1])
    with pytest.raises(ValueError, match="nothing to train"):
        build("mle", prior=None)


def test_prior_must_fit_the_backbone():
    vae = HierarchicalVAE.from_config("digits")
    with pytest.raises(ValueError, match=r"prior latent shapes \[\(4,\), \(16,\)\]"):
        TwoStageTrainer(JointEBMPrior([(4,), (16,)]), vae, torch.zeros(8, 1, 8, 8), batch_size=8)


def _torchrun(tmp_path: Path, nproc: int, chunk: int | str) -> dict:
    out = tmp_path / f"trained-{nproc}.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(HERE / "_ddp_trainer.py"), str(out), str(chunk), *DDP_VARIANTS]
    if nproc > 1:
        cmd[1:1] = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    subprocess.run(cmd, check=True, env=env, timeout=300, cwd=tmp_path)
    return torch.load(out, weights_only=True)


def test_two_processes_learn_the_same_as_one(tmp_path):
    r"""In every regime (two-stage with the backbone prior, MLE with persistent chains, joint),
    2 gloo processes learn the same energy, backbone groups and chains as 1."""

    one = _torchrun(tmp_path, 1, chunk=4)
    two = _torchrun(tmp_path, 2, chunk=4)  # rank r runs chunk r of each global batch of 8
    assert sorted(one) == sorted(two) == sorted(DDP_VARIANTS)
    for variant in DDP_VARIANTS:
        a, b = one[variant], two[variant]
        assert a["trained"].keys() == b["trained"].keys()
        assert any(k.startswith("chains") for k in a["trained"]) == ("persistent" in variant)
        for k in a["trained"]:
            torch.testing.assert_close(
                a["trained"][k], b["trained"][k], rtol=1e-12, atol=1e-12, msg=f"{variant} {k}"
            )
        for x, y in zip(a["history"], b["history"], strict=True):
            assert x["loss"] == pytest.approx(y["loss"], rel=1e-12, abs=1e-12)


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
