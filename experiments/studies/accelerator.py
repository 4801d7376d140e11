r"""accelerator: the main study's six arms at the papers' scale -- a 1.5-4B Qwen model from an HF
directory, 300 steps, 1024-token responses, 32 prompts x 8 samples per step -- for a GPU or TPU host.

  python -m experiments.study --study=experiments/studies/accelerator.py:/data/Qwen2.5-1.5B-Instruct \
      --workdir=/data/runs/accelerator_study [--seeds=0]
  python -m experiments.report --workdir=/data/runs/accelerator_study --out=docs/results/accelerator

The argument is the model: an HF directory (``config.json``, ``*.safetensors``, ``tokenizer.json``)
of a Qwen2.5 / Qwen3 instruct model (the decoder also reads Llama-architecture models). The
task is harder than the CPU study's (countdown: reach a target with 3-4 numbers and + - * /),
so accuracy has room to rise for 300 steps and responses have room to surge.

The arms are those of ``experiments/studies/main.py``; the length rule's constants are the
public re-implementation's, which assume runs of hundreds of steps (warmup 10 steps, a 50-step
raw-length baseline, threshold 3, halving every round(1.8 x surge step) steps, floor 0.1).

Expected cost, from FLOPs (not measured here). A step trains on 256 sequences of ~250 prompt +
~500 mean response tokens (~190k tokens): 6 x 1.5e9 x 1.9e5 = 1.7e15 FLOP for Qwen2.5-1.5B, ~5 s
on one H100 at 35% of its 989 TFLOP/s dense bf16 peak (an fp32 trainer runs its matmuls at
JAX's default precision, TF32 on NVIDIA GPUs). Decoding 256 x 1024 tokens is bandwidth-bound:
~1024 sequential steps of a 3 GB weight read plus the KV cache, 3-10 s at 3.35 TB/s. With
rescoring and the weight sync, ~20 s per step: 300 steps ~1.7 h per run, the 18 runs ~30 h on
one H100 (~2.5x that for a 4B model). ``--seeds=k`` runs one seed (six runs, ~10 h).
"""

from experiments.configs import study as study_config
from experiments.studies.main import ARMS
from rl_mismatch.study import Arm, Study

PAPER_LENGTH_RULE = {"optim.lr_schedule": "length_triggered", "optim.trigger_warmup": 10,
                     "optim.trigger_baseline_window": 50, "optim.trigger_threshold": 3.0,
                     "optim.trigger_smoothing": 0.0, "optim.trigger_period_factor": 1.8,
                     "optim.trigger_decay_base": 0.5, "optim.trigger_floor": 0.1}


def get_study(arg: str | None = None) -> Study:
    if not arg:
        raise ValueError("The accelerator study needs a model: --study=experiments/studies/accelerator.py:"
                         "<HF model directory>, e.g. a local copy of Qwen2.5-1.5B-Instruct.")
    c = study_config.get_config("300")
    c.model.source = arg
    c.task.name = "countdown"
    c.task.kwargs = dict(min_numbers=3, max_numbers=4)
    c.task.train_size = 20000
    c.task.eval_size = 200
    c.task.system_prompt = ("Reach the target number with the given numbers, each used once, and + - * /. "
                            "Think briefly, then give the expression in <answer></answer>.")
    c.rollout.prompts_per_step = 32
    c.rollout.group_size = 8
    c.sampler.max_new_tokens = 1024
    c.trainer.n_microbatches = 4
    c.trainer.remat = "layer"
    c.trainer.keep_logits = False
    c.optim.learning_rate = 1e-6
    c.eval.every = 20
    c.eval.batch_size = 200
    c.checkpoint.every = 20
    c.mesh.data = -1
    arms = tuple(Arm(a.label, a.description, PAPER_LENGTH_RULE) if a.label == "c_bf16_length_lr" else a
                 for a in ARMS)
    return Study("accelerator", c, seeds=(0, 1, 2), arms=arms)
