"""Training targets of the RoI heads (torchvision's select_training_samples) at fixed size.

Per image: the ground-truth boxes join the proposals, every candidate is matched to the gt
(IoU >= 0.5 foreground, else background), a balanced sample is drawn, and each sampled RoI gets
its class label and its regression target (weights 10, 10, 5, 5). Padded proposals and padded
gt are never sampled.
"""
import torch

from fpipe.detection import matching, sampling
from fpipe.detection.boxes import ROI_HEADS_WEIGHTS, box_iou, encode


def select_training_samples(proposals, proposal_valid, gt_boxes, gt_labels, gt_valid, batch_size_per_image=512,
                            positive_fraction=0.25, fg_iou_thresh=0.5, bg_iou_thresh=0.5, generator=None,
                            weights=ROI_HEADS_WEIGHTS, keys=None):
    """``proposals [N, P, 4]`` and ``gt_boxes [N, M, 4]`` (with masks, ``gt_labels [N, M]``) ->
    dict of ``[N, S]`` tensors, S = min(batch_size_per_image, P + M): ``rois``, ``labels``,
    ``targets``, ``valid`` and ``index`` (into the proposals followed by the gt boxes)."""
    proposals = proposals.detach()  # targets and sampled RoIs carry no gradient (as torchvision)
    cands = torch.cat([proposals, gt_boxes.to(proposals.dtype)], 1)
    cand_valid = torch.cat([proposal_valid, gt_valid], 1)
    matches = matching.match(box_iou(gt_boxes.to(proposals.dtype), cands), fg_iou_thresh, bg_iou_thresh,
                             gt_valid=gt_valid)
    matched = matches.clamp(min=0)
    labels = gt_labels.to(torch.int64).gather(1, matched)
    labels = torch.where(matches == matching.BELOW_LOW_THRESHOLD, 0, labels)
    labels = torch.where((matches == matching.BETWEEN_THRESHOLDS) | ~cand_valid, -1, labels)
    pos_idx, pos_ok, neg_idx, neg_ok = sampling.sample(labels, batch_size_per_image, positive_fraction,
                                                       generator, keys)
    idx, ok = torch.cat([pos_idx, neg_idx], 1), torch.cat([pos_ok, neg_ok], 1)
    size = min(batch_size_per_image, cands.shape[1])
    first = torch.sort((~ok).to(torch.int8), dim=1, stable=True).indices[:, :size]  # sampled slots first
    idx, ok = idx.gather(1, first), ok.gather(1, first)
    rois = cands.gather(1, idx[..., None].expand(-1, -1, 4))
    roi_labels = torch.where(ok, labels.gather(1, idx), 0)
    gt = gt_boxes.to(proposals.dtype).gather(1, matched.gather(1, idx)[..., None].expand(-1, -1, 4))
    positive = ok & (roi_labels > 0)
    targets = torch.where(positive[..., None], encode(torch.where(positive[..., None], gt, rois), rois, weights), 0.0)
    return {"rois": rois, "labels": roi_labels, "targets": targets, "valid": ok, "index": idx}
