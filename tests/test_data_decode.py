"""Tests for fpipe.data.decode: each file mode's range, alpha, limits, reduced-size decoding.

Files are written with Pillow and numpy; expectations are computed from the arrays written.
"""
import numpy as np
import pytest
import torch
from PIL import Image

from fpipe import data
from fpipe.data import decode
from fpipe.data import pipeline
from fpipe.data import rng

RAMP16 = np.arange(0, 65536, 64, dtype=np.uint16).reshape(32, 32)  # 0 .. 65472


def one_image_dataset(tmp_path, save, name="img.png", **overrides):
    """A train/val image_folder whose only train image is written by ``save(path)``."""
    for split in ("train", "val"):
        (tmp_path / split / "a").mkdir(parents=True)
        Image.new("RGB", (4, 4)).save(tmp_path / split / "a" / "other.png")
    save(tmp_path / "train" / "a" / name)
    c = data.default_config()
    c.update(dict(name="image_folder", root=str(tmp_path), **overrides))
    ds = data.build(c)
    index = [i for i, f in enumerate(ds.train.files) if f.endswith(name)][0]
    return ds.train, index


def test_16_bit_png_keeps_its_range(tmp_path):
    split, i = one_image_dataset(tmp_path, lambda p: Image.fromarray(RAMP16).save(p))
    image, _ = split[i]
    assert image.dtype == torch.float32 and image.shape == (3, 32, 32)
    expected = torch.from_numpy(RAMP16.astype(np.float32) / 65535)
    assert torch.equal(image[0], expected) and torch.equal(image[2], expected)
    assert (image == 1.0).float().mean() < 0.01  # convert("RGB") made 99.6% of this ramp 255


@pytest.mark.parametrize("mode", ["I;16B", "I"])
def test_16_bit_big_endian_and_32_bit_integer_tiffs(tmp_path, mode):
    values = RAMP16.astype(">u2") if mode == "I;16B" else RAMP16.astype(np.int32)
    written = Image.fromarray(values)
    assert written.mode == mode
    split, i = one_image_dataset(tmp_path, written.save, "img.tif")
    assert torch.equal(split[i][0][1], torch.from_numpy(RAMP16.astype(np.float32) / 65535))


def test_32_bit_integers_outside_16_bits_are_refused(tmp_path):
    values = RAMP16.astype(np.int32) - 5
    split, i = one_image_dataset(tmp_path, Image.fromarray(values).save, "neg.tif")
    with pytest.raises(ValueError, match=r"neg\.tif.*-5\.\.65467.*0\.\.65535"):
        split[i]


def test_float_images_in_unit_range_are_kept_and_others_refused(tmp_path):
    values = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    split, i = one_image_dataset(tmp_path, Image.fromarray(values).save, "f.tif")
    assert torch.equal(split[i][0][0], torch.from_numpy(values))
    outside = tmp_path / "train" / "a" / "f.tif"
    Image.fromarray(values * 300).save(outside)
    with pytest.raises(ValueError, match=r"f\.tif.*0\.\.300.*\[0, 1\]"):
        split[i]


def test_alpha_is_composited_onto_black(tmp_path):
    rgba = np.zeros((2, 3, 4), np.uint8)
    rgba[..., :3] = [200, 100, 50]
    rgba[..., 3] = [[255, 128, 0], [255, 255, 255]]
    split, i = one_image_dataset(tmp_path, lambda p: Image.fromarray(rgba, "RGBA").save(p))
    image = split[i][0]
    assert image.dtype == torch.uint8
    assert image[:, 0, 0].tolist() == [200, 100, 50]             # opaque: unchanged
    assert image[:, 0, 1].tolist() == [100, 50, 25]              # half: colour × 128/255, rounded
    assert image[:, 0, 2].tolist() == [0, 0, 0]                  # transparent: black
    la = np.stack([np.full((2, 2), 200, np.uint8), np.array([[255, 0], [255, 0]], np.uint8)], -1)
    Image.fromarray(la, "LA").save(tmp_path / "train" / "a" / "img.png")
    assert split[i][0][:, 0].tolist() == [[200, 0]] * 3


