"""``format: auto`` on the ViT files people hold: timm/DeiT, DINO, DINOv2 hub, MAE, MoCo v3, torchvision.

Targets are fpipe's names (torchvision's ViT plus ``ls_1/ls_2.gamma``, ``register_tokens``,
``fc_norm``) built from the reference manifests; every tensor is one distinct number broadcast
to its shape (no memory), so "which file tensor went where" is checked exactly and cheaply.
"""
import pytest
import torch

from fpipe.weights import WeightsError, load_into, renames, resample
from test_weights_fixtures import seeded

# timm's names inside a block -> torchvision's, written out by hand (independent of the table).
BLOCK = {"norm1": "ln_1", "norm2": "ln_2", "attn.qkv.weight": "self_attention.in_proj_weight",
         "attn.qkv.bias": "self_attention.in_proj_bias", "attn.proj": "self_attention.out_proj",
         "mlp.fc1": "mlp.0", "mlp.fc2": "mlp.3", "ls1.gamma": "ls_1.gamma", "ls2.gamma": "ls_2.gamma",
         "mlp.w12": "mlp.w12", "mlp.w3": "mlp.w3"}  # dinov2's SwiGLU FFN keeps its names
TOP = {"cls_token": "class_token", "reg_token": "register_tokens", "register_tokens": "register_tokens",
       "pos_embed": "encoder.pos_embedding", "patch_embed.proj.weight": "conv_proj.weight",
       "patch_embed.proj.bias": "conv_proj.bias", "norm.weight": "encoder.ln.weight",
       "norm.bias": "encoder.ln.bias", "fc_norm.weight": "fc_norm.weight", "fc_norm.bias": "fc_norm.bias",
       "dist_token": "dist_token"}


def ours(timm_name: str) -> str:
    """fpipe's name for a timm ViT trunk name (None for heads and the rest)."""
    parts = timm_name.split(".")
    if parts[0] == "blocks":
        rest = ".".join(parts[2:])
        for old, new in BLOCK.items():
            if rest == old or rest.startswith(old + "."):
                return f"encoder.layers.encoder_layer_{parts[1]}.{new}{rest[len(old):]}"
        return None
    return TOP.get(timm_name)


def marked(rows, start=0) -> dict:
    """``{name: number broadcast to shape}``, number = start + position (distinct per tensor)."""
    return {n: torch.full((), float(start + i)).expand(s) for i, (n, s, _) in enumerate(rows)}


def timm_file(model: str, start=0, drop=("head.",)) -> dict:
    rows = [r for r in seeded.load_manifest(model) if not r[0].startswith(drop)]
    return marked(rows, start)


def our_target(timm_model: str, *, pos_tokens=None) -> dict:
    """fpipe's trunk for a timm model, named by ``ours``; ``pos_tokens`` for another image size."""
    out = {}
    for n, s, _ in seeded.load_manifest(timm_model):
        if ours(n) is None:
            continue
        if n == "pos_embed" and pos_tokens:
            s = [1, pos_tokens, s[2]]
        out[f"trunk.{ours(n)}"] = torch.zeros(()).expand(s)
    return out


def tv_target(model="vit_b_16") -> dict:
    return {f"trunk.{n}": torch.zeros(()).expand(s) for n, s, _ in seeded.load_manifest(model) if not n.startswith("heads.")}


def assert_mapped(loaded: dict, file_flat: dict, prefix="", skip=("pos_embed",)):
    """Every trunk tensor came from the file tensor ``ours`` names, exactly."""
    trunk = {n[len("trunk."):] for n in loaded if n.startswith("trunk.")}
    seen = set()
    for name, t in file_flat.items():
        name = name[len(prefix):] if name.startswith(prefix) else None
        if name is None or ours(name) is None or name in skip:
            continue
        assert torch.equal(loaded[f"trunk.{ours(name)}"], t), name
        seen.add(ours(name))
    assert seen | {ours(s) for s in skip} >= trunk - {"fc_norm.weight", "fc_norm.bias"}


def test_timm_vit_loads_into_torchvision_names_by_the_table():
    f = timm_file("vit_base_patch16_224")
    loaded, report = load_into(tv_target(), {}, obj=f)
    assert report.trunk_loaded == report.trunk_total == 150
    assert_mapped(loaded, f, skip=())
    assert "TIMM_VIT" in report.reason and "timm_vit" in report.format


def test_torchvision_vit_loads_by_plain_names():
    rows = [r for r in seeded.load_manifest("vit_b_16") if not r[0].startswith("heads.")]
    f = marked(rows)
    loaded, report = load_into(tv_target(), {}, obj=f)
    assert report.trunk_loaded == 150 and report.format == "auto"
    assert all(torch.equal(loaded[f"trunk.{n}"], t) for n, t in f.items())


