"""Small frozen dataclasses of tensors that flow between prefopt's layers.

Vocabulary (see `docs/glossary.md`): `logp` per token `(b, t)`; `seq_logp` per sequence `(b,)`;
prefixes `ref_`, `old_`, `anchor_`; `chosen` / `rejected` for pairs. All log-probs are natural logs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "BestOfNSamples",
    "LossOutput",
    "PairBatch",
    "PairLogps",
    "PromptBatch",
    "SharedPromptBatch",
    "UnpairedBatch",
    "UnpairedLogps",
    "check_finite",
    "check_mask",
    "check_tensor",
    "unpack_pair_batch",
]


def check_tensor(name: str, x: Any, *, ndim: int | None = None, floating: bool = True) -> Tensor:
    """Raise a `TypeError`/`ValueError` naming `name` unless `x` is a tensor of the expected kind."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if ndim is not None and x.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimension(s), got shape {tuple(x.shape)}")
    if floating and not torch.is_floating_point(x):
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    return x


def check_mask(name: str, mask: Any, shape: tuple[int, ...], like: str) -> Tensor:
    """Raise a `TypeError`/`ValueError` naming `name` unless `mask` is a bool tensor of `shape`
    (the shape of the tensor called `like`). The one mask convention: True = "this element counts"."""
    if not isinstance(mask, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor (True = counts), got dtype {mask.dtype}")
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(mask.shape)} but {like} has shape {tuple(shape)}")
    return mask


def check_finite(name: str, x: Tensor | None) -> None:
    """Raise `ValueError` naming `name` if `x` holds a NaN or an infinity (synchronizes the device)."""
    if x is None:
        return
    if torch.is_floating_point(x) and not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise ValueError(f"{name} has {bad} non-finite value(s) (NaN or inf)")


def _upcast(x: Tensor | None) -> Tensor | None:
    """Half-precision tensors become float32 (differentiably); float32/float64 stay as they are."""
    if x is None:
        return None
    if torch.is_floating_point(x) and x.dtype not in (torch.float32, torch.float64):
        return x.float()
    return x


class _TensorFields:
    """Shared helpers for the dataclasses below (validation, upcasting, finiteness)."""

    def _tensor_items(self) -> list[tuple[str, Tensor]]:
        return [
            (f.name, getattr(self, f.name))
            for f in dataclasses.fields(self)  # type: ignore[arg-type]
            if isinstance(getattr(self, f.name), Tensor)
        ]

    def check_finite(self) -> None:
        """Raise `ValueError` naming the first field that holds a NaN or an infinity."""
        for name, value in self._tensor_items():
            check_finite(name, value)

    def upcast(self):  # type: ignore[no-untyped-def]
        """A copy whose half-precision fields are float32 (differentiable); fp32/fp64 are kept."""
        changes = {
            name: _upcast(value) for name, value in self._tensor_items() if torch.is_floating_point(value)
        }
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]

    def to(self, device: torch.device | str):  # type: ignore[no-untyped-def]
        """A copy with every tensor field moved to `device` (nested batches too)."""
        changes: dict[str, Any] = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if isinstance(value, (Tensor, _TensorFields)):
                changes[f.name] = value.to(device)
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]


