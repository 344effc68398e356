"""Per-channel sums of channels-last activations, one image row at a time: BatchNorm's reductions.

A BatchNorm over a channels-last (NHWC) activation reduces it to one value per channel: its mean
and variance in the forward, the sums of the gradient and of gradient × input in the backward.
Inductor (torch 2.13, CPU) writes each such reduction with the channel blocks outermost: every
block of 16 channels is a pass over all N·H·W rows that reads 64 bytes per row (at 224 px, 64 bytes
every 1 KB of a 103 MB tensor). This inductor graph pass sums each image row first (its W pixels,
contiguous in memory), then the N·H row sums: the same values, with the large read streamed in
order. The variance comes from the rows' variances and means (the law of total variance; every row
has W pixels), as stable as one Welford pass.

On the Intel CPU measured (docs/BENCHMARKS.md, twenty-sixth session) a BatchNorm + ReLU forward
and backward ran 10-25% faster from 64 channels and 8 pixels a row up, ResNet-50 train steps 2-5%
faster at 64-224 px; on an AMD Zen 5 (family 26; thirty-third session) ResNet-50's step 1.6%
faster at 64 px and 2.5% at 224 px, the two steps interleaved in one process; on an AMD Zen 3
(family 25, AVX2 only; sixty-third session) 4-7% faster at 64, 128 and 224 px; on an AMD Zen 4
(family 25 with AVX-512; sixty-fourth session) 3-4% faster at 64 px, 1% at 224 px and even at
128 px (an earlier version of the split had been slower there, twenty-third session). The pass
runs where it was measured (``runs_on``): Intel CPUs and AMD's from family 25 (Zen 3) up.
"""
import contextlib
import hashlib
import operator
import pathlib

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass

from fpipe.models import layers

aten = torch.ops.aten
MIN_CHANNELS = 64  # fewer: a row of the strided pass is a cache line or two, already streamed
MIN_ROW = 8        # narrower rows: the per-row partial sums cost what the split saves


def runs_on(vendor: str, family: int) -> bool:
    """Whether the pass runs on this kind of CPU: where it was measured, not slower (above)."""
    return vendor == "GenuineIntel" or (vendor == "AuthenticAMD" and family >= 25)


ON_THIS_CPU = runs_on(layers.cpu_vendor(), layers.cpu_family())


def _splittable(node):
    """(N, C, H, W) when ``node`` is a float32 channels-last CPU activation worth splitting."""
    val = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    if not isinstance(val, torch.Tensor) or val.dim() != 4 or val.dtype != torch.float32 or val.device.type != "cpu":
        return None
    shape = tuple(val.shape)
    if not all(isinstance(d, int) for d in shape):
        return None
    _, c, _, w = shape
    channels_last = val.is_contiguous(memory_format=torch.channels_last) and not val.is_contiguous()
    return shape if channels_last and c >= MIN_CHANNELS and w >= MIN_ROW else None


def _over_nhw(node):
    dims = node.args[1] if len(node.args) > 1 else None
    return isinstance(dims, (list, tuple)) and sorted(dims) == [0, 2, 3]


def _emit(graph, target, *args, **kwargs):
    """A new node, with the fake value inductor's lowering reads (``meta["val"]``)."""
    node = graph.call_function(target, args, kwargs)
    vals = [a.meta["val"] if isinstance(a, torch.fx.Node) else a for a in args]
    with torch._guards.detect_fake_mode(vals) or contextlib.nullcontext():
        node.meta["val"] = target(*vals, **kwargs)
    return node


def _rows(graph, x, shape):
    """``x`` (N, C, H, W), channels-last, viewed as its N·H image rows: (N·H, W, C), no copy."""
    n, c, h, w = shape
    return _emit(graph, aten.view.default, _emit(graph, aten.permute.default, x, [0, 2, 3, 1]), [n * h, w, c])


def _split_sum(graph, node, shape):
    keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
    rows = _emit(graph, aten.sum.dim_IntList, _rows(graph, node.args[0], shape), [1])
    total = _emit(graph, aten.sum.dim_IntList, rows, [0])
    return _emit(graph, aten.view.default, total, [1, shape[1], 1, 1]) if keepdim else total


def _split_var_mean(graph, node, shape):
    rows = _emit(graph, aten.var_mean.correction, _rows(graph, node.args[0], shape), [1], correction=0)
    row_var, row_mean = (_emit(graph, operator.getitem, rows, i) for i in (0, 1))
    across = _emit(graph, aten.var_mean.correction, row_mean, [0], correction=0)
    var_of_means, mean = (_emit(graph, operator.getitem, across, i) for i in (0, 1))
    var = _emit(graph, aten.add.Tensor, _emit(graph, aten.mean.dim, row_var, [0]), var_of_means)
    return [_emit(graph, aten.view.default, v, [1, shape[1], 1, 1]) for v in (var, mean)]


def split_row_sums(graph) -> int:
    """Rewrites ``sum`` and ``var_mean`` (correction 0, keepdim) over dims (0, 2, 3) of splittable
    activations in an ATen FX graph; returns how many it rewrote."""
    count = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in (aten.sum.dim_IntList, aten.var_mean.correction):
            continue
        shape = _splittable(node.args[0]) if _over_nhw(node) else None
        if shape is None:
            continue
        if node.target is aten.sum.dim_IntList:
            if node.kwargs.get("dtype") is not None:
                continue
            with graph.inserting_before(node):
                total = _split_sum(graph, node, shape)
            node.replace_all_uses_with(total)
        else:
            if node.kwargs.get("correction") != 0 or not node.kwargs.get("keepdim", False):
                continue
            if not all(u.target is operator.getitem for u in node.users):
                continue
            with graph.inserting_before(node):
                outs = _split_var_mean(graph, node, shape)
            for user in list(node.users):
                user.replace_all_uses_with(outs[user.args[1]])
                graph.erase_node(user)
        graph.erase_node(node)
        count += 1
    return count


class RowSums(CustomGraphPass):
    """``split_row_sums`` as an inductor post-grad pass (runs before inductor's own)."""

    def __call__(self, graph):
        split_row_sums(graph)
        graph.lint()

    def uuid(self):  # inductor's cache key: this file
        return hashlib.sha256(pathlib.Path(__file__).read_bytes()).hexdigest()


def options():
    """The inductor options that add the pass where it runs (``ON_THIS_CPU``), else none."""
    return {"post_grad_custom_pre_pass": RowSums()} if ON_THIS_CPU else {}
