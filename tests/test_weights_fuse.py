"""fpipe.weights.fuse: separate projections packed as one tensor, only where a group is whole."""
import torch

from fpipe.weights import fuse


def test_a_whole_group_is_concatenated_in_its_order_under_a_name_showing_its_parts():
    q, k, v = torch.full((2, 3), 1.0), torch.full((2, 3), 2.0), torch.full((2, 3), 3.0)
    files = {"a.attention.query.weight": q, "a.attention.key.weight": k, "a.attention.value.weight": v, "a.x": q}
    out, packed = fuse.pack(files)
    assert packed == ["a.attention.{query,key,value}.weight"]
    assert torch.equal(out["a.attention.{query,key,value}.weight"], torch.cat([q, k, v]))
    assert set(out) == {"a.attention.{query,key,value}.weight", "a.x"}


def test_gate_and_up_pack_as_dinov2s_w12_and_top_level_names_work():
    gate, up = torch.zeros(4, 2), torch.ones(4, 2)
    out, packed = fuse.pack({"gate_proj.bias": gate[:, 0], "up_proj.bias": up[:, 0]})
    assert packed == ["{gate_proj,up_proj}.bias"] and torch.equal(out[packed[0]], torch.cat([gate[:, 0], up[:, 0]]))


def test_incomplete_or_unlike_groups_stay_as_they_are():
    files = {"a.query.weight": torch.zeros(2, 3), "a.key.weight": torch.zeros(2, 3)}  # no value
    assert fuse.pack(files) == (files, [])
    files |= {"a.value.weight": torch.zeros(4, 3)}  # another shape: not one projection split in three
    out, packed = fuse.pack(files)
    assert not packed and out.keys() == files.keys()
    files = {"a.query.scale": torch.zeros(2), "a.key.scale": torch.zeros(2), "a.value.scale": torch.zeros(2)}
    assert fuse.pack(files)[1] == []  # only weights and biases


def test_swin_v2_query_and_value_biases_pack_around_a_zero_key_bias():
    q, v = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0])
    out, packed = fuse.pack({"blocks.0.attn.q_bias": q, "blocks.0.attn.v_bias": v, "blocks.0.attn.qkv.weight": q})
    assert packed == ["blocks.0.attn.{q_bias,v_bias}"]
    assert torch.equal(out[packed[0]], torch.tensor([1.0, 2.0, 0.0, 0.0, 3.0, 4.0]))
    assert set(out) == {"blocks.0.attn.{q_bias,v_bias}", "blocks.0.attn.qkv.weight"}
    assert fuse.pack({"attn.q_bias": q}) == ({"attn.q_bias": q}, [])  # no value bias: left as it is


def test_a_key_projection_without_bias_packs_a_zero_key_bias():
    """transformers' Swinv2: query and value Linears with bias, the key's without."""
    w, q, v = torch.ones(2, 2), torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0])
    files = {f"s.{p}.weight": w for p in ("query", "key", "value")} | {"s.query.bias": q, "s.value.bias": v}
    out, packed = fuse.pack(files)
    assert sorted(packed) == ["s.{query,key,value}.bias", "s.{query,key,value}.weight"]
    assert torch.equal(out["s.{query,key,value}.bias"], torch.tensor([1.0, 2.0, 0.0, 0.0, 3.0, 4.0]))
    del files["s.key.weight"]  # no key projection at all: nothing to pack
    assert fuse.pack(files)[1] == []
