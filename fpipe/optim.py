"""Pure optimizers over trees (SGD, AdamW, LARS), per-parameter rules by name, gradient clipping.

``build(cfg, trainable)`` resolves every rule once, to Python floats per dotted name. ``init`` and
``update`` are then pure tensor functions: they never modify their inputs, never read a tensor's
value into Python, and take the lr and the other numbers (weight decay, momentum, AdamW's betas
and eps, LARS's eta, the gradient clipping's bound) as 0-d tensors (``opt.inputs(lr)``), so one
compiled train step serves a whole schedule and a sweep over those values. Whether a param decays,
whether there is a momentum buffer and whether grads are clipped (a value of 0 or not) stay fixed
at build time: they decide the update's shape.
The in-place update with PyTorch's fused kernels (``update(..., in_place=True)``) also takes each
param's lr and weight decay multipliers and Nesterov as tensors (``opt.inputs``): one compiled
step serves any ``lr_mults``, ``wd_mults`` and ``nesterov``.
Only the trainable tree is given: frozen params own no optimizer state.

    opt = build(config.optim, trainable)
    opt_state = opt.init(trainable)
    hyper = opt.inputs(lr)
    grads, grad_norm = opt.clip_and_norm(grads, hyper)
    params, opt_state = opt.update(grads, opt_state, params, hyper)
"""
import math
import re

import torch

from fpipe import defaults, fused_update, layer_decay
from fpipe.defaults import BIAS, EMBEDDING, NORM_WEIGHT, NO_DECAY, NO_LARS  # noqa: F401 (re-exported)
from fpipe.tree import first_match, flatten, leaves, map_leaves, unflatten

default_config = defaults.optim  # the config.optim keys and their help: fpipe/defaults.py
_DEFAULTS = default_config()


def _get(cfg, key):
    return cfg[key] if key in cfg else _DEFAULTS[key]


def scaled_lr(cfg, global_batch_size: int) -> tuple:
    """Returns ``(lr, message)``: the base lr, times global_batch / reference_batch if scale_lr."""
    base, scale = float(_get(cfg, "lr")), _get(cfg, "scale_lr")
    if not isinstance(scale, bool):
        raise ValueError(f"optim.scale_lr must be True or False (linear scaling), got {scale!r}")
    if not scale:
        return base, f"lr {base:g} (optim.scale_lr off; global batch {global_batch_size})"
    ref = _get(cfg, "reference_batch_size")
    if global_batch_size <= 0 or ref <= 0:
        raise ValueError(f"batch sizes must be positive: global {global_batch_size}, reference {ref}")
    lr = base * global_batch_size / ref
    return lr, (f"lr {lr:g} = {base:g} x {global_batch_size}/{ref} "
                "(linear scaling: optim.lr x global batch / optim.reference_batch_size)")


def global_norm(tree: dict) -> torch.Tensor:
    """L2 norm over all leaves (in float32 at least), as a 0-d tensor; 0 for an empty tree.

    One ``_foreach_norm`` where the leaves share a device and float type, except in a step compiled
    for the CPU: there inductor has no lowering for it and calls ATen's per-leaf kernels, 2.8x
    slower than its own reductions of the per-leaf norms (ResNet-18's grads: 3.8 ms, 7% of a 32 px
    step; docs/BENCHMARKS.md, twenty-seventh session).
    """
    ts = leaves(tree)
    if not ts:
        return torch.zeros(())
    one_kind = len({(g.device, g.dtype) for g in ts}) == 1 and ts[0].dtype in (torch.float32, torch.float64)
    if one_kind and not (torch.compiler.is_compiling() and ts[0].device.type == "cpu"):
        norms = torch._foreach_norm(ts)  # one list op (as clip_grad_norm_'s foreach path)
    else:
        norms = [torch.linalg.vector_norm(g, dtype=torch.promote_types(g.dtype, torch.float32)) for g in ts]
    return torch.linalg.vector_norm(torch.stack(norms))


