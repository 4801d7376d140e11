"""Tests for rl_mismatch.losses and rl_mismatch.corrections against hand-computed cases, a
float64 NumPy reference and, for the correction presets, the implementation they replaced."""

import functools
import importlib.util
import itertools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rl_mismatch.corrections import (Correction, ISWeight, Reject, parse_correction, resolve as _correction)
from rl_mismatch.losses import (CorrectionConfig, LossConfig, compute_advantages, compute_policy_loss,
                                is_batch_mean, loss_normalizer)

# The JAX code runs in float32 on float32 inputs; the reference runs in float64 on the same
# values. Each loss is a few dozen float32 operations over ≤ 12 tokens of O(1) magnitude
# (rounding ≈ 6e-8 each), so agreement to 1e-5 relative leaves ample headroom, while any
# formula error (a wrong clip side, normaliser or weight) is O(0.01) or larger.
RTOL, ATOL = 1e-5, 1e-6

# One config per correction preset, thresholds chosen so that on `_batch()` each clips or
# masks some but not all units (asserted in test_reference_data_exercises_every_branch).
CORRECTIONS = {
    "none": CorrectionConfig("none"),
    "bypass": CorrectionConfig("bypass"),
    "token_tis": CorrectionConfig("token_tis", high=1.2),
    "token_mis": CorrectionConfig("token_mis", low=0.7, high=1.3),
    "seq_tis": CorrectionConfig("seq_tis", high=1.5),
    "seq_mis": CorrectionConfig("seq_mis", low=0.7, high=1.5),
    "seq_mis_one_sided": CorrectionConfig("seq_mis", high=1.2),
    "geo_mask": CorrectionConfig("geo_mask", low=0.95, high=1.05),
    "token_k3": CorrectionConfig("token_k3", high=0.02),
    "seq_k3": CorrectionConfig("seq_k3", high=0.03),
}
# Composed corrections: every criterion, each weighting (batch-normalised too), parts of mixed
# levels, several criteria at once, and bypass with rejection. Every truncation C ≥ 1 and every
# ratio bound brackets 1, so that ρ = 1 passes everything (test_rho_one_reduces_to_plain_loss).
COMBOS = {name: parse_correction(spec) for name, spec in {
    "token_k2": "token_k2(0.02)",
    "seq_sum_k2": "seq_sum_k2(0.2)",
    "seq_sum_k3": "seq_sum_k3(0.2)",
    "seq_mean_k2": "seq_mean_k2(0.03)",
    "seq_max_k2": "seq_max_k2(0.1)",
    "seq_max_k3": "seq_max_k3(0.1)",
    "geo+token_is": "geo_ratio(0.95, 1.05) + token_is(1.2)",
    "seq_k3+seq_is": "seq_is(1.5) + seq_sum_k3(0.2)",
    "token_ratio+seq_max_k2": "token_ratio(0.7, 1.3) + seq_max_k2(0.1)",
    "seq_is+token_k2": "seq_is(1.5) + token_k2(0.02)",
    "token_is_bn+seq_mean_k2": "token_is(1.2, batch_norm) + seq_mean_k2(0.03)",
    "seq_is_bn+token_k3": "seq_is(1.5, batch_norm) + token_k3(0.02)",
    "four": "token_is(1.2) + token_ratio(1.3) + seq_ratio(0.58, 1.5) + seq_max_k3(0.1)",
    "bypass+geo": "bypass + geo_ratio(0.95, 1.05)",
    "bypass+k": "bypass + token_k3(0.02) + seq_sum_k2(0.2)",
}.items()}
POLICY_LOSSES = ("ppo", "reinforce", "gspo")
AGGREGATIONS = ("token_mean", "seq_mean_token_sum", "seq_mean_token_mean", "seq_mean_token_sum_norm")


@functools.cache
def _legacy():
    """The loss before corrections were composable (tests/legacy_losses.py)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "legacy_losses.py")
    spec = importlib.util.spec_from_file_location("legacy_losses", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)  # its dataclasses resolve their annotations there
    spec.loader.exec_module(sys.modules[spec.name])
    return sys.modules[spec.name]


def _config(policy="ppo", aggregation="token_mean", correction="none", dual_clip=None, cls=LossConfig):
    if isinstance(correction, str):
        correction = {**CORRECTIONS, **COMBOS}[correction]
    return cls(policy_loss=policy, clip_eps_low=0.2, clip_eps_high=0.28, aggregation=aggregation,
               correction=correction, **({"norm_length": 16} if aggregation == "seq_mean_token_sum_norm" else {}),
               **({} if dual_clip is None else {"dual_clip": dual_clip}))


def _batch(seed=0, B=8, T=12):
    """A rollout batch with trainer/old/sampler disagreement and garbage in the padding."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, T + 1, size=B)
    lengths[3] = 0  # an empty row: must not count in the sequence normalisers
    mask = np.arange(T)[None, :] < lengths[:, None]
    old = np.log(rng.uniform(0.05, 1.0, size=(B, T)))
    logp = old + 0.3 * rng.standard_normal((B, T))  # π_θ ≠ π_old so PPO clipping happens
    samp = old + 0.25 * rng.standard_normal((B, T))  # μ ≠ π_old so corrections act
    adv = rng.standard_normal(B)
    f32 = lambda x: x.astype(np.float32)  # noqa: E731
    logp, old, samp, adv = f32(logp), f32(old), f32(samp), f32(adv)
    # Padding holds values that would poison a careless implementation.
    logp[~mask], old[~mask] = -np.inf, np.nan
    samp[~mask] = np.inf
    return logp, old, samp, adv, mask


# ------------------------------ independent NumPy reference ------------------------------

# Decisions (truncate or not, reject or not) are made on float32 values here and on float64
# values in the reference. Each statistic is a few float32 operations on O(1) numbers (error
# ≲ 1e-6 relative), so a unit closer than 1e-4 (relative) to its threshold could flip; the
# reference asserts that none is, so that the comparisons below cannot depend on rounding.
_MARGIN = 1e-4


