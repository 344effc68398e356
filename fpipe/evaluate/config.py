"""The ``config.eval`` section and the whole config of an evaluation run (configs/knn.py & co.).

An evaluation run has no optimizer, schedule or heads to train: data, a trunk, its weights,
what to extract and which protocols to run. Every key has a value or a typed placeholder, so
any of them can be set from the command line.
"""
import ml_collections

from fpipe import data, weights
from fpipe.models import model

PROTOCOLS = ("knn", "linear", "logreg", "low_shot")

# dinov2's 13 learning rates, for standardised features
LINEAR_LRS = (1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1, 0.2, 0.5, 1.0)


def default_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        protocols=("knn",),       # any of: knn, linear, logreg, low_shot
        layers=(),                # cached layers to evaluate; empty: every layer of extract.features
        features_from="",         # a WORKDIR whose features/ to read instead of running the trunk
        seed=0,                   # the validation split carved from train (stratified)
        val_fraction=0.2,         # of train, per class, to choose lr/wd (linear) and C (logreg); never test
        normalize="standardize",  # linear, logreg, low_shot inputs: standardize (train mean/std) | l2 | none
        knn=dict(ks=(10, 20, 100, 200), temperature=0.07,  # DINO's weighted vote; all ks from one search
                 query_chunk=1024, bank_chunk=65536),      # memory: query_chunk x bank_chunk floats
        linear=dict(lrs=LINEAR_LRS, wds=(0.0, 1e-3),  # the grid: len(lrs) x len(wds) heads per layer
                    epochs=20, batch_size=256, momentum=0.9, init_std=0.01, seed=0,
                    retrain=False),                       # True: the best head again on train + val
        logreg=dict(Cs=(0.01, 0.1, 1.0, 10.0), max_iter=100, tol=1e-4, history=10,
                    refit=True),  # max_iter, tol: scikit-learn's defaults; refit the best C on train + val (CLIP)
        low_shot=dict(shots=(1, 2, 5, 10, 25), seeds=(0, 1, 2),
                      classifier="logreg", C=1.0, k_nn=20),  # logreg at C, or knn with k_nn neighbours
    ))


def run_config(protocols) -> ml_collections.ConfigDict:
    """The config of an evaluation run on digits with a random ResNet-18 (say a weights path)."""
    c = ml_collections.ConfigDict()
    c.seed = 0                 # the trunk's random init when no weights are given
    c.data = data.default_config()
    c.data.image_size = 32     # digits are 8x8: 32 px keeps every stage of a ResNet meaningful
    c.model = ml_collections.ConfigDict()
    c.model.trunk = model.trunk_config("resnet18")
    c.model.heads = ml_collections.ConfigDict()  # heads loaded from the weights file, for extract.heads
    c.model.weights = weights.default_config()
    # Features computed once per workdir (resumable) and read by every protocol.
    c.extract = ml_collections.ConfigDict(dict(
        features=("res3", "res4", "flatten"),
        dtype="float32",       # float32 | float16 (half the disk; protocols compute in float32)
        heads=False))          # also store heads.<name>: each head's outputs
    c.eval = default_config()
    c.eval.protocols = tuple(protocols)
    c.collective_timeout_s = 600.0  # a collective waiting longer (a stuck rank) stops the run
    return c
