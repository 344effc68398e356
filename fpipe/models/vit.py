"""The Vision Transformer family as a pure trunk with torchvision's names (and timm/DINO/DINOv2 layouts).

``build(**options)`` returns a :class:`~fpipe.models.resnet.Trunk` whose params flatten to
torchvision's ``vit_*`` ``state_dict`` names without the classifier ``heads.head``:
``class_token``, ``conv_proj.*``, ``encoder.pos_embedding``, ``encoder.layers.encoder_layer_<i>.
{ln_1, self_attention.in_proj_*, self_attention.out_proj, ln_2, mlp.0, mlp.3}``, ``encoder.ln``;
plus, where a layout has them, layer scale ``…encoder_layer_<i>.ls_1.gamma``/``ls_2.gamma``,
register tokens ``register_tokens`` (1×R×D), ``fc_norm`` (a norm of the pooled tokens that
replaces ``encoder.ln``, as MAE's global-pool models), DeiT's distillation token ``dist_token``
and, with ``mlp="swiglu"`` (DINOv2's ViT-g), dinov2's SwiGLU FFN ``mlp.w12``/``mlp.w3`` instead
of ``mlp.0``/``mlp.3``; BEiT's relative position bias tables (``rel_pos_bias``), per block
``…self_attention.relative_position_bias_table`` or shared ``encoder.relative_position_bias_table``,
with ``pos_embed=False`` (no ``encoder.pos_embedding``). State is ``{}`` (LayerNorm only; BEiT's
table index is computed).

Tokens are ``[class, distillation, registers…, patches…]``; registers never get a position
embedding. The position embedding is stored for the ``image_size // patch_size`` grid, with class
(and distillation) rows first when ``pos_embed_class``; another input grid resamples its patch
part (``pos_resample``, see :func:`resample_pos_embedding`). Features (VISSL's names and
dinov2's linear inputs) are listed in docs/MODELS_VIT.md; ``block<i>`` stops after block i,
every other feature runs all blocks; the distillation token is a feature only inside ``tokens``
and ``block<i>`` (position 1), the pooled features skip it.
"""
import dataclasses
import math

import torch
import torch.nn.functional as F

from fpipe.models import layers
from fpipe.models import trunk as trunk_lib
from fpipe.models.resnet import Trunk

# Feature names after the last block; the block features (i from 0) come before them, shallow to deep.
FEATURES = ("tokens", "patch_grid", "lastCLS", "lastPOOL", "concatCLS4", "concatPOOL4",
            "cls1_avgpool", "cls4_avgpool", "cls1_avgpool_interleaved")
# What a block feature ``block<i><read>`` reads of block i's output, not normed: the tokens, the
# class token, the patch mean, or both side by side (BEiT's linear probe of every block).
BLOCK_READS = ("", "CLS", "POOL", "_cls_avgpool")
_NEEDS_CLASS_TOKEN = ("lastCLS", "concatCLS4", "cls1_avgpool", "cls4_avgpool", "cls1_avgpool_interleaved")
_NEEDS_4_BLOCKS = ("concatCLS4", "concatPOOL4", "cls4_avgpool")
# How a stored position grid is resampled to another input grid (all bicubic, align_corners=False):
#   bicubic            torch's bicubic (a=-0.75) at the new size, no antialiasing
#   bicubic_antialias  the PIL-style antialiased bicubic (a=-0.5, widened when shrinking): timm's
#                      resample_abs_pos_embed, and DINOv2's hub models with registers
#   bicubic_offset     no antialiasing, scale factor (new + 0.1) / old: DINO's and DINOv2's hub
#                      models without registers (their "interpolate_offset" kludge)
RESAMPLE_MODES = ("bicubic", "bicubic_antialias", "bicubic_offset")
# The block's feed-forward: gelu = fc, GELU, fc (mlp.0, mlp.3); gelu_tanh the same with GELU's
# tanh approximation (Flax's nn.gelu: big_vision's and google-research/vision_transformer's ViTs);
# swiglu = dinov2's SwiGLUFFN, w12 [2·mlp_dim, D] holding the gate then the value half,
# silu(gate)·value, then w3 [D, mlp_dim].
MLPS = ("gelu", "gelu_tanh", "quick_gelu", "swiglu")  # quick_gelu: x·sigmoid(1.702x), OpenAI CLIP's
# BEiT's relative position bias (BEiT, BEiT v2, data2vec): a learned [(2g-1)² + 3, heads] table of
# logit biases by (row, column) offset between patches, plus three rows: class to patch, patch to
# class, class to class. "block": each block its own (``self_attention.relative_position_bias_table``,
# fine-tuned files); "shared": one for all blocks (``encoder.relative_position_bias_table``, BEiT's
# pretraining files); "none": no table.
REL_POS_BIASES = ("none", "block", "shared")


