"""Held-out evaluation: greedy decoding of every eval example once, scored as the rollouts are."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rl_mismatch import evaluation, sampler, tasks
from rl_mismatch.models import Decoder, tiny_chat_tokenizer, tiny_config

N_NEW = 12


class _AnswerTokenizer:
    """The tiny tokenizer, except that a reply decodes to ``<answer>{sum of its ids}</answer>``,
    so a verifier can score greedy replies by something the test computes independently."""

    def __init__(self):
        self._tok = tiny_chat_tokenizer()

    def __getattr__(self, name):
        return getattr(self._tok, name)

    def decode(self, ids):
        return f"<answer>{int(np.sum(ids))}</answer>"


def _even(answer, entry):
    del entry
    return float(int(answer) % 2 == 0)


@pytest.fixture(scope="module")
def setup():
    tok = _AnswerTokenizer()
    model = Decoder(tiny_config(vocab_size=264), dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(3))
    split = [{"question": f"What is {i} + {i * 3 % 5}?", "answer": "0", "task": "parity", "metadata": "{}"}
             for i in range(7)]
    sampling = sampler.SamplingConfig(max_new_tokens=N_NEW, temperature=1.0, eos_ids=(tok.eos_id,), pad_id=tok.pad_id)
    return tok, model, split, sampling


def test_eval_metrics_equal_a_direct_greedy_decode(setup):
    tok, model, split, sampling = setup
    # Batches of 3 over 7 examples: the last batch holds 2 padding rows, which must not count.
    evaluator = evaluation.Evaluator(split, tok, sampling=sampling, batch_size=3, max_prompt_len=128,
                                     score_fns={"parity": _even})
    assert len(evaluator.batches) == 3
    got = evaluator(model)

    # Independently: render the 7 prompts, decode them greedily in one batch, score by hand.
    prompts = [tok.apply_chat_template(tasks.build_messages(ex["question"])) for ex in split]
    greedy = sampler.SamplingConfig(max_new_tokens=N_NEW, temperature=0.0, eos_ids=(tok.eos_id,), pad_id=tok.pad_id)
    out = sampler.generate(model, prompts, jax.random.key(123), greedy)
    tokens, mask = np.asarray(out.tokens_BT), np.asarray(out.response_mask_BT)
    lengths = np.asarray(out.response_lengths_B)
    even = np.array([int(tokens[i][mask[i]].sum()) % 2 == 0 for i in range(len(split))])
    assert 0 < even.mean() < 1  # The check can tell right from wrong rows.
    assert got["eval/accuracy"] == pytest.approx(even.mean(), abs=1e-12)
    assert got["eval/format"] == 1.0
    assert got["eval/response_length_mean"] == pytest.approx(lengths.mean(), abs=1e-12)
    assert got["eval/finished_frac"] == pytest.approx(np.asarray(out.finished_B).mean(), abs=1e-12)
    # Greedy: a second evaluation is the same, whatever the sampling settings' temperature.
    assert evaluator(model) == got


def test_eval_of_an_empty_split_is_a_clear_error(setup):
    tok, _, _, sampling = setup
    with pytest.raises(ValueError, match="no examples; nothing to evaluate"):
        evaluation.Evaluator([], tok, sampling=sampling, batch_size=4, max_prompt_len=64)
    with pytest.raises(ValueError, match="eval batch size must be >= 1"):
        evaluation.Evaluator([{"question": "q"}], tok, sampling=sampling, batch_size=0, max_prompt_len=64)
