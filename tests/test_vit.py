"""The ViT trunk against torchvision's and timm's facts: names, shapes, outputs; features; resampling."""
import math
import re

import ml_collections
import pytest
import torch
import torch.nn.functional as F

from fpipe import tree
from fpipe.data import pipeline
from fpipe.models import model as model_lib
from fpipe.models import vit
from fpipe.models.trunk import init_on_meta

# timm name -> ours (the weights helper's rename table says the same; kept here independently).
TIMM_TO_OURS = [
    (r"cls_token", "class_token"), (r"reg_token", "register_tokens"), (r"pos_embed", "encoder.pos_embedding"),
    (r"patch_embed\.proj\.(.*)", r"conv_proj.\1"), (r"norm\.(.*)", r"encoder.ln.\1"),
    (r"blocks\.(\d+)\.norm1\.(.*)", r"encoder.layers.encoder_layer_\1.ln_1.\2"),
    (r"blocks\.(\d+)\.norm2\.(.*)", r"encoder.layers.encoder_layer_\1.ln_2.\2"),
    (r"blocks\.(\d+)\.attn\.qkv\.(weight|bias)", r"encoder.layers.encoder_layer_\1.self_attention.in_proj_\2"),
    (r"blocks\.(\d+)\.attn\.proj\.(.*)", r"encoder.layers.encoder_layer_\1.self_attention.out_proj.\2"),
    (r"blocks\.(\d+)\.mlp\.fc1\.(.*)", r"encoder.layers.encoder_layer_\1.mlp.0.\2"),
    (r"blocks\.(\d+)\.mlp\.fc2\.(.*)", r"encoder.layers.encoder_layer_\1.mlp.3.\2"),
    (r"blocks\.(\d+)\.ls([12])\.gamma", r"encoder.layers.encoder_layer_\1.ls_\2.gamma"),
]
# manifest -> (preset, overrides); timm manifests are renamed with TIMM_TO_OURS.
MANIFESTS = {
    "vit_b_16": ("vit_b_16", {}), "vit_b_32": ("vit_b_32", {}), "vit_l_16": ("vit_l_16", {}),
    "vit_small_patch16_224": ("vit_small_patch16_224", {}), "vit_base_patch16_224": ("vit_base_patch16_224", {}),
    "vit_large_patch16_224": ("vit_large_patch16_224", {}),
    "vit_small_patch14_dinov2": ("vit_small_patch14_dinov2", {}),
    "vit_base_patch14_dinov2": ("vit_base_patch14_dinov2", {}),
    "vit_small_patch14_dinov2_img_size224": ("vit_small_patch14_dinov2", dict(image_size=224)),
    "vit_small_patch14_reg4_dinov2": ("vit_small_patch14_reg4_dinov2", {}),
    "vit_small_patch14_reg4_dinov2_img_size224": ("vit_small_patch14_reg4_dinov2", dict(image_size=224)),
}
TINY = dict(patch_size=4, hidden_dim=32, depth=5, heads=4, mlp_dim=64, image_size=16)


def ours(name):
    """Our name of a torchvision or timm state_dict entry; None for the classifier."""
    if name.startswith(("heads.head.", "head.")):
        return None
    if name.startswith(("class_token", "conv_proj", "encoder.")):
        return name
    for pattern, repl in TIMM_TO_OURS:
        if re.fullmatch(pattern, name):
            return re.sub(pattern, repl, name)
    raise KeyError(name)


def reference_params(reference, manifest):
    sd = reference.seeded_state_dict(reference.load_manifest(manifest), 0)
    return tree.unflatten({ours(n): v for n, v in sd.items() if ours(n)}), sd


