"""fpipe.models.fold: folded frozen norms and the constant trunk give the unfolded model's outputs."""
import ml_collections
import pytest
import torch

from fpipe import freeze, tree
from fpipe.models import fold
from fpipe.models import model as model_lib
from test_zoo import TINY


def _model(depth=18, heads=None, image_size=32):
    heads = heads or dict(fc=model_lib.head_config("flatten", "linear"))
    cfg = ml_collections.ConfigDict(dict(trunk=model_lib.trunk_config(depth=depth), heads=heads))
    model = model_lib.build(cfg, num_classes=5, image_size=image_size)
    params, state = model.init(0)
    gen = torch.Generator().manual_seed(1)
    # Running statistics and affine params far from identity, so a wrong fold shows.
    state = _random_statistics(state, gen)
    params = tree.map_with_names(
        lambda n, v: (torch.rand(v.shape, generator=gen) + 0.5 if n.endswith(("bn1.weight", "bn2.weight", "bn3.weight"))
                      else torch.randn(v.shape, generator=gen) * 0.1 if n.endswith("bias") else v), params)
    return model, params, state


def _random_statistics(state, gen):
    """``state`` with running means ~N(0, 0.2²) and running variances in [0.5, 1.5)."""
    return tree.map_with_names(
        lambda n, v: (torch.randn(v.shape, generator=gen) * 0.2 if n.endswith("running_mean") else
                      torch.rand(v.shape, generator=gen) + 0.5 if n.endswith("running_var") else v), state)


def _names(t):
    return set(tree.flatten(t))


@pytest.mark.parametrize("depth", [18, 50])
def test_folded_trunk_equals_eval_forward(depth):
    model, params, state = _model(depth)
    trainable, frozen = freeze.partition(params, ["trunk"])
    eval_norms = freeze.eval_norms(state, frozen)
    folded = fold.fold_frozen_norms(frozen, state, eval_norms)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    feats = ("res3", "flatten")
    ref, ref_state = model.trunk.apply(params["trunk"], state["trunk"], x, train=False, features=feats)
    for p in (folded, fold.channels_last(folded)):
        out, new_state = model.trunk.apply(p["trunk"], state["trunk"], x, train=True, features=feats,
                                           eval_norms={n[6:] for n in eval_norms})
        for f in feats:
            scale = float(ref[f].abs().max())
            torch.testing.assert_close(out[f], ref[f], rtol=1e-3, atol=1e-4 * scale)  # float32 drift over 50 layers
        # The state of folded layers comes back untouched (the same tensors).
        for n, v in tree.flatten(new_state).items():
            assert v is tree.flatten(state["trunk"])[n]


@pytest.mark.parametrize("family,options,middle", [("regnet", dict(TINY["regnet"], se_ratio=0.25), "res4"),
                                                   ("efficientnet", TINY["efficientnet"], "stage4")])
def test_conv_norm_pairs_of_other_trunks_fold_every_norm_and_keep_their_outputs(family, options, middle):
    """torchvision's conv-norm pairs (``X.0`` then ``X.1``: RegNet, EfficientNet) fold like ResNet's:
    no BatchNorm left in the frozen tree, the eval-mode features unchanged."""
    cfg = ml_collections.ConfigDict(dict(trunk=model_lib.trunk_config(family, **options),
                                         heads=dict(fc=model_lib.head_config("flatten", "linear"))))
    model = model_lib.build(cfg, num_classes=5, image_size=32)
    params, state = model.init(0)
    gen = torch.Generator().manual_seed(3)
    state = _random_statistics(state, gen)
    norms = {n[:-len(".running_mean")] for n in tree.flatten(state) if n.endswith("running_mean")}
    params = tree.map_with_names(lambda n, v: torch.rand(v.shape, generator=gen) + 0.5
                                 if n.rsplit(".", 1)[0] in norms else v, params)
    trainable, frozen = freeze.partition(params, ["trunk"])
    eval_norms = freeze.eval_norms(state, frozen)
    folded = fold.fold_frozen_norms(frozen, state, eval_norms)
    assert norms and set(fold.foldable(frozen, state, eval_norms)) == norms
    assert not {n.rsplit(".", 1)[0] for n in tree.flatten(folded)} & norms
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    feats = (middle, "flatten")
    ref, _ = model.trunk.apply(params["trunk"], state["trunk"], x, train=False, features=feats)
    out, _ = model.trunk.apply(folded["trunk"], state["trunk"], x, train=False, features=feats)
    for f in ref:
        torch.testing.assert_close(out[f], ref[f], rtol=1e-4, atol=1e-5 * float(ref[f].abs().max()), msg=f)


