r"""Token-level view of gradient entanglement: cosines between per-token log-prob gradients of one pair.

For a pair ``(y_w, y_l)`` with completion tokens ``y_{w,1..T_w}`` and ``y_{l,1..T_l}``, let
``g_{w,t} = ∇_θ log π_θ(y_{w,t} | x, y_{w,<t})`` (same for ``l``). Then ``∇_w = Σ_t g_{w,t}`` and

.. math::

    ⟨∇_w, ∇_l⟩ = Σ_{t,s} ⟨g_{w,t}, g_{l,s}⟩,

so the ``(T_w × T_l)`` matrix of cosines ``cos(g_{w,t}, g_{l,s})`` shows *which* token pairs make the chosen and
rejected gradients aligned (Yuan et al. 2024, arXiv 2410.13828, token-gradient heatmaps). For the unembedding
``W`` alone, ``⟨g_a, g'_b⟩ = ⟨e_a − p, e_b − p'⟩⟨h, h'⟩``: the same token in the same context correlates
positively, different tokens in the same context typically negatively.

**Shared tokens** (definition used by :attr:`TokenCorrelation.summary`): completion offset ``k`` (0-based
position inside the completion) is *shared* when both completions have a token at offset ``k`` and it is the
same token id, ``y_{w,k} = y_{l,k}`` — the "same token at the same completion offset" rule, also used by
:func:`prefopt.losses.decoupled.shared_token_mask`. For two responses that differ in one token, every other
offset is shared.

**Computation** (exact, no approximation). The gradient of token ``t`` of a row is a vector–Jacobian product;
``n`` of them are batched as ``n`` *copies* of the row, copy ``k`` truncated after its token ``t_k`` and
counting only that token (causality makes later tokens irrelevant), so that one forward and one backward of
``Σ_k ℓ_k`` over the copies yields all ``n`` per-token gradients at once through the per-row identity of
:mod:`prefopt.diagnostics.pergrad`. Copies are processed in chunks of ``chunk_rows`` (sorted by position, so
each chunk is truncated to its longest prefix). Memory: the ``(T_w + T_l, P)`` per-token gradient matrix in
float64 (``P`` = selected parameter elements; restrict with ``params=`` for large adapters).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from prefopt.diagnostics.entanglement import check_pair_batch, eval_mode, resolve_model
from prefopt.diagnostics.pergrad import per_row_gradients, resolve_params

__all__ = ["TokenCorrelation", "per_token_gradients", "shared_offsets", "token_gradient_correlation"]


@dataclass(frozen=True)
class TokenCorrelation:
    """Per-token gradient cosines of pair ``index`` (completion tokens in order).

    Attributes:
        matrix: ``(T_w, T_l)`` ``cos(g_{w,t}, g_{l,s})``.
        chosen_matrix / rejected_matrix: ``(T_w, T_w)`` / ``(T_l, T_l)`` within-response cosines.
        cross_inner: ``(T_w, T_l)`` raw inner products ``⟨g_{w,t}, g_{l,s}⟩``; its sum is ``⟨∇_w, ∇_l⟩``.
        chosen_norms / rejected_norms: ``(T_w,)`` / ``(T_l,)`` ``‖g_{·,t}‖``.
        chosen_ids / rejected_ids: completion token ids; chosen_positions / rejected_positions: their
            column index in ``input_ids``.
        chosen_shared / rejected_shared: bool, True at shared offsets (module docstring).
        chosen_tokens / rejected_tokens: decoded tokens (one string each) if a tokenizer was given, else None.
        summary: ``mean_shared`` (mean of ``matrix[i, j]`` over cells whose chosen *and* rejected token are
            shared), ``mean_differing`` (cells with at least one non-shared token), ``diag_shared`` (mean of
            ``matrix[k, k]`` over shared ``k``: same token, same offset), ``diag_differing`` (``matrix[k, k]``
            with different tokens at offset ``k``), ``mean_all``, ``cosine`` (of the summed gradients
            ``∇_w``, ``∇_l``), ``num_shared``. A mean over no cell is NaN.
        index: the pair.

    Cosines involving an exactly-zero gradient are NaN.
    """

    matrix: Tensor
    chosen_matrix: Tensor
    rejected_matrix: Tensor
    cross_inner: Tensor
    chosen_norms: Tensor
    rejected_norms: Tensor
    chosen_ids: Tensor
    rejected_ids: Tensor
    chosen_positions: Tensor
    rejected_positions: Tensor
    chosen_shared: Tensor
    rejected_shared: Tensor
    chosen_tokens: tuple[str, ...] | None
    rejected_tokens: tuple[str, ...] | None
    summary: dict[str, float]
    index: int


def shared_offsets(chosen_ids: Tensor, rejected_ids: Tensor) -> tuple[Tensor, Tensor]:
    """Bool masks ``(T_w,)``, ``(T_l,)``: offset ``k`` is shared iff ``k < min(T_w, T_l)`` and the ids match."""
    k = min(chosen_ids.shape[0], rejected_ids.shape[0])
    same = chosen_ids[:k] == rejected_ids[:k]
    cw = torch.zeros(chosen_ids.shape[0], dtype=torch.bool, device=chosen_ids.device)
    cl = torch.zeros(rejected_ids.shape[0], dtype=torch.bool, device=rejected_ids.device)
    cw[:k] = same
    cl[:k] = same
    return cw, cl


def per_token_gradients(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor | None,
    positions: Tensor,
    named_params: list[tuple[str, nn.Parameter]],
    *,
    chunk_rows: int = 64,
) -> tuple[Tensor, Tensor]:
    """``(G, ℓ)``: ``G (n, P)`` float64 gradients of ``log p(input_ids[t_k] | input_ids[:t_k])`` for each
    ``t_k`` in ``positions`` (``(n,)``, each ≥ 1) of the single row ``input_ids`` ``(T,)``, and the ``(n,)``
    log-probs. One forward+backward per chunk of ``chunk_rows`` positions (see the module docstring)."""
    from prefopt.logprobs import token_logps

    order = torch.argsort(positions)
    grads: list[Tensor] = []
    vals: list[Tensor] = []
    for start in range(0, positions.shape[0], chunk_rows):
        pos = positions[order[start : start + chunk_rows]]
        n = pos.shape[0]
        length = int(pos.max()) + 1
        ids = input_ids[:length].unsqueeze(0).expand(n, length).contiguous()
        am = (
            None
            if attention_mask is None
            else attention_mask[:length].unsqueeze(0).expand(n, length).contiguous()
        )
        cm = torch.zeros(n, length, dtype=torch.bool, device=input_ids.device)
        cm[torch.arange(n, device=cm.device), pos] = True

        def forward(ids: Tensor = ids, am: Tensor | None = am, cm: Tensor = cm) -> Tensor:
            lp = token_logps(model, ids, am, cm)
            assert isinstance(lp, Tensor)
            return lp.sum(dim=1)

        rg = per_row_gradients(model, forward, n, named_params, flat=True)
        assert rg.flat is not None
        grads.append(rg.flat)
        vals.append(rg.values)
    g = torch.cat(grads)
    v = torch.cat(vals)
    inv = torch.empty_like(order)
    inv[order] = torch.arange(order.shape[0], device=order.device)
    return g[inv], v[inv]


def _cos(gram: Tensor, na: Tensor, nb: Tensor) -> Tensor:
    den = na[:, None] * nb[None, :]
    return torch.where(den > 0, gram / den.clamp(min=1e-300), torch.full_like(gram, float("nan")))


def _nanmean(x: Tensor) -> float:
    return float(x.mean()) if x.numel() else float("nan")


def token_gradient_correlation(
    policy_or_model: Any,
    batch: dict[str, Tensor],
    index: int,
    *,
    tokenizer: Any = None,
    params: Iterable[Any] | None = None,
    chunk_rows: int = 64,
) -> TokenCorrelation:
    r"""Cosines between per-token gradients of pair ``index`` of a collated preference batch.

    Args:
        policy_or_model: a :class:`prefopt.LoraPolicy` (its policy model is used) or a causal LM.
        batch: ``input_ids`` / ``attention_mask`` / bool ``completion_mask``, ``(2B, T)``, chosen rows first.
        index: the pair, ``0 ≤ index < B`` (rows ``index`` and ``index + B``).
        tokenizer: optional; decodes each completion token for labels.
        params: parameters (or names) to differentiate; default every parameter with ``requires_grad``.
        chunk_rows: per-token gradients computed per forward/backward (bounds activation memory).

    Returns: :class:`TokenCorrelation`. The model runs in ``eval()`` mode and is left as found.
    """
    model, _ = resolve_model(policy_or_model)
    ids, am, cm, b = check_pair_batch(batch)
    if isinstance(index, bool) or not isinstance(index, int):
        raise TypeError(f"index must be an int, got {type(index).__name__}")
    if not 0 <= index < b:
        raise IndexError(f"index {index} is out of range for a batch of {b} pairs (0 <= index < {b})")
    if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1:
        raise ValueError(f"chunk_rows must be a positive int, got {chunk_rows!r}")
    named = resolve_params(model, params)
    rows = (index, index + b)
    pos = [cm[r].nonzero().flatten() for r in rows]
    with eval_mode(model):
        gs = [
            per_token_gradients(
                model, ids[r], None if am is None else am[r], p, named, chunk_rows=chunk_rows
            )[0]
            for r, p in zip(rows, pos, strict=True)
        ]
    gw, gl = gs
    nw, nl = gw.norm(dim=1), gl.norm(dim=1)
    cross = gw @ gl.T
    matrix = _cos(cross, nw, nl)
    cw_ids, cl_ids = ids[rows[0], pos[0]], ids[rows[1], pos[1]]
    sw, sl = shared_offsets(cw_ids, cl_ids)
    both = sw[:, None] & sl[None, :]
    k = min(len(cw_ids), len(cl_ids))
    diag = matrix.diagonal()[:k] if k else matrix.new_zeros(0)
    tot_w, tot_l = gw.sum(0), gl.sum(0)
    den = float(tot_w.norm() * tot_l.norm())
    summary = {
        "mean_shared": _nanmean(matrix[both]),
        "mean_differing": _nanmean(matrix[~both]),
        "diag_shared": _nanmean(diag[sw[:k]]),
        "diag_differing": _nanmean(diag[~sw[:k]]),
        "mean_all": _nanmean(matrix),
        "cosine": float(tot_w @ tot_l) / den if den > 0 else float("nan"),
        "num_shared": float(sw.sum()),
    }
    tok_w = tok_l = None
    if tokenizer is not None:
        tok_w = tuple(str(tokenizer.decode([int(t)])) for t in cw_ids)
        tok_l = tuple(str(tokenizer.decode([int(t)])) for t in cl_ids)
    return TokenCorrelation(
        matrix=matrix,
        chosen_matrix=_cos(gw @ gw.T, nw, nw),
        rejected_matrix=_cos(gl @ gl.T, nl, nl),
        cross_inner=cross,
        chosen_norms=nw,
        rejected_norms=nl,
        chosen_ids=cw_ids,
        rejected_ids=cl_ids,
        chosen_positions=pos[0],
        rejected_positions=pos[1],
        chosen_shared=sw,
        rejected_shared=sl,
        chosen_tokens=tok_w,
        rejected_tokens=tok_l,
        summary=summary,
        index=index,
    )
