"""Multi-crop training (data.views, VISSL/SwAV's multi-resolution inputs): the loader's crops,
the trunk once per resolution, heads on every crop, labels repeated per crop."""
import json

import ml_collections
import pytest
import torch

from fpipe import data, weights
from fpipe.data import base
from fpipe.models import model as models
from test_main import main

VIEWS = ((2, "random_resized_crop(16, scale=(0.35, 1.0))|normalize"),
         (3, "random_resized_crop(8, scale=(0.1, 0.5))|normalize"))


def loader(views=VIEWS, num_workers=0, **kw):
    images = torch.rand(12, 3, 20, 20, generator=torch.Generator().manual_seed(0))
    split = base.TensorSplit(images, torch.arange(12) % 3)
    cfg = data.config.default_config()
    cfg.batch_size, cfg.image_size, cfg.views, cfg.num_workers = 4, 16, views, num_workers
    return data.Loader(split, cfg, train=True, **kw)


def test_the_loader_makes_every_crop_each_from_its_own_stream():
    batch = loader().batch(0, 1)
    assert [tuple(c.shape) for c in batch["image"]] == [(4, 3, 16, 16)] * 2 + [(4, 3, 8, 8)] * 3
    again = next(loader(num_workers=2).epoch(0, start_step=1))  # made in worker processes
    assert all(torch.equal(a, b) for a, b in zip(batch["image"], again["image"]))  # a pure function of (epoch, step)
    assert not torch.equal(batch["image"][0], batch["image"][1])  # two crops, two draws
    two = [loader(rank=r, world_size=2).batch(0, 1) for r in (0, 1)]  # ranks' shards make the batch
    for v in range(5):
        assert torch.equal(torch.cat([two[0]["image"][v], two[1]["image"][v]]), batch["image"][v])
    with pytest.raises(ValueError, match=r"data.views: each entry is \(count >= 1, transforms\)"):
        loader(views=(("2", "normalize"),))


def test_the_trunk_runs_once_per_resolution_and_heads_see_every_crop():
    heads = dict(vec=models.head_config("res5avg", "linear"), grid=models.head_config("res4", "eval_mlp", pool=[1, 1]))
    model = models.build(ml_collections.ConfigDict(dict(trunk=models.trunk_config("resnet18"), heads=heads)),
                         num_classes=3, image_size=16)
    params, state = model.init(0)
    g = torch.Generator().manual_seed(0)
    crops = (torch.randn(4, 3, 16, 16, generator=g), torch.randn(4, 3, 16, 16, generator=g),
             torch.randn(4, 3, 8, 8, generator=g))
    out, new_state = model.apply(params, state, crops, train=False)
    big, _ = model.apply(params, state, torch.cat(crops[:2]), train=False)  # independent: one resolution at a time
    small, _ = model.apply(params, state, crops[2], train=False)
    for name in ("vec", "grid"):
        assert out[name].shape == (12, 3)
        torch.testing.assert_close(out[name], torch.cat([big[name], small[name]]))
    assert torch.equal(models.labels_for(out["vec"], torch.tensor([0, 1, 2, 0])), torch.tensor([0, 1, 2, 0] * 3))
    no_pool = models.build(ml_collections.ConfigDict(dict(trunk=models.trunk_config("resnet18"),
                                                          heads=dict(h=models.head_config("res4", "linear")))),
                           num_classes=3, image_size=16)
    with pytest.raises(ValueError, match=r"model.heads.h: crops of several resolutions give res4 of shapes"):
        no_pool.apply(*no_pool.init(0), (torch.randn(2, 3, 32, 32), torch.randn(2, 3, 8, 8)), train=False)


def test_identical_crops_train_exactly_as_one_crop(tmp_path):
    """Two copies of a deterministic crop: every head's loss is the mean over duplicated rows,
    so the run equals the single-crop run (an end-to-end check of views through main.py)."""
    same = "resize|center_crop|normalize"
    args = ["--config.total_steps=5", "--config.ckpt_steps=5", f"--config.data.train_transforms={same}"]
    main(tmp_path / "one", *args)
    main(tmp_path / "two", *args, f"--config.data.views=((2, '{same}'),)")
    a = weights.read_checkpoint(str(tmp_path / "one" / "checkpoints" / "ckpt_00000005.pt"))
    b = weights.read_checkpoint(str(tmp_path / "two" / "checkpoints" / "ckpt_00000005.pt"))
    for name, t in a["params"].items():
        torch.testing.assert_close(b["params"][name], t, rtol=1e-5, atol=1e-6)
    ra = json.loads((tmp_path / "one" / "results.json").read_text())
    rb = json.loads((tmp_path / "two" / "results.json").read_text())
    assert ra["heads"] == rb["heads"]


