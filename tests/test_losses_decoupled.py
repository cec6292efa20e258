"""Tests for prefopt.losses.decoupled: pairwise_normalized, decoupled, token_masked, shared_token_mask."""

from __future__ import annotations

import math

import peft
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from prefopt.diagnostics import entanglement
from prefopt.logprobs import token_logps
from prefopt.losses.decoupled import (
    decoupled,
    decoupled_weights,
    pairwise_normalized,
    shared_token_mask,
    token_masked,
)
from prefopt.masked import seq_sum
from prefopt.policy import LoraPolicy
from prefopt.registry import available_losses, get_loss
from prefopt.testing import tiny_causal_lm
from prefopt.types import PairLogps

V = 64
D = torch.float64


def rand_pair(b: int = 4, seed: int = 0, requires_grad: bool = False) -> PairLogps:
    g = torch.Generator().manual_seed(seed)
    f = [-20 * torch.rand(b, generator=g, dtype=D) for _ in range(4)]
    if requires_grad:
        f[0].requires_grad_(True)
        f[1].requires_grad_(True)
    return PairLogps(chosen=f[0], rejected=f[1], ref_chosen=f[2], ref_rejected=f[3])


def test_registered_in_family():
    assert {"pairwise_normalized", "decoupled", "token_masked"} <= set(available_losses("decoupled"))


# ----------------------------------------------------------------------------------------------------------
# pairwise_normalized
# ----------------------------------------------------------------------------------------------------------


def test_pairwise_normalized_value_is_dpo_gradient_is_surrogate():
    lp = rand_pair(requires_grad=True)
    nw = torch.tensor([1.0, 2.0, 0.5, 3.0], dtype=D)
    nl = torch.tensor([2.0, 1.0, 4.0, 0.1], dtype=D)
    out = pairwise_normalized(lp, nw, nl, beta=0.2)
    h = (lp.chosen - lp.ref_chosen) - (lp.rejected - lp.ref_rejected)
    torch.testing.assert_close(out.loss, -F.logsigmoid(0.2 * h))
    gw, gl = torch.autograd.grad(out.loss.sum(), (lp.chosen, lp.rejected))
    d = 0.2 * torch.sigmoid(-0.2 * h.detach())
    torch.testing.assert_close(gw, -d / nw, rtol=1e-12, atol=0)
    torch.testing.assert_close(gl, d / nl, rtol=1e-12, atol=0)
    torch.testing.assert_close(out.metrics["weight"], d)
    # a given weight replaces DPO's
    w = torch.tensor([0.0, 1.0, 2.0, 3.0], dtype=D)
    gw2, _ = torch.autograd.grad(pairwise_normalized(lp, nw, nl, w).loss.sum(), (lp.chosen, lp.rejected))
    torch.testing.assert_close(gw2, -w / nw, rtol=1e-12, atol=0)


@settings(max_examples=80, deadline=None)
@given(
    st.integers(1, 8),
    st.integers(0, 2**31 - 1),
    st.sampled_from(["random", "near_parallel", "identical", "anti"]),
)
def test_pairwise_normalized_sign_guarantee_on_random_vectors(dim, seed, kind):
    """Linear 'model' S = v·θ: the surrogate's SGD step never lowers S_w nor raises S_l (to first order = exactly)."""
    g = torch.Generator().manual_seed(seed)
    vw = torch.randn(3, dim, generator=g, dtype=D) * torch.exp(torch.randn(3, 1, generator=g, dtype=D))
    noise = torch.randn(3, dim, generator=g, dtype=D)
    vl = {"random": noise, "near_parallel": 2.5 * vw + 1e-7 * noise, "identical": vw.clone(), "anti": -vw}[
        kind
    ]
    theta = torch.randn(3, dim, generator=g, dtype=D, requires_grad=True)
    ref = torch.zeros(3, dtype=D)
    lp = PairLogps(chosen=(vw * theta).sum(1), rejected=(vl * theta).sum(1), ref_chosen=ref, ref_rejected=ref)
    out = pairwise_normalized(lp, vw.norm(dim=1), vl.norm(dim=1), beta=0.5)
    (grad,) = torch.autograd.grad(out.loss.sum(), theta)
    step = -0.1 * grad
    dsw, dsl = (vw * step).sum(1), (vl * step).sum(1)
    scale = (vw.norm(dim=1) + vl.norm(dim=1)) * 1e-12
    assert bool((dsw >= -scale).all()), dsw
    assert bool((dsl <= scale).all()), dsl
    d = out.metrics["weight"]
    cos = (vw * vl).sum(1) / (vw.norm(dim=1) * vl.norm(dim=1))
    torch.testing.assert_close(dsw, 0.1 * d * vw.norm(dim=1) * (1 - cos), rtol=1e-9, atol=1e-12)
    if kind == "identical":
        torch.testing.assert_close(step, torch.zeros_like(step), rtol=0, atol=1e-15)


