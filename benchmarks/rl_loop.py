r"""The whole RL step on SmolLM2-135M-Instruct: rl_mismatch's experiment loop vs TRL's ``GRPOTrainer``.

    python benchmarks/rl_loop.py [--steps=8] [--prompts=4] [--group=4] [--max_new_tokens=48]
                                 [--dtypes=fp32,bf16] [--microbatches=0] [--torch_threads=0] [--skip_trl]
                                 [--torch_device=cpu]

One RL step = sample ``prompts x group`` completions, score them, one optimizer update. Both
sides, in the same run, on CPU, each in a subprocess of its own (so the peak RSS is per side).
On a GPU host, ``--torch_device=cuda`` puts TRL on the GPU (``use_cpu=False``); ours runs on
JAX's default backend either way.

* ours: ``rl_mismatch.experiment.run`` on the main job's config (``experiments/configs/default.py``:
  the arithmetic task, its system prompt, the float32 trainer with ``trainer.n_microbatches``
  micro-batches, AdamW at 5e-5 after global-norm clipping at 1, PPO-clip token-mean loss, GRPO
  advantages) with the sizes above and these overrides: ``eval.every=0``, no TensorBoard, one
  checkpoint after the last step (outside every step's time), and ``optim.lr_schedule=constant``
  with the k3 trigger off, so the learning rate is TRL's at every step. ``--dtypes`` names the
  sampler's dtype per run: ``fp32`` (against TRL at the same precision) and ``bf16`` (the main
  job's setting: bf16 sampler, float32 trainer). Per step, from ``metrics.jsonl``:
  ``time/step_s`` (the loop body: weight sync, sampling, scoring, the update waited for),
  ``time/compile_s``, and ``rollout/response_length_mean`` x rows = the generated tokens.
* TRL: ``GRPOTrainer`` on ``transformers.LlamaForCausalLM`` built from the same weights
  (``_common.hf_llama``) and our tokenizer, float32 (``bf16=False``), with the same prompts in
  the same order (the rendered chat-template text of ``tasks.PromptBatches[s]``'s prompts, no
  dataset shuffle), a reward function calling the same scorer (``rl_mismatch.tasks.score`` with
  the task's ``format_weight``), ``num_generations`` = group, ``max_completion_length`` =
  ``--max_new_tokens``, temperature 1 with no top-k/top-p, ``beta=0`` (no reference model, as
  ours), ``loss_type="dapo"`` (token mean) with ``epsilon`` = our clip, group-std advantages;
  AdamW (``adam_*``, ``weight_decay``, ``max_grad_norm`` and a constant LR from the same config).
  One generation batch = one update: ``per_device_train_batch_size`` = prompts x group,
  ``gradient_accumulation_steps=1`` (so ``steps_per_generation=1``), ``num_iterations=1``.
  TRL's default ``gradient_checkpointing=True`` is kept (ours recomputes each layer too:
  ``trainer.remat="layer"``). A ``TrainerCallback`` times each step from ``on_step_begin`` to
  ``on_step_end`` (generation, reward, loss, backward, optimizer step); the reward function
  counts the completion tokens (EOS included, as our response lengths), and a subclass times
  TRL's ``_generate_and_score_completions`` (generation, rewards, advantages): the rollout part.

Reported per side: the steady-state seconds per RL step (median over the steps after the first),
the first step (ours: compilation included, and how much of it was compiling; TRL: warm-up),
generated tokens/s over the steady steps (their tokens / their time: the two sides' policies
sample different responses, so their lengths differ), the steady steps' coefficient of
variation, the subprocess's peak RSS, RL steps per hour, and ours / TRL in steps per hour; then
per side the steady step split into rollout (sampling and scoring; ours: ``time/sample_s`` +
``time/score_s``) and update (the rest), and every step's time, tokens and mean reward. The
target (benchmark issue): ours >= 3x TRL's RL steps per hour at the same precision (fp32).
"""

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

from absl import app, flags

from _common import machine, restart_with_huge_pages

