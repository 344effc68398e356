"""Image transforms as pure tensor functions, and their composition from a config string.

Images are C×H×W tensors: uint8 in 0..255, or float in [0, 1] until ``normalize``. Geometric
ops keep the dtype (uint8 results are rounded). Random ops draw only from the
``torch.Generator`` passed in, so the loader can make augmentation a function of
``(seed, epoch, sample)`` and a resumed run repeats it exactly.

A pipeline is a string of registered ops, e.g. ``"random_resized_crop(64)|flip|normalize"``
(or a list of such op strings); :func:`parse` turns it into ``fn(image, generator)``.
"""
import ast
import inspect
import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _hw(size) -> tuple:
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


def to_float(image: torch.Tensor) -> torch.Tensor:
    """float32 in [0, 1]: uint8 is divided by 255, floats are only cast."""
    if image.dtype == torch.uint8:
        return image.to(torch.float32).div_(255.0)
    return image.to(torch.float32)


def _interpolate(image: torch.Tensor, hw: tuple) -> torch.Tensor:
    """Bilinear resize to exactly ``hw`` (antialiased when shrinking), keeping the dtype."""
    if tuple(image.shape[-2:]) == tuple(hw):
        return image
    x = image[None].to(torch.float32)
    out = F.interpolate(x, size=hw, mode="bilinear", align_corners=False, antialias=True)[0]
    if image.dtype == torch.uint8:
        return out.round_().clamp_(0, 255).to(torch.uint8)
    return out.to(image.dtype)


def resize(image: torch.Tensor, size) -> torch.Tensor:
    """An int ``size`` sets the shorter side (the longer keeps the aspect, rounded); (h, w) both."""
    h, w = image.shape[-2:]
    if isinstance(size, int):
        short, long = min(h, w), max(h, w)
        scaled = max(1, round(long * size / short))
        hw = (size, scaled) if h <= w else (scaled, size)
    else:
        hw = _hw(size)
    return _interpolate(image, hw)


def crop(image: torch.Tensor, top: int, left: int, height: int, width: int) -> torch.Tensor:
    return image[..., top:top + height, left:left + width]


def center_crop(image: torch.Tensor, size) -> torch.Tensor:
    """The central ``size`` window; odd margins put the extra pixel at the bottom/right."""
    th, tw = _hw(size)
    h, w = image.shape[-2:]
    if th > h or tw > w:
        raise ValueError(f"center_crop({th}, {tw}) is larger than the {h}×{w} image; "
                         "resize first (e.g. 'resize|center_crop')")
    return crop(image, (h - th) // 2, (w - tw) // 2, th, tw)


def hflip(image: torch.Tensor) -> torch.Tensor:
    """Mirror left-right."""
    return image.flip(-1)


def random_flip(image: torch.Tensor, generator: torch.Generator, p: float = 0.5):
    """:func:`hflip` with probability ``p``."""
    flip = torch.rand((), generator=generator).item() < p
    return hflip(image) if flip else image


def random_resized_crop_box(height: int, width: int, generator: torch.Generator,
                            scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> tuple:
    """``(top, left, h, w)`` of a crop with area fraction in ``scale`` and aspect w/h in ``ratio``.

    The ImageNet ("Inception") recipe: the area is uniform, the aspect log-uniform; after ten
    draws that do not fit, fall back to the largest central crop whose aspect is in range.
    """
    if not (0 < scale[0] <= scale[1] and 0 < ratio[0] <= ratio[1]):
        raise ValueError(f"want 0 < scale[0] <= scale[1], 0 < ratio[0] <= ratio[1]; "
                         f"got scale={scale}, ratio={ratio}")
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        u_area, u_ratio = torch.rand(2, generator=generator, dtype=torch.float64).tolist()
        target = area * (scale[0] + (scale[1] - scale[0]) * u_area)
        aspect = math.exp(log_lo + (log_hi - log_lo) * u_ratio)
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (), generator=generator))
            left = int(torch.randint(0, width - w + 1, (), generator=generator))
            return top, left, h, w
    aspect = width / height
    if aspect < ratio[0]:
        w, h = width, min(height, round(width / ratio[0]))
    elif aspect > ratio[1]:
        h, w = height, min(width, round(height * ratio[1]))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


