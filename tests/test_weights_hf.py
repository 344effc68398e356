"""Hugging Face transformers' files load by ``format: auto`` and compute what transformers computes.

tests/fixtures/hf holds, per model, the file's names and shapes as ``save_pretrained`` writes
them and transformers' own outputs with the reference folder's seeded weights (made by
``make_hf_fixtures.py`` in a separate venv; transformers is no dependency). Here the same
weights are rebuilt with torch alone, written as the hub's ``model.safetensors``, loaded into
fpipe's trunk and run: the features must match transformers' to float32 rounding.
"""
import json
import pathlib

import pytest
import safetensors.torch
import torch

from _trunks import assert_close_to_largest, load_target, loaded_trees
from fpipe.models import model as model_lib
from fpipe.weights import WeightsError, cli, load_into

HF = pathlib.Path(__file__).parent / "fixtures" / "hf"
MANIFESTS = json.loads((HF / "manifests.json").read_text())
OUTPUTS = torch.load(HF / "outputs.pt", weights_only=True)
# fixture -> (fpipe trunk, options): transformers' ViT configs keep BERT's layer_norm_eps 1e-12.
TRUNKS = {
    "resnet-18": ("resnet18", {}),
    "resnet-50": ("resnet50", {}),
    "vit-base-patch16-224": ("vit_b_16", {"ln_eps": 1e-12}),
    "vit-base-patch16-224-in21k": ("vit_b_16", {"ln_eps": 1e-12}),
    "vit-mae-base": ("vit_b_16", {"ln_eps": 1e-12}),
    "deit-tiny-distilled-patch16-224": ("deit_tiny_distilled_patch16_224", {"ln_eps": 1e-12}),
    "dinov2-small": ("vit_small_patch14_dinov2", {"image_size": 224}),
    "dinov2-small-with-registers": ("vit_small_patch14_reg4_dinov2", {"image_size": 224}),
    "dinov2-tiny-swiglu": ("vit", dict(hidden_dim=48, depth=2, heads=3, mlp_dim=128, patch_size=14, image_size=56,
                                       layer_scale=1.0, mlp="swiglu")),
    "convnext-tiny-224": ("convnext_tiny", {}),
    "convnextv2-atto-1k-224": ("convnextv2_atto", {}),
    "swin-tiny-patch4-window7-224": ("swin_t", {}),
    "swinv2-tiny-patch4-window8-256": ("swin_v2_t", {}),
    "regnet-y-400mf": ("regnet_y_400mf", {}),
    "regnet-x-400mf": ("regnet_x_400mf", {}),
}


def seeded_file(reference, name, tmp_path, *, names=None) -> pathlib.Path:
    """The fixture's seeded weights as a hub file; ``names``: transformers 5's in-memory names."""
    weights = reference.seeded_state_dict(MANIFESTS[name]["state_dict"], 0)
    if names:
        weights = {mem: weights[src].chunk(chunks)[i].clone() for mem, src, i, chunks in names}
    path = tmp_path / f"{name}.safetensors"
    safetensors.torch.save_file(weights, path)
    return path


def build(name, heads=None):
    trunk_name, options = TRUNKS[name]
    trunk = model_lib.build_trunk(trunk_name, **options)
    params, state, target = load_target(trunk)
    return trunk, params, state, {**target, **(heads or {})}


def run(trunk, params, state, loaded, features, size, seed):
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(seed))
    out, _ = trunk.apply(*loaded_trees(loaded, params, state), images, train=False, features=features)
    return out


@pytest.mark.parametrize("name", sorted(set(OUTPUTS) & set(TRUNKS)))  # CLIP: tests/test_weights_clip.py
def test_hub_file_computes_what_transformers_computes(reference, tmp_path, name):
    trunk, params, state, target = build(name)
    loaded, report = load_into(target, {"path": str(seeded_file(reference, name, tmp_path))})
    table = "hf_" + next((f for f in ("resnet", "regnet", "convnext", "swin") if name.startswith(f)), "vit")
    assert report.format == f"auto ({table} names)" and report.trunk_loaded == report.trunk_total
    expected = OUTPUTS[name]
    if "pooled" in expected:
        out = run(trunk, params, state, loaded, ("flatten",), expected["input_size"], expected["input_seed"])
        assert_close_to_largest(out["flatten"], expected["pooled"], name)
    else:
        out = run(trunk, params, state, loaded, ("block0", "lastCLS", "lastPOOL"), expected["input_size"],
                  expected["input_seed"])
        assert_close_to_largest(out["block0"][:, 0], expected["block0_cls"], name)
        assert_close_to_largest(out["lastCLS"], expected["cls"], name)
        assert_close_to_largest(out["lastPOOL"], expected["patch_mean"], name)


