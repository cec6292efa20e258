r"""Measurement in the lab: reward quantiles under the reference, Best-of-N points, and policy evaluation.

**Quantiles.** For each evaluation prompt ``x`` a large *reference pool* of ``M`` completions is sampled
from the reference LM once; the quantile of a reward ``r`` is its mid-rank in that pool,

$$
q_x(r) = \frac{\#\{j : r_j < r\} + \tfrac12\,\#\{j : r_j = r\}}{M},
$$

an unbiased estimate of ``P_ref(R < r) + ½ P_ref(R = r)`` (for a continuous reward, the CDF). A reference
sample has mean quantile ½.

**Best-of-N points** are exact for the pool taken as the reference distribution (a categorical over its
``M`` items, mass ``1/M`` each): the best of ``N`` i.i.d. draws falls in the tie class of ``r`` with
probability ``p_≤(r)^N − p_<(r)^N`` (Sessa et al. 2024, Thm. 1), split equally among the class's items, so

$$
\bar q_N = \sum_j \pi_{BoN}(j)\, q(r_j), \qquad
\mathrm{KL}(\pi_{BoN}\,\|\,\pi_{ref}) = \sum_j \pi_{BoN}(j) \log\big(M\,\pi_{BoN}(j)\big).
$$

With distinct rewards these tend to ``N/(N+1)`` and ``log N − (N−1)/N`` as ``M`` grows.

**The continuous Best-of-N curve.** For a reward without atoms the quantile ``u`` of a reference sample is
uniform, and Best-of-N gives it the density ``N u^{N−1}``, so

$$
\bar q_N = \frac{N}{N+1}, \qquad \mathrm{KL}_N = \log N - \frac{N-1}{N}
$$

(``E[\log u] = −1/N`` under ``N u^{N−1}``; the KL is ``prefopt.bon.bon_kl_bound``, Sessa et al. 2024). The density ``N u^{N−1}`` is also the KL-regularised optimum for the reward
``log u`` with coefficient ``1/(N−1)``, so the same formulas trace a curve for every real ``N ≥ 1``:
[`continuous_best_of_n`][prefopt.lab.measure.continuous_best_of_n] gives its point at ``N``, and
[`best_of_n_frontier`][prefopt.lab.measure.best_of_n_frontier] gives the ``N`` and the quantile at a given KL.

**A policy** is evaluated from ``S`` fresh samples per prompt: its mean quantile and gold reward, and the
Monte-Carlo estimate ``KL(π‖π_ref) ≈ mean_i Σ_t (log π − log π_ref)(y_{i,t})`` — each with its standard error
over the ``P·S`` samples.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from prefopt.lab.testbed import PAD, Lab

__all__ = [
    "BestOfNPoint",
    "PolicyEval",
    "ReferencePool",
    "best_of_n_frontier",
    "best_of_n_point",
    "continuous_best_of_n",
    "evaluate_policy",
    "lab_sampler",
    "mean_ci95",
    "mid_rank_quantile",
    "reference_pool",
    "t_quantile_975",
]


@dataclass(frozen=True)
class ReferencePool:
    """Gold rewards of ``M`` reference samples for each of ``P`` evaluation prompts.

    Attributes:
        prompts: ``(P, 1 + prompt_len)`` prompt ids.
        rewards: ``(P, M)`` float64 gold rewards, sorted ascending in each row.
    """

    prompts: Tensor
    rewards: Tensor

    @property
    def size(self) -> int:
        """``M``, the pool size per prompt."""
        return int(self.rewards.shape[1])


@dataclass(frozen=True)
class BestOfNPoint:
    """The exact Best-of-N point of a pool: ``n``, mean quantile, and ``KL(π_BoN‖π_ref)`` (nats)."""

    n: int
    quantile: float
    kl: float


@dataclass(frozen=True)
class PolicyEval:
    """A policy's evaluation: mean quantile, mean gold reward and ``KL(π‖π_ref)``, each with its standard error."""

    quantile: float
    quantile_se: float
    reward: float
    reward_se: float
    kl: float
    kl_se: float
    samples: int


def lab_sampler(lab: Lab, model: Any, **kwargs: Any) -> Any:
    """An [`HFSampler`][prefopt.sampling.HFSampler] for lab completions: exactly ``completion_len`` new tokens,
    temperature 1, no top-k/top-p (the policy's own distribution), no EOS, PAD from the lab."""
    from prefopt.sampling import HFSampler

    opts: dict[str, Any] = {
        "max_new_tokens": lab.config.completion_len,
        "temperature": 1.0,
        "top_k": 0,
        "top_p": 1.0,
        "eos_token_id": [],
        "pad_token_id": PAD,
        "progress": False,
    }
    opts.update(kwargs)
    return HFSampler(model, **opts)


