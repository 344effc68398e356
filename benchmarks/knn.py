r"""kNN over a large train bank: fpipe's chunked search vs a plain chunked torch.mm + topk.

    PYTHONPATH=. python benchmarks/knn.py                      # 100k x 2048 bank, 10k queries
    PYTHONPATH=. python benchmarks/knn.py --queries=1000       # the same bank, fewer queries

Each method runs in its own process (peak RSS is per process): random features, DINO's votes
(T=0.07) for k = 10, 20, 100, 200 from one search. Prints seconds, peak RSS above the
features themselves, and the ratio plain / fpipe (> 1: fpipe is faster). faiss-cpu, if
installed, is timed too (exact inner-product search, IndexFlatIP); it is never installed here.
"""
import argparse
import importlib.util
import json
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

KS, T, CLASSES = (10, 20, 100, 200), 0.07, 1000


def data(n, d, q):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(n, d, generator=g), torch.randint(0, CLASSES, (n,), generator=g),
            torch.randn(q, d, generator=g))


def plain(bank, labels, queries, chunk=1024):
    """What one writes first: normalise, then per query chunk one mm against the whole bank + topk."""
    bank, queries = F.normalize(bank, dim=1), F.normalize(queries, dim=1)
    preds = {k: [] for k in KS}
    for i in range(0, len(queries), chunk):
        sims, idx = (queries[i:i + chunk] @ bank.T).topk(max(KS), dim=1)
        weights, votes = (sims / T).exp(), labels[idx]
        for k in KS:
            scores = torch.zeros(len(sims), CLASSES).scatter_add_(1, votes[:, :k], weights[:, :k])
            preds[k].append(scores.argmax(1))
    return {k: torch.cat(v) for k, v in preds.items()}


def fpipe_knn(bank, labels, queries):
    from fpipe.evaluate import knn
    sims, votes = knn.neighbours(knn.normalise(bank), labels, knn.normalise(queries), max(KS))
    return {k: knn.vote(sims, votes, k, T, CLASSES).argmax(1) for k in KS}


def faiss_knn(bank, labels, queries):
    import faiss
    index = faiss.IndexFlatIP(bank.shape[1])
    index.add(F.normalize(bank, dim=1).numpy())
    sims, idx = index.search(F.normalize(queries, dim=1).numpy(), max(KS))
    sims, votes = torch.from_numpy(sims), labels[torch.from_numpy(idx)]
    return {k: torch.zeros(len(sims), CLASSES).scatter_add_(1, votes[:, :k], (sims[:, :k] / T).exp()).argmax(1)
            for k in KS}


def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2 ** 20


def one(method, n, d, q):
    bank, labels, queries = data(n, d, q)
    base = rss_mb()
    t0 = time.perf_counter()
    preds = {"plain": plain, "fpipe": fpipe_knn, "faiss": faiss_knn}[method](bank, labels, queries)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"method": method, "seconds": seconds, "peak_rss_above_features_mb": peak - base,
                      "preds": {k: v[:2000].tolist() for k, v in preds.items()}}))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--bank", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--queries", type=int, default=10_000)
    p.add_argument("--method")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the median time is reported")
    a = p.parse_args()
    if a.method:
        return one(a.method, a.bank, a.dim, a.queries)
    methods = ["plain", "fpipe"]
    if importlib.util.find_spec("faiss"):
        methods.append("faiss")
    else:
        print("faiss-cpu is not installed: not timed")
    runs = {m: [] for m in methods}
    for _ in range(a.rounds):  # interleaved, each in a fresh process (its own peak memory)
        for m in methods:
            proc = subprocess.run([sys.executable, __file__, f"--method={m}", f"--bank={a.bank}", f"--dim={a.dim}",
                                   f"--queries={a.queries}"], capture_output=True, text=True, check=True)
            runs[m].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    out = {}
    for m, rs in runs.items():
        out[m] = {**rs[0], "seconds": statistics.median(r["seconds"] for r in rs),
                  "peak_rss_above_features_mb": max(r["peak_rss_above_features_mb"] for r in rs)}
        print(f"{m:6s} {out[m]['seconds']:8.2f} s (median of {a.rounds}: "
              f"{', '.join(format(r['seconds'], '.2f') for r in rs)})   "
              f"peak RSS above the features {out[m]['peak_rss_above_features_mb']:8.0f} MB")
    same = all(out["fpipe"]["preds"][k] == out["plain"]["preds"][k] for k in out["plain"]["preds"])
    print(f"bank {a.bank} x {a.dim}, {a.queries} queries, k = {KS}; same predictions: {same}")
    print(f"ratio_vs_plain (plain time / fpipe time): {out['plain']['seconds'] / out['fpipe']['seconds']:.2f}")
    print(f"memory_vs_plain (fpipe peak / plain peak): "
          f"{out['fpipe']['peak_rss_above_features_mb'] / out['plain']['peak_rss_above_features_mb']:.2f}")


if __name__ == "__main__":
    main()