def _far(stat, threshold, what):
    stat = np.asarray(stat, np.float64)
    gap = np.abs(stat - threshold) / max(abs(threshold), 1e-12)
    assert np.all(gap[np.isfinite(stat)] > _MARGIN), f"{what}: a unit within {_MARGIN} of {threshold}"


def _np_keep(reject, r):
    """One criterion's keep flags for one sequence's tokens (float64 log-ratios r)."""
    name, low, high = reject.criterion, reject.low or 0.0, reject.high
    rho, n = np.exp(r), len(r)
    if name in ("token_ratio", "seq_ratio", "geo_ratio"):
        x = {"token_ratio": rho, "seq_ratio": np.full(n, np.prod(rho)),
             "geo_ratio": np.full(n, np.exp(np.mean(r)) if n else 1.0)}[name]
        for t in (low, high):
            if t > 0:
                _far(x, t, name)
        return (x >= low) & (x <= high)
    k = 0.5 * r**2 if name.endswith("k2") else rho - 1 - r  # float64: no cancellation worth fearing here
    stat = {"token": k, "seq_sum": np.full(n, k.sum()), "seq_mean": np.full(n, k.mean() if n else 0.0),
            "seq_max": np.full(n, k.max() if n else 0.0)}[name.rsplit("_", 1)[0]]
    _far(stat, high, name)
    return stat <= high


def _np_weights(corr, logp, old, samp, mask):
    """Per-token weights [B, T] and every is/ metric of a `Correction`, float64, row by row."""
    B, T = mask.shape
    rows = [np.flatnonzero(mask[i]) for i in range(B)]
    r_rows = [((logp if corr.bypass else old)[i, idx].astype(np.float64) - samp[i, idx].astype(np.float64))
              for i, idx in enumerate(rows)]
    nonempty = [i for i in range(B) if len(rows[i])]
    metrics = {}
    # IS weighting: per token v, its truncation flags, and the raw ratios of its units.
    v = [np.ones(len(r)) for r in r_rows]
    clipped = [np.zeros(len(r), bool) for r in r_rows]
    w_is = corr.weight
    if w_is is not None:
        if w_is.level == "token":
            raw = [np.exp(r) for r in r_rows]
            units = np.concatenate(raw)
        else:
            raw = [np.full(len(r), np.exp(r.sum())) for r in r_rows]
            units = np.array([raw[i][0] for i in nonempty])
        _far(units, w_is.high, "IS truncation")
        v = [np.minimum(x, w_is.high) for x in raw]
        clipped = [x > w_is.high for x in raw]
        metrics.update({"is/raw_ratio_mean": units.mean(), "is/raw_ratio_std": units.std(),
                        "is/raw_ratio_min": units.min(), "is/raw_ratio_max": units.max()})
        if w_is.batch_normalize:
            trunc = np.minimum(units, w_is.high)
            v = [x / trunc.mean() for x in v]
            metrics["is/batch_norm_mean"] = trunc.mean()
    # Rejection: each criterion on its own, then all together.
    keep = [np.ones(len(r), bool) for r in r_rows]
    n_tok, n_seq = mask.sum(), len(nonempty)
    for reject in corr.reject:
        k = [_np_keep(reject, r) for r in r_rows]
        prefix = f"is/reject/{reject.criterion}"
        metrics[f"{prefix}/token_frac"] = sum((~x).sum() for x in k) / n_tok
        metrics[f"{prefix}/seq_frac"] = sum(not k[i].any() for i in nonempty) / n_seq
        if reject.level == "token":
            metrics[f"{prefix}/seq_touched_frac"] = sum((~k[i]).any() for i in nonempty) / n_seq
        keep = [a & b for a, b in zip(keep, k)]
    w = [x * k for x, k in zip(v, keep)]
    # Statistics of the applied weights, over sequences if every part acts on sequences.
    levels = [x.level for x in corr.reject] + ([w_is.level] if w_is else [])
    if levels and all(level == "sequence" for level in levels):
        pick = lambda xs: np.array([xs[i][0] for i in nonempty])  # noqa: E731
    else:
        pick = lambda xs: np.concatenate(xs)  # noqa: E731
    u, c, m = pick(w), pick([a & b for a, b in zip(clipped, keep)]), pick([~k for k in keep])
    metrics.update({
        "is/weight_mean": u.mean(), "is/weight_std": u.std(), "is/weight_max": u.max(),
        "is/frac_clipped": c.mean(), "is/frac_masked": m.mean(),
        "is/masked_token_frac": sum((~k).sum() for k in keep) / n_tok,
        "is/ess": 0.0 if not np.any(u) else u.mean() ** 2 / np.mean(u**2),
    })
    w_BT = np.zeros((B, T))
    for i, idx in enumerate(rows):
        w_BT[i, idx] = w[i]
    return w_BT, metrics


