r"""Linear evaluation of a frozen ResNet trunk on several layers at once (VISSL style).

    python main.py --config=configs/linear_eval.py
    python main.py --config=configs/linear_eval.py --config.model.weights.path=runs/supervised/checkpoints/ckpt_00000330.pt

Default data: scikit-learn's embedded digits (no download). With no weights given it evaluates
the randomly initialised trunk and says so; README.md gives the numbers to expect.

Variant ``:vissl_imagenet`` is VISSL's ImageNet linear-evaluation recipe for a ResNet-50 on an
``image_folder`` dataset (root/train/<class>/*.JPEG, root/val/<class>/*.JPEG):

    torchrun --nproc_per_node=8 main.py --config=configs/linear_eval.py:vissl_imagenet \
        --config.data.root=/data/imagenet --config.model.weights.path=moco_v2_800ep.pth.tar

SGD nesterov, momentum 0.9, weight decay 5e-4, lr 0.01 x batch/256, multistep at epochs
8/16/24 of 28; eval_mlp heads on conv1, res2..res5 and res5avg pooled to VISSL's feature sizes
(9216, 9216, 8192, 9216, 8192, 2048; adaptive pooling windows instead of VISSL's fixed ones).

Variant ``:vit_s16`` is a ViT-S/16 layout shrunk for the digits (patch 4 at 32 px = 8×8 patches,
hidden dim 48): linear heads on the class token, the mean patch token, dinov2's input and the
patch grid pooled to 4×4 (docs/MODELS_VIT.md says which to read).

    python main.py --config=configs/linear_eval.py:vit_s16

Variant ``:dinov2_imagenet`` is dinov2's linear evaluation (dinov2/eval/linear.py) of a DINOv2
ViT-S/14 on an ``image_folder`` dataset: a grid of linear heads, {last class token, concat of the
last 4 class tokens} x {with, without the mean patch token} x 13 learning rates, trained at once
(each head's lr by optim.lr_mults); SGD momentum 0.9, no weight decay, cosine to 0, lr x batch/256,
10 epochs at global batch 1024 (= dinov2's 10 x 1250 iterations at 8 x 128); its transforms,
random_resized_crop + flip and resize(256) + center_crop, with bicubic resizing.

    torchrun --nproc_per_node=8 main.py --config=configs/linear_eval.py:dinov2_imagenet \
        --config.data.root=/data/imagenet --config.model.weights.path=dinov2_vits14_pretrain.pth

Variant ``:dino_imagenet`` is DINO's linear evaluation (facebookresearch/dino eval_linear.py) of its
ViT-S/16 teacher: one linear head ``linear`` on the normed class tokens of the last 4 blocks
(``concatCLS4``; for ViT-B DINO reads the class token and patch mean in its own interleaved order:
set the trunk and ``--config.model.heads.linear.feature=cls1_avgpool_interleaved``, which its
released ViT-B heads need), drawn from N(0, 0.01²); SGD momentum 0.9,
lr 0.001 x batch/256, no weight decay, cosine to 0, 100 epochs at global batch 1024;
random_resized_crop + flip, resize(256, bicubic) + center_crop.

    torchrun --nproc_per_node=8 main.py --config=configs/linear_eval.py:dino_imagenet \
        --config.data.root=/data/imagenet --config.model.weights.path=dino_deitsmall16_pretrain_full_checkpoint.pth

Variant ``:beit_imagenet`` is BEiT's linear probe (microsoft/unilm beit/run_linear_eval.py) of a
BEiT-B pretraining file (shared relative position bias): one linear head per block on that block's
class token and patch mean side by side (``block<i>_cls_avgpool``, not normed), all trained at
once; AdamW lr 4e-3 (its README's), weight decay 1e-4 on every head parameter, cosine to 0, 100
epochs at global batch 1024, heads drawn from N(0, 0.01²); its transforms (random_resized_crop +
flip, resize(256, bicubic) + center_crop) and its mean and std of 0.5. It reports every block;
BEiT's paper reads the best one.

    torchrun --nproc_per_node=8 main.py --config=configs/linear_eval.py:beit_imagenet \
        --config.data.root=/data/imagenet --config.model.weights.path=beit_base_patch16_224_pt22k.pth

Variant ``:mae_imagenet`` is MAE's linear probe (facebookresearch/mae main_linprobe.py) of an MAE
ViT-B/16 pretraining file: the normed class token through BatchNorm1d(affine=False, eps=1e-6) and
a linear head drawn from N(0, 0.01²); LARS, lr 0.1 x batch/256, no weight decay, 10 warmup epochs
from 0 then cosine to 0, 90 epochs at global batch 16384; random_resized_crop (bicubic) + flip,
resize(256, bicubic) + center_crop.

    torchrun --nproc_per_node=8 main.py --config=configs/linear_eval.py:mae_imagenet \
        --config.data.root=/data/imagenet --config.model.weights.path=mae_pretrain_vit_base.pth

Variants ``:multi_crop`` (SwAV/VISSL multi-resolution crops, data.views) and ``:multi_input``
(VISSL's several inputs mapped to heads, head crops=..., and a siamese_concat_view head,
towers=4) run on the digits as they are.
"""
import ml_collections

