"""Detection samples -> padded batches, and the rank-sharding loader that makes them.

A sample (``fpipe.detection.scenes``, ``fpipe.detection.coco``) is in its image's own pixels;
a batch is what ``fpipe.detection.model``'s ``losses`` and ``predict`` take::

    {"image": float32 N×3×H×W   normalised ((x/255 - mean) / std), resized, zero-padded,
     "image_size": int64 N×2    (h, w) after resizing, before padding,
     "orig_size": int64 N×2     (h, w) of the file, for mapping predictions back,
     "boxes": float32 N×M×4     xyxy in the resized image, zero on padding rows,
     "labels": int64 N×M        1..C, 0 on padding rows,
     "valid": bool N×M          real objects,
     "masks": uint8 N×M×H×W     instance masks on the padded canvas (N×M×0×0 when not asked for),
     "keypoints": float32 N×M×P×3   (x, y, visibility 0/1/2) in the resized image,
     "index": int64 N           sample indices into the split,
     "mask": bool N}            (evaluation) False on the padding samples of the last batch

The transform is torchvision's GeneralizedRCNNTransform by ``fpipe.detection.transform``'s
functions, on each sample as it is made: normalise, resize so that the short side is
``min_size`` unless the long side would pass ``max_size`` (bilinear, no antialias; masks
nearest; boxes and keypoints scaled per axis by the size ratio), then pad to a multiple of ``size_divisible`` (32) — to the fixed canvas ``max_size`` rounded up
(``fixed_canvas``, default: every batch has one shape, which a compiled step wants) or to the
batch's largest image (torchvision's way). Each image is in the canvas's top-left corner, so a
prediction maps back by dividing by the per-axis ratio ``image_size / orig_size``.

Training can mirror samples (``hflip_prob``, torchvision's RandomHorizontalFlip) before the
transform, keypoints reordered left <-> right. Up to ``max_objects`` (M) objects per image travel; more are cut (the first M kept; a warning
once). Crowd regions (``iscrowd``) never become training targets: evaluation ignores them
(``fpipe.detection.coco_eval``), as COCO's.
"""
import contextlib
import itertools
import math
import re

import torch
from absl import logging

from fpipe.data import rng
from fpipe.detection import transform as rcnn_transform



def canvas_size(sizes, max_size: int, size_divisible: int = 32, fixed_canvas: bool = True) -> tuple:
    """The padded ``(H, W)`` of a batch of resized ``sizes``."""
    up = lambda v: int(math.ceil(v / size_divisible) * size_divisible)
    if fixed_canvas:
        return up(max_size), up(max_size)
    return up(max(h for h, _ in sizes)), up(max(w for _, w in sizes))


def transform(sample: dict, min_size: int, max_size: int, with_masks: bool = True) -> dict:
    """One sample normalised and resized (not padded) by ``fpipe.detection.transform``'s
    functions (the model's own GeneralizedRCNNTransform); objects with ``iscrowd`` dropped."""
    image = sample["image"]
    image = image.float() / 255.0 if image.dtype == torch.uint8 else image.float()
    image = rcnn_transform.resize_image(rcnn_transform.normalize(image), min_size, max_size)
    size, new_size = tuple(sample["image"].shape[-2:]), tuple(image.shape[-2:])
    keep = ~sample["iscrowd"].bool()
    masks = None
    if with_masks:
        masks = sample["masks"][keep]
        masks = (rcnn_transform.resize_masks(masks, min_size, max_size) if len(masks)
                 else torch.zeros(0, *new_size, dtype=torch.uint8))
    return {"image": image, "boxes": rcnn_transform.resize_boxes(sample["boxes"][keep], size, new_size),
            "labels": sample["labels"][keep], "masks": masks,
            "keypoints": rcnn_transform.resize_keypoints(sample["keypoints"][keep], size, new_size),
            "image_size": new_size, "orig_size": size}


def keypoint_flip_map(names) -> tuple:
    """Where each keypoint goes when the image is mirrored: ``left*`` and ``right*`` names swap
    (COCO's ``left_eye`` <-> ``right_eye``, the scenes' ``left`` <-> ``right``), others stay."""
    names = list(names)
    swap = lambda n: re.sub("left|right", lambda m: "right" if m.group() == "left" else "left", n)  # noqa: E731
    return tuple(names.index(swap(n)) if swap(n) in names else i for i, n in enumerate(names))


def hflip(sample: dict, keypoint_flip=None) -> dict:
    """A sample mirrored left to right in its own pixels (torchvision's detection
    RandomHorizontalFlip): the image and masks flipped, boxes ``x1, x2 -> W - x2, W - x1``,
    keypoints ``x -> W - x`` and reordered by ``keypoint_flip`` (left and right swap places),
    invisible keypoints kept at zero."""
    width = sample["image"].shape[-1]
    out = dict(sample, image=sample["image"].flip(-1))
    boxes = sample["boxes"]
    out["boxes"] = torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], 1)
    if sample.get("masks") is not None:
        out["masks"] = sample["masks"].flip(-1)
    kp = sample.get("keypoints")
    if kp is not None and kp.numel():
        kp = kp[:, list(keypoint_flip)] if keypoint_flip is not None else kp.clone()
        kp[..., 0] = torch.where(kp[..., 2] > 0, width - kp[..., 0], 0.0)
        out["keypoints"] = kp
    return out


_WARNED = set()


