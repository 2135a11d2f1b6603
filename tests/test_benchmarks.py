"""The Langevin benchmark runs at a tiny size (the pipeline, not the numbers)."""

import pytest

from benchmarks import langevin


def test_langevin_benchmark_tiny(capsys):
    rows, mem = langevin.main(
        ["--models", "reference,biva", "--batches", "2", "--steps", "2", "--repeats", "1",
         "--memory-steps", "2,4"]
    )  # fmt: skip
    printed = capsys.readouterr().out
    assert "| model | batch | ours ULA | ours MALA | naive | floor |" in printed
    assert [r["model"] for r in rows] == ["reference", "biva"]
    assert all(r[k] > 0 for r in rows for k in ("ula", "mala", "naive", "floor"))
    assert [m["steps"] for m in mem] == [2, 4]


def test_nvae_stand_in_is_a_backbone():
    import torch

    vae = langevin.NVAELikeStandIn(groups=3, shape=(2, 4, 4), width=8)
    eps = vae.sample_eps(2)
    with torch.no_grad():
        back = vae.z_to_eps(vae.eps_to_z(eps, 0.7), 0.7)
    for a, b in zip(eps, back):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_claim1_tiny_every_model_resumes_and_pairs(tmp_path, capsys):
    r"""Every model of the Table-1 benchmark trains through its trainer's checkpoint folder, is
    measured once (a second run measures nothing new), and the report pairs each EBM model
    with its Gaussian model of the same seed."""

    import json

    from benchmarks import claim1

    argv = ["--tiny", "--out", str(tmp_path), "--models", ",".join(claim1.MODELS)]
    out = claim1.main(argv)
    assert {(r["model"], r["seed"]) for r in out["rows"]} == {
        (m, s) for m in claim1.MODELS for s in (0, 1)
    }
    for r in out["rows"]:
        assert r["samples"] == 32 and r["fid_inf_cls"] == r["fid_inf_cls"]  # equal N, finite
        assert "fid_inf" not in r  # --tiny: no Inception
        assert r.get("mala", False) == r["model"].endswith("_mala")
        assert (tmp_path / "digits" / "models" / f"{r['model']}_seed{r['seed']}" /
                "trainer.pt").exists()  # fmt: skip
    # the same base draws for every model of a seed, different ones across seeds
    gauss = [r for r in out["rows"] if r["model"] == "gaussian_mle"]
    assert gauss[0]["kid_cls"] != gauss[1]["kid_cls"]
    for m, g in claim1.COMPARED:
        assert f"| {m} - {g} | 2 |" in out["tables"]
    again = claim1.main(argv)
    assert again["rows"] == []
    lines = (tmp_path / "digits" / "claim1.jsonl").read_text().splitlines()
    assert len(lines) == 2 * len(claim1.MODELS)
    assert json.loads(lines[0])["epochs"] == 1
    assert "measured already" in capsys.readouterr().out
    # --likelihood: the variational models' test log-likelihood, from the finished checkpoints
    ll = claim1.main([*argv, "--likelihood"])
    variational = [m for m in claim1.MODELS if "_mle" not in m]
    assert {(r["model"], r["seed"]) for r in ll["rows"]} == {
        (m, s) for m in variational for s in (0, 1)
    }
    for r in ll["rows"]:
        assert r["test_images"] == 297 and r["iw_samples"] == 4
        assert r["iw"] == r["iw"] and r["elbo"] == r["elbo"]  # finite
        assert ("log_z" in r) == r["model"].startswith("ebm")
        if "log_z" in r:
            assert r["log_z_method"] in ("is", "ais") and r["log_z_se"] >= 0
    assert "no encoder, no test likelihood" in capsys.readouterr().out
    assert "test log-likelihood, nats per image (297 test images, K = 4" in ll["tables"]
    assert "| ebm_two_stage - gaussian_vae | 2 |" in ll["tables"].split("test log-likelihood")[1]
    assert claim1.main([*argv, "--likelihood"])["rows"] == []
    assert "likelihood measured already" in capsys.readouterr().out


