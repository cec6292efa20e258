r"""Policy-gradient losses for online RLHF on one interface: REINFORCE, RLOO, GRPO, GSPO, CISPO, SAPO, PPO.

Every loss here is

    fn(logp, old_logp, advantages, mask, *, <keyword-only data extras>, <hyperparameters>) -> LossOutput

* ``logp`` ``(b, t)``: log-probs \(\ell_{i,t}\) of the sampled tokens under the current policy (with grad);
  ``old_logp`` ``(b, t)``: under the sampling policy, \(\ell^{old}_{i,t}\) (``None`` = on-policy, where the
  loss allows it: ``logp.detach()``, so every ratio is exactly 1 with the right gradient); ``advantages``:
  ``(b,)`` per sequence (broadcast over its tokens) or ``(b, t)`` per token, \(A_{i,t}\); ``mask`` ``(b, t)``
  **bool**, True on the completion tokens that count (left or right padding both fine).
* Extras (keyword-only, registered as ``extras``): ``ref_logp`` (GRPO's KL), ``values`` / ``old_values`` /
  ``returns`` / ``entropy`` (PPO, REINFORCE's learned baseline); on every clipped variant ``sampler_logp``
  (behaviour-policy correction, [`behaviour_weights`][prefopt.losses.policy_gradient.behaviour_weights])
  and ``policy_mask`` (the tokens whose policy term counts, e.g. OPSM or the top-ρ entropy mask).
* Out: ``loss`` ``(b, t)`` per token, **exactly 0 where ``mask`` is False**; every metric is a detached
  ``(b, t)`` tensor, 0 where masked. The caller reduces both with
  [`aggregate`][prefopt.masked.aggregate] (``"token-mean"``, ``"seq-mean-token-mean"``, ...), e.g.
  ``aggregate(out.loss, mask, "seq-mean-token-mean")`` is GRPO's paper objective, and
  ``masked_mean(out.metrics["ratio"], mask)`` the batch's mean ratio.
* Advantages, returns and ``old_*`` inputs are constants (detached inside).

Robustness, shared by every loss:

* Masked positions never reach the value or the gradient: every input is selected with ``torch.where``
  before any arithmetic, so NaN/inf there give a finite loss and an exactly-zero, finite gradient (tested
  for every loss and every input).
* The log-ratio \(\log\rho = \ell - \ell^{old}\) is clamped to \([-20, 20]\) before ``exp`` (as verl does), so
  a ratio never overflows: beyond \(e^{\pm 20}\) the ratio saturates and its gradient is 0. Inside the clamp
  the values are the textbook ones. A clipped token's gradient is exactly 0 (its branch is selected with
  ``torch.where``, never multiplied by 0), and a zero advantage gives exactly 0.
* GRPO's k3 term clamps its log-ratio to \([-20, 20]\) likewise, so it stays finite (at most \(e^{20}\)).

The shared core is ``_clipped`` (the PPO clipped surrogate on a log-ratio, with the optional dual clip and
INTELLECT-2 δ caps); a variant that changes the ratio (a sequence-level ratio, a stop-gradient weight) is a
few lines on top of it. The behaviour correction, OPSM and ``policy_mask`` are one shared helper applied to
the policy term of every clipped variant (``_policy_keep``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from prefopt.registry import ge, gt, one_of, register_loss
from prefopt.types import LossOutput, check_mask, check_tensor

__all__ = [
    "CORRECTIONS",
    "LOG_RATIO_CLAMP",
    "behaviour_weights",
    "cispo",
    "grpo",
    "gspo",
    "gspo_token",
    "off_policy_sequence_mask",
    "ppo",
    "reinforce",
    "rloo",
    "sapo",
]

LOG_RATIO_CLAMP = 20.0
"""Log-ratios (policy vs. sampling policy, policy vs. reference) are clamped to ``±LOG_RATIO_CLAMP``."""


# ----------------------------------------------------------------------------------------------------------
# input selection and validation
# ----------------------------------------------------------------------------------------------------------


def _zero(x: Tensor) -> Tensor:
    return torch.zeros((), dtype=x.dtype, device=x.device)


def _tokens(name: str, x: Any, mask: Tensor, *, detach: bool = False, like: str = "logp") -> Tensor:
    """Validate a ``(b, t)`` tensor of ``mask``'s shape and select it: 0 where masked (before any arithmetic)."""
    check_tensor(name, x, ndim=2)
    if x.shape != mask.shape:
        raise ValueError(f"{name} has shape {tuple(x.shape)} but {like} has shape {tuple(mask.shape)}")
    if detach:
        x = x.detach()
    return torch.where(mask, x, _zero(x))


def _per_token(name: str, x: Any, mask: Tensor, *, detach: bool = True) -> Tensor:
    """Accept ``(b,)`` (broadcast over tokens) or ``(b, t)``; return the selected ``(b, t)`` tensor."""
    check_tensor(name, x)
    shape = mask.shape
    if x.ndim == 1 and x.shape[0] == shape[0]:
        x = x.unsqueeze(1).expand(shape)
    elif x.shape != shape:
        raise ValueError(
            f"{name} has shape {tuple(x.shape)}; expected ({shape[0]},) per sequence or {tuple(shape)} per token"
        )
    if detach:
        x = x.detach()
    return torch.where(mask, x, _zero(x))


def _mask(mask: Any, logp: Any) -> Tensor:
    check_tensor("logp", logp, ndim=2)
    return check_mask("mask", mask, tuple(logp.shape), "logp")


def _log_ratio(logp: Tensor, old_logp: Tensor | None, mask: Tensor) -> Tensor:
    """``clamp(ℓ − ℓ^old, ±20)`` on the selected inputs (``old_logp=None``: ``ℓ − sg(ℓ)``, i.e. exactly 0)."""
    lp = torch.where(mask, logp, _zero(logp))
    old = lp.detach() if old_logp is None else _tokens("old_logp", old_logp, mask, detach=True).to(lp.dtype)
    return (lp - old).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)


def _metrics(mask: Tensor, like: Tensor, **metrics: Tensor) -> dict[str, Tensor]:
    zero = _zero(like)
    return {k: torch.where(mask, v.detach().to(like.dtype), zero) for k, v in metrics.items()}


# ----------------------------------------------------------------------------------------------------------
# the shared clipped-surrogate core
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Clipped:
    loss: Tensor  # −min(ρA, clip(ρ, lo, hi)A) per element (with the optional caps below)
    ratio: Tensor
    clip_low: Tensor  # bool: A < 0 and ρ < lo (gradient removed)
    clip_high: Tensor  # bool: A > 0 and ρ > min(hi, δ) (gradient removed)
    dual: Tensor  # bool: A < 0 and ρ > the dual-clip cap (gradient removed)


def _clipped(
    log_ratio: Tensor,
    adv: Tensor,
    lo: float,
    hi: float,
    *,
    dual_clip: float | None = None,
    delta: float | None = None,
) -> _Clipped:
    r"""The negated PPO surrogate \(\max(-A\rho, -A\,\mathrm{clip}(\rho, lo, hi))\) (Schulman et al. 2017,
    arXiv:1707.06347, Eq. 7) of an already clamped log-ratio, with two optional caps:

    * ``dual_clip`` \(c\) (Ye et al. 2020, arXiv:1912.09729, Eq. 5): where \(A < 0\) the loss is
      \(\min(\cdot, -cA)\), i.e. the coefficient freezes at \(c\) once \(\rho > c\);
    * ``delta`` \(\delta\) (INTELLECT-2, arXiv:2505.07291, two-sided clipping as TRL's ``delta``):
      \(-\min(\min(\rho, \delta) A, \mathrm{clip}(\rho, lo, hi) A)\), i.e. for \(A > 0\) the coefficient
      freezes at \(\min(hi, \delta)\) and for \(A < 0\) at \(\max(hi, \delta)\) once \(\rho\) exceeds it.

    Every frozen branch is the *constant* coefficient times \(-A\), selected with ``torch.where``, so its
    gradient is exactly 0 whatever the other branch holds.
    """
    ratio = torch.exp(log_ratio)
    up = hi if delta is None else min(hi, delta)
    clip_low = (adv < 0) & (ratio < lo)
    clip_high = (adv > 0) & (ratio > up)
    neg_cap = dual_clip if delta is None else max(hi, delta)
    dual = (adv < 0) & (ratio > neg_cap) if neg_cap is not None else torch.zeros_like(clip_low)
    bound = torch.where(clip_low, torch.full_like(ratio, lo), torch.full_like(ratio, up))
    if neg_cap is not None:
        bound = torch.where(dual, torch.full_like(ratio, neg_cap), bound)
    loss = torch.where(clip_low | clip_high | dual, -adv * bound, -adv * ratio)
    return _Clipped(loss, ratio, clip_low, clip_high, dual)


# ----------------------------------------------------------------------------------------------------------
# behaviour-policy (sampler) correction, off-policy sequence mask, policy-term mask
# ----------------------------------------------------------------------------------------------------------

CORRECTIONS = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask", "geometric_mask")
"""The values of ``correction`` (see [`behaviour_weights`][prefopt.losses.policy_gradient.behaviour_weights])."""


