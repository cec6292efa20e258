"""Heatmap of a [`TokenCorrelation`][prefopt.diagnostics.token_correlation.TokenCorrelation] (matplotlib, Agg backend)."""

from __future__ import annotations

import os
from typing import Any

from prefopt.diagnostics.token_correlation import TokenCorrelation

__all__ = ["plot_token_correlation"]


def _labels(tokens: tuple[str, ...] | None, ids: Any, shared: Any) -> list[str]:
    base = list(tokens) if tokens is not None else [str(int(t)) for t in ids]
    return [(repr(s)[1:-1] + (" *" if bool(m) else "")) for s, m in zip(base, shared, strict=True)]


def plot_token_correlation(
    tc: TokenCorrelation, path: str | os.PathLike[str], *, title: str | None = None, dpi: int = 120
) -> None:
    """Write a PNG heatmap of ``tc.matrix`` (rows: chosen tokens, columns: rejected tokens) to ``path``.

    Colour: cosine in ``[−1, 1]`` (diverging map, 0 = white). Tick labels are the decoded tokens (token ids if
    no tokenizer was given); shared tokens (same id at the same completion offset) are suffixed ``*`` and
    their diagonal cells outlined. Uses the non-interactive Agg canvas, so it works without a display.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    m = tc.matrix.detach().cpu().double().numpy()
    tw, tl = m.shape
    fig = Figure(figsize=(max(4.0, 0.28 * tl + 2.5), max(3.5, 0.28 * tw + 1.8)))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(m, cmap="RdBu_r", vmin=-1.0, vmax=1.0, aspect="auto", interpolation="nearest")
    fig.colorbar(im, ax=ax, label="cos(∇ log π(y_w,t), ∇ log π(y_l,s))")
    ax.set_xticks(range(tl))
    ax.set_yticks(range(tw))
    ax.set_xticklabels(
        _labels(tc.rejected_tokens, tc.rejected_ids, tc.rejected_shared), rotation=90, fontsize=7
    )
    ax.set_yticklabels(_labels(tc.chosen_tokens, tc.chosen_ids, tc.chosen_shared), fontsize=7)
    ax.set_xlabel("rejected completion token")
    ax.set_ylabel("chosen completion token")
    for k in range(min(tw, tl)):
        if bool(tc.chosen_shared[k]):
            ax.add_patch(Rectangle((k - 0.5, k - 0.5), 1, 1, fill=False, edgecolor="black", linewidth=0.8))
    s = tc.summary
    ax.set_title(
        title
        or f"pair {tc.index}: cos(∇w,∇l)={s['cosine']:.3f}, shared={s['mean_shared']:.3f}, "
        f"differing={s['mean_differing']:.3f}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(os.fspath(path), dpi=dpi)
