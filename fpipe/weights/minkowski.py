"""MinkowskiEngine's sparse-convolution parameters in PyTorch's dense layouts and names.

ConvNeXt V2's FCMAE pretraining checkpoints (``convnextv2_*_fcmae.pt``) hold a sparse encoder:
convolution kernels ``X.kernel`` of ``[k·k, in, out]`` (``[k·k, C]`` depthwise), biases
``[1, C]``, and layers wrapped as ``X.ln.*`` (LayerNorm) and ``X.linear.*`` (Linear). The dense
model's tensors are ``X.weight`` ``[out, in, k, k]`` (``[C, 1, k, k]``), ``X.bias`` ``[C]`` and
``X.*``; the kernel's volume index runs over the width first (``w·k + h``), as the authors'
``remap_checkpoint_keys`` reads it when fine-tuning. Files with no such kernel pass unchanged.
"""
import math
import re

_WRAPPED = re.compile(r"\.(ln|linear)\.(weight|bias)$")


def to_dense(files: dict) -> tuple:
    """``(files, converted)``: ``files`` ({name: tensor}) with sparse kernels as dense weights and
    the ``ln``/``linear`` wrappers' names dropped, and the file names that changed. MinkowskiEngine
    kernels are ``*.kernel`` of 2 or 3 dims whose first is a square kernel volume; a file with none
    passes unchanged."""
    kernels = {name[:-len(".kernel")] for name, t in files.items() if name.endswith(".kernel") and _volume_side(t)}
    if not kernels:
        return files, []
    out, converted = {}, []
    for name, t in files.items():
        stem, _, leaf = name.rpartition(".")
        new = name
        if stem in kernels and leaf == "kernel":
            new, t = f"{stem}.weight", _dense_kernel(t)
        elif stem in kernels and leaf == "bias" and t.dim() == 2 and t.shape[0] == 1:
            t = t.reshape(-1)
        elif _WRAPPED.search(name) and _WRAPPED.sub(r".\2", name) not in files:
            new = _WRAPPED.sub(r".\2", name)  # the wrapped layer's own name, unless the file has it
        if new != name or t is not files[name]:
            converted.append(name)
        out[new] = t
    return out, converted


def _volume_side(t) -> int:
    """The kernel's side ``k`` when ``t`` is ``[k·k, ...]`` with 2 or 3 dims, else 0."""
    if t.dim() not in (2, 3):
        return 0
    side = math.isqrt(t.shape[0])
    return side if side > 0 and side * side == t.shape[0] else 0


def _dense_kernel(t):
    """``[k·k, in, out]`` -> ``[out, in, k, k]``; depthwise ``[k·k, C]`` -> ``[C, 1, k, k]``."""
    k = _volume_side(t)
    t = t.unsqueeze(1) if t.dim() == 2 else t
    return t.permute(2, 1, 0).reshape(t.shape[2], t.shape[1], k, k).transpose(2, 3).contiguous()
