"""EfficientNet B0..B7 (torchvision's names and width/depth multipliers) as a pure trunk.

Stages of MBConv blocks (1×1 expand, depthwise k×k, squeeze-excitation, 1×1 project, SiLU) with
widths scaled by ``width_mult`` (rounded to multiples of 8) and depths by ``depth_mult``
(rounded up). Features, named after torchvision's ``features.<i>``:

    stem         features.0, the stride-2 3×3 conv       stage1..7  features.1..7
    head_conv    features.8, the last 1×1 conv (4× the last stage's width)
    avgpool      N×C×1×1                                  flatten    N×C

Stochastic depth (``stochastic_depth_prob``, torchvision trains with 0.2, rising linearly over the
blocks) is off by default; when set it acts in train mode only, drawing from torch's global
generator (reproducible under ``torch.manual_seed``). B5..B7 use torchvision's BatchNorm settings
for them (eps 1e-3, momentum 0.01).

``padding="same"`` pads as TensorFlow does (timm's ``tf_efficientnet_*``, ported from Google's
checkpoints): a stride-2 conv pads ``max((ceil(H/2) - 1) * 2 + k - H, 0)`` rows, the extra one
at the bottom and right, where torchvision pads ``k // 2`` on each side. The two hold the same
tensors but compute other features, so the ``tf_efficientnet_b*`` presets (BatchNorm eps 1e-3,
as timm builds them) must be named to load such a file right.
"""
import dataclasses
import math

import torch
import torch.nn.functional as F

from fpipe.models import layers
from fpipe.models import trunk as trunk_lib

FEATURES = ("stem",) + tuple(f"stage{i}" for i in range(1, 8)) + ("head_conv", "avgpool", "flatten")
OPTIONS = dict(width_mult=1.0, depth_mult=1.0, stochastic_depth_prob=0.0, norm_eps=1e-5, norm_momentum=0.1,
               padding="symmetric")
PADDINGS = ("symmetric", "same")  # torchvision's k // 2 on each side, or TensorFlow's "same"
_B5 = dict(norm_eps=1e-3, norm_momentum=0.01)
_TF = dict(padding="same", norm_eps=1e-3)  # timm's tf_efficientnet_*: BatchNorm momentum left at 0.1
PRESETS = {
    "efficientnet_b0": dict(width_mult=1.0, depth_mult=1.0),
    "efficientnet_b1": dict(width_mult=1.0, depth_mult=1.1),
    "efficientnet_b2": dict(width_mult=1.1, depth_mult=1.2),
    "efficientnet_b3": dict(width_mult=1.2, depth_mult=1.4),
    "efficientnet_b4": dict(width_mult=1.4, depth_mult=1.8),
    "efficientnet_b5": dict(width_mult=1.6, depth_mult=2.2, **_B5),
    "efficientnet_b6": dict(width_mult=1.8, depth_mult=2.6, **_B5),
    "efficientnet_b7": dict(width_mult=2.0, depth_mult=3.1, **_B5),
}
PRESETS.update({f"tf_{name}": {"width_mult": p["width_mult"], "depth_mult": p["depth_mult"], **_TF}
                for name, p in list(PRESETS.items())})
# (expand ratio, kernel, stride, in channels, out channels, blocks) of B0's seven stages
STAGES = ((1, 3, 1, 32, 16, 1), (6, 3, 2, 16, 24, 2), (6, 5, 2, 24, 40, 2), (6, 3, 2, 40, 80, 3),
          (6, 5, 1, 80, 112, 3), (6, 5, 2, 112, 192, 4), (6, 3, 1, 192, 320, 1))


