"""Tests for prefopt.data loaders: formats, sources, bad rows, real data (marked ``data``), built-in pairs."""

from __future__ import annotations

import collections
import glob
import gzip
import json
import logging
from pathlib import Path

import datasets
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prefopt.data import (
    LoadReport,
    PreferenceCollator,
    detect_format,
    load_builtin_pairs,
    load_pointwise,
    load_preferences,
    load_unpaired,
    pairs_from_pointwise,
    render_taskmaster_context,
    split_implicit_prompt,
    unpaired_from_pairs,
)

DATA = Path(__file__).parents[1] / "../shared/data"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"shared data folder {DATA} is absent")

EXPLICIT = [
    {"prompt": "Q: 1+1?\nA:", "chosen": " 2", "rejected": " 3"},
    {"prompt": "Q: sky?\nA:", "chosen": " blue", "rejected": " green"},
]
H, A = "\n\nHuman:", "\n\nAssistant:"


def chat_tokenizer(template: str):
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    vocab.update({chr(i): i - 28 for i in range(32, 127)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    t = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    t.chat_template = template
    return t


PREFIX_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
# the generation prompt differs from how an assistant turn is rendered: prompt is never a prefix
NON_PREFIX_TEMPLATE = (
    "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}[assistant]:{% endif %}"
)


# ---------------------------------------------------------------------------------------------------------
# explicit / implicit
# ---------------------------------------------------------------------------------------------------------


def test_explicit_in_memory():
    ds, rep = load_preferences(EXPLICIT, return_report=True)
    assert isinstance(ds, datasets.Dataset)
    assert ds.column_names == ["prompt", "chosen", "rejected"]
    assert ds.to_list() == EXPLICIT
    assert rep == LoadReport("explicit", 2, 2, {}, {}, {})
    assert rep.summary() == "explicit: kept 2 of 2 rows"


def test_implicit_hand_case():
    chosen = f"{H} hi{A} hello{H} how are you?{A} fine, thanks"
    rejected = f"{H} hi{A} hello{H} how are you?{A} go away"
    prompt, c, r = split_implicit_prompt(chosen, rejected)
    assert prompt == f"{H} hi{A} hello{H} how are you?{A}"
    assert (c, r) == (" fine, thanks", " go away")
    assert prompt + c == chosen and prompt + r == rejected
    ds = load_preferences([{"chosen": chosen, "rejected": rejected}])
    assert ds[0] == {"prompt": prompt, "chosen": c, "rejected": r}
    # a configurable marker
    p, c2, r2 = split_implicit_prompt("User: x\nBot: yes", "User: x\nBot: no", marker="\nBot:")
    assert (p, c2, r2) == ("User: x\nBot:", " yes", " no")


def test_implicit_bad_rows_and_report(caplog):
    rows = [
        {"chosen": f"{H} a{A} good", "rejected": f"{H} a{A} bad"},  # 0 ok
        {"chosen": f"{H} a{A} same", "rejected": f"{H} a{A} same"},  # 1 identical
        {"chosen": f"{H} a{A} x", "rejected": f"{H} b{A} y"},  # 2 prompt mismatch
        {"chosen": f"{H} a{A} x", "rejected": f"{H} a{A}  "},  # 3 empty completion
        {"chosen": f"{H} a no marker", "rejected": f"{H} a{A} y"},  # 4 missing marker
        {"chosen": f"{H} a{A} x"},  # 5 missing field
        {"chosen": f"{H} a{A} x", "rejected": None},  # 6 missing field
        {"chosen": f"{H} c{A} ok", "rejected": f"{H} c{A} not ok"},  # 7 ok
    ]
    with caplog.at_level(logging.WARNING, logger="prefopt.data"):
        ds, rep = load_preferences(rows, return_report=True)
    assert len(ds) == 2 and ds["chosen"] == [" good", " ok"]
    assert rep.format == "implicit" and rep.n_rows == 8 and rep.n_kept == 2 and rep.n_skipped == 6
    assert dict(rep.skipped) == {
        "identical": 1,
        "prompt_mismatch": 1,
        "empty_completion": 1,
        "missing_marker": 1,
        "missing_field": 2,
    }
    assert rep.first_indices["missing_field"] == (5, 6)
    assert rep.first_indices["prompt_mismatch"] == (2,)
    assert "kept 2 of 8 rows" in caplog.text and "missing_field: 2 [rows 5, 6]" in caplog.text
    assert len(caplog.records) == 1  # one line per load
    with pytest.raises(ValueError, match=r"row 1: identical"):
        load_preferences(rows, strict=True)


def test_explicit_bad_rows():
    rows = [
        {"prompt": "p", "chosen": " a", "rejected": " a"},
        {"prompt": "p", "chosen": "", "rejected": " a"},
        {"prompt": None, "chosen": " b", "rejected": " a"},
        {
            "prompt": "",
            "chosen": " b",
            "rejected": " a",
        },  # an empty prompt is allowed here (collator decides)
    ]
    ds, rep = load_preferences(rows, return_report=True)
    assert len(ds) == 1 and ds[0]["prompt"] == ""
    assert dict(rep.skipped) == {"identical": 1, "empty_completion": 1, "missing_field": 1}
    with pytest.raises(ValueError, match=r"row 2: missing_field \('prompt'"):
        load_preferences([rows[3], rows[3], rows[2]], strict=True)


@pytest.mark.parametrize(
    ("row", "fmt"),
    [
        ({"prompt": "a", "chosen": "b", "rejected": "c"}, "explicit"),
        ({"chosen": "b", "rejected": "c"}, "implicit"),
        ({"chosen": [{"role": "assistant", "content": "x"}], "rejected": []}, "conversational"),
        ({"context": "[]", "generation": "x", "reward": 1.0}, "pointwise"),
        ({"prompt": "a", "completion": "x", "label": True}, "pointwise"),
    ],
)
def test_detect_format(row, fmt):
    assert detect_format(row) == fmt


def test_bad_arguments_named():
    with pytest.raises(ValueError, match="cannot detect the format"):
        load_preferences([{"text": "hello"}])
    with pytest.raises(ValueError, match="format must be one of"):
        load_preferences(EXPLICIT, format="pairs")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="marker"):
        load_preferences(EXPLICIT, marker="")
    with pytest.raises(ValueError, match="load_pointwise"):
        load_preferences([{"prompt": "a", "completion": "b", "label": 1.0}])
    with pytest.raises(ValueError, match="no rows"):
        load_preferences([])
    with pytest.raises(TypeError, match="source"):
        load_preferences(42)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="source"):
        load_preferences([{"a": 1}, "x.jsonl"])  # type: ignore[list-item]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_preferences("/nonexistent/file.jsonl")
    with pytest.raises(ValueError, match="tokenizer"):
        load_preferences([{"chosen": [{"role": "user", "content": "x"}], "rejected": []}])


