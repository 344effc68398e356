"""fpipe.detection.nms against the greedy CPU algorithm written as float32 loops, and by hand."""
import numpy as np
import pytest
import torch

from fpipe.detection import nms as N


def _ref_nms(boxes, scores, thr):
    """torchvision's CPU kernel: stable descending order, IoU > thr suppresses, float32 math."""
    b = boxes.numpy().astype(np.float32)
    s = scores.tolist()
    order = sorted(range(len(s)), key=lambda i: (-s[i], i))
    area = [(b[i, 2] - b[i, 0]) * (b[i, 3] - b[i, 1]) for i in range(len(s))]
    suppressed, keep = set(), []
    for pi, i in enumerate(order):
        if i in suppressed:
            continue
        keep.append(i)
        for j in order[pi + 1:]:
            if j in suppressed:
                continue
            w = max(np.float32(0), min(b[i, 2], b[j, 2]) - max(b[i, 0], b[j, 0]))
            h = max(np.float32(0), min(b[i, 3], b[j, 3]) - max(b[i, 1], b[j, 1]))
            inter = np.float32(w * h)
            if np.float32(inter / np.float32(area[i] + area[j] - inter)) > thr:
                suppressed.add(j)
    return keep


def _boxes(seed, n, quantised=False):
    gen = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=gen) * 30
    boxes = torch.cat([xy, xy + torch.rand(n, 2, generator=gen) * 20 + 1], 1)
    scores = torch.rand(n, generator=gen)
    if quantised:  # integer corners and few score values: exact IoU ties and score ties
        boxes, scores = boxes.round(), (scores * 4).round() / 4
    return boxes, scores


def test_nms_hand_case():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 0.0, 11.0, 10.0], [20.0, 20.0, 30.0, 30.0],
                          [0.0, 0.0, 10.0, 5.0]])
    scores = torch.tensor([0.9, 0.8, 0.7, 0.95])
    # box 3 first; box 0 has IoU 0.5 with it (not > 0.5) and stays; 1 overlaps 0 by 9/11 and goes
    assert N.nms(boxes, scores, 0.5).tolist() == [3, 0, 2]
    assert N.nms(boxes, scores, 0.49).tolist() == [3, 1, 2]  # 0 goes, so 1 (IoU 45/105 with 3) stays
    assert N.nms(boxes, torch.tensor([0.5, 0.5, 0.5, 0.5]), 0.5).tolist() == [0, 2, 3]  # ties by index


@pytest.mark.parametrize("thr", [0.3, 0.5, 0.7])
@pytest.mark.parametrize("seed,quantised", [(0, False), (1, False), (2, True), (3, True)])
def test_nms_matches_greedy_loop(seed, quantised, thr):
    boxes, scores = _boxes(seed, 120, quantised)
    got = N.nms(boxes, scores, thr).tolist()
    assert got == _ref_nms(boxes, scores, thr)
    assert 10 < len(got) < 120  # the case exercises suppression


def test_batched_nms_is_nms_per_category():
    boxes, scores = _boxes(4, 90)
    idxs = torch.randint(0, 3, (90,), generator=torch.Generator().manual_seed(5))
    got = N.batched_nms(boxes, scores, idxs, 0.5)
    want = []
    for c in range(3):
        members = torch.where(idxs == c)[0]
        want += members[_ref_nms(boxes[members], scores[members], 0.5)].tolist()
    assert sorted(got.tolist()) == sorted(want)
    assert scores[got].tolist() == sorted(scores[got].tolist(), reverse=True)
    assert len(got) > len(N.nms(boxes, scores, 0.5))


def test_nms_padded_batched_with_padding():
    per_image = [_boxes(s, n) for s, n in ((6, 50), (7, 30), (8, 0))]
    boxes = torch.full((3, 50, 4), 7.0)  # padding: identical boxes with top scores, must not count
    scores = torch.ones(3, 50)
    valid = torch.zeros(3, 50, dtype=torch.bool)
    for b, (bx, sc) in enumerate(per_image):
        boxes[b, :len(bx)], scores[b, :len(bx)], valid[b, :len(bx)] = bx, sc, True
    for max_out in (5, 60):
        idx, ok = N.nms_padded(boxes, scores, 0.5, max_out, valid=valid)
        assert idx.shape == ok.shape == (3, max_out)
        for b, (bx, sc) in enumerate(per_image):
            want = _ref_nms(bx, sc, 0.5)[:max_out] if len(bx) else []
            assert idx[b][ok[b]].tolist() == want
            assert ok[b].tolist() == [True] * len(want) + [False] * (max_out - len(want))


def test_nms_padded_with_categories_equals_batched_nms():
    boxes, scores = _boxes(9, 60)
    idxs = torch.randint(0, 4, (60,), generator=torch.Generator().manual_seed(1))
    idx, ok = N.nms_padded(boxes[None], scores[None], 0.6, 100, idxs=idxs[None])
    assert idx[0][ok[0]].tolist() == N.batched_nms(boxes, scores, idxs, 0.6).tolist()


def test_empty_inputs():
    none = torch.zeros(0, 4)
    assert N.nms(none, torch.zeros(0), 0.5).tolist() == []
    assert N.batched_nms(none, torch.zeros(0), torch.zeros(0, dtype=torch.int64), 0.5).tolist() == []
    idx, ok = N.nms_padded(none, torch.zeros(0), 0.5, 3)
    assert idx.tolist() == [0, 0, 0] and ok.tolist() == [False] * 3
