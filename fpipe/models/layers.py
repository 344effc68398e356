"""Pure layer functions over parameter dicts: conv, linear, norms, pooling.

Initialisers return ``(params, state)``; appliers return outputs (norms also the new state).
Names follow torch.nn (``weight``, ``bias``, ``running_mean``, ``running_var``,
``num_batches_tracked``), so a torchvision ``state_dict`` maps onto these trees by name.
"""
import contextlib
import functools
import math

import torch
import torch.nn.functional as F

from fpipe.models import max_pool as max_pool_lib
from fpipe.models import winograd

BN_MOMENTUM = 0.1
BN_EPS = 1e-5


# ---------------------------------------------------------------- initialisers
def conv_init(gen, in_ch, out_ch, kernel, groups=1, bias=False):
    """Kaiming-normal (fan_out, relu), as torchvision's ResNet initialises its convolutions."""
    fan_out = out_ch * kernel * kernel
    w = torch.randn(out_ch, in_ch // groups, kernel, kernel, generator=gen) * math.sqrt(2.0 / fan_out)
    p = {"weight": w}
    if bias:
        p["bias"] = torch.zeros(out_ch)
    return p


def linear_init(gen, in_dim, out_dim, bias=True, std=None):
    """torch.nn.Linear's default init (uniform ±1/sqrt(fan_in)); a normal init if ``std`` is given."""
    bound = 1.0 / math.sqrt(in_dim)
    if std is None:
        w = (torch.rand(out_dim, in_dim, generator=gen) * 2 - 1) * bound
    else:
        w = torch.randn(out_dim, in_dim, generator=gen) * std
    p = {"weight": w}
    if bias:
        p["bias"] = (torch.rand(out_dim, generator=gen) * 2 - 1) * bound if std is None else torch.zeros(out_dim)
    return p


def norm_init(kind, channels, zero_scale=False, groups=32):
    """(params, state) of a norm layer: ``batch`` keeps running statistics, ``group``/``layer`` none."""
    params = {"weight": torch.zeros(channels) if zero_scale else torch.ones(channels),
              "bias": torch.zeros(channels)}
    if kind == "batch":
        state = {"running_mean": torch.zeros(channels), "running_var": torch.ones(channels),
                 "num_batches_tracked": torch.tensor(0, dtype=torch.long)}
        return params, state
    if kind in ("group", "layer"):
        return params, {}
    raise ValueError(f"unknown norm {kind!r}; valid: 'batch', 'group', 'layer'")


# ---------------------------------------------------------------- appliers
def conv(p, x, stride=1, padding=0, groups=1):
    w = p["weight"]
    if (isinstance(padding, int) and _tiny_input(x.shape[-2:], w.shape[-2:], stride, padding)
            and (groups == 1 or x.shape[-2:] == (1, 1) or _grouped_matrix_pays(x, groups))
            and _matrix_pays(x, w, stride, padding)):
        return _conv_as_matmul(w, p.get("bias"), x, stride, padding, groups)
    if groups == 1 and isinstance(padding, int):
        if isinstance(stride, int) and _dense_beats_conv(x, w, stride, padding):
            return _patches_as_matmul(w, p.get("bias"), x, stride, padding)
        if _winograd_pays(x, w, stride, padding):
            return winograd.conv3x3(x, w, p.get("bias"))
    return conv2d(x, w, p.get("bias"), stride, padding, groups)


WINOGRAD_MIN_CHANNELS = 128


def _winograd_pays(x, w, stride, padding):
    """Whether a 3×3 conv (stride 1, padding 1) runs as :func:`winograd.conv3x3`: in a frozen
    trunk (within :func:`constant_weights`, no gradients: the transformed kernel is a constant
    folded once), on a float32 CPU where its products run on MKL at the CPU's full vector width
    (``WINOGRAD_ON_CPU``), from ``WINOGRAD_MIN_CHANNELS`` input channels, on 4×4 maps: one tile
    covers the map (ResNet's layer3 at 64 px, layer4 at 128 px), where oneDNN's direct kernels are
    slowest. Intel Xeon (AVX-512, AMX), 2 threads, compiled with freezing, ms direct / Winograd,
    the conv alone: 256 channels b64 3.84 / 1.16, b8 0.79 / 0.66; 512 b64 17.8 / 3.7; 128 b64 0.65
    / 0.47; AMD Zen 3 (AVX2): 256 b64 7.1 / 4.2, 512 b64 23.2 / 11.5, 128 b64 1.75 / 1.18. Larger
    maps win alone but not in a whole trunk, even with faster tile transforms (ResNet-50 at 128
    and 224 px: 0.985-1.02×): MKL's bmm runs those shapes slower than oneDNN's direct conv
    (docs/BENCHMARKS.md, forty-fifth, forty-sixth and fifty-fifth sessions)."""
    return (_in_frozen_float32_trunk(x) and WINOGRAD_ON_CPU and w.shape[-2:] == (3, 3)
            and stride in (1, (1, 1)) and padding == 1 and x.shape[1] >= WINOGRAD_MIN_CHANNELS
            and x.shape[-2:] == (winograd.TILE, winograd.TILE))


GROUPED_MATRIX_MIN_WIDTH = 8  # input channels per group; depthwise and narrower groups: oneDNN's conv


def _grouped_matrix_pays(x, groups):
    """Whether a grouped conv on a 2×2 map runs as :func:`_conv_as_matmul`'s batched matmul: within
    :func:`constant_weights` and without gradients (a frozen trunk, where the matrix is a constant
    folded once), from ``GROUPED_MATRIX_MIN_WIDTH`` channels a group. oneDNN's grouped kernels are
    slow there, the more so at widths off its 16-float vectors (Zen 5, 2 threads, batch 64, 3×3,
    µs, oneDNN packed / the matmul and its copies: 888 channels in groups of 24 668 / 344, 440 of 8
    197 / 131, 1024 of 32 577 / 451, 400 of 16 124 / 122; frozen trunks at 32 px b64: RegNetY-1.6GF
    20.3-20.8 -> 18.4 ms, RegNetY-400MF 8.7 -> 8.1-8.4, ResNeXt-50 unchanged). Float32 only; under
    gradients, whose matrix is built every step, 0.6-1.3× oneDNN's speed: the conv."""
    return _in_frozen_float32_trunk(x) and x.shape[1] // groups >= GROUPED_MATRIX_MIN_WIDTH


def _in_frozen_float32_trunk(x):
    """Whether ``x`` is a float32 CPU activation of a compiled frozen trunk: within
    :func:`constant_weights`, without gradients, not under autocast (where a route may rebuild a
    weight into a constant that inductor's freezing folds once)."""
    return (_CONSTANT_WEIGHTS and not torch.is_grad_enabled() and x.device.type == "cpu"
            and x.dtype == torch.float32 and not torch.is_autocast_enabled("cpu"))


def conv2d(x, w, bias=None, stride=1, padding=0, groups=1):
    """``F.conv2d`` (no dilation), on oneDNN where ATen would take its THNN path: a float32 CPU
    1×1 conv at stride 1 over 2-15 images on one thread (ATen keeps an old rule that THNN is
    faster there). THNN's gemm is MKL's, AVX2 code on AMD: 1.1-2.3× slower forward and backward
    (Zen 5, 1 thread; train steps, ResNet-18 96 px b24 285 -> 228 ms, ResNet-50 48 px b8 131 ->
    98 ms, ViT-S/16 64 px b16, whose linears are dense's convs, 376 -> 227 ms). A dilation of 2,
    which a 1×1 kernel never reads, sends it to oneDNN: the same math and the same oneDNN kernels
    as the undilated conv (its verbose log: brgconv_1x1, jit_1x1), as fast at 1 and 2 threads, so
    taken whatever the threads. Under autocast ATen takes oneDNN anyway."""
    one_by_one = w.shape[-2:] == (1, 1) and stride in (1, (1, 1))
    thnn = (one_by_one and x.device.type == "cpu" and x.dtype == torch.float32 and 1 < x.shape[0] < 16
            and not torch.is_autocast_enabled("cpu"))
    return F.conv2d(x, w, bias, stride, padding, 2 if thnn else 1, groups)


def _dense_beats_conv(x, w, stride, padding):
    """Whether a conv runs faster as :func:`dense` over its patches, on CPU (elsewhere not
    measured): oneDNN's conv kernels are slow on few output pixels, forward and backward, the
    more so the more channels. So: at most 2×2 output pixels (a ResNet's layer4 at 32 and 64 px),
    and from 512 input channels at most 3×3 (layer4 at 96 px: 1.5-2.1× faster), or 4×4 for a 1×1
    conv (layer4 at 128 px: 1.2-1.7×). The 3×3 convs there, and in training 3×3 convs of 256
    channels onto 3×3, run as fast or faster as convs; without gradients (a frozen trunk) those
    run 1.25-1.7× faster as dense, at batch 16-256, compiled or eager (float32, Intel: layer3 of a
    ResNet at 48 px). Where dense is a conv itself (``ROWS_AS_CONV``: AMD), only for products of
    at least ``DENSE_MIN_MACS``, as dense's own rule. Under CPU bf16 autocast too, where measured
    (Intel with AMX: 4-13× at 2×2 and fewer pixels, 1.5× at 3×3)."""
    ho, wo = _out_hw(x, w, stride, padding)
    most = 4 if x.shape[1] < 512 else 16 if w.shape[-2:] == (1, 1) else 9
    if (x.shape[1] >= 256 and w.shape[-2:] != (1, 1) and not torch.is_grad_enabled()
            and not ROWS_AS_CONV and not torch.is_autocast_enabled("cpu")):
        most = 9  # measured only there: Intel, float32
    if ho * wo > most or x.numel() == 0 or x.device.type != "cpu":
        return False
    if ROWS_AS_CONV:  # only where dense takes its conv route for the patches' product
        return _onednn_product(x, x.shape[0] * ho * wo * w[0].numel() * w.shape[0])
    if torch.is_autocast_enabled("cpu"):
        return torch.get_autocast_dtype("cpu") == torch.bfloat16 and x.dtype in (torch.float32, torch.bfloat16)
    return x.dtype == torch.float32


def _patches_as_matmul(w, bias, x, stride, padding):
    """The conv of :func:`_dense_beats_conv` as one :func:`dense` over its patches (im2col: a row
    per image and output pixel, holding the k×k window of the zero-padded input it reads). Same
    math as F.conv2d, output channels-last. Forward and backward, ms (Intel, 2 threads, batch 64):
    1×1 stride 2, 1024 -> 2048 onto 1×1 39.3 vs 7.5; 1×1 2048 -> 512 at 1×1 9.3 vs 3.0; 3×3
    stride 2, 512 -> 512 from 4×4 45.1 vs 16.7, 256 -> 256 7.5 vs 5.1 (AMD, dense as a conv:
    64×2048×2×2 -> 512 18.4 vs 8.8; 1×1 stride 2 1024 -> 2048 onto 2×2 41.4 vs 15.4)."""
    (n, c, _, _), (o, _, kh, kw) = x.shape, w.shape
    ho, wo = _out_hw(x, w, stride, padding)
    pixels = (F.pad(x, (padding,) * 4) if padding else x).permute(0, 2, 3, 1)  # (n, h, w, c)
    if (kh, kw) == (1, 1):  # a view (at stride 1 of a channels-last input, reshaped without a copy)
        patches = pixels[:, ::stride, ::stride]
    else:
        patches = torch.stack([pixels[:, i * stride:i * stride + kh, j * stride:j * stride + kw]
                               for i in range(ho) for j in range(wo)], 1)  # (n, ho·wo, kh, kw, c)
    y = dense(patches.reshape(n * ho * wo, kh * kw * c), w.permute(0, 2, 3, 1).reshape(o, kh * kw * c), bias)
    return y.reshape(n, ho, wo, o).permute(0, 3, 1, 2)


def _out_size(size, kernel, stride, padding):
    return (size + 2 * padding - kernel) // stride + 1


def _out_hw(x, w, stride, padding):
    """``(height, width)`` of the conv of ``x`` with the kernel ``w`` (int stride and padding)."""
    return tuple(_out_size(s, k, stride, padding) for s, k in zip(x.shape[-2:], w.shape[-2:]))


def _tiny_input(hw, kernel, stride, padding):
    """True when a "same"-padded k×k conv sees an input so small (each side at most padding + 1)
    that every output reads every input position: the conv is then one dense matrix over the
    whole image, at most twice the kernel's size (a 3×3 conv on 2×2 or 1×1 inputs: layer4 of a
    ResNet at 64 px, layer3/4 at 32 px)."""
    k = kernel[0]
    if kernel[1] != k or k != 2 * padding + 1 or max(hw) > padding + 1:
        return False
    outs = [_out_size(s, k, stride, padding) for s in hw]
    return outs[0] * outs[1] * hw[0] * hw[1] <= 2 * k * k


TINY_MATRIX_MIN_ROWS = 128  # images × output pixels under gradients on CPU: batch 32 at 2×2
TINY_MATRIX_RULE_CHANNELS = 256  # the rule's measured range; fewer input channels: the matrix, as before


def _matrix_pays(x, w, stride, padding):
    """Whether :func:`_conv_as_matmul` is the route. On a 1×1 map it reads the centre tap only,
    and without gradients (a frozen trunk, whose compile folds the matrix into a constant) it
    does the fewest multiplies: always. On a 2×2 map under gradients its matrix repeats the
    taps (512 channels: 16 MB against the kernel's 9.4 MB), built each step and its gradient
    summed back into the taps: on CPU only from ``TINY_MATRIX_MIN_ROWS`` rows; fewer go on to
    :func:`_dense_beats_conv` (the patches' product). Forward and backward, eager, AMD Zen 5, 3×3
    512 -> 512 at 2×2, ms, matrix / patches / conv: batch 8 8.0 / 1.8 / 5.0, 32 8.6 / 5.8 / 9.9,
    56 9.7 / 9.0 / 13.8, 64 10.3 / 11.9 / 16.8, 128 13.6 / 21.9 / 25.9 (256 channels alike);
    compiled, in whole train steps, the two routes are even at batch 32 (docs/BENCHMARKS.md,
    thirty-fifth session), which keeps the matrix. Under 256 input channels and on CUDA, not measured
    in a compiled step: the matrix, as before. The route depends on the batch each process runs,
    so one process and several may round differently (as with :func:`dense`'s own rule)."""
    if (x.shape[-2:] == (1, 1) or x.device.type != "cpu" or not torch.is_grad_enabled()
            or x.shape[1] < TINY_MATRIX_RULE_CHANNELS):
        return True
    ho, wo = _out_hw(x, w, stride, padding)
    return x.shape[0] * ho * wo >= TINY_MATRIX_MIN_ROWS


def _conv_as_matmul(w, bias, x, stride, padding, groups=1):
    """The conv of :func:`_tiny_input` as one matmul (per group, batched): output (i, j) reads
    input (a, b) through tap (a - i·stride + padding, b - j·stride + padding). Same math as
    F.conv2d; oneDNN's conv kernels, tuned for large images, take about twice as long here (above
    all the backward; grouped convs on 1×1 maps, RegNet's last stage at 32 px: 3×3 with 8
    channels a group 5.8× forward and backward, EfficientNet's depthwise 5×5 80×; on 2×2 maps
    only in a frozen trunk, :func:`_grouped_matrix_pays`), and on
    a 1×1 input only the centre tap is read (exact zero gradients for the others, also under bf16
    autocast, where oneDNN's CPU kernel leaves them uninitialised). On CUDA this also keeps such
    convs from torch 2.11's mispredicted conv-backward layouts on 1×1 maps (pytorch#171622). The
    output is channels-last."""
    (n, c, h, wd), o = x.shape, w.shape[0]
    ho, wo = _out_hw(x, w, stride, padding)
    taps = w.permute(0, 2, 3, 1)  # (o, kh, kw, c / groups): output (i, j) reads a contiguous window of taps
    windows = [(padding - i * stride, padding - j * stride) for i in range(ho) for j in range(wo)]
    rows = x.permute(0, 2, 3, 1)  # (n, h, w, c)
    if groups == 1:
        matrix = torch.cat([taps[:, r:r + h, q:q + wd].reshape(o, h * wd * c) for r, q in windows])
        y = dense(rows.reshape(n, h * wd * c), matrix, None if bias is None else bias.repeat(ho * wo))
        return y.reshape(n, ho, wo, o).permute(0, 3, 1, 2)
    cg, og = c // groups, o // groups
    taps = taps.reshape(groups, og, *taps.shape[1:])  # (groups, og, kh, kw, cg)
    matrix = torch.cat([taps[:, :, r:r + h, q:q + wd].reshape(groups, og, h * wd * cg) for r, q in windows], 1)
    per_group = rows.reshape(n, h * wd, groups, cg).permute(2, 0, 1, 3).reshape(groups, n, h * wd * cg)
    y = torch.bmm(per_group, matrix.transpose(1, 2))  # (groups, n, ho·wo·og)
    y = y.reshape(groups, n, ho, wo, og).permute(1, 2, 3, 0, 4).reshape(n, ho, wo, o)
    if bias is not None:
        y = y + bias
    return y.permute(0, 3, 1, 2)


def linear(p, x):
    return dense(x, p["weight"], p.get("bias"))


@functools.cache
def cpu_vendor() -> str:
    """This x86 CPU's vendor as /proc/cpuinfo says it ("GenuineIntel", "AuthenticAMD"); "" if unknown.
    Read once: every saved step's key asks for it."""
    return _cpuinfo("vendor_id")


@functools.cache
def cpu_family() -> int:
    """This x86 CPU's family number from /proc/cpuinfo (AMD: 25 Zen 3/4, 26 Zen 5); 0 if unknown."""
    family = _cpuinfo("cpu family")
    return int(family) if family.isdigit() else 0


def cpu_has_avx512() -> bool:
    """Whether this CPU has AVX-512, whatever ``ATEN_CPU_CAPABILITY`` lowers ATen's kernels to: the
    conv routes that depend on it (``WINOGRAD_ON_CPU``) follow the hardware. A torch without the probe
    counts as AVX-512 (every such choice as it was before the probe)."""
    return getattr(torch.cpu, "_is_avx512_supported", lambda: True)()


def _cpuinfo(field: str) -> str:
    """The first ``field`` of /proc/cpuinfo, or "" (no such file or field)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f
                         if line.split(":", 1)[0].strip() == field), "")
    except OSError:
        return ""


def _mkl_runs_avx2() -> bool:
    """True on AMD (and Hygon) x86 CPUs, where PyTorch's float32 matmuls run MKL's AVX2 code
    even on AVX-512 hardware: about half the speed of oneDNN's kernels there."""
    if not (torch.backends.mkl.is_available() and torch.backends.mkldnn.is_available()):
        return False
    return cpu_vendor() in ("AuthenticAMD", "HygonGenuine")


def _mkl_runs_full_width() -> bool:
    """Whether MKL's float32 products use this CPU's widest vectors: everywhere but on AMD CPUs
    with AVX-512 (Zen 4 and 5), where MKL runs its AVX2 code; on AVX2 CPUs (Zen 2 and 3) that code
    is the full width, and as fast as oneDNN's (Zen 3, 2 threads: 1×1-conv products of 64-2048
    channels 150-185 GFLOP/s on either)."""
    return not _mkl_runs_avx2() or not cpu_has_avx512()


# Linears as 1×1 convolutions (see dense); a module flag, so tests can take either path.
ROWS_AS_CONV = _mkl_runs_avx2()
# The frozen trunk's 3×3 convs on 4×4 maps by Winograd (see _winograd_pays); a flag, as above.
WINOGRAD_ON_CPU = _mkl_runs_full_width()
DENSE_MIN_MACS = 1 << 24  # smaller products: F.linear (64 rows, 2048 -> 100: 0.67 vs 0.73-0.84 ms)


def dense(x, weight, bias=None):
    """``F.linear(x, weight, bias)`` over a batch of rows (ViT tokens, ConvNeXt pixels, features).

    Where MKL runs its AVX2 code (ROWS_AS_CONV: AMD CPUs) a float32 CPU product of at least
    ``DENSE_MIN_MACS`` runs as a 1×1 convolution instead, which oneDNN computes forward and
    backward at about twice MKL's speed there: the operand with more rows is the conv's image
    (its rows the pixels, channels-last: no copies), the other its kernel, since oneDNN's conv
    kernels are fast over many pixels and slow over few: a batch of 64 features (ResNet's layer4
    matmuls at 64 px, an fc head) is the kernel run over the weight's rows (64 rows, 2048 -> 2048,
    forward and backward: MKL 13.4 ms, the rows as pixels 18.4, the weight's rows 6.8), and many
    tokens are the pixels under the weight as kernel. Same math; sums in another order (~1e-6
    relative). Elsewhere, under autocast, and for small products, ``F.linear``.
    """
    if not _on_onednn(x, weight.shape[0]):
        return F.linear(x, weight, bias)
    lead, (n, k) = x.shape[:-1], weight.shape
    rows = x.reshape(-1, k)
    # Without gradients a tie, and any product within constant_weights() (a frozen trunk), takes
    # the weight as kernel: freezing packs that constant once, while the rows as kernel are
    # reordered every call (ResNet-50 64 px b64 frozen trunk: ties, layer3's 1024 rows onto 1024,
    # 97-105 -> 94-99 ms; then layer4's 256 rows onto 512-2048, 98-100 -> 96-100 ms; ResNeXt-101
    # 32x8d 428 -> 414 ms). With gradients, unmeasured.
    if rows.shape[0] > n or (not torch.is_grad_enabled() and (rows.shape[0] == n or _CONSTANT_WEIGHTS)):
        y = conv2d(_as_pixels(rows), weight[:, :, None, None], bias)  # channels-last: (rows, n) in memory
        return y.permute(0, 2, 3, 1).reshape(*lead, n)
    y = conv2d(_as_pixels(weight), rows[:, :, None, None])  # channels-last: (n, rows) in memory
    y = y.permute(0, 2, 3, 1).reshape(n, -1).t()  # (rows, n), column-major
    y = y if bias is None else y + bias
    return y.contiguous().reshape(*lead, n)


_CONSTANT_WEIGHTS = False  # set within constant_weights()


@contextlib.contextmanager
def constant_weights():
    """Within it, a gradient-free :func:`dense` makes its weight the conv's kernel whatever the rows:
    the weights are constants of a compile that packs them once (the frozen trunk's, under
    inductor's freezing), and a packed kernel beats the rows as kernel, which oneDNN reorders every
    call (Zen 5, 2 threads, µs: 256 rows 400 -> 400 183 vs 206, 512 -> 2048 2218 vs 2274, 64 rows
    1024 -> 1024 291 vs 330; the weight unpacked as kernel would take 227, 2515 and 1169)."""
    global _CONSTANT_WEIGHTS
    before, _CONSTANT_WEIGHTS = _CONSTANT_WEIGHTS, True
    try:
        yield
    finally:
        _CONSTANT_WEIGHTS = before


def _on_onednn(x, outputs):
    """Whether :func:`dense` runs ``x`` (rows of its last dim) into ``outputs`` as a 1×1 conv."""
    return x.dim() >= 2 and x.numel() > 0 and _onednn_product(x, x.numel() * outputs)


def _onednn_product(x, macs):
    """Whether :func:`dense` runs a product of ``macs`` on ``x``'s device and dtype as a 1×1 conv."""
    return (ROWS_AS_CONV and x.device.type == "cpu" and x.dtype == torch.float32
            and not torch.is_autocast_enabled("cpu") and macs >= DENSE_MIN_MACS)


def _as_pixels(rows):
    """A (r, c) matrix as an image of c channels in channels-last memory (the matrix's own):
    shape (a, c, b, d) with a·b·d = r and no dim of size 1 where r allows. A compiled graph gives
    size-1 dims stride 0, and oneDNN's conv then takes a 1×r image for NCHW: it copied the image
    and ran NCHW (ConvNeXt-T 64 px: 45 copies, ~40 ms of a 540 ms step)."""
    a, b, d = _three_factors(rows.shape[0])
    return rows.reshape(a, b, d, rows.shape[1]).permute(0, 3, 1, 2)


def _three_factors(r):
    """``(a, b, d)``, ``a·b·d = r``, each above 1 (the two smallest prime factors, the rest), or ``(1, r, 1)``."""
    a = _smallest_factor(r)
    b = a and _smallest_factor(r // a)
    return (a, b, r // (a * b)) if b else (1, r, 1)


def _smallest_factor(r):
    """The smallest factor of ``r`` above 1 and below ``r``, or None (plain int arithmetic: traced
    by torch.compile as constants)."""
    f = 2
    while f * f <= r:
        if r % f == 0:
            return f
        f += 1
    return None


def batch_norm(p, s, x, train, momentum=BN_MOMENTUM, eps=BN_EPS, sync_stats=None):
    """BatchNorm over dim 1 with PyTorch's semantics; returns ``(y, new_state)``.

    In train mode the batch statistics normalise and the running statistics are updated out of
    place (momentum, unbiased running variance, ``num_batches_tracked`` + 1); otherwise the
    running statistics normalise and the state comes back unchanged. ``sync_stats`` (SyncBN)
    all-reduces ``(count, sum, sum of squares)`` per channel across processes, differentiably.
    ``p`` without ``weight``/``bias``: no affine transform (``affine=False``).
    """
    weight, bias = p.get("weight"), p.get("bias")
    if not train:
        return F.batch_norm(x, s["running_mean"], s["running_var"], weight, bias, False, 0.0, eps), s
    if sync_stats is not None:
        return _synced_batch_norm(weight, bias, s, x, momentum, eps, sync_stats)
    y, _, _, mean, var = torch.ops.aten._native_batch_norm_legit_functional(
        x, weight, bias, s["running_mean"], s["running_var"], True, momentum, eps)
    return y, {"running_mean": mean, "running_var": var, "num_batches_tracked": s["num_batches_tracked"] + 1}


def _synced_batch_norm(weight, bias, s, x, momentum, eps, sync_stats):
    # Each rank's sums are taken about its own mean (two passes) and travel in float64: the global
    # variance as E[x^2] - E[x]^2 in float32 loses every digit when |mean| >> std (a 1x1 feature
    # map over a few images: errors of 1e-3 after two steps, where one process gives 1e-5).
    dims = [0] + list(range(2, x.dim()))
    shape = [1, -1] + [1] * (x.dim() - 2)
    xf = x.float()
    n = x.numel() / x.shape[1]
    local_mean = xf.mean(dims)
    deviation = xf - local_mean.view(shape)
    local_m2 = (deviation * deviation).sum(dims).double()
    lm = local_mean.double()
    count = torch.full((1,), n, dtype=torch.float32, device=x.device)
    count, total, total_sq = sync_stats(count, lm * n, local_m2 + n * lm * lm)
    mean = total / count
    var = (total_sq / count - mean * mean).clamp_min(0)
    mean, var = mean.float(), var.float()
    y = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + eps)
    if weight is not None:
        y = y * weight.view(shape) + bias.view(shape)
    unbiased = var * count / (count - 1).clamp_min(1)
    new_s = {"running_mean": (1 - momentum) * s["running_mean"] + momentum * mean.detach(),
             "running_var": (1 - momentum) * s["running_var"] + momentum * unbiased.detach(),
             "num_batches_tracked": s["num_batches_tracked"] + 1}
    return y.to(x.dtype), new_s


def layer_norm_2d(p, x, eps):
    """LayerNorm over the channels of each position of N×C×H×W (torchvision's LayerNorm2d,
    detectron2's channels-first LayerNorm)."""
    return F.layer_norm(x.permute(0, 2, 3, 1), x.shape[1:2], p["weight"], p["bias"], eps).permute(0, 3, 1, 2)


def group_norm(p, x, groups, eps=BN_EPS):
    return F.group_norm(x, groups, p["weight"], p["bias"], eps)


def norm(kind, p, s, x, train, groups=32, sync_stats=None):
    """Dispatches on the norm kind; ``layer`` is GroupNorm with one group (as VISSL's LayerNorm2d)."""
    if kind == "batch":
        return batch_norm(p, s, x, train, sync_stats=sync_stats)
    return group_norm(p, x, 1 if kind == "layer" else groups), s


def max_pool(x, kernel=3, stride=2, padding=1):
    """``F.max_pool2d``; its gradient runs ATen's kernels in a compiled CPU step (fpipe.models.max_pool)."""
    return max_pool_lib.max_pool2d(x, kernel, stride, padding)


def adaptive_pool(x, size, kind="avg"):
    """Pools N×C×H×W to a fixed grid ``size`` (int or (h, w)); ``kind`` is ``avg`` or ``max``."""
    if kind == "avg":
        return F.adaptive_avg_pool2d(x, size)
    if kind == "max":
        return F.adaptive_max_pool2d(x, size)
    raise ValueError(f"unknown pooling {kind!r}; valid: 'avg', 'max'")
