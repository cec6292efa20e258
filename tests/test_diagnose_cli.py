"""``prefopt diagnose`` (prefopt.diagnostics.cli) with ``--tiny``: files written, the table equals
:func:`prefopt.diagnostics.entanglement` called directly on the same model, batch and loss; clear errors."""

from __future__ import annotations

import argparse
import csv
import json
import math
from pathlib import Path

import pytest
import torch

from prefopt.data import PreferenceCollator, load_builtin_pairs
from prefopt.diagnostics import entanglement
from prefopt.diagnostics.cli import COLUMNS, add_diagnose_parser, parse_loss_args, run_diagnose
from prefopt.policy import LoraPolicy
from prefopt.testing import char_tokenizer, tiny_causal_lm
from prefopt.types import PairBatch


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="prefopt")
    sub = parser.add_subparsers(dest="command", required=True)
    add_diagnose_parser(sub)
    return parser.parse_args(["diagnose", *argv])


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("diag")
    argv = ["--tiny", "--pairs", "5", "--batch", "3", "--out", str(out), "--top-k", "2", "--no-progress"]
    argv += ["--loss-arg", "beta=0.2", "--max-length", "96", "--verify"]
    args = parse(argv)
    assert run_diagnose(args) == 0
    return out


def direct_reports(n: int = 5, batch: int = 3, beta: float = 0.2) -> list:
    """Oracle: the same tiny model, LoRA init (seed 0), first n built-in pairs, entanglement() per batch."""
    tok = char_tokenizer()
    model = tiny_causal_lm("llama", vocab_size=len(tok), hidden_size=32, num_layers=2, seed=0)
    torch.manual_seed(0)
    policy = LoraPolicy(model)
    rows = [dict(r) for r in load_builtin_pairs()][:n]
    collate = PreferenceCollator(tok, max_length=96)
    reps = []
    for s in range(0, n, batch):
        b = collate(rows[s : s + batch])
        reps.append(entanglement(policy, b, loss="dpo", beta=beta, eta=1e-3))
    return reps


def test_files_and_consistency_with_entanglement(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with open(run_dir / "pairs.csv") as fh:
        rows = list(csv.DictReader(fh))
    data = json.loads((run_dir / "pairs.json").read_text())
    assert tuple(rows[0].keys()) == COLUMNS and len(rows) == 5 == len(data["pairs"])
    assert data["config"]["loss"] == "dpo" and data["config"]["loss_args"] == {"beta": 0.2}
    reps = direct_reports()
    fields = ["inner", "chosen_sqnorm", "rejected_sqnorm", "cosine", "ratio", "chosen_weight"]
    fields += ["rejected_weight", "pred_dchosen", "pred_drejected", "chosen_logp", "rejected_logp", "loss"]
    k = 0
    for rep in reps:
        for j in range(rep.inner.shape[0]):
            js, cs = data["pairs"][k], rows[k]
            assert (
                js["pair"] == k and int(cs["pair"]) == k and js["source_row"] == k
            )  # built-in rows all valid
            for f in fields:
                want = float(getattr(rep, f)[j])
                assert js[f] == pytest.approx(want, rel=1e-6, abs=1e-12), f
                assert float(cs[f]) == pytest.approx(js[f], rel=1e-12, abs=0), f  # CSV == JSON
            assert js["chosen_norm"] == pytest.approx(math.sqrt(float(rep.chosen_sqnorm[j])), rel=1e-6)
            assert js["entangled"] == bool(rep.ratio[j] > 1)
            assert cs["entangled"] == str(js["entangled"])
            assert js["chosen_falls"] == bool(rep.chosen_falls[j])
            # --verify: the measured change has the predicted sign (η = 1e-3, first order)
            assert math.copysign(1, js["measured_dchosen"]) == math.copysign(1, js["pred_dchosen"])
            k += 1
    assert k == 5
    summ = data["summary"]
    assert summ["pairs"] == 5
    assert summ["entangled_frac"] == pytest.approx(sum(p["entangled"] for p in data["pairs"]) / 5)
    assert summ["verify_sign_agreement"] == 1.0


def test_heatmaps_are_the_top_k_by_ratio(run_dir: Path) -> None:
    data = json.loads((run_dir / "pairs.json").read_text())
    ranked = sorted(data["pairs"], key=lambda p: p["ratio"], reverse=True)[:2]
    assert [h["pair"] for h in data["heatmaps"]] == [p["pair"] for p in ranked]
    for h in data["heatmaps"]:
        png = Path(h["path"]).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 2000
        assert h["summary"]["cosine"] == pytest.approx(data["pairs"][h["pair"]]["cosine"], rel=1e-4)
    assert sorted(p.name for p in run_dir.glob("heatmap_pair*.png")) == sorted(
        f"heatmap_pair{h['pair']}.png" for h in data["heatmaps"]
    )


def test_data_file_and_format(tmp_path: Path) -> None:
    src = tmp_path / "pairs.jsonl"
    lines = [
        {
            "chosen": "\n\nHuman: hi\n\nAssistant: hello there",
            "rejected": "\n\nHuman: hi\n\nAssistant: go away",
        },
        {"chosen": "\n\nHuman: 2+2?\n\nAssistant: 4", "rejected": "\n\nHuman: 2+2?\n\nAssistant: 5"},
    ]
    src.write_text("\n".join(json.dumps(x) for x in lines))
    out = tmp_path / "o"
    args = parse(["--tiny", "--data", str(src), "--format", "implicit", "--out", str(out), "--top-k", "0"])
    args.no_progress = True
    assert run_diagnose(args) == 0
    data = json.loads((out / "pairs.json").read_text())
    assert len(data["pairs"]) == 2 and data["heatmaps"] == []
    assert data["pairs"][1]["chosen_len"] == 3  # " ", "4", eos (character tokenizer)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--loss", "nope"], "unknown loss 'nope'"),
        (["--loss", "kto"], "not a pairwise loss"),
        (["--loss", "pairwise_normalized"], "not a pairwise loss"),
        (["--data", "/nonexistent/file.jsonl"], "--data: no such file"),
        (["--model", "/nonexistent/folder"], "--model"),
        (["--pairs", "0"], "--pairs must be >= 1"),
        (["--eta", "-1"], "--eta"),
        (["--loss-arg", "beta"], "NAME=VALUE"),
        (["--loss-arg", "beta=-1"], "beta"),
        (["--loss-arg", "gamma=1"], "unknown hyperparameter"),
    ],
)
def test_clear_errors(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tiny = [] if "--model" in argv else ["--tiny"]
    assert run_diagnose(parse([*tiny, "--out", str(tmp_path), "--no-progress", *argv])) == 2
    err = capsys.readouterr().err
    assert err.startswith("prefopt diagnose: error:") and message in err


def test_parse_loss_args() -> None:
    assert parse_loss_args(["beta=0.5", "n=3", "flag=true", "mode=sum"]) == {
        "beta": 0.5,
        "n": 3,
        "flag": True,
        "mode": "sum",
    }


# ----------------------------------------------------------------------------------------------------------
# the per-token engine behind the heatmaps: token_gradient_correlation(method="vjp" | "copies") vs a loop
# ----------------------------------------------------------------------------------------------------------


def _tiny_policy_and_pair() -> tuple[LoraPolicy, PairBatch]:
    import peft

    model = tiny_causal_lm(vocab_size=64, hidden_size=32, num_layers=2, seed=3).double()
    cfg = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0, bias="none", init_lora_weights=False
    )
    torch.manual_seed(4)
    policy = LoraPolicy(model, cfg)
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, 64, (2, 11), generator=g)
    ids[1, :6] = ids[0, :6]
    am = torch.ones(2, 11, dtype=torch.long)
    cm = torch.zeros(2, 11, dtype=torch.bool)
    cm[0, 4:] = True
    cm[1, 4:9] = True
    am[1, 9:] = 0
    ids[1, 9:] = 0
    batch = PairBatch(
        input_ids=ids,
        attention_mask=am,
        completion_mask=cm,
        prompt_len=torch.tensor([4, 4]),
        completion_len=cm.sum(1),
        row_index=torch.tensor([0]),
    )
    return policy, batch


