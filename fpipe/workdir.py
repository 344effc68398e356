"""A workdir belongs to one config: its fingerprint, the rerun rule, and the lock against two runs.

The rule (README, "Workdirs and reruns"):
- Every config key changes results except the bookkeeping ones (``BOOKKEEPING``: how often to log
  and checkpoint, compilation, worker counts, what to extract). The *fingerprint* is a hash of the
  result-affecting keys and their values.
- The default workdir is ``runs/<config name>`` for the config file as it is, and
  ``runs/<config name>+<hash of the overrides>`` when result-affecting keys are overridden, so a
  rerun with another lr never lands in the first run's workdir.
- A workdir that already holds a run (``config.json``) accepts only the same result-affecting
  values. Otherwise the run is refused before anything is written, naming the keys that differ and
  the two ways out: a new ``--workdir``, or ``--allow_change=KEY,...`` for keys that may change
  on resume (e.g. ``total_epochs`` to train longer); accepted changes are recorded in
  ``config_changes.jsonl`` and in results.json, and the results of the run before the change are
  moved aside (``results.superseded-<k>.json``), never left beside the new config.
- The data too: a checkpoint records what its run's splits held (``fpipe.data.identity``), and a
  resume whose splits hold other images, labels or classes is refused (``--allow_change=dataset``
  continues anyway, recorded as above); a checkpoint written before fpipe recorded it is resumed
  with a warning.
- One run at a time: ``.lock`` holds the owner's host and pid; a lock whose process is gone (same
  host) is stale and taken over, with a warning.
- Nothing a run wrote is lost: a folder with run outputs (``RUN_OUTPUTS``) but no ``config.json``
  is refused; a ``config.json`` whose run left no outputs (it failed at its start, e.g. on a bad
  weights file) is replaced by the new config, with a warning, so the corrected rerun needs no
  ``--allow_change``.
"""
import contextlib
import datetime
import hashlib
import json
import os
import re
import socket

from fpipe import files, tree

CONFIG_FILE = "config.json"
CHANGES_FILE = "config_changes.jsonl"
LOCK_FILE = ".lock"
# Keys that never change a run's numbers (full-match regexes over dotted names).
BOOKKEEPING = (r"log_steps", r"keep_ckpts", r"ckpt_(epochs|steps)", r"best_(metric|mode)", r"compile", r"compile_min_images",
               r"compile_cache_dir", r"compile_remat", r"cudnn_benchmark", r"fast_frozen_trunk", r"data\.num_workers", r"data\.worker_niceness", r"data\.max_image_pixels",
               r"data\.max_aspect_ratio", r"extract\..*", r"collective_timeout_s")
# Evaluation frequency changes results only through PreciseBN, which runs before each evaluation.
EVAL_KEYS = r"eval_(epochs|steps)"
RUN_OUTPUTS = ("checkpoints", "results.json", "metrics.jsonl", "features")  # what a run leaves once it did work
RESULT_FILES = ("results.json", "results.md", "results.png")  # a finished run's results


class WorkdirError(RuntimeError):
    """The workdir holds another config's run, or another process is using it."""


def flat_config(config) -> dict:
    """``{dotted key: JSON value}`` of a ConfigDict (tuples as lists, placeholders as None)."""
    raw = json.loads(config.to_json_best_effort()) if hasattr(config, "to_json_best_effort") else config
    return tree.flatten(raw)


def result_keys(flat: dict) -> dict:
    """The result-affecting part of a flat config."""
    bookkeeping = BOOKKEEPING if flat.get("precise_bn.num_batches") else BOOKKEEPING + (EVAL_KEYS,)
    return {k: v for k, v in flat.items() if not any(re.fullmatch(p, k) for p in bookkeeping)}


