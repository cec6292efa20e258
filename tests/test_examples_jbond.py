"""examples/jbond.py (the J-BOND loop on one backbone), experiments/jbond_smollm2.py (J-BOND vs RLOO vs
Best-of-N) and benchmarks/jbond_memory.py.

The pieces of the experiment that compute numbers (reward, quantiles, the Best-of-N estimate on a pool, row
stacking, prompt extraction) are checked against hand-derived values and slow loops; the example's own copies
of the reward and the quantile are checked against them. Both scripts and the memory benchmark run end to end
on tiny models.
"""

from __future__ import annotations

import gzip
import importlib.util
import itertools
import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).parents[1] / "../shared/data"
HH = DATA / "hh-rlhf" / "helpful-base.test.jsonl.gz"


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses need the module registered
    spec.loader.exec_module(mod)
    return mod


jb = _load("experiments_jbond_smollm2", ROOT / "experiments" / "jbond_smollm2.py")
ex = _load("examples_jbond", ROOT / "examples" / "jbond.py")

# ------------------------------------------------------------------------------------------------ reward


def test_reward_hand_computed():
    q = "How do I bake a pumpkin pie?"
    # content words: bake, pumpkin ("pie" is too short; how/do/I/a are short or stopwords)
    assert jb.content_words(q) == {"bake", "pumpkin"}
    y = "Sure, I'd be happy to help you bake it! Sorry, not pumpkin."
    parts = jb.reward_parts(q, y)
    # positive: sure, happy, help (3); negative: sorry, not (2); relevance: bake, pumpkin = 2/2
    assert parts.tone == 1
    assert parts.relevance == 1.0
    assert jb.reward(q, y) == 2.0
    assert jb.reward(q, "Pie.") == 0.0
    assert jb.reward(q, "I can’t BAKE.") == pytest.approx(-1 + 0.5)  # curly apostrophe, upper case
    assert jb.reward("Is it?", "great great") == 2.0  # no content words: relevance 0


@pytest.mark.parametrize("mod", [jb, ex], ids=["experiment", "example"])
def test_rewards_vector_and_bad_input(mod):
    r = mod.rewards(["a question here", "why rain"], ["question good", "no"])
    assert r.dtype == torch.float64
    assert r.tolist() == [1.0 + 1 / 2, -1.0]  # content {question, here}; {rain}
    with pytest.raises(ValueError, match="replies"):
        mod.rewards(["a"], ["x", "y"])


def test_example_reward_is_the_experiments():
    """The example keeps a copy of the reward (examples are single files): the same lexicons, and the same
    value on the hand-computed cases and on random replies drawn from both lexicons, stopwords and question
    words, with punctuation, capitals and curly apostrophes."""
    assert (ex.POSITIVE, ex.NEGATIVE, ex.STOPWORDS) == (jb.POSITIVE, jb.NEGATIVE, jb.STOPWORDS)
    q = "How do I bake a pumpkin pie?"
    assert ex.reward(q, "Sure, I'd be happy to help you bake it! Sorry, not pumpkin.") == 2.0
    assert ex.reward(q, "I can’t BAKE.") == pytest.approx(-1 + 0.5)
    assert ex.reward("Is it?", "great great") == 2.0
    vocab = [*sorted(jb.POSITIVE | jb.NEGATIVE | jb.STOPWORDS), "Bake", "PUMPKIN", "can’t", "pie,", "x"]
    gen = torch.Generator().manual_seed(0)
    for _ in range(300):
        pick = lambda k: [vocab[int(i)] for i in torch.randint(len(vocab), (k,), generator=gen)]  # noqa: E731
        question, reply = " ".join(pick(5)) + "?", " ".join(pick(8)) + "."
        assert ex.reward(question, reply) == jb.reward(question, reply), (question, reply)


# ------------------------------------------------------------------------------------------------ quantiles


def _mid_loop(values, pool):
    out = []
    for v_row, p_row in zip(values.tolist(), pool.tolist()):
        row = []
        for v in v_row:
            below = sum(p < v for p in p_row)
            ties = sum(p == v for p in p_row)
            row.append((below + 0.5 * ties) / len(p_row))
        out.append(row)
    return torch.tensor(out, dtype=torch.float64)


