r"""Training step with the trunk training (supervised, finetune): fpipe vs. nn.Module + torch.optim.

    PYTHONPATH=. python benchmarks/train_step.py                        # both modes, ResNet-18/50, 32 and 64 px
    PYTHONPATH=. python benchmarks/train_step.py --mode finetune --depth 18 --image-size 32
    PYTHONPATH=. python benchmarks/train_step.py --image-size 224 --batch-size 32 --depth 50
    PYTHONPATH=. python benchmarks/train_step.py --mode finetune --depth resnext50_32x4d wide_resnet50_2 --image-size 64
    PYTHONPATH=. python benchmarks/train_step.py --arch vit_s16 --optimizer adamw --mode finetune --image-size 64
    PYTHONPATH=. python benchmarks/train_step.py --arch regnet_y_400mf --mode supervised --image-size 64
    PYTHONPATH=. python benchmarks/train_step.py --mode finetune --freeze 'trunk\.(conv1|bn1|layer1)\..*'
    PYTHONPATH=. python benchmarks/train_step.py --mode supervised --depth 50 --ema 0.9999   # each also averages its weights

Settings from the shipped configs (``configs/supervised.py``: SGD lr 0.1, momentum 0.9, weight
decay 5e-4; ``configs/finetune.py``: SGD lr 0.05, Nesterov momentum 0.9, weight decay 1e-4, the
trunk at 0.1x the lr; both: no weight decay on norms and biases), a ResNet trunk (any of
torchvision's depths, or by name its ResNeXt and wide ResNets and SimCLR's ``resnet50x2``; or
``--arch vit_s16``: a ViT-S/16 stored for the input size, the head on its class token, or any
other ViT preset by name such as ``--arch vit_b_16`` (benchmarks/vit_step.py's twin: DINO's,
DeiT's, DINOv2's and BEiT's layouts too); or a RegNet, ConvNeXt, EfficientNet or Swin preset such
as ``--arch regnet_y_400mf``, whose baselines are the nn.Module twins of benchmarks/zoo_modules.py)
and a linear ``fc`` head, 10 classes, batch 64, everything trains. ``--optimizer adamw`` swaps the
config's SGD for AdamW (lr 1e-3, weight decay 0.05, the same rules; the baselines'
``torch.optim.AdamW(foreach=True)``), what ViTs are fine-tuned with. ``--freeze`` adds
``model.freeze`` rules (above: detectron2's FREEZE_AT=2, the stem and layer1 frozen and their
norms on running statistics); the baselines' matching params then take no gradient and their
norms run in eval mode. ``--ema DECAY`` makes every program keep an average of its weights
(fpipe: ``config.ema``'s in-place update after the step; the modules: torch's ``AveragedModel``
with ``get_ema_multi_avg_fn``, as timm's ModelEmaV3). Five programs, each in its own process, timed taking turns (a busy
machine slows each alike; a turn is an untimed step, then steps back to back:
benchmarks/process_rounds.py; ``--in-one-process``: all in this one, sharing its heap, as before
12-05), medians:

  fpipe     fpipe's step exactly as the loop builds it (``loop.build_train_step``, compiled), on the
            config's partition, eval norms and ``fpipe.optim`` optimizer.
  eager     the torchvision-style ``nn.Module`` of benchmarks/linear_eval_step.py with fpipe's
            weights, ``loss.backward()``, ``torch.optim.SGD(foreach=True)`` with one param group per
            (lr multiplier, weight decay) of fpipe's resolved rules.
  compiled  ``torch.compile`` of that module, the same eager ``torch.optim.SGD(foreach=True)``.
  eager_cl, compiled_cl  the same two with the module and the images in channels-last memory
            (``net.to(memory_format=torch.channels_last)``), what PyTorch advises for CNNs; on
            CPU they train faster than NCHW (R50 64 px: 0.85x eager's time), so fpipe is also
            measured against them.
  fpipe_no_remat, fpipe_remat_fused, fpipe_remat_all  (only when named) fpipe's step with
            ``compile_remat`` "off", "fused" (the default since 12-04) or "all": what the
            recomputation pass (``fpipe.train.remat``) and its modes change.

Output per case:

  ratio_vs_compiled: X   compiled step time / fpipe step time (>1: fpipe is faster; goal >= 1.0)
  ratio_vs_eager: Y      eager step time / fpipe step time (goal >= 1.1)
  ratio_vs_compiled_cl, ratio_vs_eager_cl: the same against the channels-last baselines
  first_call_s (in turn): ...  the first call (the compilation) of each program, one after another,
                          sharing inductor's cache: a later program reuses the C++ kernels an
                          earlier one built (ViT-S/16 AdamW, Zen 4: the module 23.9 s after fpipe,
                          30.9 s alone), so not the goal's ratio, which is first_call_vs_compiled
                          (cold) below
  second_run_first_call_s: ...  the first call in a fresh process after this one compiled
                          (what a second run waits: fpipe loads the step it saved,
                          fpipe.train.compile_cache; torch.compile has its inductor/AOTAutograd caches)
  memory: each program alone in a fresh process: the step peak RSS (the process's peak over --warmup
          + 5 steps after the first call, VmHWM reset), and the process peak (compile included).
          Twice, each program with compile caches of its own (inductor's, fpipe's saved steps): cold
          (empty: the first call compiles, and what compiling leaves on the heap counts), then warm
          (the same caches filled: the first call loads). Every program always in the same state.
  memory_vs_compiled (cold|warm): Z  fpipe's step peak RSS / the compiled module's (goal <= 1.1);
          likewise memory_vs_eager, _compiled_cl (goal <= 1.1), _eager_cl
  first_call_vs_compiled (cold|warm): fpipe's first call / the compiled module's, each alone in a
          fresh process (goal, cold: <= 2.0; likewise _compiled_cl); first_call_s (warm): fpipe's
          first call with its caches filled, what a second run waits (goal <= 5 s)
  alone_ratio_vs_<baseline> (cold|warm): the same ratios from those runs alone (median of the 5
          steps after --warmup ones), one after another (so the machine's drift between them
          counts). Programs interleaved in one process (``--in-one-process``) share one heap: fpipe's
          steps then fault in fresh memory where the others' blocks fragment it (finetune
          wide_resnet50_2 64 px b32: 0.97x eager so, 1.46-1.49x alone), which the default rounds,
          a process per program, avoid.
"""
import argparse
import ctypes
import gc
import importlib
import json
import os
import subprocess
import sys
import time

