"""``prefopt diagnose`` (prefopt.diagnostics.cli) with ``--tiny``.

Oracles: the screen (pairs.csv) equals, pair by pair, an unpadded forward of each response alone with an
explicit loop over its tokens (CHES from ``output_hidden_states``, log-probs from ``log_softmax`` of the full
logits), and ranking accuracy / idealised ranking accuracy / flip loss recomputed by hand from those log-probs;
the report (report.csv) equals :func:`prefopt.diagnostics.entanglement` called directly on the same model, LoRA
init and pairs; the reported pairs are exactly the top-k by CHES plus ``--pairs``; every user error is one line
and exit status 2.
"""

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
from prefopt.diagnostics.cli import (
    REPORT_COLUMNS,
    SCREEN_COLUMNS,
    add_diagnose_parser,
    parse_loss_args,
    parse_pairs,
    run_diagnose,
)
from prefopt.diagnostics.displacement import ches_and_logps, ches_scores
from prefopt.policy import LoraPolicy
from prefopt.testing import char_tokenizer, tiny_causal_lm
from prefopt.types import PairBatch

N, BATCH, BETA, MAXLEN, MAXPROMPT = 6, 4, 0.2, 96, 24


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="prefopt")
    sub = parser.add_subparsers(dest="command", required=True)
    add_diagnose_parser(sub)
    return parser.parse_args(["diagnose", *argv])


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("diag")
    argv = ["--tiny", "--limit", str(N), "--batch", str(BATCH), "--out", str(out), "--no-progress"]
    argv += ["--top-k", "1", "--pairs", "4,2", "--beta", str(BETA), "--max-length", str(MAXLEN)]
    argv += ["--max-prompt-length", str(MAXPROMPT), "--verify", "--heatmaps"]
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert run_diagnose(parse(argv)) == 0
    return out, err.getvalue()


def _setup() -> tuple[LoraPolicy, PreferenceCollator, list[dict[str, str]]]:
    """The CLI's model, LoRA init (seed 0), collator and first N built-in pairs (all valid)."""
    tok = char_tokenizer()
    model = tiny_causal_lm("llama", vocab_size=len(tok), hidden_size=32, num_layers=2, seed=0)
    torch.manual_seed(0)
    policy = LoraPolicy(model)
    rows = [dict(r) for r in load_builtin_pairs()][:N]
    return policy, PreferenceCollator(tok, max_length=MAXLEN, max_prompt_length=MAXPROMPT), rows


def _naive_pair(model: torch.nn.Module, batch: PairBatch) -> tuple[float, float, float, float, int, int]:
    """One pair, each response alone and unpadded: CHES, LN-CHES, S_w, S_l by explicit loops."""
    sums, counts, logps = [], [], []
    for r in (0, 1):
        n = int(batch.attention_mask[r].sum())
        ids = batch.input_ids[r, :n].unsqueeze(0)
        comp = batch.completion_mask[r, :n].nonzero().flatten().tolist()
        with torch.no_grad():
            out = model(input_ids=ids, output_hidden_states=True)
        h = out.hidden_states[-1][0].double()
        lsm = torch.log_softmax(out.logits[0].double(), dim=-1)
        s = torch.zeros(h.shape[-1], dtype=torch.float64)
        lp = 0.0
        for t in comp:  # position t - 1 predicts token t
            s = s + h[t - 1]
            lp += float(lsm[t - 1, int(ids[0, t])])
        sums.append(s)
        counts.append(len(comp))
        logps.append(lp)
    sp, sm = sums
    cross, own = float(sp @ sm), float(sp @ sp)
    ln = cross / (counts[0] * counts[1]) - own / counts[0] ** 2
    return cross - own, ln, logps[0], logps[1], counts[0], counts[1]