_STEPS = flags.DEFINE_integer("steps", 8, "RL steps per side (the first is reported apart: compile / warm-up).")
_PROMPTS = flags.DEFINE_integer("prompts", 4, "Prompts per step (rollout.prompts_per_step).")
_GROUP = flags.DEFINE_integer("group", 4, "Samples per prompt (rollout.group_size = TRL num_generations).")
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 48, "Maximum completion length, both sides.")
_DTYPES = flags.DEFINE_list("dtypes", ["fp32", "bf16"], "Our sampler dtypes, one run each (trainer float32).")
_MICROBATCHES = flags.DEFINE_integer("microbatches", 0, "Our trainer.n_microbatches (0: the config's).")
_REMAT = flags.DEFINE_enum("remat", None, ["layer", "projections", "none"], "Our trainer.remat (unset: the config's).")
_KEEP_LOGITS = flags.DEFINE_bool("keep_logits", None, "Our trainer.keep_logits (unset: the config's).")
_SKIP_TRL = flags.DEFINE_bool("skip_trl", False, "Measure only rl_mismatch.")
_TORCH_THREADS = flags.DEFINE_integer(
    "torch_threads", 0, "torch.set_num_threads for TRL (0: torch's default, one per physical core). On cores "
    "shared with another job, torch's spinning OpenMP threads lose far more than XLA's: try 1 there.")
_TORCH_DEVICE = flags.DEFINE_enum("torch_device", "cpu", ["cpu", "cuda"],
                                  "Where TRL runs: cpu, or cuda on a GPU host (ours runs on JAX's default backend).")
# Internal: the subprocess that measures one side writes its results to --out.
_SIDE = flags.DEFINE_enum("side", None, ["ours", "trl"], "Internal: measure one side in this process.")
_DTYPE = flags.DEFINE_string("dtype", "fp32", "Internal: our sampler dtype for --side=ours.")
_DATA_DIR = flags.DEFINE_string("data_dir", "", "Internal: the task's dataset directory, shared by the sides.")
_OUT = flags.DEFINE_string("out", "", "Internal: where --side writes its results (JSON).")

_CONFIG_FILE = "experiments/configs/default.py"
_SAMPLER_DTYPE = {"fp32": "float32", "bf16": "bfloat16"}


def _config(sampler_dtype: str, data_dir: str):
    """The main job's config (``experiments/configs/default.py``) at the benchmark's sizes, as an
    ``ExperimentConfig``."""
    # experiments/ is run from the checkout, not installed, and `python benchmarks/rl_loop.py`
    # puts benchmarks/ on sys.path, not the repository root.
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if root not in sys.path:
        sys.path.append(root)
    from experiments.configs import default

    from rl_mismatch.experiment_config import ExperimentConfig

    c = default.get_config(str(_STEPS.value))
    c.rollout.prompts_per_step = _PROMPTS.value
    c.rollout.group_size = _GROUP.value
    c.sampler.max_new_tokens = _MAX_NEW_TOKENS.value
    c.sampler.dtype = sampler_dtype
    c.trainer.dtype = "float32"
    if _MICROBATCHES.value:
        c.trainer.n_microbatches = _MICROBATCHES.value
    if _REMAT.value:
        c.trainer.remat = _REMAT.value
    if _KEEP_LOGITS.value is not None:
        c.trainer.keep_logits = _KEEP_LOGITS.value
    c.task.data_dir = data_dir
    c.eval.every = 0
    c.log.tensorboard = False
    c.checkpoint.every = _STEPS.value  # One save, after the last step: outside every step's time.
    c.checkpoint.max_to_keep = 1
    # The same learning rate as TRL's at every step: no length- or k3-triggered decay.
    c.optim.lr_schedule = "constant"
    c.optim.k3_trigger_threshold = 0.0
    return ExperimentConfig.from_dict(c.to_dict())


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def _measure_ours(out: dict) -> None:
    from rl_mismatch import console, experiment
    from rl_mismatch.metric_writing import read_metrics

    cfg = _config(_SAMPLER_DTYPE[_DTYPE.value], _DATA_DIR.value)
    console.quiet_library_logs()
    rows_per_step = cfg.rollout.prompts_per_step * cfg.rollout.group_size
    with tempfile.TemporaryDirectory(prefix="rl_loop_ours_") as workdir:
        experiment.run(cfg, workdir)
        rows = [r for r in read_metrics(workdir) if "time/step_s" in r]
    if len(rows) != cfg.steps:
        raise RuntimeError(f"metrics.jsonl holds {len(rows)} steps, expected {cfg.steps}.")
    out.update(
        precision=f"{_DTYPE.value} sampler, fp32 trainer",
        step_s=[r["time/step_s"] for r in rows],
        compile_s=[r["time/compile_s"] for r in rows],
        rollout_s=[r["time/sample_s"] + r["time/score_s"] for r in rows],
        tokens=[r["rollout/response_length_mean"] * rows_per_step for r in rows],
        reward=[r["reward/mean"] for r in rows],
        detail=(f"n_microbatches={cfg.trainer.n_microbatches}, remat={cfg.trainer.remat}, "
                f"keep_logits={cfg.trainer.keep_logits}, lr={cfg.optim.learning_rate:g}"),
    )


