"""Heads as pure init/apply: ``linear``, ``mlp`` and ``eval_mlp``, each usable alone or chained.

Param names follow VISSL's modules so its head weights load by name: ``mlp`` is a sequence
``clf.<i>`` of Linear / BatchNorm1d layers (ReLU and dropout take an index but hold no params),
``eval_mlp`` is ``channel_bn`` (BatchNorm2d over the feature's channels) then a flatten and an
``mlp`` under ``clf``. ``linear`` is a bare ``weight``/``bias`` pair, like torchvision's ``fc``.
"""
import torch
import torch.nn.functional as F

from fpipe.models import layers

HEAD_TYPES = ("linear", "mlp", "eval_mlp")
# init_std: Linear weights drawn from N(0, init_std²), biases zero (DINO's, dinov2's, BEiT's linear
# probes: 0.01); None: torch.nn.Linear's default init. bn_affine, bn_eps: the head's BatchNorms
# (eval_mlp's channel_bn, mlp's use_bn); MAE's linear probe is BatchNorm1d(affine=False, eps=1e-6).
MLP_OPTIONS = dict(use_bn=False, use_relu=False, use_dropout=False, dropout=0.5, use_bias=True,
                   skip_last_layer_relu_bn=True, init_std=None, bn_affine=True, bn_eps=layers.BN_EPS)


def _bn_init(channels, affine):
    params, state = layers.norm_init("batch", channels)
    return (params if affine else {}), state


def mlp_plan(in_dim, dims, use_bn, use_relu, use_dropout, skip_last_layer_relu_bn, **_):
    """VISSL's MLP as a list of ``(index, kind, size)``: Linear, then BN / ReLU / dropout."""
    plan, idx, prev = [], 0, in_dim
    for i, d in enumerate(dims):
        plan.append((idx, "linear", (prev, d)))
        idx += 1
        if i < len(dims) - 1 or not skip_last_layer_relu_bn:
            for kind, on in (("bn", use_bn), ("relu", use_relu), ("dropout", use_dropout)):
                if on:
                    plan.append((idx, kind, d))
                    idx += 1
        prev = d
    return plan


def init(gen, kind, in_shape, dims, **options):
    """``(params, state)`` of one head layer reading inputs of shape ``in_shape`` (C, H, W) or (D,)."""
    if kind not in HEAD_TYPES:
        raise ValueError(f"unknown head type {kind!r}; valid: {HEAD_TYPES}")
    in_dim = int(torch.tensor(in_shape).prod())
    if kind == "linear":
        if len(dims) != 1:
            raise ValueError(f"a linear head has one output size, got dims={list(dims)}")
        return layers.linear_init(gen, in_dim, dims[0], bias=options.get("use_bias", True),
                                  std=options.get("init_std")), {}
    opts = {**MLP_OPTIONS, **options}
    if kind == "eval_mlp":
        bn_p, bn_s = _bn_init(in_shape[0], opts["bn_affine"])
        clf_p, clf_s = init(gen, "mlp", in_shape, dims, **options)
        return ({**({"channel_bn": bn_p} if bn_p else {}), "clf": clf_p},
                {"channel_bn": bn_s, **({"clf": clf_s} if clf_s else {})})
    params, state = {}, {}
    for idx, op, size in mlp_plan(in_dim, dims, **opts):
        if op == "linear":
            params[str(idx)] = layers.linear_init(gen, *size, bias=opts["use_bias"], std=opts["init_std"])
        elif op == "bn":
            bn_p, state[str(idx)] = _bn_init(size, opts["bn_affine"])
            if bn_p:
                params[str(idx)] = bn_p
    return {"clf": params}, ({"clf": state} if state else {})


def apply(kind, params, state, x, *, train, eval_norms=frozenset(), sync_stats=None, **options):
    """Returns ``(y, new_state)``; ``eval_norms`` are dotted norm names (relative) using running stats."""
    if kind == "linear":
        return layers.linear(params, x.flatten(1)), state
    if kind == "eval_mlp":
        h, bn_s = layers.batch_norm(params.get("channel_bn", {}), state["channel_bn"], x,
                                    train and "channel_bn" not in eval_norms,
                                    eps=options.get("bn_eps", layers.BN_EPS), sync_stats=sync_stats)
        y, clf_s = apply("mlp", params["clf"], state.get("clf", {}), h, train=train,
                         eval_norms={n[4:] for n in eval_norms if n.startswith("clf.")},
                         sync_stats=sync_stats, **options)
        return y, {"channel_bn": bn_s, **clf_s}
    opts = {**MLP_OPTIONS, **options}
    p, s, new_s = params["clf"], state.get("clf", {}), {}
    h = x.flatten(1)
    for idx, op, _ in mlp_plan(h.shape[1], opts.pop("dims"), **opts):
        key = str(idx)
        if op == "linear":
            h = layers.linear(p[key], h)
        elif op == "bn":
            h, new_s[key] = layers.batch_norm(p.get(key, {}), s[key], h, train and f"clf.{key}" not in eval_norms,
                                              eps=opts["bn_eps"], sync_stats=sync_stats)
        elif op == "relu":
            h = torch.relu(h)
        else:
            h = F.dropout(h, opts["dropout"], training=train)
    return h, ({"clf": new_s} if new_s else {})
