"""Swin Transformer V1 and V2 (torchvision's ``swin_t/s/b``, ``swin_v2_t/s/b``: names and
numerics) as a pure trunk.

A ``patch_size`` patchify conv + LayerNorm, four stages of blocks in shifted windows (pre-norm
window attention with a learned relative position bias, then a 4× GELU MLP; odd blocks shift
the windows by half a window and mask attention across the wrap), patch merging between stages
(2×2 neighbours concatenated, LayerNorm, a Linear halving the channels), a final LayerNorm.
As torchvision: a feature map that is no multiple of the window is zero-padded at its bottom and
right for attention (the padding takes part as keys), and a window as large as the padded map
does not shift. timm's and the original repository's models agree at 224 px (their windows
shrink instead on maps smaller than a window).

V2 (``v2=True``): post-norm blocks (``x + norm1(attn(x))``), cosine attention scaled per head by
``exp(logit_scale)`` (at most 100), the relative position bias made by a small MLP (``cpb_mlp``)
from log-spaced coordinates and squashed to ``16·sigmoid``, no key bias (the packed ``qkv.bias``
keeps a key third that is never used), and patch merging that normalises after its Linear.

Features (ResNet-style names; maps N×C×H×W):

    stem     features.0               res2..5  features.1/3/5/7 (the four stages)
    res5avg  global average pool after the final LayerNorm ``norm``, N×C×1×1 (torchvision's avgpool)
    flatten  res5avg flattened, N×C: what torchvision's ``head`` reads

``state`` holds torchvision's ``relative_position_index`` (and V2's ``relative_coords_table``)
buffers, so names and files match torchvision's; apply computes them from ``window_size`` and
reads no file's.
"""
import dataclasses
import math

import torch
import torch.nn.functional as F

from fpipe.models import layers
from fpipe.models import trunk as trunk_lib

FEATURES = ("stem", "res2", "res3", "res4", "res5", "res5avg", "flatten")
OPTIONS = dict(patch_size=4, embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size=7,
               mlp_ratio=4.0, stochastic_depth_prob=0.0, v2=False)
_T = dict(embed_dim=96, num_heads=(3, 6, 12, 24))
_B = dict(embed_dim=128, num_heads=(4, 8, 16, 32))
_L = dict(embed_dim=192, num_heads=(6, 12, 24, 48))
_LONG = (2, 2, 18, 2)
PRESETS = {  # torchvision's names; timm's (the original repository's) for the ones torchvision lacks
    "swin_t": dict(depths=(2, 2, 6, 2), **_T),
    "swin_s": dict(depths=_LONG, **_T),
    "swin_b": dict(depths=_LONG, **_B),
    "swin_large_patch4_window7_224": dict(depths=_LONG, **_L),
    "swin_base_patch4_window12_384": dict(depths=_LONG, window_size=12, **_B),
    "swin_large_patch4_window12_384": dict(depths=_LONG, window_size=12, **_L),
    "swin_v2_t": dict(depths=(2, 2, 6, 2), window_size=8, v2=True, **_T),
    "swin_v2_s": dict(depths=_LONG, window_size=8, v2=True, **_T),
    "swin_v2_b": dict(depths=_LONG, window_size=8, v2=True, **_B),
}
CPB_HIDDEN = 512  # V2's continuous position bias MLP width
MAX_LOGIT_SCALE_LOG = math.log(100.0)  # V2's attention logits are scaled by at most 100
EPS = 1e-5
MASKED = -100.0  # torchvision's (and the original's) logit for keys across a shifted window's wrap