def test_palette_with_transparency_one_bit_and_cmyk(tmp_path):
    def palette(path):
        image = Image.new("P", (2, 1), 0)
        image.putpalette([10, 20, 30, 40, 50, 60] + [0] * 762)
        image.putpixel((1, 0), 1)
        image.save(path, transparency=0)
    split, i = one_image_dataset(tmp_path / "p", palette)
    assert split[i][0][:, 0].T.tolist() == [[0, 0, 0], [40, 50, 60]]  # index 0 is transparent
    split, i = one_image_dataset(tmp_path / "1", Image.new("1", (3, 1), 1).save)
    assert split[i][0].unique().tolist() == [255]
    split, i = one_image_dataset(tmp_path / "c", Image.new("CMYK", (2, 2), (255, 0, 0, 0)).save,
                                 "c.tif")
    assert split[i][0][:, 0, 0].tolist() == [0, 255, 255]  # full cyan ink


def test_decompression_bombs_and_strips_are_refused_naming_the_file(tmp_path):
    strip = lambda p: Image.new("L", (2_000_000, 1)).save(p)
    split, i = one_image_dataset(tmp_path, strip, "strip.png")
    with pytest.raises(ValueError, match=r"strip\.png.*2000000×1.*data\.max_aspect_ratio=32"):
        split[i]
    loader = data.Loader(split, dict(batch_size=2, eval_transforms="resize(8)|center_crop(8)"),
                         train=False)
    with pytest.raises(ValueError, match=r"strip\.png"):
        list(loader.epoch())
    big = lambda p: Image.new("RGB", (40, 30)).save(p)
    split, i = one_image_dataset(tmp_path / "b", big, max_image_pixels=1000)
    with pytest.raises(ValueError, match=r"img\.png.*40×30 = 1,200 pixels.*max_image_pixels=1,000"):
        split[i]
    with pytest.raises(ValueError, match="max_image_pixels"):
        decode.Limits(max_pixels=0)


def smooth_jpeg(path, height, width, seed=0):
    """A photo-like JPEG: smooth colour fields plus mild noise."""
    g = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width] / max(height, width)
    fields = [np.sin(xx * g.uniform(3, 9) + g.uniform(0, 6)) * np.cos(yy * g.uniform(3, 9))
              for _ in range(3)]
    pixels = np.stack(fields, -1) * 90 + 128 + g.normal(0, 6, (height, width, 3))
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=90)
    return path


def test_reduced_size_jpeg_decoding_is_used_and_close(tmp_path):
    path = str(smooth_jpeg(tmp_path / "big.jpg", 480, 640))
    eval_pipe = pipeline.parse("resize(56)|center_crop(56)")
    plan = eval_pipe.plan(480, 640, rng.generator("x"))
    assert plan.reduction() == 8  # 480 -> 56 shrinks by 8.6: decode 60×80
    full = eval_pipe(decode.decode(path), rng.generator("x"))
    reduced = decode.read(path, lambda h, w: eval_pipe.plan(h, w, rng.generator("x")))
    assert reduced.shape == full.shape == (3, 56, 56) and reduced.dtype == torch.uint8
    difference = (reduced.float() - full.float()).abs()
    assert 0 < difference.mean() < 1.5 and difference.max() < 20
    # A random crop that is not shrunk by 2 or more decodes in full: exactly the tensor path.
    train_pipe = pipeline.parse("random_resized_crop(224)|flip")
    exact = 0
    for s in range(8):
        g = lambda: rng.generator("augment", 0, 0, s)
        if train_pipe.plan(480, 640, g()).reduction() == 1:
            read = decode.read(path, lambda h, w: train_pipe.plan(h, w, g()))
            assert torch.equal(read, train_pipe(decode.decode(path), g()))
            exact += 1
    assert exact >= 4


def test_random_crops_decoded_at_reduced_size_stay_close(tmp_path):
    path = str(smooth_jpeg(tmp_path / "big.jpg", 600, 800, seed=1))
    pipe = pipeline.parse("random_resized_crop(48, scale=(0.2, 1))|flip")
    reductions = []
    for s in range(6):
        g = lambda: rng.generator("augment", 0, 0, s)
        reductions.append(pipe.plan(600, 800, g()).reduction())
        full = pipe(decode.decode(path), g())
        reduced = decode.read(path, lambda h, w: pipe.plan(h, w, g()))
        assert (reduced.float() - full.float()).abs().mean() < 2.5
    assert min(reductions) >= 2


