"""Loading preference data into ``datasets.Dataset`` objects with plain string columns.

Three loaders, one per kind of supervision:

| loader | input formats (auto-detected from columns) | output columns |
|---|---|---|
| [`load_preferences`][prefopt.data.formats.load_preferences] | explicit ``prompt/chosen/rejected``; implicit ``chosen/rejected`` dialogues (HH); conversational message lists (chat template) | ``prompt``, ``chosen``, ``rejected`` (str) |
| [`load_pointwise`][prefopt.data.formats.load_pointwise] | ``context|prompt``, ``generation|completion``, ``reward|label`` (Taskmaster) | ``prompt``, ``completion`` (str), ``label`` (float) |
| [`load_unpaired`][prefopt.data.formats.load_unpaired] | as pointwise, or paired data (split in two) | ``prompt``, ``completion``, ``label`` (bool) |

``chosen`` / ``rejected`` / ``completion`` are the *completions only*: the prompt is never repeated in them,
so ``prompt + chosen`` is the whole text of the chosen sequence.

Sources: a local ``.jsonl`` / ``.json`` / ``.parquet`` file (``.jsonl.gz`` / ``.json.gz`` too), a folder or
glob of such files (read in sorted order and concatenated), a list of paths, an in-memory list of dicts,
a ``datasets.Dataset``, or else a Hugging Face hub id passed to ``datasets.load_dataset(source, split=split)``.

Bad rows are skipped and counted by reason with their 0-based row index
([`LoadReport`][prefopt.data.report.LoadReport]); a one-line warning is logged on the ``prefopt.data`` logger.
``strict=True`` raises ``ValueError`` at the first bad row.
"""

from __future__ import annotations

import glob as _glob
import gzip
import json
import logging
import math
import os
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeAlias

import datasets

from prefopt.data.report import BadRowError, LoadReport, SkipTally

__all__ = [
    "DEFAULT_MARKER",
    "detect_format",
    "load_pointwise",
    "load_preferences",
    "load_unpaired",
    "pairs_from_pointwise",
    "read_rows",
    "render_taskmaster_context",
    "render_taskmaster_turn",
    "split_conversation",
    "split_implicit_prompt",
    "unpaired_from_pairs",
]

logger = logging.getLogger("prefopt.data")

#: The HH-RLHF assistant marker: the implicit prompt ends with (and includes) its last occurrence.
DEFAULT_MARKER = "\n\nAssistant:"

PreferenceFormat: TypeAlias = Literal["auto", "explicit", "implicit", "conversational"]
Source: TypeAlias = (
    str | os.PathLike[str] | Sequence[Mapping[str, Any]] | Sequence[str | os.PathLike[str]] | datasets.Dataset
)

_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".parquet")
_PROMPT_KEYS = ("prompt", "context")
_COMPLETION_KEYS = ("completion", "generation")
_LABEL_KEYS = ("label", "reward")


# ----------------------------------------------------------------------------------------------------------
# reading rows
# ----------------------------------------------------------------------------------------------------------