from configs import common
from fpipe.defaults import head as head_config, trunk as trunk_config

VARIANTS = ("vissl_imagenet", "vit_s16", "dinov2_imagenet", "dino_imagenet", "beit_imagenet", "mae_imagenet",
            "multi_crop", "multi_input")
DINOV2_LRS = (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1)


def get_config(arg=None):
    c = common.base_config()
    c.total_epochs = 10.0
    c.model.freeze = ("trunk",)          # freeze the trunk; its BatchNorm uses running statistics
    # One eval_mlp head (BatchNorm + linear) per evaluated layer; pooled to small fixed grids.
    c.model.heads.conv1 = head_config("conv1", "eval_mlp", pool=[4, 4])
    c.model.heads.res3 = head_config("res3", "eval_mlp", pool=[2, 2])
    c.model.heads.res4 = head_config("res4", "eval_mlp", pool=[2, 2])
    c.model.heads.res5avg = head_config("res5avg", "eval_mlp")
    c.optim.name = "sgd"
    c.optim.lr = 0.1
    c.optim.momentum = 0.9
    c.optim.nesterov = True
    c.optim.weight_decay = 5e-4
    c.schedule.name = "cosine"
    c.schedule.warmup_epochs = 1.0
    if arg in VARIANTS:
        globals()[arg](c)
    elif arg:
        raise ValueError(f"unknown linear_eval variant {arg!r}; valid: {VARIANTS}")
    return c


def vit_s16(c):
    # ViT-S/16's layout at digits' scale: 8×8 patches of 4 px (one digit pixel each), hidden dim 48.
    c.model.trunk = trunk_config("vit_small_patch16_224", patch_size=4, image_size=32, hidden_dim=48, heads=3,
                                 mlp_dim=192)
    c.model.heads = ml_collections.ConfigDict()
    for feature in ("lastCLS", "lastPOOL", "cls4_avgpool"):  # the usual ViT linear inputs (vectors)
        c.model.heads[feature] = head_config(feature, "linear")
    c.model.heads.patch_grid = head_config("patch_grid", "linear", pool=[4, 4])  # keeps the layout
    c.optim.lr = 0.01
    c.best_metric = "patch_grid/top1"


BICUBIC_EVAL = "resize(256, interpolation='bicubic')|center_crop|normalize"


def _imagenet(c, epochs, batch_size, train_transforms, eval_transforms=BICUBIC_EVAL):
    """An ImageNet recipe's data: root/train and root/val at 224 px (image_folder), evaluated every
    epoch, cosine to 0 without warmup; the heads are the variant's."""
    c.total_epochs = epochs
    c.data.name = "image_folder"
    c.data.image_size = 224
    c.data.batch_size = batch_size       # global: split over torchrun's processes
    c.data.train_split, c.data.test_split = "train", "val"
    c.data.train_transforms, c.data.eval_transforms = train_transforms, eval_transforms
    c.data.num_workers = 8
    c.eval_epochs = 1.0
    c.schedule.name = "cosine"
    c.schedule.warmup_epochs = 0.0
    c.model.heads = ml_collections.ConfigDict()


def _scaled(c, name, lr, weight_decay=0.0):
    """``name`` (sgd or lars: momentum 0.9, no nesterov) at ``lr`` x global batch / 256."""
    c.optim.name = name
    c.optim.lr = lr
    c.optim.scale_lr = True
    c.optim.reference_batch_size = 256
    c.optim.momentum = 0.9
    c.optim.nesterov = False
    c.optim.weight_decay = weight_decay


