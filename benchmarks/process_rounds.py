"""Round-robin timing with each program in its own process: the machine's drift hits all alike, and
no program runs on a heap the others have fragmented.

Programs timed in one process share glibc's heap: between two of fpipe's steps the other programs
allocate and free theirs (a baseline's gradients live from its backward to its next step), and
fpipe's next step can find no hole for a large block and faults the heap's new top in afresh
(finetune wide_resnet50_2 64 px b32 on 2 cores: 30k page faults in some steps, fpipe 0.97x eager
interleaved in one process against 1.46-1.49x alone). A user runs one program per process; this
times them so, still taking turns.

The parent (``time_round_robin``) starts one child per program (the benchmark's own command with a
serving flag); the child builds its program, then ``serve`` answers one line per command: ``first``
(the first call, timed, then ``warmup - 1`` more calls: their outputs), ``turn`` (one untimed step,
then timed ones for at least ``MIN_TURN_S``), ``quit``. The first calls run one after another, so
no compile shares the cores with another. A turn's first step is not timed: right after another
process's turn the program's OpenMP threads sleep, its caches are cold, and the other process's
threads still spin for a while (libgomp), taking a core: timing single steps so put 6 ms on each
of ResNet-18 32 px linear eval's (fpipe 16.0 ms against 9.6 in one process, eager 24.1 vs 18.0),
which a user's run, its steps back to back, never pays.
"""
import json
import statistics
import subprocess
import sys
import time

from fpipe import host_memory

TAG = "@@round "  # the protocol's lines on the child's stdout; anything else printed there is skipped
MIN_TURN_S = 0.2  # a turn's timed steps last at least this long (at least one step)


def serve(run, warmup):
    """The child's side: ``run()`` one step (returns a scalar tensor or a float), on command."""
    _say({"ready": True})
    for line in sys.stdin:
        command = line.strip()
        if command == "first":
            t = time.perf_counter()
            outputs = [float(run())]
            first = time.perf_counter() - t
            host_memory.keep_large_blocks()  # as the train loops do after their first step
            outputs += [float(run()) for _ in range(warmup - 1)]
            _say({"first_s": first, "outputs": outputs})
        elif command == "turn":
            run()  # untimed: the first step after another program's turn (cold caches, sleeping threads)
            times, start = [], time.perf_counter()
            while not times or time.perf_counter() - start < MIN_TURN_S:
                t = time.perf_counter()
                run()
                times.append(time.perf_counter() - t)
            _say({"s": times})
        else:
            return


def time_round_robin(commands, iters, warmup, env=None):
    """``commands``: {name: argv of a child that calls ``serve``}; ``iters`` turns each. Returns
    ``(median seconds per step, first-call seconds, first and warm-up outputs)``, each a dict by name."""
    children = {}
    try:
        for name, argv in commands.items():
            children[name] = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                              env=env, bufsize=1)
            _hear(children[name], name)  # built: the next one starts (their setups do not overlap)
        first, outputs = {}, {}
        for name, child in children.items():
            reply = _ask(child, name, "first")
            first[name], outputs[name] = reply["first_s"], reply["outputs"]
        times = {name: [] for name in children}
        for _ in range(iters):
            for name, child in children.items():
                times[name] += _ask(child, name, "turn")["s"]
    finally:
        for child in children.values():
            if child.poll() is None:
                try:
                    child.stdin.write("quit\n")
                    child.stdin.flush()
                except OSError:
                    pass
        for child in children.values():
            try:
                child.wait(timeout=60)
            except subprocess.TimeoutExpired:
                child.kill()
    return {n: statistics.median(v) for n, v in times.items()}, first, outputs


def _say(message):
    sys.stdout.write(TAG + json.dumps(message) + "\n")
    sys.stdout.flush()


def _ask(child, name, command):
    child.stdin.write(command + "\n")
    child.stdin.flush()
    return _hear(child, name)


def _hear(child, name):
    for line in child.stdout:
        if line.startswith(TAG):
            return json.loads(line[len(TAG):])
    raise RuntimeError(f"the {name} program's process ended (exit code {child.wait()}); its error is above")
