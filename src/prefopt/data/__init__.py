"""Preference data: loaders for the common formats, collators for pairs / prompts / unpaired rows, and a
small built-in pair set. See ``docs/data.md`` for the formats table, the batch layout and the bad-row policy.

``transformers`` is never imported here: tokenizers come in as arguments.
"""

from __future__ import annotations

from importlib import resources

import datasets

from prefopt.data.collate import (
    PreferenceCollator,
    PromptCollator,
    SharedPromptCollator,
    UnpairedCollator,
    split_shared_prompt,
)
from prefopt.data.formats import (
    DEFAULT_MARKER,
    detect_format,
    load_pointwise,
    load_preferences,
    load_unpaired,
    pairs_from_pointwise,
    read_rows,
    render_taskmaster_context,
    render_taskmaster_turn,
    split_conversation,
    split_implicit_prompt,
    unpaired_from_pairs,
)
from prefopt.data.report import REASONS, LoadReport, SkipTally

__all__ = [
    "DEFAULT_MARKER",
    "REASONS",
    "LoadReport",
    "PreferenceCollator",
    "PromptCollator",
    "SharedPromptCollator",
    "SkipTally",
    "UnpairedCollator",
    "builtin_pairs_path",
    "detect_format",
    "load_builtin_pairs",
    "load_pointwise",
    "load_preferences",
    "load_unpaired",
    "pairs_from_pointwise",
    "read_rows",
    "render_taskmaster_context",
    "render_taskmaster_turn",
    "split_conversation",
    "split_implicit_prompt",
    "split_shared_prompt",
    "unpaired_from_pairs",
]


def builtin_pairs_path() -> str:
    """Filesystem path of ``prefopt/data/builtin/pairs.jsonl`` (shipped as package data)."""
    return str(resources.files("prefopt.data").joinpath("builtin", "pairs.jsonl"))


def load_builtin_pairs() -> datasets.Dataset:
    """The built-in preference set: 40 short explicit pairs written for prefopt (columns prompt/chosen/rejected).

    Prompts are ``"Question: ...\\nAnswer:"``; completions start with a space and are at most a few dozen
    tokens. Kinds of pair: a correct vs a wrong factual answer that share most tokens and differ in one or a
    few (``" ... is Paris."`` vs ``" ... is Lyon."``, the case where gradient entanglement shows), a correct
    answer vs an evasive/unhelpful one, and helpful vs harmful or wrong instructions. Loaded with
    ``strict=True``: every row is valid.
    """
    return load_preferences(builtin_pairs_path(), format="explicit", strict=True)
