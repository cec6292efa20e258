"""Issue 11's small input gaps: empty batches are refused before the model runs, naming the argument; a
completion that tokenizes to zero tokens (``add_eos=False``) is a bad row, never an empty completion mask."""

from __future__ import annotations

import pytest
import torch

from prefopt.data import PreferenceCollator, UnpairedCollator
from prefopt.logprobs import token_logps
from prefopt.shared_prefix import shared_prompt_token_logps
from prefopt.testing import char_tokenizer, tiny_causal_lm


@pytest.fixture(scope="module")
def model():
    return tiny_causal_lm("llama", vocab_size=32, hidden_size=16, num_layers=1)


def _ids(b: int, t: int) -> torch.Tensor:
    return torch.ones(b, t, dtype=torch.long)


@pytest.mark.parametrize("shape", [(0, 5), (2, 0), (0, 0)])
def test_token_logps_rejects_zero_rows_or_columns(model, shape) -> None:
    with pytest.raises(ValueError, match=r"input_ids must have at least one row and one column"):
        token_logps(model, _ids(*shape), _ids(*shape), torch.zeros(shape, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"input_ids .*got shape \(" + ", ".join(map(str, shape))):
        token_logps(model, _ids(*shape))


def test_shared_prompt_rejects_zero_rows_or_columns(model) -> None:
    p, pm = _ids(2, 3), _ids(2, 3)
    c, cm = _ids(4, 2), torch.ones(4, 2, dtype=torch.bool)
    assert shared_prompt_token_logps(model, p, pm, c, cm).shape == (4, 2)  # the valid call works
    for method in ("packed", "cache"):
        with pytest.raises(
            ValueError, match=r"completion_ids must have at least one column, got shape \(4, 0\)"
        ):
            shared_prompt_token_logps(
                model, p, pm, _ids(4, 0), torch.ones(4, 0, dtype=torch.bool), method=method
            )
        with pytest.raises(ValueError, match="completion_ids has 0 rows"):
            shared_prompt_token_logps(
                model, p, pm, _ids(0, 2), torch.ones(0, 2, dtype=torch.bool), method=method
            )
        with pytest.raises(ValueError, match=r"prompt_ids must have at least one row and one column"):
            shared_prompt_token_logps(model, _ids(2, 0), _ids(2, 0), c, cm, method=method)
        with pytest.raises(ValueError, match=r"prompt_ids must have at least one row and one column"):
            shared_prompt_token_logps(model, _ids(0, 3), _ids(0, 3), c, cm, method=method)


def _dropping_tokenizer():
    """The char tokenizer with a normalizer that deletes ``~``: the text ``"~~"`` is not whitespace, yet it
    tokenizes to zero tokens."""
    from tokenizers import normalizers

    tok = char_tokenizer()
    tok.backend_tokenizer.normalizer = normalizers.Replace("~", "")
    assert tok("~~", add_special_tokens=False)["input_ids"] == []
    return tok


def test_completion_with_zero_tokens_is_a_bad_row_not_an_empty_mask() -> None:
    tok = _dropping_tokenizer()
    rows = [
        {"prompt": "hi", "chosen": "~~", "rejected": "no"},
        {"prompt": "hi", "chosen": "yes", "rejected": "no"},
        {"prompt": "hi", "chosen": "yes", "rejected": "~"},
    ]
    collate = PreferenceCollator(tok, max_length=32, add_eos=False)
    batch = collate(rows)
    assert batch.row_index.tolist() == [1]
    assert bool((batch.completion_mask.sum(1) > 0).all())
    report = collate.stats.snapshot()
    assert report.skipped["empty_completion"] == 2 and report.first_indices["empty_completion"] == (0, 2)
    assert "zero tokens" in report.first_details["empty_completion"]
    with pytest.raises(ValueError, match=r"row 0: empty_completion .*zero tokens"):
        PreferenceCollator(tok, max_length=32, add_eos=False, strict=True)(rows)
    # with add_eos (the default) the EOS is the completion's one token: the row is kept
    assert PreferenceCollator(tok, max_length=32)(rows).row_index.tolist() == [0, 1, 2]

    unpaired = UnpairedCollator(tok, max_length=32, add_eos=False)
    out = unpaired(
        [{"prompt": "hi", "completion": "~~", "label": 1}, {"prompt": "hi", "completion": "ok", "label": 0}]
    )
    assert out.row_index.tolist() == [1] and bool((out.completion_mask.sum(1) > 0).all())
    assert unpaired.stats.snapshot().first_indices["empty_completion"] == (0,)
