"""The ``config.eval`` section and the whole config of an evaluation run (configs/knn.py & co.).

An evaluation run has no optimizer, schedule or heads to train: data, a trunk, its weights,
what to extract and which protocols to run. Every key has a value or a typed placeholder, so
any of them can be set from the command line.
"""
import math

import ml_collections

from fpipe import defaults
from fpipe.defaults import LINEAR_LRS  # noqa: F401 (re-exported)

PROTOCOLS = ("knn", "linear", "logreg", "low_shot")
NORMALIZE = ("standardize", "l2", "none")  # eval.normalize: the inputs of linear, logreg, low_shot
LOW_SHOT_CLASSIFIERS = ("logreg", "knn")  # eval.low_shot.classifier


def _whole(v) -> bool:
    return type(v) is int and v >= 1


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _each(test):
    return lambda values: isinstance(values, (tuple, list)) and len(values) > 0 and all(test(v) for v in values)


# Each protocol's numbers, checked before the workdir is claimed (before, a bad one failed after the
# extraction, or gave a table of 0% accuracies).
VALUES = (
    ("knn.ks", _each(_whole), "whole numbers >= 1, at least one"),
    ("knn.temperature", lambda v: _number(v) and v > 0, "a number > 0"),
    ("knn.query_chunk", _whole, "a whole number >= 1"),
    ("knn.bank_chunk", _whole, "a whole number >= 1"),
    ("linear.lrs", _each(lambda v: _number(v) and v > 0), "learning rates > 0, at least one"),
    ("linear.wds", _each(lambda v: _number(v) and v >= 0), "weight decays >= 0, at least one"),
    ("linear.epochs", _whole, "a whole number >= 1"),
    ("linear.batch_size", _whole, "a whole number >= 1"),
    ("linear.momentum", lambda v: _number(v) and 0 <= v < 1, "a number in [0, 1)"),
    ("logreg.Cs", _each(lambda v: _number(v) and v > 0), "inverse regularisation strengths > 0, at least one"),
    ("logreg.max_iter", _whole, "a whole number >= 1"),
    ("logreg.tol", lambda v: _number(v) and v > 0, "a number > 0"),
    ("logreg.history", _whole, "a whole number >= 1"),
    ("low_shot.shots", _each(_whole), "samples per class, whole numbers >= 1"),
    ("low_shot.C", lambda v: _number(v) and v > 0, "a number > 0"),
    ("low_shot.k_nn", _whole, "a whole number >= 1"),
    ("low_shot.classifier", lambda v: v in LOW_SHOT_CLASSIFIERS, f"one of {LOW_SHOT_CLASSIFIERS}"),
    ("normalize", lambda v: v in NORMALIZE, f"one of {NORMALIZE}"),
    ("val_fraction", lambda v: _number(v) and 0 < v < 1, "a fraction of each class in (0, 1)"),
)


def check(ev) -> None:
    """A ``ValueError`` naming the first ``config.eval`` key whose value no protocol can run with:
    main.py checks it before the workdir is claimed, ``fpipe.evaluate.run`` again for direct callers."""
    protocols = tuple(ev.protocols)
    bad = [p for p in protocols if p not in PROTOCOLS]
    if bad or not protocols:
        raise ValueError(f"eval.protocols={protocols}: unknown {bad}; valid: {PROTOCOLS}")
    for key, fits, wanted in VALUES:
        section, _, name = key.rpartition(".")
        value = (ev[section] if section else ev).get(name)
        if not fits(value):
            raise ValueError(f"eval.{key}={value!r}: want {wanted}")


default_config = defaults.evaluation  # the config.eval keys and their help: fpipe/defaults.py


def run_config(protocols) -> ml_collections.ConfigDict:
    """The config of an evaluation run on digits with a random ResNet-18 (say a weights path)."""
    c = ml_collections.ConfigDict()
    c.seed = 0                 # the trunk's random init when no weights are given
    c.data = defaults.data()
    c.data.image_size = 32     # digits are 8x8: 32 px keeps every stage of a ResNet meaningful
    c.model = ml_collections.ConfigDict()
    c.model.trunk = defaults.trunk("resnet18")
    c.model.heads = ml_collections.ConfigDict()  # heads loaded from the weights file, for extract.heads
    c.model.weights = defaults.weights()
    # Features computed once per workdir (resumable) and read by every protocol.
    c.extract = ml_collections.ConfigDict(dict(
        features=("res3", "res4", "flatten"),
        dtype="float32",       # float32 | float16 (half the disk; protocols compute in float32)
        heads=False))          # also store heads.<name>: each head's outputs
    c.precision = defaults.precision()  # dtype bf16 (or fp16 on CUDA): the trunk runs under autocast
    c.compile = True           # the trunk compiled for extraction (weights as constants; eager on failure) ...
    c.compile_min_images = 100_000  # ... when there are at least this many images to extract (0: always)
    c.compile_cache_dir = "auto"  # the compiled trunk saved for the next run ("auto": ~/.cache/fpipe/compiled; "": off)
    c.cudnn_benchmark = True   # CUDA: cuDNN times its conv algorithms per shape, keeps the fastest (False: heuristics)
    c.eval = default_config()
    c.eval.protocols = tuple(protocols)
    c.collective_timeout_s = 600.0  # a collective waiting longer (a stuck rank) stops the run
    return c