def test_names_removed_and_added():
    model, params, state = _model(50)
    trainable, frozen = freeze.partition(params, ["trunk"])
    folded = fold.fold_frozen_norms(frozen, state, freeze.eval_norms(state, frozen))
    before, after = _names(frozen), _names(folded)
    removed, added = before - after, after - before
    norms = {n.rsplit(".", 1)[0] for n in before if n.endswith("running_mean")} | {
        n.rsplit(".", 1)[0] for n in before if ".bn" in n or "downsample.1" in n}
    assert removed == {f"{n}.{k}" for n in norms for k in ("weight", "bias")}
    assert "trunk.bn1.weight" in removed and "trunk.layer1.0.downsample.1.bias" in removed
    assert added == {f"{fold.conv_of(n)}.bias" for n in norms}
    assert "trunk.conv1.bias" in added and "trunk.layer4.2.conv3.bias" in added
    assert not any(".bn" in n or "downsample.1" in n for n in after)
    # Inputs are not modified.
    assert _names(frozen) == before


def test_trainable_norms_untouched():
    """Freeze only the convs: norms in train mode (not in eval_norms) are not folded."""
    model, params, state = _model(18)
    trainable, frozen = freeze.partition(params, [r"trunk\..*conv.*", r"trunk\..*downsample\.0\..*"])
    eval_norms = freeze.eval_norms(state, frozen)
    assert not eval_norms
    folded = fold.fold_frozen_norms(frozen, state, eval_norms)
    assert _names(folded) == _names(frozen)
    for n, v in tree.flatten(folded).items():
        assert v is tree.flatten(frozen)[n]
    # A norm whose scale is frozen but whose conv trains is not folded either.
    trainable, frozen = freeze.partition(params, [r"trunk\.bn1\..*"])
    folded = fold.fold_frozen_norms(frozen, state, freeze.eval_norms(state, frozen))
    assert _names(folded) == _names(frozen) == {"trunk.bn1.weight", "trunk.bn1.bias"}


def test_head_norms_not_folded():
    heads = dict(res4=model_lib.head_config("res4", "eval_mlp", pool=[2, 2]))
    model, params, state = _model(18, heads)
    trainable, frozen = freeze.partition(params, ["all"])
    eval_norms = freeze.eval_norms(state, frozen)
    assert "heads.res4.channel_bn" in eval_norms
    folded = fold.fold_frozen_norms(frozen, state, eval_norms)
    assert {"heads.res4.channel_bn.weight", "heads.res4.channel_bn.bias"} <= _names(folded)


def test_folding_keeps_tensors_on_their_device():
    """Meta tensors stand in for CUDA: every new tensor must follow the weights' device."""
    params, state = model_lib.build(
        ml_collections.ConfigDict(dict(trunk=model_lib.trunk_config(depth=18), heads={})), num_classes=2,
        image_size=32).init(0)
    meta = lambda t: t.to("meta")
    params, state = tree.map_leaves(meta, params), tree.map_leaves(meta, state)
    trainable, frozen = freeze.partition(params, ["trunk"])
    folded = fold.fold_frozen_norms(frozen, state, freeze.eval_norms(state, frozen))
    assert {t.device.type for t in tree.leaves(folded)} == {"meta"}
