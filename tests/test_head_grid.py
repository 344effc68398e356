"""head_grid: one member per (lr, wd_mult) of every head, each the plain head it claims to be,
the best chosen on a validation split carved from train (never on test)."""
import json

import torch

from configs import linear_eval
from fpipe import optim, weights
from fpipe.data import base
from fpipe.models import model as models
from fpipe.train import head_grid
from test_main import main


def grid_config(lrs=(0.01, 0.1), wd_mults=(0.0, 1.0)):
    c = linear_eval.get_config()
    c.head_grid.lrs, c.head_grid.wd_mults = lrs, wd_mults
    return c


def test_expand_gives_every_member_its_lr_and_weight_decay():
    c = grid_config()
    out = head_grid.expand(c)
    assert set(out.model.heads) == {f"{h}_lr{lr}_wd{m}" for h in c.model.heads
                                   for lr in ("0p01", "0p1") for m in ("0", "1")}
    assert set(c.model.heads) == {"conv1", "res3", "res4", "res5avg"}  # the config itself is unchanged
    model = models.build(out.model, num_classes=10, image_size=32)
    params, _ = model.init(0)
    opt = optim.build(out.optim, {"heads": params["heads"]})
    hyper = {n: opt.hyper[n] for n in opt.hyper}
    w, b = "heads.res4_lr0p01_wd1.clf.clf.0.weight", "heads.res4_lr0p01_wd1.clf.clf.0.bias"
    assert abs(hyper[w]["lr_mult"] * c.optim.lr - 0.01) < 1e-12 and hyper[w]["wd"] == c.optim.weight_decay
    assert hyper["heads.res4_lr0p1_wd0.clf.clf.0.weight"]["wd"] == 0.0 and hyper[b]["wd"] == 0.0
    bn = [n for n in hyper if n.startswith("heads.res4_lr0p01_wd1.") and "bn" in n and n.endswith("weight")]
    assert bn and all(hyper[n]["wd"] == 0.0 for n in bn)  # norms never decay, as without a grid


def test_a_members_weight_decay_is_its_wd_mult_times_what_the_heads_rules_give():
    """Any order of the user's rules: a non-zero rule before the zero ones keeps winning."""
    c = grid_config(lrs=(0.1,), wd_mults=(0.5,))
    c.optim.wd_mults = ((r"heads\..*\.bias", 3.0),) + tuple(c.optim.wd_mults)
    plain = optim.build(c.optim, {"heads": models.build(c.model, num_classes=10, image_size=32).init(0)[0]["heads"]})
    out = head_grid.expand(c)
    grid = optim.build(out.optim, {"heads": models.build(out.model, num_classes=10, image_size=32).init(0)[0]["heads"]})
    for name, h in plain.hyper.items():
        head, rest = name.split(".")[1], name.split(".", 2)[2]
        member = grid.hyper[f"heads.{head}_lr0p1_wd0p5.{rest}"]
        assert member["wd"] == 0.5 * h["wd"], name
    assert plain.hyper["heads.res4.clf.clf.0.bias"]["wd"] == 3.0 * c.optim.weight_decay  # the user's rule won


def test_carved_validation_is_per_class_disjoint_and_seeded():
    labels = torch.arange(100) % 4
    split = base.TensorSplit(torch.zeros(100, 1, 2, 2), labels)
    ds = base.Dataset("toy", ("a", "b", "c", "d"), split, split)
    c = grid_config()
    c.head_grid.val_fraction = 0.2
    carved, _ = head_grid.carve_val(ds, c)
    again, _ = head_grid.carve_val(ds, c)
    val, train = carved.val.indices.tolist(), carved.train.indices.tolist()
    assert val == again.val.indices.tolist() and not set(val) & set(train) and len(val) + len(train) == 100
    assert torch.bincount(carved.val.labels, minlength=4).tolist() == [5, 5, 5, 5]


def test_select_takes_the_best_on_val_and_the_first_on_ties():
    plan = {"h": [("h_a", 0.1, 1.0), ("h_b", 0.2, 1.0), ("h_c", 0.3, 1.0)]}
    val = {"h_a": {"top1": 50.0}, "h_b": {"top1": 70.0}, "h_c": {"top1": 70.0}}
    test = {"h_a": {"top1": 99.0}, "h_b": {"top1": 60.0}, "h_c": {"top1": 65.0}}
    results, grid = head_grid.select(plan, test, val)
    assert results["h"]["member"] == "h_b" and results["h"]["top1"] == 60.0  # never chosen on test
    assert [r["name"] for r in grid["h"]] == ["h_a", "h_b", "h_c"]


def test_a_member_of_a_grid_trains_as_it_would_alone(tmp_path):
    steps = ["--config.total_steps=6", "--config.ckpt_steps=6"]
    main(tmp_path / "grid", *steps, "--config.head_grid.lrs=(0.01, 0.1)", "--config.head_grid.wd_mults=(0.0, 1.0)")
    main(tmp_path / "alone", *steps, "--config.head_grid.lrs=(0.1,)", "--config.head_grid.wd_mults=(1.0,)")
    grid = weights.read_checkpoint(str(tmp_path / "grid" / "checkpoints" / "ckpt_00000006.pt"))["params"]
    alone = weights.read_checkpoint(str(tmp_path / "alone" / "checkpoints" / "ckpt_00000006.pt"))["params"]
    member = {k: v for k, v in alone.items() if k.startswith("heads.res4_lr0p1_wd1.")}
    assert member
    for name, t in member.items():
        torch.testing.assert_close(grid[name], t, rtol=1e-5, atol=1e-6)
    r = json.loads((tmp_path / "grid" / "results.json").read_text())
    assert set(r["heads"]) == {"conv1", "res3", "res4", "res5avg"} and r["dataset"]["splits"]["val"] > 0
    assert len(r["head_grid"]["res4"]) == 4
    best = max(r["head_grid"]["res4"], key=lambda m: m["val_top1"])
    assert r["heads"]["res4"]["val_top1"] == best["val_top1"]
    assert r["heads"]["res4"]["top1"] == next(m["test_top1"] for m in r["head_grid"]["res4"]
                                              if m["name"] == r["heads"]["res4"]["member"])
