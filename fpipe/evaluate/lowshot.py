"""Low-shot classification on cached features: k labelled samples per class, several seeds.

For each ``k`` in ``shots`` and each seed, ``k`` train samples of every class are drawn (a class
with fewer keeps all), a classifier is fit on them alone and scored on the whole test split;
the result is the mean and standard deviation (over seeds, ddof 0) of each metric.
Classifiers: ``logreg`` (L-BFGS logistic regression at a fixed ``C``: too few samples to carve
a validation split from; the run gives it the normalised features) or ``knn`` (DINO's weighted
vote over ``min(k_nn, k)`` neighbours, on the raw features, as dinov2's few-shot kNN, which
reports every k of its list up to the shots per class). The draws are small, so every rank
computes them whole (no communication).
"""
import numpy as np

from fpipe.evaluate import config as eval_config
from fpipe.evaluate import knn, logreg, metrics

CLASSIFIERS = eval_config.LOW_SHOT_CLASSIFIERS


def evaluate(train, test, num_classes, cfg, knn_cfg, logreg_cfg) -> dict:
    """``{"k=<k>": {"top1": mean, "top1_std": std, ...}}`` over ``cfg.seeds``."""
    if cfg.classifier not in CLASSIFIERS:
        raise ValueError(f"eval.low_shot.classifier={cfg.classifier!r}; valid: {', '.join(CLASSIFIERS)}")
    (train_x, train_y), (test_x, test_y) = train, test
    out = {}
    for shots in sorted(int(k) for k in cfg.shots):
        runs = []
        for seed in cfg.seeds:
            chosen = metrics.per_class_sample(train_y, shots, int(seed))
            x, y = train_x[chosen], train_y[chosen]
            if cfg.classifier == "logreg":
                w, b = logreg.fit(x, y, num_classes, float(cfg.C), logreg_cfg)
                runs.append(metrics.from_scores(test_x @ w + b, test_y, num_classes))
            else:
                k = min(int(cfg.k_nn), shots, len(x))
                sims, labels = knn.neighbours(knn.normalise(x), y, knn.normalise(test_x), k)
                runs.append(metrics.from_scores(knn.vote(sims, labels, k, float(knn_cfg.temperature), num_classes),
                                                test_y, num_classes))
        out[f"k={shots}"] = {name: v for m in runs[0]
                             for name, v in ((m, float(np.mean([r[m] for r in runs]))),
                                             (f"{m}_std", float(np.std([r[m] for r in runs]))))}
        out[f"k={shots}"]["samples"] = int(len(chosen))
    return out
