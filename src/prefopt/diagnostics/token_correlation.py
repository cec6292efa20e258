r"""Token-level view of gradient entanglement: cosines between per-token log-prob gradients of one pair.

For a pair ``(y_w, y_l)`` with completion tokens ``y_{w,1..T_w}`` and ``y_{l,1..T_l}``, let
``g_{w,t} = ∇_θ log π_θ(y_{w,t} | x, y_{w,<t})`` (same for ``l``). Then ``∇_w = Σ_t g_{w,t}`` and

$$
⟨∇_w, ∇_l⟩ = Σ_{t,s} ⟨g_{w,t}, g_{l,s}⟩,
$$

so the ``(T_w × T_l)`` matrix of cosines ``cos(g_{w,t}, g_{l,s})`` shows *which* token pairs make the chosen and
rejected gradients aligned (Yuan et al. 2024, arXiv 2410.13828, token-gradient heatmaps). For the unembedding
``W`` alone, ``⟨g_a, g'_b⟩ = ⟨e_a − p, e_b − p'⟩⟨h, h'⟩``: the same token in the same context correlates
positively, different tokens in the same context typically negatively.

**Shared tokens** (definition used by `TokenCorrelation.summary`): completion offset ``k`` (0-based
position inside the completion) is *shared* when both completions have a token at offset ``k`` and it is the
same token id, ``y_{w,k} = y_{l,k}`` — the "same token at the same completion offset" rule, also used by
[`prefopt.losses.decoupled.shared_token_mask`][prefopt.losses.decoupled.shared_token_mask]. For two responses
that differ in one token, every other offset is shared.

**Computation** (exact, no approximation). The gradient of token ``t`` of a row is a vector–Jacobian product
(VJP). Default path (``method="vjp"``, used when every selected parameter is the weight/bias of an
``nn.Linear`` of the backbone called once, e.g. a LoRA adapter): the completion positions in increasing order,
``chunk_rows`` at a time; for a chunk ending at position ``p``, ONE forward of the causal prefix
``input_ids[:p]`` (token ``p`` depends on nothing later, so a VJP costs its prefix, not the whole row) with
forward hooks recording every such layer's input ``x`` ``(p, d_in)`` and output; the per-token head gradients
``∂ℓ_t/∂h_{t−1}`` of the chunk from one pass of the LM head; then the chunk's VJPs are batched through the
backbone with ``torch.autograd.grad(..., is_grads_batched=True)`` *with respect to the recorded layer outputs*
(not the parameters), giving ``G^{(t)}`` ``(p, d_out)`` per layer, and the per-token weight gradient by the
outer-product identity ``∇_W ℓ_t = Σ_s G^{(t)}_s x_sᵀ`` (Goodfellow 2015, arXiv 1510.01799). The first chunk's
per-token gradients are checked to add up to an ordinary backward of their sum (else a warning and the copies
path). Cost: about one backward of its prefix per token, so on a CPU, where a backward is bound by
arithmetic, the gain over a loop of backward passes on one forward is the work that loop wastes (both rows,
whole length, the LM head each time) — 2.5–3× in ``benchmarks/diagnostics.py``; where a backward is bound
by kernel-launch latency (small models on a GPU) batching the VJPs gains more.
Fallback (``method="copies"``): ``n`` *copies* of the row, copy ``k`` truncated after its token ``t_k`` and
counting only that token (causality makes later tokens irrelevant), so that one forward and one backward of
``Σ_k ℓ_k`` over the copies yields all ``n`` per-token gradients through the per-row identity of
[`prefopt.diagnostics.pergrad`][prefopt.diagnostics.pergrad], in chunks of ``chunk_rows`` copies. Memory: the
``(T_w + T_l, P)`` per-token gradient matrix (``P`` = selected parameter elements; restrict with ``params=``
for large adapters), float64 on the copies path and in the model's precision on the VJP path; the VJP path
also holds ``chunk × p × Σ d_out`` output gradients per chunk (the chunk is shrunk to keep that under ``2^27``
numbers).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from prefopt.diagnostics.entanglement import check_pair_batch, eval_mode, resolve_model
from prefopt.diagnostics.pergrad import per_row_gradients, resolve_params
from prefopt.types import PairBatch

__all__ = [
    "TokenCorrelation",
    "per_token_gradients",
    "per_token_gradients_vjp",
    "shared_offsets",
    "token_gradient_correlation",
]

TokenMethod = Literal["auto", "vjp", "copies"]
_VJP_BUDGET = 2**27  # output-gradient numbers held per VJP chunk


@dataclass(frozen=True)
class TokenCorrelation:
    """Per-token gradient cosines of pair ``index`` (completion tokens in order).

    Attributes:
        matrix: ``(T_w, T_l)`` ``cos(g_{w,t}, g_{l,s})``.
        chosen_matrix: ``(T_w, T_w)`` within-response cosines of the chosen response.
        rejected_matrix: ``(T_l, T_l)`` within-response cosines of the rejected response.
        cross_inner: ``(T_w, T_l)`` raw inner products ``⟨g_{w,t}, g_{l,s}⟩``; its sum is ``⟨∇_w, ∇_l⟩``.
        chosen_norms: ``(T_w,)`` ``‖g_{w,t}‖``.
        rejected_norms: ``(T_l,)`` ``‖g_{l,t}‖``.
        chosen_ids: chosen completion token ids.
        rejected_ids: rejected completion token ids.
        chosen_positions: their column index in ``input_ids``.
        rejected_positions: their column index in ``input_ids``.
        chosen_shared: bool ``(T_w,)``, True at shared offsets (module docstring).
        rejected_shared: bool ``(T_l,)``, True at shared offsets.
        chosen_tokens: decoded chosen tokens (one string each) if a tokenizer was given, else None.
        rejected_tokens: decoded rejected tokens, likewise.
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
    chunk_rows: int = 32,
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