def _prompt_dict(prompts: Tensor) -> dict[str, Tensor]:
    return {"input_ids": prompts, "attention_mask": torch.ones_like(prompts)}


def reference_pool(
    lab: Lab,
    reference: Any,
    prompts: Tensor,
    *,
    samples_per_prompt: int = 2048,
    batch_size: int = 4096,
    seed: int = 0,
) -> ReferencePool:
    """Sample ``samples_per_prompt`` completions per prompt from ``reference`` and score them with the gold reward.

    Args:
        lab: the lab (its gold reward and lengths).
        reference: the reference LM (a transformers causal LM, or a ``LoraPolicy`` inside ``reference()``).
        prompts: ``(P, 1 + prompt_len)`` prompt ids (e.g. ``lab.sample_prompts(P, seed=...)``).
        samples_per_prompt: ``M`` (default 2048).
        batch_size: sequences per ``generate`` call.
        seed: seeds the global torch RNG for sampling.
    """
    if (
        isinstance(samples_per_prompt, bool)
        or not isinstance(samples_per_prompt, int)
        or samples_per_prompt < 2
    ):
        raise ValueError(f"samples_per_prompt must be an int >= 2, got {samples_per_prompt!r}")
    torch.manual_seed(seed)
    sampler = lab_sampler(lab, reference, reference=None, batch_size=batch_size)
    rows = []
    per_call = max(1, batch_size // samples_per_prompt)
    for s in range(0, prompts.shape[0], per_call):
        chunk = prompts[s : s + per_call]
        with torch.no_grad():
            roll = sampler.generate(_prompt_dict(chunk), n=samples_per_prompt)
        r = lab.gold_reward(lab.completions_of(roll.input_ids, roll.prompt_len))
        rows.append(r.view(chunk.shape[0], samples_per_prompt))
    rewards = torch.cat(rows).sort(dim=1).values
    return ReferencePool(prompts=prompts.clone(), rewards=rewards)


def mid_rank_quantile(pool: ReferencePool, prompt_index: Tensor, rewards: Tensor) -> Tensor:
    """Mid-rank quantiles ``q_x(r)`` of ``rewards`` ``(n,)`` for prompts ``prompt_index`` ``(n,)`` → ``(n,)`` float64."""
    sorted_rows = pool.rewards[prompt_index]
    r = rewards.to(torch.float64).unsqueeze(1)
    below = torch.searchsorted(sorted_rows, r, right=False).squeeze(1)
    at_or_below = torch.searchsorted(sorted_rows, r, right=True).squeeze(1)
    return (below + 0.5 * (at_or_below - below)).to(torch.float64) / pool.size


def best_of_n_point(pool: ReferencePool, n: int) -> BestOfNPoint:
    """The exact Best-of-``n`` point (mean quantile, KL) of ``pool`` taken as the reference distribution,
    averaged over its prompts (see the module docstring)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    m = pool.size
    rows = pool.rewards
    below = torch.searchsorted(rows, rows, right=False).to(torch.float64)
    at_or_below = torch.searchsorted(rows, rows, right=True).to(torch.float64)
    p_lt, p_le = below / m, at_or_below / m
    tie = at_or_below - below
    bon = (p_le**n - p_lt**n) / tie
    q = (below + 0.5 * tie) / m
    quantile = (bon * q).sum(dim=1).mean()
    kl = torch.where(bon > 0, bon * torch.log(bon * m), torch.zeros_like(bon)).sum(dim=1).mean()
    return BestOfNPoint(n=n, quantile=float(quantile), kl=float(kl))


def _check_real(name: str, value: Any, minimum: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number >= {minimum:g}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be a finite number >= {minimum:g}, got {value!r}")
    return float(value)


def continuous_best_of_n(n: float) -> tuple[float, float]:
    r"""The continuous Best-of-N point for a real ``n ≥ 1``: ``(KL, quantile)`` with
    \( \mathrm{KL} = \log N - (N-1)/N \) and quantile \( N/(N+1) \) (see the module docstring).

    Args:
        n: ``N ≥ 1``, any real number (``N = 1`` is the reference: ``(0, ½)``).

    Returns:
        ``(kl, quantile)``: ``KL(π_N‖π_ref)`` in nats and the mean reference quantile of ``π_N``.
    """
    n = _check_real("n", n, 1.0)
    return math.log(n) - (n - 1.0) / n, n / (n + 1.0)


def best_of_n_frontier(kl: float) -> tuple[float, float]:
    r"""The continuous Best-of-N curve at a given KL: the real \( N \ge 1 \) with
    \( \log N - (N-1)/N = \mathrm{KL} \), and its quantile \( N/(N+1) \).

    ``log N − 1 + 1/N`` is increasing in ``N ≥ 1`` (its derivative is ``(N−1)/N² ≥ 0``) and lies between
    ``log N − 1`` and ``log N``, so ``log N ∈ [KL, KL + 1]``; the root is found by bisection on ``log N`` to
    machine precision.

    Args:
        kl: ``KL ≥ 0`` in nats.

    Returns:
        ``(n, quantile)``.
    """
    kl = _check_real("kl", kl, 0.0)
    lo, hi = kl, kl + 1.0
    if kl == 0.0:
        return 1.0, 0.5
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        if mid - 1.0 + math.exp(-mid) < kl:
            lo = mid
        else:
            hi = mid
    n = math.exp(0.5 * (lo + hi))
    return n, n / (n + 1.0)


# Two-sided 95% quantiles of Student's t, degrees of freedom 1..30 (standard tables).
_T975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip


def t_quantile_975(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df ≥ 1`` degrees of freedom (the half-width factor of a
    two-sided 95% interval): a table to ``df = 30``, then the Cornish–Fisher expansion in ``1/df`` around
    ``z = 1.95996`` (error < 1e-3 there)."""
    if isinstance(df, bool) or not isinstance(df, int) or df < 1:
        raise ValueError(f"df must be an integer >= 1, got {df!r}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959963984540054
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def mean_ci95(values: Sequence[float] | Tensor) -> tuple[float, float]:
    """Mean of ``values`` (e.g. one number per seed) and the half-width of its two-sided 95% t-interval,
    ``t_{0.975, n−1} · s / √n`` with the Bessel standard deviation ``s`` (NaN for a single value)."""
    x = torch.as_tensor(values, dtype=torch.float64).reshape(-1)
    if x.numel() == 0:
        raise ValueError("values must not be empty")
    n = x.numel()
    if n == 1:
        return float(x[0]), float("nan")
    return float(x.mean()), float(t_quantile_975(n - 1) * x.std(unbiased=True) / math.sqrt(n))


def _mean_se(x: Tensor) -> tuple[float, float]:
    x = x.to(torch.float64)
    se = float(x.std(unbiased=True) / math.sqrt(x.numel())) if x.numel() > 1 else float("nan")
    return float(x.mean()), se


def evaluate_policy(
    lab: Lab,
    policy: Any,
    pool: ReferencePool,
    *,
    samples_per_prompt: int = 64,
    reference: Any = "auto",
    seed: int = 0,
) -> PolicyEval:
    """Sample ``samples_per_prompt`` completions per pool prompt from ``policy`` and measure it.

    Args:
        lab: the lab.
        policy: a ``LoraPolicy`` (its reference is the same backbone with adapters off) or a causal LM.
        pool: the reference pool the quantiles are taken in.
        samples_per_prompt: ``S`` (default 64).
        reference: the reference for the KL: ``"auto"`` (the ``LoraPolicy``'s own) or a model.
        seed: seeds the global torch RNG for sampling (the caller's RNG state is restored afterwards).
    """
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        sampler = lab_sampler(lab, policy, reference=reference)
        with torch.no_grad():
            roll = sampler.generate(_prompt_dict(pool.prompts), n=samples_per_prompt)
    finally:
        torch.random.set_rng_state(state)
    if roll.ref_logp is None or roll.logp is None:
        raise ValueError("evaluate_policy needs reference log-probs: pass reference= a model for a plain LM")
    rewards = lab.gold_reward(lab.completions_of(roll.input_ids, roll.prompt_len))
    q = mid_rank_quantile(pool, roll.prompt_index, rewards)
    kl = (roll.logp - roll.ref_logp).to(torch.float64).sum(dim=1)
    (qm, qs), (rm, rs), (km, ks) = _mean_se(q), _mean_se(rewards), _mean_se(kl)
    return PolicyEval(qm, qs, rm, rs, km, ks, int(q.numel()))
