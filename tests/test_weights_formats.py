"""Files of other self-supervised libraries, replicated from how each one saves.

Online + momentum copies (solo-learn, lightly, mmpretrain, PyTorch-BYOL), OpenMMLab training
checkpoints with mmengine objects (refused unless ``stub_objects``; nothing from the file runs
either way), and detectron2's numpy pickles.
"""
import os
import pickle
import sys
import types
from collections import OrderedDict

import numpy as np
import pytest
import torch

from fpipe.weights import WeightsError, io, load_into, stubs
from test_weights_fixtures import assert_trunk_is, mlp, prefixed, state_dict, target, trunk


def sequential(sd: dict) -> dict:
    """torchvision names -> nn.Sequential(*list(resnet.children())[:-1]) names (0, 1, 4..7)."""
    index = {"conv1": "0", "bn1": "1", "layer1": "4", "layer2": "5", "layer3": "6", "layer4": "7"}
    return {".".join([index[n.split(".")[0]], *n.split(".")[1:]]): t for n, t in sd.items() if not n.startswith("fc.")}


def save(tmp_path, obj, name="w.ckpt"):
    path = tmp_path / name
    torch.save(obj, path)
    return str(path)


@pytest.mark.parametrize("name, obj, taken", [
    # solo-learn (Lightning): main_linear.py keeps backbone.* (momentum_backbone.* never matches)
    ("solo_learn", lambda: {"epoch": 399, "state_dict": {
        **prefixed("backbone.", trunk(0)), **prefixed("momentum_backbone.", trunk(1)),
        **mlp("projector.", [512, 64]), **mlp("momentum_projector.", [512, 64]),
        "classifier.weight": torch.zeros(10, 512)}, "hyper_parameters": {"lr": 0.1}}, "backbone."),
    # solo-learn before it renamed encoder -> backbone
    ("solo_learn_old", lambda: {"state_dict": {**prefixed("encoder.", trunk(0)), **prefixed("momentum_encoder.", trunk(1))}},
     "encoder."),
    # mmpretrain 1.x MoCo v3 / BYOL: backbone + neck + head; the EMA copy wraps Sequential(backbone, neck)
    ("mmpretrain", lambda: {"meta": {"epoch": 300}, "state_dict": OrderedDict({
        **prefixed("backbone.", trunk(0)), **mlp("neck.mlp.", [512, 256]),
        **prefixed("momentum_encoder.module.0.", trunk(1)), "momentum_encoder.steps": torch.tensor(5)})}, "backbone."),
    ("mmpretrain_byol", lambda: {"state_dict": {**prefixed("backbone.", trunk(0)), **prefixed("target_net.module.0.", trunk(1))}},
     "backbone."),
    # lightly's examples: Sequential children; MoCo/BYOL keep backbone_momentum
    ("lightly", lambda: {"state_dict": {**prefixed("backbone.", sequential(trunk(0))),
                                        **prefixed("backbone_momentum.", sequential(trunk(1))),
                                        **mlp("projection_head.layers.", [512, 128])}}, "backbone."),
    # lightly's DINO example (Lightning): student_backbone + teacher_backbone; the teacher is evaluated
    ("lightly_dino", lambda: {"state_dict": {**prefixed("student_backbone.", sequential(trunk(1))),
                                             **prefixed("teacher_backbone.", sequential(trunk(0))),
                                             **mlp("student_head.layer.", [512, 64])}}, "teacher_backbone."),
    # lightly's DINO benchmark: backbone is the teacher (forward() and the linear eval use it)
    ("lightly_dino_benchmark", lambda: {"state_dict": {**prefixed("backbone.", trunk(0)),
                                                       **prefixed("student_backbone.", trunk(1))}}, "backbone."),
    # PyTorch-BYOL (sthalles): online/target network state dicts of a Sequential encoder
    ("pytorch_byol", lambda: {"online_network_state_dict": prefixed("encoder.", sequential(trunk(0))),
                              "target_network_state_dict": prefixed("encoder.", sequential(trunk(1))),
                              "optimizer_state_dict": {"state": {}}}, "online_network_state_dict"),
    # MoCo's naming in other code: the key encoder as <name>_k, ALBEF/BLIP's momentum model as <name>_m
    ("key_suffix", lambda: {"model": {**prefixed("backbone.", trunk(0)), **prefixed("backbone_k.", trunk(1))}},
     "backbone."),
    ("momentum_suffix", lambda: {"model": {**prefixed("visual_encoder_m.", trunk(1)),
                                           **prefixed("visual_encoder.", trunk(0))}}, "visual_encoder."),
    ("query_key", lambda: {"encoder_query": trunk(0), "encoder_key": trunk(1)}, "encoder_query"),
])
def test_online_copy_is_taken_and_select_takes_the_other(tmp_path, name, obj, taken):
    path = save(tmp_path, obj())
    loaded, report = load_into(target(), {"path": path})
    assert_trunk_is(loaded, trunk(0))
    assert taken in report.state_dict_key + "." + report.remove_prefix or taken in report.reason
    assert "training-only" in report.reason or "evaluates" in report.reason
    other = {"solo_learn": "momentum_backbone", "solo_learn_old": "momentum_encoder", "mmpretrain": "momentum_encoder",
             "mmpretrain_byol": "target_net", "lightly": "backbone_momentum", "pytorch_byol": "target_network_state_dict",
             "lightly_dino": "student_backbone", "lightly_dino_benchmark": "student_backbone",
             "key_suffix": "backbone_k", "momentum_suffix": "visual_encoder_m", "query_key": "encoder_key"}[name]
    loaded, _ = load_into(target(), {"path": path, "select": other})
    assert_trunk_is(loaded, trunk(1))


