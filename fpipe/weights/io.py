"""Reading and writing weight files safely: no code in a file is ever run.

PyTorch files go through ``torch.load(weights_only=True)`` with a short allow-list of harmless
globals that real checkpoints carry (``argparse.Namespace``, numpy scalars and dtypes);
``.safetensors`` files through the safetensors package; other pickles (detectron2's ``.pkl``)
through an unpickler that builds numpy arrays and containers only. The kind of file is sniffed
from its bytes, never from its name. Every failure is one ``WeightsError`` that names the file
and says whether it is corrupt or refused, and why.

``stub_objects=True`` (``model.weights.stub_objects``) reads a file that holds other libraries'
objects (mmengine's ``HistoryBuffer`` in OpenMMLab training checkpoints): each such class is
replaced by an inert ``StandIn`` before loading, so only the tensors and plain values come out.
"""
import argparse
import contextlib
import os
import pickle
import pickletools
import re
import struct
import types
import zipfile

import numpy as np
import torch

from fpipe.weights import walk
from fpipe.weights.errors import WeightsError

SAFETENSORS_EXTENSIONS = (".safetensors",)
STUB_HINT = ("To take only its tensors, with every other object replaced by an inert stand-in "
             "(nothing from the file runs), set model.weights.stub_objects=True "
             "(CLI: --stub-objects).")
TORCH_MAGIC = (0x1950A86A20F9469CFC6C).to_bytes(10, "little")  # first pickle of a pre-1.6 torch file
_DOTTED = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)+$")


def _numpy_globals() -> list:
    """numpy scalars and dtypes, under numpy 2 names and the ``numpy.core`` names of older files."""
    scalar = np.array(0.0)[()].__reduce__()[0]  # numpy._core.multiarray.scalar
    dtype_classes = [getattr(np.dtypes, n) for n in dir(np.dtypes)
                     if n.endswith("DType") and n != "ObjectDType"]  # object dtypes hold pickles
    return [scalar, (scalar, "numpy.core.multiarray.scalar"), np.dtype, *dtype_classes]


SAFE_GLOBALS = [argparse.Namespace, *_numpy_globals()]


def read(path: str, *, stub_objects: bool = False):
    """Returns what the file holds (usually a nested dict with tensors at the leaves)."""
    path = os.fspath(path)
    kind = sniff(path)
    if kind == "safetensors":
        return _read_safetensors(path)
    if kind == "numpy_pickle":
        return _read_numpy_pickle(path)
    return _read_torch(path, kind, stub_objects)


def sniff(path: str) -> str:
    """'safetensors', 'zip' (torch >= 1.6), 'pickle' (older torch), 'numpy_pickle' (a plain
    pickle, as detectron2 writes) or 'tar' (oldest torch), by content; else a WeightsError."""
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
        if header_len + 8 <= size:
            return "safetensors"
        raise WeightsError(f"{path}: truncated or corrupt safetensors file (its header claims "
                           f"{header_len} bytes, the file has {size}).")
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    if head.startswith(b"\x80"):
        return "pickle" if TORCH_MAGIC in head[:16] else "numpy_pickle"
    if len(head) > 262 and head[257:262] == b"ustar":
        return "tar"
    raise WeightsError(f"{path}: not a PyTorch, safetensors or pickle weights file "
                       f"(it starts with {head[:16]!r}).")


