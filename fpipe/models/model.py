"""A model = a trunk + named heads, built from ``config.model``; registries of trunk and head names.

Each head reads one named trunk feature, optionally pools it to a fixed grid (VISSL's linear
evaluation on several layers), and runs a chain of head layers. The trunk runs once, only up to
the deepest feature any head reads. Params and state are ``{"trunk": ..., "heads": {name: ...}}``.
"""
from typing import Callable, NamedTuple

import ml_collections
import torch
from ml_collections.config_dict import placeholder

from fpipe import tree
from fpipe.models import heads as heads_lib
from fpipe.models import layers, resnet, vit

TRUNKS = {"resnet": resnet, "vit": vit}
TRUNK_OPTIONS = ("depth", "width_multiplier", "groups", "width_per_group", "zero_init_residual",
                 "layer4_stride", "norm", "norm_groups")
HEAD_KEYS = ("feature", "pool", "pool_type", "type", "dims", "chain") + tuple(heads_lib.MLP_OPTIONS)


def build_trunk(name, **options) -> resnet.Trunk:
    """The trunk named ``name`` (a family in TRUNKS) built with ``options``."""
    if name not in TRUNKS:
        raise ValueError(f"unknown model.trunk.name {name!r}; valid: {sorted(TRUNKS)}")
    valid = tuple(getattr(TRUNKS[name], "OPTIONS", TRUNK_OPTIONS))  # a family's own options, if it lists them
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(f"unknown model.trunk option(s) {unknown} for {name!r}; valid: {valid}")
    return TRUNKS[name].build(**options)


def trunk_config(**overrides):
    c = ml_collections.ConfigDict(dict(name="resnet", depth=50, width_multiplier=1, groups=1,
                                       width_per_group=64, zero_init_residual=False, layer4_stride=2,
                                       norm="batch", norm_groups=32))
    c.update(overrides)
    return c


def head_config(feature, type="linear", pool=None, dims=None, **options):
    """One head: reads ``feature``, pools it to ``pool`` ((h, w) adaptive grid) if given, then
    ``type`` with output sizes ``dims`` (default: the dataset's class count).

    Unset values are typed placeholders, so ``--config.model.heads.NAME.pool='(2, 2)'`` works."""
    c = ml_collections.ConfigDict(dict(feature=feature, type=type, **options))
    c.pool = placeholder(tuple) if pool is None else tuple(pool)
    c.dims = placeholder(tuple) if dims is None else tuple(dims)
    return c


class Head(NamedTuple):
    name: str
    feature: str
    pool: tuple | None
    pool_type: str
    layers: tuple  # of (type, options) applied in sequence


class Model(NamedTuple):
    trunk: resnet.Trunk      # spec, init, apply, features (valid feature names)
    heads: tuple
    init: Callable
    apply: Callable         # (params, state, images, *, train, ...) -> ({head: logits}, state)
    apply_heads: Callable   # (params, state, features, *, train, ...) -> the same, from trunk features
    features: Callable


def build(model_cfg, *, num_classes, image_size) -> Model:
    """Builds the trunk and heads named in ``model_cfg``; ``image_size`` sizes the heads' inputs."""
    tcfg = dict(model_cfg.trunk)
    trunk = build_trunk(tcfg.pop("name"), **tcfg)
    heads = tuple(_parse_head(n, dict(h), num_classes, trunk.features)
                  for n, h in dict(model_cfg.get("heads", {})).items())
    shapes = _feature_shapes(trunk, {h.feature for h in heads}, image_size)
    read = tuple(sorted({h.feature for h in heads}))  # the features the heads read

    def init(seed=0):
        params, state = trunk.init(seed)
        gen = torch.Generator().manual_seed(seed + 1)
        hp, hs = {}, {}
        for h in heads:
            hp[h.name], hs[h.name] = _init_head(gen, h, shapes[h.feature])
        return {"trunk": params, "heads": hp}, {"trunk": state, "heads": hs}

    def apply(params, state, images, *, train, eval_norms=frozenset(), sync_stats=None):
        """``({head: logits}, new_state)``; norm layers named in ``eval_norms`` use running stats;
        ``sync_stats`` makes training BatchNorms synchronous across processes (SyncBN)."""
        feats, trunk_state = trunk.apply(params["trunk"], state.get("trunk", {}), images, train=train,
                                         features=read, eval_norms=_under("trunk", eval_norms),
                                         sync_stats=sync_stats)
        return apply_heads(params, {**state, "trunk": trunk_state}, feats, train=train,
                           eval_norms=eval_norms, sync_stats=sync_stats)

    def apply_heads(params, state, feats, *, train, eval_norms=frozenset(), sync_stats=None):
        """The heads alone on trunk features ``{name: tensor}``; the trunk state passes through."""
        outputs, head_states = {}, {}
        for h in heads:
            x = feats[h.feature]
            if h.pool is not None:
                x = layers.adaptive_pool(x, h.pool, h.pool_type)
            outputs[h.name], head_states[h.name] = _apply_head(
                h, params["heads"][h.name], state.get("heads", {}).get(h.name, {}), x, train,
                _under(f"heads.{h.name}", eval_norms), sync_stats)
        return outputs, {"trunk": state.get("trunk", {}), "heads": head_states}

    def features(params, state, images, names=("flatten",)):
        """Trunk features in eval mode, for feature extraction."""
        return trunk.apply(params["trunk"], state.get("trunk", {}), images, train=False, features=tuple(names))[0]

    return Model(trunk, heads, init, apply, apply_heads, features)


def _parse_head(name, h, num_classes, features):
    unknown = sorted(set(h) - set(HEAD_KEYS))
    if unknown:
        raise ValueError(f"model.heads.{name}: unknown key(s) {unknown}; valid: {HEAD_KEYS}")
    if h.get("feature") not in features:
        raise ValueError(f"model.heads.{name}.feature={h.get('feature')!r}; valid: {features}")
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
    return Head(name, h["feature"], pool, h.get("pool_type", "avg"), tuple(layer_specs))


def _feature_shapes(trunk, names, image_size):
    """Per-sample shapes of trunk features, computed on the meta device (no memory, no FLOPs)."""
    if not names:
        return {}
    params, state = trunk.init(0)
    to_meta = lambda t: t.to("meta")
    feats, _ = trunk.apply(tree.map_leaves(to_meta, params), tree.map_leaves(to_meta, state),
                           torch.empty(1, 3, image_size, image_size, device="meta"),
                           train=False, features=tuple(names))
    return {n: tuple(f.shape[1:]) for n, f in feats.items()}


def _pooled_shape(head, shape):
    if head.pool is None or len(shape) < 3:
        return shape
    return (shape[0], *head.pool)


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
