"""torchvision's MaskRCNNHeads + MaskRCNNPredictor as pure init/apply, the mask loss, and pasting.

Names as torchvision 0.29 under ``roi_heads``: ``mask_head.<i>.0.*`` (four 3×3 convs + ReLU on
14×14 RoI features), ``mask_predictor.conv5_mask.*`` (2×2 stride-2 transposed conv + ReLU, to
28×28) and ``mask_predictor.mask_fcn_logits.*`` (1×1, one map per class).
"""
import torch
import torch.nn.functional as F

from fpipe.models.layers import conv  # the layer code the trunks run (oneDNN off THNN)
from fpipe.detection.roi_align import roi_align


def init(seed, in_channels=256, layers=(256, 256, 256, 256), dim_reduced=256, num_classes=91):
    """``(params, {})``: convs kaiming_normal(fan_out, relu) with zero bias, as torchvision."""
    gen = torch.Generator().manual_seed(seed)

    def kaiming(cout, cin, k, transposed=False):
        shape = (cin, cout, k, k) if transposed else (cout, cin, k, k)
        fan_out = (shape[0] if not transposed else shape[1]) * k * k
        return torch.randn(shape, generator=gen) * (2.0 / fan_out) ** 0.5

    head, cin = {}, in_channels
    for i, c in enumerate(layers):
        head[str(i)] = {"0": {"weight": kaiming(c, cin, 3), "bias": torch.zeros(c)}}
        cin = c
    predictor = {"conv5_mask": {"weight": kaiming(dim_reduced, cin, 2, transposed=True),
                                "bias": torch.zeros(dim_reduced)},
                 "mask_fcn_logits": {"weight": kaiming(num_classes, dim_reduced, 1), "bias": torch.zeros(num_classes)}}
    return {"mask_head": head, "mask_predictor": predictor}, {}


def apply(params, state, pooled, *, train=False):
    """``pooled [..., C, 14, 14]`` -> ``(mask_logits [..., classes, 28, 28], state)``."""
    del train
    lead = pooled.shape[:-3]
    x = pooled.reshape(-1, *pooled.shape[-3:])
    for i in range(len(params["mask_head"])):
        p = params["mask_head"][str(i)]["0"]
        x = torch.relu(conv(p, x, padding=1))
    pred = params["mask_predictor"]
    x = torch.relu(F.conv_transpose2d(x, pred["conv5_mask"]["weight"], pred["conv5_mask"]["bias"], stride=2))
    x = conv(pred["mask_fcn_logits"], x)
    return x.reshape(*lead, *x.shape[-3:]), state


def mask_targets(gt_masks, matched_gt, rois, size=28, max_grid=None):
    """torchvision's project_masks_on_boxes over padded tensors: for each RoI ``rois [N, S, 4]``,
    its matched gt mask (``gt_masks [N, M, H, W]``, ``matched_gt [N, S]``) RoI-aligned
    (aligned=False, adaptive sampling) to ``size``×``size`` -> ``[N, S, size, size]`` in [0, 1].
    The adaptive grid reads its largest size from the data (a host sync) unless ``max_grid`` bounds
    it (static shapes; RoIs wider than ``max_grid * size`` px are then sampled less than torchvision)."""
    n, s = matched_gt.shape
    m = gt_masks.shape[1]
    flat = gt_masks.reshape(n * m, 1, *gt_masks.shape[-2:]).to(rois.dtype)
    batch_idx = (torch.arange(n, device=rois.device)[:, None] * m + matched_gt).reshape(-1, 1).to(rois.dtype)
    out = roi_align(flat, torch.cat([batch_idx, rois.reshape(-1, 4)], 1), size, 1.0, -1, False, max_grid)
    return out.reshape(n, s, size, size)


def mask_loss(mask_logits, labels, targets, positive):
    """Binary cross-entropy of each positive RoI's own-class map against its target, averaged over
    the positive RoIs' pixels (torchvision's maskrcnn_loss; 0 without positives)."""
    idx = labels.clamp(min=0)[..., None, None, None].expand(*labels.shape, 1, *mask_logits.shape[-2:])
    own = mask_logits.gather(-3, idx).squeeze(-3)
    bce = F.binary_cross_entropy_with_logits(own, targets, reduction="none").mean((-2, -1))
    return torch.where(positive, bce, 0.0).sum() / positive.sum().clamp(min=1).to(bce.dtype)


def expand_boxes(boxes, scale):
    w_half = (boxes[:, 2] - boxes[:, 0]) * 0.5 * scale
    h_half = (boxes[:, 3] - boxes[:, 1]) * 0.5 * scale
    x_c = (boxes[:, 2] + boxes[:, 0]) * 0.5
    y_c = (boxes[:, 3] + boxes[:, 1]) * 0.5
    return torch.stack([x_c - w_half, y_c - h_half, x_c + w_half, y_c + h_half], 1)


def paste_masks(masks, boxes, image_size, padding=1):
    """torchvision's paste_masks_in_image: ``masks [D, 1, M, M]`` probabilities into the image
    ``(h, w)`` at ``boxes [D, 4]`` -> ``[D, 1, h, w]`` (a loop over detections: inference only)."""
    im_h, im_w = int(image_size[0]), int(image_size[1])
    if masks.shape[0] == 0:
        return masks.new_zeros((0, 1, im_h, im_w))
    size = masks.shape[-1]
    scale = float(size + 2 * padding) / size
    masks = F.pad(masks, (padding,) * 4)
    boxes = expand_boxes(boxes, scale).to(torch.int64)
    out = []
    for mask, box in zip(masks, boxes):
        x0b, y0b, x1b, y1b = (int(v) for v in box)
        w, h = max(x1b - x0b + 1, 1), max(y1b - y0b + 1, 1)
        m = F.interpolate(mask[None], size=(h, w), mode="bilinear", align_corners=False)[0, 0]
        im = masks.new_zeros((im_h, im_w))
        x0, x1, y0, y1 = max(x0b, 0), min(x1b + 1, im_w), max(y0b, 0), min(y1b + 1, im_h)
        if x1 > x0 and y1 > y0:
            im[y0:y1, x0:x1] = m[y0 - y0b:y1 - y0b, x0 - x0b:x1 - x0b]
        out.append(im)
    return torch.stack(out)[:, None]
