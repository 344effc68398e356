"""``model.weights.path`` in a detection run: which part of the model a file fills, and the checks.

    params, state, provenance = pretrained.initial_weights(params, state, config.model.weights, workdir)

- A **whole detection model** (a file whose names include the model's ``rpn.head.*``: torchvision's
  COCO checkpoints such as ``fasterrcnn_resnet50_fpn_coco-258fb6c6.pth``, the ``model`` entry of its
  reference scripts' checkpoints, or an fpipe detection run's checkpoint) loads by name into every
  tensor of the model. torchvision's names are fpipe's, so ``format: auto`` finds them under any
  prefix. Every weight must come from the file with the model's shape; a missing tensor or another
  shape is a one-line ``WeightsError`` naming them (``skip_layers`` keeps chosen ones at their
  initialisation on purpose, ``allow_partial=True`` accepts any gap). ``num_batches_tracked``
  counters are not weights: FrozenBatchNorm2d files have none, so they keep the initial values,
  and the load report says so.
- Anything else is a **classification checkpoint** for ``backbone.body``: the loader sees the body
  as a trunk, exactly as in classification (``fpipe.train.loop.load_weights``).
"""
import dataclasses

from absl import logging

from fpipe import checkpoint, tree, weights
from fpipe.train import loop
from fpipe.weights import config as weights_config
from fpipe.weights import detect, transforms
from fpipe.weights.errors import WeightsError
from fpipe.weights.report import short_names

# A file holds a whole detection model in fpipe's (torchvision's) names when one of its names ends in
# a name of the model's RPN head. detectron2's detectors name theirs proposal_generator.rpn_head.*
# (and their ResNet otherwise): such a file gives only its backbone (renames.DETECTRON2_RESNET).
DETECTION_PART = "rpn.head."


def initial_weights(params, model_state, weights_cfg, workdir, write_report=True):
    """``(params, model_state, provenance)`` from ``model.weights.path`` (the module docstring says
    which part it fills), or the initialisation as it is (said loudly) when no path is given."""
    if not weights_cfg.path:
        logging.warning("model.weights.path is empty: the model starts from its RANDOM initialisation.")
        return params, model_state, None
    obj = weights.read_checkpoint(weights_cfg.path, stub_objects=bool(weights_cfg.get("stub_objects", False)))
    if holds_detection_model(obj, tree.flatten(params)):
        return model_weights(params, model_state, weights_cfg, workdir, write_report, obj=obj)
    return backbone_weights(params, model_state, weights_cfg, workdir, write_report, obj=obj)


def holds_detection_model(obj, model_names) -> bool:
    """Whether one of the file's tensor names is, or ends in, a name of the model's RPN head."""
    rpn_names = {n for n in model_names if n.startswith(DETECTION_PART)}
    for name in transforms.tensor_leaves(obj):
        parts = name.split(".")
        if any(".".join(parts[i:]) in rpn_names for i in range(len(parts))):
            return True
    return False


def model_weights(params, model_state, weights_cfg, workdir, write_report=True, *, obj=None):
    """A whole detection model's file into every tensor of the model (the module docstring)."""
    opts = weights_config.resolve(weights_cfg)
    if obj is None:
        obj = weights.read_checkpoint(opts.path, stub_objects=opts.stub_objects)
    if checkpoint.is_checkpoint(obj):  # an fpipe detection run's checkpoint: params and statistics by name
        obj = {**obj["params"], **obj["model_state"]}
    whole = {"trunk": params}, {"trunk": model_state}  # the loader's "trunk" is the whole model here
    target = {**tree.flatten(whole[0]), **tree.flatten(whole[1])}
    loaded, report = weights.load_into(target, dataclasses.replace(opts, allow_partial=True), obj=obj)
    if not opts.allow_partial:
        check_whole_model(report, opts)
    report.notes.append("a whole detection model: 'trunk' counts every tensor of it "
                        "(backbone.body, backbone.fpn, rpn.head, roi_heads)")
    new_params, new_state = tree.split_like(loaded, *whole)
    provenance = loop.record_load(report, opts.path, workdir, write_report)
    return (tree.shaped_like(params, new_params["trunk"]), tree.shaped_like(model_state, new_state.get("trunk", {})),
            {**provenance, "part": "model"})


