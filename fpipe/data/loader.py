"""Batches for one process of a (possibly) multi-process run: the global batch, sharded.

Every rank computes the same global order and takes its own contiguous slice of each global
batch, so rank shards concatenated in rank order are exactly the 1-process batch. No
``torch.distributed`` here: callers pass ``rank`` and ``world_size``.

- Training: a permutation per epoch from ``(seed, epoch)``; ``batch_size`` is global and must
  divide by ``world_size``; the last partial batch is dropped, so all ranks take equal steps.
- Evaluation: the split in order, each sample exactly once. The last global batch is padded
  (repeating samples from the start) and ``batch["mask"]`` is False on padding, so every rank
  has the same number of equal-sized batches and ``sum(correct * mask)`` is exact.
- Augmentation draws from a generator seeded by ``(seed, epoch, sample index)``: independent of
  ``num_workers``, ``world_size`` and where a run was resumed.

Batches: ``{"image": float32 N×C×H×W, "label": int64 N, "index": int64 N}`` (sample indices into
the split), plus ``"mask": bool N`` in evaluation.
"""
import collections
import concurrent.futures
import math

import torch

from fpipe.data import config as config_lib
from fpipe.data import rng
from fpipe.data import transforms

PREFETCH_BATCHES = 2  # with num_workers > 0: batches being decoded ahead of the consumer


class Loader:
    """Batches of one split for one rank. ``epoch(e, start_step)`` iterates an epoch."""

    def __init__(self, split, data_cfg, *, train: bool, rank: int = 0, world_size: int = 1,
                 seed: int | None = None):
        get = lambda key: config_lib.get(data_cfg, key)
        if not 0 <= rank < world_size:
            raise ValueError(f"want 0 <= rank < world_size, got rank={rank}, "
                             f"world_size={world_size}")
        self.split, self.train, self.rank, self.world_size = split, train, rank, world_size
        self.seed = int(get("seed") if seed is None else seed)
        self.num_workers = int(get("num_workers"))
        self.num_samples = len(split)
        spec = get("train_transforms" if train else "eval_transforms")
        self.transform = transforms.parse(spec, size=int(get("image_size")))
        if self.num_samples == 0:
            raise ValueError("the split is empty")
        if train:
            global_batch = int(get("batch_size"))
            if global_batch < 1 or global_batch % world_size:
                raise ValueError(f"data.batch_size={global_batch} (global) must be a positive "
                                 f"multiple of world_size={world_size}")
            self.local_batch_size = global_batch // world_size
            self.steps_per_epoch = self.num_samples // global_batch
            if self.steps_per_epoch == 0:
                raise ValueError(f"the split has {self.num_samples} samples, fewer than one "
                                 f"global batch (data.batch_size={global_batch})")
        else:
            eval_batch = int(get("eval_batch_size"))
            if eval_batch < 1:
                raise ValueError(f"data.eval_batch_size must be positive, got {eval_batch}")
            self.local_batch_size = math.ceil(eval_batch / world_size)
            self.steps_per_epoch = math.ceil(self.num_samples / (self.local_batch_size *
                                                                 world_size))
        self.global_batch_size = self.local_batch_size * world_size

    def __len__(self) -> int:
        return self.steps_per_epoch

    def order(self, epoch: int) -> torch.Tensor:
        """The epoch's global sample order: all ranks, all steps (training: a permutation)."""
        if not self.train:
            return torch.arange(self.num_samples)
        return torch.randperm(self.num_samples, generator=rng.generator("order", self.seed, epoch))

    def _shard(self, order: torch.Tensor, step: int) -> tuple:
        """``(indices, mask)`` of this rank's part of global batch ``step``."""
        start = step * self.global_batch_size + self.rank * self.local_batch_size
        positions = torch.arange(start, start + self.local_batch_size)
        mask = positions < self.num_samples
        return order[positions % self.num_samples], mask

    def _load(self, index: int, epoch: int) -> tuple:
        image, label = self.split[index]
        generator = rng.generator("augment", self.seed, epoch, index)
        return self.transform(image, generator), label

    def _collate(self, samples: list, indices: torch.Tensor, mask: torch.Tensor) -> dict:
        images = [image for image, _ in samples]
        shapes = {tuple(image.shape) for image in images}
        if len(shapes) > 1:
            raise ValueError(f"images in one batch have different shapes {sorted(shapes)}; give "
                             f"the transforms a fixed output size, e.g. 'resize|center_crop' "
                             f"(transforms: {self.transform.spec!r})")
        batch = {"image": transforms.to_float(torch.stack(images)),
                 "label": torch.tensor([label for _, label in samples], dtype=torch.int64),
                 "index": indices.clone()}
        if not self.train:
            batch["mask"] = mask
        return batch

    def epoch(self, epoch: int = 0, start_step: int = 0):
        """Iterator over this rank's batches of ``epoch``, from ``start_step`` (for resuming)."""
        if not 0 <= start_step <= self.steps_per_epoch:
            raise ValueError(f"start_step={start_step} is outside 0..{self.steps_per_epoch}")
        return self._iterate(int(epoch), int(start_step))

    def _iterate(self, epoch: int, start_step: int):
        order = self.order(epoch)
        shards = (self._shard(order, s) for s in range(start_step, self.steps_per_epoch))
        if self.num_workers <= 0:
            for indices, mask in shards:
                samples = [self._load(int(i), epoch) for i in indices]
                yield self._collate(samples, indices, mask)
            return
        with concurrent.futures.ThreadPoolExecutor(self.num_workers, "fpipe-data") as pool:
            pending = collections.deque()

            def submit(shard):
                indices, mask = shard
                futures = [pool.submit(self._load, int(i), epoch) for i in indices]
                pending.append((futures, indices, mask))
            for shard in shards:
                submit(shard)
                if len(pending) >= PREFETCH_BATCHES:
                    break
            while pending:
                futures, indices, mask = pending.popleft()
                shard = next(shards, None)
                if shard is not None:
                    submit(shard)
                yield self._collate([f.result() for f in futures], indices, mask)

    def iterate(self, start_step: int = 0):
        """Training batches without end, epoch after epoch, from global step ``start_step``."""
        if not self.train:
            raise ValueError("iterate() is for training; evaluate with epoch()")
        epoch, step = divmod(int(start_step), self.steps_per_epoch)
        while True:
            yield from self.epoch(epoch, step)
            epoch, step = epoch + 1, 0
