"""torchvision's RPNHead as pure init/apply, outputs flattened in the anchors' order.

Names as torchvision 0.29 (``conv.<d>.0.*`` 3×3 + ReLU, ``cls_logits.*``, ``bbox_pred.*``); a
Faster R-CNN nests them under ``rpn.head``. Per level the outputs go (cell row, column, anchor),
the order of anchors.anchors_for_levels, and levels are concatenated.
"""
import torch

from fpipe.models import layers


def init(seed, in_channels, num_anchors, conv_depth=1):
    """``(params, {})``; every conv normal(std=0.01) with zero bias, as torchvision."""
    gen = torch.Generator().manual_seed(seed)

    def conv(cin, cout, k):
        return {"weight": torch.randn(cout, cin, k, k, generator=gen) * 0.01, "bias": torch.zeros(cout)}

    convs = {str(d): {"0": conv(in_channels, in_channels, 3)} for d in range(conv_depth)}
    return {"conv": convs, "cls_logits": conv(in_channels, num_anchors, 1),
            "bbox_pred": conv(in_channels, num_anchors * 4, 1)}, {}


def apply(params, state, features, *, train=False):
    """``features``: FPN levels -> ``((objectness [N, sum H*W*A], deltas [N, sum H*W*A, 4]), state)``."""
    del train
    logits, deltas = [], []
    for x in features:
        for d in range(len(params["conv"])):
            x = torch.relu(layers.conv(params["conv"][str(d)]["0"], x, padding=1))
        logits.append(_per_anchor(layers.conv(params["cls_logits"], x), 1).squeeze(-1))
        deltas.append(_per_anchor(layers.conv(params["bbox_pred"], x), 4))
    return (torch.cat(logits, 1), torch.cat(deltas, 1)), state


def _per_anchor(t, c):
    """``[N, A*c, H, W]`` -> ``[N, H*W*A, c]`` (torchvision's permute_and_flatten)."""
    n, _, h, w = t.shape
    return t.view(n, -1, c, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1, c)
