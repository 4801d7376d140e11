"""The scripts' persistent XLA compilation cache: one directory per kind of CPU, on by default.

Every process compiles the sampler and the train step anew: each run of a study, each resumed
part of a long run, the next seed. JAX's persistent compilation cache keeps the compiled programs
on disk, and a later process with the same programs reads them instead of compiling
(docs/profiling.md has the figures). ``experiments/train.py``, ``study.py`` and
``precision_study.py`` call :func:`enable` before their first compilation.

Where: ``$XDG_CACHE_HOME/rl_mismatch/xla/<cpu key>`` (``~/.cache`` without XDG_CACHE_HOME). XLA:CPU
compiles for the instructions of the CPU it runs on, and JAX's cache key does not name the CPU:
a cache shared between hosts with different CPUs (a home directory on a cluster's network file
system) could hand one host a program with instructions it lacks. Hence a directory per CPU
model and instruction set.

It keeps the most recently used 4 GiB of programs (JAX deletes the rest; a bound the user set
wins). A directory the user chose wins too (``JAX_COMPILATION_CACHE_DIR`` or ``jax.config``), and
``RL_MISMATCH_COMPILATION_CACHE=0`` keeps the cache off.
"""

from __future__ import annotations

import hashlib
import os
import platform
from collections.abc import Mapping

from experiments.host import cpu_fields

OPT_OUT = "RL_MISMATCH_COMPILATION_CACHE"  # "0": no cache unless the user set a directory
MAX_BYTES = 4 * 2**30  # beyond it JAX deletes the least recently used programs (unless the user set a bound)


def cpu_key(fields: Mapping[str, str] | None = None) -> str:
    """A directory name for this kind of CPU: its architecture, a readable model, and a hash of the
    model and instruction flags (``/proc/cpuinfo``; elsewhere, what ``platform`` says)."""
    fields = cpu_fields() if fields is None else fields
    model = fields.get("model name") or platform.processor() or "cpu"
    ident = "\n".join([platform.machine(), model, fields.get("cpu family", ""), fields.get("model", ""),
                       " ".join(sorted(fields.get("flags", "").split()))])
    readable = "".join(c if c.isalnum() else "-" for c in model).strip("-")[:40]
    return f"{platform.machine()}-{readable}-{hashlib.sha256(ident.encode()).hexdigest()[:12]}"


def default_dir(environ: Mapping[str, str] = os.environ, fields: Mapping[str, str] | None = None) -> str:
    """``$XDG_CACHE_HOME/rl_mismatch/xla/<cpu_key>``, ``~/.cache/...`` without XDG_CACHE_HOME."""
    base = environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "rl_mismatch", "xla", cpu_key(fields))


def enable(environ: Mapping[str, str] = os.environ) -> str:
    """Turns JAX's persistent compilation cache on at :func:`default_dir`, unless a directory is set
    already or ``RL_MISMATCH_COMPILATION_CACHE=0``. Call it before the first compilation.

    Returns a line for the run's log: the directory in use and why, or why there is none.
    """
    import jax

    chosen = jax.config.jax_compilation_cache_dir  # JAX_COMPILATION_CACHE_DIR lands here too
    if chosen:
        return f"{chosen} (set by the user)"
    if environ.get(OPT_OUT, "1") == "0":
        return f"off ({OPT_OUT}=0)"
    path = default_dir(environ)
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:  # a read-only home: compile as without a cache
        return f"off: cannot create {path} ({e.strerror})"
    jax.config.update("jax_compilation_cache_dir", path)
    if jax.config.jax_compilation_cache_max_size == -1:  # JAX's default: no bound
        jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
    return f"{path} (one per kind of CPU; {OPT_OUT}=0 turns it off)"
