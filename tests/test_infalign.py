"""InfAlign-CTRL pieces (``calibrated_reward``, ``infalign_transform``, ``infalign_reward``,
``calibrated_bon_tradeoff``) on a categorical policy over K items (a one-token LM), with exact quantities.

Exact quantiles: reference probabilities are multiples of 1/20 and the pool repeats each item's reward
``20·π_ref(y)`` times, so the pool's counts are the exact reference quantiles.
"""

from __future__ import annotations

import math

import pytest
import torch

from prefopt.bon import (
    bon_distribution,
    jbond_expected_reward,
    kl_categorical,
    practical_bond_target,
    quantiles,
)
from prefopt.losses.bon_family import (
    calibrated_bon_tradeoff,
    calibrated_reward,
    infalign_reward,
    infalign_transform,
    qrpo,
    vbon_log_ratio,
)
from prefopt.rl import rloo_advantages
from prefopt.testing import lbfgs_argmin
from prefopt.testing import tv_distance as tv
from prefopt.types import BestOfNSamples

F64 = torch.float64
COUNTS = torch.tensor([2, 5, 1, 4, 3, 5])
K_POOL = 20
REF = COUNTS.to(F64) / K_POOL
REWARDS = torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0, 5.0], dtype=F64)
POOL = torch.repeat_interleave(REWARDS, COUNTS)
K = 6
TRANSFORMS = [("identity", 1.0), ("bon", 5.0), ("won", 3.0)]


def exact_c(ref: torch.Tensor, rewards: torch.Tensor) -> torch.Tensor:
    """Mid-rank calibrated reward under the exact reference distribution: ``(p_< + p_≤)/2``."""
    p_lt, p_le = quantiles(ref, rewards)
    return (p_lt + p_le) / 2


def tilted(ref: torch.Tensor, phi: torch.Tensor, beta: float) -> torch.Tensor:
    return torch.softmax(torch.log(ref) + phi / beta, 0)


def bon_win_rate(pi: torch.Tensor, ref: torch.Tensor, rewards: torch.Tensor, n: int) -> float:
    """Exact ``P(r(Y) > r(Y')) + ½P(r(Y) = r(Y'))``, ``Y`` best of n from ``pi``, ``Y'`` best of n from ``ref``."""
    return float(
        (bon_distribution(pi, rewards, n) * exact_c(bon_distribution(ref, rewards, n), rewards)).sum()
    )


def beta_for_kl(phi: torch.Tensor, kl: float, ref: torch.Tensor = REF) -> float:
    """β with ``KL(π_ref e^{φ/β}/Z ‖ π_ref) = kl`` (KL decreases in β), by bisection on log β."""
    lo, hi = -10.0, 30.0
    for _ in range(200):
        mid = (lo + hi) / 2
        if float(kl_categorical(tilted(ref, phi, math.exp(mid)), ref)) > kl:
            lo = mid
        else:
            hi = mid
    return math.exp((lo + hi) / 2)


# ----------------------------------------------------------------------------------------------------------
# calibration
# ----------------------------------------------------------------------------------------------------------


def test_pool_calibration_is_the_exact_mid_rank_and_has_mean_one_half() -> None:
    pool = POOL.expand(K, -1)
    c = calibrated_reward(REWARDS, pool)
    torch.testing.assert_close(c, exact_c(REF, REWARDS), rtol=0, atol=1e-15)
    # hand values: p_< = 0, .1, .35, .4, .6, .75 and π_ref = .1, .25, .05, .2, .15, .25
    assert c.tolist() == pytest.approx([0.05, 0.225, 0.375, 0.5, 0.675, 0.875], abs=1e-15)
    assert float((REF * c).sum()) == pytest.approx(0.5, abs=1e-15)
    # the other conventions: "le" has mean ½ + ½Σπ², "lt" ½ − ½Σπ²
    s2 = float((REF**2).sum())
    assert float((REF * calibrated_reward(REWARDS, pool, ties="le")).sum()) == pytest.approx(0.5 + s2 / 2)
    assert float((REF * calibrated_reward(REWARDS, pool, ties="lt")).sum()) == pytest.approx(0.5 - s2 / 2)


