"""Tests for rl_mismatch.sampler (issue 6): exactness against the full forward, determinism,
truncation, sharding, compilation caching and argument errors. Tiny random models only."""

import dataclasses
import gc
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rl_mismatch import mismatch
from rl_mismatch import sampler as smp
from rl_mismatch import sharding as shd
from rl_mismatch.models import Decoder, decoder, tiny_config

# Mixed prompt lengths (left padding of 0 to 13 tokens inside one bucket of 16).
PROMPT_LENGTHS = (3, 16, 7, 11, 1, 9)
N_NEW = 10
# float32 decode vs full forward: the same arithmetic up to summation order (cache slots vs
# the whole sequence, one query row vs T). Every logit is a few chained float32 dot products of
# length <= 128 over O(1) values, so each differs by a few hundred ulps of O(1) at most
# (~1e-5 worst case, ~1e-6 typical), and log_softmax adds O(1) ulps of |logit| <= ~10.
FP32_DECODE_ATOL = 2e-5


def _model(**overrides):
    return Decoder(tiny_config(**overrides), rngs=nnx.Rngs(0))


def _prompts(lengths=PROMPT_LENGTHS, vocab=256, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(1, vocab, n).tolist() for n in lengths]


@pytest.fixture(scope="module")
def model():
    return _model()


def _resp(rollout):
    m = np.asarray(rollout.response_mask_BT, bool)
    return m, np.asarray(rollout.tokens_BT), np.asarray(rollout.valid_BT)


def test_greedy_equals_stepwise_argmax_of_full_forward(model):
    cfg = smp.SamplingConfig(max_new_tokens=N_NEW, temperature=0.0, prompt_bucket=16)
    roll = smp.generate(model, _prompts(), jax.random.key(0), cfg)
    P = roll.prompt_width
    tokens, valid = np.asarray(roll.tokens_BT), np.asarray(roll.valid_BT)
    assert np.all(np.asarray(roll.response_lengths_B) == N_NEW)  # no EOS: every row runs N_NEW steps
    forward = jax.jit(lambda t, v: model(t, valid_BT=v)[:, -1])
    for i in range(N_NEW):
        logits = np.asarray(forward(tokens[:, :P + i], valid[:, :P + i]))
        top2 = np.sort(logits, axis=-1)[:, -2:]
        # A tie closer than the decode/forward difference could flip argmax legitimately;
        # this precondition makes the exact comparison below meaningful.
        assert np.min(top2[:, 1] - top2[:, 0]) > 10 * FP32_DECODE_ATOL
        np.testing.assert_array_equal(np.argmax(logits, axis=-1), tokens[:, P + i], err_msg=f"step {i}")


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampled_logprobs_equal_full_forward_log_softmax(model, temperature):
    cfg = smp.SamplingConfig(max_new_tokens=N_NEW, temperature=temperature, eos_ids=(7, 9),
                             return_entropy=True, prompt_bucket=16)
    roll = smp.generate(model, _prompts(), jax.random.key(1), cfg)
    m, tokens, valid = _resp(roll)
    logp, ent = jax.jit(lambda t, v, r: mismatch.rescore_with_entropy(model, t, v, response_mask_BT=r,
                                                                      temperature=temperature))(
        roll.tokens_BT, roll.valid_BT, roll.response_mask_BT)
    np.testing.assert_allclose(np.asarray(roll.logp_BT)[m], np.asarray(logp)[m], rtol=0, atol=FP32_DECODE_ATOL)
    # Entropy: a sum over V=256 probability-weighted terms of the same logits; same bound.
    np.testing.assert_allclose(np.asarray(roll.entropy_BT)[m], np.asarray(ent)[m], rtol=0,
                               atol=FP32_DECODE_ATOL)
    # No truncation: the truncated log-prob is the full one and the kept mass is exactly 1.
    np.testing.assert_array_equal(np.asarray(roll.logp_truncated_BT), np.asarray(roll.logp_BT))
    np.testing.assert_array_equal(np.asarray(roll.log_kept_mass_BT), 0.0)
    # Layout: response mask inside valid, zero log-probs elsewhere, EOS ends a row.
    assert not np.any(m & ~valid)
    assert np.all(np.asarray(roll.logp_BT)[~m] == 0)
    lengths = m.sum(1)
    np.testing.assert_array_equal(lengths, np.asarray(roll.response_lengths_B))
    for b in range(m.shape[0]):
        resp = tokens[b, roll.prompt_width:roll.prompt_width + lengths[b]]
        eos_at = np.flatnonzero(np.isin(resp, (7, 9)))
        assert bool(roll.finished_B[b]) == (eos_at.size > 0)
        if eos_at.size:
            assert eos_at[0] == lengths[b] - 1  # the first EOS is the last response token


