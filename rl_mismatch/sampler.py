"""Batched generation: the project's stand-in for an RL system's inference engine.

The sampler owns a copy of the weights in its own dtype and layout, made by ``sync_weights`` (the
analogue of the weight sync from trainer to rollout engine). Generation is one compiled program:
prefill of the left-padded prompts into a KV cache, then ``lax.while_loop`` iterations that sample
one token per sequence each, stop each sequence at EOS or ``max_new_tokens`` and leave as soon
as every sequence is done (``decode_loop``; the cache grows in stages as responses lengthen, so
a step costs what the current length costs, not what the budget would).

Where the sampler's numbers differ from the trainer's, they differ on purpose, in these places:

1. Weight rounding in ``sync_weights`` (float32 master -> sampler dtype).
2. Activations and the KV cache in the sampler dtype; matmuls accumulate in float32 and round to
   the sampler dtype (see ``rl_mismatch.models.decoder``). float32 accumulation is also the fast
   choice on CPU: XLA's bf16 x bf16 -> bf16 matmul runs 2-4x slower than bf16 x bf16 -> f32
   (measured on AVX512-BF16 Zen 5 and on AMX Sapphire Rapids; benchmarks/README.md).
3. Incremental KV-cache decoding instead of one teacher-forced forward.
4. Truncation (top-k / top-p): the token is drawn from the renormalised kept set, and both
   log-probs (full and truncated) are recorded, with the log of the kept mass.

Shapes are bucketed (:func:`rl_mismatch.buckets.round_up`: batch rows to a power of two or a
multiple of 8, whichever is fewer, and to a multiple of the data axis; prompt length to a multiple
of ``prompt_bucket``) so that steady-state calls reuse the compiled program;
``precompile`` compiles a bucket's program ahead of the first call.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from rl_mismatch import sharding as shd
from rl_mismatch.buckets import round_up
from rl_mismatch.models.decoder import Decoder
from rl_mismatch.models.kv_cache import KVCache, grow_cache, init_cache
from rl_mismatch.precision import parse_dtype


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How tokens are drawn. Hashable: it is a static argument of the compiled loop.

    Attributes:
      max_new_tokens: response budget per sequence.
      temperature: 0 means greedy (argmax); otherwise logits are divided by it.
      top_k: keep the k most probable tokens (0: no top-k).
      top_p: keep the smallest set of most probable tokens whose mass reaches ``top_p`` (1: off).
      eos_ids: token ids that end a sequence (the EOS token is part of the response).
      pad_id: written after a sequence ends.
      return_entropy: also record the entropy of the temperature-scaled distribution.
      prompt_bucket: prompt lengths are padded up to a multiple of this.
      cache_segment: the KV cache starts with room for this many response tokens and doubles
        whenever the responses outgrow it (up to ``max_new_tokens``), so that a step's attention
        reads about as many slots as the sequences hold, not the whole budget; 0 allocates the
        budget at once. Each size is one more copy of the decoding step in the compiled program.
    """

    max_new_tokens: int
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    eos_ids: tuple[int, ...] = ()
    pad_id: int = 0
    return_entropy: bool = False
    prompt_bucket: int = 64
    cache_segment: int = 64

    def __post_init__(self):
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be a positive int, got {self.max_new_tokens!r}.")
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature!r}.")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must lie in (0, 1], got {self.top_p!r}; use 1.0 to disable it.")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k!r}.")
        if self.prompt_bucket <= 0:
            raise ValueError(f"prompt_bucket must be positive, got {self.prompt_bucket!r}.")
        if self.cache_segment < 0:
            raise ValueError(f"cache_segment must be >= 0 (0: the whole budget at once), got {self.cache_segment!r}.")
        object.__setattr__(self, "eos_ids", tuple(int(i) for i in self.eos_ids))