# ---------------------------------------------------------------- OpenMMLab / mmengine checkpoints

class HistoryBuffer:
    """mmengine.logging.HistoryBuffer as it pickles: numpy histories in its __dict__."""

    def __init__(self, values):
        self.max_length = 1000000
        self._log_history = np.array(values)
        self._count_history = np.ones(len(values))


class Evil:
    """A class whose unpickling would create ``marker`` (by __reduce__) ..."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class EvilState:
    """... or by __setstate__, if the original class were ever used."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __setstate__(self, state):
        open(state["marker"], "w").close()


def mmengine_checkpoint(tmp_path, monkeypatch, *, extra=None) -> str:
    """Saves an mmpretrain 1.x training checkpoint whose classes live in modules that exist only
    while saving (so loading cannot import them, as on a machine without mmengine)."""
    fake = {name: types.ModuleType(name) for name in
            ("mmengine", "mmengine.logging", "mmengine.logging.history_buffer", "evilpkg")}
    for name, module in fake.items():
        monkeypatch.setitem(sys.modules, name, module)
    for cls, module in ((HistoryBuffer, "mmengine.logging.history_buffer"), (Evil, "evilpkg"), (EvilState, "evilpkg")):
        monkeypatch.setattr(cls, "__module__", module)
        setattr(fake[module], cls.__name__, cls)
    obj = {"meta": {"epoch": 200, "mmengine_version": "0.10.3", "cfg": "model = dict(type='MoCoV3')"},
           "state_dict": OrderedDict({**prefixed("backbone.", trunk(0)), **prefixed("momentum_encoder.module.0.", trunk(1))}),
           "message_hub": {"log_scalars": {"train/loss": HistoryBuffer([1.0, 0.5])},
                           "runtime_info": {"epoch": 200}, "resumed_keys": {"epoch": True}},
           "optimizer": {"state": {}, "param_groups": [{"lr": 0.1}]}, **(extra or {})}
    path = save(tmp_path, obj, "epoch_200.pth")
    for name in fake:
        monkeypatch.delitem(sys.modules, name)
    return path


def test_mmengine_checkpoint_is_refused_naming_the_option(tmp_path, monkeypatch):
    path = mmengine_checkpoint(tmp_path, monkeypatch)
    with pytest.raises(WeightsError) as e:
        load_into(target(), {"path": path})
    msg = str(e.value)
    assert "mmengine.logging.history_buffer.HistoryBuffer (at message_hub.log_scalars.train/loss)" in msg
    assert "model.weights.stub_objects=True" in msg and "--stub-objects" in msg
    assert "weights_only=False" not in msg and len(msg.splitlines()) == 1


