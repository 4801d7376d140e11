"""MetricWriter: non-finite scalars reach both sinks without tensorboardX's generic warning."""

import glob
import logging
import math
import struct

from tensorboardX.proto import event_pb2
from tensorboardX.x2num import make_np

from rl_mismatch.metric_writing import MetricWriter, read_metrics


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
