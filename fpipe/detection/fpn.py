"""torchvision's FeaturePyramidNetwork (+ LastLevelMaxPool) as pure init/apply.

Names as torchvision 0.29 (``inner_blocks.<i>.0.*`` 1×1 laterals, ``layer_blocks.<i>.0.*`` 3×3
outputs, with biases); a Faster R-CNN nests them under ``backbone.fpn``. No norm layers, no state.
"""
import math

import torch
import torch.nn.functional as F

from fpipe.models import layers


def init(seed, in_channels_list, out_channels):
    """``(params, {})``; convs as torchvision initialises them: kaiming_uniform(a=1), zero bias."""
    gen = torch.Generator().manual_seed(seed)

    def conv(cin, k):
        bound = math.sqrt(3.0 / (cin * k * k))  # gain 1 for a = 1
        w = (torch.rand(out_channels, cin, k, k, generator=gen) * 2 - 1) * bound
        return {"0": {"weight": w, "bias": torch.zeros(out_channels)}}

    inner, layer = {}, {}
    for i, cin in enumerate(in_channels_list):
        if cin == 0:
            raise ValueError("FPN in_channels of 0 is not supported (as torchvision)")
        inner[str(i)] = conv(cin, 1)
        layer[str(i)] = conv(out_channels, 3)
    return {"inner_blocks": inner, "layer_blocks": layer}, {}


def apply(params, state, features, *, train=False, last_level_max_pool=True):
    """``features``: list, finest first -> (list of outputs, finest first, plus ``pool``, state).

    Top-down: each lateral adds the coarser level's running sum, upsampled by nearest to its size;
    ``pool`` is the coarsest output subsampled by 2 (a 1×1 max-pool with stride 2).
    """
    del train  # no norms, no dropout: the same in both modes
    inner, layer = params["inner_blocks"], params["layer_blocks"]
    if len(features) != len(inner):
        raise ValueError(f"FPN built for {len(inner)} levels got {len(features)} feature maps")
    last = layers.conv(inner[str(len(features) - 1)]["0"], features[-1])
    outs = [layers.conv(layer[str(len(features) - 1)]["0"], last, padding=1)]
    for i in range(len(features) - 2, -1, -1):
        lateral = layers.conv(inner[str(i)]["0"], features[i])
        last = lateral + F.interpolate(last, size=lateral.shape[-2:], mode="nearest")
        outs.insert(0, layers.conv(layer[str(i)]["0"], last, padding=1))
    if last_level_max_pool:
        outs.append(F.max_pool2d(outs[-1], kernel_size=1, stride=2, padding=0))
    return outs, state