small_ints = st.integers(-3, 3)


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 3).flatmap(
        lambda e: st.tuples(
            st.lists(st.lists(small_ints, min_size=3, max_size=3), min_size=e, max_size=e),
            st.lists(st.lists(small_ints, min_size=5, max_size=5), min_size=e, max_size=e),
        )
    )
)
def test_mid_quantile_matches_loop(data):
    values, pool = (torch.tensor(x, dtype=torch.float64) for x in data)
    for mod in (jb, ex):  # the example keeps its own copy
        torch.testing.assert_close(
            mod.mid_quantile(values, pool), _mid_loop(values, pool), rtol=0, atol=1e-15
        )


@pytest.mark.parametrize("mod", [jb, ex], ids=["experiment", "example"])
def test_mid_quantile_hand_values_and_errors(mod):
    pool = torch.tensor([[1.0, 2.0, 2.0, 5.0]])
    got = mod.mid_quantile(torch.tensor([[0.0, 2.0, 9.0, 1.0]]), pool)
    assert got.tolist() == [[0.0, (1 + 0.5 * 2) / 4, 1.0, 0.5 / 4]]
    with pytest.raises(ValueError, match="pool"):
        mod.mid_quantile(torch.zeros(2, 3), torch.zeros(3, 4))
    with pytest.raises(ValueError, match="pool"):
        jb.loo_mid_quantile(torch.zeros(2, 1))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(small_ints, min_size=2, max_size=7).map(lambda r: r), min_size=1, max_size=3))
def test_loo_mid_quantile_matches_loop_and_averages_half(rows):
    m = min(len(r) for r in rows)
    pool = torch.tensor([r[:m] for r in rows], dtype=torch.float64)
    got = jb.loo_mid_quantile(pool)
    for e in range(pool.shape[0]):
        for j in range(m):
            others = torch.cat([pool[e, :j], pool[e, j + 1 :]])
            want = _mid_loop(pool[e, j].view(1, 1), others.view(1, -1))[0, 0]
            assert float(got[e, j]) == pytest.approx(float(want), abs=1e-15)
    # every pair contributes exactly 2 to the summed counts, so the pool mean is exactly 1/2 (ties or not)
    torch.testing.assert_close(got.mean(-1), torch.full((pool.shape[0],), 0.5, dtype=torch.float64))


def _bon_brute(pool_row: list[float], n: int) -> float:
    """Enumerate all M^n draw sequences (uniform, with replacement); the first maximum wins."""
    m = len(pool_row)
    q = jb.loo_mid_quantile(torch.tensor([pool_row], dtype=torch.float64))[0].tolist()
    total = 0.0
    for draws in itertools.product(range(m), repeat=n):
        best = max(range(n), key=lambda i: (pool_row[draws[i]], -i))
        total += q[draws[best]]
    return total / m**n


@pytest.mark.parametrize("n", [1, 2, 3, 4])
@pytest.mark.parametrize(
    "row", [[0.0, 1.0, 2.0, 3.0], [1.0, 1.0, 0.0, 2.5], [2.0, 2.0, 2.0, 2.0], [3.0, -1.0, 0.5]]
)
def test_bon_expected_quantile_matches_enumeration(row, n):
    got = jb.bon_expected_quantile(torch.tensor([row]), n)
    assert float(got[0]) == pytest.approx(_bon_brute(row, n), abs=1e-12)


def test_bon_expected_quantile_n1_is_half_and_increases():
    torch.manual_seed(0)
    pool = torch.randint(0, 4, (5, 16)).double() + torch.rand(5, 16).round(decimals=1)
    assert float(jb.bon_expected_quantile(pool, 1).mean()) == pytest.approx(0.5, abs=1e-12)
    qs = [float(jb.bon_expected_quantile(pool, n).mean()) for n in (1, 2, 4, 8, 16)]
    assert all(a < b for a, b in itertools.pairwise(qs)), qs
    # distinct rewards, exact value for N = 2: Σ_j (2j+1)/M² · j/(M−1), j = rank 0..M−1
    m = 16
    want = sum((2 * j + 1) / m**2 * j / (m - 1) for j in range(m))
    assert float(jb.bon_expected_quantile(torch.randperm(m).double().view(1, m), 2)[0]) == pytest.approx(want)