def _log_bound(x: float | None, default: float) -> float:
    return default if x is None or (x == 0 and default < 0) else math.log(x)


def _check_correction(
    loss: str, correction: Any, low: Any, high: Any, *, low_name: str, high_name: str
) -> None:
    if not isinstance(correction, str) or correction not in CORRECTIONS:
        raise ValueError(
            f"{loss}: correction={correction!r} is not one of {', '.join(repr(c) for c in CORRECTIONS)}"
        )
    for name, v, ok in ((low_name, low, lambda v: 0 <= v <= 1), (high_name, high, lambda v: v >= 1)):
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not ok(v):
            allowed = "None or a number in [0, 1]" if name == low_name else "None or a finite number >= 1"
            raise ValueError(f"{loss}: {name}={v!r} is out of range; allowed: {allowed} (1 must be kept)")


def behaviour_weights(
    old_logp: Tensor,
    sampler_logp: Tensor,
    mask: Tensor,
    *,
    correction: str = "token_truncate",
    low: float | None = None,
    high: float | None = 2.0,
) -> tuple[Tensor, Tensor]:
    r"""Importance weights correcting for the sampler (behaviour policy) ≠ the trainer's old policy.

    The rollout was drawn by an inference engine with log-probs \(\ell^{samp}\) (``sampler_logp``), while the
    loss's ratio is taken against the trainer's recomputed \(\ell^{old}\) (``old_logp``): decoupled PPO
    (Hilton et al. 2022, arXiv:2110.00641, the decoupled objective: behaviour and proximal policies are
    distinct). With
    \(\Delta_{i,t} = \ell^{old}_{i,t} - \ell^{samp}_{i,t}\), \(u_{i,t} = e^{\Delta_{i,t}}\),
    \(U_i = \exp(\sum_t m_{i,t}\Delta_{i,t})\) (product of the token ratios) and
    \(G_i = \exp(\frac{1}{|y_i|}\sum_t m_{i,t}\Delta_{i,t})\) (their geometric mean), bounds
    \([C_{min}, C_{max}]\) = [``low``, ``high``]:

    | ``correction`` | \(W_{i,t}\) | peers |
    |---|---|---|
    | ``"token_truncate"`` (TIS) | \(\mathrm{clip}(u_{i,t}, C_{min}, C_{max})\) | TRL ``token_truncate``, verl ``rollout_is="token"``, OpenRLHF ``tis`` |
    | ``"token_mask"`` (MIS / IcePop) | \(u_{i,t}\,1[C_{min} \le u_{i,t} \le C_{max}]\) | TRL ``token_mask``, OpenRLHF ``icepop`` |
    | ``"sequence_truncate"`` | \(\mathrm{clip}(U_i, C_{min}, C_{max})\) | TRL ``sequence_truncate`` |
    | ``"sequence_mask"`` | \(U_i\,1[C_{min} \le U_i \le C_{max}]\) | TRL ``sequence_mask`` (its default) |
    | ``"geometric_mask"`` | \(u_{i,t}\,1[C_{min} \le G_i \le C_{max}]\) (token ratio not truncated) | OpenRLHF ``seq-mask-tis`` |

    Truncated importance sampling: Yao et al. 2025 ("Your efficient RL framework secretly brings you
    off-policy RL training", the TIS note); masking: IcePop (arXiv:2510.18855). \(W\) multiplies the
    **policy term** of the loss only (not the KL or value terms), as TRL, verl and OpenRLHF do.

    Everything is computed in log space: truncation is \(\exp(\mathrm{clamp}(\Delta, \log C_{min},
    \log C_{max}))\), masking compares \(\Delta\) with \(\log C\), and the exponent is clamped to
    ±``LOG_RATIO_CLAMP`` (20), so any \(\Delta\) (even \(\pm 10^4\)) gives a finite weight. \(\Delta = 0\)
    (sampler = old policy) gives \(W = 1\) exactly in every mode. A NaN sampler log-prob on a valid token (an
    engine that could not score it) counts as \(\Delta = 0\), as in TRL; masked positions never matter.

    Args:
        old_logp: ``(b, t)`` trainer log-probs of the old (proximal) policy; pass ``logp.detach()``
            on-policy ("bypass": the weight then corrects \(\pi_\theta\) against the sampler).
        sampler_logp: ``(b, t)`` sampler log-probs of the same tokens.
        mask: ``(b, t)`` bool completion mask.
        correction: one of ``CORRECTIONS`` (default ``"token_truncate"``).
        low: \(C_{min} \in [0, 1]\) or None (no lower bound; default None, as TRL).
        high: \(C_{max} \ge 1\) or None (no upper bound; default 2.0, the TIS note's and verl's).

    Returns:
        ``(weight, kept)``: detached ``(b, t)`` weights \(W\) (0 where masked or dropped) and the bool
        ``(b, t)`` tokens whose weight is not dropped by a mask mode (``mask`` for the truncate modes).
    """
    _check_correction("behaviour_weights", correction, low, high, low_name="low", high_name="high")
    check_tensor("old_logp", old_logp, ndim=2)
    mask = check_mask("mask", mask, tuple(old_logp.shape), "old_logp")
    old = _tokens("old_logp", old_logp, mask, detach=True)
    samp = _tokens("sampler_logp", sampler_logp, mask, detach=True, like="old_logp").to(old.dtype)
    delta = old - samp
    delta = torch.where(torch.isnan(delta), _zero(delta), delta)
    lo, hi = _log_bound(low, -math.inf), _log_bound(high, math.inf)
    if correction.startswith("sequence") or correction == "geometric_mask":
        total = delta.sum(dim=-1, keepdim=True)
        if correction == "geometric_mask":
            total = total / mask.sum(dim=-1, keepdim=True).clamp(min=1).to(delta.dtype)
        stat = total.expand(mask.shape)
    else:
        stat = delta
    if correction.endswith("truncate"):
        kept = mask
        log_w = stat.clamp(lo, hi)
    else:
        kept = mask & (stat >= lo) & (stat <= hi)
        log_w = delta if correction == "geometric_mask" else stat
    log_w = log_w.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    weight = torch.where(kept, torch.exp(log_w), _zero(log_w))
    return weight, kept


def off_policy_sequence_mask(
    logp: Tensor, behaviour_logp: Tensor, advantages: Tensor, mask: Tensor, *, threshold: float
) -> Tensor:
    r"""The off-policy sequence mask (OPSM) of DeepSeek-V3.2 (arXiv:2512.02556, its OPSM equation).

    $$ M_{i,t} = 0 \ \text{if}\ A_{i,t} < 0 \ \text{and}\
       \frac{1}{|y_i|}\sum_s m_{i,s}\,(\ell^{b}_{i,s} - \mathrm{sg}(\ell_{i,s})) > \delta, \quad 1 \text{ otherwise} $$

    The mean is the per-token k1 estimate of KL(π_b ‖ π_θ) along the sequence; a negative-advantage
    sequence that has drifted too far is dropped from the policy term (not from the KL term), as TRL's
    ``off_policy_mask_threshold`` (which passes the sampler's log-probs as \(\ell^b\) when it has them, else
    the old policy's). ``advantages`` ``(b,)`` or ``(b, t)`` (then the sign is per token, as TRL). NaN
    \(\ell^b\) on a valid token counts as no divergence (TRL). \(\delta = +\infty\) keeps everything; a token
    with \(A \ge 0\) is always kept; \(M\) carries no gradient.

    Args:
        logp: ``(b, t)`` current-policy log-probs (detached inside).
        behaviour_logp: ``(b, t)`` sampler (or old-policy) log-probs.
        advantages: ``(b,)`` or ``(b, t)``.
        mask: ``(b, t)`` bool completion mask.
        threshold: \(\delta\) (TRL suggests 0.5).

    Returns:
        bool ``(b, t)``: True where the token is kept (always False where ``mask`` is False).
    """
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or math.isnan(threshold):
        raise ValueError(f"off_policy_sequence_mask: threshold={threshold!r} must be a number")
    mask = _mask(mask, logp)
    lp = torch.where(mask, logp, _zero(logp)).detach()
    b_lp = _tokens("behaviour_logp", behaviour_logp, mask, detach=True).to(lp.dtype)
    adv = _per_token("advantages", advantages, mask)
    div = b_lp - lp
    div = torch.where(torch.isnan(div), _zero(div), div)
    mean = div.sum(dim=-1, keepdim=True) / mask.sum(dim=-1, keepdim=True).clamp(min=1).to(lp.dtype)
    return mask & ((adv >= 0) | (mean <= threshold))


