"""main.py end to end, as a user runs it: outputs, errors, resume after a kill, the two-step flow."""
import json
import math
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest
import torch

import _forked_main as forked_main
from fpipe import host_memory, tree, weights
from fpipe.evaluate import extract

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Small and eager so the suite stays fast; the shipped configs otherwise run as they are.
TINY = ["--config.compile=False", "--config.data.image_size=16", "--config.data.batch_size=32",
        "--config.log_steps=5"]


def main(workdir, *args, check=True, config="configs/linear_eval.py"):
    cmd = [f"--config={config}", f"--workdir={workdir}", *TINY, *args]
    proc = forked_main.run(cmd, timeout=600)  # python main.py CMD, its imports done beforehand
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def test_linear_eval_writes_results_metrics_tensorboard_and_checkpoints(tmp_path):
    main(tmp_path, "--config.total_steps=12", "--config.ckpt_steps=6")
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["heads"]) == {"conv1", "res3", "res4", "res5avg"}
    for head in results["heads"].values():
        assert 0 <= head["top1"] <= head["top5"] <= 100
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model"]["freeze"] == ["trunk"] and config["total_steps"] == 12
    lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines if "loss" in l] == [5, 10, 12]
    assert any("res4/test_top1" in l for l in lines)
    assert list((tmp_path / "tb").iterdir())
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("ckpt_*.pt")) == [
        "ckpt_00000006.pt", "ckpt_00000012.pt"]
    log = (tmp_path / "log").read_text()
    assert "host memory: " in log  # what fpipe.host_memory did, logged
    assert ("blocks over 32 MB kept for reuse too from step 2 on" in log) == host_memory.GLIBC  # after step 1


def test_unknown_override_is_an_error_naming_the_key(tmp_path):
    proc = main(tmp_path, "--config.optim.lrr=0.1", check=False)
    assert proc.returncode != 0
    assert "lrr" in proc.stderr and "lr" in proc.stderr


def test_an_unknown_config_variant_is_one_line_naming_the_valid_ones(tmp_path):
    proc = main(tmp_path, config="configs/supervised.py:multi_tsk", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "error: flag --config=configs/supervised.py:multi_tsk: ValueError: unknown supervised variant 'multi_tsk'; "
        "valid: ('multi_task',)"]
    assert not tmp_path.exists() or not any(tmp_path.iterdir())  # nothing written


def test_a_bad_compile_remat_is_one_line_naming_the_valid_ones(tmp_path):
    proc = main(tmp_path, "--config.compile_remat=False", check=False)  # a bool until 12-03
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "error: unknown compile_remat 'False'; valid: ('fused', 'all', 'off')" in proc.stderr.splitlines()
    assert not tmp_path.exists() or not any(tmp_path.iterdir())  # nothing written


def test_killed_run_resumes_with_the_same_command_and_ends_identically(tmp_path):
    args = ["--config.total_steps=24", "--config.ckpt_steps=4", "--config.model.heads.res4.pool=(1, 1)"]
    main(tmp_path / "straight", *args)
    killed = tmp_path / "killed"
    proc = forked_main.start(["--config=configs/linear_eval.py", f"--workdir={killed}", *TINY, *args])
    deadline = time.time() + 300
    while not list((killed / "checkpoints").glob("ckpt_0000000[48].pt")) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first = sorted((killed / "checkpoints").glob("ckpt_*.pt"))
    assert first and "ckpt_00000024.pt" not in [p.name for p in first], "the kill came too late to test resume"
    main(killed, *args)
    a = torch.load(tmp_path / "straight" / "checkpoints" / "ckpt_00000024.pt", weights_only=True)
    b = torch.load(killed / "checkpoints" / "ckpt_00000024.pt", weights_only=True)
    for name, t in a["params"].items():
        assert torch.equal(b["params"][name], t), name
    for name, t in a["model_state"].items():
        assert torch.equal(b["model_state"][name], t), name
    ra = json.loads((tmp_path / "straight" / "results.json").read_text())
    rb = json.loads((killed / "results.json").read_text())
    assert ra["heads"] == rb["heads"] and ra["fingerprint"] == rb["fingerprint"]


