import pytest
import torch

from fpipe import freeze, tree
from fpipe.models import resnet


def test_partition_trunk_alias_and_round_trip():
    params, state = resnet.init(0, depth=18)
    params = {"trunk": params, "heads": {"fc": {"weight": torch.zeros(2, 512), "bias": torch.zeros(2)}}}
    trainable, frozen = freeze.partition(params, ("trunk",))
    assert list(tree.flatten(trainable)) == ["heads.fc.weight", "heads.fc.bias"]
    assert all(n.startswith("trunk.") for n in tree.flatten(frozen))
    assert tree.flatten(tree.merge_in_order(params, trainable, frozen)).keys() == tree.flatten(params).keys()
    norms = freeze.eval_norms({"trunk": state}, frozen)
    assert "trunk.bn1" in norms and "trunk.layer1.0.downsample.1" not in norms
    assert "trunk.layer2.0.downsample.1" in norms
    assert len(norms) == sum(1 for n in tree.flatten(state) if n.endswith("running_mean"))


def test_partial_freeze_by_regex_keeps_other_norms_training():
    params, state = resnet.init(0, depth=18)
    params, state = {"trunk": params}, {"trunk": state}
    trainable, frozen = freeze.partition(params, [r"trunk\.(conv1|bn1|layer1)\..*"])
    norms = freeze.eval_norms(state, frozen)
    assert norms == {"trunk.bn1"} | {f"trunk.layer1.{b}.bn{i}" for b in "01" for i in "12"}


def test_rule_matching_nothing_is_an_error():
    params, _ = resnet.init(0, depth=18)
    with pytest.raises(ValueError, match="matches no parameter"):
        freeze.partition({"trunk": params}, [r"truck\..*"])
    with pytest.raises(ValueError, match="not a valid regex"):
        freeze.partition({"trunk": params}, ["(("])


def test_none_in_a_value_policy_freezes_by_first_match():
    params, _ = resnet.init(0, depth=18)
    params = {"trunk": params}
    rules = ((r"trunk\.layer4\..*", 1.0), (r"trunk\.layer.*", None), (r".*", 0.1))
    frozen_rules = freeze.frozen_by_rules(params, rules)
    trainable, frozen = freeze.partition(params, frozen_rules)
    assert {n.split(".")[1] for n in tree.flatten(frozen)} == {"layer1", "layer2", "layer3"}
    assert {n.split(".")[1] for n in tree.flatten(trainable)} == {"conv1", "bn1", "layer4"}


def test_a_norm_without_params_follows_the_module_around_it():
    """MAE's probe BatchNorm (affine=False) has running statistics but no params: frozen with its head."""
    state = {"heads": {"mae": {"channel_bn": {"running_mean": torch.zeros(4)}},
                       "vissl": {"channel_bn": {"running_mean": torch.zeros(4)}}}}
    params = {"heads": {"mae": {"clf": {"clf": {"0": {"weight": torch.zeros(2, 4)}}}},
                        "vissl": {"channel_bn": {"weight": torch.ones(4)},
                                  "clf": {"clf": {"0": {"weight": torch.zeros(2, 4)}}}}}}
    trainable, frozen = freeze.partition(params, [r"heads\.mae\..*"])
    assert freeze.eval_norms(state, frozen, trainable) == {"heads.mae.channel_bn"}
    trainable, frozen = freeze.partition(params, [r"heads\.vissl\..*"])
    assert freeze.eval_norms(state, frozen, trainable) == {"heads.vissl.channel_bn"}
    assert freeze.eval_norms(state, frozen) == {"heads.vissl.channel_bn"}  # without trainable: as before
