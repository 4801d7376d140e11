r"""fp32: the reference -- float32 sampler and trainer, constant LR.

  python -m experiments.train --config=experiments/configs/fp32.py --workdir=/tmp/fp32

What to expect: the mismatch left when precision is taken out: the sampler's KV-cache decode
against the trainer's full-sequence forward, in the same dtype. mismatch/k3 is orders of
magnitude below the bf16 runs (float32 round-off of different summation orders; measured on the
tiny model: k3 5e-14 and max |pi - mu| 4e-9, against bf16's 1.6e-6 and 3e-5); learning curves
otherwise as ``bf16_constant_lr``.
The slowest of the configs (no bf16 matmuls in the sampler). ``--config=...:N`` runs N steps
(default 16).
"""

from experiments.configs import default


def get_config(arg: str | None = None):
    c = default.get_config(arg)
    c.optim.lr_schedule = "constant"  # as bf16_constant_lr: no LR decay
    c.optim.k3_trigger_threshold = 0.0
    c.sampler.dtype = "float32"
    c.trainer.dtype = "float32"
    return c
