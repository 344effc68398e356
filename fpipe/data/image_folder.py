"""Images on disk: one subfolder per class, ``root/<split>/<class>/<image file>``, or a split file.

Folders: class names are the sorted subfolders of the train split; the test (and optional val,
``data.val_split``) split may lack some classes but may not add new ones. Images are found at
any depth under a class folder (symlinks followed), in sorted path order; hidden entries
(``.name``) are skipped. Every class folder must hold at least one image, a directory reached
twice (a symlink loop, or two links to one folder) and a broken symlink are errors naming it, so
the tree never silently gains or loses a class.

Split file (``data.split_file``): a CSV of ``path,label,split`` rows (an optional header row
with those names; blank and ``#`` lines skipped), paths relative to ``data.root`` or, without
it, to the file's folder. Split names are matched to ``data.train_split``, ``test_split`` and
``val_split``; rows of other splits are not used. Labels are class names, or integers (then
sorted by value, so label ``k`` is class index ``k`` when labels are 0..K-1). Columns after
``split``, named in the header (``path,label,split,parity,attributes``), are extra targets for
multi-task heads (``model.heads.NAME.target``): integers are class indices; other numbers are
floats, and ``0;1;1`` a vector (multi-label attributes for ``loss='bce'``, values for ``'mse'``).

Files decode on access (``fpipe.data.decode``: bit depths, alpha, size limits).
"""
import csv
import os

import numpy as np
import torch

from fpipe.data import base, decode
from fpipe.data import config as config_lib

EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
LAYOUT = "root/<split>/<class name>/<image>.jpg|png|... (split names: data.train_split, " \
         "data.test_split, data.val_split), or data.split_file"
SPLIT_FILE_COLUMNS = ("path", "label", "split")


class FolderSplit:
    """Image files and their labels; decodes on access.

    Paths are kept in one numpy array rather than a list of str objects: forked worker
    processes then share them instead of copying every page that a reference count touches.
    """

    def __init__(self, files: list, labels: list, limits: decode.Limits = decode.Limits(), targets=None,
                 root: str = ""):
        self._paths = np.array([os.fsencode(f) for f in files], dtype=np.bytes_)
        self.labels = torch.as_tensor(labels, dtype=torch.int64)
        self.limits = limits
        self.targets = dict(targets or {})  # extra per-sample targets (split file columns)
        self.root = root  # the folder the paths are given below (fpipe.data.identity)

    @property
    def files(self) -> list:
        return [os.fsdecode(p) for p in self._paths]

    def path(self, index: int) -> str:
        return os.fsdecode(self._paths[base.check_index(index, len(self))])

    def identity(self) -> bytes:
        """The files' paths below ``root``: the same for a copy of the data under another root."""
        prefix = os.fsencode(os.path.join(self.root, "")) if self.root else b""
        return b"\0".join(p[len(prefix):] if prefix and p.startswith(prefix) else p for p in self._paths.tolist())

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index):
        return decode.decode(self.path(index), self.limits), int(self.labels[index])

    def read(self, index: int, plan) -> tuple:
        """Like ``split[index]`` with a geometry planned from the header (``decode.read``)."""
        return decode.read(self.path(index), plan, self.limits), int(self.labels[index])


def _is_image(name: str) -> bool:
    return name.lower().endswith(EXTENSIONS) and not name.startswith(".")


class _Walk:
    """Directories visited under the splits, by device and inode: reaching one twice is an error
    (its images would count twice, or in two splits)."""

    def __init__(self):
        self.seen = {}
        self.split = ""  # the role (train, test, val) of the split being walked

    def enter(self, path: str):
        st = os.stat(path)
        first, split = self.seen.setdefault((st.st_dev, st.st_ino), (path, self.split))
        if split != self.split:
            raise ValueError(f"image_folder: {path!r} (the {self.split} split) is the directory {first!r} of the "
                             f"{split} split: a held-out accuracy would count images the model trained on. "
                             "Fix: give each split its own images.")
        if first != path:
            raise ValueError(f"image_folder: {path!r} is the directory {first!r} again (a "
                             "symlink loop, or two links to one folder would count its images "
                             "twice). Fix: remove the symlink.")

    def entries(self, path: str) -> list:
        """Non-hidden entries, sorted; a broken symlink is an error."""
        found = []
        for entry in sorted(os.scandir(path), key=lambda e: e.name):
            if entry.name.startswith("."):
                continue
            if entry.is_symlink() and not os.path.exists(entry.path):
                raise ValueError(f"image_folder: {entry.path!r} is a broken symlink (to "
                                 f"{os.readlink(entry.path)!r}). Fix: remove or repair it.")
            found.append(entry)
        return found

    def images(self, class_dir: str) -> list:
        """Image files at any depth under ``class_dir``, in sorted path order."""
        files, pending = [], [class_dir]
        while pending:
            folder = pending.pop()
            self.enter(folder)
            for entry in self.entries(folder):
                if entry.is_dir():
                    pending.append(entry.path)
                elif _is_image(entry.name):
                    files.append(entry.path)
        return sorted(files, key=lambda f: os.path.relpath(f, class_dir).split(os.sep))