def test_supervised_checkpoint_loads_into_linear_eval_by_path(tmp_path):
    main(tmp_path / "sup", "--config.total_steps=4", config="configs/supervised.py")
    ckpt = sorted((tmp_path / "sup" / "checkpoints").glob("ckpt_*.pt"))[-1]
    main(tmp_path / "lin", "--config.total_steps=2", f"--config.model.weights.path={ckpt}")
    report = json.loads((tmp_path / "lin" / "weights_report.json").read_text())
    assert report["trunk_loaded"] == report["trunk_total"] > 0 and report["format"] == "fpipe"
    # the frozen trunk is stored once beside the new run's checkpoints (not in each), and is
    # exactly the supervised one; the weights reader puts the checkpoint back together
    sup = torch.load(ckpt, weights_only=True)["params"]
    lin_path = sorted((tmp_path / "lin" / "checkpoints").glob("ckpt_*.pt"))[-1]
    assert not any(n.startswith("trunk.") for n in torch.load(lin_path, weights_only=True)["params"])
    lin = weights.read_checkpoint(str(lin_path))
    for name, t in sup.items():
        if name.startswith("trunk."):
            assert torch.equal(lin["params"][name], t), name


def test_wrong_prefix_fails_loudly_with_the_fix(tmp_path, reference):
    sd = reference.seeded_state_dict(reference.load_manifest("resnet18"), 0)
    path = tmp_path / "moco.pth"
    torch.save({"state_dict": {f"module.encoder_q.{k}": v for k, v in sd.items()}}, path)
    proc = main(tmp_path / "run", "--config.total_steps=2", f"--config.model.weights.path={path}",
                "--config.model.weights.format=torchvision", "--config.model.weights.remove_prefix=module.",
                check=False)
    assert proc.returncode != 0
    assert "module.encoder_q." in proc.stderr
    main(tmp_path / "auto", "--config.total_steps=2", f"--config.model.weights.path={path}")
    assert "module.encoder_q." in (tmp_path / "auto" / "weights_report.txt").read_text()


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    proc = main(tmp_path, "--config.total_steps=20", "--config.ckpt_steps=2", "--config.optim.lr=1e30",
                "--config.schedule.warmup_epochs=0", check=False)
    assert proc.returncode == 3 and "diverged" in proc.stderr and "new --workdir" in proc.stderr
    assert "Traceback" not in proc.stderr
    kept = list((tmp_path / "checkpoints").glob("ckpt_*.pt"))
    for path in kept:  # params, BatchNorm statistics and optimizer state: all finite
        saved = torch.load(path, weights_only=True)
        for part in ("params", "model_state", "opt_state"):
            for name, t in tree.flatten(saved[part]).items():
                assert not t.is_floating_point() or torch.isfinite(t).all(), (path, part, name)
    assert not (tmp_path / "results.json").exists()


def test_bf16_autocast_tracks_float32(tmp_path):
    losses = {}
    for dtype in ("float32", "bf16"):
        main(tmp_path / dtype, "--config.total_steps=10", "--config.log_steps=1", f"--config.precision.dtype={dtype}",
             "--config.optim.lr=0.01", config="configs/supervised.py")  # lr 0.1 is chaotic even in float32
        losses[dtype] = [json.loads(l)["loss"] for l in (tmp_path / dtype / "metrics.jsonl").read_text().splitlines()
                         if '"loss"' in l]
    assert all(math.isfinite(v) for v in losses["bf16"]) and len(losses["bf16"]) == 10
    assert abs(losses["bf16"][0] - losses["float32"][0]) < 0.02 * losses["float32"][0]
    gaps = [abs(a - b) for a, b in zip(losses["bf16"], losses["float32"])]
    assert sum(gaps) / len(gaps) < 0.05 * losses["float32"][0]  # per step, bf16 noise reaches ~10%
    for curve in losses.values():  # both learn: the last 3 steps well below the first 3
        assert sum(curve[-3:]) / 3 < sum(curve[:3]) / 3 - 0.3
    saved = torch.load(sorted((tmp_path / "bf16" / "checkpoints").glob("ckpt_*.pt"))[-1], weights_only=True)
    assert all(t.dtype == torch.float32 for t in saved["params"].values())  # float32 master params


def test_fp16_off_cuda_is_refused_with_the_alternative(tmp_path):
    proc = main(tmp_path, "--config.total_steps=2", "--config.precision.dtype=fp16", check=False)
    assert proc.returncode != 0 and "use bf16 or float32" in proc.stderr


