"""Online-RL building blocks: GAE, leave-one-out, group and REINFORCE++ advantages, KL estimators,
KL-penalized rewards, DAPO overlong penalty and group filter, sampler/trainer mismatch metrics, the
top-ρ high-entropy token mask and the entropy bonus.

Whitening (PPO advantages) is [`masked_whiten`][prefopt.masked.masked_whiten]; the reduction of a per-token
loss is [`aggregate`][prefopt.masked.aggregate].

Every function here is pure, works on tensors, and validates its inputs eagerly (a bad argument raises an
error that names it). They are meant to be called once per rollout, between sampling and the loss, so they
also check that rewards are finite (one device synchronization per call).

Shapes: ``(b, t)`` per-token tensors with a bool ``mask`` (True = this token counts; prompt and padding are
False, on either side), ``(b,)`` per-sequence tensors, ``(prompts, k)`` grouped rewards where row ``i`` holds
the ``k`` completions sampled for prompt ``i``.

Half-precision inputs are computed in float32; float32/float64 are kept.

See ``docs/rl.md`` for the equations in one place.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from prefopt.masked import aggregate, masked_mean, masked_whiten
from prefopt.types import check_finite, check_mask, check_tensor

__all__ = [
    "PenalizedRewards",
    "entropy_bonus",
    "gae",
    "group_advantages",
    "high_entropy_mask",
    "informative_groups",
    "kl_estimate",
    "kl_penalized_rewards",
    "last_valid_index",
    "mismatch_metrics",
    "overlong_penalty",
    "reinforce_pp_advantages",
    "remax_advantages",
    "rloo_advantages",
]

KLEstimator = Literal["k1", "k2", "k3"]
_ESTIMATORS = ("k1", "k2", "k3")
Singleton = Literal["error", "raw", "zero"]
_SINGLETON = ("error", "raw", "zero")


# ----------------------------------------------------------------------------------------------------------
# validation helpers
# ----------------------------------------------------------------------------------------------------------


def _as_float(name: str, x: object, *, ndim: int | None = None) -> Tensor:
    t = check_tensor(name, x, ndim=ndim)
    if t.dtype not in (torch.float32, torch.float64):
        t = t.float()
    return t


def _same_shape(name: str, x: Tensor, ref_name: str, ref: Tensor) -> None:
    if x.shape != ref.shape:
        raise ValueError(f"{name} has shape {tuple(x.shape)} but {ref_name} has shape {tuple(ref.shape)}")


def _check_unit_interval(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0.0 <= value <= 1.0):
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    return float(value)


def _check_finite_where(name: str, x: Tensor, mask: Tensor | None = None) -> None:
    if mask is not None:
        x = torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))
    check_finite(name, x)


# ----------------------------------------------------------------------------------------------------------
# GAE
# ----------------------------------------------------------------------------------------------------------


def gae(
    rewards: Tensor, values: Tensor, mask: Tensor, *, gamma: float = 1.0, lam: float = 0.95
) -> tuple[Tensor, Tensor]:
    r"""Generalized advantage estimation over the valid tokens of each row (Schulman et al. 2016, Eq. 16).

    With ``t' = next(t)`` the next position after ``t`` whose mask is True (none after the last valid token):

    $$
    \begin{aligned}
    \delta_t &= r_t + \gamma V_{t'} - V_t && (V_{t'} := 0 \text{ after the last valid token: no bootstrap}) \\
    \hat A_t &= \delta_t + \gamma\lambda\, \hat A_{t'} = \textstyle\sum_l (\gamma\lambda)^l \delta_{t+l}
       && (l \text{ counts valid tokens}) \\
    \hat G_t &= \hat A_t + V_t && (\text{the } \lambda\text{-return, the value target})
    \end{aligned}
    $$

    Masked positions are skipped, not treated as zero-reward steps, so left padding, right padding and
    holes inside a row all give the same numbers as slicing out the valid tokens. ``λ = 0`` gives the TD error
    ``δ_t``; ``λ = γ = 1`` gives ``Σ_{s≥t} r_s − V_t`` (Monte-Carlo return minus value).

    Args:
        rewards: ``(b, t)`` per-token rewards; values at masked positions are ignored. For RLHF put the
            terminal score at the last valid token (see
            [`kl_penalized_rewards`][prefopt.rl.kl_penalized_rewards]).
        values: ``(b, t)`` value predictions ``V_t = V(x, y_<t)`` (ignored where masked).
        mask: ``(b, t)`` bool, True on the tokens that are actions.
        gamma: discount in [0, 1] (default 1.0, TRL's PPO default).
        lam: GAE λ in [0, 1] (default 0.95, TRL's PPO default).

    Returns:
        ``(advantages, returns)``, both ``(b, t)`` and exactly 0 where ``mask`` is False. They carry the
        autograd graph of the inputs; detach them before using them as policy-gradient weights.

    Raises:
        TypeError: a wrong dtype or a non-bool mask, naming the argument.
        ValueError: a wrong shape, γ or λ outside [0, 1], or non-finite rewards or values at valid positions,
            naming the argument.
    """
    rewards = _as_float("rewards", rewards, ndim=2)
    values = _as_float("values", values, ndim=2)
    _same_shape("values", values, "rewards", rewards)
    mask = check_mask("mask", mask, rewards.shape, "rewards")
    gamma = _check_unit_interval("gamma", gamma)
    lam = _check_unit_interval("lam", lam)
    _check_finite_where("rewards", rewards, mask)
    _check_finite_where("values", values, mask)
    dtype = torch.promote_types(rewards.dtype, values.dtype)
    rewards, values = rewards.to(dtype), values.to(dtype)

    b, t = rewards.shape
    zero = rewards.new_zeros(b)
    next_value, next_adv = zero, zero
    out: list[Tensor] = [zero] * t
    for i in range(t - 1, -1, -1):
        m = mask[:, i]
        delta = rewards[:, i] + gamma * next_value - values[:, i]
        adv = delta + (gamma * lam) * next_adv
        out[i] = torch.where(m, adv, zero)
        next_value = torch.where(m, values[:, i], next_value)
        next_adv = torch.where(m, adv, next_adv)
    advantages = torch.stack(out, dim=1) if t > 0 else rewards.new_zeros(b, 0)
    returns = torch.where(mask, advantages + values, torch.zeros((), dtype=dtype))
    return advantages, returns


# ----------------------------------------------------------------------------------------------------------
# sequence-level advantages
# ----------------------------------------------------------------------------------------------------------


def _check_singleton(singleton: object) -> None:
    if singleton not in _SINGLETON:
        raise ValueError(f"singleton must be one of {_SINGLETON}, got {singleton!r}")


def _grouped_rewards(rewards: object, name: str, *, min_group: int, singleton: str = "error") -> Tensor:
    r = _as_float(name, rewards)
    if r.ndim != 2:
        raise ValueError(
            f"{name} must be 2-D (prompts, k): row i holds the k completions of prompt i; got shape {tuple(r.shape)}"
        )
    if r.shape[1] < min_group and not (r.shape[1] == 1 and singleton != "error"):
        raise ValueError(
            f"{name} has groups of size {r.shape[1]} (shape {tuple(r.shape)}); need at least {min_group} "
            "completions per prompt for a baseline from the other samples (for one completion per prompt "
            "pass singleton='raw', baseline 0 as verl, or singleton='zero', advantage 0 as OpenRLHF)"
        )
    check_finite(name, r)
    return r


def _singleton_advantages(r: Tensor, singleton: str, scale: float = 1.0) -> Tensor:
    """Advantages of ``(prompts, 1)`` rewards: ``r / scale`` (baseline 0) or exactly 0."""
    if singleton == "zero":
        return torch.zeros_like(r)
    return r / scale if scale != 1.0 else r.clone()


def rloo_advantages(rewards: Tensor, *, singleton: Singleton = "error") -> Tensor:
    r"""REINFORCE leave-one-out advantages (Kool et al. 2019; Ahmadian et al. 2024, "Back to Basics", Eq. 9).

    For each prompt with ``k`` sampled completions and rewards ``R_1..R_k``:

    $$
    A_i = R_i - \frac{1}{k-1} \sum_{j \ne i} R_j = \frac{k}{k-1}\,(R_i - \bar R)
    $$

    Properties: ``Σ_i A_i = 0`` per prompt; adding a constant to a prompt's rewards leaves ``A`` unchanged;
    ``k = 2`` gives ``A = ±(R_1 − R_2)``. The baseline of sample ``i`` does not depend on ``R_i``, so the
    policy gradient stays unbiased.

    One completion per prompt (``k = 1``) has no other sample to form the baseline; ``singleton`` says what
    to do (it has no effect when ``k ≥ 2``): ``"error"`` (default) raises, ``"raw"`` uses the baseline 0,
    ``A = R`` (plain REINFORCE; verl's convention for groups of one), ``"zero"`` gives ``A = 0`` (the
    sample is its own baseline, OpenRLHF's convention: no learning signal).

    Args:
        rewards: ``(prompts, k)``, ``k ≥ 2`` (or ``k = 1`` with ``singleton``). For KL-in-the-reward RLOO
            pass ``score − β·Σ_t k1_t`` (see [`kl_penalized_rewards`][prefopt.rl.kl_penalized_rewards]).
        singleton: ``"error"``, ``"raw"`` or ``"zero"``: the rule for ``k = 1``.

    Returns:
        ``(prompts, k)`` advantages (same dtype; float32 for half-precision input).

    Raises:
        ValueError: ``rewards`` not 2-D, ``k = 1`` with ``singleton="error"``, an unknown ``singleton``,
            non-finite values.
    """
    _check_singleton(singleton)
    r = _grouped_rewards(rewards, "rewards", min_group=2, singleton=singleton)
    k = r.shape[1]
    if k == 1:
        return _singleton_advantages(r, singleton)
    return (r - r.mean(dim=1, keepdim=True)) * (k / (k - 1))


def group_advantages(
    rewards: Tensor, *, scale_std: bool = True, eps: float = 1e-4, singleton: Singleton = "error"
) -> Tensor:
    r"""GRPO group-relative advantages (Shao et al. 2024, DeepSeekMath, §4.1.2 "outcome supervision").

    For each prompt's group of ``G`` rewards, with ``scale_std=True`` (std with Bessel's correction, as TRL;
    \(\epsilon\) = ``eps``)

    $$
    A_i = \frac{r_i - \operatorname{mean}(r)}{\operatorname{std}(r) + \epsilon},
    $$

    and with ``scale_std=False`` (Dr. GRPO, Liu et al. 2025) \(A_i = r_i - \operatorname{mean}(r)\).

    A group whose rewards are all equal gets advantages of **exactly 0** (never NaN, even with ``eps = 0``):
    it carries no learning signal. The advantage is broadcast to every token of completion ``i`` by the loss.

    Groups of one (``G = 1``: the Bessel std is undefined and the group mean is the sample itself) follow
    ``singleton`` (no effect when ``G ≥ 2``): ``"error"`` (default) raises; ``"raw"`` takes mean := 0 and
    std := 1, i.e. ``A = r / (1 + eps)`` with ``scale_std`` and ``A = r`` without (verl's GRPO convention:
    plain REINFORCE on the raw score, so centre the rewards yourself); ``"zero"`` gives ``A = 0``
    (OpenRLHF's convention: the sample is its own baseline, no learning signal).

    Args:
        rewards: ``(prompts, G)``, ``G ≥ 2`` (or ``G = 1`` with ``singleton``).
        scale_std: divide by the group's standard deviation (default True, TRL ``scale_rewards="group"``).
        eps: added to the std (default 1e-4, TRL's constant); must be ≥ 0.
        singleton: ``"error"``, ``"raw"`` or ``"zero"``: the rule for ``G = 1``.

    Returns:
        ``(prompts, G)`` advantages; for ``G ≥ 2`` each row sums to 0, and with ``eps = 0`` and
        ``scale_std`` each non-constant row has unit Bessel standard deviation.

    Raises:
        ValueError: not 2-D, ``G = 1`` with ``singleton="error"``, an unknown ``singleton``, negative
        ``eps``, non-finite rewards. TypeError: ``scale_std`` not a bool.
    """
    if not isinstance(scale_std, bool):
        raise TypeError(f"scale_std must be a bool, got {type(scale_std).__name__}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0 or eps == float("inf"):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    _check_singleton(singleton)
    r = _grouped_rewards(rewards, "rewards", min_group=2, singleton=singleton)
    if r.shape[1] == 1:
        return _singleton_advantages(r, singleton, 1.0 + eps if scale_std else 1.0)
    constant = (r.amax(dim=1, keepdim=True) == r.amin(dim=1, keepdim=True)).expand_as(r)
    zero = torch.zeros((), dtype=r.dtype, device=r.device)
    centred = torch.where(constant, zero, r - r.mean(dim=1, keepdim=True))
    if not scale_std:
        return centred
    std = r.std(dim=1, keepdim=True, correction=1).expand_as(r)
    denom = torch.where(constant, torch.ones((), dtype=r.dtype, device=r.device), std + eps)
    return centred / denom


def remax_advantages(rewards: Tensor, greedy_rewards: Tensor, *, mask: Tensor | None = None) -> Tensor:
    r"""ReMax advantages: the reward of a sampled completion minus the reward of the **greedy** completion of
    the same prompt (Li et al. 2023, "ReMax", arXiv:2310.10505, Algorithm 1):

    $$
    A_i = r(x, y_i) - r(x, \hat y), \qquad \hat y = \text{the greedy (argmax) decoding of } x
    \text{ under the current policy}
    $$

    The baseline ``r(x, ŷ)`` does not depend on the sampled ``y_i``, so the gradient stays unbiased; a sample
    equal to the greedy response gets ``A = 0``. Get ``ŷ`` with
    [`HFSampler.greedy`][prefopt.sampling.HFSampler.greedy] (``do_sample=False``) and score it with the same
    reward function as the samples.

    Sequence form (``mask=None``): ``rewards`` is ``(prompts,)`` (one sample per prompt, the paper's
    setting) or ``(prompts, k)`` (``k`` samples per prompt share one baseline), ``greedy_rewards`` is
    ``(prompts,)``. Token form (``mask`` given; verl's ``remax`` estimator with the KL penalty in the
    reward): ``rewards`` is ``(b, t)`` per-token rewards ``R_{i,t}`` (e.g.
    [`kl_penalized_rewards`][prefopt.rl.kl_penalized_rewards]'s ``token_rewards``), ``greedy_rewards`` is
    ``(b,)``, the greedy score of row ``i``'s prompt, and

    $$
    A_{i,t} = \sum_{s \ge t} m_{i,s} R_{i,s} - r(x_i, \hat y_i) \qquad (0 \text{ where } m_{i,t} \text{ is False})
    $$

    With no KL penalty (``R`` = the score on the last valid token) this is the sequence form on every token.

    Args:
        rewards: ``(prompts,)`` / ``(prompts, k)`` sampled rewards, or ``(b, t)`` token rewards with ``mask``.
        greedy_rewards: ``(prompts,)`` (or ``(b,)`` in the token form) rewards of the greedy completions.
        mask: optional ``(b, t)`` bool completion mask (selects the token form).

    Returns:
        Advantages with the shape of ``rewards`` (detached; float32 for half-precision input).

    Raises:
        TypeError: a non-bool mask, naming it.
        ValueError: wrong shapes or non-finite rewards (at valid positions in the token form), naming the
            argument.
    """
    g = _as_float("greedy_rewards", greedy_rewards, ndim=1).detach()
    check_finite("greedy_rewards", g)
    r = _as_float("rewards", rewards).detach()
    if mask is None:
        if r.ndim not in (1, 2):
            raise ValueError(f"rewards must be (prompts,) or (prompts, k), got shape {tuple(r.shape)}")
        if r.shape[0] != g.shape[0]:
            raise ValueError(f"rewards has {r.shape[0]} prompts but greedy_rewards has {g.shape[0]}")
        check_finite("rewards", r)
        dtype = torch.promote_types(r.dtype, g.dtype)
        r, g = r.to(dtype), g.to(dtype)
        return r - (g if r.ndim == 1 else g.unsqueeze(1))
    if r.ndim != 2:
        raise ValueError(f"rewards must be (b, t) per-token rewards when mask is given, got {tuple(r.shape)}")
    mask = check_mask("mask", mask, r.shape, "rewards")
    if g.shape[0] != r.shape[0]:
        raise ValueError(f"greedy_rewards has {g.shape[0]} rows but rewards has {r.shape[0]}")
    _check_finite_where("rewards", r, mask)
    dtype = torch.promote_types(r.dtype, g.dtype)
    zero = torch.zeros((), dtype=dtype, device=r.device)
    r = torch.where(mask, r.to(dtype), zero)
    returns = r.flip(1).cumsum(1).flip(1)
    return torch.where(mask, returns - g.to(dtype).unsqueeze(1), zero)


# ----------------------------------------------------------------------------------------------------------
# KL
# ----------------------------------------------------------------------------------------------------------


def kl_estimate(logp: Tensor, ref_logp: Tensor, *, estimator: KLEstimator = "k1") -> Tensor:
    r"""Per-token Monte-Carlo estimates of ``KL(π ‖ π_ref)`` from tokens sampled from ``π`` (Schulman 2020).

    With ``l = log π(y) − log π_ref(y)`` and ``q = π_ref(y)/π(y) = exp(−l)``:

    $$
    \begin{aligned}
    k_1 &= l && \text{unbiased, can be negative, high variance} \\
    k_2 &= \tfrac{1}{2}\, l^2 && \text{biased, } \ge 0, \text{ low variance} \\
    k_3 &= q - 1 - \log q && \text{unbiased, } \ge 0 \text{ (computed as } \operatorname{expm1}(-l) + l
       \text{ for accuracy near } l = 0)
    \end{aligned}
    $$

    Gradients when the estimate is used as a *loss* (samples fixed, differentiated w.r.t. ``θ`` in
    ``log π_θ``), in expectation over ``y ~ π``:

    * ``∇k1 = ∇log π`` → mean **0**: k1 in the loss penalizes nothing (use k1 in the *reward* instead).
    * ``∇k2 = l·∇log π`` → mean ``Σ_y ∇π·l = ∇ KL(π ‖ π_ref)``: the reverse-KL gradient.
    * ``∇k3 = (1 − q)·∇log π`` → mean ``−Σ_y π_ref ∇log π = ∇ KL(π_ref ‖ π)``: the **forward** KL gradient
      (what GRPO's β·k3 term optimizes, although its value estimates the reverse KL).

    The tests check these three statements exactly on a categorical distribution by enumeration.

    Args:
        logp: per-token policy log-probs (any shape; ``(b, t)`` usually).
        ref_logp: reference log-probs, same shape.
        estimator: ``"k1"`` (default, TRL PPO/RLOO), ``"k2"`` or ``"k3"`` (GRPO).

    Returns:
        Elementwise estimate, same shape (float32 for half-precision input). Not masked: multiply or reduce
        with a mask yourself. k3 overflows to ``+inf`` (never NaN) when ``l < −88`` in float32.
    """
    if estimator not in _ESTIMATORS:
        raise ValueError(f"estimator must be one of {_ESTIMATORS}, got {estimator!r}")
    logp = _as_float("logp", logp)
    ref_logp = _as_float("ref_logp", ref_logp)
    _same_shape("ref_logp", ref_logp, "logp", logp)
    log_ratio = logp - ref_logp
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio.square()
    return torch.expm1(-log_ratio) + log_ratio


def last_valid_index(mask: Tensor, *, name: str = "mask") -> Tensor:
    """``(b,)`` long: the index of the last True of each row of a ``(b, t)`` bool mask.

    Raises ``ValueError`` naming ``name`` if a row has no True (no token to carry a terminal reward).
    """
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.ndim != 2:
        got = (
            f"dtype {mask.dtype}, shape {tuple(mask.shape)}"
            if isinstance(mask, Tensor)
            else type(mask).__name__
        )
        raise TypeError(f"{name} must be a 2-D bool tensor, got {got}")
    has_any = mask.any(dim=1)
    if not bool(has_any.all()):
        rows = torch.nonzero(~has_any).flatten().tolist()
        raise ValueError(f"{name} has rows with no valid token: {rows[:10]}")
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return torch.where(mask, positions, -1).amax(dim=1)


@dataclass(frozen=True)
class PenalizedRewards:
    """Output of [`kl_penalized_rewards`][prefopt.rl.kl_penalized_rewards] (all detached).

    Attributes:
        token_rewards: ``(b, t)`` per-token rewards for [`gae`][prefopt.rl.gae] (PPO); 0 where masked.
        sequence_rewards: ``(b,)`` ``Σ_t token_rewards`` = ``score − β·Σ_t k_t`` (or just ``score``): the
            return for REINFORCE / RLOO / GRPO advantages.
        kl: ``(b, t)`` per-token KL estimate (0 where masked), for logging or for a KL-in-the-loss term.
    """

    token_rewards: Tensor
    sequence_rewards: Tensor
    kl: Tensor


def kl_penalized_rewards(
    scores: Tensor,
    logp: Tensor,
    ref_logp: Tensor,
    mask: Tensor,
    *,
    beta: float = 0.05,
    estimator: KLEstimator = "k1",
    kl_in_reward: bool = True,
) -> PenalizedRewards:
    r"""Per-token RLHF rewards with the KL penalty in the reward (PPO / RLOO style) or left to the loss.

    ``kl_in_reward=True`` (Ziegler et al. 2019; TRL PPO and RLOO), with \(T_{last}\) the last valid token of
    the row:

    $$
    \begin{aligned}
    r_t &= -\beta k_t + \mathbb 1[t = T_{last}]\, \mathrm{score} \\
    R &= \textstyle\sum_t r_t = \mathrm{score} - \beta \sum_t k_t
    \end{aligned}
    $$

    The penalty enters the *return*, so it is weighted by the advantage and (for PPO) discounted by GAE;
    use ``estimator="k1"`` here (its reward value is unbiased; its gradient as a loss would be useless).

    ``kl_in_reward=False`` (GRPO, Shao et al. 2024 Eq. 3): ``r_t = 1[t = T_last]·score`` only; add ``β·k3``
    per token to the *loss* instead (``grpo(..., ref_logp=..., beta=...)``), where it is differentiated.
    ``kl`` is returned in both cases for logging.

    Args:
        scores: ``(b,)`` reward-model / programmatic scores of the whole completion.
        logp: ``(b, t)`` log-probs of the sampling policy (``old_logp``).
        ref_logp: ``(b, t)`` reference log-probs.
        mask: ``(b, t)`` bool completion mask (left or right padding); every row needs one valid token.
        beta: KL coefficient ≥ 0 (default 0.05, TRL's PPO ``kl_coef`` / RLOO ``beta``).
        estimator: KL estimator for the penalty (default ``"k1"``).
        kl_in_reward: the switch described above.

    Returns:
        [`PenalizedRewards`][prefopt.rl.PenalizedRewards] (detached: rewards are constants for the policy
        gradient).
    """
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0 <= beta < float("inf"):
        raise ValueError(f"beta must be a finite number >= 0, got {beta!r}")
    if not isinstance(kl_in_reward, bool):
        raise TypeError(f"kl_in_reward must be a bool, got {type(kl_in_reward).__name__}")
    scores = _as_float("scores", scores, ndim=1)
    logp = _as_float("logp", logp, ndim=2)
    mask = check_mask("mask", mask, logp.shape, "logp")
    if scores.shape[0] != logp.shape[0]:
        raise ValueError(f"scores has {scores.shape[0]} rows but logp has {logp.shape[0]}")
    check_finite("scores", scores)
    kl = kl_estimate(logp.detach(), _as_float("ref_logp", ref_logp).detach(), estimator=estimator)
    zero = torch.zeros((), dtype=kl.dtype, device=kl.device)
    kl = torch.where(mask, kl, zero)
    _check_finite_where("kl (from logp and ref_logp)", kl, mask)
    last = last_valid_index(mask)
    terminal = torch.zeros_like(kl)
    terminal[torch.arange(kl.shape[0], device=kl.device), last] = scores.detach().to(kl.dtype)
    token_rewards = terminal - beta * kl if kl_in_reward else terminal
    return PenalizedRewards(token_rewards=token_rewards, sequence_rewards=token_rewards.sum(dim=1), kl=kl)


# ----------------------------------------------------------------------------------------------------------
# REINFORCE++
# ----------------------------------------------------------------------------------------------------------


def reinforce_pp_advantages(
    scores: Tensor,
    mask: Tensor,
    *,
    kl: Tensor | None = None,
    beta: float = 0.0,
    group_size: int | None = None,
    baseline_returns: Literal["per_token", "sequence_sum"] = "per_token",
    whiten_var: Literal["biased", "unbiased"] = "biased",
    eps: float = 1e-8,
    singleton: Singleton = "error",
) -> Tensor:
    r"""REINFORCE++ and REINFORCE++-baseline advantages, whitened over every valid token of the batch
    (Hu et al. 2025, arXiv:2501.03262, §3).

    Per-token rewards \(R_{i,t} = -\beta k_{i,t} + \mathbb 1[t = T_i]\,\tilde r_i\) (\(T_i\) the last valid
    token, \(k\) the caller's per-token KL estimate of ``old_logp`` vs ``ref_logp``, e.g.
    [`kl_estimate`][prefopt.rl.kl_estimate]), returns \(G_{i,t} = \sum_{s \ge t} m_{i,s} R_{i,s}\)
    (\(\gamma = 1\)), then \(A_{i,t} = (G_{i,t} - \mu)/\sigma\) with \(\mu, \sigma^2\) over all valid tokens
    of the batch.

    * ``group_size=None`` (REINFORCE++): \(\tilde r_i = r_i\).
    * ``group_size=k`` (REINFORCE++-baseline; rows ``i·k + j`` are the ``k`` completions of prompt ``i``):
      ``baseline_returns="per_token"`` (OpenRLHF, the authors' code) subtracts the group mean of the scores,
      \(\tilde r_i = r_i - \frac1k\sum_{j \in g(i)} r_j\), then builds \(G\) as above;
      ``"sequence_sum"`` (verl) instead uses \(G_{i,t} = S_i - \frac1k\sum_{j\in g(i)} S_j\) on every token,
      \(S_i = r_i - \beta\sum_t m_{i,t} k_{i,t}\) (constant along the sequence). With ``beta = 0`` the two
      agree. Adding a per-prompt constant to the scores leaves either unchanged.
    * ``whiten_var="biased"`` (OpenRLHF): \(\sigma^2 = \frac1N\sum (G-\mu)^2\),
      \(A = (G-\mu)\,/\sqrt{\max(\sigma^2, \epsilon)}\); ``"unbiased"`` (verl):
      [`masked_whiten`][prefopt.masked.masked_whiten], Bessel \(\sigma^2\) and \(\sqrt{\sigma^2 + \epsilon}\).
      With \(\epsilon\) negligible they differ by exactly \(\sqrt{N/(N-1)}\), \(N\) the number of valid
      tokens. A constant \(G\) gives exactly 0.

    * ``group_size=1`` (one completion per prompt) follows ``singleton``: ``"error"`` (default) raises;
      ``"raw"`` takes the group mean as 0 (verl: the raw score is kept); ``"zero"`` subtracts the sample's
      own score (OpenRLHF: \(\tilde r_i = 0\), resp. \(G_{i,t} = 0\) with ``"sequence_sum"``).

    Reward clipping (OpenRLHF clips \(r\) to ±10) is left to the caller.

    Args:
        scores: ``(b,)`` sequence scores \(r_i\).
        mask: ``(b, t)`` bool completion mask; every row needs at least one valid token.
        kl: optional ``(b, t)`` per-token KL estimate (values at masked positions are ignored).
        beta: KL coefficient ≥ 0 (default 0.0; OpenRLHF's ``init_kl_coef`` is 0.01). Needs ``kl`` when > 0.
        group_size: ``k ≥ 2`` for the baseline variant (``b`` must be a multiple of it; ``k = 1`` with
            ``singleton``), or None.
        baseline_returns: ``"per_token"`` or ``"sequence_sum"`` (the latter needs ``group_size``).
        whiten_var: ``"biased"`` or ``"unbiased"``.
        eps: variance floor ≥ 0 (default 1e-8, both peers).
        singleton: ``"error"``, ``"raw"`` or ``"zero"``: the rule for ``group_size=1``.

    Returns:
        ``(b, t)`` advantages (detached), 0 where masked; their mean over valid tokens is 0.

    Raises:
        TypeError: a wrong dtype, naming the argument.
        ValueError: bad shapes, non-finite values, a row with no valid token, ``group_size`` not dividing
            ``b`` or < 2, ``beta > 0`` without ``kl``, unknown option strings (each naming the argument).
    """
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0 <= beta < float("inf"):
        raise ValueError(f"beta must be a finite number >= 0, got {beta!r}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 <= eps < float("inf"):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    if baseline_returns not in ("per_token", "sequence_sum"):
        raise ValueError(f"baseline_returns must be 'per_token' or 'sequence_sum', got {baseline_returns!r}")
    if whiten_var not in ("biased", "unbiased"):
        raise ValueError(f"whiten_var must be 'biased' or 'unbiased', got {whiten_var!r}")
    r = _as_float("scores", scores, ndim=1).detach()
    check_finite("scores", r)
    last = last_valid_index(mask)  # validates mask: 2-D bool, a valid token in every row
    b = r.shape[0]
    if mask.shape[0] != b:
        raise ValueError(f"scores has {b} rows but mask has {mask.shape[0]}")
    zero = torch.zeros((), dtype=r.dtype, device=r.device)
    if kl is None:
        if beta > 0:
            raise ValueError("kl is required when beta > 0 (the per-token KL penalty)")
        k = torch.zeros(mask.shape, dtype=r.dtype, device=r.device)
    else:
        k = _as_float("kl", kl, ndim=2).detach().to(r.dtype)
        _same_shape("kl", k, "mask", mask)
        k = torch.where(mask, k, zero)
        check_finite("kl", k)
    _check_singleton(singleton)
    if group_size is not None:
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
            raise ValueError(f"group_size must be an int >= 2 (or None), got {group_size!r}")
        if group_size == 1 and singleton == "error":
            raise ValueError(
                "group_size=1 leaves no other sample for the baseline: pass singleton='raw' (baseline 0, "
                "verl) or singleton='zero' (the sample's own score, OpenRLHF), or group_size=None"
            )
        if b % group_size:
            raise ValueError(f"group_size={group_size} does not divide the batch size {b}")
    elif baseline_returns == "sequence_sum":
        raise ValueError("baseline_returns='sequence_sum' is the baseline variant: it needs group_size")

    def group_centre(x: Tensor) -> Tensor:
        assert group_size is not None
        if group_size == 1 and singleton == "raw":
            return x
        g = x.view(-1, group_size)
        return (g - g.mean(dim=1, keepdim=True)).reshape(-1)

    if baseline_returns == "sequence_sum":
        seq = r - beta * k.sum(dim=1)
        returns = torch.where(mask, group_centre(seq).unsqueeze(1), zero)
    else:
        r_t = group_centre(r) if group_size is not None else r
        rewards = -beta * k
        rewards[torch.arange(b, device=r.device), last] += r_t
        rewards = torch.where(mask, rewards, zero)
        returns = torch.where(mask, rewards.flip(1).cumsum(dim=1).flip(1), zero)
    if whiten_var == "unbiased":
        return masked_whiten(returns, mask, eps=eps)
    mean = masked_mean(returns, mask)
    centred = torch.where(mask, returns - mean, zero)
    var = masked_mean(centred.square(), mask).clamp(min=eps)
    safe = torch.where(var > 0, var, torch.ones_like(var))
    return torch.where((var > 0) & mask, centred * torch.rsqrt(safe), zero)


# ----------------------------------------------------------------------------------------------------------
# DAPO: overlong reward shaping, zero-variance group filtering
# ----------------------------------------------------------------------------------------------------------


def _positive_int(name: str, v: object) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    return v


def overlong_penalty(lengths: Tensor, max_len: int, cache_len: int, *, factor: float = 1.0) -> Tensor:
    r"""DAPO's soft overlong punishment, added to the task reward (Yu et al. 2025, arXiv:2503.14476, Eq. 13).

    With \(L_{max}\) = ``max_len``, \(L_c\) = ``cache_len`` and \(f\) = ``factor``:

    $$ R_{len}(y) = \begin{cases} 0 & |y| \le L_{max} - L_c \\
       f\,\frac{(L_{max} - L_c) - |y|}{L_c} & L_{max} - L_c < |y| \le L_{max} \\
       -f & |y| > L_{max} \end{cases} $$

    A linear ramp from 0 to \(-f\) over the last \(L_c\) tokens. verl's DAPO reward manager and OpenRLHF agree
    with this for \(|y| \le L_{max}\) (the only case for engine-truncated completions); beyond \(L_{max}\)
    verl keeps the ramp going (unbounded) while the paper and OpenRLHF stop at \(-f\). The paper's setting is
    \(L_{max} = 20480\), \(L_c = 4096\), \(f = 1\).

    Args:
        lengths: ``(b,)`` completion lengths \(|y|\) (integer or float tensor, finite, ≥ 0), e.g.
            ``mask.sum(-1)``.
        max_len: \(L_{max} \ge 1\).
        cache_len: \(L_c\), ``1 ≤ cache_len ≤ max_len``.
        factor: \(f \ge 0\) (default 1.0).

    Returns:
        ``(b,)`` penalties in \([-f, 0]\) (float32, or float64 for a float64 input).
    """
    max_len = _positive_int("max_len", max_len)
    cache_len = _positive_int("cache_len", cache_len)
    if cache_len > max_len:
        raise ValueError(f"cache_len={cache_len} must be <= max_len={max_len}")
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 0 <= factor < float("inf"):
        raise ValueError(f"factor must be a finite number >= 0, got {factor!r}")
    n = check_tensor("lengths", lengths, ndim=1, floating=False)
    if n.dtype == torch.bool:
        raise TypeError("lengths must be an integer or floating-point tensor, got dtype torch.bool")
    if n.dtype != torch.float64:
        n = n.float()
    check_finite("lengths", n)
    if (n < 0).any():
        raise ValueError("lengths must be >= 0")
    start = max_len - cache_len
    ramp = (start - n) / cache_len * factor
    zero = torch.zeros((), dtype=n.dtype, device=n.device)
    out = torch.where(n <= start, zero, ramp)
    return torch.where(n > max_len, torch.full_like(n, -float(factor)), out)


def informative_groups(rewards: Tensor, *, mean_bounds: tuple[float, float] | None = None) -> Tensor:
    r"""DAPO's dynamic-sampling filter: which prompt groups carry a learning signal (Yu et al. 2025,
    arXiv:2503.14476, Eq. 11, the constraint \(0 < |\{o_i : \text{correct}\}| < G\)).

    * ``mean_bounds=None`` (verl ``filter_groups``): keep a group iff its rewards are not all equal. A
      constant group has advantage exactly 0 under any group-normalised estimator
      ([`group_advantages`][prefopt.rl.group_advantages], [`rloo_advantages`][prefopt.rl.rloo_advantages]),
      so dropping it changes only the batch composition (and token-mean denominators).
    * ``mean_bounds=(lo, hi)`` (OpenRLHF): keep iff ``lo < mean(r) < hi``. For 0/1 rewards ``(0, 1)`` is the
      same filter.

    Resampling until the batch is full is the caller's loop.

    Args:
        rewards: ``(prompts, G)`` grouped rewards (``G ≥ 1``), finite.
        mean_bounds: ``None`` or ``(lo, hi)`` with ``lo < hi``.

    Returns:
        ``(prompts,)`` bool: True = keep. ``rewards[keep]`` are the kept groups.
    """
    r = _grouped_rewards(rewards, "rewards", min_group=1)
    if mean_bounds is None:
        return r.amax(dim=1) != r.amin(dim=1)
    if (
        not isinstance(mean_bounds, tuple)
        or len(mean_bounds) != 2
        or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in mean_bounds)
        or not mean_bounds[0] < mean_bounds[1]
    ):
        raise ValueError(
            f"mean_bounds must be None or a (lo, hi) tuple of numbers with lo < hi, got {mean_bounds!r}"
        )
    mean = r.mean(dim=1)
    return (mean > mean_bounds[0]) & (mean < mean_bounds[1])


# ----------------------------------------------------------------------------------------------------------
# sampler / trainer mismatch
# ----------------------------------------------------------------------------------------------------------

_MISMATCH_CLAMP = 20.0


def mismatch_metrics(old_logp: Tensor, sampler_logp: Tensor, mask: Tensor) -> dict[str, Tensor]:
    r"""How far the sampler (inference engine, \(\ell^{samp}\)) is from the trainer (\(\ell^{old}\)) on a rollout.

    With \(\Delta_{i,t} = \ell^{old}_{i,t} - \ell^{samp}_{i,t}\) on valid tokens (the rollout was sampled from
    the sampler, so token means are Monte-Carlo estimates under it), \(\bar\ell_i\) the per-sequence mean
    log-prob, token means over all valid tokens and sequence means over rows with at least one token:

    | key | value | estimates |
    |---|---|---|
    | ``"k1"`` | \(\mathrm{mean}_{i,t}(-\Delta)\) | KL(π_samp ‖ π_old) per token (unbiased, can be < 0) |
    | ``"k3"`` | \(\mathrm{mean}_{i,t}(e^{\Delta} - 1 - \Delta)\) | the same KL (unbiased, each term ≥ 0) |
    | ``"chi2_token"`` | \(\mathrm{mean}_{i,t}(e^{2\Delta}) - 1\) | χ²(π_old ‖ π_samp) per token (\(\sum \pi_{old}^2/\pi_{samp} - 1\)) |
    | ``"chi2_seq"`` | \(\mathrm{mean}_i \exp(2\sum_t m\Delta) - 1\) | the same for whole sequences |
    | ``"training_ppl"`` / ``"rollout_ppl"`` | \(\mathrm{mean}_i e^{-\bar\ell^{old}_i}\) / \(\mathrm{mean}_i e^{-\bar\ell^{samp}_i}\) | perplexities |
    | ``"log_ppl_diff"`` | \(\mathrm{mean}_i(\bar\ell^{samp}_i - \bar\ell^{old}_i)\) | log of training / rollout perplexity |
    | ``"ppl_ratio"`` | \(\mathrm{mean}_i \exp(\bar\ell^{samp}_i - \bar\ell^{old}_i)\) | training / rollout perplexity |
    | ``"abs_diff_mean"`` / ``"abs_diff_max"`` | mean / max of \(\lvert\Delta\rvert\) | TRL's ``sampling_logp_difference`` |

    These are verl's ``compute_offpolicy_metrics`` (``kl``, ``k3_kl``, ``chi2_token``, ``chi2_seq``,
    ``training_ppl``, ``rollout_ppl``, ``log_ppl_diff``, ``ppl_ratio``) and TRL's logged differences, in one
    call. Identical log-probs give 0 for every key except the perplexities (equal) and ``ppl_ratio`` = 1.
    Every exponent is clamped to ±20, so extreme inputs stay finite; a NaN sampler log-prob on a valid
    token counts as \(\Delta = 0\) (as TRL's correction does). With no valid token every key is 0 (the
    perplexities and ``ppl_ratio`` too).

    Args:
        old_logp: ``(b, t)`` trainer log-probs of the sampled tokens.
        sampler_logp: ``(b, t)`` sampler log-probs of the same tokens.
        mask: ``(b, t)`` bool completion mask.

    Returns:
        dict of detached 0-dim tensors (float32 for half-precision input).
    """
    old = _as_float("old_logp", old_logp, ndim=2).detach()
    samp = _as_float("sampler_logp", sampler_logp, ndim=2).detach().to(old.dtype)
    _same_shape("sampler_logp", samp, "old_logp", old)
    mask = check_mask("mask", mask, tuple(old.shape), "old_logp")
    zero = torch.zeros((), dtype=old.dtype, device=old.device)
    old = torch.where(mask, old, zero)
    samp = torch.where(mask, samp, zero)
    delta = old - samp
    delta = torch.where(torch.isnan(delta), zero, delta)
    samp = torch.where(torch.isnan(samp), old, samp)
    c = _MISMATCH_CLAMP
    lengths = mask.sum(dim=-1)
    rows = lengths > 0
    n_rows = rows.sum().clamp(min=1).to(old.dtype)
    denom = lengths.clamp(min=1).to(old.dtype)
    mean_old, mean_samp = old.sum(-1) / denom, samp.sum(-1) / denom

    def row_mean(x: Tensor) -> Tensor:
        return torch.where(rows, x, zero).sum() / n_rows

    def exp(x: Tensor) -> Tensor:
        return torch.exp(x.clamp(-c, c))

    d = delta.clamp(-c, c)
    abs_d = torch.where(mask, delta.abs(), zero)
    return {
        "k1": masked_mean(-delta, mask),
        "k3": masked_mean(torch.expm1(d) - d, mask),
        "chi2_token": masked_mean(torch.expm1(2 * d), mask),
        "chi2_seq": row_mean(torch.expm1((2 * delta.sum(-1)).clamp(-c, c))),
        "training_ppl": row_mean(exp(-mean_old)),
        "rollout_ppl": row_mean(exp(-mean_samp)),
        "log_ppl_diff": row_mean(mean_samp - mean_old),
        "ppl_ratio": row_mean(exp(mean_samp - mean_old)),
        "abs_diff_mean": masked_mean(abs_d, mask),
        "abs_diff_max": abs_d.amax() if abs_d.numel() else zero,
    }


# ----------------------------------------------------------------------------------------------------------
# entropy: top-ρ high-entropy tokens and the entropy bonus
# ----------------------------------------------------------------------------------------------------------


def high_entropy_mask(entropy: Tensor, mask: Tensor, rho: float) -> Tensor:
    r"""The top-ρ high-entropy ("forking") tokens of a batch (Wang et al. 2025, "Beyond the 80/20 rule",
    arXiv:2506.01939): keep token \((i, t)\) iff \(H_{i,t} \ge \tau_\rho\), the \((1-\rho)\)-quantile (linear
    interpolation, ``torch.quantile``) of \(\{H_{i,t} : m_{i,t}\}\).

    Pass the result as ``policy_mask`` to a policy-gradient loss (e.g.
    [`grpo`][prefopt.losses.policy_gradient.grpo]) and reduce with the full ``mask``: the policy term then
    counts only the kept tokens while the aggregation's denominator is unchanged, which is TRL's
    ``top_entropy_quantile=ρ`` (tested equal in value and gradient). The paper uses ρ = 0.2. ρ = 1 keeps
    every valid token; ρ = 0 keeps only the maximum (all of its ties). The quantile is over this call's
    tokens: under data parallelism gather the valid entropies of all ranks first, as TRL does (or accept a
    per-rank threshold). Per-token entropies come from
    [`token_logps_and_entropy`][prefopt.logprobs.token_logps_and_entropy] (chunked head: no
    ``(b, t, V)`` tensor is kept); the mask carries no gradient.

    Args:
        entropy: ``(b, t)`` per-token entropies (detached inside).
        mask: ``(b, t)`` bool completion mask.
        rho: the kept fraction ρ ∈ [0, 1].

    Returns:
        bool ``(b, t)``, False wherever ``mask`` is False (all False if no token is valid).
    """
    rho = _check_unit_interval("rho", rho)
    h = _as_float("entropy", entropy, ndim=2).detach()
    mask = check_mask("mask", mask, tuple(h.shape), "entropy")
    valid = h[mask]
    if valid.numel() == 0:
        return torch.zeros_like(mask)
    threshold = torch.quantile(valid, 1.0 - rho)
    return mask & (torch.where(mask, h, torch.zeros((), dtype=h.dtype, device=h.device)) >= threshold)


def entropy_bonus(
    entropy: Tensor,
    mask: Tensor,
    *,
    coef: float,
    mode: str = "token-mean",
    num_tokens: Tensor | float | None = None,
    num_sequences: Tensor | float | None = None,
    max_length: int | None = None,
) -> Tensor:
    r"""The entropy bonus to **add** to a policy loss: \(-c\,\mathrm{Agg}(H)\) (maximising entropy).

    ``mode`` and the counts are those of [`aggregate`][prefopt.masked.aggregate]. TRL's ``entropy_coef``
    is ``mode="token-mean"`` over the effective mask (``mask & high_entropy_mask(...)`` when
    ``top_entropy_quantile < 1``) whatever the policy's ``loss_type`` (tested equal in value and gradient);
    verl aggregates with the policy loss's own ``loss_agg_mode``. Per-token entropies with their gradient
    come from [`token_logps_and_entropy`][prefopt.logprobs.token_logps_and_entropy].

    Args:
        entropy: ``(b, t)`` per-token entropies (with grad).
        mask: ``(b, t)`` bool: the tokens the bonus acts on.
        coef: \(c \ge 0\).
        mode: as [`aggregate`][prefopt.masked.aggregate].
        num_tokens: as [`aggregate`][prefopt.masked.aggregate].
        num_sequences: as [`aggregate`][prefopt.masked.aggregate].
        max_length: as [`aggregate`][prefopt.masked.aggregate].

    Returns:
        0-dim tensor, differentiable w.r.t. ``entropy``.
    """
    if isinstance(coef, bool) or not isinstance(coef, (int, float)) or not 0 <= coef < float("inf"):
        raise ValueError(f"coef must be a finite number >= 0, got {coef!r}")
    check_tensor("entropy", entropy, ndim=2)
    return -coef * aggregate(
        entropy, mask, mode, num_tokens=num_tokens, num_sequences=num_sequences, max_length=max_length
    )
