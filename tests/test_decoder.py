"""The NNX decoder: KV-cache decoding equals the full-sequence forward; numerics; config errors."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rl_mismatch.models import attention, decoder
from rl_mismatch.models.config import ModelConfig, tiny_config
from rl_mismatch.models.decoder import Decoder
from rl_mismatch.models.kv_cache import grow_cache, init_cache
from rl_mismatch.models.loading import from_hf_state_dict, to_hf_state_dict

VARIANTS = {
    "llama_tied": dict(),
    "qwen2_bias_untied": dict(qkv_bias=True, tie_embeddings=False, architecture="Qwen2ForCausalLM"),
    "qwen3_qknorm": dict(qk_norm=True, architecture="Qwen3ForCausalLM", rope_theta=5000.0),
}


def _randomise(model):
    """Biases and norm scales start at 0/1; give them random values so they are exercised."""
    graphdef, state = nnx.split(model)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(7), len(leaves))
    leaves = [x + 0.1 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
    return nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))


def _left_padded(B, T, pads, vocab, seed=0):
    tokens = np.asarray(jax.random.randint(jax.random.key(seed), (B, T), 0, vocab))
    valid = np.arange(T)[None, :] >= np.asarray(pads)[:, None]
    return jnp.asarray(np.where(valid, tokens, 0)), jnp.asarray(valid)


@pytest.mark.parametrize("variant,causal_block", [(v, 128) for v in sorted(VARIANTS)] + [("llama_tied", 4)])
def test_kv_cache_decode_equals_full_forward(variant, causal_block, monkeypatch):
    # causal_block 4: the full forward's attention runs in query blocks of 4 (14 = 4+4+4+2),
    # each against the keys up to its end; the decode path never blocks.
    monkeypatch.setattr(attention, "CAUSAL_BLOCK", causal_block)
    cfg = tiny_config(**VARIANTS[variant])
    model = _randomise(Decoder(cfg, rngs=nnx.Rngs(0)))
    pads = [0, 3, 7, 1]  # mixed prompt lengths in one batch (left padding)
    tokens, valid = _left_padded(4, 14, pads, cfg.vocab_size)
    full = model(tokens, valid_BT=valid)

    prefill = 9  # prompt part; then one token at a time
    cache = init_cache(cfg, batch=4, max_len=16)
    logits, cache = model.decode(tokens[:, :prefill], cache, valid_BT=valid[:, :prefill])
    pieces = [logits]
    for t in range(prefill, 14):
        logits, cache = model.decode(tokens[:, t:t + 1], cache)
        pieces.append(logits)
    incremental = jnp.concatenate(pieces, axis=1)
    assert int(cache.index) == 14
    # fp32 throughout; the two paths sum attention over the same keys in a different
    # association (cache slots vs. a TxT block), so they agree to a few ulp of O(1) logits.
    np.testing.assert_allclose(np.where(valid[..., None], incremental, 0),
                               np.where(valid[..., None], full, 0), atol=2e-5, rtol=0)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("T", [1, 8])
def test_half_precision_attention_layout_changes_no_value(dtype, T):
    """In half precision `attention` hands XLA the queries as [B, K, G, T, H] (a layout choice for
    speed); the result must be that of the plain [B, T, K, G, H] contraction, bit for bit."""
    B, N, K, H, S = 3, 6, 2, 8, 11
    ks = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(ks[0], (B, T, N, H)).astype(dtype)
    k, v = (jax.random.normal(key, (B, K, S, H)).astype(dtype) for key in ks[1:])
    allowed = jnp.asarray(np.random.default_rng(0).random((B, T, S)) < 0.7).at[:, :, 0].set(True)

    def plain(q, k, v, allowed):
        scores = jnp.einsum("btkgh,bksh->bkgts", q.reshape(B, T, K, N // K, H), k,
                            preferred_element_type=jnp.float32) * (H ** -0.5)
        probs = jax.nn.softmax(jnp.where(allowed[:, None, None], scores, attention.NEG_INF), axis=-1)
        out = jnp.einsum("bkgts,bksh->bkgth", probs.astype(dtype), v, preferred_element_type=jnp.float32)
        return out.astype(dtype).transpose(0, 3, 1, 2, 4).reshape(B, T, N, H)

    np.testing.assert_array_equal(np.asarray(jax.jit(attention.attention)(q, k, v, allowed), np.float32),
                                  np.asarray(jax.jit(plain)(q, k, v, allowed), np.float32))


@pytest.mark.parametrize("T,block", [(20, 8), (21, 8), (9, 16), (7, 1)])
def test_causal_attention_in_blocks_equals_one_block(T, block):
    B, N, K, H = 3, 4, 2, 8
    q, k, v = (jax.random.normal(jax.random.key(i), shape) for i, shape in
               enumerate([(B, T, N, H), (B, K, T, H), (B, K, T, H)]))
    valid = jnp.arange(T)[None, :] >= jnp.array([[0], [2], [5]])  # left padding
    allowed = jnp.tril(jnp.ones((T, T), bool))[None] & valid[:, None, :]
    full = attention.attention(q, k, v, allowed)
    blocked = attention.causal_attention(q, k, v, allowed, block=block)
    # Every query with an allowed key sums the same nonzero terms (masked ones are exact
    # zeros); only the summation's length differs, so a few float32 ulp of O(1) outputs.
    np.testing.assert_allclose(np.where(valid[:, :, None, None], blocked, 0),
                               np.where(valid[:, :, None, None], full, 0), rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-5), ("bfloat16", 3 * 2.0 ** -8), ("float16", 3 * 2.0 ** -11)])
def test_attention_gradient_within_its_rounding(dtype, tol):
    """`_softmax_attention`'s hand-written backward pass (through `causal_attention`'s query
    blocks, with left padding) against float64 `jax.grad` of plain softmax attention on the same
    inputs. Beyond float32 arithmetic it rounds P (for dV) and dS (for dQ, dK) to the compute
    dtype, then each gradient; a key in both query blocks adds its two rounded gradients in that
    dtype. So at most three roundings of relative size u (2^-8 bf16, 2^-11 fp16) per entry: each
    must lie within 3u (1e-5 in float32) of the magnitude of its terms: Σ_t P|g| for dV and
    Σ |dS-terms| · |K| or |Q| for dQ and dK, with |dS| ≤ P(|dP| + |rowsum(P dP)|)/√H bounding the
    terms before the cancellation in dP − rowsum."""
    B, T, N, K, H = 3, 20, 4, 2, 16
    G = N // K
    ks = jax.random.split(jax.random.key(3), 4)
    q, w = (jax.random.normal(key, (B, T, N, H)).astype(dtype) for key in ks[:2])
    k, v = (jax.random.normal(key, (B, K, T, H)).astype(dtype) for key in ks[2:])
    valid = jnp.arange(T)[None, :] >= jnp.array([[0], [3], [9]])
    allowed = jnp.tril(jnp.ones((T, T), bool))[None] & valid[:, None, :]
    w = jnp.where(valid[:, :, None, None], w, 0)  # padding queries' outputs are never read

    def loss(q, k, v):
        return jnp.sum(attention.causal_attention(q, k, v, allowed, block=8).astype(jnp.float32) * w)

    grads = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
    assert [x.dtype for x in grads] == [jnp.dtype(dtype)] * 3
    q64, k64, v64, w64 = (np.asarray(x, np.float64) for x in (q, k, v, w))
    mask = np.asarray(allowed)[:, None, None]

    def plain_probs(q, k):  # [B, T, N, H] queries, no blocks, JAX's own differentiation
        s = jnp.einsum("btkgh,bksh->bkgts", q.reshape(B, T, K, G, H), k) / np.sqrt(H)
        return jnp.where(mask, jax.nn.softmax(jnp.where(mask, s, -jnp.inf), axis=-1), 0)

    def plain(q, k, v):
        return jnp.einsum("bkgts,bksh->btkgh", plain_probs(q, k), v).reshape(B, T, N, H)

    with jax.enable_x64():
        ref = jax.grad(lambda *a: jnp.sum(plain(*a) * w64), argnums=(0, 1, 2))(q64, k64, v64)
        probs = np.asarray(plain_probs(q64, k64))
    g = w64.reshape(B, T, K, G, H)
    dprobs = np.einsum("btkgh,bksh->bkgts", g, v64)
    ds_size = probs * (np.abs(dprobs) + np.abs((probs * dprobs).sum(-1, keepdims=True))) / np.sqrt(H)
    sizes = (np.einsum("bkgts,bksh->btkgh", ds_size, np.abs(k64)).reshape(B, T, N, H),
             np.einsum("bkgts,btkgh->bksh", ds_size, np.abs(q64).reshape(B, T, K, G, H)),
             np.einsum("bkgts,btkgh->bksh", probs, np.abs(g)))
    for name, got, want, size in zip("qkv", grads, ref, sizes):
        err = np.abs(np.asarray(got, np.float64) - np.asarray(want))
        assert np.all(err <= tol * size + 1e-30), (name, float((err / (size + 1e-30)).max()))


def _runs_of(G, prefix, T, run_pads, ends, vocab, seed=0):
    """Runs of G rows sharing their first ``prefix`` columns (a GRPO batch): left padding per run,
    each row's own end (right padding after it)."""
    rng = np.random.default_rng(seed)
    runs = len(run_pads)
    shared = np.repeat(rng.integers(1, vocab, (runs, prefix)), G, axis=0)
    tokens = np.concatenate([shared, rng.integers(1, vocab, (runs * G, T - prefix))], axis=1)
    col = np.arange(T)[None]
    valid = (col >= np.repeat(run_pads, G)[:, None]) & (col < np.asarray(ends)[:, None])
    return jnp.asarray(tokens, jnp.int32), jnp.asarray(valid)


