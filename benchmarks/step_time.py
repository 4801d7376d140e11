r"""The main job's step-time steadiness, wall time and peak memory, part by part.

    python benchmarks/step_time.py [--steps=32] [--warmup=2] [--config=experiments/configs/default.py]
                                   [--skip_main_job] [--skip_cv] [--nolive_bytes] [--compilation_cache]
                                   [--workdir=DIR] [--json=PATH]

``--config`` names another job's config file (``experiments/configs/tiny.py``: a check in a minute,
as tests/test_benchmarks.py runs it); with both phases skipped only the shapes, the parts known
without a run and the baseline are printed.

The main job is ``python -m experiments.train --config=experiments/configs/default.py
--workdir=DIR`` (SmolLM2-135M-Instruct, bf16 sampler, fp32 trainer, 16 steps of 4 prompts x 4
samples, <= 48 new tokens, a checkpoint every 4 steps, TensorBoard on, eval off). Every process
below is a subprocess of this script, started from the repository root with this script's
environment, one after the other, each on a fresh run directory (``--workdir``/<phase>; by
default a temporary directory deleted at the end). Nothing in the library is changed or patched.

* Runtime and shapes (always): a subprocess imports what ``experiments/train.py`` imports (jax,
  flax, absl, ml_collections, ``rl_mismatch.experiment`` and everything it pulls in) and starts
  the CPU backend (``jax.devices()``), loads nothing, and reports its resident memory: the
  runtime baseline. Then it loads the config's model as the job does
  (``experiment.load_model``) and reports its shapes: the parameter count (from the leaves), the
  layers, KV heads and head width, and the optimizer state's bytes (``jax.eval_shape`` of
  ``optim.optimizer().init``). Running it first also leaves the model cache
  (``~/.cache/rl_mismatch``) warm, so phase A never times the one-off GGUF dequantization.
* Phase A, the main job (``--skip_main_job`` to skip): ``--config=<config>`` exactly as the
  README runs it, the config's own steps, compiling from scratch as on a fresh machine: the
  phases run with the scripts' compilation cache off (``RL_MISMATCH_COMPILATION_CACHE=0``,
  ``experiments/compile_cache.py``) unless ``--compilation_cache``. Timed wall-clock from the
  process's start to its exit (imports, dataset build, model load, compilation, every step, the
  last checkpoint and the summary); its peak RSS is that process's own (``os.wait4``'s
  ``ru_maxrss``). Also reported
  from its ``metrics.jsonl``: the sum of ``time/step_s``, the first step and its
  ``time/compile_s``, and the time outside the steps (wall - sum).
* Phase B, the step-time CV (``--skip_cv`` to skip): ``--config=<config>:<--steps>
  --config.eval.every=0`` (the default config's eval is already off: the override only makes sure
  no step evaluates), so ``--steps - --warmup`` steady steps remain after the first ``--warmup``
  (step 0 compiles the sampler and the train step; step 1 is left out as well, as the issue's
  "30 steady steps of 32" counts them). Each
  step's time is ``time/step_s - time/checkpoint_s``: a step that saves a checkpoint (every 4th:
  ``checkpoint.every``) is timed without the save's synchronous part (the array copy to host
  memory and the metrics file's fsync) and, on a CPU backend, without the wait before the update
  for the background thread writing the files (it writes while the step samples). The CV with the
  saves left in is shown beside it.
  A step's response bucket is ``(rollout/prompt_width, k)``, k = how many of the sampler's KV
  cache sizes (``sampler.cache_sizes(max_new_tokens, SamplingConfig.cache_segment)``: the cache
  starts at prompt + ``cache_segment`` slots and doubles up to prompt + budget) its decoding
  loop ran in, from its longest response (``rollout/response_length_max``, EOS included):
  k = 1 + #{sizes s before the last: s < longest}. Steps of different buckets run different
  compiled loops over caches of different sizes, and their update runs on that many response
  columns (``rollout/response_width``), so the CV is taken within a bucket. With the
  main job's 48-token budget and the default 64-token ``cache_segment`` there is one cache size,
  and all prompts are padded to one width, so every step is in one bucket.
  CV = sample standard deviation (ddof 1) / mean. Reported: per bucket its steps, mean and CV;
  the CV of the bucket with the most steps (the headline; the first in (width, k) order on a
  tie); the CV over all steady steps; per part of the step (``time/sample_s``, ``score_s``,
  ``train_s``, ``write_s``, ``checkpoint_s``) and of the process's CPU seconds in it
  (``time/cpu_user_s``, ``cpu_system_s``: a spread in system time is the host's page faults)
  the median and CV over the steady steps; and any compile time after the warm-up steps (a
  recompilation inside the steady steps).

Memory, part by part (MiB = 2^20 bytes), against the peak RSS of phase A (of phase B if A is
skipped). Parameter count n from the loaded model:

* parameters: n x 4 B (the trainer's float32 master weights);
* optimizer state: the bytes of ``optimizer.init(params)`` (AdamW's float32 mu and nu, 2 x n x
  4 B, plus the LR transforms' scalars);
* gradients (the train step's XLA buffer): one float32 parameter-sized buffer, n x 4 B;
* the sampler's copy: n x the sampler dtype's bytes (bfloat16: 2; with a float32 sampler the
  cast is a no-op and the copy shares the masters' buffers);
* KV cache: rows x (prompt width + budget) x layers x 2 (K, V) x KV heads x head width x the
  sampler dtype's bytes, at the largest cache size (prompt width: the widest the run logged;
  rows: prompts x samples per step). When the cache grows between sizes the old and new one
  exist together for a moment;
* runtime baseline: measured, as above.

Printed: sum, peak RSS, peak / sum (target <= 2x). Not in the sum, printed below it: the async
checkpoint's host copy (parameters + optimizer state, while a save is in flight) and the
loader's float32 host copy of the weights (while the model is built). With ``--live_bytes``
(default) each phase's process runs ``experiments.train`` through ``runpy`` under a small
wrapper (``python -c``; same module, same flags; it imports jax first) whose thread samples the
RSS every 0.25 s and, once the job has started the backend, the sum of ``jax.live_arrays()``'s
``nbytes``, and whose ``jax.monitoring`` listener records every XLA compilation. Reported per
phase: the live JAX arrays at their peak with the RSS at that moment (the arrays the job holds,
not the temporaries inside a running program such as the KV cache inside the sampler's loop),
and the RSS when the first of the two longest compilations (step 0's sampler and train step)
began and when the later ended: what the job holds before its programs exist, and what
compiling and running step 0 add. ``--nolive_bytes`` runs the plain ``python -m
experiments.train``.

At the end one summary table: the headline CV (target <= 15%), the CV over all steady steps, the
main job's wall time (target <= 3 minutes), its peak RSS and peak / sum of parts (target <= 2x).
``--json=PATH`` writes every figure (the per-step rows included). The targets are the main job's
(benchmark issue); on another ``--config`` they are printed for reference only.
"""

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from absl import app, flags

