"""Feature files: safetensors written one tensor at a time, read back memory-mapped.

The format is plain safetensors (8-byte header length, JSON header, raw little-endian data), so
``safetensors.numpy.load_file`` reads our files without torch. We write it ourselves because
the library's writer wants every tensor in memory at once; a merged ImageNet-sized split is
written here one layer at a time. Reading maps the file (``numpy.memmap``, copy-on-write): a
split larger than memory opens instantly and pages in the rows a protocol touches.
"""
import json
import os
import struct

import numpy as np
import torch

from fpipe import files

DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64",
          torch.int32: "I32"}
NUMPY = {"F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32}


def write(path, specs, produce, metadata):
    """Writes ``{name: (dtype, shape)}`` taking each tensor from ``produce(name)`` in turn.

    ``metadata`` is a JSON-able dict, stored as the string ``__metadata__["fpipe"]``. Atomic:
    the final name appears only once the whole file is on disk."""
    header, offset = {"__metadata__": {"fpipe": json.dumps(metadata, sort_keys=True)}}, 0
    for name, (dtype, shape) in specs.items():
        size = int(np.prod(shape, dtype=np.int64)) * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as safetensors' own writer does

    def write_fn(f):
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name, (dtype, shape) in specs.items():
            t = produce(name)
            if t.dtype != dtype or tuple(t.shape) != tuple(shape):
                raise ValueError(f"{path}: tensor {name} is {t.dtype} {tuple(t.shape)}, "
                                 f"declared {dtype} {tuple(shape)}")
            t = t.detach().cpu().contiguous()
            f.write(memoryview((t.view(torch.int16) if dtype == torch.bfloat16 else t).numpy()).cast("B")
                    if t.numel() else b"")
    files.atomic_write(path, write_fn)


class Reader:
    """One feature file: ``names``, ``metadata`` (dict), ``tensor(name)`` (memory-mapped)."""

    def __init__(self, path):
        self.path = path
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        self._data_start = 8 + length
        self.metadata = json.loads(header.pop("__metadata__", {}).get("fpipe", "{}"))
        self.entries = header
        self.names = tuple(header)

    def shape(self, name):
        return tuple(self.entries[name]["shape"])

    def tensor(self, name) -> torch.Tensor:
        """The tensor, mapped from the file (writes go to private pages, never to the file)."""
        if name not in self.entries:
            raise KeyError(f"{self.path} has no tensor {name!r}; it has {', '.join(self.names)}")
        e = self.entries[name]
        begin, end = e["data_offsets"]
        if e["dtype"] == "BF16":
            raw = np.memmap(self.path, np.int16, "c", self._data_start + begin, ((end - begin) // 2,))
            return torch.from_numpy(raw).view(torch.bfloat16).reshape(e["shape"])
        if end == begin:
            return torch.from_numpy(np.zeros(e["shape"], NUMPY[e["dtype"]]))
        return torch.from_numpy(np.memmap(self.path, NUMPY[e["dtype"]], "c", self._data_start + begin,
                                          tuple(e["shape"])))


def exists(path):
    return os.path.isfile(path)