@pytest.mark.parametrize("name", ["vit-base-patch16-224-in21k", "vit-mae-base"])
def test_hub_files_without_outputs_load_whole_and_leave_pooler_and_decoder_out(reference, tmp_path, name):
    _, _, _, target = build(name)
    _, report = load_into(target, {"path": str(seeded_file(reference, name, tmp_path))})
    assert report.trunk_loaded == report.trunk_total
    left = set(report.not_loaded)
    assert left and all(n.startswith(("pooler.", "decoder.", "embeddings.mask_token")) for n in left), left


@pytest.mark.parametrize("name", ["vit-base-patch16-224", "dinov2-tiny-swiglu"])
def test_transformers5_state_dict_names_load_the_same(reference, tmp_path, name):
    """``torch.save(model.state_dict())`` under transformers 5 names q_proj/k_proj/v_proj, o_proj,
    mlp.fc1/fc2 or SwiGLU's gate_proj/up_proj/down_proj (its weights_in split in two)."""
    rows = MANIFESTS[name]["memory_names"]
    assert any(r[0].endswith("q_proj.weight") for r in rows)
    trunk, params, state, target = build(name)
    loaded, report = load_into(target, {"path": str(seeded_file(reference, name, tmp_path, names=rows))})
    assert report.trunk_loaded == report.trunk_total
    expected = OUTPUTS[name]
    out = run(trunk, params, state, loaded, ("lastCLS",), expected["input_size"], expected["input_seed"])
    assert_close_to_largest(out["lastCLS"], expected["cls"], name)


@pytest.mark.parametrize("name, head, feature, width, prefix", [
    ("resnet-50", "fc", "flatten", 2048, "resnet."), ("vit-base-patch16-224", "head", "lastCLS", 768, "vit.")])
def test_classifier_beside_the_backbone_loads_as_the_head_when_asked(reference, tmp_path, name, head, feature, width,
                                                                      prefix):
    """*ForImageClassification keeps its classifier outside ``resnet.`` / ``vit.``: load_heads takes it."""
    heads = {f"heads.{head}.weight": torch.zeros(1000, width), f"heads.{head}.bias": torch.zeros(1000)}
    trunk, params, state, target = build(name)
    path = str(seeded_file(reference, name, tmp_path))
    _, report = load_into({**target, **heads}, {"path": path})
    left = lambda r: {n: why for n, why in r.not_loaded.items() if why != "skip_layers"}  # noqa: E731 (counters)
    assert set(left(report).values()) == {f"outside the chosen copy {prefix!r}"} and not report.heads_loaded
    loaded, report = load_into({**target, **heads}, {"path": path, "load_heads": True})
    assert sorted(report.heads_loaded) == sorted(heads) and not left(report)
    expected = OUTPUTS[name]
    out = run(trunk, params, state, loaded, (feature,), expected["input_size"], expected["input_seed"])
    got = out[feature] @ loaded[f"heads.{head}.weight"].T + loaded[f"heads.{head}.bias"]
    assert_close_to_largest(got, expected["logits"], name)


@pytest.mark.parametrize("name, resample", [("dinov2-small", "bicubic"),
                                             ("dinov2-small-with-registers", "bicubic_antialias")])
