"""``format: auto``: find the trunk in a file by the tails of its names and their shapes.

A prefix is whatever stands in front of the model's own trunk names (``module.encoder_q.``,
``teacher.module.backbone.``, anything never seen before); no list of prefixes is needed to
find it. Conventions (below) only choose among several full copies of the trunk.
"""
import dataclasses
from collections import defaultdict

import torch

from fpipe.weights import resample
from fpipe.weights.errors import WeightsError

# Buffers that are bookkeeping, not weights: BatchNorm's step counter, and tables the model
# derives from its architecture (Swin's relative_position_index, V2's relative_coords_table),
# which are never read from a file.
COUNTERS = ("num_batches_tracked",)
DERIVED = ("relative_position_index", "relative_coords_table")

# When a file holds several full copies of the trunk: the copy each project evaluates (read from
# each project's own linear-evaluation or export code; README "Pretrained weights from elsewhere").
PREFERRED = {
    "encoder_q": "MoCo evaluates the query encoder (encoder_k is its momentum copy)",
    "base_encoder": "MoCo v3 evaluates base_encoder (momentum_encoder is for training)",
    "online_encoder": "BYOL evaluates the online encoder (target_encoder is for training)",
    "online_network": "BYOL evaluates the online network (target_network is for training)",
    "teacher": "DINO evaluates the teacher (eval_linear's default checkpoint_key)",
    "state_dict_ema": "timm prefers the EMA weights (state_dict_ema) to state_dict",
}
# Copies that exist only to train the other one. Besides these names, any name part with the
# word "momentum" or "target" (solo-learn's momentum_backbone, lightly's backbone_momentum,
# mmpretrain's momentum_encoder / target_net, PyTorch-BYOL's target_network_state_dict).
# One-word names also count as words of a name part: lightly's DINO examples keep
# student_backbone + teacher_backbone, its benchmarks backbone (the teacher, which their
# forward() and linear evaluation use) + student_backbone: the teacher is taken in both.
# MoCo's naming carries over to other code: a word "key", or a last word "k" (backbone_k,
# model_k: the key encoder) or "m" (ALBEF's and BLIP's visual_encoder_m: the momentum model).
TRAINING_ONLY = {"encoder_k", "student", "loss"}
# The one pair whose "target" copy is the evaluated one: Meta's MSN, I-JEPA and V-JEPA save
# {"encoder", "target_encoder", "predictor" or "prototypes", "opt", ...} at the top of the file and
# evaluate target_encoder, the EMA copy (MSN's linear_eval.py, V-JEPA's evals' checkpoint_key);
# BYOL-style code naming its copies encoder / target_encoder evaluates encoder. So the pair decides
# for target_encoder at the top of a file, and is refused anywhere else.
EMA_EVALUATED = ("encoder", "target_encoder")
EMA_EVALUATED_WHY = ("MSN, I-JEPA and V-JEPA evaluate target_encoder, their EMA copy (MSN's linear_eval.py, "
                     "V-JEPA's checkpoint_key; timm's I-JEPA weights are encoder, the context encoder)")
TRAINING_WORDS = {"momentum", "target", "key"}
TRAINING_SUFFIXES = {"k", "m"}


