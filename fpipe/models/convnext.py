"""ConvNeXt tiny/small/base/large (torchvision's names) and ConvNeXt V2 as a pure trunk; LayerNorm
only, no state.

A 4×4 stride-4 patchify stem, four stages of blocks (7×7 depthwise conv, LayerNorm, 4× MLP with
GELU, layer scale, stochastic depth, residual), a LayerNorm2d + 2×2 stride-2 conv between stages.
ConvNeXt V2 (``grn=True``, ``layer_scale=0``: the ``convnextv2_*`` presets, timm's names and
sizes) adds Global Response Normalization after the MLP's GELU and drops the layer scale;
torchvision has no V2, so its GRN is named ``block.grn`` (``weight``, ``bias``: ``[4C]``), which
keeps every other name the V1 block's. Features (ResNet-style names):

    stem     features.0                 res2..5  features.1/3/5/7 (the four stages)
    res5avg  global average pool of res5, N×C×1×1
    flatten  N×C after the final LayerNorm, as torchvision's classifier computes it before its
             Linear; that LayerNorm (``classifier.0``) therefore belongs to the trunk, and a head
             on ``flatten`` plays ``classifier.2``.

Stochastic depth (``stochastic_depth_prob``; torchvision trains tiny/small/base/large with
0.1/0.4/0.5/0.5, rising linearly over the blocks) is off by default; when set it acts in train
mode only, drawing from torch's global generator (reproducible under ``torch.manual_seed``).
"""
import dataclasses

import torch
import torch.nn.functional as F

from fpipe.models import layers
from fpipe.models import trunk as trunk_lib

FEATURES = ("stem", "res2", "res3", "res4", "res5", "res5avg", "flatten")
OPTIONS = dict(channels=(96, 192, 384, 768), depths=(3, 3, 9, 3), layer_scale=1e-6,
               stochastic_depth_prob=0.0, grn=False)
_SMALL, _TINY, _LONG = (2, 2, 6, 2), (3, 3, 9, 3), (3, 3, 27, 3)
_V2 = dict(grn=True, layer_scale=0.0)
PRESETS = {
    "convnext_tiny": dict(channels=(96, 192, 384, 768), depths=_TINY),
    "convnext_small": dict(channels=(96, 192, 384, 768), depths=_LONG),
    "convnext_base": dict(channels=(128, 256, 512, 1024), depths=_LONG),
    "convnext_large": dict(channels=(192, 384, 768, 1536), depths=_LONG),
    "convnextv2_atto": dict(channels=(40, 80, 160, 320), depths=_SMALL, **_V2),
    "convnextv2_femto": dict(channels=(48, 96, 192, 384), depths=_SMALL, **_V2),
    "convnextv2_pico": dict(channels=(64, 128, 256, 512), depths=_SMALL, **_V2),
    "convnextv2_nano": dict(channels=(80, 160, 320, 640), depths=(2, 2, 8, 2), **_V2),
    "convnextv2_tiny": dict(channels=(96, 192, 384, 768), depths=_TINY, **_V2),
    "convnextv2_base": dict(channels=(128, 256, 512, 1024), depths=_LONG, **_V2),
    "convnextv2_large": dict(channels=(192, 384, 768, 1536), depths=_LONG, **_V2),
    "convnextv2_huge": dict(channels=(352, 704, 1408, 2816), depths=_LONG, **_V2),
}
EPS = 1e-6
GRN_EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class Spec:
    channels: tuple = OPTIONS["channels"]
    depths: tuple = OPTIONS["depths"]
    layer_scale: float = OPTIONS["layer_scale"]  # init value; 0 (or None): no layer scale (V2)
    stochastic_depth_prob: float = OPTIONS["stochastic_depth_prob"]
    grn: bool = OPTIONS["grn"]                    # Global Response Normalization after the GELU (V2)

    def __post_init__(self):
        object.__setattr__(self, "channels", tuple(self.channels))
        object.__setattr__(self, "depths", tuple(self.depths))
        object.__setattr__(self, "layer_scale", self.layer_scale or 0.0)
        if len(self.channels) != 4 or len(self.depths) != 4:
            raise ValueError(f"ConvNeXt needs 4 stages: got channels={self.channels}, depths={self.depths}")

    def drop(self, stage, i):
        """Stochastic depth probability of block ``i`` (0-based) of ``stage``."""
        return trunk_lib.depth_ramp(self.stochastic_depth_prob, self.depths, stage, i)


