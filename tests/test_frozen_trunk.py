"""The fast linear-evaluation path equals the step over the whole model; its compiled trunk is kept."""
import logging
import os
import zipfile

import ml_collections
import pytest
import torch

from fpipe import freeze, tree
from fpipe.models import layers
from fpipe.models import model as model_lib
from fpipe.train import aoti_package, compile_cache, precision
from fpipe.train import frozen_trunk as ft_lib
from fpipe.train import step as step_lib
from test_fold import _model
from test_zoo import TINY


class _SGD:
    def init(self, params):
        return {}

    def update(self, grads, state, params, lr, in_place=False):  # (never in place); grads flat
        return tree.map_with_names(lambda n, p: p - lr * grads[n], params), state


@pytest.mark.parametrize("compile", [False, True])
def test_frozen_trunk_step_equals_whole_step(compile, monkeypatch):
    """Also with the tiny-input convs (layer3/4 at 32 px) and linears as oneDNN 1x1 convs
    (layers.dense's route where MKL is slow; forced here, for every product: compiled, the trunk's
    take their weights as kernels, layers.constant_weights)."""
    monkeypatch.setattr(layers, "ROWS_AS_CONV", True)
    monkeypatch.setattr(layers, "DENSE_MIN_MACS", 0)
    heads = dict(res4=model_lib.head_config("res4", "eval_mlp", pool=[2, 2]),
                 fc=model_lib.head_config("flatten", "linear"))
    model, params, state = _model(18, heads)
    trainable, frozen = freeze.partition(params, ["trunk"])
    eval_norms = freeze.eval_norms(state, frozen)
    gen = torch.Generator().manual_seed(3)
    batch = {"image": torch.randn(8, 3, 32, 32, generator=gen), "label": torch.randint(0, 5, (8,), generator=gen)}
    ts = {"trainable": trainable, "frozen": frozen, "model_state": state, "opt_state": {}}
    lr = torch.tensor(0.1)
    ref_ts, ref_m = step_lib.make_step(model, _SGD(), eval_norms=eval_norms)(ts, batch, lr)

    ft = ft_lib.frozen_trunk(model, trainable, frozen, state, eval_norms, compile=compile)
    step = ft_lib.on_features(step_lib.make_step(ft.model, _SGD(), eval_norms=eval_norms), ft.features)
    new_ts, m = step(ts, batch, lr)
    for k in ("loss", "res4/loss", "fc/loss"):
        torch.testing.assert_close(m[k], ref_m[k], rtol=1e-4, atol=1e-5)
    for n, v in tree.flatten(new_ts["trainable"]).items():
        torch.testing.assert_close(v, tree.flatten(ref_ts["trainable"])[n], rtol=1e-4, atol=1e-5)
    for n, v in tree.flatten(new_ts["model_state"]).items():  # the heads' BN trains; trunk state unchanged
        torch.testing.assert_close(v, tree.flatten(ref_ts["model_state"])[n], rtol=1e-4, atol=1e-5)
    assert new_ts["frozen"] is frozen


def test_the_frozen_trunk_runs_under_the_runs_mixed_precision():
    """With ``autocast`` (config.precision bf16), the constant trunk computes what the whole model's
    trunk computes under autocast: bf16 features, not float32 ones (the trunk is most of the work)."""
    model, trainable, frozen, state, eval_norms = _linear_eval_model()
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    inputs = model_lib.head_inputs(model.heads)  # the heads' inputs: res4 pooled, flatten
    with precision.autocast(torch.bfloat16, "cpu"), torch.no_grad():
        want, _ = model.trunk.apply(tree.merge(trainable, frozen)["trunk"], state["trunk"], x, train=False,
                                    features=("flatten", "res4"))
        want = model_lib.pool_inputs(want, inputs)
    fp32 = ft_lib.frozen_trunk(model, trainable, frozen, state, eval_norms, compile=False).features(x)
    bf16 = ft_lib.frozen_trunk(model, trainable, frozen, state, eval_norms, compile=False,
                               autocast=torch.bfloat16).features(x)
    assert sorted(bf16) == sorted(want) == ["flatten", "res4/avg2x2"]
    for k in want:
        assert bf16[k].dtype == want[k].dtype == torch.bfloat16 and fp32[k].dtype == torch.float32
        rel = lambda a, b: float((a.float() - b.float()).norm() / b.float().norm())
        assert rel(bf16[k], want[k]) < 2e-2, k  # ~1%: the norms are folded into the weights before the cast


