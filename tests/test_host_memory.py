"""Tests for rl_mismatch.host_memory: freed heap pages really leave the process's RSS."""

from __future__ import annotations

import ctypes
import json
import subprocess
import sys
import textwrap

import pytest

from rl_mismatch import host_memory

_GLIBC = hasattr(ctypes.CDLL(None), "malloc_trim")


@pytest.mark.skipif(not _GLIBC, reason="needs glibc's malloc_trim (Linux)")
def test_freed_arena_blocks_leave_the_rss():
    # In a fresh interpreter: 64 blocks of 4 MiB from the heap arena (the mmap threshold fixed above
    # them, as glibc's dynamic threshold ends up in a long run), each followed by a small block that
    # stays, so that the freed blocks lie between live ones and no automatic trim of the heap's top
    # can return them. Their pages stay resident after free(); release_free_memory() must hand them
    # back to the kernel.
    script = textwrap.dedent("""
        import ctypes, json, os
        from rl_mismatch import host_memory
        libc = ctypes.CDLL(None)
        libc.malloc.restype = ctypes.c_void_p
        libc.malloc.argtypes = [ctypes.c_size_t]
        libc.free.argtypes = [ctypes.c_void_p]
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        assert libc.mallopt(M_MMAP_THRESHOLD, 64 << 20) and libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)

        def rss():
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

        block = 4 << 20
        big, small = [], []
        for _ in range(64):
            p = libc.malloc(block)
            ctypes.memset(p, 1, block)  # Touched: resident.
            big.append(p)
            small.append(libc.malloc(64))
        held = rss()
        for p in big:
            libc.free(p)
        freed = rss()
        released = host_memory.release_free_memory()
        print(json.dumps({"held": held, "freed": freed, "trimmed": rss(), "released": released}))
    """)
    out = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True).stdout
    m = json.loads(out.splitlines()[-1])
    total = 64 * (4 << 20)
    # The premise: free() alone kept the pages (else this test would show nothing).
    assert m["held"] - m["freed"] < 0.1 * total, m
    assert m["released"] is True
    # Every whole free page goes back: all but the blocks' boundary pages.
    assert m["freed"] - m["trimmed"] > 0.95 * total, m


def test_without_malloc_trim_it_does_nothing(monkeypatch):
    monkeypatch.setattr(host_memory, "_malloc_trim", lambda: None)
    assert host_memory.release_free_memory() is False
