"""``python -m fpipe.weights inspect|convert|export``: look into weight files and rewrite them.

    inspect FILE                 outline, trunk candidates, the copy chosen and why, what is left
    convert FILE OUT             plain torchvision names (``OUT.safetensors`` or ``OUT.pth``)
    export WORKDIR|CKPT OUT      an fpipe checkpoint's trunk (and ``fc`` head) as torchvision names

Errors are one line naming the file, with a non-zero exit (``--traceback`` shows the rest).
"""
import argparse
import sys

import torch

from fpipe.tree import flatten
from fpipe.weights import detect, io, load, transforms
from fpipe.weights.errors import WeightsError
from fpipe.weights.report import grouped

def resnet_target(args) -> dict:
    """``{trunk.<torchvision name>: tensor}`` of the model named by the --trunk options."""
    if args.trunk != "resnet":
        raise WeightsError(f"--trunk {args.trunk!r}: only 'resnet' is known.")
    from fpipe.models import resnet  # the model only; never training code
    params, state = resnet.init(0, depth=args.depth, width_multiplier=args.width_multiplier,
                                groups=args.groups, width_per_group=args.width_per_group)
    return {f"trunk.{n}": t for n, t in torchvision_order(flatten(params), flatten(state)).items()}


def torchvision_order(params: dict, state: dict) -> dict:
    """params | state in ``state_dict()`` order: module by module, its params then its buffers."""
    modules = dict.fromkeys(n.rsplit(".", 1)[0] for n in list(params) + list(state))
    out = {}
    for m in modules:
        for tree in (params, state):
            out.update({n: t for n, t in tree.items() if n.rsplit(".", 1)[0] == m})
    return out


def main(argv=None, *, build_target=resnet_target) -> int:
    args = _parser().parse_args(argv)
    try:
        args.run(args, build_target)
    except (WeightsError, OSError) as e:
        if args.traceback:
            raise
        print(f"error: {str(e).splitlines()[0] if args.command != 'inspect' else e}", file=sys.stderr)
        return 1
    return 0


def inspect(args, build_target) -> None:
    obj = load.read_checkpoint(args.file)
    files = transforms.tensor_leaves(obj)
    print(f"{args.file}: {len(files)} tensors, {_mb(files.values())}")
    target = build_target(args)
    print(outline(obj, roots={n.split(".")[1] for n in target} | {"fc"}))
    cands = detect.find_trunks(files, load.trunk_shapes(target))
    print(f"\ntrunk candidates ({args.trunk}, depth {args.depth}):")
    for c in cands:
        print(f"  {c.describe()}")
    if not cands:
        print("  none: no names end in the model's names with its shapes")
    print()
    _, report = load.load_into(target, _weights_cfg(args), obj=obj)
    print(report.summary())


def convert(args, build_target) -> None:
    target = build_target(args)
    if args.heads:
        target.update(_fc_target(args, target))
    cfg = {**_weights_cfg(args), "load_heads": args.heads, "skip_layers": []}  # keep the counters
    out, report = load.load_into(target, cfg)
    plain = {n.split(".", 1)[1]: t for n, t in out.items()}
    io.write(plain, args.out)
    print(f"{args.out}: {len(plain)} tensors with torchvision names "
          f"(trunk {report.trunk_loaded}/{report.trunk_total} from {report.source or args.file})")


def export(args, build_target) -> None:
    path = _checkpoint_in(args.file)
    obj = load.read_checkpoint(path)
    if not load.is_fpipe_checkpoint(obj):
        raise WeightsError(f"{path}: not an fpipe checkpoint (needs 'params' and 'model_state' dicts).")
    flat = flatten(obj["params"]) | flatten(obj["model_state"])
    plain = {n[len("trunk."):]: t for n, t in flat.items() if n.startswith("trunk.")}
    plain |= {n[len("heads."):]: t for n, t in flat.items() if n.startswith("heads.fc.")}
    if not plain:
        raise WeightsError(f"{path}: the checkpoint has no trunk.* tensors.")
    io.write(plain, args.out)
    print(f"{args.out}: {len(plain)} tensors with torchvision names from {path}")


