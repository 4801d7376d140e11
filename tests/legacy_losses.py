"""Frozen copy of the policy loss as it was before corrections became composable.

`rl_mismatch.losses` replaced its nine single correction modes with presets of composable
corrections; the presets must give the same bits as the modes did. This module is the earlier
implementation, computations unchanged (docstrings dropped), kept only as the reference for
that comparison in test_losses.py. Do not edit it.
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
# Configs
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CorrectionConfig:

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
        return self.mode in _SEQUENCE_MODES


@dataclasses.dataclass(frozen=True)
class LossConfig:

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
    n = jnp.maximum(valid.sum(), 1)
    mean = jnp.where(valid, x, 0).sum() / n
    var = jnp.where(valid, jnp.square(x - mean), 0).sum() / n
    mx = jnp.where(valid.any(), jnp.where(valid, x, -jnp.inf).max(), 0.0)
    return mean, jnp.sqrt(var), mx


def _k3(r: jax.Array) -> jax.Array:
    coefs = (1 / 40320, 1 / 5040, 1 / 720, 1 / 120, 1 / 24, 1 / 6, 1 / 2)
    poly = jnp.zeros_like(r)
    for c in coefs:  # Horner
        poly = poly * r + c
    big = jnp.minimum(r, _MAX_LOG_RATIO)
    return jnp.where(jnp.abs(r) < 0.5, r * r * poly, jnp.expm1(big) - big)


def _correction_weights(config: CorrectionConfig, log_rho_BT: jax.Array, mask_BT: jax.Array):
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
    mask_BT = jnp.asarray(mask_BT).astype(bool)
    if config.aggregation == "token_mean":
        return mask_BT.sum().astype(jnp.float32)
    return mask_BT.any(axis=1).sum().astype(jnp.float32)


def compute_policy_loss(logp_BT: jax.Array, old_logp_BT: jax.Array, sampler_logp_BT: jax.Array,
                        advantages_B: jax.Array, mask_BT: jax.Array, config: LossConfig, *,
                        normalizer: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
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
