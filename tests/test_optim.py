"""fpipe.optim against torch.optim (SGD, AdamW, clip_grad_norm_) and a per-tensor LARS reference."""
import io
import math

import pytest
import torch

from fpipe import optim, tree
from fpipe.tree import flatten, unflatten

SHAPES = {
    "trunk.conv1.weight": (4, 3, 3, 3),
    "trunk.bn1.weight": (4,),
    "trunk.bn1.bias": (4,),
    "trunk.layer1.0.conv1.weight": (4, 4, 3, 3),
    "trunk.layer1.0.downsample.0.weight": (4, 4, 1, 1),
    "trunk.layer1.0.downsample.1.weight": (4,),
    "trunk.layer1.0.downsample.1.bias": (4,),
    "heads.res5avg.clf.weight": (5, 4),
    "heads.res5avg.clf.bias": (5,),
}
# Written out by hand, independently of optim's regexes.
NO_DECAY = {"trunk.bn1.weight", "trunk.bn1.bias", "trunk.layer1.0.downsample.1.weight",
            "trunk.layer1.0.downsample.1.bias", "heads.res5avg.clf.bias"}
HEAD = {"heads.res5avg.clf.weight", "heads.res5avg.clf.bias"}
STEPS = 60


def _params(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return unflatten({n: torch.randn(s, generator=gen) for n, s in SHAPES.items()})


def _grads(gen):
    return unflatten({n: torch.randn(s, generator=gen) for n, s in SHAPES.items()})


def _lr(step):
    return 0.01 + 0.04 * (1 + math.cos(math.pi * step / STEPS)) / 2  # changes every step.


def _config(**kw):
    c = optim.default_config()
    c.lr_mults = [("heads\\..*", 10.0)]
    c.update(kw)
    return c


def _run_ours(cfg, params, steps=STEPS, seed=1, in_place=False):
    """fpipe's update; ``in_place``: PyTorch's fused kernels writing into (a copy of) ``params``."""
    opt = optim.build(cfg, params)
    params = tree.map_leaves(torch.clone, params) if in_place else params
    state, gen = opt.init(params), torch.Generator().manual_seed(seed)
    for step in range(steps):
        given = tree.leaves(params)
        params, state = opt.update(_grads(gen), state, params, opt.inputs(_lr(step)), in_place=in_place)
        assert all(a is b for a, b in zip(given, tree.leaves(params))) == in_place
    return flatten(params)


def _run_torch(make_opt, params, steps=STEPS, seed=1):
    """torch.optim with one param group per tensor; lr_mult 10 on the head, wd 0 on NO_DECAY."""
    ref = {n: torch.nn.Parameter(t.clone()) for n, t in flatten(params).items()}
    groups = [{"params": [p], "name": n} for n, p in ref.items()]
    opt = make_opt(groups)
    decay = opt.defaults["weight_decay"]
    gen = torch.Generator().manual_seed(seed)
    for step in range(steps):
        for group, (n, g) in zip(opt.param_groups, flatten(_grads(gen)).items()):
            group["lr"] = _lr(step) * (10.0 if n in HEAD else 1.0)
            group["weight_decay"] = 0.0 if n in NO_DECAY else decay
            group["params"][0].grad = g
        opt.step()
    return {n: p.detach() for n, p in ref.items()}


def _assert_close(ours, ref):
    assert ours.keys() == ref.keys()
    for n in ref:
        torch.testing.assert_close(ours[n], ref[n], rtol=1e-5, atol=1e-6, msg=n)


@pytest.mark.parametrize("in_place", [False, True])
@pytest.mark.parametrize("momentum,nesterov,wd", [(0.9, False, 1e-2), (0.9, True, 5e-2),
                                                  (0.0, False, 1e-2)])
def test_sgd_matches_torch(momentum, nesterov, wd, in_place):
    params = _params()
    cfg = _config(name="sgd", momentum=momentum, nesterov=nesterov, weight_decay=wd)
    ref = _run_torch(lambda g: torch.optim.SGD(g, lr=0.1, momentum=momentum, nesterov=nesterov,
                                               weight_decay=wd, foreach=False), params)
    ours = _run_ours(cfg, params, in_place=in_place)
    assert not torch.allclose(ours["trunk.conv1.weight"], flatten(params)["trunk.conv1.weight"])
    _assert_close(ours, ref)


@pytest.mark.parametrize("in_place", [False, True])
@pytest.mark.parametrize("betas,wd", [((0.9, 0.999), 0.05), ((0.8, 0.95), 0.0)])
def test_adamw_matches_torch(betas, wd, in_place):
    params = _params()
    cfg = _config(name="adamw", betas=betas, weight_decay=wd, eps=1e-6)
    ref = _run_torch(lambda g: torch.optim.AdamW(g, lr=0.1, betas=betas, eps=1e-6,
                                                 weight_decay=wd, foreach=False), params)
    _assert_close(_run_ours(cfg, params, in_place=in_place), ref)


@pytest.mark.parametrize("name,dtype", [("lars", torch.float32), ("sgd", torch.float64)])
def test_in_place_falls_back_to_new_tensors_where_no_fused_kernel_applies(name, dtype):
    """LARS has no fused kernel, float64 none of ours: ``in_place`` then changes nothing."""
    params = tree.map_leaves(lambda t: t.to(dtype), _params())
    cfg = _config(name=name, momentum=0.9, weight_decay=1e-2)
    opt = optim.build(cfg, params)
    state, grads = opt.init(params), _grads(torch.Generator().manual_seed(1))
    grads = tree.map_leaves(lambda t: t.to(dtype), grads)
    before = tree.map_leaves(torch.clone, params)
    new, _ = opt.update(grads, state, params, opt.inputs(0.1), in_place=True)
    expected, _ = opt.update(grads, state, params, opt.inputs(0.1))
    for (n, a), b, c in zip(flatten(new).items(), tree.leaves(expected), tree.leaves(params)):
        assert torch.equal(a, b) and a is not c, n
    for a, b in zip(tree.leaves(params), tree.leaves(before)):
        assert torch.equal(a, b)


def test_update_takes_trees_nested_or_flat_in_any_order_and_names_what_does_not_fit():
    """Grads and params as nested trees or flat dicts, in any key order, give the same update; a
    missing or unknown name is an error that names it."""
    params, grads = _params(), _grads(torch.Generator().manual_seed(1))
    opt = optim.build(_config(momentum=0.9, weight_decay=1e-2), params)
    state = opt.init(params)
    expected, _ = opt.update(grads, state, params, opt.inputs(0.1))
    reordered = dict(reversed(list(flatten(grads).items())))
    for g, p in [(flatten(grads), flatten(params)), (reordered, params)]:
        new, _ = opt.update(g, state, p, opt.inputs(0.1))
        for (n, a), b in zip(flatten(new).items(), tree.leaves(expected)):
            assert torch.equal(a, b), n
    missing = {n: g for n, g in flatten(grads).items() if n != "trunk.bn1.bias"}
    with pytest.raises(ValueError, match=r"grads do not match.*missing \['trunk.bn1.bias'\]"):
        opt.update(missing, state, params, opt.inputs(0.1))
    with pytest.raises(ValueError, match=r"unexpected \['extra.weight'\]"):
        opt.update({**flatten(grads), "extra.weight": torch.zeros(1)}, state, params, opt.inputs(0.1))


def _lars_reference(params, momentum, nesterov, wd, eta, steps=STEPS, seed=1):
    """LARS written as an optimizer over nn.Parameters: trust ratio per tensor in Python floats,
    then plain torch.optim.SGD (no weight decay) on the rescaled grads, as LARC wraps SGD."""
    module = torch.nn.Module()
    names = list(flatten(params))
    for i, (n, t) in enumerate(flatten(params).items()):
        module.register_parameter(f"p{i}", torch.nn.Parameter(t.clone()))
    plist = list(module.parameters())
    sgd = torch.optim.SGD([{"params": [p]} for p in plist], lr=0.1, momentum=momentum,
                          nesterov=nesterov)
    gen = torch.Generator().manual_seed(seed)
    for step in range(steps):
        grads = flatten(_grads(gen))
        for group, p, n in zip(sgd.param_groups, plist, names):
            excluded = n in NO_DECAY
            d = grads[n] + (0.0 if excluded else wd) * p.detach()
            p_norm, d_norm = p.detach().norm().item(), d.norm().item()
            trust = eta * p_norm / d_norm if not excluded and p_norm > 0 and d_norm > 0 else 1.0
            p.grad = d * trust
            group["lr"] = _lr(step) * (10.0 if n in HEAD else 1.0)
        sgd.step()
    return {n: p.detach() for n, p in zip(names, plist)}


@pytest.mark.parametrize("nesterov", [False, True])
def test_lars_matches_reference(nesterov):
    params = _params()
    cfg = _config(name="lars", momentum=0.9, nesterov=nesterov, weight_decay=1e-2, lars_eta=0.02)
    ref = _lars_reference(params, 0.9, nesterov, 1e-2, 0.02)
    _assert_close(_run_ours(cfg, params), ref)


def test_lars_one_step_by_hand():
    # |w| = 5 and, with wd 0.5, d = g + 0.5 w = (0.6, 0.8) + (1.5, 2) = (2.1, 2.8): |d| = 3.5.
    params = {"fc": {"weight": torch.tensor([[3.0, 4.0]]), "bias": torch.tensor([1.0])},
              "zero": {"weight": torch.zeros(1, 2)}}
    grads = {"fc": {"weight": torch.tensor([[0.6, 0.8]]), "bias": torch.tensor([2.0])},
             "zero": {"weight": torch.tensor([[1.0, 1.0]])}}
    cfg = _config(name="lars", momentum=0.9, weight_decay=0.5, lars_eta=0.1, lr_mults=[])
    opt = optim.build(cfg, params)
    new, state = opt.update(grads, opt.init(params), params, torch.tensor(2.0))
    trust = 0.1 * 5 / 3.5
    torch.testing.assert_close(new["fc"]["weight"], torch.tensor([[3 - 2 * trust * 2.1,
                                                                   4 - 2 * trust * 2.8]]))
    torch.testing.assert_close(new["fc"]["bias"], torch.tensor([1.0 - 2 * 2.0]))  # excluded: plain SGD
    torch.testing.assert_close(new["zero"]["weight"], torch.tensor([[-2.0, -2.0]]))  # |w|=0: trust 1
    torch.testing.assert_close(state["momentum"]["fc"]["bias"], torch.tensor([2.0]))


def test_default_rules_recognise_norms_and_biases_by_name():
    no_decay = ["trunk.bn1.weight", "trunk.layer4.2.bn3.weight", "trunk.layer1.0.downsample.1.weight",
                "heads.mlp.channel_bn.weight", "encoder.layers.encoder_layer_0.ln_1.weight",
                "encoder.ln.weight", "blocks.0.norm1.weight", "stem.gn.weight", "trunk.conv1.bias",
                "heads.res5avg.clf.bias", "bias"]
    decay = ["trunk.conv1.weight", "trunk.layer1.0.downsample.0.weight", "trunk.fc.weight",
             "heads.res5avg.clf.weight", "trunk.abn1.weight", "trunk.bn1.weight_extra"]
    params = unflatten({n: torch.zeros(2) for n in no_decay + decay})
    opt = optim.build(_config(name="lars", weight_decay=0.1), params)
    assert {n for n, h in opt.hyper.items() if h["wd"] == 0} == set(no_decay)
    assert {n for n, h in opt.hyper.items() if h["lars_exclude"]} == set(no_decay)
    assert {n for n, h in opt.hyper.items() if h["lr_mult"] == 10.0} == {"heads.mlp.channel_bn.weight",
                                                                         "heads.res5avg.clf.bias",
                                                                         "heads.res5avg.clf.weight"}


def test_first_rule_wins_and_describe_lists_matches():
    params = _params()
    cfg = _config(lr_mults=[("heads\\..*\\.bias", 0.5), ("heads\\..*", 10.0), ("nothing", 3.0)],
                  weight_decay=1e-4)
    opt = optim.build(cfg, params)
    assert opt.hyper["heads.res5avg.clf.bias"]["lr_mult"] == 0.5
    assert opt.hyper["heads.res5avg.clf.weight"]["lr_mult"] == 10.0
    assert opt.hyper["trunk.conv1.weight"]["lr_mult"] == 1.0
    assert opt.hyper["trunk.conv1.weight"]["wd"] == pytest.approx(1e-4)
    text = "\n".join(opt.describe())
    assert "'heads\\..*\\.bias' -> 0.5: 1 params: heads.res5avg.clf.bias" in text
    assert "'nothing' -> 3.0: 0 params: matched nothing" in text
    assert "default -> 1.0: 7 params" in text


@pytest.mark.parametrize("change,message", [
    (dict(name="adam"), "valid: sgd, adamw, lars"),
    (dict(lr_mults=[("heads\\..*", -1.0)]), "heads"),
    (dict(lr_mults=[("heads(", 2.0)]), "bad regex"),
    (dict(lr_mults=["heads"]), "(regex, value) pair"),
    (dict(name="lars", lars_exclude=[(".*bias", 0.0)]), "True or False"),
    (dict(momentum=0.0, nesterov=True), "nesterov"),
    (dict(weight_decay=-1e-4), "weight_decay must be >= 0"),
])
def test_config_errors(change, message):
    with pytest.raises(ValueError, match=message.replace("(", "\\(").replace(")", "\\)")):
        optim.build(_config(**change), _params())


def test_param_and_tree_errors_name_the_param():
    with pytest.raises(ValueError, match="trunk.count"):
        optim.build(_config(), {"trunk": {"count": torch.zeros((), dtype=torch.int64)}})
    params = _params()
    opt = optim.build(_config(), params)
    grads = flatten(params)
    del grads["heads.res5avg.clf.bias"]
    with pytest.raises(ValueError, match="heads.res5avg.clf.bias"):
        opt.update(unflatten(grads), opt.init(params), params, torch.tensor(0.1))


@pytest.mark.parametrize("name", ["sgd", "adamw", "lars"])
def test_update_is_pure_and_state_survives_save(name):
    params = _params()
    opt = optim.build(_config(name=name, weight_decay=1e-3), params)
    gen = torch.Generator().manual_seed(3)
    state = opt.init(params)
    params, state = opt.update(_grads(gen), state, params, torch.tensor(0.1))
    before = {k: v.clone() for k, v in flatten({"p": params, "s": state}).items()}
    grads = _grads(gen)
    new_params, new_state = opt.update(grads, state, params, torch.tensor(0.1))
    for k, v in flatten({"p": params, "s": state}).items():  # inputs untouched
        assert torch.equal(v, before[k]), k
    buffer = io.BytesIO()
    torch.save({"params": params, "state": state}, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer)
    again = opt.update(grads, loaded["state"], loaded["params"], torch.tensor(0.1))
    for k, v in flatten({"p": new_params, "s": new_state}).items():
        assert torch.equal(v, flatten({"p": again[0], "s": again[1]})[k]), k
    assert int(new_state["count"]) == 2


def test_frozen_params_get_no_state():
    trainable = {"heads": flatten(_params())["heads.res5avg.clf.weight"]}
    state = optim.build(_config(name="adamw"), trainable).init(trainable)
    assert set(flatten(state)) == {"count", "mu.heads", "nu.heads"}
    assert optim.build(_config(momentum=0.0), trainable).init(trainable).keys() == {"count"}


@pytest.mark.parametrize("name", ["sgd", "lars", "adamw"])
def test_one_compile_serves_every_value_of_the_hyper_parameters(name):
    """The lr, weight decay, momentum, betas, eps and LARS eta are inputs of the compiled update
    (``opt.inputs``): other values need no new compile and give what an optimizer built with them gives.
    Through AOTAutograd (whose pass turns scalars back into tensors) as inductor compiles it: a value read
    out of a tensor input there makes Dynamo restart with it a constant (and fails an ahead-of-time compile)."""
    from torch._dynamo.testing import CompileCounterWithBackend
    params = _params()
    counter = CompileCounterWithBackend("aot_eager")
    first = dict(weight_decay=1e-2, momentum=0.9, betas=(0.9, 0.999), eps=1e-8, lars_eta=1e-3)
    compiled = torch.compile(optim.build(_config(name=name, **first), params).update, backend=counter,
                             fullgraph=True)
    for numbers in [first, dict(weight_decay=5e-2, momentum=0.5, betas=(0.5, 0.9), eps=1e-3, lars_eta=0.2)]:
        opt = optim.build(_config(name=name, **numbers), params)
        ours, eager, gen = (params, opt.init(params)), (params, opt.init(params)), torch.Generator().manual_seed(1)
        for i in range(3):
            grads = _grads(gen)
            ours = compiled(grads, ours[1], ours[0], opt.inputs(_lr(i)))
            eager = opt.update(grads, eager[1], eager[0], torch.tensor(_lr(i)))  # the config's numbers
        _assert_close(flatten(ours[0]), flatten(eager[0]))
        assert not torch.equal(flatten(ours[0])["trunk.conv1.weight"], flatten(params)["trunk.conv1.weight"])
    assert counter.frame_count == 1


@pytest.mark.parametrize("max_norm", [0.5, 1e3])
def test_clip_grad_norm_matches_torch(max_norm):
    grads = _grads(torch.Generator().manual_seed(5))
    ref = [torch.nn.Parameter(torch.zeros(s)) for s in SHAPES.values()]
    for p, g in zip(ref, flatten(grads).values()):
        p.grad = g.clone()
    ref_norm = torch.nn.utils.clip_grad_norm_(ref, max_norm)
    clipped, norm = optim.clip_and_norm(grads, {"clip_grad_norm": max_norm})
    torch.testing.assert_close(norm, ref_norm)
    for p, g in zip(ref, flatten(clipped).values()):
        torch.testing.assert_close(g, p.grad)
    assert (max_norm < norm) == (not torch.equal(flatten(clipped)["trunk.conv1.weight"],
                                                 flatten(grads)["trunk.conv1.weight"]))


def test_compiled_clip_grad_norm_matches_torch_without_foreach_norm():
    """Compiled for the CPU, the norm is per-leaf reductions inductor writes itself (it has no
    lowering for ``_foreach_norm``): the same norm and clipped grads as torch's, channels-last
    leaves included."""
    grads = tree.map_leaves(lambda g: g.contiguous(memory_format=torch.channels_last) if g.dim() == 4 else g,
                            _grads(torch.Generator().manual_seed(7)))
    ref = [torch.nn.Parameter(torch.zeros_like(g)) for g in flatten(grads).values()]
    for p, g in zip(ref, flatten(grads).values()):
        p.grad = g.clone()
    ref_norm = torch.nn.utils.clip_grad_norm_(ref, 0.5)
    traced = []

    def recording_inductor(gm, example_inputs):
        traced.extend(n.target for n in gm.graph.nodes if n.op == "call_function")
        return torch._inductor.compile(gm, example_inputs)

    torch._dynamo.reset()
    clip = torch.compile(lambda g: optim.clip_and_norm(g, {"clip_grad_norm": 0.5}), backend=recording_inductor)
    clipped, norm = clip(grads)
    assert torch._foreach_norm not in traced and torch.linalg.vector_norm in traced
    torch.testing.assert_close(norm, ref_norm)
    for p, g in zip(ref, flatten(clipped).values()):
        torch.testing.assert_close(g, p.grad)


def test_clip_grad_value_and_norm_when_off():
    grads = _grads(torch.Generator().manual_seed(6))
    flat = list(flatten(grads).values())
    expected = torch.cat([g.flatten() for g in flat]).norm()
    same, norm = optim.clip_and_norm(grads, optim.default_config())
    torch.testing.assert_close(norm, expected)
    assert all(a is b for a, b in zip(flatten(same).values(), flat))
    clipped, norm = optim.clip_and_norm(grads, {"clip_grad_value": 0.3})
    torch.testing.assert_close(norm, expected)  # the norm before clipping
    ref = [torch.nn.Parameter(torch.zeros_like(g)) for g in flat]
    for p, g in zip(ref, flat):
        p.grad = g.clone()
    torch.nn.utils.clip_grad_value_(ref, 0.3)
    for p, g in zip(ref, flatten(clipped).values()):
        torch.testing.assert_close(g, p.grad)
    with pytest.raises(ValueError, match="not both"):
        optim.clip_and_norm(grads, {"clip_grad_norm": 1.0, "clip_grad_value": 0.3})


@pytest.mark.parametrize("key", ["clip_grad_norm", "clip_grad_value"])
def test_one_compile_serves_every_clipping_bound(key):
    """The bound is an input of the step (``opt.inputs``): another bound needs no new compile and
    clips as torch's ``clip_grad_norm_`` / ``clip_grad_value_`` do with it."""
    from torch._dynamo.testing import CompileCounterWithBackend
    params = _params()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = None
    for bound in (0.5, 0.01):
        opt = optim.build(_config(**{key: bound}), params)
        compiled = compiled or torch.compile(opt.clip_and_norm, backend=counter, fullgraph=True)
        grads = _grads(torch.Generator().manual_seed(8))
        clipped, norm = compiled(grads, opt.inputs(0.1))
        ref = [torch.nn.Parameter(torch.zeros_like(g)) for g in flatten(grads).values()]
        for p, g in zip(ref, flatten(grads).values()):
            p.grad = g.clone()
        clip_ = torch.nn.utils.clip_grad_norm_ if key == "clip_grad_norm" else torch.nn.utils.clip_grad_value_
        clip_(ref, bound)
        for p, g in zip(ref, flatten(clipped).values()):
            torch.testing.assert_close(g, p.grad)
        assert not torch.equal(flatten(clipped)["trunk.conv1.weight"], flatten(grads)["trunk.conv1.weight"])
    assert counter.frame_count == 1


def test_scaled_lr():
    cfg = optim.default_config()
    cfg.lr = 0.3
    assert optim.scaled_lr(cfg, 4096)[0] == 0.3
    cfg.scale_lr = True
    lr, message = optim.scaled_lr(cfg, 4096)
    assert lr == pytest.approx(0.3 * 16) and "4.8" in message and "4096/256" in message
    cfg.reference_batch_size = 512
    assert optim.scaled_lr(cfg, 128)[0] == pytest.approx(0.075)
    with pytest.raises(ValueError, match="scale_lr"):
        optim.scaled_lr({"lr": 0.1, "scale_lr": "sqrt"}, 256)


def test_lr_mult_none_is_accepted_only_for_params_partitioned_out():
    params = {"a": torch.zeros(2), "b": torch.zeros(2)}
    cfg = optim.default_config()
    cfg.lr_mults = (("a", None),)
    optim.build(cfg, {"b": params["b"]})  # "a" was frozen by the partition: fine
    with pytest.raises(ValueError, match="freezes"):
        optim.build(cfg, params)


@pytest.mark.parametrize("preset", ["resnet18", "regnet_y_400mf", "regnet_x_400mf", "efficientnet_b0",
                                    "convnext_tiny", "convnextv2_atto", "alexnet", "vit_b_16",
                                    "vit_small_patch14_reg4_dinov2", "swin_t", "swin_v2_t"])
def test_default_rules_spare_every_norm_bias_and_embedding_of_every_family(preset):
    """Default weight decay (and LARS) touch conv and linear weights only, whatever the family:
    every 1-D param (norms, biases, layer scales, GRN) and ViT's tokens / position embedding, and
    Swin's relative position bias tables, V2's logit scales and position-bias MLP (as timm and the
    original exclude them) are spared."""
    from fpipe import defaults
    from fpipe.models import model as model_lib
    params, _ = model_lib.build_trunk(preset).init(0)
    flat = tree.flatten({"trunk": params})
    cfg = defaults.optim()
    cfg.weight_decay = 1.0
    hyper = optim.build(cfg, {"trunk": params}).hyper
    spared = {n for n in flat if hyper[n]["wd"] == 0.0}
    embeddings = {n for n in flat if n.rsplit(".", 1)[-1] in ("class_token", "register_tokens", "pos_embedding",
                                                               "layer_scale", "gamma", "relative_position_bias_table",
                                                               "logit_scale")} | {n for n in flat if ".cpb_mlp." in n}
    assert spared == {n for n, t in flat.items() if t.ndim <= 1} | embeddings


# ---------------------------------------------------------------- layer-wise lr decay (BEiT, MAE)
VIT_SHAPES = {"trunk.class_token": (1, 1, 4), "trunk.conv_proj.weight": (4, 3, 2, 2),
              "trunk.encoder.pos_embedding": (1, 5, 4),
              **{f"trunk.encoder.layers.encoder_layer_{i}.{leaf}": (4, 4) for i in range(3)
                 for leaf in ("self_attention.in_proj_weight", "mlp.0.weight")},
              "trunk.fc_norm.weight": (4,), "heads.fc.weight": (5, 4)}


def _vit_layer_mult(name, decay):
    """BEiT's get_num_layer_for_vit written out: the tokens and patch embedding are layer 0,
    block i is layer i + 1, the rest layer depth + 1; lr scale decay^(depth + 1 - layer)."""
    depth = 3
    if name.startswith("trunk.encoder.layers.encoder_layer_"):
        layer = int(name.split(".")[3].rsplit("_", 1)[1]) + 1
    elif name in ("trunk.class_token", "trunk.conv_proj.weight", "trunk.encoder.pos_embedding"):
        layer = 0
    else:
        layer = depth + 1
    return decay ** (depth + 1 - layer)


@pytest.mark.parametrize("in_place", [False, True])
def test_layer_decay_matches_torch_sgd_with_beits_per_layer_lrs(in_place):
    gen = torch.Generator().manual_seed(0)
    params = unflatten({n: torch.randn(s, generator=gen) for n, s in VIT_SHAPES.items()})
    cfg = _config(layer_decay=0.5, lr_mults=[("heads\\..*", 10.0)], momentum=0.9, weight_decay=0.0)
    opt = optim.build(cfg, params)
    params_in = tree.map_leaves(torch.clone, params)
    state = opt.init(params_in)
    grads = [unflatten({n: torch.randn(s, generator=gen) for n, s in VIT_SHAPES.items()}) for _ in range(5)]
    for step, g in enumerate(grads):
        params_in, state = opt.update(g, state, params_in, opt.inputs(_lr(step)), in_place=in_place)
    ref = {n: torch.nn.Parameter(t.clone()) for n, t in flatten(params).items()}
    torch_opt = torch.optim.SGD([{"params": [p], "name": n} for n, p in ref.items()], lr=0.1, momentum=0.9)
    for step, g in enumerate(grads):
        for group, (n, grad) in zip(torch_opt.param_groups, flatten(g).items()):
            group["lr"] = _lr(step) * _vit_layer_mult(n, 0.5) * (10.0 if n.startswith("heads.") else 1.0)
            group["params"][0].grad = grad
        torch_opt.step()
    _assert_close(flatten(params_in), {n: p.detach() for n, p in ref.items()})
    assert any("layer_decay 0.5 over vit's 3 blocks" in line for line in opt.describe())


def test_layer_decay_counts_frozen_blocks_and_refuses_trunks_without_vit_blocks():
    gen = torch.Generator().manual_seed(0)
    all_params = {n: torch.randn(s, generator=gen) for n, s in VIT_SHAPES.items()}
    early = {n: t for n, t in all_params.items() if "encoder_layer_2" not in n}  # the last block frozen
    opt = optim.build(_config(layer_decay=0.5, lr_mults=[]), unflatten(early), model_names=list(all_params))
    assert opt.hyper["trunk.encoder.layers.encoder_layer_1.mlp.0.weight"]["lr_mult"] == 0.5 ** 2
    assert opt.hyper["trunk.class_token"]["lr_mult"] == 0.5 ** 4
    with pytest.raises(ValueError, match="optim.layer_decay numbers the layers of ViT, Swin and ConvNeXt"):
        optim.build(_config(layer_decay=0.5), _params())
    with pytest.raises(ValueError, match=r"optim.layer_decay must be in \(0, 1\]"):
        optim.build(_config(layer_decay=1.5), {})
    assert optim.build(_config(layer_decay=1.0), _params()).layer_decay_note is None