from _common import machine, restart_with_huge_pages
from experiments import compile_cache  # importable once _common has put the checkout on sys.path

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_MAIN_CONFIG = "experiments/configs/default.py"

_CONFIG = flags.DEFINE_string("config", _MAIN_CONFIG, "The job's config file (experiments/configs/<name>.py, no :arg).")
_STEPS = flags.DEFINE_integer("steps", 32, "Phase B: steps of the CV run (--config=<config>:<steps>).")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Phase B: the first steps, left out of the steady state.")
_SKIP_MAIN_JOB = flags.DEFINE_bool("skip_main_job", False, "Skip phase A (the main job: wall time, peak RSS).")
_SKIP_CV = flags.DEFINE_bool("skip_cv", False, "Skip phase B (the step-time CV run).")
_CACHE = flags.DEFINE_bool("compilation_cache", False, "Let the phases use the scripts' default compilation cache "
                           "(a second run then reads its programs from disk); off: compiled as on a fresh machine.")
_LIVE_BYTES = flags.DEFINE_bool(
    "live_bytes", True, "Run each phase under a wrapper that samples the live JAX arrays' bytes (else the plain "
    "python -m experiments.train).")
_WORKDIR = flags.DEFINE_string("workdir", "", "Keep the phases' run directories under DIR/main_job and DIR/cv "
                               "(they must not exist yet); default: a temporary directory, deleted.")
