"""`torchrun --nproc_per_node=2` (gloo, CPU) runs every shipped config to the same results as one process,
at the configs' own settings (SyncBN is on by default): the loss curve, the final params and
BatchNorm statistics agree to float tolerance (sums are reordered), and the linear_eval main job's
test accuracies are identical.
"""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch

import _forked_main as forked_main
from fpipe import weights
from test_main import ROOT, TINY

# A few steps: float32 rounding of reordered sums grows step by step when the trunk trains at the
# configs' lrs (one process on 1 vs 2 threads already differs in the 4th digit after a few steps).
STEPS = 4
ARGS = [*TINY, f"--config.total_steps={STEPS}", "--config.log_steps=1"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc, args, env):
    """``torchrun --nproc_per_node=NPROC main.py ARGS`` (gloo, this host), its output captured; one
    process: ``python main.py ARGS`` (forked, tests/_forked_main.py)."""
    if nproc == 1:
        return forked_main.run(args, env=env)
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}",
           "--master_addr=127.0.0.1", "main.py", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)


def run(workdir, config, nproc, *extra, threads=1):
    cmd = [f"--config={config}", f"--workdir={workdir}", *ARGS, *extra]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = torchrun(nproc, cmd, env)
    assert proc.returncode == 0, f"{cmd}:\n{proc.stderr[-4000:]}"
    losses = [json.loads(l)["loss"] for l in (workdir / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(l)]
    ckpt = weights.read_checkpoint(str(sorted((workdir / "checkpoints").glob("ckpt_*.pt"))[-1]))
    return losses, ckpt, json.loads((workdir / "results.json").read_text())


# finetune.py runs the same data-parallel path as supervised.py (only its optimizer rules differ,
# checked in one process by tests/test_step.py and test_optim.py): left out to keep CI near 10 min.
@pytest.mark.parametrize("config,rel,floor", [("configs/linear_eval.py", 1e-5, 1e-2),
                                              ("configs/supervised.py", 1e-3, 0.2)])
def test_two_processes_equal_one_at_the_configs_own_settings(tmp_path, config, rel, floor):
    one_losses, one, one_results = run(tmp_path / "one", config, 1)
    two_losses, two, two_results = run(tmp_path / "two", config, 2)
    assert two_results["world_size"] == 2 and len(one_losses) == len(two_losses) == STEPS
    # The first losses (params after up to two updates) agree to float rounding, whatever the config.
    torch.testing.assert_close(torch.tensor(two_losses[:3]), torch.tensor(one_losses[:3]), rtol=1e-5, atol=1e-6)
    # Later, a trunk trained from scratch at lr 0.1 amplifies rounding ~1e5-fold within two steps:
    # two processes sum the batch's gradients and BatchNorm statistics in another order, which
    # moves the weights by up to ~1e-4 in 4 steps. So each param must stay within `rel` of its
    # largest magnitude (at least `floor`), or within the drift of a control: one process on 2
    # threads instead of 1 (only the summation order differs).
    control, control_results, control_losses = {}, one_results, one_losses
    if config != "configs/linear_eval.py":
        control_losses, same, control_results = run(tmp_path / "control", config, 1, threads=2)
        control = {k: (same["params"][k] - t).abs().max().item() for k, t in one["params"].items()}
        control |= {k: (same["model_state"][k] - t).abs().max().item() for k, t in one["model_state"].items()
                    if t.is_floating_point()}
    # The losses too: within `rel`, or within the control's drift (one CPU, AMD Zen 5, drifted 1.3e-3
    # at the 4th step with 2 threads, where two processes matched the 2-thread control to 1e-6).
    one_l, two_l, control_l = (torch.tensor(l, dtype=torch.float64) for l in (one_losses, two_losses, control_losses))
    allowed = torch.maximum(rel * one_l.abs() + 1e-5, 4 * (control_l - one_l).abs())
    assert ((two_l - one_l).abs() <= allowed).all(), (one_losses, two_losses, control_losses)
    for name, t in one["params"].items():
        err = (two["params"][name] - t).abs().max().item()
        assert err <= max(rel * max(t.abs().max().item(), floor), 4 * control.get(name, 0.0)), f"{name}: {err}"
    for name, t in one["model_state"].items():  # BatchNorm statistics amplify the params' rounding
        if t.is_floating_point():
            err = (two["model_state"][name] - t).abs().max().item()
            assert err <= max(10 * rel * max(t.abs().max().item(), 1e-2), 4 * control.get(name, 0.0)), name
        else:
            assert torch.equal(two["model_state"][name], t), name
    if config == "configs/linear_eval.py":  # the main job: the same accuracies, exactly
        assert two_results["heads"] == one_results["heads"]
    for head, r in one_results["heads"].items():  # exact evaluation: every test sample once
        for k, v in r.items():
            drift = abs(control_results["heads"][head][k] - v)
            assert abs(two_results["heads"][head][k] - v) <= 100 / 360 + 2 * drift + 1e-9, (head, k)


def test_extraction_under_torchrun_covers_every_sample_once(tmp_path):
    proc = torchrun(2, ["--config=configs/extract_features.py", f"--workdir={tmp_path}", *TINY],
                    {**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "results.json").read_text())["world_size"] == 2
