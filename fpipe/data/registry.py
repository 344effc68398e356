"""Datasets by name: ``build(config.data)`` looks up ``config.data.name``."""
from fpipe.data import base, digits, image_folder, synthetic
from fpipe.data import config as config_lib

DATASETS = {
    "digits": digits.build,
    "image_folder": image_folder.build,
    "synthetic": synthetic.build,
}


def build(data_cfg) -> base.Dataset:
    """The dataset ``data_cfg.name`` names; an unknown name lists the valid ones."""
    name = config_lib.get(data_cfg, "name")
    if name not in DATASETS:
        raise ValueError(f"unknown data.name {name!r}; valid names: {', '.join(sorted(DATASETS))}")
    return DATASETS[name](data_cfg)
