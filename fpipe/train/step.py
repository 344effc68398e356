"""The train step: one pure function of (train state, batch, hyper-parameters), built with ``torch.func``.

``grad_and_value`` differentiates the loss w.r.t. the trainable tree only; frozen params and
norm layers are plain inputs, so a frozen trunk builds no autograd graph and keeps no
activations for backward. The step returns a new train state; nothing is mutated in place.
"""
import os
import time
from typing import Callable

import torch
from absl import logging
from torch.func import grad_and_value
from torch.utils import _pytree as pytree

from fpipe import freeze, optim, tree
from fpipe.evaluate import real
from fpipe.models import losses as losses_lib
from fpipe.models import model as models
from fpipe.train import compile_cache, divergence, precision


def heads_loss(outputs, batch, targets):
    """Each head's loss on its own target (``targets``: ``models.head_targets``, one entry per
    head of the model), weighted and summed; by default a head learns ``label`` by cross-entropy."""
    losses, total = {}, 0
    for name, logits in outputs.items():
        target, kind, weight = targets[name]
        losses[name] = losses_lib.loss(kind, logits, models.labels_for(logits, batch[target]))
        total = total + weight * losses[name]
    return total, losses


def make_step(model, opt, *, eval_norms=None, grad_reduce=None, sync_stats=None,
              autocast=None, loss_scaling=None, hold=frozenset(), in_place=False, accum_steps=1,
              compile_part=None) -> Callable:
    """Returns ``step(train_state, batch, hyper) -> (train_state, metrics)``; hyper: ``opt.inputs(lr)``
    (the lr and the optimizer's other numbers as 0-d tensors: inputs of a compiled step, not
    constants), or the lr alone.

    train_state: ``{"trainable", "frozen", "model_state", "opt_state"}`` trees (plus ``"scaler"``
    with loss scaling). eval_norms: dotted names of norm layers that run on running statistics;
    default: those whose params are frozen (``freeze.eval_norms``), so frozen BatchNorms never
    update. Grads are clipped by the optimizer (``opt.clip_and_norm``, from ``optim.clip_grad_*``,
    the bound from ``hyper``). grad_reduce:
    averages grads across processes (data parallel); sync_stats: SyncBN's all-reduce of BatchNorm
    statistics; autocast: a dtype for mixed precision, or None; loss_scaling: ``config.precision``
    for fp16's dynamic loss scaling (fpipe.train.precision), or None; hold: dotted names of
    trainable params kept fixed for now, with their optimizer state (LayerFreeze). ``opt.update``
    gets the grads flat, ``{dotted name: grad}`` (``fpipe.optim`` takes either form). in_place: the
    optimizer may write into the given trainable and opt_state (``Optimizer.update``), for a step
    whose inputs are donated (fpipe.train.donation); not with ``hold`` or loss scaling, which keep
    the old values. accum_steps: the batch's grads taken in this many equal parts, one after the
    other (gradient accumulation: one part's activations alive at a time), their mean the whole
    batch's; BatchNorms then see each part, and their running statistics move once per part.
    compile_part: compiles one part's forward and backward (``fn -> compiled fn``), for a step that
    is not compiled as a whole: its graph runs once per part and frees the part's activations.
    """
    targets = models.head_targets(model.heads)

    def loss_fn(trainable, frozen, model_state, batch, scale, eval_norms):
        params = merged(trainable, frozen)
        with precision.autocast(autocast, batch["label"].device.type):
            outputs, new_model_state = model.apply(params, model_state, batch["image"], train=True,
                                                   eval_norms=eval_norms, sync_stats=sync_stats)
        loss, losses = heads_loss(outputs, batch, targets)
        return (loss if scale is None else loss * scale), (loss, losses, outputs, new_model_state)

    grad_fn = grad_and_value_traced_or_eager(loss_fn)
    if compile_part is not None:
        grad_fn = compile_part(grad_fn)

    def step(train_state, batch, hyper):
        norms = eval_norms
        if norms is None:  # decided at trace time from the tree structure: no graph cost
            norms = freeze.eval_norms(train_state["model_state"], train_state["frozen"], train_state["trainable"])
        scaler = train_state["scaler"] if loss_scaling is not None else None
        flat_trainable = tree.flatten(train_state["trainable"])
        grads, loss, losses, head_metrics, new_model_state = _accumulated(  # grads: flat, as the trainable given
            grad_fn, targets, flat_trainable, train_state["frozen"], train_state["model_state"], batch,
            None if scaler is None else scaler["scale"], norms, accum_steps)
        if grad_reduce is not None:  # on scaled grads: every rank then skips (or not) together
            grads = grad_reduce(grads)
        if scaler is not None:
            grads, found_inf = precision.unscale(grads, scaler)
        grads, grad_norm = optim.clip_by(opt, grads, hyper)
        fused = updates_fused(opt, flat_trainable, in_place=in_place, hold=hold, loss_scaling=loss_scaling)
        trainable, opt_state = opt.update(grads, train_state["opt_state"], flat_trainable, hyper, in_place=fused)
        if fused:
            trainable = train_state["trainable"]  # the given tree holds the new values
        if hold:
            trainable = _keep_held(trainable, train_state["trainable"], hold)
            opt_state = _keep_held(opt_state, train_state["opt_state"], hold)
        metrics = {"loss": loss.detach(), "grad_norm": grad_norm}
        new_state = {**train_state, "model_state": _like_input(train_state["model_state"], new_model_state)}
        if scaler is not None:  # a non-finite step keeps params and optimizer state, as GradScaler
            trainable = precision.where_finite(found_inf, trainable, train_state["trainable"])
            opt_state = precision.where_finite(found_inf, opt_state, train_state["opt_state"])
            new_state["scaler"] = precision.update_scaler(scaler, found_inf, loss_scaling)
            metrics.update(loss_scale=scaler["scale"], skipped=found_inf.float())
        for name, head_loss in losses.items():
            metrics[f"{name}/loss"] = head_loss.detach()
        metrics.update(head_metrics)
        new_state.update(trainable=trainable, opt_state=opt_state)
        # The step's flag for the divergence check (fpipe.train.divergence, which also checks the
        # state before anything is logged or saved); with loss scaling a non-finite step is skipped.
        metrics["nonfinite"] = divergence.step_flag(loss, grad_norm, skips_nonfinite=scaler is not None)
        return new_state, metrics

    return step


