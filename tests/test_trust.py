"""Runs a user can trust, through main.py: one config per workdir, divergence never saved, errors
before work in one line, signals, locks, and results that say where they came from."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

import _forked_main as forked_main
from fpipe import checkpoint, files, tree, workdir as workdir_lib
from test_main import ROOT, TINY, main

RUN = ["--config.total_steps=4", "--config.ckpt_steps=2"]


def test_a_rerun_with_another_lr_is_refused_and_writes_nothing(tmp_path):
    main(tmp_path, *RUN)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    proc = main(tmp_path, *RUN, "--config.optim.lr=0.001", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "optim.lr: 0.1 -> 0.001" in proc.stderr and "--workdir" in proc.stderr
    assert "--allow_change=optim.lr" in proc.stderr
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    assert after == before  # results.json, config.json, metrics.jsonl untouched


def test_allowed_change_continues_and_is_recorded(tmp_path):
    main(tmp_path, *RUN)
    main(tmp_path, "--config.total_steps=6", "--config.ckpt_steps=2", "--allow_change=total_steps")
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["step"] == 6 and results["config_changes"] == {"total_steps": [4, 6]}
    assert (tmp_path / "config_changes.jsonl").read_text().count("total_steps") == 1


@pytest.mark.parametrize("change,expect", [
    ("--config.model.heads.res4.pool=(1, 1)", "heads.res4"),         # another head shape
    ("--config.optim.name=adamw", "optimizer state"),                  # another optimizer
])
def test_resume_refuses_other_shapes_and_optimizers_even_when_allowed(tmp_path, change, expect):
    main(tmp_path, *RUN)
    key = change.split("=")[0][len("--config."):]
    proc = main(tmp_path, *RUN, change, f"--allow_change={key}", check=False)
    assert proc.returncode == 1 and expect in proc.stderr and "new --workdir" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_the_default_workdir_depends_on_result_affecting_overrides():
    sys.path.insert(0, str(ROOT))
    from configs import linear_eval
    base = linear_eval.get_config()
    assert workdir_lib.default_workdir("configs/linear_eval.py", base, base) == os.path.join("runs", "linear_eval")
    logged = linear_eval.get_config()
    logged.log_steps = 1  # bookkeeping: same results, same workdir
    logged.cudnn_benchmark = False
    assert workdir_lib.default_workdir("configs/linear_eval.py", logged, base) == os.path.join("runs", "linear_eval")
    other = linear_eval.get_config()
    other.optim.lr = 0.001
    named = workdir_lib.default_workdir("configs/linear_eval.py", other, base)
    assert named.startswith(os.path.join("runs", "linear_eval+")) and len(named) > len("runs/linear_eval+")
    assert workdir_lib.fingerprint(other) != workdir_lib.fingerprint(base)
    assert workdir_lib.fingerprint(logged) == workdir_lib.fingerprint(base)


@pytest.mark.parametrize("args,expect", [
    (["--config.optim.lr=-0.1"], "optim.lr=-0.1"),
    (["--config.best_metric=res5avg/accuracy"], "res5avg/test_top1"),
    (["--config.model.heads.res4.pool=(0, 0)"], "model.heads.res4.pool"),
    (["--config.keep_ckpts=0"], "keep_ckpts"),
    (["--config.extract.features=('res9',)"], "extract.features"),
    (["--config.schedule.name=cosin"], "schedule.name"),
    (["--config.optim.lrr=0.1"], """'lrr'. Did you mean "lr" instead of "lrr"? List every key with --config_only, """
     "e.g. python main.py --config=configs/linear_eval.py --config_only"),
    (["--config.model.weights.path=/nonexistent/w.pth"], "/nonexistent/w.pth"),
    (["--config.model.weights.path=/"], "is a directory"),
    (["--config=configs/linear_evl.py"], "no such config file, or it failed to import"),
    (["--config.data.name=image_folder"], "data.name='image_folder' needs data.root"),
    (["--config.data.name=image_folder", "--config.data.root=/nonexistent"], "data.root='/nonexistent' is not a directory"),
    (["--config.data.eval_transforms=resize(0)|center_crop"], "data.eval_transforms="),
])
def test_bad_config_is_one_line_before_any_work(tmp_path, args, expect):
    proc = main(tmp_path / "w", *args, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert expect in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") <= 3, proc.stderr
    assert not (tmp_path / "w").exists()  # nothing written


@pytest.mark.parametrize("config", [["--config=configs/knn.py"], ["--config", "configs/finetune.py"]])
def test_an_unknown_key_names_the_users_own_config_file_in_its_hint(tmp_path, config):
    proc = forked_main.run([*config, f"--workdir={tmp_path / 'w'}", "--config.zzz=1"], timeout=120)
    path = config[-1].removeprefix("--config=")
    assert proc.returncode == 2 and proc.stderr.strip() == (
        f"error: no such config key 'zzz'. List every key with --config_only, e.g. python main.py "
        f"--config={path} --config_only")
    assert not (tmp_path / "w").exists()


def test_a_resume_on_a_folder_that_gained_images_is_refused_unless_allowed(tmp_path):
    """The config names the folder, not what it holds: a run resumed after the training split
    grew would continue its schedule and sample order on other data and report one run."""
    from test_data_datasets import write_tree
    write_tree(tmp_path / "data", {"train": {"a": 8, "b": 8}, "val": {"a": 2, "b": 2}})
    folder = ["--config.data.name=image_folder", f"--config.data.root={tmp_path / 'data'}",
              "--config.data.batch_size=8", "--config.ckpt_steps=2"]
    work = tmp_path / "w"
    main(work, *folder, "--config.total_steps=2")
    first = json.loads((work / "results.json").read_text())["data_digest"]
    assert first["train"].startswith("16 samples, sha256 ") and first["test"].startswith("4 samples")
    for k in range(8, 12):
        (tmp_path / "data/train/a" / f"img{k}.png").write_bytes((tmp_path / "data/train/a/img0.png").read_bytes())
    longer = [*folder, "--config.total_steps=4", "--allow_change=total_steps"]
    before = {p.name: p.read_bytes() for p in (work / "checkpoints").iterdir()}
    proc = main(work, *longer, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert (f"ckpt_00000002.pt was written by a run on other data (dataset.train: {first['train']} -> 20 samples, "
            in proc.stderr and "--allow_change=dataset" in proc.stderr)
    assert {p.name: p.read_bytes() for p in (work / "checkpoints").iterdir()} == before
    main(work, *folder, "--config.total_steps=4", "--allow_change=total_steps,dataset")
    results = json.loads((work / "results.json").read_text())
    assert results["step"] == 4 and results["data_digest"]["test"] == first["test"]
    assert results["config_changes"]["dataset.train"] == [first["train"], results["data_digest"]["train"]]
    assert "dataset.train" in (work / "config_changes.jsonl").read_text()


def test_no_config_and_an_uncreatable_workdir_are_one_line_refusals(tmp_path):
    proc = forked_main.run([], timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith(
        "error: no --config given, e.g. python main.py --config=configs/linear_eval.py; shipped: configs/")
    assert proc.stderr.count("\n") == 1
    (tmp_path / "file").write_text("")
    proc = main(tmp_path / "file" / "w", check=False)  # below a file: no folder can be made there
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"--workdir={tmp_path / 'file' / 'w'}: cannot create it (Not a directory)" in proc.stderr


def test_a_workdir_given_as_weights_names_its_checkpoints(tmp_path):
    run = tmp_path / "run" / "checkpoints"
    run.mkdir(parents=True)
    for name in ("ckpt_00000002.pt", "ckpt_00000004.pt", "best.pt"):
        (run / name).write_bytes(b"")
    proc = main(tmp_path / "w", f"--config.model.weights.path={tmp_path / 'run'}", check=False)
    assert proc.returncode == 2 and (
        f"is a directory (a run's workdir: its newest checkpoint is {run / 'ckpt_00000004.pt'}, its best "
        f"{run / 'best.pt'}): give the weights file") in proc.stderr


def test_best_metric_accepts_the_logged_name(tmp_path):
    main(tmp_path, "--config.total_steps=2", "--config.best_metric=res5avg/test_top1")
    best = json.loads((tmp_path / "checkpoints" / "best.json").read_text())
    assert best["metric"] == "res5avg/test_top1" and 0 <= best["value"] <= 100


def test_config_only_lists_every_key_with_help_and_runs_nothing(tmp_path):
    proc = main(tmp_path / "w", "--config_only")
    assert "optim.lr = 0.1" in proc.stdout and "data.batch_size = " in proc.stdout
    assert "# GLOBAL training batch" in proc.stdout
    assert not (tmp_path / "w").exists()
    from fpipe import config_help
    for name in ("linear_eval", "supervised", "finetune:convnextv2_base", "linear_eval:dinov2_imagenet"):
        module, _, arg = name.partition(":")
        config = __import__(f"configs.{module}", fromlist=["get_config"]).get_config(arg or None)
        lines = config_help.describe(config).splitlines()
        assert len(lines) > 100 and not [line for line in lines if " = " in line and "#" not in line], name


def test_adamw_blowing_up_exits_3_and_saves_nothing_non_finite(tmp_path):
    proc = main(tmp_path, "--config.total_steps=8", "--config.ckpt_steps=1", "--config.optim.name=adamw",
                "--config.optim.lr=1e6", "--config.schedule.name=constant", check=False,
                config="configs/supervised.py")
    assert proc.returncode == 3 and "diverged" in proc.stderr, proc.stderr[-2000:]
    for path in (tmp_path / "checkpoints").glob("ckpt_*.pt"):
        saved = torch.load(path, weights_only=True)
        for part in ("params", "model_state", "opt_state"):
            assert all(torch.isfinite(t).all() for t in tree.leaves(saved[part]) if t.is_floating_point())
    assert not (tmp_path / "results.json").exists()


def test_results_carry_provenance_and_last_checkpoint_alias(tmp_path):
    main(tmp_path / "sup", *RUN, config="configs/supervised.py")
    last = tmp_path / "sup" / "checkpoints" / "last.pt"
    assert os.path.realpath(last) == os.path.realpath(checkpoint.latest(str(tmp_path / "sup")))
    main(tmp_path / "lin", "--config.total_steps=2", f"--config.model.weights.path={last}")
    r = json.loads((tmp_path / "lin" / "results.json").read_text())
    assert r["config_path"] == "configs/linear_eval.py" and len(r["fingerprint"]) == 12
    assert r["weights"]["trunk_loaded"] == r["weights"]["trunk_total"] > 0
    assert len(r["weights"]["sha256"]) == 64 and r["weights"]["path"] == str(last)
    assert r["dataset"]["splits"] == {"train": 1437, "test": 360} and r["world_size"] == 1
    assert r["started"] <= r["ended"] and r["fpipe_version"]
    # one unit everywhere: train and test top-1 in percent
    lines = [json.loads(l) for l in (tmp_path / "sup" / "metrics.jsonl").read_text().splitlines()]
    train = [l["fc/train_top1"] for l in lines if "fc/train_top1" in l]
    assert train and all(0 <= v <= 100 for v in train) and max(train) > 1


def test_a_second_run_on_a_busy_workdir_is_refused_and_a_stale_lock_is_taken_over(tmp_path):
    tmp_path.mkdir(exist_ok=True)
    lock = tmp_path / workdir_lib.LOCK_FILE
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": "now"}))
    proc = main(tmp_path, *RUN, check=False)
    assert proc.returncode == 2 and "in use by process" in proc.stderr and str(os.getpid()) in proc.stderr
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "since": "then"}))
    main(tmp_path, *RUN)
    assert (tmp_path / "results.json").exists() and not lock.exists()


def test_sigterm_during_compilation_stops_within_seconds(tmp_path):
    cmd = [sys.executable, "main.py", "--config=configs/supervised.py", f"--workdir={tmp_path}", *TINY,
           "--config.compile=True", "--config.compile_min_images=0", "--config.total_steps=50"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    log = tmp_path / "log"
    deadline = time.time() + 300
    while time.time() < deadline and not (log.exists() and "compiling the train step" in log.read_text()):
        time.sleep(0.1)
    time.sleep(1.0)  # inside the compiler now
    sent = time.time()
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=120)
    assert proc.returncode == 143 and time.time() - sent < 10
    assert not list((tmp_path / "checkpoints").glob("ckpt_*.pt"))  # no step was done: nothing to save


def test_disk_full_names_the_path(tmp_path):
    def full(f):
        raise OSError(28, "No space left on device")
    with pytest.raises(OSError, match=f"No space left on device.*{tmp_path / 'x.pt'}"):
        files.atomic_write(str(tmp_path / "x.pt"), full)
    assert not list(tmp_path.iterdir())


def test_a_truncated_best_json_is_named_and_recovered(tmp_path):
    main(tmp_path, "--config.total_steps=2", "--config.best_metric=res5avg/top1")
    best = tmp_path / "checkpoints" / "best.json"
    best.write_text(best.read_text()[:10])
    proc = main(tmp_path, "--config.total_steps=4", "--config.best_metric=res5avg/top1", "--allow_change=total_steps")
    assert str(best) in proc.stderr
    assert json.loads(best.read_text())["step"] in (2, 4)


def test_the_main_job_compiles_whole_graphs(tmp_path):
    """compile=True as shipped: the frozen trunk, the heads' train step and the eval step compile
    with fullgraph=True (FPIPE_STRICT_COMPILE makes a graph break or eager fallback an error)."""
    args = [a for a in TINY if not a.startswith("--config.compile")]
    proc = forked_main.run(["--config=configs/linear_eval.py", f"--workdir={tmp_path}", *args, "--config.total_steps=2",
                            "--config.compile_min_images=0"], env={**os.environ, "FPIPE_STRICT_COMPILE": "1"}, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for what in ("frozen trunk compiled", "train step compiled", "eval step compiled"):
        assert what in proc.stderr
    assert "FAILED" not in proc.stderr


def test_compilation_only_for_runs_that_pay_it_back():
    from configs import linear_eval
    from fpipe.train import loop
    c = linear_eval.get_config()
    assert c.compile and loop.should_compile(c, c.compile_min_images)
    assert not loop.should_compile(c, c.compile_min_images - 1)  # the main job (14k images) runs eager
    c.compile_min_images = 0
    assert loop.should_compile(c, 1)
    c.compile = False
    assert not loop.should_compile(c, 10 ** 9)
