"""Sampler/trainer mismatch corrections: one IS weighting and any number of rejection criteria.

With r_t = log π_old(y_t) − log μ(y_t) the per-token log-ratio (ρ_t = exp r_t, see
`rl_mismatch.losses`) and R_i = Σ_t r_t its sequence sum (Π_t ρ_t = exp R_i), a `Correction`
gives every response token a detached weight

    w_{i,t} = v_{i,t} · keep_{i,t}

* ``v`` is the **IS weighting** (`ISWeight`, at most one): none (v = 1), token
  (v_t = min(ρ_t, C)) or sequence (v_i = min(Π_t ρ_t, C)). With ``batch_normalize`` the
  truncated weights are divided by their mean over the valid units (tokens, or non-empty
  sequences) of the whole batch, rejected units included.
* ``keep`` is 1 unless a **rejection criterion** (`Reject`, zero or more) rejects the token, or
  the sequence it belongs to. Each criterion acts on its own level; a token rejected by any
  of them gets weight 0 (its gradient goes; the loss normaliser still counts it, so rejection
  does not enlarge the other tokens' steps).

Criteria (``k2_t = r_t²/2``, ``k3_t = ρ_t − 1 − r_t``, n_i the sequence's token count):

==============  =========  =============================================  ==========
criterion       level      keeps a unit when                              thresholds
==============  =========  =============================================  ==========
token_ratio     token      L ≤ ρ_t ≤ U                                    [L,] U
seq_ratio       sequence   L ≤ Π_t ρ_t ≤ U                                [L,] U
geo_ratio       sequence   L ≤ exp(Σ_t r_t / n_i) ≤ U   (geometric mean)  [L,] U
token_k2        token      k2_t ≤ δ                                       δ
token_k3        token      k3_t ≤ δ                                       δ
seq_sum_k2/k3   sequence   Σ_t k_t ≤ δ                                    δ
seq_mean_k2/k3  sequence   Σ_t k_t / n_i ≤ δ                              δ
seq_max_k2/k3   sequence   max_t k_t ≤ δ                                  δ
==============  =========  =============================================  ==========

A ratio criterion without L (or with L = 0) has no lower bound. Comparisons are made in log
space, and k3 is computed accurately for tiny r (`_k3`), so thresholds of 1e-8 mean what
they say in float32. An empty row is never rejected (it has no tokens to reject).

**Bypass** (``Correction(bypass=True)``): μ itself is the PPO/GSPO old policy, so the ratio
π_θ/μ already carries ρ and no IS weighting may be added (it would count ρ twice); rejection
criteria may, and then act on r_t = log π_θ(y_t) − log μ(y_t) (detached).

Strings. `parse_correction` reads the form used in configs: a preset name (thresholds given
apart, see `CorrectionConfig`), or parts joined by ``+``::

    token_is(2)                          token TIS, C = 2
    seq_is(2, batch_norm)                sequence TIS, batch-normalised
    seq_is(2) + seq_mean_k3(0.01)        sequence TIS and sequence-mean k3 rejection
    geo_ratio(0.5, 2) + token_is(2)      geometric-mean rejection and token TIS
    token_ratio(0.5, 2) + seq_max_k2(1)  token ratio bounds and sequence-max k2
    bypass + geo_ratio(0.999, 1.001)     μ as the old policy, with rejection

``str(correction)`` writes this form back.

Presets, today's single modes, and their nearest verl (``algorithm.rollout_correction``)
equivalent (preset methods of verl's ``RolloutCorrectionConfig`` in brackets):

==============  ==============================  ========================================================
preset          composition                     verl
==============  ==============================  ========================================================
none            (nothing)                       rollout_is=null, rollout_rs=null  [disabled()]
bypass          bypass                          bypass_mode=true, loss_type=ppo_clip  [bypass_ppo_clip()]
token_tis C     token_is(C)                     rollout_is=token, rollout_is_threshold=C  [decoupled_token_is(C)]
seq_tis C       seq_is(C)                       rollout_is=sequence, rollout_is_threshold=C  [decoupled_seq_is(C)]
token_mis L U   token_is(U) + token_ratio(L,U)  rollout_is=token, threshold U, rollout_rs=token_k1, rollout_rs_threshold="1/U_1/L"
seq_mis L U     seq_is(U) + seq_ratio(L,U)      [decoupled_seq_is_rs(is_threshold=U, rs_threshold="1/U_1/L")]  (seq_sum_k1)
geo_mask L U    geo_ratio(L,U)                  [decoupled_geo_rs(rs_threshold="1/U_1/L")]  (seq_mean_k1)
token_k3 δ      token_k3(δ)                     rollout_rs=token_k3, rollout_rs_threshold=δ
seq_k3 δ        seq_mean_k3(δ)                  [decoupled_k3_rs(rs_threshold=δ)]  (seq_mean_k3)
==============  ==============================  ========================================================

("1/U" is the number 1/U written out, e.g. "0.5_2.0" for L = 0.5, U = 2.) Porting verl's k1
bounds: verl's ``token_k1``, ``seq_sum_k1`` and ``seq_mean_k1`` bound ``−r`` (summed or
averaged), that is **1/ρ**, not ρ. A verl threshold ``"a_b"`` keeps a ≤ 1/ρ ≤ b, i.e.
1/b ≤ ρ ≤ 1/a: write ``token_ratio(1/b, 1/a)`` (``seq_ratio``, ``geo_ratio`` for the sequence
forms). An asymmetric pair flips: verl's ``"0.8_1.5"`` is ``token_ratio(0.667, 1.25)``, not
``token_ratio(0.8, 1.5)``. A single verl number u means ``"1/u_u"``, which is symmetric and
ports as ``token_ratio(1/u, u)``. verl's k1 needs both bounds; this project's one-sided
``seq_ratio(U)`` ports as a huge upper bound on 1/ρ, ``"1/U_1e30"``.

Other differences from verl: verl removes rejected tokens from the response mask, so they no
longer count in a token-mean denominator (here they do); verl clamps r to ±20 before its k2/k3
and IS weights (here only where a value is exponentiated: a clamped r is rejected by either);
verl's bypass mode with ``loss_type=reinforce`` and IS weights is this project's
``policy_loss='reinforce'`` with ``token_is``/``seq_is`` and no bypass (one update per
rollout makes π_θ = π_old in value, so both give −w·A·∇log π_θ).
"""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from typing import Literal

