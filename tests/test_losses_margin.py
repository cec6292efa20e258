"""Tests of the DPO-family margin losses (prefopt.losses.margin).

Oracles: hand-derived numbers with plain ``math``; an independent per-loss transcription of TRL 1.16's
``DPOTrainer._compute_loss`` formulas (``_trl_reference`` below, written from reading
``trl/trainer/dpo_trainer.py``; TRL itself is not imported — see the report); float64 gradcheck;
hypothesis properties.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import prefopt.registry as reg
from prefopt.losses import margin
from prefopt.types import PairLogps

MARGIN_LOSSES = [
    "dpo",
    "cdpo",
    "robust_dpo",
    "ipo",
    "hinge",
    "exo_pair",
    "nca_pair",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sigmoid_norm",
    "sft",
    "rdpo",
    "dpop",
]
F_LOSSES = ["dpo", "cdpo", "robust_dpo", "ipo", "hinge", "exo_pair", "discopop", "sigmoid_norm"]
LOG2 = math.log(2.0)


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def logsig(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x > 0 else x - math.log1p(math.exp(x))


def pair(sw, sl, rw=None, rl=None, nw=None, nl=None, dtype=torch.float64, grad=False) -> PairLogps:
    def t(v):
        if v is None:
            return None
        x = torch.tensor(v, dtype=dtype) if not isinstance(v, torch.Tensor) else v
        return x.requires_grad_(grad) if grad else x

    def ln(v):
        return None if v is None else torch.as_tensor(v)

    return PairLogps(t(sw), t(sl), t(rw), t(rl), ln(nw), ln(nl))


def random_pair(b=5, seed=0, dtype=torch.float64, grad=False, scale=3.0) -> PairLogps:
    g = torch.Generator().manual_seed(seed)
    vals = [-(torch.rand(b, generator=g, dtype=torch.float64) * scale * 10) for _ in range(4)]
    nw = torch.randint(1, 20, (b,), generator=g)
    nl = torch.randint(1, 20, (b,), generator=g)
    vals = [v.to(dtype).requires_grad_(grad) for v in vals]
    return PairLogps(*vals, chosen_len=nw, rejected_len=nl)


# ------------------------------------------------------------------------------------------------------
# hand-derived values (numbers worked out from the paper equations with plain math)
# ------------------------------------------------------------------------------------------------------

# one pair: S_w=-10, S_l=-14, S_ref_w=-11, S_ref_l=-12 -> rho_w=1, rho_l=-2, h=3; |y_w|=4, |y_l|=5
SW, SL, RW, RL, NW, NL = -10.0, -14.0, -11.0, -12.0, 4, 5
RHO_W, RHO_L, H = 1.0, -2.0, 3.0


def one() -> PairLogps:
    return pair([SW], [SL], [RW], [RL], [NW], [NL])


def hand_values() -> dict[str, tuple[dict, float]]:
    b = 0.1
    z = b * H
    eps = 0.1
    e = 1e-3
    ht = RHO_W / NW - RHO_L / NL  # 0.25 + 0.4 = 0.65
    tau = 0.05
    return {
        "dpo": ({}, -logsig(z)),
        "cdpo": ({"label_smoothing": eps}, -(1 - eps) * logsig(z) - eps * logsig(-z)),
        "robust_dpo": ({"label_smoothing": eps}, (-(1 - eps) * logsig(z) + eps * logsig(-z)) / (1 - 2 * eps)),
        "ipo": ({}, (ht - 1 / (2 * b)) ** 2),
        "hinge": ({}, max(0.0, 1 - z)),
        "exo_pair": (
            {"label_smoothing": e},
            sig(z) * (logsig(z) - math.log(1 - e)) + sig(-z) * (logsig(-z) - math.log(e)),
        ),
        "nca_pair": ({}, -logsig(b * RHO_W) - 0.5 * logsig(-b * RHO_W) - 0.5 * logsig(-b * RHO_L)),
        "bco_pair": ({}, -logsig(b * RHO_W) - logsig(-b * RHO_L)),
        "sppo_hard": ({}, (RHO_W - 0.5 / b) ** 2 + (RHO_L + 0.5 / b) ** 2),
        "aot": ({}, -logsig(b * ((SW - SL) - (RW - RL)))),
        "aot_unpaired": ({}, -logsig(b * (RHO_W - RHO_L))),
        "apo_zero": ({}, (1 - sig(b * RHO_W)) + sig(b * RHO_L)),
        "apo_down": ({}, sig(b * RHO_W) + 1 - sig(b * H)),
        "discopop": ({}, -logsig(z) * (1 - sig(z / tau)) + math.exp(-z) * sig(z / tau)),
        "sigmoid_norm": ({}, -logsig(b * ht)),
        "sft": ({}, -SW / NW),  # batch of one: token mean = -S_w/|y_w| = 2.5
        "rdpo": ({"alpha": 0.2}, -logsig(z + 0.2 * (NW - NL))),
        "dpop": ({"lam": 5.0}, -logsig(b * H)),  # S_w > S_ref_w: penalty inactive
    }


@pytest.mark.parametrize("name", MARGIN_LOSSES)
def test_hand_value(name):
    hp, expected = hand_values()[name]
    out = reg.get_loss(name, **hp)(one())
    assert out.loss.shape == (1,)
    assert out.loss.item() == pytest.approx(expected, rel=1e-12, abs=1e-12)


def test_hand_values_spot_numbers():
    # a few absolute numbers, to guard the helper formulas themselves
    assert -logsig(0.3) == pytest.approx(0.5543552444685271, rel=1e-12)
    assert hand_values()["ipo"][1] == pytest.approx((0.65 - 5.0) ** 2)
    assert hand_values()["sppo_hard"][1] == pytest.approx(16.0 + 9.0)


def test_dpop_penalty_active_hand_value():
    # S_w=-12 < S_ref_w=-11 -> penalty 1; rho_w=-1, rho_l=-2, h=1; logit = 0.1*(1 - 5*1) = -0.4
    out = reg.get_loss("dpop", lam=5.0)(pair([-12.0], [-14.0], [-11.0], [-12.0]))
    assert out.loss.item() == pytest.approx(-logsig(-0.4), rel=1e-12)
    assert out.metrics["penalty"].item() == pytest.approx(1.0)


def test_bco_pair_delta_hand_value_and_detached():
    d = torch.tensor(0.05, dtype=torch.float64, requires_grad=True)
    lp = pair([SW], [SL], [RW], [RL], grad=True)
    out = reg.get_loss("bco_pair")(lp, delta=d)
    expected = -logsig(0.1 * RHO_W - 0.05) - logsig(-(0.1 * RHO_L - 0.05))
    assert out.loss.item() == pytest.approx(expected, rel=1e-12)
    out.loss.sum().backward()
    assert lp.chosen.grad is not None
    assert d.grad is None  # delta is detached: no gradient reaches it
    # float and per-pair tensor forms agree
    lp = random_pair(4)
    a = margin.bco_pair(lp, 0.3).loss
    b = margin.bco_pair(lp, torch.full((4,), 0.3, dtype=torch.float64)).loss
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("bad", [torch.zeros(2, 2), torch.zeros(3)])
def test_bco_pair_delta_bad_shape(bad):
    with pytest.raises(ValueError, match="delta"):
        margin.bco_pair(random_pair(4), bad)


def test_bco_pair_delta_bad_type():
    with pytest.raises(TypeError, match="delta"):
        margin.bco_pair(random_pair(4), "x")


# ------------------------------------------------------------------------------------------------------
# zero points
# ------------------------------------------------------------------------------------------------------


def zero_points(beta=0.1, eps=1e-3):
    return {
        "dpo": LOG2,
        "cdpo": LOG2,
        "robust_dpo": LOG2,
        "ipo": 1 / (4 * beta**2),
        "hinge": 1.0,
        "exo_pair": -LOG2 - 0.5 * math.log(eps * (1 - eps)),
        "nca_pair": 2 * LOG2,
        "bco_pair": 2 * LOG2,
        "sppo_hard": 1 / (2 * beta**2),
        "aot": LOG2,
        "aot_unpaired": LOG2,
        "apo_zero": 1.0,
        "apo_down": 1.0,
        "discopop": (LOG2 + 1) / 2,
        "sigmoid_norm": LOG2,
        "rdpo": LOG2,
        "dpop": LOG2,
    }


@pytest.mark.parametrize("name", sorted(zero_points()))
def test_zero_point_policy_equals_reference(name):
    g = torch.Generator().manual_seed(1)
    s = -torch.rand(6, generator=g, dtype=torch.float64) * 50
    s2 = -torch.rand(6, generator=g, dtype=torch.float64) * 50
    n = torch.full((6,), 7)
    lp = PairLogps(s, s2, s.clone(), s2.clone(), n, n)
    out = reg.get_loss(name)(lp)
    torch.testing.assert_close(out.loss, torch.full((6,), zero_points()[name], dtype=torch.float64))


def test_dpo_zero_point_gradient():
    lp = pair([-5.0, -9.0], [-7.0, -2.0], [-5.0, -9.0], [-7.0, -2.0], grad=True)
    reg.get_loss("dpo", beta=0.3)(lp).loss.sum().backward()
    torch.testing.assert_close(lp.chosen.grad, torch.full((2,), -0.15, dtype=torch.float64))
    torch.testing.assert_close(lp.rejected.grad, torch.full((2,), 0.15, dtype=torch.float64))


def test_sft_zero_point_and_batch_token_mean():
    lp = pair([-2.0, -6.0, 0.0], [-1.0, -1.0, -1.0], nw=[2, 4, 3], nl=[1, 1, 1])
    out = reg.get_loss("sft")(lp)
    # TRL: -(sum of chosen token logps) / (number of chosen tokens) = 8 / 9
    assert out.loss.mean().item() == pytest.approx(8.0 / 9.0, rel=1e-12)
    assert out.loss[2].item() == 0.0
    seq = reg.get_loss("sft", nll_norm="sequence")(lp).loss
    torch.testing.assert_close(seq, torch.tensor([1.0, 1.5, 0.0], dtype=torch.float64))
    tot = reg.get_loss("sft", nll_norm="sum")(lp).loss
    torch.testing.assert_close(tot, torch.tensor([2.0, 6.0, 0.0], dtype=torch.float64))


# ------------------------------------------------------------------------------------------------------
# structural properties
# ------------------------------------------------------------------------------------------------------


def test_cdpo_stationary_at_h_star():
    beta, eps = 0.2, 0.1
    h_star = math.log((1 - eps) / eps) / beta
    x = torch.tensor([h_star], dtype=torch.float64, requires_grad=True)
    lp = PairLogps(
        x,
        torch.zeros(1, dtype=torch.float64),
        torch.zeros(1, dtype=torch.float64),
        torch.zeros(1, dtype=torch.float64),
    )
    reg.get_loss("cdpo", beta=beta, label_smoothing=eps)(lp).loss.sum().backward()
    assert abs(x.grad.item()) < 1e-12


@given(h=st.floats(-200, 200), eps=st.floats(0.0, 0.49), beta=st.floats(0.01, 2.0))
@settings(max_examples=60, deadline=None)
def test_robust_dpo_is_unbiased(h, eps, beta):
    z = torch.zeros(1, dtype=torch.float64)
    lp = PairLogps(torch.tensor([h], dtype=torch.float64), z, z, z)
    flipped = PairLogps(torch.tensor([-h], dtype=torch.float64), z, z, z)
    f = reg.get_loss("robust_dpo", beta=beta, label_smoothing=eps)
    mix = (1 - eps) * f(lp).loss + eps * f(flipped).loss
    torch.testing.assert_close(mix, -F.logsigmoid(torch.tensor([beta * h], dtype=torch.float64)))


def test_hinge_zero_loss_and_grad_when_margin_met():
    lp = pair([0.0], [-20.0], [0.0], [0.0], grad=True)  # beta*h = 2 >= 1
    out = reg.get_loss("hinge")(lp)
    out.loss.sum().backward()
    assert out.loss.item() == 0.0 and lp.chosen.grad.item() == 0.0 and lp.rejected.grad.item() == 0.0


def test_ipo_minimum_at_target():
    beta = 0.5
    # h~ = rho_w/|y_w| - rho_l/|y_l| = 1/(2 beta) = 1 with |y|=2: rho_w = 1, rho_l = -1
    out = reg.get_loss("ipo", beta=beta)(pair([1.0], [-1.0], [0.0], [0.0], [2], [2]))
    assert out.loss.item() == pytest.approx(0.0, abs=1e-15)


def test_rdpo_reduces_to_dpo():
    lp = random_pair(6, seed=3)
    torch.testing.assert_close(reg.get_loss("rdpo", alpha=0.0)(lp).loss, reg.get_loss("dpo")(lp).loss)
    same = PairLogps(lp.chosen, lp.rejected, lp.ref_chosen, lp.ref_rejected, lp.chosen_len, lp.chosen_len)
    torch.testing.assert_close(reg.get_loss("rdpo", alpha=0.7)(same).loss, reg.get_loss("dpo")(same).loss)


def test_dpop_equals_dpo_when_chosen_above_reference_and_lam_zero():
    lp = random_pair(6, seed=4)
    torch.testing.assert_close(reg.get_loss("dpop", lam=0.0)(lp).loss, reg.get_loss("dpo")(lp).loss)
    up = PairLogps(lp.ref_chosen + 1.0, lp.rejected, lp.ref_chosen, lp.ref_rejected)
    torch.testing.assert_close(reg.get_loss("dpop", lam=50.0)(up).loss, reg.get_loss("dpo")(up).loss)


def test_dpop_penalty_pushes_chosen_up_harder():
    lp = pair([-12.0], [-14.0], [-11.0], [-12.0], grad=True)
    reg.get_loss("dpop", lam=5.0)(lp).loss.sum().backward()
    g_dpop = lp.chosen.grad.item()
    lp2 = pair([-12.0], [-14.0], [-11.0], [-12.0], grad=True)
    reg.get_loss("dpo")(lp2).loss.sum().backward()
    assert g_dpop < lp2.chosen.grad.item() < 0


def test_aot_sorting_oracle():
    lp = random_pair(7, seed=5)
    beta, eps = 0.3, 0.05
    out = reg.get_loss("aot", beta=beta, label_smoothing=eps)(lp).loss
    pol = sorted((lp.chosen - lp.rejected).tolist())
    ref = sorted((lp.ref_chosen - lp.ref_rejected).tolist())
    expected = [-(1 - eps) * logsig(beta * (p - r)) - eps * logsig(-beta * (p - r)) for p, r in zip(pol, ref)]
    torch.testing.assert_close(out, torch.tensor(expected, dtype=torch.float64))
    # aot_unpaired: sorted log-ratios
    out_u = reg.get_loss("aot_unpaired", beta=beta)(lp).loss
    rw = sorted((lp.chosen - lp.ref_chosen).tolist())
    rl = sorted((lp.rejected - lp.ref_rejected).tolist())
    torch.testing.assert_close(
        out_u, torch.tensor([-logsig(beta * (a - b)) for a, b in zip(rw, rl)], dtype=torch.float64)
    )
    # the batch mean is invariant to permuting the pairs
    perm = torch.randperm(7, generator=torch.Generator().manual_seed(0))
    lp_p = PairLogps(lp.chosen[perm], lp.rejected[perm], lp.ref_chosen[perm], lp.ref_rejected[perm])
    torch.testing.assert_close(reg.get_loss("aot")(lp_p).loss.mean(), reg.get_loss("aot")(lp).loss.mean())


def test_metrics_values_and_detached():
    lp = random_pair(5, seed=6, grad=True)
    out = reg.get_loss("dpo", beta=0.2)(lp)
    m = out.metrics
    rw = 0.2 * (lp.chosen - lp.ref_chosen).detach()
    rl = 0.2 * (lp.rejected - lp.ref_rejected).detach()
    torch.testing.assert_close(m["rewards/chosen"], rw)
    torch.testing.assert_close(m["rewards/rejected"], rl)
    torch.testing.assert_close(m["rewards/margins"], rw - rl)
    torch.testing.assert_close(m["rewards/accuracies"], (rw > rl).double())
    torch.testing.assert_close(m["logps/chosen"], lp.chosen.detach())
    torch.testing.assert_close(m["logps/rejected"], lp.rejected.detach())
    assert all(not v.requires_grad for v in m.values())
    assert out.loss.requires_grad and out.loss.shape == (5,)


# ------------------------------------------------------------------------------------------------------
# f-divergences
# ------------------------------------------------------------------------------------------------------


def test_f_divergence_scores_hand_values():
    r = torch.tensor([0.5, -1.0], dtype=torch.float64)
    fd = margin.f_divergence_score
    torch.testing.assert_close(fd(r, "reverse_kl"), r)
    torch.testing.assert_close(
        fd(r, "forward_kl"), torch.tensor([1 - math.exp(-0.5), 1 - math.exp(1.0)], dtype=torch.float64)
    )
    torch.testing.assert_close(
        fd(r, "js_divergence"), torch.tensor([LOG2 + logsig(0.5), LOG2 + logsig(-1.0)], dtype=torch.float64)
    )
    a = 0.3
    torch.testing.assert_close(
        fd(r, "alpha_divergence", a),
        torch.tensor(
            [(math.exp((a - 1) * 0.5) - 1) / (a - 1), (math.exp((a - 1) * -1.0) - 1) / (a - 1)],
            dtype=torch.float64,
        ),
    )
    torch.testing.assert_close(fd(r, "alpha_divergence", 1.0), r)
    # all scores vanish at rho = 0, so every f-variant keeps the loss's zero point
    z = torch.zeros(1, dtype=torch.float64)
    for f in margin.F_DIVERGENCES:
        assert fd(z, f).abs().item() < 1e-15
    with pytest.raises(ValueError, match="f_divergence"):
        fd(r, "bogus")


def test_f_divergence_clamp_value():
    # beyond the clamp the score saturates at 1 - e^40 (forward KL) / (e^40 - 1)/(alpha - 1)
    r = torch.tensor([-50.0, -39.0], dtype=torch.float64)
    torch.testing.assert_close(
        margin.f_divergence_score(r, "forward_kl"),
        torch.tensor([1 - math.exp(40.0), 1 - math.exp(39.0)], dtype=torch.float64),
    )
    torch.testing.assert_close(
        margin.f_divergence_score(r, "alpha_divergence", 0.5),
        torch.tensor([(math.exp(25.0) - 1) / -0.5, (math.exp(19.5) - 1) / -0.5], dtype=torch.float64),
    )
    torch.testing.assert_close(
        margin.f_divergence_score(torch.tensor([-100.0], dtype=torch.float64), "alpha_divergence", 0.5),
        torch.tensor([(math.exp(40.0) - 1) / -0.5], dtype=torch.float64),
    )


def test_f_divergence_clamp_keeps_finite():
    r = torch.tensor([-1e4, 1e4], dtype=torch.float32, requires_grad=True)
    for f in ("forward_kl", "alpha_divergence"):
        s = margin.f_divergence_score(r, f, 0.5)
        (g,) = torch.autograd.grad(s.sum(), r)
        assert torch.isfinite(s).all() and torch.isfinite(g).all()


@pytest.mark.parametrize("name", F_LOSSES)
@pytest.mark.parametrize("fdiv", ["forward_kl", "js_divergence", "alpha_divergence"])
def test_f_divergence_changes_margin_only(name, fdiv):
    lp = random_pair(4, seed=7, scale=0.2)
    hp = {"label_smoothing": 0.05} if name in ("cdpo", "robust_dpo", "exo_pair") else {}
    out = reg.get_loss(name, f_divergence=fdiv, f_alpha=0.3, **hp)(lp).loss
    expected = _trl_reference(name, lp, beta=0.1, f_divergence=fdiv, f_alpha=0.3, **hp)
    torch.testing.assert_close(out, expected)
    # rewards metrics stay beta * log-ratio (as TRL logs them)
    m = reg.get_loss(name, f_divergence=fdiv, **hp)(lp).metrics
    torch.testing.assert_close(m["rewards/chosen"], 0.1 * (lp.chosen - lp.ref_chosen))


@pytest.mark.parametrize("name", [n for n in MARGIN_LOSSES if n not in F_LOSSES])
def test_f_divergence_not_offered_elsewhere(name):
    with pytest.raises(ValueError, match="f_divergence"):
        reg.get_loss(name, f_divergence="forward_kl")


# ------------------------------------------------------------------------------------------------------
# independent oracle: TRL 1.16 formulas, transcribed per loss_type
# ------------------------------------------------------------------------------------------------------


def _trl_reference(
    name, lp, *, beta=0.1, label_smoothing=0.0, f_divergence="reverse_kl", f_alpha=0.5, tau=0.05
):
    """Per-pair loss as TRL 1.16 computes ``per_sequence_loss`` for the equivalent ``loss_type``."""
    cw, rw, cr, rr = lp.chosen, lp.rejected, lp.ref_chosen, lp.ref_rejected
    clr, rlr = cw - cr, rw - rr
    if f_divergence == "reverse_kl":
        cs, rs = clr, rlr
    elif f_divergence == "forward_kl":
        cs, rs = 1 - torch.exp(-clr), 1 - torch.exp(-rlr)
    elif f_divergence == "js_divergence":
        cs, rs = math.log(2) + F.logsigmoid(clr), math.log(2) + F.logsigmoid(rlr)
    else:
        c = 1.0 / (f_alpha - 1.0)
        cs = (torch.exp((f_alpha - 1.0) * clr) - 1.0) * c
        rs = (torch.exp((f_alpha - 1.0) * rlr) - 1.0) * c
    d = cs - rs
    if lp.chosen_len is not None:
        nw, nl = lp.chosen_len.double().clamp(min=1), lp.rejected_len.double().clamp(min=1)
    if name == "dpo":
        return -F.logsigmoid(beta * d)
    if name == "cdpo":  # TRL < 1.0 sigmoid with label smoothing
        return -F.logsigmoid(beta * d) * (1 - label_smoothing) - F.logsigmoid(-beta * d) * label_smoothing
    if name == "robust_dpo":
        clean = -(1 - label_smoothing) * F.logsigmoid(beta * d)
        flip = -label_smoothing * F.logsigmoid(-beta * d)
        return (clean - flip) / (1 - 2 * label_smoothing)
    if name == "ipo":
        return (cs / nw - rs / nl - 1 / (2 * beta)) ** 2
    if name == "hinge":
        return torch.relu(1 - beta * d)
    if name == "exo_pair":
        eps = torch.tensor(label_smoothing, dtype=torch.float64)
        qw, lqw = torch.sigmoid(beta * d), F.logsigmoid(beta * d)
        ql, lql = torch.sigmoid(-beta * d), F.logsigmoid(-beta * d)
        return qw * (lqw - torch.log1p(-eps)) + ql * (lql - torch.log(eps))
    if name == "discopop":
        lg = d * beta
        mod = torch.sigmoid(lg / tau)
        return -F.logsigmoid(lg) * (1 - mod) + torch.exp(-lg) * mod
    if name == "sigmoid_norm":
        return -F.logsigmoid(beta * (cs / nw - rs / nl))
    if name == "nca_pair":
        a, b = beta * clr, beta * rlr
        return -F.logsigmoid(a) - 0.5 * F.logsigmoid(-a) - 0.5 * F.logsigmoid(-b)
    if name == "bco_pair":
        return -F.logsigmoid(beta * clr) - F.logsigmoid(-beta * rlr)
    if name == "sppo_hard":
        return (clr - 0.5 / beta) ** 2 + (rlr + 0.5 / beta) ** 2
    if name == "aot":
        dl = torch.sort(cw - rw, dim=0)[0] - torch.sort(cr - rr, dim=0)[0]
        return -F.logsigmoid(beta * dl) * (1 - label_smoothing) - F.logsigmoid(-beta * dl) * label_smoothing
    if name == "aot_unpaired":
        dl = torch.sort(clr, dim=0)[0] - torch.sort(rlr, dim=0)[0]
        return -F.logsigmoid(beta * dl) * (1 - label_smoothing) - F.logsigmoid(-beta * dl) * label_smoothing
    if name == "apo_zero":
        return 1 - torch.sigmoid(beta * clr) + torch.sigmoid(beta * rlr)
    if name == "apo_down":
        return torch.sigmoid(beta * clr) + 1 - torch.sigmoid(beta * (clr - rlr))
    if name == "sft":  # TRL: batch token mean, expanded to (b,)
        return (-cw.sum() / lp.chosen_len.sum()).expand(cw.shape[0])
    raise KeyError(name)


TRL_NAMES = [n for n in MARGIN_LOSSES if n not in ("rdpo", "dpop")]


@pytest.mark.parametrize("name", TRL_NAMES)
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_trl_formula(name, seed):
    lp = random_pair(6, seed=seed)
    hp = {}
    if name in ("cdpo", "robust_dpo", "aot", "aot_unpaired"):
        hp["label_smoothing"] = 0.2
    if name == "exo_pair":
        hp["label_smoothing"] = 1e-3
    if name == "sft":
        out = reg.get_loss("sft")(lp).loss
        # TRL expands the batch scalar; prefopt keeps per-pair values with the same mean (and gradient)
        torch.testing.assert_close(out.mean(), _trl_reference("sft", lp)[0])
        return
    out = reg.get_loss(name, beta=0.25, **hp)(lp).loss
    torch.testing.assert_close(out, _trl_reference(name, lp, beta=0.25, **hp))


def test_sft_gradient_matches_trl_batch_mean():
    lp = random_pair(5, seed=8, grad=True)
    reg.get_loss("sft")(lp).loss.mean().backward()
    ours = lp.chosen.grad.clone()
    lp2 = random_pair(5, seed=8, grad=True)
    _trl_reference("sft", lp2).mean().backward()
    torch.testing.assert_close(ours, lp2.chosen.grad)


def test_discopop_finite_where_trl_formula_is_nan():
    lp = pair([-1e4], [0.0], [0.0], [0.0], dtype=torch.float32)
    assert torch.isnan(
        _trl_reference(
            "discopop",
            PairLogps(
                lp.chosen.double(), lp.rejected.double(), lp.ref_chosen.double(), lp.ref_rejected.double()
            ),
            beta=1.0,
        )
    ).all()
    out = reg.get_loss("discopop", beta=1.0)(lp).loss
    # z = -1e4: the exponential part exp(-z + log sigma(z/tau)) underflows to 0, the logistic part is -log sigma(z) = 1e4
    assert out.item() == pytest.approx(1e4, rel=1e-6)


# ------------------------------------------------------------------------------------------------------
# gradients
# ------------------------------------------------------------------------------------------------------


def _grad_inputs(seed):
    g = torch.Generator().manual_seed(seed)
    return [(-torch.rand(4, generator=g, dtype=torch.float64) * 20).requires_grad_() for _ in range(4)]


@pytest.mark.parametrize("name", MARGIN_LOSSES)
def test_gradcheck(name):
    hp = {"label_smoothing": 0.1} if name in ("cdpo", "robust_dpo", "aot", "aot_unpaired", "exo_pair") else {}
    if name == "dpop":
        hp = {"lam": 2.0}
    nw, nl = torch.tensor([3, 5, 1, 8]), torch.tensor([2, 6, 4, 1])
    fn = reg.get_loss(name, **hp)

    def f(a, b, c, d):
        return fn(PairLogps(a, b, c, d, nw, nl)).loss

    inputs = _grad_inputs(11)
    if name == "dpop":  # keep away from the kink of max(0, S_ref_w - S_w)
        inputs[2] = (
            inputs[0].detach() + torch.tensor([1.0, -1.0, 2.0, -2.0], dtype=torch.float64)
        ).requires_grad_()
    assert torch.autograd.gradcheck(f, tuple(inputs))


@pytest.mark.parametrize("fdiv", ["forward_kl", "js_divergence", "alpha_divergence"])
def test_gradcheck_f_divergence(fdiv):
    fn = reg.get_loss("dpo", f_divergence=fdiv, f_alpha=0.4)

    def f(a, b, c, d):
        return fn(PairLogps(a, b, c, d)).loss

    g = torch.Generator().manual_seed(2)
    xs = tuple((-torch.rand(3, generator=g, dtype=torch.float64) * 2).requires_grad_() for _ in range(4))
    assert torch.autograd.gradcheck(f, xs)


# Losses that only constrain the margin (Park et al. 2024 and the margin-only family) plus the anchored ones that keep the signs.
SIGN_LOSSES = {
    "dpo": {},
    "robust_dpo": {"label_smoothing": 0.2},
    "hinge": {},
    "sigmoid_norm": {},
    "rdpo": {"alpha": 0.3},
    "dpop": {"lam": 5.0},
    "aot": {},
    "aot_unpaired": {},
    "apo_zero": {},
    "bco_pair": {},
}


@pytest.mark.parametrize("name", sorted(SIGN_LOSSES))
@given(
    vals=st.lists(st.floats(-300, 0), min_size=4, max_size=4),
    beta=st.floats(0.01, 3.0),
)
@settings(max_examples=25, deadline=None)
def test_gradient_signs(name, vals, beta):
    lp = pair([vals[0]], [vals[1]], [vals[2]], [vals[3]], [3], [5], grad=True)
    reg.get_loss(name, beta=beta, **SIGN_LOSSES[name])(lp).loss.sum().backward()
    assert lp.chosen.grad.item() <= 0.0
    assert lp.rejected.grad.item() >= 0.0


@pytest.mark.parametrize("name", ["cdpo", "exo_pair", "ipo"])
@given(vals=st.lists(st.floats(-50, 0), min_size=4, max_size=4), beta=st.floats(0.05, 2.0))
@settings(max_examples=25, deadline=None)
def test_gradient_signs_below_target(name, vals, beta):
    # these losses are minimal at a finite target margin; below it they behave like margin losses
    lp = pair([vals[0]], [vals[1]], [vals[2]], [vals[3]], [1], [1], grad=True)
    h = (vals[0] - vals[2]) - (vals[1] - vals[3])
    eps = 0.1
    target = {
        "cdpo": math.log((1 - eps) / eps) / beta,
        "exo_pair": math.log((1 - eps) / eps) / beta,
        "ipo": 1 / (2 * beta),
    }[name]
    hp = {"label_smoothing": eps} if name != "ipo" else {}
    reg.get_loss(name, beta=beta, **hp)(lp).loss.sum().backward()
    if h < target:
        assert lp.chosen.grad.item() <= 0.0 and lp.rejected.grad.item() >= 0.0
    else:
        assert lp.chosen.grad.item() >= 0.0 and lp.rejected.grad.item() <= 0.0


def test_nca_rejected_gradient_always_positive():
    lp = random_pair(20, seed=9, grad=True, scale=30)
    reg.get_loss("nca_pair")(lp).loss.sum().backward()
    assert (lp.rejected.grad > 0).all()


# ------------------------------------------------------------------------------------------------------
# extreme values and dtypes
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", MARGIN_LOSSES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@given(data=st.lists(st.tuples(*[st.floats(-1e4, 0.0)] * 4), min_size=1, max_size=6))
@settings(max_examples=12, deadline=None)
def test_finite_loss_and_grad_at_extremes(name, dtype, data):
    cols = [torch.tensor([row[i] for row in data], dtype=dtype, requires_grad=True) for i in range(4)]
    n = torch.full((len(data),), 3)
    out = reg.get_loss(name)(PairLogps(*cols, n, n))
    assert out.loss.dtype == torch.float32  # upcast by the registry
    assert out.loss.shape == (len(data),)
    assert torch.isfinite(out.loss).all()
    grads = torch.autograd.grad(out.loss.sum(), cols, allow_unused=True)
    for g in grads:
        assert g is None or torch.isfinite(g).all()


@pytest.mark.parametrize("name", F_LOSSES)
@pytest.mark.parametrize("fdiv", ["forward_kl", "js_divergence", "alpha_divergence"])
def test_finite_f_divergence_extremes(name, fdiv):
    vals = torch.tensor(
        [[-1e4, 0.0, 0.0, -1e4], [0.0, -1e4, -1e4, 0.0], [-5e3, -1.0, -2.0, -3.0]], dtype=torch.float32
    )
    cols = [vals[:, i].clone().requires_grad_() for i in range(4)]
    n = torch.full((3,), 2)
    hp = {"label_smoothing": 0.1} if name in ("cdpo", "robust_dpo", "exo_pair") else {}
    out = reg.get_loss(name, f_divergence=fdiv, **hp)(PairLogps(*cols, n, n))
    assert torch.isfinite(out.loss).all()
    for g in torch.autograd.grad(out.loss.sum(), cols, allow_unused=True):
        assert g is None or torch.isfinite(g).all()


def test_bf16_matches_fp32_of_the_same_values():
    lp32 = random_pair(6, seed=12, dtype=torch.float32)
    lp16 = PairLogps(
        *(x.bfloat16() for x in (lp32.chosen, lp32.rejected, lp32.ref_chosen, lp32.ref_rejected))
    )
    lp32r = PairLogps(
        *(x.bfloat16().float() for x in (lp32.chosen, lp32.rejected, lp32.ref_chosen, lp32.ref_rejected))
    )
    torch.testing.assert_close(
        reg.get_loss("dpo")(lp16).loss, reg.get_loss("dpo")(lp32r).loss, rtol=0, atol=0
    )


# ------------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "hp", "param"),
    [
        ("dpo", {"beta": 0.0}, "beta"),
        ("dpo", {"beta": -1.0}, "beta"),
        ("dpo", {"beta": float("nan")}, "beta"),
        ("cdpo", {"label_smoothing": 0.6}, "label_smoothing"),
        ("robust_dpo", {"label_smoothing": 0.5}, "label_smoothing"),
        ("exo_pair", {"label_smoothing": 0.0}, "label_smoothing"),
        ("aot", {"label_smoothing": -0.1}, "label_smoothing"),
        ("discopop", {"tau": 0.0}, "tau"),
        ("dpop", {"lam": -1.0}, "lam"),
        ("rdpo", {"alpha": float("inf")}, "alpha"),
        ("dpo", {"f_divergence": "kl"}, "f_divergence"),
        ("dpo", {"f_alpha": float("nan")}, "f_alpha"),
        ("sft", {"nll_norm": "mean"}, "nll_norm"),
    ],
)
def test_bad_hyperparameters_named(name, hp, param):
    with pytest.raises(ValueError, match=param):
        reg.get_loss(name, **hp)
    with pytest.raises(ValueError, match=param):  # direct calls validate too
        getattr(margin, name)(random_pair(2), **hp)


@pytest.mark.parametrize("name", [n for n in MARGIN_LOSSES if n != "sft"])
def test_missing_reference(name):
    lp = PairLogps(torch.zeros(2), torch.zeros(2), chosen_len=torch.ones(2), rejected_len=torch.ones(2))
    with pytest.raises(ValueError, match="ref_chosen"):
        reg.get_loss(name)(lp)


@pytest.mark.parametrize("name", ["ipo", "sigmoid_norm", "rdpo", "sft"])
def test_missing_lengths(name):
    z = torch.zeros(2)
    with pytest.raises(ValueError, match="chosen_len"):
        reg.get_loss(name)(PairLogps(z, z, z, z))


@pytest.mark.parametrize("name", MARGIN_LOSSES)
def test_wrong_input_type(name):
    with pytest.raises(TypeError, match="logps"):
        getattr(margin, name)({"chosen": torch.zeros(2)})


def test_check_finite_names_field():
    z = torch.zeros(3)
    bad = PairLogps(z, z, torch.tensor([0.0, float("nan"), 0.0]), z)
    with pytest.raises(ValueError, match="ref_chosen"):
        reg.get_loss("dpo")(bad, check_finite=True)
    with pytest.raises(ValueError, match="ref_chosen"):
        margin.dpo(bad, check_finite=True)
    assert torch.isnan(reg.get_loss("dpo")(bad).loss[1])  # without the check, NaN propagates (documented)


# ------------------------------------------------------------------------------------------------------
# the real TRL 1.16 (only when installed: `pip install trl==1.16.0`, the `bench` extra)
# ------------------------------------------------------------------------------------------------------


def _trl_dpo_compute_loss(loss_types, weights, tok, cm, ref, *, beta, label_smoothing=0.0, fdiv="reverse_kl"):
    """Run TRL's own ``DPOTrainer._compute_loss`` on a stand-in ``self`` and a stand-in fused-LM-head model
    that returns fixed per-token log-probs (TRL's reference log-probs are passed as precomputed)."""
    from collections import defaultdict
    from types import SimpleNamespace

    from trl.trainer.dpo_trainer import DPOTrainer

    n, t1 = tok.shape

    class Acc:
        device = torch.device("cpu")

        def gather_for_metrics(self, x):
            return x

        def gather(self, x):
            return x

    class Model:
        training = True

        def __call__(self, **kw):
            return SimpleNamespace(
                log_probs=tok,
                entropy=torch.zeros(n, t1),
                mean_logits=torch.zeros(n, t1),
                is_top1=torch.zeros(n, t1, dtype=torch.bool),
                aux_loss=None,
            )

    s = SimpleNamespace(
        model=Model(),
        accelerator=Acc(),
        precompute_ref_logps=True,
        ld_alpha=None,
        f_divergence_type=fdiv,
        f_alpha_divergence_coef=0.5,
        loss_types=loss_types,
        loss_weights=weights,
        beta=beta,
        label_smoothing=label_smoothing,
        use_weighting=False,
        aux_loss_enabled=False,
        _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0,
        _tp_size=1,
        args=SimpleNamespace(discopop_tau=0.05, gradient_checkpointing_kwargs=None),
        ref_model=None,
    )
    b = n // 2
    inputs = {
        "input_ids": torch.zeros(n, t1 + 1, dtype=torch.long),
        "attention_mask": torch.ones(n, t1 + 1, dtype=torch.long),
        "completion_mask": cm.long(),
        "ref_chosen_logps": ref[:b],
        "ref_rejected_logps": ref[b:],
    }
    return DPOTrainer._compute_loss(s, s.model, inputs, False)


REAL_TRL_CASES = [
    ("sigmoid", "dpo", {}),
    ("hinge", "hinge", {}),
    ("ipo", "ipo", {}),
    ("exo_pair", "exo_pair", {"label_smoothing": 1e-3}),
    ("nca_pair", "nca_pair", {}),
    ("robust", "robust_dpo", {"label_smoothing": 0.2}),
    ("bco_pair", "bco_pair", {}),
    ("sppo_hard", "sppo_hard", {}),
    ("aot", "aot", {"label_smoothing": 0.1}),
    ("aot_unpaired", "aot_unpaired", {"label_smoothing": 0.1}),
    ("apo_zero", "apo_zero", {}),
    ("apo_down", "apo_down", {}),
    ("discopop", "discopop", {}),
    ("sft", "sft", {}),
    ("sigmoid_norm", "sigmoid_norm", {}),
]


@pytest.mark.parametrize(("trl_name", "name", "hp"), REAL_TRL_CASES)
def test_against_real_trl(trl_name, name, hp):
    trl = pytest.importorskip("trl")
    if trl.__version__ != "1.16.0":
        pytest.skip(f"compared against TRL 1.16.0, found {trl.__version__}")
    g = torch.Generator().manual_seed(0)
    b, t = 4, 9
    lens = torch.tensor([3, 8, 5, 1, 6, 2, 7, 4])
    cm = torch.arange(t)[None, :] >= (t - lens)[:, None]  # completion at the right, never position 0
    tok = -(torch.rand(2 * b, t - 1, generator=g, dtype=torch.float64) * 3) * cm[:, 1:]
    ref = tok.sum(1) * 0.9 - torch.rand(2 * b, generator=g, dtype=torch.float64) * 10
    s = tok.sum(1)
    lp = PairLogps(s[:b], s[b:], ref[:b], ref[b:], lens[:b], lens[b:])
    for beta in (0.1, 0.5):
        theirs = _trl_dpo_compute_loss(
            [trl_name], [1.0], tok, cm, ref, beta=beta, label_smoothing=hp.get("label_smoothing", 0.0)
        )
        ours = reg.get_loss(name, **({} if name == "sft" else {"beta": beta}), **hp)(lp).loss.mean()
        # TRL builds exo_pair's epsilon as a float32 tensor: agreement to float32 rounding there
        tol = 1e-6 if name == "exo_pair" else 1e-12
        torch.testing.assert_close(ours, theirs.to(ours.dtype), rtol=tol, atol=tol)


def test_mpo_against_real_trl():
    trl = pytest.importorskip("trl")
    if trl.__version__ != "1.16.0":
        pytest.skip(f"compared against TRL 1.16.0, found {trl.__version__}")
    g = torch.Generator().manual_seed(1)
    b, t = 3, 7
    lens = torch.tensor([2, 6, 4, 1, 5, 3])
    cm = torch.arange(t)[None, :] >= (t - lens)[:, None]
    tok = -(torch.rand(2 * b, t - 1, generator=g, dtype=torch.float64) * 3) * cm[:, 1:]
    ref = tok.sum(1) * 1.1 - 0.3
    s = tok.sum(1)
    lp = PairLogps(s[:b], s[b:], ref[:b], ref[b:], lens[:b], lens[b:])
    theirs = _trl_dpo_compute_loss(["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0], tok, cm, ref, beta=0.1)
    torch.testing.assert_close(reg.get_loss("mpo")(lp).loss.mean(), theirs, rtol=1e-12, atol=1e-12)
