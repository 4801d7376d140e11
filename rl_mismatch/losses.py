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
* the correction weight is built from ρ_t = π_old(y_t)/μ(y_t) = exp(old_logp − sampler_logp),
  which corrects for sampling from μ instead of π_old: one IS weighting (truncated) and any
  rejection criteria, `rl_mismatch.corrections`.

In bypass mode μ itself is the old policy: the ratio is π_θ/μ (so PPO clipping bounds the
sampler/trainer mismatch directly) and there is no IS weight; rejection criteria may still
mask tokens.

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

from rl_mismatch import corrections

AdvantageMode = Literal["grpo", "dr_grpo"]
PolicyLoss = Literal["ppo", "reinforce", "gspo"]
Aggregation = Literal["token_mean", "seq_mean_token_sum", "seq_mean_token_mean", "seq_mean_token_sum_norm"]
# Re-exported: the correction settings live in `rl_mismatch.corrections`.
CorrectionConfig = corrections.CorrectionConfig
Correction = corrections.Correction
CorrectionMode = corrections.CorrectionMode
_MAX_LOG_RATIO = corrections.MAX_LOG_RATIO  # why ±20: see there


def _check_literal(value, literal, name: str):
    options = typing.get_args(literal)
    if value not in options:
        raise ValueError(f"{name} = {value!r} is not one of {list(options)}.")


# --------------------------------------------------------------------------------------------
# Advantages
# --------------------------------------------------------------------------------------------


