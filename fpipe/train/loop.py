"""The training loop, readable top to bottom (big_vision's train.py is the model):

    processes -> data -> model -> weights (resume > pretrained > init) -> freeze -> optimizer
    -> compiled steps -> for each step: batch, step, then "is it time?" to log / evaluate /
    checkpoint -> final evaluation -> results.json

Everything the run decides is logged once; every periodic action is a plain check after the step.
"""
import datetime
import json
import os
import subprocess
import time

import torch
from absl import logging

import fpipe
from fpipe import checkpoint, data, files, freeze, host_memory, optim, schedules, tree, weights
from fpipe import workdir as workdir_lib
from fpipe.data import identity
from fpipe.data import mix as data_mix
from fpipe.weights import folders as weights_folders
from fpipe.weights import heads_file as weights_heads_file
from fpipe.evaluate import extract, real, topk
from fpipe.models import fold, layers, losses
from fpipe.models import model as models
from fpipe.train import (compile_cache, distributed, donation, ema, frozen_trunk, head_grid, periodic,
                         precision, remat, row_sums)
from fpipe.train import step as step_lib
from fpipe.train.signals import Stopped, StopOnSignal


def run(config, workdir, run_info=None):
    """Trains and evaluates as ``config`` says; returns the final results per head.

    Raises ``Stopped`` (after writing a checkpoint) on SIGTERM/SIGINT, ``DivergedError`` when the
    train state goes non-finite (nothing non-finite is ever saved).
    """
    return in_processes(_run, config, workdir, run_info)


def in_processes(body, config, workdir, run_info=None):
    """``body(config, workdir, dist, stop, run_info)`` between the processes' start and shutdown
    (``distributed.init``), with SIGTERM/SIGINT as stop requests and a collective's timeout
    explained. Every training run starts here (fpipe.detection.train too)."""
    with StopOnSignal() as stop:
        with stop.interruptible():  # nothing to lose before the first step: a signal stops at once
            dist = distributed.init(timeout_s=config.get("collective_timeout_s"))
            choose_conv_algorithms(config, dist.device)
        try:
            return body(config, workdir, dist, stop, dict(run_info or {}))
        except RuntimeError as e:
            explained = distributed.explain_timeout(e, dist, config.get("collective_timeout_s"))
            if explained is not None:
                raise explained from e
            raise
        finally:
            dist.shutdown()


def choose_conv_algorithms(config, device) -> None:
    """On CUDA, ``config.cudnn_benchmark``: cuDNN times its algorithms for each new conv shape and
    keeps the fastest (torchvision's reference recipes and DINO do; fpipe's steps have fixed
    shapes); False keeps PyTorch's default, cuDNN's heuristics. CPU runs are left as they are."""
    if torch.device(device).type == "cuda":
        torch.backends.cudnn.benchmark = bool(config.get("cudnn_benchmark", False))


