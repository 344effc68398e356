"""load_into on every layout of shared/FORMATS.md, and on layouts fpipe has never seen."""
import ast
import json
import re

import pytest
import torch

from fpipe.weights import WeightsError, default_config, load_into
from fpipe.weights import detect
from test_weights_fixtures import (assert_trunk_is, layouts, mlp, prefixed, state_dict, target, trunk)

LAYOUTS = layouts()
EXPECTED_SOURCE = {  # layout -> (state_dict_key, remove_prefix) the report must name
    "torchvision": ("", ""),
    "timm_training": ("state_dict_ema", ""),
    "moco_v2": ("state_dict", "module.encoder_q."),
    "moco_v3": ("state_dict", "module.base_encoder."),
    "dino": ("teacher", "module.backbone."),
    "swav_training": ("state_dict", "module."),
    "barlow_training": ("model", "module.backbone."),
    "simsiam": ("state_dict", "module.encoder."),
    "vissl_pretraining": ("classy_state_dict.base_model.model.trunk", "_feature_blocks."),
    "vissl_linear_eval": ("classy_state_dict.base_model.model.trunk", "base_model._feature_blocks."),
    "byol_lucidrains": ("", "learner.online_encoder.net."),
    "model_prefix": ("state", "model."),
    "sequential_encoder": ("", "encoder_q.0."),
    "never_seen": ("ckpt.weights", "zz_net.trunk_v7."),
}


