"""Data-parallel training step over processes: fpipe under torchrun vs. DistributedDataParallel.

    PYTHONPATH=. python benchmarks/ddp_step.py                  # 2 processes, supervised ResNet-18, 64 px, b32 each
    PYTHONPATH=. python benchmarks/ddp_step.py --mode finetune --depth 50 --image-size 32
    PYTHONPATH=. python benchmarks/ddp_step.py --arch vit_s16 --optimizer adamw --mode finetune --batch-size 16

Run as above, it starts ``--nproc`` processes with ``torch.distributed.run`` (torchrun; gloo on
CPU, NCCL with ``--device cuda``, one GPU each), each with ``--threads`` threads (default: the
cores divided among them, where torchrun alone would give each one). Every process holds the
same network (train_step.py's setups: the shipped configs, ResNets or the other trunks) and its
own batch of ``--batch-size`` images. Programs, timed round-robin, each call started together
on all ranks (a barrier), medians on rank 0:

  fpipe     the loop's step for a multi-process run (``loop.build_train_step`` with the run's
            ``Dist``: gradients averaged inside the compiled step, fpipe.train.distributed).
  eager, compiled, eager_cl, compiled_cl  train_step.py's nn.Module baselines wrapped in
            ``DistributedDataParallel`` (its default 25 MB buckets, all-reduces overlapped with
            the backward), ``torch.compile`` of the wrapped module for the compiled ones (Dynamo's
            DDP optimizer splits the graph at the buckets), ``_cl``: channels-last.

Output: each program's median step time, images/s over all processes and page faults a step,
and ``interleaved_ratio_vs_<baseline>``: its time / fpipe's (>1: fpipe is faster). Then
``alone_ratio_vs_<baseline>``, with train_step.py's goals: the same from each program alone in its
own torchrun launch, as a user runs one (skip with ``--no-alone``). The interleaved ratios are
not the goals' measure: programs interleaved in one process share its heap, and the more of them,
the slower fpipe's step (ResNet-50 64 px b16: 6, 454 and 1278 faults a step beside one, two and
four baselines; 271, 297 and 343 ms. Finetune ResNet-18 32 px b16: 61.6-66.4 ms beside any one or
three baselines, 105 ms beside all four, 60.5 ms alone, while the eager module takes 88-91 ms in
every setting. It comes and goes: two later runs beside all four took 67.8 and 72.8 ms with no
faults. When it comes, the time is in the compiled step's own kernels, first touching memory the
process was given afresh: torch.profiler's self time of the compiled graph 124 vs 10.7 ms a step,
8,210 faults, while its convolutions and collectives take what they take alone). The same in
train_step.py with a large model showed where the memory comes from: the heap's new top. Finetune
wide_resnet50_2 64 px b32 beside the four baselines in one process, fpipe's slow steps faulted
5.6k-27k pages and grew the heap by 22-56 MB each while it held 1.2 GB free in holes (mallinfo2):
its blocks fit no hole the others' live blocks left; train_step.py now runs each program in a
process of its own, and ``main.py``'s own steps fault ~10 pages each, median, with the loader in
the process (supervised ResNet-18 64 px b64, no workers).
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.distributed as tdist
from torch.nn.parallel import DistributedDataParallel

from benchmarks import train_step
from benchmarks.linear_eval_step import NUM_CLASSES, as_main_does, machine, own_compile_cache, resnet_arg
from fpipe import host_memory
from fpipe.train import distributed
from fpipe.train import loop as loop_lib


def rank_setup(args, dist):
    """train_step.py's setup, the same network on every rank, this rank's own images."""
    s = train_step.setup(args.mode, args.depth, args.image_size, args.batch_size, arch=args.arch,
                         optimizer=args.optimizer, freeze_rules=args.freeze)
    gen = torch.Generator().manual_seed(1000 + dist.rank)
    s["batch"] = loop_lib.to_device(
        {"image": torch.randn(args.batch_size, 3, args.image_size, args.image_size, generator=gen),
         "label": torch.randint(0, NUM_CLASSES, (args.batch_size,), generator=gen)}, dist.device)
    return s


def ddp_program(s, dist, compiled, channels_last):
    """train_step.py's nn.Module step, the module wrapped in DistributedDataParallel."""
    cuda = dist.device.type == "cuda"
    wrap = lambda net: DistributedDataParallel(net.to(dist.device), device_ids=[dist.device.index] if cuda else None)
    return train_step.module_program(s, compiled, channels_last, wrap=wrap, **({"fused": True} if cuda else {}))


def timed(run, dist, losses=None):
    """One call, started together on every rank: seconds until this rank has its result, and the
    page faults it took (a program faulting its memory in afresh each step pays for it);
    ``losses``: a list that gets the call's loss."""
    tdist.barrier()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t = time.perf_counter()
    loss = run()
    if dist.device.type == "cuda":
        torch.cuda.synchronize()
    else:
        float(loss)
    seconds = time.perf_counter() - t
    if losses is not None:
        losses.append(float(loss))
    return seconds, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults


