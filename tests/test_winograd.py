"""fpipe.models.winograd (F(4×4, 3×3)) against F.conv2d in float64, and the frozen trunk's route to it."""
import ml_collections
import pytest
import torch
import torch.nn.functional as F

from fpipe import freeze
from fpipe.models import layers, model as model_lib, winograd
from fpipe.train import frozen_trunk as ft_lib


@pytest.mark.parametrize("n,c,k,bias", [(3, 8, 5, True), (2, 16, 16, False), (1, 3, 2, True)])
def test_conv3x3_is_the_direct_conv(n, c, k, bias):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, c, 4, 4, generator=gen, dtype=torch.float64)
    weight = torch.randn(k, c, 3, 3, generator=gen, dtype=torch.float64)
    b = torch.randn(k, generator=gen, dtype=torch.float64) if bias else None
    torch.testing.assert_close(winograd.conv3x3(x, weight, b), F.conv2d(x, weight, b, 1, 1), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("h,w", [(8, 8), (4, 5), (3, 3)])
def test_conv3x3_refuses_maps_of_other_sizes(h, w):
    with pytest.raises(ValueError, match=f"4×4 maps .*got {h}×{w}"):
        winograd.conv3x3(torch.randn(1, 2, h, w), torch.randn(2, 2, 3, 3))


def test_conv3x3_in_float32_errs_as_little_as_winograd_does():
    """Float32 against a float64 reference: within ~1e-5 of the largest output (the direct conv ~1e-6)."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(8, 256, 4, 4, generator=gen).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(256, 256, 3, 3, generator=gen) / 48
    want = F.conv2d(x.double(), weight.double(), None, 1, 1)
    err = (winograd.conv3x3(x, weight).double() - want).abs().max() / want.abs().max()
    assert err < 3e-5, err


def test_only_the_frozen_trunks_4x4_maps_of_many_channels_take_winograd(monkeypatch):
    """The route holds within constant_weights, without gradients, on float32 4×4 maps from
    WINOGRAD_MIN_CHANNELS, stride 1: nowhere else."""
    monkeypatch.setattr(layers, "WINOGRAD_ON_CPU", True)
    w = torch.randn(128, 128, 3, 3)
    x = torch.randn(2, 128, 4, 4)
    with torch.no_grad():
        assert not layers._winograd_pays(x, w, 1, 1)  # outside constant_weights
        with layers.constant_weights():
            assert layers._winograd_pays(x, w, 1, 1)
            assert not layers._winograd_pays(torch.randn(2, 128, 8, 8), w, 1, 1)
            assert not layers._winograd_pays(x, w, 2, 1)
            assert not layers._winograd_pays(x[:, :64], w[:, :64], 1, 1)
            assert not layers._winograd_pays(x.double(), w.double(), 1, 1)
            monkeypatch.setattr(layers, "WINOGRAD_ON_CPU", False)  # AMD with AVX-512: MKL's AVX2 products
            assert not layers._winograd_pays(x, w, 1, 1)
    monkeypatch.setattr(layers, "WINOGRAD_ON_CPU", True)
    with layers.constant_weights():
        assert not layers._winograd_pays(x, w, 1, 1)  # gradients on


@pytest.mark.parametrize("vendor,avx512,routed", [("GenuineIntel", True, True), ("GenuineIntel", False, True),
                                                  ("AuthenticAMD", True, False), ("AuthenticAMD", False, True)])
def test_winograd_runs_where_mkls_products_use_the_cpus_full_width(monkeypatch, vendor, avx512, routed):
    """MKL runs its AVX2 code on AMD CPUs: half the width of an AVX-512 Zen 4 or 5 (Winograd's
    products no faster than oneDNN's direct conv there), the full width of an AVX2 Zen 3."""
    monkeypatch.setattr(layers, "cpu_vendor", lambda: vendor)
    monkeypatch.setattr(torch.cpu, "_is_avx512_supported", lambda: avx512)
    assert layers._mkl_runs_full_width() is routed or not torch.backends.mkl.is_available()


def test_the_compiled_frozen_trunk_routes_winograd_and_keeps_the_models_features(monkeypatch):
    """A ResNet-18 at 64 px has 4×4 maps of 256 channels in layer3: the compiled frozen trunk runs
    those 3×3 convs by Winograd and its features stay those of the eager model."""
    monkeypatch.setattr(layers, "WINOGRAD_ON_CPU", True)
    routed, real = [], winograd.conv3x3
    monkeypatch.setattr(winograd, "conv3x3", lambda *a: routed.append(tuple(a[0].shape[1:])) or real(*a))
    cfg = dict(trunk=model_lib.trunk_config("resnet", depth=18), heads=dict(fc=model_lib.head_config("flatten", "linear")))
    model = model_lib.build(ml_collections.ConfigDict(cfg), num_classes=5, image_size=64)
    params, state = model.init(0)
    trainable, frozen = freeze.partition(params, ["trunk"])
    eval_norms = freeze.eval_norms(state, frozen)
    x = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    eager = ft_lib.frozen_trunk(model, trainable, frozen, state, eval_norms, compile=False).features(x)
    assert not routed
    compiled = ft_lib.frozen_trunk(model, trainable, frozen, state, eval_norms, compile=True).features(x)
    assert routed and set(routed) == {(256, 4, 4)}
    for name in eager:
        scale = eager[name].abs().max()
        torch.testing.assert_close(compiled[name] / scale, eager[name] / scale, rtol=0, atol=3e-5)
