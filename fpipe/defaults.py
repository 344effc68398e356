"""Every config section's defaults, in one style and one torch-free file.

Config files (``configs/*.py``) build their ConfigDicts from these functions only, so loading a
config (``main.py --config_only``, a test, a sweep tool) imports ``ml_collections`` and nothing
heavier. Each setting's ``# comment`` is its help text (``main.py --config_only`` prints it).
The modules that use a section (``fpipe.optim``, ``fpipe.data``, …) read their defaults here.
"""
import ml_collections
from ml_collections.config_dict import placeholder

# Default optimizer rules recognise norm params and embeddings by name; they, and every bias, get
# no weight decay and no LARS adaptation (timm's and torchvision's recipes; tests/test_optim.py
# checks every trunk family: all 1-D params are matched). The names, in torchvision's layouts:
# bn1..bn3 and downsample.1 (ResNet), VISSL's channel_bn, bn/norm/gn/ln with an optional index
# or prefix (norm1, ln_1, fc_norm); the norm after a conv in torchvision's Conv2dNormActivation
# (RegNet's stem/proj/a/b/c.1, EfficientNet's features.0/8.1 and block.K.1); ConvNeXt's block.2
# downsample (features.2/4/6.0) and classifier.0 LayerNorms and V2's GRN (block.grn, as ConvNeXt
# V2's recipe); Swin's patch-embedding LayerNorm (features.0.2); ViT's class/register tokens,
# position embedding and layer scales (ls_1.gamma; ConvNeXt's layer_scale), Swin's relative
# position bias tables and V2's logit scales and position-bias MLP (timm's and the original's).
BIAS = r"(.*\.)?\w*bias"
NORM_WEIGHT = (r"(.*\.)?((bn|\w*norm|gn|ln|grn|channel_bn)(_?\d+)?|downsample\.1|features\.0\.2|"
               r"(stem|proj|a|b|c|features\.[08]|block\.\d+)\.1|block\.2|features\.[246]\.0|classifier\.0)\.weight")
EMBEDDING = (r"(.*\.)?(class_token|dist_token|register_tokens|pos_embedding|layer_scale|ls_\d+\.gamma|"
             r"relative_position_bias_table|logit_scale|cpb_mlp\.\d+\.weight)")
NO_DECAY = ((BIAS, 0.0), (NORM_WEIGHT, 0.0), (EMBEDDING, 0.0))
NO_LARS = ((BIAS, True), (NORM_WEIGHT, True), (EMBEDDING, True))

# dinov2's 13 learning rates (for standardised features): the linear probe's default grid
LINEAR_LRS = (1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1, 0.2, 0.5, 1.0)

# Every option of every trunk family, with its type (tests/test_defaults.py checks this table
# against the families' own OPTIONS, so it cannot drift).
TRUNK_OPTION_TYPES = dict(
    bottleneck_multiplier=float, channels=tuple, class_token=bool, depth=int, depth_mult=float,
    depths=tuple, dist_token=bool, dropout=float, embed_dim=int, fc_norm=bool, grn=bool, group_width=int,
    groups=int, heads=int, hidden_dim=int, image_size=int, layer4_stride=int, layer_scale=float, ln_eps=float,
    mlp=str, mlp_dim=int, mlp_ratio=float, norm=str, norm_eps=float, norm_groups=int, norm_momentum=float,
    num_heads=tuple, num_registers=int, padding=str, patch_bias=bool, patch_size=int, pos_embed=bool, pos_embed_class=bool,
    pos_resample=str, pre_norm=bool, rel_pos_bias=str, se_ratio=float, stem=str, stem_width=int,
    stochastic_depth_prob=float, w_0=int, w_a=float,
    v2=bool, w_m=float, width_mult=float, width_multiplier=int, width_per_group=int, window_size=int,
    zero_init_residual=bool)


