"""Tests for rl_mismatch.optim: the triggered LR decays as optax transforms."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from rl_mismatch import optim

# ---------------------------------------------------------------------------
# An independent, pure-Python (float64) statement of the documented rule.
# ---------------------------------------------------------------------------


def reference(
    xs,
    *,
    warmup=10,
    baseline_window=50,
    threshold=3.0,
    smoothing=0.9,
    decay_base=0.5,
    period_factor=1.8,
    floor=0.1,
    max_triggers=1,
    cooldown=10,
    relative=True,
    factor=None,
    linear_warmup=False,
):
    """Returns (multiplier per step, trigger steps, smallest detection margin).

    `factor=None` is the staircase rule of signal_triggered_decay, otherwise the
    multiplicative rule; `linear_warmup` scales step t < warmup by (t + 1) / warmup. The margin |m − thr·b| / (thr·b) over all detection steps
    lets a test check that float32 vs float64 cannot flip a comparison.
    """
    mults, surges, margins = [], [], []
    epoch_start, n_trig, used, ema = 0, 0, [], 0.0
    stair = None  # (level, anchor, period) of the staircase in force.
    level = 1.0

    def stair_value(t):
        if stair is None:
            return 1.0
        lv, anchor, period = stair
        return max(floor, lv * decay_base ** ((t - anchor) // period))

    for t, x in enumerate(xs):
        wait = warmup if n_trig == 0 else cooldown
        armed = max_triggers is None or n_trig < max_triggers
        fire = False
        if math.isfinite(x) and x >= 0 and armed and t >= epoch_start + wait:
            ema = x if not used else smoothing * ema + (1 - smoothing) * x
            if len(used) >= (baseline_window if relative else 0):
                ref = threshold * (
                    sum(used[:baseline_window]) / baseline_window if relative else 1.0
                )
                fire = ema > ref
                margins.append(abs(ema - ref) / ref)
            used.append(x)
        if fire:
            if factor is None:
                raw = period_factor * (t - epoch_start)
                # float32 and float64 may round an exact tie differently: keep away.
                assert abs(raw % 1 - 0.5) > 1e-3, "period k·s is a rounding tie"
                stair = (stair_value(t), epoch_start + wait, max(1, round(raw)))
            else:
                level = max(floor, level * factor)
            n_trig, epoch_start, used = n_trig + 1, t + 1, []
            surges.append(t)
        mult = stair_value(t) if factor is None else level
        if linear_warmup and t < warmup:
            mult *= (t + 1) / warmup
        mults.append(mult)
    return np.array(mults), surges, min(margins, default=math.inf)


def run(tx, xs, name="response_length"):
    """Feeds the trace `xs` to `tx` (one update per entry); returns stacked states."""
    return jax.tree.map(np.asarray, optim.replay(tx, **{name: xs}))


def surge_trace(n=1200, surge_at=200, base=200.0, high=900.0, ramp=40, seed=0):
    """Flat noisy lengths, then a linear ramp up to `high` starting at `surge_at`."""
    rng = np.random.default_rng(seed)
    xs = base * (1 + 0.1 * rng.standard_normal(n))
    t = np.arange(n)
    xs += np.clip((t - surge_at) / ramp, 0, 1) * (high - base)
    return xs


def trigger_steps(states):
    """Steps at which a trigger fired, from the state's own counter."""
    return list(np.nonzero(np.diff(states.num_triggers, prepend=0))[0])


# ---------------------------------------------------------------------------
# The rule on synthetic traces.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("noise", [0.0, 0.3])
def test_flat_lengths_never_trigger(noise):
    rng = np.random.default_rng(1)
    # ±30% noise never reaches 3x the baseline, with or without smoothing.
    xs = 300.0 * (1 + noise * np.clip(rng.standard_normal(2000), -2, 2))
    for smoothing in (0.0, 0.9):
        states = run(optim.length_triggered_decay(smoothing=smoothing), xs)
        assert states.num_triggers[-1] == 0
        assert np.all(states.surge_step == -1)
        assert np.all(states.multiplier == 1.0)


