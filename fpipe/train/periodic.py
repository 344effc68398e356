"""What the loop does every so often: the "is it time" rule, metric logging, the bookkeeping every
training run shares after its steps, PreciseBN statistics.

The loop (fpipe/train/loop.py) calls these as plain checks after each step, in this order:
log metrics -> PreciseBN + evaluate (+ best checkpoint) -> checkpoint; so evaluation sees precise
statistics and a checkpoint sees the results it was evaluated with. fpipe.detection.train runs
the same ``Bookkeeping``; only its evaluation and results are its own.
"""
import signal
import time

import torch
from absl import logging

from fpipe import checkpoint, schedules, tree, writers
from fpipe.train import config_check, distributed, divergence
from fpipe.train.signals import Stopped


def is_time(done, every_n, total):
    """True after the ``every_n``-th completed step and after the last (``every_n`` <= 0: only the last)."""
    return done == total or (bool(every_n) and every_n > 0 and done % every_n == 0)


class MetricLog:
    """Accumulates step metrics as tensors (no device sync between log steps); ``means`` gives the
    period's mean of each (averaged over ranks), with the data-loading time as the max over ranks."""

    def __init__(self, dist):
        self.dist, self.sums, self.count = dist, {}, 0

    def add(self, metrics, data_time):
        for k, v in metrics.items():
            self.sums[k] = self.sums.get(k, 0) + (v.detach() if isinstance(v, torch.Tensor) else v)
        self.sums["data_time"] = self.sums.get("data_time", 0.0) + data_time
        self.count += 1

    def means(self):
        data_time = float(self.sums.pop("data_time", 0.0)) / max(self.count, 1)
        means = distributed.mean_metrics(self.dist, {k: v / self.count for k, v in self.sums.items()})
        out = {k: float(v) for k, v in means.items()}
        out["data_time"] = distributed.max_over_ranks(self.dist, data_time)
        self.sums, self.count = {}, 0
        return out


