"""What every trunk family shares: the ``Trunk`` record, running only up to the deepest requested
feature, BatchNorm addressed by dotted name, and stochastic depth.

A family module (resnet, regnet, efficientnet, convnext, alexnet, ...) provides ``FEATURES``
(shallow to deep), ``OPTIONS`` (option -> default), ``PRESETS`` (torchvision/timm name ->
options) and ``build(**options) -> Trunk``; fpipe.models.model registers families by name.
"""
import functools
import re
from typing import Any, Callable, NamedTuple

import torch

from fpipe import tree
from fpipe.models import layers

STATS = ("running_mean", "running_var", "num_batches_tracked")


class Trunk(NamedTuple):
    """What every trunk family's ``build`` returns (fpipe.models.model's registry relies on it).

    init(seed=0) -> (params, state); apply(params, state, images, *, train, features=(...),
    eval_norms=frozenset(), sync_stats=None) -> ({feature: tensor}, new_state); ``features``:
    the valid feature names, shallow to deep. ``init`` and ``apply`` must also run on the meta
    device: shapes are computed there (:func:`meta_features`).
    """
    spec: Any
    init: Callable
    apply: Callable
    features: tuple = ()


def feature_listing(names) -> str:
    """``names`` for an error message, each numbered run of 8 or more folded: a ViT-B's 48 block
    features read ``block<0-11>, block<0-11>CLS, …`` instead of one by one."""
    parts = [re.fullmatch(r"(\D*)(\d+)(.*)", n) for n in names]  # (before, number, after) or None
    runs = {}
    for m in filter(None, parts):
        runs.setdefault((m[1], m[3]), []).append(int(m[2]))
    out = []
    for name, m in zip(names, parts):
        indices = runs[m[1], m[3]] if m else []
        if len(indices) >= 8 and indices == list(range(indices[0], indices[-1] + 1)):
            name = f"{m[1]}<{indices[0]}-{indices[-1]}>{m[3]}"
        if name not in out:
            out.append(name)
    return ", ".join(out)


def init_on_meta(trunk: Trunk) -> tuple:
    """``trunk.init(0)`` on the meta device: names and shapes without memory or random draws (a
    RegNet-Y 128GF's 645M values took 9 s and 2.6 GB on a CPU just to be moved to meta)."""
    with torch.device("meta"):
        return trunk.init(0)


def meta_features(trunk: Trunk, features, side: int) -> tuple:
    """``({feature: tensor}, state)`` of ``trunk`` on one ``side``-pixel square image, all on the
    meta device: the shapes a head or a neck is built for, with no memory and no FLOPs."""
    params, state = init_on_meta(trunk)
    feats, _ = trunk.apply(params, state, torch.empty(1, 3, side, side, device="meta"), train=False,
                           features=tuple(features))
    return feats, state


def run(stages, x, features):
    """Runs ``stages`` (``(feature name, fn)``, shallow to deep) up to the deepest feature asked
    for; returns ``{name: output}`` of the requested ones."""
    names = [name for name, _ in stages]
    unknown = [f for f in features if f not in names]
    if unknown or not features:
        raise ValueError(f"unknown trunk feature(s) {unknown or list(features)}; valid: {tuple(names)}")
    deepest = max(names.index(f) for f in features)
    out = {}
    for name, fn in stages[:deepest + 1]:
        x = fn(x)
        if name in features:
            out[name] = x
    return out


def child(params, path):
    """The sub-tree at dotted ``path`` (``{}`` where it is absent, e.g. a norm folded away)."""
    for key in path.split("."):
        params = params.get(key, {})
    return params


