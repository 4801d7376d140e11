"""The trainer's step: a pure, jitted ``step(state, batch) -> (state, metrics)`` for one RL update.

One call does, for one rollout batch::

    for each micro-batch m (lax.scan):
        logp   = rescore(model(params, dtype=compute_dtype), m)  teacher-forced, compute dtype
        old    = stop_gradient(logp)                            one update per rollout
        loss_m = compute_policy_loss(logp, old, μ, A, mask, normalizer=N of the whole batch)
        g_m    = ∇_params S·loss_m                              S = loss scale (1 unless float16)
        G     += g_m                                            Σ_m loss_m is the whole-batch loss
    G = G / S;  finite = isfinite(|G|²)                         (batch-normalised IS weights: G also
                                                                divided by the batch's mean weight)
    if finite: params, opt_state = optimizer.update(G, opt_state, params, **opt_signals)  (lax.cond)

Precision. The master weights and the optimizer state stay float32. The step hands the float32
parameters to the model built with the compute dtype (float32, bfloat16 or float16), and the
model casts each weight where it is used (``Decoder``: inside its layer scan, in
``decoder._mixed_einsum``, whose backward returns the weight gradient in float32 straight from
the matmul's float32 accumulator), so gradients arrive in float32 and micro-batch gradients
are accumulated in float32. Why not cast the whole tree once up front: the gradient would
then be taken with respect to stacked bfloat16 weights, and the backward layer scan writes
those through a fused convert + dynamic-update-slice that XLA:CPU does not do in place,
which measured slower on SmolLM2-135M in bfloat16 (benchmarks/README.md).
The loss itself is float32 (``rl_mismatch.losses``). float16 uses
`rl_mismatch.precision.DynamicLossScale` (why not ``jmp``: see that module): the loss is
multiplied by S before differentiation, so small float16 gradients do not underflow; the
float32 sum of the micro-batch gradients is divided by S; a non-finite result skips the
update — the step returns the previous parameters and optimizer state themselves, bit for
bit — halves S and counts ``opt/skipped_steps``.

The trainer's log-probs come from the same forward that is differentiated: ``old_logp`` is its
``stop_gradient`` and the mismatch metrics compare the sampler's log-probs with it, so
measuring the mismatch costs no extra forward pass.

Gradient noise scale (McCandlish et al. 2018). Each micro-batch gradient G_m is
also the gradient of the loss on a smaller batch (B_small = B / n_microbatches sequences), and
their sum is the gradient of the big batch (B_big = B). Sequences without response tokens
(all-padding rows) contribute no gradient and are not counted; a micro-batch without any is
left out. From ``|G_small|² = mean_m |G_m|²``
and ``|G_big|²``, `gradient_noise_scale` estimates ``B_noise = tr(Σ)/|G|²`` with no extra
backward pass. G_m is the gradient of micro-batch m's loss on its own: its share of the summed
gradient divided by its share ``N_m/N`` of the normaliser (the micro-batch losses use the
whole-batch normaliser N). Batch sizes count sequences; with token-mean aggregation a
sequence's weight grows with its length, so B_noise is then in units of "average sequences".

Sharding. With a mesh, parameters are laid out by ``sharding.TRAINER_RULES`` (FSDP: ``embed``
over ``data``, tensor parallelism over ``model``), the optimizer state's parameter-shaped
leaves like the parameters they belong to, scalars replicated, and the batch split over
``data``. Micro-batch m takes rows m, m + n, m + 2n, …, so that every micro-batch is spread
over all data shards (a contiguous split would put each micro-batch on a few devices).

GRPO groups. When the batch's rows come in runs of ``group`` responses to one prompt
(`TrainBatch.group`) and it holds a multiple of n × group × data-axis size rows, micro-batch m
takes whole runs m, m + n, m + 2n, … (still spread over every data shard), and the forward
computes each run's prompt once (``Decoder.grouped_hidden_states``, ``share_prompts``): the
layers see ``B/group · prompt + B · response`` tokens instead of ``B · (prompt + response)``.
The noise scale's small batches are then whole groups. Otherwise rows are split as above and
every row is computed in full. A batch with ``packed_width`` > 0 also lays each run's responses
end to end in that many columns after its prompt (``Decoder.packed_hidden_states``), each token
attending to the prompt and to its own response only: the layers then see
``B/group · (prompt + packed_width)`` tokens, and the numbers are those of the unpacked step up
to float32 summation order.

Example (tiny model, one device):

>>> import optax, jax, jax.numpy as jnp
>>> from flax import nnx
>>> from rl_mismatch.losses import LossConfig
>>> from rl_mismatch.models import Decoder, tiny_config
>>> model = Decoder(tiny_config(n_layers=1), rngs=nnx.Rngs(0))
>>> opt = optax.adamw(1e-3)
>>> graphdef, state = init_train_state(model, opt, compute_dtype="bf16", key=jax.random.key(0))
>>> step = make_train_step(graphdef, opt, LossConfig(), compute_dtype="bf16")
>>> tokens = jnp.arange(16, dtype=jnp.int32).reshape(2, 8)
>>> mask = jnp.arange(8)[None, :] >= jnp.array([[3], [4]])
>>> batch = TrainBatch(tokens, jnp.ones_like(mask), mask, jnp.full((2, 8), -5.5), jnp.array([1.0, -1.0]))
>>> state, metrics = step(state, batch)
>>> int(state.step), bool(jnp.isfinite(metrics["opt/grad_norm"]))
(1, True)
"""

from __future__ import annotations

import dataclasses
import functools
import re

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct
from jax.sharding import NamedSharding, PartitionSpec as P

from rl_mismatch import losses, mismatch, optim, precision
from rl_mismatch.buckets import round_up
from rl_mismatch.models import packing
from rl_mismatch import sharding as shd


