"""``load_into``: file -> select -> rename -> skip -> merge into the model's tensors, with a report.

Each format makes a *plan*: ``{R: file name}`` (the name each file tensor takes, R, as in
docs/DESIGN.md) plus ``{file name: why dropped}``. The plan only moves names; the tensors follow.
"""
import dataclasses
import os

from fpipe import checkpoint
from fpipe.tree import flatten
from fpipe.weights import (config, detect, folders, fuse, infer, io, merge, minkowski, renames, resample, stages, stubs,
                           transforms, walk)
from fpipe.weights.errors import WeightsError
from fpipe.weights.report import LoadReport

VISSL_ROOT = "classy_state_dict"
VISSL_TRUNK = "base_model.model.trunk"
VISSL_HEADS = "base_model.model.heads"  # heads.<i>.*: the i-th head of the config's list
VISSL_PREFIXES = ("base_model._feature_blocks.", "_feature_blocks.")  # linear-eval, pretraining


@dataclasses.dataclass
class Plan:
    names: dict                       # R -> file name
    dropped: dict                     # file name -> why not loaded
    format: str
    state_dict_key: str = ""
    remove_prefix: str = ""
    reason: str = ""
    candidates: list = dataclasses.field(default_factory=list)


def load_into(target_flat: dict, cfg=None, *, obj=None) -> tuple:
    """``(new flat dict, LoadReport)``: ``target_flat`` with the file's tensors in place.

    ``target_flat``: the model's params and state by dotted name (``trunk.*``, ``heads.*``);
    ``cfg``: ``model.weights`` (ConfigDict or dict; see ``config.Options``); ``obj``: the
    file's contents when the caller has already read them (``read_checkpoint``).
    """
    opts = config.resolve(cfg)
    target = flatten(target_flat)
    if obj is None and not opts.path:
        return dict(target), LoadReport()
    if obj is None:
        obj = read_checkpoint(opts.path, stub_objects=opts.stub_objects)
    else:
        opts = dataclasses.replace(opts, path=opts.path or "<object given to load_into>")
        obj = _contents(obj, opts.path)
    files, packed, sparse, staged = file_tensors(obj)
    plan = make_plan(obj, files, target, opts)
    report = LoadReport(path=opts.path, format=plan.format, state_dict_key=plan.state_dict_key,
                        remove_prefix=plan.remove_prefix, reason=plan.reason,
                        candidates=plan.candidates, source=_source(plan),
                        roots=sorted({n.split(".")[1] for n in target if n.count(".") >= 2} | {"fc"}))
    report.not_loaded.update(plan.dropped)
    if os.path.isdir(opts.path):
        read = [os.path.relpath(f, opts.path) for f in folders.weight_files(opts.path)]
        more = f" and {len(read) - 4} more" if len(read) > 4 else ""
        report.notes.append(f"a model folder: read {', '.join(read[:4])}{more}")
    if packed:
        example = next((n for n in packed if n in plan.names.values()), packed[0])  # one that loads
        report.notes.append(f"{len(packed)} groups of separate projections packed into one tensor each, "
                            f"as the model stores them (e.g. {example})")
    if plan.format == "auto (timm_efficientnet names)":  # names cannot tell timm's own from Google's ports
        report.notes.append(TIMM_EFFICIENTNET_NOTE)
    if staged:
        report.notes.append(f"{staged} blocks numbered across stages (transformers' EfficientNet) numbered within "
                            "them, each stage found by its blocks' output width")
    if sparse:
        report.notes.append(f"{len(sparse)} MinkowskiEngine (sparse convolution) tensors put in dense layouts and "
                            f"names, as ConvNeXt V2's fine-tuning reads its FCMAE files (e.g. {sparse[0]})")
    replaced = stubs.stubbed(obj) if opts.stub_objects else {}
    if replaced:
        report.notes.append("objects replaced by inert stand-ins (stub_objects=True): " +
                            ", ".join(f"{n} (at {w})" for n, w in list(replaced.items())[:5]))
    tensors = {rel: files[src] for rel, src in plan.names.items()}
    tensors, notes = _adapt(tensors, target)
    report.notes.extend(notes)
    out = merge.merge(target, tensors, plan.names, report, load_heads=opts.load_heads)
    fix = None if plan.format.startswith("auto") and not plan.reason.startswith("explicit") else (
        lambda: detection_fix(obj, files, target))
    architecture = lambda: architecture_mismatch(tensors, target)
    merge.check_finite(report, out)
    merge.check(report, target, allow_partial=opts.allow_partial, load_heads=opts.load_heads, fix=fix,
                architecture=architecture)
    merge.check_leftovers(report, merge.trunk_leftovers(target, tensors, plan.names, report), target,
                          skip_layers=opts.skip_layers, allow_partial=opts.allow_partial, architecture=architecture)
    return out, report


