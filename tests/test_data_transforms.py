"""Tests for fpipe.data.transforms: values by hand, shapes, determinism, op strings."""
import re

import pytest
import numpy as np
import torch
from PIL import Image

from fpipe.data import pipeline as P
from fpipe.data import transforms as T


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_to_float_scales_uint8_and_keeps_floats():
    x = torch.tensor([[[0, 51, 255]]], dtype=torch.uint8)
    assert torch.equal(T.to_float(x), torch.tensor([[[0.0, 0.2, 1.0]]]))
    y = torch.tensor([[[0.5]]], dtype=torch.float64)
    assert T.to_float(y).dtype == torch.float32 and T.to_float(y).item() == 0.5


def test_resize_bilinear_values_by_hand():
    # One row [0, 4] doubled with half-pixel centres: samples at -0.25, 0.25, 0.75, 1.25
    # (clamped at the edges) -> 0, 1, 3, 4. The shorter side (1) goes to 2, the longer to 4.
    x = torch.tensor([[[0.0, 4.0]]])
    out = T.resize(x, 2)
    assert out.shape == (1, 2, 4)
    assert torch.allclose(out, torch.tensor([[0.0, 1.0, 3.0, 4.0]] * 2)[None])


def test_resize_sets_shorter_side_and_keeps_aspect():
    assert T.resize(torch.zeros(3, 10, 20), 5).shape == (3, 5, 10)
    assert T.resize(torch.zeros(3, 20, 10), 5).shape == (3, 10, 5)
    # The longer side is truncated, as torchvision's Resize does: 5 * 4/3 = 6.67 -> 6.
    assert T.resize(torch.zeros(3, 3, 5), 4).shape == (3, 4, 6)
    assert T.resize_shape(360, 610, 256) == (256, 433)  # 433.78 -> 433
    assert T.resize_shape(500, 375, 256) == (341, 256)  # 341.33 -> 341
    assert T.resize(torch.zeros(3, 9, 9), (4, 6)).shape == (3, 4, 6)


def test_resize_uint8_keeps_dtype_and_constant_images():
    x = torch.full((3, 40, 30), 77, dtype=torch.uint8)
    out = T.resize(x, 7)
    assert out.dtype == torch.uint8 and out.shape == (3, 9, 7)
    assert (out == 77).all()
    assert T.resize(x, 30) is x  # already the size: untouched


def test_center_crop_values_by_hand():
    x = torch.arange(25.0).reshape(1, 5, 5)
    assert torch.equal(T.center_crop(x, 3), x[:, 1:4, 1:4])
    y = torch.arange(36.0).reshape(1, 6, 6)
    # Placed as torchvision's CenterCrop, round(margin / 2) with Python's round half to even:
    # margin 3 -> 2 (the extra pixel top/left), margin 5 -> 2 (bottom/right).
    assert torch.equal(T.center_crop(y, 3), y[:, 2:5, 2:5])
    assert torch.equal(T.center_crop(y, (2, 4)), y[:, 2:4, 1:5])
    assert T.center_crop_box(7, 9, (2, 4)) == (2, 2, 2, 4)
    with pytest.raises(ValueError, match="larger than"):
        T.center_crop(x, 6)


def test_hflip_and_random_flip():
    x = torch.arange(6.0).reshape(1, 2, 3)
    assert torch.equal(T.hflip(x), torch.tensor([[[2.0, 1, 0], [5, 4, 3]]]))
    assert torch.equal(T.random_flip(x, gen(), p=1.0), T.hflip(x))
    assert torch.equal(T.random_flip(x, gen(), p=0.0), x)
    flips = [not torch.equal(T.random_flip(x, gen(s)), x) for s in range(200)]
    assert 60 < sum(flips) < 140
    assert [not torch.equal(T.random_flip(x, gen(s)), x) for s in range(200)] == flips


def test_normalize_exact():
    x = torch.rand(3, 4, 5, generator=gen())
    mean, std = torch.tensor(T.IMAGENET_MEAN), torch.tensor(T.IMAGENET_STD)
    expected = (x - mean[:, None, None]) / std[:, None, None]
    assert torch.equal(T.normalize(x), expected)
    white = torch.full((3, 1, 1), 255, dtype=torch.uint8)
    got = T.normalize(white).flatten().tolist()
    want = [(1 - m) / s for m, s in zip(T.IMAGENET_MEAN, T.IMAGENET_STD)]
    assert got == pytest.approx(want, abs=1e-6)
    assert torch.equal(T.normalize(x, mean=(0.5,), std=(0.25,)), (x - 0.5) / 0.25)