def _read_file(path: Path) -> list[Any]:
    """The rows of one file (non-object rows are kept as they are; the parsers skip them by index).
    Undecodable bytes, corrupt or truncated compression and malformed JSON raise ``ValueError`` naming
    ``path``."""
    name = path.name.lower()
    if name.endswith(".parquet"):
        import pyarrow.parquet as pq

        try:
            return list(pq.read_table(path).to_pylist())
        except Exception as err:  # pyarrow raises ArrowInvalid/OSError for corrupt files
            raise ValueError(f"{path}: cannot read as parquet ({type(err).__name__}: {err})") from err
    opener: Callable[..., Any] = gzip.open if name.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as fh:
            text = fh.read()
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{path}: not valid UTF-8 (byte offset {err.start} of the decoded stream: {err.reason})"
        ) from err
    except (gzip.BadGzipFile, EOFError, zlib.error) as err:
        raise ValueError(f"{path}: corrupt or truncated gzip file ({type(err).__name__}: {err})") from err
    if name.endswith((".jsonl", ".jsonl.gz")):
        rows = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}: line {lineno} is not valid JSON ({err})") from err
        return rows
    if name.endswith((".json", ".json.gz")):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err})") from err
        if isinstance(data, Mapping):  # {"data": [...]} or a dict of columns
            if "data" in data and isinstance(data["data"], list):
                return list(data["data"])
            cols = {k: v for k, v in data.items() if isinstance(v, list)}
            if cols and len({len(v) for v in cols.values()}) == 1:
                n = len(next(iter(cols.values())))
                return [{k: v[i] for k, v in cols.items()} for i in range(n)]
            raise ValueError(
                f"{path}: a JSON file must hold a list of objects (or a dict of equal-length columns)"
            )
        if not isinstance(data, list):
            raise ValueError(f"{path}: a JSON file must hold a list of objects, got {type(data).__name__}")
        return data
    raise ValueError(f"source file {path} has an unsupported suffix; expected one of {', '.join(_SUFFIXES)}")


class _Rows(list):  # type: ignore[type-arg]
    """Rows already read (handed from one loader to another: taken as rows, never as file paths)."""


def _object(row: Any) -> Mapping[str, Any]:
    """``row`` if it is a mapping, else a ``not_an_object`` bad row."""
    if not isinstance(row, Mapping):
        raise BadRowError("not_an_object", f"the row is {type(row).__name__} {row!r:.40}, not an object")
    return row


def _first_object(rows: Sequence[Any]) -> Mapping[str, Any] | None:
    """The first row that is a mapping (format detection looks at it), or ``None``."""
    return next((r for r in rows if isinstance(r, Mapping)), None)


def _is_local_path_like(s: str) -> bool:
    return s.lower().endswith(_SUFFIXES) or any(ch in s for ch in "*?[") or s.startswith((".", "/", "~"))


def read_rows(source: Source, *, split: str = "train", **load_kwargs: Any) -> list[Any]:
    """Read raw rows from any supported ``source`` without interpreting them: normally dicts; a JSONL line
    or JSON list item that is not an object (``null``, a list, a string, a number) is returned as it is and
    skipped by the loaders as a ``not_an_object`` bad row.

    ``split`` and ``load_kwargs`` are only used for hub ids (``datasets.load_dataset(source, split=split,
    **load_kwargs)``); local files have no splits.
    """
    if isinstance(source, _Rows):  # rows already read by another loader
        return list(source)
    if isinstance(source, datasets.Dataset):
        return list(source.to_list())
    if isinstance(source, (str, os.PathLike)):
        s = os.fspath(source)
        p = Path(s).expanduser()
        if p.is_file():
            return _read_file(p)
        if p.is_dir():
            files = sorted(f for f in p.iterdir() if f.is_file() and f.name.lower().endswith(_SUFFIXES))
            if not files:
                raise FileNotFoundError(f"source folder {p} holds no {'/'.join(_SUFFIXES)} file")
            return [row for f in files for row in _read_file(f)]
        if any(ch in s for ch in "*?["):
            matches = sorted(_glob.glob(os.path.expanduser(s)))
            if not matches:
                raise FileNotFoundError(f"source pattern {s!r} matches no file")
            return [row for f in matches for row in _read_file(Path(f))]
        if _is_local_path_like(s):
            raise FileNotFoundError(f"source file {s!r} does not exist")
        ds = datasets.load_dataset(s, split=split, **load_kwargs)  # hub id: kept thin on purpose
        return list(ds.to_list())  # type: ignore[union-attr]
    if isinstance(source, Sequence):
        items = list(source)
        paths = [x for x in items if isinstance(x, (str, os.PathLike))]
        if not paths and (not items or any(isinstance(x, Mapping) for x in items)):
            return [dict(x) if isinstance(x, Mapping) else x for x in items]
        if items and all(isinstance(x, (str, os.PathLike)) for x in items):
            return [row for x in items for row in read_rows(x)]  # type: ignore[arg-type]
        raise TypeError("source must be a list of dicts or a list of file paths, not a mix or other objects")
    raise TypeError(
        f"source must be a path, a hub id, a list of dicts or a datasets.Dataset, got {type(source).__name__}"
    )


