"""The RL experiment loop: sample -> reward -> advantages -> train step, with metrics and checkpoints.

:func:`run` is what ``experiments/train.py`` calls with an
:class:`~rl_mismatch.experiment_config.ExperimentConfig`. One step ``s`` (0-based; the
``TrainState.step`` before it is ``s``):

.. code-block:: text

  prompts   = PromptBatches[s]                   this process's slice of the global batch
  sampler   = sync_weights(trainer params -> sampler dtype, sampler layout)
  rollout   = generate(sampler, prompts, fold_in(rollout_key, s))
  rewards   = tasks.score(decode(rollout)) [+ overlong penalty]
  A         = compute_advantages(rewards, G)     group baseline over the global batch
  batch     = TrainBatch(rollout trimmed to the KV-cache size its longest response ended in, A)
  state, m  = train_step(state, batch, response_length=mean |y|
                         [, k3=the previous step's mismatch/k3, with the k3 trigger on])
              (the step rescores with the trainer and reports mismatch/*, is/*, opt/*, lr/scale)
  metrics   = reward/*, rollout/*, time/* on the host + m, written one step late
  checkpoint every ``checkpoint.every`` steps and after the last

Metrics per step (``metrics.jsonl`` and TensorBoard): the train step's ``loss/*``, ``is/*``,
``mismatch/*``, ``opt/*`` and ``lr/*`` (``lr/scale``, the multiplier in force; ``lr/value``, the
learning rate in force, ``optim.learning_rate`` x ``lr/scale``; and per detector
``lr/<length|k3>_trigger/{scale,surge_step}``); ``reward/{mean,std,accuracy,format,
overlong_penalty,zero_advantage_groups}``; ``rollout/{response_length_mean,_max,_min,
finished_frac,prompt_length_mean,prompt_width,response_width,packed_width}`` (``response_width``:
the response columns the update ran on, `rl_mismatch.sampler.response_bucket`; ``packed_width``:
the columns each group's responses took end to end when the update packed them, 0 when it did
not, `rl_mismatch.train_step.packed_width`). Timings: ``time/step_s`` (the
wall time of one pass of the loop) is the sum of ``time/eval_s`` (below), ``time/sample_s`` (the
weight sync and generation), ``time/score_s`` (decoding, rewards, advantages), ``time/train_s``
(the update, waited for), ``time/write_s`` (everything after the update: this step's host metrics
and sampled replies, and writing the previous step's metrics row and sampled replies) and
``time/checkpoint_s`` (saving the state after the previous step when a checkpoint is
due: the metrics file's fsync and the save's synchronous part, and on a CPU backend the wait for
its background write before the update); ``time/tokens_per_s`` is the generated tokens over
``time/sample_s``, and ``time/compile_s`` the seconds JAX spent tracing and compiling during the
step, summed over the threads that compiled (the first step's compile time, and any recompilation
later; it is part of the phase that compiled). The first step's update compiles in a thread of its
own while the sampler compiles and samples, for the shapes its batch most likely has (the widest
response bucket, unpacked); where the batch has other shapes, the update compiles when it runs.
Where the first step evaluates first, its sampler's program compiles beside the evaluation.
``time/cpu_user_s`` and ``time/cpu_system_s`` are the CPU seconds the process used during the step,
all threads, in user code and in the kernel (page faults, file writes): a step slower than its
neighbours with more system time points at the host's memory, not the code (docs/profiling.md).
With ``eval.every > 0``, every ``eval.every``-th step also carries ``eval/*``, the greedy accuracy
on the task's eval split (``rl_mismatch.evaluation``) of the policy that samples the step, and
``time/eval_s``; after the last update, a row of its own at step ``steps`` holds the trained
policy's ``eval/*``. Every ``log.samples_every``-th step writes ``log.samples_per_step`` of its
rollouts (question, reply, reward) to ``samples.jsonl`` and TensorBoard. The console shows one
line per step (:mod:`rl_mismatch.console`) and, at the end, a summary of the run.
With ``log.profile_step = s``, step ``s`` runs under a ``jax.profiler`` trace written to
``<workdir>/profile`` (docs/profiling.md).

Determinism and resumption. Every random draw comes from keys derived from ``config.seed``
(``fold_in(key, step)`` per step), the prompt stream is a pure function of ``(seed, step)``,
and the checkpoint holds the train state, the rollout key and the data position. A resumed run
(same command, same workdir) therefore recomputes exactly the steps an uninterrupted run
would have; the metrics file drops the rows of steps after the checkpoint first.

Multi-host: call ``jax.distributed.initialize`` before :func:`run`. Each process reads its own
``B / n`` prompts, the prompt tokens are gathered so the sampler runs one global batch on the
global mesh (so the samples do not depend on the process count), each process scores its own
rows, and rewards are gathered for the advantages. Process 0 writes the metrics.

Bad input fails at start-up with a ``ValueError`` naming it (unwritable workdir, a task with no
examples, a prompt longer than the context, a config that does not match the checkpoint in the
workdir); a non-finite reward stops the run at the step that produced it, after saving the
last good state and writing every finished step's metrics.

Faults. A run holds an exclusive lock on its workdir (``rl_mismatch.workdir_lock``): a second
process there stops at once, naming the holder. A finished run started again says so and
returns before loading anything. An unreadable newest checkpoint is set aside and the run
resumes from the one before (``rl_mismatch.checkpointing``); the metrics file is checked on
resume (``rl_mismatch.metric_writing``). A background save that fails stops the run at the next
step; a failed write raises ``RunIOError`` naming the step, and "Saved" is logged only once a
save is on disk.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import resource
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx
from jax.experimental import multihost_utils

from rl_mismatch import console, evaluation, host_memory, losses, sampler, tasks, train_step
from rl_mismatch import sharding as shd
from rl_mismatch.buckets import round_up
from rl_mismatch.checkpointing import Checkpointer, abstract_like
from rl_mismatch.experiment_config import (
    JSONL_TASK_NAME,
    TINY_MODEL,
    ExperimentConfig,
    ModelSettings,
    TaskSettings,
    config_differences,
)
from rl_mismatch.metric_writing import MetricWriter, Row, fetch_to_host, read_metrics
from rl_mismatch.precision import make_loss_scale, parse_dtype
from rl_mismatch.workdir_lock import WorkdirLock

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"
PROFILE_DIR = "profile"  # Under the workdir: the jax.profiler trace of step log.profile_step.

# Streams of the root key: fold_in(root, stream). Fixed numbers, so adding a stream later does
# not change the draws of the existing ones.
_MODEL_INIT, _ROLLOUT, _TRAIN = 0, 1, 2


# --------------------------------------------------------------------------------------------
# Compile time


class _CompileClock:
    """Seconds JAX spent tracing, lowering and compiling, from jax.monitoring events."""

    def __init__(self):
        self._lock = threading.Lock()
        self.seconds = 0.0
        jax.monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, event: str, duration: float, **kwargs: Any) -> None:
        del kwargs
        if event.startswith("/jax/core/compile/"):
            with self._lock:
                self.seconds += duration


_clock: _CompileClock | None = None


def _compile_seconds() -> float:
    global _clock
    if _clock is None:  # Registered once per process; listeners cannot be removed.
        _clock = _CompileClock()
    return _clock.seconds


def _cpu_seconds() -> tuple[float, float]:
    """(user, system) CPU seconds this process has used so far, all its threads."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime, usage.ru_stime


