import glob
import json
import logging
import math
import os
import struct

import numpy as np
import pytest
import torch

from fpipe import writers


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_eta_timer_skips_warmup_and_gives_exact_rates():
    clock = FakeClock()
    timer = writers.EtaTimer(100, batch_size=32, warmup_steps=2, clock=clock)
    clock.t = 10.0
    timer.tick(1)  # compile: excluded
    assert timer.seconds_per_step is None and timer.eta_seconds is None
    clock.t = 11.0
    timer.tick(2)  # end of warm-up: the clock starts here
    assert timer.seconds_per_step is None
    clock.t = 11.5
    timer.tick(3)
    clock.t = 12.0
    timer.tick(4)
    assert timer.seconds_per_step == 0.5
    assert timer.images_per_second == 64.0
    assert timer.eta_seconds == 48.0  # 96 steps left at 0.5 s
    clock.t = 99.0
    timer.tick(4)  # a second write at the same step (e.g. eval metrics) changes nothing
    assert timer.eta_seconds == 48.0
    clock.t = 60.0
    timer.tick(100)
    assert timer.seconds_per_step == 0.5 and timer.eta_seconds == 0


def test_eta_timer_after_resume_and_with_sparse_ticks():
    clock = FakeClock()
    timer = writers.EtaTimer(5000, start_step=1000, warmup_steps=0, clock=clock)
    clock.t = 200.0
    timer.tick(1100)  # only log steps tick; with no warm-up the clock ran from construction
    assert timer.seconds_per_step == 2.0
    assert timer.images_per_second is None  # no batch size given
    assert timer.eta_seconds == 3900 * 2.0
    assert writers.format_duration(timer.eta_seconds) == "2:10:00"


def test_formatting():
    assert writers.format_duration(3723.4) == "1:02:03"
    assert writers.format_duration(27 * 3600) == "27:00:00"
    assert writers.format_duration(-5) == "0:00:00"
    assert [writers.format_value(v) for v in (0.421349, 1e-3, 3e-5, 12345.6, 7)] == [
        "0.4213", "0.001", "3e-05", "1.235e+04", "7"]
    assert type(writers.to_scalar(torch.tensor(3))) is int
    assert writers.to_scalar(torch.tensor([2.5])) == 2.5
    assert writers.to_scalar(np.float32(1.5)) == 1.5
    with pytest.raises(ValueError, match="loss.*shape"):
        writers.to_scalar(torch.zeros(2), "loss")


def test_console_line():
    clock = FakeClock()
    timer = writers.EtaTimer(100, batch_size=32, warmup_steps=2, clock=clock)
    lines = []
    console = writers.ConsoleWriter(timer=timer, log=lines.append)
    for step, t in [(1, 10.0), (2, 11.0), (4, 12.0)]:
        clock.t = t
        console.write_scalars(step, {"loss": torch.tensor(0.421349), "lr": 1e-3})
    console.write_text(4, "note", "hello")
    assert lines == [
        "step 1/100: loss=0.4213 lr=0.001",
        "step 2/100: loss=0.4213 lr=0.001",
        "step 4/100: loss=0.4213 lr=0.001 | 64.0 img/s, ETA 0:00:48",
        "step 4: note: hello",
    ]
    assert writers.format_line(7, {"acc": 0.5}) == "step 7: acc=0.5"


def test_console_logs_through_absl(caplog):
    with caplog.at_level(logging.INFO):
        writers.ConsoleWriter(10).write_scalars(3, {"loss": 1.25})
    assert "step 3/10: loss=1.25" in [r.getMessage() for r in caplog.records]


def _lines(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_jsonl_lines_parse_and_survive_a_kill(tmp_path):
    path = str(tmp_path / "metrics.jsonl")
    w = writers.JsonlWriter(path)
    w.write_scalars(1, {"loss": torch.tensor(0.5), "n": np.int64(3), "acc": np.float32(0.25)})
    w.write_scalars(2, {"loss": float("nan")})
    w.write_text(2, "note", "ok")
    # Not closed: as if the process were killed, every line written is already in the file.
    records = _lines(path)
    assert records[0] == {"step": 1, "loss": 0.5, "n": 3, "acc": 0.25}
    assert records[1]["step"] == 2 and math.isnan(records[1]["loss"])
    assert records[2] == {"step": 2, "note": "ok"}
    w.close()


def test_jsonl_resume_drops_later_steps_and_a_partial_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": s / 10}) + "\n" for s in range(1, 6))
                    + '{"step": 6, "lo')
    with writers.JsonlWriter(str(path), resume_step=3) as w:
        w.write_scalars(4, {"loss": 0.0})
    assert [(r["step"], r["loss"]) for r in _lines(path)] == [
        (1, 0.1), (2, 0.2), (3, 0.3), (4, 0.0)]
    # Without resume_step, only the partial line goes; appending continues.
    with open(path, "a") as f:
        f.write('{"step": 5')
    with writers.JsonlWriter(str(path)) as w:
        w.write_scalars(5, {"loss": 1.0})
    assert [r["step"] for r in _lines(path)] == [1, 2, 3, 4, 5]
    assert not glob.glob(str(tmp_path / "*.tmp"))


