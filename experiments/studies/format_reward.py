r"""format_reward: the main study's six arms in the regime it first ran in, where any well-formed
answer earned a reward of 0.1 (``task.format_weight=0.1``) -- kept to reproduce
``docs/results/format_reward/``, where the fp32 control itself collapsed onto one constant
well-formed reply within 5 steps.

  python -m experiments.study --study=experiments/studies/format_reward.py --workdir=runs/format_reward --seeds=0
  python -m experiments.report --workdir=runs/format_reward --out=docs/results/format_reward

Everything else is the main study's (``experiments/studies/main.py``) but the length rule's
constants, which were scaled to replies that shrink from 50-60 tokens at once: the first step is
ignored (``warmup=1``), the baseline is the mean raw length of steps 1-3, the rule fires above
2x that baseline, and the LR halves every round(1.0 x surge step) steps, down to 0.1x.
``--study=...:N`` runs N steps per run.
"""

from experiments.configs import study as study_config
from experiments.studies import main
from rl_mismatch.study import Arm, Study

LENGTH_RULE = {**main.LENGTH_RULE, "optim.trigger_warmup": 1, "optim.trigger_baseline_window": 3,
               "optim.trigger_period_factor": 1.0}


def get_study(arg: str | None = None) -> Study:
    base = study_config.get_config(arg)
    base.task.format_weight = 0.1
    arms = tuple(Arm(a.label, a.description, LENGTH_RULE) if a.overrides == main.LENGTH_RULE else a
                 for a in main.ARMS)
    return Study("format_reward", base, seeds=(0, 1, 2), arms=arms)
