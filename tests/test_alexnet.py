"""AlexNet against torchvision's facts: VISSL's features conv1..fc7, dropout in train mode only."""
import torch

from fpipe.models import alexnet
from _trunks import assert_close_to_largest, reference_outputs, reference_trunk

MODULES = dict(conv1="features.1", conv2="features.4", conv3="features.7", conv4="features.9",
               conv5="features.11", pool5="features.12", avgpool="avgpool", fc6="classifier.2",
               fc7="classifier.5")


def test_eval_features_match_torchvision_outputs(reference):
    ref = reference_outputs(reference, "alexnet_seed0_96px")
    trunk, params, state, sd = reference_trunk(reference, alexnet, "alexnet")
    feats, _ = trunk.apply(params, state, ref["input"], train=False, features=alexnet.FEATURES)
    for feature, module in MODULES.items():
        assert_close_to_largest(feats[feature], ref[f"eval.{module}"], feature)
    logits = feats["fc7"] @ sd["classifier.6.weight"].T + sd["classifier.6.bias"]
    assert_close_to_largest(logits, ref["eval.logits"], "logits")


def test_dropout_only_in_train_mode_and_cut_early():
    trunk = alexnet.build()
    params, state = trunk.init(0)
    x = torch.randn(2, 3, 64, 64)
    evals = trunk.apply(params, state, x, train=False, features=("pool5", "fc7"))[0]
    assert set(evals) == {"pool5", "fc7"}
    torch.manual_seed(0)
    train = trunk.apply(params, state, x, train=True, features=("fc7",))[0]["fc7"]
    assert not torch.allclose(train, evals["fc7"])
    no_dropout = alexnet.build(dropout=0.0)
    torch.testing.assert_close(no_dropout.apply(params, state, x, train=True, features=("fc7",))[0]["fc7"],
                               evals["fc7"])
    only_conv = trunk.apply({"features": {"0": params["features"]["0"]}}, state, x, train=True,
                            features=("conv1",))[0]  # nothing past conv1 is touched
    torch.testing.assert_close(only_conv["conv1"], trunk.apply(params, state, x, train=False,
                                                                features=("conv1",))[0]["conv1"])
