r"""main: the replication study -- six arms over three seeds of SmolLM2-135M GRPO on arithmetic.

  python -m experiments.study --study=experiments/studies/main.py --workdir=runs/main_study
  python -m experiments.report --workdir=runs/main_study --out=docs/results/main

The base run is ``experiments/configs/study.py`` (bf16 sampler, fp32 trainer, reward for correct
answers only, Adam at 5e-5 with a constant LR, 96-token budget, 30 steps, greedy eval of 40
held-out questions every 5 steps). The arms, each a change of that base:

  a_fp32           fp32 sampler and trainer: the zero-mismatch control
  b_bf16           the base: bf16 sampler, fp32 trainer, constant LR
  c_bf16_length_lr (b) with the length-triggered LR decay (raw length, see below)
  d_bf16_token_tis (b) with token-level truncated IS, weights min(rho, 2)
  e_bf16_seq_mis   (b) with sequence-level masked IS, sequences with prod(rho) > 2 dropped
  f_fp16           fp16 sampler and fp16 trainer with dynamic loss scaling

Cost on a 2-core CPU: a run of 30 steps takes 15-20 min on AMD Zen 3 (~30 s per step, 7
evaluations of 10-40 s; about 3 min on Zen 5, about 8 min on an Intel Xeon with AMX), so one
seed of six arms is ~1 h 45 min there: the study runs in parts of at most 150 minutes
(``--seeds=...`` and ``--arms=...``) into one workdir, and the report merges whatever runs the
workdir holds. ``docs/results/README.md`` says which parts have run.

The length rule's constants, scaled to a 30-step run: replies start at 40-60 tokens (before the
answer format is learnt) and settle at ~20 by step 10 (the fp32 control's steps 10-14: 17-20
tokens). So the baseline is the mean raw length of steps 10-14 (``warmup=10``,
``baseline_window=5``; the ramp is off), and the rule fires at the first later step whose raw
mean length exceeds 2x that baseline (~40 tokens; a 3x surge still fits the 96-token budget).
From a surge at step s the LR multiplier is
max(0.1, 0.5^floor((t - 10) / round(0.25 s))): for a surge at step 16 it is 0.5x at once and
0.1x ten steps later; at step 22, 0.25x at once and 0.125x six steps later. The fall has to be
this quick: in the bf16 arm's first run the replies went from 23 to 47 to 96 tokens (the whole
budget) in two steps, and with the re-implementation's k = 1.8 the LR would not fall at all
within 30 steps. The public
re-implementation's constants (warmup 10, window 50, threshold 3, k 1.8) assume runs of
thousands of steps.
``--study=...:N`` runs N steps per run.
"""

from experiments.configs import study as study_config
from rl_mismatch.study import Arm, Study

LENGTH_RULE = {"optim.lr_schedule": "length_triggered", "optim.trigger_warmup": 10,
               "optim.trigger_baseline_window": 5, "optim.trigger_threshold": 2.0,
               "optim.trigger_smoothing": 0.0, "optim.trigger_period_factor": 0.25,
               "optim.trigger_decay_base": 0.5, "optim.trigger_floor": 0.1}

ARMS = (
    Arm("a_fp32", "fp32 sampler, fp32 trainer: the zero-mismatch control", {"sampler.dtype": "float32"}),
    Arm("b_bf16", "bf16 sampler, fp32 trainer, constant LR", {}),
    Arm("c_bf16_length_lr", "(b) + length-triggered LR decay", LENGTH_RULE),
    Arm("d_bf16_token_tis", "(b) + token TIS, weights min(rho, 2)",
        {"loss.correction": "token_tis", "loss.correction_high": 2.0}),
    Arm("e_bf16_seq_mis", "(b) + sequence MIS, sequences with prod(rho) > 2 masked",
        {"loss.correction": "seq_mis", "loss.correction_high": 2.0}),
    Arm("f_fp16", "fp16 sampler, fp16 trainer, dynamic loss scaling",
        {"sampler.dtype": "float16", "trainer.dtype": "float16", "trainer.loss_scale_initial": 2.0**15}),
)


def get_study(arg: str | None = None) -> Study:
    return Study("main", study_config.get_config(arg), seeds=(0, 1, 2), arms=ARMS)
