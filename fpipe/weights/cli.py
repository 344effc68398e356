"""``python -m fpipe.weights inspect|convert|export``: look into weight files and rewrite them.

    inspect FILE                 outline, trunk candidates, the copy chosen and why, what is left
    convert FILE OUT             plain torchvision names (``OUT.safetensors`` or ``OUT.pth``)
    export WORKDIR|CKPT OUT      an fpipe checkpoint's trunk (and ``fc`` head) as torchvision names

Errors are one line naming the file, with a non-zero exit (``--traceback`` shows the rest).
"""
import argparse
import os
import sys

# Nothing heavy (torch, the models) is imported before the arguments are parsed: ``-h`` is instant.


def registry() -> dict:
    """``{trunk name: (family, options)}``: every family of the model registry and its presets."""
    from fpipe.models import model
    names = {}
    for family, module in model.TRUNKS.items():
        names[family] = (family, {})
        for preset, options in getattr(module, "PRESETS", {}).items():
            names[preset] = (family, dict(options))
    return names


def meta_target(name: str, **options) -> dict:
    """``{trunk.<name>: tensor}`` of a registry trunk, built on the meta device: shapes, no memory."""
    from fpipe.models import model
    from fpipe.models.trunk import init_on_meta
    from fpipe.tree import flatten
    try:
        trunk = model.build_trunk(name, **options)
    except ValueError as e:
        from fpipe.weights.errors import WeightsError
        raise WeightsError(f"--trunk {name} {_shown(options)}: {e}") from None
    params, state = init_on_meta(trunk)
    return {f"trunk.{n}": t for n, t in torchvision_order(flatten(params), flatten(state)).items()}


def _shown(options: dict) -> str:
    return " ".join(f"--{k.replace('_', '-')} {v}" for k, v in options.items())


def registry_target(args, files: dict) -> tuple:
    """``(target, description)``: the trunk named by --trunk and the ResNet options, or else the
    one the file holds (``infer.infer_trunk``)."""
    from fpipe.weights.errors import WeightsError
    resnet_options = {k: getattr(args, k) for k in ("depth", "width_multiplier", "groups", "width_per_group")
                      if getattr(args, k) is not None}
    if args.trunk in (None, "resnet") and not resnet_options:  # --trunk resnet alone: its depth is read too
        from fpipe.weights import infer
        presets = {name: (family, options, lambda name=name: infer.preset_target(name))  # built once per process
                   for name, (family, options) in registry().items() if family != "resnet" and name != family}
        try:
            name, options, why = infer.infer_trunk(files, presets if args.trunk is None else {})
            options, why = _with_folder_config(args.file, name, options, why)
            return meta_target(name, **options), f"{name} {_shown(options)} (inferred: {why})".replace("  ", " ")
        except WeightsError:
            if args.trunk is None:
                raise  # else: --trunk resnet with its default options
    name = args.trunk or "resnet"
    names = registry()
    if name not in names:
        raise WeightsError(f"--trunk {name!r}: unknown; valid: {', '.join(sorted(names))}.")
    return meta_target(name, **resnet_options), f"{name} {_shown(resnet_options)}".strip()


def _with_folder_config(path: str, name: str, options: dict, why: str) -> tuple:
    """``(options, why)`` with what a model folder's config.json says that tensors cannot
    (``hf_config``: a ViT's activation, LayerNorm eps) where it differs from the inferred trunk's."""
    from fpipe.models import model
    from fpipe.weights import hf_config
    wrong = hf_config.mismatches(hf_config.read(path), model.build_trunk(name, **options).spec)
    if not wrong:
        return options, why
    said = ", ".join(f"{key} {theirs}" for key, theirs, _ in wrong)
    return {**options, **{key: theirs for key, theirs, _ in wrong}}, f"{why}; {said} from its config.json"


def torchvision_order(params: dict, state: dict) -> dict:
    """params | state in ``state_dict()`` order: module by module, its params then its buffers."""
    modules = dict.fromkeys(n.rsplit(".", 1)[0] for n in list(params) + list(state))
    out = {}
    for m in modules:
        for tree in (params, state):
            out.update({n: t for n, t in tree.items() if n.rsplit(".", 1)[0] == m})
    return out


def main(argv=None, *, build_target=registry_target) -> int:
    args = _parser().parse_args(argv)
    from fpipe.weights.errors import WeightsError
    try:
        args.run(args, build_target)
    except (WeightsError, OSError) as e:
        if args.traceback:
            raise
        print(f"error: {str(e).splitlines()[0] if args.command != 'inspect' else e}", file=sys.stderr)
        return 1
    return 0


def inspect(args, build_target) -> None:
    from fpipe.weights import detect, load, transforms
    obj = load.read_checkpoint(args.file, stub_objects=args.stub_objects)
    stored = transforms.tensor_leaves(obj)
    print(f"{args.file}: {len(stored)} tensors, {_mb(stored.values())}")
    files = load.file_tensors(obj)[0]
    target, trunk = build_target(args, files)
    print(outline(obj, roots={n.split(".")[1] for n in target} | {"fc"}))
    cands = detect.find_trunks(files, load.trunk_shapes(target))
    print(f"\ntrunk: {trunk}; candidates by plain names:")
    for c in cands:
        print(f"  {c.describe()}")
    if not cands:
        print("  none (format auto also tries the rename tables of fpipe/weights/renames.py)")
    print()
    _, report = load.load_into(target, _weights_cfg(args), obj=obj)
    print(report.summary())


