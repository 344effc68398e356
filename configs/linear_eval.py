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
"""
from configs import common
from fpipe.models.model import head_config


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
    if arg == "vissl_imagenet":
        vissl_imagenet(c)
    elif arg:
        raise ValueError(f"unknown linear_eval variant {arg!r}; valid: 'vissl_imagenet'")
    return c


def vissl_imagenet(c):
    c.total_epochs = 28.0
    c.data.name = "image_folder"
    c.data.image_size = 224
    c.data.batch_size = 256
    c.data.train_split, c.data.test_split = "train", "val"
    c.data.train_transforms = "random_resized_crop|flip|normalize"
    c.data.eval_transforms = "resize(256)|center_crop|normalize"
    c.data.num_workers = 8
    c.model.trunk.depth = 50
    c.model.heads = common.ml_collections.ConfigDict()
    for feature, grid in (("conv1", 12), ("res2", 6), ("res3", 4), ("res4", 3), ("res5", 2), ("res5avg", None)):
        c.model.heads[feature] = head_config(feature, "eval_mlp", pool=None if grid is None else [grid, grid])
    c.optim.lr = 0.01
    c.optim.scale_lr = True               # lr x global batch / 256
    c.optim.reference_batch_size = 256
    c.schedule.name = "multistep"
    c.schedule.warmup_epochs = 0.0
    c.schedule.milestones_epochs = (8.0, 16.0, 24.0)
    c.schedule.gamma = 0.1
    c.eval_epochs = 4.0
    c.best_metric = "res5avg/top1"
