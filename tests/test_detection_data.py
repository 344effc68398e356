"""Detection data: the generated scenes, the COCO-format reader, and the padded batches."""
import json

import pytest
import torch

from fpipe.detection import coco, collate, scenes
from fpipe.detection.boxes import box_iou


def small(**kw):
    return scenes.build({"num_train": 24, "num_test": 12, **kw})


def test_scenes_are_deterministic_by_seed_and_index():
    a, b, other = small(), small(), small(seed=1)
    for i in (0, 5, 11):
        sa, sb = a.train[i], b.train[i]
        assert all(torch.equal(sa[k], sb[k]) for k in ("image", "boxes", "labels", "masks", "keypoints"))
    assert not torch.equal(a.train[0]["image"], a.test[0]["image"])  # splits differ
    assert not torch.equal(a.train[0]["image"], other.train[0]["image"])  # seeds differ


def test_scene_annotations_are_consistent():
    ds = small()
    counts = torch.zeros(4, dtype=torch.int64)
    for i in range(len(ds.train)):
        s = ds.train[i]
        k, (_, h, w) = len(s["labels"]), s["image"].shape
        assert 64 <= h <= 128 and 64 <= w <= 128 and 1 <= k <= 4 and s["image"].dtype == torch.uint8
        assert s["masks"].shape == (k, h, w) and s["keypoints"].shape == (k, 3, 3)
        assert ((s["labels"] >= 1) & (s["labels"] <= 3)).all()
        counts += torch.bincount(s["labels"], minlength=4)
        assert (s["masks"].sum(0) <= 1).all()  # visible masks never overlap
        for j in range(k):
            ys, xs = torch.nonzero(s["masks"][j], as_tuple=True)
            box = torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)
            assert torch.equal(s["boxes"][j], box)  # the box is the visible mask's extent
            assert s["area"][j] == s["masks"][j].sum()
            kp = s["keypoints"][j]
            assert set(kp[:, 2].tolist()) <= {1.0, 2.0}
            assert (kp[:, 0] >= 0).all() and (kp[:, 0] <= w).all() and (kp[:, 1] >= 0).all() and (kp[:, 1] <= h).all()
            for x, y, v in kp.tolist():  # a visible keypoint's pixel is not covered by a later object
                if v == 2:
                    col, row = min(int(x), w - 1), min(int(y), h - 1)
                    assert not any(m[row, col] for m in s["masks"][j + 1:])
    assert (counts[1:] > 0).all()


def test_shape_masks_are_exact():
    rect, _ = scenes.shape_mask(0, (10, 20, 30, 25), 0, 40, 40)
    assert rect.sum() == 20 * 5
    tri, points = scenes.shape_mask(2, (10, 10, 50, 40), 30, 64, 64)
    assert abs(int(tri.sum()) - 40 * 30 / 2) <= 2 and points == [(30, 10), (10, 40), (50, 40)]


def test_coco_reader_round_trip(tmp_path):
    ds = small()
    for split, name in ((ds.train, "train"), (ds.test, "val")):
        coco.write(split, ds.categories, str(tmp_path / "annotations" / f"instances_{name}.json"),
                   str(tmp_path / name))
    back = coco.build({"root": str(tmp_path), "train_split": "train", "test_split": "val"})
    assert back.num_classes == 3 and back.keypoint_names == scenes.KEYPOINT_NAMES
    assert len(back.train) == len(ds.train) and len(back.test) == len(ds.test)
    for i in range(len(ds.test)):
        a, b = ds.test[i], back.test[i]
        for key in ("image", "boxes", "labels", "masks", "keypoints", "iscrowd", "area"):
            assert torch.equal(a[key], b[key]), key
        assert a["image_id"] == b["image_id"]


