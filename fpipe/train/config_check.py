"""Every config value checked when the config is read, before any data, model weights or compile.

``check(config)`` builds what is cheap to build (the model on the meta device, the optimizer's
rules, the schedule, the transforms) and checks the rest by hand; the first problem is a
:class:`ConfigError` naming the key and the fix. Nothing is written before it passes.
"""
import math
import os
import re

import torch

from fpipe import checkpoint, data, freeze, layer_decay, optim, schedules, tree
from fpipe.data import mix as data_mix
from fpipe.evaluate import config as eval_config
from fpipe.models import losses
from fpipe.models import model as models
from fpipe.models import trunk as trunk_lib
from fpipe.train import ema, head_grid, precision, remat
from fpipe.weights import config as weights_config
from fpipe.weights import folders as weights_folders
from fpipe.weights import hf_config



class ConfigError(ValueError):
    """A config value that cannot work; main.py exits with status 2 before doing anything."""


def check(config) -> None:
    try:
        _check(config)
    except ConfigError:
        raise
    except (ValueError, TypeError, KeyError) as e:  # the builders' own messages name the key
        raise ConfigError(str(e).strip("'\"")) from e


def _check(c) -> None:
    if "eval" in c:  # an evaluation run (configs/knn.py & co.): no optimizer, schedule or heads to train
        _check_data(c)
        model = _check_model(c)
        _check_extract(c, model)
        _check_evaluation(c)
        return
    for key in ("total", "log", "eval", "ckpt"):
        for unit in ("epochs", "steps"):
            value = c.get(f"{key}_{unit}")
            if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ConfigError(f"{key}_{unit}={value!r}: a number >= 0 is needed")
    if schedules.to_steps(c, "total", 1, default=0) <= 0:
        raise ConfigError("total_epochs / total_steps must be > 0")
    if not (isinstance(c.log_steps, int) and c.log_steps >= 1):
        raise ConfigError(f"log_steps={c.log_steps!r}: a whole number >= 1 is needed")
    if not (isinstance(c.keep_ckpts, int) and c.keep_ckpts >= 1):
        raise ConfigError(f"keep_ckpts={c.keep_ckpts!r}: keep at least 1 checkpoint (resuming needs one)")
    if c.get("eval_classes", "all") not in ("all", "present"):
        raise ConfigError(f"eval_classes={c.eval_classes!r}; valid: 'all', 'present' (the classes the evaluated "
                          "split holds)")
    if not (isinstance(c.get("compile_min_images", 0), int) and c.get("compile_min_images", 0) >= 0):
        raise ConfigError(f"compile_min_images={c.compile_min_images!r}: a whole number >= 0 is needed")
    _check_data(c)
    c = head_grid.expand(c)  # a grid of heads: the heads and optimizer rules it makes
    model = _check_model(c)
    freeze.rules(c.layer_freeze.rules)
    _check_extract(c, model)
    _check_mix(c, model)
    _check_training(c, model)


def _check_mix(c, model) -> None:
    """Mixup / CutMix mix images and labels: every head must learn the labels by cross-entropy."""
    m = c.get("mix")
    if not m:
        return
    for key in ("mixup_alpha", "cutmix_alpha"):
        if not (isinstance(m[key], (int, float)) and m[key] >= 0):
            raise ConfigError(f"mix.{key}={m[key]!r}: a number >= 0 is needed (0: off)")
    for key in ("switch_prob", "prob", "random_erasing"):
        if not (isinstance(m[key], (int, float)) and 0 <= m[key] <= 1):
            raise ConfigError(f"mix.{key}={m[key]!r}: a probability in [0, 1] is needed")
    if not (isinstance(m.label_smoothing, (int, float)) and 0 <= m.label_smoothing < 1):
        raise ConfigError(f"mix.label_smoothing={m.label_smoothing!r}: a number in [0, 1) is needed")
    if not data_mix.enabled(m):
        return
    other = [h.name for h in model.heads if h.target != "label" or h.loss != "cross_entropy"]
    if other:
        raise ConfigError(f"mix (Mixup / CutMix / label smoothing) makes soft class targets, but model.heads "
                          f"{other} learn another target or loss; mix only label heads, or set mix.* to 0")
    if (m.mixup_alpha > 0 or m.cutmix_alpha > 0 or m.random_erasing > 0) and tuple(c.data.get("views") or ()):
        raise ConfigError("mix.mixup_alpha / cutmix_alpha / random_erasing with data.views (multi-crop): each crop "
                          "would need its own draws; use one of the two")


