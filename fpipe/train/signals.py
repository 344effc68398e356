"""SIGTERM / SIGINT: stop soon, keep the work done, and tell the caller the run is unfinished.

The loop marks the stretches where stopping at once loses nothing (compiling, a train step
whose result is not yet kept, evaluating, reading data) as ``interruptible``: a signal there
raises :class:`Stopped` immediately, so a scheduler's grace period (Kubernetes: 30 s) is met even
during a long compilation. Elsewhere (writing a checkpoint or metrics) the request waits for the
end of the step. Either way the loop then writes a checkpoint if any step is unsaved and re-raises;
``main.py`` exits with 128 + the signal number (143 for SIGTERM).
"""
import contextlib
import signal


class Stopped(BaseException):
    """Raised when the run was asked to stop; BaseException so that no ``except Exception`` inside
    torch (compilation fallbacks) swallows it."""

    def __init__(self, signum):
        self.signum = int(signum)
        super().__init__(f"stopped by {signal.Signals(signum).name}")


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