def _one_token_policy_batch():
    model = tiny_causal_lm(vocab_size=V, hidden_size=32, num_layers=2, seed=3).double()
    cfg = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0, bias="none", init_lora_weights=False
    )
    torch.manual_seed(4)
    policy = LoraPolicy(model, cfg)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, V, (2, 14), generator=g)
    ids[1] = ids[0]
    ids[1, 9] = (ids[0, 9] + 7) % (V - 3) + 3  # identical prefix, one different completion token
    cm = torch.zeros(2, 14, dtype=torch.bool)
    cm[:, 5:] = True
    return policy, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "completion_mask": cm}


def _row_grads(policy, batch):
    params = policy.trainable_parameters()
    s = seq_sum(
        token_logps(policy.model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"]),
        batch["completion_mask"],
    )
    rows = [
        torch.cat([x.reshape(-1) for x in torch.autograd.grad(s[i], params, retain_graph=True)])
        for i in (0, 1)
    ]
    return s, rows, params


def test_pairwise_normalized_fixes_an_entangled_pair_on_a_real_model():
    policy, batch = _one_token_policy_batch()
    rep = entanglement(policy, batch, beta=0.5)
    assert bool(rep.chosen_falls[0]) or bool(rep.rejected_rises[0])  # DPO is entangled on this pair
    s, (gw, gl), params = _row_grads(policy, batch)
    with policy.reference():
        ref = seq_sum(
            token_logps(policy.model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"]),
            batch["completion_mask"],
        )
    lp = PairLogps(chosen=s[:1], rejected=s[1:], ref_chosen=ref[:1], ref_rejected=ref[1:])
    out = pairwise_normalized(
        lp, rep.chosen_grad_norm.to(s.dtype), rep.rejected_grad_norm.to(s.dtype), beta=0.5
    )
    grad = torch.cat(
        [x.reshape(-1) for x in torch.autograd.grad(out.loss.sum(), params, retain_graph=True)]
    ).double()
    step = -1e-2 * grad
    dsw, dsl = float(gw.double() @ step), float(gl.double() @ step)
    assert dsw > 0 and dsl < 0
    # and DPO's own gradient on the same pair does move the chosen log-prob the wrong way
    dpo_out = get_loss("dpo", beta=0.5)(
        PairLogps(chosen=s[:1], rejected=s[1:], ref_chosen=ref[:1], ref_rejected=ref[1:])
    )
    g_dpo = torch.cat([x.reshape(-1) for x in torch.autograd.grad(dpo_out.loss.sum(), params)]).double()
    dpo_w, dpo_l = float(gw.double() @ (-g_dpo)), float(gl.double() @ (-g_dpo))
    assert dpo_w < 0 or dpo_l > 0
    cos = float(rep.cosine[0])
    d = float(out.metrics["weight"][0])
    assert dsw == pytest.approx(1e-2 * d * float(rep.chosen_grad_norm[0]) * (1 - cos), rel=1e-5)


@pytest.mark.parametrize(
    ("arg", "value"),
    [("chosen_grad_norm", 0.0), ("chosen_grad_norm", -1.0), ("rejected_grad_norm", float("nan"))],
)
def test_pairwise_normalized_bad_norms(arg, value):
    lp = rand_pair(b=2)
    norms = {"chosen_grad_norm": torch.ones(2, dtype=D), "rejected_grad_norm": torch.ones(2, dtype=D)}
    norms[arg] = torch.tensor([1.0, value], dtype=D)
    with pytest.raises(ValueError, match=arg):
        pairwise_normalized(lp, norms["chosen_grad_norm"], norms["rejected_grad_norm"])
    with pytest.raises(ValueError, match="chosen_grad_norm"):
        pairwise_normalized(lp, torch.ones(3, dtype=D), torch.ones(2, dtype=D))
    with pytest.raises(ValueError, match="reference"):
        pairwise_normalized(PairLogps(chosen=lp.chosen, rejected=lp.rejected), torch.ones(2), torch.ones(2))


# ----------------------------------------------------------------------------------------------------------
# decoupled
# ----------------------------------------------------------------------------------------------------------


def test_decoupled_reduces_to_dpo_and_apo_like():
    lp = rand_pair(requires_grad=True)
    a = decoupled(lp, beta=0.3, margin_weight=1.0, chosen_weight=0.0, rejected_weight=0.0).loss
    b = get_loss("dpo", beta=0.3)(lp).loss
    torch.testing.assert_close(a, b, rtol=1e-14, atol=0)
    ga = torch.autograd.grad(a.sum(), (lp.chosen, lp.rejected))
    gb = torch.autograd.grad(b.sum(), (lp.chosen, lp.rejected))
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y, rtol=1e-14, atol=0)
    z = torch.zeros(1, dtype=D)
    at_ref = PairLogps(chosen=z, rejected=z, ref_chosen=z, ref_rejected=z)
    val = decoupled(at_ref, margin_weight=0.0, chosen_weight=1.0, rejected_weight=1.0).loss
    assert float(val) == pytest.approx(2 * math.log(2), rel=1e-14)


def test_decoupled_gradcheck_and_closed_form_weights():
    lp = rand_pair(b=3, seed=1)
    hp = {"beta": 0.7, "margin_weight": 0.4, "chosen_weight": 1.3, "rejected_weight": 0.6}

    def f(sw, sl, rw, rl):
        return decoupled(PairLogps(chosen=sw, rejected=sl, ref_chosen=rw, ref_rejected=rl), **hp).loss

    args = tuple(
        x.clone().requires_grad_(True) for x in (lp.chosen, lp.rejected, lp.ref_chosen, lp.ref_rejected)
    )
    assert torch.autograd.gradcheck(f, args)
    gw, gl = torch.autograd.grad(f(*args).sum(), args[:2])
    dw, dl = decoupled_weights(lp, **hp)
    torch.testing.assert_close(-gw, dw, rtol=1e-12, atol=0)
    torch.testing.assert_close(gl, dl, rtol=1e-12, atol=0)


@pytest.mark.slow
def test_decoupled_chosen_anchor_rescues_the_entangled_pair():
    """On the 1-token pair DPO lowers S_w; with the guarantee's condition d_w‖∇w‖ ≥ d_l‖∇l‖ the chosen rises."""
    policy, batch = _one_token_policy_batch()
    dpo = entanglement(policy, batch, loss="dpo", beta=0.5, eta=1e-3, verify=True)
    assert dpo.measured_dchosen is not None
    assert bool(dpo.chosen_falls[0]) and float(dpo.measured_dchosen[0]) < 0  # DPO lowers the chosen here
    rep = entanglement(policy, batch, loss="decoupled", beta=0.5, chosen_weight=20.0, eta=1e-3, verify=True)
    assert float(rep.chosen_weight[0] * rep.chosen_grad_norm[0]) >= float(
        rep.rejected_weight[0] * rep.rejected_grad_norm[0]
    )
    assert float(rep.pred_dchosen[0]) > 0
    assert rep.measured_dchosen is not None and float(rep.measured_dchosen[0]) > 0


def test_decoupled_bad_hparams():
    lp = rand_pair(b=2)
    with pytest.raises(ValueError, match="chosen_weight"):
        decoupled(lp, chosen_weight=-1.0)
    with pytest.raises(ValueError, match="must be > 0"):
        decoupled(lp, margin_weight=0.0, chosen_weight=0.0, rejected_weight=0.0)
    with pytest.raises(ValueError, match="beta"):
        get_loss("decoupled", beta=0.0)


# ----------------------------------------------------------------------------------------------------------
# token_masked
# ----------------------------------------------------------------------------------------------------------


def token_inputs(b=3, t=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    lp = -5 * torch.rand(2 * b, t, generator=g, dtype=D)
    ref = -5 * torch.rand(2 * b, t, generator=g, dtype=D)
    cm = torch.rand(2 * b, t, generator=g) > 0.3
    cm[:, 0] = False
    cm[:, 1] = True
    return lp, ref, cm


def test_token_masked_all_ones_is_dpo_exactly():
    lp, ref, cm = token_inputs()
    lp.requires_grad_(True)
    mu = torch.ones_like(lp)
    out = token_masked(lp, ref, cm, mu, beta=0.2)
    s, sr = seq_sum(lp, cm), seq_sum(ref, cm)
    dpo = get_loss("dpo", beta=0.2)(
        PairLogps(chosen=s[:3], rejected=s[3:], ref_chosen=sr[:3], ref_rejected=sr[3:])
    )
    torch.testing.assert_close(out.loss, dpo.loss, rtol=1e-14, atol=1e-15)
    (g1,) = torch.autograd.grad(out.loss.sum(), lp)
    (g2,) = torch.autograd.grad(dpo.loss.sum(), lp)
    torch.testing.assert_close(g1, g2, rtol=1e-14, atol=1e-16)
    # λ > 0 with a constant μ: a constant shift (2λ), same gradient
    out2 = token_masked(lp, ref, cm, mu, beta=0.2, sparsity=0.7)
    torch.testing.assert_close(out2.loss, dpo.loss + 1.4, rtol=1e-14, atol=1e-14)
    (g3,) = torch.autograd.grad(out2.loss.sum(), lp)
    torch.testing.assert_close(g3, g2, rtol=1e-14, atol=1e-16)


def test_token_masked_naive_formula_and_gradcheck():
    lp, ref, cm = token_inputs(b=2, t=6, seed=2)
    g = torch.Generator().manual_seed(5)
    mu = torch.rand(lp.shape, generator=g, dtype=D)
    out = token_masked(lp, ref, cm, mu, beta=0.5, sparsity=0.3)
    # loop oracle
    expect = []
    for i in range(2):
        rho = []
        frac = []
        for r in (i, i + 2):
            tot, kept = 0.0, 0.0
            for t in range(6):
                if cm[r, t]:
                    tot += float(mu[r, t]) * (float(lp[r, t]) - float(ref[r, t]))
                    kept += float(mu[r, t])
            rho.append(tot)
            frac.append(kept / int(cm[r].sum()))
        z = 0.5 * (rho[0] - rho[1])
        expect.append(math.log1p(math.exp(-z)) + 0.3 * (frac[0] + frac[1]))
    torch.testing.assert_close(out.loss, torch.tensor(expect, dtype=D), rtol=1e-12, atol=1e-12)

    def f(x, m):
        return token_masked(x, ref, cm, m, beta=0.5, sparsity=0.3).loss

    assert torch.autograd.gradcheck(
        f, (lp.clone().requires_grad_(True), mu.clone().clamp(0.05, 0.95).requires_grad_(True))
    )


def test_shared_token_mask_by_hand_and_masked_tokens_get_no_gradient():
    ids = torch.tensor([[1, 2, 5, 6, 7, 8, 0], [1, 2, 5, 9, 7, 0, 0]])
    cm = torch.tensor([[0, 0, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 0, 0]], dtype=torch.bool)
    mu = shared_token_mask({"input_ids": ids, "completion_mask": cm})
    assert mu.tolist() == [[0, 0, 0, 1, 0, 1, 0], [0, 0, 0, 1, 0, 0, 0]]
    lp = torch.randn(2, 7, dtype=D, requires_grad=True)
    out = token_masked(lp, torch.zeros(2, 7, dtype=D), cm, mu)
    (g,) = torch.autograd.grad(out.loss.sum(), lp)
    assert torch.equal(g != 0, mu.bool() & cm)


def test_shared_token_mask_reduces_entanglement_on_the_one_token_pair():
    """μ from the rule keeps only tokens after the difference ⇒ the masked pair's gradients are less aligned."""
    policy, batch = _one_token_policy_batch()
    mu = shared_token_mask(batch)
    assert mu.sum().item() == 2  # only offset 4 (position 9) differs
    params = policy.trainable_parameters()
    lp = token_logps(policy.model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    full = seq_sum(lp, batch["completion_mask"])
    masked = (lp * mu.double()).sum(1)

    def cos(s):
        a, b = (
            torch.cat([x.reshape(-1) for x in torch.autograd.grad(s[i], params, retain_graph=True)])
            for i in (0, 1)
        )
        return float(a @ b / (a.norm() * b.norm()))

    assert cos(masked) < cos(full)


def test_token_masked_bad_input():
    lp, ref, cm = token_inputs()
    mu = torch.ones_like(lp)
    with pytest.raises(ValueError, match="mu must lie in"):
        token_masked(lp, ref, cm, mu * 1.5)
    with pytest.raises(ValueError, match="even"):
        token_masked(lp[:5], ref[:5], cm[:5], mu[:5])
    bad = cm.clone()
    bad[2] = False
    with pytest.raises(ValueError, match="empty completion"):
        token_masked(lp, ref, bad, mu)
    with pytest.raises(ValueError, match="mu has shape"):
        token_masked(lp, ref, cm, mu[:, :3])
    with pytest.raises(TypeError, match="completion_mask"):
        token_masked(lp, ref, cm.long(), mu)
    with pytest.raises(ValueError, match="sparsity"):
        token_masked(lp, ref, cm, mu, sparsity=-1.0)
    with pytest.raises(ValueError, match="even"):
        shared_token_mask(
            {
                "input_ids": torch.zeros(3, 4, dtype=torch.long),
                "completion_mask": torch.ones(3, 4, dtype=torch.bool),
            }
        )
    with pytest.raises(ValueError, match="empty completion"):
        shared_token_mask(
            {
                "input_ids": torch.zeros(2, 4, dtype=torch.long),
                "completion_mask": torch.zeros(2, 4, dtype=torch.bool),
            }
        )


@settings(max_examples=30, deadline=None)
@given(
    st.floats(-1e4, 0.0),
    st.floats(-1e4, 0.0),
    st.sampled_from([torch.float32, torch.bfloat16, torch.float64]),
)
def test_token_masked_extreme_values_finite(a, b, dtype):
    lp = torch.tensor([[0.0, a, a], [0.0, b, 0.0]], dtype=dtype)
    ref = torch.zeros_like(lp)
    cm = torch.tensor([[False, True, True], [False, True, False]])
    out = token_masked(lp, ref, cm, torch.ones_like(lp), beta=0.1, check_finite=True)
    assert out.loss.dtype in (torch.float32, torch.float64)
    assert bool(torch.isfinite(out.loss).all())