@pytest.mark.parametrize("variant,causal_block", [("qwen2_bias_untied", 128), ("qwen3_qknorm", 4)])
def test_grouped_hidden_states_equal_the_full_forward(variant, causal_block, monkeypatch):
    """Each run's shared columns computed once (`grouped_hidden_states`) against every row in
    full: float32, the same terms with the keys in the same order, only the matmuls' blocking
    differs, so the forward agrees to the KV-cache test's 2e-5 and the gradient of every
    parameter to 1e-5 of its largest entry (test_rescore's bound for the same kind of change).
    Runs with different left padding, one padded past the shared columns; rows ending early.
    The two variants between them have every optional part (biases, untied head, q/k norms;
    the plain tied model is test_rescore's and the train step's); causal_block 4: the shared
    columns' attention runs in query blocks."""
    monkeypatch.setattr(attention, "CAUSAL_BLOCK", causal_block)
    cfg = tiny_config(**VARIANTS[variant])
    graphdef, params = nnx.split(_randomise(Decoder(cfg, rngs=nnx.Rngs(0))))
    G, prefix, T = 3, 9, 15
    tokens, valid = _runs_of(G, prefix, T, [0, 2, 10], [15, 12, 10, 15, 14, 13, 15, 11, 15], cfg.vocab_size)
    own = valid[:, prefix:, None]  # padding positions' outputs are never read
    weights = jax.random.normal(jax.random.key(1), (9, T - prefix, cfg.d_model))

    def hidden(p, grouped):
        model = nnx.merge(graphdef, p)
        if grouped:
            return model.grouped_hidden_states(tokens, prefix=prefix, group=G, valid_BT=valid)
        return model.hidden_states(tokens, valid_BT=valid)[:, prefix:]

    full, got = (np.where(own, hidden(params, g), 0) for g in (False, True))
    assert got.shape == (9, T - prefix, cfg.d_model)
    np.testing.assert_allclose(got, full, atol=2e-5, rtol=0)
    grads = [jax.grad(lambda p: jnp.sum(jnp.where(own, hidden(p, g), 0) * weights))(params) for g in (False, True)]
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(grads[0]), jax.tree.leaves(grads[1])):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=0, atol=1e-5 * float(jnp.max(jnp.abs(a))),
                                   err_msg=jax.tree_util.keystr(path))
    model = nnx.merge(graphdef, params)
    for kwargs, match in (({"prefix": 0, "group": G}, "prefix=0"), ({"prefix": T, "group": G}, "prefix=15"),
                          ({"prefix": prefix, "group": 4}, "group=4")):
        with pytest.raises(ValueError, match=match):
            model.grouped_hidden_states(tokens, valid_BT=valid, **kwargs)


