"""fpipe's checkpoint files, the one owner of their format: write, read, latest, checksum, frozen file.

Used by training (save, restore, best) and by ``fpipe.weights`` (reading a checkpoint as weights).

A checkpoint is one ``torch.save`` file per save, ``WORKDIR/checkpoints/ckpt_<step:08d>.pt``,
holding a plain dict that ``torch.load(weights_only=True)`` reads: tensors, dicts, lists,
tuples, ints, floats, strings, bools and None only (checked when saving, so a checkpoint that
could not be restored is never written). What goes in is the caller's; the convention is

        params       flat {dotted name: tensor} of the params that train (trunk.* / heads.*)
        frozen_params  {"file", "sha256"}: the frozen params, written once (save_frozen)
        model_state  flat {dotted name: tensor}: BatchNorm running stats, num_batches_tracked
        opt_state    the optimizer's state tree
        step, epoch  ints; ``step`` (if present) must equal the step the file is named by
        rng          {name: torch generator state (uint8 tensor)}
        data         the data loader's position
        hooks        {hook name: hook.state_dict()}
        scaler       the gradient scaler's state, or None
        ema          {"params", "model_state"}: flat averages of the trained weights (config.ema), or absent
        meta         {"fpipe_version": str, "config": config as a JSON string}

``save`` adds one reserved key, ``"fpipe_checkpoint"``: ``{"format", "step", "sha256"}``; the
hash covers every leaf (tensor bytes, dtype, shape; other values by repr) and the nesting, so
a file that loads but holds damaged bytes is caught as well as a truncated one. ``load`` and
``restore`` check it and strip it.

Durability: write to ``<name>.<pid>.tmp`` in the same directory, fsync, ``os.replace`` onto the
final name, fsync the directory, and only then delete old checkpoints. An interruption at any
point leaves the previous checkpoints intact; leftover ``*.tmp`` files are never listed as
checkpoints and the next ``save`` removes them. One process (rank 0) writes a workdir.

Damage: ``restore`` tries the newest file, then older ones. A file that fails while an older
one loads is logged and renamed to ``*.corrupt`` (kept for inspection, never retried, never
pruned). If no file loads at all, nothing is renamed and ``restore`` raises: that pattern
points at the environment (a bad mount, an unreadable torch version) rather than at a file,
and starting from scratch over it would waste the run.

Best by metric: ``save_best`` keeps ``best.pt`` and ``best.json`` (step, metric, mode, value)
in the same directory, both replaced atomically (``best.pt`` first); after a restart the value
to beat is read back from ``best.json``. Pruning only ever touches ``ckpt_*.pt``.
"""
import hashlib
import json
import math
import os
import re
from collections import OrderedDict
from typing import Any, Optional

import torch
from absl import logging

from fpipe import files, tree

CKPT_DIR = "checkpoints"
BEST_FILE = "best.pt"
BEST_JSON = "best.json"
RESERVED = "fpipe_checkpoint"
FORMAT = 1
_NAME = re.compile(r"ckpt_(\d+)\.pt")
_SCALARS = (int, float, str, bool, type(None))


class CorruptCheckpointError(RuntimeError):
    """A checkpoint file that cannot be read, or whose contents do not match its checksum."""


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(workdir, CKPT_DIR)


def checkpoint_path(workdir: str, step: int) -> str:
    return os.path.join(checkpoint_dir(workdir), f"ckpt_{int(step):08d}.pt")


def list_checkpoints(workdir: str) -> list:
    """``[(step, path)]`` of the complete-looking checkpoint files, oldest first."""
    d = checkpoint_dir(workdir)
    if not os.path.isdir(d):
        return []
    found = [(int(m.group(1)), os.path.join(d, n))
             for n in os.listdir(d) if (m := _NAME.fullmatch(n))]
    return sorted(found)


def is_checkpoint(obj) -> bool:
    """Whether a loaded object is an fpipe checkpoint (``params`` and ``model_state`` dicts)."""
    return isinstance(obj, dict) and isinstance(obj.get("params"), dict) and isinstance(obj.get("model_state"), dict)