def test_same_key_same_tokens(model):
    cfg = smp.SamplingConfig(max_new_tokens=N_NEW, temperature=1.0, top_k=20, prompt_bucket=16)
    a = smp.generate(model, _prompts(), jax.random.key(3), cfg)
    b = smp.generate(model, _prompts(), jax.random.key(3), cfg)
    c = smp.generate(model, _prompts(), jax.random.key(4), cfg)
    np.testing.assert_array_equal(np.asarray(a.tokens_BT), np.asarray(b.tokens_BT))
    np.testing.assert_array_equal(np.asarray(a.logp_BT), np.asarray(b.logp_BT))
    assert not np.array_equal(np.asarray(a.tokens_BT), np.asarray(c.tokens_BT))


def _kept_set(logits_V, top_k, top_p):
    """The documented kept set in float64: top-k, then the smallest top-p prefix."""
    order = np.argsort(-logits_V, kind="stable")
    keep = np.zeros(logits_V.shape, bool)
    k = top_k or logits_V.size
    cand = order[:k]
    p = np.exp(logits_V[cand] - logits_V[cand].max())
    p /= p.sum()
    before = np.cumsum(p) - p
    keep[cand[before < top_p]] = True
    return keep


@pytest.mark.parametrize("top_k,top_p", [(5, 1.0), (0, 0.8), (40, 0.6)])
def test_truncation_never_leaves_the_kept_set(top_k, top_p):
    V, draws = 256, 8192
    rng = np.random.default_rng(0)
    # Spread logits (std 2) so the kept sets have a handful to a few dozen tokens.
    logits = (2.0 * rng.standard_normal((4, V))).astype(np.float32)
    cfg = smp.SamplingConfig(max_new_tokens=1, temperature=1.0, top_k=top_k, top_p=top_p)
    select = jax.jit(lambda l, k: smp.select_tokens(l, k, cfg))
    for row in logits:
        keep = _kept_set(row.astype(np.float64), top_k, top_p)
        assert 1 < keep.sum() < V
        tok, lp, lp_tr, kept, _ = (np.asarray(x) for x in select(jnp.tile(row, (draws, 1)), jax.random.key(0)))
        assert keep[tok].all(), f"emitted {np.unique(tok[~keep[tok]])} outside the kept set"
        # Every kept token is reachable: with >= 8192 draws and kept probabilities >= ~1e-3 ...
        p_full = np.exp(row - row.max()) / np.exp(row - row.max()).sum()
        p_kept = np.where(keep, p_full, 0) / p_full[keep].sum()
        common = p_kept > 2e-3  # ... expected count >= 16, so P(never drawn) < e^-16
        assert set(np.flatnonzero(common)) <= set(np.unique(tok))
        # Kept mass: exp(log_kept) = Σ_kept p (float32 logsumexp over <= 256 terms: ~1e-6).
        np.testing.assert_allclose(np.exp(kept), p_full[keep].sum(), rtol=2e-6)
        if top_p < 1:
            # The smallest prefix reaching top_p: its mass reaches top_p, without its least
            # probable token it does not (float32 cumsum rounding ~1e-6 of slack).
            # top-p cuts the top-k-renormalised distribution, so masses are relative to top-k's.
            cand_mass = np.sort(p_full)[::-1][:top_k or V].sum()
            mass = p_full[keep].sum() / cand_mass
            assert mass >= top_p - 1e-6
            assert mass - p_full[keep].min() / cand_mass < top_p + 1e-6
        # Renormalisation: log p_trunc = log p − log kept mass; and the identity in the Rollout.
        np.testing.assert_allclose(lp_tr, np.log(p_kept[tok]), atol=2e-6)
        np.testing.assert_allclose(lp_tr + kept, lp, atol=2e-6)


def test_draw_follows_the_distribution():
    # V = 700: three blocks of 256, the last one partial. Row 0: random probabilities with a
    # few exact zeros (-inf), including a whole zero block. Row 1: one token, the very last.
    V, n_keys, per_key = 700, 8, 20000
    rng = np.random.default_rng(1)
    logits = 1.5 * rng.standard_normal(V)
    logits[rng.choice(V, 50, replace=False)] = -np.inf
    logits[256:512] = -np.inf
    logp = logits - np.log(np.exp(logits).sum())
    only_last = np.full(V, -np.inf)
    only_last[-1] = 0.0
    draw = jax.jit(smp.draw)
    counts = np.zeros(V)
    for i in range(n_keys):
        rows = jnp.asarray(np.tile(logp, (per_key, 1)), jnp.float32)
        counts += np.bincount(np.asarray(draw(rows, jax.random.key(i))), minlength=V)
        assert np.all(np.asarray(draw(jnp.asarray(np.tile(only_last, (4, 1)), jnp.float32),
                                      jax.random.key(i))) == V - 1)
    n = n_keys * per_key
    p = np.exp(logp)
    assert counts[p == 0].sum() == 0
    # Multinomial counts: each within 5 standard deviations (plus one count) of n·p; with
    # 650 tokens the chance that any exceeds that by luck is ~4e-4 (the keys are fixed anyway).
    np.testing.assert_array_less(np.abs(counts - n * p), 5 * np.sqrt(n * p * (1 - p)) + 1)


