"""The ResNet family (ResNet, ResNeXt, wide ResNets) as a pure trunk with torchvision's names.

``build(depth=50, ...)`` returns a :class:`Trunk` whose ``init(seed)`` gives ``(params, state)``
trees that flatten to exactly torchvision's ``state_dict`` names (without the ``fc`` classifier),
and whose ``apply`` returns the requested named features, computing only up to the deepest:

    conv1    after the stem's ReLU            res1     after the max-pool
    res2..5  after layer1..layer4              res5avg  global average pool, N×C×1×1
    flatten  N×C

Options follow VISSL's trunk: ``width_multiplier`` scales every stage (SimCLR's wide ResNets),
``groups``/``width_per_group`` make ResNeXt and torchvision's wide_resnet, ``layer4_stride``
(1 keeps res5 at res4's resolution), ``zero_init_residual``, and ``norm``. ``stem="cifar"`` is
the small-image stem: a 3×3 stride-1 ``conv1`` and no max-pool (``res1`` equals ``conv1``), so a
32 px input reaches res5 at 4×4 instead of 1×1. ``PRESETS`` name torchvision's models.
"""
import dataclasses

import torch

from fpipe.models import layers
from fpipe.models.trunk import Trunk

FEATURES = ("conv1", "res1", "res2", "res3", "res4", "res5", "res5avg", "flatten")
DEPTHS = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
    200: ("bottleneck", (3, 24, 36, 3)),
}
NORMS = ("batch", "group", "layer")
STEMS = ("imagenet", "cifar")
PRESETS = {
    "resnet18": dict(depth=18), "resnet34": dict(depth=34), "resnet50": dict(depth=50),
    "resnet101": dict(depth=101), "resnet152": dict(depth=152),
    "resnext50_32x4d": dict(depth=50, groups=32, width_per_group=4),
    "resnext101_32x8d": dict(depth=101, groups=32, width_per_group=8),
    "resnext101_64x4d": dict(depth=101, groups=64, width_per_group=4),
    "wide_resnet50_2": dict(depth=50, width_per_group=128),
    "wide_resnet101_2": dict(depth=101, width_per_group=128),
}


@dataclasses.dataclass(frozen=True)
class Spec:
    depth: int = 50
    width_multiplier: int = 1
    groups: int = 1
    width_per_group: int = 64
    zero_init_residual: bool = False
    layer4_stride: int = 2
    norm: str = "batch"
    norm_groups: int = 32  # GroupNorm groups when norm == "group"
    stem: str = "imagenet"  # or "cifar": 3×3 stride-1 conv1, no max-pool

    def __post_init__(self):
        if self.depth not in DEPTHS:
            raise ValueError(f"unknown ResNet depth {self.depth}; valid: {sorted(DEPTHS)}")
        if self.norm not in NORMS:
            raise ValueError(f"unknown norm {self.norm!r}; valid: {NORMS}")
        if self.stem not in STEMS:
            raise ValueError(f"unknown ResNet stem {self.stem!r}; valid: {STEMS}")
        if self.layer4_stride not in (1, 2):
            raise ValueError(f"layer4_stride must be 1 or 2, got {self.layer4_stride}")
        if self.block == "basic" and (self.groups != 1 or self.width_per_group != 64):
            raise ValueError(f"ResNet-{self.depth} has basic blocks, which support only groups=1 and "
                             "width_per_group=64; use depth >= 50 for ResNeXt or wide ResNets")

    @property
    def block(self):
        return DEPTHS[self.depth][0]

    @property
    def expansion(self):
        return 1 if self.block == "basic" else 4

    def planes(self, stage):  # stage 0..3
        return 64 * self.width_multiplier * 2 ** stage

    def stride(self, stage):
        return (1, 2, 2, self.layer4_stride)[stage]

    def channels(self, feature):
        """Channels of a named feature."""
        if feature in ("conv1", "res1"):
            return 64 * self.width_multiplier
        stage = 3 if feature in ("res5avg", "flatten") else int(feature[3]) - 2
        return self.planes(stage) * self.expansion


