r"""Rename tables: other libraries' names for a trunk -> fpipe's (torchvision's) names.

A table is a sequence of ``(regex, replacement)`` rules applied one after the other to each
name (every rule, not the first match), so a table reads as the mapping it documents; a
replacement is a ``re.sub`` string, or a function of the match where an index must change. Rules
anchor on name parts (``(^|\.)``), so they work behind any prefix (``teacher.backbone.``).
``format: auto`` tries each table when the file's own names do not cover the trunk, and the
report says which table it used.
"""
import re

# timm's VisionTransformer (and DINO, DINOv2 hub, MAE, MoCo v3 and DeiT files, which use its
# names) -> torchvision's VisionTransformer, plus layer scale, registers and MAE's fc_norm; BEiT's
# (timm's and microsoft/unilm's BEiT, BEiT v2 and data2vec files) q/v biases, layer scale and
# relative position bias tables, per block or shared (rel_pos_bias).
# DINOv2 training files with block_chunks name blocks.<chunk>.<i> (i the global index); its
# SwiGLU FFN keeps dinov2's names mlp.w12 / mlp.w3, which are fpipe's (vit mlp="swiglu").
TIMM_VIT = (
    (r"(^|\.)cls_token$", r"\1class_token"),
    (r"(^|\.)(reg_token|register_tokens)$", r"\1register_tokens"),
    (r"(^|\.)pos_embed$", r"\1encoder.pos_embedding"),
    (r"(^|\.)patch_embed\.proj\.", r"\1conv_proj."),
    (r"(^|\.)blocks\.\d+\.(\d+)\.", r"\1encoder.layers.encoder_layer_\2."),
    (r"(^|\.)blocks\.(\d+)\.", r"\1encoder.layers.encoder_layer_\2."),
    (r"\.norm1\.", ".ln_1."),
    (r"\.norm2\.", ".ln_2."),
    (r"\.attn\.qkv\.(weight|bias)$", r".self_attention.in_proj_\1"),
    (r"\.attn\.proj\.", ".self_attention.out_proj."),
    (r"\.mlp\.fc1\.", ".mlp.0."),
    (r"\.mlp\.fc2\.", ".mlp.3."),
    (r"\.ls([12])\.gamma$", r".ls_\1.gamma"),
    (r"\.gamma_([12])$", r".ls_\1.gamma"),  # BEiT's layer scale
    (r"\.attn\.\{q_bias,v_bias\}$", ".self_attention.in_proj_bias"),  # BEiT: fuse.pack's [q, zeros, v]
    (r"\.attn\.relative_position_bias_table$", ".self_attention.relative_position_bias_table"),
    (r"(^|\.)rel_pos_bias\.relative_position_bias_table$", r"\1encoder.relative_position_bias_table"),
    (r"(^|\.)norm_pre\.", r"\1ln_pre."),
    (r"(^|\.)norm\.(weight|bias)$", r"\1encoder.ln.\2"),
    (r"(^|\.)head\.(weight|bias)$", r"\1heads.head.\2"),
)
# timm's DINOv2 ViT-g (vit_giant_patch14_*dinov2): its SwiGLUPacked FFN is dinov2's w12 / w3
# under the names mlp.fc1 / mlp.fc2 (same [gate; value] order), so fc1/fc2 mean w12/w3 here.
TIMM_VIT_SWIGLU = tuple(rule for rule in TIMM_VIT if "mlp" not in rule[0]) + (
    (r"\.mlp\.fc1\.", ".mlp.w12."), (r"\.mlp\.fc2\.", ".mlp.w3."))

# detectron2's ResNet (MoCo's and solo-learn's convert-pretrain-to-detectron2.py, detectron2's
# own checkpoints behind backbone.bottom_up.) -> torchvision's ResNet.
DETECTRON2_RESNET = (
    (r"(^|\.)stem\.conv1\.norm\.", r"\1bn1."),
    (r"(^|\.)stem\.conv1\.", r"\1conv1."),
    (r"(^|\.)res2\.", r"\1layer1."),
    (r"(^|\.)res3\.", r"\1layer2."),
    (r"(^|\.)res4\.", r"\1layer3."),
    (r"(^|\.)res5\.", r"\1layer4."),
    (r"\.conv([123])\.norm\.", r".bn\1."),
    (r"\.shortcut\.norm\.", ".downsample.1."),
    (r"\.shortcut\.", ".downsample.0."),
)

