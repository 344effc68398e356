"""Compile in a forked child process, so that the compiler's leftovers never join the training process.

Compiling a step imports much of inductor and builds caches, FX graphs and bytecode that stay in
the process for good (100-200 MB of Python objects for a ResNet or RegNet train step on a CPU,
measured: docs/BENCHMARKS.md). A child forked at the first call holds the same step and inputs
(copy-on-write), compiles and saves it (``fpipe.train.compile_cache``) and exits; this process
then loads the saved file, as a second run would, and carries none of it.

Only where forking is safe: Linux, a step on the CPU, CUDA not initialised (CUDA forbids it);
``FPIPE_COMPILE_IN_PROCESS=1`` compiles in the process itself. The fork is made from a new
thread: GNU OpenMP keeps its thread pool per thread that opened parallel regions, and that
pool's threads do not exist in a child, whose first parallel op from the same thread would wait
for them forever. The caller's thread-local modes (grad, inference, CPU autocast) are set again in
that thread: inductor freezes weights only under no_grad, for one. Inductor's C++ compile thread
pool is the same trap as OpenMP's (PyTorch resets its process pool at a fork, not that one): the
child starts a fresh one.
"""
import ctypes
import os
import signal
import sys
import threading
import warnings

import torch
from absl import logging

from fpipe.train import precision

IN_PROCESS_ENV = "FPIPE_COMPILE_IN_PROCESS"  # "1": compile in this process
_PR_SET_PDEATHSIG = 1  # prctl(2): the signal a child gets when its parent dies


def available(inputs) -> bool:
    """Whether a child can be forked here to compile for ``inputs`` (a tree): Linux, CPU tensors
    only, CUDA not initialised, ``FPIPE_COMPILE_IN_PROCESS`` not "1"."""
    return (sys.platform == "linux" and hasattr(os, "fork") and not torch.cuda.is_initialized()
            and os.environ.get(IN_PROCESS_ENV) != "1"
            and all(x.device.type == "cpu" for x in torch.utils._pytree.tree_leaves(inputs)
                    if isinstance(x, torch.Tensor)))


def run_in_child(work, name: str) -> bool:
    """``work()`` run in a forked child, this process waiting for it: True when it returned, False
    when it raised or the child died (said in the log; the caller then compiles here, where the
    error shows). A signal that stops this process while it waits kills the child too."""
    parent, child, forked, reaped = os.getpid(), {}, threading.Event(), threading.Event()
    modes = _thread_modes()
    sys.stdout.flush()
    sys.stderr.flush()

    def fork_and_wait():  # a thread of its own (module docstring), alive while the child is (PDEATHSIG)
        try:
            with warnings.catch_warnings():  # Python >= 3.12 warns on any fork beside other threads
                warnings.simplefilter("ignore", DeprecationWarning)
                child["pid"] = os.fork()
        except OSError as e:
            child["error"] = e
        forked.set()
        if child.get("pid") == 0:
            _run_as_child(work, modes, name, parent)
        elif "pid" in child:
            child["status"] = os.waitpid(child["pid"], 0)[1]
            reaped.set()
    thread = threading.Thread(target=fork_and_wait, name="fpipe-compile-fork", daemon=True)
    thread.start()
    forked.wait()
    if "error" in child:
        logging.warning("Could not fork a process to compile the %s in (%s); compiling it in this process.",
                        name, child["error"])
        return False
    logging.info("compiling the %s in a child process (pid %d); this process then loads it", name, child["pid"])
    try:
        reaped.wait()
    except BaseException:  # fpipe.train.signals.Stopped (SIGTERM, SIGINT) while waiting
        if not reaped.is_set():
            try:
                os.kill(child["pid"], signal.SIGKILL)
            except ProcessLookupError:  # exited meanwhile
                pass
            reaped.wait(timeout=10)  # the thread reaps it
        raise
    code = os.waitstatus_to_exitcode(child["status"])
    if code:
        how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"
        logging.warning("Compiling the %s in a child process failed (%s); compiling it in this process.", name, how)
    return code == 0


def _run_as_child(work, modes, name, parent):
    """The child: dies with the parent, takes the default actions on SIGTERM/SIGINT, runs ``work``
    under the caller's ``modes`` with a compile pool of its own, and exits without running this
    process's exit handlers."""
    status = 1
    try:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_DFL)
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() == parent:  # else the parent died before prctl took effect
            _drop_inherited_compile_pool()
            _in_modes(modes, work)
            status = 0
    except BaseException as e:  # said here; the parent compiles again, where it raises
        logging.warning("The child process compiling the %s failed: %s: %s", name, type(e).__name__,
                        str(e).splitlines()[0] if str(e) else "")
    finally:
        os._exit(status)


def _drop_inherited_compile_pool():
    """Forget inductor's C++ compile thread pool as this process's parent left it. Its threads do
    not exist in a child, and where the parent had compiled (its pool idle) the pool starts none:
    the child's compile would wait for them forever. The next compile makes a new pool."""
    async_compile = sys.modules.get("torch._inductor.async_compile")
    pool = getattr(getattr(async_compile, "AsyncCompile", None), "pool", None)
    if hasattr(pool, "cache_clear"):
        pool.cache_clear()


def _thread_modes() -> dict:
    """This thread's modes that a compile reads and a new thread does not inherit (autocast: its
    CPU dtype, None when off)."""
    return {"grad": torch.is_grad_enabled(), "inference": torch.is_inference_mode_enabled(),
            "autocast": torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None}


def _in_modes(modes, work):
    """``work()`` under ``modes`` (``_thread_modes`` of another thread)."""
    with torch.inference_mode(modes["inference"]), torch.set_grad_enabled(modes["grad"]), \
            precision.autocast(modes["autocast"], "cpu"):
        return work()
