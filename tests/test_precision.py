"""Tests for rl_mismatch.precision: dtype names and dynamic loss scaling."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rl_mismatch.precision import (DynamicLossScale, LossScaleState, NoOpLossScale, all_finite, loss_scale_metrics,
                                   make_loss_scale, parse_dtype, select_tree)


def _bits(tree):
    """Raw bytes of every leaf: equality means bitwise identical (NaN payloads and -0.0 included)."""
    return [np.asarray(x).tobytes() for x in jax.tree_util.tree_leaves(tree)]


@pytest.mark.parametrize("name,dtype", [
    ("bf16", jnp.bfloat16), ("bfloat16", jnp.bfloat16), ("BF16", jnp.bfloat16),
    ("fp16", jnp.float16), ("float16", jnp.float16), ("f16", jnp.float16),
    ("fp32", jnp.float32), ("float32", jnp.float32), (jnp.float16, jnp.float16), (np.float32, jnp.float32)])
def test_parse_dtype(name, dtype):
    assert parse_dtype(name) == jnp.dtype(dtype)


@pytest.mark.parametrize("bad", ["half", "float64", "int8", jnp.float64, jnp.int32, 3])
def test_parse_dtype_rejects(bad):
    with pytest.raises(ValueError, match="bf16|float32"):
        parse_dtype(bad)


def test_parse_dtype_error_lists_valid_names():
    with pytest.raises(ValueError, match=r"valid names are \[.*'bf16'.*'fp16'.*'fp32'"):
        parse_dtype("tf32")


@pytest.mark.parametrize("kwargs", [
    dict(growth_interval=0), dict(growth_interval=2.5), dict(factor=1.0), dict(factor=float("inf")),
    dict(min_scale=0.0), dict(initial_scale=0.5, min_scale=1.0), dict(initial_scale=2.0**30),
    dict(max_scale=float("inf"))])
def test_dynamic_loss_scale_validation(kwargs):
    with pytest.raises(ValueError):
        DynamicLossScale(**kwargs)


def test_all_finite():
    assert bool(all_finite({"a": jnp.ones(3), "b": (jnp.zeros((2, 2), jnp.float16), jnp.arange(3))}))
    assert not bool(all_finite({"a": jnp.ones(3), "b": jnp.array([0.0, jnp.nan])}))
    assert not bool(all_finite([jnp.array([-jnp.inf], jnp.float16)]))
    assert bool(all_finite({}))


def test_select_tree_needs_bool_scalar():
    with pytest.raises(ValueError, match="bool scalar"):
        select_tree(jnp.array([True]), jnp.ones(1), jnp.zeros(1))
    with pytest.raises(ValueError, match="bool scalar"):
        select_tree(jnp.array(1.0), jnp.ones(1), jnp.zeros(1))


def test_scale_unscale_exact_and_keeps_dtype():
    """S is a power of two, so scaling and unscaling are exact, also for float16 leaves."""
    ls = DynamicLossScale(initial_scale=2.0**15)
    state = ls.init()
    assert float(ls.scale_loss(state, jnp.float32(0.75))) == 0.75 * 2**15
    grads = {"a": jnp.array([3.0, -2.5], jnp.float32) * 2**15, "b": jnp.array([2.0**-3], jnp.float16) * 2**15}
    out = ls.unscale_grads(state, grads)
    assert out["b"].dtype == jnp.float16 and out["a"].dtype == jnp.float32
    np.testing.assert_array_equal(out["a"], [3.0, -2.5])
    np.testing.assert_array_equal(out["b"], np.array([2.0**-3], np.float16))


def test_scaling_rescues_float16_underflow():
    """A float16 backward whose cotangents (1e-8) underflow to 0 unscaled survives with S = 2**15."""
    x = jnp.full((4,), 1e-4, jnp.float16)

    def loss_fn(w):  # float32 master weight, float16 compute, as in the trainer
        return jnp.sum((w.astype(jnp.float16) * x).astype(jnp.float32)) * 1e-4

    w = jnp.ones((4,), jnp.float32)
    # The cotangent reaching the float16 product is 1e-4; times x it is 1e-8 < 6e-8, the
    # smallest float16 subnormal, so the unscaled gradient is exactly 0.
    assert float(jnp.abs(jax.grad(loss_fn)(w)).max()) == 0.0
    ls = DynamicLossScale(initial_scale=2.0**15)
    state = ls.init()
    g = ls.unscale_grads(state, jax.grad(lambda w: ls.scale_loss(state, loss_fn(w)))(w))
    # x = 1e-4 is stored as float16 (rel. error ≤ 2**-11) and the scaled cotangent is rounded
    # to float16 once more: the result is 1e-8 to within a few float16 ulps (~1e-3 relative).
    np.testing.assert_allclose(g, 1e-8, rtol=3e-3)


def _toy_step(ls):
    """A jitted fp16 train step on a linear model with Adam, skipping non-finite steps."""
    opt = optax.adam(1e-2)

    def loss_fn(params, x):
        y = x.astype(jnp.float16) @ params["w"].astype(jnp.float16) + params["b"].astype(jnp.float16)
        return jnp.mean(jnp.square(y.astype(jnp.float32)))

    @jax.jit
    def step(params, opt_state, ls_state, x):
        grads = jax.grad(lambda p: ls.scale_loss(ls_state, loss_fn(p, x)))(params)
        grads = ls.unscale_grads(ls_state, grads)
        finite = all_finite(grads)
        updates, new_opt_state = opt.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        params, opt_state = select_tree(finite, (new_params, new_opt_state), (params, opt_state))
        return params, opt_state, ls.adjust(ls_state, finite), finite

    params = {"w": jnp.array([[0.5], [-0.25], [-0.0]], jnp.float32), "b": jnp.zeros((1,), jnp.float32)}
    return step, params, opt.init(params)


def test_overflow_skips_step_bitwise_and_halves_scale():
    ls = DynamicLossScale(initial_scale=2.0**15, growth_interval=3)
    step, params, opt_state = _toy_step(ls)
    ls_state = ls.init()
    x_ok = jnp.array([[1.0, 2.0, 3.0]])
    params, opt_state, ls_state, finite = step(params, opt_state, ls_state, x_ok)  # non-trivial Adam state
    assert bool(finite) and int(ls_state.good_steps) == 1
    # Scaled loss ≈ 2**15 · (300)² · ... overflows float16 (max 65504) in the backward: inf/NaN grads.
    x_big = jnp.array([[300.0, 0.0, 0.0]])
    before = _bits((params, opt_state))
    params2, opt_state2, ls_state2, finite = step(params, opt_state, ls_state, x_big)
    assert not bool(finite)
    assert _bits((params2, opt_state2)) == before
    assert float(ls_state2.scale) == 2.0**14
    assert int(ls_state2.good_steps) == 0 and int(ls_state2.skipped_steps) == 1


def test_injected_inf_gradient_leaves_state_bitwise_unchanged():
    params = {"w": jnp.array([1.0, -0.0, 3.0]), "n": jnp.array(2.0)}
    opt = optax.adamw(1e-3)
    opt_state = opt.init(params)
    grads = {"w": jnp.array([0.1, jnp.inf, 0.2]), "n": jnp.array(jnp.nan)}
    updates, new_opt_state = opt.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    finite = all_finite(grads)
    kept = select_tree(finite, (new_params, new_opt_state), (params, opt_state))
    assert _bits(kept) == _bits((params, opt_state))
    ls = DynamicLossScale(initial_scale=8.0)
    assert float(ls.adjust(ls.init(), finite).scale) == 4.0


def test_scale_grows_after_growth_interval_clean_steps():
    ls = DynamicLossScale(initial_scale=2.0**10, growth_interval=3, factor=2.0, max_scale=2.0**12)
    adjust = jax.jit(ls.adjust)
    state, scales = ls.init(), []
    for finite in [True, True, True, True, True, True, True, True, True, False, True]:
        state = adjust(state, jnp.array(finite))
        scales.append(float(state.scale))
    e = 2.0**10
    # grows ×2 after every 3rd clean step, capped at max_scale; a bad step halves and restarts the count.
    assert scales == [e, e, 2 * e, 2 * e, 2 * e, 4 * e, 4 * e, 4 * e, 4 * e, 2 * e, 2 * e]
    assert int(state.good_steps) == 1 and int(state.skipped_steps) == 1


def test_toy_step_grows_scale_and_compiles_once(count_compiles):
    ls = DynamicLossScale(initial_scale=2.0**4, growth_interval=2)
    step, params, opt_state = _toy_step(ls)
    state = ls.init()
    x = jnp.array([[1.0, 2.0, 3.0]])
    params, opt_state, state, finite = step(params, opt_state, state, x)  # compiles
    with count_compiles() as compiles:
        for _ in range(3):
            params, opt_state, state, finite = step(params, opt_state, state, x)
            jax.block_until_ready(finite)
    assert bool(finite)
    assert float(state.scale) == 2.0**6
    assert compiles.n == 0  # the state's structure and dtypes never change: no recompilation


def test_scale_floor():
    ls = DynamicLossScale(initial_scale=4.0, min_scale=2.0)
    state = ls.init()
    for _ in range(3):
        state = jax.jit(ls.adjust)(state, jnp.array(False))
    assert float(state.scale) == 2.0 and int(state.skipped_steps) == 3


def test_noop_loss_scale():
    ls = NoOpLossScale()
    state = ls.init()
    grads = {"a": jnp.array([1.5, jnp.inf])}
    assert float(ls.scale_loss(state, jnp.float32(3.0))) == 3.0
    assert ls.unscale_grads(state, grads) is grads
    state = ls.adjust(state, all_finite(grads))
    assert float(state.scale) == 1.0 and int(state.skipped_steps) == 1
    # Same pytree structure and dtypes as the dynamic state: the train state is uniform.
    dyn = DynamicLossScale().init()
    assert jax.tree_util.tree_structure(state) == jax.tree_util.tree_structure(dyn)
    assert [x.dtype for x in state] == [x.dtype for x in dyn]
    assert set(loss_scale_metrics(state)) == {"opt/loss_scale", "opt/skipped_steps"}


def test_make_loss_scale():
    assert isinstance(make_loss_scale("fp16"), DynamicLossScale)
    assert make_loss_scale(jnp.float16, growth_interval=7).growth_interval == 7
    assert isinstance(make_loss_scale("bf16"), NoOpLossScale)
    assert isinstance(make_loss_scale("float32"), NoOpLossScale)
    with pytest.raises(ValueError, match="only apply to float16"):
        make_loss_scale("bf16", growth_interval=7)
    assert isinstance(DynamicLossScale().init(), LossScaleState)