TIMM_EFFICIENTNET_NOTE = (
    "timm's efficientnet_b* (symmetric padding, BatchNorm eps 1e-5) and tf_efficientnet_b* (Google's ports: "
    "TensorFlow's 'same' padding, eps 1e-3) name their tensors alike, and compute other features: the trunk must "
    "be the file's (model.trunk.name=tf_efficientnet_b0 … b7 for a tf_ file; torchvision's efficientnet_b5 … b7 "
    "presets use eps 1e-3, timm's own 1e-5: model.trunk.norm_eps=1e-5)")


def read_checkpoint(path: str, *, stub_objects: bool = False) -> dict:
    """The file's contents, which must be a dict holding at least one tensor.

    An fpipe checkpoint keeps its frozen params in a sibling file (``frozen_params``: written
    once per run); they are read back into ``params`` here, so the checkpoint loads whole.
    """
    obj = _contents(io.read(path, stub_objects=stub_objects), path)
    if checkpoint.is_checkpoint(obj):
        try:
            frozen = checkpoint.frozen_params_of(path, obj, io.read)
        except checkpoint.CorruptCheckpointError as e:
            raise WeightsError(str(e)) from None
        obj = {**obj, "params": {**frozen, **obj["params"]}} if frozen else obj
    if not transforms.tensor_leaves(obj):
        raise WeightsError(f"{path}: holds no tensors (top-level keys: {', '.join(map(str, list(obj)[:20]))}).")
    return obj


def file_tensors(obj: dict) -> tuple:
    """``({dotted name: tensor}, packed names, densified names, blocks renumbered)``: the file's
    tensors, with sparse convolutions in dense layouts (``minkowski.to_dense``), separate q/k/v
    (and gate/up) projections packed as fpipe's trunks store them (``fuse.pack``) and blocks
    numbered across stages numbered within them (``stages.number_by_stage``)."""
    files, densified = minkowski.to_dense(transforms.tensor_leaves(obj))
    files, packed = fuse.pack(files)
    files, staged = stages.number_by_stage(files)
    return files, packed, densified, staged


def _contents(obj, path: str) -> dict:
    """``obj`` as a dict whose structure can be walked (no cycles, bounded depth and size:
    ``walk``), lists and tuples holding state dicts keyed by position (``walk.positions_as_keys``)."""
    try:
        walk.check(obj)
    except WeightsError as e:
        raise WeightsError(f"{path}: refused: {e}") from None
    obj = walk.positions_as_keys(obj)
    if not isinstance(obj, dict):
        raise WeightsError(f"{path}: holds a {type(obj).__name__}, not a dict of named tensors.")
    return obj


def make_plan(obj: dict, files: dict, target: dict, opts: config.Options) -> Plan:
    if opts.format == "fpipe" or (opts.format == "auto" and is_fpipe_checkpoint(obj)):
        return _plan_fpipe(files, opts)
    explicit = opts.format in ("vissl", "torchvision") or opts.remove_prefix or opts.append_prefix
    if opts.select and explicit:  # the copy is the one those name: a select would be ignored
        named = ", ".join(f"{k}={v!r}" for k, v in (("format", opts.format), ("state_dict_key", opts.state_dict_key),
                                                     ("remove_prefix", opts.remove_prefix),
                                                     ("append_prefix", opts.append_prefix)) if v and v != "auto")
        raise WeightsError(f"model.weights.select={opts.select!r} chooses among the copies format: auto finds, but "
                           f"{named} already name what loads; drop select, or name that copy with state_dict_key "
                           f"(e.g. state_dict_key={opts.select!r}) or remove_prefix")
    if opts.format == "vissl":
        return _plan_vissl(files, opts, target)
    if explicit:
        return _plan_explicit(files, opts)
    return _plan_auto(obj, files, target, opts)


