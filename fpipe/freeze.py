"""Freezing by partition: regex rules over dotted names split params into trainable and frozen.

Only ``trainable`` is differentiated and owns optimizer state. Norm layers whose scale is frozen
run with their running statistics and keep them unchanged (VISSL / detectron2 semantics).
Rules are full-match regexes; three words stand for VISSL's conveniences: ``trunk`` (freeze the
trunk only: linear evaluation), ``heads``, and ``all`` (trunk and heads: feature extraction).
"""
import re

from fpipe import tree

ALIASES = {"trunk": r"trunk\..*", "heads": r"heads\..*", "all": r".*"}


def rules(freeze):
    """Expands aliases and checks every rule compiles; returns a tuple of regexes."""
    if isinstance(freeze, str):
        freeze = (freeze,)
    out = []
    for rule in freeze or ():
        rule = ALIASES.get(rule, rule)
        try:
            re.compile(rule)
        except re.error as e:
            raise ValueError(f"model.freeze rule {rule!r} is not a valid regex: {e}") from None
        out.append(rule)
    return tuple(out)


def partition(params, freeze):
    """``(trainable, frozen)`` trees; ``tree.merge(trainable, frozen)`` gives ``params`` back.

    A rule that matches nothing is an error (a typo would silently train what should be frozen).
    """
    regexes = rules(freeze)
    names = list(tree.flatten(params))
    for r in regexes:
        if not any(re.fullmatch(r, n) for n in names):
            raise ValueError(f"model.freeze rule {r!r} matches no parameter; names look like "
                             f"{names[:3]} … {names[-2:]}")
    frozen, trainable = tree.partition(params, regexes)
    return trainable, frozen


def frozen_by_rules(params, value_rules):
    """Exact-name regexes of the params whose FIRST matching ``(regex, value)`` rule has value
    None: big_vision's way to freeze inside a per-parameter policy (e.g. ``optim.lr_mults``)."""
    marker = object()
    return tuple(re.escape(n) for n in tree.flatten(params)
                 if tree.first_match(n, [(r, marker if v is None else v) for r, v in value_rules]) is marker)


def eval_norms(state, frozen, trainable=None):
    """Dotted names of norm layers with running statistics whose scale (``.weight``) is frozen. A
    layer without params (``affine=False``, MAE's probe) follows the module around it: frozen when
    that module's params (``trainable`` tells which are not) are all frozen."""
    frozen_names = set(tree.flatten(frozen))
    trainable_names = set(tree.flatten(trainable)) if trainable is not None else None
    layers = {n.rsplit(".", 1)[0] for n in tree.flatten(state) if n.endswith(".running_mean")}

    def frozen_layer(layer):
        own = {f"{layer}.weight", f"{layer}.bias"}
        if own & frozen_names or trainable_names is None or own & trainable_names:
            return bool(own & frozen_names)
        parent = layer.rsplit(".", 1)[0] + "."
        return (any(n.startswith(parent) for n in frozen_names)
                and not any(n.startswith(parent) for n in trainable_names))

    return frozenset(l for l in layers if frozen_layer(l))
