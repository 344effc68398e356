"""fpipe.detection against facts that torchvision 0.29.1 computed on the same seeded inputs.

The facts come from tests/fixtures/detection/make_fixtures.py, run by hand in a separate venv;
nothing here imports torchvision.
"""
import pathlib

import pytest
import torch

from fpipe.detection import anchors as A
from fpipe.detection import boxes as B
from fpipe.detection import matching as M
from fpipe.detection import nms as N
from fpipe.detection import roi_align as R

FACTS = pathlib.Path(__file__).resolve().parent / "fixtures" / "detection" / "torchvision_facts.pt"


@pytest.fixture(scope="module")
def facts():
    return torch.load(FACTS, weights_only=True)


def test_facts_come_from_torchvision_029(facts):
    assert facts["versions"][1].startswith("0.29.1")


def test_boxes(facts):
    f = facts["boxes"]
    assert torch.equal(B.box_iou(f["a"], f["b"]), f["iou"])
    assert torch.equal(B.remove_small_boxes(f["props"], 10.0), f["small"])
    assert torch.equal(B.clip_boxes_to_image(f["props"] * 1.5 - 10, (50, 70)), f["clipped"])
    # encode/decode: equal to a few float32 ulps (their vectorised log/exp/div round differently on
    # AVX2 and AVX-512 CPUs: the fixtures came from one, CI may run on the other; 1 ulp seen).
    for name, weights in (("rpn", B.RPN_WEIGHTS), ("roi", B.ROI_HEADS_WEIGHTS)):
        torch.testing.assert_close(B.encode(f["gt"], f["props"], weights), f[f"encoded_{name}"], rtol=5e-7, atol=5e-7)
        torch.testing.assert_close(B.decode(f["codes"], f["props"], weights), f[f"decoded_{name}"], rtol=5e-7, atol=5e-7)


@pytest.mark.parametrize("case", ["even", "odd", "multi"])
def test_anchors(facts, case):
    f = facts["anchors"][case]
    grids = [tuple(g) for g in f["grids"].tolist()]
    if case == "multi":
        got = A.anchors_for_levels(tuple(f["image"].tolist()), grids, ((16, 40),), ((0.25, 1.0, 3.0),))
    else:
        got = A.anchors_for_levels(tuple(f["image"].tolist()), grids)
    assert torch.equal(got, f["anchors"])


@pytest.mark.parametrize("name,args", [("rpn", (0.7, 0.3, True)), ("roi", (0.5, 0.5, False)),
                                       ("mid", (0.6, 0.2, False))])
def test_matcher(facts, name, args):
    f = facts["matcher"]
    assert torch.equal(M.match(f["quality"], *args), f[name])


@pytest.mark.parametrize("case", ["float", "ties", "vanilla"])
def test_nms(facts, case):
    f = facts["nms"][case]
    for thr in (0.3, 0.5, 0.7):
        assert torch.equal(N.nms(f["boxes"], f["scores"], thr), f[f"keep_{thr}"])
    got = N.batched_nms(f["boxes"], f["scores"], f["idxs"], 0.5)
    # above 4000 coordinates torchvision loops over classes and sorts unstably: compare as sets
    # there, and check the order by score (ours breaks ties by index)
    assert sorted(got.tolist()) == sorted(f["batched"].tolist())
    assert torch.equal(f["scores"][got], f["scores"][f["batched"]])
    idx, ok = N.nms_padded(f["boxes"], f["scores"], 0.5, 400)
    assert torch.equal(idx[ok], f["keep_0.5"][:400])


def test_roi_align(facts):
    f = facts["roi_align"]
    assert len(f["cases"]) == 12
    for case in f["cases"]:
        feat = f["features"].clone().requires_grad_(True)
        out = R.roi_align(feat, f["rois"], case["size"], 0.25, case["ratio"], case["aligned"])
        torch.testing.assert_close(out, case["out"], rtol=1e-5, atol=1e-6)
        (out * case["grad_out"]).sum().backward()
        torch.testing.assert_close(feat.grad, case["grad"], rtol=1e-5, atol=1e-5)


def test_multiscale_roi_align(facts):
    f = facts["multiscale"]
    shapes = [tuple(s) for s in f["image_shapes"].tolist()]
    out = R.multiscale_roi_align(f["features"], f["boxes"], shapes, output_size=7, sampling_ratio=2)
    torch.testing.assert_close(out, f["out"], rtol=1e-5, atol=1e-6)
