"""The same runs on CUDA: fp16 with loss scaling, bf16, and the compiled linear evaluation.

Skipped where no GPU is present (CI has none); on a GPU machine: `python -m pytest -q tests/test_cuda.py`.
"""
import json

import pytest
import torch

from test_main import main

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_mixed_precision_supervised_on_cuda(tmp_path, dtype):
    main(tmp_path, "--config.total_steps=12", "--config.log_steps=1", f"--config.precision.dtype={dtype}",
         "--config.compile=True", "--config.compile_min_images=0",
         config="configs/supervised.py")
    lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]
    assert len(lines) == 12 and all(l["loss"] == l["loss"] for l in lines)
    saved = torch.load(sorted((tmp_path / "checkpoints").glob("ckpt_*.pt"))[-1], weights_only=True)
    assert all(t.dtype == torch.float32 and t.device.type == "cpu" for t in saved["params"].values())
    if dtype == "fp16":
        assert saved["scaler"]["scale"] > 0 and "loss_scale" in lines[-1]


def test_compiled_linear_eval_on_cuda(tmp_path):
    main(tmp_path, "--config.total_steps=20", "--config.compile=True", "--config.compile_min_images=0")
    results = json.loads((tmp_path / "results.json").read_text())["heads"]
    assert all(0 <= r["top1"] <= 100 for r in results.values())
