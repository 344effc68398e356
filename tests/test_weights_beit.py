"""BEiT-style files (timm's, microsoft/unilm's, transformers' BEiT and data2vec) load by
``format: auto`` and compute what their writers' code computes.

tests/fixtures/beit holds their names and shapes, shrunk to 2 blocks of width 192, and their
outputs with the reference folder's seeded weights (``make_beit_fixtures.py``, run in separate
venvs). Here the same weights are rebuilt with torch alone, saved as each project saves them,
loaded into fpipe's ViT and run.
"""
import json
import pathlib

import pytest
import safetensors.torch
import torch

from _trunks import assert_close_to_largest, load_target, loaded_trees
from fpipe.models import model as model_lib
from fpipe.weights import detect, load_into

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "beit"
MANIFESTS = json.loads((FIXTURES / "manifests.json").read_text())
OUTPUTS = torch.load(FIXTURES / "outputs.pt", weights_only=True)
SMALL = dict(depth=2, hidden_dim=192, heads=3, mlp_dim=768)
# microsoft/unilm's pretraining file: {"model": ...} with the masked-image-modeling head, the mask
# token and the index buffers (noise here: fpipe must compute its own)
UNILM_EXTRA = {"mask_token": (1, 1, 192), "lm_head.weight": (8192, 192), "lm_head.bias": (8192,),
               "rel_pos_bias.relative_position_index": (197, 197)}


def unilm(sd):
    extra = {n: torch.randn(shape) for n, shape in UNILM_EXTRA.items()}
    extra["rel_pos_bias.relative_position_index"] = torch.randint(0, 9, (197, 197))
    return {"model": {**sd, **extra}}


def hf_memory(sd):
    """transformers 5's in-memory names (torch.save(model.state_dict()))."""
    return {mem: sd[src].chunk(chunks)[i].clone() for mem, src, i, chunks in MANIFESTS["hf"]["memory_names"]}


# case -> (fixture, preset, options, how it is saved, format auto reports, feature -> fixture output)
CASES = {
    "timm": ("timm", "beit_base_patch16_224", {}, lambda sd: sd, "timm_vit", {"lastPOOL": "pooled"}),
    "timm_shared": ("timm_shared", "beit_base_patch16_224_pt22k", {}, lambda sd: sd, "timm_vit",
                    {"lastPOOL": "pooled", "tokens": "tokens"}),
    "unilm_pretraining": ("timm_shared", "beit_base_patch16_224_pt22k", {}, unilm, "timm_vit", {"lastPOOL": "pooled"}),
    "hf": ("hf", "beit_base_patch16_224", {"ln_eps": 1e-12}, lambda sd: sd, "hf_vit", {"lastPOOL": "pooled"}),
    "hf_memory": ("hf", "beit_base_patch16_224", {"ln_eps": 1e-12}, hf_memory, "hf_vit", {"lastPOOL": "pooled"}),
    "hf_data2vec": ("hf_data2vec", "beit_base_patch16_224_pt22k", {"ln_eps": 1e-12}, lambda sd: sd, "hf_vit",
                    {"lastCLS": "cls"}),
}


def loaded_trunk(reference, tmp_path, case):
    fixture, preset, options, save, table, _ = CASES[case]
    weights = reference.seeded_state_dict(MANIFESTS[fixture]["state_dict"], 0)
    path = tmp_path / "beit.pth"
    if fixture.startswith("hf") and save is not hf_memory:
        path = tmp_path / "model.safetensors"
        safetensors.torch.save_file(weights, path)
    else:
        torch.save(save(weights), path)
    trunk = model_lib.build_trunk(preset, **SMALL, **options)
    params, state, target = load_target(trunk)
    loaded, report = load_into(target, {"path": str(path)})
    assert report.format == f"auto ({table} names)" and report.trunk_loaded == report.trunk_total, report
    return trunk, loaded_trees(loaded, params, state), report


@pytest.mark.parametrize("case", sorted(CASES))
def test_file_computes_what_its_writer_computes(reference, tmp_path, case):
    trunk, trees, report = loaded_trunk(reference, tmp_path, case)
    assert not any(detect.is_derived(n) for n in report.loaded)
    wanted = CASES[case][5]
    out, _ = trunk.apply(*trees, reference.seeded_images(2, 224, seed=100), train=False,
                         features=tuple(wanted) + ("block0",))
    expected = OUTPUTS[CASES[case][0]]
    for feature, key in wanted.items():
        assert_close_to_largest(out[feature], expected[key], f"{case} {feature}")
    if "block0_cls" in expected:
        assert_close_to_largest(out["block0"][:, 0], expected["block0_cls"], f"{case} block0")


def test_the_pretraining_files_head_and_mask_token_are_left_out(reference, tmp_path):
    _, _, report = loaded_trunk(reference, tmp_path, "unilm_pretraining")
    left = report.not_loaded
    assert {"model.mask_token", "model.lm_head.weight", "model.lm_head.bias"} <= set(left), left
    assert left["model.rel_pos_bias.relative_position_index"].startswith("derived")


def test_another_input_size_resamples_the_bias_tables_as_transformers_does(reference, tmp_path):
    """transformers' BEiT with ``interpolate_pos_encoding`` resamples each table's offsets bilinearly."""
    trunk, trees, _ = loaded_trunk(reference, tmp_path, "hf")
    expected = OUTPUTS["hf"]["resized"]
    images = reference.seeded_images(2, expected["input_size"], seed=100)
    out, _ = trunk.apply(*trees, images, train=False, features=("lastPOOL",))
    assert_close_to_largest(out["lastPOOL"], expected["pooled"], "hf at 160 px")


def test_a_file_of_another_grid_loads_with_its_tables_resampled(reference, tmp_path):
    """A 224 px file (14×14 tables) in the 384 px preset (24×24) computes what the 224 px model
    computes on 384 px input: the load resamples each table as apply does, once."""
    small, small_trees, _ = loaded_trunk(reference, tmp_path, "timm")
    large = model_lib.build_trunk("beit_base_patch16_384", **SMALL)
    params, state, target = load_target(large)
    loaded, report = load_into(target, {"path": str(tmp_path / "beit.pth")})
    assert report.trunk_loaded == report.trunk_total
    name = "encoder.layers.encoder_layer_1.self_attention.relative_position_bias_table"
    assert loaded[f"trunk.{name}"].shape == (47 * 47 + 3, 3)
    assert sum("table of a 14x14 grid resampled to 24x24" in n for n in report.notes) == 2, report.notes
    images = reference.seeded_images(2, 384, seed=100)
    want, _ = small.apply(*small_trees, images, train=False, features=("lastPOOL",))
    got, _ = large.apply(*loaded_trees(loaded, params, state), images, train=False, features=("lastPOOL",))
    torch.testing.assert_close(got["lastPOOL"], want["lastPOOL"], atol=1e-5, rtol=1e-5)
