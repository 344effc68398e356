"""Compiled steps kept on disk, so that a second run of the same config starts in seconds.

torch.compile's own caches (inductor's FX graph cache, AOTAutograd's) keep the kernels, but every
new process still traces the step with Dynamo, which takes 10-70 s for a ResNet train step on a
CPU. ``torch.compile(fn).aot_compile`` (torch >= 2.10, experimental) traces and compiles once and
returns a function that can be saved whole; loading it takes about 2 s.

Such a file keeps the guards on the step's inputs (tree structure, shapes, dtypes, devices) but
not the guards on what the step closes over (model, optimizer rules, freezing), which cannot be
saved. Those are covered by the file's key instead: the config without the keys that never reach
the step (``OUTSIDE_THE_STEP``), fpipe's own source, the torch and Python versions, the thread
count and the device; the file's name adds what its guards check (``input_signature``). Any
change there means another file, never a stale graph. A file that fails to load, or inputs its
guards reject, fall back to a plain ``torch.compile`` (said in the log).

A frozen trunk is saved another way (:func:`saved_package`): its weights are constants of its
graph, which the precompile above refuses, so it is exported and compiled with AOTInductor into
a package holding its kernels and packed weights; its key adds the weights' checksum. It is
loaded with those weights on 64-byte boundaries (:mod:`fpipe.train.aoti_package`).

The files are pickles and shared libraries holding code, as inductor's own cache in /tmp is: they
are read only from a directory that this user owns and no one else may write, and only files this
user wrote.
"""
import functools
import hashlib
import json
import os
import pathlib
import re
import sys
import time

import torch
from absl import logging

from fpipe import files, optim, tree
from fpipe.models import layers
from fpipe.train import aoti_package, forked_compile

CACHE_ENV = "FPIPE_COMPILE_CACHE"  # overrides the default directory; "" turns the cache off
STRICT_COMPILE_ENV = "FPIPE_STRICT_COMPILE"  # "1": a compile failure raises (the tests set it)
# The directory's files, packages (a trunk's packed weights: 26 MB for ResNet-18 at 32 px, 114 MB for
# ResNet-50 at 64 px) and saved steps (3-10 MB each): past this many bytes in all, the least recently
# used are removed, so that sweeps and edits of fpipe (each a new key) do not fill the disk.
MAX_BYTES = 2 * 2**30

# Config keys that are read outside the step (durations, logging, checkpoints, seeds, the
# schedule, the base lr's linear scaling) or reach it as tensor inputs (the base lr, AdamW's betas
# and eps, LARS's eta: ``optim.Optimizer.inputs``; clipping's bound: ``STEP_INPUTS``): a run that
# only changes these reuses the saved step. Everything else is part of the key.
OUTSIDE_THE_STEP = ("seed", "total_epochs", "total_steps", "log_steps", "eval_epochs", "eval_steps",
                    "ckpt_epochs", "ckpt_steps", "keep_ckpts", "best_metric", "best_mode",
                    "compile_min_images", "compile_cache_dir", "cudnn_benchmark", "collective_timeout_s", "optim.lr",
                    "optim.betas", "optim.eps", "optim.lars_eta", "optim.scale_lr", "optim.reference_batch_size",
                    "schedule", "data.seed", "data.root", "data.num_workers",
                    "data.worker_niceness", "model.weights",
                    # which images, how they are read and augmented: the step sees only the batches,
                    # whose shapes (image size, the dataset's classes in the heads) key the file
                    # (``input_signature``)
                    "data.name", "data.split_file", "data.train_split", "data.test_split", "data.val_split",
                    "data.train_transforms", "data.eval_transforms", "data.max_image_pixels",
                    "data.max_aspect_ratio", "data.num_train", "data.num_test",
                    # run before an evaluation, after the run, on the data's split, or when to switch
                    # steps (the params held are the step's own part of the key)
                    "precise_bn", "extract", "head_grid.val_fraction", "layer_freeze.freeze_epochs",
                    "layer_freeze.freeze_steps")
# Config keys only the train step reads: the optimizer, BatchNorm's sync, the recomputation pass,
# layers held for a while. The eval step (a forward pass, no inductor options) is keyed without them.
TRAINING_ONLY = ("optim", "sync_bn", "sync_bn_group", "compile_remat", "layer_freeze")
# Tensor inputs of the step whose zero-ness shapes it (a decay term, a momentum buffer, clipping):
# only whether they are zero is keyed.
STEP_INPUTS = ("optim.weight_decay", "optim.momentum", *(f"optim.{k}" for k in optim.CLIP_KEYS))


def default_dir() -> str:
    """``$FPIPE_COMPILE_CACHE``, else ``$XDG_CACHE_HOME/fpipe/compiled`` (``~/.cache/...``)."""
    if CACHE_ENV in os.environ:
        return os.environ[CACHE_ENV]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "fpipe", "compiled")