def clip_by(opt, grads: dict, inputs) -> tuple:
    """``(grads, grad_norm)`` as a train step takes them: ``opt.clip_and_norm(grads, inputs)``; for
    an optimizer of one's own without that method, the grads as they are and their global norm."""
    clip = getattr(opt, "clip_and_norm", None)
    return clip(grads, inputs) if clip is not None else (grads, global_norm(grads))


def clip_and_norm(grads: dict, cfg, inputs=None) -> tuple:
    """Returns ``(grads, grad_norm)``: grads clipped as configured, and their norm before clipping.

    Clip by global norm like ``torch.nn.utils.clip_grad_norm_`` (same 1e-6 guard), or by value;
    the norm is a 0-d tensor whether or not clipping is on, for the log and the NaN check. Whether
    to clip comes from ``cfg``; the bound from ``inputs`` where it holds one (``Optimizer.inputs``:
    a tensor input of a compiled step, so another bound needs no new compile), else from ``cfg``.
    """
    max_norm, max_value = _get(cfg, "clip_grad_norm"), _get(cfg, "clip_grad_value")
    if max_norm and max_value:
        raise ValueError("set one of optim.clip_grad_norm and optim.clip_grad_value, not both "
                         f"(got {max_norm} and {max_value})")
    inputs = inputs if isinstance(inputs, dict) else {}
    norm = global_norm(grads)
    if max_norm:
        max_norm = inputs.get("clip_grad_norm", max_norm)
        coef = torch.clamp(torch.reciprocal(norm + 1e-6) * max_norm, max=1.0)  # max_norm / (...) as torch's
        grads = map_leaves(lambda g: g * coef.to(g.dtype), grads)
    elif max_value:
        bound = _number_tensor(inputs.get("clip_grad_value", max_value))
        grads = map_leaves(lambda g: g.clamp(-bound.to(g.dtype), bound.to(g.dtype)), grads)
    return grads, norm


# One update per leaf. `h`: that leaf's hyper-parameters (Python numbers, or 0-d tensors for
# the step's inputs; `decays` and `has_momentum` are Python flags); `s`: its slots.

def _momentum_step(p, d, s, lr, h):
    """torch.optim.SGD's step for direction d (weight decay already in d): lr outside the buffer."""
    if not h["has_momentum"]:
        return p - lr * d, {}
    buf = h["momentum"] * s["momentum"] + d  # the zero-initialised buffer makes step 1 give buf = d.
    d = d + h["momentum"] * buf if h["nesterov"] else buf
    return p - lr * d, {"momentum": buf}


def _sgd(p, g, s, lr, h, count):
    d = g + h["wd"] * p if h["decays"] else g
    return _momentum_step(p, d, s, lr, h)


def _lars(p, g, s, lr, h, count):
    """LARS as in SimCLR: d = g + wd p, scaled by eta |p| / |d| (1 where a norm is 0), then SGD.

    Excluded params (norms, biases by default) are neither adapted nor decayed by the default rules.
    The lr stays outside the momentum buffer, as with LARC wrapping torch.optim.SGD (VISSL).
    """
    d = g + h["wd"] * p if h["decays"] else g
    if not h["lars_exclude"]:
        p_norm, d_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(d)
        ok = (p_norm > 0) & (d_norm > 0)
        trust = torch.where(ok, h["lars_eta"] * p_norm / torch.where(ok, d_norm, 1.0), 1.0)
        d = d * trust
    return _momentum_step(p, d, s, lr, h)


