"""Feature files: safetensors that numpy reads, shards merged in index order, aliases, resume, fingerprints."""
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from fpipe.evaluate import extract, fingerprint, store
from fpipe.train import distributed

FP = {"model.trunk.depth": 18, "data.name": "digits", "trunk_sha256": "abc"}


def payload(indices, seed=0, d=6):
    g = torch.Generator().manual_seed(seed)
    idx = torch.as_tensor(indices)
    flat = torch.randn(len(idx), d, generator=g) + idx[:, None]  # rows identifiable by index
    return {"features": {"res5avg": flat[:, :, None, None].clone(), "flatten": flat,
                         "res4": torch.randn(len(idx), 2, 2, 2, generator=g)},
            "labels": idx % 3, "indices": idx}


def test_written_file_is_plain_safetensors_that_numpy_reads(tmp_path):
    p = payload(range(5))
    extract.write(str(tmp_path), "train", p, distributed.Dist(), FP)
    arrays = load_file(str(tmp_path / "features" / "train.safetensors"))  # no torch involved
    assert set(arrays) == {"flatten", "res4", "labels", "indices"}      # res5avg is an alias
    np.testing.assert_array_equal(arrays["flatten"], p["features"]["flatten"].numpy())
    np.testing.assert_array_equal(arrays["res4"], p["features"]["res4"].numpy())
    np.testing.assert_array_equal(arrays["labels"], p["labels"].numpy())
    loaded = extract.load(str(tmp_path), "train")
    assert loaded.metadata["aliases"] == {"res5avg": {"of": "flatten", "shape": [6, 1, 1]}}
    assert loaded.metadata["fingerprint"] == FP
    for name, t in p["features"].items():
        assert torch.equal(loaded.features[name], t), name


def test_float16_storage_halves_the_file_and_rounds_like_torch(tmp_path):
    p = payload(range(8))
    extract.write(str(tmp_path / "a"), "test", p, distributed.Dist(), FP, dtype="float16")
    loaded = extract.load(str(tmp_path / "a"), "test", ("flatten",))
    assert loaded.features["flatten"].dtype == torch.float16
    assert torch.equal(loaded.features["flatten"], p["features"]["flatten"].half())
    arrays = load_file(str(tmp_path / "a" / "features" / "test.safetensors"))
    assert arrays["res4"].dtype == np.float16


def test_shards_merge_in_sample_index_order_with_every_sample_once(tmp_path):
    """Rank shards as the eval loader deals them (interleaved slices of each global batch)."""
    full = payload(range(10))
    shards = []
    for rank, rows in enumerate(([0, 1, 4, 5, 8], [2, 3, 6, 7, 9])):
        part = {"features": {n: t[rows] for n, t in full["features"].items()},
                "labels": full["labels"][rows], "indices": full["indices"][rows]}
        path = str(tmp_path / f"shard{rank}.safetensors")
        extract.merge([extract._Payload(part)], path, FP, "float32", "train", check_complete=False, dedupe=False)
        shards.append(store.Reader(path))
    out = str(tmp_path / "merged.safetensors")
    extract.merge(shards, out, FP, "float32", "train")
    arrays = load_file(out)
    np.testing.assert_array_equal(arrays["indices"], np.arange(10))
    np.testing.assert_array_equal(arrays["flatten"], full["features"]["flatten"].numpy())
    with pytest.raises(RuntimeError, match="exactly once"):
        extract.merge(shards[:1] * 2, str(tmp_path / "bad.safetensors"), FP, "float32", "train")


def test_a_finished_split_is_reused_and_a_different_model_is_refused_naming_the_keys(tmp_path):
    extract.write(str(tmp_path), "train", payload(range(4)), distributed.Dist(), FP)
    assert extract.is_done(str(tmp_path), "train", FP, ("flatten", "res5avg"))
    assert not extract.is_done(str(tmp_path), "train", FP, ("res3",))  # a layer it lacks: redo
    assert not extract.is_done(str(tmp_path), "test", FP, ("flatten",))
    other = {**FP, "model.trunk.depth": 50, "trunk_sha256": "def"}
    with pytest.raises(ValueError, match=r"model\.trunk\.depth: 18 \(cache\) vs 50.*trunk_sha256"):
        extract.is_done(str(tmp_path), "train", other, ("flatten",))


