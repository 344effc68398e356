"""ViTDet's simple feature pyramid (detectron2's SimpleFeaturePyramid) as pure init/apply.

A plain ViT has one feature map (its patch grid, stride 16). The pyramid is built from that map
alone: ×4 by two 2×2 transposed convs (LayerNorm and GELU between), ×2 by one, ×1 as it is, ×½
by a 2×2 max-pool; each then a 1×1 and a 3×3 conv without bias, each followed by a channels-first
LayerNorm; the max-pool level on top (as LastLevelMaxPool). Names follow detectron2's
``simfp_<level>.<index>`` (level = log2 of the output stride), nested under ``backbone.fpn``.
"""
import math

import torch
import torch.nn.functional as F

from fpipe.models import layers

SCALES = (4.0, 2.0, 1.0, 0.5)
LN_EPS = 1e-6


def levels(in_stride):
    """The level number (log2 of the stride) of each pyramid output for an input of ``in_stride``."""
    return [int(math.log2(in_stride / s)) for s in SCALES]


def init(seed, in_channels, out_channels, in_stride=16):
    """``(params, {})``: transposed convs as PyTorch initialises them, the 1×1 / 3×3 convs by
    kaiming normal (fan_out, detectron2's c2_msra_fill), LayerNorms at 1 and 0."""
    gen = torch.Generator().manual_seed(seed)

    def deconv(cin, cout):  # ConvTranspose2d(cin, cout, 2, stride 2): weight [cin, cout, 2, 2]
        bound = 1 / math.sqrt(cout * 4)
        return {"weight": (torch.rand(cin, cout, 2, 2, generator=gen) * 2 - 1) * bound,
                "bias": (torch.rand(cout, generator=gen) * 2 - 1) * bound}

    def norm(c):
        return {"weight": torch.ones(c), "bias": torch.zeros(c)}

    def conv(cin, k):
        std = math.sqrt(2.0 / (out_channels * k * k))
        return {"weight": torch.randn(out_channels, cin, k, k, generator=gen) * std, "norm": norm(out_channels)}

    params = {}
    for level, scale in zip(levels(in_stride), SCALES):
        if scale == 4.0:
            stage = {"0": deconv(in_channels, in_channels // 2), "1": norm(in_channels // 2),
                     "3": deconv(in_channels // 2, in_channels // 4)}
            width, first = in_channels // 4, 4
        elif scale == 2.0:
            stage, width, first = {"0": deconv(in_channels, in_channels // 2)}, in_channels // 2, 1
        elif scale == 1.0:
            stage, width, first = {}, in_channels, 0
        else:  # 0.5: index 0 is the (parameterless) max-pool
            stage, width, first = {}, in_channels, 1
        stage[str(first)] = conv(width, 1)
        stage[str(first + 1)] = conv(out_channels, 3)
        params[f"simfp_{level}"] = stage
    return params, {}


def apply(params, state, feature):
    """``feature [N, C, H, W]`` -> (the four levels, finest first, plus the max-pool level; state)."""
    outs = []
    for scale in SCALES:
        stage = params[f"simfp_{_level_of(params, scale)}"]
        x = feature
        if scale == 4.0:
            x = _deconv(stage["0"], x)
            x = F.gelu(_norm(stage["1"], x))
            x, first = _deconv(stage["3"], x), 4
        elif scale == 2.0:
            x, first = _deconv(stage["0"], x), 1
        elif scale == 1.0:
            first = 0
        else:
            x, first = F.max_pool2d(x, kernel_size=2, stride=2), 1
        x = _norm(stage[str(first)]["norm"], layers.conv(stage[str(first)], x))
        x = _norm(stage[str(first + 1)]["norm"], layers.conv(stage[str(first + 1)], x, padding=1))
        outs.append(x)
    outs.append(F.max_pool2d(outs[-1], kernel_size=1, stride=2, padding=0))
    return outs, state


def _level_of(params, scale):
    finest = min(int(k.split("_")[1]) for k in params)
    return finest + SCALES.index(scale)


def _deconv(p, x):
    return F.conv_transpose2d(x, p["weight"], p["bias"], stride=2)


def _norm(p, x):
    return layers.layer_norm_2d(p, x, LN_EPS)  # detectron2's channels-first LayerNorm