def data():
    """``config.data``: the embedded digits dataset trains with no download."""
    c = ml_collections.ConfigDict()
    c.name = "digits"              # digits | image_folder | synthetic (see fpipe.data.registry)
    c.root = ""                    # image_folder: root/<train_split>/<class>/<image files>
    c.split_file = ""              # image_folder: a CSV of path,label,split rows instead of folders
    c.image_size = 64              # the trunk's input size; digits are upsampled to it at load
    c.batch_size = 64              # GLOBAL training batch, split evenly across ranks
    c.eval_batch_size = 256        # GLOBAL evaluation batch; each rank gets ceil(it / world_size)
    c.num_workers = 0              # worker processes per process (0: batches made in the caller)
    c.worker_niceness = 19         # workers' CPU priority below the step's (0-19, os.nice; 0: the same)
    # Op strings (fpipe.data.transforms; torchvision's geometry, docs/DATA.md); a bare crop/resize
    # size means ``image_size``; resize/random_resized_crop take interpolation='bilinear'|'bicubic'.
    # No flip by default: the default data are digits, which a mirror does not preserve.
    c.train_transforms = "random_resized_crop(scale=(0.35, 1.0))|normalize"  # ops joined by |
    c.eval_transforms = "resize|center_crop|normalize"  # ops joined by |
    # Multi-crop training (VISSL/SwAV's multi-resolution inputs): ((count, transforms), ...), e.g.
    # ((2, "random_resized_crop(32)|normalize"), (4, "random_resized_crop(16, scale=(0.1, 0.5))|normalize")).
    c.views = ()                   # training crops per image; empty: one, by train_transforms
    c.eval_views = ()              # evaluation crops the same way; a head scores their mean logits
    c.seed = 0                     # data order and augmentation (and synthetic's pixels)
    c.train_split = "train"        # image_folder subfolder names (or split names in split_file)
    c.test_split = "val"           # the split evaluated and reported
    c.val_split = ""               # optional third split (e.g. "val" with test_split="test"); "": none
    c.real_labels = ""             # ImageNet-ReaL's real.json: label heads also report real_top1 on the test split
    c.eval_folders = "names"       # test/val class folders named as train's, or "indices": by its class numbers (ImageNet-V2)
    c.max_image_pixels = 89_478_485  # image files above this width × height are refused
    c.max_aspect_ratio = 32.0      # ... and above this long side / short side
    c.num_classes = 10             # synthetic only
    c.num_train = 1024             # synthetic only
    c.num_test = 256               # synthetic only
    return c


def optim():
    """``config.optim``; rule lists are ``((regex, value), ...)``, the first full match wins."""
    c = ml_collections.ConfigDict()
    c.name = "sgd"                 # sgd | adamw | lars
    c.lr = 0.1                     # base lr: scaled by scaled_lr() when scale_lr, times the schedule
    c.momentum = 0.9               # sgd and lars; dampening is always 0
    c.nesterov = False             # sgd: Nesterov momentum
    c.weight_decay = 0.0           # coupled (added to the grad) for sgd and lars; decoupled for adamw
    c.betas = (0.9, 0.999)         # adamw
    c.eps = 1e-8                   # adamw
    c.lars_eta = 0.001             # LARS trust coefficient
    c.lr_mults = ()                # e.g. (("heads\\..*", 10.0),); None freezes; unmatched params: 1.0
    c.wd_mults = NO_DECAY          # unmatched params: 1.0
    c.layer_decay = 1.0            # ViT/Swin/ConvNeXt fine-tuning: k-th of D blocks at lr x this^(D+1-k); 1: off
    c.layer_decay_type = "single"  # a layer per block, or "group": ConvNeXt's 12 groups of 3 (V1 S-XL, V2 B-H)
    c.lars_exclude = NO_LARS       # unmatched params: False (adapted)
    c.clip_grad_norm = placeholder(float)   # None or 0: off
    c.clip_grad_value = placeholder(float)  # None or 0: off
    c.scale_lr = False             # VISSL's linear scaling rule: lr * global_batch / reference_batch_size
    c.reference_batch_size = 256   # scale_lr: the batch the base lr is given for
    return c


def mix():
    """``config.mix``: random erasing, Mixup / CutMix and label smoothing of the training batches, as
    timm's RandomErasing and Mixup (DeiT's, MAE's, BEiT's fine-tuning: random_erasing 0.25,
    mixup_alpha 0.8, cutmix_alpha 1.0, label_smoothing 0.1); fpipe.data.mix. The heads then learn
    soft targets; evaluation is unchanged."""
    c = ml_collections.ConfigDict()
    c.mixup_alpha = 0.0            # Beta(a, a) ratio of two whole images; 0: no Mixup
    c.cutmix_alpha = 0.0           # Beta(a, a) ratio of a box pasted from another image; 0: no CutMix
    c.switch_prob = 0.5            # with both: the chance a batch is CutMix rather than Mixup
    c.prob = 1.0                   # the chance a batch is mixed at all
    c.label_smoothing = 0.0        # s: 1 - s + s/C on the class, s/C elsewhere (with or without mixing)
    c.random_erasing = 0.0         # timm's RandomErasing (mode pixel) per image, before mixing: MAE's reprob 0.25
    return c


