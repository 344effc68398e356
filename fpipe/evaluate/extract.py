"""Feature extraction: named trunk features (and head outputs) of every sample, cached on disk.

``WORKDIR/features/<split>.safetensors`` holds one tensor per layer (``N×...``, float32 or
float16), ``labels`` and ``indices`` (int64, N), in sample order, padding removed; the
metadata (``__metadata__["fpipe"]``, JSON) gives the layers, aliases, dtype and the
:mod:`fingerprint` of the model and data that made it. Plain safetensors: numpy reads it
without torch (``safetensors.numpy.load_file``), :func:`load` memory-maps it.

- No duplicated layers: a layer equal to another one up to shape (``res5avg`` is ``flatten``
  as N×C×1×1) is stored once and aliased in the metadata; :func:`load` gives both.
- One set per run: under torchrun each rank writes its shard, then rank 0 merges the shards
  in sample-index order, one layer at a time, and removes them.
- Resumable: a finished split (its final file exists, same fingerprint, every layer asked
  for) is not recomputed; a split cut short left no final file and is computed again.
- Head outputs: ``extract.heads=True`` adds ``heads.<name>`` (the logits of each head).
"""
import collections
import copy
import glob
import os
import time

import torch
from absl import logging

from fpipe import data
from fpipe.evaluate import fingerprint, store
from fpipe.train import precision

SPLITS = ("train", "test")
DTYPES = {"float32": torch.float32, "float16": torch.float16}

Features = collections.namedtuple("Features", "features labels indices metadata")


def path_of(directory, split, rank=None, world_size=1):
    name = split if rank is None else f"{split}.rank{rank}of{world_size}"
    return os.path.join(directory, "features", name + ".safetensors")


