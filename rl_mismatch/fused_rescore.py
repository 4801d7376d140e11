"""Rescoring without the [B, T, V] logits: the LM head and its log-softmax, a token chunk at a time.

:func:`rl_mismatch.mismatch.rescore` runs ``model(tokens)`` and takes the log-softmax of the
float32 logits at the next token. The logits tensor is large (``B·T·V`` float32: 805 MB for
4096 tokens of a 49k vocabulary) and the log-softmax reads it twice more (max, then
``Σ exp``), so on a CPU the rescoring costs ~10% more than the plain forward that only writes
the logits. :func:`rescore_fused` computes the same quantity as

    log π_t = z_t[y_t] − logsumexp(z_t),    z_t = (W_out · h_t) / temperature

from the final hidden states ``h``, ``token_chunk`` positions at a time (``lax.map``): each
chunk's logits (``token_chunk × V`` float32, ~12 MB at 64 × 49k) are reduced while still in
cache and never written out whole. Positions before ``score_from − 1`` (the prompt) never reach
the LM head at all. The logits themselves are computed exactly as ``Decoder._logits`` does
(same dtype casts, float32 accumulation), so the result equals ``mismatch.rescore`` up to
float32 summation order (matmul blocking and the order of the logsumexp), ~1e-6.

The hidden states come from :func:`final_hidden_states`, which mirrors ``Decoder.__call__``
minus its last matmul. That duplication should go: the proposal for the decoder is a public
``Decoder.hidden_states(tokens_BT, positions_BT=None, valid_BT=None) -> x_BTD`` (after the final
norm) and ``Decoder.logits(x_BTD)``, with ``__call__`` = ``logits(hidden_states(...))``;
``tests/test_fused_rescore.py`` guards the mirror until then.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from rl_mismatch import mismatch
from rl_mismatch.models import decoder as dec


def final_hidden_states(model: dec.Decoder, tokens_BT: jax.Array, *, positions_BT=None,
                        valid_BT=None) -> jax.Array:
    """``Decoder.__call__`` without the LM head: final-normed hidden states [B, T, D] in
    ``model.dtype`` (see the module docstring for why this mirrors the decoder)."""
    B, T = tokens_BT.shape
    valid_BT = jnp.ones((B, T), bool) if valid_BT is None else valid_BT.astype(bool)
    if positions_BT is None:
        positions_BT = jnp.maximum(jnp.cumsum(valid_BT, axis=1) - 1, 0)
    allowed_BTS = jnp.tril(jnp.ones((T, T), bool))[None] & valid_BT[:, None, :]

    def keys_fn(k, v):
        return k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), allowed_BTS, None

    graphdef, state = nnx.split(model.blocks)

    def body(x, block_state):
        x, _ = nnx.merge(graphdef, block_state)(x, positions_BT, keys_fn)
        return x, None

    x, _ = jax.lax.scan(body, model._embed(tokens_BT), state)
    return dec._rms_norm(x, model.final_norm[...], model.config.rms_eps)


def _head(model: dec.Decoder) -> tuple[jax.Array, str]:
    """The LM-head weight in the compute dtype and the einsum that applies it to [M, D]."""
    if model.config.tie_embeddings:
        return model.embed[...].astype(model.dtype), "md,vd->mv"
    return model.lm_head[...].astype(model.dtype), "md,dv->mv"


def chunked_log_probs(h_MD: jax.Array, w: jax.Array, eq: str, targets_M: jax.Array, *,
                      temperature: float = 1.0, token_chunk: int = 64) -> jax.Array:
    """``log softmax(h W / temperature)[target]`` per row, ``token_chunk`` rows at a time."""
    M, D = h_MD.shape
    n = -(-M // token_chunk)
    pad = n * token_chunk - M
    h = jnp.pad(h_MD, ((0, pad), (0, 0))).reshape(n, token_chunk, D)
    y = jnp.pad(targets_M.astype(jnp.int32), (0, pad)).reshape(n, token_chunk)

    def one(args):
        h_cD, y_c = args
        z = jnp.einsum(eq, h_cD, w, preferred_element_type=jnp.float32)
        if temperature != 1.0:
            z = z / temperature
        return mismatch.token_log_probs(z, y_c)

    return jax.lax.map(one, (h, y)).reshape(-1)[:M]


def rescore_fused(model: dec.Decoder, tokens_BT: jax.Array, valid_BT: jax.Array | None = None, *,
                  positions_BT: jax.Array | None = None, response_mask_BT: jax.Array | None = None,
                  temperature: float = 1.0, score_from: int = 1, token_chunk: int = 64) -> jax.Array:
    """Same contract as :func:`rl_mismatch.mismatch.rescore`, without materialising the logits.

    Args:
      model: a ``Decoder`` (float32 master weights and the trainer's compute dtype).
      tokens_BT, valid_BT, positions_BT, response_mask_BT, temperature: as in ``rescore``.
      score_from: static; columns before it are 0 without being scored (pass the rollout's
        ``prompt_width``: its response starts there). Must be >= 1.
      token_chunk: static; positions per LM-head chunk (~``token_chunk × V × 4`` bytes live).

    Returns:
      float32 ``logp_BT``, equal to ``rescore``'s up to float32 summation order wherever
      ``rescore``'s is non-zero at or after ``score_from``.
    """
    B, T = tokens_BT.shape
    if not 1 <= score_from < T:
        raise ValueError(f"score_from={score_from} must lie in [1, {T}): column 0 has no predecessor "
                         "and at least one column must be scored.")
    if not (isinstance(temperature, (int, float)) and temperature > 0):
        raise ValueError(f"temperature must be a positive Python number, got {temperature!r}.")
    if token_chunk <= 0:
        raise ValueError(f"token_chunk must be positive, got {token_chunk}.")
    valid_BT = jnp.ones((B, T), bool) if valid_BT is None else valid_BT.astype(bool)
    h_BTD = final_hidden_states(model, tokens_BT, positions_BT=positions_BT, valid_BT=valid_BT)
    # Column t is predicted from column t − 1: queries [score_from − 1, T − 1), targets [score_from, T).
    h_MD = h_BTD[:, score_from - 1:T - 1].reshape(-1, h_BTD.shape[-1])
    targets_M = tokens_BT[:, score_from:].reshape(-1)
    w, eq = _head(model)
    lp = chunked_log_probs(h_MD, w, eq, targets_M, temperature=temperature,
                           token_chunk=token_chunk).reshape(B, T - score_from)
    lp_BT = jnp.concatenate([jnp.zeros((B, score_from), jnp.float32), lp], axis=1)
    # The same keep rule as mismatch.rescore: a real token whose predecessor is real.
    keep_BT = valid_BT & jnp.concatenate([jnp.zeros((B, 1), bool), valid_BT[:, :-1]], axis=1)
    if response_mask_BT is not None:
        keep_BT &= response_mask_BT.astype(bool)
    return jnp.where(keep_BT, lp_BT, 0.0)
