"""Held-out evaluation: greedy decoding of the task's eval split, scored like the rollouts.

The training reward of a 16-sample RL step is noisy, and it is measured on the prompts the
policy is being trained on. Whether a run has degraded is decided on held-out questions
instead: every prompt of the eval split once, decoded greedily (temperature 0, so the
evaluation itself draws nothing and a resumed run reproduces it exactly), by the same sampler
model (dtype and layout) that generates the rollouts. The metrics:

* ``eval/accuracy``: the fraction of eval questions answered correctly;
* ``eval/format``: the fraction of replies with a well-formed ``<answer>`` block;
* ``eval/response_length_mean``: mean reply length in tokens;
* ``eval/finished_frac``: the fraction of replies that ended with EOS within the budget.

Usage (``experiment.run`` does this every ``eval.every`` steps)::

  evaluator = Evaluator(eval_split, tok, sampling=greedy, batch_size=64, max_prompt_len=P)
  metrics = evaluator(sampler_model, mesh=mesh)

Multi-host: each process renders its share of every batch; the prompts are gathered so the
sampler decodes one global batch, and the scores are gathered before they are averaged, so
every process returns the same metrics.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import grain
import jax
import numpy as np

from rl_mismatch import sampler, tasks
from rl_mismatch.metric_writing import fetch_to_host

# Gathers each array's rows of this process into the global rows (process order).
GatherRows = Callable[..., tuple[np.ndarray, ...]]


def _local_only(*arrays: np.ndarray) -> tuple[np.ndarray, ...]:
    return tuple(np.asarray(a) for a in arrays)


class Evaluator:
    """Greedy accuracy of a sampler model on every example of an eval split.

    The prompts are rendered once, at construction, in batches of ``batch_size`` (the last one
    padded with repeats that are weighted out), so every call decodes the same token arrays and
    compiles ``generate`` once per run.

    Args:
      split: the eval examples (``tasks.load_split(name, tasks.EVAL_SPLIT, data_dir)``).
      tokenizer: the chat tokenizer.
      sampling: the rollout sampling settings; evaluation uses them with ``temperature=0``
        (greedy) and, if given, ``max_new_tokens``.
      batch_size: prompts per decode call, over all processes (a multiple of the process count).
      max_prompt_len: longest prompt allowed (as for the rollouts).
      max_new_tokens: the reply budget (None: the rollouts').
      system_prompt, format_weight, score_fns: as for the rollouts (``tasks.score``).
      shard_options, pad_to: this process's share, and the common prompt width with several
        processes (as for ``tasks.PromptBatches``).
      gather_rows: how rows of all processes are gathered (identity on one process).

    Raises:
      ValueError: an empty split, or a batch size that does not divide over the processes.
    """

    def __init__(
        self,
        split: Sequence[Mapping[str, Any]],
        tokenizer: Any,
        *,
        sampling: sampler.SamplingConfig,
        batch_size: int,
        max_prompt_len: int,
        max_new_tokens: int | None = None,
        system_prompt: str | None = None,
        format_weight: float = 0.1,
        score_fns: Mapping[str, tasks.rewards.ScoreFn] | None = None,
        shard_options: grain.sharding.ShardOptions | None = None,
        pad_to: int | None = None,
        gather_rows: GatherRows = _local_only,
    ):
        if batch_size < 1:
            raise ValueError(f"The eval batch size must be >= 1, got {batch_size}.")
        self.sampling = dataclasses.replace(
            sampling, temperature=0.0, top_k=0, top_p=1.0, return_entropy=False,
            max_new_tokens=max_new_tokens or sampling.max_new_tokens)
        self.batches = list(tasks.eval_prompt_batches(
            split, tokenizer, batch_size=min(batch_size, len(split)), max_prompt_len=max_prompt_len,
            shard_options=shard_options, min_bucket=sampling.prompt_bucket or 8, pad_to=pad_to,
            system_prompt=system_prompt))
        self.num_examples = len(split)
        self._tokenizer = tokenizer
        self._format_weight = format_weight
        self._score_fns = score_fns
        self._gather = gather_rows

    def __call__(self, model: Any, *, mesh: jax.sharding.Mesh | None = None) -> dict[str, float]:
        """Decodes every eval prompt with ``model`` (a sampler model) and scores the replies.

        Returns:
          ``eval/accuracy``, ``eval/format``, ``eval/response_length_mean`` and
          ``eval/finished_frac`` over the split's examples (padding rows excluded).
        """
        correct, formatted, lengths, finished, valid = [], [], [], [], []
        key = jax.random.key(0)  # Greedy decoding draws nothing; generate wants a key.
        for batch in self.batches:
            tokens, prompt_valid = self._gather(batch.tokens_BP, batch.valid_BP)
            rollout = sampler.generate(model, (tokens, prompt_valid), key, self.sampling, mesh=mesh)
            host = fetch_to_host({"tokens": rollout.tokens_BT, "mask": rollout.response_mask_BT,
                                  "lengths": rollout.response_lengths_B, "finished": rollout.finished_B})
            rows = _process_rows(len(batch.examples), len(host["tokens"]))
            replies = [self._tokenizer.decode(t[m]) for t, m in zip(host["tokens"][rows], host["mask"][rows])]
            scored = tasks.score(replies, batch.examples, format_weight=self._format_weight,
                                 score_fns=self._score_fns)
            c, f, v = self._gather(scored["correct"], scored["formatted"], batch.example_valid_B)
            correct.append(c)
            formatted.append(f)
            valid.append(v)
            lengths.append(host["lengths"])
            finished.append(host["finished"])
        v = np.concatenate(valid)
        mean = lambda x: float(np.mean(np.concatenate(x)[v]))  # noqa: E731
        return {"eval/accuracy": mean(correct), "eval/format": mean(formatted),
                "eval/response_length_mean": mean(lengths), "eval/finished_frac": mean(finished)}


def _process_rows(local: int, total: int) -> slice:
    """This process's rows of a gathered batch of ``total`` rows (``local`` per process)."""
    if local * jax.process_count() != total:
        raise AssertionError(f"{total} gathered rows for {local} local rows on {jax.process_count()} processes.")
    start = jax.process_index() * local
    return slice(start, start + local)