def extract(features_fn, params, model_state, loader, names, prepare, autocast=None):
    """``{"features": {name: N×...}, "labels", "indices"}`` over the loader's samples (one rank's);
    the model runs under autocast to ``autocast`` (config.precision; None: float32), the features
    are kept as float32. Each layer's rows go straight into one tensor sized for every batch (no
    concatenation at the end: the features are held once, not twice)."""
    out, labels, indices, filled = {}, [], [], 0
    start, total = time.perf_counter(), len(loader)
    for i, batch in enumerate(loader.epoch(0)):
        batch = prepare(batch)
        keep = batch["mask"].bool() if "mask" in batch else torch.ones_like(batch["label"], dtype=torch.bool)
        with torch.no_grad(), precision.autocast(autocast, batch["label"].device.type):
            feats = features_fn(params, model_state, batch["image"], names)
        kept = int(keep.sum())
        for n in names:
            rows = feats[n][keep]
            if n not in out:  # the eval loader's batches are all one size: room for every batch
                out[n] = torch.empty((total * len(keep), *rows.shape[1:]), dtype=torch.float32)
            out[n][filled:filled + kept] = rows
        filled += kept
        labels.append(batch["label"][keep].cpu())
        indices.append(batch["index"][keep].cpu())
        if (i + 1) % max(total // 10, 1) == 0 or i + 1 == total:
            rate = (i + 1) * loader.local_batch_size / (time.perf_counter() - start)
            logging.info("extract: batch %d/%d (%.0f images/s on this process)", i + 1, total, rate)
    return {"features": {n: t[:filled] for n, t in out.items()},
            "labels": torch.cat(labels), "indices": torch.cat(indices)}


def run(config, workdir, model, params, model_state, dataset, dist, prepare, *, compile=False, cache=None):
    """Extracts ``config.extract.features`` (and heads) of every split unless already on disk.

    The trunk runs as linear evaluation's frozen trunk does (fpipe.train.frozen_trunk.eval_features:
    norms folded into the convs; ``compile``: one graph with the weights as constants, kept under
    ``cache``, ``(directory, key)`` or None), the heads eagerly on its features."""
    from fpipe.train import frozen_trunk  # imported here: fpipe.train's loop imports this module
    names = tuple(config.extract.features)
    with_heads = bool(config.extract.get("heads", False))
    dtype = config.extract.get("dtype", "float32")
    if dtype not in DTYPES:
        raise ValueError(f"extract.dtype={dtype!r}; valid: {', '.join(DTYPES)}")
    fp = fingerprint.of(config, params, model_state, dataset)
    wanted = names + tuple(f"heads.{h.name}" for h in model.heads if with_heads)
    need = tuple(dict.fromkeys(names + tuple(h.feature for h in model.heads if with_heads)))
    autocast = precision.autocast_dtype(config.get("precision"), dist.device)
    trunk = []  # built when a split is extracted: nothing compiles when both are on disk already

    def features_fn(p, s, images, _):
        if not trunk:
            trunk.append(frozen_trunk.eval_features(model, p, s, need, compile=compile, batch_size=images.shape[0],
                                                    cache=cache, autocast=autocast))
        with torch.autocast(images.device.type, enabled=False):  # the trunk applies `autocast` itself
            feats = trunk[0](images)
        out = {n: feats[n] for n in names}
        if with_heads:
            logits, _ = model.apply_heads(p, s, feats, train=False)
            out.update({f"heads.{k}": v for k, v in logits.items()})
        return out

    # What a killed run left half-written: each rank its shards', rank 0 the merged files'.
    patterns = [f"*.rank{dist.rank}of*.tmp"] + [f"{s}.safetensors.*.tmp" for s in SPLITS if dist.is_main]
    for stale in (p for pattern in patterns for p in glob.glob(os.path.join(workdir, "features", pattern))):
        os.remove(stale)
    splits = {"train": dataset.train, "test": dataset.test}
    one_view = copy.deepcopy(config.data)  # one vector per sample: the evaluation view, no eval_views crops
    if "eval_views" in one_view:
        with one_view.unlocked():
            one_view.eval_views = ()
    for split in SPLITS:
        if is_done(workdir, split, fp, wanted):
            logging.info("Features of %s already in %s: not recomputed.", split, path_of(workdir, split))
            continue
        loader = data.Loader(splits[split], one_view, train=False, rank=dist.rank, world_size=dist.world_size)
        payload = extract(features_fn, params, model_state, loader, wanted, prepare, autocast)
        write(workdir, split, payload, dist, fp, dtype)
    return fp


def is_done(directory, split, fp, names):
    """True when the split's file is complete for ``names``; a different fingerprint is an error."""
    path = path_of(directory, split)
    if not os.path.isfile(path):
        return False
    meta = store.Reader(path).metadata
    fingerprint.check(meta.get("fingerprint", {}), fp, path)
    missing = [n for n in names if n not in meta.get("layers", ())]
    if missing:
        logging.info("%s lacks %s: extracting that split again.", path, missing)
    return not missing


def write(workdir, split, payload, dist, fp, dtype="float32"):
    """The split's one file: this process's payload, or (torchrun) every rank's shard merged."""
    os.makedirs(os.path.join(workdir, "features"), exist_ok=True)
    out = path_of(workdir, split)
    if not dist.enabled:
        merge([_Payload(payload)], out, fp, dtype, split)
        return out
    shard = path_of(workdir, split, dist.rank, dist.world_size)
    payload = {**payload, "features": {n: t.to(DTYPES[dtype]) for n, t in payload["features"].items()}}
    merge([_Payload(payload)], shard, fp, dtype, split, check_complete=False, dedupe=False)
    torch.distributed.barrier()
    if dist.is_main:
        shards = [path_of(workdir, split, r, dist.world_size) for r in range(dist.world_size)]
        merge([store.Reader(p) for p in shards], out, fp, dtype, split)
        for p in shards:
            os.remove(p)
    torch.distributed.barrier()
    return out


class _Payload:
    """An in-memory payload with a Reader's interface."""

    def __init__(self, payload):
        self._t = {**payload["features"], "labels": payload["labels"], "indices": payload["indices"]}
        self.names = tuple(self._t)
        self.metadata = {}

    def tensor(self, name):
        return self._t[name]

    def shape(self, name):
        return tuple(self._t[name].shape)


def merge(shards, path, fp, dtype, split, check_complete=True, dedupe=True):
    """Writes the shards' rows to ``path`` at their sample indices, one layer at a time."""
    indices = [s.tensor("indices").long() for s in shards]
    n = sum(len(i) for i in indices)
    if check_complete:
        seen = torch.zeros(n, dtype=torch.int64)
        for i in indices:
            seen.index_add_(0, i.clamp(0, n - 1), torch.ones_like(i))
        if len(indices) and (not torch.equal(seen, torch.ones(n, dtype=torch.int64))):
            raise RuntimeError(f"{path}: the shards do not hold every sample exactly once")
    layers = [name for name in shards[0].names if name not in ("labels", "indices")]
    aliases = find_aliases(shards, layers) if dedupe else {}
    stored = sorted((name for name in layers if name not in aliases), key=layers.index)
    specs = {name: (DTYPES[dtype], (n, *shards[0].shape(name)[1:])) for name in stored}
    specs.update(labels=(torch.int64, (n,)), indices=(torch.int64, (n,)))

    def produce(name):
        if name == "indices" and check_complete:
            return torch.arange(n)
        if len(shards) == 1 and (not check_complete or torch.equal(indices[0], torch.arange(n))):
            return shards[0].tensor(name).to(specs[name][0])  # in sample order already: no copy
        out = torch.empty(specs[name][1], dtype=specs[name][0])
        for s, idx in zip(shards, indices):
            out[idx] = s.tensor(name).to(out.dtype)
        return out

    metadata = {"split": split, "num_samples": n, "dtype": dtype, "layers": layers, "fingerprint": fp,
                "aliases": {a: {"of": of, "shape": list(shards[0].shape(a)[1:])} for a, of in aliases.items()}}
    store.write(path, specs, produce, metadata)
    if check_complete:
        logging.info("Features of %s written to %s: %s", split, path,
                     {name: specs[name][1] for name in stored} | {a: f"alias of {o}" for a, o in aliases.items()})


def find_aliases(shards, layers):
    """``{alias: stored}`` for layers whose values equal an earlier-kept layer's (flattened)."""
    aliases, kept = {}, []
    per_sample = lambda n: int(torch.tensor(shards[0].shape(n)[1:]).prod())
    for name in sorted(layers, key=lambda n: (len(shards[0].shape(n)), layers.index(n))):
        for other in kept:
            if per_sample(other) == per_sample(name) and all(
                    torch.equal(s.tensor(name).reshape(len(s.tensor(name)), -1),
                                s.tensor(other).reshape(len(s.tensor(other)), -1)) for s in shards):
                aliases[name] = other
                break
        else:
            kept.append(name)
    return aliases


def load(directory, split, names=None) -> Features:
    """The cached split, memory-mapped: ``features`` {layer: N×...} (aliases resolved), labels, indices."""
    path = path_of(directory, split)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no cached features {path}; extract them first (run an evaluation "
                                "config without eval.features_from, or set extract.features)")
    reader = store.Reader(path)
    meta = reader.metadata
    names = tuple(names or meta["layers"])
    missing = [n for n in names if n not in meta["layers"]]
    if missing:
        raise ValueError(f"{path} has no layer(s) {missing}; it has {meta['layers']}. Fix: extract them "
                         f"(extract.features={tuple(names)!r}) or evaluate eval.layers among those.")
    feats = {}
    for name in names:
        alias = meta["aliases"].get(name)
        if alias:
            feats[name] = reader.tensor(alias["of"]).reshape(-1, *alias["shape"])
        else:
            feats[name] = reader.tensor(name)
    return Features(feats, reader.tensor("labels"), reader.tensor("indices"), meta)