@dataclasses.dataclass(frozen=True)
class Spec:
    patch_size: int = OPTIONS["patch_size"]
    embed_dim: int = OPTIONS["embed_dim"]
    depths: tuple = OPTIONS["depths"]
    num_heads: tuple = OPTIONS["num_heads"]
    window_size: int = OPTIONS["window_size"]
    mlp_ratio: float = OPTIONS["mlp_ratio"]
    stochastic_depth_prob: float = OPTIONS["stochastic_depth_prob"]
    v2: bool = OPTIONS["v2"]

    def __post_init__(self):
        object.__setattr__(self, "depths", tuple(self.depths))
        object.__setattr__(self, "num_heads", tuple(self.num_heads))
        if len(self.depths) != 4 or len(self.num_heads) != 4:
            raise ValueError(f"Swin needs 4 stages: got depths={self.depths}, num_heads={self.num_heads}")
        for s, heads in enumerate(self.num_heads):
            if self.dim(s) % heads:
                raise ValueError(f"stage {s}'s width {self.dim(s)} is not divisible by its {heads} heads")

    def dim(self, stage):
        return self.embed_dim * 2 ** stage

    def drop(self, stage, i):
        """Stochastic depth probability of block ``i`` (0-based) of ``stage``."""
        return trunk_lib.depth_ramp(self.stochastic_depth_prob, self.depths, stage, i)


def build(**options) -> trunk_lib.Trunk:
    spec = Spec(**options)
    return trunk_lib.Trunk(spec, lambda seed=0: init_params(spec, seed),
                           lambda *a, **k: apply(spec, *a, **k), FEATURES)


def init_params(spec: Spec, seed=0):
    """torchvision's init: truncated-normal (std 0.02) Linears and bias tables, zero biases, unit
    norms, V2's logit scales at log 10; the patch conv truncated-normal too (torchvision leaves
    PyTorch's default there)."""
    b = trunk_lib.Builder(seed)

    def weight(*shape):
        return torch.nn.init.trunc_normal_(torch.empty(shape), std=0.02, generator=b.gen)

    def norm(name, c):
        b.add(name, weight=torch.ones(c), bias=torch.zeros(c))

    c0, w = spec.embed_dim, spec.window_size
    b.add("features.0.0", weight=weight(c0, 3, spec.patch_size, spec.patch_size), bias=torch.zeros(c0))
    norm("features.0.2", c0)
    for s, (depth, heads) in enumerate(zip(spec.depths, spec.num_heads)):
        c, hidden = spec.dim(s), int(spec.dim(s) * spec.mlp_ratio)
        for i in range(depth):
            name = f"features.{2 * s + 1}.{i}"
            norm(f"{name}.norm1", c)
            if spec.v2:
                b.add(f"{name}.attn", logit_scale=torch.full((heads, 1, 1), 10.0).log())
                b.state[f"{name}.attn.relative_coords_table"] = here(relative_coords_table(w))
            else:
                b.add(f"{name}.attn", relative_position_bias_table=weight((2 * w - 1) ** 2, heads))
            b.state[f"{name}.attn.relative_position_index"] = here(relative_position_index(w))
            b.add(f"{name}.attn.qkv", weight=weight(3 * c, c), bias=torch.zeros(3 * c))
            b.add(f"{name}.attn.proj", weight=weight(c, c), bias=torch.zeros(c))
            if spec.v2:
                b.add(f"{name}.attn.cpb_mlp.0", weight=weight(CPB_HIDDEN, 2), bias=torch.zeros(CPB_HIDDEN))
                b.add(f"{name}.attn.cpb_mlp.2", weight=weight(heads, CPB_HIDDEN))
            norm(f"{name}.norm2", c)
            b.add(f"{name}.mlp.0", weight=weight(hidden, c), bias=torch.zeros(hidden))
            b.add(f"{name}.mlp.3", weight=weight(c, hidden), bias=torch.zeros(c))
        if s < 3:
            b.add(f"features.{2 * s + 2}.reduction", weight=weight(2 * c, 4 * c))
            norm(f"features.{2 * s + 2}.norm", 2 * c if spec.v2 else 4 * c)
    norm("norm", spec.dim(3))
    return b.trees()


def here(t: torch.Tensor) -> torch.Tensor:
    """A copy of CPU table ``t`` on the current default device; on the CPU while shapes are built
    on the meta device, so that a file written from them (``convert``) holds the real table."""
    device = torch.empty(0).device
    return t.clone() if device.type == "meta" else t.to(device, copy=True)


