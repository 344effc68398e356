"""The ``config.data`` section: its defaults, and reading a key from a partial config.

Every key the data package reads is listed here once, so a config that sets only some keys
still gets documented defaults for the rest.
"""
import os

from fpipe import defaults


default_config = defaults.data  # the config.data keys and their help: fpipe/defaults.py
_DEFAULTS = default_config()
READS_ROOT = ("image_folder", "coco")  # the datasets that read data.root (digits and synthetic ignore it)


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
    niceness = get(data_cfg, "worker_niceness")
    if not (isinstance(niceness, int) and 0 <= niceness <= 19):
        raise ValueError(f"data.worker_niceness={niceness!r}: a whole number from 0 (the step's priority) "
                         "to 19 (the lowest) is needed")
    roles = {role: get(data_cfg, f"{role}_split") for role in ("train", "test", "val")}
    for a, b in (("train", "test"), ("train", "val"), ("test", "val")):
        if roles[a] and roles[a] == roles[b]:
            raise ValueError(f"data.{a}_split and data.{b}_split are both {roles[a]!r}: the {b} split's "
                             f"accuracy would be measured on the {a} split's images. Fix: name another split "
                             "of held-out images" + (", or data.val_split='' for none" if b == "val" else ""))
    split_file = get(data_cfg, "split_file")
    if split_file and not os.path.isfile(split_file):
        raise ValueError(f"data.split_file={split_file!r} is not a file")
    if get(data_cfg, "eval_folders") not in ("names", "indices"):
        raise ValueError(f"data.eval_folders={get(data_cfg, 'eval_folders')!r}; valid: 'names' (test and val class "
                         "folders named as train's), 'indices' (by train's class numbers, as ImageNet-V2's 0..999)")
    if get(data_cfg, "eval_folders") == "indices" and get(data_cfg, "split_file"):
        raise ValueError("data.eval_folders='indices' names class folders; a data.split_file names each image's "
                         "class itself: leave data.eval_folders='names'")
    real = get(data_cfg, "real_labels")
    if real and (get(data_cfg, "name") != "image_folder" or not os.path.isfile(real)):
        raise ValueError(f"data.real_labels={real!r}: " + ("no such file (ImageNet-ReaL's real.json)"
                                                          if get(data_cfg, "name") == "image_folder" else
                                                          "ImageNet-ReaL relabels ImageNet's validation images, an "
                                                          "image_folder dataset"))
    root = get(data_cfg, "root")
    if get(data_cfg, "name") == "image_folder" and not (root or split_file):
        raise ValueError("data.name='image_folder' needs data.root (root/<split>/<class>/<image>) or data.split_file, "
                         "e.g. --config.data.root=/data/imagenet")
    if root and get(data_cfg, "name") in READS_ROOT and not os.path.isdir(root):
        raise ValueError(f"data.root={root!r} is not a directory")