def _trl_prompts(cfg, tok, max_prompt_len: int):
    """Our prompt stream for ``cfg.steps`` steps, as TRL takes it: ``(texts, examples)``, the
    ``prompts_per_step`` distinct prompts of step 0, then of step 1, ... (TRL repeats each
    ``num_generations`` times itself), each rendered with the chat template to text."""
    from rl_mismatch import experiment, tasks

    name = experiment.prepare_task(cfg.task, cfg.task.data_dir)
    split = tasks.load_split(name, tasks.TRAIN_SPLIT, cfg.task.data_dir)
    system_prompt = cfg.task.system_prompt or None
    batches = tasks.PromptBatches(split, tok, batch_size=cfg.rollout.prompts_per_step,
                                  group_size=cfg.rollout.group_size, max_prompt_len=max_prompt_len,
                                  seed=cfg.seed % 2**32, system_prompt=system_prompt)
    examples = [ex for s in range(cfg.steps) for ex in batches[s].examples[::cfg.rollout.group_size]]
    texts = [tok.apply_chat_template(tasks.build_messages(ex["question"], system_prompt=system_prompt),
                                     tokenize=False) for ex in examples]
    return texts, examples


def _measure_trl(out: dict) -> None:
    import datasets
    import torch
    import transformers
    import trl

    from rl_mismatch import tasks
    from rl_mismatch.models import load_state_dict

    from _common import hf_llama

    if _TORCH_THREADS.value:
        torch.set_num_threads(_TORCH_THREADS.value)
    cfg = _config("float32", _DATA_DIR.value)
    hf_config, state_dict, tok = load_state_dict(cfg.model.source)
    model = hf_llama(hf_config, state_dict, "float32").train()
    del state_dict
    hf_tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok.backend, bos_token=tok.bos_token, eos_token=tok.eos_token,
        pad_token=tok.pad_token or tok.eos_token, unk_token=tok.unk_token)
    texts, examples = _trl_prompts(cfg, tok, hf_config["max_position_embeddings"] - cfg.sampler.max_new_tokens)
    # TRL tokenizes a text prompt with the tokenizer's own call: it must give our prompt tokens.
    ours_ids = tok.apply_chat_template(tasks.build_messages(examples[0]["question"],
                                                            system_prompt=cfg.task.system_prompt or None))
    if hf_tok(text=texts[:1])["input_ids"][0] != ours_ids:
        raise RuntimeError("TRL would tokenize the prompts differently from rl_mismatch.")

    tokens, rewards = [], []

    def reward(prompts, completions, completion_ids, row, **kwargs):
        del prompts, kwargs
        B, G = cfg.rollout.prompts_per_step, cfg.rollout.group_size
        step = len(tokens)
        if sorted(row) != [i for i in range(step * B, (step + 1) * B) for _ in range(G)]:
            raise RuntimeError(f"TRL's generation batch {step} holds prompts {sorted(set(row))}, not our step's.")
        scored = tasks.score(completions, [examples[i] for i in row], format_weight=cfg.task.format_weight)
        tokens.append(sum(len(ids) for ids in completion_ids))
        rewards.append(scored["reward/mean"])
        return [float(r) for r in scored["rewards"]]

    class StepTimer(transformers.TrainerCallback):
        def __init__(self):
            self.step_s, self._t0 = [], None

        def on_step_begin(self, args, state, control, **kwargs):
            self._t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.step_s.append(time.perf_counter() - self._t0)

    rollout_s = []

    class Trainer(trl.GRPOTrainer):
        """Times the rollout part of each step: generation, rewards, advantages (TRL's method
        for them; the rest of the step is the loss, backward and optimizer step)."""

        def _generate_and_score_completions(self, inputs):
            start = time.perf_counter()
            try:
                return super()._generate_and_score_completions(inputs)
            finally:
                rollout_s.append(time.perf_counter() - start)

    o = cfg.optim
    timer = StepTimer()
    with tempfile.TemporaryDirectory(prefix="rl_loop_trl_") as output_dir:
        args = trl.GRPOConfig(
            output_dir=output_dir, use_cpu=_TORCH_DEVICE.value == "cpu", bf16=False, fp16=False, seed=cfg.seed,
            max_steps=cfg.steps, per_device_train_batch_size=cfg.rollout.prompts_per_step * cfg.rollout.group_size,
            gradient_accumulation_steps=1, num_generations=cfg.rollout.group_size, num_iterations=1,
            shuffle_dataset=False, max_completion_length=cfg.sampler.max_new_tokens,
            temperature=cfg.sampler.temperature, top_k=0, top_p=1.0, beta=0.0, loss_type="dapo",
            epsilon=cfg.loss.clip_eps_low, epsilon_high=cfg.loss.clip_eps_high, scale_rewards="group",
            learning_rate=o.learning_rate, lr_scheduler_type="constant", warmup_steps=0,
            adam_beta1=o.b1, adam_beta2=o.b2, adam_epsilon=o.eps, weight_decay=o.weight_decay,
            max_grad_norm=o.grad_clip, logging_steps=1, save_strategy="no", report_to="none",
            disable_tqdm=True, dataloader_num_workers=0)
        trainer = Trainer(
            model=model, reward_funcs=reward, args=args, processing_class=hf_tok, callbacks=[timer],
            train_dataset=datasets.Dataset.from_dict({"prompt": texts, "row": list(range(len(texts)))}))
        trainer.train()
    if len(timer.step_s) != cfg.steps or len(tokens) != cfg.steps:
        raise RuntimeError(f"TRL ran {len(timer.step_s)} steps and {len(tokens)} generation batches, "
                           f"expected {cfg.steps} of each (one generation batch per update).")
    out.update(
        precision="fp32", step_s=timer.step_s, compile_s=[0.0] * cfg.steps, tokens=tokens, reward=rewards,
        rollout_s=rollout_s if len(rollout_s) == cfg.steps else [float("nan")] * cfg.steps,
        detail=f"trl {trl.__version__}, transformers {transformers.__version__}, torch {torch.__version__} "
               f"({torch.get_num_threads()} threads, on {_TORCH_DEVICE.value}), "
               f"optim={getattr(args.optim, 'value', args.optim)}, "
               f"gradient_checkpointing={args.gradient_checkpointing}")


