"""fpipe.train.aoti_package: which files it loads itself, and how it hands the constants over.
A real package (a frozen trunk's) is loaded in tests/test_frozen_trunk.py."""
import zipfile

import pytest
import torch

from fpipe.train import aoti_package


class _Runner:
    """AOTInductor's CPU runner as far as AlignedPackage uses it; its names as a real one's
    (original names keep RegNet's "block2-0", the runner's own are sanitised)."""

    def __init__(self, fqns):
        self.fqns, self.calls = fqns, []
        self.block = {fqn: torch.arange(4.0) + i for i, fqn in enumerate(sorted(set(fqns.values())))}

    def extract_constants_map(self, use_inactive):
        return dict(self.block)

    def get_constant_names_to_original_fqns(self):
        return dict(self.fqns)

    def get_constant_names_to_dtypes(self):
        return {name: 6 for name in self.fqns}

    def update_constant_buffer(self, constants, use_inactive, validate, user_managed):
        self.calls.append(("update", constants, use_inactive, user_managed))

    def swap_constant_buffer(self):
        self.calls.append("swap")

    def free_inactive_constant_buffer(self):
        self.calls.append("free")

    def get_call_spec(self):
        return "", torch.utils._pytree.treespec_dumps(torch.utils._pytree.tree_structure({"f": 0}))


def test_the_constants_are_copied_under_the_runners_names_then_its_block_freed():
    runner = _Runner({"block2_0__bias": "block2-0__bias", "w": "w"})
    package = aoti_package.AlignedPackage(runner)
    (update, constants, use_inactive, user_managed), *rest = runner.calls
    assert update == "update" and use_inactive and user_managed and rest == ["swap", "free"]
    assert set(constants) == {"block2_0__bias", "w"} and package.constants is constants
    for name, fqn in runner.fqns.items():
        assert torch.equal(constants[name], runner.block[fqn])
        assert constants[name].data_ptr() != runner.block[fqn].data_ptr()
        assert constants[name].data_ptr() % 64 == 0


def test_constants_not_named_one_to_one_leave_the_runner_untouched():
    runner = _Runner({"a": "x", "b": "x"})  # two constants under one original name
    with pytest.raises(ValueError, match="one to one"):
        aoti_package.AlignedPackage(runner)
    assert runner.calls == []


@pytest.mark.parametrize("members", [["m/a.so", "m/b.so"], ["m/a.so", "p/data/weights/w"], ["m/a.cpp"]])
def test_other_layouts_are_loaded_as_aotinductor_loads_them(tmp_path, monkeypatch, members):
    path = tmp_path / "p.pt2"
    with zipfile.ZipFile(path, "w") as archive:
        for name in members:
            archive.writestr(name, b"")
    monkeypatch.setattr(torch._C._aoti, "AOTIModelContainerRunnerCpu",
                        lambda *a: pytest.fail("loaded as one CPU library"))
    monkeypatch.setattr(torch._inductor, "aoti_load_package", lambda p: ("AOTInductor's", p))
    assert aoti_package.load(str(path)) == ("AOTInductor's", str(path))
