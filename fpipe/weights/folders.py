"""Which files a weights path stands for: a file, or a Hugging Face model folder.

A folder as ``save_pretrained`` writes it, or as the hub cache keeps it
(``models--ORG--NAME/snapshots/<commit>/``, or the ``models--ORG--NAME`` folder itself, read at
``refs/main``), holds ``model.safetensors`` or ``pytorch_model.bin`` (transformers prefers the
former; open_clip's repos ``open_clip_model.safetensors`` / ``open_clip_pytorch_model.bin``), or
shards of them listed by ``<name>.index.json``. Shard names come from the folder's
index, an untrusted file: each must be a plain file name inside the folder.
"""
import hashlib
import json
import os
import re

from fpipe import files
from fpipe.weights.errors import WeightsError

# transformers' (and timm's) names in transformers' order of preference, then open_clip's
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_model.safetensors", "open_clip_pytorch_model.bin")
INDEX_SUFFIX = ".index.json"
MAX_INDEX_BYTES = 64 << 20
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


def weight_files(path: str) -> list:
    """The files to read for ``path``: ``[path]`` for a file, a model folder's weights for a folder."""
    if not os.path.isdir(path):
        return [path]
    folder = snapshot(path)
    for name in WEIGHT_FILES:
        if os.path.isfile(os.path.join(folder, name)):
            return [os.path.join(folder, name)]
        index = os.path.join(folder, name + INDEX_SUFFIX)
        if os.path.isfile(index):
            return shards(index)
    raise WeightsError(f"{path}: is a directory without weights: a Hugging Face model folder holds "
                       f"{' or '.join(WEIGHT_FILES)} (or their {INDEX_SUFFIX} and shards); give the weights file.")


def is_model_folder(path: str) -> bool:
    """Whether ``path`` is a folder of weights, or a hub cache folder (its errors come when read)."""
    if not os.path.isdir(path):
        return False
    names = [n + suffix for n in WEIGHT_FILES for suffix in ("", INDEX_SUFFIX)]
    return os.path.isdir(os.path.join(path, "snapshots")) or any(os.path.isfile(os.path.join(path, n)) for n in names)


def snapshot(folder: str) -> str:
    """The snapshot a hub cache folder (``models--ORG--NAME``) points at by ``refs/main``; else ``folder``."""
    ref, snapshots = os.path.join(folder, "refs", "main"), os.path.join(folder, "snapshots")
    if not (os.path.isfile(ref) and os.path.isdir(snapshots)):
        return folder
    with open(ref) as f:
        commit = f.read(100).strip()
    if not _COMMIT.match(commit) or not os.path.isdir(os.path.join(snapshots, commit)):
        raise WeightsError(f"{folder}: refs/main names {commit[:60]!r}, which is no snapshot in {snapshots}; "
                           "give the snapshot folder itself.")
    return os.path.join(snapshots, commit)


def shards(index: str) -> list:
    """The shard files ``index`` (``*.index.json``) lists in its ``weight_map``, each once, in order."""
    if os.path.getsize(index) > MAX_INDEX_BYTES:
        raise WeightsError(f"{index}: over {MAX_INDEX_BYTES >> 20} MiB, too large for a shard index.")
    try:
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        names = list(dict.fromkeys(weight_map.values()))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise WeightsError(f"{index}: not a shard index (a JSON object with a 'weight_map' of name -> file): "
                           f"{type(e).__name__}: {e}") from None
    folder = os.path.dirname(index)
    for name in names:
        if not isinstance(name, str) or os.path.basename(name) != name or name in ("", ".", ".."):
            raise WeightsError(f"{index}: lists the shard {name!r}, which is not a file name in its folder.")
        if not os.path.isfile(os.path.join(folder, name)):
            raise WeightsError(f"{index}: lists the shard {name!r}, which is missing from {folder}.")
    if not names:
        raise WeightsError(f"{index}: lists no shards.")
    return [os.path.join(folder, n) for n in names]


def sha256(path: str) -> str:
    """A file's sha256; for a folder, the sha256 over its weight files' names and sha256s."""
    paths = weight_files(path)
    if len(paths) == 1:
        return files.sha256(paths[0])
    lines = "".join(f"{os.path.basename(p)} {files.sha256(p)}\n" for p in paths)
    return hashlib.sha256(lines.encode()).hexdigest()
