"""Linear-evaluation step throughput: fpipe's compiled step vs. the eager nn.Module code, and vs. the floor.

    PYTHONPATH=. python benchmarks/linear_eval_step.py                  # ResNet-18 and -50, 32 px, batch 64
    PYTHONPATH=. python benchmarks/linear_eval_step.py --depth 50 --image-size 224 --batch-size 32
    PYTHONPATH=. python benchmarks/linear_eval_step.py --depth resnext50_32x4d wide_resnet50_2 --image-size 64

One model (a ResNet trunk, frozen, and one linear head ``fc`` on the pooled features), one batch,
these programs, each in a process of its own, timed taking turns (so a busy machine slows each
alike, and no program runs on a heap the others fragmented; a turn is an untimed step, then steps
back to back: benchmarks/process_rounds.py; ``--in-one-process``: all in this one, as before 12-05):

  eager    what a user would write otherwise: a torchvision-style ``nn.Module`` with the trunk's
           ``requires_grad=False`` and ``trunk.eval()``, ``loss.backward()``, ``torch.optim.SGD``
           (momentum 0.9). Same weights: fpipe's params are copied into it by torchvision name.
  compiled the same with ``torch.compile(net)`` (the trunk frozen; the optimizer eager).
  step     fpipe's train step as the loop builds it: ``freeze.partition(params, ["trunk"])``,
           ``eval_norms``; ``frozen_trunk.frozen_trunk`` (frozen norms folded, the trunk compiled with
           inductor's freezing: packed oneDNN weights, fused bias/ReLU/add, under no_grad), then
           the compiled ``make_step`` over the heads' tensors (``heads_only``) with fpipe.optim's
           SGD (momentum 0.9), via ``frozen_trunk.on_features``. Images NCHW, as the loader gives.
           Both kept in a compile cache of this benchmark's own, as the loop keeps them (on CPU the
           trunk is compiled ahead of time into a package: fpipe.train.compile_cache).
  forward  the floor: the same eager nn.Module trunk forward under ``torch.inference_mode``. A
           linear-eval step cannot cost less than computing the features. Also shown: fpipe's own
           trunk forward, and the nn.Module forward with channels_last weights and input.
  extract  feature extraction's trunk as ``extract.run`` builds it (``frozen_trunk.eval_features``),
           compiled (the step's kept trunk, loaded) and eager: ``extract_vs_forward``.

Times are medians over ``--iters`` steps after ``--warmup`` steps (compile time is reported
separately). Peak memory: each program runs alone in a fresh subprocess; the figure is the rise of
peak RSS (ru_maxrss) over the RSS after the model, batch and (for the step) compilation are ready,
i.e. what the steps themselves add. Output lines per model:

  ratio_vs_eager: X       eager time / step time (>1: fpipe is faster)
  ratio_vs_compiled: W    compiled nn.Module time / step time
  ratio_vs_forward: Y     step time / forward time (1.0 is the floor)
  memory_vs_forward: Z    step peak-memory rise / forward peak-memory rise
  second_run_first_call_s: the step's first call in a fresh process after this one compiled it
                          (what a second run waits: it loads the kept trunk and heads' step)
  first_call_vs_compiled (cold): with ``--first-calls``, fpipe's first step / the compiled
                          module's, each alone in a fresh process with empty compile caches
                          (the compile goal: <= 2.0)
"""
import argparse
import atexit
import ctypes
import gc
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import ml_collections
import torch
import torch.nn as nn
import torch.nn.functional as F

from benchmarks import process_rounds
from fpipe import freeze, host_memory, optim, tree
from fpipe.models import fold, resnet
from fpipe.train import compile_cache, distributed
from fpipe.train import loop as loop_lib
from fpipe.train import frozen_trunk as ft_lib
from fpipe.models import model as model_lib
from fpipe.train import step as step_lib

NUM_CLASSES = 10
LR, MOMENTUM = 0.1, 0.9
OPTIMIZER_NAME = "fpipe.optim sgd"  # what the step reports, and part of its compile-cache key


