"""Which trunk a file holds, from its names and shapes alone (for the CLI without ``--trunk``).

ResNets are read off directly: blocks per stage and bottleneck or basic give the depth, the
stem and first block give width and groups. Other families are matched against each registry
preset's names and shapes, built on the meta device (no memory, no compute).
"""
import functools
import re

from fpipe.weights import detect, renames
from fpipe.weights.errors import WeightsError

_RESNET_CONV = re.compile(r"^(.*?)layer([1-4])\.(\d+)\.conv([123])\.weight$")


def infer_trunk(files: dict, presets=None) -> tuple:
    """``(registry name, options, why)`` for the trunk in ``files`` ({dotted name: tensor}).

    ``presets``: ``{name: (family, options, build_target)}`` to try when the file is not a
    ResNet; ``build_target()`` returns ``{trunk.<name>: meta tensor}``.
    """
    views = list(_views(files))  # the file's names under each rename table, once for all presets
    not_resnet = None  # a ResNet-like layout of no known depth: said only if nothing else fits
    for table_name, names in views:
        try:
            found = _resnet(names)
        except WeightsError as e:  # under a rename table it may be another family's layout (HF RegNet)
            not_resnet, found = not_resnet or e, None
        if found:
            options, why = found
            via = f" (after the {table_name} rename table)" if table_name else ""
            return "resnet", options, why + via
    whole = []  # (tensors, name, options, why) of each preset the file holds whole
    for name, (_, options, build_target) in (presets or {}).items():
        shapes = {n[len("trunk."):]: tuple(t.shape) for n, t in build_target().items() if n.startswith("trunk.")}
        for table_name, names in views:
            cands = detect.find_trunks(names, shapes)
            lacking = {n for n in shapes if not detect.is_bookkeeping(n)} - set(cands[0].matched if cands else ())
            if not lacking or lacking == set(detect.final_norm(shapes)):
                via = f" (after the {table_name} rename table)" if table_name else ""
                but = f" but its final norm {min(lacking).rsplit('.', 1)[0]}" if lacking else ""
                # as stored, or only after resampling position grids (a 224 px file for a 384 px preset)
                exact = all(tuple(names[n].shape) == shapes[tail] for tail, n in cands[0].matched.items())
                whole.append(((exact, len(shapes)), name, options, f"every tensor of preset {name!r}{but} found at "
                                                                   f"{cands[0].prefix or '<no prefix>'!r}{via}"))
                break
    if whole:  # as stored first, then the largest (a shallower preset's names can all be in a deeper one's file)
        rank, name, options, why = max(whole, key=lambda w: w[0])
        keras = next((w for w in whole if w[0] == rank and w[1] == f"tf_{name}"), None)
        if keras and "hf_efficientnet" in why:  # transformers' EfficientNets are all Keras ports: TF's padding
            _, name, options, why = keras
            why += " (transformers' EfficientNets are ports of Keras's: TensorFlow's padding, BatchNorm eps 1e-3)"
        twins = [w[1] for w in whole if w[0] == rank and w[1] != name]
        if twins:  # the same tensors: names and shapes cannot tell these apart
            why += (f"; preset(s) {', '.join(twins)} hold the same tensors and differ only in what tensors "
                    "cannot show (activation, padding, norm eps, position resampling, init values): pick by where the file "
                    "comes from")
        return name, options, why
    if not_resnet:
        raise not_resnet
    raise WeightsError("could not tell which trunk the file holds from its names and shapes; "
                       "pass --trunk NAME (and --depth for a ResNet).")


def resnet_of(files: dict):
    """``(trunk settings, why)`` of the ResNet whose names ``files`` holds, or ``None``: tells the
    file's trunk from the model's when a load does not fit (``{"name": "resnet34"}``)."""
    try:
        found = _resnet(files)
    except WeightsError:
        return None
    return (trunk_settings(found[0]), found[1]) if found else None