class TrainBatch(struct.PyTreeNode):
    """One RL batch, every array with the batch axis first (see `rl_mismatch.sampler.Rollout`).

    The trainer's own log-probs are not part of the batch: the step computes them in its
    forward (see the module docstring).

    Attributes:
      tokens_BT: int32 left-padded prompt + response tokens.
      valid_BT: bool, False on padding.
      response_mask_BT: bool, True on the response tokens the loss is taken over.
      sampler_logp_BT: the sampler's log-prob of each token (``Rollout.logp_BT``, or
        ``logp_truncated_BT`` when correcting for top-k/top-p truncation).
      advantages_B: float32 advantage of each sequence (`losses.compute_advantages`).
      sampler_entropy_BT: optional sampler entropy per token; when given, the mismatch
        metrics are also binned by it (``mismatch/by_entropy/…``).
      score_from: static; the first column the trainer scores (``mismatch.rescore``): columns
        before it must be outside the response mask (the step checks). A rollout's ``prompt_width`` skips the LM
        head over the prompt (what ``logits_to_keep`` does in HF-based trainers); 1 scores
        every column. Each distinct value is one compiled step.
      group: static; the rows come in runs of ``group`` consecutive rows with the same prompt
        (GRPO's group size), equal on every column before ``score_from − 1`` (the step checks).
        The step then runs each prompt through the model once per run and keeps each run in
        one micro-batch (the module docstring's "GRPO groups"). 1: no such structure.
      packed_width: static; with ``group`` > 1, the columns after the prompt into which each
        run's responses are laid end to end (`mismatch.rescore`'s ``packed_width``), so the
        step computes no padding after short responses; 0: every row keeps its columns. It
        must hold every run's responses (the step checks); `packed_width` picks it. Each
        distinct value is one compiled step.
    """

    tokens_BT: jax.Array
    valid_BT: jax.Array
    response_mask_BT: jax.Array
    sampler_logp_BT: jax.Array
    advantages_B: jax.Array
    sampler_entropy_BT: jax.Array | None = None
    score_from: int = struct.field(pytree_node=False, default=1)
    group: int = struct.field(pytree_node=False, default=1)
    packed_width: int = struct.field(pytree_node=False, default=0)

    @classmethod
    def from_rollout(cls, rollout, advantages_B: jax.Array, *, truncated: bool = False,
                     with_entropy: bool = False, group: int = 1, packed_width: int = 0) -> TrainBatch:
        """The batch of a `rl_mismatch.sampler.Rollout` and its advantages.

        Args:
          rollout: the sampler's output.
          advantages_B: [B] advantages.
          truncated: use the log-probs of the truncated (top-k/top-p) distribution that was
            sampled from, rather than of the full distribution.
          with_entropy: pass the rollout's entropies on (only if the sampler recorded them).
          group: the rollout's rows are runs of ``group`` responses to one prompt (what
            ``sampler.generate(..., group=)`` was given).
          packed_width: see the attribute (`packed_width` gives it from the response lengths).
        """
        return cls(tokens_BT=rollout.tokens_BT, valid_BT=rollout.valid_BT,
                   response_mask_BT=rollout.response_mask_BT,
                   sampler_logp_BT=rollout.logp_truncated_BT if truncated else rollout.logp_BT,
                   advantages_B=advantages_B,
                   sampler_entropy_BT=rollout.entropy_BT if with_entropy else None,
                   score_from=max(1, rollout.prompt_width), group=group, packed_width=packed_width)

    @classmethod
    def shapes(cls, rows: int, prompt_width: int, response_width: int, *, with_entropy: bool = False,
               group: int = 1, packed_width: int = 0) -> TrainBatch:
        """The batch `from_rollout` makes of a rollout of ``rows`` rows, ``prompt_width`` prompt
        and ``response_width`` response columns, as ``jax.ShapeDtypeStruct`` leaves: what
        `TrainStep.precompile` needs to compile the step before any rollout exists."""
        columns = prompt_width + response_width
        array = lambda dtype, shape=(rows, columns): jax.ShapeDtypeStruct(shape, dtype)
        return cls(tokens_BT=array(jnp.int32), valid_BT=array(jnp.bool_), response_mask_BT=array(jnp.bool_),
                   sampler_logp_BT=array(jnp.float32), advantages_B=array(jnp.float32, (rows,)),
                   sampler_entropy_BT=array(jnp.float32) if with_entropy else None,
                   score_from=max(1, prompt_width), group=group, packed_width=packed_width)


class TrainState(struct.PyTreeNode):
    """Everything a train step reads and replaces.

    Attributes:
      step: int32 scalar, number of steps taken (skipped float16 steps included).
      params: float32 master parameters, the ``nnx.State`` of the `Decoder`.
      opt_state: the optax state, parameter-shaped leaves float32 and sharded like params.
      loss_scale: `precision.LossScaleState` (scale fixed at 1 unless computing in float16).
      key: a PRNG key carried for the caller (e.g. ``jax.random.fold_in(key, step)`` for
        per-step sampling keys). The step uses no randomness, so the key is kept out of the
        compiled function and returned unchanged.
    """

    step: jax.Array
    params: nnx.State
    opt_state: optax.OptState
    loss_scale: precision.LossScaleState
    key: jax.Array


# --------------------------------------------------------------------------------------------
# Gradient noise scale
# --------------------------------------------------------------------------------------------


def noise_statistics(sq_small, sq_big, b_small, b_big) -> tuple[jax.Array, jax.Array]:
    """Unbiased estimates of |G|² and tr(Σ) from two batch sizes (McCandlish et al. 2018, App. A).

    With G_B the mean gradient of B independent examples, E|G_B|² = |G|² + tr(Σ)/B, so two
    batch sizes give two equations::

        |G|²  ≈ (B_big |G_big|² − B_small |G_small|²) / (B_big − B_small)
        tr(Σ) ≈ (|G_small|² − |G_big|²) / (1/B_small − 1/B_big)

    Both are unbiased when the squared norms are; either may come out negative for one step.

    Args:
      sq_small: |G_small|², squared norm of a gradient over ``b_small`` examples (or the mean
        of several such).
      sq_big: |G_big|², the same over ``b_big`` examples.
      b_small, b_big: the batch sizes, ``b_small < b_big``.

    Returns:
      ``(grad_sq, trace)``, float32.

    >>> [round(float(x), 3) for x in noise_statistics(3.0, 1.5, 1, 4)]
    [1.0, 2.0]
    """
    f32 = jnp.float32
    sq_small, sq_big = jnp.asarray(sq_small, f32), jnp.asarray(sq_big, f32)
    b_small, b_big = jnp.asarray(b_small, f32), jnp.asarray(b_big, f32)
    grad_sq = (b_big * sq_big - b_small * sq_small) / (b_big - b_small)
    trace = (sq_small - sq_big) / (1.0 / b_small - 1.0 / b_big)
    return grad_sq, trace