def test_greedy_is_argmax():
    """`greedy` against numpy's argmax at the vocabulary's width: the first index of the largest
    entry, ties included (the first of equal maxima wins), rows of -inf only (index 0), -inf among
    finite entries, the largest entry in the first and the last column, +inf, and NaN, which argmax
    ranks above everything (its first occurrence), also after a larger finite entry and in a row of
    NaN only: XLA:CPU's vectorised max drops NaNs, so a max-based argmax must handle them itself."""
    V = 49152
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((11, V)).astype(np.float32)
    rows[1, [10, 400, V - 1]] = 50.0       # a three-way tie
    rows[2] = -np.inf                      # nothing allowed
    rows[3, rng.choice(V, V - 100, replace=False)] = -np.inf
    rows[4, 0] = rows[5, V - 1] = 50.0     # the ends
    rows[6, [20, 30_000]] = np.nan
    rows[7, 5] = np.inf                    # a lone +inf
    rows[8] = 0.0                          # all tied
    rows[9, 5], rows[9, 30_000] = 100.0, np.nan  # the NaN after a larger entry still wins
    rows[10] = np.nan
    got = np.asarray(jax.jit(smp.greedy)(jnp.asarray(rows)))
    np.testing.assert_array_equal(got, np.argmax(rows, axis=-1))
    np.testing.assert_array_equal(got[[1, 2, 4, 5, 6, 7, 8, 9, 10]], [10, 0, 0, V - 1, 20, 5, 0, 30_000, 0])


def test_top_p_beyond_the_candidates():
    # Nearly flat logits over 1000 tokens: top-p 0.9 needs ~900 of them, more than the top-k
    # candidates searched first, so the exact full sort must take over.
    V = 1000
    rng = np.random.default_rng(2)
    logits = (0.1 * rng.standard_normal((3, V))).astype(np.float32)
    logits[0, :5] += 8.0  # one row is covered by the candidates: the branch is per batch
    keep = np.asarray(jax.jit(lambda l: smp._truncation_mask(l, 0, 0.9))(jnp.asarray(logits)))
    for row, kept in zip(logits.astype(np.float64), keep):
        p = np.exp(row - row.max())
        p /= p.sum()
        mass = p[kept].sum()
        assert kept.sum() > smp._TOP_P_CANDIDATES or row.max() > 5
        assert mass >= 0.9 - 1e-6 and mass - p[kept].min() < 0.9 + 1e-6
        assert p[kept].min() >= p[~kept].max()  # a prefix of the sorted distribution
    # Row 0 alone takes the candidates' branch and must keep the same tokens.
    alone = np.asarray(jax.jit(lambda l: smp._truncation_mask(l, 0, 0.9))(jnp.asarray(logits[:1])))
    np.testing.assert_array_equal(alone[0], keep[0])


def test_top_p_rollout_kept_mass_is_consistent(model):
    top_p = 0.7
    cfg = smp.SamplingConfig(max_new_tokens=N_NEW, temperature=1.0, top_p=top_p, prompt_bucket=16)
    roll = smp.generate(model, _prompts(), jax.random.key(5), cfg)
    m = np.asarray(roll.response_mask_BT, bool)
    lp, lp_tr, kept = (np.asarray(x)[m] for x in (roll.logp_BT, roll.logp_truncated_BT, roll.log_kept_mass_BT))
    # logp = logp_truncated + log_kept_mass: three float32 log-sum-exps of O(1)-O(10) values.
    np.testing.assert_allclose(lp_tr + kept, lp, atol=4e-6)
    # The kept mass reaches top_p (cumsum slack 1e-6) and never exceeds 1; the truncated
    # distribution gives the token at least its full probability.
    assert np.all(kept >= np.log(top_p) - 1e-6) and np.all(kept <= 1e-6)
    assert np.all(lp_tr >= lp - 1e-6)
    # Against the trainer: the full-distribution log-prob is the full forward's.
    trainer = np.asarray(jax.jit(lambda t, v, r: mismatch.rescore(model, t, v, response_mask_BT=r))(
        roll.tokens_BT, roll.valid_BT, roll.response_mask_BT))[m]
    np.testing.assert_allclose(lp_tr + kept, trainer, atol=FP32_DECODE_ATOL)


