"""Frozen-trunk linear-evaluation step on the zoo's trunks: fpipe's step vs. nn.Module code, eager and compiled.

    PYTHONPATH=. python benchmarks/zoo_linear_eval.py                        # RegNetY-400MF, 64 px, batch 64
    PYTHONPATH=. python benchmarks/zoo_linear_eval.py --name convnext_tiny efficientnet_b0 --batch-size 32
    PYTHONPATH=. python benchmarks/zoo_linear_eval.py --name regnet_y_1_6gf --image-size 224 --batch-size 16

The programs of benchmarks/linear_eval_step.py (read it for the method) on a RegNet, ConvNeXt or
EfficientNet preset (ResNets: linear_eval_step.py; ViT: vit_step.py):

  eager_step     the torchvision-style twin (benchmarks/zoo_modules.py; no torchvision) holding
                 fpipe's weights by torchvision name, trunk frozen (``requires_grad=False``) and
                 in eval mode, a linear ``fc`` on the ``flatten`` feature trained by
                 ``loss.backward()`` and ``torch.optim.SGD`` (momentum 0.9).
  compiled_step  the same under ``torch.compile(net)`` (the optimizer eager).
  fpipe_step     fpipe's step as the loop builds it: the frozen trunk compiled as a constant
                 (``frozen_trunk``), the head's step over fpipe.optim's SGD (momentum 0.9).
  forward        the floor: the twin's trunk forward under ``torch.inference_mode``.
  fpipe_forward  fpipe's eager trunk forward (``model.features``), for reference.

Medians over ``--iters`` turns after ``--warmup``, each program in a process of its own
(``--in-one-process``: all in this one, as before 12-05). Output lines per trunk:

  ratio_vs_eager: X       eager step time / fpipe step time (>1: fpipe is faster)
  ratio_vs_compiled: W    compiled nn.Module step time / fpipe step time
  ratio_vs_forward: Y     fpipe step time / eager forward time (1.0 is the floor)
"""
import argparse

import torch

from benchmarks import zoo_modules
from benchmarks.linear_eval_step import (NUM_CLASSES, add_case_flags, as_main_does, build_trunk, case_argv,
                                         compare_programs, fpipe_forward, fpipe_step, serve_or_run, sgd_head_runner)
from fpipe.models import convnext, efficientnet, regnet, swin
from fpipe.models import model as model_lib

NAMES = sorted({**regnet.PRESETS, **convnext.PRESETS, **efficientnet.PRESETS, **swin.PRESETS})


# ---------------------------------------------------------------- programs
def build(name, image_size, batch_size, seed=0):
    return build_trunk(model_lib.trunk_config(name), image_size, batch_size, seed)


def torch_module(model, params, state):
    """The twin of benchmarks/zoo_modules.py holding fpipe's weights."""
    return zoo_modules.torch_module(model.trunk.spec, params, state, NUM_CLASSES)


def eager_step(model, params, state, batch, compiled=False):
    """The user's linear-eval step: every trunk param frozen, the whole net in eval mode (``fc`` has
    no mode), ``fc`` trained; ``compiled``: the net under ``torch.compile`` (the optimizer eager)."""
    net = torch_module(model, params, state).eval()
    for name, p in net.named_parameters():
        p.requires_grad_(name.startswith("fc."))
    run = sgd_head_runner(torch.compile(net) if compiled else net, net.fc)
    return lambda: run(batch)


def eager_forward(model, params, state, batch):
    net = torch_module(model, params, state).eval()

    def run():
        with torch.inference_mode():
            return net.embed(batch["image"])

    return run


def programs(model, params, state, batch):
    return {"eager_step": eager_step(model, params, state, batch),
            "compiled_step": eager_step(model, params, state, batch, compiled=True),
            "fpipe_step": fpipe_step(model, params, state, batch)[0],
            "forward": eager_forward(model, params, state, batch),
            "fpipe_forward": fpipe_forward(model, params, state, batch)}


def bench(args, name):
    model, params, state, batch = build(name, args.image_size, args.batch_size)
    compare_programs(args, __file__, case_argv(args, name, model_flag="--name"), f"{name}, {args.image_size}px",
                     lambda: programs(model, params, state, batch), "flatten")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--name", nargs="+", default=["regnet_y_400mf"], choices=NAMES, metavar="PRESET",
                    help=f"RegNet, ConvNeXt, EfficientNet or Swin presets: {', '.join(NAMES)}")
    add_case_flags(ap, image_size=64, batch_size=64, iters=20, warmup=3)
    args = ap.parse_args(argv)
    serve_or_run(args, as_main_does(args.threads),
                 lambda name: programs(*build(name, args.image_size, args.batch_size)), bench)


if __name__ == "__main__":
    main()
