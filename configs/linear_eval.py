r"""Linear evaluation of a frozen ResNet trunk on several layers at once (VISSL style).

    python main.py --config=configs/linear_eval.py
    python main.py --config=configs/linear_eval.py --config.model.weights.path=runs/supervised/checkpoints/<latest>.pt

Default data: scikit-learn's embedded digits (no download). With no weights given it evaluates
the randomly initialised trunk and says so; see README.md for the numbers to expect.
"""
from configs import common
from fpipe.models.model import head_config


def get_config(arg=None):
    c = common.base_config()
    c.total_epochs = 10.0
    c.model.freeze = ("trunk",)          # freeze the trunk; its BatchNorm uses running statistics
    # One eval_mlp head (BatchNorm + linear) per evaluated layer; pooled to small fixed grids.
    c.model.heads.conv1 = head_config("conv1", "eval_mlp", pool=[4, 4])
    c.model.heads.res3 = head_config("res3", "eval_mlp", pool=[2, 2])
    c.model.heads.res4 = head_config("res4", "eval_mlp", pool=[2, 2])
    c.model.heads.res5avg = head_config("res5avg", "eval_mlp")
    c.optim.name = "sgd"
    c.optim.lr = 0.1
    c.optim.momentum = 0.9
    c.optim.nesterov = True
    c.optim.weight_decay = 5e-4
    c.schedule.name = "cosine"
    c.schedule.warmup_epochs = 1.0
    return c
