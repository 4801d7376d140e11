r"""Report of a study (arms x seeds of RL runs): outcome tables, per-step aggregates, figures.

  python -m experiments.report --workdir=/tmp/study_main
  python -m experiments.report --workdir=/tmp/study_main --out=results/main

``--workdir`` is either a study workdir (``study.json`` and one run directory
``<arm label>/seed<k>/metrics.jsonl`` per arm and seed) or a folder this command wrote
(``study.json`` + ``metrics.jsonl.gz``). Into ``--out`` (default: ``--workdir``) it writes:

* ``metrics.jsonl.gz``: every scalar metric row of every run, with ``arm`` and ``seed`` keys
  added (arms in study.json order, then seeds, then steps), byte-reproducible;
* ``study.json``: a copy of the study's;
* ``report.md``: arms, the instability criterion, per-arm and per-seed outcomes
  (:mod:`rl_mismatch.outcomes`), eval-step tables and the figures;
* ``aggregates.csv``: median, min, max and quartiles over seeds of the plotted metrics at
  every step (``opt/grad_noise_scale_5step`` is the gradient noise scale from 5-step averages);
* ``study.png`` (one panel per metric: median over seeds and the min-max band, per arm) and
  ``outcomes.png`` (final eval accuracy vs k3 area, one point per run).

report.md depends only on the metric rows and study.json, so running this command on its own
output folder rebuilds it byte for byte. Unfinished runs are included and marked (or, with
``--finished_only``, left out like runs with no metrics yet, which are listed as missing).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import gzip
import io
import json
import math
import os
import shutil
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib
import numpy as np
from matplotlib.figure import Figure

from experiments.plot import NOISE_WINDOW, finish_panel, smoothed_noise_scale
from rl_mismatch import outcomes
from rl_mismatch.metric_writing import JSONL_NAME, read_metrics

STUDY_JSON = "study.json"
BUNDLE = "metrics.jsonl.gz"
REPORT_MD = "report.md"
AGGREGATES_CSV = "aggregates.csv"
STUDY_PNG = "study.png"
OUTCOMES_PNG = "outcomes.png"

# The gradient noise scale from NOISE_WINDOW-step averages (experiments.plot.smoothed_noise_scale),
# added to each row under this key; the logged opt/grad_noise_scale is one step's estimate.
NOISE_KEY = f"opt/grad_noise_scale_{NOISE_WINDOW}step"
# (metric key, panel title, log-scale y) of study.png.
PANELS = (
    ("eval/accuracy", "eval accuracy (greedy, eval split)", False),
    ("reward/mean", "reward (mean)", False),
    ("rollout/response_length_mean", "response length (tokens)", False),
    ("rollout/finished_frac", "replies that end within the budget", False),
    ("mismatch/k3", "k3 KL(mu || pi)", True),
    ("mismatch/prob_diff_max", "max |pi - mu|", False),
    (NOISE_KEY, f"gradient noise scale B_noise ({NOISE_WINDOW}-step estimate)", True),
    ("lr/scale", "LR multiplier", False),
    ("opt/update_norm", "update norm", False),
)
# Metrics aggregated into aggregates.csv besides those of PANELS.
EXTRA_METRICS = ("eval/response_length_mean", "eval/finished_frac", "eval/format", "reward/accuracy",
                 "opt/grad_norm")
# Columns of the eval-step tables: (metric key, column title).
EVAL_COLUMNS = (
    ("eval/accuracy", "eval accuracy"),
    ("eval/response_length_mean", "eval length"),
    ("rollout/response_length_mean", "rollout length"),
    ("mismatch/k3", "k3"),
)
STATS = ("n", "median", "min", "max", "q25", "q75")

Row = dict[str, Any]


@dataclasses.dataclass
class StudyRuns:
    """A study's spec (study.json) and the metric rows of its runs, as the report reads them.

    Attributes:
      spec: the parsed study.json (``name``, ``study_file``, ``steps``, ``seeds``, ``arms``).
      runs: ``{arm label: {seed: rows}}`` for every arm and seed of the spec; rows hold only
        scalar metrics, sorted by step; a run with no metrics has no rows.
    """

    spec: dict
    runs: dict[str, dict[int, list[Row]]]

    @property
    def labels(self) -> list[str]:
        return [arm["label"] for arm in self.spec["arms"]]

    @property
    def seeds(self) -> list[int]:
        return [int(s) for s in self.spec["seeds"]]

    @property
    def steps(self) -> int:
        return int(self.spec["steps"])

    def present(self, label: str) -> dict[int, list[Row]]:
        """``{seed: rows}`` of the arm's runs that have rows."""
        return {seed: rows for seed, rows in self.runs[label].items() if rows}


