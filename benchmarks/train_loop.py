"""The whole training loop on JPEGs: ``main.py`` against the loop a PyTorch user writes.

    PYTHONPATH=. python benchmarks/train_loop.py                  # supervised ResNet-18, 224 px, b32, 2 workers
    PYTHONPATH=. python benchmarks/train_loop.py --mode finetune --depth 50 --image-size 128 --steps 30
    PYTHONPATH=. python benchmarks/train_loop.py --freeze trunk --depth 50 --image-size 64 --batch-size 64

The step benchmarks time one step on a batch already in memory. A user's run also decodes and
augments JPEGs in worker processes that share the cores with the step, waits for batches, and
logs. This times that, each program in a process of its own, on the same folder of real-size
JPEGs (input_pipeline.py's, written once, or your own ``--dir`` with ``train/<class>/`` images),
with the same batch size, worker processes and number of steps:

  fpipe     ``python main.py --config=configs/<mode>.py`` on the folder (``image_folder``, a split
            file listing its images), compiled as a full-size run is (``compile_min_images=0``),
            train transforms ``random_resized_crop|flip|normalize``, ``data.num_workers``
            workers; its own images/s (``metrics.jsonl``: the loop's timer, from the end of step 2
            to the end of the last step).
  eager, compiled, eager_cl, compiled_cl  the loop written by hand: ``DataLoader(shuffle=True,
            drop_last=True, num_workers=...)`` over input_pipeline.py's Pillow transforms
            (torchvision's code paths) at the same size, train_step.py's nn.Module and
            ``torch.optim.SGD(foreach=True)`` with the config's param groups, ``loss.item()`` every
            ``--log-steps`` as a user prints it; ``torch.compile`` of the module for the compiled
            ones, channels-last memory for ``_cl``. Images/s over the same steps, timed the same way.
            ``--baseline-niceness 19`` runs their workers at the lowest CPU priority, as fpipe's
            run by default (``data.worker_niceness``): what that alone gives a hand-written loop.

Each process runs with torch's default thread count (or ``--threads``) and the allocator setting
``main.py`` uses (benchmarks/linear_eval_step.py's ``as_main_does``). Output: each program's
images/s (median over ``--rounds``; the programs' order alternates between rounds) and
``ratio_vs_<baseline>``: fpipe's images/s over the baseline's (>1: fpipe trains faster). No goal
of its own: the train-step goals (train_step.py) are what fpipe owes; this shows how much of
them survives a real run.
"""
import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
import torch.utils.data

from benchmarks import input_pipeline, train_step
from benchmarks.linear_eval_step import RESNETS, as_main_does, machine, resnet_arg, resnet_options, resnet_title, scratch_dir
from fpipe.data import image_folder

BASELINES = ("eager", "compiled", "eager_cl", "compiled_cl")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def folder_images(args):
    """The folder's train images (written first if it is input_pipeline.py's), as fpipe's
    image_folder finds them: ``(files, label indices, class names, generated)``."""
    generated = input_pipeline.make_jpegs(args.dir, args.images)
    split, classes = image_folder.folder_split(args.dir)
    return split.files, [int(k) for k in split.labels], classes, generated


