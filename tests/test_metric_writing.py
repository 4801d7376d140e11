"""MetricWriter: non-finite scalars, resume checks of the file, and failed writes."""

import errno
import glob
import json
import logging
import math
import struct
import subprocess
import sys
import textwrap

import pytest

from tensorboardX.proto import event_pb2
from tensorboardX.x2num import make_np

from rl_mismatch.metric_writing import GAPS_NAME, MetricsWriteError, MetricWriter, read_metrics, scan_metrics


def _tensorboard_scalars(workdir):
    """{(tag, step): value} from the run's event files (TFRecord framing read by hand)."""
    out = {}
    for path in glob.glob(str(workdir / "tensorboard" / "events.out.tfevents.*")):
        data = open(path, "rb").read()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            for value in event.summary.value:
                out[(value.tag, event.step)] = value.simple_value
    return out


def test_non_finite_scalars_are_kept_and_not_warned_about(tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    writer = MetricWriter(tmp_path)
    writer.write(0, {"opt/grad_noise_scale": math.inf, "loss": 0.5})
    writer.write(1, {"opt/grad_noise_scale": 12.0, "loss": math.nan})
    writer.close()

    rows = read_metrics(tmp_path)
    assert rows[0]["opt/grad_noise_scale"] == math.inf and rows[0]["loss"] == 0.5
    assert rows[1]["opt/grad_noise_scale"] == 12.0 and math.isnan(rows[1]["loss"])
    scalars = _tensorboard_scalars(tmp_path)
    assert math.isnan(scalars[("opt/grad_noise_scale", 0)]) and scalars[("opt/grad_noise_scale", 1)] == 12.0
    assert scalars[("loss", 0)] == 0.5 and math.isnan(scalars[("loss", 1)])
    assert not [r for r in caplog.records if "NaN or Inf" in r.getMessage()]

    # The warning is silenced only around the writer's own writes.
    make_np(math.nan)
    assert [r for r in caplog.records if "NaN or Inf" in r.getMessage()]


def test_the_tensorboard_writer_leaves_torch_unimported(tmp_path):
    """Importing tensorboardX imports torch where torch is installed (as it is here); the writer
    imports tensorboardX with torch marked absent. A fresh process that has written TensorBoard
    scalars has not imported torch, and can still import it afterwards."""
    pytest.importorskip("torch")  # without torch installed there is nothing to keep out
    code = textwrap.dedent(f"""
        import sys
        from rl_mismatch.metric_writing import MetricWriter
        writer = MetricWriter({str(tmp_path)!r})
        writer.write(0, {{"loss": 0.5}})
        writer.close()
        assert "torch" not in sys.modules, "tensorboardX imported torch"
        import torch  # the mark is gone
        print(torch.__version__)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert _tensorboard_scalars(tmp_path) == {("loss", 0): 0.5}


def _write_rows(workdir, steps):
    writer = MetricWriter(workdir, tensorboard=False)
    for step in steps:
        writer.hold(step, {"reward/mean": float(step)})
    writer.close()


def test_resume_drops_rows_after_the_checkpoint_and_a_cut_last_line_quietly(tmp_path, caplog):
    _write_rows(tmp_path, range(6))
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "reward/me')  # killed mid-write
    caplog.set_level(logging.INFO)
    MetricWriter(tmp_path, resume_step=4, tensorboard=False).close()
    assert [r["step"] for r in read_metrics(tmp_path)] == [0, 1, 2, 3]
    assert "line 7 is malformed (cut short" in caplog.text
    assert not any(r.levelno >= logging.WARNING for r in caplog.records)
    assert not (tmp_path / GAPS_NAME).exists()


def test_a_malformed_row_is_reported_and_the_gap_recorded(tmp_path, caplog):
    _write_rows(tmp_path, range(8))
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines(keepends=True)
    lines[5] = '{"step": 5, "reward/mean": 5.0 garbage\n'
    (tmp_path / "metrics.jsonl").write_text("".join(lines))
    caplog.set_level(logging.INFO)
    MetricWriter(tmp_path, resume_step=6, tensorboard=False).close()
    assert [r["step"] for r in read_metrics(tmp_path)] == [0, 1, 2, 3, 4]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(warnings) == 1 and "line 6 is malformed" in warnings[0]
    assert len(errors) == 1 and "no row for step(s) 5" in errors[0]
    record = json.loads((tmp_path / GAPS_NAME).read_text())
    assert record == [{"resumed_at_step": 6, "missing_steps": [5],
                       "malformed_lines": [{"line": 6, "text": '{"step": 5, "reward/mean": 5.0 garbage'}]}]
    # A second resume with the gap still there adds to the record instead of replacing it.
    MetricWriter(tmp_path, resume_step=5, tensorboard=False).close()
    assert len(json.loads((tmp_path / GAPS_NAME).read_text())) == 1  # step 5 is >= 5 now: no gap
    MetricWriter(tmp_path, resume_step=6, tensorboard=False).close()
    assert [e["missing_steps"] for e in json.loads((tmp_path / GAPS_NAME).read_text())] == [[5], [5]]


def test_scan_reports_line_numbers_of_non_rows(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 0}\n[1, 2]\n{"no_step": 1}\n{"step": 1}\n')
    rows, malformed = scan_metrics(tmp_path)
    assert [r["step"] for r in rows] == [0, 1]
    assert [n for n, _ in malformed] == [2, 3]


def test_a_failed_write_names_the_step_and_leaves_no_cut_line(tmp_path):
    writer = MetricWriter(tmp_path, tensorboard=False)
    writer.hold(0, {"reward/mean": 0.0})
    writer.flush()

    class FullDisk:  # Writes half the line, then fails as a full disk does.
        def __init__(self, f):
            self._f = f

        def write(self, text):
            self._f.write(text[: len(text) // 2])
            self._f.flush()
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name):
            return getattr(self._f, name)

    real = writer._file
    writer._file = FullDisk(real)
    writer.hold(1, {"reward/mean": 1.0})
    with pytest.raises(MetricsWriteError, match="step 1's metrics .* No space left on device"):
        writer.flush()
    writer._file = real
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") == 1
    assert scan_metrics(tmp_path) == ([{"step": 0, "reward/mean": 0.0}], [])
    writer.flush()  # the row is still held: written once the disk has room again
    writer.close()
    assert [r["step"] for r in read_metrics(tmp_path)] == [0, 1]


def test_amend_adds_to_the_held_row_only(tmp_path):
    writer = MetricWriter(tmp_path, tensorboard=False)
    writer.hold(0, {"a": 1.0})
    writer.amend(0, {"time/step_s": 2.0})
    writer.flush()
    with pytest.raises(KeyError, match="No row of step 0 is held"):
        writer.amend(0, {"late": 1.0})
    writer.close()
    assert read_metrics(tmp_path) == [{"step": 0, "a": 1.0, "time/step_s": 2.0}]


def test_sampled_replies_are_appended_and_dropped_on_resume(tmp_path):
    writer = MetricWriter(tmp_path, tensorboard=True)
    for step in (0, 2, 4):
        writer.write_samples(step, [{"question": "q", "response": f"r{step}", "reward": 1.0}])
    writer.close()
    with open(tmp_path / "samples.jsonl", "a") as f:
        f.write('{"step": 6, "resp')  # Cut short by a kill.
    MetricWriter(tmp_path, resume_step=3, tensorboard=False).close()
    with open(tmp_path / "samples.jsonl") as f:
        assert [json.loads(line)["response"] for line in f] == ["r0", "r2"]
    assert glob.glob(str(tmp_path / "tensorboard" / "events.*"))