@struct.dataclass
class Rollout:
    """Prompts and sampled responses, aligned column by column.

    ``tokens_BT`` holds the left-padded prompt in columns ``[0, P)`` and the response in
    ``[P, P + N)``. Per-token arrays are aligned with ``tokens_BT``: the value at column ``t``
    belongs to token ``tokens_BT[:, t]`` (and is 0 outside the response).

    Attributes:
      tokens_BT: int32 token ids.
      valid_BT: prompt tokens and response tokens (padding False).
      response_mask_BT: generated tokens, up to and including EOS.
      prompt_lengths_B, response_lengths_B: token counts.
      finished_B: the sequence emitted EOS (False: it ran out of budget).
      logp_BT: sampler log-prob of each sampled token under the temperature-scaled full
        distribution (the temperature-1 distribution when greedy).
      logp_truncated_BT: log-prob under the truncated, renormalised distribution sampled from.
      log_kept_mass_BT: log of the full-distribution mass kept by top-k/top-p (0 if no truncation);
        ``logp_BT = logp_truncated_BT + log_kept_mass_BT`` for every response token.
      entropy_BT: entropy of the temperature-scaled distribution (zeros unless requested).
    """

    tokens_BT: jax.Array
    valid_BT: jax.Array
    response_mask_BT: jax.Array
    prompt_lengths_B: jax.Array
    response_lengths_B: jax.Array
    finished_B: jax.Array
    logp_BT: jax.Array
    logp_truncated_BT: jax.Array
    log_kept_mass_BT: jax.Array
    entropy_BT: jax.Array
    prompt_width: int = struct.field(pytree_node=False, default=0)

    def trimmed(self, response_width: int) -> Rollout:
        """This rollout with only its first ``response_width`` response columns: what a later
        program over the rollout (the rescoring and update) needs when no response is longer.

        The dropped columns hold padding only, so every per-sequence and per-token quantity over
        the response mask is unchanged, and a program over ``[B, prompt_width + response_width]``
        computes ``response_width / N`` of the response columns' work (N: the sampled width). Use
        :func:`response_bucket` for the width, so that the later program compiles once per bucket.

        Raises:
          ValueError: ``response_width`` is not in ``[1, N]``, or a response is longer than it
            (its tokens would be lost; this check reads the lengths to the host).
        """
        n = self.tokens_BT.shape[1] - self.prompt_width
        if isinstance(response_width, bool) or not isinstance(response_width, int) or not 1 <= response_width <= n:
            raise ValueError(f"response_width={response_width!r} must be an int in [1, {n}] (the sampled width).")
        if response_width == n:
            return self
        longest = int(jax.device_get(jnp.max(self.response_lengths_B)))
        if longest > response_width:
            raise ValueError(f"response_width={response_width} would cut responses of up to {longest} tokens; "
                             "trim to at least the longest response (response_bucket gives the width).")
        end = self.prompt_width + response_width
        return self.replace(**{f.name: getattr(self, f.name)[:, :end] for f in dataclasses.fields(self)
                               if f.name.endswith("_BT")})


# ----------------------------------------------------------------------------------------------
# Weight sync.


def sync_weights(model: Decoder, dtype, mesh: jax.sharding.Mesh | None = None, *,
                 rules=shd.SAMPLER_RULES) -> Decoder:
    """The trainer -> sampler weight sync: cast every parameter to the sampler ``dtype`` and lay
    it out for the sampler mesh.

    The cast is round-to-nearest-even from the float32 master weights; for bfloat16 this alone
    perturbs each weight by up to 2^-9 relative, the first cause of the mismatch. The returned
    model computes in the same ``dtype``.

    The cast runs where the weights are, so a sampler mesh on other devices than the trainer's
    receives the weights already in its dtype (half the bytes of float32 for bf16/fp16), copied
    device to device into its own layout: no host round trip.
    """
    dtype = parse_dtype(dtype)
    graphdef, state = nnx.split(model)
    cast = jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, state)
    if mesh is not None:
        cast = jax.device_put(cast, shd.state_shardings(cast, mesh, rules))
    sampler_model = nnx.merge(graphdef, cast)
    sampler_model.dtype = jnp.dtype(dtype)
    return sampler_model


def release_weights(model: Decoder) -> None:
    """Drops ``model``'s references to its arrays, so that a sampler copy's buffers free now.

    Each ``nnx.merge`` leaves a reference cycle holding every variable of the merged model (a
    recursive closure in flax's state flattening), so a model that goes out of scope keeps its
    arrays until Python's cyclic garbage collector runs, which counts objects, not bytes: in an
    RL loop the weight sync's copies of earlier steps pile up. Nothing is deleted: arrays the
    copy shares with other holders (an fp32 sampler's are the master weights) stay with them.
    The model is unusable afterwards.
    """
    for _, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Variable):
            node.set_raw_value(None, _unsafe_bypass_check=True)


# ----------------------------------------------------------------------------------------------
# Token selection.


# Top-p looks for its kept set among the most probable tokens first (lax.top_k), and sorts the
# whole vocabulary only when these do not reach top_p in some row: a full sort of 64 × 49152
# logits per decoding step cost more than the model's forward.
_TOP_P_CANDIDATES = 256


