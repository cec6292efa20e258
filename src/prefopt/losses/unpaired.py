r"""Unpaired losses on labelled single completions: KTO (and APO-zero's unpaired variant).

Input: [`UnpairedLogps`][prefopt.types.UnpairedLogps] with ``(b,)`` fields ``logp`` (policy ``S(y_i)``),
``ref_logp`` (``S_ref(y_i)``), ``desirable`` (bool), and optionally ``kl_logp``/``kl_ref_logp`` ``(m,)`` —
log-probs of *mismatched* (prompt, completion) pairs used for KTO's reference point.
``ρ_i = S(y_i) − S_ref(y_i)``.

Metrics (detached): ``rewards`` ``β·ρ`` ``(b,)``; ``logps`` ``S`` ``(b,)``; ``desirable`` ``(b,)`` as 0./1.;
``kl`` the reference point ``z0`` (a 0-dim tensor). Unlike TRL, which concatenates the desirable losses
before the undesirable ones, ``loss[i]`` belongs to example ``i`` (the batch mean is the same).
"""

from __future__ import annotations

import torch
from torch import Tensor

from prefopt.registry import ge, gt, register_loss
from prefopt.types import LossOutput, UnpairedLogps

__all__ = ["apo_zero_unpaired", "kto", "kto_reference_point"]


def kto_reference_point(logps: UnpairedLogps) -> Tensor:
    r"""KTO's reference point
    \(z_0 = \mathrm{sg}\big(\max(0, \operatorname{mean}_j[S(y'_j; x_j) - S_{ref}(y'_j; x_j)])\big)\) (``z0``,
    0-dim).

    The mean runs over the mismatched pairs ``kl_logp``/``kl_ref_logp`` of this batch (TRL gathers it over
    ranks first: under data parallelism, all-reduce the mean yourself and build ``UnpairedLogps`` so that
    this function sees the global pairs, or accept the per-rank estimate). ``None`` ⇒ ``z0 = 0``.
    Detached: no gradient flows through ``z0``.
    """
    if logps.kl_logp is None or logps.kl_ref_logp is None:
        return torch.zeros((), dtype=logps.logp.dtype, device=logps.logp.device)
    if logps.kl_logp.numel() == 0:
        raise ValueError("kl_logp is empty: KTO's reference point needs at least one mismatched pair")
    return (logps.kl_logp - logps.kl_ref_logp).mean().detach().clamp(min=0).to(logps.logp.dtype)


def _metrics(logps: UnpairedLogps, rho: Tensor, beta: float, z0: Tensor) -> dict[str, Tensor]:
    return {
        "rewards": (beta * rho).detach(),
        "logps": logps.logp.detach(),
        "desirable": logps.desirable.to(rho.dtype),
        "kl": z0.detach(),
    }


@register_loss(
    "kto",
    inputs="unpaired",
    needs_reference=True,
    checks={"beta": gt(0), "desirable_weight": ge(0), "undesirable_weight": ge(0)},
)
def kto(
    logps: UnpairedLogps, *, beta: float = 0.1, desirable_weight: float = 1.0, undesirable_weight: float = 1.0
) -> LossOutput:
    r"""KTO: \(L_i = \lambda_D(1 - \sigma(\beta(\rho_i - z_0)))\) if \(y_i\) is desirable, else
    \(\lambda_U(1 - \sigma(\beta(z_0 - \rho_i)))\).

    Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization" (arXiv 2402.01306),
    Eq. (7) (prefopt's ``loss`` is the paper's ``λ_y − v(x, y)``, which has the same gradient); ``z0`` from
    [`kto_reference_point`][prefopt.losses.unpaired.kto_reference_point] (detached, clamped at 0). TRL
    ``KTOTrainer(loss_type="kto")``: same hyperparameters and defaults (``beta`` 0.1, ``desirable_weight``
    1.0, ``undesirable_weight`` 1.0). The paper recommends ``λ_D n_D / (λ_U n_U) ∈ [1, 4/3]`` (TRL warns
    otherwise; prefopt does not).

    Shapes: ``logps.logp`` ``(b,)`` → ``loss`` ``(b,)``. Zero point: ``ρ_i = z0`` ⇒ ``λ/2``.
    """
    z0 = kto_reference_point(logps)
    rho = logps.logp - logps.ref_logp
    des = torch.sigmoid(beta * (z0 - rho))  # = 1 − σ(β(ρ − z0))
    und = torch.sigmoid(beta * (rho - z0))  # = 1 − σ(β(z0 − ρ))
    loss = torch.where(logps.desirable, desirable_weight * des, undesirable_weight * und)
    return LossOutput(loss=loss, metrics=_metrics(logps, rho, beta, z0))


@register_loss(
    "apo_zero_unpaired",
    inputs="unpaired",
    needs_reference=True,
    checks={"beta": gt(0), "desirable_weight": ge(0), "undesirable_weight": ge(0)},
)
def apo_zero_unpaired(
    logps: UnpairedLogps, *, beta: float = 0.1, desirable_weight: float = 1.0, undesirable_weight: float = 1.0
) -> LossOutput:
    r"""APO-zero, unpaired: \(L_i = \lambda_D(1 - \sigma(\beta\rho_i))\) if desirable, else
    \(\lambda_U\sigma(\beta\rho_i)\).

    D'Oosterlinck et al. 2024 (arXiv 2408.06266), unpaired variant of Eq. (7); TRL
    ``KTOTrainer(loss_type="apo_zero_unpaired")`` (no KL reference point; ``kl_logp`` is ignored and the
    ``kl`` metric is 0). Zero point: ``ρ = 0`` ⇒ ``λ/2``.
    """
    rho = logps.logp - logps.ref_logp
    loss = torch.where(
        logps.desirable,
        desirable_weight * torch.sigmoid(-beta * rho),
        undesirable_weight * torch.sigmoid(beta * rho),
    )
    z0 = torch.zeros((), dtype=rho.dtype, device=rho.device)
    return LossOutput(loss=loss, metrics=_metrics(logps, rho, beta, z0))