def test_dino_vit_checkpoint_takes_the_teacher():
    """DINO's main_dino.py saves teacher/student state dicts; a ViT teacher is not DDP-wrapped."""
    teacher, student = timm_file("vit_small_patch16_224"), timm_file("vit_small_patch16_224", start=1000)
    obj = {"teacher": {**{f"backbone.{n}": t for n, t in teacher.items()},
                       "head.mlp.0.weight": torch.zeros(16, 384), "head.last_layer.weight_g": torch.ones(16, 1)},
           "student": {f"module.backbone.{n}": t for n, t in student.items()},
           "epoch": 100, "dino_loss": {"center": torch.zeros(1, 16)}}
    loaded, report = load_into(our_target("vit_small_patch16_224"), {}, obj=obj)
    assert_mapped(loaded, obj["teacher"], prefix="backbone.", skip=())
    assert "DINO" in report.reason and report.state_dict_key == "teacher" and report.remove_prefix == "backbone."
    loaded, _ = load_into(our_target("vit_small_patch16_224"), {"select": "student"}, obj=obj)
    assert_mapped(loaded, obj["student"], prefix="module.backbone.", skip=())


def test_dino_vit_b8_teacher_loads():
    """ViT-B/8: 8×8 patches, a 28×28 grid; same names as B/16."""
    rows = []
    for n, s, d in seeded.load_manifest("vit_base_patch16_224"):
        s = {"patch_embed.proj.weight": [768, 3, 8, 8], "pos_embed": [1, 785, 768]}.get(n, s)
        rows.append((n, s, d))
    f = marked([r for r in rows if not r[0].startswith("head.")])
    target = {f"trunk.{ours(n)}": torch.zeros(()).expand(s) for n, s, _ in rows if ours(n)}
    loaded, report = load_into(target, {}, obj={"teacher": {f"backbone.{n}": t for n, t in f.items()},
                                                "student": {f"module.backbone.{n}": t + 1 for n, t in f.items()}})
    assert_mapped(loaded, {f"backbone.{n}": t for n, t in f.items()}, prefix="backbone.", skip=())
    assert "DINO" in report.reason


def dinov2_hub_file() -> dict:
    """DINOv2's hub file: timm-like names, ``register_tokens``, ``mask_token``, a 37×37 grid with
    the class token's position in front (1 + 1369 positions)."""
    f = timm_file("vit_small_patch14_reg4_dinov2")
    f["register_tokens"] = f.pop("reg_token")
    g = torch.Generator().manual_seed(0)
    f["pos_embed"] = torch.randn(1, 1 + 37 * 37, 384, generator=g)
    f["mask_token"] = torch.zeros(1, 384)
    return f


def test_dinov2_hub_file_with_registers_and_layer_scale_resamples_the_grid(tmp_path):
    f = dinov2_hub_file()
    path = tmp_path / "dinov2_vits14_reg4_pretrain.pth"
    torch.save(f, path)
    target = our_target("vit_small_patch14_reg4_dinov2", pos_tokens=1 + 16 * 16)
    assert "trunk.encoder.layers.encoder_layer_0.ls_1.gamma" in target and "trunk.register_tokens" in target
    loaded, report = load_into(target, {"path": str(path)})
    assert report.trunk_loaded == report.trunk_total
    assert_mapped(loaded, f)
    pos = loaded["trunk.encoder.pos_embedding"]
    assert pos.shape == (1, 257, 384) and torch.equal(pos[:, :1], f["pos_embed"][:, :1])
    assert torch.allclose(pos, resample.resample_pos_embedding(f["pos_embed"], 257))
    assert any("37x37 resampled to 16x16" in n for n in report.notes)
    assert report.not_loaded["mask_token"] == "not in the model"


def test_dinov2_hub_file_with_registers_into_the_preset_folds_the_class_position_into_the_token():
    """The preset keeps timm's layout (no class row): the file's class row is added to the class
    token once, the rest is the 37x37 grid unchanged (before, this load failed on the shape and
    named the preset without registers)."""
    f = dinov2_hub_file()
    f["cls_token"] = torch.randn(1, 1, 384)
    loaded, report = load_into(our_target("vit_small_patch14_reg4_dinov2"), {}, obj=f)
    assert report.trunk_loaded == report.trunk_total
    assert torch.equal(loaded["trunk.class_token"], f["cls_token"] + f["pos_embed"][:, :1])
    assert torch.equal(loaded["trunk.encoder.pos_embedding"], f["pos_embed"][:, 1:])


