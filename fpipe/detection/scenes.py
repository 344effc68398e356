"""Generated detection scenes: shapes on textured backgrounds, with boxes, masks and keypoints.

The embedded default for detection (no download): every image is made on access from a
generator seeded by ``(data.seed, split, index)``, so a split costs no memory and the same seed
always gives the same pixels and annotations.

- Images: 64-128 px per side (``data.min_side`` .. ``data.max_side``), a background of one
  colour with a texture (smooth noise, stripes at an angle, or a checkerboard) and pixel noise.
- Objects: 1-4 per image (``data.max_objects_per_image``), of 3 classes — ``rectangle``,
  ``ellipse``, ``triangle`` (axis-aligned, a triangle's base horizontal) — each in a colour that
  stands out from the background, 14 px to 60% of the short side, fully inside the image.
  A later object may cover an earlier one, but never more than 40% of what is still visible
  of it. Masks are exact (the pixel centre inside the shape), minus what later objects cover;
  a box is the extent of the visible mask (COCO's convention), area its pixel count.
- Keypoints: 3 per object, named ``top``, ``left``, ``right``: a triangle's apex and base
  corners; a rectangle's top-edge centre and bottom corners; an ellipse's top, leftmost and
  rightmost points. Visibility 2, or 1 where a later object covers the point (COCO's
  "labelled but not visible"); never 0, as objects lie inside the image.

A sample is the detection sample every reader gives (``fpipe.detection.coco`` too), in the
image's own pixel coordinates (x right, y down, box edges on pixel edges)::

    {"image": uint8 3×H×W, "boxes": float32 K×4 xyxy, "labels": int64 K (1..C),
     "masks": uint8 K×H×W, "keypoints": float32 K×P×3 (x, y, visibility),
     "iscrowd": bool K, "area": float32 K, "image_id": int}
"""
import dataclasses
import math

import torch
import torch.nn.functional as F

from fpipe.data import base
from fpipe.data import rng
from fpipe.detection.collate import one_thread

CLASSES = ("rectangle", "ellipse", "triangle")
KEYPOINT_NAMES = ("top", "left", "right")
SKELETON = ((1, 2), (2, 3), (3, 1))  # COCO's 1-based keypoint pairs
# OKS sigmas (COCO's per-keypoint constants; its person keypoints use 0.025-0.107). A corner is
# sharply defined, so tighter than a person's hip: 0.05 asks for ~1.7 px at a 20 px object.
KEYPOINT_SIGMAS = (0.05, 0.05, 0.05)
CATEGORIES = tuple({"id": i + 1, "name": name, "supercategory": "shape", "keypoints": list(KEYPOINT_NAMES),
                    "skeleton": [list(p) for p in SKELETON]} for i, name in enumerate(CLASSES))
MAX_COVER = 0.4       # a new object may hide at most this share of an earlier object's visible pixels
MIN_CONTRAST = 0.25   # mean absolute difference of an object's colour from the background's


@dataclasses.dataclass(frozen=True)
class DetectionDataset:
    """A detection dataset: COCO ``categories`` (label ``i`` is ``categories[i - 1]``, unless
    ``label_ids`` says otherwise), splits of samples (see the module docstring), and its
    keypoints' names and OKS sigmas."""
    name: str
    categories: tuple
    train: object
    test: object
    keypoint_names: tuple = ()
    keypoint_sigmas: tuple = ()
    label_ids: tuple = ()  # the category id of each label 1..n, 0 where none (COCO's labels = ids)

    @property
    def num_classes(self) -> int:
        """Object classes, background not counted (labels are 1..num_classes)."""
        return len(self.label_ids) if self.label_ids else len(self.categories)

    @property
    def category_ids(self) -> tuple:
        """The COCO category id of each label 1..num_classes (0: a label no category has)."""
        return tuple(self.label_ids) if self.label_ids else tuple(int(c["id"]) for c in self.categories)

    @property
    def num_keypoints(self) -> int:
        return len(self.keypoint_names)


class ScenesSplit:
    """``count`` generated scenes of one split; ``split[i]`` is a sample dict."""

    def __init__(self, seed: int, split: str, count: int, min_side: int = 64, max_side: int = 128,
                 max_objects: int = 4):
        if not (16 <= min_side <= max_side) or count < 1 or max_objects < 1:
            raise ValueError(f"scenes need 16 <= min_side <= max_side, count >= 1 and max_objects >= 1; got "
                             f"min_side={min_side}, max_side={max_side}, count={count}, max_objects={max_objects}")
        self.seed, self.split, self.count = seed, split, count
        self.min_side, self.max_side, self.max_objects = min_side, max_side, max_objects

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index) -> dict:
        i = base.check_index(index, self.count)
        with one_thread():
            return scene(rng.generator("scenes", self.seed, self.split, i), self.min_side, self.max_side,
                         self.max_objects, image_id=i)


def build(data_cfg) -> DetectionDataset:
    """The scenes dataset from ``config.data`` (num_train, num_test, seed, min_side, max_side,
    max_objects_per_image)."""
    get = lambda key, default: int(data_cfg.get(key, default)) if hasattr(data_cfg, "get") else default
    seed = get("seed", 0)
    sides = get("min_side", 64), get("max_side", 128)
    objects = get("max_objects_per_image", 4)
    return DetectionDataset("scenes", CATEGORIES,
                            ScenesSplit(seed, "train", get("num_train", 2048), *sides, objects),
                            ScenesSplit(seed, "test", get("num_test", 256), *sides, objects),
                            KEYPOINT_NAMES, KEYPOINT_SIGMAS)


# ---------------------------------------------------------------- one scene
def _uniform(g, lo, hi):
    return lo + (hi - lo) * float(torch.rand((), generator=g))


