"""Metric writers: console (rate, ETA), JSON lines, TensorBoard, behind one small interface.

Every writer takes ``write_scalars(step, {name: value})``; values may be Python numbers,
0-d/1-element tensors or numpy scalars. ``make_writers`` gives rank 0 all three and other
ranks a writer that does nothing, so the loop writes unconditionally.

Resuming: ``JsonlWriter`` and ``TensorBoardWriter`` take ``resume_step``; records with a larger
step (written after the checkpoint the run resumes from, and about to be written again) are
dropped, so each step appears once. Records at ``resume_step`` itself are kept.
"""
import json
import math
import os
import re
import time
from typing import Callable, Optional, Sequence

from absl import logging

from fpipe import files


def to_scalar(value, name: str = "value"):
    """Python int (for integer values) or float from a number, 1-element tensor or numpy value."""
    shape = tuple(getattr(value, "shape", ()))
    if math.prod(shape) != 1:
        raise ValueError(f"{name}: a scalar is needed, got shape {shape}")
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, bool):
        return int(value)
    return value if isinstance(value, int) else float(value)


def format_duration(seconds: float) -> str:
    """``h:mm:ss``; hours grow past 24 (``27:00:00``)."""
    s = max(0, int(round(seconds)))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def format_value(value) -> str:
    """Ints as they are; floats with 4 significant digits (``0.4213``, ``0.001``, ``3e-05``)."""
    return str(value) if isinstance(value, int) else f"{value:.4g}"


class EtaTimer:
    """Steps per second and ETA from ``tick(step)`` calls, ignoring warm-up (compile) steps.

    ``tick(step)`` says "step ``step`` is done" (steps count from ``start_step``, the step the
    run starts or resumes at). The clock starts at the first tick at or after
    ``start_step + warmup_steps`` (at construction if ``warmup_steps=0``), so compile time and
    the first slow steps do not skew the rate. Ticks every step or only at log steps both work;
    ticks that do not move the step forward are ignored.

    The ETA includes the evaluations still to come (every ``eval_every`` steps and after the
    last): each costs as long as the last one took (``eval_took``), or, before the first, an
    estimate of ``eval_images`` forward passes at a third of a training image's time.
    """

    def __init__(self, total_steps: Optional[int] = None, *, batch_size: Optional[int] = None,
                 start_step: int = 0, warmup_steps: int = 2, eval_every: int = 0, eval_images: int = 0,
                 clock: Callable[[], float] = time.perf_counter):
        self.total_steps, self.batch_size, self.clock = total_steps, batch_size, clock
        self.eval_every, self.eval_images, self._eval_seconds = eval_every, eval_images, None
        self._warm_at = start_step + warmup_steps
        self._ref = (start_step, clock()) if warmup_steps == 0 else None
        self._last = self._ref

    def tick(self, step: int) -> None:
        if self._last is not None and step <= self._last[0]:
            return
        now = (step, self.clock())
        if self._ref is None:
            if step >= self._warm_at:
                self._ref = self._last = now
            return
        self._last = now

    def eval_took(self, seconds: float) -> None:
        self._eval_seconds = seconds

    def _evaluations_left(self) -> int:
        done, total = self._last[0], self.total_steps
        if done >= total:
            return 0
        periodic = total // self.eval_every - done // self.eval_every if self.eval_every > 0 else 0
        return periodic + (0 if self.eval_every > 0 and total % self.eval_every == 0 else 1)

    def _seconds_per_evaluation(self, seconds_per_step: float) -> float:
        if self._eval_seconds is not None:
            return self._eval_seconds
        if not self.batch_size:
            return 0.0
        return self.eval_images * seconds_per_step / self.batch_size / 3

    @property
    def seconds_per_step(self) -> Optional[float]:
        """Mean over the timed steps; None until two ticks after warm-up."""
        if self._ref is None or self._last[0] == self._ref[0]:
            return None
        return (self._last[1] - self._ref[1]) / (self._last[0] - self._ref[0])

    @property
    def images_per_second(self) -> Optional[float]:
        sps = self.seconds_per_step
        if sps is None or not self.batch_size:
            return None
        return self.batch_size / sps if sps > 0 else math.inf

    @property
    def eta_seconds(self) -> Optional[float]:
        sps = self.seconds_per_step
        if sps is None or self.total_steps is None:
            return None
        steps = max(0, self.total_steps - self._last[0]) * sps
        return steps + self._evaluations_left() * self._seconds_per_evaluation(sps)


class MetricWriter:
    """The interface, and the writer that writes nothing (non-main ranks)."""

    def write_scalars(self, step: int, scalars: dict) -> None:
        pass

    def write_text(self, step: int, name: str, text: str) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class MultiWriter(MetricWriter):
    """Fans every call out to each writer in order."""

    def __init__(self, writers: Sequence[MetricWriter]):
        self.writers = list(writers)

    def write_scalars(self, step, scalars):
        scalars = {k: to_scalar(v, k) for k, v in scalars.items()}  # one device sync, not three
        for w in self.writers:
            w.write_scalars(step, scalars)

    def write_text(self, step, name, text):
        for w in self.writers:
            w.write_text(step, name, text)

    def flush(self):
        for w in self.writers:
            w.flush()

    def close(self):
        for w in self.writers:
            w.close()


