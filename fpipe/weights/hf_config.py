"""What a Hugging Face model folder's ``config.json`` says that its tensors cannot: a ViT's
activation and LayerNorm eps, a timm EfficientNet's padding and BatchNorm eps, checked against
the model's trunk before a run uses the weights.

Names and shapes find the trunk, but GELU and QuickGELU (OpenAI's CLIP), or eps 1e-12 (BERT's,
kept by transformers' ViT) and 1e-6, hold the same tensors: a wrong one gives other features
with no error. The folder's config says which it was (a CLIP model's under ``vision_config``;
open_clip's repos say ``quick_gelu`` in ``open_clip_config.json``).
"""
import json
import os
import re

from fpipe.weights import folders

MAX_CONFIG_BYTES = 1 << 20
# transformers' hidden_act -> the ViT trunk's mlp option
ACTIVATIONS = {"gelu": "gelu", "quick_gelu": "quick_gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
               "gelu_fast": "gelu_tanh"}


def read(path: str) -> dict:
    """transformers' settings of the folder's trunk: its ``config.json`` (the vision part of a
    two-tower model), or open_clip's ``open_clip_config.json`` (``quick_gelu``) put in those
    terms; ``{}`` when there is none or it is no JSON object (the weights still load; there is
    just nothing to check)."""
    if not folders.is_model_folder(path):
        return {}
    folder = folders.snapshot(path)
    found = _json(os.path.join(folder, "config.json"))
    if found:
        vision = found.get("vision_config")
        return vision if isinstance(vision, dict) else found
    model = _json(os.path.join(folder, "open_clip_config.json")).get("model_cfg")
    if isinstance(model, dict):
        return {"hidden_act": "quick_gelu" if model.get("quick_gelu") else "gelu"}
    return {}


def _json(path: str) -> dict:
    if not os.path.isfile(path) or os.path.getsize(path) > MAX_CONFIG_BYTES:
        return {}
    try:
        with open(path) as f:
            found = json.load(f)
    except (ValueError, OSError, UnicodeDecodeError):
        return {}
    return found if isinstance(found, dict) else {}


def mismatches(config: dict, spec) -> list:
    """``[(option, the folder's value, the model's value)]`` where a ViT ``spec`` computes otherwise
    than ``config`` says (``mlp`` from hidden_act or use_swiglu_ffn, ``ln_eps`` from layer_norm_eps),
    or an EfficientNet ``spec`` otherwise than timm builds the ``architecture`` it names."""
    out = []
    if hasattr(spec, "padding"):
        return _efficientnet_mismatches(config, spec)
    if not hasattr(spec, "mlp") or not hasattr(spec, "ln_eps"):
        return out
    act = "swiglu" if config.get("use_swiglu_ffn") else ACTIVATIONS.get(config.get("hidden_act"))
    if act and act != spec.mlp:
        out.append(("mlp", act, spec.mlp))
    eps = config.get("layer_norm_eps")
    if isinstance(eps, (int, float)) and not _close(float(eps), spec.ln_eps):
        out.append(("ln_eps", float(eps), spec.ln_eps))
    return out


def _efficientnet_mismatches(config: dict, spec) -> list:
    """timm's ``tf_efficientnet_b*`` (its config's ``architecture``) pad as TensorFlow does with
    BatchNorm eps 1e-3; its ``efficientnet_b*`` pad symmetrically with eps 1e-5 (torchvision's
    B5..B7, fpipe's presets of those names, use 1e-3); transformers' (``model_type``
    efficientnet) are Keras ports: TensorFlow's padding, its ``batch_norm_eps``."""
    architecture = config.get("architecture")
    m = re.fullmatch(r"(tf_)?efficientnet_b[0-7]", architecture) if isinstance(architecture, str) else None
    if config.get("model_type") == "efficientnet":
        eps = config.get("batch_norm_eps", 1e-3)
        padding, eps = "same", float(eps) if isinstance(eps, (int, float)) else 1e-3
    elif m:
        padding, eps = ("same", 1e-3) if m[1] else ("symmetric", 1e-5)
    else:
        return []
    return ([("padding", padding, spec.padding)] if padding != spec.padding else []) + (
        [("norm_eps", eps, spec.norm_eps)] if not _close(eps, spec.norm_eps) else [])


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-3 * max(abs(a), abs(b))
