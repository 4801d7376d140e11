"""Tests for rl_mismatch.host_memory: freed heap pages really leave the process's RSS."""

from __future__ import annotations

import ctypes
import json
import os
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


# --------------------------------------------------------------------------------------------
# Huge pages for malloc's mappings

_LINUX = host_memory.Host("linux", (2, 36), "madvise")


def test_huge_page_environment_adds_the_tunable_where_it_changes_something():
    env = host_memory.huge_page_environment({"PATH": "/bin"}, _LINUX)
    assert env == {"PATH": "/bin", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
    # Other tunables are kept, the new one appended.
    env = host_memory.huge_page_environment({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, _LINUX)
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"


@pytest.mark.parametrize("environ,host", [
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}, {}),  # already given: the restarted process
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, {}),  # the user chose otherwise
    ({"RL_MISMATCH_HUGE_PAGES": "0"}, {}),                 # opted out
    ({}, {"platform": "darwin", "glibc": None}),
    ({}, {"glibc": None}),                                # musl
    ({}, {"glibc": (2, 34)}),                             # no hugetlb tunable before 2.35
    ({}, {"thp_mode": "always"}),                         # the kernel already backs every mapping
    ({}, {"thp_mode": "never"}),
    ({}, {"thp_mode": None}),                             # no transparent huge pages at all
])
def test_huge_page_environment_is_none_where_a_restart_changes_nothing(environ, host):
    assert host_memory.huge_page_environment(environ, _LINUX._replace(**host)) is None


_RESTARTED = textwrap.dedent("""
    import ctypes, json, os, sys
    from rl_mismatch import host_memory
    print("started", flush=True)
    host_memory.restart_with_huge_pages()
    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    block = libc.malloc(256 << 20)  # one 256 MiB mapping, as XLA:CPU's temporaries get
    ctypes.memset(block, 1, 256 << 20)  # touched: resident
    with open("/proc/self/smaps_rollup") as f:
        huge = [int(line.split()[1]) for line in f if line.startswith("AnonHugePages:")][0] << 10
    print(json.dumps({"tunables": os.environ.get("GLIBC_TUNABLES"), "argv": sys.argv[1:], "huge": huge}))
""")


@pytest.mark.skipif(host_memory.huge_page_environment({}) is None,
                    reason="a restart changes nothing on this host (see huge_page_environment)")
def test_a_restarted_script_runs_again_with_huge_page_mappings():
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", host_memory.OPT_OUT)}
    run = lambda extra: subprocess.run([sys.executable, "-c", _RESTARTED, "--flag=1"], check=True,
                                       capture_output=True, text=True, env={**env, **extra}).stdout.splitlines()
    out = run({})
    # The script ran twice from its start (a new process image), with the same arguments.
    assert out[:2] == ["started", "started"], out
    result = json.loads(out[-1])
    assert result["tunables"] == "glibc.malloc.hugetlb=1" and result["argv"] == ["--flag=1"]
    assert result["huge"] >= 128 << 20  # most of the block in 2 MiB pages
    # Opted out: one run, 4 KiB pages (NumPy would ask for huge pages itself: malloc, as XLA does).
    out = run({host_memory.OPT_OUT: "0"})
    assert out[0] == "started" and out[1] != "started"
    assert json.loads(out[-1])["huge"] < 16 << 20


def test_a_failed_restart_goes_on_as_it_started(monkeypatch):
    monkeypatch.setattr(host_memory, "huge_page_environment", lambda environ: {"GLIBC_TUNABLES": "x"})
    calls = []

    def execve(*args):
        calls.append(args)
        raise OSError("exec format error")

    monkeypatch.setattr(host_memory.os, "execve", execve)
    host_memory.restart_with_huge_pages()  # returns instead of raising
    assert len(calls) == 1 and calls[0][2] == {"GLIBC_TUNABLES": "x"}