def relative_error(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("manifest", sorted(MANIFESTS))
def test_names_shapes_dtypes_equal_the_manifests(reference, manifest):
    preset, overrides = MANIFESTS[manifest]
    params, state = init_on_meta(vit.build(**{**vit.PRESETS[preset], **overrides}))
    assert state == {}
    got = {n: (list(t.shape), str(t.dtype)) for n, t in tree.flatten(params).items()}
    expected = {ours(n): (s, d) for n, s, d in reference.load_manifest(manifest) if ours(n)}
    assert got == expected


def test_init_on_the_meta_device_is_the_real_init_without_values():
    options = dict(TINY, layer_scale=0.1, num_registers=2)
    real, _ = vit.build(**options).init(3)
    meta, _ = init_on_meta(vit.build(**options))
    assert {n: t.shape for n, t in tree.flatten(real).items()} == {n: t.shape for n, t in tree.flatten(meta).items()}
    assert all(t.is_meta for t in tree.leaves(meta))
    layer = real["encoder"]["layers"]["encoder_layer_0"]
    assert torch.equal(layer["ls_1"]["gamma"], torch.full((32,), 0.1))
    assert torch.equal(real["class_token"], torch.zeros(1, 1, 32))
    assert 0.01 < float(real["encoder"]["pos_embedding"].std()) < 0.03  # torchvision: normal(0.02)
    again, _ = vit.build(**options).init(3)
    assert all(torch.equal(a, b) for a, b in zip(tree.leaves(real), tree.leaves(again)))


# ---------------------------------------------------------------- outputs equal the fixtures
def _blocks(depth):
    return tuple(f"block{i}" for i in range(depth))


@pytest.fixture(scope="module")
def torchvision_b16(reference):
    ref = torch.load(reference.OUTPUTS / "vit_b_16_seed0_224px.pt", weights_only=True)
    params, sd = reference_params(reference, "vit_b_16")
    trunk = vit.build(**vit.PRESETS["vit_b_16"])
    x = ref["input"][:1]  # one image keeps it fast; the fixture's first row is its output
    feats, state = trunk.apply(params, {}, x, train=False, features=_blocks(12) + ("tokens", "lastCLS"))
    return ref, params, sd, x, feats, state


def test_vit_b_16_equals_torchvision(torchvision_b16):
    ref, params, sd, x, feats, state = torchvision_b16
    assert state == {}
    close = lambda got, key: relative_error(got, ref[key][:1]) <= 1e-4
    assert close(vit.patch_embed(params, x, 16), "eval.conv_proj")
    assert close(feats["block0"], "eval.encoder.layers.encoder_layer_0")
    for i in range(12):
        assert close(feats[f"block{i}"][:, 0], f"eval.encoder.layers.encoder_layer_{i}.cls"), i
    assert close(feats["tokens"], "eval.encoder.ln")
    assert close(feats["lastCLS"], "eval.encoder.ln.cls")
    assert close(F.linear(feats["lastCLS"], sd["heads.head.weight"], sd["heads.head.bias"]), "eval.logits")


@pytest.mark.parametrize("manifest,preset,overrides", [
    ("vit_small_patch16_224", "vit_small_patch16_224", {}),
    ("vit_small_patch14_reg4_dinov2_img_size224", "vit_small_patch14_reg4_dinov2", dict(image_size=224)),
])
def test_timm_layouts_equal_timm(reference, manifest, preset, overrides):
    ref = torch.load(reference.OUTPUTS / f"{manifest}_seed0_224px.pt", weights_only=True)
    params, sd = reference_params(reference, manifest)
    trunk = vit.build(**{**vit.PRESETS[preset], **overrides})
    x = ref["input"][:1]
    feats, _ = trunk.apply(params, {}, x, train=False, features=_blocks(12) + ("tokens", "lastCLS"))
    close = lambda got, key: relative_error(got, ref[key][:1]) <= 1e-4
    assert close(vit.patch_embed(params, x, trunk.spec.patch_size).flatten(2)[:, :, 0], "eval.patch_embed.cls")
    assert close(feats["block0"], "eval.blocks.0")  # [class, registers, patches], as timm
    for i in range(12):
        assert close(feats[f"block{i}"][:, 0], f"eval.blocks.{i}.cls"), i
    assert close(feats["tokens"], "eval.norm")
    logits = F.linear(feats["lastCLS"], sd["head.weight"], sd["head.bias"]) if "head.weight" in sd else feats["lastCLS"]
    assert close(logits, "eval.logits")


# ---------------------------------------------------------------- position embedding resampling
def _cubic(t, a):
    t = abs(t)
    if t <= 1:
        return ((a + 2) * t - (a + 3)) * t * t + 1
    if t < 2:
        return (((t - 5) * t + 8) * t - 4) * a
    return 0.0


def _matrix(n_in, n_out, mode, scale_factor=None):
    """Slow 1-d resampling matrix (n_out × n_in), written from the kernels' definitions."""
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    scale = n_in / n_out if scale_factor is None else 1 / scale_factor
    for i in range(n_out):
        if mode == "bicubic_antialias":  # PIL: a=-0.5, support widened by the scale when shrinking
            support, stretch = 2 * max(scale, 1.0), max(scale, 1.0)
            center = (i + 0.5) * scale
            lo, hi = max(int(center - support + 0.5), 0), min(int(center + support + 0.5), n_in)
            w = [_cubic((j - center + 0.5) / stretch, -0.5) for j in range(lo, hi)]
            for j, wj in zip(range(lo, hi), w):
                m[i, j] += wj / sum(w)
        else:  # torch's bicubic: a=-0.75, four taps, borders clamped
            src = (i + 0.5) * scale - 0.5
            base = math.floor(src)
            for k in range(-1, 3):
                m[i, min(max(base + k, 0), n_in - 1)] += _cubic(src - (base + k), -0.75)
    return m


def _slow_resample(pos, new_hw, num_prefix, mode, old_hw):
    d = pos.shape[-1]
    grid = pos[0, num_prefix:].double().reshape(*old_hw, d)
    sf = lambda new, old: (new + 0.1) / old if mode == "bicubic_offset" else None
    mh = _matrix(old_hw[0], new_hw[0], mode, sf(new_hw[0], old_hw[0]))
    mw = _matrix(old_hw[1], new_hw[1], mode, sf(new_hw[1], old_hw[1]))
    out = torch.einsum("ah,bw,hwd->abd", mh, mw, grid).reshape(1, -1, d)
    return torch.cat([pos[:, :num_prefix].double(), out], dim=1).float()


@pytest.mark.parametrize("mode", vit.RESAMPLE_MODES)
@pytest.mark.parametrize("old_hw,new_hw", [((6, 6), (4, 3)), ((4, 4), (7, 9)), ((37, 37), (16, 16))])
def test_resample_pos_embedding_equals_a_slow_bicubic(mode, old_hw, new_hw):
    num_prefix = 1 if old_hw[0] != 4 else 0
    pos = torch.randn(1, num_prefix + old_hw[0] * old_hw[1], 3, generator=torch.Generator().manual_seed(0))
    got = vit.resample_pos_embedding(pos, new_hw, num_prefix, mode=mode,
                                     old_grid_hw=None if old_hw[0] == old_hw[1] else old_hw)
    expected = _slow_resample(pos, new_hw, num_prefix, mode, old_hw)
    assert got.shape == (1, num_prefix + new_hw[0] * new_hw[1], 3)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    if num_prefix:
        assert torch.equal(got[:, :1], pos[:, :1])


def test_a_dinov2_file_at_its_37x37_grid_evaluates_at_224_px(reference):
    """The 518-px DINOv2 layout on 224-px images equals a 224-grid model given the resampled grid."""
    params, _ = reference_params(reference, "vit_small_patch14_reg4_dinov2")
    assert params["encoder"]["pos_embedding"].shape == (1, 37 * 37, 384)
    x = reference.seeded_images(1, 224, seed=5)
    features = ("block0", "block1")  # the position embedding enters before block 0
    got, _ = vit.build(**vit.PRESETS["vit_small_patch14_reg4_dinov2"]).apply(params, {}, x, train=False,
                                                                             features=features)
    small = dict(params, encoder=dict(params["encoder"], pos_embedding=_slow_resample(
        params["encoder"]["pos_embedding"], (16, 16), 0, "bicubic_antialias", (37, 37))))
    expected, _ = vit.build(**{**vit.PRESETS["vit_small_patch14_reg4_dinov2"], "image_size": 224}).apply(
        small, {}, x, train=False, features=features)
    assert got["block0"].shape == (1, 1 + 4 + 256, 384)
    for f in features:
        assert relative_error(got[f], expected[f]) <= 1e-4, f


# ---------------------------------------------------------------- features
@pytest.fixture(scope="module")
def tiny():
    trunk = vit.build(**TINY, num_registers=2, layer_scale=0.5)
    params, _ = trunk.init(0)
    # Non-trivial final norm, so that "after the final norm" is checked.
    params["encoder"]["ln"] = {"weight": torch.rand(32) + 0.5, "bias": torch.randn(32)}
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    return trunk, params, x


def test_features_are_vissl_and_dinov2_definitions(tiny):
    trunk, params, x = tiny
    feats, _ = trunk.apply(params, {}, x, train=False, features=trunk.features)
    ln = lambda t: F.layer_norm(t, (32,), params["encoder"]["ln"]["weight"], params["encoder"]["ln"]["bias"], 1e-6)
    blocks = [ln(feats[f"block{i}"]) for i in range(5)]  # prefix: class + 2 registers
    cls = [b[:, 0] for b in blocks]
    mean = [b[:, 3:].mean(1) for b in blocks]
    close = lambda a, b: torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    close(feats["tokens"], blocks[-1])
    close(feats["lastCLS"], cls[-1])
    close(feats["lastPOOL"], mean[-1])
    close(feats["concatCLS4"], torch.cat(cls[1:], 1))
    close(feats["concatPOOL4"], torch.cat(mean[1:], 1))
    close(feats["cls1_avgpool"], torch.cat([cls[-1], mean[-1]], 1))
    dino = torch.cat((cls[-1].unsqueeze(-1), mean[-1].unsqueeze(-1)), dim=-1).reshape(3, -1)  # eval_linear.py's
    close(feats["cls1_avgpool_interleaved"], dino)
    close(feats["cls4_avgpool"], torch.cat(cls[1:] + [mean[-1]], 1))
    close(feats["patch_grid"], blocks[-1][:, 3:].reshape(3, 4, 4, 32).permute(0, 3, 1, 2))
    assert feats["patch_grid"][:, :, 1, 2].equal(feats["tokens"][:, 3 + 1 * 4 + 2])  # row-major patches
    assert feats["cls4_avgpool"].shape == (3, 5 * 32)
    for i in range(5):  # block features: the block's output as it is, not normed (BEiT's probe)
        raw = feats[f"block{i}"]
        close(feats[f"block{i}CLS"], raw[:, 0])
        close(feats[f"block{i}POOL"], raw[:, 3:].mean(1))
        close(feats[f"block{i}_cls_avgpool"], torch.cat([raw[:, 0], raw[:, 3:].mean(1)], 1))
    assert trunk.features[:8] == ("block0", "block0CLS", "block0POOL", "block0_cls_avgpool", "block1",
                                  "block1CLS", "block1POOL", "block1_cls_avgpool")
    assert trunk.features[:20][::4] == _blocks(5) and trunk.features[20:] == vit.FEATURES


def test_blocks_run_only_as_far_as_the_deepest_requested_feature(tiny):
    trunk, params, x = tiny
    full, _ = trunk.apply(params, {}, x, train=False, features=("block1", "lastCLS"))
    cut = dict(params, encoder=dict(params["encoder"], layers={
        k: v for k, v in params["encoder"]["layers"].items() if k in ("encoder_layer_0", "encoder_layer_1")}))
    del cut["encoder"]["ln"]
    part, _ = trunk.apply(cut, {}, x, train=False, features=("block1",))  # later blocks would KeyError
    assert set(part) == {"block1"} and torch.equal(part["block1"], full["block1"])
    part, _ = trunk.apply(cut, {}, x, train=False, features=("block1_cls_avgpool", "block0CLS"))
    assert set(part) == {"block1_cls_avgpool", "block0CLS"}


def test_fc_norm_pools_then_norms_and_no_class_token_layout():
    trunk = vit.build(**TINY, class_token=False, pos_embed_class=False, fc_norm=True)
    params, _ = trunk.init(0)
    assert "ln" not in params["encoder"] and "class_token" not in params and "fc_norm" in params
    assert "lastCLS" not in trunk.features and "concatPOOL4" in trunk.features
    assert "block0POOL" in trunk.features and not {"block0CLS", "block0_cls_avgpool"} & set(trunk.features)
    x = torch.randn(2, 3, 16, 16)
    feats, _ = trunk.apply(params, {}, x, train=False, features=("block4", "lastPOOL", "tokens"))
    assert feats["tokens"].shape == (2, 16, 32) and torch.equal(feats["tokens"], feats["block4"])
    fc = params["fc_norm"]
    torch.testing.assert_close(feats["lastPOOL"], F.layer_norm(feats["block4"].mean(1), (32,), fc["weight"], fc["bias"], 1e-6))


@pytest.mark.parametrize("mlp, gelu", [("gelu", "none"), ("gelu_tanh", "tanh")])
def test_block_math_equals_torch_nn_modules(mlp, gelu):
    """One block against nn.LayerNorm + nn.MultiheadAttention + nn.Linear/GELU (torchvision's
    EncoderBlock); gelu_tanh: GELU's tanh approximation, Flax's nn.gelu."""
    trunk = vit.build(**dict(TINY, depth=1, mlp=mlp))
    params, _ = trunk.init(0)
    p = params["encoder"]["layers"]["encoder_layer_0"]
    for t in tree.leaves(p):  # non-trivial norms and biases
        t.add_(0.1 * torch.randn(t.shape))
    ln1, ln2 = torch.nn.LayerNorm(32, eps=1e-6), torch.nn.LayerNorm(32, eps=1e-6)
    attn = torch.nn.MultiheadAttention(32, 4, batch_first=True)
    ffn = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(approximate=gelu), torch.nn.Dropout(),
                              torch.nn.Linear(64, 32))
    for module, key in ((ln1, "ln_1"), (ln2, "ln_2"), (attn, "self_attention"), (ffn, "mlp")):
        module.load_state_dict(tree.flatten(p[key]))
    x = torch.randn(2, 7, 32)
    with torch.no_grad():
        h = x + attn(ln1(x), ln1(x), ln1(x), need_weights=False)[0]
        expected = h + ffn.eval()(ln2(h))
    torch.testing.assert_close(vit.block(trunk.spec, p, x), expected, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- compile, meta, autocast, registry
def test_compiles_with_fullgraph_and_equals_eager():
    """One graph, no breaks (dynamo fullgraph + AOT autograd tracing; inductor itself runs in the
    frozen-trunk path of every linear-eval run), on an input grid that needs resampling; the same
    features and, under torch.func.grad, gradients."""
    trunk = vit.build(**dict(TINY, depth=2, num_registers=1, layer_scale=0.5, pos_resample="bicubic_antialias"))
    params, _ = trunk.init(0)
    x = torch.randn(2, 3, 20, 24)
    features = ("lastCLS", "cls1_avgpool", "patch_grid")
    eager, _ = trunk.apply(params, {}, x, train=False, features=features)
    compiled = torch.compile(lambda p, im: trunk.apply(p, {}, im, train=False, features=features)[0],
                             fullgraph=True, dynamic=False, backend="aot_eager")
    got = compiled(params, x)
    assert got["patch_grid"].shape == (2, 32, 5, 6)
    for f in features:
        torch.testing.assert_close(got[f], eager[f], atol=1e-5, rtol=1e-5)

    def loss(p):  # the gradients too, through torch.func.grad under torch.compile, in train mode
        feats, _ = trunk.apply(p, {}, x, train=True, features=features)
        return sum(f.square().mean() for f in feats.values())

    want = tree.flatten(torch.func.grad(loss)(params))
    got = tree.flatten(torch.compile(torch.func.grad(loss), fullgraph=True, dynamic=False, backend="aot_eager")(params))
    assert list(got) == list(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=name)


def test_meta_device_bf16_autocast_and_grads(tiny):
    trunk, params, x = tiny
    meta_params = tree.map_leaves(lambda t: t.to("meta"), params)
    feats, _ = trunk.apply(meta_params, {}, torch.empty(2, 3, 24, 24, device="meta"), train=False,
                           features=("cls4_avgpool", "patch_grid"))
    assert feats["cls4_avgpool"].shape == (2, 160) and feats["patch_grid"].shape == (2, 32, 6, 6)
    ref, _ = trunk.apply(params, {}, x, train=False, features=("lastCLS",))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low, _ = trunk.apply(params, {}, x, train=True, features=("lastCLS",))
    assert relative_error(low["lastCLS"].float(), ref["lastCLS"]) < 0.05
    grads = torch.func.grad(lambda p: trunk.apply(p, {}, x, train=True, features=("lastPOOL",))[0]["lastPOOL"].square().sum())(params)
    assert all(torch.isfinite(g).all() for g in tree.leaves(grads))
    assert float(grads["encoder"]["layers"]["encoder_layer_0"]["mlp"]["0"]["weight"].abs().sum()) > 0


def test_model_registry_builds_a_vit_with_heads_on_vectors():
    cfg = dict(trunk=dict(name="vit", **TINY), heads=dict(
        cls=model_lib.head_config("lastCLS", "linear"), dino=model_lib.head_config("cls4_avgpool", "linear")))
    model = model_lib.build(ml_collections.ConfigDict(cfg), num_classes=10, image_size=16)
    params, state = model.init(0)
    assert params["heads"]["cls"]["weight"].shape == (10, 32)
    assert params["heads"]["dino"]["weight"].shape == (10, 5 * 32)
    out, _ = model.apply(params, state, torch.randn(2, 3, 16, 16), train=True)
    assert out["cls"].shape == out["dino"].shape == (2, 10)


@pytest.mark.parametrize("variant", ["vit_s16", "dinov2_imagenet", "dino_imagenet", "beit_imagenet",
                                     "mae_imagenet"])
def test_linear_eval_variants_build_and_every_key_is_overridable(variant):
    from ml_collections import config_dict
    from configs import linear_eval

    def leaves(c, prefix=""):
        for key in c.keys():
            if isinstance(c[key], config_dict.ConfigDict):
                yield from leaves(c[key], f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}", c._fields[key], c[key]

    cfg = linear_eval.get_config(variant)
    bad = [k for k, field, v in leaves(cfg) if not isinstance(field, config_dict.FieldReference)
           and (v is None or not isinstance(v, (bool, int, float, str, tuple)))]
    assert not bad  # as tests/test_configs.py asks of every shipped config
    trunk = {k: v for k, v in cfg.model.trunk.items() if v is not None}
    assert set(cfg.model.trunk) >= {"name", *vit.OPTIONS}  # every family's options, typed
    assert set(trunk) - {"name"} <= set(vit.OPTIONS)  # only ViT options are set
    model = model_lib.build(cfg.model, num_classes=10, image_size=cfg.data.image_size)
    if variant == "dinov2_imagenet":
        assert len(model.heads) == 4 * 13 and model.trunk.spec.grid == 37
        lr_of = dict(cfg.optim.lr_mults)
        assert lr_of[r"heads\.cls4_avgpool_lr_0_00100\..*"] == 1e-3
        assert {h.feature for h in model.heads} == {"lastCLS", "cls1_avgpool", "concatCLS4", "cls4_avgpool"}
        for spec in (cfg.data.train_transforms, cfg.data.eval_transforms):  # dinov2 resizes bicubic
            steps = pipeline.parse(spec, cfg.data.image_size).plan(500, 375, torch.Generator()).steps
            assert [step[3] for step in steps if step[0] == "resize"] == ["bicubic"]
    if variant == "dino_imagenet":  # the last 4 normed class tokens of ViT-S/16, 4 x 384 wide
        params, _ = model.init_heads(0)
        assert params["linear"]["weight"].shape == (10, 4 * 384) and not params["linear"]["bias"].any()
    if variant == "mae_imagenet":  # the normed class token, a BatchNorm without params, a linear head
        params, state = model.init_heads(0)
        assert set(params["lastCLS"]) == {"clf"} and "running_var" in state["lastCLS"]["channel_bn"]
        assert cfg.optim.name == "lars" and model.heads[0].layers[0][1]["bn_eps"] == 1e-6
    if variant == "beit_imagenet":  # a head per block on its class token and patch mean, 2 x 768 wide
        assert [h.feature for h in model.heads] == [f"block{i}_cls_avgpool" for i in range(12)]
        assert model.trunk.spec.rel_pos_bias == "shared" and not cfg.optim.wd_mults
        params, _ = model.init_heads(0)
        w = params["block11"]["weight"]  # heads block00 … block11: config order is sorted order
        assert w.shape == (10, 1536) and 0.009 < w.std() < 0.011 and not params["block11"]["bias"].any()


def test_bad_options_and_features_name_the_valid_ones(tiny):
    with pytest.raises(ValueError, match="divisible by heads"):
        vit.build(**dict(TINY, heads=5))
    with pytest.raises(ValueError, match="multiple of patch_size"):
        vit.build(**dict(TINY, image_size=18))
    with pytest.raises(ValueError, match="needs class_token"):
        vit.build(**dict(TINY, class_token=False))
    with pytest.raises(ValueError, match=r"valid: \('bicubic', 'bicubic_antialias', 'bicubic_offset'\)"):
        vit.build(**dict(TINY, pos_resample="bilinear"))
    with pytest.raises(ValueError, match=r"unknown ViT option\(s\) \['width'\]; valid: \('patch_size'"):
        vit.build(width=3)
    with pytest.raises(ValueError, match=r"'vit' \(vit\) takes no option\(s\) \['width_multiplier'\]; vit's options: \['class_token'"):
        model_lib.build_trunk("vit", width_multiplier=2)
    trunk, params, x = tiny
    with pytest.raises(ValueError, match=r"unknown ViT feature\(s\) \['block5'\]; valid: block0, block0CLS, "):
        trunk.apply(params, {}, x, train=False, features=("block5",))
    with pytest.raises(ValueError, match=r"valid: block<0-11>, block<0-11>CLS, block<0-11>POOL, "
                                         r"block<0-11>_cls_avgpool, tokens, patch_grid, lastCLS, "):
        model_lib.build(ml_collections.ConfigDict({"trunk": {"name": "vit_b_16"},
                                                   "heads": {"h": {"feature": "block12POOL"}}}),
                        num_classes=10, image_size=224)
    assert "concatCLS4" not in vit.build(**dict(TINY, depth=3)).features


# ---------------------------------------------------------------- SwiGLU (DINOv2 ViT-g), distilled DeiT
def eager_tokens(params, x, *, dim=32, heads=4, patch=4, prefix=("class_token",), pos_rows=1):
    """The normed final tokens, written here with nn modules: prefix tokens (the first ``pos_rows``
    of them with position rows), registers, patches; blocks with layer scale and either
    torchvision's MLP or dinov2's SwiGLUFFN arithmetic (w12's first half is the gate, then w3)."""
    with torch.no_grad():
        conv = torch.nn.Conv2d(3, dim, patch, stride=patch)
        conv.load_state_dict(tree.flatten(params["conv_proj"]))
        pos = params["encoder"]["pos_embedding"]
        tokens = [params[name] + (pos[:, i:i + 1] if i < pos_rows else 0) for i, name in enumerate(prefix)]
        tokens += [params["register_tokens"]] if "register_tokens" in params else []
        h = torch.cat([t.expand(x.shape[0], -1, -1) for t in tokens] + [
            conv(x).flatten(2).transpose(1, 2) + pos[:, pos_rows:]], dim=1)
        for p in params["encoder"]["layers"].values():
            ln1, ln2 = torch.nn.LayerNorm(dim, eps=1e-6), torch.nn.LayerNorm(dim, eps=1e-6)
            ln1.load_state_dict(p["ln_1"])
            ln2.load_state_dict(p["ln_2"])
            attn = torch.nn.MultiheadAttention(dim, heads, batch_first=True)
            attn.load_state_dict(tree.flatten(p["self_attention"]))
            gamma1, gamma2 = (p["ls_1"]["gamma"], p["ls_2"]["gamma"]) if "ls_1" in p else (1.0, 1.0)
            y = ln1(h)
            h = h + gamma1 * attn(y, y, y, need_weights=False)[0]
            y = ln2(h)
            if "w12" in p["mlp"]:
                hidden = p["mlp"]["w3"]["weight"].shape[1]
                w1, w2, w3 = torch.nn.Linear(dim, hidden), torch.nn.Linear(dim, hidden), torch.nn.Linear(hidden, dim)
                w12 = p["mlp"]["w12"]
                w1.load_state_dict({"weight": w12["weight"][:hidden], "bias": w12["bias"][:hidden]})
                w2.load_state_dict({"weight": w12["weight"][hidden:], "bias": w12["bias"][hidden:]})
                w3.load_state_dict(p["mlp"]["w3"])
                y = w3(torch.sigmoid(w1(y)) * w1(y) * w2(y))
            else:
                hidden = p["mlp"]["0"]["weight"].shape[0]
                fc1, fc2 = torch.nn.Linear(dim, hidden), torch.nn.Linear(hidden, dim)
                fc1.load_state_dict(p["mlp"]["0"])
                fc2.load_state_dict(p["mlp"]["3"])
                y = fc2(F.gelu(fc1(y)))
            h = h + gamma2 * y
        ln = params["encoder"]["ln"]
        return F.layer_norm(h, (dim,), ln["weight"], ln["bias"], 1e-6)


def _perturbed(trunk, seed=3):
    params, _ = trunk.init(0)
    g = torch.Generator().manual_seed(seed)
    for t in tree.leaves(params):  # non-trivial norms, biases and tokens
        t.add_(0.1 * torch.randn(t.shape, generator=g))
    return params, torch.randn(2, 3, 16, 16, generator=g)


def test_swiglu_vit_equals_an_eager_forward_written_here():
    trunk = vit.build(**dict(TINY, depth=2, mlp="swiglu", mlp_dim=24, num_registers=2, layer_scale=0.5))
    params, x = _perturbed(trunk)
    flat = tree.flatten(params)
    assert flat["encoder.layers.encoder_layer_0.mlp.w12.weight"].shape == (48, 32)
    assert flat["encoder.layers.encoder_layer_0.mlp.w3.weight"].shape == (32, 24)
    assert not any(".mlp.0." in n for n in flat)
    expected = eager_tokens(params, x)
    got, _ = trunk.apply(params, {}, x, train=False, features=("tokens", "lastCLS"))
    torch.testing.assert_close(got["tokens"], expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got["lastCLS"], expected[:, 0], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="unknown ViT mlp"):
        vit.build(**TINY, mlp="geglu")


def test_distilled_deit_tokens_and_features():
    """[class, distillation, patches] with a position row each; lastCLS is the class token, the
    patch features skip both; timm's distilled eval averages head(token 0) and head_dist(token 1)."""
    trunk = vit.build(**TINY, dist_token=True)
    params, x = _perturbed(trunk)
    assert params["dist_token"].shape == (1, 1, 32) and params["encoder"]["pos_embedding"].shape == (1, 2 + 16, 32)
    expected = eager_tokens(params, x, prefix=("class_token", "dist_token"), pos_rows=2)
    got, _ = trunk.apply(params, {}, x, train=False, features=trunk.features)
    torch.testing.assert_close(got["tokens"], expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got["lastCLS"], expected[:, 0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got["lastPOOL"], expected[:, 2:].mean(1), atol=1e-5, rtol=1e-5)
    assert got["patch_grid"].shape == (2, 32, 4, 4) and trunk.features == vit.build(**TINY).features
    assert not torch.allclose(got["lastCLS"], expected[:, 1])  # the distillation token is another vector
    resized, _ = trunk.apply(params, {}, torch.randn(1, 3, 24, 24), train=False, features=("tokens",))
    assert resized["tokens"].shape == (1, 2 + 36, 32)  # both position rows kept, the grid resampled
    with pytest.raises(ValueError, match="dist_token=True needs class_token=True"):
        vit.build(**TINY, dist_token=True, class_token=False, pos_embed_class=False)


@pytest.mark.parametrize("preset,registers", [("vit_giant_patch14_dinov2", 0), ("vit_giant_patch14_reg4_dinov2", 4)])
def test_vit_giant_dinov2_presets_have_dinov2s_dims(preset, registers):
    """dinov2's vit_giant2: D 1536, 40 blocks, 24 heads, patch 14, SwiGLUFFNFused at mlp_ratio 4."""
    hidden = (int(1536 * 4 * 2 / 3) + 7) // 8 * 8
    trunk = vit.build(**vit.PRESETS[preset])
    params, _ = init_on_meta(trunk)
    flat = tree.flatten(params)
    last = "encoder.layers.encoder_layer_39."
    assert trunk.spec.heads == 24 and "block39_cls_avgpool" in trunk.features and "block40" not in trunk.features
    assert flat[last + "mlp.w12.weight"].shape == (2 * hidden, 1536) == (8192, 1536)
    assert flat[last + "mlp.w3.weight"].shape == (1536, hidden)
    assert flat[last + "ls_2.gamma"].shape == (1536,) and flat["conv_proj.weight"].shape == (1536, 3, 14, 14)
    assert flat["encoder.pos_embedding"].shape == (1, (0 if registers else 1) + 37 * 37, 1536)
    assert ("register_tokens" in flat) == bool(registers)
    assert round(sum(t.numel() for t in flat.values()) / 1e6, 1) == 1136.5  # timm's model cards: 1136.5 M


# ---------------------------------------------------------------- BEiT's relative position bias
BEIT_TINY = dict(TINY, depth=2, pos_embed=False, rel_pos_bias="block", fc_norm=True, layer_scale=0.1)


def beit_params(trunk, seed=0):
    """``trunk.init`` with every bias table filled with noise (they start at zero)."""
    params, _ = trunk.init(0)
    gen = torch.Generator().manual_seed(seed)
    return tree.unflatten({n: torch.randn(t.shape, generator=gen) if n.endswith("relative_position_bias_table") else t
                           for n, t in tree.flatten(params).items()})


def test_relative_position_index_names_each_pairs_offset():
    """Written out pair by pair: patches by (row offset, column offset), then class to patch,
    patch to class, class to class, as BEiT's table rows."""
    h, w = 2, 3
    n = (2 * h - 1) * (2 * w - 1)
    index = vit.relative_position_index((h, w)).view(h * w + 1, h * w + 1)
    for i in range(h * w + 1):
        for j in range(h * w + 1):
            if i and j:
                (ri, ci), (rj, cj) = divmod(i - 1, w), divmod(j - 1, w)
                want = (ri - rj + h - 1) * (2 * w - 1) + (ci - cj + w - 1)
            else:
                want = n + 2 if i == j == 0 else (n if i == 0 else n + 1)
            assert index[i, j] == want, (i, j)


def test_beit_attention_adds_the_bias_to_the_logits():
    trunk = vit.build(**BEIT_TINY)
    params = beit_params(trunk)
    p = params["encoder"]["layers"]["encoder_layer_0"]["self_attention"]
    x = torch.randn(2, 17, 32)
    bias = vit.relative_position_bias(p["relative_position_bias_table"], trunk.spec, (4, 4),
                                      vit.relative_position_index((4, 4)))
    q, k, v = F.linear(x, p["in_proj_weight"], p["in_proj_bias"]).view(2, 17, 3, 4, 8).permute(2, 0, 3, 1, 4)
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8) + bias, dim=-1)
    want = F.linear((weights @ v).transpose(1, 2).reshape(2, 17, 32), p["out_proj"]["weight"], p["out_proj"]["bias"])
    torch.testing.assert_close(vit.attention(p, x, 4, bias), want, atol=1e-5, rtol=1e-5)
    assert bias.shape == (4, 17, 17) and not torch.equal(bias[:, 1:, 1:], bias[:, 1:, 1:].flip(-1))