def per_token_gradients_vjp(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor | None,
    positions: Tensor,
    named_params: list[tuple[str, nn.Parameter]],
    *,
    chunk_rows: int = 32,
) -> tuple[Tensor, Tensor] | None:
    """Same result as [`per_token_gradients`][prefopt.diagnostics.token_correlation.per_token_gradients] (but ``G`` in the model's precision: float64 for a float64
    model, else float32) by forwards of causal prefixes and batched VJPs w.r.t.
    recorded layer outputs (module docstring), or None when the model/parameters do not fit that path (a
    selected parameter that is not a backbone ``nn.Linear`` weight/bias called exactly once on a ``(1, T, d)``
    input, an LM head that is not a plain ``nn.Linear`` or is itself selected) or the self-check fails (with a
    warning).

    Positions are taken in increasing order, ``chunk_rows`` at a time; a chunk whose last position is ``p``
    runs the backbone on ``input_ids[:p]`` only (causality: token ``p`` depends on nothing later), so a VJP
    costs its own prefix, not the whole row."""
    from prefopt.logprobs import backbone_and_head, logit_transform

    try:
        backbone, head, config = backbone_and_head(model)
    except TypeError:
        return None
    params = [p for _, p in named_params]
    pid = {id(p) for p in params}
    if type(head) is not nn.Linear or any(id(q) in pid for q in head.parameters()):
        return None
    mods: list[tuple[nn.Linear, Tensor | None, Tensor | None]] = []
    owned: set[int] = set()
    for mod in backbone.modules():
        if isinstance(mod, nn.Linear):
            w: Tensor | None = mod.weight if id(mod.weight) in pid else None
            b: Tensor | None = mod.bias if mod.bias is not None and id(mod.bias) in pid else None
            for q in (w, b):
                if q is not None:
                    if id(q) in owned:
                        return None  # shared weight
                    owned.add(id(q))
            if w is not None or b is not None:
                mods.append((mod, w, b))
    if owned != pid:
        return None
    transform = logit_transform(config)
    order = torch.argsort(positions)
    sorted_pos = positions[order]
    n = positions.shape[0]
    width = sum(m.out_features for m, _, _ in mods)  # output-gradient numbers per token per position
    # the model's precision: float64 models give float64 per-token gradients, others float32 (they are
    # computed in float32 anyway; see token_gradient_correlation for the cosines)
    work = torch.float64 if any(q.dtype == torch.float64 for q in params) else torch.float32
    offsets: dict[int, int] = {}
    total = 0
    for q in params:
        offsets[id(q)] = total
        total += q.numel()
    flat = torch.empty(n, total, dtype=work, device=input_ids.device)  # rows in sorted-position order
    values = torch.empty(n, dtype=torch.float64, device=input_ids.device)
    lp_dtype = torch.float32
    s = 0
    while s < n:
        k = min(chunk_rows, n - s)
        while k > 1 and k * width * int(sorted_pos[s + k - 1]) > _VJP_BUDGET:
            k -= 1
        pos = sorted_pos[s : s + k]
        lp = _prefix_chunk(
            backbone,
            head,
            transform,
            mods,
            params,
            offsets,
            input_ids,
            attention_mask,
            pos,
            flat[s : s + k],
            check=s == 0,
        )
        if lp is None:
            return None
        values[s : s + k] = lp.double()
        lp_dtype = lp.dtype
        s += k
    if not bool((order == torch.arange(n, device=order.device)).all()):  # back to the caller's order
        inv = torch.empty_like(order)
        inv[order] = torch.arange(n, device=order.device)
        flat, values = flat[inv], values[inv]
    return flat, values.to(lp_dtype)


