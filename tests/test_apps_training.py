"""The shared training runs of the applications (``ebm_prior.apps.training``)."""

import pytest
import torch

from ebm_prior import HierarchicalVAE
from ebm_prior.apps.training import fit_elbo, fit_elbo_to_plateau, validation_elbo


def _vae(seed: int = 0) -> HierarchicalVAE:
    torch.manual_seed(seed)
    return HierarchicalVAE.from_config("digits", hidden=16)


def _data(n: int = 64) -> torch.Tensor:
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(0)).round()


def test_plateau_stops_after_patience_and_runs_to_max_otherwise():
    x, val = _data(), _data(32)
    _, curve = fit_elbo_to_plateau(_vae(), x, val, max_epochs=10, patience=2, min_delta=1e9,
                                   batch_size=16)  # fmt: skip
    assert len(curve) == 3  # one epoch, then 2 without the (impossible) improvement
    trainer, curve = fit_elbo_to_plateau(_vae(), x, val, max_epochs=4, patience=2,
                                         min_delta=-1e9, batch_size=16)  # fmt: skip
    assert len(curve) == 4 and trainer.step == 4 * trainer.steps_per_epoch
    assert curve[-1] > curve[0]  # the ELBO of held-out data rises while training


def test_plateau_resume_is_exact(tmp_path):
    x, val = _data(), _data(32)
    kw = dict(patience=5, min_delta=0.0, batch_size=16)
    a = _vae()
    _, straight = fit_elbo_to_plateau(a, x, val, max_epochs=3, **kw)
    b = _vae()
    fit_elbo_to_plateau(b, x, val, max_epochs=2, checkpoint_dir=tmp_path, **kw)
    c = _vae(seed=9)  # other weights, overwritten by the checkpoint
    _, resumed = fit_elbo_to_plateau(c, x, val, max_epochs=3, checkpoint_dir=tmp_path, **kw)
    assert resumed == straight
    for p, q in zip(a.parameters(), c.parameters(), strict=True):
        assert torch.equal(p, q)


def test_plateau_draws_the_history_once_not_once_per_epoch(tmp_path, monkeypatch):
    """The figure is drawn at the end of the run: drawn per epoch it took three quarters of a
    digits run's wall time. It still shows every epoch."""

    pytest.importorskip("matplotlib")
    import ebm_prior.trainer as trainer_module

    calls = []
    real = trainer_module.plot_history
    monkeypatch.setattr(trainer_module, "plot_history",
                        lambda *a, **k: calls.append(a) or real(*a, **k))  # fmt: skip
    x, val = _data(), _data(32)
    kw = dict(patience=9, min_delta=0.0, batch_size=16, checkpoint_dir=tmp_path)
    trainer, curve = fit_elbo_to_plateau(_vae(), x, val, max_epochs=4, **kw)
    assert len(curve) == 4 and len(calls) == 1
    assert (tmp_path / "history.png").stat().st_size > 0
    rows = trainer_module.read_history(tmp_path / "history.csv")
    assert [r["step"] for r in rows] == list(range(1, trainer.step + 1))


def test_fit_elbo_trains_every_group_and_validation_elbo_is_repeatable():
    x = _data()
    vae = _vae()
    before = validation_elbo(vae, x, seed=3)
    assert validation_elbo(vae, x, seed=3) == before
    trainer = fit_elbo(vae, x, 3, batch_size=16)
    assert validation_elbo(vae, x, seed=3) > before
    assert trainer.regime == "joint" and trainer.prior is None
    assert len(trainer.optimizer.param_groups) == 3  # backbone prior, generator, encoder
