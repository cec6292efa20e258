r"""The rest of the Best-of-N family beside BOND/J-BOND: BoNBoN, variational BoN (vBoN), QRPO and InfAlign-CTRL.

All three target (an approximation of) the Best-of-N distribution ``π_BoN`` of the reference policy; they differ
in what they need at training time (see ``docs/bon_family.md`` for the math and a "which one when" table):

| loss | input kind | data per row |
|---|---|---|
| ``bonbon`` | ``pairs`` | best (chosen) and worst (rejected) of ``n`` reference samples, with ``S``, ``S_ref`` |
| ``vbon`` | ``best_of_n`` | a policy sample: ``S_θ``, ``S_ref``, its reward, ``k`` reference rewards |
| ``qrpo`` | ``best_of_n`` | any response (offline): ``S_θ``, ``S_ref``, its reward, ``k`` reference rewards |

InfAlign-CTRL is not a loss but a reward: [`infalign_reward`][prefopt.losses.bon_family.infalign_reward]
(calibrate with [`calibrated_reward`][prefopt.losses.bon_family.calibrated_reward], then
[`infalign_transform`][prefopt.losses.bon_family.infalign_transform]) feeds any policy-gradient loss, e.g.
through [`prefopt.rl.rloo_advantages`][prefopt.rl.rloo_advantages];
[`calibrated_bon_tradeoff`][prefopt.losses.bon_family.calibrated_bon_tradeoff] gives the model-free
win-rate/KL curve used to choose the transform's ``t``.

Notation: ``F(y) = P_{y'∼π_ref}[r(y') < r(y)]`` and ``p_≤(y)`` the reference quantiles; with distinct rewards
``π_BoN(y) = (F(y) + π_ref(y))^N − F(y)^N = Σ_{i=1}^{N} C(N,i) F^{N−i} π_ref^i`` (exact helpers in
[`prefopt.bon`][prefopt.bon], e.g. [`prefopt.bon.bon_distribution`][prefopt.bon.bon_distribution]). For
continuous rewards ``π_BoN = N·Q^{N−1}·π_ref`` with ``Q`` the reference CDF of the reward, the KL-regularised
RL optimum with reward ``log Q`` and coefficient ``1/(N−1)``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from prefopt.bon import check_n
from prefopt.losses.bond import loo_baseline
from prefopt.losses.margin import logratios, pair_metrics
from prefopt.registry import Check, between, gt, one_of, register_loss
from prefopt.types import BestOfNSamples, LossOutput, PairLogps

__all__ = [
    "INFALIGN_TRANSFORMS",
    "QRPO_TRANSFORMS",
    "bonbon",
    "bonbon_beta",
    "calibrated_bon_tradeoff",
    "calibrated_reward",
    "infalign_reward",
    "infalign_transform",
    "pool_quantile",
    "qrpo",
    "qrpo_log_partition",
    "qrpo_transform",
    "vbon",
    "vbon_log_ratio",
]


def _int_ge(lo: int) -> Check:
    return Check(lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= lo, f"an integer >= {lo}")


def _harmonic(k: int) -> float:
    return math.fsum(1.0 / j for j in range(1, k + 1))


# ----------------------------------------------------------------------------------------------------------
# BoNBoN
# ----------------------------------------------------------------------------------------------------------


def bonbon_beta(n: int) -> float:
    r"""BoNBoN's \(\beta^* = 1/(2(n-1)H_{n-1})\), \(H_k = \sum_{j \le k} 1/j\) (``n = 8`` gives 0.0275482…).

    Derivation: under ``π_BoN`` (continuous rewards) the best-vs-worst log-ratio margin is
    ``h* = (n−1)(log Q(y_(n)) − log Q(y_(1)))``; ``Q`` of the reference samples is uniform, so
    ``E log U_max = −1/n``, ``E log U_min = −H_n`` and ``E h* = (n−1) H_{n−1}``. IPO's target margin is
    ``1/(2β)``, hence ``β*``. Gui et al. 2024 (arXiv 2406.00832); the README of the authors' code uses
    ``beta=0.0275482094`` for ``n = 8``.
    """
    check_n(n, minimum=2)
    return 1.0 / (2 * (n - 1) * _harmonic(n - 1))


def _beta_ok(v: Any) -> bool:
    return v == "auto" or (
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0
    )


@register_loss(
    "bonbon",
    inputs="pairs",
    needs_reference=True,
    checks={
        "n": _int_ge(2),
        "beta": Check(_beta_ok, "'auto' or a finite number > 0"),
        "alpha": between(0.0, 1.0),
        "pair_loss": one_of("ipo", "sigmoid"),
    },
)
def bonbon(
    logps: PairLogps,
    *,
    n: int = 8,
    beta: float | str = "auto",
    alpha: float = 0.005,
    pair_loss: str = "ipo",
) -> LossOutput:
    r"""BoNBoN: SFT on the best of ``n`` reference samples plus an IPO term on best-vs-worst.

    $$
    L = α·(−S(y_{(n)})) + (1 − α)·\Big(h − \frac{1}{2β}\Big)^2,\qquad
    h = ρ(y_{(n)}) − ρ(y_{(1)}),\quad β = β^* = \frac{1}{2(n−1)H_{n−1}}\ (\texttt{beta="auto"})
    $$

    ``y_(n)`` / ``y_(1)`` are the best and worst (by reward) of ``n`` samples from the reference;
    ``pair_loss="sigmoid"`` replaces the IPO term by ``−log σ(β h)``, which is what the authors' released
    trainer computes for ``loss=bonbon`` (it calls the shared preference loss without ``ipo=True``). Gui,
    Gârbacea, Veitch 2024, "BoNBoN Alignment for Large Language Models and the Sweetness of Best-of-n
    Sampling" (arXiv 2406.00832; equation numbers not verified, the paper body was not available to us).
    The SFT term is the sequence-sum NLL (as the released trainer). ``h`` uses token **sums** (no length
    normalisation, unlike TRL's ``ipo``).

    What it converges to (checked exactly on a categorical policy in ``tests/test_losses_bon_family.py``):
    ``α = 1`` is SFT on Best-of-n samples, whose minimiser is ``π_BoN`` exactly; the IPO term is minimised
    where ``π_BoN``'s *mean* best-vs-worst margin ``(n−1)H_{n−1}`` is matched, but its population minimiser
    is **not** ``π_BoN`` (the residual ``h* − 1/(2β*)`` correlates with the worst sample), so for ``α < 1``
    the fixed point is near, not at, ``π_BoN`` (``docs/bon_family.md`` gives measured distances).

    Args:
        logps: ``(b,)``: ``chosen`` = ``S_θ`` of the best sample, ``rejected`` = of the worst, with reference
            fields.
        n: samples per prompt ``n >= 2`` (default 8).
        beta: ``"auto"`` (``β*(n)``, default) or ``β > 0``.
        alpha: SFT weight ``α ∈ [0, 1]`` (default 0.005, the authors' README).
        pair_loss: ``"ipo"`` (paper, default) or ``"sigmoid"`` (released code).

    Returns: ``loss`` ``(b,)``; the standard pair metrics (rewards ``β·ρ``) plus ``bonbon/sft`` (``−S_w``) and
    ``bonbon/pair`` (the pair term), ``(b,)`` detached.
    """
    b = bonbon_beta(n) if beta == "auto" else float(beta)
    rho_w, rho_l = logratios(logps)
    h = rho_w - rho_l
    pair = (h - 1.0 / (2.0 * b)) ** 2 if pair_loss == "ipo" else -F.logsigmoid(b * h)
    sft = -logps.chosen
    metrics = pair_metrics(b * rho_w, b * rho_l, logps)
    metrics["bonbon/sft"] = sft.detach()
    metrics["bonbon/pair"] = pair.detach()
    return LossOutput(loss=alpha * sft + (1.0 - alpha) * pair, metrics=metrics)


# ----------------------------------------------------------------------------------------------------------
# pool quantiles
# ----------------------------------------------------------------------------------------------------------

_QUANTILES = ("vbon", "lt", "le", "mid")


def pool_quantile(reward: Tensor, ref_rewards: Tensor, kind: str) -> Tensor:
    r"""Quantile of ``reward`` ``(b,)`` among ``k`` pool rewards ``(b, k)``, one of four conventions.

    With ``c_< = #{j: r'_j < r}`` and ``c_= = #{j: r'_j = r}``:
    ``"vbon"`` ``(c_< + 1)/(k + 1)`` (the vBoN authors' estimate, never 0); ``"lt"`` ``c_</k`` (the strict
    CDF ``F``); ``"le"`` ``(c_< + c_=)/k`` (QRPO's ``≤`` convention, ``p_≤``); ``"mid"``
    ``(c_< + c_=/2)/k`` (ties count half). Returns ``(b,)`` in ``[0, 1]`` with the float dtype of
    ``reward`` (float32 for integer rewards); not differentiable (an indicator count).
    """
    if ref_rewards.ndim != 2 or ref_rewards.shape[0] != reward.shape[0]:
        raise ValueError(
            f"ref_rewards must have shape ({reward.shape[0]}, k), got {tuple(ref_rewards.shape)}"
        )
    k = ref_rewards.shape[1]
    if k < 1:
        raise ValueError("ref_rewards needs at least one reference reward per row (k >= 1)")
    for name, x in (("reward", reward), ("ref_rewards", ref_rewards)):
        if torch.is_floating_point(x) and bool(torch.isnan(x).any()):
            raise ValueError(f"{name} has NaN value(s)")
    dtype = reward.dtype if torch.is_floating_point(reward) else torch.get_default_dtype()
    r = reward.unsqueeze(1)
    lt = (ref_rewards < r).sum(dim=1).to(dtype)
    eq = (ref_rewards == r).sum(dim=1).to(dtype)
    if kind == "vbon":
        return (lt + 1) / (k + 1)
    if kind == "lt":
        return lt / k
    if kind == "le":
        return (lt + eq) / k
    if kind == "mid":
        return (lt + 0.5 * eq) / k
    raise ValueError(f"quantile must be one of {', '.join(_QUANTILES)}; got {kind!r}")


# ----------------------------------------------------------------------------------------------------------
# vBoN
# ----------------------------------------------------------------------------------------------------------


def vbon_log_ratio(quantile: Tensor, ref_logp: Tensor, n: int, variant: str = "exact") -> Tensor:
    r"""\(g(y) = \log \pi_{BoN}(y)/\pi_{ref}(y)\) (``"exact"``) or its one-term lower bound (``"bound"``).

    ``"exact"``: ``g = log Σ_{i=1}^{N} C(N,i) F^{N−i} π_ref(y)^{i−1}`` (the binomial form of
    ``π_BoN/π_ref`` with ``F`` the strict quantile and ``π_ref(y) = exp(ref_logp)``), by a log-sum-exp over
    ``i`` (terms with ``F = 0`` and ``i < N`` are 0). ``"bound"``: the ``i = 1`` term,
    ``g = log N + (N−1) log F ≤`` the exact value (``−inf`` where ``F = 0``). Shapes ``(b,)``.
    """
    check_n(n, minimum=2)
    dtype = ref_logp.dtype
    q = quantile.to(dtype)
    pos = q > 0
    log_f = torch.log(torch.where(pos, q, torch.ones_like(q)))
    if variant == "bound":
        return torch.where(pos, math.log(n) + (n - 1) * log_f, torch.full_like(q, -math.inf))
    if variant != "exact":
        raise ValueError(f"variant must be 'exact' or 'bound'; got {variant!r}")
    lref = torch.clamp(ref_logp, max=0.0)  # a log-probability; clamp rounding noise above 0
    terms = []
    for i in range(1, n + 1):
        log_c = math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1)
        if i < n:
            t = torch.where(pos, log_c + (n - i) * log_f + (i - 1) * lref, torch.full_like(q, -math.inf))
        else:
            t = log_c + (i - 1) * lref
        terms.append(t)
    return torch.logsumexp(torch.stack(terms, dim=0), dim=0)


@register_loss(
    "vbon",
    inputs="best_of_n",
    needs_reference=True,
    checks={
        "n": _int_ge(2),
        "variant": one_of("exact", "bound", "released_exact"),
        "quantile": one_of(*_QUANTILES),
        "quantile_floor": between(0.0, 1.0, lo_open=True),
        "baseline": one_of("loo", "none"),
    },
)
def vbon(
    samples: BestOfNSamples,
    *,
    n: int = 8,
    variant: str = "exact",
    quantile: str = "vbon",
    quantile_floor: float = 0.5,
    baseline: str = "loo",
) -> LossOutput:
    r"""Variational Best-of-N: policy-gradient surrogate of ``KL(π_θ ‖ π_BoN)``.

    Per policy sample ``y_i ∼ π_θ`` (``F̂`` its quantile among the ``k`` reference rewards; \(\ell_i\) =
    ``logp``, \(\ell^{ref}_i\) = ``ref_logp``):

    $$
    \begin{aligned}
    g_i &= \log \frac{\pi_{BoN}}{\pi_{ref}}(y_i) && \text{exact binomial form (variant="exact"), or the bound }
       \log N + (N-1) \log \hat F \\
    R_i &= \mathrm{sg}\big[c\, g_i - (\ell_i - \ell^{ref}_i)\big] && c = 1, \text{ or } (N-1)/N
       \text{ for the released-exact variant} \\
    \mathrm{loss}_i &= -(R_i - B_i)\, \ell_i && B_i \text{ the leave-one-out mean of } R \text{ (baseline="loo") or } 0
    \end{aligned}
    $$

    With the exact quantile, ``E[∇ mean_i loss_i] = ∇KL(π_θ ‖ π_BoN)`` (``variant="exact"``; the fixed point is
    ``π_BoN``); ``"bound"`` targets ``∝ π_ref·F^{N−1}``; ``"released_exact"`` targets
    ``∝ π_ref·(π_BoN/π_ref)^{(N−1)/N}``. Equivalently: KL-regularised RL with reward ``c·g/(N−1)`` and
    coefficient ``1/(N−1)``, scaled by ``N−1`` (BOND's scale convention,
    [`prefopt.losses.bond.bond`][prefopt.losses.bond.bond]). Amini, Vieira, Ash, Cotterell 2024, "Variational
    Best-of-N Alignment" (arXiv 2407.06057; equation numbers not verified, the paper body was not available to
    us). The authors' code optimises the same objective with PPO; its ``exact`` reward is ``(1/N)·g`` with KL
    coefficient ``1/(N−1)``, i.e. ``c = (N−1)/N`` here (``"released_exact"``), which does not reach ``π_BoN``
    exactly; its ``l1`` reward is ``"bound"``. The authors' quantile estimate is ``(c_< + 1)/(k + 1)``
    (``quantile="vbon"``).

    Relation to BOND: ``variant="bound"`` with ``quantile="le"`` and a floor ``1/(2k)``
    (``quantile_floor=0.5``) is exactly [`prefopt.losses.bond.bond`][prefopt.losses.bond.bond] at
    ``backward_weight=1`` with the ``"loo"`` baseline (the ``log N`` cancels in ``R − B``).

    Args:
        samples: [`BestOfNSamples`][prefopt.types.BestOfNSamples]: ``logp`` ``(b,)`` ``S_θ(y)`` of the
            policy's own sample; ``ref_logp`` ``(b,)`` ``S_ref(y)`` (enters the return, and ``g`` of the exact
            variants); ``reward`` ``(b,)``; ``ref_rewards`` ``(b, k)`` rewards of reference samples of the
            same prompt. ``best_logp`` is not used.
        n: ``N >= 2`` (default 8).
        variant: ``"exact"`` (default, as the authors' README), ``"bound"`` or ``"released_exact"``.
        quantile: ``"vbon"`` (default, authors') | ``"lt"`` | ``"le"`` | ``"mid"`` (see
            [`pool_quantile`][prefopt.losses.bon_family.pool_quantile]; the exact form needs the strict
            quantile ``F``, which ``"lt"`` estimates without bias).
        quantile_floor: ``c ∈ (0, 1]``; ``F̂`` is floored at ``c/k`` before the ``log`` of the bound (default
            0.5, as BOND's ``1/(2k)``); the exact form needs no floor.
        baseline: ``"loo"`` (default; needs ``b >= 2``) or ``"none"``.

    Returns: ``loss`` ``(b,)``; metrics ``(b,)`` detached: ``vbon/quantile`` (``F̂``), ``vbon/log_ratio``
    (``g``), ``vbon/return`` (``R``), ``vbon/advantage`` (``R − B``), ``kl/ref`` (``logp − ref_logp``),
    ``kl/bon_backward`` (``logp − ref_logp − g``, a one-sample estimate of ``KL(π_θ‖π_BoN)``).
    """
    logp, ref_logp = samples.logp, samples.ref_logp
    k = samples.pool_size
    q = pool_quantile(samples.reward, samples.ref_rewards, quantile).to(logp.dtype)
    if variant == "bound":
        g = vbon_log_ratio(q.clamp(min=quantile_floor / k), ref_logp.detach(), n, "bound")
    else:
        g = vbon_log_ratio(q, ref_logp.detach(), n, "exact")
    c = (n - 1) / n if variant == "released_exact" else 1.0
    kl_ref = (logp - ref_logp).detach()
    ret = c * g - kl_ref
    adv = ret - loo_baseline(ret, baseline)
    metrics = {
        "vbon/quantile": q.detach(),
        "vbon/log_ratio": g.detach(),
        "vbon/return": ret.detach(),
        "vbon/advantage": adv.detach(),
        "kl/ref": kl_ref,
        "kl/bon_backward": (kl_ref - g).detach(),
    }
    return LossOutput(loss=-adv * logp, metrics=metrics)


# ----------------------------------------------------------------------------------------------------------
# QRPO
# ----------------------------------------------------------------------------------------------------------

QRPO_TRANSFORMS = ("identity", "log", "normal_icdf")


def qrpo_transform(q: Tensor, transform: str, k: int) -> Tensor:
    r"""QRPO's ``T(q)``: ``identity`` ``q``; ``log`` ``log max(q, 1/k)``; ``normal_icdf``
    ``Φ^{-1}(clamp(q, 1/k, (k−1)/k))`` (the clamps of the authors' code; ``k`` the pool size)."""
    if transform == "identity":
        return q
    if transform == "log":
        return torch.log(q.clamp(min=1.0 / k))
    if transform == "normal_icdf":
        if k < 3:
            raise ValueError(f"transform='normal_icdf' needs k >= 3 reference rewards, got k = {k}")
        return torch.special.ndtri(q.clamp(min=1.0 / k, max=(k - 1.0) / k))
    raise ValueError(f"transform must be one of {', '.join(QRPO_TRANSFORMS)}; got {transform!r}")


def qrpo_log_partition(beta: float, transform: str, logz: str = "exact") -> float:
    r"""``log Z = log E_{q∼U(0,1)}[exp(T(q)/β)]`` in closed form (``q`` is uniform under ``π_ref`` for
    continuous rewards).

    ``identity``: ``log β + 1/β + log(1 − e^{−1/β})``; ``log``: ``log(β/(1+β))``; ``normal_icdf``:
    ``1/(2β²)``. ``logz="released_approx"`` returns the authors' ``log β + 1/β`` for ``identity`` (it drops
    ``log(1 − e^{−1/β})``: too large by 4.5e-5 at β = 0.1, 0.145 at β = 0.5, 0.459 at β = 1); the other two
    are exact in the released code too.
    """
    if not (isinstance(beta, (int, float)) and math.isfinite(beta) and beta > 0):
        raise ValueError(f"beta must be a finite number > 0, got {beta!r}")
    if transform == "identity":
        if logz == "released_approx":
            return math.log(beta) + 1.0 / beta
        return math.log(beta) + 1.0 / beta + math.log1p(-math.exp(-1.0 / beta))
    if transform == "log":
        return math.log(beta) - math.log1p(beta)
    if transform == "normal_icdf":
        return 1.0 / (2.0 * beta * beta)
    raise ValueError(f"transform must be one of {', '.join(QRPO_TRANSFORMS)}; got {transform!r}")


@register_loss(
    "qrpo",
    inputs="best_of_n",
    needs_reference=True,
    checks={
        "beta": gt(0),
        "transform": one_of(*QRPO_TRANSFORMS),
        "logz": one_of("exact", "released_approx"),
        "quantile": one_of("le", "lt", "mid"),
        "loss_type": one_of("mse", "mae"),
    },
)
def qrpo(
    samples: BestOfNSamples,
    *,
    beta: float = 0.1,
    transform: str = "log",
    logz: str = "exact",
    quantile: str = "le",
    loss_type: str = "mse",
) -> LossOutput:
    r"""QRPO: regress the implicit reward onto the quantile reward with the exact log-partition.

    $$
    L(y) = \big(T(q(y)) − β\log Z − β\,(S_θ(y) − S_{ref}(y))\big)^2,\qquad
    q(y) = \frac{1}{k}\sum_j 1[r(y'_j) ≤ r(y)],\ y'_j ∼ π_{ref}
    $$

    per response (chosen and rejected of a pair are two independent rows; the mean over rows is the
    authors' ``½[(…)_w² + (…)_l²]``); ``loss_type="mae"`` takes ``|·|``. ``Z`` is
    [`qrpo_log_partition`][prefopt.losses.bon_family.qrpo_log_partition]; the loss is 0 exactly at
    ``π* = π_ref·e^{T(q)/β}/Z`` (the KL-regularised optimum with reward ``T(q)``; for ``T = log`` and
    ``β = 1/(N−1)`` this is the continuous Best-of-N, ``N·q^{N−1}·π_ref``). Matrenok et al. 2025, "Quantile
    Reward Policy Optimization" (arXiv 2507.08068; equation numbers not verified, the paper body was not
    available to us); formulas as in the authors' ``src/qrpo/trainers/qrpo.py``. Not implemented: the authors'
    ``scaled-normal-icdf`` transform.

    Args:
        samples: [`BestOfNSamples`][prefopt.types.BestOfNSamples]: ``logp``, ``ref_logp`` ``(b,)`` sequence
            sums of any response (offline data or samples); ``reward`` ``(b,)``; ``ref_rewards`` ``(b, k)``
            rewards of ``k`` reference samples of the same prompt. ``best_logp`` is not used.
        beta: ``β > 0`` (default 0.1, the authors' config).
        transform: ``"log"`` (default), ``"identity"`` (the paper's chat runs) or ``"normal_icdf"``.
        logz: ``"exact"`` (default) | ``"released_approx"`` (identity only: the released ``log β + 1/β``).
        quantile: ``"le"`` (default, authors': ties count as below) | ``"lt"`` | ``"mid"``.
        loss_type: ``"mse"`` (default) | ``"mae"``.

    Returns: ``loss`` ``(b,)``; metrics ``(b,)`` detached: ``qrpo/quantile``, ``qrpo/target`` (``T(q) − β
    log Z``), ``rewards/implicit`` (``β·ρ``), ``qrpo/residual`` (target − ``β·ρ``).
    """
    logp, ref_logp = samples.logp, samples.ref_logp
    k = samples.pool_size
    q = pool_quantile(samples.reward, samples.ref_rewards, quantile).to(logp.dtype)
    target = qrpo_transform(q, transform, k) - beta * qrpo_log_partition(beta, transform, logz)
    implicit = beta * (logp - ref_logp)
    resid = target - implicit
    loss = resid**2 if loss_type == "mse" else resid.abs()
    metrics = {
        "qrpo/quantile": q.detach(),
        "qrpo/target": target.detach(),
        "rewards/implicit": implicit.detach(),
        "qrpo/residual": resid.detach(),
    }
    return LossOutput(loss=loss, metrics=metrics)


# ----------------------------------------------------------------------------------------------------------
# InfAlign-CTRL: calibrate, transform, then any KL-regularised RL
# ----------------------------------------------------------------------------------------------------------

INFALIGN_TRANSFORMS = ("identity", "bon", "won")


def calibrated_reward(reward: Tensor, ref_rewards: Tensor, *, ties: str = "mid") -> Tensor:
    r"""InfAlign's calibrated reward: the win rate of ``y`` against reference samples of the same prompt.

    $$
    C(x, y) = E_{z∼π_{ref}(·|x)}\big[1[r(x,z) < r(x,y)] + ½·1[r(x,z) = r(x,y)]\big]
    $$

    estimated on a pool of ``k`` reference samples ``z_j`` (``ties="mid"``, the default: ties count half, as
    in the win rate ``E[1[r(y) > r(z)] + ½·1[r(y) = r(z)]]``); ``ties="le"`` counts ties as wins (the CDF
    ``p_≤``, QRPO's and BOND's convention), ``ties="lt"`` as losses. This is
    [`pool_quantile`][prefopt.losses.bon_family.pool_quantile] with that convention. Properties (tested
    exactly on a categorical): invariant to any strictly increasing transform of ``r``; under ``y ∼ π_ref``
    with the exact reference distribution, ``E[C] = ½`` for any reward (mid-rank) and ``C ∼ U(0, 1)`` in the
    limit of a continuous reward. Balashankar et al. 2025, "InfAlign: Inference-aware language model
    alignment" (arXiv 2412.19792, Sec. 4, the calibration step of InfAlign-CTRL; the paper body was not
    available to us, so the equation number and the paper's exact tie convention are not verified — choose
    ``ties`` explicitly if it matters).

    Args:
        reward: ``(b,)`` rewards of the responses being scored.
        ref_rewards: ``(b, k)`` rewards of ``k >= 1`` reference samples of the same prompt.
        ties: ``"mid"`` (default) | ``"le"`` | ``"lt"``.

    Returns: ``(b,)`` in ``[0, 1]``, ``reward``'s floating dtype; not differentiable (an indicator count).
    """
    if ties not in ("mid", "le", "lt"):
        raise ValueError(f"ties must be one of mid, le, lt; got {ties!r}")
    return pool_quantile(reward, ref_rewards, ties)


def _check_t(t: Any) -> float:
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not (math.isfinite(t) and t > 0):
        raise ValueError(f"t must be a finite number > 0, got {t!r}")
    return float(t)


def infalign_transform(c: Tensor, transform: str = "bon", *, t: float = 1.0) -> Tensor:
    r"""InfAlign's transform ``Φ`` of a calibrated reward ``c ∈ [0, 1]`` (any shape, returned elementwise).

    ``"bon"``: ``Φ(c) = e^{t·c}`` (exponential, for Best-of-N sampling: it rewards the top quantiles more
    than linearly, so more mass moves to items that win the Best-of-N comparison); ``"won"``:
    ``Φ(c) = −e^{−t·c}`` (for worst-of-N / Best-of-N jailbreaking: it penalises the bottom quantiles);
    ``"identity"``: ``Φ(c) = c`` (calibrated RLHF, the paper's baseline for the standard win rate; ``t`` is
    ignored). ``t > 0``; as ``t → 0`` both exponentials become affine in ``c``, i.e. identity up to a
    rescaling of β. The KL-regularised optimum with reward ``Φ(C)`` is ``π_ref·e^{Φ(C)/β}/Z``. Balashankar
    et al. 2025 (arXiv 2412.19792, Sec. 4): the exponential forms and the selection of ``t`` per ``N`` from
    the model-free win-rate/KL curve
    ([`calibrated_bon_tradeoff`][prefopt.losses.bon_family.calibrated_bon_tradeoff]) follow the paper's
    description as we know it from its abstract and secondary summaries; the equation numbers are not
    verified.

    Range: ``e^{t·c} ≤ e^t`` is finite for ``t < 88`` in float32 and ``t < 709`` in float64 (the useful ``t``
    measured in ``docs/bon_family.md`` are 5-20); ``−e^{−t·c}`` is always finite.
    """
    if transform == "identity":
        return c
    if transform == "bon":
        return torch.exp(_check_t(t) * c)
    if transform == "won":
        return -torch.exp(-_check_t(t) * c)
    raise ValueError(f"transform must be one of {', '.join(INFALIGN_TRANSFORMS)}; got {transform!r}")


def infalign_reward(
    reward: Tensor, ref_rewards: Tensor, *, transform: str = "bon", t: float = 1.0, ties: str = "mid"
) -> Tensor:
    r"""InfAlign-CTRL's training reward ``Φ(C(x, y))``:
    [`calibrated_reward`][prefopt.losses.bon_family.calibrated_reward] then
    [`infalign_transform`][prefopt.losses.bon_family.infalign_transform].

    Use it as the reward of any KL-regularised policy-gradient loss, e.g. with ``G`` samples per prompt
    ``adv = prefopt.rl.rloo_advantages(infalign_reward(r, ref_r).view(-1, G))`` (the KL penalty with
    coefficient β stays the loss's own). Shapes: ``reward`` ``(b,)``, ``ref_rewards`` ``(b, k)`` → ``(b,)``.
    """
    return infalign_transform(calibrated_reward(reward, ref_rewards, ties=ties), transform, t=t)


def calibrated_bon_tradeoff(
    transform: str, beta: float, n: int, *, t: float = 1.0, grid: int = 20_000
) -> tuple[float, float]:
    r"""``(KL(π*‖π_ref), Best-of-N win rate of π* against π_ref)`` for a continuous calibrated reward.

    When ``C ∼ U(0, 1)`` under ``π_ref`` (a reward without atoms), the optimum ``π* = π_ref·e^{Φ(C)/β}/Z``
    gives ``C`` the density ``f(u) = e^{Φ(u)/β}/Z`` on ``[0, 1]``, whatever the model or the reward. So both
    numbers are model-free:

    $$
    KL = ∫_0^1 f \log f\,du,\qquad
    W_N = P\big(C(Y) > C(Y')\big) = ∫_0^1 u^N\, d\big(F(u)^N\big),\quad F(u) = ∫_0^u f,
    $$

    with ``Y`` the best of ``N`` draws from ``π*`` and ``Y'`` the best of ``N`` from ``π_ref`` (``C`` of the
    best of ``N`` reference draws has CDF ``u^N``). The InfAlign recipe picks, per ``N``, the ``t`` whose curve
    is highest at the KL budget. Computed by the midpoint rule on ``grid`` cells (float64); this is exactly
    the value on a uniform categorical of ``grid`` items with distinct rewards and mid-rank ``C``, so it
    converges as ``O(1/grid²)`` to the continuous value.
    """
    check_n(n)
    if not (isinstance(beta, (int, float)) and math.isfinite(beta) and beta > 0):
        raise ValueError(f"beta must be a finite number > 0, got {beta!r}")
    check_n(grid, name="grid", minimum=2)
    u = (torch.arange(grid, dtype=torch.float64) + 0.5) / grid
    logits = infalign_transform(u, transform, t=t) / beta
    logq = torch.log_softmax(logits, dim=0)  # cell masses of π*
    q = logq.exp()
    kl = float((q * (logq + math.log(grid))).sum())
    cum = torch.cat([torch.zeros(1, dtype=torch.float64), q.cumsum(0)]).clamp(max=1.0)
    bon_mass = cum[1:] ** n - cum[:-1] ** n  # mass of cell i under Best-of-N of π*
    ref_lt = torch.arange(grid, dtype=torch.float64) / grid
    ref_mid = (ref_lt**n + (ref_lt + 1.0 / grid) ** n) / 2  # P(ref BoN below) + ½ P(same cell)
    return kl, float((bon_mass * ref_mid).sum())
