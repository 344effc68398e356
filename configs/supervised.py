r"""Supervised training of the same ResNet trunk end to end, with a torchvision-style ``fc`` head.

    python main.py --config=configs/supervised.py

Its checkpoints (runs/supervised/checkpoints/*.pt) load into linear_eval by
``--config.model.weights.path=...`` alone (fpipe's own checkpoint format is detected).
"""
from configs import common
from fpipe.defaults import head as head_config


def get_config(arg=None):
    c = common.base_config()
    c.total_epochs = 15.0
    c.model.heads.fc = head_config("flatten", "linear")   # names fc.weight/fc.bias, as torchvision
    c.optim.name = "sgd"
    c.optim.lr = 0.1
    c.optim.momentum = 0.9
    c.optim.weight_decay = 5e-4
    c.schedule.name = "cosine"
    c.schedule.warmup_epochs = 1.0
    return c