def test_surge_triggers_once_at_first_crossing():
    xs = surge_trace()
    kw = dict(warmup=10, baseline_window=50, threshold=3.0, smoothing=0.9)
    states = run(optim.length_triggered_decay(**kw), xs)
    _, surges, margin = reference(xs, **kw)
    assert margin > 1e-5  # float32 EMA error is ~1e-6 relative; no flip possible.
    assert trigger_steps(states) == surges and len(surges) == 1
    s = surges[0]
    assert states.surge_step[s - 1] == -1 and np.all(states.surge_step[s:] == s)
    # From the state alone: detection had started, the smoothed length was below
    # the threshold at every earlier detection step and is above it at s.
    baseline = xs[10:60].mean()
    np.testing.assert_allclose(states.baseline_sum[59] / 50, baseline, rtol=1e-6)
    assert np.all(states.smoothed[60:s] <= 3.0 * baseline)
    assert states.smoothed[s] > 3.0 * baseline


@pytest.mark.parametrize(
    "kw,rtol",
    [
        # base 0.5 and factor products are exact in float32: exact equality.
        (dict(warmup=10, period_factor=1.8, floor=0.1), 0.0),
        # float32(0.7)^n is off by ≤ n·2⁻²⁴ relative (n ≤ 60 here) → well under 1e-5.
        (dict(warmup=3, period_factor=0.35, decay_base=0.7, floor=0.02), 1e-5),
    ],
)
def test_multiplier_follows_formula_for_1000_steps(kw, rtol):
    xs = surge_trace(n=2000)
    states = run(optim.length_triggered_decay(**kw), xs)
    (s,) = trigger_steps(states)
    assert s + 1000 < len(xs)
    t = np.arange(len(xs))
    period = max(1, round(kw["period_factor"] * s))
    base, floor = kw.get("decay_base", 0.5), kw["floor"]
    expected = np.array(
        [1.0 if ti < s else max(floor, base ** ((ti - kw["warmup"]) // period)) for ti in t],
        np.float32,
    )
    np.testing.assert_allclose(
        states.multiplier[: s + 1001], expected[: s + 1001], rtol=rtol, atol=0
    )
    assert np.all(np.diff(states.multiplier) <= 0)


CONFIGS = [
    dict(),
    dict(warmup=0, baseline_window=1, smoothing=0.0, period_factor=0.5),
    dict(max_triggers=None, cooldown=5, baseline_window=20, threshold=1.5),
    dict(max_triggers=3, cooldown=0, smoothing=0.5, threshold=1.8, floor=0.2),
    dict(factor=0.5, max_triggers=4, cooldown=7, baseline_window=10, threshold=1.5),
    dict(factor=0.3, relative=False, threshold=500.0, cooldown=20, max_triggers=None, floor=0.01),
    # warmup a power of two: the ramp (t + 1) / warmup is exact in float32.
    dict(linear_warmup=True, warmup=16, baseline_window=20, max_triggers=None, cooldown=5),
    dict(factor=0.5, linear_warmup=True, warmup=8, max_triggers=3, threshold=1.5, smoothing=0.0),
]


@pytest.mark.parametrize("kw", CONFIGS)
def test_matches_reference_with_invalid_observations(kw):
    # Three surges, with NaN/inf/negative observations sprinkled in every phase.
    xs = surge_trace(n=900, surge_at=120, seed=3)
    xs[400:] *= 2.0
    xs[650:] *= 2.0
    rng = np.random.default_rng(4)
    bad = rng.choice(len(xs), 60, replace=False)
    xs[bad] = rng.choice([np.nan, np.inf, -np.inf, -5.0], len(bad))
    kw = dict(kw)
    factor = kw.pop("factor", None)
    if factor is None:
        tx = optim.signal_triggered_decay("length", **kw)
    else:
        tx = optim.signal_triggered_multiplicative_decay("length", factor=factor, **kw)
    states = run(tx, xs, name="length")
    mults, surges, margin = reference(list(xs), factor=factor, **kw)
    assert margin > 1e-5  # see test_surge_triggers_once_at_first_crossing.
    assert surges, "the trace should trigger at least once"
    assert trigger_steps(states) == surges
    # Powers of 0.5 are exact in float32. A non-dyadic factor is rounded once when
    # cast and once per product (≤ 2⁻²⁴ relative each, ≤ 4 triggers here) → 1e-6.
    exact = kw.get("decay_base", 0.5) == 0.5 and factor in (None, 0.5)
    np.testing.assert_allclose(
        states.multiplier, mults.astype(np.float32), rtol=0 if exact else 1e-6, atol=0
    )
    for leaf in states:
        assert np.all(np.isfinite(leaf))


def test_invalid_observation_touches_only_step_and_schedule():
    tx = optim.length_triggered_decay(warmup=2, baseline_window=3, max_triggers=2, smoothing=0.5)
    xs = [100.0, 100.0, 100.0, 110.0, 90.0, 120.0, 500.0, 700.0, 900.0, 900.0]
    state = tx.init(None)
    for t, x in enumerate(xs):
        for bad in (np.nan, np.inf, -np.inf, -1.0):
            _, after = tx.update(jnp.ones([]), state, response_length=bad)
            assert int(after.step) == t + 1
            for name in optim.TriggeredDecayState._fields:
                if name not in ("step", "multiplier"):
                    np.testing.assert_array_equal(
                        getattr(after, name),
                        getattr(state, name),
                        err_msg=f"{name} at step {t} for {bad}",
                    )
            assert np.isfinite(after.multiplier)
        _, state = tx.update(jnp.ones([]), state, response_length=x)
    assert int(state.num_triggers) == 1  # The trace did exercise a trigger.


def test_rearm_after_cooldown_with_new_baseline():
    # Surge 1 at ~200 (4x), lengths settle at the new level, surge 2 at 700 (4x).
    xs = surge_trace(n=1600, surge_at=200, base=200.0, high=800.0, seed=5)
    xs[700:] = 4 * xs[700:]
    kw = dict(warmup=10, baseline_window=50, threshold=3.0, smoothing=0.9)
    one = run(optim.length_triggered_decay(**kw), xs)
    re = run(optim.length_triggered_decay(max_triggers=None, cooldown=30, **kw), xs)
    s1s, s2s = trigger_steps(one), trigger_steps(re)
    assert len(s1s) == 1 and len(s2s) == 2 and s2s[0] == s1s[0]
    s1, s2 = s2s
    # Re-arming changes nothing until the second trigger.
    np.testing.assert_array_equal(re.multiplier[:s2], one.multiplier[:s2])
    # The new baseline is the W observations after the cooldown, [s1+31, s1+81).
    o = s1 + 1
    np.testing.assert_allclose(
        re.baseline_sum[o + 30 + 49] / 50, xs[o + 30 : o + 80].mean(), rtol=1e-6
    )
    assert s2 >= 700 and s2 >= o + 30 + 50
    # Second staircase: starts from the multiplier in force, restarts the rule
    # with o as step 0 and the cooldown as warmup.
    t = np.arange(s2, len(xs))
    p2 = max(1, round(1.8 * (s2 - o)))
    expected = np.maximum(
        0.1, one.multiplier[s2].astype(np.float64) * 0.5 ** ((t - o - 30) // p2)
    ).astype(np.float32)
    np.testing.assert_array_equal(re.multiplier[s2:], expected)
    assert np.all(np.diff(re.multiplier) <= 0)


def test_multiplicative_cap_and_floor():
    xs = np.full(200, 10.0)
    tx = optim.signal_triggered_multiplicative_decay(
        "k3",
        factor=0.5,
        threshold=1.0,
        relative=False,
        warmup=0,
        smoothing=0.0,
        cooldown=4,
        max_triggers=3,
        floor=0.2,
    )
    states = run(tx, xs, name="k3")
    assert trigger_steps(states) == [0, 5, 10]  # every cooldown + 1 steps, 3 times
    assert states.multiplier[-1] == np.float32(0.2)  # 0.125 clamped to the floor
    assert np.all(states.period == 0) and np.all(states.anchor == 0)


def test_length_detector_compares_the_raw_length_by_default():
    # Baseline 100 (steps 0-3); 299 at step 4 is under 3 x 100, 301 at step 6 is the first
    # length above it. An EMA with β = 0.9 would be at 0.9·(0.9·100 + 0.1·299) + 0.1·120 ≈ 120
    # at step 5 and 0.9·120 + 0.1·301 ≈ 138 at step 6: far below 300, so no trigger.
    xs = [100.0, 100.0, 100.0, 100.0, 299.0, 120.0, 301.0, 100.0, 100.0]
    kw = dict(warmup=0, baseline_window=4, threshold=3.0, period_factor=1.0)
    raw = run(optim.length_triggered_decay(**kw), xs)
    assert trigger_steps(raw) == [6]
    assert np.all(raw.surge_step[:6] == -1) and np.all(raw.surge_step[6:] == 6)
    np.testing.assert_array_equal(raw.smoothed[:7], np.float32(xs[:7]))  # no smoothing
    np.testing.assert_array_equal(raw.multiplier, [1.0] * 6 + [0.5] * 3)  # period round(1.0·6)
    assert trigger_steps(run(optim.length_triggered_decay(**kw, smoothing=0.0), xs)) == [6]
    # The smoothed variant is still there, and does not fire on this trace.
    ema = run(optim.length_triggered_decay(**kw, smoothing=0.9), xs)
    assert ema.num_triggers[-1] == 0 and np.all(ema.multiplier == 1.0)
    assert np.all(ema.smoothed[4:] < 150.0)


# warmup = 4: the multiplier ramps 0.25, 0.5, 0.75, 1, then the rule as without the ramp. The
# 10000s in the warmup are ignored (they would fire at once otherwise); the baseline is steps
# 4-5 (100), the surge fires at step 8 (400 > 3 x 100); the period is round(1.8 · 8) = 14, so
# the first halving is at step 4 + 14 = 18 (staircase) or at the surge (multiplicative).
_RAMP_TRACE = [1e4, 1e4, 1e4, 1e4, 100.0, 100.0, 100.0, 100.0] + [400.0] * 12
_RAMP = [0.25, 0.5, 0.75, 1.0]
_RAMP_CASES = [
    (
        optim.length_triggered_decay,
        dict(),
        "response_length",
        _RAMP + [1.0] * 14 + [0.5, 0.5],
    ),
    (
        optim.signal_triggered_decay,
        dict(signal_name="length", smoothing=0.0),
        "length",
        _RAMP + [1.0] * 14 + [0.5, 0.5],
    ),
    (
        optim.signal_triggered_multiplicative_decay,
        dict(signal_name="length", smoothing=0.0),
        "length",
        _RAMP + [1.0] * 4 + [0.5] * 12,
    ),
]


@pytest.mark.parametrize("factory,kw,name,expected", _RAMP_CASES)
def test_linear_warmup_ramps_then_leaves_the_rule_alone(factory, kw, name, expected, count_compiles):
    kw = dict(kw, warmup=4, baseline_window=2, threshold=3.0)
    tx = factory(**kw, linear_warmup=True)
    states = run(tx, _RAMP_TRACE, name=name)
    np.testing.assert_array_equal(states.multiplier, np.float32(expected))
    assert trigger_steps(states) == [8]
    np.testing.assert_array_equal(states.baseline_sum[5], 200.0)
    # Without the ramp: the same state at every step, but for the multiplier of steps 0-3.
    plain = run(factory(**kw), _RAMP_TRACE, name=name)
    np.testing.assert_array_equal(plain.multiplier, [1.0] * 4 + expected[4:])
    for field in optim.TriggeredDecayState._fields:
        if field != "multiplier":
            np.testing.assert_array_equal(getattr(states, field), getattr(plain, field), field)
    # Through a jitted update, compiled once: the same multipliers, applied to the updates.
    update = jax.jit(lambda g, s, x: tx.update(g, s, **{name: x}))
    state, grads = tx.init(None), {"w": jnp.full(3, 2.0)}
    with count_compiles() as compiles:
        for t, x in enumerate(_RAMP_TRACE):
            updates, state = update(grads, state, np.float32(x))
            assert float(state.multiplier) == expected[t], t
            np.testing.assert_array_equal(updates["w"], np.full(3, 2.0 * expected[t], np.float32))
    assert compiles.n == 1


def test_linear_warmup_with_injected_warmup_under_jit():
    # An injected warmup reaches the update as a traced array: the ramp still follows it.
    tx = optax.inject_hyperparams(optim.length_triggered_decay)(warmup=4, linear_warmup=True)
    update = jax.jit(lambda s: tx.update(jnp.ones([]), s, response_length=100.0)[1])
    state, scales = tx.init(None), []
    for _ in range(6):
        state = update(state)
        scales.append(float(optim.lr_scale(state)))
    assert scales == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    state = tx.init(None)
    state.hyperparams["warmup"] = jnp.asarray(2, state.hyperparams["warmup"].dtype)
    scales = []
    for _ in range(3):
        state = update(state)
        scales.append(float(optim.lr_scale(state)))
    assert scales == [0.5, 1.0, 1.0]


# ---------------------------------------------------------------------------
# Errors.
# ---------------------------------------------------------------------------


def test_missing_signal_is_a_type_error():
    grads = {"w": jnp.ones(2)}
    with pytest.raises(TypeError, match="response_length="):
        tx = optim.length_triggered_decay()
        tx.update(grads, tx.init(grads))
    with pytest.raises(TypeError, match="response_length="):
        tx = optax.chain(optax.adamw(1e-3), optim.length_triggered_decay())
        tx.update(grads, tx.init(grads), grads, length=3.0)
    for tx in (
        optim.signal_triggered_decay("k3"),
        optim.signal_triggered_multiplicative_decay("k3"),
    ):
        with pytest.raises(TypeError, match="k3="):
            tx.update(grads, tx.init(grads), signal=1.0)


def test_non_scalar_signal_is_a_value_error():
    tx = optim.length_triggered_decay()
    with pytest.raises(ValueError, match="mean"):
        tx.update(jnp.ones(2), tx.init(None), response_length=jnp.ones(4))


@pytest.mark.parametrize(
    "factory,kw",
    [
        (optim.length_triggered_decay, dict(warmup=-1)),
        (optim.length_triggered_decay, dict(warmup=2.5)),
        (optim.length_triggered_decay, dict(baseline_window=0)),
        (optim.length_triggered_decay, dict(threshold=0.0)),
        (optim.length_triggered_decay, dict(threshold=float("nan"))),
        (optim.length_triggered_decay, dict(smoothing=1.0)),
        (optim.length_triggered_decay, dict(smoothing=-0.1)),
        (optim.length_triggered_decay, dict(decay_base=0.0)),
        (optim.length_triggered_decay, dict(decay_base=1.5)),
        (optim.length_triggered_decay, dict(period_factor=0.0)),
        (optim.length_triggered_decay, dict(floor=1.5)),
        (optim.length_triggered_decay, dict(floor=-0.1)),
        (optim.length_triggered_decay, dict(max_triggers=0)),
        (optim.length_triggered_decay, dict(cooldown=-3)),
        (optim.length_triggered_decay, dict(threshold="3")),
        (optim.length_triggered_decay, dict(threshold=True)),
        (optim.signal_triggered_decay, dict(signal_name="params")),
        (optim.signal_triggered_decay, dict(signal_name="not a name")),
        (optim.signal_triggered_decay, dict(relative=1)),
        (optim.signal_triggered_multiplicative_decay, dict(factor=0.0)),
        (optim.signal_triggered_multiplicative_decay, dict(factor=2.0)),
        (optim.signal_triggered_multiplicative_decay, dict(max_triggers=-1)),
        (optim.length_triggered_decay, dict(linear_warmup="yes")),
        (optim.signal_triggered_decay, dict(linear_warmup=1)),
        (optim.signal_triggered_multiplicative_decay, dict(linear_warmup=None)),
    ],
)
def test_invalid_constructor_args(factory, kw):
    with pytest.raises(ValueError):
        factory(**kw)


@pytest.mark.parametrize(
    "factory",
    [
        optim.length_triggered_decay,
        optim.signal_triggered_decay,
        optim.signal_triggered_multiplicative_decay,
    ],
)
@pytest.mark.parametrize("bad", ["True", 1, 0.0, None, jnp.array(True)])
def test_linear_warmup_must_be_a_bool(factory, bad):
    with pytest.raises(ValueError, match=r"linear_warmup must be a bool .*got "):
        factory(warmup=4, linear_warmup=bad)


def test_lr_scale_without_decay_is_a_value_error():
    with pytest.raises(ValueError, match="TriggeredDecayState"):
        optim.lr_scale(optax.adamw(1e-3).init({"w": jnp.ones(2)}))


# ---------------------------------------------------------------------------
# As an optax citizen: chain, jit, inject_hyperparams, sharding, orbax.
# ---------------------------------------------------------------------------


# Scaling by a power of two is exact, but XLA may fuse the multiplier into the
# inner optimizer's elementwise arithmetic (reassociating it with adam's division
# or the learning rate), which can move the last rounding: allow 2 float32 ulp.
_ULP2 = 2 * 2.0**-23


def _params():
    return {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones(3)}


def test_chain_adamw_jit_no_recompile_and_stable_types(count_compiles):
    params = _params()
    opt = optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.adamw(1e-2),
        optim.length_triggered_decay(warmup=1, baseline_window=3, smoothing=0.0),
    )
    ref_opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2))

    @jax.jit
    def step(params, state, ref_state, length):
        grads = jax.tree.map(jnp.sin, params)
        updates, state = opt.update(grads, state, params, response_length=length)
        ref_updates, ref_state = ref_opt.update(grads, ref_state, params)
        return updates, ref_updates, state, ref_state

    state, ref_state = opt.init(params), ref_opt.init(params)
    types = jax.tree.map(jax.typeof, state)
    lengths = [100.0] * 5 + [500.0] * 20 + [np.nan, 300.0]
    later_compiles = 0
    for i, length in enumerate(lengths):
        with count_compiles() as compiles:
            updates, ref_updates, state, ref_state = step(params, state, ref_state, length)
        later_compiles += compiles.n if i else 0  # the first call compiles
        assert jax.tree.map(jax.typeof, state) == types
        scale = optim.lr_scale(state)
        jax.tree.map(
            lambda u, r: np.testing.assert_allclose(u, r * scale, rtol=_ULP2), updates, ref_updates
        )
    assert int(state[2].surge_step) == 5
    assert float(optim.lr_scale(state)) < 1.0
    assert later_compiles == 0


def test_bf16_updates_stay_bf16():
    tx = optim.length_triggered_decay()
    updates, _ = tx.update(
        {"w": jnp.ones(3, jnp.bfloat16)}, tx.init(None), response_length=jnp.bfloat16(10.0)
    )
    assert updates["w"].dtype == jnp.bfloat16


def test_inject_hyperparams_on_adamw_and_on_the_decay(count_compiles):
    params = _params()
    kw = dict(warmup=1, baseline_window=3, smoothing=0.0, period_factor=0.5)
    lengths = [100.0] * 5 + [500.0] * 15
    adamw = optax.adamw(1e-2)
    injected_adamw = optax.inject_hyperparams(optax.adamw)(learning_rate=1e-2)
    # (optimizer, the same optimizer without the decay)
    cases = [
        (optax.chain(adamw, optim.length_triggered_decay(**kw)), adamw),
        (optax.chain(injected_adamw, optim.length_triggered_decay(**kw)), injected_adamw),
        (
            optax.chain(
                adamw, optax.inject_hyperparams(optim.length_triggered_decay)(threshold=3.0, **kw)
            ),
            adamw,
        ),
    ]

    def trajectory(opt, base, threshold=None):
        state, base_state = opt.init(params), base.init(params)
        if threshold is not None:  # The injected threshold can change at run time.
            state[1].hyperparams["threshold"] = jnp.asarray(threshold, jnp.float32)

        @jax.jit
        def step(state, base_state, x):
            grads = jax.tree.map(jnp.cos, params)
            updates, state = opt.update(grads, state, params, response_length=x)
            base_updates, base_state = base.update(grads, base_state, params)
            return updates, base_updates, state, base_state

        scales, later_compiles = [], 0
        for i, x in enumerate(lengths):
            with count_compiles() as compiles:
                updates, base_updates, state, base_state = step(state, base_state, x)
            later_compiles += compiles.n if i else 0  # the first call compiles
            scales.append(float(optim.lr_scale(state)))
            # The decay only rescales the inner updates (see _ULP2 for the tolerance).
            jax.tree.map(
                lambda u, b: np.testing.assert_allclose(u, b * scales[-1], rtol=_ULP2),
                updates,
                base_updates,
            )
        assert later_compiles == 0
        return scales

    expected = trajectory(*cases[0])
    assert expected[-1] < 1.0
    for opt, base in cases[1:]:
        assert trajectory(opt, base) == expected
    assert set(trajectory(*cases[2], threshold=100.0)) == {1.0}


def test_replay_is_the_update_loop():
    # replay's scan against the loop a user would write around a jitted update: the same
    # state at every step, for two detectors in one chain, each fed its own trace. (Eager
    # op-by-op updates may differ in the EMA's last bit: XLA fuses it into one expression.)
    tx = optax.named_chain(
        ("length", optim.length_triggered_decay(warmup=2, baseline_window=5, smoothing=0.9)),
        ("k3", optim.signal_triggered_multiplicative_decay("k3", threshold=1e-2, relative=False)),
    )
    lengths, k3 = surge_trace(n=60, surge_at=20), np.linspace(0.0, 0.03, 60)
    states = optim.replay(tx, response_length=lengths, k3=k3)
    update = jax.jit(lambda state, x, k: tx.update(jnp.zeros([]), state, response_length=x, k3=k)[1])
    state = tx.init(None)
    for t in range(60):
        state = update(state, np.float32(lengths[t]), np.float32(k3[t]))
        for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(states)):
            assert np.asarray(a) == np.asarray(b)[t]
    assert int(states["length"].num_triggers[-1]) == 1 and int(states["k3"].num_triggers[-1]) >= 1


