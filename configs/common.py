"""Pieces shared by the shipped configs: every section with its documented defaults."""
import ml_collections
from ml_collections.config_dict import placeholder

from fpipe import defaults  # every section's defaults; torch-free


def no_variants(name, arg):
    """A config without variants refuses one: ``configs/knn.py:resnet50`` must not run the default."""
    if arg:
        raise ValueError(f"configs/{name}.py has no variants; got {arg!r}. Fix: drop ':{arg}' and set keys "
                         f"with --config.<key>=<value> (e.g. --config.model.trunk.name=resnet50)")


def base_config():
    c = ml_collections.ConfigDict()
    c.seed = 0                 # model init and step randomness (data.seed: order and augmentation)
    c.compile = True           # torch.compile the train and eval steps (eager on failure, logged) ...
    c.compile_min_images = 100_000  # ... in runs that train on at least this many images (0: always)
    c.compile_cache_dir = "auto"  # compiled steps saved for the next run ("auto": ~/.cache/fpipe/compiled; "": off)
    c.compile_remat = "fused"  # the compiled step recomputes pointwise values in its backward, less memory:
    # "fused" those its kernels compute in place (no extra writes), "all" also convolutions' inputs (least memory,
    # 4-7% slower on CPU), "off"
    c.cudnn_benchmark = True   # CUDA: cuDNN times its conv algorithms per shape, keeps the fastest (False: heuristics)
    # Durations: config files give *_epochs; *_steps, set on the command line, win over them
    # (converted in one place, schedules.to_steps).
    c.total_epochs = 10.0      # the run's length
    c.total_steps = placeholder(int)  # ... in steps (wins over total_epochs)
    c.log_steps = 10           # metrics every this many steps (and after the last)
    c.eval_epochs = placeholder(float)  # unset: evaluate only at the end
    c.eval_steps = placeholder(int)  # ... in steps (wins over eval_epochs)
    c.ckpt_epochs = 1.0        # a checkpoint every this many epochs (and after the last step)
    c.ckpt_steps = placeholder(int)  # ... in steps (wins over ckpt_epochs)
    c.keep_ckpts = 3           # the newest checkpoints kept (best.pt apart)
    c.data = defaults.data()
    c.data.image_size = 32     # digits are 8x8: 32 px keeps every stage of a ResNet meaningful
    c.accum_steps = 1          # gradient accumulation: each batch in this many parts, one update (MAE's accum_iter)
    c.model = ml_collections.ConfigDict()
    c.model.trunk = defaults.trunk("resnet18")  # a family or any preset: see docs/MODELS.md
    c.model.heads = ml_collections.ConfigDict()
    c.model.weights = defaults.weights()
    c.model.head_weights = defaults.head_weights()
    c.model.freeze = ()        # regexes (or "trunk", "heads", "all") over dotted names: frozen params
    c.optim = defaults.optim()
    c.schedule = defaults.schedule()
    c.mix = defaults.mix()              # Mixup / CutMix / label smoothing of training batches: off
    c.ema = defaults.ema()              # an average of the weights evaluated beside them (<head>_ema): off
    c.precision = defaults.precision()  # dtype: float32 | bf16 | fp16 (CUDA, loss scaling)
    # Processes: `torchrun --nproc_per_node=N main.py ...` splits data.batch_size (global) over N.
    # BatchNorms that train use the global batch's statistics (SyncBN), so 1 and N processes give
    # the same numbers; False: per-process statistics (one all-reduce less per BatchNorm layer).
    c.sync_bn = True                    # BatchNorms that train see the global batch (SyncBN)
    c.sync_bn_group = "global"          # global | node | "<N>" processes per group (VISSL's option)
    c.fast_frozen_trunk = True          # a fully frozen trunk runs as a compiled constant
    c.collective_timeout_s = 600.0      # a collective waiting longer (a stuck rank) stops the run
    # Periodic actions (fpipe.train.periodic); each is off until configured.
    c.layer_freeze = ml_collections.ConfigDict()
    c.layer_freeze.rules = ()           # LayerFreeze (fastreid): these params held at first ...
    c.layer_freeze.freeze_epochs = 0.0  # ... for this long
    c.layer_freeze.freeze_steps = placeholder(int)  # ... in steps (wins over freeze_epochs)
    c.precise_bn = ml_collections.ConfigDict()
    c.precise_bn.num_batches = 0        # PreciseBN: BatchNorm statistics over this many batches before each evaluation
    # A grid of heads on one trunk pass (dinov2): every head once per (lr, wd_mult), each head's
    # best member chosen on a validation split, reported on test (fpipe/train/head_grid.py).
    c.head_grid = ml_collections.ConfigDict()
    c.head_grid.lrs = ()                # absolute learning rates; empty: no grid
    c.head_grid.wd_mults = (1.0,)       # multipliers of optim.weight_decay
    c.head_grid.val_fraction = 0.1      # of train, per class, when the dataset has no val split
    c.best_metric = ""                  # e.g. "res5avg/top1": keep checkpoints/best.pt
    # all | present: label heads scored over every class, or over the classes the evaluated split
    # holds (ImageNet-A/R as the test split: top-k among their 200 of ImageNet's 1000 classes)
    c.eval_classes = "all"              # all | present (see above)
    c.best_mode = "max"                 # max | min: which best_metric value is best
    c.extract = ml_collections.ConfigDict()
    c.extract.features = ()             # after the run, these trunk features per split to WORKDIR/features/
    return c
