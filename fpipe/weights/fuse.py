"""Separate projections -> one packed tensor, as fpipe's (torchvision's) trunks store them.

Hugging Face transformers keeps a ViT's attention as three Linears (``attention.attention.query``
/ ``key`` / ``value`` in its files, ``q_proj`` / ``k_proj`` / ``v_proj`` in transformers 5's
state dicts) where torchvision packs them into ``in_proj_weight`` [3·D, D]; transformers 5's
DINOv2 SwiGLU splits dinov2's ``w12`` into ``gate_proj`` and ``up_proj``. ``pack`` replaces
each complete group by one tensor, concatenated along dim 0 in the group's order, under the
name ``<prefix>.{a,b,c}.<leaf>``, so reports still say which file tensors it came from; the
rename tables (``renames``) map these names like any other.

Swin V2 keeps a query and a value bias and no key bias (timm and the original repository:
``attn.q_bias``, ``attn.v_bias``; transformers: a ``key`` Linear without bias) where torchvision
packs one ``qkv.bias`` [3·C] whose key third is never used: ``pack`` writes
``<attn>.{q_bias,v_bias}`` and ``<prefix>.{query,key,value}.bias`` as [q, zeros, v].
"""
import torch

GROUPS = (("query", "key", "value"), ("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
LEAVES = ("weight", "bias")
QV_BIASES = ("q_bias", "v_bias")


def packed_name(prefix: str, group: tuple, leaf: str) -> str:
    return _join(prefix, f"{{{','.join(group)}}}", leaf)


def pack(files: dict) -> tuple:
    """``(files, packed)``: ``files`` ({name: tensor}) with each complete group packed, and the
    packed names. Groups whose parts differ in shape or dtype stay as they are."""
    out, packed_names = dict(files), []
    for name in files:
        prefix, part, leaf = _split(name)
        for group in GROUPS:
            if part != group[0] or leaf not in LEAVES:
                continue
            names = [_join(prefix, p, leaf) for p in group]
            parts = [files.get(n) for n in names]
            if _key_without_bias(files, prefix, group, leaf, parts):  # transformers' Swinv2
                parts[1] = torch.zeros_like(parts[0])
            if any(t is None for t in parts) or len({(tuple(t.shape), t.dtype) for t in parts}) != 1:
                continue
            packed = packed_name(prefix, group, leaf)
            out[packed] = torch.cat(parts, dim=0)
            packed_names.append(packed)
            for n in names:
                out.pop(n, None)
        if leaf == QV_BIASES[0]:
            _pack_query_value_biases(name, files, out, packed_names)
    return out, packed_names


def _key_without_bias(files: dict, prefix: str, group: tuple, leaf: str, parts: list) -> bool:
    """Query and value biases beside a key projection that has a weight and no bias."""
    return (len(group) == 3 and leaf == "bias" and parts[1] is None and parts[0] is not None
            and parts[2] is not None and _join(prefix, group[1], "weight") in files)


def _pack_query_value_biases(name: str, files: dict, out: dict, packed_names: list) -> None:
    """``<attn>.q_bias`` + ``<attn>.v_bias`` -> ``<attn>.{q_bias,v_bias}`` = [q, zeros, v]."""
    attn = name.rpartition(".")[0]
    q_name, v_name = (f"{attn}.{b}" if attn else b for b in QV_BIASES)
    q, v = files[q_name], files.get(v_name)
    if v is None or q.shape != v.shape or q.dtype != v.dtype or q.dim() != 1:
        return
    packed = f"{attn}.{{{','.join(QV_BIASES)}}}" if attn else f"{{{','.join(QV_BIASES)}}}"
    out[packed] = torch.cat([q, torch.zeros_like(q), v])
    packed_names.append(packed)
    del out[q_name], out[v_name]


def _join(prefix: str, part: str, leaf: str) -> str:
    return f"{prefix}.{part}.{leaf}" if prefix else f"{part}.{leaf}"


def _split(name: str) -> tuple:
    head, _, leaf = name.rpartition(".")
    prefix, _, part = head.rpartition(".")
    return prefix, part, leaf
