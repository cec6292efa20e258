r"""Weighted combinations of registered losses (TRL's list ``loss_type`` with ``loss_weights``).

``L_i = Σ_k w_k · L^k_i`` per pair. TRL 1.16 averages each component over the batch and then sums with the
weights; the batch mean of prefopt's per-pair sum is the same number (and has the same gradient).

Example (MPO, Wang et al. 2024, "Enhancing the Reasoning Ability of Multimodal Large Language Models via
Mixed Preference Optimization", arXiv 2411.10442, Eq. 2):

    mpo = combine({"dpo": 0.8, "bco_pair": 0.2, "sft": 1.0}, beta=0.1)
    out = mpo(PairLogps(...))        # out.loss (b,), out.metrics merged

or simply ``get_loss("mpo")``.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from prefopt.losses.margin import BETA, NLL_NORMS
from prefopt.registry import BoundLoss, ge, get_loss, one_of, register_loss
from prefopt.types import LossOutput, PairLogps

__all__ = ["CombinedLoss", "combine", "mpo"]

# metrics copied to the top level (from the first component that reports them)
_SHARED_METRICS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
)


@dataclass(frozen=True)
class CombinedLoss:
    """``Σ_k w_k · loss_k``: call it like a loss; ``needs_reference`` is True if any component needs one.

    Metrics: every component's metrics prefixed with its name (``"dpo/rewards/chosen"``), each component's
    detached per-pair loss as ``"loss/<name>"``, and the standard pair metrics (``rewards/*``, ``logps/*``)
    unprefixed, taken from the first component (in the given order) that reports them.
    """

    components: tuple[tuple[BoundLoss, float], ...]
    _data_kwargs: Mapping[str, frozenset[str]] = field(default_factory=dict, repr=False)

    @property
    def needs_reference(self) -> bool:
        return any(b.needs_reference for b, _ in self.components)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(b.name for b, _ in self.components)

    def __call__(self, *args: Any, check_finite: bool = False, **kwargs: Any) -> LossOutput:
        accepted = set().union(*self._data_kwargs.values()) if self._data_kwargs else set()
        unknown = sorted(set(kwargs) - accepted)
        if unknown:
            raise TypeError(
                f"combined loss {'+'.join(self.names)}: no component accepts argument(s) {', '.join(unknown)}"
            )
        total: Tensor | None = None
        metrics: dict[str, Tensor] = {}
        shared: dict[str, Tensor] = {}
        for bound, weight in self.components:
            own = {k: v for k, v in kwargs.items() if k in self._data_kwargs.get(bound.name, frozenset())}
            out = bound(*args, check_finite=check_finite, **own)
            term = out.loss * weight
            total = term if total is None else total + term
            metrics[f"loss/{bound.name}"] = out.loss.detach()
            for key, value in out.metrics.items():
                metrics[f"{bound.name}/{key}"] = value
                if key in _SHARED_METRICS and key not in shared:
                    shared[key] = value
        assert total is not None
        return LossOutput(loss=total, metrics={**shared, **metrics})


def _data_params(fn: Callable[..., Any]) -> frozenset[str]:
    sig = inspect.signature(fn)
    params = list(sig.parameters.values())
    return frozenset(
        p.name
        for p in params[1:]
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        and p.name not in _hparam_names(fn)
    )


def _hparam_names(fn: Callable[..., Any]) -> set[str]:
    return {
        p.name for p in inspect.signature(fn).parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY
    }


def combine(weights: Mapping[str, float], **hparams: Any) -> CombinedLoss:
    r"""Build \(L = \sum_k w_k L_k\) from registry names and weights.

    Args:
        weights: ``{loss name: weight}`` (order kept; weights finite and ``≥ 0``; at least one loss).
        **hparams: either ``<loss name>={...}`` — hyperparameters of that component only — or a
            hyperparameter name, whose value goes to **every** component that has it (like TRL's single
            ``beta`` shared by all ``loss_type`` entries). A shared name no component has, or a per-loss dict
            for a loss that is not in ``weights``, raises ``ValueError``. Values are validated by each
            component (``get_loss``), so an out-of-range value names the component and the parameter.

    Data arguments beyond the first (e.g. ``bco_pair``'s ``delta``) are passed at call time as keywords and
    reach only the components that accept them.
    """
    if not isinstance(weights, Mapping) or not weights:
        raise ValueError("weights must be a non-empty mapping {loss name: weight}")
    per_loss = {k: v for k, v in hparams.items() if k in weights}
    shared = {k: v for k, v in hparams.items() if k not in weights}
    for name, hp in per_loss.items():
        if not isinstance(hp, Mapping):
            raise TypeError(
                f"hyperparameters for component {name!r} must be a mapping, got {type(hp).__name__}"
            )
    components: list[tuple[BoundLoss, float]] = []
    data_kwargs: dict[str, frozenset[str]] = {}
    used_shared: set[str] = set()
    for name, weight in weights.items():
        if (
            isinstance(weight, bool)
            or not isinstance(weight, (int, float))
            or not math.isfinite(weight)
            or weight < 0
        ):
            raise ValueError(f"weight of {name!r} must be a finite number >= 0, got {weight!r}")
        probe = get_loss(name)  # raises KeyError listing the names for an unknown loss
        own = {k: v for k, v in shared.items() if k in probe.spec.defaults}
        used_shared |= set(own)
        bound = get_loss(name, **{**own, **dict(per_loss.get(name, {}))})
        components.append((bound, float(weight)))
        data_kwargs[name] = _data_params(bound.spec.fn)
    unused = sorted(set(shared) - used_shared)
    if unused:
        raise ValueError(
            f"hyperparameter(s) {', '.join(unused)} are accepted by none of {', '.join(weights)} "
            "(pass per-loss hyperparameters as <loss name>={...})"
        )
    return CombinedLoss(components=tuple(components), _data_kwargs=data_kwargs)


@register_loss(
    "mpo",
    inputs="pairs",
    needs_reference=True,
    checks={
        **BETA,
        "dpo_weight": ge(0),
        "bco_weight": ge(0),
        "sft_weight": ge(0),
        "nll_norm": one_of(*NLL_NORMS),
    },
)
def mpo(
    logps: PairLogps,
    delta: Tensor | float | None = None,
    *,
    beta: float = 0.1,
    dpo_weight: float = 0.8,
    bco_weight: float = 0.2,
    sft_weight: float = 1.0,
    nll_norm: str = "batch_tokens",
) -> LossOutput:
    r"""MPO: \(L = w_p L_{dpo} + w_q L_{bco} + w_g L_{sft}\) (preference + quality + generation losses:
    ``dpo``, ``bco_pair``, ``sft``).

    A registered preset of [`combine`][prefopt.losses.combined.combine] (``beta`` shared by ``dpo`` and
    ``bco_pair``, ``nll_norm`` for ``sft``).

    Wang et al. 2024 (arXiv 2411.10442), Eq. (2); TRL ``loss_type=["sigmoid", "bco_pair", "sft"]`` with
    ``loss_weights=[0.8, 0.2, 1.0]`` (the weights in TRL's documentation example and prefopt's defaults).
    ``delta`` is ``bco_pair``'s reward shift (``None`` ⇒ 0, as TRL 1.16). Metrics as
    [`CombinedLoss`][prefopt.losses.combined.CombinedLoss]. Zero point: policy == reference ⇒
    ``0.8·log 2 + 0.2·2 log 2 + NLL``.
    """
    preset = combine(
        {"dpo": dpo_weight, "bco_pair": bco_weight, "sft": sft_weight}, beta=beta, nll_norm=nll_norm
    )
    return preset(logps, delta=delta)
