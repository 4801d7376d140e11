"""Group-baseline advantages, policy-gradient losses and the sampler/trainer mismatch corrections.

Notation, for response token t of sequence i:

* ``logp_BT``: log π_θ(y_t), the trainer's log-prob under the parameters being updated. The
  only input that carries gradient.
* ``old_logp_BT``: log π_old(y_t), the trainer's *rescored* log-prob of the rollout (the
  trainer's forward, trainer precision, teacher-forced, before the update).
* ``sampler_logp_BT``: log μ(y_t), the log-prob the sampler reported while generating.

Which policy is "old". In this project each rollout is used for exactly one optimizer update,
so π_θ and π_old hold the same parameters and the PPO ratio π_θ/π_old is 1 in value (its
gradient is what matters); the samples, though, came from μ, not π_old. So by default:

* the PPO/GSPO ratio is taken against π_old (``old_logp_BT``, detached), and
* the correction weight is ρ_t = π_old(y_t)/μ(y_t) = exp(old_logp − sampler_logp), which
  corrects for sampling from μ instead of π_old (truncated/masked as the mode says).

In ``'bypass'`` mode μ itself is the old policy: the ratio is π_θ/μ (so PPO clipping bounds the
sampler/trainer mismatch directly) and there is no separate correction weight (w = 1).

Per-token loss, then aggregation (``l_{i,t}`` is masked by ``mask_BT``)::

    l_{i,t} = w_{i,t} · pg_{i,t}
    loss    = Σ numerator(l) / normaliser            (see `compute_policy_loss`)

Correction weights w are computed from detached log-probs (`jax.lax.stop_gradient`): they are
importance weights of the *sampling distribution*, constants of the estimator, not functions
of θ to be optimised. Differentiating through them would add a term ∝ ∇ log π_old that does
not belong to the policy gradient.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Literal

import jax
import jax.numpy as jnp

AdvantageMode = Literal["grpo", "dr_grpo"]
PolicyLoss = Literal["ppo", "reinforce", "gspo"]
Aggregation = Literal["token_mean", "seq_mean_token_sum", "seq_mean_token_mean", "seq_mean_token_sum_norm"]
CorrectionMode = Literal[
    "none", "token_tis", "token_mis", "seq_tis", "seq_mis", "geo_mask", "token_k3", "seq_k3", "bypass"]

# Log-ratios are clamped to ±_MAX_LOG_RATIO before `exp` where the result is used as a value:
# exp(20) ≈ 4.9e8 is far past any clip range, while exp(89) already overflows float32 and an
# inf ratio times a zero advantage (or a masked-out token) would give NaN. The clamp only
# changes tokens whose ratio is beyond 4.9e8 (or below 2e-9); their gradient becomes zero.
_MAX_LOG_RATIO = 20.0

_SEQUENCE_MODES = ("seq_tis", "seq_mis", "geo_mask", "seq_k3")

# Which of (low, high) each correction mode needs: "req" required, "opt" optional, absent = must be None.
_THRESHOLDS: dict[str, dict[str, str]] = {
    "none": {},
    "bypass": {},
    "token_tis": {"high": "req"},
    "seq_tis": {"high": "req"},
    "token_mis": {"low": "req", "high": "req"},
    "seq_mis": {"low": "opt", "high": "req"},
    "geo_mask": {"low": "req", "high": "req"},
    "token_k3": {"high": "req"},
    "seq_k3": {"high": "req"},
}


def _check_literal(value, literal, name: str):
    options = typing.get_args(literal)
    if value not in options:
        raise ValueError(f"{name}={value!r} is not one of {list(options)}.")


# --------------------------------------------------------------------------------------------
# Advantages
# --------------------------------------------------------------------------------------------


def compute_advantages(rewards_B: jax.Array, group_size: int, mode: AdvantageMode = "grpo",
                       eps: float = 1e-6) -> jax.Array:
    """Group-baseline advantages; groups are consecutive runs of ``group_size`` responses.

    For response i of group g with rewards r_{g,1..G}::

        grpo:     A_i = (r_i − mean_g r) / (std_g r + eps)    std with ddof=1 (as TRL, verl, Tunix)
        dr_grpo:  A_i =  r_i − mean_g r                       (Dr. GRPO drops the std, arXiv 2503.20783)

    Args:
      rewards_B: [B] rewards, B = n_prompts · group_size, the G responses of a prompt adjacent.
      group_size: G ≥ 2 responses per prompt.
      mode: ``'grpo'`` or ``'dr_grpo'``.
      eps: added to the std, so that a group with equal rewards gets advantage 0 (exactly), not NaN.

    Returns:
      [B] float32 advantages.

    >>> compute_advantages(jnp.array([1.0, 0.0, 2.0, 2.0]), 2, 'dr_grpo')
    Array([ 0.5, -0.5,  0. ,  0. ], dtype=float32)
    """
    _check_literal(mode, AdvantageMode, "mode")
    if rewards_B.ndim != 1:
        raise ValueError(f"rewards_B must be 1-D [B], got shape {rewards_B.shape}.")
    if not isinstance(group_size, int) or group_size < 2:
        raise ValueError(
            f"group_size must be an int >= 2, got {group_size!r}: with one response per prompt the group "
            "baseline is the reward itself and every advantage is zero.")
    if rewards_B.shape[0] % group_size:
        raise ValueError(f"Batch of {rewards_B.shape[0]} rewards is not a multiple of group_size={group_size}.")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}.")
    r_NG = rewards_B.astype(jnp.float32).reshape(-1, group_size)
    # Deviations from the group's first reward first, then their mean: a group of equal rewards
    # gives exactly 0. The plain float32 mean of eight 0.1s is off by an ulp, and that ulp divided
    # by a std of ~1e-8 (+ eps) would hand the whole group an advantage of ~0.01–0.1 of one sign.
    d_NG = r_NG - r_NG[:, :1]
    adv_NG = d_NG - d_NG.mean(axis=1, keepdims=True)
    if mode == "grpo":
        std_N1 = jnp.sqrt(jnp.sum(jnp.square(adv_NG), axis=1, keepdims=True) / (group_size - 1))
        adv_NG = adv_NG / (std_N1 + eps)
    return adv_NG.reshape(-1)


# --------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CorrectionConfig:
    """Which sampler/trainer mismatch correction to apply, and its thresholds.

    ρ_t = exp(r_t), r_t = log π_old(y_t) − log μ(y_t); R_i = Σ_t r_t (so Π_t ρ_t = exp(R_i));
    k3_t = ρ_t − 1 − r_t. Weights w are detached. ``low``/``high`` mean, per mode:

    ============  ======================================================  ==========  ==========
    mode          weight                                                  low         high
    ============  ======================================================  ==========  ==========
    none          w = 1                                                   —           —
    bypass        w = 1, and μ is the PPO/GSPO old policy                 —           —
    token_tis     w_t = min(ρ_t, C)                                       —           C
    token_mis     w_t = ρ_t · 1[L ≤ ρ_t ≤ U]   (IcePop, two-sided)        L           U
    seq_tis       w_i = min(Π_t ρ_t, C)                                   —           C
    seq_mis       w_i = Π_t ρ_t · 1[L ≤ Π_t ρ_t ≤ U]                      L (opt., 0)  U
    geo_mask      w_i = 1[L ≤ exp(mean_t r_t) ≤ U]                        L           U
    token_k3      w_t = 1[k3_t ≤ δ]                                       —           δ
    seq_k3        w_i = 1[mean_t k3_t ≤ δ]                                —           δ
    ============  ======================================================  ==========  ==========

    A threshold a mode does not use must be left ``None`` (so a config never looks as if it
    set something that has no effect).

    Attributes:
      mode: one of the modes above.
      low: lower threshold L (> 0 for geo_mask, >= 0 otherwise).
      high: upper threshold C, U or δ (> 0, and > low).
    """

    mode: CorrectionMode = "none"
    low: float | None = None
    high: float | None = None

    def __post_init__(self):
        _check_literal(self.mode, CorrectionMode, "CorrectionConfig.mode")
        spec = _THRESHOLDS[self.mode]
        for name in ("low", "high"):
            value = getattr(self, name)
            need = spec.get(name)
            if value is None:
                if need == "req":
                    raise ValueError(f"CorrectionConfig(mode={self.mode!r}) needs `{name}`; see the table in the "
                                     "CorrectionConfig docstring.")
                continue
            if need is None:
                raise ValueError(f"CorrectionConfig(mode={self.mode!r}) does not use `{name}`; leave it None.")
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"CorrectionConfig.{name} must be a finite number, got {value!r}.")
        if self.high is not None and self.high <= 0:
            raise ValueError(f"CorrectionConfig.high must be > 0, got {self.high}.")
        if self.low is not None:
            if self.low < 0 or (self.mode == "geo_mask" and self.low == 0):
                raise ValueError(f"CorrectionConfig.low must be {'> 0' if self.mode == 'geo_mask' else '>= 0'} "
                                 f"for mode {self.mode!r}, got {self.low}.")
            if self.low >= self.high:
                raise ValueError(f"CorrectionConfig needs low < high, got low={self.low}, high={self.high}.")

    @property
    def sequence_level(self) -> bool:
        """True if the weight is one number per sequence."""
        return self.mode in _SEQUENCE_MODES


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Policy loss, aggregation and correction. Frozen and hashable: pass it as a jit static arg.

    Attributes:
      policy_loss: ``'ppo'`` (clipped surrogate), ``'reinforce'`` (unclipped), ``'gspo'``
        (sequence-level ratio, clipped); formulas in `compute_policy_loss`.
      clip_eps_low: PPO/GSPO lower clip ε_low, ratio clipped at 1 − ε_low (0 ≤ ε_low < 1).
      clip_eps_high: PPO/GSPO upper clip ε_high, ratio clipped at 1 + ε_high (DAPO's
        "clip-higher" uses 0.28; GSPO's paper 3e-4 / 4e-4).
      aggregation: how per-token losses become a scalar; see `compute_policy_loss`.
      norm_length: the constant L of ``'seq_mean_token_sum_norm'`` (Dr. GRPO uses the maximum
        generation length); required for that mode and None otherwise.
      correction: the sampler/trainer mismatch correction.
    """

    policy_loss: PolicyLoss = "ppo"
    clip_eps_low: float = 0.2
    clip_eps_high: float = 0.2
    aggregation: Aggregation = "token_mean"
    norm_length: int | None = None
    correction: CorrectionConfig = CorrectionConfig()

    def __post_init__(self):
        _check_literal(self.policy_loss, PolicyLoss, "LossConfig.policy_loss")
        _check_literal(self.aggregation, Aggregation, "LossConfig.aggregation")
        if not 0 <= self.clip_eps_low < 1:
            raise ValueError(f"clip_eps_low must be in [0, 1) so that 1 - eps_low > 0, got {self.clip_eps_low}.")
        if not (self.clip_eps_high >= 0 and math.isfinite(self.clip_eps_high)):
            raise ValueError(f"clip_eps_high must be a finite number >= 0, got {self.clip_eps_high}.")
        if self.aggregation == "seq_mean_token_sum_norm":
            if isinstance(self.norm_length, bool) or not isinstance(self.norm_length, int) or self.norm_length < 1:
                raise ValueError("aggregation='seq_mean_token_sum_norm' needs norm_length, a positive int (the "
                                 f"maximum response length), got {self.norm_length!r}.")
        elif self.norm_length is not None:
            raise ValueError(f"norm_length is only used by aggregation='seq_mean_token_sum_norm', not "
                             f"{self.aggregation!r}; leave it None.")
        if not isinstance(self.correction, CorrectionConfig):
            raise ValueError(f"correction must be a CorrectionConfig, got {type(self.correction).__name__}.")


