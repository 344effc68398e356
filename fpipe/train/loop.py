"""The training loop, readable top to bottom: build, resume, iterate with hooks, evaluate, write.

    config -> processes (torchrun or one) -> data shards -> model (init, load weights, freeze)
           -> optimizer, schedule -> resume from WORKDIR/checkpoints (beats pretrained weights)
           -> compiled step -> loop with hooks -> results.json
"""
import dataclasses
import functools
import json
import math
import os
import signal
import time
from typing import Any, Callable

import torch
from absl import logging

from fpipe import data, freeze, optim, schedules, tree, weights, writers
from fpipe.models import layers
from fpipe.models import model as models
from fpipe.evaluate import extract, topk
from fpipe import checkpoint
from fpipe.train import distributed, frozen_trunk, precision
from fpipe.train import hooks as hooks_lib
from fpipe.train import step as step_lib


class NonFiniteLossError(FloatingPointError):
    pass


@dataclasses.dataclass
class Context:
    """What hooks see: the loop's position, its state, and its services."""
    config: Any
    workdir: str
    dist: Any
    writer: Any
    step: int
    start_step: int
    total_steps: int
    steps_per_epoch: int
    train_state: dict
    evaluate: Callable
    save_checkpoint: Callable
    step_fn: Callable        # the current train step (LayerFreeze rebuilds it)
    prepare: Callable        # loader batch -> step batch (device, frozen-trunk features)
    rebuild_step: Callable
    precise_bn: Callable
    lr: float = 0.0
    metrics: dict = dataclasses.field(default_factory=dict)
    results: dict = dataclasses.field(default_factory=dict)
    results_step: int = -1


def run(config, workdir):
    """Trains and evaluates as ``config`` says; returns the final per-head results (None when
    stopped by SIGTERM/SIGINT, after writing a checkpoint)."""
    with StopOnSignal() as stop:
        return _run(config, workdir, stop)