def fingerprint(config) -> str:
    """12 hex digits identifying the result-affecting keys and values of ``config``."""
    text = json.dumps(result_keys(flat_config(config)), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def default_workdir(config_path: str, config, file_config) -> str:
    """``runs/<name>[_<variant>]``, plus ``+<hash>`` when ``config`` differs from the config file's
    own values (``file_config``) in result-affecting keys."""
    path, _, arg = config_path.partition(":")
    name = os.path.splitext(os.path.basename(path))[0]
    if arg:
        name += "_" + re.sub(r"[^A-Za-z0-9.-]+", "_", arg)
    changed = {k: new for k, (_, new) in differences(flat_config(file_config), flat_config(config)).items()}
    if changed:
        name += "+" + hashlib.sha256(json.dumps(changed, sort_keys=True, default=str).encode()).hexdigest()[:8]
    return os.path.join("runs", name)


def differences(old: dict, new: dict) -> dict:
    """``{key: (old value, new value)}`` over the result-affecting keys of two flat configs."""
    old, new = result_keys(old), result_keys(new)
    missing = object()
    return {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new))
            if old.get(k, missing) != new.get(k, missing)}


def check_rerun(workdir: str, config, allow_change=(), file_config=None) -> dict:
    """Refuses a workdir whose run had other result-affecting values; returns accepted changes.

    A key that the workdir's config lacks (a newer fpipe added it) and that has the config file's
    own value (``file_config``: not overridden) is no change: new keys default to what the code
    did before them."""
    path = os.path.join(workdir, CONFIG_FILE)
    outputs = [name for name in RUN_OUTPUTS if os.path.exists(os.path.join(workdir, name))]
    if not os.path.exists(path):
        if outputs:
            raise WorkdirError(f"{workdir} holds {', '.join(outputs)} but no {CONFIG_FILE}: files of a run "
                               "this one cannot tell its own, which it would overwrite. Use a new --workdir, "
                               "or move them away.")
        return {}
    try:
        with open(path) as f:
            old = tree.flatten(json.load(f))
    except (OSError, ValueError) as e:
        raise WorkdirError(f"{path} is unreadable ({e}); it records which config this workdir belongs "
                           "to. Use a new --workdir, or restore the file.") from None
    diff = differences(old, flat_config(config))
    own = flat_config(file_config) if file_config is not None else {}
    added = [k for k, (_, new) in diff.items() if k not in old and k in own and own[k] == new]
    if added:
        from absl import logging
        logging.info("%s: keys this fpipe added since that run, at the config file's values: %s", workdir,
                     ", ".join(added))
        diff = {k: v for k, v in diff.items() if k not in added}
    refused = {k: v for k, v in diff.items() if k not in allow_change}
    shown = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in list(refused.items())[:8])
    if refused and not outputs:
        from absl import logging
        logging.warning("%s holds the config of a run that left no checkpoints or results (%s); this run "
                        "takes the workdir over.", workdir, shown)
        return {}
    if refused:
        raise WorkdirError(
            f"{workdir} holds a run of another config ({shown}"
            f"{'; …' if len(refused) > 8 else ''}). Its results would be reported as this config's. "
            f"Use a new --workdir, or, to continue that run with these keys changed, "
            f"--allow_change={','.join(refused)}")
    return diff


def check_resumed_data(saved, current: dict, checkpoint: str, workdir: str, allow_change=(), *,
                       main_process: bool = True) -> dict:
    """Refuses to resume from ``checkpoint`` when the splits' digests (``saved``, as it recorded
    them; ``current``, this run's) differ, unless ``dataset`` is in ``allow_change``; returns the
    accepted changes ``{"dataset.<split>": (old, new)}``, recorded in ``config_changes.jsonl``."""
    from absl import logging
    if saved is None:
        logging.warning("%s predates fpipe recording what a run's splits hold: the data is not checked "
                        "against it.", checkpoint)
        return {}
    changed = {f"dataset.{name}": (saved.get(name), current.get(name)) for name in ("train", "test", "val")
               if saved.get(name) != current.get(name)}
    if not changed:
        return {}
    shown = "; ".join(f"{k}: {a or 'none'} -> {b or 'none'}" for k, (a, b) in changed.items())
    if "dataset" not in allow_change:
        raise WorkdirError(
            f"{checkpoint} was written by a run on other data ({shown}): resuming would continue its "
            "schedule and sample order on these splits and report them as one run. Use a new --workdir, "
            "restore the data as it was, or, to continue anyway, --allow_change=dataset")
    logging.warning("Resuming on other data, as --allow_change=dataset allows: %s", shown)
    if main_process:
        _record_changes(workdir, changed)
    return changed