@pytest.mark.parametrize("subsampling, progressive", [(0, False), (2, False), (1, True), (2, True)])
def test_jpegs_decoded_down_to_a_row_equal_the_full_decode(tmp_path, subsampling, progressive):
    path = str(smooth_jpeg(tmp_path / "a.jpg", 203, 157, seed=2))
    Image.open(path).save(path, quality=85, subsampling=subsampling, progressive=progressive)
    for factor in (1, 2, 4):
        full = Image.open(path)
        decode.draft(full, factor)
        reference = np.array(full)
        height = reference.shape[0]
        for rows in sorted({1, 2, 7, 8, 9, 15, 16, 17, height // 2, height - 1, height}):
            image = decode.open_image(path)
            decode.draft(image, factor)
            pixels = decode.jpeg_rows(image, rows)
            assert pixels.shape == (rows, reference.shape[1], 4), (factor, rows)
            assert np.array_equal(pixels[..., :3], reference[:rows]), (factor, rows)
            assert (pixels[..., 3] == 255).all()


@pytest.mark.parametrize("spec", ["resize(256)|center_crop(224)", "resize(256, interpolation='bicubic')|center_crop(224)",
                                  "resize(300)|center_crop(224)"])
def test_a_resize_then_crop_decodes_only_the_rows_its_kept_rows_read_and_equals_the_full_decode(tmp_path, spec):
    """Eval's resize|center_crop: the decoder stops below the last row the kept rows' filter reads
    (``Geometry.rows_read``); the pixels equal the tensor path's on the whole file."""
    pipe = pipeline.parse(spec, 224)
    assert pipeline.parse("resize(256)|center_crop(224)").plan(375, 500, None).rows_read(375) == 354  # of 375
    for i, (height, width) in enumerate([(375, 500), (500, 375), (333, 333), (481, 257)]):
        path = str(smooth_jpeg(tmp_path / f"{i}.jpg", height, width, seed=i))
        plan = lambda h, w: pipe.plan(h, w, None)
        assert plan(height, width).reduction() == 1 and plan(height, width).rows_read(height) < height
        assert torch.equal(decode.read(path, plan), pipe(decode.decode(path), None)), (spec, height, width)


def test_jpeg_rows_is_only_for_8_bit_rgb_jpegs(tmp_path):
    grey = tmp_path / "grey.jpg"
    Image.new("L", (8, 8), 100).save(grey)
    Image.new("RGB", (8, 8), (1, 2, 3)).save(tmp_path / "a.png")
    for path in (grey, tmp_path / "a.png"):
        assert decode.jpeg_rows(decode.open_image(str(path)), 4) is None
    # and read() still decodes them, by Pillow
    pipe = pipeline.parse("center_crop(4)")
    assert decode.read(str(grey), lambda h, w: pipe.plan(h, w, None)).eq(100).all()


def test_a_jpeg_cut_short_fails_only_when_the_wanted_rows_are_missing(tmp_path):
    path = smooth_jpeg(tmp_path / "a.jpg", 300, 400, seed=3)
    whole = path.read_bytes()
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(whole[: len(whole) * 2 // 3])
    reference = np.array(Image.open(path))
    top = decode.jpeg_rows(decode.open_image(str(cut)), 40)
    assert np.array_equal(top[..., :3], reference[:40])
    assert decode.jpeg_rows(decode.open_image(str(cut)), 299) is None
    crop = lambda size: lambda h, w: pipeline.parse(f"center_crop({size})").plan(h, w, None)
    assert torch.equal(decode.read(str(cut), crop(40)),  # rows 130..169: above the cut
                       decode.read(str(path), crop(40)))
    with pytest.raises(decode.ImageError, match=f"cannot decode image file '{cut}'.*truncated"):
        decode.read(str(cut), crop(300))  # a crop reaching the damage
