"""fpipe.weights.merge: what the model gets is a copy of the file's tensors, never a view of the file.
(Which names go where: tests/test_weights_detect.py.)"""
import io

import pytest
import torch
from safetensors.torch import save_file

from fpipe.weights import load_into
from test_weights_fixtures import state_dict, target

NAME = "layer1.0.conv1.weight"


def test_weights_stay_as_loaded_when_the_file_is_rewritten_in_place(tmp_path):
    """A .pth is memory-mapped (only what is selected is read). Another job saving over the same
    file (torch.save truncates and writes the same inode) must not change a run's weights."""
    path, sd = tmp_path / "w.pth", state_dict()
    torch.save(sd, path)
    loaded, _ = load_into(target(), {"path": str(path)})
    doubled = io.BytesIO()
    torch.save({k: v * 2 if v.is_floating_point() else v for k, v in sd.items()}, doubled)
    with open(path, "r+b") as f:
        f.write(doubled.getvalue())
    trunk = [name for name in sd if f"trunk.{name}" in loaded]
    assert NAME in trunk and len(trunk) > 100
    for name in trunk:
        assert torch.equal(loaded[f"trunk.{name}"], sd[name]), name


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_each_loaded_tensor_owns_aligned_memory(tmp_path, suffix):
    """Tensors that share one storage in the file (slices of one buffer) get one each in the
    model; each starts on a 64-byte boundary (safetensors' start at any 4-byte offset)."""
    sd = state_dict()
    a, b = sd[NAME], sd["layer1.0.conv2.weight"]
    flat = torch.cat([a.flatten(), b.flatten()])
    if suffix == ".pth":
        sd[NAME], sd["layer1.0.conv2.weight"] = flat[:a.numel()].view_as(a), flat[a.numel():].view_as(b)
    path = tmp_path / f"w{suffix}"
    torch.save(sd, path) if suffix == ".pth" else save_file({k: v.contiguous() for k, v in sd.items()}, path)
    loaded, _ = load_into(target(), {"path": str(path)})
    trunk = {k: v for k, v in loaded.items() if k.startswith("trunk.")}
    storages = [v.untyped_storage().data_ptr() for v in trunk.values()]
    assert len(set(storages)) == len(storages)
    assert {v.data_ptr() % 64 for v in trunk.values()} == {0}
    assert torch.equal(loaded[f"trunk.{NAME}"], a) and all(v.is_contiguous() for v in trunk.values())