def scalar_row(row: Mapping[str, Any]) -> Row:
    """The row without list-valued (non-scalar) metrics."""
    return {k: v for k, v in row.items() if outcomes.is_scalar(v)}


def _run_path(workdir: str, label: str, seed: int) -> str:
    return os.path.join(workdir, label, f"seed{seed}", JSONL_NAME)


def load_study(workdir: str, finished_only: bool = False) -> StudyRuns:
    """The study in ``workdir``: run directories if it has any, else the bundle ``metrics.jsonl.gz``.

    ``finished_only``: leave out runs that have fewer training rows than the study's steps (runs
    in progress while the report is written), as if they had not started.

    Raises:
      ValueError: no study.json in ``workdir``.
    """
    path = os.path.join(workdir, STUDY_JSON)
    if not os.path.exists(path):
        raise ValueError(f"{workdir!r} has no {STUDY_JSON}: pass a study workdir or a folder "
                         "written by experiments.report.")
    with open(path, encoding="utf-8") as f:
        spec = json.load(f)
    labels = [arm["label"] for arm in spec["arms"]]
    seeds = [int(s) for s in spec["seeds"]]
    runs: dict[str, dict[int, list[Row]]] = {label: {seed: [] for seed in seeds} for label in labels}
    from_dirs = any(os.path.exists(_run_path(workdir, label, seed)) for label in labels for seed in seeds)
    if from_dirs or not os.path.exists(os.path.join(workdir, BUNDLE)):
        for label in labels:
            for seed in seeds:
                runs[label][seed] = [scalar_row(r) for r in read_metrics(_run_path(workdir, label, seed))]
    else:
        with gzip.open(os.path.join(workdir, BUNDLE), "rt", encoding="utf-8") as f:
            for line in f:
                row = json.loads(line)
                label, seed = row.pop("arm"), int(row.pop("seed"))
                if label in runs and seed in runs[label]:
                    runs[label][seed].append(row)
    for by_seed in runs.values():
        for seed, rows in by_seed.items():
            by_seed[seed] = sorted(rows, key=lambda r: int(r["step"]))
    if finished_only:
        steps = int(spec["steps"])
        runs = {label: {seed: rows if sum(map(outcomes.is_training_row, rows)) >= steps else []
                        for seed, rows in by_seed.items()} for label, by_seed in runs.items()}
    return StudyRuns(spec=spec, runs=runs)


def bundle_bytes(study: StudyRuns) -> bytes:
    """``metrics.jsonl.gz``'s bytes: one JSON object (sorted keys) per row, gzip with mtime 0."""
    lines = []
    for label in study.labels:
        for seed in study.seeds:
            for row in study.runs[label][seed]:
                lines.append(json.dumps({**row, "arm": label, "seed": seed}, sort_keys=True) + "\n")
    return gzip.compress("".join(lines).encode("utf-8"), mtime=0)


def with_noise_scale(rows: Sequence[Row], cfg: dict | None) -> list[Row]:
    """Rows with :data:`NOISE_KEY` added: the noise scale of
    :func:`experiments.plot.smoothed_noise_scale` (the logged one-step value where the
    config does not allow the estimate)."""
    try:
        smoothed = smoothed_noise_scale(rows, cfg)
    except (KeyError, TypeError):  # A config without the batch settings: no estimate possible.
        smoothed = rows
    return [{**row, NOISE_KEY: s["opt/grad_noise_scale"]} if "opt/grad_noise_scale" in s else dict(row)
            for row, s in zip(rows, smoothed)]


def aggregates(study: StudyRuns) -> dict[tuple[str, str], dict[str, np.ndarray]]:
    """``{(arm label, metric): outcomes.aggregate(...)}`` for the metrics of :data:`PANELS` and
    :data:`EXTRA_METRICS`. The noise scale uses the arm's config from study.json."""
    out = {}
    for arm in study.spec["arms"]:
        runs = {seed: with_noise_scale(rows, arm.get("config")) for seed, rows in study.present(arm["label"]).items()}
        for key in [k for k, _, _ in PANELS] + list(EXTRA_METRICS):
            out[(arm["label"], key)] = outcomes.aggregate(runs, key)
    return out


# ----------------------------------------------------------------------------------- formatting

def fmt(x: float | int | None) -> str:
    """3 significant digits; ``-`` for None / NaN (no data), ``inf`` / ``-inf``."""
    if x is None:
        return "-"
    x = float(x)
    if math.isnan(x):
        return "-"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return f"{x:.3g}"


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return lines


