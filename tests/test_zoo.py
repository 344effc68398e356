"""The trunk zoo: every family follows the contract, every preset has torchvision's names,
the registry resolves names and options, ResNet's small-image stem, and compiled tiny trunks."""
import pathlib
import re

import ml_collections
import pytest
import torch

from fpipe import tree
from fpipe.models import model as models
from fpipe.models import alexnet, convnext, efficientnet, regnet, resnet

ROOT = pathlib.Path(__file__).resolve().parents[1]
from conftest import REFERENCE  # noqa: E402 (FPIPE_REFERENCE or ../shared/reference)
FAMILIES = dict(resnet=resnet, regnet=regnet, efficientnet=efficientnet, convnext=convnext, alexnet=alexnet)
HEAD_ROWS = dict(resnet=r"fc\.", regnet=r"fc\.", efficientnet=r"classifier\.1\.", convnext=r"classifier\.2\.",
                 alexnet=r"classifier\.6\.")  # the classifier a head plays; the rest is the trunk
TINY = dict(alexnet=dict(dropout=0.0),
            regnet=dict(depth=5, w_0=8, w_a=12, w_m=2.0, group_width=8, stem_width=8),
            efficientnet=dict(width_mult=0.25, depth_mult=0.3),
            convnext=dict(channels=(8, 16, 16, 16), depths=(1, 1, 1, 1)))


def manifest_presets():
    names = {p.stem for p in (REFERENCE / "manifests").glob("*.json")}
    return sorted((family, name) for family, m in FAMILIES.items() for name in m.PRESETS if name in names)


def test_the_manifests_are_found():  # else the parametrised test below would silently collect nothing
    assert len(manifest_presets()) >= 10, f"no preset manifests under {REFERENCE / 'manifests'}; set FPIPE_REFERENCE"


@pytest.mark.parametrize("family,name", manifest_presets())
def test_every_preset_with_a_manifest_has_torchvisions_names_and_shapes(reference, family, name):
    trunk = models.build_trunk(name)
    with torch.device("meta"):  # the 128GF RegNet has 645M parameters
        params, state = trunk.init(0)
    ours = {n: (list(t.shape), str(t.dtype)) for n, t in {**tree.flatten(params), **tree.flatten(state)}.items()}
    expected = {n: (s, d) for n, s, d in reference.load_manifest(name) if not re.match(HEAD_ROWS[family], n)}
    assert ours == expected


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_contract_meta_device_and_registry(family):
    module = models.TRUNKS[family]
    assert module is FAMILIES[family]
    trunk = models.build_trunk(family)
    assert trunk.features == module.FEATURES
    assert set(trunk.spec.__dict__) >= set(module.OPTIONS)
    with torch.device("meta"):
        params, state = trunk.init(0)
    feats, new_state = trunk.apply(params, state, torch.empty(1, 3, 96, 96, device="meta"), train=True,
                                   features=module.FEATURES)
    assert list(feats) == list(module.FEATURES)
    assert tree.flatten(new_state).keys() == tree.flatten(state).keys()
    with pytest.raises(ValueError, match="unknown trunk feature"):
        trunk.apply(params, state, torch.empty(1, 3, 96, 96, device="meta"), train=False, features=("nope",))


def test_presets_resolve_and_explicit_options_override_them():
    assert models.build_trunk("resnext101_64x4d").spec == resnet.Spec(depth=101, groups=64, width_per_group=4)
    assert models.build_trunk("resnet18", depth=50, norm=None).spec == resnet.Spec(depth=50)
    assert models.build_trunk("resnet", depth=50).spec == resnet.Spec(depth=50)
    assert models.build_trunk("efficientnet_b5").spec.norm_momentum == 0.01
    assert models.build_trunk("convnext_tiny", stochastic_depth_prob=0.1).spec.stochastic_depth_prob == 0.1
    names = models.trunk_presets()
    assert names["regnet_y_400mf"][0] == "regnet" and names["alexnet"][0] == "alexnet"


def test_unknown_names_and_options_say_what_is_valid():
    with pytest.raises(ValueError, match=r"did you mean 'resnet50'.*valid families: \[.*'regnet'"):
        models.build_trunk("resnet_50")
    with pytest.raises(ValueError, match=r"convnext_tiny.*takes no option\(s\) \['depth'\].*'depths'"):
        models.build_trunk("convnext_tiny", depth=18)