@pytest.mark.parametrize(
    "traces,message",
    [
        ({}, "needs a signal trace"),
        ({"response_length": np.ones((3, 2))}, "1-D traces"),
        ({"response_length": np.ones(3), "k3": np.ones(4)}, "equal length"),
    ],
)
def test_replay_bad_traces(traces, message):
    with pytest.raises(ValueError, match=message):
        optim.replay(optim.length_triggered_decay(), **traces)


def test_two_decays_in_one_chain_read_their_own_keyword():
    opt = optax.named_chain(
        ("adam", optax.adam(1e-3)),
        ("length", optim.length_triggered_decay(warmup=0, baseline_window=1, smoothing=0.0)),
        (
            "k3",
            optax.inject_hyperparams(optim.signal_triggered_multiplicative_decay)(
                "k3", factor=0.25, threshold=1e-3, relative=False, warmup=0
            ),
        ),
    )
    params = {"w": jnp.ones(2)}
    state = opt.init(params)
    for k3 in (1e-4, 1e-2):
        _, state = opt.update(params, state, params, response_length=100.0, k3=k3)
    scales = optim.lr_scales(state)
    assert {k: float(v) for k, v in scales.items()} == {
        "['length']": 1.0,
        "['k3'].inner_state": 0.25,
    }
    assert float(optim.lr_scale(state)) == 0.25
    assert float(jax.jit(optim.lr_scale)(state)) == 0.25


