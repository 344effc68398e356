"""fpipe.detection.fpn: torchvision's names and shapes, its outputs on seeded weights, its init."""
import math
import pathlib

import pytest
import torch

from fpipe import tree
from fpipe.detection import fpn
from fpipe.models import resnet

FACTS = pathlib.Path(__file__).resolve().parent / "fixtures" / "detection" / "torchvision_facts.pt"


@pytest.fixture(scope="module")
def facts():
    return torch.load(FACTS, weights_only=True)["fpn_rpn"]


def _names(facts, prefix):
    return {n[len(prefix):]: s for n, s in zip(facts["fasterrcnn_names"], facts["fasterrcnn_shapes"])
            if n.startswith(prefix)}


def test_names_and_shapes_equal_fasterrcnn_resnet50_fpn(facts):
    params, state = fpn.init(0, [256, 512, 1024, 2048], 256)
    assert state == {}
    ours = {n: tuple(v.shape) for n, v in tree.flatten(params).items()}
    assert ours == _names(facts, "backbone.fpn.")
    assert len(ours) == 16


def test_resnet50_trunk_names_are_the_body(facts):
    params, state = resnet.init(0, depth=50)
    ours = {n: tuple(v.shape) for n, v in (tree.flatten(params) | tree.flatten(state)).items()}
    assert ours == _names(facts, "backbone.body.")
    # the pretrained layout's FrozenBatchNorm2d has no num_batches_tracked: a loader must skip them
    pretrained = {n[len("backbone.body."):] for n in facts["fasterrcnn_pretrained_layout_names"]
                  if n.startswith("backbone.body.")}
    assert pretrained == {n for n in ours if not n.endswith("num_batches_tracked")}


def test_outputs_equal_torchvision_on_its_weights(facts):
    params = tree.unflatten(dict(facts["fpn_state"]))
    outs, _ = fpn.apply(params, {}, facts["fpn_in"])
    assert facts["fpn_names"] == ["0", "1", "2", "3", "pool"] and len(outs) == 5
    for got, want in zip(outs, facts["fpn_out"]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert outs[3].shape[-2:] == (3, 3) and outs[2].shape[-2:] == (4, 5)  # nearest at 3 -> 4, 5


def test_init_is_kaiming_uniform_a1_with_zero_bias():
    params, _ = fpn.init(3, [64, 128], 32)
    w = params["layer_blocks"]["1"]["0"]["weight"]
    bound = math.sqrt(3.0 / (32 * 9))
    assert w.abs().max() <= bound and w.abs().max() > 0.95 * bound
    assert abs(float(w.std()) - bound / math.sqrt(3)) < 0.05 * bound
    assert all(float(b.abs().sum()) == 0 for n, b in tree.flatten(params).items() if n.endswith("bias"))
    again, _ = fpn.init(3, [64, 128], 32)
    assert all(torch.equal(a, b) for a, b in zip(tree.leaves(params), tree.leaves(again)))


def test_level_count_is_checked():
    params, _ = fpn.init(0, [4, 8], 4)
    with pytest.raises(ValueError, match="2 levels got 1"):
        fpn.apply(params, {}, [torch.zeros(1, 4, 4, 4)])
