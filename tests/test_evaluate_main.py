"""Evaluation runs through main.py: outputs, resume, cached features, refusal of a foreign cache,
and torchrun (2 gloo processes: one set of feature files, the same numbers as one process)."""
import json
import os

import numpy as np
import pytest
from safetensors.numpy import load_file

from test_torchrun import torchrun

SMALL = ["--config.data.name=synthetic", "--config.data.num_train=240", "--config.data.num_test=80",
         "--config.data.num_classes=6", "--config.data.image_size=16", "--config.data.eval_batch_size=64",
         "--config.extract.features=('res4', 'res5avg', 'flatten')",
         "--config.eval.protocols=('knn', 'linear', 'logreg', 'low_shot')",
         "--config.eval.knn.ks=(5, 20)", "--config.eval.linear.epochs=4",
         "--config.eval.linear.lrs=(0.01, 0.1, 1.0)", "--config.eval.linear.wds=(0.0, 0.001)",
         "--config.eval.logreg.Cs=(0.1, 1.0)", "--config.eval.low_shot.shots=(1, 5)",
         "--config.eval.low_shot.seeds=(0, 1)"]


def run(workdir, *extra, nproc=1, check=True):
    cmd = ["--config=configs/knn.py", f"--workdir={workdir}", *SMALL, *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = torchrun(nproc, cmd, env)
    if check:
        assert proc.returncode == 0, f"{cmd}:\n{proc.stderr[-4000:]}"
    return proc


def results(workdir):
    return json.loads((workdir / "results.json").read_text())


@pytest.fixture(scope="module")
def one(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("one")
    proc = run(workdir)
    return workdir, proc


def test_run_writes_features_results_table_and_plot(one):
    workdir, proc = one
    r = results(workdir)
    assert set(r["protocols"]) == {"knn", "linear", "logreg", "low_shot"}
    for protocol, per_layer in r["protocols"].items():
        assert set(per_layer) == {"res4", "res5avg", "flatten"}, protocol
    assert set(r["protocols"]["knn"]["flatten"]) == {"k=5", "k=20"}
    assert r["protocols"]["linear"]["res4"]["top1"] > 50  # 6 learnable classes: chance is 17
    prov = r["provenance"]
    assert prov["splits"] == {"train": 240, "of which val": 48, "test": 80} and prov["config_path"].endswith("knn.py")
    features = prov["features_fingerprint"]
    assert features["data.name"] == "synthetic" and len(features["trunk_sha256"]) == 64
    assert len(prov["fingerprint"]) == 12 and prov["weights"] is None  # random init: no weights file
    # res5avg and flatten are the same values: stored once, both evaluated, the same numbers
    assert r["protocols"]["knn"]["res5avg"] == r["protocols"]["knn"]["flatten"]
    arrays = load_file(str(workdir / "features" / "train.safetensors"))
    assert set(arrays) == {"res4", "flatten", "labels", "indices"} and arrays["flatten"].shape == (240, 512)
    table = (workdir / "results.md").read_text()
    assert "| res4 |" in table and "kNN k=20" in table and table.split("\n")[0] in proc.stdout
    assert (workdir / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "RANDOM initialisation" in proc.stderr


def test_rerun_reuses_the_features_and_a_cache_serves_another_workdir(one, tmp_path):
    workdir, _ = one
    again = run(workdir)
    assert again.stderr.count("not recomputed") == 2
    cached = run(tmp_path / "cached", f"--config.eval.features_from={workdir}")
    assert "the trunk does not run" in cached.stderr and not (tmp_path / "cached" / "features").exists()
    assert results(tmp_path / "cached")["protocols"] == results(workdir)["protocols"]


def test_a_cache_of_another_trunk_is_refused_naming_what_differs(one, tmp_path):
    workdir, _ = one
    proc = run(tmp_path / "other", f"--config.eval.features_from={workdir}", "--config.seed=1",
               "--config.data.image_size=24", check=False)
    assert proc.returncode != 0 and "made by another model" in proc.stderr
    assert "trunk_sha256" in proc.stderr and "data.image_size: 16 (cache) vs 24 (this run)" in proc.stderr


def test_two_processes_write_one_set_of_files_and_give_the_same_results(one, tmp_path):
    workdir, _ = one
    run(tmp_path, nproc=2)
    assert sorted(p.name for p in (tmp_path / "features").iterdir()) == ["test.safetensors", "train.safetensors"]
    for split in ("train", "test"):
        a, b = (load_file(str(d / "features" / f"{split}.safetensors")) for d in (workdir, tmp_path))
        for name in a:
            np.testing.assert_allclose(b[name], a[name], rtol=1e-5, atol=1e-5, err_msg=name)
    r1, r2 = results(workdir), results(tmp_path)
    assert r2["provenance"]["world_size"] == 2
    assert r2["protocols"]["knn"] == r1["protocols"]["knn"]  # exact: the same neighbours
    for protocol in ("linear", "logreg"):
        for layer, m in r1["protocols"][protocol].items():
            for key in ("top1", "top5", "mean_per_class"):  # rounding may move a sample or two
                assert abs(r2["protocols"][protocol][layer][key] - m[key]) <= 100 * 2 / 80 + 1e-9, (protocol, layer)


def test_low_shot_knn_votes_on_the_raw_features_over_at_most_k_neighbours(one, tmp_path):
    """dinov2's few-shot kNN: L2-normalised raw features (not the standardised ones logreg gets),
    DINO's exp(sim / T) vote over min(k_nn, shots) neighbours; checked by hand on the cached features."""
    import torch
    from fpipe.evaluate import metrics

    workdir, _ = one
    run(tmp_path / "shots", f"--config.eval.features_from={workdir}", "--config.eval.protocols=('low_shot',)",
        "--config.eval.low_shot.classifier=knn", "--config.eval.layers=('flatten',)")
    got = results(tmp_path / "shots")["protocols"]["low_shot"]["flatten"]
    train, test = (load_file(str(workdir / "features" / f"{split}.safetensors")) for split in ("train", "test"))
    unit = lambda a: torch.nn.functional.normalize(torch.from_numpy(a).double(), dim=1)
    bank_all, queries = unit(train["flatten"]), unit(test["flatten"])
    train_y, test_y = torch.from_numpy(train["labels"]).long(), torch.from_numpy(test["labels"]).long()
    for shots in (1, 5):
        accuracies = []
        for seed in (0, 1):
            chosen = metrics.per_class_sample(train_y, shots, seed)
            top = (queries @ bank_all[chosen].T).topk(min(20, shots), dim=1)
            votes = torch.zeros(len(queries), 6, dtype=torch.float64).scatter_add_(
                1, train_y[chosen][top.indices], (top.values / 0.07).exp())
            accuracies.append(100 * (votes.argmax(1) == test_y).double().mean().item())
        assert abs(got[f"k={shots}"]["top1"] - np.mean(accuracies)) < 1e-6, (shots, got, accuracies)