def _run(config, workdir, dist, stop, run_info):
    started = _now()
    torch.manual_seed(config.seed)
    with stop.interruptible():
        # ---------------------------------------------------------------- data: every rank its shard
        grid_plan = head_grid.members(config) if head_grid.enabled(config) else None
        config, model_config_without_grid = head_grid.expand(config), config.model  # one member per (lr, wd)
        dataset = data.build(config.data)
        run_info["data_digest"] = identity.digest(dataset)  # what the splits hold: a resume checks it
        val_loader = None
        if grid_plan:
            dataset, val_from = head_grid.carve_val(dataset, config)
            val_loader = make_loader(dataset.val, config, dist, train=False)
            logging.info("head_grid: %d members per head, the best chosen on val: %s.",
                         len(config.head_grid.lrs) * len(config.head_grid.wd_mults), val_from)
        train_loader = make_loader(dataset.train, config, dist, train=True)
        test_loader = make_loader(dataset.test, config, dist, train=False)
        if train_loader.local_batch_size % int(config.get("accum_steps", 1)):
            raise ValueError(f"accum_steps={config.accum_steps} must divide each process's batch, "
                             f"data.batch_size={config.data.batch_size} / {dist.world_size} processes = "
                             f"{train_loader.local_batch_size}, into equal parts")
        real_lists = real.lists(config.data, dataset)  # data.real_labels: ImageNet-ReaL's, or None
        real_lists = None if real_lists is None else real_lists.to(dist.device)
        steps_per_epoch = train_loader.steps_per_epoch
        total_steps = schedules.to_steps(config, "total", steps_per_epoch)

        # ---------------------------------------------------------------- model
        sizes = dict(num_classes=dataset.num_classes, image_size=config.data.image_size,
                     target_sizes=data.base.target_sizes(dataset))
        model = models.build(config.model, **sizes)
        params, model_state = model.init(config.seed)
        if grid_plan:  # every member starts from its head's own init (the heads alone: no second trunk init)
            base = models.build(model_config_without_grid, **sizes)
            params, model_state = head_grid.same_init(grid_plan, params, model_state, *base.init_heads(config.seed))

        # ---------------------------------------------------------------- weights: resume > pretrained > init
        saved, resume_path = checkpoint.restore(workdir)
        if saved:
            run_info.setdefault("config_changes", {}).update(check_resumed_data(saved, run_info, resume_path,
                                                                                workdir, dist))
            logging.warning("Resuming from %s: it takes precedence over model.weights.path=%r%s, which is not "
                            "read.", resume_path, config.model.weights.path,
                            f" and model.head_weights.path={config.model.head_weights.path!r}"
                            if config.model.head_weights.path else "")
            run_info["weights"] = (saved.get("meta") or {}).get("weights")
        else:
            params, model_state, run_info["weights"] = initial_weights(params, model_state, config.model.weights,
                                                                       workdir, dist.is_main)
            if config.model.head_weights.path:
                params, model_state, run_info["head_weights"] = load_head_weights(
                    params, model_state, config.model.head_weights, workdir, dist.is_main)

        # ---------------------------------------------------------------- freeze, optimizer, schedule
        freeze_rules = tuple(config.model.freeze) + freeze.frozen_by_rules(params, config.optim.lr_mults)
        trainable, frozen = freeze.partition(params, freeze_rules)
        eval_norms = freeze.eval_norms(model_state, frozen, trainable)
        logging.info("Trainable: %d tensors (%d values); frozen: %d tensors (%d values).",
                     len(tree.leaves(trainable)), tree.tree_size(trainable), len(tree.leaves(frozen)),
                     tree.tree_size(frozen))
        base_lr, lr_message = optim.scaled_lr(config.optim, config.data.batch_size)
        logging.info("%s (world size %d)", lr_message, dist.world_size)
        opt = optim.build(config.optim, trainable, model_names=list(tree.flatten(params)))
        for line in opt.describe():
            logging.info("optim: %s", line)
        schedule = schedules.build(config.schedule, steps_per_epoch, total_steps, base_lr=base_lr)
        train_state = {"trainable": trainable, "frozen": frozen, "model_state": model_state,
                       "opt_state": opt.init(trainable)}
        if precision.needs_scaler(config.precision):
            train_state["scaler"] = precision.scaler_init(config.precision)
        if ema.enabled(config.get("ema")):  # the average starts at the loaded weights
            if tree.leaves(trainable):
                train_state[ema.KEY] = ema.init(trainable, model_state)
            logging.info("ema: %s", ema.describe(config.ema, train_state.get(ema.KEY)))
        start_step = 0
        if saved:
            train_state, start_step = checkpoint.restore_train_state(train_state, saved, workdir, resume_path)
            logging.info("Resumed at step %d of %d.", start_step, total_steps)
        train_state = to_device(train_state, dist.device)
        training, averaging = bool(tree.leaves(trainable)), ema.KEY in train_state
        frozen_ref = saved.get("frozen_params") if saved else None
        if training and frozen_ref is None and dist.is_main and tree.leaves(frozen):
            frozen_ref = checkpoint.save_frozen(workdir, tree.flatten(frozen))

        # ---------------------------------------------------------------- the compiled steps
        # Decisions, each visible: compile or not; mixed precision; SyncBN (global-batch statistics,
        # on by default); a fully frozen trunk runs as a constant and only the heads are differentiated.
        compiling = should_compile(config, (total_steps - start_step) * config.data.batch_size)
        # Conv weights and their slots NHWC, compiled or not: the eager step too runs 1.13-1.22x
        # faster so (fpipe.models.fold.channels_last; docs/BENCHMARKS.md, thirty-first session).
        train_state = fold.channels_last(train_state)
        autocast = precision.autocast_dtype(config.precision, dist.device)
        sync_stats = (distributed.sync_stats(dist, _group(config.get("sync_bn_group", "global")))
                      if config.get("sync_bn") else None)
        step_model, trunk_features = model, None
        mixing = data_mix.enabled(config.get("mix"))
        if not tree.flatten(trainable.get("trunk", {})) and config.fast_frozen_trunk:
            # from the train state: on a resume it holds the checkpoint's tensors, not the fresh init's
            ft = frozen_trunk.frozen_trunk(model, train_state["trainable"], train_state["frozen"],
                                           train_state["model_state"], eval_norms, compile=compiling,
                                           batch_size=train_loader.local_batch_size, cache=trunk_cache(config, dist),
                                           autocast=autocast)
            step_model, trunk_features = ft.model, ft.features
            logging.info("The trunk is frozen: it runs as a constant%s; only the heads are differentiated.",
                         " compiled with inductor freezing" if compiling else "")

        def prepare(batch, step=None):
            """A loader batch on this process's device, mixed for training ``step`` (``config.mix``);
            trunk features in place of images if frozen."""
            batch = to_device(batch, dist.device)
            if step is not None and mixing:
                batch = data_mix.training_batch(batch, config.mix, dataset.num_classes, config.data.seed, step)
            return {**batch, "image": trunk_features(batch["image"])} if trunk_features else batch

        def make_train_step(hold):
            return build_train_step(config, step_model, opt, trainable, model_state, eval_norms, dist,
                                    compiling=compiling, sync_stats=sync_stats, autocast=autocast,
                                    heads_only=trunk_features is not None, hold=hold)

        eval_step = build_eval_step(config, step_model, dist, compiling=compiling, autocast=autocast)
        hold_rules = freeze.rules(config.layer_freeze.rules)
        hold_until = schedules.to_steps(config.layer_freeze, "freeze", steps_per_epoch, 0) if hold_rules else 0
        holding = start_step < hold_until
        if holding:
            logging.info("LayerFreeze: holding %s until step %d.", hold_rules, hold_until)
        train_step = make_train_step(hold_rules if holding else ())

    # -------------------------------------------------------------------- services for the loop
    def evaluate(state, loader=test_loader):
        """Each head's results on ``loader``; with ``config.ema`` the averaged weights' too (``<head>_ema``)."""
        results = evaluate_weights(state, loader)
        if averaging:
            results.update(ema.named(evaluate_weights(ema.as_train_state(state), loader)))
        return results

    def evaluate_weights(state, loader):
        with stop.interruptible():
            params, model_state = tree.merge(state["trainable"], state["frozen"]), state["model_state"]
            if trunk_features:  # the trunk's tensors are constants of the compiled trunk
                params, model_state = frozen_trunk.without_trunk(params), frozen_trunk.without_trunk(model_state)
            classes = (topk.present_classes(loader.split, dataset.num_classes).to(dist.device)
                       if config.get("eval_classes", "all") == "present" else None)
            scoring = eval_batches(prepare, classes, real_lists if loader is test_loader else None)
            return topk.evaluate(eval_step, params, model_state, loader, dist, scoring)

    save = make_saver(workdir, dist, config, opt, run_info, frozen_ref)
    # metrics, timer, writers, the non-finite count, periodic logs and checkpoints, a stop's checkpoint
    books = periodic.Bookkeeping(config, workdir, dist, save, total_steps=total_steps, steps_per_epoch=steps_per_epoch,
                                 start_step=start_step, eval_images=len(dataset.test), write=dist.is_main and training,
                                 resumed=bool(saved))
    results, results_step = None, None

    def evaluate_after(done, state):
        """The periodic evaluation after step ``done`` (PreciseBN before it, the best checkpoint after)."""
        def refresh(state):  # the statistics of the live weights, and of their average (config.ema)
            statistics = lambda s: precise_bn(s, train_loader, done - 1, config, model, dist, eval_norms)  # noqa: E731
            state = {**state, "model_state": statistics(state)}
            return ema.with_model_state(state, statistics(ema.as_train_state(state))) if averaging else state
        return books.evaluate_after(done, state, evaluate, _scalars,
                                    refresh if config.precise_bn.num_batches else None)

    try:
        # ---------------------------------------------------------------- the loop
        if not training:
            logging.warning("model.freeze leaves nothing to train: evaluating the model as loaded.")
        if saved and checkpoint.evaluation_pending(saved):
            logging.info("The run was stopped during its evaluation after step %d: evaluating first.", start_step)
            train_state, results = evaluate_after(start_step, train_state)
            results_step = start_step
        batches = train_loader.iterate(start_step)
        for step in range(start_step, total_steps if training else start_step):
            if holding and step >= hold_until:
                logging.info("LayerFreeze: step %d: training %s from now on.", step, hold_rules)
                holding, train_step = False, make_train_step(())
            with stop.interruptible():
                t0 = time.perf_counter()
                batch = next(batches)
                data_time = time.perf_counter() - t0
                batch = prepare(batch, step)
            lr = base_lr * schedule(step)
            # A signal cuts a step short only if the step leaves train_state as it was; a compiled
            # step past its first call writes into it (fpipe.train.donation): the signal then waits.
            with stop.interruptible(when=not donation.overwrites(train_step, train_state)):
                new_state, metrics = train_step(train_state, batch, opt.inputs(lr))
            train_state, done = new_state, step + 1
            if averaging:  # config.ema: the average moves towards the new weights, in place (a stop waits)
                ema.update(train_state, ema.decay_at(config.ema, done))
            if done == start_step + 1:  # the compile and loading behind
                host_memory.keep_large_blocks_from(done + 1)
            books.step_done(done, metrics, data_time)

            books.log(done, train_state, lr)
            if books.is_time(done, books.eval_every):
                train_state, results = evaluate_after(done, train_state)
                results_step = done
            books.checkpoint(done, train_state, stop)  # raises Stopped after it when a stop was requested

        # ---------------------------------------------------------------- final results
        books.check_finite(total_steps, train_state)
        if results is None or results_step != total_steps:
            logging.info("Evaluating the final model on %d test images…", len(dataset.test))
            results = evaluate(train_state)
        grid = None
        if val_loader is not None:  # head_grid: each head's best member on val, reported on test
            logging.info("Evaluating the head grid on %d validation images…", len(dataset.val))
            results, grid = head_grid.select(grid_plan, results, evaluate(train_state, val_loader))
        if config.extract.features:  # before results.json, which says the run finished: a refused
            if averaging:
                logging.info("extract.features: of the live weights; their average (config.ema) is in the "
                             "checkpoint: configs/extract_features.py with model.weights.select=ema extracts its")
            extract_features(config, dataset, model, train_state, dist, workdir)  # cache leaves it as it was
        if dist.is_main:
            info = {**run_info, "dataset": _dataset_info(dataset, config), "world_size": dist.world_size,
                    **({"head_grid": grid} if grid else {}),
                    "step": total_steps if training else 0, "started": started, "ended": _now(),
                    "fpipe_version": fpipe.__version__, "fpipe_commit": _commit()}
            write_results(workdir, results, info)
            log_results(results)
        return results
    except Stopped as e:
        books.stopped(train_state, stop.requested, training)  # the completed steps' checkpoint, and the message
        e.reported = True
        raise
    finally:
        books.close()