def gradient_noise_scale(sq_small, sq_big, b_small, b_big) -> jax.Array:
    """The simple noise scale ``B_noise = tr(Σ) / |G|²`` (McCandlish et al. 2018).

    B_noise is the batch size at which the gradient noise equals the signal: training is
    far from its most data-efficient above it, and step-count-inefficient far below it.
    Inputs as in `noise_statistics`. The estimate from one step is noisy (each squared norm
    is a single sample, and |G|² can even come out ≤ 0); average ``sq_small`` and ``sq_big``
    over many steps first — the train step logs them as ``opt/grad_sq_small`` and
    ``opt/grad_sq_big`` for exactly that — and apply this function to the averages (the
    ratio of averages, as McCandlish et al. do, not the average of ratios).

    Returns:
      float32 B_noise; +inf where the |G|² estimate is ≤ 0 (signal indistinguishable from
      noise at these batch sizes).

    >>> float(gradient_noise_scale(3.0, 1.5, 1, 4))   # |G|² = 1, tr(Σ) = 2
    2.0
    """
    grad_sq, trace = noise_statistics(sq_small, sq_big, b_small, b_big)
    return jnp.where(grad_sq > 0, trace / jnp.where(grad_sq > 0, grad_sq, 1.0), jnp.inf)


# --------------------------------------------------------------------------------------------
# State
# --------------------------------------------------------------------------------------------


def _path_key(path) -> tuple[str, ...]:
    return tuple(str(k) for k in path)


def _opt_state_shardings(opt_state, params, param_shardings, mesh):
    """Shardings for an optax state: a leaf whose path ends with a parameter's path and whose
    shape is that parameter's (Adam's mu/nu, momentum, …) is placed like the parameter;
    everything else (step counts, scalars of schedules and triggers) is replicated.

    Matching by path suffix and shape works for any nesting of chain/named_chain/inject_…
    without initialising the optimizer with placeholder parameters (which transforms that
    look at their parameters' shapes or dtypes reject).
    """
    table = {}
    flat_params = jax.tree_util.tree_flatten_with_path(params)[0]
    flat_shardings = jax.tree.leaves(param_shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
    if len(flat_params) != len(flat_shardings):
        raise AssertionError("one sharding per parameter leaf expected")
    for (path, leaf), sharding in zip(flat_params, flat_shardings):
        table[_path_key(path)] = (tuple(np.shape(leaf)), sharding)
    replicated = shd.replicated(mesh)

    def one(path, leaf):
        key = _path_key(path)
        for start in range(len(key)):
            hit = table.get(key[start:])
            if hit is not None and hit[0] == tuple(np.shape(leaf)):
                return hit[1]
        return replicated

    return jax.tree_util.tree_map_with_path(one, opt_state)


def train_state_shardings(state: TrainState, mesh: jax.sharding.Mesh) -> TrainState:
    """The `TrainState`-shaped tree of ``NamedSharding`` the step keeps its state in.

    Parameters by ``sharding.TRAINER_RULES``, the optimizer state as in
    `_opt_state_shardings`, step / loss scale / key replicated. ``state`` may be abstract
    (``jax.eval_shape``).
    """
    param_sh = shd.state_shardings(state.params, mesh, shd.TRAINER_RULES)
    replicated = shd.replicated(mesh)
    return TrainState(
        step=replicated, params=param_sh,
        opt_state=_opt_state_shardings(state.opt_state, state.params, param_sh, mesh),
        loss_scale=jax.tree.map(lambda _: replicated, state.loss_scale),
        key=None if state.key is None else replicated)


def init_train_state(model: nnx.Module, optimizer: optax.GradientTransformation, *, compute_dtype: Any,
                     key: jax.Array, mesh: jax.sharding.Mesh | None = None,
                     loss_scale: precision.LossScale | None = None) -> tuple[nnx.GraphDef, TrainState]:
    """Splits ``model`` into its graph and a fresh `TrainState` placed on ``mesh``.

    The state holds copies of the model's parameters: the step donates its state, and the
    caller's ``model`` must stay usable (e.g. to build the first sampler copy).

    Args:
      model: a `rl_mismatch.models.Decoder` with float32 parameters (the master weights).
      optimizer: the optax transform the step will apply.
      compute_dtype: float32 / bfloat16 / float16 (names as `precision.parse_dtype`); picks
        the default loss scaling.
      key: a PRNG key stored in the state.
      mesh: a ``(data, model)`` mesh (`sharding.make_mesh`), or None for the default device.
      loss_scale: the loss scaling (default `precision.make_loss_scale(compute_dtype)`); pass
        the same object to `make_train_step`.

    Returns:
      ``(graphdef, state)``.

    Raises:
      ValueError: a parameter is not float32, or a parameter dimension does not divide its
        mesh axis.
    """
    compute_dtype = precision.parse_dtype(compute_dtype)
    loss_scale = precision.make_loss_scale(compute_dtype) if loss_scale is None else loss_scale
    graphdef, params = nnx.split(model)
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        if jnp.issubdtype(leaf.dtype, jnp.floating) and leaf.dtype != jnp.float32:
            raise ValueError(
                f"Parameter {jax.tree_util.keystr(path)} is {leaf.dtype}; the trainer keeps float32 master "
                "weights. Build the model with param_dtype=jnp.float32 and choose compute_dtype instead.")
    # Copies, not the model's buffers: the step donates the state (see the docstring).
    params = jax.tree.map(lambda x: jnp.array(x, copy=True), params)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=None,
                       loss_scale=loss_scale.init(), key=key)
    if mesh is None:
        return graphdef, state.replace(opt_state=jax.jit(optimizer.init)(params))
    abstract = state.replace(opt_state=jax.eval_shape(optimizer.init, params))
    shardings = train_state_shardings(abstract, mesh)
    params = jax.device_put(params, shardings.params)
    opt_state = jax.jit(optimizer.init, out_shardings=shardings.opt_state)(params)
    state = state.replace(params=params, opt_state=opt_state)
    return graphdef, jax.device_put(state, shardings)


# --------------------------------------------------------------------------------------------
# Step
# --------------------------------------------------------------------------------------------


