r"""bf16_length_lr: bf16 sampler, fp32 trainer, and the length-triggered LR decay of arXiv 2602.01826
alone (no k3 trigger).

  python -m experiments.train --config=experiments/configs/bf16_length_lr.py --workdir=/tmp/bf16_length_lr

What to expect: identical to ``bf16_constant_lr`` up to the first update with a lowered LR. The
surge fires when the smoothed mean response length exceeds 1.25x its baseline (steps 2-4); from
the surge step s on, the LR multiplier halves every round(1.0 * s) steps (floor 0.1), logged as
``lr/length_trigger/surge_step`` and ``lr/scale``. Whether and when the surge comes differs from
seed to seed and from host to host (another machine or XLA version sums float32 in another order
and draws other tokens): one run is an anecdote. The study over seeds with a zero-mismatch control
is ``experiments/studies/main.py``; its results are in ``docs/results/``.
``colab/length_triggered_lr.ipynb`` runs this config against ``bf16_constant_lr`` for 16 steps.
``--config=...:N`` runs N steps (default 16).
"""

from experiments.configs import default


def get_config(arg: str | None = None):
    c = default.get_config(arg)
    c.optim.lr_schedule = "length_triggered"
    c.optim.k3_trigger_threshold = 0.0
    return c
