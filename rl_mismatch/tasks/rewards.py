"""Rewards for task responses: reasoning-gym's own verifier plus an answer-format check.

The model is asked (:data:`ANSWER_INSTRUCTION`, appended to every prompt) to put its final
answer inside ``<answer>...</answer>``. For a response ``y`` to an example ``x``:

* ``a(y)`` = the stripped content of the *last* complete ``<answer>...</answer>`` block (a
  model that writes several answers is judged on its final one, even an empty final one);
* ``format(y) = 1`` if that block exists and ``a(y)`` is non-empty, else 0;
* ``score(y) = verifier_x(a(y))`` if ``format(y)``, else 0 -- the verifier is reasoning-gym's
  ``score_answer`` for reasoning-gym tasks (in [0, 1]; some tasks give partial credit such as
  0.01 / 0.05 for countdown) and :func:`score_final_answer` for JSONL tasks;
* ``correct(y) = 1[score(y) >= 1]`` (full credit only);
* ``reward(y) = score(y) + format_weight * format(y)``.

The format bonus gives a small model a learning signal before it solves any problem (with all
rewards of a GRPO group equal, every advantage is zero).

Metrics: ``reward/mean``, ``reward/accuracy`` (mean of ``correct``), ``reward/format`` (mean of
``format``). Host-side Python (string parsing), called once per batch between sampling and the
train step.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from rl_mismatch.tasks.builders import JSONL_TASK

ANSWER_INSTRUCTION = "Think briefly, then put the final answer inside <answer></answer>."
_ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)

ScoreFn = Callable[[str | None, Mapping[str, Any]], float]


def extract_answer(response: str) -> str | None:
    """The content of the last complete ``<answer>...</answer>`` block, stripped; else None.

    >>> extract_answer("2 + 2 is 4. <answer> 4 </answer>")
    '4'
    >>> extract_answer("<answer>3</answer> no, <answer>4</answer>")
    '4'
    >>> extract_answer("<answer>4") is None
    True
    >>> extract_answer("<answer>  </answer>") is None
    True
    >>> extract_answer("<answer>4</answer> or rather <answer></answer>") is None  # the final one
    True
    """
    matches = _ANSWER_RE.findall(response)
    if not matches:
        return None
    answer = matches[-1].strip()
    return answer or None


def _normalize(text: str) -> str:
    # Units and punctuation GSM8K-style answers carry around the number.
    text = text.strip().strip(".").replace("$", "").replace("%", "").strip()
    return re.sub(r"(?<=\d),(?=\d{3})", "", text)


def score_final_answer(answer: str | None, entry: Mapping[str, Any]) -> float:
    """Verifier for JSONL tasks: 1.0 if ``answer`` equals ``entry["answer"]``, else 0.0.

    Numbers compare by value (``"1,000.0"`` equals ``"1000"``); anything else compares as
    case-folded text. ``$``, ``%``, thousands separators and a trailing period are ignored.

    >>> score_final_answer("$1,000.", {"answer": "1000"})
    1.0
    >>> score_final_answer("Paris", {"answer": "paris"})
    1.0
    >>> score_final_answer(None, {"answer": "3"})
    0.0
    """
    if answer is None:
        return 0.0
    got, want = _normalize(answer), _normalize(str(entry["answer"]))
    try:
        return float(math.isclose(float(got), float(want), rel_tol=1e-9, abs_tol=1e-9))
    except ValueError:
        return float(got.casefold() == want.casefold())


@functools.cache
def _reasoning_gym_score_fn(task: str) -> ScoreFn:
    import reasoning_gym  # Lazy: importing reasoning-gym is slow.

    if task not in reasoning_gym.factory.DATASETS:
        raise ValueError(
            f"No scorer for task {task!r}: it is neither a reasoning-gym task nor "
            f"{JSONL_TASK!r}; pass score_fns={{{task!r}: fn}}."
        )
    return reasoning_gym.get_score_answer_fn(task)


def _score_fn(task: str, score_fns: Mapping[str, ScoreFn] | None) -> ScoreFn:
    if score_fns is not None and task in score_fns:
        return score_fns[task]
    if task == JSONL_TASK:
        return score_final_answer
    return _reasoning_gym_score_fn(task)


def _describe(i: int, example: Mapping[str, Any]) -> str:
    return f"example {i} (task {example.get('task')!r}, index {example.get('index')})"


def score(
    responses: Sequence[str],
    examples: Sequence[Mapping[str, Any]],
    *,
    format_weight: float = 0.1,
    score_fns: Mapping[str, ScoreFn] | None = None,
) -> dict[str, Any]:
    """Scores decoded responses against their examples (see the module docstring).

    Args:
      responses: decoded response texts, one per example (special tokens removed).
      examples: decoded task examples (dicts with ``question``, ``answer``, ``task``,
        ``metadata`` as a JSON string, ``index``), e.g. ``PromptBatch.examples``.
      format_weight: reward for a well-formed answer block, added to the verifier score.
      score_fns: optional ``{task: fn(answer, entry) -> float}`` overriding the built-in
        verifiers (``entry`` has ``question``, ``answer`` and ``metadata`` as a dict).

    Returns:
      ``rewards`` (float32 [N]), ``scores`` (float32 [N]), ``correct`` (bool [N]),
      ``formatted`` (bool [N]) and the metrics ``reward/mean``, ``reward/accuracy``,
      ``reward/format`` (Python floats).

    Raises:
      ValueError: mismatched lengths, a non-finite ``format_weight``, an unknown task, or a
        verifier that returns NaN/inf (the message names the example).

    >>> out = score(["<answer>4</answer>", "4"], [{"task": "jsonl_qa", "answer": "4"}] * 2)
    >>> [round(r, 4) for r in out["rewards"].tolist()], out["reward/accuracy"], out["reward/format"]
    ([1.1, 0.0], 0.5, 0.5)
    """
    if len(responses) != len(examples):
        raise ValueError(f"Got {len(responses)} responses for {len(examples)} examples.")
    if not math.isfinite(format_weight):
        raise ValueError(f"format_weight={format_weight} must be finite.")
    n = len(examples)
    scores = np.zeros(n, np.float32)
    formatted = np.zeros(n, bool)
    for i, (response, example) in enumerate(zip(responses, examples)):
        answer = extract_answer(response)
        formatted[i] = answer is not None
        if answer is None:
            continue  # No answer block: no credit, and the verifier is not consulted.
        metadata = example.get("metadata") or "{}"
        entry = {
            "question": example.get("question", ""),
            "answer": example["answer"],
            "metadata": json.loads(metadata) if isinstance(metadata, str) else metadata,
        }
        value = float(_score_fn(example["task"], score_fns)(answer, entry))
        if not math.isfinite(value):
            # A NaN here would flow into the advantages and poison every parameter; stop with
            # the culprit named rather than train on it.
            raise ValueError(
                f"Non-finite reward {value} for {_describe(i, example)}, answer {answer[:80]!r}: "
                "the task's score function must return a finite float."
            )
        scores[i] = value
    rewards = scores + np.float32(format_weight) * formatted.astype(np.float32)
    correct = scores >= 1.0
    return {
        "rewards": rewards,
        "scores": scores,
        "correct": correct,
        "formatted": formatted,
        "reward/mean": float(rewards.mean()) if n else 0.0,
        "reward/accuracy": float(correct.mean()) if n else 0.0,
        "reward/format": float(formatted.mean()) if n else 0.0,
    }