def _run_side(side: str, dtype: str, data_dir: str) -> dict:
    """Measures one side in a subprocess of its own; returns its results."""
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        argv = [sys.executable, os.path.abspath(__file__), f"--side={side}", f"--dtype={dtype}",
                f"--data_dir={data_dir}", f"--out={f.name}", f"--steps={_STEPS.value}",
                f"--prompts={_PROMPTS.value}", f"--group={_GROUP.value}",
                f"--max_new_tokens={_MAX_NEW_TOKENS.value}", f"--microbatches={_MICROBATCHES.value}",
                *([f"--remat={_REMAT.value}"] if _REMAT.value else []),
                *([f"--keep_logits={_KEEP_LOGITS.value}"] if _KEEP_LOGITS.value is not None else []),
                f"--torch_threads={_TORCH_THREADS.value}", f"--torch_device={_TORCH_DEVICE.value}"]
        env = dict(os.environ, HF_HUB_OFFLINE="1")  # TRL and transformers need nothing from the Hub.
        start = time.perf_counter()
        # The side's own output (progress, TRL's log dicts) goes to stderr: stdout carries the results.
        subprocess.run(argv, check=True, env=env, stdout=sys.stderr,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        with open(f.name) as results:
            result = json.load(results)
    result["wall_s"] = time.perf_counter() - start
    return result


def _summary(r: dict) -> dict:
    steady, tokens = r["step_s"][1:], r["tokens"][1:]
    median = statistics.median(steady) if steady else float("nan")
    cv = statistics.stdev(steady) / statistics.mean(steady) if len(steady) >= 2 else None
    rollout = statistics.median(r["rollout_s"][1:]) if steady else float("nan")
    update = statistics.median(t - u for t, u in zip(steady, r["rollout_s"][1:])) if steady else float("nan")
    return dict(median=median, rollout=rollout, update=update, first=r["step_s"][0], compile=r["compile_s"][0],
                recompile=sum(r["compile_s"][1:]), tok_s=sum(tokens) / sum(steady) if steady else float("nan"),
                cv=cv, per_hour=3600 / median)


def main(argv):
    del argv
    if _SIDE.value is not None:
        out = {}
        {"ours": _measure_ours, "trl": _measure_trl}[_SIDE.value](out)
        out["peak_rss_gb"] = _peak_rss_gb()
        with open(_OUT.value, "w") as f:
            json.dump(out, f)
        return
    unknown = sorted(set(_DTYPES.value) - set(_SAMPLER_DTYPE))
    if unknown:
        raise app.UsageError(f"--dtypes: unknown {unknown}; known: {sorted(_SAMPLER_DTYPE)}.")
    if not _SKIP_TRL.value:
        try:
            import trl  # noqa: F401  (fail now, not after our runs)
        except ImportError:
            sys.exit("TRL is not installed: pip install -e '.[bench]' (or pass --skip_trl).")
    import jax

    rows = _PROMPTS.value * _GROUP.value
    print(f"machine: {machine()}\n"
          f"SmolLM2-135M-Instruct, {_CONFIG_FILE} task; {_STEPS.value} RL steps per side, {_PROMPTS.value} prompts x "
          f"{_GROUP.value} samples = {rows} rows, <= {_MAX_NEW_TOKENS.value} new tokens, temperature 1; "
          f"jax {jax.__version__}; each side in its own subprocess, one after the other", flush=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="rl_loop_data_") as data_dir:
        for dtype in _DTYPES.value:
            results.append(("ours", _run_side("ours", dtype, data_dir)))
        if not _SKIP_TRL.value:
            results.append(("TRL", _run_side("trl", "fp32", data_dir)))

    summaries = [(side, r, _summary(r)) for side, r in results]
    trl_median = next((s["median"] for side, _, s in summaries if side == "TRL"), None)
    print("\n| side | precision | steady s/step | first step s (compile s) | gen tok/s | step CV | peak RSS GB "
          "| RL steps/h | ours / TRL |")
    print("|---|---|---|---|---|---|---|---|---|")
    for side, r, s in summaries:
        cv = "-" if s["cv"] is None else f"{s['cv']:.1%}"
        first = f"{s['first']:.1f}" + (f" ({s['compile']:.1f})" if side == "ours" else "")
        ratio = f"{trl_median / s['median']:.2f}x" if trl_median and side == "ours" else "-"
        print(f"| {side} | {r['precision']} | {s['median']:.2f} | {first} | {s['tok_s']:.1f} | {cv} | "
              f"{r['peak_rss_gb']:.2f} | {s['per_hour']:.0f} | {ratio} |")
    print()
    for side, r, s in summaries:
        recompiled = f"; recompiled {s['recompile']:.1f} s after step 0" if s["recompile"] else ""
        print(f"{side} ({r['precision']}): {r['detail']}; steady step: rollout {s['rollout']:.2f} s (sampling, "
              f"scoring) + update {s['update']:.2f} s (medians); step s {' '.join(f'{t:.2f}' for t in r['step_s'])}; "
              f"tokens/step {' '.join(f'{t:.0f}' for t in r['tokens'])}; reward/mean "
              f"{' '.join(f'{x:.2f}' for x in r['reward'])}{recompiled}; subprocess {r['wall_s']:.0f} s")
    ours_fp32 = next((s for side, r, s in summaries if side == "ours" and r["precision"].startswith("fp32")), None)
    if trl_median and ours_fp32:
        ratio = trl_median / ours_fp32["median"]
        print(f"\ntarget: ours >= 3x TRL's RL steps per hour at the same precision (fp32): {ratio:.2f}x, "
              f"{'met' if ratio >= 3 else 'not met'}")


if __name__ == "__main__":
    restart_with_huge_pages()  # as the main job runs (rl_mismatch.host_memory)
    app.run(main)
