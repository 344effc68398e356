"""config.ema: the average of the trained weights against torch.optim.swa_utils.AveragedModel, and
as a run uses it: evaluated beside the live weights, resumed bit for bit, loaded by select='ema'."""
import json
import re

import ml_collections
import pytest
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from fpipe import defaults, freeze, optim, tree, weights
from fpipe.models import model as models
from fpipe.train import config_check, donation, ema
from fpipe.train import step as step_lib
from _workdirs import rewound_copy
from test_main import main


def ema_config(**values):
    c = defaults.ema()
    c.update(values)
    return c


class Mirror(torch.nn.Module):
    """The live weights as an nn.Module's parameters and buffers, in the average's order."""

    def __init__(self, average):
        super().__init__()
        self.names = list(average["params"]), list(average["model_state"])
        self.params = torch.nn.ParameterList([t.clone() for t in average["params"].values()])
        for i, t in enumerate(average["model_state"].values()):
            self.register_buffer(f"b{i}", t.clone())

    def load(self, train_state):
        live = tree.flatten(train_state["trainable"]), tree.flatten(train_state["model_state"])
        with torch.no_grad():
            for p, name in zip(self.params, self.names[0]):
                p.copy_(live[0][name])
            for b, name in zip(self.buffers(), self.names[1]):
                b.copy_(live[1][name])


