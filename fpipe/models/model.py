"""A model = a trunk + named heads, built from ``config.model``; registries of trunk and head names.

Each head reads one named trunk feature, optionally pools it to a fixed grid (VISSL's linear
evaluation on several layers), and runs a chain of head layers. The trunk runs once, only up to
the deepest feature any head reads. Params and state are ``{"trunk": ..., "heads": {name: ...}}``.
"""
import difflib
from typing import Callable, NamedTuple

import torch

from fpipe import defaults
from fpipe.models import heads as heads_lib
from fpipe.models import losses
from fpipe.models import alexnet, convnext, efficientnet, layers, regnet, resnet, swin, vit
from fpipe.models import trunk as trunk_lib
from fpipe.models.trunk import Trunk

# Trunk families by name. A family module has FEATURES, OPTIONS (option -> default), PRESETS
# (torchvision/timm name -> options) and build(**options) -> Trunk; registering one is one line.
TRUNKS = {"resnet": resnet, "regnet": regnet, "efficientnet": efficientnet, "convnext": convnext,
          "alexnet": alexnet, "vit": vit, "swin": swin}
HEAD_KEYS = ("feature", "pool", "pool_type", "type", "dims", "chain", "vissl_dims", "towers", "crops",
             "target", "loss", "loss_weight") + tuple(heads_lib.MLP_OPTIONS)


def trunk_presets():
    """``{preset name: (family, options)}`` over every registered family."""
    return {preset: (family, options) for family, module in TRUNKS.items()
            for preset, options in module.PRESETS.items()}


def trunk_option_types():
    """``{option: type}``: every option of every family (int and float together are float)."""
    types = {}
    for family, module in TRUNKS.items():
        for option, default in module.OPTIONS.items():
            kind = type(default)
            if default is None:
                raise TypeError(f"{family} option {option!r} defaults to None; give it a typed default "
                                "(the config's placeholder takes its type)")
            seen = types.setdefault(option, kind)
            if seen != kind:
                if {seen, kind} != {int, float}:
                    raise TypeError(f"trunk option {option!r} is {seen.__name__} in one family and "
                                    f"{kind.__name__} in {family}; give families' shared options one type")
                types[option] = float
    return types


def build_trunk(name, **options) -> Trunk:
    """The trunk ``name``: a family (``resnet``, ``regnet``, ...) with its defaults, or a preset
    of any family (``resnet50``, ``regnet_y_400mf``, ``convnext_tiny``, ...). ``options`` set
    (not None) override the family's or preset's; one the family does not take is an error."""
    presets = trunk_presets()
    if name in TRUNKS:
        family, base = name, {}
    elif name in presets:
        family, base = presets[name]
    else:
        close = difflib.get_close_matches(name, list(TRUNKS) + list(presets), n=3)
        hint = f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""
        raise ValueError(f"unknown model.trunk.name {name!r}{hint}; valid families: {sorted(TRUNKS)}; "
                         f"presets: {sorted(presets)}")
    options = {k: v for k, v in options.items() if v is not None}
    module = TRUNKS[family]
    unknown = sorted(set(options) - set(module.OPTIONS))
    if unknown:
        raise ValueError(f"model.trunk.name={name!r} ({family}) takes no option(s) {unknown}; "
                         f"{family}'s options: {sorted(module.OPTIONS)}")
    return module.build(**{**base, **options})


trunk_config = defaults.trunk  # config.model.trunk (torch-free, for config files)
head_config = defaults.head    # config.model.heads.<name>


class Head(NamedTuple):
    name: str
    feature: str
    pool: tuple | None
    pool_type: str
    layers: tuple  # of (type, options) applied in sequence
    towers: int = 1  # VISSL's siamese_concat_view: each sample's crops concatenated (num_towers)
    crops: tuple = ()  # (first, count) of the crops it reads (multi-input); (): all of them
    target: str = "label"  # the batch key it learns (multi-task: the dataset's extra targets)
    loss: str = "cross_entropy"  # fpipe.models.losses
    loss_weight: float = 1.0  # its share of the summed loss


class Model(NamedTuple):
    trunk: Trunk             # spec, init, apply, features (valid feature names)
    heads: tuple
    init: Callable
    apply: Callable         # (params, state, images, *, train, ...) -> ({head: logits}, state)
    apply_heads: Callable   # (params, state, features, *, train, ...) -> the same, from trunk features
    features: Callable
    init_heads: Callable    # seed -> (head params, head state), as ``init`` draws them


