"""ViT linear evaluation: fpipe's compiled step vs. eager nn.Module code, eager and compiled, and vs. the forward floor.

    PYTHONPATH=. python benchmarks/vit_step.py                                 # ViT-S/16, 64 px, batch 16
    PYTHONPATH=. python benchmarks/vit_step.py --image-size 224 --batch-size 32
    PYTHONPATH=. python benchmarks/vit_step.py --name vit_b_16 vit_small_patch14_reg4_dinov2 --feature cls1_avgpool

One model per preset (``--name``, any of fpipe.models.vit's: torchvision's, DINO's, DeiT's,
DINOv2's; frozen, stored for the input size, by default 4 patches a side), one linear head ``fc``
on ``--feature`` (default lastCLS; dinov2 reads cls1_avgpool or cls4_avgpool, DINO concatCLS4),
one batch, each program in a process of its own, timed round-robin (linear_eval_step.py's
``rounds``; ``--in-one-process``: all in this one, as before 12-05):

  eager    what a user would write otherwise: a torchvision-style ViT ``nn.Module`` written out
           below (explicit q/k/v projection and ``scaled_dot_product_attention``, no
           nn.MultiheadAttention; layer scale, registers, SwiGLU as timm/dinov2 write them, BEiT's
           relative position bias as timm's BEiT reads it; the same math), trunk
           ``requires_grad=False``, ``loss.backward()``, ``torch.optim.SGD`` (momentum 0.9) on the
           head. Same weights, copied by name.
  compiled the same under ``torch.compile(net)`` (the optimizer eager).
  step     fpipe's step as the loop builds it: the frozen trunk compiled as a constant
           (fpipe.train.frozen_trunk, inductor freezing), ``make_step`` over the head with fpipe.optim's
           SGD, compiled (``maybe_compile``), via ``frozen_trunk.on_features``.
  forward  the floor: the eager nn.Module trunk under ``torch.inference_mode``; also fpipe's own
           eager trunk forward.

Output lines per preset: ``ratio_vs_eager`` (eager step time / fpipe step time, >1: fpipe faster),
``ratio_vs_compiled`` (the compiled module's step time / fpipe's) and ``ratio_vs_forward`` (fpipe
step time / eager forward time; 1.0 is the floor).
"""
import argparse
import collections
import math

import ml_collections
import torch
import torch.nn as nn
import torch.nn.functional as F

from benchmarks.linear_eval_step import (NUM_CLASSES, add_case_flags, as_main_does, case_argv, compare_programs,
                                         fpipe_step, serve_or_run, sgd_head_runner)
from fpipe import tree
from fpipe.models import model as model_lib
from fpipe.models import vit


# ---------------------------------------------------------------- the nn.Module a user would write
FEATURE_WIDTHS = {"lastCLS": 1, "lastPOOL": 1, "concatCLS4": 4, "concatPOOL4": 4, "cls1_avgpool": 2,
                  "cls4_avgpool": 5}  # the linear-evaluation features the twin computes, in hidden widths


def add_relative_position_bias(module, spec):
    """BEiT's table on ``module`` and its index buffer, as timm's BEiT keeps them (the stored grid)."""
    module.relative_position_bias_table = nn.Parameter(torch.zeros(vit.bias_table_shape(spec)))
    module.register_buffer("relative_position_index", vit.relative_position_index((spec.grid, spec.grid)),
                           persistent=False)


def relative_position_bias(module):
    """[1, heads, T, T], as timm's BEiT gives it to scaled_dot_product_attention."""
    t = math.isqrt(module.relative_position_index.numel())
    return module.relative_position_bias_table[module.relative_position_index].view(t, t, -1).permute(2, 0, 1)[None]


class SelfAttention(nn.Module):
    def __init__(self, dim, heads, spec=None):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        self.own_bias = spec is not None and spec.rel_pos_bias == "block"
        if self.own_bias:
            add_relative_position_bias(self, spec)

    def forward(self, x, bias=None):
        n, t, d = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias).reshape(n, t, 3, self.heads, d // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        bias = relative_position_bias(self) if self.own_bias else bias
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias).transpose(1, 2).reshape(n, t, d)
        return self.out_proj(y)