# ----------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------


def _get_str(row: Mapping[str, Any], key: str) -> str:
    value = row.get(key)
    if not isinstance(value, str):
        got = "absent" if key not in row else type(value).__name__
        raise BadRowError("missing_field", f"{key!r} must be a string ({got})")
    return value


def _check_completions(chosen: str, rejected: str) -> None:
    if not chosen.strip():
        raise BadRowError("empty_completion", "chosen completion is empty")
    if not rejected.strip():
        raise BadRowError("empty_completion", "rejected completion is empty")


def _finish(
    kind: str,
    rows: Iterable[tuple[int, Callable[[], dict[str, Any]]]],
    n_rows: int,
    columns: Sequence[str],
    *,
    strict: bool,
    features: datasets.Features | None = None,
) -> tuple[datasets.Dataset, LoadReport]:
    """Run each row parser, collect good rows into a Dataset and bad ones into a report."""
    tally = SkipTally(kind)
    tally.rows_seen = n_rows
    out: dict[str, list[Any]] = {c: [] for c in columns}
    for index, parse in rows:
        try:
            parsed = parse()
        except BadRowError as bad:
            if strict:
                raise ValueError(f"row {index}: {bad.reason} ({bad.detail})") from None
            tally.skip(bad.reason, index, bad.detail)
            continue
        for c in columns:
            out[c].append(parsed[c])
        tally.rows_kept += 1
    report = tally.snapshot()
    if report.n_skipped:
        logger.warning("prefopt.data: %s", report.summary())
    return datasets.Dataset.from_dict(out, features=features), report


# ----------------------------------------------------------------------------------------------------------
# paired formats
# ----------------------------------------------------------------------------------------------------------


def detect_format(row: Mapping[str, Any]) -> str:
    """Name the format of one row from its columns.

    Returns ``"conversational"`` (``chosen`` is a list of messages), ``"explicit"`` (``prompt``, ``chosen``,
    ``rejected``), ``"implicit"`` (``chosen``, ``rejected`` only), ``"pointwise"`` (a prompt/context, a
    completion/generation and a label/reward), or raises ``ValueError`` naming the columns it saw.
    """
    keys = set(row)
    if {"chosen", "rejected"} <= keys:
        if isinstance(row["chosen"], list) or isinstance(row.get("prompt"), list):
            return "conversational"
        return "explicit" if "prompt" in keys else "implicit"
    if keys & set(_PROMPT_KEYS) and keys & set(_COMPLETION_KEYS) and keys & set(_LABEL_KEYS):
        return "pointwise"
    raise ValueError(
        f"cannot detect the format from columns {sorted(keys)}; expected chosen/rejected (+ prompt) or "
        "prompt|context, completion|generation, label|reward"
    )


def split_implicit_prompt(
    chosen: str, rejected: str, *, marker: str = DEFAULT_MARKER
) -> tuple[str, str, str]:
    """Split two whole dialogues into ``(prompt, chosen_completion, rejected_completion)``.

    The prompt is the text up to and including the LAST occurrence of ``marker`` (HH-RLHF:
    ``"\\n\\nAssistant:"``); it must be the same in both dialogues. Raises
    [`BadRowError`][prefopt.data.report.BadRowError] with reason ``identical``, ``missing_marker``,
    ``prompt_mismatch`` or ``empty_completion``.
    """
    if not marker:
        raise ValueError("marker must be a non-empty string")
    if chosen == rejected:
        raise BadRowError("identical", "chosen == rejected")
    ic, ir = chosen.rfind(marker), rejected.rfind(marker)
    if ic < 0 or ir < 0:
        which = "chosen" if ic < 0 else "rejected"
        raise BadRowError("missing_marker", f"{marker!r} not found in {which}")
    cut_c, cut_r = ic + len(marker), ir + len(marker)
    if chosen[:cut_c] != rejected[:cut_r]:
        raise BadRowError("prompt_mismatch", "chosen and rejected differ before the last marker")
    prompt, c, r = chosen[:cut_c], chosen[cut_c:], rejected[cut_r:]
    _check_completions(c, r)
    return prompt, c, r


