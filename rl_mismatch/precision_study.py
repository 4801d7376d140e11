"""The precision study: which part of the sampler/trainer mismatch comes from where.

Responses are sampled **once** (float32 sampler, fixed key). Every comparison below then
scores the *same* tokens two ways and feeds the two log-prob arrays to
:func:`rl_mismatch.mismatch.compute_mismatch_metrics`, so differences between rows are caused
by numerics alone, never by different samples.

Two ways to score a token:

* **sampler dtype d** (:func:`decode_log_probs`): the weights go through
  :func:`rl_mismatch.sampler.sync_weights` (rounded to ``d``), the prompt is prefilled into a
  ``d`` KV cache and the response is fed back one token at a time by
  ``rl_mismatch.sampler.decode_loop``, the loop ``generate`` runs (same cache sizes, same masks,
  same ``log_softmax`` of the float32 logits). For the dtype the tokens were sampled in, this
  reproduces ``Rollout.logp_BT`` (the study records the largest difference).
* **trainer dtype d'** (:func:`rescore_log_probs`): one teacher-forced full-sequence forward,
  :func:`rl_mismatch.mismatch.rescore`, of the float32 master weights computing in ``d'``
  (``Decoder(dtype=d', param_dtype=float32)``: weights cast to ``d'`` where used).

Reported:

1. **Grid** sampler dtype × trainer dtype over {float32, bfloat16, float16}.
2. **Attribution**, one factor at a time. Each row names a *variant* and a *baseline* that
   differ in exactly one factor (the variant plays the sampler in the metrics):

   * weight-sync rounding: weights rounded to ``d``, float32 compute, full forward
     vs the float32 reference (float32 weights and compute, full forward);
   * activation / KV precision: compute in ``d`` vs float32 compute, both with the weights
     already rounded to ``d`` (a ``d`` computation cannot use float32 weights: every matmul
     casts its weight operand to ``d``); also given cumulatively against the reference;
   * KV-cache decode vs full-sequence forward at the same precision (float32, bfloat16, ...);
   * batch shape: each of the first rows rescored alone (batch 1) vs inside the batch;
   * top-p truncation: a second float32 sample set with ``top_p < 1``; the sampler's
     truncated log-prob vs the trainer's full-distribution log-prob, ignored (as is) and
     corrected (``logp_truncated + log_kept_mass``).

This module computes; ``experiments/precision_report.py`` turns :func:`run_study`'s results into
``results.json``, ``results.md`` and ``log_ratios.png``, and ``experiments/precision_study.py`` is
the command that runs both.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rl_mismatch import mismatch
from rl_mismatch import sampler as sampler_lib
from rl_mismatch.models.decoder import Decoder
from rl_mismatch.precision import parse_dtype

DTYPES = ("float32", "bfloat16", "float16")
SHORT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


@dataclasses.dataclass(frozen=True)
class StudyConfig:
    """Settings of one study.

    Attributes:
      dtypes: precisions of the grid (and of the attribution rows); float32 must be included,
        it is the reference.
      max_new_tokens: response budget of both sample sets.
      temperature: sampling temperature of both sets (log-probs are of the scaled distribution).
      top_p: truncation of the second sample set (the top-p factor).
      eos_ids, pad_id: as in ``SamplingConfig``.
      batch1_rows: how many rows are rescored alone for the batch-shape factor (0: skip).
      batch1_dtypes: trainer dtypes of the batch-shape factor.
      prompt_bucket: the sampler's prompt bucket (smaller = less padding to score).
      seed: recorded with the results; `run_study` samples with the key it is given
        (``experiments/precision_study.py`` passes ``jax.random.key(seed)``), and the second
        set uses ``fold_in(key, 1)``.
    """

    dtypes: tuple[str, ...] = DTYPES
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 0.9
    eos_ids: tuple[int, ...] = ()
    pad_id: int = 0
    batch1_rows: int = 16
    batch1_dtypes: tuple[str, ...] = ("float32", "bfloat16")
    prompt_bucket: int = 32
    seed: int = 0

    def __post_init__(self):
        dtypes = tuple(str(parse_dtype(d)) for d in self.dtypes)
        if "float32" not in dtypes:
            raise ValueError(f"dtypes {self.dtypes} must include float32: it is the reference.")
        if len(set(dtypes)) != len(dtypes):
            raise ValueError(f"dtypes {self.dtypes} name a precision twice.")
        object.__setattr__(self, "dtypes", dtypes)
        object.__setattr__(self, "batch1_dtypes", tuple(str(parse_dtype(d)) for d in self.batch1_dtypes))
        if self.batch1_rows < 0:
            raise ValueError(f"batch1_rows must be >= 0, got {self.batch1_rows}.")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 for a sampled study, got {self.temperature}.")
        object.__setattr__(self, "eos_ids", tuple(int(i) for i in self.eos_ids))

    def sampling(self, top_p: float = 1.0) -> sampler_lib.SamplingConfig:
        return sampler_lib.SamplingConfig(
            max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_p=top_p,
            eos_ids=self.eos_ids, pad_id=self.pad_id, prompt_bucket=self.prompt_bucket)


# ----------------------------------------------------------------------------------------------
# Model views: the same float32 master weights, seen by a trainer or a sampler.


def _with_state(model: Decoder, fn: Callable[[jax.Array], jax.Array], compute_dtype) -> Decoder:
    graphdef, state = nnx.split(model)
    state = jax.tree.map(lambda x: fn(x) if jnp.issubdtype(x.dtype, jnp.floating) else x, state)
    out = nnx.merge(graphdef, state)
    out.dtype = jnp.dtype(compute_dtype)
    return out


def trainer_view(model: Decoder, dtype) -> Decoder:
    """The trainer at compute dtype ``d'``: float32 master weights, cast to ``d'`` where used."""
    return _with_state(model, lambda x: x.astype(jnp.float32), parse_dtype(dtype))


def rounded_weights_view(model: Decoder, dtype) -> Decoder:
    """Weight-sync rounding alone: weights rounded to ``dtype`` (round to nearest even, as
    ``sync_weights`` does) and stored back in float32; float32 compute."""
    d = parse_dtype(dtype)
    return _with_state(model, lambda x: x.astype(d).astype(jnp.float32), jnp.float32)


# ----------------------------------------------------------------------------------------------
# Scoring fixed tokens.


@functools.partial(jax.jit, static_argnames=("graphdef", "temperature", "score_from"))
def _rescore(graphdef, state, tokens_BT, valid_BT, mask_BT, *, temperature, score_from):
    return mismatch.rescore(nnx.merge(graphdef, state), tokens_BT, valid_BT,
                            response_mask_BT=mask_BT, temperature=temperature, score_from=score_from)


def rescore_log_probs(model: Decoder, tokens_BT, valid_BT, response_mask_BT, *,
                      temperature: float = 1.0, score_from: int = 1) -> jax.Array:
    """Trainer log-probs: :func:`rl_mismatch.mismatch.rescore` (one full forward), jitted.

    ``score_from``: a rollout's ``prompt_width``, so the LM head skips the prompt columns.
    """
    graphdef, state = nnx.split(model)
    return _rescore(graphdef, state, jnp.asarray(tokens_BT), jnp.asarray(valid_BT),
                    jnp.asarray(response_mask_BT), temperature=float(temperature), score_from=score_from)


@functools.partial(jax.jit, static_argnames=("graphdef", "prompt_width", "temperature", "cache_segment"))
def _decode_log_probs(graphdef, state, tokens_BT, valid_BT, mask_BT, *, prompt_width, temperature, cache_segment):
    # The sampler's own loop (sampler.decode_loop); only token *selection* is replaced by
    # reading the fixed token, so the arithmetic that produces each log-prob is the same.
    model = nnx.merge(graphdef, state)
    B, T = tokens_BT.shape
    P, N = prompt_width, T - prompt_width
    resp_tok_BN, live_BN = tokens_BT[:, P:], mask_BT[:, P:].astype(bool)

    def step(i, logits_BV, out_BN, finished_B):
        tok_B = jax.lax.dynamic_index_in_dim(resp_tok_BN, i, axis=1, keepdims=False)
        live_B = jax.lax.dynamic_index_in_dim(live_BN, i, axis=1, keepdims=False)
        # As in sampler.select_tokens: float32 logits, divided by the temperature, log_softmax.
        logp_BV = jax.nn.log_softmax(logits_BV.astype(jnp.float32) / temperature, axis=-1)
        lp_B = jnp.take_along_axis(logp_BV, tok_B[:, None], axis=-1)[:, 0]
        out_BN = jax.lax.dynamic_update_index_in_dim(out_BN, jnp.where(live_B, lp_B, 0.0), i, axis=1)
        # A finished row's pad token is fed as invalid, as the sampler does.
        return tok_B, live_B, out_BN, finished_B

    out_BN, _ = sampler_lib.decode_loop(
        model, tokens_BT[:, :P], valid_BT[:, :P], max_new_tokens=N, cache_segment=cache_segment,
        step=step, carry=jnp.zeros((B, N), jnp.float32), finished_B=jnp.zeros((B,), bool))
    return jnp.concatenate([jnp.zeros((B, P), jnp.float32), out_BN], axis=1)


def decode_log_probs(model: Decoder, tokens_BT, valid_BT, response_mask_BT, *, prompt_width: int,
                     temperature: float = 1.0,
                     cache_segment: int = sampler_lib.SamplingConfig.cache_segment) -> jax.Array:
    """Sampler log-probs of fixed tokens: prefill + one-token KV-cache decode steps.

    ``model`` computes in its own dtype (pass ``sync_weights(master, d)`` for "sampler dtype
    d"). Columns ``[0, prompt_width)`` hold the left-padded prompt, the rest the response; the
    layout of a :class:`rl_mismatch.sampler.Rollout`. Returns ``logp_BT`` aligned like
    ``Rollout.logp_BT`` (0 outside the response mask). ``cache_segment`` as in the
    ``SamplingConfig`` of the rollout being reproduced (it sets the cache sizes).
    """
    if not 0 < prompt_width < np.shape(tokens_BT)[1]:
        raise ValueError(f"prompt_width={prompt_width} must lie strictly inside the {np.shape(tokens_BT)[1]} "
                         "token columns (prompt first, then at least one response column).")
    graphdef, state = nnx.split(model)
    return _decode_log_probs(graphdef, state, jnp.asarray(tokens_BT), jnp.asarray(valid_BT),
                             jnp.asarray(response_mask_BT), prompt_width=int(prompt_width),
                             temperature=float(temperature), cache_segment=int(cache_segment))


# ----------------------------------------------------------------------------------------------
# The study.

_metrics = jax.jit(mismatch.compute_mismatch_metrics)


def _compare(variant_BT, baseline_BT, mask_BT) -> dict[str, Any]:
    """Metrics with the variant in the sampler's seat and the baseline in the trainer's."""
    m = _metrics(jnp.asarray(variant_BT), jnp.asarray(baseline_BT), jnp.asarray(mask_BT))
    out = {}
    for k, v in jax.device_get(m).items():
        v = np.asarray(v)
        out[k.removeprefix("mismatch/")] = v.item() if v.ndim == 0 else v.tolist()
    mask = np.asarray(mask_BT, bool)
    r = np.asarray(baseline_BT, np.float64)[mask] - np.asarray(variant_BT, np.float64)[mask]
    out["frac_exact"] = float(np.mean(r == 0)) if r.size else 1.0
    out["max_abs_log_ratio"] = float(np.max(np.abs(r))) if r.size else 0.0
    return out


class _Stages:
    """Seconds per stage (since the previous one) and the caller's progress callback."""

    def __init__(self, progress: Callable[[str], None] | None):
        self._progress = progress or (lambda name: None)
        self.timings: dict[str, float] = {}
        self._clock = time.perf_counter()

    def done(self, name: str) -> None:
        now = time.perf_counter()
        self.timings[name] = round(now - self._clock, 3)
        self._clock = now
        self._progress(name)

    def check(self, expected: list[str]) -> None:
        """Keeps :func:`study_stages` honest: the progress bar's total is the real count."""
        missing = [s for s in expected if s not in self.timings]
        if missing:
            raise AssertionError(f"stages not run: {missing}")


class _Rows:
    """The compared pairs: one metrics row each, and its per-token log-ratios for the plot."""

    def __init__(self):
        self.rows: list[dict[str, Any]] = []
        self.log_ratios: dict[str, np.ndarray] = {}

    def add(self, group, name, variant, base, mask_BT, **info) -> None:
        metrics = _compare(variant, base, mask_BT)
        self.rows.append({"group": group, "name": name, **info, "metrics": metrics})
        sel = np.asarray(mask_BT, bool)
        self.log_ratios[f"{group}: {name}"] = (np.asarray(base, np.float64)[sel]
                                               - np.asarray(variant, np.float64)[sel])


@dataclasses.dataclass
class _Scores:
    """Log-probs of the float32 sample set's tokens, per dtype (numpy, ``[B, T]``).

    Attributes:
      decode: sampler side, KV-cache decode with the weights synced to the dtype.
      forward: trainer side, full forward of the master weights computing in the dtype.
      rounded: full forward in float32 of the weights rounded to the dtype (not for float32).
    """

    decode: dict[str, np.ndarray]
    forward: dict[str, np.ndarray]
    rounded: dict[str, np.ndarray]


def _check_master(model: Decoder) -> None:
    if any(np.dtype(x.dtype) != np.float32 for x in jax.tree.leaves(nnx.state(model))
           if jnp.issubdtype(x.dtype, jnp.floating)):
        raise ValueError("run_study needs the float32 master model (param_dtype=float32).")


def _score_all(master: Decoder, rollout: sampler_lib.Rollout, cfg: StudyConfig, stages: _Stages) -> _Scores:
    """Scores the rollout's tokens in every dtype of ``cfg``: decode, forward, rounded weights."""
    tokens, valid, mask, P = rollout.tokens_BT, rollout.valid_BT, rollout.response_mask_BT, rollout.prompt_width
    scores = _Scores({}, {}, {})
    for d in cfg.dtypes:
        scores.decode[d] = np.asarray(decode_log_probs(
            sampler_lib.sync_weights(master, d), tokens, valid, mask, prompt_width=P,
            temperature=cfg.temperature, cache_segment=cfg.sampling().cache_segment))
        stages.done(f"decode {SHORT.get(d, d)}")
    for d in cfg.dtypes:
        scores.forward[d] = np.asarray(rescore_log_probs(trainer_view(master, d), tokens, valid, mask,
                                                         temperature=cfg.temperature, score_from=P))
        stages.done(f"rescore {SHORT.get(d, d)}")
    for d in cfg.dtypes:
        if d != "float32":
            scores.rounded[d] = np.asarray(rescore_log_probs(rounded_weights_view(master, d), tokens, valid,
                                                             mask, temperature=cfg.temperature, score_from=P))
            stages.done(f"rescore fp32 w/ {SHORT.get(d, d)} weights")
    return scores


def _reproduction(decode_fp32_BT: np.ndarray, rollout: sampler_lib.Rollout) -> dict[str, float]:
    """How closely the float32 decode reproduces the rollout's own log-probs."""
    m = np.asarray(rollout.response_mask_BT, bool)
    repro = np.abs(decode_fp32_BT[m] - np.asarray(rollout.logp_BT)[m])
    return {"max_abs_diff": float(repro.max(initial=0.0)),
            "frac_exact": float(np.mean(repro == 0)) if repro.size else 1.0}


def _add_grid_rows(rows: _Rows, scores: _Scores, mask_BT, dtypes: tuple[str, ...]) -> None:
    """Every sampler dtype (decode) against every trainer dtype (forward)."""
    for ds in dtypes:
        for dt in dtypes:
            rows.add("grid", f"sampler {SHORT.get(ds, ds)} x trainer {SHORT.get(dt, dt)}", scores.decode[ds],
                     scores.forward[dt], mask_BT, sampler_dtype=ds, trainer_dtype=dt)


def _add_attribution_rows(rows: _Rows, scores: _Scores, mask_BT, dtypes: tuple[str, ...]) -> None:
    """Per dtype: weight rounding, activations, both, decode vs forward, and all factors at once."""
    ref = scores.forward["float32"]
    for d in dtypes:
        s = SHORT.get(d, d)
        fwd = scores.forward[d]
        if d != "float32":
            rounded = scores.rounded[d]
            rows.add("attribution", f"weight rounding to {s} (fp32 compute) vs fp32 ref", rounded, ref, mask_BT,
                     factor="weights", dtype=d, baseline="fp32 full forward")
            rows.add("attribution", f"{s} activations+KV vs fp32 compute, same {s} weights", fwd, rounded,
                     mask_BT, factor="activations", dtype=d, baseline=f"fp32 compute, {s}-rounded weights")
            rows.add("attribution", f"{s} weights+activations (full forward) vs fp32 ref", fwd, ref, mask_BT,
                     factor="weights+activations", dtype=d, baseline="fp32 full forward")
        rows.add("attribution", f"{s} KV-cache decode vs {s} full forward", scores.decode[d], fwd, mask_BT,
                 factor="decode", dtype=d, baseline=f"{s} full forward")
        if d != "float32":
            rows.add("attribution", f"{s} sampler (all factors) vs fp32 ref", scores.decode[d], ref, mask_BT,
                     factor="all", dtype=d, baseline="fp32 full forward")


def _add_batch_rows(rows: _Rows, master: Decoder, rollout: sampler_lib.Rollout, scores: _Scores,
                    cfg: StudyConfig, stages: _Stages) -> None:
    """Batch shape: each of the first rows rescored alone against the same row inside the batch."""
    tokens, valid, mask, P = rollout.tokens_BT, rollout.valid_BT, rollout.response_mask_BT, rollout.prompt_width
    batch = tokens.shape[0]
    n1 = _batch1_rows(cfg, batch)
    if not n1:
        return
    for d in cfg.batch1_dtypes:
        view = trainer_view(master, d)
        alone = np.concatenate([np.asarray(rescore_log_probs(view, tokens[i:i + 1], valid[i:i + 1], mask[i:i + 1],
                                                             temperature=cfg.temperature, score_from=P))
                                for i in range(n1)])
        s = SHORT.get(d, d)
        rows.add("attribution", f"{s} batch 1 vs batch {batch} (first {n1} rows)", alone,
                 scores.forward[d][:n1], mask[:n1], factor="batch", dtype=d, baseline=f"{s} batch {batch}")
        stages.done(f"batch-1 rescore {s}")


def _add_top_p_rows(rows: _Rows, sampler32: Decoder, master: Decoder, prompts, key: jax.Array,
                    cfg: StudyConfig, stages: _Stages) -> None:
    """Top-p truncation: a second float32 sample set; its truncated log-probs, as is and corrected."""
    roll_p = sampler_lib.generate(sampler32, prompts, jax.random.fold_in(key, 1), cfg.sampling(cfg.top_p))
    jax.block_until_ready(roll_p.logp_BT)
    stages.done(f"sample fp32 top-p {cfg.top_p}")
    trainer_p = np.asarray(rescore_log_probs(master, roll_p.tokens_BT, roll_p.valid_BT, roll_p.response_mask_BT,
                                             temperature=cfg.temperature, score_from=roll_p.prompt_width))
    stages.done("rescore top-p set fp32")
    mp = roll_p.response_mask_BT
    trunc = np.asarray(roll_p.logp_truncated_BT)
    kept = np.asarray(roll_p.log_kept_mass_BT)
    rows.add("attribution", f"top-p {cfg.top_p} ignored: logp_truncated vs fp32 trainer", trunc, trainer_p, mp,
             factor="top_p", dtype="float32", baseline="fp32 full forward (top-p set)")
    rows.add("attribution", f"top-p {cfg.top_p} corrected: logp_truncated + log_kept_mass vs fp32 trainer",
             trunc + kept, trainer_p, mp, factor="top_p_corrected", dtype="float32",
             baseline="fp32 full forward (top-p set)")


def _shapes(rollout: sampler_lib.Rollout) -> dict[str, Any]:
    tokens = rollout.tokens_BT
    return {"batch": int(tokens.shape[0]), "prompt_width": int(rollout.prompt_width),
            "columns": int(tokens.shape[1]),
            "response_tokens": int(np.asarray(rollout.response_mask_BT, bool).sum()),
            "mean_response_length": float(np.asarray(rollout.response_lengths_B).mean()),
            "finished_frac": float(np.asarray(rollout.finished_B).mean())}


def run_study(model: Decoder, prompts, key: jax.Array, cfg: StudyConfig, *,
              progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Samples once, scores the tokens every way, returns the results (JSON-able, plus the
    per-configuration log-ratios under ``"_log_ratios"`` for plotting).

    Args:
      model: the float32 master model (``param_dtype`` float32).
      prompts: token-id lists, or a left-padded ``(tokens_BP, valid_BP)`` pair.
      key: PRNG key of the sampler.
      cfg: study settings.
      progress: called with a short stage name after each stage (e.g. a tqdm update).
    """
    stages = _Stages(progress)
    _check_master(model)
    master = trainer_view(model, jnp.float32)

    # 1. One sample set, float32 sampler.
    sampler32 = sampler_lib.sync_weights(master, jnp.float32)
    rollout = sampler_lib.generate(sampler32, prompts, key, cfg.sampling())
    jax.block_until_ready(rollout.logp_BT)
    stages.done("sample fp32")

    # 2. Sampler-side (decode) and trainer-side (forward) scores of those tokens in each dtype.
    scores = _score_all(master, rollout, cfg, stages)

    # 3. The comparisons: the grid, the per-factor attribution, batch shape, top-p truncation.
    rows = _Rows()
    _add_grid_rows(rows, scores, rollout.response_mask_BT, cfg.dtypes)
    _add_attribution_rows(rows, scores, rollout.response_mask_BT, cfg.dtypes)
    _add_batch_rows(rows, master, rollout, scores, cfg, stages)
    if cfg.top_p < 1.0:
        _add_top_p_rows(rows, sampler32, master, prompts, key, cfg, stages)

    stages.check(study_stages(cfg, int(rollout.tokens_BT.shape[0])))
    grid = {(r["sampler_dtype"], r["trainer_dtype"]): r["metrics"] for r in rows.rows if r["group"] == "grid"}
    return {
        "config": dataclasses.asdict(cfg),
        "shapes": _shapes(rollout),
        "reproduction_fp32_decode_vs_rollout": _reproduction(scores.decode["float32"], rollout),
        "summary": _summary(grid, cfg.dtypes),
        "rows": rows.rows,
        "timings_s": stages.timings,
        "_log_ratios": rows.log_ratios,
    }


def _batch1_rows(cfg: StudyConfig, batch: int) -> int:
    """Rows rescored alone for the batch-shape factor; 0 skips it (also when there is one row)."""
    return min(cfg.batch1_rows, batch) if batch > 1 else 0


def study_stages(cfg: StudyConfig, batch: int | None = None) -> list[str]:
    """Names of the stages :func:`run_study` reports, in order (the progress bar's total).

    ``batch``: the number of prompts (None: more than one).
    """
    names = ["sample fp32"]
    names += [f"decode {SHORT.get(d, d)}" for d in cfg.dtypes]
    names += [f"rescore {SHORT.get(d, d)}" for d in cfg.dtypes]
    names += [f"rescore fp32 w/ {SHORT.get(d, d)} weights" for d in cfg.dtypes if d != "float32"]
    if _batch1_rows(cfg, 2 if batch is None else batch):
        names += [f"batch-1 rescore {SHORT.get(d, d)}" for d in cfg.batch1_dtypes]
    if cfg.top_p < 1.0:
        names += [f"sample fp32 top-p {cfg.top_p}", "rescore top-p set fp32"]
    return names


def _summary(grid, dtypes) -> dict[str, Any]:
    """The headline numbers: low-precision sampling against a float32 trainer, and the ratios."""
    out = {}
    for d in dtypes:
        for t in ("float32", d):
            if (d, t) in grid:
                s = f"{SHORT.get(d, d)}_sampler_{SHORT.get(t, t)}_trainer"
                out[f"{s}/k3"] = grid[(d, t)]["k3"]
                out[f"{s}/prob_diff_max"] = grid[(d, t)]["prob_diff_max"]
    if {"bfloat16", "float16"} <= set(dtypes):
        def ratio(a, b):
            return a / b if b > 0 else math.inf
        for t in ("fp32", None):  # trainer fp32; then sampler and trainer in the same dtype
            bf = f"bf16_sampler_{t or 'bf16'}_trainer"
            fp = f"fp16_sampler_{t or 'fp16'}_trainer"
            tag = "trainer_fp32" if t else "same_dtype"
            out[f"ratio_bf16_over_fp16/{tag}/k3"] = ratio(out[f"{bf}/k3"], out[f"{fp}/k3"])
            out[f"ratio_bf16_over_fp16/{tag}/prob_diff_max"] = ratio(out[f"{bf}/prob_diff_max"],
                                                                    out[f"{fp}/prob_diff_max"])
    return out


# ----------------------------------------------------------------------------------------------
# Prompts.


def render_task_prompts(tokenizer, task: str, n: int, data_dir: str, *, seed: int = 0,
                        max_prompt_len: int = 512) -> list[list[int]]:
    """``n`` chat-templated prompts from the eval split of a reasoning-gym task."""
    from rl_mismatch import tasks

    name = tasks.prepare_reasoning_gym(task, data_dir, train_size=n, eval_size=n, seed=seed)
    split = tasks.load_split(name, "eval", data_dir)
    rendered = tasks.render_prompts(tokenizer, [split[i] for i in range(n)], max_prompt_len=max_prompt_len)
    return [list(t[v]) for t, v in zip(rendered.tokens_BP, rendered.valid_BP)]


def random_prompts(n: int, vocab: int, *, seed: int = 0, min_len: int = 4,
                   max_len: int = 24) -> list[list[int]]:
    """Random token prompts of mixed lengths (for tiny random models)."""
    rng = np.random.default_rng(seed)
    return [rng.integers(1, vocab, rng.integers(min_len, max_len + 1)).tolist() for _ in range(n)]
