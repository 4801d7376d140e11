"""Per-run outcomes of an RL study: did a run become unstable, when, why, and how much mismatch.

A study runs several arms (config variants) for several seeds; each run writes one metrics row
per RL step (``metrics.jsonl``; see :mod:`rl_mismatch.metric_writing`), and every few steps a
row also carries a held-out evaluation (``eval/accuracy`` etc.: greedy decoding on the task's
eval split of the policy that sampled that step). This module turns those rows into numbers a
report can compare across arms:

* :class:`InstabilityCriterion`: the one definition of "this run became unstable" (a
  non-finite training metric, a collapse of the eval accuracy below a fraction of its running
  best, or replies that no longer end within the token budget); :meth:`InstabilityCriterion.describe` states it in words for reports.
* :func:`run_outcome`: a :class:`RunOutcome` per run (instability, final / best eval accuracy,
  area and growth of the k3 mismatch, surge of the response length).
* :func:`aggregate`: per-step median, min, max and quartiles of one metric over seeds.

Pure NumPy and the standard library: no JAX, no matplotlib (a notebook or a report can import
it cheaply). Rows are plain dicts as :func:`rl_mismatch.metric_writing.read_metrics` returns
them; values may be NaN or +-inf (JSON ``NaN`` / ``Infinity``), list-valued metrics are ignored.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

Row = Mapping[str, Any]

EVAL_ACCURACY = "eval/accuracy"
FINISHED = "rollout/finished_frac"
K3 = "mismatch/k3"
RESPONSE_LENGTH = "rollout/response_length_mean"
# Steps at each end of a run whose medians give the k3 growth and the length-surge baseline.
END_WINDOW = 5


def is_scalar(value: Any) -> bool:
    """True for a number a metric row can hold as a scalar (int or float, not bool, not a list)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _sorted(rows: Sequence[Row]) -> list[Row]:
    return sorted(rows, key=lambda r: int(r["step"]))


def is_training_row(row: Row) -> bool:
    """True unless the row holds nothing but ``eval/*`` metrics and their ``time/eval_s`` (e.g. a
    final evaluation logged after the last update); such rows are not RL steps."""
    return any(k not in ("step", "time/eval_s") and not k.startswith("eval/") for k in row)


