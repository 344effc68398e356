"""Mixed precision: autocast by config, and fp16's dynamic loss scaling as pure state.

Params, gradients and optimizer state stay float32 ("master" params) whatever the precision:
autocast only runs the forward's matmuls and convolutions in the lower dtype.

- ``bf16`` (CPU and CUDA): autocast alone; bfloat16 has float32's range, so no loss scaling.
- ``fp16`` (CUDA): autocast plus dynamic loss scaling. The scaler is a dict of two tensors,
  ``{"scale", "growth_tracker"}``, carried in the train state (so it is checkpointed with it) and
  updated exactly as ``torch.amp.GradScaler`` with the same settings:

      loss * scale -> grads (scaled) -> [mean over ranks] -> unscale (x 1/scale), found_inf
      -> optimizer update, kept only where found_inf is False (torch.where, no Python branch)
      -> scale x backoff_factor on found_inf, x growth_factor after growth_interval good steps.

  ``make_scaled_step`` is ``step.make_step`` with these stages; its train state has a ``"scaler"``.
"""
import contextlib
from typing import Callable, Optional

import ml_collections
import torch
from torch.func import grad_and_value

from fpipe import tree
from fpipe.train import step as step_lib

DTYPES = {"float32": None, "fp32": None, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


def default_config() -> ml_collections.ConfigDict:
    """``config.precision``: the autocast dtype and the loss scaler's settings (GradScaler's defaults)."""
    c = ml_collections.ConfigDict()
    c.dtype = "float32"  # float32 | bf16 | fp16 (fp16: CUDA only, with dynamic loss scaling)
    c.init_scale = 2.0 ** 16
    c.growth_factor = 2.0
    c.backoff_factor = 0.5
    c.growth_interval = 2000
    return c


_DEFAULTS = default_config()


def _get(cfg, key):
    return cfg[key] if cfg is not None and key in cfg else _DEFAULTS[key]


def autocast_dtype(cfg_or_name, device) -> Optional[torch.dtype]:
    """The autocast dtype (None: float32) for ``config.precision`` (or its ``dtype`` string)."""
    name = cfg_or_name if isinstance(cfg_or_name, str) or cfg_or_name is None else _get(cfg_or_name, "dtype")
    name = name or "float32"
    if name not in DTYPES:
        raise ValueError(f"unknown precision {name!r}; valid: {', '.join(DTYPES)}")
    dtype = DTYPES[name]
    if dtype == torch.float16 and torch.device(device).type != "cuda":
        raise ValueError(f"precision fp16 (with loss scaling) needs CUDA; on {device} use bf16 or float32")
    return dtype


def needs_scaler(cfg_or_name) -> bool:
    name = cfg_or_name if isinstance(cfg_or_name, str) or cfg_or_name is None else _get(cfg_or_name, "dtype")
    return DTYPES.get(name or "float32") == torch.float16


def autocast(dtype: Optional[torch.dtype], device_type: str):
    """``torch.autocast`` for ``dtype``, or a no-op context for float32 (``None``)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=dtype)


# ---------------------------------------------------------------- the loss scaler, as pure functions
def scaler_init(cfg=None, device="cpu") -> dict:
    """``{"scale": float32 0-d, "growth_tracker": int32 0-d}`` (GradScaler's ``_scale`` and tracker)."""
    return {"scale": torch.full((), float(_get(cfg, "init_scale")), dtype=torch.float32, device=device),
            "growth_tracker": torch.zeros((), dtype=torch.int32, device=device)}


def scale_loss(loss: torch.Tensor, scaler: dict) -> torch.Tensor:
    return loss * scaler["scale"].to(loss.dtype)


def unscale(grads: dict, scaler: dict) -> tuple:
    """``(grads / scale, found_inf)``; found_inf (0-d bool) is True if any scaled gradient is inf/NaN.

    One fused check: the max-norm of every leaf in one ``_foreach_norm`` (NaN and inf propagate
    through a max), then one ``isfinite`` over the stacked norms. The reciprocal is taken in
    float64, as GradScaler does.
    """
    leaves = tree.leaves(grads)
    if not leaves:
        return grads, torch.zeros((), dtype=torch.bool, device=scaler["scale"].device)
    norms = torch._foreach_norm(leaves, float("inf"))
    found_inf = ~torch.isfinite(torch.stack([n.float() for n in norms])).all()
    inv_scale = scaler["scale"].double().reciprocal().float()
    return tree.map_leaves(lambda g: g * inv_scale.to(g.dtype), grads), found_inf


def where_finite(found_inf: torch.Tensor, new: dict, old: dict) -> dict:
    """Leafwise ``old if found_inf else new``: skips an update without a Python branch."""
    return tree.map_leaves(lambda n, o: torch.where(found_inf, o, n), new, old)


def update_scaler(scaler: dict, found_inf: torch.Tensor, cfg=None) -> dict:
    """GradScaler.update: back off on found_inf (tracker to 0); otherwise count a good step and
    grow the scale after ``growth_interval`` of them in a row (if the grown scale is finite)."""
    scale, tracker = scaler["scale"], scaler["growth_tracker"]
    good = tracker + 1
    grow = good >= int(_get(cfg, "growth_interval"))
    grown = scale * float(_get(cfg, "growth_factor"))
    grown = torch.where(torch.isfinite(grown), grown, scale)
    new_scale = torch.where(found_inf, scale * float(_get(cfg, "backoff_factor")),
                            torch.where(grow, grown, scale))
    new_tracker = torch.where(found_inf | grow, torch.zeros_like(tracker), good)
    return {"scale": new_scale, "growth_tracker": new_tracker}


# ---------------------------------------------------------------- the step with loss scaling
def make_scaled_step(model, opt, *, scaler_cfg=None, eval_norms=frozenset(), clip=None,
                     grad_reduce=None, sync_stats=None, autocast=torch.float16) -> Callable:
    """``step(train_state, batch, lr) -> (train_state, metrics)`` like ``step.make_step``, with
    dynamic loss scaling; ``train_state["scaler"]`` comes from :func:`scaler_init`.

    The gradient mean over ranks runs on the scaled gradients, so every rank sees the same
    found_inf and skips (or not) together, as DDP + GradScaler do. A skipped step keeps params and
    optimizer state (its step count included) but, as in PyTorch, the BatchNorm running statistics
    of the forward pass are kept. Metrics add ``loss_scale`` (before the update) and ``skipped``.
    """
    def loss_fn(trainable, frozen, model_state, batch, scale):
        params = tree.merge(trainable, frozen)
        with _autocast_like(autocast, batch["image"]):
            outputs, new_model_state = model.apply(params, model_state, batch["image"], train=True,
                                                   eval_norms=eval_norms, sync_stats=sync_stats)
        loss, losses = step_lib.heads_loss(outputs, batch["label"])
        return loss * scale, (loss, losses, outputs, new_model_state)

    grad_fn = grad_and_value(loss_fn, has_aux=True)

    def step(train_state, batch, lr):
        scaler = train_state["scaler"]
        grads, (_, (loss, losses, outputs, new_model_state)) = grad_fn(
            train_state["trainable"], train_state["frozen"], train_state["model_state"], batch,
            scaler["scale"])
        if grad_reduce is not None:
            grads = grad_reduce(grads)
        grads, found_inf = unscale(grads, scaler)
        grads, grad_norm = clip(grads) if clip is not None else (grads, step_lib._global_norm(grads))
        trainable, opt_state = opt.update(grads, train_state["opt_state"], train_state["trainable"], lr)
        trainable = where_finite(found_inf, trainable, train_state["trainable"])
        opt_state = where_finite(found_inf, opt_state, train_state["opt_state"])
        metrics = {"loss": loss.detach(), "grad_norm": grad_norm, "loss_scale": scaler["scale"],
                   "skipped": found_inf.float()}
        for name, head_loss in losses.items():
            metrics[f"{name}/loss"] = head_loss.detach()
            metrics[f"{name}/train_top1"] = (outputs[name].argmax(1) == batch["label"]).float().mean()
        new_state = {**train_state, "trainable": trainable, "model_state": new_model_state,
                     "opt_state": opt_state, "scaler": update_scaler(scaler, found_inf, scaler_cfg)}
        return new_state, metrics

    return step


def _autocast_like(dtype, like):
    return autocast(dtype, like.device.type)