def test_mmengine_checkpoint_loads_with_stub_objects(tmp_path, monkeypatch):
    path = mmengine_checkpoint(tmp_path, monkeypatch)
    loaded, report = load_into(target(), {"path": path, "stub_objects": True})
    assert_trunk_is(loaded, trunk(0))
    assert report.remove_prefix == "backbone."
    assert any("HistoryBuffer (at message_hub.log_scalars.train/loss)" in n for n in report.notes)


def test_stub_objects_never_runs_code_from_the_file(tmp_path, monkeypatch):
    marker_a, marker_b = tmp_path / "pwned_reduce", tmp_path / "pwned_setstate"
    path = mmengine_checkpoint(tmp_path, monkeypatch, extra={
        "hooks": [Evil(marker_a), EvilState(marker_b)], "nested": {"deeper": (Evil(marker_a),)}})
    loaded, report = load_into(target(), {"path": path, "stub_objects": True})
    assert_trunk_is(loaded, trunk(0))
    assert not marker_a.exists() and not marker_b.exists()
    got = io.read(path, stub_objects=True)
    evil = got["hooks"][0]
    assert isinstance(evil, stubs.StandIn) and evil.qualname == "posix.system"
    assert evil.contents == {"[0]": f"touch {marker_a}"}
    assert isinstance(got["hooks"][1], stubs.StandIn) and got["hooks"][1].contents["state"] == {"marker": str(marker_b)}
    assert not marker_a.exists() and not marker_b.exists()


# ---------------------------------------------------------------- detectron2 pickles

def to_detectron2(sd: dict) -> dict:
    """MoCo's convert-pretrain-to-detectron2.py, step by step, as numpy arrays."""
    out = {}
    for k, v in sd.items():
        if "layer" not in k:
            k = "stem." + k
        for t in [1, 2, 3, 4]:
            k = k.replace(f"layer{t}", f"res{t + 1}")
        for t in [1, 2, 3]:
            k = k.replace(f"bn{t}", f"conv{t}.norm")
        k = k.replace("downsample.0", "shortcut").replace("downsample.1", "shortcut.norm")
        out[k] = v.numpy()
    return out


def test_converted_moco_pkl_loads(tmp_path):
    path = tmp_path / "moco_r18.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": to_detectron2(state_dict(0)), "__author__": "MOCO", "matching_heuristics": True}, f)
    assert io.sniff(str(path)) == "numpy_pickle"
    loaded, report = load_into(target(), {"path": str(path)})
    assert_trunk_is(loaded, trunk(0))
    assert "DETECTRON2_RESNET" in report.reason and report.state_dict_key == "model"
    assert report.not_loaded["model.stem.fc.weight"] == "not in the model"


def test_detection_checkpoint_backbone_loads(tmp_path):
    """A detectron2 model's ResNet sits at backbone.bottom_up.; FrozenBN has no counters."""
    model = {f"backbone.bottom_up.{k}": v for k, v in to_detectron2(trunk(0)).items() if "num_batches" not in k}
    model["backbone.fpn_lateral2.weight"] = np.zeros((256, 64, 1, 1), np.float32)
    model["roi_heads.box_predictor.cls_score.weight"] = np.zeros((81, 1024), np.float32)
    path = tmp_path / "model_final.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": model, "__author__": "Detectron2 Model Zoo"}, f, protocol=2)
    loaded, report = load_into(target(), {"path": str(path)})
    assert_trunk_is(loaded, trunk(0))
    assert report.remove_prefix == "backbone.bottom_up."


def test_pkl_with_code_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": {"conv1.weight": np.zeros(3)}, "x": Evil(marker)}, f)
    with pytest.raises(WeightsError, match=r"evil\.pkl: refused to load posix\.system"):
        load_into(target(), {"path": str(path)})
    assert not marker.exists()


# ---------------------------------------------------------------- VISSL / SEER RegNets