def _check_messages(name: str, messages: Any) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise BadRowError("bad_messages", f"{name} must be a non-empty list of messages")
    for m in messages:
        if not (
            isinstance(m, Mapping) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        ):
            raise BadRowError("bad_messages", f"{name} holds a message that is not a {{role, content}} dict")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _render(tokenizer: Any, messages: list[dict[str, str]], *, add_generation_prompt: bool) -> str:
    try:
        text = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except Exception as err:  # a template may raise on some rows only (e.g. "roles must alternate")
        raise BadRowError("template_error", f"{type(err).__name__}: {err}") from err
    if not isinstance(text, str):  # pragma: no cover - depends on the transformers version
        raise TypeError("tokenizer.apply_chat_template(..., tokenize=False) must return a string")
    return text


def split_conversation(
    chosen: Any, rejected: Any, tokenizer: Any, *, prompt: Any = None, assistant_role: str = "assistant"
) -> tuple[str, str, str]:
    """Render a conversational pair into ``(prompt, chosen_completion, rejected_completion)`` strings.

    Without ``prompt``: ``chosen``/``rejected`` are whole dialogues; the prompt messages are everything before
    the LAST ``assistant_role`` message, and must be the same in both (the message-level analogue of the
    implicit-prompt rule). With ``prompt`` (a message list): the completions are ``chosen`` / ``rejected``
    and must start with an assistant message.

    The prompt text is ``apply_chat_template(prompt_messages, add_generation_prompt=True)``; a completion is
    the rest of ``apply_chat_template(prompt_messages + completion_messages)``, so that
    ``prompt + completion`` equals the rendering of the whole conversation exactly. Templates for which the
    rendered prompt is not a prefix of the rendered dialogue give a ``template_not_prefix`` bad row.
    """
    c_msgs = _check_messages("chosen", chosen)
    r_msgs = _check_messages("rejected", rejected)
    if prompt is not None:
        p_msgs = _check_messages("prompt", prompt)
        c_full, r_full = p_msgs + c_msgs, p_msgs + r_msgs
        if c_msgs[0]["role"] != assistant_role or r_msgs[0]["role"] != assistant_role:
            raise BadRowError(
                "last_not_assistant", f"completions must start with a {assistant_role!r} message"
            )
    else:
        c_full, r_full = c_msgs, r_msgs

        def last_assistant(msgs: list[dict[str, str]], name: str) -> int:
            idx = [i for i, m in enumerate(msgs) if m["role"] == assistant_role]
            if not idx:
                raise BadRowError("last_not_assistant", f"{name} has no {assistant_role!r} message")
            return idx[-1]

        ic, ir = last_assistant(c_msgs, "chosen"), last_assistant(r_msgs, "rejected")
        if c_msgs[:ic] != r_msgs[:ir]:
            raise BadRowError(
                "prompt_mismatch", "chosen and rejected differ before the last assistant message"
            )
        p_msgs = c_msgs[:ic]
    if c_full == r_full:
        raise BadRowError("identical", "chosen == rejected")
    prompt_text = _render(tokenizer, p_msgs, add_generation_prompt=True)
    completions = []
    for name, full in (("chosen", c_full), ("rejected", r_full)):
        text = _render(tokenizer, full, add_generation_prompt=False)
        if not text.startswith(prompt_text):
            raise BadRowError(
                "template_not_prefix", f"rendered prompt is not a prefix of the rendered {name}"
            )
        completions.append(text[len(prompt_text) :])
    _check_completions(completions[0], completions[1])
    return prompt_text, completions[0], completions[1]


