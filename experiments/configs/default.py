r"""default: the main job. SmolLM2-135M-Instruct learns small-number arithmetic with GRPO; bf16 sampler,
fp32 trainer, length-triggered LR (plus the same trigger on the mismatch k3).

  python -m experiments.train --config=experiments/configs/default.py --workdir=/tmp/default_run
  python -m experiments.plot --workdir /tmp/default_run --out /tmp/default_run/plot.png

What to expect: 16 steps of 4 prompts x 4 samples of "Calculate 7 - 3.", 48-token responses,
Adam at 5e-5; a few minutes on a 2-core CPU, the first step mostly compiling. The share of
replies in ``<answer>`` tags (reward/format) climbs to ~1 within a few steps and accuracy follows
noisily; mismatch/k3 (bf16 against fp32) tends to grow with the updates. Which step the length
or k3 detector fires at, if at all, differs from host to host and run to run: one trajectory of
16 samples per step is chaos, so claims come from studies over seeds (``experiments/studies/``,
``docs/results/README.md``), not from this run.
``--config=experiments/configs/default.py:N`` runs N steps.
"""

from experiments.configs import base


def get_config(arg: str | None = None):
    c = base.get_base_config()
    c.steps = base.steps_from_arg(arg, 16)
    c.model.source = "smollm2-135m-instruct"
    c.task.name = "basic_arithmetic"
    # "Calculate 7 - 3.": two terms, + and - only. reasoning-gym draws a "1-digit" term from 0-10
    # (randint's bound is inclusive): 242 distinct questions.
    c.task.train_size = 100
    c.task.eval_size = 20
    c.task.kwargs = dict(min_terms=2, max_terms=2, min_digits=1, max_digits=1, operators=("+", "-"),
                         allow_parentheses=False, allow_negation=False)
    # SmolLM2-135M ignores a bare "put the answer in <answer></answer>"; with this worked example
    # about 1 reply in 15 is well-formed, enough for GRPO to find and reinforce.
    c.task.system_prompt = "You solve arithmetic. Reply in exactly this format:\n3 + 4 = 7\n<answer>7</answer>"
    c.rollout.prompts_per_step = 4
    c.rollout.group_size = 4
    c.sampler.dtype = "bfloat16"
    c.sampler.max_new_tokens = 48
    c.trainer.dtype = "float32"
    c.trainer.n_microbatches = 2  # Two half-batch gradients give the gradient noise scale.
    c.optim.learning_rate = 5e-5  # High on purpose: visible learning (and mismatch growth) in 16 steps.
    c.optim.lr_schedule = "length_triggered"
    # The base's trigger constants (warmup 10, window 50, threshold 3, period factor 1.8: a public
    # re-implementation's; the paper gives none) assume runs of thousands of steps with long
    # responses. Scaled to this 16-step, 48-token run, each for a reason:
    # - warmup 2, window 3: the baseline is taken over steps 2-4, leaving 11 steps to watch.
    # - threshold 1.25 (not 3): forced by the 48-token budget. The baseline responses are ~25-30
    #   tokens, so a 3x surge (75-90 tokens) cannot fit in 48 tokens; 1.25x (31-38 tokens) can.
    #   The k3 detector's 2x is its own (k3 is not bounded by the budget).
    # - smoothing 0.5 (an EMA with the mean age of a 3-step average), not the base's raw 0.0: a
    #   mean over 16 responses is noisy against a threshold as low as 1.25x, and the runs measured
    #   above (surge at step 7) were made with it.
    # - period factor 1.0 (not 1.8): with a surge near step 7, 1.8 gives a period of 13 and a first
    #   halving at step 15, the run's last; 1.0 gives a period of round(1.0 * 7) = 7, halving at
    #   step 9 (then 16, 23 in a longer run).
    c.optim.trigger_warmup = 2
    c.optim.trigger_baseline_window = 3
    c.optim.trigger_threshold = 1.25
    c.optim.trigger_smoothing = 0.5
    c.optim.trigger_period_factor = 1.0
    c.optim.k3_trigger_threshold = 2.0
    c.checkpoint.every = 4
    c.mesh.data = 1  # One CPU device: the cores go to XLA's intra-op threads.
    return c
