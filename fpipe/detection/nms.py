"""Greedy non-maximum suppression with torchvision's semantics, vectorised, with a fixed-size form.

Boxes go in descending score order (a stable sort: ties by index); a box is dropped when its
IoU with a kept, earlier box is > the threshold. The greedy result is the fixed point of "kept =
not suppressed by any kept earlier box", reached by whole-matrix rounds (at most N, usually few).
"""
import torch

from fpipe.detection.boxes import box_iou


def nms_mask(boxes, scores, iou_threshold, valid=None):
    """Boolean ``[..., N]``: the boxes greedy NMS keeps (invalid boxes neither kept nor suppressing)."""
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    if valid is not None:  # invalid boxes last, their order among themselves irrelevant
        order = torch.gather(order, -1, torch.sort((~valid).gather(-1, order).to(torch.int8), dim=-1,
                                                   stable=True).indices)
    kept_sorted = _greedy_sorted(boxes.gather(-2, order[..., None].expand(order.shape + (4,))), iou_threshold,
                                 None if valid is None else valid.gather(-1, order))
    return torch.zeros_like(kept_sorted).scatter(-1, order, kept_sorted)


def _greedy_sorted(sorted_boxes, iou_threshold, valid_sorted):
    n = sorted_boxes.shape[-2]
    later = torch.ones(n, n, dtype=torch.bool, device=sorted_boxes.device).triu(1)
    suppresses = (box_iou(sorted_boxes, sorted_boxes) > iou_threshold) & later  # [.., i, j]: i may drop j
    start = torch.ones(sorted_boxes.shape[:-1], dtype=torch.bool, device=sorted_boxes.device)
    if valid_sorted is not None:
        start = valid_sorted
    keep = start
    for _ in range(n + 1):  # after round t the first t decisions are final
        new = start & ~(keep[..., :, None] & suppresses).any(-2)
        if torch.equal(new, keep):
            break
        keep = new
    return keep


def nms(boxes, scores, iou_threshold):
    """Indices of the kept ``[N, 4]`` boxes, by descending score (torchvision.ops.nms)."""
    keep = nms_mask(boxes, scores, iou_threshold)
    order = torch.sort(scores, descending=True, stable=True).indices
    return order[keep[order]]


def batched_nms(boxes, scores, idxs, iou_threshold):
    """NMS within each category ``idxs`` only, by torchvision's coordinate offset per category."""
    if boxes.numel() == 0:
        return torch.empty((0,), dtype=torch.int64, device=boxes.device)
    return nms(_offset_by_category(boxes, idxs), scores, iou_threshold)


def _offset_by_category(boxes, idxs, valid=None):
    """Shifts each category's boxes by category * (max coordinate + 1), per image (leading dims)."""
    real = boxes if valid is None else torch.where(valid[..., None], boxes, -float("inf"))
    top = real.amax(dim=(-2, -1))[..., None]
    offsets = idxs.to(boxes) * (top + torch.tensor(1).to(boxes))
    return boxes + offsets[..., None]


def nms_padded(boxes, scores, iou_threshold, max_out, valid=None, idxs=None):
    """Fixed-size NMS: ``(keep_idx [..., max_out], keep_valid [..., max_out])``, best score first.

    ``valid [..., N]`` marks real boxes among padding; ``idxs`` (categories) makes it batched_nms.
    Slots past the number kept hold index 0 and ``keep_valid`` False.
    """
    if idxs is not None:
        boxes = _offset_by_category(boxes, idxs, valid)
    kept = nms_mask(boxes, scores, iou_threshold, valid)
    score_key = torch.where(kept, scores, -float("inf"))
    order = torch.sort(score_key, dim=-1, descending=True, stable=True).indices
    # kept boxes first, by descending score, ties by index (a second stable sort on "not kept")
    order = order.gather(-1, torch.sort((~kept).gather(-1, order).to(torch.int8), dim=-1, stable=True).indices)
    n = boxes.shape[-2]
    take = min(max_out, n)
    idx, ok = order[..., :take], kept.gather(-1, order[..., :take])
    if take < max_out:
        pad = idx.shape[:-1] + (max_out - take,)
        idx = torch.cat([idx, idx.new_zeros(pad)], -1)
        ok = torch.cat([ok, ok.new_zeros(pad)], -1)
    return torch.where(ok, idx, 0), ok
