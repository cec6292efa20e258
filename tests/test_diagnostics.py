"""Tests for prefopt.diagnostics.entanglement and the per-row gradient engine (tiny float64 Llama + LoRA).

Oracle: a Python loop of 2B backward passes (one per row, on the same forward), gradients flattened, inner
products by hand.
"""

from __future__ import annotations

import math
import warnings

import peft
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from prefopt.diagnostics import (
    entanglement,
    first_order_changes,
    loss_weights,
    per_row_gradients,
    resolve_params,
)
from prefopt.logprobs import token_logps
from prefopt.masked import seq_sum
from prefopt.policy import LoraPolicy
from prefopt.registry import get_loss
from prefopt.testing import tiny_causal_lm
from prefopt.types import PairLogps

V = 64


def make_policy(seed: int = 0, dtype: torch.dtype = torch.float64) -> LoraPolicy:
    model = tiny_causal_lm(vocab_size=V, hidden_size=32, num_layers=2, seed=seed).to(dtype)
    cfg = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0, bias="none", init_lora_weights=False
    )
    torch.manual_seed(seed + 1)
    return LoraPolicy(model, cfg)


def make_batch(
    seed: int = 0, b: int = 3, t: int = 14, one_token_pair: bool = True
) -> dict[str, torch.Tensor]:
    """B pairs with a shared 5-token prompt, different completion lengths, right padding.

    Pair 0 (if ``one_token_pair``): chosen and rejected identical except one completion token.
    """
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (2 * b, t), generator=g)
    am = torch.ones(2 * b, t, dtype=torch.long)
    cm = torch.zeros(2 * b, t, dtype=torch.bool)
    for i in range(b):
        ids[i + b, :5] = ids[i, :5]  # same prompt
        for r, end in ((i, t - (i % 2)), (i + b, t - 2 * (i % 3))):
            cm[r, 5:end] = True
            am[r, end:] = 0
            ids[r, end:] = 0
    if one_token_pair:
        ids[b] = ids[0]
        am[b] = am[0]
        cm[b] = cm[0]
        ids[b, 9] = (ids[0, 9] + 7) % (V - 3) + 3
    return {"input_ids": ids, "attention_mask": am, "completion_mask": cm}


