"""transformers' EfficientNet files (google/efficientnet-b*: Keras ports, blocks numbered across
stages) load by ``format: auto`` into the tf_efficientnet_b* presets and compute what transformers
computes; fpipe.weights.stages numbers their blocks by stage from the file's own widths.

tests/fixtures/hf_efficientnet holds EfficientNetForImageClassification's names and shapes for
google/efficientnet-b0's config and its outputs with the reference folder's seeded weights at 64
and 224 px (``make_hf_efficientnet_fixtures.py``, a separate venv with transformers).
"""
import json
import pathlib

import pytest
import torch

from _trunks import assert_close_to_largest, load_target, loaded_trees
from fpipe.models import model as model_lib
from fpipe.weights import hf_config, infer, load_into, stages

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "hf_efficientnet"
MANIFEST = json.loads((FIXTURES / "manifests.json").read_text())["hf"]
OUTPUTS = torch.load(FIXTURES / "outputs.pt", weights_only=True)


def saved(reference, tmp_path):
    path = tmp_path / "hf_efficientnet.pth"
    torch.save(reference.seeded_state_dict(MANIFEST["state_dict"], 0), path)
    return path


@pytest.mark.parametrize("size", [64, 224])
def test_the_file_computes_what_transformers_computes_in_the_tf_preset(reference, tmp_path, size):
    trunk = model_lib.build_trunk("tf_efficientnet_b0")
    params, state, target = load_target(trunk)
    loaded, report = load_into(target, {"path": str(saved(reference, tmp_path))})
    assert report.format == "auto (hf_efficientnet names)" and report.trunk_loaded == report.trunk_total
    assert any("16 blocks numbered across stages" in n for n in report.notes)
    expected = OUTPUTS[size]
    images = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(expected["input_seed"]))
    out, _ = trunk.apply(*loaded_trees(loaded, params, state), images, train=False, features=("head_conv", "flatten"))
    assert_close_to_largest(out["head_conv"], expected["head_conv"], f"{size} px head_conv")
    assert_close_to_largest(out["flatten"], expected["pooled"], f"{size} px pooled")
    symmetric = model_lib.build_trunk("efficientnet_b0")  # the same tensors, torchvision's padding: other features
    p, s, t = load_target(symmetric)
    other, _ = symmetric.apply(*loaded_trees(load_into(t, {"path": str(saved(reference, tmp_path))})[0], p, s),
                               images, train=False, features=("head_conv",))
    assert (other["head_conv"] - expected["head_conv"]).abs().max() > 1e-3 * expected["head_conv"].abs().max()


def test_blocks_are_numbered_by_stage_from_their_widths_and_other_files_pass_unchanged():
    widths = [16, 24, 24, 40, 40, 80, 80, 80, 112, 112, 112, 192, 192, 192, 192, 320]
    files = {f"efficientnet.encoder.blocks.{i}.projection.project_conv.weight": torch.zeros(w, 8, 1, 1)
             for i, w in enumerate(widths)}
    files["efficientnet.encoder.blocks.3.expansion.expand_conv.weight"] = torch.zeros(144, 24, 1, 1)
    files["efficientnet.encoder.top_conv.weight"] = torch.zeros(1280, 320, 1, 1)
    out, count = stages.number_by_stage(files)
    assert count == 16
    assert "efficientnet.encoder.blocks.2.0.expansion.expand_conv.weight" in out
    assert "efficientnet.encoder.blocks.6.0.projection.project_conv.weight" in out
    assert "efficientnet.encoder.blocks.5.3.projection.project_conv.weight" in out
    without_top = {n: t for n, t in files.items() if "top_conv" not in n}  # not transformers' layout
    assert stages.number_by_stage(without_top) == (without_top, 0)


def test_inference_and_the_folders_config_name_the_tf_preset(reference, tmp_path):
    files = {n: t for n, t in reference.seeded_state_dict(MANIFEST["state_dict"], 0).items()}
    files, _ = stages.number_by_stage(files)
    presets = {name: (None, {}, lambda name=name: infer.preset_target(name))
               for name in ("efficientnet_b0", "tf_efficientnet_b0", "efficientnet_b1")}
    name, _, why = infer.infer_trunk(files, presets)
    assert name == "tf_efficientnet_b0" and "ports of Keras's" in why and "efficientnet_b0 hold the same" in why
    config = MANIFEST["config"]
    assert config["model_type"] == "efficientnet"
    assert hf_config.mismatches(config, model_lib.build_trunk("tf_efficientnet_b0").spec) == []
    assert hf_config.mismatches(config, model_lib.build_trunk("efficientnet_b0").spec) == [
        ("padding", "same", "symmetric"), ("norm_eps", 1e-3, 1e-5)]
