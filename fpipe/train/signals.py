"""SIGTERM / SIGINT: stop soon, keep the work done, and tell the caller the run is unfinished.

The loop marks the stretches where stopping at once loses nothing (compiling, a train step
whose result is not yet kept, evaluating, reading data) as ``interruptible``: a signal there
raises :class:`Stopped` immediately, so a scheduler's grace period (Kubernetes: 30 s) is met even
during a long compilation. Elsewhere (writing a checkpoint or metrics) the request waits for the
end of the step. Either way the loop then writes a checkpoint if any step is unsaved and re-raises;
``main.py`` exits with 128 + the signal number (143 for SIGTERM).

A file write is never cut short, even inside an interruptible stretch: ``fpipe.files.atomic_write``
runs under :func:`deferred`, which holds a signal back until the write is complete (``torch.save``
hit by an exception half-way fails with a C++ error instead of stopping) and then raises
:class:`Stopped` if the stretch is still interruptible.
"""
import contextlib
import signal
import threading

# Main-thread stretches that a signal must not cut short (file writes), and the StopOnSignal whose
# signal arrived in an interruptible stretch meanwhile (raised when the last such stretch ends).
_deferral = {"depth": 0, "pending": None}


class Stopped(BaseException):
    """Raised when the run was asked to stop; BaseException so that no ``except Exception`` inside
    torch (compilation fallbacks) swallows it."""

    def __init__(self, signum):
        self.signum = int(signum)
        self.signal_name = signal.Signals(signum).name
        self.reported = False  # set once the run has logged its one-line stop message (main.py's fallback)
        super().__init__(f"stopped by {self.signal_name}")


class StopOnSignal:
    """Installs handlers for SIGTERM and SIGINT (main thread only) for the ``with`` block."""

    def __init__(self):
        self.requested = None
        self._interruptible = 0
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        self.requested = signum
        if self._interruptible:
            if _deferral["depth"]:  # a file is being written: stop once it is complete
                _deferral["pending"] = self
                return
            raise Stopped(signum)

    @contextlib.contextmanager
    def interruptible(self, when=True):
        """A stretch that a signal may cut short (raising Stopped at once); ``when=False``: one it
        may not (the request then waits for the next check)."""
        if self.requested is not None:
            raise Stopped(self.requested)
        if not when:
            yield
            return
        self._interruptible += 1
        try:
            yield
        finally:
            self._interruptible -= 1


@contextlib.contextmanager
def deferred():
    """A stretch that a signal never cuts short (a file write): a stop requested inside it raises
    :class:`Stopped` at its end instead (when it arrived in an interruptible stretch that is still
    interruptible then), unless the stretch ends with an exception of its own. Only the main
    thread's stretches defer: signal handlers run there."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _deferral["depth"] += 1
    try:
        yield
    finally:
        _deferral["depth"] -= 1
        pending = _deferral["pending"] if not _deferral["depth"] else None
        if pending is not None:
            _deferral["pending"] = None
    if pending is not None and pending._interruptible and pending.requested is not None:
        raise Stopped(pending.requested)
