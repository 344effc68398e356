"""Merging renamed file tensors into the model's flat dict, and the checks that refuse a bad load.

Rule (docs/DESIGN.md): a file name ``R`` goes to ``trunk.R`` if the model has it, else to
``heads.R`` (or to ``R`` itself when it names a head: ``heads.<name>.…``) when heads were asked
for, else it is "not loaded".
"""
import re

import torch

from fpipe.weights.detect import COUNTERS, final_norm, is_bookkeeping, is_derived
from fpipe.weights.errors import WeightsError
from fpipe.weights.report import SHOW, LoadReport, short_names


def merge(target: dict, tensors: dict, origin: dict, report: LoadReport, *, load_heads: bool) -> dict:
    """Returns ``target`` with the fitting tensors of ``tensors`` ({R: tensor}) in place; fills ``report``."""
    out = dict(target)
    for rel, tensor in tensors.items():
        src = origin[rel]
        name = f"trunk.{rel}"
        if is_derived(rel):  # an index table: the model's own, computed from its architecture
            report.not_loaded[src] = "derived from the architecture (the model's own is kept)"
            continue
        if name not in target:
            name = rel if rel.startswith("heads.") and rel in target else f"heads.{rel}"
            if name not in target:
                report.not_loaded[src] = "not in the model"
                continue
            if not load_heads:
                report.not_loaded[src] = "head (load_heads=False)"
                continue
        ref = target[name]
        if tuple(tensor.shape) != tuple(ref.shape):
            report.shape_mismatches.append((name, tuple(tensor.shape), tuple(ref.shape)))
            report.not_loaded[src] = "shape mismatch"
            continue
        if tensor.dtype != ref.dtype:
            report.dtype_casts.append((name, _dtype(tensor), _dtype(ref)))
        out[name] = like(tensor, ref)
        report.loaded.append(name)
        report.sources[name] = src
    loaded = set(report.loaded)
    trunk = [n for n in target if n.startswith("trunk.") and not is_bookkeeping(n)]
    report.trunk_total = len(trunk)
    report.trunk_loaded = sum(n in loaded for n in trunk)
    report.heads_loaded = [n for n in report.loaded if n.startswith("heads.")]
    wanted = ("trunk.", "heads.") if load_heads else ("trunk.",)
    report.missing = [n for n in target if n.startswith(wanted) and n not in loaded and not is_bookkeeping(n)]
    report.identity_kept = identity_final_norm(target, report.missing)
    if report.identity_kept:
        report.notes.append(f"the file has no {report.identity_kept[0].rsplit('.', 1)[0]} (the trunk's final norm; "
                            "ConvNeXt V2's FCMAE encoder has none): kept at its identity init (weight 1, bias 0), "
                            "as fine-tuning from such a file starts it")
    counters = [n for n in target if n.startswith(wanted) and n not in loaded and n.rsplit(".", 1)[-1] in COUNTERS]
    if counters:  # FrozenBatchNorm2d files (torchvision's detection checkpoints) have none; skip_layers drops them
        report.notes.append(f"{len(counters)} num_batches_tracked counter(s) kept at the model's initial values "
                            "(counters, not weights: skipped by skip_layers or not in the file)")
    return out


def identity_final_norm(target: dict, missing: list) -> list:
    """``missing`` when it is exactly the trunk's final norm (``detect.final_norm``) and the model
    holds its identity there (weight 1, bias 0), a value no random init gives (features after it
    are standardised); else ``[]``. A meta target (the CLI's dry runs) stands for a fresh model,
    whose norms start at identity."""
    shapes = {n: tuple(t.shape) for n, t in target.items() if n.startswith("trunk.")}
    last = list(final_norm(shapes))
    if not last or sorted(n for n in missing if n.startswith("trunk.")) != sorted(last):
        return []
    weight, bias = (target[n] for n in last)
    at_identity = weight.is_meta or bool((weight == 1).all()) and bool((bias == 0).all())
    return last if at_identity else []


