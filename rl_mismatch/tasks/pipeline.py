"""From a prepared task split to batches of chat-templated, left-padded prompt tokens.

* :func:`load_split` opens a split written by :mod:`rl_mismatch.tasks.builders` with
  ``tfds.data_source`` and decodes its records to Python strings.
* :func:`render_prompts` applies the model's chat template and left-pads to a bucketed width.
* :class:`PromptBatches` is the RL training stream: step ``s`` holds ``B`` prompts, each
  repeated ``G`` times for GRPO. It is a pure function of ``(seed, s)`` -- random access through
  grain's ``MapDataset`` -- so resuming from a checkpoint needs only the step index.
* :func:`eval_prompt_batches` walks an eval split once, in order, padding the last batch.

Token layout (the sampler's, see ``rl_mismatch.models.decoder``): prompts are LEFT-padded with
``tokenizer.pad_id`` so every prompt ends at column ``P - 1`` and the response starts at ``P``;
``valid_BP`` is False on padding.

Widths: ``P = min(max_prompt_len, max(min_bucket, next_pow2(longest prompt)))`` so jitted
steps see at most ``log2(max_prompt_len / min_bucket) + 1`` prompt widths; pass ``pad_to`` for a
single fixed width. Multi-host: process ``k`` of ``n`` reads only its own ``B / n`` prompts of
each global batch (``shard_index=k, shard_count=n``); the ``n`` local batches of step ``s``
together are exactly the single-process batch of step ``s``, so an ``n``-process run sees the
same data as a 1-process run. All processes must then share one width (``pad_to``), because
their local arrays are assembled into one global array.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, NamedTuple, Protocol

import grain
import numpy as np
import tensorflow_datasets as tfds

from rl_mismatch.buckets import round_up
from rl_mismatch.tasks.rewards import ANSWER_INSTRUCTION


class ChatTokenizer(Protocol):
    """What rendering needs from ``rl_mismatch.models.tokenizer`` (or any stand-in)."""

    pad_id: int

    def apply_chat_template(
        self, messages: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> list[int]: ...


# --------------------------------------------------------------------------------------------
# Reading


def decode_example(record: Mapping[str, Any]) -> dict[str, Any]:
    """A tfds record (text features as bytes) as a dict of ``str`` / ``int``."""
    example = {
        key: value.decode("utf-8") if isinstance(value, bytes) else value
        for key, value in record.items()
    }
    if "index" in example:
        example["index"] = int(example["index"])  # numpy int64 -> int, for JSON-able logs.
    return example


class TaskSplit(Sequence):
    """A random-access split whose items are decoded example dicts (see :func:`load_split`)."""

    def __init__(self, source: Sequence, name: str, split: str):
        self._source = source
        self.name = name
        self.split = split

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict[str, Any]:  # type: ignore[override]
        return decode_example(self._source[index])

    def __repr__(self) -> str:
        return f"TaskSplit({self.name!r}, split={self.split!r}, {len(self)} examples)"


def load_split(name: str, split: str, data_dir: str | os.PathLike) -> TaskSplit:
    """Opens a prepared split with ``tfds.data_source`` (ArrayRecord, no tensorflow).

    Args:
      name: the name returned by ``prepare_reasoning_gym`` / ``prepare_jsonl``, e.g.
        ``"reasoning_gym/countdown-train1000-eval100-seed0"``.
      split: ``"train"`` or ``"eval"``.
      data_dir: the directory the dataset was prepared into.

    Raises:
      ValueError: the dataset or split is not there, or the split has no examples.
    """
    try:
        source = tfds.data_source(name, split=split, data_dir=os.fspath(data_dir), download=False)
    except Exception as e:  # tfds raises several types (DatasetNotFoundError, KeyError, ...).
        raise ValueError(
            f"Cannot open split {split!r} of dataset {name!r} in {os.fspath(data_dir)!r} ({e}). "
            "Prepare it first with rl_mismatch.tasks.prepare_reasoning_gym / prepare_jsonl "
            "into the same data_dir."
        ) from e
    task_split = TaskSplit(source, name, split)
    if len(task_split) == 0:
        raise ValueError(f"{task_split} has no examples; a task split needs at least one.")
    return task_split


# --------------------------------------------------------------------------------------------
# Rendering


def build_messages(question: str, *, system_prompt: str | None = None) -> list[dict[str, str]]:
    """Chat messages for one question: optional system prompt, then the question + format rule.

    The answer-format instruction goes in the user turn, right before the model speaks: small
    models follow the latest instruction far more reliably than a system prompt.

    >>> build_messages("1 + 1?")[-1]["content"]
    '1 + 1?\\nThink briefly, then put the final answer inside <answer></answer>.'
    """
    messages = [] if system_prompt is None else [{"role": "system", "content": system_prompt}]
    messages.append({"role": "user", "content": f"{question}\n{ANSWER_INSTRUCTION}"})
    return messages


def bucket_length(length: int, *, max_len: int, min_bucket: int = 64) -> int:
    """The padded width for a longest prompt of ``length`` tokens.

    ``min(max_len, max(min_bucket, next_pow2(length)))`` (:func:`rl_mismatch.buckets.round_up`):
    at most a handful of widths, so the jitted sampler compiles a handful of times and then
    never again.

    Raises:
      ValueError: ``length`` is above ``max_len``.

    >>> [bucket_length(n, max_len=384) for n in (1, 64, 65, 200, 300)]
    [64, 64, 128, 256, 384]
    """
    if length > max_len:
        raise ValueError(f"length {length} exceeds max_len {max_len}.")
    return round_up(length, power_of_two=True, minimum=min_bucket, maximum=max_len)


def _describe(example: Mapping[str, Any], position: int) -> str:
    return (
        f"example {position} of the batch (task {example.get('task')!r}, "
        f"index {example.get('index')}, question {str(example.get('question', ''))[:60]!r}...)"
    )


def _tokenize(
    tokenizer: ChatTokenizer,
    example: Mapping[str, Any],
    position: int,
    *,
    max_prompt_len: int,
    system_prompt: str | None,
) -> list[int]:
    ids = tokenizer.apply_chat_template(
        build_messages(example["question"], system_prompt=system_prompt),
        add_generation_prompt=True,
    )
    if len(ids) > max_prompt_len:
        raise ValueError(
            f"{_describe(example, position)} renders to {len(ids)} prompt tokens, more than the "
            f"prompt limit max_prompt_len={max_prompt_len} (context length minus the response "
            "budget). Raise the model's context / max_prompt_len, lower max_new_tokens, or drop "
            "long prompts from the task."
        )
    return list(ids)


class RenderedPrompts(NamedTuple):
    """Left-padded prompt tokens.

    Attributes:
      tokens_BP: int32 [B, P], ``pad_id`` on the left.
      valid_BP: bool [B, P], False on padding.
      lengths_B: int32 [B], real prompt tokens per row.
    """

    tokens_BP: np.ndarray
    valid_BP: np.ndarray
    lengths_B: np.ndarray


def _validate_lengths(max_prompt_len: int, min_bucket: int, pad_to: int | None) -> None:
    if max_prompt_len < 1 or min_bucket < 1:
        raise ValueError(f"max_prompt_len={max_prompt_len} and min_bucket={min_bucket} must be >= 1.")
    if pad_to is not None and pad_to < max_prompt_len:
        raise ValueError(
            f"pad_to={pad_to} must be >= max_prompt_len={max_prompt_len} so every allowed prompt fits."
        )


def render_prompts(
    tokenizer: ChatTokenizer,
    examples: Sequence[Mapping[str, Any]],
    *,
    max_prompt_len: int,
    min_bucket: int = 64,
    pad_to: int | None = None,
    system_prompt: str | None = None,
) -> RenderedPrompts:
    """Applies the chat template (with the generation prompt) and left-pads.

    Args:
      tokenizer: has ``apply_chat_template(messages, add_generation_prompt=True) -> list[int]``
        and ``pad_id``.
      examples: decoded examples (need ``question``; ``task``/``index`` name them in errors).
      max_prompt_len: the longest prompt allowed: the context length minus the response budget.
      min_bucket: the smallest width (see :func:`bucket_length`).
      pad_to: a fixed width ``>= max_prompt_len`` instead of bucketing.
      system_prompt: optional system message (None: the template's default).

    Raises:
      ValueError: a prompt longer than ``max_prompt_len`` (naming the example and the limit),
        no examples, or a tokenizer without a pad id.
    """
    _validate_lengths(max_prompt_len, min_bucket, pad_to)
    if not examples:
        raise ValueError("render_prompts got no examples.")
    if getattr(tokenizer, "pad_id", None) is None:
        raise ValueError("The tokenizer has no pad_id; left padding needs one.")
    ids = [
        _tokenize(tokenizer, ex, i, max_prompt_len=max_prompt_len, system_prompt=system_prompt)
        for i, ex in enumerate(examples)
    ]
    lengths_B = np.array([len(x) for x in ids], np.int32)
    width = pad_to or bucket_length(int(lengths_B.max()), max_len=max_prompt_len, min_bucket=min_bucket)
    tokens_BP = np.full((len(ids), width), tokenizer.pad_id, np.int32)
    valid_BP = np.zeros((len(ids), width), bool)
    for row, x in enumerate(ids):
        if x:
            tokens_BP[row, width - len(x) :] = x
            valid_BP[row, width - len(x) :] = True
    return RenderedPrompts(tokens_BP, valid_BP, lengths_B)


def check_prompt_lengths(
    source: Sequence[Mapping[str, Any]],
    tokenizer: ChatTokenizer,
    *,
    max_prompt_len: int,
    system_prompt: str | None = None,
) -> int:
    """Renders every prompt of ``source`` once; returns the longest length.

    Call at start-up to fail before training rather than at the step that first draws a
    too-long prompt.

    Raises:
      ValueError: the first prompt longer than ``max_prompt_len``, named.
    """
    longest = 0
    for i in range(len(source)):
        ids = _tokenize(
            tokenizer, source[i], i, max_prompt_len=max_prompt_len, system_prompt=system_prompt
        )
        longest = max(longest, len(ids))
    return longest


# --------------------------------------------------------------------------------------------
# Batches


class PromptBatch(NamedTuple):
    """One step's prompts. Rows are grouped: row ``i * G + j`` is sample ``j`` of prompt ``i``.

    Attributes:
      tokens_BP: int32 [B*G, P], left-padded prompt tokens.
      valid_BP: bool [B*G, P], False on padding.
      lengths_B: int32 [B*G], prompt lengths.
      example_valid_B: bool [B*G]; False only on rows that pad the last eval batch.
      examples: the B*G decoded examples, for the reward function.
      step: the step (training) or batch index (eval) this batch is for.
    """

    tokens_BP: np.ndarray
    valid_BP: np.ndarray
    lengths_B: np.ndarray
    example_valid_B: np.ndarray
    examples: tuple[dict[str, Any], ...]
    step: int


def _shard(shard_options: grain.sharding.ShardOptions | None) -> tuple[int, int]:
    if shard_options is None:
        return 0, 1
    index, count = shard_options.shard_index, shard_options.shard_count
    if not 0 <= index < count:
        raise ValueError(f"shard_index={index} must be in [0, shard_count={count}).")
    return index, count


def _local_batch_size(batch_size: int, group_size: int, count: int, pad_to: int | None) -> int:
    if batch_size < 1 or group_size < 1:
        raise ValueError(f"batch_size={batch_size} and group_size={group_size} must be >= 1.")
    if batch_size % count:
        raise ValueError(
            f"batch_size={batch_size} prompts cannot be split evenly over {count} processes; "
            "use a multiple of the process count."
        )
    if count > 1 and pad_to is None:
        raise ValueError(
            "With several processes every local batch must have the same width; pass pad_to "
            "(e.g. pad_to=max_prompt_len)."
        )
    return batch_size // count


def _assemble(
    tokenizer: ChatTokenizer,
    examples: Sequence[dict[str, Any]],
    example_valid: Sequence[bool],
    group_size: int,
    step: int,
    render_kwargs: Mapping[str, Any],
) -> PromptBatch:
    rendered = render_prompts(tokenizer, examples, **render_kwargs)
    # Render each prompt once, then repeat rows: the G samples of a group share a prompt.
    repeat = lambda x: np.repeat(x, group_size, axis=0)  # noqa: E731
    return PromptBatch(
        tokens_BP=repeat(rendered.tokens_BP),
        valid_BP=repeat(rendered.valid_BP),
        lengths_B=repeat(rendered.lengths_B),
        example_valid_B=repeat(np.asarray(example_valid, bool)),
        examples=tuple(ex for ex in examples for _ in range(group_size)),
        step=step,
    )


class PromptBatches:
    """The RL prompt stream: ``batches[step]`` is a pure function of ``(seed, step)``.

    Global step ``s`` takes prompts ``[s*B, (s+1)*B)`` of an endless sequence of epochs, each a
    fresh permutation of the split (grain ``shuffle`` reseeds per epoch). This process takes its
    contiguous ``B / n`` of them and repeats each ``G`` times.

    Args:
      source: a split from :func:`load_split` (or any sequence of decoded examples).
      tokenizer: see :func:`render_prompts`.
      batch_size: prompts per step over all processes (``B``).
      group_size: samples per prompt (``G``).
      max_prompt_len, min_bucket, pad_to, system_prompt: see :func:`render_prompts`.
      seed: shuffle seed, in [0, 2**32).
      shard_options: ``grain.sharding.ShardOptions(shard_index=jax.process_index(),
        shard_count=jax.process_count())`` (or ``grain.sharding.ShardByJaxProcess()``) for
        multi-host; None for one process.

    Example::

      batches = PromptBatches(load_split(name, "train", data_dir), tok, batch_size=8,
                              group_size=4, max_prompt_len=256, seed=0)
      for batch in batches.iterate(start_step=restored_step): ...
    """

    def __init__(
        self,
        source: Sequence[dict[str, Any]],
        tokenizer: ChatTokenizer,
        *,
        batch_size: int,
        group_size: int,
        max_prompt_len: int,
        seed: int,
        shard_options: grain.sharding.ShardOptions | None = None,
        min_bucket: int = 64,
        pad_to: int | None = None,
        system_prompt: str | None = None,
    ):
        if len(source) == 0:
            raise ValueError(f"{source!r} has no examples; cannot draw prompt batches from it.")
        if not 0 <= seed < 2**32:
            raise ValueError(f"seed={seed} must be in [0, 2**32) (grain's shuffle seed range).")
        _validate_lengths(max_prompt_len, min_bucket, pad_to)
        shard_index, shard_count = _shard(shard_options)
        self.local_batch_size = _local_batch_size(batch_size, group_size, shard_count, pad_to)
        self.batch_size, self.group_size = batch_size, group_size
        self._tokenizer = tokenizer
        self._render_kwargs = dict(
            max_prompt_len=max_prompt_len,
            min_bucket=min_bucket,
            pad_to=pad_to,
            system_prompt=system_prompt,
        )
        # Local batches are consecutive runs of the shuffled stream; global step s is the n
        # local batches s*n .. s*n+n-1, and this process keeps the shard_index-th of them.
        # Only this process's records are ever read.
        stream = grain.MapDataset.source(source).shuffle(seed=seed).repeat()
        local = stream.batch(self.local_batch_size, drop_remainder=True, batch_fn=list)
        self._batches = local[shard_index::shard_count]

    def __getitem__(self, step: int) -> PromptBatch:
        if step < 0:
            raise ValueError(f"step={step} must be >= 0.")
        examples = self._batches[step]
        valid = [True] * len(examples)
        return _assemble(
            self._tokenizer, examples, valid, self.group_size, step, self._render_kwargs
        )

    def iterate(self, start_step: int = 0) -> Iterator[PromptBatch]:
        """Batches ``start_step, start_step + 1, ...`` (resume from a checkpoint's step)."""
        step = start_step
        while True:
            yield self[step]
            step += 1


def eval_prompt_batches(
    source: Sequence[dict[str, Any]],
    tokenizer: ChatTokenizer,
    *,
    batch_size: int,
    max_prompt_len: int,
    group_size: int = 1,
    shard_options: grain.sharding.ShardOptions | None = None,
    min_bucket: int = 64,
    pad_to: int | None = None,
    system_prompt: str | None = None,
) -> Iterator[PromptBatch]:
    """Every example of ``source`` once, in order, in ``ceil(N / batch_size)`` global batches.

    The last batch is filled up with repeats of the first examples marked
    ``example_valid_B = False`` (weight them out of eval metrics), so every batch has the same
    shape and every process yields the same number of batches.
    """
    if len(source) == 0:
        raise ValueError(f"{source!r} has no examples; nothing to evaluate.")
    _validate_lengths(max_prompt_len, min_bucket, pad_to)
    shard_index, shard_count = _shard(shard_options)
    local = _local_batch_size(batch_size, group_size, shard_count, pad_to)
    render_kwargs = dict(
        max_prompt_len=max_prompt_len, min_bucket=min_bucket, pad_to=pad_to, system_prompt=system_prompt
    )
    n = len(source)
    for step in range(-(-n // batch_size)):
        start = step * batch_size + shard_index * local
        indices = range(start, start + local)
        examples = [source[i % n] for i in indices]
        valid = [i < n for i in indices]
        yield _assemble(tokenizer, examples, valid, group_size, step, render_kwargs)
