"""Max pooling whose gradient runs ATen's kernels inside a compiled step, on CPU.

Inductor (torch 2.13) writes a differentiated max pool as its own kernels: the forward computes
each window's max and its offset, and the backward is a ``scatter_add`` over an N·C × H·W view,
with layout copies around it for channels-last activations. On CPU these ran 3× slower than
ATen's native kernels (ResNet's stem pool at 128 px b48, forward and backward: 21 vs 7 ms;
docs/BENCHMARKS.md, thirty-fourth session). Here the pool and its gradient are custom ops that
call ATen's ``max_pool2d_with_indices`` and its backward, opaque to the compiler, wrapped in an
``autograd.Function`` (with ``setup_context``, so ``torch.func.grad`` traces it). Same values as
``F.max_pool2d``, bit for bit. The backward keeps only the int64 indices, not the input.

Used where a gradient flows on CPU; otherwise (no grad, or a GPU) ``F.max_pool2d`` as before.
The gate also keeps gradients right: under ``torch.compile`` of ``torch.func.grad`` (torch 2.13) an
``autograd.Function`` applied to a constant or to the differentiated argument itself has its
forward differentiated instead of its backward called (pytorch/pytorch#193279; here a zero
gradient, silently), and such an input does not require grad while traced. Double backward
through the pool is not supported.
"""
import torch
import torch.nn.functional as F

aten = torch.ops.aten


def _pool_aten(x: torch.Tensor, kernel: list[int], stride: list[int], padding: list[int],
               ceil_mode: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return aten.max_pool2d_with_indices(x, kernel, stride, padding, [1, 1], ceil_mode)


def _pool_backward_aten(grad: torch.Tensor, indices: torch.Tensor, input_size: list[int], input_strides: list[int],
                        kernel: list[int], stride: list[int], padding: list[int], ceil_mode: bool) -> torch.Tensor:
    # ATen's backward reads only the shape and strides (its memory format) of the pool's input: an
    # empty stand-in with the same ones, so the step never keeps the input alive for it.
    like = torch.empty_strided(input_size, input_strides, dtype=grad.dtype, device=grad.device)
    return aten.max_pool2d_with_indices_backward(grad, like, kernel, stride, padding, [1, 1], ceil_mode, indices)


# The same functions serve as the ops' fake (shape) implementations: ATen's ops run on fake tensors.
_pool = torch.library.custom_op("fpipe::max_pool2d_with_indices", _pool_aten, mutates_args=())
_pool.register_fake(_pool_aten)
_pool_backward = torch.library.custom_op("fpipe::max_pool2d_backward", _pool_backward_aten, mutates_args=())
_pool_backward.register_fake(_pool_backward_aten)


class _MaxPool(torch.autograd.Function):
    @staticmethod
    def forward(x, kernel, stride, padding, ceil_mode):
        # detached: the custom op's own autograd wrapper must not see a tensor that needs grad
        return _pool(x.detach(), kernel, stride, padding, ceil_mode)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, kernel, stride, padding, ceil_mode = inputs
        ctx.save_for_backward(output[1])
        ctx.mark_non_differentiable(output[1])
        ctx.pool = (list(x.shape), list(x.stride()), kernel, stride, padding, ceil_mode)

    @staticmethod
    def backward(ctx, grad, _):
        indices, = ctx.saved_tensors
        return _pool_backward(grad.detach(), indices, *ctx.pool), None, None, None, None


def max_pool2d(x, kernel, stride=None, padding=0, ceil_mode=False):
    """``F.max_pool2d(x, kernel, stride, padding, ceil_mode=ceil_mode)`` (dilation 1); on CPU
    with a gradient to compute, through ATen's kernels as above."""
    stride = kernel if stride is None else stride
    if not (x.requires_grad and torch.is_grad_enabled() and x.device.type == "cpu" and x.dim() == 4):
        return F.max_pool2d(x, kernel, stride, padding, ceil_mode=ceil_mode)
    pair = lambda v: [v, v] if isinstance(v, int) else list(v)
    return _MaxPool.apply(x, pair(kernel), pair(stride), pair(padding), ceil_mode)[0]
