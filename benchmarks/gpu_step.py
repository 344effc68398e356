"""The GPU figures: ResNet training and frozen-trunk linear evaluation on CUDA, bf16, channels-last.

    PYTHONPATH=. python benchmarks/gpu_step.py                      # on a CUDA machine: R50, 224 px, batch 256
    PYTHONPATH=. python benchmarks/gpu_step.py --parts train --arch vit_s16 --optimizer adamw --batch-size 128
    PYTHONPATH=. python benchmarks/gpu_step.py --device cpu --depth 18 --image-size 32 --batch-size 8 \\
        --steps 2 --rounds 2 --warmup 1                             # a dry run of the same code on CPU
    PYTHONPATH=. python benchmarks/gpu_step.py --first-calls-alone  # each compile alone, fresh process and caches
    PYTHONPATH=. python benchmarks/gpu_step.py --parts linear_eval --first-calls-alone --programs fpipe \
        --profile-first-call 40                                     # where that compile's time goes (cProfile)
    PYTHONPATH=. python benchmarks/gpu_step.py --parts linear_eval --trace-steps 3  # device busy vs wall time

One process; the programs alternate round by round, each round ``--steps`` calls timed between two
device synchronisations (a step is asynchronous: timing single calls would time the launch).

  train (configs/supervised.py's optimizer or ``--optimizer adamw``, everything trains; a ResNet or
  ``--arch vit_s16``; images as the loader gives them):
    fpipe             the loop's step (``loop.build_train_step``, compiled, autocast, channels-last state)
    fpipe_eager       the same step uncompiled, as a run below ``compile_min_images`` has it
    fpipe_cudagraphs  the same step compiled with ``mode="reduce-overhead"`` (CUDA graphs), its
                      hyper-parameters on the device (CUDA only)
    eager             the torchvision-style nn.Module, channels-last weights and images, autocast,
                      ``torch.optim.SGD`` (or ``AdamW``) ``(fused=True)`` with fpipe's param groups
    compiled          ``torch.compile`` of that module, the same optimizer
  linear_eval (trunk frozen, one linear head, SGD momentum):
    fpipe             ``frozen_trunk`` (a compiled constant, under autocast) + the heads' compiled step
    eager, compiled   the nn.Module with the trunk frozen (eval mode, ``requires_grad=False``)

Prints images/s per program, ``ratio_vs_eager`` / ``ratio_vs_compiled`` (goals on a GPU: >= 1.2 vs
eager for training), the first call (compile) of each with its kernels and compiler phases, the
step's peak memory above what was allocated before it (CUDA's allocator; on a CPU the profiler's
allocator events), and, on CUDA, whether fpipe's steps synchronise with the host
(``torch.cuda.set_sync_debug_mode("error")``; the goal is none). In one process a program compiled
later reuses what an earlier compile set up; ``--first-calls-alone`` gives the fair first calls.
"""
import argparse
import cProfile
import io
import itertools
import json
import os
import pstats
import statistics
import subprocess
import sys
import time
import traceback

import torch
import torch.nn.functional as F
from absl import logging as absl_logging

from benchmarks import linear_eval_step as le
from benchmarks import train_step as ts
from fpipe import host_memory, tree
from fpipe.train import compile_cache, forked_compile, precision
from fpipe.train import loop as loop_lib
from fpipe.train import step as step_lib


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------- the programs
def module_run(net, opt, batch, dtype, compiled):
    """``run()``: the nn.Module step a user writes: channels-last images, autocast, backward, opt.step."""
    fwd = torch.compile(net) if compiled else net
    x = batch["image"].contiguous(memory_format=torch.channels_last)

    def run():
        opt.zero_grad(set_to_none=True)
        with precision.autocast(dtype, x.device.type):
            loss = F.cross_entropy(fwd(x), batch["label"])
        loss.backward()
        opt.step()
        return loss.detach()
    return run


