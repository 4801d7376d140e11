"""Tests for rescoring through a Decoder: the chunked LM head, and gradients through the
decoder's mixed-precision matmuls and rematerialised layers."""

import typing

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rl_mismatch import mismatch
from rl_mismatch.models import Decoder, tiny_config
from rl_mismatch.models.decoder import _REMAT_POLICIES, Remat, _mixed_einsum
from rl_mismatch.models.packing import run_spans

B, T, P = 3, 20, 10
# Both paths compute the same logits (same casts, float32 accumulation); only the matmul
# blocking (token chunks vs the whole [B, T]) and the logsumexp's summation order differ. For
# |logit| <= ~10 and V = 256 that is a few float32 ulps of 10: 1e-5 is a generous bound.
ATOL = 1e-5


def _inputs():
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(1, 256, (B, T)), jnp.int32)
    valid = jnp.asarray(np.arange(T)[None] >= np.array([[0], [5], [9]]))  # left padding, one row
    mask = valid & (jnp.arange(T) >= P)[None]                             # starts at its response
    return tokens, valid, mask


def _logits_only(model):
    """The same model seen as a plain logits function: rescore takes its unchunked path."""
    return lambda t, positions_BT=None, valid_BT=None: model(t, positions_BT=positions_BT, valid_BT=valid_BT)


@pytest.mark.parametrize("tie,dtype", [(True, "float32"), (False, "bfloat16")])
def test_chunked_equals_full_logits(tie, dtype):
    model = Decoder(tiny_config(tie_embeddings=tie), rngs=nnx.Rngs(0))
    model.dtype = jnp.dtype(dtype)  # fp32 master weights computing in dtype, as a trainer does
    tokens, valid, mask = _inputs()
    cases = (({"response_mask_BT": mask, "temperature": 0.7}, {"score_from": P, "token_chunk": 4}),
             ({}, {"token_chunk": 7}))  # chunks not dividing B·(T − 1)
    for kwargs, chunk_kwargs in cases:
        for fn in (mismatch.rescore, mismatch.rescore_with_entropy):
            ref = jax.jit(lambda t, v: fn(_logits_only(model), t, v, **kwargs))(tokens, valid)
            got = jax.jit(lambda t, v: fn(model, t, v, **kwargs, **chunk_kwargs))(tokens, valid)
            for r, g in zip(jax.tree.leaves(ref), jax.tree.leaves(got)):
                r, g = np.asarray(r), np.asarray(g)
                np.testing.assert_array_equal(r == 0, g == 0)  # the same columns are scored
                np.testing.assert_allclose(g, r, rtol=0, atol=ATOL)


def test_chunks_share_the_positions_equally(jaxpr_eqns):
    """token_chunk bounds a chunk: B·(T − P) = 30 positions under token_chunk=16 run as two chunks
    of 15 (no padding), not as 16 + 14 padded to 32 (the padding's LM-head work is wasted)."""
    model = Decoder(tiny_config(), rngs=nnx.Rngs(0))
    tokens, valid, mask = _inputs()

    def head_rows(token_chunk):  # rows of every LM-head matmul in the rescoring's jaxpr
        jaxpr = jax.make_jaxpr(lambda t, v: mismatch.rescore(
            model, t, v, response_mask_BT=mask, score_from=P, token_chunk=token_chunk))(tokens, valid)
        return {e.outvars[0].aval.shape[-2] for e, _ in jaxpr_eqns(jaxpr) if e.primitive.name == "dot_general"
                and any(v.aval.shape[-1:] == (model.config.vocab_size,) for v in e.outvars)}

    assert head_rows(16) == {15}
    assert head_rows(30) == {30} and head_rows(7) == {6}  # one chunk; five of 6 (7 would pad 5)


def test_score_from_zeroes_the_columns_before_it():
    model = Decoder(tiny_config(), rngs=nnx.Rngs(0))
    tokens, valid, _ = _inputs()
    full = np.asarray(mismatch.rescore(model, tokens, valid))
    cut = np.asarray(mismatch.rescore(model, tokens, valid, score_from=P))
    assert np.all(cut[:, :P] == 0)
    np.testing.assert_allclose(cut[:, P:], full[:, P:], rtol=0, atol=ATOL)


