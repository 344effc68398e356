"""The detection run, readable top to bottom, on the classification loop's services:

    processes -> data (scenes | coco, padded batches) -> model.build -> init -> weights (resume > a
    whole detection model's file, or a classification checkpoint for the backbone (detection.pretrained)
    > init) -> freeze (model.freeze_rules + model.freeze)
    -> optimizer, schedule -> a torch.func step over model.losses -> for each step: batch, step,
    then "is it time?" to log / evaluate (COCO AP) / checkpoint -> results.json (+ results.md)

Workdir claim and fingerprint (main.py, fpipe.workdir), the processes and signals
(``loop.in_processes``), checkpoints (``loop.make_saver``), the bookkeeping around the steps
(``periodic.Bookkeeping``: metrics.jsonl / TensorBoard, the ETA, divergence checks, periodic logs
and checkpoints, a stop's checkpoint), freezing (fpipe.freeze), optimizers and schedules, the
distributed gradient mean and the results file are the ones fpipe.train.loop uses; only the data,
the loss and the evaluation are detection's own.
"""
import os
import time

import torch
import torch.distributed as tdist
from absl import logging

import fpipe
from fpipe import checkpoint, files, freeze, host_memory, optim, schedules, tree
from fpipe.data import identity, rng
from fpipe.detection import coco, coco_eval, collate, pretrained, scenes
from fpipe.detection import model as det_model
from fpipe.train import config_check, distributed, divergence, loop, periodic
from fpipe.train import step as step_lib
from fpipe.train.signals import Stopped

DATASETS = {"scenes": scenes.build, "coco": coco.build}
SHOWN = ("AP", "AP50", "AP75")  # logged to metrics.jsonl per head; results.json has every COCO stat


def run(config, workdir, run_info=None):
    """Trains and evaluates as ``config`` says; returns ``{"bbox": {"AP": ...}, ...}`` (percent)."""
    return loop.in_processes(_run, config, workdir, run_info)