# ---------------------------------------------------------------- training
def train_programs(args, device, dtype):
    s = ts.setup("supervised", args.depth, args.image_size, args.batch_size, arch=args.arch,
                 optimizer=args.optimizer)
    s["batch"] = batch = loop_lib.to_device(s["batch"], device)

    def fpipe_cudagraphs():
        """fpipe's step under ``mode="reduce-overhead"``, its hyper-parameters on the device."""
        step = step_lib.maybe_compile(
            step_lib.make_step(s["model"], s["opt"], eval_norms=s["eval_norms"], autocast=dtype), True,
            "train step (CUDA graphs)", mode="reduce-overhead")
        hyper = loop_lib.to_device(s["opt"].inputs(s["lr"]), device)
        box = {"ts": ts.train_state(s, device)}

        def run():  # CUDA graphs own their outputs until the next replay: the state is copied out
            ts_out, metrics = step(box["ts"], batch, hyper)
            box["ts"] = tree.map_leaves(torch.clone, ts_out)
            return metrics["loss"].clone()
        return run

    def module(compiled):
        net = ts.torch_net(s).to(device, memory_format=torch.channels_last)
        opt = ts.torch_optimizer(net, s, **({"fused": True} if device.type == "cuda" else {}))
        return module_run(net, opt, batch, dtype, compiled)

    # The eager module first: the others' first calls then find cuDNN's algorithm search done
    # for the shapes they share, and time their compilation alone.
    progs = {"eager": lambda: module(False), "fpipe": lambda: ts.fpipe_program(s, dtype, device),
             "compiled": lambda: module(True),
             "fpipe_eager": lambda: ts.fpipe_program(s, dtype, device, compiling=False)}
    if device.type == "cuda" and not args.no_cudagraphs:
        progs["fpipe_cudagraphs"] = fpipe_cudagraphs
    return progs


# ---------------------------------------------------------------- linear evaluation
def linear_eval_programs(args, device, dtype):
    model, params, state, batch = le.build(args.depth, args.image_size, args.batch_size)
    params, state, batch = (loop_lib.to_device(t, device) for t in (params, state, batch))

    def module(compiled):
        net = le.torch_module(args.depth, params, state).to(device, memory_format=torch.channels_last)
        for p in net.parameters():
            p.requires_grad_(net.fc.weight is p or net.fc.bias is p)
        net.train()
        for m in (net.conv1, net.bn1, net.layer1, net.layer2, net.layer3, net.layer4):
            m.eval()
        opt = torch.optim.SGD(net.fc.parameters(), lr=le.LR, momentum=le.MOMENTUM)
        return module_run(net, opt, batch, dtype, compiled)

    return {"eager": lambda: module(False),
            "fpipe": lambda: le.fpipe_step(model, params, state, batch, autocast=dtype)[0],
            "compiled": lambda: module(True)}


# ---------------------------------------------------------------- measuring
def start_compile_workers(timeout_s=300):
    """Starts inductor's compile worker processes and waits until they are up (seconds waited):
    until then inductor compiles kernels in this process, so the first program compiled would
    otherwise time that start too. Internal inductor API: a torch without it is left alone."""
    t0 = time.perf_counter()
    try:
        from torch._inductor.async_compile import AsyncCompile
        AsyncCompile.warm_pool()
        AsyncCompile.wakeup()
        AsyncCompile.wait_pool_ready(timeout=timeout_s)
    except (AttributeError, ImportError, TimeoutError) as e:
        print(f"inductor's compile workers not started ahead ({type(e).__name__}: {e})")
    return time.perf_counter() - t0


TRITON_COMPILES = []  # where each Triton kernel was compiled, in order: "here" (this process) or "workers"


def count_triton_compiles():
    """Records, in ``TRITON_COMPILES``, where inductor compiles each Triton kernel: in its worker
    processes once they are up (handed on during code generation), before that in this process
    (each config in turn, as the generated module loads). Internal inductor API: left alone if
    absent."""
    try:
        from torch._inductor.async_compile import AsyncCompile, CompiledTritonKernels
    except ImportError:
        return
    triton = AsyncCompile.triton
    if getattr(triton, "counted", False):
        return

    def counted(self, kernel_name, source_code, *args, **kwargs):
        if CompiledTritonKernels.get(source_code) is None:  # a kernel handed on earlier is not compiled again
            TRITON_COMPILES.append("workers" if self.use_process_pool() else "here")
        return triton(self, kernel_name, source_code, *args, **kwargs)
    counted.counted = True
    AsyncCompile.triton = counted


def compile_counts():
    """What the compiler has done so far in this process: its timed phases, kernels generated, and
    where Triton kernels were compiled (``count_triton_compiles``)."""
    from torch._dynamo import utils
    from torch._inductor import metrics
    return ({k: list(v) for k, v in utils.compilation_time_metrics.items()}, metrics.generated_kernel_count,
            len(TRITON_COMPILES))


PHASES = ("_compile.compile_inner", "bytecode_tracing", "create_aot_dispatcher_function",  # nested:
          "_recursive_joint_graph_passes", "min_cut_rematerialization_partition",  # the first is
          "compile_fx.<locals>.fw_compiler_base", "compile_fx.<locals>.bw_compiler",  # the whole
          "GraphLowering.run", "Scheduler.__init__", "Scheduler.codegen", "async_compile.wait",
          "PyCodeCache.load_by_key_path", "build_guards")