def frozen_params_of(path: str, obj: dict, read) -> dict:
    """The frozen params a checkpoint ``obj`` (read from ``path``) refers to, via ``read(file)``,
    checked against the checksum it recorded; ``{}`` when it refers to none."""
    ref = obj.get("frozen_params")
    if not (isinstance(ref, dict) and isinstance(ref.get("file"), str)):
        return {}
    sibling = os.path.join(os.path.dirname(os.path.abspath(path)), os.path.basename(ref["file"]))
    frozen = read(sibling)
    marker = frozen.get(RESERVED) if isinstance(frozen, dict) else None
    if (not isinstance(frozen.get("params") if isinstance(frozen, dict) else None, dict)
            or not isinstance(marker, dict) or marker.get("sha256") != ref.get("sha256")):
        raise CorruptCheckpointError(f"{sibling}: not the frozen-params file that {path} refers to "
                                     "(its checksum differs); keep each run's checkpoints/ folder together.")
    return frozen["params"]


def find_latest(path: str) -> Optional[str]:
    """A checkpoint file as given, or the newest ``ckpt_<step>.pt`` of a workdir (or of its
    ``checkpoints/`` folder); None if a directory holds none."""
    if not os.path.isdir(path):
        return path
    return latest(path) or _latest_in(path)


def _latest_in(d: str) -> Optional[str]:
    found = sorted((int(m.group(1)), os.path.join(d, n)) for n in os.listdir(d) if (m := _NAME.fullmatch(n)))
    return found[-1][1] if found else None


def latest(workdir: str) -> Optional[str]:
    """Path of the newest checkpoint by step, or None. Not opened: ``restore`` validates."""
    found = list_checkpoints(workdir)
    return found[-1][1] if found else None


# ------------------------------------------------------------------ contents: check and hash

def _check_savable(obj: Any, where: str = "payload") -> None:
    """Raises TypeError at the first value that ``torch.load(weights_only=True)`` would refuse."""
    if type(obj) in (dict, OrderedDict):
        for k, v in obj.items():
            if type(k) not in (str, int):
                raise TypeError(f"{where}: key {k!r} is a {type(k).__name__}; use str or int keys")
            _check_savable(v, f"{where}[{k!r}]")
    elif type(obj) in (list, tuple):
        for i, v in enumerate(obj):
            _check_savable(v, f"{where}[{i}]")
    elif type(obj) in (torch.Tensor, torch.nn.Parameter):
        if obj.layout != torch.strided:
            raise TypeError(f"{where}: {obj.layout} tensors are not supported; save a dense tensor")
    elif type(obj) not in _SCALARS:
        raise TypeError(f"{where}: a {type(obj).__module__}.{type(obj).__name__} is not "
                        "loadable with weights_only=True; store tensors, dicts, lists, numbers, "
                        "str, None (float(x) for a numpy scalar, torch.as_tensor for an array)")


def _hash(obj: Any, h) -> None:
    if isinstance(obj, dict):
        h.update(b"{%d" % len(obj))
        for k, v in obj.items():
            h.update(repr(k).encode() + b":")
            _hash(v, h)
    elif isinstance(obj, (list, tuple)):
        h.update(b"[%d" % len(obj))
        for v in obj:
            _hash(v, h)
    elif isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().resolve_conj().resolve_neg().contiguous().reshape(-1)
        h.update(f"T{t.dtype}{tuple(obj.shape)}".encode())
        h.update(t.view(torch.uint8).numpy())
    else:
        h.update(f"{type(obj).__name__}={obj!r};".encode())


def checksum(payload: dict) -> str:
    h = hashlib.sha256()
    _hash(payload, h)
    return h.hexdigest()


# ------------------------------------------------------------------ atomic file writes

def _remove_leftover_tmp(d: str) -> None:
    for name in os.listdir(d):
        if name.endswith(".tmp"):
            logging.warning("checkpoint: removing %s, left by an interrupted write", name)
            try:
                os.remove(os.path.join(d, name))
            except FileNotFoundError:
                pass


def _write_checkpoint(path: str, step: int, payload: dict, extra: Optional[dict] = None,
                      sha256: Optional[str] = None) -> None:
    if not isinstance(payload, dict):
        raise TypeError(f"payload must be a dict, got {type(payload).__name__}")
    if RESERVED in payload:
        raise ValueError(f"payload key {RESERVED!r} is reserved")
    if "step" in payload and payload["step"] != step:
        raise ValueError(f"payload['step']={payload['step']!r} but saving as step {step}")
    _check_savable(payload)
    marker = {"format": FORMAT, "step": int(step), "sha256": sha256 or checksum(payload), **(extra or {})}
    files.atomic_write(path, lambda f: torch.save({**payload, RESERVED: marker}, f))