def to_vissl_regnet(name: str, fsdp_groups: bool) -> str:
    """torchvision's RegNet name -> VISSL's (ClassyVision AnyNet under _feature_blocks), by hand."""
    parts = name.split(".")
    if parts[0] == "stem":
        return "_feature_blocks.conv1.stem." + ".".join(parts[1:])
    stage = int(parts[1][len("block"):])                     # trunk_output.block<s>.block<s>-<i>.<rest>
    block, rest = parts[2], ".".join(parts[3:])
    rest = {"proj.0.weight": "proj.weight", "f.c.0.weight": "f.c.weight"}.get(rest, rest)
    for old, new in (("proj.1.", "bn."), ("f.se.fc1.", "f.se.excitation.0."), ("f.se.fc2.", "f.se.excitation.2."),
                     ("f.c.1.", "f.final_bn.")):
        if rest.startswith(old):
            rest = new + rest[len(old):]
    group = f"block{stage}-part0." if fsdp_groups else ""
    return f"_feature_blocks.res{stage + 1}.{group}{block}.{rest}"


@pytest.mark.parametrize("fsdp_groups", [False, True])
def test_seer_regnet_in_vissl_classy_state_dict(fsdp_groups):
    from test_weights_fixtures import seeded
    rows = [r for r in seeded.load_manifest("regnet_y_400mf") if not r[0].startswith("fc.")]
    sd = seeded.seeded_state_dict(rows, 0)
    obj = {"classy_state_dict": {"base_model": {"model": {
        "trunk": {to_vissl_regnet(n, fsdp_groups): t for n, t in sd.items()},
        "heads": {"0.clf.0.weight": torch.zeros(1000, 440)}}}}, "phase_idx": 3}
    regnet_target = {f"trunk.{n}": torch.zeros(s) for n, s, _ in rows}
    loaded, report = load_into(regnet_target, {}, obj=obj)
    assert all(torch.equal(loaded[f"trunk.{n}"], t) for n, t in sd.items() if "num_batches" not in n)
    assert report.trunk_loaded == report.trunk_total and "VISSL_REGNET" in report.reason
    assert report.state_dict_key == "classy_state_dict.base_model.model.trunk"


# ---------------------------------------------------------------- timm RegNet, timm and original ConvNeXt

def marked(rows) -> dict:
    """``{name: its position, broadcast to its shape}``: distinct per tensor, no memory."""
    return {n: torch.full((), float(i)).expand(s) for i, (n, s, _) in enumerate(rows)}


def to_timm_regnet(name: str) -> str:
    parts = name.split(".")
    if parts[0] == "stem":
        return {"0": "stem.conv", "1": "stem.bn"}[parts[1]] + "." + parts[2]
    stage, index = parts[1][len("block"):], int(parts[2].split("-")[1])
    rest = ".".join(parts[3:])
    table = {"f.a.0": "conv1.conv", "f.a.1": "conv1.bn", "f.b.0": "conv2.conv", "f.b.1": "conv2.bn",
             "f.c.0": "conv3.conv", "f.c.1": "conv3.bn", "f.se.fc1": "se.fc1", "f.se.fc2": "se.fc2",
             "proj.0": "downsample.conv", "proj.1": "downsample.bn"}
    module, leaf = rest.rsplit(".", 1)
    return f"s{stage}.b{index + 1}.{table[module]}.{leaf}"


def to_convnext(name: str, timm: bool) -> tuple:
    """torchvision ConvNeXt name -> (timm or original name, whether the tensor is a [C] layer scale)."""
    parts = name.split(".")
    feature, rest = int(parts[1]), parts[2:]
    if feature == 0:
        return (f"stem.{rest[0]}." if timm else f"downsample_layers.0.{rest[0]}.") + rest[1], False
    if feature % 2 == 0:
        s = feature // 2
        return (f"stages.{s}.downsample.{rest[0]}." if timm else f"downsample_layers.{s}.{rest[0]}.") + rest[1], False
    s, i = (feature - 1) // 2, rest[0]
    head = f"stages.{s}.blocks.{i}." if timm else f"stages.{s}.{i}."
    if rest[1] == "layer_scale":
        return head + "gamma", True
    names = {"0": "conv_dw" if timm else "dwconv", "2": "norm", "3": "mlp.fc1" if timm else "pwconv1",
             "5": "mlp.fc2" if timm else "pwconv2"}
    return head + names[rest[2]] + "." + rest[3], False


