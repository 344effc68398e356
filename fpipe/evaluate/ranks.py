"""Which rows of a cached split this process works on under torchrun (all of them alone)."""
import torch
import torch.distributed as tdist


def rows(n, dist):
    """This rank's contiguous slice of ``n`` rows; the slices of all ranks cover ``0..n`` in order."""
    if dist is None or not dist.enabled:
        return slice(0, n)
    bounds = [n * r // dist.world_size for r in range(dist.world_size + 1)]
    return slice(bounds[dist.rank], bounds[dist.rank + 1])


def all_sum(t, dist):
    """``t`` summed over ranks, in place (itself on one process). The collective runs on the
    process's device (NCCL needs CUDA tensors); ``t`` stays where it is."""
    if dist is not None and dist.enabled:
        moved = t.to(dist.device)
        tdist.all_reduce(moved)
        if moved is not t:
            t.copy_(moved)
    return t


def all_gather(t, dist):
    """Every rank's ``t`` (same shape everywhere), in rank order, on ``t``'s device."""
    moved = t.contiguous().to(dist.device)
    parts = [torch.empty_like(moved) for _ in range(dist.world_size)]
    tdist.all_gather(parts, moved)
    return [p.to(t.device) for p in parts]