def test_greedy_on_meshes_matches_one_device():
    model = _model(n_heads=8, n_kv_heads=4, head_dim=8)
    prompts = _prompts((3, 16, 7, 11, 1, 9, 5, 14))
    # cache_segment=4: the cache is grown (and re-laid out on the mesh) twice in 10 steps.
    cfg = smp.SamplingConfig(max_new_tokens=N_NEW, temperature=0.0, prompt_bucket=16, cache_segment=4)
    ref = smp.generate(smp.sync_weights(model, jnp.float32), prompts, jax.random.key(0), cfg)
    for data, mdl in ((8, 1), (4, 2), (2, 4)):
        mesh = shd.make_mesh(data, mdl)
        out = smp.generate(smp.sync_weights(model, jnp.float32, mesh), prompts, jax.random.key(0), cfg, mesh=mesh)
        np.testing.assert_array_equal(np.asarray(out.tokens_BT), np.asarray(ref.tokens_BT), err_msg=str(mesh.shape))
        # Sharded matmuls sum partial products in another order: same float32 bound as decode.
        np.testing.assert_allclose(np.asarray(out.logp_BT), np.asarray(ref.logp_BT), rtol=0, atol=1e-5)


def test_sampler_on_its_own_devices_samples_what_the_shared_mesh_does():
    """The trainer FSDP over devices 0-3, the sampler tensor-parallel over 4-7: the weight sync
    moves float32 master weights device to device (no host transfer is allowed) into the
    sampler's dtype and layout, and the sampled rollout equals the one sampled on the trainer's
    own mesh with the same key."""
    model = _model(n_heads=8, n_kv_heads=4, head_dim=8)
    trainer_mesh, sampler_mesh = shd.make_meshes(-1, 1, 1, 4)
    assert dict(trainer_mesh.shape) == {"data": 4, "model": 1} and dict(sampler_mesh.shape) == {"data": 1, "model": 4}
    assert set(trainer_mesh.devices.flat).isdisjoint(sampler_mesh.devices.flat)
    _, state = nnx.split(model)
    trained = nnx.merge(nnx.graphdef(model), jax.device_put(state, shd.state_shardings(state, trainer_mesh,
                                                                                    shd.TRAINER_RULES)))
    prompts = _prompts((3, 16, 7, 11, 1, 9, 5, 14))
    cfg = smp.SamplingConfig(max_new_tokens=N_NEW, temperature=1.0, prompt_bucket=16, cache_segment=4)
    key = jax.device_put(jax.random.key(5), shd.replicated(trainer_mesh))  # as the loop holds it
    with jax.transfer_guard_host_to_device("disallow"), jax.transfer_guard_device_to_host("disallow"):
        own = smp.sync_weights(trained, jnp.float32, sampler_mesh)
    for var in jax.tree.leaves(nnx.state(own)):
        assert var.sharding.mesh.devices.tolist() == sampler_mesh.devices.tolist()
    shared = smp.sync_weights(trained, jnp.float32, trainer_mesh)
    a = smp.generate(own, prompts, key, cfg, mesh=sampler_mesh)
    b = smp.generate(shared, prompts, key, cfg, mesh=trainer_mesh)
    assert set(a.tokens_BT.sharding.device_set) <= set(sampler_mesh.devices.flat)
    for name in ("tokens_BT", "response_mask_BT", "response_lengths_B", "finished_B"):
        np.testing.assert_array_equal(np.asarray(getattr(a, name)), np.asarray(getattr(b, name)), name)
    # Tensor-parallel vs data-parallel matmuls sum in another order: the float32 decode bound.
    np.testing.assert_allclose(np.asarray(a.logp_BT), np.asarray(b.logp_BT), rtol=0, atol=FP32_DECODE_ATOL)
    # bf16 sync: the same cast on either device set, so the weights agree bit for bit.
    for x, y in zip(jax.tree.leaves(nnx.state(smp.sync_weights(trained, jnp.bfloat16, sampler_mesh))),
                    jax.tree.leaves(nnx.state(smp.sync_weights(trained, jnp.bfloat16)))):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x.astype(jnp.float32)), np.asarray(y.astype(jnp.float32)))


