"""Writing files so that a crash never leaves a half-written one under the final name; a file's
checksum."""
import hashlib
import os

from fpipe.train import signals


def fsync_dir(d: str) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:  # e.g. platforms where directories cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def sha256(path: str, chunk: int = 1 << 22) -> str:
    """The hex sha256 of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def atomic_write(path: str, write_fn, mode: str = "wb") -> None:
    """``write_fn(file)`` into a temporary sibling, fsync, then rename onto ``path``.

    A SIGTERM/SIGINT stop (fpipe.train.signals) is held back until the file is in place: a write
    finishes, then the run stops (``Stopped`` is raised here, after the rename)."""
    with signals.deferred():
        _atomic_write(path, write_fn, mode)


def _atomic_write(path: str, write_fn, mode: str) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, mode) as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError) and e.errno is not None and not e.filename:
            raise OSError(e.errno, f"{e.strerror or e}: writing {path}", path) from e  # say where
        raise
    fsync_dir(os.path.dirname(os.path.abspath(path)))