def is_bookkeeping(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in COUNTERS + DERIVED


def is_derived(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in DERIVED


@dataclasses.dataclass
class Candidate:
    """One place in the file where (part of) the trunk sits."""
    prefix: str                 # full dotted prefix in the flattened file
    matched: dict               # trunk name -> file name, shapes equal
    wrong_shape: dict           # trunk name -> (file shape, model shape), names equal
    total: int                  # trunk weight tensors in the model (counters not counted)
    aliases: list = dataclasses.field(default_factory=list)  # tensor-equal copies folded in

    @property
    def loaded(self) -> int:
        return sum(not is_bookkeeping(n) for n in self.matched)

    @property
    def coverage(self) -> float:
        return self.loaded / max(self.total, 1)

    def describe(self) -> str:
        text = f"{self.prefix or '<no prefix>'!s}: {self.loaded}/{self.total} trunk tensors"
        if self.wrong_shape:
            text += f", {len(self.wrong_shape)} with other shapes"
        if self.aliases:
            text += f" (identical copies: {', '.join(a or '<no prefix>' for a in self.aliases)})"
        return text


def final_norm(trunk_shapes: dict) -> tuple:
    """The trunk's last two tensors (names in init order) when they are one norm's 1-D ``weight``
    and ``bias``, else ``()``: the final norm a pretraining encoder may lack (ConvNeXt V2's FCMAE)."""
    last = [n for n in trunk_shapes if not is_bookkeeping(n)][-2:]
    if len(last) != 2 or not last[0].endswith(".weight") or last[1] != last[0][:-len("weight")] + "bias":
        return ()
    shapes = [tuple(trunk_shapes[n]) for n in last]
    return tuple(last) if len(shapes[0]) == 1 and shapes[0] == shapes[1] else ()


def find_trunks(flat: dict, trunk_shapes: dict, *, min_coverage: float = 0.25) -> list:
    """Candidates whose coverage is at least ``min_coverage``, best first, then in file order.

    ``flat``: the file's tensors by dotted path; ``trunk_shapes``: ``{torchvision name: shape}``.
    """
    total = sum(not is_bookkeeping(n) for n in trunk_shapes)
    matched, wrong = defaultdict(dict), defaultdict(dict)
    for name, tensor in flat.items():
        parts = name.split(".")
        for i in range(len(parts)):
            tail = ".".join(parts[i:])
            if tail not in trunk_shapes:
                continue
            prefix = ".".join(parts[:i]) + ("." if i else "")
            if resample.fits(tail, tuple(tensor.shape), tuple(trunk_shapes[tail])):
                matched[prefix].setdefault(tail, name)
            else:
                wrong[prefix][tail] = (tuple(tensor.shape), tuple(trunk_shapes[tail]))
    order = {p: i for i, p in enumerate(dict.fromkeys(list(matched) + list(wrong)))}
    cands = [Candidate(p, matched[p], wrong[p], total) for p in order]
    cands = [c for c in cands if c.coverage >= min_coverage or len(c.wrong_shape) >= min_coverage * total]
    return sorted(cands, key=lambda c: (-c.coverage, order[c.prefix]))


def fold_aliases(cands: list, flat: dict) -> list:
    """Merges candidates whose tensors are all equal (one copy saved twice is no ambiguity)."""
    kept = []
    for c in cands:
        twin = next((k for k in kept if _same_tensors(k, c, flat)), None)
        if twin is None:
            kept.append(c)
        else:
            twin.aliases.append(c.prefix)
    return kept


def _same_tensors(a: Candidate, b: Candidate, flat: dict) -> bool:
    if a.matched.keys() != b.matched.keys():
        return False
    for tail in a.matched:  # the first differing tensor ends it, so distinct copies cost little
        x, y = flat[a.matched[tail]], flat[b.matched[tail]]
        if x.data_ptr() == y.data_ptr() and x.stride() == y.stride():
            continue
        if x.dtype != y.dtype or not torch.equal(x, y):
            return False
    return True


def choose(cands: list, flat: dict, *, select: str = "", where: str = "the file",
           model_names=("conv1.weight", "layer1.0.bn1.running_mean")) -> tuple:
    """``(candidate, reason)`` for the copy to load; a ``WeightsError`` when none or no rule decides.
    ``model_names``: two of the model's trunk names, for the message when none is found."""
    if not cands:
        raise WeightsError(f"no trunk of the model found in {where}: no prefix in it holds a quarter or more of "
                           f"the model's trunk tensors (names ending in the trunk's, such as "
                           f"{', '.join(model_names)}, with its shapes); `python -m fpipe.weights inspect` "
                           "lists what the file holds.")
    best = cands[0].coverage
    if best == 0:
        c = max(cands, key=lambda c: len(c.wrong_shape))
        name, (fs, ms) = next(iter(c.wrong_shape.items()))
        raise WeightsError(f"no trunk of this model's shape in {where}: names fit at "
                           f"{c.prefix or '<no prefix>'!r} but shapes differ ({name}: file {list(fs)}, "
                           f"model {list(ms)}); is the model's depth/width that of the file?")
    pool = fold_aliases([c for c in cands if c.coverage == best], flat)
    what = "full copies" if best == 1 else f"partial copies ({best:.0%})"
    if select:
        chosen = [c for c in pool if _selected(c, select)]
        if len(chosen) != 1:
            raise WeightsError(f"select={select!r} matches {len(chosen)} of the {what} of the trunk in "
                               f"{where}; candidates:\n{_listing(cands)}")
        return chosen[0], f"chosen by select={select!r}" + _alias_note(chosen[0])
    if len(pool) == 1:
        only = "the only full copy of the trunk" if best == 1 else f"the best partial copy ({best:.0%})"
        return pool[0], only + _alias_note(pool[0])
    pair = _encoder_target_pair(pool)
    if pair and pair[1].prefix.startswith(EMA_EVALUATED[1] + "."):
        return pair[1], (f"2 {what} of the trunk; took {pair[1].prefix!r} by convention: {EMA_EVALUATED_WHY}. "
                         f"To take the other, set select={pair[0].prefix!r}")
    if pair:
        raise WeightsError(f"2 different {what} of the trunk in {where}, encoder and target_encoder below "
                           f"{pair[0].prefix[:-len('encoder.')]!r}, and no convention decides: MSN and the JEPAs "
                           "evaluate target_encoder (their EMA copy), BYOL-style code encoder; set "
                           f"model.weights.select. Candidates:\n{_listing(cands)}")
    scores = [_score(c) for c in pool]
    top = max(scores)
    winners = [c for c, s in zip(pool, scores) if s == top]
    if len(winners) == 1 and len(set(scores)) > 1:
        c = winners[0]
        why = next((PREFERRED[key] for s in _segments(c.prefix) for key in PREFERRED if _names(s, key)),
                   "the other copies are training-only (" +
                   ", ".join(sorted({s for o in pool for s in _segments(o.prefix) if _training_only(s)})) + ")")
        return c, (f"{len(pool)} {what} of the trunk; took {c.prefix!r} by convention: {why}. "
                   f"To take another, set select= one of {[o.prefix for o in pool if o is not c]}")
    raise WeightsError(f"{len(pool)} different {what} of the trunk in {where} and no convention decides "
                       f"which to load; set model.weights.select (or state_dict_key / remove_prefix). "
                       f"Candidates:\n{_listing(cands)}")


def _encoder_target_pair(pool: list):
    """``(encoder, target_encoder)`` when the two copies differ only in that one name part."""
    if len(pool) != 2:
        return None
    a, b = (_segments(c.prefix) for c in pool)
    differ = [i for i, (x, y) in enumerate(zip(a, b)) if x != y]
    if len(a) != len(b) or len(differ) != 1 or {a[differ[0]], b[differ[0]]} != set(EMA_EVALUATED):
        return None
    return tuple(sorted(pool, key=lambda c: _segments(c.prefix)[differ[0]] != EMA_EVALUATED[0]))


def _segments(prefix: str) -> list:
    return [s for s in prefix.split(".") if s]


def _names(segment: str, key: str) -> bool:
    """``segment`` is ``key``, or holds it as a word (lightly's ``teacher_backbone``: teacher)."""
    return segment == key or ("_" not in key and key in segment.split("_"))


def _training_only(segment: str) -> bool:
    words = segment.split("_")
    return (any(_names(segment, k) for k in TRAINING_ONLY) or bool(set(words) & TRAINING_WORDS)
            or (len(words) > 1 and words[-1] in TRAINING_SUFFIXES))


def _score(c: Candidate) -> int:
    segs = _segments(c.prefix)
    preferred = any(_names(s, k) for s in segs for k in PREFERRED)
    return int(preferred) - int(any(_training_only(s) for s in segs))


def _selected(c: Candidate, select: str) -> bool:
    for prefix in [c.prefix, *c.aliases]:
        if prefix.startswith(select) or select.strip(".") in _segments(prefix):
            return True
    return False


def _alias_note(c: Candidate) -> str:
    return f" (identical copies at {', '.join(repr(a) for a in c.aliases)})" if c.aliases else ""


def _listing(cands: list) -> str:
    return "\n".join(f"  {c.describe()}" for c in cands)


def split_prefix(prefix: str, dict_paths: list) -> tuple:
    """``(state_dict_key, remove_prefix)`` for a flat prefix: the deepest dict it lies in, and the rest."""
    key = max((p for p in dict_paths if prefix.startswith(p + ".")), key=len, default="")
    return key, prefix[len(key) + 1:] if key else prefix


def advice(prefix: str, dict_paths: list) -> str:
    """The config lines that load the trunk found at ``prefix`` (a prefix of the whole file)."""
    key, rest = split_prefix(prefix, dict_paths)
    parts = [f"model.weights.state_dict_key={key!r}"] if key else []
    if rest:
        parts.append(f"model.weights.remove_prefix={rest!r}")
    return "set " + ", ".join(parts) if parts else "use no prefix (format='torchvision')"
