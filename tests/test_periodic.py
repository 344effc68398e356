"""Each hook's effect, through the loop as a user runs it (main.py), or against a direct computation."""
import json
import pathlib
import signal
import sys
import time

import ml_collections
import pytest
import torch
import torch.nn.functional as F

import _forked_main as forked_main
from fpipe import tree
from fpipe.models import layers
from fpipe.models import model as models
from fpipe.train import periodic
from test_main import ROOT, TINY, main


def test_precise_bn_is_the_equal_weight_mean_of_batch_statistics():
    cfg = ml_collections.ConfigDict(dict(trunk=models.trunk_config(depth=18), heads=dict(fc=models.head_config("flatten"))))
    model = models.build(cfg, num_classes=3, image_size=16)
    params, state = model.init(0)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(4, 3, 16, 16, generator=g) * (i + 1) for i in range(3)]
    new_state = periodic.precise_bn_statistics(model.apply, params, state, batches, frozenset(), layers.BN_MOMENTUM)
    # trunk.bn1 sees conv1's output: its statistics can be computed directly
    convs = [F.conv2d(x, params["trunk"]["conv1"]["weight"], None, 2, 3) for x in batches]
    mean = torch.stack([h.mean((0, 2, 3)) for h in convs]).mean(0)
    var = torch.stack([h.transpose(0, 1).flatten(1).var(1, unbiased=True) for h in convs]).mean(0)
    torch.testing.assert_close(new_state["trunk"]["bn1"]["running_mean"], mean, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(new_state["trunk"]["bn1"]["running_var"], var, rtol=1e-4, atol=1e-5)
    assert torch.equal(new_state["trunk"]["bn1"]["num_batches_tracked"], state["trunk"]["bn1"]["num_batches_tracked"])
    assert new_state["heads"] == {"fc": {}} == state["heads"]  # the structure given, a stateless head's empty dict too
    # norms in eval mode (frozen) are left alone
    kept = periodic.precise_bn_statistics(model.apply, params, state, batches, frozenset({"trunk.bn1"}), layers.BN_MOMENTUM)
    assert kept["trunk"]["bn1"]["running_mean"] is state["trunk"]["bn1"]["running_mean"]


def ckpt(workdir, step):
    return torch.load(pathlib.Path(workdir) / "checkpoints" / f"ckpt_{step:08d}.pt", weights_only=True)


FREEZE = ["--config.layer_freeze.rules=('trunk.layer1.*',)", "--config.layer_freeze.freeze_steps=3",
          "--config.schedule.name=constant", "--config.ckpt_steps=1", "--config.keep_ckpts=10"]


def test_layer_freeze_holds_layers_then_trains_them(tmp_path):
    main(tmp_path, "--config.total_steps=5", *FREEZE, config="configs/supervised.py")
    init = {f"trunk.{n}": t for n, t in tree.flatten(models.build(
        _supervised_model_cfg(), num_classes=10, image_size=16).init(0)[0]["trunk"]).items()}
    for step in (1, 2, 3):
        saved = ckpt(tmp_path, step)
        assert torch.equal(saved["params"]["trunk.layer1.0.conv1.weight"], init["trunk.layer1.0.conv1.weight"])
        assert torch.equal(saved["model_state"]["trunk.layer1.0.bn1.running_mean"], torch.zeros(64))
        assert not torch.equal(saved["params"]["trunk.layer2.0.conv1.weight"], init["trunk.layer2.0.conv1.weight"])
    after = ckpt(tmp_path, 4)
    assert not torch.equal(after["params"]["trunk.layer1.0.conv1.weight"], init["trunk.layer1.0.conv1.weight"])


def test_layer_freeze_does_not_freeze_again_after_resume(tmp_path):
    every_2 = (*FREEZE, "--config.ckpt_steps=2")  # the resume point (4) and the end: fewer files to write
    main(tmp_path / "straight", "--config.total_steps=6", *every_2, config="configs/supervised.py")
    main(tmp_path / "resumed", "--config.total_steps=4", *every_2, config="configs/supervised.py")
    main(tmp_path / "resumed", "--config.total_steps=6", "--allow_change=total_steps", *every_2,
         config="configs/supervised.py")
    a, b = ckpt(tmp_path / "straight", 6), ckpt(tmp_path / "resumed", 6)
    for name, t in a["params"].items():
        assert torch.equal(b["params"][name], t), name


def _supervised_model_cfg():
    sys.path.insert(0, str(ROOT))
    from configs import supervised
    return supervised.get_config().model


def test_best_checkpoint_keeps_the_best_evaluation(tmp_path):
    main(tmp_path, "--config.total_steps=8", "--config.eval_steps=2", "--config.best_metric=res5avg/top1")
    evals = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = [(l["step"], l["res5avg/test_top1"]) for l in evals if "res5avg/test_top1" in l]
    assert [s for s, _ in evals] == [2, 4, 6, 8]
    best = json.loads((tmp_path / "checkpoints" / "best.json").read_text())
    best_value = max(v for _, v in evals)
    assert best["value"] == best_value and best["step"] == min(s for s, v in evals if v == best_value)
    assert torch.load(tmp_path / "checkpoints" / "best.pt", weights_only=True)["step"] == best["step"]


def test_sigterm_writes_a_checkpoint_and_exits_143(tmp_path):
    proc = forked_main.start(["--config=configs/supervised.py", f"--workdir={tmp_path}", *TINY,
                              "--config.total_steps=400", "--config.ckpt_steps=1000"])
    deadline = time.time() + 300
    metrics = tmp_path / "metrics.jsonl"
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().strip()):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=300)
    err = proc.stderr
    assert proc.returncode == 143, err[-3000:]  # 128 + SIGTERM: schedulers see an unfinished run
    assert "Stopped by SIGTERM" in err
    saved = sorted((tmp_path / "checkpoints").glob("ckpt_*.pt"))
    assert len(saved) == 1 and 5 <= torch.load(saved[0], weights_only=True)["step"] < 400
    assert not (tmp_path / "results.json").exists()