@pytest.mark.parametrize("compile", [False, True])
def test_the_trunk_hands_the_heads_pooled_grids_of_every_crop(compile):
    """A head's pooling runs in the constant trunk: the heads' step gets each resolution's pooled
    grid (res4 at 1x1), not the feature map, and the heads compute what the whole model does on
    multi-crop input (two resolutions, a pooled head and a vector head)."""
    heads = dict(vec=model_lib.head_config("res5avg", "linear"),
                 grid=model_lib.head_config("res4", "eval_mlp", pool=[1, 1]))
    model, params, state = _model(18, heads)
    model, trainable, frozen, state, eval_norms = _frozen(model, params, state)
    gen = torch.Generator().manual_seed(7)
    crops = (torch.randn(4, 3, 32, 32, generator=gen), torch.randn(4, 3, 32, 32, generator=gen),
             torch.randn(4, 3, 16, 16, generator=gen))
    ft = ft_lib.frozen_trunk(model, trainable, frozen, state, eval_norms, compile=compile)
    feats = ft.features(crops)
    assert [(n, sorted(f)) for n, f in feats] == [(2, ["res4/avg1x1", "res5avg"]), (1, ["res4/avg1x1", "res5avg"])]
    assert [tuple(f["res4/avg1x1"].shape) for _, f in feats] == [(8, 256, 1, 1), (4, 256, 1, 1)]
    out, _ = ft.model.apply(tree.merge(trainable, frozen), state, feats, train=False, eval_norms=eval_norms)
    want, _ = model.apply(tree.merge(trainable, frozen), state, crops, train=False, eval_norms=eval_norms)
    for name in ("vec", "grid"):
        torch.testing.assert_close(out[name], want[name], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("compile", [False, True])
def test_only_the_compiled_trunk_runs_its_weights_as_constants(compile, monkeypatch):
    """layers.constant_weights (dense's packed-weight route) holds while the compiled trunk, whose
    weights freezing packs, is traced and run; the eager trunk's weights stay unpacked tensors.
    (The tiny RegNet: its convs on 2×2 and 1×1 maps are products; it compiles in a quarter of
    ResNet-18's time.)"""
    model, trainable, frozen, state, eval_norms = _frozen(*_tiny_regnet())
    seen = []
    real = layers.dense
    monkeypatch.setattr(layers, "dense", lambda *a, **k: seen.append(layers._CONSTANT_WEIGHTS) or real(*a, **k))
    ft = ft_lib.frozen_trunk(model, trainable, frozen, state, eval_norms, compile=compile)
    ft.features(torch.randn(2, 3, 32, 32))
    assert seen and set(seen) == {compile}
    assert not layers._CONSTANT_WEIGHTS


def test_frozen_trunk_refuses_a_training_trunk():
    model, params, state = _model(18)
    trainable, frozen = freeze.partition(params, [r"trunk\.conv1\..*"])
    with pytest.raises(ValueError, match="whole trunk frozen"):
        ft_lib.frozen_trunk(model, trainable, frozen, state, freeze.eval_norms(state, frozen), compile=False)


def _linear_eval_model(scale_conv1=1.0):
    heads = dict(res4=model_lib.head_config("res4", "eval_mlp", pool=[2, 2]),
                 fc=model_lib.head_config("flatten", "linear"))
    model, params, state = _model(18, heads)
    params["trunk"]["conv1"]["weight"] = params["trunk"]["conv1"]["weight"] * scale_conv1
    return _frozen(model, params, state)


@pytest.mark.parametrize("compile", [False, True])
def test_eval_features_fold_every_norm_and_equal_the_models_features(compile, monkeypatch):
    """eval_features (feature extraction's trunk): model.features' values, every trunk BatchNorm
    folded into its conv (none left to run), in chunks of ``batch_size`` (a smaller batch padded)."""
    from fpipe.models import fold
    model, params, state = _tiny_regnet()
    folded, real = [], fold.fold_frozen_norms
    monkeypatch.setattr(fold, "fold_frozen_norms", lambda *a, **k: folded.append(real(*a, **k)) or folded[-1])
    names = ("res3", "res4", "flatten")
    features = ft_lib.eval_features(model, params, state, names, compile=compile, batch_size=4)
    x = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    got = features(x)
    with torch.no_grad():
        want = model.features(params, state, x, names)
    assert set(got) == set(names)
    for k in names:
        assert got[k].shape == want[k].shape and not got[k].requires_grad
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-4, msg=k)
    bns = {n.rsplit(".", 1)[0] for n in tree.flatten(state["trunk"]) if n.endswith("running_mean")}
    assert len(bns) == 20 and not [n for n in tree.flatten(folded[0]) if n.rsplit(".", 1)[0][6:] in bns]


