"""``python main.py ARGS`` for the tests, forked from a process that has already imported what
main.py imports, so that each run skips the 3-6 s of importing torch, Dynamo and fpipe.

Of ~110 main.py processes the suite starts, each spent most of its CPU importing (docs/BENCHMARKS.md,
fifty-ninth and sixtieth sessions). A server process per environment (started on first use, with
exactly the environment a subprocess would get) runs main.py's module code, imports the
libraries, and then forks one child per run: the child (in the repo root, as the server) sets
the arguments and output files and calls main.py's own entry point (``app.run(run_main, ...)``), so a run sees
the same code, flags, environment and exit status as ``subprocess.run([python, "main.py", ...])``.
Only the imports happened earlier. The server never runs a tensor op, so no OpenMP pool or other
thread exists at the fork (checked). Runs that test startup itself (signals while importing,
environment read at import) still start a fresh interpreter.
"""
import atexit
import json
import os
import pathlib
import select
import signal
import subprocess
import sys
import tempfile
import time
import traceback

ROOT = pathlib.Path(__file__).resolve().parents[1]
PRELOAD = ("torch", "torch._dynamo", "fpipe.host_memory", "fpipe.workdir", "fpipe.train.config_check",
           "fpipe.train.loop", "fpipe.evaluate", "fpipe.detection.train", "tensorboardX", "PIL.Image",
           "sklearn.datasets")
MAX_SERVERS = 2  # ~0.4 GB each
_servers = {}  # environment -> Popen of its server, the most recently used last


def run(args, *, env=None, timeout=600, prelude=None):
    """``subprocess.run([python, "main.py", *args], cwd=ROOT, env=env, capture_output=True,
    text=True, timeout=timeout)``, with main.py's imports already done: a CompletedProcess.
    ``prelude``: Python source the child runs first (a test's patch of fpipe, as a wrapper script
    around main.py would)."""
    running = start(args, env=env, prelude=prelude)
    try:
        running.wait(timeout)
    except subprocess.TimeoutExpired:
        running.send_signal(signal.SIGKILL)
        running.wait()
        raise
    return subprocess.CompletedProcess(running.args, running.returncode, running.stdout, running.stderr)


def start(args, *, env=None, prelude=None):
    """``python main.py ARGS`` started, not waited for (``subprocess.Popen``): a :class:`Running`."""
    env = {k: v for k, v in (os.environ if env is None else env).items()
           if k != "PYTEST_CURRENT_TEST"}  # pytest's own, new for every test
    return Running([str(a) for a in args], env, prelude or "")


class Running:
    """A main.py run in a child of its environment's server, which is this run's alone until it
    is waited for (another run meanwhile starts another server): ``pid``, ``send_signal``,
    ``wait``, then ``returncode``, ``stdout``, ``stderr``."""

    def __init__(self, args, env, prelude):
        self.args, self.returncode, self.stdout, self.stderr = ["main.py", *args], None, None, None
        self._key = tuple(sorted(env.items()))
        self._server = _servers.pop(self._key, None) or _start_server(env)
        self._tmp = tempfile.TemporaryDirectory()
        self._out, self._err = (os.path.join(self._tmp.name, n) for n in ("stdout", "stderr"))
        for path in (self._out, self._err):  # there even if the run is killed before it opens them
            pathlib.Path(path).touch()
        request = {"args": args, "stdout": self._out, "stderr": self._err, "prelude": prelude}
        self._server.stdin.write(json.dumps(request).encode() + b"\n")
        self.pid = int(_reply(self._server))

    def send_signal(self, sig):
        if self.returncode is None:
            os.kill(self.pid, sig)

    def wait(self, timeout=None):
        """The exit status (``-N`` when killed by signal N); TimeoutExpired past ``timeout`` s."""
        if self.returncode is None:
            deadline = None if timeout is None else time.monotonic() + timeout
            try:
                self.returncode = int(_reply(self._server, deadline))
            except subprocess.TimeoutExpired:
                raise subprocess.TimeoutExpired(self.args, timeout) from None
            self.stdout, self.stderr = (pathlib.Path(p).read_text() for p in (self._out, self._err))
            self._tmp.cleanup()
            _keep(self._key, self._server)
        return self.returncode


def _start_server(env):
    server = subprocess.Popen([sys.executable, __file__], cwd=ROOT, env=env, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, bufsize=0)  # unbuffered: select() sees every line
    ready = _reply(server)
    if ready != "ready":
        raise RuntimeError(f"the main.py server did not start: {ready}")
    return server


def _keep(key, server):
    """``server`` free for the next run in its environment; the least recently used beyond
    MAX_SERVERS ends."""
    if key in _servers:  # another run started one meanwhile
        _stop(_servers.pop(key))
    _servers[key] = server
    while len(_servers) > MAX_SERVERS:
        _stop(_servers.pop(next(iter(_servers))))


def _reply(server, deadline=None):
    """The server's next line; TimeoutExpired past ``deadline`` (``time.monotonic()``)."""
    while deadline is not None:
        if select.select([server.stdout], [], [], max(0.0, deadline - time.monotonic()))[0]:
            break
        if time.monotonic() >= deadline:
            raise subprocess.TimeoutExpired("main.py", 0)
    line = server.stdout.readline()
    if not line:
        raise RuntimeError(f"the main.py server exited ({server.wait()})")
    return line.decode().strip()


def _stop(server):
    server.stdin.close()  # the server ends at the end of its input
    server.wait()


@atexit.register
def _stop_servers():
    while _servers:
        _stop(_servers.popitem()[1])


# ---------------------------------------------------------------- the server (run as a script)
def serve():
    import runpy
    import threading
    sys.argv = [str(ROOT / "main.py")]
    sys.path[0] = str(ROOT)  # as for ``python main.py``: the repo first
    main = runpy.run_path(str(ROOT / "main.py"), run_name="main")  # flags defined, env set before torch
    for name in PRELOAD:
        __import__(name)
    assert threading.active_count() == 1, threading.enumerate()  # a fork keeps only this thread
    requests, replies = sys.stdin, sys.stdout
    print("ready", file=replies, flush=True)
    for line in requests:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _child(main, request)  # never returns
        print(pid, file=replies, flush=True)
        _, status = os.waitpid(pid, 0)
        print(os.waitstatus_to_exitcode(status), file=replies, flush=True)


def _child(main, request):
    """Be ``python main.py ARGS`` with stdout and stderr to the request's files, and exit."""
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
        os.dup2(os.open(path, os.O_WRONLY), fd)
    sys.argv = ["main.py", *request["args"]]  # as typed in ROOT
    code = 0
    try:
        exec(request["prelude"], {"__name__": "__prelude__"})
        main["app"].run(main["run_main"], flags_parser=main["parse_flags"])
    except SystemExit as e:  # the interpreter's rules: None is 0, an int itself, anything else printed, 1
        code = 0 if e.code is None else e.code if isinstance(e.code, int) else 1
        if code == 1 and not isinstance(e.code, int):
            print(e.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
        code = 1
    try:
        atexit._run_exitfuncs()  # as at the interpreter's exit
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)


if __name__ == "__main__":
    serve()
