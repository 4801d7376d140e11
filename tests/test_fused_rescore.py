"""Tests for rl_mismatch.fused_rescore: same numbers as mismatch.rescore without the logits tensor."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rl_mismatch import fused_rescore as fr
from rl_mismatch import mismatch
from rl_mismatch.models import Decoder, tiny_config

B, T, P = 3, 20, 10
# Both compute the same logits (same casts, float32 accumulation); only the matmul blocking
# (token chunks vs the whole [B, T]) and the logsumexp's summation order differ. For
# |logit| <= ~10 and V = 256 that is a few float32 ulps of 10: 1e-5 is a generous bound.
ATOL = 1e-5


def _inputs():
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(1, 256, (B, T)), jnp.int32)
    valid = jnp.asarray(np.arange(T)[None] >= np.array([[0], [5], [9]]))  # left padding, one row
    mask = valid & (jnp.arange(T) >= P)[None]                             # starts at its response
    return tokens, valid, mask


@pytest.mark.parametrize("tie,dtype", [(True, "float32"), (False, "bfloat16")])
def test_equals_rescore(tie, dtype):
    model = Decoder(tiny_config(tie_embeddings=tie), rngs=nnx.Rngs(0))
    model.dtype = jnp.dtype(dtype)  # fp32 master weights computing in dtype, as a trainer does
    tokens, valid, mask = _inputs()
    for kwargs, fused_kwargs in (({"response_mask_BT": mask, "temperature": 0.7},
                                  {"response_mask_BT": mask, "temperature": 0.7, "score_from": P, "token_chunk": 4}),
                                 ({}, {"token_chunk": 7})):  # chunks not dividing B·(T − 1)
        ref = jax.jit(lambda t, v: mismatch.rescore(model, t, v, **kwargs))(tokens, valid)
        got = jax.jit(lambda t, v: fr.rescore_fused(model, t, v, **fused_kwargs))(tokens, valid)
        ref, got = np.asarray(ref), np.asarray(got)
        np.testing.assert_array_equal(ref == 0, got == 0)  # the same columns are scored
        np.testing.assert_allclose(got, ref, rtol=0, atol=ATOL)


def test_hidden_states_mirror_the_decoder():
    # Guards the mirror of Decoder.__call__ until the decoder exposes its hidden states.
    model = Decoder(tiny_config(), rngs=nnx.Rngs(1))
    tokens, valid, _ = _inputs()
    h = fr.final_hidden_states(model, tokens, valid_BT=valid)
    logits = jnp.einsum("btd,vd->btv", h, model.embed[...], preferred_element_type=jnp.float32)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(model(tokens, valid_BT=valid)), rtol=0, atol=ATOL)


def test_bad_arguments():
    model = Decoder(tiny_config(), rngs=nnx.Rngs(0))
    tokens, valid, _ = _inputs()
    for kwargs in ({"score_from": 0}, {"score_from": T}, {"temperature": 0.0}, {"token_chunk": 0}):
        with pytest.raises(ValueError):
            fr.rescore_fused(model, tokens, valid, **kwargs)