is_fpipe_checkpoint = checkpoint.is_checkpoint


def _plan_fpipe(files: dict, opts) -> Plan:
    """params and model_state by model name; with ``select='ema'`` the average of the trained
    weights that a run with ``config.ema`` saved (``ema.params``, ``ema.model_state``), and its
    frozen params from ``params``. Without it the live weights load; the reason names the other."""
    averaged = any(src.startswith("ema.") for src in files)
    if opts.select not in ("", "ema") or (opts.select == "ema" and not averaged):
        held = "its weights and their average (select='ema')" if averaged else "one copy of its weights"
        raise WeightsError(f"model.weights.select={opts.select!r}: an fpipe checkpoint holds {held}; "
                           f"valid: {['', 'ema'] if averaged else ['']}")
    parts = ("ema.params", "ema.model_state") if opts.select == "ema" else ()
    names, dropped = {}, {}
    for part in parts + ("params", "model_state"):  # the first part holding a name gives it
        for src in files:
            group, _, rel = src[len(part) + 1:].partition(".") if src.startswith(part + ".") else ("", "", "")
            if group in ("trunk", "heads") and rel:
                names.setdefault(rel, src)
    taken = set(names.values())
    for src in files:
        if src not in taken:
            dropped[src] = ("the average of the trained weights: select='ema' takes it"
                            if src.startswith("ema.") and not parts else
                            "the live copy of a weight whose average is taken (select='ema')"
                            if parts and src.startswith(("params.", "model_state.")) else
                            "not a params/model_state entry of trunk.* or heads.*")
    names = _finish(names, opts, dropped)
    reason = "fpipe checkpoint: params and model_state by model name"
    if parts:
        reason = "fpipe checkpoint: the average of its trained weights (ema.*, select='ema'), frozen params from params"
    elif averaged:
        reason += "; it also holds their average (config.ema), which select='ema' takes"
    return Plan(names, dropped, "fpipe", reason=reason)


def _plan_explicit(files: dict, opts, *, fmt: str = "", reason: str = "") -> Plan:
    names = {n: n for n in files}
    dropped = {}
    if opts.state_dict_key:
        kept = transforms.select(names, opts.state_dict_key)
        dropped.update({n: f"outside state_dict_key {opts.state_dict_key!r}" for n in set(names) - set(kept.values())})
        names = kept
    names = transforms.remove_prefix(names, opts.remove_prefix)
    names = _finish(names, opts, dropped)
    fmt = fmt or (opts.format if opts.format != "auto" else "auto (explicit prefix)")
    return Plan(names, dropped, fmt, opts.state_dict_key, opts.remove_prefix,
                reason=reason or "explicit config (state_dict_key / remove_prefix), no detection")


def _plan_vissl(files: dict, opts, target: dict) -> Plan:
    root = opts.state_dict_key or VISSL_ROOT
    trunk_key = f"{root}.{VISSL_TRUNK}"
    key = trunk_key if any(n.startswith(trunk_key + ".") for n in files) else root
    prefix = opts.remove_prefix
    if not prefix:
        under = [n[len(key) + 1:] for n in files if n.startswith(key + ".")]
        prefix = next((p for p in VISSL_PREFIXES if under and all(n.startswith(p) for n in under)), "")
    vissl = dataclasses.replace(opts, state_dict_key=key, remove_prefix=prefix)
    plan = _plan_explicit(files, vissl, fmt="vissl",
                          reason=f"VISSL layout: trunk under {key!r}, prefix {prefix!r} removed")
    if opts.load_heads and key == trunk_key:
        heads = _vissl_heads(files, f"{root}.{VISSL_HEADS}", target, opts)
        for src in heads.values():
            plan.dropped.pop(src, None)
        plan.names.update(_finish(heads, dataclasses.replace(opts, append_prefix="", rename=()), plan.dropped))
        if heads:
            plan.reason += f"; VISSL heads {root}.{VISSL_HEADS}.<i> -> the model's i-th head"
    return plan


