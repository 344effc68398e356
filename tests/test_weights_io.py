"""Safe reading: harmless globals load, code objects are refused, bad files get one clear error."""
import argparse
import os
import pickle

import numpy as np
import pytest
import torch

from fpipe.weights import WeightsError, io, read_checkpoint


class Payload:
    """Unpickling this would create a file: proof that no code from a file ever runs."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class ThirdParty:
    """Stands for another library's object (mmengine's HistoryBuffer, OmegaConf containers)."""


def test_namespace_and_numpy_scalars_load(tmp_path):
    path = tmp_path / "dino.pth"
    obj = {"w": torch.ones(2), "args": argparse.Namespace(arch="resnet50", lr=0.1),
           "optimizer": {"param_groups": [{"lr": np.float64(0.03), "wd": np.float32(1e-4), "n": np.int64(3)}]},
           "dtypes": [np.dtype("float64"), type(np.dtype("float32"))]}
    torch.save(obj, path)
    got = io.read(path)
    assert got["args"].arch == "resnet50"
    assert got["optimizer"]["param_groups"][0]["lr"] == np.float64(0.03)
    assert got["dtypes"] == [np.dtype("float64"), np.dtypes.Float32DType]


def test_pre_numpy_2_scalar_names_load(tmp_path):
    """Files written under numpy 1 name ``numpy.core.multiarray.scalar``."""
    path = tmp_path / "old.pth"
    torch.save({"lr": np.float64(0.5), "w": torch.arange(3.0)}, path, _use_new_zipfile_serialization=False)
    data = path.read_bytes()
    assert b"numpy._core.multiarray" in data
    path.write_bytes(data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    got = io.read(path)  # also the non-zip (no mmap) path
    assert got["lr"] == 0.5 and torch.equal(got["w"], torch.arange(3.0))


@pytest.mark.parametrize("zipped", [True, False])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path, zipped):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"w": torch.ones(1)}, "optimizer": {"hook": Payload(marker)}}, path,
               _use_new_zipfile_serialization=zipped)
    with pytest.raises(WeightsError) as e:
        io.read(path)
    msg = str(e.value)
    assert str(path) in msg and "posix.system" in msg and "optimizer.hook" in msg
    assert "stub_objects=True" in msg and "weights_only=False" not in msg
    assert not marker.exists()


def test_third_party_class_is_refused_with_its_name(tmp_path):
    path = tmp_path / "lightning.ckpt"
    torch.save({"state_dict": {"w": torch.ones(1)}, "hparams": ThirdParty()}, path)
    with pytest.raises(WeightsError, match=r"test_weights_io.ThirdParty \(at hparams\)"):
        io.read(path)


def test_raw_pickle_with_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "raw.pkl"
    path.write_bytes(pickle.dumps({"w": Payload(marker)}, protocol=2))
    with pytest.raises(WeightsError, match="refused|corrupt"):
        io.read(path)
    assert not marker.exists()


def test_missing_directory_empty(tmp_path):
    with pytest.raises(WeightsError, match="no such file"):
        io.read(tmp_path / "nope.pth")
    with pytest.raises(WeightsError, match="is a directory"):
        io.read(tmp_path)
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(WeightsError, match=r"empty\.pth: the file is empty"):
        io.read(tmp_path / "empty.pth")


@pytest.mark.parametrize("zipped", [True, False])
def test_truncated_file(tmp_path, zipped):
    path = tmp_path / "cut.pth"
    torch.save({"w": torch.randn(1000)}, path, _use_new_zipfile_serialization=zipped)
    path.write_bytes(path.read_bytes()[:2000])
    with pytest.raises(WeightsError, match=r"cut\.pth: truncated or corrupt"):
        io.read(path)


def test_not_a_checkpoint(tmp_path):
    path = tmp_path / "notes.pth"
    path.write_text("these are not weights\n")
    with pytest.raises(WeightsError, match=r"notes\.pth: not a PyTorch, safetensors or pickle weights file"):
        io.read(path)
    tensor_only = tmp_path / "tensor.pt"
    torch.save(torch.ones(3), tensor_only)
    with pytest.raises(WeightsError, match="holds a Tensor, not a dict"):
        read_checkpoint(tensor_only)
    no_tensors = tmp_path / "meta.pt"
    torch.save({"epoch": 3}, no_tensors)
    with pytest.raises(WeightsError, match=r"holds no tensors \(top-level keys: epoch\)"):
        read_checkpoint(no_tensors)


def test_weights_error_is_a_value_error():
    assert issubclass(WeightsError, ValueError)


def test_safetensors_round_trip_and_corruption(tmp_path):
    flat = {"conv1.weight": torch.randn(4, 3, 3, 3), "bn1.num_batches_tracked": torch.tensor(7)}
    path = tmp_path / "w.safetensors"
    io.write(flat, path)
    got = io.read(path)
    assert got.keys() == flat.keys() and all(torch.equal(got[k], flat[k]) for k in flat)
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(WeightsError, match="w.safetensors"):
        io.read(path)


def test_read_uses_mmap_for_zip_files(tmp_path):
    path = tmp_path / "w.pth"
    torch.save({"w": torch.randn(100)}, path)
    assert io.sniff(str(path)) == "zip"
    torch.save({"w": torch.randn(100)}, path, _use_new_zipfile_serialization=False)
    assert io.sniff(str(path)) == "pickle"
    assert io.read(path)["w"].shape == (100,)