def _split_dir(root: str, split: str) -> str:
    path = os.path.join(root, split)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"image_folder: no directory {path!r}. Expected layout: {LAYOUT}")
    return path


def _class_dirs(split_dir: str, walk: _Walk) -> list:
    walk.enter(split_dir)
    return [e.name for e in walk.entries(split_dir) if e.is_dir()]


def _scan(split_dir: str, classes: tuple, limits: decode.Limits, root: str, walk: _Walk, role: str,
          by_index: bool = False) -> FolderSplit:
    """A split's images and labels; ``by_index`` (``data.eval_folders='indices'``, held-out splits):
    its class folders are named by the train split's class numbers (ImageNet-V2's 0..999)."""
    walk.split = role
    names = _class_dirs(split_dir, walk)
    index = {str(i): i for i in range(len(classes))} if by_index else {name: i for i, name in enumerate(classes)}
    extra = [c for c in names if c not in index]
    if extra and by_index:
        raise ValueError(f"image_folder: {split_dir!r} has class folders {extra[:10]}, but data.eval_folders="
                         f"'indices' names them by the train split's class numbers, 0..{len(classes) - 1}")
    if extra:
        hint = ("; its folders are numbers: if they are the train classes' numbers (ImageNet-V2's), set "
                "data.eval_folders='indices'" if all(c.isdigit() for c in extra) and not all(
                    c.isdigit() for c in classes) else "")
        raise ValueError(f"image_folder: {split_dir!r} has classes the train split lacks: {extra[:10]}{hint}")
    files, labels = [], []
    for name in names:
        found = walk.images(os.path.join(split_dir, name))
        if not found:
            raise ValueError(f"image_folder: class folder {os.path.join(split_dir, name)!r} has "
                             f"no image files ({', '.join(EXTENSIONS)}). Fix: add images or "
                             "remove the folder (an empty folder would be a class with none).")
        files += found
        labels += [index[name]] * len(found)
    if not files:
        raise ValueError(f"image_folder: no image files ({', '.join(EXTENSIONS)}) under "
                         f"{split_dir!r}. Expected layout: {LAYOUT}")
    return FolderSplit(files, labels, limits, root=root)


def _from_folders(root: str, split_names: dict, limits: decode.Limits, eval_folders: str = "names") -> tuple:
    dirs = {role: _split_dir(root, name) for role, name in split_names.items()}
    classes = tuple(_class_dirs(dirs["train"], _Walk()))  # its own walk: _scan enters these again
    if not classes:
        raise ValueError(f"image_folder: {dirs['train']!r} has no class subfolders. "
                         f"Expected layout: {LAYOUT}")
    walk = _Walk()  # one for every split: a folder reached from two splits is refused
    return classes, {role: _scan(d, classes, limits, root, walk, role, by_index=role != "train" and
                                 eval_folders == "indices") for role, d in dirs.items()}


def folder_split(root: str, split: str = "train", limits: decode.Limits = decode.Limits()) -> tuple:
    """``(FolderSplit, classes)``: the images of ``root/<split>/<class>/`` as ``build`` lists them, for
    tools that read one folder (benchmarks/train_loop.py)."""
    classes, splits = _from_folders(root, {"train": split}, limits)
    return splits["train"], classes


def _read_split_file(path: str) -> tuple:
    """``(rows, target names)``: ``(path, label, split, *targets)`` rows of a split file, the extra
    columns named by its header; a malformed row names its line."""
    rows, names = [], ()
    with open(path, newline="") as f:
        for line, row in enumerate(csv.reader(f), start=1):
            row = [cell.strip() for cell in row]
            if not any(row) or row[0].startswith("#"):
                continue
            if not rows and not names and tuple(c.lower() for c in row[:3]) == SPLIT_FILE_COLUMNS:
                names = tuple(row[3:])
                bad = [n for n in names if not n.isidentifier() or n in ("label", "image", "index", "mask")]
                if bad or len(set(names)) < len(names):
                    raise ValueError(f"image_folder: {path}:{line}: extra columns name targets: distinct "
                                     f"identifiers other than label/image/index/mask, got {list(names)}")
                continue
            if len(row) != 3 + len(names) or not all(row):
                want = ",".join(SPLIT_FILE_COLUMNS + names)
                raise ValueError(f"image_folder: {path}:{line}: want {want!r} (every cell filled), got "
                                 f"{','.join(row)!r}")
            rows.append(tuple(row))
    return rows, names


