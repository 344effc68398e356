"""Linear probes on cached features: a grid of heads (learning rate × weight decay) in one pass.

dinov2's recipe on a cache: every head of the grid sees the same batches; their weights sit
side by side in one ``D × (H·C)`` matrix, so a step is one matmul forward and one backward for
the whole grid (the softmax cross-entropy gradient is written out, no autograd), and each
head's SGD update (momentum, its own lr and weight decay, a cosine schedule) is elementwise.
Every head starts from the same seeded init and sees the same batches, so a head of a grid ends
exactly where it would alone. The best head is chosen on a validation split carved from train
(never on test), then scored on test; ``retrain=True`` trains it again on train + val first.
Under torchrun each rank takes its slice of every global batch and gradients are summed.
"""
import math

import torch

from fpipe.evaluate import metrics, ranks


def train_grid(x, y, num_classes, lrs, wds, cfg, dist=None):
    """``(W, b)`` of the grid after ``cfg.epochs``: W ``H×D×C``, b ``H×C``; head ``h`` is
    ``(lrs[h // len(wds)], wds[h % len(wds)])``. ``x``: ``N×D`` float32 (the same on every rank)."""
    n, d = x.shape
    lr = torch.tensor([l for l in lrs for _ in wds], dtype=torch.float32)
    wd = torch.tensor([w for _ in lrs for w in wds], dtype=torch.float32)
    h, c = len(lr), num_classes
    gen = torch.Generator().manual_seed(int(cfg.seed))
    w0 = torch.randn(d, c, generator=gen) * float(cfg.init_std)
    weight = w0[:, None, :].repeat(1, h, 1).view(d, h * c)  # D×H×C, as one D×(H·C) matrix
    bias = torch.zeros(h * c)
    mom_w, mom_b = torch.zeros_like(weight), torch.zeros_like(bias)
    decay = wd.repeat_interleave(c) if bool(wd.any()) else None  # per column of W
    lr_cols = lr.repeat_interleave(c)
    batch, momentum = int(cfg.batch_size), float(cfg.momentum)
    steps_per_epoch = math.ceil(n / batch)
    total = steps_per_epoch * int(cfg.epochs)
    y = y.long()
    for step in range(total):
        epoch, i = divmod(step, steps_per_epoch)
        if i == 0:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(int(cfg.seed) * 100003 + epoch))
        rows = order[i * batch:(i + 1) * batch]
        mine = rows[ranks.rows(len(rows), dist)]
        xb, yb = x[mine], y[mine]
        # Few passes over the D×(H·C) tensors: they, not the matmuls, set the pace of a wide grid.
        grad = torch.addmm(bias, xb, weight).view(-1, h, c).softmax(-1)
        grad[torch.arange(len(yb)), :, yb] -= 1.0
        grad = grad.view(-1, h * c).div_(len(rows))     # mean over the global batch
        if dist is not None and dist.enabled:
            g_w, g_b = xb.T @ grad, grad.sum(0)
            packed = ranks.all_sum(torch.cat([g_w.reshape(-1), g_b]), dist)
            mom_w.mul_(momentum).add_(packed[:g_w.numel()].view_as(g_w))
            mom_b.mul_(momentum).add_(packed[g_w.numel():])
        else:
            mom_w = torch.addmm(mom_w, xb.T, grad, beta=momentum)  # momentum * m + grad, one pass
            mom_b.mul_(momentum).add_(grad.sum(0))
        if decay is not None:
            mom_w.addcmul_(weight, decay)               # weight decay on weights, not biases
        scale = 0.5 * (1.0 + math.cos(math.pi * step / total))
        weight.addcmul_(mom_w, lr_cols, value=-scale)
        bias.addcmul_(mom_b, lr_cols, value=-scale)
    return weight.view(d, h, c).permute(1, 0, 2).contiguous(), bias.view(h, c)


def scores(x, weight, bias, chunk=65536):
    """``N×H×C`` logits of every head (computed a chunk of rows at a time)."""
    h, d, c = weight.shape
    flat = weight.permute(1, 0, 2).reshape(d, h * c)
    return torch.cat([(x[i:i + chunk] @ flat).view(-1, h, c) + bias for i in range(0, len(x), chunk)])


def evaluate(train, val, test, num_classes, cfg, dist=None) -> dict:
    """Grid on ``train``, best by val top-1 (first in grid order on ties), scored on ``test``.

    Each argument is ``(features N×D float32, labels)``; returns the test metrics of the best
    head with its lr, wd, val top-1 and the whole grid's val top-1."""
    lrs, wds = tuple(float(v) for v in cfg.lrs), tuple(float(v) for v in cfg.wds)
    if not lrs or not wds:
        raise ValueError("eval.linear.lrs and eval.linear.wds must each list at least one value")
    weight, bias = train_grid(*train, num_classes, lrs, wds, cfg, dist)
    val_top1 = (scores(val[0], weight, bias).argmax(-1) == val[1].long()[:, None]).double().mean(0) * 100
    best = int(torch.argmax(val_top1))                  # argmax returns the first maximum
    lr, wd = lrs[best // len(wds)], wds[best % len(wds)]
    if cfg.retrain:
        both = (torch.cat([train[0], val[0]]), torch.cat([train[1], val[1]]))
        weight, bias = train_grid(*both, num_classes, (lr,), (wd,), cfg, dist)
        best = 0
    result = metrics.from_scores(scores(test[0], weight[best:best + 1], bias[best:best + 1])[:, 0],
                                 test[1], num_classes)
    grid = [{"lr": lrs[i // len(wds)], "wd": wds[i % len(wds)], "val_top1": float(v)}
            for i, v in enumerate(val_top1)]
    return {**result, "lr": lr, "wd": wd, "val_top1": float(val_top1.max()), "retrained": bool(cfg.retrain),
            "grid": grid}