def test_trunk_config_holds_every_option_and_the_preset_rule():
    cfg = models.trunk_config("resnet18")
    for module in FAMILIES.values():
        assert set(module.OPTIONS) <= set(cfg.keys())
    assert cfg.depth is None  # unset: the preset decides
    cfg.name = "regnet_x_400mf"  # switching family carries no ResNet option along
    model = models.build(ml_collections.ConfigDict(dict(trunk=cfg, heads=dict(
        fc=models.head_config("flatten")))), num_classes=3, image_size=32)
    assert model.trunk.features == regnet.FEATURES and model.trunk.spec.se_ratio == 0.0
    cfg.w_a = 24  # an int for a float option is fine
    assert models.build_trunk(**cfg).spec.w_a == 24.0
    cfg.layer_scale = 0.5
    with pytest.raises(ValueError, match=r"takes no option\(s\) \['layer_scale'\]"):
        models.build_trunk(**cfg)
    with pytest.raises(ValueError, match="unknown trunk option"):
        models.trunk_config(depht=18)


def test_cifar_stem_keeps_32px_inputs_large():
    trunk = resnet.build(depth=18, stem="cifar")
    params, state = trunk.init(0)
    assert params["conv1"]["weight"].shape == (64, 3, 3, 3)
    x = torch.randn(2, 3, 32, 32)
    feats, _ = trunk.apply(params, state, x, train=False, features=("conv1", "res1", "res5"))
    expected = torch.relu(torch.nn.functional.batch_norm(
        torch.nn.functional.conv2d(x, params["conv1"]["weight"], None, 1, 1), state["bn1"]["running_mean"],
        state["bn1"]["running_var"], params["bn1"]["weight"], params["bn1"]["bias"], False, 0.0, 1e-5))
    torch.testing.assert_close(feats["conv1"], expected)
    assert torch.equal(feats["res1"], feats["conv1"])  # no max-pool
    assert feats["res5"].shape == (2, 512, 4, 4)
    with pytest.raises(ValueError, match=r"valid: \('imagenet', 'cifar'\)"):
        resnet.build(stem="tiny")


@pytest.mark.parametrize("family", sorted(set(FAMILIES) - {"resnet"}))  # ResNet: tests/test_step.py etc.
def test_compiled_tiny_trunk_equals_eager(family):
    """fullgraph capture (no graph breaks) and functionalised BatchNorm state (aot_eager; inductor
    runs the zoo's frozen trunks in benchmarks/zoo_linear_eval.py), traced as the train step takes
    them, under torch.func.grad_and_value with the features and state as its aux (that composition
    has dropped custom backwards and in-place updates silently in PyTorch): the same features, state
    and gradients as eager, in train mode. One compile: a second, of the forward alone, doubled the time."""
    trunk = models.build_trunk(family, **TINY[family])
    params, state = trunk.init(0)
    x = torch.randn(2, 3, 64 if family == "alexnet" else 32, 64 if family == "alexnet" else 32)  # AlexNet needs 63 px
    deepest = trunk.features[-1]

    def run(params, state, x):
        return trunk.apply(params, state, x, train=True, features=(trunk.features[1], deepest))

    def loss(params):
        features, new_state = run(params, state, x)
        return sum(f.square().mean() for f in features.values()), (features, new_state)

    def grads_and_outputs(params):  # a code object of its own: Dynamo counts recompiles per code object, and
        return torch.func.grad_and_value(loss, has_aux=True)(params)  # grad_and_value's wrapper is everyone's

    (features, new_state), grads = run(params, state, x), torch.func.grad(lambda p: loss(p)[0])(params)
    got_grads, (_, (got_features, got_state)) = torch.compile(grads_and_outputs, fullgraph=True,
                                                              backend="aot_eager")(params)
    for what, want, got, tolerance in (("features", features, got_features, {}), ("state", new_state, got_state, {}),
                                       ("gradient", grads, got_grads, dict(rtol=1e-4, atol=1e-6))):
        want, got = tree.flatten(want), tree.flatten(got)
        assert list(got) == list(want), what
        for name in want:
            torch.testing.assert_close(got[name], want[name], **tolerance, msg=lambda m: f"{what} {name}: {m}")


def test_models_doc_lists_every_feature_and_preset():
    doc = (ROOT / "docs" / "MODELS.md").read_text()
    for family, module in FAMILIES.items():
        assert f"`{family}`" in doc
        for feature in module.FEATURES:
            assert re.search(rf"^\| `{family}` \| `{feature}` \|", doc, re.M), (family, feature)
        for preset in module.PRESETS:
            assert f"`{preset}`" in doc, preset
