"""One Flax NNX decoder for the Llama / Qwen2 / Qwen3 / SmolLM2 family, with a functional KV cache.

Numerics (every one of these is a mismatch decision, so they are explicit):

* Weights are stored in ``param_dtype`` and cast to the compute ``dtype`` where they are used.
* Matmuls take ``dtype`` operands and accumulate in float32 (``preferred_element_type``), then
  round the result to ``dtype``. That is what GPU/TPU matmul units do, and on AVX-512 CPUs a bf16
  matmul with a float32 result runs several times faster in XLA than one with a bf16 result
  (benchmarks/README.md).
* RMSNorm statistics, RoPE rotation, SiLU and the attention softmax run in float32; their
  outputs are rounded to ``dtype`` (as HF does for the norm and torch for SiLU).
* The KV cache is stored in ``dtype``. Logits are returned in float32.
* Backward pass (``_mixed_einsum``): cotangents entering a projection or LM-head matmul are
  rounded to ``dtype``, the backward matmuls accumulate in float32, weight gradients come back
  in the weights' own dtype (float32 master weights: float32 gradients, never rounded to
  ``dtype``). Norm scales, biases and embedding rows likewise: their gradients are float32 sums
  (``_scale_features``, ``_add_bias``, ``Decoder._embed``). The attention's backward pass
  (``rl_mismatch.models.attention``) rounds the scores' cotangent to ``dtype`` for its matmuls too;
  the softmax and its gradient stay float32.

Token layout. Batches are left-padded: ``valid_BT`` is False on padding, padded keys are never
attended, and RoPE positions default to ``cumsum(valid) - 1`` so a sequence's first real token
sits at position 0 whatever its padding. ``logits_BTV[:, t]`` predicts ``tokens_BT[:, t + 1]``.

Layers are stacked along a leading ``layers`` axis. The full-sequence forward (training,
rescoring) applies them with ``lax.scan``: one compiled block keeps compile time flat in depth,
and the backward pass recomputes each layer (``remat``). ``Decoder.hidden_states`` and
``Decoder.logits`` split the forward before the LM head for callers that apply it in pieces;
``Decoder.grouped_hidden_states`` is the same forward for rows that share a prompt, computing
it once per group, and ``Decoder.packed_hidden_states`` lays each group's responses end to end
after it, so the padding after short responses is not computed.
KV-cache decoding unrolls the layers (see ``Decoder.decode``).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from rl_mismatch.models.attention import attention_in_row_groups, causal_attention, grouped_attention
from rl_mismatch.models.config import ModelConfig
from rl_mismatch.models.kv_cache import KVCache, write_slots
from rl_mismatch.models.packing import RunPacking, pack_runs
from rl_mismatch.precision import parse_dtype

# Logical axis names carried as `out_sharding` metadata; rl_mismatch.sharding maps them to mesh
# axes (tensor-parallel for the sampler, FSDP for the trainer).
LAYERS, VOCAB, EMBED, HEADS, KV_HEADS, HEAD_DIM, MLP = (
    "layers", "vocab", "embed", "heads", "kv_heads", "head_dim", "mlp")


def _dtype(dtype) -> jnp.dtype:
    """A dtype from a dtype or one of the names `rl_mismatch.precision.parse_dtype` knows ('bf16')."""
    return parse_dtype(dtype) if isinstance(dtype, str) else jnp.dtype(dtype)


def _param(rngs: nnx.Rngs, shape, axes, dtype, *, scale=None, value=None) -> nnx.Param:
    if value is None:
        fan_in = shape[0] if scale is None else None
        std = scale if scale is not None else fan_in ** -0.5
        value = std * jax.random.normal(rngs.params(), shape, jnp.float32)
    # eager_sharding=False: placement is decided by the caller (rl_mismatch.sharding), not here.
    return nnx.Param(jnp.asarray(value, dtype), out_sharding=axes, eager_sharding=False)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 3))
def _mixed_einsum(eq: str, x: jax.Array, w: jax.Array, out_dtype) -> jax.Array:
    """``einsum(eq, x, w)`` with ``w`` cast to ``x.dtype``, float32 accumulation, ``out_dtype`` result.

    The backward pass keeps the same discipline, which JAX's own rule for the casts would not:
    the output cotangent is rounded to ``x.dtype`` and both backward matmuls take ``x.dtype``
    operands with float32 accumulation. ``dx`` comes back in ``x.dtype``; ``dw`` comes back in
    ``w``'s own dtype (float32 for float32 master weights) straight from the float32
    accumulator, never rounded to the compute dtype on the way. In float32 this is exactly the
    default rule. In bfloat16 it is what a bf16 backward pass on a GPU/TPU does, and on CPU it
    keeps all three matmuls on the fast bf16 x bf16 -> f32 path: with the default rule the
    float32 cotangent of the cast promotes the backward matmuls to float32 (up to 2x slower on a
    Zen 5 CPU, ~4x on an AMX one; benchmarks/README.md).
    ``eq`` must be a plain two-operand contraction ("ab,bc->ac": no index repeated within an
    operand, every index of an operand present in the other operand or the output).
    """
    return jnp.einsum(eq, x, w.astype(x.dtype), preferred_element_type=jnp.float32).astype(out_dtype)


def _mixed_einsum_fwd(eq, x, w, out_dtype):
    return _mixed_einsum(eq, x, w, out_dtype), (x, w)


def _mixed_einsum_bwd(eq, out_dtype, residuals, g):
    x, w = residuals
    lhs, rest = eq.split(",")
    rhs, out = rest.split("->")
    g = g.astype(x.dtype)
    wc = w.astype(x.dtype)
    dx = jnp.einsum(f"{out},{rhs}->{lhs}", g, wc, preferred_element_type=jnp.float32).astype(x.dtype)
    dw = jnp.einsum(f"{lhs},{out}->{rhs}", x, g, preferred_element_type=jnp.float32).astype(w.dtype)
    return dx, dw


_mixed_einsum.defvjp(_mixed_einsum_fwd, _mixed_einsum_bwd)


# Name of the projection matmuls' outputs, for the remat policy that saves exactly these.
_PROJECTION = "projection"
_REMAT_POLICIES = {  # Decoder(remat=...) -> jax.checkpoint policy of the layer scan body
    "layer": jax.checkpoint_policies.nothing_saveable,
    "projections": jax.checkpoint_policies.save_only_these_names(_PROJECTION),
    "none": None,  # no jax.checkpoint at all
}
Remat = Literal["layer", "projections", "none"]  # the keys above, for configs


@functools.partial(jax.tree_util.register_dataclass, data_fields=["bits"], meta_fields=["dtype"])
@dataclasses.dataclass(frozen=True)
class _Bits:
    """A 2-byte float array held as its raw ``uint16`` bits; the float dtype is static metadata."""

    bits: jax.Array
    dtype: Any


def _to_bits(x):
    if jnp.issubdtype(x.dtype, jnp.floating) and x.dtype.itemsize == 2:
        return _Bits(jax.lax.bitcast_convert_type(x, jnp.uint16), x.dtype)
    return x


def _from_bits(r):
    return jax.lax.bitcast_convert_type(r.bits, r.dtype) if isinstance(r, _Bits) else r


def _residuals_as_bits(f):
    """``f`` with the same values and gradients, its backward-pass residuals kept as raw bits.

    The residuals are those of ``jax.vjp(f, ...)`` (with ``f`` under ``jax.checkpoint``, what its
    policy saves); bf16/fp16 ones are carried as ``uint16``. Under ``lax.scan`` each layer's
    residuals are written into a [layers, ...] stack, and XLA:CPU performs a bf16/fp16
    dynamic-update-slice in float32: it converts the whole stack to float32 and back at every
    layer instead of writing one slice in place (measured in benchmarks/README.md). A ``uint16``
    stack is written in place.
    """

    @jax.custom_vjp
    def wrapped(*args):
        return f(*args)

    def fwd(*args):
        out, pullback = jax.vjp(f, *args)
        return out, jax.tree.map(_to_bits, pullback)

    def bwd(residuals, out_cotangent):
        pullback = jax.tree.map(_from_bits, residuals, is_leaf=lambda r: isinstance(r, _Bits))
        return pullback(out_cotangent)

    wrapped.defvjp(fwd, bwd)
    return wrapped


def check_remat(remat) -> None:
    """Raises ValueError unless ``remat`` names a policy of ``Decoder(remat=...)``."""
    if remat not in _REMAT_POLICIES:
        raise ValueError(f"remat={remat!r}; choose one of {sorted(_REMAT_POLICIES)}.")


def _dot(eq: str, x: jax.Array, w: jax.Array) -> jax.Array:
    """einsum in ``x``'s dtype with float32 accumulation, rounded back to that dtype.

    The output is tagged ``_PROJECTION`` for ``Decoder(remat="projections")`` (JAX's
    ``dots_with_no_batch_dims_saveable`` cannot see the matmul inside the ``custom_vjp``).
    """
    return checkpoint_name(_mixed_einsum(eq, x, w, x.dtype), _PROJECTION)


def _sum_rows(x: jax.Array, like: jax.Array) -> jax.Array:
    """Sum of ``x`` over its leading axes (its trailing axes are ``like``'s shape), from float32
    values summed in float32, returned in ``like``'s dtype: a parameter's gradient.

    Written as a product with a ones vector: XLA:CPU turned the plain reduction over B·T rows into
    a slower reduce-window loop.
    """
    rows = x.astype(jnp.float32).reshape(-1, like.size)
    total = jnp.dot(jnp.ones(rows.shape[0], jnp.float32), rows, preferred_element_type=jnp.float32)
    return total.reshape(like.shape).astype(like.dtype)


@jax.custom_vjp
def _scale_features(scale: jax.Array, x: jax.Array) -> jax.Array:
    """``scale.astype(x.dtype) * x``, ``scale`` along the last axis (a norm's learned scale).

    The backward pass treats ``scale`` like a projection's weight (`_mixed_einsum`): its gradient,
    the sum over every leading position of ``g * x``, is formed from float32 products (exact for
    two bf16/fp16 factors) summed in float32 (`_sum_rows`), in ``scale``'s dtype. JAX's own rule
    sums the products in the compute dtype: in a bf16 SmolLM2 layer stack the norm-scale gradients
    were 1-3% of their largest entry off (tests/test_decoder.py checks against float64), and an
    fp16 sum over B·T rows can overflow under loss scaling.
    ``dx = g * scale`` in the compute dtype, as JAX's rule has it.
    """
    return scale.astype(x.dtype) * x


def _scale_features_fwd(scale, x):
    return _scale_features(scale, x), (scale, x)


def _scale_features_bwd(residuals, g):
    scale, x = residuals
    d_scale = _sum_rows(g.astype(jnp.float32) * x.astype(jnp.float32), scale)
    return d_scale, (g * scale.astype(g.dtype)).astype(x.dtype)


_scale_features.defvjp(_scale_features_fwd, _scale_features_bwd)


@jax.custom_vjp
def _add_bias(x: jax.Array, bias: jax.Array) -> jax.Array:
    """``x + bias.astype(x.dtype)``, ``bias`` over the trailing axes; its gradient, the sum of the
    cotangent over every leading position, in float32 (`_sum_rows`), as for `_scale_features`."""
    return x + bias.astype(x.dtype)


def _add_bias_fwd(x, bias):
    return _add_bias(x, bias), bias


def _add_bias_bwd(bias, g):
    return g, _sum_rows(g, bias)


_add_bias.defvjp(_add_bias_fwd, _add_bias_bwd)


def _rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    # Statistics in float32 (a bf16 mean of squares loses ~3 significant digits), result in x.dtype.
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return _scale_features(scale, normed.astype(x.dtype))


def _rope(x_BTNH: jax.Array, positions_BT: jax.Array, theta: float) -> jax.Array:
    """Rotary embedding in HF's "rotate half" layout (pairs i and i + H/2), computed in float32."""
    half = x_BTNH.shape[-1] // 2
    inv_freq = 1.0 / (theta ** (jnp.arange(half, dtype=jnp.float32) / half))
    angles = positions_BT.astype(jnp.float32)[..., None] * inv_freq  # [B, T, H/2]
    return _rotate(x_BTNH, jnp.cos(angles)[:, :, None, :], jnp.sin(angles)[:, :, None, :])


@jax.custom_vjp
def _rotate(x_BTNH: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Each pair (x_i, x_{i+H/2}) rotated by its angle, in float32, rounded once to x's dtype.

    Its backward pass rotates the cotangent back by the same angle, the same kind of fusion as
    the forward. JAX's own rule transposes the halves' slices and concatenation into pads and
    adds, which XLA:CPU runs several times slower than the forward (benchmarks/README.md).
    The angles get no gradient (they come from integer positions).
    """
    half = x_BTNH.shape[-1] // 2
    x = x_BTNH.astype(jnp.float32)
    x1, x2 = x[..., :half], x[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x_BTNH.dtype)


def _rotate_fwd(x_BTNH, cos, sin):
    return _rotate(x_BTNH, cos, sin), (cos, sin)


def _rotate_bwd(residuals, g_BTNH):
    cos, sin = residuals
    return _rotate(g_BTNH, cos, -sin), jnp.zeros_like(cos), jnp.zeros_like(sin)


_rotate.defvjp(_rotate_fwd, _rotate_bwd)


def _silu(x: jax.Array) -> jax.Array:
    """SiLU computed in float32 and rounded once to ``x.dtype``, as torch's bf16/fp16 kernel (HF's
    ``act_fn``) does: on N(0, 3²) inputs every bf16 result equals torch's, and all but ~1 in 4000
    fp16 results (those by one ulp, where the two float32 sigmoids straddle a rounding boundary).
    ``jax.nn.silu`` on a bf16 array rounds in between (39% of its results differ from torch's)
    and runs 2x slower on XLA:CPU (benchmarks/README.md). In float32 the two are the same."""
    x32 = x.astype(jnp.float32)
    return (x32 * jax.nn.sigmoid(x32)).astype(x.dtype)


# `_silu` keeping only its input for the backward pass, which recomputes the float32 upcast and
# sigmoid from it: for the layer scan with `remat="none"`. JAX's linearisation of `_silu` keeps
# float32 values of the input's size (the upcast, the sigmoid and what the derivative needs of
# them), and with nothing recomputed the scan stacks them: float32 [layers, B, T, d_ff] arrays,
# 377 MB each for SmolLM2 at 8 x 256, written and read at every step. The recomputation is
# elementwise on the same input, so the gradient is the same bit for bit (tests/test_decoder.py);
# the train step with `remat="none"` is faster for it on CPU (benchmarks/README.md). Not under the
# other policies: they recompute the layer's forward in the backward pass anyway, and this would
# compute the sigmoid a third time. ``prevent_cse`` is off: it runs inside the layer scan.
_silu_recomputed = jax.checkpoint(_silu, prevent_cse=False)


# Rows from which a bf16 decoding step on CPU runs the down projection with its weight on the left,
# see `_down_projection`.
_LEFT_DOWN_MIN_ROWS = 32


def _left_down_projection(rows: int, dtype) -> bool:
    """Whether a decoding step of ``rows`` rows in ``dtype`` takes `_down_projection`'s
    weight-on-the-left form."""
    return dtype == jnp.bfloat16 and rows >= _LEFT_DOWN_MIN_ROWS and jax.default_backend() == "cpu"


def _down_projection(gated_BTF: jax.Array, w_FD: jax.Array, w_DF: jax.Array | None = None) -> jax.Array:
    """The MLP's down projection ``gated @ w``.

    ``w_DF``, the same weight transposed (`Decoder.decoding_layers` makes it where
    `_left_down_projection` says), turns a decoding step (one token) into ``(w_DF @ gated^T)^T``:
    the weight is the product's left operand. On XLA:CPU the [B, F] x [F, D] product (SmolLM2:
    1536 -> 576 at 64 rows) runs far slower than the same product with a [D, F] left operand
    and a [D, B] result; the small [D, B] result is then transposed. The
    optimization barrier keeps that order: without it XLA lays the result out as [B, D]
    straight away, which brings back the slow kernel. Each output element is the same float32
    sum either way: the bf16 result is bit for bit the plain product's (tests/test_decoder.py,
    tests/test_sampler.py); figures in benchmarks/README.md.
    """
    B, T, F = gated_BTF.shape
    if w_DF is None or T != 1:
        return _dot("btf,fd->btd", gated_BTF, w_FD)
    out_DB = jax.lax.dot_general(w_DF.astype(gated_BTF.dtype), gated_BTF.reshape(B, F), (((1,), (1,)), ((), ())),
                                 preferred_element_type=jnp.float32)
    return jax.lax.optimization_barrier(out_DB).T.astype(gated_BTF.dtype).reshape(B, 1, -1)


def _runs_inputs(tokens_BT, prefix, group, positions_BT, valid_BT):
    """Checks the run layout's ``prefix`` and ``group`` (`Decoder.grouped_hidden_states`) and
    returns ``(valid_BT, positions_BT)`` with their defaults."""
    B, T = tokens_BT.shape
    if isinstance(prefix, bool) or not isinstance(prefix, int) or not 1 <= prefix < T:
        raise ValueError(f"prefix={prefix!r} must be an int in [1, {T}).")
    if isinstance(group, bool) or not isinstance(group, int) or group < 1 or B % group:
        raise ValueError(f"group={group!r} must be a positive int dividing the batch ({B} rows).")
    valid_BT = jnp.ones((B, T), bool) if valid_BT is None else valid_BT.astype(bool)
    if positions_BT is None:
        positions_BT = jnp.maximum(jnp.cumsum(valid_BT, axis=1) - 1, 0)
    return valid_BT, positions_BT


class DecodingLayer(NamedTuple):
    """One layer's weights for `Decoder.decode` (from `Decoder.decoding_layers`)."""

    state: nnx.State  # the layer's parameters, sliced out of the stacked blocks
    down_DF: jax.Array | None  # the down projection's weight transposed, or None (`_down_projection`)


class Block(nnx.Module):
    """Pre-norm decoder block: x + Attn(RMSNorm(x)), then x + SwiGLU(RMSNorm(x))."""

    def __init__(self, config: ModelConfig, *, param_dtype, rngs: nnx.Rngs):
        c, pd = config, param_dtype
        D, N, K, H, F = c.d_model, c.n_heads, c.n_kv_heads, c.head_dim, c.d_ff
        self.attn_norm = _param(rngs, (D,), (EMBED,), pd, value=jnp.ones((D,)))
        self.q = _param(rngs, (D, N, H), (EMBED, HEADS, HEAD_DIM), pd)
        self.k = _param(rngs, (D, K, H), (EMBED, KV_HEADS, HEAD_DIM), pd)
        self.v = _param(rngs, (D, K, H), (EMBED, KV_HEADS, HEAD_DIM), pd)
        self.o = _param(rngs, (N, H, D), (HEADS, HEAD_DIM, EMBED), pd, scale=(N * H) ** -0.5)
        if c.qkv_bias:
            self.q_bias = _param(rngs, (N, H), (HEADS, HEAD_DIM), pd, value=jnp.zeros((N, H)))
            self.k_bias = _param(rngs, (K, H), (KV_HEADS, HEAD_DIM), pd, value=jnp.zeros((K, H)))
            self.v_bias = _param(rngs, (K, H), (KV_HEADS, HEAD_DIM), pd, value=jnp.zeros((K, H)))
        if c.qk_norm:
            self.q_norm = _param(rngs, (H,), (HEAD_DIM,), pd, value=jnp.ones((H,)))
            self.k_norm = _param(rngs, (H,), (HEAD_DIM,), pd, value=jnp.ones((H,)))
        self.mlp_norm = _param(rngs, (D,), (EMBED,), pd, value=jnp.ones((D,)))
        self.gate = _param(rngs, (D, F), (EMBED, MLP), pd)
        self.up = _param(rngs, (D, F), (EMBED, MLP), pd)
        self.down = _param(rngs, (F, D), (MLP, EMBED), pd)
        self.config = config

    def __call__(self, x_BTD, positions_BT, attend, *, recompute_silu: bool = False, down_DF=None):
        """``attend(q_BTNH, k_BTKH, v_BTKH) -> (out_BTNH, aux)`` is the attention itself, given
        this chunk's queries, keys and values after RoPE: the caller decides which keys each
        query sees (the chunk itself, causally; a KV cache it writes them into; a group's shared
        prompt). ``recompute_silu``: keep only the SiLU's input for the backward pass
        (`_silu_recomputed`). ``down_DF``: the down projection's weight transposed, for a
        decoding step (`DecodingLayer`). Returns ``(x_BTD, aux)``."""
        c = self.config
        h = _rms_norm(x_BTD, self.attn_norm[...], c.rms_eps)
        q = _dot("btd,dnh->btnh", h, self.q[...])
        k = _dot("btd,dkh->btkh", h, self.k[...])
        v = _dot("btd,dkh->btkh", h, self.v[...])
        if c.qkv_bias:
            q = _add_bias(q, self.q_bias[...])
            k = _add_bias(k, self.k_bias[...])
            v = _add_bias(v, self.v_bias[...])
        if c.qk_norm:
            q = _rms_norm(q, self.q_norm[...], c.rms_eps)
            k = _rms_norm(k, self.k_norm[...], c.rms_eps)
        q = _rope(q, positions_BT, c.rope_theta)
        k = _rope(k, positions_BT, c.rope_theta)
        attn, aux = attend(q, k, v)
        # One contraction dim (n, h flattened; both reshapes are free): with two, XLA orders
        # them (h, n) and transposes the activations and the whole o weight at every call.
        B, T, N, H = attn.shape
        x_BTD = x_BTD + _dot("bte,ed->btd", attn.reshape(B, T, N * H), self.o[...].reshape(N * H, -1))
        h = _rms_norm(x_BTD, self.mlp_norm[...], c.rms_eps)
        silu = _silu_recomputed if recompute_silu else _silu
        gated = silu(_dot("btd,df->btf", h, self.gate[...])) * _dot("btd,df->btf", h, self.up[...])
        return x_BTD + _down_projection(gated, self.down[...], down_DF), aux


class Decoder(nnx.Module):
    """Decoder-only transformer. ``model(tokens_BT) -> logits_BTV`` (float32).

    Args:
      config: shapes and architecture flags.
      dtype: compute dtype of weights-in-use, activations and KV cache.
      param_dtype: storage dtype of the parameters (float32 master weights for a trainer;
        the sampler dtype for a sampler copy, see ``rl_mismatch.sampler``).
      remat: what the backward pass of the full-sequence forward keeps from each layer's forward
        (see :meth:`hidden_states`): ``"layer"`` only the layer's input, everything else is
        recomputed; ``"projections"`` also the outputs of the seven projection matmuls;
        ``"none"`` everything but the SiLU's float32 intermediates (`_silu_recomputed`): no
        matmul recomputed, most memory.
      rngs: initialisation randomness.

    Attribute ``activation_sharding`` (default None): a sharding for the ``[B, T, D]`` hidden
    states of the full-sequence forward, applied to the embedding output and to every layer's
    output. The train step sets it to split the batch over the mesh's ``data`` axis: without it,
    XLA propagates the FSDP layout of the embedding table (split along ``embed``) into the
    activations and keeps every row of the batch on every device.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from rl_mismatch.models.config import tiny_config
      >>> model = Decoder(tiny_config(), rngs=nnx.Rngs(0))
      >>> model(jnp.zeros((2, 5), jnp.int32)).shape
      (2, 5, 256)
    """

    def __init__(self, config: ModelConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 remat: str = "layer", rngs: nnx.Rngs):
        check_remat(remat)
        self.config = config
        self.dtype = _dtype(dtype)
        param_dtype = _dtype(param_dtype)
        self.remat = remat
        self.activation_sharding = None
        V, D = config.vocab_size, config.d_model
        self.embed = _param(rngs, (V, D), (VOCAB, EMBED), param_dtype, scale=0.02)

        @nnx.split_rngs(splits=config.n_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: LAYERS})
        def make_blocks(rngs):
            return Block(config, param_dtype=param_dtype, rngs=rngs)

        self.blocks = make_blocks(rngs)
        self.final_norm = _param(rngs, (D,), (EMBED,), param_dtype, value=jnp.ones((D,)))
        if not config.tie_embeddings:
            self.lm_head = _param(rngs, (D, V), (EMBED, VOCAB), param_dtype)

    def _embed(self, tokens_BT):
        # Gather, then cast: the backward pass scatters the rows' cotangents into a float32 table,
        # so a token seen many times sums its gradient in float32, and only B·T rows are cast.
        return self.embed[...][tokens_BT].astype(self.dtype)

    def logits(self, h_BTD: jax.Array) -> jax.Array:
        """The LM head: float32 logits [B, T, V] of final hidden states from :meth:`hidden_states`.

        The matmul takes compute-dtype operands and accumulates in float32; in the backward pass
        the logits' cotangent is rounded to the compute dtype (see ``_mixed_einsum``).
        """
        if self.config.tie_embeddings:
            return _mixed_einsum("btd,vd->btv", h_BTD, self.embed[...], jnp.float32)
        return _mixed_einsum("btd,dv->btv", h_BTD, self.lm_head[...], jnp.float32)

    def __call__(self, tokens_BT, *, positions_BT=None, valid_BT=None) -> jax.Array:
        """Full-sequence (teacher-forced) forward; returns float32 logits [B, T, V].

        Equal to ``self.logits(self.hidden_states(...))``.
        """
        return self.logits(self.hidden_states(tokens_BT, positions_BT=positions_BT, valid_BT=valid_BT))

    def hidden_states(self, tokens_BT, *, positions_BT=None, valid_BT=None) -> jax.Array:
        """Full-sequence forward up to the LM head: final-normed hidden states [B, T, D] in ``dtype``.

        For callers that apply the LM head in pieces (``rl_mismatch.mismatch.rescore`` scores a
        chunk of positions at a time and never forms the [B, T, V] logits).

        Under differentiation each layer is rematerialised as ``self.remat`` says. The default,
        ``"layer"``, keeps only each layer's input and recomputes the layer in the backward pass:
        a third more layer FLOPs and the least memory. On CPU the three cost about the same time
        while their temporaries differ several-fold (``benchmarks/remat.py``; figures in
        benchmarks/README.md), so the default is the one that also fits large models. The saved values travel through the layer scan as raw bits
        (`_residuals_as_bits`). On an accelerator, run ``benchmarks/remat.py`` there.
        """
        B, T = tokens_BT.shape
        valid_BT = jnp.ones((B, T), bool) if valid_BT is None else valid_BT.astype(bool)
        if positions_BT is None:
            positions_BT = jnp.maximum(jnp.cumsum(valid_BT, axis=1) - 1, 0)
        causal = jnp.tril(jnp.ones((T, T), bool))
        allowed_BTS = causal[None] & valid_BT[:, None, :]

        def attend(q, k, v):
            return causal_attention(q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), allowed_BTS), None

        return self._final_norm(self._layer_scan(self._embed(tokens_BT), positions_BT, attend))

    def grouped_hidden_states(self, tokens_BT, *, prefix: int, group: int, positions_BT=None,
                              valid_BT=None) -> jax.Array:
        """:meth:`hidden_states` of columns ``[prefix, T)`` of rows that share their first
        ``prefix`` columns in runs of ``group``: [B, T − prefix, D] in ``dtype``.

        A GRPO batch holds each prompt ``group`` times. Here each run's shared columns go through
        the layers once, and the run's rows attend to their keys and values, so the
        layers see ``B/group · prefix + B · (T − prefix)`` tokens instead of ``B · T``; under
        differentiation the shared columns' cotangents are summed over the run. The result equals
        ``hidden_states(...)[:, prefix:]`` up to float32 summation order: every token is computed
        from the same inputs, and each query attends to the same keys in the same order.

        Layout: one row per run, ``[B/group, prefix + group · (T − prefix), D]``, the shared
        columns first, then the run's rows one after another. The projections and the MLP see
        one [tokens, D] matrix either way; only attention needs the structure (`grouped_attention`).
        ``activation_sharding`` applies to this layout, so a mesh splits the runs over ``data``.

        The caller guarantees that ``tokens_BT`` and ``valid_BT`` (and ``positions_BT``, if
        given) are equal within each run on columns ``[0, prefix)``; only the first row of each
        run is read there. Rows with ``prefix`` or more columns of left padding are fine.

        Raises:
          ValueError: ``prefix`` not in ``[1, T)``, or ``group`` not a positive divisor of B.
        """
        B, T = tokens_BT.shape
        valid_BT, positions_BT = _runs_inputs(tokens_BT, prefix, group, positions_BT, valid_BT)
        R, runs = T - prefix, B // group

        def runs_layout(x_BT):  # [B, T, ...] -> [B/group, prefix + group·R, ...]
            shared, own = x_BT[::group, :prefix], x_BT[:, prefix:]
            return jnp.concatenate([shared, own.reshape(runs, group * R, *own.shape[2:])], axis=1)

        valid_P = valid_BT[::group, :prefix]
        allowed_prefix = jnp.tril(jnp.ones((prefix, prefix), bool))[None] & valid_P[:, None, :]
        # A row's query sees its run's valid shared columns, then its own columns causally.
        own_causal = jnp.tril(jnp.ones((R, R), bool))[None] & valid_BT[:, None, prefix:]
        shared_seen = jnp.broadcast_to(jnp.repeat(valid_P, group, axis=0)[:, None, :], (B, R, prefix))
        allowed_own = jnp.concatenate([shared_seen, own_causal], axis=2)
        attend = functools.partial(grouped_attention, prefix=prefix, group=group,
                                   allowed_prefix=allowed_prefix, allowed_own=allowed_own)
        x = self._layer_scan(runs_layout(self._embed(tokens_BT)), runs_layout(positions_BT), attend)
        return self._final_norm(x[:, prefix:].reshape(B, R, -1))

    def packed_hidden_states(self, tokens_BT, *, prefix: int, group: int, width: int, positions_BT=None,
                             valid_BT=None) -> tuple[jax.Array, RunPacking]:
        """:meth:`grouped_hidden_states` with each run's rows packed end to end: the final-normed
        hidden states [B/group, width, D] of the packed own columns, and their `RunPacking`.

        A run's rows rarely all reach the longest response, yet :meth:`grouped_hidden_states`
        gives each of them ``T − prefix`` columns. Here each row keeps its span (own columns up
        to its last valid one), the spans lie one after another in ``width`` slots after the
        run's shared columns, and a slot's query sees the shared keys then its own row's keys
        up to itself: the keys, in the order, of :meth:`grouped_hidden_states`, so the result
        unpacked (``RunPacking.unpack``) equals its output on every column of every span up to
        float32 summation order. The layers see ``B/group · (prefix + width)`` tokens; attention
        is one masked causal attention per run over them.

        ``width`` is static (one compilation per value) and must hold every run's spans
        (`rl_mismatch.models.packing.run_spans`); columns that do not fit are lost, and
        ``RunPacking.unpack`` fills them.
        The other arguments and the caller's guarantees are :meth:`grouped_hidden_states`'.

        Raises:
          ValueError: as :meth:`grouped_hidden_states`, or ``width`` not a positive int.
        """
        valid_BT, positions_BT = _runs_inputs(tokens_BT, prefix, group, positions_BT, valid_BT)
        if isinstance(width, bool) or not isinstance(width, int) or width < 1:
            raise ValueError(f"width={width!r} must be a positive int (the packed columns per run).")
        packing = pack_runs(valid_BT[:, prefix:], group, width)

        def runs_layout(x_BT):  # [B, T, ...] -> [B/group, prefix + width, ...]
            return jnp.concatenate([x_BT[::group, :prefix], packing.pack(x_BT[:, prefix:])], axis=1)

        # Segment of each column: -1 for the shared columns, the row of the run for a slot.
        segment_UT = jnp.concatenate([jnp.full((len(packing.segment_UW), prefix), -1, jnp.int32),
                                      packing.segment_UW], axis=1)
        filled_UT = jnp.concatenate([jnp.ones((len(packing.segment_UW), prefix), bool),
                                     packing.segment_UW < group], axis=1)
        valid_UT = runs_layout(valid_BT) & filled_UT
        T = prefix + width
        same_row = (segment_UT[:, None, :] < 0) | (segment_UT[:, None, :] == segment_UT[:, :, None])
        allowed_UTS = jnp.tril(jnp.ones((T, T), bool))[None] & valid_UT[:, None, :] & same_row

        def attend(q, k, v):
            return causal_attention(q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), allowed_UTS), None

        x = self._layer_scan(self._embed(runs_layout(tokens_BT)), runs_layout(positions_BT), attend)
        return self._final_norm(x[:, prefix:]), packing

    def _layer_scan(self, x_BTD, positions_BT, attend):
        """Every layer over ``x_BTD`` with ``lax.scan``, each rematerialised as ``self.remat`` says."""
        graphdef, state = nnx.split(self.blocks)

        def layer(x, block_state):
            block = nnx.merge(graphdef, block_state)
            return block(x, positions_BT, attend, recompute_silu=self.remat == "none")[0]

        if self.remat != "none":
            layer = jax.checkpoint(layer, prevent_cse=False, policy=_REMAT_POLICIES[self.remat])
        layer = _residuals_as_bits(layer)
        x, _ = jax.lax.scan(lambda x, layer_state: (self._constrain(layer(x, layer_state)), None),
                            self._constrain(x_BTD), state)
        return x

    def _constrain(self, x_BTD):
        if self.activation_sharding is None:
            return x_BTD
        return jax.lax.with_sharding_constraint(x_BTD, self.activation_sharding)

    def _final_norm(self, x_BTD):
        return _rms_norm(x_BTD, self.final_norm[...], self.config.rms_eps)

    def decoding_layers(self, rows: int | None = None) -> tuple[DecodingLayer, ...]:
        """Each layer's weights as its own arrays, for decoding steps of ``rows`` rows.

        For a decoding loop: make them once, outside the loop, and pass the result to every
        :meth:`decode` call. Slicing the stacked ``blocks`` inside the loop copies every weight at
        every step (XLA does not alias a slice of a loop-invariant buffer). Where
        `_left_down_projection` says so for ``rows`` and this model's dtype, each layer also holds
        its down projection's weight transposed (a quarter more weight bytes for SmolLM2), which
        the decoding steps use (`_down_projection`). ``rows=None`` takes no such choice (an
        accelerator's layout, whatever the backend).
        """
        _, state = nnx.split(self.blocks)
        left = rows is not None and _left_down_projection(rows, self.dtype)
        layers = []
        for i in range(self.config.n_layers):
            layer = jax.tree.map(lambda a, i=i: a[i], state)
            layers.append(DecodingLayer(layer, layer["down"][...].T if left else None))
        return tuple(layers)

    def decode(self, tokens_BT, cache: KVCache, *, positions_BT=None, valid_BT=None, layers=None,
               last_only: bool = False):
        """Runs ``T`` new tokens against the cache (prefill when T > 1, decoding when T == 1).

        Writes their keys/values into slots ``[cache.index, cache.index + T)`` and returns
        ``(logits_BTV, new_cache)``. Positions default to the count of valid tokens before each.
        ``layers``: this model's :meth:`decoding_layers`, when the caller already made them.
        ``last_only``: return the logits of the last position only ([B, 1, V]); a prefill
        needs nothing else, and the LM head over a whole prompt costs as much as ~5 layers.

        Unlike ``__call__``, the layers are unrolled in Python: each layer's cache (each row
        group's, see `KVCache`) is its own buffer, updated in place by ``dynamic_update_slice``.
        Scanning with the stacked cache in the carry made XLA:CPU copy the cache every layer
        (4-5x slower decoding in bf16).

        The ``T`` tokens must fit: ``cache.index + T <= max_len``. Called eagerly, an overflow
        raises ``ValueError``; under ``jit`` the index is not known, and ``dynamic_update_slice``
        would clamp the write onto the last slots, so the caller sizes the cache (`init_cache`,
        `grow_cache`; the sampler's ``cache_sizes``).
        """
        B, T = tokens_BT.shape
        S = cache.valid_BS.shape[1]
        valid_BT = jnp.ones((B, T), bool) if valid_BT is None else valid_BT.astype(bool)
        start = cache.index
        try:
            free = S - int(start)
        except jax.errors.ConcretizationTypeError:  # traced: see the docstring
            free = None
        if free is not None and T > free:
            raise ValueError(f"{T} new token(s) do not fit the KV cache: {free} of its {S} slots are free. "
                             "Grow it first with grow_cache(cache, max_len), or start with a larger "
                             "init_cache(max_len=...).")
        valid_BS = jax.lax.dynamic_update_slice(cache.valid_BS, valid_BT, (0, start))
        if positions_BT is None:
            n_before_B = jnp.sum(cache.valid_BS, axis=1, dtype=jnp.int32)
            positions_BT = n_before_B[:, None] + jnp.maximum(jnp.cumsum(valid_BT, axis=1) - 1, 0)
        query_slot_T = start + jnp.arange(T)
        allowed_BTS = (jnp.arange(S)[None, :] <= query_slot_T[:, None])[None] & valid_BS[:, None, :]

        graphdef = nnx.graphdef(self.blocks)
        layers = self.decoding_layers(B if T == 1 else None) if layers is None else layers
        x = self._embed(tokens_BT)

        def write(groups, new_BKTH):  # each row group's slice of the new keys into its buffer
            return tuple(write_slots(g, new, start) for g, new in zip(groups, jnp.split(new_BKTH, len(groups))))

        def as_compute(groups, like):  # the cache dtype may differ from the compute dtype
            return tuple(g.astype(like.dtype) for g in groups)

        new_k, new_v = [], []
        for layer in range(self.config.n_layers):
            block = nnx.merge(graphdef, layers[layer].state)
            k_cache, v_cache = cache.k[layer], cache.v[layer]

            def attend(q, k, v, k_cache=k_cache, v_cache=v_cache):
                k_cache = write(k_cache, k.transpose(0, 2, 1, 3))
                v_cache = write(v_cache, v.transpose(0, 2, 1, 3))
                out = attention_in_row_groups(q, as_compute(k_cache, k), as_compute(v_cache, v), allowed_BTS)
                return out, (k_cache, v_cache)

            x, (k_cache, v_cache) = block(x, positions_BT, attend, down_DF=layers[layer].down_DF)
            new_k.append(k_cache)
            new_v.append(v_cache)
        new_cache = KVCache(tuple(new_k), tuple(new_v), valid_BS, start + T)
        if last_only:
            x = x[:, -1:]
        return self.logits(self._final_norm(x)), new_cache