def test_coco_reader_polygons_crowd_and_errors(tmp_path):
    from PIL import Image
    Image.new("RGB", (20, 10)).save(tmp_path / "a.png")
    data = {"images": [{"id": 7, "file_name": "a.png", "height": 10, "width": 20}],
            "categories": [{"id": 5, "name": "thing"}, {"id": 2, "name": "other"}],
            "annotations": [{"id": 1, "image_id": 7, "category_id": 5, "bbox": [2, 1, 4, 3], "iscrowd": 0,
                             "segmentation": [[2, 1, 6, 1, 6, 4, 2, 4]]},
                            {"id": 2, "image_id": 7, "category_id": 2, "bbox": [10, 2, 5, 5], "iscrowd": 1,
                             "segmentation": {"size": [10, 20], "counts": [22, 5, 5, 5, 163]}},
                            {"id": 3, "image_id": 7, "category_id": 2, "bbox": [1, 1, 0.5, 3]}]}  # < 1 px: dropped
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps(data))
    split = coco.CocoSplit(coco.read_annotations(str(ann)), str(tmp_path), str(ann))
    s = split[0]
    assert s["labels"].tolist() == [2, 1]  # category ids in sorted order: 2 -> 1, 5 -> 2
    assert s["boxes"].tolist() == [[2, 1, 6, 4], [10, 2, 15, 7]]
    assert s["iscrowd"].tolist() == [False, True] and s["masks"].shape == (2, 10, 20)
    assert s["masks"][0, 1:4, 2:6].all() and s["masks"][1].sum() == 10
    ids = coco.CocoSplit(coco.read_annotations(str(ann)), str(tmp_path), str(ann), labels="category_id")[0]
    assert ids["labels"].tolist() == [5, 2]  # data.labels="category_id": the ids themselves (torchvision's COCO)
    with pytest.raises(ValueError, match="data.labels='ids'; valid: contiguous, category_id"):
        coco.CocoSplit(coco.read_annotations(str(ann)), str(tmp_path), str(ann), labels="ids")
    (tmp_path / "annotations").mkdir()
    for split in ("train", "val"):
        (tmp_path / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))
        (tmp_path / split).mkdir()
        Image.new("RGB", (20, 10)).save(tmp_path / split / "a.png")
    cfg = {"root": str(tmp_path), "train_split": "train", "test_split": "val"}
    assert coco.build(cfg).num_classes == 2 and coco.build(cfg).category_ids == (2, 5)
    by_id = coco.build({**cfg, "labels": "category_id"})
    assert by_id.num_classes == 5 and by_id.category_ids == (0, 2, 0, 0, 5)  # 0: no category has the label
    batch = collate.collate([s], [0], min_size=10, max_size=20, max_objects=4, num_keypoints=0)
    assert batch["valid"].tolist() == [[True, False, False, False]]  # crowd regions never train
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"images": [], "categories": []}))
    with pytest.raises(coco.CocoFormatError, match="no 'annotations' key"):
        coco.read_annotations(str(bad))
    with pytest.raises(coco.CocoFormatError, match="does not exist"):
        coco.read_annotations(str(tmp_path / "missing.json"))
    data["images"][0]["file_name"] = "gone.png"
    ann.write_text(json.dumps(data))
    with pytest.raises(coco.CocoFormatError, match="gone.png' does not exist"):
        coco.CocoSplit(coco.read_annotations(str(ann)), str(tmp_path), str(ann))[0]


def test_collate_pads_resizes_and_keeps_annotations_aligned():
    ds = small()
    samples = [ds.train[i] for i in range(4)]
    b = collate.collate(samples, range(4), min_size=100, max_size=128, max_objects=6, num_keypoints=3)
    assert b["image"].shape == (4, 3, 128, 128) and b["masks"].shape == (4, 6, 128, 128)
    for i, s in enumerate(samples):
        h, w = b["image_size"][i].tolist()
        oh, ow = s["image"].shape[-2:]
        assert b["orig_size"][i].tolist() == [oh, ow] and max(h, w) <= 128
        k = len(s["labels"])
        assert b["valid"][i].sum() == k and (b["labels"][i, k:] == 0).all()
        scale = torch.tensor([w / ow, h / oh] * 2)
        assert torch.allclose(b["boxes"][i, :k], s["boxes"] * scale, atol=1e-4)
        assert (b["image"][i, :, h:, :] == 0).all() and (b["image"][i, :, :, w:] == 0).all()
        # each resized mask lies inside its resized box (nearest resize: within a pixel)
        for j in range(k):
            ys, xs = torch.nonzero(b["masks"][i, j], as_tuple=True)
            x0, y0, x1, y1 = b["boxes"][i, j].tolist()
            assert xs.min() >= x0 - 1 and xs.max() <= x1 and ys.min() >= y0 - 1 and ys.max() <= y1


def test_loader_shards_the_global_batch_and_pads_evaluation():
    ds = small()
    opts = dict(min_size=64, max_size=64, max_objects=4, num_keypoints=3, with_masks=False)
    one = collate.Loader(ds.train, 8, train=True, seed=3, **opts)
    two = [collate.Loader(ds.train, 8, train=True, seed=3, rank=r, world_size=2, **opts) for r in (0, 1)]
    full = one.batch(1, 2)
    halves = [l.batch(1, 2) for l in two]
    assert torch.equal(full["index"], torch.cat([h["index"] for h in halves]))
    assert torch.equal(full["image"], torch.cat([h["image"] for h in halves]))
    assert one.steps_per_epoch == 3 and sorted(one.order(0).tolist()) == list(range(24))
    test = collate.Loader(ds.test, 8, train=False, **opts)
    batches = list(test.epoch())
    assert len(batches) == 2 and batches[1]["mask"].tolist() == [True] * 4 + [False] * 4
    assert torch.equal(torch.cat([b["index"][b["mask"]] for b in batches]), torch.arange(12))