def compile_breakdown(before):
    """The kernels generated and the compiler's main phases (seconds) since ``before`` (``compile_counts()``)."""
    (was, kernels_was, triton_was), (now, kernels, triton) = before, compile_counts()
    spent = {k: sum(now[k][len(was.get(k, [])):]) for k in PHASES if k in now}
    runs = [f"{len(list(group))} {where}" for where, group in itertools.groupby(TRITON_COMPILES[triton_was:triton])]
    where = f" (Triton kernels compiled, in order: {', '.join(runs)})" if runs else ""
    return (f"{kernels - kernels_was} kernels{where}; "
            + ", ".join(f"{k} {t:.1f}" for k, t in spent.items() if t >= 0.05))


def time_rounds(runs, rounds, steps, device) -> dict:
    """Seconds a call of each of ``runs`` ({name: fn}), a list per name: ``rounds`` rounds with the
    programs alternated, each round ``steps`` calls between two device synchronisations."""
    times = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            sync(device)
            t = time.perf_counter()
            for _ in range(steps):
                run()
            sync(device)
            times[name].append((time.perf_counter() - t) / steps)
    return times


def first_call(run, device, profile_lines=0):
    """``(seconds, loss, compile breakdown)`` of ``run``'s first call (its compilation, if any).
    ``profile_lines``: also print that many of the compiler's functions by cumulative time
    (cProfile), to find where a slow compile spends it."""
    sync(device)
    before = compile_counts()
    profiler = cProfile.Profile() if profile_lines else None
    t = time.perf_counter()
    if profiler:
        profiler.enable()
    loss = float(run())
    sync(device)
    seconds = time.perf_counter() - t
    if profiler:
        profiler.disable()
        print_compile_profile(profiler, profile_lines)
    return seconds, loss, compile_breakdown(before)


COMPILER_CODE = r"_inductor|triton|subprocess|cpp_builder|codecache|async_compile|_functorch|_dynamo/output_graph"


