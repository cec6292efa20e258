"""experiments/entanglement_smollm2.py: the CI smoke run (subprocess) and its building blocks against oracles.

Oracles: :func:`prefopt.diagnostics.entanglement` (the report the example builds from its own per-row
gradients), an ordinary backward of the mean loss (the gradient the example assembles as ``(∂L/∂S)ᵀ G``),
hand-computed sign agreements.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import peft
import pytest
import torch

from prefopt.diagnostics import entanglement
from prefopt.diagnostics.pergrad import resolve_params
from prefopt.logprobs import token_logps
from prefopt.masked import seq_sum
from prefopt.policy import LoraPolicy
from prefopt.registry import get_loss
from prefopt.testing import char_tokenizer, tiny_causal_lm
from prefopt.types import PairBatch, PairLogps

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "experiments" / "entanglement_smollm2.py"
V = 64


def _load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("entanglement_smollm2", SCRIPT)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["entanglement_smollm2"] = mod  # dataclasses resolve their module by name
    spec.loader.exec_module(mod)
    return mod


ex = _load_example()


@pytest.fixture(scope="module")
def policy() -> LoraPolicy:
    model = tiny_causal_lm(vocab_size=V, hidden_size=32, num_layers=2, seed=0).double()
    cfg = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0, bias="none", init_lora_weights=False
    )
    torch.manual_seed(1)
    return LoraPolicy(model, cfg)


@pytest.fixture(scope="module")
def batch() -> PairBatch:
    """3 pairs, shared 4-token prompt, ragged completions; pair 0 differs in one completion token."""
    g = torch.Generator().manual_seed(0)
    b, t = 3, 12
    ids = torch.randint(3, V, (2 * b, t), generator=g)
    am = torch.ones(2 * b, t, dtype=torch.long)
    cm = torch.zeros(2 * b, t, dtype=torch.bool)
    for i in range(b):
        ids[i + b, :4] = ids[i, :4]
        for r, end in ((i, t - i), (i + b, t - 2 * (i % 2))):
            cm[r, 4:end] = True
            am[r, end:] = 0
            ids[r, end:] = 0
    ids[b], am[b], cm[b] = ids[0].clone(), am[0].clone(), cm[0].clone()
    ids[b, 7] = (ids[0, 7] + 5) % (V - 3) + 3
    return PairBatch(
        input_ids=ids,
        attention_mask=am,
        completion_mask=cm,
        prompt_len=torch.full((2 * b,), 4),
        completion_len=cm.sum(1),
        row_index=torch.arange(b),
    )


def _ref(policy: LoraPolicy, batch: PairBatch) -> torch.Tensor:
    with policy.reference():
        lp = token_logps(policy.model, batch.input_ids, batch.attention_mask, batch.completion_mask)
    return seq_sum(lp, batch.completion_mask).detach()


@pytest.mark.parametrize("loss", ["dpo", "decoupled"])
def test_diagnose_equals_entanglement(policy, batch, loss):
    named = resolve_params(policy.model, None)
    ref = _ref(policy, batch)
    diag = ex.diagnose(policy.model, named, batch, ref, loss=loss, beta=0.1, eta=1e-3)
    rep = entanglement(policy, batch, loss=loss, beta=0.1, eta=1e-3)
    assert rep.reference == "policy"
    for f in (
        "inner",
        "chosen_sqnorm",
        "rejected_sqnorm",
        "cosine",
        "ratio",
        "chosen_weight",
        "rejected_weight",
        "pred_dchosen",
        "pred_drejected",
        "chosen_logp",
        "rejected_logp",
        "loss",
    ):
        torch.testing.assert_close(getattr(diag.report, f), getattr(rep, f), rtol=1e-9, atol=1e-12, msg=f)
    assert torch.equal(diag.report.chosen_falls, rep.chosen_falls)
    assert diag.flat.shape == (6, rep.num_params)


def test_pairwise_normalized_weights_are_dpo_over_norms(policy, batch):
    named = resolve_params(policy.model, None)
    ref = _ref(policy, batch)
    diag = ex.diagnose(policy.model, named, batch, ref, loss="pairwise_normalized", beta=0.1, eta=1e-3)
    rep = diag.report
    h = (rep.chosen_logp - rep.ref_chosen) - (rep.rejected_logp - rep.ref_rejected)
    d = 0.1 * torch.sigmoid(-0.1 * h)
    torch.testing.assert_close(rep.chosen_weight, d / rep.chosen_grad_norm, rtol=1e-9, atol=0)
    torch.testing.assert_close(rep.rejected_weight, d / rep.rejected_grad_norm, rtol=1e-9, atol=0)
    # the remedy's promise, to first order: chosen never falls, rejected never rises
    assert bool((rep.pred_dchosen >= 0).all()) and bool((rep.pred_drejected <= 0).all())


@pytest.mark.parametrize("loss", ["dpo", "decoupled", "pairwise_normalized"])
def test_assembled_gradient_equals_backward(policy, batch, loss):
    named = resolve_params(policy.model, None)
    params = [p for _, p in named]
    ref = _ref(policy, batch)
    diag = ex.diagnose(policy.model, named, batch, ref, loss=loss, beta=0.1, eta=1e-3)
    grad, value = ex.seq_loss_gradient(diag, loss, 0.1)
    # oracle 1: ordinary forward, one backward per row (loop), chain rule in float64 by hand
    lp = token_logps(policy.model, batch.input_ids, batch.attention_mask, batch.completion_mask)
    s = seq_sum(lp, batch.completion_mask)
    rows = [
        torch.cat([g.reshape(-1) for g in torch.autograd.grad(s[i], params, retain_graph=True)]).double()
        for i in range(6)
    ]
    g_loop = torch.stack(rows)
    leaf = s.detach().double().requires_grad_(True)
    r64 = ref.double()
    fn = get_loss(loss, beta=0.1)

    def mean_loss(x: torch.Tensor) -> torch.Tensor:
        pl = PairLogps(chosen=x[:3], rejected=x[3:], ref_chosen=r64[:3], ref_rejected=r64[3:])
        if loss == "pairwise_normalized":
            return fn(pl, diag.report.chosen_grad_norm, diag.report.rejected_grad_norm).loss.mean()
        return fn(pl).loss.mean()

    mean = mean_loss(leaf)
    (ds,) = torch.autograd.grad(mean, leaf)
    expect = ds @ g_loop
    torch.testing.assert_close(grad, expect, rtol=1e-10, atol=1e-14)
    assert value == pytest.approx(float(mean), rel=1e-12)
    # oracle 2: an ordinary backward of the mean loss through the model. token_logps returns float32
    # log-probs, so autograd rounds ∂L/∂S to float32 on the way back: agreement to ~1e-7 of the norm.
    gs = torch.autograd.grad(mean_loss(s.double()), params)
    plain = torch.cat([g.reshape(-1) for g in gs]).double()
    assert float((grad - plain).norm()) <= 1e-6 * float(plain.norm())
    assert float(plain.norm()) > 1e-3  # a real gradient, not two zeros
    # and set_grads writes exactly that into .grad
    ex.set_grads(named, grad)
    try:
        got = torch.cat([p.grad.reshape(-1) for p in params]).double()
        torch.testing.assert_close(got, expect, rtol=1e-8, atol=1e-12)
    finally:
        for p in params:
            p.grad = None


def test_set_grads_rejects_wrong_size(policy):
    named = resolve_params(policy.model, None)
    with pytest.raises(ValueError, match="flat gradient has"):
        ex.set_grads(named, torch.zeros(3, dtype=torch.float64))
    for _, p in named:
        p.grad = None


def test_agreement_by_hand():
    run = ex.Run(loss="dpo")
    # (pair_w, pair_l, step_w, step_l, meas_w, meas_l)
    run.changes = [
        [[1.0, -1.0, 1.0, -1.0, 0.5, -0.5], [-1.0, 1.0, -1.0, 1.0, 0.2, 0.3]],
        [[1.0, 1.0, -1.0, -1.0, -0.1, -0.2]],
    ]
    ag = run.agreement()
    assert ag["n"] == 3
    assert ag["pair_chosen"] == pytest.approx(1 / 3)  # rows: agree, disagree, disagree
    assert ag["pair_rejected"] == pytest.approx(2 / 3)  # agree, agree, disagree
    assert ag["step_chosen"] == pytest.approx(2 / 3)  # rows: agree, disagree, agree
    assert ag["step_rejected"] == pytest.approx(1.0)
    assert ag["measured_chosen_falls"] == pytest.approx(1 / 3)
    assert ag["measured_rejected_rises"] == pytest.approx(1 / 3)
    masked = ex.Run(loss="token_masked", changes=run.changes)
    assert "pair_chosen" not in masked.agreement()  # the pair-alone prediction is of S-losses only
    assert ex.Run(loss="dpo").agreement() == {}


def test_make_batches_sizes_disjoint_and_seeded():
    tok = char_tokenizer()
    collate = ex.PreferenceCollator(tok, max_length=64, max_prompt_length=40)
    rows = [{"prompt": f"Q{i}:", "chosen": f" yes {i}", "rejected": f" no {i}"} for i in range(12)]
    rows.insert(3, {"prompt": "Q:", "chosen": " same", "rejected": " same"})  # dropped (identical)
    out = ex.make_batches(rows, collate, [3, 2, 2], seed=0)
    assert [b.input_ids.shape[0] for b in out] == [6, 4, 4]
    seen = [tuple(r.tolist()) for b in out for r in b.input_ids[: b.input_ids.shape[0] // 2]]
    assert len(set(seen)) == 7  # no pair used twice
    again = ex.make_batches(rows, collate, [3, 2, 2], seed=0)
    assert all(torch.equal(a.input_ids, b.input_ids) for a, b in zip(out, again, strict=True))
    with pytest.raises(ValueError, match="not enough valid pairs"):
        ex.make_batches(rows, collate, [10, 10], seed=0)


def test_bad_arguments():
    with pytest.raises(SystemExit):
        ex.parse_args(["--losses", "dpo,nope"])
    with pytest.raises(SystemExit):
        ex.parse_args(["--steps", "0"])
    args = ex.parse_args(["--optimizer", "sgd"])
    assert args.lr == 1e-2 and args.loss_list == list(ex.LOSSES)


def test_missing_data_file_is_a_clear_error(tmp_path):
    args = ex.parse_args(["--data", str(tmp_path / "nope.jsonl.gz")])
    with pytest.raises(SystemExit, match="--data: no such file"):
        ex.load(args)


@pytest.mark.slow
def test_smoke_subprocess(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-W", "ignore", str(SCRIPT), "--smoke", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "results.json").read_text())
    assert [r["loss"] for r in res["runs"]] == list(ex.LOSSES)
    for r in res["runs"]:
        assert r["eval_steps"] == [0, 1, 2]
        assert r["margin"][0] == 0.0  # policy == reference before training (LoRA B = 0)
        assert len(r["changes"]) == 2 and all(len(step) == 2 for step in r["changes"])
        assert all(math.isfinite(v) for v in r["chosen"] + r["rejected"] + r["train_loss"])
        ag = res["summary"][r["loss"]]["agreement"]
        assert 0.0 <= ag["step_chosen"] <= 1.0 and ag["n"] == 4
    # DPO at policy == reference: loss log 2
    assert res["runs"][0]["train_loss"][0] == pytest.approx(math.log(2), abs=1e-6)
    for name in ("logps.png", "margin.png"):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert "sign agreement" in proc.stdout
