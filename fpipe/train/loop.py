"""The training loop, readable top to bottom: build, resume, iterate with hooks, evaluate, write.

    config -> data -> model (init, load weights, partition) -> optimizer -> step
           -> resume from WORKDIR/checkpoints (beats pretrained weights) -> loop with hooks
           -> results.json
"""
import dataclasses
import json
import math
import os
from typing import Any, Callable

import torch
from absl import logging

from fpipe import data, freeze, optim, schedules, tree, weights, writers
from fpipe.models import model as models
from fpipe.train import checkpoint, hooks as hooks_lib, step as step_lib


class NonFiniteLossError(FloatingPointError):
    pass


@dataclasses.dataclass
class Context:
    """What hooks see: the loop's position, state and services."""
    config: Any
    workdir: str
    writer: Any
    step: int
    start_step: int
    total_steps: int
    steps_per_epoch: int
    train_state: dict
    evaluate: Callable
    save_checkpoint: Callable
    lr: float = 0.0
    metrics: dict = dataclasses.field(default_factory=dict)
    results: dict = dataclasses.field(default_factory=dict)


def run(config, workdir):
    """Trains and evaluates as ``config`` says; returns the final per-head results."""
    os.makedirs(workdir, exist_ok=True)
    torch.manual_seed(config.seed)

    # Data.
    dataset = data.build(config.data)
    train_loader = data.Loader(dataset.train, config.data, train=True)
    test_loader = data.Loader(dataset.test, config.data, train=False)
    steps_per_epoch = train_loader.steps_per_epoch
    total_steps = schedules.to_steps(config, "total", steps_per_epoch)

    # Model: init, then pretrained weights unless a checkpoint will be resumed.
    model = models.build(config.model, num_classes=dataset.num_classes, image_size=config.data.image_size)
    params, model_state = model.init(config.seed)
    resume_path = checkpoint.latest(workdir)
    if resume_path:
        logging.warning("Resuming from %s: it takes precedence over model.weights.path=%r, which is "
                        "not read.", resume_path, config.model.weights.path)
    else:
        params, model_state = load_weights(params, model_state, config.model.weights, workdir)
    trainable, frozen = freeze.partition(params, config.model.freeze)
    eval_norms = freeze.eval_norms(model_state, frozen)
    logging.info("Trainable: %d tensors (%d values); frozen: %d tensors (%d values).",
                 len(tree.leaves(trainable)), tree.tree_size(trainable),
                 len(tree.leaves(frozen)), tree.tree_size(frozen))

    # Optimizer, schedule, step.
    base_lr, lr_message = optim.scaled_lr(config.optim, config.data.batch_size)
    logging.info(lr_message)
    opt = optim.build(config.optim, trainable)
    for line in opt.describe():
        logging.info("optim: %s", line)
    schedule = schedules.build(config.schedule, steps_per_epoch, total_steps, base_lr=base_lr)
    train_state = {"trainable": trainable, "frozen": frozen, "model_state": model_state,
                   "opt_state": opt.init(trainable)}
    step_fn = step_lib.maybe_compile(
        step_lib.make_step(model, opt, eval_norms=eval_norms, clip=lambda g: optim.clip_and_norm(g, config.optim)),
        config.compile, "train step")
    eval_fn = step_lib.maybe_compile(step_lib.make_eval_step(model), config.compile, "eval step")

    # Resume: the whole train state, the data position and the hooks' state.
    the_hooks = [hooks_lib.LogMetrics(config.log_steps, config.data.batch_size),
                 hooks_lib.Evaluate(schedules.to_steps(config, "eval", steps_per_epoch, default=0)),
                 hooks_lib.Checkpoint(schedules.to_steps(config, "ckpt", steps_per_epoch, default=0))]
    start_step = 0
    if resume_path:
        saved, resume_path = checkpoint.restore(workdir)
        train_state, start_step = restore_train_state(train_state, saved)
        for hook, state in zip(the_hooks, saved.get("hooks", [])):
            hook.load_state_dict(state)
        logging.info("Resumed at step %d of %d from %s.", start_step, total_steps, resume_path)
    writer = writers.make_writers(workdir, is_main_process=True, total_steps=total_steps,
                                  batch_size=config.data.batch_size, resume_step=start_step)

    def evaluate():
        params = tree.merge(train_state["trainable"], train_state["frozen"])
        return evaluate_model(eval_fn, params, train_state["model_state"], test_loader)

    def save_checkpoint():
        checkpoint.save(workdir, ctx.step + 1, checkpoint_payload(ctx, the_hooks, config),
                        keep=config.keep_ckpts)

    ctx = Context(config, workdir, writer, start_step, start_step, total_steps, steps_per_epoch,
                  train_state, evaluate, save_checkpoint)
    for hook in the_hooks:
        hook.before_train(ctx)

    # The loop.
    batches = train_loader.iterate(start_step)
    for ctx.step in range(start_step, total_steps):
        for hook in the_hooks:
            hook.before_step(ctx)
        batch = next(batches)
        ctx.lr = base_lr * schedule(ctx.step)
        train_state, ctx.metrics = step_fn(train_state, batch, torch.tensor(ctx.lr, dtype=torch.float32))
        ctx.train_state = train_state
        if not math.isfinite(float(ctx.metrics["loss"])):
            raise NonFiniteLossError(
                f"loss is {float(ctx.metrics['loss'])} at step {ctx.step + 1}; the last good checkpoint "
                f"in {workdir}/checkpoints is kept. Lower optim.lr or check the data.")
        for hook in the_hooks:
            hook.after_step(ctx)

    for hook in the_hooks:
        hook.after_train(ctx)
    results = ctx.results or evaluate()
    hooks_lib.write_results(workdir, results, {"step": total_steps})
    log_results(results)
    writer.close()
    return results


