"""Trainer hooks (detectron2's interface): called around the loop, with state that survives resume.

A hook sees the loop's :class:`Context` (step, train state, metrics, writer, evaluate, save)
and may keep state of its own; ``state_dict``/``load_state_dict`` put it in every checkpoint,
so a resumed run carries on where the hook left off. Hooks run in the order they are given.
"""
import json
import os

from fpipe import writers


class Hook:
    def before_train(self, ctx): ...

    def before_step(self, ctx): ...

    def after_step(self, ctx): ...

    def after_train(self, ctx): ...

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict): ...


def every(n, ctx):
    """True on every ``n``-th completed step and on the last one (n <= 0: only the last)."""
    done = ctx.step + 1
    return done == ctx.total_steps or (n > 0 and done % n == 0)


class LogMetrics(Hook):
    """Every ``n`` steps writes the period's mean of each step metric, the lr, epoch and images/s.

    The first ``warmup`` steps (compilation) are excluded from the rate.
    """

    def __init__(self, n, images_per_step, warmup=2):
        self.n, self.images_per_step, self.warmup = n, images_per_step, warmup
        self.sums, self.count, self.timer = {}, 0, None

    def before_train(self, ctx):
        self.timer = writers.EtaTimer(ctx.total_steps, batch_size=self.images_per_step,
                                      start_step=ctx.start_step, warmup_steps=self.warmup)

    def after_step(self, ctx):
        for k, v in ctx.metrics.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v)
        self.count += 1
        self.timer.tick(ctx.step + 1)
        if not every(self.n, ctx):
            return
        scalars = {k: v / self.count for k, v in self.sums.items()}
        scalars["lr"] = ctx.lr
        scalars["epoch"] = (ctx.step + 1) / ctx.steps_per_epoch
        if self.timer.images_per_second is not None:
            scalars["images_per_s"] = self.timer.images_per_second
        ctx.writer.write_scalars(ctx.step + 1, scalars)
        self.sums, self.count = {}, 0


class Evaluate(Hook):
    """Evaluates every ``n`` steps (and after the last), writing top-k per head."""

    def __init__(self, n):
        self.n = n

    def after_step(self, ctx):
        if every(self.n, ctx):
            ctx.results = ctx.evaluate()
            flat = {f"{head}/test_{k}": v for head, r in ctx.results.items() for k, v in r.items()}
            ctx.writer.write_scalars(ctx.step + 1, flat)


class Checkpoint(Hook):
    """Saves the whole train state every ``n`` steps and after the last step."""

    def __init__(self, n):
        self.n = n

    def after_step(self, ctx):
        if every(self.n, ctx):
            ctx.save_checkpoint()


def write_results(workdir, results, extra=None):
    """``WORKDIR/results.json``: final metrics per head (written atomically)."""
    path = os.path.join(workdir, "results.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({**(extra or {}), "heads": results}, f, indent=2)
    os.replace(tmp, path)
    return path
