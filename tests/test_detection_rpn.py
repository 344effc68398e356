"""fpipe.detection.rpn: torchvision's names and shapes, its outputs in the anchors' order, its init."""
import pathlib

import pytest
import torch

from fpipe import tree
from fpipe.detection import anchors as A
from fpipe.detection import proposals as P
from fpipe.detection import rpn

FACTS = pathlib.Path(__file__).resolve().parent / "fixtures" / "detection" / "torchvision_facts.pt"


@pytest.fixture(scope="module")
def facts():
    return torch.load(FACTS, weights_only=True)["fpn_rpn"]


def test_names_and_shapes_equal_fasterrcnn_resnet50_fpn(facts):
    params, state = rpn.init(0, 256, 3)
    ours = {n: tuple(v.shape) for n, v in tree.flatten(params).items()}
    theirs = {n[len("rpn.head."):]: s for n, s in zip(facts["fasterrcnn_names"], facts["fasterrcnn_shapes"])
              if n.startswith("rpn.head.")}
    assert ours == theirs and state == {}
    assert set(ours) == {"conv.0.0.weight", "conv.0.0.bias", "cls_logits.weight", "cls_logits.bias",
                         "bbox_pred.weight", "bbox_pred.bias"}


def test_outputs_equal_torchvision_flattened_cell_major(facts):
    params = tree.unflatten(dict(facts["rpn_state"]))
    (logits, deltas), _ = rpn.apply(params, {}, facts["fpn_out"])
    want_logits, want_deltas = [], []
    for lg, dl in zip(facts["rpn_logits"], facts["rpn_deltas"]):  # per level [N, A, H, W], [N, 4A, H, W]
        n, a, h, w = lg.shape
        for y in range(h):
            for x in range(w):
                for k in range(a):
                    want_logits.append(lg[:, k, y, x])
                    want_deltas.append(dl[:, 4 * k:4 * k + 4, y, x])
    torch.testing.assert_close(logits, torch.stack(want_logits, 1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(deltas, torch.stack(want_deltas, 1), rtol=1e-5, atol=1e-5)


def test_init_normal_001_and_depth():
    params, _ = rpn.init(1, 64, 3, conv_depth=2)
    assert set(params["conv"]) == {"0", "1"}
    w = params["conv"]["1"]["0"]["weight"]
    assert abs(float(w.std()) - 0.01) < 0.001 and float(params["bbox_pred"]["bias"].abs().sum()) == 0


def test_head_anchors_and_proposals_chain_like_torchvision_rpn(facts):
    params = tree.unflatten(dict(facts["rpn_forward_state"]))
    features = facts["fpn_out"]
    (logits, deltas), _ = rpn.apply(params, {}, features)
    grids = [tuple(f.shape[-2:]) for f in features]
    anchors = A.anchors_for_levels(tuple(facts["rpn_image_size"].tolist()), grids)
    per_level = [h * w * 3 for h, w in grids]
    shapes = [tuple(s) for s in facts["rpn_image_sizes"].tolist()]
    boxes, scores, valid = P.propose(logits, deltas, anchors, shapes, per_level, 50, 40, 0.7)
    want = facts["rpn_proposals"][0]
    assert int(valid.sum()) == len(want) == 40
    torch.testing.assert_close(boxes[0], want, rtol=1e-5, atol=1e-4)