def test_timm_dinov2_with_registers_has_no_class_position_and_gets_a_zero_one():
    f = timm_file("vit_small_patch14_reg4_dinov2")  # pos_embed [1, 1369, 384]: no_embed_class
    loaded, report = load_into(our_target("vit_small_patch14_reg4_dinov2", pos_tokens=257), {}, obj=f)
    pos = loaded["trunk.encoder.pos_embedding"]
    assert torch.equal(pos[:, 0], torch.zeros(1, 384))
    assert torch.allclose(pos[:, 1:], resample.resample_pos_embedding(f["pos_embed"], 256))
    assert any("zero one added" in n for n in report.notes)


def test_mae_checkpoint_under_model_with_decoder_left_out():
    f = timm_file("vit_base_patch16_224")
    obj = {"model": {**f, "mask_token": torch.zeros(1, 1, 512), "decoder_embed.weight": torch.zeros(512, 768),
                     "decoder_blocks.0.norm1.weight": torch.ones(512), "decoder_pred.weight": torch.zeros(768, 512)},
           "epoch": 799}
    loaded, report = load_into(tv_target(), {}, obj=obj)
    assert_mapped(loaded, obj["model"], skip=())
    assert report.state_dict_key == "model"
    assert report.not_loaded["model.decoder_pred.weight"] == "not in the model"


def test_mae_finetuned_fc_norm_loads():
    rows = [r for r in seeded.load_manifest("vit_base_patch16_224") if not r[0].startswith(("head.", "norm."))]
    f = {**marked(rows), "fc_norm.weight": torch.full((768,), 7.0), "fc_norm.bias": torch.full((768,), 8.0)}
    target = {k: v for k, v in tv_target().items() if not k.startswith("trunk.encoder.ln.")}
    target |= {"trunk.fc_norm.weight": torch.zeros(768), "trunk.fc_norm.bias": torch.zeros(768)}
    loaded, report = load_into(target, {}, obj=f)
    assert torch.equal(loaded["trunk.fc_norm.bias"], f["fc_norm.bias"]) and report.trunk_loaded == report.trunk_total


def test_moco_v3_vit_takes_base_encoder():
    a, b = timm_file("vit_small_patch16_224"), timm_file("vit_small_patch16_224", start=1000)
    sd = {**{f"module.base_encoder.{n}": t for n, t in a.items()},
          **{f"module.momentum_encoder.{n}": t for n, t in b.items()},
          "module.base_encoder.head.0.weight": torch.zeros(4096, 384), "module.predictor.0.weight": torch.zeros(8, 8)}
    loaded, report = load_into(our_target("vit_small_patch16_224"), {}, obj={"state_dict": sd, "epoch": 300})
    assert_mapped(loaded, sd, prefix="module.base_encoder.", skip=())
    assert "MoCo v3" in report.reason and report.remove_prefix == "module.base_encoder."


def test_deit_file_under_model():
    f = timm_file("vit_base_patch16_224", drop=())
    loaded, report = load_into(tv_target(), {}, obj={"model": f, "args": None})
    assert_mapped(loaded, f, skip=())
    assert report.not_loaded["model.head.weight"] == "not in the model"


def test_a_grid_that_cannot_be_resampled_is_a_shape_error():
    f = timm_file("vit_small_patch16_224")
    f["pos_embed"] = torch.zeros(1, 197 + 3, 384)  # 4 prefix tokens: not what the model has
    with pytest.raises(WeightsError, match="pos_embedding"):
        load_into(our_target("vit_small_patch16_224"), {}, obj=f)


def test_rename_table_documents_each_pair():
    pairs = {"cls_token": "class_token", "reg_token": "register_tokens", "pos_embed": "encoder.pos_embedding",
             "patch_embed.proj.weight": "conv_proj.weight", "blocks.11.norm1.bias": "encoder.layers.encoder_layer_11.ln_1.bias",
             "blocks.0.attn.qkv.weight": "encoder.layers.encoder_layer_0.self_attention.in_proj_weight",
             "blocks.0.attn.proj.bias": "encoder.layers.encoder_layer_0.self_attention.out_proj.bias",
             "blocks.2.mlp.fc2.weight": "encoder.layers.encoder_layer_2.mlp.3.weight",
             "blocks.2.ls2.gamma": "encoder.layers.encoder_layer_2.ls_2.gamma", "norm.weight": "encoder.ln.weight",
             "fc_norm.bias": "fc_norm.bias", "head.weight": "heads.head.weight",
             "teacher.backbone.norm.bias": "teacher.backbone.encoder.ln.bias"}
    assert {k: renames.apply(k, renames.TIMM_VIT) for k in pairs} == pairs


