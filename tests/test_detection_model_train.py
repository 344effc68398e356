"""fpipe.detection.model training: the losses run, are finite, reach the RPN and RoI heads, and a
frozen conv body (params and BatchNorm statistics) stays bit-identical through optimizer steps."""
import pytest
import torch
from torch.func import grad_and_value

from fpipe import freeze, optim, tree
from fpipe.detection import model as det_model


def tiny_config(mask=False, keypoints=False):
    cfg = det_model.default_config()
    cfg.backbone.name = "resnet18"
    cfg.fpn.out_channels = 32
    cfg.rpn.anchor_sizes = ((8,), (16,), (32,), (64,), (128,))
    cfg.rpn.pre_nms_top_n_train, cfg.rpn.post_nms_top_n_train = 100, 40
    cfg.rpn.pre_nms_top_n_test, cfg.rpn.post_nms_top_n_test = 100, 40
    cfg.rpn.batch_size_per_image = 64
    cfg.box_head.batch_size_per_image, cfg.box_head.representation_size = 32, 64
    cfg.mask_head.enabled, cfg.mask_head.layers, cfg.mask_head.dim_reduced = mask, (16, 16), 16
    cfg.keypoint_head.enabled, cfg.keypoint_head.layers, cfg.keypoint_head.num_keypoints = keypoints, (16, 16), 3
    return cfg


def tiny_batch(h=64, w=96, masks=False, keypoints=False):
    g = torch.Generator().manual_seed(3)
    boxes = torch.tensor([[[4., 6., 40., 30.], [30., 20., 80., 60.], [0., 0., 0., 0.]],
                          [[10., 10., 50., 50.], [0., 0., 0., 0.], [0., 0., 0., 0.]]])
    batch = {"image": torch.randn(2, 3, h, w, generator=g), "image_size": torch.tensor([[64, 96], [60, 70]]),
             "boxes": boxes, "labels": torch.tensor([[1, 2, 0], [3, 0, 0]]),
             "valid": torch.tensor([[True, True, False], [True, False, False]]), "index": torch.arange(2)}
    if masks:
        m = torch.zeros(2, 3, h, w, dtype=torch.uint8)
        for i in range(2):
            for j in range(3):
                x1, y1, x2, y2 = boxes[i, j].int().tolist()
                m[i, j, y1:y2, x1:x2] = 1
        batch["masks"] = m
    if keypoints:
        kp = torch.zeros(2, 3, 3, 3)
        kp[..., 0] = boxes[..., None, 0] + 5 + torch.arange(3.)
        kp[..., 1] = boxes[..., None, 1] + 4 + torch.arange(3.)
        kp[..., 2] = 2.0
        batch["keypoints"] = kp
    return batch


