"""Evaluation: everything that turns a model (or its cached features) into numbers.

``topk`` (exact top-k per head over a split, the train loop's evaluation), ``extract`` (features
of every sample to ``WORKDIR/features/*.safetensors``) and the protocols on those features:
``knn``, ``linear`` (a grid of heads in one pass), ``logreg`` (L-BFGS, C sweep), ``lowshot``.
``run(config, workdir)`` is an evaluation run (``config.eval``; see docs/EVALUATION.md).
"""


def run(config, workdir, run_info=None):
    """Runs ``config.eval.protocols`` (imported lazily: the train loop imports this package)."""
    from fpipe.evaluate import protocols
    return protocols.run(config, workdir, run_info)
