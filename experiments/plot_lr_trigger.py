r"""Draws docs/lr_trigger.png: the length-triggered LR multiplier on a synthetic trace.

The multiplier, smoothed length and baseline are read from the transform's own
state (rl_mismatch.optim.length_triggered_decay with its default constants), so the
figure shows what the code does, not a re-drawing of the formula.

Usage:
  python experiments/plot_lr_trigger.py [--out=docs/lr_trigger.png] [--steps=2600]
"""

from __future__ import annotations

import pathlib

import jax
import matplotlib
import numpy as np
from absl import app, flags

matplotlib.use("Agg")  # Files only; no display on servers or in CI.
import matplotlib.pyplot as plt  # noqa: E402

from rl_mismatch import optim  # noqa: E402

_OUT = flags.DEFINE_string(
    "out",
    str(pathlib.Path(__file__).resolve().parents[1] / "docs" / "lr_trigger.png"),
    "Where to write the PNG.",
)
_STEPS = flags.DEFINE_integer("steps", 2600, "Length of the synthetic trace.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the synthetic noise.")

# The defaults of length_triggered_decay, spelled out for the annotations.
WARMUP, WINDOW, THRESHOLD, K, FLOOR = 10, 50, 3.0, 1.8, 0.1


def synthetic_lengths(steps: int, seed: int) -> np.ndarray:
    """Mean response length: flat at ~250 tokens, then a surge from step 280 on."""
    rng = np.random.default_rng(seed)
    t = np.arange(steps)
    flat = 250.0 * (1 + 0.08 * rng.standard_normal(steps))
    surge = 900.0 / (1 + np.exp(-(t - 330) / 15))  # logistic rise to ~4.6x
    return flat + surge


def run(lengths: np.ndarray) -> optim.TriggeredDecayState:
    """Feeds the trace to the transform; returns its state after every step."""
    tx = optim.length_triggered_decay(
        warmup=WARMUP, baseline_window=WINDOW, threshold=THRESHOLD, period_factor=K, floor=FLOOR
    )
    return jax.tree.map(np.asarray, optim.replay(tx, response_length=lengths))


def plot(lengths: np.ndarray, states: optim.TriggeredDecayState, out: str) -> None:
    t = np.arange(len(lengths))
    (fired,) = np.nonzero(np.diff(states.num_triggers, prepend=0))
    if len(fired) != 1:
        raise RuntimeError(f"expected one trigger on the synthetic trace, got {fired}")
    s = int(fired[0])
    period = int(states.period[-1])
    baseline = float(states.baseline_sum[WARMUP + WINDOW - 1]) / WINDOW

    fig, (ax_len, ax_lr) = plt.subplots(
        2, 1, figsize=(8, 5.2), sharex=True, height_ratios=(1, 1), layout="constrained"
    )
    ax_len.plot(t, lengths, color="0.75", lw=0.8, label="mean response length")
    ax_len.plot(
        t[WARMUP : s + 1],
        states.smoothed[WARMUP : s + 1],
        color="C0",
        lw=1.6,
        label="compared length (raw: smoothing 0, the default)",
    )
    ax_len.axvspan(
        WARMUP, WARMUP + WINDOW, color="C2", alpha=0.2, label=f"baseline window (W = {WINDOW})"
    )
    ax_len.hlines(
        THRESHOLD * baseline,
        WARMUP + WINDOW,
        len(t),
        colors="C3",
        linestyles="--",
        lw=1.2,
        label=f"{THRESHOLD:g} × baseline",
    )
    ax_len.axvline(s, color="C3", lw=1.2)
    ax_len.plot([s], [states.smoothed[s]], "o", color="C3", ms=6, zorder=5)
    ax_len.set_ylabel("tokens")
    ax_len.legend(loc="lower right", fontsize=8, ncol=2, framealpha=0.95)
    ax_len.set_title(
        "length-triggered LR decay (rl_mismatch.optim, default constants)", fontsize=10
    )

    ax_lr.step(
        t, states.multiplier, where="post", color="C1", lw=1.8, label="multiplier (lr/scale)"
    )
    ax_lr.axhline(FLOOR, color="0.4", ls=":", lw=1, label=f"floor = {FLOOR:g}")
    ax_lr.axvline(s, color="C3", lw=1.2)
    ax_lr.annotate(
        f"surge fires at s = {s}\nperiod = round({K:g}·s) = {period}",
        xy=(s, 1.0),
        xytext=(s + 60, 0.72),
        fontsize=8.5,
        arrowprops=dict(arrowstyle="->", color="C3"),
    )
    for n in range(1, 4):
        ax_lr.axvline(WARMUP + n * period, color="0.7", ls="--", lw=0.8)
    ax_lr.text(WARMUP + period + 15, 0.57, "warmup + n·period", fontsize=8, color="0.4")
    ax_lr.set_ylim(0, 1.08)
    ax_lr.set_xlim(0, len(t))
    ax_lr.set_xlabel("step")
    ax_lr.set_ylabel("LR multiplier")
    ax_lr.legend(loc="upper right", fontsize=8, framealpha=0.95)

    pathlib.Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=150)
    plt.close(fig)


def main(argv):
    del argv
    lengths = synthetic_lengths(_STEPS.value, _SEED.value)
    plot(lengths, run(lengths), _OUT.value)
    print(f"wrote {_OUT.value}")


if __name__ == "__main__":
    app.run(main)
