"""fpipe.fused_update: the in-place fused SGD and AdamW ops against torch.optim, in any layout."""
import pytest
import torch

from fpipe import fused_update

SHAPES = ((6, 4, 3, 3), (5, 4, 1, 1), (7,), (3, 5))


def _layout(t, kind):
    """``t``'s values in another memory layout (a 4-d tensor: channels-last or permuted)."""
    if t.dim() != 4 or kind == "contiguous":
        return t.contiguous()
    if kind == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    return t.permute(1, 0, 3, 2).contiguous().permute(1, 0, 3, 2)  # dense, strides in another order


def _values(seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen) for s in SHAPES]


# (param layout, grad layout, slot layout): the kernels walk memory; differing layouts must not mix elements up
LAYOUTS = [("channels_last", "channels_last", "channels_last"), ("channels_last", "contiguous", "channels_last"),
           ("contiguous", "channels_last", "permuted"), ("permuted", "contiguous", "channels_last")]


# Per-param rules (optim.lr_mults, optim.wd_mults) as the ops take them: param i at lr × LR_MULTS[i]
LR_MULTS, WD_MULTS = (1.0, 1.0, 0.5, 2.0), (1.0, 1.0, 0.0, 0.5)


def _torch_steps(make_opt, steps, lr, wd):
    """torch.optim's steps with one param group per param, at its lr and weight decay multipliers."""
    params = [p.clone().requires_grad_() for p in _values(0)]
    opt = make_opt([{"params": [p], "lr": lr * m, "weight_decay": wd * w} for p, m, w in zip(params, LR_MULTS, WD_MULTS)])
    for step in range(steps):
        for p, g in zip(params, _values(step + 1)):
            p.grad = g
        opt.step()
    return [p.detach() for p in params]


@pytest.mark.parametrize("layouts", LAYOUTS)
@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_matches_torch_in_any_layout(layouts, nesterov):
    p_layout, g_layout, s_layout = layouts
    ref = _torch_steps(lambda groups: torch.optim.SGD(groups, momentum=0.9, nesterov=nesterov, foreach=False),
                       steps=3, lr=0.1, wd=0.01)
    params = [_layout(p, p_layout) for p in _values(0)]
    bufs = [_layout(torch.zeros_like(p), s_layout) for p in params]
    given = list(params)
    for step in range(3):
        grads = [_layout(g, g_layout) for g in _values(step + 1)]
        fused_update.sgd_(params, grads, bufs, torch.tensor(0.1), torch.tensor(LR_MULTS), torch.tensor(0.01),
                          torch.tensor(WD_MULTS), torch.tensor(0.9), torch.tensor(float(nesterov)))
    for ours, theirs, g in zip(params, ref, given):
        assert ours is g
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layouts", LAYOUTS)
def test_adamw_matches_torch_in_any_layout(layouts):
    p_layout, g_layout, s_layout = layouts
    ref = _torch_steps(lambda groups: torch.optim.AdamW(groups, betas=(0.9, 0.999), eps=1e-8, foreach=False),
                       steps=3, lr=0.01, wd=0.05)
    params = [_layout(p, p_layout) for p in _values(0)]
    mu = [_layout(torch.zeros_like(p), s_layout) for p in params]
    nu = [_layout(torch.zeros_like(p), s_layout) for p in params]
    for step in range(3):
        grads = [_layout(g, g_layout) for g in _values(step + 1)]
        fused_update.adamw_(params, grads, mu, nu, torch.tensor(step + 1), torch.tensor(0.01), torch.tensor(LR_MULTS),
                            torch.tensor(0.05), torch.tensor(WD_MULTS), torch.tensor(0.1), torch.tensor(0.001),
                            torch.tensor(1e-8))
    for ours, theirs in zip(params, ref):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_the_fused_kernels_apply_only_to_dense_params_of_one_device_and_float_dtype():
    dense = [torch.zeros(4, 3, 2, 2).contiguous(memory_format=torch.channels_last), torch.zeros(3)]
    assert fused_update.applies(dense)
    assert not fused_update.applies(dense + [torch.zeros(4, 6)[:, :3]])  # a gap in its memory
    assert not fused_update.applies(dense + [torch.zeros(3).expand(4, 3)])  # overlapping elements
    assert not fused_update.applies([torch.zeros(3, dtype=torch.float64)])
    assert not fused_update.applies([torch.zeros(3), torch.zeros(3, dtype=torch.bfloat16)])


def test_applies_traces_with_symbolic_shapes():
    """A step recompiled with dynamic shapes (Dynamo's automatic dynamic) decides it on SymInts."""
    decide = torch.compile(lambda ps: torch.ones(()) if fused_update.applies(ps) else torch.zeros(()),
                           dynamic=True, fullgraph=True)
    conv = torch.zeros(4, 3, 3, 3).contiguous(memory_format=torch.channels_last)
    assert decide([conv, torch.zeros(5)]).item() == 1
    assert decide([torch.zeros(6, 4)[:, :2]]).item() == 0
