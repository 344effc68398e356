"""The grid of linear probes: each head is the plain SGD it claims to be, and the grid's best
head equals the same head trained alone."""
import math

import ml_collections
import torch
from sklearn import datasets

from fpipe.evaluate import linear


def digits():
    raw = datasets.load_digits()
    x = torch.as_tensor(raw.data, dtype=torch.float32)
    x = (x - x[:1200].mean(0)) / x[:1200].std(0).clamp_min(1e-6)
    y = torch.as_tensor(raw.target)
    return (x[:1000], y[:1000]), (x[1000:1200], y[1000:1200]), (x[1200:], y[1200:])


def cfg(**kw):
    return ml_collections.ConfigDict({**dict(lrs=(0.001, 0.01, 0.1, 1.0), wds=(0.0, 0.01), epochs=3, batch_size=64,
                                             momentum=0.9, init_std=0.01, seed=3, retrain=False), **kw})


def test_one_head_equals_torch_sgd_with_momentum_weight_decay_and_cosine_schedule():
    (x, y), _, _ = digits()
    c = cfg()
    lr, wd = 0.1, 0.01
    weight, bias = linear.train_grid(x, y, 10, (lr,), (wd,), c)
    # torch.nn reference: the same init, the same batches, torch's SGD and LambdaLR
    w0 = torch.randn(64, 10, generator=torch.Generator().manual_seed(c.seed)) * c.init_std
    net = torch.nn.Linear(64, 10)
    with torch.no_grad():
        net.weight.copy_(w0.T)
        net.bias.zero_()
    opt = torch.optim.SGD([{"params": [net.weight], "weight_decay": wd}, {"params": [net.bias], "weight_decay": 0.0}],
                          lr=lr, momentum=c.momentum)
    per_epoch = math.ceil(len(x) / c.batch_size)
    total = per_epoch * c.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / total)))
    for epoch in range(c.epochs):
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(c.seed * 100003 + epoch))
        for i in range(per_epoch):
            rows = order[i * c.batch_size:(i + 1) * c.batch_size]
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(x[rows]), y[rows]).backward()
            opt.step()
            sched.step()
    torch.testing.assert_close(weight[0], net.weight.detach().T, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(bias[0], net.bias.detach(), rtol=1e-4, atol=1e-5)


def test_the_grids_best_head_equals_that_head_trained_alone():
    train, val, test = digits()
    c = cfg()
    result = linear.evaluate(train, val, test, 10, c)
    assert len(result["grid"]) == 8 and result["val_top1"] == max(g["val_top1"] for g in result["grid"])
    weight, bias = linear.train_grid(*train, 10, c.lrs, c.wds, c)
    best = [(g["lr"], g["wd"]) for g in result["grid"]].index((result["lr"], result["wd"]))
    alone_w, alone_b = linear.train_grid(*train, 10, (result["lr"],), (result["wd"],), c)
    torch.testing.assert_close(weight[best], alone_w[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bias[best], alone_b[0], rtol=1e-5, atol=1e-6)
    pred = (test[0] @ alone_w[0] + alone_b[0]).argmax(1)
    assert abs(result["top1"] - 100 * float((pred == test[1]).double().mean())) < 1e-9
    assert result["top1"] > 85  # digits pixels are linearly separable to ~95%


def test_retrain_uses_train_and_val_and_keeps_the_chosen_hyperparameters():
    train, val, test = digits()
    chosen = linear.evaluate(train, val, test, 10, cfg())
    again = linear.evaluate(train, val, test, 10, cfg(retrain=True))
    assert (again["lr"], again["wd"]) == (chosen["lr"], chosen["wd"]) and again["retrained"]
    both = (torch.cat([train[0], val[0]]), torch.cat([train[1], val[1]]))
    w, b = linear.train_grid(*both, 10, (chosen["lr"],), (chosen["wd"],), cfg())
    pred = (test[0] @ w[0] + b[0]).argmax(1)
    assert abs(again["top1"] - 100 * float((pred == test[1]).double().mean())) < 1e-9