def build_train_step(config, model, opt, trainable, model_state, eval_norms, dist, *, compiling,
                     sync_stats=None, autocast=None, heads_only=False, hold=()):
    """The train step as the loop runs it: ``make_step`` with this run's options, compiled if
    ``compiling``. ``hold`` (LayerFreeze): these params stay fixed and their norms use running
    statistics. ``heads_only``: ``model`` is a frozen trunk's heads (``frozen_trunk``); the step
    then takes and gives back the trunk's tensors untouched. (benchmarks/train_step.py times it.)
    With ``accum_steps`` > 1 only a part's forward and backward is compiled, run once per part
    (ResNet-50 64 px b64, 4 parts, 2 CPU cores: the steps' peak RSS 1170 MiB against 1238 without
    accumulation); the whole step compiled with its parts unrolled compiled longer (216 against
    137 s) and its process peaked higher (1444 against 1339 MiB, compilation included).

    The step donates its input state (fpipe.train.donation) when compiled, where inductor writes
    each new value straight into the old tensor, and uncompiled where the optimizer updates in
    place (SGD and AdamW's fused kernels: one pass, no second copy of params and slots; ResNet-18
    32 px b64 on 2 CPU cores 0.92x -> 1.08x the eager nn.Module's speed)."""
    held, norms = frozenset(), eval_norms
    if hold:
        moving, held_tree = freeze.partition(trainable, hold)
        held = frozenset(tree.flatten(held_tree))
        norms = eval_norms | freeze.eval_norms(model_state, held_tree, moving)
    loss_scaling = config.precision if precision.needs_scaler(config.precision) else None
    accum = int(config.get("accum_steps", 1))
    whole = compiling and accum == 1  # the step compiled as one graph
    part = (lambda fn: step_lib.maybe_compile(fn, True, "train step's part (accum_steps)",
                                              inductor=step_passes(config, dist, collectives=False))
            ) if compiling and accum > 1 else None
    donating = whole or (not held and loss_scaling is None and opt.updates_in_place(trainable))
    step = step_lib.make_step(
        model, opt, eval_norms=norms, hold=held, grad_reduce=distributed.grad_mean(dist),
        sync_stats=sync_stats, autocast=autocast, in_place=donating, loss_scaling=loss_scaling,
        accum_steps=accum, compile_part=part)
    if donating:  # the new state written into the old one's tensors
        step = donation.writes_into_inputs(step)
    fused = step_lib.updates_fused(opt, trainable, in_place=donating, hold=held, loss_scaling=loss_scaling)
    step = step_lib.maybe_compile(step, whole, "train step",
                                  cache=step_cache(config, dist, "train", heads_only, sorted(held), autocast,
                                                   fused_update=fused),
                                  inductor=step_passes(config, dist))
    step = ema.kept_out(step)  # the average (config.ema) is updated by the loop, after the step
    if heads_only:
        step = frozen_trunk.heads_only(step)
    return donation.Donating(step) if donating else step


