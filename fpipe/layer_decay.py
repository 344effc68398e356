"""Layer-wise lr decay, as BEiT's, MAE's, SimMIM's and ConvNeXt V2's fine-tuning recipes number layers.

A trunk of D blocks numbers each param's layer from 0 (the input side) to D + 1 (after the last
block: final norms, heads); its lr multiplier is decay^(D + 1 - layer). Where each family's recipe
puts what lies between the blocks (fpipe's, i.e. torchvision's, names):

  ViT (BEiT, MAE, data2vec): tokens, positions, the patch projection and CLIP's ``ln_pre`` 0; block
      i (``encoder.layers.encoder_layer_<i>``) i + 1; BEiT's shared bias table D + 1.
  Swin (SimMIM): the patch embedding ``features.0`` 0; block j of stage s (``features.<2s+1>.<j>``)
      before(s) + j + 1; the patch merging after stage s (``features.<2s+2>``) with that stage's
      last block, before(s + 1).
  ConvNeXt (ConvNeXt V2, ``single``): the stem ``features.0`` 1; block j of stage s before(s) + j + 1;
      the downsampling before stage s (``features.<2s>``) with that stage's first block, before(s) + 1.
  ConvNeXt's ``group`` (``optim.layer_decay_type``: ConvNeXt V2's Base, Large and Huge, and every
      layer decay of ConvNeXt V1's main.py, for its Small to XLarge: stages of 3, 3, 27 and 3 blocks): 12 layers, the stem 0, stage 0 (and the downsampling before it) 1, stage 1 and
      its downsampling 2, stage 2's downsampling 3, its block j 3 + j // 3, stage 3 12.

before(s): the blocks of the stages before s. Blocks are counted over every param of the model,
frozen ones too, so freezing the last blocks changes no one's multiplier.
"""
import re

_TRUNK = r"(?:trunk\.)?"
_VIT_BLOCK = re.compile(_TRUNK + r"encoder\.layers\.encoder_layer_(\d+)\..*")
_VIT_EMBEDDING = re.compile(_TRUNK + r"(?:class_token|dist_token|register_tokens|conv_proj\..*|"
                                     r"encoder\.pos_embedding|ln_pre\..*)")
_STAGED = re.compile(_TRUNK + r"features\.(\d+)\.(?:(\d+)\.)?.*")  # features.<k>[.<block j>].…
FAMILIES = ("vit", "swin", "convnext")
KINDS = ("single", "group")  # optim.layer_decay_type: a layer per block, or ConvNeXt's groups of 3
GROUP_DEPTHS = [3, 3, 27, 3]  # the ConvNeXt stages "group" numbers


def family_of(names) -> str | None:
    """Which recipe numbers ``names``' layers (FAMILIES), or None."""
    if any(_VIT_BLOCK.fullmatch(n) for n in names):
        return "vit"
    if {int(m[1]) for m in map(_STAGED.fullmatch, names) if m} == set(range(8)):  # stem + 4 stages, 3 between
        if any(re.search(r"features\.\d+\.\d+\.attn\.", n) for n in names):
            return "swin"
        if any(re.search(r"features\.\d+\.\d+\.block\.", n) for n in names):
            return "convnext"
    return None


def mults(names, decay: float, model_names=None, kind: str = "single") -> tuple:
    """``({name: lr multiplier}, description)`` for ``names``; blocks counted over ``model_names``
    (every param of the model; default ``names``); ``kind``: one of KINDS."""
    if not 0 < decay <= 1:
        raise ValueError(f"optim.layer_decay must be in (0, 1] (1: off), got {decay}")
    if kind not in KINDS:
        raise ValueError(f"optim.layer_decay_type={kind!r}; valid: {', '.join(KINDS)}")
    if not names:  # nothing to train (a config check): the value alone was checked
        return {}, None
    every = list(model_names or names)
    family = family_of(every)
    if family is None:
        raise ValueError("optim.layer_decay numbers the layers of ViT, Swin and ConvNeXt trunks "
                         "(fpipe/layer_decay.py); this model is none of them: set optim.layer_decay=1.0 or use "
                         "optim.lr_mults rules")
    if family == "vit":
        depth = 1 + max(int(m[1]) for m in map(_VIT_BLOCK.fullmatch, every) if m)
        layer = lambda name: _vit_layer(name, depth)  # noqa: E731
        where, unit = "the embeddings", "blocks"
    else:
        depths = [1 + max((int(m[2]) for m in map(_STAGED.fullmatch, every) if m and m[2] and int(m[1]) == 2 * s + 1),
                          default=-1) for s in range(4)]
        depth = sum(depths)
        layer = lambda name: _staged_layer(name, depths, family == "swin")  # noqa: E731
        where, unit = "the patch embedding" if family == "swin" else "the stem (as its first block)", "blocks"
        if kind == "group":
            if family != "convnext" or depths != GROUP_DEPTHS:
                raise ValueError(f"optim.layer_decay_type='group' numbers ConvNeXts with stages of {GROUP_DEPTHS} "
                                 f"blocks (V1 Small to XLarge, V2 Base to Huge); this trunk is a {family} of {depths}: "
                                 "set optim.layer_decay_type='single'")
            depth, layer, where, unit = 12, _convnext_group_layer, "the stem", "layers"
    first = decay ** (depth + 1 - min(layer(n) for n in every))
    return ({n: decay ** (depth + 1 - layer(n)) for n in names},
            f"layer_decay {decay:g} over {family}'s {depth} {unit}"
            f"{' (ConvNeXt V2 groups of 3 blocks)' if kind == 'group' else ''}: {where} x{first:.3g}, {unit[:-1]} k (from 1) "
            f"x{decay:g}^({depth + 1} - k), after the blocks x1 (times lr_mults)")


def _convnext_group_layer(name: str) -> int:
    m = _STAGED.fullmatch(name)
    if not m:
        return 13
    k = int(m[1])
    stage = (k - 1) // 2 if k % 2 else k // 2
    if k == 0 or stage in (0, 1):  # the stem 0; stage 0 and 1 with the downsampling before them
        return 0 if k == 0 else stage + 1
    if stage == 3:
        return 12
    return 3 + int(m[2]) // 3 if k % 2 else 3


def _vit_layer(name: str, depth: int) -> int:
    block = _VIT_BLOCK.fullmatch(name)
    return int(block[1]) + 1 if block else 0 if _VIT_EMBEDDING.fullmatch(name) else depth + 1


def _staged_layer(name: str, depths: list, swin: bool) -> int:
    m = _STAGED.fullmatch(name)
    if not m:
        return sum(depths) + 1
    k = int(m[1])
    if k == 0:
        return 0 if swin else 1
    stage = (k - 1) // 2 if k % 2 else k // 2
    before = sum(depths[:stage])
    if k % 2:
        return before + int(m[2]) + 1
    return before if swin else before + 1  # Swin: merging after stage - 1; ConvNeXt: downsampling before stage
