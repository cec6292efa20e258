"""Tests of the reference-free losses (prefopt.losses.reference_free): SimPO, CPO, ORPO, RRHF, SLiC.

Oracles: hand-derived numbers with plain ``math``; TRL 1.16's experimental CPO/ORPO formulas transcribed
below (``cpo_loss``, ``odds_ratio_loss``, the CE term) from reading ``trl/experimental/{cpo,orpo}`` — TRL is
not imported; float64 gradcheck; hypothesis properties.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import prefopt.registry as reg
from prefopt.losses import reference_free as rf
from prefopt.types import PairLogps

NAMES = ["simpo", "cpo", "orpo", "rrhf", "slic"]
LOG2 = math.log(2.0)


def logsig(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x > 0 else x - math.log1p(math.exp(x))


def lp_of(sw, sl, nw, nl, dtype=torch.float64, grad=False) -> PairLogps:
    c = torch.tensor(sw, dtype=dtype).requires_grad_(grad)
    r = torch.tensor(sl, dtype=dtype).requires_grad_(grad)
    return PairLogps(c, r, chosen_len=torch.tensor(nw), rejected_len=torch.tensor(nl))


def random_lp(b=5, seed=0, grad=False) -> PairLogps:
    g = torch.Generator().manual_seed(seed)
    nw = torch.randint(1, 12, (b,), generator=g)
    nl = torch.randint(1, 12, (b,), generator=g)
    c = -(torch.rand(b, generator=g, dtype=torch.float64) * 2 + 0.05) * nw
    r = -(torch.rand(b, generator=g, dtype=torch.float64) * 2 + 0.05) * nl
    return PairLogps(c.requires_grad_(grad), r.requires_grad_(grad), chosen_len=nw, rejected_len=nl)


# one pair: S_w = -6 over 3 tokens (A_w = -2), S_l = -10 over 4 tokens (A_l = -2.5)
SW, SL, NW, NL = -6.0, -10.0, 3, 4
AW, AL = -2.0, -2.5


def one():
    return lp_of([SW], [SL], [NW], [NL])


def log1mexp(x: float) -> float:
    return math.log(1.0 - math.exp(x))


def test_simpo_hand_value():
    beta, gamma = 2.0, 0.5
    out = reg.get_loss("simpo")(one())
    assert out.loss.item() == pytest.approx(-logsig(beta * (AW - AL) - gamma), rel=1e-12)  # -log sigma(0.5)
    assert out.loss.item() == pytest.approx(math.log1p(math.exp(-0.5)), rel=1e-12)
    assert out.metrics["rewards/chosen"].item() == pytest.approx(beta * AW)


def test_simpo_zero_point():
    for gamma in (0.0, 0.5, 1.6):
        out = reg.get_loss("simpo", gamma=gamma)(lp_of([-4.0, -9.0], [-2.0, -9.0], [2, 3], [1, 3]))
        torch.testing.assert_close(
            out.loss, torch.full((2,), math.log1p(math.exp(gamma)), dtype=torch.float64)
        )


def test_simpo_label_smoothing_hand_value():
    eps = 0.1
    z = 2.0 * (AW - AL) - 0.5
    out = reg.get_loss("simpo", label_smoothing=eps)(one())
    assert out.loss.item() == pytest.approx(-(1 - eps) * logsig(z) - eps * logsig(-z), rel=1e-12)


def test_cpo_hand_value():
    beta, alpha = 0.1, 1.0
    out = reg.get_loss("cpo")(one())
    nll = -SW / NW  # batch of one: token mean over the chosen tokens
    assert out.loss.item() == pytest.approx(-logsig(beta * (SW - SL)) + alpha * nll, rel=1e-12)
    assert out.metrics["nll"].item() == pytest.approx(2.0)
    # alpha = 0: reference-free DPO
    out0 = reg.get_loss("cpo", alpha=0.0)(one())
    assert out0.loss.item() == pytest.approx(-logsig(0.4), rel=1e-12)
    assert "nll" not in out0.metrics


def test_cpo_zero_point():
    lp = lp_of([-3.0, -8.0], [-3.0, -8.0], [3, 2], [5, 5])
    out = reg.get_loss("cpo", alpha=0.5)(lp)
    nll_mean = (3.0 + 8.0) / 5.0
    assert out.loss.mean().item() == pytest.approx(LOG2 + 0.5 * nll_mean, rel=1e-12)


def test_orpo_hand_value():
    lam = 0.1
    out = reg.get_loss("orpo")(one())
    log_odds = (AW - AL) - (log1mexp(AW) - log1mexp(AL))
    expected = -SW / NW - lam * logsig(log_odds)
    assert out.loss.item() == pytest.approx(expected, rel=1e-12)
    assert out.metrics["log_odds_chosen"].item() == pytest.approx(log_odds, rel=1e-12)
    # the number itself: log(1-e^-2) = -0.145413..., log(1-e^-2.5) = -0.085655...
    assert log_odds == pytest.approx(0.5 - (-0.14541345786885906 + 0.08565048414466951), rel=1e-9)


def test_orpo_zero_point_and_stability_near_zero():
    lp = lp_of([-3.0, -1e-3], [-6.0, -2e-3], [1, 1], [2, 2])  # equal means per pair
    out = reg.get_loss("orpo", lam=0.2, nll_norm="sequence")(lp)
    torch.testing.assert_close(out.loss, torch.tensor([3.0, 1e-3], dtype=torch.float64) + 0.2 * LOG2)
    # A = 0 (probability one) is clamped: finite loss and gradient
    z = lp_of([0.0], [-1.0], [1], [1], grad=True)
    o = reg.get_loss("orpo")(z)
    o.loss.sum().backward()
    assert torch.isfinite(o.loss).all() and torch.isfinite(z.chosen.grad).all()


def test_log1mexp_against_math():
    xs = [-1e-8, -1e-3, -0.5, -math.log(2), -0.7, -3.0, -40.0]
    got = rf.log1mexp(torch.tensor(xs, dtype=torch.float64))
    for g, x in zip(got.tolist(), xs):
        assert g == pytest.approx(math.log(-math.expm1(x)), rel=1e-12)


def test_rrhf_hand_value():
    # A_w = -2 > A_l = -2.5: ranking term 0, only NLL (per-token mean) = 2
    out = reg.get_loss("rrhf")(one())
    assert out.loss.item() == pytest.approx(2.0, rel=1e-12)
    # swapped: ranking term A_l - A_w = 0.5 -> 0.5 + 2.5
    out = reg.get_loss("rrhf")(lp_of([SL], [SW], [NL], [NW]))
    assert out.loss.item() == pytest.approx(0.5 + 2.5, rel=1e-12)
    out = reg.get_loss("rrhf", nll_weight=0.0)(lp_of([SL], [SW], [NL], [NW]))
    assert out.loss.item() == pytest.approx(0.5, rel=1e-12)
    out = reg.get_loss("rrhf", nll_weight=0.5, nll_norm="sum")(lp_of([SL], [SW], [NL], [NW]))
    assert out.loss.item() == pytest.approx(0.5 + 0.5 * 10.0, rel=1e-12)


def test_slic_hand_value():
    # S_w - S_l = 4 >= delta = 1: hinge 0; NLL sum = 6 -> 0.1 * 6
    out = reg.get_loss("slic")(one())
    assert out.loss.item() == pytest.approx(0.6, rel=1e-12)
    out = reg.get_loss("slic", delta=5.0, lam=0.0)(one())
    assert out.loss.item() == pytest.approx(1.0, rel=1e-12)
    # zero point: equal log-probs -> delta + lam * NLL
    out = reg.get_loss("slic", delta=2.0, lam=0.5)(lp_of([-3.0], [-3.0], [1], [1]))
    assert out.loss.item() == pytest.approx(2.0 + 1.5, rel=1e-12)


# ------------------------------------------------------------------------------------------------------
# TRL transcriptions (experimental CPO / ORPO trainers, TRL 1.16)
# ------------------------------------------------------------------------------------------------------


def trl_cpo_total(lp, beta, label_smoothing, cpo_alpha, loss_type):
    """TRL: ``losses.mean() + cpo_alpha * CE``; logps averaged only for ipo/simpo; CE = token mean of chosen."""
    if loss_type in ("simpo",):
        cw = lp.chosen / lp.chosen_len
        rw = lp.rejected / lp.rejected_len
    else:
        cw, rw = lp.chosen, lp.rejected
    logits = cw - rw
    if loss_type == "simpo":
        logits = logits - 0.5 / beta  # simpo_gamma default 0.5
    losses = (
        -F.logsigmoid(beta * logits) * (1 - label_smoothing) - F.logsigmoid(-beta * logits) * label_smoothing
    )
    nll = -lp.chosen.sum() / lp.chosen_len.sum()
    return losses.mean() + cpo_alpha * nll


def trl_orpo_total(lp, beta):
    a_w = lp.chosen / lp.chosen_len
    a_l = lp.rejected / lp.rejected_len

    def l1me(x):
        return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))

    log_odds = (a_w - a_l) - (l1me(a_w) - l1me(a_l))
    nll = -lp.chosen.sum() / lp.chosen_len.sum()  # completion tokens only (see the ORPO docstring deviation)
    return nll - (beta * F.logsigmoid(log_odds)).mean()


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("eps", [0.0, 0.15])
def test_cpo_matches_trl(seed, eps):
    lp = random_lp(6, seed)
    ours = reg.get_loss("cpo", beta=0.3, alpha=0.7, label_smoothing=eps)(lp).loss.mean()
    torch.testing.assert_close(ours, trl_cpo_total(lp, 0.3, eps, 0.7, "sigmoid"))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_simpo_matches_trl_cpo_simpo(seed):
    lp = random_lp(6, seed)
    ours = reg.get_loss("simpo", beta=0.3, gamma=0.5, label_smoothing=0.1)(lp).loss.mean()
    torch.testing.assert_close(ours, trl_cpo_total(lp, 0.3, 0.1, 0.0, "simpo"))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_orpo_matches_trl(seed):
    lp = random_lp(6, seed, grad=True)
    ours = reg.get_loss("orpo", lam=0.25)(lp).loss.mean()
    theirs = trl_orpo_total(lp, 0.25)
    torch.testing.assert_close(ours, theirs)
    g1 = torch.autograd.grad(ours, (lp.chosen, lp.rejected))
    g2 = torch.autograd.grad(theirs, (lp.chosen, lp.rejected))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)


# ------------------------------------------------------------------------------------------------------
# gradients, signs, extremes, bad input
# ------------------------------------------------------------------------------------------------------


GRAD_CASES = [("simpo", None)] + [(n, m) for n in NAMES[1:] for m in ("batch_tokens", "sequence", "sum")]


@pytest.mark.parametrize(("name", "nll_norm"), GRAD_CASES)
def test_gradcheck(name, nll_norm):
    hp = {} if nll_norm is None else {"nll_norm": nll_norm}
    if name == "cpo":
        hp["label_smoothing"] = 0.1
    fn = reg.get_loss(name, **hp)
    nw, nl = torch.tensor([3, 1, 6]), torch.tensor([2, 5, 4])

    def f(c, r):
        return fn(PairLogps(c, r, chosen_len=nw, rejected_len=nl)).loss

    # random points (the RRHF / SLiC kinks have measure zero)
    c = (-torch.tensor([1.3, 0.2, 4.1], dtype=torch.float64) * nw).requires_grad_()
    r = (-torch.tensor([0.7, 0.9, 2.2], dtype=torch.float64) * nl).requires_grad_()
    assert torch.autograd.gradcheck(f, (c, r))


@pytest.mark.parametrize("name", NAMES)
@given(
    a=st.floats(-30, -0.01),
    b=st.floats(-30, -0.01),
    nw=st.integers(1, 20),
    nl=st.integers(1, 20),
)
@settings(max_examples=25, deadline=None)
def test_gradient_signs(name, a, b, nw, nl):
    # every reference-free loss here pushes the chosen log-prob up and the rejected one down (or leaves it)
    lp = lp_of([a * nw], [b * nl], [nw], [nl], grad=True)
    reg.get_loss(name)(lp).loss.sum().backward()
    assert lp.chosen.grad.item() <= 0.0
    assert lp.rejected.grad.item() >= 0.0


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@given(data=st.lists(st.tuples(st.floats(-1e4, 0.0), st.floats(-1e4, 0.0)), min_size=1, max_size=5))
@settings(max_examples=15, deadline=None)
def test_finite_at_extremes(name, dtype, data):
    c = torch.tensor([d[0] for d in data], dtype=dtype, requires_grad=True)
    r = torch.tensor([d[1] for d in data], dtype=dtype, requires_grad=True)
    n = torch.full((len(data),), 2)
    out = reg.get_loss(name)(PairLogps(c, r, chosen_len=n, rejected_len=n))
    assert out.loss.dtype == torch.float32 and out.loss.shape == (len(data),)
    assert torch.isfinite(out.loss).all()
    for g in torch.autograd.grad(out.loss.sum(), (c, r)):
        assert torch.isfinite(g).all()


@pytest.mark.parametrize("name", NAMES)
def test_no_reference_needed(name):
    spec = reg.get_spec(name)
    assert not spec.needs_reference and spec.family == "reference_free"
    reg.get_loss(name)(random_lp(3))  # runs with ref_* = None


@pytest.mark.parametrize("name", ["simpo", "orpo", "rrhf", "cpo"])
def test_missing_lengths(name):
    z = -torch.ones(2)
    with pytest.raises(ValueError, match="chosen_len"):
        reg.get_loss(name)(PairLogps(z, z))


@pytest.mark.parametrize(
    ("name", "hp", "param"),
    [
        ("simpo", {"beta": 0.0}, "beta"),
        ("simpo", {"gamma": -0.1}, "gamma"),
        ("simpo", {"label_smoothing": 0.7}, "label_smoothing"),
        ("cpo", {"alpha": -1.0}, "alpha"),
        ("cpo", {"nll_norm": "tokens"}, "nll_norm"),
        ("orpo", {"lam": 0.0}, "lam"),
        ("rrhf", {"nll_weight": -1.0}, "nll_weight"),
        ("slic", {"delta": 0.0}, "delta"),
        ("slic", {"lam": float("nan")}, "lam"),
    ],
)
def test_bad_hyperparameters_named(name, hp, param):
    with pytest.raises(ValueError, match=param):
        reg.get_loss(name, **hp)
    with pytest.raises(ValueError, match=param):
        getattr(rf, name)(random_lp(2), **hp)


@pytest.mark.parametrize("name", NAMES)
def test_wrong_input_type(name):
    with pytest.raises(TypeError, match="logps"):
        getattr(rf, name)((torch.zeros(2), torch.zeros(2)))


def test_metrics_detached():
    lp = random_lp(4, grad=True)
    for name in NAMES:
        out = reg.get_loss(name)(lp)
        assert out.loss.requires_grad
        assert all(not v.requires_grad for v in out.metrics.values())
        assert {"rewards/chosen", "rewards/accuracies", "logps/chosen"} <= set(out.metrics)