def test_sharded_params_keep_state_replicated(count_compiles):
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
    sharding = NamedSharding(mesh, P("data"))
    params = {"w": jax.device_put(jnp.ones((16, 4)), sharding)}
    opt = optax.chain(
        optax.adamw(1e-3), optim.length_triggered_decay(warmup=0, baseline_window=2, smoothing=0.0)
    )
    step = jax.jit(lambda p, s, x: opt.update(p, s, p, response_length=x))
    with jax.set_mesh(mesh):
        # Initialised under jit, the scalars are placed on the mesh like the step's
        # outputs, so the first step's input shardings match the later ones'.
        state = jax.jit(opt.init)(params)
        updates, state = step(params, state, 10.0)  # compiles
        with count_compiles() as compiles:
            for x in (10.0, 100.0, 100.0):
                updates, state = step(params, state, x)
    assert updates["w"].sharding.is_equivalent_to(sharding, 2)
    decay_state = state[1]
    assert int(decay_state.surge_step) == 2
    for leaf in decay_state:
        assert leaf.shape == () and leaf.sharding.is_fully_replicated
        assert len(leaf.sharding.device_set) == 8  # on the mesh, not one device
    assert compiles.n == 0


def test_orbax_round_trip(tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    params = _params()
    opt = optax.chain(
        optax.adamw(1e-3),
        optim.length_triggered_decay(
            warmup=1, baseline_window=2, smoothing=0.0, max_triggers=None, cooldown=2
        ),
    )
    step = jax.jit(lambda s, x: opt.update(params, s, params, response_length=x))
    state = opt.init(params)
    for x in [10.0, 10.0, 10.0, 50.0, 50.0]:
        _, state = step(state, x)
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(tmp_path / "opt", state)
    ckptr.wait_until_finished()
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    restored = ckptr.restore(tmp_path / "opt", abstract)
    ckptr.close()
    assert isinstance(restored[1], optim.TriggeredDecayState)
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    assert jax.tree.map(jax.typeof, restored) == jax.tree.map(jax.typeof, state)
    jax.tree.map(np.testing.assert_array_equal, restored, state)
    # Training continues identically from the restored state.
    for x in [50.0, 60.0, 55.0, 500.0]:
        _, state = step(state, x)
        _, restored = step(restored, x)
    jax.tree.map(np.testing.assert_array_equal, restored, state)
    assert int(state[1].num_triggers) == 2


# ---------------------------------------------------------------------------
# Importable with nothing but jax and optax.
# ---------------------------------------------------------------------------

_BLOCKED = (
    "flax",
    "chex",
    "orbax",
    "torch",
    "tensorflow",
    "tensorflow_datasets",
    "grain",
    "transformers",
    "ml_collections",
    "matplotlib",
    "tokenizers",
    "safetensors",
    "gguf",
    "reasoning_gym",
    "tensorboardX",
    "array_record",
)


def test_import_with_only_jax_and_optax():
    script = textwrap.dedent(f"""
      import importlib.abc, sys
      BLOCKED = {_BLOCKED!r}

      class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
          if name.split(".")[0] in BLOCKED:
            raise ImportError(f"blocked for this test: {{name}}")
          return None

      sys.meta_path.insert(0, Block())
      try:
        import flax
      except ImportError:
        pass
      else:
        raise SystemExit("the import blocker does not work")

      import jax.numpy as jnp
      import rl_mismatch.optim as optim
      tx = optim.length_triggered_decay()
      _, state = tx.update(jnp.ones(2), tx.init(None), response_length=3.0)
      assert int(state.step) == 1
      loaded = sorted(m for m in sys.modules
                      if m.split(".")[0] in BLOCKED or m.startswith("rl_mismatch."))
      assert loaded == ["rl_mismatch.optim"], loaded
      print("ok")
  """)
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_docs_figure_script_runs(tmp_path):
    pytest.importorskip("matplotlib")
    import importlib.util

    path = os.path.join(os.path.dirname(__file__), "..", "experiments", "plot_lr_trigger.py")
    spec = importlib.util.spec_from_file_location("plot_lr_trigger", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    lengths = script.synthetic_lengths(1000, seed=0)
    states = script.run(lengths)
    script.plot(lengths, states, str(tmp_path / "fig.png"))  # Raises unless 1 trigger.
    assert (tmp_path / "fig.png").stat().st_size > 10_000
