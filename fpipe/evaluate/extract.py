"""Feature extraction: named trunk features of every sample of a split, written to the workdir.

``WORKDIR/features/<split>.pt`` (``<split>_rank<R>.pt`` per process under torchrun) holds
``{"features": {name: tensor N×...}, "labels": N, "indices": N}`` in sample order, padding
removed, readable with ``torch.load(weights_only=True)``. Eval-mode trunk, eval transforms.
"""
import os

import torch
from absl import logging

from fpipe import files


def extract(features_fn, params, model_state, loader, names, prepare):
    """``{"features": {name: N×...}, "labels", "indices"}`` over the loader's samples (one rank's)."""
    chunks, labels, indices = {n: [] for n in names}, [], []
    for batch in loader.epoch(0):
        batch = prepare(batch)
        keep = batch["mask"].bool() if "mask" in batch else torch.ones_like(batch["label"], dtype=torch.bool)
        with torch.no_grad():
            feats = features_fn(params, model_state, batch["image"], names)
        for n in names:
            chunks[n].append(feats[n][keep].float().cpu())
        labels.append(batch["label"][keep].cpu())
        indices.append(batch["index"][keep].cpu())
    return {"features": {n: torch.cat(c) for n, c in chunks.items()},
            "labels": torch.cat(labels), "indices": torch.cat(indices)}


def write(workdir, split, payload, rank, world_size):
    os.makedirs(os.path.join(workdir, "features"), exist_ok=True)
    name = f"{split}.pt" if world_size == 1 else f"{split}_rank{rank}.pt"
    path = os.path.join(workdir, "features", name)
    files.atomic_write(path, lambda f: torch.save(payload, f))
    shapes = {n: tuple(t.shape) for n, t in payload["features"].items()}
    logging.info("Features of %s written to %s: %s", split, path, shapes)
    return path
