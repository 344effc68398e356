"""What the loop does every so often: the "is it time" rule, metric logging, PreciseBN statistics.

The loop (fpipe/train/loop.py) calls these as plain checks after each step, in this order:
log metrics -> PreciseBN + evaluate (+ best checkpoint) -> checkpoint; so evaluation sees precise
statistics and a checkpoint sees the results it was evaluated with.
"""
import torch

from fpipe import tree
from fpipe.train import distributed


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


