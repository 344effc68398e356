"""fpipe.schedules against torch.optim.lr_scheduler, and the warmup/delay/unit rules by hand."""
import math

import pytest
import torch

from fpipe import schedules


def _config(**kw):
    c = schedules.default_config()
    c.update(kw)
    return c


def _torch_lrs(make_scheduler, base_lr, steps):
    """The lr torch uses for updates 0..steps-1, stepping the scheduler once per update."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=base_lr)
    scheduler, lrs = make_scheduler(opt), []
    for _ in range(steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        scheduler.step()
    return lrs


@pytest.mark.parametrize("gamma", [0.1, 0.5])
def test_multistep_matches_torch(gamma):
    ref = _torch_lrs(lambda o: torch.optim.lr_scheduler.MultiStepLR(o, [3, 7, 12], gamma), 0.2, 20)
    by_steps = schedules.build(_config(name="multistep", milestones_steps=(3, 7, 12), gamma=gamma),
                               steps_per_epoch=1, total_steps=20)
    by_epochs = schedules.build(_config(name="multistep", milestones_epochs=(0.75, 1.75, 3),
                                        gamma=gamma), steps_per_epoch=4, total_steps=20)
    for step, lr in enumerate(ref):
        assert 0.2 * by_steps(step) == pytest.approx(lr, rel=1e-12), step
        assert by_epochs(step) == by_steps(step), step
    one = schedules.build(_config(name="multistep", milestones_epochs=(2,)), 3, 20)
    assert [one(s) for s in (5, 6)] == [1.0, 0.1]


@pytest.mark.parametrize("end", [dict(end_factor=None), dict(end_lr=0.01), dict(end_factor=0.05)])
def test_cosine_matches_torch(end):
    eta_min = end.get("end_lr") or 0.2 * (end.get("end_factor") or 0.0)
    ref = _torch_lrs(lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, 30, eta_min), 0.2, 31)
    schedule = schedules.build(_config(name="cosine", **end), 10, 30, base_lr=0.2)
    for step, lr in enumerate(ref):
        assert 0.2 * schedule(step) == pytest.approx(lr, rel=1e-9, abs=1e-12), step
    assert schedule(30) == schedule(100) == pytest.approx(eta_min / 0.2)  # holds after the end


def test_polynomial_matches_torch():
    ref = _torch_lrs(lambda o: torch.optim.lr_scheduler.PolynomialLR(o, 25, power=2.0), 0.1, 30)
    schedule = schedules.build(_config(name="polynomial", power=2.0), 5, 25)
    for step, lr in enumerate(ref):
        assert 0.1 * schedule(step) == pytest.approx(lr, rel=1e-9, abs=1e-12), step


def test_constant_with_warmup():
    schedule = schedules.build(_config(name="constant", warmup_steps=4, warmup_factor=0.2), 10, 50)
    assert [schedule(s) for s in range(6)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0, 1.0])
    assert schedule(49) == 1.0


def test_warmup_methods_at_their_boundaries():
    def build(method):
        cfg = _config(name="cosine", warmup_epochs=2, warmup_method=method, warmup_factor=0.01)
        return schedules.build(cfg, 5, 110)  # warmup: 10 steps; cosine over steps 10..110.
    linear, constant, exponential = build("linear"), build("constant"), build("exponential")
    assert linear(0) == constant(0) == exponential(0) == pytest.approx(0.01)
    assert linear(5) == pytest.approx(0.505)
    assert constant(9) == pytest.approx(0.01)
    assert exponential(5) == pytest.approx(0.1)  # 0.01 ** 0.5
    for schedule in linear, constant, exponential:
        assert schedule(10) == 1.0  # warmup over, cosine starts at its top
        assert schedule(60) == pytest.approx(0.5)  # cosine half way
        assert schedule(110) == pytest.approx(0.0, abs=1e-12)


def test_warmup_multiplies_absolute_milestones():
    cfg = _config(name="multistep", warmup_steps=4, warmup_factor=0.0, milestones_steps=[2, 6])
    schedule = schedules.build(cfg, 1, 10)
    assert [schedule(s) for s in range(8)] == pytest.approx(
        [0.0, 0.25, 0.05, 0.075, 0.1, 0.1, 0.01, 0.01])


@pytest.mark.parametrize("kind,half", [("cosine", 0.55), ("polynomial", 0.55)])
def test_delay_holds_base_lr_after_warmup(kind, half):
    cfg = _config(name=kind, warmup_steps=10, delay_epochs=1.5, end_factor=0.1)
    schedule = schedules.build(cfg, 20, 140)  # delay: 30 steps; decay over steps 40..140.
    assert schedule(0) == pytest.approx(0.001)
    assert all(schedule(s) == 1.0 for s in range(10, 41))
    assert schedule(41) < 1.0
    assert schedule(90) == pytest.approx(half)
    assert schedule(140) == pytest.approx(0.1)


def test_short_run_never_decays_but_does_not_fail():
    schedule = schedules.build(_config(name="cosine", warmup_steps=10), 1, 5)
    assert schedule(4) == pytest.approx(0.001 * 0.6 + 0.4)


def test_to_steps():
    assert schedules.to_steps({"warmup_epochs": 2.5}, "warmup", 10) == 25
    assert schedules.to_steps({"warmup_epochs": 1 / 3}, "warmup", 10) == 3
    assert schedules.to_steps({"warmup_epochs": 0.29}, "warmup", 100) == 29  # 28.999999999999996
    assert schedules.to_steps({"warmup_steps": 7, "warmup_epochs": None}, "warmup", 10) == 7
    assert schedules.to_steps({"milestones_epochs": (1, 2.5)}, "milestones", 4) == [4, 10]
    assert schedules.to_steps({}, "delay", 10, default=0) == 0
    assert schedules.to_steps(_config(), "milestones", 10) is None
    # steps, when set, override epochs (a command line cannot unset the config file's epochs)
    assert schedules.to_steps({"warmup_steps": 7, "warmup_epochs": 1}, "warmup", 10) == 7
    with pytest.raises(ValueError, match="whole steps"):
        schedules.to_steps({"warmup_steps": 7.5}, "warmup", 10)
    with pytest.raises(ValueError, match=">= 0"):
        schedules.to_steps({"milestones_epochs": [1, -2]}, "milestones", 10)


@pytest.mark.parametrize("change,message", [
    (dict(name="step"), "valid: constant, multistep, cosine, polynomial"),
    (dict(warmup_steps=5, warmup_method="cos"), "valid: linear, constant, exponential"),
    (dict(warmup_steps=5, warmup_method="exponential", warmup_factor=0.0), "exponential"),
    (dict(name="multistep"), "milestones"),
    (dict(name="multistep", milestones_steps=[5, 5]), "increasing"),
    (dict(name="multistep", milestones_steps=[5], delay_steps=3), "delay"),
    (dict(end_lr=0.0), "base_lr"),
    (dict(end_lr=0.0, end_factor=0.0), "not both"),
])
def test_errors(change, message):
    with pytest.raises(ValueError, match=message):
        schedules.build(_config(**change), 10, 100)


def test_default_config_is_cosine_to_zero():
    schedule = schedules.build(schedules.default_config(), 10, 100)
    assert schedule(0) == 1.0 and schedule(50) == pytest.approx(0.5)
    assert schedule(25) == pytest.approx((1 + math.cos(math.pi / 4)) / 2)
