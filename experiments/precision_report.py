"""The precision study's report: results.json, the results.md tables and the log-ratio histograms.

:func:`rl_mismatch.precision_study.run_study` computes the results; this module only formats and
writes them (``experiments/precision_study.py`` is the command that does both).
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import numpy as np

# The metrics shown in results.md (results.json holds every metric).
TABLE_KEYS = ("k1", "k3", "prob_diff_mean", "prob_diff_max", "ratio_p001", "ratio_p999",
              "frac_out_10pct", "n_tokens")


def _fmt(x) -> str:
    if isinstance(x, (int, np.integer)):
        return str(int(x))
    if x == 0:
        return "0"
    if not math.isfinite(x):
        return str(x)
    return f"{x:.3g}" if 1e-3 <= abs(x) < 1e4 else f"{x:.2e}"


def markdown_table(results: dict[str, Any]) -> str:
    """results.md: summary, the grid and the attribution rows."""
    lines = ["# Precision study", "",
             f"Batch {results['shapes']['batch']}, {results['shapes']['response_tokens']} response tokens "
             f"(mean length {results['shapes']['mean_response_length']:.1f}); "
             f"fp32 decode reproduces the rollout's log-probs to "
             f"{results['reproduction_fp32_decode_vs_rollout']['max_abs_diff']:.2e} "
             f"({100 * results['reproduction_fp32_decode_vs_rollout']['frac_exact']:.1f}% bit-exact).", "",
             "## Summary", "", "| quantity | value |", "|---|---|"]
    if "xla_allow_excess_precision" in results:
        lines[3:3] = [f"Model {results.get('model')}, task {results.get('task')}, XLA excess precision "
                      f"{'allowed (default)' if results['xla_allow_excess_precision'] else 'disallowed'}.", ""]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in results["summary"].items()]
    header = "| configuration | baseline | " + " | ".join(TABLE_KEYS) + " | exact |"
    sep = "|---" * (len(TABLE_KEYS) + 3) + "|"
    for group, title in (("grid", "Sampler dtype x trainer dtype (sampler: KV-cache decode, "
                                  "trainer: full forward of fp32 master weights)"),
                         ("attribution", "Attribution, one factor at a time")):
        lines += ["", f"## {title}", "", header, sep]
        for r in results["rows"]:
            if r["group"] != group:
                continue
            m = r["metrics"]
            lines.append(f"| {r['name']} | {r.get('baseline', '')} | "
                         + " | ".join(_fmt(m[k]) for k in TABLE_KEYS) + f" | {_fmt(m['frac_exact'])} |")
    lines += ["", "μ: the row's sampler side (the variant), π: its baseline. k1, k3: the KL(μ‖π) estimators "
              "of rl_mismatch.mismatch averaged over the tokens the float32 sampler drew (drawn from μ itself only "
              "when μ is that sampler); prob_diff: |π − μ|; ratio_pX: quantiles of ρ = π/μ; exact: fraction "
              "of tokens with identical log-probs.", ""]
    return "\n".join(lines)


def plot_log_ratios(log_ratios: dict[str, np.ndarray], path: str) -> None:
    """Histograms of log10 |r| per configuration (exactly-equal tokens counted in the legend)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = {"grid": [], "attribution": []}
    for name, r in log_ratios.items():
        groups[name.split(":")[0]].append((name.split(": ", 1)[1], np.asarray(r)))
    fig, axes = plt.subplots(1, 2, figsize=(16, 6.5))
    bins = np.linspace(-10, 1, 89)
    for ax, (group, items) in zip(axes, groups.items()):
        for i, (name, r) in enumerate(items):
            nz = np.abs(r[r != 0])
            label = f"{name} (exact {100 * np.mean(r == 0) if r.size else 100:.0f}%)"
            ax.hist(np.log10(np.clip(nz, 1e-10, 10)), bins=bins, histtype="step", linewidth=1.2,
                    density=False, label=label, linestyle="-" if i < 10 else "--")
        ax.set_yscale("log")
        ax.set_xlabel("log10 |log π − log μ| per response token (exact ties not shown)")
        ax.set_ylabel("tokens")
        ax.set_title(group)
        ax.legend(fontsize=6.5, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(results: dict[str, Any], out_dir: str) -> dict[str, str]:
    """Writes results.json, results.md and log_ratios.png into ``out_dir``; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {"json": os.path.join(out_dir, "results.json"), "md": os.path.join(out_dir, "results.md"),
             "png": os.path.join(out_dir, "log_ratios.png")}
    public = {k: v for k, v in results.items() if not k.startswith("_")}
    with open(paths["json"], "w") as f:
        json.dump(public, f, indent=1, default=float)
    with open(paths["md"], "w") as f:
        f.write(markdown_table(results))
    plot_log_ratios(results["_log_ratios"], paths["png"])
    return paths
