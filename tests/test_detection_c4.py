"""C4 Faster R-CNN (fpn.enabled=False: RPN and RoIAlign on res4, res5 as the box head) against
torchvision's parts assembled that way (tests/fixtures/detection/make_c4_fixture.py: seeded
weights, FrozenBatchNorm2d, eval mode): names, proposals, detections; loaded through the weights
path a torchvision checkpoint takes; and a C4 detection run through main.py."""
import importlib.util
import json
import pathlib

import pytest
import torch

from fpipe import defaults, tree
from fpipe.detection import model as det_model
from fpipe.detection import pretrained, train
from test_detection_model import assert_predicts_as_torchvision
from test_detection_train import main

HERE = pathlib.Path(__file__).resolve().parent / "fixtures" / "detection"
C4_ARGS = ["--config.model.detection.fpn.enabled=False", "--config.model.detection.backbone.features=('res4',)",
           "--config.model.detection.rpn.anchor_sizes=((16, 32, 64, 128),)",
           "--config.model.detection.rpn.aspect_ratios=((0.5, 1.0, 2.0),)",
           "--config.model.detection.box_head.pooler_resolution=14",
           "--config.model.detection.box_head.pooler_sampling_ratio=0"]


@pytest.fixture(scope="module")
def facts():
    return torch.load(HERE / "c4_facts.pt", weights_only=True)


def c4_config(facts, **rpn):
    cfg = train.model_config(defaults.detection_model())
    cfg.fpn.enabled, cfg.backbone.features = False, ("res4",)
    cfg.rpn.anchor_sizes, cfg.rpn.aspect_ratios = facts["anchor_sizes"], facts["aspect_ratios"]
    cfg.box_head.pooler_resolution = facts["pooler"]["output_size"]
    cfg.box_head.pooler_sampling_ratio = facts["pooler"]["sampling_ratio"]
    o = facts["options"]
    cfg.rpn.pre_nms_top_n_test, cfg.rpn.post_nms_top_n_test = o["rpn_pre_nms_top_n_test"], o["rpn_post_nms_top_n_test"]
    cfg.box_head.detections_per_img = o["box_detections_per_img"]
    for k, v in rpn.items():
        cfg[k] = v
    return cfg


