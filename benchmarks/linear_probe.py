r"""Linear probes on cached features: an epoch vs an epoch that runs the trunk; 13 heads vs one.

    PYTHONPATH=. python benchmarks/linear_probe.py

1. The trunk epoch: a ResNet-50 forward at 224 px (fpipe's trunk as feature extraction runs it
   below ``compile_min_images``: ``frozen_trunk.eval_features``, norms folded, eager; what a
   linear evaluation with a frozen trunk pays per image at least). Timed on a few batches after
   a warm-up and EXTRAPOLATED to an epoch of ``--samples`` images.
2. The cached epoch: ``fpipe.evaluate.linear.train_grid`` for one epoch over ``--samples``
   random 2048-d features (batch 256), one head and a grid of 13 learning rates, for 10 and
   1000 classes. Measured whole.
Prints seconds per epoch and the ratios trunk / cached (target >= 100) and 13 heads / 1 head
(target <= 1.5; met where the data, not the classifier, is the work: at 1000 classes the grid's
two matmuls are 13x one head's FLOPs, so it is compared with 13 separate runs as well).
"""
import argparse
import time

import ml_collections
import torch

from fpipe.evaluate import config as eval_config
from fpipe.evaluate import linear
from fpipe.models import model as models
from fpipe.train import frozen_trunk


def trunk_seconds_per_image(batch, batches):
    cfg = ml_collections.ConfigDict(dict(trunk=models.trunk_config(depth=50), heads={}))
    model = models.build(cfg, num_classes=1000, image_size=224)
    params, state = model.init(0)
    x = torch.randn(batch, 3, 224, 224)
    features = frozen_trunk.eval_features(model, params, state, ("flatten",), compile=False)
    features(x)  # warm-up
    t0 = time.perf_counter()
    for _ in range(batches):
        features(x)
    return (time.perf_counter() - t0) / (batch * batches)


def probe_epoch_seconds(samples, dim, classes, heads):
    cfg = eval_config.default_config().linear
    cfg.epochs = 1
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(samples, dim, generator=g), torch.randint(0, classes, (samples,), generator=g)
    lrs = eval_config.LINEAR_LRS[:heads]
    linear.train_grid(x[:2048], y[:2048], classes, lrs, (0.0,), cfg)  # warm-up
    t0 = time.perf_counter()
    linear.train_grid(x, y, classes, lrs, (0.0,), cfg)
    return time.perf_counter() - t0


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--samples", type=int, default=20_000)
    p.add_argument("--trunk_batch", type=int, default=8)
    p.add_argument("--trunk_batches", type=int, default=2)
    a = p.parse_args()
    per_image = trunk_seconds_per_image(a.trunk_batch, a.trunk_batches)
    trunk_epoch = per_image * a.samples
    print(f"trunk: ResNet-50 forward at 224 px {per_image * 1000:.0f} ms/image "
          f"({a.trunk_batches} batches of {a.trunk_batch}) -> {trunk_epoch:.0f} s per epoch of {a.samples} "
          "images (extrapolated)")
    for classes in (10, 1000):
        one = probe_epoch_seconds(a.samples, 2048, classes, 1)
        grid = probe_epoch_seconds(a.samples, 2048, classes, 13)
        print(f"{classes:5d} classes: cached epoch, 1 head {one:.2f} s, 13 heads {grid:.2f} s | "
              f"ratio_trunk_vs_cached (1 head) {trunk_epoch / one:.0f}, (13 heads) {trunk_epoch / grid:.0f} | "
              f"ratio_grid13_vs_one {grid / one:.2f}, vs 13 runs of one {grid / (13 * one):.2f}")


if __name__ == "__main__":
    main()
