"""Masked reductions with one mask convention: a bool ``mask``, True = "this element counts".

Why these exist: the gradient of a mean over a *local* batch depends on how the batch was split. To get the
same gradient whether a global batch is processed whole, in micro-batches with gradient accumulation, or
across data-parallel ranks, divide every micro-batch's *sum* by the same *global* count::

    n_tokens = completion_mask.sum()                      # over the whole global batch (all-reduce it under DDP)
    for micro in micro_batches:
        loss = token_mean(per_token_loss, micro.mask, num_tokens=n_tokens)   # Σ over micro / N_global
        loss.backward()                                   # gradients add up to the whole-batch gradient

(Under DDP, which averages gradients over ``W`` ranks, multiply by ``W`` or pass ``num_tokens / W``.)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from prefopt.types import check_mask, check_tensor

__all__ = [
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "mean_of_seq_means",
    "seq_len",
    "seq_mean",
    "seq_sum",
    "token_mean",
]


def masked_sum(x: Tensor, mask: Tensor, dim: int | tuple[int, ...] | None = None) -> Tensor:
    """``Σ x·m`` over ``dim`` (all dims if None). Masked-out values never propagate NaN/inf."""
    check_mask("mask", mask, tuple(x.shape), "x")
    z = torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))
    return z.sum() if dim is None else z.sum(dim=dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | tuple[int, ...] | None = None) -> Tensor:
    """``Σ x·m / Σ m`` over ``dim``; where ``Σ m = 0`` the result is 0 (not NaN)."""
    total = masked_sum(x, mask, dim)
    count = mask.sum() if dim is None else mask.sum(dim=dim)
    return total / count.clamp(min=1).to(total.dtype)


def mean_of_seq_means(x: Tensor, mask: Tensor) -> Tensor:
    """Per-sequence token mean of a ``(b, t)`` tensor, then the mean over sequences (GRPO's original rule)."""
    return masked_mean(x, mask, dim=-1).mean()


def token_mean(x: Tensor, mask: Tensor, *, num_tokens: Tensor | float | None = None) -> Tensor:
    """``Σ x·m / N`` where ``N`` is ``num_tokens`` (a *global* count) or, if None, ``Σ m`` locally.

    Passing the global batch's token count makes micro-batch and multi-rank gradients add up exactly to
    the whole-batch gradient (see the module docstring).

    >>> import torch
    >>> x = torch.tensor([[1.0, 2.0, 9.0], [3.0, 9.0, 9.0]])
    >>> m = torch.tensor([[True, True, False], [True, False, False]])
    >>> token_mean(x, m)                      # (1 + 2 + 3) / 3
    tensor(2.)
    >>> token_mean(x[:1], m[:1], num_tokens=3) + token_mean(x[1:], m[1:], num_tokens=3)
    tensor(2.)
    """
    total = masked_sum(x, mask)
    if num_tokens is None:
        return total / mask.sum().clamp(min=1).to(total.dtype)
    if isinstance(num_tokens, (int, float)):
        if not num_tokens > 0:
            raise ValueError(f"num_tokens must be positive, got {num_tokens}")
    elif isinstance(num_tokens, torch.Tensor):
        if num_tokens.numel() != 1:
            raise ValueError(f"num_tokens must be a scalar, got shape {tuple(num_tokens.shape)}")
        if num_tokens.device.type == "cpu" and not bool(num_tokens > 0):
            raise ValueError(f"num_tokens must be positive, got {float(num_tokens)}")
    else:
        raise TypeError(f"num_tokens must be a number or a scalar tensor, got {type(num_tokens).__name__}")
    return total / torch.as_tensor(num_tokens, dtype=total.dtype, device=total.device)


def masked_var(x: Tensor, mask: Tensor, *, unbiased: bool = True) -> Tensor:
    """Variance of the masked elements (Bessel-corrected if ``unbiased`` and more than one element)."""
    mean = masked_mean(x, mask)
    # zero the masked-out entries *before* any arithmetic so a NaN/inf there cannot reach the gradient
    x = torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))
    centred = (x - mean) ** 2
    var = masked_sum(centred, mask)
    n = mask.sum().to(x.dtype)
    denom = (n - 1) if unbiased else n
    return var / denom.clamp(min=1)


def masked_whiten(x: Tensor, mask: Tensor, *, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """``(x − mean) / sqrt(var + eps)`` over masked elements (mean added back if not ``shift_mean``).

    Masked-out positions are returned as 0.
    """
    mean = masked_mean(x, mask)
    var = masked_var(x, mask)
    x = torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(mask, out, torch.zeros((), dtype=out.dtype, device=out.device))


# ----------------------------------------------------------------------------------------------------------
# per-sequence reductions of (b, t) log-probs
# ----------------------------------------------------------------------------------------------------------


def _check_pair(logp: Any, mask: Any) -> None:
    check_tensor("logp", logp, ndim=2)
    check_tensor("mask", mask, ndim=2, floating=False)
    check_mask("mask", mask, tuple(logp.shape), "logp")


def seq_sum(logp: Tensor, mask: Tensor) -> Tensor:
    """``S(y) = Σ_t m_t ℓ_t`` per row: ``(b, t)`` log-probs and bool mask → ``(b,)``."""
    _check_pair(logp, mask)
    return masked_sum(logp, mask, dim=-1)


def seq_mean(logp: Tensor, mask: Tensor) -> Tensor:
    """``Ā(y) = S(y) / |y|`` per row → ``(b,)``; 0 for a row with no counted token.

    (:func:`mean_of_seq_means` further averages these over rows to a scalar.)
    """
    _check_pair(logp, mask)
    return masked_mean(logp, mask, dim=-1)


def seq_len(mask: Tensor) -> Tensor:
    """``|y| = Σ_t m_t`` per row of a ``(b, t)`` bool mask → ``(b,)`` int64."""
    check_tensor("mask", mask, ndim=2, floating=False)
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor (True = counts), got dtype {mask.dtype}")
    return mask.sum(dim=-1)
