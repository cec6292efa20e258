"""Tests for prefopt.rl: GAE, RLOO / group advantages, whitening, KL estimators, KL-penalized rewards."""

from __future__ import annotations

import math
import statistics

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from prefopt import rl
from prefopt.masked import masked_whiten

F64 = torch.float64


# ----------------------------------------------------------------------------------------------------------
# helpers / oracles
# ----------------------------------------------------------------------------------------------------------


def random_mask(b: int, t: int, gen: torch.Generator, kind: str) -> torch.Tensor:
    """Right-padded, left-padded or holey bool masks with at least one valid token per row."""
    mask = torch.zeros(b, t, dtype=torch.bool)
    for i in range(b):
        n = int(torch.randint(1, t + 1, (1,), generator=gen))
        if kind == "right":
            mask[i, :n] = True
        elif kind == "left":
            mask[i, t - n :] = True
        else:
            mask[i] = torch.rand(t, generator=gen) < 0.6
            mask[i, int(torch.randint(0, t, (1,), generator=gen))] = True
    return mask


def gae_oracle(rewards, values, mask, gamma, lam):
    """Per row, slice out the valid tokens and apply the textbook double sum Σ_l (γλ)^l δ_{t+l}."""
    b, t = rewards.shape
    adv = torch.zeros(b, t, dtype=F64)
    for i in range(b):
        idx = [j for j in range(t) if mask[i, j]]
        r = [float(rewards[i, j]) for j in idx]
        v = [float(values[i, j]) for j in idx]
        n = len(idx)
        deltas = [r[s] + gamma * (v[s + 1] if s + 1 < n else 0.0) - v[s] for s in range(n)]
        for s in range(n):
            adv[i, idx[s]] = sum((gamma * lam) ** k * deltas[s + k] for k in range(n - s))
    return adv


# ----------------------------------------------------------------------------------------------------------
# GAE
# ----------------------------------------------------------------------------------------------------------


def test_gae_hand_derived():
    r = torch.tensor([[0.0, 0.0, 1.0]], dtype=F64)
    v = torch.tensor([[0.5, 0.2, 0.3]], dtype=F64)
    m = torch.ones(1, 3, dtype=torch.bool)
    adv, ret = rl.gae(r, v, m, gamma=0.9, lam=0.8)
    # δ2 = 1 − .3 = .7 ; δ1 = .9·.3 − .2 = .07 ; δ0 = .9·.2 − .5 = −.32 ; γλ = .72
    a2, a1 = 0.7, 0.07 + 0.72 * 0.7
    a0 = -0.32 + 0.72 * a1
    torch.testing.assert_close(adv, torch.tensor([[a0, a1, a2]], dtype=F64), rtol=0, atol=1e-12)
    torch.testing.assert_close(ret, adv + v, rtol=0, atol=1e-12)


@pytest.mark.parametrize("kind", ["right", "left", "holes"])
@pytest.mark.parametrize(("gamma", "lam"), [(1.0, 0.95), (0.9, 0.7), (0.5, 0.0), (1.0, 1.0), (0.0, 0.3)])
def test_gae_matches_loop_oracle(kind, gamma, lam):
    gen = torch.Generator().manual_seed(
        1000 * ["right", "left", "holes"].index(kind) + int(100 * gamma + 10 * lam)
    )
    b, t = 4, 7
    rewards = torch.randn(b, t, generator=gen, dtype=F64)
    values = torch.randn(b, t, generator=gen, dtype=F64)
    mask = random_mask(b, t, gen, kind)
    adv, ret = rl.gae(rewards, values, mask, gamma=gamma, lam=lam)
    expected = gae_oracle(rewards, values, mask, gamma, lam)
    torch.testing.assert_close(adv, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ret, torch.where(mask, expected + values, 0.0), rtol=1e-12, atol=1e-12)
    assert (adv[~mask] == 0).all() and (ret[~mask] == 0).all()


def test_gae_lambda0_is_td_error():
    gen = torch.Generator().manual_seed(1)
    r = torch.randn(3, 6, generator=gen, dtype=F64)
    v = torch.randn(3, 6, generator=gen, dtype=F64)
    m = torch.ones(3, 6, dtype=torch.bool)
    m[1, 4:] = False  # right padding on one row
    gamma = 0.8
    adv, _ = rl.gae(r, v, m, gamma=gamma, lam=0.0)
    next_v = torch.cat([v[:, 1:], torch.zeros(3, 1, dtype=F64)], dim=1)
    next_v = torch.where(torch.cat([m[:, 1:], torch.zeros(3, 1, dtype=torch.bool)], dim=1), next_v, 0.0)
    td = torch.where(m, r + gamma * next_v - v, 0.0)
    torch.testing.assert_close(adv, td, rtol=0, atol=1e-12)


def test_gae_lambda1_gamma1_is_return_minus_value():
    gen = torch.Generator().manual_seed(2)
    r = torch.randn(3, 6, generator=gen, dtype=F64)
    v = torch.randn(3, 6, generator=gen, dtype=F64)
    m = torch.ones(3, 6, dtype=torch.bool)
    m[2, :2] = False  # left padding on one row
    adv, ret = rl.gae(r, v, m, gamma=1.0, lam=1.0)
    rm = torch.where(m, r, 0.0)
    mc_return = rm.flip(1).cumsum(1).flip(1)  # Σ_{s ≥ t} r_s
    torch.testing.assert_close(adv, torch.where(m, mc_return - v, 0.0), rtol=0, atol=1e-12)
    torch.testing.assert_close(ret, torch.where(m, mc_return, 0.0), rtol=0, atol=1e-12)