def random_resized_crop(image: torch.Tensor, size, generator: torch.Generator,
                        scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> torch.Tensor:
    """A random :func:`random_resized_crop_box`, resized to ``size`` (int: square)."""
    box = random_resized_crop_box(*image.shape[-2:], generator, scale, ratio)
    return _interpolate(crop(image, *box), _hw(size))


def normalize(image: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """``(to_float(image) - mean) / std`` per channel; ImageNet statistics by default."""
    x = to_float(image)
    mean = torch.as_tensor(mean, dtype=torch.float32).reshape(-1, 1, 1)
    std = torch.as_tensor(std, dtype=torch.float32).reshape(-1, 1, 1)
    return (x - mean) / std


# ---------------------------------------------------------------------------------------------
# Registered ops: each factory takes the op's arguments from the string and returns
# ``fn(image, generator) -> image``. A ``size`` left out means the pipeline's default size.

Op = Callable[[torch.Tensor, torch.Generator], torch.Tensor]
OPS: dict = {}


def register(name: str):
    def add(factory):
        OPS[name] = factory
        return factory
    return add


@register("random_resized_crop")
def _random_resized_crop(size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> Op:
    return lambda image, g: random_resized_crop(image, size, g, tuple(scale), tuple(ratio))


@register("flip")
def _flip(p=0.5) -> Op:
    return lambda image, g: random_flip(image, g, p)


@register("resize")
def _resize(size) -> Op:
    return lambda image, g: resize(image, size)


@register("center_crop")
def _center_crop(size) -> Op:
    return lambda image, g: center_crop(image, size)


@register("normalize")
def _normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD) -> Op:
    return lambda image, g: normalize(image, mean, std)


@register("to_float")
def _to_float() -> Op:
    return lambda image, g: to_float(image)


def _parse_op(text: str, size) -> Op:
    """One op string, ``name`` or ``name(args, key=value)``, with literal arguments."""
    try:
        node = ast.parse(text.strip(), mode="eval").body
        if isinstance(node, ast.Name):
            name, args, kwargs = node.id, [], {}
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            name = node.func.id
            args = [ast.literal_eval(a) for a in node.args]
            kwargs = {k.arg: ast.literal_eval(k.value) for k in node.keywords}
        else:
            raise ValueError("not a name or a call")
    except (SyntaxError, ValueError) as e:
        raise ValueError(f"cannot parse transform op {text!r} ({e}); write name or "
                         "name(literal args), e.g. 'random_resized_crop(64, scale=(0.35, 1))'")
    if name not in OPS:
        raise ValueError(f"unknown transform op {name!r} in {text!r}; valid ops: "
                         f"{', '.join(sorted(OPS))}")
    factory = OPS[name]
    signature = inspect.signature(factory)
    try:
        bound = signature.bind_partial(*args, **kwargs)
        if "size" in signature.parameters and "size" not in bound.arguments:
            if size is None:
                raise TypeError("it needs a size and the pipeline has no default size")
            bound.arguments["size"] = size
        signature.bind(*bound.args, **bound.kwargs)
    except TypeError as e:
        raise ValueError(f"bad arguments for transform op {text!r}: {e}; "
                         f"signature: {name}{str(signature).split(' ->')[0]}") from None
    return factory(*bound.args, **bound.kwargs)


def parse(spec, size=None) -> Op:
    """``"op|op(args)|..."`` or a list of op strings -> ``fn(image, generator)``.

    An empty spec is the identity. ``size`` fills in crop/resize ops written without one, so
    ``"random_resized_crop|normalize"`` follows ``data.image_size``.
    """
    if spec is None:
        texts = []
    elif isinstance(spec, str):
        texts = [t for t in spec.split("|") if t.strip()]
    elif isinstance(spec, Sequence):
        texts = list(spec)
    else:
        raise TypeError(f"transforms: want a '|'-joined string or a list, got {spec!r}")
    ops = [_parse_op(t, size) for t in texts]

    def pipeline(image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        for op in ops:
            image = op(image, generator)
        return image
    pipeline.spec = "|".join(t.strip() for t in texts)
    return pipeline