def _randint(g, lo, hi):
    """An int in lo..hi, both included."""
    return int(torch.randint(lo, hi + 1, (), generator=g))


def background(g, height, width):
    """A float 3×H×W background in [0, 1]: a colour plus one of three textures and pixel noise."""
    colour = torch.rand(3, 1, 1, generator=g) * 0.8 + 0.1
    kind = _randint(g, 0, 2)
    y = torch.arange(height, dtype=torch.float32)[:, None]
    x = torch.arange(width, dtype=torch.float32)[None, :]
    if kind == 0:  # smooth noise
        coarse = torch.rand(3, height // 8 + 2, width // 8 + 2, generator=g) - 0.5
        texture = F.interpolate(coarse[None], size=(height, width), mode="bilinear", align_corners=False)[0] * 0.4
    elif kind == 1:  # stripes at an angle
        angle, period = _uniform(g, 0, math.pi), _uniform(g, 5, 16)
        wave = torch.sin(2 * math.pi * (x * math.cos(angle) + y * math.sin(angle)) / period)
        texture = wave[None] * (torch.rand(3, 1, 1, generator=g) * 0.2)
    else:  # checkerboard
        cell = _randint(g, 4, 12)
        board = ((x // cell + y // cell) % 2) - 0.5
        texture = board[None] * (torch.rand(3, 1, 1, generator=g) * 0.3)
    noise = torch.randn(3, height, width, generator=g) * 0.03
    return colour + texture + noise, colour.flatten()


def shape_mask(kind, box, apex_x, height, width):
    """Bool H×W: pixels whose centre lies inside the shape, and its 3 keypoints [(x, y)] * 3."""
    x0, y0, x1, y1 = box
    py = torch.arange(height, dtype=torch.float32)[:, None] + 0.5
    px = torch.arange(width, dtype=torch.float32)[None, :] + 0.5
    if kind == 0:  # rectangle
        mask = (px >= x0) & (px < x1) & (py >= y0) & (py < y1)
        points = [((x0 + x1) / 2, y0), (x0, y1), (x1, y1)]
    elif kind == 1:  # ellipse
        cx, cy, a, b = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
        mask = ((px - cx) / a) ** 2 + ((py - cy) / b) ** 2 <= 1
        points = [(cx, y0), (x0, cy), (x1, cy)]
    else:  # triangle: apex (apex_x, y0), base from (x0, y1) to (x1, y1)
        def right_of(ax, ay, bx, by):  # the side of edge a->b the interior lies on (clockwise in y-down)
            return (bx - ax) * (py - ay) - (by - ay) * (px - ax) >= 0
        mask = (right_of(apex_x, y0, x1, y1) & right_of(x1, y1, x0, y1) & right_of(x0, y1, apex_x, y0))
        points = [(apex_x, y0), (x0, y1), (x1, y1)]
    return mask, points


def scene(g, min_side=64, max_side=128, max_objects=4, image_id=0) -> dict:
    """One scene drawn from generator ``g`` (see the module docstring)."""
    height, width = _randint(g, min_side, max_side), _randint(g, min_side, max_side)
    image, bg_colour = background(g, height, width)
    wanted = _randint(g, 1, max_objects)
    shade = torch.randn(3, height, width, generator=g) * 0.02  # the objects' pixel noise
    objects = []  # (label, full mask, keypoints)
    visible = []  # each object's visible mask so far
    for _ in range(wanted):
        kind = _randint(g, 0, len(CLASSES) - 1)
        for _attempt in range(20):
            short = min(height, width)
            w, h = _uniform(g, 14, 0.6 * short), _uniform(g, 14, 0.6 * short)
            x0, y0 = _uniform(g, 1, width - 1 - w), _uniform(g, 1, height - 1 - h)
            apex_x = _uniform(g, x0, x0 + w)
            mask, points = shape_mask(kind, (x0, y0, x0 + w, y0 + h), apex_x, height, width)
            if all((v & mask).sum() <= MAX_COVER * v.sum() for v in visible):
                break
        else:
            continue  # no place found: fewer objects
        for _ in range(10):  # a colour that stands out from the background
            colour = torch.rand(3, generator=g)
            if (colour - bg_colour).abs().mean() >= MIN_CONTRAST:
                break
        image = torch.where(mask[None], colour[:, None, None] + shade, image)
        visible = [v & ~mask for v in visible] + [mask]
        objects.append((kind + 1, mask, points))
    image = (image.clamp(0, 1) * 255).round().to(torch.uint8)
    return _sample(image, objects, visible, image_id)


def _sample(image, objects, visible, image_id):
    k, (height, width) = len(objects), image.shape[-2:]
    boxes = torch.zeros(k, 4)
    keypoints = torch.zeros(k, len(KEYPOINT_NAMES), 3)
    for i, ((label, mask, points), vis) in enumerate(zip(objects, visible)):
        ys, xs = torch.nonzero(vis, as_tuple=True)
        boxes[i] = torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)
        for j, (x, y) in enumerate(points):
            col, row = min(int(x), width - 1), min(int(y), height - 1)
            covered = any(later[row, col] for _, later, _ in objects[i + 1:])
            keypoints[i, j] = torch.tensor([x, y, 1.0 if covered else 2.0])
    masks = torch.stack(visible).to(torch.uint8) if k else torch.zeros(0, height, width, dtype=torch.uint8)
    return {"image": image, "boxes": boxes, "labels": torch.tensor([o[0] for o in objects], dtype=torch.int64),
            "masks": masks, "keypoints": keypoints, "iscrowd": torch.zeros(k, dtype=torch.bool),
            "area": masks.flatten(1).sum(1).to(torch.float32), "image_id": int(image_id)}
