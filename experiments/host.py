"""The CPU a result was measured on, as one line: the notebooks print it with their outputs and the
benchmark scripts with their figures (``benchmarks/_common.py`` imports :func:`cpu_line`).
"""

from __future__ import annotations

import os
import platform

# /proc/cpuinfo flags worth naming: AVX-512, and the instructions that make bf16 fast on a CPU.
_FLAG_LABELS = (("avx512f", "AVX512-F"), ("avx512_bf16", "AVX512-BF16"), ("amx_bf16", "AMX-BF16"))


def cpu_fields(path: str = "/proc/cpuinfo") -> dict[str, str]:
    """The first processor's block of ``/proc/cpuinfo`` as ``{key: value}``; empty where the file
    cannot be read (not Linux)."""
    fields: dict[str, str] = {}
    try:
        with open(path) as f:
            for line in f:  # the first processor's block is enough
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
                if key.strip() == "flags":
                    break
    except OSError:
        pass
    return fields


def cpu_line(fields: dict[str, str] | None = None) -> str:
    """One line naming the CPU: model (with family and model number, since a VM's model name can
    be as vague as "AMD EPYC"), the cores this process may use, and whether it has AVX-512 and the
    bf16 instructions (AVX512-BF16, AMX-BF16), which decide how fast bf16 runs.

    ``fields``: as :func:`cpu_fields` returns (default: read them now).
    """
    fields = cpu_fields() if fields is None else fields
    name = platform.processor() or platform.machine()  # not Linux: all there is
    if "model name" in fields:
        name = f"{fields['model name']} (family {fields.get('cpu family', '?')}, model {fields.get('model', '?')})"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    flags = set(fields.get("flags", "").split())
    present = [label for flag, label in _FLAG_LABELS if flag in flags]
    if "flags" not in fields:
        extensions = "bf16 support unknown"
    elif "avx512_bf16" not in flags:
        extensions = ", ".join(present + ["no AVX512-BF16 (bf16 emulated)"])
    else:
        extensions = ", ".join(present)
    return f"{name}, {cores} cores, {extensions}"
