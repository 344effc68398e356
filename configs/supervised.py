r"""Supervised training of the same ResNet trunk end to end, with a torchvision-style ``fc`` head.

    python main.py --config=configs/supervised.py

Its checkpoints (runs/supervised/checkpoints/*.pt) load into linear_eval by
``--config.model.weights.path=...`` alone (fpipe's own checkpoint format is detected).

Variant ``:multi_task``: one trunk, four heads, each with its own target and loss (the digits'
extra targets, fpipe/data/digits.py): ``fc`` the class (cross-entropy), ``parity`` (cross-entropy,
2 classes), ``attributes`` (3 binary columns, bce) and ``ink`` (the image's standardised mean
intensity, mse) — the summed loss trains the trunk for all four.

    python main.py --config=configs/supervised.py:multi_task
"""
from configs import common
from fpipe.defaults import head as head_config


VARIANTS = ("multi_task",)


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
    if arg in VARIANTS:
        globals()[arg](c)
    elif arg:
        raise ValueError(f"unknown supervised variant {arg!r}; valid: {VARIANTS}")
    return c


def multi_task(c):
    c.model.heads.parity = head_config("flatten", "linear", target="parity")
    c.model.heads.attributes = head_config("flatten", "linear", target="attributes", loss="bce")
    c.model.heads.ink = head_config("res4", "eval_mlp", pool=[1, 1], target="ink", loss="mse", loss_weight=0.02)