OPTIONS = {f.name: f.default for f in dataclasses.fields(Spec)}


def build(**options) -> Trunk:
    spec = Spec(**options)
    return Trunk(spec, lambda seed=0: init_params(spec, seed),
                 lambda *a, **k: apply(spec, *a, **k), FEATURES)


def init(seed=0, **options):
    """``(params, state)`` of a ResNet trunk; a convenience for ``build(**options).init(seed)``."""
    return init_params(Spec(**options), seed)


# ---------------------------------------------------------------- init
def init_params(spec: Spec, seed=0):
    gen = torch.Generator().manual_seed(seed)
    params, state = {}, {}

    def add_norm(p, s, key, channels, zero=False):
        p[key], st = layers.norm_init(spec.norm, channels, zero_scale=zero)
        if st:
            s[key] = st

    width0 = 64 * spec.width_multiplier
    params["conv1"] = layers.conv_init(gen, 3, width0, 7 if spec.stem == "imagenet" else 3)
    add_norm(params, state, "bn1", width0)
    inplanes = width0
    for stage, n_blocks in enumerate(DEPTHS[spec.depth][1]):
        planes, out = spec.planes(stage), spec.planes(stage) * spec.expansion
        lp, ls = {}, {}
        for i in range(n_blocks):
            stride = spec.stride(stage) if i == 0 else 1
            bp, bs = {}, {}
            if spec.block == "basic":
                bp["conv1"] = layers.conv_init(gen, inplanes, planes, 3)
                add_norm(bp, bs, "bn1", planes)
                bp["conv2"] = layers.conv_init(gen, planes, planes, 3)
                add_norm(bp, bs, "bn2", planes, zero=spec.zero_init_residual)
            else:
                width = int(planes * spec.width_per_group / 64) * spec.groups
                bp["conv1"] = layers.conv_init(gen, inplanes, width, 1)
                add_norm(bp, bs, "bn1", width)
                bp["conv2"] = layers.conv_init(gen, width, width, 3, groups=spec.groups)
                add_norm(bp, bs, "bn2", width)
                bp["conv3"] = layers.conv_init(gen, width, out, 1)
                add_norm(bp, bs, "bn3", out, zero=spec.zero_init_residual)
            if i == 0 and (stride != 1 or inplanes != out):
                dp, ds = {"0": layers.conv_init(gen, inplanes, out, 1)}, {}
                add_norm(dp, ds, "1", out)
                bp["downsample"] = dp
                if ds:
                    bs["downsample"] = ds
            lp[str(i)] = bp
            if bs:
                ls[str(i)] = bs
            inplanes = out
        params[f"layer{stage + 1}"] = lp
        if ls:
            state[f"layer{stage + 1}"] = ls
    return params, state


# ---------------------------------------------------------------- apply
def apply(spec: Spec, params, state, x, *, train, features=("flatten",), eval_norms=frozenset(),
          sync_stats=None):
    """Returns ``({feature: tensor}, new_state)`` for the requested ``features``.

    ``train`` selects batch statistics for norm layers; norm layers named in ``eval_norms``
    (dotted names such as ``bn1`` or ``layer1.0.downsample.1``, e.g. frozen ones) use running
    statistics regardless and keep their state unchanged. ``sync_stats``: SyncBN's all-reduce
    (see ``layers.batch_norm``) for the norm layers that train.
    """
    unknown = [f for f in features if f not in FEATURES]
    if unknown:
        raise ValueError(f"unknown trunk feature(s) {unknown}; valid: {FEATURES}")
    deepest = max(FEATURES.index(f) for f in features)
    out, new_state = {}, {}
    norm = _norm(spec, train, eval_norms, sync_stats)

    def emit(name, h):
        if name in features:
            out[name] = h
        return FEATURES.index(name) >= deepest

    imagenet = spec.stem == "imagenet"
    h = layers.conv(params["conv1"], x, stride=2 if imagenet else 1, padding=3 if imagenet else 1)
    h = torch.relu(norm(params, state, new_state, "bn1", h, "bn1"))
    if emit("conv1", h):
        return out, _keep_rest(state, new_state)
    h = layers.max_pool(h) if imagenet else h
    if emit("res1", h):
        return out, _keep_rest(state, new_state)
    for stage in range(4):
        h = _stage(spec, params, state, new_state, h, stage, norm)
        if emit(f"res{stage + 2}", h):
            return out, _keep_rest(state, new_state)
    h = torch.mean(h, dim=(2, 3), keepdim=True)
    if emit("res5avg", h):
        return out, _keep_rest(state, new_state)
    emit("flatten", torch.flatten(h, 1))
    return out, _keep_rest(state, new_state)