def test_gae_left_and_right_padding_agree_and_garbage_is_ignored():
    gen = torch.Generator().manual_seed(3)
    core_r = torch.randn(1, 4, generator=gen, dtype=F64)
    core_v = torch.randn(1, 4, generator=gen, dtype=F64)
    pad = torch.full((1, 3), float("nan"), dtype=F64)  # NaN garbage under the mask must not leak
    right_r, right_v = torch.cat([core_r, pad], 1), torch.cat([core_v, pad], 1)
    left_r, left_v = torch.cat([pad, core_r], 1), torch.cat([pad, core_v], 1)
    right_m = torch.tensor([[True] * 4 + [False] * 3])
    left_m = right_m.flip(1)
    a_r, g_r = rl.gae(right_r, right_v, right_m, gamma=0.95, lam=0.9)
    a_l, g_l = rl.gae(left_r, left_v, left_m, gamma=0.95, lam=0.9)
    a_c, g_c = rl.gae(core_r, core_v, torch.ones(1, 4, dtype=torch.bool), gamma=0.95, lam=0.9)
    torch.testing.assert_close(a_r[:, :4], a_c, rtol=0, atol=0)
    torch.testing.assert_close(a_l[:, 3:], a_c, rtol=0, atol=0)
    torch.testing.assert_close(g_l[:, 3:], g_c, rtol=0, atol=0)
    assert torch.isfinite(a_r).all() and torch.isfinite(a_l).all() and torch.isfinite(g_r).all()


def test_gae_gradcheck():
    gen = torch.Generator().manual_seed(4)
    r = torch.randn(2, 5, generator=gen, dtype=F64, requires_grad=True)
    v = torch.randn(2, 5, generator=gen, dtype=F64, requires_grad=True)
    m = random_mask(2, 5, gen, "holes")
    assert torch.autograd.gradcheck(lambda r_, v_: rl.gae(r_, v_, m, gamma=0.9, lam=0.8), (r, v))


def test_gae_half_precision_is_computed_in_float32():
    r = torch.zeros(2, 3, dtype=torch.bfloat16)
    r[:, -1] = 1
    adv, _ = rl.gae(r, torch.zeros_like(r), torch.ones(2, 3, dtype=torch.bool), gamma=1.0, lam=1.0)
    assert adv.dtype == torch.float32
    torch.testing.assert_close(adv, torch.ones(2, 3))


def test_gae_bad_input():
    r = torch.zeros(2, 3)
    m = torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(TypeError, match="mask"):
        rl.gae(r, r, m.long())
    with pytest.raises(ValueError, match="values"):
        rl.gae(r, torch.zeros(2, 4), m)
    with pytest.raises(ValueError, match="mask"):
        rl.gae(r, r, torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="rewards"):
        rl.gae(torch.zeros(3), torch.zeros(3), torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="gamma"):
        rl.gae(r, r, m, gamma=1.5)
    with pytest.raises(ValueError, match="lam"):
        rl.gae(r, r, m, lam=-0.1)
    bad = r.clone()
    bad[0, 1] = float("nan")
    with pytest.raises(ValueError, match="rewards"):
        rl.gae(bad, r, m)
    with pytest.raises(ValueError, match="values"):
        rl.gae(r, bad.clone().fill_(float("inf")), m)
    with pytest.raises(TypeError, match="rewards"):
        rl.gae(torch.zeros(2, 3, dtype=torch.long), r, m)


# ----------------------------------------------------------------------------------------------------------
# RLOO advantages
# ----------------------------------------------------------------------------------------------------------


def rloo_oracle(rewards):
    out = torch.zeros_like(rewards, dtype=F64)
    p, k = rewards.shape
    for i in range(p):
        for j in range(k):
            others = [float(rewards[i, m]) for m in range(k) if m != j]
            out[i, j] = float(rewards[i, j]) - sum(others) / len(others)
    return out


def test_rloo_matches_loop_and_sums_to_zero():
    gen = torch.Generator().manual_seed(5)
    r = torch.randn(5, 4, generator=gen, dtype=F64)
    a = rl.rloo_advantages(r)
    torch.testing.assert_close(a, rloo_oracle(r), rtol=0, atol=1e-12)
    torch.testing.assert_close(a.sum(1), torch.zeros(5, dtype=F64), rtol=0, atol=1e-12)


def test_rloo_k2_and_shift_invariance():
    r = torch.tensor([[1.0, 3.5], [-2.0, 0.25]], dtype=F64)
    a = rl.rloo_advantages(r)
    torch.testing.assert_close(a, torch.tensor([[-2.5, 2.5], [-2.25, 2.25]], dtype=F64), rtol=0, atol=0)
    shifts = torch.tensor([[10.0], [-7.0]], dtype=F64)
    torch.testing.assert_close(rl.rloo_advantages(r + shifts), a, rtol=0, atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(
    st.integers(1, 4),
    st.integers(2, 6),
    st.floats(-1e4, 1e4),
    st.integers(0, 2**31 - 1),
)
def test_rloo_properties(prompts, k, shift, seed):
    gen = torch.Generator().manual_seed(seed)
    r = torch.randn(prompts, k, generator=gen, dtype=F64)
    a = rl.rloo_advantages(r)
    assert a.shape == (prompts, k)
    torch.testing.assert_close(a.sum(1), torch.zeros(prompts, dtype=F64), rtol=0, atol=1e-10)
    torch.testing.assert_close(rl.rloo_advantages(r + shift), a, rtol=0, atol=1e-8)
    torch.testing.assert_close(a, rloo_oracle(r), rtol=0, atol=1e-12)


def test_rloo_bad_input():
    with pytest.raises(ValueError, match=r"rewards has groups of size 1"):
        rl.rloo_advantages(torch.zeros(3, 1))
    with pytest.raises(ValueError, match="rewards must be 2-D"):
        rl.rloo_advantages(torch.zeros(4))
    with pytest.raises(ValueError, match="rewards has 1 non-finite"):
        rl.rloo_advantages(torch.tensor([[1.0, float("inf")]]))
    with pytest.raises(TypeError, match="rewards"):
        rl.rloo_advantages([[1.0, 2.0]])  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------------------
# group (GRPO) advantages
# ----------------------------------------------------------------------------------------------------------


def test_group_advantages_match_statistics_module():
    rows = [[1.0, 2.0, 4.0, 8.0], [0.0, 1.0, 0.0, 1.0]]
    a = rl.group_advantages(torch.tensor(rows, dtype=F64), eps=1e-4)
    for i, row in enumerate(rows):
        mu, sd = statistics.mean(row), statistics.stdev(row)  # stdev = Bessel-corrected
        for j, x in enumerate(row):
            assert math.isclose(float(a[i, j]), (x - mu) / (sd + 1e-4), rel_tol=1e-12)
    a_ns = rl.group_advantages(torch.tensor(rows, dtype=F64), scale_std=False)
    torch.testing.assert_close(a_ns[0], torch.tensor([-2.75, -1.75, 0.25, 4.25], dtype=F64), rtol=0, atol=0)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 4), st.integers(2, 8), st.floats(1e-3, 1e4), st.integers(0, 2**31 - 1))
