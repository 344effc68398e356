"""The ResNet trunk against torchvision's facts: names, shapes, and eval-mode features."""
import pytest
import torch

from fpipe import tree
from fpipe.models import resnet

MANIFESTS = {
    "resnet18": dict(depth=18), "resnet34": dict(depth=34), "resnet50": dict(depth=50),
    "resnet101": dict(depth=101), "resnet152": dict(depth=152),
    "resnext50_32x4d": dict(depth=50, groups=32, width_per_group=4),
    "wide_resnet50_2": dict(depth=50, width_per_group=128),
    "resnext101_32x8d": dict(depth=101, groups=32, width_per_group=8),
    "wide_resnet101_2": dict(depth=101, width_per_group=128),
}


def trunk_rows(manifest):
    return [(n, list(s), d) for n, s, d in manifest if not n.startswith("fc.")]


@pytest.mark.parametrize("name", sorted(MANIFESTS))
def test_names_shapes_dtypes_equal_torchvision(reference, name):
    params, state = resnet.init(0, **MANIFESTS[name])
    ours = {n: (list(t.shape), str(t.dtype)) for n, t in {**tree.flatten(params), **tree.flatten(state)}.items()}
    expected = {n: (s, d) for n, s, d in trunk_rows(reference.load_manifest(name))}
    assert ours == expected


def load_reference_weights(reference, name, depth):
    sd = reference.seeded_state_dict(reference.load_manifest(name), 0)
    trunk = resnet.build(depth=depth)
    p0, _ = trunk.init(0)
    pnames = set(tree.flatten(p0))
    params = tree.unflatten({n: v for n, v in sd.items() if n in pnames})
    state = tree.unflatten({n: v for n, v in sd.items() if not n.startswith("fc.") and n not in pnames})
    return trunk, params, state


@pytest.mark.parametrize("name,depth", [("resnet18", 18), ("resnet50", 50)])
def test_eval_features_match_torchvision_outputs(reference, name, depth):
    ref = torch.load(reference.OUTPUTS / f"{name}_seed0_64px.pt", weights_only=True)
    trunk, params, state = load_reference_weights(reference, name, depth)
    feats, new_state = trunk.apply(params, state, ref["input"], train=False, features=resnet.FEATURES)
    for f in resnet.FEATURES:
        expected = ref[f"eval.{f}"]
        assert feats[f].shape == expected.shape, f
        scale = expected.abs().max()
        assert (feats[f] - expected).abs().max() <= 1e-5 * scale, f
    assert new_state is state or tree.flatten(new_state) == tree.flatten(state)


def test_only_requested_features_are_computed_up_to_the_deepest(reference):
    trunk, params, state = load_reference_weights(reference, "resnet18", 18)
    x = torch.randn(2, 3, 64, 64)
    feats, new_state = trunk.apply(params, state, x, train=True, features=("res2",))
    assert set(feats) == {"res2"}
    # layer2..4 did not run: their BatchNorm statistics are unchanged, layer1's moved.
    flat_old, flat_new = tree.flatten(state), tree.flatten(new_state)
    assert torch.equal(flat_new["layer4.1.bn2.running_mean"], flat_old["layer4.1.bn2.running_mean"])
    assert not torch.equal(flat_new["layer1.0.bn1.running_mean"], flat_old["layer1.0.bn1.running_mean"])
    assert list(flat_new) == list(flat_old)


def test_train_mode_bn_matches_torch_and_eval_norms_keep_running_stats():
    trunk = resnet.build(depth=18)
    params, state = trunk.init(0)
    x = torch.randn(4, 3, 32, 32)
    _, s_train = trunk.apply(params, state, x, train=True, features=("res1",))
    ref = torch.nn.BatchNorm2d(64)
    ref(torch.nn.functional.conv2d(x, params["conv1"]["weight"], None, 2, 3))
    torch.testing.assert_close(s_train["bn1"]["running_var"], ref.running_var)
    _, s_frozen = trunk.apply(params, state, x, train=True, features=("res1",), eval_norms={"bn1"})
    assert torch.equal(s_frozen["bn1"]["running_var"], state["bn1"]["running_var"])


@pytest.mark.parametrize("options", [dict(depth=50, width_multiplier=2), dict(depth=18, layer4_stride=1),
                                     dict(depth=50, norm="group"), dict(depth=18, norm="layer")])
def test_variants_run_and_report_channels(options):
    trunk = resnet.build(**options)
    params, state = trunk.init(0)
    feats, _ = trunk.apply(params, state, torch.randn(2, 3, 64, 64), train=True, features=resnet.FEATURES)
    for f in ("conv1", "res2", "res5", "flatten"):
        assert feats[f].shape[1] == trunk.spec.channels(f)
    if options.get("layer4_stride") == 1:
        assert feats["res5"].shape[-1] == feats["res4"].shape[-1]
    if options.get("norm") in ("group", "layer"):
        assert state == {}


def test_zero_init_residual_zeroes_last_norm_of_each_block():
    params, _ = resnet.init(0, depth=50, zero_init_residual=True)
    assert torch.count_nonzero(params["layer1"]["0"]["bn3"]["weight"]) == 0
    assert torch.count_nonzero(params["layer1"]["0"]["bn1"]["weight"]) > 0


def test_bad_options_name_the_valid_ones():
    with pytest.raises(ValueError, match=r"valid: \[18, 34, 50, 101, 152, 200\]"):
        resnet.build(depth=42)
    with pytest.raises(ValueError, match="basic blocks"):
        resnet.build(depth=18, groups=32)
    with pytest.raises(ValueError, match="unknown trunk feature"):
        resnet.build(depth=18).apply(*resnet.init(0, depth=18), torch.randn(1, 3, 32, 32), train=False,
                                     features=("res6",))
