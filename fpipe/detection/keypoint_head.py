"""torchvision's KeypointRCNNHeads + KeypointRCNNPredictor as pure init/apply and the keypoint loss.

Names as torchvision 0.29 under ``roi_heads``: ``keypoint_head.<2i>.*`` (eight 3×3 convs of 512
+ ReLU on 14×14 RoI features; the odd indices are the ReLUs) and
``keypoint_predictor.kps_score_lowres.*`` (4×4 stride-2 transposed conv), whose output is
upsampled ×2 bilinear to 56×56 heatmaps, one per keypoint.
"""
import torch
import torch.nn.functional as F

from fpipe.models.layers import conv  # the layer code the trunks run (oneDNN off THNN)


def init(seed, in_channels=256, layers=(512,) * 8, num_keypoints=17):
    """``(params, {})``: kaiming_normal(fan_out, relu) weights, zero biases, as torchvision."""
    gen = torch.Generator().manual_seed(seed)
    head, cin = {}, in_channels
    for i, c in enumerate(layers):
        head[str(2 * i)] = {"weight": torch.randn(c, cin, 3, 3, generator=gen) * (2.0 / (c * 9)) ** 0.5,
                            "bias": torch.zeros(c)}
        cin = c
    w = torch.randn(cin, num_keypoints, 4, 4, generator=gen) * (2.0 / (num_keypoints * 16)) ** 0.5
    return {"keypoint_head": head,
            "keypoint_predictor": {"kps_score_lowres": {"weight": w, "bias": torch.zeros(num_keypoints)}}}, {}


def apply(params, state, pooled, *, train=False):
    """``pooled [..., C, 14, 14]`` -> ``(heatmap logits [..., K, 56, 56], state)``."""
    del train
    lead = pooled.shape[:-3]
    x = pooled.reshape(-1, *pooled.shape[-3:])
    for key in sorted(params["keypoint_head"], key=int):
        p = params["keypoint_head"][key]
        x = torch.relu(conv(p, x, padding=1))
    p = params["keypoint_predictor"]["kps_score_lowres"]
    x = F.conv_transpose2d(x, p["weight"], p["bias"], stride=2, padding=1)
    x = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False, recompute_scale_factor=False)
    return x.reshape(*lead, *x.shape[-3:]), state


def keypoints_to_heatmap(keypoints, rois, heatmap_size=56):
    """torchvision's keypoints_to_heatmap over any leading dims: ``keypoints [..., K, 3]`` (x, y,
    visibility) in the RoIs ``[..., 4]`` -> ``(flat heatmap index [..., K] int64, valid [..., K])``."""
    offset_x, offset_y = rois[..., 0:1], rois[..., 1:2]
    scale_x = heatmap_size / (rois[..., 2:3] - rois[..., 0:1])
    scale_y = heatmap_size / (rois[..., 3:4] - rois[..., 1:2])
    x, y = keypoints[..., 0], keypoints[..., 1]
    x_boundary, y_boundary = x == rois[..., 2:3], y == rois[..., 3:4]
    xi = ((x - offset_x) * scale_x).floor().long()
    yi = ((y - offset_y) * scale_y).floor().long()
    xi = torch.where(x_boundary, heatmap_size - 1, xi)
    yi = torch.where(y_boundary, heatmap_size - 1, yi)
    valid_loc = (xi >= 0) & (yi >= 0) & (xi < heatmap_size) & (yi < heatmap_size)
    valid = valid_loc & (keypoints[..., 2] > 0)
    return torch.where(valid, yi * heatmap_size + xi, 0), valid


def keypoint_loss(heatmap_logits, targets, valid):
    """Cross-entropy over the 56×56 positions per valid keypoint, averaged over them (torchvision's
    keypointrcnn_loss; 0 when none is valid). ``heatmap_logits [..., K, H, W]``."""
    logits = heatmap_logits.flatten(-2)
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    mask = valid.reshape(-1)
    return torch.where(mask, ce, 0.0).sum() / mask.sum().clamp(min=1).to(ce.dtype)


def heatmaps_to_keypoints(maps, rois):
    """torchvision's heatmaps_to_keypoints (inference; a loop over RoIs): ``maps [R, K, H, W]``
    logits in ``rois [R, 4]`` -> ``(keypoints [R, K, 3] (x, y, 1), scores [R, K])``. Each map is
    resized bicubic to the RoI's ceil'd size; the argmax cell's centre (d + 0.5), scaled back by
    size / ceil(size), is the keypoint and the resized map's value there its score."""
    offset_x, offset_y = rois[:, 0], rois[:, 1]
    widths = (rois[:, 2] - rois[:, 0]).clamp(min=1)
    heights = (rois[:, 3] - rois[:, 1]).clamp(min=1)
    widths_ceil, heights_ceil = widths.ceil(), heights.ceil()
    k = maps.shape[1]
    xy = torch.zeros((len(rois), 3, k), dtype=torch.float32, device=maps.device)
    scores = torch.zeros((len(rois), k), dtype=torch.float32, device=maps.device)
    for i in range(len(rois)):
        w_i, h_i = int(widths_ceil[i].item()), int(heights_ceil[i].item())
        roi_map = F.interpolate(maps[i][:, None], size=(h_i, w_i), mode="bicubic", align_corners=False)[:, 0]
        w = roi_map.shape[2]
        pos = roi_map.reshape(k, -1).argmax(dim=1)
        x_int = pos % w
        y_int = torch.div(pos - x_int, w, rounding_mode="floor")
        xy[i, 0] = (x_int.float() + 0.5) * (widths[i] / w_i) + offset_x[i]
        xy[i, 1] = (y_int.float() + 0.5) * (heights[i] / h_i) + offset_y[i]
        xy[i, 2] = 1
        scores[i] = roi_map[torch.arange(k, device=roi_map.device), y_int, x_int]
    return xy.permute(0, 2, 1), scores