# --------------------------------------------------------------------------------------------
# Pieces
# --------------------------------------------------------------------------------------------


def _masked_stats(x: jax.Array, valid: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Mean, population std and max of x over `valid` entries (0 for all three if none)."""
    n = jnp.maximum(valid.sum(), 1)
    mean = jnp.where(valid, x, 0).sum() / n
    var = jnp.where(valid, jnp.square(x - mean), 0).sum() / n
    mx = jnp.where(valid.any(), jnp.where(valid, x, -jnp.inf).max(), 0.0)
    return mean, jnp.sqrt(var), mx


def _k3(r: jax.Array) -> jax.Array:
    """k3_t = ρ_t − 1 − r_t = e^r − 1 − r ≥ 0, accurate for small r and finite for large r.

    Written naively, float32 cancellation leaves k3 wrong by 3x at r = 1e-4, exactly where a
    small (e.g. fp16) mismatch lives and where k3 thresholds are set. For |r| < 0.5 we use the
    Taylor series r²(1/2 + r/6 + … + r⁶/8!) (dropped terms < 1e-7 relative); beyond that
    expm1(r) − r, with r clamped above at _MAX_LOG_RATIO so exp stays finite: k3 is exact up to
    r = 20 and > 4.8e8 beyond, so a clamped token is rejected by any sane threshold. r = +inf
    gives 4.8e8 and r = −inf gives +inf (both rejected), never −inf.
    """
    coefs = (1 / 40320, 1 / 5040, 1 / 720, 1 / 120, 1 / 24, 1 / 6, 1 / 2)
    poly = jnp.zeros_like(r)
    for c in coefs:  # Horner
        poly = poly * r + c
    big = jnp.minimum(r, _MAX_LOG_RATIO)
    return jnp.where(jnp.abs(r) < 0.5, r * r * poly, jnp.expm1(big) - big)


def _correction_weights(config: CorrectionConfig, log_rho_BT: jax.Array, mask_BT: jax.Array):
    """Detached correction weights [B, T] and the `is/...` metrics.

    Statistics are over the units the correction acts on: valid tokens for token-level
    modes, non-empty sequences for sequence-level ones.
    """
    mode = config.mode
    valid_B = mask_BT.any(axis=1)
    clipped = masked = None
    if mode in ("none", "bypass"):
        unit_w, unit_valid = jnp.ones_like(log_rho_BT), mask_BT
        w_BT = unit_w
    elif mode in ("token_tis", "token_mis", "token_k3"):
        unit_valid = mask_BT
        if mode == "token_tis":
            log_c = math.log(config.high)
            clipped = log_rho_BT > log_c
            unit_w = jnp.exp(jnp.minimum(log_rho_BT, log_c))  # = min(ρ, C); no overflow possible
        elif mode == "token_mis":
            # Compare in log space: exact, and exp is only taken where r ≤ log U.
            keep = (log_rho_BT <= math.log(config.high)) & (
                log_rho_BT >= (math.log(config.low) if config.low > 0 else -jnp.inf))
            masked = ~keep
            unit_w = jnp.where(keep, jnp.exp(jnp.minimum(log_rho_BT, math.log(config.high))), 0.0)
        else:
            k3 = _k3(log_rho_BT)
            masked = ~(k3 <= config.high)
            unit_w = jnp.where(masked, 0.0, 1.0)
        w_BT = unit_w
    else:
        unit_valid = valid_B
        n_B = jnp.maximum(mask_BT.sum(axis=1), 1)
        log_w_B = log_rho_BT.sum(axis=1)  # log Π_t ρ_t; padded positions hold 0
        if mode == "seq_tis":
            log_c = math.log(config.high)
            clipped = log_w_B > log_c
            unit_w = jnp.exp(jnp.minimum(log_w_B, log_c))
        elif mode == "seq_mis":
            low = math.log(config.low) if config.low else -jnp.inf
            keep = (log_w_B <= math.log(config.high)) & (log_w_B >= low)
            masked = ~keep
            unit_w = jnp.where(keep, jnp.exp(jnp.minimum(log_w_B, math.log(config.high))), 0.0)
        elif mode == "geo_mask":
            mean_r_B = log_w_B / n_B  # log of the geometric mean of ρ
            masked = ~((mean_r_B >= math.log(config.low)) & (mean_r_B <= math.log(config.high)))
            unit_w = jnp.where(masked, 0.0, 1.0)
        else:  # seq_k3
            k3_B = jnp.where(mask_BT, _k3(log_rho_BT), 0.0).sum(axis=1) / n_B
            masked = ~(k3_B <= config.high)
            unit_w = jnp.where(masked, 0.0, 1.0)
        w_BT = jnp.broadcast_to(unit_w[:, None], mask_BT.shape)

    n_units = jnp.maximum(unit_valid.sum(), 1)
    w_mean, w_std, w_max = _masked_stats(unit_w, unit_valid)
    w2_mean = jnp.where(unit_valid, jnp.square(unit_w), 0).sum() / n_units
    zeros = jnp.zeros((), jnp.float32)
    frac = lambda flags: zeros if flags is None else (flags & unit_valid).sum() / n_units  # noqa: E731
    n_tok = jnp.maximum(mask_BT.sum(), 1)
    metrics = {
        "is/weight_mean": w_mean,
        "is/weight_std": w_std,
        "is/weight_max": w_max,
        "is/frac_clipped": frac(clipped),
        "is/frac_masked": frac(masked),
        "is/masked_token_frac": zeros if masked is None else (
            mask_BT & jnp.broadcast_to(masked if masked.ndim == 2 else masked[:, None], mask_BT.shape)).sum() / n_tok,
        # ESS fraction 1/mean(w̃²), w̃ = w/mean(w)  ⇔  mean(w)²/mean(w²); 0 if every weight is 0.
        "is/ess": jnp.where(w2_mean > 0, jnp.square(w_mean) / jnp.maximum(w2_mean, 1e-30), 0.0),
    }
    return w_BT, metrics


def loss_normalizer(mask_BT: jax.Array, config: LossConfig) -> jax.Array:
    """The denominator of ``config.aggregation`` for this batch (float32 scalar).

    ``token_mean``: number of response tokens; the three ``seq_mean_*`` modes: number of
    sequences with at least one response token (all-padding rows, e.g. from shape bucketing,
    do not dilute the loss). When a batch is split into micro-batches, compute this on the
    whole batch and pass it to every `compute_policy_loss` call: the micro-batch losses then
    *sum* to the whole-batch loss.
    """
    mask_BT = jnp.asarray(mask_BT).astype(bool)
    if config.aggregation == "token_mean":
        return mask_BT.sum().astype(jnp.float32)
    return mask_BT.any(axis=1).sum().astype(jnp.float32)


def compute_policy_loss(logp_BT: jax.Array, old_logp_BT: jax.Array, sampler_logp_BT: jax.Array,
                        advantages_B: jax.Array, mask_BT: jax.Array, config: LossConfig, *,
                        normalizer: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Policy-gradient loss with a sampler/trainer mismatch correction.

    With o_t the old policy's log-prob (``old_logp`` by default, ``sampler_logp`` in bypass
    mode, always detached), A_i the advantage, w the correction weight (`CorrectionConfig`)::

        ppo:        q_t = exp(log π_θ(y_t) − o_t)
                    pg_t = −min(q_t A_i, clip(q_t, 1 − ε_low, 1 + ε_high) A_i)
        reinforce:  pg_t = −q_t A_i        (∇ = −A_i ∇log π_θ at π_θ = π_old: REINFORCE)
        gspo:       s_i = exp(mean_t (log π_θ(y_t) − o_t))   (sequence ratio, length-normalised)
                    q_t = sg(s_i) · π_θ(y_t) / sg(π_θ(y_t))   (value s_i, ∇q_t = s_i ∇log π_θ(y_t))
                    pg_t = −min(q_t A_i, clip(q_t, 1 − ε_low, 1 + ε_high) A_i)
        l_t = w_t · pg_t

    GSPO is written in its token form (GSPO paper, eq. for GSPO-token with equal token
    advantages); with ``aggregation='seq_mean_token_mean'`` its value and gradient equal the
    paper's sequence-level objective −(1/G) Σ_i min(s_i A_i, clip(s_i) A_i).

    Aggregations (m the mask, n_i = Σ_t m_{i,t}, N the `normalizer`)::

        token_mean:               Σ_{i,t} m l / N,          N = Σ_{i,t} m
        seq_mean_token_sum:       Σ_i Σ_t m l / N,          N = #non-empty sequences
        seq_mean_token_mean:      Σ_i (Σ_t m l / n_i) / N,  N = #non-empty sequences
        seq_mean_token_sum_norm:  Σ_i Σ_t m l / (L N),      L = norm_length (Dr. GRPO), N as above

    Masked-out (rejected) tokens keep counting in N: rejection removes their gradient without
    enlarging the others', so the step size does not depend on the rejection rate.

    Args:
      logp_BT: [B, T] log π_θ of the sampled tokens; the only input differentiated.
      old_logp_BT: [B, T] trainer's rescored log-probs (treated as constants); not used in
        ``'bypass'`` mode.
      sampler_logp_BT: [B, T] sampler's log-probs (treated as constants).
      advantages_B: [B] advantages (treated as constants).
      mask_BT: [B, T] bool or 0/1, True on response tokens. Other positions may hold any
        value, even ±inf or NaN; they never reach the loss or its gradient.
      config: the `LossConfig`.
      normalizer: optional scalar N overriding `loss_normalizer(mask_BT, config)`, for
        micro-batching.

    Returns:
      ``(loss, metrics)``: float32 scalar and a dict of float32 scalars: ``loss/policy``,
      ``loss/clip_frac`` (fraction of tokens whose gradient the PPO/GSPO clip zeroes),
      ``loss/ratio_mean``, ``loss/ratio_max`` (q over tokens), and the correction's
      ``is/weight_mean``, ``is/weight_std``, ``is/weight_max``, ``is/frac_clipped``,
      ``is/frac_masked``, ``is/masked_token_frac``, ``is/ess``. The ``is/*`` statistics are of
      the weights w as applied (after truncation or masking; per token or per sequence as the
      correction works); the ESS of the raw token ratios ρ_t is ``mismatch/ess``.

    >>> cfg = LossConfig(correction=CorrectionConfig('token_tis', high=2.0))
    >>> lp = jnp.log(jnp.array([[0.5, 0.25]]))
    >>> loss, m = compute_policy_loss(lp, lp, lp - jnp.log(4.0), jnp.array([1.0]), jnp.ones((1, 2)), cfg)
    >>> float(loss), float(m['is/frac_clipped'])   # ρ = 4 is truncated to 2; −(2·1 + 2·1)/2
    (-2.0, 1.0)
    """
    shape = jnp.shape(logp_BT)
    if len(shape) != 2:
        raise ValueError(f"logp_BT must be [B, T], got shape {shape}.")
    for name, x in (("old_logp_BT", old_logp_BT), ("sampler_logp_BT", sampler_logp_BT), ("mask_BT", mask_BT)):
        if jnp.shape(x) != shape:
            raise ValueError(f"{name} has shape {jnp.shape(x)}, expected logp_BT's shape {shape}.")
    if jnp.shape(advantages_B) != shape[:1]:
        raise ValueError(f"advantages_B has shape {jnp.shape(advantages_B)}, expected [{shape[0]}] "
                         "(one advantage per sequence).")
    if not isinstance(config, LossConfig):
        raise ValueError(f"config must be a LossConfig, got {type(config).__name__}.")

    mask = jnp.asarray(mask_BT).astype(bool)
    f32 = jnp.float32
    # Loss math in float32 whatever the compute dtype: sums over thousands of tokens and
    # exp of log-ratios are where float16/bfloat16 would lose the signal or overflow.
    # `where` (not multiply) zeroes padding, so ±inf/NaN there cannot become NaN (0·inf).
    logp = jnp.where(mask, logp_BT.astype(f32), 0.0)
    # Detached: old policy, sampler and advantages are data of the estimator, not functions
    # of θ (see the module docstring).
    old = jax.lax.stop_gradient(jnp.where(mask, old_logp_BT.astype(f32), 0.0))
    samp = jax.lax.stop_gradient(jnp.where(mask, sampler_logp_BT.astype(f32), 0.0))
    adv_B1 = jax.lax.stop_gradient(advantages_B.astype(f32))[:, None]

    corr = config.correction
    if corr.mode == "bypass":
        ref = samp  # μ is the old policy: the PPO ratio itself is π_θ/μ
        w_BT, is_metrics = _correction_weights(corr, jnp.zeros_like(old), mask)
    else:
        ref = old
        w_BT, is_metrics = _correction_weights(corr, old - samp, mask)
    w_BT = jax.lax.stop_gradient(w_BT)  # already constant; explicit so no later edit can leak a gradient

    n_B = mask.sum(axis=1).astype(f32)
    if config.policy_loss == "gspo":
        # Mean log-ratio per sequence, clamped before exp (see _MAX_LOG_RATIO).
        log_s_B = jnp.where(mask, logp - ref, 0.0).sum(axis=1) / jnp.maximum(n_B, 1.0)
        log_s_B = jnp.clip(jax.lax.stop_gradient(log_s_B), -_MAX_LOG_RATIO, _MAX_LOG_RATIO)
        ratio = jnp.exp(log_s_B[:, None] + logp - jax.lax.stop_gradient(logp))
    else:
        ratio = jnp.exp(jnp.clip(logp - ref, -_MAX_LOG_RATIO, _MAX_LOG_RATIO))

    if config.policy_loss == "reinforce":
        pg = -ratio * adv_B1
        clipped_tok = jnp.zeros_like(mask)
    else:
        lo, hi = 1.0 - config.clip_eps_low, 1.0 + config.clip_eps_high
        pg = -jnp.minimum(ratio * adv_B1, jnp.clip(ratio, lo, hi) * adv_B1)
        q = jax.lax.stop_gradient(ratio)
        clipped_tok = ((adv_B1 > 0) & (q > hi)) | ((adv_B1 < 0) & (q < lo))

    l_BT = jnp.where(mask, w_BT * pg, 0.0)
    if config.aggregation == "seq_mean_token_mean":
        numerator = (l_BT.sum(axis=1) / jnp.maximum(n_B, 1.0)).sum()
    elif config.aggregation == "seq_mean_token_sum_norm":
        numerator = l_BT.sum() / config.norm_length
    else:  # token_mean and seq_mean_token_sum differ only in the normaliser
        numerator = l_BT.sum()
    if normalizer is None:
        normalizer = loss_normalizer(mask, config)
    loss = numerator / jnp.maximum(jnp.asarray(normalizer, f32), 1.0)

    n_tok = jnp.maximum(mask.sum(), 1)
    q = jax.lax.stop_gradient(ratio)
    metrics = {
        "loss/policy": jax.lax.stop_gradient(loss),
        "loss/clip_frac": (clipped_tok & mask).sum() / n_tok,
        "loss/ratio_mean": jnp.where(mask, q, 0.0).sum() / n_tok,
        "loss/ratio_max": jnp.where(mask.any(), jnp.where(mask, q, -jnp.inf).max(), 0.0),
        **is_metrics,
    }
    metrics = {k: jax.lax.stop_gradient(v.astype(f32)) for k, v in metrics.items()}
    return loss, metrics
