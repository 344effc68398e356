"""scikit-learn's bundled 8×8 handwritten digits: the default dataset, no download ever.

1797 greyscale images of 10 classes (pixel values 0..16). A fixed stratified split gives
1437 train / 360 test images (scikit-learn's ``train_test_split(..., stratify=labels,
random_state=0)``, stored in digits_test_indices.json and checked against scikit-learn by the
tests; independent of ``data.seed``, so every run is scored on the same test set). The pixels
are read from scikit-learn's bundled ``digits.csv.gz`` without importing scikit-learn (a second
of start-up). Pixels are scaled to [0, 1], upsampled once to ``image_size`` by bilinear
interpolation and cached in memory; access repeats the grey channel to RGB.
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
    splits = []
    for idx in (sorted(train_idx), sorted(test_idx)):
        idx = torch.as_tensor(idx)
        splits.append(base.TensorSplit(images[idx].contiguous(), labels[idx]))
    return tuple(splits)


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
