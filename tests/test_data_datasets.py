"""Tests for the dataset modules (digits, synthetic, image_folder) and the registry."""
import ast
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from fpipe import data
from fpipe.data import config as config_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def cfg(**overrides):
    c = data.default_config()
    c.update(overrides)
    return c


# --- digits ----------------------------------------------------------------------------------

def test_digits_split_sizes_pixels_and_stratification():
    ds = data.build(cfg())
    assert ds.name == "digits" and ds.num_classes == 10
    assert (len(ds.train), len(ds.test)) == (1437, 360)
    image, label = ds.test[0]
    assert image.shape == (3, 64, 64) and image.dtype == torch.float32
    assert isinstance(label, int) and 0 <= label < 10
    assert 0 <= image.min() and image.max() <= 1 and image.max() > 0.5
    assert torch.equal(image[0], image[1]) and torch.equal(image[0], image[2])
    counts = torch.bincount(ds.test.labels, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37  # stratified: 360 / 10 each, give or take
    assert data.build(cfg()).test is ds.test  # cached: built once per image size


def test_digits_at_native_size_are_the_raw_images_split_disjointly():
    from sklearn.datasets import load_digits
    ds = data.build(cfg(image_size=8))
    ours = [ds.train[i][0][0] for i in range(len(ds.train))] + \
           [ds.test[i][0][0] for i in range(len(ds.test))]
    key = lambda x: tuple(np.round(np.asarray(x) * 16).astype(int).ravel())
    raw = load_digits().images
    assert sorted(map(key, ours)) == sorted(key(r / 16) for r in raw)
    assert data.build(cfg(image_size=16)).train[0][0].shape == (3, 16, 16)


def test_digits_split_is_scikit_learns_stratified_split_and_loads_without_importing_it():
    from sklearn import datasets, model_selection
    raw = datasets.load_digits()
    train, test = model_selection.train_test_split(range(len(raw.target)), test_size=360, stratify=raw.target,
                                                   random_state=0)
    ds = data.build(cfg(image_size=8))
    assert torch.equal(ds.test.labels, torch.as_tensor(raw.target[sorted(test)]))
    assert torch.equal(ds.train.labels, torch.as_tensor(raw.target[sorted(train)]))
    assert torch.allclose(ds.test.images[:, 0], torch.as_tensor(raw.images[sorted(test)], dtype=torch.float32) / 16)
    script = ("import sys\nfrom fpipe import data\nfrom fpipe.data import config\n"
              "c = config.default_config(); c.image_size = 8\ndata.build(c)\nprint('sklearn' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False", out.stderr[-2000:]


def test_digits_access_returns_a_copy():
    ds = data.build(cfg(image_size=8))
    ds.train[0][0].zero_()
    assert ds.train[0][0].sum() > 0


# --- synthetic -------------------------------------------------------------------------------

def test_synthetic_is_deterministic_and_configurable():
    c = cfg(name="synthetic", num_classes=4, num_train=40, num_test=12, image_size=16, seed=5)
    a, b = data.build(c), data.build(c)
    assert a.num_classes == 4 and (len(a.train), len(a.test)) == (40, 12)
    image, label = a.train[3]
    assert image.shape == (3, 16, 16) and image.dtype == torch.uint8
    assert torch.equal(image, b.train[3][0]) and label == b.train[3][1]
    assert torch.bincount(a.train.labels).tolist() == [10] * 4
    c.seed = 6
    assert not torch.equal(image, data.build(c).train[3][0])
    assert not torch.equal(a.train[0][0], a.test[0][0])


def test_synthetic_labels_are_learnable():
    ds = data.build(cfg(name="synthetic", num_classes=10, num_train=200, num_test=100,
                        image_size=8))
    stack = lambda s: torch.stack([s[i][0] for i in range(len(s))]).flatten(1).float()
    train, test = stack(ds.train), stack(ds.test)
    means = torch.stack([train[ds.train.labels == c].mean(0) for c in range(10)])
    predicted = torch.cdist(test, means).argmin(1)
    assert (predicted == ds.test.labels).float().mean() > 0.9


# --- image_folder ----------------------------------------------------------------------------

def write_tree(root: pathlib.Path, layout: dict) -> dict:
    """layout {split: {class: count}}: writes small PNGs of varying size; returns pixels."""
    pixels = {}
    rng = np.random.default_rng(0)
    for split, classes in layout.items():
        for name, count in classes.items():
            folder = root / split / name
            folder.mkdir(parents=True)
            for k in range(count):
                array = rng.integers(0, 256, (5 + k, 7, 3), dtype=np.uint8)
                Image.fromarray(array).save(folder / f"img{k}.png")
                pixels[str(folder / f"img{k}.png")] = array
            (folder / "notes.txt").write_text("not an image")
    return pixels


def test_image_folder_classes_labels_and_pixels(tmp_path):
    pixels = write_tree(tmp_path, {"train": {"zebra": 2, "cat": 3}, "val": {"cat": 1}})
    ds = data.build(cfg(name="image_folder", root=str(tmp_path)))
    assert ds.classes == ("cat", "zebra") and ds.num_classes == 2
    assert (len(ds.train), len(ds.test)) == (5, 1)
    assert ds.train.labels.tolist() == [0, 0, 0, 1, 1]
    for i, path in enumerate(ds.train.files):
        image, label = ds.train[i]
        assert image.dtype == torch.uint8 and image.shape[0] == 3
        assert np.array_equal(image.permute(1, 2, 0).numpy(), pixels[path])
    # Greyscale files come back as RGB.
    Image.new("L", (4, 3), 200).save(tmp_path / "val" / "cat" / "grey.png")
    grey = data.build(cfg(name="image_folder", root=str(tmp_path))).test
    assert grey[0][0].shape == (3, 3, 4) and (grey[0][0] == 200).all()


def test_image_folder_loader_with_workers_matches_without(tmp_path):
    write_tree(tmp_path, {"tr": {"a": 4, "b": 3}, "te": {"a": 2, "b": 3}})
    c = cfg(name="image_folder", root=str(tmp_path), train_split="tr", test_split="te",
            image_size=6, batch_size=2, eval_batch_size=4,
            train_transforms="random_resized_crop|flip|normalize")
    ds = data.build(c)
    runs = []
    for workers in (0, 2):
        c.num_workers = workers
        runs.append([list(data.Loader(s, c, train=t).epoch(1)) for s, t in
                     ((ds.train, True), (ds.test, False))])
    for a, b in zip(*runs):
        assert len(a) == len(b) > 0
        for x, y in zip(a, b):
            assert x.keys() == y.keys()
            assert all(torch.equal(x[k], y[k]) for k in x)
    assert runs[0][0][0]["image"].shape == (2, 3, 6, 6)


def test_image_folder_layout_errors_name_the_path(tmp_path):
    with pytest.raises(ValueError, match="needs data.root"):
        data.build(cfg(name="image_folder"))
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=f"{missing}.*Expected layout"):
        data.build(cfg(name="image_folder", root=str(missing)))
    write_tree(tmp_path, {"train": {"a": 1}})
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'val'}.*Expected layout"):
        data.build(cfg(name="image_folder", root=str(tmp_path)))
    (tmp_path / "val" / "b").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"classes the train split lacks: \['b'\]"):
        data.build(cfg(name="image_folder", root=str(tmp_path)))
    (tmp_path / "val" / "b").rmdir()
    (tmp_path / "val" / "a").mkdir()
    with pytest.raises(ValueError, match="no image files"):
        data.build(cfg(name="image_folder", root=str(tmp_path)))


