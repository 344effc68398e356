"""Data: datasets by name, pure tensor transforms, and a rank-sharding loader.

    from fpipe import data
    ds = data.build(config.data)          # ds.num_classes, ds.classes, ds.train, ds.test, ds.val
    loader = data.Loader(ds.train, config.data, train=True, rank=0, world_size=1)  # device="cuda":
                                          # normalised on the GPU, copied a batch ahead
    loader.steps_per_epoch
    for batch in loader.epoch(epoch, start_step=0):   # {"image", "label", "index"} (+ "mask")
        ...

Nothing here imports models or training code.
"""
from fpipe.data import pipeline, transforms
from fpipe.data.base import Dataset, TensorSplit
from fpipe.data.config import default_config
from fpipe.data.loader import Loader
from fpipe.data.registry import DATASETS, build

__all__ = ["DATASETS", "Dataset", "Loader", "TensorSplit", "build", "default_config",
           "pipeline", "transforms"]
