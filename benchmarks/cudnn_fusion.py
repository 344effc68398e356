"""Frozen ResNet trunk on CUDA: cuDNN's fused conv + bias + ReLU (and + add + ReLU) against fpipe's compiled trunk.

    PYTHONPATH=. python benchmarks/cudnn_fusion.py          # on CUDA: ResNet-50, 224 px, batch 256, bf16, channels-last
    PYTHONPATH=. python benchmarks/cudnn_fusion.py --device cpu --depth 18 --image-size 32 --batch-size 4 --dtype fp32
                                                            # a dry run: the written-out trunk against fpipe's

Linear evaluation's frozen trunk is convolutions whose BatchNorms are folded into a bias, each
followed by a ReLU, or by the residual add and a ReLU. On CUDA inductor runs each convolution on
cuDNN and its bias, add and ReLU in a kernel of its own: one more pass over every activation, and
on the H200 linear eval ran 1.15x the compiled module (the goal: 1.2x). PyTorch has cuDNN's fused
forms, made for frozen inference (``aten::cudnn_convolution_relu``,
``aten::cudnn_convolution_add_relu``). This measures whether they pay before the trunk uses them:

  fpipe   ``frozen_trunk.eval_features``: the folded trunk compiled with inductor, as linear eval runs it
  plain   the same folded trunk written out, eager: ``conv2d``, then bias, add and ReLU
  fused   the same with cuDNN's fused ops (CUDA only)

Prints each program's milliseconds a batch and images/s (medians of alternated rounds), each one's
largest difference from fpipe's features (relative to their largest value), and ``fused_vs_fpipe``
(>1: the fused ops are faster than what linear eval runs now).
"""
import argparse
import functools
import statistics
import time

import torch
import torch.nn.functional as F

from benchmarks import linear_eval_step as le
from benchmarks.gpu_step import sync, time_rounds
from fpipe import freeze, tree
from fpipe.models import fold
from fpipe.train import frozen_trunk as ft_lib
from fpipe.train import loop as loop_lib
from fpipe.train import precision

aten = torch.ops.aten


def plain_ops():
    def conv_relu(x, w, b, stride, pad):
        return F.relu(F.conv2d(x, w, b, stride, pad))

    def conv_add_relu(x, w, z, b, stride, pad):
        return F.relu(F.conv2d(x, w, b, stride, pad) + z)
    return conv_relu, conv_add_relu


def fused_ops():
    def conv_relu(x, w, b, stride, pad):
        return aten.cudnn_convolution_relu(x, w, b, [stride] * 2, [pad] * 2, [1, 1], 1)

    def conv_add_relu(x, w, z, b, stride, pad):
        return aten.cudnn_convolution_add_relu(x, w, z, 1.0, b, [stride] * 2, [pad] * 2, [1, 1], 1)
    return conv_relu, conv_add_relu


def folded_weights(params: dict, state: dict) -> dict:
    """The trunk's flat params with every BatchNorm folded into its conv (a weight and a bias each),
    as the frozen trunk runs them."""
    _, frozen = freeze.partition(params, ["trunk"])
    return tree.flatten(fold.fold_frozen_norms(frozen, state, freeze.eval_norms(state, frozen))["trunk"])


def blocks(folded: dict) -> list:
    """``(name, stride)`` of every residual block, in order (torchvision's names: ``layer2.0``)."""
    names = sorted({n.rsplit(".", 2)[0] for n in folded if n.startswith("layer") and ".conv1." in n},
                   key=lambda n: tuple(int(p.removeprefix("layer")) for p in n.split(".")))
    return [(n, 2 if n.endswith(".0") and not n.startswith("layer1.") else 1) for n in names]


def folded_trunk(folded: dict, ops):
    """``images -> pooled res5`` over a ResNet's folded params (each conv a weight and a bias),
    as torchvision's ResNet computes it (the stride in a bottleneck's 3x3 conv)."""
    conv_relu, conv_add_relu = ops
    plan = blocks(folded)

    def run(x):
        p = folded
        x = F.max_pool2d(conv_relu(x, p["conv1.weight"], p["conv1.bias"], 2, 3), 3, 2, 1)
        for name, stride in plan:
            w = lambda conv: (p[f"{name}.{conv}.weight"], p[f"{name}.{conv}.bias"])
            identity = x
            if f"{name}.downsample.0.weight" in p:
                identity = F.conv2d(x, *w("downsample.0"), stride)
            if f"{name}.conv3.weight" in p:  # bottleneck
                out = conv_relu(x, *w("conv1"), 1, 0)
                out = conv_relu(out, *w("conv2"), stride, 1)
                x = conv_add_relu(out, w("conv3")[0], identity, w("conv3")[1], 1, 0)
            else:  # basic block
                out = conv_relu(x, *w("conv1"), stride, 1)
                x = conv_add_relu(out, w("conv2")[0], identity, w("conv2")[1], 1, 1)
        return x.mean((2, 3))
    return run


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--depth", type=le.resnet_arg, default=50, metavar="RESNET")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--dtype", default="bf16", help="bf16 or fp32")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=10, help="batches a round")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    autocast = precision.autocast_dtype(args.dtype, device)
    dtype = autocast or torch.float32
    loop_lib.choose_conv_algorithms({"cudnn_benchmark": True}, device)
    model, params, state, batch = le.build(args.depth, args.image_size, args.batch_size)
    params, state = (loop_lib.to_device(t, device) for t in (params, state))
    images = batch["image"].to(device)
    as_input = lambda t: t.to(dtype).contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t.to(dtype)
    folded = {n: as_input(t) for n, t in folded_weights(params, state).items()}
    x = as_input(images)

    features = ft_lib.eval_features(model, params, state, ["flatten"], batch_size=args.batch_size, autocast=autocast)
    runs = {"fpipe": lambda: features(images)["flatten"].flatten(1),  # first: its features are the reference
            "plain": functools.partial(folded_trunk(folded, plain_ops()), x)}
    if device.type == "cuda":
        runs["fused"] = functools.partial(folded_trunk(folded, fused_ops()), x)
    print(f"{le.machine()}\n== ResNet-{args.depth} frozen trunk, {args.image_size} px, batch {args.batch_size}, "
          f"{args.dtype}, {args.device}")
    with torch.no_grad():
        reference = None
        for name, run in runs.items():  # fpipe's first call compiles
            t0 = time.perf_counter()
            out = run().float()
            sync(device)
            reference = out if reference is None else reference
            error = ((out - reference).abs().max() / reference.abs().max()).item()
            print(f"{name:6s} first call {time.perf_counter() - t0:6.1f} s; largest difference from fpipe's "
                  f"features {error:.2e} of their largest value")
        times = time_rounds(runs, args.rounds, args.steps, device)
    ms = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    for name, m in ms.items():
        print(f"{name:6s} {m:8.2f} ms a batch, {args.batch_size / m * 1e3:9.0f} images/s")
    for name in runs:
        if name != "fpipe":
            print(f"{name}_vs_fpipe: {ms['fpipe'] / ms[name]:.3f}")


if __name__ == "__main__":
    main()