def relative_coords_table(window: int) -> torch.Tensor:
    """``[1, 2w-1, 2w-1, 2]`` on the CPU: V2's relative offsets scaled to [-8, 8] and log-spaced
    (``sign·log2(1 + |x|)/3``), the input of its position-bias MLP."""
    ar = torch.arange(-(window - 1), window, dtype=torch.float32, device="cpu")
    table = torch.stack(torch.meshgrid(ar, ar, indexing="ij")).permute(1, 2, 0).unsqueeze(0) / (window - 1) * 8
    return torch.sign(table) * torch.log2(table.abs() + 1.0) / 3.0


def relative_position_index(window: int) -> torch.Tensor:
    """``[w⁴]`` int64 on the CPU: for each (query, key) pair of a w×w window, its row in the bias
    table ``[(2w-1)², heads]`` (row offset·(2w-1) + column offset, both shifted to start at 0)."""
    return trunk_lib.relative_offset_index(window, window).flatten()


def shift_mask(height: int, width: int, window: int, shifts: tuple) -> torch.Tensor:
    """``[windows, 1, w², w²]`` on the CPU: 0 between tokens of the same region of the rolled map,
    ``MASKED`` across regions (a shifted window's wrap joins parts that are not neighbours);
    torchvision's regions, an axis without shift being one region."""
    region = torch.zeros(height, width, device="cpu")
    rows, cols = ((((0, -window), (-window, -s), (-s, None))) for s in shifts)
    for count, ((h0, h1), (w0, w1)) in enumerate((r, c) for r in rows for c in cols):
        region[h0:h1, w0:w1] = count
    region = region.view(height // window, window, width // window, window).permute(0, 2, 1, 3).reshape(-1, window ** 2)
    return ((region[:, None, :] != region[:, :, None]).float() * MASKED)[:, None]


def window_tables(window: int, height: int, width: int, shifts: tuple, device) -> tuple:
    """``(relative position index, V2's coordinates table, shift mask or None)`` on ``device`` for
    one window layout."""
    mask = shift_mask(height, width, window, shifts).to(device) if any(shifts) else None
    return relative_position_index(window).to(device), relative_coords_table(window).to(device), mask


_window_tables = trunk_lib.cached_when_eager(window_tables, maxsize=64)


def window_attention(p, x, heads, window, shift, v2=False):
    """Shifted-window multi-head attention on channels-last ``x`` [N, H, W, C] (torchvision's
    ``shifted_window_attention``: pad to whole windows, roll, attend with the relative position
    bias and the wrap mask, roll back, crop); V2's cosine attention when ``v2``.

    The projections are per token, so they run on the map's own tokens only: a padding token's
    q/k/v is the bias alone (the padding is zeros), and padding outputs are cropped before the
    output projection. Same math as projecting the padded map; at 64 px, where stages 2-4 pad
    their maps to 3-12× the tokens, far fewer products.
    """
    n, h, w, c = x.shape
    qkv_bias = p["qkv"]["bias"]
    if v2:  # no key bias: the key third of the packed bias takes no part (nor gets a gradient)
        qkv_bias = torch.cat([qkv_bias[:c], torch.zeros_like(qkv_bias[c:2 * c]), qkv_bias[2 * c:]])
    pad_w, pad_h = (window - w % window) % window, (window - h % window) % window
    if pad_w or pad_h:
        qkv = F.pad(layers.dense(x, p["qkv"]["weight"]), (0, 0, 0, pad_w, 0, pad_h)) + qkv_bias
    else:
        qkv = layers.dense(x, p["qkv"]["weight"], qkv_bias)
    ph, pw = h + pad_h, w + pad_w
    shifts = tuple(0 if window >= side else shift for side in (ph, pw))  # no shift where one window spans the map
    if any(shifts):
        qkv = torch.roll(qkv, shifts=(-shifts[0], -shifts[1]), dims=(1, 2))
    rows, cols, t = ph // window, pw // window, window * window
    q, k, v = qkv.view(n, rows, window, cols, window, 3, heads, c // heads).permute(
        5, 0, 1, 3, 6, 2, 4, 7).reshape(3, n, rows * cols, heads, t, c // heads).unbind(0)  # [n, windows, heads, t, d]
    index, coords, mask = _window_tables(window, ph, pw, shifts, x.device)
    table = _cpb_table(p["cpb_mlp"], coords, heads) if v2 else p["relative_position_bias_table"]
    bias = table[index].view(t, t, heads).permute(2, 0, 1)  # [heads, t, t]
    if v2:
        bias = 16 * torch.sigmoid(bias)
    if mask is not None:
        bias = bias + mask.to(bias.dtype)
    scale = None
    if v2:  # cosine similarity times each head's scale
        k = F.normalize(k, dim=-1)
        q = F.normalize(q, dim=-1) * torch.clamp(p["logit_scale"], max=MAX_LOGIT_SCALE_LOG).exp()
        scale = 1.0
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=scale)  # [n, windows, heads, t, d]
    y = y.view(n, rows, cols, heads, window, window, c // heads).permute(0, 1, 4, 2, 5, 3, 6).reshape(n, ph, pw, c)
    if any(shifts):
        y = torch.roll(y, shifts=shifts, dims=(1, 2))
    return layers.dense(y[:, :h, :w], p["proj"]["weight"], p["proj"]["bias"])


def _cpb_table(p, coords, heads):
    """V2's bias table ``[(2w-1)², heads]``: the MLP (Linear, ReLU, Linear without bias) on the
    log-spaced coordinates."""
    hidden = F.relu(layers.dense(coords, p["0"]["weight"], p["0"]["bias"]))
    return layers.dense(hidden, p["2"]["weight"]).view(-1, heads)


def patch_merging(p, x, v2=False):
    """[N, H, W, C] -> [N, H/2, W/2, 2C]: each 2×2 neighbourhood's four tokens concatenated
    (odd sides zero-padded), LayerNorm, Linear without bias (V2: the Linear, then LayerNorm)."""
    h, w = x.shape[1:3]
    x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))
    x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
    if v2:
        return _layer_norm(p["norm"], layers.dense(x, p["reduction"]["weight"]))
    return layers.dense(_layer_norm(p["norm"], x), p["reduction"]["weight"])


