"""Tests for the BOND / J-BOND losses on a categorical policy over K items (a one-token language model).

Exact expectations: the batch enumerates every (policy sample, Best-of-N sample[, anchor pair]) with its
probability as a (detached) weight, so the weighted surrogate's gradient is the *exact* expected gradient of
the estimator. Exact quantiles: reference probabilities are multiples of 1/k and the quantile pool repeats
each item's reward ``k·π_ref(y)`` times, so the empirical CDF of the pool is the true CDF.
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
    jbond_expected_reward,
    jeffreys_divergence,
    kl_categorical,
    practical_bond_target,
    quantiles,
)
from prefopt.losses.bond import bond, jbond
from prefopt.policy import ema_update_
from prefopt.registry import available_losses, get_loss
from prefopt.sampling import best_of_n
from prefopt.testing import lbfgs_argmin
from prefopt.types import BestOfNSamples

F64 = torch.float64

# the categorical test problem: K = 6 items, π_ref = counts / k with k = 20 (exact pool), distinct rewards
COUNTS = torch.tensor([2, 5, 1, 4, 3, 5])
K_POOL = 20
REF = COUNTS.to(F64) / K_POOL
REWARDS = torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0, 5.0], dtype=F64)
POOL = torch.repeat_interleave(REWARDS, COUNTS)  # (20,): its empirical CDF is exactly p_≤ under REF
K = 6
TRIPLES = torch.tensor(list(itertools.product(range(K), repeat=3)))  # (y, y'_1, y'_2) for J-BOND


def tv(p: torch.Tensor, q: torch.Tensor) -> float:
    return 0.5 * float((p - q).abs().sum())


def exact_bond_objective_surrogate(theta: torch.Tensor, n: int, beta: float) -> torch.Tensor:
    """E_{y~π_θ, y*~BoN_N(π_ref)}[bond loss] by enumerating the K×K pairs (weights detached)."""
    logp_all = torch.log_softmax(theta, 0)
    pi = logp_all.exp().detach()
    bon = bon_distribution(REF, REWARDS, n)
    i, j = (t.reshape(-1) for t in torch.meshgrid(torch.arange(K), torch.arange(K), indexing="ij"))
    out = bond(
        BestOfNSamples(logp_all[i], torch.log(REF)[i], REWARDS[i], POOL.expand(K * K, -1), logp_all[j]),
        n=n,
        backward_weight=beta,
        baseline="none",
    )
    return (pi[i] * bon[j] * out.loss).sum()


def closed_form_bond_objective(theta: torch.Tensor, n: int, beta: float) -> torch.Tensor:
    """(1−β)·KL(π_BoN‖π_θ) + β·KL(π_θ‖π̃),  π̃ ∝ π_ref·p_≤^{N−1}."""
    pi = torch.softmax(theta, 0)
    return (1 - beta) * kl_categorical(bon_distribution(REF, REWARDS, n), pi) + beta * kl_categorical(
        pi, practical_bond_target(REF, REWARDS, n)
    )


def minimize(fn, theta0: torch.Tensor, steps: int, lr: float) -> torch.Tensor:  # type: ignore[no-untyped-def]
    theta = theta0.clone().requires_grad_(True)
    opt = torch.optim.Adam([theta], lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        fn(theta).backward()
        opt.step()
    return theta.detach()


# ----------------------------------------------------------------------------------------------------------
# registry, hand-computed values, gradients
# ----------------------------------------------------------------------------------------------------------


def test_registered_in_bond_family() -> None:
    assert {"bond", "jbond"} <= set(available_losses("bond"))
    assert get_loss("bond").hparams == {
        "n": 8,
        "backward_weight": 0.5,
        "quantile_floor": "half",
        "baseline": "loo",
    }
    assert get_loss("jbond").hparams == {
        "backward_weight": 0.5,
        "gamma": 0.0,
        "strict": True,
        "baseline": "loo",
    }


def test_bond_hand_computed_example() -> None:
    logp = torch.tensor([-1.0, -2.0], dtype=F64)
    ref_logp = torch.tensor([-1.5, -1.0], dtype=F64)
    reward = torch.tensor([2.0, 0.0], dtype=F64)
    ref_rewards = torch.tensor([[1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0]], dtype=F64)
    best_logp = torch.tensor([-0.5, -0.7], dtype=F64)
    out = bond(BestOfNSamples(logp, ref_logp, reward, ref_rewards, best_logp), n=3, backward_weight=0.5)
    # quantiles 2/4 and (floor) 1/8; returns R = 2·log q − (logp − ref_logp); LOO baseline = the other R
    r0 = 2 * math.log(0.5) - 0.5
    r1 = 2 * math.log(1 / 8) + 1.0
    expected = [0.5 * 0.5 + 0.5 * (-(r0 - r1) * -1.0), 0.5 * 0.7 + 0.5 * (-(r1 - r0) * -2.0)]
    assert out.loss.tolist() == pytest.approx(expected, rel=1e-14)
    assert out.metrics["bond/return"].tolist() == pytest.approx([r0, r1], rel=1e-14)
    assert out.metrics["bond/log_quantile"].tolist() == pytest.approx([math.log(0.5), math.log(1 / 8)])
    assert out.metrics["kl/ref"].tolist() == [0.5, -1.0]
    assert out.metrics["kl/bon_backward"].tolist() == pytest.approx([-r0, -r1])
    assert out.metrics["loss/forward"].tolist() == [0.5, 0.7]
    for value in out.metrics.values():
        assert value.shape == (2,) and not value.requires_grad


def test_jbond_hand_computed_example() -> None:
    logp = torch.tensor([-1.0, -2.0, -0.5], dtype=F64)
    anchor_logp = torch.tensor([-1.2, -1.0, -0.5], dtype=F64)
    reward = torch.tensor([0.0, 1.0, 3.0], dtype=F64)
    anchor_rewards = torch.tensor([[1.0, 2.0], [1.0, 0.5], [3.0, 4.0]], dtype=F64)
    best = torch.tensor([-0.3, -0.4, -0.6], dtype=F64)
    out = jbond(
        BestOfNSamples(logp, anchor_logp, reward, anchor_rewards, best), backward_weight=0.25, gamma=2.0
    )
    r_j = [-LOG16, 0.0, 0.0]  # 0 < min(1, 2); 1 ≥ 0.5; 3 is not < 3 (strict)
    kl = [0.2, -1.0, 0.0]
    ret = [a - b for a, b in zip(r_j, kl)]
    base = [(sum(ret) - r) / 2 for r in ret]
    expected = [
        0.75 * -bl + 0.25 * (-(r - b) * lp) + 2.0 * k * lp
        for bl, r, b, lp, k in zip(best.tolist(), ret, base, logp.tolist(), kl)
    ]
    assert out.loss.tolist() == pytest.approx(expected, rel=1e-13)
    assert out.metrics["jbond/reward"].tolist() == pytest.approx(r_j)
    out_ns = jbond(BestOfNSamples(logp, anchor_logp, reward, anchor_rewards, best), strict=False)
    assert out_ns.metrics["jbond/reward"].tolist() == pytest.approx([-LOG16, 0.0, -LOG16])


def test_bond_gradient_is_the_stated_estimator() -> None:
    g = torch.Generator().manual_seed(0)
    b, k = 5, 7
    logp = (-5 * torch.rand(b, generator=g, dtype=F64)).requires_grad_(True)
    ref_logp = (-5 * torch.rand(b, generator=g, dtype=F64)).requires_grad_(True)
    best_logp = (-5 * torch.rand(b, generator=g, dtype=F64)).requires_grad_(True)
    reward = torch.randn(b, generator=g, dtype=F64)
    ref_rewards = torch.randn(b, k, generator=g, dtype=F64)
    beta, n = 0.3, 4
    out = bond(BestOfNSamples(logp, ref_logp, reward, ref_rewards, best_logp), n=n, backward_weight=beta)
    g_logp, g_ref, g_best = torch.autograd.grad(
        out.loss.sum(), (logp, ref_logp, best_logp), allow_unused=True
    )
    # oracle: the estimator written out per example with a Python loop (LOO baseline over the others)
    counts = [sum(1 for v in ref_rewards[i].tolist() if v <= reward[i]) for i in range(b)]
    ret = [
        (n - 1) * math.log(max(c / k, 1 / (2 * k))) - float((logp[i] - ref_logp[i]).detach())
        for i, c in enumerate(counts)
    ]
    adv = [ret[i] - (sum(ret) - ret[i]) / (b - 1) for i in range(b)]
    torch.testing.assert_close(g_logp, torch.tensor([-beta * a for a in adv], dtype=F64))
    assert g_ref is None or bool((g_ref == 0).all())  # the reference only enters the (detached) return
    torch.testing.assert_close(g_best, torch.full((b,), -(1 - beta), dtype=F64))


def test_jbond_gradient_is_the_stated_estimator() -> None:
    g = torch.Generator().manual_seed(1)
    b = 6
    logp = (-3 * torch.rand(b, generator=g, dtype=F64)).requires_grad_(True)
    anchor_logp = (-3 * torch.rand(b, generator=g, dtype=F64)).requires_grad_(True)
    best = (-3 * torch.rand(b, generator=g, dtype=F64)).requires_grad_(True)
    reward = torch.randint(0, 3, (b,), generator=g).to(F64)
    anchor_rewards = torch.randint(0, 3, (b, 2), generator=g).to(F64)
    beta, gamma = 0.6, 0.7
    out = jbond(
        BestOfNSamples(logp, anchor_logp, reward, anchor_rewards, best), backward_weight=beta, gamma=gamma
    )
    g_logp, g_anchor, g_best = torch.autograd.grad(
        out.loss.sum(), (logp, anchor_logp, best), allow_unused=True
    )
    r_j = [-LOG16 if reward[i] < anchor_rewards[i].min() else 0.0 for i in range(b)]
    kl = [float((logp[i] - anchor_logp[i]).detach()) for i in range(b)]
    ret = [r - d for r, d in zip(r_j, kl)]
    adv = [ret[i] - (sum(ret) - ret[i]) / (b - 1) for i in range(b)]
    torch.testing.assert_close(
        g_logp, torch.tensor([-beta * a + gamma * d for a, d in zip(adv, kl)], dtype=F64)
    )
    assert g_anchor is None or bool((g_anchor == 0).all())
    torch.testing.assert_close(g_best, torch.full((b,), -(1 - beta), dtype=F64))


def test_gradcheck_float64() -> None:
    g = torch.Generator().manual_seed(2)
    b, k = 4, 5
    logp = -torch.rand(b, generator=g, dtype=F64)
    ref_logp = -torch.rand(b, generator=g, dtype=F64)
    reward = torch.randn(b, generator=g, dtype=F64)
    ref_rewards = torch.randn(b, k, generator=g, dtype=F64)
    best = (-torch.rand(b, generator=g, dtype=F64)).requires_grad_(True)
    anchor_rewards = torch.randn(b, 2, generator=g, dtype=F64)
    # inputs without a stop-gradient path: best_logp (any β) and logp at β = 0
    assert torch.autograd.gradcheck(
        lambda x: bond(BestOfNSamples(logp, ref_logp, reward, ref_rewards, x), n=4).loss, (best,)
    )
    assert torch.autograd.gradcheck(
        lambda x: jbond(BestOfNSamples(logp, ref_logp, reward, anchor_rewards, x), gamma=1.0).loss, (best,)
    )
    lp = logp.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda x: (
            bond(BestOfNSamples(x, ref_logp, reward, ref_rewards, best.detach()), backward_weight=0.0).loss
        ),
        (lp,),
    )
    # the closed-form objectives the surrogates' expected gradients are compared with (tests below)
    theta = torch.randn(K, generator=g, dtype=F64).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: closed_form_bond_objective(t, 4, 0.3), (theta,))
    assert torch.autograd.gradcheck(lambda t: closed_form_jbond_objective(t, REF, 0.5, 1.0, True), (theta,))


# ----------------------------------------------------------------------------------------------------------
# exact expected gradients (enumeration) == gradients of the closed-form divergences
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [2, 4])
@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_bond_expected_gradient_is_jeffreys_gradient(n: int, beta: float) -> None:
    theta = torch.randn(K, generator=torch.Generator().manual_seed(n), dtype=F64).requires_grad_(True)
    (g_sur,) = torch.autograd.grad(exact_bond_objective_surrogate(theta, n, beta), theta)
    (g_exact,) = torch.autograd.grad(closed_form_bond_objective(theta, n, beta), theta)
    torch.testing.assert_close(g_sur, g_exact, rtol=1e-10, atol=1e-13)
    assert float(g_exact.abs().max()) > 1e-3  # not a vacuous comparison
    # with the *exact* r_BOND (term (B) kept) the backward target would be π_BoN itself: the practical
    # surrogate's gradient differs from ∇KL(π‖π_BoN) (except at n where (B) is constant: never for n ≥ 2)
    if beta == 1.0:
        pi = torch.softmax(theta, 0)
        (g_bon,) = torch.autograd.grad(kl_categorical(pi, bon_distribution(REF, REWARDS, n)), theta)
        assert float((g_sur - g_bon).abs().max()) > 1e-3


def closed_form_jbond_objective(
    theta: torch.Tensor, anchor: torch.Tensor, beta: float, gamma: float, strict: bool
) -> torch.Tensor:
    """(1−β)·KL(BoN_2(π_a)‖π) + β·KL(π‖π̃_J) + γ·KL(π‖π_a), π̃_J ∝ π_a·exp(−log16·(1−p)²)."""
    pi = torch.softmax(theta, 0)
    tilt = anchor * torch.exp(jbond_expected_reward(anchor, REWARDS, strict=strict))
    tilt = tilt / tilt.sum()
    return (
        (1 - beta) * kl_categorical(bon_distribution(anchor, REWARDS, 2), pi)
        + beta * kl_categorical(pi, tilt)
        + gamma * kl_categorical(pi, anchor)
    )


def exact_jbond_surrogate(
    theta: torch.Tensor, anchor_logits: torch.Tensor, beta: float, gamma: float, strict: bool = True
) -> torch.Tensor:
    """E_{y~π, y'_1,y'_2~π_a}[jbond loss] by enumerating the K³ triples (weights detached)."""
    logp_all = torch.log_softmax(theta, 0)
    pi = logp_all.exp().detach()
    log_a = torch.log_softmax(anchor_logits, 0).detach()
    pa = log_a.exp()
    y, a1, a2 = TRIPLES[:, 0], TRIPLES[:, 1], TRIPLES[:, 2]
    best = torch.where(REWARDS[a2] > REWARDS[a1], a2, a1)  # first occurrence wins ties
    anchor_rewards = torch.stack([REWARDS[a1], REWARDS[a2]], dim=1)
    out = jbond(
        BestOfNSamples(logp_all[y], log_a[y], REWARDS[y], anchor_rewards, logp_all[best]),
        backward_weight=beta,
        gamma=gamma,
        strict=strict,
        baseline="none",
    )
    return (pi[y] * pa[a1] * pa[a2] * out.loss).sum()


@pytest.mark.parametrize(("beta", "gamma", "strict"), [(0.5, 0.0, True), (0.2, 1.5, True), (1.0, 0.5, False)])
def test_jbond_expected_gradient_matches_closed_form(beta: float, gamma: float, strict: bool) -> None:
    g = torch.Generator().manual_seed(3)
    theta = torch.randn(K, generator=g, dtype=F64).requires_grad_(True)
    anchor_logits = torch.randn(K, generator=g, dtype=F64)
    (g_sur,) = torch.autograd.grad(exact_jbond_surrogate(theta, anchor_logits, beta, gamma, strict), theta)
    anchor = torch.softmax(anchor_logits, 0)
    (g_exact,) = torch.autograd.grad(closed_form_jbond_objective(theta, anchor, beta, gamma, strict), theta)
    torch.testing.assert_close(g_sur, g_exact, rtol=1e-10, atol=1e-13)
    assert float(g_exact.abs().max()) > 1e-3


# ----------------------------------------------------------------------------------------------------------
# convergence of the categorical policy
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_bond_training_converges_to_its_stated_fixed_point(beta: float) -> None:
    n = 4
    theta0 = torch.log(REF)  # start at the reference, as BOND does
    trained = torch.softmax(
        minimize(lambda t: exact_bond_objective_surrogate(t, n, beta), theta0, 600, 0.05), 0
    )
    bon = bon_distribution(REF, REWARDS, n)
    practical = practical_bond_target(REF, REWARDS, n)
    # the fixed point: argmin (1−β)·KL(π_BoN‖π) + β·KL(π‖π̃), found independently by L-BFGS on the closed form
    oracle = torch.softmax(lbfgs_argmin(lambda t: closed_form_bond_objective(t, n, beta), theta0), 0)
    if beta == 0.0:
        torch.testing.assert_close(oracle, bon, rtol=0, atol=1e-8)
    if beta == 1.0:
        torch.testing.assert_close(oracle, practical, rtol=0, atol=1e-8)
    assert tv(trained, oracle) < 1e-3
    assert tv(trained, torch.softmax(theta0, 0)) > 0.1  # it did move
    # how far the practical fixed point is from Best-of-N here (term (B) dropped): TV(π̃, π_BoN)
    gap = tv(practical, bon)
    assert 0.01 < gap < 0.2, gap
    if beta == 0.0:
        assert tv(trained, bon) <= 0.03
    else:
        assert tv(trained, bon) > 0.01 * beta  # genuinely not π_BoN


@pytest.mark.slow
def test_bond_sampled_training_with_loo_baseline_converges() -> None:
    """Seeded Monte-Carlo run: y ~ π_θ, y* from best_of_n on π_ref, exact quantile pool, LOO baseline."""
    n, beta, b = 4, 0.5, 256
    gen = torch.Generator().manual_seed(7)
    theta = torch.log(REF).clone().requires_grad_(True)
    opt = torch.optim.Adam([theta], lr=0.02)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 if s < 300 else 0.2)

    def ref_sampler(prompts: list[object]) -> torch.Tensor:
        return torch.multinomial(REF, len(prompts), replacement=True, generator=gen)

    def score(_prompts: list[object], samples: torch.Tensor) -> torch.Tensor:
        return REWARDS[samples]

    avg = torch.zeros(K, dtype=F64)
    steps, tail = 500, 100
    for step in range(steps):
        logp_all = torch.log_softmax(theta, 0)
        y = torch.multinomial(logp_all.exp().detach(), b, replacement=True, generator=gen)
        star = best_of_n(ref_sampler, score, [None] * b, n).best
        out = bond(
            BestOfNSamples(logp_all[y], torch.log(REF)[y], REWARDS[y], POOL.expand(b, -1), logp_all[star]),
            n=n,
            backward_weight=beta,
        )
        opt.zero_grad()
        out.loss.mean().backward()
        opt.step()
        sched.step()
        if step >= steps - tail:
            avg += torch.softmax(theta.detach(), 0) / tail
    oracle = torch.softmax(lbfgs_argmin(lambda t: closed_form_bond_objective(t, n, beta), torch.log(REF)), 0)
    print(f"sampled BOND: TV(avg policy, fixed point) = {tv(avg, oracle):.4f}")
    assert tv(avg, oracle) <= 0.03, tv(avg, oracle)


def expected_ref_quantile(pi: torch.Tensor) -> float:
    """E_{y~π}[p_≤(y)] with p_≤ under π_ref: the reward quantile the paper plots."""
    _, le = quantiles(REF, REWARDS)
    return float((pi * le).sum())


@pytest.mark.slow
def test_jbond_with_ema_anchor_beats_best_of_4() -> None:
    beta, gamma, eta, lr = 0.5, 0.0, 0.05, 0.05
    theta = torch.log(REF).clone().requires_grad_(True)
    anchor = theta.detach().clone()  # anchor logits; EMA of the policy logits (the paper EMAs weights)
    opt = torch.optim.Adam([theta], lr=lr)
    bo4 = expected_ref_quantile(bon_distribution(REF, REWARDS, 4))
    bo2 = expected_ref_quantile(bon_distribution(REF, REWARDS, 2))
    history = []
    for _ in range(120):
        opt.zero_grad()
        exact_jbond_surrogate(theta, anchor, beta, gamma).backward()
        opt.step()
        ema_update_(anchor, theta.detach(), decay=1 - eta)
        history.append(expected_ref_quantile(torch.softmax(theta.detach(), 0)))
    assert history[-1] > bo4 > bo2
    first_past_bo2 = next(i for i, v in enumerate(history) if v > bo2)
    assert first_past_bo2 < next(i for i, v in enumerate(history) if v > bo4)


@pytest.mark.slow
def test_jbond_with_fixed_anchor_stops_near_best_of_2() -> None:
    """η = 0: the anchor stays π_ref and the policy converges to the fixed point of the J-BOND objective
    with N = 2, which cannot pass Best-of-4 on this problem."""
    beta = 0.5
    theta0 = torch.log(REF)
    anchor = theta0.clone()
    theta = theta0.clone().requires_grad_(True)
    opt = torch.optim.Adam([theta], lr=0.05)
    for _ in range(250):
        opt.zero_grad()
        exact_jbond_surrogate(theta, anchor, beta, 0.0).backward()
        opt.step()
        ema_update_(anchor, theta.detach(), decay=1.0)
    assert torch.equal(anchor, theta0)
    oracle = torch.softmax(
        lbfgs_argmin(lambda t: closed_form_jbond_objective(t, REF, beta, 0.0, True), theta0), 0
    )
    trained = torch.softmax(theta.detach(), 0)
    assert tv(trained, oracle) < 2e-3
    assert expected_ref_quantile(trained) < expected_ref_quantile(bon_distribution(REF, REWARDS, 4))


# ----------------------------------------------------------------------------------------------------------
# properties: dtypes, extremes, batch splitting
# ----------------------------------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    b=st.integers(2, 6),
    k=st.integers(2, 6),
    scale=st.sampled_from([1e-3, 1.0, 1e4]),
    dtype=st.sampled_from([torch.float64, torch.float32, torch.bfloat16, torch.float16]),
    beta=st.sampled_from([0.0, 0.5, 1.0]),
    n=st.integers(1, 16),
    seed=st.integers(0, 10_000),
)
def test_bond_properties_and_loop_oracle(
    b: int, k: int, scale: float, dtype: torch.dtype, beta: float, n: int, seed: int
) -> None:
    g = torch.Generator().manual_seed(seed)
    logp = (-scale * torch.rand(b, generator=g, dtype=F64)).to(dtype)  # down to −1e4
    ref_logp = (-scale * torch.rand(b, generator=g, dtype=F64)).to(dtype)
    best = (-scale * torch.rand(b, generator=g, dtype=F64)).to(dtype)
    reward = torch.randn(b, generator=g).to(dtype)
    ref_rewards = torch.randn(b, k, generator=g).to(dtype)
    out = bond(BestOfNSamples(logp, ref_logp, reward, ref_rewards, best), n=n, backward_weight=beta)
    assert out.loss.shape == (b,)
    assert out.loss.dtype == (F64 if dtype == F64 else torch.float32)  # half precision is upcast
    assert bool(torch.isfinite(out.loss).all())
    # oracle: Python loop over examples, in float64 on the same (rounded) inputs
    lp, rl, bl = logp.double().tolist(), ref_logp.double().tolist(), best.double().tolist()
    rw, rr = reward.float().tolist(), ref_rewards.float().tolist()
    ret = []
    for i in range(b):
        c = sum(1 for v in rr[i] if v <= rw[i])
        ret.append((n - 1) * math.log(max(c / k, 1 / (2 * k))) - (lp[i] - rl[i]))
    expected = [
        (1 - beta) * -bl[i] + beta * -(ret[i] - (sum(ret) - ret[i]) / (b - 1)) * lp[i] for i in range(b)
    ]
    # float32 rounding of the terms: |best| ≤ scale, |adv| ≤ 2·max|R| ≤ 2·((n−1)·log 2k + 2·scale), |logp| ≤ scale
    tol = 1e-10 if dtype == F64 else 1e-5  # ~100× the unit roundoff of the computing dtype
    magnitude = scale + 2 * ((n - 1) * math.log(2 * k) + 2 * scale) * scale
    torch.testing.assert_close(
        out.loss.double(), torch.tensor(expected, dtype=F64), rtol=0, atol=tol * magnitude
    )


def test_split_batch_equals_whole_batch_without_baseline() -> None:
    g = torch.Generator().manual_seed(4)
    b, k = 8, 5
    args = (
        -torch.rand(b, generator=g),
        -torch.rand(b, generator=g),
        torch.randn(b, generator=g),
        torch.randn(b, k, generator=g),
        -torch.rand(b, generator=g),
    )
    whole = bond(BestOfNSamples(*args), n=4, baseline="none").loss
    halves = torch.cat(
        [
            bond(BestOfNSamples(*(a[:3] for a in args)), n=4, baseline="none").loss,
            bond(BestOfNSamples(*(a[3:] for a in args)), n=4, baseline="none").loss,
        ]
    )
    torch.testing.assert_close(whole, halves, rtol=0, atol=0)


def test_jeffreys_endpoints_through_the_loss() -> None:
    g = torch.Generator().manual_seed(5)
    b = 4
    args = (
        -torch.rand(b, generator=g),
        -torch.rand(b, generator=g),
        torch.randn(b, generator=g),
        torch.randn(b, 3, generator=g),
        -torch.rand(b, generator=g),
    )
    out0 = bond(BestOfNSamples(*args), backward_weight=0.0)
    out1 = bond(BestOfNSamples(*args), backward_weight=1.0)
    torch.testing.assert_close(out0.loss, out0.metrics["loss/forward"], rtol=0, atol=0)
    torch.testing.assert_close(out1.loss, out1.metrics["loss/backward"], rtol=0, atol=0)
    out_mid = bond(BestOfNSamples(*args), backward_weight=0.25)
    torch.testing.assert_close(out_mid.loss, 0.75 * out0.loss + 0.25 * out1.loss)


def test_jeffreys_divergence_at_target_is_zero_and_positive_elsewhere() -> None:
    bon = bon_distribution(REF, REWARDS, 4)
    assert float(jeffreys_divergence(bon, bon, backward_weight=0.5)) == 0.0
    assert float(jeffreys_divergence(REF, bon, backward_weight=0.5)) > 0.0


# ----------------------------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------------------------


def _bond_args(b: int = 3, k: int = 4) -> list[torch.Tensor]:
    return [-torch.rand(b), -torch.rand(b), torch.randn(b), torch.randn(b, k), -torch.rand(b)]


@pytest.mark.parametrize(
    ("index", "bad", "match"),
    [
        (0, torch.zeros(3, 1), "logp must have 1"),
        (1, torch.zeros(2), "ref_logp has shape"),
        (2, torch.zeros(2), "reward has shape"),
        (3, torch.zeros(2, 4), "ref_rewards has shape"),
        (3, torch.zeros(3, 1), "at least 2 reference samples"),
        (4, torch.zeros(4), "best_logp has shape"),
        (2, torch.tensor([0.0, float("nan"), 1.0]), "reward has 1 NaN"),
        (3, torch.full((3, 4), float("nan")), "ref_rewards has 12 NaN"),
    ],
)
def test_bond_bad_input(index: int, bad: torch.Tensor, match: str) -> None:
    args = _bond_args()
    args[index] = bad
    with pytest.raises(ValueError, match=match):
        bond(BestOfNSamples(*args))


@pytest.mark.parametrize(
    ("hparams", "match"),
    [
        ({"n": 0}, "n=0"),
        ({"n": 2.5}, "n=2.5"),
        ({"n": True}, "n=True"),
        ({"backward_weight": -0.1}, "backward_weight"),
        ({"backward_weight": float("nan")}, "backward_weight"),
        ({"quantile_floor": "zero"}, "quantile_floor"),
        ({"quantile_floor": 0.0}, "quantile_floor"),
        ({"baseline": "mean"}, "baseline"),
    ],
)
def test_bond_bad_hyperparameters(hparams: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        get_loss("bond", **hparams)
    with pytest.raises(ValueError, match=match):
        bond(BestOfNSamples(*_bond_args()), **hparams)


def test_bad_input_misc() -> None:
    with pytest.raises(ValueError, match=r"unknown hyperparameter.*temperature"):
        get_loss("bond", temperature=1.0)
    with pytest.raises(ValueError, match="baseline='loo' needs at least 2"):
        bond(BestOfNSamples(*_bond_args(b=1)))
    assert bond(BestOfNSamples(*_bond_args(b=1)), baseline="none").loss.shape == (1,)
    args = _bond_args()
    args[0] = torch.tensor([0.0, float("nan"), -1.0])
    with pytest.raises(ValueError, match="logp has 1 non-finite"):
        bond(BestOfNSamples(*args), check_finite=True)
    with pytest.raises(TypeError, match=r"logp must be a torch\.Tensor"):
        bond(BestOfNSamples([0.0], *_bond_args()[1:]))
    j = [-torch.rand(3), -torch.rand(3), torch.randn(3), torch.randn(3, 2), -torch.rand(3)]
    assert jbond(BestOfNSamples(*j)).loss.shape == (3,)
    for index, bad, match in [
        (1, torch.zeros(2), "ref_logp has shape"),
        (3, torch.zeros(3, 3), "anchor_rewards must have shape"),
        (4, torch.zeros(2), "best_logp has shape"),
        (2, torch.tensor([float("nan"), 0.0, 0.0]), "reward has 1 NaN"),
    ]:
        bad_args = list(j)
        bad_args[index] = bad
        with pytest.raises(ValueError, match=match):
            jbond(BestOfNSamples(*bad_args))
    for hparams, match in [
        ({"gamma": -1.0}, "gamma"),
        ({"strict": "yes"}, "strict"),
        ({"backward_weight": 2}, "backward_weight"),
    ]:
        with pytest.raises(ValueError, match=match):
            get_loss("jbond", **hparams)