def held_out(files, labels, test_images):
    """``(train rows, test rows)`` of ``(file, label)``: ``test_images`` spread evenly over the
    folder (over its classes) are held out for main.py's final evaluation, the rest train (every
    program the same)."""
    rows = list(zip(files, labels))
    test = set(range(0, len(rows), max(len(rows) // max(test_images, 1), 1))[:test_images])
    return [r for i, r in enumerate(rows) if i not in test], [r for i, r in enumerate(rows) if i in test]


def split_file(files, labels, classes, test_images):
    """A split file with the rows of :func:`held_out` as ``train`` and ``test`` (main.py evaluates
    once at the end; that is not timed)."""
    path = os.path.join(scratch_dir("fpipe-train-loop-split-"), "split.csv")
    with open(path, "w") as f:
        for split, rows in zip(("train", "test"), held_out(files, labels, test_images)):
            f.writelines(f"{file},{classes[label]},{split}\n" for file, label in rows)
    return path


# ---------------------------------------------------------------- the programs, each in its own process
def run_fpipe(args, csv):
    """main.py on the folder; its images/s from metrics.jsonl."""
    workdir = os.path.join(scratch_dir("fpipe-train-loop-run-"), "run")
    flags = {"data.name": "image_folder", "data.root": args.dir, "data.split_file": csv,
             "data.train_split": "train", "data.test_split": "test", "data.image_size": args.image_size,
             "data.batch_size": args.batch_size, "data.num_workers": args.workers,
             "data.train_transforms": input_pipeline.TRAIN,
             **{f"model.trunk.{k}": v for k, v in resnet_options(args.depth).items()},
             "total_steps": args.steps, "log_steps": args.log_steps, "compile_min_images": 0,
             "compile_cache_dir": scratch_dir("fpipe-train-loop-cache-")}
    if args.freeze:
        flags["model.freeze"] = repr(tuple(args.freeze))
    cmd = [sys.executable, os.path.join(REPO, "main.py"), f"--config={os.path.join(REPO, 'configs', args.mode)}.py",
           f"--workdir={workdir}", *(f"--config.{k}={v}" for k, v in flags.items())]
    done = subprocess.run(cmd, cwd=REPO, env=_child_env(args), capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"main.py failed ({done.returncode}):\n{done.stderr[-3000:]}")
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    last = [r for r in rows if r.get("step") == args.steps and "images_per_s" in r]
    if not last:
        raise SystemExit(f"main.py logged no images_per_s at step {args.steps}: {rows[-3:]}")
    return last[-1]["images_per_s"]


def run_baseline(args, argv, name):
    """The hand-written loop ``name`` in a fresh process (this file with this run's ``argv`` and
    ``--child``); its images/s."""
    cmd = [sys.executable, os.path.abspath(__file__), *argv, "--child", name]
    done = subprocess.run(cmd, cwd=REPO, env=_child_env(args), capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"the {name} loop failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])["images_per_s"]


def _child_env(args):
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    return env


def baseline_loop(args, name):
    """What a torchvision user writes: DataLoader + Pillow transforms, nn.Module, torch.optim.
    Prints its images/s over steps 3..``--steps`` as JSON."""
    as_main_does(torch.get_num_threads())
    files, labels, classes, _ = folder_images(args)
    files, labels = zip(*held_out(files, labels, args.test_images)[0])
    s = train_step.setup(args.mode, args.depth, args.image_size, args.batch_size, freeze_rules=args.freeze)
    channels_last = name.endswith("_cl")
    net = train_step.torch_net(s)
    net.fc = torch.nn.Linear(net.fc.in_features, len(classes))  # the folder's classes, as main.py's head has
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    opt = train_step.torch_optimizer(net, s)
    forward = torch.compile(net) if name.startswith("compiled") else net
    transform = functools.partial(input_pipeline.baseline_train, size=args.image_size)
    loader = torch.utils.data.DataLoader(
        input_pipeline.Files(files, labels, transform), batch_size=args.batch_size, shuffle=True,
        drop_last=True, num_workers=args.workers, generator=torch.Generator().manual_seed(0),
        worker_init_fn=functools.partial(_worker_start, args.baseline_niceness))
    ends = []
    for step, (images, target) in enumerate(loader, 1):
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(forward(images), target)
        loss.backward()
        opt.step()
        if step % args.log_steps == 0:
            loss.item()
        ends.append(time.perf_counter())
        if step == args.steps:
            break
    if len(ends) < args.steps:
        raise SystemExit(f"{len(files)} images give {len(ends)} batches of {args.batch_size}; "
                         f"--steps {args.steps} needs more (--images)")
    print(json.dumps({"images_per_s": args.batch_size * (args.steps - 2) / (ends[-1] - ends[1])}))


def _worker_start(niceness, worker_id):
    """input_pipeline.py's worker seeding; ``niceness`` below the loop's CPU priority, as fpipe's workers run."""
    input_pipeline._seed_worker(worker_id)
    os.nice(niceness)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mode", choices=train_step.MODES, default="supervised")
    parser.add_argument("--depth", type=resnet_arg, default=18, metavar="RESNET",
                        help=f"a ResNet depth or name: {', '.join(map(str, RESNETS))}")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=30, help="train steps a run takes (the first two untimed)")
    parser.add_argument("--log-steps", type=int, default=10)
    parser.add_argument("--images", type=int, default=None,
                        help="JPEGs written (at least steps × batch + test images; default: that, and at least 1,280)")
    parser.add_argument("--test-images", type=int, default=32,
                        help="images spread over the folder, held out for main.py's final evaluation (untimed)")
    parser.add_argument("--freeze", nargs="+", default=[], metavar="REGEX",
                        help="model.freeze rules, as train_step.py's; 'trunk': linear evaluation of the "
                             "trunk's pooled features (main.py's frozen trunk, the baselines' trunk without "
                             "gradients and in eval mode)")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="torch threads per process (0: torch's default)")
    parser.add_argument("--programs", nargs="+", choices=BASELINES, default=list(BASELINES), help="baselines")
    parser.add_argument("--baseline-niceness", type=int, default=0,
                        help="the baselines' workers this far below their loop in CPU priority (fpipe's: "
                             "data.worker_niceness, 19); 0: as DataLoader runs them")
    parser.add_argument("--dir", default=None, help="an image folder with train/<class>/ images (default: "
                        "input_pipeline.py's generated JPEGs, --images of them, in a temporary folder)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    if args.images is None:
        args.images = max(1280, args.steps * args.batch_size + args.test_images)
    if args.dir is None:
        args.dir = input_pipeline.default_dir(args.images)
    if args.child:
        return baseline_loop(args, args.child)
    if args.steps < 3 or args.steps * args.batch_size > args.images - args.test_images:
        parser.error(f"--steps must be at least 3 and --steps × --batch-size ({args.steps} × {args.batch_size}) "
                     f"at most --images less --test-images ({args.images} - {args.test_images})")
    files, labels, classes, generated = folder_images(args)
    csv = split_file(files, labels, classes, args.test_images)
    print(f"{len(files)} {'generated JPEGs' if generated else 'of your images'} in {args.dir}, {len(classes)} classes "
          f"({args.test_images} held out for main.py's final evaluation)")
    print(f"machine: {machine()}")
    frozen = f", frozen {' '.join(args.freeze)}" if args.freeze else ""
    print(f"== {args.mode} {resnet_title(args.depth)}{frozen}, {args.image_size} px, batch {args.batch_size}, "
          f"{args.workers} workers, {args.steps} steps (images/s from step 3 on), {args.rounds} round(s)")
    names = ["fpipe", *args.programs]
    rates = {n: [] for n in names}
    for r in range(args.rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            rates[name].append(run_fpipe(args, csv) if name == "fpipe" else run_baseline(args, argv, name))
            print(f"  round {r + 1}: {name:12s} {rates[name][-1]:7.1f} images/s", flush=True)
    rate = {n: statistics.median(v) for n, v in rates.items()}
    for name in names:
        print(f"{name:12s} {rate[name]:7.1f} images/s")
    for name in args.programs:
        print(f"ratio_vs_{name}: {rate['fpipe'] / rate[name]:.3f}")


if __name__ == "__main__":
    main()
