"""Reward-model losses: Bradley–Terry pairwise and pointwise classification (BCE).

The scalar reward head lives elsewhere; these losses take its outputs ``r`` (one float per sequence, with
grad) and return one loss per pair / per example (``(b,)``, unreduced). Registered with
``inputs="rewards"``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from prefopt.registry import ge, register_loss
from prefopt.types import LossOutput, check_tensor

__all__ = ["bradley_terry", "reward_classification"]


def _vector(name: str, x: object, b: int | None = None, like: str = "") -> Tensor:
    t = check_tensor(name, x, ndim=1)
    if b is not None and t.shape[0] != b:
        raise ValueError(f"{name} has shape {tuple(t.shape)} but {like} has shape ({b},)")
    return t


@register_loss("bradley_terry", inputs="rewards", checks={"center_coef": ge(0)})
def bradley_terry(
    rewards_chosen: Tensor,
    rewards_rejected: Tensor,
    margin: Tensor | None = None,
    *,
    center_coef: float = 0.0,
) -> LossOutput:
    r"""Pairwise Bradley–Terry reward-model loss with an optional margin and reward centering.

    Per pair (Ouyang et al. 2022, Eq. 1; PE-RLHF §3 ``L_r``; margin as in Llama 2, Touvron et al. 2023,
    Eq. 2; centering from Eisenstein et al. 2023, "Helping or Herding?", Eq. 2):

    $$
    L = -\log\sigma(r_c - r_r - m) + c\,(r_c + r_r)^2
    $$

    ``m`` is an optional per-pair margin (0 if absent); the centering term pushes the two rewards towards a
    zero sum so that the (shift-invariant) BT loss yields mean-zero rewards. TRL's ``RewardTrainer``
    computes the same two terms and averages each over the batch (``center_rewards_coefficient``,
    recommended 0.01, default off); here they stay per pair. Equal rewards without margin or centering
    give ``log 2``.

    Args:
        rewards_chosen: ``(b,)`` rewards of the preferred completions ``r_c``.
        rewards_rejected: ``(b,)`` rewards of the rejected completions ``r_r``.
        margin: optional ``(b,)`` margins ``m`` (treated as data, not differentiated).
        center_coef: ``c ≥ 0`` (default 0.0 = off).

    Returns:
        ``LossOutput`` with ``loss`` ``(b,)``; metrics per pair: ``accuracy`` (1.0 where ``r_c > r_r``),
        ``margins`` (``r_c − r_r``), ``rewards/chosen``, ``rewards/rejected``.
    """
    _vector("rewards_chosen", rewards_chosen)
    b = rewards_chosen.shape[0]
    _vector("rewards_rejected", rewards_rejected, b, "rewards_chosen")
    diff = rewards_chosen - rewards_rejected
    logits = diff if margin is None else diff - _vector("margin", margin, b, "rewards_chosen").detach()
    loss = -F.logsigmoid(logits)
    if center_coef > 0:
        loss = loss + center_coef * (rewards_chosen + rewards_rejected).square()
    metrics = {
        "accuracy": (diff > 0).to(diff.dtype),
        "margins": diff,
        "rewards/chosen": rewards_chosen,
        "rewards/rejected": rewards_rejected,
    }
    return LossOutput(loss, {k: v.detach() for k, v in metrics.items()})


@register_loss("reward_classification", inputs="rewards")
def reward_classification(rewards: Tensor, labels: Tensor) -> LossOutput:
    r"""Pointwise classification reward-model loss: binary cross-entropy on ``σ(r)`` (PE-RLHF §3).

    Per example, with label (or soft label / probability) ``p ∈ [0, 1]``:

    $$
    L = -p\,\log\sigma(r) - (1 - p)\,\log\sigma(-r)
    $$

    computed from logits (``binary_cross_entropy_with_logits``), so it stays finite for any finite ``r``.
    ``r`` is then a logit of "good": ``σ(r)`` estimates ``P(label = 1)``. Its minimum over ``r`` is the
    binary entropy ``H(p)`` (0 for hard labels).

    Args:
        rewards: ``(b,)`` reward logits ``r`` (with grad).
        labels: ``(b,)`` labels: bool, integer 0/1, or float in [0, 1] (soft labels); not differentiated.

    Returns:
        ``LossOutput`` with ``loss`` ``(b,)``; metrics per example: ``prob`` (``σ(r)``), ``accuracy``
        (1.0 where ``σ(r) > ½`` agrees with ``p > ½``; ½-labels count as 0.5).

    Raises:
        ValueError naming ``labels`` if a label is outside [0, 1] or NaN (checks values: one device sync).
    """
    _vector("rewards", rewards)
    if not isinstance(labels, Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.shape != rewards.shape:
        raise ValueError(
            f"labels has shape {tuple(labels.shape)} but rewards has shape {tuple(rewards.shape)}"
        )
    if labels.is_complex():
        raise TypeError(f"labels must be real, got dtype {labels.dtype}")
    p = labels.detach().to(rewards.dtype)
    if not bool(((p >= 0) & (p <= 1)).all()):
        raise ValueError(
            "labels must lie in [0, 1] (hard 0/1 labels or probabilities); got values outside or NaN"
        )
    loss = F.binary_cross_entropy_with_logits(rewards, p, reduction="none")
    pred = (rewards > 0).to(rewards.dtype)
    target = (p > 0.5).to(rewards.dtype)
    accuracy = torch.where(p == 0.5, torch.full_like(p, 0.5), (pred == target).to(rewards.dtype))
    return LossOutput(loss, {"prob": torch.sigmoid(rewards).detach(), "accuracy": accuracy.detach()})
