"""The trainer in every regime: exact resume, chunked gradients, world-size invariance, atomic
checkpoints, errors."""

import inspect
import logging
import math
import os
import subprocess
import sys
import time
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
    ula_gaussian_bias,
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
    "joint-gaussian": dict(regime="joint", groups="gbe", prior=None),
}
DDP_VARIANTS = ["two_stage+b", "mle+persistent", "joint", "joint-gaussian"]


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
    x = trainer.data[idx]
    z_pos, z_neg, log_q = [], [], []
    for c in range(trainer.batch_size // n):
        xc, ic = x[c * n : (c + 1) * n], idx[c * n : (c + 1) * n]
        gen = torch.Generator().manual_seed(derive(seed, 1, step, c))
        if prior is None and trainer.regime == "joint":
            pass  # the Gaussian-prior ELBO draws no negatives
        elif prior is None:
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
    if trainer.regime == "joint" and prior is None:  # the backbone's own ELBO
        post = Posterior(z_pos, torch.cat(log_q))
        loss = -(vae.log_likelihood(x, post.z) + vae.log_prior(post.z) - post.log_q).mean()
    elif trainer.regime == "two_stage":
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
        "joint": [1e-3, 1.5e-3, 2e-3, 3e-3], "joint-gaussian": [1.5e-3, 2e-3, 3e-3],
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


@pytest.mark.parametrize("regime", ["mle", "joint", "two_stage"])
def test_eq6_from_a_biased_chain_warns(regime):
    """Learning the backbone prior from unadjusted negatives whose own bias exceeds 0.1 nats
    warns with the bias and the fix; MALA, a small step or no backbone prior does not."""

    torch.manual_seed(0)
    vae = HierarchicalVAE.from_config("digits")
    prior = JointEBMPrior(vae.latent_shapes, nef=8)
    x = torch.zeros(8, 1, 8, 8)
    dim = sum(math.prod(s) for s in vae.latent_shapes)

    def make(**kw):
        return Trainer(prior, vae, x, regime=regime, batch_size=8, langevin_steps=20, **kw)

    b = dict(backbone_prior_params=list(vae.prior_nets.parameters()))  # reused by every call
    bias = ula_gaussian_bias(dim, 0.6, 20)
    assert bias > 0.1
    with pytest.warns(UserWarning, match=rf"{dim} latent dimensions.* {bias:.2f} nats.*--mala"):
        make(step_size=0.6, **b)
    assert ula_gaussian_bias(dim, 0.05, 20) <= 0.1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make(step_size=0.6, mala=True, **b)
        make(step_size=0.05, **b)
        make(
            step_size=0.6,
            **({} if regime == "two_stage" else {"generator_params": vae.decoder.parameters()}),
        )


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
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]  # none left behind
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


@pytest.mark.parametrize("variant, loss", [("two_stage", "ebm_loss"), ("joint", "joint_loss")])
def test_non_finite_loss_names_the_step(variant, loss, monkeypatch):
    trainer = make(variant)
    trainer.fit(2)
    before = trained(trainer)
    real = getattr(trainer_module, loss)

    def broken(*args, **kwargs):  # the loss of every later chunk is NaN
        out = real(*args, **kwargs)
        return out._replace(loss=out.loss * float("nan"))

    monkeypatch.setattr(trainer_module, loss, broken)
    with pytest.raises(TrainingDivergenceError, match="step 2: the loss of chunk 0"):
        trainer.fit(3)
    assert trainer.step == 2
    assert_same(before, trained(trainer))


def test_diverging_posterior_chains_name_the_step_and_chunk(monkeypatch):
    trainer = make("mle+persistent")
    trainer.fit(1)
    before = trained(trainer)
    vae = trainer.backbone
    monkeypatch.setattr(vae, "_log_likelihood", lambda x, z: torch.full((len(x),), torch.nan))
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
        ({"num_workers": -1}, "num_workers must be an int >= 0"),
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
    with pytest.raises(ValueError, match="regime='two_stage' needs a prior"):
        build("two_stage", prior=None)
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


# -- data --------------------------------------------------------------------------------------


