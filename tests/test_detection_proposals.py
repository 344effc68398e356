"""fpipe.detection.proposals against torchvision's filter_proposals (facts) and a hand case."""
import pathlib

import pytest
import torch

from fpipe.detection import proposals as P

FACTS = pathlib.Path(__file__).resolve().parent / "fixtures" / "detection" / "torchvision_facts.pt"


@pytest.fixture(scope="module")
def facts():
    return torch.load(FACTS, weights_only=True)["proposals"]


def _canonical(boxes, scores):
    """Rows sorted by (score desc, box): torchvision's per-level path sorts equal scores unstably."""
    return sorted(zip((-scores).tolist(), boxes.tolist()))


def _run(f, post):
    shapes = [tuple(s) for s in f["image_shapes"].tolist()]
    return P.filter_proposals(f["proposals"], f["objectness"], shapes, f["levels"].tolist(), 500, post,
                              nms_thresh=0.7, score_thresh=0.2)


def test_matches_torchvision_with_padding(facts):
    boxes, scores, valid = _run(facts, 2000)
    assert boxes.shape == (2, 2000, 4)
    for b in range(2):
        n = len(facts["boxes"][b])
        assert 1000 < n < 1400  # 500 + 500 + 300 + 100 candidates, some filtered or suppressed
        assert valid[b].tolist() == [True] * n + [False] * (2000 - n)
        assert torch.equal(scores[b, :n], facts["scores"][b])
        assert _canonical(boxes[b, :n], scores[b, :n]) == _canonical(facts["boxes"][b], facts["scores"][b])
        assert (boxes[b, n:] == 0).all() and (scores[b, n:] == 0).all()


def test_post_nms_top_n_keeps_the_best(facts):
    boxes, scores, valid = _run(facts, 300)
    assert boxes.shape == (2, 300, 4) and valid.all()
    for b in range(2):
        assert torch.equal(scores[b], facts["scores"][b][:300])
        assert scores[b, -1] > facts["scores"][b][300]  # no tie across the cut in this case
        assert _canonical(boxes[b], scores[b]) == _canonical(facts["boxes"][b][:300], facts["scores"][b][:300])


def test_levels_do_not_suppress_each_other_and_filters_apply():
    box = [10.0, 10.0, 30.0, 30.0]
    proposals = torch.tensor([[box, [11.0, 10.0, 31.0, 30.0], [0.0, 0.0, 1e-4, 5.0], box, [-5.0, -5.0, 20.0, 90.0]]])
    logits = torch.tensor([[3.0, 2.0, 5.0, 1.0, -3.0]])  # sigmoid(-3) < 0.1: filtered by score
    boxes, scores, valid = P.filter_proposals(proposals, logits, [(40, 50)], [3, 2], 10, 4, 0.7, 0.1)
    # level 0: box 1 overlaps box 0 (IoU 19/21) and goes, box 2 is too small; level 1: box 3 stays
    assert valid.tolist() == [[True, True, False, False]]
    torch.testing.assert_close(boxes[0, :2], torch.tensor([box, box]))
    torch.testing.assert_close(scores[0, :2], torch.sigmoid(torch.tensor([3.0, 1.0])))
    clipped, _, _ = P.filter_proposals(proposals, logits, [(40, 50)], [3, 2], 10, 4, 0.7, 0.0)
    assert [0.0, 0.0, 20.0, 40.0] in clipped[0].tolist()  # the last box, clipped to the image