def test_boxes_of_a_batch_match_masks_iou():
    """Sanity: a box drawn from the resized mask and the resized box agree (IoU > 0.8)."""
    ds = small()
    b = collate.collate([ds.test[0]], [0], min_size=128, max_size=128, max_objects=4, num_keypoints=3)
    for j in range(int(b["valid"][0].sum())):
        ys, xs = torch.nonzero(b["masks"][0, j], as_tuple=True)
        from_mask = torch.tensor([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], dtype=torch.float32)
        assert box_iou(from_mask, b["boxes"][0, j:j + 1]).item() > 0.8


def test_hflip_mirrors_image_masks_boxes_and_swaps_left_right_keypoints():
    ds = small()
    flip_map = collate.keypoint_flip_map(ds.keypoint_names)
    assert ds.keypoint_names == ("top", "left", "right") and flip_map == (0, 2, 1)
    assert collate.keypoint_flip_map(["nose", "left_eye", "right_eye", "left_ear", "right_ear"]) == (0, 2, 1, 4, 3)
    for i in range(6):
        s = ds.train[i]
        f = collate.hflip(s, flip_map)
        h, w = s["image"].shape[-2:]
        assert torch.equal(f["image"][..., 0], s["image"][..., -1]) and torch.equal(f["masks"], s["masks"].flip(-1))
        for j in range(len(s["labels"])):  # the box is still the (mirrored) mask's extent
            ys, xs = torch.nonzero(f["masks"][j], as_tuple=True)
            assert f["boxes"][j].tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
        # the mirrored "left" keypoint is the original "right" one, mirrored
        assert torch.equal(f["keypoints"][:, 1, 0], w - s["keypoints"][:, 2, 0])
        assert torch.equal(f["keypoints"][:, 1, 1:], s["keypoints"][:, 2, 1:])
        back = collate.hflip(f, flip_map)  # an involution
        assert all(torch.equal(back[k], s[k]) for k in ("image", "masks", "boxes", "labels"))
        torch.testing.assert_close(back["keypoints"], s["keypoints"], rtol=0, atol=1e-5)  # w - (w - x): an ulp


def test_loader_flips_by_seed_epoch_and_index_only_in_training():
    ds = small()
    opts = dict(min_size=64, max_size=64, max_objects=4, num_keypoints=3, with_masks=False)
    flip_map = collate.keypoint_flip_map(ds.keypoint_names)
    always = collate.Loader(ds.train, 8, train=True, seed=3, hflip_prob=1.0, keypoint_flip=flip_map, **opts)
    batch = always.batch(0, 1)
    want = collate.collate([collate.hflip(ds.train[int(i)], flip_map) for i in batch["index"]], batch["index"].tolist(),
                           **opts)
    assert all(torch.equal(batch[k], want[k]) for k in want)
    half = lambda **kw: collate.Loader(ds.train, 8, train=True, seed=3, hflip_prob=0.5, keypoint_flip=flip_map,  # noqa: E731
                                       **kw, **opts)
    plain = collate.Loader(ds.train, 8, train=True, seed=3, **opts)
    flips = [[not torch.equal(a["image"][k], b["image"][k]) for k in range(8)]
             for a, b in zip(half().epoch(0), plain.epoch(0))]
    assert 0 < sum(map(sum, flips)) < 24  # some, not all
    ranks = [half(rank=r, world_size=2).batch(0, 1) for r in (0, 1)]  # same flips on any number of ranks
    assert torch.equal(torch.cat([r["image"] for r in ranks]), half().batch(0, 1)["image"])
    test = collate.Loader(ds.test, 8, train=False, hflip_prob=1.0, keypoint_flip=flip_map, **opts)
    assert torch.equal(next(test.epoch())["image"], collate.Loader(ds.test, 8, train=False, **opts).batch(0, 0)["image"])


def test_a_coco_test_split_sharing_the_train_images_is_refused(tmp_path):
    ds = small()
    coco.write(ds.train, ds.categories, str(tmp_path / "annotations" / "instances_train.json"), str(tmp_path / "train"))
    with pytest.raises(coco.CocoFormatError, match=r"instances_train.json: \d+ of its images are the train split's "
                                                   r"too .*AP would count images the model trained on"):
        coco.build({"root": str(tmp_path), "train_split": "train", "test_split": "train"})
    # a test folder of its own whose one image is a link to a training image: the same file
    coco.write(ds.test, ds.categories, str(tmp_path / "annotations" / "instances_val.json"), str(tmp_path / "val"))
    coco.build({"root": str(tmp_path), "train_split": "train", "test_split": "val"})  # disjoint: accepted
    first_val = sorted((tmp_path / "val").iterdir())[0]
    first_val.unlink()
    first_val.symlink_to(sorted((tmp_path / "train").iterdir())[0])
    with pytest.raises(coco.CocoFormatError, match=r"instances_val.json: 1 of its images are the train split's too"):
        coco.build({"root": str(tmp_path), "train_split": "train", "test_split": "val"})
