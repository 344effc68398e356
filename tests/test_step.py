"""The pure train step against PyTorch's own autograd + torch.optim.SGD on the same model and data."""
import ml_collections
import pytest
import torch

from fpipe import freeze, optim, tree
from fpipe.models import fold
from fpipe.models import model as models
from fpipe.train import step as step_lib


def build(freeze_rules, heads):
    cfg = ml_collections.ConfigDict(dict(trunk=models.trunk_config(depth=18), heads=heads))
    model = models.build(cfg, num_classes=5, image_size=32)
    params, state = model.init(0)
    trainable, frozen = freeze.partition(params, freeze_rules)
    return model, params, state, trainable, frozen


def optim_cfg():
    c = optim.default_config()
    c.lr, c.momentum, c.nesterov, c.weight_decay = 0.05, 0.9, True, 1e-3
    c.wd_mults = ()
    return c


def batches(n):
    g = torch.Generator().manual_seed(1)
    return [{"image": torch.randn(6, 3, 32, 32, generator=g), "label": torch.randint(0, 5, (6,), generator=g)}
            for _ in range(n)]


def reference_run(model, params, state, trainable_names, eval_norms, data, lr):
    """The same computation written the usual eager way: requires_grad, backward, torch.optim.SGD."""
    flat = {n: t.clone().requires_grad_(n in trainable_names) for n, t in tree.flatten(params).items()}
    sgd = torch.optim.SGD([flat[n] for n in trainable_names], lr=lr, momentum=0.9, nesterov=True,
                          weight_decay=1e-3)
    for batch in data:
        outputs, state = model.apply(tree.unflatten(flat), state, batch["image"], train=True, eval_norms=eval_norms)
        loss = sum(torch.nn.functional.cross_entropy(logits.float(), batch["label"]) for logits in outputs.values())
        sgd.zero_grad()
        loss.backward()
        sgd.step()
    return {n: t.detach() for n, t in flat.items()}, state


def assert_close_scaled(actual, expected, name, rel=1e-4):
    """Float32 agreement relative to the tensor's scale (train-mode BN amplifies rounding)."""
    err = (actual.double() - expected.double()).abs().max().item()
    scale = expected.double().abs().max().item()
    assert err <= rel * max(scale, 1e-3), f"{name}: max error {err:.3g} vs scale {scale:.3g}"


# Float32 for the frozen trunk; float64 where trunk BatchNorms train on tiny batches, which
# amplifies float32 rounding over steps (the two agree to ~1e-13 in float64).
@pytest.mark.parametrize("freeze_rules,dtype,rel", [(("trunk",), torch.float32, 1e-4),
                                                    ((r"trunk\.(conv1|bn1|layer1|layer2)\..*",), torch.float64, 1e-9)])
def test_step_matches_autograd_and_torch_sgd(freeze_rules, dtype, rel):
    heads = dict(res4=models.head_config("res4", "eval_mlp", pool=[1, 1]), fc=models.head_config("flatten"))
    model, params, state, _, _ = build(freeze_rules, heads)
    cast = lambda t: t.to(dtype) if t.is_floating_point() else t
    params, state = tree.map_leaves(cast, params), tree.map_leaves(cast, state)
    trainable, frozen = freeze.partition(params, freeze_rules)
    eval_norms = freeze.eval_norms(state, frozen)
    opt = optim.build(optim_cfg(), trainable)
    step = step_lib.make_step(model, opt, eval_norms=eval_norms)
    ts = {"trainable": trainable, "frozen": frozen, "model_state": state, "opt_state": opt.init(trainable)}
    data = [{k: cast(v) for k, v in b.items()} for b in batches(4)]
    for batch in data:
        ts, metrics = step(ts, batch, torch.tensor(0.05, dtype=dtype))
    ref_params, ref_state = reference_run(model, params, state, set(tree.flatten(trainable)), eval_norms, data, 0.05)
    ours = tree.flatten(tree.merge(ts["trainable"], ts["frozen"]))
    for n, t in ref_params.items():
        assert_close_scaled(ours[n], t, n, rel)
    for n, t in tree.flatten(ref_state).items():
        assert_close_scaled(tree.flatten(ts["model_state"])[n], t, n, rel)
    # frozen params are the very same tensors: never copied, never updated
    assert all(a is b for a, b in zip(tree.leaves(ts["frozen"]), tree.leaves(frozen)))
    assert set(metrics) >= {"loss", "grad_norm", "res4/loss", "fc/loss", "res4/train_top1"}