def test_release_weights_frees_a_copy_now_and_keeps_shared_masters():
    """flax leaves a reference cycle behind nnx.merge, so without release_weights a dropped copy's
    arrays would live until the cyclic collector runs (disabled here)."""
    model = _model()
    gc.disable()
    try:
        before = {id(a) for a in jax.live_arrays()}
        copy = smp.sync_weights(model, jnp.bfloat16)
        smp.generate(copy, _prompts(), jax.random.key(0), smp.SamplingConfig(max_new_tokens=4))
        assert [a for a in jax.live_arrays() if id(a) not in before]  # the copy's arrays
        smp.release_weights(copy)
        del copy
        assert [a.shape for a in jax.live_arrays() if id(a) not in before] == []
        # An fp32 "copy" is the masters' arrays: releasing it leaves the masters whole.
        masters = [np.asarray(x) for x in jax.tree.leaves(nnx.state(model))]
        same = smp.sync_weights(model, jnp.float32)
        smp.release_weights(same)
        for a, b in zip(masters, jax.tree.leaves(nnx.state(model))):
            np.testing.assert_array_equal(a, np.asarray(b))
    finally:
        gc.enable()


def test_make_meshes_refuses_what_does_not_fit():
    with pytest.raises(ValueError, match="leaves none to the trainer"):
        shd.make_meshes(-1, 1, 2, 4)
    with pytest.raises(ValueError, match="fit the 4 devices"):
        shd.make_meshes(8, 1, 1, 4)
    with pytest.raises(ValueError, match="sampler_data >= 1 and sampler_model >= 1"):
        shd.make_meshes(-1, 1, 0, 4)
    trainer, sampler = shd.make_meshes(2, 2)
    assert trainer is sampler


def test_cache_row_groups_rule():
    assert smp.cache_row_groups(64, jnp.bfloat16) == smp.cache_row_groups(32, jnp.float16) == 2  # CPU here
    assert smp.cache_row_groups(16, jnp.bfloat16) == 1  # too few rows per group to gain
    assert smp.cache_row_groups(64, jnp.float32) == 1  # no gain in float32
    assert smp.cache_row_groups(64, jnp.bfloat16, shd.make_mesh(2, 4)) == 1  # rows already split over devices
    assert smp.cache_row_groups(64, jnp.bfloat16, shd.make_mesh(1, 8)) == 2


def test_cpu_speed_layouts_change_no_value(monkeypatch):
    """bf16 sampling of 32 rows on CPU runs with the KV cache in two row groups and the decoding
    step's down projection with its transposed weight on the left (speed choices); with both
    turned off every field of the rollout is bit for bit the same."""
    model = smp.sync_weights(_model(), jnp.bfloat16)
    prompts = _prompts(PROMPT_LENGTHS * 5 + (4, 12))
    cfg = smp.SamplingConfig(max_new_tokens=N_NEW, temperature=1.0, top_p=0.9, prompt_bucket=16,
                             cache_segment=4, return_entropy=True)
    assert len(prompts) == 32 and smp.cache_row_groups(32, jnp.bfloat16) == 2
    assert decoder._left_down_projection(32, jnp.bfloat16)
    try:
        fast = smp.generate(model, prompts, jax.random.key(3), cfg)
        monkeypatch.setattr(smp, "_CPU_ROW_GROUPS", 1)
        monkeypatch.setattr(decoder, "_LEFT_DOWN_MIN_ROWS", 1 << 30)
        smp._compiled.cache_clear()  # the program is cached per (model, cfg, mesh)
        plain = smp.generate(model, prompts, jax.random.key(3), cfg)
    finally:
        smp._compiled.cache_clear()
    for name, a in vars(fast).items():
        np.testing.assert_array_equal(np.asarray(a), np.asarray(getattr(plain, name)), err_msg=name)


def test_row_grouped_cache_on_a_model_axis_mesh():
    """A (1, 8) mesh keeps every row on each device, so a bf16 batch of 32 takes the two-group
    cache there too, laid out over the model axis: the same greedy tokens as one device."""
    model = _model(n_heads=8, n_kv_heads=8, head_dim=8)
    prompts = _prompts(PROMPT_LENGTHS * 5 + (4, 12))
    cfg = smp.SamplingConfig(max_new_tokens=N_NEW, temperature=0.0, prompt_bucket=16, cache_segment=4)
    ref = smp.generate(smp.sync_weights(model, jnp.bfloat16), prompts, jax.random.key(0), cfg)
    mesh = shd.make_mesh(1, 8)
    assert smp.cache_row_groups(32, jnp.bfloat16, mesh) == 2
    out = smp.generate(smp.sync_weights(model, jnp.bfloat16, mesh), prompts, jax.random.key(0), cfg, mesh=mesh)
    np.testing.assert_array_equal(np.asarray(out.tokens_BT), np.asarray(ref.tokens_BT))
    # bf16 activations: a partial sum taken in another order may round one bf16 ulp (2^-8)
    # differently; the log-probs stay well inside that.
    np.testing.assert_allclose(np.asarray(out.logp_BT), np.asarray(ref.logp_BT), rtol=0, atol=1e-2)


