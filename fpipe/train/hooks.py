"""Trainer hooks (detectron2's interface): called around the loop, with state that survives resume.

A hook sees the loop's :class:`~fpipe.train.loop.Context` (step, train state, metrics, writer,
services such as ``evaluate`` and ``save_checkpoint``) and may keep state of its own;
``state_dict``/``load_state_dict`` put it in every checkpoint. Hooks run in the order given;
the loop's order is LayerFreeze -> LogMetrics (timer, lr, ETA) -> PreciseBN -> Evaluate ->
BestCheckpoint -> Checkpoint, so evaluation sees precise statistics and checkpoints see results.
"""
import json
import os

import torch
from absl import logging

from fpipe import files, freeze, tree
from fpipe.train import distributed


class Hook:
    def before_train(self, ctx): ...

    def before_step(self, ctx): ...

    def after_step(self, ctx): ...

    def after_train(self, ctx): ...

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict): ...


def every(n, ctx):
    """True on every ``n``-th completed step and on the last one (n <= 0 or None: only the last)."""
    done = ctx.step + 1
    return done == ctx.total_steps or (bool(n) and n > 0 and done % n == 0)


class LogMetrics(Hook):
    """Every ``n`` steps: the period's mean of each step metric (averaged over ranks), the lr,
    epoch, images/s from the run's timer (warm-up steps excluded), and the data-loading time
    (max over ranks). Metrics accumulate as tensors: no device sync between log steps."""

    def __init__(self, n, timer):
        self.n, self.timer = n, timer
        self.sums, self.count = {}, 0

    def after_step(self, ctx):
        for k, v in ctx.metrics.items():
            self.sums[k] = self.sums.get(k, 0) + (v.detach() if isinstance(v, torch.Tensor) else v)
        self.count += 1
        self.timer.tick(ctx.step + 1)
        if not every(self.n, ctx):
            return
        data_time = float(self.sums.pop("data_time", 0.0)) / self.count
        means = distributed.mean_metrics(ctx.dist, {k: v / self.count for k, v in self.sums.items()})
        scalars = {k: float(v) for k, v in means.items()}
        scalars.update(lr=ctx.lr, epoch=(ctx.step + 1) / ctx.steps_per_epoch,
                       data_time=distributed.max_over_ranks(ctx.dist, data_time))
        if self.timer.images_per_second is not None:
            scalars["images_per_s"] = self.timer.images_per_second
        ctx.writer.write_scalars(ctx.step + 1, scalars)
        self.sums, self.count = {}, 0


class PreciseBN(Hook):
    """Before each evaluation, recomputes the running statistics of the BatchNorms that train,
    as the equal-weight mean of ``num_batches`` training batches' statistics (detectron2's
    PreciseBN), instead of the momentum average of batches seen under changing weights."""

    def __init__(self, every_n, num_batches):
        self.n, self.num_batches = every_n, num_batches

    def after_step(self, ctx):
        if every(self.n, ctx):
            ctx.train_state = {**ctx.train_state, "model_state": ctx.precise_bn(self.num_batches)}


def precise_bn_statistics(apply, params, model_state, batches, eval_norms, momentum):
    """Equal-weight mean of per-batch BatchNorm statistics for the norms not in ``eval_norms``.

    Each batch runs in train mode from zeroed running statistics, so a layer returns
    ``momentum * batch statistic``; dividing by ``momentum`` recovers the batch's mean and
    unbiased variance exactly. Counters (``num_batches_tracked``) are kept as they were.
    """
    flat = tree.flatten(model_state)
    training = [n.rsplit(".", 1)[0] for n in flat if n.endswith(".running_mean")
                and n.rsplit(".", 1)[0] not in eval_norms]
    if not training:
        return model_state
    zeroed = dict(flat)
    for layer in training:
        zeroed[f"{layer}.running_mean"] = torch.zeros_like(flat[f"{layer}.running_mean"])
        zeroed[f"{layer}.running_var"] = torch.zeros_like(flat[f"{layer}.running_var"])
    zeroed = tree.unflatten(zeroed)
    sums, count = {}, 0
    with torch.no_grad():
        for images in batches:
            _, new_state = apply(params, zeroed, images, train=True, eval_norms=eval_norms)
            new_flat = tree.flatten(new_state)
            for layer in training:
                for stat in ("running_mean", "running_var"):
                    key = f"{layer}.{stat}"
                    sums[key] = sums.get(key, 0) + new_flat[key] / momentum
            count += 1
    out = dict(flat)
    out.update({k: v / count for k, v in sums.items()})
    return tree.unflatten(out)


class Evaluate(Hook):
    """Evaluates every ``n`` steps (and after the last), writing top-k per head."""

    def __init__(self, n):
        self.n = n

    def after_step(self, ctx):
        if every(self.n, ctx):
            ctx.results = ctx.evaluate()
            flat = {f"{head}/test_{k}": v for head, r in ctx.results.items() for k, v in r.items()}
            ctx.writer.write_scalars(ctx.step + 1, flat)


class BestCheckpoint(Hook):
    """After each evaluation, keeps ``checkpoints/best.pt`` for the best value of ``metric``
    (e.g. ``res5avg/top1``); the value to beat survives a restart in ``best.json``."""

    def __init__(self, metric, mode="max"):
        self.metric, self.mode, self.last_step = metric, mode, None

    def after_step(self, ctx):
        if not ctx.results or ctx.results_step == self.last_step:
            return
        self.last_step = ctx.results_step
        head, _, key = self.metric.partition("/")
        if head not in ctx.results or key not in ctx.results[head]:
            raise ValueError(f"best checkpoint metric {self.metric!r} is not among the results: "
                             f"{[f'{h}/{k}' for h, r in ctx.results.items() for k in r]}")
        ctx.save_checkpoint(best=(self.metric, ctx.results[head][key], self.mode))


class Checkpoint(Hook):
    """Saves the whole train state every ``n`` steps and after the last step."""

    def __init__(self, n):
        self.n = n

    def after_step(self, ctx):
        if every(self.n, ctx):
            ctx.save_checkpoint()


class LayerFreeze(Hook):
    """Holds the params matching ``rules`` fixed, and their norm layers on running statistics,
    for the first ``steps`` steps (fastreid's FREEZE_ITERS), then trains them.

    The switch is decided by the global step, which every checkpoint restores: a resumed run
    past ``steps`` does not freeze again (the counter bug fastreid users hit).
    """

    def __init__(self, rules, steps):
        self.rules, self.steps = freeze.rules(rules), steps

    def before_step(self, ctx):
        if ctx.step == ctx.start_step and ctx.step < self.steps:
            logging.info("LayerFreeze: holding %s until step %d.", self.rules, self.steps)
            ctx.rebuild_step(hold=self.rules)
        elif ctx.step == self.steps and ctx.start_step < self.steps:
            logging.info("LayerFreeze: step %d: training %s from now on.", ctx.step, self.rules)
            ctx.rebuild_step(hold=())



def write_results(workdir, results, extra=None):
    """``WORKDIR/results.json``: final metrics per head (written atomically)."""
    path = os.path.join(workdir, "results.json")
    files.atomic_write(path, lambda f: json.dump({**(extra or {}), "heads": results}, f, indent=2), mode="w")
    return path