import jax
import jax.numpy as jnp

ISLevel = Literal["token", "sequence"]
Criterion = Literal["token_ratio", "seq_ratio", "geo_ratio", "token_k2", "token_k3", "seq_sum_k2", "seq_sum_k3",
                    "seq_mean_k2", "seq_mean_k3", "seq_max_k2", "seq_max_k3"]
CorrectionMode = Literal[
    "none", "token_tis", "token_mis", "seq_tis", "seq_mis", "geo_mask", "token_k3", "seq_k3", "bypass"]

_TOKEN_CRITERIA = ("token_ratio", "token_k2", "token_k3")
_RATIO_CRITERIA = ("token_ratio", "seq_ratio", "geo_ratio")
_IS_PARTS = {"token_is": "token", "seq_is": "sequence"}
BATCH_NORM = "batch_norm"  # the flag of an IS part in a correction string: seq_is(2, batch_norm)

# Log-ratios are clamped to ±MAX_LOG_RATIO before `exp` where the result is used as a value:
# exp(20) ≈ 4.9e8 is far past any clip range, while exp(89) already overflows float32 and an
# inf ratio times a zero advantage (or a masked-out token) would give NaN. The clamp only
# changes tokens whose ratio is beyond 4.9e8 (or below 2e-9); their gradient becomes zero.
MAX_LOG_RATIO = 20.0


