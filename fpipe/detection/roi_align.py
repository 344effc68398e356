"""RoIAlign (torchvision's CPU kernel: sampling grid, bilinear and boundary rules) and the
multi-scale FPN pooler, vectorised over RoIs as gathers from one flat feature buffer.

Every RoI samples its own level of a flattened ``[sum N*H*W, C]`` buffer, so the multi-scale
pooler is one call with static shapes rather than a loop over levels with masked writes.
Gradients reach the features; the boxes get none (as torchvision's RoIAlign).
"""
import math

import torch

from fpipe.detection.boxes import box_area


def roi_align(features, boxes, output_size, spatial_scale=1.0, sampling_ratio=-1, aligned=False, max_grid=None):
    """Pools ``features [N, C, H, W]`` inside each box to ``[K, C, PH, PW]``.

    ``boxes``: ``[K, 5]`` rows (batch index, x1, y1, x2, y2), a list of ``[L_i, 4]`` per image, or
    a padded ``[N, R, 4]`` (-> ``[N, R, C, PH, PW]``). ``sampling_ratio`` > 0 samples that many
    points per bin and axis; <= 0 takes ceil(roi size / output size) per RoI, whose maximum costs a
    host sync unless ``max_grid`` bounds it (larger RoIs are then sampled ``max_grid`` times).
    """
    rois, unflatten = _as_rois(boxes)
    n, _, h, w = features.shape
    zeros = torch.zeros(rois.shape[0], dtype=torch.int64, device=rois.device)
    level = _Level(offset=zeros, height=zeros + h, width=zeros + w,
                   scale=torch.full_like(rois[:, 0], spatial_scale))
    out = _pool(_flat(features), rois, level, _pair(output_size), sampling_ratio, aligned, max_grid)
    return unflatten(out)


def multiscale_roi_align(features, boxes, image_shapes, output_size=7, sampling_ratio=2,
                         canonical_scale=224, canonical_level=4, eps=1e-6, max_grid=None, scales=None):
    """torchvision's MultiScaleRoIAlign over FPN ``features`` (a list, finest first; aligned=False).

    Each box goes to level floor(canonical_level + log2(sqrt(area) / canonical_scale) + eps),
    clamped to the levels present; level scales are inferred from ``image_shapes`` (h, w), or
    given as a ``[L]`` tensor ``scales`` (:func:`infer_scales`' values: then nothing here depends
    on Python numbers that change from batch to batch, and a compiled graph serves every batch).
    """
    rois, unflatten = _as_rois(boxes)
    if scales is None:
        scales = torch.tensor(infer_scales([f.shape[-2:] for f in features], image_shapes))
    scales = scales.to(dtype=rois.dtype, device=rois.device)
    k_min, k_max = (-torch.log2(scales[0])).round(), (-torch.log2(scales[-1])).round()  # powers of two: exact
    if len(features) == 1:
        lvl = torch.zeros(rois.shape[0], dtype=torch.int64, device=rois.device)
    else:
        lvl = map_levels(rois[:, 1:], k_min, k_max, canonical_scale, canonical_level, eps)
    sizes = [f.shape[0] * f.shape[2] * f.shape[3] for f in features]
    offsets = torch.tensor([0] + sizes[:-1], device=rois.device).cumsum(0)
    heights = torch.tensor([f.shape[2] for f in features], device=rois.device)
    widths = torch.tensor([f.shape[3] for f in features], device=rois.device)
    level = _Level(offset=offsets[lvl], height=heights[lvl], width=widths[lvl],
                   scale=scales[lvl])
    flat = torch.cat([_flat(f) for f in features])
    return unflatten(_pool(flat, rois, level, _pair(output_size), sampling_ratio, False, max_grid))


def infer_scales(feature_sizes, image_shapes):
    """Per level: the power of two nearest to feature height / (largest image height)."""
    if not image_shapes:
        raise ValueError("image_shapes is empty: the pooler needs the images' (height, width)")
    original = (max(int(s[0]) for s in image_shapes), max(int(s[1]) for s in image_shapes))
    return [2.0 ** round(math.log2(float(size[0]) / float(original[0]))) for size in feature_sizes]


def map_levels(boxes, k_min, k_max, canonical_scale=224, canonical_level=4, eps=1e-6):
    """FPN level index (0 = ``k_min``) of each ``[..., 4]`` box: torchvision's LevelMapper."""
    s = torch.sqrt(box_area(boxes))
    target = torch.floor(canonical_level + torch.log2(s / canonical_scale) + torch.tensor(eps, dtype=s.dtype))
    return (torch.clamp(target, min=k_min, max=k_max) - k_min).to(torch.int64)


class _Level:
    """Per-RoI view into the flat buffer: start row, level height/width, spatial scale."""

    def __init__(self, offset, height, width, scale):
        self.offset, self.height, self.width, self.scale = offset, height, width, scale


def _pair(size):
    return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _flat(features):
    return features.permute(0, 2, 3, 1).reshape(-1, features.shape[1])


