"""The launch scripts (experiments/launch/) and the Qwen3-4B config they start."""

from __future__ import annotations

import os
import pathlib
import stat
import subprocess

import pytest

from experiments.configs import qwen3_4b
from rl_mismatch.experiment_config import ExperimentConfig

REPO = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = REPO / "experiments" / "launch"
SCRIPTS = ("tpu_pod.sh", "slurm_gpu.sbatch")


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_syntax_and_header(script):
    path = LAUNCH / script
    subprocess.run(["bash", "-n", str(path)], check=True)
    header = path.read_text().split("set -euo pipefail")[0]
    for name in ("WORKDIR", "MODEL_DIR", "experiments.train"):
        assert name in header, (script, name)


def _stub(directory: pathlib.Path, name: str, body: str) -> None:
    path = directory / name
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def _env(stubs: pathlib.Path, **settings) -> dict:
    """The environment with ``stubs`` first on PATH, none of the scripts' optional settings."""
    optional = ("REPO_DIR", "CONFIG", "PORT", "PROJECT", "MATMUL_PRECISION", "JAX_DEFAULT_MATMUL_PRECISION")
    env = {k: v for k, v in os.environ.items() if k not in optional}
    return {**env, "PATH": f"{stubs}:{env['PATH']}", **settings}


def test_tpu_pod_script_runs_the_same_command_on_every_worker(tmp_path):
    _stub(tmp_path, "gcloud", 'printf "%s\\n" "$@"\n')  # prints its arguments, one per line
    env = _env(tmp_path, TPU_NAME="pod", ZONE="us-west4-a", WORKDIR="/mnt/shared/runs/q 4b",
               MODEL_DIR="/mnt/shared/Qwen3-4B")
    out = subprocess.run(["bash", str(LAUNCH / "tpu_pod.sh"), "--config.steps=3"], env=env, check=True,
                         capture_output=True, text=True).stdout.splitlines()
    assert out[:3] == ["compute", "tpus", "tpu-vm"] and "--worker=all" in out and "--zone=us-west4-a" in out
    command = next(a for a in out if a.startswith("--command="))
    assert ("JAX_DEFAULT_MATMUL_PRECISION=float32 QWEN3_4B_DIR=/mnt/shared/Qwen3-4B "
            ".venv/bin/python -m experiments.train "
            "--config=experiments/configs/qwen3_4b.py --workdir=/mnt/shared/runs/q\\ 4b --distributed "
            "--config.steps=3") in command
    bucket = {**env, "WORKDIR": "gs://bucket/run"}
    proc = subprocess.run(["bash", str(LAUNCH / "tpu_pod.sh")], env=bucket, capture_output=True, text=True)
    assert proc.returncode == 2 and "shared POSIX path" in proc.stderr


def test_slurm_script_gives_each_host_its_process_id_and_all_gpus(tmp_path):
    repo = tmp_path / "repo"
    (repo / ".venv" / "bin").mkdir(parents=True)
    _stub(repo / ".venv" / "bin", "python",
          'echo "$JAX_LOCAL_DEVICE_IDS|$JAX_DEFAULT_MATMUL_PRECISION|$QWEN3_4B_DIR|$*"\n')
    _stub(tmp_path, "scontrol", "echo gpu-node-0; echo gpu-node-1\n")
    # srun starts the task command once per host; here the second of two hosts.
    _stub(tmp_path, "srun", 'while [[ "$1" == --* ]]; do shift; done; SLURM_PROCID=1 SLURM_NTASKS=2 "$@"\n')
    env = _env(tmp_path, REPO_DIR=str(repo), WORKDIR="/shared/runs/q", MODEL_DIR="/shared/Qwen3-4B",
               SLURM_JOB_NODELIST="gpu-node-[0-1]", SLURM_GPUS_ON_NODE="8")
    out = subprocess.run(["bash", str(LAUNCH / "slurm_gpu.sbatch"), "--config.trainer.n_microbatches=64"], env=env,
                         check=True, capture_output=True, text=True).stdout.strip()
    assert out == ("0,1,2,3,4,5,6,7|float32|/shared/Qwen3-4B|-m experiments.train "
                   "--config=experiments/configs/qwen3_4b.py --workdir=/shared/runs/q "
                   "--coordinator_address=gpu-node-0:12355 --num_processes=2 --process_id=1 "
                   "--config.trainer.n_microbatches=64")


def test_qwen3_4b_config_validates_without_a_model(monkeypatch):
    monkeypatch.delenv(qwen3_4b.MODEL_DIR_ENV, raising=False)
    cfg = ExperimentConfig.from_dict(qwen3_4b.get_config(None).to_dict())
    assert cfg.model.source == qwen3_4b.HUB_ID and cfg.steps == 500
    assert (cfg.sampler.dtype, cfg.trainer.dtype) == ("bfloat16", "float32")
    assert (cfg.optim.learning_rate, cfg.optim.lr_schedule) == (1e-6, "length_triggered")
    assert cfg.optim.k3_trigger_threshold == 0
    assert (cfg.optim.trigger_warmup, cfg.optim.trigger_baseline_window, cfg.optim.trigger_threshold,
            cfg.optim.trigger_period_factor) == (10, 50, 3.0, 1.8)
    assert (cfg.rollout.group_size, cfg.sampler.max_new_tokens) == (16, 8192)
    # 16 x 16 rows split evenly over the v5e-64 mesh (fsdp:16 x model:4), one row per device per micro-batch.
    assert cfg.rollout.prompts_per_step * cfg.rollout.group_size == cfg.trainer.n_microbatches * 16
    monkeypatch.setenv(qwen3_4b.MODEL_DIR_ENV, "/models/Qwen3-4B")
    assert ExperimentConfig.from_dict(qwen3_4b.get_config("3").to_dict()).model.source == "/models/Qwen3-4B"
    assert "What to expect" in qwen3_4b.__doc__
