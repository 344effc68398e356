"""Blocks numbered across stages -> numbered within them, as fpipe's (torchvision's) trunks name them.

transformers' EfficientNet numbers its MBConv blocks 0..N-1 over the whole network
(``encoder.blocks.<i>``), where torchvision has ``features.<stage>.<j>``. A name cannot say
where a stage ends, but the file can: every stage projects to a width of its own (B0: 16, 24,
40, 80, 112, 192, 320), so consecutive blocks whose ``projection.project_conv`` has the same
output width form one stage. ``number_by_stage`` rewrites ``encoder.blocks.<i>.`` to
``encoder.blocks.<stage>.<j>.``; the rename table (``renames.HF_EFFICIENTNET``) does the rest.
"""
import re

_PROJECTION = re.compile(r"(.*?)(?:^|(?<=\.))encoder\.blocks\.(\d+)\.projection\.project_conv\.weight")


def number_by_stage(files: dict) -> tuple:
    """``(files, blocks renumbered)``: ``files`` ({name: tensor}) with a transformers
    EfficientNet's flat block numbers replaced by (stage, block) ones; other files unchanged."""
    widths = {}  # (prefix, flat index) -> output width of the block's projection
    for name, t in files.items():
        m = _PROJECTION.fullmatch(name)
        if m and f"{m[1]}encoder.top_conv.weight" in files and getattr(t, "ndim", 0) == 4:
            widths[(m[1], int(m[2]))] = int(t.shape[0])
    if not widths:
        return files, 0
    staged = {}
    for prefix in {p for p, _ in widths}:
        indices = sorted(i for p, i in widths if p == prefix)
        if indices != list(range(len(indices))):
            return files, 0  # not numbered 0..N-1: not transformers' layout
        stage, block, previous = -1, 0, None
        for i in indices:
            width = widths[(prefix, i)]
            stage, block = (stage, block + 1) if width == previous else (stage + 1, 0)
            staged[(prefix, i)] = (stage, block)
            previous = width
    out = {}
    for name, t in files.items():
        m = re.fullmatch(r"(.*?)(?:^|(?<=\.))encoder\.blocks\.(\d+)\.(.*)", name)
        if m and (m[1], int(m[2])) in staged:
            stage, block = staged[(m[1], int(m[2]))]
            name = f"{m[1]}encoder.blocks.{stage}.{block}.{m[3]}"
        out[name] = t
    return out, len(staged)
