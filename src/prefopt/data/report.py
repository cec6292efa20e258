"""Bad-row bookkeeping shared by the loaders and the collators.

A *bad row* is skipped, never silently repaired. Every skip is counted under a short machine-readable
reason (see `REASONS`) together with the index of the row, so that a user can look the row up.
Loaders return an immutable [`LoadReport`][prefopt.data.report.LoadReport]; collators keep a running, mutable
[`SkipTally`][prefopt.data.report.SkipTally] (``collator.stats``) whose
[`SkipTally.snapshot`][prefopt.data.report.SkipTally.snapshot] gives a
[`LoadReport`][prefopt.data.report.LoadReport] as well.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

__all__ = ["REASONS", "TRUNCATIONS", "BadRowError", "LoadReport", "SkipTally"]

#: Every reason a row can be skipped for, with its meaning (documented in ``docs/data.md``).
REASONS: Mapping[str, str] = MappingProxyType(
    {
        "missing_field": "a required field is absent, None, or not of the expected type",
        "not_an_object": "the row is not a JSON object / mapping (null, a list, a string, a number)",
        "template_error": "conversational format: the tokenizer's chat template raised on this row",
        "identical": "chosen and rejected are the same text",
        "missing_marker": "implicit-prompt format: the assistant marker does not occur in chosen or rejected",
        "prompt_mismatch": "chosen and rejected do not share the same prompt",
        "empty_completion": "a completion is empty or whitespace only, or tokenizes to zero tokens",
        "bad_messages": "conversational format: messages are not a list of {role, content} string dicts",
        "last_not_assistant": "conversational format: the completion does not start with an assistant message",
        "template_not_prefix": "conversational format: the rendered prompt is not a prefix of the rendered dialogue",
        "bad_label": "pointwise/unpaired format: the label is not a finite number or a bool",
        "empty_prompt": "collator: the prompt tokenizes to zero tokens (the first completion token would have no context)",
        "empty_completion_after_truncation": "collator: no completion token is left after truncation",
        "identical_after_truncation": "collator: chosen and rejected token ids are equal after truncation",
        "duplicate_pair": "pairs_from_pointwise: the same (prompt, chosen, rejected) triple was already formed",
    }
)

#: Every way a collator can shorten a KEPT row, with its meaning (a row is counted once per reason).
TRUNCATIONS: Mapping[str, str] = MappingProxyType(
    {
        "prompt_max_prompt_length": "collator: the prompt was cut to max_prompt_length",
        "prompt_to_fit": "collator: the prompt was cut (keeping its end, or start) to leave the completions room in max_length",
        "completion_max_completion_length": "collator: a completion was cut to max_completion_length (keeping its start)",
        "completion_to_fit": "collator: a completion was cut (keeping its start) to fit max_length",
    }
)

_MAX_INDICES = 5


class BadRowError(Exception):
    """Internal signal raised while parsing one row; carries a reason from `REASONS`."""

    def __init__(self, reason: str, detail: str = "") -> None:
        if reason not in REASONS:  # pragma: no cover - programming error
            raise KeyError(f"unknown bad-row reason {reason!r}")
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class LoadReport:
    """What happened to the rows of one load (or of everything a collator has seen so far).

    Attributes:
        format: the detected or requested format (``"explicit"``, ``"implicit"``, ``"conversational"``,
            ``"pointwise"``, ``"unpaired"``, ``"pairs_from_pointwise"``, ``"collator"``).
        n_rows: rows read from the source.
        n_kept: rows in the result.
        skipped: reason → number of rows skipped for it.
        first_indices: reason → the first (at most 5) row indices skipped for it, 0-based in the source.
        first_details: reason → a human-readable detail of the first skipped row.
        truncated: collators only: truncation (see `TRUNCATIONS`) → number of KEPT rows shortened that
            way (a pair counts once per reason, whichever of its sequences was cut).
    """

    format: str
    n_rows: int
    n_kept: int
    skipped: Mapping[str, int] = field(default_factory=dict)
    first_indices: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    first_details: Mapping[str, str] = field(default_factory=dict)
    truncated: Mapping[str, int] = field(default_factory=dict)

    @property
    def n_skipped(self) -> int:
        """Total number of skipped rows (``n_rows - n_kept`` for loaders)."""
        return sum(self.skipped.values())

    def summary(self) -> str:
        """One line: ``"implicit: kept 2339 of 2354 rows; skipped 15 (identical: 2 [rows 5, 9], ...)"``."""
        head = f"{self.format}: kept {self.n_kept} of {self.n_rows} rows"
        if self.truncated:
            cut = ", ".join(
                f"{r}: {n}" for r, n in sorted(self.truncated.items(), key=lambda kv: (-kv[1], kv[0]))
            )
            head = f"{head} (truncated: {cut})"
        if not self.skipped:
            return head
        parts = []
        for reason, count in sorted(self.skipped.items(), key=lambda kv: (-kv[1], kv[0])):
            idx = ", ".join(str(i) for i in self.first_indices.get(reason, ()))
            more = ", ..." if count > len(self.first_indices.get(reason, ())) else ""
            parts.append(f"{reason}: {count} [rows {idx}{more}]")
        return f"{head}; skipped {self.n_skipped} ({'; '.join(parts)})"

    def __str__(self) -> str:
        return self.summary()


class SkipTally:
    """Mutable running counter of skipped rows (used by collators across batches).

    Attributes:
        rows_seen: rows handed to the owner so far.
        rows_kept: rows that made it into an output.
        skipped: ``Counter`` reason → count.
        truncated: ``Counter`` truncation (see `TRUNCATIONS`) → number of kept rows shortened that way.
    """

    def __init__(self, format: str) -> None:
        self.format = format
        self.rows_seen = 0
        self.rows_kept = 0
        self.skipped: Counter[str] = Counter()
        self.truncated: Counter[str] = Counter()
        self._indices: dict[str, list[int]] = {}
        self._details: dict[str, str] = {}

    def skip(self, reason: str, index: int, detail: str = "") -> None:
        """Record one skipped row."""
        if reason not in REASONS:  # pragma: no cover - programming error
            raise KeyError(f"unknown bad-row reason {reason!r}")
        self.skipped[reason] += 1
        lst = self._indices.setdefault(reason, [])
        if len(lst) < _MAX_INDICES:
            lst.append(index)
        self._details.setdefault(reason, detail)

    def truncate(self, reason: str) -> None:
        """Record one kept row shortened for ``reason`` (a key of `TRUNCATIONS`)."""
        if reason not in TRUNCATIONS:  # pragma: no cover - programming error
            raise KeyError(f"unknown truncation {reason!r}")
        self.truncated[reason] += 1

    def snapshot(self) -> LoadReport:
        """An immutable [`LoadReport`][prefopt.data.report.LoadReport] of the counts so far."""
        return LoadReport(
            format=self.format,
            n_rows=self.rows_seen,
            n_kept=self.rows_kept,
            skipped=MappingProxyType(dict(self.skipped)),
            first_indices=MappingProxyType({k: tuple(v) for k, v in self._indices.items()}),
            first_details=MappingProxyType(dict(self._details)),
            truncated=MappingProxyType(dict(self.truncated)),
        )

    def reset(self) -> None:
        """Forget everything counted so far."""
        self.__init__(self.format)  # type: ignore[misc]
