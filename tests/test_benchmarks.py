"""The benchmarks' own housekeeping: the compile caches they make are gone when they exit, and a
cache directory the user names is kept."""
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ("import os; from benchmarks.linear_eval_step import own_compile_cache, scratch_dir; "
          "own_compile_cache(); extra = scratch_dir('fpipe-test-'); "
          "open(os.path.join(os.environ['FPIPE_COMPILE_CACHE'], 'step.pt2'), 'w').write('x'); "
          "print(os.environ['FPIPE_COMPILE_CACHE']); print(extra)")


def run(env):
    out = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env={**env, "PYTHONPATH": str(ROOT)},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return [pathlib.Path(line) for line in out.stdout.split()]


def test_a_benchmarks_own_compile_cache_is_removed_when_it_exits(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "FPIPE_COMPILE_CACHE"}
    cache, extra = run({**env, "TMPDIR": str(tmp_path)})
    assert cache.parent == tmp_path and extra.parent == tmp_path  # they were made, here
    assert not cache.exists() and not extra.exists()


def test_a_compile_cache_the_user_names_is_kept(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    cache, _ = run({**os.environ, "FPIPE_COMPILE_CACHE": str(mine), "TMPDIR": str(tmp_path)})
    assert cache == mine and (mine / "step.pt2").read_text() == "x"
