"""Tests for rl_mismatch.mismatch: metrics against float64 NumPy, hand cases, edge cases, rescoring."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rl_mismatch import mismatch as mm

# float32 unit roundoff. Each per-token term below is formed with a relative error of a few U
# (one subtraction, one exp/expm1/series); a float32 sum of N terms adds at most (N − 1)·U of
# the sum of the terms' magnitudes. The random tests use N ≤ 7·41 = 287 masked tokens, so
# 300·U ≈ 1.8e-5 of the terms' mean magnitude bounds every mean below; RTOL = 2e-5.
U = 2.0 ** -24
RTOL = 2e-5
QUANTILES = (0.001, 0.01, 0.5, 0.99, 0.999)
Q_NAMES = ("p001", "p01", "p50", "p99", "p999")
INF = float("inf")


# ----------------------------------------------------------------------------- NumPy reference


def _np_log_ratio(s, t, clamp):
    """The documented −inf rule, written element by element."""
    r = np.empty_like(s)
    for i, (a, b) in enumerate(zip(s, t)):
        if a == -INF and b == -INF:
            r[i] = 0.0
        elif b == -INF:
            r[i] = -clamp
        elif a == -INF:
            r[i] = clamp
        else:
            r[i] = min(max(b - a, -clamp), clamp)
    return r


def _np_token_stats(r, mu, pi):
    """(value, magnitude scale) per token metric on a subset of tokens, float64."""
    rho = np.exp(r)
    if r.size == 0:
        return {k: (0.0, 0.0) for k in ("k1", "k2", "k3", "prob_diff_mean", "prob_diff_max", "chi2_token",
                                        "frac_out_10pct", "frac_out_2x", *("ratio_" + q for q in Q_NAMES))}
    dp = np.abs(pi - mu)
    out = {
        "k1": (np.mean(-r), np.mean(np.abs(r))),
        "k2": (np.mean(r ** 2 / 2), np.mean(r ** 2 / 2)),
        "k3": (np.mean(rho - 1 - r), np.mean(rho - 1 - r)),
        "prob_diff_mean": (np.mean(dp), np.mean(dp)),
        "prob_diff_max": (np.max(dp), np.max(dp)),
        "chi2_token": (np.mean(rho ** 2) - 1, np.mean(np.abs(rho ** 2 - 1))),
        "frac_out_10pct": (np.mean((rho < 0.9) | (rho > 1.1)), 1.0 / r.size),
        "frac_out_2x": (np.mean((rho < 0.5) | (rho > 2.0)), 1.0 / r.size),
    }
    for name, q in zip(Q_NAMES, np.quantile(rho, QUANTILES)):  # numpy default method='linear'
        out["ratio_" + name] = (q, abs(q))
    return out


def np_reference(s_BT, t_BT, mask_BT, ent_BT=None, clamp=mm.DEFAULT_LOG_RATIO_CLAMP,
                 pos_edges=mm.POSITION_BIN_EDGES, ent_edges=mm.ENTROPY_BIN_EDGES):
    """Every metric by its definition, on the selected tokens only, float64; returns (value, scale)."""
    s_BT, t_BT = np.asarray(s_BT, np.float64), np.asarray(t_BT, np.float64)
    mask_BT = np.asarray(mask_BT, bool)
    rows = [_np_log_ratio(s_BT[b][mask_BT[b]], t_BT[b][mask_BT[b]], clamp) for b in range(len(s_BT))]
    r = np.concatenate(rows)
    mu, pi = np.exp(s_BT[mask_BT]), np.exp(t_BT[mask_BT])
    out = {"mismatch/" + k: v for k, v in _np_token_stats(r, mu, pi).items()}
    n = r.size
    zero = (0.0, 0.0)
    if n:
        dp = np.abs(pi - mu)
        out["mismatch/prob_diff_std"] = (np.std(dp), np.mean(dp))
        degenerate = n < 2 or np.std(pi) == 0 or np.std(mu) == 0
        out["mismatch/prob_pearson"] = zero if degenerate else (np.corrcoef(pi, mu)[0, 1], 1.0)
        rho = np.exp(r)
        w = rho / np.mean(rho)
        out["mismatch/ess"] = (1.0 / np.mean(w ** 2), 1.0)
    else:
        out.update({"mismatch/prob_diff_std": zero, "mismatch/prob_pearson": zero, "mismatch/ess": zero})

    seqs = [x for x in rows if x.size]
    d, sums, means = [], [], []
    for b in range(len(s_BT)):
        if not mask_BT[b].any():
            continue
        ls, lt = s_BT[b][mask_BT[b]], t_BT[b][mask_BT[b]]
        if np.all(np.isfinite(ls)) and np.all(np.isfinite(lt)) and np.all(np.abs(lt - ls) <= clamp):
            d.append(np.mean(ls) - np.mean(lt))  # the literal definition
        else:
            d.append(-np.mean(rows[b]))  # through the clamped, −inf-handled log-ratio
    for x in seqs:
        sums.append(np.sum(x))
        means.append(np.mean(x))
    d, sums, means = map(np.asarray, (d, sums, means))
    if seqs:
        out["mismatch/log_ppl_diff"] = (np.mean(d), np.mean(np.abs(d)))
        out["mismatch/log_ppl_abs_diff"] = (np.mean(np.abs(d)), np.mean(np.abs(d)))
        out["mismatch/ppl_ratio"] = (np.mean(np.exp(d)), np.mean(np.exp(d)))
        # (Π ρ)² directly, then the documented clamp of log(1 + χ²) at 80.
        prods = np.array([np.prod(np.exp(x)) for x in seqs])
        chi2 = np.mean(prods ** 2) - 1
        out["mismatch/chi2_seq"] = (min(chi2, math.expm1(80.0)), np.mean(np.abs(prods ** 2 - 1)))
        for name, x in (("seq_mean_log_ratio", means), ("seq_sum_log_ratio", sums)):
            out[f"mismatch/{name}_mean"] = (np.mean(x), np.mean(np.abs(x)))
            out[f"mismatch/{name}_min"] = (np.min(x), abs(np.min(x)))
            out[f"mismatch/{name}_max"] = (np.max(x), abs(np.max(x)))
        for name, lp_BT in (("trainer", t_BT), ("sampler", s_BT)):  # −inf: a log-perplexity of +inf, clamped
            nll = np.array([min(-np.mean(lp_BT[b][mask_BT[b]]), 80.0) for b in range(len(lp_BT)) if mask_BT[b].any()])
            out[f"mismatch/log_ppl_{name}"] = (np.mean(nll), np.mean(nll))
            out[f"mismatch/ppl_{name}"] = (np.mean(np.exp(nll)), np.mean(np.exp(nll)))
    else:
        for k in ("log_ppl_diff", "log_ppl_abs_diff", "ppl_ratio", "chi2_seq", "log_ppl_trainer", "log_ppl_sampler",
                  "ppl_trainer", "ppl_sampler",
                  *(f"seq_{a}_log_ratio_{b}" for a in ("mean", "sum") for b in ("mean", "min", "max"))):
            out["mismatch/" + k] = zero
    with np.errstate(invalid="ignore"):  # −inf − (−inf); those tokens are excluded via `both`
        raw = t_BT[mask_BT] - s_BT[mask_BT]
    both = (s_BT[mask_BT] == -INF) & (t_BT[mask_BT] == -INF)
    out["mismatch/n_tokens"] = (n, 0.0)
    out["mismatch/n_seqs"] = (len(seqs), 0.0)
    out["mismatch/n_clamped"] = (int(np.sum(~both & ~(np.abs(raw) <= clamp))), 0.0)
    out["mismatch/n_inf_logp"] = (int(np.sum((s_BT[mask_BT] == -INF) | (t_BT[mask_BT] == -INF))), 0.0)

    # Binned: position = index among the row's masked tokens; bin i holds edges[i] ≤ x < edges[i+1].
    pos_BT = np.zeros(mask_BT.shape, np.float64)
    for b in range(len(mask_BT)):
        pos_BT[b][mask_BT[b]] = np.arange(mask_BT[b].sum())
    binnings = [("by_position", pos_BT, pos_edges)]
    if ent_BT is not None:
        binnings.append(("by_entropy", np.asarray(ent_BT, np.float64), ent_edges))
    r_BT = np.zeros(mask_BT.shape)
    for b in range(len(mask_BT)):
        r_BT[b][mask_BT[b]] = rows[b]
    for prefix, x_BT, edges in binnings:
        idx = np.clip(np.searchsorted(np.asarray(edges, np.float64), x_BT[mask_BT], side="right") - 1,
                      0, len(edges) - 1)
        per_bin = [(_np_token_stats(r_BT[mask_BT][idx == k], mu[idx == k], pi[idx == k]),
                    int(np.sum(idx == k))) for k in range(len(edges))]
        out[f"mismatch/{prefix}/n_tokens"] = (np.array([c for _, c in per_bin]), 0.0)
        out[f"mismatch/{prefix}/bin_lo"] = (np.asarray(edges, np.float64), np.abs(edges) + 1.0)
        for key in per_bin[0][0]:
            out[f"mismatch/{prefix}/{key}"] = (np.array([st[key][0] for st, _ in per_bin]),
                                               np.array([st[key][1] for st, _ in per_bin]))
    return out


def assert_matches_reference(got, ref, rtol=RTOL):
    """|got − want| ≤ rtol · max(|want|, scale); scale 0 means exact (counts, empty bins)."""
    assert set(got) == set(ref), set(got) ^ set(ref)
    for key, (want, scale) in ref.items():
        g = np.asarray(got[key], np.float64)
        want = np.asarray(want, np.float64)
        scale = np.broadcast_to(np.asarray(scale, np.float64), want.shape)
        assert g.shape == want.shape, key
        assert np.all(np.isfinite(g)), key
        exact = scale == 0
        np.testing.assert_array_equal(g[exact], want[exact], err_msg=key)
        tol = rtol * np.maximum(np.abs(want), scale)
        err = np.abs(g - want)
        assert np.all(err[~exact] <= tol[~exact]), (key, g, want, err / np.maximum(tol, 1e-300))


# ----------------------------------------------------------------------------- inputs


def random_rollout(seed, B=7, T=41, sigma=0.3):
    """Left-padded prompt + response rows with ragged response lengths (one empty, one full).

    Positions off the mask hold NaN, so any leak of an unmasked value shows up.
    """
    rng = np.random.default_rng(seed)
    mask = np.zeros((B, T), bool)
    lengths = rng.integers(1, T, size=B)
    lengths[0], lengths[1] = 0, T
    for b, n in enumerate(lengths):
        mask[b, T - n:] = True
    s = np.log(rng.uniform(0.01, 1.0, size=(B, T)))
    t = np.minimum(s + rng.normal(0.0, sigma, size=(B, T)), 0.0)
    ent = np.exp(rng.uniform(np.log(1e-4), np.log(5.0), size=(B, T)))
    s[~mask] = np.nan
    t[~mask] = np.nan
    return s.astype(np.float32), t.astype(np.float32), mask, ent.astype(np.float32)


def metrics(s, t, mask, ent=None, **kw):
    return mm.compute_mismatch_metrics(jnp.asarray(s), jnp.asarray(t), jnp.asarray(mask),
                                       sampler_entropy_BT=None if ent is None else jnp.asarray(ent), **kw)


# ----------------------------------------------------------------------------- metric tests


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_match_numpy_float64(seed):
    s, t, mask, ent = random_rollout(seed)
    got = metrics(s, t, mask, ent)
    assert_matches_reference(got, np_reference(s, t, mask, ent))
    assert set(mm.METRIC_KEYS) <= set(got)
    for prefix in ("by_position", "by_entropy"):
        assert {f"mismatch/{prefix}/{k}" for k in mm.BINNED_KEYS} <= set(got)


def test_issue_keys_present():
    s, t, mask, _ = random_rollout(0)
    got = metrics(s, t, mask)
    required = ("k1 k2 k3 prob_diff_mean prob_diff_max prob_diff_std prob_pearson log_ppl_diff "
                "log_ppl_abs_diff ppl_ratio chi2_token chi2_seq ess ratio_p001 ratio_p01 ratio_p50 "
                "ratio_p99 ratio_p999 frac_out_10pct frac_out_2x n_tokens").split()
    assert {"mismatch/" + k for k in required} <= set(got)
    assert not any(k.startswith("mismatch/by_entropy") for k in got)  # no entropy given


def test_large_mismatch_and_clamp_match_numpy():
    s, t, mask, ent = random_rollout(3, sigma=3.0)
    t = np.minimum(t, 0.0)
    s[2, -5:] = -30.0  # |r| near and beyond the clamp
    got = metrics(s, t, mask, ent, log_ratio_clamp=5.0)
    ref = np_reference(s, t, mask, ent, clamp=5.0)
    assert int(got["mismatch/n_clamped"]) > 0
    assert_matches_reference(got, ref)


def test_inf_logp_follow_documented_rule():
    s, t, mask, ent = random_rollout(4)
    s[3, -1], t[3, -1] = -INF, -INF  # both rule the token out: r = 0
    t[3, -2] = -INF  # trainer rules it out: r = −C
    s[4, -1] = -INF  # sampler "sampled" a probability-0 token: r = +C
    s[0, 0] = -INF  # off the mask: ignored
    got = metrics(s, t, mask, ent)
    for k, v in got.items():
        assert np.all(np.isfinite(np.asarray(v))), k
    assert int(got["mismatch/n_inf_logp"]) == 3
    assert int(got["mismatch/n_clamped"]) == 2
    assert_matches_reference(got, np_reference(s, t, mask, ent))
    r = mm.compute_log_ratio(jnp.asarray(s), jnp.asarray(t), jnp.asarray(mask))
    assert float(r[3, -1]) == 0.0 and float(r[3, -2]) == -20.0 and float(r[4, -1]) == 20.0


def test_identical_inputs_give_exact_zero_and_one():
    s, _, mask, ent = random_rollout(5)
    s[2, -1] = -INF  # both sides −inf still counts as agreement
    got = metrics(s, s.copy(), mask, ent)
    for k in ("k1", "k2", "k3", "prob_diff_mean", "prob_diff_max", "prob_diff_std", "log_ppl_diff",
              "log_ppl_abs_diff", "chi2_token", "chi2_seq", "frac_out_10pct", "frac_out_2x",
              "seq_mean_log_ratio_mean", "seq_mean_log_ratio_min", "seq_mean_log_ratio_max",
              "seq_sum_log_ratio_mean", "seq_sum_log_ratio_min", "seq_sum_log_ratio_max"):
        assert float(got["mismatch/" + k]) == 0.0, k
    for k in ("ppl_ratio", "ess", *("ratio_" + q for q in Q_NAMES)):
        assert float(got["mismatch/" + k]) == 1.0, k
    assert float(got["mismatch/prob_pearson"]) == 1.0
    for prefix in ("by_position", "by_entropy"):
        n = np.asarray(got[f"mismatch/{prefix}/n_tokens"])
        for k in ("k1", "k2", "k3", "prob_diff_mean", "prob_diff_max", "chi2_token", "frac_out_10pct",
                  "frac_out_2x"):
            assert np.all(np.asarray(got[f"mismatch/{prefix}/{k}"]) == 0.0), (prefix, k)
        for q in Q_NAMES:
            np.testing.assert_array_equal(np.asarray(got[f"mismatch/{prefix}/ratio_{q}"]), (n > 0) * 1.0)


def test_hand_computed_case():
    """Two sequences: μ = (0.5, 0.5), π = (0.2, 0.5) and μ = (0.25,), π = (0.75,).

    So r = (ln 0.4, 0, ln 3) and ρ = (0.4, 1, 3); every expected value below is worked out by hand
    from those three tokens. The float32 result is compared at 1e-6 relative: a handful of float32
    operations on O(1) values, far below 1e-6 (16 U), and far above any formula error.
    """
    nan = float("nan")
    s = np.log(np.array([[nan, 0.5, 0.5], [nan, nan, 0.25]], np.float32))
    t = np.log(np.array([[nan, 0.2, 0.5], [nan, nan, 0.75]], np.float32))
    mask = np.array([[False, True, True], [False, False, True]])
    ent = np.array([[0.0, 0.5, 0.005], [0.0, 0.0, 2.0]], np.float32)
    got = metrics(s, t, mask, ent)
    l4, l3 = math.log(0.4), math.log(3.0)
    dp_mean = (0.3 + 0.0 + 0.5) / 3
    m_pi, m_mu = (0.2 + 0.5 + 0.75) / 3, (0.5 + 0.5 + 0.25) / 3
    cov = ((0.2 - m_pi) * (0.5 - m_mu) + (0.5 - m_pi) * (0.5 - m_mu) + (0.75 - m_pi) * (0.25 - m_mu)) / 3
    var_pi = ((0.2 - m_pi) ** 2 + (0.5 - m_pi) ** 2 + (0.75 - m_pi) ** 2) / 3
    var_mu = ((0.5 - m_mu) ** 2 * 2 + (0.25 - m_mu) ** 2) / 3
    d0, d1 = -l4 / 2, -l3  # d_s = mean log μ − mean log π
    expected = {
        "k1": -(l4 + l3) / 3,
        "k2": (l4 ** 2 + l3 ** 2) / 6,
        "k3": ((0.4 - 1 - l4) + (3 - 1 - l3)) / 3,
        "prob_diff_mean": dp_mean,
        "prob_diff_max": 0.5,
        "prob_diff_std": math.sqrt(((0.3 - dp_mean) ** 2 + dp_mean ** 2 + (0.5 - dp_mean) ** 2) / 3),
        "prob_pearson": cov / math.sqrt(var_pi * var_mu),
        "log_ppl_diff": (d0 + d1) / 2,
        "log_ppl_abs_diff": (abs(d0) + abs(d1)) / 2,
        "ppl_ratio": (math.exp(d0) + math.exp(d1)) / 2,
        "chi2_token": (0.16 + 1 + 9) / 3 - 1,
        "chi2_seq": (0.4 ** 2 + 3 ** 2) / 2 - 1,  # Π ρ = 0.4 and 3
        "ess": ((0.4 + 1 + 3) / 3) ** 2 / ((0.16 + 1 + 9) / 3),
        # sorted ρ = (0.4, 1, 3), index q·2: 0.002, 0.02, 1, 1.98, 1.998
        "ratio_p001": 0.4 + 0.002 * 0.6, "ratio_p01": 0.4 + 0.02 * 0.6, "ratio_p50": 1.0,
        "ratio_p99": 1 + 0.98 * 2, "ratio_p999": 1 + 0.998 * 2,
        "frac_out_10pct": 2 / 3, "frac_out_2x": 2 / 3,
        "seq_mean_log_ratio_mean": (l4 / 2 + l3) / 2, "seq_mean_log_ratio_min": l4 / 2,
        "seq_mean_log_ratio_max": l3, "seq_sum_log_ratio_mean": (l4 + l3) / 2,
        "seq_sum_log_ratio_min": l4, "seq_sum_log_ratio_max": l3,
    }
    for k, v in expected.items():
        np.testing.assert_allclose(float(got["mismatch/" + k]), v, rtol=1e-6, err_msg=k)
    for k, v in dict(n_tokens=3, n_seqs=2, n_clamped=0, n_inf_logp=0).items():
        assert int(got["mismatch/" + k]) == v, k
    # Positions: row 0 holds response positions 0, 1 (ρ = 0.4, 1); row 1 position 0 (ρ = 3).
    pos = {k: np.asarray(got["mismatch/by_position/" + k]) for k in mm.BINNED_KEYS}
    np.testing.assert_array_equal(pos["n_tokens"][:3], [2, 1, 0])
    np.testing.assert_allclose(pos["k1"][:3], [-(l4 + l3) / 2, 0.0, 0.0], rtol=1e-6)
    np.testing.assert_allclose(pos["ratio_p50"][:3], [1.7, 1.0, 0.0], rtol=1e-6)
    np.testing.assert_allclose(pos["frac_out_2x"][:3], [1.0, 0.0, 0.0])
    np.testing.assert_allclose(pos["prob_diff_max"][:3], [0.5, 0.0, 0.0], rtol=1e-6)
    # Entropies 0.5, 0.005, 2.0 fall in bins [0.3, 1), [3e-3, 1e-2), [1, 3): indices 6, 2, 7.
    ent_n = np.asarray(got["mismatch/by_entropy/n_tokens"])
    np.testing.assert_array_equal(np.nonzero(ent_n)[0], [2, 6, 7])
    np.testing.assert_allclose(np.asarray(got["mismatch/by_entropy/ratio_p50"])[[2, 6, 7]],
                               [1.0, 0.4, 3.0], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(got["mismatch/by_entropy/bin_lo"]), mm.ENTROPY_BIN_EDGES, rtol=1e-7)


def test_quantile_interpolation_matches_numpy_linear():
    """Many tokens (N = 4000 > 1000) so p001/p999 interpolate strictly between sorted entries."""
    rng = np.random.default_rng(7)
    s = np.log(rng.uniform(0.05, 1.0, size=(4, 1000))).astype(np.float32)
    t = np.minimum(s + rng.normal(0, 0.2, size=s.shape), 0).astype(np.float32)
    mask = rng.uniform(size=s.shape) < 0.9
    got = metrics(s, t, mask)
    rho = np.exp(np.float64(t[mask]) - np.float64(s[mask]))
    # ρ itself is exp of a float32 difference: ≤ 2 U relative each, and interpolation is convex.
    np.testing.assert_allclose([float(got["mismatch/ratio_" + q]) for q in Q_NAMES],
                               np.quantile(rho, QUANTILES), rtol=4 * U)


def test_empty_mask_gives_zeros_and_zero_counts():
    s, t, _, ent = random_rollout(6)
    got = metrics(s, t, np.zeros(s.shape, bool), ent)
    for k, v in got.items():
        v = np.asarray(v)
        if k.endswith("bin_lo"):
            continue
        assert np.all(v == 0), k  # also no NaN
    assert got["mismatch/n_tokens"].dtype == jnp.int32


def test_small_mismatch_k3_keeps_its_digits():
    """r ≈ 1e-4: naive exp(r) − 1 − r in float32 would have no correct digit (U/r² ≈ 10)."""
    rng = np.random.default_rng(8)
    s = np.log(rng.uniform(0.1, 1.0, size=(4, 64))).astype(np.float32)
    t = (s + rng.normal(0, 1e-4, size=s.shape)).astype(np.float32)
    mask = np.ones(s.shape, bool)
    got = metrics(s, t, mask)
    r = np.float64(t) - np.float64(s)  # exact: the float32 difference of nearby values is exact
    want = np.mean(np.expm1(r) - r)
    # Every term r²/2·(1 + r/3 + …) has relative error ≤ 3 U; the 256-term sum adds ≤ 256 U.
    np.testing.assert_allclose(float(got["mismatch/k3"]), want, rtol=300 * U)
    # χ² terms expm1(2r) ≈ 2r have mixed signs: the bound is relative to their mean magnitude.
    chi2_terms = np.expm1(2 * r)
    assert abs(float(got["mismatch/chi2_token"]) - np.mean(chi2_terms)) <= 300 * U * np.mean(np.abs(chi2_terms))
    assert float(got["mismatch/chi2_seq"]) > 0


def test_chi2_seq_is_clamped_not_overflowing():
    T = 64
    s = np.full((2, T), -25.0, np.float32)
    t = np.zeros((2, T), np.float32)  # r = +20 (clamped from 25) on all 128 tokens
    got = metrics(s, t, np.ones((2, T), bool))
    assert float(got["mismatch/chi2_seq"]) == pytest.approx(math.expm1(80.0), rel=1e-5)
    assert np.isfinite(float(got["mismatch/chi2_token"]))
    assert int(got["mismatch/n_clamped"]) == 2 * T


def test_jit_matches_eager_and_does_not_recompile(count_compiles):
    s, t, mask, ent = random_rollout(9)
    fn = jax.jit(functools.partial(mm.compute_mismatch_metrics, position_bin_edges=(0, 4, 16)))
    args = tuple(map(jnp.asarray, (s, t, mask)))
    got = fn(*args, sampler_entropy_BT=jnp.asarray(ent))
    eager = mm.compute_mismatch_metrics(*args, sampler_entropy_BT=jnp.asarray(ent), position_bin_edges=(0, 4, 16))
    assert got["mismatch/by_position/k1"].shape == (3,)
    for k in eager:
        np.testing.assert_allclose(np.asarray(got[k]), np.asarray(eager[k]), rtol=1e-6, atol=1e-7, err_msg=k)
    s2, t2, mask2, ent2 = map(jnp.asarray, random_rollout(10))
    with count_compiles() as compiles:
        jax.block_until_ready(fn(s2, t2, mask2, sampler_entropy_BT=ent2))
    assert compiles.n == 0


def test_bfloat16_inputs_are_upcast():
    s, t, mask, _ = random_rollout(11)
    got = metrics(s.astype(jnp.bfloat16), t.astype(jnp.bfloat16), mask)
    assert got["mismatch/k3"].dtype == jnp.float32
    s32, t32 = np.asarray(s.astype(jnp.bfloat16), np.float32), np.asarray(t.astype(jnp.bfloat16), np.float32)
    np.testing.assert_allclose(float(got["mismatch/k3"]), float(metrics(s32, t32, mask)["mismatch/k3"]), rtol=1e-6)


@pytest.mark.parametrize("bad", ["shape", "dtype", "edges", "clamp"])
def test_invalid_arguments_raise(bad):
    s, t, mask, _ = random_rollout(0)
    kw = {}
    if bad == "shape":
        t = t[:, :-1]
    elif bad == "dtype":
        s = np.zeros(s.shape, np.int32)
    elif bad == "edges":
        kw = dict(position_bin_edges=(0, 4, 2))
    else:
        kw = dict(log_ratio_clamp=0.0)
    with pytest.raises(ValueError):
        metrics(s, t, mask, **kw)


# ----------------------------------------------------------------------------- rescoring


def _np_log_softmax(z):
    z = np.asarray(z, np.float64)
    m = z.max(-1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))


def _logsumexp_tolerance(logits):
    """Absolute float32 error bound of z − logsumexp(z) and of the entropy, for small V.

    With Z = max|z|: each z − max is rounded by ≤ 2Z·U, so each exp(z − max) is off by ≤ (2Z + 1)·U
    relative; summing V positive terms adds ≤ V·U relative; the log turns relative into absolute
    error; the final z − lse rounds by ≤ 2Z·U (and a temperature division by ≤ Z·U). Hence
    (V + 5Z + 2)·U; the entropy, a sum of V positive terms p·(lse − z) ≤ log V in total with the
    same per-term errors, obeys the same bound.
    """
    return (logits.shape[-1] + 5 * np.abs(logits).max() + 2) * U


def _expected_rescore(logits, tokens, keep):
    """logp[:, t] = log_softmax(logits[:, t − 1])[tokens[:, t]], 0 where not kept."""
    lp = _np_log_softmax(logits)
    B, T = tokens.shape
    out = np.zeros((B, T))
    for b in range(B):
        for c in range(1, T):
            if keep[b, c]:
                out[b, c] = lp[b, c - 1, tokens[b, c]]
    return out


def test_rescore_with_stand_in_model():
    rng = np.random.default_rng(12)
    V, B, T = 11, 3, 7
    table = jnp.asarray(rng.normal(0, 2, size=(V, V)), jnp.float32)

    def model(tokens_BT, positions_BT=None, valid_BT=None):
        del positions_BT
        # NaN logits at padding: rescore must drop them with where(), never multiply them.
        return jnp.where(valid_BT[..., None], table[tokens_BT], jnp.nan)

    tokens = rng.integers(0, V, size=(B, T)).astype(np.int32)
    valid = np.ones((B, T), bool)
    valid[1, :2] = False
    resp = np.zeros((B, T), bool)
    resp[:, 4:] = True
    logits = np.asarray(table)[tokens]
    keep = valid & np.concatenate([np.zeros((B, 1), bool), valid[:, :-1]], axis=1)
    got = mm.rescore(model, jnp.asarray(tokens), jnp.asarray(valid))
    tol = _logsumexp_tolerance(logits)
    np.testing.assert_allclose(np.asarray(got), _expected_rescore(logits, tokens, keep), atol=tol, rtol=0)
    assert np.all(np.asarray(got)[:, 0] == 0) and np.all(np.asarray(got)[1, :3] == 0)
    got_r, ent = mm.rescore_with_entropy(model, jnp.asarray(tokens), jnp.asarray(valid),
                                         response_mask_BT=jnp.asarray(resp))
    np.testing.assert_allclose(np.asarray(got_r), _expected_rescore(logits, tokens, keep & resp), atol=tol, rtol=0)
    p = np.exp(_np_log_softmax(logits))
    want_ent = np.zeros((B, T))
    want_ent[:, 1:] = -(p * np.log(p)).sum(-1)[:, :-1]
    np.testing.assert_allclose(np.asarray(ent), np.where(keep & resp, want_ent, 0.0), atol=tol, rtol=0)


def test_rescore_temperature_scales_logits():
    rng = np.random.default_rng(14)
    V, B, T = 9, 2, 5
    table = jnp.asarray(rng.normal(0, 2, size=(V, V)), jnp.float32)

    def model(tokens_BT, positions_BT=None, valid_BT=None):
        return table[tokens_BT]

    tokens = rng.integers(0, V, size=(B, T)).astype(np.int32)
    keep = np.ones((B, T), bool)
    keep[:, 0] = False
    got = mm.rescore(model, jnp.asarray(tokens), temperature=0.7)
    logits = np.asarray(table)[tokens] / 0.7
    np.testing.assert_allclose(np.asarray(got), _expected_rescore(logits, tokens, keep),
                               atol=_logsumexp_tolerance(logits), rtol=0)
    with pytest.raises(ValueError, match="temperature"):
        mm.rescore(model, jnp.asarray(tokens), temperature=0.0)


def test_token_log_probs_handles_minus_inf_logits():
    logits = jnp.array([[[0.0, -jnp.inf, 0.0]]])
    lp, ent = mm.token_log_probs_and_entropy(logits, jnp.array([[1]]))
    assert float(lp[0, 0]) == -INF
    np.testing.assert_allclose(float(ent[0, 0]), math.log(2.0), rtol=1e-6)


def test_rescore_matches_decoder_log_softmax():
    decoder = pytest.importorskip("rl_mismatch.models.decoder")
    from flax import nnx

    from rl_mismatch.models.config import tiny_config

    config = tiny_config()
    model = decoder.Decoder(config, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(13)
    B, T = 3, 9
    tokens = rng.integers(1, config.vocab_size, size=(B, T)).astype(np.int32)
    valid = np.ones((B, T), bool)
    valid[0, :3] = False  # left padding
    valid[2, :1] = False
    tokens[~valid] = 0
    resp = np.zeros((B, T), bool)
    resp[:, 5:] = True
    logits = np.asarray(model(jnp.asarray(tokens), valid_BT=jnp.asarray(valid)))
    keep = valid & np.concatenate([np.zeros((B, 1), bool), valid[:, :-1]], axis=1) & resp
    got, ent = mm.rescore_with_entropy(model, jnp.asarray(tokens), jnp.asarray(valid),
                                       response_mask_BT=jnp.asarray(resp))
    # Same eager forward, so the logits are identical and only the float32 reductions over
    # V = 256 differ: a sum of V positive terms has relative error ≤ V·U, so logsumexp (its log)
    # is off by ≤ V·U absolute and the entropy (a sum of V positive terms) by ≤ V·U relative.
    vu = config.vocab_size * U
    np.testing.assert_allclose(np.asarray(got), _expected_rescore(logits, tokens, keep), atol=vu, rtol=0)
    p = np.exp(_np_log_softmax(logits))
    want_ent = np.zeros((B, T))
    want_ent[:, 1:] = -(p * np.log(p)).sum(-1)[:, :-1]
    np.testing.assert_allclose(np.asarray(ent), np.where(keep, want_ent, 0.0), rtol=vu, atol=0)
    # Under nnx.jit XLA fuses and reorders the same float32 sums (forward included): allow the
    # same V·U bound twice over.
    got_jit = nnx.jit(mm.rescore)(model, jnp.asarray(tokens), jnp.asarray(valid),
                                  response_mask_BT=jnp.asarray(resp))
    np.testing.assert_allclose(np.asarray(got_jit), np.asarray(got), atol=2 * vu, rtol=0)
