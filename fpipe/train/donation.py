"""Buffer donation: the loop's train step writes the new state into the tensors of the old one.

A functional step returns new params and optimizer state beside the old ones, so at its peak
both exist (AdamW: params and both moments twice; ViT-S 1.23x the peak of torch.compile'd
nn.Module + torch.optim). Ending the traced step with ``old.copy_(new)`` lets inductor store
each update straight into the old buffer, as an in-place optimizer does, with the same numbers.
Uncompiled, the step donates where SGD or AdamW update in place (``fpipe.train.loop.build_train_step``).

Donation is safe only for tensors no one else holds, so :class:`Donating` overwrites only the
tensors it handed out itself on its previous call; anything else it is given (the first call's
state, which shares tensors with the loaded params; a state that precise BN or a resume
replaced) is copied first, once. The step's result must be used in place of its input: the
input's donated trees are the output's.
"""
import weakref

import torch

from fpipe import tree

DONATED = ("trainable", "opt_state", "model_state")


def writes_into_inputs(step):
    """``step`` that copies its new ``DONATED`` trees into the given ones and returns the train
    state without them (:class:`Donating` puts them back): the part to compile."""
    def run(train_state, batch, hyper):
        new_state, metrics = step(train_state, batch, hyper)
        for key in DONATED:
            _copy_into(train_state.get(key, {}), new_state.get(key, {}))
        return {k: v for k, v in new_state.items() if k not in DONATED}, metrics
    return run


def _copy_into(old, new):
    """Copies each tensor of ``new`` into ``old``'s at the same place; skips a tensor that is the
    same object (an update in place returns its input), which also keeps the compiled trace short.
    Identity is asked of tensors only: dynamo (torch 2.11) cannot trace ``is`` between dicts."""
    if isinstance(old, dict):
        for key, value in old.items():
            _copy_into(value, new[key])
    elif isinstance(old, torch.Tensor) and new is not old:
        old.copy_(new)


class Donating:
    """``step(train_state, batch, hyper) -> (train_state, metrics)`` around ``inner`` (a compiled
    :func:`writes_into_inputs`), handing out the donated trees it was given: its own tensors from
    the last call are overwritten, any other is cloned first."""

    def __init__(self, inner):
        self.inner = inner
        self._handed_out = {}  # id -> weakref of each donated tensor returned by the last call

    def overwrites(self, train_state) -> bool:
        """True when a call on ``train_state`` writes into some of its tensors: a signal must then
        wait for the step's end (fpipe.train.signals); False before the first call (the compile)."""
        return any(self._ours(t) for key in DONATED for t in tree.leaves(train_state.get(key, {})))

    def __call__(self, train_state, batch, hyper):
        seen = set()

        def owned(t):
            if not isinstance(t, torch.Tensor):
                return t
            if not self._ours(t) or id(t) in seen:  # a tensor given twice must not take two updates
                t = t.clone()
            seen.add(id(t))
            return t

        given = {k: tree.map_leaves(owned, train_state[k]) for k in DONATED if k in train_state}
        rest, metrics = self.inner({**train_state, **given}, batch, hyper)
        self._handed_out = {id(t): weakref.ref(t) for trees in given.values() for t in tree.leaves(trees)
                            if isinstance(t, torch.Tensor)}
        return {**train_state, **rest, **given}, metrics  # the input's key order: no new guards

    def _ours(self, t) -> bool:
        ref = self._handed_out.get(id(t))
        return ref is not None and ref() is t


def overwrites(step, train_state) -> bool:
    """Whether ``step`` (a :class:`Donating` or any other step) writes into ``train_state``."""
    return isinstance(step, Donating) and step.overwrites(train_state)