def build(model_cfg, *, num_classes, image_size, target_sizes=None) -> Model:
    """Builds the trunk and heads named in ``model_cfg``; ``image_size`` sizes the heads' inputs.
    ``target_sizes``: ``{target: classes or columns}`` of the dataset's extra targets (None: any
    target name is accepted, sized 2 — for checking a config before the data is read)."""
    tcfg = dict(model_cfg.trunk)
    trunk = build_trunk(tcfg.pop("name"), **tcfg)
    heads = tuple(_parse_head(n, dict(h), num_classes, trunk.features, target_sizes)
                  for n, h in dict(model_cfg.get("heads", {})).items())
    shapes = _feature_shapes(trunk, {h.feature for h in heads}, image_size)
    heads = tuple(_from_vissl_dims(h, _pooled_shape(h, shapes[h.feature])) for h in heads)
    read = tuple(sorted({h.feature for h in heads}))  # the features the heads read

    def init(seed=0):
        params, state = trunk.init(seed)
        hp, hs = init_heads(seed)
        return {"trunk": params, "heads": hp}, {"trunk": state, "heads": hs}

    def init_heads(seed=0):
        gen = torch.Generator().manual_seed(seed + 1)
        hp, hs = {}, {}
        for h in heads:
            hp[h.name], hs[h.name] = _init_head(gen, h, shapes[h.feature])
        return hp, hs

    def apply(params, state, images, *, train, eval_norms=frozenset(), sync_stats=None):
        """``({head: logits}, new_state)``; norm layers named in ``eval_norms`` use running stats;
        ``sync_stats`` makes training BatchNorms synchronous across processes (SyncBN).
        ``images``: a batch, or a tuple of crops (multi-crop, see :func:`over_views`)."""
        trunk_state = state.get("trunk", {})

        def run_trunk(x):
            nonlocal trunk_state
            feats, trunk_state = trunk.apply(params["trunk"], trunk_state, x, train=train, features=read,
                                             eval_norms=_under("trunk", eval_norms), sync_stats=sync_stats)
            return feats

        feats = over_views(run_trunk, images)
        return apply_heads(params, {**state, "trunk": trunk_state}, feats, train=train,
                           eval_norms=eval_norms, sync_stats=sync_stats)

    apply_heads = apply_heads_of(heads)

    def features(params, state, images, names=("flatten",)):
        """Trunk features in eval mode, for feature extraction."""
        return over_views(lambda x: trunk.apply(params["trunk"], state.get("trunk", {}), x, train=False,
                                                features=tuple(names))[0], images)

    return Model(trunk, heads, init, apply, apply_heads, features, init_heads)


def apply_heads_of(heads):
    """``apply_heads(params, state, feats, *, train, ...)``: ``heads`` alone on trunk features
    ``{name: tensor}`` (each pooled as its head says), the trunk state passing through."""
    def apply_heads(params, state, feats, *, train, eval_norms=frozenset(), sync_stats=None):
        outputs, head_states = {}, {}
        for h in heads:
            x = _head_input(h, feats)
            outputs[h.name], head_states[h.name] = _apply_head(
                h, params["heads"][h.name], state.get("heads", {}).get(h.name, {}), x, train,
                _under(f"heads.{h.name}", eval_norms), sync_stats)
        return outputs, {"trunk": state.get("trunk", {}), "heads": head_states}
    return apply_heads


def head_inputs(heads) -> dict:
    """``{input name: (feature, pool, pool_type)}``: what the heads read, each feature as pooled for
    its heads (a pooled input is named ``<feature>/<pool_type><h>x<w>``; an unpooled one, as its
    feature). A frozen trunk computes these (fpipe.train.frozen_trunk), so its output and the
    heads' step carry pooled grids, not whole feature maps."""
    return {_input_name(h): (h.feature, h.pool, h.pool_type) for h in heads}


def reading_inputs(heads) -> tuple:
    """``heads`` reading :func:`head_inputs`' names, already pooled."""
    return tuple(h._replace(feature=_input_name(h), pool=None) for h in heads)


def pool_inputs(feats: dict, inputs: dict) -> dict:
    """``{input name: tensor}`` from trunk features ``feats``, pooled as ``inputs`` (:func:`head_inputs`) says."""
    return {name: feats[f] if pool is None else layers.adaptive_pool(feats[f], pool, kind)
            for name, (f, pool, kind) in inputs.items()}


def _input_name(head) -> str:
    return head.feature if head.pool is None else f"{head.feature}/{head.pool_type}{head.pool[0]}x{head.pool[1]}"


