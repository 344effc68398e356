"""Tensors stored in another layout than the model's: position grids resampled, layer scales reshaped.

ConvNeXt's layer scale is ``[C]`` in timm and the original code, ``[C, 1, 1]`` in torchvision:
the same numbers, reshaped on load.

A ViT's ``pos_embedding`` is ``[1, prefix + h*w, D]``: ``prefix`` tokens (the class token's
position, or none) then an h×w grid of patch positions. A file trained at another resolution
(DINOv2's 37×37 grid for 518 px) fits a model of another grid after bicubic resampling of the
grid part (antialiased, as timm's ``resample_abs_pos_embed``); prefix positions are kept.

BEiT's relative position bias tables ``[(2g-1)² + 3, heads]`` of another grid (a 224 px file
for a 384 px model) are resampled as the model resamples them for another input size (bilinear,
as transformers' BEiT); microsoft/unilm's fine-tuning script interpolates such tables another way
(cubic on geometrically spaced offsets), which numbers alone cannot undo, so the report says so.
"""
import math

import torch

from fpipe.models import vit  # one resampler: the model's own (timm's antialiased bicubic here)

MAX_PREFIX = 8


def split_tokens(n: int) -> tuple:
    """``(prefix, side)`` for ``n`` position tokens: the largest square grid, the rest in front."""
    side = math.isqrt(n)
    prefix = n - side * side
    if side == 0 or prefix > MAX_PREFIX:
        raise ValueError(f"{n} position tokens are not a square grid plus up to {MAX_PREFIX} prefix tokens")
    return prefix, side


def resample_pos_embedding(pos: torch.Tensor, tokens: int) -> torch.Tensor:
    """``pos`` ``[1, p + s*s, D]`` -> ``[1, p + t*t, D]`` with ``tokens = p + t*t`` (same ``p``)."""
    prefix, side = split_tokens(pos.shape[1])
    new_prefix, new_side = split_tokens(tokens)
    if new_prefix != prefix:
        raise ValueError(f"position embedding with {prefix} prefix token(s) cannot become one with {new_prefix}")
    if new_side == side:
        return pos
    return vit.resample_pos_embedding(pos, (new_side, new_side), prefix, mode="bicubic_antialias")


def fits(name: str, file_shape: tuple, model_shape: tuple) -> bool:
    """Whether a file tensor fits a model tensor, counting resamplable position embeddings and
    leading or trailing 1-dims (CLIP's class_embedding [D] for a class token [1, 1, D]; a 1×1
    conv's [out, in, 1, 1] for a Linear's [out, in], as timm's small ConvNeXt V2 MLPs)."""
    if tuple(file_shape) == tuple(model_shape) or _squeezed(file_shape) == _squeezed(model_shape):
        return True
    if name.endswith("layer_scale"):
        return math.prod(file_shape) == math.prod(model_shape)
    if name.endswith("relative_position_bias_table"):
        return (len(file_shape) == len(model_shape) == 2 and file_shape[1] == model_shape[1]
                and None not in (vit.bias_table_grid(file_shape[0]), vit.bias_table_grid(model_shape[0])))
    file_shape = (1,) * (len(model_shape) - len(file_shape)) + tuple(file_shape)  # [N, D] positions
    if not name.endswith("pos_embedding") or len(file_shape) != 3 or len(model_shape) != 3:
        return False
    if file_shape[0] != model_shape[0] or file_shape[2] != model_shape[2]:
        return False
    try:
        (pf, _), (pm, _) = split_tokens(file_shape[1]), split_tokens(model_shape[1])
    except ValueError:
        return False
    return pf == pm or (pf, pm) in ((0, 1), (1, 0))


def adapt(tensors: dict, shapes: dict) -> tuple:
    """``(tensors, notes)``: tensors in the model's shapes: layer scales and leading or trailing
    1-dims reshaped, then each ``pos_embedding`` of another grid resampled to the model's.

    ``tensors``: ``{model name: tensor}``; ``shapes``: ``{model name: shape}``. A file without
    the class token's position (timm's DINOv2 with registers folds it into ``cls_token``) gets
    a zero one, which is the same model; a file with it (DINOv2's own and Hugging Face's files
    with registers) for a model without it has it folded into the class token, the same sum.
    """
    out, notes = dict(tensors), []
    grids = []
    for name, t in tensors.items():
        want = shapes.get(name)
        if want is None or tuple(t.shape) == tuple(want) or not fits(name, t.shape, want):
            continue
        if name.endswith("layer_scale") or _squeezed(t.shape) == _squeezed(want):
            out[name] = t.reshape(want)
        elif name.endswith("relative_position_bias_table"):
            old, new = vit.bias_table_grid(t.shape[0]), vit.bias_table_grid(want[0])
            out[name] = vit.resample_bias_table(t, (new, new))
            notes.append(f"{name}: relative position bias table of a {old}x{old} grid resampled to {new}x{new} "
                         "(bilinear, as transformers' BEiT; BEiT's own fine-tuning interpolates otherwise)")
        else:
            grids.append(name)
    for name in grids:  # after the class tokens took their shapes: a position row may fold into one
        t, want = out[name], shapes[name]
        t = t.reshape((1,) * (len(want) - t.dim()) + tuple(t.shape))
        if split_tokens(t.shape[1])[0] == 0 and split_tokens(want[1])[0] == 1:
            t = torch.cat([t.new_zeros(1, 1, t.shape[2]), t], dim=1)
            notes.append(f"{name}: no class-token position in the file (folded into its class token); a zero one added")
        token = name[:-len("encoder.pos_embedding")] + "class_token" if name.endswith("encoder.pos_embedding") else ""
        if split_tokens(t.shape[1])[0] == 1 and split_tokens(want[1])[0] == 0:
            if token not in out or token not in shapes:  # no class token to fold it into: merge names the shapes
                continue
            out[token], t = out[token] + t[:, :1], t[:, 1:]
            notes.append(f"{name}: the file's class-token position folded into {token} (the model adds none)")
        if tuple(t.shape) != tuple(want):
            old, new = split_tokens(t.shape[1])[1], split_tokens(want[1])[1]
            t = resample_pos_embedding(t, want[1])
            notes.append(f"{name}: position grid {old}x{old} resampled to {new}x{new} (bicubic, antialiased, as timm)")
        out[name] = t
    return out, notes


def _squeezed(shape) -> tuple:
    """The shape without its leading and trailing 1-dims: the same numbers in the same order."""
    shape = tuple(shape)
    while shape and shape[0] == 1:
        shape = shape[1:]
    while shape and shape[-1] == 1:
        shape = shape[:-1]
    return shape