# ------------------------------------------------------------------------------------------------ plumbing


def test_stack_rows_pads_with_the_right_values():
    a = (torch.tensor([[5, 6, 7]]), torch.tensor([[1, 1, 1]]), torch.tensor([[False, True, True]]))
    b = (
        torch.tensor([[8, 9], [3, 4]]),
        torch.tensor([[1, 1], [1, 0]]),
        torch.tensor([[False, True], [False, False]]),
    )
    ids, am, cm = jb.stack_rows([a, b], pad=0)
    assert ids.tolist() == [[5, 6, 7], [8, 9, 0], [3, 4, 0]]
    assert am.tolist() == [[1, 1, 1], [1, 1, 0], [1, 0, 0]]
    assert cm.tolist() == [[False, True, True], [False, True, False], [False, False, False]]
    assert cm.dtype == torch.bool


def _write_hh(path: Path, rows: list[dict]) -> None:
    with gzip.open(path, "wt") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def test_hh_questions_single_turn_short_deduplicated(tmp_path):
    rows = [
        {
            "chosen": "\n\nHuman: How do I bake bread?\n\nAssistant: Knead.",
            "rejected": "\n\nHuman: How do I bake bread?\n\nAssistant: No.",
        },
        {
            "chosen": "\n\nHuman: How do I bake bread?\n\nAssistant: Yeast.",
            "rejected": "\n\nHuman: How do I bake bread?\n\nAssistant: Oven.",
        },
        {
            "chosen": "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: Tell me a joke\n\nAssistant: Ha",
            "rejected": "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: Tell me a joke\n\nAssistant: No",
        },
        {
            "chosen": "\n\nHuman: " + "word " * 20 + "\n\nAssistant: a",
            "rejected": "\n\nHuman: " + "word " * 20 + "\n\nAssistant: b",
        },
        {
            "chosen": "\n\nHuman: What is rain?\n\nAssistant: Water.",
            "rejected": "\n\nHuman: What is rain?\n\nAssistant: Snow.",
        },
    ]
    path = tmp_path / "hh.jsonl.gz"
    _write_hh(path, rows)
    assert jb.hh_questions(path, max_words=16) == ["How do I bake bread?", "What is rain?"]
    assert jb.hh_questions(path, max_words=3) == ["What is rain?"]


def test_example_questions_are_the_experiments(tmp_path):
    """The example's prompt extraction (its own copy) gives the experiment's questions in the experiment's
    seeded order."""
    rows = [
        {"chosen": f"\n\nHuman: {q}\n\nAssistant: {a}", "rejected": f"\n\nHuman: {q}\n\nAssistant: no"}
        for q, a in [
            ("How do I bake bread?", "Knead."),
            ("How do I bake bread?", "Yeast."),
            ("What is rain?", "Water."),
            ("Why is the sky blue?", "Light."),
            ("word " * 20, "a"),
        ]
    ]
    rows.append(
        {
            "chosen": "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: Tell me a joke\n\nAssistant: Ha",
            "rejected": "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: Tell me a joke\n\nAssistant: No",
        }
    )
    path = tmp_path / "hh.jsonl.gz"
    _write_hh(path, rows)
    for seed in (0, 1, 2):
        want = jb.hh_questions(path, max_words=16)
        random.Random(seed).shuffle(want)
        got = ex.questions(ex.parse_args(["--data", str(path), "--eval-prompts", "1", "--seed", str(seed)]))
        assert got == want and len(got) == 3


@pytest.mark.data
def test_hh_questions_real_file():
    if not HH.is_file():
        pytest.skip(f"needs {HH} (../shared/data)")
    qs = jb.hh_questions(HH, max_words=16)
    assert len(qs) > 200
    assert all("Human:" not in q and "Assistant:" not in q and len(q.split()) <= 16 for q in qs)
    assert len(set(qs)) == len(qs)
    # the reward has spread on real questions: replies that repeat the question are relevant
    assert jb.reward(qs[0], qs[0]) > 0 or not jb.content_words(qs[0])