def check_whole_model(report, opts) -> None:
    """One-line errors: tensors of other shapes, or model weights the file does not hold (those
    matched by ``skip_layers`` stay at their initialisation on purpose)."""
    strip = lambda name: name[len("trunk."):] if name.startswith("trunk.") else name
    if report.shape_mismatches:
        shown = "; ".join(f"{strip(n)}: file {list(a)} vs model {list(b)}" for n, a, b in report.shape_mismatches[:5])
        more = f" (+{len(report.shape_mismatches) - 5} more)" if len(report.shape_mismatches) > 5 else ""
        raise WeightsError(f"{opts.path}: {len(report.shape_mismatches)} tensor(s) of the detection model have "
                           f"other shapes in the file: {shown}{more}. Is the model (backbone, num_classes, heads) "
                           f"the one the file was trained with? (skip_layers keeps named ones at their init.)")
    missing = {strip(n): n for n in report.missing if n.startswith("trunk.") and not detect.is_bookkeeping(n)}
    _, on_purpose = transforms.skip(missing, opts.skip_layers)
    left = [name for name in missing if name not in on_purpose]
    if left:
        raise WeightsError(f"{opts.path}: {len(left)} tensor(s) of the detection model are not in the file: "
                           f"{short_names(left)}; refusing to leave them random (skip_layers keeps named ones "
                           f"at their init on purpose; allow_partial=True accepts any gap).")
    if on_purpose:
        report.notes.append(f"kept at their initialisation by skip_layers: {short_names(sorted(on_purpose))}")


# The trunk of a classification checkpoint, by where its tensors live in a detection model: the
# body, and (C4) res5 in the box head. {model prefix: trunk prefix}
TRUNK_PARTS = {"backbone.body.": "", "roi_heads.box_head.layer4.": "layer4."}


def backbone_weights(params, model_state, weights_cfg, workdir, write_report=True, *, obj=None):
    """``model.weights.path`` (a classification checkpoint, any format fpipe.weights reads) into
    ``backbone.body``: the loader sees the body as a trunk, as in classification. A C4 model's
    res5 lives in its box head (``roi_heads.box_head.layer4``) and is part of that trunk too."""
    if not weights_cfg.path:
        logging.warning("model.weights.path is empty: the backbone starts from its RANDOM initialisation.")
        return params, model_state, None
    flat_params, flat_state = tree.flatten(params), tree.flatten(model_state)
    model_name = {}  # trunk name -> model name

    def as_trunk(flat):
        out = {}
        for name, value in flat.items():
            prefix = next((p for p in TRUNK_PARTS if name.startswith(p)), None)
            if prefix is not None:
                trunk_name = TRUNK_PARTS[prefix] + name[len(prefix):]
                model_name[trunk_name] = name
                out[trunk_name] = value
        return {"trunk": tree.unflatten(out)}

    trunk, trunk_state = as_trunk(flat_params), as_trunk(flat_state)
    trunk, trunk_state, provenance = loop.load_weights(trunk, trunk_state, weights_cfg, workdir, write_report, obj=obj)
    back = lambda t: {model_name[n]: v for n, v in tree.flatten(t.get("trunk", {})).items()}
    params = tree.shaped_like(params, tree.unflatten({**flat_params, **back(trunk)}))
    model_state = tree.shaped_like(model_state, tree.unflatten({**flat_state, **back(trunk_state)}))
    parts = sorted({p for p in TRUNK_PARTS for n in model_name.values() if n.startswith(p)})
    return params, model_state, {**provenance, "part": " + ".join(p.rstrip(".") for p in parts)}