def save(tmp_path, obj, name="w.pth"):
    path = tmp_path / name
    torch.save(obj, path)
    return str(path)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Each layout written once per module: ``saved(layout) -> path``."""
    paths = {}
    folder = tmp_path_factory.mktemp("layouts")

    def path_of(layout):
        if layout not in paths:
            paths[layout] = save(folder, LAYOUTS[layout][0], f"{layout}.pth")
        return paths[layout]
    return path_of


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_auto_loads_the_evaluated_trunk_exactly(saved, layout):
    seed = LAYOUTS[layout][1]
    loaded, report = load_into(target(), {"path": saved(layout)})
    assert_trunk_is(loaded, trunk(seed))
    assert report.trunk_loaded == report.trunk_total == 100  # resnet18: 120 tensors, 20 counters
    assert not report.missing
    if layout in EXPECTED_SOURCE:
        assert (report.state_dict_key, report.remove_prefix) == EXPECTED_SOURCE[layout]
    json.dumps(report.to_dict())  # JSON-able


@pytest.mark.parametrize("layout, copy, convention", [
    ("moco_v2", "module.encoder_q.", "MoCo"), ("moco_v3", "module.base_encoder.", "MoCo v3"),
    ("dino", "teacher.", "DINO"), ("timm_training", "state_dict_ema.", "timm"),
    ("byol_lucidrains", "learner.online_encoder.", "BYOL"), ("vissl_pretraining", "base_model", "training-only")])
def test_several_copies_resolved_by_convention_and_reported(tmp_path, layout, copy, convention, saved):
    _, report = load_into(target(), {"path": saved(layout)})
    assert copy in report.reason and convention in report.reason and "select" in report.reason
    assert len(report.candidates) >= 2
    summary = report.summary()
    assert "100/100" in summary and "outside the chosen copy" in summary


def test_select_takes_the_other_copy(tmp_path, saved):
    path = saved("dino")
    loaded, report = load_into(target(), {"path": path, "select": "student"})
    assert_trunk_is(loaded, trunk(1))
    assert report.state_dict_key == "student"
    loaded, _ = load_into(target(), {"path": path, "select": "teacher.module.backbone."})
    assert_trunk_is(loaded, trunk(0))
    with pytest.raises(WeightsError, match="select='nobody' matches 0"):
        load_into(target(), {"path": path, "select": "nobody"})
    # with the copy named otherwise (an explicit format or prefix), a select would be ignored: refused
    for explicit in ({"format": "torchvision", "state_dict_key": "teacher"}, {"remove_prefix": "teacher.module."}):
        with pytest.raises(WeightsError, match="select='student' chooses among the copies format: auto finds"):
            load_into(target(), {"path": path, "select": "student", **explicit})


def test_no_convention_refuses_and_lists_candidates(tmp_path):
    obj = {**prefixed("net_a.", trunk(0)), **prefixed("net_b.", trunk(1))}
    with pytest.raises(WeightsError) as e:
        load_into(target(), {"path": save(tmp_path, obj)})
    msg = str(e.value)
    assert "no convention decides" in msg and "net_a.: 100/100" in msg and "net_b.: 100/100" in msg


def test_identical_copies_are_not_ambiguous(tmp_path):
    sd = trunk(0)
    clone = {n: t.clone() for n, t in sd.items()}
    obj = {"net_a": sd, "net_b": clone}
    loaded, report = load_into(target(), {"path": save(tmp_path, obj)})
    assert_trunk_is(loaded, sd)
    assert "identical" in report.reason
    assert set(report.not_loaded.values()) >= {"identical copy at 'net_b.'"}


def test_projectors_and_queues_are_reported_not_loaded(tmp_path, saved):
    _, report = load_into(target(heads=True), {"path": saved("moco_v2")})
    nl = report.not_loaded
    assert nl["state_dict.module.queue"].startswith("outside the chosen copy")
    assert nl["state_dict.module.encoder_k.conv1.weight"].startswith("outside the chosen copy")
    assert nl["state_dict.module.encoder_q.fc.0.weight"] == "not in the model"
    assert nl["state_dict.module.encoder_q.bn1.num_batches_tracked"] == "skip_layers"
    assert not report.heads_loaded


def test_heads_load_only_when_asked(tmp_path):
    sd = state_dict(0)
    path = save(tmp_path, prefixed("backbone.", sd))
    loaded, report = load_into(target(heads=True), {"path": path})
    assert torch.equal(loaded["heads.fc.weight"], torch.zeros(1000, 512))
    assert report.not_loaded["backbone.fc.weight"] == "head (load_heads=False)"
    loaded, report = load_into(target(heads=True), {"path": path, "load_heads": True})
    assert torch.equal(loaded["heads.fc.weight"], sd["fc.weight"])
    assert report.heads_loaded == ["heads.fc.weight", "heads.fc.bias"]


def test_load_heads_without_heads_in_file_fails(tmp_path, saved):
    path = saved("barlow_released")
    with pytest.raises(WeightsError, match="load_heads=True but no head"):
        load_into(target(heads=True), {"path": path, "load_heads": True})


def test_wrong_explicit_prefix_fails_with_the_fix(tmp_path, saved):
    path = saved("moco_v2")
    with pytest.raises(WeightsError) as e:
        load_into(target(), {"path": path, "state_dict_key": "state_dict", "remove_prefix": "module."})
    msg = str(e.value)
    assert "only 0/100 trunk tensors" in msg and "trunk.conv1.weight" in msg
    assert "encoder_q.conv1.weight" in msg  # the file side
    assert "remove_prefix='module.encoder_q.'" in msg and "state_dict_key='state_dict'" in msg


def test_wrong_state_dict_key_suggests_close_names(tmp_path, saved):
    path = saved("moco_v2")
    with pytest.raises(WeightsError, match="Did you mean 'state_dict'"):
        load_into(target(), {"path": path, "state_dict_key": "state_dic"})


def test_explicit_settings_override_detection(tmp_path, saved):
    path = saved("moco_v2")
    cfg = {"path": path, "state_dict_key": "state_dict", "remove_prefix": "module.encoder_k."}
    loaded, report = load_into(target(), cfg)
    assert_trunk_is(loaded, trunk(1))  # the copy auto would not take
    assert report.reason.startswith("explicit")


def test_vissl_nested_layout_loads_by_config_alone(tmp_path, saved):
    for layout in ("vissl_pretraining", "vissl_linear_eval"):
        path = saved(layout)
        loaded, report = load_into(target(), {"path": path, "format": "vissl"})
        assert_trunk_is(loaded, trunk(0))
        assert report.format == "vissl"
    cfg = {"path": path, "format": "torchvision", "state_dict_key": "classy_state_dict.base_model.model.trunk",
           "remove_prefix": "base_model._feature_blocks."}
    assert_trunk_is(load_into(target(), cfg)[0], trunk(0))


def test_torchvision_format_loads_by_config_alone(tmp_path, saved):
    cfg = default_config()
    cfg.path = saved("torchvision")
    cfg.format = "torchvision"
    loaded, report = load_into(target(), cfg)
    assert_trunk_is(loaded, trunk(0))
    assert report.not_loaded == {**{n: "skip_layers" for n in state_dict(0) if n.endswith("tracked")},
                                 "fc.weight": "not in the model", "fc.bias": "not in the model"}
    with pytest.raises(WeightsError, match="remove_prefix='module.'"):
        load_into(target(), {"path": saved("swav_training"), "format": "torchvision"})


def test_safetensors_file(tmp_path):
    from safetensors.torch import save_file
    path = str(tmp_path / "model.safetensors")
    save_file({n: t.contiguous() for n, t in state_dict(0).items()}, path)
    assert_trunk_is(load_into(target(), {"path": path})[0], trunk(0))


def test_fpipe_checkpoint_loads_directly(tmp_path):
    sd = state_dict(0)
    params = {f"trunk.{n}": t for n, t in sd.items() if "running" not in n and "tracked" not in n and "fc" not in n}
    params |= {"heads.fc.weight": sd["fc.weight"], "heads.fc.bias": sd["fc.bias"]}
    model_state = {f"trunk.{n}": t for n, t in sd.items() if "running" in n or "tracked" in n}
    path = save(tmp_path, {"params": params, "model_state": model_state, "opt_state": {"x": torch.ones(3)}, "step": 5})
    loaded, report = load_into(target(heads=True), {"path": path, "load_heads": True, "skip_layers": []})
    assert report.format == "fpipe"
    for n, t in (params | model_state).items():
        assert torch.equal(loaded[n], t), n
    assert report.not_loaded == {"opt_state.x": "not a params/model_state entry of trunk.* or heads.*"}


def test_partial_trunk_is_an_error_unless_allowed(tmp_path):
    sd = trunk(0)
    del sd["layer4.1.conv2.weight"]
    path = save(tmp_path, prefixed("backbone.", sd))
    with pytest.raises(WeightsError, match=r"(?s)only 99/100 .*trunk.layer4.1.conv2.weight"):
        load_into(target(), {"path": path})
    loaded, report = load_into(target(), {"path": path, "allow_partial": True})
    assert report.missing == ["trunk.layer4.1.conv2.weight"] and report.trunk_coverage == 0.99
    assert torch.equal(loaded["trunk.layer4.1.conv2.weight"], torch.zeros(512, 512, 3, 3))
    assert "MISSING" in report.summary()


def test_shape_mismatch_is_an_error_unless_allowed(tmp_path):
    sd = trunk(0)
    sd["layer1.0.conv1.weight"] = torch.zeros(64, 64, 1, 1)
    path = save(tmp_path, sd)
    with pytest.raises(WeightsError, match=r"trunk.layer1.0.conv1.weight: file \[64, 64, 1, 1\] vs model \[64, 64, 3, 3\]"):
        load_into(target(), {"path": path, "format": "torchvision"})
    _, report = load_into(target(), {"path": path, "format": "torchvision", "allow_partial": True})
    assert report.shape_mismatches == [("trunk.layer1.0.conv1.weight", (64, 64, 1, 1), (64, 64, 3, 3))]


def test_other_depth_is_named_as_a_shape_problem(tmp_path):
    wide = {n: torch.zeros([2 * s[0], *s[1:]] if s else s) for n, s in
            ((n, list(t.shape)) for n, t in trunk(0).items())}
    with pytest.raises(WeightsError, match="shapes differ"):
        load_into(target(), {"path": save(tmp_path, wide)})


def test_no_trunk_at_all(tmp_path):
    with pytest.raises(WeightsError, match="no trunk of the model found"):
        load_into(target(), {"path": save(tmp_path, {"a.weight": torch.ones(3)})})


def test_dtype_is_cast_to_the_models_and_reported(tmp_path):
    half = {n: t.half() if t.is_floating_point() else t for n, t in trunk(0).items()}
    loaded, report = load_into(target(), {"path": save(tmp_path, half)})
    assert loaded["trunk.conv1.weight"].dtype == torch.float32
    assert torch.equal(loaded["trunk.conv1.weight"], half["conv1.weight"].float())
    assert len(report.dtype_casts) == 100 and report.dtype_casts[0][1:] == ("float16", "float32")


def test_counters_are_not_weights(tmp_path, saved):
    _, report = load_into(target(), {"path": saved("torchvision_pre_0_4_1")})
    assert report.trunk_total == 100 and not report.missing
    loaded, _ = load_into(target(), {"path": saved("torchvision"), "skip_layers": []})
    assert loaded["trunk.bn1.num_batches_tracked"].dtype == torch.int64


def test_rename_and_append_prefix_reach_the_model(tmp_path):
    sd = {n.replace("layer", "stage"): t for n, t in trunk(0).items()}
    path = save(tmp_path, prefixed("enc.", sd))
    cfg = {"path": path, "remove_prefix": "enc.", "rename": [(r"^stage", "layer")]}
    assert_trunk_is(load_into(target(), cfg)[0], trunk(0))
    path = save(tmp_path, {n[len("layer"):] if n.startswith("layer") else n: t for n, t in trunk(0).items()})
    with pytest.raises(WeightsError):  # stem names would become layerconv1.weight
        load_into(target(), {"path": path, "format": "torchvision", "append_prefix": "layer"})


def test_empty_path_keeps_the_init_and_says_so():
    t = target()
    loaded, report = load_into(t, {"path": ""})
    assert loaded.keys() == t.keys() and all(loaded[n] is t[n] for n in t)
    assert "keeps its initialisation" in report.summary()


def test_nested_target_is_accepted(tmp_path, saved):
    from fpipe.tree import unflatten
    loaded, _ = load_into(unflatten(target()), {"path": saved("torchvision")})
    assert_trunk_is(loaded, trunk(0))


def test_find_trunks_ranks_full_copies_first():
    flat = {**prefixed("a.", trunk(0)), **{k: v for k, v in prefixed("b.", trunk(1)).items() if "layer4" not in k}}
    shapes = {n: tuple(t.shape) for n, t in trunk(0).items()}
    cands = detect.find_trunks(flat, shapes)
    assert [c.prefix for c in cands[:2]] == ["a.", "b."]
    assert cands[0].coverage == 1 and 0.5 < cands[1].coverage < 1


def test_vissl_linear_eval_heads_load_by_their_order(tmp_path):
    """VISSL numbers its heads (heads.<i>.*) in the config's order; fpipe's keep that order."""
    heads = {f"{i}.{part}": torch.randn(shape) for i in range(2) for part, shape in (
        ("channel_bn.weight", (64,)), ("channel_bn.bias", (64,)), ("channel_bn.running_mean", (64,)),
        ("channel_bn.running_var", (64,)), ("channel_bn.num_batches_tracked", ()),
        ("clf.clf.0.weight", (10, 64)), ("clf.clf.0.bias", (10,)))}
    ta = prefixed("base_model._feature_blocks.", trunk(0))
    path = tmp_path / "vissl_eval.torch"
    torch.save({"classy_state_dict": {"base_model": {"model": {"trunk": ta, "heads": heads}}}}, path)
    names = ("res2", "res3")
    tgt = dict(target())
    for name in names:
        tgt.update({f"heads.{name}.{part}": torch.zeros(heads[f"0.{part}"].shape)
                    for part in ("channel_bn.weight", "channel_bn.bias", "channel_bn.running_mean",
                                 "channel_bn.running_var", "clf.clf.0.weight", "clf.clf.0.bias")})
    loaded, report = load_into(tgt, {"path": str(path), "format": "vissl", "load_heads": True})
    for i, name in enumerate(names):
        assert torch.equal(loaded[f"heads.{name}.clf.clf.0.weight"], heads[f"{i}.clf.clf.0.weight"])
        assert torch.equal(loaded[f"heads.{name}.channel_bn.running_var"], heads[f"{i}.channel_bn.running_var"])
    assert len(report.heads_loaded) == 12 and "VISSL heads" in report.reason
    assert_trunk_is(loaded, trunk(0))
    with pytest.raises(WeightsError, match=r"VISSL head 1 .* has no counterpart: the model has 1 head\(s\) \['res2'\]"):
        load_into({k: v for k, v in tgt.items() if not k.startswith("heads.res3")},
                  {"path": str(path), "format": "vissl", "load_heads": True})


def registry_trunk(name: str) -> dict:
    """torchvision names -> fpipe's own seeded init of a registry trunk (nothing downloaded)."""
    from fpipe.models import model
    from fpipe.tree import flatten
    if name not in _TRUNKS:
        params, state = model.build_trunk(name).init(0)
        _TRUNKS[name] = flatten(params) | flatten(state)
    return dict(_TRUNKS[name])


