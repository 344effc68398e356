"""fpipe.detection.sampling: counts, membership and determinism, and a loop over the same keys."""
import pytest
import torch

from fpipe.detection import sampling as S


def _labels(seed, n=40, p_pos=0.2, p_ign=0.2):
    gen = torch.Generator().manual_seed(seed)
    u = torch.rand(n, generator=gen)
    return torch.where(u < p_pos, 1, torch.where(u < p_pos + p_ign, -1, 0))


def _ref(labels, keys, batch, frac):
    pos = sorted((k, i) for i, (l, k) in enumerate(zip(labels, keys)) if l >= 1)
    neg = sorted((k, i) for i, (l, k) in enumerate(zip(labels, keys)) if l == 0)
    n_pos = min(len(pos), int(batch * frac))
    n_neg = min(len(neg), batch - n_pos)
    return [i for _, i in pos[:n_pos]], [i for _, i in neg[:n_neg]]


@pytest.mark.parametrize("batch,frac", [(16, 0.5), (8, 0.25), (64, 0.5), (256, 0.5)])
@pytest.mark.parametrize("seed", [0, 1])
def test_sample_matches_loop_over_keys(seed, batch, frac):
    labels = _labels(seed)
    keys = torch.rand(40, generator=torch.Generator().manual_seed(100 + seed))
    pi, pv, ni, nv = S.sample(labels, batch, frac, keys=keys)
    assert pi.shape == (min(int(batch * frac), 40),) and ni.shape == (min(batch, 40),)
    ref_pos, ref_neg = _ref(labels.tolist(), keys.tolist(), batch, frac)
    assert pi[pv].tolist() == ref_pos and ni[nv].tolist() == ref_neg
    pos_mask, neg_mask = S.to_masks(pi, pv, 40), S.to_masks(ni, nv, 40)
    assert sorted(torch.where(pos_mask)[0].tolist()) == sorted(ref_pos)
    assert sorted(torch.where(neg_mask)[0].tolist()) == sorted(ref_neg)


def test_sample_batched_deterministic_and_counts():
    labels = torch.stack([_labels(s) for s in range(4)])
    labels[3] = torch.where(labels[3] == 1, 0, labels[3])  # an image without positives
    out1 = S.sample(labels, 16, 0.5, torch.Generator().manual_seed(7))
    out2 = S.sample(labels, 16, 0.5, torch.Generator().manual_seed(7))
    out3 = S.sample(labels, 16, 0.5, torch.Generator().manual_seed(8))
    assert all(torch.equal(a, b) for a, b in zip(out1, out2))
    assert not torch.equal(out1[2], out3[2])
    pi, pv, ni, nv = out1
    for b in range(4):
        n_pos, n_neg = int((labels[b] == 1).sum()), int((labels[b] == 0).sum())
        assert int(pv[b].sum()) == min(n_pos, 8)
        assert int(nv[b].sum()) == min(n_neg, 16 - min(n_pos, 8))
        assert (labels[b][pi[b][pv[b]]] == 1).all() and (labels[b][ni[b][nv[b]]] == 0).all()
        assert len(set(ni[b][nv[b]].tolist())) == int(nv[b].sum())
    assert int(pv[3].sum()) == 0 and int(nv[3].sum()) == 16


def test_sample_is_uniform_over_candidates():
    labels = torch.tensor([1] * 6 + [0] * 4 + [-1] * 2)
    gen = torch.Generator().manual_seed(0)
    counts = torch.zeros(12)
    for _ in range(600):
        pi, pv, ni, nv = S.sample(labels, 4, 0.5, gen)
        counts += S.to_masks(pi, pv, 12).float() + S.to_masks(ni, nv, 12).float()
    # 2 of 6 positives (p = 1/3 -> 200 each), 2 of 4 negatives (p = 1/2 -> 300 each), never ignored
    assert ((counts[:6] - 200).abs() < 45).all() and ((counts[6:10] - 300).abs() < 50).all()
    assert (counts[10:] == 0).all()