def _run(config, workdir, dist, stop, run_info):
    started = loop._now()
    torch.manual_seed(config.seed)
    if config.get("num_threads"):
        torch.set_num_threads(int(config.num_threads))
    det_cfg = model_config(config.model.detection)
    with stop.interruptible():
        # ---------------------------------------------------------------- data: every rank its shard
        dataset = build_data(config.data)
        options = collate_options(config.data, det_cfg, dataset)
        train_loader = collate.Loader(dataset.train, config.data.batch_size, train=True, seed=config.data.seed,
                                      rank=dist.rank, world_size=dist.world_size,
                                      hflip_prob=config.data.get("hflip_prob", 0.0),
                                      keypoint_flip=collate.keypoint_flip_map(dataset.keypoint_names), **options)
        test_loader = collate.Loader(dataset.test, config.data.eval_batch_size, train=False, rank=dist.rank,
                                     world_size=dist.world_size, **{**options, "with_masks": False})
        steps_per_epoch = train_loader.steps_per_epoch
        total_steps = schedules.to_steps(config, "total", steps_per_epoch)
        logging.info("Data: %s, %d train / %d test images, %d classes; batches of %d at %d-%d px.", dataset.name,
                     len(dataset.train), len(dataset.test), dataset.num_classes, config.data.batch_size,
                     config.data.min_size, config.data.max_size)

        # ---------------------------------------------------------------- model
        model = det_model.build(det_cfg, dataset.num_classes + 1)  # + background, as torchvision counts
        params, model_state = model.init(config.seed)

        # ---------------------------------------------------------------- weights: resume > file (model | body) > init
        run_info["data_digest"] = identity.digest(dataset)  # what the splits hold: a resume checks it
        saved, resume_path = checkpoint.restore(workdir)
        if saved:
            run_info.setdefault("config_changes", {}).update(loop.check_resumed_data(saved, run_info, resume_path,
                                                                                     workdir, dist))
            logging.warning("Resuming from %s: it takes precedence over model.weights.path=%r, which is not "
                            "read.", resume_path, config.model.weights.path)
            run_info["weights"] = (saved.get("meta") or {}).get("weights")
        else:
            params, model_state, run_info["weights"] = pretrained.initial_weights(
                params, model_state, config.model.weights, workdir, dist.is_main)

        # ---------------------------------------------------------------- freeze, optimizer, schedule
        rules = (tuple(model.freeze_rules(params)) + freeze.rules(config.model.freeze)
                 + freeze.frozen_by_rules(params, config.optim.lr_mults))
        trainable, frozen = freeze.partition(params, rules)
        logging.info("Trainable: %d tensors (%d values); frozen: %d tensors (%d values).",
                     len(tree.leaves(trainable)), tree.tree_size(trainable), len(tree.leaves(frozen)),
                     tree.tree_size(frozen))
        base_lr, lr_message = optim.scaled_lr(config.optim, config.data.batch_size)
        logging.info("%s (world size %d)", lr_message, dist.world_size)
        opt = optim.build(config.optim, trainable)
        training = total_steps > 0  # total_steps=0: evaluate the model as loaded (e.g. a COCO checkpoint)
        schedule = schedules.build(config.schedule, steps_per_epoch, total_steps, base_lr=base_lr) if training else None
        train_state = {"trainable": trainable, "frozen": frozen, "model_state": model_state,
                       "opt_state": opt.init(trainable)}
        start_step = 0
        if saved:
            train_state, start_step = checkpoint.restore_train_state(train_state, saved, workdir, resume_path)
            # a norm without statistics (GroupNorm) leaves empty subtrees, which a checkpoint does not keep
            train_state["model_state"] = tree.shaped_like(model_state, train_state["model_state"])
            logging.info("Resumed at step %d of %d.", start_step, total_steps)
        train_state = loop.to_device(train_state, dist.device)
        frozen_ref = saved.get("frozen_params") if saved else None
        if training and frozen_ref is None and dist.is_main and tree.leaves(frozen):
            frozen_ref = checkpoint.save_frozen(workdir, tree.flatten(frozen))

        # ---------------------------------------------------------------- the step
        compiling = loop.should_compile(config, (total_steps - start_step) * config.data.batch_size)
        train_step = make_step(model, opt, grad_reduce=distributed.grad_mean(dist), compiling=compiling)
        gt = coco_eval.ground_truth(dataset.test, dataset.categories)
        image_ids = coco_eval.image_ids(gt)

    # -------------------------------------------------------------------- services for the loop
    def evaluate(state):
        """COCO AP per head on the test split: every rank predicts its shard, all see all results."""
        with stop.interruptible():
            params = tree.merge(state["trainable"], state["frozen"])
            results = []
            with torch.no_grad():
                for batch in test_loader.epoch():
                    moved = loop.to_device(batch, dist.device)
                    predictions = model.predict(params, state["model_state"], moved["image"], moved["image_size"])
                    results += coco_eval.to_results(predictions, batch, image_ids, dataset.categories,
                                                    category_ids=dataset.category_ids)
            if dist.enabled:
                gathered = [None] * dist.world_size
                tdist.all_gather_object(gathered, results)
                results = [r for part in gathered for r in part]
            return coco_eval.evaluate(gt, results, iou_types(det_cfg), dataset.keypoint_sigmas)

    save = loop.make_saver(workdir, dist, config, opt, run_info, frozen_ref)
    # the classification loop's: metrics, timer, writers, the non-finite count, logs, checkpoints, stops
    books = periodic.Bookkeeping(config, workdir, dist, save, total_steps=total_steps, steps_per_epoch=steps_per_epoch,
                                 start_step=start_step, eval_images=len(dataset.test), write=dist.is_main and training,
                                 resumed=bool(saved))
    results, results_step = None, None

    try:
        # ---------------------------------------------------------------- the loop
        if not training:
            logging.warning("total_steps=0: evaluating the model as loaded, without training.")
        if saved and checkpoint.evaluation_pending(saved):
            logging.info("The run was stopped during its evaluation after step %d: evaluating first.", start_step)
            _, results = books.evaluate_after(start_step, train_state, evaluate, scalars_of)
            results_step = start_step
        batches = train_loader.iterate(start_step)
        for step in range(start_step, total_steps):
            with stop.interruptible():
                t0 = time.perf_counter()
                batch = next(batches)
                data_time = time.perf_counter() - t0
                lr = base_lr * schedule(step)
                generator = torch.Generator(dist.device).manual_seed(  # RPN / RoI sampling, on the model's device
                    rng.seed_for("detection-sample", config.seed, step, dist.rank))
                new_state, metrics = train_step(train_state, loop.to_device(batch, dist.device),
                                                opt.inputs(lr), generator)
            train_state, done = new_state, step + 1
            if done == start_step + 1:  # the compile and loading behind
                host_memory.keep_large_blocks_from(done + 1)
            books.step_done(done, metrics, data_time)

            books.log(done, train_state, lr)
            if books.is_time(done, books.eval_every):
                _, results = books.evaluate_after(done, train_state, evaluate, scalars_of)
                results_step = done
            books.checkpoint(done, train_state, stop)  # raises Stopped after it when a stop was requested

        # ---------------------------------------------------------------- final results
        books.check_finite(total_steps, train_state)
        if results is None or results_step != total_steps:
            logging.info("Evaluating the final model on %d test images…", len(dataset.test))
            results = evaluate(train_state)
        if dist.is_main:
            info = {**run_info, "dataset": dataset_info(dataset, config), "world_size": dist.world_size,
                    "step": total_steps, "started": started, "ended": loop._now(),
                    "fpipe_version": fpipe.__version__, "fpipe_commit": loop._commit()}
            loop.write_results(workdir, results, info)
            files.atomic_write(os.path.join(workdir, "results.md"), lambda f: f.write(results_table(results)), mode="w")
            logging.info("COCO AP on %d test images (percent):\n%s", len(dataset.test), results_table(results))
        return results
    except Stopped as e:
        books.stopped(train_state, stop.requested, training)  # the completed steps' checkpoint, and the message
        e.reported = True
        raise
    finally:
        books.close()


