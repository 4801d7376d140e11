r"""bf16_constant_lr: the baseline both papers start from -- bf16 sampler, fp32 trainer, constant LR.

  python -m experiments.train --config=experiments/configs/bf16_constant_lr.py --workdir=/tmp/bf16_constant_lr

What to expect: the ``default`` run without any LR decay (same model, task, batches and seed).
Reward rises as in ``default``; mismatch/k3 grows with the updates and is never pulled back,
which is the mismatch growth arXiv 2602.01826 describes (at this scale and length, a trend,
not a collapse). lr/scale stays 1; the length detector still runs, so its would-be trigger is
in the optimizer state. Compare with ``bf16_length_lr``, ``fp16`` and ``fp32`` via
``python -m experiments.plot --workdir /tmp/bf16_constant_lr /tmp/fp16 ... --out cmp.png``.
``--config=...:N`` runs N steps (default 16; the papers' effects need hundreds).
"""

from experiments.configs import default


def get_config(arg: str | None = None):
    c = default.get_config(arg)
    c.optim.lr_schedule = "constant"
    c.optim.k3_trigger_threshold = 0.0
    return c