def ema():
    """``config.ema``: an exponential moving average of the trained weights, evaluated beside them
    (results ``<head>_ema``), as timm's ModelEmaV3 (DeiT fine-tunes with decay 0.99996, ConvNeXt
    0.9999); fpipe.train.ema."""
    c = ml_collections.ConfigDict()
    c.decay = 0.0                  # ema = decay * ema + (1 - decay) * weights after every step; 0: off
    c.warmup = False               # timm's warmup: decay min(decay, 1 - (1 + (n - 1) / gamma) ** -power) at update n
    c.warmup_gamma = 1.0            # the warmup's step scale (timm's default)
    c.warmup_power = 0.75          # timm: 3/4 for long runs, 2/3 for short ones
    return c


def schedule():
    """``config.schedule``: cosine to 0 over the whole run, no warmup, no delay."""
    c = ml_collections.ConfigDict()
    c.name = "cosine"              # constant | multistep | cosine | polynomial
    c.warmup_epochs = placeholder(float)  # or warmup_steps; unset: no warmup
    c.warmup_steps = placeholder(int)  # ... in steps (wins over warmup_epochs)
    c.warmup_method = "linear"     # linear | constant | exponential
    c.warmup_factor = 0.001        # multiplier at step 0 of the warmup (detectron2's default)
    c.delay_epochs = placeholder(float)  # or delay_steps: hold the base lr after warmup (cosine, polynomial)
    c.delay_steps = placeholder(int)  # ... in steps
    c.milestones_epochs = placeholder(tuple)  # or milestones_steps: multistep's decay points, from step 0
    c.milestones_steps = placeholder(tuple)  # ... in steps
    c.gamma = 0.1                  # multistep's factor per milestone
    c.end_factor = placeholder(float)  # cosine/polynomial final multiplier (default 0) ...
    c.end_lr = placeholder(float)  # ... or final absolute lr
    c.power = 1.0                  # polynomial's exponent
    return c


def precision():
    """``config.precision``: the autocast dtype and the loss scaler's settings (GradScaler's)."""
    c = ml_collections.ConfigDict()
    c.dtype = "float32"            # float32 | bf16 | fp16 (fp16: CUDA only, with dynamic loss scaling)
    c.init_scale = 2.0 ** 16       # fp16 loss scale at the start
    c.growth_factor = 2.0          # fp16: the scale times this after growth_interval finite steps
    c.backoff_factor = 0.5         # fp16: the scale times this after a non-finite step (skipped)
    c.growth_interval = 2000       # fp16: finite steps before the scale grows
    return c


def weights():
    """``config.model.weights``: which file loads into the model, and how (fpipe.weights)."""
    c = ml_collections.ConfigDict()
    c.path = ""                    # a checkpoint file or a Hugging Face model folder; empty: random init
    c.format = "auto"              # auto | torchvision (plain names) | vissl | fpipe
    c.state_dict_key = ""          # dotted path of the sub-dict holding the weights
    c.skip_layers = ("num_batches_tracked",)  # substrings or regexes of names to drop
    c.remove_prefix = ""           # a prefix to strip from the file's names (format: auto finds it itself)
    c.append_prefix = ""           # a prefix to add to them
    c.rename = ()                  # ((regex, replacement), ...): first match wins
    c.select = ""                  # which copy among several: 'teacher', 'module.encoder_k.', ...
    c.allow_partial = False        # accept a trunk not fully covered, or shape mismatches
    c.load_heads = False           # also load heads.<name>.* from the file
    c.stub_objects = False         # read files holding other libraries' objects (inert stand-ins)
    return c


def head_weights():
    """``config.model.head_weights``: a released head's file (DINO's ``*_linearweights.pth``,
    dinov2's ``*_linear_head.pth``) loaded into ``model.heads`` after ``model.weights``
    (fpipe.weights.heads_file): each head tensor from the file tensor whose name ends in
    ``<head>.<param>`` (or in ``<param>`` with one head); anything left at its init is an error,
    except in the heads ``heads`` leaves out."""
    c = ml_collections.ConfigDict()
    c.path = ""                    # empty: the heads keep their initialisation
    c.state_dict_key = ""          # dotted path of the sub-dict holding them ('state_dict')
    c.rename = ()                  # ((regex, replacement), ...): first match wins
    c.heads = ()                   # the heads the file is for (the others keep their init); empty: every head
    return c