# torchvision's ResNet as nn.Sequential(*list(resnet.children())[:-1]) (lightly's examples,
# PyTorch-BYOL, SimCLR ports): children by position, 0 conv1, 1 bn1, 4..7 layer1..layer4.
SEQUENTIAL_RESNET = (
    (r"(^|\.)4\.(\d+)\.", r"\1layer1.\2."),
    (r"(^|\.)5\.(\d+)\.", r"\1layer2.\2."),
    (r"(^|\.)6\.(\d+)\.", r"\1layer3.\2."),
    (r"(^|\.)7\.(\d+)\.", r"\1layer4.\2."),
    (r"(^|\.)(?<!downsample\.)0\.weight$", r"\1conv1.weight"),
    (r"(^|\.)(?<!downsample\.)1\.(weight|bias|running_mean|running_var|num_batches_tracked)$", r"\1bn1.\2"),
)

# VISSL's RegNet trunk (ClassyVision's AnyNet under _feature_blocks: conv1 = stem, res2..res5 =
# block1..block4; SEER's FSDP version adds a block<i>-part<j> group) -> torchvision's RegNet.
VISSL_REGNET = (
    (r"(^|\.)conv1\.stem\.", r"\1stem."),
    (r"(^|\.)res2\.(block\d+-part\d+\.)?", r"\1trunk_output.block1."),
    (r"(^|\.)res3\.(block\d+-part\d+\.)?", r"\1trunk_output.block2."),
    (r"(^|\.)res4\.(block\d+-part\d+\.)?", r"\1trunk_output.block3."),
    (r"(^|\.)res5\.(block\d+-part\d+\.)?", r"\1trunk_output.block4."),
    (r"\.proj\.weight$", ".proj.0.weight"),
    (r"\.bn\.(weight|bias|running_mean|running_var|num_batches_tracked)$", r".proj.1.\1"),
    (r"\.f\.se\.excitation\.0\.", ".f.se.fc1."),
    (r"\.f\.se\.excitation\.2\.", ".f.se.fc2."),
    (r"\.f\.c\.weight$", ".f.c.0.weight"),
    (r"\.f\.final_bn\.", ".f.c.1."),
)

# timm's RegNet (stem.conv/bn, s<i>.b<j> counted from 1, ConvNormAct conv1..3, downsample)
# -> torchvision's RegNet.
TIMM_REGNET = (
    (r"(^|\.)stem\.conv\.", r"\1stem.0."),
    (r"(^|\.)stem\.bn\.", r"\1stem.1."),
    (r"(^|\.)s(\d)\.b(\d+)\.", lambda m: f"{m[1]}trunk_output.block{m[2]}.block{m[2]}-{int(m[3]) - 1}."),
    (r"\.conv1\.conv\.", ".f.a.0."), (r"\.conv1\.bn\.", ".f.a.1."),
    (r"\.conv2\.conv\.", ".f.b.0."), (r"\.conv2\.bn\.", ".f.b.1."),
    (r"\.conv3\.conv\.", ".f.c.0."), (r"\.conv3\.bn\.", ".f.c.1."),
    (r"\.se\.fc([12])\.", r".f.se.fc\1."),
    (r"\.downsample\.conv\.", ".proj.0."), (r"\.downsample\.bn\.", ".proj.1."),
    (r"(^|\.)head\.fc\.", r"\1fc."),
)