class Counting(torch.utils.data.Dataset):
    r"""A map-style dataset over a tensor whose items are ``(x, 0)``; records every index it is
    asked for."""

    def __init__(self, x: torch.Tensor):
        self.x, self.fetched = x, []

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        self.fetched.append(int(i))
        return self.x[i], 0


def test_resume_with_loader_workers_is_exact(tmp_path):
    r"""A dataset read by 2 loader workers, interrupted mid-epoch (6 steps per epoch, checkpoint
    at step 3) and resumed with workers again, learns bit for bit what a tensor read in the main
    process learns without interruption."""

    straight = make("mle+persistent")
    straight.fit(5)
    dataset = torch.utils.data.TensorDataset(data(), torch.zeros(48))
    first = make("mle+persistent", x=dataset, num_workers=2, checkpoint_dir=tmp_path)
    first.fit(3)
    resumed = make("mle+persistent", init_seed=99, x=dataset, num_workers=2,
                   checkpoint_dir=tmp_path)  # fmt: skip
    resumed.fit(5)
    assert_same(trained(straight), trained(resumed))
    assert [h["loss"] for h in straight.history] == [h["loss"] for h in resumed.history]


def test_the_loader_fetches_each_chunk_once_and_leaves_the_global_rng_alone():
    dataset = Counting(data())
    trainer = make(x=dataset)
    state = torch.random.get_rng_state()
    trainer.fit(3)
    assert torch.equal(state, torch.random.get_rng_state())
    assert dataset.fetched == torch.cat([trainer.batch_indices(k) for k in range(3)]).tolist()


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int64, torch.bool])
def test_integer_data_is_refused(dtype):
    x = (data() * 255).to(dtype)
    with pytest.raises(ValueError, match=rf"the data has dtype {dtype}: convert it to floating "
                       r"point in the backbone's data range \[0, 1\] \(HierarchicalVAE\.data_range"
                       r"\), e\.g\. x\.float\(\) / 255"):  # fmt: skip
        make(x=x)
    trainer = make(x=torch.utils.data.TensorDataset(x))  # items are read at the first step
    with pytest.raises(ValueError, match=rf"step 0, chunk 0: the data has dtype {dtype}"):
        trainer.fit(1)
    assert trainer.step == 0


def test_data_outside_the_backbones_range_is_refused():
    vae = HierarchicalVAE.from_config("digits")
    assert vae.data_range == (0.0, 1.0)
    assert HierarchicalVAE.from_config("cifar10").data_range == (-1.0, 1.0)
    x = data()
    x[5] = 2 * x[5] - 1
    expected = (r"data\[5\] has values in \[-1, 1\], outside the backbone's data range "
                r"\[0, 1\] \(HierarchicalVAE.data_range\): rescale")  # fmt: skip
    with pytest.raises(ValueError, match=expected):
        make(x=x)
    trainer = make(x=Counting(x))
    k = next(k for k in range(6) if 5 in trainer.batch_indices(k).tolist())
    c = trainer.batch_indices(k).tolist().index(5) // trainer.chunk_size
    with pytest.raises(ValueError, match=rf"step {k}, chunk {c}: data\[5\] has values in"):
        trainer.fit(6)
    assert trainer.step == k


def test_a_backbone_without_a_range_is_only_checked_for_finite_values():
    vae = HierarchicalVAE.from_config("digits").double()
    vae.data_range = None
    prior = JointEBMPrior(vae.latent_shapes, nef=8).double()
    options = dict(regime="two_stage", batch_size=8, langevin_steps=1, progress=False)
    Trainer(prior, vae, 2 * data() - 1, **options).fit(1)  # outside [0, 1]: accepted
    x = data()
    x[3, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"data\[3\] has infinite values: the data is not"):
        Trainer(prior, vae, x, **options)
    with pytest.raises(ValueError, match=r"has dtype torch.uint8: convert it to floating point "
                       r"in the range the backbone expects$"):  # fmt: skip
        Trainer(prior, vae, x.to(torch.uint8), **options)


