"""What a load did: which tensors came from where, what was left out, and why."""
import dataclasses
from collections import Counter, defaultdict

SHOW = 5  # names shown per list in summaries and errors


@dataclasses.dataclass
class LoadReport:
    path: str = ""
    format: str = ""                 # the format used: torchvision, vissl, fpipe, or auto's finding
    source: str = ""                 # where the tensors were taken: state_dict_key + prefix
    state_dict_key: str = ""
    remove_prefix: str = ""
    reason: str = ""                 # why this source (detection, convention, or explicit config)
    candidates: list = dataclasses.field(default_factory=list)  # auto: each copy and its coverage
    loaded: list = dataclasses.field(default_factory=list)      # model names given file tensors
    sources: dict = dataclasses.field(default_factory=dict)     # model name -> file name
    missing: list = dataclasses.field(default_factory=list)     # model weights left at their init
    identity_kept: list = dataclasses.field(default_factory=list)  # of those, a final norm at identity (accepted)
    not_loaded: dict = dataclasses.field(default_factory=dict)  # file name -> why not
    shape_mismatches: list = dataclasses.field(default_factory=list)  # (model name, file, model shape)
    dtype_casts: list = dataclasses.field(default_factory=list)  # (model name, file dtype, model dtype)
    trunk_loaded: int = 0
    trunk_total: int = 0             # trunk weight tensors; num_batches_tracked is not a weight
    heads_loaded: list = dataclasses.field(default_factory=list)
    notes: list = dataclasses.field(default_factory=list)
    roots: list = dataclasses.field(default_factory=list)  # the model's first name parts (conv1, layer1, fc)

    @property
    def trunk_coverage(self) -> float:
        return self.trunk_loaded / self.trunk_total if self.trunk_total else 0.0

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["trunk_coverage"] = self.trunk_coverage
        d["shape_mismatches"] = [[n, list(a), list(b)] for n, a, b in self.shape_mismatches]
        d["dtype_casts"] = [list(c) for c in self.dtype_casts]
        return d

    def summary(self) -> str:
        if not self.path:
            return "weights: none (model.weights.path is empty): the model keeps its initialisation."
        lines = [f"weights: {self.path}",
                 f"  format: {self.format}; source: {self.source or '<whole file>'}",
                 f"  why: {self.reason}" if self.reason else None,
                 f"  trunk: {self.trunk_loaded}/{self.trunk_total} tensors loaded "
                 f"({self.trunk_coverage:.1%})" if self.trunk_total or not self.heads_loaded else None]
        if self.heads_loaded:
            lines.append(f"  heads: {len(self.heads_loaded)} tensors loaded ({short_names(self.heads_loaded)})")
        if len(self.candidates) > 1:
            lines.append("  candidates: " + "; ".join(self.candidates))
        if self.missing:
            lines.append(f"  MISSING (kept at init): {len(self.missing)}: {short_names(self.missing)}")
        for name, fs, ms in self.shape_mismatches[:SHOW]:
            lines.append(f"  SHAPE MISMATCH {name}: file {list(fs)} vs model {list(ms)}")
        if self.dtype_casts:
            pairs = Counter(f"{a}->{b}" for _, a, b in self.dtype_casts)
            lines.append("  dtype casts: " + ", ".join(f"{k} x{v}" for k, v in pairs.items()))
        if self.not_loaded:
            lines.append(f"  not loaded: {len(self.not_loaded)} file tensors")
            for why, names in _by_reason(self.not_loaded).items():
                lines.append(f"    {why}: {grouped(names, set(self.roots))}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(l for l in lines if l)


def short_names(names: list) -> str:
    if not names:
        return "none"
    more = f", … (+{len(names) - SHOW})" if len(names) > SHOW else ""
    return ", ".join(names[:SHOW]) + more


def _by_reason(not_loaded: dict) -> dict:
    out = defaultdict(list)
    for name, why in not_loaded.items():
        out[why].append(name)
    return out


def grouped(names: list, roots: set) -> str:
    """``module.encoder_k.* (320), module.queue``: names folded before the model's own name parts."""
    groups = defaultdict(list)
    for n in names:
        parts = n.split(".")
        cut = max(1, next((i for i, p in enumerate(parts) if p in roots), min(len(parts) - 1, 2)))
        groups[".".join(parts[:cut]) + ".*"].append(n)
    shown = [f"{g} ({len(v)})" if len(v) > 1 else v[0] for g, v in list(groups.items())[:8]]
    return ", ".join(shown) + (f", … ({len(groups) - 8} more groups)" if len(groups) > 8 else "")
