"""Linear evaluation's fast path: the frozen trunk compiled as constants, and a step over the heads;
feature extraction runs the same constant trunk (:func:`eval_features`).

When the whole trunk is frozen and its norms run on running statistics, the trunk is a fixed
function of the images. Compiled with inductor's freezing, its weights are packed once for
oneDNN and bias/ReLU/residual-add fuse into the convs (an eager conv repacks its weights on
every call); the train step then differentiates the heads alone. Same math as the full step
(tests/test_frozen_trunk.py); figures in benchmarks/linear_eval_step.py.
"""
from typing import Any, Callable, NamedTuple

import time

import torch
from absl import logging

from fpipe import tree
from fpipe.evaluate import fingerprint
from fpipe.models import fold, layers
from fpipe.models import model as model_lib
from fpipe.train import compile_cache, precision


# freezing: weights as constants (packed for oneDNN, BatchNorm folded, post-ops fused). Inductor's
# conv_1x1_as_mm is not set: freezing packs every conv, 1×1 included, before that lowering is
# reached (torch 2.13: the same kernels and times with it), and 1×1 convs written as matmuls
# against packed weights were slower (ResNet-50 64 px trunk: 184 vs 117 ms, a scratch script).
INDUCTOR_OPTIONS = {"freezing": True}


class FrozenTrunk(NamedTuple):
    features: Callable  # images -> {feature: tensor}, no grad; frozen params baked in
    model: Any  # the model with ``apply(params, state, features, ...)``: heads only


def frozen_trunk(model, trainable, frozen, model_state, eval_norms, *, compile=True, batch_size=None, cache=None,
                 autocast=None):
    """Splits a linear-evaluation model into a constant trunk and the heads that train on it.

    Returns ``FrozenTrunk(features, model)``: ``features(images)`` computes the trunk features
    the heads read, under ``torch.no_grad()``, with the frozen trunk params and running statistics
    held as constants; compiled with inductor's freezing, the conv weights are packed once into
    oneDNN's blocked layout (an eager conv reorders its weight on every call) and the bias, ReLU
    and residual add run inside the conv (oneDNN post-ops). A head's pooling (VISSL's conv1..res5
    heads) runs there too, so only pooled grids leave the trunk: VISSL's ResNet-50 heads at 224 px
    read 9.2 MB of feature maps an image, 0.18 MB pooled; the heads' step compiles faster too.
    ``model`` is the given model whose ``apply(params, state, features, ...)`` takes that dict in
    place of images and runs the heads only (``params["trunk"]`` is ignored; the trunk state comes
    back unchanged).
    ``batch_size``: the trunk always runs on chunks of exactly this many images (the last one
    padded), so training and evaluation batches of other sizes share one compiled graph.
    ``cache``: ``(directory, key)`` to keep the compiled trunk for the next run (on CPU; key: the
    config's, see fpipe.train.compile_cache; the weights' checksum, the input shape and the autocast
    dtype are added here), or None. ``autocast``: the run's mixed-precision dtype (``precision.autocast_dtype``), under
    which the trunk runs as it would inside the whole model's step (None: float32). Use it with
    :func:`on_features`:

        ft = frozen_trunk(model, trainable, frozen, model_state, eval_norms)
        step = on_features(maybe_compile(make_step(ft.model, opt, eval_norms=eval_norms), ...), ft.features)

    Same math as the step over the whole model when the whole trunk is frozen and every trunk
    norm runs in eval mode (both checked). The constants are a snapshot: build it again if the
    frozen params change (they do not during training; after loading weights, build it then).
    """
    if tree.flatten(trainable.get("trunk", {})):
        raise ValueError("frozen_trunk needs the whole trunk frozen; trainable trunk params: "
                         f"{list(tree.flatten(trainable['trunk']))[:5]}")
    trunk_state = model_state.get("trunk", {})
    training_norms = sorted(_norms(trunk_state) - set(eval_norms))
    if training_norms:
        raise ValueError(f"frozen_trunk needs every trunk norm in eval mode; in train mode: {training_norms[:5]}")
    frozen = fold.fold_frozen_norms(frozen, model_state, eval_norms)
    inputs = model_lib.head_inputs(model.heads)
    names = tuple(sorted({feature for feature, _, _ in inputs.values()}))
    features = constant_trunk(model.trunk, frozen["trunk"], trunk_state, names, compile=compile,
                              batch_size=batch_size, cache=cache, autocast=autocast, inputs=inputs)
    heads = model_lib.reading_inputs(model.heads)
    apply = model_lib.apply_heads_of(heads)
    return FrozenTrunk(features, model._replace(heads=heads, apply=apply, apply_heads=apply))


