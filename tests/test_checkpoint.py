import json
import logging
import os

import numpy as np
import pytest
import torch

from fpipe import tree
from fpipe import checkpoint as ckpt


def _payload(step, seed=0):
    g = torch.Generator().manual_seed(seed)
    params = {"trunk": {"conv1": {"weight": torch.randn(4, 3, 3, 3, generator=g)}},
              "heads": {"fc": {"weight": torch.randn(5, 4, generator=g).bfloat16(),
                               "bias": torch.zeros(5)}}}
    return {
        "params": tree.flatten(params),
        "model_state": {"trunk.bn1.running_mean": torch.rand(4, generator=g),
                        "trunk.bn1.num_batches_tracked": torch.tensor(step)},
        "opt_state": {"mu": {"heads.fc.bias": torch.ones(5)}, "count": torch.tensor(step),
                      "groups": [{"lr": 0.1, "betas": (0.9, 0.999), "nesterov": False}],
                      3: "int keys, as torch.optim state_dicts have"},
        "step": step, "epoch": 2, "rng": {"torch": g.get_state()},
        "data": {"epoch": 2, "index": 17}, "hooks": {"freeze": {"unfrozen": True}},
        "scaler": None, "meta": {"fpipe_version": "0.1", "config": json.dumps({"lr": 0.1})},
    }