@dataclasses.dataclass(frozen=True)
class Spec:
    patch_size: int = 16
    hidden_dim: int = 768
    depth: int = 12
    heads: int = 12
    mlp_dim: int = 3072
    image_size: int = 224         # the input size the position embedding's grid is stored for
    layer_scale: float = 0.0      # init value of ls_1/ls_2.gamma; 0 (or None) = no layer scale
    num_registers: int = 0
    class_token: bool = True
    pos_embed_class: bool = True  # the position embedding has a class-token row (timm DINOv2-reg: no)
    ln_eps: float = 1e-6
    fc_norm: bool = False         # pooled features normed by fc_norm; no encoder.ln
    pos_resample: str = "bicubic"
    mlp: str = "gelu"             # the FFN (MLPS); with swiglu, mlp_dim is SwiGLU's hidden width
    dist_token: bool = False      # DeiT's distillation token after the class token (features ignore it)
    pre_norm: bool = False        # CLIP's ln_pre: a LayerNorm of the tokens before the first block
    patch_bias: bool = True       # conv_proj has a bias (CLIP's has none)
    pos_embed: bool = True        # an absolute position embedding (BEiT's trunks have none)
    rel_pos_bias: str = "none"    # BEiT's relative position bias tables (REL_POS_BIASES)
    stochastic_depth_prob: float = 0.0  # timm's drop_path_rate: block i drops at rate·i/(depth-1) in training

    def __post_init__(self):
        for key in ("patch_size", "hidden_dim", "depth", "heads", "mlp_dim", "image_size"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                raise ValueError(f"ViT option {key} must be a positive integer, got {getattr(self, key)!r}")
        if self.hidden_dim % self.heads:
            raise ValueError(f"ViT hidden_dim={self.hidden_dim} must be divisible by heads={self.heads}")
        if self.image_size % self.patch_size:
            raise ValueError(f"ViT image_size={self.image_size} must be a multiple of patch_size={self.patch_size} "
                             "(it sets the stored position grid)")
        if self.pos_embed_class and not self.class_token:
            raise ValueError("ViT pos_embed_class=True needs class_token=True (no class token, no class row)")
        if self.dist_token and not self.class_token:
            raise ValueError("ViT dist_token=True needs class_token=True (DeiT's tokens are [class, distillation])")
        if self.num_registers < 0:
            raise ValueError(f"ViT num_registers must be >= 0, got {self.num_registers}")
        if self.pos_resample not in RESAMPLE_MODES:
            raise ValueError(f"unknown ViT pos_resample {self.pos_resample!r}; valid: {RESAMPLE_MODES}")
        if self.mlp not in MLPS:
            raise ValueError(f"unknown ViT mlp {self.mlp!r}; valid: {MLPS}")
        if self.rel_pos_bias not in REL_POS_BIASES:
            raise ValueError(f"unknown ViT rel_pos_bias {self.rel_pos_bias!r}; valid: {REL_POS_BIASES}")
        if self.rel_pos_bias != "none" and self.num_prefix != 1:
            raise ValueError(f"ViT rel_pos_bias={self.rel_pos_bias!r} needs exactly one token before the patches "
                             "(class_token=True, no dist_token or registers): BEiT's table has rows for one class "
                             "token")

    @property
    def grid(self):
        return self.image_size // self.patch_size

    @property
    def num_prefix(self):
        """Tokens before the patches: the class and distillation tokens and the registers."""
        return int(self.class_token) + int(self.dist_token) + self.num_registers

    @property
    def pos_rows(self):
        """Rows of the position embedding before the patches' (the class and distillation tokens')."""
        return (1 + int(self.dist_token)) if self.pos_embed_class and self.pos_embed else 0

    @property
    def features(self):
        reads = BLOCK_READS if self.class_token else ("", "POOL")
        names = [f"block{i}{read}" for i in range(self.depth) for read in reads] + list(FEATURES)
        if not self.class_token:
            names = [n for n in names if n not in _NEEDS_CLASS_TOKEN]
        if self.depth < 4:
            names = [n for n in names if n not in _NEEDS_4_BLOCKS]
        return tuple(names)


OPTIONS = {f.name: f.default for f in dataclasses.fields(Spec)}
_S = dict(hidden_dim=384, heads=6, mlp_dim=1536)
_B = dict(hidden_dim=768, heads=12, mlp_dim=3072)
_L = dict(hidden_dim=1024, depth=24, heads=16, mlp_dim=4096)
# dinov2's vit_giant2: SwiGLU of hidden width (int(4·1536·2/3) + 7) // 8 * 8 = 4096
_G = dict(hidden_dim=1536, depth=40, heads=24, mlp_dim=4096, mlp="swiglu")
_H = dict(hidden_dim=1280, depth=32, heads=16, mlp_dim=5120)
_DEIT = dict(patch_size=16, dist_token=True, pos_resample="bicubic_antialias")
_DINOV2 = dict(patch_size=14, image_size=518, layer_scale=1e-5, pos_resample="bicubic_offset")
_DINOV2_REG = dict(_DINOV2, num_registers=4, pos_embed_class=False, pos_resample="bicubic_antialias")
# CLIP image towers (OpenAI's, open_clip's): ln_pre, no patch bias, LayerNorm eps 1e-5; OpenAI's
# weights were trained with QuickGELU (the _quickgelu presets), most open_clip ones with GELU.
_CLIP = dict(pre_norm=True, patch_bias=False, ln_eps=1e-5)
_QUICK = dict(_CLIP, mlp="quick_gelu")
# SigLIP image towers (big_vision's, transformers'): no class token (MAP-head pooling, which is a
# head's job here: lastPOOL is the mean patch token), no class row, tanh-GELU
_GAP = dict(class_token=False, pos_embed_class=False)
_SIGLIP = dict(_GAP, mlp="gelu_tanh")
_SO400M = dict(hidden_dim=1152, depth=27, heads=16, mlp_dim=4304, patch_size=14)
# BEiT's trunks (BEiT, BEiT v2; data2vec's are the same): no absolute position embedding, a
# relative position bias per block, no key bias (q_bias/v_bias: a zero key third, which softmax
# ignores), mean-pooled patches normed by fc_norm. Its pretraining files (*_pt22k) share one bias
# table and keep the final norm.
_BEIT = dict(patch_size=16, pos_embed=False, rel_pos_bias="block", fc_norm=True)
_BEIT_PT = dict(_BEIT, rel_pos_bias="shared", fc_norm=False)
PRESETS = {
    # torchvision
    "vit_b_16": dict(_B, patch_size=16), "vit_b_32": dict(_B, patch_size=32),
    "vit_l_16": dict(_L, patch_size=16), "vit_l_32": dict(_L, patch_size=32),
    "vit_h_14": dict(_H, patch_size=14),
    # timm layouts: DINO's ViT-S/16, S/8, B/8 (and B/16); timm's supervised B/16, L/16; DINOv2
    "vit_small_patch16_224": dict(_S, patch_size=16, pos_resample="bicubic_offset"),
    "vit_small_patch8_224": dict(_S, patch_size=8, pos_resample="bicubic_offset"),
    "vit_base_patch8_224": dict(_B, patch_size=8, pos_resample="bicubic_offset"),
    "vit_base_patch16_224": dict(_B, patch_size=16, pos_resample="bicubic_antialias"),
    "vit_large_patch16_224": dict(_L, patch_size=16, pos_resample="bicubic_antialias"),
    # timm's distilled DeiT (deit_*_distilled_patch16_*): class + distillation token
    "deit_tiny_distilled_patch16_224": dict(_DEIT, hidden_dim=192, heads=3, mlp_dim=768),
    "deit_small_distilled_patch16_224": dict(_S, **_DEIT),
    "deit_base_distilled_patch16_224": dict(_B, **_DEIT),
    "deit_base_distilled_patch16_384": dict(_B, **_DEIT, image_size=384),
    "vit_small_patch14_dinov2": dict(_S, **_DINOV2),
    "vit_base_patch14_dinov2": dict(_B, **_DINOV2),
    "vit_large_patch14_dinov2": dict(_L, **_DINOV2),
    "vit_giant_patch14_dinov2": dict(_G, **_DINOV2),
    "vit_small_patch14_reg4_dinov2": dict(_S, **_DINOV2_REG),
    "vit_base_patch14_reg4_dinov2": dict(_B, **_DINOV2_REG),
    "vit_large_patch14_reg4_dinov2": dict(_L, **_DINOV2_REG),
    "vit_giant_patch14_reg4_dinov2": dict(_G, **_DINOV2_REG),
    # CLIP image towers, timm's names (projection to the text space not included: a head)
    "vit_base_patch32_clip_224": dict(_B, patch_size=32, **_CLIP),
    "vit_base_patch16_clip_224": dict(_B, patch_size=16, **_CLIP),
    "vit_large_patch14_clip_224": dict(_L, patch_size=14, **_CLIP),
    "vit_large_patch14_clip_336": dict(_L, patch_size=14, image_size=336, **_CLIP),
    "vit_huge_patch14_clip_224": dict(_H, patch_size=14, **_CLIP),
    "vit_base_patch32_clip_quickgelu_224": dict(_B, patch_size=32, **_QUICK),
    "vit_base_patch16_clip_quickgelu_224": dict(_B, patch_size=16, **_QUICK),
    "vit_large_patch14_clip_quickgelu_224": dict(_L, patch_size=14, **_QUICK),
    "vit_large_patch14_clip_quickgelu_336": dict(_L, patch_size=14, image_size=336, **_QUICK),
    # SigLIP image towers, timm's names (the MAP head not included: a head)
    "vit_base_patch16_siglip_224": dict(_B, patch_size=16, **_SIGLIP),
    "vit_base_patch16_siglip_256": dict(_B, patch_size=16, image_size=256, **_SIGLIP),
    "vit_base_patch16_siglip_384": dict(_B, patch_size=16, image_size=384, **_SIGLIP),
    "vit_large_patch16_siglip_256": dict(_L, patch_size=16, image_size=256, **_SIGLIP),
    "vit_large_patch16_siglip_384": dict(_L, patch_size=16, image_size=384, **_SIGLIP),
    "vit_so400m_patch14_siglip_224": dict(_SO400M, **_SIGLIP),
    # 384 px in 14 px patches: a 27x27 grid (the last 6 px unused), stored as for 378 px
    "vit_so400m_patch14_siglip_384": dict(_SO400M, image_size=378, **_SIGLIP),
    # I-JEPA's encoders (timm's names, its *_ijepa weights): no class token, features = lastPOOL
    "vit_huge_patch14_gap_224": dict(_H, patch_size=14, pos_resample="bicubic_antialias", **_GAP),
    "vit_huge_patch16_gap_448": dict(_H, patch_size=16, image_size=448, pos_resample="bicubic_antialias", **_GAP),
    "vit_giant_patch16_gap_224": dict(hidden_dim=1408, depth=40, heads=16, mlp_dim=6144, patch_size=16,
                                      pos_resample="bicubic_antialias", **_GAP),
    # BEiT (timm's names; *_pt22k: microsoft/unilm's self-supervised pretraining files)
    "beit_base_patch16_224": dict(_B, **_BEIT, layer_scale=0.1),
    "beit_base_patch16_384": dict(_B, **_BEIT, layer_scale=0.1, image_size=384),
    "beit_large_patch16_224": dict(_L, **_BEIT, layer_scale=1e-5),
    "beit_large_patch16_384": dict(_L, **_BEIT, layer_scale=1e-5, image_size=384),
    "beit_large_patch16_512": dict(_L, **_BEIT, layer_scale=1e-5, image_size=512),
    "beitv2_base_patch16_224": dict(_B, **_BEIT, layer_scale=1e-5),
    "beitv2_large_patch16_224": dict(_L, **_BEIT, layer_scale=1e-5),
    "beit_base_patch16_224_pt22k": dict(_B, **_BEIT_PT, layer_scale=0.1),
    "beit_large_patch16_224_pt22k": dict(_L, **_BEIT_PT, layer_scale=1e-5),
}


def build(**options) -> Trunk:
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ValueError(f"unknown ViT option(s) {unknown}; valid: {tuple(OPTIONS)}")
    spec = Spec(**{**options, "layer_scale": options.get("layer_scale") or 0.0})
    return Trunk(spec, lambda seed=0: init_params(spec, seed),
                 lambda *a, **k: apply(spec, *a, **k), spec.features)


# ---------------------------------------------------------------- init
def init_params(spec: Spec, seed=0):
    """``(params, {})`` initialised as torchvision's ViT (layer scale, registers as DINOv2);
    under ``torch.device("meta")`` the same tree with no values (fpipe.models.trunk.init_on_meta)."""
    gen = torch.Generator().manual_seed(seed)
    init = torch.nn.init

    def new(shape, fill):
        t = torch.empty(shape)
        with torch.no_grad():
            fill(t)
        return t

    zeros, ones = init.zeros_, init.ones_
    normal = lambda std: lambda t: init.normal_(t, std=std, generator=gen)
    xavier = lambda t: init.xavier_uniform_(t, generator=gen)
    d, p = spec.hidden_dim, spec.patch_size

    def norm():
        return {"weight": new((d,), ones), "bias": new((d,), zeros)}

    params = {}
    if spec.class_token:
        params["class_token"] = new((1, 1, d), zeros)
    if spec.dist_token:
        params["dist_token"] = new((1, 1, d), lambda t: init.trunc_normal_(t, std=0.02, generator=gen))
    if spec.num_registers:
        params["register_tokens"] = new((1, spec.num_registers, d), normal(1e-6))
    params["conv_proj"] = {
        "weight": new((d, 3, p, p), lambda t: init.trunc_normal_(t, std=math.sqrt(1 / (3 * p * p)), generator=gen))}
    if spec.patch_bias:
        params["conv_proj"]["bias"] = new((d,), zeros)
    if spec.pre_norm:
        params["ln_pre"] = norm()
    layers = {}
    for i in range(spec.depth):
        layer = {"ln_1": norm(), "self_attention": {
            "in_proj_weight": new((3 * d, d), xavier), "in_proj_bias": new((3 * d,), zeros),
            "out_proj": {"weight": new((d, d), lambda t: init.kaiming_uniform_(t, a=math.sqrt(5), generator=gen)),
                         "bias": new((d,), zeros)}}}
        layer["ln_2"] = norm()
        m = spec.mlp_dim
        layer["mlp"] = ({"w12": {"weight": new((2 * m, d), xavier), "bias": new((2 * m,), zeros)},
                         "w3": {"weight": new((d, m), xavier), "bias": new((d,), zeros)}} if spec.mlp == "swiglu" else
                        {"0": {"weight": new((m, d), xavier), "bias": new((m,), normal(1e-6))},
                         "3": {"weight": new((d, m), xavier), "bias": new((d,), normal(1e-6))}})
        if spec.layer_scale:
            fill = lambda t: init.constant_(t, spec.layer_scale)
            layer["ls_1"], layer["ls_2"] = {"gamma": new((d,), fill)}, {"gamma": new((d,), fill)}
        if spec.rel_pos_bias == "block":
            layer["self_attention"]["relative_position_bias_table"] = new(bias_table_shape(spec), zeros)
        layers[f"encoder_layer_{i}"] = layer
    params["encoder"] = {}  # torchvision's order: pos_embedding, layers, ln
    if spec.pos_embed:
        params["encoder"]["pos_embedding"] = new((1, spec.grid ** 2 + spec.pos_rows, d), normal(0.02))
    if spec.rel_pos_bias == "shared":
        params["encoder"]["relative_position_bias_table"] = new(bias_table_shape(spec), zeros)
    params["encoder"]["layers"] = layers
    if spec.fc_norm:
        params["fc_norm"] = norm()
    else:
        params["encoder"]["ln"] = norm()
    return params, {}


def init(seed=0, **options):
    """``(params, state)`` of a ViT trunk; a convenience for ``build(**options).init(seed)``."""
    return build(**options).init(seed)


# ---------------------------------------------------------------- pieces
def resample_pos_embedding(pos, new_grid_hw, num_prefix, *, mode="bicubic", old_grid_hw=None):
    """A position embedding 1×(prefix + h·w)×D resampled to the grid ``new_grid_hw``.

    The first ``num_prefix`` rows (the class row) are kept; the patch rows, a square grid unless
    ``old_grid_hw`` says otherwise, are interpolated in float32 as ``mode`` says (RESAMPLE_MODES),
    then cast back. Pure; used at apply time when the input's grid differs from the stored one.
    """
    if mode not in RESAMPLE_MODES:
        raise ValueError(f"unknown pos_resample {mode!r}; valid: {RESAMPLE_MODES}")
    prefix, grid = pos[:, :num_prefix], pos[:, num_prefix:]
    if old_grid_hw is None:
        side = math.isqrt(grid.shape[1])
        if side * side != grid.shape[1]:
            raise ValueError(f"{grid.shape[1]} position rows after {num_prefix} prefix row(s) are not a square "
                             "grid; pass old_grid_hw")
        old_grid_hw = (side, side)
    (oh, ow), (nh, nw), d = old_grid_hw, new_grid_hw, pos.shape[-1]
    g = grid.float().reshape(1, oh, ow, d).permute(0, 3, 1, 2)
    if mode == "bicubic_offset":
        g = F.interpolate(g, scale_factor=((nh + 0.1) / oh, (nw + 0.1) / ow), mode="bicubic", align_corners=False)
    else:
        g = F.interpolate(g, size=(nh, nw), mode="bicubic", align_corners=False,
                          antialias=mode == "bicubic_antialias")
    g = g.permute(0, 2, 3, 1).reshape(1, nh * nw, d).to(pos.dtype)
    return torch.cat([prefix, g], dim=1)


def patch_embed(params, images, patch_size):
    """``conv_proj``: non-overlapping patches to N×D×h×w (torchvision's ``conv_proj`` output)."""
    return F.conv2d(images, params["conv_proj"]["weight"], params["conv_proj"].get("bias"), stride=patch_size)


def embed(spec, params, images):
    """Images to the token sequence ``[class, distillation, registers…, patches…]`` with position embeddings."""
    x = patch_embed(params, images, spec.patch_size)
    n, grid_hw = x.shape[0], tuple(x.shape[-2:])
    x = x.flatten(2).transpose(1, 2)
    if not spec.pos_embed:
        prefix = [params[name].expand(n, -1, -1) for name in ("class_token", "dist_token", "register_tokens")
                  if name in params]
        return torch.cat(prefix + [x], dim=1)
    pos = params["encoder"]["pos_embedding"]
    rows = spec.pos_rows
    if grid_hw != (spec.grid, spec.grid):
        pos = resample_pos_embedding(pos, grid_hw, rows, mode=spec.pos_resample,
                                     old_grid_hw=(spec.grid, spec.grid))
    prefix = []
    for i, name in enumerate(t for t in ("class_token", "dist_token") if getattr(spec, t)):
        token = params[name]
        prefix.append((token + pos[:, i:i + 1] if rows else token).expand(n, -1, -1))
    if spec.num_registers:
        prefix.append(params["register_tokens"].expand(n, -1, -1))
    return torch.cat(prefix + [x + pos[:, rows:]], dim=1)


def attention(p, x, heads, bias=None):
    """Multi-head self-attention with nn.MultiheadAttention's packed q/k/v projection; ``bias``
    ([heads, T, T] or None) is added to the logits. It goes in as [1, heads, T, T]: PyTorch's CPU
    attention takes its fused kernel for a 4-D mask that broadcasts over the batch, its unfused one
    for a 3-D mask (BEiT-B at 224 px, one block b8: 32 -> 15 ms eager, 22 -> 12 ms compiled)."""
    n, t, d = x.shape
    q, k, v = layers.dense(x, p["in_proj_weight"], p["in_proj_bias"]).view(n, t, 3, heads, d // heads).permute(
        2, 0, 3, 1, 4).unbind(0)
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=None if bias is None else bias.to(q.dtype)[None])
    return layers.dense(y.transpose(1, 2).reshape(n, t, d), p["out_proj"]["weight"], p["out_proj"]["bias"])