def _accumulated(grad_fn, targets, flat_trainable, frozen, model_state, batch, scale, norms, parts):
    """``(grads, loss, {head: loss}, {head/train metric: value}, new model state)`` of ``batch``
    taken in ``parts`` equal parts one after the other, the model state passed from each to the
    next; every value the mean over the parts (with equal parts, the whole batch's)."""
    totals = None
    for part in _split(batch, parts):
        grads, (_, (loss, losses, outputs, model_state)) = grad_fn(flat_trainable, frozen, model_state, part,
                                                                   scale, norms)
        found = {"loss": loss, **{f"{h}/loss": v for h, v in losses.items()}}
        for name, logits in outputs.items():
            target, kind, _ = targets[name]
            key, value = losses_lib.train_metric(kind, logits, models.labels_for(logits, part[target]))
            found[f"{name}/{key}"] = value
        totals = (grads, found) if totals is None else (
            {n: totals[0][n] + g for n, g in grads.items()}, {k: totals[1][k] + v for k, v in found.items()})
    grads, found = totals
    if parts > 1:
        grads = {n: g / parts for n, g in grads.items()}
        found = {k: v / parts for k, v in found.items()}
    loss = found.pop("loss")
    losses = {h: found.pop(f"{h}/loss") for h in targets if f"{h}/loss" in found}
    return grads, loss, losses, found, model_state