class Bookkeeping:
    """What a training run does around its steps, the same for every run (the classification
    loop, the detection run): the step metrics (``MetricLog``), the ETA timer and the writers, the
    count of non-finite steps (kept on the device: one host sync, ``check_finite``, before anything
    is logged, evaluated or saved), the log every ``log_steps``, the checkpoint every ``ckpt_*`` or
    on a stop request, and the checkpoint of the completed steps when stopped.

    ``save(step, state, best=None, evaluation_pending=False) -> step`` is
    ``fpipe.train.loop.make_saver``'s; ``write``: this process writes metrics (rank 0, and only when
    something trains); ``resumed``: the workdir held a checkpoint (a divergence then points at the
    latest one)."""

    def __init__(self, config, workdir, dist, save, *, total_steps, steps_per_epoch, start_step, eval_images,
                 write, resumed):
        self.workdir, self.dist, self.save = workdir, dist, save
        self.total_steps, self.steps_per_epoch, self.log_every = total_steps, steps_per_epoch, config.log_steps
        self.eval_every = schedules.to_steps(config, "eval", steps_per_epoch, default=0)
        self.ckpt_every = schedules.to_steps(config, "ckpt", steps_per_epoch, default=0)
        self.timer = writers.EtaTimer(total_steps, batch_size=config.data.batch_size, start_step=start_step,
                                      eval_every=self.eval_every, eval_images=eval_images)
        self.writer = writers.make_writers(workdir, write, total_steps=total_steps, resume_step=start_step,
                                           timer=self.timer)
        self.metric_log = MetricLog(dist)
        self.nonfinite = torch.zeros((), dtype=torch.int32, device=dist.device)  # steps with NaN/inf, on the device
        self.last_saved = checkpoint.latest(workdir) if resumed else None
        self.saved_step = self.completed = start_step
        self.evaluating = None  # the step whose periodic evaluation is under way (evaluate_after)
        self.best_metric, self.best_mode = config.get("best_metric"), config.get("best_mode")

    def step_done(self, done, metrics, data_time):
        """After step ``done`` (its new state accepted): its non-finite flag, metrics and time."""
        self.completed = done
        self.nonfinite = self.nonfinite + metrics.pop("nonfinite")
        self.metric_log.add(metrics, data_time)
        self.timer.tick(done)

    def is_time(self, done, every):
        return is_time(done, every, self.total_steps)

    def _nonfinite(self, state):
        """Steps with a non-finite loss or grad norm, plus 1 if the state holds NaN/inf (on the device)."""
        return self.nonfinite + (~divergence.state_finite(state)).to(self.nonfinite)

    def check_finite(self, done, state):
        """One host sync: stop before logging/evaluating/saving anything after a non-finite step or
        with a non-finite value in the state."""
        if int(distributed.sum_over_ranks(self.dist, {"n": self._nonfinite(state)})["n"]):
            divergence.raise_diverged(done, state, self.workdir, self.last_saved)

    def log(self, done, state, lr):
        """Every ``log_steps``: the period's mean metrics, lr, epoch and images/s to the writers."""
        if not self.is_time(done, self.log_every):
            return
        self.check_finite(done, state)
        steps = self.metric_log.count
        scalars = self.metric_log.means()
        scalars.update(lr=lr, epoch=done / self.steps_per_epoch)
        if steps != self.log_every:  # a shorter period (after a resume, or the last): say what the means cover
            scalars["steps_averaged"] = steps
        if self.timer.images_per_second is not None:
            scalars["images_per_s"] = self.timer.images_per_second
        self.writer.write_scalars(done, scalars)

    def evaluate(self, done, state, evaluate, scalars_of):
        """``evaluate(state)``, timed for the ETA, its ``scalars_of(results)`` to the writers."""
        t0 = time.perf_counter()
        results = evaluate(state)
        self.timer.eval_took(time.perf_counter() - t0)
        self.writer.write_scalars(done, scalars_of(results))
        return results

    def evaluate_after(self, done, state, evaluate, scalars_of, refresh=None):
        """``(state, results)``: the periodic evaluation after step ``done`` — ``refresh(state)`` first
        (PreciseBN), ``evaluate``, then the best checkpoint (``best_metric``). A stop inside it leaves
        a checkpoint marked ``evaluation_pending`` (``stopped``), and the resumed run does it first."""
        self.evaluating = done  # not reset when a stop raises: stopped() reads it
        self.check_finite(done, state)
        if refresh is not None:
            state = refresh(state)
        results = self.evaluate(done, state, evaluate, scalars_of)
        if self.best_metric:
            head, key = config_check.best_metric_key(self.best_metric)
            self.save(done, state, best=(self.best_metric, results[head][key] or 0.0, self.best_mode))
        self.evaluating = None
        return state, results

    def checkpoint(self, done, state, stop):
        """Every ``ckpt_*``, or when a stop is requested before the end: a checkpoint; then the stop
        (``Stopped``)."""
        stopping = stop.requested and done < self.total_steps
        if self.is_time(done, self.ckpt_every) or stopping:
            self.check_finite(done, state)
            self.saved_step = self.save(done, state)
            self.last_saved = checkpoint.checkpoint_path(self.workdir, done)
        if stopping:
            raise Stopped(stop.requested)

    def stopped(self, state, signum, training=True):
        """On ``Stopped``: the completed steps' checkpoint unless saved already (never a non-finite
        state); an interrupted step's work is lost."""
        if training and self.dist.is_main and self.saved_step < self.completed and not int(self._nonfinite(state)):
            self.save(self.completed, state, evaluation_pending=self.evaluating == self.completed)
        logging.warning("Stopped by %s at step %d; a checkpoint is written: re-run the same command to "
                        "continue.", signal.Signals(signum).name, self.completed)

    def close(self):
        self.writer.close()


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
    # in the given nested dicts, a stateless head's empty one included: the eval step's saved file
    # is keyed by its inputs' structure (a run with PreciseBN then loads one a run without it saved)
    return tree.shaped_like(model_state, tree.unflatten(out))


