r"""Linear probes on cached features: 13 lrs x 2 weight decays per layer, trained in one pass,
the best chosen on a validation split carved from train, reported on test.

    python main.py --config=configs/linear_probe.py
    python main.py --config=configs/linear_probe.py --config.eval.linear.retrain=True  # best head on train+val
    python main.py --config=configs/linear_probe.py \
        --config.eval.protocols='("knn", "linear", "logreg", "low_shot")'          # every protocol, one run

Default: digits and a RANDOM ResNet-18 trunk (set model.weights.path). See docs/EVALUATION.md.
"""
from configs import common
from fpipe.evaluate import config as eval_config


def get_config(arg=None):
    common.no_variants("linear_probe", arg)
    return eval_config.run_config(("linear",))
