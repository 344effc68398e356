"""fpipe.detection.pretrained: torchvision's detection checkpoints (FrozenBatchNorm2d layout, no
num_batches_tracked) load as whole models and predict as torchvision did; gaps and other shapes
are one-line errors; a classification checkpoint still goes to backbone.body."""
import importlib.util
import json
import pathlib

import pytest
import torch

import _forked_main as forked_main
from fpipe import defaults, tree
from fpipe.detection import model as det_model
from fpipe.detection import coco_eval, pretrained, train
from fpipe.weights import WeightsError

HERE = pathlib.Path(__file__).resolve().parent / "fixtures" / "detection"


@pytest.fixture(scope="module")
def facts():
    return torch.load(HERE / "model_facts.pt", weights_only=True)


def _r50_config(facts):
    """torchvision's fasterrcnn_resnet50_fpn keys, with the fixture's test-time sizes."""
    cfg = train.model_config(defaults.detection_model())
    o = facts["options"]
    cfg.rpn.pre_nms_top_n_test, cfg.rpn.post_nms_top_n_test = o["rpn_pre_nms_top_n_test"], o["rpn_post_nms_top_n_test"]
    cfg.box_head.detections_per_img = o["box_detections_per_img"]
    return cfg


@pytest.fixture(scope="module")
def drawn(facts):
    """fasterrcnn_resnet50_fpn's tensors in the layout of torchvision's COCO checkpoints: its names,
    FrozenBatchNorm2d (no num_batches_tracked), the fixture's seeded values before its ``add``."""
    spec = importlib.util.spec_from_file_location("seeded_weights", HERE / "seeded_weights.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    sd = mod.seeded_state_dict(facts["manifest"], facts["seed"], facts["scales"])
    return {n: t for n, t in sd.items() if not n.endswith("num_batches_tracked")}


def _with(drawn, add):
    """The values seeded_state_dict gives with ``add`` (added after drawing and scaling, as there)."""
    return {**drawn, **{n: drawn[n] + v for n, v in add.items()}}


@pytest.fixture(scope="module")
def coco_file(facts, drawn, tmp_path_factory):
    """model_facts' weights as torchvision's COCO checkpoint layout, saved by torch.save."""
    sd = _with(drawn, facts["add"])
    path = tmp_path_factory.mktemp("coco") / "fasterrcnn_resnet50_fpn_coco.pth"
    torch.save(sd, path)
    return path, sd


def _weights(path, **changes):
    cfg = defaults.weights()
    cfg.path = str(path)
    for k, v in changes.items():
        cfg[k] = v
    return cfg


def test_torchvision_coco_layout_loads_whole_and_predicts_as_torchvision(facts, coco_file, tmp_path):
    path, sd = coco_file
    model = det_model.build(_r50_config(facts), 91)  # 91: COCO's category ids + background, as torchvision
    params, state = model.init(0)
    counters = {n: t.clone() for n, t in tree.flatten(state).items() if n.endswith("num_batches_tracked")}
    assert counters  # the R50 body has BatchNorms, whose counters the file lacks
    params, state, provenance = pretrained.initial_weights(params, state, _weights(path), str(tmp_path))
    assert provenance["part"] == "model" and provenance["trunk_loaded"] == provenance["trunk_total"] == len(sd)
    flat = {**tree.flatten(params), **tree.flatten(state)}
    assert all(torch.equal(flat[n], t) for n, t in sd.items())
    assert all(torch.equal(flat[n], t) for n, t in counters.items())  # init's counters, kept
    report = (tmp_path / "weights_report.txt").read_text()
    assert f"{len(counters)} num_batches_tracked counter(s) kept at the model's initial values" in report
    assert "MISSING" not in report

    dets = model.predict(params, state, facts["batch"], facts["image_sizes"])
    assert [len(d["boxes"]) for d in dets] == [len(d["boxes"]) for d in facts["resized"]] == [30, 30]
    for got, want in zip(dets, facts["resized"]):
        assert torch.equal(got["labels"], want["labels"])
        torch.testing.assert_close(got["scores"], want["scores"], rtol=1e-3, atol=1e-4)
        torch.testing.assert_close(got["boxes"], want["boxes"], rtol=1e-4, atol=1e-2)


# ---------------------------------------------------------------------------- a small model for the errors
def _small(num_classes=4, seed=0):
    cfg = defaults.detection_model()
    cfg.backbone.name, cfg.fpn.out_channels, cfg.box_head.representation_size = "resnet18", 16, 32
    model = det_model.build(train.model_config(cfg), num_classes)
    return model, *model.init(seed)


def _file(params, state, drop=()):
    flat = {**tree.flatten(params), **tree.flatten(state)}
    return {n: t for n, t in flat.items() if not n.endswith("num_batches_tracked") and n not in drop}


def test_a_reference_scripts_checkpoint_loads_from_its_model_entry(tmp_path):
    """torchvision's references/detection save {"model": state_dict, "optimizer": …, "epoch": …}."""
    _, params, state = _small()
    _, p1, s1 = _small(seed=1)
    torch.save({"model": _file(p1, s1), "optimizer": {"state": {}}, "epoch": 25}, tmp_path / "ref.pth")
    new_params, _, provenance = pretrained.initial_weights(params, state, _weights(tmp_path / "ref.pth"), str(tmp_path))
    assert provenance["source"] == "state_dict_key='model'"
    assert all(torch.equal(a, b) for a, b in zip(tree.leaves(new_params), tree.leaves(p1)))


def test_a_missing_weight_is_a_one_line_error_naming_it(tmp_path):
    _, params, state = _small()
    missing = ("roi_heads.box_head.fc6.weight", "rpn.head.cls_logits.bias")
    torch.save(_file(params, state, drop=missing), tmp_path / "gap.pth")
    with pytest.raises(WeightsError) as e:
        pretrained.initial_weights(params, state, _weights(tmp_path / "gap.pth"), str(tmp_path))
    assert "\n" not in str(e.value)
    assert "2 tensor(s) of the detection model are not in the file" in str(e.value)
    assert all(n in str(e.value) for n in missing)
    # allow_partial accepts the gap: those two keep their initialisation
    out, _, _ = pretrained.initial_weights(params, state, _weights(tmp_path / "gap.pth", allow_partial=True),
                                           str(tmp_path))
    assert torch.equal(out["rpn"]["head"]["cls_logits"]["bias"], params["rpn"]["head"]["cls_logits"]["bias"])


def test_another_shape_is_a_one_line_error_and_skip_layers_keeps_chosen_weights_at_init(tmp_path):
    _, params, state = _small(num_classes=4)
    _, p5, s5 = _small(num_classes=5, seed=1)
    torch.save(_file(p5, s5), tmp_path / "five.pth")
    with pytest.raises(WeightsError) as e:
        pretrained.initial_weights(params, state, _weights(tmp_path / "five.pth"), str(tmp_path))
    assert "\n" not in str(e.value)
    assert "roi_heads.box_predictor.cls_score.weight: file [5, 32] vs model [4, 32]" in str(e.value)
    # fine-tuning on other classes: the predictor stays at its init on purpose, everything else loads
    cfg = _weights(tmp_path / "five.pth", skip_layers=("num_batches_tracked", "roi_heads.box_predictor."))
    out, _, _ = pretrained.initial_weights(params, state, cfg, str(tmp_path))
    assert torch.equal(out["roi_heads"]["box_predictor"]["cls_score"]["weight"],
                       params["roi_heads"]["box_predictor"]["cls_score"]["weight"])
    assert torch.equal(out["roi_heads"]["box_head"]["fc6"]["weight"], p5["roi_heads"]["box_head"]["fc6"]["weight"])
    assert "kept at their initialisation by skip_layers" in (tmp_path / "weights_report.txt").read_text()


def test_an_fpipe_detection_checkpoint_loads_whole(tmp_path):
    _, params, state = _small()
    _, p1, s1 = _small(seed=1)
    torch.save({"params": tree.flatten(p1), "model_state": tree.flatten(s1), "step": 3}, tmp_path / "ckpt.pt")
    new_params, new_state, provenance = pretrained.initial_weights(params, state, _weights(tmp_path / "ckpt.pt"),
                                                                   str(tmp_path))
    assert provenance["part"] == "model"
    assert all(torch.equal(a, b) for a, b in zip(tree.leaves(new_params), tree.leaves(p1)))


def test_a_classification_checkpoint_loads_into_backbone_body(tmp_path):
    """A torchvision-named ResNet-18 file lands in backbone.body (params and BN statistics), nothing else moves."""
    from fpipe.models import resnet
    _, params, state = _small()
    trunk_params, trunk_state = resnet.init(7, depth=18)
    file = {**tree.flatten(trunk_params), **tree.flatten(trunk_state)}
    torch.save(file, tmp_path / "resnet18.pth")
    new_params, new_state, provenance = pretrained.initial_weights(params, state, _weights(tmp_path / "resnet18.pth"),
                                                                   str(tmp_path))
    body = {**tree.flatten(new_params["backbone"]["body"]), **tree.flatten(new_state["backbone"]["body"])}
    assert body.keys() == file.keys() and all(torch.equal(body[k], file[k]) for k in file)
    assert provenance["part"] == "backbone.body" and provenance["trunk_loaded"] == provenance["trunk_total"] > 0
    assert torch.equal(new_params["rpn"]["head"]["cls_logits"]["weight"], params["rpn"]["head"]["cls_logits"]["weight"])
    assert (tmp_path / "weights_report.txt").exists()


def test_a_coco_run_with_category_id_labels_scores_a_torchvision_checkpoint_as_torchvision(facts, drawn, tmp_path):
    """main.py end to end: configs/detection.py:coco_torchvision (data.labels=category_id: 91
    classes), a COCO-format split on disk, torchvision's checkpoint layout, total_steps=0: the COCO
    AP of torchvision's own detections (coco_facts.pt, make_coco_fixture.py), whose labels are
    category ids (those without a category, here 4, are no results)."""
    from PIL import Image
    cf = torch.load(HERE / "coco_facts.pt", weights_only=True)
    assert (cf["seed"], cf["scales"], cf["options"]) == (facts["seed"], facts["scales"], facts["options"])
    root = tmp_path / "coco"
    (root / "annotations").mkdir(parents=True)
    for split in ("train", "val"):
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(cf["coco"]))
        (root / split).mkdir()
        for info, image in zip(cf["coco"]["images"], cf["images"]):
            Image.fromarray(image.permute(1, 2, 0).numpy()).save(root / split / info["file_name"])
    torch.save(_with(drawn, cf["add"]), tmp_path / "fasterrcnn_resnet50_fpn_coco.pth")
    o = cf["options"]
    cmd = ["--config=configs/detection.py:coco_torchvision", f"--workdir={tmp_path / 'run'}",
           f"--config.data.root={root}", "--config.data.train_split=train", "--config.data.test_split=val",
           f"--config.data.min_size={o['min_size']}", f"--config.data.max_size={o['max_size']}",
           "--config.data.batch_size=2", "--config.data.eval_batch_size=2", "--config.num_threads=1",
           f"--config.model.detection.rpn.pre_nms_top_n_test={o['rpn_pre_nms_top_n_test']}",
           f"--config.model.detection.rpn.post_nms_top_n_test={o['rpn_post_nms_top_n_test']}",
           f"--config.model.detection.box_head.detections_per_img={o['box_detections_per_img']}",
           f"--config.model.weights.path={tmp_path / 'fasterrcnn_resnet50_fpn_coco.pth'}", "--config.total_steps=0"]
    proc = forked_main.run(cmd, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["dataset"]["num_classes"] == 90 and results["dataset"]["labels"] == "category_id"
    assert results["weights"]["part"] == "model" and results["step"] == 0

    categories = {c["id"] for c in cf["coco"]["categories"]}
    theirs = [{"image_id": info["id"], "category_id": int(label), "score": float(score),
               "bbox": [x0, y0, x1 - x0, y1 - y0]}
              for info, d in zip(cf["coco"]["images"], cf["detections"])
              for (x0, y0, x1, y1), score, label in zip(d["boxes"].tolist(), d["scores"], d["labels"])
              if int(label) in categories]
    assert len(theirs) < sum(len(d["labels"]) for d in cf["detections"])  # label 4 has no category
    want = coco_eval.evaluate(coco_eval.from_dict(cf["coco"]), theirs, ("bbox",))["bbox"]
    assert 0 < want["AP"] < 100
    assert results["heads"]["bbox"] == want


def test_a_detectron2_detector_gives_its_backbone_only(tmp_path):
    """detectron2 names its RPN proposal_generator.rpn_head and its ResNet otherwise (though its
    roi_heads.box_predictor.* are torchvision's names): its ResNet loads into backbone.body."""
    import pickle

    from fpipe.models import resnet
    from test_weights_formats import to_detectron2
    _, params, state = _small()
    trunk_params, trunk_state = resnet.init(7, depth=18)
    file = {**tree.flatten(trunk_params), **tree.flatten(trunk_state)}
    model = {f"backbone.bottom_up.{k}": v for k, v in to_detectron2(file).items() if "num_batches" not in k}
    model["proposal_generator.rpn_head.objectness_logits.weight"] = torch.zeros(3, 256, 1, 1).numpy()
    model["roi_heads.box_predictor.cls_score.weight"] = torch.zeros(4, 32).numpy()
    with open(tmp_path / "model_final.pkl", "wb") as f:
        pickle.dump({"model": model, "__author__": "Detectron2 Model Zoo"}, f, protocol=2)
    new_params, _, provenance = pretrained.initial_weights(params, state, _weights(tmp_path / "model_final.pkl"),
                                                           str(tmp_path))
    assert provenance["part"] == "backbone.body" and provenance["trunk_loaded"] == provenance["trunk_total"]
    body = tree.flatten(new_params["backbone"]["body"])
    assert all(torch.equal(body[n], t) for n, t in tree.flatten(trunk_params).items())
    assert torch.equal(new_params["roi_heads"]["box_predictor"]["cls_score"]["weight"],
                       params["roi_heads"]["box_predictor"]["cls_score"]["weight"])
