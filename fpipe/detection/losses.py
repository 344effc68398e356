"""The RPN and Fast R-CNN losses of torchvision over fixed-size samples with validity masks.

Both normalise as torchvision does: by the number of sampled elements over the whole batch
(at least 1 here, where torchvision would divide by zero). Box terms are smooth L1 with beta 1/9.
"""
import torch
import torch.nn.functional as F

BETA = 1.0 / 9


def rpn_loss(objectness, deltas, labels, targets, pos_idx, pos_valid, neg_idx, neg_valid):
    """``(objectness_loss, box_loss)`` for ``objectness [N, A]`` logits, ``deltas [N, A, 4]``,
    anchor ``labels [N, A]`` (1 / 0 / -1), ``targets [N, A, 4]`` and the sampler's output."""
    count = (pos_valid.sum() + neg_valid.sum()).clamp(min=1).to(objectness.dtype)
    idx = torch.cat([pos_idx, neg_idx], -1)
    valid = torch.cat([pos_valid, neg_valid], -1)
    logit = objectness.gather(-1, idx)
    label = labels.gather(-1, idx).clamp(min=0).to(objectness.dtype)
    bce = F.binary_cross_entropy_with_logits(logit, label, reduction="none")
    objectness_loss = torch.where(valid, bce, 0.0).sum() / count
    box = _smooth_l1(_rows(deltas, pos_idx), _rows(targets, pos_idx), pos_valid)
    return objectness_loss, box / count


def fastrcnn_loss(class_logits, box_regression, labels, targets, valid):
    """``(classification_loss, box_loss)`` for sampled RoIs: ``class_logits [..., R, C]``,
    ``box_regression [..., R, C*4]``, ``labels [..., R]`` (0 = background), ``targets [..., R, 4]``,
    ``valid [..., R]``; the box term uses each positive RoI's own class's deltas."""
    count = valid.sum().clamp(min=1).to(class_logits.dtype)
    safe_labels = torch.where(valid, labels, 0)
    ce = F.cross_entropy(class_logits.reshape(-1, class_logits.shape[-1]), safe_labels.reshape(-1), reduction="none")
    classification_loss = torch.where(valid.reshape(-1), ce, 0.0).sum() / count
    per_class = box_regression.reshape(*box_regression.shape[:-1], -1, 4)
    own = per_class.gather(-2, safe_labels[..., None, None].expand(*safe_labels.shape, 1, 4)).squeeze(-2)
    box = _smooth_l1(own, targets, valid & (labels > 0))
    return classification_loss, box / count


def _rows(t, idx):
    return t.gather(-2, idx[..., None].expand(*idx.shape, t.shape[-1]))


def _smooth_l1(pred, target, mask):
    """Sum of smooth L1 over the rows where ``mask``; other rows' targets may hold anything."""
    target = torch.where(mask[..., None], target, pred.detach())
    loss = F.smooth_l1_loss(pred, target, beta=BETA, reduction="none")
    return torch.where(mask[..., None], loss, 0.0).sum()
