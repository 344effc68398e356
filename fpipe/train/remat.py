"""Recompute cheap values in the backward instead of keeping them: the compiled step's peak memory.

fpipe's train step is one graph (forward, ``torch.func``'s backward, the update), so inductor keeps
every value the backward reads from the forward, as autograd saved it: per conv-BatchNorm-SiLU the
conv's output, the BatchNorm's, the SiLU's and its sigmoid. ``torch.compile`` of an nn.Module
gets AOTAutograd's partitioner instead, which recomputes cheap pointwise values in the backward
(EfficientNet-B0, 64 px b32: fpipe's step peaked at 283 MiB of tensors, the compiled module at 143).

This inductor graph pass does the same on the one graph: it finds the point where the most tensor
bytes are alive (in a train step at or after the forward's end), and every pointwise value alive
across it that can be rebuilt from values alive there anyway (or small ones) is rebuilt after it,
right before its first use there, so it dies in the forward. Repeated while the estimated peak falls.
Only forward values are rebuilt, never gradient terms: inductor moves each weight's gradient sum
next to the update that reads it, so gradient terms stay alive across the peak too, and rebuilding
them there fused every layer-scale block's sums of DINOv2's ViT into one kernel that took g++ 7 s
(docs/BENCHMARKS.md, forty-fourth session).

Two modes (``config.compile_remat``): "fused", the default, rebuilds only values that every later
user computes inside its own kernel (pointwise ops, reductions), so the copy is never written to
memory (EfficientNet-B0: 283 -> 168 MiB, no slower than without the pass); "all" also rebuilds
those a convolution, matmul or fallback reads, which must be written again (EfficientNet-B0 112
MiB; ResNet-50 128 px b32 885 -> 578 MiB) for 4-7% of the step on CPU (docs/BENCHMARKS.md,
twenty-sixth session).
"""
import hashlib
import operator
import pathlib

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass

MAX_ROUNDS = 8
MAX_CHAIN = 12  # pointwise ops rebuilt for one value at most
SMALL_BYTES = 1 << 16  # inputs this small may live longer (per-channel statistics, scalars)


def _bytes(val):
    if isinstance(val, torch.Tensor):
        return val.numel() * val.element_size()
    if isinstance(val, (tuple, list)):
        return sum(_bytes(v) for v in val)
    return 0


def _is_view(node):
    return node.op == "call_function" and (
        node.target is operator.getitem
        or (isinstance(node.target, torch._ops.OpOverload) and node.target.is_view))


def _rebuildable(node):
    """A pure pointwise op or a view: cheap to run again, same result (no randomness, no mutation)."""
    if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
        return False
    t = node.target
    if t.is_view:
        return True
    if torch.Tag.pointwise not in t.tags or torch.Tag.nondeterministic_seeded in t.tags:
        return False
    return not t._schema.is_mutable and isinstance(node.meta.get("val"), torch.Tensor)


def _on_gradients(graph):
    """The values computed from the loss's gradient, and so the optimizer's update: those that
    follow from what the backward makes from nothing or from the step's inputs alone (its seed,
    however inductor folded it: into a constant, or into the input a scaled loss is multiplied by;
    its other constants; a weight's transpose). Not those the backward computes from forward values:
    a ReLU's mask, a BatchNorm's centred input. Backward nodes are those traced under autograd's
    grad (dynamo's ``source_fn_stack``); in a graph without that record nothing is marked."""
    marked = set()
    for n in graph.nodes:
        inputs = n.all_input_nodes
        seed = n.op == "call_function" and _in_backward(n) and all(a.op == "placeholder" for a in inputs)
        if seed or any(a in marked for a in inputs):
            marked.add(n)
    return marked


def _in_backward(node):
    return any(entry[0] == "_autograd_grad" for entry in node.meta.get("source_fn_stack") or ())


class Liveness:
    """Each value's birth, death and bytes, in graph order (views and getitems share their base's
    storage, so they extend its life and own no bytes), and the graph's first in-place write."""

    def __init__(self, graph):
        self.nodes = list(graph.nodes)
        self.index = {n: i for i, n in enumerate(self.nodes)}
        self.base = {}
        for n in self.nodes:
            self.base[n] = self.base[n.args[0]] if _is_view(n) and isinstance(n.args[0], torch.fx.Node) else n
        self.death = {}
        for n in self.nodes:
            for user in n.users:
                b = self.base[n]
                self.death[b] = max(self.death.get(b, 0), self.index[user])
        end = len(self.nodes)
        for n in self.nodes:
            if n.op == "placeholder" or any(u.op == "output" for u in n.users):
                self.death[self.base[n]] = end
        # inputs written in place from here on: nothing rebuilt may read them after
        self.first_mutation = next((i for i, n in enumerate(self.nodes)
                                    if n.op == "call_function" and _writes_inputs(n)), end)

    def size(self, node):
        if node.op != "call_function" or self.base[node] is not node or _writes_inputs(node):
            return 0
        return _bytes(node.meta.get("val"))

    def peak(self):
        """(index, bytes) of the most bytes alive at once, placeholders not counted."""
        delta = [0] * (len(self.nodes) + 2)
        for n in self.nodes:
            s = self.size(n)
            if s:
                delta[self.index[n]] += s
                delta[self.death.get(n, self.index[n]) + 1] -= s
        best, cur, at = 0, 0, 0
        for i, d in enumerate(delta):
            cur += d
            if cur > best:
                best, at = cur, i
        return at, best

    def alive_at(self, node, at):
        b = self.base[node]
        return b.op == "placeholder" or self.index[b] <= at < self.death.get(b, -1)