@functools.lru_cache(maxsize=None)
def source_digest() -> str:
    """sha256 over fpipe's Python source: an edited fpipe never runs a step saved by another."""
    h = hashlib.sha256()
    root = pathlib.Path(__file__).resolve().parents[1]
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def step_key(config, *parts, fused_update=False, evaluation=False) -> str:
    """The key of a step compiled for ``config`` (less ``OUTSIDE_THE_STEP``) and ``parts``.
    ``fused_update``: the step updates with ``fpipe.fused_update``'s ops, which take the
    optimizer's lr_mults, wd_mults and Nesterov as tensor inputs (``optim.FUSED_INPUT_KEYS``): those
    are left out, so finetune's rules load a step saved by a supervised run. ``evaluation``: the
    eval step, which none of ``TRAINING_ONLY`` reaches."""
    outside = OUTSIDE_THE_STEP + (tuple(f"optim.{k}" for k in optim.FUSED_INPUT_KEYS) if fused_update else ())
    outside += TRAINING_ONLY if evaluation else ()
    flat = {k: (f"zero: {not v}" if k in STEP_INPUTS else v) for k, v in tree.flatten(config.to_dict()).items()
            if not any(k == o or k.startswith(o + ".") for o in outside)}
    return key_of(flat, *parts, *(("fused update",) if fused_update else ()))


def key_of(*parts) -> str:
    """sha256 over ``parts`` and what every compiled file depends on: fpipe's source, the torch and
    Python versions, the CPU (inductor's kernels are built for its vector instructions and thread
    count; fpipe picks its graph passes by vendor and family and its conv routes by vendor and
    AVX-512, which ``ATEN_CPU_CAPABILITY`` does not lower), so a cache shared by different
    machines never hands one of them another's step."""
    facts = {"parts": [p if isinstance(p, dict) else str(p) for p in parts], "fpipe": source_digest(),
             "torch": torch.__version__, "python": sys.version, "threads": torch.get_num_threads(),
             "cpu": [layers.cpu_vendor(), layers.cpu_family(), cpu_isa(), layers.cpu_has_avx512()]}
    return hashlib.sha256(json.dumps(facts, sort_keys=True, default=repr).encode()).hexdigest()


def cpu_isa() -> str:
    """The vector instructions compiled CPU code is built for: ATen's capability (which
    ``ATEN_CPU_CAPABILITY`` lowers), with VNNI and AMX where present (inductor's AVX-512 variants)."""
    extras = "".join(f"+{name}" for name, probe in (("vnni", "_is_vnni_supported"), ("amx", "_is_amx_tile_supported"))
                     if getattr(torch.cpu, probe, lambda: False)())
    return torch.backends.cpu.get_cpu_capability() + extras


def key_inductor_caches_by_isa() -> str:
    """Adds this CPU's vector instructions (:func:`cpu_isa`) to every torch.compile cache key of
    this process (``torch.compiler.config.cache_key_tag``, kept beside a tag the user set); returns
    the tag.

    Inductor's FX graph cache keys a CPU graph without the vector width its C++ kernels were
    written for (torch 2.13): a cache directory shared by an AVX-512 and an AVX2 machine, or a run
    under ``ATEN_CPU_CAPABILITY=avx2`` after one without, loads kernels written for 16 floats a
    vector and builds them for 8. A ResNet-18 train step then gave NaN losses and a softmax values
    of 1e38, without an error. fpipe's own saved steps carry the same facts in their key (:func:`key_of`)."""
    tag = f"fpipe-cpu-isa={cpu_isa()}"
    current = torch.compiler.config.cache_key_tag
    if tag not in current.split("|"):
        torch.compiler.config.cache_key_tag = f"{current}|{tag}" if current else tag
    return tag


def saved_or_compiled(fn, args, directory: str, key: str, name: str, fallback, inductor=None):
    """``fn`` compiled for ``args`` (with ``inductor`` options): loaded from ``directory`` if saved
    under ``key``, else compiled ahead of time and saved there. Calls whose inputs its guards
    reject go to ``fallback`` (a plain ``torch.compile(fn)``). ``key`` must cover ``inductor``.
    Compiled in a forked child where that is safe (``fpipe.train.forked_compile``), then loaded."""
    path = _path(directory, name, hashlib.sha256((key + input_signature(args)).encode()).hexdigest(), ".bin")
    compiled = _load(path, fn, args, name)
    savable = compiled is None and _private_dir(directory, name)
    if savable and forked_compile.available(args) and forked_compile.run_in_child(
            lambda: _save(_compile(fn, args, inductor), path, name), name):
        compiled = _load(path, fn, args, name)
        if compiled is not None:
            compiled.fpipe_loaded = False  # compiled by this run
    if compiled is None:
        try:
            compiled = _compile(fn, args, inductor)
        except torch._dynamo.exc.PackageError as e:  # a guard this torch cannot save: compile as usual
            logging.warning("The %s cannot be saved compiled (%s); compiling it for this run only.", name, e)
            return fallback
        if savable:
            _save(compiled, path, name)
    compiled.disable_guard_check()  # checked in Guarded, which then goes to the fallback
    return Guarded(compiled, fallback, name)