# ---------------------------------------------------------------------------------------------------------
# sources
# ---------------------------------------------------------------------------------------------------------


def _write(path: Path, rows, kind: str) -> None:
    if kind == "parquet":
        datasets.Dataset.from_list(rows).to_parquet(str(path))
        return
    text = "\n".join(json.dumps(r) for r in rows) + "\n" if "jsonl" in kind else json.dumps(rows)
    if kind.endswith(".gz"):
        with gzip.open(path, "wt", encoding="utf-8") as fh:
            fh.write(text)
    else:
        path.write_text(text, encoding="utf-8")


@pytest.mark.parametrize("kind", ["jsonl", "jsonl.gz", "json", "json.gz", "parquet"])
def test_file_sources(tmp_path, kind):
    path = tmp_path / f"pairs.{kind}"
    _write(path, EXPLICIT, kind)
    assert load_preferences(path).to_list() == EXPLICIT
    assert load_preferences(str(path)).to_list() == EXPLICIT


def test_folder_glob_list_and_dataset_sources(tmp_path):
    _write(tmp_path / "a.jsonl", EXPLICIT[:1], "jsonl")
    _write(tmp_path / "b.json", EXPLICIT[1:], "json")
    assert load_preferences(tmp_path).to_list() == EXPLICIT
    assert load_preferences(str(tmp_path / "*.js*")).to_list() == EXPLICIT
    assert load_preferences([tmp_path / "b.json", tmp_path / "a.jsonl"]).to_list() == EXPLICIT[::-1]
    assert load_preferences(datasets.Dataset.from_list(EXPLICIT)).to_list() == EXPLICIT
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a"}\nnot json\n')
    with pytest.raises(ValueError, match="line 2 is not valid JSON"):
        load_preferences(tmp_path / "bad.jsonl")