def _policy_keep(
    lp: Tensor,
    old_logp: Tensor | None,
    adv: Tensor,
    mask: Tensor,
    sampler_logp: Tensor | None,
    policy_mask: Tensor | None,
    correction: str,
    correction_min: float | None,
    correction_max: float | None,
    opsm_threshold: float | None,
) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """``(keep, weight, metrics)``: the tokens whose policy term counts and its detached weight (1 without a
    sampler), combining the behaviour correction, OPSM and the caller's ``policy_mask``."""
    keep = mask
    weight = torch.ones_like(lp)
    if sampler_logp is not None:
        old = lp.detach() if old_logp is None else old_logp
        weight, keep = behaviour_weights(
            old, sampler_logp, mask, correction=correction, low=correction_min, high=correction_max
        )
        weight = weight.to(lp.dtype)
    if opsm_threshold is not None:  # against the sampler, else the old policy, else sg(logp) (as TRL)
        behaviour = sampler_logp if sampler_logp is not None else old_logp
        behaviour = lp.detach() if behaviour is None else behaviour
        keep = keep & off_policy_sequence_mask(lp, behaviour, adv, mask, threshold=opsm_threshold)
    if policy_mask is not None:
        check_mask("policy_mask", policy_mask, tuple(mask.shape), "logp")
        keep = keep & policy_mask
    return keep, weight, {"is_weight": weight, "policy_kept": keep}


def _apply_keep(pg: Tensor, keep: Tensor, weight: Tensor, sampler: bool) -> Tensor:
    """``W·pg`` on kept tokens, exactly 0 elsewhere (selected, never multiplied by 0); no product without a
    sampler, so the uncorrected loss is returned bitwise."""
    return torch.where(keep, pg * weight if sampler else pg, _zero(pg))


def _correction_validator(loss: str) -> Any:
    def validate(hp: Mapping[str, Any]) -> None:
        _check_correction(
            loss,
            hp["correction"],
            hp["correction_min"],
            hp["correction_max"],
            low_name="hyperparameter correction_min",
            high_name="hyperparameter correction_max",
        )
        t = hp["opsm_threshold"]
        if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)) or math.isnan(t)):
            raise ValueError(f"{loss}: hyperparameter opsm_threshold={t!r} must be None or a number")

    return validate


def _validators(*fns: Any) -> Any:
    def validate(hp: Mapping[str, Any]) -> None:
        for fn in fns:
            fn(hp)

    return validate


# ----------------------------------------------------------------------------------------------------------
# REINFORCE
# ----------------------------------------------------------------------------------------------------------


@register_loss("reinforce", inputs="tokens", checks={"value_coef": ge(0)}, extras=("values", "returns"))
def reinforce(
    logp: Tensor,
    old_logp: Tensor | None,
    advantages: Tensor,
    mask: Tensor,
    *,
    values: Tensor | None = None,
    returns: Tensor | None = None,
    value_coef: float = 1.0,
) -> LossOutput:
    r"""REINFORCE for language models, per token, with an optional learned value baseline.

    Terminal reward and \(\gamma = 1\), so every token's return is the sequence reward \(R_i\) (PE-RLHF,
    Sidahmed et al. 2024, arXiv:2403.10704, §3; Lee et al. 2023, arXiv:2309.00267, App. F). With
    \(\rho_{i,t} = \exp(\ell_{i,t} - \ell^{old}_{i,t})\) (1 when ``old_logp`` is None):

    $$ l_{i,t} = -\mathrm{sg}(\rho_{i,t})\, A_{i,t}\, \ell_{i,t} + c_v\, v_{i,t} $$

    whose gradient is the importance-weighted \(-\rho A \nabla\ell\) (the gradient of the unclipped surrogate
    \(-\rho A\)). ``aggregate(loss, mask, "seq-mean-token-sum")`` is the per-sequence REINFORCE objective
    \(-\frac1B\sum_i A_i S_i\), \(S_i = \sum_t m_{i,t}\ell_{i,t}\).

    The baseline is the caller's: pass ``advantages = R − sg(V)``. The value loss \(v\) is the paper's squared
    error, with ``values`` read at every completion position ``(b, t)``: \(v_{i,t} = (G_{i,t} - V_{i,t})^2\)
    (a token *sum* over the sequence, as \(L_V = \sum_t (Z_t - V_t)^2\) in the paper); or one ``V(x)`` per
    prompt ``(b,)``: \(v_{i,t} = (R_i - V_i)^2 / |y_i|\) on each of its tokens, so that the token sum is
    \((R_i - V_i)^2\). ``returns`` (\(G\) or \(R\)) is ``(b,)`` or the shape of ``values``.

    Args:
        logp: ``(b, t)`` policy log-probs of the sampled tokens (with grad).
        old_logp: ``(b, t)`` sampling-policy log-probs, or None (on-policy).
        advantages: ``(b,)`` or ``(b, t)``, e.g. ``R − V`` or ``rl.rloo_advantages`` (detached inside).
        mask: ``(b, t)`` bool completion mask.
        values: optional ``(b,)`` or ``(b, t)`` value predictions (with grad) for the value loss.
        returns: the value targets; required with ``values``.
        value_coef: \(c_v \ge 0\) (default 1.0: the paper's unweighted \(L_V\)).

    Returns:
        ``LossOutput`` with ``loss`` ``(b, t)``; metrics ``(b, t)``: ``pg_loss``, ``value_loss``,
        ``advantages``, ``ratio``. The ratio's log is clamped to ±20 (its weight saturates at \(e^{20}\)).
    """
    mask = _mask(mask, logp)
    lp = torch.where(mask, logp, _zero(logp))
    adv = _per_token("advantages", advantages, mask).to(lp.dtype)
    weight = torch.exp(_log_ratio(logp, old_logp, mask)).detach()
    pg = -weight * adv * lp
    vf = torch.zeros_like(lp)
    if values is not None:
        if returns is None:
            raise ValueError("reinforce: returns is required when values is given (the value-loss target)")
        check_tensor("values", values)
        if values.ndim == 1:
            if values.shape[0] != mask.shape[0]:
                raise ValueError(f"values has shape {tuple(values.shape)} but logp has {mask.shape[0]} rows")
            v = _per_token("values", values, mask, detach=False)
            ret = _per_token("returns", returns, mask)
            lengths = mask.sum(dim=-1, keepdim=True).clamp(min=1).to(lp.dtype)
            vf = (ret - v).square() / lengths
        else:
            v = _tokens("values", values, mask)
            vf = (_per_token("returns", returns, mask) - v).square()
    elif returns is not None:
        raise ValueError("reinforce: returns was given without values")
    loss = torch.where(mask, pg + value_coef * vf, _zero(lp))
    metrics = _metrics(mask, lp, pg_loss=pg, value_loss=vf, advantages=adv, ratio=weight)
    return LossOutput(loss, metrics)


# ----------------------------------------------------------------------------------------------------------
# RLOO
# ----------------------------------------------------------------------------------------------------------


@register_loss("rloo", inputs="tokens", checks={"clip": gt(0)})
def rloo(
    logp: Tensor, old_logp: Tensor | None, advantages: Tensor, mask: Tensor, *, clip: float = 0.2
) -> LossOutput:
    r"""REINFORCE leave-one-out (Ahmadian et al. 2024, arXiv:2402.14740, Eq. 9; Kool et al. 2019): the whole
    completion is one action, with \(S_i = \sum_t m_{i,t}\ell_{i,t}\) and \(A_i\) from
    [`rloo_advantages`][prefopt.rl.rloo_advantages] (rows ``i·k + j``, the row-major order of its input):

    * on-policy (``old_logp=None``): \(l_{i,t} = -A_i\,\ell_{i,t}\), so \(\sum_t l_{i,t} = -A_i S_i\);
    * with ``old_logp``: TRL's sequence-level clipped surrogate spread evenly over the tokens,
      \(l_{i,t} = \max(-A_i\rho_i, -A_i\,\mathrm{clip}(\rho_i, 1-\epsilon, 1+\epsilon)) / |y_i|\) with
      \(\rho_i = \exp(S_i - S^{old}_i)\) (log clamped to ±20), so \(\sum_t l_{i,t}\) is the per-sequence
      value.

    At \(\rho = 1\) both forms have the same gradient. ``aggregate(loss, mask, "seq-mean-token-sum")`` is the
    mean over sequences. KL is expected *in the reward* (``rl.kl_penalized_rewards``), as in the paper and TRL.

    Args:
        logp: ``(b, t)`` policy log-probs (with grad).
        old_logp: ``(b, t)`` sampling-policy log-probs, or None (on-policy).
        advantages: ``(b,)`` per completion (detached inside).
        mask: ``(b, t)`` bool completion mask.
        clip: \(\epsilon > 0\) of the sequence-level clip (default 0.2, TRL); unused on-policy.

    Returns:
        ``LossOutput`` with ``loss`` ``(b, t)``; metrics ``(b, t)`` (constant along a sequence):
        ``advantages``, ``ratio`` (1 on-policy), ``clipped`` (1.0 where the clip removed the gradient).
    """
    mask = _mask(mask, logp)
    check_tensor("advantages", advantages, ndim=1)
    if advantages.shape[0] != mask.shape[0]:
        raise ValueError(
            f"advantages has shape {tuple(advantages.shape)} but logp has {mask.shape[0]} rows (one per completion)"
        )
    lp = torch.where(mask, logp, _zero(logp))
    adv = _per_token("advantages", advantages, mask).to(lp.dtype)
    if old_logp is None:
        per_token = -adv * lp
        ratio = torch.ones_like(lp)
        clipped = torch.zeros_like(mask)
    else:
        old = _tokens("old_logp", old_logp, mask, detach=True).to(lp.dtype)
        log_ratio = (lp - old).sum(dim=-1, keepdim=True)  # S − S^old, clamped below
        a = advantages.detach().to(lp.dtype).unsqueeze(1)
        a = torch.where(mask.any(dim=-1, keepdim=True), a, _zero(a))  # a row with no token: no advantage
        c = _clipped(log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP), a, 1.0 - clip, 1.0 + clip)
        lengths = mask.sum(dim=-1, keepdim=True).clamp(min=1).to(lp.dtype)
        per_token = (c.loss / lengths).expand(mask.shape)
        ratio = c.ratio.expand(mask.shape)
        clipped = (c.clip_low | c.clip_high).expand(mask.shape)
    loss = torch.where(mask, per_token, _zero(lp))
    metrics = _metrics(mask, lp, advantages=adv, ratio=ratio, clipped=clipped)
    return LossOutput(loss, metrics)