def _layer_norm(p, x):
    return F.layer_norm(x, x.shape[-1:], p["weight"], p["bias"], EPS)


def apply(spec: Spec, params, state, x, *, train, features=("flatten",), eval_norms=frozenset(),
          sync_stats=None):
    """``({feature: tensor}, state)``; LayerNorms have no statistics, so ``eval_norms`` and
    ``sync_stats`` change nothing here, and ``state`` comes back as it was."""
    del eval_norms, sync_stats
    feats, window = params["features"], spec.window_size

    def mlp(p, h):
        return layers.dense(F.gelu(layers.dense(h, **p["0"])), **p["3"])

    def block(p, h, heads, shift, drop):
        if spec.v2:  # post-norm
            y = _layer_norm(p["norm1"], window_attention(p["attn"], h, heads, window, shift, v2=True))
            h = h + trunk_lib.stochastic_depth(y, drop, train)
            return h + trunk_lib.stochastic_depth(_layer_norm(p["norm2"], mlp(p["mlp"], h)), drop, train)
        y = window_attention(p["attn"], _layer_norm(p["norm1"], h), heads, window, shift)
        h = h + trunk_lib.stochastic_depth(y, drop, train)
        return h + trunk_lib.stochastic_depth(mlp(p["mlp"], _layer_norm(p["norm2"], h)), drop, train)

    def stage(s):
        def run_stage(h):
            h = h.permute(0, 2, 3, 1)
            if s > 0:
                h = patch_merging(feats[str(2 * s)], h, spec.v2)
            for i in range(spec.depths[s]):
                shift = window // 2 if i % 2 else 0
                h = block(feats[str(2 * s + 1)][str(i)], h, spec.num_heads[s], shift, spec.drop(s, i))
            return h.permute(0, 3, 1, 2)
        return run_stage

    def stem(h):
        h = layers.conv(feats["0"]["0"], h, stride=spec.patch_size)
        return _layer_norm(feats["0"]["2"], h.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    stages = [("stem", stem)] + [(f"res{s + 2}", stage(s)) for s in range(4)]
    stages += [("res5avg", lambda h: torch.mean(_layer_norm(params["norm"], h.permute(0, 2, 3, 1)), dim=(1, 2))[
                   :, :, None, None]),
               ("flatten", lambda h: torch.flatten(h, 1))]
    return trunk_lib.run(stages, x, features), state