# ---------------------------------------------------------------- the nn.Module a user would write
class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None, groups=1, width_per_group=64):
        super().__init__()
        width = int(planes * width_per_group / 64) * groups  # ResNeXt's and the wide ResNets' inner width
        self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """torchvision's ResNet, written out (no torchvision here); ``fc`` is the linear head.
    ``groups``/``width_per_group``: torchvision's ResNeXt and wide ResNets; ``width_multiplier``:
    every stage and the stem that many times wider (SimCLR's ResNet-50 x2, VISSL's)."""

    def __init__(self, block, layers, num_classes, groups=1, width_per_group=64, width_multiplier=1):
        super().__init__()
        self.inner = {} if block is BasicBlock else dict(groups=groups, width_per_group=width_per_group)
        w = 64 * width_multiplier
        self.inplanes = w
        self.conv1 = nn.Conv2d(3, w, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(w)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._make_layer(block, w, layers[0], 1)
        self.layer2 = self._make_layer(block, 2 * w, layers[1], 2)
        self.layer3 = self._make_layer(block, 4 * w, layers[2], 2)
        self.layer4 = self._make_layer(block, 8 * w, layers[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8 * w * block.expansion, num_classes)

    def _make_layer(self, block, planes, blocks, stride):
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                                       nn.BatchNorm2d(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, downsample, **self.inner)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes, **self.inner) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def features(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)

    def forward(self, x):
        return self.fc(self.features(x))


# torchvision's ResNet depths (fpipe.models.resnet.DEPTHS): any of them can be benchmarked.
ARCH = {18: (BasicBlock, (2, 2, 2, 2)), 34: (BasicBlock, (3, 4, 6, 3)), 50: (Bottleneck, (3, 4, 6, 3)),
        101: (Bottleneck, (3, 4, 23, 3)), 152: (Bottleneck, (3, 8, 36, 3))}
# ... and by name: torchvision's ResNeXt and wide ResNets, SimCLR's wider ResNet-50s (fpipe's options).
NAMED = {**{n: o for n, o in resnet.PRESETS.items() if not n.startswith("resnet")},
         "resnet50x2": dict(depth=50, width_multiplier=2), "resnet50x4": dict(depth=50, width_multiplier=4)}
RESNETS = (*ARCH, *NAMED)  # what --depth takes


def resnet_arg(text):
    """``--depth``'s type: a depth (``50``) or a name of ``NAMED`` (``resnext50_32x4d``)."""
    if text in NAMED:
        return text
    if text.isdigit() and int(text) in ARCH:
        return int(text)
    raise argparse.ArgumentTypeError(f"unknown ResNet {text!r}; valid: {', '.join(map(str, RESNETS))}")


def resnet_options(depth):
    """fpipe's ResNet options of a ``--depth`` value."""
    return dict(NAMED[depth]) if depth in NAMED else dict(depth=depth)


def resnet_title(depth):
    return depth if depth in NAMED else f"ResNet-{depth}"


def torch_module(depth, params, state):
    """The nn.Module with fpipe's weights, copied by torchvision name (``trunk.`` dropped, ``heads.``);
    ``depth``: a ``--depth`` value."""
    options = resnet_options(depth)
    net = ResNet(*ARCH[options.pop("depth")], NUM_CLASSES, **options)
    flat = {n.split(".", 1)[1]: v for n, v in tree.flatten(params).items() | tree.flatten(state).items()}
    net.load_state_dict(flat, strict=True)
    return net


# ---------------------------------------------------------------- programs
def build(depth, image_size, batch_size, seed=0):
    return build_trunk(model_lib.trunk_config(**resnet_options(depth)), image_size, batch_size, seed)


def build_trunk(trunk, image_size, batch_size, seed=0):
    """``(model, params, state, batch)``: ``trunk`` (a config.model.trunk) with a linear ``fc`` on
    ``flatten``, pretrained-like running statistics (so eval-mode norms are not identities) and a
    random batch."""
    cfg = ml_collections.ConfigDict(dict(trunk=trunk, heads=dict(fc=model_lib.head_config("flatten", "linear"))))
    model = model_lib.build(cfg, num_classes=NUM_CLASSES, image_size=image_size)
    params, state = model.init(seed)
    gen = torch.Generator().manual_seed(seed)
    state = tree.map_with_names(
        lambda n, v: (torch.rand(v.shape, generator=gen) * 0.2 - 0.1 if n.endswith("running_mean") else
                      torch.rand(v.shape, generator=gen) + 0.5 if n.endswith("running_var") else v), state)
    batch = {"image": torch.randn(batch_size, 3, image_size, image_size, generator=gen),
             "label": torch.randint(0, NUM_CLASSES, (batch_size,), generator=gen)}
    return model, params, state, batch


def make_optimizer(trainable):
    """fpipe.optim's SGD (momentum, no weight decay), as the eager baseline's torch.optim.SGD."""
    cfg = optim.default_config()
    cfg.name, cfg.lr, cfg.momentum, cfg.weight_decay = "sgd", LR, MOMENTUM, 0.0
    return optim.build(cfg, trainable), OPTIMIZER_NAME


def _cache_key(params, batch, autocast):
    """The key this benchmark keeps its compiled programs under (the loop's: loop.trunk_cache, step_cache)."""
    shapes = [(n, tuple(v.shape)) for n, v in tree.flatten(params).items()]  # which model: R18, R50, a ViT
    return compile_cache.key_of("benchmarks/linear_eval_step.py", shapes, tuple(batch["image"].shape),
                                OPTIMIZER_NAME, batch["image"].device, autocast)


def fpipe_step(model, params, state, batch, *, split=True, compile_head=True, compile=True,
               fold_norms=True, nhwc=False, autocast=None):
    """``(run, train_state_box, optimizer_name)``: ``run()`` does one step on the batch.

    split (the default, what the loop builds, fpipe.train.loop): ``frozen_trunk.frozen_trunk`` (the
    frozen trunk as a compiled constant under no_grad) then the heads' step over the heads' tensors
    only (``heads_only``), compiled unless ``compile_head=False``; images as the loader gives them
    (NCHW) unless ``nhwc``. Otherwise the whole step over the whole model (frozen norms folded and
    channels_last weights if asked), compiled if ``compile``. ``autocast``: a mixed-precision dtype
    (None: float32), as config.precision gives the loop.
    """
    trainable, frozen = freeze.partition(params, ["trunk"])
    eval_norms = freeze.eval_norms(state, frozen)
    opt, opt_name = make_optimizer(trainable)
    if split:  # kept for the next run as the loop keeps them (loop.trunk_cache, loop.step_cache)
        directory, key = compile_cache.default_dir(), _cache_key(params, batch, autocast)
        ft = ft_lib.frozen_trunk(model, trainable, frozen, state, eval_norms, compile=compile,
                                 batch_size=batch["image"].shape[0], cache=(directory, key) if directory else None,
                                 autocast=autocast)
        # The heads' step as the loop builds it (compiled: donating, fused SGD), saved under this key.
        config = ml_collections.ConfigDict(dict(precision={None: "float32", torch.bfloat16: "bf16"}[autocast],
                                                compile_cache_dir=directory or "", benchmark_key=key,
                                                compile_remat="fused"))
        step = loop_lib.build_train_step(config, ft.model, opt, trainable, state, eval_norms,
                                         distributed.Dist(device=batch["image"].device), compiling=compile_head,
                                         autocast=autocast, heads_only=True)
        step = ft_lib.on_features(step, ft.features)
    else:
        if fold_norms:
            frozen = fold.fold_frozen_norms(frozen, state, eval_norms)
        if nhwc:
            frozen = fold.channels_last(frozen)
        step = step_lib.maybe_compile(step_lib.make_step(model, opt, eval_norms=eval_norms, autocast=autocast), compile)
    ts = {"trainable": trainable, "frozen": frozen, "model_state": state, "opt_state": opt.init(trainable)}
    b = dict(batch, image=batch["image"].contiguous(memory_format=torch.channels_last)) if nhwc else batch
    lr = opt.inputs(LR)  # as the loop gives them
    box = {"ts": ts}

    def run():
        box["ts"], metrics = step(box["ts"], b, lr)
        return metrics["loss"]

    return run, box, opt_name


def eager_step(depth, params, state, batch, compiled=False):
    """The user's linear-eval step: trunk frozen (``requires_grad=False``, eval mode), ``fc`` trained
    by ``torch.optim.SGD``; ``compiled``: the module under ``torch.compile`` (the optimizer eager)."""
    net = torch_module(depth, params, state)
    for p in net.parameters():
        p.requires_grad_(False)
    for p in net.fc.parameters():
        p.requires_grad_(True)
    net.train()
    for m in (net.conv1, net.bn1, net.layer1, net.layer2, net.layer3, net.layer4):
        m.eval()
    run = sgd_head_runner(torch.compile(net) if compiled else net, net.fc)
    return (lambda: run(batch)), net


def eager_forward(depth, params, state, batch, nhwc=False):
    net = torch_module(depth, params, state).eval()
    x = batch["image"]
    if nhwc:
        net = net.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)

    def run():
        with torch.inference_mode():
            return net.features(x)

    return run, net