@pytest.mark.parametrize("mask,keypoints", [(False, False), (True, True)])
def test_losses_finite_and_gradients_reach_the_heads(mask, keypoints):
    model = det_model.build(tiny_config(mask, keypoints), 4)
    params, state = model.init(0)
    batch = tiny_batch(masks=mask, keypoints=keypoints)
    gen = torch.Generator().manual_seed(0)
    (total, losses) = model.losses(params, state, batch, generator=gen)
    want = {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg"}
    want |= {"loss_mask"} if mask else set()
    want |= {"loss_keypoint"} if keypoints else set()
    assert set(losses) == want
    assert all(torch.isfinite(v) for v in losses.values()) and torch.isfinite(total)
    grads, _ = grad_and_value(lambda p: model.losses(p, state, batch, generator=torch.Generator().manual_seed(0))[0])(
        params)
    flat = tree.flatten(grads)
    for prefix in ("rpn.head.", "roi_heads.box_head.", "roi_heads.box_predictor.", "backbone.fpn.",
                   "backbone.body.layer4.") + (("roi_heads.mask_predictor.",) if mask else ()) + \
            (("roi_heads.keypoint_predictor.",) if keypoints else ()):
        assert any(float(v.abs().sum()) > 0 for n, v in flat.items() if n.startswith(prefix)), prefix
    assert all(torch.isfinite(v).all() for v in flat.values())


def test_rpn_only_has_only_rpn_losses_and_proposals():
    cfg = tiny_config()
    cfg.rpn_only = True
    model = det_model.build(cfg, 4)
    params, state = model.init(0)
    assert "roi_heads" not in params
    _, losses = model.losses(params, state, tiny_batch(), generator=torch.Generator().manual_seed(0))
    assert set(losses) == {"loss_objectness", "loss_rpn_box_reg"}
    out = model.predict(params, state, tiny_batch()["image"], torch.tensor([[64, 96], [60, 70]]))
    assert len(out) == 2 and out[0]["boxes"].shape[1] == 4 and len(out[0]["boxes"]) <= 40


def test_predict_shapes_with_masks():
    model = det_model.build(tiny_config(mask=True), 4)
    params, state = model.init(0)
    model.config.box_head.score_thresh = 0.0
    out = model.predict(params, state, tiny_batch()["image"], torch.tensor([[64, 96], [60, 70]]))
    for d in out:
        assert d["boxes"].shape[0] == d["scores"].shape[0] == d["labels"].shape[0] == d["masks"].shape[0]
        assert d["masks"].shape[1:] == (1, 28, 28)


@pytest.mark.parametrize("rule", ["freeze_conv_body", "freeze_at"])
def test_frozen_body_and_bn_stats_stay_bit_identical(rule):
    cfg = tiny_config()
    cfg.backbone.freeze_conv_body = rule == "freeze_conv_body"
    cfg.backbone.freeze_at = 2
    model = det_model.build(cfg, 4)
    params, state = model.init(0)
    # non-trivial running statistics, so that "unchanged" means something
    state = tree.map_leaves(lambda t: t + 0.1 if t.is_floating_point() else t, state)
    rules = model.freeze_rules(params)
    trainable, frozen = freeze.partition(params, rules)
    names = set(tree.flatten(frozen))
    if rule == "freeze_conv_body":
        assert names == {n for n in tree.flatten(params) if n.startswith("backbone.body.")}
    else:  # stem + layer1, and every BatchNorm's scale/shift (FrozenBatchNorm2d)
        assert "backbone.body.conv1.weight" in names and "backbone.body.layer1.0.conv1.weight" in names
        assert "backbone.body.layer2.0.conv1.weight" not in names
        assert "backbone.body.layer4.1.bn2.weight" in names
    opt_cfg = optim.default_config()
    opt_cfg.lr, opt_cfg.momentum, opt_cfg.weight_decay, opt_cfg.wd_mults = 0.01, 0.9, 1e-4, ()
    opt = optim.build(opt_cfg, trainable)
    opt_state = opt.init(trainable)
    batch = tiny_batch()
    before_frozen = {n: v.clone() for n, v in tree.flatten(frozen).items()}
    before_state = {n: v.clone() for n, v in tree.flatten(state).items()}
    before_trainable = {n: v.clone() for n, v in tree.flatten(trainable).items()}

    def loss_fn(tr, fr, st, b, seed):
        gen = torch.Generator().manual_seed(seed)
        total, _, new_state = model.losses(tree.merge(tr, fr), st, b, generator=gen, return_state=True)
        return total, new_state

    for seed in range(2):
        grads, (loss, state) = grad_and_value(loss_fn, has_aux=True)(trainable, frozen, state, batch, seed)
        trainable, opt_state = opt.update(grads, opt_state, trainable, 0.01)
        assert torch.isfinite(loss)
    for n, v in tree.flatten(frozen).items():
        assert torch.equal(v, before_frozen[n]), n
    for n, v in tree.flatten(state).items():
        assert torch.equal(v, before_state[n]), n
    changed = [n for n, v in tree.flatten(trainable).items() if not torch.equal(v, before_trainable[n])]
    assert any(n.startswith("rpn.head.") for n in changed) and any(n.startswith("roi_heads.") for n in changed)


def test_losses_with_given_proposals_equal_eager_and_trace_as_one_graph():
    """With what is data-dependent computed outside (train_proposals: the RPN's NMS, the pooler's
    scales, the samplers' keys from the same generator), the losses equal the eager ones and the
    whole training loss, mask and keypoint heads included, traces without a graph break."""
    cfg = tiny_config(mask=True, keypoints=True)
    cfg.mask_head.target_max_grid = 4
    model = det_model.build(cfg, 4)
    params, state = model.init(0)
    batch = tiny_batch(masks=True, keypoints=True)
    given = model.train_proposals(params, state, batch, torch.Generator().manual_seed(5))
    assert given["boxes"].shape == (2, 40, 4) and given["valid"].dtype == torch.bool
    assert given["rpn_keys"].shape[0] == 2 and given["roi_keys"].shape == (2, 40 + 3)
    total, losses = model.losses(params, state, batch, proposals=given)
    eager, eager_losses = model.losses(params, state, batch, generator=torch.Generator().manual_seed(5))
    assert set(losses) == set(eager_losses) and all(torch.isfinite(v) for v in losses.values())
    for k in losses:
        torch.testing.assert_close(losses[k], eager_losses[k], rtol=1e-5, atol=1e-6, msg=k)
    other = model.train_proposals(params, state, batch, torch.Generator().manual_seed(6))
    assert not torch.equal(model.losses(params, state, batch, proposals=other)[0], total)  # the keys matter

    def fn(params, state, batch, given):
        return model.losses(params, state, batch, proposals=given)[0]

    torch._dynamo.reset()
    explained = torch._dynamo.explain(fn)(params, state, batch, given)
    assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons


def test_train_proposals_record_nothing_and_ignore_the_callers_grad_mode(monkeypatch):
    """train_proposals runs in gradient mode (the convs then take the routes of losses' gradient
    pass) over detached values: from params that require grad nothing is recorded, and under an
    outer torch.no_grad it gives the same proposals bit for bit."""
    from fpipe.models import layers
    model = det_model.build(tiny_config(), 4)
    params, state = model.init(0)
    batch = tiny_batch()
    grad_modes, real = [], layers._dense_beats_conv
    monkeypatch.setattr(layers, "_dense_beats_conv", lambda *a: grad_modes.append(torch.is_grad_enabled()) or real(*a))
    given = model.train_proposals(tree.map_leaves(lambda t: t.clone().requires_grad_(t.is_floating_point()), params),
                                  state, batch, torch.Generator().manual_seed(5))
    assert all(v.grad_fn is None and not v.requires_grad for v in given.values())
    with torch.no_grad():
        again = model.train_proposals(params, state, batch, torch.Generator().manual_seed(5))
    assert set(again) == set(given) and all(torch.equal(again[k], given[k]) for k in given)
    assert len(grad_modes) > 20 and all(grad_modes)  # every conv of both calls, in gradient mode


def test_compiled_detection_step_equals_the_eager_step(monkeypatch):
    """train.make_step(compiling=True): train_proposals eagerly, then one fullgraph-compiled update
    over losses(proposals=...) with the optimizer. Traced by AOTAutograd (backend aot_eager, the
    graph inductor would get; inductor itself compiles for minutes here) it gives the eager step's
    params, state and metrics bit for bit, with the same generator: the eager step with torch.func's
    grads, as traced (its own autograd.grad sums the shared RPN head's grads in another order)."""
    from fpipe import defaults, freeze, optim
    from fpipe.detection import train as det_train
    model = det_model.build(tiny_config(), 4)
    params, state = model.init(0)
    trainable, frozen = freeze.partition(params, model.freeze_rules(params))
    ocfg = defaults.optim()
    ocfg.update(dict(lr=0.1, momentum=0.9, weight_decay=1e-4, clip_grad_norm=10.0))
    opt = optim.build(ocfg, trainable)
    ts = {"trainable": trainable, "frozen": frozen, "model_state": state, "opt_state": opt.init(trainable)}
    batch, lr = tiny_batch(), torch.tensor(0.1)
    with monkeypatch.context() as m:
        m.setattr(torch.compiler, "is_compiling", lambda: True)  # the eager step on torch.func's path
        eager = det_train.make_step(model, opt)(ts, batch, lr, torch.Generator().manual_seed(1))
    torch._dynamo.reset()
    step = det_train.make_step(model, opt, compiling=True, compile_options={"backend": "aot_eager"})
    compiled = step(ts, batch, lr, torch.Generator().manual_seed(1))
    assert set(compiled[1]) == set(eager[1]) >= {"loss", "loss_classifier", "loss_objectness", "grad_norm"}
    as_tree = lambda out: {"state": out[0], "metrics": out[1]}  # noqa: E731
    for got, want in zip(tree.leaves(as_tree(compiled)), tree.leaves(as_tree(eager))):
        assert torch.equal(got, want)
    assert not torch.equal(compiled[0]["trainable"]["rpn"]["head"]["conv"]["0"]["0"]["weight"],
                           ts["trainable"]["rpn"]["head"]["conv"]["0"]["0"]["weight"])  # it did train


def test_fpn_levels_narrow_what_the_rpn_and_the_roi_heads_read(monkeypatch):
    """fpn.rpn_levels / roi_levels (Detectron's FPN.RPN_MIN/MAX_LEVEL, ROI_MIN/MAX_LEVEL): the
    explicit defaults change nothing; narrowed, the RPN's anchors and the poolers' inputs are
    those levels only; bad spans are one-line errors naming the levels there are."""
    batch = tiny_batch(masks=True)
    gen = lambda: torch.Generator().manual_seed(2)  # noqa: E731

    def run(**fpn):
        cfg = tiny_config(mask=True)
        cfg.fpn.update(fpn)
        if fpn.get("rpn_levels"):
            n = fpn["rpn_levels"][1] - fpn["rpn_levels"][0] + 1
            cfg.rpn.anchor_sizes, cfg.rpn.aspect_ratios = cfg.rpn.anchor_sizes[:n], cfg.rpn.aspect_ratios[:n]
        model = det_model.build(cfg, 4)
        params, state = model.init(0)
        pooled_from = []
        real = det_model.multiscale_roi_align
        monkeypatch.setattr(det_model, "multiscale_roi_align",
                            lambda feats, *a, **k: pooled_from.append([f.shape[-1] for f in feats]) or real(feats, *a, **k))
        given = model.train_proposals(params, state, batch, gen())
        _, losses = model.losses(params, state, batch, generator=gen())
        monkeypatch.setattr(det_model, "multiscale_roi_align", real)
        return given, losses, pooled_from

    base = run()
    explicit = run(rpn_levels=(2, 6), roi_levels=(2, 5))
    assert all(torch.equal(base[1][k], explicit[1][k]) for k in base[1])
    assert base[2][0] == [24, 12, 6, 3]  # a 96-px-wide batch: P2-P5 (strides 4-32)
    narrow = run(rpn_levels=(3, 6), roi_levels=(4, 5))
    per_level = [h * w * 3 for h, w in ((16, 24), (8, 12), (4, 6), (2, 3), (1, 2))]  # P2-P6 of 64×96, 3 ratios
    assert base[0]["rpn_keys"].shape[1] == sum(per_level)
    assert narrow[0]["rpn_keys"].shape[1] == sum(per_level[1:])
    assert narrow[2] and all(widths == [6, 3] for widths in narrow[2])  # box and mask poolers: P4, P5
    assert not torch.equal(narrow[1]["loss_classifier"], base[1]["loss_classifier"])
    cfg = tiny_config()
    cfg.fpn.roi_levels = (1, 5)
    with pytest.raises(ValueError, match=r"no FPN level \[1\] \(levels here: 2-6"):
        det_model.build(cfg, 4)
    cfg.fpn.roi_levels, cfg.fpn.rpn_levels = None, (3, 6)
    with pytest.raises(ValueError, match="need 4 entries each, got 5 and 5"):
        det_model.build(cfg, 4)


@pytest.mark.parametrize("name", ["regnet_y_400mf", "convnext_tiny"])
def test_other_trunks_feed_the_fpn(name):
    """Any fpipe trunk with res2..res5 features is a backbone: RegNetY (frozen BatchNorms) and
    ConvNeXt (LayerNorm) train through FPN, RPN and box head, and predict."""
    cfg = tiny_config()
    cfg.backbone.name, cfg.backbone.freeze_at = name, 0
    model = det_model.build(cfg, 4)
    params, state = model.init(0)
    trainable, frozen = freeze.partition(params, model.freeze_rules(params))
    batch = tiny_batch()

    def loss(trainable):
        return model.losses(tree.merge(trainable, frozen), state, batch, generator=torch.Generator().manual_seed(0))[0]

    grads, total = grad_and_value(loss)(trainable)
    assert torch.isfinite(total)
    body = tree.flatten(grads["backbone"]["body"])
    assert body and all(torch.isfinite(g).all() for g in body.values())
    assert sum(float(g.abs().sum()) for g in body.values()) > 0  # the gradient reaches the trunk
    if name.startswith("regnet"):  # frozen BatchNorms: their scale and shift are not trained
        norms = [n[:-len(".running_mean")] for n in tree.flatten(state["backbone"]["body"]) if n.endswith("running_mean")]
        assert len(norms) > 10 and not [n for n in norms if f"{n}.weight" in body or f"{n}.bias" in body]
        assert all(f"{n}.weight" in tree.flatten(frozen["backbone"]["body"]) for n in norms)
    assert len(model.predict(params, state, batch["image"], batch["image_size"])) == 2


def test_no_detections_and_no_gt_are_handled():
    cfg = tiny_config(mask=True, keypoints=True)
    cfg.box_head.score_thresh = 1.0  # nothing passes
    model = det_model.build(cfg, 4)
    params, state = model.init(0)
    batch = tiny_batch(masks=True, keypoints=True)
    for d in model.predict(params, state, batch["image"], batch["image_size"]):
        assert d["boxes"].shape == (0, 4) and d["masks"].shape == (0, 1, 28, 28) and d["keypoints"].shape == (0, 3, 3)
    batch["valid"][:] = False  # images without any gt: background-only losses, box terms 0
    _, losses = model.losses(params, state, batch, generator=torch.Generator().manual_seed(0))
    assert all(torch.isfinite(v) for v in losses.values())
    assert float(losses["loss_rpn_box_reg"]) == float(losses["loss_box_reg"]) == float(losses["loss_mask"]) == 0.0