# ConvNeXt (V1 and V2), timm's names and the original facebookresearch/ConvNeXt(-V2) names ->
# torchvision's (features.0 stem, features.2s+1 stage s, features.2s its downsampling; layer
# scales are [C] there and [C, 1, 1] here: reshaped on load). V2's GRN (timm's mlp.grn, the
# original's grn.gamma/beta [1, 1, 1, C]) is fpipe's block.grn.
_CONVNEXT_GRN = (
    (r"(features\.\d+\.\d+)\.(mlp\.)?grn\.", r"\1.block.grn."),
    (r"\.grn\.gamma$", ".grn.weight"), (r"\.grn\.beta$", ".grn.bias"),
)
_CONVNEXT_BLOCK = (
    *_CONVNEXT_GRN,  # before the layer scale's gamma
    (r"(features\.\d+\.\d+)\.norm\.", r"\1.block.2."),
    (r"\.gamma$", ".layer_scale"),
)
TIMM_CONVNEXT = (
    (r"(^|\.)stem\.([01])\.", r"\1features.0.\2."),
    (r"(^|\.)stages\.(\d)\.downsample\.([01])\.", lambda m: f"{m[1]}features.{2 * int(m[2])}.{m[3]}."),
    (r"(^|\.)stages\.(\d)\.blocks\.(\d+)\.", lambda m: f"{m[1]}features.{2 * int(m[2]) + 1}.{m[3]}."),
    (r"\.conv_dw\.", ".block.0."), (r"\.mlp\.fc1\.", ".block.3."), (r"\.mlp\.fc2\.", ".block.5."),
    *_CONVNEXT_BLOCK,
    (r"(^|\.)head\.norm\.", r"\1classifier.0."), (r"(^|\.)head\.fc\.", r"\1classifier.2."),
)
FB_CONVNEXT = (
    (r"(^|\.)downsample_layers\.(\d)\.([01])\.", lambda m: f"{m[1]}features.{2 * int(m[2])}.{m[3]}."),
    (r"(^|\.)stages\.(\d)\.(\d+)\.", lambda m: f"{m[1]}features.{2 * int(m[2]) + 1}.{m[3]}."),
    (r"\.dwconv\.", ".block.0."), (r"\.pwconv1\.", ".block.3."), (r"\.pwconv2\.", ".block.5."),
    *_CONVNEXT_BLOCK,
    (r"(^|\.)norm\.(weight|bias)$", r"\1classifier.0.\2"), (r"(^|\.)head\.", r"\1classifier.2."),
)

# timm's EfficientNet (efficientnet_b0..b7; tf_efficientnet_* share the names, not the padding)
# -> torchvision's. timm's stage 0 is DepthwiseSeparableConv blocks (conv_dw, bn1, se, conv_pw,
# bn2), the other stages InvertedResidual (conv_pw expands, bn1, conv_dw, bn2, se, conv_pwl
# projects, bn3); torchvision numbers a block's sub-layers in order (block.<j>.0 conv, .1 BN;
# SE's 1x1 convs fc1/fc2). Blocks first, so that the stem's bn1 and the head's bn2 are left.
_TIMM_DS = {"conv_dw": "block.0.0", "bn1": "block.0.1", "se.conv_reduce": "block.1.fc1",
            "se.conv_expand": "block.1.fc2", "conv_pw": "block.2.0", "bn2": "block.2.1"}
_TIMM_IR = {"conv_pw": "block.0.0", "bn1": "block.0.1", "conv_dw": "block.1.0", "bn2": "block.1.1",
            "se.conv_reduce": "block.2.fc1", "se.conv_expand": "block.2.fc2", "conv_pwl": "block.3.0",
            "bn3": "block.3.1"}
TIMM_EFFICIENTNET = (
    (r"(^|\.)blocks\.0\.(\d+)\.(conv_dw|bn1|se\.conv_reduce|se\.conv_expand|conv_pw|bn2)\.",
     lambda m: f"{m[1]}features.1.{m[2]}.{_TIMM_DS[m[3]]}."),
    (r"(^|\.)blocks\.([1-6])\.(\d+)\.(conv_pwl|conv_pw|bn1|conv_dw|bn2|se\.conv_reduce|se\.conv_expand|bn3)\.",
     lambda m: f"{m[1]}features.{int(m[2]) + 1}.{m[3]}.{_TIMM_IR[m[4]]}."),
    (r"(^|\.)conv_stem\.", r"\1features.0.0."), (r"(^|\.)bn1\.", r"\1features.0.1."),
    (r"(^|\.)conv_head\.", r"\1features.8.0."), (r"(^|\.)bn2\.", r"\1features.8.1."),
    (r"(^|\.)classifier\.(weight|bias)$", r"\1classifier.1.\2"),
)

# transformers' EfficientNet (google/efficientnet-b0..b7, Keras ports: the tf_efficientnet_b*
# presets' padding and eps) -> torchvision's, once fpipe.weights.stages has numbered its blocks by
# stage (encoder.blocks.<stage>.<j>). Stage 0's blocks have no expansion.
_HF_DS = {"depthwise_conv.depthwise_conv": "block.0.0", "depthwise_conv.depthwise_norm": "block.0.1",
          "squeeze_excite.reduce": "block.1.fc1", "squeeze_excite.expand": "block.1.fc2",
          "projection.project_conv": "block.2.0", "projection.project_bn": "block.2.1"}