# ---------------------------------------------------------------------------------------------------------
# conversational
# ---------------------------------------------------------------------------------------------------------


def _msg(role, content):
    return {"role": role, "content": content}


def test_conversational_shared_prefix():
    tok = chat_tokenizer(PREFIX_TEMPLATE)
    chosen = [_msg("user", "hi"), _msg("assistant", "hello"), _msg("user", "2+2?"), _msg("assistant", "4")]
    rejected = [*chosen[:3], _msg("assistant", "5")]
    ds = load_preferences([{"chosen": chosen, "rejected": rejected}], tokenizer=tok)
    row = ds[0]
    assert row["prompt"] == "<|user|>hi\n<|assistant|>hello\n<|user|>2+2?\n<|assistant|>"
    assert (row["chosen"], row["rejected"]) == ("4\n", "5\n")
    # prompt + completion == rendering of the whole conversation
    assert row["prompt"] + row["chosen"] == tok.apply_chat_template(chosen, tokenize=False)
    assert row["prompt"] + row["rejected"] == tok.apply_chat_template(rejected, tokenize=False)
    # explicit conversational prompt
    ds2 = load_preferences(
        [{"prompt": chosen[:3], "chosen": [chosen[3]], "rejected": [rejected[3]]}], tokenizer=tok
    )
    assert ds2[0] == row
    # ... and it collates
    out = PreferenceCollator(tok, max_length=64)(ds.to_list())
    assert out.input_ids.shape[0] == 2


def test_conversational_bad_rows():
    tok = chat_tokenizer(PREFIX_TEMPLATE)
    u, a = _msg("user", "q"), _msg("assistant", "x")
    rows = [
        {"chosen": [u, a], "rejected": [u, a]},  # 0 identical
        {"chosen": [u, a], "rejected": [_msg("user", "other"), _msg("assistant", "y")]},  # 1 prompt mismatch
        {"chosen": [u, a], "rejected": [u]},  # 2 no assistant
        {"chosen": [u, a], "rejected": [{"role": "user"}]},  # 3 bad messages
        {"chosen": [u, a], "rejected": [u, _msg("assistant", "")]},  # 4 empty completion? (renders "\n")
        {"chosen": [u, a], "rejected": [u, _msg("assistant", "y")]},  # 5 ok
    ]
    ds, rep = load_preferences(rows, tokenizer=tok, return_report=True)
    assert ds["rejected"] == ["y\n"]
    assert dict(rep.skipped) == {
        "identical": 1,
        "prompt_mismatch": 1,
        "last_not_assistant": 1,
        "bad_messages": 1,
        "empty_completion": 1,
    }
    bad_tok = chat_tokenizer(NON_PREFIX_TEMPLATE)
    ds, rep = load_preferences(rows[5:], tokenizer=bad_tok, return_report=True)
    assert len(ds) == 0 and dict(rep.skipped) == {"template_not_prefix": 1}


# ---------------------------------------------------------------------------------------------------------
# pointwise / unpaired
# ---------------------------------------------------------------------------------------------------------


def test_render_taskmaster_context_hand_case():
    turns = [
        {"role": "agent", "text": "Welcome"},
        {"role": "user", "text": "an espresso"},
        {"role": "agent", "api": {"find": {"q": "espresso"}}},
        {"role": "api", "response": {"find": {"items": [1]}}},
    ]
    assert render_taskmaster_context(turns) == (
        'Agent: Welcome\nUser: an espresso\nAgent: [API] {"find":{"q":"espresso"}}\n'
        'API: {"find":{"items":[1]}}\nAgent:'
    )


