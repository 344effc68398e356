"""RegNet X/Y (torchvision's names; VISSL's and SEER's explicit parameters) as a pure trunk.

A RegNet is given by ``depth, w_0, w_a, w_m, group_width`` (+ ``bottleneck_multiplier``,
``se_ratio``, ``stem_width``): a linear width ramp ``w_0 + w_a * i`` per block, quantised in
log-space with base ``w_m`` to multiples of 8, grouped into stages of equal width, then made
compatible with the group width — exactly torchvision's ``BlockParams.from_init_params`` (in
float32 torch arithmetic, so the rounding agrees). Features (VISSL's names):

    conv1    after the stem (3×3 stride-2 conv, BN, ReLU)     res2..5  after block1..block4
    res5avg  global average pool, N×C×1×1                     flatten  N×C
"""
import dataclasses
import math

import torch

from fpipe.models import layers
from fpipe.models import trunk as trunk_lib

FEATURES = ("conv1", "res2", "res3", "res4", "res5", "res5avg", "flatten")
OPTIONS = dict(depth=16, w_0=48, w_a=27.89, w_m=2.09, group_width=8, bottleneck_multiplier=1.0,
               se_ratio=0.25, stem_width=32)  # regnet_y_400mf
_Y, _X = dict(se_ratio=0.25), dict(se_ratio=0.0)
PRESETS = {
    "regnet_y_400mf": dict(depth=16, w_0=48, w_a=27.89, w_m=2.09, group_width=8, **_Y),
    "regnet_y_800mf": dict(depth=14, w_0=56, w_a=38.84, w_m=2.4, group_width=16, **_Y),
    "regnet_y_1_6gf": dict(depth=27, w_0=48, w_a=20.71, w_m=2.65, group_width=24, **_Y),
    "regnet_y_3_2gf": dict(depth=21, w_0=80, w_a=42.63, w_m=2.66, group_width=24, **_Y),
    "regnet_y_8gf": dict(depth=17, w_0=192, w_a=76.82, w_m=2.19, group_width=56, **_Y),
    "regnet_y_16gf": dict(depth=18, w_0=200, w_a=106.23, w_m=2.48, group_width=112, **_Y),
    "regnet_y_32gf": dict(depth=20, w_0=232, w_a=115.89, w_m=2.53, group_width=232, **_Y),
    "regnet_y_128gf": dict(depth=27, w_0=456, w_a=160.83, w_m=2.52, group_width=264, **_Y),
    "regnet_y_256gf": dict(depth=27, w_0=640, w_a=230.83, w_m=2.53, group_width=373, **_Y),  # SEER (VISSL)
    "regnet_x_400mf": dict(depth=22, w_0=24, w_a=24.48, w_m=2.54, group_width=16, **_X),
    "regnet_x_800mf": dict(depth=16, w_0=56, w_a=35.73, w_m=2.28, group_width=16, **_X),
    "regnet_x_1_6gf": dict(depth=18, w_0=80, w_a=34.01, w_m=2.25, group_width=24, **_X),
    "regnet_x_3_2gf": dict(depth=25, w_0=88, w_a=26.31, w_m=2.25, group_width=48, **_X),
    "regnet_x_8gf": dict(depth=23, w_0=80, w_a=49.56, w_m=2.88, group_width=120, **_X),
    "regnet_x_16gf": dict(depth=22, w_0=216, w_a=55.59, w_m=2.1, group_width=128, **_X),
    "regnet_x_32gf": dict(depth=23, w_0=320, w_a=69.86, w_m=2.0, group_width=168, **_X),
}


@dataclasses.dataclass(frozen=True)
class Spec:
    depth: int = OPTIONS["depth"]
    w_0: int = OPTIONS["w_0"]
    w_a: float = OPTIONS["w_a"]
    w_m: float = OPTIONS["w_m"]
    group_width: int = OPTIONS["group_width"]
    bottleneck_multiplier: float = OPTIONS["bottleneck_multiplier"]
    se_ratio: float = OPTIONS["se_ratio"]  # 0: RegNetX (no squeeze-excitation)
    stem_width: int = OPTIONS["stem_width"]
    stages: tuple = dataclasses.field(init=False)  # ((width, depth, group_width), ...) per stage

    def __post_init__(self):  # computed once, outside any compiled code
        object.__setattr__(self, "stages", block_params(self.depth, self.w_0, self.w_a, self.w_m,
                                                        self.group_width, self.bottleneck_multiplier))
        n = len(self.stages)
        if n != 4:
            raise ValueError(f"RegNet(depth={self.depth}, w_0={self.w_0}, w_a={self.w_a}, w_m={self.w_m}) has "
                             f"{n} stages; fpipe's features res2..res5 need 4: adjust w_a or w_m")

    def channels(self, feature):
        return self.stem_width if feature == "conv1" else self.stages[min(FEATURES.index(feature), 4) - 1][0]