@pytest.fixture(scope="module")
def loaded(facts, tmp_path_factory):
    """The seeded weights saved as a torchvision checkpoint (no counters) and loaded as main.py does."""
    spec = importlib.util.spec_from_file_location("seeded_weights", HERE / "seeded_weights.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    sd = mod.seeded_state_dict(facts["manifest"], facts["seed"], facts["scales"], facts["add"])
    path = tmp_path_factory.mktemp("c4") / "fasterrcnn_resnet50_c4.pth"
    torch.save(sd, path)
    model = det_model.build(c4_config(facts), 91)
    params, state = model.init(0)
    weights = defaults.weights()
    weights.path = str(path)
    params, state, provenance = pretrained.initial_weights(params, state, weights, str(path.parent))
    assert provenance["part"] == "model" and provenance["trunk_loaded"] == provenance["trunk_total"] == len(sd)
    return model, params, state


def test_c4_names_and_shapes_equal_torchvisions_parts(facts):
    params, state = det_model.build(c4_config(facts), 91).init(0)
    ours = {n: tuple(t.shape) for n, t in {**tree.flatten(params), **tree.flatten(state)}.items()
            if not n.endswith("num_batches_tracked")}
    assert ours == {n: tuple(s) for n, s, _ in facts["manifest"]}
    assert "layer4" not in params["backbone"]["body"] and "fpn" not in params["backbone"]


def test_c4_proposals_and_detections_equal_torchvision(facts, loaded):
    _, params, state = loaded
    model_facts = torch.load(HERE / "model_facts.pt", weights_only=True)  # the images and their batch
    assert torch.equal(model_facts["image_sizes"], facts["image_sizes"])
    assert_predicts_as_torchvision(c4_config(facts), params, state, model_facts["batch"], facts["image_sizes"],
                                   facts["original_sizes"], facts)


def test_c4_options_are_checked():
    cfg = train.model_config(defaults.detection_model())
    cfg.fpn.enabled = False
    with pytest.raises(ValueError, match=r"backbone.features=\('res4',\)"):
        det_model.build(cfg, 3)
    cfg.backbone.features = ("res4",)
    with pytest.raises(ValueError, match="one entry each"):
        det_model.build(cfg, 3)
    cfg.rpn.anchor_sizes, cfg.rpn.aspect_ratios = ((32, 64),), ((1.0,),)
    cfg.mask_head.enabled = True
    with pytest.raises(NotImplementedError, match="mask / keypoint heads on a C4 model"):
        det_model.build(cfg, 3)
    cfg.mask_head.enabled, cfg.backbone.frozen_norms = False, False
    with pytest.raises(NotImplementedError, match="frozen_norms=False"):
        det_model.build(cfg, 3)
    cfg.backbone.frozen_norms, cfg.backbone.freeze_at = True, 5
    model = det_model.build(cfg, 3)
    rules = model.freeze_rules(None)
    assert r"roi_heads\.box_head\.(layer4\..*)" in rules  # freeze_at=5 reaches res5, now the box head
    assert any(r.startswith(r"roi_heads\.box_head\.(layer4\.0\.bn1") for r in rules)  # its frozen norms


def test_a_c4_run_trains_res5_in_the_box_head(tmp_path):
    """main.py with fpn.enabled=False (the shipped ResNet-18 with GroupNorm): a few steps, COCO AP,
    the res5 box head's weights trained and checkpointed under roi_heads.box_head.layer4."""
    main(tmp_path, *C4_ARGS, "--config.total_steps=3", "--config.ckpt_steps=3")
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["step"] == 3 and 0 <= results["heads"]["bbox"]["AP"] <= 100
    ckpt = torch.load(tmp_path / "checkpoints" / "ckpt_00000003.pt", weights_only=True)
    name = "roi_heads.box_head.layer4.0.conv1.weight"
    assert name in ckpt["params"] and not any(n.startswith("backbone.body.layer4") for n in ckpt["params"])
    from configs import detection
    cfg = train.model_config(detection.get_config().model.detection)
    cfg.fpn.enabled, cfg.backbone.features = False, ("res4",)
    cfg.rpn.anchor_sizes, cfg.rpn.aspect_ratios = ((16, 32, 64, 128),), ((0.5, 1.0, 2.0),)
    init, _ = det_model.build(cfg, 4).init(0)
    assert not torch.equal(ckpt["params"][name], tree.flatten(init)[name])
    lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(l["loss"] == l["loss"] for l in lines if "loss" in l)  # finite (not NaN)


def test_a_classification_checkpoint_fills_the_body_and_res5_in_the_box_head(tmp_path):
    """An ImageNet ResNet file for a C4 model: layer4 goes to roi_heads.box_head (never left random)."""
    from fpipe.models import resnet
    cfg = train.model_config(defaults.detection_model())
    cfg.backbone.name, cfg.fpn.enabled, cfg.backbone.features = "resnet18", False, ("res4",)
    cfg.rpn.anchor_sizes, cfg.rpn.aspect_ratios = ((32, 64),), ((1.0,),)
    params, state = det_model.build(cfg, 3).init(0)
    trunk_params, trunk_state = resnet.init(7, depth=18)
    file = {**tree.flatten(trunk_params), **tree.flatten(trunk_state)}
    torch.save(file, tmp_path / "resnet18.pth")
    weights = defaults.weights()
    weights.path = str(tmp_path / "resnet18.pth")
    new_params, new_state, provenance = pretrained.initial_weights(params, state, weights, str(tmp_path))
    assert provenance["part"] == "backbone.body + roi_heads.box_head.layer4"
    assert provenance["trunk_loaded"] == provenance["trunk_total"] == len([n for n in file if "num_batches" not in n])
    ours = {**tree.flatten(new_params["backbone"]["body"]), **tree.flatten(new_state["backbone"]["body"])}
    ours.update({f"layer4.{n}": t for n, t in {**tree.flatten(new_params["roi_heads"]["box_head"]["layer4"]),
                                               **tree.flatten(new_state["roi_heads"]["box_head"]["layer4"])}.items()})
    assert ours.keys() == file.keys() and all(torch.equal(ours[k], file[k]) for k in file)
    assert torch.equal(new_params["roi_heads"]["box_predictor"]["cls_score"]["weight"],
                       params["roi_heads"]["box_predictor"]["cls_score"]["weight"])
