"""Random images whose labels a model can learn, for tests and benchmarks; no files.

Each class has a smooth colour pattern (a random 4×4×3 grid upsampled to ``image_size``); a
sample is its class pattern plus Gaussian pixel noise, as uint8. Images are made on access from
a generator seeded by ``(data.seed, split, index)``, so any count costs no memory and the same
seed always gives the same pixels. Labels are balanced (``index % num_classes``, shuffled).
"""
import torch
import torch.nn.functional as F

from fpipe.data import base
from fpipe.data import config as config_lib
from fpipe.data import rng

NOISE_STD = 0.15  # in [0, 1] pixel units; patterns span [0.2, 0.8]


class SyntheticSplit:
    """``count`` samples of the given class patterns (C×3×H×W floats in [0, 1])."""

    def __init__(self, patterns: torch.Tensor, count: int, seed: int, split: str):
        self.patterns, self.seed, self.split = patterns, seed, split
        num_classes = len(patterns)
        order = torch.randperm(count, generator=rng.generator("synthetic-labels", seed, split))
        self.labels = order % num_classes

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index):
        i = base.check_index(index, len(self))
        label = int(self.labels[i])
        pattern = self.patterns[label]
        noise = torch.randn(pattern.shape, generator=rng.generator("synthetic", self.seed,
                                                                   self.split, i))
        image = (pattern + NOISE_STD * noise).clamp_(0.0, 1.0).mul_(255.0).round_()
        return image.to(torch.uint8), label


def build(data_cfg) -> base.Dataset:
    get = lambda key: int(config_lib.get(data_cfg, key))
    num_classes, size, seed = get("num_classes"), get("image_size"), get("seed")
    num_train, num_test = get("num_train"), get("num_test")
    if num_classes < 1 or size < 1 or num_train < 1 or num_test < 1:
        raise ValueError("synthetic data need num_classes, image_size, num_train and num_test "
                         f">= 1; got {num_classes}, {size}, {num_train}, {num_test}")
    grid = torch.rand(num_classes, 3, 4, 4, generator=rng.generator("synthetic-patterns", seed))
    patterns = F.interpolate(grid, size=(size, size), mode="bilinear", align_corners=False,
                             antialias=size < 4)
    patterns = 0.2 + 0.6 * patterns
    classes = tuple(f"class_{c}" for c in range(num_classes))
    return base.Dataset("synthetic", classes, SyntheticSplit(patterns, num_train, seed, "train"),
                        SyntheticSplit(patterns, num_test, seed, "test"))
