"""Mixed precision: the pure loss scaler follows torch.amp.GradScaler step for step; bf16 autocast
trains on CPU close to float32; the scaled step equals the plain step and skips non-finite steps."""
import math

import ml_collections
import pytest
import torch

from fpipe import freeze, optim, tree
from fpipe.models import model as models
from fpipe.train import precision, step as step_lib

GRADS = [1.0, 2.0, math.inf, 1.0, 1.0, 1.0, math.nan, 3.0, 1.0, 1.0, 1.0, -math.inf, 1.0]


def scaler_cfg(**kw):
    c = precision.default_config()
    c.update({"init_scale": 2.0 ** 10, "growth_interval": 3, **kw})
    return c


def test_defaults_are_grad_scalers():
    ref = torch.amp.GradScaler("cpu")
    c = precision.default_config()
    assert (c.init_scale, c.growth_factor, c.backoff_factor, c.growth_interval) == (
        ref.get_scale(), ref.get_growth_factor(), ref.get_backoff_factor(), ref.get_growth_interval())
    s = precision.scaler_init()
    assert s["scale"].dtype == torch.float32 and s["growth_tracker"].dtype == torch.int32


@pytest.mark.parametrize("cfg", [scaler_cfg(), scaler_cfg(growth_factor=4.0, backoff_factor=0.25, growth_interval=1)])
def test_scaler_follows_grad_scaler(cfg):
    """Scripted finite / inf / NaN gradients: same scales, trackers, skip decisions and unscaled grads."""
    ref = torch.amp.GradScaler("cpu", init_scale=cfg.init_scale, growth_factor=cfg.growth_factor,
                               backoff_factor=cfg.backoff_factor, growth_interval=cfg.growth_interval)
    p_ref = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))
    sgd = torch.optim.SGD([p_ref], lr=0.1)
    scaler = precision.scaler_init(cfg)
    p = p_ref.detach().clone()
    for i, g in enumerate(GRADS):
        direction = torch.tensor([g, 0.25, -1.0])
        sgd.zero_grad()
        ref.scale((p_ref * direction).sum()).backward()  # grad = scale * direction
        ref.unscale_(sgd)
        ref_grad = p_ref.grad.clone()
        before = p_ref.detach().clone()
        ref.step(sgd)
        ref.update()
        ref_skipped = torch.equal(before, p_ref.detach())

        grads, found_inf = precision.unscale({"p": direction * scaler["scale"]}, scaler)
        new_p = precision.where_finite(found_inf, {"p": p.add(grads["p"], alpha=-0.1)}, {"p": p})["p"]
        scaler = precision.update_scaler(scaler, found_inf, cfg)
        assert bool(found_inf) == ref_skipped == (not math.isfinite(g)), i
        if not ref_skipped:
            torch.testing.assert_close(grads["p"], ref_grad, atol=0, rtol=0)
        torch.testing.assert_close(new_p, p_ref.detach(), atol=0, rtol=0)
        assert float(scaler["scale"]) == ref.get_scale(), i
        assert int(scaler["growth_tracker"]) == int(ref._growth_tracker), i
        p = new_p


def test_scaler_does_not_grow_to_inf():
    cfg = scaler_cfg(init_scale=2.0 ** 127, growth_interval=1)
    s = precision.update_scaler(precision.scaler_init(cfg), torch.tensor(False), cfg)
    assert float(s["scale"]) == 2.0 ** 127 and int(s["growth_tracker"]) == 0


def test_autocast_dtype():
    assert precision.autocast_dtype("float32", "cpu") is None
    assert precision.autocast_dtype(precision.default_config(), "cpu") is None
    assert precision.autocast_dtype("bf16", "cpu") == torch.bfloat16
    with pytest.raises(ValueError, match="CUDA"):
        precision.autocast_dtype("fp16", "cpu")
    with pytest.raises(ValueError, match="unknown precision"):
        precision.autocast_dtype("fp8", "cpu")
    assert precision.needs_scaler("fp16") and not precision.needs_scaler("bf16")