def test_group_advantages_zero_sum_unit_bessel_std(prompts, g, scale, seed):
    gen = torch.Generator().manual_seed(seed)
    r = torch.randn(prompts, g, generator=gen, dtype=F64) * scale
    a = rl.group_advantages(r, eps=0.0)
    torch.testing.assert_close(a.sum(1), torch.zeros(prompts, dtype=F64), rtol=0, atol=1e-9)
    torch.testing.assert_close(a.std(1, correction=1), torch.ones(prompts, dtype=F64), rtol=1e-9, atol=0)


@pytest.mark.parametrize("value", [0.1, -3.3, 1e6, 0.0])
@pytest.mark.parametrize("eps", [0.0, 1e-4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_group_advantages_equal_rewards_give_exact_zero(value, eps, dtype):
    r = torch.tensor([[value] * 5, [1.0, 2.0, 3.0, 4.0, 5.0]], dtype=dtype)
    for scale_std in (True, False):
        a = rl.group_advantages(r, scale_std=scale_std, eps=eps)
        assert torch.isfinite(a).all()
        assert (a[0] == 0).all()
        assert (a[1] != 0).sum() == 4  # the middle one is exactly the mean


def test_group_advantages_bad_input():
    with pytest.raises(ValueError, match="rewards has groups of size 1"):
        rl.group_advantages(torch.zeros(2, 1))
    with pytest.raises(ValueError, match="eps"):
        rl.group_advantages(torch.zeros(2, 3), eps=-1.0)
    with pytest.raises(TypeError, match="scale_std"):
        rl.group_advantages(torch.zeros(2, 3), scale_std="group")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="rewards has 1 non-finite"):
        rl.group_advantages(torch.tensor([[0.0, float("nan"), 1.0]]))


# ----------------------------------------------------------------------------------------------------------
# whitening
# ----------------------------------------------------------------------------------------------------------


def test_whiten_masked_moments_and_reuse():
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(3, 5, generator=gen, dtype=F64) * 3 + 2
    m = random_mask(3, 5, gen, "holes")
    w = masked_whiten(x, m, eps=0.0)
    kept = x[m].tolist()  # oracle: the statistics module on the counted elements
    mu, sd = statistics.mean(kept), statistics.stdev(kept)
    torch.testing.assert_close(w, torch.where(m, (x - mu) / sd, 0.0), rtol=1e-12, atol=1e-12)
    vals = w[m]
    torch.testing.assert_close(vals.mean(), torch.tensor(0.0, dtype=F64), rtol=0, atol=1e-12)
    torch.testing.assert_close(vals.std(correction=1), torch.tensor(1.0, dtype=F64), rtol=1e-12, atol=0)
    assert (w[~m] == 0).all()
    keep = masked_whiten(x, m, shift_mean=False, eps=0.0)
    torch.testing.assert_close(keep[m].mean(), x[m].mean(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(masked_whiten(x, eps=0.0), masked_whiten(x, torch.ones_like(m), eps=0.0))
    with pytest.raises(TypeError, match="mask"):
        masked_whiten(x, m.float())
    with pytest.raises(ValueError, match="eps"):
        masked_whiten(x, m, eps=-1.0)


# ----------------------------------------------------------------------------------------------------------
# KL estimators
# ----------------------------------------------------------------------------------------------------------

K = 6


def categorical(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    theta = torch.randn(K, generator=gen, dtype=F64)
    ref = torch.log_softmax(torch.randn(K, generator=gen, dtype=F64), 0)
    return theta, ref


def test_kl_estimators_hand_values():
    lp = torch.tensor([-1.0, -2.0, -0.5], dtype=F64)
    ref = torch.tensor([-1.5, -1.0, -0.5], dtype=F64)
    log_ratio = [0.5, -1.0, 0.0]
    torch.testing.assert_close(rl.kl_estimate(lp, ref, estimator="k1"), torch.tensor(log_ratio, dtype=F64))
    torch.testing.assert_close(
        rl.kl_estimate(lp, ref, estimator="k2"), torch.tensor([0.125, 0.5, 0.0], dtype=F64)
    )
    k3 = [math.exp(-x) - 1 + x for x in log_ratio]
    torch.testing.assert_close(rl.kl_estimate(lp, ref, estimator="k3"), torch.tensor(k3, dtype=F64))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_k1_k3_unbiased_exactly_by_enumeration(seed):
    theta, ref = categorical(seed)
    logp = torch.log_softmax(theta, 0)
    p = logp.exp()
    kl = float((p * (logp - ref)).sum())
    for est in ("k1", "k3"):
        expectation = float((p * rl.kl_estimate(logp, ref, estimator=est)).sum())
        assert math.isclose(expectation, kl, rel_tol=1e-12, abs_tol=1e-14), est
    k2_mean = float((p * rl.kl_estimate(logp, ref, estimator="k2")).sum())
    assert not math.isclose(k2_mean, kl, rel_tol=1e-3)  # k2 is biased (sanity: the check can fail)


def test_k1_k3_unbiased_monte_carlo():
    theta, ref = categorical(7)
    logp = torch.log_softmax(theta, 0)
    p = logp.exp()
    kl = float((p * (logp - ref)).sum())
    n = 200_000
    gen = torch.Generator().manual_seed(123)
    y = torch.multinomial(p, n, replacement=True, generator=gen)
    for est in ("k1", "k3"):
        k = rl.kl_estimate(logp, ref, estimator=est)
        var = float((p * k**2).sum()) - kl**2  # exact variance of one sample, by enumeration
        se = math.sqrt(var / n)
        mean = float(k[y].mean())
        assert abs(mean - kl) < 4 * se, (est, mean, kl, se)
        assert 4 * se < 0.1 * kl  # the tolerance is tight relative to the quantity tested


def test_kl_estimator_gradients_exact_on_a_categorical():
    """Samples fixed, weights π detached: E_π[∇k1] = 0, E_π[∇k2] = ∇KL(π‖ref), E_π[∇k3] = ∇KL(ref‖π)."""
    theta0, ref = categorical(11)
    results = {}
    for est in ("k1", "k2", "k3"):
        theta = theta0.clone().requires_grad_(True)
        logp = torch.log_softmax(theta, 0)
        weights = logp.exp().detach()
        (g,) = torch.autograd.grad((weights * rl.kl_estimate(logp, ref, estimator=est)).sum(), theta)
        results[est] = g
    theta = theta0.clone().requires_grad_(True)
    logp = torch.log_softmax(theta, 0)
    (g_rev,) = torch.autograd.grad((logp.exp() * (logp - ref)).sum(), theta)
    theta = theta0.clone().requires_grad_(True)
    logp = torch.log_softmax(theta, 0)
    (g_fwd,) = torch.autograd.grad((ref.exp() * (ref - logp)).sum(), theta)
    torch.testing.assert_close(results["k1"], torch.zeros(K, dtype=F64), rtol=0, atol=1e-14)
    torch.testing.assert_close(results["k2"], g_rev, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(results["k3"], g_fwd, rtol=1e-12, atol=1e-14)
    assert not torch.allclose(g_rev, g_fwd, atol=1e-3)  # the two KL directions differ here


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.floats(-1e4, 0.0), min_size=1, max_size=8),
    st.lists(st.floats(-1e4, 0.0), min_size=8, max_size=8),
    st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
)
def test_k3_nonnegative_never_nan(lp, ref, dtype):
    a = torch.tensor(lp, dtype=dtype)
    b = torch.tensor(ref[: len(lp)], dtype=dtype)
    for est in ("k2", "k3"):
        k = rl.kl_estimate(a, b, estimator=est)
        assert not torch.isnan(k).any()
        assert (k >= 0).all()
        assert k.dtype == (F64 if dtype == F64 else torch.float32)
    k3 = rl.kl_estimate(a, b, estimator="k3")
    small = (a.double() - b.double()).abs() < 50
    assert torch.isfinite(k3[small]).all()


def test_kl_estimate_gradcheck_and_bad_input():
    lp = torch.randn(2, 3, dtype=F64, requires_grad=True)
    ref = torch.randn(2, 3, dtype=F64)
    for est in ("k1", "k2", "k3"):
        assert torch.autograd.gradcheck(lambda x, e=est: rl.kl_estimate(x, ref, estimator=e), (lp,))
    with pytest.raises(ValueError, match="estimator"):
        rl.kl_estimate(lp, ref, estimator="k4")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="ref_logp"):
        rl.kl_estimate(lp, ref[:, :2])


# ----------------------------------------------------------------------------------------------------------
# KL-penalized rewards
# ----------------------------------------------------------------------------------------------------------


def test_kl_penalized_rewards_hand_case_left_and_right_padding():
    logp = torch.tensor([[-1.0, -2.0, -3.0, 0.0], [0.0, -1.0, -1.0, -1.0]], dtype=F64)
    ref = torch.tensor([[-1.5, -1.0, -3.0, 0.0], [0.0, -2.0, -1.0, -0.5]], dtype=F64)
    mask = torch.tensor([[True, True, True, False], [False, True, True, True]])
    scores = torch.tensor([2.0, -1.0], dtype=F64)
    out = rl.kl_penalized_rewards(scores, logp, ref, mask, beta=0.1)
    k1 = torch.tensor([[0.5, -1.0, 0.0, 0.0], [0.0, 1.0, 0.0, -0.5]], dtype=F64)
    expected = -0.1 * k1
    expected[0, 2] += 2.0  # last valid token of the right-padded row
    expected[1, 3] += -1.0  # last valid token of the left-padded row
    torch.testing.assert_close(out.kl, k1, rtol=0, atol=0)
    torch.testing.assert_close(out.token_rewards, expected, rtol=0, atol=1e-15)
    torch.testing.assert_close(out.sequence_rewards, scores - 0.1 * k1.sum(1), rtol=0, atol=1e-15)

    in_loss = rl.kl_penalized_rewards(scores, logp, ref, mask, beta=0.1, kl_in_reward=False)
    terminal = torch.zeros(2, 4, dtype=F64)
    terminal[0, 2], terminal[1, 3] = 2.0, -1.0
    torch.testing.assert_close(in_loss.token_rewards, terminal, rtol=0, atol=0)
    torch.testing.assert_close(in_loss.sequence_rewards, scores, rtol=0, atol=0)

    # GAE with γ = λ = 1 and zero values on these rewards: every token's advantage is the rest of the return
    adv, _ = rl.gae(out.token_rewards, torch.zeros_like(logp), mask, gamma=1.0, lam=1.0)
    torch.testing.assert_close(adv[0, 0], out.sequence_rewards[0])
    torch.testing.assert_close(adv[1, 1], out.sequence_rewards[1])


def test_kl_penalized_rewards_k3_and_detached():
    logp = torch.randn(2, 3, dtype=F64, requires_grad=True)
    ref = torch.randn(2, 3, dtype=F64)
    mask = torch.ones(2, 3, dtype=torch.bool)
    out = rl.kl_penalized_rewards(torch.zeros(2, dtype=F64), logp, ref, mask, beta=0.5, estimator="k3")
    torch.testing.assert_close(out.kl, rl.kl_estimate(logp.detach(), ref, estimator="k3"))
    assert not out.token_rewards.requires_grad and not out.sequence_rewards.requires_grad


def test_last_valid_index_matches_loop():
    gen = torch.Generator().manual_seed(8)
    for kind in ("right", "left", "holes"):
        m = random_mask(6, 9, gen, kind)
        expected = [max(j for j in range(9) if m[i, j]) for i in range(6)]
        assert rl.last_valid_index(m).tolist() == expected


def test_kl_penalized_rewards_bad_input():
    lp = torch.zeros(2, 3)
    m = torch.ones(2, 3, dtype=torch.bool)
    s = torch.zeros(2)
    with pytest.raises(ValueError, match="beta"):
        rl.kl_penalized_rewards(s, lp, lp, m, beta=-0.1)
    with pytest.raises(ValueError, match="scores"):
        rl.kl_penalized_rewards(torch.zeros(3), lp, lp, m)
    with pytest.raises(ValueError, match="scores has 1 non-finite"):
        rl.kl_penalized_rewards(torch.tensor([0.0, float("nan")]), lp, lp, m)
    with pytest.raises(TypeError, match="mask"):
        rl.kl_penalized_rewards(s, lp, lp, m.int())
    m2 = m.clone()
    m2[1] = False
    with pytest.raises(ValueError, match="mask has rows with no valid token"):
        rl.kl_penalized_rewards(s, lp, lp, m2)
    with pytest.raises(ValueError, match="ref_logp"):
        rl.kl_penalized_rewards(s, lp, torch.zeros(2, 4), m)


# ----------------------------------------------------------------------------------------------------------
# REINFORCE++ / REINFORCE++-baseline
# ----------------------------------------------------------------------------------------------------------


def reinforce_pp_oracle(scores, kl, mask, beta, group_size, baseline_returns, whiten_var, eps):
    """Python-float loops: shaped rewards, reverse sums over the valid tokens, then global token whitening."""
    b, t = mask.shape
    r = [float(x) for x in scores]
    k = [[float(kl[i, j]) if mask[i, j] else 0.0 for j in range(t)] for i in range(b)]
    g = group_size or 1
    means = {}
    if group_size is not None:
        for i in range(b):
            grp = range(i // g * g, i // g * g + g)
            if baseline_returns == "per_token":
                means[i] = sum(r[j] for j in grp) / g
            else:
                means[i] = sum(r[j] - beta * sum(k[j]) for j in grp) / g
    returns = {}
    for i in range(b):
        valid = [j for j in range(t) if mask[i, j]]
        if baseline_returns == "sequence_sum":
            s_i = r[i] - beta * sum(k[i]) - means[i]
            for j in valid:
                returns[i, j] = s_i
            continue
        terminal = r[i] - means.get(i, 0.0)
        for j in valid:
            later = [s for s in valid if s >= j]
            returns[i, j] = sum(-beta * k[i][s] for s in later) + terminal
    vals = list(returns.values())
    n = len(vals)
    mu = sum(vals) / n
    ss = sum((v - mu) ** 2 for v in vals)
    if whiten_var == "biased":
        denom = math.sqrt(max(ss / n, eps))
    else:
        denom = math.sqrt(ss / (n - 1) + eps)
    out = torch.zeros(b, t, dtype=torch.float64)
    for (i, j), v in returns.items():
        out[i, j] = (v - mu) / denom
    return out


@pytest.mark.parametrize(
    ("group_size", "baseline_returns"),
    [(None, "per_token"), (2, "per_token"), (4, "per_token"), (2, "sequence_sum"), (4, "sequence_sum")],
)
@pytest.mark.parametrize("whiten_var", ["biased", "unbiased"])
@pytest.mark.parametrize("kind", ["right", "left", "holes"])
def test_reinforce_pp_advantages_match_loop_oracle(group_size, baseline_returns, whiten_var, kind):
    gen = torch.Generator().manual_seed(50)
    b, t = 8, 6
    mask = random_mask(b, t, gen, kind)
    scores = torch.randn(b, generator=gen, dtype=torch.float64)
    kl = torch.randn(b, t, generator=gen, dtype=torch.float64).abs()
    kl[~mask] = float("nan")  # ignored
    got = rl.reinforce_pp_advantages(
        scores,
        mask,
        kl=kl,
        beta=0.1,
        group_size=group_size,
        baseline_returns=baseline_returns,
        whiten_var=whiten_var,
    )
    want = reinforce_pp_oracle(scores, kl, mask, 0.1, group_size, baseline_returns, whiten_var, 1e-8)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert not got.requires_grad and (got[~mask] == 0).all()
    assert abs(float(got[mask].mean())) < 1e-12


def test_reinforce_pp_properties():
    """[R] per-prompt shift invariance of the baseline variant; biased vs unbiased whitening differ by exactly
    sqrt(N/(N−1)) at eps = 0; with beta = 0 the advantage is constant along a sequence and both baseline
    conventions agree."""
    gen = torch.Generator().manual_seed(51)
    b, t, k = 6, 5, 3
    mask = random_mask(b, t, gen, "holes")
    scores = torch.randn(b, generator=gen, dtype=torch.float64)
    kl = torch.randn(b, t, generator=gen, dtype=torch.float64).abs()
    shift = torch.tensor([5.0, -3.0], dtype=torch.float64).repeat_interleave(k)
    for br in ("per_token", "sequence_sum"):
        a = rl.reinforce_pp_advantages(scores, mask, kl=kl, beta=0.2, group_size=k, baseline_returns=br)
        a2 = rl.reinforce_pp_advantages(
            scores + shift, mask, kl=kl, beta=0.2, group_size=k, baseline_returns=br
        )
        torch.testing.assert_close(a2, a, rtol=1e-12, atol=1e-12)
    biased = rl.reinforce_pp_advantages(scores, mask, kl=kl, beta=0.2, eps=0.0)
    unbiased = rl.reinforce_pp_advantages(scores, mask, kl=kl, beta=0.2, eps=0.0, whiten_var="unbiased")
    n = int(mask.sum())
    torch.testing.assert_close(biased, unbiased * math.sqrt(n / (n - 1)), rtol=1e-12, atol=1e-14)
    per_tok = rl.reinforce_pp_advantages(scores, mask, group_size=k)
    seq_sum = rl.reinforce_pp_advantages(scores, mask, group_size=k, baseline_returns="sequence_sum")
    torch.testing.assert_close(per_tok, seq_sum, rtol=1e-12, atol=1e-14)
    for i in range(b):
        row = per_tok[i][mask[i]]
        assert (row == row[0]).all()
    # without the baseline the global whitening is not shift invariant per prompt, but is for a global shift
    a = rl.reinforce_pp_advantages(scores, mask, kl=kl, beta=0.2)
    torch.testing.assert_close(rl.reinforce_pp_advantages(scores + 7.0, mask, kl=kl, beta=0.2), a)
    # equal scores in every group, beta = 0: all returns are 0 → exactly 0, never NaN, even with eps = 0
    same = torch.tensor([1.0, 1.0, 1.0, 2.0, 2.0, 2.0], dtype=torch.float64)
    for wv in ("biased", "unbiased"):
        z = rl.reinforce_pp_advantages(same, mask, group_size=k, whiten_var=wv, eps=0.0)
        assert (z == 0).all()


def test_reinforce_pp_bad_input():
    m = torch.ones(4, 3, dtype=torch.bool)
    s = torch.zeros(4)
    with pytest.raises(ValueError, match="group_size"):
        rl.reinforce_pp_advantages(s, m, group_size=3)
    with pytest.raises(ValueError, match="group_size"):
        rl.reinforce_pp_advantages(s, m, group_size=1)
    with pytest.raises(ValueError, match="sequence_sum"):
        rl.reinforce_pp_advantages(s, m, baseline_returns="sequence_sum")
    with pytest.raises(ValueError, match="whiten_var"):
        rl.reinforce_pp_advantages(s, m, whiten_var="bessel")
    with pytest.raises(ValueError, match="kl is required"):
        rl.reinforce_pp_advantages(s, m, beta=0.1)
    with pytest.raises(ValueError, match="beta"):
        rl.reinforce_pp_advantages(s, m, beta=-1.0)
    with pytest.raises(ValueError, match="scores"):
        rl.reinforce_pp_advantages(torch.tensor([0.0, float("nan"), 0.0, 0.0]), m)
    with pytest.raises(ValueError, match="scores has 3 rows"):
        rl.reinforce_pp_advantages(torch.zeros(3), m)
    with pytest.raises(ValueError, match="no valid token"):
        rl.reinforce_pp_advantages(s, torch.zeros(4, 3, dtype=torch.bool))
    with pytest.raises(TypeError, match="mask"):
        rl.reinforce_pp_advantages(s, m.long())
    with pytest.raises(ValueError, match="kl has shape"):
        rl.reinforce_pp_advantages(s, m, kl=torch.zeros(4, 2), beta=0.1)


# ----------------------------------------------------------------------------------------------------------
# DAPO: overlong penalty, zero-variance group filter
# ----------------------------------------------------------------------------------------------------------


def test_overlong_penalty_hand_values():
    """(L_max, L_c) = (100, 20): ramp from 80; |y| = 90 ⇒ −0.5 (hand-computed), 100 ⇒ −1, beyond ⇒ −1."""
    lengths = torch.tensor([0, 50, 80, 81, 90, 95, 100, 101, 500])
    got = rl.overlong_penalty(lengths, 100, 20)
    want = torch.tensor([0.0, 0.0, 0.0, -0.05, -0.5, -0.75, -1.0, -1.0, -1.0])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-7)
    torch.testing.assert_close(rl.overlong_penalty(lengths, 100, 20, factor=2.0), 2 * want, rtol=0, atol=1e-6)
    # float64 lengths stay float64; cache_len = max_len ramps from 0
    got64 = rl.overlong_penalty(torch.tensor([0.0, 1.0, 4.0, 5.0], dtype=torch.float64), 4, 4)
    assert got64.dtype == torch.float64
    torch.testing.assert_close(got64, torch.tensor([0.0, -0.25, -1.0, -1.0], dtype=torch.float64))


def test_overlong_penalty_bad_input():
    n = torch.tensor([1, 2])
    with pytest.raises(ValueError, match="cache_len"):
        rl.overlong_penalty(n, 10, 11)
    with pytest.raises(ValueError, match="cache_len"):
        rl.overlong_penalty(n, 10, 0)
    with pytest.raises(ValueError, match="max_len"):
        rl.overlong_penalty(n, 10.0, 2)
    with pytest.raises(ValueError, match="factor"):
        rl.overlong_penalty(n, 10, 2, factor=-1.0)
    with pytest.raises(ValueError, match="lengths"):
        rl.overlong_penalty(torch.tensor([-1, 2]), 10, 2)
    with pytest.raises(ValueError, match="lengths"):
        rl.overlong_penalty(torch.zeros(2, 2), 10, 2)


def test_informative_groups_hand_values_and_constant_groups_have_zero_advantage():
    rewards = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 1.0], [1.0, 1.0, 1.0], [0.5, 0.5, 0.7]])
    keep = rl.informative_groups(rewards)
    assert keep.tolist() == [False, True, False, True]
    # OpenRLHF's open interval on the mean: identical for 0/1 rewards, different for continuous ones
    binary = rewards[:3]
    assert (
        rl.informative_groups(binary, mean_bounds=(0.0, 1.0)).tolist()
        == rl.informative_groups(binary).tolist()
    )
    assert rl.informative_groups(rewards, mean_bounds=(0.0, 0.55)).tolist() == [False, False, False, False]
    # the dropped groups carried exactly zero advantage under both group estimators
    for adv in (rl.group_advantages(rewards), rl.rloo_advantages(rewards)):
        assert (adv[~keep] == 0).all() and (adv[keep] != 0).any()
    assert rl.informative_groups(torch.tensor([[3.0], [4.0]])).tolist() == [False, False]
    with pytest.raises(ValueError, match="mean_bounds"):
        rl.informative_groups(rewards, mean_bounds=(1.0, 0.0))
    with pytest.raises(ValueError, match="rewards"):
        rl.informative_groups(torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="rewards"):
        rl.informative_groups(torch.tensor([[0.0, float("nan")]]))


