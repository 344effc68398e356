"""ConvNeXt V2 files load by ``format: auto`` and compute what their writers' code computes.

tests/fixtures/convnextv2 holds the names and shapes of timm's ``convnextv2_atto``, of
facebookresearch/ConvNeXt-V2's dense model (its fine-tuned files) and of its FCMAE pretraining
model (a MinkowskiEngine sparse encoder plus a decoder), and their code's outputs with the
reference folder's seeded weights (``make_convnextv2_fixtures.py``, run in a separate venv).
Here the same weights are rebuilt with torch alone, saved as those files are, and loaded.
"""
import argparse
import json
import pathlib

import pytest
import torch

from _trunks import assert_close_to_largest, load_target, loaded_trees
from fpipe import tree
from fpipe.models import model as model_lib
from fpipe.weights import WeightsError, cli, load_into, minkowski

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "convnextv2"
MANIFESTS = json.loads((FIXTURES / "manifests.json").read_text())
OUTPUTS = torch.load(FIXTURES / "outputs.pt", weights_only=True)
TABLES = {"timm": "timm_convnext", "official": "fb_convnext", "fcmae": "fb_convnext"}


def saved(reference, tmp_path, name) -> pathlib.Path:
    """The seeded weights as their writer saves them: timm's whole state dict; the repository's
    ``{"model": ..., "epoch", "args"}`` (an argparse.Namespace, as its files carry)."""
    weights = reference.seeded_state_dict(MANIFESTS[name]["state_dict"], 0)
    obj = weights if name == "timm" else {"model": weights, "epoch": 799, "args": argparse.Namespace(model="atto")}
    path = tmp_path / f"{name}.pth"
    torch.save(obj, path)
    return path


def run(trunk, params, state, loaded, expected):
    images = torch.randn(2, 3, expected["input_size"], expected["input_size"],
                         generator=torch.Generator().manual_seed(expected["input_seed"]))
    out, _ = trunk.apply(*loaded_trees(loaded, params, state), images, train=False, features=("res5", "flatten"))
    return out


@pytest.mark.parametrize("name", ["timm", "official", "fcmae"])
def test_file_computes_what_its_writer_computes(reference, tmp_path, name):
    trunk = model_lib.build_trunk("convnextv2_atto")
    params, state, target = load_target(trunk)
    loaded, report = load_into(target, {"path": str(saved(reference, tmp_path, name))})
    assert report.format == f"auto ({TABLES[name]} names)"
    expected = OUTPUTS[name]
    out = run(trunk, params, state, loaded, expected)
    assert_close_to_largest(out["res5"], expected["stage4"], f"{name} res5")
    assert_close_to_largest(out["flatten"], expected["pooled"], f"{name} flatten")
    if name == "fcmae":  # the sparse encoder has no final norm: fine-tuning starts it at identity
        assert report.trunk_loaded == report.trunk_total - 2
        assert report.identity_kept == ["trunk.classifier.0.weight", "trunk.classifier.0.bias"]
        assert MANIFESTS["fcmae"]["fine_tuning_missing"][:2] == ["norm.weight", "norm.bias"]
        assert any("MinkowskiEngine" in n for n in report.notes) and "classifier.0" in report.summary()
        assert (report.state_dict_key, report.remove_prefix) == ("model", "encoder.")
        assert not any(n.startswith("model.encoder.") for n in report.not_loaded)  # the decoder's are left
        assert "model.decoder.0.grn.gamma" in report.not_loaded
    else:
        assert report.trunk_loaded == report.trunk_total and not report.identity_kept


def test_a_v1_file_for_a_v2_trunk_is_refused_naming_the_architecture(tmp_path):
    v1 = model_lib.build_trunk("convnext_tiny")
    path = tmp_path / "v1.pth"
    torch.save(tree.flatten(v1.init(0)[0]), path)
    _, _, target = load_target(model_lib.build_trunk("convnextv2_tiny"))
    with pytest.raises(WeightsError, match="convnext_tiny"):
        load_into(target, {"path": str(path)})


