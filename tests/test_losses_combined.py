"""Tests of weighted loss combinations (prefopt.losses.combined): ``combine`` and the ``mpo`` preset."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import prefopt.registry as reg
from prefopt.losses.combined import CombinedLoss, combine
from prefopt.types import PairLogps

LOG2 = math.log(2.0)


def random_pair(b=5, seed=0, grad=False) -> PairLogps:
    g = torch.Generator().manual_seed(seed)
    vals = [(-torch.rand(b, generator=g, dtype=torch.float64) * 30).requires_grad_(grad) for _ in range(4)]
    nw = torch.randint(1, 20, (b,), generator=g)
    nl = torch.randint(1, 20, (b,), generator=g)
    return PairLogps(*vals, chosen_len=nw, rejected_len=nl)


def test_combination_is_weighted_sum_of_components():
    lp = random_pair(6)
    c = combine({"dpo": 0.8, "bco_pair": 0.2, "sft": 1.0}, beta=0.3)
    out = c(lp)
    expected = (
        0.8 * reg.get_loss("dpo", beta=0.3)(lp).loss
        + 0.2 * reg.get_loss("bco_pair", beta=0.3)(lp).loss
        + 1.0 * reg.get_loss("sft")(lp).loss
    )
    torch.testing.assert_close(out.loss, expected)


def test_mean_matches_trl_weighted_means_from_formulas():
    # TRL: loss = sum_k w_k * mean(per_sequence_loss_k); formulas written out independently here
    lp = random_pair(7, seed=1)
    beta = 0.1
    rw = lp.chosen - lp.ref_chosen
    rl = lp.rejected - lp.ref_rejected
    sig = -F.logsigmoid(beta * (rw - rl)).mean()
    bco = (-F.logsigmoid(beta * rw) - F.logsigmoid(-beta * rl)).mean()
    sft = -lp.chosen.sum() / lp.chosen_len.sum()
    trl = 0.8 * sig + 0.2 * bco + 1.0 * sft
    torch.testing.assert_close(reg.get_loss("mpo")(lp).loss.mean(), trl)
    torch.testing.assert_close(combine({"dpo": 0.8, "bco_pair": 0.2, "sft": 1.0})(lp).loss.mean(), trl)


def test_mpo_zero_point_hand_value():
    s = torch.tensor([-4.0, -6.0], dtype=torch.float64)
    lp = PairLogps(s, s - 1, s.clone(), s - 1, torch.tensor([2, 3]), torch.tensor([1, 1]))
    out = reg.get_loss("mpo")(lp)
    nll = 10.0 / 5.0  # batch token mean of the chosen completions
    assert out.loss.mean().item() == pytest.approx(0.8 * LOG2 + 0.2 * 2 * LOG2 + nll, rel=1e-12)


def test_mpo_equals_combine_with_delta_and_gradient():
    lp1 = random_pair(5, seed=2, grad=True)
    lp2 = random_pair(5, seed=2, grad=True)
    a = reg.get_loss("mpo", beta=0.2)(lp1, 0.05)
    b = combine({"dpo": 0.8, "bco_pair": 0.2, "sft": 1.0}, beta=0.2)(lp2, delta=0.05)
    torch.testing.assert_close(a.loss, b.loss)
    a.loss.mean().backward()
    b.loss.mean().backward()
    torch.testing.assert_close(lp1.chosen.grad, lp2.chosen.grad)
    torch.testing.assert_close(lp1.ref_rejected.grad, lp2.ref_rejected.grad)


def test_per_loss_hyperparameters_and_shared_routing():
    lp = random_pair(4, seed=3)
    c = combine({"dpo": 1.0, "simpo": 0.5}, beta=0.2, simpo={"beta": 2.0, "gamma": 1.0})
    expected = (
        reg.get_loss("dpo", beta=0.2)(lp).loss + 0.5 * reg.get_loss("simpo", beta=2.0, gamma=1.0)(lp).loss
    )
    torch.testing.assert_close(c(lp).loss, expected)
    assert c.needs_reference
    assert not combine({"simpo": 1.0, "sft": 1.0}).needs_reference
    assert c.names == ("dpo", "simpo")


def test_metrics_merged_and_detached():
    lp = random_pair(4, seed=4, grad=True)
    out = combine({"dpo": 1.0, "sft": 0.5})(lp)
    m = out.metrics
    assert {"loss/dpo", "loss/sft", "dpo/rewards/chosen", "sft/nll", "rewards/chosen", "logps/chosen"} <= set(
        m
    )
    torch.testing.assert_close(m["rewards/chosen"], m["dpo/rewards/chosen"])
    torch.testing.assert_close(m["loss/dpo"], reg.get_loss("dpo")(lp).loss.detach())
    assert all(not v.requires_grad for v in m.values())


def test_gradcheck_combined():
    c = combine({"dpo": 0.7, "ipo": 0.1, "apo_zero": 1.0, "cpo": 0.3}, beta=0.2)
    nw, nl = torch.tensor([2, 5, 3]), torch.tensor([4, 1, 3])

    def f(a, b, r1, r2):
        return c(PairLogps(a, b, r1, r2, nw, nl)).loss

    g = torch.Generator().manual_seed(5)
    xs = tuple((-torch.rand(3, generator=g, dtype=torch.float64) * 10).requires_grad_() for _ in range(4))
    assert torch.autograd.gradcheck(f, xs)


def test_bad_inputs():
    with pytest.raises(KeyError, match=r"available:.*dpo"):
        combine({"dpoo": 1.0})
    with pytest.raises(ValueError, match="weight of 'dpo'"):
        combine({"dpo": -1.0})
    with pytest.raises(ValueError, match="weight of 'dpo'"):
        combine({"dpo": float("nan")})
    with pytest.raises(ValueError, match="non-empty"):
        combine({})
    with pytest.raises(ValueError, match="tau"):
        combine({"dpo": 1.0, "sft": 1.0}, tau=0.1)  # no component has tau
    with pytest.raises(ValueError, match="beta"):
        combine({"dpo": 1.0}, beta=-0.1)
    with pytest.raises(ValueError, match="gamma"):
        combine({"dpo": 1.0, "simpo": 1.0}, simpo={"gamma": -1.0})
    with pytest.raises(TypeError, match="simpo"):
        combine({"simpo": 1.0}, simpo=2.0)
    c = combine({"dpo": 1.0, "bco_pair": 1.0})
    with pytest.raises(TypeError, match="bogus"):
        c(random_pair(2), bogus=1.0)
    with pytest.raises(ValueError, match="ref_chosen"):
        c(PairLogps(torch.zeros(2), torch.zeros(2)))
    z = torch.zeros(2)
    with pytest.raises(ValueError, match="rejected"):
        c(PairLogps(z, torch.tensor([0.0, float("nan")]), z, z), check_finite=True)
    assert isinstance(c, CombinedLoss)


def test_mpo_bad_hyperparameters():
    for hp, name in [
        ({"dpo_weight": -1.0}, "dpo_weight"),
        ({"beta": 0}, "beta"),
        ({"nll_norm": "x"}, "nll_norm"),
    ]:
        with pytest.raises(ValueError, match=name):
            reg.get_loss("mpo", **hp)


def test_finite_at_extremes_bf16():
    vals = torch.tensor([[-1e4, 0.0, 0.0, -1e4], [0.0, -1e4, -1e4, 0.0]], dtype=torch.bfloat16)
    cols = [vals[:, i].clone().requires_grad_() for i in range(4)]
    n = torch.tensor([3, 1])
    out = reg.get_loss("mpo")(PairLogps(*cols, n, n))
    assert torch.isfinite(out.loss).all()
    for g in torch.autograd.grad(out.loss.sum(), cols):
        assert torch.isfinite(g).all()