def _check_literal(value, literal, name: str):
    options = typing.get_args(literal)
    if value not in options:
        raise ValueError(f"{name}={value!r} is not one of {list(options)}.")


def _check_number(value, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}.")


def _num(x: float) -> str:
    return repr(float(x))


# --------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ISWeight:
    """An importance weighting: ρ per token or Π_t ρ_t per sequence, truncated at ``high``.

    Attributes:
      level: ``'token'`` or ``'sequence'``.
      high: the truncation C > 0: v = min(ratio, C).
      batch_normalize: divide the truncated weights by their mean over the valid units of the
        whole batch (verl's ``rollout_is_batch_normalize``).
    """

    level: ISLevel
    high: float
    batch_normalize: bool = False

    def __post_init__(self):
        _check_literal(self.level, ISLevel, "ISWeight.level")
        _check_number(self.high, "ISWeight.high")
        if self.high <= 0:
            raise ValueError(f"ISWeight.high (the truncation C) must be > 0, got {self.high}.")
        if not isinstance(self.batch_normalize, bool):
            raise ValueError(f"ISWeight.batch_normalize must be a bool, got {self.batch_normalize!r}.")

    def __str__(self):
        name = "token_is" if self.level == "token" else "seq_is"
        return f"{name}({_num(self.high)}{', ' + BATCH_NORM if self.batch_normalize else ''})"


@dataclasses.dataclass(frozen=True)
class Reject:
    """A rejection criterion (table in the module docstring).

    Attributes:
      criterion: its name, e.g. ``'seq_max_k3'``.
      high: U for a ratio criterion, δ for a k2/k3 one (> 0).
      low: L of a ratio criterion (None or 0: no lower bound); must be None for k2/k3.
    """

    criterion: Criterion
    high: float
    low: float | None = None

    def __post_init__(self):
        _check_literal(self.criterion, Criterion, "Reject.criterion")
        _check_number(self.high, f"Reject({self.criterion!r}).high")
        if self.high <= 0:
            raise ValueError(f"Reject({self.criterion!r}).high must be > 0, got {self.high}.")
        if self.low is None:
            return
        if self.criterion not in _RATIO_CRITERIA:
            raise ValueError(f"Reject({self.criterion!r}) bounds a divergence from above only; leave `low` None "
                             f"(lower bounds belong to {list(_RATIO_CRITERIA)}).")
        _check_number(self.low, f"Reject({self.criterion!r}).low")
        if not 0 <= self.low < self.high:
            raise ValueError(f"Reject({self.criterion!r}) needs 0 <= low < high, got low={self.low}, "
                             f"high={self.high}.")

    @property
    def level(self) -> ISLevel:
        return "token" if self.criterion in _TOKEN_CRITERIA else "sequence"

    def __str__(self):
        bounds = (self.low, self.high) if self.low is not None else (self.high,)
        return f"{self.criterion}({', '.join(map(_num, bounds))})"