def _np_loss(cfg, logp, old, samp, adv, mask):
    """Reference loss, d loss / d logp and metrics, float64, one sequence at a time."""
    corr = _correction(cfg.correction)
    w, metrics = _np_weights(corr, logp, old, samp, mask)
    lo, hi = 1 - cfg.clip_eps_low, 1 + cfg.clip_eps_high
    B, T = logp.shape
    total, count = 0.0, 0
    terms = []  # (row, its token indices, d loss_t / d logp_t before /N)
    ratios, clip_flags, dual_flags = [], [], []
    for i in range(B):
        idx = mask[i]
        n = idx.sum()
        if n == 0:
            continue
        lp = logp[i, idx].astype(np.float64)
        ref = (samp if corr.bypass else old)[i, idx].astype(np.float64)
        a = float(adv[i])
        if cfg.policy_loss == "gspo":
            q = np.full(n, np.exp(np.mean(lp - ref)))
        else:
            q = np.exp(lp - ref)
        if cfg.policy_loss == "reinforce":
            pg, dpg, clip, dual = -q * a, -q * a, np.zeros(n, bool), np.zeros(n, bool)
        else:
            pg = -np.minimum(q * a, np.clip(q, lo, hi) * a)
            clip = ((a > 0) & (q > hi)) | ((a < 0) & (q < lo))
            dual = np.zeros(n, bool)
            if cfg.dual_clip and a < 0:  # off: 0 (None in the legacy config)
                _far(q, cfg.dual_clip, "dual clip")
                dual = q > cfg.dual_clip
                pg = np.minimum(pg, -cfg.dual_clip * a)
            dpg = np.where(clip | dual, 0.0, -q * a)  # d pg_t / d logp_t (GSPO-token: ∇q_t = s_i ∇logp_t)
        ratios += list(q)
        clip_flags += list(clip)
        dual_flags += list(dual)
        coef = {"token_mean": 1.0, "seq_mean_token_sum": 1.0, "seq_mean_token_mean": 1.0 / n,
                "seq_mean_token_sum_norm": 1.0 / (cfg.norm_length or 1)}[cfg.aggregation]
        total += coef * np.sum(w[i, idx] * pg)
        count += n if cfg.aggregation == "token_mean" else 1
        terms.append((i, idx, coef * w[i, idx] * dpg))
    loss = total / count
    grad = np.zeros((B, T))
    for i, idx, g in terms:
        grad[i, idx] = g / count
    metrics.update({"loss/policy": loss, "loss/clip_frac": np.mean(clip_flags),
                    "loss/ratio_mean": np.mean(ratios), "loss/ratio_max": np.max(ratios)})
    if cfg.dual_clip:
        metrics["loss/dual_clip_frac"] = np.mean(dual_flags)
    return loss, grad, metrics


def _grads(cfg, logp, old, samp, adv, mask):
    fn = lambda lp, o, s, a: compute_policy_loss(lp, o, s, a, mask, cfg)  # noqa: E731
    (loss, metrics), grads = jax.value_and_grad(fn, argnums=(0, 1, 2, 3), has_aux=True)(
        jnp.asarray(logp), jnp.asarray(old), jnp.asarray(samp), jnp.asarray(adv))
    return loss, metrics, grads


# ------------------------------------------ tests -----------------------------------------


def test_reference_data_exercises_every_branch():
    """Guards the comparisons below against being vacuous: each correction acts on _batch()."""
    logp, old, samp, adv, mask = _batch()
    for name in ("token_tis", "seq_tis"):
        frac = _np_weights(_correction(CORRECTIONS[name]), logp, old, samp, mask)[1]["is/frac_clipped"]
        assert 0 < frac < 1, (name, frac)
    for name in ("token_mis", "seq_mis", "seq_mis_one_sided", "geo_mask", "token_k3", "seq_k3"):
        frac = _np_weights(_correction(CORRECTIONS[name]), logp, old, samp, mask)[1]["is/frac_masked"]
        assert 0 < frac < 1, (name, frac)
    for name, corr in COMBOS.items():  # every criterion rejects some, not all, units
        metrics = _np_weights(corr, logp, old, samp, mask)[1]
        for reject in corr.reject:
            frac = metrics[f"is/reject/{reject.criterion}/token_frac"]
            assert 0 < frac < 1, (name, reject.criterion, frac)
    clip = _np_loss(_config("ppo"), logp, old, samp, adv, mask)[2]["loss/clip_frac"]
    assert 0 < clip < 1
    clip = _np_loss(_config("gspo", correction="bypass"), logp, old, samp, adv, mask)[2]["loss/clip_frac"]
    assert 0 < clip < 1
    for policy in ("ppo", "gspo"):
        dual = _np_loss(_config(policy, correction="bypass", dual_clip=1.5), logp, old, samp, adv, mask)[2]
        assert 0 < dual["loss/dual_clip_frac"] < dual["loss/clip_frac"] + 1, policy


def _assert_matches_reference(cfg, batch, msg):
    logp, old, samp, adv, mask = batch
    loss, metrics, (g_logp, g_old, g_samp, g_adv) = _grads(cfg, logp, old, samp, adv, mask)
    ref_loss, ref_grad, ref_metrics = _np_loss(cfg, logp, old, samp, adv, mask)
    np.testing.assert_allclose(loss, ref_loss, rtol=RTOL, atol=ATOL, err_msg=msg)
    np.testing.assert_allclose(g_logp, ref_grad, rtol=RTOL, atol=ATOL, err_msg=msg)
    # Gradient flows only through log π_θ: old policy, sampler and advantages are constants.
    for g in (g_old, g_samp, g_adv):
        np.testing.assert_array_equal(g, 0.0, err_msg=msg)
    assert set(metrics) == set(ref_metrics), (msg, set(metrics) ^ set(ref_metrics))
    for key, ref in ref_metrics.items():
        np.testing.assert_allclose(metrics[key], ref, rtol=RTOL, atol=ATOL, err_msg=f"{msg} {key}")


@pytest.mark.parametrize("correction", sorted(CORRECTIONS) + sorted(COMBOS))
def test_matches_numpy_reference(correction):
    """Loss, d loss/d logp and every metric, for every policy loss × aggregation."""
    batch = _batch()
    for policy, aggregation in itertools.product(POLICY_LOSSES, AGGREGATIONS):
        _assert_matches_reference(_config(policy, aggregation, correction), batch,
                                  f"{policy}/{aggregation}/{correction}")


@pytest.mark.parametrize("policy", ["ppo", "gspo"])
@pytest.mark.parametrize("correction", ["none", "bypass", "four", "bypass+k"])
def test_dual_clip_matches_numpy_reference(policy, correction):
    for aggregation in ("token_mean", "seq_mean_token_mean"):
        _assert_matches_reference(_config(policy, aggregation, correction, dual_clip=1.5), _batch(),
                                  f"{policy}/{aggregation}/{correction}/dual")


def _bits(x):
    return np.asarray(x).tobytes()


