"""Swin files load by ``format: auto`` and compute what their writers' code computes.

tests/fixtures/swin holds the names and shapes of torchvision's ``swin_t``, timm's
``swin_tiny_patch4_window7_224`` and microsoft/Swin-Transformer's Swin-T, and their outputs at
224 px with the reference folder's seeded weights (``make_swin_fixtures.py``, run in a separate
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
from fpipe.weights import load_into

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "swin"
MANIFESTS = json.loads((FIXTURES / "manifests.json").read_text())
OUTPUTS = torch.load(FIXTURES / "outputs.pt", weights_only=True)
# fixture -> (how its project saves it, (state_dict_key, remove_prefix) found, the format auto reports)
FILES = {
    "torchvision": (lambda sd: sd, ("", ""), "auto"),
    "timm": (lambda sd: sd, ("", ""), "auto (timm_swin names)"),
    "official": (lambda sd: {"model": sd}, ("model", ""), "auto (ms_swin names)"),
    # MoBY: the online encoder and its momentum copy (encoder_k) side by side
    "moby": (lambda sd: {"model": {**{f"encoder.{k}": v for k, v in sd.items()},
                                   **{f"encoder_k.{k}": v + 1 for k, v in sd.items()}}}, ("model", "encoder."),
             "auto (ms_swin names)"),
}


def pooled(name):
    out = OUTPUTS["torchvision" if name == "torchvision" else "official" if name == "moby" else name]
    return out["224"]["avgpool"].flatten(1) if name == "torchvision" else out["pooled"]


@pytest.mark.parametrize("name", sorted(FILES))
def test_file_computes_what_its_writer_computes(reference, tmp_path, name):
    save, prefix, fmt = FILES[name]
    weights = reference.seeded_state_dict(MANIFESTS["official" if name == "moby" else name]["state_dict"], 0)
    torch.save(save(weights), tmp_path / "swin.pth")
    trunk = model_lib.build_trunk("swin_t")
    params, state, target = load_target(trunk)
    loaded, report = load_into(target, {"path": str(tmp_path / "swin.pth")})
    assert report.format == fmt and report.trunk_loaded == report.trunk_total
    assert not any(n.endswith("relative_position_index") for n in report.loaded)
    assert (report.state_dict_key, report.remove_prefix) == prefix
    images = reference.seeded_images(2, 224, seed=100)
    out, _ = trunk.apply(*loaded_trees(loaded, params, state), images, train=False, features=("flatten",))
    assert_close_to_largest(out["flatten"], pooled(name), name)


def test_relative_position_indices_in_a_file_are_never_read(reference, tmp_path):
    weights = reference.seeded_state_dict(MANIFESTS["torchvision"]["state_dict"], 0)
    torch.save(weights, tmp_path / "swin.pth")
    _, _, target = load_target(model_lib.build_trunk("swin_t"))
    loaded, report = load_into(target, {"path": str(tmp_path / "swin.pth")})
    name = "trunk.features.1.0.attn.relative_position_index"
    assert torch.equal(loaded[name], target[name]) and target[name].max() == 168
    assert report.not_loaded["features.1.0.attn.relative_position_index"].startswith("derived")
