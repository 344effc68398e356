"""AlexNet (torchvision's names) as a pure trunk, with VISSL's feature names.

    conv1..conv5  after each conv's ReLU (features.1/4/7/9/11)
    pool5         the last max-pool (features.12)
    avgpool       adaptive average pool to 6×6
    fc6, fc7      after the classifier's hidden Linear + ReLU (classifier.1, classifier.4)

The hidden fully connected layers belong to the trunk; only ``classifier.6`` is a head. Dropout
(``dropout``, torchvision's 0.5) precedes fc6 and fc7 in train mode only, drawing from torch's
global generator; set it to 0 for a deterministic train mode (e.g. a frozen trunk that runs in
train mode because ``fast_frozen_trunk`` is off).
"""
import dataclasses
import math

import torch
import torch.nn.functional as F

from fpipe.models import layers
from fpipe.models import trunk as trunk_lib

FEATURES = ("conv1", "conv2", "conv3", "conv4", "conv5", "pool5", "avgpool", "fc6", "fc7")
OPTIONS = dict(dropout=0.5)
PRESETS = {"alexnet": {}}
# (features index, in, out, kernel, stride, padding) of conv1..conv5; max-pools follow 1, 2 and 5
CONVS = ((0, 3, 64, 11, 4, 2), (3, 64, 192, 5, 1, 2), (6, 192, 384, 3, 1, 1), (8, 384, 256, 3, 1, 1),
         (10, 256, 256, 3, 1, 1))


@dataclasses.dataclass(frozen=True)
class Spec:
    dropout: float = OPTIONS["dropout"]

    def __post_init__(self):
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"AlexNet dropout must be in [0, 1), got {self.dropout}")


def build(**options) -> trunk_lib.Trunk:
    spec = Spec(**options)
    return trunk_lib.Trunk(spec, lambda seed=0: init_params(spec, seed),
                           lambda *a, **k: apply(spec, *a, **k), FEATURES)


def init_params(spec: Spec, seed=0):
    """PyTorch's default init (uniform ±1/sqrt(fan_in)), which torchvision's AlexNet keeps."""
    b = trunk_lib.Builder(seed)

    def uniform(fan_in, *shape):
        return (torch.rand(shape, generator=b.gen) * 2 - 1) / math.sqrt(fan_in)

    for index, cin, cout, k, _, _ in CONVS:
        b.add(f"features.{index}", weight=uniform(cin * k * k, cout, cin, k, k), bias=uniform(cin * k * k, cout))
    b.add("classifier.1", **layers.linear_init(b.gen, 256 * 6 * 6, 4096))
    b.add("classifier.4", **layers.linear_init(b.gen, 4096, 4096))
    return b.trees()


def apply(spec: Spec, params, state, x, *, train, features=("fc7",), eval_norms=frozenset(),
          sync_stats=None):
    """``({feature: tensor}, state)``; AlexNet has no norm layers, so ``eval_norms`` and
    ``sync_stats`` change nothing here."""
    del eval_norms, sync_stats

    def conv(index, in_ch, out_ch, kernel, stride, padding):
        def run_conv(h):
            p = params["features"][str(index)]
            return torch.relu(F.conv2d(h, p["weight"], p["bias"], stride, padding))
        return run_conv

    def fc(name):
        return lambda h: torch.relu(layers.linear(params["classifier"][name], F.dropout(h, spec.dropout, train)))

    def max_pool(h):
        return layers.max_pool(h, 3, 2, 0)

    conv1, conv2, conv3, conv4, conv5 = (conv(*c) for c in CONVS)
    stages = [("conv1", conv1), ("conv2", lambda h: conv2(max_pool(h))), ("conv3", lambda h: conv3(max_pool(h))),
              ("conv4", conv4), ("conv5", conv5), ("pool5", max_pool),
              ("avgpool", lambda h: F.adaptive_avg_pool2d(h, (6, 6))),
              ("fc6", lambda h: fc("1")(torch.flatten(h, 1))), ("fc7", fc("4"))]
    return trunk_lib.run(stages, x, features), state
