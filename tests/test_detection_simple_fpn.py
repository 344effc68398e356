"""ViTDet's simple feature pyramid: equal to the same layers written with torch.nn (detectron2's
SimpleFeaturePyramid layout, weights copied by name), and a ViT detector that trains and predicts."""
import pytest
import torch
import torch.nn as nn
from torch.func import grad_and_value

from fpipe import freeze, tree
from fpipe.detection import model as det_model
from fpipe.detection import simple_fpn


class ChannelsFirstLayerNorm(nn.Module):  # detectron2.layers.LayerNorm
    def __init__(self, c):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.ones(c)), nn.Parameter(torch.zeros(c))

    def forward(self, x):
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        return self.weight[:, None, None] * ((x - u) / torch.sqrt(s + 1e-6)) + self.bias[:, None, None]


class NormedConv(nn.Conv2d):  # detectron2.layers.Conv2d(..., bias=False, norm=LayerNorm)
    def __init__(self, cin, cout, k):
        super().__init__(cin, cout, k, padding=k // 2, bias=False)
        self.norm = ChannelsFirstLayerNorm(cout)

    def forward(self, x):
        return self.norm(super().forward(x))


def reference(dim, out):
    stages = nn.ModuleDict()
    stages["simfp_2"] = nn.Sequential(nn.ConvTranspose2d(dim, dim // 2, 2, 2), ChannelsFirstLayerNorm(dim // 2),
                                      nn.GELU(), nn.ConvTranspose2d(dim // 2, dim // 4, 2, 2),
                                      NormedConv(dim // 4, out, 1), NormedConv(out, out, 3))
    stages["simfp_3"] = nn.Sequential(nn.ConvTranspose2d(dim, dim // 2, 2, 2), NormedConv(dim // 2, out, 1),
                                      NormedConv(out, out, 3))
    stages["simfp_4"] = nn.Sequential(NormedConv(dim, out, 1), NormedConv(out, out, 3))
    stages["simfp_5"] = nn.Sequential(nn.MaxPool2d(2, 2), NormedConv(dim, out, 1), NormedConv(out, out, 3))
    return stages


def test_simple_pyramid_equals_the_nn_layers():
    params, _ = simple_fpn.init(0, 32, 24, in_stride=16)
    gen = torch.Generator().manual_seed(1)
    params = tree.map_leaves(lambda t: t + 0.1 * torch.randn(t.shape, generator=gen), params)  # norms not 1 / 0
    ref = reference(32, 24)
    assert set(tree.flatten(params)) == set(ref.state_dict())  # detectron2's names
    ref.load_state_dict(tree.flatten(params))
    x = torch.randn(2, 32, 6, 8, generator=gen)
    outs, _ = simple_fpn.apply(params, {}, x)
    with torch.no_grad():
        want = [ref[f"simfp_{k}"](x) for k in (2, 3, 4, 5)]
    assert [tuple(o.shape[-2:]) for o in outs] == [(24, 32), (12, 16), (6, 8), (3, 4), (2, 2)]
    for got, w in zip(outs, want):
        torch.testing.assert_close(got, w, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outs[-1], nn.functional.max_pool2d(want[-1], 1, 2))


def vit_config():
    cfg = det_model.default_config()
    cfg.backbone.name, cfg.backbone.freeze_at, cfg.backbone.features = "vit", 0, ("patch_grid",)
    cfg.backbone.options = dict(patch_size=16, hidden_dim=64, depth=2, heads=2, mlp_dim=128, image_size=64)
    cfg.fpn.simple, cfg.fpn.out_channels = True, 32
    cfg.rpn.anchor_sizes = ((8,), (16,), (32,), (64,), (128,))
    cfg.rpn.pre_nms_top_n_train = cfg.rpn.post_nms_top_n_train = 40
    cfg.rpn.pre_nms_top_n_test = cfg.rpn.post_nms_top_n_test = 40
    cfg.box_head.batch_size_per_image, cfg.box_head.representation_size = 32, 64
    return cfg


def test_a_vit_detector_trains_and_predicts():
    model = det_model.build(vit_config(), 4)
    params, state = model.init(0)
    assert "backbone.fpn.simfp_2.0.weight" in tree.flatten(params)
    trainable, frozen = freeze.partition(params, model.freeze_rules(params))
    batch = {"image": torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(3)),
             "image_size": torch.tensor([[64, 96], [60, 70]]),
             "boxes": torch.tensor([[[4., 6., 40., 30.], [30., 20., 80., 60.]], [[10., 10., 50., 50.], [0., 0., 0., 0.]]]),
             "labels": torch.tensor([[1, 2], [3, 0]]), "valid": torch.tensor([[True, True], [True, False]])}

    def loss(trainable):
        return model.losses(tree.merge(trainable, frozen), state, batch, generator=torch.Generator().manual_seed(0))[0]

    grads, total = grad_and_value(loss)(trainable)
    assert torch.isfinite(total)
    for part in ("body", "fpn"):
        g = tree.flatten(grads["backbone"][part])
        assert all(torch.isfinite(v).all() for v in g.values()) and sum(float(v.abs().sum()) for v in g.values()) > 0
    assert len(model.predict(params, state, batch["image"], batch["image_size"])) == 2


def test_simple_pyramid_needs_one_feature():
    cfg = vit_config()
    cfg.backbone.features = ("block0", "patch_grid")
    with pytest.raises(ValueError, match="one backbone feature"):
        det_model.build(cfg, 4)