# --------------------------------------------------------------------------------------------
# Set-up pieces (each usable on its own)


def prepare_workdir(workdir: str | os.PathLike) -> str:
    """Creates ``workdir`` and checks it is writable; returns its absolute path.

    Raises:
      ValueError: it cannot be created or written, with the reason.
    """
    path = os.path.abspath(os.path.expanduser(os.fspath(workdir)))
    probe = os.path.join(path, f".write_test.{os.getpid()}")
    try:
        os.makedirs(path, exist_ok=True)
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise ValueError(
            f"The workdir {path!r} is not a writable directory ({e.strerror or e}); checkpoints and "
            "metrics go there. Pass a --workdir you can write to.") from e
    return path


def load_model(settings: ModelSettings, *, dtype: Any, key: jax.Array, remat: str = "layer"):
    """The trainer's model (float32 master weights computing in ``dtype``, ``Decoder(remat=)``)
    and its tokenizer."""
    from rl_mismatch.models import Decoder, load_pretrained, tiny_chat_tokenizer, tiny_config

    if settings.source == TINY_MODEL:
        tok = tiny_chat_tokenizer()
        vocab = round_up(tok.vocab_size, multiple=8)  # So a model axis of 2, 4 or 8 divides it.
        config = tiny_config(vocab_size=vocab, max_seq_len=settings.tiny_max_seq_len)
        seed = int(jax.random.randint(key, (), 0, 2**31 - 1))
        return Decoder(config, dtype=dtype, param_dtype=jnp.float32, remat=remat, rngs=nnx.Rngs(seed)), tok
    return load_pretrained(settings.source, dtype=dtype, param_dtype=jnp.float32,
                           cache_dir=settings.cache_dir or None, remat=remat)


def prepare_task(settings: TaskSettings, data_dir: str) -> str:
    """Builds (or reuses) the task's dataset under ``data_dir``; returns its tfds name."""
    if settings.name == JSONL_TASK_NAME:
        return tasks.prepare_jsonl(settings.jsonl_path, data_dir, eval_size=0, seed=settings.seed)
    return tasks.prepare_reasoning_gym(settings.name, data_dir, train_size=settings.train_size,
                                       eval_size=settings.eval_size, seed=settings.seed, **settings.kwargs)


def overlong_penalty(lengths_B: np.ndarray, max_new_tokens: int, buffer: int, weight: float) -> np.ndarray:
    """DAPO's soft overlong punishment: ``−weight · clip((|y| − (N − L)) / L, 0, 1)``.

    ``N`` = ``max_new_tokens``, ``L`` = ``buffer`` (0: no penalty). A response that uses the whole
    budget (truncated) gets ``−weight``; one shorter than ``N − L`` gets 0.

    >>> overlong_penalty(np.array([2, 6, 8]), 8, 4, 1.0).tolist()
    [0.0, -0.5, -1.0]
    """
    if buffer <= 0:
        return np.zeros(len(lengths_B), np.float32)
    excess = (np.asarray(lengths_B, np.float32) - (max_new_tokens - buffer)) / buffer
    return (0.0 - weight * np.clip(excess, 0.0, 1.0)).astype(np.float32)  # 0 - x: no -0.0


# --------------------------------------------------------------------------------------------
# Multi-host helpers


def _gather_rows(*arrays: np.ndarray) -> tuple[np.ndarray, ...]:
    """Each array's rows of this process -> its global rows (process order), on every process.

    The arrays share their leading (row) dimension and travel as the columns of one array of
    their common dtype (``np.result_type``: exact for the bool/int/float mixes used here), so
    a step costs one collective per call, not one per array.
    """
    arrays = tuple(np.asarray(a) for a in arrays)
    if jax.process_count() == 1:
        return arrays
    common = np.result_type(*arrays)
    widths = [int(np.prod(a.shape[1:], dtype=np.int64)) for a in arrays]
    packed = np.concatenate([a.astype(common).reshape(len(a), w) for a, w in zip(arrays, widths)], axis=1)
    gathered = np.asarray(multihost_utils.process_allgather(packed, tiled=True))
    columns = np.split(gathered, np.cumsum(widths)[:-1], axis=1)
    return tuple(c.reshape(-1, *a.shape[1:]).astype(a.dtype) for c, a in zip(columns, arrays))