# ----------------------------------------------------------------------------------------------------------
# groups of one (singleton=) and ReMax
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_group_advantages_singleton_raw_and_zero_hand_values(dtype):
    r = torch.tensor([[2.0], [-0.5], [0.0]], dtype=dtype)
    # verl's rule: mean := 0, std := 1, then (r - 0) / (1 + eps)
    raw = rl.group_advantages(r, singleton="raw", eps=0.25)
    torch.testing.assert_close(raw, torch.tensor([[1.6], [-0.4], [0.0]], dtype=dtype), rtol=0, atol=0)
    raw_ns = rl.group_advantages(r, scale_std=False, singleton="raw")
    torch.testing.assert_close(raw_ns, r, rtol=0, atol=0)
    assert raw_ns.data_ptr() != r.data_ptr()  # a new tensor, not the caller's
    for scale_std in (True, False):
        zero = rl.group_advantages(r, scale_std=scale_std, singleton="zero")
        assert zero.shape == (3, 1) and zero.dtype == dtype and (zero == 0).all()
    torch.testing.assert_close(rl.rloo_advantages(r, singleton="raw"), r, rtol=0, atol=0)
    assert (rl.rloo_advantages(r, singleton="zero") == 0).all()


@pytest.mark.parametrize("singleton", ["raw", "zero"])
def test_singleton_option_has_no_effect_for_groups_of_two_or_more(singleton):
    gen = torch.Generator().manual_seed(21)
    r = torch.randn(3, 4, generator=gen, dtype=F64)
    torch.testing.assert_close(
        rl.group_advantages(r, singleton=singleton), rl.group_advantages(r), rtol=0, atol=0
    )
    torch.testing.assert_close(rl.rloo_advantages(r, singleton=singleton), rloo_oracle(r), rtol=0, atol=1e-12)