# ------------------------------------------------------------------ save / load / restore

def save(workdir: str, step: int, payload: dict, *, keep: Optional[int] = 3) -> str:
    """Writes ``payload`` as the checkpoint of ``step`` atomically; keeps the newest ``keep``.

    The file just written is never deleted, even when newer-numbered files exist.
    ``keep=None`` keeps everything. Returns the path written.
    """
    if keep is not None and keep < 1:
        raise ValueError(f"keep must be >= 1 or None, got {keep}")
    d = checkpoint_dir(workdir)
    os.makedirs(d, exist_ok=True)
    _remove_leftover_tmp(d)
    path = checkpoint_path(workdir, step)
    _write_checkpoint(path, step, payload)
    logging.info("checkpoint: saved step %d to %s", step, path)
    if keep is not None:
        for _, old in list_checkpoints(workdir)[:-keep]:
            if old != path:
                os.remove(old)
    return path


FROZEN_FILE = "frozen.pt"


def save_frozen(workdir: str, frozen_flat: dict) -> dict:
    """Writes the frozen params once per run to ``checkpoints/frozen.pt`` (they never change).

    Step checkpoints then hold only what trains, plus the returned reference
    ``{"file", "sha256"}``; an existing file with the same checksum is not written again.
    """
    d = checkpoint_dir(workdir)
    os.makedirs(d, exist_ok=True)
    payload = {"params": frozen_flat}
    ref = {"file": FROZEN_FILE, "sha256": checksum(payload)}
    path = os.path.join(d, FROZEN_FILE)
    try:
        if _load(path)[1]["sha256"] == ref["sha256"]:
            return ref
    except (FileNotFoundError, CorruptCheckpointError):
        pass
    _write_checkpoint(path, 0, payload, sha256=ref["sha256"])
    return ref


def load_frozen(workdir: str, ref: dict) -> dict:
    """The frozen params a step checkpoint refers to, checked against the checksum it recorded."""
    path = os.path.join(checkpoint_dir(workdir), ref["file"])
    payload, marker = _load(path)
    if marker["sha256"] != ref["sha256"]:
        raise CorruptCheckpointError(f"{path} is not the frozen-params file the checkpoint was saved with "
                                     "(checksum differs); use a new --workdir or restore that file")
    return payload["params"]


def load(path: str, map_location="cpu") -> dict:
    """Reads one checkpoint file (a ``ckpt_*.pt`` or ``best.pt``) and checks it; strips the marker.

    Raises CorruptCheckpointError when it cannot be loaded or does not match its checksum.
    """
    return _load(path, map_location)[0]


def _load(path: str, map_location="cpu") -> tuple:
    """``(payload, marker)`` of a checked checkpoint file."""
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # truncation shows up as RuntimeError, OSError, EOFError, ...
        raise CorruptCheckpointError(f"{path}: cannot load ({type(e).__name__}: {e})") from e
    if not isinstance(obj, dict) or not isinstance(obj.get(RESERVED), dict):
        raise CorruptCheckpointError(f"{path}: no {RESERVED!r} marker; not from checkpoint.save")
    marker = obj.pop(RESERVED)
    if marker.get("format") != FORMAT:
        raise CorruptCheckpointError(f"{path}: unknown format {marker.get('format')!r}")
    if marker.get("sha256") != checksum(obj):
        raise CorruptCheckpointError(f"{path}: contents do not match the stored checksum")
    m = _NAME.fullmatch(os.path.basename(path))
    if m and int(m.group(1)) != marker.get("step"):
        raise CorruptCheckpointError(f"{path}: holds step {marker.get('step')}, not {m.group(1)}")
    return obj, marker