@dataclasses.dataclass(frozen=True)
class InstabilityCriterion:
    """When a run counts as unstable, and from which step.

    Three rules; the run is unstable from the earliest step any of them fires:

    * **non-finite**: a row where one of ``nonfinite_keys`` or ``eval/accuracy`` is present and
      NaN or +-inf (a key a row lacks is not checked). A present-but-NaN eval accuracy is
      non-finite, not a missing evaluation.
    * **eval collapse**: ``consecutive`` evaluations in a row with accuracy below
      ``drop`` x the best accuracy of the run's earlier evaluations, provided that best is at
      least ``min_best`` (a run that never learned cannot collapse). A run's final evaluation
      below that threshold also counts on its own, once the run is finished. The step reported
      is that of the first evaluation of the run below the threshold.
    * **budget collapse**: ``unfinished_steps`` training steps in a row where the fraction of
      rollouts that end (``rollout/finished_frac``) is below ``min_finished``: the policy has
      degenerated into replies that run to the token budget (repeating itself), the collapse
      the length surge foretells. The held-out accuracy need not fall with it when the answer
      comes first and the repetition after. The step reported is the first of the streak.

    Attributes:
      drop: fraction of the running best below which an evaluation counts as collapsed.
      min_best: the running best eval accuracy from which the collapse rule applies.
      consecutive: evaluations below the threshold in a row that make a collapse.
      nonfinite_keys: training metrics that make a run unstable when non-finite
        (``loss/policy`` is the policy loss logged by :func:`rl_mismatch.losses.compute_policy_loss`).
      min_finished: the finished fraction below which a step counts towards a budget collapse
        (0 turns the rule off). The default, 1/8, is "fewer than 2 of 16 rollouts end".
      unfinished_steps: steps in a row below ``min_finished`` that make a budget collapse.
    """

    drop: float = 0.5
    min_best: float = 0.2
    consecutive: int = 2
    nonfinite_keys: tuple[str, ...] = ("loss/policy", "mismatch/k3", "reward/mean", "opt/grad_norm")
    min_finished: float = 0.125
    unfinished_steps: int = 3

    def __post_init__(self):
        if self.consecutive < 1:
            raise ValueError(f"InstabilityCriterion.consecutive = {self.consecutive}: must be >= 1.")
        if self.unfinished_steps < 1:
            raise ValueError(f"InstabilityCriterion.unfinished_steps = {self.unfinished_steps}: must be >= 1.")
        if not 0 <= self.min_finished <= 1:
            raise ValueError(f"InstabilityCriterion.min_finished = {self.min_finished}: must be in [0, 1].")
        if not 0 < self.drop <= 1:
            raise ValueError(f"InstabilityCriterion.drop = {self.drop}: must be in (0, 1].")

    def describe(self) -> str:
        """The rule in two plain sentences with its numbers (reports quote it verbatim)."""
        names = [f"`{k}`" for k in (*self.nonfinite_keys, EVAL_ACCURACY)]
        keys = ", ".join(names[:-1]) + " or " + names[-1]
        threshold = (f"below {self.drop:g} x the best accuracy of the run's earlier evaluations, "
                     f"provided that best is at least {self.min_best:g}")
        if self.consecutive == 1:
            collapse = f"the first held-out evaluation with accuracy {threshold}"
        else:
            collapse = (f"the first of {self.consecutive} consecutive held-out evaluations with accuracy "
                        f"{threshold} (in a finished run, trailing evaluations below that threshold at the "
                        f"end of the run count even if fewer than {self.consecutive})")
        text = (f"A run is unstable from the first step at which any of {keys} is NaN or infinite. "
                f"It is also unstable from {collapse}.")
        if self.min_finished > 0:
            text += (f" And it is unstable from the first of {self.unfinished_steps} consecutive steps in which "
                     f"fewer than {self.min_finished:g} of the rollouts end within the token budget "
                     "(`rollout/finished_frac`): a budget collapse.")
        return text

    def first_unstable_step(self, rows: Sequence[Row], *, finished: bool = True) -> tuple[int | None, str | None]:
        """The step from which the run is unstable and why, or ``(None, None)``.

        Args:
          rows: the run's metric rows, any order (sorted by ``step`` here).
          finished: whether the run is complete. Only then does a trailing collapse shorter than
            ``consecutive`` evaluations (ending in the final evaluation) count: an unfinished
            run's next evaluation may still recover.

        Returns:
          ``(step, cause)``: cause is ``"non-finite <key>"``, ``"eval collapse"`` or ``"budget
          collapse"``, whichever fires at the earliest step (at one step, in that order). For a
          collapse, the step is the first of the streak.

        >>> rows = [{"step": s, "eval/accuracy": a} for s, a in enumerate([0.4, 0.5, 0.2, 0.1])]
        >>> InstabilityCriterion().first_unstable_step(rows)
        (2, 'eval collapse')
        >>> InstabilityCriterion().first_unstable_step([{"step": 0, "mismatch/k3": float("nan")}])
        (0, 'non-finite mismatch/k3')
        """
        rows = _sorted(rows)
        found = [hit for hit in (self._nonfinite(rows), self._eval_collapse(rows, finished),
                                 self._budget_collapse(rows)) if hit[0] is not None]
        return min(found, key=lambda hit: hit[0]) if found else (None, None)

    def _nonfinite(self, rows: Sequence[Row]) -> tuple[int | None, str | None]:
        for row in rows:
            for key in (*self.nonfinite_keys, EVAL_ACCURACY):
                value = row.get(key)
                if is_scalar(value) and not math.isfinite(value):
                    return int(row["step"]), f"non-finite {key}"
        return None, None

    def _eval_collapse(self, rows: Sequence[Row], finished: bool) -> tuple[int | None, str | None]:
        best = -math.inf
        streak_start, streak = None, 0
        for row in rows:
            acc = row.get(EVAL_ACCURACY)
            if not is_scalar(acc) or not math.isfinite(acc):
                continue
            if best >= self.min_best and acc < self.drop * best:
                if streak == 0:
                    streak_start = int(row["step"])
                streak += 1
                if streak >= self.consecutive:
                    return streak_start, "eval collapse"
            else:
                streak_start, streak = None, 0
            best = max(best, acc)
        if finished and streak > 0:
            return streak_start, "eval collapse"
        return None, None

    def _budget_collapse(self, rows: Sequence[Row]) -> tuple[int | None, str | None]:
        streak_start, streak = None, 0
        for row in rows:
            finished_frac = row.get(FINISHED)
            if not is_scalar(finished_frac):
                continue  # An eval-only row: not a step of rollouts.
            if finished_frac < self.min_finished:
                streak_start = int(row["step"]) if streak == 0 else streak_start
                streak += 1
                if streak >= self.unfinished_steps:
                    return streak_start, "budget collapse"
            else:
                streak_start, streak = None, 0
        return None, None


@dataclasses.dataclass(frozen=True)
class RunOutcome:
    """What one run came to (see :func:`run_outcome`). NaN where a run has no such data.

    Attributes:
      unstable: the criterion fired.
      step: the step it fired at (None if stable).
      cause: ``"non-finite <key>"``, ``"eval collapse"`` or ``"budget collapse"`` (None if stable).
      steps_done: training rows (RL steps) the run has written.
      final_eval_accuracy: eval accuracy of the run's last evaluation (NaN: no evaluation yet).
      final_eval_step: the step of that evaluation (None: no evaluation yet).
      best_eval_accuracy: the best finite eval accuracy.
      k3_area: trapezoid integral of ``mismatch/k3`` over step, finite values only.
      k3_growth: median k3 of the last 5 steps / median k3 of the first 5 (steps 0-4); inf when
        the run starts at exactly zero mismatch and ends above it.
      max_response_length: the largest ``rollout/response_length_mean``.
      length_surge: that maximum / the median response length of the first 5 steps.
    """

    unstable: bool
    step: int | None
    cause: str | None
    steps_done: int
    final_eval_accuracy: float
    final_eval_step: int | None
    best_eval_accuracy: float
    k3_area: float
    k3_growth: float
    max_response_length: float
    length_surge: float


