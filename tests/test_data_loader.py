"""Tests for fpipe.data.loader: rank sharding, exact evaluation, resume, determinism."""
import os

import ml_collections
import pytest
import torch

from fpipe import data

N = 50


def split(n=N, size=4):
    """Image i is filled with i (uint8), label i % 7: a batch shows which samples it holds."""
    images = torch.arange(n, dtype=torch.uint8)[:, None, None, None].expand(n, 3, size, size)
    return data.TensorSplit(images.contiguous(), torch.arange(n) % 7)


def cfg(**overrides):
    c = data.default_config()
    c.update(dict(batch_size=8, eval_batch_size=8, train_transforms="", eval_transforms=""))
    c.update(overrides)
    return c


def batches(loader, epoch=0, start_step=0):
    return list(loader.epoch(epoch, start_step))


def test_batch_format_and_content():
    b = next(iter(data.Loader(split(), cfg(), train=True).epoch(0)))
    assert set(b) == {"image", "label", "index"}
    assert b["image"].dtype == torch.float32 and b["image"].shape == (8, 3, 4, 4)
    assert b["label"].dtype == torch.int64
    # uint8 pixel value i became i / 255; the label is that sample's.
    assert torch.equal(b["image"][:, 0, 0, 0] * 255, b["index"].float())
    assert torch.equal(b["label"], b["index"] % 7)
    e = next(iter(data.Loader(split(), cfg(), train=False).epoch()))
    assert e["mask"].dtype == torch.bool and e["mask"].all()


def test_two_ranks_concatenate_to_the_global_batch():
    one = batches(data.Loader(split(), cfg(), train=True, seed=3), epoch=1)
    shards = [batches(data.Loader(split(), cfg(), train=True, rank=r, world_size=2, seed=3),
                      epoch=1) for r in range(2)]
    assert len(one) == len(shards[0]) == len(shards[1]) == N // 8
    for step, whole in enumerate(one):
        for key in ("image", "label", "index"):
            joined = torch.cat([shards[0][step][key], shards[1][step][key]])
            assert torch.equal(joined, whole[key])
    seen = torch.cat([b["index"] for b in one])
    assert len(set(seen.tolist())) == len(seen) == (N // 8) * 8  # drop_last: 2 left out


def test_train_drop_last_and_batch_size_errors():
    loader = data.Loader(split(), cfg(batch_size=16), train=True, rank=1, world_size=4)
    assert loader.steps_per_epoch == 3 and loader.local_batch_size == 4
    assert all(len(b["label"]) == 4 for b in loader.epoch(0))
    with pytest.raises(ValueError, match="multiple of world_size=3"):
        data.Loader(split(), cfg(batch_size=16), train=True, world_size=3)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        data.Loader(split(), cfg(batch_size=64), train=True)
    with pytest.raises(ValueError, match="rank"):
        data.Loader(split(), cfg(), train=True, rank=2, world_size=2)


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("eval_batch_size", [7, 8, 64])
def test_eval_sees_every_sample_exactly_once(world_size, eval_batch_size):
    c = cfg(eval_batch_size=eval_batch_size)
    loaders = [data.Loader(split(), c, train=False, rank=r, world_size=world_size)
               for r in range(world_size)]
    assert len({l.steps_per_epoch for l in loaders}) == 1
    seen = []
    for loader in loaders:
        for b in loader.epoch():
            assert len(b["index"]) == loader.local_batch_size  # equal shapes on every rank
            seen += b["index"][b["mask"]].tolist()
    assert sorted(seen) == list(range(N))
    # Rank shards in rank order, step by step, are the split in order.
    steps = [batches(l) for l in loaders]
    order = [i for s in range(loaders[0].steps_per_epoch) for r in range(world_size)
             for i in steps[r][s]["index"][steps[r][s]["mask"]].tolist()]
    assert order == list(range(N))


def test_epochs_are_deterministic_and_differ():
    loader = data.Loader(split(), cfg(), train=True)
    order = lambda l, e: torch.cat([b["index"] for b in l.epoch(e)]).tolist()
    assert order(loader, 0) == order(loader, 0)
    assert order(loader, 0) == order(data.Loader(split(), cfg(), train=True), 0)
    assert order(loader, 0) != order(loader, 1)
    assert order(loader, 0) != order(data.Loader(split(), cfg(), train=True, seed=1), 0)
    assert order(data.Loader(split(), cfg(seed=1), train=True), 0) == \
        order(data.Loader(split(), cfg(), train=True, seed=1), 0)


AUGMENT = "random_resized_crop(4, scale=(0.2, 1))|flip|normalize"


def noisy_split(n=N):
    g = torch.Generator().manual_seed(0)
    return data.TensorSplit(torch.randint(0, 256, (n, 3, 9, 9), dtype=torch.uint8, generator=g),
                            torch.arange(n) % 7)


def test_resume_reproduces_augmented_batches():
    loader = data.Loader(noisy_split(), cfg(train_transforms=AUGMENT), train=True)
    full = batches(loader, epoch=2)
    resumed = batches(loader, epoch=2, start_step=3)
    assert len(resumed) == len(full) - 3
    for a, b in zip(full[3:], resumed):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["index"], b["index"])
    assert batches(loader, epoch=2, start_step=loader.steps_per_epoch) == []
    with pytest.raises(ValueError, match="start_step"):
        loader.epoch(0, start_step=loader.steps_per_epoch + 1)