def block_params(depth, w_0, w_a, w_m, group_width, bottleneck_multiplier=1.0):
    """Per-stage ``(width, depth, group_width)`` from the RegNet design parameters."""
    if w_a < 0 or w_0 <= 0 or w_m <= 1 or w_0 % 8:
        raise ValueError(f"invalid RegNet parameters w_0={w_0}, w_a={w_a}, w_m={w_m}: need w_a >= 0, "
                         "w_0 > 0 and a multiple of 8, w_m > 1")
    ramp = torch.arange(depth) * w_a + w_0  # float32, as torchvision computes it
    steps = torch.round(torch.log(ramp / w_0) / math.log(w_m))
    block_widths = (torch.round(w_0 * torch.pow(w_m, steps) / 8) * 8).int().tolist()
    widths, depths = [], []
    for w in block_widths:  # one stage per run of equal widths
        if widths and widths[-1] == w:
            depths[-1] += 1
        else:
            widths.append(w)
            depths.append(1)
    out = []
    for w, d in zip(widths, depths):
        bottleneck = int(w * bottleneck_multiplier)
        group = min(group_width, bottleneck)
        out.append((int(_make_divisible(bottleneck, group) / bottleneck_multiplier), d, group))
    return tuple(out)


def _make_divisible(v, divisor):
    new = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * v else new


def build(**options) -> trunk_lib.Trunk:
    spec = Spec(**options)
    return trunk_lib.Trunk(spec, lambda seed=0: init_params(spec, seed),
                           lambda *a, **k: apply(spec, *a, **k), FEATURES)


def _blocks(spec):
    """``(stage, name, width_in, width_out, stride, groups)`` of every block, stage by stage."""
    width_in = spec.stem_width
    for s, (width, depth, group) in enumerate(spec.stages, start=1):
        for i in range(depth):
            w_b = int(round(width * spec.bottleneck_multiplier))
            yield s, f"trunk_output.block{s}.block{s}-{i}", width_in, width, 2 if i == 0 else 1, w_b // group
            width_in = width


def init_params(spec: Spec, seed=0):
    b = trunk_lib.Builder(seed)
    b.conv("stem.0", 3, spec.stem_width, 3)
    b.batch_norm("stem.1", spec.stem_width)
    for _, name, w_in, w_out, stride, groups in _blocks(spec):
        if w_in != w_out or stride != 1:
            b.conv(f"{name}.proj.0", w_in, w_out, 1)
            b.batch_norm(f"{name}.proj.1", w_out)
        w_b = int(round(w_out * spec.bottleneck_multiplier))
        b.conv(f"{name}.f.a.0", w_in, w_b, 1)
        b.batch_norm(f"{name}.f.a.1", w_b)
        b.conv(f"{name}.f.b.0", w_b, w_b, 3, groups=groups)
        b.batch_norm(f"{name}.f.b.1", w_b)
        if spec.se_ratio:
            b.squeeze_excite(f"{name}.f.se", w_b, int(round(spec.se_ratio * w_in)))
        b.conv(f"{name}.f.c.0", w_b, w_out, 1)
        b.batch_norm(f"{name}.f.c.1", w_out)
    return b.trees()


def apply(spec: Spec, params, state, x, *, train, features=("flatten",), eval_norms=frozenset(),
          sync_stats=None):
    """``({feature: tensor}, new_state)``; see fpipe.models.trunk.Trunk for the arguments."""
    bn = trunk_lib.BatchNorms(state, train=train, eval_norms=eval_norms, sync_stats=sync_stats)

    def conv_bn(name, h, stride=1, padding=0, groups=1):
        p = trunk_lib.child(params, name)
        return bn(p.get("1", {}), f"{name}.1", layers.conv(p["0"], h, stride, padding, groups))

    def block(name, h, stride, groups):
        p = trunk_lib.child(params, name)
        f = torch.relu(conv_bn(f"{name}.f.a", h))
        f = torch.relu(conv_bn(f"{name}.f.b", f, stride, 1, groups))
        if "se" in p["f"]:
            f = trunk_lib.squeeze_excite(p["f"]["se"], f, torch.relu)
        f = conv_bn(f"{name}.f.c", f)
        shortcut = conv_bn(f"{name}.proj", h, stride) if "proj" in p else h
        return torch.relu(shortcut + f)

    def stage(s):
        def run_stage(h):
            for stage_index, name, _, _, stride, groups in _blocks(spec):
                if stage_index == s:
                    h = block(name, h, stride, groups)
            return h
        return run_stage

    stages = [("conv1", lambda h: torch.relu(conv_bn("stem", h, 2, 1)))]
    stages += [(f"res{s + 1}", stage(s)) for s in range(1, 5)]
    stages += [("res5avg", lambda h: torch.mean(h, dim=(2, 3), keepdim=True)),
               ("flatten", lambda h: torch.flatten(h, 1))]
    return trunk_lib.run(stages, x, features), bn.state()