def like(tensor: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """The file tensor with the model tensor's dtype, device and requires_grad, in memory of its
    own: never a view of the file. A memory-mapped ``.pth`` or safetensors file rewritten in
    place by another job would otherwise change the weights under a run, tensors that share one
    storage in the file would share it in the model, and safetensors' tensors sit at any 4-byte
    offset (PyTorch's own allocations start on 64-byte boundaries, as vector loads want)."""
    if ref.is_meta:  # a meta target gives shapes only: nothing runs on these
        return tensor.detach().to(dtype=ref.dtype)
    out = tensor.detach().to(device=ref.device, dtype=ref.dtype, memory_format=torch.contiguous_format, copy=True)
    return out.requires_grad_(True) if ref.requires_grad else out


def _dtype(t: torch.Tensor) -> str:
    return str(t.dtype).replace("torch.", "")


def check_finite(report: LoadReport, out: dict) -> None:
    """Refuses NaN or inf in any loaded tensor, naming the file and the tensors."""
    bad = [report.sources[n] for n in report.loaded if not _finite(out[n])]
    if bad:
        raise WeightsError(f"{report.path}: {len(bad)} tensor(s) hold NaN or inf values: {short_names(bad)}; "
                           "the file is damaged or its training diverged.")


def _finite(t: torch.Tensor) -> bool:
    """All values finite; a finite sum (NaN and inf propagate) settles it without a mask."""
    if not t.is_floating_point() or t.numel() == 0:
        return True
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


# File tensors that no model name fits and the trunk option that would give them one.
HINTS = {"dist_token": "the file is a distilled DeiT: build the ViT with dist_token=True "
                       "(presets deit_*_distilled_patch16_*)",
         "mlp.w12.weight": "the file's blocks have dinov2's SwiGLU FFN: build the ViT with mlp='swiglu'"}


def _hints(report: LoadReport) -> str:
    """`` Hint: …`` for each HINTS name among the file tensors that fit no model name."""
    left = [n for n, why in report.not_loaded.items() if why == "not in the model"]
    found = [hint for key, hint in HINTS.items() if any(n == key or n.endswith("." + key) for n in left)]
    return "".join(f" Hint: {h}." for h in found)


def check(report: LoadReport, target: dict, *, allow_partial: bool, load_heads: bool, fix=None,
          architecture=None) -> None:
    """Raises unless the trunk is fully covered and shapes agree (or ``allow_partial``).

    ``fix``: a function returning the config change that would load the trunk, or ``None``;
    ``architecture``: one returning ``(how the file's trunk differs from the model's, the setting
    that fits it)`` or ``None`` (``load.architecture_mismatch``); it comes before ``fix``.
    """
    if allow_partial:
        return
    where = f"{report.path}: " if report.path else ""
    covered = report.trunk_loaded + len(report.identity_kept)
    failing = report.shape_mismatches or covered < report.trunk_total
    found = architecture() if architecture and failing else None
    arch = "{}: set {}".format(*found) if found else ""
    if report.shape_mismatches:
        shown = "; ".join(f"{n}: file {list(a)} vs model {list(b)}" for n, a, b in report.shape_mismatches[:SHOW])
        raise WeightsError(f"{where}{len(report.shape_mismatches)} tensor(s) have other shapes than the "
                           f"model's: {shown}. Is the model the one the file was trained with? "
                           + (f"No: {arch}. " if arch else "")
                           + f"(allow_partial=True keeps those at their init.){_hints(report)}")
    if covered < report.trunk_total:
        model_side = [n for n in report.missing if n.startswith("trunk.")]
        file_side = [n for n, why in report.not_loaded.items() if why == "not in the model"]
        suggestion = "" if arch or not fix else fix()  # the architecture, when it differs, is the fix
        raise WeightsError(
            f"{where}only {report.trunk_loaded}/{report.trunk_total} trunk tensors would be loaded "
            f"(source {report.source or '<whole file>'}); refusing to leave the rest random"
            + (f": {arch}.\n" if arch else ".\n") +
            f"  model names with no file tensor: {short_names(model_side)}\n"
            f"  file names that fit no model name: {short_names(file_side)}\n"
            + (f"  fix: {suggestion}\n" if suggestion else "")
            + "  (allow_partial=True accepts a partial trunk, if you mean it.)" + _hints(report))
    heads = [n for n in target if n.startswith("heads.")]
    if load_heads and heads and not report.heads_loaded:
        raise WeightsError(f"{where}load_heads=True but no head tensor was found in the file "
                           f"(model heads: {short_names(heads)}).")


def trunk_leftovers(target: dict, tensors: dict, origin: dict, report: LoadReport) -> list:
    """Names (R) left "not in the model" that are blocks of a deeper trunk: a model trunk name but
    for its numbers, with that tensor's shape (``layer3.2.conv1.weight`` beside ``layer3.1.*``).

    Classifiers, projectors, predictors and other copies have names or shapes of their own, so
    they stay "not loaded"; counters are not weights.
    """
    kinds = {(_numberless(n[len("trunk."):]), tuple(t.shape)) for n, t in target.items() if n.startswith("trunk.")}
    return [rel for rel, t in tensors.items() if report.not_loaded.get(origin[rel]) == "not in the model"
            and not is_bookkeeping(rel) and (_numberless(rel), tuple(t.shape)) in kinds]


def _numberless(name: str) -> str:
    return re.sub(r"\d+", "#", name)


def extra_blocks(names: list, target: dict) -> list:
    """Each name's shortest leading path that no model trunk name has (``layer3.2.``), in order:
    the blocks the model lacks, as ``skip_layers`` patterns."""
    have = {p for n in target if n.startswith("trunk.") for p in _leading(n[len("trunk."):])}
    return list(dict.fromkeys(next((p for p in _leading(n) if p not in have), n) for n in names))


def _leading(name: str) -> list:
    parts = name.split(".")
    return [".".join(parts[:i]) + "." for i in range(1, len(parts))]


def check_leftovers(report: LoadReport, leftovers: list, target: dict, *, skip_layers: tuple,
                    allow_partial: bool, architecture=None) -> None:
    """Refuses file tensors of trunk blocks the model lacks (``trunk_leftovers``): loading the rest
    would pass a truncated copy of a deeper trunk for the model's own (unless ``allow_partial``)."""
    if not leftovers or allow_partial:
        return
    where = f"{report.path}: " if report.path else ""
    blocks = extra_blocks(leftovers, target)
    found = architecture() if architecture else None
    what, setting = found or ("the file's trunk is deeper than the model's", "model.trunk.name to the file's trunk")
    raise WeightsError(
        f"{where}{len(leftovers)} file tensors belong to trunk blocks the model does not have "
        f"({short_names([b + '*' for b in blocks])}: {short_names(leftovers)}); {what}, and loading the "
        f"rest would pass a truncated copy of the file's trunk for it. Fix: set {setting}, or drop them "
        f"deliberately with model.weights.skip_layers={tuple(skip_layers) + tuple(blocks)!r}.")