def test_resample_keeps_constants_prefix_and_orientation():
    pos = torch.randn(1, 1 + 6 * 6, 4)
    assert resample.resample_pos_embedding(pos, 37) is pos
    const = torch.full((1, 1 + 6 * 6, 4), 3.0)
    assert torch.allclose(resample.resample_pos_embedding(const, 1 + 4 * 4), torch.full((1, 17, 4), 3.0), atol=1e-5)
    # a grid varying along x only stays constant along y: rows and columns are not swapped
    x = torch.arange(6.0).repeat(6).reshape(1, 36, 1).expand(1, 36, 2)
    grid = torch.cat([torch.full((1, 1, 2), -1.0), x], dim=1)
    out = resample.resample_pos_embedding(grid, 1 + 9 * 9)
    assert out[0, 0, 0] == -1
    cells = out[0, 1:, 0].reshape(9, 9)
    assert torch.allclose(cells, cells[:1].expand(9, 9)) and cells[0, -1] > cells[0, 0]


def test_explicit_torchvision_format_on_a_timm_file_points_to_auto():
    f = timm_file("vit_small_patch16_224")
    with pytest.raises(WeightsError, match=r"use format='auto': it maps this file's names by renames.TIMM_VIT"):
        load_into(our_target("vit_small_patch16_224"), {"format": "torchvision"}, obj=f)


# ---------------------------------------------------------------- DINOv2: block_chunks, SwiGLU (ViT-g)
def swiglu_rows(model="vit_small_patch14_dinov2"):
    """A timm DINOv2 manifest with dinov2's SwiGLUFFNFused in every block: mlp.w12 [2H, D], mlp.w3 [D, H]."""
    rows = seeded.load_manifest(model)
    dim = dict((n, s) for n, s, _ in rows)["cls_token"][-1]
    hidden = (int(4 * dim * 2 / 3) + 7) // 8 * 8
    shapes = {"mlp.w12.weight": [2 * hidden, dim], "mlp.w12.bias": [2 * hidden], "mlp.w3.weight": [dim, hidden]}
    out = []
    for n, s, d in rows:
        n = n.replace("mlp.fc1", "mlp.w12").replace("mlp.fc2", "mlp.w3")
        out.append((n, shapes.get(n.split(".", 2)[-1], s), d))
    return out


