"""RandAugment as timm's ``rand_augment_transform("rand-m9-mstd0.5-inc1")`` computes it (DeiT's,
MAE's and BEiT's fine-tuning), with Pillow's own operations on each image.

Per image: ``num_layers`` ops drawn with replacement from the 15 below; each acts with
probability ``prob``, at a magnitude drawn from N(``magnitude``, ``magnitude_std``²) clipped to
[0, 10], its signed ops negated half the time. ``increasing`` picks the variants whose severity
grows with the magnitude (timm's ``inc1``). Geometric ops fill with ``fill`` (timm: the dataset's
mean, 0-255) and resample with ``interpolation``. The draws are ``rng``'s: a torch generator's in
the pipeline (``TorchDraws``); the test replays timm's numpy and python draws through the same
functions and compares the pixels.
"""
import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageOps

LEVEL_DENOM = 10.0
OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd", "Color",
       "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
INCREASING = {"Posterize": "PosterizeIncreasing", "Solarize": "SolarizeIncreasing", "Color": "ColorIncreasing",
              "Contrast": "ContrastIncreasing", "Brightness": "BrightnessIncreasing",
              "Sharpness": "SharpnessIncreasing"}
RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}


class TorchDraws:
    """The draws RandAugment makes, from a torch generator (the pipeline's per-sample one)."""

    def __init__(self, generator):
        self.generator = generator

    def choice(self, n: int, k: int) -> list:
        return torch.randint(0, n, (k,), generator=self.generator).tolist()

    def random(self) -> float:
        return float(torch.rand((), generator=self.generator))

    def gauss(self, mu: float, sigma: float) -> float:
        return mu + sigma * float(torch.randn((), generator=self.generator))


def op_names(increasing: bool) -> tuple:
    return tuple(INCREASING.get(name, name) if increasing else name for name in OPS)


def augment(image: Image.Image, rng, *, magnitude=9.0, num_layers=2, magnitude_std=0.5, increasing=True,
            prob=0.5, translate_pct=0.45, fill=(124, 116, 104), interpolation="bicubic") -> Image.Image:
    """``image`` (RGB) after ``num_layers`` RandAugment ops drawn from ``rng`` (``TorchDraws``'s methods)."""
    names = op_names(increasing)
    for index in rng.choice(len(names), num_layers):
        name = names[index]
        if prob < 1.0 and rng.random() > prob:
            continue
        level = rng.gauss(magnitude, magnitude_std) if magnitude_std > 0 else magnitude
        level = max(0.0, min(level, LEVEL_DENOM))
        image = _apply(name, image, level, rng, translate_pct, fill, RESAMPLE[interpolation])
    return image


def _apply(name, image, level, rng, translate_pct, fill, resample):
    signed = lambda v: -v if rng.random() > 0.5 else v  # noqa: E731 (timm's _randomly_negate)
    affine = lambda matrix: image.transform(image.size, Image.AFFINE, matrix, resample=resample,  # noqa: E731
                                            fillcolor=fill)
    fraction = level / LEVEL_DENOM
    if name == "AutoContrast":
        return ImageOps.autocontrast(image)
    if name == "Equalize":
        return ImageOps.equalize(image)
    if name == "Invert":
        return ImageOps.invert(image)
    if name == "Rotate":
        return image.rotate(signed(fraction * 30.0), resample=resample, fillcolor=fill)
    if name.startswith("Posterize"):
        bits = int(fraction * 4)
        bits = 4 - bits if name.endswith("Increasing") else bits
        if bits <= 0:  # magnitude 10 asks for 0 bits: black, as Pillow gave before 12 (which now refuses it)
            return image.point([0] * 768)
        return image if bits >= 8 else ImageOps.posterize(image, bits)
    if name.startswith("Solarize") and name != "SolarizeAdd":
        thresh = min(256, int(fraction * 256))
        return ImageOps.solarize(image, 256 - thresh if name.endswith("Increasing") else thresh)
    if name == "SolarizeAdd":
        add = min(128, int(fraction * 110))
        return image.point([min(255, i + add) if i < 128 else i for i in range(256)] * 3)
    if name.startswith(("Color", "Contrast", "Brightness", "Sharpness")):
        factor = (max(0.1, 1.0 + signed(fraction * 0.9)) if name.endswith("Increasing")
                  else fraction * 1.8 + 0.1)
        enhancer = getattr(ImageEnhance, name.replace("Increasing", ""))
        return enhancer(image).enhance(factor)
    if name in ("ShearX", "ShearY"):
        s = signed(fraction * 0.3)
        return affine((1, s, 0, 0, 1, 0) if name == "ShearX" else (1, 0, 0, s, 1, 0))
    if name == "TranslateXRel":
        return affine((1, 0, signed(fraction * translate_pct) * image.size[0], 0, 1, 0))
    if name == "TranslateYRel":
        return affine((1, 0, 0, 0, 1, signed(fraction * translate_pct) * image.size[1]))
    raise ValueError(f"unknown RandAugment op {name!r}")


def to_pil(image: torch.Tensor) -> Image.Image:
    """An RGB PIL image of a 3×H×W uint8 image, or of a float one in [0, 1] rounded to 8 bits
    (RandAugment works in 8 bits, as timm's on PIL images; a bicubic resize's overshoot is
    clipped, as Pillow's 8-bit resize clips it). ``parse`` refuses it after ``normalize``."""
    if image.is_floating_point() and image.dim() == 3 and image.shape[0] == 3:
        image = (image * 255).round().clamp(0, 255).to(torch.uint8)
    if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"rand_augment works on RGB images (3×H×W, uint8 or float in [0, 1]), got {image.dtype} "
                         f"{tuple(image.shape)}; place it before normalize")
    h, w = image.shape[1:]
    planes = image.contiguous().numpy()  # one L image per channel, merged: 4x faster than an HWC copy
    return Image.merge("RGB", [Image.frombuffer("L", (w, h), plane, "raw", "L", 0, 1) for plane in planes])


def from_pil(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous()
