"""Input pipeline throughput at 224 px: fpipe's loader vs torch DataLoader + Pillow transforms.

    PYTHONPATH=. python benchmarks/input_pipeline.py [--workers 2] [--rounds 3]
    PYTHONPATH=. python benchmarks/input_pipeline.py --progressive        # other encodings, sizes:
    PYTHONPATH=. python benchmarks/input_pipeline.py --quality 95 --subsampling 4:4:4 --size 2

Writes ~2,000 photo-like JPEGs (about 500×375 times ``--size``, varied sizes and orientations,
quality 90, 4:2:0, sequential: ~65 KB each) once into a temporary folder named by those settings
(or reads your own: ``--dir`` an image folder with ``train/<class>/`` images; it is never written
to), then times whole epochs over them (worker start included) for both pipelines with the same
batch size and number of worker processes:

- train: random_resized_crop(224) | flip | normalize (``--rand-augment``: | rand_augment | before
  normalize, timm's rand-m9-mstd0.5-inc1, the fine-tuning recipes' pipeline)
- eval:  resize(256) | center_crop(224) | normalize

The baseline is what a torchvision user writes, by hand because torchvision is not installed:
``Image.open(path).convert("RGB")`` (torchvision's ``default_loader``), torchvision's PIL code
paths per sample — ``RandomResizedCrop`` (its box draw and fallback; crop then resize, bilinear),
``RandomHorizontalFlip`` (transpose), ``ToTensor``, ``Normalize`` (in place, i.e. with
``inplace=True``; torchvision's default clones first, which is slower) — and ``DataLoader``'s
default collate; with ``--rand-augment`` the same Pillow RandAugment ops on the flipped PIL image, as
timm's transform applies them (python's and numpy's generators draw them). Both give float32
normalised N×3×224×224 batches.
Rounds are interleaved and the median of each is kept (the machine is shared). Two rates: images
per wall-clock second, and images per CPU-second (user + system time of the process and its
workers: what one core delivers, robust to other load on the machine; use it to size a node).
Both sides run 1 torch thread per process.
"""
import argparse
import math
import os
import random
import resource
import tempfile
import time

import numpy as np
import torch
import torch.utils.data
from PIL import Image

from fpipe import data
from fpipe.data import image_folder, rand_augment

MEAN, STD = data.transforms.IMAGENET_MEAN, data.transforms.IMAGENET_STD
TRAIN, EVAL = "random_resized_crop|flip|normalize", "resize(256)|center_crop|normalize"


ENCODING = dict(quality=90, subsampling="4:2:0", progressive=False, size=1.0)  # the default set


def encoding_tag(encoding: dict) -> str:
    """A name for a set of generated JPEGs: "" for the default encoding, else its settings."""
    changed = {k: v for k, v in encoding.items() if v != ENCODING[k]}
    return "_".join(k if v is True else f"{k}{str(v).replace(':', '')}" for k, v in sorted(changed.items()))


def default_dir(count: int, encoding: dict = ENCODING) -> str:
    """The temporary folder of ``count`` generated JPEGs of ``encoding``, named by both, so that
    benchmarks asking for different sets never share (and refuse) one folder."""
    tag = encoding_tag({**ENCODING, **encoding})
    return os.path.join(tempfile.gettempdir(), f"fpipe_bench_jpegs_{count}" + (f"_{tag}" if tag else ""))


