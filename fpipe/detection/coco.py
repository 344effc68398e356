"""A COCO-format detection dataset: an annotation JSON and a folder of images per split.

    data.name = "coco"; data.root = "/data/coco"
    data.train_split = "train2017" -> root/annotations/instances_train2017.json + root/train2017/
    data.test_split  = "val2017"   -> root/annotations/instances_val2017.json   + root/val2017/
    (data.train_annotations / data.test_annotations and data.train_images / data.test_images
    give other paths; a person-keypoints file, person_keypoints_*.json, reads the same way)

Each image gives the detection sample of ``fpipe.detection.scenes`` (its docstring lists the
keys): ``bbox`` [x, y, w, h] becomes xyxy; boxes under 1 px wide or high are dropped (as
torchvision's reference scripts do); ``iscrowd`` regions are kept with ``iscrowd=True`` (never
trained on, ignored by evaluation); polygon and RLE (compressed or not) segmentations decode
through ``pycocotools.mask``, an annotation without one gets its box as mask; ``keypoints``
[x1, y1, v1, ...] become K×P×3. Category ids map to labels 1..C in sorted id order
(``data.labels="contiguous"``), or are the labels themselves (``data.labels="category_id"``:
1..the largest id, the ids no category has never occur; torchvision's COCO models, 91 classes
with the background, predict these). Images
decode through ``fpipe.data.decode`` (RGB uint8; its size limits apply) and must have the size
the file states. Problems are one-line errors naming the file and what is missing.
"""
import json
import os

import numpy as np
import torch

from fpipe import files
from fpipe.data import decode
from fpipe.detection.scenes import DetectionDataset

# COCO's person keypoint OKS sigmas (pycocotools' defaults), used for a 17-keypoint file.
COCO_PERSON_SIGMAS = (.026, .025, .025, .035, .035, .079, .079, .072, .072, .062, .062, .107, .107,
                      .087, .087, .089, .089)
DEFAULT_SIGMA = 0.05  # other keypoint sets: one sigma for every keypoint (see docs/DETECTION.md)
LABELS = ("contiguous", "category_id")  # data.labels: 1..C in sorted id order | the category ids


class CocoFormatError(ValueError):
    """An annotation file or image folder that cannot be read as COCO."""


def read_annotations(path: str) -> dict:
    """The annotation JSON, checked for the keys this reader needs."""
    if not os.path.isfile(path):
        raise CocoFormatError(f"COCO annotation file {path!r} does not exist")
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise CocoFormatError(f"{path}: not readable as JSON ({e})") from None
    if not isinstance(data, dict):
        raise CocoFormatError(f"{path}: a COCO file is a JSON object, got {type(data).__name__}")
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise CocoFormatError(f"{path}: no {key!r} key; a COCO instances file has images, annotations, categories")
    for what, needed in (("images", ("id", "file_name", "height", "width")),
                         ("annotations", ("image_id", "category_id", "bbox")), ("categories", ("id", "name"))):
        for i, entry in enumerate(data[what]):
            missing = [k for k in needed if k not in entry]
            if missing:
                raise CocoFormatError(f"{path}: {what}[{i}] has no {missing} (needs {list(needed)})")
    return data