def _parse_pair(row: Any, fmt: str, marker: str, tokenizer: Any) -> dict[str, Any]:
    row = _object(row)
    if fmt == "explicit":
        prompt, chosen, rejected = _get_str(row, "prompt"), _get_str(row, "chosen"), _get_str(row, "rejected")
        if chosen == rejected:
            raise BadRowError("identical", "chosen == rejected")
        _check_completions(chosen, rejected)
    elif fmt == "implicit":
        prompt, chosen, rejected = split_implicit_prompt(
            _get_str(row, "chosen"), _get_str(row, "rejected"), marker=marker
        )
    else:  # conversational
        for key in ("chosen", "rejected"):
            if row.get(key) is None:
                raise BadRowError("missing_field", f"{key!r} is absent")
        prompt, chosen, rejected = split_conversation(
            row["chosen"], row["rejected"], tokenizer, prompt=row.get("prompt")
        )
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def load_preferences(
    source: Source,
    *,
    format: PreferenceFormat = "auto",
    split: str = "train",
    strict: bool = False,
    marker: str = DEFAULT_MARKER,
    tokenizer: Any = None,
    return_report: bool = False,
    **load_kwargs: Any,
) -> Any:
    """Load preference pairs as a ``datasets.Dataset`` with string columns ``prompt``, ``chosen``, ``rejected``.

    Args:
        source: file / folder / glob / list of paths / list of dicts / ``datasets.Dataset`` / hub id.
        format: ``"auto"`` (detected from the first row, see
            [`detect_format`][prefopt.data.formats.detect_format]), ``"explicit"``, ``"implicit"`` (prompt =
            shared prefix through the last ``marker``) or ``"conversational"`` (message lists rendered with
            ``tokenizer``'s chat template).
        split: split for hub ids only.
        strict: raise ``ValueError("row i: reason (detail)")`` at the first bad row instead of skipping it.
        marker: the assistant marker of the implicit format (default ``"\\n\\nAssistant:"``).
        tokenizer: required for the conversational format (anything with ``apply_chat_template``).
        return_report: also return the [`LoadReport`][prefopt.data.report.LoadReport].
        load_kwargs: passed to ``datasets.load_dataset`` for hub ids.

    Returns:
        the Dataset, or ``(Dataset, LoadReport)`` when ``return_report=True``.
    """
    if format not in ("auto", "explicit", "implicit", "conversational"):
        raise ValueError(
            f"format must be one of 'auto', 'explicit', 'implicit', 'conversational', got {format!r}"
        )
    if not isinstance(marker, str) or not marker:
        raise ValueError(f"marker must be a non-empty string, got {marker!r}")
    rows = read_rows(source, split=split, **load_kwargs)
    fmt: str = format
    if fmt == "auto":
        first = _first_object(rows)
        if first is None:
            what = "no rows" if not rows else f"{len(rows)} rows, none of them a JSON object"
            raise ValueError(f"source holds {what}; cannot detect the format (pass format=...)")
        fmt = detect_format(first)
        if fmt == "pointwise":
            raise ValueError(
                "source looks pointwise (prompt/context, completion/generation, label/reward): use "
                "load_pointwise(...) and pairs_from_pointwise(...) to form pairs"
            )
    if fmt == "conversational" and tokenizer is None:
        raise ValueError("tokenizer is required for the conversational format (its chat template renders it)")

    def parser(row: Any) -> Callable[[], dict[str, Any]]:
        return lambda: _parse_pair(row, fmt, marker, tokenizer)

    ds, report = _finish(
        fmt,
        ((i, parser(r)) for i, r in enumerate(rows)),
        len(rows),
        ("prompt", "chosen", "rejected"),
        strict=strict,
        features=datasets.Features({k: datasets.Value("string") for k in ("prompt", "chosen", "rejected")}),
    )
    failed = report.skipped.get("template_error", 0)
    if report.n_kept == 0 and failed and failed == report.n_skipped:
        raise ValueError(
            f"the chat template raised on every row ({failed}), e.g. "
            f"{report.first_details.get('template_error', '')}; check tokenizer.chat_template"
        )
    return (ds, report) if return_report else ds


