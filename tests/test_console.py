"""What a run prints: the step lines, the closing summary, the filter on the libraries' chatter."""

import logging
import math

from rl_mismatch import console


def _row(step, step_s, **extra):
    return {"step": step, "reward/mean": 0.5, "reward/accuracy": 0.25, "reward/format": 1.0,
            "rollout/response_length_mean": 20.0, "rollout/finished_frac": 1.0, "mismatch/k3": 1e-3,
            "mismatch/prob_diff_max": 0.1, "lr/scale": 1.0, "time/step_s": step_s, "time/sample_s": 1.0,
            "time/train_s": 2.0, "time/compile_s": 0.0, "time/tokens_per_s": 320.0, **extra}


def test_step_lines_are_numbered_as_the_metrics_with_an_eta_from_the_steady_steps():
    lines = []
    log = console.StepLog(steps=10, every=1, emit=lines.append)
    log(_row(0, 60.0, **{"time/compile_s": 50.0}))  # The compiling step: no estimate from it.
    log(_row(1, 4.0, **{"time/checkpoint_s": 0.01}))  # No save: a few ms of flushing the metrics file.
    log(_row(2, 6.0, **{"eval/accuracy": 0.375, "time/eval_s": 1.5, "time/checkpoint_s": 2.3}))
    assert lines[0].startswith("step 0 (1/10) | ") and "compile 50.0" in lines[0] and "ETA" not in lines[0]
    assert lines[1].startswith("step 1 (2/10) | ") and lines[1].endswith("| ETA 32s")  # 8 steps x 4 s.
    assert "| eval acc 0.375 |" in lines[2] and "eval 1.5)" in lines[2] and lines[2].endswith("| ETA 35s")
    assert "(sample 1.0, train 2.0, checkpoint 2.3, eval 1.5)" in lines[2]
    assert "320 tok/s" in lines[1] and "compile" not in lines[1] and "checkpoint" not in lines[1]
    log(_row(9, 5.0))  # The last step: no ETA.
    assert lines[-1].startswith("step 9 (10/10)") and "ETA" not in lines[-1]
    log({"step": 10, "eval/accuracy": 0.5, "eval/format": 1.0, "eval/response_length_mean": 18.0,
         "eval/finished_frac": 1.0, "time/eval_s": 2.0})
    assert lines[-1] == "after step 9 | eval acc 0.500 fmt 1.000 len 18.0 fin 1.00"


def test_step_lines_every_n_and_missing_values():
    lines = []
    log = console.StepLog(steps=5, every=2, emit=lines.append)
    for step in range(5):
        log({"step": step, "time/step_s": 1.0})
    assert [line.split(" |")[0] for line in lines] == ["step 1 (2/5)", "step 3 (4/5)", "step 4 (5/5)"]
    assert "reward - acc -" in lines[0]  # A metric the row lacks prints as "-".
    assert console._duration(75) == "1m15s" and console._duration(4000) == "1h06m" and console._duration(8) == "8s"


def test_summary_names_accuracy_mismatch_stability_and_outputs(tmp_path):
    rows = [_row(s, 1.0, **{"mismatch/k3": k3}) for s, k3 in enumerate([1e-3, 4e-2, 2e-3])]
    rows[0]["eval/accuracy"] = 0.375
    rows.append({"step": 3, "eval/accuracy": 0.5, "time/eval_s": 1.0})
    (tmp_path / "samples.jsonl").write_text("")
    lines = console.summary(str(tmp_path), rows, steps=3)
    assert lines[0] == f"Run finished: 3/3 steps in {tmp_path}."
    assert lines[1] == "  held-out accuracy: 0.375 at step 0, 0.500 after step 2 (best 0.500 after step 2)"
    assert lines[2] == "  mismatch k3: 1.00e-03 at step 0, 2.00e-03 at step 2 (peak 4.00e-02 at step 1)"
    assert lines[3] == "  stability: stable by the studies' criterion"
    assert any("samples.jsonl" in line for line in lines)
    assert lines[-1] == f"  plot: python -m experiments.plot --workdir {tmp_path} --out {tmp_path}/run.png"
    collapsed = [{**r, "rollout/finished_frac": 0.0} for r in rows[:3]]
    assert "unstable from step 0 (budget collapse)" in "\n".join(console.summary(str(tmp_path), collapsed, 3))
    # A run with no evaluation and a NaN k3 still summarises.
    lines = console.summary(str(tmp_path), [_row(0, 1.0, **{"mismatch/k3": math.nan})], steps=2)
    assert lines[0].startswith("Run finished: 1/2 steps") and not any("held-out" in line for line in lines)


def _record(pathname, level, message):
    return logging.LogRecord("absl", level, pathname, 1, message, None, None)


def test_library_chatter_is_dropped_and_warnings_are_kept():
    console.quiet_library_logs()
    console.quiet_library_logs()  # Idempotent.
    absl = logging.getLogger("absl")
    assert sum(isinstance(f, console._LibraryNoise) for f in absl.filters) == 1
    keep = absl.filter  # True: the record would be printed.
    site = "/venv/lib/python3.11/site-packages"
    assert not keep(_record(f"{site}/tensorflow_datasets/core/dataset_builder.py", logging.WARNING,
                            "Using custom data configuration: ..."))
    assert keep(_record(f"{site}/tensorflow_datasets/core/dataset_builder.py", logging.ERROR, "Failed"))
    assert not keep(_record(f"{site}/orbax/checkpoint/x.py", logging.INFO, "Saving"))
    assert keep(_record(f"{site}/orbax/checkpoint/x.py", logging.WARNING, "Something odd"))
    assert keep(_record("/repo/rl_mismatch/experiment.py", logging.INFO, "step 0 (1/4) | ..."))
    jax_backend = logging.getLogger("jax._src.xla_bridge")
    assert not jax_backend.filter(_record(f"{site}/jax/_src/xla_bridge.py", logging.INFO,
                                          "Unable to initialize backend 'tpu': INTERNAL: libtpu.so"))
    assert jax_backend.filter(_record(f"{site}/jax/_src/xla_bridge.py", logging.WARNING,
                                      "An NVIDIA GPU may be present on this machine, but ..."))
