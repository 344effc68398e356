"""A finished run's workdir copied back to one of its checkpoints: what a run stopped there left."""
import os
import shutil


def rewound_copy(workdir, copy, step: int):
    """``copy`` of ``workdir`` holding only the checkpoints up to ``step`` (``last.pt`` pointing at it)
    and no results: rerunning the same command resumes at ``step``. Returns ``copy``."""
    shutil.copytree(workdir, copy)
    ckpts = copy / "checkpoints"
    for path in ckpts.glob("ckpt_*.pt"):
        if int(path.stem.split("_")[1]) > step:
            os.remove(path)
    os.remove(ckpts / "last.pt")
    os.symlink(f"ckpt_{step:08d}.pt", ckpts / "last.pt")
    os.remove(copy / "results.json")
    return copy
