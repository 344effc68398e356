"""``model.head_weights``: a released linear head (DINO's ``*_linearweights.pth``, dinov2's
``*_linear_head.pth``) loaded into the model's heads, beside the trunk's file.

A file tensor goes to ``heads.<head>.<param>`` when its name ends in ``<head>.<param>`` (DINO's
``state_dict.module.linear.weight`` into a head named ``linear``), or, for a model with one
head, in ``<param>`` (dinov2's bare ``weight``/``bias``). Every head tensor must get exactly one
file tensor of its shape; anything else in the file (optimizer state, epochs) is listed as not
loaded. Nothing is left at its init without an error: a head that stays random would report a
random classifier's accuracy as the released one's. ``heads`` names the heads the file is for
when others should keep their init and train (the released head evaluated beside a new one);
each named head is then held to the same rule.
"""
from fpipe import tree
from fpipe.weights import detect, load, merge, transforms
from fpipe.weights.errors import WeightsError
from fpipe.weights.report import LoadReport, short_names


def load_heads(target_flat: dict, cfg) -> tuple:
    """``(new flat dict, LoadReport)``: ``target_flat`` (``trunk.*``, ``heads.*``) with the head
    tensors of the file ``cfg.path`` (``model.head_weights``) in place."""
    path, key, rules = cfg["path"], cfg.get("state_dict_key", ""), tuple(cfg.get("rename", ()) or ())
    target = tree.flatten(target_flat)
    heads = {n[len("heads."):] for n in target if n.startswith("heads.") and not n.endswith(detect.COUNTERS)}
    if not heads:
        raise WeightsError(f"model.head_weights.path={path!r} but the model has no heads to load it into; "
                           "add a head (model.heads) reading the feature the released head was trained on.")
    heads, kept = _chosen(heads, tuple(cfg.get("heads", ()) or ()))
    files = load.file_tensors(load.read_checkpoint(path))[0]
    names = transforms.rename(transforms.select({n: n for n in files}, key), rules)
    only = {n.split(".")[0] for n in heads}
    mapped, report = {}, LoadReport(path=path, format="head weights", state_dict_key=key)
    for rel, src in names.items():
        dest = _destination(rel, heads, next(iter(only)) if len(only) == 1 else None)
        if dest is None:
            report.not_loaded[src] = ("not for the heads named in model.head_weights.heads" if kept else
                                      "no head of the model ends its name")
        elif dest in mapped:
            raise WeightsError(f"{path}: {mapped[dest]!r} and {src!r} both fit heads.{dest}; set "
                               "model.head_weights.state_dict_key or rename to keep one.")
        else:
            mapped[dest] = src
    missing = sorted(heads - set(mapped))
    if missing:
        raise WeightsError(f"{path}: no tensor for heads.{', heads.'.join(missing[:4])}; the file's names: "
                           f"{short_names(list(names))}. Name the model's head as the file does (DINO's "
                           "'linear'), or map the names with model.head_weights.rename.")
    wrong = [f"heads.{d} {list(target['heads.' + d].shape)} <- {s} {list(files[s].shape)}"
             for d, s in mapped.items() if files[s].shape != target["heads." + d].shape]
    if wrong:
        raise WeightsError(f"{path}: head shapes differ: {'; '.join(wrong[:4])}. Does each head read the "
                           "feature, and have the classes, that the released head was trained on?")
    out = dict(target)
    for dest, src in mapped.items():
        out["heads." + dest] = merge.like(files[src], target["heads." + dest])
        report.loaded.append("heads." + dest)
        report.sources["heads." + dest] = src
    report.heads_loaded = sorted(report.loaded)
    report.notes += [f"heads.{h}: kept at its init (not in model.head_weights.heads)" for h in kept]
    merge.check_finite(report, out)
    return out, report


def _chosen(heads: set, names: tuple) -> tuple:
    """``(head tensors to load, heads kept at their init)`` for ``model.head_weights.heads``
    (``names``; empty: every head)."""
    every = {h.split(".")[0] for h in heads}
    unknown = sorted(set(names) - every)
    if unknown:
        raise WeightsError(f"model.head_weights.heads names {unknown}, not heads of the model; valid: {sorted(every)}")
    if not names:
        return heads, []
    return {h for h in heads if h.split(".")[0] in names}, sorted(every - set(names))


def _destination(rel: str, heads: set, only):
    """The head tensor (``<head>.<param>``) whose name the file name ``rel`` ends in (the longest
    such ending); with one head (``only``), the one whose param name it ends in; else None."""
    parts = rel.split(".")
    tails = [".".join(parts[i:]) for i in range(len(parts))]  # longest first
    found = next((t for t in tails if t in heads), None)
    if found is None and only is not None:
        found = next((f"{only}.{t}" for t in tails if f"{only}.{t}" in heads), None)
    return found
