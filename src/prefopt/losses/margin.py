r"""The DPO family: pairwise margin losses on sequence log-ratios, with a reference model.

Notation (``docs/losses/margin.md``): for a pair ``(y_w, y_l)`` the policy sequence log-probs are the token
**sums** ``S_w = PairLogps.chosen`` and ``S_l = PairLogps.rejected``, the reference's ``S^ref_w``, ``S^ref_l``;
the log-ratios are ``ρ_w = S_w − S^ref_w`` and ``ρ_l = S_l − S^ref_l``, the margin is ``h = ρ_w − ρ_l``;
``σ`` is the logistic sigmoid and ``|y|`` a completion's token count (``PairLogps.chosen_len``).

Every loss here takes a [`PairLogps`][prefopt.types.PairLogps] whose fields are ``(b,)`` and returns a
[`LossOutput`][prefopt.types.LossOutput] whose ``loss`` is ``(b,)`` (one value per pair, unreduced) and whose
metrics are detached ``(b,)`` tensors:

``rewards/chosen`` ``β·ρ_w``; ``rewards/rejected`` ``β·ρ_l``; ``rewards/margins`` their difference;
``rewards/accuracies`` ``1.0`` where ``rewards/chosen > rewards/rejected`` else ``0.0``;
``logps/chosen`` ``S_w``; ``logps/rejected`` ``S_l`` — the same quantities TRL 1.16's ``DPOTrainer`` logs
(TRL logs their batch means). Averaging ``loss`` over the batch gives TRL's loss for the same ``loss_type``.

Where TRL 1.16 (``trl/trainer/dpo_trainer.py``, ``DPOTrainer._compute_loss``) has a loss, the definition and
the meaning of every hyperparameter are the same as there (the TRL name is given in each docstring).

The f-divergence generalization (f-DPO, Wang et al. 2023, arXiv 2309.16240, Thm. 1) replaces each log-ratio
``ρ`` by the score ``ψ(ρ) = f'(π/π_ref)`` before forming the margin; like TRL it is offered only on the losses
built on the chosen−rejected score difference (``dpo``, ``cdpo``, ``robust_dpo``, ``ipo``, ``hinge``,
``exo_pair``, ``discopop``, ``sigmoid_norm``):

| ``f_divergence`` | score ``ψ(ρ)`` |
|---|---|
| ``reverse_kl`` | ``ψ(ρ) = ρ`` (standard DPO; the default) |
| ``forward_kl`` | ``ψ(ρ) = 1 − exp(−ρ)`` |
| ``js_divergence`` | ``ψ(ρ) = log 2 + log σ(ρ)`` |
| ``alpha_divergence`` | ``ψ(ρ) = (exp((α−1)ρ) − 1)/(α−1)``; ``α = 1`` falls back to ``ρ`` |

Overflow guard (deviation from TRL): the exponents of the forward-KL score (``−ρ``) and of the α-divergence
score (``(α−1)ρ``) are clamped at 40 before ``exp``. TRL clamps the α-divergence exponent at 80 (float32) and
does not clamp the forward-KL one (``exp(−ρ)`` overflows to ``inf`` once ``ρ < −88``); 40 keeps even IPO's
*squared* score finite in float32 (``e^80`` squared overflows). Values equal TRL's whenever the exponent is
below 40 (i.e. ``π/π_ref > e^-40`` for forward KL); beyond it the score saturates and its gradient is 0.

Extreme values (every finite input, every accepted hyperparameter gives a finite loss and finite gradients):
the exponential term of [`discopop`][prefopt.losses.margin.discopop] has its exponent clamped at 40 in the
same way (it matters only for ``tau > 1``, where ``w·exp(−z) ≈ exp(−z(1 − 1/τ))`` grows without bound as
``z → −∞``); the squared terms of [`ipo`][prefopt.losses.margin.ipo] and
[`sppo_hard`][prefopt.losses.margin.sppo_hard] go through
[`saturating_product`][prefopt.losses.margin.saturating_product], whose *value* saturates at
``±e^40 ≈ 2.4e17`` while its gradient stays the exact ``2·d`` (finite for every finite ``d``); and their
``beta`` must be ``≥ 1e-8`` (below it the target ``1/(2β)`` alone exceeds the float32 range of the square, so
the loss would be the saturation constant for every input).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from prefopt.registry import Check, between, ge, gt, one_of, register_loss
from prefopt.types import LossOutput, PairLogps

__all__ = [
    "F_DIVERGENCES",
    "aot",
    "aot_unpaired",
    "apo_down",
    "apo_zero",
    "bco_pair",
    "cdpo",
    "discopop",
    "dpo",
    "dpop",
    "exo_pair",
    "f_divergence_score",
    "hinge",
    "ipo",
    "nca_pair",
    "rdpo",
    "robust_dpo",
    "saturating_product",
    "sft",
    "sigmoid_norm",
    "sppo_hard",
]

F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
_EXP_CLAMP = 40.0
_SATURATION = math.exp(_EXP_CLAMP)
_LOG2 = math.log(2.0)


def _finite_real(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


FINITE = Check(_finite_real, "a finite number")
BETA = {"beta": gt(0)}
SQUARE_BETA = {"beta": ge(1e-8)}  # ipo, sppo_hard: 1/(2β) must stay well inside the square's range
F_CHECKS = {"f_divergence": one_of(*F_DIVERGENCES), "f_alpha": FINITE}


# ----------------------------------------------------------------------------------------------------------
# shared helpers (also used by reference_free.py and combined.py)
# ----------------------------------------------------------------------------------------------------------


def f_divergence_score(logratio: Tensor, f_divergence: str = "reverse_kl", f_alpha: float = 0.5) -> Tensor:
    r"""The f-DPO score ``ψ(ρ) = f'(exp ρ)`` of a log-ratio ``ρ = log π/π_ref`` (any shape, same shape out).

    ``reverse_kl``: ``ρ``; ``forward_kl``: ``1 − exp(−ρ)``; ``js_divergence``: ``log 2 + log σ(ρ)``;
    ``alpha_divergence``: ``(exp((α−1)ρ) − 1)/(α−1)`` (``ρ`` when ``|α − 1| < 1e-6``). Exponents are clamped
    at 40 to stay finite in float32 (see the module docstring). Wang et al. 2023 (arXiv 2309.16240), Table 1.
    """
    if f_divergence == "reverse_kl":
        return logratio
    if f_divergence == "forward_kl":
        return 1.0 - torch.exp(torch.clamp(-logratio, max=_EXP_CLAMP))
    if f_divergence == "js_divergence":
        return _LOG2 + F.logsigmoid(logratio)
    if f_divergence == "alpha_divergence":
        if abs(f_alpha - 1.0) < 1e-6:
            return logratio
        t = torch.clamp((f_alpha - 1.0) * logratio, max=_EXP_CLAMP)
        return torch.expm1(t) / (f_alpha - 1.0)
    raise ValueError(f"f_divergence must be one of {', '.join(F_DIVERGENCES)}; got {f_divergence!r}")


def saturating_product(a: Tensor, b: Tensor) -> Tensor:
    r"""``a·b`` whose value is clamped to ``[−e^40, e^40]`` while its gradient is the exact product rule
    ``b·∂a + a·∂b`` (each coefficient clamped to the dtype's finite range, so it is finite for finite
    inputs; pass the same tensor twice for a square, whose gradient ``2a·∂a`` is then clamped as one).

    For loss terms that are products or squares of unbounded quantities (IPO's ``(h̃ − 1/(2τ))²``, a
    policy-gradient surrogate ``−A·log π``): at absurd inputs (a log-ratio of ``−1e30``) the true value is not
    representable and would round to ``inf``, which poisons a batch mean; the gradient, which is what trains,
    is still exact. Below the clamp the value is ``a·b`` bit for bit. First-order only (the clamp and the
    detached factors make second derivatives zero).
    """
    big = torch.finfo(a.dtype).max
    value = (a.detach() * b.detach()).clamp(-_SATURATION, _SATURATION)
    da = a - a.detach()  # 0 in value, ∂a in gradient
    if a is b:
        return value + (2.0 * a.detach()).clamp(-big, big) * da
    db = b - b.detach()
    return value + b.detach().clamp(-big, big) * da + a.detach().clamp(-big, big) * db


def logratios(logps: PairLogps) -> tuple[Tensor, Tensor]:
    """``(ρ_w, ρ_l) = (S_w − S^ref_w, S_l − S^ref_l)``; raises ``ValueError`` without reference log-probs."""
    if logps.ref_chosen is None or logps.ref_rejected is None:
        raise ValueError(
            "this loss needs reference log-probs: PairLogps.ref_chosen and ref_rejected are None"
        )
    return logps.chosen - logps.ref_chosen, logps.rejected - logps.ref_rejected


def lengths(logps: PairLogps, loss: str) -> tuple[Tensor, Tensor]:
    """``(|y_w|, |y_l|)`` as the log-probs' float dtype, clamped at 1 (TRL's ``.clamp(min=1)``)."""
    if logps.chosen_len is None or logps.rejected_len is None:
        raise ValueError(f"{loss} needs completion lengths: PairLogps.chosen_len and rejected_len are None")
    dtype = logps.chosen.dtype
    return logps.chosen_len.to(dtype).clamp(min=1), logps.rejected_len.to(dtype).clamp(min=1)


def pair_metrics(chosen_reward: Tensor, rejected_reward: Tensor, logps: PairLogps) -> dict[str, Tensor]:
    """The standard detached per-pair metrics from the two implicit rewards (see the module docstring)."""
    cr, rr = chosen_reward.detach(), rejected_reward.detach()
    return {
        "rewards/chosen": cr,
        "rewards/rejected": rr,
        "rewards/margins": cr - rr,
        "rewards/accuracies": (cr > rr).to(cr.dtype),
        "logps/chosen": logps.chosen.detach(),
        "logps/rejected": logps.rejected.detach(),
    }


def nll_chosen(logps: PairLogps, nll_norm: str, loss: str) -> Tensor:
    r"""Per-pair NLL of the chosen completion, ``(b,)``, normalized as ``nll_norm`` says.

    - ``"batch_tokens"`` (TRL's ``sft`` / ``nn.CrossEntropyLoss`` on the chosen rows): ``−S_w,i · b / Σ_j |y_w,j|``,
      whose batch **mean** is the token-mean NLL over all chosen tokens of the batch, ``−Σ_j S_w,j / Σ_j |y_w,j|``.
    - ``"sequence"``: ``−S_w,i / |y_w,i|`` (per-sequence token mean).
    - ``"sum"``: ``−S_w,i`` (sequence NLL).
    """
    if nll_norm == "sum":
        return -logps.chosen
    n_w, _ = lengths(logps, loss)
    if nll_norm == "sequence":
        return -logps.chosen / n_w
    if nll_norm == "batch_tokens":
        total = logps.chosen_len.to(logps.chosen.dtype).sum().clamp(min=1)  # type: ignore[union-attr]
        return -logps.chosen * (logps.chosen.shape[0] / total)
    raise ValueError(f"{loss}: nll_norm must be 'batch_tokens', 'sequence' or 'sum'; got {nll_norm!r}")


NLL_NORMS = ("batch_tokens", "sequence", "sum")


def _scores(logps: PairLogps, f_divergence: str, f_alpha: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    rho_w, rho_l = logratios(logps)
    return (
        rho_w,
        rho_l,
        f_divergence_score(rho_w, f_divergence, f_alpha),
        f_divergence_score(rho_l, f_divergence, f_alpha),
    )


def _out(
    loss: Tensor, beta: float, rho_w: Tensor, rho_l: Tensor, logps: PairLogps, **extra: Tensor
) -> LossOutput:
    metrics: dict[str, Tensor] = pair_metrics(beta * rho_w, beta * rho_l, logps)
    metrics.update({k: v.detach() for k, v in extra.items()})
    return LossOutput(loss=loss, metrics=metrics)


def _smoothed_sigmoid(z: Tensor, eps: float) -> Tensor:
    """``−(1−ε)·log σ(z) − ε·log σ(−z)`` (label-smoothed logistic loss)."""
    out = -F.logsigmoid(z)
    if eps != 0.0:
        out = out * (1.0 - eps) - eps * F.logsigmoid(-z)
    return out


# ----------------------------------------------------------------------------------------------------------
# the losses
# ----------------------------------------------------------------------------------------------------------


@register_loss("dpo", inputs="pairs", needs_reference=True, checks={**BETA, **F_CHECKS})
def dpo(
    logps: PairLogps, *, beta: float = 0.1, f_divergence: str = "reverse_kl", f_alpha: float = 0.5
) -> LossOutput:
    r"""DPO: \(L = -\log\sigma\big(\beta(\psi(\rho_w) - \psi(\rho_l))\big)\), with \(\psi(\rho) = \rho\) by
    default, i.e. \(-\log\sigma(\beta h)\).

    Rafailov et al. 2023, "Direct Preference Optimization" (arXiv 2305.18290), Eq. (7). f-divergence
    variants: Wang et al. 2023 (arXiv 2309.16240), Eq. (11). TRL ``loss_type="sigmoid"`` (with
    ``f_divergence_type``, ``f_alpha_divergence_coef``).

    Args:
        logps: ``(b,)`` fields; needs ``ref_chosen``/``ref_rejected``.
        beta: inverse temperature ``β > 0`` (default 0.1, TRL's default).
        f_divergence: ``reverse_kl`` (default) | ``forward_kl`` | ``js_divergence`` | ``alpha_divergence``.
        f_alpha: ``α`` of the α-divergence (default 0.5, TRL's ``f_alpha_divergence_coef``).

    Returns: ``loss`` ``(b,)``. Zero point: ``h = 0`` ⇒ ``log 2``, ``∂L/∂S_w = −β/2 = −∂L/∂S_l``.
    """
    rho_w, rho_l, s_w, s_l = _scores(logps, f_divergence, f_alpha)
    return _out(-F.logsigmoid(beta * (s_w - s_l)), beta, rho_w, rho_l, logps)


@register_loss(
    "cdpo",
    inputs="pairs",
    needs_reference=True,
    checks={**BETA, "label_smoothing": between(0.0, 0.5), **F_CHECKS},
)
def cdpo(
    logps: PairLogps,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.1,
    f_divergence: str = "reverse_kl",
    f_alpha: float = 0.5,
) -> LossOutput:
    r"""Conservative DPO: \(L = -(1-\epsilon)\log\sigma(\beta h) - \epsilon\log\sigma(-\beta h)\) (DPO under
    label noise \(\epsilon\)).

    Mitchell 2023, "A note on DPO with noisy preferences & relationship to IPO" (cDPO); this is the form
    TRL used for ``loss_type="sigmoid"`` with ``label_smoothing > 0`` before 1.x (TRL 1.16's ``sigmoid``
    no longer smooths; ``aot`` and the experimental CPO trainer keep this form).

    Args:
        logps: ``(b,)`` fields; needs ``ref_chosen``/``ref_rejected``.
        beta: ``β > 0`` (default 0.1).
        label_smoothing: ``ε ∈ [0, 0.5]`` (default 0.1; ``ε = 0`` is DPO).
        f_divergence: as in [`dpo`][prefopt.losses.margin.dpo] (the score difference replaces ``h``).
        f_alpha: as in [`dpo`][prefopt.losses.margin.dpo] (the score difference replaces ``h``).

    Returns: ``loss`` ``(b,)``. Zero point: ``h = 0`` ⇒ ``log 2``; the loss is minimal (stationary) at
    ``h* = log((1−ε)/ε)/β`` and decreasing in ``h`` below it.
    """
    rho_w, rho_l, s_w, s_l = _scores(logps, f_divergence, f_alpha)
    return _out(_smoothed_sigmoid(beta * (s_w - s_l), label_smoothing), beta, rho_w, rho_l, logps)


@register_loss(
    "robust_dpo",
    inputs="pairs",
    needs_reference=True,
    checks={**BETA, "label_smoothing": between(0.0, 0.5, hi_open=True), **F_CHECKS},
)
def robust_dpo(
    logps: PairLogps,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    f_divergence: str = "reverse_kl",
    f_alpha: float = 0.5,
) -> LossOutput:
    r"""Robust DPO (rDPO):
    \(L = \big[(1-\epsilon)(-\log\sigma(\beta h)) - \epsilon(-\log\sigma(-\beta h))\big] / (1 - 2\epsilon)\).

    Chowdhury et al. 2024, "Provably Robust DPO" (arXiv 2403.00409), Eq. (8): an unbiased estimator of the
    clean DPO loss when labels are flipped with probability ``ε``: ``(1−ε)L(h) + εL(−h) = −log σ(β h)``.
    TRL ``loss_type="robust"`` (``label_smoothing`` = ``ε``, default 0.0 as in TRL; the paper suggests 0.1).

    Zero point: ``h = 0`` ⇒ ``log 2``.

    Args:
        logps: ``(b,)`` fields; needs ``ref_chosen``/``ref_rejected``.
        beta: ``β > 0`` (default 0.1).
        label_smoothing: ``ε ∈ [0, 0.5)`` (default 0.0; TRL only warns outside it, prefopt raises).
        f_divergence: as in [`dpo`][prefopt.losses.margin.dpo].
        f_alpha: as in [`dpo`][prefopt.losses.margin.dpo].
    """
    rho_w, rho_l, s_w, s_l = _scores(logps, f_divergence, f_alpha)
    z = beta * (s_w - s_l)
    eps = label_smoothing
    loss = (-(1.0 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1.0 - 2.0 * eps)
    return _out(loss, beta, rho_w, rho_l, logps)


@register_loss("ipo", inputs="pairs", needs_reference=True, checks={**SQUARE_BETA, **F_CHECKS})
def ipo(
    logps: PairLogps, *, beta: float = 0.1, f_divergence: str = "reverse_kl", f_alpha: float = 0.5
) -> LossOutput:
    r"""IPO: \(L = (\tilde h - 1/(2\tau))^2\) with the per-token margin
    \(\tilde h = \psi(\rho_w)/|y_w| - \psi(\rho_l)/|y_l|\) and \(\tau = \beta\).

    Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human Preferences"
    (arXiv 2310.12036), Eq. (17). Deviation from the paper's formula (which uses sequence sums): like TRL
    ``loss_type="ipo"``, log-ratios are divided by the completion token counts (clamped at 1); TRL states this
    normalization was confirmed with the IPO authors. Needs ``chosen_len``/``rejected_len``.

    Zero point: ``h̃ = 0`` ⇒ ``1/(4τ²)`` (= 25 at τ = 0.1); minimum 0 at ``h̃ = 1/(2τ)``. The square's value
    saturates at ``e^40`` (gradient exact; see the module docstring).

    Args:
        logps: ``(b,)`` fields; needs ``ref_chosen``/``ref_rejected`` and ``chosen_len``/``rejected_len``.
        beta: ``τ ≥ 1e-8`` (default 0.1).
        f_divergence: as in [`dpo`][prefopt.losses.margin.dpo].
        f_alpha: as in [`dpo`][prefopt.losses.margin.dpo].
    """
    rho_w, rho_l, s_w, s_l = _scores(logps, f_divergence, f_alpha)
    n_w, n_l = lengths(logps, "ipo")
    d = s_w / n_w - s_l / n_l - 1.0 / (2.0 * beta)
    loss = saturating_product(d, d)
    return _out(loss, beta, rho_w, rho_l, logps)


@register_loss("hinge", inputs="pairs", needs_reference=True, checks={**BETA, **F_CHECKS})
def hinge(
    logps: PairLogps, *, beta: float = 0.1, f_divergence: str = "reverse_kl", f_alpha: float = 0.5
) -> LossOutput:
    r"""Hinge (SLiC/RSO on log-ratios): \(L = \max(0, 1 - \beta h)\).

    Zhao et al. 2023 (SLiC, arXiv 2305.10425) and Liu et al. 2023 (RSO, arXiv 2309.06657), Eq. (9) there;
    TRL ``loss_type="hinge"``. Zero point: ``h = 0`` ⇒ 1; loss and gradient are 0 once ``β h ≥ 1``.

    Args:
        logps: ``(b,)`` fields; needs ``ref_chosen``/``ref_rejected``.
        beta: ``β > 0`` (default 0.1; ``1/β`` is the target margin).
        f_divergence: as in [`dpo`][prefopt.losses.margin.dpo].
        f_alpha: as in [`dpo`][prefopt.losses.margin.dpo].
    """
    rho_w, rho_l, s_w, s_l = _scores(logps, f_divergence, f_alpha)
    return _out(torch.relu(1.0 - beta * (s_w - s_l)), beta, rho_w, rho_l, logps)


@register_loss(
    "exo_pair",
    inputs="pairs",
    needs_reference=True,
    checks={**BETA, "label_smoothing": between(0.0, 1.0, lo_open=True, hi_open=True), **F_CHECKS},
)
def exo_pair(
    logps: PairLogps,
    *,
    beta: float = 0.1,
    label_smoothing: float = 1e-3,
    f_divergence: str = "reverse_kl",
    f_alpha: float = 0.5,
) -> LossOutput:
    r"""EXO (pairwise):
    \(L = \mathrm{KL}(q \,\|\, p) = q_w(\log q_w - \log(1-\epsilon)) + q_l(\log q_l - \log\epsilon)\),
    \(q_w = \sigma(\beta h)\), \(q_l = \sigma(-\beta h)\).

    Ji et al. 2024, "Towards Efficient Exact Optimization of Language Model Alignment" (arXiv 2402.00856),
    Eq. (16) with ``K = 2``. TRL ``loss_type="exo_pair"``.

    Zero point: ``h = 0`` ⇒ ``−log 2 − ½·log(ε(1−ε))``; the minimum 0 is at ``σ(β h) = 1 − ε``.

    Args:
        logps: ``(b,)`` fields; needs ``ref_chosen``/``ref_rejected``.
        beta: ``β > 0`` (default 0.1).
        label_smoothing: ``ε ∈ (0, 1)`` (default 1e-3, the paper's recommendation; TRL requires ε > 0 for
            this loss).
        f_divergence: as in [`dpo`][prefopt.losses.margin.dpo].
        f_alpha: as in [`dpo`][prefopt.losses.margin.dpo].
    """
    rho_w, rho_l, s_w, s_l = _scores(logps, f_divergence, f_alpha)
    z = beta * (s_w - s_l)
    eps = label_smoothing
    loss = torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-eps)) + torch.sigmoid(-z) * (
        F.logsigmoid(-z) - math.log(eps)
    )
    return _out(loss, beta, rho_w, rho_l, logps)


@register_loss("nca_pair", inputs="pairs", needs_reference=True, checks=BETA)
def nca_pair(logps: PairLogps, *, beta: float = 0.1) -> LossOutput:
    r"""NCA (pairwise):
    \(L = -\log\sigma(\beta\rho_w) - \tfrac12\log\sigma(-\beta\rho_w) - \tfrac12\log\sigma(-\beta\rho_l)\).

    Chen et al. 2024, "Noise Contrastive Alignment of Language Models with Explicit Rewards"
    (arXiv 2402.05369), NCA loss with ``K = 2``; TRL ``loss_type="nca_pair"``.
    Zero point: ``ρ = 0`` ⇒ ``2 log 2``; ``∂L/∂S_l > 0`` always.

    Args:
        logps: ``(b,)`` fields; needs ``ref_chosen``/``ref_rejected``.
        beta: ``β > 0`` (default 0.1).
    """
    rho_w, rho_l = logratios(logps)
    r_w, r_l = beta * rho_w, beta * rho_l
    loss = -F.logsigmoid(r_w) - 0.5 * F.logsigmoid(-r_w) - 0.5 * F.logsigmoid(-r_l)
    return _out(loss, beta, rho_w, rho_l, logps)


@register_loss("bco_pair", inputs="pairs", needs_reference=True, checks=BETA)
def bco_pair(logps: PairLogps, delta: Tensor | float | None = None, *, beta: float = 0.1) -> LossOutput:
    r"""BCO (pairwise): \(L = -\log\sigma(\beta\rho_w - \delta) - \log\sigma(-(\beta\rho_l - \delta))\).

    Jung et al. 2024, "Binary Classifier Optimization for Large Language Model Alignment"
    (arXiv 2404.04656), Eq. (5) with the reward shift ``δ``. TRL ``loss_type="bco_pair"``.

    ``delta`` is a **data** argument (not a hyperparameter), detached before use: the paper (and TRL's older
    ``DPOTrainer``) uses the running mean of the implicit rewards ``β ρ`` over past batches; keep that running
    mean in your loop and pass it here (``()`` or ``(b,)`` tensor, or a float). ``None`` means ``δ = 0``,
    which is exactly TRL 1.16's ``bco_pair`` (it dropped the running mean).

    Zero point: ``ρ = 0, δ = 0`` ⇒ ``2 log 2``. Extra metric ``delta`` (broadcast to ``(b,)``).

    Args:
        logps: ``(b,)`` fields; needs ``ref_chosen``/``ref_rejected``.
        delta: the reward shift ``δ`` (data, detached): a ``()`` or ``(b,)`` tensor, a float, or None (0).
        beta: ``β > 0`` (default 0.1).
    """
    rho_w, rho_l = logratios(logps)
    if delta is None:
        d = torch.zeros((), dtype=rho_w.dtype, device=rho_w.device)
    elif isinstance(delta, Tensor):
        if delta.ndim > 1 or (delta.ndim == 1 and delta.shape != rho_w.shape):
            raise ValueError(
                f"delta must be a scalar or have shape {tuple(rho_w.shape)}, got {tuple(delta.shape)}"
            )
        d = delta.detach().to(rho_w.dtype)
    elif _finite_real(delta):
        d = torch.tensor(float(delta), dtype=rho_w.dtype, device=rho_w.device)
    else:
        raise TypeError(f"delta must be a tensor, a finite float or None, got {delta!r}")
    loss = -F.logsigmoid(beta * rho_w - d) - F.logsigmoid(-(beta * rho_l - d))
    return _out(loss, beta, rho_w, rho_l, logps, delta=d.expand_as(rho_w))


@register_loss("sppo_hard", inputs="pairs", needs_reference=True, checks=SQUARE_BETA)
def sppo_hard(logps: PairLogps, *, beta: float = 0.1) -> LossOutput:
    r"""SPPO with hard labels: \(L = (\rho_w - 1/(2\beta))^2 + (\rho_l + 1/(2\beta))^2\).

    Wu et al. 2024, "Self-Play Preference Optimization" (arXiv 2405.00675), Eq. (4.7) of Algorithm 1 with the
    win probability set to 1 for the chosen and 0 for the rejected response (``η = 1/β``); TRL
    ``loss_type="sppo_hard"``. Zero point: ``ρ = 0`` ⇒ ``1/(2β²)`` (= 50 at 0.1).
    Each square's value saturates at ``e^40`` (gradient exact; see the module docstring).

    Args:
        logps: ``(b,)`` fields; needs ``ref_chosen``/``ref_rejected``.
        beta: ``β ≥ 1e-8`` (default 0.1).
    """
    rho_w, rho_l = logratios(logps)
    d_w, d_l = rho_w - 0.5 / beta, rho_l + 0.5 / beta
    loss = saturating_product(d_w, d_w) + saturating_product(d_l, d_l)
    return _out(loss, beta, rho_w, rho_l, logps)


@register_loss(
    "aot", inputs="pairs", needs_reference=True, checks={**BETA, "label_smoothing": between(0.0, 0.5)}
)
def aot(logps: PairLogps, *, beta: float = 0.1, label_smoothing: float = 0.0) -> LossOutput:
    r"""AOT (paired):
    \(L_i = -(1-\epsilon)\log\sigma(\beta\Delta_{(i)}) - \epsilon\log\sigma(-\beta\Delta_{(i)})\),
    \(\Delta_{(i)} = \mathrm{sort}(S_w - S_l)_i - \mathrm{sort}(S^{ref}_w - S^{ref}_l)_i\).

    Melnyk et al. 2024, "Distributional Preference Alignment of LLMs via Optimal Transport"
    (arXiv 2406.05882), the paired AOT loss (first-order stochastic dominance via sorting within the batch);
    TRL ``loss_type="aot"``. **Batch-level**: entry ``i`` of ``loss`` belongs to the ``i``-th smallest margin,
    not to pair ``i`` (the batch mean is what is defined); splitting a batch changes the loss.

    Zero point: policy == reference ⇒ ``log 2``.

    Args:
        logps: ``(b,)`` fields; needs ``ref_chosen``/``ref_rejected``.
        beta: ``β > 0`` (default 0.1).
        label_smoothing: ``ε ∈ [0, 0.5]`` (default 0.0, TRL's default).
    """
    rho_w, rho_l = logratios(logps)
    assert logps.ref_chosen is not None and logps.ref_rejected is not None
    margin, _ = torch.sort(logps.chosen - logps.rejected, dim=0)
    ref_margin, _ = torch.sort(logps.ref_chosen - logps.ref_rejected, dim=0)
    return _out(_smoothed_sigmoid(beta * (margin - ref_margin), label_smoothing), beta, rho_w, rho_l, logps)


@register_loss(
    "aot_unpaired",
    inputs="pairs",
    needs_reference=True,
    checks={**BETA, "label_smoothing": between(0.0, 0.5)},
)
def aot_unpaired(logps: PairLogps, *, beta: float = 0.1, label_smoothing: float = 0.0) -> LossOutput:
    r"""AOT (unpaired):
    \(L_i = -(1-\epsilon)\log\sigma(\beta\Delta_{(i)}) - \epsilon\log\sigma(-\beta\Delta_{(i)})\),
    \(\Delta_{(i)} = \mathrm{sort}(\rho_w)_i - \mathrm{sort}(\rho_l)_i\).

    Melnyk et al. 2024 (arXiv 2406.05882), unpaired AOT; TRL ``loss_type="aot_unpaired"``. Batch-level like
    [`aot`][prefopt.losses.margin.aot] (entries follow the sorted order).
    Zero point: ``ρ = 0`` ⇒ ``log 2``.

    Args:
        logps: ``(b,)`` fields; needs ``ref_chosen``/``ref_rejected``.
        beta: ``β > 0`` (default 0.1).
        label_smoothing: ``ε ∈ [0, 0.5]`` (default 0.0).
    """
    rho_w, rho_l = logratios(logps)
    sw, _ = torch.sort(rho_w, dim=0)
    sl, _ = torch.sort(rho_l, dim=0)
    return _out(_smoothed_sigmoid(beta * (sw - sl), label_smoothing), beta, rho_w, rho_l, logps)


@register_loss("apo_zero", inputs="pairs", needs_reference=True, checks=BETA)
def apo_zero(logps: PairLogps, *, beta: float = 0.1) -> LossOutput:
    r"""APO-zero: \(L = (1 - \sigma(\beta\rho_w)) + \sigma(\beta\rho_l)\): raise the chosen likelihood, lower
    the rejected one.

    D'Oosterlinck et al. 2024, "Anchored Preference Optimization" (arXiv 2408.06266), Eq. (7); TRL
    ``loss_type="apo_zero"``. Zero point: ``ρ = 0`` ⇒ 1; ``∂L/∂S_w < 0 < ∂L/∂S_l`` always.

    Args:
        logps: ``(b,)`` fields; needs ``ref_chosen``/``ref_rejected``.
        beta: ``β > 0`` (default 0.1).
    """
    rho_w, rho_l = logratios(logps)
    loss = (1.0 - torch.sigmoid(beta * rho_w)) + torch.sigmoid(beta * rho_l)
    return _out(loss, beta, rho_w, rho_l, logps)


@register_loss("apo_down", inputs="pairs", needs_reference=True, checks=BETA)
def apo_down(logps: PairLogps, *, beta: float = 0.1) -> LossOutput:
    r"""APO-down: \(L = \sigma(\beta\rho_w) + (1 - \sigma(\beta h))\): lower both likelihoods, the rejected
    one more.

    D'Oosterlinck et al. 2024 (arXiv 2408.06266), Eq. (8); TRL ``loss_type="apo_down"``. Zero point:
    ``ρ = 0`` ⇒ 1 (``∂L/∂S_w = 0`` there: the two terms cancel).

    Args:
        logps: ``(b,)`` fields; needs ``ref_chosen``/``ref_rejected``.
        beta: ``β > 0`` (default 0.1).
    """
    rho_w, rho_l = logratios(logps)
    loss = torch.sigmoid(beta * rho_w) + (1.0 - torch.sigmoid(beta * (rho_w - rho_l)))
    return _out(loss, beta, rho_w, rho_l, logps)


@register_loss("discopop", inputs="pairs", needs_reference=True, checks={**BETA, "tau": gt(0), **F_CHECKS})
def discopop(
    logps: PairLogps,
    *,
    beta: float = 0.1,
    tau: float = 0.05,
    f_divergence: str = "reverse_kl",
    f_alpha: float = 0.5,
) -> LossOutput:
    r"""DiscoPOP / LRML: with \(z = \beta h\) and \(w = \sigma(z/\tau)\):
    \(L = (1 - w)(-\log\sigma(z)) + w\,e^{-z}\).

    Chris Lu et al. 2024, "Discovering Preference Optimization Algorithms with and for Large Language Models"
    (arXiv 2406.08414), Eq. (5) (log-ratio modulated loss). TRL ``loss_type="discopop"`` (``discopop_tau``).
    Numerics (same value as TRL): ``w·exp(−z)`` is computed as ``exp(−z + log σ(z/τ))`` and ``(1−w)`` as
    ``σ(−z/τ)``, so that ``z → −∞`` gives a finite loss instead of TRL's ``inf·0 = NaN``; for ``τ > 1`` the
    exponent ``−z + log σ(z/τ)`` grows without bound as ``z → −∞`` and is clamped at 40 (that term's value
    saturates at ``e^40`` and its gradient is 0 beyond; the ``−log σ(z)`` term still pushes ``z`` up). For
    ``τ ≤ 1`` the exponent is ``≤ min(−z, z(1/τ − 1)) ≤ 0``, so the clamp is inactive and the value is TRL's.

    Zero point: ``h = 0`` ⇒ ``(log 2 + 1)/2``. Not monotone in ``h`` (no gradient-sign guarantee).

    Args:
        logps: ``(b,)`` fields; needs ``ref_chosen``/``ref_rejected``.
        beta: ``β > 0`` (default 0.1).
        tau: ``τ > 0`` (default 0.05, the paper's value).
        f_divergence: as in [`dpo`][prefopt.losses.margin.dpo].
        f_alpha: as in [`dpo`][prefopt.losses.margin.dpo].
    """
    rho_w, rho_l, s_w, s_l = _scores(logps, f_divergence, f_alpha)
    z = beta * (s_w - s_l)
    exponent = torch.clamp(-z + F.logsigmoid(z / tau), max=_EXP_CLAMP)
    loss = -F.logsigmoid(z) * torch.sigmoid(-z / tau) + torch.exp(exponent)
    return _out(loss, beta, rho_w, rho_l, logps)


@register_loss("sigmoid_norm", inputs="pairs", needs_reference=True, checks={**BETA, **F_CHECKS})
def sigmoid_norm(
    logps: PairLogps, *, beta: float = 0.1, f_divergence: str = "reverse_kl", f_alpha: float = 0.5
) -> LossOutput:
    r"""Length-normalized DPO: \(L = -\log\sigma\big(\beta(\psi(\rho_w)/|y_w| - \psi(\rho_l)/|y_l|)\big)\).

    DPO (Rafailov et al. 2023, Eq. 7) on per-token log-ratios; TRL ``loss_type="sigmoid_norm"`` (lengths
    clamped at 1). Zero point: equal per-token log-ratios ⇒ ``log 2``.

    Args:
        logps: ``(b,)`` fields; needs ``ref_chosen``/``ref_rejected`` and ``chosen_len``/``rejected_len``.
        beta: ``β > 0`` (default 0.1).
        f_divergence: as in [`dpo`][prefopt.losses.margin.dpo].
        f_alpha: as in [`dpo`][prefopt.losses.margin.dpo].
    """
    rho_w, rho_l, s_w, s_l = _scores(logps, f_divergence, f_alpha)
    n_w, n_l = lengths(logps, "sigmoid_norm")
    return _out(-F.logsigmoid(beta * (s_w / n_w - s_l / n_l)), beta, rho_w, rho_l, logps)


@register_loss("sft", inputs="pairs", needs_reference=False, checks={"nll_norm": one_of(*NLL_NORMS)})
def sft(logps: PairLogps, *, nll_norm: str = "batch_tokens") -> LossOutput:
    r"""NLL of the chosen completion (RPO/MPO's SFT term), per pair ``(b,)``.

    With the default ``nll_norm="batch_tokens"``: ``L_i = −S_w,i · b / Σ_j |y_w,j|``, so that ``L.mean()`` is
    the token-mean NLL over every chosen completion token of the batch, ``−Σ_j S_w,j / Σ_j |y_w,j|`` — exactly
    TRL 1.16's ``loss_type="sft"`` (which expands that batch scalar to ``(b,)``) in value *and* gradient, while
    keeping a per-pair value. Like TRL's, this mean depends on how a batch is split; ``"sequence"``
    (``−S_w/|y_w|``) or ``"sum"`` (``−S_w``) are per-pair-local alternatives. ``"batch_tokens"`` and
    ``"sequence"`` need ``chosen_len``. Pang et al. 2024, "Iterative Reasoning Preference Optimization"
    (arXiv 2404.19733), Eq. (1) (NLL normalized by length). No reference needed.

    Zero point: ``S_w = 0`` ⇒ 0. Metrics: ``logps/chosen``, ``logps/rejected``, ``nll`` (= loss, detached).
    """
    loss = nll_chosen(logps, nll_norm, "sft")
    return LossOutput(
        loss=loss,
        metrics={
            "logps/chosen": logps.chosen.detach(),
            "logps/rejected": logps.rejected.detach(),
            "nll": loss.detach(),
        },
    )


@register_loss("rdpo", inputs="pairs", needs_reference=True, checks={**BETA, "alpha": FINITE})
def rdpo(logps: PairLogps, *, beta: float = 0.1, alpha: float = 0.0) -> LossOutput:
    r"""Length-regularized DPO (R-DPO): \(L = -\log\sigma(\beta h + \alpha(|y_w| - |y_l|))\).

    Park et al. 2024, "Disentangling Length from Quality in Direct Preference Optimization"
    (arXiv 2403.19159), the R-DPO objective (Eq. 9). Derivation: maximizing ``E[r] − α|y| − β·KL`` makes the
    implicit reward ``β ρ(y) + α|y|``, so with ``α > 0`` the length term, not the policy's log-ratio, explains
    a preference for the longer response and the policy is not pushed to learn the length bias. Lengths are
    the raw token counts (not clamped). Not in TRL. Zero point: ``h = 0`` and equal lengths ⇒ ``log 2``.

    Args:
        logps: ``(b,)`` fields; needs ``ref_chosen``/``ref_rejected`` and ``chosen_len``/``rejected_len``.
        beta: ``β > 0`` (default 0.1).
        alpha: ``α``, finite (default 0.0 ⇒ DPO; the Understand_MarginPO repo used 0.2 on TL;DR).
    """
    rho_w, rho_l = logratios(logps)
    if logps.chosen_len is None or logps.rejected_len is None:
        raise ValueError("rdpo needs completion lengths: PairLogps.chosen_len and rejected_len are None")
    dl = logps.chosen_len.to(rho_w.dtype) - logps.rejected_len.to(rho_w.dtype)
    return _out(-F.logsigmoid(beta * (rho_w - rho_l) + alpha * dl), beta, rho_w, rho_l, logps)


@register_loss("dpop", inputs="pairs", needs_reference=True, checks={**BETA, "lam": ge(0)})
def dpop(logps: PairLogps, *, beta: float = 0.1, lam: float = 50.0) -> LossOutput:
    r"""DPO-Positive (DPOP): \(L = -\log\sigma\big(\beta(h - \lambda\max(0, S^{ref}_w - S_w))\big)\).

    Pal et al. 2024, "Smaug: Fixing Failure Modes of Preference Optimisation with DPO-Positive"
    (arXiv 2402.13228), Eq. (3): the penalty is active only while the policy assigns the chosen completion a
    lower likelihood than the reference, and then pushes ``S_w`` up. Not in TRL.
    Zero point: ``S_w ≥ S^ref_w`` and ``h = 0`` ⇒ ``log 2``; ``λ = 0`` ⇒ DPO. Extra metric ``penalty`` =
    ``max(0, S^ref_w − S_w)``.

    Args:
        logps: ``(b,)`` fields; needs ``ref_chosen``/``ref_rejected``.
        beta: ``β > 0`` (default 0.1).
        lam: ``λ ≥ 0`` (default 50, the paper's value).
    """
    rho_w, rho_l = logratios(logps)
    penalty = torch.relu(-rho_w)
    return _out(
        -F.logsigmoid(beta * (rho_w - rho_l - lam * penalty)), beta, rho_w, rho_l, logps, penalty=penalty
    )