def test_pointwise_taskmaster_style_and_plain():
    ctx = json.dumps([{"role": "agent", "text": "Hi"}, {"role": "user", "text": "tea"}])
    rows = [
        {"context": ctx, "generation": json.dumps({"role": "agent", "text": "Green?"}), "reward": 1.0},
        {"context": ctx, "generation": json.dumps({"role": "agent", "api": {"x": 1}}), "reward": 0.0},
        {"prompt": "plain", "completion": " text", "label": True},
        {"prompt": "p", "completion": " c", "label": float("inf")},  # bad label
        {"prompt": "p", "completion": " ", "label": 1.0},  # empty
        {"prompt": "p", "label": 1.0},  # missing completion
    ]
    ds, rep = load_pointwise(rows, return_report=True)
    assert ds.to_list() == [
        {"prompt": "Agent: Hi\nUser: tea\nAgent:", "completion": " Green?", "label": 1.0},
        {"prompt": "Agent: Hi\nUser: tea\nAgent:", "completion": ' [API] {"x":1}', "label": 0.0},
        {"prompt": "plain", "completion": " text", "label": 1.0},
    ]
    assert dict(rep.skipped) == {"bad_label": 1, "empty_completion": 1, "missing_field": 1}
    assert rep.first_indices["bad_label"] == (3,)


def test_pairs_from_pointwise_hand_case():
    rows = [
        {"prompt": "A", "completion": " good", "label": 1.0},
        {"prompt": "A", "completion": " bad", "label": 0.0},
        {"prompt": "A", "completion": " bad", "label": 0.0},  # duplicate row
        {"prompt": "A", "completion": " ok", "label": 1.0},
        {"prompt": "B", "completion": " only", "label": 1.0},  # no partner
        {"prompt": "C", "completion": " x", "label": 1.0},
        {"prompt": "C", "completion": " x", "label": 0.0},  # conflicting labels, same text
    ]
    pw = load_pointwise(rows)
    pairs, rep = pairs_from_pointwise(pw, return_report=True)
    assert [(r["prompt"], r["chosen"], r["rejected"]) for r in pairs] == [
        ("A", " good", " bad"),
        ("A", " ok", " bad"),
    ]
    assert rep.n_rows == 5 and dict(rep.skipped) == {"duplicate_pair": 2, "identical": 1}
    assert len(pairs_from_pointwise(pw, dedupe=False)) == 5
    with pytest.raises(ValueError, match="'completion' column"):
        pairs_from_pointwise(datasets.Dataset.from_list(EXPLICIT))


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from("ABC"), st.sampled_from(["x", "y", "z"]), st.sampled_from([0.0, 0.5, 1.0])),
        max_size=12,
    )
)
def test_pairs_from_pointwise_counts_match_brute_force(items):
    """Count of pairs = Σ over prompts of #(i, j) with label_i > label_j (dedupe=False), checked by brute force."""
    rows = [{"prompt": p, "completion": " " + c, "label": y} for p, c, y in items]
    if not rows:
        return
    pw = load_pointwise(rows)
    brute = sum(1 for a in rows for b in rows if a["prompt"] == b["prompt"] and a["label"] > b["label"])
    assert len(pairs_from_pointwise(pw, dedupe=False)) == brute
    distinct = {
        (a["prompt"], a["completion"], b["completion"])
        for a in rows
        for b in rows
        if a["prompt"] == b["prompt"] and a["label"] > b["label"] and a["completion"] != b["completion"]
    }
    got = pairs_from_pointwise(pw)
    assert {(r["prompt"], r["chosen"], r["rejected"]) for r in got} == distinct and len(got) == len(distinct)


def test_unpaired():
    ds = load_unpaired(
        [
            {"prompt": "a", "completion": " x", "label": True},
            {"prompt": "b", "completion": " y", "label": 0.2},
            {"prompt": "c", "completion": " z", "reward": 0.9},
        ]
    )
    assert ds["label"] == [True, False, True]
    assert ds.features["label"].dtype == "bool"
    pairs = load_preferences(EXPLICIT)
    un = unpaired_from_pairs(pairs)
    assert un.to_list() == [
        {"prompt": "Q: 1+1?\nA:", "completion": " 2", "label": True},
        {"prompt": "Q: 1+1?\nA:", "completion": " 3", "label": False},
        {"prompt": "Q: sky?\nA:", "completion": " blue", "label": True},
        {"prompt": "Q: sky?\nA:", "completion": " green", "label": False},
    ]
    assert load_unpaired(EXPLICIT).to_list() == un.to_list()
    with pytest.raises(ValueError, match="threshold"):
        load_unpaired(EXPLICIT, threshold=float("nan"))