import ml_collections
import torch
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from benchmarks import vit_step, zoo_modules
from benchmarks.linear_eval_step import (NUM_CLASSES, RESNETS, add_round_flags, as_main_does, caches_env, machine,
                                         own_compile_cache, resnet_arg, resnet_options, resnet_title, rounds,
                                         scratch_dir, serve_program, torch_module, where)
from benchmarks.linear_eval_step import _rss_kib as _kib  # a /proc/self/status field, in KiB
from fpipe import freeze, host_memory, optim, tree
from fpipe.models import fold
from fpipe.models import model as model_lib
from fpipe.models import convnext, efficientnet, regnet, swin, vit
from fpipe.train import distributed
from fpipe.train import ema as ema_lib
from fpipe.train import loop as loop_lib

MODES = ("supervised", "finetune")
PROGRAMS = ("fpipe", "eager", "compiled", "eager_cl", "compiled_cl")  # the default set
GOALS = {"compiled": 1.0, "eager": 1.1, "compiled_cl": 1.0, "eager_cl": 1.1}  # fpipe's speed over each baseline
REMAT_PROGRAMS = {"fpipe_no_remat": "off", "fpipe_remat_fused": "fused", "fpipe_remat_all": "all"}  # compile_remat modes
BASELINES = (*GOALS, *REMAT_PROGRAMS)
PRESET_ARCHS = (*regnet.PRESETS, *convnext.PRESETS, *efficientnet.PRESETS, *swin.PRESETS)  # trunk presets by name
VIT_ARCHS = {"vit_s16": "vit_small_patch16_224", **{name: name for name in vit.PRESETS}}  # short name: ViT-S/16
ARCHS = ("resnet", *VIT_ARCHS, *sorted(PRESET_ARCHS))
OPTIMIZERS = ("config", "adamw")


def check_image_sizes(ap, arch, sizes):
    """``ap.error`` unless a ViT preset's patch size divides every size (vit_step.check_sizes)."""
    if arch in VIT_ARCHS:
        vit_step.check_sizes(ap, VIT_ARCHS[arch], sizes)


