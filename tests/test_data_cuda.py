"""The loader's accelerator path: uint8 batches normalised on the device, copied one batch ahead.

Skipped without CUDA. Batches must equal the CPU loader's exactly (the same float operations).
"""
import pytest
import torch

from fpipe import data

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("workers", [0, 2])
def test_device_batches_equal_cpu_batches(workers):
    g = torch.Generator().manual_seed(0)
    split = data.TensorSplit(torch.randint(0, 256, (40, 3, 12, 12), dtype=torch.uint8,
                                           generator=g), torch.arange(40) % 5)
    c = data.default_config()
    c.update(dict(batch_size=8, eval_batch_size=16, num_workers=workers, image_size=8,
                  train_transforms="random_resized_crop|flip|normalize"))
    for train in (True, False):
        cpu = list(data.Loader(split, c, train=train).epoch(1))
        gpu = list(data.Loader(split, c, train=train, device="cuda").epoch(1))
        assert len(cpu) == len(gpu)
        for a, b in zip(cpu, gpu):
            assert b["image"].device.type == "cuda" and b["image"].dtype == torch.float32
            for k in a:
                diff = (a[k].double() - b[k].cpu().double()).abs()
                assert torch.equal(a[k], b[k].cpu()), f"{k}: {int((diff > 0).sum())} values differ, max {diff.max()}"