def test_jbond_step_moves_policy_and_anchor_follows_with_eta_one():
    """One J-BOND step on a tiny model: the policy adapter changes, and with η = 1 (decay 0) the anchor adapter
    becomes exactly the policy, so anchor and policy log-probs agree afterwards."""
    from prefopt.data import PromptCollator
    from prefopt.testing import char_tokenizer

    args = jb.parse_args(["--smoke", "--eta", "1.0"])
    torch.manual_seed(0)
    tok = char_tokenizer()
    collate = PromptCollator(tok, add_special_tokens=False)
    qs = ["why is the sky blue", "bake bread"]
    eos = int(tok.eos_token_id)
    ctx = jb.Ctx(
        tok,
        collate,
        eos,
        int(tok.pad_token_id),
        qs,
        collate([jb.render(tok, q) for q in qs]),
        torch.zeros(2, 4),
        qs,
    )
    policy = jb.new_policy(args, 0)
    opt = torch.optim.Adam(policy.trainable_parameters(), lr=1e-2)
    before = {k: v.clone() for k, v in policy.delta_weights().items()}
    rec = jb.jbond_step(policy, opt, ctx, qs, args)
    assert math.isfinite(rec["loss"]) and rec["grad_norm"] > 0
    after = policy.delta_weights()
    assert any(float((after[k] - before[k]).abs().max()) > 0 for k in after)
    roll = jb.sample(policy, ctx.eval_batch, 2, mode="policy", max_new_tokens=5, eos=eos, pad=ctx.pad)
    with torch.no_grad():
        lp = jb.seq_logps(policy.model, roll.input_ids, roll.attention_mask, roll.completion_mask)
        with policy.anchor():
            alp = jb.seq_logps(policy.model, roll.input_ids, roll.attention_mask, roll.completion_mask)
        with policy.reference():
            rlp = jb.seq_logps(policy.model, roll.input_ids, roll.attention_mask, roll.completion_mask)
    torch.testing.assert_close(alp, lp, rtol=0, atol=1e-4)
    assert float((lp - rlp).abs().max()) > 1e-3  # and the policy did leave the reference


# ------------------------------------------------------------------------------------------------ end to end


def _run(cmd: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)


