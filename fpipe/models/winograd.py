"""A 3×3 convolution (stride 1, padding 1) on a 4×4 map as Winograd's F(4×4, 3×3): the map, padded
to one 6×6 tile, and the kernel go to a transformed domain where the conv is 36 independent
products over channels, then back to the 4×4 output. 36 multiplies per channel pair against the
direct conv's 144 (16 pixels × 9 taps), for two small transforms. Same math as F.conv2d up to
rounding: about 1e-5 of the largest output against 1e-6 for oneDNN's direct conv (float64
reference), the error of the Winograd kernels GPU libraries pick for float32 convs.

Used by :func:`fpipe.models.layers.conv` in a compiled frozen trunk, where the transformed
kernel is a constant inductor folds once (the transform is in float64, then rounded). The
matrices are Lavin & Gray's (2016) for the points 0, ±1, ±2, ∞. Each transform is one product
with a constant Kronecker matrix (Bᵀ⊗Bᵀ, 36×16: the padding's rows and columns drop out; Aᵀ⊗Aᵀ,
16×36): as fast as the transforms written out as fused sums of slices, which took inductor 35 s
more to compile on a ResNet-18 (docs/BENCHMARKS.md, forty-ninth session).
"""
import torch

TILE = 4  # the map's side: one output tile; the input tile is TILE + 2 with the padding

_INPUT = ((4, 0, -5, 0, 1, 0), (0, -4, -4, 1, 1, 0), (0, 4, -4, -1, 1, 0),
          (0, -2, -1, 2, 1, 0), (0, 2, -1, -2, 1, 0), (0, 4, 0, -5, 0, 1))  # Bᵀ
_KERNEL = ((1 / 4, 0, 0), (-1 / 6, -1 / 6, -1 / 6), (-1 / 6, 1 / 6, -1 / 6),
           (1 / 24, 1 / 12, 1 / 6), (1 / 24, -1 / 12, 1 / 6), (0, 0, 1))  # G
_OUTPUT = ((1, 1, 1, 1, 1, 0), (0, 1, -1, 2, -2, 0), (0, 1, 1, 4, 4, 0), (0, 1, -1, 8, -8, 1))  # Aᵀ


def conv3x3(x, weight, bias=None):
    """``F.conv2d(x, weight, bias, stride=1, padding=1)`` for a (n, c, 4, 4) ``x`` and a (k, c, 3,
    3) ``weight``, by F(4×4, 3×3)."""
    (n, c, h, w), k = x.shape, weight.shape[0]
    if (h, w) != (TILE, TILE):
        raise ValueError(f"winograd.conv3x3 takes {TILE}×{TILE} maps (one tile); got {h}×{w}: use F.conv2d")
    pixels = x.permute(2, 3, 0, 1).reshape(TILE * TILE, n * c)
    tiles = (_kron(_INPUT, x, cols=slice(1, TILE + 1)) @ pixels).reshape(36, n, c)
    products = torch.bmm(tiles, _kernel_transform(weight)).reshape(36, n * k)
    y = (_kron(_OUTPUT, x) @ products).reshape(TILE, TILE, n, k).permute(2, 3, 0, 1)
    return y if bias is None else y + bias[:, None, None]


def _kron(matrix, like, cols=slice(None)):
    """M⊗M for the rows of ``matrix`` (restricted to ``cols``), in ``like``'s dtype and device:
    applied to a tile flattened row by row, the 2-D transform M·d·Mᵀ."""
    m = torch.tensor(matrix, dtype=torch.float64)[:, cols]
    return torch.kron(m, m).to(dtype=like.dtype, device=like.device)


def _kernel_transform(weight):
    """(k, c, 3, 3) -> (36, c, k): G·w·Gᵀ per channel pair, computed in float64."""
    g = torch.tensor(_KERNEL, dtype=torch.float64, device=weight.device)
    u = torch.einsum("ai,kcij,bj->abck", g, weight.double(), g)
    return u.reshape(36, weight.shape[1], weight.shape[0]).to(weight.dtype)
