"""ImageNet-ReaL (data.real_labels): each validation file's list found by its name, right when the top
class is in it, images without a list left out; checked against the definition written out here."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from fpipe.evaluate import real
from test_main import main

WNIDS = [f"n{10000000 + 7 * i:08d}" for i in range(1000)]


def reference_real_top1(predictions, lists):
    """ReaL accuracy as its authors define it: the mean over images with a non-empty list of
    whether the prediction is in the list."""
    scored = [p in labels for p, labels in zip(predictions, lists) if labels]
    return 100.0 * sum(scored) / len(scored)


def test_hits_count_what_the_definition_counts():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(40, 6, generator=g)
    lists = [sorted(set(torch.randint(0, 6, (int(n),), generator=g).tolist())) for n in torch.randint(0, 4, (40,), generator=g)]
    table = torch.full((40, 3), -1, dtype=torch.int64)
    for i, row in enumerate(lists):
        table[i, :len(row)] = torch.tensor(row, dtype=torch.int64)
    valid = torch.ones(40, dtype=torch.bool)
    valid[-5:] = False  # padding rows of the last batch
    found = real.hits(logits, table, valid)
    expected = reference_real_top1(logits.argmax(1)[:35].tolist(), lists[:35])
    assert 0 < expected < 100 and int(found["real_count"]) == sum(1 for r in lists[:35] if r)
    assert 100.0 * int(found["real_top1"]) / int(found["real_count"]) == pytest.approx(expected)


class Split:
    def __init__(self, files, labels):
        self.files, self.labels = files, torch.tensor(labels)


def test_lists_are_found_by_file_name_and_wrong_classes_or_files_are_refused():
    labels = [[3], [], [5, 9], [1]]
    table, scored, agree = real.for_split(Split(["a/ILSVRC2012_val_00000003.JPEG", "b/ILSVRC2012_val_00000001.JPEG"],
                                                [5, 3]), WNIDS, labels)
    assert table.tolist() == [[5, 9], [3, -1]] and scored == 2 and agree == 1.0
    with pytest.raises(ValueError, match="is not one of ImageNet's 4 validation files"):
        real.for_split(Split(["x/ILSVRC2012_val_00000005.JPEG"], [0]), WNIDS, labels)
    with pytest.raises(ValueError, match="is not one of ImageNet's"):
        real.for_split(Split(["x/cat.jpg"], [0]), WNIDS, labels)
    with pytest.raises(ValueError, match="ImageNet's 1000 classes in WordNet-id order, but the dataset has 10"):
        real.for_split(Split([], []), [str(i) for i in range(10)], labels)
    with pytest.raises(ValueError, match="WordNet-id order"):
        real.for_split(Split([], []), list(reversed(WNIDS)), labels)
    numbered = [str(i) for i in range(1000)]  # a split file's integer labels, ImageNet's numbering
    assert real.for_split(Split(["b/ILSVRC2012_val_00000004.JPEG"], [1]), numbered, labels)[0].tolist() == [[1]]
    with pytest.raises(ValueError, match=r"only 0.0% of the images' folder labels are in their ReaL lists"):
        real.for_split(Split(["b/ILSVRC2012_val_00000001.JPEG"], [4]), WNIDS, labels)


def test_read_refuses_what_is_not_reals_file(tmp_path):
    for text in ("{}", "[[1000]]", "[[true]]", "not json"):
        (tmp_path / "real.json").write_text(text)
        with pytest.raises(ValueError, match="data.real_labels="):
            real.read(str(tmp_path / "real.json"))
    with pytest.raises(ValueError, match="no such file"):
        real.read(str(tmp_path / "missing.json"))


def test_a_run_scores_real_top1_by_file_name_over_the_images_with_a_list(tmp_path):
    """1000 WordNet-id classes, validation files named as ImageNet's and stored out of their
    numbers' order; a released head that predicts class 7 for every image (evaluated as loaded):
    its real_top1 is the share of scored images whose list holds 7."""
    rng = np.random.default_rng(0)
    root = tmp_path / "imagenet"
    for i, wnid in enumerate(WNIDS):
        (root / "train" / wnid).mkdir(parents=True)
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(root / "train" / wnid / f"{i}.png")
    lists, predicted = [[] for _ in range(60)], 7
    for k in range(24):
        number, label = 60 - 2 * k, int(rng.integers(0, 1000))
        folder = root / "val" / WNIDS[label]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(folder / f"ILSVRC2012_val_{number:08d}.png")
        if number % 3:  # a third without a list: not scored
            lists[number - 1] = [label, predicted] if number % 4 == 0 else [label]
    (tmp_path / "real.json").write_text(json.dumps(lists))
    torch.save({"fc.weight": torch.zeros(1000, 512), "fc.bias": torch.eye(1000)[predicted] * 10}, tmp_path / "fc.pth")
    main(tmp_path / "run", "--config.data.name=image_folder", f"--config.data.root={root}",
         f"--config.data.real_labels={tmp_path / 'real.json'}", f"--config.model.head_weights.path={tmp_path / 'fc.pth'}",
         "--config.model.freeze=('trunk', 'heads')", "--config.best_metric=fc/real_top1", config="configs/supervised.py")
    results = json.loads((tmp_path / "run" / "results.json").read_text())["heads"]["fc"]
    expected = reference_real_top1([predicted] * 60, lists)
    assert 0 < expected < 100 and results["real_top1"] == pytest.approx(expected)
    assert results["top1"] == 0.0  # no image is of class 7
