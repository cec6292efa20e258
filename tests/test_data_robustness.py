"""Bad input to the data loaders: every bad row is skipped with its index and reason, every unreadable file
is named in the error. The class of bug: a JSONL row that is not an object crashed with ``AttributeError``
and no row index; undecodable bytes and corrupt ``.gz`` files raised errors without the file name; a chat
template that raised on one row aborted the whole load even with ``strict=False``."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from prefopt.data import load_pointwise, load_preferences, load_unpaired, read_rows

GOOD = {"prompt": "Q: 1+1?\nA:", "chosen": " 2", "rejected": " 3"}
GOOD_POINT = {"prompt": "Q", "completion": " a", "label": 1.0}
NOT_OBJECTS = [None, [1, 2], "text", 3, True]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("bad", NOT_OBJECTS)
def test_jsonl_row_that_is_not_an_object_is_skipped_with_its_index(tmp_path, bad):
    f = write_jsonl(tmp_path / "d.jsonl", [bad, GOOD, bad, GOOD])
    ds, report = load_preferences(f, return_report=True)
    assert len(ds) == 2 and ds[0] == GOOD
    assert report.skipped == {"not_an_object": 2}
    assert report.first_indices["not_an_object"] == (0, 2)
    assert type(bad).__name__ in report.first_details["not_an_object"]
    with pytest.raises(ValueError, match=r"row 0: not_an_object"):
        load_preferences(f, strict=True)
    # the same for pointwise and unpaired data, and for in-memory lists
    p = write_jsonl(tmp_path / "p.jsonl", [GOOD_POINT, bad])
    _, rep = load_pointwise(p, return_report=True)
    assert rep.skipped == {"not_an_object": 1} and rep.first_indices["not_an_object"] == (1,)
    _, rep = load_unpaired(p, return_report=True)
    assert rep.skipped == {"not_an_object": 1}
    if isinstance(bad, str):  # in memory a string is a file path: a mix of rows and paths is refused
        with pytest.raises(TypeError, match="not a mix"):
            load_preferences([GOOD, bad])
        return
    _, rep = load_unpaired([bad, GOOD], return_report=True)
    assert rep.skipped == {"not_an_object": 1} and rep.first_indices["not_an_object"] == (0,)
    ds, rep = load_preferences([GOOD, bad], return_report=True)
    assert len(ds) == 1 and rep.first_indices["not_an_object"] == (1,)


def test_only_non_objects_is_a_clear_error(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", [None, None])
    with pytest.raises(ValueError, match="2 rows, none of them a JSON object"):
        load_preferences(f)
    assert read_rows(f) == [None, None]


def test_non_utf8_file_names_the_file(tmp_path):
    f = tmp_path / "latin1.jsonl"
    f.write_bytes(json.dumps(GOOD).encode() + b"\n" + b'{"prompt": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"latin1\.jsonl: not valid UTF-8"):
        load_preferences(f)


@pytest.mark.parametrize("damage", ["truncated", "not_gzip", "bad_utf8"])
def test_corrupt_gzip_names_the_file(tmp_path, damage):
    f = tmp_path / "d.jsonl.gz"
    payload = "".join(json.dumps(GOOD) + "\n" for _ in range(200)).encode()
    if damage == "truncated":
        data = gzip.compress(payload)
        f.write_bytes(data[: len(data) // 2])
        match = r"d\.jsonl\.gz: corrupt or truncated gzip"
    elif damage == "not_gzip":
        f.write_bytes(payload)
        match = r"d\.jsonl\.gz: corrupt or truncated gzip"
    else:
        f.write_bytes(gzip.compress(b"\xff\xfe\xfa" + payload))
        match = r"d\.jsonl\.gz: not valid UTF-8"
    with pytest.raises(ValueError, match=match):
        load_preferences(f)


def test_corrupt_json_and_parquet_name_the_file(tmp_path):
    j = tmp_path / "d.json"
    j.write_text('[{"prompt": "a", ')
    with pytest.raises(ValueError, match=r"d\.json: not valid JSON"):
        load_preferences(j)
    q = tmp_path / "d.parquet"
    q.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(ValueError, match=r"d\.parquet: cannot read as parquet"):
        load_preferences(q)


class PickyTemplate:
    """A chat 'tokenizer' whose template raises on one message content, as real templates do
    (e.g. "Conversation roles must alternate user/assistant/user/assistant/...")."""

    def __init__(self, always: bool = False) -> None:
        self.always = always

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):
        if self.always or any(m["content"] == "BOOM" for m in messages):
            raise ValueError("roles must alternate")
        text = "".join(f"<{m['role']}>{m['content']}\n" for m in messages)
        return text + ("<assistant>" if add_generation_prompt else "")


def _conv(user: str, good: str, bad: str) -> dict:
    u = {"role": "user", "content": user}
    return {
        "chosen": [u, {"role": "assistant", "content": good}],
        "rejected": [u, {"role": "assistant", "content": bad}],
    }


def test_chat_template_raising_on_one_row_skips_that_row():
    rows = [_conv("hi", "a", "b"), _conv("BOOM", "a", "b"), _conv("yo", "c", "d")]
    ds, report = load_preferences(rows, tokenizer=PickyTemplate(), return_report=True)
    assert len(ds) == 2 and ds[1]["prompt"] == "<user>yo\n<assistant>"
    assert report.skipped == {"template_error": 1}
    assert report.first_indices["template_error"] == (1,)
    assert "ValueError: roles must alternate" in report.first_details["template_error"]
    with pytest.raises(ValueError, match=r"row 1: template_error \(ValueError: roles must alternate\)"):
        load_preferences(rows, tokenizer=PickyTemplate(), strict=True)
    # a template that raises on every row is a broken tokenizer, not bad data
    with pytest.raises(ValueError, match="chat template raised on every row"):
        load_preferences(rows, tokenizer=PickyTemplate(always=True))
