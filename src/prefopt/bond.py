"""Best-of-N math for BOND / J-BOND: exact Best-of-N distributions, quantiles, ``r_BOND``, sampling helpers.

Everything here is a pure function of tensors except :func:`best_of_n` (which calls the two callables it is
given) and :func:`ema_update_` (in place, by convention). See ``docs/bond.md`` for the derivations.

Reference: P. G. Sessa et al., "BOND: Aligning LLMs with Best-of-N Distillation", arXiv 2407.14622 (ICLR 2025).
The primary text could not be read while writing this module; equation numbers quoted below ("Thm. 1",
"Sec. 4", "Alg. 2") follow a secondary transcription and may differ between versions of the paper.

Conventions used throughout:

* A finite response set of ``K`` items carries reference probabilities ``ref_probs`` ``(..., K)`` and rewards
  ``rewards`` ``(..., K)``; leading dimensions are batch dimensions (e.g. one row per prompt).
* Quantiles are taken under the reference: ``p_<(y) = P_{y'~π_ref}[r(y') < r(y)]`` and
  ``p_≤(y) = P_{y'~π_ref}[r(y') ≤ r(y)]``.
* Best-of-N draws ``N`` i.i.d. samples and keeps the one with the largest reward; among tied maximal rewards
  the **first** drawn sample wins (first-occurrence tie-breaking, what ``torch.argmax`` does).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "LOG16",
    "BestOfN",
    "best_of_n",
    "bon_distribution",
    "bon_kl_bound",
    "check_n",
    "ema_update_",
    "empirical_quantile",
    "jbond_expected_reward",
    "jbond_reward",
    "jeffreys_divergence",
    "kl_categorical",
    "log_empirical_quantile",
    "practical_bond_target",
    "quantiles",
    "r_bond",
    "r_bond_terms",
]

LOG16 = math.log(16.0)
"""``log 16``: the J-BOND penalty is ``−log 16`` (see :func:`jbond_reward`)."""


# ----------------------------------------------------------------------------------------------------------
# validation helpers
# ----------------------------------------------------------------------------------------------------------


def check_n(n: Any, *, name: str = "n", minimum: int = 1) -> int:
    """Return ``n`` if it is an ``int >= minimum`` (bools rejected), else raise ``ValueError`` naming ``name``."""
    if isinstance(n, bool) or not isinstance(n, int) or n < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {n!r}")
    return n


def _as_tensor(name: str, x: Any) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def _check_no_nan(name: str, x: Tensor) -> None:
    if torch.is_floating_point(x) and bool(torch.isnan(x).any()):
        raise ValueError(f"{name} has {int(torch.isnan(x).sum())} NaN value(s)")


def _sum_atol(dtype: torch.dtype) -> float:
    # float64 is allowed float32-level slack: probabilities often come from a float32 softmax
    if dtype in (torch.float64, torch.float32):
        return 1e-5
    return 1e-2  # half precision


def _check_probs(name: str, probs: Tensor) -> None:
    _as_tensor(name, probs)
    if not torch.is_floating_point(probs):
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {probs.dtype}")
    if probs.ndim < 1 or probs.shape[-1] < 1:
        raise ValueError(f"{name} must have shape (..., K) with K >= 1, got {tuple(probs.shape)}")
    if not bool(torch.isfinite(probs).all()):
        raise ValueError(f"{name} has non-finite value(s)")
    if bool((probs < 0).any()):
        raise ValueError(
            f"{name} has negative value(s) (min {float(probs.detach().min()):.3g}); probabilities must be >= 0"
        )
    total = probs.detach().sum(dim=-1)
    err = float((total - 1).abs().max())
    if err > _sum_atol(probs.dtype):
        raise ValueError(f"{name} must sum to 1 over its last dimension; largest deviation is {err:.3g}")


def _check_rewards(name: str, rewards: Tensor, like: Tensor, like_name: str) -> None:
    _as_tensor(name, rewards)
    if rewards.shape != like.shape:
        raise ValueError(
            f"{name} has shape {tuple(rewards.shape)} but {like_name} has shape {tuple(like.shape)}; they must match"
        )
    if rewards.dtype == torch.bool or rewards.is_complex():
        raise TypeError(f"{name} must hold real numbers, got dtype {rewards.dtype}")
    _check_no_nan(name, rewards)


# ----------------------------------------------------------------------------------------------------------
# exact quantities on a finite response set
# ----------------------------------------------------------------------------------------------------------


def quantiles(ref_probs: Tensor, rewards: Tensor) -> tuple[Tensor, Tensor]:
    """Exact reference quantiles ``(p_<, p_≤)`` of every item of a finite response set.

    ``p_<(y) = Σ_{y'} π_ref(y')·1[r(y') < r(y)]`` and ``p_≤(y) = Σ_{y'} π_ref(y')·1[r(y') ≤ r(y)]``.

    Args:
        ref_probs: ``(..., K)`` reference probabilities (non-negative, summing to 1 over the last dim).
        rewards: ``(..., K)`` real rewards (ties allowed; NaN rejected).

    Returns:
        ``(p_lt, p_le)``, each ``(..., K)`` with ``ref_probs``' dtype. Computed by sorting and a cumulative sum
        (``O(K log K)``), differentiable with respect to ``ref_probs``.
    """
    _check_probs("ref_probs", ref_probs)
    _check_rewards("rewards", rewards, ref_probs, "ref_probs")
    return _quantiles(ref_probs, rewards)


def _quantiles(ref_probs: Tensor, rewards: Tensor) -> tuple[Tensor, Tensor]:
    sorted_r, order = rewards.sort(dim=-1, stable=True)
    sorted_p = ref_probs.gather(-1, order)
    zero = torch.zeros_like(sorted_p[..., :1])
    cum = torch.cat([zero, sorted_p.cumsum(dim=-1)], dim=-1)  # cum[..., j] = mass of the j lowest items
    sorted_r = sorted_r.contiguous()
    values = rewards.contiguous()
    n_le = torch.searchsorted(sorted_r, values, right=True)  # number of items with r' <= r(y)
    n_lt = torch.searchsorted(sorted_r, values, right=False)  # number of items with r' < r(y)
    return cum.gather(-1, n_lt), cum.gather(-1, n_le)


def _geometric(q: Tensor, n: int) -> Tensor:
    """``g(q) = Σ_{i=0}^{n-1} q^i = (1 − q^n)/(1 − q)`` for ``q ∈ [0, 1]``, stable and NaN-free in backward."""
    small = q <= 0.5
    q_lo = torch.where(small, q, torch.zeros_like(q))
    g_lo = (1 - q_lo**n) / (1 - q_lo)
    inner = (~small) & (q < 1)
    q_hi = torch.where(inner, q, torch.full_like(q, 0.75))
    log_q = torch.log(q_hi)
    g_hi = torch.expm1(n * log_q) / torch.expm1(log_q)
    g = torch.where(small, g_lo, g_hi)
    return torch.where(q >= 1, torch.full_like(q, float(n)), g)


def _bon_parts(ref_probs: Tensor, rewards: Tensor, n: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(p_<, p_≤, g)`` with ``g = Σ_{i=1}^{N} (p_</p_≤)^{i−1}`` (the tie/collision factor (B), ``∈ [1, N]``)."""
    p_lt, p_le = _quantiles(ref_probs, rewards)
    positive = p_le > 0
    safe_le = torch.where(positive, p_le, torch.ones_like(p_le))
    q = torch.where(positive, p_lt / safe_le, torch.zeros_like(p_le)).clamp(0, 1)
    return p_lt, p_le, _geometric(q, n)


