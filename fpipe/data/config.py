"""The ``config.data`` section: its defaults, and reading a key from a partial config.

Every key the data package reads is listed here once, so a config that sets only some keys
still gets documented defaults for the rest.
"""
import os

import ml_collections


def default_config() -> ml_collections.ConfigDict:
    """Defaults for ``config.data``; the embedded digits dataset trains with no download."""
    return ml_collections.ConfigDict(dict(
        name="digits",         # digits | image_folder | synthetic (see fpipe.data.registry)
        root="",               # image_folder: root/<train_split>/<class>/<image files>
        split_file="",         # image_folder: a CSV of path,label,split rows instead of folders
        image_size=64,         # the trunk's input size; digits are upsampled to it at load
        batch_size=64,         # GLOBAL training batch, split evenly across ranks
        eval_batch_size=256,   # GLOBAL evaluation batch; each rank gets ceil(it / world_size)
        num_workers=0,         # worker processes per process (0: batches made in the caller)
        # Op strings (fpipe.data.transforms); a bare crop/resize size means ``image_size``.
        # No flip by default: the default data are digits, which a mirror does not preserve.
        train_transforms="random_resized_crop(scale=(0.35, 1.0))|normalize",
        eval_transforms="resize|center_crop|normalize",
        seed=0,                # data order and augmentation (and synthetic's pixels)
        train_split="train",   # image_folder subfolder names (or split names in split_file)
        test_split="val",
        val_split="",          # optional third split (e.g. "val" with test_split="test"); "": none
        max_image_pixels=89_478_485,  # image files above this width × height are refused
        max_aspect_ratio=32.0,        # ... and above this long side / short side
        num_classes=10,        # synthetic only
        num_train=1024,        # synthetic only
        num_test=256,          # synthetic only
    ))


_DEFAULTS = default_config()


def get(data_cfg, key: str):
    """``data_cfg[key]``, or its default when the config does not set it."""
    if key not in _DEFAULTS:
        raise KeyError(f"{key!r} is not a data config key; keys: {', '.join(_DEFAULTS)}")
    try:
        return data_cfg[key]
    except (KeyError, AttributeError):
        return _DEFAULTS[key]


def check(data_cfg) -> None:
    """The data keys a config can get wrong before any file is read; one line per problem."""
    for key in ("num_workers",):
        if not (isinstance(get(data_cfg, key), int) and get(data_cfg, key) >= 0):
            raise ValueError(f"data.{key}={get(data_cfg, key)!r}: a whole number >= 0 is needed")
    if not (isinstance(get(data_cfg, "max_image_pixels"), int) and
            get(data_cfg, "max_image_pixels") >= 1):
        raise ValueError(f"data.max_image_pixels={get(data_cfg, 'max_image_pixels')!r}: a whole "
                         "number >= 1 is needed")
    if not float(get(data_cfg, "max_aspect_ratio")) >= 1:
        raise ValueError(f"data.max_aspect_ratio={get(data_cfg, 'max_aspect_ratio')!r}: a ratio "
                         ">= 1 is needed (long side / short side)")
    split_file = get(data_cfg, "split_file")
    if split_file and not os.path.isfile(split_file):
        raise ValueError(f"data.split_file={split_file!r} is not a file")
