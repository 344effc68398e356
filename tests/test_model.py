"""A trunk plus named heads from config: several layers evaluated in one pass, with clear errors."""
import ml_collections
import pytest
import torch

from fpipe import tree
from fpipe.models import model as models


def cfg(**heads):
    return ml_collections.ConfigDict(dict(trunk=models.trunk_config(depth=18), heads=heads))


def test_heads_on_several_layers_in_one_pass():
    m = models.build(cfg(res4=models.head_config("res4", "eval_mlp", pool=[2, 2]),
                         res5avg=models.head_config("res5avg", "eval_mlp"),
                         fc=models.head_config("flatten", "linear")), num_classes=7, image_size=32)
    params, state = m.init(0)
    names = tree.flatten(params)
    assert names["heads.res4.clf.clf.0.weight"].shape == (7, 256 * 2 * 2)
    assert names["heads.res5avg.clf.clf.0.weight"].shape == (7, 512)
    assert names["heads.fc.weight"].shape == (7, 512)
    x = torch.randn(3, 3, 32, 32)
    out, new_state = m.apply(params, state, x, train=False)
    assert {k: v.shape for k, v in out.items()} == {n: (3, 7) for n in ("res4", "res5avg", "fc")}
    # the fc head equals a linear layer on the trunk's flatten feature
    flat = m.features(params, state, x, ("flatten",))["flatten"]
    torch.testing.assert_close(out["fc"], flat @ params["heads"]["fc"]["weight"].T + params["heads"]["fc"]["bias"])


def test_chain_of_heads():
    m = models.build(cfg(proj=dict(feature="flatten", chain=[dict(type="mlp", dims=[64], use_relu=True,
                                                                   skip_last_layer_relu_bn=False),
                                                              dict(type="linear")])),
                     num_classes=5, image_size=32)
    params, state = m.init(0)
    assert tree.flatten(params)["heads.proj.1.weight"].shape == (5, 64)
    out, _ = m.apply(params, state, torch.randn(2, 3, 32, 32), train=True)
    assert out["proj"].shape == (2, 5)


def test_unknown_names_list_valid_ones():
    with pytest.raises(ValueError, match=r"valid families: \[.*'resnet'.*presets: \[.*'resnet18'"):
        models.build(ml_collections.ConfigDict(dict(trunk=dict(name="vgg16"), heads={})), num_classes=2, image_size=32)
    with pytest.raises(ValueError, match="valid:.*res5avg"):
        models.build(cfg(x=dict(feature="res9")), num_classes=2, image_size=32)
    with pytest.raises(ValueError, match="unknown type 'svm'"):
        models.build(cfg(x=dict(feature="res5avg", type="svm")), num_classes=2, image_size=32)
    with pytest.raises(ValueError, match="unknown key"):
        models.build(cfg(x=dict(feature="res5avg", poool=[1, 1])), num_classes=2, image_size=32)


def test_vissl_dims_list_the_input_size_first():
    """A VISSL head config translates one to one: ["mlp", {"dims": [512, 128, 10]}]."""
    vissl = models.build(cfg(h=models.head_config("res5avg", "mlp", dims=[512, 128, 10], vissl_dims=True,
                                                  use_relu=True)), num_classes=10, image_size=32)
    ours = models.build(cfg(h=models.head_config("res5avg", "mlp", dims=[128, 10], use_relu=True)),
                        num_classes=10, image_size=32)
    shapes = lambda m: {k: v.shape for k, v in tree.flatten(m.init(0)[0]["heads"]).items()}
    assert shapes(vissl) == shapes(ours) == {"h.clf.0.weight": (128, 512), "h.clf.0.bias": (128,),
                                             "h.clf.2.weight": (10, 128), "h.clf.2.bias": (10,)}
    pooled = models.build(cfg(h=models.head_config("res4", "eval_mlp", pool=[2, 2], dims=[1024, 10],
                                                   vissl_dims=True)), num_classes=10, image_size=32)
    assert tree.flatten(pooled.init(0)[0]["heads"])["h.clf.clf.0.weight"].shape == (10, 1024)
    with pytest.raises(ValueError, match=r"model.heads.h: vissl_dims=True lists the input size first.*input here is 512"):
        models.build(cfg(h=models.head_config("res5avg", "mlp", dims=[2048, 10], vissl_dims=True)),
                     num_classes=10, image_size=32)


def test_building_a_model_allocates_no_trunk(monkeypatch):
    """The heads' input shapes come from the trunk on the meta device, init included: building a
    RegNet-Y 128GF (645M values) draws none of them (it took 9 s and 2.6 GB of memory before)."""
    inits, build_trunk = [], models.build_trunk

    def recording(name, **options):
        trunk = build_trunk(name, **options)

        def init(seed=0):
            params, state = trunk.init(seed)
            inits.append({t.device.type for t in tree.leaves(params) + tree.leaves(state)})
            return params, state
        return trunk._replace(init=init)

    monkeypatch.setattr(models, "build_trunk", recording)
    m = models.build(ml_collections.ConfigDict(dict(trunk=dict(name="regnet_y_128gf"), heads=dict(
        fc=models.head_config("flatten", "linear"), res4=models.head_config("res4", "eval_mlp", pool=[2, 2])))),
        num_classes=7, image_size=64)
    assert inits == [{"meta"}]
    shapes = {n: tuple(t.shape) for n, t in tree.flatten(m.init_heads(0)[0]).items()}
    assert shapes["fc.weight"] == (7, 7392) and shapes["res4.clf.clf.0.weight"] == (7, 2904 * 2 * 2)