# ----------------------------------------------------------------------------------------------------------
# GRPO
# ----------------------------------------------------------------------------------------------------------


def _clip_validator(loss: str) -> Any:
    def validate(hp: Mapping[str, Any]) -> None:
        eh = hp["epsilon_high"]
        if eh is not None and not (
            isinstance(eh, (int, float)) and not isinstance(eh, bool) and 0 <= eh < float("inf")
        ):
            raise ValueError(
                f"{loss}: hyperparameter epsilon_high={eh!r} is out of range; allowed: None or a number >= 0"
            )
        if hp["epsilon_low"] >= 1:
            raise ValueError(
                f"{loss}: hyperparameter epsilon_low={hp['epsilon_low']!r} must be < 1 (ratio ≥ 1 − ε > 0)"
            )

    return validate


def _caps_validator(loss: str) -> Any:
    def validate(hp: Mapping[str, Any]) -> None:
        for name in ("dual_clip", "delta"):
            v = hp[name]
            if v is not None and (
                isinstance(v, bool) or not isinstance(v, (int, float)) or not 1 < v < float("inf")
            ):
                raise ValueError(
                    f"{loss}: hyperparameter {name}={v!r} is out of range; allowed: None or a number > 1"
                )
        if hp["dual_clip"] is not None and hp["delta"] is not None:
            raise ValueError(
                f"{loss}: give dual_clip or delta, not both (for delta >= 1 + epsilon_high they agree)"
            )

    return validate


def _k3(logp: Tensor, ref: Tensor) -> Tensor:
    """k3 = exp(−l) − 1 + l of the clamped log-ratio l = clamp(ℓ − ℓ^ref, ±20): finite, ≥ 0."""
    log_ratio = (logp - ref).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return torch.expm1(-log_ratio) + log_ratio


def _with_k3(
    per_token: Tensor, lp: Tensor, ref_logp: Tensor | None, mask: Tensor, beta: float
) -> tuple[Tensor, Tensor]:
    """``(per_token + β·k3, k3)`` — the KL-in-the-loss term of the clipped objectives (k3 is 0 without
    ``ref_logp``; the sum is only formed for ``β > 0``, so ``β = 0`` returns ``per_token`` bitwise)."""
    if ref_logp is None:
        return per_token, torch.zeros_like(lp)
    kl = _k3(lp, _tokens("ref_logp", ref_logp, mask, detach=True).to(lp.dtype))
    return (per_token + beta * kl if beta > 0 else per_token), kl


@register_loss(
    "grpo",
    inputs="tokens",
    checks={"epsilon_low": ge(0), "beta": ge(0)},
    validator=_validators(_clip_validator("grpo"), _caps_validator("grpo"), _correction_validator("grpo")),
    extras=("ref_logp", "sampler_logp", "policy_mask"),
)
def grpo(
    logp: Tensor,
    old_logp: Tensor | None,
    advantages: Tensor,
    mask: Tensor,
    *,
    ref_logp: Tensor | None = None,
    sampler_logp: Tensor | None = None,
    policy_mask: Tensor | None = None,
    epsilon_low: float = 0.2,
    epsilon_high: float | None = None,
    beta: float = 0.0,
    dual_clip: float | None = None,
    delta: float | None = None,
    correction: str = "token_truncate",
    correction_min: float | None = None,
    correction_max: float | None = 2.0,
    opsm_threshold: float | None = None,
) -> LossOutput:
    r"""GRPO per-token loss (Shao et al. 2024, arXiv:2402.03300, Eq. 3) with DAPO's clip-higher.

    With \(\rho_{i,t} = \exp(\ell_{i,t} - \ell^{old}_{i,t})\), \(A_i\) the group advantage of completion \(i\)
    ([`group_advantages`][prefopt.rl.group_advantages]) broadcast over its tokens, and the k3 estimator
    against the reference:

    $$ l_{i,t} = -\min\big(\rho_{i,t} A_i,\ \mathrm{clip}(\rho_{i,t}, 1-\epsilon_{low}, 1+\epsilon_{high}) A_i\big)
       + \beta\, k_3(\ell_{i,t}, \ell^{ref}_{i,t}) $$

    KL is **in the loss** (differentiated: its gradient is that of the forward KL(π_ref ‖ π), see
    [`kl_estimate`][prefopt.rl.kl_estimate]). \(\epsilon_{high} > \epsilon_{low}\) is DAPO's clip-higher
    (Yu et al. 2025, arXiv:2503.14476, Eq. 10; they use 0.2 / 0.28). Reduce with
    [`aggregate`][prefopt.masked.aggregate]: ``"seq-mean-token-mean"`` is the paper's objective (TRL
    ``loss_type="grpo"``), ``"token-mean"`` with the global token count DAPO's (TRL ``"dapo"``),
    ``"seq-mean-token-sum-norm"`` Dr. GRPO's (Liu et al. 2025, arXiv:2503.20783; TRL ``"dr_grpo"``, which
    also drops std scaling: ``group_advantages(r, scale_std=False)``).

    Caps on the ratio (both off by default): ``dual_clip`` \(c > 1\) (Ye et al. 2020, arXiv:1912.09729,
    Eq. 5) caps a negative-advantage token's loss at \(-cA\) (frozen once \(\rho > c\)), combined with the
    asymmetric band; ``delta`` \(\delta > 1\) is INTELLECT-2's two-sided clipping (arXiv:2505.07291; TRL
    ``delta``): \(-\min(\min(\rho, \delta) A, \mathrm{clip}(\rho, 1-\epsilon_{low}, 1+\epsilon_{high}) A)\).
    For \(\delta \ge 1 + \epsilon_{high}\) the two agree exactly (value and gradient, tested); for
    \(\delta < 1 + \epsilon_{high}\) ``delta`` also freezes positive-advantage tokens once \(\rho > \delta\).

    Behaviour-policy correction (decoupled PPO): with ``sampler_logp`` (the inference engine's log-probs
    of the sampled tokens) the policy term is multiplied by the detached weight
    \(W\) of [`behaviour_weights`][prefopt.losses.policy_gradient.behaviour_weights] with ``(old_logp,
    sampler_logp, mask, correction=..., low=correction_min, high=correction_max)``; the ratio \(\rho\) stays
    against ``old_logp``. ``opsm_threshold`` \(\delta\) drops, from the policy term, the negative-advantage
    sequences of [`off_policy_sequence_mask`][prefopt.losses.policy_gradient.off_policy_sequence_mask]
    (against ``sampler_logp`` if given, else ``old_logp``, else ``logp.detach()``: divergence 0, as TRL);
    ``policy_mask`` ``(b, t)`` bool restricts the
    policy term to its tokens (e.g. [`high_entropy_mask`][prefopt.rl.high_entropy_mask]); the KL term
    keeps ``mask``. TRL applies them the same way (policy term × OPSM mask × entropy mask × IS weight,
    then + β·KL; tested equal in value and gradient). Without ``sampler_logp`` the result is bitwise the
    uncorrected loss, and with ``sampler_logp == old_logp`` every weight is exactly 1 (tested).

    Extreme values: the log-ratios to the old policy and to the reference are clamped to ±20 before ``exp``
    (so \(\rho \le e^{20}\) and \(k_3 \le e^{20}\), both finite, with gradient 0 beyond the clamp).

    Args:
        logp: ``(b, t)`` current-policy log-probs (with grad).
        old_logp: ``(b, t)`` sampling-policy log-probs, or None for one on-policy update.
        advantages: ``(b,)`` per completion or ``(b, t)`` per token (detached inside).
        mask: ``(b, t)`` bool completion mask.
        ref_logp: ``(b, t)`` reference log-probs (keyword-only); required when ``beta > 0``.
        sampler_logp: ``(b, t)`` sampler (behaviour-policy) log-probs, or None (no correction).
        policy_mask: ``(b, t)`` bool, or None: the tokens whose policy term counts.
        epsilon_low: lower clip \(\epsilon\) (default 0.2, TRL); must be in [0, 1).
        epsilon_high: upper clip \(\epsilon\) (default None = ``epsilon_low``).
        beta: KL coefficient ≥ 0 (default 0.0 as TRL, no reference needed; the paper uses 0.04).
        dual_clip: \(c > 1\) or None (default None; verl's default is 3.0).
        delta: \(\delta > 1\) or None (default None; INTELLECT-2 uses 4). Not together with ``dual_clip``.
        correction: the mode of the behaviour correction (default ``"token_truncate"``, TIS; used only
            with ``sampler_logp``), one of ``CORRECTIONS``.
        correction_min: \(C_{min} \in [0, 1]\) or None (default None).
        correction_max: \(C_{max} \ge 1\) or None (default 2.0).
        opsm_threshold: OPSM's \(\delta\), or None (default None: off; TRL suggests 0.5).

    Returns:
        ``LossOutput`` with ``loss`` ``(b, t)``; metrics ``(b, t)``: ``kl`` (k3; 0 without ``ref_logp``),
        ``ratio``, ``clip_low`` / ``clip_high`` / ``dual_clip`` (1.0 where the lower clip / the upper
        clip or δ / the dual clip or δ removed the gradient), ``advantages``, ``is_weight`` (\(W\); 1 without
        a sampler), ``policy_kept`` (1.0 where the policy term counts).
    """
    mask = _mask(mask, logp)
    if beta > 0 and ref_logp is None:
        raise ValueError("grpo: ref_logp is required when beta > 0 (the KL term is computed against it)")
    lp = torch.where(mask, logp, _zero(logp))
    adv = _per_token("advantages", advantages, mask).to(lp.dtype)
    eps_hi = epsilon_low if epsilon_high is None else epsilon_high
    c = _clipped(
        _log_ratio(logp, old_logp, mask),
        adv,
        1.0 - epsilon_low,
        1.0 + eps_hi,
        dual_clip=dual_clip,
        delta=delta,
    )
    keep, weight, wm = _policy_keep(
        lp,
        old_logp,
        adv,
        mask,
        sampler_logp,
        policy_mask,
        correction,
        correction_min,
        correction_max,
        opsm_threshold,
    )
    per_token = _apply_keep(c.loss, keep, weight, sampler_logp is not None)
    per_token, kl = _with_k3(per_token, lp, ref_logp, mask, beta)
    loss = torch.where(mask, per_token, _zero(lp))
    metrics = _metrics(
        mask,
        lp,
        kl=kl,
        ratio=c.ratio,
        clip_low=c.clip_low,
        clip_high=c.clip_high,
        dual_clip=c.dual,
        advantages=adv,
        **wm,
    )
    return LossOutput(loss, metrics)