@pytest.mark.slow
def test_experiment_smoke_without_data(tmp_path):
    """``experiments/jbond_smollm2.py --smoke`` runs end to end (tiny model, char tokenizer, 2 steps) with the
    built-in prompts."""
    proc = _run(
        [
            sys.executable,
            "experiments/jbond_smollm2.py",
            "--smoke",
            "--no-progress",
            "--data",
            str(tmp_path / "absent.gz"),
            "--out",
            str(tmp_path),
        ]
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "smoke ok" in proc.stdout and "built-in pairs" in proc.stdout
    res = json.loads((tmp_path / "jbond.json").read_text())
    assert set(res["runs"]) == {"jbond", "reinforce 0.1"}
    assert [h["step"] for h in res["runs"]["jbond"]] == [0, 1, 2]
    assert [b["n"] for b in res["bon"]] == [2, 4, 8, 16]
    assert (tmp_path / "jbond.png").stat().st_size > 10_000


def test_example_smoke_run_in_process(tmp_path, capsys):
    """``examples/jbond.py --smoke``: 2 J-BOND steps on the tiny model; every step evaluated; the saved
    adapters carry the anchor, which moved off the reference (η > 0)."""
    res = ex.main(["--smoke", "--data", str(tmp_path / "absent.gz"), "--out", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert "smoke ok" in out and "reference pool: 4 samples x 2 prompts" in out
    hist = res["history"]
    assert [h["step"] for h in hist] == [0, 1, 2]
    assert all(0 <= h["quantile"] <= 1 and math.isfinite(h["kl"]) for h in hist)
    assert json.loads((tmp_path / "out" / "jbond.json").read_text())["history"] == hist
    from safetensors.torch import load_file

    meta = json.loads((tmp_path / "out" / "prefopt_policy.json").read_text())
    tensors = load_file(str(tmp_path / "out" / meta["tensor_file"]))
    anchor_b = [v for k, v in tensors.items() if ".anchor." in k and "lora_B" in k]
    assert anchor_b and any(float(v.abs().max()) > 0 for v in anchor_b)


def test_example_draws_every_sample_through_its_sampler(tmp_path, monkeypatch):
    """The example draws the reference pool, the policy samples and the anchor samples all with the one
    sampler, inside `policy.reference()` / `policy.anchor()`: the contract `VLLMSampler` follows
    (`which=None` samples the weights of the policy's current context), so `--sampler vllm` serves all
    three from the engine."""
    calls = []

    def recording_sampler(args, policy, tok):
        inner = make_sampler(args, policy, tok)

        class Recording:
            def generate(self, prompts, n=1):
                calls.append((policy.mode, n))
                return inner.generate(prompts, n)

        return Recording()

    make_sampler = ex.make_sampler
    monkeypatch.setattr(ex, "make_sampler", recording_sampler)
    ex.main(["--smoke", "--steps", "1", "--data", str(tmp_path / "absent.gz"), "--out", str(tmp_path / "o")])
    # pool (4 per eval prompt), eval at step 0, then step 1: 1 policy + 2 anchor samples, eval at step 1
    assert calls == [("reference", 4), ("policy", 2), ("policy", 1), ("anchor", 2), ("policy", 2)]


def test_example_sampler_vllm_without_vllm_is_a_clear_error(tmp_path, capsys):
    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed here")
    with pytest.raises(SystemExit) as exc:
        ex.main(["--smoke", "--sampler", "vllm", "--out", str(tmp_path / "out")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "error: --sampler vllm needs vLLM: pip install 'prefopt-rlhf[vllm]'" in err
    assert not (tmp_path / "out").exists()  # refused before anything was written


@pytest.mark.slow
def test_memory_benchmark_tiny(tmp_path):
    out = tmp_path / "mem.json"
    proc = _run(
        [
            sys.executable,
            "benchmarks/jbond_memory.py",
            "--tiny",
            "--repeats",
            "1",
            "--steps",
            "1",
            "--threads",
            "1",
            "--json",
            str(out),
        ]
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    res = json.loads(out.read_text())
    assert set(res["peak_rss_mib"]) == {"one_backbone", "three_copies"}
    assert res["memory_ratio"] == pytest.approx(
        res["peak_rss_mib"]["one_backbone"] / res["peak_rss_mib"]["three_copies"]
    )
    # LoRA trains a small fraction of what full fine-tuning trains
    assert res["trainable_params"]["one_backbone"] < 0.5 * res["trainable_params"]["three_copies"]


def test_merge_combines_runs_and_refuses_other_pools(tmp_path):
    bon = [{"n": n, "quantile": 0.5 + n / 100, "kl_bound": math.log(n) - (n - 1) / n} for n in (2, 4, 8, 16)]
    point = {"step": 0, "quantile": 0.5, "quantile_se": 0.0, "reward": 0.1, "kl": 0.0, "kl_se": 0.0}
    later = {**point, "step": 5, "quantile": 0.6, "kl": 0.3}
    a = {"args": {}, "bon": bon, "runs": {"jbond": [point, later]}, "seconds_total": 3.0}
    b = {"args": {}, "bon": bon, "runs": {"reinforce 0.5": [point]}, "seconds_total": 4.0}
    pa, pb = tmp_path / "a.json", tmp_path / "b.json"
    pa.write_text(json.dumps(a))
    pb.write_text(json.dumps(b))
    res = jb.main(["--merge", str(pa), str(pb), "--out", str(tmp_path / "m")])
    assert set(res["runs"]) == {"jbond", "reinforce 0.5"}
    assert res["seconds_total"] == 7.0
    assert (tmp_path / "m" / "jbond.png").stat().st_size > 10_000
    b["bon"] = bon[:2]
    pb.write_text(json.dumps(b))
    with pytest.raises(SystemExit, match="Best-of-N"):
        jb.main(["--merge", str(pa), str(pb), "--out", str(tmp_path / "m")])
