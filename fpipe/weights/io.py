"""Reading and writing weight files safely: no code in a file is ever run.

PyTorch files go through ``torch.load(weights_only=True)`` with a short allow-list of harmless
globals that real checkpoints carry (``argparse.Namespace``, numpy scalars and dtypes);
``.safetensors`` files through the safetensors package; other pickles (detectron2's ``.pkl``)
through an unpickler that builds numpy arrays and containers only; ``.npz`` archives (JAX/Flax)
through ``numpy.load(allow_pickle=False)``, then into PyTorch's layouts (``flax_layout``);
TorchScript archives (OpenAI's CLIP ``.pt``) through the same loader with inert stand-ins for
their classes, so their tensors come out and their code is never loaded. The kind of file is sniffed
from its bytes, never from its name. Every failure is one ``WeightsError`` that names the file
and says whether it is corrupt or refused, and why.

``stub_objects=True`` (``model.weights.stub_objects``) reads a file that holds other libraries'
objects (mmengine's ``HistoryBuffer`` in OpenMMLab training checkpoints): each such class is
replaced by an inert ``stubs.StandIn`` while loading, so only tensors and plain values come out.
"""
import argparse
import contextlib
import os
import pickle
import re
import struct
import zipfile

import numpy as np
import torch

from fpipe.weights import flax_layout, folders, numpy_pickle, stubs, walk
from fpipe.weights.errors import WeightsError

SAFETENSORS_EXTENSIONS = (".safetensors",)
MAX_NPZ_INFLATION = 100  # unpacked / file size above which an .npz that unpacks to over
MIN_NPZ_REFUSED = 1 << 30  # this many bytes is refused (a decompression bomb)
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
    """Returns what the file holds (usually a nested dict with tensors at the leaves); for a
    Hugging Face model folder, its weights file, or its shards merged (``folders``)."""
    paths = folders.weight_files(os.fspath(path))
    if len(paths) == 1:
        return _read_file(paths[0], stub_objects)
    merged = {}
    for shard in paths:
        part = _read_file(shard, stub_objects)
        if not isinstance(part, dict):
            raise WeightsError(f"{shard}: a shard holds a {type(part).__name__}, not a dict of named tensors.")
        clash = sorted(map(str, merged.keys() & part.keys()))
        if clash:
            raise WeightsError(f"{shard}: holds {', '.join(clash[:3])} again (read from an earlier shard).")
        merged.update(part)
    return merged


def _read_file(path: str, stub_objects: bool):
    kind = sniff(path)
    if kind == "safetensors":
        return _read_safetensors(path)
    if kind == "numpy_pickle":
        return numpy_pickle.read(path)
    if kind == "npz":
        return _read_npz(path)
    if kind == "torchscript":
        return _read_torchscript(path)
    return _read_torch(path, kind, stub_objects)


def sniff(path: str) -> str:
    """'safetensors', 'zip' (torch >= 1.6), 'torchscript' (torch.jit.save), 'npz' (numpy's zip of
    arrays: JAX/Flax), 'pickle' (older torch), 'numpy_pickle' (a plain pickle, as detectron2
    writes) or 'tar' (oldest torch), by content; else a WeightsError."""
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
        return _zip_kind(path)
    if head.startswith(b"\x80"):
        return "pickle" if TORCH_MAGIC in head[:16] else "numpy_pickle"
    if len(head) > 262 and head[257:262] == b"ustar":
        return "tar"
    raise WeightsError(f"{path}: not a PyTorch, safetensors or pickle weights file "
                       f"(it starts with {head[:16]!r}).")


def _zip_kind(path: str) -> str:
    """'npz' (a zip of ``.npy`` arrays: numpy's ``savez``), 'torchscript' (``torch.jit.save``: its
    ``constants.pkl`` beside ``data.pkl``) or 'zip' (``torch.save``)."""
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError):
        return "zip"  # torch's reader says what is wrong with it
    if names and all(n.endswith(".npy") for n in names):
        return "npz"
    return "torchscript" if any(n.split("/")[-1] == "constants.pkl" for n in names) else "zip"


def _read_torchscript(path: str) -> dict:
    """A TorchScript archive's tensors by attribute path (its state_dict names), read with stand-ins
    for its classes: its code is never loaded or run (``torch.load`` refuses such archives under
    ``weights_only``; torch.jit.load would run them)."""
    try:
        with open(path, "rb") as f, torch.serialization._open_zipfile_reader(f) as reader:
            root = torch.serialization._load(reader, "cpu", stubs.pickle_module(allowed_globals()))
    except Exception as e:  # noqa: BLE001 - torch raises many kinds for a damaged archive
        cause = _cause(str(e)) or type(e).__name__
        raise WeightsError(f"{path}: truncated or corrupt TorchScript archive ({cause}).") from None
    return stubs.modules_as_dicts(root)


