"""Tests for the policy-gradient losses: reinforce, rloo, grpo, ppo."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import prefopt as po
from prefopt import rl
from prefopt.losses import policy_gradient
from prefopt.losses.policy_gradient import cispo, grpo, gspo, gspo_token, ppo, reinforce, rloo, sapo
from prefopt.masked import aggregate, masked_mean, masked_sum, mean_of_seq_means, token_mean

F64 = torch.float64


def right_mask(lengths: list[int], t: int) -> torch.Tensor:
    return torch.arange(t).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)


def seq(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sequence token sum (the old per-sequence loss of reinforce / rloo)."""
    return masked_sum(x, mask, dim=-1)


def seq_avg(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sequence token mean (the old per-sequence metrics)."""
    return masked_mean(x, mask, dim=-1)


def grads_wrt(fn, x: torch.Tensor) -> torch.Tensor:
    x = x.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(fn(x).sum(), x)
    return g


def test_registered_in_family():
    assert set(po.available_losses("policy_gradient")) == {
        "reinforce",
        "rloo",
        "grpo",
        "gspo",
        "gspo_token",
        "cispo",
        "sapo",
        "ppo",
    }


# ----------------------------------------------------------------------------------------------------------
# REINFORCE
# ----------------------------------------------------------------------------------------------------------


def test_reinforce_no_baseline_hand_values_and_grad():
    logp = torch.tensor([[-1.0, -2.0, 5.0], [-0.5, -0.5, -0.5]], dtype=F64, requires_grad=True)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    r = torch.tensor([2.0, -1.0], dtype=F64)
    out = reinforce(logp, None, r, mask)
    torch.testing.assert_close(seq(out.loss, mask), torch.tensor([6.0, -1.5], dtype=F64), rtol=0, atol=0)
    out.loss.sum().backward()
    expected = torch.tensor([[-2.0, -2.0, 0.0], [1.0, 1.0, 1.0]], dtype=F64)
    torch.testing.assert_close(logp.grad, expected, rtol=0, atol=0)
    torch.testing.assert_close(seq(out.metrics["pg_loss"], mask), torch.tensor([6.0, -1.5], dtype=F64))
    torch.testing.assert_close(seq_avg(out.metrics["advantages"], mask), r)


def test_reinforce_value_baselines_match_loop():
    gen = torch.Generator().manual_seed(0)
    b, t = 3, 5
    logp = -torch.rand(b, t, generator=gen, dtype=F64)
    mask = right_mask([5, 2, 4], t)
    r = torch.randn(b, generator=gen, dtype=F64)
    v_seq = torch.randn(b, generator=gen, dtype=F64)
    v_tok = torch.randn(b, t, generator=gen, dtype=F64)
    c = 0.3
    out_s = reinforce(logp, None, r - v_seq, mask, values=v_seq, returns=r, value_coef=c)
    out_t = reinforce(logp, None, r.unsqueeze(1) - v_tok, mask, values=v_tok, returns=r, value_coef=c)
    for i in range(b):
        idx = [j for j in range(t) if mask[i, j]]
        s = sum(float(logp[i, j]) for j in idx)
        exp_s = -(float(r[i]) - float(v_seq[i])) * s + c * (float(r[i]) - float(v_seq[i])) ** 2
        pg_t = -sum(float(logp[i, j]) * (float(r[i]) - float(v_tok[i, j])) for j in idx)
        vl_t = sum((float(r[i]) - float(v_tok[i, j])) ** 2 for j in idx)
        assert math.isclose(float(seq(out_s.loss, mask)[i]), exp_s, rel_tol=1e-12, abs_tol=1e-12)
        assert math.isclose(float(seq(out_t.loss, mask)[i]), pg_t + c * vl_t, rel_tol=1e-12, abs_tol=1e-12)
        assert math.isclose(float(seq(out_t.metrics["value_loss"], mask)[i]), vl_t, rel_tol=1e-12)


def test_reinforce_value_gradients_and_zero_value_loss():
    gen = torch.Generator().manual_seed(1)
    logp = (-torch.rand(2, 3, generator=gen, dtype=F64)).requires_grad_()
    mask = torch.ones(2, 3, dtype=torch.bool)
    r = torch.tensor([1.0, -2.0], dtype=F64)
    v = torch.tensor([0.25, 0.5], dtype=F64, requires_grad=True)
    out = reinforce(logp, None, r - v.detach(), mask, values=v, returns=r, value_coef=2.0)
    out.loss.sum().backward()
    # the policy term sees sg(R − V): ∂/∂ℓ_t = −(R − V); the value term: ∂/∂V = −2·c·(R − V)
    torch.testing.assert_close(logp.grad, -(r - v.detach()).unsqueeze(1).expand(2, 3), rtol=0, atol=1e-15)
    torch.testing.assert_close(v.grad, -4.0 * (r - v.detach()), rtol=0, atol=1e-15)
    at_target = reinforce(logp, None, r - r, mask, values=r.clone(), returns=r, value_coef=1.0)
    assert (at_target.metrics["value_loss"] == 0).all() and (at_target.metrics["pg_loss"] == 0).all()
    tok = reinforce(logp, None, r - r, mask, values=r.unsqueeze(1).expand(2, 3).clone(), returns=r)
    assert (tok.metrics["value_loss"] == 0).all()


def test_reinforce_baseline_leaves_expected_gradient_unchanged_exactly():
    """On a categorical 'one-token LM': Σ_y π(y) ∇[−(R(y) − b)·log π(y)] does not depend on b."""
    k = 5
    theta0 = torch.randn(k, generator=torch.Generator().manual_seed(2), dtype=F64)
    rewards = torch.arange(k, dtype=F64)
    grads = []
    for b in (None, 3.7):
        theta = theta0.clone().requires_grad_(True)
        logp = torch.log_softmax(theta, 0).unsqueeze(1)  # every outcome as a length-1 sequence
        mask = torch.ones(k, 1, dtype=torch.bool)
        values = None if b is None else torch.full((k,), b, dtype=F64)
        adv = rewards if values is None else rewards - values
        out = reinforce(
            logp, None, adv, mask, values=values, returns=None if b is None else rewards, value_coef=0.0
        )
        weights = logp.exp().detach().squeeze(1)
        (g,) = torch.autograd.grad((weights * seq(out.loss, mask)).sum(), theta)
        grads.append(g)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-12, atol=1e-14)
    theta = theta0.clone().requires_grad_(True)
    (g_true,) = torch.autograd.grad(-(torch.softmax(theta, 0) * rewards).sum(), theta)
    torch.testing.assert_close(grads[0], g_true, rtol=1e-12, atol=1e-14)  # = −∇E[R]


def test_reinforce_gradcheck():
    """The policy term uses sg(R − V), so the numerical derivative in V is only meaningful where the policy
    term vanishes (log-probs 0); in logp the loss is an ordinary function."""
    gen = torch.Generator().manual_seed(3)
    logp = (-torch.rand(2, 4, generator=gen, dtype=F64)).requires_grad_()
    vals = torch.randn(2, 4, generator=gen, dtype=F64, requires_grad=True)
    vseq = torch.randn(2, generator=gen, dtype=F64, requires_grad=True)
    mask = right_mask([4, 2], 4)
    r = torch.randn(2, generator=gen, dtype=F64)
    zero = torch.zeros(2, 4, dtype=F64)
    for v in (vals, vseq):
        adv = (r if v.ndim == 1 else r.unsqueeze(1)) - v.detach()
        assert torch.autograd.gradcheck(
            lambda a, v=v, adv=adv: (
                reinforce(a, None, adv, mask, values=v.detach(), returns=r, value_coef=0.5).loss
            ),
            (logp,),
        )
        assert torch.autograd.gradcheck(
            lambda x, adv=adv: reinforce(zero, None, adv, mask, values=x, returns=r, value_coef=0.5).loss,
            (v,),
        )


def test_reinforce_bad_input():
    lp = torch.zeros(2, 3)
    m = torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(TypeError, match="mask"):
        reinforce(lp, None, torch.zeros(2), m.float())
    with pytest.raises(ValueError, match="advantages"):
        reinforce(lp, None, torch.zeros(3), m)
    with pytest.raises(ValueError, match="values"):
        reinforce(lp, None, torch.zeros(2), m, values=torch.zeros(2, 4), returns=torch.zeros(2))
    with pytest.raises(ValueError, match="returns is required"):
        reinforce(lp, None, torch.zeros(2), m, values=torch.zeros(2))
    with pytest.raises(ValueError, match="advantages has 1 non-finite"):
        reinforce(lp, None, torch.tensor([0.0, float("nan")]), m, check_finite=True)
    with pytest.raises(ValueError, match="value_coef"):
        reinforce(lp, None, torch.zeros(2), m, value_coef=-1.0)


@pytest.mark.parametrize("method", ["reinforce", "rloo"])
def test_reinforce_loop_on_categorical_raises_reward(method):
    """A one-token LM (logits over K items) trained on a programmatic reward learns to pick the best item."""
    k, batch, steps = 8, 16, 150
    reward_table = torch.tensor([0.0, 0.1, 0.0, 0.2, 0.0, 1.0, 0.3, 0.0])  # item 5 is best
    theta = torch.zeros(k, requires_grad=True)
    opt = torch.optim.SGD([theta], lr=0.5)
    gen = torch.Generator().manual_seed(4)

    def expected_reward() -> float:
        return float((torch.softmax(theta.detach(), 0) * reward_table).sum())

    start = expected_reward()
    for _ in range(steps):
        logp_all = torch.log_softmax(theta, 0)
        y = torch.multinomial(logp_all.exp().detach(), batch, replacement=True, generator=gen)
        logp = logp_all[y].unsqueeze(1)
        mask = torch.ones(batch, 1, dtype=torch.bool)
        if method == "reinforce":
            out = po.get_loss("reinforce")(logp, None, reward_table[y], mask)
        else:
            adv = rl.rloo_advantages(reward_table[y].view(batch // 4, 4)).reshape(-1)
            out = po.get_loss("rloo")(logp, None, adv, mask)
        opt.zero_grad()
        aggregate(out.loss, mask, "seq-mean-token-sum").backward()
        opt.step()
    assert start < 0.21
    assert expected_reward() > 0.9
    assert int(theta.argmax()) == 5


# ----------------------------------------------------------------------------------------------------------
# RLOO
# ----------------------------------------------------------------------------------------------------------


def test_rloo_k2_hand_values():
    logp = torch.tensor([[-1.0, -1.0], [-2.0, 0.0], [-0.5, -0.5], [-3.0, -1.0]], dtype=F64)
    mask = torch.tensor([[True, True], [True, False], [True, True], [True, True]])
    rewards = torch.tensor([[1.0, 4.0], [2.0, 2.0]], dtype=F64)
    out = rloo(logp, None, rl.rloo_advantages(rewards).reshape(-1), mask)
    # A = ±(R1 − R2): (−3, 3), (0, 0); S = (−2, −2, −1, −4); L = −A·S
    torch.testing.assert_close(
        seq_avg(out.metrics["advantages"], mask), torch.tensor([-3.0, 3.0, 0.0, 0.0], dtype=F64)
    )
    torch.testing.assert_close(
        seq(out.loss, mask), torch.tensor([-6.0, 6.0, 0.0, 0.0], dtype=F64), rtol=0, atol=0
    )


def test_rloo_clipped_form_same_gradient_on_policy_and_clips():
    gen = torch.Generator().manual_seed(5)
    logp = -torch.rand(6, 3, generator=gen, dtype=F64)
    mask = right_mask([3, 3, 2, 1, 3, 2], 3)
    rewards = torch.randn(2, 3, generator=gen, dtype=F64)
    adv = rl.rloo_advantages(rewards).reshape(-1)
    g_plain = grads_wrt(lambda x: rloo(x, None, adv, mask).loss, logp)
    g_clip = grads_wrt(lambda x: rloo(x, x.detach(), adv, mask, clip=0.2).loss, logp)
    torch.testing.assert_close(g_clip, g_plain, rtol=1e-12, atol=1e-14)
    # off-policy: shift old log-probs so every sequence ratio is e^{±1}: positive-A rows with ρ = e clip
    old = logp.clone()
    old[:, 0] -= torch.where(adv > 0, 1.0, -1.0).to(F64)  # ρ = e for A > 0, 1/e for A < 0: all clipped
    out = rloo(logp, old, adv, mask)
    assert (seq_avg(out.metrics["clipped"], mask) == 1).all()
    g = grads_wrt(lambda x: rloo(x, old, adv, mask).loss, logp)
    assert (g == 0).all()


def test_rloo_gradcheck_and_bad_input():
    gen = torch.Generator().manual_seed(6)
    logp = (-torch.rand(4, 3, generator=gen, dtype=F64)).requires_grad_()
    mask = right_mask([3, 1, 2, 3], 3)
    rewards = torch.randn(2, 2, generator=gen, dtype=F64)
    old = logp.detach() - 0.05
    adv = rl.rloo_advantages(rewards).reshape(-1)
    assert torch.autograd.gradcheck(lambda x: rloo(x, None, adv, mask).loss, (logp,))
    assert torch.autograd.gradcheck(lambda x: rloo(x, old, adv, mask).loss, (logp,))
    with pytest.raises(ValueError, match="rewards has groups of size 1"):
        rl.rloo_advantages(rewards.reshape(4, 1))
    with pytest.raises(ValueError, match="advantages has shape"):
        rloo(logp, None, rl.rloo_advantages(torch.zeros(3, 2, dtype=F64)).reshape(-1), mask)
    with pytest.raises(ValueError, match="rewards must be 2-D"):
        rl.rloo_advantages(torch.zeros(4, dtype=F64))
    with pytest.raises(ValueError, match="rewards has 1 non-finite"):
        rl.rloo_advantages(torch.tensor([[0.0, 1.0], [float("inf"), 0.0]], dtype=F64))
    with pytest.raises(ValueError, match="old_logp"):
        rloo(logp, old[:, :2], adv, mask)
    with pytest.raises(ValueError, match="clip"):
        rloo(logp, None, adv, mask, clip=0.0)


# ----------------------------------------------------------------------------------------------------------
# GRPO
# ----------------------------------------------------------------------------------------------------------


def test_grpo_ratio_one_gives_minus_advantage():
    gen = torch.Generator().manual_seed(7)
    logp = -torch.rand(3, 4, generator=gen, dtype=F64)
    mask = right_mask([4, 2, 3], 4)
    adv = torch.randn(3, generator=gen, dtype=F64)
    out = grpo(logp, logp, adv, mask)
    torch.testing.assert_close(
        out.loss, torch.where(mask, -adv.unsqueeze(1), 0.0).expand(3, 4), rtol=0, atol=0
    )
    out_none = grpo(logp, None, adv, mask)
    torch.testing.assert_close(out_none.loss, out.loss, rtol=0, atol=0)
    # gradient of −A·ρ at ρ = 1 is −A per valid token
    g = grads_wrt(lambda x: grpo(x, None, adv, mask).loss, logp)
    torch.testing.assert_close(g, torch.where(mask, -adv.unsqueeze(1), 0.0).expand(3, 4), rtol=0, atol=1e-15)


def test_grpo_clip_higher_gradients_per_token():
    # log-ratios chosen away from the clip boundaries; ε_low = 0.2, ε_high = 0.28
    log_ratio = torch.tensor([[0.1, 0.22, 0.3, -0.1, -0.3], [0.1, 0.22, 0.3, -0.1, -0.3]], dtype=F64)
    adv = torch.tensor([1.5, -0.7], dtype=F64)
    old = torch.full((2, 5), -1.0, dtype=F64)
    logp = old + log_ratio
    mask = torch.ones(2, 5, dtype=torch.bool)
    g = grads_wrt(lambda x: grpo(x, old, adv, mask, epsilon_low=0.2, epsilon_high=0.28).loss, logp)
    rho = log_ratio.exp()
    expected = torch.zeros(2, 5, dtype=F64)
    for i in range(2):
        for j in range(5):
            a, p = float(adv[i]), float(rho[i, j])
            clipped = (a > 0 and p > 1.28) or (a < 0 and p < 0.8)
            expected[i, j] = 0.0 if clipped else -a * p
    torch.testing.assert_close(g, expected, rtol=1e-12, atol=0)
    assert g[0, 1] != 0 and g[0, 2] == 0  # ρ = e^0.22 ≈ 1.246 passes with ε_high, clipped with ε = 0.2
    g_sym = grads_wrt(lambda x: grpo(x, old, adv, mask).loss, logp)
    assert g_sym[0, 1] == 0
    out = grpo(logp, old, adv, mask, epsilon_low=0.2, epsilon_high=0.28)
    torch.testing.assert_close(seq_avg(out.metrics["clip_high"], mask), torch.tensor([0.2, 0.0], dtype=F64))
    torch.testing.assert_close(seq_avg(out.metrics["clip_low"], mask), torch.tensor([0.0, 0.2], dtype=F64))


def test_grpo_kl_term_is_beta_k3():
    gen = torch.Generator().manual_seed(8)
    logp = -torch.rand(2, 3, generator=gen, dtype=F64)
    ref = -torch.rand(2, 3, generator=gen, dtype=F64)
    mask = right_mask([3, 2], 3)
    adv = torch.randn(2, generator=gen, dtype=F64)
    base = grpo(logp, None, adv, mask).loss
    with_kl = grpo(logp, None, adv, mask, ref_logp=ref, beta=0.04).loss
    k3 = torch.exp(ref - logp) - (ref - logp) - 1
    torch.testing.assert_close(with_kl - base, torch.where(mask, 0.04 * k3, 0.0), rtol=1e-12, atol=1e-15)
    g = grads_wrt(lambda x: grpo(x, None, torch.zeros(2, dtype=F64), mask, ref_logp=ref, beta=1.0).loss, logp)
    torch.testing.assert_close(g, torch.where(mask, 1 - torch.exp(ref - logp), 0.0), rtol=1e-12, atol=1e-15)
    with pytest.raises(ValueError, match="ref_logp is required"):
        grpo(logp, None, adv, mask, beta=0.1)


def test_grpo_aggregations_match_explicit_formulas_and_micro_batches():
    gen = torch.Generator().manual_seed(9)
    b, t = 4, 6
    logp = -torch.rand(b, t, generator=gen, dtype=F64)
    old = logp + 0.1 * torch.randn(b, t, generator=gen, dtype=F64)
    mask = right_mask([6, 1, 3, 5], t)
    adv = torch.randn(b, generator=gen, dtype=F64)
    raw = grpo(logp, old, adv, mask).loss
    L = 10
    explicit = {
        "seq-mean-token-mean": sum(float(raw[i][mask[i]].sum()) / int(mask[i].sum()) for i in range(b)) / b,
        "token-mean": float(raw.sum()) / int(mask.sum()),
        "seq-mean-token-sum-norm": float(raw.sum()) / (b * L),
    }
    assert (raw[~mask] == 0).all()
    for mode, val in explicit.items():
        kw = {"max_length": L} if mode == "seq-mean-token-sum-norm" else {}
        got = aggregate(grpo(logp, old, adv, mask).loss, mask, mode, **kw)
        assert math.isclose(float(got), val, rel_tol=1e-12), mode
    assert math.isclose(float(mean_of_seq_means(raw, mask)), explicit["seq-mean-token-mean"], rel_tol=1e-12)
    assert math.isclose(float(token_mean(raw, mask)), explicit["token-mean"], rel_tol=1e-12)
    # micro-batches with global counts add up to the whole-batch objective (and gradient)
    n_tok, n_seq = mask.sum(), b
    for mode in explicit:
        kw = {"max_length": L} if mode == "seq-mean-token-sum-norm" else {}
        whole = grads_wrt(
            lambda x, a=mode, kw=kw: aggregate(grpo(x, old, adv, mask).loss, mask, a, **kw), logp
        )
        counts = {"num_tokens": n_tok} if mode == "token-mean" else {"num_sequences": n_seq}
        parts = [
            grads_wrt(
                lambda x, a=mode, s=s, kw=kw, counts=counts: aggregate(
                    grpo(x, old[s], adv[s], mask[s]).loss, mask[s], a, **counts, **kw
                ),
                logp[s],
            )
            for s in (slice(0, 1), slice(1, 4))
        ]
        torch.testing.assert_close(torch.cat(parts), whole, rtol=1e-12, atol=1e-15)


def test_grpo_per_token_advantages_and_gradcheck():
    gen = torch.Generator().manual_seed(10)
    logp = (-torch.rand(2, 3, generator=gen, dtype=F64)).requires_grad_()
    old = logp.detach() + 0.05 * torch.randn(2, 3, generator=gen, dtype=F64)
    ref = -torch.rand(2, 3, generator=gen, dtype=F64)
    mask = right_mask([3, 2], 3)
    adv = torch.randn(2, generator=gen, dtype=F64)
    a = grpo(logp, old, adv, mask).loss
    b = grpo(logp, old, adv.unsqueeze(1).expand(2, 3).clone(), mask).loss
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert torch.autograd.gradcheck(lambda x: grpo(x, old, adv, mask, ref_logp=ref, beta=0.1).loss, (logp,))
    for mode in ("seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm"):
        kw = {"max_length": 4} if mode == "seq-mean-token-sum-norm" else {}
        assert torch.autograd.gradcheck(
            lambda x, g=mode, kw=kw: aggregate(
                grpo(x, old, adv, mask, ref_logp=ref, beta=0.1).loss, mask, g, **kw
            ),
            (logp,),
        )


def test_grpo_bad_input_and_hyperparameters():
    lp = torch.zeros(2, 3)
    m = torch.ones(2, 3, dtype=torch.bool)
    adv = torch.zeros(2)
    with pytest.raises(ValueError, match="max_length"):
        aggregate(grpo(lp, None, adv, m).loss, m, "seq-mean-token-sum-norm", max_length=0)
    with pytest.raises(ValueError, match="aggregation"):
        po.get_loss("grpo", aggregation="sum")
    with pytest.raises(ValueError, match="epsilon_high"):
        po.get_loss("grpo", epsilon_high=-0.1)
    with pytest.raises(ValueError, match="epsilon_low"):
        po.get_loss("grpo", epsilon_low=1.0)
    with pytest.raises(ValueError, match="beta"):
        po.get_loss("grpo", beta=-1.0)
    with pytest.raises(ValueError, match="advantages"):
        grpo(lp, None, torch.zeros(3), m)
    with pytest.raises(TypeError, match="mask"):
        grpo(lp, None, adv, m.long())
    with pytest.raises(ValueError, match="old_logp"):
        grpo(lp, torch.zeros(2, 4), adv, m)
    with pytest.raises(ValueError, match="num_tokens must be positive"):
        aggregate(grpo(lp, None, adv, m).loss, m, "token-mean", num_tokens=0)
    with pytest.raises(ValueError, match="advantages has 1 non-finite"):
        grpo(lp, None, torch.tensor([0.0, float("nan")]), m, check_finite=True)


# ----------------------------------------------------------------------------------------------------------
# PPO
# ----------------------------------------------------------------------------------------------------------


def test_ppo_ratio_one_gives_minus_advantage():
    gen = torch.Generator().manual_seed(11)
    logp = -torch.rand(2, 4, generator=gen, dtype=F64)
    mask = right_mask([4, 3], 4)
    adv = torch.randn(2, 4, generator=gen, dtype=F64)
    out = ppo(logp, logp, adv, mask)
    torch.testing.assert_close(out.loss, torch.where(mask, -adv, 0.0), rtol=0, atol=0)
    assert float(masked_mean(out.metrics["approx_kl"], mask)) == 0
    assert float(masked_mean(out.metrics["clip_frac"], mask)) == 0
    assert float(masked_mean(out.metrics["ratio"], mask)) == 1


def test_ppo_clip_removes_gradient_exactly_where_it_should():
    gen = torch.Generator().manual_seed(12)
    b, t, eps = 6, 8, 0.2
    old = -torch.rand(b, t, generator=gen, dtype=F64) * 3
    log_ratio = (torch.rand(b, t, generator=gen, dtype=F64) - 0.5) * 1.2  # ρ in [0.55, 1.82]
    near = ((log_ratio.exp() - 1).abs() - eps).abs() < 1e-3
    log_ratio[near] += 0.01  # keep away from the kinks
    logp = old + log_ratio
    adv = torch.randn(b, t, generator=gen, dtype=F64)
    mask = torch.rand(b, t, generator=gen) < 0.8
    g = grads_wrt(lambda x: ppo(x, old, adv, mask, clip=eps).loss, logp)
    expected = torch.zeros(b, t, dtype=F64)
    n_clipped = 0
    for i in range(b):
        for j in range(t):
            if not mask[i, j]:
                continue
            a, p = float(adv[i, j]), math.exp(float(log_ratio[i, j]))
            if (a > 0 and p > 1 + eps) or (a < 0 and p < 1 - eps):
                n_clipped += 1
            else:
                expected[i, j] = -a * p
    torch.testing.assert_close(g, expected, rtol=1e-12, atol=0)
    assert 3 < n_clipped < int(mask.sum()) - 3  # both regimes are exercised
    out = ppo(logp, old, adv, mask, clip=eps)
    assert math.isclose(
        float(masked_mean(out.metrics["clip_frac"], mask)), n_clipped / int(mask.sum()), rel_tol=1e-12
    )
    lr = log_ratio[mask]
    assert math.isclose(
        float(masked_mean(out.metrics["approx_kl"], mask)), float(0.5 * (lr**2).mean()), rel_tol=1e-12
    )


def test_ppo_dual_clip():
    old = torch.zeros(1, 4, dtype=F64)
    logp = torch.log(torch.tensor([[4.0, 2.0, 0.5, 4.0]], dtype=F64))
    adv = torch.tensor([[-1.0, -1.0, -1.0, 1.0]], dtype=F64)
    mask = torch.ones(1, 4, dtype=torch.bool)
    out = ppo(logp, old, adv, mask, clip=0.2, dual_clip=3.0)
    # A<0: ρ=4 > c → −c·A = 3; ρ=2 → −A·ρ = 2; ρ=0.5 < 0.8 → −A·0.8 = 0.8; A>0, ρ=4 → −1.2
    torch.testing.assert_close(out.loss, torch.tensor([[3.0, 2.0, 0.8, -1.2]], dtype=F64), rtol=1e-12, atol=0)
    g = grads_wrt(lambda x: ppo(x, old, adv, mask, clip=0.2, dual_clip=3.0).loss, logp)
    torch.testing.assert_close(g, torch.tensor([[0.0, 2.0, 0.0, 0.0]], dtype=F64), rtol=1e-12, atol=0)
    assert math.isclose(float(masked_mean(out.metrics["dual_clip_frac"], mask)), 0.25)
    no_dual = ppo(logp, old, adv, mask, clip=0.2)
    assert float(no_dual.loss[0, 0]) == 4.0
    with pytest.raises(ValueError, match="dual_clip"):
        po.get_loss("ppo", dual_clip=1.0)


def test_ppo_value_loss():
    zeros = torch.zeros(1, 4, dtype=F64)
    mask = torch.ones(1, 4, dtype=torch.bool)
    ret = torch.tensor([[1.0, 1.0, 1.0, 1.0]], dtype=F64)
    old_v = torch.tensor([[0.0, 0.0, 0.9, 2.0]], dtype=F64)
    v = torch.tensor([[1.0, 0.1, 1.2, 1.0]], dtype=F64)
    out = ppo(zeros, zeros, zeros, mask, values=v, old_values=old_v, returns=ret, vf_coef=1.0, value_clip=0.2)
    # V^clip = (0.2, 0.1, 1.1, 1.8): vf = ½·max((V−G)², (V^c−G)²) = ½·(0.64, 0.81, 0.04, 0.64)
    torch.testing.assert_close(
        out.loss, torch.tensor([[0.32, 0.405, 0.02, 0.32]], dtype=F64), rtol=1e-12, atol=0
    )
    g = grads_wrt(
        lambda x: ppo(zeros, zeros, zeros, mask, values=x, old_values=old_v, returns=ret, vf_coef=1.0).loss, v
    )
    # token 0: clipped side dominates → 0; token 1: inside the clip range → V − G; token 2: unclipped dominates;
    # token 3: clipped side dominates → 0
    torch.testing.assert_close(g, torch.tensor([[0.0, -0.9, 0.2, 0.0]], dtype=F64), rtol=1e-12, atol=1e-15)
    assert math.isclose(float(masked_mean(out.metrics["value_clip_frac"], mask)), 0.5)
    # V = Ĝ gives zero value loss when unclipped, or clipped with V inside the trust region around V_old ...
    at_target = ppo(zeros, zeros, zeros, mask, values=ret.clone(), old_values=ret.clone(), returns=ret)
    assert (at_target.loss == 0).all() and float(masked_mean(at_target.metrics["value_loss"], mask)) == 0
    at_target = ppo(zeros, zeros, zeros, mask, values=ret.clone(), returns=ret, value_clip=None)
    assert (at_target.loss == 0).all()
    # ... but the clipped loss is pessimistic: V = Ĝ far from V_old still pays ½(V^clip − Ĝ)²
    far = ppo(zeros, zeros, zeros, mask, values=ret.clone(), old_values=old_v, returns=ret, vf_coef=1.0)
    torch.testing.assert_close(
        far.loss, torch.tensor([[0.32, 0.32, 0.0, 0.32]], dtype=F64), rtol=1e-12, atol=0
    )
    unclipped = ppo(zeros, zeros, zeros, mask, values=v, returns=ret, vf_coef=1.0, value_clip=None)
    torch.testing.assert_close(unclipped.loss, 0.5 * (v - ret) ** 2, rtol=0, atol=0)


def test_ppo_entropy_bonus_and_gradcheck():
    gen = torch.Generator().manual_seed(13)
    logp = (-torch.rand(2, 3, generator=gen, dtype=F64)).requires_grad_()
    old = logp.detach() + 0.1 * torch.randn(2, 3, generator=gen, dtype=F64)
    adv = torch.randn(2, 3, generator=gen, dtype=F64)
    mask = right_mask([3, 2], 3)
    v = torch.randn(2, 3, generator=gen, dtype=F64, requires_grad=True)
    old_v = v.detach() + 0.1 * torch.randn(2, 3, generator=gen, dtype=F64)
    ret = torch.randn(2, 3, generator=gen, dtype=F64)
    ent = torch.rand(2, 3, generator=gen, dtype=F64, requires_grad=True)
    base = ppo(logp, old, adv, mask).loss
    with_ent = ppo(logp, old, adv, mask, entropy=ent, ent_coef=0.01).loss
    torch.testing.assert_close(with_ent - base, torch.where(mask, -0.01 * ent, 0.0), rtol=1e-12, atol=1e-15)
    assert torch.autograd.gradcheck(
        lambda a, b, c: (
            ppo(
                a,
                old,
                adv,
                mask,
                values=b,
                old_values=old_v,
                returns=ret,
                entropy=c,
                ent_coef=0.01,
                dual_clip=2.0,
            ).loss
        ),
        (logp, v, ent),
    )
    with pytest.raises(ValueError, match="entropy is required"):
        ppo(logp, old, adv, mask, ent_coef=0.1)


def test_ppo_bad_input():
    lp = torch.zeros(2, 3)
    m = torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(TypeError, match="mask"):
        ppo(lp, lp, lp, m.float())
    with pytest.raises(ValueError, match="old_logp"):
        ppo(lp, torch.zeros(3, 3), lp, m)
    with pytest.raises(ValueError, match="returns is required"):
        ppo(lp, lp, lp, m, values=lp)
    with pytest.raises(ValueError, match="old_values is required"):
        ppo(lp, lp, lp, m, values=lp, returns=lp)
    with pytest.raises(ValueError, match="clip"):
        po.get_loss("ppo", clip=0.0)
    with pytest.raises(ValueError, match="vf_coef"):
        po.get_loss("ppo", vf_coef=-1)
    with pytest.raises(ValueError, match="advantages has 1 non-finite"):
        bad = lp.clone()
        bad[0, 0] = float("inf")
        ppo(lp, lp, bad, m, check_finite=True)


@settings(max_examples=40, deadline=None)
@given(
    st.integers(1, 3),
    st.integers(1, 6),
    st.floats(-1e4, -1.0),
    st.sampled_from([torch.float32, torch.bfloat16, torch.float64]),
    st.integers(0, 2**31 - 1),
)
def test_token_losses_shapes_extremes_and_precision(b, t, floor, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    old = (torch.rand(b, t, generator=gen, dtype=F64) * floor).to(dtype)
    logp = (old.double() + (torch.rand(b, t, generator=gen, dtype=F64) - 0.5) * 4).to(dtype)  # |log ρ| ≤ 2
    ref = (torch.rand(b, t, generator=gen, dtype=F64) * floor).to(dtype)
    adv = torch.randn(b, t, generator=gen, dtype=F64).to(dtype)
    mask = torch.rand(b, t, generator=gen) < 0.7
    out_dtype = F64 if dtype == F64 else torch.float32
    for out in (
        po.get_loss("ppo", dual_clip=3.0)(logp, old, adv, mask),
        po.get_loss("grpo", beta=0.04)(logp, old, adv[:, 0], mask, ref_logp=ref),
    ):
        assert out.loss.shape == (b, t) and out.loss.dtype == out_dtype
        assert not torch.isnan(out.loss).any()
        assert (out.loss[~mask] == 0).all()
        for v in out.metrics.values():
            assert not torch.isnan(v).any()
    # with the dual clip, even an astronomically large ratio gives a finite loss
    huge = ppo(
        torch.zeros(1, 2),
        torch.full((1, 2), -1e4),
        torch.tensor([[-1.0, 1.0]]),
        torch.ones(1, 2, dtype=torch.bool),
        dual_clip=3.0,
    )
    assert torch.isfinite(huge.loss).all()


# ----------------------------------------------------------------------------------------------------------
# robustness: masked garbage never reaches the gradient; extreme ratios stay finite (issue 11)
# ----------------------------------------------------------------------------------------------------------

B, T = 4, 5
PG_LOSSES = ["reinforce", "rloo", "grpo", "gspo", "gspo_token", "cispo", "sapo", "ppo"]


def pg_inputs(seed: int, fill: float | None = None) -> dict[str, torch.Tensor]:
    """A random batch; with ``fill`` every masked position of every per-token input holds that value."""
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(B, T, generator=gen) < 0.6
    mask[0, 0] = True
    mask[3] = False  # a row with no token at all
    data = {
        "logp": -torch.rand(B, T, generator=gen, dtype=F64) * 3,
        "old_logp": -torch.rand(B, T, generator=gen, dtype=F64) * 3,
        "advantages": torch.randn(B, T, generator=gen, dtype=F64),
        "ref_logp": -torch.rand(B, T, generator=gen, dtype=F64) * 3,
        "values": torch.randn(B, T, generator=gen, dtype=F64),
        "old_values": torch.randn(B, T, generator=gen, dtype=F64),
        "returns": torch.randn(B, T, generator=gen, dtype=F64),
        "entropy": torch.rand(B, T, generator=gen, dtype=F64),
        "sampler_logp": -torch.rand(B, T, generator=gen, dtype=F64) * 3,
        "seq_advantages": torch.randn(B, generator=gen, dtype=F64),
    }
    if fill is not None:
        for k, v in data.items():
            if k == "seq_advantages":
                v[3] = fill  # the advantage of the row with no token
            else:
                v[~mask] = fill
    data["mask"] = mask
    return data


def call_pg(name: str, d: dict[str, torch.Tensor], logp: torch.Tensor, values: torch.Tensor):
    m = d["mask"]
    if name == "reinforce":
        return reinforce(logp, d["old_logp"], d["advantages"], m, values=values, returns=d["returns"])
    if name == "rloo":
        return rloo(logp, d["old_logp"], d["seq_advantages"], m)
    if name == "grpo":
        return grpo(
            logp,
            d["old_logp"],
            d["advantages"],
            m,
            ref_logp=d["ref_logp"],
            beta=0.1,
            sampler_logp=d["sampler_logp"],
        )
    if name == "gspo":
        return gspo(logp, d["old_logp"], d["seq_advantages"], m, ref_logp=d["ref_logp"], beta=0.1)
    if name == "gspo_token":
        return gspo_token(logp, d["old_logp"], d["advantages"], m, ref_logp=d["ref_logp"], beta=0.1)
    if name == "cispo":
        return cispo(logp, d["old_logp"], d["advantages"], m, ref_logp=d["ref_logp"], beta=0.1)
    if name == "sapo":
        return sapo(
            logp,
            d["old_logp"],
            d["advantages"],
            m,
            ref_logp=d["ref_logp"],
            beta=0.1,
            sampler_logp=d["sampler_logp"],
            correction="sequence_mask",
            correction_max=None,
        )
    return ppo(
        logp,
        d["old_logp"],
        d["advantages"],
        m,
        values=values,
        old_values=d["old_values"],
        returns=d["returns"],
        entropy=d["entropy"],
        ent_coef=0.01,
        dual_clip=3.0,
        sampler_logp=d["sampler_logp"],
        correction="token_mask",
        correction_min=0.1,
    )


@pytest.mark.parametrize("name", PG_LOSSES)
@pytest.mark.parametrize("fill", [float("nan"), float("inf"), -float("inf")])
def test_masked_garbage_never_reaches_loss_or_gradient(name, fill):
    clean, dirty = pg_inputs(0), pg_inputs(0, fill)
    mask = clean["mask"]
    results = []
    for d in (clean, dirty):
        logp = d["logp"].clone().requires_grad_(True)
        values = d["values"].clone().requires_grad_(True)
        out = call_pg(name, d, logp, values)
        total = aggregate(out.loss, mask, "token-mean")
        total.backward()
        results.append((out, total, logp.grad, values.grad))
    (out_c, tot_c, g_c, gv_c), (out_d, tot_d, g_d, gv_d) = results
    assert torch.isfinite(tot_d) and tot_d == tot_c
    torch.testing.assert_close(out_d.loss, out_c.loss, rtol=0, atol=0)  # garbage changes nothing at all
    torch.testing.assert_close(g_d, g_c, rtol=0, atol=0)
    assert torch.isfinite(g_d).all() and (g_d[~mask] == 0).all()
    if gv_d is not None:
        assert torch.isfinite(gv_d).all() and (gv_d[~mask] == 0).all()
        torch.testing.assert_close(gv_d, gv_c, rtol=0, atol=0)
    for k, v in out_d.metrics.items():
        assert v.shape == (B, T) and not v.requires_grad, k
        assert torch.isfinite(v).all() and (v[~mask] == 0).all(), k
        torch.testing.assert_close(v, out_c.metrics[k], rtol=0, atol=0)


@pytest.mark.parametrize("name", PG_LOSSES)
@pytest.mark.parametrize("log_ratio", [-1e4, -100.0, -30.0, 30.0, 100.0, 1e4])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_extreme_ratios_stay_finite_and_clipped_gradients_are_exactly_zero(name, log_ratio, dtype):
    d = {k: v.to(dtype) for k, v in pg_inputs(1).items() if k != "mask"}
    d["mask"] = mask = pg_inputs(1)["mask"]
    d["old_logp"] = d["logp"] - log_ratio
    d["ref_logp"] = d["logp"] + log_ratio  # k3 at the same extreme
    logp = d["logp"].clone().requires_grad_(True)
    out = call_pg(name, d, logp, d["values"].clone())
    aggregate(out.loss, mask, "token-mean").backward()
    assert torch.isfinite(out.loss).all() and torch.isfinite(logp.grad).all()
    for v in out.metrics.values():
        assert torch.isfinite(v).all()
    ratio = out.metrics["ratio"][mask]
    c = policy_gradient.LOG_RATIO_CLAMP
    # token ratios saturate at e^{±20}; so does rloo's sequence ratio (the log of its sum of ratios is clamped)
    expected = (
        math.exp(max(-c, min(c, log_ratio))) if name != "rloo" else math.exp(math.copysign(c, log_ratio))
    )
    torch.testing.assert_close(ratio, torch.full_like(ratio, expected), rtol=1e-6, atol=0)
    if name in ("grpo", "gspo", "gspo_token", "ppo"):
        # every token is either clipped (gradient exactly 0) or saturated by the clamp (gradient exactly 0) in
        # the policy term; only GRPO's KL term (its log-ratio is clamped too) and PPO's entropy term remain
        adv = d["advantages"]
        on_clip_side = ((adv > 0) & (log_ratio > 0)) | ((adv < 0) & (log_ratio < 0))
        if name in ("grpo", "gspo"):
            assert (logp.grad[mask] == 0).all()  # the k3 log-ratio is clamped as well: saturated
        elif name == "gspo_token":  # the clamp bounds only the stop-gradient value s_i
            assert (logp.grad[mask & on_clip_side] == 0).all()
        else:
            assert (logp.grad[mask & on_clip_side] == 0).all()
            assert (logp.grad[mask] == 0).all()  # the other side is saturated by the clamp (or dual-clipped)


@pytest.mark.parametrize("name", ["grpo", "ppo", "rloo", "reinforce", "gspo", "gspo_token", "cispo", "sapo"])
def test_zero_advantage_gives_exactly_zero_loss_and_gradient_at_any_ratio(name):
    d = pg_inputs(2)
    mask = d["mask"]
    d["advantages"] = torch.zeros(B, T, dtype=F64)
    d["seq_advantages"] = torch.zeros(B, dtype=F64)
    d["old_logp"] = d["logp"] - torch.tensor([1e4, -1e4, 50.0, 0.0, 0.0])
    logp = d["logp"].clone().requires_grad_(True)
    m = d["mask"]
    if name == "grpo":
        out = grpo(logp, d["old_logp"], d["advantages"], m)
    elif name == "ppo":
        out = ppo(logp, d["old_logp"], d["advantages"], m)
    elif name == "rloo":
        out = rloo(logp, d["old_logp"], d["seq_advantages"], m)
    elif name == "gspo":
        out = gspo(logp, d["old_logp"], d["seq_advantages"], m)
    elif name == "gspo_token":
        out = gspo_token(logp, d["old_logp"], d["advantages"], m)
    elif name == "cispo":
        out = cispo(logp, d["old_logp"], d["advantages"], m)
    elif name == "sapo":
        out = sapo(logp, d["old_logp"], d["advantages"], m)
    else:
        out = reinforce(logp, d["old_logp"], d["advantages"], m)
    aggregate(out.loss, mask, "token-mean").backward()
    assert (out.loss == 0).all() and (logp.grad == 0).all()


def test_extreme_ratio_behaviour_is_the_documented_saturation():
    """Beyond ±20 the ratio is e^{±20}: PPO without dual clip pays −A·e^20 (finite), with zero gradient."""
    mask = torch.ones(1, 2, dtype=torch.bool)
    logp = torch.tensor([[0.0, 0.0]], dtype=F64, requires_grad=True)
    old = torch.tensor([[-30.0, -19.0]], dtype=F64)
    adv = torch.tensor([[-1.0, -1.0]], dtype=F64)
    out = ppo(logp, old, adv, mask)
    torch.testing.assert_close(out.loss, torch.tensor([[math.exp(20.0), math.exp(19.0)]], dtype=F64))
    out.loss.sum().backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, math.exp(19.0)]], dtype=F64))
    # k3 of GRPO: the reference log-ratio is clamped the same way, so the KL term is at most e^20 − 21
    kl = grpo(logp, None, adv[:, 0], mask, ref_logp=torch.tensor([[1e4, -1e4]], dtype=F64), beta=1.0).metrics[
        "kl"
    ]
    torch.testing.assert_close(
        kl, torch.tensor([[math.expm1(20.0) - 20.0, math.expm1(-20.0) + 20.0]], dtype=F64)
    )


# ----------------------------------------------------------------------------------------------------------
# TRL GRPOTrainer._compute_loss, run on a stub (no model, no trainer): every loss_type = grpo + aggregate
# ----------------------------------------------------------------------------------------------------------

TRL_MODES = {
    "grpo": "seq-mean-token-mean",
    "bnpo": "token-mean",  # local token count
    "dr_grpo": "seq-mean-token-sum-norm",  # max_length = max_completion_length
    "dapo": "token-mean",  # global token count: num_items_in_batch
    "luspo": "seq-mean-token-sum",
}


def _trl_grpo_loss(
    loss_type: str, logp, old, ref, adv, mask, *, beta, eps_low, eps_high, max_len, n_items, level="token"
):
    from collections import defaultdict
    from types import SimpleNamespace

    grpo_trainer = pytest.importorskip("trl.trainer.grpo_trainer")
    b, t = logp.shape
    stub = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logp, torch.zeros_like(logp), None),
        aux_loss_enabled=False,
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        importance_sampling_level=level,
        beta=beta,
        loss_type=loss_type,
        epsilon_low=eps_low,
        epsilon_high=eps_high,
        use_vllm=False,
        model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1,
        accelerator=SimpleNamespace(
            num_processes=1,
            gather=lambda x: x,
            gather_for_metrics=lambda x: x,
            reduce=lambda x, reduction="sum": x,
        ),
        _entropy_bonus_enabled=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        max_completion_length=max_len,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1),
    )
    inputs = {
        "prompt_ids": torch.zeros(b, 1, dtype=torch.long),
        "prompt_mask": torch.ones(b, 1, dtype=torch.long),
        "completion_ids": torch.zeros(b, t, dtype=torch.long),
        "completion_mask": mask.long(),
        "advantages": adv,
        "old_per_token_logps": old,
        "ref_per_token_logps": ref,
        "num_items_in_batch": torch.tensor(float(n_items), dtype=logp.dtype),
    }
    return grpo_trainer.GRPOTrainer._compute_loss(stub, None, inputs)


@pytest.mark.slow
@pytest.mark.parametrize("loss_type", list(TRL_MODES))
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_grpo_aggregate_matches_trl_compute_loss(loss_type, beta):
    """TRL 1.16's own ``GRPOTrainer._compute_loss`` (on a stub ``self``: no model, no trainer) against
    ``aggregate(grpo(...).loss, mask, mode)``: value and gradient, for each ``loss_type``."""
    gen = torch.Generator().manual_seed(20)
    b, t, max_len = 6, 7, 9
    logp0 = -torch.rand(b, t, generator=gen, dtype=F64) * 2
    old = logp0 + 0.3 * torch.randn(b, t, generator=gen, dtype=F64)  # many tokens clipped either way
    ref = logp0 + 0.5 * torch.randn(b, t, generator=gen, dtype=F64)
    adv = torch.randn(b, generator=gen, dtype=F64)
    mask = torch.rand(b, t, generator=gen) < 0.7
    mask[:, 0] = True
    n_items = int(mask.sum())
    lp_trl = logp0.clone().requires_grad_(True)
    trl_loss = _trl_grpo_loss(
        loss_type,
        lp_trl,
        old,
        ref,
        adv,
        mask,
        beta=beta,
        eps_low=0.2,
        eps_high=0.28,
        max_len=max_len,
        n_items=n_items,
    )
    trl_loss.backward()
    mode = TRL_MODES[loss_type]
    kw: dict = {}
    if loss_type == "dr_grpo":
        kw["max_length"] = max_len
    if loss_type == "dapo":
        kw["num_tokens"] = n_items
    lp = logp0.clone().requires_grad_(True)
    ours = aggregate(
        grpo(lp, old, adv, mask, ref_logp=ref, beta=beta, epsilon_low=0.2, epsilon_high=0.28).loss,
        mask,
        mode,
        **kw,
    )
    ours.backward()
    torch.testing.assert_close(ours, trl_loss.detach(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(lp.grad, lp_trl.grad, rtol=1e-12, atol=1e-14)
    assert lp.grad.abs().sum() > 0


# ----------------------------------------------------------------------------------------------------------
# GSPO / GSPO-token
# ----------------------------------------------------------------------------------------------------------


def test_gspo_matches_loop_oracle_value_and_gradient():
    """Python-float oracle of the sequence ratio and the per-sequence clipped surrogate, and its hand gradient."""
    gen = torch.Generator().manual_seed(30)
    b, t, lo, hi = 5, 6, 0.1, 0.15
    logp = -torch.rand(b, t, generator=gen, dtype=F64)
    old = logp + 0.2 * torch.randn(b, t, generator=gen, dtype=F64)
    adv = torch.randn(b, generator=gen, dtype=F64)
    mask = right_mask([6, 1, 4, 3, 5], t)
    x = logp.clone().requires_grad_(True)
    out = gspo(x, old, adv, mask, epsilon_low=lo, epsilon_high=hi)
    aggregate(out.loss, mask, "seq-mean-token-mean").backward()
    total, grad = 0.0, torch.zeros(b, t, dtype=F64)
    n_clipped = 0
    for i in range(b):
        idx = [j for j in range(t) if mask[i, j]]
        s_i = math.exp(sum(float(logp[i, j] - old[i, j]) for j in idx) / len(idx))
        a = float(adv[i])
        clipped = (a > 0 and s_i > 1 + hi) or (a < 0 and s_i < 1 - lo)
        n_clipped += clipped
        total += -min(s_i * a, min(max(s_i, 1 - lo), 1 + hi) * a) / b
        for j in idx:
            grad[i, j] = 0.0 if clipped else -a * s_i / len(idx) / b
        torch.testing.assert_close(out.metrics["ratio"][i, idx], torch.full((len(idx),), s_i, dtype=F64))
    assert 0 < n_clipped < b  # both regimes
    assert math.isclose(float(aggregate(out.loss, mask, "seq-mean-token-mean")), total, rel_tol=1e-12)
    torch.testing.assert_close(x.grad, grad, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("shift", [0.0, 0.05, 0.3, -0.3])
def test_gspo_token_equals_gspo_for_sequence_advantages(shift):
    """[R] (a): with A_{i,t} ≡ A_i, GSPO-token and GSPO agree in value and gradient, inside and outside the band."""
    gen = torch.Generator().manual_seed(31)
    b, t = 6, 5
    logp = -torch.rand(b, t, generator=gen, dtype=F64)
    old = logp - shift + 0.02 * torch.randn(b, t, generator=gen, dtype=F64)
    adv = torch.randn(b, generator=gen, dtype=F64)
    mask = torch.rand(b, t, generator=gen) < 0.7
    mask[:, 0] = True
    kw = {"epsilon_low": 0.1, "epsilon_high": 0.12, "beta": 0.05}
    ref = logp + 0.1 * torch.randn(b, t, generator=gen, dtype=F64)
    outs = []
    for fn, a in ((gspo, adv), (gspo_token, adv.unsqueeze(1).expand(b, t).clone())):
        x = logp.clone().requires_grad_(True)
        out = fn(x, old, a, mask, ref_logp=ref, **kw)
        aggregate(out.loss, mask, "seq-mean-token-mean").backward()
        outs.append((out, x.grad))
    (o1, g1), (o2, g2) = outs
    torch.testing.assert_close(o2.loss, o1.loss, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(g2, g1, rtol=1e-12, atol=1e-15)
    for k in o1.metrics:
        torch.testing.assert_close(o2.metrics[k], o1.metrics[k], rtol=1e-12, atol=1e-15)


def test_gspo_on_policy_gradient_equals_grpo_and_ratio_is_length_free():
    """[R] (b) on-policy GSPO gradient = GRPO's SEQ gradient −(A_i/|y_i|) Σ_t ∇ℓ; (c) s_i = e^δ for any |y_i|."""
    gen = torch.Generator().manual_seed(32)
    b, t = 4, 50
    logp = -torch.rand(b, t, generator=gen, dtype=F64)
    adv = torch.randn(b, generator=gen, dtype=F64)
    mask = right_mask([50, 7, 1, 23], t)
    g_gspo = grads_wrt(
        lambda x: aggregate(gspo(x, x.detach(), adv, mask).loss, mask, "seq-mean-token-mean"), logp
    )
    g_grpo = grads_wrt(lambda x: aggregate(grpo(x, None, adv, mask).loss, mask, "seq-mean-token-mean"), logp)
    torch.testing.assert_close(g_gspo, g_grpo, rtol=1e-12, atol=1e-15)
    lengths = mask.sum(-1, keepdim=True).double()
    torch.testing.assert_close(
        g_gspo, torch.where(mask, -adv.unsqueeze(1) / lengths / b, 0.0), rtol=1e-12, atol=0
    )
    delta = math.log(1.02)
    s = gspo(logp, logp - delta, adv, mask).metrics["ratio"]
    torch.testing.assert_close(s[mask], torch.full((int(mask.sum()),), 1.02, dtype=F64), rtol=1e-12, atol=0)
    assert math.isclose(1.02**50, 2.69, rel_tol=1e-3)  # the product ratio a token-level view would see


def test_gspo_whole_sequence_clipped_has_zero_gradient_and_gradcheck():
    """[R] (d): s_i outside the band on the pessimistic side removes the gradient of every token of y_i."""
    gen = torch.Generator().manual_seed(33)
    logp = (-torch.rand(3, 4, generator=gen, dtype=F64)).requires_grad_()
    mask = right_mask([4, 2, 3], 4)
    adv = torch.tensor([1.0, -1.0, 0.5], dtype=F64)
    # row 0: A > 0, s = e^0.5 > 1 + ε_high; row 1: A < 0, s = e^-0.5 < 1 − ε_low; row 2: inside (s = 1)
    old = logp.detach() - torch.tensor([[0.5], [-0.5], [0.0]], dtype=F64)
    for fn in (gspo, gspo_token):
        g = grads_wrt(lambda x, fn=fn: fn(x, old, adv, mask, epsilon_low=0.2, epsilon_high=0.28).loss, logp)
        assert (g[:2] == 0).all() and (g[2][mask[2]] != 0).all()
    old = logp.detach() + 0.03 * torch.randn(3, 4, generator=gen, dtype=F64)
    ref = logp.detach() + 0.1 * torch.randn(3, 4, generator=gen, dtype=F64)
    # gspo only: gspo_token's value is built with stop-gradients, so by design its gradient is not the
    # derivative of its value (it is checked against gspo's gradient instead)
    assert torch.autograd.gradcheck(lambda x: gspo(x, old, adv, mask, ref_logp=ref, beta=0.1).loss, (logp,))


def test_gspo_bad_input():
    lp = torch.zeros(2, 3)
    m = torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="advantages must have 1 dimension"):
        gspo(lp, None, torch.zeros(2, 3), m)
    with pytest.raises(ValueError, match="ref_logp is required"):
        gspo(lp, None, torch.zeros(2), m, beta=0.1)
    with pytest.raises(ValueError, match="gspo_token: hyperparameter epsilon_low"):
        po.get_loss("gspo_token", epsilon_low=1.0)
    with pytest.raises(ValueError, match="gspo: hyperparameter epsilon_high"):
        po.get_loss("gspo", epsilon_high=-1.0)
    with pytest.raises(TypeError, match="mask"):
        gspo_token(lp, None, torch.zeros(2), m.long())