def eval_features(model, params, model_state, names, *, compile=True, batch_size=None, cache=None, autocast=None):
    """``features(images) -> {name: tensor}``: what ``model.features(params, model_state, images,
    names)`` gives (every norm on its running statistics), computed as the frozen trunk of linear
    evaluation is: norms folded into their convs, the weights constants of one compiled graph
    (``compile``; else eager on channels-last weights). For feature extraction, where the trunk
    runs over whole datasets; the arguments are :func:`constant_trunk`'s."""
    trunk_state = model_state.get("trunk", {})
    folded = fold.fold_frozen_norms({"trunk": params["trunk"]}, {"trunk": trunk_state}, _norms(trunk_state))
    return constant_trunk(model.trunk, folded["trunk"], trunk_state, tuple(names), compile=compile,
                          batch_size=batch_size, cache=cache, autocast=autocast)


def constant_trunk(trunk, params, state, names, *, compile=True, batch_size=None, cache=None, autocast=None,
                   inputs=None):
    """``features(images) -> {name: tensor}``: ``trunk.apply(params, state, images, train=False,
    features=names)`` under no_grad, with ``params`` and ``state`` held as constants (see
    :func:`frozen_trunk` for ``compile``, ``batch_size``, ``cache`` and ``autocast``). ``images``: a
    batch, or a tuple of crops (multi-crop), one shape at a time. ``inputs``: the heads' inputs
    (``model.head_inputs``), pooled in the same graph and given instead of the features."""
    if compile:
        compile_cache.key_inductor_caches_by_isa()
    else:  # eager oneDNN convolutions run fastest on channels-last weights and images
        # (the main job: 700 vs 560 images/s, 28.7 vs 33.8 s, the same accuracies)
        params = fold.channels_last(params)
    module = _TrunkConstants(trunk.apply, params, state, names, autocast, inputs)
    run = torch.compile(module, dynamic=False, fullgraph=True) if compile else module
    compiled_for = {}  # (input shape, dtype, device) -> the compiled trunk for it

    def features(images):
        return model_lib.over_views(one_shape, images)

    def one_shape(images):
        if batch_size and images.shape[0] != batch_size:
            return _in_chunks(run_once, images, batch_size)
        return run_once(images)

    def run_once(images):
        # Inductor reads `freezing` when it compiles (first call, or a new input shape); the
        # `options=` of torch.compile does not reach it (torch 2.13), so patch the config here.
        # Under constant_weights, dense's products take the weights, which freezing packs, as kernels.
        if not compile:
            with torch.no_grad():
                return run(images.contiguous(memory_format=torch.channels_last) if images.dim() == 4 else images)
        from torch._inductor import config as inductor  # lazily: its import takes over a second
        # An ahead-of-time package runs code for its example's strides and does not check them
        # (other strides: another image's features), so every compiled trunk takes contiguous
        # images, as the loader's batches are (a no-op for them).
        images = images.contiguous()
        with torch.no_grad(), inductor.patch(INDUCTOR_OPTIONS), layers.constant_weights():
            shape = tuple(images.shape)
            kind = (shape, images.dtype, images.device)  # a package runs only its example's kind
            if kind in compiled_for:
                return compiled_for[kind](images)
            logging.info("compiling the frozen trunk for inputs %s%s…", shape,
                         " (or loading it, if an earlier run kept it)" if cache else "")
            t0 = time.perf_counter()
            fn = compiled_for[kind] = (_saved(module, images, cache) if cache and images.device.type == "cpu"
                                        else None) or run
            out = fn(images)
            how = "loaded and run" if compile_cache.was_loaded(fn) else "compiled"
            logging.info("frozen trunk %s in %.1f s", how, time.perf_counter() - t0)
            return out

    return features