def step_passes(config, dist, collectives=True):
    """Inductor's graph passes for the train step: values recomputed in the backward
    (``compile_remat``), where it was measured faster BatchNorm's sums taken row by row, and with
    several processes the gradients' all-reduces overlapped with the backward (``collectives``;
    not for an accumulated step's part, whose gradients are all-reduced after the parts)."""
    passes = {**(remat.options(config.compile_remat) or {}), **row_sums.options(),
              **((distributed.overlap_options(dist) or {}) if collectives else {})}
    return passes or None


def build_eval_step(config, model, dist, *, compiling, autocast=None):
    """The eval step as the loop runs it, compiled if ``compiling``."""
    return step_lib.maybe_compile(step_lib.make_eval_step(model, autocast=autocast), compiling, "eval step",
                                  cache=step_cache(config, dist, "eval", autocast, evaluation=True))


def eval_batches(prepare, classes=None, real_lists=None):
    """``batch -> the eval step's batch``: ``prepare``'s, with ``classes`` (``eval_classes=present``:
    each label head scored over the classes the split holds) and each image's ImageNet-ReaL list
    from ``real_lists`` (``data.real_labels``), inputs of the step, never compiled constants."""
    def scoring(batch):
        out = prepare(batch)
        if classes is not None:
            out["classes"] = classes
        if real_lists is not None:
            out["real"] = real_lists[batch["index"].to(real_lists.device)]
        return out
    return scoring