@pytest.mark.parametrize("remat,keep_logits", [("layer", False), ("projections", False), ("layer", True)])
def test_gradient_through_chunks_equals_gradient_through_logits(remat, keep_logits):
    # The chunked LM head (lax.map, its chunks recomputed in the backward pass or kept), the
    # layers' remat policy and the custom matmul VJP must not change the gradient: float32,
    # same function, only summation order differs.
    tokens, valid, mask = _inputs()

    def grad(remat, chunked):
        graphdef, params = nnx.split(Decoder(tiny_config(tie_embeddings=False), remat=remat, rngs=nnx.Rngs(2)))

        def loss(p):
            m = nnx.merge(graphdef, p)
            lp = mismatch.rescore(m if chunked else _logits_only(m), tokens, valid, response_mask_BT=mask,
                                  token_chunk=8, keep_logits=keep_logits)
            return jnp.sum(lp * jnp.linspace(-1.0, 1.0, T)[None])

        return jax.grad(loss)(params)

    g_ref = grad("none", chunked=False)
    g_chk = grad(remat, chunked=True)
    assert jax.tree.structure(g_ref) == jax.tree.structure(g_chk)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g_ref), jax.tree.leaves(g_chk)):
        scale = float(jnp.max(jnp.abs(a))) + 1e-12
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=0, atol=1e-5 * scale, err_msg=str(path))


def _groups(G=4, runs=2, prefix=P - 1):
    """``runs`` runs of G rows sharing their prompt (left-padded differently per run), then each
    row's own response of its own length."""
    rng = np.random.default_rng(1)
    shared = np.repeat(rng.integers(1, 256, (runs, prefix)), G, axis=0)
    tokens = jnp.asarray(np.concatenate([shared, rng.integers(1, 256, (runs * G, T - prefix))], axis=1), jnp.int32)
    col = np.arange(T)[None]
    ends = rng.integers(P + 1, T + 1, runs * G)
    valid = (col >= np.repeat(rng.integers(0, 4, runs), G)[:, None]) & (col < ends[:, None])
    return tokens, jnp.asarray(valid), jnp.asarray(valid & (col >= P))


def test_grouped_rescoring_equals_every_row_in_full():
    """rescore(group=G) computes each run's prompt once: the same log-probs and entropies
    (float32, only the matmuls' blocking differs: ATOL), the same columns scored, and the same
    gradient within test_gradient_through_chunks_equals_gradient_through_logits' bound."""
    model = Decoder(tiny_config(tie_embeddings=False), rngs=nnx.Rngs(0))
    tokens, valid, mask = _groups()
    for fn in (mismatch.rescore, mismatch.rescore_with_entropy):
        full, grouped = (jax.jit(lambda t, v, g=g: fn(model, t, v, response_mask_BT=mask, score_from=P, group=g,
                                                       token_chunk=8))(tokens, valid) for g in (1, 4))
        for r, g in zip(jax.tree.leaves(full), jax.tree.leaves(grouped)):
            np.testing.assert_array_equal(np.asarray(r) == 0, np.asarray(g) == 0)
            np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=0, atol=ATOL)
    graphdef, params = nnx.split(model)

    def grad(group):
        def loss(p):
            lp = mismatch.rescore(nnx.merge(graphdef, p), tokens, valid, response_mask_BT=mask, score_from=P,
                                  group=group)
            return jnp.sum(lp * jnp.linspace(-1.0, 1.0, T)[None])
        return jax.grad(loss)(params)

    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(grad(1)), jax.tree.leaves(grad(4))):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=0, atol=1e-5 * float(jnp.max(jnp.abs(a))),
                                   err_msg=jax.tree_util.keystr(path))
    with pytest.raises(ValueError, match="group=3 must be a positive int dividing the batch"):
        mismatch.rescore(model, tokens, valid, score_from=P, group=3)


