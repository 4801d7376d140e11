r"""bf16_seq_mis: bf16 sampler, fp32 trainer, constant LR, sequence-level masked importance sampling.

  python -m experiments.train --config=experiments/configs/bf16_seq_mis.py --workdir=/tmp/bf16_seq_mis

What to expect: ``bf16_constant_lr`` with each response weighted by its sequence ratio
prod_t pi_old(y_t) / mu(y_t) and dropped entirely when that exceeds 2. Sequence ratios spread
much more than token ratios (they multiply tens of them), so is/weight_std is far above the
token-level one and is/frac_masked shows the share of responses dropped (a few percent at
the start, more as the mismatch grows); fewer responses carry gradient, so reward can rise a
little slower than in ``bf16_token_tis``. ``--config=...:N`` runs N steps (default 16).
"""

from experiments.configs import default


def get_config(arg: str | None = None):
    c = default.get_config(arg)
    c.optim.lr_schedule = "constant"  # as bf16_constant_lr: no LR decay
    c.optim.k3_trigger_threshold = 0.0
    c.loss.correction = "seq_mis"
    c.loss.correction_high = 2.0
    return c
