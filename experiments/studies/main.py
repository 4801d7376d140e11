r"""main: the replication study -- six arms over three seeds of SmolLM2-135M GRPO on arithmetic.

  python -m experiments.study --study=experiments/studies/main.py --workdir=runs/main_study
  python -m experiments.report --workdir=runs/main_study --out=docs/results/main

The base run is ``experiments/configs/study.py`` (bf16 sampler, fp32 trainer, Adam at 5e-5 with
a constant LR, 96-token budget, 30 steps, greedy eval of 40 held-out questions every 5 steps).
The arms, each a change of that base:

  a_fp32           fp32 sampler and trainer: the zero-mismatch control
  b_bf16           the base: bf16 sampler, fp32 trainer, constant LR
  c_bf16_length_lr (b) with the length-triggered LR decay (raw length, see below)
  d_bf16_token_tis (b) with token-level truncated IS, weights min(rho, 2)
  e_bf16_seq_mis   (b) with sequence-level masked IS, sequences with prod(rho) > 2 dropped
  f_fp16           fp16 sampler and fp16 trainer with dynamic loss scaling

Cost on a 2-core CPU: one seed (six runs of 30 steps) takes about 1 h 45 min, so the study runs
in three parts of one seed each (``--seeds=0``, ``--seeds=1``, ``--seeds=2``), each under
150 minutes, into the same workdir; the report merges whatever runs the workdir holds.

The length rule's constants, scaled to a 30-step run whose responses start at 50-60 tokens
(before the answer format is learnt), settle at 20-35 and, where a run collapses, fill the
96-token budget within a few steps: the first step is ignored (``warmup=1``: its lengths are
the untrained model's), the baseline is the mean raw length of steps 1-3, and the rule fires
at the first step whose raw mean length exceeds 2x that baseline (a 3x threshold would fire
only once the budget is nearly full). The LR then halves every round(1.0 x surge step) steps,
down to 0.1x. The public re-implementation's constants (warmup 10, window 50, threshold 3,
k 1.8) assume runs of thousands of steps.
``--study=...:N`` runs N steps per run.
"""

from experiments.configs import study as study_config
from rl_mismatch.study import Arm, Study

LENGTH_RULE = {"optim.lr_schedule": "length_triggered", "optim.trigger_warmup": 1,
               "optim.trigger_baseline_window": 3, "optim.trigger_threshold": 2.0,
               "optim.trigger_smoothing": 0.0, "optim.trigger_period_factor": 1.0,
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