def saved_package(module, example, directory: str, key: str, name: str, inductor_configs: dict):
    """``module`` (its tensors constants) compiled ahead of time for inputs shaped as ``example``:
    loaded from ``directory`` if saved under ``key``, else exported, compiled with AOTInductor and
    saved there. None when it cannot be exported or compiled (FPIPE_STRICT_COMPILE=1: raises): the
    caller compiles it as usual.

    A package runs only inputs of ``example``'s shape, dtype, device and strides, and checks none
    of them (other strides or another dtype give wrong values): ``key`` must cover the shape, dtype,
    device and every value of the constants, and callers hand it inputs with ``example``'s strides."""
    path = _path(directory, name, key, ".pt2")
    loaded = _load_package(path, name)
    if loaded is not None:
        loaded.fpipe_loaded = True
        return loaded
    t0 = time.perf_counter()

    def build():
        program = torch.export.export(module, (example,), strict=False)
        tmp = f"{path[:-len('.pt2')]}.{os.getpid()}.tmp.pt2"  # AOTInductor wants the suffix
        try:  # written whole under another name, then renamed: a reader never sees half a package
            torch._inductor.aoti_compile_and_package(program, package_path=tmp, inductor_configs=inductor_configs)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    try:
        if not _private_dir(directory, name):
            return None
        if not (forked_compile.available(example) and forked_compile.run_in_child(build, name)):
            build()
    except Exception as e:  # an unexportable model still runs, compiled for this run only
        if os.environ.get(STRICT_COMPILE_ENV) == "1":
            raise
        logging.warning("The %s cannot be compiled ahead of time (%s); compiling it for this run only.",
                        name, _error(e))
        return None
    logging.info("Compiled the %s ahead of time in %.1f s and saved it to %s (%.1f MB): the next run "
                 "with these weights loads it.", name, time.perf_counter() - t0, path, os.path.getsize(path) / 1e6)
    remove_least_recent(directory, keep=path, max_bytes=MAX_BYTES)
    return _load_package(path, name)


def remove_least_recent(directory, keep, max_bytes):
    """Removes the least recently used packages and saved steps in ``directory`` past ``max_bytes``
    in all (never ``keep``): a sweep over many checkpoints or configs does not fill the disk. Files
    another run is writing (``*.tmp.pt2``, ``*.tmp``) are left alone."""
    on_disk = []
    for path in (*pathlib.Path(directory).glob("*.pt2"), *pathlib.Path(directory).glob("*.bin")):
        # a package another run is writing (a step being written, *.bin.<n>.tmp, is not globbed)
        if path.name.endswith(".tmp.pt2"):
            continue
        try:
            st = path.stat()
        except FileNotFoundError:  # removed meanwhile by another run
            continue
        on_disk.append((st.st_mtime, st.st_size, path))
    total = 0
    for _, size, path in sorted(on_disk, reverse=True):
        total += size
        if total > max_bytes and str(path) != str(keep):
            path.unlink(missing_ok=True)
            logging.info("Removed the compiled %s (least recently used; the compiled files kept hold %.1f GB "
                         "at most).", path, max_bytes / 2**30)


def _load_package(path, name):
    package = _read_saved(path, name, aoti_package.load)
    if package is not None:
        _touch(path)
    return package


def _touch(path):
    """Marks a loaded file used now, the last to be removed (:func:`remove_least_recent`); a file
    removed meanwhile by another run, or a read-only disk, changes nothing."""
    try:
        os.utime(path)
    except OSError:
        pass


def _read_saved(path, name, read):
    """``read(path)`` for a file this user saved, or None: absent, unsafe or unreadable (logged)."""
    if not os.path.exists(path):
        return None
    if not (_private(os.path.dirname(path)) and _private(path)):
        logging.warning("Not loading %s: it and its directory must belong to this user and be writable by "
                        "no one else.", path)
        return None
    t0 = time.perf_counter()
    try:
        loaded = read(path)
    except Exception as e:  # another torch or CPU, a truncated file: compile anew, and overwrite it
        logging.warning("Could not load the saved %s %s (%s); compiling it anew.", name, path, _error(e))
        return None
    logging.info("Loaded the compiled %s from %s in %.1f s.", name, path, time.perf_counter() - t0)
    return loaded