def _top_p_threshold(sorted_BC: jax.Array, lse_B1: jax.Array, top_p: float) -> jax.Array:
    """Logit of the last kept token, from logits sorted in descending order (a prefix will do).

    A token is kept if the mass strictly before it is < top_p: the smallest prefix whose mass
    reaches top_p (the top token always).
    """
    probs = jnp.exp(sorted_BC - lse_B1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    n_keep = jnp.maximum(jnp.sum(mass_before < top_p, axis=-1, keepdims=True), 1)
    return jnp.take_along_axis(sorted_BC, n_keep - 1, axis=-1)


def _truncation_mask(scaled_BV: jax.Array, top_k: int, top_p: float) -> jax.Array | None:
    """Boolean kept set of top-k / top-p, or None when neither is active (static)."""
    if top_k == 0 and top_p >= 1.0:
        return None
    V = scaled_BV.shape[-1]
    keep = jnp.ones(scaled_BV.shape, bool)
    if 0 < top_k < V:
        kth = jax.lax.top_k(scaled_BV, top_k)[0][:, -1:]
        keep &= scaled_BV >= kth
    if top_p < 1.0:
        masked = jnp.where(keep, scaled_BV, -jnp.inf)
        lse = jax.nn.logsumexp(masked, axis=-1, keepdims=True)
        candidates = jax.lax.top_k(masked, min(_TOP_P_CANDIDATES, V))[0]
        # If the candidates' mass reaches top_p in every row, every token after them has at
        # least top_p before it and is dropped: the threshold lies among the candidates.
        enough = jnp.all(jnp.sum(jnp.exp(candidates - lse), axis=-1) >= top_p)
        threshold = jax.lax.cond(
            enough,
            lambda: _top_p_threshold(candidates, lse, top_p),
            lambda: _top_p_threshold(-jnp.sort(-masked, axis=-1), lse, top_p))
        keep &= scaled_BV >= threshold
    return keep


# Tokens per block of the two-stage inverse-CDF draw.
_DRAW_BLOCK = 256


def greedy(logp_BV: jax.Array) -> jax.Array:
    """``jnp.argmax(logp_BV, axis=-1)``: per row the first index of the largest entry, or of the
    first NaN if the row has one (argmax ranks NaN above everything), as a max and a min over the
    row. XLA:CPU runs ``argmax`` as a reduction of (value, index) pairs that it does not vectorise,
    several times slower than these two plain reductions at the vocabulary's width
    (benchmarks/README.md), and greedy decoding pays it every step. The NaNs are handled
    explicitly: XLA:CPU's vectorised max need not propagate them (``xla_cpu_enable_fast_min_max``)."""
    V = logp_BV.shape[-1]
    nan_BV = jnp.isnan(logp_BV)
    top_B1 = jnp.max(jnp.where(nan_BV, -jnp.inf, logp_BV), axis=-1, keepdims=True)
    index_V = jnp.arange(V, dtype=jnp.int32)
    # A NaN's key is its index - V (negative), a maximum's its index, anything else V: the min is
    # the first NaN if there is one, else the first maximum.
    key_BV = jnp.where(nan_BV, index_V - V, jnp.where(logp_BV == top_B1, index_V, V))
    first_B = jnp.min(key_BV, axis=-1)
    return jnp.where(first_B < 0, first_B + V, first_B)


def _last_positive(x_BN: jax.Array) -> jax.Array:
    """Index of the last entry > 0 in each row (0 if none)."""
    N = x_BN.shape[-1]
    return N - 1 - jnp.argmax(x_BN[:, ::-1] > 0, axis=-1)


def draw(logp_BV: jax.Array, key: jax.Array) -> jax.Array:
    """One token per row from ``exp(logp_BV)`` (rows normalised; −inf = excluded), by inverse CDF.

    Two stages, each with its own uniform: a block of ``_DRAW_BLOCK`` consecutive tokens with
    probability proportional to its mass, then a token within the block proportional to its
    probability. Each stage is a cumulative sum and a count, so a step costs one ``exp`` pass
    over the vocabulary; ``jax.random.categorical`` (Gumbel-max) draws and transforms B × V
    random numbers instead, 5x slower here at batch 64 × 49152 (benchmarks/README.md).

    Exact in distribution up to float32 rounding: a float32 uniform has a resolution of
    2^-23, so each stage's probabilities are effectively rounded to multiples of ~1.2e-7 of that
    stage's mass (a block below that share of the total, or a token below that share of its
    block, is drawn with a rounded probability). Gumbel-max in float32 has a comparable floor:
    it never picks a token more than ~17 nats below the best. A token of probability 0 is
    never drawn.
    """
    B, V = logp_BV.shape
    n_blocks = -(-V // _DRAW_BLOCK)
    p_BV = jnp.exp(logp_BV.astype(jnp.float32))
    p_BNK = jnp.pad(p_BV, ((0, 0), (0, n_blocks * _DRAW_BLOCK - V))).reshape(B, n_blocks, _DRAW_BLOCK)
    key_block, key_token = jax.random.split(key)

    def pick(weights_BN, key):
        cum_BN = jnp.cumsum(weights_BN, axis=-1)
        u_B1 = jax.random.uniform(key, (B, 1), jnp.float32) * cum_BN[:, -1:]
        # The first positive entry whose cumulative sum exceeds u. "Positive" is explicit: a
        # parallel-prefix cumsum (GPU/TPU) need not be flat across a zero weight. If rounding
        # leaves no entry above u, the last positive one.
        above_BN = (cum_BN > u_B1) & (weights_BN > 0)
        return jnp.where(jnp.any(above_BN, axis=-1), jnp.argmax(above_BN, axis=-1), _last_positive(weights_BN))

    block_B = pick(jnp.sum(p_BNK, axis=-1), key_block)
    in_block_BK = jnp.take_along_axis(p_BNK, block_B[:, None, None], axis=1)[:, 0]
    return (block_B * _DRAW_BLOCK + pick(in_block_BK, key_token)).astype(jnp.int32)


def select_tokens(logits_BV: jax.Array, key: jax.Array, cfg: SamplingConfig):
    """Draws one token per row; returns ``(tokens_B, logp_B, logp_truncated_B, log_kept_B, entropy_B)``."""
    logits_BV = logits_BV.astype(jnp.float32)
    scaled = logits_BV if cfg.temperature == 0 else logits_BV / cfg.temperature
    logp_full = jax.nn.log_softmax(scaled, axis=-1)
    keep = _truncation_mask(scaled, cfg.top_k, cfg.top_p)
    if keep is None:
        logp_trunc = logp_full
        log_kept = jnp.zeros(logits_BV.shape[:1], jnp.float32)
    else:
        logp_trunc = jax.nn.log_softmax(jnp.where(keep, scaled, -jnp.inf), axis=-1)
        log_kept = jax.nn.logsumexp(jnp.where(keep, logp_full, -jnp.inf), axis=-1)
    if cfg.temperature == 0:
        tokens = greedy(logp_trunc)
    else:
        tokens = draw(logp_trunc, key)
    take = lambda a: jnp.take_along_axis(a, tokens[:, None], axis=-1)[:, 0]
    if cfg.return_entropy:
        entropy = -jnp.sum(jnp.exp(logp_full) * logp_full, axis=-1)
    else:
        entropy = jnp.zeros(logits_BV.shape[:1], jnp.float32)
    return tokens.astype(jnp.int32), take(logp_full), take(logp_trunc), log_kept, entropy


# ----------------------------------------------------------------------------------------------
# The compiled generation program.


def cache_sizes(max_new_tokens: int, cache_segment: int) -> tuple[int, ...]:
    """Response-token capacities the KV cache goes through: ``cache_segment``, twice that, ...,
    ``max_new_tokens`` (just the budget when ``cache_segment`` is 0 or covers it)."""
    sizes, size = [], cache_segment
    while 0 < size < max_new_tokens:
        sizes.append(size)
        size *= 2
    return (*sizes, max_new_tokens)


def response_bucket(longest: int, cfg: SamplingConfig) -> int:
    """The response width that holds responses of up to ``longest`` tokens: the smallest of
    :func:`cache_sizes` that is at least ``longest``, i.e. the KV-cache size the decoding loop
    ended in. A program over the rollout (`Rollout.trimmed`) then compiles once per cache size
    reached, as the sampler's loop has one stage per size.

    Raises:
      ValueError: ``longest`` is negative or above ``cfg.max_new_tokens``.
    """
    if not 0 <= longest <= cfg.max_new_tokens:
        raise ValueError(f"longest={longest} must lie in [0, max_new_tokens={cfg.max_new_tokens}].")
    return next(size for size in cache_sizes(cfg.max_new_tokens, cfg.cache_segment) if size >= longest)


# A batch's rows are padded up to a power of two or a multiple of this, whichever is fewer.
_ROW_MULTIPLE = 8


def batch_rows(prompts: int, data: int = 1) -> int:
    """The rows a batch of ``prompts`` prompts runs as: the fewer of a power of two and a multiple
    of ``_ROW_MULTIPLE``, each a multiple of ``data`` (the mesh's data axis, so the batch splits
    evenly). Padding rows cost a decoding step nearly what real ones do, and past 8 rows a
    multiple of 8 pads less than a power of two (40 -> 40, not 64)."""
    return min(round_up(prompts, power_of_two=True, multiple=data),
               round_up(prompts, multiple=math.lcm(_ROW_MULTIPLE, data)))

# KV-cache row groups of a half-precision decoding loop on CPU, and the fewest rows per group.
_CPU_ROW_GROUPS = 2
_MIN_ROWS_PER_GROUP = 16


def cache_row_groups(batch: int, dtype, mesh: jax.sharding.Mesh | None = None) -> int:
    """Row groups of the decoding loop's KV cache (`rl_mismatch.models.kv_cache.KVCache`).

    ``_CPU_ROW_GROUPS`` on XLA:CPU for a bfloat16/float16 batch of at least
    ``_CPU_ROW_GROUPS * _MIN_ROWS_PER_GROUP`` rows on a single data shard, else 1. A decoding
    step's attention is two batched matmuls per layer, and XLA:CPU runs each batched matmul on
    one thread; with the rows in two groups, each with its own cache buffers, it runs two
    independent ones side by side. The values are bitwise the same (rows never interact;
    tests/test_sampler.py). On two cores, SmolLM2 bf16, it is faster from 32 rows and makes no
    difference at 16 (benchmarks/README.md). Not used in float32 (no gain), on a mesh
    whose data axis spans several devices (each device already runs its own program, and groups
    of consecutive rows would cut across the devices' shards), nor off CPU.
    """
    data = 1 if mesh is None else mesh.shape[shd.DATA]
    if (jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) and data == 1
            and batch >= _CPU_ROW_GROUPS * _MIN_ROWS_PER_GROUP and batch % _CPU_ROW_GROUPS == 0
            and jax.default_backend() == "cpu"):
        return _CPU_ROW_GROUPS
    return 1


def decode_loop(model: Decoder, prompt_BP, prompt_valid_BP, *, max_new_tokens: int, cache_segment: int,
                step, carry, finished_B, mesh=None, group: int = 1):
    """Prefill, then one KV-cache decoding step per response token; traced (call it under jit).

    ``step(i, logits_BV, carry, finished_B) -> (tokens_B, fed_valid_B, carry, finished_B)``
    picks response token ``i`` of every row from the model's float32 logits; the loop feeds
    ``tokens_B`` back (where ``fed_valid_B`` is False the token is marked invalid and never
    attended) and stops after ``max_new_tokens`` steps or as soon as every row is finished.
    Returns the final ``(carry, finished_B)``. :func:`generate` samples with it; the precision
    study scores fixed tokens with it, so both run the same arithmetic.

    The cache grows through :func:`cache_sizes` (prompt + 64, + 128, + 256, ... slots with the
    default ``cache_segment``): one ``lax.while_loop`` per size, the cache padded (one copy)
    between them. Attention reads every allocated slot, so a cache allocated for the whole
    budget at once makes every step as slow as the last one (benchmarks/README.md).

    ``group > 1`` says that the rows come in runs of ``group`` identical consecutive prompts (a
    GRPO group; the caller checks it, see :func:`generate`): each run's prompt is prefilled
    once, and its keys, values and first logits are repeated to the run's rows. ``group`` must
    divide ``B``, and on a mesh ``B / group`` must split over the data axis.
    """
    B, P = prompt_BP.shape
    sizes = cache_sizes(max_new_tokens, cache_segment)
    constrain = lambda cache: cache
    if mesh is not None:
        # Batch over data, KV heads over model: each device holds only its slice of the cache.
        spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(shd.DATA, shd.MODEL, None, None))
        kv = lambda arrays: jax.tree.map(lambda a: jax.lax.with_sharding_constraint(a, spec), arrays)
        constrain = lambda cache: cache._replace(k=kv(cache.k), v=kv(cache.v))
    U = B // group  # rows prefilled
    cache = constrain(init_cache(model.config, batch=U, max_len=P + sizes[0], dtype=model.dtype,
                                 row_groups=cache_row_groups(U, model.dtype, mesh)))
    layers = model.decoding_layers(B)  # made once: loop invariants, not per-step copies
    logits_B1V, cache = model.decode(prompt_BP[::group], cache, valid_BT=prompt_valid_BP[::group], layers=layers,
                                     last_only=True)
    if group > 1:
        logits_B1V = jnp.repeat(logits_B1V, group, axis=0)
        cache = constrain(_repeat_rows(cache, group, cache_row_groups(B, model.dtype, mesh)))

    def body(s: _LoopState) -> _LoopState:
        tokens_B, fed_valid_B, carry, finished_B = step(s.i, s.logits_BV, s.carry, s.finished_B)
        logits_B1V, cache = model.decode(tokens_B[:, None], s.cache, valid_BT=fed_valid_B[:, None], layers=layers)
        return _LoopState(s.i + 1, logits_B1V[:, 0], cache, carry, finished_B)

    s = _LoopState(jnp.zeros((), jnp.int32), logits_B1V[:, 0], cache, carry, finished_B)
    for n, size in enumerate(sizes):
        if n:
            s = s._replace(cache=constrain(grow_cache(s.cache, P + size)))
        s = jax.lax.while_loop(lambda s, size=size: (s.i < size) & ~jnp.all(s.finished_B), body, s)
    return s.carry, s.finished_B