# ------------------------------------------------------------------------ the pieces
def build_data(data_cfg):
    name = data_cfg.name
    if name not in DATASETS:
        raise ValueError(f"unknown data.name {name!r} for detection; valid: {', '.join(DATASETS)}")
    return DATASETS[name](data_cfg)


def collate_options(data_cfg, det_cfg, dataset) -> dict:
    """How samples become batches (fpipe.detection.collate): the sizes, and only the targets the
    enabled heads read."""
    return dict(min_size=data_cfg.min_size, max_size=data_cfg.max_size, max_objects=data_cfg.max_objects,
                num_keypoints=dataset.num_keypoints if det_cfg.keypoint_head.enabled else 0,
                size_divisible=data_cfg.size_divisible, fixed_canvas=data_cfg.fixed_canvas,
                with_masks=bool(det_cfg.mask_head.enabled))


def make_step(model, opt, *, grad_reduce=None, compiling=False, compile_options=None):
    """``step(train_state, batch, hyper, generator) -> (train_state, metrics)``: fpipe.train.step's
    update over ``model.losses`` (grad_and_value over the trainable tree, flat; gradient mean across
    ranks; the optimizer's clipping; one non-finite flag), with each loss term as a metric.

    ``compiling``: what depends on the data's values (the RPN's NMS, the pooler's scales, the
    samplers' random keys) is computed first, eagerly and not differentiated
    (``model.train_proposals``: one more forward of the backbone), and the update over
    ``losses(proposals=...)`` is one torch.compile'd graph (``compile_options``: torch.compile's);
    same values as the eager step."""
    def loss_fn(trainable, frozen, model_state, batch, given):
        kwargs = {"generator": given} if isinstance(given, torch.Generator) else {"proposals": given}
        total, losses, new_state = model.losses(step_lib.merged(trainable, frozen), model_state, batch,
                                                return_state=True, **kwargs)
        return total, (losses, new_state)

    grad_fn = step_lib.grad_and_value_traced_or_eager(loss_fn)  # eager: autograd's memory, not torch.func's

    def update(train_state, batch, hyper, given):
        grads, (loss, (losses, new_model_state)) = grad_fn(
            tree.flatten(train_state["trainable"]), train_state["frozen"], train_state["model_state"], batch, given)
        if grad_reduce is not None:
            grads = grad_reduce(grads)
        grads, grad_norm = optim.clip_by(opt, grads, hyper)
        trainable, opt_state = opt.update(grads, train_state["opt_state"], train_state["trainable"], hyper)
        metrics = {"loss": loss.detach(), "grad_norm": grad_norm, **{k: v.detach() for k, v in losses.items()}}
        metrics["nonfinite"] = divergence.step_flag(loss, grad_norm)  # the state: checked by the books
        return {**train_state, "trainable": trainable, "opt_state": opt_state, "model_state": new_model_state}, metrics

    if not compiling:
        return update
    compiled = step_lib.maybe_compile(update, True, "detection train step", **(compile_options or {}))

    def step(train_state, batch, hyper, generator):
        params = tree.merge(train_state["trainable"], train_state["frozen"])
        given = model.train_proposals(params, train_state["model_state"], batch, generator)
        return compiled(train_state, batch, hyper, given)

    return step