def _n_sequences(mask_BT) -> jax.Array:
    """float32 count of the rows with at least one response token."""
    return jnp.sum(jnp.any(mask_BT, axis=1)).astype(jnp.float32)


def _sq_norm(tree) -> jax.Array:
    """Σ x² over every leaf, in float32."""
    leaves = jax.tree.leaves(tree)
    return sum((jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves), jnp.zeros((), jnp.float32))


def _signal(value):
    """An optimizer signal as a float32/int32 array, so that Python floats, NumPy scalars and
    device scalars (a metric of the previous step) all reach the jitted step with the same
    type (no weak types, no retracing); device values stay on device (no host round trip)."""
    if not isinstance(value, jax.Array):
        value = np.asarray(value)
    if jnp.issubdtype(value.dtype, jnp.floating):
        return jnp.asarray(value, jnp.float32)
    if jnp.issubdtype(value.dtype, jnp.integer):
        return jnp.asarray(value, jnp.int32)
    return jnp.asarray(value)


class TrainStep:
    """``step(state, batch, **opt_signals) -> (state, metrics)``; see `make_train_step`.

    Attributes:
      jitted: the ``jax.jit``-ed function ``(state, batch, opt_signals) -> (state, metrics)``,
        built on the first call (its shardings are read off the first state's layout); its
        ``_cache_size()`` counts the compiled variants.
    """

    def __init__(self, fn, mesh, check_batch):
        self._fn = fn
        self._mesh = mesh
        self._check_batch = check_batch
        self.jitted = None

    def _build(self, state: TrainState):
        if self._mesh is None:
            return jax.jit(self._fn, donate_argnums=0)
        state_sh = train_state_shardings(state, self._mesh)
        replicated = shd.replicated(self._mesh)
        # P(DATA) as a prefix of the whole batch: every array split over data along axis 0.
        batch_sh = NamedSharding(self._mesh, P(shd.DATA))
        return jax.jit(self._fn, in_shardings=(state_sh, batch_sh, replicated),
                       out_shardings=(state_sh, replicated),
                       donate_argnums=0)  # the old state is dead after the step: update in place

    def __call__(self, state: TrainState, batch: TrainBatch, **opt_signals):
        self._check_batch(batch)
        # The key bypasses jit: the step draws no randomness, and a typed key returned from a
        # sharded jit alternates its underlying layout (P() / P(None,)), which costs a second
        # dispatch-cache entry.
        key, state = state.key, state.replace(key=None)
        if self.jitted is None:
            self.jitted = self._build(state)
        signals = {k: _signal(v) for k, v in opt_signals.items()}
        # Inputs as device arrays with a fixed placement: NumPy vs device arrays, or committed
        # vs uncommitted ones, are different cache keys for jit and would retrace the step.
        if self._mesh is None:
            batch = jax.tree.map(jnp.asarray, batch)
        else:
            batch = jax.device_put(batch, NamedSharding(self._mesh, P(shd.DATA)))
            signals = jax.device_put(signals, shd.replicated(self._mesh))
        new_state, metrics = self.jitted(state, batch, signals)
        return new_state.replace(key=key), metrics

    def precompile(self, state: TrainState, batch: TrainBatch, **opt_signals) -> None:
        """Compiles the step for these arguments without running it: a later call with arguments
        of the same shapes and dtypes, and a state laid out like this one, compiles nothing.

        Any argument may be abstract (``jax.ShapeDtypeStruct`` leaves: `TrainBatch.shapes`, a
        signal's ``jax.ShapeDtypeStruct((), jnp.float32)``); concrete ones are only read for
        their shapes and layout, so the state may be the live one, and nothing is donated. The
        batch is not checked. It may run in another thread, e.g. to compile the first update
        beside the sampler's compilation (`rl_mismatch.experiment`), but not during a call of
        this step.
        """
        mesh = self._mesh
        concrete = lambda x: x if isinstance(x, jax.ShapeDtypeStruct) else jnp.asarray(x)
        batch_sharding = None if mesh is None else NamedSharding(mesh, P(shd.DATA))
        signal_sharding = None if mesh is None else shd.replicated(mesh)
        abstract = shd.abstract_argument
        self.lower(jax.tree.map(abstract, state),
                   jax.tree.map(lambda x: abstract(concrete(x), batch_sharding), batch),
                   **{k: abstract(v if isinstance(v, jax.ShapeDtypeStruct) else _signal(v), signal_sharding)
                      for k, v in opt_signals.items()}).compile()

    def lower(self, state: TrainState, batch: TrainBatch, **opt_signals) -> jax.stages.Lowered:
        """The step lowered for these arguments, without running it.

        Any argument may be abstract (``jax.ShapeDtypeStruct`` leaves, e.g. a state built with
        ``jax.eval_shape``), so the step of a model whose weights were never made can be compiled
        and its memory read: ``step.lower(...).compile().memory_analysis()``
        (``experiments/plan.py``). The batch is not checked, and the program is the one a call
        with this state's layout would build and run.
        """
        state = state.replace(key=None)
        if self.jitted is None:
            self.jitted = self._build(state)
        return self.jitted.lower(state, batch, dict(opt_signals))


def _check_batch(batch: TrainBatch, n_micro: int, data_size: int, share_prompts: bool):
    if not isinstance(batch, TrainBatch):
        raise ValueError(f"batch must be a TrainBatch, got {type(batch).__name__}.")
    shape = batch.tokens_BT.shape
    if len(shape) != 2:
        raise ValueError(f"tokens_BT must be [B, T], got shape {shape}.")
    for name in ("valid_BT", "response_mask_BT", "sampler_logp_BT", "sampler_entropy_BT"):
        x = getattr(batch, name)
        if x is not None and x.shape != shape:
            raise ValueError(f"batch.{name} has shape {x.shape}, expected tokens_BT's {shape}.")
    if batch.advantages_B.shape != shape[:1]:
        raise ValueError(f"batch.advantages_B has shape {batch.advantages_B.shape}, expected ({shape[0]},).")
    mismatch.check_score_from(batch.score_from, shape[1])  # before tracing, with the other checks
    mismatch.check_group(batch.group, shape[0])
    mismatch.check_packed_width(batch.packed_width)
    if batch.packed_width and not (share_prompts and batch.score_from > 1
                                   and holds_whole_runs(shape[0], batch.group, n_micro, data_size)):
        raise ValueError(
            f"batch.packed_width={batch.packed_width} packs the responses of each run of group={batch.group} "
            f"rows after their shared prompt, which needs score_from > 1 (got {batch.score_from}), a step "
            f"with share_prompts=True (got {share_prompts}) and {shape[0]} rows in whole runs for "
            f"{n_micro} micro-batch(es) x {data_size} data shard(s); pass packed_width=0.")
    if batch.score_from > 1:
        _check_columns(batch)
    if shape[0] % (n_micro * data_size):
        raise ValueError(
            f"Batch size {shape[0]} must be a multiple of n_microbatches × data-axis size = "
            f"{n_micro} × {data_size}; pad the batch (all-False masks) or change n_microbatches.")


