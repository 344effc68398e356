"""The detection run end to end through main.py: a few steps of each head, results.json with COCO AP."""
import json
import pathlib
import sys

import pytest

import _forked_main as forked_main
from fpipe import defaults

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Tiny and quick: 64-px scenes, 6 steps, 8 test images, 20 proposals.
TINY = ["--config.data.num_train=16", "--config.data.num_test=4", "--config.data.min_side=48",
        "--config.data.max_side=64", "--config.data.min_size=64", "--config.data.max_size=64",
        "--config.data.batch_size=2", "--config.total_steps=6", "--config.log_steps=3", "--config.ckpt_steps=3",
        "--config.model.detection.rpn.pre_nms_top_n_test=50", "--config.model.detection.rpn.post_nms_top_n_test=20",
        "--config.model.detection.rpn.pre_nms_top_n_train=50", "--config.model.detection.rpn.post_nms_top_n_train=20"]


def main(workdir, *args, check=True):
    cmd = ["--config=configs/detection.py", f"--workdir={workdir}", *TINY, *args]
    proc = forked_main.run(cmd, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def test_mask_rcnn_run_writes_coco_ap_metrics_and_checkpoints(tmp_path):
    main(tmp_path, "--config.model.detection.mask_head.enabled=True", "--config.eval_steps=3")
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["heads"]) == {"bbox", "segm"}
    for head in results["heads"].values():
        assert {"AP", "AP50", "AP75"} <= set(head) and 0 <= head["AP"] <= 100
    assert results["dataset"]["name"] == "scenes" and results["step"] == 6
    lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines if "loss" in l] == [3, 6]
    assert all("loss_mask" in l and "loss_classifier" in l for l in lines if "loss" in l)
    assert [l["step"] for l in lines if "segm/test_AP" in l] == [3, 6]
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("ckpt_*.pt")) == ["ckpt_00000003.pt",
                                                                                    "ckpt_00000006.pt"]
    assert "| segm |" in (tmp_path / "results.md").read_text()


def test_keypoint_rcnn_run_trains_the_keypoint_head(tmp_path):
    main(tmp_path, "--config.model.detection.keypoint_head.enabled=True")
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["heads"]) == {"bbox", "keypoints"}
    lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any("loss_keypoint" in l for l in lines)


def test_bad_detection_config_is_refused_before_any_work(tmp_path):
    proc = main(tmp_path / "w", "--config.data.name=coco", "--config.data.root=/nonexistent", check=False)
    assert proc.returncode == 2 and "annotation file" in proc.stderr
    assert not (tmp_path / "w").exists()
    sys.path.insert(0, str(ROOT))
    from configs import detection
    from fpipe.detection import train
    from fpipe.train.config_check import ConfigError
    config = detection.get_config()
    config.best_metric = "segm/AP"  # no mask head
    with pytest.raises(ConfigError, match="bbox/test_AP"):
        train.check(config)
    config.best_metric, config.data.min_size = "bbox/AP", 200
    with pytest.raises(ConfigError, match="min_size=200 is above data.max_size=96"):
        train.check(config)
    config.data.min_size, config.compile = 96, True
    config.model.detection.mask_head.enabled = True
    with pytest.raises(ConfigError, match="mask_head.target_max_grid"):
        train.check(config)
    config.model.detection.mask_head.target_max_grid = 4
    train.check(config)
    config = detection.get_config()
    config.model.detection.backbone.name = "vit_b_16"  # the scenes' GroupNorm options do not fit a ViT
    with pytest.raises(ConfigError, match=r"model.detection.backbone .*configs/detection.py:vitdet"):
        train.check(config)
    train.check(detection.get_config("vitdet"))


def test_torch_free_defaults_equal_the_models():
    """fpipe.defaults.detection_model (what config files use) lists the model's options with its values."""
    from fpipe.detection import model
    assert defaults.detection_model().to_dict() == model.default_config().to_dict()


def test_model_config_takes_the_models_new_keys_and_refuses_unknown_ones():
    from fpipe.detection import train
    cfg = defaults.detection_model()
    cfg.rpn.nms_thresh = 0.6
    merged = train.model_config(cfg)
    assert merged.rpn.nms_thresh == 0.6 and merged.box_head.batch_size_per_image == 512
    cfg.rpn.nmsthresh = 0.6
    with pytest.raises(ValueError, match="rpn.nmsthresh is not a detection model option"):
        train.model_config(cfg)


def test_a_run_resumed_from_a_middle_checkpoint_ends_bit_identical(tmp_path):
    """Data by (epoch, step), RPN/RoI sampling by (seed, step, rank): resuming changes nothing."""
    import torch
    from _workdirs import rewound_copy
    args = ["--config.total_steps=3", "--config.ckpt_steps=2"]
    main(tmp_path / "straight", *args)
    ckpts = rewound_copy(tmp_path / "straight", tmp_path / "resumed", 2) / "checkpoints"
    proc = main(tmp_path / "resumed", *args)
    assert "Resumed at step 2 of 3" in proc.stderr
    a = torch.load(tmp_path / "straight" / "checkpoints" / "ckpt_00000003.pt", weights_only=True)
    b = torch.load(ckpts / "ckpt_00000003.pt", weights_only=True)
    assert a["params"].keys() == b["params"].keys()
    assert all(torch.equal(a["params"][k], b["params"][k]) for k in a["params"])
    results = [json.loads((tmp_path / w / "results.json").read_text())["heads"] for w in ("straight", "resumed")]
    assert results[0] == results[1]


def test_total_steps_0_evaluates_a_loaded_detection_checkpoint_as_the_run_that_wrote_it(tmp_path):
    """model.weights.path = a detection run's checkpoint (a whole model), total_steps=0: no training,
    the same COCO AP as that run's final evaluation; nothing but the results is written."""
    main(tmp_path / "trained", "--config.total_steps=2", "--config.ckpt_steps=2")
    ckpt = tmp_path / "trained" / "checkpoints" / "ckpt_00000002.pt"
    proc = main(tmp_path / "eval", "--config.total_steps=0", f"--config.model.weights.path={ckpt}")
    assert "evaluating the model as loaded" in proc.stderr
    trained, evaluated = (json.loads((tmp_path / w / "results.json").read_text()) for w in ("trained", "eval"))
    assert evaluated["heads"] == trained["heads"] and evaluated["step"] == 0
    assert evaluated["weights"]["part"] == "model"
    assert evaluated["weights"]["trunk_loaded"] == evaluated["weights"]["trunk_total"] > 0
    assert not (tmp_path / "eval" / "checkpoints").exists() or not any((tmp_path / "eval" / "checkpoints").iterdir())
    assert "whole detection model" in (tmp_path / "eval" / "weights_report.txt").read_text()