def _replicated_key(seed: int, stream: int, mesh: jax.sharding.Mesh) -> jax.Array:
    """``fold_in(key(seed), stream)`` as a global array replicated over ``mesh`` (what a multi-host
    checkpoint needs). Made by a jitted function with that output sharding: ``device_put`` of a
    typed key onto other processes' devices is unsupported, and one wrapped from global key data
    has broken shards (jax 0.10)."""
    return jax.jit(lambda: jax.random.fold_in(jax.random.key(seed), stream), out_shardings=shd.replicated(mesh))()


# --------------------------------------------------------------------------------------------
# The run


def _loss_scale(cfg: ExperimentConfig):
    dtype = parse_dtype(cfg.trainer.dtype)
    if dtype == jnp.float16:
        return make_loss_scale(dtype, initial_scale=cfg.trainer.loss_scale_initial,
                               growth_interval=cfg.trainer.loss_scale_growth_interval)
    return make_loss_scale(dtype)


def load_trained(workdir: str | os.PathLike, step: int | None = None):
    """The policy of a run in ``workdir`` at a checkpoint, to look at what it answers.

    Args:
      workdir: a run directory of :func:`run` (its ``config.json`` and ``checkpoints/``).
      step: the checkpoint (default: the latest); 0 gives the starting model.

    Returns:
      ``(cfg, model, tokenizer, step)``: the run's config, a ``Decoder`` holding the float32
      master weights of that step (computing in the trainer's dtype), its tokenizer, the step.

    Raises:
      ValueError: no run in ``workdir``, or no such checkpoint.
    """
    workdir = os.fspath(workdir)
    try:
        with open(os.path.join(workdir, CONFIG_FILE), encoding="utf-8") as f:
            cfg = ExperimentConfig.from_dict(json.load(f))
    except FileNotFoundError:
        raise ValueError(f"{workdir!r} holds no run ({CONFIG_FILE} is missing); pass a run directory.") from None
    mesh = shd.make_mesh(1, 1)
    model, tok = load_model(cfg.model, dtype=parse_dtype(cfg.trainer.dtype),
                            key=jax.random.fold_in(jax.random.key(cfg.seed), _MODEL_INIT))
    if step == 0:
        return cfg, model, tok, 0
    graphdef, state = train_step.init_train_state(
        model, cfg.optim.optimizer(), compute_dtype=parse_dtype(cfg.trainer.dtype),
        key=_replicated_key(cfg.seed, _TRAIN, mesh), mesh=mesh, loss_scale=_loss_scale(cfg))
    loop = {"train": state, "rollout_key": _replicated_key(cfg.seed, _ROLLOUT, mesh)}
    ckpt = Checkpointer(os.path.join(workdir, CHECKPOINT_DIR), max_to_keep=cfg.checkpoint.max_to_keep)
    try:
        step = ckpt.latest_step() if step is None else step
        if step is None:
            raise ValueError(f"{workdir!r} has no checkpoint yet; pass step=0 for the starting model.")
        loop, _ = ckpt.restore(abstract_like(loop), step)
    finally:
        ckpt.close()
    return cfg, nnx.merge(graphdef, loop["train"].params), tok, step


def _make_evaluator(cfg: ExperimentConfig, split: tasks.TaskSplit, tok: Any, sampling: sampler.SamplingConfig,
                    max_prompt_len: int, score_fns: Mapping[str, tasks.rewards.ScoreFn] | None
                    ) -> evaluation.Evaluator:
    """The run's held-out evaluation (``cfg.eval``): prompts and reward as the rollouts'."""
    n_proc = jax.process_count()
    return evaluation.Evaluator(
        split, tok, sampling=sampling, batch_size=cfg.eval.batch_size or len(split),
        max_prompt_len=max_prompt_len, max_new_tokens=cfg.eval.max_new_tokens or None,
        system_prompt=cfg.task.system_prompt or None, format_weight=cfg.task.format_weight, score_fns=score_fns,
        shard_options=grain.sharding.ShardOptions(shard_index=jax.process_index(), shard_count=n_proc),
        pad_to=max_prompt_len if n_proc > 1 else None, gather_rows=_gather_rows)