def test_accumulated_parts_match_autograd_per_part_and_torch_sgd():
    """accum_steps=3: each batch of 6 in parts of 2, one after the other, as eager PyTorch code
    accumulates grads (autograd per part, BatchNorm statistics moving per part, the grads' mean),
    then one torch.optim.SGD step. Float64 (the loss in float32, as fpipe's): trunk BatchNorms
    train on parts of 2 images."""
    freeze_rules = (r"trunk\.(conv1|bn1|layer1)\..*",)
    model, params, state, _, _ = build(freeze_rules, dict(fc=models.head_config("flatten")))
    cast = lambda t: t.to(torch.float64) if t.is_floating_point() else t
    params, state = tree.map_leaves(cast, params), tree.map_leaves(cast, state)
    trainable, frozen = freeze.partition(params, freeze_rules)
    eval_norms = freeze.eval_norms(state, frozen)
    opt = optim.build(optim_cfg(), trainable)
    step = step_lib.make_step(model, opt, eval_norms=eval_norms, accum_steps=3)
    ts = {"trainable": trainable, "frozen": frozen, "model_state": state, "opt_state": opt.init(trainable)}
    data = [{k: cast(v) for k, v in b.items()} for b in batches(2)]
    for batch in data:
        ts, metrics = step(ts, batch, torch.tensor(0.005, dtype=torch.float64))

    names = sorted(tree.flatten(trainable))
    flat = {n: t.clone().requires_grad_(n in names) for n, t in tree.flatten(params).items()}
    sgd = torch.optim.SGD([flat[n] for n in names], lr=0.005, momentum=0.9, nesterov=True, weight_decay=1e-3)
    ref_state, losses = state, []
    for batch in data:
        total = None
        for i in range(3):
            part = {k: v[2 * i:2 * i + 2] for k, v in batch.items()}
            outputs, ref_state = model.apply(tree.unflatten(flat), ref_state, part["image"], train=True,
                                             eval_norms=eval_norms)
            loss = torch.nn.functional.cross_entropy(outputs["fc"].float(), part["label"])  # fpipe's: float32
            grads = torch.autograd.grad(loss, [flat[n] for n in names])
            total = grads if total is None else [a + b for a, b in zip(total, grads)]
            losses.append(loss.item())
        for n, g in zip(names, total):
            flat[n].grad = g / 3
        sgd.step()
    ours = tree.flatten(tree.merge(ts["trainable"], ts["frozen"]))
    for n, t in flat.items():
        assert_close_scaled(ours[n], t.detach(), n, 1e-9)
    moved = [n for n in tree.flatten(ref_state) if n.startswith("trunk.layer2") and n.endswith("running_mean")]
    assert moved
    for n, t in tree.flatten(ref_state).items():
        assert_close_scaled(tree.flatten(ts["model_state"])[n], t, n, 1e-9)
    assert float(metrics["loss"]) == pytest.approx(sum(losses[-3:]) / 3, rel=1e-6)
    with pytest.raises(ValueError, match="accum_steps=4 must divide each process's batch of 6"):
        step_lib.make_step(model, opt, eval_norms=eval_norms, accum_steps=4)(ts, data[0], torch.tensor(0.005))


