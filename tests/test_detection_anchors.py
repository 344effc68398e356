"""fpipe.detection.anchors against a loop over cells and the well-known FPN base anchors."""
import math

import pytest
import torch

from fpipe.detection import anchors as A


def test_cell_anchors_known_values():
    # torchvision's level-0 FPN anchors (size 32; ratios 0.5, 1, 2 = height / width), rounded
    torch.testing.assert_close(A.cell_anchors((32,), (0.5, 1.0, 2.0)),
                               torch.tensor([[-23.0, -11.0, 23.0, 11.0], [-16.0, -16.0, 16.0, 16.0],
                                             [-11.0, -23.0, 11.0, 23.0]]))
    # several sizes at one level: ratio-major, then size
    got = A.cell_anchors((16, 64), (1.0, 4.0))
    torch.testing.assert_close(got, torch.tensor([[-8.0, -8.0, 8.0, 8.0], [-32.0, -32.0, 32.0, 32.0],
                                                  [-4.0, -16.0, 4.0, 16.0], [-16.0, -64.0, 16.0, 64.0]]))


def _ref_anchors(image_size, grid_sizes, sizes, ratios):
    out = []
    for (gh, gw), ss, rr in zip(grid_sizes, sizes, ratios):
        sh, sw = image_size[0] // gh, image_size[1] // gw
        base = []
        for r in rr:
            for s in ss:
                w, h = s / math.sqrt(r), s * math.sqrt(r)
                base.append([round(-w / 2), round(-h / 2), round(w / 2), round(h / 2)])
        for y in range(gh):
            for x in range(gw):
                for b in base:
                    out.append([x * sw + b[0], y * sh + b[1], x * sw + b[2], y * sh + b[3]])
    return torch.tensor(out, dtype=torch.float32)


@pytest.mark.parametrize("image_size,grids", [((64, 96), ((16, 24), (8, 12), (4, 6), (2, 3), (1, 2))),
                                              ((50, 70), ((13, 18), (7, 9), (4, 5), (2, 3), (1, 2)))])
def test_anchors_for_levels_match_cell_major_loop(image_size, grids):
    got = A.anchors_for_levels(image_size, grids)
    ref = _ref_anchors(image_size, grids, A.FPN_SIZES, A.FPN_ASPECT_RATIOS)
    assert got.shape == ref.shape == (sum(h * w for h, w in grids) * 3, 4)
    torch.testing.assert_close(got, ref, rtol=0, atol=0)


def test_anchor_count_check():
    with pytest.raises(ValueError, match="feature levels"):
        A.anchors_for_levels((64, 64), ((8, 8),))
    assert A.num_anchors_per_location() == [3] * 5