@pytest.mark.parametrize("correction", sorted(CORRECTIONS))
def test_presets_equal_the_single_modes_they_replace_bitwise(correction):
    """Each preset gives the bits the single mode gave: loss, all four gradients and the metrics it
    had. Eagerly for every policy loss × aggregation on the reference batch and on one with
    extreme log-ratios; jitted (one program each) for two of them."""
    legacy = _legacy()
    preset = CORRECTIONS[correction]
    old_mode = legacy.CorrectionConfig(preset.mode, low=preset.low, high=preset.high)
    extreme = list(_batch(seed=4))
    extreme[2] = np.where(np.arange(12) % 2 == 0, extreme[1] - 500.0, extreme[1] + 500.0).astype(np.float32)
    cases = [(batch, policy, aggregation, False) for batch in (_batch(), extreme)
             for policy, aggregation in itertools.product(POLICY_LOSSES, AGGREGATIONS)]
    cases += [(_batch(), "ppo", "token_mean", True), (_batch(), "gspo", "seq_mean_token_mean", True)]
    for (logp, old, samp, adv, mask), policy, aggregation, jit in cases:
        results = []
        for loss_fn, cfg in ((legacy.compute_policy_loss, _config(policy, aggregation, old_mode, cls=legacy.LossConfig)),
                             (compute_policy_loss, _config(policy, aggregation, preset))):
            fn = lambda lp, o, s, a, cfg=cfg, loss_fn=loss_fn: loss_fn(lp, o, s, a, mask, cfg)  # noqa: E731
            fn = jax.value_and_grad(fn, argnums=(0, 1, 2, 3), has_aux=True)
            results.append((jax.jit(fn) if jit else fn)(*map(jnp.asarray, (logp, old, samp, adv))))
        ((old_loss, old_metrics), old_grads), ((loss, metrics), grads) = results
        msg = f"{correction}/{policy}/{aggregation}/{'jit' if jit else 'eager'}"
        assert _bits(loss) == _bits(old_loss), msg
        assert [_bits(g) for g in grads] == [_bits(g) for g in old_grads], msg
        assert set(old_metrics) <= set(metrics), msg
        for key, value in old_metrics.items():
            assert _bits(metrics[key]) == _bits(value), f"{msg} {key}"


def test_presets_are_the_documented_compositions():
    expected = {
        "none": "none", "bypass": "bypass", "token_tis": "token_is(1.2)",
        "token_mis": "token_is(1.3) + token_ratio(0.7, 1.3)", "seq_tis": "seq_is(1.5)",
        "seq_mis": "seq_is(1.5) + seq_ratio(0.7, 1.5)", "seq_mis_one_sided": "seq_is(1.2) + seq_ratio(1.2)",
        "geo_mask": "geo_ratio(0.95, 1.05)", "token_k3": "token_k3(0.02)", "seq_k3": "seq_mean_k3(0.03)"}
    for name, spec in expected.items():
        composed = Correction() if spec == "none" else parse_correction(spec)
        assert CORRECTIONS[name].correction == composed, name
        assert parse_correction(CORRECTIONS[name].mode, CORRECTIONS[name].low, CORRECTIONS[name].high) == composed


