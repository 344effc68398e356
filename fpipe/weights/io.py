"""Reading and writing weight files safely: no code in a file is ever run.

PyTorch files go through ``torch.load(weights_only=True)`` with a short allow-list of harmless
globals that real checkpoints carry (``argparse.Namespace``, numpy scalars and dtypes);
``.safetensors`` files through the safetensors package. Every failure is one ``WeightsError``
that names the file and says what is wrong with it.
"""
import argparse
import os
import pickle
import struct
import zipfile

import numpy as np
import torch

from fpipe.weights.errors import WeightsError

SAFETENSORS_EXTENSIONS = (".safetensors",)
RESAVE_HINT = ('In an environment you trust, load it with weights_only=False and save only the '
               'weights, e.g. torch.save(ckpt["state_dict"], "clean.pth").')


def _numpy_globals() -> list:
    """numpy scalars and dtypes, under numpy 2 names and the ``numpy.core`` names of older files."""
    scalar = np.array(0.0)[()].__reduce__()[0]  # numpy._core.multiarray.scalar
    dtype_classes = [getattr(np.dtypes, n) for n in dir(np.dtypes)
                     if n.endswith("DType") and n != "ObjectDType"]  # object dtypes hold pickles
    return [scalar, (scalar, "numpy.core.multiarray.scalar"), np.dtype, *dtype_classes]


SAFE_GLOBALS = [argparse.Namespace, *_numpy_globals()]


def read(path: str):
    """Returns what the file holds (usually a nested dict with tensors at the leaves)."""
    path = os.fspath(path)
    kind = sniff(path)
    if kind == "safetensors":
        return _read_safetensors(path)
    return _read_torch(path, kind)


def sniff(path: str) -> str:
    """'safetensors', 'zip' (torch >= 1.6), 'pickle' or 'tar' (older torch); else a WeightsError."""
    if not os.path.exists(path):
        raise WeightsError(f"{path}: no such file.")
    if os.path.isdir(path):
        raise WeightsError(f"{path}: is a directory, not a weights file.")
    size = os.path.getsize(path)
    if size == 0:
        raise WeightsError(f"{path}: the file is empty (0 bytes); was the download or save cut off?")
    with open(path, "rb") as f:
        head = f.read(512)
    if len(head) >= 9 and head[8:9] == b"{":
        (header_len,) = struct.unpack("<Q", head[:8])
        if header_len + 8 <= size or path.endswith(SAFETENSORS_EXTENSIONS):
            return "safetensors"
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    if head.startswith(b"\x80"):
        return "pickle"
    if len(head) > 262 and head[257:262] == b"ustar":
        return "tar"
    raise WeightsError(f"{path}: not a PyTorch or safetensors checkpoint "
                       f"(it starts with {head[:16]!r}).")


def _read_safetensors(path: str) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        return load_file(path, device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise WeightsError(f"{path}: unreadable safetensors file (truncated or corrupt?): {e}") from None


def _read_torch(path: str, kind: str):
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=(kind == "zip"))
    except pickle.UnpicklingError as e:
        if "Unsupported global" in str(e) or "Weights only load failed" in str(e):
            raise WeightsError(_refusal(path, kind, str(e))) from None
        raise WeightsError(f"{path}: corrupt pickle data ({e}).") from None
    except Exception as e:  # noqa: BLE001 - torch raises many kinds for a damaged file
        what = str(e).split(". ")[0].splitlines()[0] if str(e) else type(e).__name__
        raise WeightsError(f"{path}: truncated or corrupt PyTorch file ({what}).") from None


def _refusal(path: str, kind: str, message: str) -> str:
    """Says which object the file wanted to create, where it sits, and how to re-save the file."""
    names = sorted(set(_unsafe_globals_in(message)))
    if kind == "zip":
        try:
            allowed = {_qualname(g) for g in SAFE_GLOBALS}
            names = sorted(set(names) | (set(torch.serialization.get_unsafe_globals_in_checkpoint(path)) - allowed))
        except Exception:  # noqa: BLE001 - a diagnosis only; the refusal stands either way
            pass
    where = _locate(path, kind, set(names))
    shown = ", ".join(f"{n} (at {where[n]})" if n in where else n for n in names) or "an object"
    return (f"{path}: refused to load {shown}: weights files may hold only tensors, containers, "
            f"numbers, strings, argparse.Namespace and numpy scalars, because loading anything "
            f"else can run code. {RESAVE_HINT}")


def _unsafe_globals_in(message: str) -> list:
    out = []
    for part in message.split("GLOBAL ")[1:]:
        out.append(part.split()[0])
    return out


def _qualname(g) -> str:
    if isinstance(g, tuple):
        return g[1]
    return f"{g.__module__}.{g.__qualname__}"


# Where a refused object sits: unpickle again with every global replaced by an inert stand-in.
class _StandIn:
    """Takes the place of any global while probing; records nothing but its name and contents."""
    qualname = "?"

    def __new__(cls, *args, **kwargs):
        self = object.__new__(cls)
        self.contents = {}
        return self

    def __init__(self, *args, **kwargs):
        self.contents.update({f"[{i}]": a for i, a in enumerate(args)})

    def __setstate__(self, state):
        self.contents["state"] = state

    def __setitem__(self, key, value):
        self.contents[key] = value

    def append(self, value):
        self.contents[f"[{len(self.contents)}]"] = value

    def extend(self, values):
        for v in values:
            self.append(v)


class _Probe(pickle.Unpickler):
    def find_class(self, module, name):
        return type("StandIn", (_StandIn,), {"qualname": f"{module}.{name}"})

    def persistent_load(self, pid):
        return None


def _locate(path: str, kind: str, names: set) -> dict:
    """``{global name: dotted place in the file}`` for the first place each name appears."""
    try:
        if kind == "zip":
            with zipfile.ZipFile(path) as z:
                pkl = next(n for n in z.namelist() if n.endswith("/data.pkl") or n == "data.pkl")
                with z.open(pkl) as f:
                    obj = _Probe(f).load()
        elif kind == "pickle":
            with open(path, "rb") as f:
                for _ in range(3):  # magic number, protocol version, system info
                    _Probe(f).load()
                obj = _Probe(f).load()
        else:
            return {}
    except Exception:  # noqa: BLE001 - a diagnosis only
        return {}
    found = {}

    def walk(node, where):
        if isinstance(node, _StandIn):
            if node.qualname in names and node.qualname not in found:
                found[node.qualname] = where or "<top level>"
            items = node.contents.items()  # e.g. an OrderedDict's entries, a call's arguments
        elif isinstance(node, dict):
            items = node.items()
        elif isinstance(node, (list, tuple)):
            items = [(f"[{i}]", v) for i, v in enumerate(node)]
        else:
            return
        for key, value in items:
            key = str(key)
            sub = f"{where}{key}" if key.startswith("[") else (f"{where}.{key}" if where else key)
            walk(value, sub)

    walk(obj, "")
    return found


def write(flat: dict, path: str) -> None:
    """Writes ``{name: tensor}``: safetensors for ``.safetensors``, else ``torch.save``."""
    path = os.fspath(path)
    tensors = {k: v.detach().cpu().contiguous() for k, v in flat.items()}
    if path.endswith(SAFETENSORS_EXTENSIONS):
        from safetensors.torch import save_file
        save_file({k: v.clone() for k, v in tensors.items()}, path)  # no shared storage
    else:
        torch.save(tensors, path)
