"""The Langevin benchmark runs at a tiny size (the pipeline, not the numbers)."""

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