def fpipe_forward(model, params, state, batch):
    def run():
        with torch.inference_mode():
            return model.features(params, state, batch["image"])
    return run


def fpipe_extract(model, params, state, batch, compile):
    """Feature extraction's trunk as ``extract.run`` builds it (``compile``: at or past
    ``compile_min_images``; the compiled trunk is the linear-eval step's, loaded from the cache)."""
    directory, key = compile_cache.default_dir(), _cache_key(params, batch, None)
    features = ft_lib.eval_features(model, params, state, ("flatten",), compile=compile,
                                    batch_size=batch["image"].shape[0], cache=(directory, key) if directory else None)
    return lambda: features(batch["image"])


# ---------------------------------------------------------------- timing
def sgd_head_runner(net, head):
    """An eager linear-eval step of ``net`` with ``torch.optim.SGD`` on ``head`` only."""
    opt = torch.optim.SGD(head.parameters(), lr=LR, momentum=MOMENTUM)

    def run(batch):
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(net(batch["image"]), batch["label"])
        loss.backward()
        opt.step()
        return loss

    return run


def serve_or_run(args, note, case_programs, bench):
    """zoo_linear_eval.py's and vit_step.py's main after parsing: in a ``rounds`` process, serve the
    program ``--serve`` of ``case_programs(name)`` (the first ``--name``); else ``bench(args, name)``
    for every ``--name``, the first call compiling into this run's own cache."""
    if args.serve:
        return serve_program(case_programs(args.name[0])[args.serve], args.warmup)
    own_compile_cache()  # the first call compiles, the programs' processes load what it kept
    print("machine:", machine())
    print(note)
    for name in args.name:
        bench(args, name)