def test_non_finite_data_is_named_as_such():
    x = data()
    x[7, 0, 2, 3] = float("nan")
    with pytest.raises(ValueError, match=r"data\[7\] has NaN values: the data is not finite "
                       r"\(this is not a training divergence\)"):  # fmt: skip
        make(x=x)
    x[7, 0, 2, 3] = float("inf")
    with pytest.raises(ValueError, match=r"data\[7\] has infinite values"):
        make(x=x)
    # a dataset is checked chunk by chunk, before the step: nothing is updated
    trainer = make(x=Counting(x))
    k = next(k for k in range(6) if 7 in trainer.batch_indices(k).tolist())
    trainer.fit(k)
    before = trained(trainer)
    with pytest.raises(ValueError, match=rf"step {k}, chunk \d: data\[7\] has infinite values"):
        trainer.fit(6)
    assert trainer.step == k
    assert_same(before, trained(trainer))
    # so is a tensor on the CPU, should it change after construction
    x = data()
    trainer = make(x=x)
    x[:] = float("nan")
    with pytest.raises(ValueError, match=r"step 0, chunk 0: data\[\d+\] has NaN values"):
        trainer.fit(1)


def test_adapters_declare_their_data_range():
    from ebm_prior.adapters.nvae import NVAEBackbone

    assert NVAEBackbone.data_range == (0.0, 1.0)
    tiny = pytest.importorskip("test_biva").tiny  # skipped without biva-pytorch
    from ebm_prior.adapters.biva import BIVABackbone

    assert BIVABackbone(tiny("lvae")).data_range == (0.0, 1.0)
    model = tiny("biva", 3, features_out=20)
    assert BIVABackbone(model, "discretized_logistic").data_range == (-1.0, 1.0)


def test_oodd_adapter_declares_its_data_range():
    test_oodd = pytest.importorskip("test_oodd")  # skipped without OODD_ROOT
    import oodd.models.dvae as dvae

    assert test_oodd.OODDBackbone(test_oodd.tiny("vae")).data_range == (0.0, 1.0)
    model = dvae.VAE(**{**test_oodd.CONFIG, "likelihood_module": "GaussianLikelihoodConv2d"})
    model = test_oodd.data_dependent_init(model, test_oodd.binary(8))
    assert test_oodd.OODDBackbone(model).data_range is None


# -- files, logging, progress ------------------------------------------------------------------


def test_checkpoint_dir_is_checked_at_construction(tmp_path, monkeypatch):
    deep = tmp_path / "a" / "b"
    make(checkpoint_dir=deep)
    assert deep.is_dir()  # created at once, not at the first checkpoint
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="checkpoint_dir .*file exists and is not a directory"):
        make(checkpoint_dir=tmp_path / "file")
    with pytest.raises(ValueError, match="checkpoint_dir .*file/sub cannot be created"):
        make(checkpoint_dir=tmp_path / "file" / "sub")

    def refused(path):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(trainer_module, "_new_temp_file", refused)
    with pytest.raises(ValueError, match=r"checkpoint_dir .*a/b is not writable: .*Permission"):
        make(checkpoint_dir=deep)


def test_stale_temporary_files_are_removed_and_logged(tmp_path, caplog):
    """Old temporary files of atomic writes are removed; fresh ones (another process's write in
    progress in a shared folder) and files of other names are kept."""

    stale = [".trainer.pt.0123456789ab.tmp", ".history.csv.a1b2c3d4e5f6.tmp"]
    in_progress = [".history.png.abcdefabcdef.tmp"]
    kept = [".notes.0123456789ab.tmp", "trainer.pt.bak", ".trainer.pt.xyz.tmp"] + in_progress
    old = time.time() - trainer_module._STALE_AGE - 5
    for name in stale + kept:
        (tmp_path / name).write_bytes(b"partial")
        if name not in in_progress:
            os.utime(tmp_path / name, (old, old))
    with caplog.at_level(logging.INFO, logger="ebm_prior"):
        make(checkpoint_dir=tmp_path)
    assert sorted(os.listdir(tmp_path)) == sorted(kept)
    removed = [r for r in caplog.records if "interrupted write" in r.getMessage()]
    assert [r.levelno for r in removed] == [logging.WARNING] * 2
    assert all(any(name in r.getMessage() for r in removed) for name in stale)


