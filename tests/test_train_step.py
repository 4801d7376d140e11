"""Tests for rl_mismatch.train_step: compilation, loss scaling, sharding, micro-batching, noise scale.

Numerical bounds used below (float32 unit roundoff u = 2**-24 ≈ 6e-8):

* Sharded vs single-device and 4 micro-batches vs 1 compute the same sums in another order
  (partial sums per device / per micro-batch, reduced afterwards). A reordered sum of n terms
  differs by at most ≈ n·u·Σ|terms|. The longest reductions in the tiny model are over the
  vocabulary (V = 256: logsumexp and the lm-head transpose) and the ~100 tokens of a batch,
  and an error passes through ≈ 10 such operations (2 layers, forward and backward), so the
  worst case is ≈ 10·256·u ≈ 1.5e-4 of the magnitudes involved. We compare parameter updates
  of SGD with learning rate 1 (i.e. the gradients themselves) with
  ``atol = _REORDER_RTOL · max|Δ|`` and scalar metrics with ``rtol = _REORDER_RTOL``.
"""

import re
import threading

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from rl_mismatch import losses, optim, precision, sampler
from rl_mismatch.corrections import parse_correction
from rl_mismatch import sharding as shd
from rl_mismatch import train_step as ts
from rl_mismatch.mismatch import rescore
from rl_mismatch.models import Decoder, tiny_config

_REORDER_RTOL = 1.5e-4  # see the module docstring
_CFG = tiny_config()  # 4 heads, 2 KV heads, d_model 64, d_ff 128, V 256: divisible by every mesh used


def _model(seed=0):
    return Decoder(_CFG, rngs=nnx.Rngs(seed))


