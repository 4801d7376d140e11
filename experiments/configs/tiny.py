r"""tiny: a random tiny decoder with a byte-level ChatML tokenizer; < 1 minute, for tests.

  python -m experiments.train --config=experiments/configs/tiny.py --workdir=/tmp/tiny

What to expect: 6 steps in well under a minute on a laptop CPU (most of it compiling). The
model is random, so it never writes an ``<answer>`` block (reward/accuracy and reward/format
stay 0); the reward that moves is DAPO's overlong penalty (-1 for a response that fills the
48-token budget, rising linearly to 0 for one that stops by token 8): a random model stops
(emits ``<|im_end|>``) in about one response in six, so most groups have a reward spread and
response length and finished_frac are what training changes. bf16 sampler vs fp32 trainer gives a small nonzero mismatch/k3.
``--config=experiments/configs/tiny.py:N`` runs N steps.
"""

from experiments.configs import base


def get_config(arg: str | None = None):
    c = base.get_base_config()
    c.steps = base.steps_from_arg(arg, 6)
    c.model.source = "tiny"
    c.model.tiny_max_seq_len = 160
    c.task.name = "basic_arithmetic"
    c.task.train_size = 32
    c.task.eval_size = 8
    c.task.kwargs = dict(min_terms=2, max_terms=2, min_digits=1, max_digits=1, operators=("+", "-"),
                         allow_parentheses=False, allow_negation=False)
    c.task.overlong_buffer = 40
    c.rollout.prompts_per_step = 2
    c.rollout.group_size = 4
    c.sampler.dtype = "bfloat16"
    c.sampler.max_new_tokens = 48
    c.trainer.dtype = "float32"
    c.trainer.n_microbatches = 2  # Two half-batch gradients give the gradient noise scale.
    c.optim.learning_rate = 3e-3
    c.optim.lr_schedule = "length_triggered"
    # Short detector windows so the 6-step run exercises the transform's whole state machine.
    c.optim.trigger_warmup = 1
    c.optim.trigger_baseline_window = 2
    c.optim.trigger_smoothing = 0.0
    c.optim.trigger_threshold = 1.5
    c.checkpoint.every = 2
    c.checkpoint.max_to_keep = 3
    c.mesh.data = 1  # One device whatever the host has: tests compare runs across processes.
    return c