# ---------------------------------------------------------------------------------------------------------
# built-in pairs
# ---------------------------------------------------------------------------------------------------------


def test_builtin_pairs():
    ds = load_builtin_pairs()
    assert ds.column_names == ["prompt", "chosen", "rejected"]
    assert 30 <= len(ds) <= 60
    assert len(set(ds["prompt"])) == len(ds)
    for r in ds:
        assert r["chosen"] != r["rejected"] and r["chosen"].strip() and r["rejected"].strip()
        # short answers: at most 30 whitespace-separated words (≈ tokens for a BPE on English)
        assert len(r["chosen"].split()) <= 30 and len(r["rejected"].split()) <= 30
    # some pairs share most words and differ in a few (gradient entanglement cases)
    near = [r for r in ds if len(set(r["chosen"].split()) ^ set(r["rejected"].split())) <= 2]
    assert len(near) >= 10


# ---------------------------------------------------------------------------------------------------------
# real data
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.data
@needs_data
def test_hh_rlhf_helpful_base():
    path = DATA / "hh-rlhf" / "helpful-base.test.jsonl.gz"
    ds, rep = load_preferences(path, return_report=True)
    assert rep.format == "implicit"
    # independent count with plain Python
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        raw = [json.loads(line) for line in fh]
    identical = prefix = empty = 0
    for r in raw:
        c, j = r["chosen"], r["rejected"]
        if c == j:
            identical += 1
            continue
        pc, _, tc = c.rpartition(A)
        pr, _, tr = j.rpartition(A)
        if pc != pr:
            prefix += 1
        elif not tc.strip() or not tr.strip():
            empty += 1
    assert len(raw) == rep.n_rows == 2354
    assert (identical, prefix, empty) == (2, 9, 4)  # observed; README's "~36 identical" is over all 4 splits
    assert dict(rep.skipped) == {"identical": identical, "prompt_mismatch": prefix, "empty_completion": empty}
    assert len(ds) == rep.n_kept == 2354 - 15
    for r in ds.select(range(50)):
        assert r["prompt"].endswith(A) and r["prompt"].count(A) >= 1 and A not in r["chosen"]


@pytest.mark.data
@needs_data
def test_hh_rlhf_identical_over_all_splits():
    """The README's '~36 rows with chosen == rejected' is the total over the four test splits."""
    total = 0
    for f in sorted(glob.glob(str(DATA / "hh-rlhf" / "*.jsonl.gz"))):
        _, rep = load_preferences(f, return_report=True)
        total += rep.skipped.get("identical", 0)
    assert total == 36


@pytest.mark.data
@needs_data
def test_taskmaster_coffee_pairs():
    files = sorted(glob.glob(str(DATA / "taskmaster" / "coffee" / "reward_0*.json")))
    pw, rep = load_pointwise(files, return_report=True)
    assert rep.n_rows == len(pw) == 3228 and rep.n_skipped == 0
    assert pw[0]["prompt"].startswith("Agent: Welcome to the Coffee Bar") and pw[0]["prompt"].endswith(
        "\nAgent:"
    )
    # independent count on the raw JSON: same context string, reward 1 vs reward 0
    raw = [r for f in files for r in json.loads(Path(f).read_text(encoding="utf-8"))]
    by_ctx: dict[str, list[dict]] = collections.defaultdict(list)
    for r in raw:
        by_ctx[r["context"]].append(r)
    all_pairs = sum(
        sum(r["reward"] == 1.0 for r in g) * sum(r["reward"] == 0.0 for r in g) for g in by_ctx.values()
    )
    distinct = len(
        {
            (c, a["generation"], b["generation"])
            for c, g in by_ctx.items()
            for a in g
            for b in g
            if a["reward"] > b["reward"]
        }
    )
    assert all_pairs == 772  # the README's number: every (good, bad) combination
    assert distinct == 617  # 155 of them repeat an identical (context, good, bad) triple
    assert len(pairs_from_pointwise(pw, dedupe=False)) == all_pairs
    assert len(pairs_from_pointwise(pw)) == distinct