_TRUNKS = {}


def as_fpipe_checkpoint(sd: dict) -> dict:
    """``sd`` as an fpipe run's checkpoint holds it: params and BatchNorm statistics by model name."""
    is_state = lambda n: "running" in n or n.endswith("tracked")
    return {"params": {f"trunk.{n}": t for n, t in sd.items() if not is_state(n)},
            "model_state": {f"trunk.{n}": t for n, t in sd.items() if is_state(n)}, "step": 4}


@pytest.mark.parametrize("layout", ["torchvision", "fpipe"])
def test_deeper_resnet_into_a_shallower_one_is_refused_naming_the_count_and_the_fix(tmp_path, layout):
    """A ResNet-34 file covers every ResNet-18 name; its extra blocks must not be dropped silently."""
    r34 = registry_trunk("resnet34")
    path = save(tmp_path, r34 if layout == "torchvision" else as_fpipe_checkpoint(r34))
    with pytest.raises(WeightsError) as e:
        load_into(target(), {"path": path})
    msg = str(e.value)
    assert "80 file tensors belong to trunk blocks the model does not have" in msg  # 8 blocks x 10
    assert "layer1.2.*" in msg and "layer1.2.conv1.weight" in msg
    assert "the file holds resnet34 (inferred" in msg and "the model is resnet18" in msg
    assert "set model.trunk.name=resnet34" in msg and "model.weights.skip_layers=" in msg
    skip = ast.literal_eval(msg.split("model.weights.skip_layers=")[1].rstrip("."))  # the fix as given
    assert skip[0] == "num_batches_tracked" and "layer3.5." in skip and len(skip) == 9
    loaded, report = load_into(target(), {"path": path, "skip_layers": skip})
    assert report.trunk_loaded == report.trunk_total == 100
    assert all(torch.equal(loaded[n], r34[n[len("trunk."):]]) for n in report.loaded)