_HF_IR = {"expansion.expand_conv": "block.0.0", "expansion.expand_bn": "block.0.1",
          "depthwise_conv.depthwise_conv": "block.1.0", "depthwise_conv.depthwise_norm": "block.1.1",
          "squeeze_excite.reduce": "block.2.fc1", "squeeze_excite.expand": "block.2.fc2",
          "projection.project_conv": "block.3.0", "projection.project_bn": "block.3.1"}
_HF_PARTS = "|".join(re.escape(p) for p in _HF_IR)
HF_EFFICIENTNET = (
    (r"(^|\.)embeddings\.convolution\.", r"\1features.0.0."), (r"(^|\.)embeddings\.batchnorm\.", r"\1features.0.1."),
    (rf"(^|\.)encoder\.blocks\.0\.(\d+)\.({_HF_PARTS})\.",
     lambda m: f"{m[1]}features.1.{m[2]}.{_HF_DS.get(m[3], m[3])}."),
    (rf"(^|\.)encoder\.blocks\.([1-6])\.(\d+)\.({_HF_PARTS})\.",
     lambda m: f"{m[1]}features.{int(m[2]) + 1}.{m[3]}.{_HF_IR[m[4]]}."),
    (r"(^|\.)encoder\.top_conv\.", r"\1features.8.0."), (r"(^|\.)encoder\.top_bn\.", r"\1features.8.1."),
    (r"(^|\.)classifier\.(weight|bias)$", r"\1classifier.1.\2"),
)

# CLIP image towers: OpenAI's and open_clip's state dicts (visual.*; the text tower's resblocks
# sit at the top, other shapes) and transformers' CLIPVisionModel / CLIPModel and SigLIP (vision_model.*,
# fuse.pack has packed q/k/v_proj) -> torchvision's ViT + ln_pre. class_embedding [D] and
# positional_embedding [N, D] take the model's leading 1-dims on load (resample). The projection
# into the text space (proj, visual_projection) is no trunk tensor: left out.
OPENCLIP_VIT = (
    (r"(^|\.)class_embedding$", r"\1class_token"),
    (r"(^|\.)positional_embedding$", r"\1encoder.pos_embedding"),
    (r"(^|\.)conv1\.weight$", r"\1conv_proj.weight"),
    (r"(^|\.)transformer\.resblocks\.(\d+)\.", r"\1encoder.layers.encoder_layer_\2."),
    (r"\.attn\.in_proj_(weight|bias)$", r".self_attention.in_proj_\1"),
    (r"\.attn\.out_proj\.", ".self_attention.out_proj."),
    (r"\.mlp\.c_fc\.", ".mlp.0."), (r"\.mlp\.c_proj\.", ".mlp.3."),
    (r"(^|\.)ln_post\.", r"\1encoder.ln."),
)
HF_CLIP = (
    (r"(^|\.)embeddings\.class_embedding$", r"\1class_token"),
    (r"(^|\.)embeddings\.patch_embedding\.(weight|bias)$", r"\1conv_proj.\2"),  # SigLIP's has a bias
    (r"(^|\.)embeddings\.position_embedding\.weight$", r"\1encoder.pos_embedding"),
    (r"(^|\.)pre_layrnorm\.", r"\1ln_pre."),
    (r"(^|\.)encoder\.layers\.(\d+)\.", r"\1encoder.layers.encoder_layer_\2."),
    (r"\.self_attn\.\{q_proj,k_proj,v_proj\}\.(weight|bias)$", r".self_attention.in_proj_\1"),
    (r"\.self_attn\.out_proj\.", ".self_attention.out_proj."),
    (r"\.layer_norm1\.", ".ln_1."), (r"\.layer_norm2\.", ".ln_2."),
    (r"\.mlp\.fc1\.", ".mlp.0."), (r"\.mlp\.fc2\.", ".mlp.3."),
    (r"(^|\.)post_layernorm\.", r"\1encoder.ln."),
)