def test_grown_cache_decodes_like_one_allocation():
    cfg = tiny_config()
    model = _randomise(Decoder(cfg, rngs=nnx.Rngs(0)))
    tokens, valid = _left_padded(4, 14, [0, 3, 7, 1], cfg.vocab_size)

    def run(cache, grow_at=None):
        logits, cache = model.decode(tokens[:, :9], cache, valid_BT=valid[:, :9])
        pieces = [logits]
        for t in range(9, 14):
            if t == grow_at:
                cache = grow_cache(cache, 16)
            logits, cache = model.decode(tokens[:, t:t + 1], cache)
            pieces.append(logits)
        return jnp.concatenate(pieces, axis=1), cache

    whole, _ = run(init_cache(cfg, batch=4, max_len=16))
    grown, cache = run(init_cache(cfg, batch=4, max_len=11), grow_at=11)
    assert cache.k[0][0].shape[2] == 16 and int(cache.index) == 14
    # Same keys; the bigger cache only adds masked slots (exact zeros in the softmax sums).
    np.testing.assert_allclose(np.where(valid[..., None], grown, 0), np.where(valid[..., None], whole, 0),
                               atol=2e-5, rtol=0)
    with pytest.raises(ValueError, match="shrink"):
        grow_cache(cache, 8)
    # 14 of 16 slots used: three more tokens would be written over the last slots (a traced
    # dynamic_update_slice clamps its start), so an eager call refuses them.
    with pytest.raises(ValueError, match=r"3 new token\(s\) do not fit the KV cache: 2 of its 16 slots are free"):
        model.decode(tokens[:, :3], cache)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_cache_in_row_groups_changes_no_value(dtype):
    """A KV cache held in row groups (a layout choice for speed) decodes bit for bit as one
    buffer per layer: prefill, decoding steps, a cache growth, mixed left padding."""
    cfg = tiny_config()
    model = _randomise(Decoder(cfg, dtype=dtype, rngs=nnx.Rngs(0)))
    tokens, valid = _left_padded(6, 14, [0, 3, 7, 1, 5, 2], cfg.vocab_size)

    @jax.jit
    def run(cache):
        logits, cache = model.decode(tokens[:, :9], cache, valid_BT=valid[:, :9])
        pieces = [logits]
        for t in range(9, 14):
            if t == 11:
                cache = grow_cache(cache, 16)
            logits, cache = model.decode(tokens[:, t:t + 1], cache)
            pieces.append(logits)
        return jnp.concatenate(pieces, axis=1), cache

    one, _ = run(init_cache(cfg, batch=6, max_len=11, dtype=dtype))
    for groups in (2, 3):
        grouped, cache = run(init_cache(cfg, batch=6, max_len=11, dtype=dtype, row_groups=groups))
        assert cache.row_groups == groups and cache.k[0][0].shape == (6 // groups, cfg.n_kv_heads, 16, cfg.head_dim)
        np.testing.assert_array_equal(np.asarray(grouped), np.asarray(one))
    with pytest.raises(ValueError, match="row_groups=4 must be a positive divisor"):
        init_cache(cfg, batch=6, max_len=11, row_groups=4)


def test_left_down_projection_changes_no_value():
    """The bf16 decoding step's down projection with its transposed weight on the left (a speed
    choice on CPU, `_down_projection`) gives the plain matmul's result bit for bit, at SmolLM2's
    shape."""
    B, F, D = 64, 1536, 576
    assert decoder._left_down_projection(B, jnp.bfloat16)  # taken here (CPU, bf16, 64 rows)
    assert not decoder._left_down_projection(B, jnp.float32)
    assert not decoder._left_down_projection(decoder._LEFT_DOWN_MIN_ROWS - 1, jnp.bfloat16)
    kx, kw = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, (B, 1, F)).astype(jnp.bfloat16)
    w = (jax.random.normal(kw, (F, D)) * F ** -0.5).astype(jnp.bfloat16)
    w_DF = jnp.asarray(np.ascontiguousarray(np.asarray(w).T))  # as Decoder.decoding_layers makes it
    assert "optimization_barrier" in str(jax.make_jaxpr(decoder._down_projection)(x, w, w_DF))
    np.testing.assert_array_equal(
        np.asarray(jax.jit(decoder._down_projection)(x, w, w_DF), np.float32),
        np.asarray(jax.jit(lambda x, w: decoder._dot("btf,fd->btd", x, w))(x, w), np.float32))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_rope_gradient_is_the_inverse_rotation(dtype):
    """RoPE's backward pass (`_rotate`'s own rule, a speed choice on CPU) is the transpose of the
    rotation: against the float64 product of each position's [H, H] rotation matrix, built
    entry by entry, transposed, with the cotangent. Bound: float32 products and sums (2^-22 of
    the sum of |terms|) plus one rounding to the compute dtype. And it has none of the pads
    JAX's own rule makes of the halves' slices."""
    B, T, N, H, theta = 2, 7, 3, 8, 10_000.0
    kx, kg = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, (B, T, N, H)).astype(dtype)
    g = jax.random.normal(kg, (B, T, N, H)).astype(dtype)
    positions = jnp.array([[0, 1, 2, 3, 4, 5, 6], [0, 0, 0, 5, 1000, 1001, 40_000]])  # pads, far positions
    rope = lambda x: decoder._rope(x, positions, theta)
    out, vjp = jax.vjp(rope, x)
    (d_x,) = vjp(g)
    assert d_x.dtype == jnp.dtype(dtype)

    half = H // 2
    inv_freq = 1.0 / (theta ** (np.arange(half, dtype=np.float32) / half))
    angles = jnp.asarray(np.asarray(positions, np.float32)[..., None] * inv_freq)
    # XLA's own float32 cosines and sines, as the forward has them: the check is of the rotation.
    cos, sin = np.asarray(jnp.cos(angles), np.float64), np.asarray(jnp.sin(angles), np.float64)
    R = np.zeros((B, T, H, H))  # out[i] = sum_j R[i, j] x[j]
    for i in range(half):
        R[:, :, i, i] = R[:, :, i + half, i + half] = cos[..., i]
        R[:, :, i, i + half], R[:, :, i + half, i] = -sin[..., i], sin[..., i]
    g64 = np.asarray(g, np.float64)
    want = np.einsum("btji,btnj->btni", R, g64)  # R^T g
    terms = np.einsum("btji,btnj->btni", np.abs(R), np.abs(g64))
    unit = {"float32": 0.0, "bfloat16": 2.0 ** -8, "float16": 2.0 ** -11}[dtype]  # one rounding to dtype
    np.testing.assert_array_less(np.abs(np.asarray(d_x, np.float64) - want),
                                 2.0 ** -22 * terms + unit * np.abs(want) + 1e-30)
    # The forward is the rotation too, to the same bound.
    x64 = np.asarray(x, np.float64)
    np.testing.assert_array_less(np.abs(np.asarray(out, np.float64) - np.einsum("btij,btnj->btni", R, x64)),
                                 2.0 ** -22 * np.einsum("btij,btnj->btni", np.abs(R), np.abs(x64))
                                 + unit * np.abs(np.einsum("btij,btnj->btni", R, x64)) + 1e-30)
    assert "pad" not in str(jax.make_jaxpr(lambda x, g: jax.vjp(rope, x)[1](g))(x, g))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_silu_intermediates_recomputed_change_no_gradient(dtype, monkeypatch):
    """remat="none" keeps everything but the SiLU's float32 intermediates, which the backward pass
    recomputes from its input (`_silu_recomputed`, a speed and memory choice): the gradient is
    that of keeping them bit for bit, and the layer scan stacks fewer [layers, B, T, d_ff]
    arrays, none of them float32 in half precision."""
    cfg = tiny_config()
    graphdef, params = nnx.split(_randomise(Decoder(cfg, dtype=dtype, remat="none", rngs=nnx.Rngs(0))))
    tokens, valid = _left_padded(3, 10, [0, 4, 2], cfg.vocab_size)

    def loss(p):
        logits = nnx.merge(graphdef, p)(tokens, valid_BT=valid)
        return jnp.sum(jax.nn.log_softmax(logits)[..., 0] * valid)

    def mlp_stacks():  # dtypes of the forward layer scan's [layers, B, T, d_ff] outputs
        scan = next(e for e in jax.make_jaxpr(jax.grad(loss))(params).jaxpr.eqns if e.primitive.name == "scan")
        return [str(v.aval.dtype) for v in scan.outvars if v.aval.shape == (cfg.n_layers, 3, 10, cfg.d_ff)]

    recomputed, stacks = jax.jit(jax.grad(loss))(params), mlp_stacks()
    monkeypatch.setattr(decoder, "_silu_recomputed", decoder._silu)  # JAX's own linearisation
    kept, kept_stacks = jax.jit(jax.grad(loss))(params), mlp_stacks()
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(kept), jax.tree.leaves(recomputed)):
        np.testing.assert_array_equal(np.asarray(b), np.asarray(a), err_msg=str(path))
    assert len(stacks) < len(kept_stacks), (stacks, kept_stacks)
    if dtype != "float32":
        assert "float32" in kept_stacks and "float32" not in stacks, (stacks, kept_stacks)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("remat", ["layer", "projections", "none"])
