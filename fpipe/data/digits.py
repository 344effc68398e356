"""scikit-learn's bundled 8×8 handwritten digits: the default dataset, no download ever.

1797 greyscale images of 10 classes (pixel values 0..16). A fixed stratified split gives
1437 train / 360 test images (seed 0, independent of ``data.seed``, so every run is scored on
the same test set). Pixels are scaled to [0, 1], upsampled once to ``image_size`` by bilinear
interpolation and cached in memory; access repeats the grey channel to RGB.
"""
import functools

import torch
import torch.nn.functional as F

from fpipe.data import base
from fpipe.data import config as config_lib

NUM_TRAIN, NUM_TEST = 1437, 360
SPLIT_SEED = 0


@functools.lru_cache(maxsize=4)
def _load(image_size: int) -> tuple:
    from sklearn import datasets, model_selection  # Lazily: importing sklearn takes a second.
    raw = datasets.load_digits()
    labels = torch.as_tensor(raw.target, dtype=torch.int64)
    train_idx, test_idx = model_selection.train_test_split(
        range(len(labels)), test_size=NUM_TEST, stratify=raw.target, random_state=SPLIT_SEED)
    images = torch.as_tensor(raw.images, dtype=torch.float32)[:, None] / 16.0
    if images.shape[-1] != image_size:
        images = F.interpolate(images, size=(image_size, image_size), mode="bilinear",
                               align_corners=False, antialias=image_size < images.shape[-1])
    images = images.clamp_(0.0, 1.0)
    splits = []
    for idx in (sorted(train_idx), sorted(test_idx)):
        idx = torch.as_tensor(idx)
        splits.append(base.TensorSplit(images[idx].contiguous(), labels[idx]))
    return tuple(splits)


def build(data_cfg) -> base.Dataset:
    image_size = int(config_lib.get(data_cfg, "image_size"))
    if image_size < 1:
        raise ValueError(f"data.image_size must be positive, got {image_size}")
    train, test = _load(image_size)
    return base.Dataset("digits", tuple(str(d) for d in range(10)), train, test)