def _vissl_heads(files: dict, key: str, target: dict, opts) -> dict:
    """``{R: file name}`` of VISSL's numbered heads: ``<key>.<i>.rest`` -> ``<i-th head's name>.rest``.

    VISSL numbers its heads in the config's order (MULTI_INPUT_HEAD_MAPPING, then HEAD.PARAMS);
    fpipe's heads keep the config's order too, so a translated config lines them up one to one."""
    names = list(dict.fromkeys(n.split(".")[1] for n in target if n.startswith("heads.")))
    found = {}
    for src in files:
        if not src.startswith(key + "."):
            continue
        index, _, rest = src[len(key) + 1:].partition(".")
        if not index.isdigit():
            continue
        if int(index) >= len(names):
            raise WeightsError(f"{opts.path}: VISSL head {index} ({src}) has no counterpart: the model has "
                               f"{len(names)} head(s) {names}; list the heads in VISSL's order.")
        found[f"heads.{names[int(index)]}.{rest}"] = src
    return found


def _plan_auto(obj: dict, files: dict, target: dict, opts) -> Plan:
    names = {n: n for n in files}
    dropped = {}
    if opts.state_dict_key:
        names = transforms.select(names, opts.state_dict_key)
        dropped.update({n: f"outside state_dict_key {opts.state_dict_key!r}" for n in set(files) - set(names.values())})
    shapes = trunk_shapes(target)
    names, table, cands = _best_names(names, files, shapes)
    scope = {rel: files[src] for rel, src in names.items()}
    where = f"{opts.path}" + (f" under {opts.state_dict_key!r}" if opts.state_dict_key else "")
    try:
        chosen, reason = detect.choose(cands, scope, select=opts.select, where=where,
                                       model_names=[n for n in shapes if not detect.is_bookkeeping(n)][:2])
    except WeightsError as e:  # none found, or none of this shape: is it another architecture?
        found = architecture_mismatch(scope, target) if not cands or cands[0].coverage == 0 else None
        if found:
            raise WeightsError(f"{e} Another architecture: {found[0]}: set {found[1]}.") from None
        raise
    if table:
        reason += f"; names mapped by the rename table renames.{table.upper()}"
    prefix = chosen.prefix
    copies = set(chosen.aliases)
    kept = {}
    for rel, src in names.items():
        if rel.startswith(prefix):
            kept[rel[len(prefix):]] = src
        else:
            other = next((a for a in copies if rel.startswith(a)), None)
            dropped[src] = f"identical copy at {other!r}" if other is not None else f"outside the chosen copy {prefix!r}"
    if opts.load_heads:  # a classifier beside the trunk's prefix (Hugging Face's *ForImageClassification)
        beside = {rel: src for rel, src in names.items() if not rel.startswith(prefix) and rel not in kept
                  and _is_head(rel, target)}
        kept.update(beside)
        for src in beside.values():
            del dropped[src]
    kept = _finish(kept, opts, dropped)
    src_prefix = _source_prefix(names, chosen) if table else prefix
    full = (opts.state_dict_key + "." if opts.state_dict_key else "") + src_prefix
    key, rest = detect.split_prefix(full, transforms.dict_paths(obj))
    return Plan(kept, dropped, "auto" + (f" ({table} names)" if table else ""), key, rest, reason=reason,
                candidates=[c.describe() for c in cands if c.coverage > 0])


def _is_head(rel: str, target: dict) -> bool:
    return f"heads.{rel}" in target or (rel.startswith("heads.") and rel in target)


