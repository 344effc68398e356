"""``model.weights.*``: the options of weight loading, their defaults, and their checks."""
import dataclasses

from fpipe import defaults
from fpipe.weights.errors import WeightsError

FORMATS = ("auto", "torchvision", "vissl", "fpipe")


@dataclasses.dataclass(frozen=True)
class Options:
    """The resolved ``model.weights`` options (their defaults and help: fpipe/defaults.py)."""
    path: str
    format: str
    state_dict_key: str
    skip_layers: tuple
    remove_prefix: str
    append_prefix: str
    rename: tuple
    select: str
    allow_partial: bool
    load_heads: bool
    stub_objects: bool


default_config = defaults.weights
_DEFAULTS = default_config().to_dict()


def resolve(cfg) -> Options:
    """Checks a ConfigDict / dict / None and fills in the defaults."""
    if isinstance(cfg, Options):
        return cfg
    raw = {} if cfg is None else cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    valid = [f.name for f in dataclasses.fields(Options)]
    unknown = sorted(set(raw) - set(valid))
    if unknown:
        raise WeightsError(f"unknown model.weights option(s) {unknown}; valid: {', '.join(valid)}.")
    if raw.get("format", "auto") not in FORMATS:
        raise WeightsError(f"model.weights.format={raw['format']!r}; valid: {', '.join(FORMATS)}.")
    skip = raw.get("skip_layers", _DEFAULTS["skip_layers"])
    raw["skip_layers"] = (skip,) if isinstance(skip, str) else tuple(skip or ())
    rules = []
    for rule in raw.get("rename", ()) or ():
        if isinstance(rule, str) or len(rule) != 2:
            raise WeightsError(f"model.weights.rename: each rule is (regex, replacement), got {rule!r}.")
        rules.append((str(rule[0]), str(rule[1])))
    raw["rename"] = tuple(rules)
    raw["path"] = str(raw.get("path") or "")
    return Options(**{**_DEFAULTS, **raw})