def bias_table_shape(spec) -> tuple:
    """BEiT's relative position bias table for the stored grid: ``[(2g-1)² + 3, heads]``."""
    return ((2 * spec.grid - 1) ** 2 + 3, spec.heads)


def bias_table_grid(rows: int):
    """The grid side g of a BEiT table of ``rows`` = (2g-1)² + 3 rows, or None (Swin's tables
    have no class rows: (2w-1)² - 3 is no odd square)."""
    side = math.isqrt(max(rows - 3, 0))
    return (side + 1) // 2 if side * side == rows - 3 and side % 2 else None


def relative_position_index(grid_hw: tuple) -> torch.Tensor:
    """``[(1 + h·w)²]`` int64 on the CPU: the table row of each (query, key) pair of ``[class,
    patches…]`` on an h×w grid: (row offset + h - 1)·(2w - 1) + column offset + w - 1 between
    patches, then the three class rows (class to patch, patch to class, class to class) last."""
    h, w = grid_hw
    n = (2 * h - 1) * (2 * w - 1)
    index = torch.full((h * w + 1, h * w + 1), n + 1, dtype=torch.int64, device="cpu")  # patch to class
    index[1:, 1:] = trunk_lib.relative_offset_index(h, w)
    index[0, 1:] = n  # class to patch
    index[0, 0] = n + 2
    return index.flatten()


