"""DINO's weighted k-nearest-neighbour classifier on frozen features, exact, in bounded memory.

Features are L2-normalised, so the dot product is the cosine similarity. Each query's ``k_max``
most similar train samples are found once; neighbour ``j`` votes for its class with weight
``exp(sim_j / T)``, and every ``k`` in ``ks`` (the first ``k`` neighbours) is scored from the same
search. Memory is bounded by chunks: ``query_chunk × bank_chunk`` similarities at a time, a
running top-``k_max`` per query merged across bank chunks. Under torchrun each rank holds a
contiguous shard of the train bank; the per-rank top-``k_max`` lists are gathered and merged,
which is exactly the top-``k_max`` over the whole bank.
"""
import torch

from fpipe.evaluate import metrics, ranks


def normalise(x, chunk=65536):
    """Rows flattened to vectors, float32, unit L2 norm; one float32 copy, normalised in place."""
    x = x.reshape(len(x), -1)
    out = torch.empty(x.shape, dtype=torch.float32)
    for i in range(0, len(x), chunk):
        part = out[i:i + chunk]
        part.copy_(x[i:i + chunk])
        part.div_(torch.linalg.vector_norm(part, dim=1, keepdim=True).clamp_min_(1e-12))
    return out


def neighbours(bank, bank_labels, queries, k, dist=None, query_chunk=1024, bank_chunk=50000):
    """``(sims, labels)``, each ``Q×k``: every query's ``k`` most similar bank rows, best first.

    ``bank`` (this rank's shard) and ``queries`` are unit-norm float32 rows. Where the whole bank
    has fewer than ``k`` rows, the missing neighbours have similarity -inf (weight 0). The
    similarity block is one buffer reused for every chunk (no fresh pages to fault in)."""
    q_total = len(queries)
    sims_out = torch.empty(q_total, k)
    labels_out = torch.empty(q_total, k, dtype=torch.int64)
    bank_labels = bank_labels.long()
    buffer = torch.empty(min(query_chunk, q_total) * max(min(bank_chunk, len(bank)), 1))
    for q0 in range(0, q_total, query_chunk):
        q = queries[q0:q0 + query_chunk]
        best_s = torch.full((len(q), k), float("-inf"))
        best_l = torch.zeros(len(q), k, dtype=torch.int64)
        for b0 in range(0, len(bank), bank_chunk):
            block = bank[b0:b0 + bank_chunk]
            s = torch.mm(q, block.T, out=buffer[:len(q) * len(block)].view(len(q), len(block)))
            top_s, top_i = s.topk(min(k, s.shape[1]), dim=1)
            top_l = bank_labels[b0:b0 + bank_chunk][top_i]
            if b0 == 0 and top_s.shape[1] == k:  # the first block fills the list: nothing to merge
                best_s, best_l = top_s, top_l
            else:
                best_s, best_l = _merge(torch.cat([best_s, top_s], 1), torch.cat([best_l, top_l], 1), k)
        if dist is not None and dist.enabled:
            best_s, best_l = _merge(_gather(best_s, dist), _gather(best_l, dist), k)
        sims_out[q0:q0 + len(q)], labels_out[q0:q0 + len(q)] = best_s, best_l
    return sims_out, labels_out


def _merge(sims, labels, k):
    top_s, pos = sims.topk(k, dim=1)
    return top_s, labels.gather(1, pos)


def _gather(t, dist):
    """Every rank's ``t`` side by side: ``Q × (world_size * k)``, in rank order."""
    return torch.cat(ranks.all_gather(t, dist), 1)


def vote(sims, labels, k, temperature, num_classes):
    """Class scores ``Q×C``: the first ``k`` neighbours' ``exp(sim / T)`` summed per class."""
    weights = (sims[:, :k] / temperature).exp()
    return torch.zeros(len(sims), num_classes).scatter_add_(1, labels[:, :k], weights)


def evaluate(train, test, num_classes, cfg, dist=None) -> dict:
    """``{"k=<k>": metrics}`` for every ``k`` in ``cfg.ks``; ``train``/``test``: (features, labels)."""
    (train_x, train_y), (test_x, test_y) = train, test
    ks = sorted({int(k) for k in cfg.ks})
    if not ks or ks[0] < 1:
        raise ValueError(f"eval.knn.ks={tuple(cfg.ks)} must be positive integers")
    rows = ranks.rows(len(train_x), dist)
    bank = normalise(train_x[rows])
    sims, labels = neighbours(bank, train_y[rows], normalise(test_x), ks[-1], dist,
                              int(cfg.query_chunk), int(cfg.bank_chunk))
    return {f"k={k}": metrics.from_scores(vote(sims, labels, k, float(cfg.temperature), num_classes),
                                          test_y, num_classes) for k in ks}
