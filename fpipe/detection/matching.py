"""torchvision's Matcher as one function over padded ground truth: prediction -> gt index or a code.

Quality is ``[..., M, N]`` (M gt rows, N predictions, e.g. box_iou(gt, anchors)); padded gt rows
are switched off by ``gt_valid [..., M]``, so a batch of images is one call with static shapes.
"""
import torch

BELOW_LOW_THRESHOLD = -1
BETWEEN_THRESHOLDS = -2


def match(quality, high_threshold, low_threshold, allow_low_quality_matches=False, gt_valid=None):
    """``[..., N]`` int64: the best gt (first on ties) if its quality >= high, else -2 when >= low, else -1.

    With ``allow_low_quality_matches`` every prediction that ties for a gt's highest quality keeps
    its best gt even below the thresholds (torchvision's rule, quirks included: a gt that overlaps
    nothing restores the matches of all predictions at quality 0). No valid gt: all -1.
    """
    if low_threshold > high_threshold:
        raise ValueError(f"low_threshold {low_threshold} > high_threshold {high_threshold}")
    if quality.shape[-2] == 0:  # no gt rows at all: nothing to match (torchvision raises here)
        return torch.full(quality.shape[:-2] + quality.shape[-1:], BELOW_LOW_THRESHOLD, dtype=torch.int64,
                          device=quality.device)
    if gt_valid is not None:
        quality = torch.where(gt_valid[..., :, None], quality, torch.full_like(quality, -float("inf")))
    matched_vals = quality.max(dim=-2).values
    all_matches = quality.argmax(dim=-2)  # the first maximal gt, as documented (max's index is not)
    matches = torch.where(matched_vals < low_threshold, BELOW_LOW_THRESHOLD,
                          torch.where(matched_vals < high_threshold, BETWEEN_THRESHOLDS, all_matches))
    if allow_low_quality_matches:
        highest = quality.max(dim=-1, keepdim=True).values  # [..., M, 1]
        ties = quality == highest
        if gt_valid is not None:
            ties = ties & gt_valid[..., :, None]
        matches = torch.where(ties.any(dim=-2), all_matches, matches)
    return matches


def labels_from_matches(matches, between_label=-1):
    """RPN labels: 1 matched, 0 below the low threshold, ``between_label`` (ignored) in between."""
    labels = (matches >= 0).to(torch.int64)
    labels = torch.where(matches == BETWEEN_THRESHOLDS, between_label, labels)
    return labels