def model_config(det_cfg):
    """``model.default_config()`` with the config's ``model.detection`` values on top: a key the
    model has and the config file does not yet list (fpipe.defaults.detection_model lags behind)
    keeps the model's default; a key the model does not know is an error."""
    merged = det_model.default_config()

    def update(into, values, prefix):
        for key in values.keys():
            if key not in into:
                raise ValueError(f"model.detection.{prefix}{key} is not a detection model option; "
                                 f"options here: {', '.join(into.keys())}")
            value = values[key]
            if hasattr(value, "keys") and hasattr(into[key], "keys") and key != "options":
                update(into[key], value, f"{prefix}{key}.")
            else:
                into[key] = value

    update(merged, det_cfg, "")
    return merged


def iou_types(det_cfg) -> tuple:
    """The COCO evaluations of the enabled heads."""
    if det_cfg.rpn_only:
        return ()
    return ("bbox",) + (("segm",) if det_cfg.mask_head.enabled else ()) + \
        (("keypoints",) if det_cfg.keypoint_head.enabled else ())


def scalars_of(results) -> dict:
    return {f"{head}/test_{k}": v for head, r in results.items() for k, v in r.items() if k in SHOWN and v is not None}


def results_table(results) -> str:
    """A Markdown table: one row per head, COCO's AP columns."""
    cols = ("AP", "AP50", "AP75", "APs", "APm", "APl")
    show = lambda v: "—" if v is None else f"{v:.1f}"
    lines = ["| head | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    lines += [f"| {head} | " + " | ".join(show(r.get(c)) for c in cols) + " |" for head, r in results.items()]
    return "\n".join(lines) + "\n"


def dataset_info(dataset, config) -> dict:
    return {"name": dataset.name, "root": config.data.get("root") or None, "num_classes": dataset.num_classes,
            "categories": [c["name"] for c in dataset.categories], "keypoints": list(dataset.keypoint_names),
            "splits": {"train": len(dataset.train), "test": len(dataset.test)},
            "min_size": config.data.min_size, "max_size": config.data.max_size,
            **({"labels": "category_id"} if dataset.label_ids else {})}


# ------------------------------------------------------------------------ config check
def check(config) -> None:
    """Every value of a detection config checked before any data is read or file written
    (``config_check.ConfigError``: main.py exits with status 2)."""
    try:
        _check(config)
    except config_check.ConfigError:
        raise
    except (ValueError, TypeError, KeyError, NotImplementedError) as e:
        raise config_check.ConfigError(str(e).strip("'\"")) from e


def _check(c) -> None:
    E = config_check.ConfigError
    if c.data.name not in DATASETS:
        raise E(f"unknown data.name {c.data.name!r} for detection; valid: {', '.join(DATASETS)}")
    if c.data.get("labels", "contiguous") not in coco.LABELS:
        raise E(f"data.labels={c.data.labels!r}; valid: {', '.join(coco.LABELS)}")
    if c.data.name == "coco":
        for which in ("train", "test"):
            ann, images = coco.split_paths(c.data, which)
            if not os.path.isfile(ann):
                raise E(f"data.{which}: COCO annotation file {ann!r} does not exist (data.root / data.{which}_split "
                        f"or data.{which}_annotations)")
            if not os.path.isdir(images):
                raise E(f"data.{which}: COCO image folder {images!r} does not exist")
    for key in ("batch_size", "eval_batch_size", "min_size", "max_size", "max_objects", "size_divisible"):
        if not (isinstance(c.data[key], int) and c.data[key] >= 1):
            raise E(f"data.{key}={c.data[key]!r}: a whole number >= 1 is needed")
    hflip = c.data.get("hflip_prob", 0.0)
    if not (isinstance(hflip, (int, float)) and 0 <= hflip <= 1):
        raise E(f"data.hflip_prob={hflip!r}: a probability in [0, 1] is needed")
    if c.data.min_size > c.data.max_size:
        raise E(f"data.min_size={c.data.min_size} is above data.max_size={c.data.max_size}")
    for key in ("total", "log", "eval", "ckpt"):
        for unit in ("epochs", "steps"):
            value = c.get(f"{key}_{unit}")
            if value is not None and not (isinstance(value, (int, float)) and value >= 0):
                raise E(f"{key}_{unit}={value!r}: a number >= 0 is needed")
    if schedules.to_steps(c, "total", 1, default=0) <= 0 and c.get("total_steps") != 0:
        raise E("total_epochs / total_steps must be > 0 (total_steps=0 evaluates the model as loaded)")
    if not (isinstance(c.log_steps, int) and c.log_steps >= 1):
        raise E(f"log_steps={c.log_steps!r}: a whole number >= 1 is needed")
    if not (isinstance(c.keep_ckpts, int) and c.keep_ckpts >= 1):
        raise E(f"keep_ckpts={c.keep_ckpts!r}: keep at least 1 checkpoint (resuming needs one)")
    det_model.build(model_config(c.model.detection), 2)  # names, sizes and head options (cheap: no init)
    if c.model.detection.keypoint_head.enabled and c.data.name == "scenes" and \
            c.model.detection.keypoint_head.num_keypoints != len(scenes.KEYPOINT_NAMES):
        raise E(f"model.detection.keypoint_head.num_keypoints={c.model.detection.keypoint_head.num_keypoints}; "
                f"the scenes have {len(scenes.KEYPOINT_NAMES)} keypoints per object")
    if c.compile and c.model.detection.mask_head.enabled and c.model.detection.mask_head.get("target_max_grid") is None:
        raise E("compile=True with the mask head needs model.detection.mask_head.target_max_grid (e.g. 4): the gt "
                "masks' RoIAlign grid must be bounded to trace as one graph; or set compile=False")
    freeze.rules(c.model.freeze)
    if c.model.weights.path and not os.path.exists(c.model.weights.path):
        raise E(f"model.weights.path={c.model.weights.path!r}: no such file")
    if not (isinstance(c.optim.lr, (int, float)) and c.optim.lr >= 0):
        raise E(f"optim.lr={c.optim.lr!r}: the learning rate must be a number >= 0")
    optim.build(c.optim, {})
    base_lr, _ = optim.scaled_lr(c.optim, c.data.batch_size)
    schedules.build(c.schedule, 10, 100, base_lr=base_lr)
    if c.best_metric:
        head, key = config_check.best_metric_key(c.best_metric)
        heads = iou_types(c.model.detection)
        valid = [f"{h}/test_{k}" for h in heads for k in SHOWN]
        if head not in heads or key not in SHOWN:
            raise E(f"best_metric={c.best_metric!r}; valid: {', '.join(valid)}")
        if c.best_mode != "max":
            raise E(f"best_metric={c.best_metric!r} is best when highest: set best_mode='max'")
