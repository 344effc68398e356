"""Nested-dict ("pytree") helpers: the vocabulary of fpipe.

A tree is a nested ``dict`` with string keys and tensors (or other leaves) at the bottom.
Leaves are addressed by dotted names (``trunk.layer1.0.conv1.weight``), the same names that
torchvision's ``state_dict`` uses, so every per-parameter policy is a regex over these names.
This module imports nothing from fpipe.
"""
import difflib
import re
from typing import Any, Callable, Iterable, Sequence

SEP = "."


def flatten(tree: dict, prefix: str = "") -> dict:
    """Returns ``{dotted_name: leaf}`` in insertion order; empty sub-dicts vanish."""
    out = {}
    for key, value in tree.items():
        key = str(key)
        name = f"{prefix}{SEP}{key}" if prefix else key
        if isinstance(value, dict):
            out.update(flatten(value, name))
        else:
            out[name] = value
    return out


def unflatten(flat: dict) -> dict:
    """Inverse of :func:`flatten`: ``{"a.b": x}`` -> ``{"a": {"b": x}}``."""
    tree: dict = {}
    for name, value in flat.items():
        *parents, leaf = name.split(SEP)
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"name {name!r} nests under a leaf at {part!r}")
        if leaf in node:
            raise ValueError(f"duplicate name {name!r}")
        node[leaf] = value
    return tree


def map_leaves(fn: Callable, *trees: dict) -> dict:
    """Applies ``fn(leaf, *other_leaves)`` leafwise over trees of the same structure."""
    first = trees[0]
    out = {}
    for key, value in first.items():
        if isinstance(value, dict):
            out[key] = map_leaves(fn, *(t[key] for t in trees))
        else:
            out[key] = fn(*(t[key] for t in trees))
    return out


def map_with_names(fn: Callable[[str, Any], Any], tree: dict) -> dict:
    """Applies ``fn(dotted_name, leaf)`` to every leaf; keeps the structure."""
    return unflatten({name: fn(name, leaf) for name, leaf in flatten(tree).items()})


def leaves(tree: dict) -> list:
    return list(flatten(tree).values())


def first_match(name: str, rules: Sequence[tuple], default=None, *, full: bool = True):
    """Value of the first ``(regex, value)`` rule whose regex matches ``name`` (fully, by default)."""
    for pattern, value in rules:
        if (re.fullmatch if full else re.search)(pattern, name):
            return value
    return default


def partition(tree: dict, patterns: Iterable[str]) -> tuple:
    """Splits a tree into ``(matched, rest)``: leaves whose name fully matches any regex go left.

    Both halves keep the original nesting, so ``merge(matched, rest) == tree``.
    """
    compiled = [re.compile(p) for p in patterns]
    matched, rest = {}, {}
    for name, leaf in flatten(tree).items():
        (matched if any(c.fullmatch(name) for c in compiled) else rest)[name] = leaf
    return unflatten(matched), unflatten(rest)


def merge(*trees: dict) -> dict:
    """Union of trees with disjoint leaves; order follows the arguments. Overlap is an error."""
    flat: dict = {}
    for tree in trees:
        for name, leaf in flatten(tree).items():
            if name in flat:
                raise ValueError(f"merge: {name!r} is in more than one tree")
            flat[name] = leaf
    return unflatten(flat)


def merge_in_order(reference: dict, *trees: dict) -> dict:
    """Like :func:`merge`, but leaves come out in the order of ``reference``'s names."""
    merged = flatten(merge(*trees))
    order = [n for n in flatten(reference) if n in merged]
    order += [n for n in merged if n not in set(order)]
    return unflatten({n: merged[n] for n in order})


def split_like(flat: dict, *references: dict) -> tuple:
    """Splits a flat ``{dotted name: leaf}`` dict into trees shaped like ``references`` (each leaf
    goes to the reference that has its name, in that reference's order); e.g. a loaded
    ``flatten(params) | flatten(state)`` back into ``(params, state)``."""
    out = []
    for ref in references:
        names = flatten(ref)
        out.append(unflatten({n: flat.get(n, leaf) for n, leaf in names.items()}))
    extra = set(flat) - {n for ref in references for n in flatten(ref)}
    if extra:
        raise ValueError(f"split_like: names in no reference tree: {sorted(extra)[:5]}")
    return tuple(out)


def shaped_like(reference: dict, tree: dict) -> dict:
    """``tree``'s leaves in ``reference``'s nested dicts, empty ones included (``flatten`` drops
    empty dicts, e.g. the statistics of a GroupNorm, which a model may still index)."""
    return {k: shaped_like(v, tree.get(k, {})) if isinstance(v, dict) else tree[k] for k, v in reference.items()}


def get_path(tree: dict, path: str, *, what: str = "tree"):
    """Returns the sub-tree or leaf at a dotted path, with a "did you mean" error."""
    node = tree
    walked = []
    for part in path.split(SEP) if path else []:
        if not isinstance(node, dict) or part not in node:
            keys = list(node) if isinstance(node, dict) else []
            here = SEP.join(walked) or "<top level>"
            hint = difflib.get_close_matches(part, [str(k) for k in keys], n=3)
            msg = f"{what} has no {path!r}: {part!r} is not a key under {here}."
            if hint:
                msg += f" Did you mean {' or '.join(repr(SEP.join(walked + [h])) for h in hint)}?"
            msg += f" Keys there: {', '.join(map(str, keys[:20]))}{' …' if len(keys) > 20 else ''}"
            raise KeyError(msg)
        node = node[part]
        walked.append(part)
    return node


def tree_size(tree: dict) -> int:
    """Number of scalar elements over all tensor leaves."""
    return sum(int(v.numel()) for v in leaves(tree) if hasattr(v, "numel"))