TWIN_PROGRAMS = ("eager_step", "compiled_step", "fpipe_step", "forward", "fpipe_forward")  # zoo_linear_eval, vit_step


def compare_programs(args, script, argv, header, make_programs, feature):
    """zoo_linear_eval.py's and vit_step.py's case: one step of each of ``make_programs()``' steps
    from the same start (their losses) and the twin's trunk features against fpipe's ``feature``
    (same math), then ``TWIN_PROGRAMS`` timed by ``rounds`` (``script`` run again with ``argv``);
    prints ``header`` with how they were timed, the per-program lines and the ratios."""
    torch._dynamo.reset()  # each case compiles as in a fresh process
    progs = make_programs()
    losses = {n: float(progs[n]().detach()) for n in ("eager_step", "compiled_step", "fpipe_step")}
    feat_err = (progs["forward"]() - progs["fpipe_forward"]()[feature]).abs().max().item()
    del progs  # timed with fresh states, each in a process of its own
    med, first, _ = rounds(args, script, argv, TWIN_PROGRAMS, make_programs)
    print(f"== {header}, batch {args.batch_size}, {args.threads} threads, median of {args.iters} after "
          f"{args.warmup} warm-up, {where(args)}; optimizer: {make_optimizer({'w': torch.zeros(1)})[1]}")
    print("first-step loss: " + "  ".join(f"{n} {v:.6f}" for n, v in losses.items()) +
          f"; max feature difference {feat_err:.2e}")
    for n in med:
        print(f"{n:14s} {med[n] * 1e3:8.2f} ms  {args.batch_size / med[n]:8.1f} images/s   "
              f"first call {first[n]:6.2f} s")
    print(f"compile_s: {first['fpipe_step'] - med['fpipe_step']:.1f}")
    print(f"ratio_vs_eager: {med['eager_step'] / med['fpipe_step']:.3f}")
    print(f"ratio_vs_compiled: {med['compiled_step'] / med['fpipe_step']:.3f}")
    print(f"ratio_vs_forward: {med['fpipe_step'] / med['forward']:.3f}")
    print(f"eager_vs_forward: {med['eager_step'] / med['forward']:.3f}")
    sys.stdout.flush()


def time_round_robin(programs, iters, warmup, warm_outputs=None):
    """Median seconds per call of each program; calls interleave so that load hits all alike.
    ``warm_outputs``: a dict that receives each program's first and warm-up results."""
    first = {}
    for name, run in programs.items():
        t = time.perf_counter()
        outputs = [run()]
        first[name] = time.perf_counter() - t
        host_memory.keep_large_blocks()  # as the train loops do after their first step
        for _ in range(warmup - 1):
            outputs.append(run())
        if warm_outputs is not None:
            warm_outputs[name] = outputs
    times = {name: [] for name in programs}
    for _ in range(iters):
        for name, run in programs.items():
            t = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t)
    return {n: statistics.median(v) for n, v in times.items()}, first


