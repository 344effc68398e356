"""Mixup, CutMix and label smoothing of a training batch (``config.mix``), as timm's ``Mixup``
(``mode="batch"``) gives them to DeiT's, MAE's and BEiT's fine-tuning recipes.

Per batch: with probability ``prob`` it is mixed, by CutMix with probability ``switch_prob`` when
both alphas are set (else by the one that is), with a ratio ``lam ~ Beta(alpha, alpha)``:
- Mixup: ``lam * x + (1 - lam) * x.flip(0)``;
- CutMix: a box of ``1 - lam`` of the area (sides ``int(sqrt(1 - lam) * H or W)``, centre uniform,
  clipped at the edges; timm 1.0's rounding of odd sides) copied from ``x.flip(0)``; ``lam``
  becomes the area left unpasted.
The labels become ``lam * smooth(y) + (1 - lam) * smooth(y.flip(0))`` with ``smooth`` the one-hot
with ``label_smoothing`` spread evenly (``1 - s + s/C`` on the class, ``s/C`` elsewhere: what
``F.cross_entropy(label_smoothing=s)`` learns). Draws come from numpy's generator seeded by the
data seed and the step (timm's come from numpy's global one), so a resumed run mixes as the
uninterrupted one; each process pairs the samples of its own share of the batch (``flip(0)``),
as timm does, so N processes mix otherwise than one.

``random_erasing`` (timm's RandomErasing, ``mode="pixel"``: MAE's and DeiT's ``reprob`` 0.25)
erases a box of each normalised image with that probability, before the mixing, as timm's
per-image transform comes before its batch Mixup; each image draws from a generator seeded by
(data seed, step, sample index), so any number of processes erases alike.
"""
import math

import numpy as np
import torch


def enabled(cfg) -> bool:
    return bool(cfg) and (cfg.mixup_alpha > 0 or cfg.cutmix_alpha > 0 or cfg.label_smoothing > 0
                          or cfg.get("random_erasing", 0) > 0)


def generator(seed: int, step: int, index=None) -> np.random.Generator:
    """The draws of one step: the batch's mixing, or (``index``) that sample's erasing; the same
    on every process, and on a resume."""
    return np.random.default_rng([int(seed), int(step), 0] if index is None else [int(seed), int(step), 1, int(index)])


def training_batch(batch: dict, cfg, num_classes: int, seed: int, step: int) -> dict:
    """``batch`` of training ``step`` with random erasing, Mixup / CutMix and label smoothing
    applied: soft targets ``[N, num_classes]`` in place of the labels."""
    images = batch["image"]
    if cfg.random_erasing > 0:  # each sample's own draws: the same for any number of processes
        rngs = [generator(seed, step, i) for i in batch["index"].tolist()]
        noises = [torch.Generator().manual_seed(int(rng.integers(2 ** 62))) for rng in rngs]
        images = random_erase(images, cfg.random_erasing, rngs, noises)
    lam, box = draw(cfg, generator(seed, step), tuple(images.shape[-2:]))
    images, targets = apply(images, batch["label"], num_classes, lam, box, cfg.label_smoothing)
    return {**batch, "image": images, "label": targets}


def draw(cfg, rng: np.random.Generator, size: tuple):
    """``(lam, box)`` for one batch of images of ``size`` (H, W): ``box`` is ``(top, bottom, left,
    right)`` for CutMix, None for Mixup; ``lam`` 1.0 when the batch is not mixed."""
    mixup, cutmix = cfg.mixup_alpha > 0, cfg.cutmix_alpha > 0
    if not (mixup or cutmix) or rng.random() >= cfg.prob:
        return 1.0, None
    use_cutmix = cutmix and (not mixup or rng.random() < cfg.switch_prob)
    alpha = cfg.cutmix_alpha if use_cutmix else cfg.mixup_alpha
    lam = float(rng.beta(alpha, alpha))
    return (lam, cutmix_box(size, lam, rng)) if use_cutmix else (lam, None)


def cutmix_box(size: tuple, lam: float, rng: np.random.Generator) -> tuple:
    """A box of about ``1 - lam`` of an image of ``size`` (H, W), centre uniform, clipped."""
    h, w = size
    cut = (1.0 - lam) ** 0.5
    ch, cw = int(h * cut), int(w * cut)
    cy, cx = int(rng.integers(0, h)), int(rng.integers(0, w))
    return (max(cy - ch // 2, 0), min(cy + (ch + 1) // 2, h), max(cx - cw // 2, 0), min(cx + (cw + 1) // 2, w))


def apply(images, labels, num_classes: int, lam: float, box, label_smoothing: float = 0.0):
    """``(images, soft targets [N, num_classes])`` mixed by ``lam`` and ``box`` (``draw``)."""
    targets = smooth_one_hot(labels, num_classes, label_smoothing)
    if lam == 1.0:
        return images, targets
    partner = images.flip(0)
    if box is None:
        images = lam * images + (1.0 - lam) * partner
    else:
        top, bottom, left, right = box
        images = images.clone()
        images[..., top:bottom, left:right] = partner[..., top:bottom, left:right]
        lam = 1.0 - (bottom - top) * (right - left) / (images.shape[-2] * images.shape[-1])
    return images, lam * targets + (1.0 - lam) * targets.flip(0)


ERASE_AREA = (0.02, 1 / 3)                     # of the image, uniform
ERASE_LOG_ASPECT = (math.log(0.3), math.log(1 / 0.3))  # of the box, log-uniform


def random_erase(images, prob: float, rngs, noises=None):
    """timm's RandomErasing (``mode="pixel"``, one box) on each normalised image of the batch:
    with probability ``prob``, a box of 2-33% of the area and aspect 0.3-3.3 (10 tries to fit)
    filled with N(0, 1) noise. ``rngs``: each image's draws (in timm's order; one object for all
    draws them in turn, as timm's global generator); ``noises``: each image's torch generator for
    the noise (None: torch's global one). Returns a new tensor."""
    images = images.clone()
    h_img, w_img = images.shape[-2:]
    for image, rng, noise in zip(images, rngs, noises or [None] * len(images)):
        if rng.random() > prob:
            continue
        for _ in range(10):
            area = rng.uniform(*ERASE_AREA) * h_img * w_img
            aspect = math.exp(rng.uniform(*ERASE_LOG_ASPECT))
            h, w = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
            if w < w_img and h < h_img:
                top, left = int(rng.integers(0, h_img - h + 1)), int(rng.integers(0, w_img - w + 1))
                patch = torch.randn((image.shape[0], h, w), generator=noise, dtype=image.dtype)
                image[:, top:top + h, left:left + w] = patch.to(image.device)
                break
    return images


def smooth_one_hot(labels, num_classes: int, smoothing: float):
    """One-hot rows with ``smoothing`` spread evenly over the classes."""
    off = smoothing / num_classes
    out = torch.full((labels.shape[0], num_classes), off, device=labels.device)
    return out.scatter_(1, labels[:, None], 1.0 - smoothing + off)
