"""Which rows of a cached split this process works on under torchrun (all of them alone)."""
import torch.distributed as tdist


def rows(n, dist):
    """This rank's contiguous slice of ``n`` rows; the slices of all ranks cover ``0..n`` in order."""
    if dist is None or not dist.enabled:
        return slice(0, n)
    bounds = [n * r // dist.world_size for r in range(dist.world_size + 1)]
    return slice(bounds[dist.rank], bounds[dist.rank + 1])


def all_sum(t, dist):
    """``t`` summed over ranks, in place (itself on one process)."""
    if dist is not None and dist.enabled:
        tdist.all_reduce(t)
    return t