def _targets(path: str, names: tuple, extras: list) -> dict:
    """Extra target columns as tensors: int64 if every value is an integer, else float32; values
    with ``;`` are vectors (multi-label attributes, several regression values), one length each."""
    targets = {}
    for j, name in enumerate(names):
        cells = [row[j] for row in extras]
        try:
            if all(c.lstrip("-").isdigit() for c in cells):
                targets[name] = torch.tensor([int(c) for c in cells], dtype=torch.int64)
                continue
            values = [[float(v) for v in c.split(";")] for c in cells]
        except ValueError as e:
            raise ValueError(f"image_folder: {path}: column {name!r}: {e}") from None
        widths = sorted({len(v) for v in values})
        if len(widths) > 1:
            raise ValueError(f"image_folder: {path}: column {name!r} has vectors of lengths {widths}; "
                             "give every row the same number of ';'-separated values")
        t = torch.tensor(values, dtype=torch.float32)
        targets[name] = t[:, 0] if widths == [1] else t
    return targets


def _from_split_file(split_file: str, root: str, split_names: dict, limits) -> tuple:
    if not os.path.isfile(split_file):
        raise FileNotFoundError(f"image_folder: data.split_file {split_file!r} is not a file")
    base_dir = root or os.path.dirname(os.path.abspath(split_file))
    rows, target_names = _read_split_file(split_file)
    by_split = {role: [(os.path.join(base_dir, r[0]), r[1], *r[3:]) for r in rows if r[2] == name]
                for role, name in split_names.items()}
    for role, found in by_split.items():
        if not found:
            present = sorted({r[2] for r in rows})
            raise ValueError(f"image_folder: {split_file!r} has no rows for split "
                             f"{split_names[role]!r} (data.{role}_split); splits in the file: "
                             f"{present}")
    labels = {r[1] for r in by_split["train"]}
    numeric = all(label.isdigit() for label in labels)
    classes = tuple(sorted(labels, key=int if numeric else str))
    index = {name: i for i, name in enumerate(classes)}
    splits = {}
    for role, found in by_split.items():
        unknown = sorted({r[1] for r in found if r[1] not in index})
        if unknown:
            raise ValueError(f"image_folder: split {split_names[role]!r} of {split_file!r} has "
                             f"labels the train split lacks: {unknown[:10]}")
        missing = [r[0] for r in found if not os.path.isfile(r[0])]
        if missing:
            raise FileNotFoundError(f"image_folder: {len(missing)} files of {split_file!r} do "
                                    f"not exist, e.g. {missing[:3]}")
        splits[role] = FolderSplit([r[0] for r in found], [index[r[1]] for r in found], limits,
                                   _targets(split_file, target_names, [r[2:] for r in found]), root=base_dir)
    _check_disjoint(splits, split_names, split_file)
    return classes, splits


def build(data_cfg) -> base.Dataset:
    get = lambda key: config_lib.get(data_cfg, key)
    root, split_file = str(get("root")), str(get("split_file"))
    limits = decode.Limits(int(get("max_image_pixels")), float(get("max_aspect_ratio")))
    split_names = {"train": str(get("train_split")), "test": str(get("test_split"))}
    if get("val_split"):
        split_names["val"] = str(get("val_split"))
    if split_file:
        if root and not os.path.isdir(root):
            raise FileNotFoundError(f"image_folder: data.root {root!r} is not a directory")
        classes, splits = _from_split_file(split_file, root, split_names, limits)
    else:
        if not root:
            raise ValueError(f"image_folder needs data.root. Expected layout: {LAYOUT}")
        if not os.path.isdir(root):
            raise FileNotFoundError(f"image_folder: data.root {root!r} is not a directory. "
                                    f"Expected layout: {LAYOUT}")
        classes, splits = _from_folders(root, split_names, limits, str(get("eval_folders")))
    return base.Dataset("image_folder", classes, splits["train"], splits["test"],
                        splits.get("val"))


def _check_disjoint(splits: dict, split_names: dict, split_file: str) -> None:
    """Refuses a split file that lists one image (by normalised path) in two splits, or twice in
    a held-out split: a held-out accuracy would count images the model trained on, or one image
    twice. (Twice in train is oversampling, and allowed.)"""
    seen = {}
    for role, split in splits.items():
        for path in split.files:
            seen.setdefault(os.path.normpath(path), []).append(role)
    twice = {path: roles for path, roles in seen.items() if any(roles.count(r) > 1 for r in roles if r != "train")}
    if twice:
        first, roles = next(iter(twice.items()))
        role = next(r for r in roles if r != "train" and roles.count(r) > 1)
        raise ValueError(f"image_folder: {split_file!r} lists {len(twice)} image file(s) more than once in a held-out "
                         f"split, e.g. {first!r} in {role} ({split_names[role]!r}): its accuracy would count them "
                         "twice. Fix: list each held-out image once.")
    shared = {path: roles for path, roles in seen.items() if len(set(roles)) > 1}
    if shared:
        first, roles = next(iter(shared.items()))
        pairs = " and ".join(f"{r} ({split_names[r]!r})" for r in dict.fromkeys(roles))
        raise ValueError(f"image_folder: {split_file!r} lists {len(shared)} image file(s) in more than one split, "
                         f"e.g. {first!r} in {pairs}: a held-out accuracy would count images the model trained "
                         "on. Fix: list each image in one split only.")
