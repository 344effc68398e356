"""Tests for fpipe.data.workers: batches made in worker processes come back in order, and their
shared memory is written again only once nothing in this process references it."""
import os

import numpy as np
import pytest
import torch

from fpipe.data import workers


class Filled:
    """Batch ``step``: 4096 bytes of shared memory filled with ``step % 256``."""

    def __call__(self, epoch: int, step: int) -> dict:
        image = workers.empty((4096,), torch.uint8)
        image.fill_(step % 256)
        return {"image": image, "step": torch.tensor(step)}


def test_worker_memory_is_recycled_once_dropped_and_never_while_held():
    kept, views, identities = {}, {}, []
    for batch in workers.batches(Filled(), [(0, s) for s in range(40)], num_workers=2):
        step = int(batch["step"])
        assert (batch["image"] == step).all() and batch["image"].untyped_storage().is_shared()
        identities.append(workers._identity(batch["image"].untyped_storage()))
        if step in (1, 2):
            kept[step] = batch                     # the whole batch, held to the end
        elif step == 5:
            views[step] = batch["image"][100:200]  # a view of it
        elif step == 6:
            views[step] = batch["image"].numpy()   # a numpy array over it
        del batch
    for step, batch in kept.items():
        assert (batch["image"] == step).all(), f"batch {step} was written over while held"
    for step, view in views.items():
        assert (np.asarray(view) == step).all(), f"a view of batch {step} was written over"
    # Dropped batches' memory came back: far fewer distinct storages than batches.
    assert None not in identities and len(set(identities)) < 20
    held = {identities[s] for s in (*kept, *views)}
    assert all(identities[s] not in held for s in range(7, 40)), "a held storage was reused"


def test_workers_return_batches_in_order_whatever_the_pool():
    steps = [int(b["step"]) for b in workers.batches(Filled(), [(0, s) for s in range(12)], 3)]
    assert steps == list(range(12))


def test_pinned_batches_leave_the_workers_memory_fresh():
    """Batches pinned for CUDA arrive as copies this process cannot watch, so their workers keep
    no pool (else each would hold its lent storages for ever). Without CUDA the DataLoader skips
    the pinning itself, so the storages seen here are the workers' own."""
    identities = []
    for batch in workers.batches(Filled(), [(0, s) for s in range(12)], 2, pin_memory=True):
        assert (batch["image"] == int(batch["step"])).all()
        if not torch.cuda.is_available():
            identities.append(workers._identity(batch["image"].untyped_storage()))
        del batch
    assert len(set(identities)) == len(identities)  # every batch in fresh memory


def test_a_pool_reuses_only_what_came_back_or_was_never_sent():
    """A worker's pool, driven by hand: a storage is written again only after this process named
    it back, or when the batch holding it failed before it was sent (``take_back``)."""
    import multiprocessing
    receiver, sender = multiprocessing.Pipe(duplex=False)
    pool = workers._Pool(0, receiver)
    first = pool.take(1024)
    _, lent = pool.lent_for()
    assert lent == (workers._identity(first),)
    assert pool.take(1024) is not first, "a lent storage was handed out again"
    pool.lent_for()
    sender.send(list(lent))  # this process dropped the first batch
    assert pool.take(1024) is first
    assert pool.lent_for()[1] == lent  # lent again, under its own identity
    failed = pool.take(2048)
    pool.take_back()  # that batch failed half-way: never sent
    assert pool.take(2048) is failed and pool.take(2048) is not failed
    receiver.close(), sender.close()


class Niceness:
    """Batch ``step``: the niceness of the process that made it."""

    def __call__(self, epoch: int, step: int) -> dict:
        return {"niceness": torch.tensor(os.nice(0))}


@pytest.mark.parametrize("niceness", [0, 7])
def test_workers_run_the_given_niceness_below_the_caller(niceness):
    made = [int(b["niceness"]) for b in workers.batches(Niceness(), [(0, s) for s in range(4)], num_workers=2,
                                                        niceness=niceness)]
    assert made == [min(os.nice(0) + niceness, 19)] * 4