def _norms(trunk_state):
    """The trunk's norms with running statistics, by their names in the model (``trunk.…``)."""
    return {"trunk." + n.rsplit(".", 1)[0] for n in tree.flatten(trunk_state) if n.endswith("running_mean")}


def _saved(module, images, cache):
    """The trunk compiled ahead of time for ``images``' shape and kept under ``cache``'s directory
    (loaded from there in a later run), or None (compile as usual). Only CPU runs so far: the
    ahead-of-time package has not been tried on a GPU."""
    directory, key = cache
    weights = fingerprint.checksum({k: getattr(module, k) for k in module._names})
    key = compile_cache.key_of(key, weights, tuple(images.shape), images.dtype, images.device, module._features,
                               module._inputs, module._autocast, INDUCTOR_OPTIONS)
    return compile_cache.saved_package(module, images, directory, key, "frozen trunk",
                                       {**INDUCTOR_OPTIONS, "aot_inductor.compile_wrapper_opt_level": "O0"})


def _in_chunks(fn, images, size):
    """``fn`` over chunks of exactly ``size`` rows (the last padded by repeating rows), concatenated."""
    n = images.shape[0]
    pad = (-n) % size
    if pad:
        images = torch.cat([images, images[:1].expand(pad, *images.shape[1:])])
    outs = [fn(chunk) for chunk in images.split(size)]
    return {k: torch.cat([o[k] for o in outs])[:n] for k in outs[0]}


def without_trunk(t):
    """A params/state tree without its ``trunk`` part (constants of the compiled trunk)."""
    return {k: v for k, v in t.items() if k != "trunk"}


def heads_only(step):
    """``step`` over a train state without the frozen trunk's tensors: the compiled heads step then
    takes and returns a few head tensors instead of the whole trunk (a much shorter compile, no
    copies); the trunk's params and statistics are put back unchanged."""
    def run(train_state, batch, hyper):
        slim = {**train_state, "frozen": without_trunk(train_state["frozen"]),
                "model_state": without_trunk(train_state["model_state"])}
        new_state, metrics = step(slim, batch, hyper)
        for key in ("frozen", "model_state"):
            if key in new_state and "trunk" in train_state[key]:  # (a donating step returns no model_state)
                new_state[key] = {**new_state[key], "trunk": train_state[key]["trunk"]}
        return new_state, metrics
    return run


def on_features(step, features):
    """``step(train_state, batch, hyper)`` with ``batch["image"]`` replaced by ``features(batch["image"])``."""
    def run(train_state, batch, hyper):
        return step(train_state, {**batch, "image": features(batch["image"])}, hyper)
    return run


class _TrunkConstants(torch.nn.Module):
    """The trunk's pure apply over params and state held as buffers: constants to the compiler;
    under autocast to ``autocast`` (a dtype, or None: float32); the heads' ``inputs`` pooled from
    its features, if given."""

    def __init__(self, apply, params, state, features, autocast=None, inputs=None):
        super().__init__()
        self._apply, self._features, self._autocast, self._names = apply, tuple(features), autocast, {}
        self._inputs = None if inputs is None else tuple(sorted(inputs.items()))
        for prefix, t in (("p", params), ("s", state)):
            for name, leaf in tree.flatten(t).items():
                key = f"{prefix}__{name.replace('.', '__')}"
                self.register_buffer(key, leaf)
                self._names[key] = (prefix, name)

    def forward(self, images):
        flat = {"p": {}, "s": {}}
        for key, (prefix, name) in self._names.items():
            flat[prefix][name] = getattr(self, key)
        with precision.autocast(self._autocast, images.device.type):
            feats, _ = self._apply(tree.unflatten(flat["p"]), tree.unflatten(flat["s"]), images, train=False,
                                   features=self._features)
            return feats if self._inputs is None else model_lib.pool_inputs(feats, dict(self._inputs))
