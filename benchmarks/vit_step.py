"""ViT-S/16 linear evaluation: fpipe's compiled step vs. eager nn.Module code, and vs. the forward floor.

    PYTHONPATH=. python benchmarks/vit_step.py                                 # 64 px, batch 16
    PYTHONPATH=. python benchmarks/vit_step.py --image-size 224 --batch-size 32

One model (a ViT-S/16 trunk, frozen, stored for the input size, and one linear head ``fc`` on
``lastCLS``), one batch, each program in a process of its own, timed round-robin (linear_eval_step.py's
``rounds``; ``--in-one-process``: all in this one, as before 12-05):

  eager    what a user would write otherwise: a torchvision-style ViT ``nn.Module`` written out
           below (explicit q/k/v projection and ``scaled_dot_product_attention``, no
           nn.MultiheadAttention; the same math), trunk ``requires_grad=False``, ``loss.backward()``,
           ``torch.optim.SGD`` (momentum 0.9) on the head. Same weights, copied by name.
  compiled the same under ``torch.compile(net)`` (the optimizer eager).
  step     fpipe's step as the loop builds it: the frozen trunk compiled as a constant
           (fpipe.train.frozen_trunk, inductor freezing), ``make_step`` over the head with fpipe.optim's
           SGD, compiled (``maybe_compile``), via ``frozen_trunk.on_features``.
  forward  the floor: the eager nn.Module trunk under ``torch.inference_mode``; also fpipe's own
           eager trunk forward.

Output lines: ``ratio_vs_eager`` (eager step time / fpipe step time, >1: fpipe faster),
``ratio_vs_compiled`` (the compiled module's step time / fpipe's) and ``ratio_vs_forward`` (fpipe
step time / eager forward time; 1.0 is the floor).
"""
import argparse
import collections
import sys

import ml_collections
import torch
import torch.nn as nn
import torch.nn.functional as F

from benchmarks.linear_eval_step import (NUM_CLASSES, add_case_flags, as_main_does, fpipe_step, make_optimizer,
                                         report_steps, rounds, serve_program, sgd_head_runner, where)
from fpipe import tree
from fpipe.models import model as model_lib
from fpipe.models import vit


# ---------------------------------------------------------------- the nn.Module a user would write
class SelfAttention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * dim))
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x):
        n, t, d = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias).reshape(n, t, 3, self.heads, d // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, t, d)
        return self.out_proj(y)


class EncoderBlock(nn.Module):
    def __init__(self, dim, heads, mlp_dim):
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim, eps=1e-6)
        self.self_attention = SelfAttention(dim, heads)
        self.ln_2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_dim), nn.GELU(), nn.Dropout(0.0), nn.Linear(mlp_dim, dim))

    def forward(self, x):
        x = x + self.self_attention(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Encoder(nn.Module):
    def __init__(self, tokens, dim, depth, heads, mlp_dim):
        super().__init__()
        self.pos_embedding = nn.Parameter(torch.empty(1, tokens, dim))
        self.layers = nn.Sequential(collections.OrderedDict(
            (f"encoder_layer_{i}", EncoderBlock(dim, heads, mlp_dim)) for i in range(depth)))
        self.ln = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x):
        return self.ln(self.layers(x + self.pos_embedding))


class ViT(nn.Module):
    """torchvision's VisionTransformer, written out; ``fc`` is the linear head on the class token."""

    def __init__(self, spec, num_classes):
        super().__init__()
        d = spec.hidden_dim
        self.patch_size = spec.patch_size
        self.class_token = nn.Parameter(torch.zeros(1, 1, d))
        self.conv_proj = nn.Conv2d(3, d, spec.patch_size, spec.patch_size)
        self.encoder = Encoder(1 + spec.grid ** 2, d, spec.depth, spec.heads, spec.mlp_dim)
        self.fc = nn.Linear(d, num_classes)

    def features(self, x):
        x = self.conv_proj(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.encoder(x)[:, 0]

    def forward(self, x):
        return self.fc(self.features(x))


def torch_module(spec, params):
    net = ViT(spec, NUM_CLASSES)
    net.load_state_dict({n.split(".", 1)[1]: v for n, v in tree.flatten(params).items()}, strict=True)
    return net


# ---------------------------------------------------------------- programs
def build(image_size, batch_size, seed=0):
    options = dict(vit.PRESETS["vit_small_patch16_224"], image_size=image_size)
    cfg = ml_collections.ConfigDict(dict(trunk=dict(name="vit", **options),
                                         heads=dict(fc=model_lib.head_config("lastCLS", "linear"))))
    model = model_lib.build(cfg, num_classes=NUM_CLASSES, image_size=image_size)
    params, state = model.init(seed)
    gen = torch.Generator().manual_seed(seed)
    batch = {"image": torch.randn(batch_size, 3, image_size, image_size, generator=gen),
             "label": torch.randint(0, NUM_CLASSES, (batch_size,), generator=gen)}
    return model, params, state, batch


def eager_step(spec, params, batch, compiled=False):
    """``compiled``: the module under ``torch.compile`` (the optimizer eager)."""
    net = torch_module(spec, params).train()
    for p in net.parameters():
        p.requires_grad_(False)
    for p in net.fc.parameters():
        p.requires_grad_(True)
    run = sgd_head_runner(torch.compile(net) if compiled else net, net.fc)
    return lambda: run(batch)


def eager_forward(spec, params, batch):
    net = torch_module(spec, params).eval()

    def run():
        with torch.inference_mode():
            return net.features(batch["image"])

    return run


def fpipe_forward(model, params, state, batch):
    def run():
        with torch.inference_mode():
            return model.features(params, state, batch["image"], ("lastCLS",))
    return run


def programs(model, params, state, batch):
    spec = model.trunk.spec
    return {
        "eager_step": eager_step(spec, params, batch),
        "compiled_step": eager_step(spec, params, batch, compiled=True),
        "fpipe_step": fpipe_step(model, params, state, batch, compile_head=True, nhwc=False)[0],
        "forward": eager_forward(spec, params, batch),
        "fpipe_forward": fpipe_forward(model, params, state, batch),
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_case_flags(ap, image_size=64, batch_size=16, iters=10, warmup=2)
    argv = sys.argv[1:] if argv is None else list(argv)
    args = ap.parse_args(argv)
    note = as_main_does(args.threads)
    model, params, state, batch = build(args.image_size, args.batch_size)
    if args.serve:
        return serve_program(programs(model, params, state, batch)[args.serve], args.warmup)
    print(note)
    progs = programs(model, params, state, batch)
    # Same math: one step of each from the same start gives the same loss.
    loss_eager, loss_compiled = float(progs["eager_step"]().detach()), float(progs["compiled_step"]().detach())
    loss_fpipe = float(progs["fpipe_step"]())
    med, first, _ = rounds(args, __file__, argv, list(progs), lambda: programs(model, params, state, batch))
    print(f"== ViT-S/16, {args.image_size}px, batch {args.batch_size}, {args.threads} threads, median of "
          f"{args.iters} after {args.warmup} warm-up, {where(args)}; optimizer: "
          f"{make_optimizer({'w': torch.zeros(1)})[1]}")
    print(f"first-step loss: eager {loss_eager:.6f}  compiled {loss_compiled:.6f}  fpipe {loss_fpipe:.6f}")
    report_steps("", med, first, args.batch_size)


if __name__ == "__main__":
    main()