def collate(samples, indices, *, min_size: int, max_size: int, max_objects: int, num_keypoints: int,
            size_divisible: int = 32, fixed_canvas: bool = True, with_masks: bool = True) -> dict:
    """A padded batch (the module docstring) from per-sample dicts."""
    done = [transform(s, min_size, max_size, with_masks) for s in samples]
    n, m = len(done), max_objects
    H, W = canvas_size([d["image_size"] for d in done], max_size, size_divisible, fixed_canvas)
    image = torch.zeros(n, 3, H, W)
    boxes, labels = torch.zeros(n, m, 4), torch.zeros(n, m, dtype=torch.int64)
    keypoints = torch.zeros(n, m, num_keypoints, 3)
    masks = torch.zeros(n, m, H, W, dtype=torch.uint8) if with_masks else torch.zeros(n, m, 0, 0, dtype=torch.uint8)
    valid = torch.zeros(n, m, dtype=torch.bool)
    for i, d in enumerate(done):
        h, w = d["image_size"]
        image[i, :, :h, :w] = d["image"]
        k = len(d["labels"])
        if k > m and "cut" not in _WARNED:
            _WARNED.add("cut")
            logging.warning("An image has %d objects; only the first data.max_objects=%d are trained on "
                            "(said once).", k, m)
        k = min(k, m)
        boxes[i, :k], labels[i, :k], valid[i, :k] = d["boxes"][:k], d["labels"][:k], True
        if num_keypoints and d["keypoints"].shape[1] == num_keypoints:
            keypoints[i, :k] = d["keypoints"][:k]
        if with_masks:
            masks[i, :k, :h, :w] = d["masks"][:k]
    return {"image": image, "image_size": torch.tensor([d["image_size"] for d in done], dtype=torch.int64),
            "orig_size": torch.tensor([d["orig_size"] for d in done], dtype=torch.int64),
            "boxes": boxes, "labels": labels, "valid": valid, "masks": masks, "keypoints": keypoints,
            "index": torch.as_tensor(list(indices), dtype=torch.int64)}


@contextlib.contextmanager
def one_thread():
    """Samples are made of many small tensor ops, which intra-op threads only slow down (10× on a
    busy 2-core machine); the model's steps keep their threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class Loader:
    """Batches of one split for one rank, by fpipe.data.Loader's rules: ``batch_size`` is
    global and split evenly over ranks (each takes a contiguous slice of every global batch);
    training reads a permutation per epoch from ``(seed, epoch)`` and drops the last partial
    batch; evaluation reads the split in order, pads the last global batch by repeating from
    the start and marks padding in ``batch["mask"]``. A batch is a pure function of
    ``(epoch, step)``, so any resume point and world size give the same global batches."""

    def __init__(self, split, batch_size: int, *, train: bool, seed: int = 0, rank: int = 0, world_size: int = 1,
                 hflip_prob: float = 0.0, keypoint_flip=None, **collate_options):
        if batch_size < 1 or batch_size % world_size:
            raise ValueError(f"batch size {batch_size} (global) must be a positive multiple of world_size={world_size}")
        self.split, self.train, self.seed, self.rank = split, train, int(seed), rank
        self.local_batch_size, self.global_batch_size = batch_size // world_size, batch_size
        self.num_samples = len(split)
        self.options = collate_options
        self.hflip_prob, self.keypoint_flip = (float(hflip_prob) if train else 0.0), keypoint_flip
        if train:
            self.steps_per_epoch = self.num_samples // batch_size
            if not self.steps_per_epoch:
                raise ValueError(f"the split has {self.num_samples} samples, fewer than one global batch ({batch_size})")
        else:
            self.steps_per_epoch = math.ceil(self.num_samples / batch_size)

    def __len__(self):
        return self.steps_per_epoch

    def order(self, epoch: int) -> torch.Tensor:
        if not self.train:
            return torch.arange(self.num_samples)
        return torch.randperm(self.num_samples, generator=rng.generator("order", self.seed, epoch))

    def batch(self, epoch: int, step: int, order=None) -> dict:
        order = self.order(epoch) if order is None else order
        start = step * self.global_batch_size + self.rank * self.local_batch_size
        positions = torch.arange(start, start + self.local_batch_size)
        indices = order[positions % self.num_samples]
        with one_thread():
            samples = [self.flipped(self.split[int(i)], epoch, int(i)) for i in indices]
            batch = collate(samples, indices.tolist(), **self.options)
        if not self.train:
            batch["mask"] = positions < self.num_samples
        return batch

    def flipped(self, sample, epoch: int, index: int):
        """The sample, mirrored with probability ``hflip_prob`` by a draw that depends on
        (seed, epoch, index) only: resumable, and the same on any number of ranks."""
        if self.hflip_prob <= 0:
            return sample
        if float(torch.rand((), generator=rng.generator("hflip", self.seed, epoch, index))) >= self.hflip_prob:
            return sample
        return hflip(sample, self.keypoint_flip)

    def epoch(self, epoch: int = 0, start_step: int = 0):
        order = self.order(epoch)
        return (self.batch(epoch, step, order) for step in range(start_step, self.steps_per_epoch))

    def iterate(self, start_step: int = 0):
        """Training batches without end, epoch after epoch, from global step ``start_step``."""
        for step in itertools.count(int(start_step)):
            epoch, at = divmod(step, self.steps_per_epoch)
            yield self.batch(epoch, at)
