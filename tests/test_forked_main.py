"""tests/_forked_main.py behaves as ``python main.py``: the same exit status and output as a fresh
interpreter, and a killed run's status as subprocess reports it."""
import signal
import subprocess
import sys

import pytest

import _forked_main as forked_main
from test_main import ROOT, TINY


@pytest.mark.parametrize("args", [
    ["--config=configs/linear_eval.py", "--config.optim.lrr=0.1"],  # refused by absl, before torch is imported
    ["--config=configs/linear_eval.py", "--config.optim.lr=-0.1"],  # refused by the config check, after
    ["--config=configs/supervised.py", "--config_only"],  # printed, exit 0
])
def test_a_run_prints_and_exits_as_a_fresh_interpreter(tmp_path, args):
    args = [*args, f"--workdir={tmp_path / 'w'}"]
    fresh = subprocess.run([sys.executable, "main.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    forked = forked_main.run(args)
    assert (forked.returncode, forked.stdout, forked.stderr) == (fresh.returncode, fresh.stdout, fresh.stderr)
    assert fresh.stdout or fresh.stderr


def test_a_killed_run_has_popens_status_and_the_next_run_starts(tmp_path):
    running = forked_main.start(["--config=configs/linear_eval.py", f"--workdir={tmp_path / 'killed'}", *TINY,
                                 "--config.total_steps=100000"])
    running.send_signal(signal.SIGKILL)
    assert running.wait(timeout=60) == -signal.SIGKILL
    done = forked_main.run(["--config=configs/linear_eval.py", f"--workdir={tmp_path / 'w'}", *TINY,
                            "--config.total_steps=2"])
    assert done.returncode == 0 and (tmp_path / "w" / "results.json").exists(), done.stderr[-3000:]