def convert(args, build_target) -> None:
    from fpipe.weights import io, load
    _check_out(args.out, args.file)
    obj = load.read_checkpoint(args.file, stub_objects=args.stub_objects)
    target, trunk = build_target(args, load.file_tensors(obj)[0])
    if args.heads:
        target.update(_fc_target(args, obj, target))
    cfg = {**_weights_cfg(args), "load_heads": args.heads, "skip_layers": []}  # keep the counters
    out, report = load.load_into(target, cfg, obj=obj)
    out = {n: _written_at_init(n, t, report) if t.is_meta else t for n, t in out.items()}
    plain = {n.split(".", 1)[1]: t for n, t in out.items()}
    io.write(plain, args.out)
    print(f"{args.out}: {len(plain)} tensors with torchvision names for {trunk} "
          f"(trunk {report.trunk_loaded}/{report.trunk_total} from {report.source or args.file})")


def _written_at_init(name: str, t, report):
    """A tensor the file did not give, as a fresh model holds it: a final norm the file lacks
    (FCMAE) at its identity, a BatchNorm step counter at 0."""
    import torch
    from fpipe.weights import detect
    if name in report.identity_kept:
        return torch.full(t.shape, 1.0 if name.endswith(".weight") else 0.0, dtype=t.dtype)
    if detect.is_bookkeeping(name):
        return torch.zeros(t.shape, dtype=t.dtype)
    raise AssertionError(f"{name}: neither loaded nor kept at a known init")  # load_into refused those


def export(args, build_target) -> None:
    from fpipe.tree import flatten
    from fpipe.weights import io, load
    from fpipe.weights.errors import WeightsError
    path = _checkpoint_in(args.file)
    _check_out(args.out, path)
    obj = load.read_checkpoint(path)
    if not load.is_fpipe_checkpoint(obj):
        raise WeightsError(f"{path}: not an fpipe checkpoint (needs 'params' and 'model_state' dicts).")
    flat = flatten(obj["params"]) | flatten(obj["model_state"])
    averaged = isinstance(obj.get("ema"), dict)
    if args.ema and not averaged:
        raise WeightsError(f"{path}: --ema, but the checkpoint holds no average of its weights (its run had "
                           "ema.decay=0); export it without --ema.")
    if args.ema:  # the average of what trained (config.ema); frozen params are their own average
        flat |= flatten(obj["ema"].get("params") or {}) | flatten(obj["ema"].get("model_state") or {})
    plain = {n[len("trunk."):]: t for n, t in flat.items() if n.startswith("trunk.")}
    plain |= {n[len("heads."):]: t for n, t in flat.items() if n.startswith("heads.fc.")}
    if not plain:
        raise WeightsError(f"{path}: the checkpoint has no trunk.* tensors.")
    io.write(plain, args.out)
    copy = (" (the average of its trained weights)" if args.ema else
            " (its live weights; --ema exports their average, which it also holds)" if averaged else "")
    print(f"{args.out}: {len(plain)} tensors with torchvision names from {path}{copy}")


def _check_out(out: str, source: str) -> None:
    """Refuses an output that is a directory, lies in none, or is the file read (a link to it too)."""
    from fpipe.weights.errors import WeightsError
    if os.path.exists(out) and os.path.isfile(source) and os.path.samefile(out, source):
        raise WeightsError(f"{out} is the file being read ({source}): write the output elsewhere, so that the "
                           "input is kept.")
    folder = os.path.dirname(os.path.abspath(out))
    if os.path.isdir(out):
        raise WeightsError(f"{out} is a directory: give the output file's name, e.g. {os.path.join(out, 'trunk.safetensors')}")
    if not os.path.isdir(folder):
        raise WeightsError(f"{out}: the directory {folder} does not exist; create it or write elsewhere.")


def outline(obj: dict, depth: int = 3, roots: set = frozenset()) -> str:
    """One line per nested dict (tensors, size, name groups), and the non-tensor entries' types.

    Each dict is read once and at most ``depth`` levels and a few entries per level are shown,
    so a hostile structure (shared or deep) prints a bounded outline.
    """
    import torch
    from fpipe.weights import transforms
    lines, seen = [], set()

    def walk(node, name, level):
        if id(node) in seen:
            lines.append(f"{'  ' * level}{name}: (the same dict as above)")
            return
        seen.add(id(node))
        tensors = transforms.tensor_leaves(node)
        subdicts = [k for k, v in node.items() if isinstance(v, dict)]
        others = {k: v for k, v in node.items() if not isinstance(v, (dict, torch.Tensor))}
        lines.append(f"{'  ' * level}{name or '<top level>'}: {len(tensors)} tensors, {_mb(tensors.values())}")
        own = [str(k) for k, v in node.items() if isinstance(v, torch.Tensor)]
        if own:
            lines.append(f"{'  ' * (level + 1)}tensors: {_grouped(own, roots)}")
        for k, v in list(others.items())[:8]:
            lines.append(f"{'  ' * (level + 1)}{k}: {_describe(v)}")
        if len(others) > 8:
            lines.append(f"{'  ' * (level + 1)}… {len(others) - 8} more non-tensor entries")
        if level < depth:
            for k in subdicts[:12]:
                walk(node[k], str(k), level + 1)

    walk(obj, "", 0)
    return "\n".join(lines)