def _address(t):
    return torch.ops.mkldnn.data_ptr(t) if t.is_mkldnn else t.data_ptr()


def _frozen(model, params, state):
    """``(model, trainable, frozen, state, eval_norms)`` with the whole trunk frozen."""
    trainable, frozen = freeze.partition(params, ["trunk"])
    return model, trainable, frozen, state, freeze.eval_norms(state, frozen)


def _tiny_regnet():
    """The zoo tests' tiny RegNet (5 blocks, 8-64 channels in groups of 8) for 32 px: model, params, state."""
    cfg = ml_collections.ConfigDict(dict(trunk=model_lib.trunk_config("regnet", **TINY["regnet"]),
                                         heads=dict(fc=model_lib.head_config("flatten", "linear"))))
    model = model_lib.build(cfg, num_classes=5, image_size=32)
    return (model, *model.init(0))


def test_a_compiled_regnets_grouped_convs_on_2x2_maps_keep_the_models_features(monkeypatch):
    """A RegNet at 32 px (groups of 8 on 2×2 and 1×1 maps): the compiled frozen trunk, which runs
    those grouped convs as batched matmuls (layers._grouped_matrix_pays), gives model.features."""
    model, params, state = _tiny_regnet()
    routes = []
    real = layers._conv_as_matmul
    monkeypatch.setattr(layers, "_conv_as_matmul", lambda w, b, x, *a: routes.append(tuple(x.shape[-2:])) or
                        real(w, b, x, *a))
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    got = ft_lib.eval_features(model, params, state, ("res4", "flatten"), compile=True)(x)
    assert (2, 2) in routes
    with torch.no_grad():
        want = model.features(params, state, x, ("res4", "flatten"))
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-4, msg=k)


def test_the_compiled_trunk_is_kept_and_a_later_run_loads_it_instead_of_compiling(tmp_path, monkeypatch, caplog):
    cache, x = (str(tmp_path / "cache"), "the config's key"), torch.randn(4, 3, 32, 32)
    eager = ft_lib.frozen_trunk(*_frozen(*_tiny_regnet()), compile=False).features(x)
    first = ft_lib.frozen_trunk(*_frozen(*_tiny_regnet()), cache=cache).features(x)
    for k in eager:
        torch.testing.assert_close(first[k], eager[k], rtol=1e-4, atol=1e-5)
    (saved,) = os.listdir(cache[0])
    assert saved.startswith("frozen-trunk-") and saved.endswith(".pt2")
    with zipfile.ZipFile(os.path.join(cache[0], saved)) as package:  # compiled in a child (Linux CPU)
        wrapper = b"".join(package.read(n) for n in package.namelist() if n.endswith(".wrapper.cpp"))
    assert b"_convolution_pointwise" in wrapper  # under no_grad there too: frozen, packed weights, fused post-ops

    torch._dynamo.reset()  # as a new process, where compiling is not allowed
    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", lambda *a, **k: pytest.fail("compiled again"))
    monkeypatch.setattr(torch, "compile", lambda *a, **k: lambda *a: pytest.fail("compiled again"))
    with caplog.at_level(logging.INFO):
        second = ft_lib.frozen_trunk(*_frozen(*_tiny_regnet()), cache=cache).features(x)
    assert "Loaded the compiled frozen trunk" in caplog.text and "frozen trunk loaded and run" in caplog.text
    for k in first:
        assert torch.equal(second[k], first[k]), k
    # Loaded with its constants (packed conv weights, biases) 64-byte aligned; AOTInductor's own
    # loader leaves them 16 bytes past a boundary (glibc's malloc), which slows the trunk.
    package = compile_cache._load_package(os.path.join(cache[0], saved), "frozen trunk")
    assert isinstance(package, aoti_package.AlignedPackage) and len(package.constants) > 4
    assert {_address(t) % 64 for t in package.constants.values()} == {0}
    assert any(t.is_mkldnn for t in package.constants.values())
    for k, v in package(x.contiguous()).items():
        assert torch.equal(v, first[k]), k
    # A package holds code for its inputs' strides and does not check them (it returned another
    # image's features for channels-last input): the trunk hands it contiguous images, whatever came.
    # The first input loads the package, the second finds it kept in the process.
    eager_trunk = ft_lib.frozen_trunk(*_frozen(*_tiny_regnet()), compile=False)
    kept = ft_lib.frozen_trunk(*_frozen(*_tiny_regnet()), cache=cache)
    for name, v in (("channels-last", torch.randn(4, 32, 32, 3).permute(0, 3, 1, 2)),
                    ("strided", torch.randn(4, 3, 32, 64)[..., ::2])):
        want, got = eager_trunk.features(v), kept.features(v)
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-5, msg=f"{name} {k}")
    # Nor on another dtype of the same shape (it read float64 images as float32 ones): the trunk
    # refuses them, as the eager model does.
    with pytest.raises(Exception, match="(?i)double|float64"):
        kept.features(x.double())