def test_multi_crop_supervised_training_runs(tmp_path):
    main(tmp_path, "--config.total_steps=3", "--config.log_steps=1", f"--config.data.views={VIEWS!r}",
         config="configs/supervised.py")
    lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines if "fc/train_top1" in l] == [1, 2, 3]


def test_towers_concatenate_each_images_crops_like_vissls_siamese_concat_view():
    heads = dict(cat=models.head_config("res5avg", "linear", towers=3))
    model = models.build(ml_collections.ConfigDict(dict(trunk=models.trunk_config("resnet18"), heads=heads)),
                         num_classes=4, image_size=16)
    params, state = model.init(0)
    assert params["heads"]["cat"]["weight"].shape == (4, 3 * 512)
    crops = tuple(torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(v)) for v in range(3))
    out, _ = model.apply(params, state, crops, train=False)
    feats = [model.features(params, state, c, ("res5avg",))["res5avg"].flatten(1) for c in crops]
    w, b = params["heads"]["cat"]["weight"], params["heads"]["cat"]["bias"]
    expected = torch.cat(feats, 1) @ w.T + b  # image i: [crop 0 | crop 1 | crop 2] features
    torch.testing.assert_close(out["cat"], expected, rtol=1e-4, atol=1e-4)


def test_towers_train_and_evaluate_through_main(tmp_path):
    views = ((3, "random_resized_crop(16, scale=(0.3, 0.6))|normalize"),)
    eval_views = ((3, "resize|center_crop|normalize"),)
    proc = main(tmp_path / "bad", "--config.total_steps=2", "--config.model.heads.fc.towers=3",
                f"--config.data.views={views!r}", config="configs/supervised.py", check=False)
    assert proc.returncode == 2 and "model.heads.fc.towers=3 needs 3 crops per image; data.eval_views gives 1" in proc.stderr
    main(tmp_path / "ok", "--config.total_steps=2", "--config.model.heads.fc.towers=3", f"--config.data.views={views!r}",
         f"--config.data.eval_views={eval_views!r}", config="configs/supervised.py")
    r = json.loads((tmp_path / "ok" / "results.json").read_text())
    assert 0 <= r["heads"]["fc"]["top1"] <= 100


def test_heads_read_their_own_crops_like_vissls_multi_input_head_mapping():
    """Two inputs: crops 0-1 ("images", 16 px) feed one head, crops 2-4 ("patches", 8 px) another."""
    heads = dict(images=models.head_config("res5avg", "linear", crops=(0, 2)),
                 patches=models.head_config("res5avg", "linear", crops=(2, 3)))
    model = models.build(ml_collections.ConfigDict(dict(trunk=models.trunk_config("resnet18"), heads=heads)),
                         num_classes=4, image_size=16)
    params, state = model.init(0)
    crops = tuple(torch.randn(2, 3, s, s, generator=torch.Generator().manual_seed(v))
                  for v, s in enumerate((16, 16, 8, 8, 8)))
    out, _ = model.apply(params, state, crops, train=False)
    feats = [model.features(params, state, c, ("res5avg",))["res5avg"].flatten(1) for c in crops]
    for name, chosen in (("images", feats[:2]), ("patches", feats[2:])):
        w, b = params["heads"][name]["weight"], params["heads"][name]["bias"]
        torch.testing.assert_close(out[name], torch.cat(chosen) @ w.T + b, rtol=1e-4, atol=1e-4)


def test_a_head_reading_crops_that_do_not_exist_is_refused_before_work(tmp_path):
    proc = main(tmp_path, "--config.total_steps=2", "--config.model.heads.fc.crops=(1, 2)",
                f"--config.data.views={VIEWS!r}", config="configs/supervised.py", check=False)
    assert proc.returncode == 2
    assert "model.heads.fc.crops=(1, 2) reads crops 1..2; data.eval_views gives 1" in proc.stderr
