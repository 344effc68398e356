"""fpipe.detection.losses against torchvision's formulas on boolean-indexed (dynamic-size) tensors."""
import torch
import torch.nn.functional as F

from fpipe.detection import losses as L
from fpipe.detection import sampling as S


def _rpn_case(seed):
    gen = torch.Generator().manual_seed(seed)
    n, a = 3, 200
    u = torch.rand(n, a, generator=gen)
    labels = torch.where(u < 0.1, 1, torch.where(u < 0.3, -1, 0))
    labels[2] = torch.where(labels[2] == 1, 0, labels[2])  # an image without positives
    targets = torch.randn(n, a, 4, generator=gen)
    targets[labels != 1] = float("nan")  # anything where no box loss is taken
    objectness = torch.randn(n, a, generator=gen, requires_grad=True)
    deltas = torch.randn(n, a, 4, generator=gen, requires_grad=True)
    return objectness, deltas, labels, targets, S.sample(labels, 32, 0.5, gen)


def test_rpn_loss_matches_torchvision_formula_and_gradients():
    objectness, deltas, labels, targets, sampled = _rpn_case(0)
    got = L.rpn_loss(objectness, deltas, labels, targets, *sampled)
    pos = S.to_masks(sampled[0], sampled[1], 200).flatten()
    neg = S.to_masks(sampled[2], sampled[3], 200).flatten()
    inds = torch.cat([torch.where(pos)[0], torch.where(neg)[0]])
    box = F.smooth_l1_loss(deltas.reshape(-1, 4)[pos], targets.reshape(-1, 4)[pos], beta=1 / 9, reduction="sum")
    want = (F.binary_cross_entropy_with_logits(objectness.flatten()[inds], labels.flatten()[inds].float()),
            box / inds.numel())
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[1], want[1])
    g_got = torch.autograd.grad(got[0] + got[1], (objectness, deltas))
    g_want = torch.autograd.grad(want[0] + want[1], (objectness, deltas))
    for a, b in zip(g_got, g_want):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b)


def test_fastrcnn_loss_matches_torchvision_formula_and_gradients():
    gen = torch.Generator().manual_seed(1)
    n, r, c = 2, 16, 5
    logits = torch.randn(n, r, c, generator=gen, requires_grad=True)
    regression = torch.randn(n, r, c * 4, generator=gen, requires_grad=True)
    labels = torch.randint(0, c, (n, r), generator=gen)
    valid = torch.rand(n, r, generator=gen) < 0.8
    labels[~valid] = -7  # padding may hold anything
    targets = torch.randn(n, r, 4, generator=gen)
    targets[labels <= 0] = float("inf")
    got = L.fastrcnn_loss(logits, regression, labels, targets, valid)
    lg, rg, lb, tg = logits[valid], regression[valid], labels[valid], targets[valid]
    pos = torch.where(lb > 0)[0]
    box = F.smooth_l1_loss(rg.reshape(-1, c, 4)[pos, lb[pos]], tg[pos], beta=1 / 9, reduction="sum") / lb.numel()
    want = (F.cross_entropy(lg, lb), box)
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[1], want[1])
    g_got = torch.autograd.grad(got[0] + got[1], (logits, regression))
    g_want = torch.autograd.grad(want[0] + want[1], (logits, regression))
    for a, b in zip(g_got, g_want):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b)


def test_nothing_sampled_is_zero_not_nan():
    objectness = torch.zeros(1, 4, requires_grad=True)
    none = torch.zeros(1, 2, dtype=torch.bool)
    idx = torch.zeros(1, 2, dtype=torch.int64)
    loss = L.rpn_loss(objectness, torch.zeros(1, 4, 4), torch.full((1, 4), -1), torch.zeros(1, 4, 4), idx, none, idx, none)
    assert [float(x.detach()) for x in loss] == [0.0, 0.0]