def _batch(B=8, T=12, seed=0, adv_scale=1.0) -> ts.TrainBatch:
    """Left-padded prompts of 2–5 tokens, then responses of varied length (≥ 1 token)."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, _CFG.vocab_size, (B, T)).astype(np.int32)
    pad = rng.integers(0, 3, B)
    prompt_end = pad + rng.integers(2, 4, B)
    col = np.arange(T)[None]
    valid = col >= pad[:, None]
    resp_len = rng.integers(1, T - prompt_end.max() + 1, B)
    resp = (col >= prompt_end[:, None]) & (col < (prompt_end + resp_len)[:, None])
    sampler_logp = np.where(resp, -rng.uniform(0.5, 8.0, (B, T)), 0.0).astype(np.float32)
    adv = (adv_scale * rng.normal(size=B)).astype(np.float32)
    return ts.TrainBatch(jnp.asarray(tokens), jnp.asarray(valid), jnp.asarray(resp),
                         jnp.asarray(sampler_logp), jnp.asarray(adv))


def _bits(tree):
    """Raw bytes of every leaf: equal lists mean bitwise identical trees."""
    return [np.asarray(x).tobytes() for x in jax.tree.leaves(tree)]


def _np(tree):
    return jax.tree.map(lambda x: np.array(x), tree)


_SGD = optax.sgd(1.0)  # update = −gradient: comparing updates compares gradients
_STEPS = {}  # compiled steps shared between tests (a step compiles in ~5–10 s on 2 busy cores)


def _step(mesh_shape=None, n_micro=1, dtype="f32", loss_config=losses.LossConfig(), optimizer=_SGD,
          loss_scale=None):
    """(step, mesh) for a configuration, built once per test session."""
    key = (mesh_shape, n_micro, dtype, loss_config, id(optimizer), loss_scale)
    if key not in _STEPS:
        mesh = None if mesh_shape is None else shd.make_mesh(*mesh_shape)
        graphdef, _ = nnx.split(_model())
        step = ts.make_train_step(graphdef, optimizer, loss_config, compute_dtype=dtype, n_microbatches=n_micro,
                                  mesh=mesh, loss_scale=loss_scale)
        _STEPS[key] = step, mesh
    return _STEPS[key]


def _state(mesh=None, dtype="f32", optimizer=_SGD, loss_scale=None, model=None):
    return ts.init_train_state(_model() if model is None else model, optimizer, compute_dtype=dtype,
                               key=jax.random.key(0), mesh=mesh, loss_scale=loss_scale)[1]


def _one_step(mesh_shape, n_micro, *, dtype="f32", batch=None, loss_config=losses.LossConfig(), loss_scale=None):
    """(params after − before, metrics) of one SGD(1) step from the same initial model."""
    step, mesh = _step(mesh_shape, n_micro, dtype, loss_config, loss_scale=loss_scale)
    state = _state(mesh, dtype, loss_scale=loss_scale)
    before = _np(state.params)  # host copy: the step donates the state
    state, metrics = step(state, _batch() if batch is None else batch)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.params))
    delta = jax.tree.map(lambda a, b: np.asarray(a) - b, state.params, before)
    return delta, _np(metrics)


@pytest.fixture(scope="module")
def reference():
    """Single device, one micro-batch, float32: the step everything else is compared with."""
    return _one_step(None, 1)


def _assert_same_step(got, ref):
    delta, metrics = got
    ref_delta, ref_metrics = ref
    scale = max(float(np.abs(x).max()) for x in jax.tree.leaves(ref_delta))
    for a, b in zip(jax.tree.leaves(delta), jax.tree.leaves(ref_delta)):
        np.testing.assert_allclose(a, b, rtol=0, atol=_REORDER_RTOL * scale)
    for key in ("loss/policy", "opt/grad_norm", "opt/grad_sq_big", "opt/param_norm", "mismatch/k1",
                "mismatch/ratio_p50", "is/weight_mean"):
        np.testing.assert_allclose(metrics[key], ref_metrics[key], rtol=_REORDER_RTOL, atol=1e-7, err_msg=key)


# --------------------------------------------------------------------------------------------
# Compilation


@pytest.mark.parametrize("mesh_shape,n_micro,dtype", [(None, 1, "f32"), ((4, 2), 2, "fp16")])
def test_steady_state_steps_compile_nothing(mesh_shape, n_micro, dtype, count_compiles):
    mesh = None if mesh_shape is None else shd.make_mesh(*mesh_shape)
    opt = optax.named_chain(("adamw", optax.adamw(1e-3)),
                            ("length_trigger", optim.length_triggered_decay(warmup=0, baseline_window=2)))
    graphdef, state = ts.init_train_state(_model(), opt, compute_dtype=dtype, key=jax.random.key(0), mesh=mesh)
    step = ts.make_train_step(graphdef, opt, losses.LossConfig(), compute_dtype=dtype, n_microbatches=n_micro,
                              mesh=mesh, loss_scale=precision.make_loss_scale(dtype, initial_scale=2.0**8)
                              if dtype == "fp16" else None)
    batch = _batch()
    state, metrics = step(state, batch, response_length=7.0)  # traces and compiles
    state, metrics = step(state, _batch(seed=1), response_length=7.5)
    device_length = metrics["loss/policy"] + 10.0  # eager op compiled here, before counting
    with count_compiles() as compiles:
        # New batch values, the signal as a Python float, a NumPy scalar and a device scalar (as a
        # metric of the previous step would be): none of it may retrace, lower or compile anything.
        for i, length in enumerate([8.0, np.float64(9.0), device_length]):
            state, metrics = step(state, _batch(seed=i + 2), response_length=length)
        jax.block_until_ready((state, metrics))
    assert (compiles.traces, compiles.lowerings, compiles.n) == (0, 0, 0)
    assert int(state.step) == 5
    assert float(metrics["lr/scale"]) == 1.0 and int(metrics["lr/length_trigger/surge_step"]) == -1


@pytest.mark.parametrize("mesh_shape,abstract", [(None, True), ((2, 2), True), ((2, 2), False)])
def test_a_precompiled_step_compiles_nothing_when_called(mesh_shape, abstract, count_compiles):
    """`TrainStep.precompile` from the live state and abstract shapes (`TrainBatch.shapes`, a
    signal's ShapeDtypeStruct) or the batch itself, in a thread of its own as the experiment runs
    it: the first call with a batch of those shapes then compiles nothing, and its step is
    bitwise that of a step that compiled on its first call."""
    mesh = None if mesh_shape is None else shd.make_mesh(*mesh_shape)
    graphdef, _ = nnx.split(_model())
    # A fresh optimizer per step: a step built like an earlier one would reuse its program.
    make = lambda: ts.make_train_step(graphdef, optax.sgd(1.0), losses.LossConfig(), compute_dtype="f32",
                                      n_microbatches=2, mesh=mesh)
    batch = _grouped_batch()  # 16 rows in runs of 4, 6 prompt and 7 response columns
    with count_compiles() as compiles:
        want = make()(_state(mesh), batch, response_length=7.0)
    assert compiles.names["jit(_train_step)"] == 1  # so that the check below can fail
    step, state = make(), _state(mesh)
    args = ((ts.TrainBatch.shapes(16, 6, 7, group=4), jax.ShapeDtypeStruct((), jnp.float32)) if abstract
            else (batch, 7.0))
    thread = threading.Thread(target=step.precompile, args=(state, args[0]), kwargs={"response_length": args[1]})
    with count_compiles() as compiles:
        thread.start()
        thread.join()
    assert compiles.names["jit(_train_step)"] == 1
    with count_compiles() as compiles:
        got = step(state, batch, response_length=7.0)
        jax.block_until_ready(got)
    assert compiles.names["jit(_train_step)"] == 0
    assert _bits((got[0].params, got[0].opt_state, got[1])) == _bits((want[0].params, want[0].opt_state, want[1]))


def test_batch_shapes_are_those_of_a_rollouts_batch():
    """`TrainBatch.shapes` gives the structure, shapes, dtypes and static fields `from_rollout`
    makes of a real rollout of those sizes (the sampler's program, shapes only)."""
    model = _model()
    cfg = sampler.SamplingConfig(max_new_tokens=7, prompt_bucket=4, return_entropy=True)
    prompts = [[5, 6, 7]] * 4 + [[8, 9, 10, 11, 12]] * 4
    rollout = jax.eval_shape(lambda key: sampler.generate(model, prompts, key, cfg, group=4), jax.random.key(0))
    assert rollout.prompt_width == 8
    for entropy in (False, True):
        want = ts.TrainBatch.from_rollout(rollout, jax.ShapeDtypeStruct((8,), jnp.float32), with_entropy=entropy,
                                          group=4)
        got = ts.TrainBatch.shapes(8, 8, 7, with_entropy=entropy, group=4)
        assert jax.tree.structure(got) == jax.tree.structure(want)
        assert [(x.shape, x.dtype) for x in jax.tree.leaves(got)] == [(x.shape, x.dtype) for x in jax.tree.leaves(want)]
        assert (got.score_from, got.group, got.packed_width) == (want.score_from, want.group, want.packed_width)


def _matrix_products(hlo: str):
    """(operand dtypes, output dims) of every ``dot`` in a compiled program's HLO text."""
    found = []
    for computation in re.split(r"\n(?=\S)", hlo):  # one computation per unindented block
        dtypes = dict(re.findall(r"%([\w.\-]+) = (\w+)\[", computation))
        for m in re.finditer(r"= \w+\[([\d,]*)\]\S* dot\(%([\w.\-]+), %([\w.\-]+)\)", computation):
            found.append(((dtypes[m.group(2)], dtypes[m.group(3)]), [int(d) for d in m.group(1).split(",") if d]))
    return found


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="about XLA:CPU's choice of kernel")
@pytest.mark.parametrize("grouped", [False, True, "packed"])
def test_every_matrix_product_of_a_bf16_step_is_bf16_on_cpu(grouped):
    """The decoder's custom backward rules exist so that every matmul of a bf16 step, forward and
    backward, takes bf16 operands (`decoder._mixed_einsum`, `attention._softmax_attention`). XLA:CPU runs a
    matmul it has no bf16 kernel for (e.g. JAX's own rule, whose float32 cotangents promote the
    backward products) in float32, at less than half the speed: in its compiled program that is
    a dot of float32 operands. Vector products (an output dimension of 1: the float32 sums of
    `decoder._sum_rows`) are float32 by design."""
    batch = {False: _batch, True: _grouped_batch, "packed": lambda: _packed(_grouped_batch())}[grouped]()
    graphdef, _ = nnx.split(_model())
    step = ts.make_train_step(graphdef, _SGD, losses.LossConfig(), compute_dtype="bf16", n_microbatches=2)
    products = _matrix_products(step.lower(_state(dtype="bf16"), batch).compile().as_text())
    matrices = [(dtypes, dims) for dtypes, dims in products if 1 not in dims]
    assert len(matrices) >= 3 * 7  # the parse sees them: 7 projections, forward + 2 backward products
    assert [m for m in matrices if m[0] != ("bf16", "bf16")] == []


def test_each_chained_detector_is_logged():
    # A length detector that cannot fire and a k3 detector that fires at once (absolute
    # threshold, no warmup): lr/scale is their product, and each is logged under its name.
    opt = optax.named_chain(
        ("adamw", optax.adamw(1e-3)),
        ("length", optim.length_triggered_decay(warmup=0, baseline_window=2, threshold=1e9)),
        ("k3", optim.signal_triggered_decay("k3", warmup=0, threshold=1e-3, relative=False, smoothing=0.0,
                                            period_factor=1.0)))
    graphdef, state = ts.init_train_state(_model(), opt, compute_dtype="f32", key=jax.random.key(0))
    step = ts.make_train_step(graphdef, opt, losses.LossConfig(), compute_dtype="f32")
    state, _ = step(state, _batch(), response_length=7.0, k3=0.0)
    state, metrics = step(state, _batch(seed=1), response_length=7.0, k3=1.0)  # fires at step 1
    assert int(metrics["lr/length/surge_step"]) == -1 and float(metrics["lr/length/scale"]) == 1.0
    assert int(metrics["lr/k3/surge_step"]) == 1
    assert float(metrics["lr/scale"]) == float(metrics["lr/k3/scale"]) < 1.0
    assert "lr/surge_step" not in metrics  # One scheme: each detector under its own name.


# --------------------------------------------------------------------------------------------
# float16 and loss scaling


_ADAMW = optax.adamw(1e-3)
# One loss scaling for both fp16 tests (one compilation): S₀ = 2^8 keeps the tiny model's clean
# float16 backward far from overflow; growth after 3 clean steps in a row.
_FP16_SCALE = precision.DynamicLossScale(initial_scale=2.0**8, growth_interval=3)


def _fp16_setup():
    step, _ = _step(dtype="fp16", optimizer=_ADAMW, loss_scale=_FP16_SCALE)
    return _state(dtype="fp16", optimizer=_ADAMW, loss_scale=_FP16_SCALE), step


def test_fp16_overflow_skips_step_and_halves_scale():
    state, step = _fp16_setup()
    state, metrics = step(state, _batch())  # a clean step first, so the optimizer state is non-trivial
    assert float(metrics["opt/step_skipped"]) == 0.0 and float(metrics["opt/loss_scale"]) == 2.0**8
    params_bits, opt_bits = _bits(state.params), _bits(state.opt_state)
    # Advantages of ~1e6 make S·∂loss/∂logits ≈ 2^8·1e6/N, far above float16's maximum (65504):
    # the float16 backward overflows, as a too-large loss scale would.
    state, metrics = step(state, _batch(seed=1, adv_scale=1e6))
    assert float(metrics["opt/step_skipped"]) == 1.0
    assert not np.isfinite(float(metrics["opt/grad_norm"]))
    assert float(metrics["opt/update_norm"]) == 0.0
    assert float(state.loss_scale.scale) == 2.0**7 == float(metrics["opt/loss_scale"])
    assert int(state.loss_scale.skipped_steps) == 1 == int(metrics["opt/skipped_steps"])
    assert int(state.step) == 2
    assert _bits(state.params) == params_bits
    assert _bits(state.opt_state) == opt_bits
    # And training goes on: the next clean step is applied.
    state, metrics = step(state, _batch(seed=2))
    assert float(metrics["opt/step_skipped"]) == 0.0
    assert _bits(state.params) != params_bits


def test_fp16_scale_grows_after_growth_interval_clean_steps():
    state, step = _fp16_setup()
    scales = []
    for i in range(4):
        state, metrics = step(state, _batch(seed=i))
        assert float(metrics["opt/step_skipped"]) == 0.0
        scales.append(float(state.loss_scale.scale))
    assert scales == [2.0**8, 2.0**8, 2.0**9, 2.0**9]


def test_fp16_and_bf16_gradients_track_fp32(reference):
    """Low-precision compute over float32 master weights: same update direction, params stay float32.

    bf16 rounds every activation and weight to 8 significant bits (relative error 2**-9 ≈ 0.2%),
    fp16 to 11 (0.05%); through two layers the gradient picks up errors of a few 0.1%, so
    the update's direction must agree with float32's to a cosine ≥ 0.99 (an error of 10% of
    the norm would still pass; a wrong cast would not), and its length to within 2%: the cosine
    alone is blind to scale, so a missing unscale (an update S = 256 times too long) or a
    double one would pass it.
    """
    ref = np.concatenate([x.ravel() for x in jax.tree.leaves(reference[0])])
    for dtype, ls in (("bf16", None), ("fp16", _FP16_SCALE)):
        delta, metrics = _one_step(None, 1, dtype=dtype, loss_scale=ls)  # also checks params stay float32
        got = np.concatenate([x.ravel() for x in jax.tree.leaves(delta)])
        cos = got @ ref / (np.linalg.norm(got) * np.linalg.norm(ref))
        assert cos >= 0.99, (dtype, cos)
        length = np.linalg.norm(got) / np.linalg.norm(ref)
        assert abs(length - 1) <= 0.02, (dtype, length)
        assert float(metrics["opt/step_skipped"]) == 0.0


# --------------------------------------------------------------------------------------------
# Sharding and micro-batching


@pytest.mark.parametrize("mesh_shape", [(4, 2), (8, 1)])
def test_sharded_step_equals_single_device(mesh_shape, reference):
    _assert_same_step(_one_step(mesh_shape, 1), reference)


def test_sharded_state_layout():
    mesh = shd.make_mesh(4, 2)
    opt = optax.adamw(1e-3)
    _, state = ts.init_train_state(_model(), opt, compute_dtype="f32", key=jax.random.key(0), mesh=mesh)
    expected = shd.state_shardings(state.params, mesh, shd.TRAINER_RULES)
    q_sharding = state.params["blocks"]["q"][...].sharding
    assert q_sharding == expected["blocks"]["q"]
    assert q_sharding.spec == jax.sharding.PartitionSpec(None, "data", "model", None)
    adam = state.opt_state[0]
    assert adam.mu["blocks"]["q"][...].sharding == q_sharding  # moments sharded like their parameter
    assert adam.nu["embed"][...].sharding == expected["embed"]
    assert adam.count.sharding.spec == jax.sharding.PartitionSpec()  # scalars replicated
    assert state.loss_scale.scale.sharding.spec == jax.sharding.PartitionSpec()


def test_four_microbatches_equal_one_big_batch(reference):
    _assert_same_step(_one_step(None, 4), reference)


def test_microbatches_on_a_mesh_equal_one_big_batch(reference):
    _assert_same_step(_one_step((4, 2), 2), reference)


@pytest.mark.parametrize("n_micro", [1, 2])
def test_skipping_the_prompt_columns_changes_nothing(reference, n_micro):
    """score_from = the first response column: the prompt never reaches the LM head, and the
    step is the one that scores every column (summation order aside)."""
    batch = _batch()
    first_response = int(np.argmax(np.asarray(batch.response_mask_BT).any(axis=0)))
    assert first_response > 1  # the batch has prompt columns to skip
    _assert_same_step(_one_step(None, n_micro, batch=batch.replace(score_from=first_response)), reference)


@pytest.mark.parametrize("grouped", [False, True])
def test_trailing_padding_columns_change_nothing(grouped):
    """The experiment trims a rollout to its response bucket (`sampler.Rollout.trimmed`): a batch
    whose last columns hold only padding steps as the batch without them (summation order aside),
    with its prompt shared per run (two micro-batches of whole runs) or every row in full."""
    batch = _grouped_batch(response=5) if grouped else _batch(T=10)
    pad = 7
    widened = batch.replace(**{name: jnp.pad(getattr(batch, name), ((0, 0), (0, pad)))
                               for name in ("tokens_BT", "valid_BT", "response_mask_BT", "sampler_logp_BT")})
    results = [_one_step(None, 2 if grouped else 1, batch=b) for b in (batch, widened)]
    _assert_same_step(results[0], results[1])
    for key in ("mismatch/n_tokens", "mismatch/n_seqs"):
        assert results[0][1][key] == results[1][1][key], key


def test_microbatches_with_sequence_aggregation_and_correction():
    """The normaliser and the IS weights must not depend on how the batch is split."""
    config = losses.LossConfig(aggregation="seq_mean_token_mean",
                               correction=losses.CorrectionConfig("seq_tis", high=2.0))
    _assert_same_step(_one_step(None, 4, loss_config=config), _one_step(None, 1, loss_config=config))


@pytest.mark.parametrize("spec", ["token_is(2, batch_norm) + seq_max_k3(5)",
                                  "seq_is(20, batch_norm) + token_ratio(0.2, 5) + geo_ratio(0.5, 2)"])
def test_composed_corrections_through_micro_batches_compile_once(spec, count_compiles):
    """Batch-normalised IS weights divide by a mean over the whole batch, so 4 micro-batches must
    give the step of 1; rejection and dual clip act on the whole batch alike. After the first
    step, a composed correction compiles nothing more."""
    config = losses.LossConfig(correction=parse_correction(spec), dual_clip=3.0)
    got, ref = _one_step(None, 4, loss_config=config), _one_step(None, 1, loss_config=config)
    _assert_same_step(got, ref)
    metrics, ref_metrics = got[1], ref[1]
    assert float(ref_metrics["is/batch_norm_mean"]) != 1.0
    for key in ref_metrics:
        if key.startswith("is/reject/") or key in ("is/batch_norm_mean", "loss/dual_clip_frac"):
            np.testing.assert_allclose(metrics[key], ref_metrics[key], rtol=_REORDER_RTOL, err_msg=key)
    assert any(0 < ref_metrics[k] < 1 for k in ref_metrics if k.endswith("/token_frac"))
    step, _ = _step(None, 4, "f32", config)
    state = _state()
    state, _ = step(state, _batch(seed=1))
    with count_compiles() as compiles:
        for seed in (2, 3):
            state, metrics = step(state, _batch(seed=seed))
        jax.block_until_ready((state, metrics))
    assert (compiles.traces, compiles.lowerings, compiles.n) == (0, 0, 0)


# --------------------------------------------------------------------------------------------
# Learning


def test_repeated_steps_on_a_fixed_batch_decrease_the_loss():
    """PPO epochs on one batch: with μ as the old policy ('bypass') the clipped surrogate
    −Σ min(q·A, clip(q)·A)/N with q = π_θ/μ is a function of θ that each Adam step lowers."""
    model = _model()
    batch = _batch()
    # Start at q = 1 (μ = the model's own log-probs), where nothing is clipped yet.
    own = rescore(model, batch.tokens_BT, batch.valid_BT, response_mask_BT=batch.response_mask_BT)
    batch = batch.replace(sampler_logp_BT=own)
    # Adam moves every parameter by ≈ lr per step; 1e-4 keeps q within the clip range
    # [0.8, 1.2] for these few steps (a larger step clips every token and the loss stalls).
    opt = optax.adam(1e-4)
    config = losses.LossConfig(correction=losses.CorrectionConfig("bypass"))
    graphdef, state = ts.init_train_state(model, opt, compute_dtype="f32", key=jax.random.key(0))
    step = ts.make_train_step(graphdef, opt, config, compute_dtype="f32")
    history = []
    for _ in range(6):
        state, metrics = step(state, batch)
        history.append(float(metrics["loss/policy"]))
    assert all(b < a for a, b in zip(history, history[1:])), history
    assert history[-1] < history[0] - 0.05, history


# --------------------------------------------------------------------------------------------
# Gradient noise scale


def test_noise_scale_estimator_matches_brute_force_on_logistic_regression():
    """B_noise = tr(Σ)/|G|² from per-example gradients of many samples vs `gradient_noise_scale`
    from micro-batch / batch gradient norms averaged over steps, exactly as the step logs them."""
    d, n_pop = 8, 400_000
    key_w, key_x, key_s = jax.random.split(jax.random.key(0), 3)
    w_true = jax.random.normal(key_w, (d,))
    w = 0.3 * w_true  # not at the optimum, so G ≠ 0; B_noise ≈ 47, between b_small and b_big

    def sample(key, n):
        kx, ky = jax.random.split(key)
        x = jax.random.normal(kx, (n, d))
        y = jax.random.bernoulli(ky, jax.nn.sigmoid(x @ w_true)).astype(jnp.float32)
        return x, y

    def per_example_grads(x, y):  # ∇_w of the logistic loss, one row per example
        return (jax.nn.sigmoid(x @ w) - y)[:, None] * x

    g_pop = per_example_grads(*sample(key_x, n_pop))
    mean = g_pop.mean(axis=0)
    brute = float(jnp.sum(g_pop.var(axis=0)) / jnp.sum(mean**2))

    # 2000 steps: the averaged squared norms then carry ≈ 3% relative error (measured over
    # seeds), well inside the 20% asked for, and the brute force over 4e5 examples less.
    n_steps, n_micro, b_small = 2000, 4, 8
    b_big = n_micro * b_small

    def one_step(key):
        g = per_example_grads(*sample(key, b_big)).reshape(n_micro, b_small, d)
        micro = g.mean(axis=1)
        return jnp.mean(jnp.sum(micro**2, axis=1)), jnp.sum(micro.mean(axis=0) ** 2)

    sq_small, sq_big = jax.vmap(one_step)(jax.random.split(key_s, n_steps))
    estimate = float(ts.gradient_noise_scale(sq_small.mean(), sq_big.mean(), b_small, b_big))
    assert 10 < brute < 200  # the regime where the estimator is informative at these batch sizes
    assert abs(estimate - brute) <= 0.2 * brute, (estimate, brute)


def test_noise_statistics_exact_on_known_moments():
    # E|G_B|² = |G|² + tr(Σ)/B with |G|² = 2, tr(Σ) = 12: B = 4 → 5, B = 16 → 2.75.
    grad_sq, trace = ts.noise_statistics(5.0, 2.75, 4, 16)
    np.testing.assert_allclose([float(grad_sq), float(trace)], [2.0, 12.0], rtol=1e-6)
    assert float(ts.gradient_noise_scale(5.0, 2.75, 4, 16)) == pytest.approx(6.0)
    # 16·1.0 − 4·5.0 < 0: the |G|² estimate is negative, the noise swamps the signal.
    assert float(ts.gradient_noise_scale(5.0, 1.0, 4, 16)) == np.inf


def test_step_noise_inputs_match_separate_small_and_big_batch_steps():
    """opt/grad_sq_small and opt/grad_sq_big of a 2-micro-batch step equal |G_m|² and |G|²
    measured by separate single-micro-batch steps on the two halves and on the whole batch."""
    batch = _batch()
    _, big = _one_step(None, 1, batch=batch)
    _, split = _one_step(None, 2, batch=batch)
    halves = [jax.tree.map(lambda x, m=m: x[m::2], batch) for m in range(2)]  # rows m, m + 2, …
    small = [_one_step(None, 1, batch=h)[1]["opt/grad_sq_big"] for h in halves]
    np.testing.assert_allclose(split["opt/grad_sq_big"], big["opt/grad_sq_big"], rtol=_REORDER_RTOL)
    np.testing.assert_allclose(split["opt/grad_sq_small"], np.mean(small), rtol=_REORDER_RTOL)
    sq_small, sq_big = float(np.mean(small)), float(big["opt/grad_sq_big"])
    expected = ts.gradient_noise_scale(sq_small, sq_big, 4, 8)
    # B_noise = tr(Σ)/|G|² takes two differences of nearly equal numbers; a relative error ε
    # in each squared norm becomes ε·(a + b)/|a − b| in a difference a − b, for both.
    amplification = ((sq_small + sq_big) / abs(sq_small - sq_big)
                     + (8 * sq_big + 4 * sq_small) / abs(8 * sq_big - 4 * sq_small))
    np.testing.assert_allclose(split["opt/grad_noise_scale"], expected, rtol=_REORDER_RTOL * amplification)
    assert big["opt/grad_noise_scale"] == 0.0 and big["opt/noise_trace"] == 0.0  # one micro-batch
    assert big["opt/grad_sq_small"] == big["opt/grad_sq_big"]


def _with_rows(batch: ts.TrainBatch, keep) -> ts.TrainBatch:
    """The batch with the rows where `keep` is False turned into all-padding rows."""
    keep = np.asarray(keep, bool)[:, None]
    return batch.replace(valid_BT=jnp.asarray(np.asarray(batch.valid_BT) & keep),
                         response_mask_BT=jnp.asarray(np.asarray(batch.response_mask_BT) & keep),
                         sampler_logp_BT=jnp.asarray(np.where(keep, batch.sampler_logp_BT, 0.0)))


def test_noise_scale_counts_only_sequences_with_response_tokens():
    """All-padding rows carry no gradient: they must not count in B_small or B_big."""
    batch = _batch()
    _, plain = _one_step(None, 2, batch=batch)
    # Four padding rows appended: micro-batch m (rows m, m + 2, …) holds the same real rows.
    padded = jax.tree.map(lambda x: jnp.concatenate([x, x[:4]]), batch)
    _, padded = _one_step(None, 2, batch=_with_rows(padded, [True] * 8 + [False] * 4))
    assert (plain["opt/noise_b_small"], plain["opt/noise_b_big"]) == (4.0, 8.0)
    assert (padded["opt/noise_b_small"], padded["opt/noise_b_big"]) == (4.0, 8.0)
    # A 12-row batch compiles to another program that sums in another order; the noise
    # estimates amplify that through their differences, as in the test above.
    a, b = float(plain["opt/grad_sq_small"]), float(plain["opt/grad_sq_big"])
    amplification = (a + b) / abs(a - b) + (8 * b + 4 * a) / abs(8 * b - 4 * a)
    for key, rtol in (("opt/grad_sq_small", _REORDER_RTOL), ("opt/grad_sq_big", _REORDER_RTOL),
                      ("opt/noise_trace", _REORDER_RTOL * amplification),
                      ("opt/grad_noise_scale", _REORDER_RTOL * amplification)):
        np.testing.assert_allclose(padded[key], plain[key], rtol=rtol, err_msg=key)

    # Unequal micro-batches (4 and 2 sequences): B_small is the harmonic mean 1 / mean(1/b_m).
    _, uneven = _one_step(None, 2, batch=_with_rows(batch, [1, 1, 1, 0, 1, 0, 1, 1]))
    assert uneven["opt/noise_b_big"] == 6.0
    np.testing.assert_allclose(uneven["opt/noise_b_small"], 8 / 3, rtol=1e-6)
    a, b = float(uneven["opt/grad_sq_small"]), float(uneven["opt/grad_sq_big"])
    expected = ts.gradient_noise_scale(a, b, 8 / 3, 6)
    # The same float32 formula on the same squared norms; only B_small's float32 rounding may
    # differ (2 / (1/4 + 1/2) in the step, 8/3 here), by an ulp or two, which the formula's two
    # differences amplify as above. (Measured: 1 ulp.)
    amplification = (a + b) / abs(a - b) + (6 * b + 8 / 3 * a) / abs(6 * b - 8 / 3 * a)
    np.testing.assert_allclose(uneven["opt/grad_noise_scale"], expected, rtol=4 * 2.0**-23 * amplification)

    # One micro-batch without response tokens: a single batch size, so no estimate (not 0).
    _, one_sided = _one_step(None, 2, batch=_with_rows(batch, [1, 0] * 4))
    assert one_sided["opt/noise_b_big"] == 4.0
    assert np.isnan(one_sided["opt/noise_trace"]) and np.isnan(one_sided["opt/grad_noise_scale"])
    assert np.isfinite(one_sided["opt/grad_norm"]) and one_sided["opt/grad_norm"] > 0


# --------------------------------------------------------------------------------------------
# GRPO groups: each run's prompt computed once


def _grouped_batch(B=16, G=4, prompt=6, response=7, seed=0) -> ts.TrainBatch:
    """B/G runs of G rows with the same left-padded prompt (padding differs per run), then each
    row's own response of 1..``response`` tokens."""
    rng = np.random.default_rng(seed)
    T = prompt + response
    prompts = np.repeat(rng.integers(0, _CFG.vocab_size, (B // G, prompt)), G, axis=0)
    tokens = np.concatenate([prompts, rng.integers(0, _CFG.vocab_size, (B, response))], axis=1).astype(np.int32)
    col = np.arange(T)[None]
    ends = prompt + rng.integers(1, response + 1, B)[:, None]
    valid = (col >= np.repeat(rng.integers(0, 3, B // G), G)[:, None]) & (col < ends)
    resp = (col >= prompt) & (col < ends)
    sampler_logp = np.where(resp, -rng.uniform(0.5, 8.0, (B, T)), 0.0).astype(np.float32)
    adv = rng.normal(size=B).astype(np.float32)
    return ts.TrainBatch(jnp.asarray(tokens), jnp.asarray(valid), jnp.asarray(resp), jnp.asarray(sampler_logp),
                         jnp.asarray(adv), score_from=prompt, group=G)


@pytest.fixture
def grouped_calls(monkeypatch):
    """Counts the traces of `Decoder.grouped_hidden_states`: proof that a step shared its prompts."""
    calls = []
    original = Decoder.grouped_hidden_states

    def spy(self, *args, **kwargs):
        calls.append(kwargs["group"])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Decoder, "grouped_hidden_states", spy)
    return calls


@pytest.mark.parametrize("mesh_shape,n_micro,shared", [
    (None, 1, True), (None, 2, True), ((2, 2), 2, True),
    ((4, 2), 2, False),  # 16 rows do not hold 2 micro-batches x 4 data shards of whole runs of 4
])
def test_shared_prompts_change_no_step(mesh_shape, n_micro, shared, grouped_calls):
    """share_prompts=True (each run's prompt through the model once) against False (every row in
    full), both with the batch's runs kept whole in micro-batches: the same sums in another order
    (the _REORDER_RTOL bounds), the noise scale's small-batch norms included."""
    mesh = None if mesh_shape is None else shd.make_mesh(*mesh_shape)
    batch = _grouped_batch()
    results = {}
    for share in (True, False):
        graphdef, _ = nnx.split(_model())
        step = ts.make_train_step(graphdef, _SGD, losses.LossConfig(), compute_dtype="f32", n_microbatches=n_micro,
                                  mesh=mesh, share_prompts=share)
        state = _state(mesh)
        before = _np(state.params)
        calls_before = len(grouped_calls)
        state, metrics = step(state, batch)
        results[share] = (jax.tree.map(lambda a, b: np.asarray(a) - b, state.params, before), _np(metrics))
        assert len(grouped_calls) - calls_before == (1 if share and shared else 0)
    _assert_same_step(results[True], results[False])
    np.testing.assert_allclose(results[True][1]["opt/grad_sq_small"], results[False][1]["opt/grad_sq_small"],
                               rtol=_REORDER_RTOL)


def _packed(batch: ts.TrainBatch) -> ts.TrainBatch:
    """``batch`` with its runs' responses packed into the fewest columns that hold them."""
    lengths = np.asarray(jnp.sum(batch.response_mask_BT, axis=1))
    width = int(np.max(np.sum(lengths.reshape(-1, batch.group) + 1, axis=1)))  # + 1: the prompt's last column
    assert width < batch.group * (batch.tokens_BT.shape[1] - batch.score_from + 1)
    return batch.replace(packed_width=width)


@pytest.mark.parametrize("mesh_shape,n_micro", [(None, 1), (None, 2), ((2, 2), 2)])
def test_packed_responses_change_no_step(mesh_shape, n_micro, monkeypatch):
    """A batch whose runs' responses are packed end to end (`TrainBatch.packed_width`, the
    narrowest that holds them) against the same batch unpacked, each prompt once in both: the
    same update and metrics up to summation order (the _REORDER_RTOL bounds), on a mesh too."""
    calls = []
    original = Decoder.packed_hidden_states
    monkeypatch.setattr(Decoder, "packed_hidden_states",
                        lambda self, *a, **kw: calls.append(kw["width"]) or original(self, *a, **kw))
    mesh = None if mesh_shape is None else shd.make_mesh(*mesh_shape)
    batch = _grouped_batch()
    graphdef, _ = nnx.split(_model())
    step = ts.make_train_step(graphdef, _SGD, losses.LossConfig(), compute_dtype="f32", n_microbatches=n_micro,
                              mesh=mesh)
    results = []
    for b in (batch, _packed(batch)):
        state = _state(mesh)
        before = _np(state.params)
        state, metrics = step(state, b)
        results.append((jax.tree.map(lambda a, b: np.asarray(a) - b, state.params, before), _np(metrics)))
    assert calls == [_packed(batch).packed_width]
    _assert_same_step(results[1], results[0])
    np.testing.assert_allclose(results[1][1]["opt/grad_sq_small"], results[0][1]["opt/grad_sq_small"],
                               rtol=_REORDER_RTOL)


def test_packed_batch_errors():
    """A packed width that cannot hold a run, or a step that cannot pack, is a clear error
    before anything runs; the state is untouched."""
    opt = optax.sgd(0.1)
    graphdef, state = ts.init_train_state(_model(), opt, compute_dtype="f32", key=jax.random.key(0))
    batch = _packed(_grouped_batch())
    step = ts.make_train_step(graphdef, opt, losses.LossConfig(), compute_dtype="f32")
    need = batch.packed_width
    with pytest.raises(ValueError, match=f"packed_width={need - 1} cannot hold a run of 4 responses that needs "
                                         f"{need} columns"):
        step(state, batch.replace(packed_width=need - 1))
    with pytest.raises(ValueError, match="packed_width=-2 must be a non-negative int"):
        step(state, batch.replace(packed_width=-2))
    unshared = ts.make_train_step(graphdef, opt, losses.LossConfig(), compute_dtype="f32", share_prompts=False)
    with pytest.raises(ValueError, match="share_prompts=True \\(got False\\)"):
        unshared(state, batch)
    split = ts.make_train_step(graphdef, opt, losses.LossConfig(), compute_dtype="f32", n_microbatches=8)
    with pytest.raises(ValueError, match="16 rows in whole runs for 8 micro-batch"):
        split(state, batch)
    with pytest.raises(ValueError, match="needs score_from > 1"):
        step(state, batch.replace(score_from=1))
    with pytest.raises(ValueError, match=r"must be 4-row runs of lengths in \[0, 48\]"):
        ts.packed_width([3, 49, 1, 1], 4, 48, multiple=8)
    with pytest.raises(ValueError, match="multiple=-1 must be a non-negative int"):
        ts.packed_width([3, 4, 1, 1], 4, 48, multiple=-1)
    assert ts.packed_width([3, 4, 1, 1], 4, 48, multiple=0) == 0
    # Widths up to 2/3 of a run's unpacked 4 x 49 = 196 columns pack, rounded up to the multiple.
    assert ts.packed_width([30, 30, 30, 31] + [0] * 4, 4, 48, multiple=1) == 125
    assert ts.packed_width([30, 30, 30, 31], 4, 48, multiple=16) == 128
    assert ts.packed_width([32, 32, 32, 33], 4, 48, multiple=1) == 0  # 133 > 130.7
    state, metrics = step(state, batch)  # the state survived every refusal
    assert np.isfinite(metrics["opt/grad_norm"])


def test_micro_batches_hold_whole_runs():
    """With runs of G kept whole, micro-batch m holds runs m, m + n, …: the step's small-batch
    gradient norms are those of steps on exactly those rows."""
    batch = _grouped_batch(B=16, G=4)
    _, whole = _one_step(None, 2, batch=batch)
    sq = []
    for runs in ([0, 2], [1, 3]):
        rows = np.concatenate([np.arange(4 * r, 4 * r + 4) for r in runs])
        sub = jax.tree.map(lambda x: x[rows], batch)
        _, metrics = _one_step(None, 1, batch=sub)
        # The step's |G_m|² is of micro-batch m's own loss (its share of the normaliser divided
        # out): the squared gradient norm of a step on its rows alone.
        sq.append(float(metrics["opt/grad_sq_big"]))
    np.testing.assert_allclose(whole["opt/grad_sq_small"], np.mean(sq), rtol=_REORDER_RTOL)


def test_grouped_batch_errors():
    opt = optax.sgd(0.1)
    graphdef, state = ts.init_train_state(_model(), opt, compute_dtype="f32", key=jax.random.key(0))
    step = ts.make_train_step(graphdef, opt, losses.LossConfig(), compute_dtype="f32")
    with pytest.raises(ValueError, match="group=3 must be a positive int dividing the batch"):
        step(state, _grouped_batch().replace(group=3))
    batch = _grouped_batch()
    tokens = np.asarray(batch.tokens_BT).copy()
    tokens[9, 4] += 1  # row 9 of the run of rows 8..11: its prompt differs
    with pytest.raises(ValueError, match=r"rows 8\.\.11 differ on their first 5 columns"):
        step(state, batch.replace(tokens_BT=jnp.asarray(tokens)))
    valid = np.asarray(batch.valid_BT).copy()
    valid[0, :5] = ~valid[0, :5]
    with pytest.raises(ValueError, match=r"rows 0\.\.3 differ"):
        step(state, batch.replace(valid_BT=jnp.asarray(valid)))
    tokens[9, 4] -= 1
    tokens[9, 5] += 1  # the last prompt column is each row's own (score_from − 1 = 5): allowed
    state, _ = step(state, batch.replace(tokens_BT=jnp.asarray(tokens)))
    with pytest.raises(ValueError, match="share_prompts"):
        ts.make_train_step(graphdef, opt, losses.LossConfig(), compute_dtype="f32", share_prompts=1)


def test_batch_checks_compile_once_whatever_the_prompt_width():
    """The step's column checks take score_from traced: a new prompt width compiles nothing."""
    batch = _grouped_batch()  # prompts of 6 columns: score_from 2..6 all valid
    ts._check_batch(batch.replace(score_from=2), 1, 1, True)
    compiled = ts._column_flags._cache_size()
    for score_from in (3, 5, 6):
        ts._check_batch(batch.replace(score_from=score_from), 1, 1, True)
    assert ts._column_flags._cache_size() == compiled


# --------------------------------------------------------------------------------------------
# Arguments


def test_validation_errors():
    opt = optax.sgd(0.1)
    graphdef, state = ts.init_train_state(_model(), opt, compute_dtype="f32", key=jax.random.key(0))
    with pytest.raises(ValueError, match="n_microbatches"):
        ts.make_train_step(graphdef, opt, losses.LossConfig(), compute_dtype="f32", n_microbatches=0)
    with pytest.raises(ValueError, match="dtype"):
        ts.make_train_step(graphdef, opt, losses.LossConfig(), compute_dtype="int8")
    for bad in ({"token_chunk": 0}, {"keep_logits": "yes"}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            ts.make_train_step(graphdef, opt, losses.LossConfig(), compute_dtype="f32", **bad)
    step = ts.make_train_step(graphdef, opt, losses.LossConfig(), compute_dtype="f32", n_microbatches=3)
    with pytest.raises(ValueError, match="multiple of n_microbatches"):
        step(state, _batch(B=8))
    bad = _batch().replace(advantages_B=jnp.zeros(3))
    with pytest.raises(ValueError, match="advantages_B"):
        step(state, bad)
    for score_from in (0, 12, 2.0):  # T = 12
        with pytest.raises(ValueError, match="score_from"):
            step(state, _batch().replace(score_from=score_from))
    # Responses start in columns 2-5: from column 8 on, some response tokens would go unscored.
    with pytest.raises(ValueError, match="marks tokens before score_from=8, which the trainer does not score"):
        step(state, _batch().replace(score_from=8))
    half = Decoder(_CFG, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="float32 master"):
        ts.init_train_state(half, opt, compute_dtype="bf16", key=jax.random.key(0))


def test_state_is_a_copy_and_no_lr_scale_without_a_trigger():
    model = _model()
    step, _ = _step()
    state, metrics = step(_state(model=model), _batch())
    assert "lr/scale" not in metrics
    model(jnp.zeros((1, 3), jnp.int32))  # the caller's model survives the donated step
