"""Bounded walks over what a file holds: each container once, a depth limit and a size limit.

A pickle can describe structures whose naive walk never ends or overflows the stack: sub-dicts
shared 2^64 ways in a 2 KB file, a dict that contains itself, thousands of nesting levels. Every
walk over loaded contents in ``fpipe.weights`` goes through ``entries``, so none can hang (the one
rebuild, ``positions_as_keys``, runs after ``check`` and memoises each container).
"""
import torch

from fpipe.weights.errors import WeightsError

MAX_DEPTH = 64            # nesting levels; real checkpoints use fewer than 10
MAX_ENTRIES = 10_000_000  # entries visited; a VISSL checkpoint with optimizer state has ~10^4


def dict_items(node):
    """Children of a dict (the containers that hold named tensors); other values are leaves."""
    return node.items() if isinstance(node, dict) else None


class Index(int):
    """A list or tuple position: joined as ``name[i]``, not ``name.i``."""


def container_items(node):
    """Children of dicts, lists and tuples (positions as ``Index``)."""
    if isinstance(node, dict):
        return node.items()
    if isinstance(node, (list, tuple)):
        return ((Index(i), v) for i, v in enumerate(node))
    return None


def join(where: str, key) -> str:
    if isinstance(key, Index):
        return f"{where}[{int(key)}]"
    return f"{where}.{key}" if where else str(key)


def entries(obj, children=dict_items, *, max_depth: int = MAX_DEPTH, max_entries: int = MAX_ENTRIES):
    """Yields ``(dotted path, value)`` for everything under ``obj``, depth first, in order.

    ``children(node)`` gives a container's ``(key, value)`` pairs, or None for a leaf. A container
    met again (shared) is walked only the first time; one that contains itself, nesting deeper
    than ``max_depth``, or more than ``max_entries`` entries is a ``WeightsError``.
    """
    seen, on_path = set(), set()
    count = 0

    def visit(node, where, depth):
        nonlocal count
        items = children(node)
        if items is None:
            return
        if id(node) in on_path:
            raise WeightsError(f"the contents contain themselves (a cycle at {where or '<top level>'}); "
                               "no weights file is built that way.")
        if id(node) in seen:
            return
        if depth > max_depth:
            raise WeightsError(f"the contents nest deeper than {max_depth} levels (at {where[:80]}…); "
                               "no weights file is built that way.")
        seen.add(id(node))
        on_path.add(id(node))
        for key, value in items:
            count += 1
            if count > max_entries:
                raise WeightsError(f"the contents hold more than {max_entries} entries; "
                                   "no weights file is built that way.")
            path = join(where, key)
            yield path, value
            yield from visit(value, path, depth + 1)
        on_path.discard(id(node))

    yield from visit(obj, "", 0)


def check(obj) -> None:
    """Walks dicts, lists and tuples once: raises ``WeightsError`` on cycles, depth or size."""
    for _ in entries(obj, container_items):
        pass


def positions_as_keys(obj):
    """``obj`` with each list or tuple that holds a dict of tensors (at any depth) turned into a
    dict keyed ``"0"``, ``"1"``, …, so that a state dict saved inside one (``[state_dict]``,
    ``(model, optimizer)``) has dotted names like any other (``0.conv1.weight``); other lists (an
    optimizer's ``param_groups``, numbers, bare tensors) stay values. ``obj`` itself when nothing
    changes. Call after ``check``: each container is looked at once (memoised by id), a shared one
    becomes one shared dict, so this is as bounded as the walk."""
    found = {}

    def has_state(node) -> bool:  # a dict with a tensor in it, here or below
        if not isinstance(node, (dict, list, tuple)):
            return False
        if id(node) not in found:
            found[id(node)] = False  # set first: no container is entered twice
            values = node.values() if isinstance(node, dict) else node
            found[id(node)] = any((isinstance(node, dict) and isinstance(v, torch.Tensor)) or has_state(v)
                                  for v in values)
        return found[id(node)]

    def is_holder(node) -> bool:
        return isinstance(node, (list, tuple)) and has_state(node)

    if not is_holder(obj) and not any(is_holder(v) for _, v in entries(obj, container_items)):
        return obj
    memo = {}

    def convert(node):
        if id(node) in memo:
            return memo[id(node)]
        if isinstance(node, dict):
            out = {k: convert(v) for k, v in node.items()}
        elif is_holder(node):
            out = {str(i): convert(v) for i, v in enumerate(node)}
        else:
            return node
        memo[id(node)] = out
        return out

    return convert(obj)
