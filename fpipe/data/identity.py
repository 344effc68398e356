"""What a dataset holds, one digest per split, so that a resume or a features cache can tell
that the data is the one it was made from.

The config names where the data lives (``data.root``), not what is there: a folder that gained
or lost images, a class renamed, a split file edited would otherwise continue a run, or serve its
cached features, as if nothing had changed. A split's digest covers its length, class names,
labels and extra targets, and what its samples are made from where the split says so
(``split.identity() -> bytes``: an image folder's paths below its root, an in-memory split's
pixels, a COCO split's annotation file). Generated splits (``synthetic``) are their config's.
"""
import hashlib
import weakref

import torch

from fpipe.data import base

SPLITS = ("train", "test", "val")
_DIGESTS = weakref.WeakKeyDictionary()  # split -> {classes: digest}


def update(h, t: torch.Tensor) -> None:
    """Feeds a tensor's dtype, shape and bytes to the hash ``h``."""
    t = t.detach().cpu().contiguous()
    h.update(f"{t.dtype}|{tuple(t.shape)}|".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy())


def split_digest(split, classes=()) -> str:
    """``"N samples, sha256 <16 hex>"`` of one split; computed once per split object and classes
    (a run digests its splits for its checkpoints and again for its features cache; a split does
    not change once built)."""
    key = tuple(classes)
    try:
        known = _DIGESTS.setdefault(split, {})
    except TypeError:  # not weakly referenceable: computed each time
        known = {}
    if key not in known:
        known[key] = _digest(split, key)
    return known[key]


def _digest(split, classes: tuple) -> str:
    h = hashlib.sha256(f"{len(split)}|{list(classes)!r}|".encode())
    labels = getattr(split, "labels", None)
    if isinstance(labels, torch.Tensor):
        update(h, labels)
    for name, values in sorted(base.targets_of(split).items()):
        h.update(f"|{name}|".encode())
        update(h, values)
    own = getattr(split, "identity", None)
    if callable(own):
        h.update(own())
    return f"{len(split)} samples, sha256 {h.hexdigest()[:16]}"


def digest(dataset) -> dict:
    """``{split: split_digest}`` for the dataset's train, test and (if any) val splits."""
    classes = getattr(dataset, "classes", ())
    return {name: split_digest(getattr(dataset, name), classes) for name in SPLITS
            if getattr(dataset, name, None) is not None}