def _read_npz(path: str) -> dict:
    """A JAX/Flax ``.npz`` (arrays only: numpy refuses pickled objects here), in PyTorch's layouts."""
    with zipfile.ZipFile(path) as z:
        infos = z.infolist()
    if len(infos) > walk.MAX_ENTRIES:
        raise WeightsError(f"{path}: refused: {len(infos)} arrays, over the limit of {walk.MAX_ENTRIES}.")
    unpacked, packed = sum(i.file_size for i in infos), max(os.path.getsize(path), 1)
    if unpacked > MAX_NPZ_INFLATION * packed and unpacked > MIN_NPZ_REFUSED:
        raise WeightsError(f"{path}: refused: its arrays would unpack to {unpacked >> 20} MiB from "
                           f"{packed >> 20} MiB (a decompression bomb?).")
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
    except ValueError as e:
        raise WeightsError(f"{path}: refused: an .npz may hold only arrays, not pickled objects ({e}).") from None
    except (OSError, zipfile.BadZipFile, EOFError) as e:
        raise WeightsError(f"{path}: truncated or corrupt .npz file ({e}).") from None
    return flax_layout.to_torch(arrays)


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
                return stubs.modules_as_dicts(torch.load(
                    source, map_location="cpu", weights_only=False, pickle_module=stubs.pickle_module(allowed_globals()),
                    mmap=mmap))
            stack.enter_context(torch.serialization.safe_globals(SAFE_GLOBALS))
            return torch.load(source, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        if not unsafe_globals_in(str(e)):
            raise WeightsError(f"{path}: corrupt PyTorch file ({_cause(str(e))}).") from None
        raise WeightsError(_refusal(path, kind, str(e))) from None
    except Exception as e:  # noqa: BLE001 - torch raises many kinds for a damaged file
        raise WeightsError(f"{path}: truncated or corrupt PyTorch file ({_cause(str(e)) or type(e).__name__}).") from None


def _cause(message: str) -> str:
    """The unpickler's own complaint, without torch's advice around it."""
    if "WeightsUnpickler error:" in message:
        message = message.split("WeightsUnpickler error:", 1)[1]
    return message.strip().split(". ")[0].splitlines()[0] if message.strip() else ""


def _refusal(path: str, kind: str, message: str) -> str:
    """Says which object the file wanted to create, where it sits, and what to do instead."""
    names = set(unsafe_globals_in(message))
    try:
        names |= stubs.globals_in(path, kind) - set(allowed_globals())
    except Exception:  # noqa: BLE001 - a diagnosis only; the refusal stands either way
        pass
    names = sorted(names)
    where = stubs.locate(path, kind, set(names))
    shown = ", ".join(f"{n} (at {where[n]})" if n in where else n for n in names[:8]) or "an object"
    more = f" and {len(names) - 8} more" if len(names) > 8 else ""
    whole = (" It is a whole pickled model (torch.save(model)); its tensors come out under their state_dict "
             "names." if any(n.startswith("torch.nn.modules.") for n in names) else "")
    return (f"{path}: refused to load {shown}{more}: weights files may hold only tensors, containers, "
            f"numbers, strings, argparse.Namespace and numpy scalars, because creating anything "
            f"else can run code.{whole} {STUB_HINT}")


def unsafe_globals_in(message: str) -> list:
    """The dotted global names torch's refusal message mentions (none for a corrupt file)."""
    out = []
    for part in message.split("GLOBAL ")[1:]:
        name = part.split()[0] if part.split() else ""
        if _DOTTED.match(name):
            out.append(name)
    return out


def allowed_globals() -> dict:
    """``{name: object}`` that ``torch.load(weights_only=True)`` builds here: torch's own and SAFE_GLOBALS."""
    from torch._weights_only_unpickler import _get_allowed_globals
    allowed = dict(_get_allowed_globals())
    allowed.update({_qualname(g): g[0] if isinstance(g, tuple) else g for g in SAFE_GLOBALS})
    return allowed


def _qualname(g) -> str:
    if isinstance(g, tuple):
        return g[1]
    return f"{g.__module__}.{g.__qualname__}"


def write(flat: dict, path: str) -> None:
    """Writes ``{name: tensor}``: safetensors for ``.safetensors``, else ``torch.save``; into a
    temporary sibling renamed onto ``path`` (fpipe.files.atomic_write), so a failed or interrupted
    write leaves ``path`` as it was, and tensors still mapped from a file of that name stay whole."""
    from fpipe import files
    path = os.fspath(path)
    tensors = {k: v.detach().cpu().contiguous() for k, v in flat.items()}
    if path.endswith(SAFETENSORS_EXTENSIONS):
        from safetensors.torch import save
        blob = save({k: v.clone() for k, v in tensors.items()})  # no shared storage
        files.atomic_write(path, lambda f: f.write(blob))
    else:
        files.atomic_write(path, lambda f: torch.save(tensors, f))