def over_views(run, images):
    """``run(batch) -> {name: tensor}`` on a batch, or on a tuple of crops (VISSL/SwAV's multi-crop,
    ``data.views``): consecutive crops of one shape run as one batch (the trunk runs once per
    resolution; training BatchNorms see each resolution's statistics in turn, as in VISSL). One
    batch gives one dict; crops a list of ``(crops, dict)``, one per resolution, which the heads
    select (their ``crops``), pool and concatenate (:func:`_head_input`): crop-major, row
    ``v * N + i`` is crop ``v`` of sample ``i``."""
    if isinstance(images, torch.Tensor):
        return run(images)
    groups = []
    for crop in images:
        if groups and groups[-1][0].shape == crop.shape:
            groups[-1].append(crop)
        else:
            groups.append([crop])
    return [(len(group), run(torch.cat(group) if len(group) > 1 else group[0])) for group in groups]


def _head_input(head, feats):
    """The head's feature, pooled to its grid; of its crops (every crop unless ``head.crops``
    says ``(first, count)``: VISSL's several inputs mapped to heads), concatenated."""
    first, count = head.crops or (0, None)
    parts, seen = [], 0
    for crops, f in [(1, feats)] if isinstance(feats, dict) else feats:
        lo, hi = max(first - seen, 0), crops if count is None else min(first + count - seen, crops)
        seen += crops
        if lo >= hi:
            continue
        x = f[head.feature]
        rows = x.shape[0] // crops
        x = x[lo * rows:hi * rows]
        parts.append(x if head.pool is None else layers.adaptive_pool(x, head.pool, head.pool_type))
    if not parts:
        raise ValueError(f"model.heads.{head.name}.crops={head.crops}: the batch has {seen} crop(s)")
    if any(x.shape[1:] != parts[0].shape[1:] for x in parts[1:]):  # (no sorting of symbolic sizes when traced)
        shapes = sorted({tuple(int(d) for d in x.shape[1:]) for x in parts})
        raise ValueError(f"model.heads.{head.name}: crops of several resolutions give {head.feature} of "
                         f"shapes {shapes}; give the head a pool (e.g. pool=(1, 1)) or read a vector feature")
    x = parts[0] if len(parts) == 1 else torch.cat(parts)
    if head.towers > 1:  # siamese_concat_view: sample i's crops (rows v * N + i) side by side
        if x.shape[0] % head.towers:
            raise ValueError(f"model.heads.{head.name}.towers={head.towers}: the batch has {x.shape[0]} crops, "
                             f"not a multiple of {head.towers}; give data.views (and data.eval_views) "
                             f"{head.towers} crops per image")
        rest = x.shape[1:]
        x = x.reshape(head.towers, -1, *rest).transpose(0, 1).reshape(-1, head.towers * rest[0], *rest[1:])
    return x