def test_residuals_as_bits_change_no_gradient(dtype, remat, monkeypatch):
    """The layer scan's backward-pass residuals carried as uint16 bits (a speed choice on CPU,
    `_residuals_as_bits`) give the plain gradient bit for bit, and no half-precision stack is
    left for XLA to write in float32."""
    cfg = tiny_config()
    graphdef, params = nnx.split(_randomise(Decoder(cfg, dtype=dtype, remat=remat, rngs=nnx.Rngs(0))))
    tokens, valid = _left_padded(3, 10, [0, 4, 2], cfg.vocab_size)

    def loss(p):
        logits = nnx.merge(graphdef, p)(tokens, valid_BT=valid)
        return jnp.sum(jax.nn.log_softmax(logits)[..., 0] * valid)

    def stacked_dtypes(jaxpr):  # dtypes of the [layers, ...] outputs of the forward layer scan
        scan = next(e for e in jaxpr.eqns if e.primitive.name == "scan")
        return {str(v.aval.dtype) for v in scan.outvars if v.aval.shape[:1] == (cfg.n_layers,)}

    grad = jax.jit(jax.grad(loss))
    assert dtype not in stacked_dtypes(jax.make_jaxpr(jax.grad(loss))(params).jaxpr)
    with_bits = grad(params)
    monkeypatch.setattr(decoder, "_residuals_as_bits", lambda f: f)
    assert dtype in stacked_dtypes(jax.make_jaxpr(jax.grad(loss))(params).jaxpr)  # the check sees them
    plain = jax.jit(jax.grad(loss))(params)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(plain), jax.tree.leaves(with_bits)):
        np.testing.assert_array_equal(np.asarray(b), np.asarray(a), err_msg=str(path))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_norm_scale_gradient_is_a_float32_sum(dtype):
    """The RMSNorm scale's gradient is the sum over positions of cotangent x normed input, from
    exact float32 products summed in float32 (float64 reference): within 1e-5 of the sum of
    |terms| per feature, which JAX's own rule (a sum in the compute dtype) misses on every
    feature in bf16 and fp16; the input's gradient is JAX's own."""
    kx, kw, ks = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (8, 256, 64)).astype(dtype)
    w = jax.random.normal(kw, (8, 256, 64)).astype(dtype)
    scale = 1 + 0.1 * jax.random.normal(ks, (64,))

    def loss(scale, x):
        return jnp.sum((decoder._rms_norm(x, scale, 1e-6) * w).astype(jnp.float32))

    d_scale, d_x = jax.grad(loss, argnums=(0, 1))(scale, x)
    assert d_scale.dtype == jnp.float32 and d_x.dtype == jnp.dtype(dtype)
    x64 = np.asarray(x, np.float64)
    normed = x64 / np.sqrt(np.mean(x64 ** 2, axis=-1, keepdims=True) + 1e-6)
    normed = np.asarray(jnp.asarray(normed, jnp.float32).astype(dtype), np.float64)  # as the forward rounds it
    terms = np.asarray(w, np.float64) * normed
    np.testing.assert_array_less(np.abs(np.asarray(d_scale, np.float64) - terms.sum(axis=(0, 1))),
                                 1e-5 * np.abs(terms).sum(axis=(0, 1)))

    def plain_rms_norm(x):  # the same forward under JAX's own differentiation rules
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + 1e-6)
        return scale.astype(x.dtype) * normed.astype(x.dtype)

    d_x_plain = jax.grad(lambda x: jnp.sum((plain_rms_norm(x) * w).astype(jnp.float32)))(x)
    np.testing.assert_array_equal(np.asarray(d_x, np.float32), np.asarray(d_x_plain, np.float32))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_bias_and_embedding_gradients_are_float32_sums(dtype):
    """A bias's gradient (the cotangent summed over positions) and an embedding row's (summed over
    the positions holding its token, here ~500 each) are float32 sums: float64 reference, within
    1e-5 of the sum of |terms|; cotangents in the compute dtype as the backward pass has them."""
    kg, kb, kt, ke = jax.random.split(jax.random.key(1), 4)
    g = (jax.random.normal(kg, (8, 256, 3, 16)) + 0.5).astype(dtype)  # a mean, so sums do not cancel
    bias = 0.1 * jax.random.normal(kb, (3, 16))
    _, vjp = jax.vjp(lambda b: decoder._add_bias(jnp.zeros(g.shape, dtype), b), bias)
    (d_bias,) = vjp(g)
    g64 = np.asarray(g, np.float64)
    assert d_bias.dtype == jnp.float32
    np.testing.assert_array_less(np.abs(np.asarray(d_bias) - g64.sum(axis=(0, 1))),
                                 1e-5 * np.abs(g64).sum(axis=(0, 1)))

    cfg = tiny_config()
    model = Decoder(cfg, dtype=dtype, rngs=nnx.Rngs(0))
    tokens = jax.random.randint(kt, (8, 256), 0, 4)  # four distinct tokens
    g = (jax.random.normal(ke, (8, 256, cfg.d_model)) + 0.5).astype(dtype)
    graphdef, state = nnx.split(model)
    _, vjp = jax.vjp(lambda s: nnx.merge(graphdef, s)._embed(tokens), state)
    (d_state,) = vjp(g)
    d_embed = np.asarray(d_state["embed"][...])
    g64, onehot = np.asarray(g, np.float64), np.eye(cfg.vocab_size)[np.asarray(tokens)]
    expected = np.einsum("btv,btd->vd", onehot, g64)
    bound = np.einsum("btv,btd->vd", onehot, np.abs(g64))
    assert d_embed.dtype == np.float32
    np.testing.assert_array_less(np.abs(d_embed - expected), 1e-5 * bound + 1e-30)  # 0 = 0 for unseen tokens


