"""ConvNeXt against torchvision's facts: eval features, flatten after the final LayerNorm."""
import pytest
import torch

from fpipe.models import convnext
from _trunks import assert_close_to_largest, reference_outputs, reference_trunk

MODULES = dict(stem="features.0", res2="features.1", res3="features.3", res4="features.5",
               res5="features.7", res5avg="avgpool")


def test_eval_features_match_torchvision_outputs(reference):
    ref = reference_outputs(reference, "convnext_tiny_seed0_64px")
    trunk, params, state, sd = reference_trunk(reference, convnext, "convnext_tiny")
    assert state == {}
    feats, new_state = trunk.apply(params, state, ref["input"], train=False, features=convnext.FEATURES)
    for feature, module in MODULES.items():
        assert_close_to_largest(feats[feature], ref[f"eval.{module}"], feature)
    # flatten is what torchvision's classifier feeds its Linear (classifier.2)
    logits = feats["flatten"] @ sd["classifier.2.weight"].T + sd["classifier.2.bias"]
    assert_close_to_largest(logits, ref["eval.logits"], "logits")
    assert new_state == {}


def test_block_matches_an_nn_reference():
    """One block against torch.nn layers: depthwise conv, LayerNorm, MLP, layer scale, residual."""
    trunk = convnext.build(channels=(8, 16, 16, 16), depths=(1, 1, 1, 1), layer_scale=0.5)
    params, state = trunk.init(0)
    x = torch.randn(2, 3, 16, 16)
    stem = trunk.apply(params, state, x, train=False, features=("stem",))[0]["stem"]
    p = params["features"]["1"]["0"]
    dw = torch.nn.Conv2d(8, 8, 7, padding=3, groups=8)
    ln, fc1, fc2 = torch.nn.LayerNorm(8, eps=1e-6), torch.nn.Linear(8, 32), torch.nn.Linear(32, 8)
    with torch.no_grad():
        for module, key in ((dw, "0"), (ln, "2"), (fc1, "3"), (fc2, "5")):
            module.weight.copy_(p["block"][key]["weight"])
            module.bias.copy_(p["block"][key]["bias"])
        y = dw(stem).permute(0, 2, 3, 1)
        y = fc2(torch.nn.functional.gelu(fc1(ln(y)))).permute(0, 3, 1, 2)
        expected = stem + p["layer_scale"] * y
    res2 = trunk.apply(params, state, x, train=True, features=("res2",))[0]["res2"]
    torch.testing.assert_close(res2, expected)


def test_v2_block_adds_global_response_norm_and_drops_the_layer_scale():
    """ConvNeXt V2's block against the paper's GRN written out: per-channel L2 norm over the
    image, divided by its mean over channels; ``x + gamma·(x·N) + beta`` after the GELU."""
    trunk = convnext.build(channels=(8, 16, 16, 16), depths=(1, 1, 1, 1), grn=True, layer_scale=0.0)
    params, state = trunk.init(0)
    p = params["features"]["1"]["0"]
    assert "layer_scale" not in p and torch.equal(p["block"]["grn"]["weight"], torch.zeros(32))
    gen = torch.Generator().manual_seed(0)
    p["block"]["grn"] = {"weight": torch.randn(32, generator=gen), "bias": torch.randn(32, generator=gen)}
    x = torch.randn(2, 3, 16, 16, generator=gen)
    stem = trunk.apply(params, state, x, train=False, features=("stem",))[0]["stem"]
    b = p["block"]
    y = torch.nn.functional.conv2d(stem, b["0"]["weight"], b["0"]["bias"], padding=3, groups=8).permute(0, 2, 3, 1)
    y = torch.nn.functional.layer_norm(y, (8,), b["2"]["weight"], b["2"]["bias"], 1e-6)
    y = torch.nn.functional.gelu(y @ b["3"]["weight"].T + b["3"]["bias"])
    norms = y.pow(2).sum(dim=(1, 2), keepdim=True).sqrt()
    y = y + b["grn"]["weight"] * (y * norms / (norms.mean(dim=-1, keepdim=True) + 1e-6)) + b["grn"]["bias"]
    expected = stem + (y @ b["5"]["weight"].T + b["5"]["bias"]).permute(0, 3, 1, 2)
    res2 = trunk.apply(params, state, x, train=False, features=("res2",))[0]["res2"]
    torch.testing.assert_close(res2, expected)


# Parameters with a 1000-class Linear head, in millions: torchvision's and timm's model cards.
PUBLISHED_MILLIONS = dict(convnext_tiny=28.59, convnext_small=50.22, convnext_base=88.59, convnext_large=197.77,
                          convnextv2_atto=3.71, convnextv2_femto=5.23, convnextv2_pico=9.07, convnextv2_nano=15.62,
                          convnextv2_tiny=28.64, convnextv2_base=88.72, convnextv2_large=197.96,
                          convnextv2_huge=660.29)


def test_every_preset_has_its_published_size():
    from fpipe.weights import cli
    assert set(PUBLISHED_MILLIONS) == set(convnext.PRESETS)
    for name, millions in PUBLISHED_MILLIONS.items():
        width = convnext.PRESETS[name]["channels"][-1]
        count = sum(t.numel() for t in cli.meta_target(name).values()) + width * 1000 + 1000
        assert round(count / 1e6, 2) == millions, name


@pytest.mark.parametrize("name,width,blocks", [("convnext_small", 768, 36), ("convnext_base", 1024, 36),
                                               ("convnext_large", 1536, 36)])
def test_presets(name, width, blocks):
    spec = convnext.build(**convnext.PRESETS[name]).spec
    assert spec.channels[-1] == width and sum(spec.depths) == blocks


def test_stochastic_depth_off_by_default_and_train_only():
    trunk = convnext.build(channels=(8, 16, 16, 16), depths=(2, 2, 2, 2), stochastic_depth_prob=0.5, layer_scale=1.0)
    params, state = trunk.init(0)
    x = torch.randn(8, 3, 32, 32)
    plain = convnext.build(channels=(8, 16, 16, 16), depths=(2, 2, 2, 2), layer_scale=1.0)
    eval_out = trunk.apply(params, state, x, train=False, features=("res5",))[0]["res5"]
    torch.testing.assert_close(eval_out, plain.apply(params, state, x, train=True, features=("res5",))[0]["res5"])
    torch.manual_seed(1)
    a = trunk.apply(params, state, x, train=True, features=("res5",))[0]["res5"]
    torch.manual_seed(1)
    b = trunk.apply(params, state, x, train=True, features=("res5",))[0]["res5"]
    assert torch.equal(a, b) and not torch.allclose(a, eval_out)