def restore(workdir: str, map_location="cpu") -> tuple:
    """``(payload, path)`` of the newest checkpoint that loads, or ``(None, None)`` if none exist.

    Newer files that fail are logged and renamed ``*.corrupt``. Raises CorruptCheckpointError
    if checkpoints exist but none loads (and then renames nothing).
    """
    found = list_checkpoints(workdir)
    bad = []
    for _, path in reversed(found):
        try:
            payload = load(path, map_location)
        except (CorruptCheckpointError, FileNotFoundError) as e:
            logging.warning("checkpoint: %s is unreadable, trying the previous one: %s", path, e)
            bad.append(path)
            continue
        for b in bad:
            try:
                os.replace(b, b + ".corrupt")
                logging.warning("checkpoint: renamed %s to %s.corrupt", b, os.path.basename(b))
            except FileNotFoundError:
                pass
        logging.info("checkpoint: restored %s", path)
        return payload, path
    if bad:
        raise CorruptCheckpointError(
            f"none of the {len(bad)} checkpoints in {checkpoint_dir(workdir)} loads; see the "
            "warnings above. Move them away to start this workdir from scratch.")
    return None, None


# ------------------------------------------------------------------ best by metric

def read_best(workdir: str) -> Optional[dict]:
    """``{"step", "metric", "mode", "value"}`` of the best checkpoint so far, or None."""
    p = os.path.join(checkpoint_dir(workdir), BEST_JSON)
    if not os.path.exists(p):
        return None
    try:
        with open(p) as f:
            best = json.load(f)
        if not {"step", "metric", "mode", "value"} <= set(best):
            raise ValueError("keys missing")
        return best
    except (OSError, ValueError) as e:  # a damaged record must not block a rerun: start it again
        logging.warning("checkpoint: %s is unreadable (%s); the best so far is forgotten and tracked "
                        "again from now on", p, e)
        return None


def _improves(value: float, best: float, mode: str) -> bool:
    return value > best if mode == "max" else value < best


def save_best(workdir: str, step: int, payload: dict, metric_name: str, value: float,
              mode: str = "max") -> bool:
    """Writes ``best.pt`` and ``best.json`` if ``value`` beats the recorded best; returns whether.

    A NaN never improves. The metric name and mode must match what ``best.json`` records.
    """
    if mode not in ("max", "min"):
        raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
    value = float(value)
    best = read_best(workdir)
    if best is not None and (best["metric"], best["mode"]) != (metric_name, mode):
        raise ValueError(
            f"{BEST_JSON} in {checkpoint_dir(workdir)} tracks {best['metric']!r} "
            f"({best['mode']}), not {metric_name!r} ({mode}); delete it to track another metric")
    if math.isnan(value):
        logging.warning("checkpoint: %s is NaN at step %d; best not updated", metric_name, step)
        return False
    if best is not None and not _improves(value, best["value"], mode):
        return False
    d = checkpoint_dir(workdir)
    os.makedirs(d, exist_ok=True)
    path = os.path.join(d, BEST_FILE)
    record = {"step": int(step), "metric": metric_name, "mode": mode, "value": value}
    _write_checkpoint(path, step, payload, {"best": dict(record)})
    files.atomic_write(os.path.join(d, BEST_JSON),
                  lambda f: f.write(json.dumps(record, indent=1).encode()))
    previous = "none" if best is None else f"{best['value']:.6g} at step {best['step']}"
    logging.info("checkpoint: new best %s=%.6g at step %d (was %s)", metric_name, value, step,
                 previous)
    return True


# ------------------------------------------------------------------ the train state in a checkpoint
LAST_LINK = "last.pt"


def train_state_payload(train_state: dict, step: int, frozen_ref, meta: dict) -> dict:
    """A checkpoint payload (see the module docstring) of the train state after ``step`` steps.

    Tensors are copied to the CPU (blocking: the copy must be complete before it is hashed).
    """
    return {"params": _to_cpu(_flat(train_state["trainable"])), "frozen_params": frozen_ref,
            "model_state": _to_cpu(_flat(train_state["model_state"])),
            "opt_state": _to_cpu(train_state["opt_state"]), "scaler": _to_cpu(train_state.get("scaler")),
            **({"ema": _to_cpu(train_state["ema"])} if "ema" in train_state else {}),
            "step": int(step),
            "rng": {"torch": torch.get_rng_state()}, "meta": meta}


