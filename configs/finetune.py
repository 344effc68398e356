r"""Fine-tuning: the whole model trains, the pretrained trunk at a tenth of the heads' lr (by rule).

    python main.py --config=configs/finetune.py --config.model.weights.path=runs/supervised/checkpoints/ckpt_00000330.pt

Per-parameter policies are regex rules over dotted names (first match wins): ``optim.lr_mults``
slows the trunk; ``optim.wd_mults`` keeps norms and biases out of weight decay (the default).
``layer_freeze`` can hold chosen layers for the first steps (fastreid's FREEZE_ITERS).
"""
from configs import common
from fpipe.defaults import head as head_config


def get_config(arg=None):
    common.no_variants("finetune", arg)
    c = common.base_config()
    c.total_epochs = 5.0
    c.model.heads.fc = head_config("flatten", "linear")
    c.optim.name = "sgd"
    c.optim.lr = 0.05
    c.optim.momentum = 0.9
    c.optim.nesterov = True
    c.optim.weight_decay = 1e-4
    c.optim.lr_mults = ((r"trunk\..*", 0.1),)
    c.schedule.name = "cosine"
    c.schedule.warmup_epochs = 0.5
    c.precise_bn.num_batches = 8        # trunk BatchNorm statistics recomputed before evaluation
    c.best_metric = "fc/top1"
    c.eval_epochs = 1.0
    return c
