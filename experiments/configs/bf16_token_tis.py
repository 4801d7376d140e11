r"""bf16_token_tis: bf16 sampler, fp32 trainer, constant LR, token-level truncated importance sampling.

  python -m experiments.train --config=experiments/configs/bf16_token_tis.py --workdir=/tmp/bf16_token_tis

What to expect: ``bf16_constant_lr`` with each token's loss weighted by
min(pi_old(y_t) / mu(y_t), 2). With bf16 the ratios stay close to 1, so is/weight_mean is ~1,
is/frac_clipped is small (a few tokens in a thousand, rising as the mismatch grows) and the
learning curves follow ``bf16_constant_lr``; the correction reweights the gradient but does
not shrink the mismatch itself (mismatch/* as in ``bf16_constant_lr``) -- the papers' point
that IS corrections treat the symptom. ``--config=...:N`` runs N steps (default 16).
"""

from experiments.configs import default


def get_config(arg: str | None = None):
    c = default.get_config(arg)
    c.optim.lr_schedule = "constant"  # as bf16_constant_lr: no LR decay
    c.optim.k3_trigger_threshold = 0.0
    c.loss.correction = "token_tis"
    c.loss.correction_high = 2.0
    return c
