r"""qwen3_4b: Qwen3-4B from an HF directory, at the papers' scale -- bf16 sampler, fp32 trainer, AdamW
at 1e-6 with the length-triggered LR decay, 16 samples per prompt, 8192-token responses.

  QWEN3_4B_DIR=/shared/models/Qwen3-4B python -m experiments.train \
      --config=experiments/configs/qwen3_4b.py --workdir=/shared/runs/qwen3_4b --distributed

On a pod or a GPU cluster, start it with ``experiments/launch/tpu_pod.sh`` or
``experiments/launch/slurm_gpu.sbatch`` (one process per host, the same command on every host).

The model: ``model.source`` is ``$QWEN3_4B_DIR`` (an HF model directory: config.json,
model.safetensors[.index.json] and tokenizer.json, on a path every host can read), else the Hub
id ``Qwen/Qwen3-4B``, which must already be in the local HF cache; or pass
``--config.model.source=<dir>``.

Settings, each for a reason:

* the papers' optimizer: AdamW at 1e-6 (gradient clipping at 1.0) and the length-triggered
  decay with the base's trigger constants (warmup 10, baseline window 50, threshold 3, raw
  lengths, period factor 1.8, halving to a floor of 0.1): no k3 trigger;
* the mismatch under study: a bfloat16 sampler against a float32 trainer (float32 masters and
  compute), no correction;
* 16 prompts x 16 samples per step (GRPO groups of 16), 8192-token responses, prompts up to 512
  tokens: reasoning-length replies, where the length surges the LR rule watches can happen;
* task ``gsm_symbolic`` (reasoning-gym's grade-school maths, generated locally); a maths set of
  one's own goes through ``--config.task.name=jsonl --config.task.jsonl_path=<file>``;
* the mesh ``(data=-1, model=4)`` and 16 micro-batches: one row per device per micro-batch on
  a TPU v5e-64 (``fsdp:16 x model:4``, the plan's fitting mesh there). On 8 x H100 the same mesh
  is ``fsdp:2 x model:4``: pass ``--config.trainer.n_microbatches=64`` (two rows per device;
  with 16 the train phase does not fit). ``python -m experiments.plan --model=qwen3-4b
  --devices=<n> --mesh=<mesh> --chip=<chip> --n_microbatches=<k>`` checks a variation, and
  ``docs/scaling.md`` has the tables;
* a greedy evaluation every 50 steps on 256 held-out questions, checkpoints every 10 steps.

On an accelerator JAX computes float32 matmuls with bf16 passes (TPU) or TF32 (recent GPUs) by
default; the launch scripts set ``JAX_DEFAULT_MATMUL_PRECISION=float32`` so that the trainer
computes in float32, as it does on CPU.

What to expect: not run here (no accelerator was at hand). docs/scaling.md's model puts a step
at ~200 s on a TPU v5e-64 and ~560 s on 8 x H100 (both dominated by the float32 trainer at an
assumed 40% MFU, and by decoding 8192 tokens), so 500 steps take about 28 hours on the pod. The
length detector ignores steps 0-9, takes its baseline over steps 10-59 and can fire from step 60
on (``lr/length_trigger/surge_step``); a surge needs the mean response length to triple, which
the budget allows only from baselines under ~2700 tokens. mismatch/k3 starts small (bf16
weights and activations against float32) and, by the papers' account, grows with training.
``--config=experiments/configs/qwen3_4b.py:N`` runs N steps (default 500).
"""

import os

from experiments.configs import base

MODEL_DIR_ENV = "QWEN3_4B_DIR"
HUB_ID = "Qwen/Qwen3-4B"


def get_config(arg: str | None = None):
    # The papers' sampler/trainer dtypes, AdamW at 1e-6 with clipping 1.0 and the length trigger's
    # constants (warmup 10, window 50, threshold 3, raw length, period factor 1.8) are the base defaults.
    c = base.get_base_config()
    c.steps = base.steps_from_arg(arg, 500)
    c.model.source = os.environ.get(MODEL_DIR_ENV) or HUB_ID
    c.task.name = "gsm_symbolic"
    c.task.train_size = 5000
    c.task.eval_size = 256
    c.rollout.prompts_per_step = 16
    c.rollout.group_size = 16
    c.rollout.max_prompt_len = 512
    c.sampler.max_new_tokens = 8192
    c.trainer.n_microbatches = 16
    c.eval.every = 50
    c.eval.batch_size = 256
    c.checkpoint.every = 10
    c.mesh.model = 4
    return c