def _check_columns(batch: TrainBatch) -> None:
    """Raises ValueError if the response mask marks a column before ``score_from`` (the trainer
    gives those no log-prob: such a token would enter the loss and metrics with log π = 0), or if
    a run of ``batch.group`` rows differs on the columns the step computes once per run (before
    ``score_from − 1``), or if ``batch.packed_width`` cannot hold a run's responses. One jitted
    reduction and one host read of four scalars."""
    early, n_bad, first, span = (int(x) for x in jax.device_get(_column_flags(
        batch.tokens_BT, batch.valid_BT, batch.response_mask_BT, np.int32(batch.score_from), group=batch.group)))
    if early:
        raise ValueError(
            f"batch.response_mask_BT marks tokens before score_from={batch.score_from}, which the trainer "
            "does not score; lower score_from to the first response column (TrainBatch.from_rollout "
            "uses the rollout's prompt_width).")
    if n_bad:
        G, width = batch.group, batch.score_from - 1
        first *= G
        raise ValueError(
            f"batch.group={G} but rows {first}..{first + G - 1} differ on their first {width} columns "
            f"(the prompt, before score_from − 1 = {width}); {n_bad} run(s) differ in all. Give each "
            "prompt's responses as consecutive rows, or build the batch with group=1.")
    if batch.packed_width and span > batch.packed_width:
        raise ValueError(
            f"batch.packed_width={batch.packed_width} cannot hold a run of {batch.group} responses that needs "
            f"{span} columns (each response from the prompt's last column to its last valid token); "
            "size it with train_step.packed_width from the response lengths, or pass 0.")


@functools.partial(jax.jit, static_argnames="group")
def _column_flags(tokens_BT, valid_BT, mask_BT, score_from, *, group: int):
    """``(any response token before score_from, runs that differ before score_from − 1, the first
    such run, the most columns a run's responses packed end to end take (`packing.run_spans`
    from column score_from − 1))``. ``score_from`` is traced and the columns are masked, not sliced: one compilation
    per batch shape, whatever the prompt width. Scalars only, so on a multi-process mesh every
    process reads them (the [B/G] flags are not all addressable on one)."""
    col_T = jnp.arange(tokens_BT.shape[1])
    early = jnp.any(mask_BT.astype(bool) & (col_T < score_from))
    if group == 1:
        return early, jnp.int32(0), jnp.int32(0), jnp.int32(0)

    def differs(x_BT):  # [B/G]: does any row of the run differ from its first row there?
        runs = x_BT.reshape(-1, group, x_BT.shape[1])
        return jnp.any((runs != runs[:, :1]) & (col_T < score_from - 1), axis=(1, 2))

    bad = differs(tokens_BT) | differs(valid_BT.astype(bool))
    # A row's span: its columns from score_from − 1 up to its last valid one (score_from is
    # traced, so the own columns are masked, and the span counted from column 0 shifted).
    own_BT = valid_BT.astype(bool) & (col_T >= score_from - 1)
    span_B = jnp.maximum(packing.row_spans(own_BT) - (score_from - 1), 0)
    span = jnp.max(jnp.sum(span_B.reshape(-1, group), axis=1))
    return early, jnp.sum(bad, dtype=jnp.int32), jnp.argmax(bad).astype(jnp.int32), span


def _noise_metrics(sq_big, mask_BT, sq_n=None, seqs_n=None) -> dict[str, jax.Array]:
    """The step's ``opt/grad_sq_*``, ``opt/noise_*`` and ``opt/grad_noise_scale`` (see
    `make_train_step`) from |G|² and, with micro-batches, their |G_m|² (``sq_n``) and sequence
    counts (``seqs_n``); without them, placeholders."""
    if sq_n is None:  # No small batch: placeholders (see the metrics in make_train_step).
        sq_small, trace, b_noise = sq_big, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32)
        b_small = b_big = _n_sequences(mask_BT)
    else:
        # Micro-batches without loss tokens have no gradient of their own: left out. Batch
        # sizes count the sequences that have loss tokens; with unequal micro-batches,
        # E mean_m |G_m|² = |G|² + tr(Σ) mean_m 1/b_m, so B_small is their harmonic mean.
        used_n = seqs_n > 0
        n_used = jnp.sum(used_n)
        sq_small = jnp.sum(sq_n) / jnp.maximum(n_used, 1)
        b_big = jnp.sum(seqs_n)
        b_small = jnp.maximum(n_used, 1) / jnp.sum(jnp.where(used_n, 1.0 / jnp.maximum(seqs_n, 1), 0.0))
        # Fewer than two micro-batches with loss tokens: no second batch size, no estimate.
        estimable = n_used >= 2
        _, trace = noise_statistics(sq_small, sq_big, b_small, b_big)
        b_noise = gradient_noise_scale(sq_small, sq_big, b_small, b_big)
        trace, b_noise = (jnp.where(estimable, x, jnp.nan) for x in (trace, b_noise))
    return {"opt/grad_sq_small": sq_small, "opt/grad_sq_big": sq_big, "opt/noise_trace": trace,
            "opt/grad_noise_scale": b_noise, "opt/noise_b_small": b_small, "opt/noise_b_big": b_big}


