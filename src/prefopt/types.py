"""Small frozen dataclasses of tensors that flow between prefopt's layers.

Vocabulary (see ``docs/glossary.md``): ``logp`` per token ``(b, t)``; ``seq_logp`` per sequence ``(b,)``;
prefixes ``ref_``, ``old_``, ``anchor_``; ``chosen`` / ``rejected`` for pairs. All log-probs are natural logs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

__all__ = ["LossOutput", "PairLogps", "UnpairedLogps", "check_finite", "check_mask", "check_tensor"]


def check_tensor(name: str, x: Any, *, ndim: int | None = None, floating: bool = True) -> Tensor:
    """Raise a ``TypeError``/``ValueError`` naming ``name`` unless ``x`` is a tensor of the expected kind."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if ndim is not None and x.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimension(s), got shape {tuple(x.shape)}")
    if floating and not torch.is_floating_point(x):
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    return x


def check_mask(name: str, mask: Any, shape: tuple[int, ...], like: str) -> Tensor:
    """Raise a ``TypeError``/``ValueError`` naming ``name`` unless ``mask`` is a bool tensor of ``shape``
    (the shape of the tensor called ``like``). The one mask convention: True = "this element counts"."""
    if not isinstance(mask, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor (True = counts), got dtype {mask.dtype}")
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(mask.shape)} but {like} has shape {tuple(shape)}")
    return mask


def check_finite(name: str, x: Tensor | None) -> None:
    """Raise ``ValueError`` naming ``name`` if ``x`` holds a NaN or an infinity (synchronizes the device)."""
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
        """Raise ``ValueError`` naming the first field that holds a NaN or an infinity."""
        for name, value in self._tensor_items():
            check_finite(name, value)

    def upcast(self):  # type: ignore[no-untyped-def]
        """A copy whose half-precision fields are float32 (differentiable); fp32/fp64 are kept."""
        changes = {
            name: _upcast(value) for name, value in self._tensor_items() if torch.is_floating_point(value)
        }
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]


@dataclass(frozen=True)
class PairLogps(_TensorFields):
    """Sequence log-probabilities of preference pairs, the input of every pairwise loss.

    Shapes: every field is ``(b,)``, one entry per pair.

    Attributes:
        chosen: policy ``S(y_w) = Σ_t m_t log π_θ(y_w,t | x, y_w,<t)`` summed over completion tokens.
        rejected: policy ``S(y_l)``.
        ref_chosen: reference ``S_ref(y_w)``; ``None`` for reference-free losses.
        ref_rejected: reference ``S_ref(y_l)``; ``None`` for reference-free losses.
        chosen_len: number of completion tokens ``|y_w|`` (float or integer tensor); ``None`` if unused.
        rejected_len: ``|y_l|``.

    Shapes and dtypes are checked on construction; finiteness only on request
    (:meth:`check_finite`, or ``check_finite=True`` when calling a loss) because it synchronizes the device.
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

    Shapes: ``(b,)`` each.

    Attributes:
        logp: policy ``S(y_i)`` of completion ``i`` given its own prompt.
        ref_logp: reference ``S_ref(y_i)``.
        desirable: bool ``(b,)``, True where the completion is desirable (thumbs up).
        kl_logp: policy log-prob of *mismatched* (prompt, completion) pairs ``S(y'_j; x_i)``, used for
            the batch KL reference point ``z0``; ``None`` gives ``z0 = 0``.
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
        loss: **unreduced** loss, one value per pair / sequence ``(b,)`` or per token ``(b, t)``.
            Reduce it yourself (``prefopt.masked`` has reductions that are invariant to how a batch is
            split across micro-batches or ranks).
        metrics: detached tensors with documented meanings (per example unless the loss documents
            otherwise), e.g. ``rewards/chosen``, ``rewards/margins``, ``logps/chosen``.
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
