"""I-JEPA's and MSN's training checkpoints load by ``format: auto``, take ``target_encoder`` (the
copy their evaluations read) and compute what their writers' code computes.

tests/fixtures/jepa holds both encoders' names and shapes, shrunk to 2 blocks of width 192, and
their outputs with the reference folder's seeded weights (``make_jepa_fixtures.py``, run with
each repository's own model code). Here ``target_encoder`` holds those weights and ``encoder``
(the context / student copy) other ones, saved as ijepa's and msn's training scripts save them.
"""
import json
import pathlib

import pytest
import torch

from _trunks import assert_close_to_largest, load_target, loaded_trees
from fpipe import tree
from fpipe.models import model as model_lib
from fpipe.weights import WeightsError, infer, load_into

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "jepa"
MANIFESTS = json.loads((FIXTURES / "manifests.json").read_text())
OUTPUTS = torch.load(FIXTURES / "outputs.pt", weights_only=True)
SMALL = dict(depth=2, hidden_dim=192, heads=3, mlp_dim=768)


def module(sd: dict) -> dict:
    """DistributedDataParallel's names, as both training scripts save them."""
    return {f"module.{n}": t for n, t in sd.items()}


def ijepa_checkpoint(target: dict, context: dict) -> dict:
    """src/train.py's save_checkpoint: both encoders, the predictor, the optimizer and the scaler."""
    predictor = {"predictor_embed.weight": torch.randn(96, 192), "mask_token": torch.zeros(1, 1, 96),
                 "predictor_blocks.0.norm1.weight": torch.ones(96), "predictor_norm.weight": torch.ones(96),
                 "predictor_proj.weight": torch.randn(192, 96)}
    return {"encoder": module(context), "predictor": module(predictor), "target_encoder": module(target),
            "opt": {"state": {}, "param_groups": [{"lr": 1e-3, "params": [0, 1]}]}, "scaler": None,
            "epoch": 300, "loss": 0.1, "batch_size": 128, "world_size": 16, "lr": 1e-3}


def msn_checkpoint(target: dict, context: dict) -> dict:
    """src/msn_train.py's save_checkpoint: both encoders (with the projection head ``fc``), prototypes."""
    return {"encoder": module(context), "opt": {"state": {}, "param_groups": []},
            "prototypes": torch.randn(1024, 32), "target_encoder": module(target), "epoch": 600,
            "loss": 2.0, "batch_size": 64, "world_size": 32, "lr": 1e-3}


# case -> (preset, checkpoint writer, feature -> fixture output)
CASES = {"ijepa": ("vit_huge_patch14_gap_224", ijepa_checkpoint, {"lastPOOL": "pooled"}),
         "msn": ("vit_small_patch16_224", msn_checkpoint, {"lastCLS": "cls"})}


def checkpoint(reference, tmp_path, case) -> pathlib.Path:
    manifest = MANIFESTS[case]["state_dict"]
    path = tmp_path / f"{case}.pth.tar"
    torch.save(CASES[case][1](reference.seeded_state_dict(manifest, 0), reference.seeded_state_dict(manifest, 1)),
               path)
    return path


def loaded(case, path, **weights):
    trunk = model_lib.build_trunk(CASES[case][0], **SMALL)
    params, state, target = load_target(trunk)
    flat, report = load_into(target, {"path": str(path), **weights})
    assert report.trunk_loaded == report.trunk_total, report
    return trunk, loaded_trees(flat, params, state), flat, report


@pytest.mark.parametrize("case", sorted(CASES))
def test_takes_the_target_encoder_and_computes_what_its_code_computes(reference, tmp_path, case):
    trunk, trees, _, report = loaded(case, checkpoint(reference, tmp_path, case))
    assert report.state_dict_key == "target_encoder" and report.remove_prefix == "module.", report
    assert "MSN, I-JEPA and V-JEPA evaluate target_encoder" in report.reason
    assert not any(n.startswith("encoder.") for n in report.loaded)
    wanted = CASES[case][2]
    out, _ = trunk.apply(*trees, reference.seeded_images(2, 224, seed=100), train=False,
                         features=tuple(wanted) + ("tokens",))
    for feature, key in wanted.items():
        assert_close_to_largest(out[feature], OUTPUTS[case][key], f"{case} {feature}")
    if case == "ijepa":  # no class token: the tokens are the 256 patches
        assert_close_to_largest(out["tokens"][:, :4], OUTPUTS[case]["tokens_head"], "ijepa tokens")