def _lr_metrics(opt_state) -> dict[str, jax.Array]:
    """``lr/scale`` and each triggered decay's ``lr/<path>/{scale,surge_step}`` (see
    `make_train_step`); empty for an optimizer without one. The detectors are found in the
    state's structure, which is static under jit."""
    detectors = optim.triggered_decay_states(opt_state)
    metrics = {"lr/scale": optim.lr_scale(opt_state)} if detectors else {}
    for path, det in detectors.items():
        name = re.sub(r"\W+", "_", path).strip("_")
        metrics[f"lr/{name}/scale"] = det.multiplier
        metrics[f"lr/{name}/surge_step"] = det.surge_step
    return metrics


def make_train_step(graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation,
                    loss_config: losses.LossConfig, *, compute_dtype: Any, n_microbatches: int = 1,
                    mesh: jax.sharding.Mesh | None = None, loss_scale: precision.LossScale | None = None,
                    temperature: float = 1.0, token_chunk: int = 256,
                    keep_logits: bool = False, share_prompts: bool = True) -> TrainStep:
    """Builds the jitted train step (see the module docstring for what one step computes).

    Args:
      graphdef: from `init_train_state`.
      optimizer: an optax transform; keyword signals given to the step (``response_length=``,
        ``k3=`` …) are passed to its ``update`` (it is wrapped with
        ``optax.with_extra_args_support``, so plain transforms work too).
      loss_config: the `losses.LossConfig` (policy loss, aggregation, correction).
      compute_dtype: float32 / bfloat16 / float16 for the forward and backward.
      n_microbatches: micro-batches per step, accumulated with ``lax.scan``. The batch size
        must be a multiple of ``n_microbatches`` × the mesh's data-axis size.
      mesh: the mesh the state was placed on by `init_train_state`, or None.
      loss_scale: default `precision.make_loss_scale(compute_dtype)` (dynamic for float16);
        must match the one given to `init_train_state`.
      temperature: the sampler's temperature; logits are divided by it (as the sampler does)
        for the loss and the mismatch metrics alike.
      token_chunk: the most positions per LM-head chunk of the rescoring (`mismatch.rescore`,
        which shares the positions equally among the fewest chunks this allows). Larger
        than rescoring's forward-only default of 128 because the backward pass adds each
        chunk's [V, D] LM-head gradient into the total, once per chunk; 256 (about 50 MB of
        float32 SmolLM2 logits live per chunk) measured fastest (benchmarks/README.md).
      keep_logits: `mismatch.rescore`'s option. False (default): the backward pass recomputes
        each chunk's logits, so the step never holds more than one chunk's; True keeps all
        [B, T − score_from, V] float32 logits for the backward pass (what a trainer that
        materialises the logits holds): faster on CPU, for that memory.
      share_prompts: for a batch with ``group`` > 1 (`TrainBatch`), run each run's prompt
        through the forward and backward once (``Decoder.grouped_hidden_states``): a GRPO
        batch's layers then see ``B/group · prompt + B · response`` tokens instead of
        ``B · (prompt + response)``. The same numbers up to float32 summation order. False
        computes every row in full (to compare).

    Returns:
      A `TrainStep` ``step(state, batch, **opt_signals) -> (state, metrics)``. The input
      state is donated (its buffers are reused for the output; do not touch it afterwards).
      Metrics (float32 scalars unless stated), computed on the whole batch:

      * ``loss/*``, ``is/*``: `losses.compute_policy_loss` (loss at the pre-update params).
      * ``mismatch/*``: `mismatch.compute_mismatch_metrics` of the sampler's log-probs against
        the trainer's (this step's forward, detached).
      * ``opt/grad_norm`` (unscaled float32 gradient), ``opt/update_norm`` (the update
        applied: 0 on a skipped step), ``opt/param_norm`` (after the step).
      * ``opt/grad_sq_small`` = mean over micro-batches of |G_m|², ``opt/grad_sq_big`` =
        |G|², ``opt/noise_trace`` = tr(Σ) estimate, ``opt/grad_noise_scale`` = B_noise from
        this step alone (see `gradient_noise_scale`: noisy; average the first two over steps),
        ``opt/noise_b_small`` and ``opt/noise_b_big``: the batch sizes it used (sequences with
        response tokens; B_small is the harmonic mean over the micro-batches that have any).
        With ``n_microbatches == 1`` there is no small batch: ``grad_sq_small`` equals
        ``grad_sq_big`` and ``noise_trace`` and ``grad_noise_scale`` are 0 (placeholders);
        with fewer than two micro-batches holding response tokens they are NaN.
      * ``opt/loss_scale``, ``opt/skipped_steps`` (after this step's adjustment),
        ``opt/step_skipped`` (1.0 if this step's update was skipped).
      * ``lr/scale``: the LR multiplier of the `rl_mismatch.optim` triggered decays in the
        optimizer (after this update; their product), present only if it contains one; and
        for each decay ``lr/<path>/scale``, its own multiplier, and ``lr/<path>/surge_step``,
        the step at which its surge fired, -1 before (a decay whose multiplier is pinned at 1
        still reports it). ``<path>`` is its place in the optimizer state, e.g. its
        ``optax.named_chain`` name (``length_trigger``, ``k3_trigger`` in the experiments).

    Raises:
      ValueError: bad arguments (here), or (at call time) a batch whose shapes disagree or
        whose size is not divisible as required.
    """
    compute_dtype = precision.parse_dtype(compute_dtype)
    if not isinstance(loss_config, losses.LossConfig):
        raise ValueError(f"loss_config must be a losses.LossConfig, got {type(loss_config).__name__}.")
    mismatch.check_chunk_options(token_chunk, keep_logits)
    if isinstance(n_microbatches, bool) or not isinstance(n_microbatches, int) or n_microbatches < 1:
        raise ValueError(f"n_microbatches must be a positive int, got {n_microbatches!r}.")
    if not (isinstance(temperature, (int, float)) and temperature > 0):
        raise ValueError(f"temperature must be a positive number, got {temperature!r}.")
    if not isinstance(share_prompts, bool):
        raise ValueError(f"share_prompts must be a bool, got {share_prompts!r}.")
    loss_scale = precision.make_loss_scale(compute_dtype) if loss_scale is None else loss_scale
    if not isinstance(loss_scale, (precision.DynamicLossScale, precision.NoOpLossScale)):
        raise ValueError(f"loss_scale must be a precision.DynamicLossScale or NoOpLossScale, got {loss_scale!r}.")
    spec = _StepSpec(graphdef, optax.with_extra_args_support(optimizer), loss_config, compute_dtype,
                     n_microbatches, mesh, loss_scale, temperature, token_chunk, keep_logits, share_prompts)
    data_size = 1 if mesh is None else mesh.shape[shd.DATA]
    return TrainStep(functools.partial(_train_step, spec), mesh,
                     lambda batch: _check_batch(batch, n_microbatches, data_size, share_prompts))


