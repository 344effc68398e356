"""Cost of ``load_into`` over a bare ``torch.load(weights_only=True)`` of the same file.

    python benchmarks/load_weights.py [--repeats 7]

Writes a ResNet-50 MoCo v2 checkpoint (seeded weights: encoder_q, encoder_k, queue) to a temp
dir, then times, alternately, a bare load (with and without mmap) and the full load (read with
mmap, detect, choose the copy, merge into a ResNet-50 target with a report). Prints medians,
``ratio_vs_torch_load`` (target <= 1.5) and the like-for-like ``ratio_vs_torch_load_mmap``.
"""
import argparse
import importlib.util
import statistics
import tempfile
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere
from fpipe.weights import load_into  # noqa: E402

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"


def seeded_resnet50(seed: int) -> dict:
    spec = importlib.util.spec_from_file_location("seeded", REFERENCE / "seeded.py")
    seeded = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(seeded)
    return seeded.seeded_state_dict(seeded.load_manifest("resnet50"), seed)


def moco_checkpoint(q: dict, k: dict) -> dict:
    def projector(prefix):
        return {f"{prefix}fc.0.weight": torch.randn(2048, 2048), f"{prefix}fc.0.bias": torch.zeros(2048),
                f"{prefix}fc.2.weight": torch.randn(128, 2048), f"{prefix}fc.2.bias": torch.zeros(128)}
    trunk = lambda sd: {n: t for n, t in sd.items() if not n.startswith("fc.")}
    state = {**{f"module.encoder_q.{n}": t for n, t in trunk(q).items()}, **projector("module.encoder_q."),
             **{f"module.encoder_k.{n}": t for n, t in trunk(k).items()}, **projector("module.encoder_k."),
             "module.queue": torch.randn(128, 65536), "module.queue_ptr": torch.zeros(1, dtype=torch.long)}
    return {"epoch": 200, "arch": "resnet50", "state_dict": state,
            "optimizer": {"state": {}, "param_groups": [{"lr": 0.03}]}}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    q, k = seeded_resnet50(0), seeded_resnet50(1)
    target = {f"trunk.{n}": torch.zeros_like(t) for n, t in q.items() if not n.startswith("fc.")}
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "moco_v2_resnet50.pth.tar")
        torch.save(moco_checkpoint(q, k), path)
        bare, bare_mmap, full = [], [], []
        load_into(target, {"path": path})  # warm the page cache and imports
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            obj = torch.load(path, map_location="cpu", weights_only=True)
            bare.append(time.perf_counter() - t0)
            del obj
            t0 = time.perf_counter()
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            bare_mmap.append(time.perf_counter() - t0)
            del obj
            t0 = time.perf_counter()
            loaded, report = load_into(target, {"path": path})
            full.append(time.perf_counter() - t0)
        assert all(torch.equal(loaded[n], q[n[len("trunk."):]]) for n in target if "tracked" not in n)
        size = Path(path).stat().st_size
    print(f"file: ResNet-50 MoCo v2 layout, {size / 2**20:.0f} MiB; repeats: {args.repeats}")
    print(f"torch_load_median_s: {statistics.median(bare):.4f}")
    print(f"load_into_median_s: {statistics.median(full):.4f}")
    print(f"trunk: {report.trunk_loaded}/{report.trunk_total} from {report.source}")
    print(f"torch_load_mmap_median_s: {statistics.median(bare_mmap):.4f}")
    print(f"ratio_vs_torch_load_mmap: {statistics.median(full) / statistics.median(bare_mmap):.2f}"
          "  (load_into reads with mmap; this is the like-for-like cost of detection and merge)")
    print(f"ratio_vs_torch_load: {statistics.median(full) / statistics.median(bare):.2f}")


if __name__ == "__main__":
    main()