def test_padding_does_not_change_a_sequence():
    """A left-padded row gives the same logits as the same tokens unpadded (positions reset)."""
    cfg = tiny_config()
    model = _randomise(Decoder(cfg, rngs=nnx.Rngs(1)))
    tokens, valid = _left_padded(1, 10, [4], cfg.vocab_size, seed=3)
    padded = model(tokens, valid_BT=valid)[0, 4:]
    alone = model(tokens[:, 4:])[0]
    np.testing.assert_allclose(padded, alone, atol=2e-5, rtol=0)


def test_logits_float32_for_every_compute_dtype():
    cfg = tiny_config()
    tokens = jnp.zeros((2, 5), jnp.int32)
    for dtype in (jnp.float32, jnp.bfloat16, jnp.float16):
        model = Decoder(cfg, dtype=dtype, rngs=nnx.Rngs(0))
        assert model(tokens).dtype == jnp.float32
        logits, cache = model.decode(tokens, init_cache(cfg, batch=2, max_len=8, dtype=dtype))
        assert logits.dtype == jnp.float32 and cache.k[0][0].dtype == dtype


def test_bf16_compute_differs_from_fp32_by_bf16_rounding():
    """bf16 compute over the same weights perturbs logits at bf16's precision, not more."""
    cfg = tiny_config()
    model = _randomise(Decoder(cfg, rngs=nnx.Rngs(0)))
    tokens, valid = _left_padded(2, 12, [0, 2], cfg.vocab_size)
    ref = model(tokens, valid_BT=valid)
    model.dtype = jnp.dtype(jnp.bfloat16)
    low = model(tokens, valid_BT=valid)
    err = float(jnp.max(jnp.abs(low - ref)))
    # bf16 has 8 significant bits (rel. 2^-9 per rounding); a 2-layer model rounds each
    # activation a handful of times, so errors of ~1e-2 on O(1) logits, and not 0.
    assert 1e-4 < err < 0.1


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_silu_rounds_like_torch(dtype):
    """The MLP's SiLU rounds once, as torch's half-precision kernel (HF's act_fn) does."""
    import torch

    x32 = np.asarray(3 * jax.random.normal(jax.random.key(0), (4096,)), np.float32)
    x = jnp.asarray(x32).astype(dtype)
    # np.array copies: torch.from_numpy warns on the read-only view of a JAX array.
    theirs = torch.nn.functional.silu(torch.from_numpy(np.array(x.astype(jnp.float32))).to(getattr(torch, dtype)))
    theirs = theirs.float().numpy()
    ours = np.asarray(decoder._silu(x).astype(jnp.float32))
    # One rounding of a float32 SiLU on both sides: equal, except where the two float32
    # sigmoids (their last bits differ) straddle a rounding boundary, and then by one ulp
    # (checked as <= eps * |value|, which is between one and two ulps of the value).
    assert np.mean(ours != theirs) < 1e-3
    ulp = np.asarray(jnp.finfo(dtype).eps, np.float32) * np.maximum(np.abs(theirs), np.float32(jnp.finfo(dtype).tiny))
    assert np.all(np.abs(ours - theirs) <= ulp)
    # Rounding in between (jax.nn.silu in half precision) differs in a good share of elements,
    # so the two checks above are real.
    assert np.mean(np.asarray(jax.nn.silu(x).astype(jnp.float32)) != theirs) > 0.1
    np.testing.assert_array_equal(decoder._silu(jnp.asarray(x32)), jax.nn.silu(jnp.asarray(x32)))