def test_singleton_raw_is_reinforce_on_the_raw_score_by_enumeration():
    """G = 1 with singleton='raw' is REINFORCE without baseline: its expected policy gradient is ∇E[r],
    computed exactly over a categorical policy (a one-token LM)."""
    gen = torch.Generator().manual_seed(22)
    logits = torch.randn(5, generator=gen, dtype=F64, requires_grad=True)
    reward = torch.randn(5, generator=gen, dtype=F64)
    p = torch.softmax(logits, 0)
    (exact,) = torch.autograd.grad((p * reward).sum(), logits)
    logp = torch.log_softmax(logits, 0)
    adv = rl.group_advantages(reward.view(5, 1), scale_std=False, singleton="raw").view(5)
    (estimate,) = torch.autograd.grad((p.detach() * adv * logp).sum(), logits)  # E_y[A(y) ∇log p(y)]
    torch.testing.assert_close(estimate, exact, rtol=0, atol=1e-12)


def test_singleton_bad_input():
    for fn in (rl.group_advantages, rl.rloo_advantages):
        with pytest.raises(ValueError, match="singleton='raw'"):
            fn(torch.zeros(2, 1))
        with pytest.raises(ValueError, match="singleton must be one of"):
            fn(torch.zeros(2, 3), singleton="mean")  # type: ignore[operator]
        with pytest.raises(ValueError, match="rewards has 1 non-finite"):
            fn(torch.tensor([[float("nan")]]), singleton="raw")  # type: ignore[operator]