def _write_config(workdir: str, cfg: ExperimentConfig) -> None:
    tmp = os.path.join(workdir, CONFIG_FILE + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(cfg.to_dict(), f, indent=1, sort_keys=True)
    os.replace(tmp, os.path.join(workdir, CONFIG_FILE))


def _sampled_replies(cfg: ExperimentConfig, examples, scores: Mapping[str, Any], host: Mapping[str, np.ndarray],
                     row_slice: slice) -> list[dict[str, Any]]:
    """``cfg.log.samples_per_step`` of this process's rollouts for ``samples.jsonl``: the first
    reply to each prompt, then the second, ... (rows are grouped by prompt)."""
    group, responses = cfg.rollout.group_size, scores["responses"]
    prompts = len(responses) // group
    rows = [(i % prompts) * group + i // prompts for i in range(min(cfg.log.samples_per_step, len(responses)))]
    rewards, correct = scores["rewards"][row_slice], scores["correct"][row_slice]
    lengths, finished = host["lengths"][row_slice], host["finished"][row_slice]
    return [{"question": examples[r]["question"], "answer": examples[r]["answer"], "response": responses[r],
             "reward": float(rewards[r]), "correct": bool(correct[r]), "length": int(lengths[r]),
             "finished": bool(finished[r])} for r in rows]


def run(cfg: ExperimentConfig, workdir: str | os.PathLike, *,
        score_fns: Mapping[str, tasks.rewards.ScoreFn] | None = None,
        on_row: Callable[[Row], None] | None = None) -> Row | None:
    """Runs (or resumes) the RL experiment ``cfg`` in ``workdir`` up to ``cfg.steps`` steps.

    Args:
      cfg: the validated experiment settings.
      workdir: run directory: ``config.json``, ``metrics.jsonl``, ``tensorboard/``,
        ``checkpoints/`` and (by default) ``data/``. A workdir with a checkpoint is resumed.
      score_fns: optional ``{task: fn(answer, entry) -> float}`` verifiers overriding the
        built-in ones (see :func:`rl_mismatch.tasks.score`).
      on_row: called with each metrics row once it is written (process 0), e.g. for progress.

    Returns:
      The last metrics row written (None if there was nothing left to run).

    Raises:
      ValueError: bad input (see the module docstring), with the reason; a
        ``CheckpointUnreadableError`` when no checkpoint in the workdir can be read.
      WorkdirBusyError: another process is running in ``workdir``.
      RunIOError: a write failed (metrics or checkpoint), naming the step and the checkpoint a
        rerun resumes from.
    """
    if cfg.model.source != TINY_MODEL:
        from rl_mismatch.models.loading import resolve_source

        resolve_source(cfg.model.source)  # An unknown model fails here, before anything is written.
    if jax.process_index() == 0:
        workdir = prepare_workdir(workdir)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("rl_mismatch:workdir")
    workdir = os.path.abspath(os.fspath(workdir))
    with WorkdirLock(workdir, jax.process_index()):
        row = None if _finished(cfg, workdir) else _run(cfg, workdir, score_fns=score_fns, on_row=on_row)
    if jax.process_index() == 0:
        for line in console.summary(workdir, read_metrics(workdir), cfg.steps):
            logging.info("%s", line)
    return row


class RunIOError(OSError):
    """A run stopped on a failed write (a full disk, a read-only file system); the message names
    the step, the cause, and the checkpoint a rerun resumes from."""


def _finished(cfg: ExperimentConfig, workdir: str) -> bool:
    """Whether the workdir's run already has all ``cfg.steps`` steps (checked before anything
    heavy is loaded). A run with other settings is refused here too."""
    directory = os.path.join(workdir, CHECKPOINT_DIR)
    if not os.path.isdir(directory):
        return False
    ckpt = Checkpointer(directory, max_to_keep=cfg.checkpoint.max_to_keep)
    try:
        latest = ckpt.latest_step()
        meta = None if latest is None else ckpt.metadata(latest)
    except ValueError:
        return False  # Damaged: the restore decides, falling back to an older checkpoint.
    finally:
        ckpt.close()
    if meta is None:
        return False
    changed = config_differences(meta["config"], cfg.to_dict())
    if changed:
        raise ValueError(
            f"The workdir {workdir!r} holds a run (checkpoint {latest}) with other settings: "
            f"{'; '.join(changed)}. Use a new --workdir, or the settings the run was started with.")
    if int(meta["data_position"]) < cfg.steps:
        return False
    logging.info("The run in %s is finished: it has all its %d steps (checkpoint %d). Nothing to do.", workdir,
                 cfg.steps, latest)
    return True


def _run(cfg: ExperimentConfig, workdir: str, *,
         score_fns: Mapping[str, tasks.rewards.ScoreFn] | None, on_row: Callable[[Row], None] | None) -> Row | None:
    """`run`'s body, in a locked workdir."""
    return _Run(cfg, workdir, score_fns=score_fns, on_row=on_row).run()


@dataclasses.dataclass
class _Parts:
    """What a run builds before its first step (:func:`_build`)."""

    mesh: jax.sharding.Mesh  # The trainer's.
    sampler_mesh: jax.sharding.Mesh  # The sampler's: ``mesh`` itself unless mesh.sampler_* give it devices of its own.
    tok: Any
    batches: tasks.PromptBatches
    sampling: sampler.SamplingConfig
    evaluator: evaluation.Evaluator | None
    graphdef: Any
    step_fn: Callable
    loop: dict[str, Any]  # The train state and the rollout key: what a checkpoint holds.
    max_seq_len: int  # The model's positions: the sampler pads prompts for them (`sampler.padded_prompts`).


def _build(cfg: ExperimentConfig, workdir: str, score_fns) -> _Parts:
    """The data (first: a bad task fails in seconds), the model, the sampler's settings, the
    evaluator, the train state and the compiled-on-first-use train step."""
    n_proc = jax.process_count()
    mesh, sampler_mesh = shd.make_meshes(cfg.mesh.data, cfg.mesh.model, cfg.mesh.sampler_data, cfg.mesh.sampler_model)
    rows_per_step = cfg.rollout.prompts_per_step * cfg.rollout.group_size
    if rows_per_step % mesh.shape[shd.DATA]:
        raise ValueError(f"rollout.prompts_per_step * group_size = {rows_per_step} rows must be a multiple of "
                         f"the mesh's data axis ({mesh.shape[shd.DATA]}).")

    # Process 0 builds the dataset, the others then reuse it (two concurrent builds of one
    # dataset would race on tfds' final rename).
    data_dir = cfg.task.data_dir or os.path.join(workdir, "data")
    name = prepare_task(cfg.task, data_dir) if jax.process_index() == 0 else None
    if n_proc > 1:
        multihost_utils.sync_global_devices("rl_mismatch:data")
        name = name or prepare_task(cfg.task, data_dir)
    split = tasks.load_split(name, tasks.TRAIN_SPLIT, data_dir)

    trainer_dtype = parse_dtype(cfg.trainer.dtype)
    logging.info("Loading the model %r (trainer %s, sampler %s).", cfg.model.source, cfg.trainer.dtype,
                 cfg.sampler.dtype)
    model, tok = load_model(cfg.model, dtype=trainer_dtype, key=jax.random.fold_in(jax.random.key(cfg.seed),
                                                                                  _MODEL_INIT),
                            remat=cfg.trainer.remat)
    N = cfg.sampler.max_new_tokens
    context = model.config.max_seq_len
    max_prompt_len = cfg.rollout.max_prompt_len or context - N
    if max_prompt_len < 1 or max_prompt_len + N > context:
        raise ValueError(
            f"The model's context is {context} tokens; rollout.max_prompt_len={cfg.rollout.max_prompt_len} plus "
            f"sampler.max_new_tokens={N} does not fit. Lower max_new_tokens or max_prompt_len.")
    system_prompt = cfg.task.system_prompt or None
    # Every prompt once, now: a too-long prompt fails here, named, not at the step that draws it.
    longest = tasks.check_prompt_lengths(split, tok, max_prompt_len=max_prompt_len, system_prompt=system_prompt)
    bucket = cfg.rollout.prompt_bucket or round_up(longest, multiple=8, maximum=max_prompt_len)
    batches = tasks.PromptBatches(
        split, tok, batch_size=cfg.rollout.prompts_per_step, group_size=cfg.rollout.group_size,
        max_prompt_len=max_prompt_len, seed=cfg.seed % 2**32, min_bucket=min(bucket, max_prompt_len),
        pad_to=max_prompt_len if n_proc > 1 else None, system_prompt=system_prompt,
        shard_options=grain.sharding.ShardOptions(shard_index=jax.process_index(), shard_count=n_proc))
    sampling = sampler.SamplingConfig(
        max_new_tokens=N, temperature=cfg.sampler.temperature, top_k=cfg.sampler.top_k, top_p=cfg.sampler.top_p,
        eos_ids=(tok.eos_id,), pad_id=tok.pad_id, return_entropy=cfg.sampler.return_entropy, prompt_bucket=bucket,
        cache_segment=cfg.sampler.cache_segment)
    evaluator = _make_evaluator(cfg, tasks.load_split(name, tasks.EVAL_SPLIT, data_dir), tok, sampling,
                                max_prompt_len, score_fns) if cfg.eval.every else None

    optimizer = cfg.optim.optimizer()
    loss_scale = _loss_scale(cfg)
    graphdef, state = train_step.init_train_state(
        model, optimizer, compute_dtype=trainer_dtype, key=_replicated_key(cfg.seed, _TRAIN, mesh),
        mesh=mesh, loss_scale=loss_scale)
    del model  # The train state owns the weights now.
    step_fn = train_step.make_train_step(
        graphdef, optimizer, cfg.loss, compute_dtype=trainer_dtype,
        n_microbatches=cfg.trainer.n_microbatches, mesh=mesh, loss_scale=loss_scale,
        temperature=cfg.sampler.temperature, keep_logits=cfg.trainer.keep_logits,
        share_prompts=cfg.trainer.share_prompts)
    loop = {"train": state, "rollout_key": _replicated_key(cfg.seed, _ROLLOUT, mesh)}
    return _Parts(mesh, sampler_mesh, tok, batches, sampling, evaluator, graphdef, step_fn, loop, context)


class _Run:
    """One run's loop (:meth:`run`), its state between steps, and what it does when it stops
    on an error (:meth:`_stop`)."""

    def __init__(self, cfg: ExperimentConfig, workdir: str, *, score_fns, on_row):
        self.cfg, self.workdir, self.score_fns = cfg, workdir, score_fns
        self.primary = jax.process_index() == 0
        self.parts = _build(cfg, workdir, score_fns)
        self.sampler_dtype = parse_dtype(cfg.sampler.dtype)
        self.ckpt = Checkpointer(os.path.join(workdir, CHECKPOINT_DIR), max_to_keep=cfg.checkpoint.max_to_keep)
        # A save writes in the background while the step samples. On a CPU backend its host copy
        # of the state and the update's buffers share the same memory, and the update is the
        # step's memory peak: the save is finished before the update there, so the two peaks do
        # not add. On an accelerator the update's buffers are device memory and the save goes on.
        self.save_done_before_update = jax.default_backend() == "cpu"
        self.loop = self.parts.loop
        # The k3 signal is the previous step's (the current one is computed inside the step); None
        # before the first step, which the detector ignores. Checkpointed with the data position.
        self.last_k3: Any = None
        try:  # A refused checkpoint or an unwritable file leaves no checkpointer open.
            self.start = self._restore()
            if self.primary:
                _write_config(workdir, cfg)
            self.writer = MetricWriter(workdir, resume_step=self.start, enabled=self.primary,
                                       tensorboard=cfg.log.tensorboard, on_row=self._row_callback(on_row))
        except BaseException:
            self.ckpt.close()
            raise
        self.completed = self.start  # Steps whose update is in `self.loop`.
        self.early_compile: threading.Thread | None = None  # `_compile_update_early`'s thread.
        self.update_end = 0.0  # When the last step's update was done (perf_counter seconds).
        self.state_intact = True  # False while a step holds the donated state.
        local_rows = self.parts.batches.local_batch_size * cfg.rollout.group_size
        self.row_slice = slice(jax.process_index() * local_rows, (jax.process_index() + 1) * local_rows)

    def _row_callback(self, on_row: Callable[[Row], None] | None) -> Callable[[Row], None]:
        """What runs as each metrics row is written: the step line (process 0), then ``on_row``."""
        log_row = console.StepLog(self.cfg.steps, self.cfg.log.every, logging.info) if self.primary else None

        def row_written(row: Row) -> None:
            for callback in (log_row, on_row):
                if callback is not None:
                    callback(row)

        return row_written

    def _restore(self) -> int:
        """Restores the newest checkpoint into ``self.loop``; returns the first step to run."""
        if self.ckpt.latest_step() is None:
            return 0
        # One process falls back past an unreadable checkpoint on its own; several processes
        # restore the newest, or all fail (a fallback by one alone would split the run).
        newest = None if jax.process_count() == 1 else self.ckpt.latest_step()
        self.loop, meta = self.ckpt.restore(abstract_like(self.loop), step=newest)
        changed = config_differences(meta["config"], self.cfg.to_dict())
        if changed:
            raise ValueError(
                f"The workdir {self.workdir!r} holds a run (checkpoint {meta['data_position']}) with other "
                f"settings: {'; '.join(changed)}. Use a new --workdir, or the settings the run was started with.")
        self.last_k3 = meta.get("last_k3")
        logging.info("Resuming from checkpoint %d in %s.", int(meta["data_position"]), self.ckpt.directory)
        return int(meta["data_position"])

    def run(self) -> Row | None:
        cfg = self.cfg
        if self.start < cfg.steps:
            logging.info("Step %d: compiling the sampler and the train step (the first step takes longer).",
                         self.start)
        if cfg.log.profile_step >= 0 and not self.start <= cfg.log.profile_step < cfg.steps:
            logging.warning("log.profile_step = %d is not a step this run takes (%d to %d): no trace.",
                            cfg.log.profile_step, self.start, cfg.steps - 1)
        step = self.start
        if self.start < cfg.steps:
            self.early_compile = self._compile_update_early(self.start)
        # Free host memory back to the OS: the loader's float32 copy of the weights (or a
        # restore's buffers) now, the first step's compilation after it (`host_memory`).
        host_memory.release_free_memory()
        try:
            for step in range(self.start, cfg.steps):
                self.ckpt.check()  # A failed background save stops the run now, not at the next save.
                t0, c0, cpu0 = time.perf_counter(), _compile_seconds(), _cpu_seconds()
                self._save_if_due(step)  # The state after the previous step.
                t1 = time.perf_counter()
                host_metrics, device_metrics, samples = self._traced_step(step)
                # The save's start here, and its end if the step waited for it before the update.
                host_metrics["time/checkpoint_s"] += t1 - t0
                self.writer.hold(step, host_metrics, device_metrics)
                # Only now does a save cover this step: its row is held and `last_k3` is its k3, so
                # a save after an error here continues exactly.
                self.state_intact, self.completed = True, step + 1
                self.writer.write_samples(step, samples)
                self.writer.flush(keep_newest=True)  # The previous step's row.
                t3 = time.perf_counter()
                user, system = (now - before for now, before in zip(_cpu_seconds(), cpu0))
                times = {"time/write_s": t3 - self.update_end, "time/step_s": t3 - t0,
                         "time/compile_s": _compile_seconds() - c0,
                         "time/cpu_user_s": user, "time/cpu_system_s": system}
                self.writer.amend(step, times)
                if step == self.start:
                    logging.info("First step (%d): %.1f s; tracing and compiling took %.1f s, summed over the "
                                 "threads that compiled.", step, times["time/step_s"], times["time/compile_s"])
                    host_memory.release_free_memory()
            self._save_if_due(cfg.steps)
            if self.parts.evaluator is not None:
                # The trained policy: a row of its own at step `steps` (no update follows it). A
                # rerun that extends the run drops it with the other rows from its start on.
                t0 = time.perf_counter()
                with self._sampler_model() as sampler_model:
                    final = self.parts.evaluator(sampler_model, mesh=self.parts.sampler_mesh)
                self.writer.hold(cfg.steps, {**final, "time/eval_s": time.perf_counter() - t0})
            row = self.writer.flush()
            self.writer.close()
            self.ckpt.wait()  # The last save is on disk (or its failure raised) before the run says it is done.
            return row
        except BaseException as e:
            self._stop(e, step)
        finally:
            self._join_early_compile()
            try:
                self.ckpt.close()
            except Exception as e:  # Raised by wait() already on success; after an error, secondary.
                logging.error("%s", e)

    def _compile_update_early(self, step: int) -> threading.Thread | None:
        """Starts compiling ``step``'s update in a thread of its own, beside the sampler's
        compilation and sampling, for the shapes its batch will most likely have: the prompt
        width the sampler pads these prompts to, the widest response bucket, no packing. Two
        compilations then run on two cores instead of one after the other. Where the batch turns
        out otherwise (shorter replies, a packed update), the update compiles as it would have.
        None with several processes (`_in_background`)."""
        cfg, parts = self.cfg, self.parts
        if jax.process_count() > 1:
            return None
        batch = parts.batches[step]
        tokens_BP, _ = sampler.padded_prompts((batch.tokens_BP, batch.valid_BP), parts.sampling, parts.max_seq_len)
        rows, prompt_width = tokens_BP.shape
        shapes = train_step.TrainBatch.shapes(
            rows, prompt_width, sampler.response_bucket(cfg.sampler.max_new_tokens, parts.sampling),
            with_entropy=cfg.sampler.return_entropy, group=cfg.rollout.group_size)
        signals = {"response_length": jax.ShapeDtypeStruct((), jnp.float32)}
        if cfg.optim.k3_trigger_threshold > 0:
            signals["k3"] = jax.ShapeDtypeStruct((), jnp.float32)
        return self._in_background("compile-update", parts.step_fn.precompile, self.loop["train"], shapes, **signals)

    @staticmethod
    def _in_background(name: str, compile_fn: Callable, *args, **kwargs) -> threading.Thread | None:
        """Runs ``compile_fn(*args, **kwargs)``, a compilation ahead of the call that needs it, in a
        thread of its own (None with several processes: each would lower a global program on its
        own schedule). A failure is only logged: the call itself then compiles, and raises what
        is wrong."""
        if jax.process_count() > 1:
            return None

        def run():
            try:
                compile_fn(*args, **kwargs)
            except Exception as e:
                logging.warning("Compiling ahead (%s) failed; the program compiles when it runs: %s", name, e)

        thread = threading.Thread(target=run, name=name, daemon=True)
        thread.start()
        return thread

    def _join_early_compile(self) -> None:
        """Waits for `_compile_update_early`'s compilation, if one is under way: the update must
        not compile the same program a second time beside it."""
        thread, self.early_compile = self.early_compile, None
        if thread is not None:
            thread.join()

    @contextlib.contextmanager
    def _sampler_model(self):
        """The weight sync: the float32 master weights in the sampler's dtype and layout, released
        when the block ends (`sampler.release_weights`: freed now, not at Python's next cyclic
        collection, so the copies of earlier steps do not pile up). An fp32 copy's arrays are the
        master weights, which the update then donates."""
        model = sampler.sync_weights(nnx.merge(self.parts.graphdef, self.loop["train"].params), self.sampler_dtype,
                                     self.parts.sampler_mesh)
        try:
            yield model
        finally:
            sampler.release_weights(model)

    def _traced_step(self, step: int) -> tuple[dict[str, Any], Any, list[dict[str, Any]]]:
        """:meth:`_step`, under a ``jax.profiler`` trace if ``log.profile_step`` is ``step``. The
        trace stops once the step's device metrics are computed, so it holds the step's work; the
        step's ``time/step_s`` then includes writing the trace."""
        if step != self.cfg.log.profile_step:
            return self._step(step)
        directory = os.path.join(self.workdir, PROFILE_DIR)
        if jax.process_count() > 1:  # One trace folder per process: their names could clash.
            directory = os.path.join(directory, f"process_{jax.process_index()}")
        # Also a perfetto_trace.json.gz, which ui.perfetto.dev opens with no install.
        with jax.profiler.trace(directory, create_perfetto_trace=True):
            outputs = self._step(step)
            jax.block_until_ready(outputs[1])
        logging.info("Step %d: profiler trace written under %s/plugins/profile; open it with TensorBoard's "
                     "profile plugin (tensorboard --logdir %s) or load its perfetto_trace.json.gz in "
                     "ui.perfetto.dev (docs/profiling.md).", step, directory, directory)
        return outputs

    def _step(self, step: int) -> tuple[dict[str, Any], Any, list[dict[str, Any]]]:
        """One RL step: sample, reward, advantages, update. Returns its host and device metrics
        (the timings of the loop's writing come later) and the replies for ``samples.jsonl``."""
        cfg, parts = self.cfg, self.parts
        t0 = time.perf_counter()
        batch = parts.batches[step]
        prompts = _gather_rows(batch.tokens_BP, batch.valid_BP)
        eval_metrics, eval_s = {}, 0.0
        with self._sampler_model() as sampler_model:
            if parts.evaluator is not None and step % cfg.eval.every == 0:
                # The first step's sampler compiles beside the evaluation (each compilation runs on one thread).
                compiling = self._in_background(
                    "compile-sampler", sampler.precompile, sampler_model, prompts, parts.sampling,
                    mesh=parts.sampler_mesh, group=cfg.rollout.group_size) if step == self.start else None
                try:
                    # The policy that samples this step, before its update: eval/* of step 0 is the start.
                    eval_metrics = parts.evaluator(sampler_model, mesh=parts.sampler_mesh)
                    eval_s = time.perf_counter() - t0
                finally:  # A compilation still under way counts as sampling time.
                    if compiling is not None:
                        compiling.join()
            rollout = sampler.generate(sampler_model, prompts, jax.random.fold_in(self.loop["rollout_key"], step),
                                       parts.sampling, mesh=parts.sampler_mesh, group=cfg.rollout.group_size)
        host = fetch_to_host({"tokens": rollout.tokens_BT, "mask": rollout.response_mask_BT,
                              "lengths": rollout.response_lengths_B, "finished": rollout.finished_B,
                              "prompt_lengths": rollout.prompt_lengths_B,
                              **({"entropy": rollout.entropy_BT} if cfg.sampler.return_entropy else {})})
        t1 = time.perf_counter()

        scores = self._score(step, batch, host)
        advantages = np.asarray(losses.compute_advantages(jnp.asarray(scores["rewards"]), cfg.rollout.group_size,
                                                          cfg.loss.advantage_mode))
        # The update runs on the response columns up to the cache size the sampler ended in, not
        # the whole budget: one compilation per size reached. The step lays the batch out over its
        # mesh's data axis itself (from the sampler's devices when the sampler has its own).
        width = sampler.response_bucket(int(host["lengths"].max()), parts.sampling)
        packed = self._packed_width(host["lengths"], width)
        train_batch = train_step.TrainBatch.from_rollout(
            rollout.trimmed(width), advantages, truncated=cfg.sampler.logp == "truncated",
            with_entropy=cfg.sampler.return_entropy, group=cfg.rollout.group_size, packed_width=packed)
        t2 = time.perf_counter()
        if self.save_done_before_update:
            self.ckpt.wait()  # A pending save (see __init__); at once when none is.
        t3 = time.perf_counter()

        device_metrics = self._update(train_batch, host["lengths"].astype(np.float64).mean())
        t4 = self.update_end = time.perf_counter()  # time/write_s counts from here (`run`)

        times = {"time/sample_s": t1 - t0 - eval_s, "time/score_s": t2 - t1, "time/checkpoint_s": t3 - t2,
                 "time/train_s": t4 - t3, **({"time/eval_s": eval_s} if eval_metrics else {})}
        host_metrics = {**_host_metrics(cfg, scores, host, rollout.prompt_width), **eval_metrics, **times,
                        "rollout/response_width": width, "rollout/packed_width": packed,
                        "time/tokens_per_s": host["lengths"].sum() / max(times["time/sample_s"], 1e-9)}
        due = cfg.log.samples_every and step % cfg.log.samples_every == 0
        samples = _sampled_replies(cfg, batch.examples, scores, host, self.row_slice) if due else []
        return host_metrics, device_metrics, samples

    def _packed_width(self, lengths_B: np.ndarray, width: int) -> int:
        """The update's `train_step.TrainBatch.packed_width` for responses of these lengths
        trimmed to ``width`` columns: 0 where the step cannot pack (``trainer.share_prompts`` off,
        or micro-batches that do not hold whole groups)."""
        cfg = self.cfg
        group, data = cfg.rollout.group_size, self.parts.mesh.shape[shd.DATA]
        if not (cfg.trainer.share_prompts
                and train_step.holds_whole_runs(len(lengths_B), group, cfg.trainer.n_microbatches, data)):
            return 0
        return train_step.packed_width(lengths_B, group, width, multiple=cfg.trainer.pack_multiple)

    def _score(self, step: int, batch, host: Mapping[str, np.ndarray]) -> dict[str, Any]:
        """This process's replies decoded and scored; the rewards of the global batch."""
        cfg, rows = self.cfg, self.row_slice
        responses = [self.parts.tok.decode(t[m]) for t, m in zip(host["tokens"][rows], host["mask"][rows])]
        scored = tasks.score(responses, batch.examples, format_weight=cfg.task.format_weight,
                             score_fns=self.score_fns)
        penalty = overlong_penalty(host["lengths"][rows], cfg.sampler.max_new_tokens, cfg.task.overlong_buffer,
                                   cfg.task.overlong_weight)
        rewards, correct, formatted, penalties = _gather_rows(
            scored["rewards"] + penalty, scored["correct"], scored["formatted"], penalty)
        if not np.all(np.isfinite(rewards)):
            bad = np.flatnonzero(~np.isfinite(rewards)).tolist()
            raise ValueError(f"Non-finite rewards at step {step}, rows {bad}; the reward function must "
                             "return finite numbers.")
        return {"responses": responses, "rewards": rewards, "correct": correct, "formatted": formatted,
                "penalties": penalties}

    def _update(self, train_batch, mean_length: float) -> dict[str, jax.Array]:
        """The train step on ``train_batch``, waited for; the new state goes into ``self.loop``.
        Returns the step's device metrics."""
        signals = {"response_length": jnp.float32(mean_length)}
        if self.cfg.optim.k3_trigger_threshold > 0:
            # The previous step's k3: a device scalar (no host wait), or from the checkpoint.
            signals["k3"] = self.last_k3 if isinstance(self.last_k3, jax.Array) else np.float32(
                np.nan if self.last_k3 is None else self.last_k3)
        self._join_early_compile()
        self.state_intact = False  # The step donates the state it is given.
        train, device_metrics = self.parts.step_fn(self.loop["train"], train_batch, **signals)
        # Waited for here, not inside the next sampling call (which needs the new weights
        # anyway): time/train_s is then the update's own time, time/sample_s the sampler's.
        jax.block_until_ready(train)
        self.loop = {**self.loop, "train": train}
        self.last_k3 = device_metrics["mismatch/k3"]
        if "lr/scale" in device_metrics:  # The learning rate in force (a device op: no host wait).
            device_metrics = {**device_metrics,
                              "lr/value": device_metrics["lr/scale"] * self.cfg.optim.learning_rate}
        return device_metrics

    def _k3_signal(self) -> float | None:
        # Fetched only when needed, so the host does not wait for the step just dispatched.
        if self.last_k3 is not None and not isinstance(self.last_k3, float):
            self.last_k3 = float(fetch_to_host(self.last_k3))
        return None if self.last_k3 is None or np.isnan(self.last_k3) else self.last_k3

    def _save_if_due(self, done: int) -> None:
        """Saves the state after ``done`` steps if a checkpoint is due then (every
        ``checkpoint.every`` steps and after the last), once the metrics file holds every step the
        checkpoint covers. Called at the start of the next step, so its time is that step's
        ``time/checkpoint_s``."""
        every = self.cfg.checkpoint.every
        if done > self.start and (done % every == 0 or done == self.cfg.steps):
            self.writer.sync()  # The rows of every step the checkpoint covers, on disk.
            self._save(done)

    def _save(self, done: int) -> None:
        self.ckpt.save(done, self.loop, {"data_position": done, "last_k3": self._k3_signal(),
                                         "config": self.cfg.to_dict()})

    def _stop(self, error: BaseException, step: int) -> None:
        """After an error at ``step``: nothing lost. Finished steps' metrics are written, and an
        intact state newer than the last checkpoint is saved, so a rerun continues from the step
        that failed (with several processes the others may be blocked in a collective; only a
        lone process saves). Re-raises ``error``; an ``OSError`` as :class:`RunIOError`."""
        ckpt = self.ckpt
        try:
            self.writer.close()
        except Exception as write_error:  # A failed device computation fails its metrics too.
            logging.error("Could not write the last step's metrics: %s", write_error)
            self.state_intact = False
        try:
            ckpt.wait()  # A pending save: on disk, or it failed (then the state is saved below).
        except Exception as save_error:
            logging.error("%s", save_error)
        on_disk = ckpt.latest_step() or 0
        if self.state_intact and jax.process_count() == 1 and self.completed > on_disk:
            try:
                self._save(self.completed)
                ckpt.wait()
            except Exception as save_error:
                logging.error("Could not save the state after step %d (%s); the newest checkpoint in %s is %s.",
                              self.completed, save_error, ckpt.directory, ckpt.latest_step())
            else:
                logging.error("Saved the state after step %d in %s before stopping.", self.completed, ckpt.directory)
        if isinstance(error, OSError):  # A full disk, a read-only file system: say where and when.
            latest = ckpt.latest_step()
            then = ("there is no checkpoint yet, so the same command starts the run again" if latest is None else
                    f"the same command resumes from checkpoint {latest} in {ckpt.directory}")
            cause = str(error).rstrip()
            raise RunIOError(f"Step {step}: {cause}{'' if cause.endswith('.') else '.'} Once the cause is fixed, "
                             f"{then}.") from error
        raise error


def _host_metrics(cfg: ExperimentConfig, scores: Mapping[str, Any], host: Mapping[str, np.ndarray],
                  prompt_width: int) -> dict[str, Any]:
    """``reward/*`` and ``rollout/*`` of one step, from the global batch's scores and rollout."""
    rewards, lengths = scores["rewards"], host["lengths"].astype(np.float64)
    groups = rewards.reshape(-1, cfg.rollout.group_size)
    metrics = {
        "reward/mean": rewards.mean(), "reward/std": rewards.std(),
        "reward/accuracy": scores["correct"].mean(), "reward/format": scores["formatted"].mean(),
        "reward/overlong_penalty": scores["penalties"].mean(),
        "reward/zero_advantage_groups": np.mean(groups.max(1) == groups.min(1)),
        "rollout/response_length_mean": lengths.mean(), "rollout/response_length_max": lengths.max(),
        "rollout/response_length_min": lengths.min(), "rollout/finished_frac": host["finished"].mean(),
        "rollout/prompt_length_mean": host["prompt_lengths"].mean(), "rollout/prompt_width": prompt_width,
    }
    if cfg.sampler.return_entropy:
        metrics["rollout/entropy_mean"] = (host["entropy"] * host["mask"]).sum() / max(host["mask"].sum(), 1)
    return metrics