def _runs(prompts, group):
    """Each prompt ``group`` times in a row: a GRPO batch."""
    return [p for p in prompts for _ in range(group)]


@pytest.fixture
def repeats(monkeypatch):
    """Counts the traced programs that prefill once per run (``_repeat_rows``); recompiles."""
    calls = []
    real = smp._repeat_rows
    monkeypatch.setattr(smp, "_repeat_rows", lambda *a: calls.append(a[1:]) or real(*a))
    smp._compiled.cache_clear()
    yield calls
    smp._compiled.cache_clear()


@pytest.mark.parametrize("dtype,n_prompts,group,prefills", [
    (jnp.float32, 3, 4, 4),    # 12 rows, padded to 16: four runs, the last one batch padding
    (jnp.float32, 3, 3, 16),   # 9 rows, padded to 16: no whole runs, every row prefilled
    (jnp.bfloat16, 8, 4, 8),   # 32 rows: 8 prefilled into one cache group, repeated into two
])
def test_group_prefill_samples_what_every_row_prefilled_does(repeats, dtype, n_prompts, group, prefills):
    model = smp.sync_weights(_model(), dtype)
    prompts = _runs(_prompts((PROMPT_LENGTHS + (4, 12))[:n_prompts]), group)
    temperature = 1.0 if dtype == jnp.float32 else 0.0
    cfg = smp.SamplingConfig(max_new_tokens=N_NEW, temperature=temperature, top_p=0.9, prompt_bucket=16,
                             cache_segment=4, return_entropy=True)
    every_row = smp.generate(model, prompts, jax.random.key(5), cfg)
    assert not repeats
    grouped = smp.generate(model, prompts, jax.random.key(5), cfg, group=group)
    rows = smp.batch_rows(len(prompts))  # the batch bucket
    assert [(times, smp.cache_row_groups(rows, dtype)) for times, _ in repeats] == (
        [] if prefills == rows else [(rows // prefills, smp.cache_row_groups(rows, dtype))])
    # Every row still draws its own tokens: the runs' responses differ.
    tokens = np.asarray(grouped.tokens_BT)
    if temperature:
        assert len({tuple(t) for t in tokens[:group]}) > 1
    np.testing.assert_array_equal(tokens, np.asarray(every_row.tokens_BT))
    for name in ("valid_BT", "response_mask_BT", "finished_B", "response_lengths_B"):
        np.testing.assert_array_equal(np.asarray(getattr(grouped, name)), np.asarray(getattr(every_row, name)))
    # A prefill of fewer rows may sum its products in another order: float32 within the decode
    # bound; bf16 within one bf16 rounding of an activation, as on a mesh.
    atol = FP32_DECODE_ATOL if dtype == jnp.float32 else 1e-2
    for name in ("logp_BT", "logp_truncated_BT", "log_kept_mass_BT", "entropy_BT"):
        np.testing.assert_allclose(np.asarray(getattr(grouped, name)), np.asarray(getattr(every_row, name)),
                                   rtol=0, atol=atol, err_msg=name)


def test_group_prefill_on_meshes_matches_one_device(repeats):
    model = _model(n_heads=8, n_kv_heads=4, head_dim=8)
    prompts = _runs(_prompts((3, 16, 7, 11)), 4)
    cfg = smp.SamplingConfig(max_new_tokens=N_NEW, temperature=0.0, prompt_bucket=16, cache_segment=4)
    ref = smp.generate(smp.sync_weights(model, jnp.float32), prompts, jax.random.key(0), cfg)
    for data, mdl, grouped in ((2, 4, True), (4, 2, True), (8, 1, False)):  # 4 runs over 8 shards: not whole
        repeats.clear()
        mesh = shd.make_mesh(data, mdl)
        out = smp.generate(smp.sync_weights(model, jnp.float32, mesh), prompts, jax.random.key(0), cfg, mesh=mesh,
                           group=4)
        assert bool(repeats) == grouped, mesh.shape
        np.testing.assert_array_equal(np.asarray(out.tokens_BT), np.asarray(ref.tokens_BT), err_msg=str(mesh.shape))
        np.testing.assert_allclose(np.asarray(out.logp_BT), np.asarray(ref.logp_BT), rtol=0, atol=1e-5)


def test_group_that_does_not_fit_the_prompts_is_refused(model):
    cfg = smp.SamplingConfig(max_new_tokens=4)
    prompts = _runs(_prompts((3, 5, 2)), 4)
    for bad in (0, -1, 2.0):
        with pytest.raises(ValueError, match="positive int"):
            smp.generate(model, prompts, jax.random.key(0), cfg, group=bad)
    with pytest.raises(ValueError, match="does not divide the batch of 12"):
        smp.generate(model, prompts, jax.random.key(0), cfg, group=5)
    with pytest.raises(ValueError, match="prompt 4 differs from prompt 3"):
        smp.generate(model, prompts, jax.random.key(0), cfg, group=3)
    with pytest.raises(ValueError, match="prompt 1 differs from prompt 0"):
        smp.generate(model, _prompts((3, 5, 2, 7)), jax.random.key(0), cfg, group=2)


def test_cache_sizes_double_up_to_the_budget():
    assert smp.cache_sizes(128, 64) == (64, 128)
    assert smp.cache_sizes(512, 64) == (64, 128, 256, 512)
    assert smp.cache_sizes(100, 16) == (16, 32, 64, 100)
    assert smp.cache_sizes(10, 64) == (10,)
    assert smp.cache_sizes(10, 0) == (10,)


def test_batch_rows_pad_to_the_fewer_of_a_power_of_two_and_a_multiple_of_eight(model):
    """40 evaluation prompts run as 40 rows (a power of two would make it 64); 3 as 4 (a multiple
    of 8 would make it 8); on a (4, 1) mesh 4 stay 4; on a (6, 1) mesh 20 pad to 24, a multiple of
    both 8 and 6 (a power of two then rounded to 6 would make it 36)."""
    cfg = smp.SamplingConfig(max_new_tokens=4, temperature=0.0, prompt_bucket=16)
    for n, mesh, rows in ((40, None, 40), (3, None, 4), (9, None, 16), (16, None, 16), (4, shd.make_mesh(4, 1), 4),
                          (20, shd.make_mesh(6, 1), 24)):
        tokens = smp._prepare(model, _prompts((5,) * n), cfg, mesh)[2]
        assert tokens.shape[0] == rows, (n, rows)


def test_response_bucket_is_the_cache_size_the_loop_ended_in():
    cfg = smp.SamplingConfig(max_new_tokens=100, cache_segment=16)  # sizes 16, 32, 64, 100
    assert [smp.response_bucket(n, cfg) for n in (0, 1, 16, 17, 32, 33, 64, 65, 100)] == \
        [16, 16, 16, 32, 32, 64, 64, 100, 100]
    assert smp.response_bucket(7, dataclasses.replace(cfg, cache_segment=0)) == 100
    for bad in (-1, 101):
        with pytest.raises(ValueError, match="must lie in"):
            smp.response_bucket(bad, cfg)


def test_trimmed_rollout_keeps_every_response_column(model):
    """A rollout whose replies end early (EOS ids that greedy decoding emits mid-way), trimmed to
    its longest reply: the same arrays without the all-padding columns; too narrow a width is
    refused, not cut."""
    base = dict(max_new_tokens=N_NEW, temperature=0.0, prompt_bucket=16)
    first = smp.generate(model, _prompts(), jax.random.key(0), smp.SamplingConfig(**base))
    eos = tuple(np.unique(np.asarray(first.tokens_BT)[:, first.prompt_width + 3]).tolist())  # every row ends by 4
    rollout = smp.generate(model, _prompts(), jax.random.key(0), smp.SamplingConfig(**base, eos_ids=eos))
    longest = int(np.asarray(rollout.response_lengths_B).max())
    assert longest < N_NEW
    end = rollout.prompt_width + longest
    trimmed = rollout.trimmed(longest)
    for f in dataclasses.fields(rollout):
        got, full = getattr(trimmed, f.name), getattr(rollout, f.name)
        want = np.asarray(full)[:, :end] if f.name.endswith("_BT") else np.asarray(full)
        np.testing.assert_array_equal(np.asarray(got), want, f.name)
        if f.name.endswith("_BT"):  # nothing but padding (pad_id 0, zeros, False) was dropped
            assert not np.asarray(full)[:, end:].any(), f.name
    assert trimmed.prompt_width == rollout.prompt_width
    assert rollout.trimmed(N_NEW) is rollout
    with pytest.raises(ValueError, match=f"cut responses of up to {longest} tokens"):
        rollout.trimmed(longest - 1)
    for bad in (0, N_NEW + 1, True):
        with pytest.raises(ValueError, match="must be an int in"):
            rollout.trimmed(bad)


@pytest.mark.parametrize("with_eos", [False, True])
def test_growing_cache_decodes_like_one_allocation(model, with_eos):
    """cache_segment=3 (cache grown at 3, 6 and 9 response tokens) against one allocation: the
    extra slots of the bigger cache are masked, so only summation order over exact zeros differs."""
    base = dict(max_new_tokens=N_NEW, temperature=0.0, prompt_bucket=16)
    if with_eos:  # a token greedy decoding emits mid-way: rows stop inside different segments
        first = smp.generate(model, _prompts(), jax.random.key(0), smp.SamplingConfig(**base))
        base["eos_ids"] = (int(np.asarray(first.tokens_BT)[0, first.prompt_width + 4]),)
    whole = smp.generate(model, _prompts(), jax.random.key(0), smp.SamplingConfig(**base, cache_segment=0))
    grown = smp.generate(model, _prompts(), jax.random.key(0), smp.SamplingConfig(**base, cache_segment=3))
    if with_eos:
        assert 0 < int(np.asarray(whole.response_lengths_B).min()) < N_NEW
    for name in ("tokens_BT", "response_mask_BT", "response_lengths_B", "finished_B"):
        np.testing.assert_array_equal(np.asarray(getattr(grown, name)), np.asarray(getattr(whole, name)), name)
    np.testing.assert_allclose(np.asarray(grown.logp_BT), np.asarray(whole.logp_BT), rtol=0, atol=FP32_DECODE_ATOL)


def test_second_call_in_the_same_bucket_compiles_nothing(model, count_compiles):
    cfg = smp.SamplingConfig(max_new_tokens=4, temperature=1.0, prompt_bucket=16)
    with count_compiles() as first:
        jax.block_until_ready(smp.generate(model, _prompts((3, 12, 5)), jax.random.key(0), cfg).tokens_BT)
    assert first.n >= 1  # the counter does see compilations
    with count_compiles() as second:
        # Other prompts, other lengths, same batch size: same buckets (P=16, B=4 padded to 4).
        out = smp.generate(model, _prompts((14, 2, 9), seed=1), jax.random.key(1), cfg)
        jax.block_until_ready(out.tokens_BT)
    assert second.n == 0


def test_precompile_compiles_the_bucket_without_sampling(model, count_compiles):
    """The sampler's program compiles once, in `precompile` (in a thread of its own here, as the
    experiment runs it), and a later `generate` of the bucket compiles no program of its own
    (only, the first time, the small eager slices that cut off the batch padding)."""
    cfg = smp.SamplingConfig(max_new_tokens=5, temperature=1.0, prompt_bucket=16)
    thread = threading.Thread(target=smp.precompile, args=(model, _prompts((3, 12, 5)), cfg))
    with count_compiles() as first:
        thread.start()
        thread.join()
    assert first.names["jit(_generate)"] == 1
    with count_compiles() as second:
        out = smp.generate(model, _prompts((14, 2, 9), seed=1), jax.random.key(1), cfg)
        jax.block_until_ready(out.tokens_BT)
    assert second.names["jit(_generate)"] == 0
    assert out.tokens_BT.shape == (3, 16 + 5) and int(np.asarray(out.response_lengths_B).min()) >= 1


def test_bad_inputs_raise_clear_errors(model):
    cfg = smp.SamplingConfig(max_new_tokens=4)
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="empty batch"):
        smp.generate(model, [], key, cfg)
    with pytest.raises(ValueError, match="context"):
        smp.generate(model, [[1] * 510], key, cfg)  # 510 + 4 > max_seq_len 512
    with pytest.raises(ValueError, match="context"):
        smp.generate(model, [[1, 2]], key, smp.SamplingConfig(max_new_tokens=512))
    for bad in (0, -3):
        with pytest.raises(ValueError, match="max_new_tokens"):
            smp.SamplingConfig(max_new_tokens=bad)
    with pytest.raises(ValueError, match="temperature"):
        smp.SamplingConfig(max_new_tokens=4, temperature=-0.5)
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="top_p"):
            smp.SamplingConfig(max_new_tokens=4, top_p=bad)
    with pytest.raises(ValueError, match="cache_segment"):
        smp.SamplingConfig(max_new_tokens=4, cache_segment=-1)
    for bad in ("int8", "float64", "fp8"):
        with pytest.raises(ValueError):
            smp.sync_weights(model, bad)
    mesh = shd.make_mesh(2, 4)  # tiny_config has 4 query heads but only 2 KV heads
    with pytest.raises(ValueError, match="divisible"):
        smp.sync_weights(model, jnp.float32, mesh)
    with pytest.raises(ValueError, match="divisible"):
        smp.generate(model, [[1, 2, 3]], key, cfg, mesh=mesh)