def _finite_series(rows: Sequence[Row], key: str) -> tuple[np.ndarray, np.ndarray]:
    """``(steps, values)`` of the rows where ``key`` is a finite scalar: int64 [n], float64 [n]."""
    pairs = [(int(r["step"]), float(r[key])) for r in rows
             if is_scalar(r.get(key)) and math.isfinite(r[key])]
    steps = np.array([p[0] for p in pairs], dtype=np.int64)
    return steps, np.array([p[1] for p in pairs], dtype=np.float64)


def _median(values: Sequence[float]) -> float:
    """Median of the finite values (NaN if there are none)."""
    a = np.asarray(values, dtype=np.float64)
    a = a[np.isfinite(a)]
    return float(np.median(a)) if a.size else math.nan


def _ratio(num: float, den: float) -> float:
    """``num / den`` with IEEE semantics (x/0 = inf, 0/0 = NaN) and no warning."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return float(np.float64(num) / np.float64(den))


def _ends(rows: Sequence[Row], key: str) -> tuple[list[float], list[float]]:
    """The values of ``key`` in the first and in the last :data:`END_WINDOW` training rows."""
    values = [float(r[key]) if is_scalar(r.get(key)) else math.nan for r in rows]
    return values[:END_WINDOW], values[-END_WINDOW:]


def run_outcome(rows: Sequence[Row], criterion: InstabilityCriterion = InstabilityCriterion(),
                total_steps: int | None = None) -> RunOutcome:
    """The :class:`RunOutcome` of one run's metric rows.

    Args:
      rows: the run's rows (any order; list-valued metrics are ignored).
      criterion: the instability rule.
      total_steps: the steps the run is meant to take; a run with fewer training rows is
        unfinished (see ``finished`` of :meth:`InstabilityCriterion.first_unstable_step`).
        None: treat the run as finished.
    """
    rows = _sorted(rows)
    train = [r for r in rows if is_training_row(r)]
    finished = total_steps is None or len(train) >= total_steps
    step, cause = criterion.first_unstable_step(rows, finished=finished)

    eval_steps, eval_acc = _finite_series(rows, EVAL_ACCURACY)
    evals = [r for r in rows if EVAL_ACCURACY in r and is_scalar(r[EVAL_ACCURACY])]
    final_acc = float(evals[-1][EVAL_ACCURACY]) if evals else math.nan
    final_step = int(evals[-1]["step"]) if evals else None

    k3_steps, k3 = _finite_series(train, K3)
    k3_area = float(np.trapezoid(k3, k3_steps)) if k3.size else math.nan
    k3_first, k3_last = _ends(train, K3)

    _, lengths = _finite_series(train, RESPONSE_LENGTH)
    max_len = float(lengths.max()) if lengths.size else math.nan
    len_first, _ = _ends(train, RESPONSE_LENGTH)

    return RunOutcome(
        unstable=step is not None, step=step, cause=cause, steps_done=len(train),
        final_eval_accuracy=final_acc, final_eval_step=final_step,
        best_eval_accuracy=float(eval_acc.max()) if eval_acc.size else math.nan,
        k3_area=k3_area, k3_growth=_ratio(_median(k3_last), _median(k3_first)),
        max_response_length=max_len, length_surge=_ratio(max_len, _median(len_first)))


def aggregate(runs: Mapping[Any, Sequence[Row]], key: str) -> dict[str, np.ndarray]:
    """Per-step statistics of metric ``key`` across seeds.

    Args:
      runs: ``{seed: rows}``; runs may have different lengths (unfinished runs).
      key: a scalar metric; a value that is missing, a list, NaN or +-inf does not count.

    Returns:
      ``{"step": int64 [S], "n": int64 [S], "median", "min", "max", "q25", "q75": float64 [S]}``
      over the S steps (ascending) at which at least one seed has a finite value; the
      statistics at a step are over the ``n`` seeds with a finite value there (quartiles:
      ``np.percentile``, linear interpolation).
    """
    per_seed = []
    for rows in runs.values():
        steps, values = _finite_series(rows, key)
        per_seed.append(dict(zip(steps.tolist(), values.tolist())))  # A repeated step: the last row wins.
    steps = sorted(set().union(*per_seed)) if per_seed else []
    out = {name: np.zeros(len(steps), np.float64) for name in ("median", "min", "max", "q25", "q75")}
    out["step"] = np.array(steps, dtype=np.int64)
    out["n"] = np.zeros(len(steps), np.int64)
    for i, step in enumerate(steps):
        values = np.array([d[step] for d in per_seed if step in d], dtype=np.float64)
        out["n"][i] = values.size
        out["median"][i] = np.median(values)
        out["min"][i] = values.min()
        out["max"][i] = values.max()
        out["q25"][i], out["q75"][i] = np.percentile(values, [25, 75])
    return out