def _overrides(overrides: Mapping[str, Any] | None) -> str:
    if not overrides:
        return "(none)"
    return ", ".join(f"`{k}={v if isinstance(v, str) else json.dumps(v)}`" for k, v in overrides.items())


def _median(values: Sequence[float]) -> float:
    a = np.asarray(values, dtype=np.float64)
    a = a[~np.isnan(a)]  # inf stays: a median over runs that include an infinite growth is meaningful.
    return float(np.median(a)) if a.size else math.nan


def _progress(study: StudyRuns, rows: Sequence[Row]) -> str:
    done = sum(outcomes.is_training_row(r) for r in rows)
    return "done" if done >= study.steps else f"(in progress: {done}/{study.steps} steps)"


def _at_step(agg: Mapping[str, np.ndarray], step: int) -> str:
    """``median [min, max]`` of an aggregate at ``step`` (``-``: no data there)."""
    i = np.searchsorted(agg["step"], step)
    if i >= agg["step"].size or agg["step"][i] != step:
        return "-"
    median, lo, hi = agg["median"][i], agg["min"][i], agg["max"][i]
    return fmt(median) if agg["n"][i] == 1 else f"{fmt(median)} [{fmt(lo)}, {fmt(hi)}]"


def run_outcomes(study: StudyRuns, criterion: outcomes.InstabilityCriterion) -> dict[str, dict[int, outcomes.RunOutcome]]:
    """``{arm label: {seed: RunOutcome}}`` of the runs that have metrics (unfinished ones included)."""
    return {label: {seed: outcomes.run_outcome(rows, criterion, study.steps)
                    for seed, rows in study.present(label).items()} for label in study.labels}


def render_report(study: StudyRuns, criterion: outcomes.InstabilityCriterion,
                  results: Mapping[str, Mapping[int, outcomes.RunOutcome]],
                  aggs: Mapping[tuple[str, str], Mapping[str, np.ndarray]], figures: Sequence[str]) -> str:
    """report.md's text (deterministic: no time, no paths other than the figures' names).

    Args:
      study: the study.
      criterion: the instability rule (its `describe` is quoted).
      results: `run_outcomes` of the study under ``criterion``.
      aggs: `aggregates` of the study.
      figures: file names of the figures, relative to the report.
    """
    spec = study.spec
    lines = [
        f"# Study `{spec['name']}`",
        "",
        "Written by `python -m experiments.report --workdir=<study workdir> [--out=<folder>]`. The "
        f"folder holding this report also holds every scalar metric row of the study (`{BUNDLE}`) and "
        f"its `{STUDY_JSON}`: `python -m experiments.report --workdir=<that folder>` rebuilds this "
        "report byte for byte.",
        "",
        f"Study file: `{spec.get('study_file') or '-'}`. Seeds: {', '.join(map(str, study.seeds))}. "
        f"Steps per run: {study.steps}.",
        "",
        "## Arms",
        "",
        *_table(["arm", "description", "overrides"],
                [[f"`{a['label']}`", a.get("description", ""), _overrides(a.get("overrides"))] for a in spec["arms"]]),
        "",
        "## Runs",
        "",
    ]
    missing = [f"`{label}` seed {seed}" for label in study.labels for seed in study.seeds
               if not study.runs[label][seed]]
    unfinished = [f"`{label}` seed {seed} {_progress(study, rows)}" for label in study.labels
                  for seed, rows in study.present(label).items() if _progress(study, rows) != "done"]
    n_present = sum(len(study.present(label)) for label in study.labels)
    lines.append(f"{n_present} of {len(study.labels) * len(study.seeds)} runs have metrics.")
    lines.append(f"Missing runs (no metrics yet): {', '.join(missing)}." if missing else "No run is missing.")
    lines.append(f"Unfinished runs: {', '.join(unfinished)}." if unfinished else "No run is unfinished.")
    lines += ["", "## Instability criterion", "", criterion.describe(), "", "## Arms: outcomes", "",
              "Unstable seeds: how many of the N runs with metrics are unstable, each with the step it became "
              "unstable at. The other columns are medians over those N runs (unfinished runs included). "
              "k3 area: trapezoid integral of `mismatch/k3` over steps; k3 growth: median k3 of the last 5 "
              "steps / median of the first 5; length surge: largest mean response length / median of the "
              "first 5 steps.", ""]
    summary = []
    for label in study.labels:
        res = results[label]
        unstable = [f"seed {seed} @ {o.step}" for seed, o in res.items() if o.unstable]
        flagged = f"{len(unstable)}/{len(res)}" + (f" ({', '.join(unstable)})" if unstable else "")
        summary.append([f"`{label}`", flagged,
                        *(fmt(_median([getattr(o, f) for o in res.values()]))
                          for f in ("final_eval_accuracy", "k3_area", "k3_growth", "length_surge"))])
    lines += _table(["arm", "unstable seeds", "final eval acc", "k3 area", "k3 growth", "length surge"], summary)
    lines += ["", "## Runs: outcomes", ""]
    per_seed = []
    for label in study.labels:
        for seed, o in results[label].items():
            per_seed.append([f"`{label}`", seed, _progress(study, study.runs[label][seed]),
                             str(o.step) if o.unstable else "-", o.cause or "-",
                             fmt(o.final_eval_accuracy)
                             + ("" if o.final_eval_step is None else f" @ {o.final_eval_step}"),
                             fmt(o.best_eval_accuracy), fmt(o.k3_area), fmt(o.k3_growth),
                             fmt(o.max_response_length), fmt(o.length_surge)])
    lines += _table(["arm", "seed", "status", "unstable at", "cause", "final eval acc @ step", "best eval acc",
                     "k3 area", "k3 growth", "max length", "length surge"], per_seed)
    lines += ["", "## Evaluation steps", "",
              "Median [min, max] over seeds (a single value: one seed) at the steps with a held-out "
              "evaluation; eval length is that of the greedy eval responses, rollout length and k3 are "
              "the training step's; n: seeds with a finite eval accuracy.", ""]
    for label in study.labels:
        steps = sorted({int(r["step"]) for rows in study.present(label).values() for r in rows
                        if "eval/accuracy" in r})
        lines += [f"### `{label}`", ""]
        if not steps:
            lines += ["No evaluation yet.", ""]
            continue
        acc = aggs[(label, "eval/accuracy")]
        table = []
        for step in steps:
            i = np.searchsorted(acc["step"], step)
            n = int(acc["n"][i]) if i < acc["step"].size and acc["step"][i] == step else 0
            table.append([step, n, *(_at_step(aggs[(label, key)], step) for key, _ in EVAL_COLUMNS)])
        lines += _table(["step", "n", *(title for _, title in EVAL_COLUMNS)], table)
        lines.append("")
    lines += ["## Figures", "",
              "Per arm, the median over seeds (line) and the min-max band (shaded); the gradient noise "
              f"scale is the {NOISE_WINDOW}-step estimate.", ""]
    lines += [f"![{os.path.splitext(name)[0]}]({name})" + "\n" for name in figures]
    return "\n".join(lines).rstrip("\n") + "\n"