# ----------------------------------------------------------------------------------------------------------
# pointwise (Taskmaster) and unpaired (KTO)
# ----------------------------------------------------------------------------------------------------------


def render_taskmaster_turn(turn: Mapping[str, Any], *, with_role: bool = True) -> str:
    """Render one Taskmaster turn as one line.

    ``{"role": "user", "text": t}`` → ``"User: t"``; ``{"role": "agent", "text": t}`` → ``"Agent: t"``;
    an agent API call ``{"role": "agent", "api": a}`` → ``"Agent: [API] <compact JSON of a>"``;
    an API response ``{"role": "api", "response": r}`` → ``"API: <compact JSON of r>"``. Any other role
    ``x`` → ``"X: ..."``. With ``with_role=False`` the ``"Role:"`` prefix is dropped (for completions).
    """
    role = str(turn.get("role", "unknown"))
    if "text" in turn:
        body = str(turn["text"])
    elif "api" in turn:
        body = "[API] " + json.dumps(turn["api"], ensure_ascii=False, separators=(",", ":"))
    elif "response" in turn:
        body = json.dumps(turn["response"], ensure_ascii=False, separators=(",", ":"))
    else:
        body = json.dumps(
            {k: v for k, v in turn.items() if k != "role"}, ensure_ascii=False, separators=(",", ":")
        )
    name = "API" if role.lower() == "api" else role.capitalize()
    return f"{name}: {body}" if with_role else body


def render_taskmaster_context(turns: Sequence[Mapping[str, Any]], *, next_role: str = "agent") -> str:
    """Render a Taskmaster context (list of turns) as text ending with the next speaker's cue.

    One line per turn ([`render_taskmaster_turn`][prefopt.data.formats.render_taskmaster_turn]), joined by
    ``"\\n"``, then ``"\\nAgent:"``. E.g. ``[agent "Welcome", user "an espresso"]`` →
    ``"Agent: Welcome\\nUser: an espresso\\nAgent:"``. The matching completion is
    ``" " + render_taskmaster_turn(generation, with_role=False)``, so ``prompt + completion`` reads as one
    more line of the same dialogue.
    """
    lines = [render_taskmaster_turn(t) for t in turns]
    lines.append(f"{next_role.capitalize()}:")
    return "\n".join(lines)


def _maybe_json(value: str) -> Any:
    s = value.lstrip()
    if not s.startswith(("[", "{")):
        return None
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return None


def _pointwise_text(row: Mapping[str, Any]) -> tuple[str, str]:
    pkey = next((k for k in _PROMPT_KEYS if k in row), _PROMPT_KEYS[0])
    ckey = next((k for k in _COMPLETION_KEYS if k in row), _COMPLETION_KEYS[0])
    prompt_raw, completion_raw = row.get(pkey), row.get(ckey)
    # prompt: a string, a list of turns, or a JSON-encoded list of turns
    turns = _maybe_json(prompt_raw) if isinstance(prompt_raw, str) else prompt_raw
    if isinstance(turns, list) and all(isinstance(t, Mapping) and "role" in t for t in turns):
        prompt = render_taskmaster_context(turns)
    elif isinstance(prompt_raw, str):
        prompt = prompt_raw
    else:
        raise BadRowError("missing_field", f"{pkey!r} must be a string or a list of turns")
    turn = _maybe_json(completion_raw) if isinstance(completion_raw, str) else completion_raw
    if isinstance(turn, Mapping) and "role" in turn:
        completion = " " + render_taskmaster_turn(turn, with_role=False)
    elif isinstance(completion_raw, str):
        completion = completion_raw
    else:
        raise BadRowError("missing_field", f"{ckey!r} must be a string or a turn dict")
    if not completion.strip():
        raise BadRowError("empty_completion", "completion is empty")
    return prompt, completion


