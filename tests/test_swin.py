"""Swin Transformer against torchvision's facts (tests/fixtures/swin, made with torchvision 0.29.1):
names, and features at 224 px, at 64 px (maps padded to whole windows) and at 64×96 px; Swin V2
at 256 and 64 px."""
import json
import pathlib

import pytest
import torch

from _trunks import assert_close_to_largest
from fpipe import tree
from fpipe.models import swin
from fpipe.weights import cli, detect

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "swin"
MANIFESTS = json.loads((FIXTURES / "manifests.json").read_text())
OUTPUTS = torch.load(FIXTURES / "outputs.pt", weights_only=True)
STAGES = {"features.1": "res2", "features.3": "res3", "features.5": "res4", "features.7": "res5"}


def seeded_swin_t(reference, preset="swin_t", fixture="torchvision"):
    """``preset`` holding the seeded weights; its state gets the seeded function's values for the
    relative position indices (zeros) and V2's coordinate tables, which the trunk must not read."""
    trunk = swin.build(**swin.PRESETS[preset])
    sd = reference.seeded_state_dict(MANIFESTS[fixture]["state_dict"], 0)
    p0, s0 = trunk.init(0)
    params = tree.unflatten({n: sd[n] for n in tree.flatten(p0)})
    state = tree.unflatten({n: sd[n] for n in tree.flatten(s0)})
    return trunk, params, state, sd


@pytest.mark.parametrize("preset,fixture", [("swin_t", "torchvision"), ("swin_v2_t", "torchvision_v2")])
def test_names_and_shapes_are_torchvisions(preset, fixture):
    p, s = swin.build(**swin.PRESETS[preset]).init(0)
    ours = {n: list(t.shape) for n, t in {**tree.flatten(p), **tree.flatten(s)}.items()}
    theirs = {n: shape for n, shape, _ in MANIFESTS[fixture]["state_dict"] if not n.startswith("head.")}
    assert ours == theirs
    assert list(cli.torchvision_order(tree.flatten(p), tree.flatten(s))) == list(theirs)  # what convert writes
    index = tree.flatten(s)["features.1.0.attn.relative_position_index"]
    window = swin.PRESETS[preset].get("window_size", 7)
    assert index.dtype == torch.int64 and index.max() == (2 * window - 1) ** 2 - 1


@pytest.mark.parametrize("size,preset,fixture", [("224", "swin_t", "torchvision"), ("64", "swin_t", "torchvision"),
                                                 ("64x96", "swin_t", "torchvision"),
                                                 ("256", "swin_v2_t", "torchvision_v2"),
                                                 ("64", "swin_v2_t", "torchvision_v2")])
def test_eval_features_match_torchvision(reference, size, preset, fixture):
    trunk, params, state, sd = seeded_swin_t(reference, preset, fixture)
    if size == "64x96":
        images = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(200))
    else:
        images = reference.seeded_images(2, int(size), seed=100)
    expected = OUTPUTS[fixture][size]
    feats, new_state = trunk.apply(params, state, images, train=False, features=swin.FEATURES)
    assert new_state is state
    for module, feature in STAGES.items():
        if module in expected:  # torchvision's stages return channels-last maps
            assert_close_to_largest(feats[feature], expected[module].permute(0, 3, 1, 2), f"{size} {feature}")
    assert_close_to_largest(feats["res5avg"], expected["avgpool"], f"{size} res5avg")
    assert torch.equal(feats["flatten"], feats["res5avg"].flatten(1))


def test_shift_mask_separates_the_wrapped_regions():
    """A 14×14 map of 7×7 windows shifted by 3: the last window joins four regions; the first
    holds one."""
    mask = swin.shift_mask(14, 14, 7, (3, 3))
    assert mask.shape == (4, 1, 49, 49)
    assert torch.all(mask[0] == 0)
    last = mask[3, 0]
    assert last[0, 0] == 0 and last[0, 4] == swin.MASKED and last[0, 4 * 7] == swin.MASKED  # across both cuts
    assert torch.equal(last, last.T)


def test_stochastic_depth_is_train_only_and_reproducible():
    trunk = swin.build(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(2, 2, 4, 4), window_size=2,
                       stochastic_depth_prob=0.5)
    params, state = trunk.init(0)
    x = torch.randn(4, 3, 32, 32)
    plain = swin.build(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(2, 2, 4, 4), window_size=2)
    eval_out = trunk.apply(params, state, x, train=False)[0]["flatten"]
    torch.testing.assert_close(eval_out, plain.apply(params, state, x, train=True)[0]["flatten"])
    torch.manual_seed(1)
    a = trunk.apply(params, state, x, train=True)[0]["flatten"]
    torch.manual_seed(1)
    b = trunk.apply(params, state, x, train=True)[0]["flatten"]
    assert torch.equal(a, b) and not torch.allclose(a, eval_out)


def test_heads_must_divide_each_stage():
    with pytest.raises(ValueError, match="not divisible"):
        swin.build(embed_dim=96, num_heads=(5, 6, 12, 24))


# Parameters with a 1000-class head, in millions: torchvision's and timm's model cards.
PUBLISHED_MILLIONS = dict(swin_t=28.29, swin_s=49.61, swin_b=87.77, swin_large_patch4_window7_224=196.53,
                          swin_base_patch4_window12_384=87.90, swin_large_patch4_window12_384=196.74,
                          swin_v2_t=28.35, swin_v2_s=49.74, swin_v2_b=87.93)


def test_every_preset_has_its_published_size():
    assert set(PUBLISHED_MILLIONS) == set(swin.PRESETS)
    for name, millions in PUBLISHED_MILLIONS.items():
        width = swin.Spec(**swin.PRESETS[name]).dim(3)
        params = {n: t for n, t in cli.meta_target(name).items() if not detect.is_derived(n)}
        assert round((sum(t.numel() for t in params.values()) + width * 1000 + 1000) / 1e6, 2) == millions, name
