r"""bf16_length_lr: bf16 sampler, fp32 trainer, and the length-triggered LR decay of arXiv 2602.01826
alone (no k3 trigger).

  python -m experiments.train --config=experiments/configs/bf16_length_lr.py --workdir=/tmp/bf16_length_lr

What to expect: identical to ``bf16_constant_lr`` until the smoothed mean response length
exceeds 1.25x its baseline (steps 2-4); from the surge step s on, the LR multiplier halves
every round(1.0 * s) steps (floor 0.1). On this easy task the mean length does not surge in
the first 16 steps (it wanders between ~28 and ~42 tokens in ``default``), so with the default
step count the rule does not fire and lr/scale stays 1; run longer (``:200``) or on a harder
task (countdown) to see a surge and the decay that follows. ``--config=...:N`` runs N steps (default 16).
"""

from experiments.configs import default


def get_config(arg: str | None = None):
    c = default.get_config(arg)
    c.optim.lr_schedule = "length_triggered"
    c.optim.k3_trigger_threshold = 0.0
    return c
