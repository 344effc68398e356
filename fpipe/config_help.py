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


def help_for(keys, sections=SECTIONS) -> dict:
    comments = {prefix: _comments(*where) for prefix, where in sections.items()}
    out = {}
    for key in keys:
        prefix = max((p for p in sections if key.startswith(p)), key=len)
        leaf = key[len(prefix):].split(".")[-1]
        out[key] = comments[prefix].get(leaf, "")
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
