"""Shape buckets: one rounding rule for every padded size (prompt widths, batch rows, vocabulary).

A jitted program compiles once per input shape, so sizes that vary from call to call (the
longest prompt of a batch, the number of prompts) are padded up to one of a few bucket sizes.
:func:`round_up` is that rule for the task pipeline (:func:`rl_mismatch.tasks.render_prompts`),
the sampler (:func:`rl_mismatch.sampler.pad_prompts`, its batch rows) and the experiment (the
prompt width of a run, the tiny model's vocabulary). It is plain Python with no imports, so both
the data side and the model side use it without depending on each other.
"""

from __future__ import annotations


def round_up(n: int, *, multiple: int = 1, power_of_two: bool = False, minimum: int = 1,
             maximum: int | None = None) -> int:
    """The bucket size for ``n`` items.

    In order: ``n`` (at least 1) is rounded up to a power of two if ``power_of_two``, then up to
    a multiple of ``multiple``, then raised to ``minimum`` and finally capped at ``maximum``
    (the cap wins: the result can be below ``n`` or ``minimum`` if ``maximum`` is).

    Args:
      n: the size to pad, e.g. the longest prompt's length or the number of rows.
      multiple: the result is a multiple of this (unless capped), e.g. a mesh axis size.
      power_of_two: round ``n`` up to a power of two first.
      minimum: the smallest result (unless capped).
      maximum: the largest result, or None for no cap.

    Raises:
      ValueError: ``multiple`` is below 1.

    >>> [round_up(n, multiple=8) for n in (1, 8, 9, 17)]
    [8, 8, 16, 24]
    >>> [round_up(n, power_of_two=True, minimum=64, maximum=384) for n in (1, 64, 65, 200, 300)]
    [64, 64, 128, 256, 384]
    >>> [round_up(b, power_of_two=True, multiple=3) for b in (1, 3, 5)]
    [3, 6, 9]
    """
    if multiple < 1:
        raise ValueError(f"multiple must be >= 1, got {multiple}.")
    size = max(n, 1)
    if power_of_two:
        size = 1 << (size - 1).bit_length()
    size = max(-(-size // multiple) * multiple, minimum)
    return size if maximum is None else min(size, maximum)
