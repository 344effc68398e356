"""What a Hugging Face model folder's ``config.json`` says that its tensors cannot: a ViT's
activation and LayerNorm eps, checked against the model's trunk before a run uses the weights.

Names and shapes find the trunk, but GELU and QuickGELU (OpenAI's CLIP), or eps 1e-12 (BERT's,
kept by transformers' ViT) and 1e-6, hold the same tensors: a wrong one gives other features
with no error. The folder's config says which it was (a CLIP model's under ``vision_config``).
"""
import json
import os

from fpipe.weights import folders

MAX_CONFIG_BYTES = 1 << 20
# transformers' hidden_act -> the ViT trunk's mlp option
ACTIVATIONS = {"gelu": "gelu", "quick_gelu": "quick_gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
               "gelu_fast": "gelu_tanh"}


def read(path: str) -> dict:
    """The folder's ``config.json`` (its vision part for a two-tower model), or ``{}``: no model
    folder, no config, or not a JSON object (the weights still load; there is just nothing to check)."""
    if not folders.is_model_folder(path):
        return {}
    config = os.path.join(folders.snapshot(path), "config.json")
    if not os.path.isfile(config) or os.path.getsize(config) > MAX_CONFIG_BYTES:
        return {}
    try:
        with open(config) as f:
            found = json.load(f)
    except (ValueError, OSError):
        return {}
    if not isinstance(found, dict):
        return {}
    vision = found.get("vision_config")
    return vision if isinstance(vision, dict) else found


def mismatches(config: dict, spec) -> list:
    """``[(option, the folder's value, the model's value)]`` where a ViT ``spec`` computes otherwise
    than ``config`` says (``mlp`` from hidden_act or use_swiglu_ffn, ``ln_eps`` from layer_norm_eps)."""
    out = []
    if not hasattr(spec, "mlp") or not hasattr(spec, "ln_eps"):
        return out
    act = "swiglu" if config.get("use_swiglu_ffn") else ACTIVATIONS.get(config.get("hidden_act"))
    if act and act != spec.mlp:
        out.append(("mlp", act, spec.mlp))
    eps = config.get("layer_norm_eps")
    if isinstance(eps, (int, float)) and not _close(float(eps), spec.ln_eps):
        out.append(("ln_eps", float(eps), spec.ln_eps))
    return out


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-3 * max(abs(a), abs(b))