def compute_advantages(rewards_B: jax.Array, group_size: int, mode: AdvantageMode = "grpo",
                       eps: float = 1e-6) -> jax.Array:
    """Group-baseline advantages; groups are consecutive runs of ``group_size`` responses.

    For response i of group g with rewards R_{g,1..G} (R, not r: r is the log-ratio elsewhere)::

        grpo:     A_i = (R_i − mean_g R) / (std_g R + eps)    std with ddof=1 (as TRL, verl, Tunix)
        dr_grpo:  A_i =  R_i − mean_g R                       (Dr. GRPO drops the std, arXiv 2503.20783)

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
class LossConfig:
    """Advantages, policy loss, aggregation and correction. Frozen and hashable: pass it as a jit
    static arg.

    It is also the ``loss`` group of an experiment config (`rl_mismatch.experiment_config`): the
    fields are the config keys, so they take the values a config file holds (``0`` for "off",
    the correction as a string). Every error message starts with the field's name, so the
    experiment config prefixes its path (``config.loss.clip_eps_low = 1.0 must be ...``).

    Attributes:
      advantage_mode: ``'grpo'`` or ``'dr_grpo'`` (`compute_advantages`).
      policy_loss: ``'ppo'`` (clipped surrogate), ``'reinforce'`` (unclipped), ``'gspo'``
        (sequence-level ratio, clipped); formulas in `compute_policy_loss`.
      clip_eps_low: PPO/GSPO lower clip ε_low, ratio clipped at 1 − ε_low (0 ≤ ε_low < 1).
      clip_eps_high: PPO/GSPO upper clip ε_high, ratio clipped at 1 + ε_high (DAPO's
        "clip-higher" uses 0.28; GSPO's paper 3e-4 / 4e-4).
      aggregation: how per-token losses become a scalar; see `compute_policy_loss`.
      norm_length: the constant L of ``'seq_mean_token_sum_norm'`` (Dr. GRPO uses the maximum
        generation length); required for that mode and 0 otherwise.
      correction: the sampler/trainer mismatch correction: a string (a preset name such as
        ``'token_tis'``, whose thresholds are ``correction_low``/``correction_high``, or a
        composition carrying its own, ``'seq_is(2) + seq_max_k3(0.1)'``:
        `rl_mismatch.corrections.parse_correction`), a `CorrectionConfig` or a `Correction`
        (default: no correction, ``CorrectionConfig()``; an experiment config's is ``'none'``).
        `resolved_correction` is it as a `Correction`.
      correction_low, correction_high: a preset string's thresholds (`CorrectionConfig`'s
        ``low``/``high``); None otherwise.
      dual_clip: dual-clip PPO's bound c > 1 (Ye et al. 2020; verl's ``clip_ratio_c``, default
        3 there): for A < 0 the per-token loss −q·A is capped at −c·A, so a token whose ratio
        q exceeds c stops pushing. 0 (default) is off. PPO and GSPO only.

    >>> str(LossConfig(correction="token_tis", correction_high=2.0).resolved_correction)
    'token_is(2.0)'
    """

    advantage_mode: AdvantageMode = "grpo"
    policy_loss: PolicyLoss = "ppo"
    clip_eps_low: float = 0.2
    clip_eps_high: float = 0.2
    aggregation: Aggregation = "token_mean"
    norm_length: int = 0
    correction: str | CorrectionConfig | Correction = CorrectionConfig()
    correction_low: float | None = None
    correction_high: float | None = None
    dual_clip: float = 0.0

    def __post_init__(self):
        _check_literal(self.advantage_mode, AdvantageMode, "advantage_mode")
        _check_literal(self.policy_loss, PolicyLoss, "policy_loss")
        _check_literal(self.aggregation, Aggregation, "aggregation")
        if not (_is_number(self.clip_eps_low) and 0 <= self.clip_eps_low < 1):
            raise ValueError(f"clip_eps_low = {self.clip_eps_low!r} must be in [0, 1) so that 1 - clip_eps_low > 0.")
        if not (_is_number(self.clip_eps_high) and self.clip_eps_high >= 0 and math.isfinite(self.clip_eps_high)):
            raise ValueError(f"clip_eps_high = {self.clip_eps_high!r} must be a finite number >= 0.")
        if isinstance(self.norm_length, bool) or not isinstance(self.norm_length, int):
            raise ValueError(f"norm_length = {self.norm_length!r} must be an int (0 unless "
                             "aggregation='seq_mean_token_sum_norm').")
        if self.aggregation == "seq_mean_token_sum_norm":
            if self.norm_length < 1:
                raise ValueError(f"norm_length = {self.norm_length!r}: aggregation='seq_mean_token_sum_norm' divides "
                                 "by it; set a positive int (Dr. GRPO: the maximum response length).")
        elif self.norm_length != 0:
            raise ValueError(f"norm_length = {self.norm_length!r} is only used by aggregation="
                             f"'seq_mean_token_sum_norm', not {self.aggregation!r}; leave it 0.")
        object.__setattr__(self, "_correction", self._resolve_correction())
        if not _is_number(self.dual_clip):
            raise ValueError(f"dual_clip = {self.dual_clip!r} must be a number (0 = off).")
        if self.dual_clip != 0:
            if self.policy_loss == "reinforce":
                raise ValueError(f"dual_clip = {self.dual_clip!r}: dual clip caps the clipped PPO/GSPO surrogate; "
                                 "policy_loss='reinforce' has none. Leave dual_clip 0.")
            if not (math.isfinite(self.dual_clip) and self.dual_clip > 1):
                raise ValueError(f"dual_clip = {self.dual_clip!r} must be 0 (off) or a finite number > 1 (verl's "
                                 "default is 3).")

    def _resolve_correction(self) -> Correction:
        if isinstance(self.correction, str):
            try:
                return corrections.parse_correction(self.correction, low=self.correction_low,
                                                    high=self.correction_high)
            except ValueError as e:
                raise ValueError(f"correction = {self.correction!r}: {e}") from None
        if not isinstance(self.correction, (CorrectionConfig, Correction)):
            raise ValueError(f"correction must be a string, a CorrectionConfig (a preset) or a Correction, got "
                             f"{type(self.correction).__name__}.")
        if self.correction_low is not None or self.correction_high is not None:
            raise ValueError("correction_low / correction_high are the thresholds of a preset named by a string; "
                             f"the {type(self.correction).__name__} given as correction carries its own. Leave "
                             "them None.")
        return corrections.resolve(self.correction)

    @property
    def resolved_correction(self) -> Correction:
        """``correction`` as a `Correction` (parsed once, when the config is made)."""
        return self._correction


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


# --------------------------------------------------------------------------------------------
# Pieces
# --------------------------------------------------------------------------------------------


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


def is_batch_mean(old_logp_BT: jax.Array, sampler_logp_BT: jax.Array, mask_BT: jax.Array,
                  config: LossConfig) -> jax.Array:
    """The divisor of batch-normalised IS weights over this batch (1.0 if the correction has none).

    When a batch is split into micro-batches, compute this on the whole batch and pass it to
    every `compute_policy_loss` call, as with `loss_normalizer`.
    """
    mask = jnp.asarray(mask_BT).astype(bool)
    old, samp = (jax.lax.stop_gradient(jnp.where(mask, x.astype(jnp.float32), 0.0))
                 for x in (old_logp_BT, sampler_logp_BT))
    return corrections.batch_mean(config.resolved_correction, old - samp, mask)


def _ratio(config: LossConfig, logp: jax.Array, ref: jax.Array, mask: jax.Array, n_B: jax.Array) -> jax.Array:
    """q_t: π_θ/π_old per token, or GSPO's sequence ratio with per-token gradient."""
    if config.policy_loss == "gspo":
        # Mean log-ratio per sequence, clamped before exp (see _MAX_LOG_RATIO).
        log_s_B = jnp.where(mask, logp - ref, 0.0).sum(axis=1) / jnp.maximum(n_B, 1.0)
        log_s_B = jnp.clip(jax.lax.stop_gradient(log_s_B), -_MAX_LOG_RATIO, _MAX_LOG_RATIO)
        return jnp.exp(log_s_B[:, None] + logp - jax.lax.stop_gradient(logp))
    return jnp.exp(jnp.clip(logp - ref, -_MAX_LOG_RATIO, _MAX_LOG_RATIO))