def load_weights(params, model_state, weights_cfg, workdir):
    """Pretrained weights into the initialised model, with the load report saved to the workdir."""
    if not weights_cfg.path:
        logging.warning("model.weights.path is empty: the trunk stays at its RANDOM initialisation. "
                        "Set --config.model.weights.path=FILE to evaluate pretrained weights.")
        return params, model_state
    param_names = set(tree.flatten(params))
    target = {**tree.flatten(params), **tree.flatten(model_state)}
    loaded, report = weights.load_into(target, weights_cfg)
    with open(os.path.join(workdir, "weights_report.json"), "w") as f:
        json.dump(report.to_dict(), f, indent=2)
    with open(os.path.join(workdir, "weights_report.txt"), "w") as f:
        f.write(report.summary() + "\n")
    logging.info("Weights loaded from %s:\n%s", weights_cfg.path, report.summary())
    new_params = tree.unflatten({n: v for n, v in loaded.items() if n in param_names})
    new_state = tree.unflatten({n: v for n, v in loaded.items() if n not in param_names})
    return tree.merge_in_order(params, new_params), tree.merge_in_order(model_state, new_state)


def evaluate_model(eval_fn, params, model_state, loader):
    """Exact top-k per head over the whole split: counts add up across batches, then divide."""
    totals = {}
    for batch in loader.epoch(0):
        counts = eval_fn(params, model_state, batch)
        for head, c in counts.items():
            if head == "count":
                totals["count"] = totals.get("count", 0) + int(c)
                continue
            acc = totals.setdefault(head, {})
            for k, v in c.items():
                acc[k] = acc.get(k, 0) + int(v)
    n = max(totals.pop("count", 0), 1)
    return {head: {k: 100.0 * v / n for k, v in c.items()} for head, c in totals.items()}


def checkpoint_payload(ctx, the_hooks, config):
    ts = ctx.train_state
    return {
        "params": tree.flatten(tree.merge(ts["trainable"], ts["frozen"])),
        "model_state": tree.flatten(ts["model_state"]),
        "opt_state": ts["opt_state"],
        "step": ctx.step + 1,
        "rng": {"torch": torch.get_rng_state()},
        "hooks": [h.state_dict() for h in the_hooks],
        "meta": {"config": config.to_json()},
    }


def restore_train_state(train_state, saved):
    """The train state of a checkpoint, checked name by name against the model being trained."""
    params = saved["params"]
    names = set(tree.flatten(train_state["trainable"])) | set(tree.flatten(train_state["frozen"]))
    if set(params) != names:
        missing, extra = sorted(names - set(params)), sorted(set(params) - names)
        raise ValueError(f"the checkpoint does not fit this model: missing {missing[:5]}, unexpected "
                         f"{extra[:5]}. Was the config changed? Use a new --workdir for a new model.")
    trainable = tree.unflatten({n: params[n] for n in tree.flatten(train_state["trainable"])})
    frozen = tree.unflatten({n: params[n] for n in tree.flatten(train_state["frozen"])})
    torch.set_rng_state(saved["rng"]["torch"])
    return {"trainable": trainable, "frozen": frozen,
            "model_state": tree.unflatten(saved["model_state"]), "opt_state": saved["opt_state"]}, saved["step"]


def log_results(results):
    for head, r in results.items():
        logging.info("%-12s %s", head, "  ".join(f"{k}={v:.2f}" for k, v in r.items()))
