"""What a run prints: one line per step, a closing summary, and none of the libraries' routine chatter.

* :func:`quiet_library_logs`: drops the INFO records of orbax (a dozen lines per checkpoint) and
  tensorflow-datasets (dataset info, shuffling, "custom data configuration"), and JAX's
  "Unable to initialize backend 'tpu'" probe on hosts without a TPU. Warnings and errors of
  JAX and orbax still print. The task builders log one line per dataset in their place.
* :class:`StepLog`: one line per step, numbered as in ``metrics.jsonl`` (0-based) with the count
  of steps done, the generated tokens per second and an estimate of the time left.
* :func:`summary`: the lines a finished run ends with: held-out accuracy, the mismatch at the
  start and the end, whether the study criterion calls the run unstable, where the outputs are
  and the plot command.

Pure host code (no JAX computation): it reads metric rows as
:mod:`rl_mismatch.metric_writing` writes them.
"""

from __future__ import annotations

import logging as std_logging
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from rl_mismatch import outcomes
from rl_mismatch.metric_writing import JSONL_NAME, SAMPLES_NAME, TENSORBOARD_DIR

Row = dict[str, Any]

_QUIET_PATHS = ("/orbax/", "/tensorflow_datasets/")
_TPU_PROBE = "Unable to initialize backend 'tpu'"


