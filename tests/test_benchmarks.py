"""The benchmark scripts run end to end at tiny sizes, peers included, and print their results.

Their figures are not checked here (timing belongs in benchmarks/README.md, not in tests); what
is checked is that a change of the library, or of torch/transformers, has not broken a script,
and that each still prints the lines its README section quotes.
"""

import json
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


DEVICE_CHECK = REPO / "benchmarks" / "device_check.sh"


def test_device_check_script_parses():
    proc = subprocess.run(["bash", "-n", str(DEVICE_CHECK)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_device_check_dry_run_lists_every_part_and_runs_nothing(tmp_path):
    """On a CPU, from another directory: every command is printed, the empty table too, exit 0."""
    out = tmp_path / "out"
    proc = subprocess.run(["bash", str(DEVICE_CHECK), "--dry-run", f"--out={out}"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for command in ("-m pytest -m 'not slow'", "benchmarks/sampler.py --batches=64 --dtypes=bfloat16,float32",
                    "benchmarks/train_step.py --dtypes=bf16,fp32", "benchmarks/rl_loop.py",
                    f"-m experiments.precision_study --out={out}/precision_study", "--torch_device=cuda"):
        assert command in proc.stdout, f"{command!r} not in:\n{proc.stdout}"
    assert "| part | status | s | ours | peer | ours / peer | GPU target |" in proc.stdout
    assert proc.stdout.count("| NOT RUN |") == 8
    assert sorted(p.name for p in out.iterdir()) == ["status.tsv", "summary.md"]  # nothing ran


def test_device_check_summary_reads_each_part_output(tmp_path):
    """--summary rebuilds the table from the parts' outputs, in the formats the scripts print."""
    (tmp_path / "status.tsv").write_text("tests\tFAIL (exit 1)\t50\nsampler\tPASS\t60\ntrain_step\tPASS\t40\n"
                                         "precision_study\tPASS\t70\nrl_loop\tTIMEOUT\t170\n")
    (tmp_path / "machine.txt").write_text("0.10.2 gpu [CudaDevice(id=0)]\ntorch_device=cuda\n")
    (tmp_path / "tests.out").write_text("..F.  [100%]\nFAILED tests/test_x.py::test_y\n1 failed, 3 passed in 9.1s\n")
    (tmp_path / "sampler.out").write_text("| bfloat16 | 64 | 9000 | 2500 | 3.60x | 40.0% |\n"
                                          "| float32 | 64 | 5000 | 2500 | 2.00x | 30.0% |\n")
    (tmp_path / "train_step.out").write_text(
        "[bf16] XLA matmul peak 900.0 GFLOP/s\n  ours:  5000.0 tok/s  (step 0.41 s)\n  HF:    2500.0 tok/s  (step)\n"
        "  ours/HF = 2.00x (wall), 1.90x (CPU time)\n[fp32] XLA matmul peak 400.0 GFLOP/s\n"
        "  ours:  3000.0 tok/s  (step)\n  HF:    2000.0 tok/s  (step)\n  ours/HF = 1.50x (wall), 1.40x (CPU time)\n")
    (tmp_path / "rl_loop.out").write_text(
        "| ours | fp32 sampler, fp32 trainer | 2.00 | 30.0 (20.0) | 300.0 | 2.0% | 3.00 | 1800 | 4.00x |\n"
        "| TRL | fp32 | 8.00 | 9.0 | 80.0 | 5.0% | 4.00 | 450 | - |\n")
    (tmp_path / "precision_study").mkdir()
    (tmp_path / "precision_study" / "results.json").write_text(json.dumps({"summary": {
        "bf16_sampler_fp32_trainer/k3": 6.4e-4, "fp16_sampler_fp32_trainer/k3": 1.3e-5,
        "ratio_bf16_over_fp16/trainer_fp32/k3": 49.2}}))
    proc = subprocess.run(["bash", str(DEVICE_CHECK), "--summary", f"--out={tmp_path}"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr  # a part failed
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert "| FAIL (exit 1) | 50 | 1 failed, 3 passed |" in rows[1]
    assert "| PASS | 60 | 9000 | 2500 | 3.60x | >= 3x HF |" in rows[2] and "bf16" in rows[2]
    assert "| PASS | 40 | 5000.0 | 2500.0 | 2.00x | >= 1.5x HF |" in rows[4]
    assert "| PASS | 40 | 3000.0 | 2000.0 | 1.50x |" in rows[5]
    assert "| PASS | 70 | 0.00064 | 1.3e-05 | 49.2x |" in rows[6]
    assert "| TIMEOUT | 170 | 2.00 | 8.00 | 4.00x |" in rows[7] and "| TIMEOUT | 170 | - | 8.00 | - |" in rows[8]
    assert "parts not passed: tests, rl_loop" in proc.stdout
    assert (tmp_path / "summary.md").read_text() == proc.stdout.split("\n", 1)[1]