def test_fid_infinity_is_the_intercept_in_one_over_n():
    r"""FID(N) = FID_inf + k / N exactly (a fake Frechet distance): the fit returns FID_inf and
    k; with the real distance the estimate lies below FID at the largest N (FID is biased
    upwards at finite N)."""

    from unittest import mock

    import torch

    from benchmarks import metrics

    fake = torch.zeros(1000, 4)
    with mock.patch.object(metrics, "frechet_distance",
                           side_effect=lambda a, b: 3.0 + 250.0 / len(a)):  # fmt: skip
        out = metrics.fid_infinity(fake, fake, [250, 500, 1000], draws=2, seed=0)
    assert abs(out["fid_inf"] - 3.0) < 1e-9 and abs(out["fid_slope"] - 250.0) < 1e-6
    assert out["fid_250"] == 4.0
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(1000, 8, generator=gen), torch.randn(4000, 8, generator=gen) + 0.3
    out = metrics.fid_infinity(a, b, [250, 500, 1000], draws=5, seed=0)
    assert out["fid_slope"] > 0 and out["fid_inf"] < out["fid_1000"]
    assert abs(out["fid_inf"] - 8 * 0.09) < 0.1  # the closed form: |mean shift|^2 = 0.72


def test_paired_interval_is_the_t_interval():
    from benchmarks import claim1

    m, s, lo, hi = claim1.paired_interval([1.0, 2.0, 3.0, 4.0])
    assert (m, round(s, 6)) == (2.5, round((5 / 3) ** 0.5, 6))
    assert abs((hi - lo) / 2 - 3.182 * s / 2) < 1e-9


def test_fig1_tiny_resumes_and_reports(tmp_path):
    from benchmarks import fig1

    out = fig1.main(["--tiny", "--out", str(tmp_path)])
    assert {(r["model"], r["seed"]) for r in out["rows"]} == {
        (m, s) for m in fig1.MODELS for s in (0, 1)
    }
    for r in out["rows"]:
        assert 0 < r["p_base"] <= 1 and r["n"] == 64
        assert ("p_ebm" in r) == (r["model"] == "ebm_mle")
    assert "Paired, EBM model's EBM prior minus Gaussian model's prior (2 seeds)" in out["tables"]
    assert fig1.main(["--tiny", "--out", str(tmp_path)])["rows"] == []


def test_anomaly_split_and_tiny_run(tmp_path):
    import torch

    from benchmarks import anomaly

    y = torch.arange(100) % 10
    train, test_in, test_out = anomaly.split(y, 3)
    assert len(train) == 72 and len(test_in) == 18 and len(test_out) == 10
    assert (y[test_out] == 3).all() and (y[train] != 3).all() and (y[test_in] != 3).all()
    assert not set(train.tolist()) & set(test_in.tolist())
    out = anomaly.main(["--tiny", "--out", str(tmp_path)])
    assert {(r["k"], r["seed"]) for r in out["rows"]} == {(1, 0), (1, 1)}
    for r in out["rows"]:
        assert 0 < r["auprc_gaussian"] <= 1 and 0 < r["auprc_ebm"] <= 1
        assert r["diff_low"] <= r["diff"] <= r["diff_high"]
        assert r["diff"] == r["auprc_ebm"] - r["auprc_gaussian"]
        # the energy's share of the EBM model's score at the same samples
        assert r["f_sd_ebm"] > 0 and r["score_sd_ebm"] > 0
        assert 0 < r["auprc_f_only"] <= 1 and 0 < r["auprc_ebm_without_f"] <= 1
        assert "f_sd_gaussian" not in r
    assert "| 1 | 2 |" in out["tables"]
    assert "| 1 | 1 | 2e-05 | 2 |" in out["tables"]  # class, epochs, rate, seeds
    assert anomaly.main(["--tiny", "--out", str(tmp_path)])["rows"] == []
    # another energy rate: its own EBM models, the same Gaussian ones (loaded, not retrained)
    fast = anomaly.main(["--tiny", "--seeds", "0", "--ebm-lr", "1e-3", "--out", str(tmp_path)])
    (row,) = fast["rows"]
    assert row["ebm_lr"] == 1e-3 and row["auprc_gaussian"] == out["rows"][0]["auprc_gaussian"]
    assert row["auprc_ebm"] != out["rows"][0]["auprc_ebm"]
    assert (tmp_path / "models" / "heldout1_ebm_lr0.001" / "ebm_mle_seed0").is_dir()
    assert "energy learning rate 0.001" in fast["tables"]
    assert "energy learning rate 2e-05" in fast["tables"]  # the default rate's table stays
    assert "f_pos_ebm" in row and "f_pos_gaussian" not in row