def write_aggregates_csv(study: StudyRuns, aggs: Mapping[tuple[str, str], Mapping[str, np.ndarray]], path: str) -> None:
    """``arm, metric, step, n, median, min, max, q25, q75`` for every arm, metric and step (floats
    written exactly: ``repr``)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["arm", "metric", "step", *STATS])
    for label in study.labels:
        for key in [k for k, _, _ in PANELS] + list(EXTRA_METRICS):
            agg = aggs[(label, key)]
            for i, step in enumerate(agg["step"].tolist()):
                writer.writerow([label, key, step, int(agg["n"][i]),
                                 *(repr(float(agg[s][i])) for s in STATS[1:])])
    with open(path, "w", encoding="utf-8", newline="") as f:
        f.write(buf.getvalue())


# -------------------------------------------------------------------------------------- figures

def _drawable(values: np.ndarray, log: bool) -> np.ndarray:
    """Values with those a log axis cannot show (<= 0) replaced by NaN (a gap)."""
    return np.where(values > 0, values, np.nan) if log else values


def draw_study(study: StudyRuns, aggs: Mapping[tuple[str, str], Mapping[str, np.ndarray]], columns: int = 3) -> Figure:
    """study.png: one panel per metric of :data:`PANELS`; per arm the median over seeds and the
    min-max band, one color per arm."""
    n_rows = math.ceil(len(PANELS) / columns)
    fig = Figure(figsize=(5 * columns, 4 * n_rows), layout="constrained")
    axes = fig.subplots(n_rows, columns, squeeze=False)
    for ax in axes.flat[len(PANELS):]:
        ax.set_visible(False)
    for ax, (key, title, log) in zip(axes.flat, PANELS):
        drawn = False
        for i, label in enumerate(study.labels):
            agg = aggs[(label, key)]
            median, lo, hi = (_drawable(agg[s], log) for s in ("median", "min", "max"))
            if not np.isfinite(median).any():
                continue
            sparse = key.startswith("eval/")
            ax.plot(agg["step"], median, color=f"C{i % 10}", label=label, marker="o" if sparse else None,
                    markersize=4)
            ax.fill_between(agg["step"], lo, hi, color=f"C{i % 10}", alpha=0.2, linewidth=0)
            drawn = True
        finish_panel(ax, key, title, log, drawn)
    if axes.flat[0].get_legend_handles_labels()[0]:
        axes.flat[0].legend(fontsize=8)
    fig.suptitle(f"study {study.spec['name']}: median and min-max over seeds")
    return fig


MARKERS = "osD^vP*Xh<>p"


def draw_outcomes(study: StudyRuns, results: Mapping[str, Mapping[int, outcomes.RunOutcome]]) -> Figure:
    """outcomes.png: per run (``results``: `run_outcomes`), final eval accuracy against k3 area;
    one marker and color per arm, unstable runs hollow."""
    fig = Figure(figsize=(6, 4.5), layout="constrained")
    ax = fig.subplots()
    xs = []
    for i, label in enumerate(study.labels):
        for stable in (True, False):
            points = [(o.k3_area, o.final_eval_accuracy) for o in results[label].values()
                      if o.unstable != stable and math.isfinite(o.k3_area) and math.isfinite(o.final_eval_accuracy)]
            if not points:
                continue
            x, y = zip(*points)
            xs += x
            color = f"C{i % 10}"
            ax.scatter(x, y, marker=MARKERS[i % len(MARKERS)], s=40, label=label + ("" if stable else " (unstable)"),
                       facecolors=color if stable else "none", edgecolors=color)
    if xs and min(xs) > 0:
        ax.set_xscale("log")
    if not xs:
        ax.text(0.5, 0.5, "no run with an evaluation", ha="center", va="center", transform=ax.transAxes, color="gray")
    else:
        ax.legend(fontsize=8)
    ax.set_xlabel("k3 area (integral of mismatch/k3 over steps)")
    ax.set_ylabel("final eval accuracy")
    ax.grid(alpha=0.3)
    ax.set_title(f"study {study.spec['name']}: one point per run")
    return fig


# --------------------------------------------------------------------------------------- driver

def write_report(workdir: str, out: str | None = None,
                 criterion: outcomes.InstabilityCriterion = outcomes.InstabilityCriterion(),
                 finished_only: bool = False) -> dict[str, str]:
    """Reads the study in ``workdir`` (see :func:`load_study`, also for ``finished_only``) and
    writes the report files into ``out`` (default ``workdir``). Returns ``{file name: path}`` of
    what was written.

    Raises:
      ValueError: ``workdir`` holds no study.json.
    """
    out = workdir if out is None else out
    study = load_study(workdir, finished_only)  # Everything is read before anything is written (out may be workdir).
    os.makedirs(out, exist_ok=True)
    paths = {name: os.path.join(out, name)
             for name in (BUNDLE, STUDY_JSON, REPORT_MD, AGGREGATES_CSV, STUDY_PNG, OUTCOMES_PNG)}
    data = bundle_bytes(study)
    with open(paths[BUNDLE], "wb") as f:
        f.write(data)
    src = os.path.join(workdir, STUDY_JSON)
    if not (os.path.exists(paths[STUDY_JSON]) and os.path.samefile(src, paths[STUDY_JSON])):
        shutil.copyfile(src, paths[STUDY_JSON])
    aggs = aggregates(study)
    results = run_outcomes(study, criterion)
    write_aggregates_csv(study, aggs, paths[AGGREGATES_CSV])
    draw_study(study, aggs).savefig(paths[STUDY_PNG], dpi=100)
    draw_outcomes(study, results).savefig(paths[OUTCOMES_PNG], dpi=100)
    with open(paths[REPORT_MD], "w", encoding="utf-8", newline="\n") as f:
        f.write(render_report(study, criterion, results, aggs, [STUDY_PNG, OUTCOMES_PNG]))
    return paths


def main(argv: Sequence[str] | None = None) -> None:
    """The command line (argparse, as experiments.plot: no global flag registry, so tests and
    notebooks can call ``main([...])`` next to other scripts' flags)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, help="StudyRuns workdir, or a folder written by this command.")
    parser.add_argument("--out", default=None, help="Output folder (default: --workdir).")
    parser.add_argument("--finished_only", action="store_true",
                        help="Leave out runs still in progress (fewer rows than the study's steps).")
    args = parser.parse_args(argv)
    matplotlib.use("Agg")  # Files, no window: also on hosts without a display.
    try:
        paths = write_report(args.workdir, args.out, finished_only=args.finished_only)
    except ValueError as e:
        parser.exit(2, f"error: {e}\n")
    print(f"wrote {', '.join(paths.values())}")


if __name__ == "__main__":
    main()