def _run(config, workdir, stop):
    dist = distributed.init()
    os.makedirs(workdir, exist_ok=True)
    torch.manual_seed(config.seed)

    # Data: every rank reads its shard of each global batch.
    dataset = data.build(config.data)
    train_loader = data.Loader(dataset.train, config.data, train=True, rank=dist.rank, world_size=dist.world_size)
    test_loader = data.Loader(dataset.test, config.data, train=False, rank=dist.rank, world_size=dist.world_size)
    steps_per_epoch = train_loader.steps_per_epoch
    total_steps = schedules.to_steps(config, "total", steps_per_epoch)

    # Model: init, then pretrained weights unless a checkpoint will be resumed; then freeze.
    model = models.build(config.model, num_classes=dataset.num_classes, image_size=config.data.image_size)
    params, model_state = model.init(config.seed)
    resume_path = checkpoint.latest(workdir)
    if resume_path:
        logging.warning("Resuming from %s: it takes precedence over model.weights.path=%r, which is "
                        "not read.", resume_path, config.model.weights.path)
    else:
        params, model_state = load_weights(params, model_state, config.model.weights, workdir, dist.is_main)
    freeze_rules = tuple(config.model.freeze) + freeze.frozen_by_rules(params, config.optim.lr_mults)
    trainable, frozen = freeze.partition(params, freeze_rules)
    eval_norms = freeze.eval_norms(model_state, frozen)
    logging.info("Trainable: %d tensors (%d values); frozen: %d tensors (%d values).",
                 len(tree.leaves(trainable)), tree.tree_size(trainable),
                 len(tree.leaves(frozen)), tree.tree_size(frozen))

    # Optimizer and schedule; the lr follows the global batch when optim.scale_lr is on.
    base_lr, lr_message = optim.scaled_lr(config.optim, config.data.batch_size)
    logging.info("%s (world size %d)", lr_message, dist.world_size)
    opt = optim.build(config.optim, trainable)
    for line in opt.describe():
        logging.info("optim: %s", line)
    schedule = schedules.build(config.schedule, steps_per_epoch, total_steps, base_lr=base_lr)
    train_state = {"trainable": trainable, "frozen": frozen, "model_state": model_state,
                   "opt_state": opt.init(trainable)}
    if precision.needs_scaler(config.precision):
        train_state["scaler"] = precision.scaler_init(config.precision)

    # Resume: the whole train state and the hooks' state; the data position follows the step.
    start_step, saved = 0, None
    if resume_path:
        saved, resume_path = checkpoint.restore(workdir)
        train_state, start_step = restore_train_state(train_state, saved, workdir)
        logging.info("Resumed at step %d of %d from %s.", start_step, total_steps, resume_path)
    train_state = to_device(train_state, dist.device)
    if saved and saved.get("frozen_params"):  # verified when the train state was restored
        frozen_ref = saved["frozen_params"]
    else:
        frozen_ref = checkpoint.save_frozen(workdir, tree.flatten(frozen)) if dist.is_main else None

    # The compiled steps. With the whole trunk frozen, the trunk runs as a compiled constant and
    # only the heads are differentiated (fpipe.train.frozen_trunk: same math, faster).
    steps = StepFactory(config, model, opt, train_state, eval_norms, dist)
    eval_fn = steps.eval_step()

    def evaluate():
        params = tree.merge(ctx.train_state["trainable"], ctx.train_state["frozen"])
        results = topk.evaluate(eval_fn, params, ctx.train_state["model_state"], test_loader, dist,
                                 steps.prepare)
        ctx.results_step = ctx.step
        return results

    built = {}  # this step's payload, built once when several hooks save

    def save_checkpoint(best=None):
        if not dist.is_main:
            return
        if built.get("step") != ctx.step:
            built.update(step=ctx.step, payload=checkpoint_payload(ctx, the_hooks, config, frozen_ref))
        payload = built["payload"]
        if best is None:
            checkpoint.save(workdir, ctx.step + 1, payload, keep=config.keep_ckpts)
        else:
            checkpoint.save_best(workdir, ctx.step + 1, payload, *best)

    def rebuild_step(hold):
        ctx.step_fn = steps.train_step(hold=hold)

    def precise_bn(num_batches):
        """Statistics of the global batch (synced over processes), as one process would compute."""
        params = tree.merge(ctx.train_state["trainable"], ctx.train_state["frozen"])
        batches = (steps.prepare(b)["image"] for _, b in zip(range(num_batches), train_loader.epoch(ctx.step)))
        apply = functools.partial(steps.model.apply, sync_stats=distributed.sync_stats(dist))
        return hooks_lib.precise_bn_statistics(apply, params, ctx.train_state["model_state"],
                                               batches, eval_norms, layers.BN_MOMENTUM)

    timer = writers.EtaTimer(total_steps, batch_size=config.data.batch_size, start_step=start_step)
    the_hooks = make_hooks(config, steps_per_epoch, timer)
    if saved:
        for hook, state in zip(the_hooks, saved.get("hooks", [])):
            hook.load_state_dict(state)
    writer = writers.make_writers(workdir, dist.is_main, total_steps=total_steps, resume_step=start_step,
                                  timer=timer)
    ctx = Context(config, workdir, dist, writer, start_step, start_step, total_steps, steps_per_epoch,
                  train_state, evaluate, save_checkpoint, steps.train_step(), steps.prepare, rebuild_step,
                  precise_bn)
    try:
        if not tree.leaves(trainable):
            logging.warning("model.freeze leaves nothing to train: evaluating the model as loaded.")
            results = evaluate_only(ctx)
        else:
            results = train_loop(ctx, the_hooks, train_loader, schedule, base_lr, stop)
        if results is not None and config.extract.features:
            params = tree.merge(ctx.train_state["trainable"], ctx.train_state["frozen"])
            extract.run(config, workdir, model, params, ctx.train_state["model_state"], dataset, dist,
                        lambda b: to_device(b, dist.device))
        return results
    finally:
        writer.close()
        dist.shutdown()


def train_loop(ctx, the_hooks, train_loader, schedule, base_lr, stop):
    """Steps from ``ctx.start_step`` to the end with hooks around each; then the final results."""
    for hook in the_hooks:
        hook.before_train(ctx)

    batches = train_loader.iterate(ctx.start_step)
    for ctx.step in range(ctx.start_step, ctx.total_steps):
        for hook in the_hooks:
            hook.before_step(ctx)
        t0 = time.perf_counter()
        batch = next(batches)
        data_time = time.perf_counter() - t0
        batch = ctx.prepare(batch)
        ctx.lr = base_lr * schedule(ctx.step)
        ctx.train_state, ctx.metrics = ctx.step_fn(ctx.train_state, batch, torch.tensor(ctx.lr, dtype=torch.float32))
        check_finite(ctx.metrics, ctx.step, ctx.workdir, skips_bad_steps="scaler" in ctx.train_state)
        ctx.metrics["data_time"] = data_time
        for hook in the_hooks:
            hook.after_step(ctx)
        if stop.requested and ctx.step + 1 < ctx.total_steps:
            ctx.save_checkpoint()
            logging.warning("Stopped by %s at step %d; a checkpoint is written: re-run the same "
                            "command to continue.", stop.requested, ctx.step + 1)
            return None

    for hook in the_hooks:
        hook.after_train(ctx)
    results = ctx.results or ctx.evaluate()
    if ctx.dist.is_main:
        hooks_lib.write_results(ctx.workdir, results, {"step": ctx.total_steps, "world_size": ctx.dist.world_size})
        log_results(results)
    return results


