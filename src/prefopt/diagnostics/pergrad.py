r"""Per-row (per-example) gradients of a causal LM in ONE backward pass, for gradient-entanglement diagnostics.

Setting: a forward ``f`` maps ``n`` input rows to ``n`` scalars ``s_i`` (a sequence log-prob, one token's
log-prob, ...) such that ``s_i`` depends on row ``i`` only (true for a causal LM: rows do not interact).
We want the Gram matrix ``K_ij = ⟨∇_θ s_i, ∇_θ s_j⟩`` over a set of trainable parameters ``θ`` (LoRA adapters by
default), or the per-row gradients themselves, without ``n`` backward passes.

**Outer-product identity** (Goodfellow 2015, "Efficient per-example gradient computations", arXiv 1510.01799).
For an ``nn.Linear`` ``y = x Wᵀ + b`` called on a ``(n, T, d_in)`` input, one backward of ``Σ_i s_i`` gives the
output gradients ``g_{i,t} = ∂(Σ_j s_j)/∂y_{i,t} = ∂s_i/∂y_{i,t}`` (rows do not interact), so

$$
∇_W s_i = Σ_t g_{i,t} x_{i,t}^T  \quad (d_{out}×d_{in}), \qquad ∇_b s_i = Σ_t g_{i,t}.
$$

Forward hooks record ``x`` for every call of every ``nn.Linear`` that owns a selected parameter, and a tensor
hook on the call's output records ``g``. Per layer, the gradients are either **materialized** (``n·d_out·d_in``
numbers; tiny for LoRA's ``A`` ``(r, d_in)`` and ``B`` ``(d_out, r)``) or their Gram is taken with the **ghost**
identity (Li et al. 2022, arXiv 2110.05679, §4 "ghost clipping")

$$
⟨∇_W s_i, ∇_W s_j⟩ = Σ_{t,u} (g_{i,t}·g_{j,u})(x_{i,t}·x_{j,u}),
$$

which costs ``(nT)²`` numbers instead of ``n·d_out·d_in``; ``method="auto"`` picks the smaller per layer.

**Fallback.** A selected parameter that is not the weight/bias of an ``nn.Linear`` called on ``(n, T, d)``
inputs (embeddings, norms, an LM head applied functionally by
[`prefopt.logprobs.token_logps`][prefopt.logprobs.token_logps], weights shared by several modules) gets its
per-row gradients from a loop of ``n`` ``torch.autograd.grad`` calls on the retained graph, with a
``RuntimeWarning`` naming the parameters (correct, slower).

**Self-check.** The ordinary summed gradient ``Σ_i ∇ s_i`` comes out of the same backward; the per-row
gradients of every hooked parameter are checked against it, and a parameter whose rows do not add up (a
weight used outside its module, for instance) is moved to the fallback with a warning. So the fast path can
be wrong only in ways that leave the sum exact.

Exactness needs a deterministic forward: the callers put the model in ``eval()`` (LoRA dropout off). Under
``eval()`` transformers does not checkpoint activations, so hooks see each call once.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

__all__ = ["RowGradients", "per_row_gradients", "resolve_params"]

Method = Literal["auto", "materialize", "ghost"]


def resolve_params(model: nn.Module, params: Iterable[Any] | None) -> list[tuple[str, nn.Parameter]]:
    """The ``(name, parameter)`` list to differentiate: ``params`` (parameters or names of ``model``), or
    every parameter with ``requires_grad`` when ``params`` is None.

    Raises:
        ValueError: ``model`` has no trainable parameter, ``params`` is empty, names a parameter that is not
            ``model``'s or one that does not require grad.
    """
    named = list(model.named_parameters())
    if params is None:
        chosen = [(n, p) for n, p in named if p.requires_grad]
        if not chosen:
            raise ValueError(
                "model has no trainable parameters (no parameter has requires_grad=True); "
                "wrap it with prefopt.LoraPolicy or pass params=[...]"
            )
        return chosen
    by_id = {id(p): (n, p) for n, p in named}
    by_name = dict(named)
    out: list[tuple[str, nn.Parameter]] = []
    seen: set[int] = set()
    for item in params:
        if isinstance(item, str):
            if item not in by_name:
                raise ValueError(f"params: {item!r} is not a parameter name of the model")
            name, p = item, by_name[item]
        elif isinstance(item, Tensor):
            if id(item) not in by_id:
                raise ValueError(
                    f"params: a tensor of shape {tuple(item.shape)} is not a parameter of the model"
                )
            name, p = by_id[id(item)]
        else:
            raise TypeError(f"params must hold parameters or parameter names, got {type(item).__name__}")
        if not p.requires_grad:
            raise ValueError(f"params: parameter {name!r} has requires_grad=False")
        if id(p) not in seen:
            seen.add(id(p))
            out.append((name, p))
    if not out:
        raise ValueError("params is empty: pass at least one trainable parameter")
    return out


@dataclass
class _Record:
    """Calls of one hooked ``nn.Linear``: inputs ``x`` and output gradients ``g`` per call."""

    weight: Tensor | None
    bias: Tensor | None
    xs: list[Tensor] = field(default_factory=list)
    gs: list[Tensor | None] = field(default_factory=list)
    ok: bool = True


@dataclass(frozen=True)
class RowGradients:
    """Result of [`per_row_gradients`][prefopt.diagnostics.pergrad.per_row_gradients].

    Attributes:
        values: ``(n,)`` the per-row scalars ``s_i`` (detached, as computed).
        gram: ``(n, n)`` float64 ``⟨∇ s_i, ∇ s_j⟩`` over the selected parameters.
        flat: ``(n, P)`` float64 per-row gradients (parameters in ``names`` order, each flattened), or None
            unless ``flat=True`` was asked.
        names: the selected parameter names.
        fallback: names of the parameters whose per-row gradients came from the backward loop.
    """

    values: Tensor
    gram: Tensor
    flat: Tensor | None
    names: tuple[str, ...]
    fallback: tuple[str, ...]


def _ghost_gram(x: Tensor, g: Tensor) -> Tensor:
    """``K_ij = Σ_{t,u} (g_it·g_ju)(x_it·x_ju)`` for ``x (n,T,a)``, ``g (n,T,b)`` → ``(n, n)``."""
    n, t = x.shape[:2]
    xx = x.reshape(n * t, -1)
    gg = g.reshape(n * t, -1)
    k = (xx @ xx.T) * (gg @ gg.T)
    return k.view(n, t, n, t).sum(dim=(1, 3))


def per_row_gradients(
    model: nn.Module,
    forward: Callable[[], Tensor],
    n_rows: int,
    named_params: Sequence[tuple[str, nn.Parameter]],
    *,
    method: Method = "auto",
    flat: bool = False,
) -> RowGradients:
    """Per-row gradients of ``s = forward()`` (``(n_rows,)``, row ``i`` depending on input row ``i`` only).

    Args:
        model: the module whose ``nn.Linear`` submodules are hooked (the one ``forward`` runs).
        forward: a closure running the model with grad enabled and returning ``(n_rows,)`` scalars.
        n_rows: the batch size of every hooked call (``x.shape[0]``).
        named_params: from [`resolve_params`][prefopt.diagnostics.pergrad.resolve_params].
        method: ``"materialize"``, ``"ghost"`` or ``"auto"`` (per layer, the cheaper one); ignored (always
            materialize) when ``flat=True``.
        flat: also return the ``(n, P)`` per-row gradient matrix.

    Returns: [`RowGradients`][prefopt.diagnostics.pergrad.RowGradients]. Cost: one forward, one backward,
    per-layer einsums; plus ``n`` backward calls restricted to the fallback parameters if there are any.
    """
    if method not in ("auto", "materialize", "ghost"):
        raise ValueError(f"method must be 'auto', 'materialize' or 'ghost', got {method!r}")
    params = [p for _, p in named_params]
    names = [n for n, _ in named_params]
    pid = {id(p): i for i, p in enumerate(params)}
    owners: dict[int, int] = {}
    records: dict[nn.Module, _Record] = {}
    for mod in model.modules():
        if not isinstance(mod, nn.Linear):
            continue
        w = mod.weight if id(mod.weight) in pid else None
        b = mod.bias if mod.bias is not None and id(mod.bias) in pid else None
        if w is None and b is None:
            continue
        records[mod] = _Record(w, b)
        for q in (w, b):
            if q is not None:
                owners[id(q)] = owners.get(id(q), 0) + 1

    state = {"capturing": True}

    def fwd_hook(mod: nn.Module, args: tuple[Any, ...], out: Any) -> None:
        if not state["capturing"] or not torch.is_grad_enabled():
            return
        rec = records[mod]
        x = args[0] if args else None
        if (
            not isinstance(x, Tensor)
            or not isinstance(out, Tensor)
            or x.ndim != 3
            or x.shape[0] != n_rows
            or not out.requires_grad
        ):
            rec.ok = False
            return
        k = len(rec.xs)
        rec.xs.append(x.detach())
        rec.gs.append(None)

        def grad_hook(g: Tensor, rec: _Record = rec, k: int = k) -> None:
            rec.gs[k] = g.detach()

        out.register_hook(grad_hook)

    handles = [mod.register_forward_hook(fwd_hook) for mod in records]
    try:
        values = forward()
        state["capturing"] = False
        if not isinstance(values, Tensor) or values.shape != (n_rows,):
            raise ValueError(
                f"forward() must return a ({n_rows},) tensor, got {getattr(values, 'shape', type(values))}"
            )
        if not values.requires_grad:
            raise ValueError("the per-row values do not depend on the selected parameters (no gradient)")
        summed = torch.autograd.grad(values.sum(), params, retain_graph=True, allow_unused=True)
    finally:
        for h in handles:
            h.remove()

    full = [torch.zeros_like(p) if g is None else g for p, g in zip(params, summed, strict=True)]
    hooked: set[int] = set()
    blocks_gram: list[Tensor] = []
    per_param_flat: dict[int, Tensor] = {}
    n = n_rows
    for rec in records.values():
        if not rec.ok or not rec.xs or any(g is None for g in rec.gs):
            continue
        if any(owners[id(q)] > 1 for q in (rec.weight, rec.bias) if q is not None):
            continue  # a weight shared by several modules: cross terms, use the fallback
        x = torch.cat(rec.xs, dim=1)
        g = torch.cat([gg for gg in rec.gs if gg is not None], dim=1)
        work = torch.float64 if x.dtype == torch.float64 else torch.float32
        x, g = x.to(work), g.to(work)
        pieces: list[tuple[Tensor, Tensor | None]] = []  # (param, materialized (n, *shape) or None)
        ghost = not flat and (
            method == "ghost"
            or (
                method == "auto" and rec.weight is not None and (n * x.shape[1]) ** 2 < n * rec.weight.numel()
            )
        )
        if rec.weight is not None:
            if ghost:
                total = torch.einsum("nto,nti->oi", g, x)
                pieces.append((rec.weight, None))
            else:
                gw = torch.einsum("nto,nti->noi", g, x)
                total = gw.sum(0)
                pieces.append((rec.weight, gw))
            if not _close(total, full[pid[id(rec.weight)]]):
                continue
        if rec.bias is not None:
            gb = g.sum(dim=1)
            if not _close(gb.sum(0), full[pid[id(rec.bias)]]):
                continue
            pieces.append((rec.bias, gb))
        for q, mat in pieces:
            hooked.add(id(q))
            if mat is None:
                blocks_gram.append(_ghost_gram(x, g).double())
            else:
                m2 = mat.reshape(n, -1).double()
                per_param_flat[id(q)] = m2
                blocks_gram.append(m2 @ m2.T)

    fb = [p for p in params if id(p) not in hooked]
    if fb:
        fb_names = [names[pid[id(p)]] for p in fb]
        shown = ", ".join(fb_names[:5]) + (f", ... ({len(fb_names)} in all)" if len(fb_names) > 5 else "")
        warnings.warn(
            f"per-row gradients of {shown} use a loop of {n} backward passes (not weights of nn.Linear layers "
            "called on (rows, tokens, features) inputs, or shared); results are exact but slower",
            RuntimeWarning,
            stacklevel=3,
        )
        rows = []
        for i in range(n):
            gi = torch.autograd.grad(values[i], fb, retain_graph=True, allow_unused=True)
            rows.append(
                torch.cat(
                    [
                        (torch.zeros_like(p) if g is None else g).reshape(-1).double()
                        for p, g in zip(fb, gi, strict=True)
                    ]
                )
            )
        fbm = torch.stack(rows)
        blocks_gram.append(fbm @ fbm.T)
        off = 0
        for p in fb:
            per_param_flat[id(p)] = fbm[:, off : off + p.numel()]
            off += p.numel()

    gram = torch.stack(blocks_gram).sum(0) if blocks_gram else values.new_zeros(n, n, dtype=torch.float64)
    flat_out = None
    if flat:
        flat_out = torch.cat([per_param_flat[id(p)] for p in params], dim=1)
    return RowGradients(
        values=values.detach(),
        gram=gram,
        flat=flat_out,
        names=tuple(names),
        fallback=tuple(names[pid[id(p)]] for p in fb),
    )


def _close(a: Tensor, b: Tensor) -> bool:
    """Per-row gradients add up to the summed gradient (tolerance scaled to the gradient's size and dtype)."""
    b = b.to(a.dtype)
    scale = float(b.abs().max()) if b.numel() else 0.0
    tol = (1e-9 if a.dtype == torch.float64 else 1e-4) * max(scale, 1e-30) + 1e-30
    return bool((a - b).abs().max() <= tol) if a.numel() else True