def _surrogate(config: LossConfig, ratio: jax.Array, adv_B1: jax.Array):
    """Per-token pg_t and the flags of the tokens whose gradient a clip zeroes (clip, dual clip)."""
    if config.policy_loss == "reinforce":
        return -ratio * adv_B1, jnp.zeros(ratio.shape, bool), None
    lo, hi = 1.0 - config.clip_eps_low, 1.0 + config.clip_eps_high
    pg = -jnp.minimum(ratio * adv_B1, jnp.clip(ratio, lo, hi) * adv_B1)
    q = jax.lax.stop_gradient(ratio)
    clipped = ((adv_B1 > 0) & (q > hi)) | ((adv_B1 < 0) & (q < lo))
    if not config.dual_clip:
        return pg, clipped, None
    # Dual clip: for A < 0 the loss −q·A grows without bound in q; cap it at −c·A.
    c = config.dual_clip
    return jnp.where(adv_B1 < 0, jnp.minimum(pg, -c * adv_B1), pg), clipped, (adv_B1 < 0) & (q > c)


def compute_policy_loss(logp_BT: jax.Array, old_logp_BT: jax.Array, sampler_logp_BT: jax.Array,
                        advantages_B: jax.Array, mask_BT: jax.Array, config: LossConfig, *,
                        normalizer: jax.Array | None = None,
                        is_batch_mean: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Policy-gradient loss with a sampler/trainer mismatch correction.

    With o_t the old policy's log-prob (``old_logp`` by default, ``sampler_logp`` in bypass
    mode, always detached), A_i the advantage, w the correction weight (`rl_mismatch.corrections`)::

        ppo:        q_t = exp(log π_θ(y_t) − o_t)
                    pg_t = −min(q_t A_i, clip(q_t, 1 − ε_low, 1 + ε_high) A_i)
                    with dual_clip c, for A_i < 0: pg_t = min(pg_t, −c A_i)
        reinforce:  pg_t = −q_t A_i        (∇ = −A_i ∇log π_θ at π_θ = π_old: REINFORCE)
        gspo:       s_i = exp(mean_t (log π_θ(y_t) − o_t))   (sequence ratio, length-normalised)
                    q_t = sg(s_i) · π_θ(y_t) / sg(π_θ(y_t))   (value s_i, ∇q_t = s_i ∇log π_θ(y_t))
                    pg_t = −min(q_t A_i, clip(q_t, 1 − ε_low, 1 + ε_high) A_i)   (dual clip as ppo)
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
        bypass mode (rejection criteria then act on log π_θ − log μ, detached).
      sampler_logp_BT: [B, T] sampler's log-probs (treated as constants).
      advantages_B: [B] advantages (treated as constants).
      mask_BT: [B, T] bool or 0/1, True on response tokens. Other positions may hold any
        value, even ±inf or NaN; they never reach the loss or its gradient.
      config: the `LossConfig`.
      normalizer: optional scalar N overriding `loss_normalizer(mask_BT, config)`, for
        micro-batching.
      is_batch_mean: optional divisor of batch-normalised IS weights overriding this batch's
        own (`is_batch_mean`), for micro-batching.

    Returns:
      ``(loss, metrics)``: float32 scalar and a dict of float32 scalars: ``loss/policy``,
      ``loss/clip_frac`` (fraction of tokens whose gradient the PPO/GSPO clip zeroes),
      ``loss/ratio_mean``, ``loss/ratio_max`` (q over tokens), with ``dual_clip`` also
      ``loss/dual_clip_frac`` (tokens whose gradient the dual clip zeroes), and the
      correction's statistics (`rl_mismatch.corrections.weights`): ``is/weight_mean``,
      ``is/weight_std``, ``is/weight_max``, ``is/frac_clipped``, ``is/frac_masked``,
      ``is/masked_token_frac``, ``is/ess`` of the weights w as applied (after truncation,
      batch normalisation and rejection; per token or per sequence as the correction works);
      with an IS weighting ``is/raw_ratio_{mean,std,min,max}`` of the ratios before
      truncation (and ``is/batch_norm_mean`` if batch-normalised); per rejection criterion
      ``is/reject/<criterion>/{token_frac,seq_frac}`` (and ``seq_touched_frac`` for a token
      criterion). The ESS of the raw token ratios ρ_t is ``mismatch/ess``. docs/metrics.md
      gives every key's formula and its nearest verl, Tunix and TRL key.

    >>> cfg = LossConfig(correction=CorrectionConfig('token_tis', high=2.0))
    >>> lp = jnp.log(jnp.array([[0.5, 0.25]]))
    >>> loss, m = compute_policy_loss(lp, lp, lp - jnp.log(4.0), jnp.array([1.0]), jnp.ones((1, 2)), cfg)
    >>> float(loss), float(m['is/frac_clipped'])   # ρ = 4 is truncated to 2; −(2·1 + 2·1)/2
    (-2.0, 1.0)
    """
    _check_loss_args(logp_BT, old_logp_BT, sampler_logp_BT, advantages_B, mask_BT, config)
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

    corr = config.resolved_correction
    # Bypass: μ is the old policy, so the PPO ratio itself is π_θ/μ and criteria act on it.
    ref = samp if corr.bypass else old
    log_rho = (jax.lax.stop_gradient(logp) if corr.bypass else old) - samp
    w_BT, is_metrics = corrections.weights(corr, log_rho, mask, norm_mean=is_batch_mean)
    w_BT = jax.lax.stop_gradient(w_BT)  # already constant; explicit so no later edit can leak a gradient

    n_B = mask.sum(axis=1).astype(f32)
    ratio = _ratio(config, logp, ref, mask, n_B)
    pg, clipped_tok, dual_tok = _surrogate(config, ratio, adv_B1)

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
        **({} if dual_tok is None else {"loss/dual_clip_frac": (dual_tok & mask).sum() / n_tok}),
        **is_metrics,
    }
    metrics = {k: jax.lax.stop_gradient(jnp.asarray(v).astype(f32)) for k, v in metrics.items()}
    return loss, metrics


def _check_loss_args(logp_BT, old_logp_BT, sampler_logp_BT, advantages_B, mask_BT, config):
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