def bon_distribution(ref_probs: Tensor, rewards: Tensor, n: int) -> Tensor:
    """The exact Best-of-N distribution over a finite response set (Sessa et al., Thm. 1, with ties).

    Draw ``N`` i.i.d. responses from ``π_ref`` and keep the one with the largest reward, the *first* drawn
    among tied maxima. Item ``y`` is kept iff, for some ``i``, draws ``1..i−1`` are strictly worse, draw ``i``
    is ``y`` and draws ``i+1..N`` are not better, so::

        π_BoN(y) = π_ref(y) · Σ_{i=1}^{N} p_<(y)^{i−1} · p_≤(y)^{N−i}
                 = π_ref(y) · p_≤(y)^{N−1} · Σ_{i=1}^{N} (p_<(y)/p_≤(y))^{i−1}        (A)·(B) form
                 = π_ref(y) · (p_≤^N − p_<^N) / (p_≤ − p_<)                            (p_≤ > p_<)

    ``p_≤ − p_<`` is the reference mass ``m(y)`` of the tie class of ``y`` (all items with reward ``r(y)``),
    so a tie class as a whole receives ``p_≤^N − p_<^N`` (the probability that the maximum of ``N`` draws
    lies in it) and splits it in proportion to ``π_ref``; with distinct rewards ``m(y) = π_ref(y)`` and
    ``π_BoN(y) = p_≤(y)^N − p_<(y)^N``. The class masses telescope, so the result sums to
    ``(Σ π_ref)^N = 1``. (Any tie-breaking rule that does not look at the identity of the tied items, e.g.
    first, last or uniformly random among the tied maxima, gives the same distribution.)

    Numerics: evaluated in the (A)·(B) form with ``(B) = (1 − q^N)/(1 − q)``, ``q = p_</p_≤``, computed as
    ``expm1(N log q)/expm1(log q)`` for ``q > ½`` — no division by the (possibly tiny) tie mass.

    Args:
        ref_probs: ``(..., K)`` reference probabilities (``≥ 0``, summing to 1; zeros allowed).
        rewards: ``(..., K)`` rewards; ties allowed, NaN rejected.
        n: the number of draws ``N >= 1`` (``N = 1`` returns ``ref_probs``).

    Returns:
        ``(..., K)`` probabilities, differentiable with respect to ``ref_probs``.

    Raises:
        ValueError: ``n < 1``, mismatched shapes, NaN rewards, negative probabilities or probabilities
            that do not sum to 1 (tolerance 1e-5 in float32/float64, 1e-2 in half precision); the result
            sums to ``(Σ ref_probs)^N``, it is not renormalized.

    Best-of-2 of a uniform 3-item reference with distinct rewards is ``((1/3)^2, (2/3)^2 − (1/3)^2, 1 − (2/3)^2)``:

    >>> import torch
    >>> bon_distribution(torch.full((3,), 1 / 3, dtype=torch.float64), torch.tensor([0.0, 1.0, 2.0]), 2)
    tensor([0.1111, 0.3333, 0.5556], dtype=torch.float64)
    """
    check_n(n)
    _check_probs("ref_probs", ref_probs)
    _check_rewards("rewards", rewards, ref_probs, "ref_probs")
    _, p_le, g = _bon_parts(ref_probs, rewards, n)
    return ref_probs * p_le ** (n - 1) * g


