"""Learning-rate schedules: plain Python functions ``step -> multiplier of the base lr``.

The loop multiplies the multiplier by the (scaled) base lr and hands the result to the compiled
step as a 0-d tensor. ``step`` counts updates from 0: ``schedule(0)`` is the first update's.

Timeline, with W warmup steps and D delay steps:
- warmup, steps [0, W): multiplies the main schedule by a factor rising from ``warmup_factor``
  to 1 (fastreid's methods: linear, constant, exponential);
- cosine and polynomial hold 1 until W + D, then decay to ``end_factor`` (or
  ``end_lr / base_lr``) at ``total_steps``, and hold that after;
- multistep milestones are absolute steps from step 0, as in torch's MultiStepLR, detectron2 and
  Goyal et al.'s warmup recipe; the lr is multiplied by ``gamma`` at each milestone.
D is fastreid's DELAY_EPOCHS, but counted after the warmup (fastreid counts it from step 0).
Durations are written in epochs (fractions allowed) or steps, and converted only by ``to_steps``.
"""
import bisect
import math
from typing import Callable

from fpipe import defaults

NAMES = ("constant", "multistep", "cosine", "polynomial")
WARMUP_METHODS = ("linear", "constant", "exponential")


default_config = defaults.schedule  # the config.schedule keys and their help: fpipe/defaults.py


def to_steps(cfg, name: str, steps_per_epoch: int, default=None):
    """``cfg.<name>_steps``, else ``cfg.<name>_epochs`` x steps_per_epoch (rounded), else ``default``.

    Works on a number or a list of numbers (milestones). Steps, when set, win over epochs: a
    config file gives epochs and ``--config.total_steps=100`` still overrides them (a command
    line cannot unset a value).
    """
    steps, epochs = cfg.get(f"{name}_steps"), cfg.get(f"{name}_epochs")
    if steps is not None:
        epochs = None
    if steps is None and epochs is None:
        return default
    key, value = (f"{name}_steps", steps) if steps is not None else (f"{name}_epochs", epochs)

    def convert(x):
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not x >= 0:
            raise ValueError(f"schedule.{key} must hold numbers >= 0, got {value!r}")
        if key.endswith("_epochs"):
            return int(round(x * steps_per_epoch))
        if x != int(x):
            raise ValueError(f"schedule.{key} must be whole steps, got {value!r}")
        return int(x)

    return [convert(x) for x in value] if isinstance(value, (list, tuple)) else convert(value)


def _warmup(cfg, warmup_steps: int) -> Callable[[int], float]:
    method, factor = cfg.get("warmup_method", "linear"), cfg.get("warmup_factor", 0.001)
    if method not in WARMUP_METHODS:
        raise ValueError(f"unknown schedule.warmup_method {method!r}; valid: {', '.join(WARMUP_METHODS)}")
    if not 0 <= factor <= 1 or (method == "exponential" and factor == 0):
        raise ValueError(f"schedule.warmup_factor must be in [0, 1] (> 0 for exponential), got {factor}")
    shape = {"linear": lambda a: factor * (1 - a) + a,
             "constant": lambda a: factor,
             "exponential": lambda a: factor ** (1 - a)}[method]
    return lambda step: shape(step / warmup_steps) if step < warmup_steps else 1.0


def _end_factor(cfg, base_lr):
    end_factor, end_lr = cfg.get("end_factor"), cfg.get("end_lr")
    if end_factor is not None and end_lr is not None:
        raise ValueError(f"schedule: set end_factor or end_lr, not both ({end_factor}, {end_lr})")
    if end_lr is None:
        return 0.0 if end_factor is None else float(end_factor)
    if not base_lr:
        raise ValueError("schedule.end_lr needs the base lr: pass build(..., base_lr=) or use end_factor")
    return end_lr / base_lr


def build(cfg, steps_per_epoch: int, total_steps: int, *, base_lr: float | None = None
          ) -> Callable[[int], float]:
    """Returns ``schedule(step) -> multiplier`` of the base lr (see the module docstring).

    ``base_lr`` (the scaled base lr) is needed only to turn an absolute ``end_lr`` into a factor.
    """
    kind = cfg.get("name", "constant")
    if kind not in NAMES:
        raise ValueError(f"unknown schedule.name {kind!r}; valid: {', '.join(NAMES)}")
    if steps_per_epoch <= 0 or total_steps <= 0:
        raise ValueError(f"steps_per_epoch and total_steps must be > 0: {steps_per_epoch}, {total_steps}")
    warmup_steps = to_steps(cfg, "warmup", steps_per_epoch, 0)
    delay_steps = to_steps(cfg, "delay", steps_per_epoch, 0)
    if delay_steps and kind not in ("cosine", "polynomial"):
        raise ValueError(f"schedule.delay applies to cosine and polynomial, not {kind!r}")
    warmup = _warmup(cfg, warmup_steps)

    if kind == "constant":
        main = lambda step: 1.0
    elif kind == "multistep":
        milestones = to_steps(cfg, "milestones", steps_per_epoch)
        milestones = [milestones] if isinstance(milestones, int) else milestones
        if not milestones or any(b <= a for a, b in zip(milestones, milestones[1:])):
            raise ValueError("multistep needs increasing schedule.milestones_epochs or milestones_steps,"
                             f" got {milestones!r}")
        gamma = cfg.get("gamma", 0.1)
        main = lambda step: gamma ** bisect.bisect_right(milestones, step)
    else:
        start, end = warmup_steps + delay_steps, _end_factor(cfg, base_lr)
        length = max(total_steps - start, 1)  # a run shorter than warmup + delay never decays.
        power = cfg.get("power", 1.0)
        decay = {"cosine": lambda t: 0.5 * (1 + math.cos(math.pi * t)),
                 "polynomial": lambda t: (1 - t) ** power}[kind]
        main = lambda step: end + (1 - end) * decay(min(max(step - start, 0) / length, 1.0))

    return lambda step: warmup(step) * main(step)
