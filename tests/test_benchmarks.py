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
        # 32 rows: the decoding products' floor then times the down projection's weight-on-the-left form.
        ["--batches=2,32", "--dtypes=bfloat16", "--new_tokens=4", "--prompt_len=4", "--lengths=4,8",
         "--length_batch=2", "--repeats=1"],
        [r"\| bfloat16 \| 2 \| \d+ \| \d+ \| [\d.]+x \|", r"\| 8 \| \d+ \|",
         r"\| bfloat16 \| 32 \| [\d.]+ \| [\d.]+ \| [\d.]+ \| [\d.]+ \| [\d.]+x \|"]),
    "train_step.py": (
        ["--dtypes=bf16", "--batch=2", "--group=2", "--seq_len=16", "--steps=1", "--response_lengths=1,3",
         "--pack_multiple=1", "--packed_widths=20"],
        [r"ours: +[\d.]+ tok/s", r"HF: +[\d.]+ tok/s", r"ours/HF = [\d.]+x",
         r"every row in full \(share_prompts=False\): +[\d.]+ tok/s .* each prompt once: [\d.]+x",
         r"FLOPs computed \(each prompt once: 29 tokens through the body, recomputation included\): +[\d.]+ GFLOP/s",
         # The floor at the tokens the step computes; HF's step computes every row, so no share of it.
         r"matrix products alone \(29 tokens through the body;.* XLA +[\d.]+ s = \d+% of our step, "
         r"torch +[\d.]+ s; XLA/torch = [\d.]+x",
         # A 12-token reply (the longest) and one of 1..3 in 12 columns: 15 to 17 of 26 columns packed.
         r"packing each group's responses end to end \(packed_width=1[5-7] of 26 columns\): +[\d.]+ tok/s.*"
         r"packed: [\d.]+x", r"ours packed/HF = [\d.]+x",
         r"packed_width=20 of 26 columns, given\): +[\d.]+ tok/s.*packed: [\d.]+x"]),
    "rl_loop.py": (
        # The trainer settings reach our side's subprocess (its detail line repeats them).
        ["--steps=2", "--max_new_tokens=4", "--prompts=2", "--group=2", "--dtypes=bf16", "--remat=none",
         "--keep_logits"],
        [r"\| ours \| bf16 sampler, fp32 trainer \| [\d.]+ \| [\d.]+ \([\d.]+\) \| [\d.]+ \| - \| [\d.]+ \| \d+ \| [\d.]+x \|",
         r"remat=none, keep_logits=True",
         r"\| TRL \| fp32 \| [\d.]+ \| [\d.]+ \| [\d.]+ \| - \| [\d.]+ \| \d+ \| - \|"]),
    "step_time.py": (  # Shapes and the runtime baseline only; test_step_time_* runs both phases.
        ["--config=experiments/configs/tiny.py", "--skip_main_job", "--skip_cv"],
        [r"\| parameters \(float32 masters\) \| [\d.]+ \|", r"\| runtime baseline \(measured\) \| [\d.]+ \|",
         r"\| sum \| [\d.]+ \| incomplete \|"]),
    "refault.py": (
        ["--gib=0.02", "--pauses=0,0.1", "--repeats=1"],
        [r"kernel free page reporting \(page_reporting module\): (yes|no)", r"first touch: +[\d.]+ s",
         r"after a +0\.0 s pause: +[\d.]+ s \(system +[\d.]+ s\)", r"after a +0\.1 s pause: +[\d.]+ s"]),
    "remat.py": (
        ["--dtypes=bf16", "--repeats=1", "--batch=1", "--seq_len=16"],
        [r"layer +[\d.]+ s best.*1\.00x layer +system +[\d.]+ s", r"projections +[\d.]+ s best",
         r"none +[\d.]+ s best"]),
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