def test_the_heads_prototypes_and_predictor_are_left_out(reference, tmp_path):
    _, _, _, report = loaded("msn", checkpoint(reference, tmp_path, "msn"))
    assert {"target_encoder.module.fc.fc1.weight", "target_encoder.module.fc.fc3.bias"} <= set(report.not_loaded)
    _, _, _, report = loaded("ijepa", checkpoint(reference, tmp_path, "ijepa"))
    assert "predictor.module.predictor_blocks.0.norm1.weight" in report.not_loaded


def test_select_takes_the_context_encoder(reference, tmp_path):
    """timm's I-JEPA weights are the context encoder: one setting takes it, as the report says."""
    path = checkpoint(reference, tmp_path, "ijepa")
    _, _, _, report = loaded("ijepa", path)
    assert "select='encoder.module.'" in report.reason
    _, _, flat, report = loaded("ijepa", path, select="encoder.module.")
    context = reference.seeded_state_dict(MANIFESTS["ijepa"]["state_dict"], 1)
    assert report.state_dict_key == "encoder"
    assert torch.equal(flat["trunk.conv_proj.weight"], context["patch_embed.proj.weight"])


def test_the_pair_below_the_top_of_a_file_is_refused(reference):
    """BYOL-style code that names its copies encoder / target_encoder evaluates encoder; below the
    file's top level no convention decides, so nothing loads until select says which."""
    sd = reference.seeded_state_dict(MANIFESTS["msn"]["state_dict"], 0)
    other = reference.seeded_state_dict(MANIFESTS["msn"]["state_dict"], 1)
    obj = {"state_dict": {**{f"model.encoder.{n}": t for n, t in sd.items()},
                          **{f"model.target_encoder.{n}": t for n, t in other.items()}}}
    trunk = model_lib.build_trunk("vit_small_patch16_224", **SMALL)
    _, _, target = load_target(trunk)
    with pytest.raises(WeightsError, match="encoder and target_encoder below 'state_dict.model.'.*select"):
        load_into(target, {}, obj=obj)
    flat, report = load_into(target, {"select": "state_dict.model.target_encoder."}, obj=obj)
    assert torch.equal(flat["trunk.class_token"], other["cls_token"])


@pytest.mark.parametrize("preset, millions, grid", [("vit_huge_patch14_gap_224", 630.76224, 16),
                                                    ("vit_huge_patch16_gap_448", 631.66848, 28),
                                                    ("vit_giant_patch16_gap_224", 1011.368576, 14)])
def test_ijepa_presets_have_timms_sizes(preset, millions, grid):
    """timm 1.0.31's parameter counts (num_classes=0) and position grids for its *_ijepa weights."""
    trunk = model_lib.build_trunk(preset)
    with torch.device("meta"):
        params, _ = trunk.init()
    flat = tree.flatten(params)
    assert sum(t.numel() for t in flat.values()) == round(millions * 1e6)
    assert flat["encoder.pos_embedding"].shape[1] == grid * grid and "class_token" not in flat


def test_a_full_size_ijepa_file_names_its_preset():
    """The CLI's inference (``weights inspect`` without ``--trunk``) on ViT-H/14's names and shapes,
    as meta tensors: the fixture's layout widened to 1280 and deepened to 32 blocks."""
    wide = {192: 1280, 576: 3840, 768: 5120}
    rows = [(n, s) for n, s, _ in MANIFESTS["ijepa"]["state_dict"] if not n.startswith("blocks.1.")]
    files = {}
    for name, shape in rows:
        for i in range(32) if name.startswith("blocks.0.") else [0]:
            key = f"target_encoder.module.{name.replace('blocks.0.', f'blocks.{i}.')}"
            files[key] = torch.empty([wide.get(d, d) for d in shape], device="meta")
    settings, why = infer.registry_trunk_of(files)
    assert settings == {"name": "vit_huge_patch14_gap_224"}, why
