"""Trainer precision: dtype names and dynamic loss scaling for float16 compute.

The trainer keeps float32 master weights and runs its forward/backward in a compute dtype
(float32, bfloat16 or float16). float16 has 5 exponent bits: gradients of small magnitude
underflow to zero in the backward pass unless the loss is multiplied by a large factor
first ("loss scaling"), and a factor that is too large overflows to inf. Dynamic loss
scaling searches for the largest safe factor: halve it and skip the step on a non-finite
gradient, double it after ``growth_interval`` clean steps in a row.

Why our own ~150 lines rather than ``jmp``: jmp 0.0.4 (the last release, January 2023) does
import and run under jax 0.10.2, but (1) its ``DynamicLossScale.tree_unflatten`` drops
``min_loss_scale``, so a custom minimum silently reverts to 1 after the state passes through
``jax.jit`` (checked); (2) it has no upper bound on the scale; (3) it is unmaintained and
not a dependency of this project, and the part we need is small. The state here is a plain
``NamedTuple`` of arrays (checkpointable, shardable like any pytree); the hyper-parameters
live on a frozen, hashable dataclass that a jitted step closes over.

Typical use inside a train step (``ls`` is a `DynamicLossScale` or `NoOpLossScale`)::

    grads = jax.grad(lambda p: ls.scale_loss(state.loss_scale, loss_fn(p)))(params)
    grads = ls.unscale_grads(state.loss_scale, grads)
    finite = all_finite(grads)
    new_params, new_opt_state = ...  # optimizer update, computed unconditionally
    params, opt_state = select_tree(finite, (new_params, new_opt_state), (params, opt_state))
    loss_scale_state = ls.adjust(state.loss_scale, finite)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

_DTYPES = {
    "float32": jnp.float32,
    "fp32": jnp.float32,
    "f32": jnp.float32,
    "bfloat16": jnp.bfloat16,
    "bf16": jnp.bfloat16,
    "float16": jnp.float16,
    "fp16": jnp.float16,
    "f16": jnp.float16,
}


def parse_dtype(name: Any) -> jnp.dtype:
    """Returns the JAX floating dtype for a name such as ``'bf16'`` or ``'float32'``.

    Args:
      name: one of ``float32/fp32/f32``, ``bfloat16/bf16``, ``float16/fp16/f16``
        (case-insensitive), or a dtype-like object of one of those three types.

    Raises:
      ValueError: for any other name or dtype.

    >>> parse_dtype('bf16')
    dtype(bfloat16)
    >>> parse_dtype(jnp.float32)
    dtype('float32')
    """
    if isinstance(name, str):
        key = name.strip().lower()
        if key not in _DTYPES:
            raise ValueError(f"Unknown dtype name {name!r}; valid names are {sorted(_DTYPES)}.")
        return jnp.dtype(_DTYPES[key])
    try:
        dtype = jnp.dtype(name)
    except TypeError as e:
        raise ValueError(f"Cannot interpret {name!r} as a dtype; pass one of {sorted(_DTYPES)}.") from e
    if dtype not in {jnp.dtype(d) for d in _DTYPES.values()}:
        raise ValueError(f"Unsupported dtype {dtype}; the trainer computes in float32, bfloat16 or float16.")
    return dtype


class LossScaleState(NamedTuple):
    """Dynamic part of loss scaling; a pytree that lives in the train state.

    Attributes:
      scale: float32 scalar, the current loss scale S.
      good_steps: int32 scalar, finite steps in a row since the last change of S.
      skipped_steps: int32 scalar, total steps whose gradients were non-finite (and that
        the train step therefore skipped); logged as ``opt/skipped_steps``.
    """

    scale: jax.Array
    good_steps: jax.Array
    skipped_steps: jax.Array


def all_finite(tree: Any) -> jax.Array:
    """Returns a bool scalar: every element of every leaf of ``tree`` is finite.

    >>> bool(all_finite({'a': jnp.ones(2), 'b': jnp.array([1.0, jnp.inf])}))
    False
    """
    leaves = jax.tree_util.tree_leaves(tree)
    finite = jnp.array(True)
    for leaf in leaves:
        finite = jnp.logical_and(finite, jnp.all(jnp.isfinite(leaf)))
    return finite


def select_tree(pred: jax.Array, on_true: Any, on_false: Any) -> Any:
    """Leaf-wise ``jnp.where(pred, on_true, on_false)`` for a bool scalar ``pred``.

    Used to skip a step: ``select_tree(finite, new_state, old_state)``. ``where`` copies the
    chosen operand bit for bit (NaN payloads and signed zeros included), so a skipped step
    leaves parameters and optimizer state bitwise unchanged; both trees must have the same
    structure, shapes and dtypes.

    >>> select_tree(jnp.array(False), {'w': jnp.ones(2)}, {'w': jnp.zeros(2)})['w']
    Array([0., 0.], dtype=float32)
    """
    pred = jnp.asarray(pred)
    if pred.shape != () or pred.dtype != jnp.bool_:
        raise ValueError(f"select_tree needs a bool scalar predicate, got {pred.dtype}{list(pred.shape)}.")
    return jax.tree_util.tree_map(lambda a, b: jnp.where(pred, a, b), on_true, on_false)


def _unscale(grads: Any, scale: jax.Array) -> Any:
    # Divide in float32 and cast back: 1/S for S up to 2**24 is a float16 subnormal, and
    # multiplying float16 gradients by it would lose precision.
    return jax.tree_util.tree_map(lambda g: (g.astype(jnp.float32) / scale).astype(g.dtype), grads)


@dataclasses.dataclass(frozen=True)
class DynamicLossScale:
    """Dynamic loss scaling: hyper-parameters (static) and pure state transitions.

    Rule, with S the scale and n the count of finite steps in a row::

        finite step:      n <- n + 1;  if n == growth_interval: S <- min(S * factor, max_scale), n <- 0
        non-finite step:  S <- max(S / factor, min_scale);  n <- 0;  skipped <- skipped + 1

    Attributes:
      initial_scale: S at step 0 (2**15, as jmp; torch's GradScaler uses 2**16).
      growth_interval: finite steps in a row before S grows (2000, as torch and jmp).
      factor: growth and back-off factor (> 1). A power of two keeps S a power of two, so
        scaling and unscaling are exact.
      min_scale: lower bound on S. 1 means "never amplify gradients less than unscaled".
      max_scale: upper bound on S, so that S itself stays far from float32 overflow.

    >>> ls = DynamicLossScale(initial_scale=4.0, growth_interval=2)
    >>> s = ls.init()
    >>> s = ls.adjust(s, jnp.array(False))
    >>> float(s.scale), int(s.skipped_steps)
    (2.0, 1)
    >>> s = ls.adjust(ls.adjust(s, jnp.array(True)), jnp.array(True))
    >>> float(s.scale), int(s.good_steps)
    (4.0, 0)
    """

    initial_scale: float = 2.0**15
    growth_interval: int = 2000
    factor: float = 2.0
    min_scale: float = 1.0
    max_scale: float = 2.0**24

    def __post_init__(self):
        if not isinstance(self.growth_interval, int) or self.growth_interval < 1:
            raise ValueError(f"growth_interval must be a positive int, got {self.growth_interval!r}.")
        if not (math.isfinite(self.factor) and self.factor > 1):
            raise ValueError(f"factor must be a finite number > 1, got {self.factor!r}.")
        if not (0 < self.min_scale <= self.initial_scale <= self.max_scale < np.finfo(np.float32).max):
            raise ValueError(
                "Need 0 < min_scale <= initial_scale <= max_scale < float32 max, got "
                f"min_scale={self.min_scale}, initial_scale={self.initial_scale}, max_scale={self.max_scale}.")

    def init(self) -> LossScaleState:
        """Returns the state at step 0."""
        return LossScaleState(
            scale=jnp.asarray(self.initial_scale, jnp.float32),
            good_steps=jnp.zeros((), jnp.int32),
            skipped_steps=jnp.zeros((), jnp.int32))

    def scale_loss(self, state: LossScaleState, loss: jax.Array) -> jax.Array:
        """Returns ``loss * S``; differentiate this instead of the loss."""
        return loss * state.scale.astype(loss.dtype)

    def unscale_grads(self, state: LossScaleState, grads: Any) -> Any:
        """Returns ``grads / S`` leaf-wise, in each leaf's own dtype."""
        return _unscale(grads, state.scale)

    def adjust(self, state: LossScaleState, grads_finite: jax.Array) -> LossScaleState:
        """Returns the next state given whether this step's (unscaled) gradients were finite."""
        grads_finite = jnp.asarray(grads_finite, jnp.bool_)
        good = state.good_steps + 1
        grow = good >= self.growth_interval
        grown = jnp.where(grow, jnp.minimum(state.scale * self.factor, self.max_scale), state.scale)
        shrunk = jnp.maximum(state.scale / self.factor, self.min_scale)
        return LossScaleState(
            scale=jnp.where(grads_finite, grown, shrunk).astype(jnp.float32),
            good_steps=jnp.where(grads_finite & ~grow, good, 0).astype(jnp.int32),
            skipped_steps=(state.skipped_steps + (~grads_finite).astype(jnp.int32)).astype(jnp.int32))


@dataclasses.dataclass(frozen=True)
class NoOpLossScale:
    """The same interface with S fixed at 1, for float32 and bfloat16 compute.

    bfloat16 has float32's exponent range, so its gradients neither underflow nor overflow
    where float32's would not; scaling would only cost multiplies. ``adjust`` still counts
    non-finite steps so ``opt/skipped_steps`` means the same in every precision.
    """

    def init(self) -> LossScaleState:
        return LossScaleState(
            scale=jnp.ones((), jnp.float32),
            good_steps=jnp.zeros((), jnp.int32),
            skipped_steps=jnp.zeros((), jnp.int32))

    def scale_loss(self, state: LossScaleState, loss: jax.Array) -> jax.Array:
        del state
        return loss

    def unscale_grads(self, state: LossScaleState, grads: Any) -> Any:
        del state
        return grads

    def adjust(self, state: LossScaleState, grads_finite: jax.Array) -> LossScaleState:
        bad = (~jnp.asarray(grads_finite, jnp.bool_)).astype(jnp.int32)
        return state._replace(skipped_steps=(state.skipped_steps + bad).astype(jnp.int32))


LossScale = DynamicLossScale | NoOpLossScale


def make_loss_scale(compute_dtype: Any, **dynamic_kwargs) -> LossScale:
    """Returns `DynamicLossScale(**dynamic_kwargs)` for float16 compute, else `NoOpLossScale()`.

    >>> make_loss_scale('bf16')
    NoOpLossScale()
    >>> make_loss_scale('fp16', growth_interval=100).growth_interval
    100
    """
    if parse_dtype(compute_dtype) == jnp.float16:
        return DynamicLossScale(**dynamic_kwargs)
    if dynamic_kwargs:
        raise ValueError(
            f"Loss-scale settings {sorted(dynamic_kwargs)} only apply to float16 compute, "
            f"not {parse_dtype(compute_dtype)}; drop them or compute in float16.")
    return NoOpLossScale()


def loss_scale_metrics(state: LossScaleState) -> dict[str, jax.Array]:
    """Returns ``{'opt/loss_scale': S, 'opt/skipped_steps': skipped}`` for logging."""
    return {"opt/loss_scale": state.scale, "opt/skipped_steps": state.skipped_steps}