_relative_position_index = trunk_lib.cached_when_eager(relative_position_index, maxsize=16)


def relative_position_bias(table, spec, grid_hw, index) -> torch.Tensor:
    """``[heads, 1 + h·w, 1 + h·w]``: ``table`` read for every token pair on the input's h×w patch
    grid (``index``: its ``relative_position_index``, on the table's device). Another grid than
    the stored one gets the patch part of the table resampled bilinearly to (2h-1)×(2w-1) offsets
    (transformers' BEiT with ``interpolate_pos_encoding``); the class rows stay."""
    if tuple(grid_hw) != (spec.grid, spec.grid):
        table = resample_bias_table(table, grid_hw)
    t = grid_hw[0] * grid_hw[1] + 1
    return table[index].view(t, t, table.shape[-1]).permute(2, 0, 1)


def resample_bias_table(table, grid_hw) -> torch.Tensor:
    """A BEiT table ``[(2g-1)² + 3, heads]`` of a square g×g grid for an h×w grid: the offsets'
    part resampled bilinearly to (2h-1)×(2w-1) (transformers' ``interpolate_pos_encoding``), the
    three class rows kept. Also what a file of another grid gets at load (fpipe.weights.resample)."""
    g, heads = bias_table_grid(table.shape[0]), table.shape[-1]
    if g is None:
        raise ValueError(f"a relative position bias table of {table.shape[0]} rows is not (2g-1)² + 3 for a grid g")
    side = 2 * g - 1
    grid = table[:-3].reshape(1, side, side, heads).permute(0, 3, 1, 2)
    grid = F.interpolate(grid.float(), size=(2 * grid_hw[0] - 1, 2 * grid_hw[1] - 1), mode="bilinear",
                         align_corners=False).to(table.dtype)
    return torch.cat([grid.permute(0, 2, 3, 1).reshape(-1, heads), table[-3:]])