def _label(row: Mapping[str, Any]) -> float:
    key = next((k for k in _LABEL_KEYS if k in row), None)
    if key is None:
        raise BadRowError("missing_field", "'label' (or 'reward') is absent")
    value = row[key]
    if isinstance(value, bool):
        return float(value)
    if not isinstance(value, (int, float)) or not math.isfinite(float(value)):
        raise BadRowError("bad_label", f"{key!r} must be a finite number or a bool, got {value!r}")
    return float(value)


def load_pointwise(
    source: Source,
    *,
    split: str = "train",
    strict: bool = False,
    return_report: bool = False,
    **load_kwargs: Any,
) -> Any:
    """Load pointwise-labelled completions: columns ``prompt``, ``completion`` (str), ``label`` (float64).

    Input columns: ``prompt`` or ``context``; ``completion`` or ``generation``; ``label`` or ``reward``
    (number or bool). A Taskmaster ``context`` (a JSON-encoded list of ``{"role", "text"|"api"|"response"}``
    turns) is rendered with [`render_taskmaster_context`][prefopt.data.formats.render_taskmaster_context]; a
    JSON-encoded ``generation`` turn becomes ``" " + render_taskmaster_turn(turn, with_role=False)``. Plain
    strings are used as they are. Bad rows: ``missing_field``, ``empty_completion``, ``bad_label`` (NaN, inf,
    non-numeric).
    """
    rows = read_rows(source, split=split, **load_kwargs)

    def parse(row: Any) -> Callable[[], dict[str, Any]]:
        def run() -> dict[str, Any]:
            obj = _object(row)
            prompt, completion = _pointwise_text(obj)
            return {"prompt": prompt, "completion": completion, "label": _label(obj)}

        return run

    ds, report = _finish(
        "pointwise",
        ((i, parse(r)) for i, r in enumerate(rows)),
        len(rows),
        ("prompt", "completion", "label"),
        strict=strict,
        features=datasets.Features(
            {
                "prompt": datasets.Value("string"),
                "completion": datasets.Value("string"),
                "label": datasets.Value("float64"),
            }
        ),
    )
    return (ds, report) if return_report else ds


def pairs_from_pointwise(ds: datasets.Dataset, *, dedupe: bool = True, return_report: bool = False) -> Any:
    """Form ``(prompt, chosen, rejected)`` pairs from pointwise rows that share a prompt.

    For every prompt, every completion ``a`` and every completion ``b`` with ``label(a) > label(b)`` give the
    pair ``(prompt, chosen=a, rejected=b)``. Groups are visited in order of first appearance, and inside a
    group chosen then rejected in row order, so the output is deterministic.

    With ``dedupe=True`` (default) a (prompt, chosen, rejected) triple that was already formed — duplicate
    rows in the source — is skipped (reason ``duplicate_pair``), and so is a pair whose two completions are
    the same text with different labels (reason ``identical``). ``dedupe=False`` keeps every combination
    (the "772 pairs" count of the Taskmaster coffee README; 617 are distinct).
    """
    for col in ("prompt", "completion", "label"):
        if col not in ds.column_names:
            raise ValueError(f"ds must have a {col!r} column (from load_pointwise), got {ds.column_names}")
    groups: dict[str, list[tuple[str, float]]] = {}
    for p, c, y in zip(ds["prompt"], ds["completion"], ds["label"]):
        groups.setdefault(p, []).append((c, float(y)))
    candidates: list[tuple[str, str, str]] = []
    for p, items in groups.items():
        for ca, ya in items:
            for cb, yb in items:
                if ya > yb:
                    candidates.append((p, ca, cb))
    seen: set[tuple[str, str, str]] = set()

    def parse(triple: tuple[str, str, str]) -> Callable[[], dict[str, Any]]:
        def run() -> dict[str, Any]:
            if dedupe:
                if triple[1] == triple[2]:
                    raise BadRowError("identical", "same completion text with different labels")
                if triple in seen:
                    raise BadRowError("duplicate_pair", "this (prompt, chosen, rejected) was already formed")
                seen.add(triple)
            return {"prompt": triple[0], "chosen": triple[1], "rejected": triple[2]}

        return run

    out, report = _finish(
        "pairs_from_pointwise",
        ((i, parse(t)) for i, t in enumerate(candidates)),
        len(candidates),
        ("prompt", "chosen", "rejected"),
        strict=False,
        features=datasets.Features({k: datasets.Value("string") for k in ("prompt", "chosen", "rejected")}),
    )
    return (out, report) if return_report else out