def test_frozen_trunk_keeps_running_stats_and_builds_no_graph():
    model, params, state, trainable, frozen = build(("trunk",), dict(fc=models.head_config("flatten")))
    eval_norms = freeze.eval_norms(state, frozen)
    opt = optim.build(optim_cfg(), trainable)
    step = step_lib.make_step(model, opt, eval_norms=eval_norms)
    ts = {"trainable": trainable, "frozen": frozen, "model_state": state, "opt_state": opt.init(trainable)}
    ts, _ = step(ts, batches(1)[0], torch.tensor(0.1))
    for n, t in tree.flatten(state).items():
        assert torch.equal(tree.flatten(ts["model_state"])[n], t), n
    # in ordinary autograd, the frozen trunk's features do not require grad: no graph is kept
    live = tree.map_leaves(lambda t: t.clone().requires_grad_(), trainable)
    feats = model.trunk.apply(frozen["trunk"], state["trunk"], torch.randn(2, 3, 32, 32), train=True,
                              features=("flatten",), eval_norms=frozenset(n[6:] for n in eval_norms))[0]
    assert not feats["flatten"].requires_grad
    assert live["heads"]["fc"]["weight"].requires_grad


def test_eval_step_counts_are_exact_with_padding_mask():
    model, params, state, _, _ = build(("trunk",), dict(fc=models.head_config("flatten")))
    batch = batches(1)[0]
    logits = model.apply(params, state, batch["image"], train=False)[0]["fc"]
    mask = torch.tensor([True, True, True, True, False, False])
    counts = step_lib.make_eval_step(model, topk=(1, 5))(params, state, {**batch, "mask": mask})
    expected_top1 = int(((logits.argmax(1) == batch["label"]) & mask).sum())
    assert int(counts["count"]) == 4
    assert int(counts["fc"]["top1"]) == expected_top1
    assert int(counts["fc"]["top5"]) == 4  # 5 classes: top-5 always hits


def test_eval_step_scores_label_heads_over_the_present_classes_only():
    """eval_classes="present": top-k among the classes the split holds (ImageNet-R's 200 of 1000)."""
    model, params, state, _, _ = build(("trunk",), dict(fc=models.head_config("flatten")))
    batch = batches(1)[0]
    logits = model.apply(params, state, batch["image"], train=False)[0]["fc"]
    present = torch.tensor([True, False, True, False, True])
    batch["label"] = torch.tensor([0, 2, 4, 0, 2, 4])
    counts = step_lib.make_eval_step(model, topk=(1, 2))(params, state, {**batch, "classes": present})
    masked = logits.masked_fill(~present, float("-inf"))
    assert int(counts["fc"]["top1"]) == int((masked.argmax(1) == batch["label"]).sum())
    hit2 = (masked.topk(2, dim=1).indices == batch["label"][:, None]).any(1)
    assert int(counts["fc"]["top2"]) == int(hit2.sum())
    unmasked = step_lib.make_eval_step(model, topk=(1, 2))(params, state, batch)
    assert int(unmasked["fc"]["top1"]) == int((logits.argmax(1) == batch["label"]).sum())
    assert (masked.argmax(1) != logits.argmax(1)).any()  # the mask changed some answers: the test bites


def test_compiled_step_on_the_loops_channels_last_state_equals_eager():
    """As the loop compiles: conv weights (and their momentum) channels-last; layer4 and fc train."""
    rules = (r"trunk\.(conv1|bn1|layer1|layer2|layer3)\..*",)
    model, params, state, trainable, frozen = build(rules, dict(fc=models.head_config("flatten")))
    eval_norms = freeze.eval_norms(state, frozen)
    opt = optim.build(optim_cfg(), trainable)
    step = step_lib.make_step(model, opt, eval_norms=eval_norms)
    compiled = step_lib.maybe_compile(step, True)
    a = {"trainable": trainable, "frozen": frozen, "model_state": state, "opt_state": opt.init(trainable)}
    b = fold.channels_last(a)
    weight = "trunk.layer4.0.conv1.weight"
    assert b["trainable"]["trunk"]["layer4"]["0"]["conv1"]["weight"].is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(tree.flatten(b["trainable"])[weight], tree.flatten(a["trainable"])[weight])
    given = {n: t.stride() for n, t in tree.flatten(b).items()}
    for batch in batches(3):
        a, ma = step(a, batch, torch.tensor(0.05))
        b, mb = compiled(b, batch, torch.tensor(0.05))
    for n, t in tree.flatten(a["trainable"]).items():
        torch.testing.assert_close(tree.flatten(b["trainable"])[n], t, rtol=1e-4, atol=3e-5)  # float sums' order
    torch.testing.assert_close(mb["loss"], ma["loss"], rtol=1e-4, atol=1e-5)
    # The step gives back the layout it was given (else every call would compile anew).
    assert {n: t.stride() for n, t in tree.flatten(b).items()} == given