def registry_trunk_of(files: dict):
    """``(model.trunk settings, why)`` of the registry trunk ``files`` holds whole (a ResNet of any
    depth, or any preset of the other families), or ``None``: names the file's architecture when
    it does not fit the model."""
    from fpipe.weights import cli
    presets = {name: (family, options, lambda name=name: preset_target(name))
               for name, (family, options) in cli.registry().items() if family != "resnet" and name != family}
    try:
        name, options, why = infer_trunk(files, presets)
    except WeightsError:
        return None
    return (trunk_settings(options) if name == "resnet" else {"name": name}), why


def target_of(settings: dict) -> dict:
    """``{trunk.<name>: meta tensor}`` of the trunk that ``settings`` (``model.trunk`` keys) name."""
    from fpipe.weights import cli
    options = {k: v for k, v in settings.items() if k != "name"}
    return cli.meta_target(settings["name"], **options) if options else preset_target(settings["name"])


@functools.lru_cache(maxsize=None)
def preset_target(name: str) -> dict:
    """A registry preset's ``{trunk.<name>: meta tensor}`` (shapes only), built once per process:
    the ~70 presets take ~5 s to build, which every failing load and CLI inspect would otherwise pay again."""
    from fpipe.weights import cli
    return cli.meta_target(name)


def trunk_settings(options: dict) -> dict:
    """``model.trunk`` keys for inferred ResNet options: a preset's name, else ``resnet`` and the options."""
    from fpipe.models.resnet import PRESETS
    defaults = {"width_multiplier": 1, "groups": 1, "width_per_group": 64}
    full = {**defaults, **options}
    preset = next((name for name, o in PRESETS.items() if {**defaults, **o} == full), None)
    changed = {k: v for k, v in full.items() if k == "depth" or v != defaults[k]}
    return {"name": preset} if preset else {"name": "resnet", **changed}


def _views(files: dict):
    """The file's names as they are, then under each rename table that gives other names."""
    yield "", files
    seen = {frozenset(files)}
    for table_name, table in renames.TABLES.items():
        mapped = renames.rename_all(files, table)
        if mapped and frozenset(mapped) not in seen:
            seen.add(frozenset(mapped))
            yield table_name, {new: files[old] for new, old in mapped.items()}


def _resnet(files: dict):
    from fpipe.models.resnet import DEPTHS
    by_prefix = {}
    for name, tensor in files.items():
        m = _RESNET_CONV.match(name)
        if m:
            by_prefix.setdefault(m.group(1), {})[name[len(m.group(1)):]] = tensor
    if not by_prefix:
        return None
    prefix, convs = max(by_prefix.items(), key=lambda kv: len(kv[1]))
    blocks = [1 + max((int(n.split(".")[1]) for n in convs if n.startswith(f"layer{s}.")), default=-1)
              for s in range(1, 5)]
    bottleneck = any(n.endswith("conv3.weight") for n in convs)
    kind = "bottleneck" if bottleneck else "basic"
    depth = next((d for d, spec in DEPTHS.items() if spec == (kind, tuple(blocks))), None)
    if depth is None:
        raise WeightsError(f"the file holds a ResNet with {kind} blocks {blocks} per stage at "
                           f"{prefix or '<no prefix>'!r}, which is no known depth ({sorted(DEPTHS)}).")
    stem = files.get(prefix + "conv1.weight")
    width_multiplier = stem.shape[0] // 64 if stem is not None else 1
    options = {"depth": depth, "width_multiplier": width_multiplier}
    if bottleneck:
        conv2 = convs["layer1.0.conv2.weight"]
        width, groups = conv2.shape[0], conv2.shape[0] // conv2.shape[1]
        options |= {"groups": groups, "width_per_group": width // (groups * width_multiplier)}
    why = (f"{kind} blocks {blocks} per stage at {prefix or '<no prefix>'!r}: ResNet-{depth}"
           + (f", width x{width_multiplier}" if width_multiplier != 1 else "")
           + (f", groups {options['groups']} x {options['width_per_group']}"
              if bottleneck and (options["groups"], options["width_per_group"]) != (1, 64) else ""))
    return options, why