def evaluate_only(ctx):
    """No training: evaluate the heads as loaded (VISSL's frozen trunk and heads) and write results."""
    ctx.step = ctx.total_steps - 1
    results = ctx.evaluate()
    if ctx.dist.is_main:
        hooks_lib.write_results(ctx.workdir, results, {"step": 0, "world_size": ctx.dist.world_size})
        log_results(results)
    return results


def make_hooks(config, steps_per_epoch, timer):
    """The hooks, in the order they run (see fpipe.train.hooks)."""
    to_steps = lambda name: schedules.to_steps(config, name, steps_per_epoch, default=0)
    eval_every = to_steps("eval")
    hooks = []
    if config.get("layer_freeze") and config.layer_freeze.rules:
        hooks.append(hooks_lib.LayerFreeze(config.layer_freeze.rules,
                                           schedules.to_steps(config.layer_freeze, "freeze", steps_per_epoch, 0)))
    hooks.append(hooks_lib.LogMetrics(config.log_steps, timer))
    if config.get("precise_bn") and config.precise_bn.num_batches:
        hooks.append(hooks_lib.PreciseBN(eval_every, config.precise_bn.num_batches))
    hooks.append(hooks_lib.Evaluate(eval_every))
    if config.get("best_metric"):
        hooks.append(hooks_lib.BestCheckpoint(config.best_metric, config.get("best_mode", "max")))
    hooks.append(hooks_lib.Checkpoint(to_steps("ckpt")))
    return hooks


class StepFactory:
    """Builds the train and eval steps for this run's model, precision, processes and freezing."""

    def __init__(self, config, model, opt, train_state, eval_norms, dist):
        self.config, self.opt, self.eval_norms, self.dist = config, opt, eval_norms, dist
        self.model, self.features = model, None
        self.trainable, self.model_state = train_state["trainable"], train_state["model_state"]
        self.autocast = precision.autocast_dtype(config.precision, dist.device)
        trunk_frozen = not tree.flatten(train_state["trainable"].get("trunk", {}))
        if trunk_frozen and config.get("fast_frozen_trunk", True):
            ft = frozen_trunk.frozen_trunk(model, train_state["trainable"], train_state["frozen"],
                                           train_state["model_state"], eval_norms, compile=config.compile)
            self.model, self.features = ft.model, ft.features
            logging.info("The trunk is frozen: it runs as a constant%s, and only the heads are differentiated.",
                         " compiled with inductor freezing" if config.compile else "")
        self.sync_stats = None
        if config.get("sync_bn"):
            group = config.get("sync_bn_group", "global")
            self.sync_stats = distributed.sync_stats(dist, int(group) if str(group).isdigit() else group)

    def train_step(self, hold=()):
        held, eval_norms = frozenset(), self.eval_norms
        if hold:  # LayerFreeze: these params stay fixed, their norms use running statistics
            _, held_tree = freeze.partition(self.trainable, hold)
            held = frozenset(tree.flatten(held_tree))
            eval_norms = eval_norms | freeze.eval_norms(self.model_state, held_tree)
        step = step_lib.make_step(
            self.model, self.opt, eval_norms=eval_norms, hold=held,
            clip=self.opt.clip_and_norm,
            grad_reduce=distributed.grad_mean(self.dist), sync_stats=self.sync_stats, autocast=self.autocast,
            loss_scaling=self.config.precision if precision.needs_scaler(self.config.precision) else None)
        return step_lib.maybe_compile(step, self.config.compile, "train step")

    def eval_step(self):
        return step_lib.maybe_compile(step_lib.make_eval_step(self.model, autocast=self.autocast),
                                      self.config.compile, "eval step")

    def prepare(self, batch):
        """A loader batch on this process's device; trunk features in place of images if frozen."""
        batch = to_device(batch, self.dist.device)
        if self.features is not None:
            batch = {**batch, "image": self.features(batch["image"])}
        return batch