# ----------------------------------------------------------------------------------------------------------
# GSPO and GSPO-token
# ----------------------------------------------------------------------------------------------------------


def _seq_log_ratio(logp: Tensor, old_logp: Tensor | None, mask: Tensor) -> Tensor:
    """``(b, 1)``: ``clamp(Σ_t m(ℓ − ℓ^old) / |y|, ±20)``, the log of GSPO's length-normalised sequence ratio."""
    lp = torch.where(mask, logp, _zero(logp))
    old = lp.detach() if old_logp is None else _tokens("old_logp", old_logp, mask, detach=True).to(lp.dtype)
    lengths = mask.sum(dim=-1, keepdim=True).clamp(min=1).to(lp.dtype)
    return ((lp - old).sum(dim=-1, keepdim=True) / lengths).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)


def _gspo(
    logp: Tensor,
    old_logp: Tensor | None,
    advantages: Tensor,
    mask: Tensor,
    ref_logp: Tensor | None,
    lo: float,
    hi: float,
    beta: float,
    *,
    token: bool,
    loss: str,
    sampler_logp: Tensor | None,
    policy_mask: Tensor | None,
    correction: tuple[str, float | None, float | None, float | None],
) -> LossOutput:
    mask = _mask(mask, logp)
    if beta > 0 and ref_logp is None:
        raise ValueError(f"{loss}: ref_logp is required when beta > 0 (the KL term is computed against it)")
    if not token:
        check_tensor("advantages", advantages, ndim=1)
    lp = torch.where(mask, logp, _zero(logp))
    adv = _per_token("advantages", advantages, mask).to(lp.dtype)
    log_s = _seq_log_ratio(logp, old_logp, mask)
    if token:  # value s_i, gradient s_i ∇ℓ_{i,t}
        log_ratio = log_s.detach() + (lp - lp.detach())
    else:
        log_ratio = log_s.expand(mask.shape)
    c = _clipped(log_ratio, adv, lo, hi)
    keep, weight, wm = _policy_keep(lp, old_logp, adv, mask, sampler_logp, policy_mask, *correction)
    per_token = _apply_keep(c.loss, keep, weight, sampler_logp is not None)
    per_token, kl = _with_k3(per_token, lp, ref_logp, mask, beta)
    out = torch.where(mask, per_token, _zero(lp))
    metrics = _metrics(
        mask, lp, kl=kl, ratio=c.ratio, clip_low=c.clip_low, clip_high=c.clip_high, advantages=adv, **wm
    )
    return LossOutput(out, metrics)


@register_loss(
    "gspo",
    inputs="tokens",
    checks={"epsilon_low": ge(0), "beta": ge(0)},
    validator=_validators(_clip_validator("gspo"), _correction_validator("gspo")),
    extras=("ref_logp", "sampler_logp", "policy_mask"),
)
def gspo(
    logp: Tensor,
    old_logp: Tensor | None,
    advantages: Tensor,
    mask: Tensor,
    *,
    ref_logp: Tensor | None = None,
    sampler_logp: Tensor | None = None,
    policy_mask: Tensor | None = None,
    epsilon_low: float = 3e-4,
    epsilon_high: float | None = 4e-4,
    beta: float = 0.0,
    correction: str = "token_truncate",
    correction_min: float | None = None,
    correction_max: float | None = 2.0,
    opsm_threshold: float | None = None,
) -> LossOutput:
    r"""GSPO: group sequence policy optimisation with a length-normalised sequence ratio (Zheng et al. 2025,
    arXiv:2507.18071, the GSPO objective).

    $$ s_i = \exp\Big(\frac{1}{|y_i|}\sum_t m_{i,t}(\ell_{i,t} - \ell^{old}_{i,t})\Big), \qquad
       l_{i,t} = -\min\big(s_i A_i,\ \mathrm{clip}(s_i, 1-\epsilon_{low}, 1+\epsilon_{high}) A_i\big)
       + \beta\, k_3(\ell_{i,t}, \ell^{ref}_{i,t}) $$

    One clip decision per sequence: the surrogate is constant along the sequence, so
    ``aggregate(loss, mask, "seq-mean-token-mean")`` is the paper's \(-\frac1B\sum_i \min(\cdot)\) (TRL
    ``importance_sampling_level="sequence"`` with ``loss_type="grpo"``; tested equal in value and gradient).
    A token-sum aggregation (``"token-mean"``, ``"seq-mean-token-sum*"``) would weight each sequence by its
    length. \(s_i\) is the geometric mean of the token ratios: every token at log-ratio \(\delta\) gives
    \(s_i = e^\delta\) whatever \(|y_i|\). Unclipped, the gradient is
    \(-A_i s_i \frac{1}{|y_i|}\sum_t \nabla\ell_{i,t}\); on-policy it equals GRPO's. The log of \(s_i\) is
    clamped to ±20 (saturating, zero gradient beyond).

    The arguments ``sampler_logp``, ``policy_mask``, ``correction``, ``correction_min``, ``correction_max``,
    ``opsm_threshold`` are the behaviour correction, policy-term mask and OPSM of
    [`grpo`][prefopt.losses.policy_gradient.grpo] (applied to the policy term; a sequence-level correction
    there is independent of \(s_i\)).

    Args:
        logp: ``(b, t)`` current-policy log-probs (with grad).
        old_logp: ``(b, t)`` sampling-policy log-probs, or None (on-policy: \(s_i = 1\)).
        advantages: ``(b,)`` per sequence (detached inside); for per-token advantages use
            [`gspo_token`][prefopt.losses.policy_gradient.gspo_token].
        mask: ``(b, t)`` bool completion mask.
        ref_logp: ``(b, t)`` reference log-probs (keyword-only); required when ``beta > 0``.
        sampler_logp: as in [`grpo`][prefopt.losses.policy_gradient.grpo].
        policy_mask: as in [`grpo`][prefopt.losses.policy_gradient.grpo].
        epsilon_low: lower clip (default 3e-4, the paper's; sequence ratios stay near 1).
        epsilon_high: upper clip (default 4e-4, the paper's; None = ``epsilon_low``).
        beta: k3 coefficient ≥ 0 (default 0.0, the paper's).
        correction: as in [`grpo`][prefopt.losses.policy_gradient.grpo].
        correction_min: as in [`grpo`][prefopt.losses.policy_gradient.grpo].
        correction_max: as in [`grpo`][prefopt.losses.policy_gradient.grpo].
        opsm_threshold: as in [`grpo`][prefopt.losses.policy_gradient.grpo].

    Returns:
        ``LossOutput`` with ``loss`` ``(b, t)``; metrics ``(b, t)`` as [`grpo`][prefopt.losses.policy_gradient.grpo]
        (``ratio`` is \(s_i\) on every token of sequence \(i\)).
    """
    eps_hi = epsilon_low if epsilon_high is None else epsilon_high
    return _gspo(
        logp,
        old_logp,
        advantages,
        mask,
        ref_logp,
        1.0 - epsilon_low,
        1.0 + eps_hi,
        beta,
        token=False,
        loss="gspo",
        sampler_logp=sampler_logp,
        policy_mask=policy_mask,
        correction=(correction, correction_min, correction_max, opsm_threshold),
    )