def block(spec, p, x, bias=None, drop=0.0, train=False):
    """Pre-norm encoder block: x + ls_1·attn(ln_1(x)), then + ls_2·mlp(ln_2(x)); ``bias``: the
    attention's relative position bias, if any; ``drop``: each branch's stochastic depth in training."""
    y = attention(p["self_attention"], _layer_norm(p["ln_1"], x, spec.ln_eps), spec.heads, bias)
    x = x + trunk_lib.stochastic_depth(y * p["ls_1"]["gamma"] if "ls_1" in p else y, drop, train)
    y = feed_forward(p["mlp"], _layer_norm(p["ln_2"], x, spec.ln_eps), spec.mlp)
    return x + trunk_lib.stochastic_depth(y * p["ls_2"]["gamma"] if "ls_2" in p else y, drop, train)


def feed_forward(p, x, mlp="gelu"):
    """torchvision's MLP (``0``, the activation ``mlp`` names, ``3``) or dinov2's SwiGLU
    (``w12`` = [gate; value], ``w3``)."""
    if "w12" in p:
        gate, value = layers.dense(x, p["w12"]["weight"], p["w12"]["bias"]).chunk(2, dim=-1)
        return layers.dense(F.silu(gate) * value, p["w3"]["weight"], p["w3"]["bias"])
    hidden = layers.dense(x, p["0"]["weight"], p["0"]["bias"])
    if mlp == "quick_gelu":
        hidden = hidden * torch.sigmoid(1.702 * hidden)
    else:
        hidden = F.gelu(hidden, approximate="tanh" if mlp == "gelu_tanh" else "none")
    return layers.dense(hidden, p["3"]["weight"], p["3"]["bias"])