def _best_names(names: dict, files: dict, shapes: dict) -> tuple:
    """``(names, table, candidates)``: the file's own names, or a rename table's when those
    cover more of the trunk (timm ViT names, detectron2 ResNet names)."""
    cands = detect.find_trunks({rel: files[src] for rel, src in names.items()}, shapes)
    best = cands[0].coverage if cands else 0.0
    table_used, own = "", names
    for table_name, table in ([] if best == 1 else renames.TABLES.items()):
        mapped = renames.rename_all(own, table)  # each table on the file's own names
        if mapped is None:
            continue
        renamed = {new: own[old] for new, old in mapped.items()}
        found = detect.find_trunks({rel: files[src] for rel, src in renamed.items()}, shapes)
        if found and found[0].coverage > best:
            names, cands, best, table_used = renamed, found, found[0].coverage, table_name
    return names, table_used, cands


def _source_prefix(names: dict, chosen) -> str:
    """The file's own prefix in front of a renamed trunk: its names' common leading parts."""
    sources = [names[n] for n in chosen.matched.values()]
    common = os.path.commonprefix(sources)
    return common[:common.rfind(".") + 1]


def _finish(names: dict, opts, dropped: dict) -> dict:
    """append_prefix, rename, then skip (on the final names); skipped ones go to ``dropped``."""
    names = transforms.append_prefix(names, opts.append_prefix)
    names = transforms.rename(names, opts.rename)
    names, skipped = transforms.skip(names, opts.skip_layers)
    dropped.update({src: "skip_layers" for src in skipped.values()})
    return names


def _adapt(tensors: dict, target: dict) -> tuple:
    """Resamples position embeddings of another grid to the model's (``resample.adapt``)."""
    shapes = {rel: tuple(target[f"trunk.{rel}"].shape) for rel in tensors if f"trunk.{rel}" in target}
    return resample.adapt(tensors, shapes)


def trunk_shapes(target: dict) -> dict:
    shapes = {n[len("trunk."):]: tuple(t.shape) for n, t in target.items() if n.startswith("trunk.")}
    if not shapes:
        raise WeightsError("the model has no trunk.* tensors to load weights into.")
    return shapes


def detection_fix(obj: dict, files: dict, target: dict) -> str:
    """What ``format: auto`` would have set, for errors on explicit settings."""
    try:
        names, table, cands = _best_names({n: n for n in files}, files, trunk_shapes(target))
        chosen, _ = detect.choose(cands, {rel: files[src] for rel, src in names.items()})
    except WeightsError as e:
        return f"format='auto' could not decide either: {str(e).splitlines()[0]}"
    if table:
        return f"use format='auto': it maps this file's names by renames.{table.upper()}"
    return detect.advice(chosen.prefix, transforms.dict_paths(obj)) + " (what format='auto' finds)"


def architecture_mismatch(tensors: dict, target: dict):
    """``(what differs, the model.trunk setting that fits the file)`` when the file holds another
    trunk than the model's: ResNets of other depths or widths, or any registry preset the file
    holds whole (``infer``); else ``None``."""
    trunk = {n: t for n, t in target.items() if n.startswith("trunk.")}
    model, found = infer.resnet_of(trunk), infer.resnet_of(tensors)
    label = lambda s: " ".join([s["name"], *(f"{k}={v}" for k, v in s.items() if k != "name")])  # noqa: E731
    setting = lambda s: ", ".join(f"model.trunk.{k}={v}" for k, v in s.items())  # noqa: E731
    if model and found:
        if model[0] == found[0]:
            return None
        return f"the file holds {label(found[0])} (inferred: {found[1]}); the model is {label(model[0])}", setting(found[0])
    found = infer.registry_trunk_of(tensors)
    if not found or _same_shapes(infer.target_of(found[0]), trunk):
        return None
    model_is = f"the model is {label(model[0])}" if model else "the model's trunk is another"
    return f"the file holds {label(found[0])} (inferred: {found[1]}); {model_is}", setting(found[0])


def _same_shapes(a: dict, b: dict) -> bool:
    return {n: tuple(t.shape) for n, t in a.items()} == {n: tuple(t.shape) for n, t in b.items()}


def _source(plan: Plan) -> str:
    parts = []
    if plan.state_dict_key:
        parts.append(f"state_dict_key={plan.state_dict_key!r}")
    if plan.remove_prefix:
        parts.append(f"remove_prefix={plan.remove_prefix!r}")
    return ", ".join(parts)
