"""Extreme but valid inputs give a finite loss and finite gradients, or a clear error (never inf/NaN).

The class of bug: squared and exponential terms (IPO, SPPO-hard, DiscoPOP with ``tau > 1``) and the BOND /
J-BOND surrogate products overflowed to ``inf`` (and, for DiscoPOP, a NaN gradient) at log-ratios like
``−1e30``; ``beta = 1e-30`` was accepted although its IPO target ``1/(2β)`` cannot be squared in float32.
Oracles: float64 autograd of the plain formulas (gradients) and the hand formulas (values below the clamp).
"""

from __future__ import annotations

import math

import pytest
import torch

from prefopt.losses.margin import saturating_product
from prefopt.registry import get_loss
from prefopt.types import BestOfNSamples, PairLogps

SAT = math.exp(40.0)


def pair(cw: float, dtype=torch.float32) -> PairLogps:
    def t(v):
        return torch.tensor([v, -1.0], dtype=dtype, requires_grad=True)

    z = torch.zeros(2, dtype=dtype)
    return PairLogps(t(cw), t(-2.0), z, z, torch.tensor([3, 1]), torch.tensor([2, 1]))


def finite_loss_and_grads(out, *leaves):
    out.loss.mean().backward()
    assert torch.isfinite(out.loss).all(), out.loss
    for leaf in leaves:
        assert leaf.grad is not None and torch.isfinite(leaf.grad).all(), leaf.grad
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("value", [-1e30, 1e30, -3e38, 3e38])
@pytest.mark.parametrize(
    ("name", "hp"),
    [
        ("ipo", {}),
        ("ipo", {"beta": 1e-8}),
        ("sppo_hard", {}),
        ("sppo_hard", {"beta": 1e-8}),
        ("discopop", {"tau": 2.0, "beta": 1.0}),
        ("discopop", {"tau": 50.0}),
        ("discopop", {}),
        ("dpo", {}),
    ],
)
def test_pair_losses_finite_at_extreme_logratios(name, hp, value, dtype):
    lp = pair(value, dtype)
    out = finite_loss_and_grads(get_loss(name, **hp)(lp), lp.chosen, lp.rejected)
    # the ordinary second row is untouched by the first row's extreme value
    ordinary = pair(0.0, dtype)
    ref = get_loss(name, **hp)(ordinary).loss
    assert out.loss[1].item() == ref[1].item()


@pytest.mark.parametrize("margin", [-1e4, -1e3, -100.0])
def test_discopop_tau_above_one_gradient_matches_unclamped_term(margin):
    """At a margin where the exp term saturates, the gradient is that of the −log σ(z)·σ(−z/τ) term alone."""
    lp = pair(margin)
    out = get_loss("discopop", beta=1.0, tau=2.0)(lp)
    out.loss[0].backward()
    z = torch.tensor(margin + 2.0, dtype=torch.float64, requires_grad=True)  # h = ρ_w − ρ_l, β = 1
    (-torch.nn.functional.logsigmoid(z) * torch.sigmoid(-z / 2.0)).backward()
    assert out.loss[0].item() >= SAT * (1 - 1e-6)
    assert lp.chosen.grad[0].item() == pytest.approx(z.grad.item(), rel=1e-6)


@pytest.mark.parametrize("name", ["ipo", "sppo_hard"])
@pytest.mark.parametrize("beta", [1e-30, 1e-9, 0.0, -1.0])
def test_square_losses_reject_tiny_beta(name, beta):
    with pytest.raises(ValueError, match=r"beta=.*>= 1e-08"):
        get_loss(name, beta=beta)


@pytest.mark.parametrize("name", ["bond", "jbond"])
@pytest.mark.parametrize("value", [-1e30, -1e20, -3e38])
def test_bond_losses_finite_with_one_extreme_row(name, value):
    k = 4 if name == "bond" else 2
    logp = torch.tensor([value, -1.0, -2.0], requires_grad=True)
    best = torch.tensor([-1.0, -1.5, -0.5], requires_grad=True)
    samples = BestOfNSamples(
        logp=logp,
        ref_logp=torch.zeros(3),
        reward=torch.tensor([0.0, 1.0, 2.0]),
        ref_rewards=torch.zeros(3, k),
        best_logp=best,
    )
    hp = {"gamma": 0.5} if name == "jbond" else {}
    out = finite_loss_and_grads(get_loss(name, **hp)(samples), logp, best)
    assert all(torch.isfinite(v).all() for v in out.metrics.values())
    # the gradient is the exact surrogate gradient: −β·(R − B) for the backward term (plus γ·KL for jbond)
    adv = out.metrics["bond/advantage" if name == "bond" else "jbond/advantage"].double()
    kl = torch.tensor([value, -1.0, -2.0], dtype=torch.float64)
    want = (-0.5 * adv + (0.5 * kl if name == "jbond" else 0.0)) / 3
    torch.testing.assert_close(logp.grad.double(), want, rtol=1e-6, atol=0)


def test_saturating_product_is_exact_below_the_clamp():
    g = torch.Generator().manual_seed(0)
    a = (torch.randn(50, generator=g, dtype=torch.float64) * 1e3).requires_grad_()
    b = (torch.randn(50, generator=g, dtype=torch.float64) * 1e3).requires_grad_()
    assert torch.equal(saturating_product(a, b), a * b)
    assert torch.autograd.gradcheck(saturating_product, (a, b))
    sq = saturating_product(a, a)
    assert torch.equal(sq, a * a)
    (ga,) = torch.autograd.grad(sq.sum(), a)
    assert torch.equal(ga, 2 * a.detach())
    # beyond the clamp: the value saturates, the gradient does not
    x = torch.tensor([1e30, -1e30, 3e38], requires_grad=True)
    y = saturating_product(x, x)
    assert y.tolist() == [pytest.approx(SAT)] * 3
    y.sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad[0].item() == pytest.approx(2e30)
    assert x.grad[2].item() == pytest.approx(torch.finfo(torch.float32).max)  # 2·3e38 is not representable
