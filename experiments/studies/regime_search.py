r"""regime_search: the control (fp32 sampler) against the bf16 sampler at one LR and budget, to find
the regime of the main study (a bf16 run that degrades while the control holds).

  python -m experiments.study --study=experiments/studies/regime_search.py:lr=5e-5,budget=96,steps=30 \
      --workdir=/tmp/regime/lr5e-5_n96

The argument sets ``optim.learning_rate`` (``lr=``), ``sampler.max_new_tokens`` (``budget=``),
``steps`` (``steps=``) and ``task.format_weight`` (``format=``, the reward for a well-formed answer)
of ``experiments/configs/study.py`` (any of them; the rest stay), and ``seeds=0+1`` the seeds
(default: 0). ``docs/results/README.md`` records the searches that were run and what they
showed.
"""

from experiments.configs import study as study_config
from rl_mismatch.study import Arm, Study

_KEYS = {"lr": ("optim.learning_rate", float), "budget": ("sampler.max_new_tokens", int),
         "steps": ("steps", int), "format": ("task.format_weight", float)}


def get_study(arg: str | None = None) -> Study:
    base = study_config.get_config()
    seeds = (0,)
    for item in filter(None, (arg or "").split(",")):
        name, _, value = item.partition("=")
        if name == "seeds":
            seeds = tuple(int(s) for s in value.split("+"))
        elif name in _KEYS:
            key, kind = _KEYS[name]
            base.update_from_flattened_dict({key: kind(value)})
        else:
            raise ValueError(f"regime_search: unknown argument {name!r} in {arg!r}; use lr=, budget=, steps=, "
                             "format=, seeds= (e.g. lr=5e-5,budget=96,steps=30,format=0,seeds=0+1).")
    return Study("regime_search", base, seeds=seeds, arms=(
        Arm("a_fp32", "fp32 sampler, fp32 trainer (control)", {"sampler.dtype": "float32"}),
        Arm("b_bf16", "bf16 sampler, fp32 trainer", {}),
    ))
