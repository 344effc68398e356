"""The detection run (main.py) under 2 gloo processes on the CPU, as torchrun starts it: the ranks'
gradients are averaged, so after the steps both hold bit-identical params (each trained on its own
half of every batch); rank 0 alone writes the checkpoint, metrics and results."""
import json
import os
import subprocess
import sys

import torch

from test_detection_train import ROOT, TINY
from test_torchrun import free_port

HERE = os.path.dirname(os.path.abspath(__file__))


def test_two_processes_hold_identical_params_and_rank_0_writes_once(tmp_path):
    spy, workdir = tmp_path / "spy", tmp_path / "run"
    spy.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           "--master_addr=127.0.0.1", os.path.join(HERE, "_detection_dist.py"), "--config=configs/detection.py",
           f"--workdir={workdir}", *TINY, "--config.total_steps=3", "--config.ckpt_steps=3", "--config.log_steps=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "FPIPE_TEST_SPY_DIR": str(spy)}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, f"{cmd}:\n{proc.stderr[-5000:]}"

    ranks = [torch.load(spy / f"rank{r}_step3.pt", weights_only=True) for r in (0, 1)]
    assert sorted(p.name for p in spy.iterdir()) == ["rank0_step3.pt", "rank1_step3.pt"]
    for part in ("trainable", "model_state"):
        assert ranks[0][part].keys() == ranks[1][part].keys()
        different = [n for n, t in ranks[0][part].items() if not torch.equal(t, ranks[1][part][n])]
        assert not different, f"{part} differ between the ranks: {different[:5]}"
    # the ranks trained (each on its own half of the batch): the params moved away from the init
    ckpt = torch.load(workdir / "checkpoints" / "ckpt_00000003.pt", weights_only=True)
    assert all(torch.equal(ckpt["params"][n], t) for n, t in ranks[0]["trainable"].items())
    sys.path.insert(0, str(ROOT))
    from configs import detection
    from fpipe.detection import model as det_model, train
    init, _ = det_model.build(train.model_config(detection.get_config().model.detection), 4).init(0)  # 3 shapes + bg
    cls = init["roi_heads"]["box_predictor"]["cls_score"]["weight"]
    assert not torch.equal(ranks[0]["trainable"]["roi_heads.box_predictor.cls_score.weight"], cls)

    # rank 0 writes once: one checkpoint, one metrics line per step, results of 2 processes
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["ckpt_00000003.pt", "last.pt"]
    lines = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines if "loss" in l] == [1, 2, 3]
    results = json.loads((workdir / "results.json").read_text())
    assert results["world_size"] == 2 and results["step"] == 3 and "AP" in results["heads"]["bbox"]

