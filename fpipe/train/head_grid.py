"""A grid of heads on one trunk pass (dinov2's linear evaluation, with augmentation).

``config.head_grid.lrs`` (absolute learning rates) × ``wd_mults`` (multipliers of
``optim.weight_decay``) turns every head of ``model.heads`` into one copy per pair, named
``<head>_lr<lr>_wd<mult>``; each copy gets its lr through an ``optim.lr_mults`` rule. All
copies see the same batches and the same trunk features, so the grid costs one trunk pass.
The best copy of each head is chosen on a validation split — ``data.val_split`` if the dataset
has one, else ``val_fraction`` of train carved per class (seeded by ``data.seed``), which the
heads then do not train on — never on test, and reported under the head's own name.
"""
import copy
import re

import torch

from fpipe.data import base
from fpipe.models import losses


def enabled(config) -> bool:
    return bool(config.get("head_grid") and tuple(config.head_grid.lrs))


def member_name(head: str, lr: float, wd_mult: float) -> str:
    tag = lambda v: f"{v:g}".replace(".", "p").replace("-", "m").replace("+", "")
    return f"{head}_lr{tag(lr)}_wd{tag(wd_mult)}"


def members(config) -> dict:
    """``{head: [(member name, lr, wd_mult), ...]}`` in grid order (lrs outer, wd_mults inner)."""
    grid = config.head_grid
    return {head: [(member_name(head, lr, m), float(lr), float(m)) for lr in grid.lrs for m in grid.wd_mults]
            for head in config.model.heads}


def expand(config):
    """A copy of ``config`` whose heads are the grid's members, with their lr and wd rules first."""
    if not enabled(config):
        return config
    base_lr = float(config.optim.lr)
    if not base_lr > 0:
        raise ValueError(f"head_grid.lrs needs optim.lr > 0 (each member's lr is an optim.lr_mults "
                         f"multiple of it), got optim.lr={config.optim.lr!r}")
    if any(float(lr) <= 0 for lr in config.head_grid.lrs) or any(float(m) < 0 for m in config.head_grid.wd_mults):
        raise ValueError(f"head_grid.lrs must be > 0 and head_grid.wd_mults >= 0, got "
                         f"{tuple(config.head_grid.lrs)} and {tuple(config.head_grid.wd_mults)}")
    out = copy.deepcopy(config)
    with out.unlocked():
        heads, lr_rules, wd_rules = {}, [], []
        for head, group in members(config).items():
            for name, lr, wd_mult in group:
                heads[name] = copy.deepcopy(config.model.heads[head])
                lr_rules.append((rf"heads\.{name}\..*", lr / base_lr))
                wd_rules += member_wd_rules(name, wd_mult, config.optim.wd_mults)
        out.model.heads = type(config.model.heads)(heads)
        out.optim.lr_mults = tuple(lr_rules) + tuple(config.optim.lr_mults)
        out.optim.wd_mults = tuple(wd_rules) + tuple(config.optim.wd_mults)
    return out


def member_wd_rules(name: str, wd_mult: float, rules) -> list:
    """A member's weight decay: ``wd_mult`` × what the config's own ``wd_mults`` rules give each
    of its params (biases and norms 0 stay 0; a user's rule keeps its place), i.e. each rule
    again, scoped to the member by a look-ahead on its prefix, then ``wd_mult`` for the rest."""
    scoped = lambda pattern: rf"(?=heads\.{re.escape(name)}\.)(?:{pattern})"
    return [(scoped(p), float(m) * wd_mult) for p, m in rules] + [(rf"heads\.{re.escape(name)}\..*", wd_mult)]


def same_init(plan: dict, params: dict, state: dict, head_params: dict, head_state: dict) -> tuple:
    """``params`` and ``state`` with every member's head tensors copied from its head's own init
    (``head_params``/``head_state``: ``init_heads`` of the model without the grid), so a member
    starts, and trains, exactly as its head would alone at the member's lr and weight decay."""
    params, state = {**params, "heads": dict(params["heads"])}, {**state, "heads": dict(state["heads"])}
    copy_of = lambda t: {k: copy_of(v) for k, v in t.items()} if isinstance(t, dict) else t.clone()
    for head, group in plan.items():
        for name, _, _ in group:
            params["heads"][name] = copy_of(head_params[head])
            state["heads"][name] = copy_of(head_state[head])
    return params, state


def carve_val(dataset, config):
    """``dataset`` with a validation split: its own, or ``val_fraction`` of train per class."""
    if dataset.val is not None:
        return dataset, "data.val_split"
    labels = dataset.train.labels
    gen = torch.Generator().manual_seed(int(config.data.seed))
    val = []
    for cls in range(dataset.num_classes):
        idx = torch.nonzero(labels == cls).flatten()
        take = int(round(len(idx) * float(config.head_grid.val_fraction)))
        if len(idx) > 1:
            take = min(max(take, 1), len(idx) - 1)
            val.append(idx[torch.randperm(len(idx), generator=gen)[:take]])
    val = torch.sort(torch.cat(val)).values if val else torch.zeros(0, dtype=torch.long)
    keep = torch.ones(len(labels), dtype=torch.bool)
    keep[val] = False
    train = Subset(dataset.train, torch.nonzero(keep).flatten())
    carved = f"{len(val)} of train's {len(labels)} samples (head_grid.val_fraction, per class)"
    return type(dataset)(dataset.name, dataset.classes, train, dataset.test, Subset(dataset.train, val)), carved


class Subset:
    """The samples ``indices`` of a split, as a split."""

    def __init__(self, split, indices):
        self.split, self.indices = split, indices.to(torch.long)
        self.labels = split.labels[self.indices]
        self.targets = {k: v[self.indices] for k, v in base.targets_of(split).items()}

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index):
        return self.split[int(self.indices[index])]


def select(plan: dict, test: dict, val: dict) -> tuple:
    """``(results, grid)``: per head, the test metrics of the member best on val (the first on
    ties) with its lr, wd_mult and val metric (top-1, or its loss's own: ``acc`` up, ``mse``
    down); and every member's val and test metric. ``plan``: ``members(config)`` of the config
    before ``expand``."""
    results, grid = {}, {}
    for head, group in plan.items():
        metric = losses.selected_by(val[group[0][0]])
        sign = -1.0 if metric in losses.LOWER_IS_BETTER else 1.0
        rows = [{"name": name, "lr": lr, "wd_mult": m, f"val_{metric}": val[name][metric],
                 f"test_{metric}": test[name][metric]} for name, lr, m in group]
        best = max(range(len(rows)), key=lambda i: (sign * rows[i][f"val_{metric}"], -i))
        chosen = rows[best]
        results[head] = {**test[chosen["name"]], "lr": chosen["lr"], "wd_mult": chosen["wd_mult"],
                         f"val_{metric}": chosen[f"val_{metric}"], "member": chosen["name"]}
        grid[head] = rows
    return results, grid