def make_loader(split, config, dist, *, train):
    """This rank's loader. On a GPU its batches arrive there one batch ahead (uint8 over the bus,
    normalised on the device, a side stream), except multi-crop ones, made on the host."""
    views = config.data.views if train else config.data.eval_views
    device = dist.device if dist.device.type == "cuda" and not views else None
    return data.Loader(split, config.data, train=train, rank=dist.rank, world_size=dist.world_size, device=device)


def precise_bn(train_state, train_loader, step, config, model, dist, eval_norms):
    """Statistics of the global batch (synced over processes), as one process would compute."""
    params = tree.merge(train_state["trainable"], train_state["frozen"])
    batches = (to_device(b, dist.device)["image"]
               for _, b in zip(range(config.precise_bn.num_batches), train_loader.epoch(step)))
    apply = lambda *a, **k: model.apply(*a, sync_stats=distributed.sync_stats(dist), **k)
    return periodic.precise_bn_statistics(apply, params, train_state["model_state"], batches, eval_norms,
                                          layers.BN_MOMENTUM)


def extract_features(config, dataset, model, train_state, dist, workdir):
    params = tree.merge(train_state["trainable"], train_state["frozen"])
    extract.run(config, workdir, model, params, train_state["model_state"], dataset, dist,
                lambda b: to_device(b, dist.device),
                compile=should_compile(config, len(dataset.train) + len(dataset.test)), cache=trunk_cache(config, dist))


