"""fpipe.detection.roi_align against RoIAlign written out per RoI, bin and sample in float32."""
import math

import numpy as np
import pytest
import torch

from fpipe.detection import roi_align as R

f32 = np.float32


def _bilinear(img, y, x):
    """img: [C, H, W] numpy; the kernel's rules: outside [-1, size] -> 0, clamp into the map."""
    h, w = img.shape[1:]
    if y < -1.0 or y > h or x < -1.0 or x > w:
        return np.zeros(img.shape[0], np.float32), []
    y, x = max(y, f32(0)), max(x, f32(0))
    yl, xl = int(y), int(x)
    if yl >= h - 1:
        yl = yh = h - 1
        y = f32(yl)
    else:
        yh = yl + 1
    if xl >= w - 1:
        xl = xh = w - 1
        x = f32(xl)
    else:
        xh = xl + 1
    ly, lx = f32(y - yl), f32(x - xl)
    hy, hx = f32(1) - ly, f32(1) - lx
    taps = [(hy * hx, yl, xl), (hy * lx, yl, xh), (ly * hx, yh, xl), (ly * lx, yh, xh)]
    return sum(wt * img[:, a, b] for wt, a, b in taps), taps


def _ref_roi_align(feat, rois, out_size, scale, ratio, aligned, grad_out=None):
    """Returns the pooled [K, C, PH, PW] and, given grad_out, d(sum(out * grad_out))/d(feat)."""
    feat = feat.numpy()
    grad = np.zeros_like(feat)
    ph_n, pw_n = out_size
    scale = f32(scale)
    off = f32(0.5 if aligned else 0.0)
    out = np.zeros((len(rois), feat.shape[1], ph_n, pw_n), np.float32)
    for k, (b, *xy) in enumerate(rois.tolist()):
        b = int(b)
        x1, y1, x2, y2 = (f32(v) * scale - off for v in xy)
        rw, rh = x2 - x1, y2 - y1
        if not aligned:
            rw, rh = max(rw, f32(1)), max(rh, f32(1))
        bh, bw = f32(rh / f32(ph_n)), f32(rw / f32(pw_n))
        gh = ratio if ratio > 0 else int(math.ceil(rh / f32(ph_n)))
        gw = ratio if ratio > 0 else int(math.ceil(rw / f32(pw_n)))
        count = max(gh * gw, 1)
        for ph in range(ph_n):
            for pw in range(pw_n):
                acc = np.zeros(feat.shape[1], np.float32)
                for iy in range(gh):
                    y = f32(y1 + f32(ph) * bh) + f32(f32(iy + 0.5) * bh) / f32(gh)
                    for ix in range(gw):
                        x = f32(x1 + f32(pw) * bw) + f32(f32(ix + 0.5) * bw) / f32(gw)
                        val, taps = _bilinear(feat[b], f32(y), f32(x))
                        acc = acc + val
                        if grad_out is not None:
                            for wt, a, c in taps:
                                grad[b, :, a, c] += wt * grad_out[k, :, ph, pw].numpy() / count
                out[k, :, ph, pw] = acc / count
    return torch.from_numpy(out), torch.from_numpy(grad)


def _case(seed, n_img=2, c=3, h=9, w=11, k=14, spread=1.5):
    gen = torch.Generator().manual_seed(seed)
    feat = torch.randn(n_img, c, h, w, generator=gen)
    size = torch.tensor([w, h]) * 4.0  # boxes in image coordinates (scale 1/4)
    xy = (torch.rand(k, 2, generator=gen) * spread - (spread - 1) / 2) * size  # some outside the image
    wh = torch.rand(k, 2, generator=gen) * size * 0.6
    boxes = torch.cat([xy, xy + wh], 1)
    boxes[0] = torch.tensor([5.0, 6.0, 6.5, 7.0])  # smaller than a feature pixel
    boxes[1] = torch.tensor([20.0, 20.0, 12.0, 15.0])  # inverted
    boxes[2] = torch.tensor([-30.0, -20.0, 80.0, 60.0])  # past every edge
    idx = torch.randint(0, n_img, (k, 1), generator=gen).float()
    return feat, torch.cat([idx, boxes], 1)


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("ratio,out_size", [(2, (3, 3)), (-1, (2, 3)), (0, (4, 2)), (1, (1, 1))])
def test_roi_align_matches_reference(aligned, ratio, out_size):
    feat, rois = _case(0 if aligned else 1)
    got = R.roi_align(feat, rois, out_size, 0.25, ratio, aligned)
    want, _ = _ref_roi_align(feat, rois, out_size, 0.25, ratio, aligned)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (want[2].abs() > 0).any()  # the box past every edge still pools its inside
    if aligned and ratio <= 0:  # an inverted box has a grid of ceil(negative) <= 0 samples: zeros
        assert (want[1] == 0).all()


def test_roi_align_gradient_matches_reference_adjoint():
    feat, rois = _case(2)
    feat.requires_grad_(True)
    g = torch.randn(len(rois), 3, 3, 2, generator=torch.Generator().manual_seed(3))
    out = R.roi_align(feat, rois, (3, 2), 0.25, -1, True)
    (out * g).sum().backward()
    _, want = _ref_roi_align(feat.detach(), rois, (3, 2), 0.25, -1, True, grad_out=g)
    torch.testing.assert_close(feat.grad, want, rtol=1e-5, atol=1e-5)


