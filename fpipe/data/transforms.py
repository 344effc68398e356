"""Image transforms as pure tensor functions.

Images are C×H×W tensors: uint8 in 0..255, or float in [0, 1] until ``normalize``. Geometric
ops keep the dtype (uint8 is resized by PyTorch's uint8 kernel, within one level of the float
result). Random ops draw only from the ``torch.Generator`` passed in, so the loader can make
augmentation a function of ``(seed, epoch, sample)`` and a resumed run repeats it exactly.

Config strings of these ops (``"random_resized_crop|flip|normalize"``) are
:mod:`fpipe.data.pipeline`'s concern.
"""
import math

import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
REDUCTIONS = (8, 4, 2)  # the factors a JPEG decoder can shrink by in the DCT (1/k per side)
INTERPOLATIONS = ("bilinear", "bicubic")  # antialiased when shrinking, as Pillow's filters


def size_hw(size) -> tuple:
    """``(h, w)`` from an int (square) or a pair."""
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


def to_float(image: torch.Tensor) -> torch.Tensor:
    """float32 in [0, 1]: uint8 is divided by 255, floats are only cast. On CUDA the divisor is a
    device tensor: CUDA turns division by a Python number into a multiplication by its reciprocal,
    which rounds some pixels 1 ulp away from the CPU's quotient."""
    if image.dtype == torch.uint8:
        divisor = 255.0 if image.device.type == "cpu" else torch.full((), 255.0, device=image.device)
        return image.to(torch.float32).div_(divisor)
    return image.to(torch.float32)


def check_interpolation(mode: str) -> str:
    if mode not in INTERPOLATIONS:
        raise ValueError(f"unknown interpolation {mode!r}; valid: {', '.join(INTERPOLATIONS)}")
    return mode


def _interpolate(image: torch.Tensor, hw: tuple, mode: str = "bilinear") -> torch.Tensor:
    """Resize to exactly ``hw`` (antialiased when shrinking, as Pillow's filters), keeping the dtype."""
    if tuple(image.shape[-2:]) == tuple(hw):
        return image
    if image.dtype == torch.uint8:  # PyTorch's vectorised uint8 kernel: ~3× Pillow's resize
        return F.interpolate(image[None], size=hw, mode=mode, align_corners=False, antialias=True)[0]
    x = image[None].to(torch.float32)
    out = F.interpolate(x, size=hw, mode=mode, align_corners=False, antialias=True)[0]
    return out.to(image.dtype)


def resize_shape(height: int, width: int, size) -> tuple:
    """The (h, w) :func:`resize` gives an ``height``×``width`` image: for an int ``size``, the
    longer side is ``int(size * long / short)``, truncated as torchvision's ``Resize`` does."""
    if isinstance(size, int):
        short, long = min(height, width), max(height, width)
        scaled = max(1, int(size * long / short))
        return (size, scaled) if height <= width else (scaled, size)
    return size_hw(size)


def resize(image: torch.Tensor, size, interpolation: str = "bilinear") -> torch.Tensor:
    """An int ``size`` sets the shorter side (the longer keeps the aspect, truncated); (h, w) both."""
    return _interpolate(image, resize_shape(*image.shape[-2:], size), check_interpolation(interpolation))


def crop(image: torch.Tensor, top: int, left: int, height: int, width: int) -> torch.Tensor:
    return image[..., top:top + height, left:left + width]


def center_crop_box(height: int, width: int, size) -> tuple:
    """``(top, left, h, w)`` of the central ``size`` window, placed as torchvision's
    ``CenterCrop``: ``round(margin / 2)``, so an odd margin puts its extra pixel where Python's
    round-half-to-even says (top/left when ``margin // 2`` is odd)."""
    th, tw = size_hw(size)
    if th > height or tw > width:
        raise ValueError(f"center_crop({th}, {tw}) is larger than the {height}×{width} image; "
                         "resize first (e.g. 'resize|center_crop')")
    return int(round((height - th) / 2.0)), int(round((width - tw) / 2.0)), th, tw


def center_crop(image: torch.Tensor, size) -> torch.Tensor:
    """The central ``size`` window (:func:`center_crop_box`)."""
    return crop(image, *center_crop_box(*image.shape[-2:], size))


def hflip(image: torch.Tensor) -> torch.Tensor:
    """Mirror left-right."""
    return image.flip(-1)


def draw_flip(generator: torch.Generator, p: float = 0.5) -> bool:
    """True with probability ``p``."""
    return torch.rand((), generator=generator).item() < p


def random_flip(image: torch.Tensor, generator: torch.Generator, p: float = 0.5):
    """:func:`hflip` with probability ``p``."""
    return hflip(image) if draw_flip(generator, p) else image


def check_size(size):
    """A crop or resize size: a whole number >= 1, or a pair (height, width) of them."""
    sizes = tuple(size) if isinstance(size, (tuple, list)) else (size,)
    if len(sizes) not in (1, 2) or not all(type(v) is int and v >= 1 for v in sizes):
        raise ValueError(f"size={size!r}: want a whole number >= 1, or a pair (height, width) of them")
    return size


def check_scale_ratio(scale, ratio):
    """random_resized_crop's ranges: an area fraction and an aspect (w/h) range, each low <= high."""
    if not (len(scale) == 2 and len(ratio) == 2 and 0 < scale[0] <= scale[1] and 0 < ratio[0] <= ratio[1]):
        raise ValueError(f"want 0 < scale[0] <= scale[1], 0 < ratio[0] <= ratio[1]; "
                         f"got scale={tuple(scale)}, ratio={tuple(ratio)}")