def trunk(name="resnet", **options):
    """``config.model.trunk``: ``name`` (a family or preset, see fpipe.models.model.build_trunk)
    and every option of every family as a typed placeholder, settable from the command line.

    An option left None means "the preset's (or family's) default"; an option that is set must
    be one the named family takes. So a config names what it means (``trunk("resnet18")``, not
    ``depth=18``): ``--config.model.trunk.name=convnext_tiny`` then carries no ResNet option
    along, while ``--config.model.trunk.depth=50`` on ``resnet18`` gives ResNet-50.
    """
    unknown = sorted(set(options) - set(TRUNK_OPTION_TYPES))
    if unknown:
        raise ValueError(f"unknown trunk option(s) {unknown}; valid: {sorted(TRUNK_OPTION_TYPES)}")
    c = ml_collections.ConfigDict({"name": name, **{k: placeholder(t) for k, t in sorted(TRUNK_OPTION_TYPES.items())}})
    for key, value in options.items():
        c[key] = tuple(value) if isinstance(value, list) else value
    return c


def head(feature, type="linear", pool=None, dims=None, towers=1, crops=(), target="label",
         loss="cross_entropy", loss_weight=1.0, **options):
    """One head: reads ``feature``, pools it to ``pool`` ((h, w) adaptive grid) if given, then
    ``type`` with output sizes ``dims`` (default: the size of its target: the dataset's class
    count). ``towers`` > 1: each image's that many crops (data.views) side by side, VISSL's
    siamese_concat_view. ``crops=(first, count)``: the crops it reads (VISSL's several inputs
    mapped to heads). Multi-task: ``target`` (``label`` or a dataset's extra target) learnt by
    ``loss`` (cross_entropy | bce | mse), weighted by ``loss_weight`` in the summed loss.
    ``options``: the layers' (fpipe.models.heads.MLP_OPTIONS: ``use_bn``, …, ``init_std`` for
    DINO's, dinov2's and BEiT's N(0, 0.01²) linear probes).

    Unset values are typed placeholders, so ``--config.model.heads.NAME.pool='(2, 2)'`` works."""
    c = ml_collections.ConfigDict(dict(feature=feature, type=type, towers=towers, crops=tuple(crops),
                                       target=target, loss=loss, loss_weight=float(loss_weight), **options))
    c.pool = placeholder(tuple) if pool is None else tuple(pool)
    c.dims = placeholder(tuple) if dims is None else tuple(dims)
    return c


def evaluation():
    """``config.eval``: the protocols of an evaluation run (fpipe.evaluate, docs/EVALUATION.md)."""
    c = ml_collections.ConfigDict()
    c.protocols = ("knn",)         # any of: knn, linear, logreg, low_shot
    c.layers = ()                  # cached layers to evaluate; empty: every layer of extract.features
    c.features_from = ""           # a WORKDIR whose features/ to read instead of running the trunk
    c.seed = 0                     # the validation split carved from train (stratified)
    c.val_fraction = 0.2           # of train, per class, to choose lr/wd (linear) and C (logreg); never test
    c.normalize = "standardize"    # linear, logreg, low_shot inputs: standardize (train mean/std) | l2 | none
    c.knn = ml_collections.ConfigDict()
    c.knn.ks = (10, 20, 100, 200)  # DINO's weighted vote; all ks from one search
    c.knn.temperature = 0.07
    c.knn.query_chunk = 1024       # memory: query_chunk x bank_chunk floats
    c.knn.bank_chunk = 50000        # not a power of two: 2^16-wide blocks ran slower (cache aliasing)
    c.linear = ml_collections.ConfigDict()
    c.linear.lrs = LINEAR_LRS      # the grid: len(lrs) x len(wds) heads per layer
    c.linear.wds = (0.0, 1e-3)
    c.linear.epochs = 20
    c.linear.batch_size = 256
    c.linear.momentum = 0.9
    c.linear.init_std = 0.01
    c.linear.seed = 0
    c.linear.retrain = False       # True: the best head again on train + val
    c.logreg = ml_collections.ConfigDict()
    c.logreg.Cs = (0.01, 0.1, 1.0, 10.0)
    c.logreg.max_iter = 100        # max_iter, tol: scikit-learn's defaults
    c.logreg.tol = 1e-4
    c.logreg.history = 10          # L-BFGS history size
    c.logreg.refit = True          # refit the best C on train + val (CLIP)
    c.low_shot = ml_collections.ConfigDict()
    c.low_shot.shots = (1, 2, 5, 10, 25)
    c.low_shot.seeds = (0, 1, 2)
    c.low_shot.classifier = "logreg"  # logreg at C, or knn (raw features, min(k_nn, shots) neighbours)
    c.low_shot.C = 1.0
    c.low_shot.k_nn = 20
    return c


