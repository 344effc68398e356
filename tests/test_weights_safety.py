"""Files that are hostile, damaged or misnamed: each gets one clear line, fast, and runs nothing."""
import contextlib
import io as pyio
import pickle
import signal
import sys

import pytest
import torch

from fpipe.weights import WeightsError, cli, io, load_into
from test_weights_fixtures import assert_trunk_is, prefixed, target, trunk


@contextlib.contextmanager
def deadline(seconds):
    """Fails the test instead of hanging (the walks must be bounded)."""
    def expired(*_):
        raise TimeoutError(f"took more than {seconds} s")
    old = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def inspect(path, capsys, *extra):
    code = cli.main(["inspect", str(path), *extra], build_target=lambda args, files: (target(), "resnet18 (test)"))
    out = capsys.readouterr()
    return code, out.out, out.err


def shared_levels(levels=64) -> dict:
    d = {"w": torch.ones(1)}
    for _ in range(levels):
        d = {"a": d, "b": d}
    return d


def test_shared_subdicts_2_to_the_64_paths_do_not_hang(tmp_path, capsys):
    path = tmp_path / "bomb.pth"
    torch.save(shared_levels(), path)
    assert path.stat().st_size < 4000
    with deadline(20):
        code, _, err = inspect(path, capsys)
        with pytest.raises(WeightsError, match="no trunk of the model found"):
            load_into(target(), {"path": str(path)})
    assert code == 1 and len(err.strip().splitlines()) == 1


def test_shared_subdicts_around_a_real_trunk_load_once(tmp_path):
    sd = trunk(0)
    obj = {"state_dict": sd, "ema": sd}  # one dict saved twice: one copy, not two
    torch.save(obj, tmp_path / "twice.pth")
    loaded, _ = load_into(target(), {"path": str(tmp_path / "twice.pth")})
    assert_trunk_is(loaded, sd)


def test_self_containing_dict_is_refused_in_one_line(tmp_path, capsys):
    d = {**prefixed("backbone.", trunk(0))}
    d["self"] = d
    path = tmp_path / "cycle.pth"
    torch.save(d, path)
    with deadline(20):
        code, _, err = inspect(path, capsys)
        with pytest.raises(WeightsError, match=r"cycle\.pth: refused: the contents contain themselves"):
            load_into(target(), {"path": str(path)})
    assert code == 1 and len(err.strip().splitlines()) == 1 and "contain themselves" in err


@pytest.mark.parametrize("container", ["dict", "list"])
def test_5000_nesting_levels_are_refused_not_a_recursion_error(tmp_path, capsys, container):
    d = {"w": torch.ones(1)}
    for _ in range(5000):
        d = {"x": d} if container == "dict" else [d]
    obj = {**prefixed("backbone.", trunk(0)), "deep": d}
    path = tmp_path / "deep.pth"
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(50000)  # the writer's side only: torch.save recurses
    try:
        torch.save(obj, path)
    finally:
        sys.setrecursionlimit(limit)
    with deadline(30):
        code, _, err = inspect(path, capsys)
        with pytest.raises(WeightsError, match="nest deeper than 64 levels"):
            load_into(target(), {"path": str(path)})
    assert code == 1 and "nest deeper" in err and len(err.strip().splitlines()) == 1


def test_the_same_limits_hold_for_objects_given_directly():
    d = {}
    d["self"] = d
    with pytest.raises(WeightsError, match="contain themselves"):
        load_into(target(), {}, obj=d)


def test_load_into_loads_from_obj_without_a_path():
    loaded, report = load_into(target(), {}, obj={"state_dict": prefixed("module.", trunk(0))})
    assert_trunk_is(loaded, trunk(0))
    assert report.trunk_loaded == 100 and report.path == "<object given to load_into>"


def test_nan_and_inf_are_refused_naming_file_and_tensors(tmp_path, capsys):
    sd = {n: t.clone() for n, t in trunk(0).items()}
    sd["layer1.0.conv1.weight"][0, 0, 0, 0] = float("nan")
    sd["bn1.running_var"][3] = float("inf")
    path = tmp_path / "diverged.pth"
    torch.save(prefixed("backbone.", sd), path)
    with pytest.raises(WeightsError) as e:
        load_into(target(), {"path": str(path)})
    msg = str(e.value)
    assert msg.startswith(f"{path}: 2 tensor(s) hold NaN or inf values")
    assert "backbone.layer1.0.conv1.weight" in msg and "backbone.bn1.running_var" in msg
    code, _, err = inspect(path, capsys)
    assert code == 1 and "NaN or inf" in err


