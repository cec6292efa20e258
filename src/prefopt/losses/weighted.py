r"""Offline pairwise objectives that need per-token statistics of the LM head: WPO, LD-DPO, AlphaPO, TDPO.

Notation as in [`prefopt.losses.margin`][prefopt.losses.margin]: ``S`` token-sum log-probs, ``ρ = S − S^ref``,
``h = ρ_w − ρ_l``, ``Ā = S/|y|``, ``σ`` the sigmoid, ``sg`` stop-gradient; per token
``ℓ_t = log π_θ(y_t | x, y_<t)`` and ``m_t`` the completion mask.

Per-token data come in the **token-pairs** layout of [`prefopt.losses.decoupled`][prefopt.losses.decoupled]: a
``(2B, T)`` tensor whose rows ``0..B−1`` are the chosen completions and rows ``B..2B−1`` their rejected twins
(row ``B + i`` pairs with row ``i``), with a ``(2B, T)`` bool ``completion_mask`` (True = the token counts).
Positions outside the mask never reach a value or a gradient (they are selected away with ``torch.where``
before any arithmetic).

| loss | input kind | extra per-token data |
|---|---|---|
| ``wpo`` | ``pairs`` | ``token_logps``, ``log_sum_sq_probs``, ``completion_mask`` (keyword-only) |
| ``ld_dpo`` | ``token_pairs`` | ``(policy_logps, ref_logps, completion_mask)`` positional |
| ``alphapo`` | ``pairs`` | none (needs lengths) |
| ``tdpo`` | ``pairs`` | ``token_kl``, ``completion_mask`` (keyword-only) |

WPO's weight multiplies *any* registered pairwise loss (``base=``), and
[`ld_pair_logps`][prefopt.losses.weighted.ld_pair_logps] turns per-token log-probs into length-desensitised
[`PairLogps`][prefopt.types.PairLogps] for any pairwise loss, so both compose (WPO + IPO, WPO + SimPO, LD +
IPO, ...). The full-vocabulary statistics (``log Σ_v π_v²`` for WPO, the per-position ``KL(π_ref ‖ π_θ)`` for
TDPO) come from the chunked LM head on a model — [`token_stats`][prefopt.logprobs.token_stats]
(``log_sum_sq_probs=True``) and [`token_kl_to_reference`][prefopt.logprobs.token_kl_to_reference] — with no
``(b, t, V)`` tensor kept. The full-logits implementations here,
[`log_sum_sq_probs`][prefopt.losses.weighted.log_sum_sq_probs] and
[`token_kl`][prefopt.losses.weighted.token_kl], keep a ``(…, V)`` tensor: use them on small models or as
oracles.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from prefopt.losses.margin import BETA, lengths, logratios, pair_metrics
from prefopt.registry import Check, between, get_loss, get_spec, one_of, register_loss
from prefopt.types import LossOutput, PairLogps, check_mask, check_tensor

__all__ = [
    "alpha_reward",
    "alphapo",
    "ld_dpo",
    "ld_pair_logps",
    "log_sum_sq_probs",
    "tdpo",
    "token_kl",
    "wpo",
    "wpo_weights",
]

_EXP_CLAMP = 40.0


def _finite_real(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# ----------------------------------------------------------------------------------------------------------
# per-token helpers
# ----------------------------------------------------------------------------------------------------------


def _check_token_pairs(name: str, x: Any, mask: Any) -> int:
    """Check a ``(2B, T)`` float tensor and its ``(2B, T)`` bool mask; return ``B``."""
    check_tensor(name, x, ndim=2)
    check_mask("completion_mask", mask, tuple(x.shape), name)
    n = x.shape[0]
    if n == 0 or n % 2:
        raise ValueError(f"{name} must have an even, non-zero number of rows (2B, chosen first), got {n}")
    return n // 2


def _masked_row_sum(x: Tensor, mask: Tensor) -> Tensor:
    return torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device)).sum(dim=1)


def log_sum_sq_probs(logits: Tensor) -> Tensor:
    r"""\(\log\sum_v \pi_v^2\) with \(\pi = \mathrm{softmax}(z)\) over the last dim:
    ``logsumexp(2z) − 2·logsumexp(z)``.

    The WPO per-token normaliser (``Σ_v π_v² = E_{v∼π}[π_v]``, the expected probability of the policy's own
    sample). Full-logits reference implementation: ``(…, V)`` → ``(…)``, computed without gradient (WPO
    treats its weight as a constant) in at least float32. ``log Σ π² ∈ [−log V, 0]``.
    """
    check_tensor("logits", logits)
    if logits.ndim < 1 or logits.shape[-1] < 1:
        raise ValueError(f"logits must have shape (..., V) with V >= 1, got {tuple(logits.shape)}")
    with torch.no_grad():
        z = logits.detach()
        if z.dtype in (torch.float16, torch.bfloat16):
            z = z.float()
        return torch.logsumexp(2 * z, dim=-1) - 2 * torch.logsumexp(z, dim=-1)


def token_kl(policy_logits: Tensor, ref_logits: Tensor) -> Tensor:
    r"""Per-position forward KL
    \(\mathrm{KL}(\pi_{ref,t} \,\|\, \pi_{\theta,t}) = \sum_v \pi_{ref}(v)\,(\log\pi_{ref}(v) - \log\pi_\theta(v))\).

    TDPO's sequential KL term (Zeng et al. 2024, arXiv 2404.11999), evaluated along a given response. Full-logits reference implementation: ``(…, V)`` each → ``(…)``; the gradient flows into
    ``policy_logits`` only (the reference is detached). Computed in at least float32; ``≥ 0``, ``= 0`` where
    the two distributions agree.
    """
    check_tensor("policy_logits", policy_logits)
    check_tensor("ref_logits", ref_logits)
    if policy_logits.shape != ref_logits.shape:
        raise ValueError(
            f"ref_logits has shape {tuple(ref_logits.shape)} but policy_logits has shape "
            f"{tuple(policy_logits.shape)}"
        )
    dtype = torch.promote_types(policy_logits.dtype, torch.float32)
    logq = torch.log_softmax(policy_logits.to(dtype), dim=-1)
    logp = torch.log_softmax(ref_logits.detach().to(dtype), dim=-1)
    return (logp.exp() * (logp - logq)).sum(dim=-1)


def wpo_weights(token_logps: Tensor, log_sum_sq_probs: Tensor, completion_mask: Tensor) -> Tensor:
    r"""WPO's per-sequence factor
    \(w(y) = \exp\big(\frac{1}{|y|}\sum_t m_t(\ell_t - \log\sum_v \pi_\theta(v \mid x, y_{<t})^2)\big)\),
    detached.

    Zhou et al. 2024, "WPO: Enhancing RLHF with Weighted Preference Optimization" (arXiv 2406.11827),
    Eq. (2), with the length-normalised, "aligned" per-token log-probs of TRL 1.16 ``use_weighting``.
    Each per-token factor ``π(y_t)/Σ_v π_v²`` has expectation exactly 1 when ``y_t`` is sampled from the
    policy, so a weight far from 1 flags an off-policy response; it is **not** bounded by 1.

    Args:
        token_logps: ``(n, T)`` per-token log-probs ``ℓ_t`` of the sampled tokens (any rows, e.g. ``2B``).
        log_sum_sq_probs: ``(n, T)`` per-position ``log Σ_v π_v²``
            ([`log_sum_sq_probs`][prefopt.losses.weighted.log_sum_sq_probs]).
        completion_mask: ``(n, T)`` bool.

    Returns: ``(n,)`` detached weights (``|y|`` clamped at 1, so an empty row gives ``w = 1``).
    """
    check_tensor("token_logps", token_logps, ndim=2)
    check_tensor("log_sum_sq_probs", log_sum_sq_probs, ndim=2)
    if log_sum_sq_probs.shape != token_logps.shape:
        raise ValueError(
            f"log_sum_sq_probs has shape {tuple(log_sum_sq_probs.shape)} but token_logps has shape "
            f"{tuple(token_logps.shape)}"
        )
    check_mask("completion_mask", completion_mask, tuple(token_logps.shape), "token_logps")
    with torch.no_grad():
        dtype = torch.promote_types(token_logps.dtype, log_sum_sq_probs.dtype)
        aligned = token_logps.detach().to(dtype) - log_sum_sq_probs.detach().to(dtype)
        n = completion_mask.sum(dim=1).clamp(min=1).to(dtype)
        return torch.exp(_masked_row_sum(aligned, completion_mask) / n)


# ----------------------------------------------------------------------------------------------------------
# WPO
# ----------------------------------------------------------------------------------------------------------


def _base_ok(v: Any) -> bool:
    if not isinstance(v, str) or v == "wpo":
        return False
    try:
        return get_spec(v).inputs == "pairs"
    except KeyError:
        return False


def _base_kwargs_ok(v: Any) -> bool:
    return v is None or (isinstance(v, Mapping) and all(isinstance(k, str) for k in v))


def _clamp_ok(v: Any) -> bool:
    return v is None or (_finite_real(v) and v > 0)


def _wpo_validator(hp: Mapping[str, Any]) -> None:
    get_spec(hp["base"]).validate(dict(hp["base_kwargs"] or {}))


@register_loss(
    "wpo",
    inputs="pairs",
    checks={
        "base": Check(_base_ok, "the name of a registered pairwise loss (inputs='pairs'), other than 'wpo'"),
        "base_kwargs": Check(_base_kwargs_ok, "None or a mapping of the base loss's hyperparameters"),
        "clamp": Check(_clamp_ok, "None or a finite number > 0"),
    },
    validator=_wpo_validator,
    extras=("token_logps", "log_sum_sq_probs", "completion_mask"),
)
def wpo(
    logps: PairLogps,
    *,
    token_logps: Tensor,
    log_sum_sq_probs: Tensor,
    completion_mask: Tensor,
    base: str = "dpo",
    base_kwargs: Mapping[str, Any] | None = None,
    clamp: float | None = None,
) -> LossOutput:
    r"""WPO: any pairwise loss weighted by the (detached) on-policy-ness of both responses.

    $$
    L = \min\big(w(y_w)\,w(y_l),\ c\big)\cdot L_{\text{base}},\qquad
    w(y) = \operatorname{sg}\exp\Big(\frac{1}{|y|}\sum_t m_t\big(ℓ_t − \log\textstyle\sum_v π_θ(v|x,y_{<t})^2\big)\Big)
    $$

    ([`wpo_weights`][prefopt.losses.weighted.wpo_weights]; no ``min`` when ``clamp=None``). Zhou et al. 2024
    (arXiv 2406.11827), Eq. (2) with the aligned, length-normalised weight of Sec. 3. TRL 1.16:
    ``DPOConfig(use_weighting=True)`` with any ``loss_type`` (TRL does not clamp: ``clamp=None``, the
    default); the authors' released ``scripts/run_wpo.py`` clamps the product at 1 (``clamp=1.0``).
    Paper/authors' β for DPO: 0.01 (``base_kwargs={"beta": 0.01}``).

    Args:
        logps: ``(b,)`` pair log-probs for the base loss (with reference fields if the base needs them).
        token_logps: ``(2b, T)`` policy per-token log-probs ``ℓ_t``, chosen rows first (token-pairs layout).
        log_sum_sq_probs: ``(2b, T)`` per-position ``log Σ_v π_θ(v)²`` of the **policy** (temperature 1).
        completion_mask: ``(2b, T)`` bool.
        base: name of the registered pairwise loss to weight (default ``"dpo"``; e.g. ``"ipo"``, ``"simpo"``).
        base_kwargs: its hyperparameters (validated; default: the base's defaults).
        clamp: upper bound ``c`` on the pair weight (``None`` = TRL, ``1.0`` = the authors' code).

    Returns: ``loss`` ``(b,)``; the base loss's metrics plus ``wpo/weight_chosen``, ``wpo/weight_rejected``
    and ``wpo/weight`` (the pair weight after the clamp), all ``(b,)`` and detached. Gradient:
    ``weight × ∇L_base`` (the weight carries none).
    """
    b = _check_token_pairs("token_logps", token_logps, completion_mask)
    if b != logps.chosen.shape[0]:
        raise ValueError(
            f"token_logps has {2 * b} rows but logps has {logps.chosen.shape[0]} pairs; expected 2·b rows"
        )
    w = wpo_weights(token_logps, log_sum_sq_probs, completion_mask)
    out = get_loss(base, **dict(base_kwargs or {}))(logps)
    if out.loss.shape != (b,):
        raise ValueError(f"base loss {base!r} returned shape {tuple(out.loss.shape)}, expected ({b},)")
    pair_w = (w[:b] * w[b:]).to(out.loss.dtype)
    if clamp is not None:
        pair_w = pair_w.clamp(max=clamp)
    metrics = dict(out.metrics)
    metrics.update({"wpo/weight_chosen": w[:b], "wpo/weight_rejected": w[b:], "wpo/weight": pair_w})
    return LossOutput(loss=out.loss * pair_w, metrics=metrics)


# ----------------------------------------------------------------------------------------------------------
# LD-DPO
# ----------------------------------------------------------------------------------------------------------


def ld_pair_logps(
    policy_logps: Tensor, ref_logps: Tensor | None, completion_mask: Tensor, *, ld_alpha: float
) -> PairLogps:
    r"""Length-desensitised sequence log-probs of a token-pairs batch (LD-DPO).

    With ``l_p = min(|y_w|, |y_l|)`` per pair and ``k_t = Σ_{s≤t} m_s`` the position of token ``t`` along the
    completion, ``S^{LD}(y) = Σ_t m_t·(1[k_t ≤ l_p] + α·1[k_t > l_p])·ℓ_t`` for both responses, policy and
    reference alike: only the longer response's tail is down-weighted. Liu et al. 2024, "Length
    Desensitization in Direct Preference Optimization" (arXiv 2409.06411; the paper body was not available
    to us, the equation number is not given); TRL 1.16 ``ld_alpha`` (``dpo_trainer.py``), which this matches.

    Args:
        policy_logps: ``(2B, T)`` per-token policy log-probs, chosen rows first.
        ref_logps: ``(2B, T)`` per-token reference log-probs, or ``None``.
        completion_mask: ``(2B, T)`` bool.
        ld_alpha: ``α ∈ [0, 1]`` (1 = plain sums; 0 = the pair truncated to its shorter length).

    Returns: [`PairLogps`][prefopt.types.PairLogps] with ``S^LD`` fields ``(B,)`` and the original lengths
    ``|y|``, for any pairwise loss.
    """
    if not (_finite_real(ld_alpha) and 0 <= ld_alpha <= 1):
        raise ValueError(f"ld_alpha must be a number in [0, 1], got {ld_alpha!r}")
    b = _check_token_pairs("policy_logps", policy_logps, completion_mask)
    if ref_logps is not None:
        check_tensor("ref_logps", ref_logps, ndim=2)
        if ref_logps.shape != policy_logps.shape:
            raise ValueError(
                f"ref_logps has shape {tuple(ref_logps.shape)} but policy_logps has shape "
                f"{tuple(policy_logps.shape)}"
            )
    lens = completion_mask.sum(dim=1)
    shared = torch.minimum(lens[:b], lens[b:]).repeat(2)
    pos = completion_mask.long().cumsum(dim=1)
    dtype = policy_logps.dtype
    weight = torch.where(
        pos <= shared.unsqueeze(1),
        torch.ones((), dtype=dtype, device=policy_logps.device),
        torch.full((), float(ld_alpha), dtype=dtype, device=policy_logps.device),
    )

    def ld(x: Tensor) -> Tensor:
        return _masked_row_sum(
            weight.to(x.dtype) * torch.where(completion_mask, x, torch.zeros_like(x)), completion_mask
        )

    s = ld(policy_logps)
    s_ref = ld(ref_logps) if ref_logps is not None else None
    return PairLogps(
        chosen=s[:b],
        rejected=s[b:],
        ref_chosen=None if s_ref is None else s_ref[:b],
        ref_rejected=None if s_ref is None else s_ref[b:],
        chosen_len=lens[:b],
        rejected_len=lens[b:],
    )


@register_loss(
    "ld_dpo",
    inputs="token_pairs",
    needs_reference=True,
    checks={**BETA, "ld_alpha": between(0.0, 1.0)},
)
def ld_dpo(
    policy_logps: Tensor,
    ref_logps: Tensor,
    completion_mask: Tensor,
    *,
    beta: float = 0.1,
    ld_alpha: float = 0.5,
) -> LossOutput:
    r"""LD-DPO: \(L = -\log\sigma(\beta(\rho^{LD}_w - \rho^{LD}_l))\) with
    \(\rho^{LD} = S^{LD} - S^{LD}_{ref}\).

    ``S^{LD}`` ([`ld_pair_logps`][prefopt.losses.weighted.ld_pair_logps]) counts the tokens beyond the shorter
    response's length with weight ``α``. Liu et al. 2024 (arXiv 2409.06411); TRL 1.16
    ``DPOConfig(ld_alpha=α)`` with ``loss_type="sigmoid"`` (TRL applies it to every loss type; for another
    base loss call it on ``ld_pair_logps(...)``). ``α = 1``, or equal lengths, is DPO exactly.

    Args:
        policy_logps: ``(2B, T)`` per-token log-probs, chosen rows first.
        ref_logps: ``(2B, T)`` per-token log-probs, chosen rows first.
        completion_mask: ``(2B, T)`` bool.
        beta: ``β > 0`` (default 0.1, TRL's).
        ld_alpha: ``α ∈ [0, 1]`` (default 0.5, the paper's suggested starting point; TRL's default ``None``
            means off, i.e. ``α = 1``).

    Returns: ``loss`` ``(B,)``; the DPO metrics computed on the LD log-probs (``logps/*`` are ``S^{LD}``).
    """
    pl = ld_pair_logps(policy_logps, ref_logps, completion_mask, ld_alpha=ld_alpha)
    rho_w, rho_l = logratios(pl)
    return LossOutput(
        loss=-F.logsigmoid(beta * (rho_w - rho_l)), metrics=pair_metrics(beta * rho_w, beta * rho_l, pl)
    )


# ----------------------------------------------------------------------------------------------------------
# AlphaPO
# ----------------------------------------------------------------------------------------------------------


def alpha_reward(mean_logp: Tensor, alpha: float) -> Tensor:
    r"""AlphaPO's reward \(r_\alpha = (1 - p^{-\alpha})/\alpha\) of the length-normalised probability
    \(p = \exp(\bar A)\).

    Computed as ``−expm1(−α·Ā)/α`` (exact as ``α → 0``, where ``r_α → Ā``, SimPO's reward); ``α = 0``
    returns ``Ā``. ``dr_α/dĀ = p^{−α}``. Overflow guard: the exponent ``−α·Ā`` is clamped at 40 (for
    ``α > 0`` and ``Ā < −40/α``; the reward then saturates and its gradient is 0); TRL has no guard.
    """
    if alpha == 0:
        return mean_logp
    return -torch.expm1(torch.clamp(-alpha * mean_logp, max=_EXP_CLAMP)) / alpha


@register_loss(
    "alphapo",
    inputs="pairs",
    checks={
        **BETA,
        "alpha": Check(_finite_real, "a finite number"),
        "gamma": Check(_finite_real, "a finite number"),
        "label_smoothing": between(0.0, 0.5),
    },
)
def alphapo(
    logps: PairLogps,
    *,
    beta: float = 2.5,
    alpha: float = 0.25,
    gamma: float = 0.1,
    label_smoothing: float = 0.0,
) -> LossOutput:
    r"""AlphaPO: SimPO with the α-reward, \(L = -\log\sigma(\beta(r_\alpha(\bar A_w) - r_\alpha(\bar A_l)) - \gamma)\).

    ``r_α(Ā) = (1 − e^{−αĀ})/α`` ([`alpha_reward`][prefopt.losses.weighted.alpha_reward]), ``Ā = S/|y|``.
    Gupta et al. 2025, "AlphaPO: Reward Shape Matters for LLM Alignment" (arXiv 2501.03884; equation number
    not verified: the paper body was not available to us). TRL 1.16
    ``experimental.cpo.CPOConfig(loss_type="alphapo", alpha=α)`` (= ``simpo`` with ``cpo_alpha=0``; TRL's
    ``simpo_gamma`` is this ``γ``); ``label_smoothing = ε`` gives TRL's ``−(1−ε) log σ(z) − ε log σ(−z)``.
    ``α = 0`` is SimPO exactly; ``α > 0`` up-weights low-probability responses (``dr_α/dĀ = e^{−αĀ}``).

    Args:
        logps: ``(b,)``; needs lengths, no reference.
        beta: ``β > 0`` (default 2.5, the paper's Mistral-Instruct setting; TRL's default 0.1).
        alpha: any finite ``α`` (default 0.25, the paper's Mistral-Instruct setting; TRL's default 0).
        gamma: margin ``γ`` (default 0.1, the paper's Mistral-Instruct setting; TRL's default 0.5).
        label_smoothing: ``ε ∈ [0, 0.5]`` (default 0).

    Returns: ``loss`` ``(b,)``; rewards metrics ``β·r_α`` (as TRL).
    """
    n_w, n_l = lengths(logps, "alphapo")
    r_w = alpha_reward(logps.chosen / n_w, alpha)
    r_l = alpha_reward(logps.rejected / n_l, alpha)
    z = beta * (r_w - r_l) - gamma
    loss = -F.logsigmoid(z)
    if label_smoothing != 0.0:
        loss = loss * (1.0 - label_smoothing) - label_smoothing * F.logsigmoid(-z)
    return LossOutput(loss=loss, metrics=pair_metrics(beta * r_w, beta * r_l, logps))


# ----------------------------------------------------------------------------------------------------------
# TDPO
# ----------------------------------------------------------------------------------------------------------


@register_loss(
    "tdpo",
    inputs="pairs",
    needs_reference=True,
    checks={**BETA, "alpha": Check(_finite_real, "a finite number"), "variant": one_of("tdpo2", "tdpo1")},
    extras=("token_kl", "completion_mask"),
)
def tdpo(
    logps: PairLogps,
    *,
    token_kl: Tensor,
    completion_mask: Tensor,
    beta: float = 0.1,
    alpha: float = 0.5,
    variant: str = "tdpo2",
) -> LossOutput:
    r"""TDPO: DPO with the sequential token-level forward KL of each response.

    With ``D(y) = Σ_t m_t·KL(π_ref(·|x,y_<t) ‖ π_θ(·|x,y_<t))`` (per-token values from
    [`token_kl`][prefopt.losses.weighted.token_kl]):

    - TDPO1: ``L = −log σ(β·(h − (D(y_l) − D(y_w))))``
    - TDPO2: ``L = −log σ(β·(h − α·(D(y_l) − sg D(y_w))))`` (no gradient through the chosen KL)

    Zeng et al. 2024, "Token-level Direct Preference Optimization" (arXiv 2404.11999, ICML 2024; equation
    numbers not verified, the formulas follow the authors' released ``tdpo_loss`` (``config/loss/tdpo.yaml``: TDPO2, α = 0.5, β = 0.1)). KL
    terms are sums over tokens, not means. ``α = 0`` (TDPO2) is DPO; at ``π_θ = π_ref`` every ``D = 0``.

    Args:
        logps: ``(b,)`` with reference fields.
        token_kl: ``(2b, T)`` per-position ``KL(π_ref ‖ π_θ)`` (with gradient into the policy), chosen rows
            first.
        completion_mask: ``(2b, T)`` bool.
        beta: ``β > 0`` (default 0.1).
        alpha: TDPO2's KL weight (default 0.5; unused by TDPO1).
        variant: ``"tdpo2"`` (default) or ``"tdpo1"``.

    Returns: ``loss`` ``(b,)``; rewards metrics ``β·(ρ + D)`` (the authors' logging), ``kl/chosen`` and
    ``kl/rejected`` (``D``), all ``(b,)`` detached.
    """
    b = _check_token_pairs("token_kl", token_kl, completion_mask)
    if b != logps.chosen.shape[0]:
        raise ValueError(
            f"token_kl has {2 * b} rows but logps has {logps.chosen.shape[0]} pairs; expected 2·b"
        )
    rho_w, rho_l = logratios(logps)
    d = _masked_row_sum(token_kl.to(rho_w.dtype), completion_mask)
    d_w, d_l = d[:b], d[b:]
    if variant == "tdpo1":
        z = (rho_w - rho_l) - (d_l - d_w)
    else:
        z = (rho_w - rho_l) - alpha * (d_l - d_w.detach())
    metrics = pair_metrics(beta * (rho_w + d_w), beta * (rho_l + d_l), logps)
    metrics["kl/chosen"] = d_w.detach()
    metrics["kl/rejected"] = d_l.detach()
    return LossOutput(loss=-F.logsigmoid(beta * z), metrics=metrics)
