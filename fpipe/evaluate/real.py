"""ImageNet-ReaL (Beyer et al. 2020, "Are we done with ImageNet?"): ImageNet's validation images
relabelled with every class that fits, scored as big_vision and dinov2 report it.

``data.real_labels`` is the authors' ``real.json``: 50,000 lists of class indices, the i-th for
``ILSVRC2012_val_<i+1:08d>.JPEG``. A prediction is right when its top class is in the image's
list; images with an empty list are left out of the count. The test split's files are matched by
that name; its classes must be ImageNet's 1000 WordNet ids (``n01440764`` …) in their sorted
order, which the indices count in (or, from a split file, the integers 0..999 in ImageNet's usual
numbering); a list file whose lists rarely hold the folder labels is refused, which catches
another order. Each sample's list goes into evaluation batches as ``real``: indices padded with
-1 (fpipe.train.step scores it).
"""
import json
import os
import re

import torch
from absl import logging

MAX_BYTES = 16 << 20  # the authors' file is ~0.4 MB
VAL_FILE = re.compile(r"ILSVRC2012_val_(\d{8})\.\w+")
WNID = re.compile(r"n\d{8}")
MIN_AGREEMENT = 0.5  # of images with a list, the share whose folder label is in it; a wrong class order gives ~0.001


def read(path: str) -> list:
    """``real.json``'s lists, checked: a list of lists of ints in 0..999."""
    if not os.path.isfile(path):
        raise ValueError(f"data.real_labels={path!r}: no such file (ImageNet-ReaL's real.json, "
                         "github.com/google-research/reassessed-imagenet)")
    if os.path.getsize(path) > MAX_BYTES:
        raise ValueError(f"data.real_labels={path!r}: {os.path.getsize(path)} bytes, more than ReaL's "
                         f"real.json could hold (at most {MAX_BYTES})")
    try:
        with open(path) as f:
            labels = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"data.real_labels={path!r}: not JSON ({e})") from None
    if not (isinstance(labels, list) and all(isinstance(row, list) and all(
            isinstance(c, int) and not isinstance(c, bool) and 0 <= c < 1000 for c in row) for row in labels)):
        raise ValueError(f"data.real_labels={path!r}: not ReaL's format, a list of lists of class indices 0..999")
    return labels


def for_split(split, classes, labels: list) -> tuple:
    """``(per-sample lists as an N×L int64 tensor padded with -1, how many have a list, the share
    of those whose folder label is in their list)`` for ``split``'s files, by their names."""
    numbered = list(classes) == [str(i) for i in range(1000)]  # a split file's integer labels
    wrong = [] if numbered else [c for c in classes if not WNID.fullmatch(str(c))]
    if len(classes) != 1000 or wrong or not (numbered or list(classes) == sorted(classes)):
        raise ValueError(f"data.real_labels: ReaL counts ImageNet's 1000 classes in WordNet-id order, but the "
                         f"dataset has {len(classes)} classes{f' (e.g. {wrong[0]!r})' if wrong else ''}; use the "
                         "ImageNet folders named by WordNet id (n01440764, …), or a split file labelling them 0..999")
    rows = []
    for path in split.files:
        m = VAL_FILE.fullmatch(os.path.basename(path))
        if not m or not 1 <= int(m[1]) <= len(labels):
            raise ValueError(f"data.real_labels: {path!r} is not one of ImageNet's {len(labels)} validation "
                             "files (ILSVRC2012_val_<8 digits>.JPEG): ReaL relabels the validation split only; "
                             "set data.test_split to it")
        rows.append(labels[int(m[1]) - 1])
    width = max((len(r) for r in rows), default=0) or 1
    table = torch.full((len(rows), width), -1, dtype=torch.int64)
    for i, row in enumerate(rows):
        table[i, :len(row)] = torch.tensor(row, dtype=torch.int64)
    listed = (table >= 0).any(1)
    agree = (table == split.labels[:, None]).any(1)[listed].float().mean().item() if listed.any() else 0.0
    if listed.any() and agree < MIN_AGREEMENT:
        raise ValueError(f"data.real_labels: only {100 * agree:.1f}% of the images' folder labels are in their ReaL "
                         "lists (the right file and class order give most): are the class folders ImageNet's, "
                         "and the file ReaL's real.json?")
    return table, int(listed.sum()), agree


def hits(logits, real, valid) -> dict:
    """``{"real_top1": right predictions, "real_count": scored images}`` of one batch."""
    scored = (real >= 0).any(1) & valid
    right = (logits.argmax(1, keepdim=True) == real).any(1) & scored
    return {"real_top1": right.sum(), "real_count": scored.sum()}


def lists(data_cfg, dataset):
    """The test split's ReaL lists (``data.real_labels``; :func:`for_split`), or None when unset."""
    path = data_cfg.get("real_labels") or ""
    if not path:
        return None
    table, scored, agree = for_split(dataset.test, dataset.classes, read(path))
    logging.info("ImageNet-ReaL (%s): %d of %d test images have a list (the others are not scored); %.1f%% of "
                 "those lists hold the folder's label. Label heads also report real_top1.", path, scored,
                 len(dataset.test), 100 * agree)
    return table
