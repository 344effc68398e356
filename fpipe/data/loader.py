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
  ``num_workers``, ``world_size`` and where a run was resumed. A batch is a pure function of
  ``(epoch, step)``.

How a batch is made: per sample, the pipeline's geometry is planned from the image size; a split
that reads files (``split.read``) decodes at reduced size when the plan allows
(``fpipe.data.decode``); then the per-batch pixelwise ops (``normalize``) run once on the
stacked batch, in place, into memory reused from batches nothing references any more
(``workers.Buffers``). ``num_workers > 0`` makes whole batches in that many worker processes
(``fpipe.data.workers``), into shared memory, pinned when CUDA is present; they travel as uint8
and are normalised in this process (or, with ``device="cuda"``, on the device, copied one batch
ahead on a side stream). Multi-crop batches are finished in the workers.

Batches: ``{"image": float32 N×C×H×W, "label": int64 N, "index": int64 N}`` (sample indices into
the split), plus ``"mask": bool N`` in evaluation and the split's extra targets by name. With ``data.views`` (``data.eval_views`` in
evaluation; multi-crop) ``"image"`` is a tuple of crops, one N×C×h×w tensor per crop in the order the views list them;
crop ``v`` of a sample draws from ``(seed, epoch, index, v)``.
"""
import itertools
import math

import torch

from fpipe.data import base
from fpipe.data import config as config_lib
from fpipe.data import pipeline
from fpipe.data import rng
from fpipe.data import workers


class Loader:
    """Batches of one split for one rank. ``epoch(e, start_step)`` iterates an epoch."""

    def __init__(self, split, data_cfg, *, train: bool, rank: int = 0, world_size: int = 1,
                 seed: int | None = None, device=None):
        get = lambda key: config_lib.get(data_cfg, key)
        if not 0 <= rank < world_size:
            raise ValueError(f"want 0 <= rank < world_size, got rank={rank}, "
                             f"world_size={world_size}")
        self.split, self.train, self.rank, self.world_size = split, train, rank, world_size
        self.seed = int(get("seed") if seed is None else seed)
        self.num_workers = int(get("num_workers"))
        self.worker_niceness = int(get("worker_niceness"))
        self.num_samples = len(split)
        spec = get("train_transforms" if train else "eval_transforms")
        self.transform = pipeline.parse(spec, size=int(get("image_size")))
        self.views = views(get("views" if train else "eval_views"), int(get("image_size")))
        self.device = None if device is None else torch.device(device)
        self._order_cache = (None, None)
        self._buffers = workers.Buffers()  # this process's float batches, reused when dropped
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
        if self._order_cache[0] != epoch:  # a worker makes many batches of one epoch
            order = torch.randperm(self.num_samples, generator=rng.generator("order", self.seed,
                                                                             epoch))
            self._order_cache = (epoch, order)
        return self._order_cache[1]

    def _shard(self, order: torch.Tensor, step: int) -> tuple:
        """``(indices, mask)`` of this rank's part of global batch ``step``."""
        start = step * self.global_batch_size + self.rank * self.local_batch_size
        positions = torch.arange(start, start + self.local_batch_size)
        mask = positions < self.num_samples
        return order[positions % self.num_samples], mask

    def _sample(self, index: int, epoch: int, transform=None, *view) -> tuple:
        """Sample ``index`` through the per-sample part of the pipeline: ``(image, label)``."""
        transform = transform or self.transform
        generator = rng.generator("augment", self.seed, epoch, index, *view)
        plan = lambda height, width: transform.plan(height, width, generator)
        if hasattr(self.split, "read"):  # files: decoded knowing the plan (reduced size)
            image, label = self.split.read(index, plan)
        else:
            image, label = self.split[index]
            image = plan(*image.shape[-2:]).apply(image)
        return transform.middle(image, generator), label

    def batch(self, epoch: int, step: int, finish: bool = True) -> dict:
        """This rank's batch of global step ``step`` of ``epoch`` (``finish=False``: the images
        before the pixelwise ops, uint8 when every image is)."""
        indices, mask = self._shard(self.order(epoch), step)
        if self.views:  # multi-crop: one stacked tensor per crop
            crops = [[self._sample(int(i), epoch, t, v) for v, t in enumerate(self.views)] for i in indices]
            samples = [c[0] for c in crops]
            image = tuple(self._stack([c[v][0] for c in crops], finish, t) for v, t in enumerate(self.views))
        else:
            samples = [self._sample(int(i), epoch) for i in indices]
            image = self._stack([image for image, _ in samples], finish)
        batch = {"image": image, "label": torch.tensor([label for _, label in samples], dtype=torch.int64),
                 "index": indices.clone()}
        for name, values in base.targets_of(self.split).items():  # multi-task heads' own targets
            batch[name] = values[indices]
        if not self.train:
            batch["mask"] = mask
        return batch

    def _stack(self, images: list, finish: bool, transform=None) -> torch.Tensor:
        transform = transform or self.transform
        shapes = {tuple(image.shape) for image in images}
        if len(shapes) > 1:
            raise ValueError(f"images in one batch have different shapes {sorted(shapes)}; give "
                             f"the transforms a fixed output size, e.g. 'resize|center_crop' "
                             f"(transforms: {transform.spec!r})")
        as_uint8 = not finish and all(image.dtype == torch.uint8 for image in images)
        empty = workers.empty if workers.in_worker() else self._buffers.empty
        out = empty((len(images), *images[0].shape), torch.uint8 if as_uint8 else torch.float32)
        for row, image in zip(out, images):  # row by row: each pass stays in cache
            row.copy_(image)
            if not as_uint8 and image.dtype == torch.uint8:
                row.div_(255.0)  # exactly transforms.to_float
            if finish:
                transform.finish(row)
        return out

    def _finish(self, batch: dict) -> dict:
        """A worker's unfinished batch (``batch(finish=False)``) finished in this process, image
        by image into reused memory: the same float operations as in ``_stack``."""
        image = batch["image"]
        if image.dtype == torch.uint8:
            out = self._buffers.empty(tuple(image.shape), torch.float32)
            for row, source in zip(out, image):
                row.copy_(source)
                row.div_(255.0)  # exactly transforms.to_float
                self.transform.finish(row)
        else:  # some images were float: already in [0, 1], in shared memory
            out = image
            for row in out:
                self.transform.finish(row)
        batch["image"] = out
        return batch

    def epoch(self, epoch: int = 0, start_step: int = 0):
        """Iterator over this rank's batches of ``epoch``, from ``start_step`` (for resuming)."""
        if not 0 <= start_step <= self.steps_per_epoch:
            raise ValueError(f"start_step={start_step} is outside 0..{self.steps_per_epoch}")
        epoch = int(epoch)
        return self._batches((epoch, step) for step in range(start_step, self.steps_per_epoch))

    def _batches(self, keys):
        """Batches for ``(epoch, step)`` keys: in this process or in workers; on the device."""
        on_device = self.device is not None and self.device.type == "cuda"
        if on_device and self.views:
            raise ValueError("data.views (multi-crop) batches are made on the host; load them without "
                             "device='cuda' and move them in the train loop")
        if self.num_workers <= 0:
            made = (self.batch(*key, finish=not on_device) for key in keys)
            if on_device:
                made = (_pinned(b) for b in made)
        else:
            # Workers send the images before the pixelwise ops (uint8: a quarter of the shared
            # memory to map and fill); they are finished here, or on the device.
            on_host = not on_device and not self.views
            make = self.batch if not (on_device or on_host) else _Raw(self)
            made = workers.batches(make, keys, self.num_workers, pin_memory=torch.cuda.is_available(),
                                   niceness=self.worker_niceness)
            if on_host:
                made = (self._finish(batch) for batch in made)
        if on_device:
            return workers.to_device_ahead(made, self.device, self.transform.finish)
        return made

    def iterate(self, start_step: int = 0):
        """Training batches without end, epoch after epoch, from global step ``start_step``."""
        if not self.train:
            raise ValueError("iterate() is for training; evaluate with epoch()")
        steps = itertools.count(int(start_step))
        return self._batches(divmod(step, self.steps_per_epoch) for step in steps)


def views(views, size: int) -> tuple:
    """``data.views`` ``((count, transforms), ...)`` as one pipeline per crop, in order."""
    out = []
    for view in tuple(views or ()):
        if not (isinstance(view, (tuple, list)) and len(view) == 2 and isinstance(view[0], int) and view[0] >= 1):
            raise ValueError(f"data.views: each entry is (count >= 1, transforms), got {view!r}")
        out += [pipeline.parse(view[1], size=size)] * view[0]
    return tuple(out)


class _Raw:
    """``loader.batch(epoch, step, finish=False)`` as a picklable callable for workers."""

    def __init__(self, loader: Loader):
        self.loader = loader

    def __call__(self, epoch: int, step: int) -> dict:
        return self.loader.batch(epoch, step, finish=False)


def _pinned(batch: dict) -> dict:
    return {k: v.pin_memory() for k, v in batch.items()}
