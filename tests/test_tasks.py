"""Tests for rl_mismatch.tasks: tfds builders, rewards, prompt rendering and batching."""

from __future__ import annotations

import json
import math
import tempfile

import grain
import numpy as np
import pytest
import tensorflow_datasets as tfds
import tokenizers
from tokenizers import decoders, models, pre_tokenizers

from rl_mismatch import tasks

TRAIN, EVAL = 16, 8  # Tiny splits: enough to test disjointness, sharding and epochs.
RG_TASKS = ("countdown", "gsm_symbolic", "basic_arithmetic")

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _backend() -> tokenizers.Tokenizer:
    # Byte-level BPE with no merges: one token per byte, so prompt lengths are easy to reason about.
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = tokenizers.Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(["<|im_start|>", "<|im_end|>", "<pad>"])
    return backend


class _StandInTokenizer:
    """Only used if rl_mismatch.models.tokenizer is unavailable: the same interface, ChatML."""

    def __init__(self):
        self.backend = _backend()
        self.pad_id = self.backend.token_to_id("<pad>")

    def apply_chat_template(self, messages, add_generation_prompt=True):
        text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        text += "<|im_start|>assistant\n" if add_generation_prompt else ""
        return self.backend.encode(text, add_special_tokens=False).ids


@pytest.fixture(scope="module")
def tok():
    try:
        from rl_mismatch.models.tokenizer import Tokenizer
    except ImportError:
        return _StandInTokenizer()
    return Tokenizer(_backend(), eos_token="<|im_end|>", pad_token="<pad>", chat_template=CHATML)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="module")
def rg_names(data_dir):
    """One tiny prepared dataset per reasoning-gym task, shared by the module's tests."""
    return {
        task: tasks.prepare_reasoning_gym(task, data_dir, train_size=TRAIN, eval_size=EVAL, seed=0)
        for task in RG_TASKS
    }


def _records(name, split, data_dir):
    source = tfds.data_source(name, split=split, data_dir=str(data_dir), download=False)
    return sorted((tasks.decode_example(source[i]) for i in range(len(source))), key=lambda e: e["index"])


# ------------------------------------------------------------------------------- builders


@pytest.mark.parametrize("task", RG_TASKS)
def test_reasoning_gym_builder_is_deterministic_with_disjoint_splits(task, rg_names, data_dir, tmp_path):
    name = rg_names[task]
    assert name == f"reasoning_gym/{task}-train{TRAIN}-eval{EVAL}-seed0"
    train, evals = _records(name, "train", data_dir), _records(name, "eval", data_dir)
    assert (len(train), len(evals)) == (TRAIN, EVAL)
    assert {e["task"] for e in train + evals} == {task}
    assert [e["index"] for e in train] == list(range(TRAIN))
    train_q = {e["question"] for e in train}
    assert len(train_q) == TRAIN, "duplicate questions within the train split"
    assert not train_q & {e["question"] for e in evals}, "train and eval share a question"
    # The stored metadata is the reasoning-gym entry's, as JSON.
    assert json.loads(train[0]["metadata"])["source_dataset"] == task

    # Same seed into another data dir: identical records. Another seed: other questions.
    again = tasks.prepare_reasoning_gym(task, tmp_path, train_size=TRAIN, eval_size=EVAL, seed=0)
    assert _records(again, "train", tmp_path) == train
    assert _records(again, "eval", tmp_path) == evals
    other = tasks.prepare_reasoning_gym(task, tmp_path, train_size=TRAIN, eval_size=EVAL, seed=1)
    assert {e["question"] for e in _records(other, "train", tmp_path)} != train_q


def test_builder_options_and_validation(tmp_path):
    # reasoning-gym kwargs flow through and get their own directory.
    name = tasks.prepare_reasoning_gym(
        "countdown", tmp_path, train_size=4, eval_size=2, seed=0, min_numbers=3, max_numbers=3
    )
    assert name.startswith("reasoning_gym/countdown-train4-eval2-seed0-")
    for e in _records(name, "train", tmp_path):
        assert len(json.loads(e["metadata"])["numbers"]) == 3
    with pytest.raises(ValueError, match="Unknown reasoning-gym task 'countdwn'"):
        tasks.reasoning_gym_config("countdwn")
    with pytest.raises(ValueError, match="rejected task_kwargs"):
        tasks.reasoning_gym_config("countdown", no_such_field=1)


