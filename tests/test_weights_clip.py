"""CLIP image towers load by ``format: auto`` and compute what open_clip, timm and transformers compute.

tests/fixtures/clip holds open_clip's and timm's names and shapes for a small CLIP (open_clip's
file holds the text tower too, its resblocks at the top) and their outputs with seeded weights
(``make_clip_fixtures.py``, run in a separate venv); transformers' CLIPModel is in
tests/fixtures/hf. OpenAI's weights use QuickGELU (``mlp="quick_gelu"``, the ``*_quickgelu``
presets), most open_clip ones GELU: both are checked.
"""
import json
import pathlib

import pytest
import safetensors.torch
import torch

from _trunks import assert_close_to_largest, load_target, loaded_trees
from fpipe import tree
from fpipe.models import model as model_lib
from fpipe.models import vit
from fpipe.models.trunk import init_on_meta
from fpipe.weights import WeightsError, load_into

CLIP = pathlib.Path(__file__).parent / "fixtures" / "clip"
HF = pathlib.Path(__file__).parent / "fixtures" / "hf"
FIXTURE = json.loads((CLIP / "manifests.json").read_text())
OUTPUTS = torch.load(CLIP / "outputs.pt", weights_only=True)
TABLES = {"open_clip": "openclip_vit", "timm": "timm_vit"}


def tiny_clip(mlp, **overrides):
    options = {**vit.PRESETS["vit_base_patch16_clip_224"], **FIXTURE["config"], "mlp": mlp, **overrides}
    return model_lib.build_trunk("vit", **options)


def load_and_run(trunk, path, seed, features=("lastCLS", "block0"), size=32):
    params, state, target = load_target(trunk)
    loaded, report = load_into(target, {"path": str(path)})
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(seed))
    return trunk.apply(*loaded_trees(loaded, params, state), images, train=False, features=features)[0], report


@pytest.mark.parametrize("name", sorted(FIXTURE["models"]))
def test_clip_tower_computes_what_its_library_computes(reference, tmp_path, name):
    library, act = name.rsplit("_", 1)
    path = tmp_path / f"{name}.pt"
    torch.save(reference.seeded_state_dict(FIXTURE["models"][name]["state_dict"], 0), path)
    trunk = tiny_clip("quick_gelu" if act == "quickgelu" else "gelu")
    out, report = load_and_run(trunk, path, OUTPUTS[name]["input_seed"])
    assert report.format == f"auto ({TABLES[library]} names)" and report.trunk_loaded == report.trunk_total
    assert_close_to_largest(out["lastCLS"], OUTPUTS[name]["cls"], name)
    if "block0_cls" in OUTPUTS[name]:
        assert_close_to_largest(out["block0"][:, 0], OUTPUTS[name]["block0_cls"], name)
    if library == "open_clip":  # the text tower's blocks and positions sit at the top: not this trunk
        assert "visual.proj" in report.not_loaded  # the projection into the text space: no trunk tensor
        assert any(n.startswith("transformer.resblocks.") for n in report.not_loaded)


def test_the_activation_matters(reference, tmp_path):
    """GELU for QuickGELU weights is a measurably different model: the presets name which."""
    path = tmp_path / "w.pt"
    torch.save(reference.seeded_state_dict(FIXTURE["models"]["open_clip_quickgelu"]["state_dict"], 0), path)
    out, _ = load_and_run(tiny_clip("gelu"), path, 100)
    err = (out["lastCLS"] - OUTPUTS["open_clip_quickgelu"]["cls"]).abs().max()
    assert err > 1e-3 * OUTPUTS["open_clip_quickgelu"]["cls"].abs().max()


def test_transformers_clip_model_takes_the_vision_tower_not_the_text_tower(reference, tmp_path):
    """CLIPModel's text tower has the vision tower's block names and, here, its width."""
    manifest = json.loads((HF / "manifests.json").read_text())["clip-vit-tiny"]["state_dict"]
    expected = torch.load(HF / "outputs.pt", weights_only=True)["clip-vit-tiny"]
    path = tmp_path / "model.safetensors"
    safetensors.torch.save_file(reference.seeded_state_dict(manifest, 0), path)
    out, report = load_and_run(tiny_clip("quick_gelu", mlp_dim=128), path, expected["input_seed"])
    assert report.format == "auto (hf_clip names)" and report.trunk_loaded == report.trunk_total
    assert report.state_dict_key + report.remove_prefix == "vision_model."
    assert_close_to_largest(out["lastCLS"], expected["cls"], "clip")
    assert_close_to_largest(out["block0"][:, 0], expected["block0_cls"], "clip")


def test_openai_torchscript_archive_is_read_without_running_it(monkeypatch):
    """OpenAI's CLIP files are TorchScript archives, which torch.load refuses under weights_only
    and torch.jit.load would run: fpipe reads their tensors with inert stand-ins for their classes."""
    monkeypatch.setattr(torch.jit, "load", lambda *a, **k: pytest.fail("torch.jit.load was called"))
    trunk = tiny_clip("quick_gelu", hidden_dim=32, heads=2, mlp_dim=128, depth=1)
    out, report = load_and_run(trunk, CLIP / "openai_clip_traced.pt", OUTPUTS["openai_traced"]["input_seed"],
                               features=("lastCLS",))
    assert report.format == "auto (openclip_vit names)" and report.trunk_loaded == report.trunk_total
    assert_close_to_largest(out["lastCLS"], OUTPUTS["openai_traced"]["cls"], "traced")


def test_a_clip_file_for_a_plain_vit_names_both_clip_presets():
    """The GELU and QuickGELU CLIP presets hold the same tensors: the refusal names both, since only
    the file's origin tells them apart (OpenAI's weights: QuickGELU)."""
    def zeros(name):  # the preset's names and shapes, no memory
        meta, _ = init_on_meta(model_lib.build_trunk(name))
        return {n: torch.zeros(()).expand(t.shape) for n, t in tree.flatten(meta).items()}
    with pytest.raises(WeightsError, match=r"the file holds vit_base_patch16_clip_224 .*preset\(s\) "
                                           r"vit_base_patch16_clip_quickgelu_224 hold the same tensors"):
        load_into({f"trunk.{n}": t for n, t in zeros("vit_b_16").items()}, {}, obj=zeros("vit_base_patch16_clip_224"))


def test_transformers_siglip_tower_computes_what_transformers_computes(reference, tmp_path):
    """SigLIP: no class token or class row, a patch bias, tanh-GELU; its MAP head is a head's job
    (left out), so the feature is the mean patch token after the final norm (lastPOOL)."""
    manifest = json.loads((HF / "manifests.json").read_text())["siglip-tiny"]["state_dict"]
    expected = torch.load(HF / "outputs.pt", weights_only=True)["siglip-tiny"]
    path = tmp_path / "model.safetensors"
    safetensors.torch.save_file(reference.seeded_state_dict(manifest, 0), path)
    options = {**vit.PRESETS["vit_base_patch16_siglip_224"], **FIXTURE["config"], "mlp_dim": 128}
    out, report = load_and_run(model_lib.build_trunk("vit", **options), path, expected["input_seed"],
                               features=("lastPOOL", "block0"))
    assert report.format == "auto (hf_clip names)" and report.trunk_loaded == report.trunk_total
    assert any(n.startswith("vision_model.head.") for n in report.not_loaded)  # the MAP head
    assert_close_to_largest(out["lastPOOL"], expected["patch_mean"], "siglip")
    assert_close_to_largest(out["block0"][:, 0], expected["block0_first"], "siglip")
