r"""Feature extraction: trunk (and heads) frozen, no training; features of every split to disk.

    python main.py --config=configs/extract_features.py --config.model.weights.path=FILE

Writes WORKDIR/features/{train,test}.pt: {"features": {name: N×...}, "labels", "indices"}, and
results.json with the accuracy of heads loaded from the file (``model.weights.load_heads``).
"""
from configs import common
from fpipe.defaults import head as head_config


def get_config(arg=None):
    common.no_variants("extract_features", arg)
    c = common.base_config()
    c.model.freeze = ("all",)               # VISSL's FREEZE_TRUNK_AND_HEAD
    c.model.heads.fc = head_config("flatten", "linear")
    c.extract.features = ("res5avg", "flatten")
    return c
