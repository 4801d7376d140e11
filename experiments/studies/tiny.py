r"""tiny: a 2-arm x 2-seed study of the random tiny model; seconds, for tests and for trying the tools.

  python -m experiments.study --study=experiments/studies/tiny.py --workdir=/tmp/tiny_study
  python -m experiments.report --workdir=/tmp/tiny_study

What to expect: 4 runs of 4 steps (``experiments/configs/tiny.py``), an fp32-sampler control and
the bf16 sampler, with the greedy eval every 2 steps and after the last. The model is random, so eval/accuracy is 0
and no run is unstable; k3 is ~1e-13 for the control and ~1e-6 for bf16.
``--study=...:N`` runs N steps per run.
"""

from experiments.configs import tiny
from rl_mismatch.study import Arm, Study


def get_study(arg: str | None = None) -> Study:
    base = tiny.get_config(arg or "4")
    base.eval.every = 2  # Greedy accuracy on the 8 eval questions at steps 0, 2, ... and after the last.
    return Study("tiny", base, seeds=(0, 1), arms=(
        Arm("a_fp32", "fp32 sampler and trainer (control)", {"sampler.dtype": "float32"}),
        Arm("b_bf16", "bf16 sampler, fp32 trainer", {}),
    ))