def test_anomaly_records_a_diverged_fit(tmp_path, monkeypatch):
    r"""A fit the trainer stops for divergence is a row saying so (not a crash that loses the
    other seeds, not a silent gap); the report names it, and a rerun does not retry it."""

    from benchmarks import anomaly, claim1

    train = claim1.train

    def diverging(model, seed, *a, **kw):
        if model == "ebm_mle" and seed == 1:
            e = FloatingPointError("Langevin diverged")
            e.add_note("(in chunk 0 of training step 7)")  # as the trainer says where
            raise e
        return train(model, seed, *a, **kw)

    monkeypatch.setattr(claim1, "train", diverging)
    out = anomaly.main(["--tiny", "--out", str(tmp_path)])
    bad, good = sorted(out["rows"], key=lambda r: -r["seed"])
    assert bad["seed"] == 1 and "training step 7" in bad["diverged_ebm"] and "diff" not in bad
    assert good["seed"] == 0 and "diverged_ebm" not in good and "diff" in good
    assert "| 1 | 1 |" in out["tables"]  # one seed in the table
    assert "held-out 1 seed 1 is left out, its fit diverged: Langevin diverged" in out["tables"]
    assert anomaly.main(["--tiny", "--out", str(tmp_path)])["rows"] == []


def test_ceiling_tiny_and_the_gain_is_shift_invariant(tmp_path):
    r"""G = E_q[f] - log E_p[e^f] does not change when a constant is added to f (the
    Donsker-Varadhan bound), and is exactly 0 for f = 0; the tiny run records the Gaussian row,
    a classifier ceiling and the curve for every width, and resumes without new rows."""

    import argparse

    import torch

    from benchmarks import ceiling
    from ebm_prior import HierarchicalVAE, JointEBMPrior

    torch.manual_seed(0)
    vae = HierarchicalVAE.from_config("digits")
    f = JointEBMPrior(vae.latent_shapes, nef=8)

    class Shifted(torch.nn.Module):
        def forward(self, z):
            return f(z) + 3.0

    z = vae.eps_to_z(vae.sample_eps(50, generator=torch.Generator().manual_seed(1)))
    a = argparse.Namespace(log_z_samples=2000)
    g1, g2 = ceiling.gain(f, vae, z, a, 0)["gain"], ceiling.gain(Shifted(), vae, z, a, 0)["gain"]
    assert abs(g1 - g2) < 1e-5 and abs(g1) > 1e-4  # float32 sums

    out = ceiling.main(["--tiny", "--out", str(tmp_path)])
    kinds = {(r["kind"], r["nef"], r["epoch"]) for r in out["rows"]}
    assert ("gaussian", 0, 0) in kinds
    for nef in (8, 16):
        assert {("ceiling", nef, 0), ("two_stage", nef, 1), ("two_stage", nef, 2)} <= kinds
    assert all(r["log_z_ess"] > 0 for r in out["rows"] if "log_z_ess" in r)
    assert ceiling.main(["--tiny", "--out", str(tmp_path)])["rows"] == []
    # a sampler variant: its own fits and rows on the same backbone, no new ceiling
    mala = ceiling.main(["--tiny", "--nefs", "8", "--mala", "--out", str(tmp_path)])["rows"]
    assert [(r["kind"], r["nef"], r["epoch"], r["sampler"]) for r in mala] == [
        ("two_stage", 8, 1, "mala"), ("two_stage", 8, 2, "mala")]  # fmt: skip
    default = {r["epoch"]: r for r in out["rows"] if r["kind"] == "two_stage" and r["nef"] == 8}
    assert all(r["gain"] != default[r["epoch"]]["gain"] for r in mala)
    # the MALA rows carry their chain's acceptance, the unadjusted rows none
    assert all(0 < r["acceptance"] <= 1 for r in mala)
    assert not any("acceptance" in r for r in out["rows"])
    assert (tmp_path / "models" / "two_stage_nef8_seed0_mala" / "trainer.pt").exists()
    assert ceiling.sampler_label(200, 0.4, False) == "ula 200x0.4"
    assert ceiling.sampler_label(60, 0.4, True) == "mala"