def _read_events(path):
    """Minimal TFRecord reader: (uint64 length, uint32 crc, data, uint32 crc) per record."""
    from tensorboardX.proto import event_pb2
    events, data, at = [], open(path, "rb").read(), 0
    while at < len(data):
        (n,) = struct.unpack("<Q", data[at:at + 8])
        events.append(event_pb2.Event.FromString(data[at + 12:at + 12 + n]))
        at += 12 + n + 4
    assert at == len(data)
    return events


def test_tensorboard_event_file_holds_the_scalars(tmp_path):
    w = writers.TensorBoardWriter(str(tmp_path / "tb"))
    w.write_scalars(10, {"train/loss": torch.tensor(0.75), "lr": 0.5})
    w.write_scalars(20, {"train/loss": 0.25})
    w.close()
    (path,) = glob.glob(str(tmp_path / "tb" / "events.out.tfevents.*"))
    assert os.path.getsize(path) > 0 and b"train/loss" in open(path, "rb").read()
    scalars = [(e.step, v.tag, v.simple_value) for e in _read_events(path) for v in e.summary.value]
    assert scalars == [(10, "train/loss", 0.75), (10, "lr", 0.5), (20, "train/loss", 0.25)]


def test_tensorboard_resume_purges_later_steps(tmp_path):
    writers.TensorBoardWriter(str(tmp_path), resume_step=10).close()
    (path,) = glob.glob(str(tmp_path / "events.out.tfevents.*"))
    starts = [e.step for e in _read_events(path) if e.HasField("session_log")]
    assert starts == [11]  # TensorBoard hides events at steps >= 11 written before this one


def test_make_writers_on_main_and_other_ranks(tmp_path):
    other = writers.make_writers(str(tmp_path / "rank1"), is_main_process=False)
    other.write_scalars(1, {"loss": 1.0})
    other.close()
    assert type(other) is writers.MetricWriter and not (tmp_path / "rank1").exists()

    main = writers.make_writers(str(tmp_path), is_main_process=True, total_steps=10, batch_size=8)
    main.write_scalars(1, {"loss": torch.tensor(2.0)})
    main.close()
    assert _lines(tmp_path / "metrics.jsonl") == [{"step": 1, "loss": 2.0}]
    assert glob.glob(str(tmp_path / "tb" / "events.out.tfevents.*"))


def test_multi_writer_fans_out_plain_numbers():
    seen = []

    class Recorder(writers.MetricWriter):
        def write_scalars(self, step, scalars):
            seen.append((step, scalars))

        def close(self):
            seen.append("closed")

    multi = writers.MultiWriter([Recorder(), Recorder()])
    multi.write_scalars(3, {"loss": torch.tensor(1.5)})
    multi.close()
    assert seen == [(3, {"loss": 1.5}), (3, {"loss": 1.5}), "closed", "closed"]
    assert type(seen[0][1]["loss"]) is float


def test_eta_includes_the_evaluations_still_to_come():
    t = [0.0]
    timer = writers.EtaTimer(100, batch_size=30, warmup_steps=0, eval_every=25, eval_images=90,
                             clock=lambda: t[0])
    t[0] = 10.0
    timer.tick(10)  # 1 s per step; 4 evaluations left (25, 50, 75, 100), each 90 images
    assert timer.eta_seconds == 90 * 1.0 + 4 * (90 / 30 * 1.0 / 3)  # before any: a third of a step per image
    timer.eval_took(5.0)
    assert timer.eta_seconds == 90 + 4 * 5.0
    t[0] = 80.0
    timer.tick(80)  # 100 is left, and the final evaluation
    assert timer.eta_seconds == 20 + 1 * 5.0
    final_only = writers.EtaTimer(100, batch_size=30, warmup_steps=0, eval_images=90, clock=lambda: t[0])
    t[0] = 90.0
    final_only.tick(10)
    final_only.eval_took(2.0)
    assert final_only.eta_seconds == 90 * 1.0 + 2.0
    uneven = writers.EtaTimer(100, warmup_steps=0, eval_every=30, clock=lambda: t[0])
    uneven.tick(10)
    uneven.eval_took(1.0)  # 30, 60, 90 and the final 100
    assert uneven._evaluations_left() == 4
