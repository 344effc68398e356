"""The RPN's proposal filter (torchvision's filter_proposals) with fixed-size outputs.

Per image: the top ``pre_nms_top_n`` anchors of each level by objectness, clipped to the image,
without boxes under ``min_size`` or scores under ``score_thresh``, NMS within each level, then the
best ``post_nms_top_n`` by score. Levels are a padded batch dimension of one NMS call, so shapes
never depend on the data; validity masks say which slots hold proposals.
"""
import torch

from fpipe.detection.boxes import RPN_WEIGHTS, clip_boxes_to_image, decode, small_box_mask
from fpipe.detection.nms import nms_mask


def propose(objectness, deltas, anchors, image_shapes, num_anchors_per_level, pre_nms_top_n, post_nms_top_n,
            nms_thresh=0.7, score_thresh=0.0, min_size=1e-3):
    """The RPN's proposals: ``deltas [N, A, 4]`` decoded on ``anchors [A, 4]`` (no gradient, as
    torchvision), then :func:`filter_proposals`."""
    boxes = decode(deltas.detach(), anchors, RPN_WEIGHTS)
    return filter_proposals(boxes, objectness, image_shapes, num_anchors_per_level, pre_nms_top_n, post_nms_top_n,
                            nms_thresh, score_thresh, min_size)


def filter_proposals(proposals, objectness, image_shapes, num_anchors_per_level, pre_nms_top_n, post_nms_top_n,
                     nms_thresh=0.7, score_thresh=0.0, min_size=1e-3):
    """``proposals [N, A, 4]``, ``objectness [N, A]`` logits -> ``(boxes, scores, valid)``, each
    ``[N, post_nms_top_n, ...]``; scores are sigmoid probabilities, best first. No gradient flows
    into the objectness (as torchvision)."""
    n = proposals.shape[0]
    logits = objectness.detach().reshape(n, -1)
    k_max = max(min(pre_nms_top_n, a) for a in num_anchors_per_level)
    idx, slot_ok, start = [], [], 0
    for a in num_anchors_per_level:  # top-k per level, padded to k_max slots
        k = min(pre_nms_top_n, a)
        top = logits[:, start:start + a].topk(k, dim=1).indices + start
        idx.append(torch.cat([top, top.new_zeros(n, k_max - k)], 1))
        slot_ok.append(torch.arange(k_max, device=logits.device) < k)
        start += a
    idx = torch.stack(idx, 1)  # [N, L, k_max]
    boxes = proposals.gather(1, idx.reshape(n, -1, 1).expand(-1, -1, 4)).view(*idx.shape, 4)
    scores = torch.sigmoid(logits.gather(1, idx.reshape(n, -1)).view(idx.shape))
    sizes = torch.as_tensor([[float(h), float(w)] for h, w in image_shapes], dtype=boxes.dtype, device=boxes.device)
    boxes = clip_boxes_to_image(boxes, sizes[:, None, None, :])
    valid = torch.stack(slot_ok)[None] & small_box_mask(boxes, min_size) & (scores >= score_thresh)
    kept = nms_mask(boxes, scores, nms_thresh, valid).reshape(n, -1)  # levels never suppress each other
    boxes, scores = boxes.reshape(n, -1, 4), scores.reshape(n, -1)
    # kept slots first by descending score, ties in level-then-rank order (torchvision's order)
    order = torch.sort(torch.where(kept, scores, -float("inf")), dim=1, descending=True, stable=True).indices
    order = order.gather(1, torch.sort((~kept).gather(1, order).to(torch.int8), dim=1, stable=True).indices)
    take = min(post_nms_top_n, order.shape[1])
    order = order[:, :take]
    out_boxes = boxes.gather(1, order[..., None].expand(-1, -1, 4))
    out_scores, out_valid = scores.gather(1, order), kept.gather(1, order)
    if take < post_nms_top_n:
        pad = post_nms_top_n - take
        out_boxes = torch.cat([out_boxes, out_boxes.new_zeros(n, pad, 4)], 1)
        out_scores = torch.cat([out_scores, out_scores.new_zeros(n, pad)], 1)
        out_valid = torch.cat([out_valid, out_valid.new_zeros(n, pad)], 1)
    return torch.where(out_valid[..., None], out_boxes, 0.0), torch.where(out_valid, out_scores, 0.0), out_valid