def test_roi_align_hand_cases_and_layouts():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    # aligned: pixel centres sit at integers, so 2x2 bins average 2x2 pixel blocks exactly
    out = R.roi_align(x, torch.tensor([[0.0, 0.0, 0.0, 4.0, 4.0]]), 2, aligned=True)
    torch.testing.assert_close(out, torch.tensor([[[[2.5, 4.5], [10.5, 12.5]]]]))
    # legacy: one sample at the box centre (1.5, 1.5) interpolates pixels 5, 6, 9, 10
    out = R.roi_align(x, torch.tensor([[0.0, 0.0, 0.0, 3.0, 3.0]]), 1, sampling_ratio=1)
    torch.testing.assert_close(out, torch.tensor([[[[7.5]]]]))
    feat, rois = _case(4)
    flat = R.roi_align(feat, rois, 2, 0.25, 2, True)
    per_image = [rois[rois[:, 0] == i, 1:] for i in range(2)]
    as_list = R.roi_align(feat, per_image, 2, 0.25, 2, True)
    torch.testing.assert_close(as_list, torch.cat([flat[rois[:, 0] == i] for i in range(2)]))
    padded = torch.stack([rois[:7, 1:], rois[7:, 1:]])
    got = R.roi_align(feat, padded, 2, 0.25, 2, True)
    want = R.roi_align(feat, torch.cat([torch.tensor([[0.0]] * 7 + [[1.0]] * 7), rois[:, 1:]], 1), 2, 0.25, 2, True)
    torch.testing.assert_close(got, want.view(2, 7, 3, 2, 2))


def test_max_grid_bounds_the_adaptive_grid():
    feat, rois = _case(5)
    exact = R.roi_align(feat, rois, 2, 0.25, -1, True)
    torch.testing.assert_close(R.roi_align(feat, rois, 2, 0.25, -1, True, max_grid=64), exact)
    capped = R.roi_align(feat, rois, 2, 0.25, -1, True, max_grid=1)
    upright = [k for k in range(len(rois)) if k != 1]  # box 1 is inverted: no samples when adaptive
    torch.testing.assert_close(capped[upright], R.roi_align(feat, rois, 2, 0.25, 1, True)[upright])


def test_map_levels_and_scales():
    boxes = torch.tensor([[0.0, 0, 224, 224], [0, 0, 112, 112], [0, 0, 111, 111], [0, 0, 2000, 2000],
                          [0, 0, 10, 10], [0, 0, 448, 448]])
    assert R.map_levels(boxes, 2, 5).tolist() == [2, 1, 0, 3, 0, 3]
    assert R.infer_scales([(200, 304), (100, 152), (50, 76), (25, 38)], [(800, 1216), (790, 1000)]) == \
        [0.25, 0.125, 0.0625, 0.03125]


def test_multiscale_roi_align_matches_per_level_reference():
    gen = torch.Generator().manual_seed(6)
    image = (64, 96)
    feats = [torch.randn(2, 3, image[0] // s, image[1] // s, generator=gen) for s in (4, 8, 16, 32)]
    xy = torch.rand(20, 2, generator=gen) * torch.tensor([96.0, 64.0])
    wh = torch.exp(torch.empty(20, 2).uniform_(math.log(8), math.log(900), generator=gen))  # all levels
    boxes = torch.cat([xy, xy + wh], 1)
    boxes[-1] = torch.tensor([10.0, 5.0, 710.0, 605.0])  # level 5 (sqrt(area) >= 448)
    idx = torch.randint(0, 2, (20, 1), generator=gen).float()
    rois = torch.cat([idx, boxes], 1)
    got = R.multiscale_roi_align(feats, rois, [image, (60, 90)], output_size=3, sampling_ratio=2)
    levels = []
    for k, (x1, y1, x2, y2) in enumerate(boxes.tolist()):
        lvl = min(max(math.floor(4 + math.log2(math.sqrt((x2 - x1) * (y2 - y1)) / 224) + 1e-6), 2), 5)
        levels.append(lvl)
        want, _ = _ref_roi_align(feats[lvl - 2], rois[k:k + 1], (3, 3), 2.0 ** -lvl, 2, False)
        torch.testing.assert_close(got[k:k + 1], want, rtol=1e-5, atol=1e-5)
    assert len(set(levels)) == 4


def test_empty_rois_and_dtype():
    f = torch.randn(1, 2, 5, 5)
    for ratio in (-1, 2):
        assert R.roi_align(f, torch.zeros(0, 5), 3, 1.0, ratio, True).shape == (0, 2, 3, 3)
    assert R.multiscale_roi_align([f, f[..., ::2, ::2]], torch.zeros(0, 5), [(20, 20)], 3).shape == (0, 2, 3, 3)
    box = torch.tensor([[0.0, 0.0, 0.0, 3.0, 3.0]])
    wide = R.roi_align(f.double(), box.double(), 2, 1.0, 2, True)
    assert wide.dtype == torch.float64
    torch.testing.assert_close(wide.float(), R.roi_align(f, box, 2, 1.0, 2, True))
    assert R.roi_align(f.half(), box, 2, 1.0, 2, True).dtype == torch.float16  # the features' dtype