def _check_data(c) -> None:
    """The data's name, sizes and transform strings (the files themselves are read later)."""
    if c.get("collective_timeout_s") is not None and not c.collective_timeout_s > 0:
        raise ConfigError(f"collective_timeout_s={c.collective_timeout_s!r} must be > 0 seconds")
    if data.config.get(c.data, "name") not in data.DATASETS:
        raise ConfigError(f"unknown data.name {c.data.name!r}; valid: {', '.join(sorted(data.DATASETS))}")
    for key in ("image_size", "batch_size", "eval_batch_size"):
        if not (isinstance(c.data[key], int) and c.data[key] >= 1):
            raise ConfigError(f"data.{key}={c.data[key]!r}: a whole number >= 1 is needed")
    data.config.check(c.data)
    for key in ("train_transforms", "eval_transforms"):
        try:
            data.transforms.parse(c.data[key], size=c.data.image_size)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"data.{key}={c.data[key]!r}: {e}") from None
    evaluated = " ".join([str(c.data.eval_transforms)] + [str(v) for v in (data.config.get(c.data, "eval_views") or ())])
    if "rand_augment" in evaluated:
        raise ConfigError("data.eval_transforms / eval_views hold rand_augment, a training augmentation: the test "
                          "images would be scored augmented; keep it in data.train_transforms")
    for key in ("views", "eval_views"):  # multi-crop: ((count, transforms), ...)
        data.loader.views(data.config.get(c.data, key), c.data.image_size)


def _check_model(c):
    """Trunk name and options, heads, features, pooling, weights options — built on the meta device."""
    for name, head in dict(c.model.heads).items():
        pool = head.get("pool")
        sizes = () if pool is None else (pool if isinstance(pool, (tuple, list)) else (pool,))
        if any(not (isinstance(p, int) and p >= 1) for p in sizes) or len(sizes) > 2:
            raise ConfigError(f"model.heads.{name}.pool={pool!r}: want a whole number >= 1 (a square grid) or "
                              "a pair (height, width) of them")
        if len(sizes) == 1 and isinstance(pool, (tuple, list)):  # [2] would reach adaptive pooling as 1-D
            raise ConfigError(f"model.heads.{name}.pool={pool!r}: write pool={sizes[0]} or pool=({sizes[0]}, {sizes[0]})")
    model = models.build(c.model, num_classes=max(int(c.data.get("num_classes") or 2), 2),
                         image_size=c.data.image_size)
    freeze.rules(c.model.get("freeze", ()))
    weights = weights_config.resolve(c.model.weights)
    if weights.path and not os.path.exists(weights.path):
        raise ConfigError(f"model.weights.path={weights.path!r}: no such file")
    if weights.path and os.path.isdir(weights.path) and not weights_folders.is_model_folder(weights.path):
        newest = checkpoint.find_latest(weights.path)  # a run's workdir: name its checkpoints
        best = os.path.join(weights.path, "checkpoints", "best.pt")
        found = (f" (a run's workdir: its newest checkpoint is {newest}"
                 + (f", its best {best}" if os.path.isfile(best) else "") + ")") if newest else ""
        raise ConfigError(f"model.weights.path={weights.path!r} is a directory{found}: give the weights file "
                          f"(or a Hugging Face model folder, holding {' or '.join(weights_folders.WEIGHT_FILES)})")
    head_path = c.model.get("head_weights", {}).get("path", "")
    if head_path and not os.path.isfile(head_path):
        raise ConfigError(f"model.head_weights.path={head_path!r}: no such file")
    if head_path and not model.heads:
        raise ConfigError(f"model.head_weights.path={head_path!r} but model.heads is empty: add the head the "
                          "released one was trained as (its feature, its classes)")
    named = tuple(c.model.get("head_weights", {}).get("heads", ()) or ())
    unknown = sorted(set(named) - {h.name for h in model.heads})
    if unknown:
        raise ConfigError(f"model.head_weights.heads names {unknown}, not heads of the model; valid: "
                          f"{sorted(h.name for h in model.heads)}")
    wrong = hf_config.mismatches(hf_config.read(weights.path), model.trunk.spec) if weights.path else []
    if wrong:  # the same tensors, another function: features would differ with no error
        said = ", ".join(f"{option}={theirs!r}" for option, theirs, _ in wrong)
        raise ConfigError(f"model.weights.path={weights.path!r}: its config.json says the trunk computes {said}; "
                          f"the model has {', '.join(f'{o}={ours!r}' for o, _, ours in wrong)}. Set "
                          + " ".join(f"--config.model.trunk.{o}={theirs}" for o, theirs, _ in wrong)
                          + " (names and shapes cannot tell these apart)")
    crops_per_image = {key: len(data.loader.views(data.config.get(c.data, key), c.data.image_size)) or 1
                       for key in ("views", "eval_views")}
    for head in model.heads:  # its crops exist; siamese_concat_view: one crop per tower
        for key, crops in crops_per_image.items():
            first, count = head.crops or (0, crops)
            if first + count > crops:
                raise ConfigError(f"model.heads.{head.name}.crops={head.crops} reads crops {first}..{first + count - 1}; "
                                  f"data.{key} gives {crops}")
            if head.towers > 1 and count != head.towers:
                raise ConfigError(f"model.heads.{head.name}.towers={head.towers} needs {head.towers} crops per "
                                  f"image; data.{key} gives {count}")
    return model