def restore_train_state(train_state: dict, saved: dict, workdir: str, path: str = "") -> tuple:
    """``(train_state, step)`` from a checkpoint payload, checked against the train state being built:
    the same names, shapes and dtypes for params, model state and optimizer state (so a changed
    model or optimizer is refused, never trained with the old tensors)."""
    params = dict(saved["params"])
    if saved.get("frozen_params"):
        params.update(load_frozen(workdir, saved["frozen_params"]))
    where = path or checkpoint_dir(workdir)
    _check_fits(where, "params", params, {**_flat(train_state["trainable"]), **_flat(train_state["frozen"])})
    _check_fits(where, "model state", saved["model_state"], _flat(train_state["model_state"]))
    _check_fits(where, "optimizer state", _flat(saved["opt_state"]), _flat(train_state["opt_state"]),
                hint=f"was optim.name changed? the checkpoint's optimizer: "
                     f"{(saved.get('meta') or {}).get('optimizer', 'unknown')}")
    # In the nested dicts of the state being built, empty ones included (a stateless head's model
    # state): a saved compiled step is keyed by its inputs' structure, so a resumed run loads it.
    like = lambda key, flat: tree.shaped_like(train_state[key], _unflat(flat))
    restored = {
        "trainable": like("trainable", {n: params[n] for n in _flat(train_state["trainable"])}),
        "frozen": like("frozen", {n: params[n] for n in _flat(train_state["frozen"])}),
        "model_state": like("model_state", saved["model_state"]),
        "opt_state": tree.shaped_like(train_state["opt_state"], saved["opt_state"]),
    }
    if "scaler" in train_state:
        restored["scaler"] = saved.get("scaler") or train_state["scaler"]
    if "ema" in train_state:  # the average of the weights (config.ema), in the order it was built
        saved_ema = saved.get("ema") or {}
        for part, what in (("params", "EMA params"), ("model_state", "EMA model state")):
            _check_fits(where, what, saved_ema.get(part) or {}, train_state["ema"][part],
                        hint="was ema.decay set after the run started?" if not saved_ema else "")
        restored["ema"] = {part: {n: saved_ema[part][n] for n in names} for part, names in train_state["ema"].items()}
    torch.set_rng_state(saved["rng"]["torch"])
    return restored, int(saved["step"])


def _check_fits(where, what, saved: dict, expected: dict, hint: str = "") -> None:
    missing, extra = sorted(set(expected) - set(saved)), sorted(set(saved) - set(expected))
    other = [f"{n}: {tuple(saved[n].shape)} {saved[n].dtype} vs {tuple(t.shape)} {t.dtype}"
             for n, t in expected.items() if n in saved and isinstance(t, torch.Tensor)
             and (tuple(saved[n].shape) != tuple(t.shape) or saved[n].dtype != t.dtype)]
    if missing or extra or other:
        parts = [f"missing {missing[:5]}" if missing else "", f"unexpected {extra[:5]}" if extra else "",
                 f"other shape/dtype {other[:5]}" if other else ""]
        raise CorruptCheckpointError(
            f"{where}: its {what} does not fit this run ({'; '.join(p for p in parts if p)})"
            f"{'; ' + hint if hint else ''}. Use a new --workdir for a different model or optimizer.")


def link_last(workdir: str, path: str) -> None:
    """Points ``checkpoints/last.pt`` at ``path`` (a relative symlink, replaced atomically)."""
    link = os.path.join(checkpoint_dir(workdir), LAST_LINK)
    tmp = f"{link}.{os.getpid()}.tmp"
    try:
        if os.path.lexists(tmp):
            os.remove(tmp)
        os.symlink(os.path.basename(path), tmp)
        os.replace(tmp, link)
    except OSError as e:  # a filesystem without symlinks: the numbered files are still there
        logging.warning("checkpoint: could not link %s -> %s (%s)", link, path, e)


def _flat(t):
    return tree.flatten(t) if isinstance(t, dict) else {}


_unflat = tree.unflatten


def _to_cpu(t):
    if isinstance(t, torch.Tensor):
        return t.detach().to("cpu")
    if isinstance(t, dict):
        return {k: _to_cpu(v) for k, v in t.items()}
    return t


def evaluation_pending(saved: dict) -> bool:
    """Whether ``saved`` was written by a stop during the periodic evaluation after its step: the
    resumed run then evaluates first, as the uninterrupted run did (its metrics and best checkpoint)."""
    return bool((saved.get("meta") or {}).get("evaluation_pending"))
