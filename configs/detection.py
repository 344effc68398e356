r"""Faster / Mask / Keypoint R-CNN on the generated scenes (fpipe.detection.scenes), no download.

    python main.py --config=configs/detection.py                                          # Faster R-CNN
    python main.py --config=configs/detection.py --config.model.detection.mask_head.enabled=True      # + masks
    python main.py --config=configs/detection.py --config.model.detection.keypoint_head.enabled=True  # + keypoints

A ResNet-18 + FPN with GroupNorm, trained from scratch at 96 px on 2 CPU cores; results.json
holds COCO AP per head (bbox, segm, keypoints) from pycocotools on the 256 test scenes. The
sizes are torchvision's recipe scaled down to small images: anchors 16-256 px, 256-channel FPN
narrowed to 64, fewer proposals and sampled RoIs (see docs/DETECTION.md for measured numbers).
Real data: ``--config.data.name=coco --config.data.root=/data/coco`` (and torchvision's sizes).

Variant ``:coco_torchvision``: torchvision's fasterrcnn_resnet50_fpn on COCO as its reference
scripts train it (ResNet-50 + FPN with frozen BatchNorms, 800-1333 px, batch 16, lr 0.02, 26
epochs, decay at 16 and 22, 1000 warmup steps), labels = COCO's category ids (91 classes with the
background), so torchvision's COCO checkpoints load whole. Their COCO AP, without training:

    python main.py --config=configs/detection.py:coco_torchvision --config.data.root=/data/coco \
      --config.model.weights.path=fasterrcnn_resnet50_fpn_coco-258fb6c6.pth --config.total_steps=0

(expected: torchvision's published box AP 37.0 for that file; not measured here, no COCO on
this machine). Add ``--config.model.detection.mask_head.enabled=True`` for maskrcnn_resnet50_fpn.

Variant ``:vitdet``: a small plain ViT with ViTDet's simple feature pyramid on the scenes.
"""
import ml_collections
from ml_collections.config_dict import placeholder

from fpipe import defaults


VARIANTS = ("coco_torchvision", "vitdet")


def get_config(arg=None):
    if arg and arg not in VARIANTS:
        raise ValueError(f"unknown detection variant {arg!r}; valid: {VARIANTS} (switch heads by "
                         "--config.model.detection.mask_head.enabled=True / keypoint_head.enabled=True)")
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.compile = False              # True compiles all but the RPN's NMS; no faster on a CPU (docs/DETECTION.md)
    c.compile_min_images = 100_000
    c.cudnn_benchmark = True       # CUDA: conv algorithms timed per shape; False if data.fixed_canvas=False (sizes vary)
    c.num_threads = 1              # torch threads (0: torch's default); 1 is fastest on a busy 2-core machine
    c.total_epochs = 1.0
    c.total_steps = placeholder(int)
    c.log_steps = 20
    c.eval_epochs = placeholder(float)  # unset: evaluate only at the end
    c.eval_steps = placeholder(int)
    c.ckpt_epochs = 0.25
    c.ckpt_steps = placeholder(int)
    c.keep_ckpts = 2
    c.best_metric = ""             # e.g. "bbox/AP": keep checkpoints/best.pt
    c.best_mode = "max"
    c.collective_timeout_s = 600.0

    c.data = defaults.detection_data()
    c.model = ml_collections.ConfigDict()
    d = c.model.detection = defaults.detection_model()
    d.backbone.name = "resnet18"
    d.backbone.options = ml_collections.ConfigDict(dict(norm="group", norm_groups=32))  # trains from scratch
    d.backbone.freeze_at = 0       # nothing pretrained to keep
    d.fpn.out_channels = 64
    d.rpn.anchor_sizes = ((16,), (32,), (64,), (128,), (256,))
    d.rpn.pre_nms_top_n_train, d.rpn.post_nms_top_n_train = 200, 200
    d.rpn.pre_nms_top_n_test, d.rpn.post_nms_top_n_test = 200, 100
    d.rpn.batch_size_per_image = 128
    d.box_head.representation_size = 256
    d.box_head.batch_size_per_image = 64
    d.box_head.pooler_sampling_ratio = 1
    d.mask_head.layers, d.mask_head.dim_reduced, d.mask_head.pooler_sampling_ratio = (64, 64), 64, 1
    d.keypoint_head.num_keypoints = 3  # the scenes' top, left, right
    d.keypoint_head.layers, d.keypoint_head.pooler_sampling_ratio = (64, 64, 64, 64), 1
    c.model.weights = defaults.weights()  # a classification checkpoint for backbone.body (fpipe.weights)
    c.model.freeze = ()            # more regexes over param names to freeze (model.freeze_rules come first)

    c.optim = defaults.optim()
    c.optim.lr = 0.02
    c.optim.momentum = 0.9
    c.optim.weight_decay = 1e-4
    c.optim.clip_grad_norm = 10.0
    c.schedule = defaults.schedule()
    c.schedule.warmup_steps = 50
    if arg:
        globals()[arg](c)
    return c


def coco_torchvision(c):
    """torchvision's fasterrcnn_resnet50_fpn and its reference recipe on COCO (module docstring)."""
    c.data.name, c.data.labels = "coco", "category_id"
    c.data.min_size, c.data.max_size, c.data.fixed_canvas = 800, 1333, False  # pad each batch to its largest image
    c.data.batch_size, c.data.eval_batch_size, c.data.max_objects = 16, 8, 100
    c.data.hflip_prob = 0.5  # the references' --data-augmentation hflip
    c.model.detection = defaults.detection_model()  # torchvision's keys and values
    c.num_threads = 0
    c.total_epochs, c.ckpt_epochs = 26.0, 1.0
    c.optim.lr, c.optim.clip_grad_norm = 0.02, 0.0
    c.schedule.name, c.schedule.milestones_epochs, c.schedule.warmup_steps = "multistep", (16, 22), 1000


def vitdet(c):
    """A small plain ViT (patch 16, width 192, 6 blocks, from scratch) with ViTDet's simple
    feature pyramid on the scenes (docs/DETECTION.md); ViTDet's own is ViT-B/L/H, pretrained."""
    b = c.model.detection.backbone
    b.name, b.features, b.freeze_at = "vit", ("patch_grid",), 0
    b.options = ml_collections.ConfigDict(dict(patch_size=16, hidden_dim=192, depth=6, heads=3, mlp_dim=768,
                                               image_size=96))
    c.model.detection.fpn.simple = True
