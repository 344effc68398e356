"""fpipe.detection.model against torchvision's fasterrcnn_resnet50_fpn (seeded weights, eval mode,
facts from tests/fixtures/detection/make_model_fixture.py): transform, proposals, detections;
param names and shapes of the Faster / Mask / Keypoint R-CNN layouts."""
import importlib.util
import pathlib

import ml_collections
import pytest
import torch

from fpipe import tree
from fpipe.detection import model as det_model
from fpipe.detection import transform

HERE = pathlib.Path(__file__).resolve().parent / "fixtures" / "detection"


def _seeded():
    spec = importlib.util.spec_from_file_location("seeded_weights", HERE / "seeded_weights.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.seeded_state_dict


@pytest.fixture(scope="module")
def facts():
    return torch.load(HERE / "model_facts.pt", weights_only=True)


def _config(facts, **changes):
    cfg = det_model.default_config()
    o = facts["options"]
    cfg.rpn.pre_nms_top_n_test = o["rpn_pre_nms_top_n_test"]
    cfg.rpn.post_nms_top_n_test = o["rpn_post_nms_top_n_test"]
    cfg.box_head.detections_per_img = o["box_detections_per_img"]
    for k, v in changes.items():
        section, key = k.split("__")
        cfg[section][key] = v
    return cfg


def _names(manifest):
    return {n: tuple(s) for n, s, _ in manifest if not n.endswith("num_batches_tracked")}


@pytest.fixture(scope="module")
def loaded(facts):
    model = det_model.build(_config(facts), 91)
    params, state = model.init(0)
    sd = _seeded()(facts["manifest"], facts["seed"], facts["scales"], facts["add"])
    flat_p, flat_s = tree.flatten(params), tree.flatten(state)
    assert set(flat_p) | set(flat_s) == set(sd)  # torchvision's names, all of them
    params = tree.unflatten({n: sd[n] for n in flat_p})
    state = tree.unflatten({n: sd[n] for n in flat_s})
    return model, params, state


def test_transform_equals_generalized_rcnn_transform(facts):
    o = facts["options"]
    batch, sizes, _ = transform.transform(facts["images"], min_size=o["min_size"], max_size=o["max_size"])
    assert torch.equal(sizes, facts["image_sizes"])
    torch.testing.assert_close(batch, facts["batch"], rtol=0, atol=1e-6)


def test_names_and_shapes_equal_torchvision(facts):
    for kind, extra in (("manifest", {}), ("maskrcnn", {"mask_head__enabled": True}),
                        ("keypointrcnn", {"keypoint_head__enabled": True})):
        cfg = _config(facts, **extra)
        num_classes = 2 if kind == "keypointrcnn" else 91
        params, state = det_model.build(cfg, num_classes).init(0)
        ours = {n: tuple(v.shape) for n, v in {**tree.flatten(params), **tree.flatten(state)}.items()
                if not n.endswith("num_batches_tracked")}
        assert ours == _names(facts[kind]), kind


def test_proposals_and_detections_equal_torchvision(facts, loaded):
    model, params, state = loaded
    assert_predicts_as_torchvision(_config(facts), params, state, facts["batch"], facts["image_sizes"],
                                   [tuple(im.shape[-2:]) for im in facts["images"]], facts)


def assert_predicts_as_torchvision(cfg, params, state, batch, sizes, originals, facts, num_classes=91):
    """The proposals (``rpn_only``), the detections in the resized frame (labels equal, boxes 1e-2
    px, scores 1e-4) and back in the original images equal torchvision's ``facts``."""
    rpn_cfg = ml_collections.ConfigDict(cfg.to_dict())
    rpn_cfg.rpn_only = True
    proposals = det_model.build(rpn_cfg, num_classes).predict(params, state, batch, sizes)
    for got, want in zip(proposals, facts["proposals"]):
        assert got["boxes"].shape == want.shape
        torch.testing.assert_close(got["boxes"], want, rtol=1e-4, atol=1e-2)
    dets = det_model.build(cfg, num_classes).predict(params, state, batch, sizes)
    assert [len(d["boxes"]) for d in dets] == [len(d["boxes"]) for d in facts["resized"]] == [30, 30]
    for got, want in zip(dets, facts["resized"]):
        assert torch.equal(got["labels"], want["labels"])
        torch.testing.assert_close(got["scores"], want["scores"], rtol=1e-3, atol=1e-4)
        torch.testing.assert_close(got["boxes"], want["boxes"], rtol=1e-4, atol=1e-2)
    final = transform.postprocess(dets, sizes, originals)
    for got, want in zip(final, facts["detections"]):
        torch.testing.assert_close(got["boxes"], want["boxes"], rtol=1e-4, atol=1e-2)