def _round8(channels):
    """Nearest multiple of 8, never more than 10% below (torchvision's _make_divisible)."""
    new = max(8, int(channels + 4) // 8 * 8)
    return new + 8 if new < 0.9 * channels else new


@dataclasses.dataclass(frozen=True)
class Block:
    name: str
    in_ch: int
    expanded: int
    out_ch: int
    kernel: int
    stride: int
    squeeze: int
    drop: float  # stochastic depth probability

    @property
    def residual(self):
        return self.stride == 1 and self.in_ch == self.out_ch


@dataclasses.dataclass(frozen=True)
class Spec:
    width_mult: float = OPTIONS["width_mult"]
    depth_mult: float = OPTIONS["depth_mult"]
    stochastic_depth_prob: float = OPTIONS["stochastic_depth_prob"]
    norm_eps: float = OPTIONS["norm_eps"]
    norm_momentum: float = OPTIONS["norm_momentum"]
    padding: str = OPTIONS["padding"]

    def __post_init__(self):
        if self.padding not in PADDINGS:
            raise ValueError(f"model.trunk.padding={self.padding!r}; valid: {', '.join(PADDINGS)}")

    @property
    def stem_width(self):
        return _round8(STAGES[0][3] * self.width_mult)

    @property
    def head_width(self):
        return 4 * _round8(STAGES[-1][4] * self.width_mult)

    def stages(self):
        """Per stage, its blocks (:class:`Block`), as torchvision builds them."""
        counts = [int(math.ceil(n * self.depth_mult)) for *_, n in STAGES]
        total, index, out = sum(counts), 0, []
        for s, ((expand, kernel, stride, cin, cout, _), n) in enumerate(zip(STAGES, counts), start=1):
            cin, cout = _round8(cin * self.width_mult), _round8(cout * self.width_mult)
            blocks = []
            for i in range(n):
                in_ch = cin if i == 0 else cout
                blocks.append(Block(f"features.{s}.{i}", in_ch, _round8(in_ch * expand), cout, kernel,
                                    stride if i == 0 else 1, max(1, in_ch // 4),
                                    self.stochastic_depth_prob * index / total))
                index += 1
            out.append(tuple(blocks))
        return tuple(out)


def same_padding(size, kernel: int, stride: int) -> tuple:
    """TensorFlow's "same" padding of an ``size`` (H, W) input as ``F.pad``'s (left, right, top,
    bottom): the output is ceil(size / stride), the odd row or column of padding at the end."""
    out = []
    for n in reversed(tuple(size)):  # W first, as F.pad takes them
        total = max((math.ceil(n / stride) - 1) * stride + kernel - n, 0)
        out += [total // 2, total - total // 2]
    return tuple(out)


def build(**options) -> trunk_lib.Trunk:
    spec = Spec(**options)
    return trunk_lib.Trunk(spec, lambda seed=0: init_params(spec, seed),
                           lambda *a, **k: apply(spec, *a, **k), FEATURES)


def _layers(block):
    """``(index, kind)`` of a block's sub-layers in ``block.<index>``: expand (unless the ratio is
    1), depthwise, se, project."""
    kinds = (("expand",) if block.expanded != block.in_ch else ()) + ("depthwise", "se", "project")
    return tuple(enumerate(kinds))


def init_params(spec: Spec, seed=0):
    b = trunk_lib.Builder(seed)
    b.conv("features.0.0", 3, spec.stem_width, 3)
    b.batch_norm("features.0.1", spec.stem_width)
    for blocks in spec.stages():
        for blk in blocks:
            for i, kind in _layers(blk):
                name = f"{blk.name}.block.{i}"
                if kind == "se":
                    b.squeeze_excite(name, blk.expanded, blk.squeeze)
                    continue
                cin, cout, k, groups = {"expand": (blk.in_ch, blk.expanded, 1, 1),
                                        "depthwise": (blk.expanded, blk.expanded, blk.kernel, blk.expanded),
                                        "project": (blk.expanded, blk.out_ch, 1, 1)}[kind]
                b.conv(f"{name}.0", cin, cout, k, groups=groups)
                b.batch_norm(f"{name}.1", cout)
    last = spec.stages()[-1][-1].out_ch
    b.conv("features.8.0", last, spec.head_width, 1)
    b.batch_norm("features.8.1", spec.head_width)
    return b.trees()


def apply(spec: Spec, params, state, x, *, train, features=("flatten",), eval_norms=frozenset(),
          sync_stats=None):
    """``({feature: tensor}, new_state)``; see fpipe.models.trunk.Trunk for the arguments."""
    bn = trunk_lib.BatchNorms(state, train=train, eval_norms=eval_norms, sync_stats=sync_stats,
                              momentum=spec.norm_momentum, eps=spec.norm_eps)

    def conv_bn(name, h, stride=1, groups=1, act=True):
        p = trunk_lib.child(params, name)
        k = p["0"]["weight"].shape[-1]
        if spec.padding == "same" and stride > 1:
            h, pad = F.pad(h, same_padding(h.shape[-2:], k, stride)), 0
        else:
            pad = (k - 1) // 2
        h = bn(p.get("1", {}), f"{name}.1", layers.conv(p["0"], h, stride, pad, groups))
        return F.silu(h) if act else h

    def mbconv(blk, h):
        y = h
        for i, kind in _layers(blk):
            name = f"{blk.name}.block.{i}"
            if kind == "se":
                y = trunk_lib.squeeze_excite(trunk_lib.child(params, name), y, F.silu)
            elif kind == "depthwise":
                y = conv_bn(name, y, blk.stride, blk.expanded)
            else:
                y = conv_bn(name, y, act=kind == "expand")
        return trunk_lib.stochastic_depth(y, blk.drop, train) + h if blk.residual else y

    def stage(blocks):
        def run_stage(h):
            for blk in blocks:
                h = mbconv(blk, h)
            return h
        return run_stage

    stages = [("stem", lambda h: conv_bn("features.0", h, stride=2))]
    stages += [(f"stage{s}", stage(blocks)) for s, blocks in enumerate(spec.stages(), start=1)]
    stages += [("head_conv", lambda h: conv_bn("features.8", h)),
               ("avgpool", lambda h: torch.mean(h, dim=(2, 3), keepdim=True)),
               ("flatten", lambda h: torch.flatten(h, 1))]
    return trunk_lib.run(stages, x, features), bn.state()