def outline(obj: dict, depth: int = 3, roots: set = frozenset()) -> str:
    """One line per nested dict (tensors, size, name groups), and the non-tensor entries' types."""
    lines = []

    def walk(node, name, level):
        tensors = transforms.tensor_leaves(node)
        subdicts = [k for k, v in node.items() if isinstance(v, dict)]
        others = {k: v for k, v in node.items() if not isinstance(v, dict) and k not in tensors}
        lines.append(f"{'  ' * level}{name or '<top level>'}: {len(tensors)} tensors, {_mb(tensors.values())}")
        own = [str(k) for k, v in node.items() if isinstance(v, torch.Tensor)]
        if own:
            lines.append(f"{'  ' * (level + 1)}tensors: {grouped(own, roots)}")
        for k, v in list(others.items())[:8]:
            lines.append(f"{'  ' * (level + 1)}{k}: {_describe(v)}")
        if len(others) > 8:
            lines.append(f"{'  ' * (level + 1)}… {len(others) - 8} more non-tensor entries")
        if level < depth:
            for k in subdicts[:12]:
                walk(node[k], str(k), level + 1)

    walk(obj, "", 0)
    return "\n".join(lines)


def _describe(value) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:60]}{'…' if len(text) > 60 else ''}"


def _mb(tensors) -> str:
    return f"{sum(t.numel() * t.element_size() for t in tensors) / 2**20:.1f} MiB"


def _fc_target(args, trunk_target: dict) -> dict:
    """``heads.fc.*`` shaped like the file's classifier next to the trunk (for --heads)."""
    obj = load.read_checkpoint(args.file)
    files = transforms.tensor_leaves(obj)
    opts = load.config.resolve({**_weights_cfg(args), "load_heads": True})
    plan = load.make_plan(obj, files, trunk_target, opts)
    dtype = next(iter(trunk_target.values())).dtype
    found = {f"heads.{r}": files[src] for r, src in plan.names.items() if r in ("fc.weight", "fc.bias")}
    if "heads.fc.weight" not in found:
        raise WeightsError(f"{args.file}: --heads asked for fc.*, but no fc.weight sits next to the trunk.")
    return {n: t.new_zeros(t.shape, dtype=dtype) for n, t in found.items()}


def _checkpoint_in(path: str) -> str:
    """A checkpoint file, or the newest ``ckpt_<step>.pt`` of a workdir."""
    from fpipe import checkpoint
    found = checkpoint.find_latest(path)
    if found is None:
        raise WeightsError(f"{path}: a directory with no checkpoints/ckpt_<step>.pt in it.")
    return found


def _weights_cfg(args) -> dict:
    return {"path": args.file, "format": args.format, "state_dict_key": args.state_dict_key,
            "remove_prefix": args.remove_prefix, "select": args.select}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fpipe.weights", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    for name, fn, helptext in [("inspect", inspect, "what is in a file, and what would load"),
                               ("convert", convert, "write the trunk with torchvision names"),
                               ("export", export, "fpipe checkpoint -> torchvision names")]:
        s = sub.add_parser(name, help=helptext)
        s.set_defaults(run=fn)
        s.add_argument("file", help="weights file" + (" or workdir" if name == "export" else ""))
        if name != "inspect":
            s.add_argument("out", help="OUT.safetensors or OUT.pth")
        s.add_argument("--traceback", action="store_true", help="show the full error")
        if name == "export":
            continue
        s.add_argument("--trunk", default="resnet")
        s.add_argument("--depth", type=int, default=50)
        s.add_argument("--width-multiplier", type=int, default=1)
        s.add_argument("--groups", type=int, default=1)
        s.add_argument("--width-per-group", type=int, default=64)
        s.add_argument("--format", default="auto")
        s.add_argument("--state-dict-key", default="")
        s.add_argument("--remove-prefix", default="")
        s.add_argument("--select", default="")
        if name == "convert":
            s.add_argument("--heads", action="store_true", help="also write fc.* (the classifier)")
    return p
