"""Inert stand-ins for the classes a pickle names but may not create, and what they serve.

``pickle_module`` gives ``torch.load`` an unpickler that returns an allow-listed global or a
``StandIn`` for any other name: a stand-in stores its arguments and state and runs nothing, and
the original class, its constructor, ``__setstate__`` or ``__reduce__`` callable is never even
looked up (``model.weights.stub_objects``). ``globals_in`` lists the names a pickle refers to by
reading its opcodes; ``locate`` says where in the file each sits, for refusal messages.
``modules_as_dicts`` turns the module stand-ins of a whole pickled model or a TorchScript
archive into their state dicts (``io``).
"""
import pickle
import pickletools
import types
import zipfile

from fpipe.weights import walk
from fpipe.weights.errors import WeightsError


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


def pickle_module(allowed: dict) -> types.ModuleType:
    """A ``pickle_module`` for ``torch.load``: globals in ``allowed`` ({name: object}) are built,
    every other one is a ``StandIn``."""

    class Unpickler(pickle.Unpickler):
        def find_class(self, module, name):
            full = f"{module}.{name}"
            return allowed[full] if full in allowed else stand_in(full)

    module = types.ModuleType("fpipe_stub_pickle")
    module.Unpickler = Unpickler
    module.load = lambda f, **kwargs: Unpickler(f, **kwargs).load()
    return module


def children(node):
    """``walk`` children that also look inside stand-ins (their arguments and state)."""
    if isinstance(node, StandIn):
        return node.contents.items()
    return walk.container_items(node)


def modules_as_dicts(obj, _depth=0, _memo=None):
    """``obj`` with every stand-in for a module replaced by a dict of its parameters, persistent
    buffers and submodules (``_members``), so its tensors have their state_dict names: a whole
    pickled model (``torch.save(model)``) or a TorchScript archive's module tree. Other stand-ins
    stay; shared parts are converted once; depth is bounded as ``walk``'s."""
    memo = {} if _memo is None else _memo
    if id(obj) in memo:
        return memo[id(obj)]
    if _depth > walk.MAX_DEPTH:
        raise WeightsError(f"nested deeper than {walk.MAX_DEPTH} levels")
    members = _members(obj) if isinstance(obj, StandIn) else obj if isinstance(obj, dict) else None
    if members is None:
        return obj
    out = memo[id(obj)] = {}
    out.update({k: modules_as_dicts(v, _depth + 1, memo) for k, v in members.items() if v is not None})
    return out


def _members(module: StandIn):
    """A module stand-in's members by name, or None (no module): a pickled ``nn.Module``'s state
    holds them in ``_parameters``, ``_buffers`` (less the non-persistent ones) and ``_modules``; a
    TorchScript module's (``__torch__.*``) state is its attributes."""
    state = module.contents.get("state")
    if not isinstance(state, dict):
        return None
    if all(isinstance(state.get(k), dict) for k in ("_modules", "_parameters")):
        skip = _non_persistent(state.get("_non_persistent_buffers_set"))
        buffers = {k: v for k, v in (state.get("_buffers") or {}).items() if k not in skip}
        return {**state["_parameters"], **buffers, **state["_modules"]}
    return state if module.qualname.startswith("__torch__.") else None


def _non_persistent(names) -> set:
    """The names in a pickled ``set`` (a stand-in holding its list), or none."""
    items = names.contents.get("[0]") if isinstance(names, StandIn) else names
    return set(items) if isinstance(items, (list, tuple, set)) else set()


def stubbed(obj) -> dict:
    """``{replaced global: first place}`` of the stand-ins in a loaded object."""
    found = {}
    for where, value in walk.entries(obj, children):
        if isinstance(value, StandIn) and value.qualname not in found:
            found[value.qualname] = where
    return found


def globals_in(path: str, kind: str) -> set:
    """Every global name the file's main pickle refers to, by reading its opcodes (runs nothing)."""
    with _main_pickle(path, kind) as f:
        return _scan_globals(f) if f is not None else set()


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


class _Probe(pickle.Unpickler):
    """Unpickles with every global replaced by a stand-in, to say where a refused object sits."""

    def find_class(self, module, name):
        return stand_in(f"{module}.{name}")

    def persistent_load(self, pid):
        return None


def locate(path: str, kind: str, names: set) -> dict:
    """``{global name: dotted place in the file}`` for the first place each name appears."""
    try:
        with _main_pickle(path, kind) as f:
            if f is None:
                return {}
            obj = _Probe(f).load()
        return {n: w or "<top level>" for n, w in stubbed({"": obj}).items() if n in names}
    except Exception:  # noqa: BLE001 - a diagnosis only
        return {}


class _main_pickle:
    """The file object positioned at a torch file's main pickle (None for other kinds)."""

    def __init__(self, path: str, kind: str):
        self.path, self.kind, self.closers = path, kind, []

    def __enter__(self):
        if self.kind == "zip":
            z = zipfile.ZipFile(self.path)
            self.closers.append(z)
            pkl = next(n for n in z.namelist() if n.endswith("/data.pkl") or n == "data.pkl")
            f = z.open(pkl)
        elif self.kind == "pickle":
            f = open(self.path, "rb")
            for _ in range(3):  # magic number, protocol version, system info
                for _ in pickletools.genops(f):
                    pass
        else:
            return None
        self.closers.append(f)
        return f

    def __exit__(self, *exc):
        for c in reversed(self.closers):
            c.close()