def was_loaded(fn) -> bool:
    """True for a step or package read from the cache (not compiled by this run): the log says so."""
    return getattr(fn, "fpipe_loaded", False)


def _error(e) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def _path(directory, name, key, suffix):
    return os.path.join(directory, f"{re.sub(r'[^a-z0-9]+', '-', name.lower())}-{key[:40]}{suffix}")


class Guarded:
    """The saved step while its guards accept the inputs; the fallback for any other inputs."""

    def __init__(self, compiled, fallback, name):
        self.compiled, self.fallback, self.name, self.warned = compiled, fallback, name, False
        self.fpipe_loaded = was_loaded(compiled)

    def __call__(self, *args):
        if self.compiled.guard_check(*args):
            return self.compiled(*args)
        if not self.warned:
            logging.warning("The saved %s does not fit these inputs (%s); compiling it anew for them.",
                            self.name, _why(self.compiled, args))
            self.warned = True
        return self.fallback(*args)


def _compile(fn, args, inductor=None):
    with torch._dynamo.config.patch(enable_aot_compile=True):
        wrapper = torch.compile(fn, fullgraph=True, options={"guard_filter_fn": _savable_guards, **(inductor or {})})
    return wrapper.aot_compile((args, {}))


def input_signature(args) -> str:
    """What a saved step's guards check of its inputs, as text: the tree's structure and each
    tensor's shape, strides, dtype and device (other leaves by type and value). Part of a saved
    step's file name, so that inputs of another shape (another dataset's classes, another image
    size) never load a step their guards would reject: they get a file of their own."""
    leaves, spec = torch.utils._pytree.tree_flatten(args)
    described = [(tuple(t.shape), t.stride(), str(t.dtype), str(t.device)) if isinstance(t, torch.Tensor)
                 else (type(t).__name__, repr(t)) for t in leaves]
    return f"{spec}|{described}"


def _savable_guards(entries):
    """Keep the guards on the inputs; drop those that cannot be saved (on globals, closures,
    object identities: the key covers them) and those naming an import (torch 2.13 cannot load
    them back outside a trace)."""
    unsavable = set(torch._dynamo.guards.CheckFunctionManager.UNSUPPORTED_SERIALIZATION_GUARD_TYPES)
    return [not (e.is_global or e.guard_type in unsavable or unsavable & set(e.derived_guard_types)
                 or "__import__(" in e.name) for e in entries]


def _save(compiled, path, name):
    """Writes ``compiled`` to ``path``, in a directory that ``_private_dir`` accepted."""
    try:
        data = type(compiled).serialize(compiled).serialized_data
        files.atomic_write(path, lambda f: f.write(data))
    except Exception as e:  # a step that cannot be saved still runs; only the next start is slower
        logging.warning("Could not save the compiled %s (%s); the next run compiles it again.", name, _error(e))
        return
    logging.info("Saved the compiled %s to %s (%.1f MB): the next run with this config loads it.",
                 name, path, len(data) / 1e6)
    remove_least_recent(os.path.dirname(path), keep=path, max_bytes=MAX_BYTES)


def _load(path, fn, args, name):
    def read(path):
        with open(path, "rb") as f, torch._guards.tracing(torch._guards.TracingContext(None)):
            return torch.compiler.load_compiled_function(f, f_globals=fn.__globals__)

    compiled = _read_saved(path, name, read)
    if compiled is None:
        return None
    if not compiled.guard_check(*args):
        logging.warning("The saved %s %s does not fit this run's inputs (%s); compiling it anew.", name, path,
                        _why(compiled, args))
        return None
    _touch(path)
    compiled.fpipe_loaded = True
    return compiled


def _private_dir(directory, name) -> bool:
    """Creates ``directory`` (this user's alone) if needed; False, said in the log, if another user
    owns it or others may write to it, or it cannot be made: nothing compiled is saved there."""
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
    except OSError as e:
        logging.warning("Not saving the compiled %s: %s cannot be made (%s).", name, directory, _error(e))
        return False
    if _private(directory):
        return True
    logging.warning("Not saving the compiled %s: %s must belong to this user and be writable by no one else.",
                    name, directory)
    return False


def _private(path) -> bool:
    st = os.stat(path)
    return st.st_uid == os.getuid() and not st.st_mode & 0o022


def _why(compiled, args) -> str:
    """The guard that failed, as Dynamo words it (a tensor's size, stride or dtype; a constant)."""
    info = compiled._artifacts.guard_manager.check_verbose(compiled.prepare_f_locals(*args))
    parts = getattr(info, "verbose_code_parts", None) or [str(info)]
    return " ".join(" ".join(parts).split())[:300]

