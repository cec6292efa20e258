r"""Reference-free pairwise losses: SimPO, CPO, ORPO, RRHF, SLiC-HF.

None of these reads ``ref_chosen``/``ref_rejected`` (``PairLogps`` may leave them ``None``). Notation as in
[`prefopt.losses.margin`][prefopt.losses.margin]: ``S`` token-sum log-probs, ``Ā = S/|y|`` per-token means
(lengths clamped at 1), ``σ`` the sigmoid. Every loss returns ``loss`` ``(b,)`` and the detached per-pair
metrics ``rewards/{chosen,rejected,margins,accuracies}`` and ``logps/{chosen,rejected}`` (what "reward" means
is given per loss: TRL's CPO/ORPO trainers log ``β·S`` or ``β·Ā``).

NLL terms (CPO, ORPO, RRHF, SLiC) take ``nll_norm`` (see
[`prefopt.losses.margin.nll_chosen`][prefopt.losses.margin.nll_chosen]): ``"batch_tokens"`` reproduces TRL's
``nn.CrossEntropyLoss`` token mean over the batch's chosen tokens (per-pair values whose batch mean is that
number), ``"sequence"`` is ``−S_w/|y_w|``, ``"sum"`` is ``−S_w``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from prefopt.losses.margin import BETA, NLL_NORMS, lengths, nll_chosen, pair_metrics
from prefopt.registry import between, ge, gt, one_of, register_loss
from prefopt.types import LossOutput, PairLogps

__all__ = ["cpo", "log1mexp", "orpo", "rrhf", "simpo", "slic"]

_NLL = {"nll_norm": one_of(*NLL_NORMS)}
_LS = {"label_smoothing": between(0.0, 0.5)}


def log1mexp(x: Tensor) -> Tensor:
    """``log(1 − exp(x))`` for ``x < 0``, stable at both ends (Mächler 2012: switch at ``−log 2``)."""
    return torch.where(x < -math.log(2.0), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def _smoothed(z: Tensor, eps: float) -> Tensor:
    out = -F.logsigmoid(z)
    if eps != 0.0:
        out = out * (1.0 - eps) - eps * F.logsigmoid(-z)
    return out


@register_loss("simpo", inputs="pairs", checks={**BETA, "gamma": ge(0), **_LS})
def simpo(
    logps: PairLogps, *, beta: float = 2.0, gamma: float = 0.5, label_smoothing: float = 0.0
) -> LossOutput:
    r"""SimPO: \(L = -\log\sigma(\beta(\bar A_w - \bar A_l) - \gamma)\) with \(\bar A = S/|y|\).

    Meng et al. 2024, "SimPO: Simple Preference Optimization with a Reference-Free Reward"
    (arXiv 2405.14734), Eq. (6); TRL ``experimental.cpo.CPOTrainer(loss_type="simpo", cpo_alpha=0)``, where
    ``simpo_gamma`` is the same absolute margin ``γ``. With ``label_smoothing = ε > 0`` it is TRL's smoothed
    form ``−(1−ε) log σ(z) − ε log σ(−z)``. Needs lengths.

    Defaults: ``β = 2.0`` and ``γ = 0.5`` (γ/β = 0.25; the SimPO authors' Mistral-base setting uses β = 2.0;
    TRL's CPOConfig defaults are β = 0.1, γ = 0.5). Zero point: ``Ā_w = Ā_l`` ⇒ ``log(1 + e^γ)``.
    Rewards metric: ``β·Ā`` (as TRL).
    """
    n_w, n_l = lengths(logps, "simpo")
    a_w, a_l = logps.chosen / n_w, logps.rejected / n_l
    loss = _smoothed(beta * (a_w - a_l) - gamma, label_smoothing)
    return LossOutput(loss=loss, metrics=pair_metrics(beta * a_w, beta * a_l, logps))


@register_loss(
    "cpo",
    inputs="pairs",
    checks={**BETA, "alpha": ge(0), **_LS, **_NLL},
)
def cpo(
    logps: PairLogps,
    *,
    beta: float = 0.1,
    alpha: float = 1.0,
    label_smoothing: float = 0.0,
    nll_norm: str = "batch_tokens",
) -> LossOutput:
    r"""CPO:
    \(L = -(1-\epsilon)\log\sigma(\beta(S_w - S_l)) - \epsilon\log\sigma(-\beta(S_w - S_l)) + \alpha\,\mathrm{NLL}(y_w)\).

    Xu et al. 2024, "Contrastive Preference Optimization" (arXiv 2401.08417), Eq. (3) (preference term) plus
    the behaviour-cloning NLL term. TRL ``experimental.cpo.CPOTrainer(loss_type="sigmoid")``: ``alpha`` here is
    TRL's ``cpo_alpha`` (default 1.0), **not** TRL's AlphaPO ``alpha`` (not implemented); the NLL is TRL's
    token-mean cross-entropy over the batch's chosen completion tokens (``nll_norm="batch_tokens"``, needs
    ``chosen_len``).
    Zero point: ``S_w = S_l`` ⇒ ``log 2 + α·NLL``; ``α = 0`` is reference-free DPO.
    Rewards metric: ``β·S`` (as TRL). Extra metric ``nll``.

    Args:
        logps: ``(b,)`` fields (no reference needed); ``chosen_len`` for ``nll_norm`` ``"batch_tokens"`` or
            ``"sequence"``.
        beta: ``β > 0`` (default 0.1).
        alpha: ``α ≥ 0``, the NLL weight (default 1.0).
        label_smoothing: ``ε ∈ [0, 0.5]`` (default 0.0).
        nll_norm: ``"batch_tokens"`` (default), ``"sequence"`` or ``"sum"`` (see the module docstring).
    """
    z = beta * (logps.chosen - logps.rejected)
    pref = _smoothed(z, label_smoothing)
    metrics = pair_metrics(beta * logps.chosen, beta * logps.rejected, logps)
    if alpha != 0.0:
        nll = nll_chosen(logps, nll_norm, "cpo")
        metrics["nll"] = nll.detach()
        return LossOutput(loss=pref + alpha * nll, metrics=metrics)
    return LossOutput(loss=pref, metrics=metrics)


@register_loss("orpo", inputs="pairs", checks={"lam": gt(0), **_NLL})
def orpo(logps: PairLogps, *, lam: float = 0.1, nll_norm: str = "batch_tokens") -> LossOutput:
    r"""ORPO:
    \(L = \mathrm{NLL}(y_w) - \lambda\log\sigma\big(\operatorname{logodds}(\bar A_w) - \operatorname{logodds}(\bar A_l)\big)\),
    \(\operatorname{logodds}(\bar A) = \bar A - \log(1 - e^{\bar A})\).

    Hong et al. 2024, "ORPO: Monolithic Preference Optimization without Reference Model" (arXiv 2403.07691),
    Eqs. (6)–(7); TRL ``experimental.orpo.ORPOTrainer`` (``lam`` = TRL's ``beta``, default 0.1), which uses the
    **mean** log-probs ``Ā`` in the odds. Needs lengths.

    Deviations: TRL's NLL is the token-mean cross-entropy over prompt *and* completion tokens of the chosen
    rows; prefopt only has completion log-probs, so its NLL is over completion tokens (``nll_norm``;
    ``"batch_tokens"`` = token mean over the batch, the paper's ``L_SFT``). ``Ā`` is clamped at ``−1e-6`` so
    that ``Ā = 0`` (probability 1, or invalid positive log-probs) gives a finite log-odds instead of ``inf``.
    Zero point: ``Ā_w = Ā_l`` ⇒ ``NLL + λ log 2``. Metrics: rewards ``λ·Ā`` (as TRL), ``nll``,
    ``log_odds_ratio`` = ``log σ(·)``, ``log_odds_chosen`` = the log-odds difference.
    """
    n_w, n_l = lengths(logps, "orpo")
    a_w = torch.clamp(logps.chosen / n_w, max=-1e-6)
    a_l = torch.clamp(logps.rejected / n_l, max=-1e-6)
    log_odds = (a_w - a_l) - (log1mexp(a_w) - log1mexp(a_l))
    ratio = F.logsigmoid(log_odds)
    nll = nll_chosen(logps, nll_norm, "orpo")
    metrics = pair_metrics(lam * a_w, lam * a_l, logps)
    metrics.update(nll=nll.detach(), log_odds_ratio=ratio.detach(), log_odds_chosen=log_odds.detach())
    return LossOutput(loss=nll - lam * ratio, metrics=metrics)


@register_loss("rrhf", inputs="pairs", checks={"nll_weight": ge(0), **_NLL})
def rrhf(logps: PairLogps, *, nll_weight: float = 1.0, nll_norm: str = "sequence") -> LossOutput:
    r"""RRHF (one pair): \(L = \max(0, \bar A_l - \bar A_w) + w\,\mathrm{NLL}(y_w)\), \(\bar A = S/|y|\).

    Yuan et al. 2023, "RRHF: Rank Responses to Align Language Models with Human Feedback"
    (arXiv 2304.05302), Eqs. (1)–(4) restricted to two responses (ranking loss on length-normalized scores
    plus fine-tuning on the best response). Not in TRL. Deviation: the paper's ``L_ft`` (Eq. 3) is a token
    sum; the default ``nll_norm="sequence"`` uses the per-token mean so the two terms share a scale (pass
    ``"sum"`` for the paper's form, ``nll_weight=0`` for the ranking term alone). Needs lengths.
    Zero point: ``Ā_w ≥ Ā_l`` ⇒ only the NLL term. Rewards metric: ``Ā``.
    """
    n_w, n_l = lengths(logps, "rrhf")
    a_w, a_l = logps.chosen / n_w, logps.rejected / n_l
    loss = torch.relu(a_l - a_w)
    metrics = pair_metrics(a_w, a_l, logps)
    if nll_weight != 0.0:
        nll = nll_chosen(logps, nll_norm, "rrhf")
        metrics["nll"] = nll.detach()
        loss = loss + nll_weight * nll
    return LossOutput(loss=loss, metrics=metrics)


@register_loss("slic", inputs="pairs", checks={"delta": gt(0), "lam": ge(0), **_NLL})
def slic(logps: PairLogps, *, delta: float = 1.0, lam: float = 0.1, nll_norm: str = "sum") -> LossOutput:
    r"""SLiC-HF: \(L = \max(0, \delta - (S_w - S_l)) + \lambda\,\mathrm{NLL}(y_w)\).

    Zhao et al. 2023, "SLiC-HF: Sequence Likelihood Calibration with Human Feedback" (arXiv 2305.10425),
    Eq. (1): a rank-calibration hinge on sequence log-likelihoods plus a cross-entropy regularizer on a target
    sequence; prefopt uses the chosen completion as that target (the paper's SLiC-HF-direct uses the SFT
    reference ``y_ref``). Not in TRL (TRL's ``hinge`` is the log-ratio variant). Defaults ``δ = 1.0``,
    ``λ = 0.1``, NLL as a sequence sum — these defaults were **not** verified against the paper.
    Zero point: ``S_w − S_l ≥ δ`` ⇒ only ``λ·NLL``. Rewards metric: ``S``.
    """
    loss = torch.relu(delta - (logps.chosen - logps.rejected))
    metrics = pair_metrics(logps.chosen, logps.rejected, logps)
    if lam != 0.0:
        nll = nll_chosen(logps, nll_norm, "slic")
        metrics["nll"] = nll.detach()
        loss = loss + lam * nll
    return LossOutput(loss=loss, metrics=metrics)