@pytest.mark.parametrize("layout", ["torchvision", "fpipe"])
def test_shallower_resnet_file_names_the_architecture_not_a_prefix(tmp_path, layout):
    r18 = registry_trunk("resnet18")
    path = save(tmp_path, r18 if layout == "torchvision" else as_fpipe_checkpoint(r18))
    tgt = {f"trunk.{n}": torch.zeros_like(t) for n, t in registry_trunk("resnet34").items()}
    with pytest.raises(WeightsError) as e:
        load_into(tgt, {"path": path})
    first, *rest = str(e.value).splitlines()  # the weights CLI shows the first line only
    assert "only 100/180 trunk tensors" in first
    assert "the file holds resnet18 (inferred" in first and "the model is resnet34" in first
    assert "set model.trunk.name=resnet18" in first
    assert "remove_prefix" not in str(e.value) and "state_dict_key" not in str(e.value)


def test_classifier_and_projection_heads_next_to_the_trunk_still_load(tmp_path):
    """Leftovers that are not the trunk's own blocks stay "not loaded": a classifier, projectors,
    prototypes, and alexnet's fc8 (classifier.6, a head beside the trunk's classifier.4)."""
    sd = {**state_dict(0), **mlp("projection_head.", [512, 256, 128]), **mlp("fc.", [512, 512, 128]),
          "prototypes.weight": torch.randn(300, 128)}
    loaded, report = load_into(target(), {"path": save(tmp_path, sd)})
    assert_trunk_is(loaded, trunk(0))
    assert {report.not_loaded[n] for n in ("fc.weight", "fc.0.weight", "projection_head.2.bias",
                                           "prototypes.weight")} == {"not in the model"}
    alexnet = registry_trunk("alexnet")
    tgt = {f"trunk.{n}": torch.zeros_like(t) for n, t in alexnet.items()}
    path = save(tmp_path, {**alexnet, "classifier.6.weight": torch.zeros(1000, 4096),
                           "classifier.6.bias": torch.zeros(1000)}, "alexnet.pth")
    _, report = load_into(tgt, {"path": path})
    assert report.trunk_loaded == report.trunk_total and report.not_loaded["classifier.6.weight"] == "not in the model"