def _adamw(p, g, s, lr, h, count):
    """torch.optim.AdamW: decoupled decay p (1 - lr wd), then the bias-corrected Adam step. The bias
    corrections 1 - beta**t are -expm1(t log beta): accurate in float32 even where they are small
    (beta 0: log 0 = -inf gives 1)."""
    (b1, c1, log_b1), (b2, c2, log_b2) = h["beta_terms"]
    t = count.to(torch.float32)
    mu = b1 * s["mu"] + c1 * g
    nu = b2 * s["nu"] + c2 * g * g
    bc1, bc2 = -torch.expm1(t * log_b1), -torch.expm1(t * log_b2)
    if h["decays"]:
        p = p * (1 - lr * h["wd"])
    return p - (lr / bc1) * mu / (torch.sqrt(nu) / torch.sqrt(bc2) + h["eps"]), {"mu": mu, "nu": nu}


def _beta_terms(beta):
    """``(beta, 1 - beta, log beta)`` for an AdamW beta, computed in float64 (as Python numbers are):
    1 - 0.999 taken in float32 would be off by 1e-5 of itself."""
    return beta, 1.0 - beta, math.log(beta) if beta > 0 else -math.inf


_UPDATES = {"sgd": _sgd, "adamw": _adamw, "lars": _lars}
# The config numbers each optimizer takes as tensor inputs (``Optimizer.inputs``), besides the lr.
_INPUTS = {"sgd": ("weight_decay", "momentum"), "lars": ("weight_decay", "momentum", "lars_eta"),
           "adamw": ("weight_decay", "eps", "beta1", "one_minus_beta1", "log_beta1", "beta2", "one_minus_beta2",
                     "log_beta2")}


def _sgd_foreach(ps, gs, ss, lr, h, count):
    """:func:`_sgd` over a list of leaves sharing their hyper-parameters, with ``torch._foreach_*``
    ops (torch.optim.SGD's foreach path): a compiled step traces a few list ops instead of a
    loop of a few ops per leaf, and inductor sees one group of same-shaped pointwise work."""
    ds = torch._foreach_add(gs, torch._foreach_mul(ps, h["wd"])) if h["decays"] else gs
    if not h["has_momentum"]:
        return torch._foreach_sub(ps, torch._foreach_mul(ds, lr)), {}
    bufs = torch._foreach_add(torch._foreach_mul(ss["momentum"], h["momentum"]), ds)
    ds = torch._foreach_add(ds, torch._foreach_mul(bufs, h["momentum"])) if h["nesterov"] else bufs
    return torch._foreach_sub(ps, torch._foreach_mul(ds, lr)), {"momentum": bufs}


# Updates over lists of leaves that share hyper-parameters (the others go leaf by leaf).
_FOREACH = {"sgd": _sgd_foreach}  # (AdamW as foreach ops compiled slower: docs/BENCHMARKS.md)


def _number_tensor(x):
    return x if isinstance(x, torch.Tensor) else torch.tensor(float(x), dtype=torch.float32)


def _sgd_fused(ps, gs, ss, x, count):
    torch.ops.fpipe.sgd_(ps, gs, ss.get("momentum", []), x["lr"], x["lr_mults"], x["weight_decay"], x["wd_mults"],
                         x["momentum"], x["nesterov"])


def _adamw_fused(ps, gs, ss, x, count):
    torch.ops.fpipe.adamw_(ps, gs, ss["mu"], ss["nu"], count, x["lr"], x["lr_mults"], x["weight_decay"],
                           x["wd_mults"], x["one_minus_beta1"], x["one_minus_beta2"], x["eps"])


# In-place updates with PyTorch's fused kernels, for steps whose inputs are donated (``in_place``):
# one call over every param, their lr_mults, wd_mults and Nesterov given as tensors (``Optimizer.inputs``).
_FUSED = {"sgd": _sgd_fused, "adamw": _adamw_fused}
# Clipping's bounds: tensor inputs of the step while set (``Optimizer.inputs``).
CLIP_KEYS = ("clip_grad_norm", "clip_grad_value")
# Config keys a compiled step with the fused update takes as tensor inputs, not constants
# (layer_decay only scales the lr_mults).
FUSED_INPUT_KEYS = ("lr_mults", "wd_mults", "nesterov", "layer_decay", "layer_decay_type")


