r"""Fine-tuning: the whole model trains, the pretrained trunk at a tenth of the heads' lr (by rule).

    python main.py --config=configs/finetune.py --config.model.weights.path=runs/supervised/checkpoints/ckpt_00000330.pt

Per-parameter policies are regex rules over dotted names (first match wins): ``optim.lr_mults``
slows the trunk; ``optim.wd_mults`` keeps norms and biases out of weight decay (the default).
``layer_freeze`` can hold chosen layers for the first steps (fastreid's FREEZE_ITERS).

Variant ``:mae_vit_b`` is MAE's ImageNet fine-tuning of a ViT-B/16 (facebookresearch/mae
main_finetune.py with FINETUNE.md's settings) on an ``image_folder`` dataset: mean-pooled patch
tokens through ``fc_norm`` (the pretraining file's final norm left out, fc_norm at its identity
init, as MAE's global_pool model starts), a linear head drawn from N(0, (2e-5)²); AdamW lr 5e-4 x
batch/256, weight decay 0.05 (not on norms, biases, tokens and positions), layer decay 0.65,
5 warmup epochs from 0 then cosine to 1e-6, 100 epochs at global batch 1024;
stochastic depth 0.1, Mixup 0.8 / CutMix 1.0 / label smoothing 0.1, random erasing 0.25;
random_resized_crop (bicubic) + flip + RandAugment (rand-m9-mstd0.5-inc1, timm's pixels),
resize(256, bicubic) + center_crop. MAE reports 83.6% top-1.

    torchrun --nproc_per_node=8 main.py --config=configs/finetune.py:mae_vit_b \
        --config.data.root=/data/imagenet --config.model.weights.path=mae_pretrain_vit_base.pth

(add ``--config.accum_steps=4`` where 128 images a device do not fit, as MAE's ``accum_iter``)

Variant ``:convnextv2_base`` is ConvNeXt V2-Base's ImageNet-1K fine-tuning from its FCMAE
pretraining (facebookresearch/ConvNeXt-V2 TRAINING.md and main_finetune.py): the same data,
augmentation and mixing as MAE's; the final LayerNorm at its identity init (FCMAE has none), a
linear head from N(0, (2e-5)²); AdamW lr 6.25e-4 x batch/256, weight decay 0.05 (not on norms,
biases and GRN), layer decay 0.6 over its 12 groups of 3 blocks (``layer_decay_type='group'``),
20 warmup epochs from 0 then cosine to 1e-6, 100 epochs at global batch 1024; stochastic depth
0.1; an EMA of the weights (decay 0.9999), evaluated beside them (``head_ema``). ConvNeXt V2
reports 84.9% top-1 (its EMA's).

    torchrun --nproc_per_node=8 main.py --config=configs/finetune.py:convnextv2_base \
        --config.data.root=/data/imagenet --config.model.weights.path=convnextv2_base_1k_224_fcmae.pt
"""
import ml_collections

from configs import common
from fpipe.defaults import head as head_config, trunk as trunk_config

VARIANTS = ("mae_vit_b", "convnextv2_base")


def get_config(arg=None):
    c = common.base_config()
    c.total_epochs = 5.0
    c.model.heads.fc = head_config("flatten", "linear")
    c.optim.name = "sgd"
    c.optim.lr = 0.05
    c.optim.momentum = 0.9
    c.optim.nesterov = True
    c.optim.weight_decay = 1e-4
    c.optim.lr_mults = ((r"trunk\..*", 0.1),)
    c.schedule.name = "cosine"
    c.schedule.warmup_epochs = 0.5
    c.precise_bn.num_batches = 8        # trunk BatchNorm statistics recomputed before evaluation
    c.best_metric = "fc/top1"
    c.eval_epochs = 1.0
    if arg in VARIANTS:
        globals()[arg](c)
    elif arg:
        raise ValueError(f"unknown finetune variant {arg!r}; valid: {VARIANTS}")
    return c


def mae_vit_b(c):
    _timm_recipe(c, epochs=100.0, lr=5e-4, warmup_epochs=5.0)
    c.model.trunk = trunk_config("vit_base_patch16_224", fc_norm=True, stochastic_depth_prob=0.1)
    c.model.heads.head = head_config("lastPOOL", "linear", init_std=2e-5)
    c.optim.layer_decay = 0.65


def convnextv2_base(c):
    _timm_recipe(c, epochs=100.0, lr=6.25e-4, warmup_epochs=20.0)
    c.model.trunk = trunk_config("convnextv2_base", stochastic_depth_prob=0.1)
    c.model.heads.head = head_config("flatten", "linear", init_std=2e-5)
    c.optim.layer_decay = 0.6
    c.optim.layer_decay_type = "group"
    c.ema.decay = 0.9999                  # model_ema True, model_ema_eval True


def _timm_recipe(c, *, epochs, lr, warmup_epochs):
    """What MAE's and ConvNeXt V2's ImageNet fine-tuning share (timm's create_transform, Mixup and
    RandomErasing; AdamW with lr x batch/256; warmup from 0, cosine to 1e-6) on an image_folder."""
    c.total_epochs = epochs
    c.data.name = "image_folder"
    c.data.image_size = 224
    c.data.batch_size = 1024              # global: split over torchrun's processes
    c.data.train_split, c.data.test_split = "train", "val"
    c.data.train_transforms = "random_resized_crop(interpolation='bicubic')|flip|rand_augment|normalize"
    c.data.eval_transforms = "resize(256, interpolation='bicubic')|center_crop|normalize"
    c.data.num_workers = 10
    c.model.heads = ml_collections.ConfigDict()
    c.optim.name = "adamw"
    c.optim.lr = lr
    c.optim.scale_lr = True               # lr x global batch / 256
    c.optim.reference_batch_size = 256
    c.optim.weight_decay = 0.05
    c.optim.lr_mults = ()
    c.schedule.name = "cosine"
    c.schedule.warmup_epochs = warmup_epochs
    c.schedule.warmup_factor = 0.0
    c.schedule.end_lr = 1e-6              # their min_lr
    c.precise_bn.num_batches = 0          # no BatchNorm
    c.mix.mixup_alpha = 0.8
    c.mix.cutmix_alpha = 1.0
    c.mix.label_smoothing = 0.1
    c.mix.random_erasing = 0.25
    c.best_metric = "head/top1"
