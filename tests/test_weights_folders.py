"""A weights path that is a Hugging Face model folder: its file, its shards, the hub cache's snapshot."""
import json

import pytest
import safetensors.torch
import torch

from fpipe.weights import WeightsError, folders, io

TENSORS = {f"layer{i}.weight": torch.full((2, 2), float(i)) for i in range(5)}


def sharded(folder, tensors=TENSORS, per_shard=2, name="model.safetensors"):
    """``tensors`` in shards of ``per_shard`` with the index transformers writes."""
    folder.mkdir(parents=True, exist_ok=True)
    names = list(tensors)
    count = -(-len(names) // per_shard)
    weight_map = {}
    for k in range(count):
        shard = f"model-{k + 1:05d}-of-{count:05d}.safetensors"
        part = {n: tensors[n] for n in names[k * per_shard:(k + 1) * per_shard]}
        safetensors.torch.save_file(part, folder / shard)
        weight_map |= {n: shard for n in part}
    (folder / f"{name}.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_folder_reads_model_safetensors_before_pytorch_model_bin(tmp_path):
    torch.save({"from": torch.zeros(1)}, tmp_path / "pytorch_model.bin")
    assert equal(io.read(tmp_path), {"from": torch.zeros(1)})
    safetensors.torch.save_file({"from": torch.ones(1)}, tmp_path / "model.safetensors")
    assert equal(io.read(tmp_path), {"from": torch.ones(1)})
    assert folders.is_model_folder(str(tmp_path)) and not folders.is_model_folder(str(tmp_path / "model.safetensors"))


def test_an_open_clip_repo_folder_reads_its_open_clip_file(tmp_path):
    torch.save({"visual.conv1.weight": torch.ones(1)}, tmp_path / "open_clip_pytorch_model.bin")
    assert equal(io.read(tmp_path), {"visual.conv1.weight": torch.ones(1)})


def test_shards_are_merged_in_the_indexs_order(tmp_path):
    folder = sharded(tmp_path / "m")
    assert [p.rsplit("/", 1)[1] for p in folders.weight_files(str(folder))] == [
        "model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors", "model-00003-of-00003.safetensors"]
    assert equal(io.read(folder), TENSORS)


def test_hub_cache_folder_reads_the_snapshot_refs_main_names(tmp_path):
    repo = tmp_path / "models--org--name"
    old, new = "a" * 40, "b" * 40
    for commit, value in ((old, 0.0), (new, 1.0)):
        (repo / "snapshots" / commit).mkdir(parents=True)
        safetensors.torch.save_file({"w": torch.full((1,), value)}, repo / "snapshots" / commit / "model.safetensors")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(new)
    assert equal(io.read(repo), {"w": torch.ones(1)})
    (repo / "refs" / "main").write_text("c" * 40)
    with pytest.raises(WeightsError, match="refs/main names 'c+', which is no snapshot"):
        io.read(repo)


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/etc/passwd", "", ".."])
def test_an_index_naming_files_outside_its_folder_is_refused(tmp_path, shard):
    folder = sharded(tmp_path / "m")
    (tmp_path / "outside.safetensors").write_bytes((folder / "model-00001-of-00003.safetensors").read_bytes())
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": shard}}))
    with pytest.raises(WeightsError, match="is not a file name in its folder"):
        io.read(folder)


def test_broken_indexes_and_shards_are_one_line_errors(tmp_path):
    folder = sharded(tmp_path / "m")
    (folder / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(WeightsError, match="lists the shard 'model-00002-of-00003.safetensors', which is missing"):
        io.read(folder)
    index = sharded(tmp_path / "n") / "model.safetensors.index.json"
    for text, message in (("[1, 2]", "not a shard index"), ("{}", "not a shard index"),
                          ('{"weight_map": {}}', "lists no shards")):
        index.write_text(text)
        with pytest.raises(WeightsError, match=message):
            io.read(index.parent)


def test_a_tensor_in_two_shards_is_refused(tmp_path):
    folder = sharded(tmp_path / "m")
    safetensors.torch.save_file({"layer0.weight": torch.zeros(2, 2), "layer2.weight": torch.zeros(2, 2)},
                                folder / "model-00002-of-00003.safetensors")
    with pytest.raises(WeightsError, match="model-00002-of-00003.safetensors: holds layer0.weight again"):
        io.read(folder)


def test_a_folder_without_weights_says_what_it_looked_for(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert not folders.is_model_folder(str(tmp_path))
    with pytest.raises(WeightsError, match="is a directory without weights: a Hugging Face model folder holds "
                                           "model.safetensors or pytorch_model.bin"):
        io.read(tmp_path)


def test_the_sha256_of_a_sharded_folder_changes_with_any_shard(tmp_path):
    folder = sharded(tmp_path / "m")
    before = folders.sha256(str(folder))
    assert before == folders.sha256(str(folder)) and len(before) == 64
    safetensors.torch.save_file({"layer4.weight": torch.zeros(2, 2)}, folder / "model-00003-of-00003.safetensors")
    assert folders.sha256(str(folder)) != before