# JAX/Flax ViTs (.npz, in PyTorch's layouts by flax_layout; fuse.pack has packed query/key/value):
# google-research/vision_transformer (ViT-*.npz, AugReg: MultiHeadDotProductAttention_1,
# MlpBlock_3, LayerNorm_0/2, Transformer/posembed_input) and big_vision (..._0, LayerNorm_0/1, a
# top-level pos_embedding without a class row) -> torchvision's ViT. Flax's gelu is the tanh
# approximation: the trunk option mlp="gelu_tanh" computes it.
FLAX_VIT = (
    (r"(^|\.)embedding\.(weight|bias)$", r"\1conv_proj.\2"),
    (r"(^|\.)cls$", r"\1class_token"),
    (r"(^|\.)(Transformer\.posembed_input\.)?pos_embedding$", r"\1encoder.pos_embedding"),
    (r"(^|\.)Transformer\.encoderblock_(\d+)\.", r"\1encoder.layers.encoder_layer_\2."),
    (r"\.LayerNorm_0\.", ".ln_1."), (r"\.LayerNorm_[12]\.", ".ln_2."),
    (r"\.MultiHeadDotProductAttention_\d\.\{query,key,value\}\.(weight|bias)$", r".self_attention.in_proj_\1"),
    (r"\.MultiHeadDotProductAttention_\d\.out\.", ".self_attention.out_proj."),
    (r"\.MlpBlock_\d\.Dense_0\.", ".mlp.0."), (r"\.MlpBlock_\d\.Dense_1\.", ".mlp.3."),
    (r"(^|\.)Transformer\.encoder_norm\.", r"\1encoder.ln."),
    (r"(^|\.)head\.(weight|bias)$", r"\1heads.head.\2"),
)

