"""Pieces shared by the shipped configs: every section with its documented defaults."""
import ml_collections

from fpipe import data, optim, schedules, weights
from fpipe.models import model


def base_config():
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.compile = True           # torch.compile the train and eval steps (eager on failure, logged)
    c.total_epochs = 10        # or total_steps; durations convert in one place (schedules.to_steps)
    c.log_steps = 10
    c.eval_epochs = 0          # 0: evaluate only at the end; or eval_steps
    c.ckpt_steps = 50          # or ckpt_epochs
    c.keep_ckpts = 3
    c.data = data.default_config()
    c.data.image_size = 32     # digits are 8x8: 32 px keeps every stage of a ResNet meaningful
    c.model = ml_collections.ConfigDict()
    c.model.trunk = model.trunk_config(depth=18)
    c.model.heads = ml_collections.ConfigDict()
    c.model.weights = weights.default_config()
    c.model.freeze = ()
    c.optim = optim.default_config()
    c.schedule = schedules.default_config()
    return c