def holds_whole_runs(rows: int, group: int, n_microbatches: int, data: int = 1) -> bool:
    """Whether a batch of ``rows`` in runs of ``group`` splits into ``n_microbatches`` micro-batches
    of whole runs spread evenly over ``data`` shards: the condition for computing each run's prompt
    once (the module docstring's "GRPO groups"). False for ``group`` 1."""
    return group > 1 and rows % (n_microbatches * group * data) == 0


# Pack only where it leaves at most this fraction of a run's unpacked columns: a packed run's
# masked attention spans all its columns, so a width near the unpacked one saves less than its
# columns and costs a compilation (measured in benchmarks/README.md, "Packed replies").
_PACK_AT_MOST = 2 / 3


def packed_width(response_lengths_B, group: int, response_width: int, *, multiple: int) -> int:
    """The `TrainBatch.packed_width` of a rollout whose rows are runs of ``group`` responses of
    ``response_lengths_B`` tokens (host integers) in ``response_width`` columns: the most columns
    a run's responses take end to end (each its length + 1, from the prompt's last column, whose
    query predicts its first token), rounded up to a multiple of ``multiple`` so that the step
    compiles once per multiple reached. 0 (every row keeps its columns) where that is more than
    ``_PACK_AT_MOST`` (2/3) of the ``group · (response_width + 1)`` columns a run has unpacked, or
    where ``multiple`` is 0.

    >>> packed_width([3, 40, 5, 7, 2, 2, 2, 2], 4, 48, multiple=32)  # runs take 59 and 12 columns
    64
    >>> packed_width([30, 30, 20, 25], 4, 48, multiple=32)  # 109 -> 128, of 4 x 49 = 196 unpacked
    128
    >>> packed_width([40, 30, 35, 38], 4, 48, multiple=32)  # 147 -> 160: more than 2/3 of 196
    0
    """
    if isinstance(multiple, bool) or not isinstance(multiple, int) or multiple < 0:
        raise ValueError(f"multiple={multiple!r} must be a non-negative int (0: never pack).")
    lengths = np.asarray(response_lengths_B, np.int64)
    if lengths.ndim != 1 or len(lengths) % group or np.any(lengths < 0) or np.any(lengths > response_width):
        raise ValueError(f"response_lengths_B must be {group}-row runs of lengths in [0, {response_width}], "
                         f"got {lengths.tolist()}.")
    if not multiple:
        return 0
    width = round_up(int(np.max(np.sum(lengths.reshape(-1, group) + 1, axis=1))), multiple=multiple)
    return width if width <= _PACK_AT_MOST * group * (response_width + 1) else 0


@dataclasses.dataclass(frozen=True)
class _StepSpec:
    """What `make_train_step` fixes for every call of the step: static under jit."""

    graphdef: nnx.GraphDef
    optimizer: optax.GradientTransformationExtraArgs
    loss_config: losses.LossConfig
    compute_dtype: Any
    n_micro: int
    mesh: jax.sharding.Mesh | None
    loss_scale: precision.LossScale
    temperature: float
    token_chunk: int
    keep_logits: bool
    share_prompts: bool

    def run_length(self, batch: TrainBatch) -> int:
        """The rows each micro-batch takes together: ``batch.group`` where every micro-batch
        can hold whole runs spread evenly over the data axis, else 1 (the module docstring's "GRPO groups")."""
        data = 1 if self.mesh is None else self.mesh.shape[shd.DATA]
        return batch.group if holds_whole_runs(batch.tokens_BT.shape[0], batch.group, self.n_micro, data) else 1

    def shared_group(self, batch: TrainBatch) -> int:
        """The ``group`` the rescoring computes each prompt once for (1: every row in full)."""
        share = self.share_prompts and batch.score_from > 1
        return self.run_length(batch) if share else 1

    @property
    def defer_is_mean(self) -> bool:
        """Whether the gradient is divided by the batch's mean IS weight after accumulation.

        Batch-normalised IS weights divide by a mean over the whole batch, which needs every
        micro-batch's trainer log-probs. The loss is linear in the weights, so micro-batches
        use the unnormalised weights (divisor 1) and the summed gradient is divided by the
        batch's mean afterwards (`losses.is_batch_mean`). One micro-batch computes it in the
        loss itself.
        """
        is_weight = self.loss_config.resolved_correction.weight
        return self.n_micro > 1 and is_weight is not None and is_weight.batch_normalize

    def constrain(self, x: jax.Array, spec: P) -> jax.Array:
        return x if self.mesh is None else jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, spec))


def _train_step(s: _StepSpec, state: TrainState, batch: TrainBatch,
                opt_signals: Mapping[str, jax.Array]) -> tuple[TrainState, dict[str, jax.Array]]:
    """One RL update (see the module docstring); `make_train_step` jits it with ``s`` bound."""
    mask_BT = batch.response_mask_BT.astype(bool)
    batch = batch.replace(response_mask_BT=mask_BT, valid_BT=batch.valid_BT.astype(bool))
    # The whole batch's normaliser, given to every micro-batch: their losses then sum to the
    # whole-batch loss and their gradients to its gradient.
    normalizer = losses.loss_normalizer(mask_BT, s.loss_config)
    ls_state = state.loss_scale
    grads, logp_BT, per_micro = _accumulate_grads(s, state.params, ls_state, batch, normalizer)

    sq_scaled = _sq_norm(grads)
    sq_big = sq_scaled * (1.0 / jnp.square(ls_state.scale))
    # Σ g² is finite iff every element is (an overflow of the sum itself would need |g| ≳ 1e19,
    # beyond any usable gradient): one reduction serves the norm and the skip decision.
    finite = jnp.isfinite(sq_scaled)
    params, opt_state, update_sq = _apply_or_skip(s, state, grads, finite, opt_signals)
    new_ls = s.loss_scale.adjust(ls_state, finite)

    _, metrics = losses.compute_policy_loss(logp_BT, logp_BT, batch.sampler_logp_BT, batch.advantages_B,
                                            mask_BT, s.loss_config, normalizer=normalizer)
    metrics.update(mismatch.compute_mismatch_metrics(batch.sampler_logp_BT, logp_BT, mask_BT,
                                                     sampler_entropy_BT=batch.sampler_entropy_BT))
    metrics.update({
        "opt/grad_norm": jnp.sqrt(sq_big),
        "opt/update_norm": jnp.sqrt(update_sq),
        "opt/param_norm": jnp.sqrt(_sq_norm(params)),
        **_noise_metrics(sq_big, mask_BT, *per_micro),
        "opt/step_skipped": (~finite).astype(jnp.float32),
        **precision.loss_scale_metrics(new_ls),
        **_lr_metrics(opt_state),
    })
    new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state,
                           loss_scale=new_ls, key=state.key)
    return new_state, metrics