def apply_stage(spec: Spec, params, state, x, stage, *, train, eval_norms=frozenset(), sync_stats=None):
    """``(output, new_state)`` of stage ``stage`` alone (0..3: ``layer1``..``layer4``) on ``x``;
    ``params``/``state`` hold ``layer<stage + 1>`` under that name, ``eval_norms`` names as in
    :func:`apply` (``layer4.0.bn1``). A C4 detector's box head is res5 on the pooled RoIs."""
    new_state = {}
    h = _stage(spec, params, state, new_state, x, stage, _norm(spec, train, eval_norms, sync_stats))
    return h, _keep_rest(state, new_state)


def _norm(spec, train, eval_norms, sync_stats):
    """``norm(p, s, ns, key, h, name)``: the norm layer ``p[key]`` (dotted ``name``) on ``h``; its
    new statistics go to ``ns[key]``; a layer in ``eval_norms`` uses its running statistics."""
    def norm(p, s, ns, key, h, name):
        if key not in p:  # folded into the preceding conv (fpipe.models.fold)
            return h
        y, ns_key = layers.norm(spec.norm, p[key], s.get(key), h, train and name not in eval_norms,
                                spec.norm_groups, sync_stats)
        if ns_key:
            ns[key] = ns_key
        return y
    return norm


def _stage(spec, params, state, new_state, h, stage, norm):
    """The blocks of ``layer<stage + 1>`` on ``h``; their new statistics into ``new_state``."""
    lname = f"layer{stage + 1}"
    lp, ls, lns = params[lname], state.get(lname, {}), {}
    for i in range(len(lp)):
        bname = f"{lname}.{i}"
        bns = {}
        h = _block(spec, lp[str(i)], ls.get(str(i), {}), bns, h, spec.stride(stage) if i == 0 else 1,
                   lambda p, s, ns, k, t, b=bname, under="": norm(p, s, ns, k, t, f"{b}.{under}{k}"))
        if bns:
            lns[str(i)] = bns
    if lns:
        new_state[lname] = lns
    return h


def _block(spec, p, s, ns, x, stride, norm):
    if spec.block == "basic":
        h = torch.relu(norm(p, s, ns, "bn1", layers.conv(p["conv1"], x, stride, 1)))
        h = norm(p, s, ns, "bn2", layers.conv(p["conv2"], h, 1, 1))
    else:
        h = torch.relu(norm(p, s, ns, "bn1", layers.conv(p["conv1"], x)))
        h = torch.relu(norm(p, s, ns, "bn2", layers.conv(p["conv2"], h, stride, 1, spec.groups)))
        h = norm(p, s, ns, "bn3", layers.conv(p["conv3"], h))
    if "downsample" in p:
        dns = {}
        x = norm(p["downsample"], s.get("downsample", {}), dns, "1", layers.conv(p["downsample"]["0"], x, stride),
                 under="downsample.")
        if dns:
            ns["downsample"] = dns
    return torch.relu(h + x)


def _keep_rest(old, new):
    """State of layers that did not run (features cut early) comes back unchanged."""
    merged = dict(old)
    for k, v in new.items():
        merged[k] = _keep_rest(old[k], v) if isinstance(v, dict) and isinstance(old.get(k), dict) else v
    return merged