def _repeat_rows(cache: KVCache, times: int, row_groups: int) -> KVCache:
    """``cache`` with each row repeated ``times`` times in a row, held in ``row_groups`` groups."""

    def repeat(groups):
        rows = groups[0] if len(groups) == 1 else jnp.concatenate(groups, axis=0)
        return tuple(jnp.split(jnp.repeat(rows, times, axis=0), row_groups, axis=0))

    return KVCache(tuple(map(repeat, cache.k)), tuple(map(repeat, cache.v)),
                   jnp.repeat(cache.valid_BS, times, axis=0), cache.index)


class _LoopState(NamedTuple):
    """The decoding loop's state: response index, next-token logits, KV cache, caller's carry."""

    i: jax.Array
    logits_BV: jax.Array
    cache: KVCache
    carry: Any
    finished_B: jax.Array


def _generate(graphdef, state, prompt_BP, prompt_valid_BP, key, *, cfg: SamplingConfig, mesh, group: int):
    model = nnx.merge(graphdef, state)
    B, P = prompt_BP.shape
    N = cfg.max_new_tokens
    eos = jnp.asarray(cfg.eos_ids or (-1,), jnp.int32)

    def step(i, logits_BV, carry, finished):
        out, key = carry
        key, sub = jax.random.split(key)
        tok, lp, lp_tr, kept, ent = select_tokens(logits_BV, sub, cfg)
        live = ~finished
        tok = jnp.where(live, tok, cfg.pad_id)
        zero = jnp.zeros_like(lp)
        cols = (tok, live, jnp.where(live, lp, zero), jnp.where(live, lp_tr, zero),
                jnp.where(live, kept, zero), jnp.where(live, ent, zero))
        out = tuple(jax.lax.dynamic_update_index_in_dim(o, c, i, axis=1) for o, c in zip(out, cols))
        # A finished row's pad token is fed back marked invalid, so it is never attended.
        return tok, live, (out, key), finished | (live & jnp.isin(tok, eos))

    out0 = (jnp.full((B, N), cfg.pad_id, jnp.int32), jnp.zeros((B, N), bool),
            *(jnp.zeros((B, N), jnp.float32) for _ in range(4)))
    # Rows with no prompt token at all are batch padding: finished from the start.
    finished0 = ~jnp.any(prompt_valid_BP, axis=1)
    (out, _), finished = decode_loop(model, prompt_BP, prompt_valid_BP, max_new_tokens=N,
                                     cache_segment=cfg.cache_segment, step=step, carry=(out0, key),
                                     finished_B=finished0, mesh=mesh, group=group)
    tok_BN, mask_BN, lp_BN, lptr_BN, kept_BN, ent_BN = out
    pad = lambda a, fill=0: jnp.concatenate([jnp.full((B, P), fill, a.dtype), a], axis=1)
    return Rollout(
        tokens_BT=jnp.concatenate([prompt_BP, tok_BN], axis=1),
        valid_BT=jnp.concatenate([prompt_valid_BP, mask_BN], axis=1),
        response_mask_BT=pad(mask_BN),
        prompt_lengths_B=jnp.sum(prompt_valid_BP, axis=1, dtype=jnp.int32),
        response_lengths_B=jnp.sum(mask_BN, axis=1, dtype=jnp.int32),
        finished_B=finished & jnp.any(prompt_valid_BP, axis=1),
        logp_BT=pad(lp_BN), logp_truncated_BT=pad(lptr_BN), log_kept_mass_BT=pad(kept_BN),
        entropy_BT=pad(ent_BN), prompt_width=P,
    )