def test_hf_state_dict_round_trip_and_shape_error():
    cfg = tiny_config(qkv_bias=True, tie_embeddings=False, architecture="Qwen2ForCausalLM")
    model = _randomise(Decoder(cfg, rngs=nnx.Rngs(0)))
    sd = to_hf_state_dict(model)
    again = from_hf_state_dict(cfg, sd)
    tokens = jnp.arange(10)[None] % cfg.vocab_size
    np.testing.assert_array_equal(again(tokens), model(tokens))
    sd["model.layers.1.mlp.up_proj.weight"] = sd["model.layers.1.mlp.up_proj.weight"][:, :-1]
    with pytest.raises(ValueError, match="up_proj.*shape"):
        from_hf_state_dict(cfg, sd)
    del sd["model.norm.weight"]
    with pytest.raises(ValueError, match="model.norm.weight"):
        from_hf_state_dict(cfg, sd)


def test_config_validation():
    with pytest.raises(ValueError, match="multiple of n_kv_heads"):
        tiny_config(n_heads=4, n_kv_heads=3)
    with pytest.raises(ValueError, match="d_model"):
        tiny_config(d_model=0)
    with pytest.raises(ValueError, match="Unsupported architecture 'GPT2LMHeadModel'"):
        ModelConfig.from_hf_config({"architectures": ["GPT2LMHeadModel"]})
    # What the decoder does not implement is refused, not silently ignored.
    qwen2 = tiny_config(qkv_bias=True, architecture="Qwen2ForCausalLM").to_hf_config()
    assert ModelConfig.from_hf_config({**qwen2, "use_sliding_window": False, "sliding_window": 64}).qkv_bias
    with pytest.raises(ValueError, match="Sliding-window attention .* window 64"):
        ModelConfig.from_hf_config({**qwen2, "use_sliding_window": True, "sliding_window": 64})
    with pytest.raises(ValueError, match="RoPE scaling type 'yarn'"):
        ModelConfig.from_hf_config({**qwen2, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(ValueError, match="context"):
        init_cache(tiny_config(), batch=1, max_len=10_000)
    # Dtype names as everywhere else in the project ('bf16', 'fp16'), or a clear error.
    model = Decoder(tiny_config(), dtype="bf16", param_dtype="fp32", rngs=nnx.Rngs(0))
    assert (model.dtype, model.embed[...].dtype) == (jnp.bfloat16, jnp.float32)
    assert init_cache(tiny_config(), batch=1, max_len=8, dtype="fp16").k[0][0].dtype == jnp.float16
    with pytest.raises(ValueError, match="Unknown dtype name 'bf17'"):
        Decoder(tiny_config(), dtype="bf17", rngs=nnx.Rngs(0))


def test_full_forward_compiles_once_per_shape(count_compiles):
    cfg = tiny_config()
    graphdef, state = nnx.split(Decoder(cfg, rngs=nnx.Rngs(0)))
    fwd = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))
    other = jnp.ones((2, 8), jnp.int32)
    jax.block_until_ready(fwd(state, jnp.zeros((2, 8), jnp.int32)))
    with count_compiles() as compiles:
        jax.block_until_ready(fwd(state, other))
    assert compiles.n == 0


def test_import_rl_mismatch_is_light():
    code = ("import sys, rl_mismatch; heavy = [m for m in ('flax', 'torch', 'tensorflow_datasets', "
            "'tensorflow', 'transformers') if m in sys.modules]; print(heavy); assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True)