def dinov2_imagenet(c):
    _imagenet(c, 10.0, 1024, "random_resized_crop(interpolation='bicubic')|flip|normalize")  # dinov2's: bicubic
    c.model.trunk = trunk_config("vit_small_patch14_dinov2")  # 37x37 grid, resampled to 16x16 at 224 px
    lr_mults = []
    for feature in ("lastCLS", "cls1_avgpool", "concatCLS4", "cls4_avgpool"):  # dinov2: n_blocks x avgpool
        for lr in DINOV2_LRS:
            name = f"{feature}_lr_{lr:.5f}".replace(".", "_")
            c.model.heads[name] = head_config(feature, "linear", init_std=0.01)  # dinov2's init
            lr_mults.append((rf"heads\.{name}\..*", lr))
    _scaled(c, "sgd", 1.0)                # each head's lr is its lr_mult (x batch/256)
    c.optim.lr_mults = tuple(lr_mults)


def dino_imagenet(c):
    _imagenet(c, 100.0, 1024, "random_resized_crop|flip|normalize")
    c.model.trunk = trunk_config("vit_small_patch16_224")
    c.model.heads.linear = head_config("concatCLS4", "linear", init_std=0.01)
    _scaled(c, "sgd", 0.001)
    c.best_metric = "linear/top1"


def beit_imagenet(c):
    half = "normalize(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))"  # BEiT's default (not ImageNet's)
    _imagenet(c, 100.0, 1024, f"random_resized_crop|flip|{half}",
              f"resize(256, interpolation='bicubic')|center_crop|{half}")
    c.model.trunk = trunk_config("beit_base_patch16_224_pt22k")
    for i in range(12):
        c.model.heads[f"block{i:02d}"] = head_config(f"block{i}_cls_avgpool", "linear", init_std=0.01)
    c.optim.name = "adamw"
    c.optim.lr = 4e-3
    c.optim.weight_decay = 1e-4
    c.optim.wd_mults = ()                 # BEiT decays the heads' biases too


def mae_imagenet(c):
    _imagenet(c, 90.0, 16384, "random_resized_crop(interpolation='bicubic')|flip|normalize")
    c.model.trunk = trunk_config("vit_base_patch16_224")
    c.model.heads.lastCLS = head_config("lastCLS", "eval_mlp", bn_affine=False, bn_eps=1e-6, init_std=0.01)
    _scaled(c, "lars", 0.1)
    c.schedule.warmup_epochs = 10.0
    c.schedule.warmup_factor = 0.0
    c.best_metric = "lastCLS/top1"


def vissl_imagenet(c):
    _imagenet(c, 28.0, 256, "random_resized_crop|flip|normalize", "resize(256)|center_crop|normalize")
    c.model.trunk.name = "resnet50"
    for feature, grid in (("conv1", 12), ("res2", 6), ("res3", 4), ("res4", 3), ("res5", 2), ("res5avg", None)):
        c.model.heads[feature] = head_config(feature, "eval_mlp", pool=None if grid is None else [grid, grid])
    c.optim.lr = 0.01
    c.optim.scale_lr = True               # lr x global batch / 256
    c.optim.reference_batch_size = 256
    c.schedule.name = "multistep"
    c.schedule.milestones_epochs = (8.0, 16.0, 24.0)
    c.schedule.gamma = 0.1
    c.eval_epochs = 4.0
    c.best_metric = "res5avg/top1"


def multi_crop(c):
    # SwAV/VISSL multi-crop on digits: 2 crops at 32 px and 4 small ones at 16 px per image, every
    # head on all six (pooled to its grid); evaluation on one centre view, as usual.
    c.data.views = ((2, "random_resized_crop(32, scale=(0.35, 1.0))|normalize"),
                    (4, "random_resized_crop(16, scale=(0.1, 0.4))|normalize"))


def multi_input(c):
    # VISSL's MULTI_INPUT_HEAD_MAPPING: "images" (crop 0, 32 px) feed the res4/res5avg heads, four
    # "patches" (crops 1-4, 16 px) the res3 head, and a siamese_concat_view head (towers=4) reads
    # the four patches side by side. The same crops in evaluation (deterministic ones).
    c.data.views = ((1, "random_resized_crop(32, scale=(0.35, 1.0))|normalize"),
                    (4, "random_resized_crop(16, scale=(0.1, 0.4))|normalize"))
    c.data.eval_views = ((1, "resize|center_crop|normalize"), (4, "resize(16)|center_crop(16)|normalize"))
    c.model.heads = ml_collections.ConfigDict()
    c.model.heads.res4 = head_config("res4", "eval_mlp", pool=[2, 2], crops=(0, 1))
    c.model.heads.res5avg = head_config("res5avg", "eval_mlp", crops=(0, 1))
    c.model.heads.res3 = head_config("res3", "eval_mlp", pool=[1, 1], crops=(1, 4))
    c.model.heads.tiles = head_config("res5avg", "linear", crops=(1, 4), towers=4)