def _grouped(names, roots):
    from fpipe.weights.report import grouped
    return grouped(names, roots)


def _describe(value) -> str:
    """Type and a short repr, bounded in depth and length whatever the value holds."""
    import reprlib
    r = reprlib.Repr()
    r.maxlevel, r.maxstring, r.maxother = 2, 40, 40
    text = r.repr(value)
    return f"{type(value).__name__} {text[:60]}{'…' if len(text) > 60 else ''}"


def _mb(tensors) -> str:
    return f"{sum(t.numel() * t.element_size() for t in tensors) / 2**20:.1f} MiB"


def _fc_target(args, obj: dict, trunk_target: dict) -> dict:
    """``heads.fc.*`` shaped like the file's classifier next to the trunk (for --heads)."""
    from fpipe.weights import load
    from fpipe.weights.errors import WeightsError
    files = load.file_tensors(obj)[0]
    opts = load.config.resolve({**_weights_cfg(args), "load_heads": True})
    some = next(iter(trunk_target.values()))  # names only: the plan asks whether the model has an fc head
    plan = load.make_plan(obj, files, {**trunk_target, "heads.fc.weight": some, "heads.fc.bias": some}, opts)
    dtype = some.dtype
    found = {f"heads.{r}": files[src] for r, src in plan.names.items() if r in ("fc.weight", "fc.bias")}
    if "heads.fc.weight" not in found:
        raise WeightsError(f"{args.file}: --heads asked for fc.*, but no fc.weight sits next to the trunk.")
    return {n: t.new_zeros(t.shape, dtype=dtype) for n, t in found.items()}


def _checkpoint_in(path: str) -> str:
    """A checkpoint file, or the newest ``ckpt_<step>.pt`` of a workdir."""
    from fpipe import checkpoint
    from fpipe.weights.errors import WeightsError
    found = checkpoint.find_latest(path)
    if found is None:
        raise WeightsError(f"{path}: a directory with no checkpoints/ckpt_<step>.pt in it.")
    return found


def _weights_cfg(args) -> dict:
    return {"path": args.file, "format": args.format, "state_dict_key": args.state_dict_key,
            "remove_prefix": args.remove_prefix, "select": args.select, "stub_objects": args.stub_objects}


FORMATS = ("auto", "torchvision", "vissl", "fpipe")  # fpipe.weights.config.FORMATS, without importing it


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fpipe.weights", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    for name, fn, helptext in [("inspect", inspect, "what is in a file, and what would load"),
                               ("convert", convert, "write the trunk with torchvision names"),
                               ("export", export, "fpipe checkpoint -> torchvision names")]:
        s = sub.add_parser(name, help=helptext, description=helptext)
        s.set_defaults(run=fn)
        s.add_argument("file", help="weights file" + (" or workdir" if name == "export" else ""))
        if name != "inspect":
            s.add_argument("out", help="OUT.safetensors or OUT.pth (the directory must exist)")
        s.add_argument("--traceback", action="store_true", help="show the full error")
        if name == "export":
            s.add_argument("--ema", action="store_true",
                           help="the average of the trained weights a run with config.ema saved")
            continue
        s.add_argument("--trunk", default=None, metavar="NAME",
                       help="a trunk family or preset of the model registry (resnet, resnet50, vit_b_16, ...); "
                            "default: inferred from the file's names and shapes")
        s.add_argument("--depth", type=int, default=None, help="ResNet depth (18, 34, 50, 101, 152, 200)")
        s.add_argument("--width-multiplier", type=int, default=None, help="ResNet width multiplier (SimCLR's 2x, 4x)")
        s.add_argument("--groups", type=int, default=None, help="ResNeXt groups")
        s.add_argument("--width-per-group", type=int, default=None, help="ResNeXt / wide ResNet width per group")
        s.add_argument("--format", default="auto", choices=FORMATS, help="how to find the trunk (default auto)")
        s.add_argument("--state-dict-key", default="", help="dotted path of the sub-dict holding the weights")
        s.add_argument("--remove-prefix", default="", help="prefix to strip from the names")
        s.add_argument("--select", default="", help="which copy when a file holds several (student, encoder_k, ...)")
        s.add_argument("--stub-objects", action="store_true",
                       help="read a file holding other libraries' objects (mmengine); they become inert "
                            "stand-ins and no code from the file runs")
        if name == "convert":
            s.add_argument("--heads", action="store_true", help="also write fc.* (the classifier)")
    return p
