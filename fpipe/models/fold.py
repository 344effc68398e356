"""Frozen params prepared for speed: eval-mode BatchNorm folded into its conv, channels_last weights.

Frozen params never change, so these transforms run once, outside the step (the loop applies them
when it builds the step; checkpoints keep the original params):

    frozen = fold.fold_frozen_norms(frozen, model_state, eval_norms)   # conv -> conv + bias
    frozen = fold.channels_last(frozen)                                # 4-d weights, NHWC layout

A norm ``X.bnK`` follows the conv ``X.convK`` (``X.downsample.1`` follows ``X.downsample.0``) in
the ResNet family. Running in eval mode (it is in ``eval_norms``) with frozen scale and shift, it is
an affine map per channel, so ``bn(conv(x, W, b)) == conv(x, W * s, (b - mean) * s + shift)`` with
``s = weight / sqrt(running_var + eps)``. The folded tree has no params for that norm; the trunk's
apply skips a norm whose params are absent. Model state is not touched: the running statistics
stay where they are (they are checkpointed and reported as before), and the step returns them
unchanged because a norm in ``eval_norms`` never updates them.
"""
from typing import Any, Callable, NamedTuple

import torch
import torch._inductor.config

from fpipe import tree
from fpipe.models import layers
from fpipe.models import model as model_lib


def conv_of(norm_name):
    """Dotted name of the conv that feeds the norm ``norm_name``, or None if there is none."""
    parent, _, key = norm_name.rpartition(".")
    prefix = f"{parent}." if parent else ""
    if key.startswith("bn") and key[2:].isdigit():
        return f"{prefix}conv{key[2:]}"
    if key == "1" and parent.endswith("downsample"):
        return f"{prefix}0"
    return None


def foldable(frozen, model_state, eval_norms):
    """``{norm_name: conv_name}`` of the norms that :func:`fold_frozen_norms` folds.

    A norm folds when it runs in eval mode (in ``eval_norms``), has running statistics, its
    ``weight`` and ``bias`` are both frozen, and the conv before it is frozen as well.
    """
    fp, st = tree.flatten(frozen), tree.flatten(model_state)
    out = {}
    for name in sorted(eval_norms):
        conv = conv_of(name)
        if (conv is not None and f"{conv}.weight" in fp and f"{name}.weight" in fp
                and f"{name}.bias" in fp and f"{name}.running_mean" in st and f"{name}.running_var" in st):
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
        bias = torch.zeros(w.shape[0], dtype=torch.float64) if bias is None else bias.double()
        fp[f"{conv}.weight"] = (w.double() * scale.reshape(-1, *([1] * (w.dim() - 1)))).to(w.dtype)
        fp[f"{conv}.bias"] = ((bias - st[f"{norm}.running_mean"].double()) * scale + shift).to(w.dtype)
    return tree.unflatten(fp)


def channels_last(params):
    """Every 4-d tensor in ``params`` in ``torch.channels_last`` layout (same values, NHWC strides).

    oneDNN's CPU convolutions run fastest in this layout; a conv whose weight is channels_last
    gives a channels_last output, so the whole trunk runs NHWC. Put the images in the same layout
    (``images.contiguous(memory_format=torch.channels_last)``) to skip one conversion.
    """
    return tree.map_leaves(
        lambda t: t.contiguous(memory_format=torch.channels_last) if isinstance(t, torch.Tensor) and t.dim() == 4 else t,
        params)



# ---------------------------------------------------------------- the frozen trunk as a constant
class FrozenTrunk(NamedTuple):
    features: Callable  # images -> {feature: tensor}, no grad; frozen params baked in
    model: Any  # the model with ``apply(params, state, features, ...)``: heads only