def test_the_average_is_torchs_averaged_model_over_a_donating_steps_updates():
    """A trunk stage and the head train (BatchNorm statistics and counters move) with the step the
    loop builds for SGD, which writes its new weights into the old tensors: the average must not
    alias them. Floats equal AveragedModel's EMA exactly; counters are the live ones."""
    cfg = ml_collections.ConfigDict(dict(trunk=models.trunk_config(depth=18),
                                         heads=dict(fc=models.head_config("flatten"))))
    model = models.build(cfg, num_classes=5, image_size=32)
    params, model_state = model.init(0)
    trainable, frozen = freeze.partition(params, (r"trunk\.(conv1|bn1|layer1|layer2)\..*",))
    opt_cfg = optim.default_config()
    opt_cfg.lr, opt_cfg.wd_mults = 0.1, ()
    opt = optim.build(opt_cfg, trainable)
    eval_norms = freeze.eval_norms(model_state, frozen, trainable)
    step = step_lib.make_step(model, opt, eval_norms=eval_norms, in_place=True)
    step = donation.Donating(ema.kept_out(donation.writes_into_inputs(step)))
    state = {"trainable": trainable, "frozen": frozen, "model_state": model_state, "opt_state": opt.init(trainable)}
    state[ema.KEY] = ema.init(trainable, model_state)
    decay = 0.7
    mirror = Mirror(state[ema.KEY])
    reference = AveragedModel(mirror, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
    reference.update_parameters(mirror)  # its first update copies: the weights the run starts with
    g = torch.Generator().manual_seed(0)
    for i in range(4):
        batch = {"image": torch.randn(6, 3, 32, 32, generator=g), "label": torch.randint(0, 5, (6,), generator=g)}
        state, _ = step(state, batch, opt.inputs(0.1))
        ema.update(state, ema.decay_at(ema_config(decay=decay), i + 1))
        mirror.load(state)
        reference.update_parameters(mirror)
    average = state[ema.KEY]
    expected = dict(zip(mirror.names[0], reference.module.params))
    live = tree.flatten(state["trainable"])
    for name, t in average["params"].items():
        assert torch.equal(t, expected[name].detach()), name
        assert not torch.equal(t, live[name]), name  # an average, not the live weights
    expected = dict(zip(mirror.names[1], reference.module.buffers()))
    live_state = tree.flatten(state["model_state"])
    moved = [n for n in live_state if n.endswith("running_mean") and n.startswith("trunk.layer3")]
    assert moved and all(not torch.equal(average["model_state"][n], live_state[n]) for n in moved)
    for name, t in average["model_state"].items():
        if t.is_floating_point():
            assert torch.equal(t, expected[name]), name
        else:
            assert torch.equal(t, live_state[name]) and t is not live_state[name], name


def test_warmup_follows_timms_model_ema_v3_schedule():
    """timm's ModelEmaV3.get_decay: 0 at the first update, then 1 - (1 + (n-1)/gamma)^-power, capped."""
    cfg = ema_config(decay=0.999, warmup=True, warmup_gamma=1.0, warmup_power=0.75)
    assert ema.decay_at(cfg, 1) == 0.0
    assert ema.decay_at(cfg, 2) == pytest.approx(1 - 2 ** -0.75)
    assert ema.decay_at(cfg, 11) == pytest.approx(1 - 11 ** -0.75)
    assert ema.decay_at(cfg, 10 ** 6) == 0.999
    assert ema.decay_at(ema_config(decay=0.9), 1) == 0.9  # no warmup: DeiT's ModelEmaV2, from the start


@pytest.mark.parametrize("change,message", [
    ({"ema.decay": 1.0}, "ema.decay=1.0: a number in [0, 1)"),
    ({"ema.decay": 0.9, "ema.warmup_power": 0.0}, "ema.warmup_power=0.0"),
    ({"ema.decay": 0.9, "head_grid.lrs": (0.1, 0.2)}, "ema.decay with head_grid"),
    ({"ema.decay": 0.9, "model.heads": {"fc_ema": models.head_config("flatten")}}, "'_ema' names the averaged"),
    ({"best_metric": "fc_ema/top1"}, "valid: fc/test_top1, fc/test_top5"),
])
def test_bad_ema_settings_are_refused_naming_the_key(change, message):
    from configs import supervised
    c = supervised.get_config()
    for key, value in change.items():
        *parents, leaf = key.split(".")
        node = c
        for p in parents:
            node = node[p]
        node[leaf] = ml_collections.ConfigDict(value) if isinstance(value, dict) else value
    with pytest.raises(config_check.ConfigError, match=re.escape(message)):
        config_check.check(c)
    if change == {"best_metric": "fc_ema/top1"}:
        c.ema.decay = 0.9
        config_check.check(c)  # the average's metric is valid once there is an average


ARGS = ["--config.total_steps=6", "--config.ckpt_steps=3", "--config.ema.decay=0.6"]


def test_a_run_evaluates_the_average_resumes_it_bit_for_bit_and_a_load_of_it_scores_the_same(tmp_path):
    main(tmp_path / "straight", *ARGS, config="configs/supervised.py")
    results = json.loads((tmp_path / "straight" / "results.json").read_text())["heads"]
    assert set(results) == {"fc", "fc_ema"} and results["fc"] != results["fc_ema"]
    lines = [json.loads(l) for l in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert any("fc_ema/test_top1" in l for l in lines)

    # resumed from the middle checkpoint: the same average, the same results
    ckpts = rewound_copy(tmp_path / "straight", tmp_path / "resumed", 3) / "checkpoints"
    proc = main(tmp_path / "resumed", *ARGS, config="configs/supervised.py")
    assert "Resumed at step 3 of 6" in proc.stderr
    a = torch.load(tmp_path / "straight" / "checkpoints" / "ckpt_00000006.pt", weights_only=True)
    b = torch.load(ckpts / "ckpt_00000006.pt", weights_only=True)
    for part in ("params", "model_state"):
        assert a["ema"][part].keys() == b["ema"][part].keys() and a["ema"][part]
        assert all(torch.equal(a["ema"][part][n], b["ema"][part][n]) for n in a["ema"][part]), part
        assert any(not torch.equal(a["ema"][part][n], a[part][n]) for n in a["ema"][part]), part
    assert json.loads((tmp_path / "resumed" / "results.json").read_text())["heads"] == results

    # the checkpoint's average, loaded with select='ema' and evaluated as loaded, scores as fc_ema did
    ckpt = tmp_path / "straight" / "checkpoints" / "ckpt_00000006.pt"
    main(tmp_path / "loaded", "--config.total_steps=1", f"--config.model.weights.path={ckpt}",
         "--config.model.weights.select=ema", "--config.model.weights.load_heads=True",
         "--config.model.freeze=('trunk', 'heads')", config="configs/supervised.py")
    loaded = json.loads((tmp_path / "loaded" / "results.json").read_text())["heads"]
    assert loaded == {"fc": results["fc_ema"]}


def test_select_ema_takes_the_average_and_the_default_says_it_exists(tmp_path):
    main(tmp_path / "run", "--config.total_steps=2", "--config.ema.decay=0.5", config="configs/supervised.py")
    ckpt = str(tmp_path / "run" / "checkpoints" / "ckpt_00000002.pt")
    saved = torch.load(ckpt, weights_only=True)
    cfg = ml_collections.ConfigDict(dict(trunk=models.trunk_config(depth=18),
                                         heads=dict(fc=models.head_config("flatten"))))
    params, model_state = models.build(cfg, num_classes=10, image_size=16).init(1)
    target = {**tree.flatten(params), **tree.flatten(model_state)}
    base = dict(path=ckpt, load_heads=True)
    averaged, report = weights.load_into(target, {**base, "select": "ema"})
    for name, t in saved["ema"]["params"].items():
        assert torch.equal(averaged[name], t), name
    assert "select='ema'" in report.summary()
    live, report = weights.load_into(target, base)
    for name, t in saved["params"].items():
        assert torch.equal(live[name], t), name
    assert "which select='ema' takes" in report.summary()
    with pytest.raises(weights.WeightsError, match=r"select='teacher'.*valid: \['', 'ema'\]"):
        weights.load_into(target, {**base, "select": "teacher"})


def test_the_average_keeps_the_strides_it_had_so_a_compiled_evaluation_is_not_compiled_again():
    """A 1x1 kernel's channels-last strides (which an out-of-place lerp would lose) stay as they were."""
    kernel = torch.randn(8, 4, 1, 1)
    live = torch.empty_like(kernel, memory_format=torch.channels_last).copy_(kernel)
    state = {"trainable": {"w": live}, "model_state": {}, ema.KEY: ema.init({"w": live}, {})}
    state[ema.KEY]["params"]["w"] = torch.empty_like(live).copy_(live)
    assert torch._foreach_lerp([state[ema.KEY]["params"]["w"]], [live], 0.5)[0].stride() != live.stride()
    ema.update(state, 0.5)
    new = state[ema.KEY]["params"]["w"]
    assert new.stride() == live.stride() and torch.equal(new, live)


def test_convnext_v2s_finetuning_recipe_runs_end_to_end_with_its_groups_and_average(tmp_path):
    """configs/finetune.py:convnextv2_base as it is (layer decay over 12 groups of 3 blocks, EMA,
    drop path, AdamW, Mixup/CutMix/smoothing/erasing), on the digits with its stages 8 channels wide."""
    small = ["--config.data.name=digits", "--config.data.num_workers=0", "--config.data.image_size=32",
             "--config.model.trunk.channels=(8, 8, 8, 8)", "--config.total_steps=3",
             "--config.schedule.warmup_epochs=0.05"]
    main(tmp_path, *small, config="configs/finetune.py:convnextv2_base")
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["heads"]) == {"head", "head_ema"}
    assert "layer_decay 0.6 over convnext's 12 layers (ConvNeXt V2 groups of 3 blocks)" in (tmp_path / "log").read_text()
