"""fpipe.host_memory: freed blocks stay with the process (no page faults on reuse), unless the user says otherwise."""
import json
import os
import pathlib
import platform
import subprocess
import sys

import pytest

from fpipe import host_memory

ROOT = pathlib.Path(__file__).resolve().parents[1]
GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# A step's worth of blocks a round (eight of 10 MB: below glibc's largest mmap threshold), written
# and all freed, straight through libc (torch's CPU allocator sits on the same heap). With glibc's
# defaults the freed top of the heap is trimmed and faulted in again every round.
ROUNDS = """
import ctypes, json, resource
from fpipe import host_memory
note = host_memory.keep_freed_memory()
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
faults = []
for _ in range(5):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    blocks = [libc.malloc(10 << 20) for _ in range(8)]
    for block in blocks:
        ctypes.memset(block, 1, 10 << 20)
    for block in blocks:
        libc.free(block)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"note": note, "faults": faults}))
"""
PAGES = 8 * (10 << 20) // 4096


def rounds(**env):
    clean = {k: v for k, v in os.environ.items()
             if not (k.startswith("MALLOC_") or k in ("GLIBC_TUNABLES", "LD_PRELOAD", host_memory.OPT_OUT_ENV))}
    out = subprocess.run([sys.executable, "-c", ROUNDS], cwd=ROOT, env={**clean, **env}, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not GLIBC, reason="glibc's mallopt")
def test_freed_blocks_are_reused_without_faulting_them_in_again():
    got = rounds()
    assert "kept" in got["note"]
    assert got["faults"][0] > PAGES // 2  # the first round maps its memory: the count is real
    assert max(got["faults"][1:]) < PAGES // 20, got


@pytest.mark.skipif(not GLIBC, reason="glibc's mallopt")
@pytest.mark.parametrize("env,note", [({host_memory.OPT_OUT_ENV: "0"}, "glibc's defaults"),
                                      ({host_memory.OPT_OUT_ENV: "off"}, "glibc's defaults"),
                                      ({"MALLOC_TOP_PAD_": "131072"}, "left as set (MALLOC_TOP_PAD_)")])
def test_glibc_defaults_when_asked_and_then_each_round_faults_again(env, note):
    got = rounds(**env)
    assert note in got["note"]
    assert min(got["faults"][1:]) > PAGES // 2, got


@pytest.mark.parametrize("env,reason", [
    ({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=0"}, "GLIBC_TUNABLES"),
    ({"GLIBC_TUNABLES": "glibc.rtld.nns=2"}, ""),
    ({"MALLOC_ARENA_MAX": "2", "MALLOC_MMAP_THRESHOLD_": "1"}, "MALLOC_MMAP_THRESHOLD_"),
    ({"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"}, "LD_PRELOAD jemalloc"),
    ({}, "")])
def test_the_users_own_allocator_settings_are_left_alone(monkeypatch, env, reason):
    for k in list(os.environ):
        if k.startswith("MALLOC_") or k in ("GLIBC_TUNABLES", "LD_PRELOAD"):
            monkeypatch.delenv(k)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert host_memory._users_choice() == reason