def test_packed_rescoring_equals_every_row_in_full():
    """rescore(packed_width=W) lays each run's responses end to end: the same log-probs,
    entropies and gradient as every row in full (float32, only blocking and summation order
    differ: the bounds of test_grouped_rescoring_equals_every_row_in_full). One row has an
    invalid token inside its response (a hole its span keeps, masked as a key), one run has a
    row whose response is empty, and W is exactly the longest run's spans."""
    model = Decoder(tiny_config(tie_embeddings=False), rngs=nnx.Rngs(0))
    tokens, valid, mask = _groups()
    valid = valid.at[2, P + 2].set(False).at[5, P:].set(False)
    mask = mask & valid
    spans = np.asarray(run_spans(valid[:, P - 1:], 4))
    width = int(spans.max())
    assert width < 4 * (T - P + 1) and spans[1] < width  # packing saves columns; run 1 has empty slots
    for fn in (mismatch.rescore, mismatch.rescore_with_entropy):
        full, packed = (jax.jit(lambda t, v, kw=kw: fn(model, t, v, response_mask_BT=mask, score_from=P,
                                                       token_chunk=8, **kw))(tokens, valid)
                        for kw in ({}, {"group": 4, "packed_width": width}))
        for r, g in zip(jax.tree.leaves(full), jax.tree.leaves(packed)):
            np.testing.assert_array_equal(np.asarray(r) == 0, np.asarray(g) == 0)
            np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=0, atol=ATOL)
    graphdef, params = nnx.split(model)

    def grad(**kw):
        def loss(p):
            lp = mismatch.rescore(nnx.merge(graphdef, p), tokens, valid, response_mask_BT=mask, score_from=P, **kw)
            return jnp.sum(lp * jnp.linspace(-1.0, 1.0, T)[None])
        return jax.grad(loss)(params)

    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(grad()),
                            jax.tree.leaves(grad(group=4, packed_width=width))):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=0, atol=1e-5 * float(jnp.max(jnp.abs(a))),
                                   err_msg=jax.tree_util.keystr(path))
    with pytest.raises(ValueError, match="packed_width=-1 must be a non-negative int"):
        mismatch.rescore(model, tokens, valid, score_from=P, group=4, packed_width=-1)


def test_packed_width_too_small_scores_the_lost_columns_nan():
    """A run whose spans do not fit loses its last columns: exactly the scored tokens whose
    query was cut off read NaN (a loss over them is non-finite and the train step skips it; the
    step checks the width first), every other column is as with room to spare (up to ATOL)."""
    model = Decoder(tiny_config(), rngs=nnx.Rngs(0))
    tokens, valid, mask = _groups()
    spans = np.asarray(run_spans(valid[:, P - 1:], 4))
    width = int(spans.max())
    roomy, tight = (np.asarray(mismatch.rescore(model, tokens, valid, response_mask_BT=mask, score_from=P, group=4,
                                                packed_width=w)) for w in (width + 8, width - 3))
    lost = np.isnan(tight)
    longest = int(spans.argmax())
    last = 4 * longest + 3  # the longest run's last row loses its last 3 own columns, 2 of them scored
    assert lost.sum() == 2 and lost[last].sum() == 2 and np.all(lost[last, -2:] | ~np.asarray(mask)[last, -2:])
    np.testing.assert_allclose(tight[~lost], roomy[~lost], rtol=0, atol=ATOL)  # other widths, other blocking


def test_grouped_bf16_gradient_is_as_close_to_float32():
    """In bf16 the grouped path rounds as the full one does, except that a run's shared keys and
    values get their cotangents summed over the run's rows in bf16 (JAX's rule for the repeat)
    where the full path sums them inside float32 matmul accumulators: one more rounding (≤ 2^-9
    relative) per shared entry per layer, beside the ~2% the bf16 backward pass already differs
    from float32 by. So the grouped gradient may be further from float32 by a small fraction of
    that: at most 10% (measured: 1–2%)."""
    tokens, valid, mask = _groups(G=8, runs=2)

    def grad(dtype, group):
        graphdef, params = nnx.split(Decoder(tiny_config(), dtype=dtype, rngs=nnx.Rngs(0)))

        def loss(p):
            lp = mismatch.rescore(nnx.merge(graphdef, p), tokens, valid, response_mask_BT=mask, score_from=P,
                                  group=group)
            return jnp.sum(lp * jnp.linspace(-1.0, 1.0, T)[None])
        return jax.grad(loss)(params)

    ref = grad("float32", 1)
    errors = {g: [float(jnp.linalg.norm(a - b) / jnp.linalg.norm(a)) for a, b in
                  zip(jax.tree.leaves(ref), jax.tree.leaves(grad("bfloat16", g)))] for g in (1, 8)}
    assert 1e-3 < max(errors[1]) < 0.1  # bf16 really differs from float32, by its rounding
    for full, grouped in zip(errors[1], errors[8]):
        assert grouped <= 1.1 * full, (errors[1], errors[8])