def _prefix_chunk(
    backbone: nn.Module,
    head: nn.Linear,
    transform: Any,
    mods: list[tuple[nn.Linear, Tensor | None, Tensor | None]],
    params: list[nn.Parameter],
    offsets: dict[int, int],
    input_ids: Tensor,
    attention_mask: Tensor | None,
    pos: Tensor,
    out_rows: Tensor,
    *,
    check: bool,
) -> Tensor | None:
    """Writes the per-token gradients of the sorted positions ``pos`` into ``out_rows`` ``(k, P)`` (parameter
    ``q`` at columns ``offsets[id(q)]…``) and returns their log-probs ``(k,)``: one forward of
    ``input_ids[:pos[-1]]``, one batched VJP of the ``k`` head gradients (see the module docstring), and with
    ``check`` the self-check against an ordinary backward of their sum (None if it fails)."""
    from prefopt.logprobs import chunked_head_logps

    t = int(pos[-1])
    calls: dict[nn.Module, list[tuple[Tensor, Tensor]]] = {m: [] for m, _, _ in mods}

    def hook(mod: nn.Module, args: tuple[Any, ...], out: Any) -> None:
        x = args[0] if args else None
        if isinstance(x, Tensor) and isinstance(out, Tensor):
            calls[mod].append((x.detach(), out))
        else:
            calls[mod].append((torch.empty(0), torch.empty(0)))

    handles = [m.register_forward_hook(hook) for m, _, _ in mods]
    try:
        with torch.enable_grad():
            out = backbone(
                input_ids=input_ids[None, :t],
                attention_mask=None if attention_mask is None else attention_mask[None, :t],
                use_cache=False,
            )
    finally:
        for h in handles:
            h.remove()
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    for m, _, _ in mods:
        c = calls[m]
        if len(c) != 1 or c[0][0].ndim != 3 or c[0][0].shape[:2] != (1, t) or not c[0][1].requires_grad:
            return None
    # per-token head gradients ∂ℓ_k/∂h_{p_k − 1}: rows of the head are independent, one backward gives all
    h_sel = hidden[0, pos - 1].detach().requires_grad_(True)
    with torch.enable_grad():
        lp = chunked_head_logps(h_sel, head.weight, input_ids[pos].long(), head.bias, transform=transform)
        (dh,) = torch.autograd.grad(lp.sum(), h_sel)
    k = pos.shape[0]
    d = hidden.shape[-1]
    cot = hidden.new_zeros(k, 1, t, d)
    cot[torch.arange(k), 0, pos - 1] = dh.to(hidden.dtype)
    outs = [calls[m][0][1] for m, _, _ in mods]
    gs = torch.autograd.grad(
        hidden, outs, grad_outputs=cot, is_grads_batched=True, retain_graph=check, allow_unused=True
    )
    work = out_rows.dtype
    for (m, w, b), g in zip(mods, gs, strict=True):
        x = calls[m][0][0][0].to(work)
        gk = None if g is None else g[:, 0].to(work)  # (k, t, d_out)
        for q in (w, b):
            if q is None:
                continue
            block = out_rows[:, offsets[id(q)] : offsets[id(q)] + q.numel()]
            if gk is None:  # the layer does not reach the log-probs
                block.zero_()
            elif q is w:  # Σ_s G_s x_sᵀ for the k tokens as ONE (k·d_out × t) @ (t × d_in) product
                o = gk.shape[-1]
                block.view(k, *q.shape).copy_((gk.transpose(1, 2).reshape(k * o, -1) @ x).view(k, o, -1))
            else:
                block.copy_(gk.sum(1))
    flat = out_rows
    if check:
        # the per-token gradients add up to an ordinary backward of Σ_k ℓ_k
        summed = torch.autograd.grad(hidden, params, grad_outputs=cot.sum(0), allow_unused=True)
        off = 0
        for p, g in zip(params, summed, strict=True):
            total = flat[:, off : off + p.numel()].sum(0).view_as(p)
            off += p.numel()
            ref = torch.zeros_like(p) if g is None else g
            # tolerance relative to the gradient's scale: 1e-5 for float64 models (the ordinary backward of
            # several positions at once differs from the per-position VJPs by ~3e-8 relative there: HF's
            # RMSNorm computes in float32), 1e-3 otherwise (float32 SmolLM2, 30 layers: 1e-6 to a few 1e-5,
            # varying with the adapter; the per-token results themselves equal a loop of backward passes). A
            # structural error (a weight used outside its module, a missed call) is O(1).
            if not _summed_close(total, ref, 1e-5 if total.dtype == torch.float64 else 1e-3):
                warnings.warn(
                    "per-token gradients by batched VJPs do not add up to the summed gradient; using the "
                    "copies path",
                    RuntimeWarning,
                    stacklevel=4,
                )
                return None
    return lp.detach()


