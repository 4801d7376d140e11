r"""Prints what a run's policy answers: greedy replies to held-out questions, at the start and now.

  python -m experiments.replies --workdir=runs/main_study/b_bf16/seed0 [--n=8] [--step=30]

The metrics say *that* eval accuracy fell; the replies say how (a constant answer, bare answer
tags, rambling to the budget). For each of the first ``--n`` questions of the task's eval split
it decodes greedily with the starting model and with the checkpoint of ``--step`` (default: the
latest), both in the run's sampler dtype, and prints question, expected answer and the replies.
"""

from __future__ import annotations

import sys

import jax
import numpy as np
from absl import app, flags

from rl_mismatch import console, experiment, sampler, tasks
from rl_mismatch.precision import parse_dtype

_WORKDIR = flags.DEFINE_string("workdir", None, "A run directory of experiments.train / experiments.study.")
_N = flags.DEFINE_integer("n", 8, "Eval questions to show.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint to show (default: the latest).")
flags.mark_flags_as_required(["workdir"])


def greedy_replies(model, tok, prompts, *, dtype, max_new_tokens: int) -> list[str]:
    """Greedy replies of ``model`` (weights synced to ``dtype``) to token-id ``prompts``."""
    fast = sampler.sync_weights(model, dtype)
    cfg = sampler.SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0, eos_ids=(tok.eos_id,),
                                 pad_id=tok.pad_id)
    out = sampler.generate(fast, prompts, jax.random.key(0), cfg)
    tokens, mask = np.asarray(out.tokens_BT), np.asarray(out.response_mask_BT)
    return [tok.decode(t[m]) for t, m in zip(tokens, mask)]


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}.")
    console.quiet_library_logs()
    try:
        cfg, trained, tok, step = experiment.load_trained(_WORKDIR.value, _STEP.value)
        _, start, _, _ = experiment.load_trained(_WORKDIR.value, 0)
        data_dir = cfg.task.data_dir or f"{_WORKDIR.value}/data"
        split = tasks.load_split(experiment.prepare_task(cfg.task, data_dir), tasks.EVAL_SPLIT, data_dir)
    except ValueError as e:
        sys.exit(f"error: {e}")
    examples = [split[i] for i in range(min(_N.value, len(split)))]
    prompts = [tok.apply_chat_template(tasks.build_messages(ex["question"], system_prompt=cfg.task.system_prompt or None))
               for ex in examples]
    dtype = parse_dtype(cfg.sampler.dtype)
    budget = cfg.eval.max_new_tokens or cfg.sampler.max_new_tokens
    before = greedy_replies(start, tok, prompts, dtype=dtype, max_new_tokens=budget)
    after = greedy_replies(trained, tok, prompts, dtype=dtype, max_new_tokens=budget)
    print(f"{_WORKDIR.value}: greedy replies ({cfg.sampler.dtype} sampler) at step 0 and step {step}")
    for ex, a, b in zip(examples, before, after):
        print(f"\n{ex['question']!r} (answer {ex['answer']})\n  step 0:    {a!r}\n  step {step}:{' ' * max(1, 4 - len(str(step)))}{b!r}")


if __name__ == "__main__":
    app.run(main)
