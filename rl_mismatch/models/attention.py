"""Grouped-query softmax attention for `rl_mismatch.models.decoder`: the full-sequence causal
form (in query blocks), a group's shared prompt, and a decoding step against a KV cache held
in row groups. Softmax in float32; every matmul takes compute-dtype operands and accumulates in
float32, in the backward pass too (`_softmax_attention`).

Layouts: queries [B, T, N, H] (N query heads); keys and values [B, K, S, H] (K KV heads, S key
slots); ``allowed_BTS`` says which key slot each query may see. Query head n uses KV head
n // (N / K).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NEG_INF = -1e30  # finite "minus infinity" for masked scores: exp underflows to exactly 0, no NaN.

# Query positions per block of the full-sequence (causal) attention, see `causal_attention`.
CAUSAL_BLOCK = 128


def causal_attention(q_BTNH, k_BKSH, v_BKSH, allowed_BTS, block: int | None = None) -> jax.Array:
    """`attention` of a full sequence (query t is key slot t, keys after it never allowed),
    ``block`` (default ``CAUSAL_BLOCK``) query positions at a time, each block against the
    keys up to its last position.

    The key blocks above the diagonal are all masked, so skipping them leaves every query with
    an allowed key the same terms to sum (the masked scores' ``exp`` is exactly 0), summed over
    shorter rows: equal up to summation order (bitwise in the micro-benchmark, last float32
    bits in SmolLM2's forward). Only a query with no allowed key (left padding, whose output
    nothing reads) averages over fewer values. It saves those blocks' matmuls and elementwise
    passes: at T = 256 the blocks hold 3/4 of the [T, T] scores, and SmolLM2's 30 layers of
    attention, forward + recomputed forward + backward, took 1.13 vs 1.48 s (fp32) and 1.30
    vs 1.65 s (bf16) on CPU (benchmarks/README.md).
    """
    block = CAUSAL_BLOCK if block is None else block
    T = q_BTNH.shape[1]
    if T <= block:
        return attention(q_BTNH, k_BKSH, v_BKSH, allowed_BTS)
    outs = []
    for start in range(0, T, block):
        stop = min(T, start + block)
        outs.append(attention(q_BTNH[:, start:stop], k_BKSH[:, :, :stop], v_BKSH[:, :, :stop],
                               allowed_BTS[:, start:stop, :stop]))
    return jnp.concatenate(outs, axis=1)


def attention(q_BTNH, k_BKSH, v_BKSH, allowed_BTS) -> jax.Array:
    """Grouped-query attention; query head n uses KV head n // (N / K). Softmax in float32.

    Keys and values are laid out [B, K, S, H] (heads before slots) so that both matmuls have
    their batch dimensions (b, k) leading: with [B, S, K, H] XLA transposes the whole KV cache
    on every decoding step, which made decoding ~5x slower and its cost grow with the cache size.
    In half precision the queries are laid out [B, K, G, T, H] before the score matmul: given
    [B, T, K, G, H], XLA:CPU made the keys the matmul's left operand and copied the queries into
    a [B, K, H, G·T] layout with the rotary embedding fused in, a slow strided copy of 2-byte
    elements (the bf16 batch-64 sampler is faster without it). In float32 XLA's own choice is
    the faster one (the same change made fp32 `generate` slower), so it stays.
    Both give the same scores: only the layout differs (benchmarks/README.md). The backward
    pass is `_softmax_attention`'s.
    """
    B, T, N, H = q_BTNH.shape
    K = k_BKSH.shape[1]
    q = q_BTNH.reshape(B, T, K, N // K, H)
    if q.dtype != jnp.float32:
        q = q.transpose(0, 2, 3, 1, 4)
    return _softmax_attention(q, k_BKSH, v_BKSH, allowed_BTS).transpose(0, 3, 1, 2, 4).reshape(B, T, N, H)


def _masked_scores(q, k_BKSH, allowed_BTS):
    """Scaled float32 scores [B, K, G, T, S] of queries laid out [B, T, K, G, H] (float32) or
    [B, K, G, T, H] (half precision, see `attention`); ``NEG_INF`` where not allowed."""
    eq = "btkgh,bksh->bkgts" if q.dtype == jnp.float32 else "bkgth,bksh->bkgts"
    scores = jnp.einsum(eq, q, k_BKSH, preferred_element_type=jnp.float32) * (q.shape[-1] ** -0.5)
    return jnp.where(allowed_BTS[:, None, None], scores, NEG_INF)


def _softmax_attention_fwd(q, k_BKSH, v_BKSH, allowed_BTS):
    probs = jax.nn.softmax(_masked_scores(q, k_BKSH, allowed_BTS), axis=-1)
    # Output with the batch dims leading, transposed by the caller: XLA:CPU has no bf16 x bf16 -> f32
    # kernel for the batch-dims-inside layout "->btkgh".
    out = jnp.einsum("bkgts,bksh->bkgth", probs.astype(v_BKSH.dtype), v_BKSH,
                     preferred_element_type=jnp.float32).astype(q.dtype)
    return out, (q, k_BKSH, v_BKSH, allowed_BTS, probs)


@jax.custom_vjp
def _softmax_attention(q, k_BKSH, v_BKSH, allowed_BTS):
    """``softmax(q kᵀ / √H, masked) v`` as [B, K, G, T, H] in ``q``'s dtype; ``q`` as in
    `_masked_scores`. The probabilities P are float32, rounded to the compute dtype for the
    value matmul.

    Backward pass (the standard softmax-attention gradient, written out so that every matmul
    takes compute-dtype operands and accumulates in float32, like the projections'
    `_mixed_einsum`): with g the output's cotangent,

        dV = round(P)ᵀ g,   dP = g Vᵀ,   dS = P ⊙ (dP − rowsum(P ⊙ dP)) / √H  (zero where masked),
        dQ = round(dS) K,   dK = round(dS)ᵀ Q,

    P, dP and dS in float32, ``round`` to the compute dtype (a no-op in float32). JAX's own rule
    for the same forward fed the float32 dP and dS to float32 x half-precision matmuls; the only
    new rounding is dS's, at most half an ulp of the compute dtype per element, the precision at
    which the projections already round their cotangents. It skips the elementwise passes of
    JAX's separate mask, scale, softmax and cast rules: the bf16 SmolLM2 layer-stack gradient
    took 3.31 → 3.03 s and the train step 4.13 → 3.94 s on CPU (benchmarks/README.md).
    """
    return _softmax_attention_fwd(q, k_BKSH, v_BKSH, allowed_BTS)[0]


def _softmax_attention_bwd(residuals, g_BKGTH):
    q, k_BKSH, v_BKSH, allowed_BTS, probs = residuals
    g = g_BKGTH.astype(v_BKSH.dtype)
    dv = jnp.einsum("bkgts,bkgth->bksh", probs.astype(v_BKSH.dtype), g, preferred_element_type=jnp.float32)
    dprobs = jnp.einsum("bkgth,bksh->bkgts", g, v_BKSH, preferred_element_type=jnp.float32)
    dscores = probs * (dprobs - jnp.sum(probs * dprobs, axis=-1, keepdims=True)) * (q.shape[-1] ** -0.5)
    # A query with no allowed key (left padding) has uniform P over masked scores: their
    # gradient is zero all the same, as the forward's where() makes it.
    dscores = jnp.where(allowed_BTS[:, None, None], dscores, 0.0).astype(q.dtype)
    # These layouts are ones XLA:CPU has a bf16 x bf16 -> f32 kernel for (it rejects, e.g.,
    # "bkgth,bkgts->bkhs" for dK); float32 queries keep their [B, T, K, G, H] layout.
    q_eq = "btkgh" if q.dtype == jnp.float32 else "bkgth"
    dq = jnp.einsum(f"bkgts,bksh->{q_eq}", dscores, k_BKSH, preferred_element_type=jnp.float32)
    dk = jnp.einsum(f"bkgts,{q_eq}->bksh", dscores, q, preferred_element_type=jnp.float32)
    return dq.astype(q.dtype), dk.astype(k_BKSH.dtype), dv.astype(v_BKSH.dtype), None


_softmax_attention.defvjp(_softmax_attention_fwd, _softmax_attention_bwd)


def attention_in_row_groups(q_BTNH, k_groups, v_groups, allowed_BTS) -> jax.Array:
    """`attention` against a KV cache held in row groups (`rl_mismatch.models.kv_cache.KVCache`):
    each group of consecutive batch rows attends to its own key/value buffers, the outputs
    concatenated in row order. Rows never interact, so the result is that of one `attention`
    over the whole batch."""
    if len(k_groups) == 1:
        return attention(q_BTNH, k_groups[0], v_groups[0], allowed_BTS)
    n = len(k_groups)
    return jnp.concatenate([attention(*group) for group in zip(
        jnp.split(q_BTNH, n), k_groups, v_groups, jnp.split(allowed_BTS, n))], axis=0)


def grouped_attention(q, k, v, *, prefix, group, allowed_prefix, allowed_own):
    """Attention of `Decoder.grouped_hidden_states`' layout, one row per run of ``group``
    sequences: ``[runs, prefix + group · R, ·, H]``, the run's shared columns then its rows.

    The shared columns attend causally among themselves (`causal_attention`). Each row's own
    columns attend to the shared keys and values, repeated to the run's rows, followed by their
    own: the key order of the full sequence, so each query sums the same terms as in
    `Decoder.hidden_states`. ``allowed_prefix`` [runs, prefix, prefix] and ``allowed_own``
    [B, R, prefix + R] are the masks. Returns ``(out, None)`` in ``q``'s layout.
    """
    runs, _, N, H = q.shape
    B, R = runs * group, allowed_own.shape[1]
    heads_first = lambda x: x.transpose(0, 2, 1, 3)  # [., T, K, H] -> [., K, T, H]
    out_shared = causal_attention(q[:, :prefix], heads_first(k[:, :prefix]), heads_first(v[:, :prefix]),
                                   allowed_prefix)

    def with_shared(x):  # the run's shared keys before each row's own: [B, K, prefix + R, H]
        own = heads_first(x[:, prefix:].reshape(B, R, *x.shape[2:]))
        return jnp.concatenate([jnp.repeat(heads_first(x[:, :prefix]), group, axis=0), own], axis=2)

    out_own = attention(q[:, prefix:].reshape(B, R, N, H), with_shared(k), with_shared(v), allowed_own)
    return jnp.concatenate([out_shared, out_own.reshape(runs, group * R, N, H)], axis=1), None