@register_loss(
    "gspo_token",
    inputs="tokens",
    checks={"epsilon_low": ge(0), "beta": ge(0)},
    validator=_validators(_clip_validator("gspo_token"), _correction_validator("gspo_token")),
    extras=("ref_logp", "sampler_logp", "policy_mask"),
)
def gspo_token(
    logp: Tensor,
    old_logp: Tensor | None,
    advantages: Tensor,
    mask: Tensor,
    *,
    ref_logp: Tensor | None = None,
    sampler_logp: Tensor | None = None,
    policy_mask: Tensor | None = None,
    epsilon_low: float = 3e-4,
    epsilon_high: float | None = 4e-4,
    beta: float = 0.0,
    correction: str = "token_truncate",
    correction_min: float | None = None,
    correction_max: float | None = 2.0,
    opsm_threshold: float | None = None,
) -> LossOutput:
    r"""GSPO-token (Zheng et al. 2025, arXiv:2507.18071, the GSPO-token objective): GSPO with per-token advantages.

    $$ s_{i,t} = \mathrm{sg}(s_i)\,\frac{\pi_\theta(y_{i,t})}{\mathrm{sg}(\pi_\theta(y_{i,t}))}, \qquad
       l_{i,t} = -\min\big(s_{i,t} A_{i,t},\ \mathrm{clip}(s_{i,t}, 1-\epsilon_{low}, 1+\epsilon_{high})
       A_{i,t}\big) + \beta k_3 $$

    \(s_{i,t}\) has the value \(s_i\) of [`gspo`][prefopt.losses.policy_gradient.gspo] and the gradient
    \(s_i \nabla\ell_{i,t}\); with \(A_{i,t} \equiv A_i\) it gives GSPO's values and gradients exactly
    (tested, inside and outside the clip band). Reduce with ``"seq-mean-token-mean"``. The clamp of
    \(\log s_i\) to ±20 only bounds the (stop-gradient) value: beyond it an unclipped token's gradient is
    \(-A e^{20}\nabla\ell\).

    The arguments ``logp``, ``old_logp``, ``mask``, ``ref_logp``, ``epsilon_low``, ``epsilon_high``, ``beta``,
    ``sampler_logp``, ``policy_mask``, ``correction``, ``correction_min``, ``correction_max``,
    ``opsm_threshold`` are as for [`gspo`][prefopt.losses.policy_gradient.gspo].

    Args:
        logp: as in [`gspo`][prefopt.losses.policy_gradient.gspo].
        old_logp: as in [`gspo`][prefopt.losses.policy_gradient.gspo].
        advantages: ``(b,)`` per sequence or ``(b, t)`` per token (detached inside).
        mask: as in [`gspo`][prefopt.losses.policy_gradient.gspo].
        ref_logp: as in [`gspo`][prefopt.losses.policy_gradient.gspo].
        sampler_logp: as in [`gspo`][prefopt.losses.policy_gradient.gspo].
        policy_mask: as in [`gspo`][prefopt.losses.policy_gradient.gspo].
        epsilon_low: as in [`gspo`][prefopt.losses.policy_gradient.gspo].
        epsilon_high: as in [`gspo`][prefopt.losses.policy_gradient.gspo].
        beta: as in [`gspo`][prefopt.losses.policy_gradient.gspo].
        correction: as in [`gspo`][prefopt.losses.policy_gradient.gspo].
        correction_min: as in [`gspo`][prefopt.losses.policy_gradient.gspo].
        correction_max: as in [`gspo`][prefopt.losses.policy_gradient.gspo].
        opsm_threshold: as in [`gspo`][prefopt.losses.policy_gradient.gspo].

    Returns:
        ``LossOutput`` with ``loss`` ``(b, t)`` and ``(b, t)`` metrics as ``gspo``.
    """
    eps_hi = epsilon_low if epsilon_high is None else epsilon_high
    return _gspo(
        logp,
        old_logp,
        advantages,
        mask,
        ref_logp,
        1.0 - epsilon_low,
        1.0 + eps_hi,
        beta,
        token=True,
        loss="gspo_token",
        sampler_logp=sampler_logp,
        policy_mask=policy_mask,
        correction=(correction, correction_min, correction_max, opsm_threshold),
    )


# ----------------------------------------------------------------------------------------------------------
# CISPO
# ----------------------------------------------------------------------------------------------------------


def _cispo_validator(hp: Mapping[str, Any]) -> None:
    if hp["bounds"] == "two_sided" and hp["epsilon_low"] >= 1:
        raise ValueError(
            f"cispo: hyperparameter epsilon_low={hp['epsilon_low']!r} must be < 1 (weight ≥ 1 − ε > 0)"
        )


@register_loss(
    "cispo",
    inputs="tokens",
    checks={
        "bounds": one_of("upper", "two_sided"),
        "max_weight": gt(0),
        "epsilon_low": ge(0),
        "epsilon_high": ge(0),
        "beta": ge(0),
    },
    validator=_validators(_cispo_validator, _correction_validator("cispo")),
    extras=("ref_logp", "sampler_logp", "policy_mask"),
)
def cispo(
    logp: Tensor,
    old_logp: Tensor | None,
    advantages: Tensor,
    mask: Tensor,
    *,
    ref_logp: Tensor | None = None,
    sampler_logp: Tensor | None = None,
    policy_mask: Tensor | None = None,
    bounds: str = "upper",
    max_weight: float = 5.0,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    beta: float = 0.0,
    correction: str = "token_truncate",
    correction_min: float | None = None,
    correction_max: float | None = 2.0,
    opsm_threshold: float | None = None,
) -> LossOutput:
    r"""CISPO: clipped importance-sampling-weight policy optimisation (MiniMax-M1, arXiv:2506.13585, Eq. 4–5).

    A REINFORCE loss whose importance weight \(\rho_{i,t} = \exp(\ell_{i,t} - \ell^{old}_{i,t})\) is clipped
    and then used as a stop-gradient coefficient:

    $$ l_{i,t} = -\mathrm{sg}(\hat w_{i,t})\, A_{i,t}\, \ell_{i,t} + \beta\, k_3(\ell_{i,t}, \ell^{ref}_{i,t}),
       \qquad \nabla l_{i,t} = -\hat w_{i,t} A_{i,t} \nabla\ell_{i,t} + \beta\nabla k_3 $$

    Unlike PPO/GRPO no token's gradient is ever removed: a token far off-policy keeps the gradient
    \(-\hat w A\nabla\ell\) with a capped weight. The loss *value* contains \(\ell\) itself (it is not a ratio
    surrogate), so compare gradients, not values, with the PPO family. Two peer conventions for \(\hat w\):

    * ``bounds="upper"`` (default): \(\hat w = \min(\rho, C)\) with the absolute cap \(C\) = ``max_weight``
      (default 5.0). This is TRL's ``loss_type="cispo"`` with ``epsilon_high=C`` (TRL uses its
      ``epsilon_high`` as the cap itself; tested equal in value and gradient) and ScaleRL
      (arXiv:2510.13786). MiniMax's upper-only \(1 + \epsilon^{IS}_{high}\) is ``max_weight=1 + ε``. Note a
      cap below 1 scales even on-policy gradients by \(C\).
    * ``bounds="two_sided"``: \(\hat w = \mathrm{clip}(\rho, 1-\epsilon_{low}, 1+\epsilon_{high})\) (verl's
      and NeMo-RL's CISPO; defaults 0.2 / 0.2 as verl). ``max_weight`` is unused.

    The paper normalises over all tokens of the batch: reduce with ``aggregate(loss, mask, "token-mean")``
    (TRL: ``"token-mean"`` with ``num_tokens=num_items_in_batch``). \(\log\rho\) is clamped to ±20 before the
    ``exp`` (only the stop-gradient weight is affected).

    The arguments ``sampler_logp``, ``policy_mask``, ``correction``, ``correction_min``, ``correction_max``,
    ``opsm_threshold`` are the behaviour correction, policy-term mask and OPSM of
    [`grpo`][prefopt.losses.policy_gradient.grpo] (the correction weight multiplies \(\hat w\)'s term).

    Args:
        logp: ``(b, t)`` current-policy log-probs (with grad).
        old_logp: ``(b, t)`` sampling-policy log-probs, or None (on-policy: \(\rho = 1\)).
        advantages: ``(b,)`` or ``(b, t)`` (detached inside).
        mask: ``(b, t)`` bool completion mask.
        ref_logp: ``(b, t)`` reference log-probs (keyword-only); required when ``beta > 0``.
        sampler_logp: as in [`grpo`][prefopt.losses.policy_gradient.grpo].
        policy_mask: as in [`grpo`][prefopt.losses.policy_gradient.grpo].
        bounds: ``"upper"`` (TRL / ScaleRL / MiniMax) or ``"two_sided"`` (verl / NeMo-RL).
        max_weight: the cap \(C > 0\) of ``"upper"`` (default 5.0, TRL's recommended value).
        epsilon_low: lower clip of ``"two_sided"``, in [0, 1) (default 0.2).
        epsilon_high: upper clip of ``"two_sided"``, ≥ 0 (default 0.2).
        beta: k3 coefficient ≥ 0 (default 0.0).
        correction: as in [`grpo`][prefopt.losses.policy_gradient.grpo].
        correction_min: as in [`grpo`][prefopt.losses.policy_gradient.grpo].
        correction_max: as in [`grpo`][prefopt.losses.policy_gradient.grpo].
        opsm_threshold: as in [`grpo`][prefopt.losses.policy_gradient.grpo].

    Returns:
        ``LossOutput`` with ``loss`` ``(b, t)``; metrics ``(b, t)``: ``is_weight``, ``policy_kept``, ``ratio``
        (\(\rho\)), ``weight`` (\(\hat w\)), ``clip_low`` / ``clip_high`` (1.0 where the weight was raised /
        capped), ``kl`` (k3; 0 without ``ref_logp``), ``advantages``.
    """
    mask = _mask(mask, logp)
    if beta > 0 and ref_logp is None:
        raise ValueError("cispo: ref_logp is required when beta > 0 (the KL term is computed against it)")
    lp = torch.where(mask, logp, _zero(logp))
    adv = _per_token("advantages", advantages, mask).to(lp.dtype)
    ratio = torch.exp(_log_ratio(logp, old_logp, mask)).detach()
    if bounds == "upper":
        lo, hi = 0.0, float(max_weight)
    else:
        lo, hi = 1.0 - epsilon_low, 1.0 + epsilon_high
    clip_low, clip_high = ratio < lo, ratio > hi
    weight = ratio.clamp(lo, hi)
    keep, is_w, wm = _policy_keep(
        lp,
        old_logp,
        adv,
        mask,
        sampler_logp,
        policy_mask,
        correction,
        correction_min,
        correction_max,
        opsm_threshold,
    )
    per_token = _apply_keep(-weight * adv * lp, keep, is_w, sampler_logp is not None)
    per_token, kl = _with_k3(per_token, lp, ref_logp, mask, beta)
    loss = torch.where(mask, per_token, _zero(lp))
    metrics = _metrics(
        mask,
        lp,
        ratio=ratio,
        weight=weight,
        clip_low=clip_low,
        clip_high=clip_high,
        kl=kl,
        advantages=adv,
        **wm,
    )
    return LossOutput(loss, metrics)


