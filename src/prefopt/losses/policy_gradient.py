"""Policy-gradient losses for online RLHF: REINFORCE (+ learned value baseline), RLOO, GRPO, PPO.

All are pure functions of tensors registered with ``inputs="tokens"``; their data arguments are
positional tensors (not :class:`~prefopt.types.PairLogps`) and their hyperparameters keyword-only.

Conventions (``docs/rl.md`` has the equations and a table):

* ``logp`` ``(b, t)`` per-token log-probs of the sampled tokens under the current policy (with grad),
  ``old_logp`` under the sampling policy, ``ref_logp`` under the reference; ``mask`` ``(b, t)`` **bool**
  (True = completion token that counts; left or right padding both fine).
* Advantages, rewards, returns and old quantities are treated as constants (``detach``-ed inside).
* Sequence-level losses (REINFORCE, RLOO) return one loss per sequence ``(b,)``; token-level losses
  (GRPO, PPO) return the unreduced per-token loss ``(b, t)``, exactly 0 where ``mask`` is False, and the
  caller reduces it with :mod:`prefopt.masked` (``token_mean(loss, mask, num_tokens=N_global)`` is
  invariant to how a batch is split into micro-batches).
* Turn advantages into per-token tensors with :mod:`prefopt.rl` (``gae``, ``rloo_advantages``,
  ``group_advantages``, ``kl_penalized_rewards``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from prefopt.masked import masked_mean
from prefopt.registry import ge, gt, one_of, register_loss
from prefopt.rl import kl_estimate, rloo_advantages
from prefopt.types import LossOutput, check_mask, check_tensor

__all__ = ["grpo", "ppo", "reinforce", "rloo"]


# ----------------------------------------------------------------------------------------------------------
# input validation
# ----------------------------------------------------------------------------------------------------------


def _tokens(name: str, x: Any, shape: torch.Size | None = None, like: str = "logp") -> Tensor:
    check_tensor(name, x, ndim=2)
    if shape is not None and x.shape != shape:
        raise ValueError(f"{name} has shape {tuple(x.shape)} but {like} has shape {tuple(shape)}")
    return x


def _per_sequence_or_token(name: str, x: Any, shape: torch.Size) -> Tensor:
    """Accept ``(b,)`` (broadcast over tokens) or ``(b, t)``; return ``(b, t)`` or ``(b, 1)``."""
    check_tensor(name, x)
    if x.shape == shape:
        return x
    if x.ndim == 1 and x.shape[0] == shape[0]:
        return x.unsqueeze(1)
    raise ValueError(
        f"{name} has shape {tuple(x.shape)}; expected ({shape[0]},) per sequence or {tuple(shape)} per token"
    )


def _where(mask: Tensor, x: Tensor) -> Tensor:
    return torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))


def _seq_sum(x: Tensor, mask: Tensor) -> Tensor:
    return _where(mask, x).sum(dim=-1)


def _detached(metrics: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach() for k, v in metrics.items()}


def _clipped_surrogate(ratio: Tensor, adv: Tensor, lo: float, hi: float) -> Tensor:
    """``max(−A·ρ, −A·clip(ρ, lo, hi))``: the negated PPO surrogate (Schulman et al. 2017, Eq. 7)."""
    return torch.maximum(-adv * ratio, -adv * ratio.clamp(lo, hi))


# ----------------------------------------------------------------------------------------------------------
# REINFORCE
# ----------------------------------------------------------------------------------------------------------


@register_loss("reinforce", inputs="tokens", checks={"value_coef": ge(0)})
def reinforce(
    logp: Tensor, mask: Tensor, rewards: Tensor, values: Tensor | None = None, *, value_coef: float = 1.0
) -> LossOutput:
    r"""REINFORCE for language models with an optional learned value baseline (one loss per sequence).

    Terminal reward, γ = 1, so the return of every token is the sequence reward ``R`` (PE-RLHF,
    Sidahmed et al. 2024, §3; "REINFORCE for Language Models", Lee et al. 2023 RLAIF App. F)::

        no baseline:              L = −R · Σ_t m_t ℓ_t
        per-sequence value (b,):  L = −sg(R − V) · Σ_t m_t ℓ_t        + c_v · (R − V)²
        per-token value (b, t):   L = −Σ_t m_t ℓ_t · sg(R − V_t)      + c_v · Σ_t m_t (R − V_t)²

    ``V_t = V_ψ(x, y_<t)`` (a value head read at every completion position) is the paper's form; a single
    ``V(x)`` per prompt (``values`` of shape ``(b,)``) is the cheaper per-sequence variant. The value loss
    is a *sum* over tokens as in the paper (it grows with length; scale ``value_coef`` or use the
    per-sequence form if that matters). The baseline does not bias the policy gradient because it does
    not depend on the sampled token it multiplies.

    Args:
        logp: ``(b, t)`` policy log-probs of the sampled tokens (with grad).
        mask: ``(b, t)`` bool completion mask.
        rewards: ``(b,)`` sequence returns ``R`` (e.g. ``kl_penalized_rewards(...).sequence_rewards``;
            detached inside).
        values: ``None`` (plain REINFORCE), ``(b,)`` or ``(b, t)`` value predictions (with grad for the
            value loss; detached in the policy term).
        value_coef: ``c_v ≥ 0`` (default 1.0: the paper's unweighted ``L_V``, whose value model has its own
            LoRA parameters).

    Returns:
        ``LossOutput`` with ``loss`` ``(b,)``; metrics (per sequence): ``pg_loss``, ``value_loss`` (0 without
        values), ``advantages`` (``R − V``, mean over valid tokens for per-token values), ``seq_logp``.
    """
    _tokens("logp", logp)
    mask = check_mask("mask", mask, logp.shape, "logp")
    check_tensor("rewards", rewards, ndim=1)
    if rewards.shape[0] != logp.shape[0]:
        raise ValueError(f"rewards has shape {tuple(rewards.shape)} but logp has {logp.shape[0]} rows")
    ret = rewards.detach()
    seq_logp = _seq_sum(logp, mask)
    if values is None:
        adv = ret
        pg = -adv * seq_logp
        value_loss = torch.zeros_like(pg)
    elif check_tensor("values", values).ndim == 1:
        if values.shape != rewards.shape:
            raise ValueError(
                f"values has shape {tuple(values.shape)} but rewards has shape {tuple(rewards.shape)}"
            )
        adv = ret - values.detach()
        pg = -adv * seq_logp
        value_loss = (ret - values).square()
    else:
        _tokens("values", values, logp.shape)
        adv_t = ret.unsqueeze(1) - values.detach()
        pg = -_seq_sum(logp * adv_t, mask)
        value_loss = _seq_sum((ret.unsqueeze(1) - values).square(), mask)
        adv = masked_mean(adv_t, mask, dim=-1)
    loss = pg + value_coef * value_loss
    metrics = {"pg_loss": pg, "value_loss": value_loss, "advantages": adv, "seq_logp": seq_logp}
    return LossOutput(loss, _detached(metrics))


# ----------------------------------------------------------------------------------------------------------
# RLOO
# ----------------------------------------------------------------------------------------------------------


@register_loss("rloo", inputs="tokens", checks={"clip": gt(0)})
def rloo(
    logp: Tensor, mask: Tensor, rewards: Tensor, old_logp: Tensor | None = None, *, clip: float = 0.2
) -> LossOutput:
    r"""REINFORCE leave-one-out (Ahmadian et al. 2024, "Back to Basics", Eq. 9; Kool et al. 2019).

    ``k`` completions per prompt; the whole completion is one action, ``S_i = Σ_t m_t ℓ_t``::

        A_i = R_i − 1/(k−1) Σ_{j≠i} R_j                         (prefopt.rl.rloo_advantages)
        L_i = −A_i · S_i                                          (on-policy, old_logp=None)
        L_i = max(−A_i ρ_i, −A_i clip(ρ_i, 1−ε, 1+ε)),  ρ_i = exp(S_i − S_i^old)   (old_logp given)

    The clipped form is TRL's sequence-level PPO wrapper for reusing a rollout; at ``ρ = 1`` its gradient
    equals the plain form's. KL is expected *in the reward* (``R = score − β Σ_t k1_t``, see
    ``prefopt.rl.kl_penalized_rewards``), as in the paper and TRL.

    Args:
        logp: ``(prompts·k, t)`` policy log-probs; row ``i·k + j`` is completion ``j`` of prompt ``i``
            (the row-major order of ``rewards``).
        mask: ``(prompts·k, t)`` bool completion mask.
        rewards: ``(prompts, k)`` rewards, ``k ≥ 2`` (detached inside).
        old_logp: optional ``(prompts·k, t)`` sampling-policy log-probs for the clipped form.
        clip: ε > 0 of the sequence-level clip (default 0.2, TRL); unused when ``old_logp`` is None.

    Returns:
        ``LossOutput`` with ``loss`` ``(prompts·k,)``; metrics per sequence: ``advantages``, ``seq_logp``,
        ``ratio`` (1 when on-policy) and ``clipped`` (1.0 where the clip removed the gradient).
    """
    _tokens("logp", logp)
    mask = check_mask("mask", mask, logp.shape, "logp")
    check_tensor("rewards", rewards)
    if rewards.ndim != 2:
        raise ValueError(f"rewards must be 2-D (prompts, k), got shape {tuple(rewards.shape)}")
    if rewards.numel() != logp.shape[0]:
        raise ValueError(
            f"rewards has shape {tuple(rewards.shape)} ({rewards.numel()} completions) but logp has "
            f"{logp.shape[0]} rows; expected prompts·k rows"
        )
    adv = rloo_advantages(rewards.detach()).reshape(-1).to(logp.dtype)
    seq_logp = _seq_sum(logp, mask)
    if old_logp is None:
        loss = -adv * seq_logp
        ratio = torch.ones_like(seq_logp)
        clipped = torch.zeros_like(seq_logp)
    else:
        _tokens("old_logp", old_logp, logp.shape)
        ratio = torch.exp(seq_logp - _seq_sum(old_logp.detach(), mask))
        loss = _clipped_surrogate(ratio, adv, 1.0 - clip, 1.0 + clip)
        clipped = ((adv > 0) & (ratio > 1 + clip)) | ((adv < 0) & (ratio < 1 - clip))
    metrics = {"advantages": adv, "seq_logp": seq_logp, "ratio": ratio, "clipped": clipped.to(logp.dtype)}
    return LossOutput(loss, _detached(metrics))


# ----------------------------------------------------------------------------------------------------------
# GRPO
# ----------------------------------------------------------------------------------------------------------

_AGGREGATIONS = ("none", "grpo", "dapo", "dr_grpo")


def _grpo_validator(hp: Mapping[str, Any]) -> None:
    eh = hp["epsilon_high"]
    if eh is not None and not (
        isinstance(eh, (int, float)) and not isinstance(eh, bool) and 0 <= eh < float("inf")
    ):
        raise ValueError(
            f"grpo: hyperparameter epsilon_high={eh!r} is out of range; allowed: None or a number >= 0"
        )
    if hp["epsilon_low"] >= 1:
        raise ValueError(
            f"grpo: hyperparameter epsilon_low={hp['epsilon_low']!r} must be < 1 (ratio ≥ 1 − ε > 0)"
        )
    ml = hp["max_length"]
    if ml is not None and (isinstance(ml, bool) or not isinstance(ml, int) or ml < 1):
        raise ValueError(
            f"grpo: hyperparameter max_length={ml!r} is out of range; allowed: None or an int >= 1"
        )
    if hp["aggregation"] == "dr_grpo" and ml is None:
        raise ValueError(
            "grpo: aggregation='dr_grpo' needs the hyperparameter max_length (the constant normalizer)"
        )


def _count(name: str, value: Tensor | float | None, default: Tensor, like: Tensor) -> Tensor:
    if value is None:
        return default.to(like.dtype).clamp(min=1)
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got shape {tuple(value.shape)}")
        out = value.detach().to(dtype=like.dtype, device=like.device).reshape(())
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        out = torch.tensor(float(value), dtype=like.dtype, device=like.device)
    else:
        raise TypeError(f"{name} must be a number or a scalar tensor, got {type(value).__name__}")
    if not bool(out > 0):
        raise ValueError(f"{name} must be positive, got {float(out)}")
    return out


@register_loss(
    "grpo",
    inputs="tokens",
    checks={"epsilon_low": ge(0), "beta": ge(0), "aggregation": one_of(*_AGGREGATIONS)},
    validator=_grpo_validator,
)
def grpo(
    logp: Tensor,
    old_logp: Tensor | None,
    advantages: Tensor,
    mask: Tensor,
    ref_logp: Tensor | None = None,
    num_tokens: Tensor | float | None = None,
    num_sequences: Tensor | float | None = None,
    *,
    epsilon_low: float = 0.2,
    epsilon_high: float | None = None,
    beta: float = 0.0,
    aggregation: str = "none",
    max_length: int | None = None,
) -> LossOutput:
    r"""GRPO per-token loss (Shao et al. 2024, DeepSeekMath, Eq. 3) with clip-higher and its aggregations.

    With ``ρ_t = exp(ℓ_t − ℓ^old_t)``, ``A_i`` the group advantage of completion ``i``
    (``prefopt.rl.group_advantages``) broadcast over its tokens, and ``k3`` against the reference::

        l_{i,t} = −min(ρ_t A_i, clip(ρ_t, 1 − ε_low, 1 + ε_high) A_i) + β · k3(ℓ_t, ℓ^ref_t)

    KL is **in the loss** (differentiated: its gradient is that of the forward KL(π_ref ‖ π), see
    ``prefopt.rl.kl_estimate``). ``ε_high > ε_low`` is DAPO's clip-higher (Yu et al. 2025, Eq. 10;
    they use ε_low = 0.2, ε_high = 0.28).

    ``loss[i, t] = w_{i,t} · l_{i,t}`` (0 where masked), so that ``loss.sum()`` is the objective:

    ======================  ============================  ==============================================
    ``aggregation``         ``w_{i,t}``                   same as
    ======================  ============================  ==============================================
    ``"none"`` (default)    1                             reduce yourself with ``prefopt.masked``
    ``"grpo"``              1 / (``|y_i|`` · B)           ``masked.mean_of_seq_means(l, mask)`` (paper Eq. 3)
    ``"dapo"``              1 / N                         ``masked.token_mean(l, mask, num_tokens=N)``
    ``"dr_grpo"``           1 / (B · ``max_length``)      Dr. GRPO (Liu et al. 2025), TRL ``dr_grpo``
    ======================  ============================  ==============================================

    ``N = num_tokens`` and ``B = num_sequences`` default to this call's ``Σ mask`` and ``b``; pass the
    global batch's counts to make the sum over micro-batches / ranks equal the whole-batch objective
    (TRL's ``dapo`` divides by the generation batch's token count). Dr. GRPO also drops std scaling:
    ``group_advantages(r, scale_std=False)``.

    Args:
        logp: ``(b, t)`` current-policy log-probs (with grad).
        old_logp: ``(b, t)`` sampling-policy log-probs, or ``None`` for one on-policy update
            (``logp.detach()``, so ``ρ ≡ 1`` with the right gradient).
        advantages: ``(b,)`` per completion or ``(b, t)`` per token (detached inside).
        mask: ``(b, t)`` bool completion mask.
        ref_logp: ``(b, t)`` reference log-probs; required when ``beta > 0``.
        num_tokens, num_sequences: global counts for ``"dapo"`` / ``"grpo"``, ``"dr_grpo"`` (scalars > 0).
        epsilon_low: lower clip ε (default 0.2, TRL); must be in [0, 1).
        epsilon_high: upper clip ε (default ``None`` = ``epsilon_low``).
        beta: KL coefficient ≥ 0 (default 0.0 as TRL, no reference needed; the paper uses 0.04).
        aggregation: see the table (default ``"none"``: the project's unreduced per-token loss).
        max_length: the constant ``L`` of ``"dr_grpo"`` (e.g. the maximum completion length).

    Returns:
        ``LossOutput`` with ``loss`` ``(b, t)``; metrics per sequence ``(b,)`` (means over its valid
        tokens): ``kl`` (k3, 0 when ``beta = 0`` and no ``ref_logp``), ``ratio``, ``clip_low`` / ``clip_high``
        (fraction of tokens whose gradient the lower / upper clip removed), ``advantages``.
    """
    _tokens("logp", logp)
    shape = logp.shape
    mask = check_mask("mask", mask, shape, "logp")
    old = logp.detach() if old_logp is None else _tokens("old_logp", old_logp, shape).detach()
    adv = _per_sequence_or_token("advantages", advantages, shape).detach().to(logp.dtype)
    if beta > 0 and ref_logp is None:
        raise ValueError("grpo: ref_logp is required when beta > 0 (the KL term is computed against it)")
    eps_hi = epsilon_low if epsilon_high is None else epsilon_high

    ratio = torch.exp(logp - old)
    per_token = _clipped_surrogate(ratio, adv, 1.0 - epsilon_low, 1.0 + eps_hi)
    if ref_logp is not None:
        _tokens("ref_logp", ref_logp, shape)
        kl = kl_estimate(logp, ref_logp.detach(), estimator="k3")
        if beta > 0:
            per_token = per_token + beta * kl
    else:
        kl = torch.zeros_like(logp)
    per_token = _where(mask, per_token)

    lengths = mask.sum(dim=-1)
    if aggregation == "none":
        loss = per_token
    elif aggregation == "grpo":
        n_seq = _count("num_sequences", num_sequences, torch.tensor(shape[0]), logp)
        loss = per_token / (lengths.clamp(min=1).to(logp.dtype).unsqueeze(1) * n_seq)
    elif aggregation == "dapo":
        loss = per_token / _count("num_tokens", num_tokens, mask.sum(), logp)
    else:  # dr_grpo
        assert max_length is not None  # guaranteed by the validator
        n_seq = _count("num_sequences", num_sequences, torch.tensor(shape[0]), logp)
        loss = per_token / (n_seq * max_length)

    adv_b = adv.expand(shape)
    low = (adv_b < 0) & (ratio < 1 - epsilon_low)
    high = (adv_b > 0) & (ratio > 1 + eps_hi)
    metrics = {
        "kl": masked_mean(kl, mask, dim=-1),
        "ratio": masked_mean(ratio, mask, dim=-1),
        "clip_low": masked_mean(low.to(logp.dtype), mask, dim=-1),
        "clip_high": masked_mean(high.to(logp.dtype), mask, dim=-1),
        "advantages": masked_mean(adv_b, mask, dim=-1),
    }
    return LossOutput(loss, _detached(metrics))


# ----------------------------------------------------------------------------------------------------------
# PPO
# ----------------------------------------------------------------------------------------------------------


def _ppo_validator(hp: Mapping[str, Any]) -> None:
    dc = hp["dual_clip"]
    if dc is not None and (
        isinstance(dc, bool) or not isinstance(dc, (int, float)) or not 1 < dc < float("inf")
    ):
        raise ValueError(
            f"ppo: hyperparameter dual_clip={dc!r} is out of range; allowed: None or a number > 1"
        )
    vc = hp["value_clip"]
    if vc is not None and (
        isinstance(vc, bool) or not isinstance(vc, (int, float)) or not 0 < vc < float("inf")
    ):
        raise ValueError(
            f"ppo: hyperparameter value_clip={vc!r} is out of range; allowed: None or a number > 0"
        )
    if hp["clip"] >= 1:
        raise ValueError(f"ppo: hyperparameter clip={hp['clip']!r} must be < 1 (ratio ≥ 1 − ε > 0)")


@register_loss(
    "ppo",
    inputs="tokens",
    checks={"clip": gt(0), "vf_coef": ge(0), "ent_coef": ge(0)},
    validator=_ppo_validator,
)
def ppo(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    values: Tensor | None = None,
    old_values: Tensor | None = None,
    returns: Tensor | None = None,
    entropy: Tensor | None = None,
    *,
    clip: float = 0.2,
    dual_clip: float | None = None,
    value_clip: float | None = 0.2,
    vf_coef: float = 0.1,
    ent_coef: float = 0.0,
) -> LossOutput:
    r"""PPO per-token loss: clipped surrogate, optional dual clip, clipped value loss, entropy bonus.

    With ``ρ_t = exp(ℓ_t − ℓ^old_t)`` (Schulman et al. 2017, Eq. 7 and 9; value clipping as in
    OpenAI baselines / TRL; dual clip from Ye et al. 2020, "Mastering Complex Control in MOBA Games", Eq. 5)::

        pg_t  = max(−Â_t ρ_t, −Â_t clip(ρ_t, 1 − ε, 1 + ε))
        pg_t  = min(pg_t, −c·Â_t)                      where Â_t < 0   (dual clip, c > 1)
        V^c_t = V^old_t + clip(V_t − V^old_t, −ε_v, ε_v)
        vf_t  = ½ max((V_t − Ĝ_t)², (V^c_t − Ĝ_t)²)     (½ (V_t − Ĝ_t)² with value_clip=None)
        l_t   = pg_t + c_v · vf_t − c_H · H_t

    The value loss is 0 at ``V = Ĝ`` when unclipped or when ``|V − V^old| ≤ ε_v``; the clipped form is
    pessimistic (a max), so ``V = Ĝ`` far from ``V^old`` still pays ``½(V^c − Ĝ)²`` and gets no gradient.
    The clip removes the gradient of token ``t`` exactly where ``Â_t > 0, ρ_t > 1 + ε`` or
    ``Â_t < 0, ρ_t < 1 − ε``; the dual clip also where ``Â_t < 0, ρ_t > c``. KL is expected **in the
    reward** (``prefopt.rl.kl_penalized_rewards`` → ``gae`` → usually ``whiten``).

    Args:
        logp: ``(b, t)`` current-policy log-probs (with grad).
        old_logp: ``(b, t)`` sampling-policy log-probs.
        advantages: ``(b, t)`` (or ``(b,)`` broadcast) advantages ``Â`` (detached inside).
        mask: ``(b, t)`` bool completion mask.
        values, old_values, returns: ``(b, t)`` value predictions (with grad), their values at sampling
            time and the targets ``Ĝ`` (``gae``'s returns). ``values`` needs ``returns``, and ``old_values``
            unless ``value_clip=None``. Without ``values`` the value term is 0.
        entropy: ``(b, t)`` per-token policy entropy (``token_logps(..., return_entropy=True)``); required
            when ``ent_coef > 0``.
        clip: ε in (0, 1) (default 0.2), dual_clip: ``c > 1`` or None (default None; 3.0 in the paper),
        value_clip: ε_v > 0 or None (default 0.2), vf_coef: ``c_v`` (default 0.1), ent_coef: ``c_H``
        (default 0.0) — defaults as TRL's PPO.

    Returns:
        ``LossOutput`` with the unreduced per-token ``loss`` ``(b, t)``, 0 where masked; reduce it with
        ``prefopt.masked.token_mean``. Metrics are **scalars**, masked means over this call's valid tokens:
        ``pg_loss``, ``value_loss``, ``entropy``, ``approx_kl`` (``½(ℓ − ℓ^old)²``), ``ratio``, ``clip_frac``,
        ``dual_clip_frac``, ``value_clip_frac``.
    """
    _tokens("logp", logp)
    shape = logp.shape
    mask = check_mask("mask", mask, shape, "logp")
    old = _tokens("old_logp", old_logp, shape).detach()
    adv = _per_sequence_or_token("advantages", advantages, shape).detach().to(logp.dtype).expand(shape)

    log_ratio = logp - old
    ratio = torch.exp(log_ratio)
    pg = _clipped_surrogate(ratio, adv, 1.0 - clip, 1.0 + clip)
    dual = torch.zeros_like(mask)
    if dual_clip is not None:
        dual = (adv < 0) & (ratio > dual_clip)
        pg = torch.where(adv < 0, torch.minimum(pg, -dual_clip * adv), pg)
    clipped = ((adv > 0) & (ratio > 1 + clip)) | ((adv < 0) & (ratio < 1 - clip))

    zero = torch.zeros_like(logp)
    vf, vclipped = zero, torch.zeros_like(mask)
    if values is not None:
        _tokens("values", values, shape)
        if returns is None:
            raise ValueError("ppo: returns is required when values is given (the value-loss target)")
        ret = _tokens("returns", returns, shape).detach()
        vf_unclipped = (values - ret).square()
        if value_clip is None:
            vf = 0.5 * vf_unclipped
        else:
            if old_values is None:
                raise ValueError(
                    "ppo: old_values is required for the clipped value loss (or set value_clip=None)"
                )
            v_old = _tokens("old_values", old_values, shape).detach()
            v_clip = v_old + (values - v_old).clamp(-value_clip, value_clip)
            vf_clip = (v_clip - ret).square()
            vf = 0.5 * torch.maximum(vf_unclipped, vf_clip)
            vclipped = vf_clip > vf_unclipped
    elif returns is not None or old_values is not None:
        raise ValueError("ppo: returns / old_values were given without values")

    ent = zero
    if entropy is not None:
        ent = _tokens("entropy", entropy, shape)
    elif ent_coef > 0:
        raise ValueError("ppo: entropy is required when ent_coef > 0")

    loss = _where(mask, pg + vf_coef * vf - ent_coef * ent)

    def mean(x: Tensor) -> Tensor:
        return masked_mean(x.to(logp.dtype), mask)

    metrics = {
        "pg_loss": mean(pg),
        "value_loss": mean(vf),
        "entropy": mean(ent),
        "approx_kl": mean(0.5 * log_ratio.square()),
        "ratio": mean(ratio),
        "clip_frac": mean(clipped),
        "dual_clip_frac": mean(dual),
        "value_clip_frac": mean(vclipped),
    }
    return LossOutput(loss, _detached(metrics))
