"""Exactness tests for Best-of-N: prefopt.bon (distribution with ties, quantiles, r_BOND), the training-time
transforms of prefopt.losses.bond, prefopt.sampling.best_of_n and prefopt.policy.ema_update_.

Oracles: brute-force enumeration of all K^N draw sequences (first-occurrence tie-breaking), explicit
Python loops for quantiles and the geometric sum, Monte-Carlo Best-of-N with standard-error tolerances.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from prefopt.bon import (
    LOG16,
    bon_distribution,
    bon_kl_bound,
    jbond_expected_reward,
    jeffreys_divergence,
    kl_categorical,
    practical_bond_target,
    quantiles,
    r_bond,
    r_bond_terms,
)
from prefopt.losses.bond import empirical_quantile, jbond_reward, log_empirical_quantile
from prefopt.policy import ema_update_
from prefopt.sampling import best_of_n

F64 = torch.float64


# ----------------------------------------------------------------------------------------------------------
# oracles
# ----------------------------------------------------------------------------------------------------------


def brute_force_bon(ref: list[float], rewards: list[float], n: int) -> list[float]:
    """Enumerate every sequence of N draws; the first draw attaining the maximum reward wins."""
    k = len(ref)
    out = [0.0] * k
    for seq in itertools.product(range(k), repeat=n):
        prob = math.prod(ref[i] for i in seq)
        best = max(rewards[i] for i in seq)
        winner = next(i for i in seq if rewards[i] == best)
        out[winner] += prob
    return out


def loop_quantiles(ref: list[float], rewards: list[float]) -> tuple[list[float], list[float]]:
    lt = [sum(p for p, r2 in zip(ref, rewards) if r2 < r) for r in rewards]
    le = [sum(p for p, r2 in zip(ref, rewards) if r2 <= r) for r in rewards]
    return lt, le


def random_case(seed: int, k: int, *, ties: bool, zeros: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(k, generator=g, dtype=F64) * 1.5
    probs = torch.softmax(logits, 0)
    if zeros:
        probs[0] = 0.0
        probs = probs / probs.sum()
    if ties:
        rewards = torch.randint(0, max(2, k // 2), (k,), generator=g).to(F64)
    else:
        rewards = torch.randperm(k, generator=g).to(F64) * 0.7 - 1.0
    return probs, rewards


# ----------------------------------------------------------------------------------------------------------
# quantiles
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ties", [False, True])
def test_quantiles_match_loop(ties: bool) -> None:
    probs, rewards = random_case(1, 9, ties=ties)
    lt, le = quantiles(probs, rewards)
    lt_ref, le_ref = loop_quantiles(probs.tolist(), rewards.tolist())
    torch.testing.assert_close(lt, torch.tensor(lt_ref, dtype=F64), rtol=0, atol=1e-15)
    torch.testing.assert_close(le, torch.tensor(le_ref, dtype=F64), rtol=0, atol=1e-15)


def test_quantiles_batched_equal_rowwise() -> None:
    rows = [random_case(s, 7, ties=s % 2 == 0) for s in range(5)]
    probs = torch.stack([p for p, _ in rows])
    rewards = torch.stack([r for _, r in rows])
    lt, le = quantiles(probs, rewards)
    for i, (p, r) in enumerate(rows):
        lt_i, le_i = quantiles(p, r)
        torch.testing.assert_close(lt[i], lt_i, rtol=0, atol=0)
        torch.testing.assert_close(le[i], le_i, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------------------
# Best-of-N distribution
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("k", "n", "ties", "zeros"),
    [
        (4, 1, False, False),
        (4, 2, False, False),
        (5, 3, True, False),
        (4, 4, True, True),
        (6, 3, False, True),
    ],
)
def test_bon_matches_brute_force_enumeration(k: int, n: int, ties: bool, zeros: bool) -> None:
    probs, rewards = random_case(10 * k + n, k, ties=ties, zeros=zeros)
    exact = torch.tensor(brute_force_bon(probs.tolist(), rewards.tolist(), n), dtype=F64)
    torch.testing.assert_close(bon_distribution(probs, rewards, n), exact, rtol=1e-12, atol=1e-15)


def test_bon_all_items_tied_is_reference() -> None:
    probs, _ = random_case(3, 5, ties=False)
    rewards = torch.full((5,), 2.0, dtype=F64)
    torch.testing.assert_close(bon_distribution(probs, rewards, 7), probs, rtol=1e-13, atol=0)


def test_bon_distinct_rewards_is_difference_of_cdf_powers() -> None:
    probs, rewards = random_case(4, 8, ties=False)
    n = 5
    _, le = loop_quantiles(probs.tolist(), rewards.tolist())
    expected = [f**n - (f - p) ** n for f, p in zip(le, probs.tolist())]
    torch.testing.assert_close(bon_distribution(probs, rewards, n), torch.tensor(expected, dtype=F64))


def test_bon_tie_formula_closed_form() -> None:
    # tied items share π_ref(y)·(P≤^N − P<^N)/(P≤ − P<), i.e. in proportion to π_ref
    probs = torch.tensor([0.1, 0.25, 0.05, 0.3, 0.2, 0.1], dtype=F64)
    rewards = torch.tensor([1.0, 2.0, 2.0, 0.0, 2.0, 3.0], dtype=F64)
    n = 4
    lt, le = loop_quantiles(probs.tolist(), rewards.tolist())
    expected = [p * (b**n - a**n) / (b - a) for p, a, b in zip(probs.tolist(), lt, le)]
    out = bon_distribution(probs, rewards, n)
    torch.testing.assert_close(out, torch.tensor(expected, dtype=F64), rtol=1e-13, atol=0)
    # class {1, 2, 4} (reward 2) gets P≤^N − P<^N in total: 0.9^4 − 0.4^4
    assert float(out[[1, 2, 4]].sum()) == pytest.approx(0.9**4 - 0.4**4, rel=1e-13)
    assert float(out.sum()) == pytest.approx(1.0, abs=1e-14)


@settings(max_examples=40, deadline=None)
@given(
    k=st.integers(1, 12),
    n=st.integers(1, 40),
    ties=st.booleans(),
    seed=st.integers(0, 10_000),
    batch=st.integers(1, 3),
)
def test_bon_sums_to_one_and_is_a_distribution(k: int, n: int, ties: bool, seed: int, batch: int) -> None:
    cases = [random_case(seed + i, k, ties=ties) for i in range(batch)]
    probs = torch.stack([p for p, _ in cases])
    rewards = torch.stack([r for _, r in cases])
    out = bon_distribution(probs, rewards, n)
    assert out.shape == (batch, k)
    assert bool((out >= 0).all())
    torch.testing.assert_close(out.sum(-1), torch.ones(batch, dtype=F64), rtol=0, atol=1e-12)


def test_bon_n1_is_reference_and_worst_item_gets_ref_power_n() -> None:
    probs, rewards = random_case(5, 7, ties=False)
    torch.testing.assert_close(bon_distribution(probs, rewards, 1), probs, rtol=0, atol=0)
    worst = int(rewards.argmin())
    for n in (2, 3, 8):
        assert float(bon_distribution(probs, rewards, n)[worst]) == pytest.approx(
            float(probs[worst]) ** n, rel=1e-13
        )


@pytest.mark.parametrize("ties", [False, True])
def test_bon_composition(ties: bool) -> None:
    probs, rewards = random_case(6, 8, ties=ties)
    bo2 = bon_distribution(probs, rewards, 2)
    torch.testing.assert_close(bon_distribution(bo2, rewards, 2), bon_distribution(probs, rewards, 4))
    bo8 = bon_distribution(bon_distribution(bo2, rewards, 2), rewards, 2)
    torch.testing.assert_close(bo8, bon_distribution(probs, rewards, 8))
    torch.testing.assert_close(bon_distribution(bo2, rewards, 3), bon_distribution(probs, rewards, 6))


def test_bon_large_n_and_near_one_quantiles_match_direct_geometric_sum() -> None:
    # tiny item at the top: q = p_</p_≤ is within 1e-9 of 1, so (1 − q^N)/(1 − q) is ill-conditioned naively
    probs = torch.tensor([0.6, 0.4 - 1e-9, 1e-9], dtype=F64)
    rewards = torch.tensor([0.0, 1.0, 2.0], dtype=F64)
    for n in (2, 50, 1000):
        lt, le = loop_quantiles(probs.tolist(), rewards.tolist())
        direct = [
            p * sum(a**i * b ** (n - 1 - i) for i in range(n)) for p, a, b in zip(probs.tolist(), lt, le)
        ]
        torch.testing.assert_close(
            bon_distribution(probs, rewards, n), torch.tensor(direct, dtype=F64), rtol=1e-10, atol=0
        )


def test_bon_float32_close_to_float64() -> None:
    probs, rewards = random_case(7, 50, ties=True)
    out32 = bon_distribution(probs.float(), rewards.float(), 16)
    out64 = bon_distribution(probs, rewards, 16)
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32.double(), out64, rtol=1e-4, atol=1e-6)
    # bfloat16 (8 mantissa bits): within a few bf16 ulps of the float64 result
    out16 = bon_distribution(probs.bfloat16(), rewards, 16)
    assert out16.dtype == torch.bfloat16
    torch.testing.assert_close(out16.double(), out64, rtol=3e-2, atol=1e-3)
    # integer rewards and float32 probabilities that are only float32-normalized, given as float64
    p32 = torch.softmax(torch.randn(50, generator=torch.Generator().manual_seed(0)), 0)
    torch.testing.assert_close(
        bon_distribution(p32.double(), rewards.long(), 16),
        bon_distribution(p32.double(), rewards, 16),
        rtol=0,
        atol=0,
    )


@pytest.mark.parametrize("ties", [False, True])
def test_best_of_n_monte_carlo_matches_bon_distribution(ties: bool) -> None:
    probs = torch.tensor([0.05, 0.3, 0.15, 0.2, 0.1, 0.2], dtype=F64)
    rewards = torch.tensor(
        [0.0, 1.0, 1.0, 2.0, 3.0, 3.0] if ties else [0.0, 1.0, 1.5, 2.0, 3.0, 3.5], dtype=F64
    )
    n, m = 3, 100_000
    g = torch.Generator().manual_seed(1234)

    def sample(prompts: list[object]) -> torch.Tensor:
        return torch.multinomial(probs, len(prompts), replacement=True, generator=g)

    def score(prompts: list[object], samples: torch.Tensor) -> torch.Tensor:
        return rewards[samples]

    res = best_of_n(sample, score, [None] * m, n)
    freq = torch.bincount(res.best, minlength=6).to(F64) / m
    exact = bon_distribution(probs, rewards, n)
    se = torch.sqrt(exact * (1 - exact) / m)
    z = ((freq - exact) / se).abs()
    assert float(z.max()) < 4.5, z  # 6 items, |z| > 4.5 has probability < 4e-5 under the null
    if ties:
        # power: splitting a tie class equally (instead of ∝ π_ref) is rejected by the same data
        wrong = exact.clone()
        for cls in ([1, 2], [4, 5]):
            wrong[cls] = exact[cls].sum() / 2
        z_wrong = ((freq - wrong) / torch.sqrt(wrong * (1 - wrong) / m)).abs()
        assert float(z_wrong.max()) > 10


# ----------------------------------------------------------------------------------------------------------
# r_BOND, practical target, KL bound
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("n", [2, 3, 8])
def test_r_bond_exponential_tilt_is_exactly_bon(ties: bool, n: int) -> None:
    probs, rewards = random_case(8 + n, 9, ties=ties)
    tilted = probs * torch.exp((n - 1) * r_bond(probs, rewards, n))
    torch.testing.assert_close(tilted, bon_distribution(probs, rewards, n), rtol=1e-12, atol=1e-16)
    assert float(tilted.sum()) == pytest.approx(1.0, abs=1e-13)  # no normalizer needed


def test_r_bond_terms_ranges_and_monotone_invariance() -> None:
    probs, rewards = random_case(9, 10, ties=True)
    n = 6
    a, b = r_bond_terms(probs, rewards, n)
    assert bool((a <= 0).all())
    assert bool((b >= 0).all()) and bool((b <= math.log(n) / (n - 1) + 1e-15).all())
    worst = rewards == rewards.min()
    assert bool((b[worst] == 0).all()) and bool((b[~worst] > 0).all())
    # exact values of (A) and (B) from the loop oracle
    lt, le = loop_quantiles(probs.tolist(), rewards.tolist())
    b_loop = [math.log(sum((x / y) ** i for i in range(n))) / (n - 1) for x, y in zip(lt, le)]
    torch.testing.assert_close(a, torch.log(torch.tensor(le, dtype=F64)))
    torch.testing.assert_close(b, torch.tensor(b_loop, dtype=F64))
    for transform in (torch.exp, lambda x: x**3 + 5 * x, lambda x: torch.atan(x) * 100):
        torch.testing.assert_close(
            r_bond(probs, transform(rewards), n), r_bond(probs, rewards, n), rtol=0, atol=0
        )


@pytest.mark.parametrize("ties", [False, True])
def test_practical_target_and_its_distance_to_bon(ties: bool) -> None:
    probs, rewards = random_case(11, 8, ties=ties)
    n = 4
    _, le = loop_quantiles(probs.tolist(), rewards.tolist())
    w = [p * f ** (n - 1) for p, f in zip(probs.tolist(), le)]
    expected = torch.tensor([x / sum(w) for x in w], dtype=F64)
    target = practical_bond_target(probs, rewards, n)
    torch.testing.assert_close(target, expected)
    # the practical target is π_BoN with the factor (B) divided out, renormalized: π̃ ∝ π_BoN / (B)
    bon = bon_distribution(probs, rewards, n)
    lt, _ = loop_quantiles(probs.tolist(), rewards.tolist())
    factor_b = torch.tensor([sum((a / f) ** i for i in range(n)) for a, f in zip(lt, le)], dtype=F64)
    torch.testing.assert_close(target, (bon / factor_b) / (bon / factor_b).sum())
    # ... so it is a different distribution (far beyond rounding) whenever (B) is not constant
    tv = 0.5 * float((target - bon).abs().sum())
    assert tv > 1e-3
    torch.testing.assert_close(practical_bond_target(probs, rewards, 1), probs)


@settings(max_examples=30, deadline=None)
@given(k=st.integers(1, 15), n=st.integers(1, 64), ties=st.booleans(), seed=st.integers(0, 10_000))
def test_kl_bon_reference_bound(k: int, n: int, ties: bool, seed: int) -> None:
    probs, rewards = random_case(seed, k, ties=ties)
    kl = float(kl_categorical(bon_distribution(probs, rewards, n), probs))
    assert -1e-12 <= kl <= bon_kl_bound(n) + 1e-12


def test_kl_bound_is_tight_without_atoms() -> None:
    k = 20_000
    probs = torch.full((k,), 1.0 / k, dtype=F64)
    rewards = torch.arange(k, dtype=F64)
    for n in (2, 8, 32):
        kl = float(kl_categorical(bon_distribution(probs, rewards, n), probs))
        assert kl <= bon_kl_bound(n)
        assert bon_kl_bound(n) - kl < 5e-3
    # far from tight with a big atom (every item tied => π_BoN = π_ref, KL = 0)
    assert abs(float(kl_categorical(bon_distribution(probs, torch.zeros(k, dtype=F64), 8), probs))) < 1e-12


def test_kl_and_jeffreys_basic_values() -> None:
    p = torch.tensor([0.5, 0.5, 0.0], dtype=F64)
    q = torch.tensor([0.25, 0.25, 0.5], dtype=F64)
    assert float(kl_categorical(p, q)) == pytest.approx(math.log(2), rel=1e-14)
    assert float(kl_categorical(q, p)) == math.inf
    probs, rewards = random_case(12, 6, ties=False)
    bon = bon_distribution(probs, rewards, 4)
    for beta in (0.0, 0.5, 1.0):
        assert float(jeffreys_divergence(bon, bon, backward_weight=beta)) == 0.0
    j = jeffreys_divergence(probs, bon, backward_weight=0.3)
    assert float(j) == pytest.approx(
        0.7 * float(kl_categorical(bon, probs)) + 0.3 * float(kl_categorical(probs, bon))
    )
    with pytest.raises(ValueError, match="backward_weight"):
        jeffreys_divergence(probs, bon, backward_weight=1.5)
    for flag in (True, False):
        with pytest.raises(ValueError, match="backward_weight"):
            jeffreys_divergence(probs, bon, backward_weight=flag)


def test_gradcheck_exact_functions_through_softmax() -> None:
    probs, rewards = random_case(13, 6, ties=True)
    logits = torch.log(probs).clone().requires_grad_(True)
    for fn in (
        lambda z: bon_distribution(torch.softmax(z, 0), rewards, 5),
        lambda z: r_bond(torch.softmax(z, 0), rewards, 3),
        lambda z: practical_bond_target(torch.softmax(z, 0), rewards, 4),
        lambda z: kl_categorical(bon_distribution(torch.softmax(z, 0), rewards, 4), torch.softmax(z, 0)),
    ):
        assert torch.autograd.gradcheck(fn, (logits,), eps=1e-6, atol=1e-8, rtol=1e-6)
    # the gradient of π_BoN w.r.t. the logits is finite even with a zero-mass bottom item
    p0 = torch.tensor([0.0, 0.3, 0.7], dtype=F64, requires_grad=True)
    (g,) = torch.autograd.grad(bon_distribution(p0, torch.tensor([0.0, 1.0, 2.0], dtype=F64), 3).sum(), p0)
    assert bool(torch.isfinite(g).all())


# ----------------------------------------------------------------------------------------------------------
# empirical quantiles
# ----------------------------------------------------------------------------------------------------------


def test_empirical_quantile_loop_oracle_and_floors() -> None:
    g = torch.Generator().manual_seed(0)
    ref = torch.randint(0, 5, (6, 8), generator=g).to(F64)
    reward = torch.tensor([-1.0, 0.0, 2.0, 4.0, 2.5, 10.0], dtype=F64)
    k = ref.shape[1]
    counts = [sum(1 for v in ref[i].tolist() if v <= reward[i]) for i in range(6)]
    assert counts[0] == 0  # the floor is exercised
    half = empirical_quantile(reward, ref)
    torch.testing.assert_close(half, torch.tensor([max(c / k, 1 / (2 * k)) for c in counts], dtype=F64))
    smoothed = empirical_quantile(reward, ref, floor="smoothed")
    torch.testing.assert_close(smoothed, torch.tensor([(c + 0.5) / (k + 1) for c in counts], dtype=F64))
    fixed = empirical_quantile(reward, ref, floor=0.01)
    torch.testing.assert_close(fixed, torch.tensor([max(c / k, 0.01) for c in counts], dtype=F64))
    torch.testing.assert_close(log_empirical_quantile(reward, ref), torch.log(half))


def test_empirical_quantile_is_unbiased_above_the_floor() -> None:
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=F64)
    rewards = torch.tensor([0.0, 1.0, 2.0, 3.0], dtype=F64)
    k, reps = 16, 20_000
    g = torch.Generator().manual_seed(5)
    pool = rewards[torch.multinomial(probs, reps * k, replacement=True, generator=g)].reshape(reps, k)
    _, le = quantiles(probs, rewards)
    for item in (1, 2, 3):  # items whose count is almost never 0 (P(count=0) ≤ 0.9^16 ≈ 0.19 for item 0)
        est = empirical_quantile(rewards[item].expand(reps), pool, floor=1e-9)
        se = math.sqrt(float(le[item]) * (1 - float(le[item])) / k / reps) + 1e-12
        assert abs(float(est.mean()) - float(le[item])) < 4.5 * se


@settings(max_examples=40, deadline=None)
@given(
    b=st.integers(1, 5),
    k=st.integers(2, 9),
    scale=st.sampled_from([1e-3, 1.0, 1e4]),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
    seed=st.integers(0, 1000),
)
def test_empirical_quantile_properties(b: int, k: int, scale: float, dtype: torch.dtype, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    ref = (torch.randn(b, k, generator=g) * scale).to(dtype)
    reward = (torch.randn(b, generator=g) * scale).to(dtype)
    q = empirical_quantile(reward, ref)
    assert q.shape == (b,) and q.dtype == dtype
    assert bool((q >= 1 / (2 * k) - 1e-3).all()) and bool((q <= 1).all())
    # the best reference sample itself has quantile 1
    assert bool((empirical_quantile(ref.max(-1).values, ref) == 1).all())
    assert bool(torch.isfinite(log_empirical_quantile(reward, ref)).all())


# ----------------------------------------------------------------------------------------------------------
# J-BOND reward
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("strict", [True, False])
def test_jbond_expected_reward_by_enumeration(strict: bool) -> None:
    probs = torch.tensor([0.1, 0.2, 0.3, 0.15, 0.25], dtype=F64)
    rewards = torch.tensor([0.0, 1.0, 1.0, 2.0, 3.0], dtype=F64)
    k = 5
    pairs = list(itertools.product(range(k), repeat=2))
    anchor = torch.tensor([[rewards[i], rewards[j]] for i, j in pairs], dtype=F64)
    weight = torch.tensor([probs[i] * probs[j] for i, j in pairs], dtype=F64)
    enumerated = []
    for y in range(k):
        r_j = jbond_reward(rewards[y].expand(len(pairs)), anchor, strict=strict)
        enumerated.append(float((weight * r_j).sum()))
    lt, le = loop_quantiles(probs.tolist(), rewards.tolist())
    p = le if strict else lt
    closed = [-LOG16 * (1 - x) ** 2 for x in p]
    torch.testing.assert_close(torch.tensor(enumerated, dtype=F64), torch.tensor(closed, dtype=F64))
    torch.testing.assert_close(
        jbond_expected_reward(probs, rewards, strict=strict), torch.tensor(closed, dtype=F64)
    )
    # the two comparison rules differ exactly on ties
    other = jbond_expected_reward(probs, rewards, strict=not strict)
    assert float((other - torch.tensor(closed, dtype=F64)).abs().max()) > 0.01


def test_jbond_reward_is_log_half_at_the_median() -> None:
    probs = torch.full((4,), 0.25, dtype=F64)
    rewards = torch.tensor([0.0, 1.0, 2.0, 3.0], dtype=F64)
    expected = jbond_expected_reward(probs, rewards)
    assert float(expected[1]) == pytest.approx(math.log(0.5), rel=1e-14)  # p_≤ = ½
    assert float(expected[3]) == 0.0
    r = jbond_reward(torch.tensor([1.0, 1.0, 5.0]), torch.tensor([[2.0, 3.0], [1.0, 3.0], [2.0, 3.0]]))
    assert r.tolist() == pytest.approx([-LOG16, 0.0, 0.0])
    r_ns = jbond_reward(
        torch.tensor([1.0, 1.0, 5.0]), torch.tensor([[2.0, 3.0], [1.0, 3.0], [2.0, 3.0]]), strict=False
    )
    assert r_ns.tolist() == pytest.approx([-LOG16, -LOG16, 0.0])


# ----------------------------------------------------------------------------------------------------------
# best_of_n and EMA
# ----------------------------------------------------------------------------------------------------------


def test_best_of_n_lists_first_occurrence_and_order() -> None:
    calls: list[list[str]] = []

    def sample(prompts: list[str]) -> list[str]:
        calls.append(prompts)
        return [f"{p}-{i % 3}" for i, p in enumerate(prompts)]

    table = {"a-0": 1.0, "a-1": 5.0, "a-2": 5.0, "b-0": 2.0, "b-1": -1.0, "b-2": 0.0}

    def score(prompts: list[str], samples: list[str]) -> list[float]:
        assert all(s.startswith(p) for p, s in zip(prompts, samples))
        return [table[s] for s in samples]

    res = best_of_n(sample, score, ["a", "b"], 3)
    assert calls == [["a", "a", "a", "b", "b", "b"]]
    assert res.index.tolist() == [1, 0]  # a-1 and a-2 tie at 5: the first drawn wins
    assert res.best == ["a-1", "b-0"]
    assert res.best_reward.tolist() == [5.0, 2.0]
    assert res.samples == [["a-0", "a-1", "a-2"], ["b-0", "b-1", "b-2"]]
    assert res.rewards.shape == (2, 3)


def test_best_of_n_tensor_samples() -> None:
    def sample(prompts: list[int]) -> torch.Tensor:
        return torch.tensor([[p, i] for i, p in enumerate(prompts)])

    res = best_of_n(sample, lambda _p, s: -((s[:, 1] - 4.0) ** 2), [0, 1], 4)
    assert res.samples.shape == (2, 4, 2)
    assert res.best.tolist() == [[0, 3], [1, 4]]


def test_best_of_n_bad_input() -> None:
    def sample(prompts: list[int]) -> list[int]:
        return list(range(len(prompts)))

    with pytest.raises(ValueError, match="n must be"):
        best_of_n(sample, lambda p, s: [0.0] * len(s), [1], 0)
    with pytest.raises(ValueError, match="prompts"):
        best_of_n(sample, lambda p, s: [0.0] * len(s), [], 2)
    with pytest.raises(ValueError, match="sample_fn"):
        best_of_n(lambda p: [0], lambda p, s: [0.0], [1, 2], 2)
    with pytest.raises(ValueError, match="reward_fn"):
        best_of_n(sample, lambda p, s: [0.0], [1, 2], 2)
    with pytest.raises(ValueError, match="rewards"):
        best_of_n(sample, lambda p, s: [float("nan")] * len(s), [1], 2)


@pytest.mark.parametrize(
    ("rewards", "match"),
    [
        (["0.5", "0.7"], r"item 0 is str '0.5'"),
        ([1.0, None], r"item 1 is NoneType"),
        ([1.0, True], r"item 1 is bool"),
        ([1.0, [2.0]], r"item 1 is list"),
        ([1.0, 2j], r"item 1 is complex"),
        (torch.tensor([True, False]), r"dtype torch.bool"),
        (42, r"got int"),
    ],
)
def test_best_of_n_reward_fn_returning_non_numbers(rewards, match) -> None:
    def sample(repeated):
        return [f"s{i}" for i in range(len(repeated))]

    with pytest.raises(TypeError, match=match):
        best_of_n(sample, lambda p, s: rewards, ["prompt"], 2)
    # numbers of any real kind are fine
    out = best_of_n(sample, lambda p, s: [1, torch.tensor(3.0)], ["prompt"], 2)
    assert out.index.tolist() == [1]


def test_ema_update() -> None:
    g = torch.Generator().manual_seed(0)
    policy = torch.randn(5, generator=g)
    anchor = torch.randn(5, generator=g)
    start = anchor.clone()
    ema_update_(anchor, policy, decay=1.0)
    assert torch.equal(anchor, start)
    ema_update_(anchor, policy, decay=0.7)
    torch.testing.assert_close(anchor, 0.7 * start + 0.3 * policy)
    ema_update_(anchor, policy, decay=0.0)
    assert torch.equal(anchor, policy)
    a_list = [torch.zeros(2), torch.zeros(3)]
    ema_update_(a_list, [torch.ones(2), torch.full((3,), 2.0)], decay=0.5)
    assert a_list[0].tolist() == [0.5, 0.5] and a_list[1].tolist() == [1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="decay"):
        ema_update_(anchor, policy, decay=1.5)
    with pytest.raises(ValueError, match="anchor"):
        ema_update_([anchor], [policy, policy], decay=0.5)
    with pytest.raises(ValueError, match=r"anchor\[0\]"):
        ema_update_(anchor, torch.zeros(4), decay=0.5)


def test_ema_update_all_or_nothing() -> None:
    """A bad pair anywhere in the lists (integer dtype, wrong shape, NaN in the policy) writes no anchor."""
    anchors = [torch.zeros(2), torch.zeros(3), torch.zeros(2)]
    good = [torch.ones(2), torch.ones(3)]
    cases = [
        ([*good, torch.tensor([1.0, float("nan")])], ValueError, r"policy\[2\] hold NaN or inf"),
        ([*good, torch.tensor([1.0, float("inf")])], ValueError, r"policy\[2\] hold NaN or inf"),
        ([*good, torch.ones(3)], ValueError, r"anchor\[2\] has shape"),
        ([*good, torch.ones(2, dtype=torch.long)], TypeError, r"policy\[2\] must be a floating-point"),
        ([*good, [1.0, 1.0]], TypeError, r"policy\[2\] must be a torch.Tensor"),
    ]
    for policies, error, match in cases:
        with pytest.raises(error, match=match):
            ema_update_(anchors, policies, decay=0.5)
        assert all(float(a.abs().sum()) == 0.0 for a in anchors)
    with pytest.raises(
        TypeError, match=r"anchor\[0\] must be a floating-point tensor, got dtype torch.int64"
    ):
        ema_update_(torch.zeros(3, dtype=torch.long), torch.ones(3), decay=0.5)


# ----------------------------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------------------------


def test_bad_input_names_the_argument() -> None:
    p = torch.tensor([0.5, 0.5], dtype=F64)
    r = torch.tensor([0.0, 1.0], dtype=F64)
    with pytest.raises(ValueError, match="n must be"):
        bon_distribution(p, r, 0)
    with pytest.raises(ValueError, match="n must be"):
        bon_distribution(p, r, 2.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="n must be an integer >= 2"):
        r_bond(p, r, 1)
    with pytest.raises(ValueError, match="rewards has shape"):
        bon_distribution(p, torch.zeros(3, dtype=F64), 2)
    with pytest.raises(ValueError, match="rewards has 1 NaN"):
        bon_distribution(p, torch.tensor([0.0, float("nan")], dtype=F64), 2)
    with pytest.raises(ValueError, match="ref_probs must sum to 1"):
        bon_distribution(torch.tensor([0.5, 0.6], dtype=F64), r, 2)
    with pytest.raises(ValueError, match="ref_probs has negative"):
        bon_distribution(torch.tensor([1.5, -0.5], dtype=F64), r, 2)
    with pytest.raises(ValueError, match="ref_probs has non-finite"):
        bon_distribution(torch.tensor([float("nan"), 0.5], dtype=F64), r, 2)
    with pytest.raises(TypeError, match=r"ref_probs must be a torch\.Tensor"):
        bon_distribution([0.5, 0.5], r, 2)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least 2 reference samples"):
        empirical_quantile(torch.zeros(3), torch.zeros(3, 1))
    with pytest.raises(ValueError, match="ref_rewards must have shape"):
        empirical_quantile(torch.zeros(3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="ref_rewards has 1 NaN"):
        empirical_quantile(torch.zeros(1), torch.tensor([[0.0, float("nan")]]))
    with pytest.raises(ValueError, match="reward has 1 NaN"):
        empirical_quantile(torch.tensor([float("nan")]), torch.zeros(1, 2))
    for bad in ("quarter", 0.0, 1.5, True):
        with pytest.raises(ValueError, match="floor"):
            empirical_quantile(torch.zeros(1), torch.zeros(1, 2), floor=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="anchor_rewards must have shape"):
        jbond_reward(torch.zeros(2), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="q has shape"):
        kl_categorical(p, torch.ones(3, dtype=F64) / 3)