_JSON = flags.DEFINE_string("json", "", "Also write every figure to this JSON file.")

_CV_TARGET, _WALL_TARGET_S, _RSS_TARGET = 0.15, 180.0, 2.0
_MIB = 2**20
_PARTS = ("sample_s", "score_s", "train_s", "write_s", "checkpoint_s")
_CPU = ("cpu_user_s", "cpu_system_s")  # the process's CPU seconds in the step: the kernel's share is page faults

# The runtime baseline and the job's shapes, in a process of their own. argv[1]: the config file.
_SHAPES = r"""
import json, sys

def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))

import experiments.train  # noqa: F401  (the main job's imports)
import jax
import jax.numpy as jnp
jax.devices()
baseline = {"rss": status("VmRSS"), "hwm": status("VmHWM")}

import importlib.util
from flax import nnx
from rl_mismatch import experiment, sampler
from rl_mismatch.experiment_config import ExperimentConfig
from rl_mismatch.precision import parse_dtype

spec = importlib.util.spec_from_file_location("_job_config", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
cfg = ExperimentConfig.from_dict(module.get_config(None).to_dict())
model, _ = experiment.load_model(cfg.model, dtype=parse_dtype(cfg.trainer.dtype), key=jax.random.key(0))
params = nnx.state(model, nnx.Param)
leaves = jax.tree.leaves(params)
opt = jax.eval_shape(cfg.optim.optimizer().init, params)
N, segment = cfg.sampler.max_new_tokens, sampler.SamplingConfig.cache_segment
print(json.dumps(dict(
    baseline=baseline, jax=jax.__version__, backend=jax.default_backend(), source=cfg.model.source,
    steps=cfg.steps, rows=cfg.rollout.prompts_per_step * cfg.rollout.group_size,
    prompts=cfg.rollout.prompts_per_step, group=cfg.rollout.group_size, max_new_tokens=N,
    sampler_dtype=str(parse_dtype(cfg.sampler.dtype)), trainer_dtype=str(parse_dtype(cfg.trainer.dtype)),
    sampler_itemsize=parse_dtype(cfg.sampler.dtype).itemsize, checkpoint_every=cfg.checkpoint.every,
    eval_every=cfg.eval.every, cache_segment=segment, cache_sizes=list(sampler.cache_sizes(N, segment)),
    n_params=sum(x.size for x in leaves), param_bytes=sum(x.nbytes for x in leaves),
    param_dtypes=sorted({str(x.dtype) for x in leaves}),
    opt_bytes=sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(opt)),
    n_layers=model.config.n_layers, n_kv_heads=model.config.n_kv_heads, head_dim=model.config.head_dim)))
"""

# Runs experiments.train in this process (runpy: the module as ``python -m`` runs it, same flags)
# while a thread samples the RSS and, once the job has started the backend, the live JAX arrays;
# a jax.monitoring listener records every XLA compilation. argv[1]: where to write the record;
# the rest: the job's flags.
_LIVE_WRAPPER = r"""
import json, os, runpy, sys, threading, time

import jax
from jax._src import xla_bridge

out_path, sys.argv = sys.argv[1], [sys.argv[0], *sys.argv[2:]]
record = {"live_bytes": 0, "live_arrays": 0, "rss_at_live_peak": 0, "at_s": 0.0, "samples": 0,
          "rss": [], "compiles": []}
stop, start = threading.Event(), time.perf_counter()

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

def on_event(name, duration, *args, **kwargs):
    if name == "/jax/core/compile/backend_compile_duration":
        record["compiles"].append([round(time.perf_counter() - start, 3), round(duration, 3)])

def sample():
    while not stop.wait(0.25):
        now = rss()
        record["rss"].append([round(time.perf_counter() - start, 2), now])
        try:  # Never start the backend from here: only once the job has.
            if not xla_bridge.backends_are_initialized():
                continue
            arrays = jax.live_arrays()
            total, count = sum(a.nbytes for a in arrays), len(arrays)
            # Not held over the wait: the list would keep every array it names alive for up to
            # 0.25 s after the job lets it go, and so raise the job's RSS.
            del arrays
        except Exception:
            continue
        record["samples"] += 1
        if total > record["live_bytes"]:
            record.update(live_bytes=total, live_arrays=count, rss_at_live_peak=now,
                          at_s=time.perf_counter() - start)

jax.monitoring.register_event_duration_secs_listener(on_event)
thread = threading.Thread(target=sample, daemon=True)
thread.start()
try:
    runpy.run_module("experiments.train", run_name="__main__", alter_sys=True)
finally:
    stop.set()
    thread.join()
    with open(out_path, "w") as f:
        json.dump(record, f)
"""


