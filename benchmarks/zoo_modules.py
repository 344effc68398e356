"""torchvision-style ``nn.Module`` twins of fpipe's RegNet, ConvNeXt, EfficientNet and Swin trunks, for baselines.

What a user writes without torchvision: the same layers under torchvision's names, so fpipe's
params load by name (``torch_module``); a linear ``fc`` on the ``flatten`` feature plays the head.
Stochastic depth is left out (fpipe's default is off); the benchmarks assert it is.
"""
import collections

import torch
import torch.nn as nn
import torch.nn.functional as F

from fpipe import tree
from fpipe.models import convnext, efficientnet, regnet, swin


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of each position of N×C×H×W (torchvision's)."""

    def forward(self, x):
        return F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias,
                            self.eps).permute(0, 3, 1, 2)


class GRN(nn.Module):
    """ConvNeXt V2's Global Response Normalization on channels-last maps, as its paper writes it."""

    def __init__(self, dim):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.zeros(dim)), nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        g = x.norm(p=2, dim=(1, 2), keepdim=True)
        return self.weight * (x * (g / (g.mean(dim=-1, keepdim=True) + convnext.GRN_EPS))) + self.bias + x


def cn_block_body(dim, grn=False):
    """torchvision's CNBlock.block (depthwise conv, LayerNorm, MLP); V2's GRN after the GELU
    as ``grn``, so the other indices stay V1's."""
    head = [("0", nn.Conv2d(dim, dim, 7, padding=3, groups=dim)), ("1", _Permute(0, 2, 3, 1)),
            ("2", nn.LayerNorm(dim, eps=convnext.EPS)), ("3", nn.Linear(dim, 4 * dim)), ("4", nn.GELU())]
    tail = [("5", nn.Linear(4 * dim, dim)), ("6", _Permute(0, 3, 1, 2))]
    return nn.Sequential(collections.OrderedDict(head + ([("grn", GRN(4 * dim))] if grn else []) + tail))


class CNBlock(nn.Module):
    def __init__(self, dim, layer_scale, grn=False):
        super().__init__()
        if layer_scale:
            self.layer_scale = nn.Parameter(torch.full((dim, 1, 1), layer_scale))
        self.block = cn_block_body(dim, grn)

    def forward(self, x):
        y = self.block(x)
        return (self.layer_scale * y if hasattr(self, "layer_scale") else y) + x


class _Permute(nn.Module):
    def __init__(self, *dims):
        super().__init__()
        self.dims = dims

    def forward(self, x):
        return x.permute(*self.dims)


class ConvNeXt(nn.Module):
    def __init__(self, spec: convnext.Spec, num_classes):
        super().__init__()
        assert spec.stochastic_depth_prob == 0, "the twin has no stochastic depth"
        c = spec.channels
        layers = [nn.Sequential(nn.Conv2d(3, c[0], 4, 4), LayerNorm2d(c[0], eps=convnext.EPS))]
        for s, depth in enumerate(spec.depths):
            layers.append(nn.Sequential(*[CNBlock(c[s], spec.layer_scale, spec.grn) for _ in range(depth)]))
            if s < 3:
                layers.append(nn.Sequential(LayerNorm2d(c[s], eps=convnext.EPS), nn.Conv2d(c[s], c[s + 1], 2, 2)))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(LayerNorm2d(c[-1], eps=convnext.EPS))
        self.fc = nn.Linear(c[-1], num_classes)

    def embed(self, x):
        """fpipe's ``flatten`` feature: the pooled map after the classifier's LayerNorm."""
        return torch.flatten(self.classifier(self.features(x).mean((2, 3), keepdim=True)), 1)

    def forward(self, x):
        return self.fc(self.embed(x))


def conv_bn(cin, cout, k, stride=1, groups=1, act=None, eps=1e-5, momentum=0.1):
    """Conv (no bias), BatchNorm, then ``act`` (an activation class: nn.ReLU, nn.SiLU) if given."""
    mods = [nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout, eps=eps, momentum=momentum)]
    return nn.Sequential(*mods, *([act(inplace=True)] if act else []))


