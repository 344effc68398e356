"""``model.weights.*``: the options of weight loading, their defaults, and their checks."""
import dataclasses

import ml_collections

from fpipe.weights.errors import WeightsError

FORMATS = ("auto", "torchvision", "vissl", "fpipe")


@dataclasses.dataclass(frozen=True)
class Options:
    path: str = ""
    format: str = "auto"            # auto | torchvision (plain names) | vissl | fpipe
    state_dict_key: str = ""        # dotted path of the sub-dict holding the weights
    skip_layers: tuple = ("num_batches_tracked",)  # substrings or regexes of names to drop
    remove_prefix: str = ""
    append_prefix: str = ""
    rename: tuple = ()              # ((regex, replacement), ...): first match wins
    select: str = ""                # which copy among several: 'teacher', 'module.encoder_k.', ...
    allow_partial: bool = False     # accept a trunk not fully covered, or shape mismatches
    load_heads: bool = False        # also load heads.<name>.* from the file
    stub_objects: bool = False      # read files holding other libraries' objects (inert stand-ins)


def default_config() -> ml_collections.ConfigDict:
    """The defaults as a ConfigDict, for ``config.model.weights = weights.default_config()``."""
    return ml_collections.ConfigDict(dataclasses.asdict(Options()))  # tuples: overridable by flags


def resolve(cfg) -> Options:
    """Checks a ConfigDict / dict / None and fills in the defaults."""
    if cfg is None:
        return Options()
    if isinstance(cfg, Options):
        return cfg
    raw = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    valid = [f.name for f in dataclasses.fields(Options)]
    unknown = sorted(set(raw) - set(valid))
    if unknown:
        raise WeightsError(f"unknown model.weights option(s) {unknown}; valid: {', '.join(valid)}.")
    if raw.get("format", "auto") not in FORMATS:
        raise WeightsError(f"model.weights.format={raw['format']!r}; valid: {', '.join(FORMATS)}.")
    skip = raw.get("skip_layers", Options.skip_layers)
    raw["skip_layers"] = (skip,) if isinstance(skip, str) else tuple(skip or ())
    rules = []
    for rule in raw.get("rename", ()) or ():
        if isinstance(rule, str) or len(rule) != 2:
            raise WeightsError(f"model.weights.rename: each rule is (regex, replacement), got {rule!r}.")
        rules.append((str(rule[0]), str(rule[1])))
    raw["rename"] = tuple(rules)
    raw["path"] = str(raw.get("path") or "")
    return Options(**raw)
