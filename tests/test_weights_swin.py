"""Swin files load by ``format: auto`` and compute what their writers' code computes.

tests/fixtures/swin holds the names and shapes of torchvision's ``swin_t``, timm's
``swin_tiny_patch4_window7_224`` and microsoft/Swin-Transformer's Swin-T, and their outputs at
224 px (Swin V2-T: ``swin_v2_t``, ``swinv2_tiny_window8_256``, ``SwinTransformerV2`` at 256 px)
with the reference folder's seeded weights (``make_swin_fixtures.py``, run in a separate
venv). Here the same weights are rebuilt with torch alone, saved as those files are, and loaded.
The seeded function writes zeros into the relative position indices and noise into the original's
``attn_mask`` buffers: a loader that read them would compute something else.
"""
import json
import pathlib

import pytest
import torch

from _trunks import assert_close_to_largest, load_target, loaded_trees
from fpipe.models import model as model_lib
from fpipe.models import swin
from fpipe.weights import cli, detect, load_into

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "swin"
MANIFESTS = json.loads((FIXTURES / "manifests.json").read_text())
OUTPUTS = torch.load(FIXTURES / "outputs.pt", weights_only=True)
MOBY = lambda sd: {"model": {**{f"encoder.{k}": v for k, v in sd.items()},  # noqa: E731
                              **{f"encoder_k.{k}": v + 1 for k, v in sd.items()}}}  # its momentum copy
# case -> (fixture, how its project saves it, (state_dict_key, remove_prefix) found, format auto reports)
FILES = {
    "torchvision": ("torchvision", lambda sd: sd, ("", ""), "auto"),
    "timm": ("timm", lambda sd: sd, ("", ""), "auto (timm_swin names)"),
    "official": ("official", lambda sd: {"model": sd}, ("model", ""), "auto (ms_swin names)"),
    "moby": ("official", MOBY, ("model", "encoder."), "auto (ms_swin names)"),
    "torchvision_v2": ("torchvision_v2", lambda sd: sd, ("", ""), "auto"),
    "timm_v2": ("timm_v2", lambda sd: sd, ("", ""), "auto (timm_swin names)"),
    "official_v2": ("official_v2", lambda sd: {"model": sd}, ("model", ""), "auto (ms_swin names)"),
}


def pooled(fixture):
    out = OUTPUTS[fixture]
    return out["pooled"] if "pooled" in out else out["256" if fixture.endswith("v2") else "224"]["avgpool"].flatten(1)


@pytest.mark.parametrize("case", sorted(FILES))
def test_file_computes_what_its_writer_computes(reference, tmp_path, case):
    fixture, save, found, fmt = FILES[case]
    v2 = fixture.endswith("v2")
    weights = reference.seeded_state_dict(MANIFESTS[fixture]["state_dict"], 0)
    torch.save(save(weights), tmp_path / "swin.pth")
    trunk = model_lib.build_trunk("swin_v2_t" if v2 else "swin_t")
    params, state, target = load_target(trunk)
    loaded, report = load_into(target, {"path": str(tmp_path / "swin.pth")})
    assert report.format == fmt and report.trunk_loaded == report.trunk_total
    assert not any(detect.is_derived(n) for n in report.loaded)
    assert (report.state_dict_key, report.remove_prefix) == found
    images = reference.seeded_images(2, 256 if v2 else 224, seed=100)
    out, _ = trunk.apply(*loaded_trees(loaded, params, state), images, train=False, features=("flatten",))
    assert_close_to_largest(out["flatten"], pooled(fixture), case)


def test_relative_position_indices_in_a_file_are_never_read(reference, tmp_path):
    weights = reference.seeded_state_dict(MANIFESTS["torchvision"]["state_dict"], 0)
    torch.save(weights, tmp_path / "swin.pth")
    _, _, target = load_target(model_lib.build_trunk("swin_t"))
    loaded, report = load_into(target, {"path": str(tmp_path / "swin.pth")})
    name = "trunk.features.1.0.attn.relative_position_index"
    assert torch.equal(loaded[name], target[name]) and target[name].max() == 168
    assert report.not_loaded["features.1.0.attn.relative_position_index"].startswith("derived")


def test_convert_writes_torchvisions_names_and_the_real_index_tables(reference, tmp_path, capsys):
    weights = reference.seeded_state_dict(MANIFESTS["timm_v2"]["state_dict"], 0)
    torch.save(weights, tmp_path / "timm.pth")
    assert cli.main(["convert", str(tmp_path / "timm.pth"), str(tmp_path / "tv.pth")]) == 0
    assert "swin_v2_t" in capsys.readouterr().out
    written = torch.load(tmp_path / "tv.pth", weights_only=True)
    theirs = [n for n, _, _ in MANIFESTS["torchvision_v2"]["state_dict"] if not n.startswith("head.")]
    assert list(written) == theirs  # what torchvision's swin_v2_t loads strictly, in its order
    assert torch.equal(written["features.1.0.attn.relative_position_index"], swin.relative_position_index(8))
    assert torch.equal(written["features.7.1.attn.relative_coords_table"], swin.relative_coords_table(8))
