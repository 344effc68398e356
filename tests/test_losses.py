"""Multi-task heads: each head learns its own target with its own loss (fpipe.models.losses),
checked against the losses written out by hand and against eager autograd + torch.optim.SGD."""
import json
import math

import ml_collections
import pytest
import torch

from fpipe import data, freeze, optim, tree
from fpipe.data import base, image_folder
from fpipe.models import losses
from fpipe.models import model as models
from fpipe.train import step as step_lib
from test_main import main


def test_each_loss_matches_its_formula():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 3, generator=g)
    classes = torch.tensor([0, 2, 1, 1, 0])
    bits = (torch.rand(5, 3, generator=g) > 0.5).float()
    values = torch.randn(5, 3, generator=g)
    log_softmax = logits - logits.exp().sum(1, keepdim=True).log()
    assert math.isclose(losses.loss("cross_entropy", logits, classes), -log_softmax[range(5), classes].mean(), rel_tol=1e-6)
    p = 1 / (1 + (-logits).exp())
    bce = -(bits * p.log() + (1 - bits) * (1 - p).log()).mean()
    assert math.isclose(losses.loss("bce", logits, bits), bce, rel_tol=1e-5)
    assert math.isclose(losses.loss("mse", logits, values), ((logits - values) ** 2).mean(), rel_tol=1e-6)
    assert math.isclose(losses.loss("mse", logits[:, :1], values[:, 0]), ((logits[:, 0] - values[:, 0]) ** 2).mean(),
                        rel_tol=1e-6)  # one column may come as a vector
    with pytest.raises(ValueError, match=r"model.heads.x.loss='hinge'; valid: \('cross_entropy', 'bce', 'mse'\)"):
        losses.check("hinge", "model.heads.x.loss")


def test_eval_counts_score_only_valid_rows():
    logits = torch.tensor([[2.0, -1.0], [-1.0, 3.0], [1.0, 1.5], [0.5, -0.5]])
    valid = torch.tensor([True, True, True, False])
    bits = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0], [0.0, 0.0]])
    assert float(losses.eval_counts("bce", logits, bits, valid)["acc"]) == 1.0 + 0.5 + 0.5  # row 3 masked out
    values = torch.zeros(4, 2)
    sq = (logits ** 2).mean(1)
    assert math.isclose(losses.eval_counts("mse", logits, values, valid)["mse"], sq[:3].sum(), rel_tol=1e-6)
    top = losses.eval_counts("cross_entropy", logits, torch.tensor([0, 0, 1, 0]), valid, topk=(1, 5))
    assert int(top["top1"]) == 2 and int(top["top5"]) == 3  # k above the class count: every class
    assert losses.finish("acc", 2.0, 4) == 50.0 and losses.finish("mse", 2.0, 4) == 0.5


def multi_task_model(sizes=None):
    heads = dict(fc=models.head_config("flatten"),
                 parity=models.head_config("res4", "eval_mlp", pool=[1, 1], target="parity"),
                 attrs=models.head_config("flatten", target="attributes", loss="bce", loss_weight=0.5),
                 ink=models.head_config("res3", pool=[1, 1], target="ink", loss="mse", loss_weight=3.0))
    cfg = ml_collections.ConfigDict(dict(trunk=models.trunk_config("resnet18"), heads=heads))
    return models.build(cfg, num_classes=4, image_size=16,
                        target_sizes=sizes or {"parity": 2, "attributes": 3, "ink": 1})


def test_heads_size_to_their_targets_and_unknown_targets_list_the_valid_ones():
    model = multi_task_model()
    out, _ = model.apply(*model.init(0), torch.randn(2, 3, 16, 16), train=False)
    assert {n: tuple(o.shape) for n, o in out.items()} == {"fc": (2, 4), "parity": (2, 2), "attrs": (2, 3), "ink": (2, 1)}
    with pytest.raises(ValueError, match=r"model.heads.parity.target='parity': the dataset has no such target; "
                                         r"valid: \['label', 'attributes', 'ink'\]"):
        multi_task_model({"ink": 1, "attributes": 3})