def test_mid_rank_mean_is_one_half_with_ties_and_uniform_on_a_uniform_grid() -> None:
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        ref = torch.softmax(torch.randn(9, generator=g, dtype=F64), 0)
        rewards = torch.randint(0, 4, (9,), generator=g).to(F64)  # many ties
        assert float((ref * exact_c(ref, rewards)).sum()) == pytest.approx(0.5, abs=1e-14)
    # uniform reference, distinct rewards: C takes exactly the midpoints (i + ½)/K, the law of U(0,1) binned
    k = 40
    perm = torch.randperm(k, generator=g)
    rewards = perm.to(F64) ** 3
    c = calibrated_reward(rewards, rewards.expand(k, -1))
    torch.testing.assert_close(c, (perm.to(F64) + 0.5) / k, rtol=0, atol=1e-15)
    assert float((c - 0.5).pow(2).mean()) == pytest.approx(1 / 12 - 1 / (12 * k * k), abs=1e-14)


@pytest.mark.parametrize("ties", ["mid", "le", "lt"])
def test_calibration_is_invariant_to_strictly_increasing_transforms(ties: str) -> None:
    pool = POOL.expand(K, -1)
    base = calibrated_reward(REWARDS, pool, ties=ties)
    for f in (lambda r: 3 * r - 7, torch.exp, lambda r: r**3, lambda r: torch.tanh(r / 4)):
        torch.testing.assert_close(calibrated_reward(f(REWARDS), f(pool), ties=ties), base, rtol=0, atol=0)
    # a decreasing transform is not monotone-invariant: it reflects C → 1 − C (mid-rank)
    if ties == "mid":
        torch.testing.assert_close(calibrated_reward(-REWARDS, -pool), 1 - base, rtol=0, atol=1e-15)


# ----------------------------------------------------------------------------------------------------------
# transforms and the KL-regularised optimum
# ----------------------------------------------------------------------------------------------------------


def test_transform_values() -> None:
    c = torch.tensor([0.0, 0.25, 1.0], dtype=F64)
    assert infalign_transform(c, "identity").tolist() == c.tolist()
    assert infalign_transform(c, "bon", t=2.0).tolist() == pytest.approx([1.0, math.exp(0.5), math.exp(2.0)])
    assert infalign_transform(c, "won", t=2.0).tolist() == pytest.approx(
        [-1.0, -math.exp(-0.5), -math.exp(-2.0)]
    )
    # both exponentials are strictly increasing in c, and affine in c as t → 0 (identity up to scale)
    for tr in ("bon", "won"):
        assert bool((infalign_transform(c, tr, t=3.0).diff() > 0).all())
        small = infalign_transform(c, tr, t=1e-6)
        torch.testing.assert_close((small - small[0]) / 1e-6, c, rtol=0, atol=1e-5)
    r = infalign_reward(REWARDS, POOL.expand(K, -1), transform="bon", t=2.0)
    torch.testing.assert_close(r, torch.exp(2.0 * exact_c(REF, REWARDS)), rtol=0, atol=1e-14)


@pytest.mark.parametrize(("transform", "t"), TRANSFORMS)
@pytest.mark.parametrize("beta", [0.2, 1.0, 5.0])
def test_kl_regularised_optimum_is_the_tilted_reference(transform: str, t: float, beta: float) -> None:
    phi = infalign_reward(REWARDS, POOL.expand(K, -1), transform=transform, t=t)

    def objective(theta: torch.Tensor) -> torch.Tensor:  # −E_π[Φ(C)] + β KL(π ‖ π_ref), exact
        pi = torch.softmax(theta, 0)
        return -(pi * phi).sum() + beta * kl_categorical(pi, REF)

    pi_star = torch.softmax(lbfgs_argmin(objective, torch.zeros(K, dtype=F64)), 0)
    closed = REF * torch.exp(phi / beta)
    closed = closed / closed.sum()
    assert tv(pi_star, closed) < 1e-7  # the optimiser finds it from π_ref (tiny masses limit the precision)
    assert float(objective(torch.log(closed))) <= float(objective(torch.log(pi_star))) + 1e-12
    theta = torch.log(closed).requires_grad_(True)  # and it is a stationary point exactly
    (grad,) = torch.autograd.grad(objective(theta), theta)
    assert float(grad.abs().max()) < 1e-13