def test_the_eager_grads_are_torch_funcs_bit_for_bit_with_unused_leaves_zero_and_aux_detached():
    """Run eagerly, the step takes its grads from torch.autograd.grad (torch.func's eager transform
    keeps every forward intermediate alive: pytorch#134612); the values must be torch.func's."""
    model, params, state, trainable, frozen = build((), dict(fc=models.head_config("flatten")))
    batch = batches(1)[0]
    flat = dict(tree.flatten(trainable), unused=torch.ones(3))

    def loss_fn(flat_trainable, frozen, state, batch):
        used = {n: t for n, t in flat_trainable.items() if n != "unused"}
        outputs, new_state = model.apply(step_lib.merged(used, frozen), state, batch["image"], train=True)
        loss = torch.nn.functional.cross_entropy(outputs["fc"], batch["label"])
        return loss * 2, (loss, outputs, new_state)

    got_grads, (got_value, got_aux) = step_lib.grad_and_value_traced_or_eager(loss_fn)(flat, frozen, state, batch)
    want_grads, (want_value, want_aux) = torch.func.grad_and_value(loss_fn, has_aux=True)(flat, frozen, state, batch)
    assert list(got_grads) == list(flat) and torch.equal(got_grads["unused"], torch.zeros(3))
    for name, g in want_grads.items():
        assert torch.equal(got_grads[name], g), name
    assert torch.equal(got_value, want_value)
    for got, want in zip(tree.leaves({"a": got_aux[1], "s": got_aux[2]}), tree.leaves({"a": want_aux[1], "s": want_aux[2]})):
        assert torch.equal(got, want) and not got.requires_grad
    assert not got_value.requires_grad and not got_aux[0].requires_grad
    assert all(not t.requires_grad for t in flat.values())  # the caller's tensors untouched

    def shared(flat, x):  # one weight read twice (an RPN head over FPN levels): sums may reorder
        return (flat["w"] * x).sin().sum() + (flat["w"] @ x.T).sum(), ()
    w, x = {"w": torch.randn(4, 8, generator=torch.Generator().manual_seed(0))}, torch.randn(4, 8)
    got, want = (f(shared)(w, x)[0]["w"] for f in (step_lib.grad_and_value_traced_or_eager,
                                                    lambda fn: torch.func.grad_and_value(fn, has_aux=True)))
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_compile_failure_falls_back_to_eager_with_a_logged_reason(monkeypatch, caplog):
    monkeypatch.delenv("FPIPE_STRICT_COMPILE", raising=False)  # this test is about the fallback
    def broken_compile(fn, **kw):
        def run(*a):
            raise torch._dynamo.exc.BackendCompilerFailed(lambda *x: None, RuntimeError("no compiler"), None)
        return run
    monkeypatch.setattr(torch, "compile", broken_compile)
    f = step_lib.maybe_compile(lambda x: x + 1, True, "toy")
    with caplog.at_level("WARNING"):
        assert f(torch.tensor(1)) == 2
    assert f(torch.tensor(2)) == 3
    assert "torch.compile of the toy FAILED" in caplog.text and "EAGERLY" in caplog.text and "config.compile=False" in caplog.text

    def user_error(x):
        raise ValueError("a bug in the step, not in the compiler")
    with pytest.raises(ValueError, match="a bug in the step"):
        step_lib.maybe_compile(user_error, True)(torch.tensor(1))