def test_remax_sequence_form_hand_values_and_broadcast():
    r = torch.tensor([1.0, -2.0, 0.5], dtype=F64)
    g = torch.tensor([0.25, -2.0, 1.5], dtype=F64)
    torch.testing.assert_close(
        rl.remax_advantages(r, g), torch.tensor([0.75, 0.0, -1.0], dtype=F64), rtol=0, atol=0
    )
    rk = torch.tensor([[1.0, 2.0], [0.0, -1.0], [3.0, 1.5]], dtype=F64)
    a = rl.remax_advantages(rk, g)
    for i in range(3):
        for j in range(2):
            assert float(a[i, j]) == float(rk[i, j]) - float(g[i])
    assert not rl.remax_advantages(r.requires_grad_(), g).requires_grad


def remax_token_oracle(token_rewards, greedy, mask):
    b, t = mask.shape
    out = torch.zeros(b, t, dtype=F64)
    for i in range(b):
        for s in range(t):
            if mask[i, s]:
                ret = sum(float(token_rewards[i, u]) for u in range(s, t) if mask[i, u])
                out[i, s] = ret - float(greedy[i])
    return out


@pytest.mark.parametrize("kind", ["right", "left", "holes"])
def test_remax_token_form_matches_loop_oracle_and_ignores_masked_garbage(kind):
    gen = torch.Generator().manual_seed(23)
    m = random_mask(4, 7, gen, kind)
    tr = torch.randn(4, 7, generator=gen, dtype=F64)
    g = torch.randn(4, generator=gen, dtype=F64)
    a = rl.remax_advantages(tr, g, mask=m)
    torch.testing.assert_close(a, remax_token_oracle(tr, g, m), rtol=0, atol=1e-12)
    garbage = torch.where(m, tr, torch.full_like(tr, float("nan")))
    torch.testing.assert_close(rl.remax_advantages(garbage, g, mask=m), a, rtol=0, atol=0)


