"""torchvision's balanced positive/negative sampler with static shapes and an explicit generator.

Labels: >= 1 positive, 0 negative, -1 ignored. Each image samples ``min(#pos, int(B * f))``
positives and fills up to B with negatives, uniformly without replacement; the result is
fixed-size index tensors plus validity masks, so a compiled step sees the same shapes always.
"""
import torch


def sample(labels, batch_size_per_image, positive_fraction, generator=None, keys=None):
    """Returns ``(pos_idx, pos_valid, neg_idx, neg_valid)`` for ``labels [..., A]``.

    ``pos_idx [..., P]`` with P = min(int(B * f), A) and ``neg_idx [..., Q]`` with Q = min(B, A);
    entries where ``*_valid`` is False are padding (pointing at arbitrary elements). Randomness is
    one uniform key per element (from ``generator``, or ``keys`` given), smallest keys win.
    """
    n = labels.shape[-1]
    max_pos = min(int(batch_size_per_image * positive_fraction), n)
    max_neg = min(batch_size_per_image, n)
    if keys is None:
        keys = torch.rand(labels.shape, generator=generator, device=labels.device)
    positive, negative = labels >= 1, labels == 0
    num_pos = positive.sum(-1, keepdim=True).clamp(max=max_pos)
    num_neg = negative.sum(-1, keepdim=True).clamp(max=batch_size_per_image - num_pos)
    pos_idx = _smallest(torch.where(positive, keys, 2.0), max_pos)
    neg_idx = _smallest(torch.where(negative, keys, 2.0), max_neg)
    pos_valid = torch.arange(max_pos, device=labels.device) < num_pos
    neg_valid = torch.arange(max_neg, device=labels.device) < num_neg
    return pos_idx, pos_valid, neg_idx, neg_valid


def _smallest(keys, k):
    return torch.topk(keys, k, dim=-1, largest=False, sorted=True).indices


def to_masks(idx, valid, num):
    """Boolean ``[..., num]`` masks of the sampled elements (torchvision's binary-mask output)."""
    hits = torch.zeros(idx.shape[:-1] + (num,), dtype=torch.int32, device=idx.device)
    return hits.scatter_add(-1, idx, valid.to(torch.int32)) > 0