class CocoSplit:
    """One split: ``split[i]`` is the sample of the i-th image in the file's order."""

    def __init__(self, annotations: dict, image_dir: str, source: str = "", limits=decode.Limits(),
                 labels: str = "contiguous"):
        if not os.path.isdir(image_dir):
            raise CocoFormatError(f"COCO image folder {image_dir!r} does not exist")
        if labels not in LABELS:
            raise ValueError(f"data.labels={labels!r}; valid: {', '.join(LABELS)}")
        self.image_dir, self.source, self.limits = image_dir, source, limits
        self.coco_dict = annotations  # the ground truth as the file gives it (evaluation)
        self.images = list(annotations["images"])
        ids = sorted(c["id"] for c in annotations["categories"])
        if labels == "category_id":
            bad = [cid for cid in ids if not (isinstance(cid, int) and cid >= 1)]
            if bad:
                raise CocoFormatError(f"{source}: data.labels='category_id' needs category ids >= 1, got {bad[:5]}")
            self.label_of = {cid: cid for cid in ids}
        else:
            self.label_of = {cid: i + 1 for i, cid in enumerate(ids)}
        self.by_image = {img["id"]: [] for img in self.images}
        for ann in annotations["annotations"]:
            if ann["image_id"] not in self.by_image:
                raise CocoFormatError(f"{source}: an annotation (id {ann.get('id')}) refers to image_id "
                                      f"{ann['image_id']}, which is not in 'images'")
            if ann["category_id"] not in self.label_of:
                raise CocoFormatError(f"{source}: an annotation (id {ann.get('id')}) has category_id "
                                      f"{ann['category_id']}, which is not in 'categories'")
            self.by_image[ann["image_id"]].append(ann)
        self.num_keypoints = max((len(c.get("keypoints", ())) for c in annotations["categories"]), default=0)

    def __len__(self):
        return len(self.images)

    def identity(self) -> bytes:
        """The annotations as read: the file's sha256, or (no file) the dict's canonical JSON."""
        if self.source and os.path.isfile(self.source):
            return files.sha256(self.source).encode()
        return json.dumps(self.coco_dict, sort_keys=True, default=str).encode()

    def __getitem__(self, index) -> dict:
        info = self.images[index]
        path = os.path.join(self.image_dir, info["file_name"])
        if not os.path.isfile(path):
            raise CocoFormatError(f"{self.source}: image {info['id']}'s file {path!r} does not exist")
        image = decode.decode(path, self.limits)
        if image.dtype != torch.uint8:
            image = (image * 255).round().to(torch.uint8)
        h, w = int(info["height"]), int(info["width"])
        if tuple(image.shape[-2:]) != (h, w):
            raise CocoFormatError(f"{self.source}: {path} is {image.shape[-1]}×{image.shape[-2]} px, the file "
                                  f"says {w}×{h}")
        return self._sample(image, info, h, w)

    def _sample(self, image, info, h, w) -> dict:
        from pycocotools import mask as mask_utils  # COCO's own mask coding
        anns = [a for a in self.by_image[info["id"]] if a["bbox"][2] >= 1 and a["bbox"][3] >= 1]
        k, p = len(anns), self.num_keypoints
        boxes = torch.tensor([[x, y, x + bw, y + bh] for x, y, bw, bh in (a["bbox"] for a in anns)],
                             dtype=torch.float32).reshape(k, 4)
        masks = np.zeros((k, h, w), dtype=np.uint8)
        keypoints = torch.zeros(k, p, 3)
        for i, a in enumerate(anns):
            seg = a.get("segmentation")
            if isinstance(seg, dict) and isinstance(seg.get("counts"), str):  # compressed RLE
                masks[i] = mask_utils.decode({"size": seg["size"], "counts": seg["counts"].encode("ascii")})
            elif seg:  # polygons, or uncompressed RLE
                rles = mask_utils.frPyObjects(seg, h, w)
                masks[i] = mask_utils.decode(mask_utils.merge(rles) if isinstance(rles, list) else rles)
            else:  # no segmentation: the box
                x0, y0, x1, y1 = boxes[i].tolist()
                masks[i, int(y0):int(np.ceil(y1)), int(x0):int(np.ceil(x1))] = 1
            if p and a.get("keypoints"):
                kp = torch.tensor(a["keypoints"], dtype=torch.float32).reshape(-1, 3)
                keypoints[i, :len(kp)] = kp
        area = [float(a["area"]) if "area" in a else float(masks[i].sum()) for i, a in enumerate(anns)]
        return {"image": image, "boxes": boxes,
                "labels": torch.tensor([self.label_of[a["category_id"]] for a in anns], dtype=torch.int64),
                "masks": torch.from_numpy(masks), "keypoints": keypoints,
                "iscrowd": torch.tensor([bool(a.get("iscrowd", 0)) for a in anns], dtype=torch.bool),
                "area": torch.tensor(area, dtype=torch.float32), "image_id": int(info["id"])}


def split_paths(data_cfg, which: str) -> tuple:
    """``(annotation file, image folder)`` of split ``which`` ("train" or "test")."""
    get = lambda key: (data_cfg.get(key) if hasattr(data_cfg, "get") else None) or ""
    root, name = get("root"), get(f"{which}_split")
    ann = get(f"{which}_annotations") or os.path.join(root, "annotations", f"instances_{name}.json")
    images = get(f"{which}_images") or os.path.join(root, name)
    return ann, images