@pytest.mark.slow
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_gspo_matches_trl_sequence_importance_sampling(beta):
    """TRL 1.16 ``importance_sampling_level="sequence"`` with ``loss_type="grpo"`` is GSPO + seq-mean-token-mean."""
    gen = torch.Generator().manual_seed(34)
    b, t = 6, 7
    logp0 = -torch.rand(b, t, generator=gen, dtype=F64) * 2
    old = logp0 + 0.15 * torch.randn(b, t, generator=gen, dtype=F64)
    ref = logp0 + 0.5 * torch.randn(b, t, generator=gen, dtype=F64)
    adv = torch.randn(b, generator=gen, dtype=F64)
    mask = torch.rand(b, t, generator=gen) < 0.7
    mask[:, 0] = True
    kw = {"eps_low": 0.05, "eps_high": 0.07}
    lp_trl = logp0.clone().requires_grad_(True)
    trl_loss = _trl_grpo_loss(
        "grpo",
        lp_trl,
        old,
        ref,
        adv,
        mask,
        beta=beta,
        max_len=t,
        n_items=int(mask.sum()),
        level="sequence",
        **kw,
    )
    trl_loss.backward()
    lp = logp0.clone().requires_grad_(True)
    out = gspo(lp, old, adv, mask, ref_logp=ref, beta=beta, epsilon_low=0.05, epsilon_high=0.07)
    ours = aggregate(out.loss, mask, "seq-mean-token-mean")
    ours.backward()
    clipped = masked_mean(out.metrics["clip_low"] + out.metrics["clip_high"], mask, dim=-1)
    assert 0 < int((clipped > 0).sum()) < b  # both regimes
    torch.testing.assert_close(ours, trl_loss.detach(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(lp.grad, lp_trl.grad, rtol=1e-12, atol=1e-14)


# ----------------------------------------------------------------------------------------------------------
# CISPO
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kw", "lo", "hi"),
    [
        ({}, 0.0, 5.0),
        ({"max_weight": 1.1}, 0.0, 1.1),
        ({"bounds": "two_sided", "epsilon_low": 0.1, "epsilon_high": 0.15}, 0.9, 1.15),
    ],
)
def test_cispo_matches_loop_oracle_value_and_gradient(kw, lo, hi):
    """Python-float oracle: l = −min(max(ρ, lo), hi)·A·ℓ, gradient −ŵ·A at unmasked tokens, 0 elsewhere."""
    gen = torch.Generator().manual_seed(40)
    b, t = 5, 6
    logp = -torch.rand(b, t, generator=gen, dtype=F64) * 2
    old = logp + torch.randn(b, t, generator=gen, dtype=F64)  # ratios from ~0.1 to ~10: every regime
    adv = torch.randn(b, t, generator=gen, dtype=F64)
    mask = right_mask([6, 1, 4, 3, 5], t)
    x = logp.clone().requires_grad_(True)
    out = cispo(x, old, adv, mask, **kw)
    out.loss.sum().backward()
    n_low = n_high = n_in = 0
    for i in range(b):
        for j in range(t):
            if not mask[i, j]:
                assert out.loss[i, j] == 0 and x.grad[i, j] == 0
                continue
            rho = math.exp(float(logp[i, j] - old[i, j]))
            w = min(max(rho, lo), hi)
            n_low += rho < lo
            n_high += rho > hi
            n_in += lo <= rho <= hi
            a, lp_ij = float(adv[i, j]), float(logp[i, j])
            assert math.isclose(float(out.loss.detach()[i, j]), -w * a * lp_ij, rel_tol=1e-12, abs_tol=1e-15)
            assert math.isclose(float(x.grad[i, j]), -w * a, rel_tol=1e-12, abs_tol=1e-15)
            assert math.isclose(float(out.metrics["weight"][i, j]), w, rel_tol=1e-12)
            assert math.isclose(float(out.metrics["ratio"][i, j]), rho, rel_tol=1e-12)
            assert bool(out.metrics["clip_high"][i, j]) == (rho > hi)
    assert n_high > 0 and n_in > 0 and (n_low > 0 or lo == 0.0)


def test_cispo_gradient_is_stop_gradient_weighted_pg_and_never_zero():
    """[R] The gradient is sg(clip(ρ))·A·∇ℓ (negated); on-policy it is plain PG (−A∇ℓ) with 1 ∈ [lo, hi], and
    exactly C× that with a cap C < 1 (TRL's footgun); a capped token with A > 0 keeps gradient −C·A (PPO: 0)."""
    gen = torch.Generator().manual_seed(41)
    b, t = 4, 5
    logp = -torch.rand(b, t, generator=gen, dtype=F64)
    adv = torch.randn(b, generator=gen, dtype=F64)
    mask = torch.rand(b, t, generator=gen) < 0.7
    mask[:, 0] = True
    plain = grads_wrt(lambda x: aggregate(reinforce(x, None, adv, mask).loss, mask, "token-mean"), logp)
    for kw in ({}, {"bounds": "two_sided"}, {"max_weight": 1.0}):
        g = grads_wrt(
            lambda x, kw=kw: aggregate(cispo(x, None, adv, mask, **kw).loss, mask, "token-mean"), logp
        )
        torch.testing.assert_close(g, plain, rtol=1e-12, atol=0)
    g = grads_wrt(
        lambda x: aggregate(cispo(x, None, adv, mask, max_weight=0.2).loss, mask, "token-mean"), logp
    )
    torch.testing.assert_close(g, 0.2 * plain, rtol=1e-12, atol=0)
    # far off-policy, A > 0: PPO's gradient is exactly 0, CISPO's is −C·A·∇ℓ
    old = logp - 2.0  # ρ = e² > 5
    pos = torch.ones(b, dtype=F64)
    g_ppo = grads_wrt(lambda x: ppo(x, old, pos, mask).loss, logp)
    g_cispo = grads_wrt(lambda x: cispo(x, old, pos, mask).loss, logp)
    assert (g_ppo == 0).all()
    torch.testing.assert_close(g_cispo, torch.where(mask, -5.0, 0.0).to(F64), rtol=1e-12, atol=0)


def test_cispo_gradcheck_kl_term_and_bad_input():
    gen = torch.Generator().manual_seed(42)
    logp = (-torch.rand(3, 4, generator=gen, dtype=F64)).requires_grad_()
    mask = right_mask([4, 2, 3], 4)
    old = logp.detach() + 0.5 * torch.randn(3, 4, generator=gen, dtype=F64)
    ref = logp.detach() + 0.3 * torch.randn(3, 4, generator=gen, dtype=F64)
    adv = torch.randn(3, generator=gen, dtype=F64)
    # on-policy the weight is a constant 1, so the value's derivative is the loss's gradient
    assert torch.autograd.gradcheck(lambda x: cispo(x, None, adv, mask, ref_logp=ref, beta=0.1).loss, (logp,))
    # the KL term is GRPO's β·k3, exactly
    with_kl = cispo(logp, old, adv, mask, ref_logp=ref, beta=0.1)
    without = cispo(logp, old, adv, mask)
    kl = grpo(logp, old, adv, mask, ref_logp=ref).metrics["kl"]
    torch.testing.assert_close(with_kl.loss - without.loss, 0.1 * kl, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(with_kl.metrics["kl"], kl, rtol=0, atol=0)
    lp = torch.zeros(2, 3)
    m = torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="ref_logp is required"):
        cispo(lp, None, torch.zeros(2), m, beta=0.1)
    with pytest.raises(ValueError, match="bounds"):
        po.get_loss("cispo", bounds="upper_abs")
    with pytest.raises(ValueError, match="max_weight"):
        po.get_loss("cispo", max_weight=0.0)
    with pytest.raises(ValueError, match="cispo: hyperparameter epsilon_low"):
        po.get_loss("cispo", bounds="two_sided", epsilon_low=1.0)
    with pytest.raises(ValueError, match="advantages"):
        cispo(lp, None, torch.zeros(3), m)
    with pytest.raises(TypeError, match="mask"):
        cispo(lp, None, torch.zeros(2), m.long())


@pytest.mark.slow
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("cap", [5.0, 1.2])
def test_cispo_matches_trl_compute_loss(beta, cap):
    """TRL 1.16 ``loss_type="cispo"`` (cap = its ``epsilon_high``, token-level, sum / num_items_in_batch) is
    ``aggregate(cispo(..., max_weight=cap).loss, mask, "token-mean", num_tokens=num_items)``: value and gradient."""
    gen = torch.Generator().manual_seed(43)
    b, t = 6, 7
    logp0 = -torch.rand(b, t, generator=gen, dtype=F64) * 2
    old = logp0 + 1.5 * torch.randn(b, t, generator=gen, dtype=F64)  # ratios up to ~e^3: some capped at 5
    ref = logp0 + 0.5 * torch.randn(b, t, generator=gen, dtype=F64)
    adv = torch.randn(b, generator=gen, dtype=F64)
    mask = torch.rand(b, t, generator=gen) < 0.7
    mask[:, 0] = True
    n_items = int(mask.sum()) + 3  # a global count larger than the local one
    lp_trl = logp0.clone().requires_grad_(True)
    trl_loss = _trl_grpo_loss(
        "cispo", lp_trl, old, ref, adv, mask, beta=beta, eps_low=0.2, eps_high=cap, max_len=t, n_items=n_items
    )
    trl_loss.backward()
    lp = logp0.clone().requires_grad_(True)
    out = cispo(lp, old, adv, mask, ref_logp=ref, beta=beta, max_weight=cap)
    ours = aggregate(out.loss, mask, "token-mean", num_tokens=n_items)
    ours.backward()
    capped = out.metrics["clip_high"][mask]
    assert 0 < int(capped.sum()) < int(mask.sum())  # both regimes
    torch.testing.assert_close(ours, trl_loss.detach(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(lp.grad, lp_trl.grad, rtol=1e-12, atol=1e-14)
