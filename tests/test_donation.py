"""Buffer donation (fpipe.train.donation): the loop's step (compiled, or eager with a fused optimizer)
writes its new state into the tensors it handed out last time, computes what the plain step
computes, and never writes into anyone else's."""
import os
import signal

import ml_collections
import pytest
import torch

from fpipe import defaults, freeze, optim, tree
from fpipe.models import model as models
from fpipe.train import distributed, donation, loop
from fpipe.train import step as step_lib
from fpipe.train.signals import StopOnSignal, Stopped


def tiny_regnet():
    """The tiny RegNet (5 blocks, groups of 8, no squeeze-excitation) that the step and loop tests here train."""
    return defaults.trunk("regnet", depth=5, w_0=8, w_a=10.0, w_m=2.0, group_width=8, bottleneck_multiplier=1.0,
                          se_ratio=0.0, stem_width=8)


def tiny(opt_name="adamw"):
    """A tiny RegNet (BatchNorm state to donate), its stem frozen (frozen tensors are not donated)."""
    cfg = ml_collections.ConfigDict(dict(trunk=tiny_regnet(), heads=dict(fc=models.head_config("res5avg"))))
    model = models.build(cfg, num_classes=5, image_size=16)
    params, state = model.init(0)
    frozen, trainable = freeze.partition(params, (r"trunk\.stem\..*",))
    opt_cfg = optim.default_config()
    opt_cfg.name, opt_cfg.weight_decay = opt_name, 1e-2
    opt = optim.build(opt_cfg, trainable)
    ts = {"trainable": trainable, "frozen": frozen, "model_state": state, "opt_state": opt.init(trainable)}
    return model, opt, ts, freeze.eval_norms(state, frozen)


def batches(n=3):
    g = torch.Generator().manual_seed(1)
    return [{"image": torch.randn(8, 3, 16, 16, generator=g), "label": torch.randint(0, 5, (8,), generator=g)}
            for _ in range(n)]


def build(model, opt, ts, norms, compiling):
    config = ml_collections.ConfigDict(dict(precision="fp32", compile_remat="all"))
    return loop.build_train_step(config, model, opt, ts["trainable"], ts["model_state"], norms,
                                 distributed.Dist(device=torch.device("cpu")), compiling=compiling)


@pytest.mark.parametrize("opt_name,compiling", [("adamw", True), ("adamw", False), ("sgd", False)],
                         ids=["adamw-compiled", "adamw-eager", "sgd-eager"])
def test_the_donating_step_matches_the_plain_step_and_overwrites_only_its_own_tensors(opt_name, compiling):
    """Eagerly each optimizer donates by its own fused in-place update; compiled, inductor writes
    every new value into the old tensor whatever the optimizer (SGD's compiled donation is the
    SIGTERM test's below, and each multi-process step's in tests/test_distributed.py)."""
    model, opt, ts, norms = tiny(opt_name)
    initial = tree.map_leaves(lambda t: t.clone(), ts)
    plain = step_lib.make_step(model, opt, eval_norms=norms)  # the pure step: new tensors, nothing written
    donating = build(model, opt, ts, norms, compiling)
    assert isinstance(donating, donation.Donating)
    lr = opt.inputs(0.05)

    expected, got = ts, ts
    for i, b in enumerate(batches()):
        assert donation.overwrites(donating, got) == (i > 0)  # the first call (the compile) works on copies
        given = {k: list(tree.leaves(got[k])) for k in donation.DONATED}
        expected, m_plain = plain(expected, b, lr)
        got, m_donated = donating(got, b, lr)
        torch.testing.assert_close(m_donated["loss"], m_plain["loss"], rtol=1e-4, atol=1e-5)
        for key in donation.DONATED:
            same_objects = all(a is b for a, b in zip(given[key], tree.leaves(got[key])))
            assert same_objects == (i > 0), key  # from the second call on, the state is updated in place
    for key in ("trainable", "opt_state", "model_state"):
        for (name, x), y in zip(tree.flatten(got[key]).items(), tree.leaves(expected[key])):
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5, msg=f"{key}.{name}")
    for (name, x), y in zip(tree.flatten(ts).items(), tree.leaves(initial)):  # the caller's tensors untouched
        assert torch.equal(x, y), name
    assert got["frozen"] is ts["frozen"] or all(a is b for a, b in zip(tree.leaves(got["frozen"]),
                                                                       tree.leaves(ts["frozen"])))