def initial_weights(params, model_state, weights_cfg, workdir, write_report=True):
    """``(params, model_state, provenance)`` from ``model.weights.path``, or the initialisation
    as it is (said loudly; provenance None) when no path is given."""
    if weights_cfg.path:
        return load_weights(params, model_state, weights_cfg, workdir, write_report)
    logging.warning("model.weights.path is empty: the trunk stays at its RANDOM initialisation. "
                    "Set --config.model.weights.path=FILE to evaluate pretrained weights.")
    return params, model_state, None


def load_weights(params, model_state, weights_cfg, workdir, write_report=True, *, obj=None):
    """``(params, model_state, provenance)``: pretrained weights in the initialised model, with the
    load report saved to the workdir; provenance is the file's path, sha256 and trunk coverage.
    ``obj``: the file's contents when the caller has read them already (``weights.read_checkpoint``)."""
    loaded, report = weights.load_into({**tree.flatten(params), **tree.flatten(model_state)}, weights_cfg, obj=obj)
    new_params, new_state = tree.split_like(loaded, params, model_state)
    return new_params, new_state, record_load(report, weights_cfg.path, workdir, write_report)


def load_head_weights(params, model_state, head_weights_cfg, workdir, write_report=True):
    """``(params, model_state, provenance)`` with a released head's file (``model.head_weights``:
    fpipe.weights.heads_file) in the model's heads; its report is head_weights_report.json / .txt."""
    loaded, report = weights_heads_file.load_heads({**tree.flatten(params), **tree.flatten(model_state)},
                                                   head_weights_cfg)
    new_params, new_state = tree.split_like(loaded, params, model_state)
    return new_params, new_state, record_load(report, head_weights_cfg.path, workdir, write_report, "head_weights")


def record_load(report, path, workdir, write_report=True, name="weights") -> dict:
    """The load report logged and (``write_report``) saved to the workdir as <name>_report.json /
    .txt; returns the provenance: the file's path, sha256, trunk coverage, source and format.
    (Shared with fpipe.detection.train, which loads whole detection models.)"""
    if write_report:
        files.atomic_write(os.path.join(workdir, f"{name}_report.json"),
                           lambda f: json.dump(report.to_dict(), f, indent=2), mode="w")
        files.atomic_write(os.path.join(workdir, f"{name}_report.txt"),
                           lambda f: f.write(report.summary() + "\n"), mode="w")
    logging.info("Weights loaded from %s:\n%s", path, report.summary())
    return {"path": os.path.abspath(path), "sha256": weights_folders.sha256(path),
            "trunk_loaded": report.trunk_loaded, "trunk_total": report.trunk_total,
            "source": report.source, "format": report.format}


def cache_dir(config):
    """Where compiled steps are kept for the next run (``config.compile_cache_dir``;
    fpipe.train.compile_cache), or None: off."""
    directory = config.get("compile_cache_dir", "")
    if directory == "auto":
        directory = compile_cache.default_dir()
    return directory or None


def step_cache(config, dist, *parts, fused_update=False, evaluation=False):
    """``(directory, key)`` for a compiled step of this config, or None (see :func:`cache_dir`).
    ``parts``: everything else the step is built with (its role, the autocast dtype a caller
    passes), so that a step built another way never loads this one; ``fused_update`` (the step
    takes the optimizer's rules as inputs) and ``evaluation`` (the eval step):
    ``compile_cache.step_key``. Under torchrun the saved step holds its collectives, which name
    their process group and divide by the world size: both are in the key (a compiled 2-process
    supervised run on the digits: 66 s the first time, 11 s the second, its step loaded in 1.6-1.8
    s; each rank writes the whole file under its own name, then renames it)."""
    directory = cache_dir(config)
    if not directory:
        return None
    return directory, compile_cache.step_key(config, str(dist.device), dist.world_size, dist.group_name, *parts,
                                             fused_update=fused_update, evaluation=evaluation)