def make_jpegs(root: str, count: int, classes: int = 10, encoding: dict = ENCODING) -> bool:
    """``count`` JPEGs under root/train/<class>/, photo-like: smooth colour fields, shapes with
    edges and sensor-like noise, encoded as ``encoding`` says (``ENCODING``'s keys: Pillow's
    quality, chroma subsampling, progressive, and a size factor); written once (a marker file
    records completion and the encoding). A folder that already holds other files (your own
    ``train/<class>/`` images) is used as it is, never written to: returns False then; one
    generated with another encoding is refused."""
    encoding = {**ENCODING, **encoding}
    tag = encoding_tag(encoding)
    marker = os.path.join(root, f"done_{count}" + (f"_{tag}" if tag else ""))
    if os.path.exists(marker):
        return True
    if os.path.isdir(root) and os.listdir(root):
        others = [f for f in os.listdir(root) if f.startswith("done_")]
        if others:
            raise SystemExit(f"{root!r} holds JPEGs generated otherwise ({others[0]}); give "
                             "another --dir, or the settings they were generated with")
        if not os.path.isdir(os.path.join(root, "train")):
            raise SystemExit(f"{root!r} holds files but no train/<class>/ images; give an "
                             "empty or new --dir for generated JPEGs, or an image folder")
        return False
    g = np.random.default_rng(0)
    for k in range(count):
        width, height = int(g.integers(400, 640)), int(g.integers(300, 480))
        if g.random() < 0.25:
            width, height = height, width  # portrait
        rows, cols = np.mgrid[0:height, 0:width]
        yy, xx = rows / 500.0, cols / 500.0
        fields = [np.sin(xx * g.uniform(2, 12) + g.uniform(0, 6)) *
                  np.cos(yy * g.uniform(2, 12) + g.uniform(0, 6)) for _ in range(3)]
        pixels = np.stack(fields, -1) * 70 + g.uniform(60, 190, 3)
        for _ in range(int(g.integers(3, 9))):  # shapes: hard edges, as objects have
            cy, cx, ry, rx = g.uniform(0, height), g.uniform(0, width), *g.uniform(20, 150, 2)
            inside = ((rows - cy) / ry) ** 2 + ((cols - cx) / rx) ** 2 < 1
            pixels[inside] = g.uniform(0, 255, 3)
        pixels += g.normal(0, 9, pixels.shape)
        folder = os.path.join(root, "train", f"class_{k % classes}")
        os.makedirs(folder, exist_ok=True)
        image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
        if encoding["size"] != 1.0:
            image = image.resize((max(1, round(width * encoding["size"])),
                                  max(1, round(height * encoding["size"]))), Image.BICUBIC)
        image.save(os.path.join(folder, f"{k:05d}.jpg"), quality=encoding["quality"],
                   subsampling=encoding["subsampling"], progressive=encoding["progressive"])
    open(marker, "w").close()
    return True


# --- the baseline: torchvision's PIL code paths, written out -----------------------------------

def pil_loader(path):
    with open(path, "rb") as f:
        return Image.open(f).convert("RGB")