def test_resume_and_checkpoints_are_logged(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="ebm_prior"):
        make(checkpoint_dir=tmp_path, checkpoint_every=2).fit(3)
        make(checkpoint_dir=tmp_path, checkpoint_every=2).fit(4)
    messages = [r.getMessage() for r in caplog.records if r.name.startswith("ebm_prior")]
    path = tmp_path / "trainer.pt"
    assert f"wrote checkpoint {path} at step 2" in messages
    assert f"wrote checkpoint {path} at step 3" in messages
    assert f"resumed from {path} at step 3" in messages
    assert f"wrote checkpoint {path} at step 4" in messages


def test_progress_bar_only_on_a_terminal(capsys, monkeypatch):
    assert inspect.signature(Trainer).parameters["progress"].default is None
    assert inspect.signature(TwoStageTrainer).parameters["progress"].default is None
    make(progress=None).fit(1)
    assert capsys.readouterr().err == ""  # standard error is not a terminal here
    make(progress=True).fit(1)
    assert "two-stage EBM prior" in capsys.readouterr().err
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    make(progress=None).fit(1)
    assert "two-stage EBM prior" in capsys.readouterr().err
    make(progress=False).fit(1)
    assert capsys.readouterr().err == ""


def test_history_csv_survives_a_crash_and_a_resume(tmp_path):
    straight = make("two_stage+b")
    straight.fit(5)

    def crash(trainer, stats):
        if trainer.step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # after the row of step 3, checkpoint at step 2
        make("two_stage+b", checkpoint_dir=tmp_path, checkpoint_every=2, on_step=crash).fit(5)
    path = tmp_path / "history.csv"
    with open(path, "a") as f:
        f.write("4,0.25,")  # a row cut short
    assert [r["step"] for r in trainer_module.read_history(path)] == [1, 2, 3]
    make("two_stage+b", checkpoint_dir=tmp_path, checkpoint_every=2).fit(5)
    lines = path.read_text().splitlines()
    assert lines[0] == "step,loss,f_pos,f_neg,log_p_pos,log_p_neg,grad_norm,seconds"
    assert len(lines) == 6
    rows = trainer_module.read_history(path)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    for row, h in zip(rows, straight.history, strict=True):
        assert {k: v for k, v in row.items() if k != "seconds"} == {
            k: v for k, v in h.items() if k != "seconds"
        }
    make("two_stage+b", checkpoint_dir=tmp_path).fit(2, resume=False)  # a fresh start
    assert [r["step"] for r in trainer_module.read_history(path)] == [1, 2]


def test_loss_curves_are_drawn_when_matplotlib_is_installed(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    make("mle", checkpoint_dir=tmp_path).fit(2)
    png = tmp_path / "history.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert trainer_module.plot_history(tmp_path / "history.csv") == png
    png.unlink()
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    make("mle", checkpoint_dir=tmp_path).fit(3)  # trains and writes the CSV, no figure
    assert not png.exists() and (tmp_path / "history.csv").exists()
    with pytest.raises(ImportError, match=r'needs matplotlib, an optional extra: pip install '
                       r'"ebm-prior\[examples\]"'):  # fmt: skip
        trainer_module.plot_history(tmp_path / "history.csv")


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
    2 gloo processes learn the same energy, backbone groups and chains as 1; each process
    fetches only the examples of its own chunks (joint: a map-style dataset that counts)."""

    one = _torchrun(tmp_path, 1, chunk=4)
    two = _torchrun(tmp_path, 2, chunk=4)  # rank r runs chunk r of each global batch of 8
    order = make().batch_indices  # the data order depends on the seed and the data size only
    batches = [order(k).tolist() for k in range(3)]
    fetched = [torch.load(tmp_path / f"trained-{n}.pt.fetched-{r}") for n, r in ((1, 0), (2, 0),
                                                                              (2, 1))]  # fmt: skip
    assert fetched[0] == [i for b in batches for i in b]
    assert fetched[1] == [i for b in batches for i in b[:4]]
    assert fetched[2] == [i for b in batches for i in b[4:]]
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
    # the drop in a good fraction of calls; the trainer's collectives must never do. A script
    # that ends with barrier and destroy_process_group (which joins the worker threads) is
    # safe even after plain collectives.
    out = _torchrun(tmp_path, 2, chunk="release")
    released = out["released"]
    assert len(released) == 200 and all(released), f"{released.count(False)} of 200 not released"
    assert out["released_by_destroy"]


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