@dataclasses.dataclass(frozen=True)
class Correction:
    """One IS weighting (or none) with zero or more rejection criteria; see the module docstring.

    Attributes:
      weight: the `ISWeight`, or None for v = 1.
      reject: the `Reject` criteria (a list is stored as a tuple); at most one of each name.
      bypass: μ is the PPO/GSPO old policy (no `weight` then).
    """

    weight: ISWeight | None = None
    reject: tuple[Reject, ...] = ()
    bypass: bool = False

    def __post_init__(self):
        object.__setattr__(self, "reject", tuple(self.reject))
        if self.weight is not None and not isinstance(self.weight, ISWeight):
            raise ValueError(f"Correction.weight must be an ISWeight or None, got {self.weight!r}.")
        for r in self.reject:
            if not isinstance(r, Reject):
                raise ValueError(f"Correction.reject must hold Reject criteria, got {r!r}.")
        names = [r.criterion for r in self.reject]
        if len(set(names)) != len(names):
            raise ValueError(f"Correction.reject names a criterion twice ({names}); give each one once, with "
                             "the bounds you want.")
        if not isinstance(self.bypass, bool):
            raise ValueError(f"Correction.bypass must be a bool, got {self.bypass!r}.")
        if self.bypass and self.weight is not None:
            raise ValueError(
                "A bypass correction cannot have an IS weighting: the PPO/GSPO ratio π_θ/μ already carries ρ, and "
                "a weight would count it twice. For verl's bypass + loss_type=reinforce + IS, use "
                "policy_loss='reinforce' with token_is/seq_is and no bypass.")

    @property
    def sequence_level(self) -> bool:
        """True if the applied weight is one number per sequence (every part acts on sequences)."""
        levels = [r.level for r in self.reject] + ([self.weight.level] if self.weight else [])
        return bool(levels) and all(level == "sequence" for level in levels)

    def __str__(self):
        parts = (["bypass"] if self.bypass else []) + ([str(self.weight)] if self.weight else [])
        parts += [str(r) for r in self.reject]
        return " + ".join(parts) or "none"


# Which of (low, high) each preset needs: "req" required, "opt" optional, absent = must be None.
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

_PRESETS = {
    "none": lambda low, high: Correction(),
    "bypass": lambda low, high: Correction(bypass=True),
    "token_tis": lambda low, high: Correction(ISWeight("token", high)),
    "seq_tis": lambda low, high: Correction(ISWeight("sequence", high)),
    "token_mis": lambda low, high: Correction(ISWeight("token", high), (Reject("token_ratio", high, low),)),
    "seq_mis": lambda low, high: Correction(ISWeight("sequence", high), (Reject("seq_ratio", high, low),)),
    "geo_mask": lambda low, high: Correction(reject=(Reject("geo_ratio", high, low),)),
    "token_k3": lambda low, high: Correction(reject=(Reject("token_k3", high),)),
    "seq_k3": lambda low, high: Correction(reject=(Reject("seq_mean_k3", high),)),
}