def test_another_input_size_resamples_the_grid_as_transformers_does(reference, tmp_path, name, resample):
    """transformers' DINOv2 resizes the grid with plain bicubic, its DINOv2 with registers with
    antialiased bicubic: ``pos_resample`` names each (the register preset's default is the latter)."""
    trunk_name, options = TRUNKS[name]
    trunk = model_lib.build_trunk(trunk_name, **options, pos_resample=resample)
    params, state, target = load_target(trunk)
    loaded, _ = load_into(target, {"path": str(seeded_file(reference, name, tmp_path))})
    expected = OUTPUTS[name]["resized"]
    out = run(trunk, params, state, loaded, ("lastCLS",), expected["input_size"], OUTPUTS[name]["input_seed"])
    assert_close_to_largest(out["lastCLS"], expected["cls"], name)


def test_dinov2_with_registers_file_folds_its_class_position_into_the_class_token(reference, tmp_path):
    """The file's position embedding has a class row; the preset (timm's layout) has none: the row
    is added to the class token once, which the model then uses unchanged (the same sum)."""
    name = "dinov2-small-with-registers"
    path = seeded_file(reference, name, tmp_path)
    file = safetensors.torch.load_file(path)
    _, _, _, target = build(name)
    assert target["trunk.encoder.pos_embedding"].shape[1] == 16 * 16
    loaded, report = load_into(target, {"path": str(path)})
    pos = file["embeddings.position_embeddings"]
    assert torch.equal(loaded["trunk.class_token"], file["embeddings.cls_token"] + pos[:, :1])
    assert torch.equal(loaded["trunk.encoder.pos_embedding"], pos[:, 1:])
    assert any("folded into class_token" in n for n in report.notes)


def test_an_hf_vit_file_for_a_resnet_model_names_the_architecture(reference, tmp_path):
    path = seeded_file(reference, "dinov2-small", tmp_path)
    _, _, _, target = build("resnet-18")
    with pytest.raises(WeightsError, match="vit_small_patch14_dinov2"):
        load_into(target, {"path": str(path)})


@pytest.mark.parametrize("name, inferred, counts", [
    ("resnet-50", "ResNet-50 (after the hf_resnet rename table)", ("320 tensors", "265/265 tensors loaded")),
    # HF RegNet's names also fit HF_RESNET's rules, as a ResNet of no known depth: not an answer
    ("regnet-y-400mf", "preset 'regnet_y_400mf' found at 'regnet.' (after the hf_regnet rename table)",
     ("384 tensors", "329/329 tensors loaded"))])
def test_cli_inspect_infers_the_trunk_of_an_hf_file(reference, tmp_path, capsys, name, inferred, counts):
    path = seeded_file(reference, name, tmp_path)
    assert cli.main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert inferred in out and all(c in out for c in counts), out


def test_cli_convert_heads_takes_the_classifier_beside_the_backbone(reference, tmp_path):
    """``convert --heads`` writes torchvision's names, fc from *ForImageClassification's classifier.1
    (torchvision's resnet50 loads the result strictly and gives transformers' logits, checked by hand)."""
    path = seeded_file(reference, "resnet-50", tmp_path)
    out = tmp_path / "resnet50.safetensors"
    assert cli.main(["convert", str(path), str(out), "--heads"]) == 0
    written, file = safetensors.torch.load_file(out), safetensors.torch.load_file(path)
    assert torch.equal(written["fc.weight"], file["classifier.1.weight"])
    assert torch.equal(written["layer4.2.conv3.weight"], file["resnet.encoder.stages.3.layers.2.layer.2.convolution.weight"])
    assert len(written) == 320  # torchvision's resnet50 state_dict: 318 + fc


def test_cli_inspect_of_a_model_folder_takes_what_its_config_says(reference, tmp_path, capsys):
    """Names and shapes find ViT-B; the folder's config.json adds its LayerNorm eps (1e-12, which the
    tensors cannot show), so the trunk line printed is one that computes what transformers computes."""
    folder = tmp_path / "vit-base"
    folder.mkdir()
    seeded_file(reference, "vit-base-patch16-224-in21k", tmp_path).rename(folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({"model_type": "vit", "hidden_act": "gelu",
                                                    "layer_norm_eps": 1e-12}))
    assert cli.main(["inspect", str(folder)]) == 0
    trunk = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("trunk: "))
    assert "--ln-eps 1e-12 (inferred:" in trunk and trunk.endswith("ln_eps 1e-12 from its config.json); "
                                                                   "candidates by plain names:"), trunk
