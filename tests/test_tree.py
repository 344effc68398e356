import pytest
import torch

from fpipe import tree

T = {"trunk": {"conv1": {"weight": torch.ones(2)}, "layer1": {"0": {"bn1": {"bias": torch.zeros(1)}}}},
     "heads": {"fc": {"weight": torch.full((3,), 2.0)}}}


def test_flatten_unflatten_round_trip():
    flat = tree.flatten(T)
    assert list(flat) == ["trunk.conv1.weight", "trunk.layer1.0.bn1.bias", "heads.fc.weight"]
    assert tree.flatten(tree.unflatten(flat)) == flat


def test_unflatten_rejects_duplicates_and_leaf_conflicts():
    with pytest.raises(ValueError):
        tree.unflatten({"a.b": 1, "a": 2})


def test_partition_and_merge_round_trip_exactly():
    matched, rest = tree.partition(T, [r"trunk\..*"])
    assert list(tree.flatten(matched)) == ["trunk.conv1.weight", "trunk.layer1.0.bn1.bias"]
    assert list(tree.flatten(rest)) == ["heads.fc.weight"]
    merged = tree.merge_in_order(T, rest, matched)
    assert list(tree.flatten(merged)) == list(tree.flatten(T))
    assert all(a is b for a, b in zip(tree.leaves(merged), tree.leaves(T)))


def test_partition_uses_full_match():
    matched, _ = tree.partition(T, ["trunk"])  # not a prefix match
    assert matched == {}


def test_merge_rejects_overlap():
    with pytest.raises(ValueError, match="more than one"):
        tree.merge(T, {"heads": {"fc": {"weight": torch.zeros(1)}}})


def test_map_with_names_and_map_leaves():
    out = tree.map_with_names(lambda n, x: x + len(n), T)
    assert out["heads"]["fc"]["weight"].tolist() == [2.0 + len("heads.fc.weight")] * 3
    summed = tree.map_leaves(lambda a, b: a + b, T, T)
    assert summed["trunk"]["conv1"]["weight"].tolist() == [2.0, 2.0]


def test_get_path_did_you_mean():
    assert tree.get_path(T, "heads.fc.weight") is T["heads"]["fc"]["weight"]
    with pytest.raises(KeyError, match=r"Did you mean 'trunk\.layer1'"):
        tree.get_path(T, "trunk.layr1.0")


def test_first_match_order_wins():
    rules = [(r"heads\..*", 10.0), (r".*bias", 0.0), (".*", 1.0)]
    assert tree.first_match("heads.fc.bias", rules) == 10.0
    assert tree.first_match("trunk.bn1.bias", rules) == 0.0
    assert tree.first_match("trunk.conv1.weight", rules) == 1.0


def test_shaped_like_keeps_the_reference_s_empty_dicts():
    """flatten drops empty dicts (a GroupNorm's statistics); shaped_like puts them back."""
    reference = {"body": {"gn": {}, "bn": {"running_mean": 0}}, "head": {}}
    restored = tree.unflatten({"body.bn.running_mean": 1})
    assert tree.shaped_like(reference, restored) == {"body": {"gn": {}, "bn": {"running_mean": 1}}, "head": {}}
    with pytest.raises(KeyError):
        tree.shaped_like(reference, {})  # a leaf the reference has must be there
