"""The benchmark scripts run end to end at tiny sizes, peers included, and print their results.

Their figures are not checked here (timing belongs in benchmarks/README.md, not in tests); what
is checked is that a change of the library, or of torch/transformers, has not broken a script,
and that each still prints the lines its README section quotes.
"""

import os
import pathlib
import re
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent

CASES = {  # script: (tiny flags, regexes its output must match)
    "load.py": (
        ["--repeats=1"],
        [r"cached load \(min of 1\): +\d", r"speed-up of the cached load: +\d"]),
    "mismatch.py": (
        ["--dtypes=bfloat16", "--batch=1", "--seq_len=16", "--prompt_len=4", "--repeats=1"],
        [r"\[bfloat16\] rescore\+metrics / forward = \d", r"unchunked\| log-prob = [\d.e+-]+"]),
    "sampler.py": (
        ["--batches=2", "--dtypes=bfloat16", "--new_tokens=4", "--prompt_len=4", "--lengths=4,8",
         "--length_batch=2", "--repeats=1"],
        [r"\| bfloat16 \| 2 \| \d+ \| \d+ \| [\d.]+x \|", r"\| 8 \| \d+ \|"]),
    "train_step.py": (
        ["--dtypes=bf16", "--batch=1", "--seq_len=16", "--steps=1"],
        [r"ours: +[\d.]+ tok/s", r"HF: +[\d.]+ tok/s", r"ours/HF = [\d.]+x"]),
    "rl_loop.py": (
        ["--steps=2", "--max_new_tokens=4", "--prompts=2", "--group=2", "--dtypes=bf16"],
        [r"\| ours \| bf16 sampler, fp32 trainer \| [\d.]+ \| [\d.]+ \([\d.]+\) \| [\d.]+ \| - \| [\d.]+ \| \d+ \| [\d.]+x \|",
         r"\| TRL \| fp32 \| [\d.]+ \| [\d.]+ \| [\d.]+ \| - \| [\d.]+ \| \d+ \| - \|"]),
    "remat.py": (
        ["--dtypes=bf16", "--repeats=1", "--batch=1", "--seq_len=16"],
        [r"layer +[\d.]+ s best.*1\.00x layer", r"projections +[\d.]+ s best", r"none +[\d.]+ s best"]),
}


def test_every_benchmark_is_covered():
    assert sorted(p.name for p in (REPO / "benchmarks").glob("[!_]*.py")) == sorted(CASES)


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(CASES))
def test_benchmark_runs(script):
    flags, expected = CASES[script]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")  # not the tests' 8 devices
    proc = subprocess.run([sys.executable, f"benchmarks/{script}", *flags], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "machine: " in proc.stdout
    for pattern in expected:
        assert re.search(pattern, proc.stdout), f"{pattern!r} not in:\n{proc.stdout}"