def _read_safetensors(path: str) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        return load_file(path, device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise WeightsError(f"{path}: unreadable safetensors file (truncated or corrupt?): {e}") from None


def _read_torch(path: str, kind: str, stub_objects: bool):
    # torch.load takes a path ending in .safetensors for a safetensors file; a file object does
    # not get that guess (and then cannot be memory-mapped).
    by_name = not path.endswith(SAFETENSORS_EXTENSIONS)
    mmap = kind == "zip" and by_name
    try:
        with contextlib.ExitStack() as stack:
            source = path if by_name else stack.enter_context(open(path, "rb"))
            if stub_objects:
                return torch.load(source, map_location="cpu", weights_only=False, pickle_module=_stub_pickle(),
                                  mmap=mmap)
            stack.enter_context(torch.serialization.safe_globals(SAFE_GLOBALS))
            return torch.load(source, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        if not unsafe_globals_in(str(e)):
            raise WeightsError(f"{path}: corrupt PyTorch file ({_cause(str(e))}).") from None
        raise WeightsError(_refusal(path, kind, str(e))) from None
    except Exception as e:  # noqa: BLE001 - torch raises many kinds for a damaged file
        raise WeightsError(f"{path}: truncated or corrupt PyTorch file ({_cause(str(e)) or type(e).__name__}).") from None


def _stub_pickle() -> types.ModuleType:
    """A ``pickle_module`` for ``torch.load`` whose unpickler gives every global outside the
    allow-list (torch's own for ``weights_only`` and SAFE_GLOBALS) as a ``StandIn``: foreign
    constructors, ``__setstate__`` and ``__reduce__`` callables are never looked up, let alone run."""
    from torch._weights_only_unpickler import _get_allowed_globals
    allowed = dict(_get_allowed_globals())
    allowed.update({_qualname(g): g[0] if isinstance(g, tuple) else g for g in SAFE_GLOBALS})

    class Unpickler(pickle.Unpickler):
        def find_class(self, module, name):
            full = f"{module}.{name}"
            return allowed[full] if full in allowed else stand_in(full)

    module = types.ModuleType("fpipe_stub_pickle")
    module.Unpickler = Unpickler
    module.load = lambda f, **kwargs: Unpickler(f, **kwargs).load()
    return module


def _cause(message: str) -> str:
    """The unpickler's own complaint, without torch's advice around it."""
    if "WeightsUnpickler error:" in message:
        message = message.split("WeightsUnpickler error:", 1)[1]
    return message.strip().split(". ")[0].splitlines()[0] if message.strip() else ""


def _refusal(path: str, kind: str, message: str) -> str:
    """Says which object the file wanted to create, where it sits, and what to do instead."""
    names = set(unsafe_globals_in(message))
    try:
        names |= globals_in(path, kind) - allowed_names()
    except Exception:  # noqa: BLE001 - a diagnosis only; the refusal stands either way
        pass
    names = sorted(names)
    where = _locate(path, kind, set(names))
    shown = ", ".join(f"{n} (at {where[n]})" if n in where else n for n in names[:8]) or "an object"
    more = f" and {len(names) - 8} more" if len(names) > 8 else ""
    return (f"{path}: refused to load {shown}{more}: weights files may hold only tensors, containers, "
            f"numbers, strings, argparse.Namespace and numpy scalars, because creating anything "
            f"else can run code. {STUB_HINT}")


def unsafe_globals_in(message: str) -> list:
    """The dotted global names torch's refusal message mentions (none for a corrupt file)."""
    out = []
    for part in message.split("GLOBAL ")[1:]:
        name = part.split()[0] if part.split() else ""
        if _DOTTED.match(name):
            out.append(name)
    return out


def allowed_names() -> set:
    """Globals that ``torch.load(weights_only=True)`` builds here (torch's own and SAFE_GLOBALS)."""
    from torch._weights_only_unpickler import _get_allowed_globals
    return set(_get_allowed_globals()) | {_qualname(g) for g in SAFE_GLOBALS}


def _qualname(g) -> str:
    if isinstance(g, tuple):
        return g[1]
    return f"{g.__module__}.{g.__qualname__}"


def globals_in(path: str, kind: str) -> set:
    """Every global name the file's main pickle refers to, by reading its opcodes (runs nothing)."""
    if kind == "zip":
        with zipfile.ZipFile(path) as z:
            pkl = next(n for n in z.namelist() if n.endswith("/data.pkl") or n == "data.pkl")
            with z.open(pkl) as f:
                return _scan_globals(f)
    if kind == "pickle":
        with open(path, "rb") as f:
            for _ in range(3):  # magic number, protocol version, system info
                for _ in pickletools.genops(f):
                    pass
            return _scan_globals(f)
    return set()


def _scan_globals(f) -> set:
    names, strings, memo = set(), [], {}
    last = None
    for op, arg, _ in pickletools.genops(f):
        if op.name == "GLOBAL":
            names.add(arg.replace(" ", "."))
        elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
            names.add(f"{strings[-2]}.{strings[-1]}")
        elif op.name == "MEMOIZE":
            memo[len(memo)] = last
        elif op.name in ("BINPUT", "LONG_BINPUT", "PUT"):
            memo[arg] = last
        elif op.name in ("BINGET", "LONG_BINGET", "GET") and isinstance(memo.get(arg), str):
            strings.append(memo[arg])
        last = arg if isinstance(arg, str) and "UNICODE" in op.name else None
        if last is not None:
            strings.append(last)
    return names


def _read_numpy_pickle(path: str) -> dict:
    """A plain pickle of numpy arrays in dicts (detectron2's ``.pkl``), with arrays as tensors."""
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
        raise WeightsError(f"{path}: {e}") from None
    return _as_tensors(obj, {})


class _Refused(Exception):
    pass


class _ArraysOnly(pickle.Unpickler):
    """Builds numpy arrays (numpy's own reconstruction) and nothing else that is a global."""
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
    elif isinstance(node, (list, tuple)):
        out = type(node)(_as_tensors(v, memo) for v in node) if type(node) in (list, tuple) else node
    else:
        out = node
    memo[id(node)] = out
    return out


class StandIn:
    """Takes the place of a class the file names but may not create: stores what it is given, runs
    nothing. ``qualname`` is the replaced global's name; ``contents`` the arguments and state."""
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

    def __repr__(self):
        return f"<stand-in for {self.qualname}>"


def stand_in(qualname: str) -> type:
    return type("StandIn", (StandIn,), {"qualname": qualname})


def stand_in_children(node):
    """``walk`` children that also look inside stand-ins (their arguments and state)."""
    if isinstance(node, StandIn):
        return node.contents.items()
    return walk.container_items(node)


def stubbed(obj) -> dict:
    """``{replaced global: first place}`` of the stand-ins in a loaded object."""
    found = {}
    for where, value in walk.entries(obj, stand_in_children):
        if isinstance(value, StandIn) and value.qualname not in found:
            found[value.qualname] = where
    return found


class _Probe(pickle.Unpickler):
    """Unpickles with every global replaced by a stand-in, to say where a refused object sits."""

    def find_class(self, module, name):
        return stand_in(f"{module}.{name}")

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
                    for _ in pickletools.genops(f):
                        pass
                obj = _Probe(f).load()
        else:
            return {}
        return {n: w or "<top level>" for n, w in stubbed({"": obj}).items() if n in names}
    except Exception:  # noqa: BLE001 - a diagnosis only
        return {}


def write(flat: dict, path: str) -> None:
    """Writes ``{name: tensor}``: safetensors for ``.safetensors``, else ``torch.save``."""
    path = os.fspath(path)
    tensors = {k: v.detach().cpu().contiguous() for k, v in flat.items()}
    if path.endswith(SAFETENSORS_EXTENSIONS):
        from safetensors.torch import save_file
        save_file({k: v.clone() for k, v in tensors.items()}, path)  # no shared storage
    else:
        torch.save(tensors, path)