def rounds(args, script, argv, names, make_programs):
    """``(median seconds, first-call seconds, first and warm-up outputs as floats)`` of the programs
    ``make_programs()`` builds, named ``names``: each in a process of its own (``script`` run again
    with ``argv`` and ``--serve NAME``: benchmarks/process_rounds.py), or all in this one with
    ``--in-one-process``."""
    if args.in_one_process:
        outputs = {}
        med, first = time_round_robin(make_programs(), args.iters, args.warmup, outputs)
        return med, first, {n: [_scalar(v) for v in values] for n, values in outputs.items()}
    commands = {n: [sys.executable, os.path.abspath(script), *argv, "--serve", n] for n in names}
    return process_rounds.time_round_robin(commands, args.iters, args.warmup)


def where(args):
    """How ``rounds`` timed the programs, for a benchmark's header line."""
    return "in one process" if args.in_one_process else "each program in its own process"


def serve_program(run, warmup):
    """A program's side of ``rounds``."""
    process_rounds.serve(lambda: _scalar(run()), warmup)


def add_case_flags(ap, *, image_size, batch_size, iters, warmup):
    """The options of one frozen-trunk case with these defaults (the thread count: torch's), and
    ``add_round_flags``' (linear_eval_step.py, zoo_linear_eval.py, vit_step.py)."""
    ap.add_argument("--image-size", type=int, default=image_size)
    ap.add_argument("--batch-size", type=int, default=batch_size)
    ap.add_argument("--iters", type=int, default=iters)
    ap.add_argument("--warmup", type=int, default=warmup)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    add_round_flags(ap)


def add_round_flags(ap):
    """``--in-one-process`` and the hidden ``--serve`` of the benchmarks that time with ``rounds``."""
    ap.add_argument("--in-one-process", action="store_true",
                    help="time the programs in this process (before 12-05: they share one heap)")
    ap.add_argument("--serve", help=argparse.SUPPRESS)


def machine() -> str:
    """The CPU model, the vector ISA torch dispatches to, torch's version and the thread count:
    figures are only comparable on the same machine (AVX2 and AVX-512 CPUs rank programs apart)."""
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    return (f"{model}, {torch.backends.cpu.get_cpu_capability()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads")


def scratch_dir(prefix):
    """A new directory under the system's temp folder, removed when this process exits (the
    benchmarks' compile caches: hundreds of MB a run otherwise left behind in /tmp)."""
    path = tempfile.mkdtemp(prefix=prefix)
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def as_main_does(threads):
    """The process as ``main.py`` sets it up, for every program measured in it, baselines included
    (the thread count; freed host memory kept: fpipe.host_memory), so the ratios compare step code
    under one allocator setting. ``FPIPE_KEEP_FREED_MEMORY=0`` measures under glibc's defaults.
    Every program's compile caches are keyed by the CPU's vector instructions, as fpipe's are
    (``compile_cache.key_inductor_caches_by_isa``): the baselines' second runs hit the same caches."""
    torch.set_num_threads(threads)
    compile_cache.key_inductor_caches_by_isa()
    return host_memory.keep_freed_memory()


def caches_env(caches):
    """This process's environment for a child whose compile caches (inductor's, fpipe's kept
    programs) live in the folder ``caches``: empty there, a user's first run; filled, a second."""
    return dict(os.environ, TORCHINDUCTOR_CACHE_DIR=os.path.join(caches, "inductor"),
                **{compile_cache.CACHE_ENV: os.path.join(caches, "fpipe")})


def own_compile_cache():
    """fpipe's compiled steps kept in a directory of this benchmark run's own (its first call
    compiles, its fresh processes load; removed at exit), unless FPIPE_COMPILE_CACHE names one to
    reuse across runs (kept). Child processes inherit the variable and keep the parent's."""
    if compile_cache.CACHE_ENV not in os.environ:
        os.environ[compile_cache.CACHE_ENV] = scratch_dir("fpipe-bench-cache-")