def _check_disjoint(train: CocoSplit, test: CocoSplit) -> None:
    """Refuses a test split that shares image files with the train split: its AP would count
    images the model trained on."""
    shared = _resolved_files(train) & _resolved_files(test)
    if shared:
        raise CocoFormatError(f"{test.source}: {len(shared)} of its images are the train split's too ({train.source}), "
                              f"e.g. {sorted(shared)[0]!r}: its AP would count images the model trained on. Fix: a "
                              "test split of held-out images (data.test_split, data.test_annotations).")


def _resolved_files(split: CocoSplit) -> set:
    """The split's image paths with every link resolved, as ``os.path.realpath`` gives them; the
    folder is resolved once and only a name that is a link or has folders in it on its own (a
    per-image realpath cost ~2.5 s for COCO's 123 k images)."""
    folder = os.path.realpath(split.image_dir)
    out = set()
    for info in split.images:
        path = os.path.join(folder, info["file_name"])
        out.add(os.path.realpath(path) if os.sep in info["file_name"] or os.path.islink(path) else path)
    return out


def build(data_cfg) -> DetectionDataset:
    """The COCO-format dataset ``config.data`` names (see the module docstring)."""
    splits, categories = {}, None
    labels = (data_cfg.get("labels") if hasattr(data_cfg, "get") else None) or "contiguous"
    for which in ("train", "test"):
        ann_path, image_dir = split_paths(data_cfg, which)
        annotations = read_annotations(ann_path)
        cats = tuple(sorted(annotations["categories"], key=lambda c: c["id"]))
        if categories is not None and [c["id"] for c in cats] != [c["id"] for c in categories]:
            raise CocoFormatError(f"{ann_path}: its categories differ from the train file's")
        categories = cats
        splits[which] = CocoSplit(annotations, image_dir, ann_path, labels=labels)
    _check_disjoint(splits["train"], splits["test"])
    names = tuple(max((c.get("keypoints", []) for c in categories), key=len))
    sigmas = COCO_PERSON_SIGMAS if len(names) == 17 else (DEFAULT_SIGMA,) * len(names)
    label_ids = ()
    if labels == "category_id":
        ids = {int(c["id"]) for c in categories}
        label_ids = tuple(i if i in ids else 0 for i in range(1, max(ids, default=0) + 1))
    return DetectionDataset("coco", categories, splits["train"], splits["test"], names, sigmas, label_ids)


def to_coco_dict(split, categories, *, file_names=None) -> dict:
    """A split as a COCO annotation dict (masks as compressed RLE with ``counts`` as text, so it
    writes to JSON): the ground truth evaluation compares with, and how a generated split is
    written to disk (``file_names[i]``: image i's file name)."""
    from pycocotools import mask as mask_utils
    if getattr(split, "coco_dict", None) is not None:  # read from a COCO file: as it is
        return split.coco_dict
    images, annotations = [], []
    for i in range(len(split)):
        s = split[i]
        h, w = s["image"].shape[-2:]
        image_id = int(s["image_id"])
        images.append({"id": image_id, "height": int(h), "width": int(w),
                       "file_name": file_names[i] if file_names else f"{image_id:08d}.png"})
        rles = mask_utils.encode(np.asfortranarray(s["masks"].numpy().transpose(1, 2, 0))) if len(s["labels"]) else []
        for j in range(len(s["labels"])):
            x0, y0, x1, y1 = s["boxes"][j].tolist()
            kp = s["keypoints"][j]
            rle = {"size": [int(h), int(w)], "counts": rles[j]["counts"].decode("ascii")}
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": int(categories[int(s["labels"][j]) - 1]["id"]),
                "bbox": [x0, y0, x1 - x0, y1 - y0], "area": float(s["area"][j]), "iscrowd": int(s["iscrowd"][j]),
                "segmentation": rle, "keypoints": [float(v) for v in kp.flatten().tolist()],
                "num_keypoints": int((kp[:, 2] > 0).sum())})
    return {"images": images, "annotations": annotations, "categories": [dict(c) for c in categories]}


def write(split, categories, ann_path: str, image_dir: str) -> None:
    """Writes a split (e.g. generated scenes) as a COCO annotation file and PNG images."""
    from PIL import Image
    os.makedirs(image_dir, exist_ok=True)
    os.makedirs(os.path.dirname(os.path.abspath(ann_path)), exist_ok=True)
    data = to_coco_dict(split, categories)
    for i, info in enumerate(data["images"]):
        array = split[i]["image"].permute(1, 2, 0).numpy()
        Image.fromarray(array).save(os.path.join(image_dir, info["file_name"]))
    with open(ann_path, "w") as f:
        json.dump(data, f)