def test_screen_equals_per_pair_loops(run_dir: tuple[Path, str]) -> None:
    out, _ = run_dir
    with open(out / "pairs.csv") as fh:
        rows = list(csv.DictReader(fh))
    data = json.loads((out / "pairs.json").read_text())
    assert tuple(rows[0].keys()) == SCREEN_COLUMNS and len(rows) == N == len(data["pairs"])
    policy, collate, src = _setup()
    model = policy.model
    truncated = 0
    for k in range(N):
        js, cs = data["pairs"][k], rows[k]
        assert js["pair"] == k == int(cs["pair"]) and js["source_row"] == k  # built-in rows all valid
        batch = collate([src[k]])
        truncated += int(
            batch.input_ids.shape[1] < PreferenceCollator(char_tokenizer())([src[k]]).input_ids.shape[1]
        )
        c, ln, sw, sl, nw, nl = _naive_pair(model, batch)
        assert (js["chosen_len"], js["rejected_len"]) == (nw, nl)
        assert js["ches"] == pytest.approx(c, rel=1e-4, abs=1e-4)
        assert js["ln_ches"] == pytest.approx(ln, rel=1e-4, abs=1e-5)
        assert js["chosen_logp"] == pytest.approx(sw, rel=1e-5, abs=1e-4)
        assert js["rejected_logp"] == pytest.approx(sl, rel=1e-5, abs=1e-4)
        # ranking by hand, from the file's own log-probs
        assert js["ranked"] == (js["chosen_logp"] > js["rejected_logp"])
        assert js["ranked_per_token"] == (js["chosen_logp"] / nw > js["rejected_logp"] / nl)
        ratio = js["chosen_logp"] - js["rejected_logp"] + math.log(0.75 / 0.25) / BETA
        assert js["idealized_ranked"] == (ratio > 0)
        want_flip = math.log1p(math.exp(BETA * (js["chosen_logp"] - js["rejected_logp"])))
        assert js["dpo_flip_loss"] == pytest.approx(want_flip, rel=1e-12)
        for f in SCREEN_COLUMNS:  # CSV == JSON
            assert cs[f] == str(js[f])
    assert truncated > 0  # --max-prompt-length reached the collator
    summ = data["summary"]
    assert summ["pairs"] == N and summ["beta_of_screen"] == BETA
    assert summ["ranking_accuracy"] == pytest.approx(sum(p["ranked"] for p in data["pairs"]) / N)
    assert summ["top_ches_pairs"] == sorted(range(N), key=lambda k: -data["pairs"][k]["ches"])
    assert data["config"]["loss_args"] == {"beta": BETA} and data["config"]["max_prompt_length"] == MAXPROMPT