def format_line(step: int, scalars: dict, timer: Optional[EtaTimer] = None,
                total_steps: Optional[int] = None) -> str:
    """``step 1200/5000: loss=0.4213 lr=0.001 | 812.3 img/s, ETA 0:12:34``."""
    if total_steps is None and timer is not None:
        total_steps = timer.total_steps
    head = f"step {step}/{total_steps}" if total_steps else f"step {step}"
    body = " ".join(f"{k}={format_value(to_scalar(v, k))}" for k, v in scalars.items())
    rate = []
    if timer is not None:
        ips, eta = timer.images_per_second, timer.eta_seconds
        if ips is not None:
            rate.append(f"{ips:.1f} img/s")
        elif timer.seconds_per_step is not None:
            rate.append(f"{timer.seconds_per_step:.3g} s/step")
        if eta is not None:
            rate.append(f"ETA {format_duration(eta)}")
    return f"{head}: {body}" + (f" | {', '.join(rate)}" if rate else "")


# What the console shows of a step's scalars (everything goes to metrics.jsonl and TensorBoard).
CONSOLE_KEYS = r"loss|lr|data_time|loss_scale|.*/test_(top1|acc|mse)"


class ConsoleWriter(MetricWriter):
    """One compact absl log line per call; ticks its timer (if any) with each scalar write.

    ``keys``: a regex of the scalar names to show (None: all)."""

    def __init__(self, total_steps: Optional[int] = None, *, timer: Optional[EtaTimer] = None,
                 log: Callable[[str], None] = None, keys: Optional[str] = None):
        self.total_steps, self.timer, self.keys = total_steps, timer, keys
        self.log = log or (lambda line: logging.info("%s", line))

    def write_scalars(self, step, scalars):
        if self.timer is not None:
            self.timer.tick(step)
        if self.keys is not None:
            scalars = {k: v for k, v in scalars.items() if re.fullmatch(self.keys, k)}
        if scalars:
            self.log(format_line(step, scalars, self.timer, self.total_steps))

    def write_text(self, step, name, text):
        self.log(f"step {step}: {name}: {text}")


def _read_jsonl(path: str, resume_step: Optional[int]) -> tuple:
    """``(kept lines, dropped count)``: unparsable lines (a killed write) and late steps go."""
    kept, dropped = [], 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
                late = resume_step is not None and record["step"] > resume_step
            except (ValueError, KeyError, TypeError):
                late = True
            if late or not line.endswith("\n"):
                dropped += 1
            else:
                kept.append(line)
    return kept, dropped


class JsonlWriter(MetricWriter):
    """Appends ``{"step": s, name: value, ...}`` per call to ``metrics.jsonl``, flushed per line.

    Flushing (not fsync) means a killed process keeps every line it wrote. On open, a partial
    last line and, given ``resume_step``, lines with a larger step are removed (the file is
    rewritten atomically). Non-finite floats are written as ``NaN``/``Infinity`` like Python's
    ``json``. Text is a line ``{"step": s, name: text}``.
    """

    def __init__(self, path: str, *, resume_step: Optional[int] = None):
        self.path = path
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        if os.path.exists(path):
            kept, dropped = _read_jsonl(path, resume_step)
            if dropped:
                logging.info("metrics: dropping %d lines of %s (partial, or step > %s)",
                             dropped, path, resume_step)
                files.atomic_write(path, lambda f: f.writelines(kept), mode="w")
        self._file = open(path, "a", encoding="utf-8")

    def _write(self, record: dict) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def write_scalars(self, step, scalars):
        self._write({"step": int(step), **{k: to_scalar(v, k) for k, v in scalars.items()}})

    def write_text(self, step, name, text):
        self._write({"step": int(step), name: str(text)})

    def flush(self):
        self._file.flush()

    def close(self):
        if not self._file.closed:
            self._file.close()


class TensorBoardWriter(MetricWriter):
    """tensorboardX event files in ``logdir``; ``resume_step`` hides later events (purge_step)."""

    def __init__(self, logdir: str, *, resume_step: Optional[int] = None):
        from tensorboardX import SummaryWriter  # imported here: only rank 0 needs it
        purge = None if resume_step is None else resume_step + 1
        self._tb = SummaryWriter(logdir=logdir, purge_step=purge)

    def write_scalars(self, step, scalars):
        for k, v in scalars.items():
            self._tb.add_scalar(k, to_scalar(v, k), global_step=step)

    def write_text(self, step, name, text):
        self._tb.add_text(name, text, global_step=step)

    def flush(self):
        self._tb.flush()

    def close(self):
        self._tb.close()


def make_writers(workdir: str, is_main_process: bool, *, total_steps: Optional[int] = None,
                 batch_size: Optional[int] = None, resume_step: Optional[int] = None,
                 warmup_steps: int = 2, timer: Optional[EtaTimer] = None) -> MetricWriter:
    """Console + ``WORKDIR/metrics.jsonl`` + ``WORKDIR/tb/`` on the main process; else a no-op.

    ``batch_size`` is the global batch (all ranks), for images/s.
    """
    if not is_main_process:
        return MetricWriter()
    timer = timer or EtaTimer(total_steps, batch_size=batch_size, start_step=resume_step or 0,
                              warmup_steps=warmup_steps)
    return MultiWriter([
        ConsoleWriter(total_steps, timer=timer, keys=CONSOLE_KEYS),
        JsonlWriter(os.path.join(workdir, "metrics.jsonl"), resume_step=resume_step),
        TensorBoardWriter(os.path.join(workdir, "tb"), resume_step=resume_step),
    ])