def config_for(mode, depth, image_size, batch_size, arch="resnet", optimizer="config", freeze_rules=()):
    config = importlib.import_module(f"configs.{mode}").get_config()
    config.model.freeze = tuple(config.model.freeze or ()) + tuple(freeze_rules)
    if arch in VIT_ARCHS:  # stored for the input size; the head on the class token (or the pooled patches)
        options = dict(vit.PRESETS[VIT_ARCHS[arch]], image_size=image_size)
        config.model.trunk = ml_collections.ConfigDict(dict(name="vit", **options))
        config.model.heads.fc = model_lib.head_config(vit_step.default_feature(vit.Spec(**options)), "linear")
    elif arch in PRESET_ARCHS:
        config.model.trunk = model_lib.trunk_config(arch)
    else:
        for key, value in resnet_options(depth).items():  # a depth, or a named ResNet's options
            config.model.trunk[key] = value
    if optimizer == "adamw":
        config.optim.name, config.optim.lr, config.optim.weight_decay = "adamw", 1e-3, 0.05
    config.data.image_size = image_size
    config.data.batch_size = batch_size
    return config


def case_name(args, mode, depth):
    model = {"vit_s16": "ViT-S/16", "resnet": resnet_title(depth)}.get(args.arch, args.arch)
    return (f"{mode} {model}".strip() + (", AdamW" if args.optimizer == "adamw" else "")
            + (f", frozen {' '.join(args.freeze)}" if getattr(args, "freeze", None) else ""))


def setup(mode, depth, image_size, batch_size, seed=0, arch="resnet", optimizer="config", freeze_rules=(), ema=0.0):
    """The loop's model, partition and optimizer for this config, and one batch; ``ema``: the decay
    of an average of the weights each program keeps (0: none)."""
    config = config_for(mode, depth, image_size, batch_size, arch, optimizer, freeze_rules)
    model = model_lib.build(config.model, num_classes=NUM_CLASSES, image_size=image_size)
    params, state = model.init(seed)
    rules = tuple(config.model.freeze) + freeze.frozen_by_rules(params, config.optim.lr_mults)
    trainable, frozen = freeze.partition(params, rules)
    eval_norms = freeze.eval_norms(state, frozen)
    base_lr, _ = optim.scaled_lr(config.optim, batch_size)
    opt = optim.build(config.optim, trainable)
    gen = torch.Generator().manual_seed(seed)
    batch = {"image": torch.randn(batch_size, 3, image_size, image_size, generator=gen),
             "label": torch.randint(0, NUM_CLASSES, (batch_size,), generator=gen)}
    return dict(config=config, model=model, params=params, state=state, trainable=trainable, frozen=frozen,
                eval_norms=eval_norms, opt=opt, lr=base_lr, batch=batch, depth=depth, arch=arch, ema=ema)


# ---------------------------------------------------------------- programs
def fpipe_program(s, autocast=None, device=torch.device("cpu"), compiling=True, dist=None):
    """fpipe's step as the loop builds it, on ``device`` (``s["batch"]`` must be there), under
    ``autocast`` (a dtype, or None: float32); ``compiling=False``: as a run too short to compile
    has it (eager); ``dist``: the run's processes (default: this one alone)."""
    step = loop_lib.build_train_step(s["config"], s["model"], s["opt"], s["trainable"], s["state"],
                                     s["eval_norms"], dist or distributed.Dist(device=device),
                                     compiling=compiling, autocast=autocast)
    box = {"ts": train_state(s, device)}
    lr = s["opt"].inputs(s["lr"])  # as the loop gives them

    def run():
        box["ts"], metrics = step(box["ts"], s["batch"], lr)
        if s.get("ema"):  # as the loop does after each step (config.ema)
            ema_lib.update(box["ts"], s["ema"])
        return metrics["loss"]
    return run


def train_state(s, device):
    """The initial train state as the loop hands it to the step: on ``device``, channels-last."""
    state = {"trainable": s["trainable"], "frozen": s["frozen"], "model_state": s["state"],
             "opt_state": s["opt"].init(s["trainable"])}
    if s.get("ema"):
        state[ema_lib.KEY] = ema_lib.init(s["trainable"], s["state"])
    return fold.channels_last(loop_lib.to_device(state, device))