def detection_data():
    """``config.data`` of a detection run (fpipe.detection.scenes, .coco, .collate)."""
    c = ml_collections.ConfigDict()
    c.name = "scenes"              # scenes (generated, no download) | coco (annotation JSON + image folder)
    c.seed = 0                     # data order (and the scenes' pixels)
    c.batch_size = 4               # GLOBAL training batch (images), split evenly across ranks
    c.eval_batch_size = 8          # GLOBAL evaluation batch
    c.min_size = 96                # resize: short side to min_size ... (torchvision: 800)
    c.max_size = 96                # ... unless the long side passes max_size (torchvision: 1333)
    c.size_divisible = 32          # pad to a multiple of this
    c.fixed_canvas = True          # pad every batch to max_size (one shape); False: the batch's largest image
    c.max_objects = 8              # objects per image in a batch (more are cut, with a warning)
    c.hflip_prob = 0.0             # training: mirror each image with this probability (torchvision's recipe: 0.5)
    c.num_train = 2048             # scenes: images per split
    c.num_test = 256
    c.min_side = 64                # scenes: image sides drawn from min_side..max_side px
    c.max_side = 128
    c.max_objects_per_image = 4    # scenes: 1..this many objects
    c.labels = "contiguous"        # coco: labels 1..C by sorted category id | category_id (torchvision's 91 COCO classes)
    c.root = ""                    # coco: root/annotations/instances_<split>.json + root/<split>/
    c.train_split = "train2017"    # coco: split names
    c.test_split = "val2017"
    c.train_annotations = ""       # coco: explicit paths instead of the root layout
    c.test_annotations = ""
    c.train_images = ""
    c.test_images = ""
    return c


def detection_model():
    """``config.model.detection``: the same keys and values as ``fpipe.detection.model.default_config()``
    (torchvision's fasterrcnn_resnet50_fpn), torch-free for config files; tests/test_detection_train.py
    checks that the two agree."""
    c = ml_collections.ConfigDict()
    c.backbone = ml_collections.ConfigDict(dict(
        name="resnet50", options={}, features=("res2", "res3", "res4", "res5"), frozen_norms=True, freeze_at=2,
        freeze_conv_body=False))
    c.fpn = ml_collections.ConfigDict(dict(enabled=True, out_channels=256, simple=False, rpn_levels=placeholder(tuple),
                                           roi_levels=placeholder(tuple)))  # (min, max) level numbers; None: all
    c.rpn = ml_collections.ConfigDict(dict(
        anchor_sizes=((32,), (64,), (128,), (256,), (512,)), aspect_ratios=((0.5, 1.0, 2.0),) * 5, conv_depth=1,
        pre_nms_top_n_train=2000, pre_nms_top_n_test=1000, post_nms_top_n_train=2000, post_nms_top_n_test=1000,
        nms_thresh=0.7, score_thresh=0.0, min_size=1e-3, fg_iou_thresh=0.7, bg_iou_thresh=0.3,
        batch_size_per_image=256, positive_fraction=0.5))
    c.rpn_only = False
    c.box_head = ml_collections.ConfigDict(dict(
        representation_size=1024, pooler_resolution=7, pooler_sampling_ratio=2, fg_iou_thresh=0.5, bg_iou_thresh=0.5,
        batch_size_per_image=512, positive_fraction=0.25, score_thresh=0.05, nms_thresh=0.5, detections_per_img=100))
    c.mask_head = ml_collections.ConfigDict(dict(
        enabled=False, layers=(256, 256, 256, 256), dim_reduced=256, pooler_resolution=14, pooler_sampling_ratio=2,
        target_max_grid=placeholder(int)))  # None: exact (a host sync); a bound makes the targets static
    c.keypoint_head = ml_collections.ConfigDict(dict(
        enabled=False, num_keypoints=17, layers=(512,) * 8, pooler_resolution=14, pooler_sampling_ratio=2))
    return c
