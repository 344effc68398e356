"""torchvision's GeneralizedRCNNTransform as pure functions: normalise, resize, pad, map back.

Per image: ``(image - mean) / std``; a bilinear resize (align_corners=False) by one factor,
min(min_size / short side, max_size / long side), through ``F.interpolate(scale_factor=...,
recompute_scale_factor=True)`` exactly as torchvision calls it, so the output size is
floor(side * factor); gt boxes and keypoints scale by new / old size per axis (float32 ratios),
gt masks by nearest. The batch is zero-padded (after normalising) to a common size rounded up
to a multiple of ``size_divisible`` (32). Detections go back by :func:`postprocess`.
"""
import math

import torch
import torch.nn.functional as F

IMAGE_MEAN = (0.485, 0.456, 0.406)
IMAGE_STD = (0.229, 0.224, 0.225)


def normalize(image, mean=IMAGE_MEAN, std=IMAGE_STD):
    """``[3, H, W]`` float in [0, 1] -> ``(image - mean) / std`` per channel."""
    if not image.is_floating_point():
        raise TypeError(f"images must be floating point in [0, 1], got {image.dtype}")
    m = torch.as_tensor(mean, dtype=image.dtype, device=image.device)
    s = torch.as_tensor(std, dtype=image.dtype, device=image.device)
    return (image - m[:, None, None]) / s[:, None, None]


def scale_factor(height, width, min_size=800, max_size=1333):
    """torchvision's factor: min(min_size / short side, max_size / long side) in Python floats."""
    return min(min_size / min(height, width), max_size / max(height, width))


def resize_image(image, min_size=800, max_size=1333):
    """``[C, H, W]`` -> ``[C, H', W']`` bilinear, as torchvision's _resize_image_and_masks."""
    factor = scale_factor(image.shape[-2], image.shape[-1], min_size, max_size)
    return F.interpolate(image[None], scale_factor=factor, mode="bilinear", recompute_scale_factor=True,
                         align_corners=False)[0]


def resize_masks(masks, min_size=800, max_size=1333):
    """``[M, H, W]`` uint8 masks -> nearest-resized uint8 masks (torchvision's target path)."""
    factor = scale_factor(masks.shape[-2], masks.shape[-1], min_size, max_size)
    return F.interpolate(masks[:, None].float(), scale_factor=factor, recompute_scale_factor=True)[:, 0].byte()


def resize_boxes(boxes, original_size, new_size):
    """``[..., 4]`` xyxy boxes from ``original_size`` (h, w) to ``new_size`` (float32 ratios)."""
    rh, rw = (torch.tensor(float(n), dtype=torch.float32, device=boxes.device)
              / torch.tensor(float(o), dtype=torch.float32, device=boxes.device)
              for n, o in zip(new_size, original_size))
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack((x1 * rw, y1 * rh, x2 * rw, y2 * rh), dim=-1)


def resize_keypoints(keypoints, original_size, new_size):
    """``[..., P, 3]`` (x, y, v) from ``original_size`` to ``new_size``; v unchanged."""
    rh, rw = (torch.tensor(float(n), dtype=torch.float32, device=keypoints.device)
              / torch.tensor(float(o), dtype=torch.float32, device=keypoints.device)
              for n, o in zip(new_size, original_size))
    return torch.stack((keypoints[..., 0] * rw, keypoints[..., 1] * rh, keypoints[..., 2]), dim=-1)


def batch_images(images, size_divisible=32):
    """List of ``[C, H_i, W_i]`` -> ``[N, C, H, W]`` zero-padded at the bottom/right, H and W the
    largest sizes rounded up to a multiple of ``size_divisible``."""
    c = max(int(im.shape[0]) for im in images)
    h = int(math.ceil(max(int(im.shape[1]) for im in images) / size_divisible) * size_divisible)
    w = int(math.ceil(max(int(im.shape[2]) for im in images) / size_divisible) * size_divisible)
    out = images[0].new_zeros(len(images), c, h, w)
    for i, im in enumerate(images):
        out[i, :im.shape[0], :im.shape[1], :im.shape[2]] = im
    return out


def transform(images, targets=None, min_size=800, max_size=1333, mean=IMAGE_MEAN, std=IMAGE_STD,
              size_divisible=32):
    """torchvision's GeneralizedRCNNTransform.forward: list of ``[3, H, W]`` images (and optional
    target dicts with ``boxes`` [M, 4], ``masks`` [M, H, W], ``keypoints`` [M, P, 3]) ->
    ``(batch [N, 3, H, W], image_sizes [N, 2] int64 after resizing, targets resized)``.

    ``min_size`` is one int (eval; torchvision's training draws one from a tuple per image:
    pass the drawn value here)."""
    resized, sizes, out_targets = [], [], []
    for i, image in enumerate(images):
        original = tuple(image.shape[-2:])
        image = resize_image(normalize(image, mean, std), min_size, max_size)
        new = tuple(image.shape[-2:])
        resized.append(image)
        sizes.append(new)
        if targets is not None:
            t = dict(targets[i])
            if "boxes" in t:
                t["boxes"] = resize_boxes(t["boxes"], original, new)
            if "masks" in t:
                t["masks"] = resize_masks(t["masks"], min_size, max_size)
            if "keypoints" in t:
                t["keypoints"] = resize_keypoints(t["keypoints"], original, new)
            out_targets.append(t)
    batch = batch_images(resized, size_divisible)
    return batch, torch.tensor(sizes, dtype=torch.int64), (out_targets if targets is not None else None)


def postprocess(detections, image_sizes, original_sizes):
    """Maps per-image detections (``boxes``, ``keypoints``; ``masks`` [D, 1, h, w] probabilities
    are pasted by fpipe.detection.mask_head.paste_masks) from the resized to the original sizes."""
    out = []
    for det, size, original in zip(detections, image_sizes, original_sizes):
        size, original = tuple(int(s) for s in size), tuple(int(s) for s in original)
        det = dict(det)
        det["boxes"] = resize_boxes(det["boxes"], size, original)
        if "masks" in det:
            from fpipe.detection.mask_head import paste_masks
            det["masks"] = paste_masks(det["masks"], det["boxes"], original)
        if "keypoints" in det:
            det["keypoints"] = resize_keypoints(det["keypoints"], size, original)
        out.append(det)
    return out
