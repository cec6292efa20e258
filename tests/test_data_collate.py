"""Tests for prefopt.data.collate: PreferenceCollator, UnpairedCollator, PromptCollator.

The tokenizer is a character-level WordLevel vocabulary built offline, so the expected token ids of any text
can be computed independently of the tokenizer: ``ids(text) = [VOCAB[ch] for ch in text]``.
"""

from __future__ import annotations

import logging

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prefopt.data import PreferenceCollator, PromptCollator, UnpairedCollator

PAD, BOS, EOS, UNK = 0, 1, 2, 3
CHARS = [chr(i) for i in range(32, 127)] + ["\n"]
VOCAB = {"<pad>": PAD, "<s>": BOS, "</s>": EOS, "<unk>": UNK, **{c: i + 4 for i, c in enumerate(CHARS)}}


def char_tokenizer(*, bos: bool = True, pad: bool = True):
    """A character-level fast tokenizer; with ``bos`` it prepends ``<s>`` when add_special_tokens=True."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(dict(VOCAB), unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS)])
    kwargs = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    if pad:
        kwargs["pad_token"] = "<pad>"
    return PreTrainedTokenizerFast(tokenizer_object=tok, **kwargs)


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


@pytest.fixture(scope="module")
def tok_nobos():
    return char_tokenizer(bos=False)


def ids(text: str) -> list[int]:
    """Independent oracle of the tokenizer: one id per character."""
    return [VOCAB.get(ch, UNK) for ch in text]


def oracle_pair(
    prompt,
    completions,
    *,
    max_length,
    max_prompt_length=None,
    keep="keep_end",
    bos=True,
    eos=True,
    max_completion_length=None,
):
    """Slow, obvious per-row construction of (prompt ids, [completion ids]) following docs/data.md.

    Returns ``(p, cs, cuts)`` with ``cuts`` the set of truncation reasons that applied, or ``None`` when the
    row must be dropped (nothing of a completion left).
    """
    p = ([BOS] if bos else []) + ids(prompt)
    cs = [ids(c) + ([EOS] if eos else []) for c in completions]
    cuts = set()

    def drop_one_prompt_token(p):  # keep_end drops from the front (after a leading BOS), keep_start the back
        if keep == "keep_start":
            return p[:-1]
        return [BOS, *p[2:]] if bos else p[1:]

    while max_completion_length is not None and any(len(c) > max_completion_length for c in cs):
        cs = [c[:-1] if len(c) > max_completion_length else c for c in cs]
        cuts.add("completion_max_completion_length")
    if max_prompt_length is not None:
        while len(p) > max_prompt_length:
            p = drop_one_prompt_token(p)
            cuts.add("prompt_max_prompt_length")
    else:
        floor = min(len(p), max(1, max_length // 2))  # the prompt keeps at least half of max_length
        while len(p) > floor and len(p) + max(len(c) for c in cs) > max_length:
            p = drop_one_prompt_token(p)
            cuts.add("prompt_to_fit")
    while any(c and len(p) + len(c) > max_length for c in cs):  # then the completions give way
        cs = [c[:-1] if len(p) + len(c) > max_length else c for c in cs]
        cuts.add("completion_to_fit")
    if not all(cs):
        return None
    return p, cs, cuts


def oracle_row(prompt, completion, **kw):
    out = oracle_pair(prompt, [completion], **kw)
    assert out is not None, "oracle: nothing of the completion is left; the row should have been skipped"
    return out[0], out[1][0]


def oracle_batch(rows, **kw):
    pairs = [oracle_pair(r["prompt"], [r["chosen"], r["rejected"]], **kw) for r in rows]
    assert all(x is not None for x in pairs), "oracle: a row should have been skipped"
    seqs = [(p, cs[0]) for p, cs, _ in pairs] + [(p, cs[1]) for p, cs, _ in pairs]
    t = max(len(p) + len(c) for p, c in seqs)
    input_ids, attn, cmask = [], [], []
    for p, c in seqs:
        n = len(p) + len(c)
        input_ids.append(p + c + [PAD] * (t - n))
        attn.append([1] * n + [0] * (t - n))
        cmask.append([False] * len(p) + [True] * len(c) + [False] * (t - n))
    return (
        torch.tensor(input_ids),
        torch.tensor(attn),
        torch.tensor(cmask),
        torch.tensor([len(p) for p, _ in seqs]),
        torch.tensor([len(c) for _, c in seqs]),
    )


ROWS = [
    {"prompt": "Q: capital of France?\nA:", "chosen": " Paris.", "rejected": " Lyon, I think."},
    {"prompt": "Hi", "chosen": " hello there", "rejected": " go away"},
    {"prompt": "2+2=", "chosen": " 4", "rejected": " 5"},
]


# ---------------------------------------------------------------------------------------------------------
# PreferenceCollator: exact layout
# ---------------------------------------------------------------------------------------------------------


def test_hand_built_batch(tok):
    """A tiny case written out by hand: prompt 'ab', chosen 'c', rejected 'de'."""
    out = PreferenceCollator(tok, max_length=16)([{"prompt": "ab", "chosen": "c", "rejected": "de"}])
    a, b, c, d, e = (VOCAB[x] for x in "abcde")
    assert out.input_ids.tolist() == [[BOS, a, b, c, EOS, PAD], [BOS, a, b, d, e, EOS]]
    assert out.attention_mask.tolist() == [[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]]
    assert out.completion_mask.tolist() == [
        [False, False, False, True, True, False],
        [False, False, False, True, True, True],
    ]
    assert out.completion_mask.dtype == torch.bool
    assert out.input_ids.dtype == torch.long
    assert out.prompt_len.tolist() == [3, 3]
    assert out.completion_len.tolist() == [2, 3]
    assert out.row_index.tolist() == [0]


def test_matches_per_row_oracle(tok):
    out = PreferenceCollator(tok, max_length=64)(ROWS)
    exp = oracle_batch(ROWS, max_length=64)
    for key, e in zip(
        ("input_ids", "attention_mask", "completion_mask", "prompt_len", "completion_len"), exp
    ):
        assert torch.equal(getattr(out, key), e), key
    assert out.input_ids.shape[0] == 2 * len(ROWS)


def test_chosen_rows_first_then_rejected(tok):
    out = PreferenceCollator(tok, max_length=64)(ROWS)
    b = len(ROWS)
    for i, row in enumerate(ROWS):
        got_c = out.input_ids[i][out.completion_mask[i]].tolist()
        got_r = out.input_ids[b + i][out.completion_mask[b + i]].tolist()
        assert got_c == [*ids(row["chosen"]), EOS]
        assert got_r == [*ids(row["rejected"]), EOS]
        # both rows of a pair carry the same prompt
        lp = int(out.prompt_len[i])
        assert (
            out.input_ids[i, :lp].tolist() == out.input_ids[b + i, :lp].tolist() == [BOS, *ids(row["prompt"])]
        )


def test_masking_equals_slicing(tok):
    """The tokens selected by completion_mask are exactly input_ids[prompt_len : prompt_len + completion_len]."""
    out = PreferenceCollator(tok, max_length=20, max_prompt_length=8)(ROWS)
    for i in range(out.input_ids.shape[0]):
        lp, lc = int(out.prompt_len[i]), int(out.completion_len[i])
        assert out.input_ids[i][out.completion_mask[i]].tolist() == out.input_ids[i, lp : lp + lc].tolist()
        assert int(out.completion_mask[i].sum()) == lc
        assert int(out.attention_mask[i].sum()) == lp + lc
        assert not out.completion_mask[i, 0]


def test_pad_falls_back_to_eos():
    tok = char_tokenizer(pad=False)
    assert tok.pad_token_id is None
    out = PreferenceCollator(tok, max_length=32)([{"prompt": "ab", "chosen": "c", "rejected": "dddd"}])
    assert out.input_ids[0, -1].item() == EOS  # padding uses eos
    assert out.attention_mask[0].tolist() == [1, 1, 1, 1, 1, 0, 0, 0]


def test_add_eos_false_and_existing_eos_not_doubled(tok):
    out = PreferenceCollator(tok, max_length=32, add_eos=False)(
        [{"prompt": "ab", "chosen": "c", "rejected": "d"}]
    )
    assert out.input_ids[0].tolist() == [BOS, VOCAB["a"], VOCAB["b"], VOCAB["c"]]
    out = PreferenceCollator(tok, max_length=32)([{"prompt": "ab", "chosen": "c</s>", "rejected": "d"}])
    # "</s>" is not a single token for this char tokenizer's pre-tokenizer, so EOS is appended once
    assert out.input_ids[0].tolist()[-1] == EOS
    assert out.input_ids[0].tolist().count(EOS) == 1


def test_doubled_bos_collapsed(tok):
    """A prompt that already starts with BOS (e.g. rendered by a chat template) does not get a second one."""

    class BosTwice:
        pad_token_id, eos_token_id, bos_token_id = PAD, EOS, BOS

        def __call__(self, texts, add_special_tokens=True):
            pre = [BOS, BOS] if add_special_tokens else []
            return {"input_ids": [pre + ids(t) for t in texts]}

    out = PreferenceCollator(BosTwice(), max_length=32)([{"prompt": "ab", "chosen": "c", "rejected": "d"}])
    assert out.input_ids[0].tolist()[:3] == [BOS, VOCAB["a"], VOCAB["b"]]


def test_pad_to_multiple_of(tok):
    out = PreferenceCollator(tok, max_length=64, pad_to_multiple_of=8)(ROWS)
    t_plain = PreferenceCollator(tok, max_length=64)(ROWS).input_ids.shape[1]
    assert out.input_ids.shape[1] % 8 == 0
    assert t_plain <= out.input_ids.shape[1] < t_plain + 8


# ---------------------------------------------------------------------------------------------------------
# truncation
# ---------------------------------------------------------------------------------------------------------


def test_truncation_hand_numbers(tok):
    row = {"prompt": "abcdef", "chosen": "xyz", "rejected": "uvw"}
    # prompt = BOS + 6 = 7 tokens, completion = 3 + EOS = 4 tokens; max_length 9: the PROMPT gives way first
    # (default max_prompt_length=None), keeping BOS + its last 4 tokens, and the completions stay whole.
    # (Before issue 16 the completions were cut to 2 tokens here instead.)
    col = PreferenceCollator(tok, max_length=9)
    out = col([row])
    assert out.input_ids[0].tolist() == [BOS, *ids("cdef"), *ids("xyz"), EOS]
    assert out.input_ids[1].tolist() == [BOS, *ids("cdef"), *ids("uvw"), EOS]
    assert out.completion_len.tolist() == [4, 4] and out.prompt_len.tolist() == [5, 5]
    assert dict(col.report().truncated) == {"prompt_to_fit": 1}
    # keep_start keeps the first 5 prompt tokens instead
    out = PreferenceCollator(tok, max_length=9, prompt_truncation="keep_start")([row])
    assert out.input_ids[0].tolist() == [BOS, *ids("abcd"), *ids("xyz"), EOS]
    # a completion longer than max_length: the prompt keeps max_length // 2 = 4 tokens (BOS + "def"),
    # the completions their first 5 tokens
    long = {"prompt": "abcdef", "chosen": "0123456789", "rejected": "9876543210"}
    col = PreferenceCollator(tok, max_length=9)
    out = col([long])
    assert out.input_ids.tolist() == [[BOS, *ids("def"), *ids("01234")], [BOS, *ids("def"), *ids("98765")]]
    assert dict(col.report().truncated) == {"prompt_to_fit": 1, "completion_to_fit": 1}
    # a short prompt is never cut below itself: BOS + "ab" stays, the completions get 6 tokens
    out = PreferenceCollator(tok, max_length=9)([{**long, "prompt": "ab"}])
    assert out.input_ids[0].tolist() == [BOS, *ids("ab"), *ids("012345")]
    # max_prompt_length 4, keep_end: BOS + last 3 prompt tokens, then the whole completion fits
    out = PreferenceCollator(tok, max_length=9, max_prompt_length=4)([row])
    assert out.input_ids[0].tolist() == [BOS, *ids("def"), *ids("xyz"), EOS]
    # keep_start: the first 4 prompt tokens (BOS a b c)
    out = PreferenceCollator(tok, max_length=9, max_prompt_length=4, prompt_truncation="keep_start")([row])
    assert out.input_ids[0].tolist() == [BOS, *ids("abc"), *ids("xyz"), EOS]
    # max_completion_length cuts the completion (keep start): EOS is lost
    out = PreferenceCollator(tok, max_length=32, max_completion_length=2)([row])
    assert out.input_ids[1].tolist() == [BOS, *ids("abcdef"), *ids("uv")]


def test_keep_end_without_bos(tok_nobos):
    row = {"prompt": "abcdef", "chosen": "x", "rejected": "y"}
    out = PreferenceCollator(tok_nobos, max_length=9, max_prompt_length=3)([row])
    assert out.input_ids[0].tolist() == [*ids("def"), VOCAB["x"], EOS]


@pytest.mark.parametrize("max_completion_length", [None, 3])
@pytest.mark.parametrize("keep", ["keep_end", "keep_start"])
@pytest.mark.parametrize("max_prompt_length", [None, 3, 6])
@pytest.mark.parametrize("max_length", [8, 12, 40])
def test_truncation_matches_oracle(tok, keep, max_prompt_length, max_length, max_completion_length):
    rows = [
        {"prompt": "the quick brown fox", "chosen": " jumps over", "rejected": " sleeps all day long"},
        {"prompt": "ab", "chosen": " c", "rejected": " dd"},
    ]
    col = PreferenceCollator(
        tok,
        max_length=max_length,
        max_prompt_length=max_prompt_length,
        prompt_truncation=keep,
        max_completion_length=max_completion_length,
    )
    out = col(rows)
    assert out.row_index.tolist() == [0, 1]  # no pair is dropped, whatever the prompt length
    kw = {
        "max_length": max_length,
        "max_prompt_length": max_prompt_length,
        "keep": keep,
        "max_completion_length": max_completion_length,
    }
    exp = oracle_batch(rows, **kw)
    for key, e in zip(
        ("input_ids", "attention_mask", "completion_mask", "prompt_len", "completion_len"), exp
    ):
        assert torch.equal(getattr(out, key), e), key
    assert int(out.attention_mask.sum(1).max()) <= max_length
    # keep_end: the kept prompt is BOS followed by the LAST prompt tokens
    lp = int(out.prompt_len[0])
    full = ids(rows[0]["prompt"])
    if keep == "keep_end" and lp > 1:
        assert out.input_ids[0, :lp].tolist() == [BOS, *full[len(full) - (lp - 1) :]]
    expected_cuts: dict[str, int] = {}
    for r in rows:
        for reason in oracle_pair(r["prompt"], [r["chosen"], r["rejected"]], **kw)[2]:
            expected_cuts[reason] = expected_cuts.get(reason, 0) + 1
    assert dict(col.report().truncated) == expected_cuts


# ---------------------------------------------------------------------------------------------------------
# bad rows
# ---------------------------------------------------------------------------------------------------------


def test_bad_rows_reasons(tok, tok_nobos, caplog):
    rows = [
        {"prompt": "ok", "chosen": " a", "rejected": " b"},  # 0 good
        {"prompt": "p", "chosen": " same", "rejected": " same"},  # 1 identical
        {"prompt": "p", "chosen": "   ", "rejected": " b"},  # 2 empty completion
        {"prompt": "p", "chosen": " a"},  # 3 missing field
        {
            "prompt": "a very long prompt indeed",
            "chosen": " a",
            "rejected": " b",
        },  # 4 prompt longer than max_length: kept, prompt cut (was dropped before issue 16)
        {
            "prompt": "p",
            "chosen": " abcdefghijklmnop1",
            "rejected": " abcdefghijklmnop2",
        },  # 5 same after trunc
        {"prompt": "q", "chosen": " yes", "rejected": " no"},  # 6 good
    ]
    col = PreferenceCollator(tok, max_length=12)
    with caplog.at_level(logging.WARNING, logger="prefopt.data"):
        out = col(rows)
    assert out.row_index.tolist() == [0, 4, 6]
    assert out.input_ids.shape[0] == 6
    assert out.input_ids[1, :10].tolist() == [BOS, *ids("t indeed"), VOCAB[" "]]  # BOS + last 8 + " a"
    rep = col.report()
    assert dict(rep.skipped) == {
        "identical": 1,
        "empty_completion": 1,
        "missing_field": 1,
        "identical_after_truncation": 1,
    }
    assert dict(rep.truncated) == {"prompt_to_fit": 1}
    assert rep.first_indices["identical"] == (1,)
    assert rep.first_indices["missing_field"] == (3,)
    assert rep.n_rows == 7 and rep.n_kept == 3
    assert "skipped 4 of 7 rows" in caplog.text
    assert "(truncated: prompt_to_fit: 1)" in rep.summary()
    # indices are global across calls
    col(
        [{"prompt": "p", "chosen": " x", "rejected": " x"}, {"prompt": "p", "chosen": " x", "rejected": " y"}]
    )
    assert col.report().first_indices["identical"] == (1, 7)
    assert col.stats.rows_seen == 9 and col.stats.rows_kept == 4
    # empty prompt: zero tokens without BOS is bad; with BOS it is fine
    out = PreferenceCollator(tok, max_length=12)([{"prompt": "", "chosen": " a", "rejected": " b"}])
    assert out.prompt_len.tolist() == [1, 1]
    col2 = PreferenceCollator(tok_nobos, max_length=12)
    col2(
        [{"prompt": "", "chosen": " a", "rejected": " b"}, {"prompt": "x", "chosen": " a", "rejected": " b"}]
    )
    assert dict(col2.report().skipped) == {"empty_prompt": 1}


@pytest.mark.parametrize(
    ("row", "reason"),
    [
        ({"prompt": "p", "chosen": " x", "rejected": " x"}, "identical"),
        ({"prompt": "p", "chosen": "", "rejected": " x"}, "empty_completion"),
        ({"prompt": "p", "chosen": " x", "rejected": None}, "missing_field"),
        ({"prompt": 3, "chosen": " x", "rejected": " y"}, "missing_field"),
    ],
)
def test_strict_raises_with_index_and_reason(tok, row, reason):
    col = PreferenceCollator(tok, max_length=8, strict=True)
    good = {"prompt": "p", "chosen": " a", "rejected": " b"}
    with pytest.raises(ValueError, match=rf"row 1: {reason}"):
        col([good, row])


def test_drop_only_when_nothing_fits(tok):
    """max_length=1 leaves no room for any completion token after the (>= 1 token) prompt: the one case
    where the default truncation still drops a pair; a long prompt alone no longer does."""
    row = {"prompt": "long prompt here", "chosen": "x", "rejected": "y"}
    with pytest.raises(ValueError, match="row 0: empty_completion_after_truncation"):
        PreferenceCollator(tok, max_length=1, strict=True)([row])
    col = PreferenceCollator(tok, max_length=1)
    with pytest.raises(ValueError, match="every row of the batch"):
        col([row])
    assert dict(col.report().skipped) == {"empty_completion_after_truncation": 1}
    assert dict(col.report().truncated) == {}  # a dropped row is counted as skipped, not as truncated
    col = PreferenceCollator(tok, max_length=2, strict=True)
    out = col([row])  # the prompt keeps BOS only (max(1, 2 // 2) = 1 token), each completion one token
    assert out.input_ids.tolist() == [[BOS, VOCAB["x"]], [BOS, VOCAB["y"]]]
    assert dict(col.report().truncated) == {"prompt_to_fit": 1, "completion_to_fit": 1}


def test_all_bad_raises(tok):
    col = PreferenceCollator(tok, max_length=8)
    with pytest.raises(ValueError, match="every row of the batch"):
        col([{"prompt": "p", "chosen": " x", "rejected": " x"}])
    with pytest.raises(ValueError, match="non-empty list"):
        col([])
    with pytest.raises(ValueError, match="non-empty list"):
        col({"prompt": "p", "chosen": " x", "rejected": " y"})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"max_length": 0}, "max_length"),
        ({"max_length": 2.5}, "max_length"),
        ({"max_length": 8, "max_prompt_length": 8}, "max_prompt_length"),
        ({"max_length": 8, "max_prompt_length": -1}, "max_prompt_length"),
        ({"max_completion_length": 0}, "max_completion_length"),
        ({"prompt_truncation": "middle"}, "prompt_truncation"),
        ({"pad_to_multiple_of": 0}, "pad_to_multiple_of"),
    ],
)
def test_bad_hyperparameters_named(tok, kwargs, name):
    with pytest.raises(ValueError, match=name):
        PreferenceCollator(tok, **kwargs)


def test_tokenizer_without_pad_or_eos():
    class NoSpecial:
        pad_token_id = eos_token_id = bos_token_id = None

        def __call__(self, texts, add_special_tokens=True):
            return {"input_ids": [ids(t) for t in texts]}

    with pytest.raises(ValueError, match="pad token"):
        PreferenceCollator(NoSpecial())
    with pytest.raises(TypeError, match="tokenizer"):
        PreferenceCollator(None)


# ---------------------------------------------------------------------------------------------------------
# property tests
# ---------------------------------------------------------------------------------------------------------

_text = st.text(alphabet=st.sampled_from([*"abcxyz .\n", "é"]), max_size=25)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    rows=st.lists(
        st.fixed_dictionaries({"prompt": _text, "chosen": _text, "rejected": _text}), min_size=1, max_size=5
    ),
    max_length=st.integers(1, 30),
    max_prompt_length=st.one_of(st.none(), st.integers(1, 10)),
    keep=st.sampled_from(["keep_end", "keep_start"]),
)
def test_property_never_empty_mask_and_consistent(tok, rows, max_length, max_prompt_length, keep):
    if max_prompt_length is not None and max_prompt_length >= max_length:
        max_prompt_length = None
    col = PreferenceCollator(
        tok, max_length=max_length, max_prompt_length=max_prompt_length, prompt_truncation=keep
    )
    try:
        out = col(rows)
    except ValueError as err:
        assert "every row of the batch" in str(err)
        assert col.stats.rows_kept == 0
        return
    n = out.row_index.numel()
    assert n == col.stats.rows_kept and n + sum(col.stats.skipped.values()) == len(rows)
    if max_length > 1:  # a pair is dropped for length only when nothing else works
        assert "empty_completion_after_truncation" not in col.stats.skipped
    kept = [rows[i] for i in out.row_index.tolist()]
    kw = {"max_length": max_length, "max_prompt_length": max_prompt_length, "keep": keep}
    expected_cuts: dict[str, int] = {}
    for r in kept:
        for reason in oracle_pair(r["prompt"], [r["chosen"], r["rejected"]], **kw)[2]:
            expected_cuts[reason] = expected_cuts.get(reason, 0) + 1
    assert dict(col.report().truncated) == expected_cuts
    assert out.input_ids.shape == out.attention_mask.shape == out.completion_mask.shape
    assert out.input_ids.shape[0] == 2 * n
    assert (out.completion_mask.sum(1) >= 1).all()
    assert not out.completion_mask[:, 0].any()
    assert (out.attention_mask.sum(1) <= max_length).all()
    # the mask lies inside the attended region and right after the prompt
    assert not (out.completion_mask & (out.attention_mask == 0)).any()
    exp = oracle_batch(kept, **kw)
    assert torch.equal(out.input_ids, exp[0])
    assert torch.equal(out.completion_mask, exp[2])
    # chosen and rejected of a pair never collide
    for i in range(n):
        a = out.input_ids[i][out.completion_mask[i]].tolist()
        b = out.input_ids[n + i][out.completion_mask[n + i]].tolist()
        assert a != b


# ---------------------------------------------------------------------------------------------------------
# UnpairedCollator
# ---------------------------------------------------------------------------------------------------------


def test_unpaired_collator(tok, caplog):
    rows = [
        {"prompt": "ab", "completion": " yes", "label": True},
        {"prompt": "cd", "completion": " no", "label": 0.0},
        {"prompt": "ef", "completion": " maybe", "label": float("nan")},
        {"prompt": "gh", "completion": "", "label": 1},
        {"prompt": "ij", "completion": " ok", "label": 0.75},
    ]
    col = UnpairedCollator(tok, max_length=32)
    with caplog.at_level(logging.WARNING, logger="prefopt.data"):
        out = col(rows)
    assert out.row_index.tolist() == [0, 1, 4]
    assert out.label.tolist() == [1.0, 0.0, 0.75]
    assert out.label.dtype == torch.float32
    assert out.desirable.tolist() == [True, False, True]
    assert dict(col.report().skipped) == {"bad_label": 1, "empty_completion": 1}
    for k, i in enumerate(out.row_index.tolist()):
        assert out.input_ids[k][out.completion_mask[k]].tolist() == [*ids(rows[i]["completion"]), EOS]
        lp = int(out.prompt_len[k])
        assert out.input_ids[k, :lp].tolist() == [BOS, *ids(rows[i]["prompt"])]
    assert "UnpairedCollator skipped 2 of 5" in caplog.text
    with pytest.raises(ValueError, match="row 0: bad_label"):
        UnpairedCollator(tok, strict=True)([{"prompt": "a", "completion": " b", "label": "good"}])
    with pytest.raises(ValueError, match="threshold"):
        UnpairedCollator(tok, threshold=float("nan"))


@pytest.mark.parametrize("max_length", [1, 2, 5, 9, 14, 40])
@pytest.mark.parametrize("max_completion_length", [None, 3])
@pytest.mark.parametrize("keep", ["keep_end", "keep_start"])
def test_unpaired_long_prompt_matches_oracle(tok, max_length, max_completion_length, keep):
    rows = [
        {"prompt": "a rather long prompt", "completion": " short", "label": 1},
        {"prompt": "p", "completion": " a completion longer than most", "label": 0},
    ]
    col = UnpairedCollator(
        tok, max_length=max_length, max_completion_length=max_completion_length, prompt_truncation=keep
    )
    kw = {"max_length": max_length, "max_completion_length": max_completion_length, "keep": keep}
    if max_length == 1:
        with pytest.raises(ValueError, match="every row"):
            col(rows)
        assert dict(col.report().skipped) == {"empty_completion_after_truncation": 2}
        return
    out = col(rows)
    assert out.row_index.tolist() == [0, 1]
    expected_cuts: dict[str, int] = {}
    for k, r in enumerate(rows):
        p, (c,), cuts = oracle_pair(r["prompt"], [r["completion"]], **kw)
        lp = int(out.prompt_len[k])
        assert out.input_ids[k, :lp].tolist() == p
        assert out.input_ids[k][out.completion_mask[k]].tolist() == c
        for reason in cuts:
            expected_cuts[reason] = expected_cuts.get(reason, 0) + 1
    assert dict(col.report().truncated) == expected_cuts
    assert (out.attention_mask.sum(1) <= max_length).all()


# ---------------------------------------------------------------------------------------------------------
# PromptCollator
# ---------------------------------------------------------------------------------------------------------


def test_prompt_collator_left_padding(tok):
    prompts = ["abc", {"prompt": "x"}, "hello world"]
    out = PromptCollator(tok)(prompts)
    texts = ["abc", "x", "hello world"]
    t = max(len(s) for s in texts) + 1
    for k, s in enumerate(texts):
        row = [BOS, *ids(s)]
        assert out.input_ids[k].tolist() == [PAD] * (t - len(row)) + row
        assert out.attention_mask[k].tolist() == [0] * (t - len(row)) + [1] * len(row)
    assert list(out.prompt) == texts
    assert out.prompt_len.tolist() == [len(s) + 1 for s in texts]
    # every row ends with its own last prompt token
    assert out.input_ids[:, -1].tolist() == [VOCAB["c"], VOCAB["x"], VOCAB["d"]]


def test_prompt_collator_truncation_and_bad_rows(tok, tok_nobos):
    col = PromptCollator(tok, max_prompt_length=3)
    out = col(["abcdef", "ab"])
    assert dict(col.report().truncated) == {"prompt_max_prompt_length": 1}
    assert out.input_ids[0].tolist() == [BOS, *ids("ef")]
    out = PromptCollator(tok, max_prompt_length=3, prompt_truncation="keep_start")(["abcdef"])
    assert out.input_ids[0].tolist() == [BOS, *ids("ab")]
    col = PromptCollator(tok_nobos)
    out = col(["", "ab", {"text": "no prompt key"}])
    assert list(out.prompt) == ["ab"]
    assert dict(col.report().skipped) == {"empty_prompt": 1, "missing_field": 1}
    with pytest.raises(ValueError, match="row 0: empty_prompt"):
        PromptCollator(tok_nobos, strict=True)([""])
    with pytest.raises(ValueError, match="every row"):
        PromptCollator(tok_nobos)([""])


# ------------------------------------------------------------------------------------------------------------
# typed batches
# ------------------------------------------------------------------------------------------------------------


def test_collators_return_typed_batches(tok):
    from prefopt.data import SharedPromptCollator, split_shared_prompt
    from prefopt.types import PairBatch, PromptBatch, SharedPromptBatch, UnpairedBatch

    pairs = PreferenceCollator(tok, max_length=64)(ROWS)
    assert isinstance(pairs, PairBatch) and pairs.num_pairs == len(ROWS)
    point = UnpairedCollator(tok, max_length=32)([{"prompt": "a", "completion": " b", "label": 1}])
    assert isinstance(point, UnpairedBatch)
    assert isinstance(PromptCollator(tok)(["ab", "c"]), PromptBatch)
    shared = SharedPromptCollator(tok, max_length=64)(ROWS)
    assert isinstance(shared, SharedPromptBatch) and shared.duplicated is None
    assert shared.num_prompts == len(ROWS) and shared.completions_per_prompt == 2
    # the shared collator is exactly split_shared_prompt of the duplicated collator
    again = split_shared_prompt(pairs)
    for name in (
        "prompt_ids",
        "prompt_mask",
        "completion_ids",
        "completion_mask",
        "completion_len",
        "row_index",
    ):
        assert torch.equal(getattr(shared, name), getattr(again, name)), name
    with pytest.raises(ValueError, match="even"):
        PairBatch(
            **{k: v[:3] if v.shape[0] == pairs.input_ids.shape[0] else v for k, v in vars(pairs).items()}
        )
    with pytest.raises(TypeError, match="completion_mask must be a bool"):
        PairBatch(**(vars(pairs) | {"completion_mask": pairs.completion_mask.long()}))


def test_pair_batch_select_matches_a_row_loop(tok):
    batch = PreferenceCollator(tok, max_length=64)(ROWS)
    b = batch.num_pairs
    keep = [2, 0]
    sub = batch.select(keep)
    assert sub.num_pairs == 2 and sub.row_index.tolist() == [batch.row_index[i].item() for i in keep]
    rows = keep + [b + i for i in keep]
    for name in ("input_ids", "attention_mask", "completion_mask", "prompt_len", "completion_len"):
        assert getattr(sub, name).tolist() == [getattr(batch, name)[r].tolist() for r in rows], name
    assert torch.equal(batch.select(slice(0, b)).input_ids, batch.input_ids)


def test_shared_prompt_collator_keeps_long_prompt_pairs(tok):
    """The shared-prompt collator truncates exactly as PreferenceCollator: a long prompt keeps its end."""
    from prefopt.data import SharedPromptCollator

    rows = [
        {"prompt": "x" * 40 + " the question?", "chosen": " yes", "rejected": " no"},
        {"prompt": "short", "chosen": " a", "rejected": " b"},
    ]
    col = SharedPromptCollator(tok, max_length=16)
    out = col(rows)
    assert out.row_index.tolist() == [0, 1]
    p, (c, r), cuts = oracle_pair(rows[0]["prompt"], [rows[0]["chosen"], rows[0]["rejected"]], max_length=16)
    assert p == [BOS, *ids("the question?")[-(16 - 5 - 1) :]]  # room for " yes" + EOS (5 tokens)
    assert out.prompt_ids[0, : int(out.prompt_len[0])].tolist() == p
    assert out.completion_ids[0][out.completion_mask[0]].tolist() == c
    assert out.completion_ids[2][out.completion_mask[2]].tolist() == r
    assert cuts == {"prompt_to_fit"}
    assert dict(col.report().truncated) == {"prompt_to_fit": 1} and not col.report().skipped
