"""Each name transform alone, the report, and the ``model.weights`` options."""
import json

import ml_collections
import pytest
import torch

from fpipe.weights import WeightsError, config, default_config, transforms
from fpipe.weights.detect import advice, split_prefix
from fpipe.weights.report import LoadReport

T = torch.zeros(1)


def test_tensor_leaves_walks_nested_dicts_and_ignores_other_leaves():
    obj = {"a": {"b": {"c.d": T, "n": 3, "s": "x"}, "lst": [T]}, "e": T, "ns": None}
    assert list(transforms.tensor_leaves(obj)) == ["a.b.c.d", "e"]
    assert transforms.dict_paths(obj) == ["a", "a.b"]


def test_select_by_key_and_dotted_path():
    flat = {"classy_state_dict.base_model.model.trunk._feature_blocks.conv1.weight": 1,
            "classy_state_dict.base_model.model.heads.0.clf.0.weight": 2, "state_dict.x": 3}
    assert transforms.select(flat, "classy_state_dict.base_model.model.trunk") == {"_feature_blocks.conv1.weight": 1}
    assert transforms.select(flat, "state_dict") == {"x": 3}
    assert transforms.select(flat, "") == flat
    with pytest.raises(WeightsError, match="Did you mean 'state_dict'"):
        transforms.select(flat, "state_dicts")


def test_remove_prefix_leaves_other_names_alone():
    flat = {"module.conv1.weight": 1, "queue": 2}
    assert transforms.remove_prefix(flat, "module.") == {"conv1.weight": 1, "queue": 2}
    with pytest.raises(WeightsError, match="become 'conv1.weight'"):
        transforms.remove_prefix({"module.conv1.weight": 1, "conv1.weight": 2}, "module.")


def test_append_prefix():
    assert transforms.append_prefix({"conv1.weight": 1}, "trunk.") == {"trunk.conv1.weight": 1}


def test_skip_by_substring_and_regex():
    flat = {"bn1.num_batches_tracked": 1, "bn1.weight": 2, "fc.0.weight": 3, "fc0x": 4}
    kept, skipped = transforms.skip(flat, ["num_batches_tracked", r"^fc\.\d"])
    assert kept == {"bn1.weight": 2, "fc0x": 4}
    assert skipped == {"bn1.num_batches_tracked": 1, "fc.0.weight": 3}


def test_rename_first_matching_rule_wins():
    rules = [(r"^stage(\d)", r"layer\1"), (r"^layer", "never")]
    assert transforms.rename({"stage1.0.w": 1, "layer2.w": 2, "conv1.w": 3}, rules) == {
        "layer1.0.w": 1, "never2.w": 2, "conv1.w": 3}


def test_transforms_do_not_mutate_their_input():
    flat = {"module.a": 1}
    transforms.remove_prefix(flat, "module.")
    transforms.rename(flat, [("a", "b")])
    assert flat == {"module.a": 1}


def test_split_prefix_and_advice():
    paths = ["state_dict", "teacher"]
    assert split_prefix("state_dict.module.encoder_q.", paths) == ("state_dict", "module.encoder_q.")
    assert split_prefix("module.", paths) == ("", "module.")
    assert advice("teacher.module.backbone.", paths) == (
        "set model.weights.state_dict_key='teacher', model.weights.remove_prefix='module.backbone.'")


def test_default_config_and_resolve():
    cfg = default_config()
    assert isinstance(cfg, ml_collections.ConfigDict)
    assert cfg.format == "auto" and list(cfg.skip_layers) == ["num_batches_tracked"] and not cfg.allow_partial
    opts = config.resolve(cfg)
    assert opts == config.resolve(None) and opts.format == "auto" and opts.path == ""
    opts = config.resolve({"path": "x.pth", "rename": [["a", "b"]], "skip_layers": "fc"})
    assert opts.rename == (("a", "b"),) and opts.skip_layers == ("fc",) and opts.format == "auto"


def test_unknown_option_lists_the_valid_ones():
    with pytest.raises(WeightsError, match=r"unknown model.weights option\(s\) \['remove_prefixes'\]; valid: path, format"):
        config.resolve({"remove_prefixes": "module."})
    with pytest.raises(WeightsError, match="format='timm'"):
        config.resolve({"format": "timm"})
    with pytest.raises(WeightsError, match="rename"):
        config.resolve({"rename": ["abc"]})


def test_report_summary_and_dict():
    r = LoadReport(path="w.pth", format="auto", source="remove_prefix='module.'", reason="only copy",
                   loaded=["trunk.conv1.weight"], missing=["trunk.fc"], trunk_loaded=1, trunk_total=2,
                   not_loaded={"module.queue": "not in the model", "module.encoder_k.a.b": "outside",
                               "module.encoder_k.c.d": "outside"},
                   shape_mismatches=[("trunk.x", (1, 2), (2, 1))], dtype_casts=[("trunk.y", "float16", "float32")],
                   roots=["conv1"])
    text = r.summary()
    assert "trunk: 1/2 tensors loaded (50.0%)" in text and "MISSING" in text and "module.queue" in text
    assert "module.encoder_k.* (2)" in text and "SHAPE MISMATCH trunk.x: file [1, 2] vs model [2, 1]" in text
    d = json.loads(json.dumps(r.to_dict()))
    assert d["trunk_coverage"] == 0.5 and d["shape_mismatches"] == [["trunk.x", [1, 2], [2, 1]]]
