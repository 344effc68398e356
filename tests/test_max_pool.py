"""fpipe.models.max_pool: F.max_pool2d's values and gradients, through ATen's kernels in a compiled step."""
import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.testing import CompileCounterWithBackend

from fpipe.models import layers
from fpipe.models import max_pool

CASES = [  # (kernel, stride, padding, ceil_mode): the ResNet stem, AlexNet's, and odd ones
    (3, 2, 1, False), (3, 2, 0, False), (2, 2, 0, True), (3, 1, 1, False), ((3, 2), (2, 1), (1, 0), True)]


def relu_images(channels_last, n=3, c=5, h=11, w=9):
    """Post-ReLU activations with many ties (zeros, and repeated values), where the gradient's
    owner in a window (the first max, as ATen picks) matters."""
    gen = torch.Generator().manual_seed(0)
    x = torch.relu(torch.randint(-3, 4, (n, c, h, w), generator=gen).float() + torch.randn(n, c, h, w, generator=gen) * (
        torch.rand(n, c, h, w, generator=gen) < 0.3))
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def f_max_pool2d(x, kernel, stride, padding, ceil_mode):
    """The reference: PyTorch's own pool, with a case's arguments."""
    return F.max_pool2d(x, kernel, stride, padding, ceil_mode=ceil_mode)


def loss(x, weights, pool, args):
    return (pool(x, *args) * weights).sum()


@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("args", CASES)
def test_values_and_gradients_equal_f_max_pool2d_bit_for_bit(args, channels_last):
    """Eager, by torch.func.grad (as fpipe's step) and by autograd, ties included."""
    x = relu_images(channels_last)
    weights = torch.randn_like(f_max_pool2d(x, *args))
    assert torch.equal(max_pool.max_pool2d(x, *args), f_max_pool2d(x, *args))
    want = torch.func.grad(loss)(x, weights, f_max_pool2d, args)
    assert torch.equal(torch.func.grad(loss)(x, weights, max_pool.max_pool2d, args), want)
    leaf = x.clone().requires_grad_()
    loss(leaf, weights, max_pool.max_pool2d, args).backward()
    assert torch.equal(leaf.grad, want)
    assert leaf.grad.is_contiguous(memory_format=torch.channels_last) == channels_last


def test_a_compiled_gradient_runs_the_custom_ops_and_equals_eager():
    """Traced as the train step traces it (torch.func.grad under torch.compile, inductor): the
    graph holds the opaque ops, not inductor's scatter decomposition, and gives eager's numbers."""
    x = relu_images(True)
    w = torch.randn(5, 5, 3, 3).contiguous(memory_format=torch.channels_last)

    def net_loss(w, x):
        return layers.max_pool(torch.relu(F.conv2d(x, w, padding=1))).square().sum()

    counter = CompileCounterWithBackend("inductor")
    grad = torch.func.grad(net_loss)
    compiled = torch.compile(grad, backend=counter, fullgraph=True)
    got = compiled(w, x)
    assert counter.frame_count == 1
    assert torch.equal(got, grad(w, x))
    reference = torch.func.grad(lambda w, x: F.max_pool2d(torch.relu(F.conv2d(x, w, padding=1)), 3, 2, 1).square().sum())
    torch.testing.assert_close(got, reference(w, x), rtol=1e-5, atol=1e-5)
    graph = "\n".join(gm.print_readable(print_output=False) for gm in counter.graphs)
    for op in ("fpipe.max_pool2d_with_indices", "fpipe.max_pool2d_backward"):  # in the autograd.Function's graphs
        assert op in graph, graph


def test_without_a_gradient_it_is_f_max_pool2d(monkeypatch):
    """No grad (evaluation, a frozen trunk) or a 3-d input: F.max_pool2d itself, which inductor
    fuses with the ReLU before it; the custom op only where a gradient flows."""
    calls = []
    monkeypatch.setattr(max_pool._MaxPool, "apply", lambda *a: calls.append(1) or F.max_pool2d(a[0], 3, 2, 1, return_indices=True))
    x = relu_images(True).requires_grad_()
    with torch.no_grad():
        max_pool.max_pool2d(x, 3, 2, 1)
    max_pool.max_pool2d(x.detach(), 3, 2, 1)
    max_pool.max_pool2d(x[0], 3, 2, 1)
    assert calls == []
    max_pool.max_pool2d(x, 3, 2, 1)
    assert calls == [1]


def test_a_compiled_gradient_with_respect_to_the_pools_own_input_is_right():
    """``torch.compile`` of ``torch.func.grad`` (torch 2.13) differentiates an autograd.Function's
    forward instead of calling its backward when the Function's input is the differentiated
    argument itself (here that forward's custom op would give a zero gradient, silently). The
    pool's gate (``x.requires_grad``, False there while tracing) keeps such a call on F.max_pool2d."""
    x, args = relu_images(True), CASES[0]
    weights = torch.randn_like(f_max_pool2d(x, *args))
    want = torch.func.grad(loss)(x, weights, f_max_pool2d, args)
    got = torch.compile(torch.func.grad(loss), backend="aot_eager", fullgraph=True)(x, weights, max_pool.max_pool2d, args)
    assert want.abs().sum() > 0
    torch.testing.assert_close(got, want)
