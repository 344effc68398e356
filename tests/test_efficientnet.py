"""EfficientNet against torchvision's facts: eval features, widths of the larger models,
stochastic depth only in train mode."""
import pytest
import torch

from fpipe.models import efficientnet
from _trunks import assert_close_to_largest, reference_outputs, reference_trunk

MODULES = {"stem": "features.0", **{f"stage{i}": f"features.{i}" for i in range(1, 8)},
           "head_conv": "features.8", "avgpool": "avgpool"}


def test_eval_features_match_torchvision_outputs(reference):
    ref = reference_outputs(reference, "efficientnet_b0_seed0_64px")
    trunk, params, state, sd = reference_trunk(reference, efficientnet, "efficientnet_b0")
    feats, _ = trunk.apply(params, state, ref["input"], train=False, features=efficientnet.FEATURES)
    for feature, module in MODULES.items():
        assert_close_to_largest(feats[feature], ref[f"eval.{module}"], feature)
    logits = feats["flatten"] @ sd["classifier.1.weight"].T + sd["classifier.1.bias"]
    assert_close_to_largest(logits, ref["eval.logits"], "logits")


# torchvision's classifier input width and block count per model
@pytest.mark.parametrize("name,head,blocks", [("efficientnet_b0", 1280, 16), ("efficientnet_b3", 1536, 26),
                                              ("efficientnet_b7", 2560, 55)])
def test_scaled_widths_and_depths(name, head, blocks):
    spec = efficientnet.build(**efficientnet.PRESETS[name]).spec
    assert spec.head_width == head
    assert sum(len(s) for s in spec.stages()) == blocks


def test_b5_to_b7_use_torchvisions_batch_norm_settings():
    assert efficientnet.build(**efficientnet.PRESETS["efficientnet_b6"]).spec.norm_eps == 1e-3
    assert efficientnet.build(**efficientnet.PRESETS["efficientnet_b4"]).spec.norm_eps == 1e-5


def test_stochastic_depth_is_off_by_default_and_acts_in_train_mode_only():
    x = torch.randn(8, 3, 32, 32)
    plain = efficientnet.build()
    params, state = plain.init(0)
    dropping = efficientnet.build(stochastic_depth_prob=0.9)
    assert dropping.spec.stages()[0][0].drop == 0.0  # the ramp starts at 0 ...
    assert dropping.spec.stages()[-1][-1].drop == pytest.approx(0.9 * 15 / 16)  # ... as torchvision's
    eval_plain, _ = plain.apply(params, state, x, train=False, features=("stage3",))
    eval_drop, _ = dropping.apply(params, state, x, train=False, features=("stage3",))
    assert torch.equal(eval_plain["stage3"], eval_drop["stage3"])
    train_plain, _ = plain.apply(params, state, x, train=True, features=("stage3",))
    torch.manual_seed(0)
    a, _ = dropping.apply(params, state, x, train=True, features=("stage3",))
    torch.manual_seed(0)
    b, _ = dropping.apply(params, state, x, train=True, features=("stage3",))
    assert torch.equal(a["stage3"], b["stage3"])  # reproducible under a seed
    assert not torch.allclose(a["stage3"], train_plain["stage3"])