def r_bond_terms(ref_probs: Tensor, rewards: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """The two terms of ``r_BOND = (A) + (B)`` on a finite response set (Sessa et al., Sec. 4).

    ``(A) = log p_≤(y) ∈ (−∞, 0]`` (the log-quantile) and
    ``(B) = (1/(N−1)) · log Σ_{i=1}^{N} (p_<(y)/p_≤(y))^{i−1} ∈ [0, log N/(N−1)]`` (the tie/collision
    correction; ``(B) = 0`` only for the worst item, where ``p_< = 0``).

    Args:
        ref_probs, rewards: ``(..., K)`` as in :func:`bon_distribution`.
        n: ``N >= 2`` (``β_BOND = 1/(N−1)`` is undefined for ``N = 1``).

    Returns:
        ``(A, B)``, each ``(..., K)``. ``A = −inf`` where ``p_≤ = 0`` (only possible for a zero-probability
        item below all the mass).
    """
    check_n(n, minimum=2)
    _check_probs("ref_probs", ref_probs)
    _check_rewards("rewards", rewards, ref_probs, "ref_probs")
    _, p_le, g = _bon_parts(ref_probs, rewards, n)
    # the cumulative sum can exceed 1 by a rounding error for the best class: keep (A) <= 0
    return torch.log(p_le).clamp(max=0.0), torch.log(g) / (n - 1)


def r_bond(ref_probs: Tensor, rewards: Tensor, n: int) -> Tensor:
    """``r_BOND(y) = log p_≤(y) + (1/(N−1))·log Σ_{i=1}^{N}(p_</p_≤)^{i−1}`` (Sessa et al., Sec. 4).

    It is the reward for which Best-of-N is the solution of KL-regularized RL with ``β_BOND = 1/(N−1)``::

        π_BoN(y) = π_ref(y) · exp((N−1) · r_BOND(y))          (exactly; no normalizer is needed)

    ``r_BOND`` depends on the rewards only through their order (invariant to strictly increasing maps).
    Shapes ``(..., K)``; ``N >= 2``. See :func:`r_bond_terms` for the two terms.
    """
    a, b = r_bond_terms(ref_probs, rewards, n)
    return a + b


def practical_bond_target(ref_probs: Tensor, rewards: Tensor, n: int) -> Tensor:
    """``π̃(y) ∝ π_ref(y) · p_≤(y)^{N−1}``: the fixed point of the *practical* backward BOND term.

    The practical backward term (and :func:`prefopt.losses.bond.bond` with ``beta = 1``) uses the reward
    ``log p_≤`` and drops the tie/collision term (B) of ``r_BOND``; its KL-regularized optimum is this
    tilted distribution, not ``π_BoN``. Because (B) ``∈ [1, N]`` is largest for good items,
    ``π̃`` puts less mass on the best items than ``π_BoN``. Shapes ``(..., K)``; ``N >= 1``.
    """
    check_n(n)
    _check_probs("ref_probs", ref_probs)
    _check_rewards("rewards", rewards, ref_probs, "ref_probs")
    _, p_le = _quantiles(ref_probs, rewards)
    w = ref_probs * p_le ** (n - 1)
    return w / w.sum(dim=-1, keepdim=True)


def bon_kl_bound(n: int) -> float:
    """``log N − (N−1)/N``: an upper bound on ``KL(π_BoN ‖ π_ref)``, tight when no response has an atom.

    (The continuous Best-of-N density is ``N·F^{N−1}·f`` and ``E[log F] = −1/N`` under it.)
    """
    check_n(n)
    return math.log(n) - (n - 1) / n


def kl_categorical(p: Tensor, q: Tensor) -> Tensor:
    """``KL(p ‖ q) = Σ_y p(y)·(log p(y) − log q(y))`` over the last dim (terms with ``p(y) = 0`` count 0).

    Shapes ``(..., K)`` → ``(...)``. Returns ``+inf`` if ``p`` puts mass where ``q`` has none.
    """
    _as_tensor("p", p)
    _as_tensor("q", q)
    if p.shape != q.shape:
        raise ValueError(f"q has shape {tuple(q.shape)} but p has shape {tuple(p.shape)}")
    pos = p > 0
    safe_p = torch.where(pos, p, torch.ones_like(p))
    terms = torch.where(pos, p * (torch.log(safe_p) - torch.log(q)), torch.zeros_like(p))
    return terms.sum(dim=-1)


def jeffreys_divergence(policy_probs: Tensor, target_probs: Tensor, *, beta: float = 0.5) -> Tensor:
    """``J_β(π ‖ π*) = (1−β)·KL(π* ‖ π) + β·KL(π ‖ π*)`` (Sessa et al., Sec. 5; forward + backward KL).

    ``beta = 0`` is the forward (mode-covering, SFT-like) KL, ``beta = 1`` the backward (mode-seeking) KL.
    Shapes ``(..., K)`` → ``(...)``.
    """
    if isinstance(beta, bool) or not (isinstance(beta, (int, float)) and 0 <= beta <= 1):
        raise ValueError(f"beta must be a number in [0, 1], got {beta!r}")
    return (1 - beta) * kl_categorical(target_probs, policy_probs) + beta * kl_categorical(
        policy_probs, target_probs
    )


# ----------------------------------------------------------------------------------------------------------
# Monte-Carlo quantities from samples
# ----------------------------------------------------------------------------------------------------------

_FLOORS = ("half", "smoothed")


def empirical_quantile(reward: Tensor, ref_rewards: Tensor, *, floor: str | float = "half") -> Tensor:
    """Monte-Carlo quantile ``p̂_≤(y) = (1/k)·Σ_{i=1}^{k} 1[r(y'_i) ≤ r(y)]`` of ``y`` among ``k`` reference samples.

    The practical BOND reward is ``log p̂_≤`` (Sessa et al., Sec. 4), which is ``−inf`` when ``y`` is below
    every reference sample. The paper's handling of ``p̂ = 0`` is not known to us, so it is configurable:

    * ``floor="half"`` (default): ``max(count/k, 1/(2k))`` — a zero count is treated as half a sample;
      every other value is the plain empirical CDF (unbiased for ``p_≤``).
    * ``floor="smoothed"``: ``(count + ½)/(k + 1)`` — shrinks every estimate (never 0, never 1).
    * ``floor=c`` with ``0 < c ≤ 1`` (a float): ``max(count/k, c)``.

    Args:
        reward: ``(...)`` rewards of the responses being scored, e.g. ``(b,)``.
        ref_rewards: ``(..., k)`` rewards of ``k >= 2`` reference samples for the same prompt.

    Returns:
        ``(...)`` quantiles in ``(0, 1]`` with ``reward``'s floating dtype (float32 for integer rewards).
        Not differentiable (an indicator).
    """
    _as_tensor("reward", reward)
    _as_tensor("ref_rewards", ref_rewards)
    if ref_rewards.ndim != reward.ndim + 1 or ref_rewards.shape[:-1] != reward.shape:
        raise ValueError(
            f"ref_rewards must have shape {(*tuple(reward.shape), 'k')} to match reward {tuple(reward.shape)}, "
            f"got {tuple(ref_rewards.shape)}"
        )
    k = ref_rewards.shape[-1]
    if k < 2:
        raise ValueError(f"ref_rewards needs at least 2 reference samples per response (k >= 2), got k = {k}")
    _check_no_nan("reward", reward)
    _check_no_nan("ref_rewards", ref_rewards)
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
    """``log p̂_≤(y)`` (see :func:`empirical_quantile`; finite thanks to the floor). Shape of ``reward``."""
    return torch.log(empirical_quantile(reward, ref_rewards, floor=floor))


def jbond_reward(reward: Tensor, anchor_rewards: Tensor, *, strict: bool = True) -> Tensor:
    """J-BOND's reward ``r_J(y) = −log 16 · 1[y loses to both anchor samples]`` (Sessa et al., Alg. 2).

    ``strict=True`` (the main text): "loses" means ``r(y) < min(r(y'_1), r(y'_2))``;
    ``strict=False`` (the appendix variant): ``r(y) ≤ min(r(y'_1), r(y'_2))``.

    Calibration: with ``y'_1, y'_2 ~ π_anchor`` i.i.d., ``E[r_J(y)] = −log 16 · (1 − p_≤(y))²`` (strict) or
    ``−log 16 · (1 − p_<(y))²`` (non-strict), quantiles under ``π_anchor``; at the median ``p = ½`` this is
    ``−log 16 / 4 = log ½``, the log-quantile there. Elsewhere it only approximates ``log p``.

    Args:
        reward: ``(b,)`` reward of the policy sample.
        anchor_rewards: ``(b, 2)`` rewards of the two anchor samples.

    Returns:
        ``(b,)`` values in ``{−log 16, 0}`` with ``reward``'s floating dtype.
    """
    _as_tensor("reward", reward)
    _as_tensor("anchor_rewards", anchor_rewards)
    if reward.ndim != 1:
        raise ValueError(f"reward must have shape (b,), got {tuple(reward.shape)}")
    if anchor_rewards.shape != (reward.shape[0], 2):
        raise ValueError(
            f"anchor_rewards must have shape ({reward.shape[0]}, 2), got {tuple(anchor_rewards.shape)}"
        )
    _check_no_nan("reward", reward)
    _check_no_nan("anchor_rewards", anchor_rewards)
    worst = anchor_rewards.min(dim=-1).values
    lost = reward < worst if strict else reward <= worst
    dtype = reward.dtype if torch.is_floating_point(reward) else torch.get_default_dtype()
    penalty = torch.full(lost.shape, -LOG16, dtype=dtype, device=lost.device)
    return torch.where(lost, penalty, torch.zeros_like(penalty))


def jbond_expected_reward(anchor_probs: Tensor, rewards: Tensor, *, strict: bool = True) -> Tensor:
    """Exact ``E_{y'_1,y'_2~π_anchor}[r_J(y)] = −log 16·(1 − p)²`` for every item of a finite set.

    ``p = p_≤(y)`` under ``π_anchor`` for ``strict=True``, ``p_<(y)`` for ``strict=False``. Shapes ``(..., K)``.
    """
    p_lt, p_le = quantiles(anchor_probs, rewards)
    p = p_le if strict else p_lt
    return -LOG16 * (1 - p) ** 2


# ----------------------------------------------------------------------------------------------------------
# Best-of-N sampling and the EMA anchor
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BestOfN:
    """Result of :func:`best_of_n` for ``B`` prompts and ``N`` samples each.

    Attributes:
        samples: all samples, prompt-major: a tensor ``(B, N, ...)`` if the sampler returned a tensor,
            else a list of ``B`` lists of ``N`` samples.
        rewards: ``(B, N)`` rewards of every sample (reuse them as the quantile pool ``ref_rewards``).
        index: ``(B,)`` long, position of the kept sample (first occurrence among tied maxima).
        best_reward: ``(B,)`` reward of the kept sample.
        best: the kept samples, a tensor ``(B, ...)`` or a list of ``B`` samples.
    """

    samples: Any
    rewards: Tensor
    index: Tensor
    best_reward: Tensor
    best: Any


def best_of_n(
    sample_fn: Callable[[list[Any]], Any],
    reward_fn: Callable[[list[Any], Any], Any],
    prompts: Sequence[Any],
    n: int,
) -> BestOfN:
    """Draw ``n`` samples per prompt, score them and keep the best (first occurrence among tied maxima).

    Model-agnostic: ``sample_fn`` is whatever produces samples from the reference or the anchor policy
    (e.g. a wrapper of ``generate`` with ``do_sample=True``), ``reward_fn`` is a reward function or model.

    Args:
        sample_fn: called once as ``sample_fn(repeated)`` where ``repeated`` is the list of prompts, each
            repeated ``n`` times in a row (``[p0]*n + [p1]*n + ...``); it must return ``B·n`` samples in that
            order, as a list/sequence or as a tensor with leading dim ``B·n``.
        reward_fn: called once as ``reward_fn(repeated, samples)``; must return ``B·n`` real rewards
            (tensor or sequence of numbers).
        prompts: ``B >= 1`` prompts (any objects).
        n: samples per prompt, ``>= 1``.

    Returns:
        :class:`BestOfN`.

    Raises:
        ValueError: ``n < 1``, no prompts, a sampler/reward function that returns the wrong number of
            items, or NaN rewards.
        TypeError: ``reward_fn`` returns something other than real numbers (strings, ``None``, bools,
            complex values, nested lists); the message names the first bad item's index.
    """
    check_n(n)
    prompts = list(prompts)
    if not prompts:
        raise ValueError("prompts must contain at least one prompt")
    b = len(prompts)
    repeated = [p for p in prompts for _ in range(n)]
    samples = sample_fn(repeated)
    if len(samples) != b * n:
        raise ValueError(f"sample_fn returned {len(samples)} samples, expected len(prompts)·n = {b * n}")
    raw = reward_fn(repeated, samples)
    if isinstance(raw, Tensor):
        rewards = raw
    else:
        try:
            items = list(raw)
        except TypeError:
            raise TypeError(
                f"reward_fn must return a tensor or a sequence of real numbers, got {type(raw).__name__}"
            ) from None
        wrong = [
            (i, x)
            for i, x in enumerate(items)
            if isinstance(x, bool)
            or not isinstance(x, (numbers.Real, Tensor))
            or (isinstance(x, Tensor) and (x.numel() != 1 or x.is_complex() or x.dtype == torch.bool))
        ]
        if wrong:
            i, x = wrong[0]
            raise TypeError(
                f"reward_fn must return real numbers; item {i} is {type(x).__name__} {x!r:.60} "
                f"({len(wrong)} such item(s))"
            )
        rewards = torch.as_tensor(items)
    if rewards.is_complex() or rewards.dtype == torch.bool:
        raise TypeError(f"reward_fn returned a tensor of dtype {rewards.dtype}; expected real numbers")
    if rewards.numel() != b * n:
        raise ValueError(f"reward_fn returned {rewards.numel()} rewards, expected len(prompts)·n = {b * n}")
    rewards = rewards.reshape(b, n)
    _check_no_nan("rewards (from reward_fn)", rewards)
    index = rewards.argmax(dim=-1)  # first occurrence of the maximum
    rows = torch.arange(b, device=rewards.device)
    best_reward = rewards[rows, index]
    if isinstance(samples, Tensor):
        grid = samples.reshape(b, n, *samples.shape[1:])
        best: Any = grid[rows.to(grid.device), index.to(grid.device)]
        all_samples: Any = grid
    else:
        flat = list(samples)
        all_samples = [flat[i * n : (i + 1) * n] for i in range(b)]
        best = [all_samples[i][int(index[i])] for i in range(b)]
    return BestOfN(samples=all_samples, rewards=rewards, index=index, best_reward=best_reward, best=best)


@torch.no_grad()
def ema_update_(anchor: Tensor | Iterable[Tensor], policy: Tensor | Iterable[Tensor], *, eta: float) -> None:
    """In place: ``anchor ← (1 − η)·anchor + η·policy`` (J-BOND's EMA anchor, Sessa et al., Alg. 2).

    ``eta = 1`` copies the policy into the anchor, ``eta = 0`` leaves the anchor fixed (non-iterative BOND
    with ``N = 2``). Accepts one tensor or matching iterables of tensors (e.g. parameter lists), floating
    point, pairwise on one device. All or nothing: if any policy tensor holds NaN/inf (``ValueError``) or
    any pair is malformed (``TypeError``/``ValueError`` naming its index), no anchor tensor is written.
    """
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not (0 <= eta <= 1):
        raise ValueError(f"eta must be a number in [0, 1], got {eta!r}")
    anchors = [anchor] if isinstance(anchor, Tensor) else list(anchor)
    policies = [policy] if isinstance(policy, Tensor) else list(policy)
    if len(anchors) != len(policies):
        raise ValueError(f"anchor has {len(anchors)} tensors but policy has {len(policies)}")
    # All or nothing: every pair is checked before the first anchor is written.
    for i, (a, p) in enumerate(zip(anchors, policies)):
        for name, t in (("anchor", a), ("policy", p)):
            if not isinstance(t, Tensor):
                raise TypeError(f"{name}[{i}] must be a torch.Tensor, got {type(t).__name__}")
            if not t.is_floating_point():
                raise TypeError(f"{name}[{i}] must be a floating-point tensor, got dtype {t.dtype}")
        if a.shape != p.shape:
            raise ValueError(
                f"anchor[{i}] has shape {tuple(a.shape)} but policy[{i}] has shape {tuple(p.shape)}"
            )
        if a.device != p.device:
            raise ValueError(f"anchor[{i}] is on {a.device} but policy[{i}] is on {p.device}")
    if policies:
        finite = torch.stack([torch.isfinite(p).all().to(policies[0].device) for p in policies])
        if not bool(finite.all()):
            bad = torch.nonzero(~finite).flatten().tolist()
            raise ValueError(f"policy{bad[:5]} hold NaN or inf; the anchor was left unchanged")
    for a, p in zip(anchors, policies):
        a.lerp_(p.to(a.dtype), float(eta))