def chunked(name: str, chunk: int) -> str:
    """dinov2's block_chunks name: blocks.<i> -> blocks.<i // chunk>.<i> (the global index kept)."""
    parts = name.split(".")
    if parts[0] != "blocks":
        return name
    return ".".join(["blocks", str(int(parts[1]) // chunk), *parts[1:]])


@pytest.mark.parametrize("swiglu", [False, True])
def test_dinov2_training_teacher_with_block_chunks_loads(swiglu):
    """dinov2's eval/training_<i>/teacher_checkpoint.pth: {"teacher": backbone.*, dino_head.*,
    ibot_head.*}, blocks in 4 chunks of 3 (ViT-g trains with block_chunks=4, SwiGLU)."""
    rows = swiglu_rows() if swiglu else seeded.load_manifest("vit_small_patch14_dinov2")
    plain = marked([r for r in rows if not r[0].startswith("head.")])
    teacher = {f"backbone.{chunked(n, 3)}": t for n, t in plain.items()}
    teacher |= {"backbone.mask_token": torch.zeros(1, 384), "dino_head.mlp.0.weight": torch.zeros(16, 384),
                "ibot_head.last_layer.weight_g": torch.ones(16, 1)}
    assert "backbone.blocks.3.11.ls2.gamma" in teacher
    target = {f"trunk.{ours(n)}": torch.zeros(()).expand(s) for n, s, _ in rows if ours(n)}
    if swiglu:  # the target is what fpipe's vit builds for this layout
        from fpipe.models import vit
        from fpipe.models.trunk import init_on_meta
        from fpipe.tree import flatten
        options = dict(vit.PRESETS["vit_small_patch14_dinov2"], mlp="swiglu", mlp_dim=1024)
        built, _ = init_on_meta(vit.build(**options))
        assert {f"trunk.{n}": tuple(t.shape) for n, t in flatten(built).items()} == {
            n: tuple(t.shape) for n, t in target.items()}
    loaded, report = load_into(target, {}, obj={"teacher": teacher})
    assert report.trunk_loaded == report.trunk_total and not report.missing
    for n, t in plain.items():
        assert torch.equal(loaded[f"trunk.{ours(n)}"], t), n
    assert report.state_dict_key == "teacher" and report.remove_prefix == "backbone."
    assert report.not_loaded["teacher.backbone.mask_token"] == "not in the model"


def test_timm_vit_giant_packed_swiglu_names_load():
    """timm's vit_giant_patch14_dinov2 stores dinov2's w12 / w3 as mlp.fc1 / mlp.fc2 (SwiGLUPacked)."""
    rows = swiglu_rows()
    timm = {n.replace("mlp.w12", "mlp.fc1").replace("mlp.w3", "mlp.fc2"): t
            for n, t in marked([r for r in rows if not r[0].startswith("head.")]).items()}
    target = {f"trunk.{ours(n)}": torch.zeros(()).expand(s) for n, s, _ in rows if ours(n)}
    loaded, report = load_into(target, {}, obj=timm)
    assert report.trunk_loaded == report.trunk_total and "TIMM_VIT_SWIGLU" in report.reason
    assert torch.equal(loaded["trunk.encoder.layers.encoder_layer_5.mlp.w12.weight"], timm["blocks.5.mlp.fc1.weight"])
    assert torch.equal(loaded["trunk.encoder.layers.encoder_layer_5.mlp.w3.bias"], timm["blocks.5.mlp.fc2.bias"])


# ---------------------------------------------------------------- distilled DeiT
def deit_distilled_file() -> dict:
    """DeiT's released deit_small_distilled_patch16_224 (facebookresearch/deit, timm): under
    "model", timm's names plus dist_token, a position row for it (2 + 196) and head_dist."""
    f = timm_file("vit_small_patch16_224", drop=())
    f["dist_token"] = torch.full((1, 1, 384), -1.0)
    f["pos_embed"] = torch.randn(1, 2 + 14 * 14, 384, generator=torch.Generator().manual_seed(0))
    f["head_dist.weight"], f["head_dist.bias"] = torch.ones(1000, 384), torch.ones(1000)
    return {"model": f}


def deit_target(heads=False) -> dict:
    from fpipe.models import vit
    from fpipe.models.trunk import init_on_meta
    from fpipe.tree import flatten
    params, _ = init_on_meta(vit.build(**vit.PRESETS["deit_small_distilled_patch16_224"]))
    out = {f"trunk.{n}": torch.zeros(()).expand(t.shape) for n, t in flatten(params).items()}
    return out | ({"heads.head.weight": torch.zeros(1000, 384), "heads.head.bias": torch.zeros(1000)} if heads else {})


def test_distilled_deit_loads_both_tokens_and_leaves_head_dist_out():
    obj = deit_distilled_file()
    f = obj["model"]
    loaded, report = load_into(deit_target(), {}, obj=obj)
    assert report.trunk_loaded == report.trunk_total and not report.missing
    assert_mapped(loaded, f, skip=())  # dist_token, and pos_embed with its 2 prefix rows, as stored
    assert {report.not_loaded[f"model.{n}"] for n in ("head.weight", "head_dist.weight", "head_dist.bias")} == {
        "not in the model"}
    loaded, report = load_into(deit_target(heads=True), {"load_heads": True}, obj=obj)
    assert torch.equal(loaded["heads.head.weight"], f["head.weight"])  # the class token's head
    assert report.not_loaded["model.head_dist.weight"] == "not in the model"


def test_distilled_deit_or_swiglu_file_into_a_plain_vit_names_the_option():
    with pytest.raises(WeightsError, match=r"pos_embedding.*Hint: the file is a distilled DeiT: .*dist_token=True"):
        load_into(our_target("vit_small_patch16_224"), {}, obj=deit_distilled_file())
    f = {f"teacher.backbone.{chunked(n, 3)}": t for n, t in marked(swiglu_rows()).items() if not n.startswith("head.")}
    with pytest.raises(WeightsError, match=r"(?s)only 126/174 .*Hint: .*SwiGLU FFN: build the ViT with mlp='swiglu'"):
        load_into(our_target("vit_small_patch14_dinov2"), {}, obj=f)


def test_a_class_position_row_for_a_model_without_a_class_token_is_a_shape_error():
    """Folding the row needs the model's class token; without one the file is another model."""
    target = {"trunk.encoder.pos_embedding": torch.zeros(1, 16, 32), "trunk.conv_proj.weight": torch.zeros(32, 3, 8, 8)}
    f = {"encoder.pos_embedding": torch.zeros(1, 17, 32), "class_token": torch.zeros(1, 1, 32),
         "conv_proj.weight": torch.zeros(32, 3, 8, 8)}
    with pytest.raises(WeightsError, match=r"encoder.pos_embedding: file \[1, 17, 32\] vs model \[1, 16, 32\]"):
        load_into(target, {}, obj=f)