def _slots(name, momentum):
    return ("mu", "nu") if name == "adamw" else ("momentum",) if momentum else ()


def _check_rules(key, rules, check):
    out = []
    for rule in rules:
        if not (isinstance(rule, (tuple, list)) and len(rule) == 2 and isinstance(rule[0], str)):
            raise ValueError(f"optim.{key}: each rule must be a (regex, value) pair, got {rule!r}")
        try:
            re.compile(rule[0])
        except re.error as e:
            raise ValueError(f"optim.{key}: rule {tuple(rule)!r} has a bad regex: {e}") from None
        out.append((rule[0], check(key, rule)))
    return out


def _number(key, rule):
    value = rule[1]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ValueError(f"optim.{key}: rule {tuple(rule)!r} needs a number >= 0")
    return float(value)


def _lr_mult(key, rule):
    """An lr multiplier, or None: frozen (big_vision's convention; the loop partitions those out)."""
    return None if rule[1] is None else _number(key, rule)


def _flag(key, rule):
    if not isinstance(rule[1], bool):
        raise ValueError(f"optim.{key}: rule {tuple(rule)!r} needs True or False")
    return rule[1]


def _resolve(key, rules, names, default, check):
    """First full match per name, with ``(".*", default)`` last: returns values and rule report."""
    rules = _check_rules(key, rules, check) + [(".*", default)]
    index = [(pattern, i) for i, (pattern, _) in enumerate(rules)]
    chosen = {name: first_match(name, index) for name in names}
    report = [(rule, [n for n in names if chosen[n] == i]) for i, rule in enumerate(rules)]
    return {n: rules[i][1] for n, i in chosen.items()}, report