def test_image_folder_corrupt_file_is_named(tmp_path):
    write_tree(tmp_path, {"train": {"a": 1}, "val": {"a": 1}})
    bad = tmp_path / "val" / "a" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 this is not really a jpeg")
    ds = data.build(cfg(name="image_folder", root=str(tmp_path)))
    with pytest.raises(ValueError, match=f"cannot decode image file '{bad}'.*replace"):
        [ds.test[i] for i in range(len(ds.test))]


# --- registry and config ---------------------------------------------------------------------

def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="'imagenet'.*digits, image_folder, synthetic"):
        data.build(cfg(name="imagenet"))


def test_default_config_and_partial_configs():
    c = data.default_config()
    for key in ("name", "root", "image_size", "batch_size", "eval_batch_size", "num_workers",
                "train_transforms", "eval_transforms", "seed", "train_split", "test_split",
                "num_classes", "num_train", "num_test"):
        assert key in c
    assert (c.name, c.root, c.image_size, c.batch_size, c.num_workers) == \
        ("digits", "", 64, 64, 0)
    # A config that sets only some keys reads the defaults for the rest.
    assert config_lib.get({"name": "synthetic"}, "image_size") == 64
    ds = data.build({"name": "synthetic", "num_train": 8, "num_test": 4, "image_size": 8})
    assert len(ds.train) == 8
    with pytest.raises(KeyError, match="not a data config key"):
        config_lib.get(c, "batchsize")


