"""In-place SGD and AdamW updates with PyTorch's fused kernels, as custom ops.

Inside a compiled step inductor would generate, and g++ compile, one kernel per parameter for the
update (ViT-S/16 with AdamW: ~40 s of a ~85 s compile on 2 cores); the fused kernels that
``torch.optim`` uses (``fused=True``) do the same arithmetic in one pass per tensor, in place. As
custom ops they stay opaque to the compiler: one call for all parameters.

They write into the params and the optimizer's slots, so only a step whose inputs are donated
(fpipe.train.donation) may call them; ``fpipe.optim.Optimizer.update(..., in_place=True)`` does.
The tensor inputs (lr, weight decay, betas, the per-param multipliers, ...) are read on the host,
as CPU tensors: no sync. Params sharing their lr and weight decay go to one kernel call.

The fused kernels walk a param, its grad and its slots as flat arrays, element i of one against
element i of the others, whatever their strides: a channels-last param with a grad in another
layout gets another element's gradient, silently. So each tensor goes to the kernel as a 1-d view
of its memory (:func:`_memory_order`), after any grad or slot whose strides differ from its
param's was copied into the param's layout (:func:`_aligned`; a slot's copy is written back).
"""
import contextlib

import torch

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def applies(params: list) -> bool:
    """Whether the fused kernels take these params: one device (CPU or CUDA), one float dtype, each
    param dense (no gaps or overlaps in the memory that the kernels walk as a flat array)."""
    kinds = {(p.device.type, p.dtype) for p in params}
    if len(kinds) != 1 or not all(map(_dense, params)):
        return False
    (device_type, dtype), = kinds
    return device_type in ("cpu", "cuda") and dtype in DTYPES


def _dense(t) -> bool:
    """True when ``t`` fills its memory exactly once, contiguous or channels-last (the layouts of
    fpipe's params; a rarer one takes the functional update). Also with symbolic shapes."""
    return t.is_contiguous() or (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last))


def _memory_order(t):
    """A dense tensor as a 1-d view of its memory (element i: the i-th in memory)."""
    return t.as_strided((t.numel(),), (1,), t.storage_offset())


def _aligned(params, tensors):
    """Each tensor with its param's strides: itself where they match, else a copy in that layout."""
    return [t if t.stride() == p.stride() else torch.empty_like(p).copy_(t) for p, t in zip(params, tensors)]


@contextlib.contextmanager
def _in_memory_order(params, grads, *slots):
    """Flat views of params, grads and slots, each in its param's layout, for a fused kernel; on
    exit a slot that had to be copied gets the updated values back."""
    grads, aligned = _aligned(params, grads), [_aligned(params, s) for s in slots]
    yield [[_memory_order(t) for t in ts] for ts in (params, grads, *aligned)]
    for given, used in zip(slots, aligned):
        for g, u in zip(given, used):
            if u is not g:
                g.copy_(u)


def _groups(lr, lr_mults, weight_decay, wd_mults) -> list:
    """``[(lr, weight decay, indices)]``: the params sharing their lr × lr_mult and weight decay ×
    wd_mult, products taken in float32 (as the functional update takes them), read on the host."""
    groups = {}
    for i, key in enumerate(zip((lr * lr_mults).tolist(), (weight_decay * wd_mults).tolist())):
        groups.setdefault(key, []).append(i)
    return [(lr_i, wd_i, indices) for (lr_i, wd_i), indices in groups.items()]


def _pick(indices, *lists):
    return [[ts[i] for i in indices] if ts else [] for ts in lists]


@torch.library.custom_op("fpipe::adamw_", mutates_args=("params", "mu", "nu"))
def adamw_(params: list[torch.Tensor], grads: list[torch.Tensor], mu: list[torch.Tensor], nu: list[torch.Tensor],
           count: torch.Tensor, lr: torch.Tensor, lr_mults: torch.Tensor, weight_decay: torch.Tensor,
           wd_mults: torch.Tensor, one_minus_beta1: torch.Tensor, one_minus_beta2: torch.Tensor,
           eps: torch.Tensor) -> None:
    """torch.optim.AdamW's fused step at step ``count`` (already incremented), param i at lr ×
    ``lr_mults[i]`` and weight decay × ``wd_mults[i]``: the rules are inputs, so a compiled step
    serves any of them. The betas come as 1 - beta (float32 holds 1 - 0.999 to 5e-8; 0.999 itself
    to 1e-5 of 1 - 0.999)."""
    step = count.to(device=params[0].device, dtype=torch.float32)
    for lr_i, wd_i, indices in _groups(lr, lr_mults, weight_decay, wd_mults):
        with _in_memory_order(*_pick(indices, params, grads, mu, nu)) as (ps, gs, ms, ns):
            torch._fused_adamw_(ps, gs, ms, ns, [], [step] * len(ps), lr=lr_i,
                                beta1=1 - float(one_minus_beta1), beta2=1 - float(one_minus_beta2),
                                weight_decay=wd_i, eps=float(eps), amsgrad=False, maximize=False)


@adamw_.register_fake
def _(params, grads, mu, nu, count, lr, lr_mults, weight_decay, wd_mults, one_minus_beta1, one_minus_beta2, eps):
    return None


@torch.library.custom_op("fpipe::sgd_", mutates_args=("params", "momentum_buffers"))
def sgd_(params: list[torch.Tensor], grads: list[torch.Tensor], momentum_buffers: list[torch.Tensor],
         lr: torch.Tensor, lr_mults: torch.Tensor, weight_decay: torch.Tensor, wd_mults: torch.Tensor,
         momentum: torch.Tensor, nesterov: torch.Tensor) -> None:
    """torch.optim.SGD's fused step (dampening 0), param i at lr × ``lr_mults[i]`` and weight decay
    × ``wd_mults[i]``; ``nesterov`` 0 or 1. ``momentum_buffers`` empty without momentum. The buffers
    start at zero, so the first step gives buf = d as torch.optim's does."""
    for lr_i, wd_i, indices in _groups(lr, lr_mults, weight_decay, wd_mults):
        with _in_memory_order(*_pick(indices, params, grads, momentum_buffers)) as (ps, gs, bufs):
            torch._fused_sgd_(ps, gs, bufs, weight_decay=wd_i, momentum=float(momentum), lr=lr_i,
                              dampening=0.0, nesterov=bool(nesterov), maximize=False, is_first_step=False)


@sgd_.register_fake
def _(params, grads, momentum_buffers, lr, lr_mults, weight_decay, wd_mults, momentum, nesterov):
    return None
