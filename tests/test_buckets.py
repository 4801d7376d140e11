"""rl_mismatch.buckets.round_up against the rounding rules it replaced, over a wide range of sizes.

The references below are the helpers the sampler, the task pipeline and the experiment each had
before sharing ``round_up``, written out again here so a change to the shared rule shows up as a
difference in some padded shape.
"""

import math

import pytest

from rl_mismatch import sampler, tasks
from rl_mismatch.buckets import round_up

SIZES = range(1, 5001)
MULTIPLES = (1, 2, 3, 4, 5, 6, 7, 8, 12, 16, 32, 63, 64, 100, 128)


def _multiple_ref(n, multiple):  # the sampler's prompt width: a multiple of prompt_bucket
    return max(multiple, -(-n // multiple) * multiple)


def _pow2_ref(n, *, max_len, min_bucket):  # the task pipeline's prompt width
    return min(max_len, max(min_bucket, 1 << max(n - 1, 0).bit_length()))


def _rows_ref(b, data_axis):  # the sampler's batch rows
    return _multiple_ref(1 << max(0, math.ceil(math.log2(b))), data_axis)


def test_multiple_of():
    for multiple in MULTIPLES:
        assert [round_up(n, multiple=multiple) for n in range(0, 5001)] == [
            _multiple_ref(n, multiple) for n in range(0, 5001)], multiple


def test_multiple_of_capped():  # the experiment's prompt width: a multiple of 8, at most max_prompt_len
    for cap in (1, 7, 8, 9, 100, 128, 383, 384, 1000, 4096):
        assert [round_up(n, multiple=8, maximum=cap) for n in SIZES] == [
            min(_multiple_ref(n, 8), cap) for n in SIZES], cap


def test_power_of_two_with_floor_and_cap():
    for max_len in (1, 2, 3, 63, 64, 65, 128, 200, 384, 1024, 5000):
        for min_bucket in (1, 2, 3, 8, 64, 100, 4096):
            expected = [_pow2_ref(n, max_len=max_len, min_bucket=min_bucket) for n in range(0, max_len + 1)]
            assert [round_up(n, power_of_two=True, minimum=min_bucket, maximum=max_len)
                    for n in range(0, max_len + 1)] == expected, (max_len, min_bucket)
            assert [tasks.bucket_length(n, max_len=max_len, min_bucket=min_bucket)
                    for n in range(0, max_len + 1)] == expected, (max_len, min_bucket)


def test_power_of_two_then_multiple():
    for data_axis in range(1, 17):
        assert [round_up(b, power_of_two=True, multiple=data_axis) for b in SIZES] == [
            _rows_ref(b, data_axis) for b in SIZES], data_axis


def test_vocabulary_multiple_of_eight():  # the tiny model's vocabulary
    assert [round_up(v, multiple=8) for v in SIZES] == [-(-v // 8) * 8 for v in SIZES]


def test_users_and_errors():
    assert sampler.pad_prompts([[1] * 17, [2]], pad_id=0, prompt_bucket=8)[0].shape == (2, 24)
    assert sampler.pad_prompts([[1] * 17], pad_id=0, prompt_bucket=8, context=20)[0].shape == (1, 20)
    assert round_up(0) == round_up(-5) == 1 and round_up(0, multiple=8) == 8
    assert round_up(9, minimum=64, maximum=32) == 32  # the cap wins
    with pytest.raises(ValueError, match="multiple must be >= 1"):
        round_up(5, multiple=0)
    with pytest.raises(ValueError, match="exceeds max_len"):
        tasks.bucket_length(65, max_len=64)
