"""The functional KV cache of `rl_mismatch.models.decoder.Decoder.decode`: keys and values of
every layer per slot, held in row groups, written in place, grown in stages."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from rl_mismatch.models.config import ModelConfig
from rl_mismatch.precision import parse_dtype

_UINT_OF_SIZE = {2: jnp.uint16, 4: jnp.uint32}  # the unsigned int of each cache dtype's width


def write_slots(cache_BKSH: jax.Array, new_BKTH: jax.Array, start: jax.Array) -> jax.Array:
    """``cache[:, :, start:start + T] = new`` (cast to the cache dtype), in place.

    Written on the raw bits: XLA:CPU otherwise fuses the producer's final float convert (RoPE
    runs in float32) into the update, moves the update into float32 and converts the layer's
    whole cache there and back at every step, a large share of a bf16 decoding step; an integer
    bitcast cannot be moved across. The bits written are those of the cast.
    """
    new_BKTH = new_BKTH.astype(cache_BKSH.dtype)
    if cache_BKSH.dtype.itemsize not in _UINT_OF_SIZE:
        return jax.lax.dynamic_update_slice(cache_BKSH, new_BKTH, (0, 0, start, 0))
    uint = _UINT_OF_SIZE[cache_BKSH.dtype.itemsize]
    bits = jax.lax.dynamic_update_slice(jax.lax.bitcast_convert_type(cache_BKSH, uint),
                                        jax.lax.bitcast_convert_type(new_BKTH, uint), (0, 0, start, 0))
    return jax.lax.bitcast_convert_type(bits, cache_BKSH.dtype)



class KVCache(NamedTuple):
    """Keys/values of every layer for ``max_len`` slots, held in row groups.

    The batch rows are split into ``row_groups`` groups of consecutive rows, each with its own
    buffers: ``k[layer][group]`` is a [B / row_groups, K, S, H] array. With one group (the
    default) the cache is one buffer per layer. Several groups give XLA several independent
    attention matmuls per decoding step, which XLA:CPU runs side by side on its threads (one
    batched matmul runs on one thread); the values are the same (see ``rl_mismatch.sampler``,
    which chooses the grouping).

    Attributes:
      k: per layer, a tuple of [B / row_groups, K, S, H] arrays of keys (after RoPE), one per
        row group, in the compute dtype.
      v: the same for values.
      valid_BS: which slots hold a real (non-padding) token, for the whole batch.
      index: int32 scalar, the next slot to write; every sequence writes the same slot.
    """

    k: tuple[tuple[jax.Array, ...], ...]
    v: tuple[tuple[jax.Array, ...], ...]
    valid_BS: jax.Array
    index: jax.Array

    @property
    def row_groups(self) -> int:
        return len(self.k[0])


def init_cache(config: ModelConfig, *, batch: int, max_len: int, dtype=jnp.float32,
               row_groups: int = 1) -> KVCache:
    """An empty cache. ``max_len`` bounds prompt + generated tokens; ``row_groups`` must divide
    ``batch`` (see `KVCache`)."""
    if max_len > config.max_seq_len:
        raise ValueError(f"max_len={max_len} exceeds the model's context of {config.max_seq_len} tokens.")
    if row_groups < 1 or batch % row_groups:
        raise ValueError(f"row_groups={row_groups} must be a positive divisor of the batch ({batch} rows).")
    shape = (batch // row_groups, config.n_kv_heads, max_len, config.head_dim)
    dtype = parse_dtype(dtype)
    zeros = lambda: tuple(tuple(jnp.zeros(shape, dtype) for _ in range(row_groups))
                          for _ in range(config.n_layers))
    return KVCache(zeros(), zeros(), jnp.zeros((batch, max_len), bool), jnp.zeros((), jnp.int32))


def grow_cache(cache: KVCache, max_len: int) -> KVCache:
    """``cache`` with room for ``max_len`` slots: the new slots are empty, the others unchanged.

    For decoding loops that allocate in stages: attention reads every allocated slot at every
    step, so a cache sized for the whole budget from the first step makes each step pay for
    the longest possible response (see ``rl_mismatch.sampler.decode_loop``).
    """
    S = cache.valid_BS.shape[1]
    if max_len < S:
        raise ValueError(f"grow_cache cannot shrink a {S}-slot cache to {max_len} slots.")
    if max_len == S:
        return cache
    pad = lambda a: jnp.pad(a, ((0, 0), (0, 0), (0, max_len - S), (0, 0)))
    return KVCache(jax.tree.map(pad, cache.k), jax.tree.map(pad, cache.v),
                   jnp.pad(cache.valid_BS, ((0, 0), (0, max_len - S))), cache.index)