def _loop(policy: LoraPolicy, batch: PairBatch, row: int) -> torch.Tensor:
    from prefopt.logprobs import token_logps

    params = policy.trainable_parameters()
    sl = slice(row, row + 1)
    lp = token_logps(policy.model, batch.input_ids[sl], batch.attention_mask[sl], batch.completion_mask[sl])
    out = []
    for t in batch.completion_mask[row].nonzero().flatten().tolist():
        gs = torch.autograd.grad(lp[0, t], params, retain_graph=True)
        out.append(torch.cat([x.reshape(-1) for x in gs]).double())
    return torch.stack(out)


@pytest.mark.parametrize("chunk_rows", [64, 2])
def test_token_vjp_and_copies_equal_loop(chunk_rows: int) -> None:
    from prefopt.diagnostics import token_gradient_correlation
    from prefopt.diagnostics.pergrad import resolve_params
    from prefopt.diagnostics.token_correlation import per_token_gradients_vjp

    policy, batch = _tiny_policy_and_pair()
    named = resolve_params(policy.model, None)
    pos = batch.completion_mask[0].nonzero().flatten()
    got = per_token_gradients_vjp(
        policy.model, batch.input_ids[0], batch.attention_mask[0], pos, named, chunk_rows=chunk_rows
    )
    assert got is not None  # the LoRA policy takes the VJP path (no silent fallback)
    gw = _loop(policy, batch, 0)
    torch.testing.assert_close(got[0], gw, rtol=1e-9, atol=1e-12)
    gl = _loop(policy, batch, 1)
    want = (gw @ gl.T) / (gw.norm(dim=1)[:, None] * gl.norm(dim=1)[None])
    for method in ("vjp", "copies"):
        tc = token_gradient_correlation(policy, batch, 0, method=method, chunk_rows=chunk_rows)
        torch.testing.assert_close(tc.cross_inner, gw @ gl.T, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(tc.matrix, want, rtol=1e-9, atol=1e-12)


def test_token_vjp_refuses_non_linear_params_and_auto_falls_back() -> None:
    import warnings as w

    from prefopt.diagnostics import token_gradient_correlation

    policy, batch = _tiny_policy_and_pair()
    emb = next(n for n, _ in policy.model.named_parameters() if "embed_tokens" in n)
    lora = [n for n, p in policy.model.named_parameters() if p.requires_grad][:4]
    policy.model.get_parameter(emb).requires_grad_(True)
    try:
        with pytest.raises(ValueError, match="method='vjp' needs"):
            token_gradient_correlation(policy, batch, 0, method="vjp", params=[emb, *lora])
        with w.catch_warnings():
            w.simplefilter("ignore", RuntimeWarning)  # the copies engine's loop fallback for the embedding
            auto = token_gradient_correlation(policy, batch, 0, params=[emb, *lora])
            copies = token_gradient_correlation(policy, batch, 0, method="copies", params=[emb, *lora])
        torch.testing.assert_close(auto.cross_inner, copies.cross_inner, rtol=0, atol=0)
    finally:
        policy.model.get_parameter(emb).requires_grad_(False)
    with pytest.raises(ValueError, match="method must be"):
        token_gradient_correlation(policy, batch, 0, method="fast")  # type: ignore[arg-type]
