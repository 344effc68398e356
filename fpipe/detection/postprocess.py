"""torchvision's RoIHeads.postprocess_detections, exactly, with data-dependent sizes (inference).

Per image: softmax over classes; each class's deltas decoded on the proposal (weights 10, 10,
5, 5); boxes clipped to the image; the background column dropped; every (proposal, class)
becomes a candidate; candidates with score <= ``score_thresh`` and boxes with a side < 1e-2 are
dropped; NMS within each class (``nms_thresh``); the best ``detections_per_img`` remain, by
descending score. Outputs are lists of per-image tensors of varying length (a host sync per
image: exactness over static shapes at inference, decided in issue #11).
"""
import torch
import torch.nn.functional as F

from fpipe.detection.boxes import ROI_HEADS_WEIGHTS, clip_boxes_to_image, decode, remove_small_boxes
from fpipe.detection.nms import batched_nms


def postprocess_detections(class_logits, box_regression, proposals, image_sizes, score_thresh=0.05,
                           nms_thresh=0.5, detections_per_img=100, weights=ROI_HEADS_WEIGHTS):
    """``class_logits [R, C]`` and ``box_regression [R, C*4]`` of the proposals (a list of
    ``[R_i, 4]`` per image, concatenated in that order) -> lists of ``boxes [D_i, 4]``, ``scores
    [D_i]``, ``labels [D_i]`` (int64, 1..C-1), one per image; ``image_sizes``: (h, w) each."""
    num_classes = class_logits.shape[-1]
    counts = [int(p.shape[0]) for p in proposals]
    pred_boxes = decode(box_regression, torch.cat(list(proposals)), weights).reshape(-1, num_classes, 4)
    pred_scores = F.softmax(class_logits, -1)
    all_boxes, all_scores, all_labels = [], [], []
    for boxes, scores, size in zip(pred_boxes.split(counts), pred_scores.split(counts), image_sizes):
        boxes = clip_boxes_to_image(boxes, (int(size[0]), int(size[1])))
        labels = torch.arange(num_classes, device=boxes.device).view(1, -1).expand_as(scores)
        boxes, scores, labels = boxes[:, 1:].reshape(-1, 4), scores[:, 1:].reshape(-1), labels[:, 1:].reshape(-1)
        inds = torch.where(scores > score_thresh)[0]
        boxes, scores, labels = boxes[inds], scores[inds], labels[inds]
        keep = remove_small_boxes(boxes, 1e-2)
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        keep = batched_nms(boxes, scores, labels, nms_thresh)[:detections_per_img]
        all_boxes.append(boxes[keep])
        all_scores.append(scores[keep])
        all_labels.append(labels[keep])
    return all_boxes, all_scores, all_labels