@contextlib.contextmanager
def claim(workdir: str, config, allow_change=(), *, main_process: bool = True, file_config=None):
    """Locks ``workdir``, checks the rerun rule and writes config.json (main process only).

    Yields the accepted changes ``{key: (old, new)}``. Nothing is written when refused.
    ``file_config``: the config file's own values (``check_rerun``).
    """
    if not main_process:
        yield {}
        return
    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as e:
        raise WorkdirError(f"--workdir={workdir}: cannot create it ({e.strerror}). Fix: a --workdir in a "
                           "writable place.") from None
    lock = _acquire(workdir)
    try:
        changes = check_rerun(workdir, config, allow_change, file_config)
        if changes:
            _record_changes(workdir, changes)
        files.atomic_write(os.path.join(workdir, CONFIG_FILE),
                           lambda f: f.write(config.to_json_best_effort(indent=2)), mode="w")
        yield changes
    finally:
        _release(lock)


def _record_changes(workdir: str, changes: dict) -> None:
    """Appends accepted changes to config_changes.jsonl, and moves the results already there aside
    (``results.superseded-<k>.*``): they are the config's before the change, and a run stopped
    before its own end would otherwise leave them beside the new config.json."""
    record = {"time": _now(), "changes": {k: list(v) for k, v in changes.items()}}
    with open(os.path.join(workdir, CHANGES_FILE), "a") as f:
        f.write(json.dumps(record, default=str) + "\n")
    present = [name for name in RESULT_FILES if os.path.exists(os.path.join(workdir, name))]
    if not present:
        return
    k = 1
    while any(os.path.exists(os.path.join(workdir, _superseded(name, k))) for name in RESULT_FILES):
        k += 1
    for name in present:
        os.replace(os.path.join(workdir, name), os.path.join(workdir, _superseded(name, k)))
    from absl import logging
    logging.warning("%s: the results of the run before the change are kept as %s; this run writes its own when "
                    "it finishes.", workdir, ", ".join(_superseded(name, k) for name in present))


def _superseded(name: str, k: int) -> str:
    stem, ext = os.path.splitext(name)
    return f"{stem}.superseded-{k}{ext}"


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _acquire(workdir: str) -> str:
    path = os.path.join(workdir, LOCK_FILE)
    me = {"host": socket.gethostname(), "pid": os.getpid(), "since": _now()}
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            owner = _read_lock(path)
            if owner is not None and not _stale(owner):
                raise WorkdirError(
                    f"{workdir} is in use by process {owner.get('pid')} on {owner.get('host')} (since "
                    f"{owner.get('since')}); two runs would interleave their outputs. Wait for it, use "
                    f"another --workdir, or delete {path} if that process is gone.") from None
            from absl import logging
            logging.warning("Taking over the stale lock %s (%s).", path, owner or "unreadable")
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        return path
    raise WorkdirError(f"could not lock {workdir}: {path} keeps reappearing; another run is starting there.")


def _read_lock(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _stale(owner: dict) -> bool:
    """A lock is stale when its process is gone; only checkable on the same host."""
    if owner.get("host") != socket.gethostname():
        return False
    try:
        os.kill(int(owner.get("pid", -1)), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, ValueError, TypeError):
        return False
    return False


def _release(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        owner = _read_lock(path)
        if owner is None or owner.get("pid") == os.getpid():
            os.remove(path)