def test_reward_through_rloo_is_an_unbiased_kl_regularised_policy_gradient() -> None:
    """REINFORCE with advantage ``Φ(C) − β·log(π/π_ref)`` (RLOO over G samples of one prompt) has, in
    expectation over all ``K^G`` draws, the gradient of ``E_π[Φ(C)] − β KL(π‖π_ref)`` (here G = 2)."""
    beta, g = 0.4, 2
    theta = torch.tensor([0.3, -0.2, 0.5, 0.0, -0.4, 0.1], dtype=F64, requires_grad=True)
    logp_all = torch.log_softmax(theta, 0)
    pi = logp_all.exp()
    phi = infalign_reward(REWARDS, POOL.expand(K, -1), transform="bon", t=4.0)
    exact = torch.autograd.grad((pi * phi).sum() - beta * kl_categorical(pi, REF), theta, retain_graph=True)[
        0
    ]
    ret = (phi - beta * (logp_all - torch.log(REF))).detach()
    i, j = torch.meshgrid(torch.arange(K), torch.arange(K), indexing="ij")
    idx = torch.stack([i.reshape(-1), j.reshape(-1)], 1)  # (K², G) every ordered pair of draws
    w = pi.detach()[idx].prod(1)
    adv = rloo_advantages(ret[idx])
    surrogate = (w.unsqueeze(1) * adv * logp_all[idx]).sum()
    # RLOO with G = 2 halves nothing: E[(R_i − R_j)∇log π(y_i)] = ∇E[R] (the baseline is independent)
    got = torch.autograd.grad(surrogate, theta)[0] / g
    torch.testing.assert_close(got, exact, rtol=1e-12, atol=1e-13)


# ----------------------------------------------------------------------------------------------------------
# the paper's claim: the Best-of-N transform wins Best-of-N at matched KL
# ----------------------------------------------------------------------------------------------------------


def test_tradeoff_equals_the_uniform_categorical_exactly() -> None:
    grid = 50
    ref = torch.full((grid,), 1.0 / grid, dtype=F64)
    rewards = torch.arange(grid, dtype=F64)
    c = exact_c(ref, rewards)
    for transform, t in TRANSFORMS:
        for n, beta in ((2, 0.2), (4, 1.0), (8, 5.0)):
            pi = tilted(ref, infalign_transform(c, transform, t=t), beta)
            kl, wr = calibrated_bon_tradeoff(transform, beta, n, t=t, grid=grid)
            assert kl == pytest.approx(float(kl_categorical(pi, ref)), abs=1e-13)
            assert wr == pytest.approx(bon_win_rate(pi, ref, rewards, n), abs=1e-13)
    # at β → ∞ (π* = π_ref) the win rate is ½ and KL 0; the grid converges
    kl0, wr0 = calibrated_bon_tradeoff("identity", 1e9, 4)
    assert kl0 == pytest.approx(0.0, abs=1e-12) and wr0 == pytest.approx(0.5, abs=1e-9)
    # O(1/grid²) to the continuous value: the error shrinks 4× per doubling (measured 3.98-4.0)
    fine = calibrated_bon_tradeoff("bon", 20.0, 4, t=5.0, grid=100_000)
    e200 = [
        a - b for a, b in zip(calibrated_bon_tradeoff("bon", 20.0, 4, t=5.0, grid=200), fine, strict=True)
    ]
    e400 = [
        a - b for a, b in zip(calibrated_bon_tradeoff("bon", 20.0, 4, t=5.0, grid=400), fine, strict=True)
    ]
    for a, b in zip(e200, e400, strict=True):
        assert 3.8 < a / b < 4.2, (e200, e400)


