"""fpipe.detection.roi_targets against torchvision's assignment rules written out per candidate."""
import torch

from fpipe.detection import boxes as B
from fpipe.detection import roi_targets as T


def _iou(a, b):
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def _ref_labels(cands, cand_valid, gt, gt_labels, gt_valid):
    """Per candidate: (label, matched gt) by the rules of assign_targets_to_proposals (0.5 / 0.5)."""
    real = [i for i in range(len(gt)) if gt_valid[i]]
    out = []
    for c, ok in zip(cands, cand_valid):
        if not ok:
            out.append((-1, None))
        elif not real:
            out.append((0, None))
        else:
            ious = [_iou(gt[i], c) for i in real]
            best = real[ious.index(max(ious))]
            out.append((gt_labels[best], best) if max(ious) >= 0.5 else (0, best))
    return out


def _case(seed):
    gen = torch.Generator().manual_seed(seed)
    n, p, m = 3, 60, 4
    xy = torch.rand(n, p, 2, generator=gen) * 40
    proposals = torch.cat([xy, xy + torch.rand(n, p, 2, generator=gen) * 20 + 2], -1)
    gxy = torch.rand(n, m, 2, generator=gen) * 40
    gt = torch.cat([gxy, gxy + torch.rand(n, m, 2, generator=gen) * 20 + 5], -1)
    proposals[:, :8] = gt.repeat(1, 2, 1) + torch.rand(n, 8, 4, generator=gen)  # some foreground
    gt_labels = torch.randint(1, 5, (n, m), generator=gen)
    gt_valid = torch.tensor([[True, True, True, False], [True, False, False, False], [False] * 4])
    proposal_valid = torch.arange(p)[None].expand(n, p) < torch.tensor([[60], [45], [30]])
    return proposals, proposal_valid, gt, gt_labels, gt_valid


def test_sampled_rois_follow_the_rules():
    proposals, proposal_valid, gt, gt_labels, gt_valid = _case(0)
    out = T.select_training_samples(proposals, proposal_valid, gt, gt_labels, gt_valid, 24, 0.25,
                                    generator=torch.Generator().manual_seed(1))
    assert out["rois"].shape == (3, 24, 4) and out["valid"].shape == (3, 24)
    for b in range(3):
        cands = torch.cat([proposals[b], gt[b]]).tolist()
        ref = _ref_labels(cands, proposal_valid[b].tolist() + gt_valid[b].tolist(), gt[b].tolist(),
                          gt_labels[b].tolist(), gt_valid[b].tolist())
        n_fg = sum(1 for lab, _ in ref if lab > 0)
        n_bg = sum(1 for lab, _ in ref if lab == 0)
        ok = out["valid"][b]
        idx = out["index"][b][ok].tolist()
        labels = out["labels"][b][ok].tolist()
        assert len(set(idx)) == len(idx)
        assert sum(1 for x in labels if x > 0) == min(n_fg, 6)
        assert sum(1 for x in labels if x == 0) == min(n_bg, 24 - min(n_fg, 6))
        for slot, (i, lab) in enumerate(zip(idx, labels)):
            assert ref[i][0] == lab >= 0
            torch.testing.assert_close(out["rois"][b][ok][slot], torch.tensor(cands[i]))
            if lab > 0:
                want = B.encode(gt[b][ref[i][1]][None], torch.tensor([cands[i]]), B.ROI_HEADS_WEIGHTS)[0]
                torch.testing.assert_close(out["targets"][b][ok][slot], want)
            else:
                assert (out["targets"][b][ok][slot] == 0).all()
        assert (out["labels"][b][~ok] == 0).all() and (out["targets"][b][~ok] == 0).all()
    assert (out["labels"][2][out["valid"][2]] == 0).all()  # no gt: background only
    assert int(out["valid"][0].sum()) == 24


def test_deterministic_given_a_generator():
    case = _case(2)
    a = T.select_training_samples(*case, 16, 0.25, generator=torch.Generator().manual_seed(5))
    b = T.select_training_samples(*case, 16, 0.25, generator=torch.Generator().manual_seed(5))
    c = T.select_training_samples(*case, 16, 0.25, generator=torch.Generator().manual_seed(6))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["index"], c["index"])
