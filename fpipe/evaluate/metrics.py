"""Accuracy from scores, and the seeded sample selections the protocols share.

Every protocol reports the same three numbers, in percent: ``top1``, ``top5`` and
``mean_per_class`` (top-1 accuracy of each class, averaged over the classes present: the figure
transfer benchmarks such as Pets, Flowers or Caltech report).
"""
import torch


def from_scores(scores: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict:
    """Metrics of class scores ``N×C`` (higher is better) against ``labels``."""
    k = min(5, scores.shape[1])
    return from_ranking(scores.topk(k, dim=1).indices, labels, num_classes)


def from_ranking(ranked: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict:
    """Metrics of predicted classes ranked best first (``N×k``, k >= 1)."""
    labels = labels.long()
    hit1 = (ranked[:, 0] == labels).double()
    hit5 = (ranked[:, :5] == labels[:, None]).any(1).double()
    per_class = torch.zeros(num_classes, dtype=torch.float64).index_add_(0, labels, hit1)
    counts = torch.bincount(labels, minlength=num_classes).double()
    present = counts > 0
    return {"top1": 100.0 * float(hit1.mean()), "top5": 100.0 * float(hit5.mean()),
            "mean_per_class": 100.0 * float((per_class[present] / counts[present]).mean())}


def stratified_split(labels: torch.Tensor, fraction: float, seed: int) -> tuple:
    """``(train, val)`` indices: ``round(fraction * n_c)`` of each class's samples (at least one
    when the class has two or more) go to val, chosen by ``seed``; both sorted."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"eval.val_fraction={fraction} must be in (0, 1)")
    gen = torch.Generator().manual_seed(seed)
    train, val = [], []
    for c in torch.unique(labels).tolist():
        members = torch.nonzero(labels == c).flatten()
        members = members[torch.randperm(len(members), generator=gen)]
        n_val = min(max(round(fraction * len(members)), 1 if len(members) > 1 else 0), len(members) - 1)
        val.append(members[:n_val])
        train.append(members[n_val:])
    return torch.cat(train).sort().values, torch.cat(val).sort().values


def per_class_sample(labels: torch.Tensor, shots: int, seed: int) -> torch.Tensor:
    """``shots`` samples of every class chosen by ``seed`` (all of a class that has fewer), sorted."""
    gen = torch.Generator().manual_seed(seed)
    chosen = []
    for c in torch.unique(labels).tolist():
        members = torch.nonzero(labels == c).flatten()
        chosen.append(members[torch.randperm(len(members), generator=gen)[:shots]])
    return torch.cat(chosen).sort().values