def test_data_package_imports_no_models_training_or_torchvision():
    for path in pathlib.Path(data.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                module = getattr(node, "module", None)
                names = [f"{module}.{a.name}" if module else a.name for a in node.names]
                for name in names:
                    assert not name.startswith(("torchvision", "fpipe.models", "fpipe.train")), \
                        f"{path.name} imports {name}"


# --- image_folder: trees that must not silently gain or lose a class --------------------------

def test_empty_class_folder_is_an_error_naming_it(tmp_path):
    write_tree(tmp_path, {"train": {"a": 2, "b": 1}, "val": {"a": 1}})
    (tmp_path / "train" / "empty").mkdir()
    with pytest.raises(ValueError, match=f"class folder '{tmp_path / 'train' / 'empty'}' has no image"):
        data.build(cfg(name="image_folder", root=str(tmp_path)))
    (tmp_path / "train" / "empty").rmdir()
    (tmp_path / "val" / "b").mkdir()  # present in the test split but empty: an error too
    with pytest.raises(ValueError, match=f"'{tmp_path / 'val' / 'b'}' has no image"):
        data.build(cfg(name="image_folder", root=str(tmp_path)))


def test_symlink_loops_duplicates_and_broken_links_are_errors(tmp_path):
    write_tree(tmp_path, {"train": {"a": 2, "b": 1}, "val": {"a": 1}})
    train = tmp_path / "train"
    (train / "loop").symlink_to(train)  # a class folder that is its own parent
    with pytest.raises(ValueError, match=f"'{train / 'loop'}' is the directory.*symlink loop"):
        data.build(cfg(name="image_folder", root=str(tmp_path)))
    (train / "loop").unlink()
    (train / "a" / "deeper").symlink_to(train / "a")  # a loop inside a class folder
    with pytest.raises(ValueError, match="symlink loop"):
        data.build(cfg(name="image_folder", root=str(tmp_path)))
    (train / "a" / "deeper").unlink()
    (train / "c").symlink_to(train / "b")  # b's images would count twice, as b and as c
    with pytest.raises(ValueError, match=f"'{train / 'c'}' is the directory '{train / 'b'}'"):
        data.build(cfg(name="image_folder", root=str(tmp_path)))
    (train / "c").unlink()
    (train / "a" / "gone.png").symlink_to(tmp_path / "nowhere.png")
    with pytest.raises(ValueError, match="gone.png' is a broken symlink"):
        data.build(cfg(name="image_folder", root=str(tmp_path)))


def test_images_in_nested_and_linked_folders_are_found_in_sorted_order(tmp_path):
    write_tree(tmp_path, {"train": {"a": 1}, "val": {"a": 1}})
    elsewhere = tmp_path / "elsewhere"
    write_tree(elsewhere, {"x": {"b": 2}})
    (tmp_path / "train" / "b").symlink_to(elsewhere / "x" / "b")  # a symlink farm is fine
    nested = tmp_path / "train" / "a" / "sub"
    nested.mkdir()
    Image.new("RGB", (3, 3)).save(nested / "n.png")
    Image.new("RGB", (3, 3)).save(tmp_path / "train" / "a" / ".hidden.png")
    ds = data.build(cfg(name="image_folder", root=str(tmp_path)))
    names = [f.split(str(tmp_path))[1] for f in ds.train.files]
    assert names == ["/train/a/img0.png", "/train/a/sub/n.png", "/train/b/img0.png",
                     "/train/b/img1.png"]
    assert ds.train.labels.tolist() == [0, 0, 1, 1] and ds.val is None


# --- image_folder: transfer datasets with three splits ----------------------------------------

def test_val_split_folder_gives_a_third_split(tmp_path):
    write_tree(tmp_path, {"train": {"a": 2, "b": 2}, "val": {"a": 1}, "test": {"b": 3}})
    ds = data.build(cfg(name="image_folder", root=str(tmp_path), test_split="test",
                        val_split="val"))
    assert (len(ds.train), len(ds.val), len(ds.test)) == (4, 1, 3)
    assert ds.val.labels.tolist() == [0] and ds.test.labels.tolist() == [1, 1, 1]
    with pytest.raises(FileNotFoundError, match="nope"):
        data.build(cfg(name="image_folder", root=str(tmp_path), val_split="nope"))


def test_held_out_folders_named_by_class_number_as_imagenet_v2s(tmp_path):
    """data.eval_folders='indices': test/val class folders 0..K-1 are train's classes by number."""
    write_tree(tmp_path, {"train": {"n02": 1, "n01": 1, "n03": 1}, "v2": {"0": 2, "2": 1}, "bad": {"3": 1}})
    ds = data.build(cfg(name="image_folder", root=str(tmp_path), test_split="v2", eval_folders="indices"))
    assert ds.classes == ("n01", "n02", "n03") and ds.test.labels.tolist() == [0, 0, 2]
    assert ds.train.labels.tolist() == [0, 1, 2]  # train's own folders still by name
    with pytest.raises(ValueError, match=r"numbers: if they are the train classes' numbers .*eval_folders='indices'"):
        data.build(cfg(name="image_folder", root=str(tmp_path), test_split="v2"))
    with pytest.raises(ValueError, match=r"class folders \['3'\], but data.eval_folders='indices' .* 0..2"):
        data.build(cfg(name="image_folder", root=str(tmp_path), test_split="bad", eval_folders="indices"))
    with pytest.raises(ValueError, match="data.eval_folders='number'; valid: 'names'"):
        config_lib.check(cfg(name="image_folder", root=str(tmp_path), eval_folders="number"))


def test_split_file_lists_paths_labels_and_splits(tmp_path):
    pixels = write_tree(tmp_path / "img", {"all": {"x": 6}})
    files = sorted(pixels)
    rows = ["path,label,split", "# a comment"]
    for k, (label, split) in enumerate([("10", "train"), ("2", "train"), ("2", "val"),
                                        ("10", "test"), ("2", "test"), ("10", "other")]):
        rows.append(f"{files[k].split(str(tmp_path) + '/')[1]},{label},{split}")
    (tmp_path / "splits.csv").write_text("\n".join(rows) + "\n\n")
    c = cfg(name="image_folder", split_file=str(tmp_path / "splits.csv"), test_split="test",
            val_split="val")
    ds = data.build(c)
    assert ds.classes == ("2", "10")  # integer labels sort by value, not as text
    assert ds.train.labels.tolist() == [1, 0] and ds.val.labels.tolist() == [0]
    assert ds.test.labels.tolist() == [1, 0]
    assert ds.train.files == files[:2] and ds.test.files == files[3:5]
    image, label = ds.test[0]
    assert np.array_equal(image.permute(1, 2, 0).numpy(), pixels[files[3]]) and label == 1
    # The same file read against data.root.
    c.root, c.split_file = str(tmp_path), str(tmp_path / "splits.csv")
    assert data.build(c).train.files == files[:2]
    bad = tmp_path / "bad.csv"
    bad.write_text(f"{files[0]},1,train\n{files[1]},7,test\n")
    with pytest.raises(ValueError, match=r"labels the train split lacks: \['7'\]"):
        data.build(cfg(name="image_folder", split_file=str(bad), test_split="test"))
    bad.write_text(f"{files[0]},1,train\nmissing.png,1,test\n")
    with pytest.raises(FileNotFoundError, match="missing.png"):
        data.build(cfg(name="image_folder", split_file=str(bad), test_split="test"))
    bad.write_text(f"{files[0]},1\n")
    with pytest.raises(ValueError, match=r"bad.csv:1: want 'path,label,split'"):
        data.build(cfg(name="image_folder", split_file=str(bad)))
    bad.write_text(f"{files[0]},1,train\n")
    with pytest.raises(ValueError, match=r"no rows for split 'val'.*\['train'\]"):
        data.build(cfg(name="image_folder", split_file=str(bad)))


def test_config_check_names_the_key(tmp_path):
    config_lib.check(cfg())
    for key, value in [("num_workers", -1), ("worker_niceness", -1), ("worker_niceness", 20),
                       ("max_image_pixels", 0), ("max_aspect_ratio", 0.5),
                       ("split_file", str(tmp_path / "none.csv"))]:
        with pytest.raises(ValueError, match=f"data.{key}="):
            config_lib.check(cfg(**{key: value}))


def test_transforms_parse_is_still_importable_from_transforms():
    from fpipe.data import transforms
    assert transforms.parse("resize(8)|normalize").spec == "resize(8)|normalize"


def test_splits_that_share_images_are_refused_naming_them(tmp_path):
    """A held-out accuracy measured on training images is a wrong number: one folder reached from
    two splits, a split file listing an image twice, a split named twice are errors."""
    write_tree(tmp_path, {"train": {"a": 2, "b": 1}})
    (tmp_path / "val").symlink_to(tmp_path / "train")  # the test split is the train folder
    with pytest.raises(ValueError, match=f"'{tmp_path / 'val'}' \\(the test split\\) is the directory "
                                         f"'{tmp_path / 'train'}' of the train split"):
        data.build(cfg(name="image_folder", root=str(tmp_path)))
    (tmp_path / "val").unlink()
    (tmp_path / "val").mkdir()
    (tmp_path / "val" / "a").symlink_to(tmp_path / "train" / "a")  # one class shared
    with pytest.raises(ValueError, match="the test split.*of the train split"):
        data.build(cfg(name="image_folder", root=str(tmp_path)))
    rows = ["path,label,split", "train/a/img0.png,a,train", "train/b/img0.png,b,train",
            "train/a/img1.png,a,test", "./train/a/img0.png,a,test"]
    (tmp_path / "s.csv").write_text("\n".join(rows) + "\n")
    with pytest.raises(ValueError, match=r"lists 1 image file\(s\) in more than one split, e.g. '.*train/a/img0.png' "
                                         r"in train \('train'\) and test \('test'\)"):
        data.build(cfg(name="image_folder", split_file=str(tmp_path / "s.csv"), test_split="test"))
    rows[-1] = "train/a/img1.png,a,test"  # one test image listed twice; twice in train is oversampling
    (tmp_path / "s.csv").write_text("\n".join(rows + ["train/a/img0.png,a,train"]) + "\n")
    with pytest.raises(ValueError, match=r"lists 1 image file\(s\) more than once in a held-out split, e.g. "
                                         r"'.*train/a/img1.png' in test \('test'\)"):
        data.build(cfg(name="image_folder", split_file=str(tmp_path / "s.csv"), test_split="test"))
    (tmp_path / "s.csv").write_text("\n".join(rows[:-1] + ["train/a/img0.png,a,train"]) + "\n")
    assert len(data.build(cfg(name="image_folder", split_file=str(tmp_path / "s.csv"), test_split="test")).train) == 3
    with pytest.raises(ValueError, match="data.train_split and data.test_split are both 'train'"):
        data.config.check(cfg(name="image_folder", root=str(tmp_path), test_split="train"))
    with pytest.raises(ValueError, match="data.test_split and data.val_split are both 'val'.*data.val_split=''"):
        data.config.check(cfg(name="image_folder", root=str(tmp_path), val_split="val"))
    (tmp_path / "val" / "a").unlink()
    (tmp_path / "val" / "a").mkdir()
    with pytest.raises(ValueError, match="the test split.*is the directory.*of the train split"):  # one name twice
        data.build(cfg(name="image_folder", root=str(tmp_path), test_split="train"))


def test_data_root_is_checked_only_for_the_datasets_that_read_it(tmp_path):
    """A root left over from an image_folder config (another machine's /data/imagenet) does not
    stop a digits run, which never reads it; an image_folder run with it is refused before any work."""
    missing = str(tmp_path / "imagenet")
    data.config.check(cfg(name="digits", root=missing))
    data.config.check(cfg(name="synthetic", root=missing))
    with pytest.raises(ValueError, match=r"data.root=.*imagenet' is not a directory"):
        data.config.check(cfg(name="image_folder", root=missing))
