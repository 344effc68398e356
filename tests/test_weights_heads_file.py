"""``model.head_weights``: released linear heads (DINO's, dinov2's) load into the model's heads by
name, never leave a head at its init, and a run evaluating them reproduces the trained head."""
import json

import pytest
import torch

from fpipe import tree
from fpipe.weights import WeightsError, heads_file
from test_main import main


def target(*heads, width=12, classes=5):
    out = {"trunk.conv_proj.weight": torch.zeros(width, 3, 4, 4)}
    for name in heads:
        out |= {f"heads.{name}.weight": torch.zeros(classes, width), f"heads.{name}.bias": torch.zeros(classes)}
    return out


def dino_linear_file(path, w, b):
    """eval_linear.py's checkpoint.pth.tar: the DDP-wrapped LinearClassifier, its SGD state (momentum
    buffers of the same shapes as the weights), the scheduler and the best accuracy."""
    torch.save({"epoch": 100, "state_dict": {"module.linear.weight": w, "module.linear.bias": b},
                "optimizer": {"state": {0: {"momentum_buffer": torch.ones_like(w)},
                                        1: {"momentum_buffer": torch.ones_like(b)}},
                              "param_groups": [{"lr": 0.0, "params": [0, 1]}]},
                "scheduler": {"last_epoch": 100}, "best_acc": 77.0}, path)


def test_dinos_linear_weights_load_into_the_head_named_linear(tmp_path):
    w, b = torch.randn(5, 12), torch.randn(5)
    dino_linear_file(tmp_path / "linear.pth", w, b)
    out, report = heads_file.load_heads(target("linear"), {"path": str(tmp_path / "linear.pth")})
    assert torch.equal(out["heads.linear.weight"], w) and torch.equal(out["heads.linear.bias"], b)
    assert report.sources["heads.linear.weight"] == "state_dict.module.linear.weight"
    assert "optimizer.state.0.momentum_buffer" in report.not_loaded  # same shape, not a head tensor
    assert "trunk:" not in report.summary() and "heads: 2 tensors loaded" in report.summary()
    with pytest.raises(WeightsError, match=r"no tensor for heads\.other\.bias, heads\.other\.weight"):
        heads_file.load_heads(target("linear", "other"), {"path": str(tmp_path / "linear.pth")})  # none left random


def test_a_bare_weight_and_bias_go_to_the_only_head(tmp_path):
    """dinov2's hub heads (dinov2_vits14_linear_head.pth) are a bare nn.Linear state dict."""
    w, b = torch.randn(5, 12), torch.randn(5)
    torch.save({"weight": w, "bias": b}, tmp_path / "head.pth")
    out, _ = heads_file.load_heads(target("cls1_avgpool"), {"path": str(tmp_path / "head.pth")})
    assert torch.equal(out["heads.cls1_avgpool.weight"], w)
    with pytest.raises(WeightsError, match=r"no tensor for heads\.a\.bias, heads\.a\.weight.*'linear'"):
        heads_file.load_heads(target("a", "b"), {"path": str(tmp_path / "head.pth")})


def test_a_head_of_another_shape_is_refused_naming_both(tmp_path):
    torch.save({"weight": torch.randn(5, 24), "bias": torch.randn(5)}, tmp_path / "head.pth")
    with pytest.raises(WeightsError, match=r"heads\.h\.weight \[5, 12\] <- weight \[5, 24\].*feature"):
        heads_file.load_heads(target("h"), {"path": str(tmp_path / "head.pth")})


def test_two_file_tensors_for_one_head_tensor_are_refused(tmp_path):
    torch.save({"student": {"linear.weight": torch.randn(5, 12), "linear.bias": torch.randn(5)},
                "teacher": {"linear.weight": torch.randn(5, 12), "linear.bias": torch.randn(5)}}, tmp_path / "h.pth")
    with pytest.raises(WeightsError, match="both fit heads.linear"):
        heads_file.load_heads(target("linear"), {"path": str(tmp_path / "h.pth")})
    out, _ = heads_file.load_heads(target("linear"), {"path": str(tmp_path / "h.pth"), "state_dict_key": "teacher"})
    assert out["heads.linear.bias"].any()