def _layer_norm(p, x, eps):
    return F.layer_norm(x, x.shape[-1:], p["weight"], p["bias"], eps)


# ---------------------------------------------------------------- apply
def apply(spec: Spec, params, state, images, *, train, features=None, eval_norms=frozenset(), sync_stats=None):
    """Returns ``({feature: tensor}, state)`` for the requested ``features`` (default: ``lastCLS``,
    or ``lastPOOL`` without a class token).

    A ViT has no dropout and no BatchNorm: ``train`` only turns on stochastic depth (when set);
    ``eval_norms`` and ``sync_stats`` change nothing, they keep the trunk contract. Blocks run only
    as far as needed.
    """
    valid = spec.features
    if features is None:
        features = ("lastCLS",) if spec.class_token else ("lastPOOL",)
    unknown = [f for f in features if f not in valid]
    if unknown:
        raise ValueError(f"unknown ViT feature(s) {unknown}; valid: {trunk_lib.feature_listing(valid)}")
    reads = {f: _block_read(f) for f in features if _block_read(f)}
    final = [f for f in features if f not in reads]
    n_blocks = spec.depth if final else 1 + max((i for i, _ in reads.values()), default=-1)
    keep = 4 if any(f in _NEEDS_4_BLOCKS for f in final) else 1  # last blocks' outputs the features read
    out, last = {}, []
    x = embed(spec, params, images)
    if spec.pre_norm:
        x = _layer_norm(params["ln_pre"], x, spec.ln_eps)
    grid_hw = (images.shape[-2] // spec.patch_size, images.shape[-1] // spec.patch_size)
    index = None  # BEiT's: made once for every block's table
    if spec.rel_pos_bias != "none":
        index = _relative_position_index(grid_hw).to(images.device)
    shared = params["encoder"].get("relative_position_bias_table")
    bias = None if shared is None else relative_position_bias(shared, spec, grid_hw, index)
    for i in range(n_blocks):
        p = params["encoder"]["layers"][f"encoder_layer_{i}"]
        own = p["self_attention"].get("relative_position_bias_table")
        drop = trunk_lib.depth_ramp(spec.stochastic_depth_prob, (spec.depth,), 0, i)
        x = block(spec, p, x, bias if own is None else relative_position_bias(own, spec, grid_hw, index), drop, train)
        out.update({f: _read_block(spec, x, read) for f, (j, read) in reads.items() if j == i})
        if final and i >= spec.depth - keep:
            last.append(x)
    if final:
        out.update(_final_features(spec, params, last, final, images))
    return out, state


def _block_read(name):
    """``(block index, read)`` of a block feature's name (``block3POOL``: (3, "POOL")), else None.
    String methods, not a regex: torch.compile folds them on the constant names."""
    for read in BLOCK_READS[::-1]:
        index = name[len("block"):len(name) - len(read)]
        if name.startswith("block") and name.endswith(read) and index.isdigit():
            return int(index), read
    return None


def _read_block(spec, x, read):
    """A block feature (``BLOCK_READS``) of the block output ``x``, as it is: no norm."""
    if read == "CLS":
        return x[:, 0]
    if read == "POOL":
        return _patch_mean(spec, x)
    if read == "_cls_avgpool":
        return torch.cat([x[:, 0], _patch_mean(spec, x)], dim=-1)
    return x


def _patch_mean(spec, t):
    """The mean of the patch tokens (class and distillation tokens and registers excluded)."""
    return t[:, spec.num_prefix:].mean(dim=1)


def _final_features(spec, params, last, names, images):
    """The features read after the final norm from the last blocks' outputs ``last``."""
    normed = [x if spec.fc_norm else _layer_norm(params["encoder"]["ln"], x, spec.ln_eps) for x in last]
    cls = lambda t: t[:, 0]
    patches = lambda t: t[:, spec.num_prefix:]

    def pool(t):  # the patch mean, fc_norm'ed if any
        m = _patch_mean(spec, t)
        return _layer_norm(params["fc_norm"], m, spec.ln_eps) if spec.fc_norm else m

    top = normed[-1]
    make = {
        "tokens": lambda: top,
        "patch_grid": lambda: patches(top).unflatten(
            1, (images.shape[-2] // spec.patch_size, images.shape[-1] // spec.patch_size)).permute(0, 3, 1, 2),
        "lastCLS": lambda: cls(top),
        "lastPOOL": lambda: pool(top),
        "concatCLS4": lambda: torch.cat([cls(t) for t in normed[-4:]], dim=-1),
        "concatPOOL4": lambda: torch.cat([pool(t) for t in normed[-4:]], dim=-1),
        "cls1_avgpool": lambda: torch.cat([cls(top), pool(top)], dim=-1),
        "cls4_avgpool": lambda: torch.cat([cls(t) for t in normed[-4:]] + [pool(top)], dim=-1),
        # DINO's eval_linear.py order (its released ViT-B heads): class and mean values alternating
        "cls1_avgpool_interleaved": lambda: torch.stack([cls(top), pool(top)], dim=-1).flatten(1),
    }
    return {name: make[name]() for name in names}
