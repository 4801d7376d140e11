r"""bf16_length_lr: bf16 sampler, fp32 trainer, and the length-triggered LR decay of arXiv 2602.01826
alone (no k3 trigger).

  python -m experiments.train --config=experiments/configs/bf16_length_lr.py --workdir=/tmp/bf16_length_lr

What to expect: identical to ``bf16_constant_lr`` up to the first update with a lowered LR. The
surge fires when the smoothed mean response length exceeds 1.25x its baseline (steps 2-4); from
the surge step s on, the LR multiplier halves
every round(1.0 * s) steps (floor 0.1). Measured (2026-11-30, 2-core AMD Zen 5 CPU, the first
16 steps of a 30-step run): the mean length grows from 28-30
tokens over steps 2-5 to 46 at step 7 and the 48-token budget from step 9; the surge fires at
step 7 (``lr/length_trigger/surge_step``; steps count from 0, as in the log line) and lr/scale is 0.5
from step 9 (0.25 from step 16). Other revisions of the code, whose float32 sums ran in another
order, drew other tokens: one gave the same surge step, one no surge at all (the responses
shrank to 8-11 tokens). The trajectory depends on the machine and the XLA version.
``colab/length_triggered_lr.ipynb``
runs the pair for 16 steps (its saved outputs, from another host and revision: surge at step 6,
lr/scale 0.5 from step 8). ``--config=...:N`` runs N steps (default 16).
"""

from experiments.configs import default


def get_config(arg: str | None = None):
    c = default.get_config(arg)
    c.optim.lr_schedule = "length_triggered"
    c.optim.k3_trigger_threshold = 0.0
    return c
