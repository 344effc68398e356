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

  ``step.make_step(..., loss_scaling=config.precision)`` runs these stages; its train state then
  has a ``"scaler"``.
"""
import contextlib
from typing import Optional

import torch

from fpipe import defaults, tree

DTYPES = {"float32": None, "fp32": None, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


default_config = defaults.precision  # config.precision: fpipe/defaults.py
_DEFAULTS = default_config()


def _get(cfg, key):
    return cfg[key] if cfg is not None and key in cfg else _DEFAULTS[key]


def dtype_name(cfg_or_name) -> str:
    """The dtype string of ``config.precision`` (or that string itself; None: "float32")."""
    name = cfg_or_name if isinstance(cfg_or_name, str) or cfg_or_name is None else _get(cfg_or_name, "dtype")
    return name or "float32"


def autocast_dtype(cfg_or_name, device) -> Optional[torch.dtype]:
    """The autocast dtype (None: float32) for ``config.precision`` (or its ``dtype`` string)."""
    name = dtype_name(cfg_or_name)
    if name not in DTYPES:
        raise ValueError(f"unknown precision {name!r}; valid: {', '.join(DTYPES)}")
    dtype = DTYPES[name]
    if dtype == torch.float16 and torch.device(device).type != "cuda":
        raise ValueError(f"precision fp16 (with loss scaling) needs CUDA; on {device} use bf16 or float32")
    return dtype


def needs_scaler(cfg_or_name) -> bool:
    return DTYPES.get(dtype_name(cfg_or_name)) == torch.float16


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