def _as_rois(boxes):
    """``[K, 5]`` rois and a function restoring the caller's layout on the pooled output."""
    if isinstance(boxes, (list, tuple)):
        rois = torch.cat([torch.cat([torch.full_like(b[:, :1], i), b], 1) for i, b in enumerate(boxes)])
        return rois, lambda out: out
    if boxes.dim() == 3:
        n, r, _ = boxes.shape
        idx = torch.arange(n, dtype=boxes.dtype, device=boxes.device).repeat_interleave(r)[:, None]
        return torch.cat([idx, boxes.reshape(-1, 4)], 1), lambda out: out.reshape(n, r, *out.shape[1:])
    if boxes.dim() != 2 or boxes.shape[1] != 5:
        raise ValueError(f"boxes must be [K, 5] rois, a list of [L, 4] or padded [N, R, 4]; got {tuple(boxes.shape)}")
    return boxes, lambda out: out


def _axis(start, bin_size, grid, n_out, size, g_max):
    """Sample coordinates along one axis: per RoI and bin, ``g_max`` points (past ``grid``: unused).

    Returns low/high indices, their weights, and where the sample counts (inside the RoI's grid
    and within [-1, size], the kernel's "empty" rule).
    """
    p = torch.arange(n_out, device=start.device, dtype=start.dtype)[None, :, None]
    i = torch.arange(g_max, device=start.device)
    grid_f = grid.to(start.dtype)[:, None, None]
    pos = (start[:, None, None] + p * bin_size[:, None, None]) + ((i.to(start.dtype) + 0.5) * bin_size[:, None, None]) / grid_f
    size_f = size.to(start.dtype)[:, None, None]
    used = (i < grid[:, None, None]) & (pos >= -1.0) & (pos <= size_f)
    pos = torch.where(used, pos, 0.0).clamp(min=0)
    low = pos.floor().to(torch.int64)
    top = (size - 1)[:, None, None]
    at_edge = low >= top
    low = torch.where(at_edge, top, low)
    high = torch.where(at_edge, top, low + 1)
    pos = torch.where(at_edge, low.to(pos.dtype), pos)
    frac = pos - low.to(pos.dtype)
    return low, high, 1.0 - frac, frac, used


def _pool(flat, rois, level, output_size, sampling_ratio, aligned, max_grid):
    ph, pw = output_size
    rois = rois.detach()
    scale = level.scale.to(rois.dtype)
    offset = 0.5 if aligned else 0.0
    x1, y1 = rois[:, 1] * scale - offset, rois[:, 2] * scale - offset
    x2, y2 = rois[:, 3] * scale - offset, rois[:, 4] * scale - offset
    roi_w, roi_h = x2 - x1, y2 - y1
    if not aligned:
        roi_w, roi_h = roi_w.clamp(min=1.0), roi_h.clamp(min=1.0)
    bin_h, bin_w = roi_h / ph, roi_w / pw
    if sampling_ratio > 0:
        grid_h = torch.full_like(level.height, sampling_ratio)
        grid_w = grid_h
        gh_max = gw_max = sampling_ratio
    else:
        grid_h = torch.ceil(roi_h / ph).to(torch.int64)
        grid_w = torch.ceil(roi_w / pw).to(torch.int64)
        if max_grid is None:
            gh_max = max(int(grid_h.max()) if grid_h.numel() else 1, 1)
            gw_max = max(int(grid_w.max()) if grid_w.numel() else 1, 1)
        else:
            gh_max = gw_max = int(max_grid)
            grid_h, grid_w = grid_h.clamp(max=gh_max), grid_w.clamp(max=gw_max)
    count = (grid_h * grid_w).clamp(min=1).to(flat.dtype)
    ylo, yhi, wy_lo, wy_hi, y_used = _axis(y1, bin_h, grid_h, ph, level.height, gh_max)  # [K, PH, GH]
    xlo, xhi, wx_lo, wx_hi, x_used = _axis(x1, bin_w, grid_w, pw, level.width, gw_max)  # [K, PW, GW]
    k = rois.shape[0]
    base = (level.offset + rois[:, 0].to(torch.int64) * level.height * level.width)[:, None, None, None, None]
    width = level.width[:, None, None, None, None]

    def yx(t_y, t_x):  # [K, PH, GH] x [K, PW, GW] -> [K, PH, GH, PW, GW]
        return t_y[:, :, :, None, None], t_x[:, None, None, :, :]

    used = torch.mul(*yx(y_used, x_used)).to(flat.dtype)
    total = 0
    for yi, wy in ((ylo, wy_lo), (yhi, wy_hi)):
        for xi, wx in ((xlo, wx_lo), (xhi, wx_hi)):
            yy, xx = yx(yi, xi)
            idx = base + yy * width + xx
            wgt = torch.mul(*yx(wy, wx)) * used
            vals = flat.index_select(0, idx.reshape(-1)).view(*idx.shape, flat.shape[1])
            total = total + wgt[..., None] * vals
    out = total.sum(dim=(2, 4)) / count[:, None, None, None]  # [K, PH, PW, C]
    return out.permute(0, 3, 1, 2).reshape(k, flat.shape[1], ph, pw).to(flat.dtype)