def test_an_eager_step_donates_only_where_the_optimizer_updates_in_place():
    """Eagerly, donating pays only with a fused in-place update; LARS (new tensors) would be copied."""
    model, opt, ts, norms = tiny("sgd")
    assert isinstance(build(model, opt, ts, norms, False), donation.Donating)
    model, opt, ts, norms = tiny("lars")
    assert not opt.updates_in_place(ts["trainable"])
    assert not isinstance(build(model, opt, ts, norms, False), donation.Donating)


def test_a_state_it_did_not_hand_out_is_copied_and_a_tensor_given_twice_takes_one_update():
    calls = []

    def inner(state, batch, hyper):  # stands for a compiled writes_into_inputs: adds 1 in place
        calls.append(state)
        for t in tree.leaves(state["trainable"]):
            t.add_(1)
        return {k: v for k, v in state.items() if k not in donation.DONATED}, {}

    step = donation.Donating(inner)
    a = torch.zeros(2)
    first, _ = step({"trainable": {"a": a}, "frozen": {}}, None, None)
    assert torch.equal(a, torch.zeros(2)) and torch.equal(first["trainable"]["a"], torch.ones(2))
    replaced = {**first, "trainable": {"a": first["trainable"]["a"], "b": first["trainable"]["a"]}}
    second, _ = step(replaced, None, None)
    assert second["trainable"]["a"] is first["trainable"]["a"]  # its own, updated in place
    assert second["trainable"]["b"] is not second["trainable"]["a"]  # the second reference is a copy
    assert torch.equal(second["trainable"]["a"], torch.full((2,), 2.0))
    assert torch.equal(second["trainable"]["b"], torch.full((2,), 2.0))
    assert list(second) == list(replaced)  # the caller's key order: no new guards on the next call


def test_a_signal_waits_for_the_end_of_a_stretch_that_may_not_be_cut():
    with StopOnSignal() as stop:
        with stop.interruptible(when=False):
            os.kill(os.getpid(), signal.SIGTERM)
            done = True  # reached: the handler only took note
        assert done and stop.requested == signal.SIGTERM
        with pytest.raises(Stopped):
            with stop.interruptible():
                pytest.fail("a requested stop must be raised before the next stretch")


def tiny_run_config(**changes):
    """configs/supervised.py on the tiny RegNet, compiled, 16 px (the loop as main.py runs it)."""
    import configs.supervised
    c = configs.supervised.get_config()
    c.model.trunk = tiny_regnet()
    c.data.image_size, c.data.batch_size = 16, 32
    c.compile, c.compile_min_images, c.eval_steps, c.log_steps = True, 0, 1000, 1000
    c.update(changes)
    return c


def test_a_sigterm_during_a_donating_step_saves_that_step_under_its_own_number(tmp_path, monkeypatch):
    """The 4th step has written its state into the old tensors when SIGTERM arrives: the stop must
    wait for the step's end and save step 4 (cutting it short would save step 4's params as step 3,
    or the state from before the step). The reference: a copy of what the 4th step returned."""
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    calls, fourth, call = [], {}, donation.Donating.__call__

    def signalled(self, *args):
        out = call(self, *args)
        calls.append(1)
        if len(calls) == 4:  # after the writes, before the loop has the new state
            for key in ("trainable", "model_state"):
                fourth[key] = {n: t.clone() for n, t in tree.flatten(out[0][key]).items()}
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    monkeypatch.setattr(donation.Donating, "__call__", signalled)
    with pytest.raises(Stopped):
        loop.run(tiny_run_config(total_steps=6, ckpt_steps=1000), str(tmp_path / "stopped"))
    assert len(calls) == 4
    saved = sorted((tmp_path / "stopped" / "checkpoints").glob("ckpt_*.pt"))
    assert [p.name for p in saved] == ["ckpt_00000004.pt"]
    ckpt = torch.load(saved[0], weights_only=True)
    for key, saved_key in (("trainable", "params"), ("model_state", "model_state")):
        assert set(ckpt[saved_key]) == set(fourth[key]), key
        for name, t in fourth[key].items():
            assert torch.equal(ckpt[saved_key][name], t), (key, name)