@dataclass(frozen=True)
class PairLogps(_TensorFields):
    """Sequence log-probabilities of preference pairs, the input of every pairwise loss.

    Shapes: every field is `(b,)`, one entry per pair.

    Attributes:
        chosen: policy `S(y_w) = Σ_t m_t log π_θ(y_w,t | x, y_w,<t)` summed over completion tokens.
        rejected: policy `S(y_l)`.
        ref_chosen: reference `S_ref(y_w)`; `None` for reference-free losses.
        ref_rejected: reference `S_ref(y_l)`; `None` for reference-free losses.
        chosen_len: number of completion tokens `|y_w|` (float or integer tensor, `>= 0`; checked on
            construction for CPU tensors, not on a GPU, where it would synchronize); `None` if unused.
        rejected_len: `|y_l|`.

    Shapes and dtypes are checked on construction; finiteness only on request
    (`check_finite()`, or `check_finite=True` when calling a loss) because it synchronizes the device.
    """

    chosen: Tensor
    rejected: Tensor
    ref_chosen: Tensor | None = None
    ref_rejected: Tensor | None = None
    chosen_len: Tensor | None = None
    rejected_len: Tensor | None = None

    def __post_init__(self) -> None:
        check_tensor("chosen", self.chosen, ndim=1)
        shape = self.chosen.shape
        for name in ("rejected", "ref_chosen", "ref_rejected", "chosen_len", "rejected_len"):
            value = getattr(self, name)
            if value is None:
                continue
            check_tensor(name, value, floating=not name.endswith("_len"))
            if value.shape != shape:
                raise ValueError(
                    f"{name} has shape {tuple(value.shape)} but chosen has shape {tuple(shape)}; "
                    "every field of PairLogps must be (b,)"
                )
            if value.device != self.chosen.device:
                raise ValueError(f"{name} is on {value.device} but chosen is on {self.chosen.device}")
            # token counts must be >= 0; checked for CPU tensors only (a value check would sync a GPU)
            counts = name.endswith("_len") and value.device.type == "cpu" and not value.is_complex()
            if counts and bool((~(value >= 0)).any()):  # negative or NaN
                bad = value[~(value >= 0)][:3].tolist()
                raise ValueError(f"{name} must hold token counts >= 0, got {bad}")
        if (self.ref_chosen is None) != (self.ref_rejected is None):
            raise ValueError("ref_chosen and ref_rejected must be given together (or both None)")
        if (self.chosen_len is None) != (self.rejected_len is None):
            raise ValueError("chosen_len and rejected_len must be given together (or both None)")

    @property
    def has_reference(self) -> bool:
        return self.ref_chosen is not None

    @property
    def has_lengths(self) -> bool:
        return self.chosen_len is not None

    def upcast(self) -> PairLogps:
        out = super().upcast()
        # lengths are used as divisors: make them the same float dtype as the log-probs
        if self.chosen_len is not None and self.rejected_len is not None:
            dtype = out.chosen.dtype
            out = dataclasses.replace(
                out, chosen_len=self.chosen_len.to(dtype), rejected_len=self.rejected_len.to(dtype)
            )
        return out


@dataclass(frozen=True)
class UnpairedLogps(_TensorFields):
    """Sequence log-probabilities of unpaired, labelled completions (KTO).

    Shapes: `(b,)` each.

    Attributes:
        logp: policy `S(y_i)` of completion `i` given its own prompt.
        ref_logp: reference `S_ref(y_i)`.
        desirable: bool `(b,)`, True where the completion is desirable (thumbs up).
        kl_logp: policy log-prob of *mismatched* (prompt, completion) pairs `S(y'_j; x_i)`, used for
            the batch KL reference point `z0`; `None` gives `z0 = 0`.
        kl_ref_logp: reference log-prob of the same mismatched pairs.
        length: completion token counts (optional).
    """

    logp: Tensor
    ref_logp: Tensor
    desirable: Tensor
    kl_logp: Tensor | None = None
    kl_ref_logp: Tensor | None = None
    length: Tensor | None = None

    def __post_init__(self) -> None:
        check_tensor("logp", self.logp, ndim=1)
        check_tensor("ref_logp", self.ref_logp, ndim=1)
        check_tensor("desirable", self.desirable, floating=False)
        if self.length is not None:
            check_tensor("length", self.length, floating=False)
        if self.desirable.dtype != torch.bool:
            raise TypeError(f"desirable must be a bool tensor, got dtype {self.desirable.dtype}")
        for name in ("ref_logp", "desirable", "length"):
            value = getattr(self, name)
            if value is not None and value.shape != self.logp.shape:
                raise ValueError(
                    f"{name} has shape {tuple(value.shape)} but logp has shape {tuple(self.logp.shape)}"
                )
        if (self.kl_logp is None) != (self.kl_ref_logp is None):
            raise ValueError("kl_logp and kl_ref_logp must be given together (or both None)")
        if self.kl_logp is not None and self.kl_ref_logp is not None:
            check_tensor("kl_logp", self.kl_logp, ndim=1)
            check_tensor("kl_ref_logp", self.kl_ref_logp, ndim=1)
            if self.kl_ref_logp.shape != self.kl_logp.shape:
                raise ValueError(
                    f"kl_ref_logp has shape {tuple(self.kl_ref_logp.shape)} but kl_logp has shape "
                    f"{tuple(self.kl_logp.shape)}"
                )