class Optimizer:
    """Rules resolved per dotted name at build time; ``init``/``update`` are pure tensor functions."""

    def __init__(self, cfg, trainable: dict, model_names=None):
        """``model_names``: every param name of the model, frozen ones too (``optim.layer_decay``
        counts the trunk's blocks there: fpipe.layer_decay); by default the trainable ones."""
        self.name = _get(cfg, "name")
        if self.name not in _UPDATES:
            raise ValueError(f"unknown optimizer optim.name={self.name!r}; valid: {', '.join(_UPDATES)}")
        self.cfg = cfg
        flat = flatten(trainable)
        for name, p in flat.items():
            if not (isinstance(p, torch.Tensor) and p.is_floating_point()):
                what = f"a {p.dtype} tensor" if isinstance(p, torch.Tensor) else type(p).__name__
                raise ValueError(f"trainable param {name!r} is {what}; the optimizer needs float tensors")
        self.names = list(flat)
        self._sizes = {n: p.numel() for n, p in flat.items()}
        lr_mults, lr_report = _resolve("lr_mults", _get(cfg, "lr_mults"), self.names, 1.0, _lr_mult)
        held = [n for n in self.names if lr_mults[n] is None]
        if held:
            raise ValueError(f"optim.lr_mults freezes {held[:5]} (value None), but they were given as "
                             "trainable; partition them out first (fpipe.freeze.frozen_by_rules)")
        wd_mults, wd_report = _resolve("wd_mults", _get(cfg, "wd_mults"), self.names, 1.0, _number)
        self.reports = {"lr_mults": lr_report, "wd_mults": wd_report}
        self.layer_decay_note = None  # what fpipe.layer_decay did, when on
        if _get(cfg, "layer_decay_type") not in layer_decay.KINDS:
            raise ValueError(f"optim.layer_decay_type={_get(cfg, 'layer_decay_type')!r}; valid: "
                             f"{', '.join(layer_decay.KINDS)}")
        if float(_get(cfg, "layer_decay")) != 1.0:
            decays, self.layer_decay_note = layer_decay.mults(self.names, float(_get(cfg, "layer_decay")), model_names,
                                                              _get(cfg, "layer_decay_type"))
            lr_mults = {n: lr_mults[n] * decays[n] for n in self.names}
        shared = dict(momentum=float(_get(cfg, "momentum")), nesterov=bool(_get(cfg, "nesterov")),
                      betas=tuple(map(float, _get(cfg, "betas"))), eps=float(_get(cfg, "eps")),
                      lars_eta=float(_get(cfg, "lars_eta")))
        wd = float(_get(cfg, "weight_decay"))
        self._check(shared, wd)
        shared["beta_terms"] = tuple(map(_beta_terms, shared["betas"]))
        lars_exclude = {n: True for n in self.names}
        if self.name == "lars":
            lars_exclude, self.reports["lars_exclude"] = _resolve(
                "lars_exclude", _get(cfg, "lars_exclude"), self.names, False, _flag)
        self.hyper = {n: dict(shared, lr_mult=lr_mults[n], wd=wd * wd_mults[n], wd_mult=wd_mults[n],
                              decays=bool(wd * wd_mults[n]), has_momentum=bool(shared["momentum"]),
                              lars_exclude=lars_exclude[n]) for n in self.names}
        self.slots = _slots(self.name, shared["momentum"])
        groups = {}  # leaves with the same resolved hyper-parameters, for the foreach updates
        for n in self.names:
            groups.setdefault(tuple(sorted(self.hyper[n].items())), []).append(n)
        self._groups = list(groups.values())
        # The fused update's rules as tensors (``inputs``): fixed for this optimizer, made once.
        self._rules = {} if self.name not in _FUSED else {
            "lr_mults": torch.tensor([self.hyper[n]["lr_mult"] for n in self.names], dtype=torch.float32),
            "wd_mults": torch.tensor([self.hyper[n]["wd_mult"] for n in self.names], dtype=torch.float32),
            "nesterov": torch.tensor(float(shared["nesterov"]), dtype=torch.float32)}

    def _check(self, h, wd):
        if not wd >= 0:
            raise ValueError(f"optim.weight_decay must be >= 0, got {wd}")
        if not 0 <= h["momentum"] < 1:
            raise ValueError(f"optim.momentum must be in [0, 1), got {h['momentum']}")
        if h["nesterov"] and not h["momentum"] and self.name != "adamw":
            raise ValueError("optim.nesterov needs optim.momentum > 0")
        if len(h["betas"]) != 2 or not all(0 <= b < 1 for b in h["betas"]):
            raise ValueError(f"optim.betas must be two numbers in [0, 1), got {h['betas']}")
        if h["eps"] <= 0 or h["lars_eta"] <= 0:
            raise ValueError(f"optim.eps and optim.lars_eta must be > 0, got {h['eps']}, {h['lars_eta']}")

    def _flat(self, tree, what):
        flat = flatten(tree)
        if list(flat) != self.names and set(flat) != set(self.names):  # the list first: cheap to trace
            missing = [n for n in self.names if n not in flat]
            extra = [n for n in flat if n not in self._sizes]
            raise ValueError(f"{what} do not match the trainable params the optimizer was built for: "
                             f"missing {missing[:10]}, unexpected {extra[:10]}")
        return flat

    def init(self, params: dict) -> dict:
        """``{"count": 0-d int64, <slot>: tree like params}``; plain tensors, so torch.save-able."""
        self._flat(params, "params")
        state = {"count": torch.zeros((), dtype=torch.int64)}
        state.update({slot: map_leaves(torch.zeros_like, params) for slot in self.slots})
        return state

    def updates_in_place(self, params: dict) -> bool:
        """Whether ``update(..., in_place=True)`` writes into ``params`` (nested or flat) with the
        fused kernels, rather than returning new tensors."""
        return self.name in _FUSED and fused_update.applies(list(flatten(params).values()))

    def inputs(self, lr) -> dict:
        """The step's hyper-parameter inputs, 0-d float32 tensors: ``lr`` (before lr_mults) and the
        config's numbers this optimizer reads (weight decay before wd_mults, momentum, eps, eta;
        AdamW's betas as ``_beta_terms``, derived here in float64). Given to ``update`` as tensors,
        they are inputs of a compiled step, not constants in it: another value needs no new compile.
        Never float64: Dynamo reads a 0-d float64 input's value out (``.item()``) and then compiles it
        in as a constant. SGD and AdamW add what their fused update takes (``FUSED_INPUT_KEYS``):
        ``lr_mults`` and ``wd_mults``, 1-d over ``self.names``, and ``nesterov`` (0 or 1)."""
        numbers = dict(weight_decay=_get(self.cfg, "weight_decay"), momentum=_get(self.cfg, "momentum"),
                       lars_eta=_get(self.cfg, "lars_eta"), eps=_get(self.cfg, "eps"))
        for i, beta in enumerate(_get(self.cfg, "betas"), 1):
            numbers.update(zip((f"beta{i}", f"one_minus_beta{i}", f"log_beta{i}"), _beta_terms(float(beta))))
        clip = [(k, _get(self.cfg, k)) for k in CLIP_KEYS if _get(self.cfg, k)]  # on or off: fixed
        out = {k: torch.tensor(float(v), dtype=torch.float32)
               for k, v in [("lr", lr)] + [(k, numbers[k]) for k in _INPUTS[self.name]] + clip}
        return {**out, **self._rules}  # the fused update's rules, per param in self.names' order

    def _group_args(self, p, g, slots, lr, inputs, count):
        """For each group of leaves sharing hyper-parameters: its names and the arguments of a list
        update, ``(params, grads, slots, lr, hyper, count)`` (``_FOREACH``, ``_FUSED``)."""
        for names in self._groups:
            h = _with_inputs(self.hyper[names[0]], inputs)
            yield names, ([p[n] for n in names], [g[n] for n in names],
                          {k: [v[n] for n in names] for k, v in slots.items()}, lr * h["lr_mult"], h, count)

    def update(self, grads: dict, state: dict, params: dict, inputs, in_place=False) -> tuple:
        """Returns ``(new_params, new_state)``; ``grads`` and ``params`` nested or flat (``{dotted
        name: tensor}``); new params come nested (in place: ``params`` itself). inputs:
        ``self.inputs(lr)``, or the step's lr alone (a 0-d tensor, before lr_mults; the other numbers
        are then the config's, as constants).
        ``in_place``: SGD and AdamW write the new params and slots into the given tensors with
        PyTorch's fused kernels (fpipe.fused_update) and return them; only for a step whose
        inputs are donated (fpipe.train.donation). The others return new tensors regardless."""
        inputs = inputs if isinstance(inputs, dict) else {"lr": inputs}
        lr = inputs["lr"]
        p, g = self._flat(params, "params"), self._flat(grads, "grads")
        slots = {slot: flatten(state[slot]) for slot in self.slots}
        count = state["count"] + 1
        if in_place and self.updates_in_place(p):
            # the config's numbers (constants) where not given, e.g. the lr alone
            # (a loop, not set <= dict_keys: torch 2.11's Dynamo cannot trace that comparison)
            complete = all(key in inputs for key in ("lr", *_INPUTS[self.name], *self._rules))
            numbers = dict(inputs) if complete else {**self.inputs(0.0), **inputs}
            if not self.hyper[self.names[0]]["has_momentum"]:
                numbers["momentum"] = torch.zeros((), dtype=torch.float32)
            _FUSED[self.name]([p[n] for n in self.names], [g[n] for n in self.names],
                              {k: [v[n] for n in self.names] for k, v in slots.items()}, numbers, count)
            return params, {**state, "count": count}
        leaf_update = _UPDATES[self.name]
        new_p, new_slots = {}, {slot: {} for slot in self.slots}
        group_update = _FOREACH.get(self.name)
        if group_update is not None and len({(t.device, t.dtype) for t in p.values()}) <= 1:
            for names, args in self._group_args(p, g, slots, lr, inputs, count):
                out_p, out_slots = group_update(*args)
                new_p.update(zip(names, out_p))
                for slot in self.slots:
                    new_slots[slot].update(zip(names, out_slots[slot]))
            new_p = {n: new_p[n] for n in self.names}  # the trees keep their order
            new_slots = {k: {n: v[n] for n in self.names} for k, v in new_slots.items()}
            return unflatten(new_p), {"count": count, **{k: unflatten(v) for k, v in new_slots.items()}}
        for n in self.names:
            h = _with_inputs(self.hyper[n], inputs)
            new_p[n], leaf_slots = leaf_update(p[n], g[n], {k: v[n] for k, v in slots.items()},
                                               lr * h["lr_mult"], h, count)
            for slot in self.slots:
                new_slots[slot][n] = leaf_slots[slot]
        return unflatten(new_p), {"count": count, **{k: unflatten(v) for k, v in new_slots.items()}}

    def clip_and_norm(self, grads: dict, inputs=None) -> tuple:
        """:func:`clip_and_norm` by this optimizer's config, the bound from ``inputs`` if given."""
        return clip_and_norm(grads, self.cfg, inputs)

    def describe(self, max_names: int | None = 8) -> list:
        """Lines for the log: the optimizer, then each rule and the params it matched."""
        cfg, size = self.cfg, sum(self._sizes.values())
        hyper = {"sgd": ("momentum", "nesterov", "weight_decay"),
                 "adamw": ("betas", "eps", "weight_decay"),
                 "lars": ("momentum", "nesterov", "weight_decay", "lars_eta")}[self.name]
        lines = [f"optimizer {self.name}: " + ", ".join(f"{k}={_get(cfg, k)}" for k in hyper) +
                 f"; {len(self.names)} trainable params ({size:,} values); state slots: "
                 f"{', '.join(self.slots) or 'none'}"]
        for key, report in self.reports.items():
            lines.append(f"  {key} (first full match wins):")
            last = len(report) - 1
            for i, ((pattern, value), names) in enumerate(report):
                label = f"default -> {value}" if i == last else f"'{pattern}' -> {value}"
                shown = names if max_names is None else names[:max_names]
                more = f" … (+{len(names) - len(shown)} more)" if len(names) > len(shown) else ""
                what = ", ".join(shown) + more if names else "matched nothing"
                lines.append(f"    {label}: {len(names)} params: {what}")
        if self.layer_decay_note:
            lines.append(f"  {self.layer_decay_note}")
        return lines


def _with_inputs(h, inputs):
    """A leaf's hyper-parameters with the step's tensor inputs in place of the config's numbers
    (the weight decay times its wd_mult). A zero weight decay or momentum in the config stays a
    zero: no decay term, no momentum buffer."""
    h = dict(h)
    if h["decays"] and "weight_decay" in inputs:
        h["wd"] = inputs["weight_decay"] if h["wd_mult"] == 1 else inputs["weight_decay"] * h["wd_mult"]
    if h["has_momentum"] and "momentum" in inputs:
        h["momentum"] = inputs["momentum"]
    if "beta1" in inputs:
        h["beta_terms"] = tuple(tuple(inputs[f"{k}{i}"] for k in ("beta", "one_minus_beta", "log_beta"))
                                for i in (1, 2))
    h.update({k: inputs[k] for k in ("eps", "lars_eta") if k in inputs})
    return h


def build(cfg, trainable: dict, model_names=None) -> Optimizer:
    """The optimizer named by ``cfg.name`` for this trainable tree, with its rules resolved
    (``model_names``: see :class:`Optimizer`)."""
    return Optimizer(cfg, trainable, model_names)