def _plan(node, live, at, chain):
    """The pointwise/view nodes to run again to rebuild ``node`` after ``at`` (appended to
    ``chain`` in order), from values alive at ``at``, placeholders and small values; False if
    it cannot be done within MAX_CHAIN ops."""
    for arg in node.all_input_nodes:
        if arg in chain or arg.op in ("placeholder", "get_attr") or live.alive_at(arg, at):
            continue
        if _bytes(arg.meta.get("val")) <= SMALL_BYTES and not _is_view(arg):  # a view may hold a big base
            continue
        if not _rebuildable(arg) or len(chain) >= MAX_CHAIN or not _plan(arg, live, at, chain):
            return False
    chain.append(node)
    return True


def _writes_inputs(node):
    """An in-place op, or a functionalized one that inductor makes in-place again later (its
    results are its inputs' storage: they own no bytes)."""
    t = node.target
    if isinstance(t, torch._ops.OpOverload):
        return t._schema.is_mutable
    return isinstance(t, torch._ops.HigherOrderOperator) and t.name().startswith("auto_functionalized")


def rematerialize(graph, written=True):
    """Rebuild pointwise values after the memory peak instead of keeping them across it; returns
    (estimated peak bytes before, after). ``written``: also values that a later user needs in memory
    (a convolution's input: the copy is written again), not only those its users' kernels compute."""
    live = Liveness(graph)
    at, peak = live.peak()
    first = peak
    on_gradients = _on_gradients(graph)  # the copies added below are of forward values: never among them
    for _ in range(MAX_ROUNDS):
        # (views own no bytes: only the values themselves cross)
        crossing = [n for n in live.nodes if live.size(n) and _rebuildable(n) and live.alive_at(n, at)
                    and n not in on_gradients]
        changed = False
        for node in sorted(crossing, key=lambda n: -live.index[n]):  # later first: their copies read earlier ones
            later = [u for u in _users_through_views(node, keep_views=True) if live.index.get(u, -1) > at]
            uses = [live.index[u] for u in later]
            if not uses or max(uses) >= live.first_mutation:
                continue
            if not written and not all(_computes_inputs(u) for u in later if not _is_view(u)):
                continue
            chain = []
            if not _plan(node, live, at, chain):
                continue
            before = live.nodes[min(uses)]
            copies = {}
            with graph.inserting_before(before):
                for n in chain:
                    copies[n] = graph.node_copy(n, lambda a: copies.get(a, a))
                _rewire(graph, node, copies[node], live, at)
            changed = True
            live = Liveness(graph)  # the copies sit after ``at``: its index holds
        if not changed:
            break
        at, now = live.peak()
        if now >= peak:
            break
        peak = now
    graph.eliminate_dead_code()  # the originals that only the rebuilt uses read
    return first, Liveness(graph).peak()[1]


def _rewire(graph, node, copy, live, at):
    """Users of ``node`` after ``at`` read ``copy``; views of ``node`` with such users get
    copies of their own on ``copy`` (the graph's insertion point is before the first such use)."""
    for u in list(node.users):
        if live.index.get(u, -1) > at:
            u.replace_input_with(node, copy)
        elif u in live.index and _is_view(u) and any(live.index.get(w, -1) > at for w in _users_through_views(u)):
            _rewire(graph, u, graph.node_copy(u, lambda a: copy if a is node else a), live, at)


def _computes_inputs(user):
    """Inductor computes a pointwise input of ``user`` inside the user's own kernel, never writing
    it to memory; not for the ops it hands buffers in memory (convolutions, matmuls, pooling,
    fallbacks to ATen or custom ops: ``lowering.needs_realized_inputs`` or no lowering at all)."""
    from torch._inductor import lowering  # lazily: a heavy import that only a compile needs
    t = user.target
    if user.op != "call_function":
        return False
    if not isinstance(t, torch._ops.OpOverload):
        return t is operator.getitem
    realized = lowering.needs_realized_inputs
    return t in lowering.lowerings and t not in realized and t.overloadpacket not in realized


def _users_through_views(node, keep_views=False):
    out = []
    for u in node.users:
        if _is_view(u):
            out.extend([u] * keep_views + _users_through_views(u, keep_views))
        else:
            out.append(u)
    return out


class Rematerialize(CustomGraphPass):
    """``rematerialize`` as an inductor post-grad pass (``torch.compile(options=options(mode))``)."""

    def __init__(self, written=True):
        self.written = written

    def __call__(self, graph):
        rematerialize(graph, self.written)
        graph.lint()

    def uuid(self):  # inductor's cache key: this file and the mode
        return hashlib.sha256(pathlib.Path(__file__).read_bytes() + repr(self.written).encode()).hexdigest()


MODES = {"fused": Rematerialize(written=False), "all": Rematerialize(written=True), "off": None}


def options(mode: str):
    """The inductor options for ``config.compile_remat`` (None for "off")."""
    if mode not in MODES:
        raise ValueError(f"unknown compile_remat {mode!r}; valid: {tuple(MODES)}")
    return None if MODES[mode] is None else {"post_grad_custom_post_pass": MODES[mode]}