def test_missing_layer_is_an_error_listing_the_cached_ones(tmp_path):
    extract.write(str(tmp_path), "train", payload(range(4)), distributed.Dist(), FP)
    with pytest.raises(ValueError, match="no layer.*res2.*flatten"):
        extract.load(str(tmp_path), "train", ("res2",))


def test_fingerprint_checksum_sees_every_weight_and_buffer():
    params = {"trunk": {"conv1": {"weight": torch.ones(2, 2)}}}
    state = {"trunk": {"bn1": {"running_mean": torch.zeros(2), "num_batches_tracked": torch.tensor(3)}}}
    base = fingerprint.checksum({"a": torch.ones(2, 2), "b": torch.tensor(3)})
    assert base == fingerprint.checksum({"b": torch.tensor(3), "a": torch.ones(2, 2)})
    assert base != fingerprint.checksum({"a": torch.ones(2, 2), "b": torch.tensor(4)})
    assert base != fingerprint.checksum({"a": torch.ones(4), "b": torch.tensor(3)})
    from fpipe import data
    from fpipe.evaluate import config as eval_config
    cfg = eval_config.run_config(("knn",))
    split = lambda n: data.TensorSplit(torch.zeros(n, 1, 2, 2, dtype=torch.uint8), torch.arange(n) % 2)
    dataset = data.Dataset("tiny", ("a", "b"), split(4), split(2))
    fp = fingerprint.of(cfg, params, state, dataset)
    assert fp["model.trunk.name"] == "resnet18" and "model.trunk.depth" not in fp and fp["data.image_size"] == 32 and "data.batch_size" not in fp
    assert fp["data.train"].startswith("4 samples, sha256 ") and fp["data.test"].startswith("2 samples")
    grown = fingerprint.of(cfg, params, state, data.Dataset("tiny", ("a", "b"), split(5), split(2)))
    assert fingerprint.differences(fp, grown) == [f"data.train: {fp['data.train']!r} (cache) vs "
                                                  f"{grown['data.train']!r} (this run)"]
    state["trunk"]["bn1"]["running_mean"] += 1
    assert fingerprint.of(cfg, params, state, dataset)["trunk_sha256"] != fp["trunk_sha256"]
    assert "precision.dtype" not in fp  # float32: no key
    cfg.precision.dtype = "bfloat16"
    assert fingerprint.of(cfg, params, state, dataset)["precision.dtype"] == "bfloat16"


def test_extraction_runs_the_model_under_the_configs_autocast_and_keeps_float32():
    """config.precision reaches feature extraction (bf16 on a GPU: the trunk at bf16 speed); the
    features are stored as float32 either way."""
    from fpipe import data
    split = data.TensorSplit(torch.randint(0, 256, (6, 3, 8, 8), dtype=torch.uint8), torch.arange(6) % 2)
    c = data.default_config()
    c.update(dict(batch_size=4, eval_batch_size=4, image_size=8))
    loader, seen = data.Loader(split, c, train=False), []

    def features_fn(p, s, images, names):
        seen.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)
        return {"x": images.flatten(1) @ torch.linspace(-1, 1, 192 * 3).reshape(192, 3)}

    amp = extract.extract(features_fn, {}, {}, loader, ("x",), lambda b: b, torch.bfloat16)["features"]["x"]
    fp32 = extract.extract(features_fn, {}, {}, loader, ("x",), lambda b: b)["features"]["x"]
    assert seen == [torch.bfloat16] * 2 + [None] * 2
    assert amp.dtype == fp32.dtype == torch.float32 and not torch.equal(amp, fp32)
    torch.testing.assert_close(amp, fp32, rtol=2e-2, atol=0.5)


