r"""Low-shot: k = 1, 2, 5, 10, 25 labelled samples per class, 3 seeds, mean ± std on test.

    python main.py --config=configs/low_shot.py
    python main.py --config=configs/low_shot.py --config.eval.low_shot.classifier=knn

Classifier: logistic regression at C = eval.low_shot.C (too few samples for a validation split)
or DINO's kNN. Default: digits, a RANDOM ResNet-18 trunk (set model.weights.path). See
docs/EVALUATION.md.
"""
from configs import common
from fpipe.evaluate import config as eval_config


def get_config(arg=None):
    common.no_variants("low_shot", arg)
    return eval_config.run_config(("low_shot",))