def _check_extract(c, model) -> None:
    extract = tuple(c.extract.features)
    unknown = [f for f in extract if f not in model.trunk.features]
    if unknown or len(set(extract)) != len(extract):
        raise ConfigError(f"extract.features={extract!r}: each once, from "
                          f"{trunk_lib.feature_listing(model.trunk.features)}")


def _check_evaluation(c) -> None:
    extract = tuple(c.extract.features)
    try:
        eval_config.check(c.eval)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    layers = [layer for layer in c.eval.layers if layer not in extract]
    if layers:
        raise ConfigError(f"eval.layers {layers} are not extracted; extract.features={extract}")
    if c.eval.features_from and not os.path.isdir(c.eval.features_from):
        raise ConfigError(f"eval.features_from={c.eval.features_from!r}: no such workdir")


def _check_training(c, model) -> None:
    """Optimizer rules, lr, schedule, precision, processes and the periodic actions."""
    if not (isinstance(c.optim.lr, (int, float)) and math.isfinite(c.optim.lr) and c.optim.lr >= 0):
        raise ConfigError(f"optim.lr={c.optim.lr!r}: the learning rate must be a finite number >= 0")
    optim.build(c.optim, {})  # checks the names, ranges and every rule's regex
    if c.optim.get("layer_decay", 1.0) != 1.0:  # it needs a trunk whose layers it can number
        params, _ = trunk_lib.init_on_meta(model.trunk)
        layer_decay.mults(list(tree.flatten(params)), c.optim.layer_decay, kind=c.optim.get("layer_decay_type", "single"))
    for key in ("clip_grad_norm", "clip_grad_value"):
        if c.optim.get(key) is not None and c.optim[key] < 0:
            raise ConfigError(f"optim.{key}={c.optim[key]!r} must be >= 0 (0 or unset: off)")
    base_lr, _ = optim.scaled_lr(c.optim, c.data.batch_size)
    schedules.build(c.schedule, 10, 100, base_lr=base_lr)

    # Precision, processes, hooks.
    precision.autocast_dtype(c.precision, "cuda" if torch.cuda.is_available() else "cpu")
    remat.options(c.compile_remat)
    group = str(c.get("sync_bn_group", "global"))
    if group not in ("global", "node") and not group.isdigit():
        raise ConfigError(f"sync_bn_group={group!r}; valid: 'global', 'node' or a number of processes")
    if c.precise_bn.num_batches < 0:
        raise ConfigError(f"precise_bn.num_batches={c.precise_bn.num_batches} must be >= 0")
    _check_ema(c)
    accum = c.get("accum_steps", 1)
    if not (isinstance(accum, int) and not isinstance(accum, bool) and accum >= 1):
        raise ConfigError(f"accum_steps={accum!r}: a whole number >= 1 is needed (1: no accumulation)")
    if c.data.batch_size % accum:
        raise ConfigError(f"accum_steps={accum} must divide data.batch_size={c.data.batch_size} into equal parts")
    if accum > 1 and tuple(c.data.get("views") or ()):  # a frozen trunk gives crop-major rows: no equal parts
        raise ConfigError(f"accum_steps={accum} with data.views (multi-crop) is not supported; set accum_steps=1")
    check_best_metric(c)


