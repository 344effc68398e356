"""Data parallelism for the pure step: process setup, gradient mean, SyncBN statistics, metrics.

One process per device, started by ``torchrun`` (or by hand with its environment variables).
Each process runs the same pure step on its shard of the global batch; the step calls two
functions from here:

    dist = distributed.init()                       # reads RANK, WORLD_SIZE, LOCAL_RANK, ...
    step = make_step(model, opt, ...,
                     grad_reduce=distributed.grad_mean(dist),    # None when world_size == 1
                     sync_stats=distributed.sync_stats(dist))    # only if SyncBN is asked for
    ...
    metrics = distributed.mean_metrics(dist, metrics)            # for logging
    counts = distributed.sum_over_ranks(dist, counts)            # eval counts of each shard
    data_time = distributed.max_over_ranks(dist, data_time)
    dist.shutdown()

Inside the step the collectives are the functional ones (``torch.distributed._functional_collectives``):
they return new tensors instead of mutating their input, so ``torch.compile`` traces them into the
step's graph and the step stays pure. ``grad_mean`` and ``sync_stats`` return ``None`` when there is
nothing to synchronise, which is what ``make_step`` expects for "off".
"""
import dataclasses
import datetime
import os
from typing import Callable, Optional

import torch
import torch.distributed as tdist
import torch.distributed._functional_collectives as funcol

from fpipe import tree


