"""Images on disk, one subfolder per class: ``root/<split>/<class>/<image file>``.

Class names are the sorted subfolders of the train split; the test split may lack some of them
but may not add new ones. Files are decoded with Pillow on access, to RGB uint8 CHW tensors
of their own size (the transforms make them one size).
"""
import os

import numpy as np
import torch
from PIL import Image

from fpipe.data import base
from fpipe.data import config as config_lib

EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
LAYOUT = "root/<split>/<class name>/<image>.jpg|png|... (split names: data.train_split, " \
         "data.test_split)"


def decode(path: str) -> torch.Tensor:
    """The file as an RGB uint8 3×H×W tensor; a file Pillow cannot read is a clear error."""
    try:
        with Image.open(path) as image:
            pixels = np.array(image.convert("RGB"))
    except Exception as e:  # Pillow raises many types for broken files; name the file for all.
        raise ValueError(f"cannot decode image file {path!r} ({type(e).__name__}: {e}). Fix: "
                         "delete or replace this file (e.g. re-save it as PNG or JPEG).") from e
    return torch.from_numpy(pixels).permute(2, 0, 1).contiguous()


class FolderSplit:
    """Image files and their labels; decodes on access."""

    def __init__(self, files: list, labels: list):
        self.files = list(files)
        self.labels = torch.as_tensor(labels, dtype=torch.int64)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index):
        i = base.check_index(index, len(self))
        return decode(self.files[i]), int(self.labels[i])


def _subdirs(path: str) -> list:
    return sorted(e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith("."))


def _split_dir(root: str, split: str) -> str:
    path = os.path.join(root, split)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"image_folder: no directory {path!r}. Expected layout: {LAYOUT}")
    return path


def _scan(path: str, classes: tuple) -> FolderSplit:
    index = {name: i for i, name in enumerate(classes)}
    extra = [c for c in _subdirs(path) if c not in index]
    if extra:
        raise ValueError(f"image_folder: {path!r} has classes the train split lacks: {extra}")
    files, labels = [], []
    for name in _subdirs(path):
        class_dir = os.path.join(path, name)
        for file in sorted(os.listdir(class_dir)):
            if file.lower().endswith(EXTENSIONS):
                files.append(os.path.join(class_dir, file))
                labels.append(index[name])
    if not files:
        raise ValueError(f"image_folder: no image files ({', '.join(EXTENSIONS)}) under "
                         f"{path!r}. Expected layout: {LAYOUT}")
    return FolderSplit(files, labels)


def build(data_cfg) -> base.Dataset:
    root = str(config_lib.get(data_cfg, "root"))
    if not root:
        raise ValueError(f"image_folder needs data.root. Expected layout: {LAYOUT}")
    if not os.path.isdir(root):
        raise FileNotFoundError(f"image_folder: data.root {root!r} is not a directory. "
                                f"Expected layout: {LAYOUT}")
    train_dir = _split_dir(root, str(config_lib.get(data_cfg, "train_split")))
    test_dir = _split_dir(root, str(config_lib.get(data_cfg, "test_split")))
    classes = tuple(_subdirs(train_dir))
    if not classes:
        raise ValueError(f"image_folder: {train_dir!r} has no class subfolders. "
                         f"Expected layout: {LAYOUT}")
    return base.Dataset("image_folder", classes, _scan(train_dir, classes),
                        _scan(test_dir, classes))