def _micro_grads(s: _StepSpec, params, ls_state, mb: TrainBatch, normalizer, group: int):
    """Scaled float32 gradient of the micro-batch's share of the whole-batch loss, and its log-probs.
    ``group``: the runs whose prompt the forward computes once (`_StepSpec.shared_group` of the
    whole batch)."""

    def loss_fn(p):
        model = nnx.merge(s.graphdef, p)
        model.dtype = s.compute_dtype  # the graph may carry the dtype the model was built with
        if s.mesh is not None:  # the micro-batch's rows stay split over data through every layer
            model.activation_sharding = NamedSharding(s.mesh, P(shd.DATA, None, None))
        logp_BT = mismatch.rescore(model, mb.tokens_BT, mb.valid_BT, response_mask_BT=mb.response_mask_BT,
                                   temperature=s.temperature, score_from=mb.score_from,
                                   token_chunk=s.token_chunk, keep_logits=s.keep_logits,
                                   group=group, packed_width=mb.packed_width if group > 1 else 0)
        # One update per rollout: π_old is π_θ itself, detached (its value, not its gradient).
        old_BT = jax.lax.stop_gradient(logp_BT)
        loss, _ = losses.compute_policy_loss(logp_BT, old_BT, mb.sampler_logp_BT, mb.advantages_B,
                                             mb.response_mask_BT, s.loss_config, normalizer=normalizer,
                                             is_batch_mean=1.0 if s.defer_is_mean else None)
        return s.loss_scale.scale_loss(ls_state, loss), old_BT

    # Differentiated with respect to the float32 parameters: the model's casts to the compute
    # dtype are part of the function, so the gradient is float32.
    return jax.grad(loss_fn, has_aux=True)(params)


def _accumulate_grads(s: _StepSpec, params, ls_state, batch: TrainBatch, normalizer):
    """The scaled whole-batch gradient, the trainer's log-probs [B, T], and the per-micro-batch
    noise inputs ``(|G_m|², sequences_m)`` for `_noise_metrics` (``()`` with one micro-batch)."""
    group = s.shared_group(batch)
    if s.n_micro == 1:
        grads, logp_BT = _micro_grads(s, params, ls_state, batch, normalizer, group)
        return grads, logp_BT, ()
    B, T = batch.tokens_BT.shape
    n, run = s.n_micro, s.run_length(batch)
    inv_scale_sq = 1.0 / jnp.square(ls_state.scale)

    def split(x):  # [B, ...] -> [n, B/n, ...]; micro-batch m = runs m, m + n, … of `run` rows
        x = x.reshape(B // (n * run), n, run, *x.shape[1:]).swapaxes(0, 1).reshape(n, B // n, *x.shape[1:])
        return s.constrain(x, P(None, shd.DATA))

    def merge(x):  # split's inverse
        x = x.reshape(n, B // (n * run), run, *x.shape[2:]).swapaxes(0, 1).reshape(B, *x.shape[2:])
        return s.constrain(x, P(shd.DATA))

    def body(acc, mb):
        g, logp = _micro_grads(s, params, ls_state, mb, normalizer, group)
        # This micro-batch's share N_m/N of the normaliser: its gradient divided by the share is
        # the gradient of its own loss (G_small of the noise-scale estimator).
        share = losses.loss_normalizer(mb.response_mask_BT, s.loss_config) / jnp.maximum(normalizer, 1.0)
        sq = _sq_norm(g) * inv_scale_sq
        sq_small_m = jnp.where(share > 0, sq / jnp.where(share > 0, share, 1.0) ** 2, 0.0)
        return jax.tree.map(jnp.add, acc, g), (logp, sq_small_m, _n_sequences(mb.response_mask_BT))

    acc0 = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), params)
    grads, (logp_nbT, sq_n, seqs_n) = jax.lax.scan(body, acc0, jax.tree.map(split, batch))
    logp_BT = merge(logp_nbT)
    if s.defer_is_mean:
        is_mean = losses.is_batch_mean(logp_BT, batch.sampler_logp_BT, batch.response_mask_BT, s.loss_config)
        inv = 1.0 / jnp.where(is_mean > 0, is_mean, 1.0)  # as the loss itself guards a zero mean
        grads = jax.tree.map(lambda g: g * inv, grads)
        sq_n = sq_n * jnp.square(inv)
    return grads, logp_BT, (sq_n, seqs_n)


def _apply_or_skip(s: _StepSpec, state: TrainState, grads, finite: jax.Array, opt_signals):
    """``(params, opt_state, |update|²)``: the optimizer's update if ``finite``, else the old
    parameters and optimizer state themselves and 0.

    ``lax.cond`` rather than computing the update and `precision.select_tree`-ing it away: the
    select would read old and new parameters and optimizer state in full on every step, for a
    branch that is rarely taken. The skip branch returns the old state itself, so a skipped
    step leaves parameters and optimizer state bit for bit unchanged.
    """

    def apply(operands):
        grads, opt_state, params = operands
        grads = s.loss_scale.unscale_grads(state.loss_scale, grads)  # fuses into the optimizer's first pass
        updates, opt_state = s.optimizer.update(grads, opt_state, params, **opt_signals)
        return optax.apply_updates(params, updates), opt_state, _sq_norm(updates)

    def skip(operands):
        _, opt_state, params = operands
        return params, opt_state, jnp.zeros((), jnp.float32)

    return jax.lax.cond(finite, apply, skip, (grads, state.opt_state, state.params))
