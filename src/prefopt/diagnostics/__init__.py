"""Gradient-entanglement diagnostics (Yuan et al. 2024, arXiv 2410.13828); see ``docs/entanglement.md``.

- :func:`entanglement` — per-pair ``⟨∇_w, ∇_l⟩``, norms, cosine, ratio, the loss's weights and the first-order
  change of each log-prob after one SGD step (optionally verified by taking the step).
- :func:`token_gradient_correlation` — per-token gradient cosines of one pair; :func:`plot_token_correlation`.
- :func:`per_row_gradients` — the one-backward per-example gradient engine both use.
"""

from __future__ import annotations

from typing import Any

from prefopt.diagnostics.entanglement import (
    EntanglementReport,
    entanglement,
    first_order_changes,
    loss_weights,
)
from prefopt.diagnostics.pergrad import RowGradients, per_row_gradients, resolve_params
from prefopt.diagnostics.token_correlation import TokenCorrelation, shared_offsets, token_gradient_correlation

__all__ = [
    "EntanglementReport",
    "RowGradients",
    "TokenCorrelation",
    "entanglement",
    "first_order_changes",
    "loss_weights",
    "per_row_gradients",
    "plot_token_correlation",
    "resolve_params",
    "shared_offsets",
    "token_gradient_correlation",
]


def __getattr__(name: str) -> Any:
    if name == "plot_token_correlation":  # keeps matplotlib out of `import prefopt.diagnostics`
        from prefopt.diagnostics.plots import plot_token_correlation

        return plot_token_correlation
    raise AttributeError(f"module 'prefopt.diagnostics' has no attribute {name!r}")
