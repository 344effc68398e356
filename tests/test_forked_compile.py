"""Steps compiled in a forked child and loaded by the training process (fpipe.train.forked_compile)."""
import functools
import json
import logging
import os
import signal
import threading
import time

import pytest
import torch

from fpipe.train import compile_cache, forked_compile, signals


def double(x):
    return x * 2 + 1


@pytest.fixture
def compiles(monkeypatch, tmp_path):
    """compile_cache._compile, recording in a file where and how it ran (the child's writes reach
    the test only through files)."""
    record, real = tmp_path / "compiled.json", compile_cache._compile

    def compile_and_record(fn, args, inductor=None):
        signal.alarm(60)  # an op that hangs kills the child (a failed test) rather than the test run
        total = float(torch.ones(1 << 22).sum())  # a parallel op: OpenMP's pool works in the child
        signal.alarm(0)
        record.write_text(json.dumps({"pid": os.getpid(), "threads": torch.get_num_threads(), "sum": total}))
        return real(fn, args, inductor)
    monkeypatch.setattr(compile_cache, "_compile", compile_and_record)
    return lambda: json.loads(record.read_text())


def test_the_step_compiles_in_a_child_where_parallel_ops_run_and_this_process_loads_it(tmp_path, compiles,
                                                                                        request):
    request.addfinalizer(functools.partial(torch.set_num_threads, torch.get_num_threads()))
    torch.set_num_threads(2)
    torch.ones(1 << 22).sum()  # this thread's OpenMP pool exists: a child forked from it would hang
    x = torch.arange(6.0)
    step = compile_cache.saved_or_compiled(double, (x,), str(tmp_path / "c"), "k" * 64, "toy", None)
    where = compiles()
    assert where["pid"] != os.getpid()
    assert where["threads"] == 2 and where["sum"] == 1 << 22  # the saved guards hold this process's count
    assert not compile_cache.was_loaded(step)  # compiled by this run (in its child), not a saved one
    assert torch.equal(step(x), double(x))


def test_a_child_compiles_after_this_process_compiled_with_its_compile_threads(monkeypatch):
    """Inductor's C++ compile thread pool, started and idle here, has no threads in a child: a child
    compiling new kernels waited on it forever (a run's second compile, a benchmark's second case)."""
    from torch._inductor import config as inductor_config
    monkeypatch.setattr(inductor_config, "compile_threads", 2)
    monkeypatch.setattr(inductor_config, "fx_graph_cache", False)
    unique = float(time.time_ns() % 1_000_003) / 7.0  # a constant in the kernels' source: never a cached kernel
    x = torch.arange(6.0)
    torch.compile(lambda a: (a * unique).sin())(x)  # here: the pool runs the C++ compile, then idles

    def compile_new_kernels():
        signal.alarm(60)  # hanging, the child dies of SIGALRM and run_in_child says False
        out = torch.compile(lambda a: (a + unique).cos() * 3)(x)
        assert torch.allclose(out, (x + unique).cos() * 3)
    assert forked_compile.run_in_child(compile_new_kernels, "probe")


def test_the_child_runs_under_the_callers_grad_inference_and_autocast_modes(tmp_path):
    """The child runs ``work`` on a new thread, where thread-local modes start afresh: inductor
    froze the trunk's weights only under the caller's no_grad (linear eval 10% slower without)."""
    seen = tmp_path / "modes.json"

    def record():
        seen.write_text(json.dumps([torch.is_grad_enabled(), torch.is_inference_mode_enabled(),
                                    torch.is_autocast_enabled("cpu"), str(torch.get_autocast_dtype("cpu"))]))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert forked_compile.run_in_child(record, "probe")
    assert json.loads(seen.read_text()) == [False, False, True, "torch.bfloat16"]
    with torch.inference_mode():
        assert forked_compile.run_in_child(record, "probe")
    assert json.loads(seen.read_text())[:3] == [False, True, False]
    assert forked_compile.run_in_child(record, "probe")
    assert json.loads(seen.read_text())[:3] == [True, False, False]


def test_without_fork_it_compiles_here(tmp_path, compiles, monkeypatch):
    monkeypatch.setenv(forked_compile.IN_PROCESS_ENV, "1")
    x = torch.arange(6.0)
    step = compile_cache.saved_or_compiled(double, (x,), str(tmp_path / "c"), "k" * 64, "toy", None)
    assert compiles()["pid"] == os.getpid() and torch.equal(step(x), double(x))


def test_a_child_that_fails_leaves_the_compile_to_this_process(tmp_path, monkeypatch, caplog):
    parent, real = os.getpid(), compile_cache._compile
    monkeypatch.setattr(compile_cache, "_compile",
                        lambda *a, **k: os._exit(7) if os.getpid() != parent else real(*a, **k))
    x, directory = torch.arange(6.0), tmp_path / "c"
    with caplog.at_level(logging.WARNING):
        step = compile_cache.saved_or_compiled(double, (x,), str(directory), "k" * 64, "toy", None)
    assert "Compiling the toy in a child process failed (exit status 7)" in caplog.text
    assert torch.equal(step(x), double(x)) and len(os.listdir(directory)) == 1  # compiled and saved here


def test_a_signal_while_the_child_compiles_stops_the_run_and_kills_the_child(tmp_path, monkeypatch):
    pid_file = tmp_path / "child.pid"

    def slow_compile(*a, **k):
        pid_file.write_text(str(os.getpid()))
        time.sleep(120)
    monkeypatch.setattr(compile_cache, "_compile", slow_compile)

    def terminate_once_the_child_runs():
        for _ in range(600):
            if pid_file.exists() and pid_file.read_text():
                break
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)
    threading.Thread(target=terminate_once_the_child_runs, daemon=True).start()
    t0 = time.perf_counter()
    with signals.StopOnSignal() as stop, pytest.raises(signals.Stopped), stop.interruptible():
        compile_cache.saved_or_compiled(double, (torch.arange(3.0),), str(tmp_path / "c"), "k" * 64, "toy", None)
    assert time.perf_counter() - t0 < 60
    with pytest.raises(ProcessLookupError):  # killed and reaped
        os.kill(int(pid_file.read_text()), 0)


def test_only_cpu_steps_fork_and_the_environment_can_say_no(monkeypatch):
    monkeypatch.delenv(forked_compile.IN_PROCESS_ENV, raising=False)
    assert forked_compile.available(({"w": torch.zeros(2)}, torch.zeros(3), 0.1))
    assert not forked_compile.available(({"w": torch.zeros(2)}, torch.empty(3, device="meta")))
    monkeypatch.setenv(forked_compile.IN_PROCESS_ENV, "1")
    assert not forked_compile.available((torch.zeros(3),))