def test_evaluating_a_released_head_reproduces_the_run_that_trained_it(tmp_path):
    """Train linear-eval heads (eval_mlp: BatchNorm statistics included), save them as a head file,
    then evaluate the same trunk with nothing to train and that file: the same accuracies."""
    main(tmp_path / "train", "--config.total_steps=6")
    trained = json.loads((tmp_path / "train" / "results.json").read_text())["heads"]
    ckpt = torch.load(sorted((tmp_path / "train" / "checkpoints").glob("ckpt_*.pt"))[-1], weights_only=True)
    heads = {n[len("heads."):]: t for part in ("params", "model_state") for n, t in tree.flatten(ckpt[part]).items()
             if n.startswith("heads.")}
    torch.save({"state_dict": {f"module.{n}": t for n, t in heads.items()}}, tmp_path / "heads.pth")
    main(tmp_path / "eval", "--config.total_steps=6", "--config.model.freeze=('trunk', 'heads')",
         f"--config.model.head_weights.path={tmp_path / 'heads.pth'}")
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert {h: r["top1"] for h, r in results["heads"].items()} == {h: r["top1"] for h, r in trained.items()}
    assert results["head_weights"]["path"].endswith("heads.pth") and results["step"] == 0  # nothing trained
    assert "heads: " in (tmp_path / "eval" / "head_weights_report.txt").read_text()


def test_a_file_for_some_heads_loads_those_and_leaves_the_others_to_train(tmp_path):
    """model.head_weights.heads: the released head evaluated (frozen) beside heads that train from
    their init. Heads are independent, so the run ends as the one that trained them all."""
    main(tmp_path / "train", "--config.total_steps=6")
    trained = json.loads((tmp_path / "train" / "results.json").read_text())["heads"]
    ckpt = torch.load(sorted((tmp_path / "train" / "checkpoints").glob("ckpt_*.pt"))[-1], weights_only=True)
    head = {n: t for part in ("params", "model_state") for n, t in tree.flatten(ckpt[part]).items()
            if n.startswith("heads.res5avg.")}
    torch.save({"state_dict": {n[len("heads."):]: t for n, t in head.items()}}, tmp_path / "res5avg.pth")
    main(tmp_path / "eval", "--config.total_steps=6", r"--config.model.freeze=('trunk', r'heads\.res5avg\..*')",
         f"--config.model.head_weights.path={tmp_path / 'res5avg.pth'}", "--config.model.head_weights.heads=('res5avg',)")
    results = json.loads((tmp_path / "eval" / "results.json").read_text())["heads"]
    assert results == trained
    report = (tmp_path / "eval" / "head_weights_report.txt").read_text()
    assert "heads.conv1: kept at its init (not in model.head_weights.heads)" in report


def test_heads_the_model_lacks_are_refused_naming_the_valid_ones(tmp_path):
    torch.save({"weight": torch.randn(5, 12), "bias": torch.randn(5)}, tmp_path / "head.pth")
    with pytest.raises(WeightsError, match=r"names \['c'\], not heads of the model; valid: \['a', 'b'\]"):
        heads_file.load_heads(target("a", "b"), {"path": str(tmp_path / "head.pth"), "heads": ("c",)})
    out, report = heads_file.load_heads(target("a", "b"), {"path": str(tmp_path / "head.pth"), "heads": ("b",)})
    assert out["heads.b.weight"].any() and not out["heads.a.weight"].any()  # a bare weight: the one named head
    from fpipe.train import config_check
    from configs import linear_eval
    c = linear_eval.get_config()
    c.model.head_weights.path, c.model.head_weights.heads = str(tmp_path / "head.pth"), ("res6",)
    with pytest.raises(config_check.ConfigError, match=r"heads names \['res6'\].*valid: \['conv1', 'res3'"):
        config_check.check(c)
