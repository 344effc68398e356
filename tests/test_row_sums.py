"""fpipe.train.row_sums: BatchNorm's sums taken row by row give BatchNorm's numbers."""
import pytest
import torch
import torch.utils._pytree as pytree
from torch.fx.experimental.proxy_tensor import make_fx
from torch._inductor.decomposition import select_decomp_table

from fpipe.models import layers
from fpipe.train import row_sums


def bn_inputs(n=2, c=64, h=8, w=8, dtype=torch.float32, channels_last=True, shift=0.0):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, c, h, w, generator=gen, dtype=dtype) * 2 + shift
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    p = {"weight": torch.rand(c, generator=gen, dtype=dtype) + 0.5, "bias": torch.randn(c, generator=gen, dtype=dtype)}
    s = {"running_mean": torch.zeros(c, dtype=dtype), "running_var": torch.ones(c, dtype=dtype),
         "num_batches_tracked": torch.tensor(0)}
    target = torch.randn(n, c, h, w, generator=gen, dtype=dtype)
    return p, s, x, target


def loss(p, s, x, target):
    y, new_s = layers.batch_norm(p, s, x, True)
    return (torch.relu(y) * target).sum(), new_s


def bn_grads(p, s, x, target):
    """BatchNorm + ReLU forward and backward: its statistics and the gradients of weight, bias and input."""
    grads, new_s = torch.func.grad(loss, argnums=(0, 2), has_aux=True)(p, s, x, target)
    return grads, new_s


def decomposed(*args):
    """bn_grads's ATen graph as inductor's post-grad passes see it (decomposed, fake values)."""
    fn = torch.func.functionalize(bn_grads, remove="mutations_and_views")
    return make_fx(fn, decomposition_table=select_decomp_table(), tracing_mode="fake")(*args)


def test_the_split_graph_gives_the_same_statistics_and_gradients():
    args = bn_inputs(n=3, c=64, h=5, w=8, shift=100.0)  # a large mean: the variance must not cancel
    gm = decomposed(*args)
    expected = gm(*args)
    assert row_sums.split_row_sums(gm.graph) == 3  # the forward's var_mean, the backward's two sums
    gm.graph.lint()
    gm.recompile()
    got = gm(*args)
    assert not any(n.target is torch.ops.aten.var_mean.correction and n.args[1] == [0, 2, 3] for n in gm.graph.nodes)
    for e, g in zip(pytree.tree_leaves(expected), pytree.tree_leaves(got)):
        if e.is_floating_point():
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5 * e.abs().max().item())
        else:
            assert torch.equal(g, e)
    x = args[2].double()
    torch.testing.assert_close(got[1]["running_var"].double(), 0.9 + 0.1 * x.var((0, 2, 3), correction=1),
                               rtol=1e-5, atol=0)


@pytest.mark.parametrize("case", [dict(channels_last=False), dict(c=32), dict(w=4), dict(dtype=torch.float64)],
                         ids=["nchw", "32_channels", "4_pixel_rows", "float64"])
def test_only_wide_float32_channels_last_activations_are_split(case):
    gm = decomposed(*bn_inputs(**case))
    before = [n.target for n in gm.graph.nodes]
    assert row_sums.split_row_sums(gm.graph) == 0
    assert [n.target for n in gm.graph.nodes] == before


def test_a_step_compiled_with_the_pass_matches_batchnorm2d(monkeypatch):
    rewrites = []
    split = row_sums.split_row_sums
    monkeypatch.setattr(row_sums, "split_row_sums", lambda graph: rewrites.append(split(graph)) or rewrites[-1])
    monkeypatch.setattr(torch._inductor.config, "fx_graph_cache", False)  # compiled here, not loaded
    monkeypatch.setattr(torch._functorch.config, "enable_autograd_cache", False)
    p, s, x, target = bn_inputs(n=2, c=64, h=4, w=8)
    torch._dynamo.reset()
    step = torch.compile(bn_grads, fullgraph=True, options={"post_grad_custom_pre_pass": row_sums.RowSums()})
    (g_p, g_x), new_s = step(p, s, x, target)
    assert rewrites == [3]

    bn = torch.nn.BatchNorm2d(64)
    with torch.no_grad():
        bn.weight.copy_(p["weight"])
        bn.bias.copy_(p["bias"])
    x_ref = x.clone().requires_grad_()
    (torch.relu(bn(x_ref)) * target).sum().backward()
    torch.testing.assert_close(g_x, x_ref.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(g_p["weight"], bn.weight.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(g_p["bias"], bn.bias.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(new_s["running_mean"], bn.running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(new_s["running_var"], bn.running_var, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("vendor, family, runs", [
    ("GenuineIntel", 6, True),
    ("AuthenticAMD", 26, True),   # Zen 5: measured faster
    ("AuthenticAMD", 25, True),   # Zen 3 and Zen 4: measured faster (Zen 4 at 224 px: even)
    ("AuthenticAMD", 23, False),  # Zen 2: never measured
    ("HygonGenuine", 24, False),
    ("", 0, False)])
def test_the_pass_runs_on_the_cpus_where_it_was_measured_faster(vendor, family, runs):
    assert row_sums.runs_on(vendor, family) is runs