def test_iterate_crosses_epochs_and_resumes_at_a_global_step():
    loader = data.Loader(split(), cfg(), train=True)
    spe = loader.steps_per_epoch
    stream = loader.iterate()
    first = [next(stream)["index"] for _ in range(2 * spe + 2)]
    assert torch.equal(first[spe], batches(loader, epoch=1)[0]["index"])
    resumed = loader.iterate(start_step=spe + 1)
    for expected in first[spe + 1:]:
        assert torch.equal(next(resumed)["index"], expected)


def test_augmentation_is_independent_of_world_size_and_workers():
    c = cfg(train_transforms=AUGMENT)
    images = {}
    for world_size, workers in [(1, 0), (2, 0), (1, 2), (2, 3)]:
        c.num_workers = workers
        got = {}
        for r in range(world_size):
            loader = data.Loader(noisy_split(), c, train=True, rank=r, world_size=world_size)
            for b in loader.epoch(1):
                got.update(zip(b["index"].tolist(), b["image"]))
        images[(world_size, workers)] = got
    reference = images[(1, 0)]
    for got in images.values():
        assert got.keys() == reference.keys()
        assert all(torch.equal(got[i], reference[i]) for i in reference)
    # And augmentation changes from epoch to epoch.
    again = {}
    c.num_workers = 0
    for b in data.Loader(noisy_split(), c, train=True).epoch(2):
        again.update(zip(b["index"].tolist(), b["image"]))
    assert not all(torch.equal(again[i], reference[i]) for i in reference)


def test_mixed_image_sizes_are_a_clear_error():
    class Ragged:
        labels = torch.zeros(8, dtype=torch.int64)

        def __len__(self):
            return 8

        def __getitem__(self, i):
            return torch.zeros(3, 4 + i % 2, 4, dtype=torch.uint8), 0
    loader = data.Loader(Ragged(), cfg(), train=False)
    with pytest.raises(ValueError, match="different shapes.*resize\\|center_crop"):
        next(iter(loader.epoch()))
    fixed = data.Loader(Ragged(), cfg(eval_transforms="resize(4)|center_crop(4)"), train=False)
    assert next(iter(fixed.epoch()))["image"].shape == (8, 3, 4, 4)


def test_batches_equal_the_per_image_pipeline_exactly():
    """The batched, in-place normalise gives the values of the pipeline applied image by image."""
    from fpipe.data import pipeline, rng
    c = cfg(train_transforms=AUGMENT)
    s = noisy_split()
    batch = next(iter(data.Loader(s, c, train=True, seed=4).epoch(3)))
    pipe = pipeline.parse(AUGMENT, size=c.image_size)
    expected = torch.stack([pipe(s[i][0], rng.generator("augment", 4, 3, i))
                            for i in batch["index"].tolist()])
    assert torch.equal(batch["image"], expected)
    assert not torch.equal(batch["image"][0], batch["image"][1])