# ----------------------------------------------------------------------------------------------------------
# SAPO
# ----------------------------------------------------------------------------------------------------------


@register_loss(
    "sapo",
    inputs="tokens",
    checks={"tau_pos": gt(0), "tau_neg": gt(0), "beta": ge(0)},
    validator=_correction_validator("sapo"),
    extras=("ref_logp", "sampler_logp", "policy_mask"),
)
def sapo(
    logp: Tensor,
    old_logp: Tensor | None,
    advantages: Tensor,
    mask: Tensor,
    *,
    ref_logp: Tensor | None = None,
    sampler_logp: Tensor | None = None,
    policy_mask: Tensor | None = None,
    tau_pos: float = 1.0,
    tau_neg: float = 1.05,
    beta: float = 0.0,
    correction: str = "token_truncate",
    correction_min: float | None = None,
    correction_max: float | None = 2.0,
    opsm_threshold: float | None = None,
) -> LossOutput:
    r"""SAPO: soft adaptive policy optimisation, a smooth gate in place of the hard clip (Gao et al. 2025,
    arXiv:2511.20347, the SAPO objective).

    With \(\rho_{i,t} = \exp(\ell_{i,t} - \ell^{old}_{i,t})\) and \(\tau_{i,t} = \tau_{pos}\) if
    \(A_{i,t} > 0\) else \(\tau_{neg}\) (a zero advantage takes \(\tau_{neg}\), as TRL and verl; it has no
    gradient anyway):

    $$ g_\tau(\rho) = \frac{4}{\tau}\,\sigma\big(\tau(\rho - 1)\big), \qquad
       l_{i,t} = -g_{\tau_{i,t}}(\rho_{i,t})\, A_{i,t} + \beta\, k_3(\ell_{i,t}, \ell^{ref}_{i,t}) $$

    The gradient is \(-4\sigma(1-\sigma)\,\rho\, A\nabla\ell\) with \(\sigma = \sigma(\tau(\rho-1))\): weight
    exactly 1 at \(\rho = 1\) for every \(\tau\) (on-policy SAPO has GRPO's gradient, tested), decaying
    smoothly as \(\rho\) leaves 1 instead of dropping to 0 at a clip edge; \(\tau \to 0\) recovers the
    unclipped surrogate's \(-\rho A\nabla\ell\). The value at \(\rho = 1\) is \(-2A/\tau\), a constant offset:
    loss curves are not comparable with GRPO's. Reduce with ``"seq-mean-token-mean"`` (TRL
    ``loss_type="sapo"`` and verl aggregate so; tested equal to TRL 1.16 in value and gradient). The log-ratio
    is clamped to ±20 (beyond it the gate is saturated: finite value, zero gradient).

    The arguments ``sampler_logp``, ``policy_mask``, ``correction``, ``correction_min``, ``correction_max``,
    ``opsm_threshold`` are as for [`grpo`][prefopt.losses.policy_gradient.grpo] (policy term only).

    Args:
        logp: ``(b, t)`` current-policy log-probs (with grad).
        old_logp: ``(b, t)`` sampling-policy log-probs, or None (on-policy).
        advantages: ``(b,)`` or ``(b, t)`` (detached inside).
        mask: ``(b, t)`` bool completion mask.
        ref_logp: ``(b, t)`` reference log-probs; required when ``beta > 0``.
        sampler_logp: as in [`grpo`][prefopt.losses.policy_gradient.grpo].
        policy_mask: as in [`grpo`][prefopt.losses.policy_gradient.grpo].
        tau_pos: \(\tau_{pos} > 0\) (default 1.0, TRL and verl).
        tau_neg: \(\tau_{neg} > 0\) (default 1.05, TRL and verl; the paper takes \(\tau_{neg} > \tau_{pos}\)).
        beta: k3 coefficient ≥ 0 (default 0.0).
        correction: as in [`grpo`][prefopt.losses.policy_gradient.grpo].
        correction_min: as in [`grpo`][prefopt.losses.policy_gradient.grpo].
        correction_max: as in [`grpo`][prefopt.losses.policy_gradient.grpo].
        opsm_threshold: as in [`grpo`][prefopt.losses.policy_gradient.grpo].

    Returns:
        ``LossOutput`` with ``loss`` ``(b, t)``; metrics ``(b, t)``: ``ratio``, ``gate_weight`` (the
        gradient weight \(4\sigma(1-\sigma)\rho\)), ``kl``, ``advantages``, ``is_weight``, ``policy_kept``.
    """
    mask = _mask(mask, logp)
    if beta > 0 and ref_logp is None:
        raise ValueError("sapo: ref_logp is required when beta > 0 (the KL term is computed against it)")
    lp = torch.where(mask, logp, _zero(logp))
    adv = _per_token("advantages", advantages, mask).to(lp.dtype)
    ratio = torch.exp(_log_ratio(logp, old_logp, mask))
    tau = torch.where(adv > 0, torch.full_like(lp, tau_pos), torch.full_like(lp, tau_neg))
    sig = torch.sigmoid(tau * (ratio - 1.0))
    keep, weight, wm = _policy_keep(
        lp,
        old_logp,
        adv,
        mask,
        sampler_logp,
        policy_mask,
        correction,
        correction_min,
        correction_max,
        opsm_threshold,
    )
    per_token = _apply_keep(-(4.0 / tau) * sig * adv, keep, weight, sampler_logp is not None)
    per_token, kl = _with_k3(per_token, lp, ref_logp, mask, beta)
    loss = torch.where(mask, per_token, _zero(lp))
    gate = 4.0 * sig * (1.0 - sig) * ratio
    metrics = _metrics(mask, lp, ratio=ratio, gate_weight=gate, kl=kl, advantages=adv, **wm)
    return LossOutput(loss, metrics)


# ----------------------------------------------------------------------------------------------------------
# PPO
# ----------------------------------------------------------------------------------------------------------


def _ppo_validator(hp: Mapping[str, Any]) -> None:
    dc = hp["dual_clip"]
    if dc is not None and (
        isinstance(dc, bool) or not isinstance(dc, (int, float)) or not 1 < dc < float("inf")
    ):
        raise ValueError(
            f"ppo: hyperparameter dual_clip={dc!r} is out of range; allowed: None or a number > 1"
        )
    vc = hp["value_clip"]
    if vc is not None and (
        isinstance(vc, bool) or not isinstance(vc, (int, float)) or not 0 < vc < float("inf")
    ):
        raise ValueError(
            f"ppo: hyperparameter value_clip={vc!r} is out of range; allowed: None or a number > 0"
        )
    if hp["clip"] >= 1:
        raise ValueError(f"ppo: hyperparameter clip={hp['clip']!r} must be < 1 (ratio ≥ 1 − ε > 0)")
    ch = hp["clip_high"]
    if ch is not None and (
        isinstance(ch, bool) or not isinstance(ch, (int, float)) or not 0 <= ch < float("inf")
    ):
        raise ValueError(
            f"ppo: hyperparameter clip_high={ch!r} is out of range; allowed: None or a number >= 0"
        )


