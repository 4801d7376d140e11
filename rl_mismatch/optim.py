"""Learning-rate multipliers that fire on a surge of a training signal (optax).

A surge in the mean response length is an early warning of the training-inference
mismatch blow-up in RL fine-tuning (arXiv 2602.01826); decaying the learning rate
when it fires keeps the mismatch bounded. This module provides that rule as
optax transforms that scale the updates, and the same detector for any scalar
signal (the mismatch k3 KL, the gradient noise scale):

* :func:`length_triggered_decay` -- the paper's remedy, fed ``response_length=``.
* :func:`signal_triggered_decay` -- the same rule on any signal keyword.
* :func:`signal_triggered_multiplicative_decay` -- multiply by a factor on each
  trigger, with a cooldown, at most N decays and a floor.
* :func:`lr_scale` / :func:`lr_scales` -- read the multiplier out of any
  (nested) optax state, for logging as ``lr/scale``.
* :func:`replay` -- what a rule would have done on a logged trace (a past run's
  lengths), step by step: for choosing its constants before a run, and for plots.

The module imports nothing but jax, optax, numpy and the standard library, so other
projects can use it without the rest of ``rl_mismatch``.

Detection (shared by all forms), at update step ``t = 0, 1, ...`` with observed
signal ``x_t``. Time is split into epochs; the first starts at ``o = 0`` and waits
``warmup`` steps, each later one (only if re-armed) starts at ``o = s + 1`` after a
trigger at step ``s`` and waits ``cooldown`` steps. Within an epoch, observations at
``t >= o + wait`` are *used*:

.. code-block:: text

  m_t   = β · m_{t-1} + (1 - β) · x_t       (m = x on the epoch's first used obs.)
  b     = mean of the epoch's first W used observations      (relative=True)
  fire  ⇔ t is after the baseline is complete and m_t > threshold · b
          (relative=False: m_t > threshold, no baseline)

With ``smoothing=0`` (the default of :func:`length_triggered_decay`) ``m_t = x_t``:
the raw signal is compared with the threshold. The generic signal forms default to
``smoothing=0.9``, a choice of this project.

An observation that is NaN, ±inf or negative is ignored: it does not enter the
baseline or the smoothed value and cannot fire a trigger; only the step counter
(and the time-dependent multiplier) advance.

What ``warmup`` means. Here ``warmup`` is the detector's: the observations of the
first ``warmup`` steps are ignored (no baseline, no trigger) and the multiplier stays
1 over them; the staircase then counts its periods from step ``warmup``. In the
public re-implementation these defaults come from, ``warmup`` is a linear LR ramp;
``linear_warmup=True`` adds that meaning on top: the multiplier of steps
``t = 0 … warmup − 1`` is ``(t + 1) / warmup``, so the LR ramps linearly to full
over them, and from ``t = warmup`` on nothing changes (the observations of the
warmup steps are still ignored).

Constants. The paper (arXiv 2602.01826) gives no values for the rule's constants:
the defaults ``warmup = 10``, ``W = 50``, ``threshold = 3``, ``k = 1.8`` and
``floor = 0.1`` are those of a public re-implementation, as is comparing the raw
length (no smoothing).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

__all__ = [
    "TriggeredDecayState",
    "length_triggered_decay",
    "lr_scale",
    "lr_scales",
    "replay",
    "signal_triggered_decay",
    "signal_triggered_multiplicative_decay",
]


class TriggeredDecayState(NamedTuple):
    """State of the triggered decays: replicated scalars only.

    Attributes:
      step: int32, number of updates so far (the ``t`` of the next update).
      epoch_start: int32, first step of the current detection epoch (0, then ``s+1``
        after a trigger at ``s``).
      num_observed: int32, valid observations used in this epoch; the baseline is
        complete once it reaches the baseline window ``W``.
      baseline_sum: float32, sum of the epoch's first ``W`` used observations.
      smoothed: float32, exponential moving average of the used observations.
      surge_step: int32, step of the latest trigger, ``-1`` before any.
      num_triggers: int32, number of triggers so far.
      level: float32, multiplier in force when the current staircase started
        (multiplicative form: the current multiplier).
      anchor: int32, step the current staircase counts from (0 until a trigger;
        constant 0 in the multiplicative form).
      period: int32, staircase period (0 until a trigger; constant 0 in the
        multiplicative form).
      multiplier: float32, multiplier applied by the latest update (the value to log
        as ``lr/scale``); 1 before any trigger (``(t + 1) / warmup`` at step
        ``t < warmup`` with ``linear_warmup=True``).
    """

    step: jax.Array
    epoch_start: jax.Array
    num_observed: jax.Array
    baseline_sum: jax.Array
    smoothed: jax.Array
    surge_step: jax.Array
    num_triggers: jax.Array
    level: jax.Array
    anchor: jax.Array
    period: jax.Array
    multiplier: jax.Array


_INT_FIELDS = (
    "step",
    "epoch_start",
    "num_observed",
    "surge_step",
    "num_triggers",
    "anchor",
    "period",
)


def _check(
    name: str, value: Any, ok: Callable[[float], bool], requirement: str, *, integer: bool = False
) -> None:
    """Raises ValueError unless `value` is a concrete scalar satisfying `ok`.

    Hyperparameters injected with ``optax.inject_hyperparams`` reach the factory as
    arrays, and as tracers when the update is jitted; a tracer has no value to check,
    so it is skipped here (it was checked when the state was initialised).
    """
    try:
        arr = np.asarray(value)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return
    if (
        arr.ndim != 0
        or arr.dtype == np.bool_
        or not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating))
    ):
        raise ValueError(f"{name} must be a number ({requirement}), got {value!r}.")
    if integer and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(
            f"{name} must be an int ({requirement}), got {value!r}; "
            f"pass e.g. {name}={int(arr) if math.isfinite(arr) else 10}."
        )
    v = float(arr)
    if not (math.isfinite(v) and ok(v)):
        raise ValueError(f"{name} must be {requirement}, got {value!r}.")


def _check_detector(
    warmup,
    baseline_window,
    threshold,
    smoothing,
    cooldown,
    max_triggers,
    relative,
    floor,
    linear_warmup=False,
) -> None:
    _check("warmup", warmup, lambda v: v >= 0, ">= 0", integer=True)
    _check("baseline_window", baseline_window, lambda v: v >= 1, ">= 1", integer=True)
    _check(
        "threshold",
        threshold,
        lambda v: v > 0,
        "> 0 (a ratio to the baseline when relative=True, e.g. 3.0)",
    )
    _check(
        "smoothing",
        smoothing,
        lambda v: 0 <= v < 1,
        "an EMA coefficient in [0, 1) (0 = no smoothing)",
    )
    _check("cooldown", cooldown, lambda v: v >= 0, ">= 0", integer=True)
    if max_triggers is not None:
        _check(
            "max_triggers",
            max_triggers,
            lambda v: v >= 1,
            ">= 1, or None for no limit",
            integer=True,
        )
    _check("floor", floor, lambda v: 0 <= v <= 1, "in [0, 1]")
    if not isinstance(relative, bool):
        raise ValueError(f"relative must be a bool, got {relative!r}.")
    if not isinstance(linear_warmup, bool):
        raise ValueError(
            f"linear_warmup must be a bool (True: the multiplier ramps linearly, "
            f"(t + 1) / warmup, over the first warmup steps), got {linear_warmup!r}."
        )


def _check_signal_name(signal_name: Any) -> None:
    # The name becomes a keyword argument of update(); it must not shadow the
    # positional ones.
    if (
        not isinstance(signal_name, str)
        or not signal_name.isidentifier()
        or signal_name in ("updates", "state", "params")
    ):
        raise ValueError(
            f"signal_name must be a Python identifier other than "
            f"updates/state/params, e.g. 'k3', got {signal_name!r}."
        )


def _staircase(t, level, anchor, period, active, decay_base, floor):
    """max(floor, level · base^⌊(t − anchor)/period⌋) once `active`, else 1."""
    exponent = jnp.floor_divide(t - anchor, jnp.maximum(period, 1))
    # lax.pow with an integer exponent multiplies by squaring: exact for base 0.5
    # (a power of two), unlike exp(n·log(base)).
    decayed = jnp.asarray(level, jnp.float32) * jax.lax.pow(
        jnp.asarray(decay_base, jnp.float32), jnp.maximum(exponent, 0)
    )
    return jnp.where(
        active, jnp.maximum(jnp.asarray(floor, jnp.float32), decayed), jnp.float32(1.0)
    )


def _triggered(
    *,
    signal_name: str,
    floor,
    linear_warmup,
    respond: Callable[..., tuple[jax.Array, ...]],
    owner: str,
    **rule,
) -> optax.GradientTransformationExtraArgs:
    """Shared detector; `respond` maps (state, t, fire, wait) to the new schedule.

    ``rule`` holds `_detect`'s settings (warmup, baseline_window, threshold, smoothing,
    cooldown, max_triggers, relative). With `linear_warmup`, the multiplier of steps
    ``t < warmup`` is also scaled by ``(t + 1) / warmup`` (no trigger can fire there, so
    `respond` gives 1 for them).
    """
    del floor  # Used by `respond`; validated with the rest by the public factories.

    def update_fn(updates, state, params=None, **extra_args):
        del params
        x = _read_signal(extra_args, signal_name, owner)
        t = state.step
        use, fire, wait, baseline_sum, smoothed = _detect(state, x, **rule)
        level, anchor, period, multiplier = respond(state, t, fire, wait)
        if linear_warmup:
            multiplier = _ramp(multiplier, t, rule["warmup"])
        new_state = _next_state(
            state, t, use, fire, baseline_sum, smoothed, level, anchor, period, multiplier
        )
        # The multiplier is cast to each update's dtype, so bf16 updates stay bf16.
        updates = jax.tree.map(lambda u: jnp.asarray(multiplier, u.dtype) * u, updates)
        return updates, new_state

    return optax.GradientTransformationExtraArgs(_init_detector, update_fn)


def _init_detector(params) -> TriggeredDecayState:
    del params  # The state is a handful of scalars, independent of the parameters.
    zero_i = jnp.zeros([], jnp.int32)
    return TriggeredDecayState(
        step=zero_i,
        epoch_start=zero_i,
        num_observed=zero_i,
        baseline_sum=jnp.zeros([], jnp.float32),
        smoothed=jnp.zeros([], jnp.float32),
        surge_step=jnp.full([], -1, jnp.int32),
        num_triggers=zero_i,
        level=jnp.ones([], jnp.float32),
        anchor=zero_i,
        period=zero_i,
        multiplier=jnp.ones([], jnp.float32),
    )


def _read_signal(extra_args, signal_name: str, owner: str) -> jax.Array:
    """The detector's scalar signal from ``update``'s keyword arguments, as float32."""
    if signal_name not in extra_args:
        raise TypeError(
            f"{owner}.update() requires the keyword argument `{signal_name}=` (the "
            f"current scalar value of the signal). Inside optax.chain every transform "
            f"receives all extra keyword arguments, so pass it to the outer update: "
            f"opt.update(grads, state, params, {signal_name}=value)."
        )
    x = extra_args[signal_name]
    if jnp.ndim(x) != 0:
        raise ValueError(
            f"{owner}: `{signal_name}` must be a scalar, got shape "
            f"{jnp.shape(x)}; pass the batch mean, e.g. x.mean()."
        )
    return jnp.asarray(x, jnp.float32)


def _detect(
    state: TriggeredDecayState,
    x: jax.Array,
    *,
    warmup,
    baseline_window,
    threshold,
    smoothing,
    cooldown,
    max_triggers,
    relative,
):
    """``(use, fire, wait, baseline_sum, smoothed)`` for observation ``x`` at ``state.step``:
    whether ``x`` counts, whether it fires a trigger, the steps a new epoch waits, and the
    updated baseline sum and smoothed signal."""
    t = state.step
    valid = jnp.isfinite(x) & (x >= 0)
    armed = (
        True
        if max_triggers is None
        else state.num_triggers < jnp.asarray(max_triggers, jnp.int32)
    )
    wait = jnp.where(
        state.num_triggers == 0,
        jnp.asarray(warmup, jnp.int32),
        jnp.asarray(cooldown, jnp.int32),
    )
    use = valid & armed & (t >= state.epoch_start + wait)

    # Relative mode: the first W used observations form the baseline, and
    # detection starts on the observation after it is complete.
    needed = jnp.asarray(baseline_window, jnp.int32) if relative else jnp.int32(0)
    collecting = state.num_observed < needed
    baseline_sum = state.baseline_sum + jnp.where(use & collecting, x, 0.0)
    beta = jnp.asarray(smoothing, jnp.float32)
    ema = jnp.where(state.num_observed == 0, x, beta * state.smoothed + (1 - beta) * x)
    smoothed = jnp.where(use, ema, state.smoothed)
    reference = (
        state.baseline_sum / jnp.maximum(needed, 1).astype(jnp.float32)
        if relative
        else jnp.float32(1.0)
    )
    fire = use & ~collecting & (smoothed > jnp.asarray(threshold, jnp.float32) * reference)
    return use, fire, wait, baseline_sum, smoothed


def _ramp(multiplier, t, warmup):
    """The multiplier times ``(t + 1) / warmup`` for ``t < warmup``: a function of the step
    alone, no state. Exact for a power-of-two warmup; otherwise the correctly rounded float32
    quotient."""
    warmup_i = jnp.asarray(warmup, jnp.int32)
    ramp = (t + 1).astype(jnp.float32) / jnp.maximum(warmup_i, 1).astype(jnp.float32)
    return jnp.where(t < warmup_i, multiplier * ramp, multiplier)


def _next_state(
    state, t, use, fire, baseline_sum, smoothed, level, anchor, period, multiplier
) -> TriggeredDecayState:
    new_state = TriggeredDecayState(
        step=t + 1,
        # A trigger starts a new epoch: the baseline is collected afresh.
        epoch_start=jnp.where(fire, t + 1, state.epoch_start),
        num_observed=jnp.where(fire, 0, state.num_observed + use.astype(jnp.int32)),
        baseline_sum=jnp.where(fire, 0.0, baseline_sum),
        smoothed=smoothed,
        surge_step=jnp.where(fire, t, state.surge_step),
        num_triggers=state.num_triggers + fire.astype(jnp.int32),
        level=level,
        anchor=anchor,
        period=period,
        multiplier=multiplier,
    )
    # Pin dtypes (and drop weak types) so that the state's abstract value never
    # changes across updates: a changed one would recompile a jitted step.
    return TriggeredDecayState(
        *(
            jnp.asarray(v, jnp.int32 if name in _INT_FIELDS else jnp.float32)
            for name, v in zip(TriggeredDecayState._fields, new_state)
        )
    )


def signal_triggered_decay(
    signal_name: str = "signal",
    *,
    warmup: int = 10,
    baseline_window: int = 50,
    threshold: float = 3.0,
    smoothing: float = 0.9,
    decay_base: float = 0.5,
    period_factor: float = 1.8,
    floor: float = 0.1,
    max_triggers: int | None = 1,
    cooldown: int = 10,
    relative: bool = True,
    linear_warmup: bool = False,
) -> optax.GradientTransformationExtraArgs:
    r"""Scales updates by a staircase LR multiplier started by a surge of a signal.

    The signal arrives as the keyword argument ``signal_name`` of ``update``
    (``signal=`` by default). Detection is described in the module docstring. When
    the first trigger fires at step ``s`` (``s`` counts updates from 0), the
    multiplier applied from step ``s`` on is

    .. math::

      \mathrm{scale}_t = \max\!\left(\mathrm{floor},\;
          \mathrm{decay\_base}^{\lfloor (t - \mathrm{warmup}) / p \rfloor}\right),
      \qquad p = \max(1, \mathrm{round}(k \cdot s)),

    with ``k = period_factor`` (``round`` is half-to-even, computed in float32).
    Before any trigger the multiplier is 1, except with ``linear_warmup=True``:
    then it is ``(t + 1) / warmup`` for ``t < warmup`` (a linear LR ramp; see the
    module docstring for what ``warmup`` means). With ``max_triggers=1``
    (default) the trigger is one-shot. With more, the detector re-arms: after a
    trigger at ``s`` a new epoch starts at ``o = s + 1``, waits ``cooldown`` steps,
    collects a new baseline and watches again; a trigger at ``s'`` in that epoch
    replaces the staircase by one that starts from the multiplier in force, i.e.
    the rule re-applied with ``o`` as step 0 and ``cooldown`` as warmup:

    .. math::

      \mathrm{scale}_t = \max\!\left(\mathrm{floor},\; \mathrm{scale}_{\mathrm{old}}(s')
          \cdot \mathrm{decay\_base}^{\lfloor (t - o - \mathrm{cooldown}) / p'
          \rfloor}\right), \qquad p' = \max(1, \mathrm{round}(k \cdot (s' - o))).

    So from step ``warmup`` on the multiplier never increases, and re-arming changes
    nothing until a second surge fires.

    Several of these transforms in one ``optax.chain`` each read their own keyword:
    optax hands every extra keyword argument to every transform in a chain, and each
    one ignores keywords other than its ``signal_name``.

    Args:
      signal_name: keyword under which ``update`` receives the signal (a scalar).
      warmup: steps at the start whose observations are ignored; the staircase
        counts its periods from step ``warmup``.
      baseline_window: ``W``, number of observations averaged into the baseline.
      threshold: fire when the smoothed signal exceeds ``threshold × baseline``
        (``relative=True``) or ``threshold`` (``relative=False``).
      smoothing: EMA coefficient ``β`` in [0, 1); 0 uses the raw signal (the
        default of :func:`length_triggered_decay`). An EMA with
        ``β = 1 − 2/(N+1)`` has the mean age of an N-step moving average.
      decay_base: factor per period, in (0, 1].
      period_factor: ``k``; the period is ``round(k × steps to the surge)``.
      floor: lower bound of the multiplier, in [0, 1].
      max_triggers: number of triggers allowed (1 = one-shot), or None for no limit.
      cooldown: steps a re-armed epoch waits after a trigger before collecting its
        baseline (only used when ``max_triggers != 1``).
      relative: compare with ``threshold × baseline`` (True) or ``threshold``.
      linear_warmup: also ramp the multiplier linearly over the warmup steps,
        ``(t + 1) / warmup`` at ``t < warmup`` (the re-implementation's warmup);
        False (default) keeps it at 1 there. A bool.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is a
      :class:`TriggeredDecayState`.

    Raises:
      ValueError: at construction, for an argument out of range.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from rl_mismatch import optim
      >>> opt = optax.chain(optax.sgd(0.1), optim.signal_triggered_decay(
      ...     "k3", warmup=0, baseline_window=2, smoothing=0.0, period_factor=1.0))
      >>> params = jnp.zeros(2)
      >>> state = opt.init(params)
      >>> for k3 in [1e-4, 1e-4, 1e-4, 5e-4, 5e-4, 5e-4, 5e-4, 5e-4, 5e-4]:
      ...   updates, state = opt.update(jnp.ones(2), state, params, k3=k3)
      >>> int(state[1].surge_step), float(optim.lr_scale(state))
      (3, 0.25)
    """
    _check_signal_name(signal_name)
    _check_detector(
        warmup,
        baseline_window,
        threshold,
        smoothing,
        cooldown,
        max_triggers,
        relative,
        floor,
        linear_warmup,
    )
    _check("decay_base", decay_base, lambda v: 0 < v <= 1, "in (0, 1], e.g. 0.5")
    _check("period_factor", period_factor, lambda v: v > 0, "> 0, e.g. 1.8")

    def respond(state, t, fire, wait):
        active = state.num_triggers > 0
        in_force = _staircase(t, state.level, state.anchor, state.period, active, decay_base, floor)
        steps_to_surge = (t - state.epoch_start).astype(jnp.float32)
        new_period = jnp.maximum(
            1, jnp.round(jnp.asarray(period_factor, jnp.float32) * steps_to_surge).astype(jnp.int32)
        )
        level = jnp.where(fire, in_force, state.level)
        anchor = jnp.where(fire, state.epoch_start + wait, state.anchor)
        period = jnp.where(fire, new_period, state.period)
        multiplier = _staircase(t, level, anchor, period, active | fire, decay_base, floor)
        return level, anchor, period, multiplier

    return _triggered(
        signal_name=signal_name,
        warmup=warmup,
        baseline_window=baseline_window,
        threshold=threshold,
        smoothing=smoothing,
        cooldown=cooldown,
        max_triggers=max_triggers,
        relative=relative,
        floor=floor,
        linear_warmup=linear_warmup,
        respond=respond,
        owner="signal_triggered_decay",
    )


def length_triggered_decay(
    *,
    warmup: int = 10,
    baseline_window: int = 50,
    threshold: float = 3.0,
    smoothing: float = 0.0,
    decay_base: float = 0.5,
    period_factor: float = 1.8,
    floor: float = 0.1,
    max_triggers: int | None = 1,
    cooldown: int = 10,
    linear_warmup: bool = False,
) -> optax.GradientTransformationExtraArgs:
    r"""Length-triggered LR decay, the remedy of arXiv 2602.01826.

    :func:`signal_triggered_decay` fed the batch's mean response length as
    ``update(updates, state, params, *, response_length)``, relative threshold:
    after ``warmup`` steps the baseline is the mean length over the next ``W`` steps;
    a surge fires at the first later step ``s`` whose length (raw by default;
    smoothed with ``smoothing > 0``) exceeds ``threshold × baseline``, and from then on

    .. math::

      \mathrm{scale}_t = \max\!\left(\mathrm{floor},\;
          \mathrm{decay\_base}^{\lfloor (t - \mathrm{warmup}) / \mathrm{round}(k \cdot s)
          \rfloor}\right).

    The paper gives no values for the constants; the defaults (W = 50, threshold = 3,
    k = 1.8, floor = 0.1, warmup = 10) are those of a public re-implementation, which
    also compares the raw length: hence ``smoothing=0.0`` (an EMA with ``β > 0``
    remains available). ``warmup`` here means that the lengths of the first
    ``warmup`` steps are ignored; ``linear_warmup=True`` also ramps the LR linearly
    over them, multiplier ``(t + 1) / warmup`` at ``t < warmup``, which is what
    ``warmup`` means in the re-implementation. NaN, infinite or negative lengths are
    ignored (see the module docstring). See :func:`signal_triggered_decay` for the
    arguments and re-arming.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from rl_mismatch import optim
      >>> opt = optax.chain(optax.adamw(1e-3), optim.length_triggered_decay(
      ...     warmup=2, baseline_window=4, smoothing=0.0))
      >>> params = {"w": jnp.ones(3)}
      >>> state = opt.init(params)
      >>> for t in range(16):  # lengths surge 4x at step 6
      ...   grads = {"w": jnp.ones(3)}
      ...   length = 100.0 if t < 6 else 400.0
      ...   updates, state = opt.update(grads, state, params, response_length=length)
      >>> int(state[1].surge_step)  # period = round(1.8 * 6) = 11
      6
      >>> float(optim.lr_scale(state))  # 0.5 ** ((15 - 2) // 11)
      0.5

      With ``linear_warmup=True`` the first ``warmup`` steps also ramp the LR:

      >>> tx = optim.length_triggered_decay(warmup=4, linear_warmup=True)
      >>> [float(m) for m in optim.replay(tx, response_length=[100.0] * 6).multiplier]
      [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    """
    inner = signal_triggered_decay(
        "response_length",
        warmup=warmup,
        baseline_window=baseline_window,
        threshold=threshold,
        smoothing=smoothing,
        decay_base=decay_base,
        period_factor=period_factor,
        floor=floor,
        max_triggers=max_triggers,
        cooldown=cooldown,
        relative=True,
        linear_warmup=linear_warmup,
    )
    missing = object()

    def update_fn(updates, state, params=None, *, response_length=missing, **extra_args):
        if response_length is missing:
            raise TypeError(
                "length_triggered_decay.update() requires the keyword argument "
                "`response_length=` (the batch's mean response length, a scalar). Inside "
                "optax.chain pass it to the outer update: opt.update(grads, state, params, "
                "response_length=length)."
            )
        return inner.update(updates, state, params, response_length=response_length)

    return optax.GradientTransformationExtraArgs(inner.init, update_fn)


def signal_triggered_multiplicative_decay(
    signal_name: str = "signal",
    *,
    factor: float = 0.5,
    threshold: float = 3.0,
    warmup: int = 10,
    baseline_window: int = 50,
    smoothing: float = 0.9,
    cooldown: int = 10,
    max_triggers: int | None = 3,
    floor: float = 0.1,
    relative: bool = True,
    linear_warmup: bool = False,
) -> optax.GradientTransformationExtraArgs:
    r"""Multiplies the LR multiplier by ``factor`` on each trigger of a signal.

    Same detector as :func:`signal_triggered_decay` (module docstring); the
    response is a plain step down, at most ``max_triggers`` times:

    .. math::

      \mathrm{scale}_t = \max\!\left(\mathrm{floor},\;
          \mathrm{factor}^{\,n_t}\right),\qquad n_t = \#\{\text{triggers at steps}
          \le t\}.

    After a trigger at ``s`` the detector waits ``cooldown`` steps. With
    ``relative=True`` it then collects a new baseline, so the next decay needs a new
    surge on top of the new level; with ``relative=False`` there is no baseline and
    it decays again every ``cooldown + 1`` steps for as long as the smoothed signal
    stays above ``threshold`` (like ``optax.contrib.reduce_on_plateau``). With
    ``linear_warmup=True`` the multiplier is ``(t + 1) / warmup`` at ``t < warmup``,
    as in :func:`signal_triggered_decay`.

    Args:
      signal_name: keyword under which ``update`` receives the signal (a scalar).
      factor: multiplier per trigger, in (0, 1].
      threshold: ratio to the baseline (``relative=True``) or absolute level.
      warmup: steps at the start whose observations are ignored.
      baseline_window: ``W``, observations averaged into each baseline.
      smoothing: EMA coefficient ``β`` in [0, 1); 0 uses the raw signal.
      cooldown: steps ignored after each trigger.
      max_triggers: most decays, or None for no limit.
      floor: lower bound of the multiplier, in [0, 1].
      relative: compare with ``threshold × baseline`` (True) or ``threshold``.
      linear_warmup: also ramp the multiplier linearly over the warmup steps (a bool).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is a
      :class:`TriggeredDecayState`.

    Raises:
      ValueError: at construction, for an argument out of range.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from rl_mismatch import optim
      >>> opt = optim.signal_triggered_multiplicative_decay(
      ...     "k3", threshold=1e-3, relative=False, warmup=0, smoothing=0.0,
      ...     cooldown=1, max_triggers=2)
      >>> state = opt.init(None)
      >>> scales = []
      >>> for k3 in [1e-4, 2e-3, 2e-3, 2e-3, 2e-3, 2e-3]:
      ...   _, state = opt.update(jnp.ones(1), state, k3=k3)
      ...   scales.append(float(state.multiplier))
      >>> scales
      [1.0, 0.5, 0.5, 0.25, 0.25, 0.25]
    """
    _check_signal_name(signal_name)
    _check_detector(
        warmup,
        baseline_window,
        threshold,
        smoothing,
        cooldown,
        max_triggers,
        relative,
        floor,
        linear_warmup,
    )
    _check("factor", factor, lambda v: 0 < v <= 1, "in (0, 1], e.g. 0.5")

    def respond(state, t, fire, wait):
        del t, wait
        stepped = jnp.maximum(
            jnp.asarray(floor, jnp.float32), state.level * jnp.asarray(factor, jnp.float32)
        )
        level = jnp.where(fire, stepped, state.level)
        return level, state.anchor, state.period, level

    return _triggered(
        signal_name=signal_name,
        warmup=warmup,
        baseline_window=baseline_window,
        threshold=threshold,
        smoothing=smoothing,
        cooldown=cooldown,
        max_triggers=max_triggers,
        relative=relative,
        floor=floor,
        linear_warmup=linear_warmup,
        respond=respond,
        owner="signal_triggered_multiplicative_decay",
    )


def replay(tx: optax.GradientTransformationExtraArgs, **traces: Any) -> Any:
    """``tx``'s state after each step of logged signal traces: what the rule would have done.

    Feeds ``tx`` one update per entry of the 1-D ``traces``, each passed under its
    keyword (``response_length=`` for :func:`length_triggered_decay`, the signal's name
    for :func:`signal_triggered_decay`; several for a chain of detectors), and returns
    its state after every step, stacked along a new leading axis (one ``lax.scan``).
    ``states.multiplier[t]`` is the ``lr/scale`` step ``t`` would have had,
    ``states.surge_step[-1]`` the step of the latest trigger. Use it to pick
    ``threshold``, ``warmup`` and ``baseline_window`` on the lengths of a past run
    before the next one.

    The updates fed are a scalar zero and ``tx`` is initialised without parameters, so
    ``tx`` should be the triggered decays alone, not a chain with Adam.

    Raises:
      ValueError: no trace, a trace that is not 1-D, or traces of different lengths.

    Example:
      >>> import numpy as np
      >>> from rl_mismatch import optim
      >>> lengths = np.r_[np.full(8, 100.0), np.full(12, 400.0)]  # a 4x surge at step 8
      >>> tx = optim.length_triggered_decay(warmup=2, baseline_window=4, smoothing=0.0)
      >>> states = optim.replay(tx, response_length=lengths)
      >>> int(states.surge_step[-1]), int(states.period[-1])  # period = round(1.8 * 8)
      (8, 14)
      >>> [float(m) for m in states.multiplier[14:18]]  # 0.5 ** ((t - 2) // 14)
      [1.0, 1.0, 0.5, 0.5]
    """
    if not traces:
        raise ValueError("replay() needs a signal trace as a keyword, e.g. response_length=lengths.")
    arrays = {name: jnp.asarray(trace, jnp.float32) for name, trace in traces.items()}
    shapes = {name: tuple(a.shape) for name, a in arrays.items()}
    if any(len(shape) != 1 for shape in shapes.values()) or len(set(shapes.values())) != 1:
        raise ValueError(
            f"replay() takes 1-D traces of equal length (one value per step); got shapes {shapes}."
        )

    def step(state, observed):
        _, state = tx.update(jnp.zeros([]), state, **observed)
        return state, state

    return jax.lax.scan(step, tx.init(None), arrays)[1]


def _is_state(x: Any) -> bool:
    return isinstance(x, TriggeredDecayState)


def triggered_decay_states(opt_state: Any) -> dict[str, TriggeredDecayState]:
    """Every :class:`TriggeredDecayState` inside an optax state, by path.

    For logging each detector on its own (its ``multiplier``, ``surge_step``,
    ``num_triggers``); give the transforms names with ``optax.named_chain`` to get
    readable paths.

    Returns:
      ``{jax.tree_util.keystr(path): state}``, in tree order; empty if none.

    Example:
      >>> import optax
      >>> from rl_mismatch import optim
      >>> opt = optax.named_chain(("adam", optax.adam(1e-3)),
      ...                         ("len", optim.length_triggered_decay()))
      >>> {k: int(s.surge_step) for k, s in optim.triggered_decay_states(opt.init({})).items()}
      {"['len']": -1}
    """
    paths_and_leaves, _ = jax.tree_util.tree_flatten_with_path(opt_state, is_leaf=_is_state)
    return {jax.tree_util.keystr(path): leaf for path, leaf in paths_and_leaves if _is_state(leaf)}


def lr_scales(opt_state: Any) -> dict[str, jax.Array]:
    """The multiplier of every triggered decay inside an optax state, by path.

    Args:
      opt_state: any optax state (``chain``, ``named_chain``, ``inject_hyperparams``,
        masked, ... nested arbitrarily); works on traced states under ``jit``.

    Returns:
      ``{jax.tree_util.keystr(path): multiplier}``, in tree order; empty if none.

    Example:
      >>> import optax
      >>> from rl_mismatch import optim
      >>> opt = optax.named_chain(("adam", optax.adam(1e-3)),
      ...                         ("len", optim.length_triggered_decay()))
      >>> {k: float(v) for k, v in optim.lr_scales(opt.init({})).items()}
      {"['len']": 1.0}
    """
    return {path: state.multiplier for path, state in triggered_decay_states(opt_state).items()}


def lr_scale(opt_state: Any) -> jax.Array:
    """The LR multiplier in force, for logging as ``lr/scale``.

    Finds every :class:`TriggeredDecayState` in a (possibly nested) optax state and
    returns the product of their multipliers: chained scalings compose, so this is
    the factor by which they scale the learning rate together.

    Args:
      opt_state: any optax state containing at least one triggered decay.

    Returns:
      A float32 scalar.

    Raises:
      ValueError: if the state contains no triggered decay.

    Example:
      >>> import optax
      >>> from rl_mismatch import optim
      >>> opt = optax.chain(optax.adamw(1e-3), optim.length_triggered_decay())
      >>> float(optim.lr_scale(opt.init({"w": 0.0})))
      1.0
    """
    scales = list(lr_scales(opt_state).values())
    if not scales:
        raise ValueError(
            "lr_scale: the optimizer state contains no TriggeredDecayState; chain a "
            "transform from rl_mismatch.optim (e.g. length_triggered_decay()) into the "
            "optimizer, or do not log lr/scale."
        )
    out = jnp.ones([], jnp.float32)
    for s in scales:
        out = out * s
    return out