@dataclasses.dataclass
class Dist:
    """Where this process sits. ``group_name`` is the world group's name (None: single process)."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))
    backend: Optional[str] = None
    group_name: Optional[str] = None
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def shutdown(self):
        """Destroys the process group if :func:`init` created it; safe to call twice."""
        if self.owns_group and tdist.is_initialized():
            tdist.destroy_process_group()
        self.owns_group = False


def init(backend: Optional[str] = None, timeout_s: Optional[float] = None) -> Dist:
    """A :class:`Dist` from torchrun's environment; without it, one process (no process group).

    NCCL when CUDA is available, gloo otherwise (``backend`` overrides). On CUDA the device is set
    to ``cuda:LOCAL_RANK`` *before* the process group is created, and given to it as ``device_id``,
    so no collective ever runs on the wrong GPU (the hang detectron2 users meet).
    A process group that already exists (made by the caller) is used as it is and not destroyed.
    """
    env = os.environ
    world_size = int(env.get("WORLD_SIZE", "1"))
    rank, local_rank = int(env.get("RANK", "0")), int(env.get("LOCAL_RANK", "0"))
    local_world_size = int(env.get("LOCAL_WORLD_SIZE", str(world_size)))
    cuda = torch.cuda.is_available() and backend in (None, "nccl")
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if tdist.is_available() and tdist.is_initialized():
        return Dist(tdist.get_rank(), tdist.get_world_size(), local_rank,
                    min(local_world_size, tdist.get_world_size()), device, tdist.get_backend(),
                    tdist.group.WORLD.group_name, owns_group=False)
    if world_size <= 1:
        return Dist(device=device)
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in env]
    if missing:
        raise RuntimeError(f"WORLD_SIZE={world_size} but {missing} not set: start with torchrun, "
                           "or set RANK, LOCAL_RANK, MASTER_ADDR and MASTER_PORT")
    backend = backend or ("nccl" if cuda else "gloo")
    kwargs = {"device_id": device} if cuda else {}
    if timeout_s:
        kwargs["timeout"] = datetime.timedelta(seconds=timeout_s)
    tdist.init_process_group(backend, rank=rank, world_size=world_size, **kwargs)
    return Dist(rank, world_size, local_rank, local_world_size, device, backend,
                tdist.group.WORLD.group_name, owns_group=True)


def explain_timeout(error: BaseException, dist: Dist, timeout_s) -> Optional[RuntimeError]:
    """A one-line error naming this rank and the operation when ``error`` is a collective's timeout
    (gloo: "Timed out waiting … for recv"; NCCL: "Watchdog caught collective operation timeout");
    None for any other error."""
    text = str(error)
    if not dist.enabled or not any(w in text.lower() for w in ("timed out", "timeout")):
        return None
    op = next((line.strip() for line in text.splitlines() if "out" in line.lower()), text)[:200]
    return RuntimeError(f"rank {dist.rank} of {dist.world_size}: a collective did not complete within "
                        f"{timeout_s} s (collective_timeout_s): another process is stuck or gone ({op})")


# ---------------------------------------------------------------- inside the step
def _all_reduce_sum(x: torch.Tensor, group_name: str) -> torch.Tensor:
    """Functional sum all-reduce that returns a plain tensor (waits in eager; traced when compiled).

    Run without autograd: the op's own registered autograd (torch >= 2.6) is an autograd.Function
    without ``setup_context`` and fails under ``torch.func`` transforms, so differentiation goes
    through :class:`_SumAcrossRanks` instead.
    """
    with torch.no_grad():
        y = funcol.all_reduce(x, "sum", group_name)
    return y.wait() if isinstance(y, funcol.AsyncCollectiveTensor) else y


BUCKET_BYTES = 25 << 20  # DistributedDataParallel's default bucket_cap_mb


def grad_mean(dist: Dist, bucket_bytes: int = BUCKET_BYTES) -> Optional[Callable[[dict], dict]]:
    """``grads -> grads`` averaged over all ranks; ``None`` for a single process.

    Leaves are packed into flat buffers of about ``bucket_bytes`` (:func:`buckets`: the last
    layers' grads first, as the backward produces them, one dtype and device each), so a ResNet's
    ~160 gradient tensors cost a few all-reduces, not 160; compiled, each can start as soon as its
    grads exist (:func:`overlap_options`). Each grad is packed in the order its elements lie in
    memory and comes back with its own strides: a channels-last grad stays channels-last, and the
    optimizer's fused kernels take it without a copy (ResNet-18 64 px b32 on 2 gloo processes of
    1 thread: 61 -> 40 ms of the step). Each buffer is divided by the world size and summed (as
    DistributedDataParallel does: with a power-of-two world size the two orders agree bit for
    bit). The mean of per-rank mean losses is the global batch's mean when every rank has the same
    batch size, as the rank-sharded loader gives.
    """
    if not dist.enabled:
        return None
    group_name, world = dist.group_name, dist.world_size

    def reduce(grads: dict) -> dict:
        flat = tree.flatten(grads)
        packed = {n: _flat_with_restore(g) for n, g in flat.items()}  # name -> (flat values, restore)
        reduced = []  # issue every collective first, then wait on each
        for names in buckets(flat, bucket_bytes):
            buffer = torch.cat([packed[n][0] for n in names]) / world
            reduced.append((names, funcol.all_reduce(buffer, "sum", group_name)))
        out = {}
        for names, buffer in reduced:
            if isinstance(buffer, funcol.AsyncCollectiveTensor):  # eager: wait here, not in opt code
                buffer = buffer.wait()
            pieces = torch.split(buffer, [flat[n].numel() for n in names])
            out.update({n: packed[n][1](p) for n, p in zip(names, pieces)})
        return tree.unflatten({n: out[n] for n in flat})

    return reduce


def buckets(flat: dict, bucket_bytes: int = BUCKET_BYTES) -> list:
    """The names of ``flat``'s tensors in all-reduce buckets: in reverse order (a model's params are
    listed input first, so its backward produces their grads roughly last first), one device and
    dtype per bucket, a bucket closed once it holds ``bucket_bytes`` or more."""
    done, filling = [], {}  # (device, dtype) -> [names, bytes]
    for name in reversed(list(flat)):
        t = flat[name]
        bucket = filling.setdefault((t.device, t.dtype), [[], 0])
        if not bucket[0]:
            done.append(bucket[0])
        bucket[0].append(name)
        bucket[1] += t.numel() * t.element_size()
        if bucket[1] >= bucket_bytes:
            del filling[(t.device, t.dtype)]
    return done


def overlap_options(dist: Dist) -> Optional[dict]:
    """Inductor options for a compiled step that all-reduces grads: each bucket's collective moved
    as early as its grads allow and its wait as late as its first use, so it runs beside the
    backward of earlier layers (where the collective has its own engine: NCCL's stream; on 2 CPU
    cores, whose gloo threads share the cores with the step, it measured even). None for one process."""
    if not dist.enabled:
        return None
    return {"reorder_for_compute_comm_overlap": True,
            "reorder_for_compute_comm_overlap_passes": ["raise_comms", "sink_waits"]}


def _flat_with_restore(t: torch.Tensor):
    """``(flat, restore)``: ``t``'s elements as a 1-d tensor in the order they lie in memory (a view
    when ``t`` is dense in some dimension order: channels-last grads stay channels-last), and the
    function that gives a flat tensor of that order back ``t``'s shape and strides."""
    order = sorted(range(t.dim()), key=lambda d: -t.stride(d))
    permuted = t.permute(order)
    if not permuted.is_contiguous():
        return t.reshape(-1), lambda flat: flat.view(t.shape)
    inverse = sorted(range(t.dim()), key=order.__getitem__)
    return permuted.reshape(-1), lambda flat: flat.view(permuted.shape).permute(inverse)


