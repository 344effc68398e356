r"""Logistic regression on cached features by L-BFGS with a sweep of C (CLIP / dinov2 protocol):
C chosen on a validation split carved from train, refit on train + val, reported on test.

    python main.py --config=configs/logreg.py
    python main.py --config=configs/logreg.py --config.eval.logreg.Cs='(0.01, 0.1, 1.0)'

Default: digits and a RANDOM ResNet-18 trunk (set model.weights.path). See docs/EVALUATION.md.
"""
from configs import common
from fpipe.evaluate import config as eval_config


def get_config(arg=None):
    common.no_variants("logreg", arg)
    return eval_config.run_config(("logreg",))