@dataclasses.dataclass(frozen=True)
class CorrectionConfig:
    """A named preset: one of the single correction modes, and its thresholds.

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

    Each is a `Correction` (``.correction``; the module docstring lists the compositions and
    their verl equivalents), with the same numbers, bit for bit, as the single modes had.
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
            _check_number(value, f"CorrectionConfig.{name}")
        if self.high is not None and self.high <= 0:
            raise ValueError(f"CorrectionConfig.high must be > 0, got {self.high}.")
        if self.low is not None:
            if self.low < 0 or (self.mode == "geo_mask" and self.low == 0):
                raise ValueError(f"CorrectionConfig.low must be {'> 0' if self.mode == 'geo_mask' else '>= 0'} "
                                 f"for mode {self.mode!r}, got {self.low}.")
            if self.low >= self.high:
                raise ValueError(f"CorrectionConfig needs low < high, got low={self.low}, high={self.high}.")

    @property
    def correction(self) -> Correction:
        """The preset as a composed `Correction`."""
        return _PRESETS[self.mode](self.low, self.high)

    @property
    def sequence_level(self) -> bool:
        """True if the weight is one number per sequence."""
        return self.correction.sequence_level


def resolve(correction: Correction | CorrectionConfig) -> Correction:
    """The `Correction` of a preset or of a correction itself."""
    if isinstance(correction, CorrectionConfig):
        return correction.correction
    if isinstance(correction, Correction):
        return correction
    raise ValueError(f"A correction must be a Correction or a CorrectionConfig, got {type(correction).__name__}.")


_PART = re.compile(r"^([a-z0-9_]+)\s*(?:\((.*)\))?$")
_PART_FORMS = ("token_is(C[, batch_norm])", "seq_is(C[, batch_norm])", "bypass",
               *(f"{c}([L, ]U)" for c in _RATIO_CRITERIA),
               *(f"{c}(δ)" for c in typing.get_args(Criterion) if c not in _RATIO_CRITERIA))


def parse_correction(spec: str, low: float | None = None, high: float | None = None) -> Correction:
    """The `Correction` a config string names (grammar and examples in the module docstring).

    Args:
      spec: a preset name (``'token_tis'``), whose thresholds are ``low``/``high``, or parts
        joined by ``+`` that carry their own thresholds (``'seq_is(2) + seq_max_k3(0.1)'``).
      low, high: the preset's thresholds (`CorrectionConfig`); None for a composed string.

    Raises:
      ValueError: naming the part that is wrong and the forms a part may take.
    """
    if not isinstance(spec, str):
        raise ValueError(f"A correction string must be a str, got {spec!r}.")
    spec = spec.strip()
    if spec in _PRESETS:
        return CorrectionConfig(spec, low=low, high=high).correction
    if low is not None or high is not None:
        raise ValueError(f"low/high are the thresholds of a preset ({list(_PRESETS)}); the composed correction "
                         f"{spec!r} carries its thresholds in its parts, e.g. 'token_is(2) + geo_ratio(0.5, 2)'.")
    weight, reject, bypass = None, [], False
    for part in spec.split("+"):
        name, args = _split_part(part.strip(), spec)
        if name == "bypass" and not args:
            bypass = True
        elif name in _IS_PARTS:
            if weight is not None:
                raise ValueError(f"Correction {spec!r} has two IS weightings; a correction has at most one.")
            weight = _parse_is(name, args, spec)
        elif name in typing.get_args(Criterion):
            reject.append(_parse_reject(name, args, spec))
        else:
            raise ValueError(f"Correction {spec!r}: {part.strip()!r} is not a part; a part is one of "
                             f"{list(_PART_FORMS)}, or the whole string is a preset {list(_PRESETS)}.")
    return Correction(weight, tuple(reject), bypass)


def _split_part(part: str, spec: str) -> tuple[str, list[str]]:
    match = _PART.match(part)
    if not match:
        raise ValueError(f"Correction {spec!r}: cannot read the part {part!r}; write name(arguments), "
                         "e.g. seq_is(2) or geo_ratio(0.5, 2), and join parts with '+'.")
    name, args = match.group(1), match.group(2)
    return name, [] if args is None or not args.strip() else [a.strip() for a in args.split(",")]


def _number(text: str, part: str, spec: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"Correction {spec!r}: {part}'s argument {text!r} is not a number.") from None


def _parse_is(name: str, args: list[str], spec: str) -> ISWeight:
    if not args or any(a != BATCH_NORM for a in args[1:]) or len(args) > 2:
        raise ValueError(f"Correction {spec!r}: write {name}(C) or {name}(C, {BATCH_NORM}), with C the truncation.")
    return ISWeight(_IS_PARTS[name], _number(args[0], name, spec), batch_normalize=len(args) == 2)


def _parse_reject(name: str, args: list[str], spec: str) -> Reject:
    ratio = name in _RATIO_CRITERIA
    if not (len(args) == 1 or (ratio and len(args) == 2)):
        form = f"{name}(U) or {name}(L, U)" if ratio else f"{name}(δ)"
        raise ValueError(f"Correction {spec!r}: write {form}.")
    values = [_number(a, name, spec) for a in args]
    return Reject(name, values[-1], values[0] if len(values) == 2 else None)


# --------------------------------------------------------------------------------------------
# Weights and statistics
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
    expm1(r) − r, with r clamped above at MAX_LOG_RATIO so exp stays finite: k3 is exact up to
    r = 20 and > 4.8e8 beyond, so a clamped token is rejected by any sane threshold. r = +inf
    gives 4.8e8 and r = −inf gives +inf (both rejected), never −inf.
    """
    coefs = (1 / 40320, 1 / 5040, 1 / 720, 1 / 120, 1 / 24, 1 / 6, 1 / 2)
    poly = jnp.zeros_like(r)
    for c in coefs:  # Horner
        poly = poly * r + c
    big = jnp.minimum(r, MAX_LOG_RATIO)
    return jnp.where(jnp.abs(r) < 0.5, r * r * poly, jnp.expm1(big) - big)