def rank_main(args):
    as_main_does(args.threads)
    own_compile_cache()
    dist = distributed.init()
    s = rank_setup(args, dist)
    programs = {}
    for name in args.programs:
        programs[name] = (train_step.fpipe_program(s, device=dist.device, dist=dist) if name == "fpipe" else
                          ddp_program(s, dist, name.startswith("compiled"), name.endswith("_cl")))
    first, times, faults = {}, {n: [] for n in programs}, {n: [] for n in programs}
    losses = {n: [] for n in programs}  # the first calls': equal across programs, as a check
    for name, run in programs.items():
        first[name] = timed(run, dist, losses[name])[0]
        host_memory.keep_large_blocks()  # as the train loops do after their first step
        for _ in range(args.warmup - 1):
            timed(run, dist, losses[name])
    for _ in range(args.iters):
        for name, run in programs.items():
            seconds, minor_faults = timed(run, dist)
            times[name].append(seconds)
            faults[name].append(minor_faults)
    if dist.is_main:
        med = {n: statistics.median(v) for n, v in times.items()}
        print("RESULT " + json.dumps({n: med[n] for n in programs}))
        images = args.batch_size * dist.world_size
        print(f"== {train_step.case_name(args, args.mode, args.depth)}, {args.image_size}px, {dist.world_size} "
              f"processes ({dist.backend}, {args.threads} threads each), batch {args.batch_size} each, median of "
              f"{args.iters} interleaved rounds after {args.warmup} warm-up")
        print("rank 0's first losses: " + "  ".join(f"{n} " + " ".join(f"{v:.5f}" for v in losses[n]) for n in programs))
        for n in programs:
            print(f"{n:11s} {med[n] * 1e3:8.1f} ms  {images / med[n]:7.1f} images/s   first call {first[n]:6.1f} s"
                  f"   page faults a step {statistics.median(faults[n]):8.0f}")
        for base in train_step.GOALS:
            if "fpipe" in med and base in med:
                print(f"interleaved_ratio_vs_{base}: {med[base] / med['fpipe']:.3f}")
        sys.stdout.flush()
    dist.shutdown()


def launch(args, argv, programs):
    """This script under torchrun for ``programs``: ``--nproc`` processes of ``--threads`` threads;
    rank 0's median step times, having passed its output through."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
           os.path.abspath(__file__), *argv, "--threads", str(args.threads), "--programs", *programs]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads),
           "PYTHONPATH": os.pathsep.join(p for p in (os.getcwd(), os.environ.get("PYTHONPATH")) if p)}
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    out = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True)
    result = None
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            result = json.loads(line[len("RESULT "):])
        else:
            print(line)
    sys.stdout.flush()
    if out.returncode or result is None:
        raise SystemExit(f"torchrun for {programs} failed (exit {out.returncode})")
    return result


def launch_all(args, argv):
    print("machine:", machine(), f"(each process: {args.threads} threads)")
    sys.stdout.flush()
    launch(args, argv, args.programs)
    if args.no_alone or "fpipe" not in args.programs:
        return 0
    alone = {}
    for name in args.programs:
        alone.update(launch(args, argv, [name]))
    print("alone: " + "  ".join(f"{n} {t * 1e3:.1f} ms" for n, t in alone.items()))
    for base, goal in train_step.GOALS.items():
        if base in alone:
            print(f"alone_ratio_vs_{base}: {alone[base] / alone['fpipe']:.3f}  (goal >= {goal})")
    return 0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--mode", default="supervised", choices=train_step.MODES)
    ap.add_argument("--arch", default="resnet", choices=train_step.ARCHS)
    ap.add_argument("--depth", type=resnet_arg, default=18, metavar="RESNET", help="a ResNet depth or name")
    ap.add_argument("--optimizer", default="config", choices=train_step.OPTIMIZERS)
    ap.add_argument("--freeze", nargs="+", default=[], metavar="REGEX", help="more model.freeze rules (train_step.py's)")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32, help="per process")
    ap.add_argument("--iters", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="per process (default: the cores / --nproc)")
    ap.add_argument("--programs", nargs="+", default=list(train_step.PROGRAMS), choices=train_step.PROGRAMS)
    ap.add_argument("--no-alone", action="store_true", help="skip each program's own launch")
    args = ap.parse_args(argv)
    train_step.check_image_sizes(ap, args.arch, [args.image_size])
    if "RANK" in os.environ:
        return rank_main(args)
    args.threads = args.threads or max(1, (os.cpu_count() or 1) // args.nproc)
    return launch_all(args, argv)  # each launch appends its own --threads and --programs: the last ones count


if __name__ == "__main__":
    sys.exit(main())