@register_loss(
    "ppo",
    inputs="tokens",
    checks={"clip": gt(0), "vf_coef": ge(0), "ent_coef": ge(0)},
    validator=_validators(_ppo_validator, _correction_validator("ppo")),
    extras=("values", "old_values", "returns", "entropy", "sampler_logp", "policy_mask"),
)
def ppo(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    values: Tensor | None = None,
    old_values: Tensor | None = None,
    returns: Tensor | None = None,
    entropy: Tensor | None = None,
    sampler_logp: Tensor | None = None,
    policy_mask: Tensor | None = None,
    clip: float = 0.2,
    clip_high: float | None = None,
    dual_clip: float | None = None,
    value_clip: float | None = 0.2,
    vf_coef: float = 0.1,
    ent_coef: float = 0.0,
    correction: str = "token_truncate",
    correction_min: float | None = None,
    correction_max: float | None = 2.0,
    opsm_threshold: float | None = None,
) -> LossOutput:
    r"""PPO per-token loss: clipped surrogate, optional dual clip, clipped value loss, entropy bonus.

    With \(\rho_t = \exp(\ell_t - \ell^{old}_t)\) (Schulman et al. 2017, arXiv:1707.06347, Eq. 7 and 9; value
    clipping as in OpenAI baselines / TRL; dual clip from Ye et al. 2020, arXiv:1912.09729, Eq. 5):

    $$ pg_t = \max(-\hat A_t\rho_t, -\hat A_t\,\mathrm{clip}(\rho_t, 1-\epsilon, 1+\epsilon_{high})), \qquad
       pg_t \leftarrow \min(pg_t, -c\hat A_t) \text{ where } \hat A_t < 0 \text{ (dual clip, } c > 1) $$

    $$ V^c_t = V^{old}_t + \mathrm{clip}(V_t - V^{old}_t, -\epsilon_v, \epsilon_v), \quad
       vf_t = \tfrac12\max((V_t - \hat G_t)^2, (V^c_t - \hat G_t)^2), \quad
       l_t = pg_t + c_v\, vf_t - c_H H_t $$

    (\(vf_t = \frac12 (V_t - \hat G_t)^2\) with ``value_clip=None``.) The value loss is 0 at \(V = \hat G\)
    when unclipped or when \(|V - V^{old}| \le \epsilon_v\); the clipped form is pessimistic (a max), so
    \(V = \hat G\) far from \(V^{old}\) still pays \(\frac12(V^c - \hat G)^2\) and gets no gradient. The clip
    removes the gradient of token \(t\) exactly (0, not a small number) where
    \(\hat A_t > 0, \rho_t > 1 + \epsilon\) or \(\hat A_t < 0, \rho_t < 1 - \epsilon\); the dual clip also
    where \(\hat A_t < 0, \rho_t > c\). KL is expected **in the reward** (``rl.kl_penalized_rewards`` →
    ``rl.gae`` → usually ``masked_whiten``). Reduce with ``aggregate(loss, mask, "token-mean")``.

    ``clip_high`` \(\epsilon_{high}\) (default None = \(\epsilon\)) is DAPO's clip-higher (arXiv:2503.14476,
    Eq. 10); with ``dual_clip`` it gives verl's default policy loss (``clip_ratio_low``, ``clip_ratio_high``,
    ``clip_ratio_c``). ``sampler_logp``, ``policy_mask``, ``correction*`` and ``opsm_threshold`` act on
    \(pg_t\) only, exactly as in [`grpo`][prefopt.losses.policy_gradient.grpo] (decoupled PPO with a
    behaviour correction; without ``sampler_logp`` the loss is bitwise the uncorrected one).

    Extreme values: \(\log\rho\) is clamped to ±20, so without the dual clip a negative-advantage token with a
    ratio beyond \(e^{20}\) pays \(-\hat A e^{20}\) (finite) with zero gradient, instead of overflowing.

    The arguments ``correction``, ``correction_min``, ``correction_max``, ``opsm_threshold`` are as for
    [`grpo`][prefopt.losses.policy_gradient.grpo] (defaults ``"token_truncate"``, None, 2.0, None).

    Args:
        logp: ``(b, t)`` current-policy log-probs (with grad).
        old_logp: ``(b, t)`` sampling-policy log-probs.
        advantages: ``(b, t)`` (or ``(b,)`` broadcast) advantages \(\hat A\) (detached inside).
        mask: ``(b, t)`` bool completion mask.
        values: ``(b, t)`` value predictions (with grad); needs ``returns``, and ``old_values`` unless
            ``value_clip=None``. Without ``values`` the value term is 0.
        old_values: ``(b, t)`` values at sampling time.
        returns: ``(b, t)`` value targets \(\hat G\) (``gae``'s returns).
        entropy: ``(b, t)`` per-token policy entropy; required when ``ent_coef > 0``.
        sampler_logp: ``(b, t)`` sampler log-probs, or None (see ``grpo``).
        policy_mask: ``(b, t)`` bool, or None: the tokens whose policy term counts.
        clip: \(\epsilon \in (0, 1)\) (default 0.2).
        clip_high: \(\epsilon_{high} \ge 0\) or None (default None = ``clip``).
        dual_clip: \(c > 1\) or None (default None; 3.0 in the paper).
        value_clip: \(\epsilon_v > 0\) or None (default 0.2).
        vf_coef: \(c_v\) (default 0.1).
        ent_coef: \(c_H\) (default 0.0; defaults as TRL's PPO).
        correction: as in [`grpo`][prefopt.losses.policy_gradient.grpo].
        correction_min: as in [`grpo`][prefopt.losses.policy_gradient.grpo].
        correction_max: as in [`grpo`][prefopt.losses.policy_gradient.grpo].
        opsm_threshold: as in [`grpo`][prefopt.losses.policy_gradient.grpo].

    Returns:
        ``LossOutput`` with ``loss`` ``(b, t)``, 0 where masked; metrics ``(b, t)``: ``pg_loss``,
        ``value_loss``, ``entropy``, ``approx_kl`` (\(\frac12(\ell - \ell^{old})^2\)), ``ratio``,
        ``clip_frac``, ``dual_clip_frac``, ``value_clip_frac``, ``is_weight``, ``policy_kept``
        (``masked_mean(m, mask)`` gives the batch value).
    """
    mask = _mask(mask, logp)
    if old_logp is None:
        raise TypeError("ppo: old_logp must be a torch.Tensor (the sampling policy's log-probs), got None")
    lp = torch.where(mask, logp, _zero(logp))
    adv = _per_token("advantages", advantages, mask).to(lp.dtype)
    log_ratio = _log_ratio(logp, old_logp, mask)
    hi = clip if clip_high is None else clip_high
    c = _clipped(log_ratio, adv, 1.0 - clip, 1.0 + hi, dual_clip=dual_clip)
    keep, weight, wm = _policy_keep(
        lp,
        old_logp,
        adv,
        mask,
        sampler_logp,
        policy_mask,
        correction,
        correction_min,
        correction_max,
        opsm_threshold,
    )
    pg = _apply_keep(c.loss, keep, weight, sampler_logp is not None)
    dual = c.dual
    clipped = c.clip_low | c.clip_high

    zero = torch.zeros_like(lp)
    vf, vclipped = zero, torch.zeros_like(mask)
    if values is not None:
        v = _tokens("values", values, mask).to(lp.dtype)
        if returns is None:
            raise ValueError("ppo: returns is required when values is given (the value-loss target)")
        ret = _tokens("returns", returns, mask, detach=True).to(lp.dtype)
        vf_unclipped = (v - ret).square()
        if value_clip is None:
            vf = 0.5 * vf_unclipped
        else:
            if old_values is None:
                raise ValueError(
                    "ppo: old_values is required for the clipped value loss (or set value_clip=None)"
                )
            v_old = _tokens("old_values", old_values, mask, detach=True).to(lp.dtype)
            v_clip = v_old + (v - v_old).clamp(-value_clip, value_clip)
            vf_clip = (v_clip - ret).square()
            vf = 0.5 * torch.maximum(vf_unclipped, vf_clip)
            vclipped = vf_clip > vf_unclipped
    elif returns is not None or old_values is not None:
        raise ValueError("ppo: returns / old_values were given without values")

    ent = zero
    if entropy is not None:
        ent = _tokens("entropy", entropy, mask).to(lp.dtype)
    elif ent_coef > 0:
        raise ValueError("ppo: entropy is required when ent_coef > 0")

    loss = torch.where(mask, pg + vf_coef * vf - ent_coef * ent, _zero(lp))
    metrics = _metrics(
        mask,
        lp,
        pg_loss=pg,
        value_loss=vf,
        entropy=ent,
        approx_kl=0.5 * log_ratio.square(),
        ratio=c.ratio,
        clip_frac=clipped,
        dual_clip_frac=dual,
        value_clip_frac=vclipped,
        **wm,
    )
    return LossOutput(loss, metrics)
