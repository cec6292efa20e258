"""Masked reductions with one mask convention: a bool ``mask``, True = "this element counts".

Why these exist: the gradient of a mean over a *local* batch depends on how the batch was split. To get the
same gradient whether a global batch is processed whole, in micro-batches with gradient accumulation, or
across data-parallel ranks, divide every micro-batch's *sum* by the same *global* count:

    n_tokens = completion_mask.sum()                      # over the whole global batch (all-reduce it under DDP)
    for micro in micro_batches:
        loss = token_mean(per_token_loss, micro.mask, num_tokens=n_tokens)   # Σ over micro / N_global
        loss.backward()                                   # gradients add up to the whole-batch gradient

(Under DDP, which averages gradients over ``W`` ranks, multiply by ``W`` or pass ``num_tokens / W``.)
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from prefopt.types import check_mask, check_tensor

__all__ = [
    "AGGREGATIONS",
    "aggregate",
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


def _count(name: str, value: Any, like: Tensor) -> Tensor:
    """A validated positive, finite count as a 0-d tensor of ``like``'s dtype and device.

    Python numbers are checked always; a tensor on the CPU is checked too; a tensor on an accelerator is only
    checked for shape (its value check would synchronize the device on every call).
    """
    if isinstance(value, bool) or (isinstance(value, Tensor) and value.dtype == torch.bool):
        raise TypeError(f"{name} must be a number or a scalar tensor, not a bool")
    if isinstance(value, (int, float)):
        if not (value > 0 and math.isfinite(value)):
            raise ValueError(f"{name} must be positive and finite, got {value}")
        return torch.tensor(float(value), dtype=like.dtype, device=like.device)
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got shape {tuple(value.shape)}")
        if value.device.type == "cpu":
            v = float(value)
            if not (v > 0 and math.isfinite(v)):
                raise ValueError(f"{name} must be positive and finite, got {v}")
        return value.detach().reshape(()).to(dtype=like.dtype, device=like.device)
    raise TypeError(f"{name} must be a number or a scalar tensor, got {type(value).__name__}")


def token_mean(x: Tensor, mask: Tensor, *, num_tokens: Tensor | float | None = None) -> Tensor:
    """``Σ x·m / N`` where ``N`` is ``num_tokens`` (a *global* count) or, if None, ``Σ m`` locally.

    Passing the global batch's token count makes micro-batch and multi-rank gradients add up exactly to
    the whole-batch gradient (see the module docstring). Same as ``aggregate(x, mask, "token-mean", ...)``.

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
    return total / _count("num_tokens", num_tokens, total)


AGGREGATIONS: tuple[str, ...] = (
    "token-mean",
    "seq-mean-token-mean",
    "seq-mean-token-sum",
    "seq-mean-token-sum-norm",
)
"""The modes of [`aggregate`][prefopt.masked.aggregate] (verl's ``loss_agg_mode`` names)."""


def aggregate(
    per_token_loss: Tensor,
    mask: Tensor,
    mode: str,
    *,
    num_tokens: Tensor | float | None = None,
    num_sequences: Tensor | float | None = None,
    max_length: int | None = None,
) -> Tensor:
    r"""Reduce a per-token loss ``(b, t)`` to the scalar objective of one of the field's conventions.

    With \(l_{i,t}\) the loss, \(m_{i,t}\) the mask, \(\lvert y_i\rvert = \sum_t m_{i,t}\), \(N\) =
    ``num_tokens`` (default \(\sum_{i,t} m_{i,t}\)), \(B\) = ``num_sequences`` (default \(b\)) and \(L\) =
    ``max_length`` (default \(t\)):

    | ``mode`` | value | used by |
    |---|---|---|
    | ``"token-mean"`` | \(\frac{1}{N}\sum_{i,t} m_{i,t} l_{i,t}\) | DAPO (Yu et al. 2025, arXiv:2503.14476), PPO |
    | ``"seq-mean-token-mean"`` | \(\frac{1}{B}\sum_i \frac{1}{\max(\lvert y_i\rvert, 1)}\sum_t m_{i,t} l_{i,t}\) | GRPO (Shao et al. 2024, arXiv:2402.03300, Eq. 3) |
    | ``"seq-mean-token-sum"`` | \(\frac{1}{B}\sum_{i,t} m_{i,t} l_{i,t}\) | REINFORCE / RLOO (one action per sequence) |
    | ``"seq-mean-token-sum-norm"`` | \(\frac{1}{B L}\sum_{i,t} m_{i,t} l_{i,t}\) | Dr. GRPO (Liu et al. 2025, arXiv:2503.20783; a constant normaliser) |

    Each mode is a sum of per-token terms with weights that do not depend on the other rows once ``N`` and
    ``B`` are fixed, so passing the *global* batch's ``num_tokens`` / ``num_sequences`` makes the sum of the
    micro-batches' (or ranks') aggregated losses equal the whole batch's, value and gradient (tested). Under
    DDP, which averages gradients over ``W`` ranks, multiply the result by ``W``. Masked positions never
    reach the result or its gradient (selected with ``torch.where`` first); a row with no token contributes 0.

    Args:
        per_token_loss: ``(b, t)`` floating tensor.
        mask: ``(b, t)`` bool, True where the token counts.
        mode: one of [`AGGREGATIONS`][prefopt.masked.AGGREGATIONS].
        num_tokens: global token count for ``"token-mean"`` (a positive number or scalar tensor).
        num_sequences: global sequence count for the ``"seq-mean-*"`` modes.
        max_length: the constant ``L`` of ``"seq-mean-token-sum-norm"`` (an int ≥ 1, e.g. the maximum
            completion length; default: this batch's ``t``).

    Returns:
        A 0-d tensor.

    Raises:
        ValueError: unknown ``mode`` (the message lists the modes), a count that is not positive and finite,
            or a count given to a mode that does not use it. TypeError: a bool count, a non-bool mask.
    """
    check_tensor("per_token_loss", per_token_loss, ndim=2)
    check_mask("mask", mask, tuple(per_token_loss.shape), "per_token_loss")
    if not isinstance(mode, str) or mode not in AGGREGATIONS:
        raise ValueError(f"mode must be one of {', '.join(repr(m) for m in AGGREGATIONS)}; got {mode!r}")
    if num_tokens is not None and mode != "token-mean":
        raise ValueError(f"num_tokens is only used by mode='token-mean', not {mode!r}")
    if num_sequences is not None and mode == "token-mean":
        raise ValueError("num_sequences is not used by mode='token-mean' (pass num_tokens)")
    if max_length is not None and mode != "seq-mean-token-sum-norm":
        raise ValueError(f"max_length is only used by mode='seq-mean-token-sum-norm', not {mode!r}")
    x = torch.where(mask, per_token_loss, torch.zeros((), dtype=per_token_loss.dtype, device=mask.device))
    if mode == "token-mean":
        n = mask.sum().clamp(min=1).to(x.dtype) if num_tokens is None else _count("num_tokens", num_tokens, x)
        return x.sum() / n
    b, t = x.shape
    seqs = (
        torch.tensor(float(max(b, 1)), dtype=x.dtype, device=x.device)
        if num_sequences is None
        else _count("num_sequences", num_sequences, x)
    )
    if mode == "seq-mean-token-mean":
        lengths = mask.sum(dim=-1).clamp(min=1).to(x.dtype)
        return (x.sum(dim=-1) / lengths).sum() / seqs
    if mode == "seq-mean-token-sum":
        return x.sum() / seqs
    if max_length is None:
        length = max(t, 1)
    elif isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise ValueError(f"max_length must be an int >= 1, got {max_length!r}")
    else:
        length = max_length
    return x.sum() / (seqs * length)


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


