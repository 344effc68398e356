"""Boxes in (x1, y1, x2, y2) form: area, IoU, clipping, size filter, and torchvision's BoxCoder.

The arithmetic follows torchvision.ops.boxes and models.detection._utils op for op, so the
results agree to the last bit in float32 where the order of operations allows.
"""
import math

import torch

RPN_WEIGHTS = (1.0, 1.0, 1.0, 1.0)
ROI_HEADS_WEIGHTS = (10.0, 10.0, 5.0, 5.0)
BBOX_XFORM_CLIP = math.log(1000.0 / 16)


def box_area(boxes):
    """Area of ``[..., 4]`` boxes; negative for inverted boxes, as torchvision."""
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def box_iou(boxes1, boxes2):
    """Pairwise IoU ``[..., N, M]`` of ``[..., N, 4]`` and ``[..., M, 4]`` (leading dims broadcast)."""
    area1, area2 = box_area(boxes1), box_area(boxes2)
    lt = torch.maximum(boxes1[..., :, None, :2], boxes2[..., None, :, :2])
    rb = torch.minimum(boxes1[..., :, None, 2:], boxes2[..., None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    return inter / (area1[..., :, None] + area2[..., None, :] - inter)


def clip_boxes_to_image(boxes, size):
    """Clamps x to [0, width] and y to [0, height]; ``size`` is (height, width), or a tensor
    ``[..., 2]`` of per-image sizes that broadcasts against ``boxes[..., :2]``."""
    if isinstance(size, torch.Tensor):
        size = size.to(boxes.dtype)
        x = torch.minimum(boxes[..., 0::2].clamp(min=0), size[..., 1:2])
        y = torch.minimum(boxes[..., 1::2].clamp(min=0), size[..., 0:1])
    else:
        height, width = size
        x = boxes[..., 0::2].clamp(min=0, max=width)
        y = boxes[..., 1::2].clamp(min=0, max=height)
    return torch.stack((x, y), dim=-1).reshape(boxes.shape)


def small_box_mask(boxes, min_size):
    """True where both sides are at least ``min_size``: the fixed-shape form of remove_small_boxes."""
    ws, hs = boxes[..., 2] - boxes[..., 0], boxes[..., 3] - boxes[..., 1]
    return (ws >= min_size) & (hs >= min_size)


def remove_small_boxes(boxes, min_size):
    """Indices of the ``[N, 4]`` boxes whose sides are both at least ``min_size`` (torchvision's)."""
    return torch.where(small_box_mask(boxes, min_size))[0]


def encode(reference_boxes, proposals, weights=RPN_WEIGHTS):
    """Regression targets ``[..., 4]`` that move ``proposals`` onto ``reference_boxes`` (gt)."""
    wx, wy, ww, wh = (torch.as_tensor(w, dtype=reference_boxes.dtype, device=reference_boxes.device)
                      for w in weights)
    ex_w = proposals[..., 2] - proposals[..., 0]
    ex_h = proposals[..., 3] - proposals[..., 1]
    ex_x = proposals[..., 0] + 0.5 * ex_w
    ex_y = proposals[..., 1] + 0.5 * ex_h
    gt_w = reference_boxes[..., 2] - reference_boxes[..., 0]
    gt_h = reference_boxes[..., 3] - reference_boxes[..., 1]
    gt_x = reference_boxes[..., 0] + 0.5 * gt_w
    gt_y = reference_boxes[..., 1] + 0.5 * gt_h
    return torch.stack((wx * (gt_x - ex_x) / ex_w, wy * (gt_y - ex_y) / ex_h,
                        ww * torch.log(gt_w / ex_w), wh * torch.log(gt_h / ex_h)), dim=-1)


def decode(rel_codes, boxes, weights=RPN_WEIGHTS, clip=BBOX_XFORM_CLIP):
    """Boxes from codes: ``rel_codes [..., K*4]`` relative to ``boxes [..., 4]`` -> ``[..., K*4]``.

    K > 1 is the per-class layout of the RoI box predictor; dw, dh are clamped at ``clip`` so
    exp() cannot overflow.
    """
    boxes = boxes.to(rel_codes.dtype)
    widths = boxes[..., 2] - boxes[..., 0]
    heights = boxes[..., 3] - boxes[..., 1]
    ctr_x = boxes[..., 0] + 0.5 * widths
    ctr_y = boxes[..., 1] + 0.5 * heights
    wx, wy, ww, wh = weights
    dx = rel_codes[..., 0::4] / wx
    dy = rel_codes[..., 1::4] / wy
    dw = torch.clamp(rel_codes[..., 2::4] / ww, max=clip)
    dh = torch.clamp(rel_codes[..., 3::4] / wh, max=clip)
    pred_ctr_x = dx * widths[..., None] + ctr_x[..., None]
    pred_ctr_y = dy * heights[..., None] + ctr_y[..., None]
    pred_w = torch.exp(dw) * widths[..., None]
    pred_h = torch.exp(dh) * heights[..., None]
    half_w, half_h = 0.5 * pred_w, 0.5 * pred_h
    out = torch.stack((pred_ctr_x - half_w, pred_ctr_y - half_h, pred_ctr_x + half_w, pred_ctr_y + half_h), dim=-1)
    return out.flatten(-2)
