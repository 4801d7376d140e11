"""Every setting of an experiment with its default: the base the other config files change.

Not a runnable config itself (it has no ``get_config``); the keys and their meaning are those
of ``rl_mismatch.experiment_config`` (one dataclass per group, validated at start-up). Any key
can be overridden on the command line, e.g. ``--config.sampler.dtype=fp16``.
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict


def get_base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0  # Root of every PRNG key: model init (tiny), sampling, train step, data order.
    c.steps = 10  # RL steps in total; a resumed run continues up to this.

    c.model = ml_collections.ConfigDict()
    c.model.source = "smollm2-135m-instruct"  # "tiny", a known name, a .gguf file, an HF dir or a cached Hub id.
    c.model.tiny_max_seq_len = 256  # Context of the tiny model.
    c.model.cache_dir = ""  # GGUF dequantization cache ("" = ~/.cache/rl_mismatch).

    c.task = ml_collections.ConfigDict()
    c.task.name = "basic_arithmetic"  # A reasoning-gym task, or "jsonl" with task.jsonl_path.
    c.task.jsonl_path = ""
    c.task.train_size = 500
    c.task.eval_size = 50
    c.task.seed = 0
    c.task.kwargs = ml_collections.ConfigDict()  # reasoning-gym config fields of the task.
    c.task.data_dir = ""  # "" = <workdir>/data.
    c.task.system_prompt = ""  # "" = the chat template's default.
    c.task.format_weight = 0.1  # Reward for a well-formed <answer> block.
    c.task.overlong_buffer = 0  # DAPO soft overlong penalty buffer in tokens (0 = off).
    c.task.overlong_weight = 1.0

    c.rollout = ml_collections.ConfigDict()
    c.rollout.prompts_per_step = 4  # B, over all processes.
    c.rollout.group_size = 4  # G samples per prompt.
    c.rollout.prompt_bucket = 0  # 0: one prompt width for the whole run (no recompilation).
    c.rollout.max_prompt_len = 0  # 0: context - max_new_tokens.

    c.sampler = ml_collections.ConfigDict()
    c.sampler.dtype = "bfloat16"
    c.sampler.max_new_tokens = 64
    c.sampler.temperature = 1.0
    c.sampler.top_k = 0
    c.sampler.top_p = 1.0
    c.sampler.logp = "full"  # "full" or "truncated" sampler log-prob as mu.
    c.sampler.return_entropy = False

    c.trainer = ml_collections.ConfigDict()
    c.trainer.dtype = "float32"  # Compute dtype; master weights are float32.
    c.trainer.n_microbatches = 1
    c.trainer.loss_scale_initial = 2.0**15  # float16 only.
    c.trainer.loss_scale_growth_interval = 2000
    # Memory vs compute, same numbers: "layer" / "projections" / "none" kept per layer, and
    # whether the LM head's float32 logits are kept for the backward pass or recomputed.
    c.trainer.remat = "layer"
    c.trainer.keep_logits = False

    c.optim = ml_collections.ConfigDict()
    c.optim.learning_rate = 1e-6
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.weight_decay = 0.0
    c.optim.grad_clip = 1.0
    c.optim.lr_schedule = "length_triggered"  # or "constant".
    # The trigger_* defaults (warmup 10, window 50, threshold 3, period factor 1.8, floor 0.1) are
    # those of a public re-implementation of arXiv 2602.01826; the paper gives no values.
    c.optim.trigger_warmup = 10  # Steps whose lengths the detector ignores.
    c.optim.trigger_baseline_window = 50
    c.optim.trigger_threshold = 3.0
    # 0: compare the raw mean length with threshold x baseline, as the re-implementation does;
    # > 0: an EMA of it with this coefficient.
    c.optim.trigger_smoothing = 0.0
    c.optim.trigger_decay_base = 0.5
    c.optim.trigger_period_factor = 1.8
    c.optim.trigger_floor = 0.1
    c.optim.trigger_max_triggers = 1
    # True: also ramp the LR linearly over the warmup steps, (t + 1) / trigger_warmup (the
    # re-implementation's warmup); False: full LR from step 0.
    c.optim.trigger_linear_warmup = False
    c.optim.k3_trigger_threshold = 0.0  # > 0: also decay on a surge of mismatch/k3 (0 = off).

    c.loss = ml_collections.ConfigDict()
    c.loss.advantage_mode = "grpo"  # or "dr_grpo".
    c.loss.policy_loss = "ppo"  # "ppo", "reinforce" or "gspo".
    c.loss.clip_eps_low = 0.2
    c.loss.clip_eps_high = 0.2
    c.loss.aggregation = "token_mean"
    c.loss.norm_length = 0  # Only for aggregation="seq_mean_token_sum_norm".
    # A preset (none, bypass, token_tis, token_mis, seq_tis, seq_mis, geo_mask, token_k3, seq_k3)
    # with correction_low/high, or a composition carrying its thresholds, e.g.
    # "seq_is(2) + seq_max_k3(0.1)" (rl_mismatch.corrections lists the parts and verl equivalents).
    c.loss.correction = "none"
    c.loss.correction_low = config_dict.placeholder(float)
    c.loss.correction_high = config_dict.placeholder(float)
    c.loss.dual_clip = 0.0  # Dual-clip PPO's c > 1 (verl's clip_ratio_c = 3); 0 = off.

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every = 10
    c.checkpoint.max_to_keep = 2

    c.log = ml_collections.ConfigDict()
    c.log.every = 1
    c.log.tensorboard = True
    c.log.samples_every = 10  # Every N-th step writes some rollouts to samples.jsonl; 0: never.
    c.log.samples_per_step = 4

    c.eval = ml_collections.ConfigDict()
    c.eval.every = 0  # Greedy accuracy on the eval split every N steps (eval/*); 0 = off.
    c.eval.batch_size = 0  # Eval prompts per decode call (0 = the whole split).
    c.eval.max_new_tokens = 0  # 0 = sampler.max_new_tokens.

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # -1: every device.
    c.mesh.model = 1
    return c


def steps_from_arg(arg: str | None, default: int) -> int:
    """The ``:arg`` of ``--config=file.py:arg`` as a step count (empty: ``default``)."""
    if not arg:
        return default
    try:
        steps = int(arg)
    except ValueError:
        raise ValueError(f"The config argument {arg!r} must be a number of steps, e.g. file.py:40.") from None
    if steps < 1:
        raise ValueError(f"The config argument (steps) must be >= 1, got {steps}.")
    return steps
