"""The ``config.eval`` section and the whole config of an evaluation run (configs/knn.py & co.).

An evaluation run has no optimizer, schedule or heads to train: data, a trunk, its weights,
what to extract and which protocols to run. Every key has a value or a typed placeholder, so
any of them can be set from the command line.
"""
import ml_collections

from fpipe import defaults
from fpipe.defaults import LINEAR_LRS  # noqa: F401 (re-exported)

PROTOCOLS = ("knn", "linear", "logreg", "low_shot")
NORMALIZE = ("standardize", "l2", "none")  # eval.normalize: the inputs of linear, logreg, low_shot

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
    c.eval = default_config()
    c.eval.protocols = tuple(protocols)
    c.collective_timeout_s = 600.0  # a collective waiting longer (a stuck rank) stops the run
    return c