def test_gradient_memory_holds_one_iteration_of_logits():
    # Under jax.grad, the scan over chunks keeps every chunk's float32 logits for the backward
    # pass unless the chunks are recomputed. Measured on the compiled gradient: with 8192 tokens
    # of vocabulary, 32 rows of 32 scored positions have [1024, V] logits of 33.6 MB; with
    # recomputation what is left of the LM head is one loop iteration's work, two 16-row chunks
    # of logits (1 MB) and their two LM-head gradients before they are added (2.1 MB each):
    # 8.4 MB of temporaries in all, against 40.5 MB keeping the logits.
    config = tiny_config(vocab_size=8192)
    graphdef, params = nnx.split(Decoder(config, rngs=nnx.Rngs(0)))
    tokens = jax.random.randint(jax.random.key(0), (32, 33), 0, config.vocab_size)
    logits_bytes = 32 * 32 * config.vocab_size * 4

    def temp_bytes_and_grad(keep_logits):
        def loss(p):
            return jnp.sum(mismatch.rescore(nnx.merge(graphdef, p), tokens, token_chunk=16,
                                            keep_logits=keep_logits))
        compiled = jax.jit(jax.grad(loss)).lower(params).compile()
        return compiled.memory_analysis().temp_size_in_bytes, compiled(params)

    recomputed, g_recomputed = temp_bytes_and_grad(False)
    kept, g_kept = temp_bytes_and_grad(True)
    assert kept > logits_bytes          # the measurement sees the stacked logits when they exist
    assert recomputed < logits_bytes / 2
    for a, b in zip(jax.tree.leaves(g_kept), jax.tree.leaves(g_recomputed)):
        scale = float(jnp.max(jnp.abs(a))) + 1e-12
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=0, atol=1e-6 * scale)


def test_mixed_einsum_vjp():
    x = jax.random.normal(jax.random.key(0), (4, 6, 8))
    w = jax.random.normal(jax.random.key(1), (8, 5))
    g = jax.random.normal(jax.random.key(2), (4, 6, 5))
    eq = "btd,df->btf"
    # float32: exactly JAX's own rule for einsum.
    _, vjp = jax.vjp(lambda a, b: _mixed_einsum(eq, a, b, jnp.float32), x, w)
    _, vjp_ref = jax.vjp(lambda a, b: jnp.einsum(eq, a, b), x, w)
    for got, ref in zip(vjp(g), vjp_ref(g)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-6, atol=1e-6)
    # bfloat16 compute over a float32 weight: dx in bf16, dw in float32 from a float32
    # accumulator over bf16-rounded operands (no rounding of dw itself).
    xb = x.astype(jnp.bfloat16)
    out, vjp = jax.vjp(lambda a, b: _mixed_einsum(eq, a, b, jnp.bfloat16), xb, w)
    dx, dw = vjp(g.astype(jnp.bfloat16))
    assert (out.dtype, dx.dtype, dw.dtype) == (jnp.bfloat16, jnp.bfloat16, jnp.float32)
    f32 = lambda a: np.asarray(a.astype(jnp.float32), np.float64)
    gb = f32(g.astype(jnp.bfloat16))
    np.testing.assert_allclose(np.asarray(dw), np.einsum("btd,btf->df", f32(xb), gb), rtol=1e-5, atol=1e-5)
    wb = f32(w.astype(jnp.bfloat16))
    dx_ref = np.einsum("btf,df->btd", gb, wb)
    np.testing.assert_allclose(f32(dx), dx_ref, rtol=2 ** -8, atol=2 ** -8 * np.abs(dx_ref).max())


def test_bad_arguments():
    with pytest.raises(ValueError, match="remat"):
        Decoder(tiny_config(), remat="some", rngs=nnx.Rngs(0))
    assert set(typing.get_args(Remat)) == set(_REMAT_POLICIES)  # the config's names are the policies
    model = Decoder(tiny_config(), rngs=nnx.Rngs(0))
    tokens, valid, _ = _inputs()
    for kwargs in ({"score_from": 0}, {"score_from": T}, {"temperature": 0.0}, {"token_chunk": 0},
                   {"keep_logits": 1}):
        with pytest.raises(ValueError):
            mismatch.rescore(model, tokens, valid, **kwargs)
