"""Shared test setup: the repo on sys.path and the torchvision reference fixtures in ../shared/reference."""
import importlib.util
import os
import pathlib
import sys

import pytest

# A compile failure or graph break raises instead of falling back to eager (fpipe.train.step).
os.environ.setdefault("FPIPE_STRICT_COMPILE", "1")
os.environ.setdefault("FPIPE_COMPILE_CACHE", "")  # no compiled steps saved to ~/.cache (tests/test_compile_cache.py: its own)
# Under pytest-xdist (-n N) each worker and the runs it starts take one core: N workers with
# several OpenMP threads each would oversubscribe the machine and spin-wait on each other.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch
    torch.set_num_threads(1)

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
REFERENCE = pathlib.Path(os.environ.get("FPIPE_REFERENCE", ROOT.parent / "shared" / "reference"))


def _load_seeded():
    spec = importlib.util.spec_from_file_location("reference_seeded", REFERENCE / "seeded.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def reference():
    """The reference folder's ``seeded`` module (load_manifest, seeded_state_dict, seeded_images)."""
    if not (REFERENCE / "seeded.py").exists():
        pytest.fail(f"reference fixtures not found at {REFERENCE}; set FPIPE_REFERENCE")
    module = _load_seeded()
    module.OUTPUTS = REFERENCE / "outputs"
    return module