def test_gspo_equals_sequence_level_objective():
    """GSPO-token + seq_mean_token_mean has the paper's value and gradient.

    The paper's objective, −(1/G) Σ_i min(s_i A_i, clip(s_i) A_i) with
    s_i = exp(mean_t(log π_θ − log π_old)), differentiated here by central differences in
    float64 (h = 1e-6: truncation error O(h²) ≈ 1e-12, rounding ≈ 1e-16/h ≈ 1e-10).
    """
    logp, old, samp, adv, mask = _batch(seed=1)
    cfg = _config("gspo", "seq_mean_token_mean", "seq_tis")
    w, _ = _np_weights(_correction(cfg.correction), logp, old, samp, mask)
    rows = [i for i in range(mask.shape[0]) if mask[i].any()]

    def objective(lp):
        total = 0.0
        for i in rows:
            idx = mask[i]
            s = np.exp(np.mean(lp[i, idx] - old[i, idx].astype(np.float64)))
            a = float(adv[i])
            total += -w[i, idx][0] * min(s * a, np.clip(s, 0.8, 1.28) * a)
        return total / len(rows)

    base = np.where(mask, logp, 0).astype(np.float64)
    fd = np.zeros_like(base)
    h = 1e-6
    for i, t in zip(*np.nonzero(mask)):
        e = np.zeros_like(base)
        e[i, t] = h
        fd[i, t] = (objective(base + e) - objective(base - e)) / (2 * h)
    loss, _, (g_logp, *_) = _grads(cfg, logp, old, samp, adv, mask)
    np.testing.assert_allclose(loss, objective(base), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(g_logp, fd, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("correction", sorted(CORRECTIONS) + sorted(COMBOS))
def test_rho_one_reduces_to_plain_loss(correction):
    """With ρ = 1 every weight is exp(0) = 1 exactly and nothing is rejected, so loss and gradient
    are bit-identical to the uncorrected loss (thresholds bracket 1: see COMBOS). ρ is π_old/μ,
    or π_θ/μ in bypass mode, where π_θ = μ makes the plain loss's ratio 1 as well."""
    corr = _correction(_config(correction=correction).correction)
    logp, old, _, adv, mask = _batch(seed=2)
    if corr.bypass:
        logp = old
    for policy, aggregation in itertools.product(POLICY_LOSSES, ("token_mean", "seq_mean_token_mean")):
        plain_loss, _, plain_grads = _grads(_config(policy, aggregation, "none"), logp, old, old, adv, mask)
        loss, metrics, grads = _grads(_config(policy, aggregation, correction), logp, old, old, adv, mask)
        np.testing.assert_array_equal(loss, plain_loss)
        np.testing.assert_array_equal(grads[0], plain_grads[0])
        assert float(metrics["is/ess"]) == 1.0 and float(metrics["is/frac_masked"]) == 0.0
        assert all(float(v) == 0.0 for k, v in metrics.items() if k.startswith("is/reject/"))


def test_ppo_hand_computed():
    """ratios [1.5, 0.5] with A = +1 and A = −1, ε = 0.2, token mean over 4 tokens.

    A=+1: −min(1.5, 1.2) = −1.2 (clipped, no grad); −min(0.5, 0.8) = −0.5 (grad −0.5).
    A=−1: −min(−1.5, −1.2) = 1.5 (grad +1.5);       −min(−0.5, −0.8) = 0.8 (clipped).
    loss = (−1.2 − 0.5 + 1.5 + 0.8)/4 = 0.15; grad = [[0, −0.5], [1.5, 0]]/4.
    """
    old = jnp.log(jnp.full((2, 2), 0.4))
    logp = old + jnp.log(jnp.array([[1.5, 0.5], [1.5, 0.5]]))
    cfg = LossConfig(clip_eps_low=0.2, clip_eps_high=0.2)
    loss, metrics, (g, *_) = _grads(cfg, logp, old, old, jnp.array([1.0, -1.0]), np.ones((2, 2), bool))
    np.testing.assert_allclose(loss, 0.15, rtol=1e-6)
    np.testing.assert_allclose(g, [[0.0, -0.125], [0.375, 0.0]], rtol=1e-6, atol=1e-7)
    assert float(metrics["loss/clip_frac"]) == 0.5


@pytest.mark.parametrize("aggregation,expected", [
    ("token_mean", -7 / 4), ("seq_mean_token_sum", -7 / 2), ("seq_mean_token_mean", -3 / 2),
    ("seq_mean_token_sum_norm", -7 / 8)])
def test_aggregation_hand_computed(aggregation, expected):
    """REINFORCE at ratio 1: l = −A per token. Row 0: A=1, 1 token; row 1: A=2, 3 tokens; row 2 empty."""
    mask = np.array([[1, 0, 0], [1, 1, 1], [0, 0, 0]], bool)
    lp = jnp.full((3, 3), -1.0)
    cfg = LossConfig(policy_loss="reinforce", aggregation=aggregation,
                     norm_length=4 if aggregation == "seq_mean_token_sum_norm" else 0)
    loss, _ = compute_policy_loss(lp, lp, lp, jnp.array([1.0, 2.0, 5.0]), mask, cfg)
    np.testing.assert_allclose(loss, expected, rtol=1e-6)


def test_sequence_corrections_hand_computed():
    """Row 0: Π ρ = 2·1.5 = 3; row 1: Π ρ = 1.5·1 = 1.5 (ρ = π_old/μ)."""
    old = jnp.log(jnp.array([[0.6, 0.3], [0.3, 0.2]]))
    samp = jnp.log(jnp.array([[0.3, 0.2], [0.2, 0.2]]))
    mask, adv = np.ones((2, 2), bool), jnp.array([1.0, 1.0])

    def run(correction):
        cfg = LossConfig(policy_loss="reinforce", aggregation="seq_mean_token_mean", correction=correction)
        return compute_policy_loss(old, old, samp, adv, mask, cfg)

    loss, m = run(CorrectionConfig("seq_mis", high=2.0))  # row 0 masked, row 1 weight 1.5
    np.testing.assert_allclose(loss, -(0 + 1.5) / 2, rtol=1e-6)
    assert float(m["is/frac_masked"]) == 0.5 and float(m["is/masked_token_frac"]) == 0.5
    loss, m = run(CorrectionConfig("seq_tis", high=2.0))  # weights 2 (clipped) and 1.5
    np.testing.assert_allclose(loss, -(2 + 1.5) / 2, rtol=1e-6)
    np.testing.assert_allclose(m["is/ess"], 3.5**2 / 4 / ((4 + 2.25) / 2), rtol=1e-6)
    # Geometric means: sqrt(3) ≈ 1.73 (masked), sqrt(1.5) ≈ 1.22 (kept).
    loss, _ = run(CorrectionConfig("geo_mask", low=0.5, high=1.5))
    np.testing.assert_allclose(loss, -(0 + 1) / 2, rtol=1e-6)


def test_token_k3_hand_computed():
    """ρ = 2: k3 = 1 − ln 2 ≈ 0.307 (rejected at δ = 0.1); ρ = 1.1: k3 ≈ 0.0047 (kept)."""
    old = jnp.log(jnp.array([[0.4, 0.44]]))
    samp = jnp.log(jnp.array([[0.2, 0.4]]))
    cfg = LossConfig(policy_loss="reinforce", correction=CorrectionConfig("token_k3", high=0.1))
    loss, m = compute_policy_loss(old, old, samp, jnp.array([1.0]), np.ones((1, 2), bool), cfg)
    np.testing.assert_allclose(loss, -0.5, rtol=1e-6)
    assert float(m["is/frac_masked"]) == 0.5


def test_k3_is_accurate_for_tiny_log_ratios():
    """r = 1e-4: k3 = 5.0e-9 (kept at δ = 1.5e-8); r = 2e-4: k3 = 2.0e-8 (rejected).

    Computed naively as exp(r) − 1 − r in float32, the first comes out ≈ 1.7e-8 and would be
    rejected too; the series form is accurate to float32 rounding here.
    """
    old = jnp.log(jnp.array([[0.5, 0.5]]))
    samp = old - jnp.array([[1e-4, 2e-4]])
    cfg = LossConfig(policy_loss="reinforce", correction=CorrectionConfig("token_k3", high=1.5e-8))
    loss, m = compute_policy_loss(old, old, samp, jnp.array([1.0]), np.ones((1, 2), bool), cfg)
    np.testing.assert_allclose(loss, -0.5, rtol=1e-6)
    assert float(m["is/frac_masked"]) == 0.5


def test_criterion_statistics_hand_computed():
    """Row 0: ρ = [2, 1, 1]; row 1: ρ = [2]; row 2: ρ = [1, 1]; row 3 empty (never counted).

    token_ratio(0.5, 1.5) rejects the two tokens with ρ = 2: 2/6 of the tokens; it empties row 1
    only (1/3 of the sequences) and touches rows 0 and 1 (2/3). seq_max_k2(0.1) rejects the rows
    holding a k2 = (ln 2)²/2 ≈ 0.24: rows 0 and 1, 4/6 of the tokens, 2/3 of the sequences.
    """
    mask = np.array([[1, 1, 1], [1, 0, 0], [1, 1, 0], [0, 0, 0]], bool)
    old = jnp.log(jnp.full((4, 3), 0.4))
    samp = old - jnp.log(jnp.array([[2.0, 1, 1], [2, 1, 1], [1, 1, 1], [1, 1, 1]]))
    cfg = LossConfig(policy_loss="reinforce", correction=parse_correction("token_ratio(0.5, 1.5) + seq_max_k2(0.1)"))
    loss, m = compute_policy_loss(old, old, samp, jnp.ones(4), mask, cfg)
    expected = {"is/reject/token_ratio/token_frac": 2 / 6, "is/reject/token_ratio/seq_frac": 1 / 3,
                "is/reject/token_ratio/seq_touched_frac": 2 / 3, "is/reject/seq_max_k2/token_frac": 4 / 6,
                "is/reject/seq_max_k2/seq_frac": 2 / 3, "is/masked_token_frac": 4 / 6, "is/frac_masked": 4 / 6}
    for key, value in expected.items():
        np.testing.assert_allclose(m[key], value, rtol=1e-6, err_msg=key)
    assert "is/reject/seq_max_k2/seq_touched_frac" not in m and "is/raw_ratio_mean" not in m
    np.testing.assert_allclose(loss, -2 / 6, rtol=1e-6)  # the two tokens of row 2 remain, N = 6


def test_batch_normalised_weights_hand_computed():
    """Token ρ = [4, 1, 0.5] truncated at C = 2: v = [2, 1, 0.5], mean 7/6, so w = [12/7, 6/7, 3/7];
    the raw-ratio statistics are of [4, 1, 0.5], before truncation."""
    old = jnp.log(jnp.array([[0.4, 0.4, 0.4]]))
    samp = old - jnp.log(jnp.array([[4.0, 1.0, 0.5]]))
    cfg = LossConfig(policy_loss="reinforce", correction=parse_correction("token_is(2, batch_norm)"))
    loss, m = compute_policy_loss(old, old, samp, jnp.ones(1), np.ones((1, 3), bool), cfg)
    np.testing.assert_allclose(loss, -(12 + 6 + 3) / 7 / 3, rtol=1e-6)
    np.testing.assert_allclose([m["is/batch_norm_mean"], m["is/weight_mean"], m["is/weight_max"]],
                               [7 / 6, 1.0, 12 / 7], rtol=1e-6)
    raw = np.array([4.0, 1.0, 0.5])
    np.testing.assert_allclose([m[f"is/raw_ratio_{k}"] for k in ("mean", "std", "min", "max")],
                               [raw.mean(), raw.std(), 0.5, 4.0], rtol=1e-6)
    assert float(m["is/frac_clipped"]) == pytest.approx(1 / 3)


def test_dual_clip_hand_computed():
    """A = −1 and ratios [4, 2, 0.5], ε = 0.2, c = 3: pg = [min(4, 3), 2, 0.8] = [3, 2, 0.8].

    The first is capped by the dual clip (no gradient), the last by the ordinary clip; the
    middle one keeps its gradient d(−q·A)/d log π = q = 2. Without dual clip the first is 4."""
    old = jnp.log(jnp.full((1, 3), 0.1))
    logp = old + jnp.log(jnp.array([[4.0, 2.0, 0.5]]))
    mask, adv = np.ones((1, 3), bool), jnp.array([-1.0])
    cfg = LossConfig(clip_eps_low=0.2, clip_eps_high=0.2, dual_clip=3.0)
    loss, m, (g, *_) = _grads(cfg, logp, old, old, adv, mask)
    np.testing.assert_allclose(loss, (3 + 2 + 0.8) / 3, rtol=1e-6)
    np.testing.assert_allclose(g, [[0.0, 2 / 3, 0.0]], rtol=1e-6, atol=1e-7)
    assert float(m["loss/dual_clip_frac"]) == pytest.approx(1 / 3) and float(m["loss/clip_frac"]) == pytest.approx(1 / 3)
    loss, m = compute_policy_loss(logp, old, old, adv, mask, LossConfig(clip_eps_low=0.2, clip_eps_high=0.2))
    np.testing.assert_allclose(loss, (4 + 2 + 0.8) / 3, rtol=1e-6)
    assert "loss/dual_clip_frac" not in m  # off by default


def test_bypass_rejection_acts_on_the_current_policy_against_the_sampler():
    """In bypass mode old_logp is unused: criteria see log π_θ − log μ (here ρ = 2 on one token)."""
    logp = jnp.log(jnp.array([[0.4, 0.2]]))
    samp = jnp.log(jnp.array([[0.2, 0.2]]))
    cfg = LossConfig(policy_loss="reinforce", correction=parse_correction("bypass + token_ratio(0.5, 1.5)"))
    garbage = jnp.full((1, 2), jnp.nan)
    _, m = compute_policy_loss(logp, garbage, samp, jnp.ones(1), np.ones((1, 2), bool), cfg)
    assert float(m["is/reject/token_ratio/token_frac"]) == 0.5


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_micro_batches_sum_to_full_batch(aggregation):
    """With the full-batch normaliser, micro-batch losses (and grads) sum to the full-batch ones."""
    logp, old, samp, adv, mask = _batch(seed=3)
    cfg = _config("ppo", aggregation, "token_tis")
    full_loss, _, full_grads = _grads(cfg, logp, old, samp, adv, mask)
    n = loss_normalizer(mask, cfg)
    parts = [jax.value_and_grad(lambda lp, s=s: compute_policy_loss(
        lp, old[s], samp[s], adv[s], mask[s], cfg, normalizer=n)[0])(jnp.asarray(logp[s]))
        for s in (slice(0, 4), slice(4, 8))]
    # float32 sums in a different order: a few ulps of O(1) values.
    np.testing.assert_allclose(sum(p[0] for p in parts), full_loss, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.concatenate([p[1] for p in parts]), full_grads[0], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("correction", ["token_is_bn+seq_mean_k2", "seq_is_bn+token_k3"])
def test_micro_batches_sum_to_full_batch_with_batch_normalised_weights(correction):
    """Batch normalisation divides by a mean over the whole batch: given that mean (and the
    normaliser), the micro-batch losses and gradients sum to the full-batch ones."""
    logp, old, samp, adv, mask = _batch(seed=3)
    cfg = _config("ppo", "token_mean", correction)
    full_loss, full_metrics, full_grads = _grads(cfg, logp, old, samp, adv, mask)
    n, m = loss_normalizer(mask, cfg), is_batch_mean(old, samp, mask, cfg)
    assert float(m) == float(full_metrics["is/batch_norm_mean"]) and float(m) != 1.0
    parts = [jax.value_and_grad(lambda lp, s=s: compute_policy_loss(
        lp, old[s], samp[s], adv[s], mask[s], cfg, normalizer=n, is_batch_mean=m)[0])(jnp.asarray(logp[s]))
        for s in (slice(0, 4), slice(4, 8))]
    # float32 sums in a different order: a few ulps of O(1) values.
    np.testing.assert_allclose(sum(p[0] for p in parts), full_loss, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.concatenate([p[1] for p in parts]), full_grads[0], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("correction", sorted(CORRECTIONS) + sorted(COMBOS))
def test_extreme_log_ratios_stay_finite(correction):
    """Sampler/trainer log-ratios of ±500 would overflow exp in float32; loss and grad stay finite."""
    logp, old, samp, adv, mask = _batch(seed=4)
    samp = np.where(np.arange(12) % 2 == 0, old - 500.0, old + 500.0).astype(np.float32)
    logp = (old + 200.0).astype(np.float32)
    for policy in POLICY_LOSSES:
        dual = 3.0 if policy != "reinforce" else None
        loss, metrics, grads = _grads(_config(policy, "token_mean", correction, dual), logp, old, samp, adv, mask)
        assert np.isfinite(loss) and np.all(np.isfinite(grads[0]))
        assert all(np.isfinite(v) for v in metrics.values()), metrics


def test_jit_matches_eager_and_config_is_static():
    logp, old, samp, adv, mask = _batch(seed=5)
    cfg = _config("gspo", "seq_mean_token_mean", "four", dual_clip=2.0)
    jitted = jax.jit(compute_policy_loss, static_argnames="config")
    eager = compute_policy_loss(logp, old, samp, adv, mask, cfg)
    out = jitted(logp, old, samp, adv, mask, config=cfg)
    np.testing.assert_allclose(out[0], eager[0], rtol=1e-6)
    assert hash(cfg) == hash(_config("gspo", "seq_mean_token_mean", parse_correction(str(COMBOS["four"])),
                                     dual_clip=2.0))


def test_advantages_hand_computed_and_numpy():
    r = jnp.array([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    # Group 1: mean 0.5, std(ddof=1) = sqrt(1/3); group 2: constant → 0 (eps avoids 0/0).
    np.testing.assert_allclose(compute_advantages(r, 4), np.sqrt(3) / 2 * np.array([1, -1, -1, 1, 0, 0, 0, 0]),
                               rtol=1e-5)
    np.testing.assert_allclose(compute_advantages(r, 4, "dr_grpo"), [0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0])
    rewards = np.random.default_rng(0).standard_normal(12).astype(np.float32)
    g = rewards.astype(np.float64).reshape(3, 4)
    ref = (g - g.mean(1, keepdims=True)) / (g.std(1, ddof=1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(compute_advantages(jnp.asarray(rewards), 4), ref.reshape(-1), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("mode", ["grpo", "dr_grpo"])
@pytest.mark.parametrize("group_size", [4, 8, 16])
def test_a_group_of_equal_rewards_gets_exactly_zero_advantage(mode, group_size):
    # 0.1 and 1.1 are what a formatted wrong / right answer scores (format weight 0.1); none of
    # these is a float32 binary fraction, so a plain float32 mean misses them by an ulp, and
    # GRPO's division by std + eps (std ~1e-8) would blow that ulp up to an advantage of ~0.1.
    values = np.float32([0.1, 1.1, 0.7, 0.9, 1 / 3, 0.05 + 0.1])
    r = jnp.asarray(np.repeat(values, group_size))
    adv = np.asarray(compute_advantages(r, group_size, mode))
    assert np.all(adv == 0.0), adv.reshape(-1, group_size)[:, 0]
    # A group that differs in one reward still gets the float64 advantages.
    r = np.repeat(values, group_size).reshape(-1, group_size)
    r[:, -1] += np.float32(0.5)
    g = r.astype(np.float64)
    ref = g - g.mean(1, keepdims=True)
    if mode == "grpo":
        ref = ref / (g.std(1, ddof=1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(compute_advantages(jnp.asarray(r.reshape(-1)), group_size, mode), ref.reshape(-1),
                               rtol=RTOL, atol=ATOL)


def test_advantages_validation():
    with pytest.raises(ValueError, match="multiple of group_size"):
        compute_advantages(jnp.zeros(6), 4)
    with pytest.raises(ValueError, match="group_size"):
        compute_advantages(jnp.zeros(6), 1)
    with pytest.raises(ValueError, match="mode"):
        compute_advantages(jnp.zeros(4), 2, "rloo")


@pytest.mark.parametrize("kwargs,match", [
    (dict(mode="is"), "mode"),
    (dict(mode="token_tis"), "needs `high`"),
    (dict(mode="token_mis", high=2.0), "needs `low`"),
    (dict(mode="token_tis", low=0.5, high=2.0), "does not use `low`"),
    (dict(mode="none", high=2.0), "does not use `high`"),
    (dict(mode="token_mis", low=2.0, high=1.0), "low < high"),
    (dict(mode="geo_mask", low=0.0, high=1.0), "> 0"),
    (dict(mode="seq_tis", high=-1.0), "> 0"),
    (dict(mode="seq_tis", high=float("inf")), "finite"),
])
def test_correction_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CorrectionConfig(**kwargs)


@pytest.mark.parametrize("kwargs,field,match", [
    (dict(advantage_mode="ppo"), "advantage_mode", "is not one of"),
    (dict(policy_loss="dapo"), "policy_loss", "is not one of"),
    (dict(aggregation="sum"), "aggregation", "is not one of"),
    (dict(clip_eps_low=1.0), "clip_eps_low", r"must be in \[0, 1\)"),
    (dict(clip_eps_high=-0.1), "clip_eps_high", "finite number >= 0"),
    (dict(clip_eps_high="0.2"), "clip_eps_high", "finite number >= 0"),
    (dict(aggregation="seq_mean_token_sum_norm"), "norm_length", "divides by it"),
    (dict(norm_length=128), "norm_length", "leave it 0"),
    (dict(norm_length=None), "norm_length", "must be an int"),
    (dict(correction="token_tis"), "correction", r"needs `high`"),
    (dict(correction="token_tis", correction_low=0.5, correction_high=2.0), "correction", "does not use `low`"),
    (dict(correction="seq_is(2)", correction_high=2.0), "correction", "carries its thresholds"),
    (dict(correction=CorrectionConfig("token_tis", high=2.0), correction_high=2.0), "correction_low", "Leave them"),
    (dict(correction=2.0), "correction", "must be a string, a CorrectionConfig"),
    (dict(dual_clip=1.0), "dual_clip", r"must be 0 \(off\) or a finite number > 1"),
    (dict(dual_clip=float("inf")), "dual_clip", "finite number > 1"),
    (dict(dual_clip=None), "dual_clip", "must be a number"),
    (dict(policy_loss="reinforce", dual_clip=3.0), "dual_clip", "reinforce"),
])
def test_loss_config_validation(kwargs, field, match):
    """Every message starts with the field's name (the experiment config puts its path before it)."""
    with pytest.raises(ValueError, match=match) as raised:
        LossConfig(**kwargs)
    assert str(raised.value).startswith(field), str(raised.value)


def test_a_correction_string_is_its_typed_form():
    """The config file's spelling (a string, 0 for off) gives the loss of the typed form."""
    spelled = LossConfig(policy_loss="gspo", correction="seq_mis", correction_high=2.0, dual_clip=0.0)
    typed = LossConfig(policy_loss="gspo", correction=CorrectionConfig("seq_mis", high=2.0))
    assert spelled.resolved_correction == typed.resolved_correction
    assert spelled.resolved_correction == CorrectionConfig("seq_mis", high=2.0).correction
    composed = "token_is(2, batch_norm) + seq_max_k2(0.5)"
    assert LossConfig(correction=composed).resolved_correction == parse_correction(composed)
    assert LossConfig().resolved_correction == Correction()
    logp, old, samp, adv, mask = _batch(seed=2)
    for a, b in zip(compute_policy_loss(logp, old, samp, adv, mask, spelled),
                    compute_policy_loss(logp, old, samp, adv, mask, typed)):
        jax.tree.map(np.testing.assert_array_equal, a, b)


def test_shape_validation():
    x, cfg = jnp.zeros((2, 3)), LossConfig()
    with pytest.raises(ValueError, match="sampler_logp_BT"):
        compute_policy_loss(x, x, jnp.zeros((2, 4)), jnp.zeros(2), x, cfg)
    with pytest.raises(ValueError, match="advantages_B"):
        compute_policy_loss(x, x, x, jnp.zeros((2, 3)), x, cfg)


@pytest.mark.parametrize("name", sorted(COMBOS))
def test_correction_strings_round_trip(name):
    assert parse_correction(str(COMBOS[name])) == COMBOS[name]
    assert parse_correction(str(COMBOS[name]).replace(" ", "")) == COMBOS[name]


def test_correction_settings_are_the_typed_form_of_the_strings():
    assert parse_correction("seq_is(2, batch_norm) + geo_ratio(0.5, 2) + seq_max_k3(0.1)") == Correction(
        ISWeight("sequence", 2.0, batch_normalize=True), (Reject("geo_ratio", 2.0, 0.5), Reject("seq_max_k3", 0.1)))
    assert parse_correction("bypass + token_k2(1)") == Correction(reject=[Reject("token_k2", 1.0)], bypass=True)
    assert str(Correction()) == "none" and parse_correction("none") == Correction()
    assert parse_correction("token_tis", high=2.0) == Correction(ISWeight("token", 2.0))


@pytest.mark.parametrize("spec,kwargs,match", [
    ("token_is", {}, r"write token_is\(C\)"),
    ("token_is(2, norm)", {}, "batch_norm"),
    ("token_is(two)", {}, "'two' is not a number"),
    ("token_is(2) + seq_is(2)", {}, "two IS weightings"),
    ("seq_k3(0.1)", {}, r"not a part.*seq_mean_k3\(δ\)"),
    ("seq_max_k2(0.1, 0.2)", {}, r"write seq_max_k2\(δ\)"),
    ("geo_ratio(0.5, 1, 2)", {}, r"geo_ratio\(L, U\)"),
    ("geo_ratio[2]", {}, "cannot read the part"),
    ("token_k2(1) + token_k2(2)", {}, "twice"),
    ("bypass + token_is(2)", {}, "count it twice"),
    ("token_is(2)", {"high": 2.0}, "carries its thresholds in its parts"),
    ("token_tis", {}, "needs `high`"),
    ("geo_ratio(2, 1)", {}, "0 <= low < high"),
    ("token_is(-1)", {}, "must be > 0"),
])
def test_bad_correction_strings_are_clear_errors(spec, kwargs, match):
    with pytest.raises(ValueError, match=match):
        parse_correction(spec, **kwargs)


@pytest.mark.parametrize("build,match", [
    (lambda: ISWeight("tokens", 2.0), "ISWeight.level"),
    (lambda: ISWeight("token", float("nan")), "finite"),
    (lambda: ISWeight("token", 2.0, batch_normalize=1), "bool"),
    (lambda: Reject("seq_mean_k1", 1.0), "Reject.criterion"),
    (lambda: Reject("token_k3", 1.0, low=0.5), "leave `low` None"),
    (lambda: Reject("token_ratio", 0.0), "> 0"),
    (lambda: Correction(weight="token_is(2)"), "ISWeight or None"),
    (lambda: Correction(reject=["token_k2(1)"]), "Reject criteria"),
])
def test_correction_settings_validation(build, match):
    with pytest.raises(ValueError, match=match):
        build()
