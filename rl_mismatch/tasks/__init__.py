"""Tasks: tensorflow-datasets builders (ArrayRecord, no tensorflow), rewards, prompt batches.

Typical use::

  from rl_mismatch import tasks
  name = tasks.prepare_reasoning_gym("countdown", data_dir, train_size=1000, eval_size=100)
  train = tasks.load_split(name, "train", data_dir)
  batches = tasks.PromptBatches(train, tok, batch_size=8, group_size=4,
                                max_prompt_len=256, seed=0)
  batch = batches[step]                      # resumable: a pure function of (seed, step)
  out = tasks.score(responses, batch.examples)   # out["rewards"], out["reward/accuracy"], ...
"""

from rl_mismatch.tasks.builders import (
    EVAL_SPLIT,
    JSONL_TASK,
    REASONING_GYM_TASKS,
    TRAIN_SPLIT,
    JsonlQA,
    JsonlQAConfig,
    ReasoningGym,
    ReasoningGymConfig,
    extract_final_answer,
    generate_reasoning_gym_split,
    jsonl_config,
    prepare_jsonl,
    prepare_reasoning_gym,
    read_jsonl_examples,
    reasoning_gym_config,
)
from rl_mismatch.tasks.pipeline import (
    PromptBatch,
    PromptBatches,
    RenderedPrompts,
    TaskSplit,
    bucket_length,
    build_messages,
    check_prompt_lengths,
    decode_example,
    eval_prompt_batches,
    load_split,
    render_prompts,
)
from rl_mismatch.tasks.rewards import (
    ANSWER_INSTRUCTION,
    extract_answer,
    score,
    score_final_answer,
)

__all__ = [
    "ANSWER_INSTRUCTION",
    "EVAL_SPLIT",
    "JSONL_TASK",
    "REASONING_GYM_TASKS",
    "TRAIN_SPLIT",
    "JsonlQA",
    "JsonlQAConfig",
    "PromptBatch",
    "PromptBatches",
    "ReasoningGym",
    "ReasoningGymConfig",
    "RenderedPrompts",
    "TaskSplit",
    "bucket_length",
    "build_messages",
    "check_prompt_lengths",
    "decode_example",
    "eval_prompt_batches",
    "extract_answer",
    "extract_final_answer",
    "generate_reasoning_gym_split",
    "jsonl_config",
    "load_split",
    "prepare_jsonl",
    "prepare_reasoning_gym",
    "read_jsonl_examples",
    "reasoning_gym_config",
    "render_prompts",
    "score",
    "score_final_answer",
]
