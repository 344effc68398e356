"""Frozen RegNetY linear-evaluation step: fpipe's compiled step vs. eager nn.Module code, and vs. the forward.

    PYTHONPATH=. python benchmarks/regnet_step.py                        # RegNetY-400MF, 64 px, batch 64
    PYTHONPATH=. python benchmarks/regnet_step.py --name regnet_y_1_6gf --image-size 224 --batch-size 16

The same programs as benchmarks/linear_eval_step.py (read it for the method), on a RegNet trunk:

  eager          a torchvision-style RegNetY ``nn.Module`` (benchmarks/zoo_modules.py; no torchvision),
                 trunk frozen and in eval mode, a linear ``fc`` trained by ``loss.backward()`` and
                 ``torch.optim.SGD`` (momentum 0.9). fpipe's weights are copied in by torchvision name.
  fpipe_step     fpipe's step as the loop builds it: the frozen trunk compiled as a constant
                 (``frozen_trunk``), the head's step over fpipe.optim's SGD (momentum 0.9).
  forward        the floor: the nn.Module trunk forward under ``torch.inference_mode``.
  fpipe_forward  fpipe's eager trunk forward (``model.features``), for reference.

Medians over ``--iters`` round-robin calls after ``--warmup``, each program in a process of its own
(``--in-one-process``: all in this one, as before 12-05). Output lines:

  ratio_vs_eager: X       eager step time / fpipe step time (>1: fpipe is faster)
  ratio_vs_forward: Y     fpipe step time / eager forward time (1.0 is the floor)
"""
import argparse
import sys

import ml_collections
import torch

from benchmarks import zoo_modules
from benchmarks.linear_eval_step import (NUM_CLASSES, add_round_flags, as_main_does, fpipe_step, report_steps,
                                         rounds, serve_program, sgd_head_runner, where)
from fpipe import tree
from fpipe.models import model as model_lib
from fpipe.models import regnet


def torch_module(spec, params, state):
    """The torchvision-style RegNet of benchmarks/zoo_modules.py holding fpipe's weights."""
    return zoo_modules.torch_module(spec, params, state, NUM_CLASSES)


# ---------------------------------------------------------------- programs
def build(name, image_size, batch_size, seed=0):
    cfg = ml_collections.ConfigDict(dict(trunk=model_lib.trunk_config(name),
                                         heads=dict(fc=model_lib.head_config("flatten", "linear"))))
    model = model_lib.build(cfg, num_classes=NUM_CLASSES, image_size=image_size)
    params, state = model.init(seed)
    gen = torch.Generator().manual_seed(seed)
    state = tree.map_with_names(  # pretrained-like running statistics
        lambda n, v: (torch.rand(v.shape, generator=gen) * 0.2 - 0.1 if n.endswith("running_mean") else
                      torch.rand(v.shape, generator=gen) + 0.5 if n.endswith("running_var") else v), state)
    batch = {"image": torch.randn(batch_size, 3, image_size, image_size, generator=gen),
             "label": torch.randint(0, NUM_CLASSES, (batch_size,), generator=gen)}
    return model, params, state, batch


def eager_step(spec, params, state, batch):
    net = torch_module(spec, params, state)
    for p in net.parameters():
        p.requires_grad_(False)
    net.fc.requires_grad_(True)
    net.train()
    net.stem.eval()
    net.trunk_output.eval()
    run = sgd_head_runner(net, net.fc)
    return lambda: run(batch)


def eager_forward(spec, params, state, batch):
    net = torch_module(spec, params, state).eval()

    def run():
        with torch.inference_mode():
            return net.features(batch["image"])

    return run


def fpipe_forward(model, params, state, batch):
    def run():
        with torch.inference_mode():
            return model.features(params, state, batch["image"])
    return run


def programs(spec, model, params, state, batch):
    return {"eager_step": eager_step(spec, params, state, batch),
            "fpipe_step": fpipe_step(model, params, state, batch)[0],
            "forward": eager_forward(spec, params, state, batch),
            "fpipe_forward": fpipe_forward(model, params, state, batch)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--name", default="regnet_y_400mf", choices=sorted(regnet.PRESETS))
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    add_round_flags(ap)
    argv = sys.argv[1:] if argv is None else list(argv)
    args = ap.parse_args(argv)
    note = as_main_does(args.threads)
    model, params, state, batch = build(args.name, args.image_size, args.batch_size)
    spec = model.trunk.spec
    if args.serve:
        return serve_program(programs(spec, model, params, state, batch)[args.serve], args.warmup)
    print(note)
    progs = programs(spec, model, params, state, batch)
    # Same math: one step of each from the same start gives the same loss; the same features.
    loss_eager, loss_fpipe = float(progs["eager_step"]().detach()), float(progs["fpipe_step"]())
    feat_err = (progs["forward"]() - progs["fpipe_forward"]()["flatten"]).abs().max().item()
    med, first, _ = rounds(args, __file__, argv, list(progs), lambda: programs(spec, model, params, state, batch))
    print(f"== {args.name}, {args.image_size}px, batch {args.batch_size}, {args.threads} threads, "
          f"median of {args.iters} after {args.warmup} warm-up, {where(args)}")
    print(f"first-step loss: eager {loss_eager:.6f}  fpipe {loss_fpipe:.6f}; max feature difference {feat_err:.2e}")
    report_steps("", med, first, args.batch_size)


if __name__ == "__main__":
    main()