def frozen_trunk(model, trainable, frozen, model_state, eval_norms, *, compile=True, fold_norms=True):
    """Splits a linear-evaluation model into a constant trunk and the heads that train on it.

    Returns ``FrozenTrunk(features, model)``: ``features(images)`` computes the trunk features
    the heads read, under ``torch.no_grad()``, with the frozen trunk params and running statistics
    held as constants; compiled with inductor's freezing, the conv weights are packed once into
    oneDNN's blocked layout (an eager conv reorders its weight on every call) and the bias, ReLU
    and residual add run inside the conv (oneDNN post-ops). ``model`` is the given model whose
    ``apply(params, state, features, ...)`` takes that features dict in place of images and runs
    the heads only (``params["trunk"]`` is ignored; the trunk state comes back unchanged). Use
    it with :func:`on_features`:

        ft = fold.frozen_trunk(model, trainable, frozen, model_state, eval_norms)
        step = on_features(maybe_compile(make_step(ft.model, opt, eval_norms=eval_norms), ...), ft.features)

    Same math as the step over the whole model when the whole trunk is frozen and every trunk
    norm runs in eval mode (both checked). The constants are a snapshot: build it again if the
    frozen params change (they do not during training; after loading weights, build it then).
    """
    if tree.flatten(trainable.get("trunk", {})):
        raise ValueError("frozen_trunk needs the whole trunk frozen; trainable trunk params: "
                         f"{list(tree.flatten(trainable['trunk']))[:5]}")
    trunk_state = model_state.get("trunk", {})
    training_norms = sorted({n.rsplit(".", 1)[0] for n in tree.flatten(trunk_state) if n.endswith("running_mean")}
                            - {n[len("trunk."):] for n in eval_norms if n.startswith("trunk.")})
    if training_norms:
        raise ValueError(f"frozen_trunk needs every trunk norm in eval mode; in train mode: {training_norms[:5]}")
    if fold_norms:
        frozen = fold_frozen_norms(frozen, model_state, eval_norms)
    names = tuple(sorted({h.feature for h in model.heads}))
    module = _TrunkConstants(model.trunk.apply, frozen["trunk"], trunk_state, names)
    run = torch.compile(module, dynamic=False) if compile else module

    def features(images):
        # Inductor reads `freezing` when it compiles (first call, or a new input shape); the
        # `options=` of torch.compile does not reach it (torch 2.13), so patch the config here.
        with torch.no_grad(), torch._inductor.config.patch(freezing=True):
            return run(images)

    def apply(params, state, feats, *, train, eval_norms=frozenset(), sync_stats=None):
        outputs, head_states = {}, {}
        for h in model.heads:
            x = feats[h.feature]
            if h.pool is not None:
                x = layers.adaptive_pool(x, h.pool, h.pool_type)
            outputs[h.name], head_states[h.name] = model_lib._apply_head(
                h, params["heads"][h.name], state.get("heads", {}).get(h.name, {}), x, train,
                model_lib._under(f"heads.{h.name}", eval_norms), sync_stats)
        return outputs, {"trunk": trunk_state, "heads": head_states}

    return FrozenTrunk(features, model._replace(apply=apply))


def on_features(step, features):
    """``step(train_state, batch, lr)`` with ``batch["image"]`` replaced by ``features(batch["image"])``."""
    def run(train_state, batch, lr):
        return step(train_state, {**batch, "image": features(batch["image"])}, lr)
    return run


class _TrunkConstants(torch.nn.Module):
    """The trunk's pure apply over params and state held as buffers: constants to the compiler."""

    def __init__(self, apply, params, state, features):
        super().__init__()
        self._apply, self._features, self._names = apply, tuple(features), {}
        for prefix, t in (("p", params), ("s", state)):
            for name, leaf in tree.flatten(t).items():
                key = f"{prefix}__{name.replace('.', '__')}"
                self.register_buffer(key, leaf)
                self._names[key] = (prefix, name)

    def forward(self, images):
        flat = {"p": {}, "s": {}}
        for key, (prefix, name) in self._names.items():
            flat[prefix][name] = getattr(self, key)
        feats, _ = self._apply(tree.unflatten(flat["p"]), tree.unflatten(flat["s"]), images, train=False,
                               features=self._features)
        return feats
