"""What a head learns and how it is scored: its loss, a train metric and evaluation counts.

A head's ``loss`` says how its logits meet its ``target`` (a batch key: ``label`` or one of the
dataset's extra targets, multi-task learning as VISSL's heads with their own targets):

- ``cross_entropy``: one class index per sample (or a row of class probabilities: Mixup's,
  label smoothing's soft targets, fpipe.data.mix); scored by top-k accuracy (``top1``, ``top5``).
- ``bce``: several independent binary targets (multi-label attributes, 0/1 per column), one
  logit each; scored by ``acc``, the percentage of (sample, column) decisions right at logit 0.
- ``mse``: real-valued targets (regression), one output per column; scored by ``mse``.

Evaluation sums counts (never means), so batches and processes add up exactly.
"""
import torch
import torch.nn.functional as F

LOSSES = ("cross_entropy", "bce", "mse")
METRICS = {"cross_entropy": ("top1", "top5"), "bce": ("acc",), "mse": ("mse",)}
PERCENT = ("top1", "top5", "acc", "real_top1")  # counts that are divided by the sample count, in %
LOWER_IS_BETTER = ("mse",)


def check(kind: str, where: str) -> str:
    if kind not in LOSSES:
        raise ValueError(f"{where}={kind!r}; valid: {LOSSES}")
    return kind


def selected_by(results: dict) -> str:
    """The metric to select by among a head's evaluated ``results``."""
    return next(m for kind in LOSSES for m in METRICS[kind][:1] if m in results)


def loss(kind: str, logits, target):
    """The mean loss of a batch, in float32 whatever the logits' precision."""
    logits = logits.float()
    if kind == "cross_entropy":
        return F.cross_entropy(logits, target.float() if target.is_floating_point() else target)
    target = _as_columns(target, logits)
    if kind == "bce":
        return F.binary_cross_entropy_with_logits(logits, target)
    return F.mse_loss(logits, target)


def train_metric(kind: str, logits, target) -> tuple:
    """``(name, value)`` logged per step beside the loss: ``train_top1``, ``train_acc`` or ``train_mse``."""
    logits = logits.detach().float()
    if kind == "cross_entropy":  # soft targets: their most likely class
        target = target.argmax(1) if target.is_floating_point() else target
        return "train_top1", 100.0 * (logits.argmax(1) == target).float().mean()
    target = _as_columns(target, logits)
    if kind == "bce":
        return "train_acc", 100.0 * ((logits > 0) == (target > 0.5)).float().mean()
    return "train_mse", F.mse_loss(logits, target)


def eval_counts(kind: str, logits, target, valid, topk=(1, 5)) -> dict:
    """Per-metric sums over the valid rows (``valid``: bool per sample)."""
    logits = logits.float()
    if kind == "cross_entropy":
        k_max = min(max(topk), logits.shape[1])
        hit = logits.topk(k_max, dim=1).indices == target[:, None]
        return {f"top{k}": (hit[:, :min(k, k_max)].any(1) & valid).sum() for k in topk}
    target = _as_columns(target, logits)
    if kind == "bce":
        right = ((logits > 0) == (target > 0.5)).float().mean(1)
        return {"acc": torch.where(valid, right, 0.0).sum()}
    return {"mse": torch.where(valid, ((logits - target) ** 2).mean(1), 0.0).sum()}  # padding may be inf


def finish(metric: str, total, count: int) -> float:
    """A summed metric over ``count`` samples: a percentage for accuracies, a mean otherwise."""
    return (100.0 if metric in PERCENT else 1.0) * float(total) / max(count, 1)


def _as_columns(target, logits):
    """Float targets N×K for N×K outputs (a single column may come as N)."""
    target = target.to(logits.dtype)
    return target[:, None] if target.ndim == 1 else target
