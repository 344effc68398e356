"""What a dataset holds, per split: a digest that follows the files, labels, classes and pixels,
and not where the folder lives."""
import shutil

import torch

from fpipe import data
from fpipe.data import identity
from test_data_datasets import cfg, write_tree


def folder(root):
    return data.build(cfg(name="image_folder", root=str(root)))


def test_an_image_folders_digest_follows_its_files_and_classes_not_its_root(tmp_path):
    write_tree(tmp_path / "a", {"train": {"cat": 3, "dog": 2}, "val": {"cat": 1, "dog": 1}})
    first = identity.digest(folder(tmp_path / "a"))
    assert set(first) == {"train", "test"} and first["train"].startswith("5 samples, sha256 ")
    assert identity.digest(folder(tmp_path / "a")) == first
    shutil.copytree(tmp_path / "a", tmp_path / "copy")  # the data staged elsewhere: the same data
    assert identity.digest(folder(tmp_path / "copy")) == first

    shutil.copy(tmp_path / "a/train/cat/img0.png", tmp_path / "a/train/cat/extra.png")  # one image more
    grown = identity.digest(folder(tmp_path / "a"))
    assert grown["train"].startswith("6 samples") and grown["test"] == first["test"]

    (tmp_path / "a/train/cat/extra.png").rename(tmp_path / "a/train/cat/other.png")  # as many, other files
    renamed = identity.digest(folder(tmp_path / "a"))
    assert renamed["train"].startswith("6 samples") and renamed["train"] != grown["train"]

    for split in ("train", "val"):  # a class renamed: the same files and labels under another name
        (tmp_path / "copy" / split / "dog").rename(tmp_path / "copy" / split / "dogs")
    assert identity.digest(folder(tmp_path / "copy")) != first


def test_a_split_files_rows_decide_the_digest(tmp_path):
    write_tree(tmp_path / "img", {"all": {"x": 4}})
    rows = ["path,label,split", "img/all/x/img0.png,0,train", "img/all/x/img1.png,1,train",
            "img/all/x/img2.png,0,train", "img/all/x/img3.png,1,test"]
    (tmp_path / "s.csv").write_text("\n".join(rows) + "\n")
    built = lambda: identity.digest(data.build(cfg(name="image_folder", split_file=str(tmp_path / "s.csv"),
                                                   test_split="test")))
    first = built()
    rows[3] = "img/all/x/img2.png,1,train"  # one label changed
    (tmp_path / "s.csv").write_text("\n".join(rows) + "\n")
    changed = built()
    assert changed["train"] != first["train"] and changed["test"] == first["test"]


def test_in_memory_splits_by_their_pixels_and_generated_ones_by_their_labels():
    images, labels = torch.zeros(4, 1, 2, 2, dtype=torch.uint8), torch.tensor([0, 1, 0, 1])
    split = lambda x: data.TensorSplit(x, labels)
    same = identity.split_digest(split(images.clone()))
    assert identity.split_digest(split(images)) == same
    images[2, 0, 1, 1] = 7
    assert identity.split_digest(split(images)) != same
    digits = identity.digest(data.build(cfg(name="digits")))
    assert digits == identity.digest(data.build(cfg(name="digits")))
    assert digits["train"].startswith("1437 samples") and digits["test"].startswith("360 samples")
    synthetic = lambda seed: identity.digest(data.build(cfg(name="synthetic", num_train=30, num_test=10, seed=seed)))
    assert synthetic(0) == synthetic(0) and synthetic(0) != synthetic(1)  # another seed shuffles the labels


def test_a_coco_split_by_its_annotation_file(tmp_path):
    import json
    from fpipe.detection import coco
    from test_detection_data import small
    ds = small()
    for split, name in ((ds.train, "train"), (ds.test, "val")):
        coco.write(split, ds.categories, str(tmp_path / "annotations" / f"instances_{name}.json"), str(tmp_path / name))
    build = lambda: identity.digest(coco.build({"root": str(tmp_path), "train_split": "train", "test_split": "val"}))
    first = build()
    assert first == build() and first["train"].startswith(f"{len(ds.train)} samples")
    path = tmp_path / "annotations" / "instances_train.json"
    annotations = json.loads(path.read_text())
    annotations["annotations"] = annotations["annotations"][1:]  # one box fewer, the same images
    path.write_text(json.dumps(annotations))
    changed = build()
    assert changed["train"] != first["train"] and changed["test"] == first["test"]