@functools.lru_cache(maxsize=64)
def _compiled(graphdef, cfg: SamplingConfig, mesh, group: int):
    fn = functools.partial(_generate, graphdef, cfg=cfg, mesh=mesh, group=group)
    if mesh is None:
        return jax.jit(fn)
    batch = shd.batch_sharding(mesh)
    return jax.jit(fn, in_shardings=(None, batch, batch, shd.replicated(mesh)),
                   out_shardings=None)


def pad_prompts(prompts: Sequence[Sequence[int]], *, pad_id: int, prompt_bucket: int,
                context: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Left-pads ragged token lists to ``[B, P]``: ``P`` is the longest prompt rounded up to a
    multiple of ``prompt_bucket``, capped at ``context``.

    Raises:
      ValueError: empty batch, an empty prompt, or a prompt longer than ``context``.
    """
    if len(prompts) == 0:
        raise ValueError("generate() got an empty batch of prompts; pass at least one prompt.")
    lengths = [len(p) for p in prompts]
    if min(lengths) == 0:
        raise ValueError(f"Prompt {lengths.index(0)} is empty; every prompt needs at least one token.")
    longest = max(lengths)
    if context is not None and longest > context:
        i = lengths.index(longest)
        raise ValueError(f"Prompt {i} has {longest} tokens, more than the {context}-token context "
                         "left for it; shorten it or lower max_new_tokens.")
    P = round_up(longest, multiple=prompt_bucket, maximum=context)
    tokens = np.full((len(prompts), P), pad_id, np.int32)
    valid = np.zeros((len(prompts), P), bool)
    for i, p in enumerate(prompts):
        tokens[i, P - len(p):] = p
        valid[i, P - len(p):] = True
    return tokens, valid


def padded_prompts(prompts, cfg: SamplingConfig, max_seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """``(tokens_BP, valid_BP)``: ``prompts`` (as :func:`generate` takes them) left-padded as
    :func:`generate` pads them for a model of ``max_seq_len`` positions, before any batch-padding
    rows. Its width ``P`` is the program's prompt width.

    Raises:
      ValueError: ``cfg.max_new_tokens`` leaves no room for a prompt, or as :func:`pad_prompts`.
    """
    context = max_seq_len - cfg.max_new_tokens
    if context <= 0:
        raise ValueError(f"max_new_tokens={cfg.max_new_tokens} leaves no room for a prompt in the "
                         f"model's {max_seq_len}-token context.")
    return pad_prompts(_prompt_lists(prompts), pad_id=cfg.pad_id, prompt_bucket=cfg.prompt_bucket, context=context)


def _prompt_lists(prompts) -> list[list[int]]:
    """Token lists from ragged lists or a left-padded ``(tokens_BP, valid_BP)`` pair."""
    if isinstance(prompts, tuple) and len(prompts) == 2 and np.ndim(prompts[0]) == 2:
        tokens, valid = (np.asarray(a) for a in prompts)
        return [list(t[v]) for t, v in zip(tokens, valid)]
    return [list(p) for p in prompts]


def generate(model: Decoder, prompts, key: jax.Array, cfg: SamplingConfig, *,
             mesh: jax.sharding.Mesh | None = None, group: int = 1) -> Rollout:
    """Samples a response for every prompt.

    Args:
      model: the sampler's model (from ``sync_weights``); it computes in its own dtype.
      prompts: a list of token-id lists, or a ``(tokens_BP, valid_BP)`` pair already left-padded.
      key: PRNG key; the same key and inputs give the same tokens.
      cfg: sampling settings.
      mesh: optional ``(data, model)`` mesh; the model must already be laid out on it
        (``sync_weights(..., mesh=mesh)``); the key is moved onto it. With several processes (multi-host), every process
        passes the same whole batch and gets the global ``Rollout``.
      group: the prompts come in runs of ``group`` identical consecutive prompts (GRPO's group:
        one prompt, ``group`` responses). The prefill, a large part of a short rollout's time,
        then runs once per run (benchmarks/README.md) instead of once per row; the rows still
        draw their own tokens. Where the padded batch or the mesh's data axis does not split
        into whole runs, every row is prefilled, as with ``group=1``.

    Returns:
      A ``Rollout`` with one row per prompt (batch padding removed).

    Raises:
      ValueError: empty batch, a prompt longer than the context, a mesh the batch or heads do
        not fit, or ``group`` not dividing the batch into runs of identical prompts.
    """
    program, state, tokens, valid, B = _prepare(model, prompts, cfg, mesh, group=group)
    if mesh is not None:  # e.g. a key made on the trainer's devices, for a sampler with its own
        key = jax.device_put(key, shd.replicated(mesh))
    return _real_rows(program(state, tokens, valid, key), B)


def precompile(model: Decoder, prompts, cfg: SamplingConfig, *, mesh: jax.sharding.Mesh | None = None,
               group: int = 1) -> None:
    """Compiles :func:`generate`'s program for ``prompts``' bucket without running it.

    Arguments as for :func:`generate`. A later ``generate`` call in the same batch and
    prompt-width bucket compiles no program of its own (with a typed ``jax.random.key``, the key
    kind used here, placed as ``generate`` places it); only, the first time, the small eager
    slices that cut off the batch padding. For timing a sampler without its compilation, or
    compiling beside other work: nothing runs on the devices, and it may run in another thread
    (`rl_mismatch.experiment` compiles the first step's sampler while the evaluation runs).
    """
    program, state, tokens, valid, _ = _prepare(model, prompts, cfg, mesh, group=group)
    key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=None if mesh is None else shd.replicated(mesh))
    abstract = shd.abstract_argument
    program.lower(jax.tree.map(abstract, state), abstract(tokens), abstract(valid), key).compile()


def _real_rows(rollout: Rollout, B: int) -> Rollout:
    """The first ``B`` rows: the batch padding cut off."""
    if rollout.tokens_BT.shape[0] == B:
        return rollout
    return jax.tree.map(lambda a: a[:B], rollout)


def _prepare(model: Decoder, prompts, cfg: SamplingConfig, mesh, *, group: int = 1):
    """``(program, state, tokens_BP, valid_BP, B)``: the compiled sampler for the bucket of
    ``prompts`` and its inputs, padded to the bucket (``B`` real rows). The program prefills
    once per run of ``group`` prompts where the padded batch and its data shards hold whole
    runs, else every row."""
    lists = _prompt_lists(prompts)
    _check_groups(lists, group)
    tokens, valid = padded_prompts(lists, cfg, model.config.max_seq_len)
    B = tokens.shape[0]
    data = mesh.shape[shd.DATA] if mesh is not None else 1
    Bb = batch_rows(B, data)
    if Bb > B:  # all-padding rows: finished from the start, cut off by _real_rows
        tokens = np.concatenate([tokens, np.full((Bb - B, tokens.shape[1]), cfg.pad_id, np.int32)])
        valid = np.concatenate([valid, np.zeros((Bb - B, valid.shape[1]), bool)])
    if Bb % group or (mesh is not None and (Bb // group) % mesh.shape[shd.DATA]):
        group = 1  # the padded batch or its shards do not hold whole runs: prefill every row
    graphdef, state = nnx.split(model)
    if mesh is not None:
        shd.state_shardings(state, mesh, shd.SAMPLER_RULES)  # raises a clear error on a bad mesh
        if jax.process_count() > 1:
            # Multi-controller JAX takes host arrays only as replicated inputs. Every process
            # holds the whole (identically padded) batch; hand the program global arrays split
            # over the data axis, each process contributing its own devices' rows.
            if Bb != B:
                raise ValueError(f"With {jax.process_count()} processes the batch ({B} prompts) must be a "
                                 f"power of two or a multiple of {_ROW_MULTIPLE}, and a multiple of the data axis "
                                 f"({data}); {Bb} would do.")
            sharding = shd.batch_sharding(mesh)
            tokens, valid = (jax.make_array_from_callback(a.shape, sharding, lambda index, a=a: a[index])
                             for a in (tokens, valid))
    return _compiled(graphdef, cfg, mesh, group), state, tokens, valid, B


def _check_groups(prompts: list[list[int]], group: int) -> None:
    if not isinstance(group, int) or group < 1:
        raise ValueError(f"group={group!r}; it must be a positive int (1: every prompt on its own).")
    if len(prompts) % group:
        raise ValueError(f"group={group} does not divide the batch of {len(prompts)} prompts into runs; "
                         "pass a whole number of groups, or group=1.")
    for start in range(0, len(prompts), group):
        for i in range(start + 1, start + group):
            if prompts[i] != prompts[start]:
                raise ValueError(f"group={group}: prompt {i} differs from prompt {start}, the first of its run. "
                                 "The prompts must come in runs of `group` identical consecutive prompts "
                                 "(one prompt's responses together); pass group=1 otherwise.")
