"""Handing freed heap memory back to the operating system.

glibc's ``malloc`` keeps what a process frees for its later allocations. A block below the mmap
threshold (128 KiB at start, raised up to 32 MiB each time a larger mapped block is freed) is
carved from a heap arena, and when such blocks are freed between blocks still in use, their pages
stay resident: the process's RSS keeps the high-water mark of everything it ever held at once.
An RL run frees large amounts of such memory at a few known moments:

* the loader's float32 host copy of the weights, once the train state owns them;
* XLA's compilation of the first step;
* every asynchronous checkpoint: the save holds a copy of the parameters and the optimizer
  state (so that training may go on and donate them) while a background thread writes the
  files; on the CPU its arrays, mostly below the threshold, land in the arenas.

Without a trim the freed copy stays resident through the next train step, and each later save can
add to it. :func:`release_free_memory` calls glibc's ``malloc_trim(0)``, which returns every whole
free page of every arena to the kernel (``madvise``); the memory is faulted in again only if it
is allocated again. It is safe from any thread: after a checkpoint it runs in orbax's background
thread, off the training path. On a C library without ``malloc_trim`` (macOS, musl) it does
nothing. ``benchmarks/README.md`` ("Main job") has the measured effect.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        trim = ctypes.CDLL(None).malloc_trim  # The C library this process already runs on.
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


def release_free_memory() -> bool:
    """Returns the allocator's free pages to the operating system.

    Returns:
      True if memory was released; False if there was none to release or the C library has no
      ``malloc_trim``.
    """
    trim = _malloc_trim()
    return trim is not None and bool(trim(0))
