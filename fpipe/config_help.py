"""``main.py --config_only``: every key of a config with its value and its help, without running.

The help of a key is the ``# comment`` on the line that sets its default, in the function that
owns that section's defaults (SECTIONS, all in fpipe/defaults.py but the top level), so the
documentation lives in one place: next to the value.
Imports no torch.
"""
import os
import re

from fpipe import tree

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# section prefix -> (the file setting its defaults, relative to the repository root; its function)
SECTIONS = {"": ("configs/common.py", None), "data.": ("fpipe/defaults.py", "data"),
            "optim.": ("fpipe/defaults.py", "optim"), "schedule.": ("fpipe/defaults.py", "schedule"),
            "precision.": ("fpipe/defaults.py", "precision"), "model.weights.": ("fpipe/defaults.py", "weights"),
            "model.trunk.": ("fpipe/defaults.py", "trunk"), "eval.": ("fpipe/defaults.py", "evaluation"),
            "model.head_weights.": ("fpipe/defaults.py", "head_weights"), "mix.": ("fpipe/defaults.py", "mix"),
            "ema.": ("fpipe/defaults.py", "ema")}
# A detection config (model.detection): its own top level, data section and the model's options.
DETECTION_SECTIONS = {**SECTIONS, "": ("configs/detection.py", "get_config"),
                      "data.": ("fpipe/defaults.py", "detection_data"),
                      "model.detection.": ("fpipe/detection/model.py", "default_config")}
_SETTING = re.compile(r"""^\s*(?:c(?:\.\w+)*\.)?(\w+)\s*[:=][^#]*#\s*(.+)$|^\s*(\w+)\s*=[^#]*#\s*(.+)$""")


def _comments(path: str, function=None) -> dict:
    """``{key: comment}`` of the lines ``c.key = value  # comment`` / ``key=value,  # comment``
    (within ``def function(`` when given)."""
    out = {}
    try:
        with open(os.path.join(ROOT, path)) as f:
            lines = f.readlines()
    except OSError:
        return out
    if function:
        start = next((i for i, l in enumerate(lines) if l.startswith(f"def {function}(")), len(lines))
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("def ")), len(lines))
        lines = lines[start:end]
    for line in lines:
        m = _SETTING.match(line)
        if m:
            key, text = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
            out.setdefault(key, text.strip())
    return out


TRUNK_OPTION = "a trunk option; null: the preset's or family's value (docs/MODELS.md lists each family's)"
# model.heads.<name>.<key>: heads are built by defaults.head(), whose keys carry no comment of their own
HEAD_OPTION = {
    "feature": "the trunk feature it reads (docs/MODELS.md lists each family's)",
    "type": "linear | mlp | eval_mlp (VISSL's: BatchNorm, then linear)",
    "pool": "(h, w): the feature pooled to this grid first; null: as it is",
    "pool_type": "avg | max",
    "dims": "its layers' output sizes; null: the target's size (the class count)",
    "chain": "layers one after the other, each a dict of these keys",
    "vissl_dims": "dims list the input size first, as VISSL's configs do",
    "towers": "each image's that many crops side by side (VISSL's siamese_concat_view)",
    "crops": "(first, count): the crops it reads; empty: all",
    "target": "label, or a dataset's extra target",
    "loss": "cross_entropy | bce | mse",
    "loss_weight": "its weight in the summed loss",
    "use_bn": "mlp: BatchNorm after each hidden layer", "use_relu": "mlp: ReLU after each hidden layer",
    "use_dropout": "mlp: dropout after each hidden layer", "dropout": "its rate",
    "use_bias": "linear layers with a bias", "skip_last_layer_relu_bn": "no ReLU/BatchNorm after the last layer",
    "init_std": "linear weights from N(0, init_std**2), biases 0 (the probes' init); null: torch's default",
    "bn_affine": "its BatchNorms learn a scale and shift", "bn_eps": "its BatchNorms' eps",
}


def help_for(keys, sections=SECTIONS) -> dict:
    comments = {prefix: _comments(*where) for prefix, where in sections.items()}
    out = {}
    for key in keys:
        prefix = max((p for p in sections if key.startswith(p)), key=len)
        leaf = key[len(prefix):].split(".")[-1]
        found = comments[prefix].get(leaf, "")
        if not found and prefix == "model.trunk.":
            found = TRUNK_OPTION
        elif not found and key.startswith("model.heads."):
            found = HEAD_OPTION.get(leaf, "")
        out[key] = found
    return out


def describe(config, path: str = "") -> str:
    """One line per key: ``key = value   # help``, in the config's order."""
    import json
    flat = tree.flatten(json.loads(config.to_json_best_effort()))
    detection = any(k.startswith("model.detection.") for k in flat)
    helps = help_for(flat, DETECTION_SECTIONS if detection else SECTIONS)
    width = max((len(f"{k} = {json.dumps(v)}") for k, v in flat.items()), default=0)
    lines = [f"# {path}: {len(flat)} keys; override any with --config.KEY=VALUE"] if path else []
    for key, value in flat.items():
        text = f"{key} = {json.dumps(value)}"
        lines.append(f"{text:<{min(width, 60)}}  # {helps[key]}" if helps[key] else text)
    return "\n".join(lines)
