"""JAX/Flax parameters (``.npz`` archives: big_vision, google-research/vision_transformer) in
PyTorch's layouts and dotted names, so that the rename tables and ``format: auto`` take them.

- names: ``a/b/kernel`` -> ``a.b.weight`` (``scale`` -> ``weight`` too);
- scanned blocks (big_vision's ``scan=True``: one ``encoderblock/...`` array per parameter,
  blocks on its leading axis) -> one ``encoderblock_<i>`` per block;
- Dense kernels ``[in, out]`` -> ``[out, in]``; Conv kernels ``[kh, kw, in, out]`` ->
  ``[out, in, kh, kw]``; attention's per-head kernels: query/key/value ``[D, heads, dh]`` ->
  ``[heads·dh, D]`` (their biases ``[heads, dh]`` -> ``[heads·dh]``), out ``[heads, dh, D]`` ->
  ``[D, heads·dh]``;
- bfloat16 arrays (numpy has no such dtype: 2-byte void) are read as bfloat16.
"""
import numpy as np
import torch

SCANNED = "encoderblock"
_LEAVES = {"kernel": "weight", "scale": "weight"}


def to_torch(arrays: dict) -> dict:
    """``{"a/b/kernel": ndarray}`` -> ``{"a.b.weight": tensor}`` in PyTorch's layouts (module docstring)."""
    out = {}
    for name, array in arrays.items():
        parts = name.split("/")
        tensor = _tensor(array)
        if SCANNED in parts[:-1]:
            at = parts.index(SCANNED)
            for i, block in enumerate(tensor.unbind(0)):
                out[_dotted(parts[:at] + [f"{SCANNED}_{i}"] + parts[at + 1:])] = _layout(parts, block)
        else:
            out[_dotted(parts)] = _layout(parts, tensor)
    return out


def _tensor(array: np.ndarray) -> torch.Tensor:
    if array.dtype.kind == "V" and array.dtype.itemsize == 2:  # bfloat16 as jax saves it
        return torch.from_numpy(np.ascontiguousarray(array).view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(array))


def _layout(parts: list, t: torch.Tensor) -> torch.Tensor:
    leaf, parent = parts[-1], parts[-2] if len(parts) > 1 else ""
    if leaf == "kernel":
        if t.dim() == 4:
            return t.permute(3, 2, 0, 1).contiguous()
        if t.dim() == 3:  # attention's per-head kernels
            return (t.reshape(-1, t.shape[-1]) if parent == "out" else t.reshape(t.shape[0], -1)).T.contiguous()
        if t.dim() == 2:
            return t.T.contiguous()
    if leaf == "bias" and t.dim() == 2:  # query/key/value biases [heads, dh]
        return t.reshape(-1)
    return t


def _dotted(parts: list) -> str:
    return ".".join(parts[:-1] + [_LEAVES.get(parts[-1], parts[-1])])
