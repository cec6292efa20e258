"""Gradient-entanglement diagnostics (Yuan et al. 2024, arXiv 2410.13828); see ``docs/entanglement.md``.

- [`entanglement`][prefopt.diagnostics.entanglement] — per-pair ``⟨∇_w, ∇_l⟩``, norms, cosine, ratio, the
  loss's weights and the first-order change of each log-prob after one SGD step (optionally verified by taking
  the step).
- [`token_gradient_correlation`][prefopt.diagnostics.token_correlation.token_gradient_correlation] — per-token
  gradient cosines of one pair; [`plot_token_correlation`][prefopt.diagnostics.plots.plot_token_correlation].
- [`per_row_gradients`][prefopt.diagnostics.pergrad.per_row_gradients] — the one-backward per-example gradient
  engine both use.
- Likelihood displacement (``docs/displacement.md``):
  [`ches_scores`][prefopt.diagnostics.displacement.ches_scores] /
  [`ches_table`][prefopt.diagnostics.displacement.ches_table] /
  [`ches_filter`][prefopt.diagnostics.displacement.ches_filter] (CHES, Razin et al. 2024),
  [`ranking_accuracy`][prefopt.diagnostics.displacement.ranking_accuracy] and
  [`idealized_ranking_accuracy`][prefopt.diagnostics.displacement.idealized_ranking_accuracy] (Chen et al.
  2024), [`squeeze_step`][prefopt.diagnostics.displacement.squeeze_step] and
  [`squeezing_probe`][prefopt.diagnostics.displacement.squeezing_probe] (Ren & Sutherland 2024), one-token
  gradient inner products.
"""

from __future__ import annotations

from typing import Any

from prefopt.diagnostics.displacement import (
    ChesFilter,
    ChesScores,
    SqueezeReport,
    ches_and_logps,
    ches_filter,
    ches_from_hidden,
    ches_positions,
    ches_scores,
    ches_table,
    dpo_flip_loss,
    hidden_grad_inner,
    idealized_ranking_accuracy,
    ranking_accuracy,
    squeeze_first_order,
    squeeze_step,
    squeezing_probe,
    tabular_grad_inner,
    unembedding_grad_inner,
)
from prefopt.diagnostics.entanglement import (
    EntanglementReport,
    entanglement,
    first_order_changes,
    loss_weights,
)
from prefopt.diagnostics.pergrad import RowGradients, per_row_gradients, resolve_params
from prefopt.diagnostics.token_correlation import TokenCorrelation, shared_offsets, token_gradient_correlation

__all__ = [
    "ChesFilter",
    "ChesScores",
    "EntanglementReport",
    "RowGradients",
    "SqueezeReport",
    "TokenCorrelation",
    "ches_and_logps",
    "ches_filter",
    "ches_from_hidden",
    "ches_positions",
    "ches_scores",
    "ches_table",
    "dpo_flip_loss",
    "entanglement",
    "first_order_changes",
    "hidden_grad_inner",
    "idealized_ranking_accuracy",
    "loss_weights",
    "per_row_gradients",
    "plot_token_correlation",
    "ranking_accuracy",
    "resolve_params",
    "shared_offsets",
    "squeeze_first_order",
    "squeeze_step",
    "squeezing_probe",
    "tabular_grad_inner",
    "token_gradient_correlation",
    "unembedding_grad_inner",
]


def __getattr__(name: str) -> Any:
    if name == "plot_token_correlation":  # keeps matplotlib out of `import prefopt.diagnostics`
        from prefopt.diagnostics.plots import plot_token_correlation

        return plot_token_correlation
    raise AttributeError(f"module 'prefopt.diagnostics' has no attribute {name!r}")
