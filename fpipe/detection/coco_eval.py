"""COCO average precision (box, mask, keypoints) with pycocotools, the field's reference code.

    gt = coco_eval.ground_truth(dataset.test, dataset.categories)      # a COCO object, in memory
    image_ids = coco_eval.image_ids(gt)                                 # in the split's order
    results = []
    for batch in loader:                                                # model.predict's output, per image
        results += coco_eval.to_results(predictions, batch, image_ids, dataset.categories)
    metrics = coco_eval.evaluate(gt, results, ("bbox", "segm", "keypoints"), sigmas)
    # {"bbox": {"AP": 53.1, "AP50": 80.2, "AP75": 57.0, ...}, "segm": {...}, "keypoints": {...}}

Predictions come in the batch's (resized, padded) pixels and are mapped back to the file's
pixels per axis by ``orig_size / image_size`` (``fpipe.detection.transform.postprocess``): boxes
and keypoints scaled, RoI masks pasted into the file-sized image, then cut at 0.5, as
torchvision's reference evaluation does. Values are percentages (None
where pycocotools says -1: no ground truth in that size range); a head with no detections at all
scores 0 (pycocotools cannot load an empty result list).
``sigmas`` are the keypoints' OKS constants (COCO's ``kpt_oks_sigmas``; the scenes' own in
``fpipe.detection.scenes.KEYPOINT_SIGMAS``).
"""
import contextlib
import copy
import io

import numpy as np
import torch
import torch.nn.functional as F

from fpipe.detection import coco, transform

# COCOeval.stats' order, per iou type
STAT_NAMES = {"bbox": ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"),
              "keypoints": ("AP", "AP50", "AP75", "APm", "APl", "AR", "AR50", "AR75", "ARm", "ARl")}
STAT_NAMES["segm"] = STAT_NAMES["bbox"]
IOU_TYPES = ("bbox", "segm", "keypoints")


def ground_truth(split, categories):
    """pycocotools' COCO object of a split (built in memory, quietly)."""
    return from_dict(coco.to_coco_dict(split, categories))


def from_dict(data: dict):
    """pycocotools' COCO object of an annotation dict (a copy: pycocotools edits its input)."""
    from pycocotools.coco import COCO
    gt = COCO()
    gt.dataset = copy.deepcopy(data)
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
    return gt


def image_ids(gt) -> list:
    """The ground truth's image ids in the split's order (sample i is image ``image_ids[i]``)."""
    return [int(im["id"]) for im in gt.dataset["images"]]


def to_results(predictions, batch, image_ids, categories, *, mask_threshold: float = 0.5, category_ids=None) -> list:
    """COCO result dicts of one batch's predictions in the files' pixels (the module docstring).

    predictions: ``model.predict``'s list, one dict per image (``boxes``, ``scores``, ``labels``
    and optionally ``masks`` — the model's D×1×M×M RoI probabilities, pasted into the image at the
    boxes as torchvision does (``transform.postprocess``), or D×H×W probabilities on the batch's
    canvas — and ``keypoints`` D×P×3);
    image_ids: the split's COCO image ids (``batch["index"]`` indexes them); rows with ``batch["mask"]`` False
    (evaluation padding) are skipped; label ``l`` is ``categories[l - 1]``, or the category id
    ``category_ids[l - 1]`` when given (``DetectionDataset.category_ids``): detections of a label
    without a category (0 there, e.g. the unused ids of torchvision's 91 COCO classes) are dropped."""
    from pycocotools import mask as mask_utils
    keep = batch.get("mask")
    ids = list(category_ids) if category_ids is not None else [int(c["id"]) for c in categories]
    out = []
    for row, pred in enumerate(predictions):
        if keep is not None and not bool(keep[row]):
            continue
        size = tuple(int(v) for v in batch["image_size"][row])
        original = tuple(int(v) for v in batch["orig_size"][row])
        pred = {k: v.detach().float().cpu() if k != "labels" else v.detach().cpu()
                for k, v in pred.items() if isinstance(v, torch.Tensor)}
        cats = [ids[int(l) - 1] if 1 <= int(l) <= len(ids) else 0 for l in pred["labels"]]
        if not all(cats):  # labels no category has: not a result
            kept = torch.tensor([i for i, c in enumerate(cats) if c], dtype=torch.int64)
            pred, cats = {k: v[kept] for k, v in pred.items()}, [c for c in cats if c]
        image_masks = pred.pop("masks") if pred.get("masks") is not None and pred["masks"].ndim == 3 else None
        pred = transform.postprocess([pred], [size], [original])[0]  # boxes, keypoints; RoI masks pasted
        base = [{"image_id": int(image_ids[int(batch["index"][row])]), "category_id": int(c),
                 "score": float(s)} for s, c in zip(pred["scores"], cats)]
        boxes = pred["boxes"]
        xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], 1).tolist()
        out += [{**b, "bbox": box} for b, box in zip(base, xywh)]
        masks = pred.get("masks")
        if image_masks is not None:  # masks on the batch's canvas: the image's part, resized back
            masks = F.interpolate(image_masks[:, None, :size[0], :size[1]], size=original, mode="bilinear",
                                  align_corners=False)
        if masks is not None and len(base):
            binary = np.asfortranarray((masks[:, 0] > mask_threshold).numpy().astype(np.uint8).transpose(1, 2, 0))
            for b, rle in zip(base, mask_utils.encode(binary)):
                out.append({**b, "segmentation": {"size": rle["size"], "counts": rle["counts"].decode("ascii")}})
        if pred.get("keypoints") is not None and len(base):
            kp = pred["keypoints"][..., :2]
            kp = torch.cat([kp, torch.ones_like(kp[..., :1])], -1)  # COCO ignores a result's visibility
            out += [{**b, "keypoints": k.flatten().tolist()} for b, k in zip(base, kp)]
    return out


def evaluate(gt, results: list, iou_types=IOU_TYPES, sigmas=None) -> dict:
    """``{iou type: {stat: percent}}`` by pycocotools' COCOeval (its printout swallowed)."""
    from pycocotools.cocoeval import COCOeval
    metrics = {}
    for iou_type in iou_types:
        key = {"bbox": "bbox", "segm": "segmentation", "keypoints": "keypoints"}[iou_type]
        mine = [r for r in results if key in r]
        if not mine:
            metrics[iou_type] = {name: 0.0 for name in STAT_NAMES[iou_type]}
            continue
        with contextlib.redirect_stdout(io.StringIO()):
            dt = gt.loadRes(copy.deepcopy(mine))
            ev = COCOeval(gt, dt, iou_type)
            if iou_type == "keypoints" and sigmas is not None:
                ev.params.kpt_oks_sigmas = np.asarray(sigmas, dtype=np.float64)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        metrics[iou_type] = {name: None if v < 0 else round(float(v) * 100, 3)  # -1: no gt in that range
                             for name, v in zip(STAT_NAMES[iou_type], ev.stats)}
    return metrics
