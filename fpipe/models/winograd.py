"""A 3×3 convolution (stride 1, padding 1) as Winograd's F(4×4, 3×3): each 6×6 input tile and
the kernel go to a transformed domain where the conv is 36 independent products over channels,
then back to a 4×4 output tile. 36 multiplies per channel pair and tile against the direct
conv's 144 (16 pixels × 9 taps), for a few transforms of sums. Same math as F.conv2d up to
rounding: about 1e-5 of the largest output against 1e-6 for oneDNN's direct conv (float64
reference), the error of the Winograd kernels GPU libraries pick for float32 convs.

Used by :func:`fpipe.models.layers.conv` in a compiled frozen trunk, where the transformed
kernel is a constant inductor folds once (the transform is in float64, then rounded). The
matrices are Lavin & Gray's (2016) for the points 0, ±1, ±2, ∞.
"""
import torch
import torch.nn.functional as F

TILE = 4  # output pixels per tile side; the input tile is TILE + 2

_INPUT = ((4, 0, -5, 0, 1, 0), (0, -4, -4, 1, 1, 0), (0, 4, -4, -1, 1, 0),
          (0, -2, -1, 2, 1, 0), (0, 2, -1, -2, 1, 0), (0, 4, 0, -5, 0, 1))  # Bᵀ
_KERNEL = ((1 / 4, 0, 0), (-1 / 6, -1 / 6, -1 / 6), (-1 / 6, 1 / 6, -1 / 6),
           (1 / 24, 1 / 12, 1 / 6), (1 / 24, -1 / 12, 1 / 6), (0, 0, 1))  # G
_OUTPUT = ((1, 1, 1, 1, 1, 0), (0, 1, -1, 2, -2, 0), (0, 1, 1, 4, 4, 0), (0, 1, -1, 8, -8, 1))  # Aᵀ


def conv3x3(x, weight, bias=None):
    """``F.conv2d(x, weight, bias, stride=1, padding=1)`` for a (n, c, h, w) ``x`` and a
    (k, c, 3, 3) ``weight``, by F(4×4, 3×3); the output is channels-last in memory."""
    (n, c, h, w), k = x.shape, weight.shape[0]
    th, tw = -(-h // TILE), -(-w // TILE)
    pixels = F.pad(x, (1, 1 + TILE * tw - w, 1, 1 + TILE * th - h)).permute(0, 2, 3, 1)  # (n, h', w', c)
    rows = _combine(_INPUT, [pixels[:, a:a + TILE * (th - 1) + 1:TILE] for a in range(TILE + 2)])
    tiles = [t for r in rows for t in _combine(_INPUT, [r[:, :, b:b + TILE * (tw - 1) + 1:TILE]
                                                        for b in range(TILE + 2)])]
    products = torch.bmm(torch.stack(tiles).reshape(36, n * th * tw, c), _kernel_transform(weight))
    products = products.reshape(TILE + 2, TILE + 2, n, th, tw, k)
    out_rows = _combine(_OUTPUT, list(products))  # TILE of (TILE + 2, n, th, tw, k)
    y = torch.stack([torch.stack(_combine(_OUTPUT, list(r)), -2) for r in out_rows], 2)  # (n, th, TILE, tw, TILE, k)
    y = y.reshape(n, TILE * th, TILE * tw, k)[:, :h, :w]
    y = y if bias is None else y + bias
    return y.permute(0, 3, 1, 2)


def _kernel_transform(weight):
    """(k, c, 3, 3) -> (36, c, k): G·w·Gᵀ per channel pair, computed in float64."""
    g = torch.tensor(_KERNEL, dtype=torch.float64, device=weight.device)
    u = torch.einsum("ai,kcij,bj->abck", g, weight.double(), g)
    return u.reshape(36, weight.shape[1], weight.shape[0]).to(weight.dtype)


def _combine(matrix, xs):
    """``[Σ_j matrix[i][j] · xs[j] for each row i]``, skipping zeros (the transforms as sums of
    slices, which inductor fuses into the kernels around the products)."""
    out = []
    for row in matrix:
        terms = [x if a == 1 else -x if a == -1 else x * a for a, x in zip(row, xs) if a != 0]
        total = terms[0]
        for t in terms[1:]:
            total = total + t
        out.append(total)
    return out