def test_a_layout_check_failing_in_the_compiled_code_is_named_in_one_line(monkeypatch):
    """Inductor checks a fallback kernel's output strides at run time; where PyTorch's prediction is
    wrong (CUDA, 1x1 feature maps), the run stops with the cause and the fix, not a bare assert."""
    def mispredicted(fn, **kw):
        def run(*a):
            raise AssertionError("expected size 8==8, stride 9==1 at dim=1\n"
                                 "Error in op: torch.ops.aten.convolution_backward.default")
        return run
    monkeypatch.setattr(torch, "compile", mispredicted)
    with pytest.raises(RuntimeError, match=r"compiled toy stopped at its first call.*"
                       r"convolution_backward.*1x1.*config.compile=False"):
        step_lib.maybe_compile(lambda x: x + 1, True, "toy")(torch.tensor(1))

    def own_assert(fn, **kw):
        def run(*a):
            raise AssertionError("an assert of the step's own")
        return run
    monkeypatch.setattr(torch, "compile", own_assert)
    with pytest.raises(AssertionError, match="an assert of the step's own"):  # passes through as it is
        step_lib.maybe_compile(lambda x: x, True, "toy")(torch.tensor(1))


def _structure(t):
    return {k: _structure(v) for k, v in t.items()} if isinstance(t, dict) else None


@pytest.mark.parametrize("with_empty_dicts", [True, False])
def test_the_step_gives_back_the_model_state_structure_it_was_given(with_empty_dicts):
    """A stateless head (linear) must not add or drop empty dicts in the state: a compiled step's
    guards on the state's structure would fail on the next call and compile it again (seen in the
    linear-eval benchmark, whose state had lost its empty dicts through a flatten)."""
    from fpipe.train import frozen_trunk as ft_lib
    model, params, state, trainable, frozen = build((r"trunk\..*",), dict(fc=models.head_config("flatten")))
    if not with_empty_dicts:  # as after a checkpoint restore (flatten drops empty dicts)
        state = tree.unflatten(tree.flatten(state))
    eval_norms = freeze.eval_norms(state, frozen)
    opt = optim.build(optim_cfg(), trainable)
    ft = ft_lib.frozen_trunk(model, trainable, frozen, state, eval_norms, compile=False)
    steps = {"heads only": ft_lib.on_features(ft_lib.heads_only(step_lib.make_step(ft.model, opt, eval_norms=eval_norms)),
                                              ft.features),
             "whole model": step_lib.make_step(model, opt, eval_norms=eval_norms)}
    for name, step in steps.items():
        ts = {"trainable": trainable, "frozen": frozen, "model_state": state, "opt_state": opt.init(trainable)}
        for batch in batches(2):
            new, _ = step(ts, batch, torch.tensor(0.05))
            assert _structure(new) == _structure(ts), name
            ts = new


def test_a_model_returning_state_it_was_not_given_is_an_error_naming_it():
    """New state the input lacks (a leaf under a new or existing key) would change the step's
    structure; an empty dict the input lacks (a stateless layer's) is no state and is dropped."""
    given = {"bn1": {"running_mean": torch.zeros(2)}, "fc": {}}
    ok = {"bn1": {"running_mean": torch.ones(2)}, "head": {}}
    assert _structure(step_lib._like_input(given, ok)) == _structure(given)
    assert torch.equal(step_lib._like_input(given, ok)["bn1"]["running_mean"], torch.ones(2))
    extra_layer = {"bn1": {"running_mean": torch.ones(2)}, "bn2": {"running_var": torch.ones(2)}}
    extra_leaf = {"bn1": {"running_mean": torch.ones(2), "running_var": torch.ones(2)}}
    for new, name in [(extra_layer, "bn2"), (extra_leaf, "bn1.running_var")]:
        with pytest.raises(ValueError, match=f"was not given: {name}"):
            step_lib._like_input(given, new)


def test_a_param_both_trainable_and_frozen_is_an_error_not_a_silent_override():
    trainable = {"fc.weight": torch.ones(2)}
    assert torch.equal(step_lib.merged(trainable, {"trunk": {"w": torch.zeros(1)}})["fc"]["weight"], torch.ones(2))
    with pytest.raises(ValueError, match=r"both trainable and frozen: \['fc.weight'\]"):
        step_lib.merged(trainable, {"fc": {"weight": torch.zeros(2)}})
