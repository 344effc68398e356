"""Name transforms over flat ``{dotted name: value}`` dicts, one function per config option.

Each is pure: it returns a new dict and never looks at the values, so the loader runs the same
transforms over ``{name: original name}`` to know where every tensor came from.
"""
import difflib
import re
from typing import Iterable, Sequence

import torch

from fpipe.weights import walk
from fpipe.weights.errors import WeightsError


def tensor_leaves(obj, prefix: str = "") -> dict:
    """``{dotted path: tensor}`` over nested dicts at any depth; other leaves are ignored.

    Bounded (``walk.entries``): a shared sub-dict is read once, cycles and deep nesting are errors.
    """
    if isinstance(obj, torch.Tensor):
        return {prefix or "": obj}
    out = {}
    for name, value in walk.entries(obj):
        if isinstance(value, torch.Tensor):
            out[f"{prefix}.{name}" if prefix else name] = value
    return out


def dict_paths(obj, prefix: str = "") -> list:
    """Dotted paths of every nested dict (the places a ``state_dict_key`` can point to)."""
    return [f"{prefix}.{name}" if prefix else name
            for name, value in walk.entries(obj) if isinstance(value, dict)]


def select(flat: dict, key: str) -> dict:
    """The names under the dotted path ``key``, with ``key.`` removed (VISSL's state_dict_key)."""
    if not key:
        return dict(flat)
    head = key.rstrip(".") + "."
    out = {name[len(head):]: v for name, v in flat.items() if name.startswith(head)}
    if not out:
        tops = sorted({n.split(".")[0] for n in flat})
        prefixes = sorted({".".join(n.split(".")[:i]) for n in flat for i in range(1, 4)})
        hint = difflib.get_close_matches(key, prefixes, n=3)
        msg = f"state_dict_key={key!r}: the file has no tensors under it."
        if hint:
            msg += f" Did you mean {' or '.join(map(repr, hint))}?"
        msg += f" Top-level keys holding tensors: {', '.join(tops[:20]) or 'none'}."
        raise WeightsError(msg)
    return out


def remove_prefix(flat: dict, prefix: str) -> dict:
    """Strips ``prefix`` from the names that start with it; other names are kept as they are."""
    if not prefix:
        return dict(flat)
    return _renamed(flat, lambda n: n[len(prefix):] if n.startswith(prefix) else n)


def append_prefix(flat: dict, prefix: str) -> dict:
    """Puts ``prefix`` in front of every name."""
    if not prefix:
        return dict(flat)
    return {prefix + name: v for name, v in flat.items()}


def rename(flat: dict, rules: Sequence) -> dict:
    """Applies the first ``(regex, replacement)`` rule that matches each name (``re.sub``)."""
    compiled = [(re.compile(pattern), repl) for pattern, repl in rules]
    if not compiled:
        return dict(flat)

    def new_name(name):
        for pattern, repl in compiled:
            if pattern.search(name):
                return pattern.sub(repl, name)
        return name

    return _renamed(flat, new_name)


def skip(flat: dict, patterns: Iterable[str]) -> tuple:
    """Splits into ``(kept, skipped)``; a name is skipped if it contains or regex-matches a pattern."""
    patterns = list(patterns)
    compiled = [re.compile(p) for p in patterns]
    kept, skipped = {}, {}
    for name, v in flat.items():
        hit = any(p in name for p in patterns) or any(c.search(name) for c in compiled)
        (skipped if hit else kept)[name] = v
    return kept, skipped


def _renamed(flat: dict, fn) -> dict:
    out = {}
    for name, v in flat.items():
        new = fn(name)
        if new in out:
            raise WeightsError(f"two names in the file become {new!r} after renaming; "
                               f"choose one copy with state_dict_key or select.")
        out[new] = v
    return out