def test_fp16_file_whose_sum_overflows_is_still_finite(tmp_path):
    sd = {n: t.half() if t.is_floating_point() else t for n, t in trunk(0).items()}
    sd["layer4.1.conv2.weight"] = torch.full_like(sd["layer4.1.conv2.weight"], 60000.0)
    loaded, _ = load_into(target(), {}, obj=sd)
    assert torch.equal(loaded["trunk.layer4.1.conv2.weight"], sd["layer4.1.conv2.weight"].float())


def legacy_bytes() -> tuple:
    buf = pyio.BytesIO()
    torch.save({"w": torch.randn(10), "epoch": 3}, buf, _use_new_zipfile_serialization=False)
    raw = buf.getvalue()
    f = pyio.BytesIO(raw)
    for _ in range(3):
        pickle.load(f)
    return raw, f.tell()


@pytest.mark.parametrize("offset", [2, 5])
def test_corrupt_file_is_called_corrupt_not_unsafe(tmp_path, offset):
    raw, start = legacy_bytes()
    damaged = bytearray(raw)
    damaged[start + offset] = 0xEE  # an opcode byte no pickle has
    path = tmp_path / "damaged.pth"
    path.write_bytes(bytes(damaged))
    with pytest.raises(WeightsError) as e:
        io.read(path)
    msg = str(e.value)
    assert "corrupt" in msg and "refused" not in msg and "weights_only" not in msg


def test_files_are_sniffed_by_content_not_name(tmp_path):
    from safetensors.torch import save_file
    torch_named_st = tmp_path / "model.safetensors"
    torch.save(prefixed("backbone.", trunk(0)), torch_named_st)
    st_named_pth = tmp_path / "model.pth"
    save_file(trunk(1), str(st_named_pth))
    assert io.sniff(str(torch_named_st)) == "zip" and io.sniff(str(st_named_pth)) == "safetensors"
    assert_trunk_is(load_into(target(), {"path": str(torch_named_st)})[0], trunk(0))
    assert_trunk_is(load_into(target(), {"path": str(st_named_pth)})[0], trunk(1))


def test_truncated_safetensors_header_is_corrupt(tmp_path):
    from safetensors.torch import save_file
    path = tmp_path / "cut.safetensors"
    save_file({"w": torch.ones(1000)}, str(path))
    path.write_bytes(path.read_bytes()[:60])
    with pytest.raises(WeightsError, match="truncated or corrupt safetensors"):
        io.read(path)


def test_shared_lists_beside_a_trunk_load_and_inspect_quickly(tmp_path, capsys):
    bomb = [torch.ones(1)]
    for _ in range(60):  # 2^60 paths, within the depth limit
        bomb = [bomb, bomb]
    path = tmp_path / "list_bomb.pth"
    torch.save({**prefixed("backbone.", trunk(0)), "history": bomb}, path)
    with deadline(30):
        code, out, _ = inspect(path, capsys)
        loaded, _ = load_into(target(), {"path": str(path)})
    assert code == 0 and "history: list" in out
    assert_trunk_is(loaded, trunk(0))


def test_a_torchscript_archive_runs_nothing_it_names(tmp_path):
    """A zip that looks like TorchScript (constants.pkl beside data.pkl) is read with inert
    stand-ins: a pickled call in it is never made, whatever the archive claims to be."""
    import pathlib
    import zipfile

    class Payload:
        def __init__(self, marker):
            self.marker = str(marker)

        def __reduce__(self):
            return (pathlib.Path.touch, (pathlib.Path(self.marker),))

    marker, path = tmp_path / "pwned", tmp_path / "model.pt"
    torch.save({"w": torch.ones(2), "call": Payload(marker)}, path)
    with zipfile.ZipFile(path, "a") as z:
        z.writestr(f"{z.namelist()[0].split('/')[0]}/constants.pkl", b"\x80\x02).")
    assert io.sniff(str(path)) == "torchscript"
    try:
        io.read(path)
    except WeightsError as e:
        assert "TorchScript archive" in str(e)
    assert not marker.exists()