def torch_optimizer(net, s, **impl):
    """torch.optim.SGD (AdamW where the config's is) with ``foreach=True`` (or ``impl``: fused=True on
    a GPU), fpipe's resolved per-name rules as param groups."""
    cfg, groups = s["config"].optim, {}
    named = {n: p for n, p in net.named_parameters() if p.requires_grad}
    for name, h in s["opt"].hyper.items():
        local = name.split(".", 1)[1]  # trunk.layer1.0.conv1.weight, heads.fc.weight -> torchvision's names
        key = (h["lr_mult"], h["wd"])
        groups.setdefault(key, []).append(named.pop(local))
    assert not named, f"params without a group: {list(named)[:5]}"
    param_groups = [{"params": ps, "lr": s["lr"] * m, "weight_decay": wd} for (m, wd), ps in groups.items()]
    if cfg.name == "adamw":
        return torch.optim.AdamW(param_groups, lr=s["lr"], betas=tuple(cfg.betas), eps=cfg.eps,
                                 **(impl or {"foreach": True}))
    return torch.optim.SGD(param_groups, lr=s["lr"], momentum=cfg.momentum, nesterov=cfg.nesterov,
                           **(impl or {"foreach": True}))


def torch_net(s):
    """The nn.Module of this setup's network with fpipe's weights, in train mode, its frozen params
    without gradients and the norms fpipe runs with running statistics in eval mode (detectron2's
    FrozenBatchNorm)."""
    if s["arch"] in VIT_ARCHS:
        net = vit_step.torch_module(s["model"].trunk.spec, s["params"], vit_step.head_feature(s["model"])).train()
    elif s["arch"] in PRESET_ARCHS:
        net = zoo_modules.torch_module(s["model"].trunk.spec, s["params"], s["state"], NUM_CLASSES).train()
    else:
        net = torch_module(s["depth"], s["params"], s["state"]).train()
    frozen = {n.split(".", 1)[1] for n in tree.flatten(s["frozen"])}  # torchvision's names
    for name, p in net.named_parameters():
        p.requires_grad_(name not in frozen)
    for name in s["eval_norms"]:
        net.get_submodule(name.split(".", 1)[1]).eval()
    return net


def module_program(s, compiled, channels_last=False, wrap=None, **optimizer_impl):
    """The nn.Module step; ``wrap``: a function of the module giving the one to run (compiled
    after it), e.g. DistributedDataParallel; ``optimizer_impl``: ``torch_optimizer``'s."""
    net = torch_net(s)
    images = s["batch"]["image"]
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    opt = torch_optimizer(net, s, **optimizer_impl)
    # timm's ModelEmaV3 and torch's AveragedModel: one foreach lerp over params and buffers
    average = AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(s["ema"]), use_buffers=True) if s.get("ema") else None
    net = wrap(net) if wrap else net
    fwd = torch.compile(net) if compiled else net

    def run():
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(fwd(images), s["batch"]["label"])
        loss.backward()
        opt.step()
        if average is not None:
            average.update_parameters(net)
        return loss.detach()
    return run


def make_program(name, s):
    if name == "fpipe":
        return fpipe_program(s)
    if name in REMAT_PROGRAMS:
        config = s["config"].copy_and_resolve_references()
        config.compile_remat = REMAT_PROGRAMS[name]
        return fpipe_program({**s, "config": config})
    return module_program(s, compiled=name.startswith("compiled"), channels_last=name.endswith("_cl"))


