"""COCO AP through pycocotools: perfect predictions score 100, worse ones less, none 0."""
import torch

from fpipe.detection import coco_eval, collate, scenes


def batches(ds, **kw):
    """Batches at scale 1 (96-px scenes on a 96-px canvas): masks map back exactly."""
    loader = collate.Loader(ds.test, 8, train=False, min_size=96, max_size=96, max_objects=4, num_keypoints=3, **kw)
    return list(loader.epoch())


def perfect(batch):
    """Predictions equal to the batch's own targets (masks on the canvas, D×H×W)."""
    out = []
    for i in range(len(batch["index"])):
        v = batch["valid"][i]
        out.append({"boxes": batch["boxes"][i][v], "scores": torch.linspace(1, 0.5, int(v.sum())),
                    "labels": batch["labels"][i][v], "masks": batch["masks"][i][v].float(),
                    "keypoints": batch["keypoints"][i][v]})
    return out


def run(ds, gt, edit=lambda p: p):
    results = []
    for b in batches(ds):
        results += coco_eval.to_results([edit(p) for p in perfect(b)], b, coco_eval.image_ids(gt), ds.categories)
    return coco_eval.evaluate(gt, results, sigmas=ds.keypoint_sigmas)


def test_perfect_shifted_and_missing_predictions():
    ds = scenes.build({"num_test": 12, "min_side": 96, "max_side": 96})
    gt = coco_eval.ground_truth(ds.test, ds.categories)
    best = run(ds, gt)
    for kind in ("bbox", "segm", "keypoints"):
        assert best[kind]["AP"] == 100.0 and best[kind]["AP50"] == 100.0, (kind, best[kind])

    def shift(p):
        return {**p, "boxes": p["boxes"] + 3.0, "keypoints": p["keypoints"] + torch.tensor([2.0, 0.0, 0.0])}
    worse = run(ds, gt, shift)
    assert 0 < worse["bbox"]["AP"] < 90 and 0 < worse["keypoints"]["AP"] < 90
    assert worse["segm"]["AP"] == 100.0  # masks were not moved

    def wrong_class(p):
        return {**p, "labels": p["labels"] % 3 + 1}
    assert run(ds, gt, wrong_class)["bbox"]["AP"] == 0.0
    none = coco_eval.evaluate(gt, [], sigmas=ds.keypoint_sigmas)
    assert all(none[k]["AP"] == 0.0 for k in ("bbox", "segm", "keypoints"))


def test_model_style_roi_masks_are_pasted_and_sizes_map_back():
    """The model's D×1×28×28 RoI masks, in a resized frame: pasted at the boxes in the file's pixels."""
    ds = scenes.build({"num_test": 4})
    gt = coco_eval.ground_truth(ds.test, ds.categories)
    b = collate.Loader(ds.test, 4, train=False, min_size=160, max_size=200, max_objects=4, num_keypoints=3).batch(0, 0)
    preds = perfect(b)
    for p in preds:
        p["masks"] = torch.ones(len(p["boxes"]), 1, 28, 28)  # full boxes
    results = coco_eval.to_results(preds, b, coco_eval.image_ids(gt), ds.categories)
    metrics = coco_eval.evaluate(gt, results, ("bbox", "segm"))
    assert metrics["bbox"]["AP"] > 99  # resized up and back: float rounding only
    assert 20 < metrics["segm"]["AP"] < 100  # box-shaped masks: right for rectangles only
    sizes = {r["image_id"]: r["segmentation"]["size"] for r in results if "segmentation" in r}
    assert all(sizes[i] == list(ds.test[i]["image"].shape[-2:]) for i in sizes)


def test_labels_are_mapped_by_category_ids_and_labels_without_a_category_dropped():
    """data.labels="category_id": label l is category id l; labels no category has are no result."""
    ds = scenes.build({"num_train": 4, "num_test": 8})
    gt = coco_eval.ground_truth(ds.test, ds.categories)
    b = batches(ds)[0]
    preds = perfect(b)
    by_index = coco_eval.to_results(preds, b, coco_eval.image_ids(gt), ds.categories)
    ids = (0,) + ds.category_ids  # label l + 1 is category l: label 1 has none
    shifted = [{**p, "labels": p["labels"] + 1} for p in preds]
    by_id = coco_eval.to_results(shifted, b, coco_eval.image_ids(gt), ds.categories, category_ids=ids)
    assert by_id == by_index
    ids = (1, 0, 3)  # label 2 has no category: its detections are no results
    some = coco_eval.to_results(preds, b, coco_eval.image_ids(gt), ds.categories, category_ids=ids)
    assert len(some) < len(by_index) and {r["category_id"] for r in some} <= {1, 3}
    assert some == [r for r in by_index if r["category_id"] in (1, 3)]