def _truncated(weight: ISWeight, log_rho_BT: jax.Array, mask_BT: jax.Array):
    """(v, clipped, log ratio, valid) per unit of the weighting's level: [B, T] or [B]."""
    if weight.level == "token":
        log_w, valid = log_rho_BT, mask_BT
    else:
        log_w, valid = log_rho_BT.sum(axis=1), mask_BT.any(axis=1)  # log Π_t ρ_t; padding holds 0
    log_c = math.log(weight.high)
    return jnp.exp(jnp.minimum(log_w, log_c)), log_w > log_c, log_w, valid  # min(ρ, C): no overflow


def _unit_mean(x: jax.Array, valid: jax.Array) -> jax.Array:
    return jnp.where(valid, x, 0.0).sum() / jnp.maximum(valid.sum(), 1)


def batch_mean(correction: Correction, log_rho_BT: jax.Array, mask_BT: jax.Array) -> jax.Array:
    """The divisor of batch-normalised IS weights: the mean truncated weight over valid units.

    1.0 when the correction does not batch-normalise. ``log_rho_BT`` must hold 0 off the mask.
    """
    weight = correction.weight
    if weight is None or not weight.batch_normalize:
        return jnp.ones((), jnp.float32)
    v, _, _, valid = _truncated(weight, log_rho_BT, mask_BT)
    return _unit_mean(v, valid)


def _keep(reject: Reject, log_rho_BT: jax.Array, mask_BT: jax.Array, n_B: jax.Array) -> jax.Array:
    """Keep flags of one criterion: [B, T] for a token criterion, [B] for a sequence one."""
    name = reject.criterion
    if name in _RATIO_CRITERIA:
        x = log_rho_BT if name == "token_ratio" else log_rho_BT.sum(axis=1)  # log ρ_t or log Π_t ρ_t
        if name == "geo_ratio":
            x = x / n_B  # log of the geometric mean of ρ
        low = math.log(reject.low) if reject.low else -jnp.inf
        return (x <= math.log(reject.high)) & (x >= low)  # in log space: exact, nothing exponentiated
    k_BT = _k3(log_rho_BT) if name.endswith("k3") else 0.5 * log_rho_BT * log_rho_BT
    if name.startswith("token"):
        stat = k_BT
    elif name.startswith("seq_max"):
        stat = jnp.where(mask_BT, k_BT, -jnp.inf).max(axis=1)  # an empty row: −inf, kept
    else:
        stat = jnp.where(mask_BT, k_BT, 0.0).sum(axis=1)
        if name.startswith("seq_mean"):
            stat = stat / n_B
    return stat <= reject.high


def _raw_ratio_stats(log_w: jax.Array, valid: jax.Array) -> dict[str, jax.Array]:
    """Mean, std, min, max of the ratios before truncation (log clamped at ±20 to stay finite)."""
    raw = jnp.exp(jnp.clip(log_w, -MAX_LOG_RATIO, MAX_LOG_RATIO))
    mean, std, mx = _masked_stats(raw, valid)
    mn = jnp.where(valid.any(), jnp.where(valid, raw, jnp.inf).min(), 0.0)
    return {"is/raw_ratio_mean": mean, "is/raw_ratio_std": std, "is/raw_ratio_min": mn, "is/raw_ratio_max": mx}


