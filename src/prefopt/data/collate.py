"""Collators: lists of string rows → padded token batches.

Layout of a [`PreferenceCollator`][prefopt.data.collate.PreferenceCollator] batch for ``B`` kept pairs (``P``
prompt, ``C`` chosen, ``R`` rejected, ``e`` EOS, ``.`` padding; right padding):

    row 0      P P P P C C C e . .     completion_mask  0 0 0 0 1 1 1 1 0 0
    ...        (B chosen rows)
    row B      P P P P R R e . . .     completion_mask  0 0 0 0 1 1 1 0 0 0
    ...        (B rejected rows; row B + i is the rejected twin of row i)

``completion_mask[:, i]`` is True where ``input_ids[:, i]`` is a completion token that counts; it is never
True at position 0 (a token at position 0 has no context to be predicted from), which is why a prompt that
tokenizes to nothing is a bad row.

Prompt and completion are tokenized SEPARATELY and their ids concatenated, so the prompt/completion
boundary is exact (no merge across it). Truncation, in this order (a pair's chosen and rejected always keep
the SAME prompt ids; ``L`` = the longer of the two completions after step 1):

1. a completion longer than ``max_completion_length`` keeps its first tokens;
2. with ``max_prompt_length`` set, a prompt longer than it keeps its last tokens (``prompt_truncation=
   "keep_end"``, default; a leading BOS is kept too, followed by the last ``max_prompt_length - 1`` tokens)
   or its first (``"keep_start"``);
3. with ``max_prompt_length=None`` (default), if ``len(prompt) + L > max_length`` the PROMPT gives way
   first, cut the same way as in step 2 to ``max(max_length - L, min(len(prompt), max(1, max_length // 2)))``
   tokens: the completions get all the room they need, but the prompt keeps at least half of ``max_length``
   (or all of itself, if shorter), so a very long completion does not erase its context;
4. if still ``len(prompt) + len(completion) > max_length``, the completion keeps its first
   ``max_length - len(prompt)`` tokens; nothing left → bad row ``empty_completion_after_truncation``
   (with step 3 this only happens at ``max_length=1``; with ``max_prompt_length`` it never does).

Every kept row that was shortened is counted in ``collator.report().truncated`` under the step's reason
(``completion_max_completion_length``, ``prompt_max_prompt_length``, ``prompt_to_fit``,
``completion_to_fit``; see ``prefopt.data.report.TRUNCATIONS``).

TRL 1.16's ``DPOTrainer`` differs: its default ``truncation_mode="keep_start"`` cuts ``prompt ++ completion``
at ``max_length`` from the right and DROPS rows whose prompt alone fills ``max_length``; the deprecated
``"keep_end"`` keeps the last ``max_length`` tokens of each sequence separately (so chosen and rejected can
see different prompts). Step 3 keeps every such row and one shared prompt per pair instead.

Bad rows are skipped with a reason and a row index (counted in ``collator.stats``, warned on the
``prefopt.data`` logger) or, with ``strict=True``, raise ``ValueError``. A batch in which every row is bad
raises ``ValueError``. An emitted row NEVER has an empty completion mask.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from prefopt.data.report import BadRowError, LoadReport, SkipTally
from prefopt.types import PairBatch, PromptBatch, SharedPromptBatch, UnpairedBatch, check_tensor

__all__ = [
    "PreferenceCollator",
    "PromptCollator",
    "SharedPromptCollator",
    "UnpairedCollator",
    "split_shared_prompt",
]

logger = logging.getLogger("prefopt.data")

Truncation = Literal["keep_end", "keep_start"]


def _check_positive(name: str, value: Any, *, optional: bool) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int{' or None' if optional else ''}, got {value!r}")


def _truncate(ids: list[int], n: int | None, side: str) -> list[int]:
    if n is None or len(ids) <= n:
        return ids
    return ids[len(ids) - n :] if side == "keep_end" else ids[:n]


class _Base:
    """Tokenizer handling shared by the collators."""

    kind = "collator"

    def __init__(
        self,
        tokenizer: Any,
        *,
        max_prompt_length: int | None,
        prompt_truncation: Truncation,
        add_special_tokens: bool,
        pad_to_multiple_of: int | None,
        strict: bool,
    ) -> None:
        if tokenizer is None or not callable(tokenizer):
            raise TypeError(
                "tokenizer must be a callable tokenizer (e.g. transformers.PreTrainedTokenizerFast)"
            )
        _check_positive("max_prompt_length", max_prompt_length, optional=True)
        _check_positive("pad_to_multiple_of", pad_to_multiple_of, optional=True)
        if prompt_truncation not in ("keep_end", "keep_start"):
            raise ValueError(
                f"prompt_truncation must be 'keep_end' or 'keep_start', got {prompt_truncation!r}"
            )
        self.tokenizer = tokenizer
        self.max_prompt_length = max_prompt_length
        self.prompt_truncation = prompt_truncation
        self.add_special_tokens = bool(add_special_tokens)
        self.pad_to_multiple_of = pad_to_multiple_of
        self.strict = bool(strict)
        pad = getattr(tokenizer, "pad_token_id", None)
        eos = getattr(tokenizer, "eos_token_id", None)
        if pad is None:
            pad = eos
        if pad is None:
            raise ValueError("tokenizer has neither a pad token nor an eos token to pad with")
        self.pad_token_id: int = int(pad)
        self.eos_token_id: int | None = None if eos is None else int(eos)
        self.bos_token_id: int | None = getattr(tokenizer, "bos_token_id", None)
        self.stats = SkipTally(self.kind)

    # -- tokenization ---------------------------------------------------------------------------------

    def _ids(self, texts: list[str], *, special: bool) -> list[list[int]]:
        if not texts:
            return []
        enc = self.tokenizer(texts, add_special_tokens=special)
        return [list(map(int, x)) for x in enc["input_ids"]]

    def _prompt_ids(self, prompts: list[str]) -> list[list[int]]:
        out = []
        for ids in self._ids(prompts, special=self.add_special_tokens):
            # a chat-template prompt already starts with BOS; the tokenizer may add a second one
            bos = self.bos_token_id
            while bos is not None and len(ids) >= 2 and ids[0] == bos and ids[1] == bos:
                ids = ids[1:]
            out.append(ids)
        return out

    def _cut_prompt(self, ids: list[int], n: int | None) -> list[int]:
        """The prompt cut to at most ``n`` tokens on the ``prompt_truncation`` side (keep_end keeps a leading
        BOS, then the last ``n - 1`` tokens)."""
        bos = self.bos_token_id
        if n is None or len(ids) <= n:
            return ids
        if self.prompt_truncation == "keep_end" and bos is not None and ids[0] == bos:
            return [bos, *ids[len(ids) - (n - 1) :]] if n > 1 else [bos]
        return _truncate(ids, n, self.prompt_truncation)

    # -- bad rows ---------------------------------------------------------------------------------------

    def _start_batch(self, n_rows: int) -> tuple[dict[str, list[int]], Callable[[BadRowError, int], None]]:
        """Count the batch's rows; return this batch's ``{reason: [batch rows]}`` and a ``bad(err, i)``
        that records (or, with ``strict``, raises on) a bad row ``i`` of the batch."""
        offset = self.stats.rows_seen
        self.stats.rows_seen += n_rows
        skipped: dict[str, list[int]] = {}

        def bad(err: BadRowError, i: int) -> None:
            self._bad(err, i, offset)
            skipped.setdefault(err.reason, []).append(i)

        return skipped, bad

    def _bad(self, bad: BadRowError, index: int, offset: int) -> None:
        if self.strict:
            raise ValueError(f"row {index}: {bad.reason} ({bad.detail})")
        self.stats.skip(bad.reason, offset + index, bad.detail)

    def _finish_batch(self, n_rows: int, kept: int, skipped_here: dict[str, list[int]]) -> None:
        self.stats.rows_kept += kept
        if skipped_here:
            parts = "; ".join(
                f"{r}: {len(ix)} [batch rows {', '.join(map(str, ix[:5]))}]" for r, ix in skipped_here.items()
            )
            logger.warning(
                "prefopt.data: %s skipped %d of %d rows in this batch (%s)",
                type(self).__name__,
                n_rows - kept,
                n_rows,
                parts,
            )
        if kept == 0:
            raise ValueError(
                f"{type(self).__name__}: every row of the batch ({n_rows}) is bad: "
                + "; ".join(f"{r}: {len(ix)}" for r, ix in skipped_here.items())
            )

    def report(self) -> LoadReport:
        """Snapshot of the running counters (row indices count every row this collator has seen)."""
        return self.stats.snapshot()

    def _pad_len(self, n: int) -> int:
        m = self.pad_to_multiple_of
        return n if m is None else -(-n // m) * m


def _row_str(row: Any, key: str) -> str:
    if not isinstance(row, Mapping):
        raise BadRowError("missing_field", f"row must be a dict, got {type(row).__name__}")
    value = row.get(key)
    if not isinstance(value, str):
        raise BadRowError(
            "missing_field",
            f"{key!r} must be a string ({'absent' if key not in row else type(value).__name__})",
        )
    return value


class _CompletionMixin(_Base):
    def _init_completion(self, max_length: int, max_completion_length: int | None, add_eos: bool) -> None:
        _check_positive("max_length", max_length, optional=False)
        _check_positive("max_completion_length", max_completion_length, optional=True)
        if self.max_prompt_length is not None and self.max_prompt_length >= max_length:
            raise ValueError(
                f"max_prompt_length ({self.max_prompt_length}) must be < max_length ({max_length}) "
                "to leave room for the completion"
            )
        if add_eos and self.eos_token_id is None:
            raise ValueError("add_eos=True needs a tokenizer with an eos token")
        self.max_length = max_length
        self.max_completion_length = max_completion_length
        self.add_eos = bool(add_eos)

    def _completion_ids(self, texts: list[str]) -> list[list[int]]:
        """Completion ids (EOS appended with ``add_eos``), NOT yet truncated (see `_fit`)."""
        out = []
        for ids in self._ids(texts, special=False):
            if self.add_eos and (not ids or ids[-1] != self.eos_token_id):
                ids = [*ids, int(self.eos_token_id)]  # type: ignore[arg-type]
            out.append(ids)
        return out

    def _fit(
        self, prompt: list[int], completions: list[list[int]]
    ) -> tuple[list[int], list[list[int]], list[str]]:
        """Steps 1-4 of the module's truncation rules for one row: one prompt, its 1 or 2 completions.

        Returns the cut prompt, the cut completions and the truncation reasons that applied (each once);
        raises [`BadRowError`][prefopt.data.report.BadRowError] when nothing of a completion is left.
        """
        if not prompt:
            raise BadRowError("empty_prompt", "the prompt tokenizes to zero tokens")
        if any(not c for c in completions):  # only without add_eos: its EOS always gives one token
            raise BadRowError("empty_completion", "a completion tokenizes to zero tokens (add_eos=False)")
        cuts: list[str] = []
        m = self.max_completion_length
        if m is not None and any(len(c) > m for c in completions):
            completions = [c[:m] for c in completions]
            cuts.append("completion_max_completion_length")
        longest = max(len(c) for c in completions)
        n = len(prompt)
        if self.max_prompt_length is not None:
            prompt = self._cut_prompt(prompt, self.max_prompt_length)
            if len(prompt) < n:
                cuts.append("prompt_max_prompt_length")
        elif n + longest > self.max_length:
            floor = min(n, max(1, self.max_length // 2))
            prompt = self._cut_prompt(prompt, max(self.max_length - longest, floor))
            if len(prompt) < n:
                cuts.append("prompt_to_fit")
        room = self.max_length - len(prompt)
        if room < 1:
            raise BadRowError(
                "empty_completion_after_truncation",
                f"the prompt alone has {len(prompt)} tokens (max_length {self.max_length})",
            )
        if longest > room:
            completions = [c[:room] for c in completions]
            cuts.append("completion_to_fit")
        return prompt, completions, cuts

    def _record_cuts(self, cuts: list[str]) -> None:
        for reason in cuts:
            self.stats.truncate(reason)

    def _pack(self, seqs: list[tuple[list[int], list[int]]]) -> dict[str, Tensor]:
        """Right-pad ``(prompt_ids, completion_ids)`` rows into input_ids / attention_mask / completion_mask."""
        n = len(seqs)
        t = self._pad_len(max(len(p) + len(c) for p, c in seqs))
        input_ids = torch.full((n, t), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((n, t), dtype=torch.long)
        completion_mask = torch.zeros((n, t), dtype=torch.bool)
        for i, (p, c) in enumerate(seqs):
            lp, lc = len(p), len(c)
            input_ids[i, : lp + lc] = torch.tensor(p + c, dtype=torch.long)
            attention_mask[i, : lp + lc] = 1
            completion_mask[i, lp : lp + lc] = True
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "completion_mask": completion_mask,
            "prompt_len": torch.tensor([len(p) for p, _ in seqs], dtype=torch.long),
            "completion_len": torch.tensor([len(c) for _, c in seqs], dtype=torch.long),
        }


class PreferenceCollator(_CompletionMixin):
    """Rows ``{prompt, chosen, rejected}`` (strings) → one batch of ``2B`` sequences, chosen first.

    Args:
        tokenizer: a Hugging Face tokenizer (called as ``tokenizer(list_of_str, add_special_tokens=...)``).
        max_length: maximum total length ``len(prompt) + len(completion)`` of a row (default 512).
        max_prompt_length: fixed cap on the prompt alone (must be ``< max_length``; the completions then get
            whatever ``max_length`` leaves). ``None`` (default): the prompt is cut only when the pair does not
            fit ``max_length``, and then before the completions (step 3 of the module docstring).
        max_completion_length: cap on each completion alone (``None``: no separate cap).
        prompt_truncation: which end of an over-long prompt to keep, ``"keep_end"`` (default: the tokens next
            to the completion, as a chat turn needs) or ``"keep_start"``.
        add_eos: append ``eos_token_id`` to each completion unless it already ends with it (default True).
        add_special_tokens: let the tokenizer add its special tokens (BOS) to the PROMPT (default True; a
            doubled leading BOS, e.g. from a chat template, is collapsed to one). Completions never get any.
        pad_to_multiple_of: round the padded length up to a multiple of this.
        strict: raise ``ValueError("row i: reason (detail)")`` on a bad row instead of skipping it.

    Returns (``__call__``) a [`PairBatch`][prefopt.types.PairBatch], ``B`` = number of kept pairs,
    ``T`` = padded length:
        ``input_ids`` ``(2B, T)`` long, right-padded with ``pad_token_id`` (eos when there is no pad token);
        ``attention_mask`` ``(2B, T)`` long; ``completion_mask`` ``(2B, T)`` bool;
        ``prompt_len`` / ``completion_len`` ``(2B,)`` long; ``row_index`` ``(B,)`` long: the position in the
        input list of each kept pair (to align per-pair side data such as precomputed reference log-probs).

    Bad rows: ``missing_field``, ``identical`` (chosen text == rejected text), ``empty_completion``
    (empty/whitespace text), ``empty_prompt`` (zero prompt tokens), ``empty_completion_after_truncation``,
    ``identical_after_truncation`` (equal ids after truncation: the pair carries no signal).
    ``collator.stats`` counts them over all calls; indices there are global (rows seen before this batch
    plus the position in the batch). ``collator.report().truncated`` counts the kept pairs that were
    shortened, by reason.
    """

    kind = "PreferenceCollator"

    def __init__(
        self,
        tokenizer: Any,
        *,
        max_length: int = 512,
        max_prompt_length: int | None = None,
        max_completion_length: int | None = None,
        prompt_truncation: Truncation = "keep_end",
        add_eos: bool = True,
        add_special_tokens: bool = True,
        pad_to_multiple_of: int | None = None,
        strict: bool = False,
    ) -> None:
        super().__init__(
            tokenizer,
            max_prompt_length=max_prompt_length,
            prompt_truncation=prompt_truncation,
            add_special_tokens=add_special_tokens,
            pad_to_multiple_of=pad_to_multiple_of,
            strict=strict,
        )
        self._init_completion(max_length, max_completion_length, add_eos)

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> PairBatch:
        if isinstance(rows, Mapping) or not isinstance(rows, Sequence) or len(rows) == 0:
            raise ValueError("rows must be a non-empty list of dicts with prompt/chosen/rejected")
        skipped, bad = self._start_batch(len(rows))
        texts: list[tuple[int, str, str, str]] = []
        for i, row in enumerate(rows):
            try:
                p, c, r = _row_str(row, "prompt"), _row_str(row, "chosen"), _row_str(row, "rejected")
                if c == r:
                    raise BadRowError("identical", "chosen == rejected")
                for name, text in (("chosen", c), ("rejected", r)):
                    if not text.strip():
                        raise BadRowError("empty_completion", f"{name} is empty")
            except BadRowError as err:
                bad(err, i)
                continue
            texts.append((i, p, c, r))
        prompts = self._prompt_ids([t[1] for t in texts])
        chosen = self._completion_ids([t[2] for t in texts])
        rejected = self._completion_ids([t[3] for t in texts])
        kept: list[tuple[int, list[int], list[int], list[int]]] = []
        for (i, *_), p_ids, c_ids, r_ids in zip(texts, prompts, chosen, rejected):
            try:
                p_ids, (c_ids, r_ids), cuts = self._fit(p_ids, [c_ids, r_ids])
                if c_ids == r_ids:
                    raise BadRowError("identical_after_truncation", f"both are the same {len(c_ids)} tokens")
            except BadRowError as err:
                bad(err, i)
                continue
            self._record_cuts(cuts)
            kept.append((i, p_ids, c_ids, r_ids))
        self._finish_batch(len(rows), len(kept), skipped)
        batch = self._pack([(p, c) for _, p, c, _ in kept] + [(p, r) for _, p, _, r in kept])
        return PairBatch(**batch, row_index=torch.tensor([i for i, *_ in kept], dtype=torch.long))


class UnpairedCollator(_CompletionMixin):
    """Rows ``{prompt, completion, label}`` → one right-padded batch of ``B`` sequences (KTO, pointwise RM).

    Same tokenization, truncation and bad-row rules as
    [`PreferenceCollator`][prefopt.data.collate.PreferenceCollator] (minus the pair checks), plus
    ``bad_label`` for a label that is not a finite number or a bool.

    Returns an [`UnpairedBatch`][prefopt.types.UnpairedBatch]: ``input_ids`` / ``attention_mask`` ``(B, T)`` long, ``completion_mask`` ``(B, T)`` bool,
    ``prompt_len`` / ``completion_len`` ``(B,)`` long, ``row_index`` ``(B,)`` long,
    ``label`` ``(B,)`` float32 (bool → 1.0 / 0.0) and ``desirable`` ``(B,)`` bool ``= label >= threshold``.
    """

    kind = "UnpairedCollator"

    def __init__(
        self,
        tokenizer: Any,
        *,
        max_length: int = 512,
        max_prompt_length: int | None = None,
        max_completion_length: int | None = None,
        prompt_truncation: Truncation = "keep_end",
        add_eos: bool = True,
        add_special_tokens: bool = True,
        pad_to_multiple_of: int | None = None,
        threshold: float = 0.5,
        strict: bool = False,
    ) -> None:
        super().__init__(
            tokenizer,
            max_prompt_length=max_prompt_length,
            prompt_truncation=prompt_truncation,
            add_special_tokens=add_special_tokens,
            pad_to_multiple_of=pad_to_multiple_of,
            strict=strict,
        )
        self._init_completion(max_length, max_completion_length, add_eos)
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or math.isnan(threshold):
            raise ValueError(f"threshold must be a number, got {threshold!r}")
        self.threshold = float(threshold)

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> UnpairedBatch:
        if isinstance(rows, Mapping) or not isinstance(rows, Sequence) or len(rows) == 0:
            raise ValueError("rows must be a non-empty list of dicts with prompt/completion/label")
        skipped, bad = self._start_batch(len(rows))
        texts: list[tuple[int, str, str, float]] = []
        for i, row in enumerate(rows):
            try:
                p, c = _row_str(row, "prompt"), _row_str(row, "completion")
                if not c.strip():
                    raise BadRowError("empty_completion", "completion is empty")
                y = row.get("label")
                if isinstance(y, (int, float)) and math.isfinite(y):
                    y = float(y)
                else:
                    raise BadRowError("bad_label", f"label must be a finite number or a bool, got {y!r}")
            except BadRowError as err:
                bad(err, i)
                continue
            texts.append((i, p, c, y))
        prompts = self._prompt_ids([t[1] for t in texts])
        completions = self._completion_ids([t[2] for t in texts])
        kept: list[tuple[int, list[int], list[int], float]] = []
        for (i, _, _, y), p_ids, c_ids in zip(texts, prompts, completions):
            try:
                p_ids, (c_ids,), cuts = self._fit(p_ids, [c_ids])
            except BadRowError as err:
                bad(err, i)
                continue
            self._record_cuts(cuts)
            kept.append((i, p_ids, c_ids, y))
        self._finish_batch(len(rows), len(kept), skipped)
        batch = self._pack([(p, c) for _, p, c, _ in kept])
        label = torch.tensor([y for *_, y in kept], dtype=torch.float32)
        return UnpairedBatch(
            **batch,
            row_index=torch.tensor([i for i, *_ in kept], dtype=torch.long),
            label=label,
            desirable=label >= self.threshold,
        )


class PromptCollator(_Base):
    """Prompts (strings, or dicts with a ``prompt`` string) → a LEFT-padded batch for sampling.

    Args:
        tokenizer: a Hugging Face tokenizer.
        max_prompt_length: cap on the prompt length in tokens (``None``: no cap).
        prompt_truncation: ``"keep_end"`` (default: keep the last tokens, nearest the generation) or
            ``"keep_start"``.
        add_special_tokens: let the tokenizer add BOS (doubled BOS collapsed, as in
            [`PreferenceCollator`][prefopt.data.collate.PreferenceCollator]).
        pad_to_multiple_of: as in [`PreferenceCollator`][prefopt.data.collate.PreferenceCollator].
        strict: as in [`PreferenceCollator`][prefopt.data.collate.PreferenceCollator].

    Returns a [`PromptBatch`][prefopt.types.PromptBatch]: ``input_ids`` ``(B, T)`` long, ``attention_mask``
    ``(B, T)`` long, ``prompt_len`` ``(B,)`` long, ``row_index`` ``(B,)`` long, ``prompt`` (tuple of str); padding sits on the LEFT, so ``input_ids[:, -1]`` is every
    prompt's last token and ``model.generate`` continues all rows from column ``T``. Bad rows:
    ``missing_field``, ``empty_prompt`` (zero tokens: nothing to condition on).
    """

    kind = "PromptCollator"

    def __init__(
        self,
        tokenizer: Any,
        *,
        max_prompt_length: int | None = None,
        prompt_truncation: Truncation = "keep_end",
        add_special_tokens: bool = True,
        pad_to_multiple_of: int | None = None,
        strict: bool = False,
    ) -> None:
        super().__init__(
            tokenizer,
            max_prompt_length=max_prompt_length,
            prompt_truncation=prompt_truncation,
            add_special_tokens=add_special_tokens,
            pad_to_multiple_of=pad_to_multiple_of,
            strict=strict,
        )

    def __call__(self, rows: Sequence[str | Mapping[str, Any]]) -> PromptBatch:
        if isinstance(rows, (str, Mapping)) or not isinstance(rows, Sequence) or len(rows) == 0:
            raise ValueError("rows must be a non-empty list of prompt strings or dicts with a 'prompt'")
        skipped, bad = self._start_batch(len(rows))
        texts: list[tuple[int, str]] = []
        for i, row in enumerate(rows):
            try:
                texts.append((i, row if isinstance(row, str) else _row_str(row, "prompt")))
            except BadRowError as err:
                bad(err, i)
        kept: list[tuple[int, str, list[int]]] = []
        for (i, text), ids in zip(texts, self._prompt_ids([t for _, t in texts])):
            n = len(ids)
            ids = self._cut_prompt(ids, self.max_prompt_length)
            if len(ids) < n:
                self.stats.truncate("prompt_max_prompt_length")
            if not ids:
                bad(BadRowError("empty_prompt", "the prompt tokenizes to zero tokens"), i)
                continue
            kept.append((i, text, ids))
        self._finish_batch(len(rows), len(kept), skipped)
        t = self._pad_len(max(len(ids) for *_, ids in kept))
        input_ids = torch.full((len(kept), t), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(kept), t), dtype=torch.long)
        for k, (*_, ids) in enumerate(kept):
            input_ids[k, t - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            attention_mask[k, t - len(ids) :] = 1
        return PromptBatch(
            input_ids=input_ids,
            attention_mask=attention_mask,
            prompt_len=torch.tensor([len(ids) for *_, ids in kept], dtype=torch.long),
            row_index=torch.tensor([i for i, *_ in kept], dtype=torch.long),
            prompt=tuple(text for _, text, _ in kept),
        )


# --------------------------------------------------------------------------------------------------------------
# Shared-prompt layout
# --------------------------------------------------------------------------------------------------------------


def _field(batch: PairBatch | Mapping[str, Tensor], name: str, *, required: bool = True) -> Any:
    if isinstance(batch, PairBatch):
        return getattr(batch, name)
    if required and name not in batch:
        raise KeyError(f"batch is missing {name!r} (has {sorted(batch)})")
    return batch.get(name)


def split_shared_prompt(batch: PairBatch | Mapping[str, Tensor]) -> SharedPromptBatch:
    """A duplicated-layout batch (``2B`` rows ``prompt ++ completion``) → the shared-prompt layout.

    Args:
        batch: a [`PairBatch`][prefopt.types.PairBatch] (from [`PreferenceCollator`][prefopt.data.collate.PreferenceCollator]),
            or a dict with its keys ``input_ids``, ``attention_mask``, bool ``completion_mask`` ``(2B, T)`` and
            ``prompt_len`` ``(2B,)`` (``completion_len`` and ``row_index`` optional), right-padded; row
            ``B + i`` must have the same prompt ids as row ``i``. Completion tokens are the ``completion_len``
            tokens after the prompt (derived from ``attention_mask`` when absent).

    Returns:
        a [`SharedPromptBatch`][prefopt.types.SharedPromptBatch]: ``prompt_ids`` / ``prompt_mask`` ``(B, P)``
        long (right-padded, ``P = max prompt_len``), ``prompt_len`` ``(B,)``; ``completion_ids`` /
        ``completion_attention_mask`` ``(2B, C)`` long, ``completion_mask`` ``(2B, C)`` bool (the input's
        ``completion_mask`` moved to completion coordinates), ``completion_len`` ``(2B,)``; ``row_index`` passed
        through (``0..B-1`` when absent); ``duplicated`` is ``None``.

    Raises:
        KeyError / ValueError: a missing key, an odd row count, padding not on the right, or chosen and
            rejected rows whose prompts differ.
    """
    if not isinstance(batch, (PairBatch, Mapping)):
        raise TypeError(f"batch must be a PairBatch (or a dict of tensors), got {type(batch).__name__}")
    ids, am, cm, plen = (
        _field(batch, k) for k in ("input_ids", "attention_mask", "completion_mask", "prompt_len")
    )
    check_tensor("batch.input_ids", ids, ndim=2, floating=False)
    n, t = ids.shape
    if n == 0 or n % 2:
        raise ValueError(f"batch.input_ids must have an even, non-zero number of rows, got {n}")
    if am.shape != ids.shape or cm.shape != ids.shape:
        raise ValueError("batch.attention_mask and batch.completion_mask must have input_ids' shape")
    if cm.dtype != torch.bool:
        raise TypeError(f"batch.completion_mask must be bool, got {cm.dtype}")
    m = am.long()
    if t > 1 and not bool((m[:, 1:] <= m[:, :-1]).all()):
        raise ValueError("batch.attention_mask must be right-padded (ones then zeros in every row)")
    plen = plen.long()
    total = m.sum(1)
    if plen.shape != (n,) or bool((plen < 1).any()) or bool((plen > total).any()):
        raise ValueError("batch.prompt_len must be (2B,) with 1 <= prompt_len <= number of real tokens")
    clen_given = _field(batch, "completion_len", required=False)
    clen = total - plen if clen_given is None else clen_given.long()
    if bool((plen + clen != total).any()):
        raise ValueError(
            "batch.prompt_len + batch.completion_len must equal the real-token count of each row"
        )
    b = n // 2
    if not torch.equal(plen[:b], plen[b:]):
        raise ValueError("chosen row i and rejected row B + i must have the same prompt_len")
    p_max = int(plen.max())
    cols = torch.arange(p_max, device=ids.device)
    prompt_mask = (cols[None] < plen[:b, None]).long()
    prompt_ids = ids[:b, :p_max] * prompt_mask
    if not torch.equal(ids[b:, :p_max] * prompt_mask, prompt_ids):
        raise ValueError("chosen row i and rejected row B + i must share the same prompt ids")
    if bool((cm & (torch.arange(t, device=ids.device)[None] < plen[:, None])).any()):
        raise ValueError("batch.completion_mask is True on a prompt token")
    c_max = max(int(clen.max()), 1)
    j = torch.arange(c_max, device=ids.device)
    src = (plen[:, None] + j[None]).clamp(max=t - 1)
    c_att = j[None] < clen[:, None]
    row_index = _field(batch, "row_index", required=False)
    return SharedPromptBatch(
        prompt_ids=prompt_ids.long(),
        prompt_mask=prompt_mask,
        prompt_len=plen[:b].clone(),
        completion_ids=(ids.gather(1, src) * c_att).long(),
        completion_attention_mask=c_att.long(),
        completion_mask=cm.gather(1, src) & c_att,
        completion_len=clen.clone(),
        row_index=torch.arange(b, device=ids.device) if row_index is None else row_index,
    )


class SharedPromptCollator:
    """Rows ``{prompt, chosen, rejected}`` → a [`SharedPromptBatch`][prefopt.types.SharedPromptBatch] (each
    prompt once, ``2B`` completion rows, chosen first).

    Tokenization, truncation and bad-row handling are exactly [`PreferenceCollator`][prefopt.data.collate.PreferenceCollator]'s
    (same keyword arguments; the inner collator is ``self.collator``, its counters ``self.stats``); the
    duplicated batch is then split by [`split_shared_prompt`][prefopt.data.collate.split_shared_prompt]. With
    ``keep_duplicated=True`` the duplicated [`PairBatch`][prefopt.types.PairBatch] is kept as
    ``batch.duplicated``.
    """

    def __init__(self, tokenizer: Any, *, keep_duplicated: bool = False, **kwargs: Any) -> None:
        self.collator = PreferenceCollator(tokenizer, **kwargs)
        self.keep_duplicated = bool(keep_duplicated)

    @property
    def stats(self) -> SkipTally:
        return self.collator.stats

    def report(self) -> LoadReport:
        """Snapshot of the inner collator's running counters."""
        return self.collator.report()

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> SharedPromptBatch:
        dup = self.collator(rows)
        out = split_shared_prompt(dup)
        return dataclasses.replace(out, duplicated=dup) if self.keep_duplicated else out
