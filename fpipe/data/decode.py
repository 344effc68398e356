"""Image files to tensors, with the pixel range each file format means, and size limits.

What a file becomes (``decode``): 8-bit files give RGB uint8 3×H×W; files with more than 8 bits
per sample give float32 3×H×W in [0, 1], so no precision is clipped away:

| Pillow mode | meaning | result |
|---|---|---|
| ``1`` | 1-bit | uint8, black 0 / white 255 |
| ``L``, ``P``, ``RGB``, ``YCbCr``, ``HSV`` | 8-bit | uint8 RGB (``P``: its palette colours) |
| ``CMYK`` | 8-bit ink | uint8 RGB by Pillow's formula (ICC profiles are not applied) |
| ``RGBA``, ``LA``, ``PA``, ``P`` with transparency | 8-bit + alpha | uint8 RGB composited onto black (colour × alpha / 255) |
| ``I;16``, ``I;16L``, ``I;16B`` | 16-bit grey | float32, value / 65535 |
| ``I`` | 32-bit integer grey | float32, value / 65535; values outside 0..65535 are refused |
| ``F`` | 32-bit float grey | float32 as stored; NaN or values outside [0, 1] are refused |

Pillow reads 16-bit-per-channel colour PNGs as 8-bit ``RGB``/``RGBA`` (the high byte), so those
come back as uint8. Animated and multi-page files give their first frame. EXIF orientation is
not applied (as in torchvision's ``ImageFolder``).

Limits (``Limits``, from ``data.max_image_pixels`` and ``data.max_aspect_ratio``) are checked from
the header, before any pixel is decoded: a decompression bomb or a 2,000,000×1 strip is refused
with the file's name instead of asking a resize for gigabytes.
"""
import dataclasses

import numpy as np
import torch
from PIL import Image
from PIL import ImageFile

MAX_IMAGE_PIXELS = 89_478_485  # Pillow's own default: 0.25 GiB of 24-bit pixels
MAX_ASPECT_RATIO = 32.0        # longer side / shorter side
DRAFT_FACTORS = (8, 4, 2)      # the reductions JPEG decoders do in the DCT (libjpeg scale 1/k)

_EIGHT_BIT = ("1", "L", "P", "RGB", "YCbCr", "HSV", "CMYK", "RGBX")
_ALPHA = ("RGBA", "LA", "PA")
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")
MODES = _EIGHT_BIT + _ALPHA + _SIXTEEN_BIT + ("I", "F")


@dataclasses.dataclass(frozen=True)
class Limits:
    """Refuse files above ``max_pixels`` (width × height) or ``max_aspect_ratio`` (long / short)."""
    max_pixels: int = MAX_IMAGE_PIXELS
    max_aspect_ratio: float = MAX_ASPECT_RATIO

    def __post_init__(self):
        if self.max_pixels < 1 or not self.max_aspect_ratio >= 1:
            raise ValueError(f"want data.max_image_pixels >= 1 and data.max_aspect_ratio >= 1, "
                             f"got {self.max_pixels} and {self.max_aspect_ratio}")


class ImageError(ValueError):
    """A file that cannot become an image tensor; the message names the file and the fix."""


def open_image(path: str, limits: Limits = Limits()) -> Image.Image:
    """The file opened lazily (header only) after checking its size against ``limits``."""
    if limits.max_pixels > (Image.MAX_IMAGE_PIXELS or 0):
        Image.MAX_IMAGE_PIXELS = limits.max_pixels  # Pillow's own bomb check must not be stricter
    try:
        image = Image.open(path)
    except Image.DecompressionBombError as e:
        raise ImageError(f"image file {path!r} is refused: {e} Fix: remove the file, or raise "
                         "data.max_image_pixels if it is genuine.") from None
    except Exception as e:  # Pillow raises many types for broken files; name the file for all.
        raise ImageError(f"cannot decode image file {path!r} ({type(e).__name__}: {e}). Fix: "
                         "delete or replace this file (e.g. re-save it as PNG or JPEG).") from e
    width, height = image.size
    if width * height > limits.max_pixels:
        image.close()
        raise ImageError(f"image file {path!r} is {width}×{height} = {width * height:,} pixels, "
                         f"over data.max_image_pixels={limits.max_pixels:,} (a decompression "
                         "bomb?). Fix: remove or shrink the file, or raise data.max_image_pixels.")
    if width < 1 or height < 1 or max(width, height) / min(width, height) > limits.max_aspect_ratio:
        image.close()
        raise ImageError(f"image file {path!r} is {width}×{height}, an aspect ratio over "
                         f"data.max_aspect_ratio={limits.max_aspect_ratio:g}. Fix: remove or "
                         "crop the file, or raise data.max_aspect_ratio.")
    return image


