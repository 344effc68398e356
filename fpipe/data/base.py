"""The containers every dataset returns: a :class:`Dataset` with two or three splits.

A split is anything with ``len(split)``, ``split[i] -> (image, label)`` (image a CHW tensor,
uint8 in 0..255 or float in [0, 1]; label an int) and ``split.labels`` (int64, one per sample,
so an evaluator can count classes without decoding images). A split may also have ``targets``:
``{name: tensor}`` of extra per-sample targets (int64 class indices N, or float N×K columns:
multi-label attributes, regression values) that heads learn with ``target=name``; batches
carry them under their names.
"""
import dataclasses
import operator
from typing import Protocol

import torch


class Split(Protocol):
    labels: torch.Tensor

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]: ...


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A named dataset: class names (label ``i`` is ``classes[i]``) and its splits; ``val``
    (for choosing hyper-parameters, never the test split) is optional."""
    name: str
    classes: tuple
    train: Split
    test: Split
    val: Split | None = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def targets_of(split) -> dict:
    """The split's extra targets ``{name: tensor}`` (none: ``{}``)."""
    return dict(getattr(split, "targets", None) or {})


def target_sizes(dataset: Dataset) -> dict:
    """``{name: size}`` of the train split's extra targets: classes (max + 1) of an integer
    target, columns of a float one: a head's output size when it learns that target."""
    sizes = {}
    for name, values in targets_of(dataset.train).items():
        if values.is_floating_point():
            sizes[name] = 1 if values.ndim == 1 else int(values.shape[1])
        else:
            sizes[name] = int(values.max()) + 1 if len(values) else 0
    return sizes


def check_index(index, length: int) -> int:
    """``index`` as a non-negative int below ``length`` (negative counts from the end)."""
    i = operator.index(index)
    if i < 0:
        i += length
    if not 0 <= i < length:
        raise IndexError(f"index {index} out of range for a split of {length} samples")
    return i


class TensorSplit:
    """A split held in memory: ``images`` N×C×H×W, ``labels`` N.

    One-channel images are stored once and repeated to ``channels`` on access, which keeps
    the cache of upsampled greyscale images a third of the size. Access returns a copy, so a
    caller that edits it in place cannot damage the cache.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, channels: int = 3, targets=None):
        if images.ndim != 4 or len(images) != len(labels):
            raise ValueError(f"want images N×C×H×W and N labels, got {tuple(images.shape)} "
                             f"and {tuple(labels.shape)}")
        self.images = images
        self.labels = labels.to(torch.int64)
        self.channels = channels
        self.targets = dict(targets or {})
        for name, values in self.targets.items():
            if len(values) != len(labels):
                raise ValueError(f"target {name!r} has {len(values)} values for {len(labels)} samples")

    def __len__(self) -> int:
        return len(self.labels)

    def identity(self) -> memoryview:
        """The pixels' bytes, as they are stored (fpipe.data.identity)."""
        images = self.images.detach().cpu().contiguous()
        return memoryview(images.reshape(-1).view(torch.uint8).numpy())

    def __getitem__(self, index):
        i = check_index(index, len(self))
        image = self.images[i]
        if image.shape[0] != self.channels:
            image = image.expand(self.channels, -1, -1)
        return image.contiguous().clone(), int(self.labels[i])