def test_a_shared_table_is_every_blocks_table():
    shared = vit.build(**dict(BEIT_TINY, rel_pos_bias="shared"))
    params = beit_params(shared)
    assert "relative_position_bias_table" not in params["encoder"]["layers"]["encoder_layer_0"]["self_attention"]
    per_block = vit.build(**BEIT_TINY)
    copied, _ = per_block.init(0)
    table = params["encoder"]["relative_position_bias_table"]
    for name, layer in copied["encoder"]["layers"].items():
        layer.update({k: v for k, v in params["encoder"]["layers"][name].items() if k != "self_attention"})
        layer["self_attention"].update({**params["encoder"]["layers"][name]["self_attention"],
                                        "relative_position_bias_table": table})
    copied.update({k: v for k, v in params.items() if k != "encoder"})
    x = torch.randn(2, 3, 16, 20)  # another grid than the stored one: both resample the same table
    a, _ = shared.apply(params, {}, x, train=False, features=("tokens",))
    b, _ = per_block.apply(copied, {}, x, train=False, features=("tokens",))
    torch.testing.assert_close(a["tokens"], b["tokens"], atol=1e-6, rtol=1e-6)


def test_beit_compiles_with_fullgraph_and_equals_eager_on_another_grid():
    trunk = vit.build(**BEIT_TINY)
    params = beit_params(trunk)
    x = torch.randn(2, 3, 12, 24)
    eager, _ = trunk.apply(params, {}, x, train=False, features=("lastPOOL",))
    compiled = torch.compile(lambda p, im: trunk.apply(p, {}, im, train=False, features=("lastPOOL",))[0],
                             fullgraph=True, dynamic=False, backend="aot_eager")
    torch.testing.assert_close(compiled(params, x)["lastPOOL"], eager["lastPOOL"], atol=1e-5, rtol=1e-5)