@pytest.mark.parametrize("n", [2, 4, 8])
def test_exponential_transform_beats_identity_in_best_of_n_win_rate_at_matched_kl(n: int) -> None:
    """Exact on the K = 6 categorical: at the same KL(π*‖π_ref), the exp(t·C) optimum's Best-of-N sample beats
    the reference's Best-of-N sample more often than the identity (calibrated RLHF) optimum's does."""
    c = exact_c(REF, REWARDS)
    kl = 0.5
    rates = {}
    for tr, t in (("identity", 1.0), ("bon", 2.0), ("bon", 5.0), ("bon", 10.0)):
        phi = infalign_transform(c, tr, t=t)
        pi = tilted(REF, phi, beta_for_kl(phi, kl))
        assert float(kl_categorical(pi, REF)) == pytest.approx(kl, abs=1e-9)
        rates[(tr, t)] = bon_win_rate(pi, REF, REWARDS, n)
    print(n, {f"{k[0]} t={k[1]:g}": round(v, 6) for k, v in rates.items()})
    ident = rates[("identity", 1.0)]
    assert rates[("bon", 2.0)] > ident and rates[("bon", 5.0)] > ident
    # the worst-of-N transform goes the other way for Best-of-N
    phi = infalign_transform(c, "won", t=5.0)
    assert bon_win_rate(tilted(REF, phi, beta_for_kl(phi, kl)), REF, REWARDS, n) < ident


def test_bad_input() -> None:
    pool = POOL.expand(K, -1)
    with pytest.raises(ValueError, match="ties"):
        calibrated_reward(REWARDS, pool, ties="half")
    with pytest.raises(ValueError, match="ref_rewards"):
        calibrated_reward(REWARDS, POOL)
    with pytest.raises(ValueError, match="reward has NaN"):
        calibrated_reward(torch.full((K,), math.nan, dtype=F64), pool)
    with pytest.raises(ValueError, match="transform"):
        infalign_transform(REWARDS, "exp")
    for bad_t in (0.0, -1.0, math.inf, True):
        with pytest.raises(ValueError, match="t must be"):
            infalign_transform(REWARDS, "bon", t=bad_t)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="beta"):
        calibrated_bon_tradeoff("bon", 0.0, 4)
    with pytest.raises(ValueError, match="n must be"):
        calibrated_bon_tradeoff("bon", 1.0, 0)
    # extreme but valid: huge t with large β stays finite
    kl, wr = calibrated_bon_tradeoff("bon", 1e15, 8, t=40.0)
    assert math.isfinite(kl) and math.isfinite(wr)


def _beta_for_kl_continuous(transform: str, t: float, n: int, kl: float) -> float:
    lo, hi = math.log(1e-4), math.log(1e12)
    for _ in range(100):
        mid = (lo + hi) / 2
        if calibrated_bon_tradeoff(transform, math.exp(mid), n, t=t, grid=2000)[0] > kl:
            lo = mid
        else:
            hi = mid
    return math.exp((lo + hi) / 2)


def test_exponential_transform_gain_in_the_continuous_model() -> None:
    """Model-free (C ∼ U(0,1)) Best-of-N win rates at KL(π*‖π_ref) = 1: identity against exp(t·C), t = 5, 10, 20.
    The gain grows with N and so does the best t (see docs/bon_family.md for the table)."""
    gains = {}
    for n in (2, 4, 8):
        rate = {}
        for tr, t in (("identity", 1.0), ("bon", 5.0), ("bon", 10.0), ("bon", 20.0)):
            beta = _beta_for_kl_continuous(tr, t, n, 1.0)
            kl, rate[t if tr == "bon" else 0.0] = calibrated_bon_tradeoff(tr, beta, n, t=t, grid=2000)
            assert kl == pytest.approx(1.0, abs=1e-9)
        print(n, {k: round(v, 6) for k, v in rate.items()})
        best = max(rate[5.0], rate[10.0], rate[20.0])
        gains[n] = best - rate[0.0]
        assert rate[5.0] > rate[0.0]
    assert 0.015 < gains[2] < gains[4] < gains[8], gains