class LayerScale(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * self.gamma


class SwiGLU(nn.Module):
    """dinov2's SwiGLUFFN: ``w12`` gives the gate then the value half, silu(gate)·value, then ``w3``."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.w12, self.w3 = nn.Linear(dim, 2 * hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        gate, value = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(gate) * value)


class EncoderBlock(nn.Module):
    def __init__(self, spec):
        super().__init__()
        d, m = spec.hidden_dim, spec.mlp_dim
        self.ln_1 = nn.LayerNorm(d, eps=spec.ln_eps)
        self.self_attention = SelfAttention(d, spec.heads, spec)
        self.ln_2 = nn.LayerNorm(d, eps=spec.ln_eps)
        self.mlp = (SwiGLU(d, m) if spec.mlp == "swiglu" else
                    nn.Sequential(nn.Linear(d, m), nn.GELU(), nn.Dropout(0.0), nn.Linear(m, d)))
        self.ls_1, self.ls_2 = (LayerScale(d), LayerScale(d)) if spec.layer_scale else (nn.Identity(), nn.Identity())

    def forward(self, x, bias=None):
        x = x + self.ls_1(self.self_attention(self.ln_1(x), bias))
        return x + self.ls_2(self.mlp(self.ln_2(x)))


class Encoder(nn.Module):
    def __init__(self, spec):
        super().__init__()
        if spec.pos_embed:
            self.pos_embedding = nn.Parameter(torch.empty(1, spec.grid ** 2 + spec.pos_rows, spec.hidden_dim))
        if spec.rel_pos_bias == "shared":
            add_relative_position_bias(self, spec)
        self.layers = nn.Sequential(collections.OrderedDict(
            (f"encoder_layer_{i}", EncoderBlock(spec)) for i in range(spec.depth)))
        if not spec.fc_norm:
            self.ln = nn.LayerNorm(spec.hidden_dim, eps=spec.ln_eps)


class ViT(nn.Module):
    """torchvision's VisionTransformer written out, with the timm/DINO/DINOv2 options fpipe's presets
    use (distillation token, registers, position rows for patches only, layer scale, ``fc_norm``,
    SwiGLU); ``fc`` is the linear head on ``feature`` (one of ``FEATURE_WIDTHS``)."""

    def __init__(self, spec, num_classes, feature="lastCLS"):
        super().__init__()
        if feature not in FEATURE_WIDTHS:
            raise ValueError(f"the nn.Module twin has no feature {feature!r}; valid: {tuple(FEATURE_WIDTHS)}")
        d = spec.hidden_dim
        self.spec, self.feature = spec, feature
        if spec.class_token:
            self.class_token = nn.Parameter(torch.zeros(1, 1, d))
        if spec.dist_token:
            self.dist_token = nn.Parameter(torch.zeros(1, 1, d))
        if spec.num_registers:
            self.register_tokens = nn.Parameter(torch.zeros(1, spec.num_registers, d))
        self.conv_proj = nn.Conv2d(3, d, spec.patch_size, spec.patch_size)
        self.encoder = Encoder(spec)
        if spec.fc_norm:
            self.fc_norm = nn.LayerNorm(d, eps=spec.ln_eps)
        self.fc = nn.Linear(FEATURE_WIDTHS[feature] * d, num_classes)

    def tokens(self, x):
        """``[class, distillation, registers…, patches…]`` with position embeddings (the stored grid)."""
        x = self.conv_proj(x).flatten(2).transpose(1, 2)
        if not self.spec.pos_embed:  # BEiT: the class token, then the patches
            return torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], dim=1)
        pos, rows, n = self.encoder.pos_embedding, self.spec.pos_rows, x.shape[0]
        prefix = [t + pos[:, i:i + 1] if rows else t
                  for i, t in enumerate(getattr(self, k) for k in ("class_token", "dist_token") if hasattr(self, k))]
        if self.spec.num_registers:
            prefix.append(self.register_tokens)
        return torch.cat([t.expand(n, -1, -1) for t in prefix] + [x + pos[:, rows:]], dim=1)

    def features(self, x):
        last4 = self.feature in ("concatCLS4", "concatPOOL4", "cls4_avgpool")
        x, outs = self.tokens(x), []
        bias = relative_position_bias(self.encoder) if self.spec.rel_pos_bias == "shared" else None
        for i, layer in enumerate(self.encoder.layers):
            x = layer(x, bias)
            if last4 and i >= self.spec.depth - 4:
                outs.append(x)
        outs = [self.encoder.ln(t) if hasattr(self.encoder, "ln") else t for t in (outs or [x])]

        def pool(t):
            m = t[:, self.spec.num_prefix:].mean(dim=1)
            return self.fc_norm(m) if hasattr(self, "fc_norm") else m

        top = outs[-1]
        return {"lastCLS": lambda: top[:, 0], "lastPOOL": lambda: pool(top),
                "concatCLS4": lambda: torch.cat([t[:, 0] for t in outs], dim=-1),
                "concatPOOL4": lambda: torch.cat([pool(t) for t in outs], dim=-1),
                "cls1_avgpool": lambda: torch.cat([top[:, 0], pool(top)], dim=-1),
                "cls4_avgpool": lambda: torch.cat([t[:, 0] for t in outs] + [pool(top)], dim=-1)}[self.feature]()

    def forward(self, x):
        return self.fc(self.features(x))


def torch_module(spec, params, feature="lastCLS"):
    net = ViT(spec, NUM_CLASSES, feature)
    net.load_state_dict({n.split(".", 1)[1]: v for n, v in tree.flatten(params).items()}, strict=True)
    return net


# ---------------------------------------------------------------- programs
NAMES = sorted(vit.PRESETS)
DEFAULT_NAME = "vit_small_patch16_224"


def default_feature(spec):
    return "lastCLS" if spec.class_token else "lastPOOL"


def build(name, image_size, batch_size, feature=None, seed=0):
    """``(model, params, state, batch)``: the preset ``name`` stored for ``image_size`` (a multiple
    of its patch size), a linear ``fc`` on ``feature`` (default: lastCLS, or lastPOOL without a
    class token), and a random batch."""
    options = dict(vit.PRESETS[name], image_size=image_size)
    spec = vit.Spec(**options)  # its errors name the option to fix (e.g. a size off the patch grid)
    cfg = ml_collections.ConfigDict(dict(trunk=dict(name="vit", **options),
                                         heads=dict(fc=model_lib.head_config(feature or default_feature(spec),
                                                                            "linear"))))
    model = model_lib.build(cfg, num_classes=NUM_CLASSES, image_size=image_size)
    params, state = model.init(seed)
    gen = torch.Generator().manual_seed(seed)
    batch = {"image": torch.randn(batch_size, 3, image_size, image_size, generator=gen),
             "label": torch.randint(0, NUM_CLASSES, (batch_size,), generator=gen)}
    return model, params, state, batch


def head_feature(model):
    return model.heads[0].feature


def eager_step(model, params, batch, compiled=False):
    """``compiled``: the module under ``torch.compile`` (the optimizer eager)."""
    net = torch_module(model.trunk.spec, params, head_feature(model)).train()
    for p in net.parameters():
        p.requires_grad_(False)
    for p in net.fc.parameters():
        p.requires_grad_(True)
    run = sgd_head_runner(torch.compile(net) if compiled else net, net.fc)
    return lambda: run(batch)


def eager_forward(model, params, batch):
    net = torch_module(model.trunk.spec, params, head_feature(model)).eval()

    def run():
        with torch.inference_mode():
            return net.features(batch["image"])

    return run


def fpipe_forward(model, params, state, batch):
    def run():
        with torch.inference_mode():
            return model.features(params, state, batch["image"], (head_feature(model),))
    return run


def programs(model, params, state, batch):
    return {
        "eager_step": eager_step(model, params, batch),
        "compiled_step": eager_step(model, params, batch, compiled=True),
        "fpipe_step": fpipe_step(model, params, state, batch, compile_head=True, nhwc=False)[0],
        "forward": eager_forward(model, params, batch),
        "fpipe_forward": fpipe_forward(model, params, state, batch),
    }


def patch_size(name):
    return vit.PRESETS[name].get("patch_size", vit.OPTIONS["patch_size"])


def image_size_for(args, name):
    """``--image-size``, or 4 patches a side (64 px for /16, 56 px for /14, 32 px for /8)."""
    return args.image_size or 4 * patch_size(name)


def check_sizes(ap, name, sizes):
    """``ap.error`` unless every size is a multiple of the preset's patch size (the model is stored
    for the input size: its position grid)."""
    p = patch_size(name)
    bad = [size for size in sizes if size % p]
    if bad:
        ap.error(f"--image-size {' '.join(map(str, bad))}: {name} takes multiples of its patch size {p} "
                 f"(e.g. {4 * p} or {16 * p})")


def case(args, name):
    """This case's command-line options, for a process of its own."""
    argv = case_argv(argparse.Namespace(**{**vars(args), "image_size": image_size_for(args, name)}), name,
                     model_flag="--name")
    return argv + (["--feature", args.feature] if args.feature else [])


def bench(args, name):
    size = image_size_for(args, name)
    model, params, state, batch = build(name, size, args.batch_size, args.feature)
    compare_programs(args, __file__, case(args, name), f"{name}, {head_feature(model)}, {size}px",
                     lambda: programs(model, params, state, batch), head_feature(model))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--name", nargs="+", default=[DEFAULT_NAME], choices=NAMES, metavar="PRESET",
                    help=f"ViT presets: {', '.join(NAMES)}")
    ap.add_argument("--feature", choices=tuple(FEATURE_WIDTHS),
                    help="the feature the linear head reads (default: lastCLS, or lastPOOL without a class token)")
    add_case_flags(ap, image_size=None, batch_size=16, iters=10, warmup=2)
    args = ap.parse_args(argv)
    for name in args.name:
        check_sizes(ap, name, [image_size_for(args, name)])
    serve_or_run(args, as_main_does(args.threads),
                 lambda name: programs(*build(name, image_size_for(args, name), args.batch_size, args.feature)), bench)


if __name__ == "__main__":
    main()
