"""Collators: lists of string rows → padded token batches.

Layout of a :class:`PreferenceCollator` batch for ``B`` kept pairs (``P`` prompt, ``C`` chosen, ``R`` rejected,
``e`` EOS, ``.`` padding; right padding)::

    row 0      P P P P C C C e . .     completion_mask  0 0 0 0 1 1 1 1 0 0
    ...        (B chosen rows)
    row B      P P P P R R e . . .     completion_mask  0 0 0 0 1 1 1 0 0 0
    ...        (B rejected rows; row B + i is the rejected twin of row i)

``completion_mask[:, i]`` is True where ``input_ids[:, i]`` is a completion token that counts; it is never
True at position 0 (a token at position 0 has no context to be predicted from), which is why a prompt that
tokenizes to nothing is a bad row.

Prompt and completion are tokenized SEPARATELY and their ids concatenated, so the prompt/completion
boundary is exact (no merge across it). Truncation, in this order:

1. a completion longer than ``max_completion_length`` keeps its first tokens;
2. a prompt longer than ``max_prompt_length`` keeps its last tokens (``prompt_truncation="keep_end"``,
   default; a leading BOS is kept too, followed by the last ``max_prompt_length - 1`` tokens) or its first
   (``"keep_start"``);
3. if ``len(prompt) + len(completion) > max_length``, the completion keeps its first
   ``max_length - len(prompt)`` tokens; nothing left → bad row ``empty_completion_after_truncation``.
   (So set ``max_prompt_length < max_length`` to guarantee room for the completions.)

Bad rows are skipped with a reason and a row index (counted in ``collator.stats``, warned on the
``prefopt.data`` logger) or, with ``strict=True``, raise ``ValueError``. A batch in which every row is bad
raises ``ValueError``. An emitted row NEVER has an empty completion mask.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from prefopt.data.report import BadRowError, LoadReport, SkipTally

__all__ = ["PreferenceCollator", "PromptCollator", "UnpairedCollator"]

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
            n = self.max_prompt_length
            if (
                n is not None
                and len(ids) > n
                and self.prompt_truncation == "keep_end"
                and bos is not None
                and ids[0] == bos
            ):
                ids = [bos, *ids[len(ids) - (n - 1) :]]  # keep the leading BOS, then the last n - 1 tokens
            else:
                ids = _truncate(ids, n, self.prompt_truncation)
            out.append(ids)
        return out

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
        out = []
        for ids in self._ids(texts, special=False):
            if self.add_eos and (not ids or ids[-1] != self.eos_token_id):
                ids = [*ids, int(self.eos_token_id)]  # type: ignore[arg-type]
            out.append(_truncate(ids, self.max_completion_length, "keep_start"))
        return out

    def _fit(self, prompt: list[int], completion: list[int]) -> list[int]:
        """Step 3 of the truncation rules: the completion gives way to the (already bounded) prompt."""
        if not prompt:
            raise BadRowError("empty_prompt", "the prompt tokenizes to zero tokens")
        room = self.max_length - len(prompt)
        if room < 1:
            raise BadRowError(
                "empty_completion_after_truncation", f"the prompt alone has {len(prompt)} tokens"
            )
        return completion[:room]

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
        max_prompt_length: cap on the prompt alone (``None``: no separate cap; must be ``< max_length``).
        max_completion_length: cap on each completion alone (``None``: no separate cap).
        prompt_truncation: which end of an over-long prompt to keep, ``"keep_end"`` (default) or ``"keep_start"``.
        add_eos: append ``eos_token_id`` to each completion unless it already ends with it (default True).
        add_special_tokens: let the tokenizer add its special tokens (BOS) to the PROMPT (default True; a
            doubled leading BOS, e.g. from a chat template, is collapsed to one). Completions never get any.
        pad_to_multiple_of: round the padded length up to a multiple of this.
        strict: raise ``ValueError("row i: reason (detail)")`` on a bad row instead of skipping it.

    Returns (``__call__``) a dict of tensors, ``B`` = number of kept pairs, ``T`` = padded length:
        ``input_ids`` ``(2B, T)`` long, right-padded with ``pad_token_id`` (eos when there is no pad token);
        ``attention_mask`` ``(2B, T)`` long; ``completion_mask`` ``(2B, T)`` bool;
        ``prompt_len`` / ``completion_len`` ``(2B,)`` long; ``row_index`` ``(B,)`` long: the position in the
        input list of each kept pair (to align per-pair side data such as precomputed reference log-probs).

    Bad rows: ``missing_field``, ``identical`` (chosen text == rejected text), ``empty_completion``
    (empty/whitespace text), ``empty_prompt`` (zero prompt tokens), ``empty_completion_after_truncation``,
    ``identical_after_truncation`` (equal ids after truncation: the pair carries no signal).
    ``collator.stats`` counts them over all calls; indices there are global (rows seen before this batch
    plus the position in the batch).
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

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, Tensor]:
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
                c_ids, r_ids = self._fit(p_ids, c_ids), self._fit(p_ids, r_ids)
                if c_ids == r_ids:
                    raise BadRowError("identical_after_truncation", f"both are the same {len(c_ids)} tokens")
            except BadRowError as err:
                bad(err, i)
                continue
            kept.append((i, p_ids, c_ids, r_ids))
        self._finish_batch(len(rows), len(kept), skipped)
        batch = self._pack([(p, c) for _, p, c, _ in kept] + [(p, r) for _, p, _, r in kept])
        batch["row_index"] = torch.tensor([i for i, *_ in kept], dtype=torch.long)
        return batch


class UnpairedCollator(_CompletionMixin):
    """Rows ``{prompt, completion, label}`` → one right-padded batch of ``B`` sequences (KTO, pointwise RM).

    Same tokenization, truncation and bad-row rules as :class:`PreferenceCollator` (minus the pair checks),
    plus ``bad_label`` for a label that is not a finite number or a bool.

    Returns ``input_ids`` / ``attention_mask`` ``(B, T)`` long, ``completion_mask`` ``(B, T)`` bool,
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

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, Tensor]:
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
                c_ids = self._fit(p_ids, c_ids)
            except BadRowError as err:
                bad(err, i)
                continue
            kept.append((i, p_ids, c_ids, y))
        self._finish_batch(len(rows), len(kept), skipped)
        batch = self._pack([(p, c) for _, p, c, _ in kept])
        batch["row_index"] = torch.tensor([i for i, *_ in kept], dtype=torch.long)
        batch["label"] = torch.tensor([y for *_, y in kept], dtype=torch.float32)
        batch["desirable"] = batch["label"] >= self.threshold
        return batch


class PromptCollator(_Base):
    """Prompts (strings, or dicts with a ``prompt`` string) → a LEFT-padded batch for sampling.

    Args:
        tokenizer: a Hugging Face tokenizer.
        max_prompt_length: cap on the prompt length in tokens (``None``: no cap).
        prompt_truncation: ``"keep_end"`` (default: keep the last tokens, nearest the generation) or
            ``"keep_start"``.
        add_special_tokens: let the tokenizer add BOS (doubled BOS collapsed, as in :class:`PreferenceCollator`).
        pad_to_multiple_of, strict: as in :class:`PreferenceCollator`.

    Returns ``{"input_ids": (B, T) long, "attention_mask": (B, T) long, "prompt_len": (B,) long,
    "row_index": (B,) long, "prompt": list[str]}``; padding sits on the LEFT, so ``input_ids[:, -1]`` is every
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

    def __call__(self, rows: Sequence[str | Mapping[str, Any]]) -> dict[str, Any]:
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
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "prompt_len": torch.tensor([len(ids) for *_, ids in kept], dtype=torch.long),
            "row_index": torch.tensor([i for i, *_ in kept], dtype=torch.long),
            "prompt": [text for _, text, _ in kept],
        }