# ----------------------------------------------------------------------------------------------------------
# the comparison table of docs/bon_family.md (run with -s to print it)
# ----------------------------------------------------------------------------------------------------------


def _qrpo_fixed_point(n: int, quantile: str) -> torch.Tensor:
    """Minimiser of the population QRPO loss (data ∼ π_ref, exact pool, T = log, β = 1/(N−1))."""
    pool = POOL.expand(K, -1)

    def pop(theta: torch.Tensor) -> torch.Tensor:
        s = BestOfNSamples(torch.log_softmax(theta, 0), torch.log(REF), REWARDS, pool)
        return (REF * qrpo(s, beta=1.0 / (n - 1), transform="log", quantile=quantile).loss).sum()

    return torch.softmax(lbfgs_argmin(pop, torch.zeros(K, dtype=F64)), 0)


def test_tv_table_of_the_best_of_n_family() -> None:
    """TV from each method's fixed point (closed form, or L-BFGS on the exact population loss) to π_BoN."""
    p_lt, _ = quantiles(REF, REWARDS)
    c = exact_c(REF, REWARDS)
    rows: dict[str, list[float | None]] = {}
    for n in (2, 4, 8):
        bon = bon_distribution(REF, REWARDS, n)
        kl_bon = float(kl_categorical(bon, REF))
        targets: dict[str, torch.Tensor | None] = {
            "bond": practical_bond_target(REF, REWARDS, n),
            "jbond": tilted(REF, jbond_expected_reward(REF, REWARDS), 1.0) if n == 2 else None,
            "vbon_exact": tilted(REF, vbon_log_ratio(p_lt, torch.log(REF), n), 1.0),
            "vbon_bound": tilted(REF, (n - 1) * torch.log(p_lt.clamp(min=0.5 / K_POOL)), 1.0),
            "qrpo_le": _qrpo_fixed_point(n, "le"),
            "qrpo_mid": _qrpo_fixed_point(n, "mid"),
        }
        for name, phi in (("infalign_identity", c), ("infalign_exp5", torch.exp(5.0 * c))):
            pi = tilted(REF, phi, beta_for_kl(phi, kl_bon))  # matched KL: KL(π*‖π_ref) = KL(π_BoN‖π_ref)
            targets[name] = pi
        for name, pi in targets.items():
            rows.setdefault(name, []).append(None if pi is None else tv(pi, bon))
    print("\n| method | TV, N = 2 | TV, N = 4 | TV, N = 8 |")
    for name, vals in rows.items():
        print(f"| {name} | " + " | ".join("—" if v is None else f"{v:.4f}" for v in vals) + " |")
    assert all(v is not None and v < 1e-12 for v in rows["vbon_exact"])  # exact BoN
    for name in ("bond", "vbon_bound", "qrpo_le", "infalign_identity", "infalign_exp5"):
        assert all(v is not None and v > 1e-3 for v in rows[name]), name  # none of these is exact on K = 6
    assert rows["jbond"][0] is not None and rows["jbond"][0] > 1e-3
    # QRPO (T = log, β = 1/(N−1)) with the mid-rank quantile is exact at N = 2 on any categorical:
    # π_Bo2 = π_ref·((F + π_ref)² − F²)/π_ref = 2·C·π_ref and Z = 1/2 = E_ref[C]; not beyond N = 2
    q_mid = rows["qrpo_mid"]
    assert q_mid[0] is not None and q_mid[0] < 1e-9, q_mid
    assert all(v is not None and v > 1e-3 for v in q_mid[1:]), q_mid


def test_gradcheck_float64() -> None:
    """Φ is differentiable in C (the calibration itself is an indicator count and carries no gradient)."""
    c = torch.tensor([0.05, 0.3, 0.5, 0.9], dtype=F64, requires_grad=True)
    for transform, t in TRANSFORMS:
        assert torch.autograd.gradcheck(lambda x, tr=transform, tt=t: infalign_transform(x, tr, t=tt), (c,))
    assert not calibrated_reward(REWARDS, POOL.expand(K, -1)).requires_grad
