"""timm's tf_efficientnet_* files (TensorFlow's "same" padding, BatchNorm eps 1e-3) compute what
timm computes when loaded into the tf_efficientnet_* presets; the same tensors in the symmetric
padding of efficientnet_* compute something else, so a folder whose config.json names one
architecture refuses a trunk of the other.

tests/fixtures/tf_efficientnet holds timm's names and shapes and its outputs with the reference
folder's seeded weights at 64 and 67 px (``make_tf_efficientnet_fixtures.py``, a separate venv).
"""
import json
import pathlib
import types

import pytest
import torch

from _trunks import assert_close_to_largest, load_target, loaded_trees
from fpipe.models import efficientnet
from fpipe.models import model as model_lib
from fpipe.weights import hf_config, load_into

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "tf_efficientnet"
MANIFESTS = json.loads((FIXTURES / "manifests.json").read_text())
OUTPUTS = torch.load(FIXTURES / "outputs.pt", weights_only=True)


def features(reference, tmp_path, preset, writer, size):
    """``(ours, timm's)``: the preset's stage2 and head_conv on the writer's seeded file, and timm's."""
    path = tmp_path / f"{writer}.pth"
    torch.save(reference.seeded_state_dict(MANIFESTS[writer]["state_dict"], 0), path)
    trunk = model_lib.build_trunk(preset)
    params, state, target = load_target(trunk)
    loaded, report = load_into(target, {"path": str(path)})
    assert report.trunk_loaded == report.trunk_total
    assert "name their tensors alike" in report.summary()  # the report says which trunk the file needs
    expected = OUTPUTS[writer][size]
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(expected["input_seed"]))
    out, _ = trunk.apply(*loaded_trees(loaded, params, state), images, train=False, features=("stage2", "head_conv"))
    return out, expected


@pytest.mark.parametrize("size", [64, 67])
@pytest.mark.parametrize("writer", ["tf_efficientnet_b0", "efficientnet_b0"])
def test_each_preset_computes_what_timm_computes_with_its_file(reference, tmp_path, writer, size):
    ours, theirs = features(reference, tmp_path, writer, writer, size)
    for name in ("stage2", "head_conv"):
        assert_close_to_largest(ours[name], theirs[name], f"{writer} {size} px {name}")


def test_the_padding_matters_a_tf_file_in_the_symmetric_preset_computes_otherwise(reference, tmp_path):
    assert MANIFESTS["tf_efficientnet_b0"]["state_dict"] == MANIFESTS["efficientnet_b0"]["state_dict"]
    assert (MANIFESTS["tf_efficientnet_b0"]["conv_stem"], MANIFESTS["tf_efficientnet_b0"]["bn_eps"]) == ("Conv2dSame",
                                                                                                       1e-3)
    ours, theirs = features(reference, tmp_path, "efficientnet_b0", "tf_efficientnet_b0", 64)
    err = (ours["stage2"] - theirs["stage2"]).abs().max() / theirs["stage2"].abs().max()
    assert err > 0.1


def test_same_padding_is_tensorflows_an_output_of_ceil_size_over_stride_the_extra_row_last():
    assert efficientnet.same_padding((224, 224), 3, 2) == (0, 1, 0, 1)
    assert efficientnet.same_padding((67, 64), 5, 2) == (1, 2, 2, 2)  # W 64: 3 in all, H 67: 4
    x = torch.randn(1, 1, 67, 64)
    conv = torch.nn.functional.conv2d(torch.nn.functional.pad(x, efficientnet.same_padding(x.shape[-2:], 5, 2)),
                                      torch.ones(1, 1, 5, 5), stride=2)
    assert conv.shape[-2:] == (34, 32)
    assert [efficientnet.PRESETS[f"tf_efficientnet_b{i}"]["padding"] for i in range(8)] == ["same"] * 8
    with pytest.raises(ValueError, match="model.trunk.padding='valid'; valid: symmetric, same"):
        model_lib.build_trunk("efficientnet_b0", padding="valid")


@pytest.mark.parametrize("architecture, preset, expected", [
    ("tf_efficientnet_b0", "efficientnet_b0", [("padding", "same", "symmetric"), ("norm_eps", 1e-3, 1e-5)]),
    ("tf_efficientnet_b0", "tf_efficientnet_b0", []),
    ("efficientnet_b0", "tf_efficientnet_b0", [("padding", "symmetric", "same"), ("norm_eps", 1e-5, 1e-3)]),
    ("efficientnet_b5", "efficientnet_b5", [("norm_eps", 1e-5, 1e-3)]),  # timm's B5 is not torchvision's
    ("resnet50", "efficientnet_b0", []),
])
def test_a_timm_folders_architecture_is_checked_against_the_trunk(architecture, preset, expected):
    spec = model_lib.build_trunk(preset).spec
    assert hf_config.mismatches({"architecture": architecture, "num_classes": 1000}, spec) == expected
    vit = types.SimpleNamespace(mlp="gelu", ln_eps=1e-6)
    assert hf_config.mismatches({"architecture": architecture}, vit) == []