def _assert_equal(a, b):
    assert type(a) is type(b)
    if isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            _assert_equal(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_equal(x, y)
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    else:
        assert a == b


def test_round_trip_keeps_every_leaf_exactly(tmp_path):
    payload = _payload(1200)
    path = ckpt.save(str(tmp_path), 1200, payload)
    assert path == str(tmp_path / "checkpoints" / "ckpt_00001200.pt")
    restored, restored_path = ckpt.restore(str(tmp_path))
    assert restored_path == path
    _assert_equal(restored, payload)
    # The file is a plain weights_only dict: the payload plus the marker.
    raw = torch.load(path, weights_only=True)
    assert set(raw) == set(payload) | {ckpt.RESERVED}
    assert raw[ckpt.RESERVED]["step"] == 1200
    # The restored rng state continues the same random stream.
    g, h = torch.Generator(), torch.Generator()
    g.set_state(restored["rng"]["torch"])
    h.set_state(payload["rng"]["torch"])
    assert torch.equal(torch.rand(3, generator=g), torch.rand(3, generator=h))


def test_empty_or_missing_workdir(tmp_path):
    assert ckpt.latest(str(tmp_path / "nope")) is None
    assert ckpt.restore(str(tmp_path / "nope")) == (None, None)
    os.makedirs(tmp_path / "checkpoints")
    assert ckpt.restore(str(tmp_path)) == (None, None)


def test_unsavable_payload_is_refused_before_writing(tmp_path):
    with pytest.raises(TypeError, match=r"payload\['meta'\]\['x'\].*numpy"):
        ckpt.save(str(tmp_path), 1, {"meta": {"x": np.float32(1.0)}})
    with pytest.raises(TypeError, match="object"):
        ckpt.save(str(tmp_path), 1, {"hooks": [object()]})
    with pytest.raises(ValueError, match="step"):
        ckpt.save(str(tmp_path), 1, {"step": 2})
    assert ckpt.list_checkpoints(str(tmp_path)) == []
    assert os.listdir(tmp_path / "checkpoints") == []


def test_keeps_last_k_and_the_one_just_written(tmp_path):
    wd = str(tmp_path)
    assert ckpt.save_best(wd, 100, {"step": 100}, "acc", 0.5)
    for step in range(100, 600, 100):
        ckpt.save(wd, step, {"step": step}, keep=2)
    assert [s for s, _ in ckpt.list_checkpoints(wd)] == [400, 500]
    # A save numbered below the newest files is still kept.
    ckpt.save(wd, 50, {"step": 50}, keep=2)
    assert [s for s, _ in ckpt.list_checkpoints(wd)] == [50, 400, 500]
    assert ckpt.latest(wd).endswith("ckpt_00000500.pt")
    assert (tmp_path / "checkpoints" / "best.pt").exists()
    ckpt.save(wd, 600, {"step": 600}, keep=None)
    assert len(ckpt.list_checkpoints(wd)) == 4
    with pytest.raises(ValueError):
        ckpt.save(wd, 700, {}, keep=0)


def test_leftover_tmp_is_ignored_then_cleaned_up(tmp_path):
    wd = str(tmp_path)
    ckpt.save(wd, 100, _payload(100))
    leftover = tmp_path / "checkpoints" / "ckpt_00000200.pt.4242.tmp"
    leftover.write_bytes(b"half a checkpoint")
    assert ckpt.latest(wd).endswith("ckpt_00000100.pt")
    assert ckpt.restore(wd)[0]["step"] == 100
    ckpt.save(wd, 200, _payload(200))
    assert not leftover.exists()
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["ckpt_00000100.pt", "ckpt_00000200.pt"]


def test_interrupted_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    wd = str(tmp_path)
    ckpt.save(wd, 100, _payload(100), keep=1)

    def dies_halfway(obj, f):
        f.write(b"PK\x03\x04 partial")
        raise KeyboardInterrupt  # e.g. the job is killed mid-write

    monkeypatch.setattr(ckpt.torch, "save", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save(wd, 200, _payload(200), keep=1)
    monkeypatch.undo()
    assert os.listdir(tmp_path / "checkpoints") == ["ckpt_00000100.pt"]
    payload, path = ckpt.restore(wd)
    _assert_equal(payload, _payload(100))


def test_truncated_latest_falls_back_with_a_warning(tmp_path, caplog):
    wd = str(tmp_path)
    ckpt.save(wd, 100, _payload(100))
    bad = ckpt.save(wd, 200, _payload(200))
    data = open(bad, "rb").read()
    with open(bad, "wb") as f:
        f.write(data[: len(data) // 2])
    with caplog.at_level(logging.WARNING):
        payload, path = ckpt.restore(wd)
    assert payload["step"] == 100 and path.endswith("ckpt_00000100.pt")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("ckpt_00000200.pt" in m and "unreadable" in m for m in warnings)
    # The bad file is set aside, not retried and not deleted.
    assert os.path.exists(bad + ".corrupt") and not os.path.exists(bad)
    assert ckpt.latest(wd).endswith("ckpt_00000100.pt")


def test_damaged_bytes_that_still_load_fail_the_checksum(tmp_path):
    wd = str(tmp_path)
    ckpt.save(wd, 100, {"step": 100})
    path = ckpt.save(wd, 200, {"step": 200, "w": torch.full((64,), 1.2345)})
    data = bytearray(open(path, "rb").read())
    at = bytes(data).index(torch.full((64,), 1.2345).numpy().tobytes())
    data[at + 10] ^= 0xFF
    with open(path, "wb") as f:
        f.write(data)
    assert torch.load(path, weights_only=True)["step"] == 200  # torch alone does not notice
    with pytest.raises(ckpt.CorruptCheckpointError, match="checksum"):
        ckpt.load(path)
    assert ckpt.restore(wd)[0] == {"step": 100}


def test_a_foreign_file_is_not_a_checkpoint(tmp_path):
    wd = str(tmp_path)
    ckpt.save(wd, 100, {"step": 100})
    torch.save({"step": 200}, ckpt.checkpoint_path(wd, 200))
    with pytest.raises(ckpt.CorruptCheckpointError, match="marker"):
        ckpt.load(ckpt.checkpoint_path(wd, 200))
    assert ckpt.restore(wd)[0] == {"step": 100}


def test_no_readable_checkpoint_raises_and_renames_nothing(tmp_path):
    wd = str(tmp_path)
    for step in (100, 200):
        with open(ckpt.save(wd, step, {"step": step}), "wb") as f:
            f.write(b"garbage")
    with pytest.raises(ckpt.CorruptCheckpointError, match="none of the 2"):
        ckpt.restore(wd)
    assert [s for s, _ in ckpt.list_checkpoints(wd)] == [100, 200]


@pytest.mark.parametrize("mode, values, saved", [
    ("max", [0.5, 0.4, 0.6, 0.6, float("nan")], [True, False, True, False, False]),
    ("min", [0.5, 0.4, 0.6, 0.3, float("nan")], [True, True, False, True, False]),
])
def test_save_best_only_on_improvement(tmp_path, mode, values, saved):
    wd = str(tmp_path)
    got = [ckpt.save_best(wd, 10 * (i + 1), {"step": 10 * (i + 1)}, "val/acc", v, mode=mode)
           for i, v in enumerate(values)]
    assert got == saved
    best_i = max(i for i, s in enumerate(saved) if s)
    assert ckpt.read_best(wd) == {"step": 10 * (best_i + 1), "metric": "val/acc", "mode": mode,
                                  "value": values[best_i]}
    assert ckpt.load(os.path.join(wd, "checkpoints", "best.pt")) == {"step": 10 * (best_i + 1)}
    assert ckpt.list_checkpoints(wd) == []  # best.pt is not one of the rolling checkpoints


def test_best_value_survives_a_restart(tmp_path):
    wd = str(tmp_path)
    assert ckpt.save_best(wd, 100, {"step": 100}, "acc", 0.8)
    # A new process knows nothing but the workdir.
    assert ckpt.read_best(wd)["value"] == 0.8
    assert not ckpt.save_best(wd, 200, {"step": 200}, "acc", 0.7)
    assert ckpt.read_best(wd)["step"] == 100
    assert ckpt.save_best(wd, 300, {"step": 300}, "acc", 0.9)
    with pytest.raises(ValueError, match="tracks 'acc'"):
        ckpt.save_best(wd, 400, {"step": 400}, "loss", 0.1, mode="min")


def test_a_restored_train_state_has_the_structure_of_the_one_built(tmp_path):
    """Nested dicts as the run built them, a stateless head's empty model state included: a saved
    compiled step is keyed by its inputs' structure, and a resumed run must load it."""
    g = torch.Generator().manual_seed(0)
    built = {"trainable": {"heads": {"fc": {"weight": torch.zeros(3, 2)}}},
             "frozen": {"trunk": {"conv1": {"weight": torch.zeros(2, 3)}}},
             "model_state": {"trunk": {"bn1": {"running_mean": torch.zeros(2)}}, "heads": {"fc": {}}},
             "opt_state": {"count": torch.tensor(0), "momentum": {"heads": {"fc": {"weight": torch.zeros(3, 2)}}}}}
    trained = tree.map_leaves(lambda t: t + torch.rand(t.shape, generator=g) if t.is_floating_point() else t + 1, built)
    payload = ckpt.train_state_payload(trained, 5, ckpt.save_frozen(str(tmp_path), tree.flatten(trained["frozen"])), {})
    restored, step = ckpt.restore_train_state(built, payload, str(tmp_path))
    assert step == 5 and restored["model_state"]["heads"] == {"fc": {}}
    assert torch.utils._pytree.tree_structure(restored) == torch.utils._pytree.tree_structure(built)
    for a, b in zip(tree.leaves(restored), tree.leaves(trained)):
        assert torch.equal(a, b)