def _split(batch: dict, parts: int) -> list:
    """``batch`` (tensors, tuples of them: multi-crop images, dicts: a frozen trunk's features) as
    ``parts`` batches of equal size along the first dimension."""
    if parts == 1:
        return [batch]
    n = batch["label"].shape[0]
    if n % parts:
        raise ValueError(f"accum_steps={parts} must divide each process's batch of {n} images into equal parts")

    def cut(value, i):
        if isinstance(value, torch.Tensor):
            return value[i * (value.shape[0] // parts):(i + 1) * (value.shape[0] // parts)]
        if isinstance(value, tuple):
            return tuple(cut(v, i) for v in value)
        if isinstance(value, dict):
            return {k: cut(v, i) for k, v in value.items()}
        return value
    return [{k: cut(v, i) for k, v in batch.items()} for i in range(parts)]


def updates_fused(opt, trainable, *, in_place, hold, loss_scaling) -> bool:
    """Whether :func:`make_step`'s step updates with the optimizer's fused in-place kernels, which
    take its lr_mults, wd_mults and Nesterov as inputs (a saved step's key then leaves them out)."""
    return bool(in_place and not hold and loss_scaling is None and opt.updates_in_place(trainable))


def grad_and_value_traced_or_eager(loss_fn):
    """``torch.func.grad_and_value(loss_fn, has_aux=True)`` where the step is traced by
    ``torch.compile``; run eagerly, the same values from ``torch.autograd.grad`` on detached copies
    of the inputs instead. Eager torch.func keeps every intermediate of the forward alive until
    the backward (pytorch/pytorch#134612): ResNet-50's uncompiled step peaked at 21.2 GiB on an
    H200 against the nn.Module's 10.7, and at 1.9x on a CPU (docs/BENCHMARKS.md, thirty-second
    session). ``loss_fn(flat_trainable, *rest) -> (loss, aux)``; the grads of leaves the loss does
    not reach are zeros, as torch.func gives them, and ``aux`` comes back detached."""
    traced = grad_and_value(loss_fn, has_aux=True)

    def grad_and_value_of(flat_trainable, *rest):
        if torch.compiler.is_compiling():
            return traced(flat_trainable, *rest)
        leaves = {name: t.detach().requires_grad_() for name, t in flat_trainable.items()}
        with torch.enable_grad():
            loss, aux = loss_fn(leaves, *rest)
        grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
        grads = {name: torch.zeros_like(leaves[name]) if g is None else g for name, g in zip(leaves, grads)}
        return grads, pytree.tree_map_only(torch.Tensor, torch.Tensor.detach, (loss, aux))

    return grad_and_value_of


def merged(flat_trainable, frozen):
    """The model's params from the trainable tree given flat, ``{dotted name: tensor}``, and the
    frozen tree. A step differentiates the trainable tree flat: torch.func then walks one dict, not
    a few hundred nested ones, which halves Dynamo's trace of a compiled step (docs/DESIGN.md).
    ``tree.merge`` checks the same overlap name by name, which traced costs ~6k more bytecodes
    (ResNet-50); one length check suffices here."""
    flat_frozen = tree.flatten(frozen)
    flat = {**flat_trainable, **flat_frozen}
    if len(flat) != len(flat_trainable) + len(flat_frozen):  # a frozen value would hide a trainable one
        raise ValueError(f"params both trainable and frozen: {sorted(set(flat_trainable) & set(flat_frozen))[:5]}")
    return tree.unflatten(flat)


def _like_input(model_state, new_model_state, prefix=""):
    """The new model state in the nested dicts of the one given (a stateless head's empty dict
    added or dropped by ``apply`` would change the structure, and a compiled step's guards on it
    would then fail on the next call: a second compile). A state leaf the input lacks is an error.
    One walk over both trees: it is traced into every compiled step."""
    for key, value in new_model_state.items():
        if key not in model_state and (not isinstance(value, dict) or tree.flatten(value)):
            raise ValueError(f"the model returned state the step was not given: {prefix}{key}")
    return {key: _like_input(value, new_model_state.get(key, {}), f"{prefix}{key}.")
            if isinstance(value, dict) else new_model_state[key] for key, value in model_state.items()}


def make_eval_step(model, *, topk=(1, 5), autocast=None) -> Callable:
    """Returns ``eval_step(params, model_state, batch) -> {head: {"top1": count, ...}, "count": n}``.

    Counts (not means) so that shards and batches add up exactly; ``batch["mask"]`` marks padding.
    Each head is scored on its own target by its loss's metrics (``fpipe.models.losses``);
    ``batch["classes"]`` (bool per class, ``eval_classes="present"``) limits the label heads' top-k
    to those classes (ImageNet-A/R: 200 of ImageNet's 1000); ``batch["real"]`` (each image's
    ImageNet-ReaL classes, -1 padded: ``data.real_labels``) adds their ``real_top1``.
    """
    targets = models.head_targets(model.heads)

    def eval_step(params, model_state, batch):
        with torch.no_grad(), precision.autocast(autocast, batch["label"].device.type):
            # Every keyword given: a default read off ``model`` cannot be saved (compile_cache).
            outputs, _ = model.apply(params, model_state, batch["image"], train=False, eval_norms=frozenset(),
                                     sync_stats=None)
        mask = batch.get("mask")
        valid = torch.ones_like(batch["label"], dtype=torch.bool) if mask is None else mask.bool()
        counts = {"count": valid.sum()}
        for name, logits in outputs.items():
            if logits.shape[0] != valid.shape[0]:  # one row per crop (data.eval_views): their mean
                logits = logits.float().reshape(-1, valid.shape[0], logits.shape[1]).mean(0)
            target, kind, _ = targets[name]
            if "classes" in batch and target == "label" and kind == "cross_entropy":
                logits = logits.masked_fill(~batch["classes"], float("-inf"))
            counts[name] = losses_lib.eval_counts(kind, logits, batch[target], valid, topk)
            if "real" in batch and target == "label" and kind == "cross_entropy":
                found = real.hits(logits, batch["real"], valid)
                counts[name]["real_top1"], counts["real_count"] = found["real_top1"], found["real_count"]
        return counts

    return eval_step


def _keep_held(new, old, held):
    """``new`` with the leaves named in ``held`` (or, in optimizer slots, ending in one) from ``old``."""
    old_flat = tree.flatten(old)
    return tree.unflatten({n: old_flat[n] if n in held or n.split(".", 1)[-1] in held else v
                           for n, v in tree.flatten(new).items()})


def maybe_compile(fn, enabled, name="step", cache=None, inductor=None, **options):
    """``torch.compile(fn, fullgraph=True)`` when enabled, with its first call (the compilation)
    announced and timed in the log. ``cache``: ``(directory, key)`` to load the compiled ``fn``
    from, or save it to (``fpipe.train.compile_cache``); ``inductor``: inductor options for both
    (``fpipe.train.remat.options``). A graph break or compiler error falls back to eager with a
    loud error naming the cause (or raises, when FPIPE_STRICT_COMPILE=1)."""
    if not enabled:
        return fn
    compile_cache.key_inductor_caches_by_isa()
    merged = {**options, "options": {**options.get("options", {}), **inductor}} if inductor else options
    compiled = torch.compile(fn, fullgraph=True, **merged)
    use = {"fn": compiled, "first": True}

    def run(*args):
        if use["fn"] is not fn:
            try:
                if not use["first"]:
                    return use["fn"](*args)
                logging.info("compiling the %s (first call)…", name)
                t0 = time.perf_counter()
                if cache is not None and not options:
                    use["fn"] = compile_cache.saved_or_compiled(fn, args, *cache, name, fallback=compiled,
                                                                inductor=inductor)
                out = use["fn"](*args)
                logging.info("%s %s in %.1f s", name, "loaded and run" if compile_cache.was_loaded(use["fn"])
                             else "compiled", time.perf_counter() - t0)
                use["first"] = False
                return out
            except Exception as e:  # a compiler error must not kill a run that works eagerly
                if use["first"] and _is_stride_mismatch(e):
                    raise RuntimeError(
                        f"The compiled {name} stopped at its first call: a kernel returned other strides than "
                        f"the compiler predicted ({_failed_op(e)}). This is a PyTorch bug, "
                        f"seen on CUDA where a feature map shrinks to 1x1 (pytorch/pytorch#171622). Use larger "
                        f"images (config.data.image_size) or --config.compile=False.") from e
                if not _is_compile_error(e) or os.environ.get(compile_cache.STRICT_COMPILE_ENV) == "1":
                    raise
                logging.error("torch.compile of the %s FAILED (%s: %s); running it EAGERLY (slower). "
                              "Set config.compile=False to skip compilation.", name, type(e).__name__,
                              str(e).splitlines()[0] if str(e) else "")
                use["fn"] = fn
        return fn(*args)

    return run


def _is_stride_mismatch(e):
    """Inductor's run-time check of a fallback kernel's output layout failed (``assert_size_stride``)."""
    return isinstance(e, AssertionError) and "Error in op:" in str(e) and "stride" in str(e)


def _failed_op(e):
    return next((l.strip() for l in str(e).splitlines() if "Error in op:" in l), "")


def _is_compile_error(e):
    mod = type(e).__module__ or ""
    return mod.startswith(("torch._dynamo", "torch._inductor")) or "BackendCompilerFailed" in type(e).__name__