def test_report_is_entanglement_on_the_asked_pairs(run_dir: tuple[Path, str]) -> None:
    out, _ = run_dir
    data = json.loads((out / "pairs.json").read_text())
    top1 = max(range(N), key=lambda k: data["pairs"][k]["ches"])
    asked = sorted({2, 4, top1})
    with open(out / "report.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert tuple(rows[0].keys()) == REPORT_COLUMNS
    assert [r["pair"] for r in data["report"]] == asked == [int(r["pair"]) for r in rows]
    assert data["summary"]["reported_pairs"] == asked
    policy, collate, src = _setup()
    rep = entanglement(policy, collate([src[k] for k in asked]), loss="dpo", beta=BETA, eta=1e-3)
    fields = ["inner", "chosen_sqnorm", "rejected_sqnorm", "cosine", "ratio", "chosen_weight"]
    fields += ["rejected_weight", "pred_dchosen", "pred_drejected", "chosen_logp", "rejected_logp", "loss"]
    for j, (js, cs) in enumerate(zip(data["report"], rows, strict=True)):
        for f in fields:
            assert js[f] == pytest.approx(float(getattr(rep, f)[j]), rel=1e-6, abs=1e-12), f
            assert float(cs[f]) == pytest.approx(js[f], rel=1e-12, abs=0), f
        assert js["chosen_norm"] == pytest.approx(math.sqrt(float(rep.chosen_sqnorm[j])), rel=1e-6)
        assert js["entangled"] == bool(rep.ratio[j] > 1) and js["chosen_falls"] == bool(rep.chosen_falls[j])
        screen = data["pairs"][js["pair"]]
        assert js["ches"] == screen["ches"] and js["source_row"] == screen["source_row"]
        # the screen's no-grad log-probs (adapter off) equal the report's (fresh adapter: policy == reference)
        assert screen["chosen_logp"] == pytest.approx(js["chosen_logp"], rel=1e-5)
        # --verify: the measured change has the predicted sign (η = 1e-3, first order)
        assert math.copysign(1, js["measured_dchosen"]) == math.copysign(1, js["pred_dchosen"])
    assert data["summary"]["verify_sign_agreement"] == 1.0


def test_heatmaps_of_the_reported_pairs_and_printed_plan(run_dir: tuple[Path, str]) -> None:
    out, err = run_dir
    data = json.loads((out / "pairs.json").read_text())
    assert [h["pair"] for h in data["heatmaps"]] == [r["pair"] for r in data["report"]]
    for h in data["heatmaps"]:
        png = Path(h["path"]).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 2000
        rec = next(r for r in data["report"] if r["pair"] == h["pair"])
        assert h["summary"]["cosine"] == pytest.approx(rec["cosine"], rel=1e-4)
    # the plan comes first; each stage with more than one batch says how long it will take after its first
    lines = [x for x in err.splitlines() if x.startswith("prefopt diagnose:")]
    assert lines[0].startswith(f"prefopt diagnose: screening {N} pairs") and "heatmaps" in lines[0]
    assert any("first batch took" in x and "for the screen" in x for x in lines)  # 6 pairs, batch 4
    m = len(data["report"])
    assert any(x.startswith(f"prefopt diagnose: gradient report for {m} pair(s): roughly") for x in lines)
    assert any("first heatmap took" in x for x in lines)
    assert set(data["seconds"]) >= {"load", "screen", "report", "heatmaps", "total"}


def test_screen_only_by_default_and_data_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
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
    assert run_diagnose(parse(["--tiny", "--data", str(src), "--format", "implicit", "--out", str(out)])) == 0
    data = json.loads((out / "pairs.json").read_text())
    assert len(data["pairs"]) == 2 and data["report"] == [] and data["heatmaps"] == []
    assert data["pairs"][1]["chosen_len"] == 3  # " ", "4", eos (character tokenizer)
    assert not (out / "report.csv").exists() and not list(out.glob("*.png"))
    assert set(data["seconds"]) == {"load", "screen", "total"}
    assert "no gradient report: add --top-k" in capsys.readouterr().out


def test_long_prompts_run_once_and_equal_the_loop(tmp_path: Path) -> None:
    """Long prompts, short responses: the screen runs each prompt once (KV cache) and still equals the loop."""
    src = tmp_path / "long.jsonl"
    words = ["coffee", "latte", "oat milk", "no sugar", "a large cup", "to go", "with cinnamon", "hot"]
    rows = [
        {
            "prompt": " ".join(words[i:] + words[:i]) * 2 + " Agent:",
            "chosen": f" Sure{i}.",
            "rejected": f" No {i}!",
        }
        for i in range(5)
    ]
    src.write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "o"
    assert (
        run_diagnose(
            parse(["--tiny", "--data", str(src), "--out", str(out), "--batch", "2", "--no-progress"])
        )
        == 0
    )
    data = json.loads((out / "pairs.json").read_text())
    assert data["summary"]["screen_batches"] == 3 == data["summary"]["screen_batches_prompt_shared"]
    tok = char_tokenizer()
    model = tiny_causal_lm("llama", vocab_size=len(tok), hidden_size=32, num_layers=2, seed=0)
    collate = PreferenceCollator(tok, max_length=256)
    for k, rec in enumerate(data["pairs"]):
        c, ln, sw, sl, nw, nl = _naive_pair(model, collate([rows[k]]))
        assert (rec["chosen_len"], rec["rejected_len"]) == (nw, nl)
        assert rec["ches"] == pytest.approx(c, rel=1e-4, abs=1e-4)
        assert rec["ln_ches"] == pytest.approx(ln, rel=1e-4, abs=1e-5)
        assert rec["chosen_logp"] == pytest.approx(sw, rel=1e-5, abs=1e-4)
        assert rec["rejected_logp"] == pytest.approx(sl, rel=1e-5, abs=1e-4)


def _taskmaster(path: Path) -> None:
    """Taskmaster-style pointwise rows: JSON-encoded context turns and generation, a 0/1 reward."""

    def ctx(text: str) -> str:
        return json.dumps([{"role": "user", "text": text}])

    rows = [
        {
            "conversation_id": "a",
            "context": ctx("one latte"),
            "generation": json.dumps({"text": "Sure."}),
            "reward": 1.0,
        },
        {
            "conversation_id": "a",
            "context": ctx("one latte"),
            "generation": json.dumps({"text": "No."}),
            "reward": 0.0,
        },
        {
            "conversation_id": "a",
            "context": ctx("one latte"),
            "generation": json.dumps({"text": "Size?"}),
            "reward": 1.0,
        },
        {
            "conversation_id": "b",
            "context": ctx("a mocha"),
            "generation": json.dumps({"text": "OK!"}),
            "reward": 1.0,
        },
        {
            "conversation_id": "b",
            "context": ctx("a mocha"),
            "generation": json.dumps({"text": "Bye"}),
            "reward": 0.0,
        },
        {
            "conversation_id": "c",
            "context": ctx("tea"),
            "generation": json.dumps({"text": "Hot?"}),
            "reward": 1.0,
        },
    ]
    path.write_text(json.dumps(rows))


@pytest.mark.parametrize("fmt", ["pointwise", "auto"])
def test_pointwise_source(tmp_path: Path, fmt: str) -> None:
    from prefopt.data import load_pointwise, pairs_from_pointwise

    src = tmp_path / "reward_00.json"
    _taskmaster(src)
    want = list(pairs_from_pointwise(load_pointwise(str(src))))
    assert len(want) == 3  # (Sure., No.), (Size?, No.), (OK!, Bye); "tea" has one label only
    out = tmp_path / "o"
    args = parse(["--tiny", "--data", str(src), "--format", fmt, "--out", str(out), "--no-progress"])
    assert run_diagnose(args) == 0
    data = json.loads((out / "pairs.json").read_text())
    assert data["config"]["format"] == "pointwise" and len(data["pairs"]) == 3
    tok = char_tokenizer()
    for rec, row in zip(data["pairs"], want, strict=True):
        n = len(tok(row["chosen"], add_special_tokens=False)["input_ids"]) + 1  # + eos
        assert rec["chosen_len"] == n


@pytest.mark.parametrize(
    ("arch", "share_prompt"), [("llama", False), ("llama", True), ("gpt2", True), ("qwen2", True)]
)
def test_ches_and_logps_one_forward_equals_loops(arch: str, share_prompt: bool) -> None:
    """The screening primitive: CHES = ches_scores, S = the unpadded per-response loop, on a padded batch of
    different lengths through a LoRA policy with a non-zero adapter (float64). ``share_prompt=True`` (each
    prompt once, responses on its KV cache) gives the same numbers; pair 3's rows differ in their prompt (the
    plain-forward fallback). GPT-2 has absolute position embeddings: the cached responses must get positions
    ``p, p+1, ...``."""
    import peft

    model = tiny_causal_lm(arch, vocab_size=40, hidden_size=16, num_layers=2, seed=2).double()
    cfg = peft.LoraConfig(
        r=2, lora_alpha=4, target_modules="all-linear", lora_dropout=0.0, init_lora_weights=False
    )
    torch.manual_seed(1)
    policy = LoraPolicy(model, cfg)
    g = torch.Generator().manual_seed(3)
    b, t = 4, 12
    ids = torch.randint(2, 40, (2 * b, t), generator=g)
    am = torch.ones(2 * b, t, dtype=torch.long)
    cm = torch.zeros(2 * b, t, dtype=torch.bool)
    for i, (p, lw, ll) in enumerate([(3, 5, 9), (5, 1, 2), (2, 10, 4), (4, 3, 6)]):
        if i < 3:
            ids[i + b, :p] = ids[i, :p]
        for r, length in ((i, lw), (i + b, ll)):
            cm[r, p : p + length] = True
            am[r, p + length :] = 0
            ids[r, p + length :] = 0
    batch = PairBatch(
        input_ids=ids,
        attention_mask=am,
        completion_mask=cm,
        prompt_len=torch.tensor([3, 5, 2, 4, 3, 5, 2, 4]),
        completion_len=cm.sum(1),
        row_index=torch.arange(b),
    )
    s, sw, sl = ches_and_logps(policy, batch, share_prompt=share_prompt)
    ref = ches_scores(policy, batch)
    torch.testing.assert_close(s.ches, ref.ches, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(s.ln_ches, ref.ln_ches, rtol=1e-12, atol=1e-12)
    assert s.chosen_count.tolist() == [5, 1, 10, 3] and s.rejected_count.tolist() == [9, 2, 4, 6]
    inc, _, _ = ches_and_logps(policy, batch, positions="inclusive", share_prompt=share_prompt)
    ref_inc = ches_scores(policy, batch, positions="inclusive")
    torch.testing.assert_close(inc.ches, ref_inc.ches, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(inc.ln_ches, ref_inc.ln_ches, rtol=1e-12, atol=1e-12)
    for i in range(b):
        one = PairBatch(
            input_ids=ids[[i, i + b]],
            attention_mask=am[[i, i + b]],
            completion_mask=cm[[i, i + b]],
            prompt_len=batch.prompt_len[[i, i + b]],
            completion_len=batch.completion_len[[i, i + b]],
            row_index=torch.tensor([0]),
        )
        c, ln, nsw, nsl, _, _ = _naive_pair(policy.model, one)
        assert float(s.ches[i]) == pytest.approx(c, rel=1e-10, abs=1e-10)
        assert float(s.ln_ches[i]) == pytest.approx(ln, rel=1e-10, abs=1e-12)
        assert float(sw[i]) == pytest.approx(nsw, rel=1e-12, abs=1e-12)
        assert float(sl[i]) == pytest.approx(nsl, rel=1e-12, abs=1e-12)
    assert sw.dtype == torch.float64 and not sw.requires_grad


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--loss", "nope"], "unknown loss 'nope'"),
        (["--loss", "kto"], "not a pairwise loss"),
        (["--loss", "pairwise_normalized"], "not a pairwise loss"),
        (["--data", "/nonexistent/file.jsonl"], "--data: no such file"),
        (["--model", "/nonexistent/folder"], "--model"),
        (["--limit", "0"], "--limit must be >= 1"),
        (["--batch", "0"], "--batch must be >= 1"),
        (["--threads", "0"], "--threads must be >= 1"),
        (["--top-k", "-1"], "--top-k must be >= 0"),
        (["--eta", "-1"], "--eta"),
        (["--max-prompt-length", "256"], "--max-prompt-length must be >= 1 and < --max-length (256)"),
        (["--max-prompt-length", "0"], "--max-prompt-length"),
        (["--pairs", "1,x"], "--pairs must be comma-separated"),
        (["--pairs", ","], "--pairs names no pair"),
        (["--pairs", "-3"], "pair numbers are >= 0"),
        (["--pairs", "1,40"], "--pairs: no pair 40; the screen has pairs 0..39"),
        (["--limit", "3", "--pairs", "3"], "no pair 3; the screen has pairs 0..2"),
        (["--heatmaps"], "--heatmaps draws the reported pairs"),
        (["--verify"], "--verify checks the gradient report"),
        (["--format", "pointwise"], "--format pointwise needs --data"),
        (["--loss-arg", "beta"], "NAME=VALUE"),
        (["--beta", "-1"], "beta"),
        (["--beta", "0.1", "--loss-arg", "beta=0.2"], "beta given twice"),
        (["--loss-arg", "gamma=1"], "unknown hyperparameter"),
        (["--loss", "ipo", "--beta", "0"], "--loss ipo"),
    ],
)
def test_clear_errors(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from prefopt.cli import main

    tiny = [] if "--model" in argv else ["--tiny"]
    assert main(["diagnose", *tiny, "--out", str(tmp_path / "o"), "--no-progress", *argv]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("prefopt diagnose: error:") and message in err[0], err[0]
    assert captured.out == ""


def test_pointwise_format_with_pair_data_is_one_error_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from prefopt.cli import main

    src = tmp_path / "pairs.jsonl"
    src.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n")
    code = main(
        ["diagnose", "--tiny", "--data", str(src), "--format", "pointwise", "--out", str(tmp_path / "o")]
    )
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("prefopt diagnose: error: --data:"), err


def test_parse_loss_args_and_pairs() -> None:
    assert parse_loss_args(["beta=0.5", "n=3", "flag=true", "mode=sum"]) == {
        "beta": 0.5,
        "n": 3,
        "flag": True,
        "mode": "sum",
    }
    assert parse_pairs("3, 17,3,0") == [0, 3, 17] and parse_pairs(None) == []


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