def _rejection_stats(name: str, keep: jax.Array, mask_BT: jax.Array, valid_B: jax.Array) -> dict[str, jax.Array]:
    """Fractions of valid tokens and of non-empty sequences one criterion rejects."""
    n_tok, n_seq = jnp.maximum(mask_BT.sum(), 1), jnp.maximum(valid_B.sum(), 1)
    prefix = f"is/reject/{name}"
    if keep.ndim == 1:
        return {f"{prefix}/token_frac": (mask_BT & ~keep[:, None]).sum() / n_tok,
                f"{prefix}/seq_frac": (valid_B & ~keep).sum() / n_seq}
    rejected_BT = mask_BT & ~keep
    return {f"{prefix}/token_frac": rejected_BT.sum() / n_tok,
            f"{prefix}/seq_frac": (valid_B & ~(mask_BT & keep).any(axis=1)).sum() / n_seq,  # every token rejected
            f"{prefix}/seq_touched_frac": rejected_BT.any(axis=1).sum() / n_seq}  # at least one rejected


def _applied_weight_stats(w, unit_valid, clipped, masked, mask_BT) -> dict[str, jax.Array]:
    """The ``is/`` statistics of the weights as applied, over the units they act on."""
    n_units = jnp.maximum(unit_valid.sum(), 1)
    w_mean, w_std, w_max = _masked_stats(w, unit_valid)
    w2_mean = jnp.where(unit_valid, jnp.square(w), 0).sum() / n_units
    zeros = jnp.zeros((), jnp.float32)
    frac = lambda flags: zeros if flags is None else (flags & unit_valid).sum() / n_units  # noqa: E731
    n_tok = jnp.maximum(mask_BT.sum(), 1)
    return {
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


def weights(correction: Correction, log_rho_BT: jax.Array, mask_BT: jax.Array, *,
            norm_mean: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Correction weights w [B, T] and the ``is/`` metrics (not yet detached: the caller detaches).

    The applied weights' statistics (``is/weight_*``, ``frac_*``, ``ess``) are over the units the
    correction acts on: non-empty sequences when every part acts on sequences, valid tokens
    otherwise. ``is/raw_ratio_*`` (with a weighting) are over the weighting's own units.

    Args:
      correction: the `Correction`.
      log_rho_BT: r = log π_old − log μ per token, 0 off the mask.
      mask_BT: bool, True on response tokens.
      norm_mean: the batch-normalisation divisor when it comes from a larger batch than this
        one (`batch_mean` of the whole batch); None computes it here.
    """
    B, T = mask_BT.shape
    valid_B = mask_BT.any(axis=1)
    n_B = jnp.maximum(mask_BT.sum(axis=1), 1)
    seq_units = correction.sequence_level
    lift = lambda x: x if seq_units or x.ndim == 2 else jnp.broadcast_to(x[:, None], (B, T))  # noqa: E731
    metrics = {}

    weight = correction.weight
    if weight is None:
        v, clipped = jnp.ones((B,) if seq_units else (B, T), log_rho_BT.dtype), None
    else:
        v, clipped, log_w, valid = _truncated(weight, log_rho_BT, mask_BT)
        metrics.update(_raw_ratio_stats(log_w, valid))
        if weight.batch_normalize:
            mean = _unit_mean(v, valid) if norm_mean is None else norm_mean
            v = v / jnp.where(mean > 0, mean, 1.0)
            metrics["is/batch_norm_mean"] = mean
        v, clipped = lift(v), lift(clipped)

    keep = None
    for reject in correction.reject:
        k = _keep(reject, log_rho_BT, mask_BT, n_B)
        metrics.update(_rejection_stats(reject.criterion, k, mask_BT, valid_B))
        keep = lift(k) if keep is None else keep & lift(k)

    w = v if keep is None else jnp.where(keep, v, 0.0)
    if clipped is not None and keep is not None:
        clipped = clipped & keep  # a rejected unit's weight is 0, not C
    stats = _applied_weight_stats(w, valid_B if seq_units else mask_BT, clipped, None if keep is None else ~keep,
                                  mask_BT)
    w_BT = w if w.ndim == 2 else jnp.broadcast_to(w[:, None], (B, T))
    return w_BT, {**stats, **metrics}