def test_timm_regnet_names_load():
    from test_weights_fixtures import seeded
    rows = [r for r in seeded.load_manifest("regnet_y_400mf") if not r[0].startswith("fc.")]
    sd = marked(rows)
    loaded, report = load_into({f"trunk.{n}": torch.zeros(s) for n, s, _ in rows}, {},
                               obj={to_timm_regnet(n): t for n, t in sd.items()})
    assert all(torch.equal(loaded[f"trunk.{n}"], t) for n, t in sd.items() if "num_batches" not in n)
    assert "TIMM_REGNET" in report.reason


@pytest.mark.parametrize("timm", [True, False])
def test_timm_and_original_convnext_names_load_with_layer_scales_reshaped(timm):
    from test_weights_fixtures import seeded
    rows = [r for r in seeded.load_manifest("convnext_tiny") if not r[0].startswith("classifier.")]
    sd = marked(rows)
    obj = {}
    for n, t in sd.items():
        name, flat = to_convnext(n, timm)
        obj[name] = t.reshape(-1) if flat else t
    loaded, report = load_into({f"trunk.{n}": torch.zeros(()).expand(s) for n, s, _ in rows}, {},
                               obj={"model": obj} if not timm else obj)
    assert all(torch.equal(loaded[f"trunk.{n}"], t) for n, t in sd.items())
    assert loaded["trunk.features.1.0.layer_scale"].shape == (96, 1, 1)
    assert ("TIMM_CONVNEXT" if timm else "FB_CONVNEXT") in report.reason


# ---------------------------------------------------------------- timm EfficientNet

def timm_efficientnet_modules(spec) -> list:
    """timm's module names of an EfficientNet in the order its ``__init__`` creates them:
    conv_stem, bn1; blocks.<s>.<b> (stage 0 DepthwiseSeparableConv: conv_dw, bn1, se, conv_pw,
    bn2; the others InvertedResidual: conv_pw, bn1, conv_dw, bn2, se, conv_pwl, bn3); conv_head, bn2."""
    ds = ("conv_dw", "bn1", "se.conv_reduce", "se.conv_expand", "conv_pw", "bn2")
    ir = ("conv_pw", "bn1", "conv_dw", "bn2", "se.conv_reduce", "se.conv_expand", "conv_pwl", "bn3")
    names = ["conv_stem", "bn1"]
    for s, blocks in enumerate(spec.stages()):
        names += [f"blocks.{s}.{b}.{m}" for b in range(len(blocks)) for m in (ds if s == 0 else ir)]
    return names + ["conv_head", "bn2"]


@pytest.mark.parametrize("preset", ["efficientnet_b0", "efficientnet_b4"])
def test_timm_efficientnet_names_load_every_tensor(preset, tmp_path):
    """A replica of a timm EfficientNet file: fpipe's tensors (random values) under timm's names,
    paired module by module in creation order (torchvision's and timm's orders agree)."""
    from fpipe.models import efficientnet
    from fpipe.tree import flatten
    from fpipe.weights import cli
    trunk = efficientnet.build(**efficientnet.PRESETS[preset])
    params, state = trunk.init(0)
    ours = cli.torchvision_order(flatten(params), flatten(state))
    g = torch.Generator().manual_seed(1)
    values = {n: t if n.endswith("num_batches_tracked") else torch.randn(t.shape, generator=g) for n, t in ours.items()}
    modules = list(dict.fromkeys(n.rsplit(".", 1)[0] for n in ours))
    timm_modules = timm_efficientnet_modules(trunk.spec)
    assert len(modules) == len(timm_modules)
    timm_name = dict(zip(modules, timm_modules))
    f = {f"{timm_name[n.rsplit('.', 1)[0]]}.{n.rsplit('.', 1)[1]}": t for n, t in values.items()}
    f["classifier.weight"], f["classifier.bias"] = torch.zeros(1000, trunk.spec.head_width), torch.zeros(1000)
    assert f["blocks.0.0.conv_dw.weight"].shape[1] == 1 and f["blocks.1.0.conv_dw.weight"].shape[1] == 1
    path = tmp_path / "timm.pth"
    torch.save({"state_dict": f}, path)
    loaded, report = load_into({f"trunk.{n}": torch.zeros_like(t) for n, t in ours.items()}, {"path": str(path)})
    assert all(torch.equal(loaded[f"trunk.{n}"], t) for n, t in values.items() if "num_batches" not in n)
    assert not report.missing and report.trunk_loaded == report.trunk_total
    assert "TIMM_EFFICIENTNET" in report.reason
    assert {n: why for n, why in report.not_loaded.items() if "num_batches" not in n} == {
        "state_dict.classifier.weight": "not in the model", "state_dict.classifier.bias": "not in the model"}


