"""The train step: one pure function of (train state, batch, lr), built with ``torch.func``.

``grad_and_value`` differentiates the loss w.r.t. the trainable tree only; frozen params and
norm layers are plain inputs, so a frozen trunk builds no autograd graph and keeps no
activations for backward. The step returns a new train state; nothing is mutated in place.
"""
import contextlib
from typing import Callable

import torch
import torch.nn.functional as F
from absl import logging
from torch.func import grad_and_value

from fpipe import tree


def heads_loss(outputs, labels):
    """Cross-entropy per head, summed: every head learns from the same labels."""
    losses = {name: F.cross_entropy(logits.float(), labels) for name, logits in outputs.items()}
    return sum(losses.values()), losses


def make_step(model, opt, *, eval_norms=frozenset(), clip=None, grad_reduce=None, sync_stats=None,
              autocast=None) -> Callable:
    """Returns ``step(train_state, batch, lr) -> (train_state, metrics)``.

    train_state: ``{"trainable", "frozen", "model_state", "opt_state"}`` trees.
    clip: ``grads -> (grads, grad_norm)`` (from fpipe.optim); grad_reduce: averages grads across
    processes (data parallel); sync_stats: SyncBN's all-reduce of BatchNorm statistics;
    autocast: a dtype for mixed precision, or None.
    """
    def loss_fn(trainable, frozen, model_state, batch):
        params = tree.merge(trainable, frozen)
        with _autocast(autocast, batch["image"]):
            outputs, new_model_state = model.apply(params, model_state, batch["image"], train=True,
                                                   eval_norms=eval_norms, sync_stats=sync_stats)
        loss, losses = heads_loss(outputs, batch["label"])
        return loss, (losses, outputs, new_model_state)

    grad_fn = grad_and_value(loss_fn, has_aux=True)

    def step(train_state, batch, lr):
        grads, (loss, (losses, outputs, new_model_state)) = grad_fn(
            train_state["trainable"], train_state["frozen"], train_state["model_state"], batch)
        if grad_reduce is not None:
            grads = grad_reduce(grads)
        grads, grad_norm = clip(grads) if clip is not None else (grads, _global_norm(grads))
        trainable, opt_state = opt.update(grads, train_state["opt_state"], train_state["trainable"], lr)
        metrics = {"loss": loss.detach(), "grad_norm": grad_norm}
        for name, head_loss in losses.items():
            metrics[f"{name}/loss"] = head_loss.detach()
            metrics[f"{name}/train_top1"] = (outputs[name].argmax(1) == batch["label"]).float().mean()
        new_state = {**train_state, "trainable": trainable, "model_state": new_model_state,
                     "opt_state": opt_state}
        return new_state, metrics

    return step


def make_eval_step(model, *, topk=(1, 5), autocast=None) -> Callable:
    """Returns ``eval_step(params, model_state, batch) -> {head: {"top1": count, ...}, "count": n}``.

    Counts (not means) so that shards and batches add up exactly; ``batch["mask"]`` marks padding.
    """
    def eval_step(params, model_state, batch):
        with torch.no_grad(), _autocast(autocast, batch["image"]):
            outputs, _ = model.apply(params, model_state, batch["image"], train=False)
        mask = batch.get("mask")
        valid = torch.ones_like(batch["label"], dtype=torch.bool) if mask is None else mask.bool()
        counts = {"count": valid.sum()}
        for name, logits in outputs.items():
            k_max = min(max(topk), logits.shape[1])
            top = logits.float().topk(k_max, dim=1).indices
            hit = top == batch["label"][:, None]
            counts[name] = {f"top{k}": (hit[:, :min(k, k_max)].any(1) & valid).sum() for k in topk}
        return counts

    return eval_step


def _global_norm(grads):
    leaves = tree.leaves(grads)
    if not leaves:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in leaves]))


def _autocast(dtype, like):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=like.device.type, dtype=dtype)


def maybe_compile(fn, enabled, name="step", **options):
    """``torch.compile(fn)`` when enabled; if compiling fails, logs why and runs eagerly."""
    if not enabled:
        return fn
    compiled = torch.compile(fn, **options)
    use = {"fn": compiled}

    def run(*args):
        if use["fn"] is compiled:
            try:
                return compiled(*args)
            except Exception as e:  # a compiler error must not kill a run that works eagerly
                if not _is_compile_error(e):
                    raise
                logging.warning("torch.compile of %s failed (%s: %s); running it eagerly. Set "
                                "config.compile=False to skip compilation.", name, type(e).__name__,
                                str(e).splitlines()[0] if str(e) else "")
                use["fn"] = fn
        return use["fn"](*args)

    return run


def _is_compile_error(e):
    mod = type(e).__module__ or ""
    return mod.startswith(("torch._dynamo", "torch._inductor")) or "BackendCompilerFailed" in type(e).__name__
