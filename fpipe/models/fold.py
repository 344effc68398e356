"""Frozen params prepared for speed: eval-mode BatchNorm folded into its conv, channels_last weights.

Frozen params never change, so these transforms run once, outside the step (the loop applies them
when it builds the step; checkpoints keep the original params):

    frozen = fold.fold_frozen_norms(frozen, model_state, eval_norms)   # conv -> conv + bias
    frozen = fold.channels_last(frozen)                                # 4-d weights, NHWC layout

A norm ``X.bnK`` follows the conv ``X.convK`` in the ResNet family; a norm ``X.1`` follows the conv
``X.0`` in torchvision's conv-norm pairs (ResNet's ``downsample``, RegNet's and EfficientNet's
blocks). Running in eval mode (it is in ``eval_norms``) with frozen scale and shift, it is
an affine map per channel, so ``bn(conv(x, W, b)) == conv(x, W * s, (b - mean) * s + shift)`` with
``s = weight / sqrt(running_var + eps)``. The folded tree has no params for that norm; the trunk's
apply skips a norm whose params are absent. Model state is not touched: the running statistics
stay where they are (they are checkpointed and reported as before), and the step returns them
unchanged because a norm in ``eval_norms`` never updates them.
"""
import torch

from fpipe import tree
from fpipe.models import layers


def conv_of(norm_name):
    """Dotted name of the conv that feeds the norm ``norm_name``, or None if there is none."""
    parent, _, key = norm_name.rpartition(".")
    prefix = f"{parent}." if parent else ""
    if key.startswith("bn") and key[2:].isdigit():
        return f"{prefix}conv{key[2:]}"
    if key == "1" and parent:
        return f"{prefix}0"
    return None


def foldable(frozen, model_state, eval_norms):
    """``{norm_name: conv_name}`` of the norms that :func:`fold_frozen_norms` folds.

    A norm folds when it runs in eval mode (in ``eval_norms``), has running statistics, its
    ``weight`` and ``bias`` are both frozen, and the conv before it (a 4-d weight with the norm's
    channel count as outputs) is frozen as well.
    """
    fp, st = tree.flatten(frozen), tree.flatten(model_state)
    out = {}
    for name in sorted(eval_norms):
        conv = conv_of(name)
        kernel = fp.get(f"{conv}.weight") if conv is not None else None
        if (kernel is not None and kernel.dim() == 4 and f"{name}.weight" in fp and f"{name}.bias" in fp
                and kernel.shape[0] == fp[f"{name}.weight"].numel()
                and f"{name}.running_mean" in st and f"{name}.running_var" in st):
            out[name] = conv
    return out


def fold_frozen_norms(frozen, model_state, eval_norms, eps=layers.BN_EPS):
    """Returns a frozen-params tree with foldable eval-mode norms folded into their convs.

    The folded conv gets ``weight * s`` and a ``bias``; the norm's ``weight``/``bias`` entries are
    removed. Computed in float64, stored in the conv weight's dtype. Inputs are not modified.
    """
    fp, st = dict(tree.flatten(frozen)), tree.flatten(model_state)
    for norm, conv in foldable(frozen, model_state, eval_norms).items():
        w = fp[f"{conv}.weight"]
        scale = fp.pop(f"{norm}.weight").double() / torch.sqrt(st[f"{norm}.running_var"].double() + eps)
        shift = fp.pop(f"{norm}.bias").double()
        bias = fp.get(f"{conv}.bias")
        bias = torch.zeros(w.shape[0], dtype=torch.float64, device=w.device) if bias is None else bias.double()
        fp[f"{conv}.weight"] = (w.double() * scale.reshape(-1, *([1] * (w.dim() - 1)))).to(w.dtype)
        fp[f"{conv}.bias"] = ((bias - st[f"{norm}.running_mean"].double()) * scale + shift).to(w.dtype)
    return tree.unflatten(fp)


def channels_last(params):
    """Every 4-d float tensor in ``params`` (conv weights; in a train state also their optimizer
    slots) in ``torch.channels_last`` layout: same values, NHWC strides.

    oneDNN's CPU convolutions run fastest in this layout; a conv whose weight is channels_last
    gives a channels_last output, so the whole trunk runs NHWC. Put the images in the same layout
    (``images.contiguous(memory_format=torch.channels_last)``) to skip one conversion. A compiled
    train step on such a state neither converts each weight every step nor mixes layouts between
    forward and backward kernels (ResNet-18 64 px, benchmarks/train_step.py: 0.91-1.05x
    torch.compile'd nn.Module over four runs instead of 0.82-0.85x). Checkpoints' hashes do not
    change (fpipe.checkpoint hashes contiguous bytes).
    """
    def convert(t):
        if isinstance(t, torch.Tensor) and t.dim() == 4 and t.is_floating_point():
            # empty_like spells out channels-last strides even for 1x1 kernels, as a compiled step's
            # outputs have them (``contiguous`` keeps a 1x1 kernel's strides): equal strides, no recompile
            return torch.empty_like(t, memory_format=torch.channels_last).copy_(t)
        return t
    return tree.map_leaves(convert, params)
