"""fpipe.layer_decay numbers each trunk's layers as its family's fine-tuning recipe does.

The recipes are written out here on the original repositories' names (SimMIM's get_swin_layer,
ConvNeXt V2's get_num_layer_for_convnext_single), applied to those repositories' own parameter
names (tests/fixtures), and compared, name by name through fpipe's rename tables, with the
multipliers fpipe gives its torchvision-named trunks. (ViT's against torch.optim.SGD: test_optim.py.)
"""
import json
import pathlib

import pytest

from fpipe import layer_decay, tree
from fpipe.models import model as model_lib
from fpipe.models.trunk import init_on_meta
from fpipe.weights import renames

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
DECAY = 0.7


def simmim_swin_layer(name, depths):
    if name.startswith("patch_embed"):
        return 0
    if name.startswith("layers."):
        stage, part = int(name.split(".")[1]), name.split(".")[3]
        if part in ("reduction", "norm"):  # the patch merging at the stage's end
            return sum(depths[:stage + 1])
        return sum(depths[:stage]) + int(part) + 1
    return sum(depths) + 1


def convnextv2_layer(name, depths):
    if name.startswith("downsample_layers."):
        return sum(depths[:int(name.split(".")[1])]) + 1
    if name.startswith("stages."):
        stage, block = map(int, name.split(".")[1:3])
        return sum(depths[:stage]) + block + 1
    return sum(depths) + 1


@pytest.mark.parametrize("family, fixture, preset, table, recipe, depths", [
    ("swin", "swin", "swin_t", renames.MS_SWIN, simmim_swin_layer, (2, 2, 6, 2)),
    ("convnext", "convnextv2", "convnextv2_atto", renames.FB_CONVNEXT, convnextv2_layer, (2, 2, 6, 2))])
def test_each_param_gets_its_recipes_multiplier(family, fixture, preset, table, recipe, depths):
    manifest = json.loads((FIXTURES / fixture / "manifests.json").read_text())["official"]
    theirs = [n for n, _, _ in manifest["state_dict"]]
    ours = list(tree.flatten(init_on_meta(model_lib.build_trunk(preset))[0]))
    mults, note = layer_decay.mults(ours, DECAY)
    assert f"over {family}'s {sum(depths)} blocks" in note
    compared = 0
    for name in theirs:
        mine = renames.apply(name, table)
        if mine not in mults:  # buffers (index, masks) and the classifier: no trunk params
            continue
        assert mults[mine] == pytest.approx(DECAY ** (sum(depths) + 1 - recipe(name, depths))), (name, mine)
        compared += 1
    assert compared == len(ours)  # every trunk param has its original


def convnextv2_group_layer(name):
    """ConvNeXt V2's get_num_layer_for_convnext ('group'), written out on its names."""
    if name.startswith("downsample_layers."):
        stage = int(name.split(".")[1])
        return 0 if stage == 0 else stage + 1 if stage in (1, 2) else 12
    if name.startswith("stages."):
        stage, block = map(int, name.split(".")[1:3])
        return stage + 1 if stage in (0, 1) else 3 + block // 3 if stage == 2 else 12
    return 13


def test_convnextv2_groups_give_each_param_its_recipes_multiplier():
    """layer_decay_type='group' on ConvNeXt V2-Base (stages of 3, 3, 27, 3 blocks): ConvNeXt V2's
    names, made from the Atto fixture's block names at Base's depths, numbered as its recipe does."""
    manifest = json.loads((FIXTURES / "convnextv2" / "manifests.json").read_text())["official"]
    atto = [n for n, _, _ in manifest["state_dict"]]
    theirs = [n for n in atto if not n.startswith("stages.")]
    for stage, depth in enumerate((3, 3, 27, 3)):
        rests = [n.split(".", 3)[3] for n in atto if n.startswith(f"stages.{stage}.0.")]
        theirs += [f"stages.{stage}.{j}.{rest}" for j in range(depth) for rest in rests]
    ours = list(tree.flatten(init_on_meta(model_lib.build_trunk("convnextv2_base"))[0]))
    mults, note = layer_decay.mults(ours, DECAY, kind="group")
    assert "over convnext's 12 layers (ConvNeXt V2 groups of 3 blocks): the stem x" in note
    mapped = {renames.apply(n, renames.FB_CONVNEXT): n for n in theirs}
    assert set(ours) <= set(mapped)
    for mine in ours:
        assert mults[mine] == pytest.approx(DECAY ** (12 + 1 - convnextv2_group_layer(mapped[mine]))), mine
    assert len({round(m, 12) for m in mults.values()}) == 14  # layers 0..12 and the final norm's 13
    with pytest.raises(ValueError, match=r"numbers ConvNeXts with stages of \[3, 3, 27, 3\].*convnext of \[2, 2, 6, 2\]"):
        layer_decay.mults(list(tree.flatten(init_on_meta(model_lib.build_trunk("convnextv2_atto"))[0])), DECAY,
                          kind="group")
    with pytest.raises(ValueError, match="layer_decay_type='grp'; valid: single, group"):
        layer_decay.mults(ours, DECAY, kind="grp")


def test_convnext_v1s_small_to_xlarge_take_the_groups_too():
    """ConvNeXt V1's main.py applies the 12-group numbering to convnext_small/base/large/xlarge."""
    for preset in ("convnext_small", "convnext_base", "convnext_large"):
        names = list(tree.flatten(init_on_meta(model_lib.build_trunk(preset))[0]))
        mults, _ = layer_decay.mults(names, DECAY, kind="group")
        assert mults["features.5.26.block.0.weight"] == pytest.approx(DECAY ** (13 - (3 + 26 // 3))), preset
        assert mults["features.7.0.block.0.weight"] == pytest.approx(DECAY), preset


def test_families_are_told_by_their_names():
    names = lambda preset: list(tree.flatten(init_on_meta(model_lib.build_trunk(preset))[0]))  # noqa: E731
    assert [layer_decay.family_of(names(p)) for p in ("vit_b_16", "swin_v2_t", "convnext_tiny")] == ["vit", "swin",
                                                                                                     "convnext"]
    for preset in ("resnet18", "efficientnet_b0", "regnet_y_400mf"):
        assert layer_decay.family_of(names(preset)) is None, preset
        with pytest.raises(ValueError, match="numbers the layers of ViT, Swin and ConvNeXt trunks"):
            layer_decay.mults(names(preset), DECAY)