class SqueezeExcitation(nn.Module):
    """torchvision's: ``fc1``/``fc2`` are 1×1 convs, ``act`` between them (SiLU in EfficientNet)."""

    def __init__(self, channels, squeeze, act=F.silu):
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(channels, squeeze, 1), nn.Conv2d(squeeze, channels, 1)
        self.act = act

    def forward(self, x):
        s = F.adaptive_avg_pool2d(x, 1)
        return x * torch.sigmoid(self.fc2(self.act(self.fc1(s))))


class Block(nn.Module):
    """torchvision's ResBottleneckBlock: x (or proj(x)) + [1×1, 3×3 grouped, SE, 1×1](x), ReLU."""

    def __init__(self, w_in, w_out, stride, groups, se_ratio):
        super().__init__()
        self.proj = conv_bn(w_in, w_out, 1, stride) if (w_in != w_out or stride != 1) else None
        f = collections.OrderedDict(a=conv_bn(w_in, w_out, 1, act=nn.ReLU),
                                    b=conv_bn(w_out, w_out, 3, stride, groups, act=nn.ReLU))
        if se_ratio:
            f["se"] = SqueezeExcitation(w_out, int(round(se_ratio * w_in)), act=F.relu)
        f["c"] = conv_bn(w_out, w_out, 1)
        self.f = nn.Sequential(f)

    def forward(self, x):
        return F.relu((x if self.proj is None else self.proj(x)) + self.f(x))


class RegNet(nn.Module):
    """torchvision's RegNet (bottleneck multiplier 1), stages from fpipe's generated widths."""

    def __init__(self, spec, num_classes):
        super().__init__()
        self.stem = conv_bn(3, spec.stem_width, 3, 2, act=nn.ReLU)
        stages, w_in = collections.OrderedDict(), spec.stem_width
        for s, (width, depth, group) in enumerate(spec.stages, start=1):
            blocks = collections.OrderedDict()
            for i in range(depth):
                blocks[f"block{s}-{i}"] = Block(w_in, width, 2 if i == 0 else 1, width // group, spec.se_ratio)
                w_in = width
            stages[f"block{s}"] = nn.Sequential(blocks)
        self.trunk_output = nn.Sequential(stages)
        self.fc = nn.Linear(w_in, num_classes)

    def embed(self, x):
        """fpipe's ``flatten`` feature."""
        return torch.flatten(F.adaptive_avg_pool2d(self.trunk_output(self.stem(x)), 1), 1)

    def forward(self, x):
        return self.fc(self.embed(x))


class MBConv(nn.Module):
    def __init__(self, blk: efficientnet.Block, eps, momentum):
        super().__init__()
        norm = dict(eps=eps, momentum=momentum)
        mods = []
        if blk.expanded != blk.in_ch:
            mods.append(conv_bn(blk.in_ch, blk.expanded, 1, act=nn.SiLU, **norm))
        mods += [conv_bn(blk.expanded, blk.expanded, blk.kernel, blk.stride, blk.expanded, act=nn.SiLU, **norm),
                 SqueezeExcitation(blk.expanded, blk.squeeze),
                 conv_bn(blk.expanded, blk.out_ch, 1, **norm)]
        self.block = nn.Sequential(*mods)
        self.residual = blk.residual

    def forward(self, x):
        y = self.block(x)
        return y + x if self.residual else y


class EfficientNet(nn.Module):
    def __init__(self, spec: efficientnet.Spec, num_classes):
        super().__init__()
        assert spec.stochastic_depth_prob == 0, "the twin has no stochastic depth"
        norm = dict(eps=spec.norm_eps, momentum=spec.norm_momentum)
        stages = spec.stages()
        layers = [conv_bn(3, spec.stem_width, 3, 2, act=nn.SiLU, **norm)]
        layers += [nn.Sequential(*[MBConv(blk, **norm) for blk in blocks]) for blocks in stages]
        layers.append(conv_bn(stages[-1][-1].out_ch, spec.head_width, 1, act=nn.SiLU, **norm))
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(spec.head_width, num_classes)

    def embed(self, x):
        """fpipe's ``flatten`` feature."""
        return torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1)

    def forward(self, x):
        return self.fc(self.embed(x))


