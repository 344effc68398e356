"""fpipe.detection.boxes against per-box Python loops and hand-worked cases."""
import math

import pytest
import torch

from fpipe.detection import boxes as B


def _rand_boxes(gen, n, scale=50.0):
    xy = torch.rand(n, 2, generator=gen) * scale
    wh = torch.rand(n, 2, generator=gen) * scale + 0.5
    return torch.cat([xy, xy + wh], 1)


def _iou_ref(a, b):
    ax1, ay1, ax2, ay2 = a
    bx1, by1, bx2, by2 = b
    iw = max(0.0, min(ax2, bx2) - max(ax1, bx1))
    ih = max(0.0, min(ay2, by2) - max(ay1, by1))
    inter = iw * ih
    return inter / ((ax2 - ax1) * (ay2 - ay1) + (bx2 - bx1) * (by2 - by1) - inter)


def test_box_iou_hand_cases():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0], [0.0, 0.0, 2.0, 2.0], [5.0, 5.0, 6.0, 6.0], [0.0, 0.0, 1.0, 2.0]])
    torch.testing.assert_close(B.box_iou(a, b), torch.tensor([[1 / 7, 1.0, 0.0, 0.5]]))
    torch.testing.assert_close(B.box_area(b), torch.tensor([4.0, 4.0, 1.0, 2.0]))


def test_box_iou_matches_loop_and_batches():
    gen = torch.Generator().manual_seed(0)
    a, b = _rand_boxes(gen, 7).double(), _rand_boxes(gen, 5).double()
    ref = torch.tensor([[_iou_ref(x.tolist(), y.tolist()) for y in b] for x in a], dtype=torch.float64)
    torch.testing.assert_close(B.box_iou(a, b), ref)
    assert (ref > 0).any() and (ref == 0).any()  # both overlapping and disjoint pairs occur
    batched = B.box_iou(torch.stack([a, a.flip(0)]), torch.stack([b, b]))
    torch.testing.assert_close(batched[1], ref.flip(0))


def test_clip_and_remove_small():
    boxes = torch.tensor([[-5.0, -1.0, 12.0, 30.0], [1.0, 2.0, 1.5, 9.0], [3.0, 3.0, 8.0, 8.0]])
    clipped = B.clip_boxes_to_image(boxes, (20, 10))  # height 20, width 10
    torch.testing.assert_close(clipped, torch.tensor([[0.0, 0.0, 10.0, 20.0], [1.0, 2.0, 1.5, 9.0], [3.0, 3.0, 8.0, 8.0]]))
    per_image = B.clip_boxes_to_image(torch.stack([boxes, boxes]), torch.tensor([[20, 10], [5, 4]])[:, None, :])
    torch.testing.assert_close(per_image[0], clipped)
    torch.testing.assert_close(per_image[1], torch.tensor([[0.0, 0.0, 4.0, 5.0], [1.0, 2.0, 1.5, 5.0], [3.0, 3.0, 4.0, 5.0]]))
    assert B.remove_small_boxes(boxes, 1.0).tolist() == [0, 2]
    assert B.remove_small_boxes(boxes, 5.0).tolist() == [0, 2]
    assert B.remove_small_boxes(boxes, 5.01).tolist() == [0]


@pytest.mark.parametrize("weights", [B.RPN_WEIGHTS, B.ROI_HEADS_WEIGHTS])
def test_encode_matches_formula_and_decode_inverts(weights):
    gen = torch.Generator().manual_seed(1)
    gt, props = _rand_boxes(gen, 6).double(), _rand_boxes(gen, 6).double()
    codes = B.encode(gt, props, weights)
    wx, wy, ww, wh = weights
    for k in range(6):
        gx1, gy1, gx2, gy2 = gt[k].tolist()
        px1, py1, px2, py2 = props[k].tolist()
        pw, ph = px2 - px1, py2 - py1
        want = [wx * ((gx1 + gx2) / 2 - (px1 + px2) / 2) / pw, wy * ((gy1 + gy2) / 2 - (py1 + py2) / 2) / ph,
                ww * math.log((gx2 - gx1) / pw), wh * math.log((gy2 - gy1) / ph)]
        torch.testing.assert_close(codes[k], torch.tensor(want, dtype=torch.float64))
    torch.testing.assert_close(B.decode(codes, props, weights), gt)


def test_decode_per_class_layout_and_clip():
    anchor = torch.tensor([[0.0, 0.0, 10.0, 20.0]])
    # two classes: a zero code keeps the box; a huge dw is clamped at log(1000/16)
    codes = torch.tensor([[0.0, 0.0, 0.0, 0.0, 10.0, 0.0, 100.0, 0.0]])
    out = B.decode(codes, anchor, weights=(10.0, 10.0, 5.0, 5.0))
    assert out.shape == (1, 8)
    torch.testing.assert_close(out[0, :4], anchor[0])
    w = 10.0 * 1000 / 16  # exp(clip) * width
    torch.testing.assert_close(out[0, 4:], torch.tensor([15.0 - w / 2, 0.0, 15.0 + w / 2, 20.0]))