def whole_model(sd: dict) -> torch.nn.Module:
    """``torch.save(model)``'s object: nested nn.Modules whose parameters and buffers carry ``sd``'s
    names, plus a non-persistent buffer (not in a state_dict, so not loaded either)."""
    root = torch.nn.Module()
    for name, tensor in sd.items():
        *path, leaf = name.split(".")
        module = root
        for part in path:
            if not hasattr(module, part):
                module.add_module(part, torch.nn.Module())
            module = getattr(module, part)
        if tensor.is_floating_point() and not leaf.startswith("running_"):
            module.register_parameter(leaf, torch.nn.Parameter(tensor.clone()))
        else:
            module.register_buffer(leaf, tensor.clone())
    root.layer1.register_buffer("cache", torch.zeros(3), persistent=False)
    return root


def test_a_whole_pickled_model_loads_with_stub_objects_under_its_state_dict_names(tmp_path):
    """torch.save(model) (tutorials' model.pth): refused by default, naming what it is; with
    stub_objects its modules become dicts of their parameters, buffers and submodules."""
    path = tmp_path / "model.pth"
    torch.save({"epoch": 3, "model": whole_model(state_dict(0))}, path)
    with pytest.raises(WeightsError, match=r"a whole pickled model \(torch.save\(model\)\); its tensors come out "
                                           r"under their state_dict names\. .*stub_objects=True"):
        load_into(target(), {"path": str(path)})
    loaded, report = load_into(target(), {"path": str(path), "stub_objects": True})
    assert_trunk_is(loaded, trunk(0))
    assert report.state_dict_key == "model" and not report.remove_prefix
    assert not any("cache" in n for n in report.not_loaded)  # non-persistent: not part of the model's state


@pytest.mark.parametrize("name, obj, key", [
    ("list", lambda: [trunk(0)], "0"),
    ("model_and_optimizer", lambda: (trunk(0), {"state": {0: {"momentum_buffer": torch.zeros(3)}},
                                                "param_groups": [{"lr": 0.1, "params": [0, 1]}]}), "0"),
    ("list_in_a_dict", lambda: {"epoch": 3, "models": [trunk(0)]}, "models.0"),
    ("nested", lambda: [[{"lr": 0.1}, trunk(0)]], "0.1"),
])
def test_a_state_dict_inside_a_list_or_tuple_loads_under_its_position(tmp_path, name, obj, key):
    """Lists and tuples holding containers are keyed by position ("0", "1", …); lists of numbers stay leaves."""
    loaded, report = load_into(target(), {"path": save(tmp_path, obj())})
    assert report.state_dict_key == key and report.trunk_loaded == report.trunk_total
    assert_trunk_is(loaded, trunk(0))
    loaded, report = load_into(target(), {"path": save(tmp_path, obj()), "state_dict_key": key})
    assert_trunk_is(loaded, trunk(0))
    with pytest.raises(WeightsError, match="holds a list, not a dict of named tensors"):
        load_into(target(), {"path": save(tmp_path, [1, 2, 3])})


def test_lists_shared_many_ways_are_converted_once():
    """40 levels of [x, x]: 2^40 paths to one state dict, each container converted and read once."""
    from fpipe.weights import walk
    obj = [trunk(0)]
    for _ in range(40):
        obj = [obj, obj]
    converted = walk.positions_as_keys(obj)
    assert converted["0"] is converted["1"]
    loaded, report = load_into(target(), {}, obj=obj)
    assert report.state_dict_key == ".".join(["0"] * 41) and report.trunk_loaded == report.trunk_total
    assert_trunk_is(loaded, trunk(0))