def _check_ema(c) -> None:
    e = c.get("ema")
    if not e:
        return
    if not (isinstance(e.decay, (int, float)) and 0 <= e.decay < 1):
        raise ConfigError(f"ema.decay={e.decay!r}: a number in [0, 1) is needed (0: off; DeiT 0.99996)")
    if not isinstance(e.warmup, bool):
        raise ConfigError(f"ema.warmup={e.warmup!r}: True or False")
    for key in ("warmup_gamma", "warmup_power"):
        if not (isinstance(e[key], (int, float)) and e[key] > 0):
            raise ConfigError(f"ema.{key}={e[key]!r}: a number > 0 is needed")
    if not ema.enabled(e):
        return
    if head_grid.enabled(c):
        raise ConfigError("ema.decay with head_grid: the grid chooses each head's member by its live weights; "
                          "set ema.decay=0 or head_grid.lrs=()")
    taken = [h for h in c.model.heads if h.endswith(ema.SUFFIX)]
    if taken:
        raise ConfigError(f"model.heads {taken}: '{ema.SUFFIX}' names the averaged weights' results (ema.decay); "
                          "rename the heads")


def best_metric_key(metric: str) -> tuple:
    """``(head, metric)`` of ``best_metric``, written as logged (``res5avg/test_top1``) or short
    (``res5avg/top1``)."""
    head, _, key = metric.partition("/")
    return head, re.sub(r"^test_", "", key)


def check_best_metric(c) -> None:
    if not c.get("best_metric"):
        return
    head, key = best_metric_key(c.best_metric)
    metrics = {h: losses.METRICS.get(c.model.heads[h].get("loss") or "cross_entropy", ()) for h in c.model.heads}
    if c.data.get("real_labels"):  # label heads also score ImageNet-ReaL
        labels = {h for h in c.model.heads if (c.model.heads[h].get("target") or "label") == "label"}
        metrics = {h: ks + (("real_top1",) if "top1" in ks and h in labels else ()) for h, ks in metrics.items()}
    if ema.enabled(c.get("ema")):  # the averaged weights' results too
        metrics.update({f"{h}{ema.SUFFIX}": ks for h, ks in metrics.items()})
    valid = [f"{h}/test_{k}" for h, ks in metrics.items() for k in ks]
    if head not in metrics or key not in metrics[head]:
        raise ConfigError(f"best_metric={c.best_metric!r}; valid: {', '.join(valid)} (as logged to "
                          "metrics.jsonl; the 'test_' may be left out)")
    if c.get("best_mode", "max") not in ("max", "min"):
        raise ConfigError(f"best_mode={c.best_mode!r}; valid: 'max', 'min'")
    want = "min" if key in losses.LOWER_IS_BETTER else "max"
    if c.get("best_mode", "max") != want:
        raise ConfigError(f"best_metric={c.best_metric!r} is best when {'lowest' if want == 'min' else 'highest'}: "
                          f"set best_mode={want!r}")

