"""Keep the host memory a step frees inside the process, so the next step reuses it (glibc only).

A train step allocates and frees the same activations every step. With glibc's defaults, freed
blocks above its mmap threshold (128 KB, rising to at most 32 MB) are unmapped and the top of
the heap is trimmed, so each step faults its memory in again and the kernel zeroes it: ResNet-50
at 64 px, batch 64, on 2 cores: 25,000-50,000 page faults and 20-200 ms of system time a step
(483-535 ms a step alone; 400-450 ms with this); at 224 px, batch 32: 540,000-770,000 faults,
3.2-3.5 s a step (2.3-2.5 s with this, after up to 3.5 s in the first five steps, where glibc
maps blocks over 32 MB afresh until its heap has grown free chunks that fit them).
``keep_freed_memory`` sets glibc's ``mallopt``: never trim the heap, and serve every block up to
glibc's largest mmap threshold (32 MB) from it.
The cost: freed memory stays resident, and the peak rises with fragmentation (R50 64 px:
+3-7%; 224 px batch 32: +11-18%). PyTorch's CPU launcher (``torch.backends.xeon.run_cpu``) gets
the same by preloading jemalloc or tcmalloc.

Blocks over 32 MB stay mapped afresh each step until ``keep_large_blocks``, which the train
loops call after their first step: from then on every block comes from the heap. Since the
compile runs in a child process (fpipe.train.forked_compile), the heap no longer grows free
chunks that fit them by itself. ResNet-50 224 px batch 32 finetune, alone, four alternated pairs:
126,000 fewer faults and 0.47 s less system time a step, the same step peak RSS (3038-3090 vs
3011-3110 MiB), step time -4% to +6% (median +1%) on 2 cores. Set before the first step, the
first call's blocks (loading the compiled step, its first run) lay the heap out and the steps
fragment it: peak 3935 vs 3415 MiB.

``main.py`` calls it and logs what it did. The user's own choice wins: nothing is changed when
``MALLOC_*_`` or ``GLIBC_TUNABLES`` malloc settings are in the environment, another allocator is
preloaded, or ``FPIPE_KEEP_FREED_MEMORY=0`` (or false, no, off).
"""
import ctypes
import os
import platform

from absl import logging

OPT_OUT_ENV = "FPIPE_KEEP_FREED_MEMORY"
# mallopt's parameter numbers (glibc's malloc.h).
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4
MMAP_THRESHOLD_MAX = 32 << 20  # glibc's ceiling on 64-bit systems (man mallopt)
_OTHER_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")
_set = {"freed": False, "large": False}  # what this process's mallopt calls have set
GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def keep_freed_memory() -> str:
    """Sets glibc to keep freed memory; returns what was done, a line for the log."""
    if os.environ.get(OPT_OUT_ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return f"host memory: glibc's defaults ({OPT_OUT_ENV}={os.environ[OPT_OUT_ENV]})"
    reason = _users_choice()
    if reason:
        return f"host memory: left as set ({reason})"
    if not GLIBC:
        return "host memory: left as is (not glibc)"
    mallopt = _mallopt()
    if mallopt is None:
        return "host memory: left as is (no mallopt)"
    # -1: never trim the heap's top (man mallopt).
    if mallopt(M_TRIM_THRESHOLD, -1) != 1 or mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX) != 1:
        return "host memory: left as is (mallopt refused)"
    _set["freed"] = True
    return ("host memory: freed blocks up to 32 MB kept for reuse (glibc mallopt: no trim, mmap above 32 MB; "
            "after the first step, larger blocks too)")


def keep_large_blocks() -> bool:
    """After a run's first step: blocks over 32 MB come from the heap too (glibc: no mmap), so the
    steps stop faulting them in afresh. Only where ``keep_freed_memory`` set glibc; True if set now."""
    if not _set["freed"] or _set["large"]:
        return False
    mallopt = _mallopt()
    _set["large"] = mallopt is not None and mallopt(M_MMAP_MAX, 0) == 1
    return _set["large"]


def keep_large_blocks_from(step: int) -> None:
    """``keep_large_blocks`` as the train loops call it once their first step is done (``step``:
    the next one), said in the log when it took effect."""
    if keep_large_blocks():
        logging.info("host memory: blocks over 32 MB kept for reuse too from step %d on", step)


def _mallopt():
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return None
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt


def _users_choice():
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if "glibc.malloc." in tunables:
        return "GLIBC_TUNABLES"
    named = sorted(k for k in os.environ if k.startswith("MALLOC_") and k.endswith("_"))
    if named:
        return ", ".join(named)
    preload = os.environ.get("LD_PRELOAD", "")
    return next((f"LD_PRELOAD {name}" for name in _OTHER_ALLOCATORS if name in preload), "")
