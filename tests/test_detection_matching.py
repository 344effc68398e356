"""fpipe.detection.matching against a per-prediction loop of torchvision's Matcher rules."""
import pytest
import torch

from fpipe.detection import boxes as B
from fpipe.detection import matching as M


def _ref_match(q, high, low, allow_low):
    """q: list of M rows (gt) of N qualities; the Matcher algorithm written out with loops."""
    m, n = len(q), len(q[0])
    out, best = [], []
    for j in range(n):
        col = [q[i][j] for i in range(m)]
        v = max(col)
        b = col.index(v)
        best.append(b)
        out.append(-1 if v < low else -2 if v < high else b)
    if allow_low:
        for i in range(m):
            top = max(q[i])
            for j in range(n):
                if q[i][j] == top:
                    out[j] = best[j]
    return out


def _random_quality(seed, m=4, n=30):
    gen = torch.Generator().manual_seed(seed)
    xy = torch.rand(m + n, 2, generator=gen) * 20
    boxes = torch.cat([xy, xy + torch.rand(m + n, 2, generator=gen) * 10 + 2], 1)
    gt = boxes[:m].clone()
    gt[1] = gt[0]  # identical gt boxes: ties over gt go to the first
    return B.box_iou(gt, boxes[m:])


@pytest.mark.parametrize("allow_low", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_match_matches_loop(seed, allow_low):
    q = _random_quality(seed)
    got = M.match(q, 0.5, 0.3, allow_low)
    ref = _ref_match(q.tolist(), 0.5, 0.3, allow_low)
    assert got.tolist() == ref
    assert 1 not in got.tolist()  # gt 1 duplicates gt 0 and never wins a tie


def test_match_hand_case():
    q = torch.tensor([[0.9, 0.4, 0.1, 0.2],
                      [0.1, 0.45, 0.2, 0.25]])
    assert M.match(q, 0.7, 0.3).tolist() == [0, -2, -1, -1]
    # gt 1's best prediction (index 1, IoU 0.45, between thresholds) gets gt 1 back
    assert M.match(q, 0.7, 0.3, allow_low_quality_matches=True).tolist() == [0, 1, -1, -1]
    assert M.labels_from_matches(M.match(q, 0.7, 0.3)).tolist() == [1, -1, 0, 0]


def test_padded_gt_rows_are_ignored_and_batches_match_singles():
    qs = [_random_quality(s, m=3) for s in range(3)]
    sizes = [3, 2, 0]
    padded = torch.full((3, 3, 30), 0.99)  # padding that would win everything if not masked
    valid = torch.zeros(3, 3, dtype=torch.bool)
    for b, (q, k) in enumerate(zip(qs, sizes)):
        padded[b, :k], valid[b, :k] = q[:k], True
    got = M.match(padded, 0.5, 0.3, True, gt_valid=valid)
    for b, (q, k) in enumerate(zip(qs, sizes)):
        want = M.match(q[:k], 0.5, 0.3, True) if k else torch.full((30,), -1)
        assert got[b].tolist() == want.tolist()
    assert (got[2] == -1).all()


def test_thresholds_are_checked():
    with pytest.raises(ValueError, match="low_threshold"):
        M.match(torch.zeros(1, 1), 0.3, 0.7)


def test_no_gt_rows_is_all_below_low():
    assert M.match(torch.zeros(0, 5), 0.7, 0.3, True).tolist() == [-1] * 5
    assert M.match(torch.zeros(2, 0, 3), 0.7, 0.3).shape == (2, 3)