class _SumAcrossRanks(torch.autograd.Function):
    """Differentiable sum all-reduce: the backward of a sum over ranks is a sum over ranks.

    Written in the ``setup_context`` style so that ``torch.func.grad_and_value`` can transform it.
    """

    @staticmethod
    def forward(x, group_name):
        return _all_reduce_sum(x.contiguous(), group_name)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.group_name = inputs[1]

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce_sum(grad.contiguous(), ctx.group_name), None


def stats_group(dist: Dist, group=None) -> Optional[str]:
    """The name of the process group that SyncBN reduces over, as VISSL's ``group_size`` option:

    ``None``/``"global"``/``0``: all ranks; ``"node"``: the ranks on this machine (LOCAL_WORLD_SIZE);
    an int N: consecutive groups of N ranks; a ``ProcessGroup`` or group name: that group.
    Making subgroups is collective: every rank must call this with the same argument.
    Returns ``None`` when the group would hold this rank alone.
    """
    if not dist.enabled:
        return None
    if isinstance(group, tdist.ProcessGroup):
        return group.group_name if group.size() > 1 else None
    if isinstance(group, str) and group not in ("global", "node"):
        return group
    size = {None: dist.world_size, 0: dist.world_size, "global": dist.world_size,
            "node": dist.local_world_size}.get(group, group)
    if not isinstance(size, int) or size < 1 or dist.world_size % size:
        raise ValueError(f"SyncBN group size {group!r} must divide the world size {dist.world_size}")
    if size == dist.world_size:
        return dist.group_name
    subgroup, _ = tdist.new_subgroups(group_size=size)
    return subgroup.group_name if size > 1 else None


def sync_stats(dist: Dist, group=None) -> Optional[Callable]:
    """SyncBN's reduction for ``layers.batch_norm``: ``(count, sum, sumsq) -> summed over the group``.

    The three per-channel tensors travel in one collective; gradients flow back through it (each
    rank receives the summed gradient of every rank's loss w.r.t. the shared statistics), which is
    exactly ``torch.nn.SyncBatchNorm``'s backward. ``group``: see :func:`stats_group`. ``None``
    when there is no other rank to synchronise with (plain BatchNorm is then the same thing).
    """
    group_name = stats_group(dist, group)
    if group_name is None:
        return None

    def reduce(count, total, total_sq):
        sizes = [count.numel(), total.numel(), total_sq.numel()]
        dtype = torch.promote_types(total.dtype, torch.float32)
        packed = torch.cat([count.reshape(-1).to(dtype), total.reshape(-1).to(dtype),
                            total_sq.reshape(-1).to(dtype)])
        c, s, q = torch.split(_SumAcrossRanks.apply(packed, group_name), sizes)
        return c.view_as(count).to(count.dtype), s.view_as(total), q.view_as(total_sq)

    return reduce


# ---------------------------------------------------------------- outside the step
def _sum_leaves(dist: Dist, values: dict) -> dict:
    """Sums every numeric leaf of a (nested) dict over ranks in one float64 all-reduce (CPU out)."""
    flat = tree.flatten(values)
    if not flat:
        return values
    stacked = torch.stack([torch.as_tensor(v).detach().to(dist.device, torch.float64).reshape(())
                           for v in flat.values()])
    tdist.all_reduce(stacked)
    stacked = stacked.cpu()
    return tree.unflatten({n: stacked[i] for i, n in enumerate(flat)})


def mean_metrics(dist: Dist, metrics: dict) -> dict:
    """Averages every numeric leaf of a (nested) metrics dict over ranks, in one all-reduce.

    Leaves come back as 0-d float32 CPU tensors; ``metrics`` itself on one process.
    """
    if not dist.enabled:
        return metrics
    return tree.map_leaves(lambda v: (v / dist.world_size).float(), _sum_leaves(dist, metrics))


def sum_over_ranks(dist: Dist, counts: dict) -> dict:
    """Sums a (nested) dict of counts over ranks (e.g. eval's per-shard top-k hits): integer
    counts come back as exact Python ints (below 2**53), float sums (a head's squared error) as
    floats; ``counts`` itself on one process."""
    if not dist.enabled:
        return counts
    is_int = {n: not torch.as_tensor(v).is_floating_point() for n, v in tree.flatten(counts).items()}
    summed = tree.flatten(_sum_leaves(dist, counts))
    return tree.unflatten({n: int(v.round()) if is_int[n] else float(v) for n, v in summed.items()})


def max_over_ranks(dist: Dist, value) -> float:
    """The largest ``value`` over ranks (e.g. data time: the slowest rank sets the pace)."""
    if not dist.enabled:
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64, device=dist.device)
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
    return float(t.item())