def _setup(freeze_rules=("trunk",)):
    cfg = ml_collections.ConfigDict(dict(trunk=models.trunk_config(depth=18),
                                         heads=dict(fc=models.head_config("flatten", "linear"))))
    model = models.build(cfg, num_classes=10, image_size=32)
    params, state = model.init(0)
    trainable, frozen = freeze.partition(params, list(freeze_rules))
    ocfg = optim.default_config()
    ocfg.lr = 0.1
    opt = optim.build(ocfg, trainable)
    ts = {"trainable": trainable, "frozen": frozen, "model_state": state, "opt_state": opt.init(trainable)}
    g = torch.Generator().manual_seed(0)
    batch = {"image": torch.randn(8, 3, 32, 32, generator=g), "label": torch.randint(0, 10, (8,), generator=g)}
    return model, opt, ts, batch, freeze.eval_norms(state, frozen)


def test_bf16_step_on_cpu_is_close_to_float32():
    model, opt, ts, batch, _ = _setup(freeze_rules=())  # the whole net trains: BN in train mode
    lr = torch.tensor(0.01)
    losses = {}
    for name, dtype in (("float32", None), ("bf16", precision.autocast_dtype("bf16", "cpu"))):
        step = step_lib.make_step(model, opt, autocast=dtype)
        state = ts
        for _ in range(2):
            state, metrics = step(state, batch, lr)
            losses.setdefault(name, []).append(float(metrics["loss"]))
        assert all(v.dtype == torch.float32 for v in tree.leaves(state["trainable"]))  # master params
    assert losses["bf16"] != losses["float32"]  # autocast did run in bf16
    (a1, a2), (b1, b2) = losses["bf16"], losses["float32"]
    assert abs(a1 - b1) < 0.01 * b1  # the same forward, 8-bit mantissas through 18 layers
    assert abs(a2 - b2) < 0.1 and a2 < a1  # after one update from each: both learn, nearly alike


def test_scaled_step_equals_plain_step_and_skips_overflow():
    model, opt, ts, batch, eval_norms = _setup()
    lr = torch.tensor(0.1)
    plain = step_lib.make_step(model, opt, eval_norms=eval_norms)
    cfg = scaler_cfg(init_scale=2.0 ** 16, growth_interval=2)
    scaled = step_lib.make_step(model, opt, loss_scaling=cfg, eval_norms=eval_norms, autocast=None)
    want, a = ts, ts | {"scaler": precision.scaler_init(cfg)}
    for scale in (2.0 ** 16, 2.0 ** 16, 2.0 ** 17):  # a power-of-two scale is exact: identical params
        want, _ = plain(want, batch, lr)
        a, m = scaled(a, batch, lr)
        assert float(m["skipped"]) == 0 and float(m["loss_scale"]) == scale
        for n, v in tree.flatten(want["trainable"]).items():
            torch.testing.assert_close(tree.flatten(a["trainable"])[n], v, atol=0, rtol=0)
    assert float(a["scaler"]["scale"]) == 2.0 ** 17 and int(a["scaler"]["growth_tracker"]) == 1

    # large inputs (the frozen trunk is positively homogeneous) and a large scale: the scaled grads
    # overflow float32, the step is skipped and the scale backs off
    b = a | {"scaler": {"scale": torch.tensor(2.0 ** 120), "growth_tracker": torch.tensor(1, dtype=torch.int32)}}
    b2, m = scaled(b, batch | {"image": batch["image"] * 1e4}, lr)
    assert float(m["skipped"]) == 1 and float(m["loss_scale"]) == 2.0 ** 120
    for key in ("trainable", "opt_state"):
        for n, v in tree.flatten(b[key]).items():
            assert torch.equal(tree.flatten(b2[key])[n], v), n
    assert float(b2["scaler"]["scale"]) == 2.0 ** 119 and int(b2["scaler"]["growth_tracker"]) == 0
