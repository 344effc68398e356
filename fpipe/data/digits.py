"""scikit-learn's bundled 8×8 handwritten digits: the default dataset, no download ever.

1797 greyscale images of 10 classes (pixel values 0..16). A fixed stratified split gives
1437 train / 360 test images (scikit-learn's ``train_test_split(..., stratify=labels,
random_state=0)``, stored in digits_test_indices.json and checked against scikit-learn by the
tests; independent of ``data.seed``, so every run is scored on the same test set). The pixels
are read from scikit-learn's bundled ``digits.csv.gz`` without importing scikit-learn (a second
of start-up). Pixels are scaled to [0, 1], upsampled once to ``image_size`` by bilinear
interpolation and cached in memory; access repeats the grey channel to RGB.

Extra targets, for multi-task heads (``model.heads.NAME.target``): ``parity`` (the digit's
parity, 2 classes), ``attributes`` (3 binary columns: even, prime, at least 5; for
``loss='bce'``) and ``ink`` (the 8×8 image's mean intensity, standardised over the dataset to
mean 0, std 1, as regression targets should be; for ``loss='mse'``).
"""
import functools
import gzip
import importlib.util
import json
import os

import numpy as np
import torch
import torch.nn.functional as F

from fpipe.data import base
from fpipe.data import config as config_lib

NUM_TRAIN, NUM_TEST = 1437, 360


@functools.lru_cache(maxsize=4)
def _load(image_size: int) -> tuple:
    rows = _read_csv()
    labels = torch.as_tensor(rows[:, -1], dtype=torch.int64)
    test_idx = _test_indices()
    train_idx = sorted(set(range(len(labels))) - set(test_idx))
    images = torch.as_tensor(rows[:, :-1], dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    if images.shape[-1] != image_size:
        images = F.interpolate(images, size=(image_size, image_size), mode="bilinear",
                               align_corners=False, antialias=image_size < images.shape[-1])
    images = images.clamp_(0.0, 1.0)
    targets = _extra_targets(labels, torch.as_tensor(rows[:, :-1], dtype=torch.float32) / 16.0)
    splits = []
    for idx in (sorted(train_idx), sorted(test_idx)):
        idx = torch.as_tensor(idx)
        splits.append(base.TensorSplit(images[idx].contiguous(), labels[idx],
                                       targets={k: v[idx] for k, v in targets.items()}))
    return tuple(splits)


def _extra_targets(labels, pixels) -> dict:
    even, prime = labels % 2 == 0, torch.isin(labels, torch.tensor([2, 3, 5, 7]))
    ink = pixels.mean(1)
    return {"parity": labels % 2,
            "attributes": torch.stack([even, prime, labels >= 5], 1).float(),
            "ink": (ink - ink.mean()) / ink.std()}


def _read_csv() -> np.ndarray:
    """scikit-learn's bundled digits: 1797 rows of 64 pixels and the label."""
    spec = importlib.util.find_spec("sklearn")  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the digits dataset is scikit-learn's bundled copy: pip install scikit-learn")
    path = os.path.join(spec.submodule_search_locations[0], "datasets", "data", "digits.csv.gz")
    with gzip.open(path, "rt") as f:
        return np.loadtxt(f, delimiter=",")


def _test_indices() -> list:
    with open(os.path.join(os.path.dirname(__file__), "digits_test_indices.json")) as f:
        return json.load(f)["test_indices"]


def build(data_cfg) -> base.Dataset:
    image_size = int(config_lib.get(data_cfg, "image_size"))
    if image_size < 1:
        raise ValueError(f"data.image_size must be positive, got {image_size}")
    train, test = _load(image_size)
    return base.Dataset("digits", tuple(str(d) for d in range(10)), train, test)