def test_random_resized_crop_shape_dtype_determinism():
    x = torch.randint(0, 256, (3, 37, 53), dtype=torch.uint8, generator=gen())
    a = T.random_resized_crop(x, 16, gen(1))
    assert a.shape == (3, 16, 16) and a.dtype == torch.uint8
    assert torch.equal(a, T.random_resized_crop(x, 16, gen(1)))
    assert T.random_resized_crop(x.float(), (8, 12), gen(1)).shape == (3, 8, 12)
    outs = {T.random_resized_crop(x, 16, gen(s)).sum().item() for s in range(10)}
    assert len(outs) > 5


def test_random_resized_crop_box_respects_scale_ratio_and_bounds():
    h, w = 60, 80
    for s in range(300):
        top, left, ch, cw = T.random_resized_crop_box(h, w, gen(s), (0.2, 0.6), (0.5, 2.0))
        assert 0 <= top and top + ch <= h and 0 <= left and left + cw <= w
        # Rounding each side to an int moves the area and aspect a little.
        assert 0.2 * 0.9 <= ch * cw / (h * w) <= 0.6 * 1.1
        assert 0.5 * 0.9 <= cw / ch <= 2.0 * 1.1


def test_random_resized_crop_full_image_and_fallback():
    x = torch.rand(3, 10, 10, generator=gen())
    assert T.random_resized_crop_box(10, 10, gen(), (1.0, 1.0), (1.0, 1.0)) == (0, 0, 10, 10)
    assert torch.equal(T.random_resized_crop(x, 10, gen(), (1.0, 1.0), (1.0, 1.0)), x)
    # Aspect 2 at full area never fits a square: the central crop of aspect 2 (10×5).
    assert T.random_resized_crop_box(10, 10, gen(), (1.0, 1.0), (2.0, 2.0)) == (2, 0, 5, 10)
    with pytest.raises(ValueError, match="scale"):
        T.random_resized_crop_box(10, 10, gen(), (0.5, 0.1))


def test_parse_pipeline_string_list_and_default_size():
    x = torch.randint(0, 256, (3, 20, 30), dtype=torch.uint8, generator=gen())
    p = P.parse("resize(8)|center_crop(8)|normalize")
    out = p(x, gen())
    assert out.shape == (3, 8, 8) and out.dtype == torch.float32
    assert torch.equal(out, T.normalize(T.center_crop(T.resize(x, 8), 8)))
    q = P.parse(["resize", "center_crop", "normalize"], size=8)
    assert torch.equal(q(x, gen()), out)
    r = P.parse("random_resized_crop(scale=(0.3, 1))|flip|to_float", size=12)
    assert r(x, gen(3)).shape == (3, 12, 12)
    assert torch.equal(r(x, gen(3)), r(x, gen(3)))
    assert P.parse("", size=8)(x, gen()) is x
    assert P.parse(None)(x, gen()) is x
    assert p.spec == "resize(8)|center_crop(8)|normalize"


def test_parse_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"unknown transform op 'blur'.*center_crop.*flip"):
        P.parse("resize(8)|blur")
    with pytest.raises(ValueError, match="bad arguments.*resize"):
        P.parse("resize(8, 9, 10)")
    with pytest.raises(ValueError, match="needs a size"):
        P.parse("center_crop")
    with pytest.raises(ValueError, match="cannot parse"):
        P.parse("resize(x)")
    with pytest.raises(ValueError, match="interpolation 'nearest'; valid: bilinear, bicubic"):
        P.parse("random_resized_crop(8, interpolation='nearest')")
    # Sizes and ranges are checked when the string is read, not when the first image meets them.
    for text, message in [("resize(-5)", "size=-5: want a whole number >= 1"), ("resize(0)", "size=0"),
                          ("center_crop((3, 4, 5))", r"size=\(3, 4, 5\)"), ("resize(8.5)", "size=8.5"),
                          ("random_resized_crop(8, scale=(1.0, 0.1))", r"want 0 < scale\[0\] <= scale\[1\]"),
                          ("flip(2)", r"p=2: a probability in \[0, 1\]")]:
        with pytest.raises(ValueError, match=rf"transform op '{re.escape(text)}': {message}"):
            P.parse(text)


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_eval_transform_is_torchvisions_resize_and_center_crop_in_pillow(interpolation):
    """``resize(S)|center_crop(C)`` gives what torchvision's ``Resize(S)`` + ``CenterCrop(C)`` give
    on a Pillow image (sizes truncated, the crop placed by round(margin / 2), Pillow's filter):
    within one level, on shapes whose scaled side and margins are fractional and odd."""
    pil_filter = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}[interpolation]
    g = np.random.default_rng(0)
    for height, width in [(360, 610), (500, 375), (333, 501), (300, 309), (309, 300), (300, 300)]:
        smooth = np.cumsum(np.cumsum(g.normal(0, 4, (height, width, 3)), 0), 1)
        pixels = np.clip(smooth - smooth.min((0, 1)) + 20, 0, 255).astype(np.uint8)
        image = Image.fromarray(pixels)
        short, long = min(height, width), max(height, width)
        scaled = int(256 * long / short)  # torchvision's _compute_resized_output_size
        new_w, new_h = (256, scaled) if width <= height else (scaled, 256)
        resized = image.resize((new_w, new_h), pil_filter)
        top, left = int(round((new_h - 224) / 2.0)), int(round((new_w - 224) / 2.0))
        expected = np.asarray(resized.crop((left, top, left + 224, top + 224)))
        pipe = P.parse(f"resize(256, interpolation={interpolation!r})|center_crop(224)")
        ours = pipe(torch.from_numpy(pixels).permute(2, 0, 1), gen()).permute(1, 2, 0).numpy()
        difference = np.abs(ours.astype(int) - expected.astype(int))
        assert difference.max() <= 1 and difference.mean() < 0.05, (height, width, difference.mean())