def build(**options) -> trunk_lib.Trunk:
    spec = Spec(**options)
    return trunk_lib.Trunk(spec, lambda seed=0: init_params(spec, seed),
                           lambda *a, **k: apply(spec, *a, **k), FEATURES)


def init_params(spec: Spec, seed=0):
    """Truncated-normal (std 0.02) weights, zero biases, unit norms: torchvision's init; GRN's
    weight and bias start at zero (the identity), as ConvNeXt V2's."""
    b = trunk_lib.Builder(seed)

    def weight(*shape):
        return torch.nn.init.trunc_normal_(torch.empty(shape), std=0.02, generator=b.gen)

    def norm(name, c):
        b.add(name, weight=torch.ones(c), bias=torch.zeros(c))

    c0 = spec.channels[0]
    b.add("features.0.0", weight=weight(c0, 3, 4, 4), bias=torch.zeros(c0))
    norm("features.0.1", c0)
    for s, (c, depth) in enumerate(zip(spec.channels, spec.depths)):
        for i in range(depth):
            name = f"features.{2 * s + 1}.{i}"
            if spec.layer_scale:
                b.add(name, layer_scale=torch.full((c, 1, 1), spec.layer_scale))
            b.add(f"{name}.block.0", weight=weight(c, 1, 7, 7), bias=torch.zeros(c))
            norm(f"{name}.block.2", c)
            b.add(f"{name}.block.3", weight=weight(4 * c, c), bias=torch.zeros(4 * c))
            if spec.grn:
                b.add(f"{name}.block.grn", weight=torch.zeros(4 * c), bias=torch.zeros(4 * c))
            b.add(f"{name}.block.5", weight=weight(c, 4 * c), bias=torch.zeros(c))
        if s < 3:
            norm(f"features.{2 * s + 2}.0", c)
            c_next = spec.channels[s + 1]
            b.add(f"features.{2 * s + 2}.1", weight=weight(c_next, c, 2, 2), bias=torch.zeros(c_next))
    norm("classifier.0", spec.channels[-1])
    return b.trees()


def layer_norm_2d(p, x):
    return layers.layer_norm_2d(p, x, EPS)


def global_response_norm(p, y):
    """ConvNeXt V2's GRN on channels-last ``y``: each channel's L2 norm over the image, divided by
    its mean over channels, rescales the channel; ``y + weight·(y·that) + bias``."""
    norms = torch.linalg.vector_norm(y, dim=(1, 2), keepdim=True)
    return y + p["weight"] * (y * (norms / (norms.mean(dim=-1, keepdim=True) + GRN_EPS))) + p["bias"]


def apply(spec: Spec, params, state, x, *, train, features=("flatten",), eval_norms=frozenset(),
          sync_stats=None):
    """``({feature: tensor}, state)``; LayerNorms have no statistics, so ``eval_norms`` and
    ``sync_stats`` change nothing here."""
    del eval_norms, sync_stats
    feats = params["features"]

    def conv(p, h, stride=1, padding=0, groups=1):
        return F.conv2d(h, p["weight"], p["bias"], stride, padding, 1, groups)

    def block(p, h, drop):
        y = conv(p["block"]["0"], h, padding=3, groups=h.shape[1]).permute(0, 2, 3, 1)
        y = F.layer_norm(y, y.shape[-1:], p["block"]["2"]["weight"], p["block"]["2"]["bias"], EPS)
        y = F.gelu(layers.dense(y, **p["block"]["3"]))
        if spec.grn:
            y = global_response_norm(p["block"]["grn"], y)
        y = layers.dense(y, **p["block"]["5"]).permute(0, 3, 1, 2)
        if spec.layer_scale:
            y = p["layer_scale"] * y
        return trunk_lib.stochastic_depth(y, drop, train) + h

    def stage(s):
        def run_stage(h):
            if s > 0:  # downsampling between stages
                down = feats[str(2 * s)]
                h = conv(down["1"], layer_norm_2d(down["0"], h), stride=2)
            for i in range(spec.depths[s]):
                h = block(feats[str(2 * s + 1)][str(i)], h, spec.drop(s, i))
            return h
        return run_stage

    stages = [("stem", lambda h: layer_norm_2d(feats["0"]["1"], conv(feats["0"]["0"], h, stride=4)))]
    stages += [(f"res{s + 2}", stage(s)) for s in range(4)]
    stages += [("res5avg", lambda h: torch.mean(h, dim=(2, 3), keepdim=True)),
               ("flatten", lambda h: torch.flatten(layer_norm_2d(params["classifier"]["0"], h), 1))]
    return trunk_lib.run(stages, x, features), state
