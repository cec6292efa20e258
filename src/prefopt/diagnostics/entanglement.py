r"""Gradient entanglement of pairwise preference losses: per-pair gradient geometry and first-order predictions.

Yuan, Zeng, Wu, Wang, Wang & Leqi 2024, "A Common Pitfall of Margin-based Language Model Alignment: Gradient
Entanglement" (arXiv 2410.13828). Notation: `S_w = log π_θ(y_w|x)`, `S_l = log π_θ(y_l|x)` (sums over
completion tokens), `∇_w = ∇_θ S_w`, `∇_l = ∇_θ S_l`. For any pairwise loss `L(S_w, S_l, ...)` define the
weights at the current point

$$
d_w = -\partial L/\partial S_w, \qquad d_l = \partial L/\partial S_l
$$

(DPO: `d_w = d_l = β σ(−β h)`). One SGD step of size `η` on this pair alone,
`θ⁺ = θ − η ∇_θ L = θ + η (d_w ∇_w − d_l ∇_l)`, changes the two log-probs to first order by

$$
\delta S_w \approx \eta\,\big(d_w \|\nabla_w\|^2 - d_l \langle\nabla_w,\nabla_l\rangle\big), \qquad
\delta S_l \approx \eta\,\big(d_w \langle\nabla_w,\nabla_l\rangle - d_l \|\nabla_l\|^2\big).
$$

So the chosen log-prob falls iff `⟨∇_w,∇_l⟩ > (d_w/d_l) ‖∇_w‖²` and the rejected one rises iff
`⟨∇_w,∇_l⟩ > (d_l/d_w) ‖∇_l‖²`; for `d_w = d_l` the step is "ideal" iff
`⟨∇_w,∇_l⟩ ≤ min(‖∇_w‖², ‖∇_l‖²)` (the `ratio` field below `≤ 1`). Both failures at once would need
`⟨∇_w,∇_l⟩² > ‖∇_w‖²‖∇_l‖²`, impossible by Cauchy–Schwarz. (These conditions are derived here — see
`docs/entanglement.md` — and checked numerically by [`entanglement`][prefopt.diagnostics.entanglement.entanglement] with `verify=True`.)
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from prefopt.diagnostics.pergrad import Method, per_row_gradients, resolve_params
from prefopt.policy import eval_mode
from prefopt.registry import get_loss
from prefopt.types import PairBatch, PairLogps, unpack_pair_batch

__all__ = [
    "EntanglementReport",
    "check_pair_batch",
    "entanglement",
    "first_order_changes",
    "loss_weights",
    "resolve_model",
]


# ----------------------------------------------------------------------------------------------------------
# small pure pieces
# ----------------------------------------------------------------------------------------------------------


def first_order_changes(
    chosen_weight: Tensor,
    rejected_weight: Tensor,
    chosen_sqnorm: Tensor,
    rejected_sqnorm: Tensor,
    inner: Tensor,
    *,
    eta: float,
) -> tuple[Tensor, Tensor]:
    r"""`(δS_w, δS_l)` to first order after `θ⁺ = θ + η (d_w ∇_w − d_l ∇_l)`; all inputs `(b,)`.

    `δS_w = η (d_w ‖∇_w‖² − d_l ⟨∇_w,∇_l⟩)`, `δS_l = η (d_w ⟨∇_w,∇_l⟩ − d_l ‖∇_l‖²)`.
    """
    dw = eta * (chosen_weight * chosen_sqnorm - rejected_weight * inner)
    dl = eta * (chosen_weight * inner - rejected_weight * rejected_sqnorm)
    return dw, dl


def loss_weights(loss_fn: Any, logps: PairLogps) -> tuple[Tensor, Tensor, Tensor]:
    """`(d_w, d_l, loss)` = `(−∂L/∂S_w, ∂L/∂S_l, L)` of a pairwise loss at `logps`, per pair `(b,)`.

    Computed by autograd on the loss as a function of detached leaf copies of `S_w` and `S_l` (float64),
    so it works for any registered pairwise loss whose pair `i` depends on pair `i` only.
    """
    s_w = logps.chosen.detach().double().requires_grad_(True)
    s_l = logps.rejected.detach().double().requires_grad_(True)

    def opt(x: Tensor | None) -> Tensor | None:
        return None if x is None else x.detach().double() if torch.is_floating_point(x) else x.detach()

    leaf = PairLogps(
        chosen=s_w,
        rejected=s_l,
        ref_chosen=opt(logps.ref_chosen),
        ref_rejected=opt(logps.ref_rejected),
        chosen_len=opt(logps.chosen_len),
        rejected_len=opt(logps.rejected_len),
    )
    with torch.enable_grad():
        out = loss_fn(leaf)
        loss = out.loss
        if loss.shape != s_w.shape:
            raise ValueError(
                f"loss {getattr(loss_fn, 'name', loss_fn)!r} returned shape {tuple(loss.shape)}; the entanglement "
                f"diagnostics need one loss value per pair {tuple(s_w.shape)}"
            )
        g_w, g_l = torch.autograd.grad(loss.sum(), (s_w, s_l), allow_unused=True)
    g_w = torch.zeros_like(s_w) if g_w is None else g_w
    g_l = torch.zeros_like(s_l) if g_l is None else g_l
    return -g_w.detach(), g_l.detach(), loss.detach()


def resolve_model(policy_or_model: Any) -> tuple[nn.Module, Any]:
    """`(model, policy)`: a `LoraPolicy`-like object (`.model` + `.reference()`) gives its peft model
    and itself; a plain `nn.Module` gives `(module, None)`."""
    if hasattr(policy_or_model, "reference") and isinstance(
        getattr(policy_or_model, "model", None), nn.Module
    ):
        return policy_or_model.model, policy_or_model
    if isinstance(policy_or_model, nn.Module):
        return policy_or_model, None
    raise TypeError(
        f"policy_or_model must be a prefopt.LoraPolicy or a torch.nn.Module, got {type(policy_or_model).__name__}"
    )


def check_pair_batch(batch: Any) -> tuple[Tensor, Tensor | None, Tensor, int]:
    """Validate a [`PairBatch`][prefopt.types.PairBatch] (or a dict with its keys); return
    `(input_ids, attention_mask, completion_mask, B)`.

    Raises `TypeError`/`KeyError`/`ValueError` naming the offending key: not a dict, a missing key, an
    odd or zero row count, a non-bool completion mask, a shape mismatch, or a row with no completion token.
    """
    ids, am, cm = unpack_pair_batch(batch)
    if not isinstance(ids, Tensor) or ids.ndim != 2:
        raise ValueError("batch['input_ids'] must be a (2B, T) tensor")
    rows = ids.shape[0]
    if rows == 0 or rows % 2:
        raise ValueError(
            f"batch['input_ids'] must have an even, non-zero number of rows (B chosen then B rejected), got {rows}"
        )
    if not isinstance(cm, Tensor) or cm.dtype != torch.bool:
        raise TypeError(
            f"batch['completion_mask'] must be a bool tensor, got {getattr(cm, 'dtype', type(cm))}"
        )
    if cm.shape != ids.shape:
        raise ValueError(
            f"batch['completion_mask'] has shape {tuple(cm.shape)} but input_ids has {tuple(ids.shape)}"
        )
    if am is not None and (not isinstance(am, Tensor) or am.shape != ids.shape):
        raise ValueError("batch['attention_mask'] must be a tensor shaped like input_ids")
    empty = (~cm.any(dim=1)).nonzero().flatten().tolist()
    if empty:
        b = rows // 2
        what = ", ".join(f"row {r} ({'chosen' if r < b else 'rejected'} of pair {r % b})" for r in empty[:5])
        raise ValueError(f"batch['completion_mask'] has an empty completion (no True) in {what}")
    return ids, am, cm, rows // 2


def _seq_logps(model: nn.Module, ids: Tensor, am: Tensor | None, cm: Tensor) -> Tensor:
    from prefopt.logprobs import token_logps
    from prefopt.masked import seq_sum

    lp = token_logps(model, ids, am, cm)
    return seq_sum(lp, cm)


# ----------------------------------------------------------------------------------------------------------
# the report
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EntanglementReport:
    r"""Per-pair gradient geometry of a batch; every tensor field is `(B,)` float64 (flags: bool).

    Attributes:
        inner: `⟨∇_w, ∇_l⟩`.
        chosen_sqnorm / rejected_sqnorm: `‖∇_w‖²` / `‖∇_l‖²`.
        cosine: `⟨∇_w,∇_l⟩ / (‖∇_w‖ ‖∇_l‖)` (NaN if a gradient is exactly zero).
        ratio: `⟨∇_w,∇_l⟩ / min(‖∇_w‖², ‖∇_l‖²)`; `> 1` means entangled for equal weights (NaN if the
            smaller norm is 0).
        chosen_weight / rejected_weight: `d_w = −∂L/∂S_w` and `d_l = ∂L/∂S_l` at the current point.
        pred_dchosen / pred_drejected: first-order `δS_w`, `δS_l` after one SGD step of size `eta` on
            the pair's own loss (see the module docstring).
        chosen_falls / rejected_rises: `pred_dchosen < 0` / `pred_drejected > 0`.
        chosen_logp / rejected_logp: `S_w`, `S_l` at the current point; ref_chosen / ref_rejected the
            reference values used for the loss (zeros when `reference == "none"`).
        loss: the per-pair loss value.
        measured_dchosen / measured_drejected: with `verify=True`, the change actually measured after
            taking the step (per pair, from the same point); else None.
        eta: the step size of the predicted change.
        loss_name: the registered loss the report differentiates.
        reference: `"policy"`, `"given"` or `"none"`.
        num_params: elements differentiated.
        fallback: parameter names whose per-row gradients used the slow loop.
        gram: `(2B, 2B)` inner products of all per-row gradients (rows `0..B−1` chosen, then rejected):
            the cross-pair entries say how a step on one pair moves another.
        pred_batch_dchosen / pred_batch_drejected: first-order `δS` of every row after ONE SGD step of size
            `eta` on the batch-mean loss `(1/B) Σ_j L_j` — what a training step does, other pairs
            included: `δS = gram · c` with `c = (η/B)·[d_w; −d_l]`.
        measured_batch_dchosen / measured_batch_drejected: with `verify=True`, the changes measured after
            that batch step; else None.
    """

    inner: Tensor
    chosen_sqnorm: Tensor
    rejected_sqnorm: Tensor
    cosine: Tensor
    ratio: Tensor
    chosen_weight: Tensor
    rejected_weight: Tensor
    pred_dchosen: Tensor
    pred_drejected: Tensor
    chosen_falls: Tensor
    rejected_rises: Tensor
    chosen_logp: Tensor
    rejected_logp: Tensor
    ref_chosen: Tensor
    ref_rejected: Tensor
    loss: Tensor
    measured_dchosen: Tensor | None
    measured_drejected: Tensor | None
    eta: float
    loss_name: str
    reference: str
    num_params: int
    fallback: tuple[str, ...]
    gram: Tensor
    pred_batch_dchosen: Tensor
    pred_batch_drejected: Tensor
    measured_batch_dchosen: Tensor | None = None
    measured_batch_drejected: Tensor | None = None

    @classmethod
    def from_gram(
        cls,
        gram: Tensor,
        logps: PairLogps,
        d_w: Tensor,
        d_l: Tensor,
        loss: Tensor,
        *,
        eta: float,
        loss_name: str,
        reference: str,
        num_params: int,
        fallback: tuple[str, ...] = (),
        measured_dchosen: Tensor | None = None,
        measured_drejected: Tensor | None = None,
        measured_batch_dchosen: Tensor | None = None,
        measured_batch_drejected: Tensor | None = None,
    ) -> EntanglementReport:
        """Assemble a report from the `(2B, 2B)` Gram matrix of per-row gradients (rows `0..B−1` chosen,
        `B..2B−1` rejected), the pair log-probs and the loss weights `d_w`, `d_l` at the current point:
        inner products and norms are read off the Gram matrix, cosine/ratio and the first-order predictions
        ([`first_order_changes`][prefopt.diagnostics.entanglement.first_order_changes]) derived from them."""
        b = gram.shape[0] // 2
        idx = torch.arange(b, device=gram.device)
        inner = gram[idx, idx + b]
        nw = gram[idx, idx]
        nl = gram[idx + b, idx + b]
        pred_w, pred_l = first_order_changes(d_w, d_l, nw, nl, inner, eta=eta)
        nan = torch.full_like(inner, float("nan"))
        denom = (nw * nl).sqrt()
        small = torch.minimum(nw, nl)
        assert logps.ref_chosen is not None and logps.ref_rejected is not None
        coef = (eta / b) * torch.cat([d_w, -d_l]).to(gram.dtype)
        pred_batch = gram @ coef
        return cls(
            inner=inner,
            chosen_sqnorm=nw,
            rejected_sqnorm=nl,
            cosine=torch.where(denom > 0, inner / denom.clamp(min=1e-300), nan),
            ratio=torch.where(small > 0, inner / small.clamp(min=1e-300), nan),
            chosen_weight=d_w,
            rejected_weight=d_l,
            pred_dchosen=pred_w,
            pred_drejected=pred_l,
            chosen_falls=pred_w < 0,
            rejected_rises=pred_l > 0,
            chosen_logp=logps.chosen,
            rejected_logp=logps.rejected,
            ref_chosen=logps.ref_chosen,
            ref_rejected=logps.ref_rejected,
            loss=loss,
            measured_dchosen=measured_dchosen,
            measured_drejected=measured_drejected,
            eta=eta,
            loss_name=loss_name,
            reference=reference,
            num_params=num_params,
            fallback=fallback,
            gram=gram,
            pred_batch_dchosen=pred_batch[:b],
            pred_batch_drejected=pred_batch[b:],
            measured_batch_dchosen=measured_batch_dchosen,
            measured_batch_drejected=measured_batch_drejected,
        )

    @property
    def chosen_grad_norm(self) -> Tensor:
        """`‖∇_w‖` `(B,)` — the input `chosen_grad_norm` of the `pairwise_normalized` loss."""
        return self.chosen_sqnorm.sqrt()

    @property
    def rejected_grad_norm(self) -> Tensor:
        """`‖∇_l‖` `(B,)`."""
        return self.rejected_sqnorm.sqrt()

    def summary(self) -> dict[str, float]:
        """Batch means / fractions as plain floats (for logging)."""
        out = {
            "cosine/mean": float(self.cosine.nanmean()),
            "ratio/mean": float(self.ratio.nanmean()),
            "inner/mean": float(self.inner.mean()),
            "chosen_sqnorm/mean": float(self.chosen_sqnorm.mean()),
            "rejected_sqnorm/mean": float(self.rejected_sqnorm.mean()),
            "chosen_falls/frac": float(self.chosen_falls.double().mean()),
            "rejected_rises/frac": float(self.rejected_rises.double().mean()),
        }
        out["batch_chosen_falls/frac"] = float((self.pred_batch_dchosen < 0).double().mean())
        out["batch_rejected_rises/frac"] = float((self.pred_batch_drejected > 0).double().mean())
        if self.measured_dchosen is not None and self.measured_drejected is not None:
            out["measured_chosen_falls/frac"] = float((self.measured_dchosen < 0).double().mean())
            out["measured_rejected_rises/frac"] = float((self.measured_drejected > 0).double().mean())
        if self.measured_batch_dchosen is not None and self.measured_batch_drejected is not None:
            out["measured_batch_chosen_falls/frac"] = float((self.measured_batch_dchosen < 0).double().mean())
            out["measured_batch_rejected_rises/frac"] = float(
                (self.measured_batch_drejected > 0).double().mean()
            )
        return out


def _ref_from_arg(ref_logps: Any, b: int) -> tuple[Tensor, Tensor]:
    if isinstance(ref_logps, PairLogps):
        return ref_logps.chosen.detach(), ref_logps.rejected.detach()
    if isinstance(ref_logps, Tensor):
        if ref_logps.shape != (2 * b,):
            raise ValueError(
                f"ref_logps must have shape ({2 * b},) (chosen rows then rejected), got {tuple(ref_logps.shape)}"
            )
        return ref_logps[:b].detach(), ref_logps[b:].detach()
    if isinstance(ref_logps, tuple) and len(ref_logps) == 2:
        c, r = ref_logps
        if not (isinstance(c, Tensor) and isinstance(r, Tensor) and c.shape == (b,) and r.shape == (b,)):
            raise ValueError(f"ref_logps=(ref_chosen, ref_rejected) must be two ({b},) tensors")
        return c.detach(), r.detach()
    raise TypeError(
        "ref_logps must be a PairLogps, a (2B,) tensor or a (ref_chosen, ref_rejected) tuple, "
        f"got {type(ref_logps).__name__}"
    )


def entanglement(
    policy_or_model: Any,
    batch: PairBatch | dict[str, Tensor],
    *,
    loss: str = "dpo",
    eta: float = 1e-3,
    params: Iterable[Any] | None = None,
    verify: bool = False,
    ref_logps: Any = None,
    method: Method = "auto",
    **loss_hparams: Any,
) -> EntanglementReport:
    r"""Per-pair gradient inner products, norms and first-order log-prob changes for a preference batch.

    Args:
        policy_or_model: a [`LoraPolicy`][prefopt.policy.LoraPolicy] (reference log-probs from `policy.reference()`) or a
            causal LM `nn.Module` (peft or plain).
        batch: `input_ids` `(2B, T)`, `attention_mask` `(2B, T)` (optional), bool `completion_mask`
            `(2B, T)`; rows `0..B−1` chosen, `B..2B−1` rejected.
        loss: a registered pairwise loss name (default `"dpo"`); `loss_hparams` are its hyperparameters.
        eta: SGD step size `η > 0` of the prediction (and of the verification step).
        params: parameters (or names) to differentiate; default every parameter with `requires_grad`
            (the LoRA adapter of a `LoraPolicy`).
        verify: also take the step, pair by pair, and measure `δS_w`, `δS_l`, and the SGD step on the
            batch-mean loss and measure every row's change (parameters are restored exactly afterwards).
            Costs one forward+backward and one forward per pair, plus one of each for the batch.
        ref_logps: reference sequence log-probs for a plain model: a `PairLogps` (its `chosen` /
            `rejected`), a `(2B,)` tensor or a `(ref_chosen, ref_rejected)` tuple. Without it and without
            a policy, `S_ref = 0` (reference-free; `reference="none"` in the report).
        method: per-row gradient method (see [`per_row_gradients`][prefopt.diagnostics.pergrad.per_row_gradients]).

    Cost: one forward and one backward of the `2B` rows (per-row gradients by hooks on `nn.Linear`
    layers), plus one reference forward. The model runs in `eval()` mode (dropout off) and is left as found.

    Returns: [`EntanglementReport`][prefopt.diagnostics.entanglement.EntanglementReport].
    """
    model, policy = resolve_model(policy_or_model)
    ids, am, cm, b = check_pair_batch(batch)
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not (math.isfinite(eta) and eta > 0):
        raise ValueError(f"eta must be a finite number > 0, got {eta!r}")
    loss_fn = get_loss(loss, **loss_hparams)
    named = resolve_params(model, params)

    with eval_mode(model):
        if ref_logps is not None:
            ref_w, ref_l = _ref_from_arg(ref_logps, b)
            reference = "given"
        elif policy is not None:
            with policy.reference():
                ref = _seq_logps(model, ids, am, cm).detach()
            ref_w, ref_l = ref[:b], ref[b:]
            reference = "policy"
        else:
            ref_w = ids.new_zeros(b, dtype=torch.float64)
            ref_l = ids.new_zeros(b, dtype=torch.float64)
            reference = "none"
        rg = per_row_gradients(model, lambda: _seq_logps(model, ids, am, cm), 2 * b, named, method=method)
        lens = cm.sum(dim=1)
        seq = rg.values.double()
        logps = PairLogps(
            chosen=seq[:b],
            rejected=seq[b:],
            ref_chosen=ref_w.double(),
            ref_rejected=ref_l.double(),
            chosen_len=lens[:b],
            rejected_len=lens[b:],
        )
        d_w, d_l, loss_val = loss_weights(loss_fn, logps)
        measured_w = measured_l = batch_w = batch_l = None
        if verify:
            measured_w, measured_l, batch_w, batch_l = _verify(
                model, named, loss_fn, ids, am, cm, logps, float(eta)
            )
    return EntanglementReport.from_gram(
        rg.gram,
        logps,
        d_w,
        d_l,
        loss_val,
        eta=float(eta),
        loss_name=loss,
        reference=reference,
        num_params=sum(p.numel() for _, p in named),
        fallback=rg.fallback,
        measured_dchosen=measured_w,
        measured_drejected=measured_l,
        measured_batch_dchosen=batch_w,
        measured_batch_drejected=batch_l,
    )


def _step_change(
    model: nn.Module,
    params: list[nn.Parameter],
    loss_fn: Any,
    ids: Tensor,
    am: Tensor | None,
    cm: Tensor,
    logps: PairLogps,
    pairs: Tensor,
    eta: float,
) -> Tensor:
    """Take `θ ← θ − η ∇_θ mean_{i ∈ pairs} L_i` and return the measured `δS` of the rows of `pairs`
    (`(2k,)`: chosen rows, then rejected). The caller restores `θ`."""
    b = ids.shape[0] // 2
    rows = torch.cat([pairs, pairs + b])
    sub_ids, sub_cm = ids[rows], cm[rows]
    sub_am = None if am is None else am[rows]
    k = pairs.shape[0]
    assert logps.ref_chosen is not None and logps.ref_rejected is not None
    with torch.enable_grad():
        s = _seq_logps(model, sub_ids, sub_am, sub_cm)
        pl = PairLogps(
            chosen=s[:k],
            rejected=s[k:],
            ref_chosen=logps.ref_chosen[pairs].to(s.dtype),
            ref_rejected=logps.ref_rejected[pairs].to(s.dtype),
            chosen_len=None if logps.chosen_len is None else logps.chosen_len[pairs],
            rejected_len=None if logps.rejected_len is None else logps.rejected_len[pairs],
        )
        grads = torch.autograd.grad(loss_fn(pl).loss.mean(), params, allow_unused=True)
    with torch.no_grad():
        for p, g in zip(params, grads, strict=True):
            if g is not None:
                p.sub_(eta * g.to(p.dtype))
        return _seq_logps(model, sub_ids, sub_am, sub_cm).double() - s.detach().double()


def _verify(
    model: nn.Module,
    named: list[tuple[str, nn.Parameter]],
    loss_fn: Any,
    ids: Tensor,
    am: Tensor | None,
    cm: Tensor,
    logps: PairLogps,
    eta: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Measured `δS_w, δS_l` after `θ ← θ − η ∇_θ L_i` for each pair `i` alone, then after one step on the
    batch mean `(1/B) Σ_j L_j`; `θ` is restored bit-exactly after each step (and on errors)."""
    params = [p for _, p in named]
    saved = [p.detach().clone() for p in params]
    b = ids.shape[0] // 2

    def restore() -> None:
        with torch.no_grad():
            for p, keep in zip(params, saved, strict=True):
                p.copy_(keep)

    try:
        alone = []
        for i in range(b):
            alone.append(
                _step_change(
                    model, params, loss_fn, ids, am, cm, logps, torch.tensor([i], device=ids.device), eta
                )
            )
            restore()
        batch = _step_change(
            model, params, loss_fn, ids, am, cm, logps, torch.arange(b, device=ids.device), eta
        )
    finally:
        restore()
    pair = torch.stack(alone)  # (B, 2): chosen, rejected
    return pair[:, 0], pair[:, 1], batch[:b], batch[b:]