def test_remax_token_form_without_kl_equals_sequence_form_and_greedy_sample_gives_zero():
    """β_KL = 0: the token form is the sequence form on every valid token; and a sample whose reward is
    the greedy one (the sampled response is the greedy response) has A ≡ 0."""
    gen = torch.Generator().manual_seed(24)
    m = random_mask(3, 6, gen, "right")
    scores = torch.randn(3, generator=gen, dtype=F64)
    g = torch.tensor([0.3, float(scores[1]), -1.0], dtype=F64)
    logp = torch.randn(3, 6, generator=gen, dtype=F64)
    pen = rl.kl_penalized_rewards(scores, logp, logp.clone(), m, beta=0.0)
    a_tok = rl.remax_advantages(pen.token_rewards, g, mask=m)
    a_seq = rl.remax_advantages(scores, g)
    expected = torch.where(m, a_seq.unsqueeze(1).expand_as(m), torch.zeros((), dtype=F64))
    torch.testing.assert_close(a_tok, expected, rtol=0, atol=1e-12)
    assert (a_tok[1] == 0).all()


def test_remax_unbiased_by_enumeration():
    """E_y[(r(y) − r(ŷ)) ∇log π(y)] = ∇E[r] exactly: the greedy baseline does not depend on the sample."""
    gen = torch.Generator().manual_seed(25)
    logits = torch.randn(6, generator=gen, dtype=F64, requires_grad=True)
    reward = torch.randn(6, generator=gen, dtype=F64)
    p = torch.softmax(logits, 0)
    (exact,) = torch.autograd.grad((p * reward).sum(), logits)
    greedy_reward = reward[int(logits.argmax())].expand(6)
    adv = rl.remax_advantages(reward, greedy_reward)
    (estimate,) = torch.autograd.grad((p.detach() * adv * torch.log_softmax(logits, 0)).sum(), logits)
    torch.testing.assert_close(estimate, exact, rtol=0, atol=1e-12)


