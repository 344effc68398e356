"""Batches made in worker processes, in order; and batches copied to an accelerator ahead of use.

A batch is a pure function of its key ``(epoch, step)``, so which worker makes it changes
nothing: results come back in key order. PyTorch's ``DataLoader`` is the process pool here
(fork or spawn, shared-memory transport, pinned memory, clean shutdown); it sees one item per
batch and never collates. Errors in a worker come back as the original exception type and its
one-line message, not a worker traceback.
"""
import math

import torch
import torch.utils.data

PREFETCH_BATCHES = 2  # per worker: batches being made ahead of the consumer


def in_worker() -> bool:
    return torch.utils.data.get_worker_info() is not None


def empty(shape: tuple, dtype: torch.dtype) -> torch.Tensor:
    """``torch.empty``; in a worker process, in shared memory, so that sending it is free."""
    if not in_worker():
        return torch.empty(shape, dtype=dtype)
    storage = torch.UntypedStorage._new_shared(math.prod(shape) * dtype.itemsize)
    return torch.empty(0, dtype=dtype).set_(storage).view(shape)


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
    def __init__(self, make):
        self.make = make

    def __getitem__(self, key):
        try:
            return self.make(*key)
        except Exception as e:
            return _Failure(e)


def _as_is(item):
    return item


def batches(make, keys, num_workers: int, pin_memory: bool = False):
    """``make(*key)`` for each key, computed by ``num_workers`` processes, yielded in order."""
    loader = torch.utils.data.DataLoader(
        _Batches(make), batch_size=None, sampler=keys, num_workers=num_workers,
        collate_fn=_as_is, pin_memory=pin_memory, prefetch_factor=PREFETCH_BATCHES)
    for item in loader:
        if isinstance(item, _Failure):
            item.reraise()
        yield item


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