def loop_grads(model, batch, params) -> torch.Tensor:
    """Oracle: one forward, then one backward per row on the retained graph → (2B, P) float64."""
    lp = token_logps(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    s = seq_sum(lp, batch["completion_mask"])
    rows = []
    for i in range(s.shape[0]):
        gi = torch.autograd.grad(s[i], params, retain_graph=True, allow_unused=True)
        rows.append(
            torch.cat(
                [(torch.zeros_like(p) if g is None else g).reshape(-1).double() for p, g in zip(params, gi)]
            )
        )
    return torch.stack(rows)


@pytest.fixture(scope="module")
def policy() -> LoraPolicy:
    return make_policy()


@pytest.fixture(scope="module")
def batch() -> dict[str, torch.Tensor]:
    return make_batch()


@pytest.mark.parametrize("method", ["materialize", "ghost", "auto"])
def test_report_equals_loop_oracle(policy, batch, method):
    rep = entanglement(policy, batch, method=method, beta=0.1)
    params = policy.trainable_parameters()
    g = loop_grads(policy.model, batch, params)
    b = batch["input_ids"].shape[0] // 2
    gw, gl = g[:b], g[b:]
    inner = (gw * gl).sum(1)
    nw, nl = (gw * gw).sum(1), (gl * gl).sum(1)
    torch.testing.assert_close(rep.inner, inner, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(rep.chosen_sqnorm, nw, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(rep.rejected_sqnorm, nl, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(rep.cosine, inner / (nw * nl).sqrt(), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(rep.ratio, inner / torch.minimum(nw, nl), rtol=1e-9, atol=1e-12)
    assert rep.fallback == ()  # LoRA A/B are nn.Linear: no slow loop
    assert rep.num_params == sum(p.numel() for p in params)
    assert rep.reference == "policy"


def test_dpo_weights_and_prediction_by_hand(policy, batch):
    beta = 0.3
    rep = entanglement(policy, batch, beta=beta, eta=0.05)
    h = (rep.chosen_logp - rep.ref_chosen) - (rep.rejected_logp - rep.ref_rejected)
    d = beta * torch.sigmoid(-beta * h)
    torch.testing.assert_close(rep.chosen_weight, d, rtol=1e-12, atol=0)
    torch.testing.assert_close(rep.rejected_weight, d, rtol=1e-12, atol=0)
    torch.testing.assert_close(rep.loss, -torch.nn.functional.logsigmoid(beta * h), rtol=1e-12, atol=0)
    # the spec's DPO formulas
    torch.testing.assert_close(rep.pred_dchosen, 0.05 * d * (rep.chosen_sqnorm - rep.inner))
    torch.testing.assert_close(rep.pred_drejected, 0.05 * d * (rep.inner - rep.rejected_sqnorm))
    assert torch.equal(rep.chosen_falls, rep.pred_dchosen < 0)
    assert torch.equal(rep.rejected_rises, rep.pred_drejected > 0)


def test_reference_is_base_model(policy, batch):
    rep = entanglement(policy, batch)
    with policy.reference():
        ref = seq_sum(
            token_logps(policy.model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"]),
            batch["completion_mask"],
        )
    b = ref.shape[0] // 2
    torch.testing.assert_close(rep.ref_chosen, ref[:b].double())
    torch.testing.assert_close(rep.ref_rejected, ref[b:].double())
    assert not torch.equal(rep.ref_chosen, rep.chosen_logp)  # the adapter is not zero


@pytest.mark.slow
@pytest.mark.parametrize(("loss", "hp"), [("dpo", {"beta": 0.5}), ("simpo", {"beta": 2.0, "gamma": 0.5})])
def test_verify_matches_first_order_prediction(loss, hp):
    """Take the SGD step per pair and compare: relative error <= 5 % and the same sign on every pair."""
    policy = make_policy(seed=3)
    batch = make_batch(seed=3, b=4)
    rep = entanglement(policy, batch, loss=loss, eta=1e-3, verify=True, **hp)
    assert rep.measured_dchosen is not None and rep.measured_drejected is not None
    for pred, meas in (
        (rep.pred_dchosen, rep.measured_dchosen),
        (rep.pred_drejected, rep.measured_drejected),
    ):
        assert torch.equal(torch.sign(pred), torch.sign(meas)), (pred, meas)
        rel = (pred - meas).abs() / meas.abs()
        assert bool((rel <= 0.05).all()), rel
    # the 1-token pair is entangled: DPO-type losses move both log-probs the same way there
    assert float(rep.ratio[0]) > 1.0
    assert bool(rep.chosen_falls[0]) or bool(rep.rejected_rises[0])


def test_batch_prediction_equals_gradient_dot_sgd_step_by_loop(policy, batch):
    """Oracle: the 2B per-row gradients by a loop of backward passes, the batch-mean DPO gradient by an
    ordinary backward, Δθ = −η·∇L, and δS_i = ⟨∇S_i, Δθ⟩ by hand."""
    eta, beta = 0.05, 0.3
    rep = entanglement(policy, batch, beta=beta, eta=eta)
    params = policy.trainable_parameters()
    g = loop_grads(policy.model, batch, params)
    torch.testing.assert_close(rep.gram, g @ g.T, rtol=1e-9, atol=1e-12)
    b = batch["input_ids"].shape[0] // 2
    s = seq_sum(
        token_logps(policy.model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"]),
        batch["completion_mask"],
    )
    pl = PairLogps(chosen=s[:b], rejected=s[b:], ref_chosen=rep.ref_chosen, ref_rejected=rep.ref_rejected)
    grads = torch.autograd.grad(get_loss("dpo", beta=beta)(pl).loss.mean(), params)
    step = -eta * torch.cat([x.reshape(-1).double() for x in grads])
    want = g @ step
    # rtol 1e-5, not 1e-9: the batch backward and the per-row backward passes differ at ~3e-7 relative even
    # in this float64 model (HF's Llama RMSNorm computes in float32); a wrong coefficient is O(1)
    torch.testing.assert_close(rep.pred_batch_dchosen, want[:b], rtol=1e-5, atol=1e-12)
    torch.testing.assert_close(rep.pred_batch_drejected, want[b:], rtol=1e-5, atol=1e-12)
    assert float((want[:b] - want[b:]).abs().max()) > 1e-3 * float(want.abs().max())  # rows differ
    # with one pair the batch step is the pair-alone step
    one = {k: v[[0, b]] for k, v in batch.items()}
    rep1 = entanglement(policy, one, beta=beta, eta=eta)
    torch.testing.assert_close(rep1.pred_batch_dchosen, rep1.pred_dchosen, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(rep1.pred_batch_drejected, rep1.pred_drejected, rtol=1e-12, atol=1e-15)


@pytest.mark.slow
def test_verify_batch_step_matches_first_order_prediction():
    """The SGD step on the batch-mean loss, taken and measured: relative error <= 5 % and the same sign on
    every row; and on this batch the cross-pair terms matter (batch and pair-alone predictions differ)."""
    policy = make_policy(seed=3)
    batch = make_batch(seed=3, b=4)
    rep = entanglement(policy, batch, beta=0.5, eta=1e-3, verify=True)
    assert rep.measured_batch_dchosen is not None and rep.measured_batch_drejected is not None
    for pred, meas in (
        (rep.pred_batch_dchosen, rep.measured_batch_dchosen),
        (rep.pred_batch_drejected, rep.measured_batch_drejected),
    ):
        assert torch.equal(torch.sign(pred), torch.sign(meas)), (pred, meas)
        rel = (pred - meas).abs() / meas.abs()
        assert bool((rel <= 0.05).all()), rel
    alone = torch.cat([rep.pred_dchosen, rep.pred_drejected]) / 4  # the batch mean scales each pair by 1/B
    batch_pred = torch.cat([rep.pred_batch_dchosen, rep.pred_batch_drejected])
    assert float((batch_pred - alone).abs().max()) > 0.1 * float(alone.abs().max())
    summary = rep.summary()
    assert "measured_batch_chosen_falls/frac" in summary and "batch_chosen_falls/frac" in summary


def test_verify_restores_parameters_and_mode(policy, batch):
    before = [p.detach().clone() for p in policy.model.parameters()]
    policy.model.train()
    try:
        rep = entanglement(policy, batch, eta=1e-2, verify=True)
        assert policy.model.training  # mode restored
    finally:
        policy.model.eval()
    for p, q in zip(policy.model.parameters(), before):
        assert torch.equal(p, q)
    assert rep.measured_dchosen is not None


def test_margin_grows_and_cauchy_schwarz_on_real_gradients(policy, batch):
    rep = entanglement(policy, batch, eta=1e-2)
    d = rep.chosen_weight
    # δΔ = δS_w − δS_l = η d ‖∇w − ∇l‖² ≥ 0
    margin = rep.pred_dchosen - rep.pred_drejected
    expected = rep.eta * d * (rep.chosen_sqnorm - 2 * rep.inner + rep.rejected_sqnorm)
    torch.testing.assert_close(margin, expected)
    assert bool((margin >= 0).all())
    assert not bool((rep.chosen_falls & rep.rejected_rises).any())
    assert bool((rep.inner**2 <= rep.chosen_sqnorm * rep.rejected_sqnorm * (1 + 1e-12)).all())


def test_identical_responses_have_cosine_one_and_no_change(policy):
    batch = make_batch(seed=5, b=2, one_token_pair=False)
    for k in batch:
        batch[k][2:] = batch[k][:2]
    rep = entanglement(policy, batch)
    torch.testing.assert_close(rep.cosine, torch.ones(2, dtype=torch.float64))
    torch.testing.assert_close(rep.pred_dchosen, torch.zeros(2, dtype=torch.float64), atol=1e-15, rtol=0)
    torch.testing.assert_close(rep.pred_drejected, torch.zeros(2, dtype=torch.float64), atol=1e-15, rtol=0)


def test_params_subset_equals_loop_on_subset(policy, batch):
    names = [n for n, p in policy.model.named_parameters() if p.requires_grad and "lora_B" in n][:3]
    rep = entanglement(policy, batch, params=names)
    params = [dict(policy.model.named_parameters())[n] for n in names]
    g = loop_grads(policy.model, batch, params)
    b = g.shape[0] // 2
    torch.testing.assert_close(rep.inner, (g[:b] * g[b:]).sum(1), rtol=1e-9, atol=1e-12)
    assert rep.num_params == sum(p.numel() for p in params)


def test_non_linear_parameters_use_the_loop_fallback_with_a_warning():
    """A plain model with a trainable norm weight and a trainable (functionally applied) LM head."""
    model = tiny_causal_lm(vocab_size=V, hidden_size=32, num_layers=1, seed=2).double()
    for p in model.parameters():
        p.requires_grad_(False)
    norm = model.model.norm.weight
    head = model.lm_head.weight
    q = model.model.layers[0].self_attn.q_proj.weight
    for p in (norm, head, q):
        p.requires_grad_(True)
    batch = make_batch(seed=2, b=2)
    with pytest.warns(RuntimeWarning, match="loop of 4 backward passes"):
        rep = entanglement(model, batch)
    assert set(rep.fallback) == {"model.norm.weight", "lm_head.weight"}
    assert rep.reference == "none"
    torch.testing.assert_close(rep.ref_chosen, torch.zeros(2, dtype=torch.float64))
    g = loop_grads(model, batch, [norm, head, q])
    torch.testing.assert_close(rep.inner, (g[:2] * g[2:]).sum(1), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(rep.chosen_sqnorm, (g[:2] ** 2).sum(1), rtol=1e-9, atol=1e-12)


def test_plain_model_with_given_reference(policy, batch):
    b = batch["input_ids"].shape[0] // 2
    ref = torch.linspace(-40.0, -30.0, 2 * b, dtype=torch.float64)
    rep = entanglement(policy.model, batch, ref_logps=ref)
    assert rep.reference == "given"
    torch.testing.assert_close(rep.ref_chosen, ref[:b])
    rep2 = entanglement(policy.model, batch, ref_logps=(ref[:b], ref[b:]))
    torch.testing.assert_close(rep2.chosen_weight, rep.chosen_weight)
    with pytest.raises(ValueError, match="ref_logps"):
        entanglement(policy.model, batch, ref_logps=ref[:3])


@pytest.mark.slow
def test_gradient_checkpointing_and_dropout_do_not_break_exactness():
    model = tiny_causal_lm(vocab_size=V, hidden_size=32, num_layers=2, seed=4).double()
    cfg = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.3, bias="none", init_lora_weights=False
    )
    policy = LoraPolicy(model, cfg)
    policy.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    policy.model.train()
    batch = make_batch(seed=4, b=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rep = entanglement(policy, batch)
        policy.model.eval()
        g = loop_grads(policy.model, batch, policy.trainable_parameters())
    torch.testing.assert_close(rep.inner, (g[:2] * g[2:]).sum(1), rtol=1e-9, atol=1e-12)
    assert rep.fallback == ()


def test_per_row_gradients_flat_matches_loop(policy, batch):
    named = resolve_params(policy.model, None)
    ids, am, cm = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
    rg = per_row_gradients(
        policy.model,
        lambda: seq_sum(token_logps(policy.model, ids, am, cm), cm),
        ids.shape[0],
        named,
        flat=True,
    )
    g = loop_grads(policy.model, batch, [p for _, p in named])
    assert rg.flat is not None
    torch.testing.assert_close(rg.flat, g, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(rg.gram, g @ g.T, rtol=1e-9, atol=1e-12)


def test_float32_model_agrees_with_loop():
    policy = make_policy(seed=6, dtype=torch.float32)
    batch = make_batch(seed=6, b=2)
    rep = entanglement(policy, batch)
    g = loop_grads(policy.model, batch, policy.trainable_parameters())
    torch.testing.assert_close(rep.inner, (g[:2] * g[2:]).sum(1), rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------------------------


def test_odd_rows_rejected(policy, batch):
    bad = {k: v[:5] for k, v in batch.items()}
    with pytest.raises(ValueError, match="even, non-zero number of rows"):
        entanglement(policy, bad)


def test_empty_completion_rejected(policy, batch):
    bad = {k: v.clone() for k, v in batch.items()}
    bad["completion_mask"][4] = False
    with pytest.raises(ValueError, match=r"empty completion .*row 4 \(rejected of pair 1\)"):
        entanglement(policy, bad)


def test_model_without_trainable_parameters_rejected(batch):
    model = tiny_causal_lm(vocab_size=V, hidden_size=32, num_layers=1)
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        entanglement(model, batch)


def test_bad_arguments_rejected(policy, batch):
    with pytest.raises(ValueError, match="eta"):
        entanglement(policy, batch, eta=0.0)
    with pytest.raises(ValueError, match="beta"):
        entanglement(policy, batch, beta=-1.0)
    with pytest.raises(KeyError, match="unknown loss"):
        entanglement(policy, batch, loss="nope")
    with pytest.raises(TypeError, match="completion_mask"):
        entanglement(policy, {**batch, "completion_mask": batch["completion_mask"].long()})
    with pytest.raises(KeyError, match="completion_mask"):
        entanglement(policy, {"input_ids": batch["input_ids"]})
    with pytest.raises(ValueError, match="requires_grad=False"):
        entanglement(policy, batch, params=["base_model.model.lm_head.weight"])
    with pytest.raises(TypeError, match="policy_or_model"):
        entanglement(object(), batch)


# ----------------------------------------------------------------------------------------------------------
# pure pieces: loss weights for any loss, first-order algebra on random vectors
# ----------------------------------------------------------------------------------------------------------


def test_loss_weights_generic_matches_autograd_on_decoupled_closed_form():
    from prefopt.losses.decoupled import decoupled_weights

    g = torch.Generator().manual_seed(0)
    lp = PairLogps(
        chosen=-10 * torch.rand(5, generator=g, dtype=torch.float64),
        rejected=-10 * torch.rand(5, generator=g, dtype=torch.float64),
        ref_chosen=-10 * torch.rand(5, generator=g, dtype=torch.float64),
        ref_rejected=-10 * torch.rand(5, generator=g, dtype=torch.float64),
    )
    hp = {"beta": 0.2, "margin_weight": 0.5, "chosen_weight": 2.0, "rejected_weight": 1.5}
    d_w, d_l, _ = loss_weights(get_loss("decoupled", **hp), lp)
    e_w, e_l = decoupled_weights(lp, **hp)
    torch.testing.assert_close(d_w, e_w, rtol=1e-12, atol=0)
    torch.testing.assert_close(d_l, e_l, rtol=1e-12, atol=0)


finite = st.floats(-1e3, 1e3, allow_nan=False)


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 6),
    st.integers(0, 2**31 - 1),
    st.floats(1e-4, 10.0),
    st.floats(0.0, 1.0),
    st.booleans(),
)
def test_first_order_changes_equal_directional_derivative(dim, seed, eta, mix, near_parallel):
    """For linear log-probs S = v·θ the first-order formula is exact: δS = ⟨∇S, Δθ⟩."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(4, dim, generator=g, dtype=torch.float64)
    l_ = torch.randn(4, dim, generator=g, dtype=torch.float64)
    if near_parallel:
        l_ = w + 1e-6 * l_
    else:
        l_ = mix * w + (1 - mix) * l_
    dw = torch.rand(4, generator=g, dtype=torch.float64)
    dl = torch.rand(4, generator=g, dtype=torch.float64)
    step = eta * (dw[:, None] * w - dl[:, None] * l_)
    pw, pl = first_order_changes(dw, dl, (w * w).sum(1), (l_ * l_).sum(1), (w * l_).sum(1), eta=eta)
    torch.testing.assert_close(pw, (w * step).sum(1), rtol=1e-9, atol=1e-9 * eta)
    torch.testing.assert_close(pl, (l_ * step).sum(1), rtol=1e-9, atol=1e-9 * eta)
    # equal weights: the margin grows and the two failures never happen together (Cauchy–Schwarz)
    pw, pl = first_order_changes(dw, dw, (w * w).sum(1), (l_ * l_).sum(1), (w * l_).sum(1), eta=eta)
    assert bool((pw - pl >= -1e-12).all())
    assert not bool(((pw < -1e-12) & (pl > 1e-12)).any())


@settings(max_examples=40, deadline=None)
@given(finite, finite, finite, finite)
def test_loss_weights_dpo_extreme_log_probs(sw, sl, rw, rl):
    """Log-probs down to −1e3 · 10 (−1e4 scale after β): weights finite, in [0, β], equal for DPO."""
    lp = PairLogps(
        chosen=torch.tensor([sw * 10], dtype=torch.float64),
        rejected=torch.tensor([sl * 10], dtype=torch.float64),
        ref_chosen=torch.tensor([rw * 10], dtype=torch.float64),
        ref_rejected=torch.tensor([rl * 10], dtype=torch.float64),
    )
    d_w, d_l, loss = loss_weights(get_loss("dpo", beta=0.1), lp)
    assert bool(torch.isfinite(d_w).all()) and bool(torch.isfinite(loss).all())
    assert 0.0 <= float(d_w) <= 0.1 and float(d_w) == float(d_l)
    h = (sw - rw - sl + rl) * 10
    assert math.isclose(float(d_w), 0.1 / (1 + math.exp(min(0.1 * h, 700))), rel_tol=1e-9, abs_tol=1e-300)


def test_loss_weights_bf16_inputs_upcast():
    lp = PairLogps(
        chosen=torch.tensor([-3.0, -1e4], dtype=torch.bfloat16),
        rejected=torch.tensor([-4.0, -2.0], dtype=torch.bfloat16),
        ref_chosen=torch.tensor([-3.5, -5.0], dtype=torch.bfloat16),
        ref_rejected=torch.tensor([-3.5, -5.0], dtype=torch.bfloat16),
    )
    d_w, d_l, _ = loss_weights(get_loss("dpo", beta=0.1), lp)
    assert torch.equal(d_w, d_l)
    assert d_w.dtype == torch.float64 and bool(torch.isfinite(d_w).all())
    assert float(d_w[1]) == pytest.approx(0.1, rel=1e-6)  # h ≈ −1e4 ⇒ σ(−βh) ≈ 1