def trunk_cache(config, dist):
    """``(directory, key)`` for a compiled frozen trunk, or None: its key is the trunk's config
    (``frozen_trunk`` adds its weights, the input shape and the heads' pooled inputs), so runs
    with other optimizers, or other heads on the same inputs, share it.
    It holds no collectives: runs of any number of processes share it."""
    directory = cache_dir(config)
    return (directory, compile_cache.key_of(config.model.trunk.to_dict(), str(dist.device))) if directory else None


def should_compile(config, images: int) -> bool:
    """``config.compile``, for runs long enough to pay the compilation back: on 2 CPU cores the
    main job (14k images) takes 33 s eager and 70-90 s compiled, the compiles (20-40 s) costing
    more than the faster steps save; past ~100k images (``compile_min_images``) they pay.
    ``images``: those to train on, or to extract features of."""
    if not config.compile:
        return False
    threshold = int(config.get("compile_min_images", 0) or 0)
    if images < threshold:
        logging.info("Not compiling: %d images (< compile_min_images=%d) would not pay back the compile "
                     "time; --config.compile_min_images=0 compiles anyway.", images, threshold)
        return False
    return True


def check_resumed_data(saved, run_info, resume_path, workdir, dist) -> dict:
    """The data changes a resume from ``saved`` accepts (``--allow_change=dataset``); any other
    change of what the splits hold refuses it (fpipe.workdir.check_resumed_data)."""
    changes = workdir_lib.check_resumed_data((saved.get("meta") or {}).get("data"), run_info["data_digest"],
                                             resume_path, workdir, run_info.get("allow_change", ()),
                                             main_process=dist.is_main)
    return {k: list(v) for k, v in changes.items()}


def make_saver(workdir, dist, config, opt, run_info, frozen_ref):
    """``save(step, state, best=None, evaluation_pending=False) -> step``: a checkpoint of ``state``
    after ``step`` steps (rank 0; ``best=(metric, value, mode)`` for the best one; a stop during the
    evaluation after ``step`` marks it pending), never of a non-finite one (callers check first).
    Shared by every run that trains (fpipe.detection.train too)."""
    def save(step, state, best=None, evaluation_pending=False):
        if dist.is_main:
            meta = {"config": config.to_json_best_effort(), "optimizer": opt.name,
                    "weights": run_info.get("weights"), "data": run_info.get("data_digest"),
                    "fpipe_version": fpipe.__version__,
                    **({"evaluation_pending": True} if evaluation_pending else {})}
            payload = checkpoint.train_state_payload(state, step, frozen_ref, meta)
            if best is None:
                path = checkpoint.save(workdir, step, payload, keep=config.keep_ckpts)
                checkpoint.link_last(workdir, path)
            else:
                checkpoint.save_best(workdir, step, payload, *best)
        return step
    return save


def write_results(workdir, results, info):
    """``WORKDIR/results.json``: the final metrics per head (percent) and the run's provenance."""
    path = os.path.join(workdir, "results.json")
    files.atomic_write(path, lambda f: json.dump({**info, "heads": results}, f, indent=2), mode="w")
    return path


def log_results(results):
    for head, r in results.items():
        logging.info("%-12s %s", head, "  ".join(_shown(k, v) for k, v in r.items()))


def _shown(key, value):
    if key in losses.PERCENT:
        return f"{key}={value:.2f}%"
    return f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}"


def to_device(t, device):
    """Every tensor of a tree on ``device`` (asynchronous only towards an accelerator: a copy to
    the CPU must be complete before a checkpoint hashes and saves it)."""
    device = torch.device(device)
    def move(x):  # a tensor, or a tuple of them (multi-crop images)
        if isinstance(x, tuple):
            return tuple(move(v) for v in x)
        return x.to(device, non_blocking=device.type != "cpu") if isinstance(x, torch.Tensor) else x
    return None if t is None else tree.map_leaves(move, t) if isinstance(t, dict) else move(t)


def _scalars(results):
    return {f"{h}/test_{k}": v for h, r in results.items() for k, v in r.items()}


def _group(group):
    return int(group) if str(group).isdigit() else group


def _dataset_info(dataset, config):
    return {"name": dataset.name, "root": config.data.get("root") or None, "num_classes": dataset.num_classes,
            "splits": {"train": len(dataset.train), "test": len(dataset.test),
                       **({"val": len(dataset.val)} if dataset.val is not None else {})},
            "image_size": config.data.image_size}


def _now():
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _commit():
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=os.path.dirname(os.path.abspath(fpipe.__file__)))
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None