@pytest.mark.parametrize("file_trunk, model_trunk, failure", [
    ("regnet_y_400mf", "regnet_y_800mf", "have other shapes than the model's"),
    ("efficientnet_b0", "resnet18", "no trunk of the model found"),
    ("resnet18", "regnet_y_400mf", "no trunk of the model found"),
    ("efficientnet_b1", "efficientnet_b0", "belong to trunk blocks the model does not have"),  # B0's names all in B1
])
def test_another_familys_trunk_is_named_with_the_setting_that_fits(tmp_path, file_trunk, model_trunk, failure):
    """Beyond ResNet depths: a file holding any registry preset whole, loaded into another trunk,
    names that preset and the model.trunk.name that loads it (the model's own names in the message)."""
    path = save(tmp_path, registry_trunk(file_trunk))
    tgt = {f"trunk.{n}": torch.zeros_like(t) for n, t in registry_trunk(model_trunk).items()}
    with pytest.raises(WeightsError) as e:
        load_into(tgt, {"path": path})
    first = str(e.value).splitlines()[0]
    assert failure in first and f"the file holds {file_trunk} (inferred" in first
    assert re.search(rf"set model\.trunk\.name={file_trunk}[.,]", first), first
    if "no trunk" in failure:  # the example names are the model's, not a ResNet's
        assert next(iter(tgt))[len("trunk."):] in first


def test_a_partial_file_of_the_models_own_trunk_names_no_other_architecture(tmp_path):
    sd = registry_trunk("regnet_y_400mf")
    path = save(tmp_path, {n: t for n, t in sd.items() if ".block4." not in n})
    tgt = {f"trunk.{n}": torch.zeros_like(t) for n, t in sd.items()}
    with pytest.raises(WeightsError, match="trunk tensors would be loaded") as e:
        load_into(tgt, {"path": path})
    assert "the file holds" not in str(e.value)