def test_the_kept_trunk_is_keyed_by_its_weights_and_inputs_never_shared_with_others(monkeypatch):
    keys = []
    monkeypatch.setattr(compile_cache, "saved_package",  # record the key; run the trunk eagerly
                        lambda module, images, directory, key, *a: keys.append(key) or module)

    def key_of(model=_linear_eval_model(), shape=(4, 3, 32, 32), config_key="k"):
        ft_lib.frozen_trunk(*model, cache=("unused", config_key)).features(torch.zeros(shape))
        return keys[-1]

    base = key_of()
    assert key_of() == base and key_of(_linear_eval_model()) == base
    others = [key_of(_linear_eval_model(scale_conv1=1.001)), key_of(shape=(2, 3, 32, 32)),
              key_of(shape=(4, 3, 64, 64)), key_of(config_key="another trunk")]
    assert len({base, *others}) == 5


@pytest.mark.parametrize("spoil", ["garbage", "world_writable_dir"])
def test_an_unreadable_or_unsafe_kept_trunk_is_not_loaded(tmp_path, caplog, spoil):
    directory = tmp_path / "c"
    directory.mkdir(mode=0o700)
    path = directory / "frozen-trunk-k.pt2"
    path.write_bytes(b"not a package")
    os.chmod(path, 0o600)
    if spoil == "world_writable_dir":
        os.chmod(directory, 0o777)
    with caplog.at_level(logging.WARNING):
        assert compile_cache._load_package(str(path), "frozen trunk") is None
    assert ("Could not load" if spoil == "garbage" else "writable by no one else") in caplog.text


def test_a_resumed_linear_eval_runs_the_checkpoints_trunk_not_a_fresh_init(tmp_path):
    """With pretrained weights, a rerun (which resumes from the workdir's checkpoint and does not read
    model.weights.path) must evaluate the same trunk: the fast path's constants come from the restored
    train state. Before, it baked in the fresh random init and reported chance-level accuracies."""
    import json
    from configs import linear_eval
    from test_main import main

    model = model_lib.build(linear_eval.get_config().model, num_classes=10, image_size=16)
    params, state = model.init(123)  # not the run's seed (0): another trunk than a fresh init
    weights = {n.split(".", 1)[1]: v for n, v in {**tree.flatten(params), **tree.flatten(state)}.items()
               if n.startswith("trunk.")}
    torch.save(weights, tmp_path / "pretrained.pt")
    run = ["--config.total_steps=4", "--config.ckpt_steps=2", f"--config.model.weights.path={tmp_path / 'pretrained.pt'}"]
    main(tmp_path / "w", *run)
    first = json.loads((tmp_path / "w" / "results.json").read_text())["heads"]
    again = main(tmp_path / "w", *run)
    assert "Resuming from" in again.stderr
    assert json.loads((tmp_path / "w" / "results.json").read_text())["heads"] == first
