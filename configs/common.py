"""Pieces shared by the shipped configs: every section with its documented defaults."""
import ml_collections
from ml_collections.config_dict import placeholder

from fpipe import data, optim, schedules, weights
from fpipe.models import model


def base_config():
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.compile = True           # torch.compile the train and eval steps (eager on failure, logged)
    # Durations: config files give *_epochs; *_steps, set on the command line, win over them
    # (converted in one place, schedules.to_steps).
    c.total_epochs = 10.0
    c.total_steps = placeholder(int)
    c.log_steps = 10
    c.eval_epochs = placeholder(float)  # unset: evaluate only at the end
    c.eval_steps = placeholder(int)
    c.ckpt_epochs = 1.0
    c.ckpt_steps = placeholder(int)
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
