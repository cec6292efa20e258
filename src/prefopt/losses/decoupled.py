r"""Entanglement-aware pairwise losses: remedies for gradient entanglement (family `decoupled`, the module name).

Background (Yuan et al. 2024, "A Common Pitfall of Margin-based Language Model Alignment: Gradient
Entanglement", arXiv 2410.13828; derivations in ``docs/entanglement.md``). For a pairwise loss with weights
``d_w = −∂L/∂S_w`` and ``d_l = ∂L/∂S_l``, one SGD step of size ``η`` changes the log-probs by

$$
δS_w ≈ η (d_w ‖∇_w‖² − d_l ⟨∇_w,∇_l⟩), \qquad δS_l ≈ η (d_w ⟨∇_w,∇_l⟩ − d_l ‖∇_l‖²),
$$

so with DPO (``d_w = d_l``) the chosen log-prob *falls* whenever ``⟨∇_w,∇_l⟩ > ‖∇_w‖²`` (typical for pairs
that share most tokens). The losses here change the gradient so that this cannot, or is less likely to,
happen:

- ``pairwise_normalized`` — each pair's two gradients rescaled to unit norm (exact sign guarantee, needs the
  per-pair gradient norms from [`prefopt.diagnostics.entanglement`][prefopt.diagnostics.entanglement]).
- ``decoupled`` — DPO margin plus separately weighted per-response anchors against the reference.
- ``token_masked`` — per-token weights ``μ`` on the log-ratios with an L1 sparsity penalty (shared tokens,
  which dominate ``⟨∇_w,∇_l⟩``, can be masked out);
  [`shared_token_mask`][prefopt.losses.decoupled.shared_token_mask] gives the rule-based ``μ``.

The remedies follow the directions named by Yuan et al. 2024 (arXiv 2410.13828): each is written
out with its math here and tested for the property it promises.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from prefopt.registry import ge, gt, register_loss
from prefopt.types import LossOutput, PairBatch, PairLogps, check_mask, check_tensor, unpack_pair_batch

__all__ = [
    "decoupled",
    "decoupled_weights",
    "pairwise_normalized",
    "shared_token_mask",
    "token_masked",
]


def _logratios(logps: PairLogps, loss: str) -> tuple[Tensor, Tensor]:
    if logps.ref_chosen is None or logps.ref_rejected is None:
        raise ValueError(f"{loss} needs reference log-probs: PairLogps.ref_chosen and ref_rejected are None")
    return logps.chosen - logps.ref_chosen, logps.rejected - logps.ref_rejected


def _metrics(beta: float, rho_w: Tensor, rho_l: Tensor, s_w: Tensor, s_l: Tensor) -> dict[str, Tensor]:
    cr, rr = (beta * rho_w).detach(), (beta * rho_l).detach()
    return {
        "rewards/chosen": cr,
        "rewards/rejected": rr,
        "rewards/margins": cr - rr,
        "rewards/accuracies": (cr > rr).to(cr.dtype),
        "logps/chosen": s_w.detach(),
        "logps/rejected": s_l.detach(),
    }


# ----------------------------------------------------------------------------------------------------------
# Remedy 1: pairwise normalized gradients
# ----------------------------------------------------------------------------------------------------------


def _check_norm(name: str, x: object, like: Tensor) -> Tensor:
    t = check_tensor(name, x, ndim=1)
    if t.shape != like.shape:
        raise ValueError(
            f"{name} has shape {tuple(t.shape)} but the log-probs have shape {tuple(like.shape)}"
        )
    t = t.detach()
    if not bool(torch.isfinite(t).all()) or bool((t <= 0).any()):
        raise ValueError(
            f"{name} must be finite and > 0 (a per-pair gradient norm ‖∇ S‖, e.g. "
            "EntanglementReport.chosen_grad_norm); got a zero, negative or non-finite value"
        )
    return t.to(like.dtype)


@register_loss("pairwise_normalized", inputs="pairs", needs_reference=True, checks={"beta": gt(0)})
def pairwise_normalized(
    logps: PairLogps,
    chosen_grad_norm: Tensor,
    rejected_grad_norm: Tensor,
    weight: Tensor | None = None,
    *,
    beta: float = 0.1,
) -> LossOutput:
    r"""Pairwise normalized gradient descent as a surrogate loss (remedy 1 of Yuan et al. 2024, reconstructed).

    $$
    \tilde L = -\operatorname{sg}(d)\,\Big(\frac{S_w}{\operatorname{sg}(‖∇_w‖)} - \frac{S_l}{\operatorname{sg}(‖∇_l‖)}\Big),
    \qquad ∇_θ \tilde L = -d\,(u_w - u_l),\quad u = ∇/‖∇‖,
    $$

    with ``d = β σ(−β h)`` (DPO's weight, ``h = ρ_w − ρ_l``) unless ``weight`` is given. One SGD step then
    changes the log-probs by ``δS_w ≈ η d ‖∇_w‖ (1 − cos)``, ``δS_l ≈ −η d ‖∇_l‖ (1 − cos)``: the chosen
    log-prob never falls and the rejected never rises to first order, for every geometry (``cos ≤ 1``).
    (Normalizing by the *squared* norms would not give this guarantee.) Identical responses give a zero
    update.

    The returned ``loss`` has the **value of DPO** ``−log σ(βh)`` (so it can be logged and compared) and the
    **gradient of the surrogate**: ``loss = L_DPO.detach() + (L̃ − L̃.detach())``.

    Args:
        logps: ``(b,)`` fields with reference log-probs.
        chosen_grad_norm: ``(b,)`` ``‖∇_θ S_w‖``, ``‖∇_θ S_l‖`` over the trained
            parameters at the current point (e.g. ``EntanglementReport.chosen_grad_norm``); detached; must be
            finite and > 0.
        rejected_grad_norm: ``(b,)`` ``‖∇_θ S_w‖``, ``‖∇_θ S_l‖`` over the trained
            parameters at the current point (e.g. ``EntanglementReport.chosen_grad_norm``); detached; must be
            finite and > 0.
        weight: optional ``(b,)`` per-pair weight ``d ≥ 0`` replacing DPO's (e.g. another loss's weight);
            detached.
        beta: DPO's ``β > 0`` (default 0.1).

    Returns: ``loss`` ``(b,)``; metrics: the DPO reward metrics plus ``weight`` (``d``).
    """
    rho_w, rho_l = _logratios(logps, "pairwise_normalized")
    n_w = _check_norm("chosen_grad_norm", chosen_grad_norm, logps.chosen)
    n_l = _check_norm("rejected_grad_norm", rejected_grad_norm, logps.chosen)
    h = rho_w - rho_l
    if weight is None:
        d = beta * torch.sigmoid(-beta * h.detach())
    else:
        d = check_tensor("weight", weight, ndim=1).detach().to(logps.chosen.dtype)
        if d.shape != logps.chosen.shape or not bool(torch.isfinite(d).all()) or bool((d < 0).any()):
            raise ValueError(f"weight must be a finite, non-negative ({logps.chosen.shape[0]},) tensor")
    surrogate = -d * (logps.chosen / n_w - logps.rejected / n_l)
    value = -F.logsigmoid(beta * h)
    loss = value.detach() + (surrogate - surrogate.detach())
    metrics = _metrics(beta, rho_w, rho_l, logps.chosen, logps.rejected)
    metrics["weight"] = d.detach()
    return LossOutput(loss, metrics)


# ----------------------------------------------------------------------------------------------------------
# Remedy 1b: decoupled margin + per-response anchors
# ----------------------------------------------------------------------------------------------------------


def decoupled_weights(
    logps: PairLogps,
    *,
    beta: float = 0.1,
    margin_weight: float = 1.0,
    chosen_weight: float = 1.0,
    rejected_weight: float = 0.0,
) -> tuple[Tensor, Tensor]:
    r"""Closed-form ``(d_w, d_l) = (−∂L/∂S_w, ∂L/∂S_l)`` of [`decoupled`][prefopt.losses.decoupled.decoupled] (``(b,)`` each):
    ``d_w = β (m σ(−βh) + c σ(−βρ_w))``, ``d_l = β (m σ(−βh) + r σ(βρ_l))``."""
    rho_w, rho_l = _logratios(logps, "decoupled")
    margin = margin_weight * torch.sigmoid(-beta * (rho_w - rho_l))
    return (
        beta * (margin + chosen_weight * torch.sigmoid(-beta * rho_w)),
        beta * (margin + rejected_weight * torch.sigmoid(beta * rho_l)),
    )


def _decoupled_validator(hp: dict[str, float]) -> None:  # type: ignore[misc]
    if hp["margin_weight"] + hp["chosen_weight"] + hp["rejected_weight"] <= 0:
        raise ValueError(
            "decoupled: margin_weight + chosen_weight + rejected_weight must be > 0 (all zero = no loss)"
        )


@register_loss(
    "decoupled",
    inputs="pairs",
    needs_reference=True,
    checks={"beta": gt(0), "margin_weight": ge(0), "chosen_weight": ge(0), "rejected_weight": ge(0)},
    validator=_decoupled_validator,  # type: ignore[arg-type]
)
def decoupled(
    logps: PairLogps,
    *,
    beta: float = 0.1,
    margin_weight: float = 1.0,
    chosen_weight: float = 1.0,
    rejected_weight: float = 0.0,
) -> LossOutput:
    r"""DPO margin plus separately weighted anchors that raise the chosen and lower the rejected log-prob.

    $$
    L = m\,[-\log σ(β h)] + c\,[-\log σ(β ρ_w)] + r\,[-\log σ(-β ρ_l)], \qquad h = ρ_w − ρ_l,
    $$

    ``m = margin_weight``, ``c = chosen_weight``, ``r = rejected_weight``. The anchors are NCA/APO-zero-style
    per-response terms against the reference (Chen et al. 2024, NCA, arXiv 2402.05369; D'Oosterlinck et al.
    2024, APO, arXiv 2408.06266; the DPOP penalty of Pal et al. 2024, arXiv 2402.13228, Eq. 3, plays the same
    role with a hinge): ``c`` pushes ``S_w`` above ``S^ref_w``, ``r`` pushes ``S_l`` below ``S^ref_l``.
    ``m = 1, c = r = 0`` is DPO; ``m = 0, c = r = 1`` is an APO-zero-like loss with log-sigmoid terms.

    Gradient: ``∂L/∂S_w = −d_w``, ``∂L/∂S_l = d_l`` with (see
    [`decoupled_weights`][prefopt.losses.decoupled.decoupled_weights]) ``d_w = β (m σ(−βh) + c σ(−βρ_w))``,
    ``d_l = β (m σ(−βh) + r σ(βρ_l))``. One SGD step changes ``S_w`` by ``η (d_w ‖∇_w‖² − d_l ⟨∇_w,∇_l⟩)`` to
    first order, so **δS_w > 0 iff** ``⟨∇_w,∇_l⟩ < (d_w/d_l) ‖∇_w‖²`` — the DPO condition with the threshold
    raised by the factor ``d_w/d_l = 1 + c σ(−βρ_w)/(m σ(−βh))`` when ``r = 0``. It is guaranteed **for every
    geometry** when ``d_w ‖∇_w‖ ≥ d_l ‖∇_l‖`` (then ``d_l⟨∇_w,∇_l⟩ ≤ d_l‖∇_w‖‖∇_l‖ ≤ d_w‖∇_w‖²`` by
    Cauchy–Schwarz), in particular always when ``m = r = 0``. Symmetrically ``δS_l < 0`` iff
    ``⟨∇_w,∇_l⟩ < (d_l/d_w)‖∇_l‖²``.

    Args:
        logps: ``(b,)`` fields with reference log-probs.
        beta: ``β > 0`` (default 0.1).
        margin_weight: ``m ≥ 0`` (default 1); ``m``, ``c`` and ``r`` must not all be zero.
        chosen_weight: ``c ≥ 0`` (default 1).
        rejected_weight: ``r ≥ 0`` (default 0).

    Returns: ``loss`` ``(b,)``; metrics: reward metrics plus ``weight/chosen`` (``d_w``) and
    ``weight/rejected`` (``d_l``).
    """
    rho_w, rho_l = _logratios(logps, "decoupled")
    loss = (
        margin_weight * -F.logsigmoid(beta * (rho_w - rho_l))
        + chosen_weight * -F.logsigmoid(beta * rho_w)
        + rejected_weight * -F.logsigmoid(-beta * rho_l)
    )
    d_w, d_l = decoupled_weights(
        logps,
        beta=beta,
        margin_weight=margin_weight,
        chosen_weight=chosen_weight,
        rejected_weight=rejected_weight,
    )
    metrics = _metrics(beta, rho_w, rho_l, logps.chosen, logps.rejected)
    metrics["weight/chosen"] = d_w.detach()
    metrics["weight/rejected"] = d_l.detach()
    return LossOutput(loss, metrics)


# ----------------------------------------------------------------------------------------------------------
# Remedy 2: sparsity-regularized token masking
# ----------------------------------------------------------------------------------------------------------


def _check_rows(name: str, x: Tensor) -> int:
    rows = x.shape[0]
    if rows == 0 or rows % 2:
        raise ValueError(
            f"{name} must have an even, non-zero number of rows (B chosen then B rejected), got {rows}"
        )
    return rows // 2


def shared_token_mask(batch: PairBatch | dict[str, Tensor]) -> Tensor:
    r"""Rule-based token weights ``μ`` ``(2B, T)`` float32 for [`token_masked`][prefopt.losses.decoupled.token_masked].

    ``μ = 1`` on completion tokens, except ``μ = 0`` on a token *shared* with the paired response: completion
    offset ``k`` (0-based index among the row's completion tokens) is shared when both responses have a token
    at offset ``k`` and it is the same id. Outside the completion ``μ = 0`` (it is masked there anyway).
    Same definition as
    [`prefopt.diagnostics.shared_offsets`][prefopt.diagnostics.token_correlation.shared_offsets].

    Raises ``ValueError``/``TypeError`` naming the key: odd rows, non-bool completion mask, empty completion.
    """
    ids, _, cm = unpack_pair_batch(batch)
    check_tensor("batch['input_ids']", ids, ndim=2, floating=False)
    check_tensor("batch['completion_mask']", cm, ndim=2, floating=False)
    if cm.dtype != torch.bool or cm.shape != ids.shape:
        raise TypeError("batch['completion_mask'] must be a bool tensor shaped like input_ids")
    b = _check_rows("batch['input_ids']", ids)
    mu = cm.float()
    for i in range(b):
        pw, pl = cm[i].nonzero().flatten(), cm[i + b].nonzero().flatten()
        if pw.numel() == 0 or pl.numel() == 0:
            raise ValueError(f"batch['completion_mask'] has an empty completion in pair {i}")
        k = min(pw.numel(), pl.numel())
        same = ids[i, pw[:k]] == ids[i + b, pl[:k]]
        mu[i, pw[:k][same]] = 0.0
        mu[i + b, pl[:k][same]] = 0.0
    return mu


@register_loss(
    "token_masked",
    inputs="token_pairs",
    checks={"beta": gt(0), "sparsity": ge(0)},
)
def token_masked(
    policy_logps: Tensor,
    ref_logps: Tensor,
    completion_mask: Tensor,
    mu: Tensor,
    *,
    beta: float = 0.1,
    sparsity: float = 0.0,
) -> LossOutput:
    r"""DPO on ``μ``-weighted token log-ratios with an L1 sparsity penalty on ``μ`` (remedy 2, reconstructed;
    cf. SparsePO, Christopoulou et al. 2024, arXiv 2410.05102).

    $$
    ρ^μ(y) = Σ_t m_t μ_t (ℓ_t − ℓ^{ref}_t),\qquad
    L = -\log σ\big(β (ρ^μ(y_w) − ρ^μ(y_l))\big) + λ \Big(\frac{Σ_t m_t μ_{w,t}}{|y_w|} + \frac{Σ_t m_t μ_{l,t}}{|y_l|}\Big),
    $$

    ``λ = sparsity``. ``μ ∈ [0, 1]`` is given: rule-based
    ([`shared_token_mask`][prefopt.losses.decoupled.shared_token_mask]: 0 on tokens shared by both responses,
    whose gradients make up most of ``⟨∇_w,∇_l⟩``) or produced by a learned head, e.g.
    ``sigmoid(w·sg(hidden))``; gradients flow into ``μ`` when it requires grad, and the L1 term drives
    low-contrast tokens to 0. With ``μ ≡ 1`` and ``λ = 0`` this **is** DPO on the summed log-probs (same
    value, same gradient); with ``λ > 0`` and a constant ``μ`` the penalty is a constant (same gradient).

    Args:
        policy_logps: ``(2B, T)`` per-token log-probs (``prefopt.logprobs.token_logps``), chosen
            rows first.
        ref_logps: ``(2B, T)`` reference per-token log-probs, same layout, treated as a constant.
        completion_mask: ``(2B, T)`` bool.
        mu: ``(2B, T)`` weights in ``[0, 1]`` (values outside the completion are ignored).
        beta: ``β > 0`` (default 0.1).
        sparsity: ``λ ≥ 0`` (default 0, so that ``μ ≡ 1`` is exactly DPO).

    Returns: ``loss`` ``(B,)``; metrics: reward metrics (``β ρ^μ``), ``mask/chosen_frac`` and
    ``mask/rejected_frac`` (``Σ m μ / |y|``), ``mask/degenerate`` (1.0 where a response keeps no weight at all,
    ``Σ m μ = 0``: that response then does not enter the loss).
    """
    check_tensor("policy_logps", policy_logps, ndim=2)
    check_tensor("ref_logps", ref_logps, ndim=2)
    check_tensor("mu", mu, ndim=2)
    check_tensor("completion_mask", completion_mask, ndim=2, floating=False)
    shape = policy_logps.shape
    check_mask("completion_mask", completion_mask, tuple(shape), "policy_logps")
    for name, x in (("ref_logps", ref_logps), ("mu", mu)):
        if x.shape != shape:
            raise ValueError(f"{name} has shape {tuple(x.shape)} but policy_logps has shape {tuple(shape)}")
    b = _check_rows("policy_logps", policy_logps)
    lens = completion_mask.sum(dim=1)
    if bool((lens == 0).any()):
        bad = (lens == 0).nonzero().flatten().tolist()
        raise ValueError(f"completion_mask has an empty completion in row(s) {bad[:5]}")
    mu_in = torch.where(completion_mask, mu, torch.zeros((), dtype=mu.dtype, device=mu.device))
    if bool(((mu_in < 0) | (mu_in > 1) | ~torch.isfinite(mu_in)).any()):
        raise ValueError("mu must lie in [0, 1] on completion tokens")
    dtype = policy_logps.dtype
    w = mu_in.to(dtype)
    zero = torch.zeros((), dtype=dtype, device=policy_logps.device)
    diff = torch.where(completion_mask, policy_logps - ref_logps.detach().to(dtype), zero)
    rho = (w * diff).sum(dim=1)
    seq = torch.where(completion_mask, policy_logps, zero).sum(dim=1)
    rho_w, rho_l = rho[:b], rho[b:]
    kept = w.sum(dim=1)
    frac = kept / lens.to(dtype)
    loss = -F.logsigmoid(beta * (rho_w - rho_l)) + sparsity * (frac[:b] + frac[b:])
    metrics = _metrics(beta, rho_w, rho_l, seq[:b], seq[b:])
    metrics["mask/chosen_frac"] = frac[:b].detach()
    metrics["mask/rejected_frac"] = frac[b:].detach()
    metrics["mask/degenerate"] = ((kept[:b] <= 0) | (kept[b:] <= 0)).to(dtype).detach()
    return LossOutput(loss, metrics)