def random_resized_crop_box(height: int, width: int, generator: torch.Generator,
                            scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> tuple:
    """``(top, left, h, w)`` of a crop with area fraction in ``scale`` and aspect w/h in ``ratio``.

    The ImageNet ("Inception") recipe: the area is uniform, the aspect log-uniform; after ten
    draws that do not fit, fall back to the largest central crop whose aspect is in range.
    """
    check_scale_ratio(scale, ratio)
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
                        scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), interpolation: str = "bilinear") -> torch.Tensor:
    """A random :func:`random_resized_crop_box`, resized to ``size`` (int: square)."""
    box = random_resized_crop_box(*image.shape[-2:], generator, scale, ratio)
    return _interpolate(crop(image, *box), size_hw(size), check_interpolation(interpolation))


def normalize(image: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """``(to_float(image) - mean) / std`` per channel; ImageNet statistics by default."""
    mean, std = _channel_stats(mean, std, image.device)
    return (to_float(image) - mean) / std


def normalize_(x: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """:func:`normalize` in place on float32 ``x`` (C×H×W or a N×C×H×W batch); same values."""
    mean, std = _channel_stats(mean, std, x.device)
    return x.sub_(mean).div_(std)


def _channel_stats(mean, std, device) -> tuple:
    as_column = lambda v: torch.as_tensor(v, dtype=torch.float32, device=device).reshape(-1, 1, 1)
    return as_column(mean), as_column(std)


class Geometry:
    """Crops, resizes and flips planned from an image's size alone, applied later to pixels.

    Planning first lets a file be decoded at reduced size when the plan shrinks it anyway:
    :meth:`reduction` is the largest k in ``REDUCTIONS`` by which the first resize shrinks its
    input on both sides, so the pixels decoded at 1/k are still at least the resize's output
    (it never enlarges them); :meth:`apply` then scales the crops before that resize to the
    decoded size.
    """

    def __init__(self, height: int, width: int):
        self.source = (int(height), int(width))
        self.height, self.width = self.source
        self.steps = []

    def crop(self, top: int, left: int, height: int, width: int):
        self.steps.append(("crop", top, left, height, width))
        self.height, self.width = height, width

    def resize(self, height: int, width: int, interpolation: str = "bilinear"):
        self.steps.append(("resize", height, width, interpolation))
        self.height, self.width = height, width

    def flip(self):
        self.steps.append(("flip",))

    def reduction(self) -> int:
        h, w = self.source
        for kind, *args in self.steps:
            if kind == "crop":
                h, w = args[2:]
            elif kind == "resize":
                shrink = min(h / args[0], w / args[1])
                return next((k for k in REDUCTIONS if shrink >= k), 1)
        return 1

    def rows_read(self, height: int) -> int:
        """How many top rows of an image ``height`` rows high (the planned height, or the reduced one a
        JPEG was decoded at) the steps read. When they start with a resize and then a crop (eval's
        ``resize|center_crop``), the crop's last row reads the resize's input only down to its
        filter's reach, so a decoder may stop there; otherwise every row."""
        if len(self.steps) < 2 or self.steps[0][0] != "resize" or self.steps[1][0] != "crop":
            return height
        _, resized_height, _, interpolation = self.steps[0]
        _, top, _, crop_height, _ = self.steps[1]
        scale = height / resized_height
        reach = {"bilinear": 1.0, "bicubic": 2.0}[interpolation] * max(scale, 1.0)  # PyTorch's antialiased filter
        last_centre = (top + crop_height - 0.5) * scale
        return min(height, int(last_centre + reach + 0.5) + 2)  # + 2: a margin for rounding

    def leading_crop(self, shape: tuple, scale=(1.0, 1.0)):
        """``(box, n)``: the crops the steps start with, as one ``(top, left, h, w)`` box in an
        image of ``shape`` (the planned size × ``scale``), and how many steps it replaces;
        ``(None, 0)`` when the steps do not start with a crop. A file reader crops with it
        before converting pixels, so only the crop is ever copied."""
        top = left = n = 0
        h, w = self.source
        for kind, *args in self.steps:
            if kind != "crop":
                break
            top, left, h, w = top + args[0], left + args[1], args[2], args[3]
            n += 1
        if n == 0:
            return None, 0
        if tuple(scale) != (1.0, 1.0):
            top, h = _scaled_span(top, h, scale[0], shape[0])
            left, w = _scaled_span(left, w, scale[1], shape[1])
        return (top, left, h, w), n

    def apply(self, image: torch.Tensor, scale=(1.0, 1.0), cropped: bool = False):
        """The steps on ``image``; ``scale`` = its size / the planned size; ``cropped``: the
        leading crop was already taken (``leading_crop``)."""
        box, n = self.leading_crop(tuple(image.shape[-2:]), scale)
        if box is not None and not cropped:
            image = crop(image, *box)
        for kind, *args in self.steps[n:]:
            if kind == "crop":
                image = crop(image, *args)
            elif kind == "resize":
                image = _interpolate(image, tuple(args[:2]), args[2])
            else:
                image = hflip(image)
        return image


def _scaled_span(start: int, length: int, scale: float, limit: int) -> tuple:
    first = min(round(start * scale), limit - 1)
    return first, max(1, min(round((start + length) * scale), limit) - first)




def parse(spec, size=None):
    """For callers of ``transforms.parse``: op strings are :func:`fpipe.data.pipeline.parse`'s."""
    from fpipe.data import pipeline  # Lazily: pipeline builds on this module.
    return pipeline.parse(spec, size)