def unpaired_from_pairs(ds: datasets.Dataset) -> datasets.Dataset:
    """Split pairs into unpaired rows: ``(prompt, chosen, True)`` then ``(prompt, rejected, False)`` per pair.

    Output columns ``prompt``, ``completion`` (str), ``label`` (bool); ``2 * len(ds)`` rows, pair ``i`` giving
    rows ``2i`` (desirable) and ``2i + 1`` (undesirable).
    """
    for col in ("prompt", "chosen", "rejected"):
        if col not in ds.column_names:
            raise ValueError(f"ds must have a {col!r} column (from load_preferences), got {ds.column_names}")
    out: dict[str, list[Any]] = {"prompt": [], "completion": [], "label": []}
    for p, c, r in zip(ds["prompt"], ds["chosen"], ds["rejected"]):
        out["prompt"] += [p, p]
        out["completion"] += [c, r]
        out["label"] += [True, False]
    features = datasets.Features(
        {
            "prompt": datasets.Value("string"),
            "completion": datasets.Value("string"),
            "label": datasets.Value("bool"),
        }
    )
    return datasets.Dataset.from_dict(out, features=features)


def load_unpaired(
    source: Source,
    *,
    split: str = "train",
    strict: bool = False,
    threshold: float = 0.5,
    return_report: bool = False,
    **load_kwargs: Any,
) -> Any:
    """Load unpaired (KTO) data: columns ``prompt``, ``completion`` (str), ``label`` (bool, True = desirable).

    Pointwise-style rows (see [`load_pointwise`][prefopt.data.formats.load_pointwise]) are read as such and
    ``label = value >= threshold`` (bool labels map to 1.0 / 0.0 first). Paired rows (``chosen``/``rejected``
    columns, any paired format of [`load_preferences`][prefopt.data.formats.load_preferences]) are split with
    [`unpaired_from_pairs`][prefopt.data.formats.unpaired_from_pairs].
    """
    if not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
        raise ValueError(f"threshold must be a finite number, got {threshold!r}")
    rows = read_rows(source, split=split, **load_kwargs)
    first = _first_object(rows)
    if first is not None and {"chosen", "rejected"} <= set(first):
        pairs, report = load_preferences(_Rows(rows), strict=strict, return_report=True)
        out = unpaired_from_pairs(pairs)
        return (out, report) if return_report else out
    ds, report = load_pointwise(_Rows(rows), strict=strict, return_report=True)
    features = datasets.Features(
        {
            "prompt": datasets.Value("string"),
            "completion": datasets.Value("string"),
            "label": datasets.Value("bool"),
        }
    )
    ds = datasets.Dataset.from_dict(
        {
            "prompt": ds["prompt"],
            "completion": ds["completion"],
            "label": [y >= threshold for y in ds["label"]],
        },
        features=features,
    )
    report = LoadReport(
        "unpaired", report.n_rows, report.n_kept, report.skipped, report.first_indices, report.first_details
    )
    return (ds, report) if return_report else ds