# ---------------------------------------------------------------- fresh processes
def child(args):
    """One program alone: its first-call time, the peak RSS over the ``--warmup`` + ``--iters``
    steps after it (and of the whole process, compilation included), the median of the last
    ``--iters`` (after the heap has grown: at 224 px every program faults its memory in for five
    steps); prints JSON."""
    s = setup(args.mode[0], args.depth[0], args.image_size[0], args.batch_size, arch=args.arch,
              optimizer=args.optimizer, freeze_rules=args.freeze, ema=args.ema)
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    before = _kib("VmRSS")
    run = make_program(args.child, s)
    t = time.perf_counter()
    run()
    first = time.perf_counter() - t
    host_memory.keep_large_blocks()  # as the train loops do after their first step
    compile_peak = _kib("VmHWM")
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    try:  # resets VmHWM to the current RSS: the steps' own peak, without the compilation's
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    times = []
    for i in range(args.warmup + args.iters):
        t = time.perf_counter()
        run()
        if i >= args.warmup:
            times.append(time.perf_counter() - t)
    from torch._dynamo.utils import counters
    print(json.dumps({"first_call_s": first, "peak_mib": _kib("VmHWM") / 1024, "setup_mib": before / 1024,
                      "step_ms": sorted(times)[len(times) // 2] * 1e3 if times else None,
                      "process_peak_mib": max(compile_peak, _kib("VmHWM")) / 1024,
                      "inductor": {k: v for k, v in counters["inductor"].items() if "cache" in k},
                      "aot_autograd": {k: v for k, v in counters["aot_autograd"].items() if "cache" in k}}))


def case_argv(args, mode, depth, image_size, iters, warmup):
    """This case's command-line options, for a process of its own (``--child``, alone; ``--serve``,
    in ``rounds``)."""
    return ["--mode", mode, "--depth", str(depth), "--image-size", str(image_size), "--batch-size",
            str(args.batch_size), "--threads", str(args.threads), "--iters", str(iters), "--warmup", str(warmup),
            "--arch", args.arch, "--optimizer", args.optimizer, *(["--freeze", *args.freeze] if args.freeze else []),
            "--ema", str(args.ema)]


def serve(args):
    """One program in ``rounds``."""
    s = setup(args.mode[0], args.depth[0], args.image_size[0], args.batch_size, arch=args.arch,
              optimizer=args.optimizer, freeze_rules=args.freeze, ema=args.ema)
    serve_program(make_program(args.serve, s), args.warmup)


def in_fresh_process(args, mode, depth, image_size, name, iters, caches=None):
    """``child`` in a new process; ``caches``: a directory for its compile caches (inductor's and
    fpipe's), else the ones this process uses."""
    cmd = [sys.executable, os.path.abspath(__file__), "--child", name,
           *case_argv(args, mode, depth, image_size, iters, args.warmup if iters else 0)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=caches_env(caches) if caches else dict(os.environ))
    if out.returncode:
        raise RuntimeError(f"{name} in a fresh process failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- main
def bench(args, mode, depth, image_size):
    # Each case compiles as a fresh process would: without this, Dynamo recompiling the same step
    # code for a second config makes its changed Python floats (weight decay) graph inputs, a
    # graph that a fresh process (the second run below) never builds.
    torch._dynamo.reset()
    progs = args.programs

    def in_this_process():
        s = setup(mode, depth, image_size, args.batch_size, arch=args.arch, optimizer=args.optimizer,
                  freeze_rules=args.freeze, ema=args.ema)
        return {n: make_program(n, s) for n in progs}

    med, first, losses = rounds(args, __file__, case_argv(args, mode, depth, image_size, args.iters, args.warmup),
                                progs, in_this_process)
    print(f"== {case_name(args, mode, depth)}, {image_size}px, batch {args.batch_size}, {args.threads} threads, "
          f"median of {args.iters} interleaved rounds after {args.warmup} warm-up, {where(args)}")
    print("first losses: " + "  ".join(f"{n} " + " ".join(f"{v:.5f}" for v in losses[n]) for n in progs))
    for n in progs:
        print(f"{n:11s} {med[n] * 1e3:8.1f} ms  {args.batch_size / med[n]:7.1f} images/s   first call {first[n]:6.1f} s")
    for base in BASELINES:
        if "fpipe" in med and base in med:
            goal = f"  (goal >= {GOALS[base]})" if base in GOALS else ""
            print(f"ratio_vs_{base}: {med[base] / med['fpipe']:.3f}{goal}")
    print("first_call_s (in turn, sharing inductor's cache; the goal's: first_call_vs_compiled (cold)): "
          + "  ".join(f"{n} {first[n]:.1f}" for n in progs))
    sys.stdout.flush()
    if not args.no_second_run:
        again = {n: in_fresh_process(args, mode, depth, image_size, n, 0) for n in progs if not n.startswith("eager")}
        print("second_run_first_call_s: " + "  ".join(f"{n} {r['first_call_s']:.1f}" for n, r in again.items()))
        for n, r in again.items():
            print(f"  {n} caches: inductor {r['inductor']} aot_autograd {r['aot_autograd']}")
        sys.stdout.flush()
    if not args.no_memory:
        caches = {n: scratch_dir(f"fpipe-bench-{n}-caches-") for n in progs}
        for state in ("cold", "warm"):
            mem = {n: in_fresh_process(args, mode, depth, image_size, n, 5, caches[n]) for n in progs}
            for n, r in mem.items():
                print(f"memory ({state}) {n:11s} step peak RSS {r['peak_mib']:8.1f} MiB   process peak (compile "
                      f"included) {r['process_peak_mib']:8.1f} MiB   first call {r['first_call_s']:.1f} s")
            for base in BASELINES:
                if "fpipe" in mem and base in mem:
                    print(f"memory_vs_{base} ({state}): {mem['fpipe']['peak_mib'] / mem[base]['peak_mib']:.3f}"
                          + ("  (goal <= 1.1)" if base.startswith("compiled") else ""))
            for base in GOALS:  # the compile goal: a cold first call <= 2x the compiled module's
                if base.startswith("compiled") and "fpipe" in mem and base in mem:
                    print(f"first_call_vs_{base} ({state}): {mem['fpipe']['first_call_s'] / mem[base]['first_call_s']:.2f}"
                          + ("  (goal <= 2.0)" if state == "cold" else ""))
            if state == "warm" and "fpipe" in mem:
                print(f"first_call_s (warm): fpipe {mem['fpipe']['first_call_s']:.1f}  (goal <= 5 s: a second run loads its step)")
            print(f"alone ({state}): " + "  ".join(f"{n} {r['step_ms']:.1f} ms" for n, r in mem.items()))
            for base in BASELINES:
                if "fpipe" in mem and base in mem:
                    print(f"alone_ratio_vs_{base} ({state}): {mem[base]['step_ms'] / mem['fpipe']['step_ms']:.3f}")
            sys.stdout.flush()
    sys.stdout.flush()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", nargs="+", default=list(MODES), choices=MODES)
    ap.add_argument("--arch", default="resnet", choices=ARCHS,
                    help="vit_s16 (ViT-S/16) or any ViT preset (vit_b_16, vit_small_patch14_reg4_dinov2, ...; "
                         "benchmarks/vit_step.py's twin), else a RegNet, ConvNeXt, EfficientNet or Swin preset "
                         "(--depth is then ignored)")
    ap.add_argument("--depth", type=resnet_arg, nargs="+", default=[18, 50], metavar="RESNET",
                    help=f"ResNet depths or names: {', '.join(map(str, RESNETS))}")
    ap.add_argument("--optimizer", default="config", choices=OPTIMIZERS,
                    help="adamw: AdamW (lr 1e-3, wd 0.05) instead of the config's SGD")
    ap.add_argument("--freeze", nargs="+", default=[], metavar="REGEX",
                    help="more model.freeze rules, e.g. 'trunk\\.(conv1|bn1|layer1)\\..*' (detectron2's FREEZE_AT=2): "
                         "the baselines' matching params take no gradient and their norms run in eval mode")
    ap.add_argument("--image-size", type=int, nargs="+", default=[32, 64])
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--ema", type=float, default=0.0, metavar="DECAY",
                    help="every program also keeps an average of its weights (config.ema; the modules: "
                         "torch.optim.swa_utils.AveragedModel with get_ema_multi_avg_fn, as timm's ModelEmaV3)")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--programs", nargs="+", default=list(PROGRAMS), choices=(*PROGRAMS, *REMAT_PROGRAMS))
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory processes")
    ap.add_argument("--no-second-run", action="store_true", help="skip the second-run first-call processes")
    add_round_flags(ap)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    check_image_sizes(ap, args.arch, args.image_size)
    memory_note = as_main_does(args.threads)
    if args.child:
        return child(args)
    if args.serve:
        return serve(args)
    own_compile_cache()  # fpipe's saved steps: the first call compiles, a fresh process loads
    print("machine:", machine())
    print(memory_note)
    depths = args.depth if args.arch == "resnet" else args.depth[:1]
    for mode in args.mode:
        for depth in depths:
            for size in args.image_size:
                bench(args, mode, depth, size)


if __name__ == "__main__":
    main()
