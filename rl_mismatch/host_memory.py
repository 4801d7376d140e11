"""How this process's C library allocates host memory: freed pages back to the OS, huge pages.

**Handing freed heap memory back.** glibc's ``malloc`` keeps what a process frees for its later
allocations. A block below the mmap threshold (128 KiB at start, raised up to 32 MiB each time a
larger mapped block is freed) is carved from a heap arena, and when such blocks are freed between
blocks still in use, their pages stay resident: the process's RSS keeps the high-water mark of
everything it ever held at once. An RL run frees large amounts of such memory at a few known
moments:

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

**Huge pages for the large blocks.** A block above the mmap threshold is a fresh mapping, returned
to the kernel when freed. On the CPU backend XLA allocates each run of a compiled program's
temporaries as one such block (1.4 GB for the main job's train step) and each checkpoint's host
copy as others, so every step faults that memory in anew, 4 KiB page by page: ~400k page faults
and 0.6 s of system time per train step on 2 cores. glibc ≥ 2.35 backs its mappings with
transparent huge pages (2 MiB) when started with ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``: the
same train step then took ~1000 page faults (``benchmarks/README.md``, "Main job"). The setting
is read once, when the process starts, so :func:`restart_with_huge_pages` re-executes the running
script under it (the scripts under ``experiments/`` and ``benchmarks/`` call it first). Where it
would change nothing it does nothing: not Linux, an older glibc, transparent huge pages set to
``never`` or already ``always`` for every mapping, the setting already given, or
``RL_MISMATCH_HUGE_PAGES=0``.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys
from collections.abc import Callable, Mapping
from typing import NamedTuple

HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb=1"
OPT_OUT = "RL_MISMATCH_HUGE_PAGES"  # "0": leave the process as it started
_THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"


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


def _glibc_version() -> tuple[int, ...] | None:
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()  # "glibc 2.36"
        return tuple(int(part) for part in version.split(".")) if name == "glibc" else None
    except (AttributeError, OSError, ValueError):  # not glibc, or no such confstr name
        return None


def _thp_mode() -> str | None:
    """The kernel's transparent-huge-page mode: "always", "madvise" or "never" (None: unknown)."""
    try:
        with open(_THP_MODE_FILE) as f:
            text = f.read()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else None


class Host(NamedTuple):
    """What decides whether huge-page-backed malloc mappings are available (:func:`this_host`)."""

    platform: str                   # sys.platform
    glibc: tuple[int, ...] | None   # glibc's version; None: another C library
    thp_mode: str | None            # the kernel's transparent-huge-page mode; None: none


def this_host() -> Host:
    return Host(sys.platform, _glibc_version(), _thp_mode())


def huge_page_environment(environ: Mapping[str, str], host: Host | None = None) -> dict[str, str] | None:
    """The environment to restart under for huge-page-backed ``malloc`` mappings, or None when a
    restart would change nothing (see the module docstring). ``host``: this one by default."""
    platform, glibc, thp_mode = this_host() if host is None else host
    tunables = environ.get("GLIBC_TUNABLES", "")
    if (environ.get(OPT_OUT, "1") == "0" or not platform.startswith("linux") or glibc is None
            or glibc < (2, 35) or thp_mode != "madvise" or "glibc.malloc.hugetlb" in tunables):
        return None
    return {**environ, "GLIBC_TUNABLES": f"{tunables}:{HUGE_PAGES_TUNABLE}" if tunables else HUGE_PAGES_TUNABLE}


def malloc_pages() -> str:
    """How this process's large malloc blocks are paged, for a run's log."""
    if HUGE_PAGES_TUNABLE in os.environ.get("GLIBC_TUNABLES", ""):
        return "huge pages"
    return "huge pages (the kernel's THP mode is always)" if _thp_mode() == "always" else "default pages"


def restart_with_huge_pages() -> None:
    """Re-executes this process, same interpreter and command line, under
    :func:`huge_page_environment` when that is not None; otherwise returns.

    Call it first in a script's ``__main__`` block, before anything is printed or started: the
    process image is replaced (same PID), and the script runs again from its start. The new
    process finds the setting given and returns from here.
    """
    environ = huge_page_environment(os.environ)
    argv = getattr(sys, "orig_argv", None)
    if environ is None or not argv:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, [sys.executable, *argv[1:]], environ)
    except OSError:  # the interpreter cannot be executed again (a frozen or embedded one): go on as is
        return
