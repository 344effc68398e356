"""fpipe.host_memory: freed blocks stay with the process (no page faults on reuse), unless the user says otherwise."""
import json
import os
import pathlib
import subprocess
import sys

import pytest

from fpipe import host_memory

ROOT = pathlib.Path(__file__).resolve().parents[1]

# A step's worth of blocks a round (eight of 10 MB: below glibc's largest mmap threshold), written
# and all freed, straight through libc (torch's CPU allocator sits on the same heap). With glibc's
# defaults the freed top of the heap is trimmed and faulted in again every round.
# With BLOCK_MIB over 32 (glibc's largest mmap threshold), the blocks are mapped afresh each round
# until keep_large_blocks, called after the first round as the train loops call it after their first step.
ROUNDS = """
import ctypes, json, resource, sys
from fpipe import host_memory
size, large = int(sys.argv[1]) << 20, sys.argv[2] == "1"
note = host_memory.keep_freed_memory()
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
faults, kept = [], None
for _ in range(5):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    blocks = [libc.malloc(size) for _ in range(8)]
    for block in blocks:
        ctypes.memset(block, 1, size)
    for block in blocks:
        libc.free(block)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    if large and kept is None:
        kept = host_memory.keep_large_blocks()
print(json.dumps({"note": note, "faults": faults, "kept_large": kept}))
"""
PAGES = 8 * (10 << 20) // 4096


def rounds(block_mib=10, keep_large=False, **env):
    clean = {k: v for k, v in os.environ.items()
             if not (k.startswith("MALLOC_") or k in ("GLIBC_TUNABLES", "LD_PRELOAD", host_memory.OPT_OUT_ENV))}
    out = subprocess.run([sys.executable, "-c", ROUNDS, str(block_mib), str(int(keep_large))], cwd=ROOT,
                         env={**clean, **env}, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not host_memory.GLIBC, reason="glibc's mallopt")
def test_freed_blocks_are_reused_without_faulting_them_in_again():
    got = rounds()
    assert "kept" in got["note"]
    assert got["faults"][0] > PAGES // 2  # the first round maps its memory: the count is real
    assert max(got["faults"][1:]) < PAGES // 20, got


@pytest.mark.skipif(not host_memory.GLIBC, reason="glibc's mallopt")
def test_blocks_over_32_mb_fault_every_round_until_kept_after_the_first_step():
    pages = 8 * (40 << 20) // 4096
    mapped = rounds(block_mib=40)
    assert min(mapped["faults"][1:]) > pages // 2, mapped  # glibc maps them afresh each round
    kept = rounds(block_mib=40, keep_large=True)
    assert kept["kept_large"] is True
    assert kept["faults"][1] > pages // 2  # the round after it grows the heap once
    assert max(kept["faults"][2:]) < pages // 20, kept


@pytest.mark.skipif(not host_memory.GLIBC, reason="glibc's mallopt")
def test_large_blocks_are_left_to_glibc_where_the_user_chose_the_allocator():
    got = rounds(block_mib=40, keep_large=True, **{host_memory.OPT_OUT_ENV: "0"})
    assert got["kept_large"] is False
    assert min(got["faults"][1:]) > 8 * (40 << 20) // 4096 // 2, got


@pytest.mark.skipif(not host_memory.GLIBC, reason="glibc's mallopt")
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