def masked_whiten(
    x: Tensor, mask: Tensor | None = None, *, shift_mean: bool = True, eps: float = 1e-8
) -> Tensor:
    r"""Whitening over the counted elements: \((x - \mu)/\sqrt{\sigma^2 + \epsilon}\) (mean added back if not
    ``shift_mean``); the one whitening function (PPO advantages, ``shift_mean=False`` for rewards as TRL).

    \(\mu\) and \(\sigma^2\) (Bessel-corrected) are over every element where ``mask`` is True (``mask=None``:
    every element). Masked-out positions are returned as 0 and never reach the gradient. The moments are
    computed on ``x`` divided by its largest deviation, so inputs whose squares overflow (``[1e20, −1e20, 0]``
    in float32) whiten correctly instead of collapsing to 0; a constant input gives 0 (never NaN, even with
    ``eps = 0``). Half-precision inputs are computed in float32.

    Raises:
        TypeError: non-bool ``mask`` or ``shift_mean``. ValueError: mask shape, ``eps`` negative or not finite.
    """
    check_tensor("x", x)
    if x.dtype not in (torch.float32, torch.float64):
        x = x.float()
    if mask is None:
        mask = torch.ones_like(x, dtype=torch.bool)
    check_mask("mask", mask, tuple(x.shape), "x")
    if not isinstance(shift_mean, bool):
        raise TypeError(f"shift_mean must be a bool, got {type(shift_mean).__name__}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 <= eps < math.inf:
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    x = torch.where(mask, x, zero)
    # scale by the largest |x| for the mean and by the largest deviation for the variance: the result does not
    # depend on either scale mathematically (so they are constants for autograd), only the overflow does
    tiny = torch.finfo(x.dtype).tiny
    s0 = x.detach().abs().amax().clamp(min=tiny) if x.numel() else zero + 1
    mean = masked_mean(x / s0, mask) * s0
    centred = torch.where(mask, x - mean, zero)
    s1 = centred.detach().abs().amax().clamp(min=tiny) if x.numel() else zero + 1
    z = centred / s1
    n = mask.sum().to(x.dtype)
    var_z = (z * z).sum() / (n - 1).clamp(min=1)
    denom = var_z + eps / (s1 * s1)
    safe = torch.where(denom > 0, denom, torch.ones((), dtype=x.dtype, device=x.device))
    out = torch.where(denom > 0, z * torch.rsqrt(safe), zero)
    if not shift_mean:
        out = out + mean
    return torch.where(mask, out, zero)


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

    ([`mean_of_seq_means`][prefopt.masked.mean_of_seq_means] further averages these over rows to a scalar.)
    """
    _check_pair(logp, mask)
    return masked_mean(logp, mask, dim=-1)


def seq_len(mask: Tensor) -> Tensor:
    """``|y| = Σ_t m_t`` per row of a ``(b, t)`` bool mask → ``(b,)`` int64."""
    check_tensor("mask", mask, ndim=2, floating=False)
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor (True = counts), got dtype {mask.dtype}")
    return mask.sum(dim=-1)