class WindowAttention(nn.Module):
    """torchvision's shifted-window attention, written out: explicit softmax(q·kᵀ/√d + bias)."""

    def __init__(self, dim, heads, window, shift):
        super().__init__()
        self.heads, self.window, self.shift = heads, window, shift
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, heads))
        self.register_buffer("relative_position_index", swin.relative_position_index(window))
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        n, h, w, c = x.shape
        ws = self.window
        x = F.pad(x, (0, 0, 0, (ws - w % ws) % ws, 0, (ws - h % ws) % ws))
        ph, pw = x.shape[1:3]
        shifts = tuple(0 if ws >= side else self.shift for side in (ph, pw))
        if any(shifts):
            x = torch.roll(x, shifts=(-shifts[0], -shifts[1]), dims=(1, 2))
        windows = (ph // ws) * (pw // ws)
        x = x.view(n, ph // ws, ws, pw // ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(n * windows, ws * ws, c)
        q, k, v = self.qkv(x).reshape(x.shape[0], ws * ws, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        attn = (q * (c // self.heads) ** -0.5) @ k.transpose(-2, -1)
        bias = self.relative_position_bias_table[self.relative_position_index].view(ws * ws, ws * ws, -1)
        attn = attn + bias.permute(2, 0, 1)
        if any(shifts):
            mask = swin.shift_mask(ph, pw, ws, shifts).to(attn)  # [windows, 1, t, t]
            attn = (attn.view(n, windows, self.heads, ws * ws, ws * ws) + mask).view(-1, self.heads, ws * ws, ws * ws)
        x = (attn.softmax(-1) @ v).transpose(1, 2).reshape(x.shape[0], ws * ws, c)
        x = self.proj(x).view(n, ph // ws, pw // ws, ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(n, ph, pw, c)
        if any(shifts):
            x = torch.roll(x, shifts=shifts, dims=(1, 2))
        return x[:, :h, :w]


class SwinBlock(nn.Module):
    def __init__(self, dim, heads, window, shift, mlp_ratio):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=swin.EPS), nn.LayerNorm(dim, eps=swin.EPS)
        self.attn = WindowAttention(dim, heads, window, shift)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Identity(), nn.Linear(hidden, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchMerging(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.reduction, self.norm = nn.Linear(4 * dim, 2 * dim, bias=False), nn.LayerNorm(4 * dim, eps=swin.EPS)

    def forward(self, x):
        h, w = x.shape[1:3]
        x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))
        return self.reduction(self.norm(torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2],
                                                   x[:, 1::2, 1::2]], -1)))


class Swin(nn.Module):
    """torchvision's SwinTransformer (V1) layout, channels-last inside, ``fc`` on the pooled features."""

    def __init__(self, spec: swin.Spec, num_classes):
        super().__init__()
        assert spec.stochastic_depth_prob == 0, "the twin has no stochastic depth"
        assert not spec.v2, "the twin is Swin V1's"
        p = spec.patch_size
        layers = [nn.Sequential(nn.Conv2d(3, spec.embed_dim, p, p), _Permute(0, 2, 3, 1),
                                nn.LayerNorm(spec.embed_dim, eps=swin.EPS))]
        for s, (depth, heads) in enumerate(zip(spec.depths, spec.num_heads)):
            layers.append(nn.Sequential(*[SwinBlock(spec.dim(s), heads, spec.window_size,
                                                    spec.window_size // 2 if i % 2 else 0, spec.mlp_ratio)
                                          for i in range(depth)]))
            if s < 3:
                layers.append(PatchMerging(spec.dim(s)))
        self.features = nn.Sequential(*layers)
        self.norm = nn.LayerNorm(spec.dim(3), eps=swin.EPS)
        self.fc = nn.Linear(spec.dim(3), num_classes)

    def embed(self, x):
        """fpipe's ``flatten`` feature: the final LayerNorm, then the average over positions."""
        return self.norm(self.features(x)).mean((1, 2))

    def forward(self, x):
        return self.fc(self.embed(x))


TWINS = {regnet.Spec: RegNet, convnext.Spec: ConvNeXt, efficientnet.Spec: EfficientNet, swin.Spec: Swin}


def torch_module(spec, params, state, num_classes):
    """The twin of ``spec`` (a RegNet, ConvNeXt, EfficientNet or Swin spec) holding fpipe's params and state."""
    net = TWINS[type(spec)](spec, num_classes)
    flat = {n.split(".", 1)[1]: v for n, v in tree.flatten(params).items() | tree.flatten(state).items()}
    net.load_state_dict(flat, strict=True)
    return net
