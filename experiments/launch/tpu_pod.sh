#!/usr/bin/env bash
# Runs one RL experiment on every host of a Cloud TPU VM slice (e.g. a v5litepod-64: 16 hosts of
# 4 TPU v5e chips): the same `python -m experiments.train ... --distributed` on each worker, where
# jax.distributed.initialize() reads the slice's topology from the TPU VM's metadata.
#
# Set before running (environment variables):
#   TPU_NAME   the TPU VM slice                       (required)
#   ZONE       its zone, e.g. us-west4-a              (required)
#   PROJECT    its Google Cloud project               (optional: gcloud's default)
#   WORKDIR    the run directory, a POSIX path that every worker mounts at the same place, e.g.
#              a Filestore (NFS) share at /mnt/shared/runs/qwen3_4b (required). gs:// paths do not
#              work: experiments.train writes its workdir with plain file operations
#              (os.makedirs, open, os.replace) and every process must see the same files.
#   MODEL_DIR  the Qwen3-4B HF directory, readable by every worker (required for the default
#              config; passed as QWEN3_4B_DIR)
#   REPO_DIR   the checkout on every worker, with its venv in $REPO_DIR/.venv and jax[tpu]
#              installed (default: $HOME/rl_mismatch on the worker). Set it up once on all workers, e.g.
#              gcloud compute tpus tpu-vm ssh $TPU_NAME --zone=$ZONE --worker=all --command='git clone <repo> ~/rl_mismatch && cd ~/rl_mismatch && python3.11 -m venv .venv && .venv/bin/pip install -e ".[experiments]" -c constraints.txt "jax[tpu]"'
#   CONFIG     the experiment config (default: experiments/configs/qwen3_4b.py)
#   Extra arguments to this script are passed on to experiments.train, e.g.
#     --config.steps=100 --config.mesh.model=4
#
# Check the plan for the slice first: python -m experiments.plan --model=qwen3-4b --devices=64
# --mesh=fsdp:16xmodel:4 --chip=tpu-v5e (docs/scaling.md). Rerunning the same command resumes the
# run from its last checkpoint. The output of every worker streams back here.
set -euo pipefail

: "${TPU_NAME:?set TPU_NAME to the TPU VM slice}"
: "${ZONE:?set ZONE to the slice zone}"
: "${WORKDIR:?set WORKDIR to a path on a file system shared by every worker}"
: "${MODEL_DIR:?set MODEL_DIR to the model HF directory, readable by every worker}"
REPO_DIR="${REPO_DIR:-\$HOME/rl_mismatch}"  # expanded on the worker
CONFIG="${CONFIG:-experiments/configs/qwen3_4b.py}"

case "$WORKDIR" in
  gs://*) echo "error: WORKDIR=$WORKDIR: use a shared POSIX path (e.g. an NFS mount), not a bucket URL." >&2; exit 2 ;;
esac

extra=""
for arg in "$@"; do extra+=" $(printf '%q' "$arg")"; done
# REPO_DIR is left unquoted so that $HOME (or a leading ~) expands on the worker.
# JAX computes float32 matmuls with bf16 passes on TPU by default: float32 makes the fp32 trainer
# compute in float32, as it does on CPU (docs/scaling.md). Set MATMUL_PRECISION=default to opt out.
remote="cd ${REPO_DIR} && JAX_DEFAULT_MATMUL_PRECISION=${MATMUL_PRECISION:-float32} \
QWEN3_4B_DIR=$(printf '%q' "$MODEL_DIR") .venv/bin/python -m experiments.train \
--config=$(printf '%q' "$CONFIG") --workdir=$(printf '%q' "$WORKDIR") --distributed${extra}"

gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" ${PROJECT:+--project="$PROJECT"} --worker=all \
  --command="$remote"
