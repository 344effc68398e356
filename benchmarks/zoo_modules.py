"""torchvision-style ``nn.Module`` twins of fpipe's RegNet, ConvNeXt and EfficientNet trunks, for baselines.

What a user writes without torchvision: the same layers under torchvision's names, so fpipe's
params load by name (``torch_module``); a linear ``fc`` on the ``flatten`` feature plays the head.
Stochastic depth is left out (fpipe's default is off); the benchmarks assert it is.
"""
import collections

import torch
import torch.nn as nn
import torch.nn.functional as F

from fpipe import tree
from fpipe.models import convnext, efficientnet, regnet


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of each position of N×C×H×W (torchvision's)."""

    def forward(self, x):
        return F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias,
                            self.eps).permute(0, 3, 1, 2)


class CNBlock(nn.Module):
    def __init__(self, dim, layer_scale):
        super().__init__()
        self.layer_scale = nn.Parameter(torch.full((dim, 1, 1), layer_scale))
        self.block = nn.Sequential(nn.Conv2d(dim, dim, 7, padding=3, groups=dim), _Permute(0, 2, 3, 1),
                                   nn.LayerNorm(dim, eps=convnext.EPS), nn.Linear(dim, 4 * dim), nn.GELU(),
                                   nn.Linear(4 * dim, dim), _Permute(0, 3, 1, 2))

    def forward(self, x):
        return self.layer_scale * self.block(x) + x


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
            layers.append(nn.Sequential(*[CNBlock(c[s], spec.layer_scale) for _ in range(depth)]))
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


TWINS = {regnet.Spec: RegNet, convnext.Spec: ConvNeXt, efficientnet.Spec: EfficientNet}


def torch_module(spec, params, state, num_classes):
    """The twin of ``spec`` (a RegNet, ConvNeXt or EfficientNet spec) holding fpipe's params and state."""
    net = TWINS[type(spec)](spec, num_classes)
    flat = {n.split(".", 1)[1]: v for n, v in tree.flatten(params).items() | tree.flatten(state).items()}
    net.load_state_dict(flat, strict=True)
    return net