def _summed_close(a: Tensor, b: Tensor, rtol: float) -> bool:
    b = b.to(a.dtype)
    scale = float(b.abs().max()) if b.numel() else 0.0
    return bool((a - b).abs().max() <= rtol * max(scale, 1e-30) + 1e-30) if a.numel() else True


def _cos(gram: Tensor, na: Tensor, nb: Tensor) -> Tensor:
    den = na[:, None] * nb[None, :]
    return torch.where(den > 0, gram / den.clamp(min=1e-300), torch.full_like(gram, float("nan")))


def _nanmean(x: Tensor) -> float:
    return float(x.mean()) if x.numel() else float("nan")


def token_gradient_correlation(
    policy_or_model: Any,
    batch: PairBatch | dict[str, Tensor],
    index: int,
    *,
    tokenizer: Any = None,
    params: Iterable[Any] | None = None,
    chunk_rows: int = 32,
    method: TokenMethod = "auto",
) -> TokenCorrelation:
    r"""Cosines between per-token gradients of pair ``index`` of a collated preference batch.

    Args:
        policy_or_model: a [`prefopt.LoraPolicy`][prefopt.policy.LoraPolicy] (its policy model is used) or a
            causal LM.
        batch: ``input_ids`` / ``attention_mask`` / bool ``completion_mask``, ``(2B, T)``, chosen rows first.
        index: the pair, ``0 ≤ index < B`` (rows ``index`` and ``index + B``).
        tokenizer: optional; decodes each completion token for labels.
        params: parameters (or names) to differentiate; default every parameter with ``requires_grad``.
        chunk_rows: per-token gradients computed per batched VJP / per forward-backward of copies (bounds
            memory).
        method: ``"vjp"`` (one forward + batched VJPs; raises if the model does not fit it), ``"copies"``
            (truncated copies of the row) or ``"auto"`` (``"vjp"`` when it applies, else ``"copies"``).

    Returns: [`TokenCorrelation`][prefopt.diagnostics.token_correlation.TokenCorrelation]. The model runs in
    ``eval()`` mode and is left as found.
    """
    model, _ = resolve_model(policy_or_model)
    ids, am, cm, b = check_pair_batch(batch)
    if isinstance(index, bool) or not isinstance(index, int):
        raise TypeError(f"index must be an int, got {type(index).__name__}")
    if not 0 <= index < b:
        raise IndexError(f"index {index} is out of range for a batch of {b} pairs (0 <= index < {b})")
    if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1:
        raise ValueError(f"chunk_rows must be a positive int, got {chunk_rows!r}")
    if method not in ("auto", "vjp", "copies"):
        raise ValueError(f"method must be 'auto', 'vjp' or 'copies', got {method!r}")
    named = resolve_params(model, params)
    rows = (index, index + b)
    pos = [cm[r].nonzero().flatten() for r in rows]
    gs = []
    with eval_mode(model):
        for r, p in zip(rows, pos, strict=True):
            row_am = None if am is None else am[r]
            got = None
            if method != "copies":
                got = per_token_gradients_vjp(model, ids[r], row_am, p, named, chunk_rows=chunk_rows)
                if got is None and method == "vjp":
                    raise ValueError(
                        "method='vjp' needs every selected parameter to be the weight/bias of an nn.Linear of "
                        "the backbone called once per forward, and a plain nn.Linear LM head that is not selected"
                    )
            if got is None:
                got = per_token_gradients(model, ids[r], row_am, p, named, chunk_rows=chunk_rows)
            gs.append(got[0])
    gw, gl = gs
    # one Gram matrix of all T_w + T_l per-token gradients, in their precision (float32 for float32 models:
    # cosines to ~1e-6), then float64; ⟨∇_w, ∇_l⟩ etc. are sums of its blocks
    tw = gw.shape[0]
    g = torch.cat([gw, gl.to(gw.dtype)])
    gram = (g @ g.T).double()
    norms = gram.diagonal().clamp(min=0).sqrt()
    nw, nl = norms[:tw], norms[tw:]
    cross = gram[:tw, tw:]
    matrix = _cos(cross, nw, nl)
    cw_ids, cl_ids = ids[rows[0], pos[0]], ids[rows[1], pos[1]]
    sw, sl = shared_offsets(cw_ids, cl_ids)
    both = sw[:, None] & sl[None, :]
    k = min(len(cw_ids), len(cl_ids))
    diag = matrix.diagonal()[:k] if k else matrix.new_zeros(0)
    sq_w, sq_l = float(gram[:tw, :tw].sum()), float(gram[tw:, tw:].sum())  # ‖∇_w‖², ‖∇_l‖²
    den = math.sqrt(max(sq_w, 0.0) * max(sq_l, 0.0))
    summary = {
        "mean_shared": _nanmean(matrix[both]),
        "mean_differing": _nanmean(matrix[~both]),
        "diag_shared": _nanmean(diag[sw[:k]]),
        "diag_differing": _nanmean(diag[~sw[:k]]),
        "mean_all": _nanmean(matrix),
        "cosine": float(cross.sum()) / den if den > 0 else float("nan"),
        "num_shared": float(sw.sum()),
    }
    tok_w = tok_l = None
    if tokenizer is not None:
        tok_w = tuple(str(tokenizer.decode([int(t)])) for t in cw_ids)
        tok_l = tuple(str(tokenizer.decode([int(t)])) for t in cl_ids)
    return TokenCorrelation(
        matrix=matrix,
        chosen_matrix=_cos(gram[:tw, :tw], nw, nw),
        rejected_matrix=_cos(gram[tw:, tw:], nl, nl),
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