class _LibraryNoise(std_logging.Filter):
    """Keeps a record unless it is routine output of orbax or tensorflow-datasets (below ERROR
    for tfds, whose warnings about our local builders are routine, below WARNING for orbax) or
    JAX's TPU probe."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        path = record.pathname.replace(os.sep, "/")
        if "/tensorflow_datasets/" in path:
            return record.levelno >= std_logging.ERROR
        if "/orbax/" in path:
            return record.levelno >= std_logging.WARNING
        return not (record.levelno < std_logging.WARNING and record.getMessage().startswith(_TPU_PROBE))


def quiet_library_logs() -> None:
    """Installs the filter (see the module docstring) on the loggers the libraries write through:
    ``absl`` (orbax and tfds log with absl, printed by absl's handler under ``app.run`` or the
    root logger's in a notebook) and JAX's backend logger. Calling it again adds nothing."""
    for name in ("absl", "jax._src.xla_bridge"):
        logger = std_logging.getLogger(name)
        if not any(isinstance(f, _LibraryNoise) for f in logger.filters):
            logger.addFilter(_LibraryNoise())


def _duration(seconds: float) -> str:
    """``75 -> '1m15s'``, ``4000 -> '1h06m'``, ``8 -> '8s'``."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class StepLog:
    """Formats (and hands to ``emit``) one line per ``every``-th step row, and the final eval row.

    The estimate of the time left is the mean ``time/step_s`` of the steps this process has run
    after its first (which compiles) times the steps left; the first line has none. A line
    reads::

      step 22 (23/30) | reward 0.438 acc 0.438 fmt 1.000 | len 17.4 fin 1.00 | k3 1.99e-02
        dp_max 6.01e-01 | lr x1.000 | 22.8 s (sample 5.7, train 17.1) 61 tok/s | ETA 2m59s

    The parentheses hold the step's phases: ``compile`` (tracing and compiling, inside the other
    phases), ``checkpoint`` (a save's time in the step) and ``eval`` when they took any.

    Args:
      steps: the run's total steps.
      every: log every N-th step (and the last).
      emit: ``emit(line)``, e.g. ``absl.logging.info``.
    """

    def __init__(self, steps: int, every: int, emit):
        self.steps, self.every, self._emit = steps, every, emit
        self._times: list[float] = []

    def __call__(self, row: Row) -> None:
        step = int(row["step"])
        if step >= self.steps:  # The trained policy's evaluation, after the last update.
            self._emit(f"after step {self.steps - 1} | eval acc {_num(row, 'eval/accuracy', '.3f')} "
                       f"fmt {_num(row, 'eval/format', '.3f')} len {_num(row, 'eval/response_length_mean', '.1f')} "
                       f"fin {_num(row, 'eval/finished_frac', '.2f')}")
            return
        if outcomes.is_scalar(row.get("time/step_s")):
            self._times.append(float(row["time/step_s"]))
        if (step + 1) % self.every and step + 1 != self.steps:
            return
        self._emit(self.format(row))

    def eta_seconds(self, step: int) -> float:
        """Estimated seconds left after ``step``, from the step times seen so far (NaN: none)."""
        steady = self._times[1:]  # The first step compiles: no estimate from it alone.
        return (self.steps - step - 1) * float(np.mean(steady)) if steady else math.nan

    def format(self, row: Row) -> str:
        step = int(row["step"])
        compile_s, save_s = row.get("time/compile_s", 0.0), row.get("time/checkpoint_s", 0.0)
        times = (f"{_num(row, 'time/step_s', '.1f')} s (sample {_num(row, 'time/sample_s', '.1f')}, "
                 f"train {_num(row, 'time/train_s', '.1f')}"
                 + (f", compile {compile_s:.1f}" if outcomes.is_scalar(compile_s) and compile_s >= 0.05 else "")
                 + (f", checkpoint {save_s:.1f}" if outcomes.is_scalar(save_s) and save_s >= 0.05 else "")
                 + (f", eval {row['time/eval_s']:.1f}" if outcomes.is_scalar(row.get("time/eval_s")) else "") + ")")
        eta = self.eta_seconds(step)
        parts = [
            f"step {step} ({step + 1}/{self.steps})",
            f"reward {_num(row, 'reward/mean', '.3f')} acc {_num(row, 'reward/accuracy', '.3f')} "
            f"fmt {_num(row, 'reward/format', '.3f')}",
            f"len {_num(row, 'rollout/response_length_mean', '.1f')} fin {_num(row, 'rollout/finished_frac', '.2f')}",
            f"k3 {_num(row, 'mismatch/k3', '.2e')} dp_max {_num(row, 'mismatch/prob_diff_max', '.2e')}",
            f"lr x{_num(row, 'lr/scale', '.3f')}",
            f"{times} {_num(row, 'time/tokens_per_s', '.0f')} tok/s",
        ]
        if "eval/accuracy" in row:
            parts.insert(2, f"eval acc {_num(row, 'eval/accuracy', '.3f')}")
        if step + 1 < self.steps and math.isfinite(eta):
            parts.append(f"ETA {_duration(eta)}")
        return " | ".join(parts)


def _num(row: Row, key: str, spec: str) -> str:
    value = row.get(key)
    return format(float(value), spec) if outcomes.is_scalar(value) else "-"


def summary(workdir: str, rows: Sequence[Row], steps: int,
            criterion: outcomes.InstabilityCriterion = outcomes.InstabilityCriterion()) -> list[str]:
    """The lines a run ends with (see the module docstring), from its metric rows.

    Args:
      workdir: the run directory (named in the lines).
      rows: the run's rows (:func:`rl_mismatch.metric_writing.read_metrics`).
      steps: the run's total steps.
      criterion: the instability rule of the studies (``rl_mismatch.outcomes``).
    """
    rows = sorted(rows, key=lambda r: int(r["step"]))
    train = [r for r in rows if outcomes.is_training_row(r)]
    lines = [f"Run finished: {len(train)}/{steps} steps in {workdir}."]
    evals = [r for r in rows if outcomes.is_scalar(r.get(outcomes.EVAL_ACCURACY))]
    if evals:
        first, last = evals[0], evals[-1]
        best = max(evals, key=lambda r: r[outcomes.EVAL_ACCURACY])
        when = (lambda r: f"after step {steps - 1}" if int(r["step"]) >= steps else f"at step {r['step']}")
        lines.append(f"  held-out accuracy: {first[outcomes.EVAL_ACCURACY]:.3f} {when(first)}, "
                     f"{last[outcomes.EVAL_ACCURACY]:.3f} {when(last)} (best {best[outcomes.EVAL_ACCURACY]:.3f} "
                     f"{when(best)})")
    k3 = [(int(r["step"]), float(r[outcomes.K3])) for r in train if outcomes.is_scalar(r.get(outcomes.K3))]
    if k3:
        peak = max(k3, key=lambda p: p[1] if math.isfinite(p[1]) else -math.inf)
        lines.append(f"  mismatch k3: {k3[0][1]:.2e} at step {k3[0][0]}, {k3[-1][1]:.2e} at step {k3[-1][0]} "
                     f"(peak {peak[1]:.2e} at step {peak[0]})")
    step, cause = criterion.first_unstable_step(rows, finished=len(train) >= steps)
    lines.append("  stability: " + (f"unstable from step {step} ({cause}) by the studies' criterion"
                                    if step is not None else "stable by the studies' criterion"))
    lines.append(f"  metrics: {os.path.join(workdir, JSONL_NAME)}; TensorBoard: "
                 f"tensorboard --logdir={os.path.join(workdir, TENSORBOARD_DIR)}")
    samples = os.path.join(workdir, SAMPLES_NAME)
    if os.path.exists(samples):
        lines.append(f"  sampled replies: {samples}")
    lines.append(f"  plot: python -m experiments.plot --workdir {workdir} --out {os.path.join(workdir, 'run.png')}")
    return lines
