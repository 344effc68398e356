"""Batches made in worker processes, in order; and batches copied to an accelerator ahead of use.

A batch is a pure function of its key ``(epoch, step)``, so which worker makes it changes
nothing: results come back in key order. PyTorch's ``DataLoader`` is the process pool here
(fork or spawn, shared-memory transport, pinned memory, clean shutdown); it sees one item per
batch and never collates. Errors in a worker come back as the original exception type and its
one-line message, not a worker traceback.

A worker's batch memory is shared memory that this process maps. Fresh shared memory costs the
kernel a page allocation and zeroing on first write and a release when both sides drop it (2
workers on 2 cores at 224 px: 11-14% fewer images/s than recycled memory). So a worker keeps the shared storages it sent
and writes new batches into one again once this process has dropped every reference to it: this
process watches each received storage (``StorageWeakRef``: PyTorch's own reference count) and
sends its identity back over a pipe; a worker reuses only storages named there (:class:`_Pool`).
A batch the caller keeps, or a view or numpy array of it, is never written over. Batches pinned
for CUDA arrive as copies and are not recycled.

Workers run at a lower CPU priority than this process (``niceness``, ``data.worker_niceness``):
where they share cores with a CPU step, a worker that takes a core from one of the step's threads
stalls all of them at the next barrier; at the lowest priority the workers fill the cores the
step leaves idle instead (2 workers on 2 cores, ResNet-18 b64 at 32 px: 786-855 vs 593 images/s,
64 px 337 vs 310; 224 px b32 the same; benchmarks/train_loop.py's run of main.py).
"""
import functools
import math
import multiprocessing
import os

import torch
import torch.multiprocessing
import torch.utils.data
from torch.multiprocessing import reductions
from torch.utils import _pytree as pytree

PREFETCH_BATCHES = 2  # per worker: batches being made ahead of the consumer
LENT_PER_WORKER = 8   # a worker's storages out in this process at once; more are made fresh
KEEP_FREE = 4         # returned storages a worker keeps for reuse
WATCHED = 64          # received storages this process watches at most (callers that keep all)


def in_worker() -> bool:
    return torch.utils.data.get_worker_info() is not None


