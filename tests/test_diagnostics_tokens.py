"""Tests for prefopt.diagnostics.token_gradient_correlation and plot_token_correlation (tiny float64 Llama + LoRA).

Oracle: one forward of the pair, then one backward per completion token on the retained graph.
"""

from __future__ import annotations

import peft
import pytest
import torch

from prefopt.diagnostics import (
    entanglement,
    plot_token_correlation,
    shared_offsets,
    token_gradient_correlation,
)
from prefopt.logprobs import token_logps
from prefopt.policy import LoraPolicy
from prefopt.testing import char_tokenizer, tiny_causal_lm

V = 64


@pytest.fixture(scope="module")
def policy() -> LoraPolicy:
    model = tiny_causal_lm(vocab_size=V, hidden_size=32, num_layers=2, seed=0).double()
    cfg = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0, bias="none", init_lora_weights=False
    )
    torch.manual_seed(1)
    return LoraPolicy(model, cfg)


@pytest.fixture(scope="module")
def batch() -> dict[str, torch.Tensor]:
    """2 pairs; pair 1: same prompt, chosen 7 completion tokens, rejected 5 (first 2 equal to the chosen's)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, V, (4, 12), generator=g)
    am = torch.ones(4, 12, dtype=torch.long)
    cm = torch.zeros(4, 12, dtype=torch.bool)
    cm[:, 5:] = True
    ids[3, :7] = ids[1, :7]
    ids[3, 7] = (ids[1, 7] + 1 - 3) % (V - 3) + 3
    cm[3, 10:] = False
    am[3, 10:] = 0
    ids[3, 10:] = 0
    return {"input_ids": ids, "attention_mask": am, "completion_mask": cm}


def loop_token_grads(model, batch, row, params) -> torch.Tensor:
    ids, am, cm = (
        batch["input_ids"][row : row + 1],
        batch["attention_mask"][row : row + 1],
        batch["completion_mask"],
    )
    lp = token_logps(model, ids, am, cm[row : row + 1])[0]
    out = []
    for t in cm[row].nonzero().flatten().tolist():
        gi = torch.autograd.grad(lp[t], params, retain_graph=True)
        out.append(torch.cat([g.reshape(-1).double() for g in gi]))
    return torch.stack(out)


@pytest.mark.parametrize("chunk_rows", [64, 3])
def test_matrix_equals_loop_oracle(policy, batch, chunk_rows):
    tc = token_gradient_correlation(policy, batch, 1, chunk_rows=chunk_rows)
    params = policy.trainable_parameters()
    gw = loop_token_grads(policy.model, batch, 1, params)
    gl = loop_token_grads(policy.model, batch, 3, params)
    assert tc.matrix.shape == (7, 5)
    nw, nl = gw.norm(dim=1), gl.norm(dim=1)
    torch.testing.assert_close(tc.cross_inner, gw @ gl.T, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(tc.matrix, (gw @ gl.T) / (nw[:, None] * nl[None]), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(
        tc.chosen_matrix, (gw @ gw.T) / (nw[:, None] * nw[None]), rtol=1e-9, atol=1e-12
    )
    torch.testing.assert_close(
        tc.rejected_matrix, (gl @ gl.T) / (nl[:, None] * nl[None]), rtol=1e-9, atol=1e-12
    )
    torch.testing.assert_close(tc.chosen_norms, nw, rtol=1e-9, atol=1e-12)
    assert torch.equal(tc.chosen_positions, torch.arange(5, 12))
    assert torch.equal(tc.rejected_ids, batch["input_ids"][3, 5:10])


def test_token_inner_products_sum_to_sequence_inner_product(policy, batch):
    tc = token_gradient_correlation(policy, batch, 1)
    rep = entanglement(policy, batch)
    # two different computations (copies vs the whole batch); token_logps evaluates the LM head in float32,
    # so agreement is to float32 rounding of the head's per-token directions, not float64
    torch.testing.assert_close(tc.cross_inner.sum(), rep.inner[1], rtol=1e-6, atol=0)
    assert tc.summary["cosine"] == pytest.approx(float(rep.cosine[1]), rel=1e-6)


def test_shared_definition_and_summary(policy, batch):
    tc = token_gradient_correlation(policy, batch, 1)
    # offsets 0,1 equal ids (and identical context ⇒ identical gradient ⇒ cos = 1); offset 2 differs;
    # offsets 3,4: compare ids directly
    ids = batch["input_ids"]
    expect = torch.zeros(5, dtype=torch.bool)
    expect[:5] = ids[1, 5:10] == ids[3, 5:10]
    assert torch.equal(tc.rejected_shared, expect)
    assert torch.equal(tc.chosen_shared[:5], expect) and not bool(tc.chosen_shared[5:].any())
    assert bool(expect[:2].all()) and not bool(expect[2])
    torch.testing.assert_close(tc.matrix[0, 0], torch.tensor(1.0, dtype=torch.float64), rtol=0, atol=1e-10)
    torch.testing.assert_close(tc.matrix[1, 1], torch.tensor(1.0, dtype=torch.float64), rtol=0, atol=1e-10)
    both = tc.chosen_shared[:, None] & tc.rejected_shared[None, :]
    assert tc.summary["mean_shared"] == pytest.approx(float(tc.matrix[both].mean()), rel=1e-12)
    assert tc.summary["mean_differing"] == pytest.approx(float(tc.matrix[~both].mean()), rel=1e-12)
    diag = tc.matrix.diagonal()
    assert tc.summary["diag_shared"] == pytest.approx(float(diag[expect].mean()), rel=1e-12)
    assert tc.summary["diag_differing"] == pytest.approx(float(diag[~expect].mean()), rel=1e-12)
    assert tc.summary["num_shared"] == float(expect.sum())


def test_shared_offsets_by_hand():
    a, b = torch.tensor([5, 6, 7, 8]), torch.tensor([5, 9, 7])
    sa, sb = shared_offsets(a, b)
    assert sa.tolist() == [True, False, True, False]
    assert sb.tolist() == [True, False, True]


def test_tokens_and_png(policy, batch, tmp_path):
    tok = char_tokenizer()
    tc = token_gradient_correlation(policy, batch, 1, tokenizer=tok)
    assert tc.chosen_tokens is not None and len(tc.chosen_tokens) == 7
    assert tc.chosen_tokens[0] == tok.decode([int(batch["input_ids"][1, 5])])
    path = tmp_path / "heat.png"
    plot_token_correlation(tc, path)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000


def test_bad_input(policy, batch):
    with pytest.raises(IndexError, match="out of range"):
        token_gradient_correlation(policy, batch, 2)
    with pytest.raises(IndexError, match="out of range"):
        token_gradient_correlation(policy, batch, -1)
    with pytest.raises(TypeError, match="index"):
        token_gradient_correlation(policy, batch, True)
    with pytest.raises(ValueError, match="even, non-zero"):
        token_gradient_correlation(policy, {k: v[:3] for k, v in batch.items()}, 0)
    bad = {k: v.clone() for k, v in batch.items()}
    bad["completion_mask"][2] = False
    with pytest.raises(ValueError, match="empty completion"):
        token_gradient_correlation(policy, bad, 0)
    with pytest.raises(ValueError, match="chunk_rows"):
        token_gradient_correlation(policy, batch, 0, chunk_rows=0)
    frozen = tiny_causal_lm(vocab_size=V, hidden_size=32, num_layers=1)
    for p in frozen.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        token_gradient_correlation(frozen, batch, 0)