@pytest.mark.slow
def test_step_time_reports_the_parts_and_the_cv_of_the_run_metrics(tmp_path):
    """Both phases on the tiny config: the memory parts and summary are printed and written, and the
    step-time CVs equal a NumPy computation from the CV run's own metrics.jsonl."""
    import numpy as np

    from rl_mismatch import sampler

    runs, out = tmp_path / "runs", tmp_path / "step_time.json"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    proc = subprocess.run([sys.executable, "benchmarks/step_time.py", "--config=experiments/configs/tiny.py",
                           "--steps=5", f"--workdir={runs}", f"--json={out}"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "machine: " in proc.stdout
    results = json.loads(out.read_text())

    # The CV run's steady steps (after the first 2), a save's synchronous part subtracted.
    rows = [json.loads(line) for line in (runs / "cv" / "metrics.jsonl").read_text().splitlines()]
    steady = [r for r in rows if "time/step_s" in r and r["step"] >= 2]
    assert [r["step"] for r in steady] == [2, 3, 4]
    net = np.array([r["time/step_s"] - r["time/checkpoint_s"] for r in steady])
    raw = np.array([r["time/step_s"] for r in steady])
    sizes = np.array(sampler.cache_sizes(48, sampler.SamplingConfig.cache_segment))
    keys = [(r["rollout/prompt_width"], int(np.searchsorted(sizes, r["rollout/response_length_max"])) + 1)
            for r in steady]
    largest = max(set(keys), key=keys.count)
    in_largest = np.array([k == largest for k in keys])
    cv = lambda x: np.std(x, ddof=1) / np.mean(x)
    summary = results["summary"]
    assert summary["cv_largest_bucket"] == pytest.approx(cv(net[in_largest]), rel=1e-9)
    assert summary["cv_largest_bucket_steps"] == in_largest.sum()
    assert summary["cv_all_steady"] == pytest.approx(cv(net), rel=1e-9)
    assert results["cv_run"]["cv"]["cv_all_with_saves"] == pytest.approx(cv(raw), rel=1e-9)
    assert [(b["prompt_width"], b["cache_sizes_reached"]) for b in results["cv_run"]["cv"]["buckets"]] == sorted(
        set(keys))
    assert (f"| step-time CV, largest bucket ({in_largest.sum()} steps) | {cv(net[in_largest]):.1%} | <= 15% |"
            in proc.stdout)
    assert f"| step-time CV, all 3 steady steps | {cv(net):.1%} |" in proc.stdout
    for key in ("train_s", "cpu_system_s"):  # a part of the step, and the kernel's CPU seconds in it
        x = np.array([r[f"time/{key}"] for r in steady])
        assert results["cv_run"]["cv"]["parts"][key]["median_s"] == pytest.approx(np.median(x), rel=1e-9)
        assert f"| time/{key} | {np.median(x):.3f} |" in proc.stdout

    # The memory parts, their sum against the main job's peak RSS, and the main job's wall time.
    memory = results["memory"]
    names = [p["part"] for p in memory["parts"]]
    assert names == ["parameters (float32 masters)", "optimizer state (AdamW mu, nu)", "gradients (XLA buffer)",
                     "sampler copy (bfloat16)", "KV cache (bfloat16)", "runtime baseline (measured)"]
    assert all(p["bytes"] > 0 for p in memory["parts"]) and memory["complete"]
    assert memory["sum"] == sum(p["bytes"] for p in memory["parts"])
    n = results["shapes"]["n_params"]
    assert [p["bytes"] for p in memory["parts"][:4]] == [4 * n, memory["parts"][1]["bytes"], 4 * n, 2 * n]
    assert 8 * n <= memory["parts"][1]["bytes"] < 8 * n + 1024  # AdamW's mu and nu, and a few scalars
    assert memory["peak_over_sum"] == pytest.approx(summary["main_job_peak_rss"] / memory["sum"])
    main_rows = [json.loads(line) for line in (runs / "main_job" / "metrics.jsonl").read_text().splitlines()]
    assert summary["main_job_wall_s"] > sum(r["time/step_s"] for r in main_rows if "time/step_s" in r)
    assert summary["main_job_peak_rss"] > results["shapes"]["baseline"]["rss"]
    for part in names:
        assert re.search(rf"\| {re.escape(part)} \| [\d.]+ \|", proc.stdout), part
    assert re.search(r"\| peak / sum \| [\d.]+x \| target <= 2x: (met|not met) \|", proc.stdout)
    assert re.search(r"\| main job wall time \| [\d.]+ s \| <= 180 s \| (met|not met) \|", proc.stdout)
    assert re.search(r"phase A: live JAX arrays at their peak [\d.]+ MiB", proc.stdout)


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
