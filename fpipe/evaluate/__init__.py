"""Evaluation: everything that turns a model (or its cached features) into numbers.

``topk`` (exact top-k per head over a split, the train loop's evaluation) and ``extract`` (trunk
features of every sample to disk). Protocols that read those features live here too.
"""