def test_remax_bad_input():
    with pytest.raises(ValueError, match="greedy_rewards has 2 rows but rewards has 3"):
        rl.remax_advantages(torch.zeros(3, 4), torch.zeros(2), mask=torch.ones(3, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="rewards has 3 prompts but greedy_rewards has 2"):
        rl.remax_advantages(torch.zeros(3), torch.zeros(2))
    with pytest.raises(ValueError, match="rewards must be"):
        rl.remax_advantages(torch.zeros(3, 2, 2), torch.zeros(3))
    with pytest.raises(ValueError, match="greedy_rewards"):
        rl.remax_advantages(torch.zeros(3), torch.zeros(3, 1))
    with pytest.raises(ValueError, match="greedy_rewards has 1 non-finite"):
        rl.remax_advantages(torch.zeros(3), torch.tensor([0.0, float("inf"), 0.0]))
    with pytest.raises(ValueError, match="rewards has 1 non-finite"):
        rl.remax_advantages(torch.tensor([0.0, float("nan")]), torch.zeros(2))
    with pytest.raises(TypeError, match="mask"):
        rl.remax_advantages(torch.zeros(2, 3), torch.zeros(2), mask=torch.ones(2, 3))


def test_hf_sampler_greedy_is_the_argmax_loop_and_leaves_the_sampler_unchanged():
    """HFSampler.greedy == an argmax loop over full forwards (no KV cache), for every prompt."""
    from prefopt.sampling import HFSampler
    from prefopt.testing import tiny_causal_lm

    model = tiny_causal_lm("llama", vocab_size=64, seed=3)
    sampler = HFSampler(model, reference=None, max_new_tokens=5, eos_token_id=1, pad_token_id=0)
    prompts = [[5, 9, 17], [7, 8, 30, 31, 40]]
    width = max(map(len, prompts))
    ids = torch.zeros(2, width, dtype=torch.long)
    am = torch.zeros(2, width, dtype=torch.long)
    for i, row in enumerate(prompts):
        ids[i, width - len(row) :] = torch.tensor(row)
        am[i, width - len(row) :] = 1
    roll = sampler.greedy({"input_ids": ids, "attention_mask": am})
    assert sampler.do_sample is True
    assert roll.batch_size == 2
    for i, row in enumerate(prompts):
        seq, out = list(row), []
        with torch.no_grad():
            for _ in range(5):
                nxt = int(model(torch.tensor([seq])).logits[0, -1].argmax())
                out.append(nxt)
                seq.append(nxt)
                if nxt == 1:
                    break
        assert roll.completion_ids()[i] == out


def test_hf_sampler_without_behaviour_logps_skips_only_that_forward():
    """behaviour_logps=False: the same samples and reference log-probs (same seed), logp left None."""
    import peft

    from prefopt.policy import LoraPolicy
    from prefopt.sampling import HFSampler
    from prefopt.testing import tiny_causal_lm

    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0, bias="none")
    policy = LoraPolicy(tiny_causal_lm("llama", vocab_size=64, seed=4), cfg)
    prompts = {
        "input_ids": torch.tensor([[0, 5, 9], [7, 8, 30]]),
        "attention_mask": torch.tensor([[0, 1, 1], [1, 1, 1]]),
    }
    outs = []
    for flag in (True, False):
        torch.manual_seed(3)
        s = HFSampler(policy, max_new_tokens=4, eos_token_id=1, pad_token_id=0, behaviour_logps=flag)
        outs.append(s.generate(prompts, n=2))
    full, lean = outs
    assert full.logp is not None and lean.logp is None
    assert torch.equal(full.input_ids, lean.input_ids)
    assert full.ref_logp is not None and lean.ref_logp is not None
    torch.testing.assert_close(lean.ref_logp, full.ref_logp, rtol=0, atol=0)
    with pytest.raises(TypeError, match="behaviour_logps"):
        HFSampler(policy, eos_token_id=1, pad_token_id=0, behaviour_logps=1)  # type: ignore[arg-type]


@pytest.mark.parametrize("baseline_returns", ["per_token", "sequence_sum"])
@pytest.mark.parametrize("whiten_var", ["biased", "unbiased"])
def test_reinforce_pp_group_of_one_raw_and_zero_match_loop_oracles(baseline_returns, whiten_var):
    """group_size=1: 'zero' is OpenRLHF's rule (the loop oracle's group mean of one sample is the sample);
    'raw' is verl's (baseline 0): per_token equals group_size=None, sequence_sum equals whitened constant
    returns S_i = r_i − β Σ_t k_t (the oracle with β = 0 on the scores S_i)."""
    gen = torch.Generator().manual_seed(51)
    mask = random_mask(5, 6, gen, "holes")
    scores = torch.randn(5, generator=gen, dtype=F64)
    kl = torch.randn(5, 6, generator=gen, dtype=F64).abs()
    kw = dict(kl=kl, beta=0.1, group_size=1, baseline_returns=baseline_returns, whiten_var=whiten_var)
    zero = rl.reinforce_pp_advantages(scores, mask, singleton="zero", **kw)
    want_zero = reinforce_pp_oracle(scores, kl, mask, 0.1, 1, baseline_returns, whiten_var, 1e-8)
    torch.testing.assert_close(zero, want_zero, rtol=1e-10, atol=1e-12)
    raw = rl.reinforce_pp_advantages(scores, mask, singleton="raw", **kw)
    if baseline_returns == "per_token":
        want_raw = reinforce_pp_oracle(scores, kl, mask, 0.1, None, "per_token", whiten_var, 1e-8)
    else:
        seq = scores - 0.1 * torch.where(mask, kl, torch.zeros((), dtype=F64)).sum(1)
        want_raw = reinforce_pp_oracle(seq, kl, mask, 0.0, None, "per_token", whiten_var, 1e-8)
    torch.testing.assert_close(raw, want_raw, rtol=1e-10, atol=1e-12)
    assert (raw != 0).any()
    with pytest.raises(ValueError, match="singleton='raw'"):
        rl.reinforce_pp_advantages(scores, mask, group_size=1)