def test_feature_extraction_writes_every_sample_once_and_trains_nothing(tmp_path):
    main(tmp_path, config="configs/extract_features.py")
    assert not (tmp_path / "checkpoints").exists()  # nothing trains: no frozen.pt, no checkpoints
    assert not (tmp_path / "metrics.jsonl").exists()
    assert json.loads((tmp_path / "results.json").read_text())["step"] == 0
    for split, n in (("train", 1437), ("test", 360)):
        saved = extract.load(str(tmp_path), split)  # features/<split>.safetensors
        assert sorted(saved.indices.tolist()) == list(range(n))
        assert saved.features["flatten"].shape == (n, 512) and saved.features["res5avg"].shape == (n, 512, 1, 1)
        torch.testing.assert_close(saved.features["res5avg"].flatten(1), saved.features["flatten"])
        assert saved.labels.shape == (n,)
    # Other weights, allowed to change: the cached features (of the first trunk) are refused, and
    # the first run's results.json is kept aside, not left beside the new config as if it were its.
    from fpipe.models import model as model_lib
    from configs import extract_features
    params, state = model_lib.build(extract_features.get_config().model, num_classes=10, image_size=16).init(5)
    flat = {**tree.flatten(params), **tree.flatten(state)}
    torch.save({n[len("trunk."):]: v for n, v in flat.items() if n.startswith("trunk.")}, tmp_path / "other.pt")
    before = (tmp_path / "results.json").read_text()
    proc = main(tmp_path, f"--config.model.weights.path={tmp_path / 'other.pt'}",
                "--allow_change=model.weights.path", config="configs/extract_features.py", check=False)
    assert proc.returncode == 1 and not (tmp_path / "results.json").exists(), proc.stderr[-2000:]
    assert (tmp_path / "results.superseded-1.json").read_text() == before


def test_truncated_latest_checkpoint_falls_back_to_the_previous_one(tmp_path):
    args = ["--config.ckpt_steps=4", "--config.schedule.name=constant"]
    main(tmp_path / "straight", "--config.total_steps=12", *args)
    main(tmp_path / "broken", "--config.total_steps=8", *args)
    latest = tmp_path / "broken" / "checkpoints" / "ckpt_00000008.pt"
    latest.write_bytes(latest.read_bytes()[:-100])  # a write cut short
    proc = main(tmp_path / "broken", "--config.total_steps=12", "--allow_change=total_steps", *args)
    assert "ckpt_00000008.pt" in proc.stderr and "Resumed at step 4" in proc.stderr
    a = torch.load(tmp_path / "straight" / "checkpoints" / "ckpt_00000012.pt", weights_only=True)
    b = torch.load(tmp_path / "broken" / "checkpoints" / "ckpt_00000012.pt", weights_only=True)
    assert all(torch.equal(b["params"][n], t) for n, t in a["params"].items())


def test_a_checkpoint_with_the_wrong_frozen_file_is_refused(tmp_path):
    main(tmp_path / "a", "--config.total_steps=2")
    main(tmp_path / "b", "--config.total_steps=2", "--config.seed=1")
    (tmp_path / "a" / "checkpoints" / "frozen.pt").write_bytes((tmp_path / "b" / "checkpoints" / "frozen.pt").read_bytes())
    with pytest.raises(weights.WeightsError, match="checksum differs"):
        weights.read_checkpoint(str(tmp_path / "a" / "checkpoints" / "ckpt_00000002.pt"))


@pytest.mark.parametrize("given,expected", [(None, "20000"), ("300000", "300000")])
def test_openmp_threads_sleep_soon_unless_the_user_says_otherwise(given, expected):
    """main.py shortens libgomp's spin before an idle thread sleeps (busy machines) before torch
    loads; a GOMP_SPINCOUNT the user set is kept."""
    env = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"}
    if given is not None:
        env["GOMP_SPINCOUNT"] = given
    code = "import sys, main, os; print('torch' in sys.modules, os.environ['GOMP_SPINCOUNT'])"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["False", expected], out.stderr


def test_eval_classes_present_scores_over_the_test_splits_classes(tmp_path):
    """A test split holding 2 of the 4 training classes (ImageNet-R's 200 of 1000): with
    eval_classes=present no head loses an image to an absent class, so each scores at least as
    well, and the runs differ; config.json says which was used."""
    from test_data_datasets import write_tree
    write_tree(tmp_path / "data", {"train": {c: 6 for c in "abcd"}, "val": {"a": 8, "b": 8}})
    common = ["--config.data.name=image_folder", f"--config.data.root={tmp_path / 'data'}",
              "--config.total_steps=2", "--config.data.batch_size=8"]
    main(tmp_path / "all", *common)
    main(tmp_path / "present", *common, "--config.eval_classes=present")
    scores = {run: {h: r["top1"] for h, r in json.loads((tmp_path / run / "results.json").read_text())["heads"].items()}
              for run in ("all", "present")}
    assert all(scores["present"][h] >= scores["all"][h] for h in scores["all"]) and scores["present"] != scores["all"]
    assert json.loads((tmp_path / "present" / "config.json").read_text())["eval_classes"] == "present"