def test_building_leaves_no_temporary_directories(tmp_path, monkeypatch):
    # tfds looks for a fresh builder's metadata in its GCS bucket through a temporary directory
    # that it never removes; these datasets are generated here, so nothing may be left behind.
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    tasks.prepare_reasoning_gym("basic_arithmetic", tmp_path / "data", train_size=2, eval_size=1, seed=0)
    path = tmp_path / "qa.jsonl"
    path.write_text(json.dumps({"question": "1+1?", "answer": "2"}) + "\n")
    tasks.prepare_jsonl(path, tmp_path / "data", eval_size=0)
    assert list(scratch.iterdir()) == []


def test_empty_dataset_is_a_clear_error(tmp_path, tok):
    with pytest.raises(ValueError, match="train_size=0: a task split needs at least one example"):
        tasks.prepare_reasoning_gym("basic_arithmetic", tmp_path, train_size=0)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n")
    with pytest.raises(ValueError, match="empty.jsonl' contains no examples"):
        tasks.prepare_jsonl(empty, tmp_path / "data")
    assert not (tmp_path / "data").exists(), "a rejected file must not leave a half-built dataset"
    with pytest.raises(ValueError, match="has no examples"):
        tasks.PromptBatches([], tok, batch_size=2, group_size=2, max_prompt_len=64, seed=0)
    with pytest.raises(ValueError, match="nothing to evaluate"):
        next(tasks.eval_prompt_batches([], tok, batch_size=2, max_prompt_len=64))


def test_load_split(rg_names, data_dir, tmp_path):
    split = tasks.load_split(rg_names["basic_arithmetic"], "eval", data_dir)
    assert len(split) == EVAL
    example = split[0]
    assert isinstance(example["question"], str) and isinstance(example["index"], int)
    with pytest.raises(ValueError, match="Prepare it first"):
        tasks.load_split(rg_names["basic_arithmetic"], "eval", tmp_path)  # Not built there.


def test_jsonl_builder(tmp_path):
    lines = [
        {"question": "Tom has 3 apples and buys 4. How many?", "answer": "3 + 4 = 7\n#### 7"},
        {"question": "What is 10 * 100?", "answer": "#### 1,000"},
        {"question": "Capital of France?", "answer": "Paris", "source": "geo"},
        {"question": "2 ** 5?", "answer": 32},
    ]
    path = tmp_path / "mine.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    name = tasks.prepare_jsonl(path, tmp_path / "data", eval_size=1, seed=0)
    assert name.startswith("jsonl_qa/mine-")
    train, evals = _records(name, "train", tmp_path / "data"), _records(name, "eval", tmp_path / "data")
    assert (len(train), len(evals)) == (3, 1)
    by_question = {e["question"]: e for e in train + evals}
    assert [by_question[x["question"]]["answer"] for x in lines] == ["7", "1000", "Paris", "32"]
    assert {e["task"] for e in train + evals} == {"jsonl_qa"}
    assert json.loads(by_question["Capital of France?"]["metadata"])["source"] == "geo"
    # The same file gives the same name; an edited file a new one (no stale cache).
    assert tasks.prepare_jsonl(path, tmp_path / "data", eval_size=1, seed=0) == name
    assert tasks.jsonl_config(path, eval_size=1, seed=0).name == name.split("/")[1]
    edited = [*lines[:3], {**lines[3], "answer": 33}]  # one answer changed, same settings
    path.write_text("\n".join(json.dumps(x) for x in edited) + "\n")
    assert tasks.jsonl_config(path, eval_size=1, seed=0).name != name.split("/")[1]

    # A separate eval file; one that repeats a train question is refused.
    eval_path = tmp_path / "test.jsonl"
    eval_path.write_text(json.dumps({"question": "What is 20 * 100?", "answer": "#### 2,000"}) + "\n")
    name2 = tasks.prepare_jsonl(path, tmp_path / "data", eval_path=eval_path)
    assert [e["answer"] for e in _records(name2, "eval", tmp_path / "data")] == ["2000"]
    eval_path.write_text(json.dumps({**lines[1], "question": " What is 10 *  100? "}) + "\n")
    with pytest.raises(ValueError, match=r"test.jsonl repeats 1 question\(s\) of .*mine.jsonl \(eval lines \[1\]\)"):
        tasks.prepare_jsonl(path, tmp_path / "data", eval_path=eval_path)