def test_extraction_with_head_outputs_matches_the_models_own_forward(tmp_path):
    """extract.run on a tiny synthetic set: trunk features and heads.<name> as model.apply gives them."""
    from fpipe import data
    from fpipe.evaluate import config as eval_config
    from fpipe.models import model as models
    cfg = eval_config.run_config(("knn",))
    cfg.data.update(name="synthetic", num_train=12, num_test=6, num_classes=3, image_size=16, eval_batch_size=5)
    cfg.model.heads.fc = models.head_config("flatten", "linear")
    cfg.extract.update(features=("res4",), heads=True, dtype="float32")
    ds = data.build(cfg.data)
    model = models.build(cfg.model, num_classes=3, image_size=16)
    params, state = model.init(0)
    fp = extract.run(cfg, str(tmp_path), model, params, state, ds, distributed.Dist(), lambda b: b)
    test = extract.load(str(tmp_path), "test")
    assert set(test.features) == {"res4", "heads.fc"} and test.metadata["fingerprint"] == fp
    batch = next(data.Loader(  # the first 5 test samples, as the loader prepares them
        ds.test, cfg.data, train=False).epoch(0))
    logits, _ = model.apply(params, state, batch["image"], train=False)
    torch.testing.assert_close(test.features["heads.fc"][:5], logits["fc"], rtol=1e-4, atol=1e-5)
    assert test.labels.tolist() == [ds.test[i][1] for i in range(6)]


def test_extraction_runs_the_trunk_as_eval_features_once_with_the_runs_compile_choice(tmp_path, monkeypatch):
    """extract.run hands its ``compile`` and ``cache`` to frozen_trunk.eval_features, built once for
    both splits at the loader's batch size; with both splits on disk nothing is built at all."""
    from fpipe import data
    from fpipe.evaluate import config as eval_config
    from fpipe.models import model as models
    from fpipe.train import frozen_trunk
    cfg = eval_config.run_config(("knn",))
    cfg.data.update(name="synthetic", num_train=12, num_test=6, num_classes=3, image_size=16, eval_batch_size=5)
    ds = data.build(cfg.data)
    model = models.build(cfg.model, num_classes=3, image_size=16)
    params, state = model.init(0)
    built, real = [], frozen_trunk.eval_features
    monkeypatch.setattr(frozen_trunk, "eval_features",
                        lambda *a, **k: built.append(k) or real(*a, **{**k, "compile": False}))
    cache = (str(tmp_path / "cache"), "key")
    extract.run(cfg, str(tmp_path), model, params, state, ds, distributed.Dist(), lambda b: b, compile=True, cache=cache)
    assert [(k["compile"], k["cache"], k["batch_size"]) for k in built] == [(True, cache, 5)]
    extract.run(cfg, str(tmp_path), model, params, state, ds, distributed.Dist(), lambda b: b, compile=True, cache=cache)
    assert len(built) == 1


def test_one_payload_out_of_sample_order_is_written_in_sample_order(tmp_path):
    """A single payload already in sample order is written as it is (no copy); one that is not is
    put in order, rows with their labels."""
    p = payload([3, 0, 4, 1, 2])
    extract.write(str(tmp_path), "train", p, distributed.Dist(), FP)
    loaded = extract.load(str(tmp_path), "train")
    order = torch.tensor([1, 3, 4, 0, 2])  # where sample i sits in the payload
    assert loaded.indices.tolist() == [0, 1, 2, 3, 4] and loaded.labels.tolist() == [0, 1, 2, 0, 1]
    for name in ("flatten", "res4"):
        assert torch.equal(loaded.features[name], p["features"][name][order]), name


def test_extraction_keeps_each_layer_once_in_sample_rows(tmp_path):
    """extract() fills one tensor per layer as batches come (padding rows dropped), the same rows
    a concatenation would give."""
    from fpipe import data
    split = data.TensorSplit(torch.randint(0, 256, (7, 3, 4, 4), dtype=torch.uint8), torch.arange(7) % 3)
    c = data.default_config()
    c.update(dict(batch_size=3, eval_batch_size=3, image_size=4))
    loader = data.Loader(split, c, train=False)
    out = extract.extract(lambda p, s, images, names: {"x": images.flatten(1)[:, :5], "y": images.mean((2, 3))},
                          {}, {}, loader, ("x", "y"), lambda b: b)
    assert out["indices"].tolist() == list(range(7)) and out["features"]["x"].shape == (7, 5)
    assert out["features"]["y"].shape == (7, 3) and out["labels"].tolist() == [i % 3 for i in range(7)]
    batches = [b["image"][b["mask"]] for b in data.Loader(split, c, train=False).epoch(0)]
    assert torch.equal(out["features"]["x"], torch.cat(batches).flatten(1)[:, :5])
    assert torch.equal(out["features"]["y"], torch.cat(batches).mean((2, 3)))