def test_ceiling_across_seeds_pairs_the_widths(tmp_path):
    """The across-seed table pairs widths by seed at the last epoch reached, leaves out a fit
    that has not reached it, and a folder without rows is refused with its path."""

    import json

    from benchmarks import ceiling

    rows = [{"kind": "gaussian", "nef": 0, "seed": s, "epoch": 0, "gain": 0.0, "kid_cls": 1.0}
            for s in range(3)]  # fmt: skip
    for s, (c20, g20, c100, g100) in enumerate([(1.0, 0.5, 2.0, 1.5), (1.2, 0.7, 2.4, 1.4),
                                                (1.1, 0.6, 2.2, 0.2)]):  # fmt: skip
        for nef, c, g in ((20, c20, g20), (100, c100, g100)):
            rows.append({"kind": "ceiling", "nef": nef, "seed": s, "epoch": 0, "gain": c,
                         "accuracy": 0.8})  # fmt: skip
            last = 4 if s < 2 or nef == 20 else 2  # seed 2 at nef 100 stopped early
            for e in range(2, last + 1, 2):
                rows.append({"kind": "two_stage", "nef": nef, "seed": s, "epoch": e,
                             "gain": g * e / 4, "log_z": 0.0, "log_z_method": "is",
                             "log_z_ess": 100.0, "f_gap": 0.0, "kid_cls": 1.0})  # fmt: skip
    with open(tmp_path / "ceiling.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    text = ceiling.report(str(tmp_path))
    assert "two-stage G at epoch 4" in text
    assert "| 20 | 3 | 1.100 +- 0.100 " in text and "| 0.600 +- 0.100 " in text
    assert "| 100 | 2 | 2.200 +- 0.283 " in text  # seed 2 has not reached epoch 4
    # paired over seeds 0 and 1: G 1.0 and 0.7 (mean 0.85, sd 0.212), ceiling 1.0 and 1.2
    assert "| 100 - 20 | 2 | 0.850 +- 0.212 " in text and "| 1.100 +- 0.141 " in text
    assert "| 2/2 |" in text
    # every KID equals its Gaussian's here: the share column is exactly 0
    assert "| 0.000 +- 0.000 [0.000, 0.000] |" in text.split("KID cls / Gaussian's - 1")[1]
    # a MALA fit of nef 100 on seeds 0 and 1 (G 1.6 and 1.6): nef 100's ceiling, paired with
    # the default fit of the same width and seed
    for s in range(2):
        rows.append({"kind": "two_stage", "nef": 100, "seed": s, "epoch": 4, "gain": 1.6,
                     "sampler": "mala", "log_z": 0.0, "log_z_method": "is", "log_z_ess": 1.0,
                     "f_gap": 0.0, "kid_cls": 1.0, "acceptance": 0.5 + 0.25 * s})  # fmt: skip
    with open(tmp_path / "ceiling.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    text = ceiling.report(str(tmp_path))
    assert "| 100 mala | 2 | 2.200 +- 0.283 " in text and "| 1.600 +- 0.000 " in text
    assert "| 100 mala - 100 | 2 | 0.150 +- 0.071 " in text  # 1.6 - 1.5, 1.6 - 1.4
    assert "| 100 mala | 0 | 2.000 | 0.800 | 1.600 | 4 |" in text  # per seed, its ceiling
    assert "| 100 mala | 2 |" not in text.split("Across seeds")[0]  # no MALA fit on seed 2
    assert "| 0.000 | 1.00 | 0.750 |" in text  # seed 1's MALA acceptance, per seed
    assert "| 0.000 | 1.00 | - |" in text  # the unadjusted fits have none
    with pytest.raises(SystemExit, match="no rows in .*ceiling.jsonl"):
        ceiling.report(str(tmp_path / "empty"))


def test_ood_seeds_pairs_the_runs(tmp_path):
    """Two runs' rows: the AUROC difference is paired per run (EBM minus Gaussian of the same
    run), its mean and t interval printed per k; a folder without rows is refused."""

    import json

    import pytest

    from benchmarks import ood_seeds

    for i, (g, e) in enumerate([(0.60, 0.70), (0.80, 0.86)]):
        rows = [
            {"prior": p, "k": k, "score": "L>k" if k == 0 else "LLR>k", "auroc": a + 0.1 * k,
             "auprc": 0.5, "fpr80": 0.2}
            for p, a in (("Gaussian prior", g), ("EBM prior", e)) for k in (0, 1)
        ]  # fmt: skip
        (tmp_path / f"s{i}").mkdir()
        (tmp_path / f"s{i}" / "rows_a_vs_b.json").write_text(json.dumps({"rows": rows}))
    text = ood_seeds.main([str(tmp_path / "s0"), str(tmp_path / "s1")])
    # differences 0.10 and 0.06: mean 0.08, s.d. 0.0283, t(1) = 12.706: +-0.2541
    assert "| L>0 | 0.700 ± 0.141 | 0.780 ± 0.113 |" in text
    assert "+0.0800 [-0.1741, +0.3341]" in text and "| LLR>1 |" in text
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="expected one rows_"):
        ood_seeds.main([str(tmp_path / "empty")])


def test_crop_to_takes_the_centre_back_to_28():
    import torch

    from benchmarks.backbone_priors import crop_to

    x = torch.arange(2 * 32 * 32.0).reshape(2, 1, 32, 32)
    assert torch.equal(crop_to(x, (28, 28)), x[..., 2:30, 2:30])
    assert crop_to(x, (32, 32)) is x
    with pytest.raises(ValueError, match="32x32; the reference images are 33x33"):
        crop_to(x, (33, 33))
    with pytest.raises(ValueError, match="reference images are 29x29"):
        crop_to(x, (29, 29))


def test_class_summary_measures_class_balance_and_confidence():
    import torch

    from benchmarks.metrics import class_summary

    labels = torch.tensor([0, 0, 1, 2])  # proportions 1/2, 1/4, 1/4
    probs = torch.tensor([[0.9, 0.05, 0.05], [0.6, 0.2, 0.2], [0.1, 0.7, 0.2], [0.2, 0.2, 0.6]])
    out = class_summary(probs, labels)  # predicted classes 0, 0, 1, 2: the same balance
    assert out["class_tv"] == pytest.approx(0.0) and out["top_prob"] == pytest.approx(0.7)
    out = class_summary(probs[:, [1, 0, 2]], labels)  # predicted 1, 1, 0, 2
    assert out["class_tv"] == pytest.approx(0.25)  # |1/4 - 1/2| + |1/2 - 1/4| + 0, halved
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\); got 0 to 3"):
        class_summary(probs, torch.tensor([0, 3]))
    with pytest.raises(ValueError, match=r"probs must be \(N, C\)"):
        class_summary(probs[0], labels)