def rrc_box(width, height, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    area = width * height
    for _ in range(10):
        target = area * random.uniform(*scale)
        aspect = math.exp(random.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top, left = random.randint(0, height - h), random.randint(0, width - w)
            return left, top, left + w, top + h
    in_ratio = width / height  # torchvision's fallback: the central crop, aspect clamped to ratio
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    top, left = (height - h) // 2, (width - w) // 2
    return left, top, left + w, top + h


def to_tensor(image):
    x = torch.from_numpy(np.array(image, np.uint8, copy=True)).permute(2, 0, 1).contiguous()
    return x.to(torch.float32).div(255)


def normalize(x):
    mean = torch.tensor(MEAN).view(-1, 1, 1)
    std = torch.tensor(STD).view(-1, 1, 1)
    return x.sub_(mean).div_(std)


class GlobalDraws:
    """RandAugment's draws as timm makes them: the ops by numpy's global generator, the rest by python's."""

    def choice(self, n, k):
        return list(np.random.choice(n, k))

    def random(self):
        return random.random()

    def gauss(self, mu, sigma):
        return random.gauss(mu, sigma)


def baseline_train(image, size=224, augment=False):
    image = image.crop(rrc_box(*image.size)).resize((size, size), Image.BILINEAR)
    if random.random() < 0.5:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    if augment:
        image = rand_augment.augment(image, GlobalDraws())
    return normalize(to_tensor(image))


def baseline_eval(image):
    w, h = image.size
    short, long = min(w, h), max(w, h)
    scaled = int(256 * long / short)
    image = image.resize((256, scaled) if w <= h else (scaled, 256), Image.BILINEAR)
    w, h = image.size
    left, top = int(round((w - 224) / 2)), int(round((h - 224) / 2))
    return normalize(to_tensor(image.crop((left, top, left + 224, top + 224))))


class Files(torch.utils.data.Dataset):
    def __init__(self, files, labels, transform):
        self.files, self.labels, self.transform = files, labels, transform

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        return self.transform(pil_loader(self.files[i])), int(self.labels[i])


def _seed_worker(worker_id):
    random.seed(torch.initial_seed() % 2 ** 32)
    np.random.seed(torch.initial_seed() % 2 ** 32)


# --- timing ------------------------------------------------------------------------------------

def cpu_seconds() -> float:
    """User + system time of this process and of its finished (joined) worker processes."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(
        resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def epoch_time(make_batches) -> tuple:
    """``(wall seconds, CPU seconds, images)`` of one pass, worker start and shutdown included."""
    start, cpu, images = time.perf_counter(), cpu_seconds(), 0
    batches = make_batches()
    for batch in batches:
        images += len(batch["image"] if isinstance(batch, dict) else batch[0])
    del batches  # joins the workers, so their CPU time is counted
    return time.perf_counter() - start, cpu_seconds() - cpu, images


def _first(split, n):
    keep = torch.randperm(len(split), generator=torch.Generator().manual_seed(0))[:n].sort()[0]
    every = split.files
    files = [every[i] for i in keep]
    return image_folder.FolderSplit(files, split.labels[keep].tolist())


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--images", type=int, default=2000, help="JPEGs written")
    parser.add_argument("--limit", type=int, default=0, help="use only the first N (0: all)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quality", type=int, default=ENCODING["quality"], help="of the generated JPEGs")
    parser.add_argument("--subsampling", default=ENCODING["subsampling"], choices=("4:4:4", "4:2:2", "4:2:0"),
                        help="the generated JPEGs' chroma subsampling")
    parser.add_argument("--progressive", action="store_true", help="generate progressive JPEGs")
    parser.add_argument("--size", type=float, default=ENCODING["size"],
                        help="the generated images' sides times this (1: about 500×375)")
    parser.add_argument("--rand-augment", action="store_true", help="train with timm's RandAugment too")
    parser.add_argument("--dir", default=None, help="an image folder (default: generated JPEGs in "
                        "a temporary folder named by --images and the settings above)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    encoding = dict(quality=args.quality, subsampling=args.subsampling, progressive=args.progressive,
                    size=args.size)
    if args.dir is None:
        args.dir = default_dir(args.images, encoding)
    generated = make_jpegs(args.dir, args.images, encoding=encoding)
    cfg = data.default_config()
    cfg.update(dict(name="image_folder", root=args.dir, image_size=224, batch_size=args.batch,
                    eval_batch_size=args.batch, num_workers=args.workers,
                    train_transforms=TRAIN.replace("|normalize", "|rand_augment|normalize") if args.rand_augment
                    else TRAIN,
                    eval_transforms=EVAL))
    split, classes = image_folder.folder_split(args.dir)  # train and eval both read these images
    ds = data.Dataset("image_folder", classes, split, None)
    if args.limit:
        ds = data.Dataset(ds.name, ds.classes, _first(ds.train, args.limit), None)
    sizes = [os.path.getsize(f) for f in ds.train.files]
    what = f"generated JPEGs ({encoding_tag(encoding) or 'the default encoding'})" if generated else "of your images"
    print(f"{len(sizes)} {what} in {args.dir}, "
          f"mean {np.mean(sizes) / 1e3:.0f} KB; batch "
          f"{args.batch}, {args.workers} worker processes, 1 torch thread")
    runs = {
        ("train", "fpipe"): lambda: data.Loader(ds.train, cfg, train=True).epoch(0),
        ("eval", "fpipe"): lambda: data.Loader(ds.train, cfg, train=False).epoch(0),
    }
    train = (lambda image: baseline_train(image, augment=True)) if args.rand_augment else baseline_train
    for kind, transform in (("train", train), ("eval", baseline_eval)):
        runs[(kind, "baseline")] = lambda transform=transform, kind=kind: iter(torch.utils.data.DataLoader(
            Files(ds.train.files, ds.train.labels, transform), batch_size=args.batch,
            shuffle=kind == "train", drop_last=kind == "train", num_workers=args.workers,
            worker_init_fn=_seed_worker, prefetch_factor=2 if args.workers else None))
    wall, cpu, counts = {key: [] for key in runs}, {key: [] for key in runs}, {}
    for _ in range(args.rounds):
        for key, make in runs.items():
            seconds, cpu_used, counts[key] = epoch_time(make)
            wall[key].append(seconds)
            cpu[key].append(cpu_used)
    for kind in ("train", "eval"):
        rate = {who: counts[(kind, who)] / np.median(wall[(kind, who)]) for who in ("fpipe", "baseline")}
        core = {who: counts[(kind, who)] / np.median(cpu[(kind, who)]) for who in ("fpipe", "baseline")}
        print(f"{kind:5s} img/s: fpipe {rate['fpipe']:6.1f}, DataLoader+Pillow "
              f"{rate['baseline']:6.1f}, ratio {rate['fpipe'] / rate['baseline']:.2f} | img per "
              f"CPU-second: fpipe {core['fpipe']:6.1f}, DataLoader+Pillow {core['baseline']:6.1f}, "
              f"ratio {core['fpipe'] / core['baseline']:.2f}")
    # The two pipelines compute the same thing: compare the first eval batch in pixel levels.
    ours = next(iter(data.Loader(ds.train, cfg, train=False).epoch(0)))["image"]
    theirs = torch.stack([baseline_eval(pil_loader(ds.train.files[i])) for i in range(len(ours))])
    levels = lambda x: x * torch.tensor(STD).view(-1, 1, 1) * 255 + torch.tensor(MEAN).view(-1, 1, 1) * 255
    per_image = (levels(ours) - levels(theirs)).abs().mean((1, 2, 3))
    print(f"eval, the first {len(ours)} images, fpipe vs baseline: mean |difference| "
          f"{per_image.mean().item():.3f} pixel levels (the worst image {per_image.max().item():.3f})")


if __name__ == "__main__":
    main()