def test_multi_task_step_matches_eager_autograd_with_each_heads_loss():
    model = multi_task_model()
    params, state = model.init(0)
    trainable, frozen = freeze.partition(params, (r"trunk\.(conv1|bn1|layer1)\..*",))
    g = torch.Generator().manual_seed(3)
    batch = {"image": torch.randn(6, 3, 16, 16, generator=g), "label": torch.randint(0, 4, (6,), generator=g),
             "parity": torch.randint(0, 2, (6,), generator=g), "attributes": (torch.rand(6, 3, generator=g) > 0.5).float(),
             "ink": torch.rand(6, generator=g)}
    cfg = optim.default_config()
    cfg.lr, cfg.momentum, cfg.weight_decay, cfg.wd_mults = 0.1, 0.9, 0.0, ()
    opt = optim.build(cfg, trainable)
    step = step_lib.make_step(model, opt)
    train_state = {"trainable": trainable, "frozen": frozen, "model_state": state, "opt_state": opt.init(trainable)}
    new, metrics = step(train_state, batch, torch.tensor(0.1))

    names = set(tree.flatten(trainable))
    flat = {n: t.clone().requires_grad_(n in names) for n, t in tree.flatten(params).items()}
    eval_norms = freeze.eval_norms(state, frozen)
    out, _ = model.apply(tree.unflatten(flat), state, batch["image"], train=True, eval_norms=eval_norms)
    F = torch.nn.functional
    per_head = {"fc": F.cross_entropy(out["fc"], batch["label"]), "parity": F.cross_entropy(out["parity"], batch["parity"]),
                "attrs": F.binary_cross_entropy_with_logits(out["attrs"], batch["attributes"]),
                "ink": F.mse_loss(out["ink"][:, 0], batch["ink"])}
    loss = per_head["fc"] + per_head["parity"] + 0.5 * per_head["attrs"] + 3.0 * per_head["ink"]
    sgd = torch.optim.SGD([flat[n] for n in sorted(names)], lr=0.1, momentum=0.9)
    loss.backward()
    sgd.step()
    torch.testing.assert_close(metrics["loss"], loss.detach(), rtol=1e-5, atol=1e-6)
    for name, value in per_head.items():
        torch.testing.assert_close(metrics[f"{name}/loss"], value.detach(), rtol=1e-5, atol=1e-6)
    assert {"fc/train_top1", "parity/train_top1", "attrs/train_acc", "ink/train_mse"} <= set(metrics)
    got = tree.flatten(new["trainable"])
    for n in names:
        torch.testing.assert_close(got[n], flat[n].detach(), rtol=1e-4, atol=1e-5)


def test_split_file_columns_are_targets(tmp_path):
    from PIL import Image
    rows = ["path,label,split,parity,attributes,ink"]
    for i in range(6):
        Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(tmp_path / f"{i}.png")
        rows.append(f"{i}.png,{i % 3},{'train' if i < 4 else 'test'},{i % 2},{i % 2};1;0,{i / 10}")
    (tmp_path / "split.csv").write_text("\n".join(rows) + "\n")
    cfg = data.config.default_config()
    cfg.name, cfg.split_file, cfg.train_split, cfg.test_split = "image_folder", str(tmp_path / "split.csv"), "train", "val"
    with pytest.raises(ValueError, match="no rows for split 'val'"):
        data.build(cfg)
    cfg.test_split = "test"
    ds = data.build(cfg)
    t = ds.train.targets
    assert t["parity"].dtype == torch.int64 and t["parity"].tolist() == [0, 1, 0, 1]
    assert t["attributes"].tolist() == [[0, 1, 0], [1, 1, 0], [0, 1, 0], [1, 1, 0]]
    assert torch.allclose(ds.test.targets["ink"], torch.tensor([0.4, 0.5]))
    assert base.target_sizes(ds) == {"parity": 2, "attributes": 3, "ink": 1}
    cfg.batch_size, cfg.image_size, cfg.train_transforms = 2, 8, "resize|center_crop|to_float"
    batch = data.Loader(ds.train, cfg, train=True).batch(0, 0)
    assert torch.equal(batch["parity"], t["parity"][batch["index"]])
    (tmp_path / "bad.csv").write_text("path,label,split,ink\n0.png,0,train,0.1\n1.png,1,train,\n")
    with pytest.raises(ValueError, match=r"bad.csv:3: want 'path,label,split,ink' \(every cell filled\)"):
        image_folder._read_split_file(str(tmp_path / "bad.csv"))


def test_digits_carry_their_extra_targets():
    cfg = data.config.default_config()
    ds = data.build(cfg)
    t, labels = ds.train.targets, ds.train.labels
    assert torch.equal(t["parity"], labels % 2)
    assert torch.equal(t["attributes"][:, 1], torch.isin(labels, torch.tensor([2, 3, 5, 7])).float())
    everything = torch.cat([t["ink"], ds.test.targets["ink"]])
    assert abs(float(everything.mean())) < 1e-5 and abs(float(everything.std()) - 1) < 1e-5
    assert torch.corrcoef(torch.stack([t["ink"], ds.train.images.mean((1, 2, 3))]))[0, 1] > 0.95  # it measures ink


def test_multi_task_config_trains_and_reports_each_heads_metric(tmp_path):
    main(tmp_path, "--config.total_steps=4", "--config.log_steps=2", config="configs/supervised.py:multi_task")
    r = json.loads((tmp_path / "results.json").read_text())["heads"]
    assert set(r) == {"fc", "parity", "attributes", "ink"}
    assert 0 <= r["fc"]["top1"] <= r["fc"]["top5"] <= 100 and 0 <= r["parity"]["top1"] <= 100
    assert set(r["attributes"]) == {"acc"} and 0 <= r["attributes"]["acc"] <= 100
    assert set(r["ink"]) == {"mse"} and r["ink"]["mse"] >= 0
    lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any("ink/train_mse" in l and "attributes/train_acc" in l for l in lines)
    bad = main(tmp_path / "bad", "--config.total_steps=2", "--config.best_metric=ink/mse",
               config="configs/supervised.py:multi_task", check=False)
    assert bad.returncode == 2 and "best_metric='ink/mse' is best when lowest: set best_mode='min'" in bad.stderr
    typo = main(tmp_path / "typo", "--config.total_steps=2", "--config.model.heads.parity.target=parit",
                config="configs/supervised.py:multi_task", check=False)
    assert typo.returncode != 0 and "valid: ['label', 'attributes', 'ink', 'parity']" in typo.stderr