def test_layer_freeze_rule_matching_nothing_is_an_error(tmp_path):
    proc = main(tmp_path, "--config.total_steps=2", "--config.layer_freeze.rules=('trunk.layr1.*',)",
                "--config.layer_freeze.freeze_steps=1", check=False, config="configs/finetune.py")
    assert proc.returncode != 0 and "matches no parameter" in proc.stderr


def _books(tmp_path, monkeypatch, *, total=6, log=2, ckpt=3, start=0):
    """A Bookkeeping over one process, its saves recorded instead of written."""
    from fpipe.train import distributed
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    config = ml_collections.ConfigDict(dict(log_steps=log, ckpt_steps=ckpt, eval_steps=None,
                                            data=dict(batch_size=4)))
    saves = []

    def save(step, state, best=None, evaluation_pending=False):
        saves.append((step, state["x"]))
        return step

    books = periodic.Bookkeeping(config, str(tmp_path), distributed.init(), save, total_steps=total, steps_per_epoch=3,
                                 start_step=start, eval_images=0, write=False, resumed=False)
    return books, saves


class _Stop:
    requested = None


def test_bookkeeping_logs_checkpoints_and_stops_as_the_loop_did(tmp_path, monkeypatch):
    from fpipe.train.signals import Stopped
    books, saves = _books(tmp_path, monkeypatch)
    logged = []
    books.writer.write_scalars = lambda step, scalars: logged.append((step, scalars))
    stop = _Stop()
    for done in (1, 2, 3):
        books.step_done(done, {"loss": torch.tensor(float(done)), "nonfinite": torch.tensor(0, dtype=torch.int32)}, 0.5)
        books.log(done, {"x": done}, lr=0.1)
        books.checkpoint(done, {"x": done}, stop)
    assert [s for s, _ in logged] == [2] and logged[0][1]["loss"] == 1.5 and logged[0][1]["epoch"] == 2 / 3
    assert saves == [(3, 3)]
    books.step_done(4, {"loss": torch.tensor(4.0), "nonfinite": torch.tensor(0, dtype=torch.int32)}, 0.5)
    stop.requested = 15  # SIGTERM after step 4: a checkpoint of step 4, then Stopped
    with pytest.raises(Stopped):
        books.checkpoint(4, {"x": 4}, stop)
    assert saves == [(3, 3), (4, 4)]
    books.stopped({"x": 4}, 15)  # already saved: not again
    assert saves == [(3, 3), (4, 4)]


def test_bookkeeping_saves_the_completed_steps_when_stopped_and_never_a_non_finite_state(tmp_path, monkeypatch):
    from fpipe.train.divergence import DivergedError
    books, saves = _books(tmp_path, monkeypatch)
    books.step_done(1, {"loss": torch.tensor(1.0), "nonfinite": torch.tensor(0, dtype=torch.int32)}, 0.0)
    books.stopped({"x": 1}, 2)  # SIGINT mid-step 2: step 1's state is saved
    assert saves == [(1, 1)]
    books.step_done(2, {"loss": torch.tensor(float("nan")), "nonfinite": torch.tensor(1, dtype=torch.int32)}, 0.0)
    with pytest.raises(DivergedError, match="diverged by step 2"):
        books.log(2, {"trainable": {}, "x": 2}, lr=0.1)
    books.stopped({"x": 2}, 2)
    assert saves == [(1, 1)]  # the non-finite state is never saved


def test_a_non_finite_state_behind_finite_losses_is_caught_before_logging_or_saving(tmp_path, monkeypatch):
    """The steps flag only their loss and grad norm; the books check the state itself (an inf
    running variance leaves the train-mode loss finite) before they log, save or stop with a save."""
    from fpipe.train.divergence import DivergedError
    books, saves = _books(tmp_path, monkeypatch)
    finite = {"trainable": {"w": torch.ones(3)}, "model_state": {"bn": {"running_var": torch.ones(2)}}, "x": 1}
    books.step_done(1, {"loss": torch.tensor(1.0), "nonfinite": torch.tensor(0, dtype=torch.int32)}, 0.0)
    books.check_finite(1, finite)  # nothing wrong: no error
    poisoned = {**finite, "model_state": {"bn": {"running_var": torch.tensor([1.0, float("inf")])}}, "x": 2}
    books.step_done(2, {"loss": torch.tensor(1.0), "nonfinite": torch.tensor(0, dtype=torch.int32)}, 0.0)
    with pytest.raises(DivergedError, match=r"diverged by step 2: non-finite values in model_state:bn\.running_var"):
        books.log(2, poisoned, lr=0.1)
    books.stopped(poisoned, 2)
    assert saves == []  # the non-finite state is never saved


def test_a_shorter_log_period_says_how_many_steps_its_means_cover(tmp_path, monkeypatch):
    """Resumed at step 3 with log_steps=2, the log at step 4 averages one step, not two: the record says so."""
    books, _ = _books(tmp_path, monkeypatch, total=7, log=2, start=3)
    logged = []
    books.writer.write_scalars = lambda step, scalars: logged.append((step, scalars))
    for done in (4, 5, 6, 7):
        books.step_done(done, {"loss": torch.tensor(float(done)), "nonfinite": torch.tensor(0, dtype=torch.int32)}, 0.5)
        books.log(done, {"x": done}, lr=0.1)
    assert [(s, r["loss"], r.get("steps_averaged")) for s, r in logged] == [(4, 4.0, 1), (6, 5.5, None), (7, 7.0, 1)]
