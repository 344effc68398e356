"""What cached features depend on, stored with them and checked before they are used.

A fingerprint is a flat dict of the config keys that change the feature values (trunk, data,
eval transforms) plus ``trunk_sha256``, the checksum of the trunk's weights as they were when
the features were computed (loaded from a file, randomly initialised or trained: all the same
here), and ``data.train`` / ``data.test``, what the splits held (fpipe.data.identity: a folder
that gained or lost images since). A protocol that reads a cache made by another model, weights
or data would print a wrong number; :func:`check` refuses instead and names the keys that differ.
"""
import hashlib
import json

from fpipe import tree
from fpipe.data import config as data_config
from fpipe.data import identity
from fpipe.train import precision

# data keys that do not change the features of the evaluation transforms
_DATA_IGNORED = ("batch_size", "eval_batch_size", "num_workers", "worker_niceness", "train_transforms", "seed",
                 "views", "eval_views")  # features are of the one evaluation view


def of(config, params, model_state, dataset) -> dict:
    """The fingerprint of features of ``dataset``'s train and test splits computed with ``config``
    from this model's trunk."""
    # the trunk as named (unset options mean the preset's defaults; the weights checksum below
    # covers every shape, so two spellings of one architecture differ only by name here)
    fp = {f"model.trunk.{k}": v for k, v in config.model.trunk.items() if v is not None}
    data = config.data
    for key in data_config.default_config():
        if key not in _DATA_IGNORED or (key == "seed" and data_config.get(data, "name") == "synthetic"):
            fp[f"data.{key}"] = data_config.get(data, key)
    autocast = precision.DTYPES.get(precision.dtype_name(config.get("precision")))
    if autocast is not None:  # features computed under autocast are not float32 ones (float32: no key,
        fp["precision.dtype"] = str(autocast).removeprefix("torch.")  # as before config.precision counted)
    fp["trunk_sha256"] = checksum({**tree.flatten(params.get("trunk", {})),
                                   **tree.flatten(model_state.get("trunk", {}))})
    fp["data.train"], fp["data.test"] = (identity.split_digest(split, dataset.classes)
                                         for split in (dataset.train, dataset.test))
    return json.loads(json.dumps(fp))  # tuples -> lists, as read back from a file


def checksum(flat: dict) -> str:
    """sha256 over names, dtypes, shapes and bytes of a flat dict of tensors, in name order."""
    h = hashlib.sha256()
    for name in sorted(flat):
        h.update(f"{name}|".encode())
        identity.update(h, flat[name])
    return h.hexdigest()


def short(fp: dict) -> str:
    """A 12-character id of a whole fingerprint, for provenance lines."""
    return hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:12]


def differences(stored: dict, current: dict) -> list:
    """``key: stored -> current`` for every key that differs (or exists on one side only)."""
    keys = sorted(set(stored) | set(current))
    return [f"{k}: {stored.get(k, '<absent>')!r} (cache) vs {current.get(k, '<absent>')!r} (this run)"
            for k in keys if stored.get(k, "<absent>") != current.get(k, "<absent>")]


def check(stored: dict, current: dict, where: str):
    """Raises unless ``stored`` (the cache's) equals ``current`` (this run's)."""
    diff = differences(stored, current)
    if diff:
        hint = (" trunk_sha256 differs: the trunk's weights are not the ones the cache was made with "
                "(model.weights.path, seed, or training)." if any(d.startswith("trunk_sha256") for d in diff) else "")
        if any(d.startswith(("data.train:", "data.test:")) for d in diff):
            hint += (" The splits hold other images, labels or classes than when the cache was made (or it "
                     "predates fpipe recording them).")
        raise ValueError(f"cached features in {where} were made by another model, weights or data; they "
                         f"differ in: {'; '.join(diff)}.{hint} Fix: run with the same settings as the "
                         "extraction, or extract anew (drop eval.features_from, or use a fresh --workdir).")