def labels_for(logits, labels):
    """``labels`` (or any per-sample target) for ``logits`` of every crop (crop-major rows):
    repeated once per crop."""
    if logits.shape[0] == labels.shape[0]:
        return labels
    return labels.repeat(logits.shape[0] // labels.shape[0], *([1] * (labels.ndim - 1)))


def head_targets(heads) -> dict:
    """``{head name: (target, loss, loss_weight)}``: what each head learns and how."""
    return {h.name: (h.target, h.loss, h.loss_weight) for h in heads}


RESERVED_KEYS = ("image", "index", "mask")  # batch keys that are not targets


def _parse_target(name, h, num_classes, target_sizes):
    """``(target, loss, loss_weight, classes)`` of a head: what it learns and its output size."""
    target = h.pop("target", None) or "label"
    kind = losses.check(h.pop("loss", None) or "cross_entropy", f"model.heads.{name}.loss")
    weight = h.pop("loss_weight", None)
    weight = 1.0 if weight is None else weight
    if not (isinstance(weight, (int, float)) and weight >= 0):
        raise ValueError(f"model.heads.{name}.loss_weight={weight!r}: a number >= 0 is needed")
    if target == "label":
        return target, kind, float(weight), num_classes
    if target in RESERVED_KEYS:
        raise ValueError(f"model.heads.{name}.target={target!r} is not a target; valid: label or the "
                         "dataset's extra targets")
    if target_sizes is None:
        return target, kind, float(weight), 2
    if target not in target_sizes:
        raise ValueError(f"model.heads.{name}.target={target!r}: the dataset has no such target; valid: "
                         f"{['label', *sorted(target_sizes)]}")
    return target, kind, float(weight), int(target_sizes[target])


def _parse_head(name, h, num_classes, features, target_sizes=None):
    unknown = sorted(set(h) - set(HEAD_KEYS))
    if unknown:
        raise ValueError(f"model.heads.{name}: unknown key(s) {unknown}; valid: {HEAD_KEYS}")
    if h.get("feature") not in features:
        raise ValueError(f"model.heads.{name}.feature={h.get('feature')!r}; valid: {trunk_lib.feature_listing(features)}")
    target, loss, weight, num_classes = _parse_target(name, h, num_classes, target_sizes)
    crops = tuple(h.pop("crops", None) or ())
    if crops and not (len(crops) == 2 and all(isinstance(v, int) for v in crops) and crops[0] >= 0 and crops[1] >= 1):
        raise ValueError(f"model.heads.{name}.crops={crops!r}: (first, count) with first >= 0, count >= 1")
    towers = h.pop("towers", None) or 1
    if not (isinstance(towers, int) and towers >= 1):
        raise ValueError(f"model.heads.{name}.towers={towers!r}: a whole number >= 1 is needed")
    chain = h.pop("chain", None) or [{k: v for k, v in h.items() if k not in ("feature", "pool", "pool_type")}]
    layer_specs = []
    for i, spec in enumerate(chain):
        spec = dict(spec)
        kind = spec.pop("type", "linear")
        if kind not in heads_lib.HEAD_TYPES:
            raise ValueError(f"model.heads.{name}: unknown type {kind!r}; valid: {heads_lib.HEAD_TYPES}")
        last = i == len(chain) - 1
        dims = list(spec.pop("dims", None) or [])
        if last and (not dims or kind != "linear" and dims[-1] is None):
            dims = dims[:-1] + [num_classes] if dims else [num_classes]
        layer_specs.append((kind, {"dims": tuple(dims), **spec}))
    pool = h.get("pool")
    pool = None if pool is None else (tuple(pool) if isinstance(pool, (list, tuple)) else (pool, pool))
    return Head(name, h["feature"], pool, h.get("pool_type", "avg"), tuple(layer_specs), towers, crops,
                target, loss, weight)


def _from_vissl_dims(head, in_shape):
    """Layers given ``vissl_dims=True`` list sizes as VISSL does, input first (``[2048, 1000]``):
    the first must be the layer's input size; fpipe's ``dims`` are the output sizes after it."""
    out, size = [], int(torch.tensor(in_shape).prod())
    for kind, opts in head.layers:
        opts = dict(opts)
        dims = list(opts["dims"])
        if opts.pop("vissl_dims", False):
            if len(dims) < 2 or dims[0] != size:
                raise ValueError(f"model.heads.{head.name}: vissl_dims=True lists the input size first, "
                                 f"then the outputs; the input here is {size} ({head.feature}, pooled "
                                 f"{tuple(in_shape)}), got dims={dims}")
            dims = dims[1:]
        out.append((kind, {**opts, "dims": tuple(dims)}))
        size = dims[-1] if dims else size
    return head._replace(layers=tuple(out))


def _feature_shapes(trunk, names, image_size):
    """Per-sample shapes of trunk features, computed on the meta device (no memory, no FLOPs)."""
    if not names:
        return {}
    feats, _ = trunk_lib.meta_features(trunk, names, image_size)
    return {n: tuple(f.shape[1:]) for n, f in feats.items()}


def _pooled_shape(head, shape):
    """The head's input per sample: pooled to its grid, its towers' channels side by side."""
    if head.pool is not None and len(shape) >= 3:
        shape = (shape[0], *head.pool)
    return (shape[0] * head.towers, *shape[1:])


def _init_head(gen, head, in_shape):
    in_shape = _pooled_shape(head, in_shape)
    params, state = {}, {}
    for i, (kind, opts) in enumerate(head.layers):
        p, s = heads_lib.init(gen, kind, in_shape, **opts)
        key = str(i)
        params[key], state[key] = p, s
        in_shape = (opts["dims"][-1],)
    if len(head.layers) == 1:
        return params["0"], state["0"]
    return params, state


def _apply_head(head, params, state, x, train, eval_norms, sync_stats):
    single = len(head.layers) == 1
    new_state = {}
    for i, (kind, opts) in enumerate(head.layers):
        key = str(i)
        p, s = (params, state) if single else (params[key], state[key])
        norms = eval_norms if single else _under(key, eval_norms)
        x, new_s = heads_lib.apply(kind, p, s, x, train=train, eval_norms=norms, sync_stats=sync_stats, **opts)
        if single:
            return x, new_s
        new_state[key] = new_s
    return x, new_state


def _under(prefix, names):
    """Names below ``prefix.``, relative to it."""
    return frozenset(n[len(prefix) + 1:] for n in names if n.startswith(prefix + "."))