def test_a_v2_file_for_a_v1_trunk_is_refused_naming_the_architecture(tmp_path):
    _, _, target = load_target(model_lib.build_trunk("convnext_tiny"))
    v2 = model_lib.build_trunk("convnextv2_tiny")
    path = tmp_path / "v2.pth"
    torch.save(tree.flatten(v2.init(0)[0]), path)
    with pytest.raises(WeightsError, match="convnextv2_tiny"):
        load_into(target, {"path": str(path)})


def test_a_missing_final_norm_is_accepted_only_when_nothing_else_is_missing(reference, tmp_path):
    weights = reference.seeded_state_dict(MANIFESTS["official"]["state_dict"], 0)
    _, _, target = load_target(model_lib.build_trunk("convnextv2_atto"))
    del weights["norm.weight"], weights["norm.bias"], weights["stages.3.1.grn.beta"]
    torch.save({"model": weights}, tmp_path / "partial.pth")
    with pytest.raises(WeightsError, match="refusing to leave the rest random"):
        load_into(target, {"path": str(tmp_path / "partial.pth")})


def test_the_final_norm_is_not_kept_when_the_model_holds_other_values_there(reference, tmp_path):
    weights = reference.seeded_state_dict(MANIFESTS["official"]["state_dict"], 0)
    del weights["norm.weight"], weights["norm.bias"]
    torch.save({"model": weights}, tmp_path / "no_norm.pth")
    _, _, target = load_target(model_lib.build_trunk("convnextv2_atto"))
    target["trunk.classifier.0.weight"] = target["trunk.classifier.0.weight"] * 2  # e.g. loaded before
    with pytest.raises(WeightsError, match="classifier.0"):
        load_into(target, {"path": str(tmp_path / "no_norm.pth")})


def test_sparse_kernels_become_dense_weights_in_the_authors_order():
    """A 7×7 depthwise kernel's volume index is ``w·7 + h``; a [volume, in, out] kernel becomes
    [out, in, k, k]; the [1, C] biases and the ``ln``/``linear`` wrappers are undone."""
    volume = torch.arange(49.0).reshape(49, 1).repeat(1, 3)
    files = {"s.0.dwconv.kernel": volume, "s.0.dwconv.bias": torch.ones(1, 3), "s.0.norm.ln.weight": torch.ones(3),
             "s.0.pwconv1.linear.weight": torch.ones(12, 3), "d.1.kernel": torch.randn(4, 3, 5),
             "d.1.bias": torch.zeros(1, 5), "other.linear.bias": torch.zeros(2)}
    out, converted = minkowski.to_dense(files)
    assert out["s.0.dwconv.weight"].shape == (3, 1, 7, 7) and out["s.0.dwconv.weight"][0, 0, 2, 5] == 5 * 7 + 2
    assert out["d.1.weight"].shape == (5, 3, 2, 2)
    assert torch.equal(out["d.1.weight"][4, 2, 1, 0], files["d.1.kernel"][0 * 2 + 1, 2, 4])
    assert out["s.0.dwconv.bias"].shape == (3,) and out["d.1.bias"].shape == (5,)
    assert {"s.0.norm.weight", "s.0.pwconv1.weight", "other.bias"} <= set(out)
    assert len(converted) == len(files)


def test_files_without_sparse_kernels_pass_unchanged():
    files = {"a.weight": torch.ones(49, 3), "b.kernel": torch.ones(5, 3), "c.linear.weight": torch.ones(2, 2)}
    assert minkowski.to_dense(files) == (files, [])



def test_the_cli_infers_and_converts_an_fcmae_file(reference, tmp_path, capsys):
    """Without --trunk: the preset is inferred (the final norm aside), and the converted file holds
    that norm at identity, so it loads strictly and computes what fine-tuning starts from."""
    out_path = tmp_path / "fcmae.safetensors"
    assert cli.main(["convert", str(saved(reference, tmp_path, "fcmae")), str(out_path)]) == 0
    assert "convnextv2_atto" in capsys.readouterr().out
    trunk = model_lib.build_trunk("convnextv2_atto")
    params, state, target = load_target(trunk)
    loaded, report = load_into(target, {"path": str(out_path)})
    assert report.trunk_loaded == report.trunk_total and report.format == "auto"
    out = run(trunk, params, state, loaded, OUTPUTS["fcmae"])
    assert_close_to_largest(out["flatten"], OUTPUTS["fcmae"]["pooled"], "converted fcmae")
