r"""DINO's weighted kNN (cosine, exp(sim/0.07) votes, k = 10, 20, 100, 200) on frozen features.

    python main.py --config=configs/knn.py                                   # digits, random ResNet-18
    python main.py --config=configs/knn.py --config.model.weights.path=FILE  # a pretrained trunk
    python main.py --config=configs/knn.py --config.eval.features_from=runs/linear_probe  # a cache

With no weights the trunk is RANDOMLY initialised (the log says so loudly). Features are
extracted once to WORKDIR/features/*.safetensors and reused by re-runs and by any other
protocol (eval.features_from). docs/EVALUATION.md gives the numbers to expect (~40 s here).
"""
from configs import common
from fpipe.evaluate import config as eval_config


def get_config(arg=None):
    common.no_variants("knn", arg)
    return eval_config.run_config(("knn",))
