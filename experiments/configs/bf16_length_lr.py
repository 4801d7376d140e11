r"""bf16_length_lr: bf16 sampler, fp32 trainer, and the length-triggered LR decay of arXiv 2602.01826
alone (no k3 trigger).

  python -m experiments.train --config=experiments/configs/bf16_length_lr.py --workdir=/tmp/bf16_length_lr

What to expect: identical to ``bf16_constant_lr`` until the smoothed mean response length
exceeds 1.25x its baseline (steps 2-4); from the surge step s on, the LR multiplier halves
every round(1.0 * s) steps (floor 0.1). Measured (2026-11-30, 2-core CPU, after the attention
backward change): no surge in the default 16 steps. The mean length falls from 36 tokens at step 0
to 8-11 from step 12 on, so ``lr/surge_step`` stays -1 and the LR is never lowered (in the
notebook below, the constant-LR twin ran identically over 30 steps).
Earlier code, whose float32 gradients summed in another order, drew other tokens: the length rose
to the 48-token budget by step 9, the surge fired at step 7 (``lr/surge_step``; steps count from
0, the log line shows step + 1), and lr/scale halved from step 9. The trajectory depends on the
machine and the XLA version. ``colab/length_triggered_lr.ipynb``
runs the pair. ``--config=...:N`` runs N steps (default 16).
"""

from experiments.configs import default


def get_config(arg: str | None = None):
    c = default.get_config(arg)
    c.optim.lr_schedule = "length_triggered"
    c.optim.k3_trigger_threshold = 0.0
    return c
