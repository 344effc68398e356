"""Exact accuracy (or a head's own metric) per head over a whole split, on one or several processes."""
import time

import torch
from absl import logging

from fpipe import tree
from fpipe.models import losses
from fpipe.train import distributed

PROGRESS_EVERY_S = 10.0  # a long evaluation says how far it is


def evaluate(eval_fn, params, model_state, loader, dist, prepare):
    """Exact metrics per head over the whole split (top-k, or its loss's: fpipe.models.losses):
    counts add up over batches and ranks, then divide."""
    totals, last_report = None, time.perf_counter()
    for i, batch in enumerate(loader.epoch(0)):  # counts stay on the device until the end
        counts = eval_fn(params, model_state, prepare(batch))
        totals = counts if totals is None else tree.map_leaves(torch.add, totals, counts)
        if dist.is_main and time.perf_counter() - last_report > PROGRESS_EVERY_S:
            logging.info("evaluating: batch %d/%d", i + 1, loader.steps_per_epoch)
            last_report = time.perf_counter()
    totals = dict(tree.flatten(distributed.sum_over_ranks(dist, totals)))
    n, n_real = int(totals.pop("count", 0)), int(totals.pop("real_count", 0))  # real: the images ReaL scores
    results = {}
    for name, value in totals.items():
        head, k = name.rsplit(".", 1)
        results.setdefault(head, {})[k] = losses.finish(k, value, n_real if k == "real_top1" else n)
    return results


def present_classes(split, num_classes: int) -> torch.Tensor:
    """Bool per class: whether ``split`` holds a sample of it (``eval_classes="present"``: the
    eval step then scores label heads among these classes only)."""
    return torch.bincount(split.labels, minlength=num_classes)[:num_classes] > 0