# ---------------------------------------------------------------- memory, in a fresh process
def _rss_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def memory_child(args):
    """Runs one program alone: peak RSS rise over the steps, after setup and warm-up (compile).

    Prints JSON: ``base_mib`` (RSS after setup, warm-up and malloc_trim: model, batch, compiled
    code and constants) and ``rise_mib`` (the peak during the timed calls minus that).
    """
    model, params, state, batch = build(args.depth, args.image_size, args.batch_size)
    run = programs(args.depth, model, params, state, batch, only=args.memory_child)[args.memory_child]
    t = time.perf_counter()
    run()
    first = time.perf_counter() - t
    host_memory.keep_large_blocks()  # as the train loops do after their first step
    for _ in range(args.warmup - 1):
        run()
    # Hand freed memory back to the OS, so that what the steps need shows up as a rise of RSS
    # (otherwise the warm-up's pages stay mapped and the steps seem to cost nothing).
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    try:  # resets VmHWM (the peak) to the current RSS
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base, reset = _rss_kib("VmRSS"), True
    except OSError:
        base, reset = _rss_kib("VmRSS"), False
    for _ in range(args.iters):
        run()
    peak = _rss_kib("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"base_mib": base / 1024, "rise_mib": (peak - base) / 1024, "reset": reset,
                      "first_call_s": first}))


def case_argv(args, depth, iters=None, model_flag="--depth"):
    """The command-line options of this case, for a process of its own (``model_flag``: the option
    naming the model, ``--name`` in zoo_linear_eval.py)."""
    return [model_flag, str(depth), "--image-size", str(args.image_size), "--batch-size", str(args.batch_size),
            "--threads", str(args.threads), "--iters", str(args.iters if iters is None else iters),
            "--warmup", str(args.warmup)]


def serve(args):
    """One program in ``process_rounds``' rounds."""
    model, params, state, batch = build(args.depth, args.image_size, args.batch_size)
    serve_program(programs(args.depth, model, params, state, batch, only=args.serve)[args.serve], args.warmup)


def _scalar(out):
    """A program's output as a float for ``serve``: the step's loss, or a feature's first value."""
    out = next(iter(out.values())) if isinstance(out, dict) else out
    return float(out.detach().reshape(-1)[0])


