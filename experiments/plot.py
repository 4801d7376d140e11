r"""Plots RL runs against step: reward, response length, LR multiplier, k3 KL, max |pi - mu|, noise scale.

  python -m experiments.plot --workdir /tmp/default_run [/tmp/fp16_run ...] --out runs.png

Each ``--workdir`` is a run directory written by ``experiments.train`` (its ``metrics.jsonl``);
runs are overlaid, labelled with the directory name and their sampler/trainer precision and LR
schedule (from ``config.json``). A metric a run did not log is left out of that panel. The
gradient noise scale is the ratio of 5-step averages (:func:`smoothed_noise_scale`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Sequence

import matplotlib
import matplotlib.pyplot as plt

from rl_mismatch.metric_writing import read_metrics
from rl_mismatch.train_step import gradient_noise_scale

# (metric key, panel title, log-scale y).
NOISE_WINDOW = 5  # Steps averaged for the noise scale: one step's estimate is very noisy.
PANELS = (
    ("reward/mean", "reward (mean)", False),
    ("rollout/response_length_mean", "response length (tokens)", False),
    ("lr/scale", "LR multiplier", False),
    ("mismatch/k3", "k3 KL(mu || pi)", True),
    ("mismatch/prob_diff_max", "max |pi - mu|", False),
    # What is drawn is smoothed_noise_scale's trailing estimate, not the logged per-step value.
    ("opt/grad_noise_scale", f"gradient noise scale B_noise ({NOISE_WINDOW}-step estimate)", True),
)


def _config(workdir: str) -> dict | None:
    try:
        with open(os.path.join(workdir, "config.json"), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


def smoothed_noise_scale(rows: Sequence[dict], cfg: dict | None, window: int = NOISE_WINDOW) -> list[dict]:
    """Rows with ``opt/grad_noise_scale`` recomputed from trailing ``window``-step averages.

    McCandlish et al. estimate B_noise = tr(Sigma) / |G|^2 from *averages* of the squared
    gradient norms of a small and a big batch (``opt/grad_sq_small``, ``opt/grad_sq_big``, logged
    every step), not from the average of per-step ratios. Since E|G_b|^2 = |G|^2 + tr(Sigma)/b,
    the batch sizes of an average are the harmonic means of the steps' ``opt/noise_b_small`` and
    ``opt/noise_b_big`` (runs from before those were logged: B / n_microbatches and B from the
    config). Rows are returned unchanged when that is not possible (one micro-batch).
    """
    if cfg is None or cfg["trainer"]["n_microbatches"] < 2:
        return list(rows)
    b_big = cfg["rollout"]["prompts_per_step"] * cfg["rollout"]["group_size"]
    b_small = b_big / cfg["trainer"]["n_microbatches"]

    def harmonic(values):
        return len(values) / sum(1.0 / v for v in values)

    out = []
    for i, row in enumerate(rows):
        recent = [r for r in rows[max(0, i - window + 1): i + 1]
                  if "opt/grad_sq_small" in r and math.isfinite(r.get("opt/noise_trace", 0.0))]
        row = dict(row)
        if recent:
            small = sum(r["opt/grad_sq_small"] for r in recent) / len(recent)
            big = sum(r["opt/grad_sq_big"] for r in recent) / len(recent)
            row["opt/grad_noise_scale"] = float(gradient_noise_scale(
                small, big, harmonic([r.get("opt/noise_b_small", b_small) for r in recent]),
                harmonic([r.get("opt/noise_b_big", b_big) for r in recent])))
        out.append(row)
    return out


def run_label(workdir: str) -> str:
    """``name (sampler/trainer dtype, LR schedule, correction)`` from the run's config.json."""
    name = os.path.basename(os.path.normpath(workdir))
    cfg = _config(workdir)
    if cfg is None:
        return name
    schedule = cfg["optim"]["lr_schedule"]
    if cfg["optim"].get("k3_trigger_threshold", 0) > 0:
        schedule += " + k3"
    parts = [f"{cfg['sampler']['dtype']}/{cfg['trainer']['dtype']}", schedule]
    if cfg["loss"].get("correction", "none") != "none":
        parts.append(cfg["loss"]["correction"])
    return f"{name} ({', '.join(parts)})"


def _series(rows: Sequence[dict], key: str, log: bool) -> tuple[list[int], list[float]]:
    """Steps and values of ``key``; a value that cannot be drawn (missing, non-finite, or <= 0
    on a log axis: e.g. a noise scale whose |G|^2 estimate was <= 0) becomes NaN, which breaks
    the line there instead of joining its neighbours across the gap."""
    steps, values = [], []
    for row in rows:
        value = row.get(key)
        ok = isinstance(value, (int, float)) and math.isfinite(value) and (value > 0 or not log)
        steps.append(int(row["step"]))
        values.append(float(value) if ok else math.nan)
    return steps, values


def finish_panel(ax, key: str, title: str, log: bool, drawn: bool) -> None:
    """Title, step axis and grid of one metric panel; a log y only if something was drawn, and a
    "no <key>" note if nothing was."""
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    if log and drawn:
        ax.set_yscale("log")
    if not drawn:
        ax.text(0.5, 0.5, f"no {key}", ha="center", va="center", transform=ax.transAxes, color="gray")


def draw_runs(workdirs: Sequence[str], panels: Sequence[tuple[str, str, bool]] = PANELS,
              columns: int = 3) -> matplotlib.figure.Figure:
    """A figure with one panel per ``(metric key, title, log y)`` of ``panels``, every run overlaid
    (a notebook shows it; :func:`plot_runs` writes it to a file).

    Raises:
      ValueError: no workdir, or a workdir without metrics.
    """
    if not workdirs:
        raise ValueError("Pass at least one --workdir.")
    runs = []
    for workdir in workdirs:
        rows = read_metrics(workdir)
        if not rows:
            raise ValueError(f"{workdir!r} has no metrics.jsonl rows; is it a run directory of experiments.train?")
        runs.append((run_label(workdir), smoothed_noise_scale(rows, _config(workdir))))
    rows_of_panels = math.ceil(len(panels) / columns)
    fig, axes = plt.subplots(rows_of_panels, columns, figsize=(5 * columns, 4 * rows_of_panels),
                             constrained_layout=True, squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, (key, title, log) in zip(axes.flat, panels):
        drawn = False
        for label, rows in runs:
            steps, values = _series(rows, key, log)
            if any(math.isfinite(v) for v in values):
                ax.plot(steps, values, marker="o", markersize=3, label=label)
                drawn = True
        finish_panel(ax, key, title, log, drawn)
    axes.flat[0].legend(fontsize=8)
    return fig


def plot_runs(workdirs: Sequence[str], out: str) -> str:
    """Draws the panels of :data:`PANELS` for every run into ``out`` (PNG); returns ``out``.

    Raises:
      ValueError: no workdir, or a workdir without metrics.
    """
    fig = draw_runs(workdirs)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", nargs="+", required=True, help="Run directories to overlay.")
    parser.add_argument("--out", required=True, help="PNG file to write.")
    args = parser.parse_args(argv)
    matplotlib.use("Agg")  # A file, no window: also on hosts without a display.
    try:
        print(plot_runs(args.workdir, args.out))
    except ValueError as e:
        parser.exit(2, f"error: {e}\n")


if __name__ == "__main__":
    main()