# Hugging Face transformers' files (save_pretrained; the hub's model.safetensors / pytorch_model.bin)
# and, where transformers 5 renamed modules, its in-memory state dicts. fuse.pack has already
# packed the separate q/k/v (and SwiGLU gate/up) projections into one "{a,b,c}" name each.
# ViTModel, DeiT, ViTMAE, DINOv2 (with registers), BEiT and Data2VecVision -> torchvision's ViT (+
# layer scale, SwiGLU, BEiT's relative position bias tables and mean-pooling fc_norm).
HF_VIT = (
    (r"(^|\.)embeddings\.cls_token$", r"\1class_token"),
    (r"(^|\.)embeddings\.distillation_token$", r"\1dist_token"),
    (r"(^|\.)embeddings\.register_tokens$", r"\1register_tokens"),
    (r"(^|\.)embeddings\.position_embeddings$", r"\1encoder.pos_embedding"),
    (r"(^|\.)embeddings\.patch_embeddings\.projection\.", r"\1conv_proj."),
    (r"(^|\.)(encoder\.layer|layers)\.(\d+)\.", r"\1encoder.layers.encoder_layer_\3."),
    (r"\.attention\.(attention\.\{query,key,value\}|\{q_proj,k_proj,v_proj\})\.(weight|bias)$",
     r".self_attention.in_proj_\2"),
    (r"\.attention\.(output\.dense|o_proj)\.", ".self_attention.out_proj."),
    (r"\.(intermediate\.dense|mlp\.fc1)\.", ".mlp.0."),
    (r"\.(output\.dense|mlp\.fc2)\.", ".mlp.3."),
    (r"\.mlp\.(weights_in|\{gate_proj,up_proj\})\.", ".mlp.w12."),
    (r"\.mlp\.(weights_out|down_proj)\.", ".mlp.w3."),
    (r"\.(layernorm_before|norm1)\.", ".ln_1."),
    (r"\.(layernorm_after|norm2)\.", ".ln_2."),
    (r"\.layer_scale([12])\.lambda1$", r".ls_\1.gamma"),
    (r"\.lambda_([12])$", r".ls_\1.gamma"),  # BEiT's and data2vec's layer scale
    (r"(^|\.)encoder\.relative_position_bias\.", r"\1encoder."),  # a shared table
    (r"\.(attention\.attention\.)?relative_position_bias\.", ".self_attention."),
    (r"(^|\.)pooler\.layernorm\.", r"\1fc_norm."),  # BEiT's mean pooling
    (r"(^|\.)layernorm\.(weight|bias)$", r"\1encoder.ln.\2"),
    (r"(^|\.)classifier\.(weight|bias)$", r"\1heads.head.\2"),
)
# ResNetModel / ResNetForImageClassification (microsoft/resnet-*) -> torchvision's ResNet: a
# block's layer.<j> is conv<j+1> + bn<j+1>, its shortcut the downsample.
HF_RESNET = (
    (r"(^|\.)embedder\.embedder\.convolution\.", r"\1conv1."),
    (r"(^|\.)embedder\.embedder\.normalization\.", r"\1bn1."),
    (r"(^|\.)encoder\.stages\.(\d)\.layers\.(\d+)\.", lambda m: f"{m[1]}layer{int(m[2]) + 1}.{m[3]}."),
    (r"\.shortcut\.convolution\.", ".downsample.0."), (r"\.shortcut\.normalization\.", ".downsample.1."),
    (r"\.layer\.(\d)\.convolution\.", lambda m: f".conv{int(m[1]) + 1}."),
    (r"\.layer\.(\d)\.normalization\.", lambda m: f".bn{int(m[1]) + 1}."),
    (r"(^|\.)classifier\.1\.", r"\1fc."),
)
# RegNetModel / RegNetForImageClassification (facebook/regnet-*, the SEER ones too) -> torchvision's
# RegNet: a block's layer.0/1 are a/b, RegNetY's layer.2 its squeeze-excitation and layer.3 its c
# (RegNetX's c is layer.2), the shortcut its proj.
HF_REGNET = (
    (r"(^|\.)embedder\.embedder\.convolution\.", r"\1stem.0."),
    (r"(^|\.)embedder\.embedder\.normalization\.", r"\1stem.1."),
    (r"(^|\.)encoder\.stages\.(\d)\.layers\.(\d+)\.",
     lambda m: f"{m[1]}trunk_output.block{int(m[2]) + 1}.block{int(m[2]) + 1}-{m[3]}."),
    (r"\.shortcut\.convolution\.", ".proj.0."), (r"\.shortcut\.normalization\.", ".proj.1."),
    (r"\.layer\.2\.attention\.0\.", ".f.se.fc1."), (r"\.layer\.2\.attention\.2\.", ".f.se.fc2."),
    (r"\.layer\.([0123])\.(convolution|normalization)\.",
     lambda m: f".f.{'abcc'[int(m[1])]}.{0 if m[2] == 'convolution' else 1}."),
    (r"(^|\.)classifier\.1\.", r"\1fc."),
)
# ConvNextModel / ConvNextForImageClassification (facebook/convnext-*) and ConvNextV2's
# (facebook/convnextv2-*) -> torchvision's ConvNeXt; its stage 0 has no downsampling layer (the
# embeddings are the stem), the final layernorm is torchvision's classifier.0.
HF_CONVNEXT = (
    (r"(^|\.)embeddings\.patch_embeddings\.", r"\1features.0.0."),
    (r"(^|\.)embeddings\.layernorm\.", r"\1features.0.1."),
    (r"(^|\.)encoder\.stages\.(\d)\.downsampling_layer\.([01])\.",
     lambda m: f"{m[1]}features.{2 * int(m[2])}.{m[3]}."),
    (r"(^|\.)encoder\.stages\.(\d)\.layers\.(\d+)\.", lambda m: f"{m[1]}features.{2 * int(m[2]) + 1}.{m[3]}."),
    (r"\.dwconv\.", ".block.0."), (r"\.pwconv1\.", ".block.3."), (r"\.pwconv2\.", ".block.5."),
    (r"(features\.\d+\.\d+)\.layernorm\.", r"\1.block.2."),
    (r"\.layer_scale_parameter$", ".layer_scale"),
    *_CONVNEXT_GRN,
    (r"(^|\.)classifier\.(weight|bias)$", r"\1classifier.2.\2"),
    (r"(^|\.)layernorm\.(weight|bias)$", r"\1classifier.0.\2"),
)