class BatchNorms:
    """BatchNorm layers addressed by dotted name, collecting new running statistics.

    ``train`` uses batch statistics except for names in ``eval_norms`` (frozen norms), whose state
    stays unchanged; ``sync_stats`` is SyncBN's all-reduce. State of layers that never ran (the
    trunk cut early) comes back as it was; ``state()`` has the input state's structure.
    """

    def __init__(self, state, *, train, eval_norms=frozenset(), sync_stats=None,
                 momentum=layers.BN_MOMENTUM, eps=layers.BN_EPS):
        self.old = tree.flatten(state)
        self.new = dict(self.old)
        self.train, self.eval_norms, self.sync_stats = train, eval_norms, sync_stats
        self.momentum, self.eps = momentum, eps

    def __call__(self, p, name, x):
        if "weight" not in p:  # folded into the preceding conv (fpipe.models.fold)
            return x
        stats = {k: self.old[f"{name}.{k}"] for k in STATS}
        train = self.train and name not in self.eval_norms
        y, new = layers.batch_norm(p, stats, x, train, self.momentum, self.eps, self.sync_stats)
        if train:
            self.new.update({f"{name}.{k}": new[k] for k in STATS})
        return y

    def state(self):
        return tree.unflatten(self.new)


def stochastic_depth(x, prob, train):
    """Drops whole samples of a residual branch with probability ``prob`` in train mode (scaled by
    1/(1-prob), torchvision's "row" mode). Draws from torch's global generator."""
    if not train or prob <= 0.0:
        return x
    keep = 1.0 - prob
    mask = (torch.rand((x.shape[0],) + (1,) * (x.dim() - 1), device=x.device) < keep).to(x.dtype)
    return x * mask / keep


def depth_ramp(prob, depths, stage, i):
    """torchvision's stochastic depth schedule: ``prob`` times block ``i`` of ``stage``'s place
    among all blocks, rising linearly from 0 (first block) to ``prob`` (last)."""
    index, total = sum(depths[:stage]) + i, sum(depths)
    return prob * index / max(total - 1, 1)


def relative_offset_index(height: int, width: int) -> torch.Tensor:
    """``[h·w, h·w]`` int64 on the CPU: for each (query, key) pair of an h×w grid, its row in a
    relative position bias table of (2h-1)×(2w-1) offsets: (row offset + h - 1)·(2w - 1) + column
    offset + w - 1 (Swin's window tables, BEiT's patch tables)."""
    rows, cols = torch.meshgrid(torch.arange(height, device="cpu"), torch.arange(width, device="cpu"), indexing="ij")
    rows, cols = rows.flatten(), cols.flatten()
    return (rows[:, None] - rows[None, :] + height - 1) * (2 * width - 1) + cols[:, None] - cols[None, :] + width - 1


def cached_when_eager(fn, maxsize: int):
    """``fn`` memoised for eager calls; called afresh while ``torch.compile`` traces, where the
    graph holds its result as a constant (for tables made from shapes: indices, masks)."""
    cached = functools.lru_cache(maxsize=maxsize)(fn)
    return lambda *args: (fn if torch.compiler.is_compiling() else cached)(*args)


def squeeze_excite(p, x, act):
    """Squeeze-and-excitation (torchvision's SqueezeExcitation: ``fc1``/``fc2`` are 1×1 convs)."""
    s = torch.mean(x, dim=(2, 3), keepdim=True)
    s = torch.sigmoid(layers.conv(p["fc2"], act(layers.conv(p["fc1"], s))))
    return x * s


class Builder:
    """Collects a trunk's params and state by dotted name while ``init`` runs, in order."""

    def __init__(self, seed):
        self.gen = torch.Generator().manual_seed(seed)
        self.params, self.state = {}, {}

    def add(self, name, **tensors):
        self.params.update({f"{name}.{k}": t for k, t in tensors.items()})

    def conv(self, name, in_ch, out_ch, kernel, groups=1, bias=False):
        """A convolution with torchvision's ResNet-style init (Kaiming normal, fan_out)."""
        self.add(name, **layers.conv_init(self.gen, in_ch, out_ch, kernel, groups, bias))

    def batch_norm(self, name, channels):
        p, s = layers.norm_init("batch", channels)
        self.add(name, **p)
        self.state.update({f"{name}.{k}": t for k, t in s.items()})

    def squeeze_excite(self, name, channels, squeeze):
        self.conv(f"{name}.fc1", channels, squeeze, 1, bias=True)
        self.conv(f"{name}.fc2", squeeze, channels, 1, bias=True)

    def trees(self):
        return tree.unflatten(self.params), tree.unflatten(self.state)
