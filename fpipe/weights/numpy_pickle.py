"""Plain pickles of numpy arrays (detectron2's ``.pkl``), read without running anything.

MoCo's and solo-learn's ``convert-pretrain-to-detectron2.py`` and detectron2's model zoo write
``{"model": {name: ndarray}, "__author__": ...}`` with ``pickle.dump``. The unpickler here builds
numpy arrays (numpy's own reconstruction), containers, numbers and strings; any other global is
refused. Arrays become tensors.
"""
import pickle

import numpy as np
import torch

from fpipe.weights import walk
from fpipe.weights.errors import WeightsError


def read(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            obj = _ArraysOnly(f, encoding="latin1").load()
    except _Refused as e:
        raise WeightsError(f"{path}: refused to load {e}: a pickle weights file may hold only numpy "
                           f"arrays, containers, numbers and strings, because creating anything else "
                           f"can run code.") from None
    except Exception as e:  # noqa: BLE001 - pickle raises many kinds for a damaged file
        raise WeightsError(f"{path}: truncated or corrupt pickle file ({type(e).__name__}: {e}).") from None
    try:
        walk.check(obj)
    except WeightsError as e:
        raise WeightsError(f"{path}: refused: {e}") from None
    return _as_tensors(obj, {})


class _Refused(Exception):
    pass


class _ArraysOnly(pickle.Unpickler):
    """Builds numpy arrays and nothing else that is a global."""
    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("collections", "OrderedDict"),
               ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise _Refused(f"{module}.{name}")
        if module.startswith("numpy.core"):
            module = module.replace("numpy.core", "numpy._core")
        return super().find_class(module, name)

    def persistent_load(self, pid):
        raise _Refused("a persistent reference")


def _as_tensors(node, memo):
    """Copies dicts, lists and tuples with numeric numpy arrays as tensors (each node once)."""
    if id(node) in memo:
        return memo[id(node)]
    if isinstance(node, np.ndarray) and node.dtype != object:
        out = torch.from_numpy(np.ascontiguousarray(node))
    elif isinstance(node, dict):
        out = {k: _as_tensors(v, memo) for k, v in node.items()}
    elif type(node) in (list, tuple):
        out = type(node)(_as_tensors(v, memo) for v in node)
    else:
        out = node
    memo[id(node)] = out
    return out