# Swin (V1 and V2): timm's names (1.0: a stage's downsampling at its start, layers.<s>.downsample
# for s >= 1) and microsoft/Swin-Transformer's (old timm, SimMIM, MoBY, EsViT: at a stage's end,
# s <= 2) -> torchvision's (features.0 patch embedding, features.2s+1 stage s, features.2s+2 the
# merging after it). The two differ only there, and the shapes tell them apart. The original's
# attn_mask buffers are left out; relative_position_index and V2's relative_coords_table are
# never read (detect.DERIVED).
_SWIN = (
    (r"(^|\.)patch_embed\.proj\.", r"\1features.0.0."), (r"(^|\.)patch_embed\.norm\.", r"\1features.0.2."),
    (r"(^|\.)layers\.(\d)\.blocks\.(\d+)\.", lambda m: f"{m[1]}features.{2 * int(m[2]) + 1}.{m[3]}."),
    (r"\.mlp\.fc1\.", ".mlp.0."), (r"\.mlp\.fc2\.", ".mlp.3."),
    (r"\.attn\.\{q_bias,v_bias\}$", ".attn.qkv.bias"),  # V2: fuse.pack's [q, zeros, v]
    (r"(^|\.)head\.fc\.", r"\1head."),
)
TIMM_SWIN = (
    (r"(^|\.)layers\.(\d)\.downsample\.", lambda m: f"{m[1]}features.{2 * int(m[2])}."),
    *_SWIN,
)
MS_SWIN = (
    (r"(^|\.)layers\.(\d)\.downsample\.", lambda m: f"{m[1]}features.{2 * int(m[2]) + 2}."),
    *_SWIN,
)
# Hugging Face transformers' Swin and Swinv2 (microsoft/swin-*, microsoft/swinv2-*): downsampling
# at a stage's end as the original's; fuse.pack has packed query/key/value (Swinv2's key has no
# bias: a zero one).
HF_SWIN = (
    (r"(^|\.)embeddings\.patch_embeddings\.projection\.", r"\1features.0.0."),
    (r"(^|\.)embeddings\.norm\.", r"\1features.0.2."),
    (r"(^|\.)encoder\.layers\.(\d)\.downsample\.", lambda m: f"{m[1]}features.{2 * int(m[2]) + 2}."),
    (r"(^|\.)encoder\.layers\.(\d)\.blocks\.(\d+)\.", lambda m: f"{m[1]}features.{2 * int(m[2]) + 1}.{m[3]}."),
    (r"\.layernorm_before\.", ".norm1."), (r"\.layernorm_after\.", ".norm2."),
    (r"\.attention\.self\.\{query,key,value\}\.", ".attn.qkv."),
    (r"\.attention\.self\.continuous_position_bias_mlp\.", ".attn.cpb_mlp."), (r"\.attention\.self\.", ".attn."),
    (r"\.attention\.output\.dense\.", ".attn.proj."),
    (r"\.intermediate\.dense\.", ".mlp.0."), (r"\.output\.dense\.", ".mlp.3."),
    (r"(^|\.)layernorm\.(weight|bias)$", r"\1norm.\2"), (r"(^|\.)classifier\.(weight|bias)$", r"\1head.\2"),
)

TABLES = {"timm_vit": TIMM_VIT, "timm_vit_swiglu": TIMM_VIT_SWIGLU, "detectron2_resnet": DETECTRON2_RESNET,
          "sequential_resnet": SEQUENTIAL_RESNET, "vissl_regnet": VISSL_REGNET, "timm_regnet": TIMM_REGNET,
          "timm_convnext": TIMM_CONVNEXT, "fb_convnext": FB_CONVNEXT, "timm_efficientnet": TIMM_EFFICIENTNET,
          "hf_efficientnet": HF_EFFICIENTNET,
          "openclip_vit": OPENCLIP_VIT, "hf_clip": HF_CLIP, "flax_vit": FLAX_VIT, "hf_vit": HF_VIT,
          "hf_resnet": HF_RESNET, "hf_regnet": HF_REGNET, "hf_convnext": HF_CONVNEXT, "timm_swin": TIMM_SWIN,
          "ms_swin": MS_SWIN, "hf_swin": HF_SWIN}
_COMPILED = {}


def apply(name: str, table) -> str:
    """``name`` after every rule of ``table``, in order."""
    key = id(table)
    if key not in _COMPILED:
        _COMPILED[key] = [(re.compile(p), r) for p, r in table]
    for pattern, repl in _COMPILED[key]:
        name = pattern.sub(repl, name)
    return name


def rename_all(names, table) -> dict:
    """``{new name: old name}``; None when two names would become one (the table does not fit)."""
    out = {}
    for old in names:
        new = apply(old, table)
        if new in out:
            return None
        out[new] = old
    return out