def test_uint8_resize_is_within_one_level_of_the_float_resize():
    x = torch.randint(0, 256, (3, 37, 53), dtype=torch.uint8, generator=gen())
    for size in [(16, 20), (50, 70), (37, 20)]:
        fast = T.resize(x, size)
        reference = T.resize(x.float(), size).round().clamp(0, 255)
        assert fast.dtype == torch.uint8
        assert (fast.float() - reference).abs().max() <= 1


def test_pipeline_splits_into_geometry_per_sample_and_pixelwise_parts():
    p = P.parse("random_resized_crop(8)|flip|normalize")
    assert (len(p.geometric), len(p.per_sample), len(p.pixelwise)) == (2, 0, 1)
    q = P.parse("to_float|resize(8)|normalize|to_float")
    assert (len(q.geometric), len(q.per_sample), len(q.pixelwise)) == (0, 2, 2)
    x = torch.randint(0, 256, (3, 20, 30), dtype=torch.uint8, generator=gen())
    assert torch.equal(q(x, gen()), T.normalize(T.resize(T.to_float(x), 8)))
    # The planned geometry draws what the ops draw, in order, and applies the same crops.
    plan = p.plan(20, 30, gen(5))
    box = T.random_resized_crop_box(20, 30, gen(5))
    assert plan.steps[:2] == [("crop", *box), ("resize", 8, 8, "bilinear")]
    batch = torch.stack([x, x.flip(-1)])
    assert torch.equal(p.finish(batch.clone())[1], T.normalize(x.flip(-1)))


def test_geometry_reduction_and_scaled_crops():
    g = T.Geometry(400, 600)
    g.crop(0, 100, 400, 400)
    g.resize(100, 100)
    assert g.reduction() == 4
    g2 = T.Geometry(400, 600)
    g2.resize(256, 384)
    assert g2.reduction() == 1  # shrinks by 1.56 only
    # Applied to a 1/4-size image, the crop scales with it: the same part of the picture.
    x = torch.arange(600.0).repeat(400, 1)[None]  # value = column
    small = x[:, ::4, ::4]
    out = g.apply(small, (0.25, 0.25))
    assert out.shape == (1, 100, 100)
    assert 95 < out[0, 0, 0] < 110 and 490 < out[0, 0, -1] < 500


def test_pipelines_pickle_by_their_string():
    import pickle
    p = P.parse("random_resized_crop(scale=(0.3, 1))|flip|normalize", size=12)
    q = pickle.loads(pickle.dumps(p))
    x = torch.randint(0, 256, (3, 20, 30), dtype=torch.uint8, generator=gen())
    assert q.spec == p.spec and torch.equal(q(x, gen(2)), p(x, gen(2)))


def test_a_bad_transform_string_in_a_config_is_refused_naming_the_key():
    from configs import linear_eval
    from fpipe.train import config_check

    config = linear_eval.get_config()
    config.data.eval_transforms = "resize(256, interpolation='nearest')|center_crop|normalize"
    with pytest.raises(config_check.ConfigError, match=r"data\.eval_transforms=.*valid: bilinear, bicubic"):
        config_check.check(config)
    config.data.eval_transforms, config.data.train_transforms = "resize|center_crop", "flip|centre_crop"
    with pytest.raises(config_check.ConfigError, match=r"data\.train_transforms=.*unknown transform op 'centre_crop'"):
        config_check.check(config)
    config.data.train_transforms = "resize|center_crop"
    config.model.heads.res3.pool = (2,)  # a 1-element pool reached adaptive pooling as a 1-D size
    with pytest.raises(config_check.ConfigError, match=r"model\.heads\.res3\.pool=\(2,\): write pool=2 or"):
        config_check.check(config)