def test_workers_iterate_across_epochs_like_the_caller():
    stream = lambda workers, start: data.Loader(
        noisy_split(), cfg(train_transforms=AUGMENT, num_workers=workers), train=True
    ).iterate(start)
    spe = data.Loader(noisy_split(), cfg(), train=True).steps_per_epoch
    inline, pooled = stream(0, spe - 1), stream(2, spe - 1)
    for _ in range(3):  # the last step of epoch 0, then epoch 1
        a, b = next(inline), next(pooled)
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_worker_error_is_one_clean_line():
    class Broken:
        labels = torch.zeros(8, dtype=torch.int64)

        def __len__(self):
            return 8

        def __getitem__(self, i):
            if i == 5:
                raise ValueError("cannot decode image file 'x.jpg' (bad). Fix: replace it.")
            return torch.zeros(3, 4, 4, dtype=torch.uint8), 0
    loader = data.Loader(Broken(), cfg(num_workers=2, eval_batch_size=4), train=False)
    with pytest.raises(ValueError) as error:
        list(loader.epoch())
    assert str(error.value) == "cannot decode image file 'x.jpg' (bad). Fix: replace it."


def test_workers_run_at_the_configured_priority_below_the_loop():
    class Niceness:  # every image holds the niceness of the process that read it
        labels = torch.zeros(8, dtype=torch.int64)

        def __len__(self):
            return 8

        def __getitem__(self, i):
            return torch.full((3, 4, 4), os.nice(0), dtype=torch.uint8), 0
    for niceness, workers in ((5, 2), (0, 2), (5, 0)):  # without workers: the loop's own
        loader = data.Loader(Niceness(), cfg(num_workers=workers, worker_niceness=niceness, eval_batch_size=4),
                             train=False)
        seen = {round(float(b["image"].max()) * 255) for b in loader.epoch()}
        assert seen == {min(os.nice(0) + (niceness if workers else 0), 19)}, (niceness, workers)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_batch_memory_is_reused_only_once_nothing_holds_it(num_workers):
    """Float batches are made in this process into memory recycled from dropped batches; a batch,
    a view of it or its numpy array kept by the caller is never overwritten."""
    loader = data.Loader(split(), cfg(num_workers=num_workers), train=True)
    kept, copies, pointers = [], [], set()
    for step, b in enumerate(loader.epoch(0)):
        image = b["image"]
        pointers.add(image.data_ptr())
        if step == 0:
            kept.append(image[2:4])
        elif step == 1:
            kept.append(image.numpy())
        elif step == 2:
            kept.append(b)
        else:
            continue
        copies.append(torch.as_tensor(kept[-1]["image"] if step == 2 else kept[-1]).clone())
        del b, image
    assert torch.equal(torch.as_tensor(kept[0]), copies[0])
    assert all(torch.equal(torch.as_tensor(k["image"] if isinstance(k, dict) else k), c)
               for k, c in zip(kept, copies))
    assert len(pointers) < loader.steps_per_epoch  # dropped batches' memory came back
    assert torch.equal(torch.cat([b["image"] for b in batches(loader)]),
                       torch.cat([b["image"].clone() for b in loader.epoch(0)]))


def test_the_loop_asks_for_batches_on_the_gpu_except_multi_crop():
    """On a CUDA device the loop's loaders copy batches ahead to it; multi-crop batches (views)
    stay on the host (the loader refuses them on the device). Nothing touches CUDA here."""
    from fpipe.train import distributed, loop
    split = data.TensorSplit(torch.zeros(8, 3, 8, 8, dtype=torch.uint8), torch.arange(8) % 2)
    config = ml_collections.ConfigDict({"data": data.default_config()})
    config.data.update(batch_size=4, image_size=8)
    gpu, cpu = distributed.Dist(device=torch.device("cuda")), distributed.Dist()
    assert loop.make_loader(split, config, gpu, train=True).device == torch.device("cuda")
    assert loop.make_loader(split, config, gpu, train=False).device == torch.device("cuda")
    assert loop.make_loader(split, config, cpu, train=True).device is None
    config.data.views = ((2, "random_resized_crop(8)|normalize"),)
    assert loop.make_loader(split, config, gpu, train=True).device is None
    assert loop.make_loader(split, config, gpu, train=False).device == torch.device("cuda")
