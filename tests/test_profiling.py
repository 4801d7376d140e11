"""``log.profile_step``: a ``jax.profiler`` trace of one RL step of a real (tiny) run."""

from __future__ import annotations

import gzip
import json
import logging

import pytest

from rl_mismatch import experiment
from rl_mismatch.metric_writing import read_metrics


@pytest.mark.parametrize("value", [-2, -10])
def test_a_negative_profile_step_other_than_off_is_a_clear_error(value, tiny_cfg):
    with pytest.raises(ValueError, match=rf"config.log.profile_step = {value} must be a step \(>= 0\), or -1"):
        tiny_cfg(**{"log.profile_step": value})


def test_profiling_is_off_by_default(tiny_cfg):
    assert tiny_cfg().log.profile_step == -1


@pytest.mark.slow
def test_profile_step_writes_a_trace_of_that_step(tmp_path, caplog, tiny_cfg):
    """Step 1 of a 2-step run is traced: one trace folder with the xplane file (written by jax
    itself: no profiler plugin needed) and a Perfetto file holding the step's sampling and update; the
    run's rows are all there, and the log says where the trace is and how to open it."""
    caplog.set_level(logging.INFO, logger="absl")
    experiment.run(tiny_cfg(steps=2, **{"log.profile_step": 1}), tmp_path)
    runs = list((tmp_path / experiment.PROFILE_DIR / "plugins" / "profile").iterdir())
    assert len(runs) == 1, runs  # One trace: only step 1 was profiled.
    assert list(runs[0].glob("*.xplane.pb"))
    with gzip.open(runs[0] / "perfetto_trace.json.gz") as f:
        names = {event.get("name", "") for event in json.load(f)["traceEvents"]}
    # The sampler's and the train step's jitted calls, and their kernels.
    assert {"PjitFunction(_generate)", "PjitFunction(_train_step)"} <= names
    assert any(name.endswith("_fusion") for name in names)
    assert [r["step"] for r in read_metrics(tmp_path)] == [0, 1]
    assert f"Step 1: profiler trace written under {tmp_path / experiment.PROFILE_DIR}" in caplog.text
    assert "ui.perfetto.dev" in caplog.text and "tensorboard --logdir" in caplog.text