def empty(shape: tuple, dtype: torch.dtype) -> torch.Tensor:
    """``torch.empty``; in a worker process, in shared memory (recycled: :class:`_Pool`), so that
    sending it is free."""
    if not in_worker():
        return torch.empty(shape, dtype=dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    storage = _pool.take(nbytes) if _pool is not None else torch.UntypedStorage._new_shared(nbytes)
    return torch.empty(0, dtype=dtype).set_(storage).view(shape)


def _identity(storage) -> tuple | None:
    """The shared-memory file under a storage, the same in every process that maps it (device and
    inode); ``None`` for storages not shared by file descriptor."""
    if not storage.is_shared() or torch.multiprocessing.get_sharing_strategy() != "file_descriptor":
        return None
    fd, _ = storage._share_fd_cpu_()  # an already shared storage: its own descriptor, no copy
    info = os.fstat(fd)
    return info.st_dev, info.st_ino


class _Pool:
    """A worker's shared storages: ``lent`` (sent, maybe still read by the main process) and
    ``free`` (the main process said it dropped them), each kept with its identity. Only ``free``
    ones are written again."""

    def __init__(self, worker: int, returned):
        self.worker, self.returned = worker, returned
        self.lent, self.free, self.made = {}, [], []

    def take(self, nbytes: int):
        self._collect_returned()
        reuse = next((entry for entry in self.free if entry[1].nbytes() == nbytes), None)
        if reuse is not None:
            self.free.remove(reuse)
            identity, storage = reuse
        else:
            storage = torch.UntypedStorage._new_shared(nbytes)
            identity = _identity(storage)
        if identity is not None and len(self.lent) < LENT_PER_WORKER:
            self.lent[identity] = storage
            self.made.append(identity)
        return storage

    def _collect_returned(self):
        while self.returned.poll():
            for identity in self.returned.recv():
                storage = self.lent.pop(identity, None)
                if storage is not None:
                    self.free.append((identity, storage))
        del self.free[:-KEEP_FREE]

    def lent_for(self) -> tuple:
        """``(worker, identities)`` lent since the last call: the batch just made holds them."""
        made, self.made = tuple(self.made), []
        return self.worker, made

    def take_back(self):
        """The storages of a batch that failed half-way: never sent, free again."""
        for identity in self.lent_for()[1]:
            self.free.append((identity, self.lent.pop(identity)))


_pool = None  # this worker process's _Pool, made on its first batch


class Buffers:
    """Batch tensors whose memory is reused once nothing references it any more.

    A fresh 64×3×224×224 float32 batch is 38 MB that the kernel must map and zero page by
    page on first write (0.1-0.2 ms per image on a typical host, ~1 ms in a VM that returns
    freed pages to its hypervisor). ``empty`` hands out a new tensor over the memory of an
    earlier batch when no tensor, view or numpy array of that batch is left (the storage's
    reference count, counted by PyTorch itself, is back to the pool's own), and a fresh one
    otherwise; at most ``keep`` storages are kept. Storages that became shared memory (sent to
    another process) are never reused. The caller process only; workers use :func:`empty`.
    """

    def __init__(self, keep: int = 4):
        self.keep, self.storages = keep, []

    def empty(self, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
        nbytes = math.prod(shape) * dtype.itemsize
        for storage in list(self.storages):
            if storage.is_shared():  # another process may read it: let it go
                self.storages.remove(storage)
            elif storage.nbytes() == nbytes and _uses(storage) == 1:
                return torch.empty(0, dtype=dtype).set_(storage).view(shape)
        storage = torch.UntypedStorage(nbytes)
        if _uses(storage) == 1 and len(self.storages) < self.keep:
            self.storages.append(storage)
        return torch.empty(0, dtype=dtype).set_(storage).view(shape)

    def __getstate__(self):  # a pickled loader (spawned workers) does not carry batches along
        return {"keep": self.keep, "storages": []}


def _uses(storage) -> int:
    """Tensors (and this object) holding ``storage``; 0 where PyTorch cannot tell (never reused)."""
    count = getattr(torch._C, "_storage_Use_Count", None)
    return count(storage._cdata) if count is not None else 0


class _Failure:
    """An exception raised in a worker, carried back as its type and message."""

    def __init__(self, error: Exception):
        self.type, self.message = type(error), str(error)

    def reraise(self):
        try:
            error = self.type(self.message)
        except Exception:  # an exception type whose constructor wants other arguments
            error = RuntimeError(f"{self.type.__name__}: {self.message}")
        raise error from None


class _Batches(torch.utils.data.Dataset):
    """``make(*key)`` in a worker, returned with the pooled storages it wrote: ``(batch, lent)``."""

    def __init__(self, make, returned: list):
        self.make, self.returned = make, returned

    def __getitem__(self, key):
        global _pool
        worker = torch.utils.data.get_worker_info().id
        if not self.returned:  # no pool: fresh shared memory for every batch
            _pool = None
        elif _pool is None or _pool.returned is not self.returned[worker]:
            _pool = _Pool(worker, self.returned[worker])
        try:
            batch = self.make(*key)
        except Exception as e:
            if _pool is not None:
                _pool.take_back()
            return _Failure(e)
        return batch, _pool.lent_for() if _pool is not None else (worker, ())


class _Returns:
    """This process's side of the pools: watches the storages workers lent and names each one
    back to its worker once nothing here references it."""

    def __init__(self, senders: list):
        self.senders, self.watched = senders, []

    def watch(self, batch, lent: tuple):
        worker, identities = lent
        if not identities:  # nothing pooled in it (no pool, or the worker's lent ones all out)
            return
        for tensor in (t for t in pytree.tree_leaves(batch) if isinstance(t, torch.Tensor)):
            storage = tensor.untyped_storage()
            identity = _identity(storage)
            if identity in identities:
                self.watched.append((worker, identity, reductions.StorageWeakRef(storage)))
        del self.watched[:-WATCHED]  # beyond that, a worker makes fresh storages

    def send_dropped(self):
        dropped, kept = {}, []
        for worker, identity, ref in self.watched:
            if ref.expired():
                dropped.setdefault(worker, []).append(identity)
            else:
                kept.append((worker, identity, ref))
        self.watched = kept
        for worker, identities in dropped.items():
            try:
                self.senders[worker].send(identities)
            except OSError:  # the worker has exited
                pass


def _as_is(item):
    return item


def _lower_priority(niceness: int, worker_id: int):
    """A worker's start: ``niceness`` below its parent in CPU priority (where the OS has nice levels)."""
    if niceness and hasattr(os, "nice"):
        os.nice(niceness)


def batches(make, keys, num_workers: int, pin_memory: bool = False, niceness: int = 0):
    """``make(*key)`` for each key, computed by ``num_workers`` processes ``niceness`` below this
    one in CPU priority (``os.nice``), yielded in order. Pinned batches reach this process as
    copies: their workers make fresh memory (no pool)."""
    pipes = [multiprocessing.Pipe(duplex=False) for _ in range(0 if pin_memory else num_workers)]
    returns = _Returns([sender for _, sender in pipes])
    loader = torch.utils.data.DataLoader(
        _Batches(make, [receiver for receiver, _ in pipes]), batch_size=None, sampler=keys,
        num_workers=num_workers, collate_fn=_as_is, pin_memory=pin_memory,
        prefetch_factor=PREFETCH_BATCHES, worker_init_fn=functools.partial(_lower_priority, niceness))
    items = iter(loader)
    try:
        while True:
            returns.send_dropped()  # before asking: the worker making the next batch may reuse them
            item = next(items, None)
            if item is None:
                return
            if isinstance(item, _Failure):
                item.reraise()
            batch, lent = item
            del item
            returns.watch(batch, lent)
            yield batch
    finally:
        for connection in (c for pipe in pipes for c in pipe):
            connection.close()


def to_device_ahead(batches, device: torch.device, finish):
    """Batches on ``device``, each copied (and ``finish``ed) on a side stream while the
    previous one is in use. CUDA only; copies from pinned memory do not block the host."""
    stream = torch.cuda.Stream(device)

    def send(batch):
        with torch.cuda.stream(stream):
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            batch["image"] = finish(batch["image"])
        return batch, stream.record_event()

    ahead = None
    for batch in batches:
        sent = send(batch)
        if ahead is not None:
            yield _ready(*ahead, device)
        ahead = sent
    if ahead is not None:
        yield _ready(*ahead, device)


def _ready(batch: dict, event, device) -> dict:
    current = torch.cuda.current_stream(device)
    current.wait_event(event)
    for tensor in batch.values():
        tensor.record_stream(current)  # the allocator must not reuse it while the step runs
    return batch