def print_compile_profile(profiler, lines):
    """The compiler's functions (``COMPILER_CODE``) by cumulative time, then every function by its own."""
    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text)  # the paths kept: the filter reads their packages
    stats.sort_stats("cumulative").print_stats(COMPILER_CODE, lines)
    stats.sort_stats("tottime").print_stats(max(lines // 2, 5))
    packages = os.path.dirname(os.path.dirname(torch.__file__)) + os.sep  # shown relative to it
    print("\n".join(l.replace(packages, "") for l in text.getvalue().splitlines() if l.strip()), flush=True)


def measure(makers, args, device):
    """Builds and warms each program (a failure is reported, the others go on), then times them
    in alternating rounds; returns per-program dicts."""
    out, runs = {}, {}
    for name, make in makers.items():
        try:
            run = make()
            first, loss, compiled = first_call(run, device, args.profile_first_call)
            if first > 5:  # a compile: where its time went
                print(f"{name} compile: {compiled}", flush=True)
            host_memory.keep_large_blocks()  # as the train loops do after their first step
            for _ in range(args.warmup):
                run()
            sync(device)
            if device.type == "cuda":
                before = torch.cuda.memory_allocated(device)
                torch.cuda.reset_peak_memory_stats(device)
                run()
                sync(device)
                peak = torch.cuda.max_memory_allocated(device) - before
            else:
                peak = cpu_step_peak(run)
            runs[name], out[name] = run, {"first_call_s": first, "first_loss": loss, "step_peak_mib": peak / 2**20}
            print(f"{name}: first call {first:.1f} s, loss {loss:.4f}", flush=True)  # kept if a time limit cuts the run
        except Exception as e:  # one program failing (a CUDA-graph step, say) must not hide the others
            print(f"{name}: FAILED {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            traceback.print_exc(limit=4)
    times = time_rounds(runs, args.rounds, args.steps, device)
    for name in runs:
        out[name]["step_ms"] = statistics.median(times[name]) * 1e3
        out[name]["images_per_s"] = args.batch_size / statistics.median(times[name])
    for name, run in runs.items() if args.trace_steps else ():
        print_step_trace(name, run, device, args.trace_steps)
    return out, runs


def print_step_trace(name, run, device, steps, rows=12):
    """``steps`` warm steps under torch.profiler: wall time per step against the time the device
    (or, on a CPU, the operators) was busy, and the kernels that took most of it. A device busy for
    much less than the wall time waits on the host: launches, Python, synchronisations."""
    from torch.profiler import ProfilerActivity, profile
    cuda = device.type == "cuda"
    sync(device)
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        t = time.perf_counter()
        for _ in range(steps):
            run()
        sync(device)
        wall = (time.perf_counter() - t) / steps * 1e3
    events = prof.key_averages()
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    busy = sum(getattr(e, key) for e in events) / steps / 1e3
    print(f"{name} trace: {wall:.2f} ms a step, {'device' if cuda else 'operators'} busy {busy:.2f} ms "
          f"({busy / wall:.0%}), {sum(e.count for e in events if e.device_type.name == 'CUDA') // steps if cuda else '-'} "
          f"kernels a step", flush=True)
    print(events.table(sort_by=key, row_limit=rows, max_name_column_width=70), flush=True)


def cpu_step_peak(run):
    """Bytes of tensors allocated at the step's peak above what was allocated before it, on a CPU:
    the allocator's events under the profiler, summed in order (the CUDA figure's counterpart)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    now = top = 0
    for _, nbytes in sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                            if e.name() == "[memory]"):
        now += nbytes
        top = max(top, now)
    return top


def host_syncs(run, device):
    """None if ``run`` (warm) never synchronises with the host, else the error naming the first."""
    if device.type != "cuda":
        return "not checked (CPU)"
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):
            run()
        return None
    except RuntimeError as e:
        return str(e).splitlines()[0]
    finally:
        torch.cuda.set_sync_debug_mode("default")


def report(part, res, runs, args, device):
    print(f"== {part}: {ts.case_name(args, '', args.depth)}, {args.image_size} px, batch {args.batch_size}, {args.dtype}, "
          f"{device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), torch "
          f"{torch.__version__}; median of {args.rounds} rounds of {args.steps} steps")
    for n, r in res.items():
        if "step_ms" in r:
            print(f"{n:17s} {r['step_ms']:9.2f} ms  {r['images_per_s']:9.1f} images/s   first call "
                  f"{r['first_call_s']:6.1f} s   first loss {r['first_loss']:.4f}   step peak "
                  f"{r['step_peak_mib']:8.1f} MiB")
    for n in [n for n in res if n.startswith("fpipe") and "step_ms" in res[n]]:
        for base in ("eager", "compiled"):
            if "step_ms" in res.get(base, {}):
                print(f"{n} ratio_vs_{base}: {res[base]['step_ms'] / res[n]['step_ms']:.3f}")
        print(f"{n} host syncs in the step: {host_syncs(runs[n], device) or 'none'}")
    sys.stdout.flush()


# ---------------------------------------------------------------- first calls in fresh processes
COMPILING = ("fpipe", "compiled", "fpipe_cudagraphs")  # the programs whose first call compiles


def first_call_alone(args, part, name):
    """``name``'s first call in a new process with empty compile caches (inductor's, Triton's,
    fpipe's), as a user's first run has it: in this process an earlier program's compile warms
    what a later one reuses (Triton's and inductor's setup, identical kernels), which favours
    the later. Returns the child's JSON: ``first_call_s`` and ``compile`` (phases)."""
    cmd = [sys.executable, os.path.abspath(__file__), "--child", name, "--parts", part, "--device", args.device,
           "--arch", args.arch, "--depth", str(args.depth), "--optimizer", args.optimizer,
           "--image-size", str(args.image_size), "--batch-size", str(args.batch_size), "--dtype", args.dtype,
           "--profile-first-call", str(args.profile_first_call)]
    caches = le.scratch_dir("gpu-step-fresh-")
    env = dict(le.caches_env(caches), TRITON_CACHE_DIR=os.path.join(caches, "triton"))
    if args.profile_first_call:  # the compile in the profiled process, not a forked child (CPU)
        env[forked_compile.IN_PROCESS_ENV] = "1"
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    for line in out.stderr.splitlines():  # fpipe's log: the frozen trunk's and the step's compiles apart
        if " compiled in " in line or " loaded and run in " in line:
            print(f"  {part} {name}: {line.split(':absl:', 1)[-1]}")
    if args.profile_first_call:
        print("\n".join(l for l in out.stdout.splitlines() if not l.startswith("FIRST_CALL ")), flush=True)
    lines = [l for l in out.stdout.splitlines() if l.startswith("FIRST_CALL ")]
    if out.returncode or not lines:
        return {"error": (out.stderr or out.stdout).strip().splitlines()[-1:] or ["no output"]}
    return json.loads(lines[-1][len("FIRST_CALL "):])


def child(args, makers, device):
    """``--child NAME``: that program's first call alone, printed as one JSON line; fpipe's log
    (on stderr) says what each of its compiles took."""
    absl_logging.set_verbosity(absl_logging.INFO)
    first, _, compiled = first_call(makers[args.child](), device, args.profile_first_call)
    print("FIRST_CALL " + json.dumps({"first_call_s": first, "compile": compiled}), flush=True)


def report_fresh(part, args, makers):
    got = {n: first_call_alone(args, part, n) for n in COMPILING if n in makers}
    for n, r in got.items():
        print(f"{part} {n} first call alone (fresh process, empty caches): "
              + (f"{r['first_call_s']:.1f} s; {r['compile']}" if "error" not in r else f"FAILED {r['error']}"))
    if all("first_call_s" in got.get(n, {}) for n in ("fpipe", "compiled")):
        print(f"{part} fpipe first_call_alone_vs_compiled: {got['fpipe']['first_call_s'] / got['compiled']['first_call_s']:.2f}")
    sys.stdout.flush()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--parts", nargs="+", default=["train", "linear_eval"], choices=["train", "linear_eval"])
    ap.add_argument("--arch", default="resnet", choices=ts.ARCHS, help="vit_s16: the train part on a ViT-S/16")
    ap.add_argument("--depth", type=le.resnet_arg, default=50, metavar="RESNET", help="a ResNet depth or name")
    ap.add_argument("--optimizer", default="config", choices=ts.OPTIMIZERS, help="the train part's optimizer")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--dtype", default="bf16", help="config.precision.dtype: bf16, fp32")
    ap.add_argument("--steps", type=int, default=10, help="steps per timed round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--no-cudagraphs", action="store_true", help="skip the CUDA-graph variant of fpipe's step")
    ap.add_argument("--programs", nargs="+", help="run only these programs (e.g. fpipe_cudagraphs eager): "
                    "each compile takes minutes on a GPU machine")
    ap.add_argument("--first-calls-alone", action="store_true",
                    help="instead of the timed rounds: each compiling program's first call in its own fresh "
                         "process with empty caches, as a user's first run (the fair compile-time ratio)")
    ap.add_argument("--profile-first-call", type=int, default=0, metavar="LINES",
                    help="print where each first call (the compile) spent its time: that many of the "
                         "compiler's functions by cumulative time (cProfile)")
    ap.add_argument("--trace-steps", type=int, default=0, metavar="STEPS",
                    help="after the timed rounds, profile that many steps of each program (torch.profiler): "
                         "the device's busy time against the wall time, and the top kernels")
    ap.add_argument("--child", help=argparse.SUPPRESS)  # first_call_alone's process: that program's first call
    args = ap.parse_args(argv)
    if args.arch != "resnet" and "linear_eval" in args.parts:
        ap.error("the linear_eval part runs a ResNet; give --parts train with --arch vit_s16")
    ts.check_image_sizes(ap, args.arch, [args.image_size])
    le.own_compile_cache()  # fpipe's compiled steps, as the other benchmarks keep them
    host_memory_note = host_memory.keep_freed_memory()  # as main.py does
    compile_cache.key_inductor_caches_by_isa()  # every program's compile caches keyed as fpipe's are
    if not args.child:
        print(host_memory_note)
    device = torch.device(args.device)
    dtype = precision.autocast_dtype(args.dtype, device)
    if device.type == "cuda":
        count_triton_compiles()
        if not args.child:  # before any program: each first call here then times its own compile
            print(f"inductor's compile workers up after {start_compile_workers():.1f} s", flush=True)
        # as main.py's runs set it (config.cudnn_benchmark), for every program alike; float32
        # matmuls keep PyTorch's default (no TF32), as fpipe's runs do
        loop_lib.choose_conv_algorithms({"cudnn_benchmark": True}, device)
    for part in args.parts:
        makers = (train_programs if part == "train" else linear_eval_programs)(args, device, dtype)
        if args.programs:
            unknown = sorted(set(args.programs) - set(makers))
            if unknown:
                ap.error(f"--programs {unknown}: the {part} part has {sorted(makers)}")
            makers = {n: m for n, m in makers.items() if n in args.programs}
        if args.child:
            return child(args, makers, device)
        if args.first_calls_alone:
            report_fresh(part, args, makers)
            continue
        res, runs = measure(makers, args, device)
        report(part, res, runs, args, device)
        del runs
        torch._dynamo.reset()


if __name__ == "__main__":
    main()