def load_weights(params, model_state, weights_cfg, workdir, write_report=True):
    """Pretrained weights into the initialised model, with the load report saved to the workdir."""
    if not weights_cfg.path:
        logging.warning("model.weights.path is empty: the trunk stays at its RANDOM initialisation. "
                        "Set --config.model.weights.path=FILE to evaluate pretrained weights.")
        return params, model_state
    param_names = set(tree.flatten(params))
    loaded, report = weights.load_into({**tree.flatten(params), **tree.flatten(model_state)}, weights_cfg)
    if write_report:
        with open(os.path.join(workdir, "weights_report.json"), "w") as f:
            json.dump(report.to_dict(), f, indent=2)
        with open(os.path.join(workdir, "weights_report.txt"), "w") as f:
            f.write(report.summary() + "\n")
    logging.info("Weights loaded from %s:\n%s", weights_cfg.path, report.summary())
    new_params = tree.unflatten({n: v for n, v in loaded.items() if n in param_names})
    new_state = tree.unflatten({n: v for n, v in loaded.items() if n not in param_names})
    return tree.merge_in_order(params, new_params), tree.merge_in_order(model_state, new_state)


def check_finite(metrics, step, workdir, skips_bad_steps):
    """A NaN/inf loss (or grad norm, unless fp16 loss scaling skips such steps) stops the run."""
    values = {"loss": float(metrics["loss"])}
    if not skips_bad_steps:
        values["grad_norm"] = float(metrics["grad_norm"])
    for name, value in values.items():
        if not math.isfinite(value):
            raise NonFiniteLossError(
                f"{name} is {value} at step {step + 1}; the last good checkpoint in {workdir}/checkpoints "
                "is kept (nothing after it was saved). Lower optim.lr, set optim.clip_grad_norm, or check the data.")


def checkpoint_payload(ctx, the_hooks, config, frozen_ref):
    ts = ctx.train_state
    return {
        "params": tree.flatten(to_device(ts["trainable"], "cpu")),
        "frozen_params": frozen_ref,
        "model_state": tree.flatten(to_device(ts["model_state"], "cpu")),
        "opt_state": to_device(ts["opt_state"], "cpu"),
        "scaler": to_device(ts.get("scaler"), "cpu"),
        "step": ctx.step + 1,
        "rng": {"torch": torch.get_rng_state()},
        "hooks": [h.state_dict() for h in the_hooks],
        "meta": {"config": config.to_json_best_effort()},
    }


def restore_train_state(train_state, saved, workdir):
    """The train state of a checkpoint, checked name by name against the model being trained."""
    trainable_names = set(tree.flatten(train_state["trainable"]))
    frozen_names = set(tree.flatten(train_state["frozen"]))
    params = dict(saved["params"])
    if saved.get("frozen_params"):
        params.update(checkpoint.load_frozen(workdir, saved["frozen_params"]))
    if set(params) != trainable_names | frozen_names:
        expected = trainable_names | frozen_names
        missing, extra = sorted(expected - set(params)), sorted(set(params) - expected)
        raise ValueError(f"the checkpoint in {workdir} does not fit this model: missing {missing[:5]}, "
                         f"unexpected {extra[:5]}. Was the config changed? Use a new --workdir for a new model.")
    restored = {
        "trainable": tree.unflatten({n: params[n] for n in tree.flatten(train_state["trainable"])}),
        "frozen": tree.unflatten({n: params[n] for n in tree.flatten(train_state["frozen"])}),
        "model_state": tree.unflatten(saved["model_state"]),
        "opt_state": saved["opt_state"],
    }
    if "scaler" in train_state:
        restored["scaler"] = saved.get("scaler") or train_state["scaler"]
    torch.set_rng_state(saved["rng"]["torch"])
    return restored, saved["step"]


def to_device(t, device):
    """Every tensor of a tree on ``device`` (asynchronous only towards an accelerator: a copy to
    the CPU must be complete before a checkpoint hashes and saves it)."""
    device = torch.device(device)
    move = lambda x: x.to(device, non_blocking=device.type != "cpu") if isinstance(x, torch.Tensor) else x
    return None if t is None else tree.map_leaves(move, t) if isinstance(t, dict) else move(t)


class StopOnSignal:
    """SIGTERM / SIGINT ask the loop to write a checkpoint and exit cleanly after the current step."""

    def __init__(self):
        self.requested = None
        self._previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass

    def _handle(self, signum, frame):
        self.requested = signal.Signals(signum).name

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def log_results(results):
    for head, r in results.items():
        logging.info("%-12s %s", head, "  ".join(f"{k}={v:.2f}" for k, v in r.items()))