def test_jsonl_hold_out_keeps_repeated_questions_together(tmp_path):
    # Six distinct questions, two of them repeated: whichever are held out, no question may end
    # up in both splits, and eval_size counts questions.
    rows = [{"question": f"q{i % 6}", "answer": str(i % 6)} for i in range(8)]
    path = tmp_path / "dup.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in rows) + "\n")
    for seed in range(4):
        name = tasks.prepare_jsonl(path, tmp_path / "data", eval_size=2, seed=seed)
        train, evals = _records(name, "train", tmp_path / "data"), _records(name, "eval", tmp_path / "data")
        train_q, eval_q = {e["question"] for e in train}, {e["question"] for e in evals}
        assert not train_q & eval_q and len(eval_q) == 2 and len(train) + len(evals) == 8, seed
    with pytest.raises(ValueError, match="has only 6 distinct questions"):
        tasks.jsonl_config(path, eval_size=6)


@pytest.mark.parametrize(
    "text, message",
    [
        ('{"question": "q"}\n', r"bad.jsonl:1: missing field\(s\) \['answer'\]"),
        ('{"question": "q", "answer": "1"}\n{"answer": "2"}\n', r"bad.jsonl:2: missing field\(s\) \['question'\]"),
        ("not json\n", "bad.jsonl:1: not valid JSON"),
        ('["q", "a"]\n', "bad.jsonl:1: expected a JSON object"),
        ('{"question": "q", "answer": "work #### "}\n', r"bad.jsonl:1: the final answer \(after '####'\) is empty"),
    ],
)
def test_jsonl_errors(tmp_path, text, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        tasks.prepare_jsonl(path, tmp_path / "data")


def test_jsonl_missing_file_and_bad_eval_size(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        tasks.prepare_jsonl(tmp_path / "nope.jsonl", tmp_path)
    path = tmp_path / "one.jsonl"
    path.write_text('{"question": "q", "answer": "1"}\n')
    with pytest.raises(ValueError, match="leaves no train examples"):
        tasks.prepare_jsonl(path, tmp_path, eval_size=1)


# ------------------------------------------------------------------------------- rewards


@pytest.mark.parametrize("task", RG_TASKS)
def test_reward_uses_reasoning_gym_scoring(task, rg_names, data_dir):
    ex = tasks.load_split(rg_names[task], "train", data_dir)[0]
    responses = [
        f"Let me think.\n<answer>{ex['answer']}</answer>",  # Correct and well formed.
        "<answer>999999</answer>",  # Well formed, wrong.
        ex["answer"],  # Right answer but no answer block: badly formatted, no credit.
        f"<answer>{ex['answer']}",  # Unclosed block: badly formatted.
    ]
    out = tasks.score(responses, [ex] * 4, format_weight=0.1)
    np.testing.assert_array_equal(out["formatted"], [True, True, False, False])
    np.testing.assert_array_equal(out["correct"], [True, False, False, False])
    assert out["scores"][0] == 1.0
    assert out["scores"][1] < 1.0  # reasoning-gym may give partial credit (countdown: 0.01).
    np.testing.assert_array_equal(out["scores"][2:], [0.0, 0.0])
    # float32 arithmetic: 1 + 0.1 is exact to float32 rounding, hence the float32 reference.
    assert out["rewards"][0] == np.float32(1.0) + np.float32(0.1)
    assert out["rewards"].dtype == np.float32
    assert out["reward/accuracy"] == 0.25
    assert out["reward/format"] == 0.5
    assert out["reward/mean"] == pytest.approx(float(out["rewards"].mean()))


def test_countdown_reward_checks_the_expression(rg_names, data_dir):
    # Countdown is scored by evaluating the expression against metadata numbers/target (read
    # back from the stored JSON), so an equivalent expression other than the stored one counts.
    ex = tasks.load_split(rg_names["countdown"], "train", data_dir)[0]
    meta = json.loads(ex["metadata"])
    responses = [
        f"<answer>0 + {ex['answer']}</answer>",  # Right value, but uses a number (0) not given.
        f"<answer>{meta['target']}</answer>",  # The target itself is not an expression.
        "<answer>" + " + ".join(map(str, meta["numbers"])) + "</answer>",  # All numbers, wrong value.
        f"<answer>({ex['answer']})</answer>",  # Equivalent to the stored expression.
    ]
    assert sum(meta["numbers"]) != meta["target"]  # Else response 2 would be right.
    out = tasks.score(responses, [ex] * 4)
    assert (out["scores"][:3] < 1.0).all()
    assert out["scores"][3] == 1.0


def test_jsonl_reward():
    ex = {"question": "q", "answer": "1000", "task": "jsonl_qa", "metadata": "{}", "index": 0}
    out = tasks.score(["<answer>1,000</answer>", "<answer>$1000.</answer>", "<answer>999</answer>"], [ex] * 3)
    np.testing.assert_array_equal(out["correct"], [True, True, False])


def test_nan_reward_is_a_clear_error():
    examples = [
        {"question": "q", "answer": "1", "task": "custom", "metadata": "{}", "index": 7},
        {"question": "q", "answer": "1", "task": "custom", "metadata": "{}", "index": 8},
    ]
    fns = {"custom": lambda answer, entry: math.nan if answer == "bad" else 1.0}
    out = tasks.score(["<answer>1</answer>", "<answer>1</answer>"], examples, score_fns=fns)
    assert out["reward/accuracy"] == 1.0
    with pytest.raises(ValueError, match=r"Non-finite reward nan for example 1 \(task 'custom', index 8\)"):
        tasks.score(["<answer>1</answer>", "<answer>bad</answer>"], examples, score_fns=fns)
    fns_inf = {"custom": lambda answer, entry: math.inf}
    with pytest.raises(ValueError, match="Non-finite reward inf for example 0"):
        tasks.score(["<answer>1</answer>"], examples[:1], score_fns=fns_inf)
    with pytest.raises(ValueError, match="No scorer for task 'custom'"):
        tasks.score(["<answer>1</answer>"], examples[:1])
    with pytest.raises(ValueError, match="2 responses for 1 examples"):
        tasks.score(["a", "b"], examples[:1])


# ------------------------------------------------------------------------------- prompts


def test_render_prompts_left_pads_to_a_bucket(tok):
    examples = [{"question": "1 + 1?"}, {"question": "A longer question: what is 12 * 12?"}]
    out = tasks.render_prompts(tok, examples, max_prompt_len=512, min_bucket=64)
    expected = [tok.apply_chat_template(tasks.build_messages(e["question"])) for e in examples]
    lengths = [len(x) for x in expected]
    np.testing.assert_array_equal(out.lengths_B, lengths)
    width = 1 << (max(lengths) - 1).bit_length()  # Next power of two >= the longest prompt.
    assert out.tokens_BP.shape == out.valid_BP.shape == (2, width)
    assert out.tokens_BP.dtype == np.int32
    for row, ids in enumerate(expected):
        np.testing.assert_array_equal(out.tokens_BP[row, width - len(ids):], ids)
        assert (out.tokens_BP[row, : width - len(ids)] == tok.pad_id).all()
        np.testing.assert_array_equal(out.valid_BP[row], np.arange(width) >= width - len(ids))
    fixed = tasks.render_prompts(tok, examples, max_prompt_len=512, pad_to=512)
    assert fixed.tokens_BP.shape == (2, 512)


def test_too_long_prompt_is_a_clear_error(tok, rg_names, data_dir):
    examples = [{"question": "short"}, {"question": "x" * 300, "task": "mine", "index": 41}]
    with pytest.raises(ValueError, match=r"example 1 of the batch \(task 'mine', index 41.*max_prompt_len=128"):
        tasks.render_prompts(tok, examples, max_prompt_len=128)
    split = tasks.load_split(rg_names["basic_arithmetic"], "train", data_dir)
    longest = tasks.check_prompt_lengths(split, tok, max_prompt_len=4096)
    with pytest.raises(ValueError, match=f"max_prompt_len={longest - 1}"):
        tasks.check_prompt_lengths(split, tok, max_prompt_len=longest - 1)


# ------------------------------------------------------------------------------- batches


def test_prompt_batches_shard_over_two_processes(tok, rg_names, data_dir):
    split = tasks.load_split(rg_names["basic_arithmetic"], "train", data_dir)
    kw = dict(batch_size=8, group_size=2, max_prompt_len=256, pad_to=256, seed=3)
    single = tasks.PromptBatches(split, tok, **kw)
    shards = [
        tasks.PromptBatches(split, tok, shard_options=grain.sharding.ShardOptions(k, 2), **kw)
        for k in range(2)
    ]
    assert shards[0].local_batch_size == 4
    seen_epoch = []
    for step in range(4):  # Two epochs of 16 examples at 8 prompts per step.
        full = single[step]
        parts = [s[step] for s in shards]
        assert full.tokens_BP.shape == (16, 256) and parts[0].tokens_BP.shape == (8, 256)
        assert full.step == step and full.example_valid_B.all()
        # The two processes' prompts are disjoint and together are the 1-process batch.
        q = [[e["index"] for e in p.examples[::2]] for p in parts]
        assert not set(q[0]) & set(q[1])
        assert [e["index"] for e in full.examples[::2]] == q[0] + q[1]
        np.testing.assert_array_equal(np.concatenate([p.tokens_BP for p in parts]), full.tokens_BP)
        # GRPO groups: rows i*G .. i*G+G-1 are the same prompt.
        np.testing.assert_array_equal(full.tokens_BP[0::2], full.tokens_BP[1::2])
        assert full.examples[0] == full.examples[1]
        seen_epoch += q[0] + q[1]
        if step % 2 == 1:  # Each epoch visits every example exactly once.
            assert sorted(seen_epoch) == list(range(TRAIN))
            seen_epoch = []
    # Epochs are reshuffled, seeds matter, and resuming at a step gives that step's batch.
    order = lambda b: [e["index"] for e in b.examples]  # noqa: E731
    assert order(single[0]) + order(single[1]) != order(single[2]) + order(single[3])
    assert order(tasks.PromptBatches(split, tok, **(kw | {"seed": 4}))[0]) != order(single[0])
    resumed = next(tasks.PromptBatches(split, tok, **kw).iterate(start_step=3))
    assert order(resumed) == order(single[3]) and resumed.step == 3


def test_prompt_batches_validation(tok):
    examples = [{"question": "q", "task": "t", "index": 0}]
    with pytest.raises(ValueError, match="split evenly over 3 processes"):
        tasks.PromptBatches(examples, tok, batch_size=4, group_size=1, max_prompt_len=64, seed=0,
                            pad_to=64, shard_options=grain.sharding.ShardOptions(0, 3))
    with pytest.raises(ValueError, match="pass pad_to"):
        tasks.PromptBatches(examples, tok, batch_size=4, group_size=1, max_prompt_len=64, seed=0,
                            shard_options=grain.sharding.ShardOptions(1, 2))
    with pytest.raises(ValueError, match="seed=-1"):
        tasks.PromptBatches(examples, tok, batch_size=4, group_size=1, max_prompt_len=64, seed=-1)


def test_eval_batches_cover_each_example_once(tok, rg_names, data_dir):
    split = tasks.load_split(rg_names["basic_arithmetic"], "eval", data_dir)  # 8 examples.
    kw = dict(batch_size=6, max_prompt_len=256, pad_to=256)
    per_process = [
        list(tasks.eval_prompt_batches(split, tok, shard_options=grain.sharding.ShardOptions(k, 2), **kw))
        for k in range(2)
    ]
    assert [len(b) for b in per_process] == [2, 2]  # ceil(8 / 6) global batches on each process.
    real = [
        e["index"]
        for batches in per_process
        for b in batches
        for e, ok in zip(b.examples, b.example_valid_B)
        if ok
    ]
    assert sorted(real) == list(range(EVAL))
    assert sum((~b.example_valid_B).sum() for bs in per_process for b in bs) == 12 - EVAL