def test_resampling_a_table_to_its_own_grid_changes_nothing():
    table = torch.randn(7 * 7 + 3, 4)
    torch.testing.assert_close(vit.resample_bias_table(table, (4, 4)), table)
    assert vit.resample_bias_table(table, (2, 5)).shape == (3 * 9 + 3, 4)
    with pytest.raises(ValueError, match="not \\(2g-1\\)² \\+ 3"):
        vit.resample_bias_table(torch.randn(49, 4), (4, 4))


def test_beit_options_are_checked():
    with pytest.raises(ValueError, match="valid: \\('none', 'block', 'shared'\\)"):
        vit.build(**dict(BEIT_TINY, rel_pos_bias="window"))
    with pytest.raises(ValueError, match="exactly one token before the patches"):
        vit.build(**dict(BEIT_TINY, num_registers=4))
    params, _ = vit.build(**BEIT_TINY).init(0)
    assert "pos_embedding" not in params["encoder"] and "ln" not in params["encoder"]


def test_stochastic_depth_drops_or_keeps_each_samples_branch_whole():
    """timm's drop_path_rate: block 0 never drops, the last at the full rate; in training each
    sample's attention and MLP branch is dropped or kept scaled by 1/(1-p), in eval never touched."""
    trunk = vit.build(**dict(TINY, depth=2), stochastic_depth_prob=0.5, layer_scale=0.3)
    params, _ = trunk.init(0)
    x = torch.randn(64, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    plain = vit.build(**dict(TINY, depth=2), layer_scale=0.3)
    want, _ = plain.apply(params, {}, x, train=False, features=("block1",))
    got, _ = trunk.apply(params, {}, x, train=False, features=("block1",))
    assert torch.equal(got["block1"], want["block1"])  # eval: no drop
    torch.manual_seed(0)
    got, _ = trunk.apply(params, {}, x, train=True, features=("block0", "block1"))
    x0, p = got["block0"], params["encoder"]["layers"]["encoder_layer_1"]
    spec = trunk.spec
    ln = lambda q, t: F.layer_norm(t, (32,), q["weight"], q["bias"], 1e-6)
    attn = vit.attention(p["self_attention"], ln(p["ln_1"], x0), spec.heads) * p["ls_1"]["gamma"]
    seen = set()
    for i in range(64):
        candidates = {}
        for a in (0.0, 2.0):  # dropped, or kept and scaled by 1/(1 - 0.5)
            y = x0[i] + a * attn[i]
            mlp = vit.feed_forward(p["mlp"], ln(p["ln_2"], y)) * p["ls_2"]["gamma"]
            for m in (0.0, 2.0):
                candidates[a, m] = y + m * mlp
        match = [k for k, c in candidates.items() if torch.allclose(got["block1"][i], c, atol=1e-5)]
        assert len(match) == 1, i
        seen.add(match[0])
    assert seen == {(0.0, 0.0), (0.0, 2.0), (2.0, 0.0), (2.0, 2.0)}
    block0, _ = plain.apply(params, {}, x, train=False, features=("block0",))
    assert torch.equal(got["block0"], block0["block0"])  # block 0: rate 0
