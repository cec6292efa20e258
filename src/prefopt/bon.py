"""Exact Best-of-N math on a finite response set: distributions, quantiles, divergences, ``r_BOND``.

Everything here is a pure function of tensors, used to state and check what the Best-of-N losses estimate
(tests, examples, the lab). The training-time reward transforms that the losses consume (empirical
quantiles, the J-BOND reward) live beside the losses in [`prefopt.losses.bond`][prefopt.losses.bond]; drawing
Best-of-N samples is [`prefopt.sampling.best_of_n`][prefopt.sampling.best_of_n]; the EMA anchor update is
[`prefopt.policy.ema_update_`][prefopt.policy.ema_update_]. See ``docs/bond.md`` for the derivations.

Reference: P. G. Sessa et al., "BOND: Aligning LLMs with Best-of-N Distillation", arXiv 2407.14622 (ICLR 2025).

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
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "LOG16",
    "bon_distribution",
    "bon_kl_bound",
    "check_n",
    "jbond_expected_reward",
    "jeffreys_divergence",
    "kl_categorical",
    "practical_bond_target",
    "quantiles",
    "r_bond",
    "r_bond_terms",
]

LOG16 = math.log(16.0)
"""``log 16``: the J-BOND penalty is ``−log 16`` (see [`jbond_reward`][prefopt.losses.bond.jbond_reward])."""


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
    r"""The exact Best-of-N distribution over a finite response set (Sessa et al., Thm. 1, with ties).

    Draw ``N`` i.i.d. responses from ``π_ref`` and keep the one with the largest reward, the *first* drawn
    among tied maxima. Item ``y`` is kept iff, for some ``i``, draws ``1..i−1`` are strictly worse, draw ``i``
    is ``y`` and draws ``i+1..N`` are not better, so

    $$
    \begin{aligned}
    \pi_{BoN}(y) &= \pi_{ref}(y) \sum_{i=1}^{N} p_<(y)^{i-1}\, p_\le(y)^{N-i} \\
    &= \pi_{ref}(y)\, p_\le(y)^{N-1} \sum_{i=1}^{N} \Big(\frac{p_<(y)}{p_\le(y)}\Big)^{i-1}
       && \text{(the (A)}\cdot\text{(B) form)} \\
    &= \pi_{ref}(y)\, \frac{p_\le^N - p_<^N}{p_\le - p_<} && (p_\le > p_<)
    \end{aligned}
    $$

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
        ref_probs: ``(..., K)`` as in [`bon_distribution`][prefopt.bon.bon_distribution].
        rewards: ``(..., K)`` as in [`bon_distribution`][prefopt.bon.bon_distribution].
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
    r"""\(r_{BOND}(y) = \log p_\le(y) + \frac{1}{N-1}\log\sum_{i=1}^{N}(p_</p_\le)^{i-1}\)
    (Sessa et al., Sec. 4).

    It is the reward for which Best-of-N is the solution of KL-regularized RL with ``β_BOND = 1/(N−1)``:

    $$
    \pi_{BoN}(y) = \pi_{ref}(y)\, \exp\big((N-1)\, r_{BOND}(y)\big) \qquad \text{(exactly; no normalizer is needed)}
    $$

    ``r_BOND`` depends on the rewards only through their order (invariant to strictly increasing maps).
    Shapes ``(..., K)``; ``N >= 2``. See [`r_bond_terms`][prefopt.bon.r_bond_terms] for the two terms.
    """
    a, b = r_bond_terms(ref_probs, rewards, n)
    return a + b


def practical_bond_target(ref_probs: Tensor, rewards: Tensor, n: int) -> Tensor:
    r"""\(\tilde\pi(y) \propto \pi_{ref}(y)\, p_\le(y)^{N-1}\): the fixed point of the *practical* backward
    BOND term.

    The practical backward term (and [`prefopt.losses.bond.bond`][prefopt.losses.bond.bond] with
    ``backward_weight = 1``) uses the reward ``log p_≤`` and drops the tie/collision term (B) of ``r_BOND``;
    its KL-regularized optimum is this tilted distribution, not ``π_BoN``. Because (B) ``∈ [1, N]`` is largest
    for good items, ``π̃`` puts less mass on the best items than ``π_BoN``. Shapes ``(..., K)``; ``N >= 1``.
    """
    check_n(n)
    _check_probs("ref_probs", ref_probs)
    _check_rewards("rewards", rewards, ref_probs, "ref_probs")
    _, p_le = _quantiles(ref_probs, rewards)
    w = ref_probs * p_le ** (n - 1)
    return w / w.sum(dim=-1, keepdim=True)


def bon_kl_bound(n: int) -> float:
    r"""\(\log N - (N-1)/N\): an upper bound on \(\mathrm{KL}(\pi_{BoN} \,\|\, \pi_{ref})\), tight when no
    response has an atom.

    (The continuous Best-of-N density is ``N·F^{N−1}·f`` and ``E[log F] = −1/N`` under it.)
    """
    check_n(n)
    return math.log(n) - (n - 1) / n


def kl_categorical(p: Tensor, q: Tensor) -> Tensor:
    r"""\(\mathrm{KL}(p \,\|\, q) = \sum_y p(y)\,(\log p(y) - \log q(y))\) over the last dim (terms with
    \(p(y) = 0\) count 0).

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


def jeffreys_divergence(
    policy_probs: Tensor, target_probs: Tensor, *, backward_weight: float = 0.5
) -> Tensor:
    r"""\(J_w(\pi \,\|\, \pi^*) = (1-w)\,\mathrm{KL}(\pi^* \,\|\, \pi) + w\,\mathrm{KL}(\pi \,\|\, \pi^*)\):
    the Jeffreys divergence of Sessa et al. (Sec. 5).

    ``w = backward_weight`` (the paper's β of the Jeffreys divergence, renamed so it does not collide with a
    KL coefficient): ``0`` is the forward (mode-covering, SFT-like) KL, ``1`` the backward (mode-seeking) KL.
    Shapes ``(..., K)`` → ``(...)``.
    """
    w = backward_weight
    if isinstance(w, bool) or not (isinstance(w, (int, float)) and 0 <= w <= 1):
        raise ValueError(f"backward_weight must be a number in [0, 1], got {w!r}")
    return (1 - w) * kl_categorical(target_probs, policy_probs) + w * kl_categorical(
        policy_probs, target_probs
    )


def jbond_expected_reward(anchor_probs: Tensor, rewards: Tensor, *, strict: bool = True) -> Tensor:
    r"""Exact \(E_{y'_1, y'_2 \sim \pi_{anchor}}[r_J(y)] = -\log 16\,(1 - p)^2\) for every item of a finite
    set.

    ``p = p_≤(y)`` under ``π_anchor`` for ``strict=True``, ``p_<(y)`` for ``strict=False``. Shapes ``(..., K)``.
    """
    p_lt, p_le = quantiles(anchor_probs, rewards)
    p = p_le if strict else p_lt
    return -LOG16 * (1 - p) ** 2