def draft(image: Image.Image, factor: int) -> tuple:
    """Asks a JPEG decoder for 1/``factor`` of each side; returns the (y, x) scale it took."""
    width, height = image.size
    if factor > 1 and image.format == "JPEG":
        image.draft(None, (width // factor, height // factor))
    return image.size[1] / height, image.size[0] / width


def to_tensor(image: Image.Image, path: str) -> torch.Tensor:
    """Pixels as RGB uint8 or float32 3×H×W in [0, 1], by the table in this module's docstring."""
    try:
        mode = image.mode
        if mode == "P" and "transparency" in image.info:
            image, mode = image.convert("RGBA"), "RGBA"
        if mode in _EIGHT_BIT:
            return _chw(np.array(image if mode == "RGB" else image.convert("RGB")))
        if mode in _ALPHA:
            rgba = np.array(image.convert("RGBA")).astype(np.uint16)
            rgb = (rgba[..., :3] * rgba[..., 3:] + 127) // 255  # rounded colour × alpha / 255
            return _chw(rgb.astype(np.uint8))
        if mode in _SIXTEEN_BIT or mode == "I":
            values = np.array(image)
            if mode == "I" and values.size and (values.min() < 0 or values.max() > 65535):
                raise ImageError(f"image file {path!r} (mode I, 32-bit integers) has values "
                                 f"{values.min()}..{values.max()}, outside the 16-bit range "
                                 "0..65535 this loader scales to [0, 1]. Fix: re-save it as "
                                 "16-bit, or as float (mode F) in [0, 1].")
            grey = torch.from_numpy(values.astype(np.float32) / 65535.0)
            return grey.expand(3, -1, -1).contiguous()
        if mode == "F":
            values = np.array(image, dtype=np.float32)
            if values.size and not (np.isfinite(values).all() and values.min() >= 0
                                    and values.max() <= 1):
                raise ImageError(f"image file {path!r} (mode F, 32-bit float) has values "
                                 f"{np.nanmin(values):g}..{np.nanmax(values):g} (or NaN/inf); "
                                 "float images must lie in [0, 1]. Fix: rescale it to [0, 1].")
            return torch.from_numpy(values).expand(3, -1, -1).contiguous()
    except ImageError:
        raise
    except Exception as e:  # Truncated data surface here, when pixels are decoded.
        raise ImageError(f"cannot decode image file {path!r} ({type(e).__name__}: {e}). Fix: "
                         "delete or replace this file (e.g. re-save it as PNG or JPEG).") from e
    raise ImageError(f"image file {path!r} has Pillow mode {mode!r}, which this loader does not "
                     f"read; modes read: {', '.join(MODES)}. Fix: re-save it as RGB PNG or JPEG.")


def _chw(hwc: np.ndarray) -> torch.Tensor:
    """H×W×C numpy -> a C×H×W view (channels-last memory, which the uint8 resize kernel wants)."""
    return torch.from_numpy(hwc).permute(2, 0, 1)


def decode(path: str, limits: Limits = Limits()) -> torch.Tensor:
    """The whole file as a 3×H×W tensor (see the module docstring for dtypes and ranges)."""
    with open_image(path, limits) as image:
        return to_tensor(image, path)


def read(path: str, plan, limits: Limits = Limits()):
    """``plan(height, width)`` -> a ``transforms.Geometry``, applied to the file's pixels.

    The geometry is planned from the header alone; a JPEG is then decoded at 1/k of its size
    (k = ``geometry.reduction()``, 1 unless the resize shrinks by k or more). An 8-bit RGB JPEG
    is decoded by :func:`jpeg_rows` straight into the array the geometry reads, only down to the
    last row of the leading crop, or the last row a resize's kept rows read (``Geometry.rows_read``:
    eval's center crop); other files are decoded by Pillow, the leading crop taken before the
    pixels are copied out. The rest of the geometry is applied to the tensor.
    """
    with open_image(path, limits) as image:
        geometry = plan(image.size[1], image.size[0])
        scale = draft(image, geometry.reduction())
        size = (image.size[1], image.size[0])
        box, _ = geometry.leading_crop(size, scale)
        top, left, height, width = box if box is not None else (0, 0, *size)
        rows = top + height if box is not None else geometry.rows_read(height)
        pixels = jpeg_rows(image, rows, array_rows=top + height)
        if pixels is not None:  # RGB + padding: the resize reads 4 channels as they are
            region = torch.from_numpy(pixels[top:, left:left + width]).permute(2, 0, 1)
            return geometry.apply(region, scale, cropped=box is not None)[:3]
        _load(image, path)
        if box is not None:
            image = image.crop((left, top, left + width, top + height))
        return geometry.apply(to_tensor(image, path), scale, cropped=box is not None)


def jpeg_rows(image: Image.Image, rows: int, array_rows: int = None):
    """The first ``rows`` rows of an opened (maybe drafted), unloaded 8-bit RGB JPEG as a
    ``rows``×W×4 uint8 array (R, G, B, 255); ``None`` for any other file, or if decoding fails
    above that row (then decode it with Pillow as usual, for the usual error). ``array_rows``: an
    array that many rows high instead, the rows below ``rows`` zero (for a resize whose kept
    rows do not read them).

    libjpeg-turbo writes the pixels straight into the array (Pillow's decoder with an RGBX
    output over the array's memory): no Pillow image, crop or byte string in between. libjpeg
    emits rows top to bottom, each final when emitted (it decodes ahead the rows that chroma
    upsampling needs), so these rows are exactly those of a full decode, channel for channel
    (tested; checked once per process against Pillow's own decode, else never used), and a crop
    above the bottom of a photo skips the rest of the entropy decoding, IDCT and colour
    conversion: 17% of the decoding on average for random_resized_crop's boxes. Stopping early
    makes libjpeg report "too few scanlines read", which is ignored once the last wanted row is
    known to be written (its padding byte, set to 0 before, is 255). A file damaged only below
    the rows read is not noticed by this read (a later crop that reaches the damage reports it).
    """
    width, height = image.size
    if not (image.format == "JPEG" and image.mode == "RGB" and len(image.tile) == 1
            and 0 < rows <= height and tuple(image.tile[0][1]) == (0, 0, width, height)
            and _rgbx_decoding_works()):
        return None
    return _decode_rgbx(image, rows, array_rows)


def _decode_rgbx(image: Image.Image, rows: int, array_rows: int = None):
    width = image.size[0]
    name, _, offset, args = image.tile[0]
    pixels = np.empty((max(rows, array_rows or rows), width, 4), np.uint8)
    pixels[rows:] = 0
    pixels[rows - 1, 0, 3] = 0
    target = Image.core.map_buffer(pixels, (width, rows), "raw", 0, ("RGBX", 0, 1))  # the first rows
    decoder = Image._getdecoder("RGBX", name, ("RGBX", *args[1:]), image.decoderconfig)
    image.fp.seek(offset)
    try:
        decoder.setimage(target, (0, 0, width, rows))
        decoder.decode(image.fp.read())
    finally:
        decoder.cleanup()
    return pixels if pixels[rows - 1, 0, 3] == 255 else None


_RGBX_WORKS = None


def _rgbx_decoding_works() -> bool:
    """Once per process: :func:`jpeg_rows` gives Pillow's own pixels for a small 4:2:0 JPEG (it
    needs libjpeg-turbo's RGBX output and Pillow's decoder internals)."""
    global _RGBX_WORKS
    if _RGBX_WORKS is None:
        _RGBX_WORKS = False
        try:
            import io
            yy, xx = np.mgrid[0:37, 0:29]
            rgb = np.stack([xx * 8, yy * 6, (xx * yy) % 256], -1).astype(np.uint8)
            stream = io.BytesIO()
            Image.fromarray(rgb).save(stream, "JPEG", quality=80)
            with Image.open(stream) as probe:
                expected = np.array(probe)
            for rows in (37, 20):
                stream.seek(0)
                with Image.open(stream) as probe:
                    got = _decode_rgbx(probe, rows)
                if got is None or not (np.array_equal(got[..., :3], expected[:rows])
                                       and (got[..., 3] == 255).all()):
                    return False
            _RGBX_WORKS = True
        except Exception:
            pass
    return _RGBX_WORKS


def _load(image: Image.Image, path: str) -> None:
    try:
        image.load()
    except Exception as e:  # a truncated or corrupt file: name it, as to_tensor does
        raise ImageError(f"cannot decode image file {path!r} ({type(e).__name__}: {e}). Fix: "
                         "delete or replace this file (e.g. re-save it as PNG or JPEG).") from e