def _mib(n: float) -> float:
    return n / _MIB


def _read_rows(workdir: str) -> list[dict]:
    """The step rows (those with ``time/step_s``) of a run's ``metrics.jsonl``, by step."""
    from rl_mismatch.metric_writing import read_metrics

    return sorted((r for r in read_metrics(workdir) if "time/step_s" in r), key=lambda r: r["step"])


def _run_child(argv: list[str]) -> tuple[float, int, int]:
    """Runs ``argv`` from the repository root, its output to our stderr (stdout carries the
    results); returns (wall s from start to exit, its own peak RSS in bytes, exit code)."""
    start = time.perf_counter()
    env = dict(os.environ)
    if not _CACHE.value:  # compiled from scratch, as on a fresh machine
        env[compile_cache.OPT_OUT] = "0"
    proc = subprocess.Popen(argv, cwd=_ROOT, stdout=sys.stderr, env=env)
    try:
        _, status, usage = os.wait4(proc.pid, 0)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    return wall, usage.ru_maxrss * 1024, proc.returncode  # Linux: ru_maxrss in KiB


def _shapes(config: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", _SHAPES, config], cwd=_ROOT, capture_output=True, text=True)
    if proc.returncode:
        sys.stderr.write(proc.stderr)
        raise RuntimeError(f"The shapes subprocess failed (exit {proc.returncode}).")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _run_phase(name: str, job_flags: list[str], workdir: str) -> dict:
    """One run of experiments.train on a fresh ``workdir``: wall time, peak RSS, metrics rows."""
    if os.path.exists(workdir):
        raise app.UsageError(f"{workdir} exists: each phase needs a fresh run directory.")
    job_flags = [*job_flags, f"--workdir={workdir}"]
    live = None
    with tempfile.NamedTemporaryFile(suffix=".json", prefix="step_time_live_") as f:
        if _LIVE_BYTES.value:
            argv = [sys.executable, "-c", _LIVE_WRAPPER, f.name, *job_flags]
        else:
            argv = [sys.executable, "-m", "experiments.train", *job_flags]
        shown = " ".join(["python -m experiments.train", *job_flags])
        print(f"phase {name}: {shown}" + (" (under the live-array wrapper)" if _LIVE_BYTES.value else ""),
              file=sys.stderr, flush=True)
        wall, peak_rss, code = _run_child(argv)
        if code:
            raise RuntimeError(f"phase {name} ({shown}) failed with exit code {code}.")
        if _LIVE_BYTES.value:
            with open(f.name) as results:
                live = json.load(results)
    return dict(command=shown, wall_s=wall, peak_rss=peak_rss, live=live, rows=_read_rows(workdir))


def _compile_window(live: dict) -> dict | None:
    """The RSS around the job's two longest XLA compilations (step 0's: the sampler's and the
    train step's programs) from the wrapper's samples: before the first began, after the last ended."""
    big = sorted(sorted(live["compiles"], key=lambda c: -c[1])[:2])
    series = live["rss"]
    if not big or not series:
        return None
    start, end = min(t - d for t, d in big), big[-1][0]
    before = [rss for t, rss in series if t <= start]
    after = [rss for t, rss in series if t >= end]
    peak_s, peak = max(series, key=lambda x: x[1])
    return dict(start_s=start, end_s=end, compile_s=sum(c[1] for c in live["compiles"]),
                rss_before=before[-1] if before else series[0][1], rss_after=after[0] if after else series[-1][1],
                sampled_peak=peak, sampled_peak_s=peak_s)


def bucket_of(row: dict, cache_sizes: list[int]) -> tuple:
    """(prompt width, KV-cache sizes the decoding loop ran in) of one step's metrics row."""
    longest = row.get("rollout/response_length_max")
    k = None if longest is None else 1 + sum(s < longest for s in cache_sizes[:-1])
    return int(row["rollout/prompt_width"]), k


def _cv(xs: list[float]):
    return statistics.stdev(xs) / statistics.mean(xs) if len(xs) >= 2 else None


def step_cv(rows: list[dict], warmup: int, cache_sizes: list[int], checkpoint_every: int) -> dict:
    """The steady steps' (step >= ``warmup``) CVs, per response bucket and over all of them.

    A step's time is ``time/step_s - time/checkpoint_s``; the row of step s > 0 with
    s % ``checkpoint_every`` == 0 holds a save (of the state after step s - 1)."""
    steady = [r for r in rows if r["step"] >= warmup]
    net = [r["time/step_s"] - r.get("time/checkpoint_s", 0.0) for r in steady]
    raw = [r["time/step_s"] for r in steady]
    groups: dict[tuple, list[int]] = {}
    for i, r in enumerate(steady):
        groups.setdefault(bucket_of(r, cache_sizes), []).append(i)
    buckets = []
    for key in sorted(groups, key=lambda k: (k[0], -1 if k[1] is None else k[1])):
        idx = groups[key]
        buckets.append(dict(prompt_width=key[0], cache_sizes_reached=key[1], steps=[steady[i]["step"] for i in idx],
                            mean_s=statistics.mean(net[i] for i in idx), cv=_cv([net[i] for i in idx]),
                            cv_with_saves=_cv([raw[i] for i in idx])))
    largest = max(buckets, key=lambda b: len(b["steps"])) if buckets else None
    parts = {p: dict(median_s=statistics.median(r.get(f"time/{p}", 0.0) for r in steady),
                     cv=_cv([r.get(f"time/{p}", 0.0) for r in steady])) for p in _PARTS + _CPU} if steady else {}
    return dict(warmup=warmup, steady_steps=len(steady), step_s=net, step_s_with_saves=raw, buckets=buckets,
                headline=largest, cv_all=_cv(net), cv_all_with_saves=_cv(raw), parts=parts,
                saves=[r["step"] for r in steady if r["step"] and r["step"] % checkpoint_every == 0],
                recompile_s=sum(r.get("time/compile_s", 0.0) for r in steady),
                recompile_steps=[r["step"] for r in steady if r.get("time/compile_s", 0.0) > 0.05],
                has_response_length_max=all("rollout/response_length_max" in r for r in steady))


def memory_parts(shapes: dict, prompt_width: int | None) -> list[dict]:
    """The parts of the job's memory, bytes, with how each is counted."""
    n, item = shapes["n_params"], shapes["sampler_itemsize"]
    dtypes = shapes["param_dtypes"]
    parts = [
        dict(part="parameters (float32 masters)", bytes=shapes["param_bytes"],
             how=f"{n:,} x 4 B" if dtypes == ["float32"] else f"{n:,} parameters in {', '.join(dtypes)}"),
        dict(part="optimizer state (AdamW mu, nu)", bytes=shapes["opt_bytes"],
             how=f"optimizer.init: 2 x {n:,} x 4 B + scalars"),
        dict(part="gradients (XLA buffer)", bytes=n * 4, how=f"one float32 parameter-sized buffer, {n:,} x 4 B"),
        dict(part=f"sampler copy ({shapes['sampler_dtype']})", bytes=n * item, how=f"{n:,} x {item} B"),
    ]
    if prompt_width is None:
        parts.append(dict(part="KV cache", bytes=None, how="n/a: no run logged a prompt width"))
    else:
        length = prompt_width + shapes["cache_sizes"][-1]
        kv = shapes["rows"] * length * shapes["n_layers"] * 2 * shapes["n_kv_heads"] * shapes["head_dim"] * item
        parts.append(dict(part=f"KV cache ({shapes['sampler_dtype']})", bytes=kv,
                          how=f"{shapes['rows']} rows x ({prompt_width} + {shapes['cache_sizes'][-1]}) x "
                              f"{shapes['n_layers']} layers x 2 x {shapes['n_kv_heads']} KV heads x "
                              f"{shapes['head_dim']} x {item} B"))
    parts.append(dict(part="runtime baseline (measured)", bytes=shapes["baseline"]["rss"],
                      how="RSS after the job's imports and jax.devices()"))
    return parts


def _fmt_cv(cv) -> str:
    return "-" if cv is None else f"{cv:.1%}"


def _status(value, target) -> str:
    return "-" if value is None else ("met" if value <= target else "not met")


def _report_main_job(a: dict) -> None:
    steps = [r["time/step_s"] for r in a["rows"]]
    a["step_sum_s"], a["outside_steps_s"] = sum(steps), a["wall_s"] - sum(steps)
    first = a["rows"][0] if a["rows"] else {}
    print(f"phase A, the main job: {a['command']}\n"
          f"  wall {a['wall_s']:.1f} s (process start to exit); peak RSS {_mib(a['peak_rss']):.0f} MiB; "
          f"{len(steps)} steps, {a['step_sum_s']:.1f} s in the steps (first {first.get('time/step_s', 0):.1f} s, "
          f"{first.get('time/compile_s', 0):.1f} s of it compiling), {a['outside_steps_s']:.1f} s outside them "
          f"(start-up, dataset, model load, last save, summary)")


def _report_cv(b: dict, shapes: dict) -> None:
    cv = b["cv"] = step_cv(b["rows"], _WARMUP.value, shapes["cache_sizes"], shapes["checkpoint_every"])
    print(f"phase B, the step-time CV: {b['command']}\n"
          f"  wall {b['wall_s']:.1f} s; peak RSS {_mib(b['peak_rss']):.0f} MiB; {len(b['rows'])} steps, "
          f"{cv['steady_steps']} steady (steps >= {_WARMUP.value}); checkpoint saves in steps {cv['saves']}, "
          f"subtracted (time/checkpoint_s)")
    if not cv["has_response_length_max"]:
        print("  (metrics lack rollout/response_length_max: buckets by prompt width only)")
    print("\n| response bucket (prompt width, cache sizes reached) | steps | mean s/step | CV | CV with saves |")
    print("|---|---|---|---|---|")
    sizes = shapes["cache_sizes"]
    for bk in cv["buckets"]:
        k = bk["cache_sizes_reached"]
        cache = "?" if k is None else f"cache {bk['prompt_width']} + {sizes[k - 1]}"
        print(f"| {bk['prompt_width']}, {'?' if k is None else k} ({cache}) | {len(bk['steps'])} | "
              f"{bk['mean_s']:.3f} | {_fmt_cv(bk['cv'])} | {_fmt_cv(bk['cv_with_saves'])} |")
    mean_all = statistics.mean(cv["step_s"]) if cv["step_s"] else float("nan")
    print(f"| all steady steps | {cv['steady_steps']} | {mean_all:.3f} | {_fmt_cv(cv['cv_all'])} | "
          f"{_fmt_cv(cv['cv_all_with_saves'])} |")
    print("\n| part of the steady step (then its CPU seconds) | median s | CV |\n|---|---|---|")
    for part, v in cv["parts"].items():
        print(f"| time/{part} | {v['median_s']:.3f} | {_fmt_cv(v['cv'])} |")
    recompiled = (f"{cv['recompile_s']:.1f} s compiling in steps {cv['recompile_steps']}"
                  if cv["recompile_steps"] else "none")
    print(f"step times (saves subtracted): {' '.join(f'{t:.3f}' for t in cv['step_s'])}\n"
          f"compilation after the warm-up: {recompiled}")


def _report_memory(results: dict) -> dict:
    """The parts table against the peak RSS (phase A's, else phase B's), then what is not in it."""
    shapes, a, b = results["shapes"], results.get("main_job"), results.get("cv_run")
    widths = [r["rollout/prompt_width"] for run in (a, b) if run for r in run["rows"] if "rollout/prompt_width" in r]
    parts = memory_parts(shapes, max(widths) if widths else None)
    total = sum(p["bytes"] for p in parts if p["bytes"] is not None)
    memory = results["memory"] = dict(parts=parts, sum=total, complete=all(p["bytes"] is not None for p in parts))
    print("\n| memory part | MiB | how |\n|---|---|---|")
    for p in parts:
        mib = "-" if p["bytes"] is None else f"{_mib(p['bytes']):.1f}"
        print(f"| {p['part']} | {mib} | {p['how']} |")
    print(f"| sum | {_mib(total):.1f} | {'' if memory['complete'] else 'incomplete'} |")
    peak_run, peak_of = (a, "phase A, the main job") if a else (b, "phase B")
    if peak_run:
        ratio = memory["peak_over_sum"] = peak_run["peak_rss"] / total
        memory.update(peak_rss=peak_run["peak_rss"], peak_of=peak_of)
        print(f"| peak RSS ({peak_of}) | {_mib(peak_run['peak_rss']):.1f} | ru_maxrss of its process |")
        print(f"| peak / sum | {ratio:.2f}x | target <= {_RSS_TARGET:g}x: {_status(ratio, _RSS_TARGET)} |")
    ckpt, loader = shapes["param_bytes"] + shapes["opt_bytes"], shapes["n_params"] * 4
    memory.update(checkpoint_host_copy=ckpt, loader_host_copy=loader)
    print(f"not in the sum: the async checkpoint's host copy (parameters + optimizer state) {_mib(ckpt):.1f} MiB "
          f"while a save is in flight; the loader's float32 host copy of the weights {_mib(loader):.1f} MiB while "
          f"the model is built")
    for run, name in ((a, "A"), (b, "B")):
        if run and run["live"]:
            _report_live(run, name)
    print(f"runtime baseline: RSS {_mib(shapes['baseline']['rss']):.1f} MiB, its peak "
          f"{_mib(shapes['baseline']['hwm']):.1f} MiB")
    return memory


def _report_live(run: dict, name: str) -> None:
    """What the live-array wrapper saw in one phase: the RSS around step 0's compilations, and
    the live JAX arrays at their peak."""
    live = run["live"]
    window = run["compile_window"] = _compile_window(live)
    if window:
        print(f"phase {name}: RSS {_mib(window['rss_before']):.0f} MiB when the first of the two longest XLA "
              f"compilations (step 0's sampler and train step) began ({window['start_s']:.1f} s after start: "
              f"imports, dataset, model, train state in place), {_mib(window['rss_after']):.0f} MiB when the later "
              f"ended ({window['end_s']:.1f} s; {window['compile_s']:.1f} s compiling in all); sampled peak "
              f"{_mib(window['sampled_peak']):.0f} MiB at {window['sampled_peak_s']:.1f} s")
    if live["samples"]:
        print(f"phase {name}: live JAX arrays at their peak {_mib(live['live_bytes']):.1f} MiB "
              f"({live['live_arrays']} arrays, {live['at_s']:.1f} s after start), RSS then "
              f"{_mib(live['rss_at_live_peak']):.0f} MiB; {live['samples']} samples")


def _report_summary(results: dict, main_job: bool) -> None:
    a, b, memory = results.get("main_job"), results.get("cv_run"), results["memory"]
    head = b["cv"]["headline"] if b else None
    summary = results["summary"] = dict(
        cv_largest_bucket=head["cv"] if head else None, cv_largest_bucket_steps=len(head["steps"]) if head else None,
        cv_all_steady=b["cv"]["cv_all"] if b else None, main_job_wall_s=a["wall_s"] if a else None,
        main_job_peak_rss=a["peak_rss"] if a else None, peak_over_sum=memory.get("peak_over_sum"))
    print(f"\nsummary{'' if main_job else ' (not the main job: its targets for reference)'}:\n"
          "| figure | value | target | status |\n|---|---|---|---|")
    if b:
        print(f"| step-time CV, largest bucket ({summary['cv_largest_bucket_steps']} steps) | "
              f"{_fmt_cv(summary['cv_largest_bucket'])} | <= {_CV_TARGET:.0%} | "
              f"{_status(summary['cv_largest_bucket'], _CV_TARGET)} |")
        print(f"| step-time CV, all {b['cv']['steady_steps']} steady steps | {_fmt_cv(summary['cv_all_steady'])} "
              "| - | - |")
    if a:
        print(f"| main job wall time | {a['wall_s']:.1f} s | <= {_WALL_TARGET_S:.0f} s | "
              f"{_status(a['wall_s'], _WALL_TARGET_S)} |")
        print(f"| main job peak RSS | {_mib(a['peak_rss']):.0f} MiB | - | - |")
    if "peak_over_sum" in memory:
        print(f"| peak RSS / sum of parts ({memory['peak_of']}) | {memory['peak_over_sum']:.2f}x | "
              f"<= {_RSS_TARGET:g}x | {_status(memory['peak_over_sum'], _RSS_TARGET)} |")


def main(argv):
    del argv
    config = _CONFIG.value
    if ":" in config:
        raise app.UsageError("--config names the file only; phase B adds :<--steps>.")
    if not os.path.isfile(os.path.join(_ROOT, config)):
        raise app.UsageError(f"--config={config}: no such file under {_ROOT}.")
    if not _SKIP_CV.value and _STEPS.value < _WARMUP.value + 2:
        raise app.UsageError(f"--steps={_STEPS.value} leaves fewer than 2 steady steps after --warmup={_WARMUP.value}.")

    shapes = _shapes(config)
    main_job = config == _MAIN_CONFIG
    print(f"machine: {machine()}\n"
          f"{config} ({shapes['source']}, {shapes['sampler_dtype']} sampler, {shapes['trainer_dtype']} trainer, "
          f"{shapes['steps']} steps of {shapes['prompts']} x {shapes['group']} rows, <= {shapes['max_new_tokens']} new "
          f"tokens, KV cache sizes prompt + {shapes['cache_sizes']}, checkpoint every {shapes['checkpoint_every']}); "
          f"jax {shapes['jax']} ({shapes['backend']}); each phase in its own subprocess, from a fresh run directory"
          + ("" if main_job else f"; not the main job ({_MAIN_CONFIG})"), flush=True)

    results = dict(machine=machine(), config=config, shapes=shapes,
                   targets=dict(cv=_CV_TARGET, wall_s=_WALL_TARGET_S, peak_over_parts=_RSS_TARGET))
    root = os.path.abspath(_WORKDIR.value) if _WORKDIR.value else tempfile.mkdtemp(prefix="step_time_")
    try:
        if not _SKIP_MAIN_JOB.value:
            results["main_job"] = _run_phase("A", [f"--config={config}"], os.path.join(root, "main_job"))
        if not _SKIP_CV.value:
            results["cv_run"] = _run_phase("B", [f"--config={config}:{_STEPS.value}", "--config.eval.every=0"],
                                           os.path.join(root, "cv"))
    finally:
        if not _WORKDIR.value:
            shutil.rmtree(root, ignore_errors=True)

    print()
    if "main_job" in results:
        _report_main_job(results["main_job"])
    if "cv_run" in results:
        _report_cv(results["cv_run"], shapes)
    _report_memory(results)
    _report_summary(results, main_job)
    if _JSON.value:
        with open(_JSON.value, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    restart_with_huge_pages()  # as the main job runs (rl_mismatch.host_memory)
    app.run(main)