def measure_memory(args, name, env=None):
    cmd = [sys.executable, __file__, "--memory-child", name, *case_argv(args, args.depth[0], min(args.iters, 5))]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env or dict(os.environ))
    if out.returncode:
        raise RuntimeError(f"memory run of {name} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- main
PROGRAMS = ("eager_step", "compiled_step", "fpipe_step", "forward", "forward_nhwc", "fpipe_forward", "fpipe_extract",
            "fpipe_extract_eager")


def programs(depth, model, params, state, batch, only=None):
    makers = {
        "eager_step": lambda: eager_step(depth, params, state, batch)[0],
        "compiled_step": lambda: eager_step(depth, params, state, batch, compiled=True)[0],
        "fpipe_step": lambda: fpipe_step(model, params, state, batch)[0],
        "forward": lambda: eager_forward(depth, params, state, batch)[0],
        "forward_nhwc": lambda: eager_forward(depth, params, state, batch, nhwc=True)[0],
        "fpipe_forward": lambda: fpipe_forward(model, params, state, batch),
        "fpipe_extract": lambda: fpipe_extract(model, params, state, batch, compile=True),
        "fpipe_extract_eager": lambda: fpipe_extract(model, params, state, batch, compile=False),
    }
    assert tuple(makers) == PROGRAMS
    return {n: make() for n, make in makers.items() if only in (None, n)}


def bench(args, depth):
    torch._dynamo.reset()  # each depth compiles as in a fresh process (no automatic-dynamic recompiles)
    model, params, state, batch = build(depth, args.image_size, args.batch_size)
    progs = programs(depth, model, params, state, batch)
    # The same outputs: one step of each from the same start gives the same loss and head.
    t = time.perf_counter()
    loss_fpipe = float(progs["fpipe_step"]())  # compiles and keeps the trunk and heads' step
    fpipe_first = time.perf_counter() - t
    loss_eager = float(progs["eager_step"]().detach())
    loss_compiled = float(progs["compiled_step"]().detach())
    del progs  # timed with fresh states: each in a process of its own, fpipe's loading what this one kept
    med, first, _ = rounds(args, __file__, case_argv(args, depth), PROGRAMS,
                           lambda: programs(depth, model, params, state, batch))
    per_s = lambda n: args.batch_size / med[n]
    print(f"== {resnet_title(depth)}, {args.image_size}px, batch {args.batch_size}, {args.threads} threads, "
          f"median of {args.iters} after {args.warmup} warm-up, {where(args)}; optimizer: "
          f"{make_optimizer({'w': torch.zeros(1)})[1]}")
    print(f"first-step loss: eager {loss_eager:.6f}  compiled nn.Module {loss_compiled:.6f}  fpipe {loss_fpipe:.6f}")
    for n in med:
        print(f"{n:14s} {med[n] * 1e3:8.2f} ms  {per_s(n):8.1f} images/s   first call {first[n]:6.2f} s")
    print(f"compile_s: {fpipe_first - med['fpipe_step']:.1f}  (the first call in this process; the timed "
          f"programs then load what it kept: first call {first['fpipe_step']:.1f} s)")
    print(f"ratio_vs_eager: {med['eager_step'] / med['fpipe_step']:.3f}")
    print(f"ratio_vs_compiled: {med['compiled_step'] / med['fpipe_step']:.3f}")
    print(f"ratio_vs_forward: {med['fpipe_step'] / med['forward']:.3f}")
    print(f"ratio_vs_forward_nhwc: {med['fpipe_step'] / med['forward_nhwc']:.3f}")
    print(f"eager_vs_forward: {med['eager_step'] / med['forward']:.3f}")
    print(f"extract_vs_forward: {med['forward'] / med['fpipe_extract']:.3f}  (feature extraction, compiled; "
          f"eager {med['forward'] / med['fpipe_extract_eager']:.3f}; before, model.features "
          f"{med['forward'] / med['fpipe_forward']:.3f})")
    if not args.no_memory:
        mem = {}
        for n in ("forward", "eager_step", "fpipe_step"):
            a = dict(vars(args), depth=[depth])
            mem[n] = measure_memory(argparse.Namespace(**a), n)
            print(f"memory {n:12s} peak rise {mem[n]['rise_mib']:8.1f} MiB over {mem[n]['base_mib']:8.1f} MiB "
                  f"resident after setup")
        print(f"memory_vs_forward: {mem['fpipe_step']['rise_mib'] / max(mem['forward']['rise_mib'], 1e-9):.3f}")
        total = lambda n: mem[n]["base_mib"] + mem[n]["rise_mib"]
        print(f"memory_total_vs_forward: {total('fpipe_step') / total('forward'):.3f}  (peak RSS of the "
              "process, model, compiled code and constants included)")
        print(f"memory_eager_vs_forward: {mem['eager_step']['rise_mib'] / max(mem['forward']['rise_mib'], 1e-9):.3f}")
        print(f"second_run_first_call_s: fpipe {mem['fpipe_step']['first_call_s']:.1f}  (a fresh process; "
              f"this one's first call {fpipe_first:.1f})")
    if args.first_calls:
        first_calls_cold(args, depth)
    sys.stdout.flush()


def first_calls_cold(args, depth):
    """fpipe's first linear-eval step and the compiled module's, each alone in a fresh process with
    empty compile caches of its own (inductor's, fpipe's kept programs), as a user's first run has
    them: the compile goal's ratio."""
    first = {}
    for name in ("fpipe_step", "compiled_step"):
        env = caches_env(scratch_dir(f"fpipe-bench-{name}-caches-"))
        first[name] = measure_memory(argparse.Namespace(**dict(vars(args), depth=[depth])), name, env)["first_call_s"]
    print(f"first_call_s (cold): fpipe {first['fpipe_step']:.1f}  compiled {first['compiled_step']:.1f}")
    print(f"first_call_vs_compiled (cold): {first['fpipe_step'] / first['compiled_step']:.2f}  (goal <= 2.0)")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--depth", type=resnet_arg, nargs="+", default=[18, 50], metavar="RESNET",
                    help=f"ResNet depths or names: {', '.join(map(str, RESNETS))}")
    add_case_flags(ap, image_size=32, batch_size=64, iters=20, warmup=3)
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    ap.add_argument("--first-calls", action="store_true",
                    help="also time each program's first call alone, from empty compile caches")
    ap.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    memory_note = as_main_does(args.threads)
    if args.memory_child or args.serve:
        args.depth = args.depth[0]
        return memory_child(args) if args.memory_child else serve(args)
    own_compile_cache()  # the trunk and heads' step: the first call compiles, the memory processes load
    print("machine:", machine())
    print(memory_note)
    for depth in args.depth:
        bench(args, depth)


if __name__ == "__main__":
    main()
