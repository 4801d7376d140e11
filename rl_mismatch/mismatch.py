"""Sampler/trainer mismatch: teacher-forced rescoring and the diagnostic metrics.

The sampler stores, for every response token ``tokens[:, t]``, the log-probability ``log μ_t``
it sampled that token with, at column ``t``. :func:`rescore` runs the trainer's full-sequence
forward over prompt + response and returns ``log π_t`` at the same columns, and
:func:`compute_mismatch_metrics` compares the two. With

    r_t = log π_t − log μ_t,    ρ_t = exp(r_t),

over the response tokens selected by the mask:

* KL(μ‖π) estimators: ``k1 = mean(−r)``, ``k2 = mean(r²/2)``, ``k3 = mean(ρ − 1 − r)``.
* ``|π − μ|`` mean / max / std, Pearson correlation of π and μ.
* per sequence ``d_s = mean_t log μ_t − mean_t log π_t``: ``mean_s d_s``, ``mean_s |d_s|`` and
  the perplexity ratio ``mean_s exp(d_s)`` (= PPL_π / PPL_μ); the absolute log-perplexities
  ``mean_s (−mean_t log π_t)`` and ``mean_s (−mean_t log μ_t)`` and perplexities ``mean_s PPL_s``.
* χ²: token ``E[ρ²] − 1``; sequence ``E_s[(Π_t ρ_t)²] − 1``.
* effective sample size fraction ``mean(ρ)² / mean(ρ²)`` (= 1 / mean(w̃²), w̃ = ρ / mean ρ).
* quantiles of ρ (0.1 %, 1 %, 50 %, 99 %, 99.9 %) and the fractions of tokens with ρ outside
  [0.9, 1.1] and [0.5, 2]; the token statistics again per position bin and per sampler
  entropy bin; per-sequence log-ratio statistics.

−inf log-probabilities (tokens removed by top-k / top-p on one side) are handled by
:func:`compute_log_ratio`: a −inf on one side gives the clamp value ``∓C`` (the side that
rules the token out wins, as strongly as the clamp allows), −inf on both sides gives
``r = 0`` (both agree the token is impossible). Every metric is finite, and every metric
of an empty mask is 0 with a token count of 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

# |r| is clamped here. exp(±20) spans a factor 2e17 and ρ² = exp(40) ≈ 2.4e17 stays far below
# the float32 maximum (3.4e38) even summed over 1e20 tokens, so χ², ESS and k3 never overflow;
# a disagreement beyond a factor exp(20) ≈ 5e8 is "the token is impossible under one policy",
# and its exact size carries no further information.
DEFAULT_LOG_RATIO_CLAMP = 20.0
# log(1 + χ²_seq) is clamped here before the final exp: Π_t ρ_t over a long sequence can be
# exp(±thousands) even with clamped tokens. exp(80) ≈ 5.5e34 < float32 max ≈ 3.4e38.
_MAX_LOG_CHI2_SEQ = 80.0
# A sequence's log-perplexity −mean_t log p_t is clamped here: a −inf log-prob (a token one side
# rules out) makes it +inf, and a perplexity beyond e^80 ≈ 5.5e34 only says "ruled out" too.
_MAX_LOG_PPL = 80.0
# Response-position bins [e_i, e_{i+1}); the last bin is [e_last, ∞). Powers of two: the first
# tokens after the prompt behave differently from the bulk and deserve their own bins.
POSITION_BIN_EDGES = (0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
# Sampler-entropy bins in nats, half decades; values below the first edge (or NaN) land in bin 0.
ENTROPY_BIN_EDGES = (0.0, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0)
# Ratio quantiles as exact fractions (name, numerator, denominator), so the interpolation
# index q·(n − 1) is computed in integers and does not lose precision for large n.
_RATIO_QUANTILES = (("p001", 1, 1000), ("p01", 1, 100), ("p50", 1, 2), ("p99", 99, 100),
                    ("p999", 999, 1000))

METRIC_KEYS = tuple("mismatch/" + k for k in (
    "k1", "k2", "k3", "prob_diff_mean", "prob_diff_max", "prob_diff_std", "prob_pearson",
    "log_ppl_diff", "log_ppl_abs_diff", "ppl_ratio", "log_ppl_trainer", "log_ppl_sampler", "ppl_trainer",
    "ppl_sampler", "chi2_token", "chi2_seq", "ess",
    *(f"ratio_{name}" for name, _, _ in _RATIO_QUANTILES), "frac_out_10pct", "frac_out_2x",
    "n_tokens", "n_seqs", "n_clamped", "n_inf_logp",
    "seq_mean_log_ratio_mean", "seq_mean_log_ratio_min", "seq_mean_log_ratio_max",
    "seq_sum_log_ratio_mean", "seq_sum_log_ratio_min", "seq_sum_log_ratio_max"))
BINNED_KEYS = ("bin_lo", "n_tokens", "k1", "k2", "k3", "prob_diff_mean", "prob_diff_max",
               "chi2_token", "frac_out_10pct", "frac_out_2x",
               *(f"ratio_{name}" for name, _, _ in _RATIO_QUANTILES))


# ----------------------------------------------------------------------------- rescoring


def _lse_and_picked(logits_BTV, targets_BT):
    # Upcast first: a bf16 logsumexp over ~50k logits would lose the digits the mismatch lives in.
    logits_BTV = logits_BTV.astype(jnp.promote_types(logits_BTV.dtype, jnp.float32))
    lse_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
    picked_BT = jnp.take_along_axis(logits_BTV, targets_BT[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return logits_BTV, lse_BT, picked_BT


def token_log_probs_and_entropy(logits_BTV: jax.Array, targets_BT: jax.Array
                                ) -> tuple[jax.Array, jax.Array]:
    """``log softmax(logits)[target]`` and the entropy of ``softmax(logits)``, per position.

    ``log p(y) = z_y − logsumexp(z)`` and ``H = Σ_v p_v (logsumexp(z) − z_v)``: the gathered
    logit and two reductions over V, so no [B, T, V] log-probability array is materialised.

    Args:
      logits_BTV: logits (upcast to at least float32).
      targets_BT: int token ids to score.

    Returns:
      ``(logp_BT, entropy_BT)``, float32 (or wider).
    """
    logits_BTV, lse_BT, picked_BT = _lse_and_picked(logits_BTV, targets_BT)
    p_BTV = jnp.exp(logits_BTV - lse_BT[..., None])
    # where(): a −inf logit has p = 0 and 0·inf would be NaN; it contributes nothing to H.
    entropy_BT = jnp.sum(jnp.where(p_BTV > 0, p_BTV * (lse_BT[..., None] - logits_BTV), 0.0), axis=-1)
    return picked_BT - lse_BT, entropy_BT


def token_log_probs(logits_BTV: jax.Array, targets_BT: jax.Array) -> jax.Array:
    """``log softmax(logits_BTV)[..., targets_BT]`` as ``logit − logsumexp`` (no [B, T, V] log-probs).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> logits = jnp.array([[[0.0, jnp.log(3.0)]]])
      >>> float(jnp.exp(token_log_probs(logits, jnp.array([[1]]))[0, 0]))
      0.75
    """
    _, lse_BT, picked_BT = _lse_and_picked(logits_BTV, targets_BT)
    return picked_BT - lse_BT


def _check_rescore_args(tokens_BT, valid_BT, positions_BT, response_mask_BT):
    if tokens_BT.ndim != 2:
        raise ValueError(f"tokens_BT must be [batch, time], got shape {tokens_BT.shape}.")
    if not jnp.issubdtype(tokens_BT.dtype, jnp.integer):
        raise ValueError(f"tokens_BT must hold integer token ids, got dtype {tokens_BT.dtype}.")
    for name, x in (("valid_BT", valid_BT), ("positions_BT", positions_BT),
                    ("response_mask_BT", response_mask_BT)):
        if x is not None and x.shape != tokens_BT.shape:
            raise ValueError(f"{name} has shape {x.shape} but tokens_BT has {tokens_BT.shape}; "
                             "pass one entry per token column.")


def check_score_from(score_from, T: int) -> None:
    """Raises ValueError unless ``score_from`` is a valid first scored column of ``T`` columns."""
    if isinstance(score_from, bool) or not isinstance(score_from, int) or not 1 <= score_from < T:
        raise ValueError(f"score_from={score_from!r} must be an int in [1, {T}): column 0 has no "
                         "predecessor and at least one column must be scored (pass a rollout's "
                         "prompt_width, or 1 for every column).")


def _check_rescore_options(temperature, score_from, token_chunk, keep_logits, T):
    if not (isinstance(temperature, (int, float)) and temperature > 0):
        raise ValueError(f"temperature must be a positive Python number, got {temperature!r}; a greedy "
                         "sampler (temperature 0) records temperature-1 log-probs, so rescore with 1.0.")
    check_score_from(score_from, T)
    check_chunk_options(token_chunk, keep_logits)


def check_group(group, B: int) -> None:
    """Raises ValueError unless ``group`` is a positive int dividing the batch of ``B`` rows."""
    if isinstance(group, bool) or not isinstance(group, int) or group < 1 or B % group:
        raise ValueError(f"group={group!r} must be a positive int dividing the batch ({B} rows): the rows "
                         "of one prompt come in runs of group consecutive rows.")


def check_packed_width(packed_width) -> None:
    """Raises ValueError unless ``packed_width`` is a non-negative int (:func:`rescore`)."""
    if isinstance(packed_width, bool) or not isinstance(packed_width, int) or packed_width < 0:
        raise ValueError(f"packed_width={packed_width!r} must be a non-negative int (0: not packed).")


def check_chunk_options(token_chunk, keep_logits) -> None:
    """Raises ValueError unless ``token_chunk`` and ``keep_logits`` are valid :func:`rescore` options."""
    if isinstance(token_chunk, bool) or not isinstance(token_chunk, int) or token_chunk <= 0:
        raise ValueError(f"token_chunk must be a positive int, got {token_chunk!r}.")
    if not isinstance(keep_logits, bool):
        raise ValueError(f"keep_logits must be a Python bool (static), got {keep_logits!r}.")


def _score_next(logits, targets, temperature, with_entropy):
    """Log-prob (and entropy) of ``targets`` under ``softmax(logits / temperature)``, float32."""
    if temperature != 1.0:  # the sampler's log-probs are of the temperature-scaled distribution
        logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32)) / temperature
    if with_entropy:
        return token_log_probs_and_entropy(logits, targets)
    return token_log_probs(logits, targets), None


_CHUNKS_PER_ITERATION = 2


def _score_chunked(model, h_BMD, targets_BM, temperature, with_entropy, token_chunk, keep_logits):
    """``_score_next(model.logits(h), ...)`` with the LM head applied at most ``token_chunk`` rows at a time.

    Each chunk's logits (at most ``token_chunk × V`` float32) are reduced to a log-prob while still in
    cache and never written out whole; a ``lax.scan`` runs the chunks in sequence. Under
    differentiation the scan would stack every chunk's logits as residuals for the backward
    pass (all [B·M, V] of them), so unless ``keep_logits`` each chunk is rematerialised: the
    backward recomputes its LM-head matmul and softmax from the hidden states.

    ``token_chunk`` is the most positions a chunk holds: the fewest chunks that respect it share
    the positions equally, so padding adds less than one row per chunk (384 positions run as two
    chunks of 192, not as two of 256 with half of the second one padding).
    """
    B, M, D = h_BMD.shape
    n = -(-(B * M) // token_chunk)
    size = -(-(B * M) // n)
    pad = n * size - B * M
    h = jnp.pad(h_BMD.reshape(B * M, D), ((0, pad), (0, 0))).reshape(n, 1, size, D)
    y = jnp.pad(targets_BM.reshape(B * M), (0, pad)).reshape(n, 1, size)

    def one(args):  # (lp, entropy or None): None is an empty pytree, the scan stacks nothing for it
        return _score_next(model.logits(args[0]), args[1], temperature, with_entropy)

    if not keep_logits:
        one = jax.checkpoint(one, prevent_cse=False)
    # Two chunks per loop iteration: XLA:CPU then runs one chunk's log-softmax reductions beside
    # the other's matmul, where lax.map left a thread idle during every reduction; the LM head
    # plus log-probs then costs little more than a plain logits matmul.
    _, scored = jax.lax.scan(lambda carry, args: (carry, one(args)), None, (h, y), unroll=_CHUNKS_PER_ITERATION)
    return jax.tree.map(lambda x: x.reshape(-1)[:B * M].reshape(B, M), scored)


def _rescore(model, tokens_BT, valid_BT, positions_BT, response_mask_BT, temperature, with_entropy,
             score_from, token_chunk, keep_logits, group, packed_width):
    _check_rescore_args(tokens_BT, valid_BT, positions_BT, response_mask_BT)
    B, T = tokens_BT.shape
    _check_rescore_options(temperature, score_from, token_chunk, keep_logits, T)
    check_group(group, B)
    check_packed_width(packed_width)
    valid_BT = jnp.ones((B, T), bool) if valid_BT is None else valid_BT.astype(bool)
    # Column t is predicted from column t − 1: queries [score_from − 1, T − 1), targets
    # [score_from, T). Slicing happens before the LM head (on hidden states) or, for a plain
    # logits function, on the [B, T] results, never on a [B, T, V] array.
    targets_BM = tokens_BT[:, score_from:]
    runs = group > 1 and score_from > 1 and hasattr(model, "logits")
    if runs and packed_width and hasattr(model, "packed_hidden_states"):
        h_UWD, packing = model.packed_hidden_states(tokens_BT, prefix=score_from - 1, group=group, width=packed_width,
                                                    positions_BT=positions_BT, valid_BT=valid_BT)
        # A slot's query predicts the next own column of its row (the last column's target is a
        # dummy, as is an empty slot's); a column cut off by too small a width scores NaN.
        next_BO = jnp.concatenate([targets_BM, targets_BM[:, -1:]], axis=1)
        scored = _score_chunked(model, h_UWD, packing.pack(next_BO), temperature, with_entropy, token_chunk,
                                keep_logits)
        lp_BM, ent_BM = jax.tree.map(lambda x: packing.unpack(x, jnp.nan)[:, :-1], scored)
    elif runs and hasattr(model, "grouped_hidden_states"):
        h_BMD = model.grouped_hidden_states(tokens_BT, prefix=score_from - 1, group=group,
                                            positions_BT=positions_BT, valid_BT=valid_BT)[:, :-1]
        lp_BM, ent_BM = _score_chunked(model, h_BMD, targets_BM, temperature, with_entropy, token_chunk,
                                       keep_logits)
    elif hasattr(model, "hidden_states") and hasattr(model, "logits"):
        h_BTD = model.hidden_states(tokens_BT, positions_BT=positions_BT, valid_BT=valid_BT)
        lp_BM, ent_BM = _score_chunked(model, h_BTD[:, score_from - 1:T - 1], targets_BM,
                                       temperature, with_entropy, token_chunk, keep_logits)
    else:
        logits_BTV = model(tokens_BT, positions_BT=positions_BT, valid_BT=valid_BT)
        # Score the next token at every column (the last column's target is a dummy), then cut.
        next_BT = jnp.concatenate([tokens_BT[:, 1:], tokens_BT[:, :1]], axis=1)
        lp_BT, ent_BT = _score_next(logits_BTV, next_BT, temperature, with_entropy)
        lp_BM = lp_BT[:, score_from - 1:T - 1]
        ent_BM = None if ent_BT is None else ent_BT[:, score_from - 1:T - 1]

    def place(x_BM):  # back to the token columns: column t holds the log-prob of tokens[:, t]
        return jnp.concatenate([jnp.zeros((B, score_from), x_BM.dtype), x_BM], axis=1)

    # A column is scored only when it and its predecessor are real tokens: column 0 has no
    # predecessor, and the first token after left padding is predicted from a pad query
    # whose logits are meaningless (possibly NaN, so where() and never a multiply).
    keep_BT = valid_BT & jnp.concatenate([jnp.zeros((B, 1), bool), valid_BT[:, :-1]], axis=1)
    if response_mask_BT is not None:
        keep_BT &= response_mask_BT.astype(bool)
    logp_BT = jnp.where(keep_BT, place(lp_BM), 0.0)
    if not with_entropy:
        return logp_BT
    return logp_BT, jnp.where(keep_BT, place(ent_BM), 0.0)


# Rows of the LM head per chunk (128 × 49152 float32 logits are 25 MB, reduced chunk by chunk).
# benchmarks/mismatch.py, SmolLM2 8 × 256, rescore + metrics / forward, one chunk per loop
# iteration: 128 gave 1.063–1.089 (fp32) and 1.001–1.019 (bf16) over three runs, 64 1.083–1.089
# and 1.025–1.071, 256 1.10 and 1.16; with two chunks per iteration (_CHUNKS_PER_ITERATION),
# 128 gives 1.008–1.050 (fp32, four runs) and 1.031–1.068 (bf16, six runs; ±3% run to run).
DEFAULT_TOKEN_CHUNK = 128


def rescore(model, tokens_BT: jax.Array, valid_BT: jax.Array | None = None,
            *, positions_BT: jax.Array | None = None, response_mask_BT: jax.Array | None = None,
            temperature: float = 1.0, score_from: int = 1,
            token_chunk: int = DEFAULT_TOKEN_CHUNK, keep_logits: bool = False, group: int = 1,
            packed_width: int = 0) -> jax.Array:
    """Trainer log-probs of the rollout tokens, teacher-forced, aligned with the sampler's.

    ``logp_BT[:, t] = log softmax(z_{t−1} / temperature)[tokens_BT[:, t]]``, where ``z`` are the
    logits of one full-sequence forward over ``tokens_BT`` in the model's own precision and
    sharding. Column 0, padding, the first real token of a row (its predecessor is padding),
    columns before ``score_from`` and, when given, columns outside ``response_mask_BT`` are 0.

    Two kinds of model are accepted:

    * one with ``hidden_states(tokens_BT, positions_BT=, valid_BT=) -> h_BTD`` and
      ``logits(h) -> z`` (a ``Decoder``): the LM head and its log-softmax run ``token_chunk``
      positions at a time, so the [B, T, V] logits never exist (under differentiation too,
      unless ``keep_logits``), and query positions before ``score_from − 1`` never reach the
      LM head (benchmarks/mismatch.py, SmolLM2, chunks of 128: rescoring + every metric costs
      0.95–1.01x the plain forward that returns the logits with ``score_from`` at the prompt
      width, 1.01–1.07x scoring every column, fp32 and bf16 alike);
    * any ``model(tokens_BT, positions_BT=, valid_BT=) -> logits_BTV``.

    Both give the same numbers up to float32 summation order.

    Args:
      model: see above. Jit with ``nnx.jit(rescore)`` or call it inside a jitted step.
      tokens_BT: int32 prompt + response tokens, left-padded.
      valid_BT: False for padding (default: all True).
      positions_BT: RoPE positions (default: the model's, cumsum(valid) − 1).
      response_mask_BT: if given, log-probs outside it are zeroed.
      temperature: static; the logits are divided by it, as the sampler does, so the result
        compares with the sampler's ``logp_BT`` (full temperature-scaled distribution). Use
        1.0 for a greedy sampler, which records temperature-1 log-probs.
      score_from: static; the first column scored. Pass a rollout's ``prompt_width`` (its
        responses start there) to skip the prompt's LM-head work.
      token_chunk: static; the most positions per LM-head chunk (chunked path only); the
        positions are shared equally among the fewest chunks this allows.
      keep_logits: static, matters only under differentiation (chunked path only). False:
        the backward pass recomputes each chunk's logits, so memory holds one chunk's
        ``token_chunk × V`` float32 logits at a time; the price is a second LM-head matmul
        (its cost on a SmolLM2 train step: benchmarks/README.md). True: every chunk's
        logits are kept for the backward pass, [B, T − score_from, V] float32 in all, as a
        plain ``logits_BTV`` forward would; for short responses and small vocabularies.
      group: static; rows come in runs of ``group`` that share their columns before
        ``score_from − 1`` (a GRPO batch: one prompt, ``group`` responses, ``score_from`` its
        prompt width). A model with ``grouped_hidden_states`` (a ``Decoder``) then computes
        those columns once per run; the result is the same up to float32 summation order.
        The caller guarantees the shared columns are equal (the train step checks them).
        Ignored where ``score_from`` is 1 and by a plain logits function.
      packed_width: static; with ``group`` > 1, a model with ``packed_hidden_states`` (a
        ``Decoder``) lays each run's responses end to end in this many columns after the prompt
        (each response from the prompt's last column to its last valid token), so padding after
        short responses is not computed; 0 (the default) keeps every row's columns. It must
        hold every run: ``rl_mismatch.models.packing.run_spans`` over the columns from
        ``score_from − 1`` (the train step checks); a column that does not fit scores NaN. Same
        result up to float32 summation order.

    Returns:
      float32 ``logp_BT``, same columns as the sampler's stored log-probs.

    Raises:
      ValueError: mis-shaped or non-integer tokens, a non-positive temperature, ``score_from``
        outside ``[1, T)``, a non-positive ``token_chunk``, a non-bool ``keep_logits``, a
        ``group`` that does not divide the batch or a negative ``packed_width``.

    Example:
      >>> import jax.numpy as jnp
      >>> uniform = lambda tokens, positions_BT=None, valid_BT=None: jnp.zeros(tokens.shape + (4,))
      >>> [round(x, 4) for x in rescore(uniform, jnp.array([[1, 2, 3]]))[0].tolist()]
      [0.0, -1.3863, -1.3863]
    """
    return _rescore(model, tokens_BT, valid_BT, positions_BT, response_mask_BT, temperature, False,
                    score_from, token_chunk, keep_logits, group, packed_width)


def rescore_with_entropy(model, tokens_BT: jax.Array, valid_BT: jax.Array | None = None, *,
                         positions_BT: jax.Array | None = None,
                         response_mask_BT: jax.Array | None = None, temperature: float = 1.0,
                         score_from: int = 1, token_chunk: int = DEFAULT_TOKEN_CHUNK,
                         keep_logits: bool = False, group: int = 1,
                         packed_width: int = 0) -> tuple[jax.Array, jax.Array]:
    """:func:`rescore` plus the trainer's entropy of the distribution each token came from.

    ``entropy_BT[:, t] = H(softmax(z_{t−1} / temperature))``, zeroed where ``logp_BT`` is
    (compare with the sampler's ``entropy_BT``). Costs one more fused reduction over the
    vocabulary.

    Returns:
      ``(logp_BT, entropy_BT)``.
    """
    return _rescore(model, tokens_BT, valid_BT, positions_BT, response_mask_BT, temperature, True,
                    score_from, token_chunk, keep_logits, group, packed_width)


# ----------------------------------------------------------------------------- metrics


def _check_metric_args(sampler_logp_BT, trainer_logp_BT, mask_BT, sampler_entropy_BT):
    if sampler_logp_BT.ndim != 2:
        raise ValueError(f"sampler_logp_BT must be [batch, time], got shape {sampler_logp_BT.shape}.")
    for name, x in (("trainer_logp_BT", trainer_logp_BT), ("mask_BT", mask_BT),
                    ("sampler_entropy_BT", sampler_entropy_BT)):
        if x is not None and x.shape != sampler_logp_BT.shape:
            raise ValueError(f"{name} has shape {x.shape} but sampler_logp_BT has "
                             f"{sampler_logp_BT.shape}; all per-token arrays must share [batch, time].")
    for name, x in (("sampler_logp_BT", sampler_logp_BT), ("trainer_logp_BT", trainer_logp_BT),
                    ("sampler_entropy_BT", sampler_entropy_BT)):
        if x is not None and not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{name} must be floating point, got dtype {x.dtype}.")


def _check_edges(name, edges):
    edges = tuple(float(e) for e in edges)
    if not edges or any(b <= a for a, b in zip(edges, edges[1:])):
        raise ValueError(f"{name} must be a non-empty, strictly increasing sequence of Python "
                         f"numbers (static, not traced), got {edges}.")
    return edges


def compute_log_ratio(sampler_logp_BT: jax.Array, trainer_logp_BT: jax.Array, mask_BT: jax.Array,
                      *, log_ratio_clamp: float = DEFAULT_LOG_RATIO_CLAMP) -> jax.Array:
    """Clamped token log-ratio ``r = clip(log π − log μ, −C, C)``, 0 off the mask.

    −inf handling: trainer −inf (sampler finite) gives ``−C``; sampler −inf (trainer finite)
    gives ``+C``; both −inf gives 0 (both give the token probability 0: no disagreement).
    Values off the mask are ignored entirely (NaN padding is fine); a NaN on the mask is a
    bug upstream and propagates.

    Example:
      >>> import jax.numpy as jnp
      >>> inf = jnp.inf
      >>> compute_log_ratio(jnp.array([[-1.0, -inf, -inf, 0.0]]), jnp.array([[-inf, -1.0, -inf, -1.0]]),
      ...                   jnp.array([[1, 1, 1, 1]])).tolist()
      [[-20.0, 20.0, 0.0, -1.0]]
    """
    dtype = jnp.promote_types(jnp.result_type(sampler_logp_BT, trainer_logp_BT), jnp.float32)
    mask_BT = mask_BT.astype(bool)
    s = sampler_logp_BT.astype(dtype)
    t = trainer_logp_BT.astype(dtype)
    raw = jnp.where((s == -jnp.inf) & (t == -jnp.inf), 0.0, t - s)  # −inf − (−inf) would be NaN
    # Clamp where r is formed, once, so that every downstream exp (ρ, ρ², Π ρ) is bounded.
    return jnp.where(mask_BT, jnp.clip(raw, -log_ratio_clamp, log_ratio_clamp), 0.0)


def _expm1_minus_x(x: jax.Array) -> jax.Array:
    """``exp(x) − 1 − x`` (the k3 term) without cancellation.

    Naively, in float32 the three terms cancel to x²/2 and lose every digit for |x| ≲ 1e-4,
    exactly the regime of a small mismatch. For |x| < 0.5 a degree-8 Taylor series (truncation
    x⁹/9! is < 5e-8 of the value), elsewhere ``expm1(x) − x`` (cancellation loses < 3 bits).
    """
    series = x * x * (1 / 2 + x * (1 / 6 + x * (1 / 24 + x * (1 / 120 + x * (
        1 / 720 + x * (1 / 5040 + x * (1 / 40320)))))))
    return jnp.where(jnp.abs(x) < 0.5, series, jnp.expm1(x) - x)


def _bin_index(x_N: jax.Array, edges: tuple[float, ...]) -> jax.Array:
    """Index i with edges[i] ≤ x < edges[i + 1] (last bin open; x < edges[0] or NaN → 0)."""
    return jnp.sum(x_N[:, None] >= jnp.asarray(edges[1:], x_N.dtype), axis=1, dtype=jnp.int32)


def _masked_quantiles(values_N, valid_N, bin_N, n_bins, counts_K):
    """Ratio quantiles per bin, [K, Q], numpy's default 'linear' interpolation; 0 for empty bins.

    One sort: by (bin, value) with invalid entries keyed past the last bin (or, for a single
    bin, pushed to +inf), so bin k occupies the sorted slice [start_k, start_k + n_k). The
    quantile q of n values sits at the virtual index h = q·(n − 1) between sorted entries
    floor(h) and floor(h) + 1; numpy's lerp is ``a + (b − a)·g`` for g < 0.5 and
    ``b − (b − a)·(1 − g)`` otherwise, mirrored here.
    """
    n_total = values_N.shape[0]
    if n_bins == 1:
        sorted_N = jnp.sort(jnp.where(valid_N, values_N, jnp.inf))
        starts_K = jnp.zeros((1,), jnp.int32)
    else:
        key_N = jnp.where(valid_N, bin_N, n_bins)
        _, sorted_N = lax.sort((key_N, values_N), num_keys=2)
        starts_K = jnp.cumsum(counts_K) - counts_K
    last_K1 = jnp.maximum(counts_K - 1, 0)[:, None]
    num_Q = jnp.asarray([n for _, n, _ in _RATIO_QUANTILES], jnp.int32)
    den_Q = jnp.asarray([d for _, _, d in _RATIO_QUANTILES], jnp.int32)
    # h = (n − 1)·num/den split as below, so no int32 product exceeds num·den ≤ 1e6.
    lo_KQ = (last_K1 // den_Q) * num_Q + ((last_K1 % den_Q) * num_Q) // den_Q
    g_KQ = (((last_K1 % den_Q) * num_Q) % den_Q).astype(values_N.dtype) / den_Q.astype(values_N.dtype)
    hi_KQ = jnp.minimum(lo_KQ + 1, last_K1)
    a = sorted_N[jnp.clip(starts_K[:, None] + lo_KQ, 0, n_total - 1)]
    b = sorted_N[jnp.clip(starts_K[:, None] + hi_KQ, 0, n_total - 1)]
    diff = b - a
    q_KQ = jnp.where(g_KQ >= 0.5, b - diff * (1 - g_KQ), a + diff * g_KQ)
    return jnp.where(counts_K[:, None] > 0, q_KQ, 0.0)  # where(): an empty bin reads +inf


def _binned_metrics(prefix, bin_N, edges, mask_N, token_stats, dp_N, rho_N):
    """Token statistics per bin: arrays of shape [n_bins], empty bins 0."""
    n_bins = len(edges)
    onehot_NK = (bin_N[:, None] == jnp.arange(n_bins)) & mask_N[:, None]
    counts_K = jnp.sum(onehot_NK, axis=0, dtype=jnp.int32)
    inv_K = 1.0 / jnp.maximum(counts_K, 1).astype(dp_N.dtype)
    names = list(token_stats)
    vals_NS = jnp.stack([token_stats[k] for k in names], axis=1)
    # where-sum rather than a one-hot matmul (TPU default matmul precision rounds to bf16) or a
    # scatter-add (non-deterministic on GPU); n_bins is small, so this is one cheap pass.
    sums_SK = jnp.sum(jnp.where(onehot_NK[:, None, :], vals_NS[:, :, None], 0.0), axis=0)
    out = {f"{prefix}/bin_lo": jnp.asarray(edges, dp_N.dtype), f"{prefix}/n_tokens": counts_K}
    out.update({f"{prefix}/{k}": sums_SK[i] * inv_K for i, k in enumerate(names)})
    out[f"{prefix}/prob_diff_max"] = jnp.max(jnp.where(onehot_NK, dp_N[:, None], 0.0), axis=0)
    q_KQ = _masked_quantiles(rho_N, mask_N, bin_N, n_bins, counts_K)
    out.update({f"{prefix}/ratio_{name}": q_KQ[:, i] for i, (name, _, _) in enumerate(_RATIO_QUANTILES)})
    return out


def _token_metrics(r_BT, s_BT, t_BT, mask_BT, log_ratio_clamp):
    """The token-level metrics of :func:`compute_mismatch_metrics` and its counts; also the
    per-token terms the binned views reuse: ``(metrics, token_stats, dp_BT, rho_BT)``."""
    dtype = r_BT.dtype
    n_tok = jnp.sum(mask_BT, dtype=jnp.int32)
    inv_n = 1.0 / jnp.maximum(n_tok, 1).astype(dtype)  # empty mask: sums are 0, so means are 0
    s_inf, t_inf = s_BT == -jnp.inf, t_BT == -jnp.inf
    raw_abs = jnp.abs(jnp.where(s_inf & t_inf, 0.0, t_BT - s_BT))
    n_clamped = jnp.sum(mask_BT & (raw_abs > log_ratio_clamp), dtype=jnp.int32)
    n_inf = jnp.sum(mask_BT & (s_inf | t_inf), dtype=jnp.int32)

    # Per-token terms, exactly 0 off the mask (r is 0 there; the rest go through where()).
    rho_BT = jnp.exp(r_BT)
    mu_BT = jnp.where(mask_BT, jnp.exp(s_BT), 0.0)
    pi_BT = jnp.where(mask_BT, jnp.exp(t_BT), 0.0)
    dp_BT = jnp.abs(pi_BT - mu_BT)
    # ρ − 1 and ρ² − 1 via expm1: exact 0 for equal inputs and no cancellation near ρ = 1.
    token_stats = {
        "k1": -r_BT,
        "k2": 0.5 * r_BT * r_BT,
        "k3": _expm1_minus_x(r_BT),
        "prob_diff_mean": dp_BT,
        "chi2_token": jnp.expm1(2.0 * r_BT),
        "frac_out_10pct": (mask_BT & ((rho_BT < 0.9) | (rho_BT > 1.1))).astype(dtype),
        "frac_out_2x": (mask_BT & ((rho_BT < 0.5) | (rho_BT > 2.0))).astype(dtype),
    }
    m = {f"mismatch/{k}": jnp.sum(v) * inv_n for k, v in token_stats.items()}
    m["mismatch/prob_diff_max"] = jnp.max(dp_BT)  # dp ≥ 0 and 0 off the mask
    dp_c = jnp.where(mask_BT, dp_BT - m["mismatch/prob_diff_mean"], 0.0)
    m["mismatch/prob_diff_std"] = jnp.sqrt(jnp.sum(dp_c * dp_c) * inv_n)  # two-pass: no cancellation

    pi_c = jnp.where(mask_BT, pi_BT - jnp.sum(pi_BT) * inv_n, 0.0)
    mu_c = jnp.where(mask_BT, mu_BT - jnp.sum(mu_BT) * inv_n, 0.0)
    # sqrt(var_π·var_μ) rather than sqrt(var_π)·sqrt(var_μ): equal inputs then give exactly 1.
    denom = jnp.sqrt(jnp.sum(pi_c * pi_c) * jnp.sum(mu_c * mu_c))
    pearson = jnp.sum(pi_c * mu_c) / jnp.where(denom > 0, denom, 1.0)
    m["mismatch/prob_pearson"] = jnp.where(denom > 0, jnp.clip(pearson, -1.0, 1.0), 0.0)

    # ESS = mean(ρ)² / mean(ρ²) = (1 + mean(ρ − 1))² / (1 + χ²_token); clipped to ≤ 1, which
    # Cauchy-Schwarz guarantees exactly and rounding can exceed by an ulp.
    a1 = jnp.sum(jnp.expm1(r_BT)) * inv_n
    ess = jnp.clip((1.0 + a1) ** 2 / (1.0 + m["mismatch/chi2_token"]), 0.0, 1.0)
    m["mismatch/ess"] = jnp.where(n_tok > 0, ess, 0.0)

    # Quantiles of ρ itself (not exp of quantiles of r: the interpolation would differ).
    q_1Q = _masked_quantiles(rho_BT.reshape(-1), mask_BT.reshape(-1), None, 1, n_tok[None])
    m.update({f"mismatch/ratio_{name}": q_1Q[0, i] for i, (name, _, _) in enumerate(_RATIO_QUANTILES)})

    m["mismatch/n_tokens"] = n_tok
    m["mismatch/n_clamped"] = n_clamped
    m["mismatch/n_inf_logp"] = n_inf

    return m, token_stats, dp_BT, rho_BT


def _sequence_metrics(r_BT, s_BT, t_BT, mask_BT) -> dict[str, jax.Array]:
    """The per-sequence metrics of :func:`compute_mismatch_metrics` (empty rows left out)."""
    dtype = r_BT.dtype
    m = {}
    # Per sequence: ℓ_s = Σ_t r_t = log Π ρ_t, mean r_s = ℓ_s / n_s, d_s = −mean r_s.
    n_s = jnp.sum(mask_BT, axis=1, dtype=jnp.int32)
    has_s = n_s > 0
    n_seq = jnp.sum(has_s, dtype=jnp.int32)
    inv_seq = 1.0 / jnp.maximum(n_seq, 1).astype(dtype)
    sum_s = jnp.sum(r_BT, axis=1)
    mean_s = sum_s / jnp.maximum(n_s, 1).astype(dtype)
    d_s = -mean_s
    m["mismatch/log_ppl_diff"] = jnp.sum(d_s) * inv_seq  # empty rows have d_s = 0
    m["mismatch/log_ppl_abs_diff"] = jnp.sum(jnp.abs(d_s)) * inv_seq
    m["mismatch/ppl_ratio"] = jnp.sum(jnp.where(has_s, jnp.exp(d_s), 0.0)) * inv_seq
    for name, lp_BT in (("trainer", t_BT), ("sampler", s_BT)):  # −inf log-probs: see _MAX_LOG_PPL
        nll_s = -jnp.sum(jnp.where(mask_BT, lp_BT, 0.0), axis=1) / jnp.maximum(n_s, 1).astype(dtype)
        nll_s = jnp.where(has_s, jnp.minimum(nll_s, _MAX_LOG_PPL), 0.0)
        m[f"mismatch/log_ppl_{name}"] = jnp.sum(nll_s) * inv_seq
        m[f"mismatch/ppl_{name}"] = jnp.sum(jnp.where(has_s, jnp.exp(nll_s), 0.0)) * inv_seq
    for name, x_s in (("seq_mean_log_ratio", mean_s), ("seq_sum_log_ratio", sum_s)):
        m[f"mismatch/{name}_mean"] = jnp.sum(x_s) * inv_seq
        m[f"mismatch/{name}_min"] = jnp.where(n_seq > 0, jnp.min(jnp.where(has_s, x_s, jnp.inf)), 0.0)
        m[f"mismatch/{name}_max"] = jnp.where(n_seq > 0, jnp.max(jnp.where(has_s, x_s, -jnp.inf)), 0.0)
    # χ²_seq = mean_s exp(2ℓ_s) − 1 in log space: with M = max_s 2ℓ_s,
    # log(1 + χ²) = M + log1p(mean_s expm1(2ℓ_s − M)); expm1/log1p keep it exact near 0, the
    # shift keeps exp from overflowing, and the result is clamped (see _MAX_LOG_CHI2_SEQ).
    two_l = jnp.where(has_s, 2.0 * sum_s, -jnp.inf)
    big_m = jnp.where(n_seq > 0, jnp.max(two_l), 0.0)
    a_seq = jnp.sum(jnp.where(has_s, jnp.expm1(jnp.where(has_s, two_l - big_m, 0.0)), 0.0)) * inv_seq
    log1p_chi2 = jnp.minimum(big_m + jnp.log1p(a_seq), _MAX_LOG_CHI2_SEQ)
    m["mismatch/chi2_seq"] = jnp.where(n_seq > 0, jnp.expm1(log1p_chi2), 0.0)

    m["mismatch/n_seqs"] = n_seq
    return m


def compute_mismatch_metrics(
    sampler_logp_BT: jax.Array,
    trainer_logp_BT: jax.Array,
    mask_BT: jax.Array,
    *,
    sampler_entropy_BT: jax.Array | None = None,
    log_ratio_clamp: float = DEFAULT_LOG_RATIO_CLAMP,
    position_bin_edges: Sequence[float] = POSITION_BIN_EDGES,
    entropy_bin_edges: Sequence[float] = ENTROPY_BIN_EDGES,
) -> dict[str, jax.Array]:
    """Every sampler/trainer mismatch metric (see the module docstring).

    Pure and jittable; ``position_bin_edges``/``entropy_bin_edges`` are static (bind them
    with ``functools.partial`` before ``jax.jit``). ``r`` comes from :func:`compute_log_ratio`
    (clamped to ±``log_ratio_clamp``, −inf rules there); probabilities π, μ for the
    probability differences are ``exp`` of the raw log-probs (a −inf is probability 0).
    Computation is in float32 (or the inputs' wider dtype).

    Keys ``mismatch/…`` (scalars unless stated):
      k1, k2, k3, prob_diff_mean, prob_diff_max, prob_diff_std (population std),
      prob_pearson (0 when a variance is 0 or there are < 2 tokens), log_ppl_diff,
      log_ppl_abs_diff, ppl_ratio, log_ppl_trainer, log_ppl_sampler, ppl_trainer, ppl_sampler
      (per-sequence log-perplexity clamped at 80), chi2_token, chi2_seq (log(1 + χ²) clamped at 80), ess
      (fraction in [0, 1]), ratio_p001, ratio_p01, ratio_p50, ratio_p99, ratio_p999,
      frac_out_10pct (ρ ∉ [0.9, 1.1]), frac_out_2x (ρ ∉ [0.5, 2]);
      n_tokens, n_seqs (rows with ≥ 1 token), n_clamped (|r| beyond the clamp, −inf
      included), n_inf_logp (a −inf on either side): int32;
      seq_mean_log_ratio_{mean,min,max} (over sequences of mean_t r_t) and
      seq_sum_log_ratio_{mean,min,max} (of Σ_t r_t = log Π_t ρ_t);
      by_position/<s> and, if ``sampler_entropy_BT`` is given, by_entropy/<s>: [n_bins] arrays
      for s in bin_lo (the bins' lower edges), n_tokens, k1, k2, k3, prob_diff_mean,
      prob_diff_max, chi2_token, frac_out_10pct, frac_out_2x, ratio_p001 … ratio_p999.
      The position of a token is its index among the row's masked tokens (0 = first response
      token).

    An empty mask gives 0 for every metric and counts of 0; an empty row is left out of the
    per-sequence statistics.

    Args:
      sampler_logp_BT: log μ of the sampled tokens, [B, T].
      trainer_logp_BT: log π of the same tokens (from :func:`rescore`), [B, T].
      mask_BT: True (or nonzero) on the response tokens to measure.
      sampler_entropy_BT: the sampler's entropy (nats) of each token's distribution, [B, T].
      log_ratio_clamp: C in r = clip(log π − log μ, −C, C).
      position_bin_edges: lower edges of the response-position bins (last bin open).
      entropy_bin_edges: lower edges of the entropy bins (last bin open).

    Returns:
      dict of metric name to array.

    Example:
      >>> import jax.numpy as jnp
      >>> mu = jnp.log(jnp.array([[0.5, 0.5, 0.25]]))
      >>> pi = jnp.log(jnp.array([[0.2, 0.5, 0.75]]))
      >>> m = compute_mismatch_metrics(mu, pi, jnp.ones((1, 3), bool))
      >>> round(float(m["mismatch/chi2_token"]), 4), int(m["mismatch/n_tokens"])
      (2.3867, 3)
    """
    _check_metric_args(sampler_logp_BT, trainer_logp_BT, mask_BT, sampler_entropy_BT)
    position_bin_edges = _check_edges("position_bin_edges", position_bin_edges)
    if sampler_entropy_BT is not None:
        entropy_bin_edges = _check_edges("entropy_bin_edges", entropy_bin_edges)
    if isinstance(log_ratio_clamp, (int, float)) and not log_ratio_clamp > 0:  # also rejects NaN
        raise ValueError(f"log_ratio_clamp must be positive, got {log_ratio_clamp}.")

    dtype = jnp.promote_types(jnp.result_type(sampler_logp_BT, trainer_logp_BT), jnp.float32)
    mask_BT = mask_BT.astype(bool)
    s_BT = sampler_logp_BT.astype(dtype)
    t_BT = trainer_logp_BT.astype(dtype)
    r_BT = compute_log_ratio(s_BT, t_BT, mask_BT, log_ratio_clamp=log_ratio_clamp)
    m, token_stats, dp_BT, rho_BT = _token_metrics(r_BT, s_BT, t_BT, mask_BT, log_ratio_clamp)
    m.update(_sequence_metrics(r_BT, s_BT, t_BT, mask_BT))

    flat = {k: v.reshape(-1) for k, v in token_stats.items()}
    mask_N, dp_N, rho_N = mask_BT.reshape(-1), dp_BT.reshape(-1), rho_BT.reshape(-1)
    pos_N = (jnp.cumsum(mask_BT, axis=1, dtype=jnp.int32) - 1).reshape(-1)
    m.update(_binned_metrics("mismatch/by_position", _bin_index(pos_N.astype(dtype), position_bin_edges),
                             position_bin_edges, mask_N, flat, dp_N, rho_N))
    if sampler_entropy_BT is not None:
        ent_N = sampler_entropy_BT.astype(dtype).reshape(-1)
        m.update(_binned_metrics("mismatch/by_entropy", _bin_index(ent_N, entropy_bin_edges),
                                 entropy_bin_edges, mask_N, flat, dp_N, rho_N))
    return m
