"""BOND and J-BOND losses (Sessa et al., "BOND: Aligning LLMs with Best-of-N Distillation", arXiv 2407.14622).

Both losses are *surrogates*: pure functions of per-sequence log-probs and rewards whose autograd gradient,
averaged over a batch of samples, is an unbiased estimate of the gradient of a divergence. The expectations
they estimate are stated in each docstring and checked exactly (by enumeration) on a categorical policy in
``tests/test_losses_bond.py``. The math is in ``docs/bond.md``; the exact Best-of-N math is in
[`prefopt.bon`][prefopt.bon]. This module also holds the training-time reward transforms the losses use:
[`empirical_quantile`][prefopt.losses.bond.empirical_quantile] /
[`log_empirical_quantile`][prefopt.losses.bond.log_empirical_quantile] (BOND's Monte-Carlo quantile) and
[`jbond_reward`][prefopt.losses.bond.jbond_reward].

Extreme values: the surrogate products ``−(R − B)·logp`` and ``γ·sg(logp − anchor_logp)·logp`` go through
[`saturating_product`][prefopt.losses.margin.saturating_product]: with one row's log-prob at ``−1e30`` their
value saturates at ``±e^40`` (instead of ``inf``) while the gradient stays exact and finite.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from prefopt.bon import LOG16
from prefopt.losses.margin import saturating_product
from prefopt.registry import Check, between, ge, one_of, register_loss
from prefopt.types import BestOfNSamples, LossOutput

__all__ = ["bond", "empirical_quantile", "jbond", "jbond_reward", "log_empirical_quantile", "loo_baseline"]


# ----------------------------------------------------------------------------------------------------------
# training-time reward transforms
# ----------------------------------------------------------------------------------------------------------


def _real_tensor(name: str, x: Any) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if torch.is_floating_point(x) and bool(torch.isnan(x).any()):
        raise ValueError(f"{name} has {int(torch.isnan(x).sum())} NaN value(s)")
    return x


def empirical_quantile(reward: Tensor, ref_rewards: Tensor, *, floor: str | float = "half") -> Tensor:
    r"""Monte-Carlo quantile \(\hat p_\le(y) = \frac1k\sum_{i=1}^{k} \mathbb 1[r(y'_i) \le r(y)]\) of \(y\)
    among \(k\) reference samples.

    The practical BOND reward is ``log p̂_≤`` (Sessa et al., Sec. 4), which is ``−inf`` when ``y`` is below
    every reference sample. The paper's handling of ``p̂ = 0`` is not known to us, so it is configurable:

    * ``floor="half"`` (default): ``max(count/k, 1/(2k))`` — a zero count is treated as half a sample;
      every other value is the plain empirical CDF (unbiased for ``p_≤``).
    * ``floor="smoothed"``: ``(count + ½)/(k + 1)`` — shrinks every estimate (never 0, never 1).
    * ``floor=c`` with ``0 < c ≤ 1`` (a float): ``max(count/k, c)``.

    Args:
        reward: ``(...)`` rewards of the responses being scored, e.g. ``(b,)``.
        ref_rewards: ``(..., k)`` rewards of ``k >= 2`` reference samples for the same prompt.
        floor: ``"half"`` (default), ``"smoothed"`` or a float ``c ∈ (0, 1]``, as above.

    Returns:
        ``(...)`` quantiles in ``(0, 1]`` with ``reward``'s floating dtype (float32 for integer rewards).
        Not differentiable (an indicator).
    """
    _real_tensor("reward", reward)
    _real_tensor("ref_rewards", ref_rewards)
    if ref_rewards.ndim != reward.ndim + 1 or ref_rewards.shape[:-1] != reward.shape:
        raise ValueError(
            f"ref_rewards must have shape {(*tuple(reward.shape), 'k')} to match reward {tuple(reward.shape)}, "
            f"got {tuple(ref_rewards.shape)}"
        )
    k = ref_rewards.shape[-1]
    if k < 2:
        raise ValueError(f"ref_rewards needs at least 2 reference samples per response (k >= 2), got k = {k}")
    dtype = reward.dtype if torch.is_floating_point(reward) else torch.get_default_dtype()
    count = (ref_rewards <= reward.unsqueeze(-1)).sum(dim=-1).to(dtype)
    if isinstance(floor, str):
        if floor == "half":
            return torch.clamp(count / k, min=1.0 / (2 * k))
        if floor == "smoothed":
            return (count + 0.5) / (k + 1)
        raise ValueError(f"floor must be 'half', 'smoothed' or a number in (0, 1], got {floor!r}")
    if isinstance(floor, bool) or not isinstance(floor, (int, float)) or not (0 < floor <= 1):
        raise ValueError(f"floor must be 'half', 'smoothed' or a number in (0, 1], got {floor!r}")
    return torch.clamp(count / k, min=float(floor))


def log_empirical_quantile(reward: Tensor, ref_rewards: Tensor, *, floor: str | float = "half") -> Tensor:
    """``log p̂_≤(y)`` (see [`empirical_quantile`][prefopt.losses.bond.empirical_quantile]; finite thanks to the floor). Shape of ``reward``."""
    return torch.log(empirical_quantile(reward, ref_rewards, floor=floor))


def jbond_reward(reward: Tensor, anchor_rewards: Tensor, *, strict: bool = True) -> Tensor:
    r"""J-BOND's reward \(r_J(y) = -\log 16 \cdot \mathbb 1[y \text{ loses to both anchor samples}]\)
    (Sessa et al., Alg. 2).

    ``strict=True`` (the main text): "loses" means ``r(y) < min(r(y'_1), r(y'_2))``;
    ``strict=False`` (the appendix variant): ``r(y) ≤ min(r(y'_1), r(y'_2))``.

    Calibration: with ``y'_1, y'_2 ~ π_anchor`` i.i.d., ``E[r_J(y)] = −log 16 · (1 − p_≤(y))²`` (strict) or
    ``−log 16 · (1 − p_<(y))²`` (non-strict), quantiles under ``π_anchor``; at the median ``p = ½`` this is
    ``−log 16 / 4 = log ½``, the log-quantile there. Elsewhere it only approximates ``log p``.

    Args:
        reward: ``(b,)`` reward of the policy sample.
        anchor_rewards: ``(b, 2)`` rewards of the two anchor samples.
        strict: ``True`` (default, "<") or ``False`` ("≤"), as above.

    Returns:
        ``(b,)`` values in ``{−log 16, 0}`` with ``reward``'s floating dtype.
    """
    _real_tensor("reward", reward)
    _real_tensor("anchor_rewards", anchor_rewards)
    if reward.ndim != 1:
        raise ValueError(f"reward must have shape (b,), got {tuple(reward.shape)}")
    if anchor_rewards.shape != (reward.shape[0], 2):
        raise ValueError(
            f"anchor_rewards must have shape ({reward.shape[0]}, 2), got {tuple(anchor_rewards.shape)}"
        )
    worst = anchor_rewards.min(dim=-1).values
    lost = reward < worst if strict else reward <= worst
    dtype = reward.dtype if torch.is_floating_point(reward) else torch.get_default_dtype()
    penalty = torch.full(lost.shape, -LOG16, dtype=dtype, device=lost.device)
    return torch.where(lost, penalty, torch.zeros_like(penalty))


# ----------------------------------------------------------------------------------------------------------
# losses
# ----------------------------------------------------------------------------------------------------------


def _int_ge(lo: int) -> Check:
    return Check(lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= lo, f"an integer >= {lo}")


def _floor_ok(v: Any) -> bool:
    if isinstance(v, str):
        return v in ("half", "smoothed")
    return isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v <= 1


_FLOOR_CHECK = Check(_floor_ok, "'half', 'smoothed' or a number in (0, 1]")


def _unpack(samples: BestOfNSamples, loss: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The five tensors of ``samples`` (shapes were checked when it was built); ``best_logp`` is required."""
    if samples.best_logp is None:
        raise ValueError(
            f"{loss} needs BestOfNSamples.best_logp (the policy log-prob of the pool's best sample)"
        )
    return samples.logp, samples.ref_logp, samples.reward, samples.ref_rewards, samples.best_logp


def loo_baseline(ret: Tensor, kind: str = "loo") -> Tensor:
    r"""Leave-one-out batch mean \(B_i = \frac{1}{b-1}\sum_{j \ne i} R_j\) (``kind='loo'``, needs \(b \ge 2\))
    or 0 (``'none'``).

    The baseline of the score-function terms of [`bond`][prefopt.losses.bond.bond],
    [`jbond`][prefopt.losses.bond.jbond] and vBoN: independent of ``y_i``, so it leaves the expected gradient
    unchanged and lowers its variance. ``ret`` ``(b,)``, returns ``(b,)``.
    """
    if kind == "none":
        return torch.zeros_like(ret)
    b = ret.shape[0]
    if b < 2:
        raise ValueError(
            f"baseline='loo' needs at least 2 samples in the batch (logp has {b}); pass baseline='none'"
        )
    return (ret.sum() - ret) / (b - 1)


@register_loss(
    "bond",
    inputs="best_of_n",
    needs_reference=True,
    checks={
        "n": _int_ge(1),
        "backward_weight": between(0, 1),
        "quantile_floor": _FLOOR_CHECK,
        "baseline": one_of("loo", "none"),
    },
)
def bond(
    samples: BestOfNSamples,
    *,
    n: int = 8,
    backward_weight: float = 0.5,
    quantile_floor: str | float = "half",
    baseline: str = "loo",
) -> LossOutput:
    r"""Practical BOND with the Jeffreys divergence (Sessa et al., Sec. 4-5; practical form, term (B)
    dropped).

    Per example ``i`` (``y_i ~ π_θ`` the policy's own sample, ``y*_i`` the best of ``N`` reference samples;
    \(\ell_i\) = ``logp``, \(\ell^{ref}_i\) = ``ref_logp``, \(\ell^*_i\) = ``best_logp``):

    $$
    \begin{aligned}
    \log \hat p_i &= \log \hat p_\le(y_i) && \text{empirical quantile of } r(y_i) \text{ among the } k
       \text{ reference rewards (floored)} \\
    R_i &= \mathrm{sg}\big[(N-1) \log \hat p_i - (\ell_i - \ell^{ref}_i)\big] && \text{the return (logged as bond/return)} \\
    B_i &= \frac{1}{b-1} \sum_{j \ne i} R_j \ \text{(baseline='loo')} \quad \text{or} \quad 0 \ \text{(baseline='none')} \\
    \mathrm{loss}_i &= \underbrace{(1-w)\,(-\ell^*_i)}_{\text{forward KL}}
       + \underbrace{w\,\big(-(R_i - B_i)\, \ell_i\big)}_{\text{backward KL}}
    \end{aligned}
    $$

    Scale convention: the return is the paper's ``log p̂ − β_BOND·KL`` with ``β_BOND = 1/(N−1)``
    **multiplied by (N−1)**, so that ``w`` (``backward_weight``) weighs two KL divergences on the same scale.
    With the exact quantile ``p_≤`` and ``π̃ ∝ π_ref·p_≤^{N−1}``
    ([`prefopt.bon.practical_bond_target`][prefopt.bon.practical_bond_target]), the expected gradient of
    ``mean_i loss_i`` (independent ``y_i ~ π_θ``, ``y*_i ~ BoN_N(π_ref)``) is

    $$
    (1-w)\, \nabla \mathrm{KL}(\pi_{BoN} \,\|\, \pi_\theta) + w\, \nabla \mathrm{KL}(\pi_\theta \,\|\, \tilde\pi)
    $$

    (the baseline does not change it: ``E[∇log π] = 0`` and ``B_i`` is independent of ``y_i``). So
    ``w = 0`` is SFT on Best-of-N samples and converges to ``π_BoN``; ``w = 1`` converges to ``π̃``, not
    ``π_BoN``, because the practical reward drops the tie/collision term (B) of ``r_BOND``; ``0 < w < 1``
    converges to ``argmin_π (1−w)·KL(π_BoN‖π) + w·KL(π‖π̃)``. The empirical quantile adds a further bias
    (``E log p̂ ≠ log p`` and the floor). Divide ``w``'s term by ``N−1`` to recover the unscaled convention.

    Args:
        samples: [`BestOfNSamples`][prefopt.types.BestOfNSamples] — ``logp`` ``(b,)`` the policy log-prob
            ``S_θ(y)`` of its own sample (sum over completion tokens); ``ref_logp`` ``(b,)`` the reference
            log-prob ``S_ref(y)`` of the same sample (enters the return only); ``reward`` ``(b,)``;
            ``ref_rewards`` ``(b, k)`` rewards of ``k >= 2`` reference samples of the same prompt (the
            quantile pool; it may be the Best-of-N pool itself, `prefopt.sampling.BestOfN.rewards`);
            ``best_logp`` ``(b,)`` the policy log-prob ``S_θ(y*)`` of the Best-of-N reference sample
            (required).
        n: ``N >= 1``, the Best-of-N being distilled (default 8, the paper's XSum setting).
        backward_weight: ``w``, the Jeffreys divergence's weight on the backward KL, in ``[0, 1]`` (0 =
            forward only, 1 = backward only; default 0.5 as recommended; the paper's β of the Jeffreys
            divergence).
        quantile_floor: floor for ``p̂ = 0`` (see
            [`empirical_quantile`][prefopt.losses.bond.empirical_quantile]; default ``'half'`` = ``1/(2k)``).
        baseline: ``'loo'`` (leave-one-out mean return of the other samples in the batch; needs ``b >= 2``)
            or ``'none'``.

    Returns:
        [`LossOutput`][prefopt.types.LossOutput] with an unreduced ``(b,)`` loss and metrics (all ``(b,)``,
        detached): ``bond/log_quantile`` (``log p̂_≤``), ``bond/return`` (``R``), ``bond/advantage``
        (``R − B``), ``kl/ref`` (``logp − ref_logp``, a one-sample estimate of ``KL(π_θ‖π_ref)``),
        ``kl/bon_backward`` (``logp − ref_logp − (N−1)·log p̂``, a one-sample estimate of ``KL(π_θ‖π_BoN)``
        with (B) dropped; equals ``−R``), ``loss/forward`` (``−best_logp``), ``loss/backward``
        (``−(R − B)·logp``).
    """
    logp, ref_logp, reward, ref_rewards, best_logp = _unpack(samples, "bond")
    log_q = log_empirical_quantile(reward, ref_rewards, floor=quantile_floor).to(logp.dtype)
    kl_ref = (logp - ref_logp).detach()
    ret = (n - 1) * log_q - kl_ref
    adv = ret - loo_baseline(ret, baseline)
    forward = -best_logp
    backward = saturating_product(-adv, logp)  # value clamped at ±e^40, gradient exact
    loss = (1 - backward_weight) * forward + backward_weight * backward
    metrics = {
        "bond/log_quantile": log_q.detach(),
        "bond/return": ret.detach(),
        "bond/advantage": adv.detach(),
        "kl/ref": kl_ref,
        "kl/bon_backward": (-ret).detach(),
        "loss/forward": forward.detach(),
        "loss/backward": backward.detach(),
    }
    return LossOutput(loss=loss, metrics=metrics)


@register_loss(
    "jbond",
    inputs="best_of_n",
    needs_reference=False,
    checks={
        "backward_weight": between(0, 1),
        "gamma": ge(0),
        "strict": one_of(True, False),
        "baseline": one_of("loo", "none"),
    },
)
def jbond(
    samples: BestOfNSamples,
    *,
    backward_weight: float = 0.5,
    gamma: float = 0.0,
    strict: bool = True,
    baseline: str = "loo",
) -> LossOutput:
    r"""J-BOND: Jeffreys distillation of Best-of-2 of a moving anchor (Sessa et al., Alg. 2).

    Per example ``i`` (``y_i ~ π_θ``; ``y'_1, y'_2 ~ π_anchor``; ``y'_best`` the better one, first on ties;
    \(\ell_i\) the policy log-prob of \(y_i\), \(\ell^{a}_i\) its anchor log-prob, \(\ell^*_i\) the policy
    log-prob of \(y'_{best}\)):

    $$
    \begin{aligned}
    r_{J,i} &= -\log 16 \cdot \mathbb 1\big[r(y_i) < \min(r(y'_1), r(y'_2))\big]
       && (\le \text{ with strict=False, the appendix form}) \\
    R_i &= \mathrm{sg}\big[r_{J,i} - (\ell_i - \ell^{a}_i)\big] && \beta_{BOND} = 1/(N-1) = 1 \text{ for } N = 2 \\
    B_i &= \frac{1}{b-1} \sum_{j \ne i} R_j \ \text{(baseline='loo')} \quad \text{or} \quad 0 \\
    \mathrm{loss}_i &= (1-w)\,(-\ell^*_i) + w\,\big(-(R_i - B_i)\, \ell_i\big)
       + \gamma\, \mathrm{sg}(\ell_i - \ell^{a}_i)\, \ell_i
    \end{aligned}
    $$

    With ``N = 2`` there is no ``N−1`` scale ambiguity. Expected gradient of ``mean_i loss_i``:

    $$
    (1-w)\, \nabla \mathrm{KL}\big(\mathrm{BoN}_2(\pi_{anchor}) \,\|\, \pi_\theta\big)
    + w\, \nabla \mathrm{KL}(\pi_\theta \,\|\, \tilde\pi_J) + \gamma\, \nabla \mathrm{KL}(\pi_\theta \,\|\, \pi_{anchor})
    $$

    where ``π̃_J ∝ π_anchor·exp(E[r_J | y])`` and ``E[r_J | y] = −log 16·(1 − p_≤(y))²`` (quantile under
    ``π_anchor``; ``p_<`` for ``strict=False``) — equal to ``log p_≤`` at the median, an approximation
    elsewhere. The ``γ`` term is the single-sample score-function estimator of ``∇KL(π_θ‖π_anchor)`` (the
    paper does not specify its estimator). The caller updates the anchor, e.g. with
    [`prefopt.policy.ema_update_`][prefopt.policy.ema_update_] or ``LoraPolicy.update_anchor_``.

    Args:
        samples: [`BestOfNSamples`][prefopt.types.BestOfNSamples] whose pool is the anchor: ``logp`` ``(b,)``
            the policy log-prob of its own sample; ``ref_logp`` ``(b,)`` the *anchor* log-prob of the same
            sample; ``reward`` ``(b,)``; ``ref_rewards`` ``(b, 2)`` rewards of the two anchor samples;
            ``best_logp`` ``(b,)`` the policy log-prob of the better anchor sample (required).
        backward_weight: ``w``, the Jeffreys weight on the backward KL, in ``[0, 1]`` (default 0.5).
        gamma: extra KL-to-anchor weight ``>= 0`` (default 0).
        strict: ``True`` = "<" (main text), ``False`` = "≤" (appendix).
        baseline: ``'loo'`` (needs ``b >= 2``) or ``'none'``.

    Returns:
        [`LossOutput`][prefopt.types.LossOutput], ``(b,)`` loss; metrics ``(b,)``: ``jbond/reward`` (``r_J``),
        ``jbond/return``, ``jbond/advantage``, ``kl/anchor`` (``logp − anchor_logp``), ``loss/forward``,
        ``loss/backward``, ``loss/kl_reg`` (``γ·sg(logp − anchor_logp)·logp``).
    """
    logp, anchor_logp, reward, anchor_rewards, best_anchor_logp = _unpack(samples, "jbond")

    r_j = jbond_reward(reward, anchor_rewards, strict=strict).to(logp.dtype)
    kl_anchor = (logp - anchor_logp).detach()
    ret = r_j - kl_anchor
    adv = ret - loo_baseline(ret, baseline)
    forward = -best_anchor_logp
    backward = saturating_product(-adv, logp)  # value clamped at ±e^40, gradient exact
    kl_reg = saturating_product(gamma * kl_anchor, logp)
    loss = (1 - backward_weight) * forward + backward_weight * backward + kl_reg
    metrics = {
        "jbond/reward": r_j.detach(),
        "jbond/return": ret.detach(),
        "jbond/advantage": adv.detach(),
        "kl/anchor": kl_anchor,
        "loss/forward": forward.detach(),
        "loss/backward": backward.detach(),
        "loss/kl_reg": kl_reg.detach(),
    }
    return LossOutput(loss=loss, metrics=metrics)