@dataclass(frozen=True)
class LossOutput:
    """What every prefopt loss returns.

    Attributes:
        loss: **unreduced** loss, one value per pair / sequence `(b,)` or per token `(b, t)`.
            Reduce it yourself (`prefopt.masked` has reductions that are invariant to how a batch is
            split across micro-batches or ranks).
        metrics: detached tensors with documented meanings (per example unless the loss documents
            otherwise), e.g. `rewards/chosen`, `rewards/margins`, `logps/chosen`.
    """

    loss: Tensor
    metrics: Mapping[str, Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_tensor("loss", self.loss)
        for key, value in self.metrics.items():
            if not isinstance(value, Tensor):
                raise TypeError(f"metric {key!r} must be a tensor, got {type(value).__name__}")
            if value.requires_grad:
                raise ValueError(f"metric {key!r} must be detached")


# ----------------------------------------------------------------------------------------------------------
# Best-of-N samples
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BestOfNSamples(_TensorFields):
    """Per-sample inputs of the Best-of-N distillation losses (BOND, J-BOND and the rest of the family).

    One row per policy sample `y_i` of prompt `x_i`. The *pool* is `k` samples of the same prompt from
    the distribution being distilled: the frozen reference for BOND, the EMA anchor for J-BOND.

    Attributes:
        logp: `(b,)` policy log-prob `S_θ(y_i)` of its own sample (with grad).
        ref_logp: `(b,)` log-prob of the same sample under the pool's distribution (reference or anchor).
        reward: `(b,)` reward `r(x_i, y_i)` of the policy sample (any real dtype).
        ref_rewards: `(b, k)` rewards of the pool's `k` samples (any real dtype).
        best_logp: `(b,)` policy log-prob of the pool's best sample (with grad); `None` for losses that
            do not use it.

    Shapes are checked on construction (no device synchronization).
    """

    logp: Tensor
    ref_logp: Tensor
    reward: Tensor
    ref_rewards: Tensor
    best_logp: Tensor | None = None

    def __post_init__(self) -> None:
        check_tensor("logp", self.logp, ndim=1)
        b = self.logp.shape[0]
        for name in ("ref_logp", "best_logp"):
            value = getattr(self, name)
            if value is None:
                continue
            check_tensor(name, value, ndim=1)
            if value.shape[0] != b:
                raise ValueError(f"{name} has shape {tuple(value.shape)} but logp has shape ({b},)")
        check_tensor("reward", self.reward, ndim=1, floating=False)
        if self.reward.shape[0] != b:
            raise ValueError(f"reward has shape {tuple(self.reward.shape)} but logp has shape ({b},)")
        check_tensor("ref_rewards", self.ref_rewards, ndim=2, floating=False)
        if self.ref_rewards.shape[0] != b:
            raise ValueError(
                f"ref_rewards has shape {tuple(self.ref_rewards.shape)} but logp has shape ({b},); "
                "expected (b, k)"
            )
        for name in ("reward", "ref_rewards"):
            value = getattr(self, name)
            if value.dtype == torch.bool or value.is_complex():
                raise TypeError(f"{name} must hold real numbers, got dtype {value.dtype}")

    @property
    def pool_size(self) -> int:
        """`k`, the number of pool samples per row."""
        return int(self.ref_rewards.shape[1])


# ----------------------------------------------------------------------------------------------------------
# token batches (what the collators return)
# ----------------------------------------------------------------------------------------------------------


def _check_ids(name: str, x: Any, ndim: int = 2) -> Tensor:
    check_tensor(name, x, ndim=ndim, floating=False)
    if x.dtype == torch.bool or x.is_complex():
        raise TypeError(f"{name} must be an integer tensor, got dtype {x.dtype}")
    return x


def _check_ids_and_mask(ids_name: str, ids: Any, mask_name: str, mask: Any) -> Tensor:
    """Check integer `ids` `(rows, T)` and an integer attention `mask` of the same shape; return `ids`."""
    _check_ids(ids_name, ids)
    _check_ids(mask_name, mask)
    if mask.shape != ids.shape:
        raise ValueError(
            f"{mask_name} has shape {tuple(mask.shape)} but {ids_name} has shape {tuple(ids.shape)}"
        )
    return ids


def _check_rows(name: str, x: Any, rows: int, like: str) -> Tensor:
    _check_ids(name, x, ndim=1)
    if x.shape[0] != rows:
        raise ValueError(f"{name} has shape {tuple(x.shape)} but {like} has {rows} rows")
    return x


@dataclass(frozen=True)
class PairBatch(_TensorFields):
    """A preference batch in the **duplicated** layout: `2B` rows `prompt ++ completion`, chosen rows
    `0..B-1`, rejected rows `B..2B-1` (row `B + i` is the rejected twin of row `i`), right-padded.

    Attributes:
        input_ids: `(2B, T)` long token ids.
        attention_mask: `(2B, T)` long, 1 on real tokens.
        completion_mask: `(2B, T)` bool, True on the completion tokens that count (never at position 0).
        prompt_len: `(2B,)` long prompt tokens per row.
        completion_len: `(2B,)` long completion tokens per row.
        row_index: `(B,)` long position of each kept pair in the list given to the collator.
    """

    input_ids: Tensor
    attention_mask: Tensor
    completion_mask: Tensor
    prompt_len: Tensor
    completion_len: Tensor
    row_index: Tensor

    def __post_init__(self) -> None:
        ids = _check_ids_and_mask("input_ids", self.input_ids, "attention_mask", self.attention_mask)
        n = ids.shape[0]
        if n == 0 or n % 2:
            raise ValueError(f"input_ids must have an even, non-zero number of rows (2B), got {n}")
        check_mask("completion_mask", self.completion_mask, tuple(ids.shape), "input_ids")
        _check_rows("prompt_len", self.prompt_len, n, "input_ids")
        _check_rows("completion_len", self.completion_len, n, "input_ids")
        _check_rows("row_index", self.row_index, n // 2, "half of input_ids")

    @property
    def num_pairs(self) -> int:
        """`B`, the number of pairs."""
        return int(self.input_ids.shape[0]) // 2

    def select(self, pairs: Tensor | Sequence[int] | slice) -> PairBatch:
        """The batch of the pairs `pairs` (indices into `0..B-1`): their chosen rows, then their rejected
        rows, with `row_index` kept. Columns are not trimmed."""
        b = self.num_pairs
        idx = torch.arange(b, device=self.input_ids.device)[pairs]
        rows = torch.cat([idx, idx + b])
        return PairBatch(
            input_ids=self.input_ids[rows],
            attention_mask=self.attention_mask[rows],
            completion_mask=self.completion_mask[rows],
            prompt_len=self.prompt_len[rows],
            completion_len=self.completion_len[rows],
            row_index=self.row_index[idx],
        )


def unpack_pair_batch(batch: PairBatch | Mapping[str, Any]) -> tuple[Any, Any, Any]:
    """The three tensors a forward on a duplicated-layout preference batch needs.

    The one place that reads a [`PairBatch`][prefopt.types.PairBatch] *or* a plain mapping with its keys
    (TRL-style dicts, hand-made batches); the shapes are checked by the caller.

    Args:
        batch: a `PairBatch`, or a mapping with `input_ids` and `completion_mask` and optionally
            `attention_mask`.

    Returns:
        `(input_ids, attention_mask, completion_mask)`; `attention_mask` is `None` when a mapping has none.

    Raises:
        KeyError: a mapping without `input_ids` or `completion_mask` (the message names the key).
        TypeError: anything else than a `PairBatch` or a mapping.
    """
    if isinstance(batch, PairBatch):
        return batch.input_ids, batch.attention_mask, batch.completion_mask
    if isinstance(batch, Mapping):
        for key in ("input_ids", "completion_mask"):
            if key not in batch:
                raise KeyError(f"batch is missing {key!r} (has {sorted(batch)})")
        return batch["input_ids"], batch.get("attention_mask"), batch["completion_mask"]
    raise TypeError(f"batch must be a PairBatch (or a dict of tensors), got {type(batch).__name__}")


@dataclass(frozen=True)
class SharedPromptBatch(_TensorFields):
    """A batch in the **shared-prompt** layout: each of the `B` prompts once, `k·B` completion rows (row
    `r` continues prompt `r mod B`; for pairs `k = 2`, chosen rows first), all right-padded.

    Attributes:
        prompt_ids: `(B, P)` long. prompt_mask: `(B, P)` long, ones then zeros. prompt_len: `(B,)` long.
        completion_ids: `(kB, C)` long. completion_attention_mask: `(kB, C)` long, the real completion
            tokens. completion_mask: `(kB, C)` bool, the completion tokens that count.
        completion_len: `(kB,)` long.
        row_index: `(B,)` long position of each kept row in the list given to the collator.
        duplicated: the same batch in the duplicated layout (`SharedPromptCollator(keep_duplicated=True)`),
            else `None`.
    """

    prompt_ids: Tensor
    prompt_mask: Tensor
    prompt_len: Tensor
    completion_ids: Tensor
    completion_attention_mask: Tensor
    completion_mask: Tensor
    completion_len: Tensor
    row_index: Tensor
    duplicated: PairBatch | None = None

    def __post_init__(self) -> None:
        p = _check_ids_and_mask("prompt_ids", self.prompt_ids, "prompt_mask", self.prompt_mask)
        b = p.shape[0]
        if b == 0:
            raise ValueError("prompt_ids has no rows")
        _check_rows("prompt_len", self.prompt_len, b, "prompt_ids")
        c = _check_ids_and_mask(
            "completion_ids", self.completion_ids, "completion_attention_mask", self.completion_attention_mask
        )
        n = c.shape[0]
        if n == 0 or n % b:
            raise ValueError(f"completion_ids has {n} rows, not a positive multiple of the {b} prompt rows")
        check_mask("completion_mask", self.completion_mask, tuple(c.shape), "completion_ids")
        _check_rows("completion_len", self.completion_len, n, "completion_ids")
        _check_rows("row_index", self.row_index, b, "prompt_ids")
        if self.duplicated is not None and not isinstance(self.duplicated, PairBatch):
            raise TypeError(f"duplicated must be a PairBatch or None, got {type(self.duplicated).__name__}")

    @property
    def num_prompts(self) -> int:
        """`B`, the number of prompts."""
        return int(self.prompt_ids.shape[0])

    @property
    def completions_per_prompt(self) -> int:
        """`k` (2 for preference pairs)."""
        return int(self.completion_ids.shape[0]) // self.num_prompts


@dataclass(frozen=True)
class UnpairedBatch(_TensorFields):
    """Labelled single completions (KTO, pointwise reward models): `B` rows `prompt ++ completion`,
    right-padded.

    Attributes:
        input_ids, attention_mask: `(B, T)` long. completion_mask: `(B, T)` bool.
        prompt_len, completion_len, row_index: `(B,)` long.
        label: `(B,)` float32 labels (bool → 1.0 / 0.0). desirable: `(B,)` bool, `label >= threshold`.
    """

    input_ids: Tensor
    attention_mask: Tensor
    completion_mask: Tensor
    prompt_len: Tensor
    completion_len: Tensor
    row_index: Tensor
    label: Tensor
    desirable: Tensor

    def __post_init__(self) -> None:
        ids = _check_ids_and_mask("input_ids", self.input_ids, "attention_mask", self.attention_mask)
        n = ids.shape[0]
        check_mask("completion_mask", self.completion_mask, tuple(ids.shape), "input_ids")
        for name in ("prompt_len", "completion_len", "row_index"):
            _check_rows(name, getattr(self, name), n, "input_ids")
        check_tensor("label", self.label, ndim=1)
        check_mask("desirable", self.desirable, (n,), "the rows of input_ids")
        if self.label.shape[0] != n:
            raise ValueError(f"label has shape {tuple(self.label.shape)} but input_ids has {n} rows")


@dataclass(frozen=True)
class PromptBatch(_TensorFields):
    """Prompts for sampling: `B` rows, LEFT-padded, so `input_ids[:, -1]` is every prompt's last token.

    Attributes:
        input_ids, attention_mask: `(B, P)` long. prompt_len, row_index: `(B,)` long.
        prompt: the `B` prompt strings (empty strings when built from token ids).
    """

    input_ids: Tensor
    attention_mask: Tensor
    prompt_len: Tensor
    row_index: Tensor
    prompt: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        ids = _check_ids_and_mask("input_ids", self.input_ids, "attention_mask", self.attention_mask)
        n = ids.shape[0]
        _check_rows("prompt_len", self.prompt_len, n, "input_ids")
        _check_rows("row_index", self.row_index, n, "input_ids")
        if self.prompt and len(self.prompt) != n:
            raise ValueError(f"prompt has {len(self.prompt)} strings but input_ids has {n} rows")
