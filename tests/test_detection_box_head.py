"""fpipe.detection.box_head: torchvision's roi_heads names and shapes, and the MLP written out."""
import pathlib

import torch

from fpipe import tree
from fpipe.detection import box_head

FACTS = pathlib.Path(__file__).resolve().parent / "fixtures" / "detection" / "torchvision_facts.pt"


def test_names_and_shapes_equal_fasterrcnn_resnet50_fpn():
    facts = torch.load(FACTS, weights_only=True)["fpn_rpn"]
    theirs = {n[len("roi_heads."):]: s for n, s in zip(facts["fasterrcnn_names"], facts["fasterrcnn_shapes"])
              if n.startswith("roi_heads.")}
    params, state = box_head.init(0)
    assert {n: tuple(v.shape) for n, v in tree.flatten(params).items()} == theirs and state == {}


def test_apply_is_two_relu_layers_then_two_linear_outputs():
    params, _ = box_head.init(1, in_channels=3 * 2 * 2, representation_size=5, num_classes=4)
    x = torch.randn(6, 3, 2, 2)
    (logits, deltas), _ = box_head.apply(params, {}, x)
    p = tree.flatten(params)
    h = x.reshape(6, 12) @ p["box_head.fc6.weight"].T + p["box_head.fc6.bias"]
    h = h.clamp(min=0) @ p["box_head.fc7.weight"].T + p["box_head.fc7.bias"]
    h = h.clamp(min=0)
    torch.testing.assert_close(logits, h @ p["box_predictor.cls_score.weight"].T + p["box_predictor.cls_score.bias"])
    torch.testing.assert_close(deltas, h @ p["box_predictor.bbox_pred.weight"].T + p["box_predictor.bbox_pred.bias"])
    assert logits.shape == (6, 4) and deltas.shape == (6, 16)
    # padded per-image layout [N, R, C, PH, PW] gives [N, R, classes]
    (batched, _), _ = box_head.apply(params, {}, x.view(2, 3, 3, 2, 2))
    torch.testing.assert_close(batched.view(6, 4), logits)
