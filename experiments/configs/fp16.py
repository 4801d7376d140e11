r"""fp16: float16 on both sides (arXiv 2510.26788) -- fp16 sampler, fp16 trainer with dynamic loss
scaling, constant LR.

  python -m experiments.train --config=experiments/configs/fp16.py --workdir=/tmp/fp16

What to expect: the paper's claim is that fp16's 10 explicit mantissa bits (bf16 has 7) shrink
the sampler/trainer disagreement by over an order of magnitude. Here, against
``bf16_constant_lr`` (same everything else), mismatch/k3 and max |pi - mu| should sit an order
of magnitude or more lower from the first step on, because both sides round weights and
activations to fp16 (measured on the tiny model: k3 2e-9 against bf16's 1.6e-6; not yet
measured on SmolLM2 here).
The trainer's loss scale (opt/loss_scale) starts at 2^15; any step with non-finite gradients
is skipped and counted in opt/skipped_steps. fp16 matmuls are slower than bf16 on most CPUs.
``--config=...:N`` runs N steps (default 16).
"""

from experiments.configs import default


def get_config(arg: str | None = None):
    c = default.get_config(arg)
    c.optim.lr_schedule = "constant"  # as bf16_constant_lr: no LR decay
    c.optim.k3_trigger_threshold = 0.0
    c.sampler.dtype = "float16"
    c.trainer.dtype = "float16"
    c.trainer.loss_scale_initial = 2.0**15
    c.trainer.loss_scale_growth_interval = 2000
    return c
