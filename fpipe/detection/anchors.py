"""Anchors per feature level in torchvision AnchorGenerator's exact values and order.

Per level: base ("cell") anchors centred on 0 and rounded, ratio-major then size; then every
grid cell row by row, each cell's anchors together (cell-major), shifted by cell * stride,
where stride = image size // grid size (integer division, per axis).
"""
import torch

FPN_SIZES = ((32,), (64,), (128,), (256,), (512,))
FPN_ASPECT_RATIOS = ((0.5, 1.0, 2.0),) * 5


def cell_anchors(sizes, aspect_ratios, dtype=torch.float32, device=None):
    """``[len(ratios) * len(sizes), 4]`` anchors around (0, 0); ratio = height / width."""
    scales = torch.as_tensor(sizes, dtype=dtype, device=device)
    ratios = torch.as_tensor(aspect_ratios, dtype=dtype, device=device)
    h_ratios = torch.sqrt(ratios)
    w_ratios = 1 / h_ratios
    ws = (w_ratios[:, None] * scales[None, :]).view(-1)
    hs = (h_ratios[:, None] * scales[None, :]).view(-1)
    return (torch.stack([-ws, -hs, ws, hs], dim=1) / 2).round()


def num_anchors_per_location(sizes=FPN_SIZES, aspect_ratios=FPN_ASPECT_RATIOS):
    return [len(s) * len(a) for s, a in zip(sizes, aspect_ratios)]


def grid_anchors(base, grid_size, stride):
    """``[H * W * A, 4]`` anchors of one level: cell (y, x) row-major, its A anchors together."""
    (gh, gw), (sh, sw) = grid_size, stride
    shifts_x = torch.arange(0, gw, dtype=torch.int32, device=base.device) * sw
    shifts_y = torch.arange(0, gh, dtype=torch.int32, device=base.device) * sh
    shift_y, shift_x = torch.meshgrid(shifts_y, shifts_x, indexing="ij")
    shift_x, shift_y = shift_x.reshape(-1), shift_y.reshape(-1)
    shifts = torch.stack((shift_x, shift_y, shift_x, shift_y), dim=1)
    return (shifts.view(-1, 1, 4) + base.view(1, -1, 4)).reshape(-1, 4)


def anchors_for_levels(image_size, grid_sizes, sizes=FPN_SIZES, aspect_ratios=FPN_ASPECT_RATIOS,
                       dtype=torch.float32, device=None):
    """Anchors of all levels concatenated, ``[sum(H_l * W_l * A_l), 4]``, for a padded batch.

    ``image_size`` is the padded batch's (height, width) and ``grid_sizes`` the features'
    (height, width) per level; every image of the batch gets these same anchors.
    """
    if not len(grid_sizes) == len(sizes) == len(aspect_ratios):
        raise ValueError(f"{len(grid_sizes)} feature levels but {len(sizes)} anchor sizes and "
                         f"{len(aspect_ratios)} aspect-ratio sets; one of each per level")
    out = []
    for (gh, gw), s, a in zip(grid_sizes, sizes, aspect_ratios):
        stride = (int(image_size[0]) // int(gh), int(image_size[1]) // int(gw))
        out.append(grid_anchors(cell_anchors(s, a, dtype, device), (int(gh), int(gw)), stride))
    return torch.cat(out)
