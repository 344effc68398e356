"""RegNet against torchvision's facts: generated widths, eval features, BatchNorm state."""
import pytest
import torch

from fpipe import tree
from fpipe.models import regnet
from _trunks import assert_close_to_largest, reference_outputs, reference_trunk

MODULES = dict(conv1="stem", res2="trunk_output.block1", res3="trunk_output.block2",
               res4="trunk_output.block3", res5="trunk_output.block4", res5avg="avgpool")
TINY = dict(depth=5, w_0=8, w_a=12, w_m=2.0, group_width=8, stem_width=8)


def test_eval_features_match_torchvision_outputs(reference):
    ref = reference_outputs(reference, "regnet_y_400mf_seed0_64px")
    trunk, params, state, sd = reference_trunk(reference, regnet, "regnet_y_400mf")
    feats, new_state = trunk.apply(params, state, ref["input"], train=False, features=regnet.FEATURES)
    for feature, module in MODULES.items():
        assert_close_to_largest(feats[feature], ref[f"eval.{module}"], feature)
    logits = feats["flatten"] @ sd["fc.weight"].T + sd["fc.bias"]  # torchvision's fc on flatten
    assert_close_to_largest(logits, ref["eval.logits"], "logits")
    assert tree.flatten(new_state).keys() == tree.flatten(state).keys()


# Stage widths and depths of torchvision's models (from their state dicts; the 400MF, 1.6GF,
# 16GF and 128GF rows are also checked name by name against the manifests in tests/test_zoo.py).
@pytest.mark.parametrize("name,widths,depths", [
    ("regnet_y_400mf", (48, 104, 208, 440), (1, 3, 6, 6)),
    ("regnet_y_800mf", (64, 144, 320, 784), (1, 3, 8, 2)),
    ("regnet_y_16gf", (224, 448, 1232, 3024), (2, 4, 11, 1)),
    ("regnet_y_32gf", (232, 696, 1392, 3712), (2, 5, 12, 1)),
    ("regnet_x_400mf", (32, 64, 160, 400), (1, 2, 7, 12)),
    ("regnet_x_32gf", (336, 672, 1344, 2520), (2, 7, 13, 1)),
])
def test_generated_stages_equal_torchvision(name, widths, depths):
    stages = regnet.build(**regnet.PRESETS[name]).spec.stages
    assert tuple(w for w, _, _ in stages) == widths
    assert tuple(d for _, d, _ in stages) == depths


def test_seer_regnet_builds_with_compatible_groups():
    """SEER's RegNetY-256GF (VISSL's parameters): 4 stages, every bottleneck divisible by its group
    width (torchvision's compatibility adjustment), built on the meta device (1.3B parameters)."""
    spec = regnet.build(**regnet.PRESETS["regnet_y_256gf"]).spec
    assert len(spec.stages) == 4 and all(w % g == 0 for w, _, g in spec.stages)
    with torch.device("meta"):
        params, _ = regnet.init_params(spec)
    assert params["trunk_output"]["block4"]["block4-0"]["f"]["c"]["0"]["weight"].shape[0] == spec.stages[-1][0]


def test_train_mode_updates_only_the_stages_that_ran_and_eval_norms_keep_stats():
    trunk = regnet.build(**TINY)
    params, state = trunk.init(0)
    x = torch.randn(4, 3, 32, 32)
    feats, new = trunk.apply(params, state, x, train=True, features=("res2",))
    assert set(feats) == {"res2"}
    ref = torch.nn.BatchNorm2d(8)
    ref(torch.nn.functional.conv2d(x, params["stem"]["0"]["weight"], None, 2, 1))
    torch.testing.assert_close(new["stem"]["1"]["running_var"], ref.running_var)
    flat_old, flat_new = tree.flatten(state), tree.flatten(new)
    assert list(flat_new) == list(flat_old)
    assert torch.equal(flat_new["trunk_output.block2.block2-0.f.a.1.running_mean"],
                       flat_old["trunk_output.block2.block2-0.f.a.1.running_mean"])
    assert int(flat_new["trunk_output.block1.block1-0.f.a.1.num_batches_tracked"]) == 1
    _, frozen = trunk.apply(params, state, x, train=True, features=("conv1",), eval_norms={"stem.1"})
    assert torch.equal(frozen["stem"]["1"]["running_var"], state["stem"]["1"]["running_var"])


def test_regnet_x_has_no_squeeze_excitation_and_bad_parameters_are_named():
    params, _ = regnet.build(**regnet.PRESETS["regnet_x_400mf"]).init(0)
    assert "se" not in params["trunk_output"]["block1"]["block1-0"]["f"]
    with pytest.raises(ValueError, match="w_0 > 0 and a multiple of 8"):
        regnet.build(w_0=12)
    with pytest.raises(ValueError, match="need 4"):
        regnet.build(depth=4, w_0=8, w_a=8, w_m=2.0)
