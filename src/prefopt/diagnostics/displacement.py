r"""Likelihood-displacement diagnostics: CHES, ranking accuracy, the squeezing effect, one-token gradient geometry.

DPO can lower the likelihood of the *preferred* response ("likelihood displacement"). This module collects
forward-only and closed-form tools for that failure; see ``docs/displacement.md``.

- **CHES** (Razin, Malladi, Bhaskar, Chen, Arora & Hanin 2024, "Unintentional Unalignment: Likelihood
  Displacement in Direct Preference Optimization", arXiv 2410.08847; CHES and its length-normalised form):
  with ``h_k(y)`` the last-layer hidden state (the input of the unembedding) at the position that *predicts*
  ``y_k`` for the input ``(x, y)`` and ``S(y) = Σ_{k=1}^{|y|} h_k(y)``,

    $$
    \mathrm{CHES}(x,y^+,y^-) = \langle S(y^+), S(y^-)\rangle - \lVert S(y^+)\rVert^2, \qquad
    \mathrm{LN\text{-}CHES} = \frac{\langle S(y^+), S(y^-)\rangle}{|y^+||y^-|}
    - \frac{\lVert S(y^+)\rVert^2}{|y^+|^2}.
    $$

    Higher = more similar = more likely to displace ``log π(y⁺)``.
    [`ches_scores`][prefopt.diagnostics.displacement.ches_scores],
    [`ches_from_hidden`][prefopt.diagnostics.displacement.ches_from_hidden],
    [`ches_table`][prefopt.diagnostics.displacement.ches_table],
    [`ches_filter`][prefopt.diagnostics.displacement.ches_filter].

- **Ranking accuracy** (Chen, Malladi, Zhang, Chen, Zhang, Ranganath & Cho 2024, "Preference Learning
  Algorithms Do Not Learn Preference Rankings", arXiv 2405.19534: ranking accuracy, idealised ranking accuracy
  and the DPO flip condition): [`ranking_accuracy`][prefopt.diagnostics.displacement.ranking_accuracy],
  [`idealized_ranking_accuracy`][prefopt.diagnostics.displacement.idealized_ranking_accuracy],
  [`dpo_flip_loss`][prefopt.diagnostics.displacement.dpo_flip_loss].

- **Squeezing effect** (Ren & Sutherland 2024, "Learning Dynamics of LLM Finetuning", arXiv 2407.10490): a
  step *down* on ``log π(ȳ)`` moves mass to the most likely tokens.
  [`squeeze_step`][prefopt.diagnostics.displacement.squeeze_step],
  [`squeeze_first_order`][prefopt.diagnostics.displacement.squeeze_first_order] (one-token, logits as
  parameters), [`squeezing_probe`][prefopt.diagnostics.displacement.squeezing_probe] (a model).

- **One-token gradient inner products** (closed forms, ground truth for
  [`entanglement`][prefopt.diagnostics.entanglement.entanglement]):
  [`tabular_grad_inner`][prefopt.diagnostics.displacement.tabular_grad_inner],
  [`unembedding_grad_inner`][prefopt.diagnostics.displacement.unembedding_grad_inner],
  [`hidden_grad_inner`][prefopt.diagnostics.displacement.hidden_grad_inner].

All outputs are float64.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prefopt.diagnostics.entanglement import check_pair_batch, eval_mode, resolve_model
from prefopt.diagnostics.pergrad import resolve_params
from prefopt.types import check_mask, check_tensor

__all__ = [
    "ChesFilter",
    "ChesScores",
    "SqueezeReport",
    "ches_and_logps",
    "ches_filter",
    "ches_from_hidden",
    "ches_positions",
    "ches_scores",
    "ches_table",
    "dpo_flip_loss",
    "hidden_grad_inner",
    "idealized_ranking_accuracy",
    "ranking_accuracy",
    "squeeze_first_order",
    "squeeze_step",
    "squeezing_probe",
    "tabular_grad_inner",
    "unembedding_grad_inner",
]

Positions = Literal["predicting", "inclusive"]


def _check_number(name: str, x: Any, *, lo: float | None = None, lo_open: bool = True) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
        raise ValueError(f"{name} must be a finite number, got {x!r}")
    if lo is not None and (x <= lo if lo_open else x < lo):
        raise ValueError(f"{name} must be {'>' if lo_open else '>='} {lo}, got {x!r}")
    return float(x)


def _check_vec(name: str, x: Any, b: int | None = None) -> Tensor:
    check_tensor(name, x, ndim=1)
    if b is not None and x.shape[0] != b:
        raise ValueError(f"{name} must have shape ({b},), got {tuple(x.shape)}")
    return x


# ----------------------------------------------------------------------------------------------------------
# CHES
# ----------------------------------------------------------------------------------------------------------


def ches_positions(completion_mask: Tensor, *, positions: Positions = "predicting") -> Tensor:
    r"""Bool ``(b, t)``: the positions whose hidden states enter ``S(y)``.

    ``"predicting"`` (default; Razin et al. 2024, arXiv 2410.08847; the authors' ``ches.py``): the
    ``|y|`` positions ``p`` with ``completion_mask[:, p+1]`` True — from the last prompt token to the
    second-to-last response token (the state at ``p`` predicts token ``p+1``). ``"inclusive"`` (the authors'
    statistics script, used for their data filter): those plus the last response token, ``|y|+1`` states.
    Prompt positions before the last one never count.

    Args:
        completion_mask: ``(b, t)`` bool, True at response tokens (False at position 0).
        positions: ``"predicting"`` (default) or ``"inclusive"``, as above.
    """
    check_tensor("completion_mask", completion_mask, ndim=2, floating=False)
    check_mask("completion_mask", completion_mask, tuple(completion_mask.shape), "completion_mask")
    if positions not in ("predicting", "inclusive"):
        raise ValueError(f"positions must be 'predicting' or 'inclusive', got {positions!r}")
    if completion_mask.shape[1] and bool(completion_mask[:, 0].any()):
        raise ValueError("completion_mask is True at position 0, which has no prefix to be predicted from")
    pred = torch.zeros_like(completion_mask)
    pred[:, :-1] = completion_mask[:, 1:]
    return pred | completion_mask if positions == "inclusive" else pred


def ches_from_hidden(
    chosen_hidden: Tensor,
    chosen_mask: Tensor,
    rejected_hidden: Tensor,
    rejected_mask: Tensor,
) -> tuple[Tensor, Tensor]:
    r"""``(CHES, LN-CHES)`` per pair from hidden states and the positions to sum (float64, ``(b,)``).

    $$
    S^\pm = \sum_p m^\pm_p h^\pm_p,\quad n^\pm = \sum_p m^\pm_p,\quad
    \mathrm{CHES} = \langle S^+, S^-\rangle - \lVert S^+\rVert^2,\quad
    \mathrm{LN\text{-}CHES} = \frac{\langle S^+, S^-\rangle}{n^+ n^-} - \frac{\lVert S^+\rVert^2}{(n^+)^2}
    $$

    (Razin et al. 2024, arXiv 2410.08847: CHES and length-normalised CHES). Differentiable in the hidden
    states.

    Args:
        chosen_hidden: ``(b, t⁺, d)`` hidden states of ``(x, y⁺)``.
        rejected_hidden: ``(b, t⁻, d)`` hidden states of ``(x, y⁻)``.
        chosen_mask: ``(b, t⁺)`` bool, True at the positions that count (see
            [`ches_positions`][prefopt.diagnostics.displacement.ches_positions]); every row needs at least
            one. Masked positions are never read (they may hold NaN).
        rejected_mask: ``(b, t⁻)`` bool, the same for ``rejected_hidden``.
    """
    out = []
    for side, h, m in (("chosen", chosen_hidden, chosen_mask), ("rejected", rejected_hidden, rejected_mask)):
        check_tensor(f"{side}_hidden", h, ndim=3)
        check_mask(f"{side}_mask", m, tuple(h.shape[:2]), f"{side}_hidden[..., 0]")
        n = m.sum(dim=1)
        if bool((n == 0).any()):
            raise ValueError(
                f"{side}_mask selects no position in row(s) {(n == 0).nonzero().flatten().tolist()}"
            )
        hd = torch.where(m.unsqueeze(-1), h.double(), h.new_zeros((), dtype=torch.float64))
        out.append((hd.sum(dim=1), n.double()))
    (s_p, n_p), (s_m, n_m) = out
    if s_p.shape != s_m.shape:
        raise ValueError(
            f"chosen_hidden and rejected_hidden must have the same batch size and width, got "
            f"{tuple(chosen_hidden.shape)} and {tuple(rejected_hidden.shape)}"
        )
    cross = (s_p * s_m).sum(-1)
    own = (s_p * s_p).sum(-1)
    return cross - own, cross / (n_p * n_m) - own / (n_p * n_p)


@dataclass(frozen=True)
class ChesScores:
    """Per-pair CHES scores of a batch; every field ``(B,)``.

    Attributes:
        ches: ``⟨S⁺, S⁻⟩ − ‖S⁺‖²`` (float64).
        ln_ches: the length-normalised score (float64).
        chosen_count: the number of hidden states summed for the chosen response (``|y|``, or ``|y|+1``
            with ``positions="inclusive"``), int64.
        rejected_count: the same for the rejected response.
        positions: the position convention used.
    """

    ches: Tensor
    ln_ches: Tensor
    chosen_count: Tensor
    rejected_count: Tensor
    positions: str


def _last_hidden(model: nn.Module, ids: Tensor, am: Tensor | None) -> Tensor:
    from prefopt.logprobs import backbone_and_head

    backbone, _, _ = backbone_and_head(model)
    out = backbone(input_ids=ids, attention_mask=am, use_cache=False)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


@torch.no_grad()
def ches_scores(model: Any, batch: dict[str, Tensor], *, positions: Positions = "predicting") -> ChesScores:
    r"""CHES and LN-CHES of every pair of a collated preference batch, from one forward pass (no gradients).

    The hidden state is the backbone's last one — the input of the LM head (for HF models the last entry of
    ``output_hidden_states``, after the final norm). See
    [`ches_from_hidden`][prefopt.diagnostics.displacement.ches_from_hidden] for the formula and
    [`ches_positions`][prefopt.diagnostics.displacement.ches_positions] for ``positions``. Razin et al. 2024
    (arXiv 2410.08847).

    Args:
        model: a transformers causal LM, a peft model, or a [`prefopt.LoraPolicy`][prefopt.policy.LoraPolicy]
            (its adapted model).
        batch: ``input_ids`` ``(2B, T)``, optional ``attention_mask``, bool ``completion_mask`` ``(2B, T)``;
            rows ``0..B−1`` chosen, ``B..2B−1`` rejected (the layout of
            [`entanglement`][prefopt.diagnostics.entanglement.entanglement]). Padding as for
            [`token_logps`][prefopt.logprobs.token_logps] (right padding gives exactly the unpadded scores).
        positions: ``"predicting"`` (default, ``|y|`` states) or ``"inclusive"`` (``|y|+1``).

    Cost: one forward of the ``2B`` rows, in ``eval()`` mode (restored afterwards).
    """
    mdl, _ = resolve_model(model)
    ids, am, cm, b = check_pair_batch(batch)
    sel = ches_positions(cm, positions=positions)
    if am is not None and bool((sel & ~am.bool()).any()):
        raise ValueError("batch['completion_mask'] is True at (or right after) a padding token")
    with eval_mode(mdl):
        hidden = _last_hidden(mdl, ids, am)
    c, ln = ches_from_hidden(hidden[:b], sel[:b], hidden[b:], sel[b:])
    n = sel.sum(dim=1)
    return ChesScores(ches=c, ln_ches=ln, chosen_count=n[:b], rejected_count=n[b:], positions=positions)


def _shared_prompt_hidden(backbone: nn.Module, ids: Tensor, am: Tensor | None, cm: Tensor) -> Tensor:
    """``(2B, T, d)`` last hidden states with each pair's prompt run ONCE (KV cache), zero where not needed.

    Filled: the last prompt position and every position from the first completion token to the row's last real
    token — all that CHES (either convention) and the completion log-probs read. A pair whose two rows do not
    share their prompt tokens (or a row that is not right-padded) gets a plain forward of its two rows.
    """
    from prefopt.logprobs import position_kwargs

    rows2, t = ids.shape
    b = rows2 // 2
    full_am = torch.ones_like(ids) if am is None else am.long()
    length = full_am.sum(dim=1)
    right_padded = bool((full_am == (torch.arange(t, device=ids.device) < length[:, None]).long()).all())
    first = cm.long().argmax(dim=1)  # the first completion token = the prompt length
    cache_name = "cache" if "cache" in inspect.signature(backbone.forward).parameters else "past_key_values"
    hidden: Tensor | None = None
    for i in range(b):
        r = [i, i + b]
        p = int(first[i])
        n = int(length[r].max())
        shared = right_padded and p == int(first[i + b]) and bool((ids[i, :p] == ids[i + b, :p]).all())
        if not shared:
            sub_am = full_am[r, :n]
            out = backbone(
                input_ids=ids[r, :n],
                attention_mask=sub_am,
                use_cache=False,
                **position_kwargs(backbone, sub_am),
            )
            h = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
            if hidden is None:
                hidden = h.new_zeros(rows2, t, h.shape[-1])
            hidden[r, :n] = h
            continue
        pos = torch.arange(p, device=ids.device)[None]
        out = backbone(
            input_ids=ids[i : i + 1, :p],
            attention_mask=full_am[i : i + 1, :p],
            position_ids=pos,
            use_cache=True,
        )
        hp = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        # transformers >= 5.x names the cache `cache` (`past_key_values` still works there, with a warning)
        cache = out.cache if cache_name == "cache" else out.past_key_values
        cache.batch_repeat_interleave(2)
        c = n - p
        out2 = backbone(
            input_ids=ids[r, p:n],
            attention_mask=full_am[r, :n],
            position_ids=(p + torch.arange(c, device=ids.device))[None].expand(2, c),
            use_cache=True,
            **{cache_name: cache},
        )
        hc = out2.last_hidden_state if hasattr(out2, "last_hidden_state") else out2[0]
        if hidden is None:
            hidden = hp.new_zeros(rows2, t, hp.shape[-1])
        hidden[r, p - 1] = hp[0, p - 1]
        hidden[r, p:n] = hc
    assert hidden is not None
    return hidden


@torch.no_grad()
def ches_and_logps(
    model: Any, batch: Any, *, positions: Positions = "predicting", share_prompt: bool = False
) -> tuple[ChesScores, Tensor, Tensor]:
    r"""``(scores, S_w, S_l)``: [`ches_scores`][prefopt.diagnostics.displacement.ches_scores] and the sequence log-probs of both responses, from ONE
    forward of the backbone (the screening pass of ``prefopt diagnose``).

    ``S_w = log π(y_w|x)`` and ``S_l`` (``(B,)``, float32, float64 for a float64 model) are
    [`token_logps`][prefopt.logprobs.token_logps] summed over the completion tokens: the LM head (with the
    config's logit scaling / soft-capping) runs only on the hidden states that predict completion tokens, in
    chunks, on the same hidden states CHES sums. Together they give CHES, LN-CHES, ranking accuracy
    ([`ranking_accuracy`][prefopt.diagnostics.displacement.ranking_accuracy]) and, at a fresh adapter where
    the policy is the reference,
    [`idealized_ranking_accuracy`][prefopt.diagnostics.displacement.idealized_ranking_accuracy] and
    [`dpo_flip_loss`][prefopt.diagnostics.displacement.dpo_flip_loss] — for the price of one no-grad forward.

    Args:
        model: as [`ches_scores`][prefopt.diagnostics.displacement.ches_scores].
        batch: as [`ches_scores`][prefopt.diagnostics.displacement.ches_scores].
        positions: as [`ches_scores`][prefopt.diagnostics.displacement.ches_scores].
        share_prompt: run each pair's prompt once and both responses on its key/value cache (one pair at a
            time) instead of one forward of all ``2B`` full rows: the same numbers up to float rounding, and
            cheaper when prompts are long against responses (multi-turn dialogues). Needs a backbone with a
            ``transformers`` KV cache; a pair whose rows do not share their prompt tokens gets a plain forward.
    """
    from prefopt.logprobs import backbone_and_head, head_stats, logit_transform, position_kwargs

    mdl, _ = resolve_model(model)
    ids, am, cm, b = check_pair_batch(batch)
    sel = ches_positions(cm, positions=positions)
    if am is not None and bool((sel & ~am.bool()).any()):
        raise ValueError("batch['completion_mask'] is True at (or right after) a padding token")
    backbone, head, config = backbone_and_head(mdl)
    if not isinstance(share_prompt, bool):
        raise TypeError(f"share_prompt must be a bool, got {type(share_prompt).__name__}")
    with eval_mode(mdl):
        if share_prompt:
            hidden = _shared_prompt_hidden(backbone, ids, am, cm)
        else:
            out = backbone(input_ids=ids, attention_mask=am, use_cache=False, **position_kwargs(backbone, am))
            hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        c, ln = ches_from_hidden(hidden[:b], sel[:b], hidden[b:], sel[b:])
        # position p predicts token p + 1: the states at completion_mask[:, 1:] give the completion log-probs
        pred = cm[:, 1:]
        rows, cols = pred.nonzero(as_tuple=True)
        h_sel = hidden[rows, cols]
        y_sel = ids[rows, cols + 1].long()
        lp = head_stats(head, h_sel, y_sel, transform=logit_transform(config)).logp
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    seq = torch.zeros(ids.shape[0], dtype=acc, device=ids.device).index_add_(0, rows, lp.to(acc))
    n = sel.sum(dim=1)
    scores = ChesScores(ches=c, ln_ches=ln, chosen_count=n[:b], rejected_count=n[b:], positions=positions)
    return scores, seq[:b], seq[b:]


def ches_table(
    model: Any,
    batches: Iterable[dict[str, Tensor]],
    *,
    positions: Positions = "predicting",
    progress: bool = False,
    total: int | None = None,
) -> dict[str, list[Any]]:
    """Stream [`ches_scores`][prefopt.diagnostics.displacement.ches_scores] over batches; return a column table ``{"pair", "ches", "ln_ches",
    "chosen_count", "rejected_count"}`` of plain Python lists (``pair`` numbers the pairs in stream order).

    Args:
        model: as [`ches_scores`][prefopt.diagnostics.displacement.ches_scores].
        batches: an iterable of collated pair batches (e.g. a ``DataLoader`` with prefopt's pair collator).
        positions: as [`ches_scores`][prefopt.diagnostics.displacement.ches_scores].
        progress: show a ``tqdm`` progress bar (over batches; ``total`` if the iterable has no length).
        total: the number of batches for the progress bar when ``batches`` has no length (optional).
    """
    if not isinstance(progress, bool):
        raise TypeError(f"progress must be a bool, got {type(progress).__name__}")
    it: Iterable[dict[str, Tensor]] = batches
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(batches, total=total, desc="CHES", unit="batch")
    table: dict[str, list[Any]] = {
        k: [] for k in ("pair", "ches", "ln_ches", "chosen_count", "rejected_count")
    }
    for batch in it:
        s = ches_scores(model, batch, positions=positions)
        start = len(table["pair"])
        table["pair"].extend(range(start, start + s.ches.shape[0]))
        table["ches"].extend(s.ches.tolist())
        table["ln_ches"].extend(s.ln_ches.tolist())
        table["chosen_count"].extend(s.chosen_count.tolist())
        table["rejected_count"].extend(s.rejected_count.tolist())
    return table


@dataclass(frozen=True)
class ChesFilter:
    """The result of [`ches_filter`][prefopt.diagnostics.displacement.ches_filter].

    Attributes:
        keep: indices of the kept pairs (int64, ascending).
        removed: indices of the dropped pairs (int64, ascending).
        threshold: the score cut used: a pair is kept iff its score ``≤ threshold`` (``keep_fraction``: the
            ``k``-th smallest score).
        score: ``"ches"`` or ``"ln_ches"``.
        summary: ``n_total``, ``n_kept``, ``n_removed``, ``threshold``, mean score of kept and removed pairs.
    """

    keep: Tensor
    removed: Tensor
    threshold: float
    score: str
    summary: dict[str, float]


def ches_filter(
    scores: ChesScores | Tensor,
    *,
    keep_fraction: float | None = None,
    threshold: float | None = None,
    score: Literal["ln_ches", "ches"] = "ln_ches",
) -> ChesFilter:
    r"""Keep the pairs least likely to displace: the lowest ``keep_fraction`` of scores, or those ``≤ threshold``.

    Razin et al. 2024 (arXiv 2410.08847, SORRY-Bench data filtering) keep the lowest-LN-CHES ≈5 % of pairs (sorted ascending) before
    DPO. With ``keep_fraction`` the ``k = ceil(keep_fraction · N)`` lowest scores are kept (ties at the cut
    broken by index, so exactly ``k``). Exactly one of ``keep_fraction`` / ``threshold`` must be given.

    Args:
        scores: a [`ChesScores`][prefopt.diagnostics.displacement.ChesScores] (``score`` picks the field) or a
            ``(N,)`` float tensor of scores.
        keep_fraction: in ``(0, 1]``.
        threshold: a finite number.
        score: ``"ln_ches"`` (default) or ``"ches"`` when ``scores`` is a
            [`ChesScores`][prefopt.diagnostics.displacement.ChesScores].
    """
    if score not in ("ln_ches", "ches"):
        raise ValueError(f"score must be 'ln_ches' or 'ches', got {score!r}")
    if isinstance(scores, ChesScores):
        x = getattr(scores, score)
    else:
        x = _check_vec("scores", scores)
    if x.numel() == 0:
        raise ValueError("scores is empty")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("scores has non-finite values")
    if (keep_fraction is None) == (threshold is None):
        raise ValueError("give exactly one of keep_fraction and threshold")
    x = x.detach().double().cpu()
    n = x.shape[0]
    if keep_fraction is not None:
        f = _check_number("keep_fraction", keep_fraction)
        if not 0 < f <= 1:
            raise ValueError(f"keep_fraction must be in (0, 1], got {keep_fraction!r}")
        k = max(1, math.ceil(f * n - 1e-9))
        order = torch.sort(x, stable=True).indices
        kept_mask = torch.zeros(n, dtype=torch.bool)
        kept_mask[order[:k]] = True
        cut = float(x[order[k - 1]])
    else:
        cut = _check_number("threshold", threshold)
        kept_mask = x <= cut
    keep = kept_mask.nonzero().flatten()
    removed = (~kept_mask).nonzero().flatten()
    nan = float("nan")
    summary = {
        "n_total": float(n),
        "n_kept": float(keep.numel()),
        "n_removed": float(removed.numel()),
        "threshold": cut,
        "kept_mean": float(x[keep].mean()) if keep.numel() else nan,
        "removed_mean": float(x[removed].mean()) if removed.numel() else nan,
    }
    return ChesFilter(keep=keep, removed=removed, threshold=cut, score=score, summary=summary)


# ----------------------------------------------------------------------------------------------------------
# ranking accuracy
# ----------------------------------------------------------------------------------------------------------


def ranking_accuracy(
    chosen: Tensor,
    rejected: Tensor,
    *,
    chosen_len: Tensor | None = None,
    rejected_len: Tensor | None = None,
) -> Tensor:
    r"""Per pair ``1[π(y_w|x) > π(y_l|x)]``, i.e. ``S_w > S_l`` (strict); bool ``(b,)``.

    Chen et al. 2024 (arXiv 2405.19534): the ranking accuracy is the mean of this over a dataset.
    With ``chosen_len`` and ``rejected_len`` (both or neither) the length-normalised variant
    ``S_w/|y_w| > S_l/|y_l|`` (per-token perplexities) is used.

    Args:
        chosen: ``(b,)`` sequence log-probs ``S = log π(y|x)``.
        rejected: ``(b,)`` sequence log-probs ``S = log π(y|x)``.
        chosen_len: ``(b,)`` token counts ``> 0``.
        rejected_len: ``(b,)`` token counts ``> 0``.
    """
    b = _check_vec("chosen", chosen).shape[0]
    _check_vec("rejected", rejected, b)
    if (chosen_len is None) != (rejected_len is None):
        raise ValueError("give both chosen_len and rejected_len, or neither")
    if chosen_len is None or rejected_len is None:
        return chosen.double() > rejected.double()
    lens = []
    for name, n in (("chosen_len", chosen_len), ("rejected_len", rejected_len)):
        check_tensor(name, n, ndim=1, floating=False)
        if n.shape != (b,):
            raise ValueError(f"{name} must have shape ({b},), got {tuple(n.shape)}")
        if bool((n <= 0).any()):
            raise ValueError(f"{name} must be > 0")
        lens.append(n.double())
    return chosen.double() / lens[0] > rejected.double() / lens[1]


def idealized_ranking_accuracy(
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    *,
    beta: float,
    alpha: float | Tensor = 0.75,
    tie_band: float = 0.0,
) -> Tensor:
    r"""Whether the exact DPO/RLHF optimum ranks each pair correctly; bool ``(b,)``.

    The optimum ``π* ∝ π_ref exp(r*/β)`` under a Bradley–Terry reward with ``P(y_w ≻ y_l) = α`` has
    (Chen et al. 2024, arXiv 2405.19534, idealised ranking accuracy)

    $$
    \frac{π^*(y_w|x)}{π^*(y_l|x)} = \frac{π_{ref}(y_w|x)}{π_{ref}(y_l|x)}
    \left(\frac{α}{1-α}\right)^{1/β},
    $$

    and a pair counts as correct iff this ratio ``> 1 + tie_band`` (default 0: strict ``>``; the authors'
    code uses a ±5 % tie band, ``tie_band=0.05``). Computed in log space:
    ``log ratio = (S_ref,w − S_ref,l) + log(α/(1−α))/β``.

    Args:
        ref_chosen: ``(b,)`` reference sequence log-probs.
        ref_rejected: ``(b,)`` reference sequence log-probs.
        beta: ``β > 0``.
        alpha: fraction of raters preferring ``y_w``, in ``(0, 1)``: a number (default 0.75, the authors'
            simulated value) or a ``(b,)`` tensor.
        tie_band: ``≥ 0``.
    """
    b = _check_vec("ref_chosen", ref_chosen).shape[0]
    _check_vec("ref_rejected", ref_rejected, b)
    beta = _check_number("beta", beta, lo=0.0)
    tie = _check_number("tie_band", tie_band, lo=0.0, lo_open=False)
    if isinstance(alpha, Tensor):
        a = _check_vec("alpha", alpha, b).double()
    else:
        a = torch.full((b,), _check_number("alpha", alpha), dtype=torch.float64, device=ref_chosen.device)
    if not bool(((a > 0) & (a < 1)).all()):
        raise ValueError("alpha must lie in the open interval (0, 1)")
    log_ratio = (ref_chosen.double() - ref_rejected.double()) + (torch.log(a) - torch.log1p(-a)) / beta
    return log_ratio > math.log1p(tie)


def dpo_flip_loss(ref_chosen: Tensor, ref_rejected: Tensor, *, beta: float) -> Tensor:
    r"""The DPO loss below which a pair is ranked correctly: ``log(1 + (π_ref(y_w)/π_ref(y_l))^β)``; ``(b,)``.

    With ``h = (S_w − S_ref,w) − (S_l − S_ref,l)`` and ``L = −log σ(βh)``:
    ``S_w > S_l ⇔ h > S_ref,l − S_ref,w ⇔ L < softplus(β (S_ref,w − S_ref,l))`` (derived here; the flip
    condition of Chen et al. 2024, arXiv 2405.19534). When the reference prefers ``y_l`` strongly, this is far
    below ``log 2``: DPO must nearly reach its optimum on the pair before the ranking flips. Differentiable.

    Args:
        ref_chosen: ``(b,)`` reference sequence log-probs ``S_ref,w``.
        ref_rejected: ``(b,)`` reference sequence log-probs ``S_ref,l``.
        beta: ``β > 0``.
    """
    b = _check_vec("ref_chosen", ref_chosen).shape[0]
    _check_vec("ref_rejected", ref_rejected, b)
    beta = _check_number("beta", beta, lo=0.0)
    return F.softplus(beta * (ref_chosen - ref_rejected))


# ----------------------------------------------------------------------------------------------------------
# squeezing effect
# ----------------------------------------------------------------------------------------------------------


def _check_target(target: Any, lead: tuple[int, ...], vocab: int) -> Tensor:
    if not isinstance(target, Tensor) or torch.is_floating_point(target) or target.dtype == torch.bool:
        raise TypeError(
            f"target must be an integer tensor, got {getattr(target, 'dtype', type(target).__name__)}"
        )
    if tuple(target.shape) != lead:
        raise ValueError(
            f"target must have shape {lead} (logits without the last dim), got {tuple(target.shape)}"
        )
    if target.numel() and (int(target.min()) < 0 or int(target.max()) >= vocab):
        raise ValueError(f"target must lie in [0, {vocab})")
    return target.long()


def _squeeze_inputs(logits: Tensor, target: Tensor, eta: float) -> tuple[float, Tensor, Tensor, Tensor]:
    """Checked ``(η, target, π = softmax(logits), onehot(target))`` of the squeezing helpers."""
    check_tensor("logits", logits)
    if logits.ndim < 1:
        raise ValueError("logits must have at least one dimension (the vocabulary)")
    eta = _check_number("eta", eta, lo=0.0, lo_open=False)
    t = _check_target(target, tuple(logits.shape[:-1]), logits.shape[-1])
    p = torch.softmax(logits, dim=-1)
    return eta, t, p, F.one_hot(t, logits.shape[-1]).to(logits.dtype)


def squeeze_step(logits: Tensor, target: Tensor, *, eta: float) -> Tensor:
    r"""Exact probabilities after one gradient step *down* on ``log π(ȳ)``, logits as free parameters.

    ``z⁺ = z − η ∇_z log π(ȳ) = z − η (e_ȳ − π)``, so

    $$
    π^+_i = \frac{π_i \exp(η(π_i - 1[i=ȳ]))}{\sum_j π_j \exp(η(π_j - 1[j=ȳ]))}
    $$

    (Ren & Sutherland 2024, arXiv 2407.10490; closed form derived here for one context). ``π⁺_ȳ < π_ȳ``
    always, and the most likely other token always gains ("squeezing"). In DPO the rejected response's step is
    this with ``η → η β σ(−βh)``. Differentiable.

    Args:
        logits: ``(..., V)``.
        target: ``(...)`` integer token ids ``ȳ``.
        eta: step size ``η ≥ 0``.

    Returns:
        ``(..., V)`` probabilities ``π⁺`` (dtype of ``logits``).
    """
    eta, _, p, onehot = _squeeze_inputs(logits, target, eta)
    return torch.softmax(logits - eta * (onehot - p), dim=-1)


def squeeze_first_order(logits: Tensor, target: Tensor, *, eta: float) -> Tensor:
    r"""First-order change of every ``log π_i`` after [`squeeze_step`][prefopt.diagnostics.displacement.squeeze_step]: ``(..., V)``.

    $$
    Δ \log π_i ≈ η\,(π_i - 1[i=ȳ] - \lVert π\rVert^2 + π_ȳ)
    $$

    so a token ``i ≠ ȳ`` gains iff ``π_i > ‖π‖² − π_ȳ`` ("the rich get richer"; Ren & Sutherland 2024,
    arXiv 2407.10490; derived here). Differentiable.
    """
    eta, t, p, onehot = _squeeze_inputs(logits, target, eta)
    p_t = p.gather(-1, t.unsqueeze(-1))
    return eta * (p - onehot - (p * p).sum(-1, keepdim=True) + p_t)


@dataclass(frozen=True)
class SqueezeReport:
    """Per-token result of [`squeezing_probe`][prefopt.diagnostics.displacement.squeezing_probe]; tensors ``(b, t)`` float64 (``argmax``: int64), zero
    where ``completion_mask`` is False.

    Attributes:
        argmax: the most likely token at the position before the step (``−1`` where masked).
        argmax_prob_before: its probability before the step.
        argmax_prob_after: its probability after the step.
        target_prob_before: probability of the response token ``y_t`` before the step.
        target_prob_after: probability of the response token ``y_t`` after the step.
        moved_to_argmax: ``argmax_prob_after − argmax_prob_before``.
        argmax_is_target: bool, the response token is itself the argmax.
        eta: the step size.
    """

    argmax: Tensor
    argmax_prob_before: Tensor
    argmax_prob_after: Tensor
    target_prob_before: Tensor
    target_prob_after: Tensor
    moved_to_argmax: Tensor
    argmax_is_target: Tensor
    eta: float


def _probs(model: nn.Module, ids: Tensor, am: Tensor | None) -> Tensor:
    """``(b, t, V)`` next-token probabilities (float64), position ``p`` predicting token ``p+1``."""
    out = model(input_ids=ids, attention_mask=am, use_cache=False)
    logits = out.logits if hasattr(out, "logits") else out[0]
    return torch.softmax(logits.double(), dim=-1)


def squeezing_probe(
    model: Any,
    input_ids: Tensor,
    completion_mask: Tensor,
    attention_mask: Tensor | None = None,
    *,
    eta: float = 1e-3,
    params: Iterable[Any] | None = None,
) -> SqueezeReport:
    r"""Take one SGD step *down* on each row's ``log π(y|x)`` (row by row) and measure where the mass went.

    For each row ``i`` alone: ``θ⁺ = θ − η ∇_θ S(y_i)`` (gradient ascent on the NLL of a rejected response,
    what DPO's rejected term does with ``η β σ(−βh)``), then, at every response position ``t``, the
    probability of the pre-step argmax token and of the response token before and after. Ren & Sutherland
    2024 (arXiv 2407.10490): the argmax typically gains even when it is not ``y_t``. Parameters are
    restored exactly after each row. With logits as parameters the per-position result is
    [`squeeze_step`][prefopt.diagnostics.displacement.squeeze_step].

    Args:
        model: a causal LM (``nn.Module`` returning ``.logits``) or a
            [`prefopt.LoraPolicy`][prefopt.policy.LoraPolicy].
        input_ids: ``(b, t)``.
        completion_mask: ``(b, t)`` bool (False at 0).
        attention_mask: optional ``(b, t)``.
        eta: ``η > 0``.
        params: parameters or names to step (default: all with ``requires_grad``).

    Cost: per row one forward+backward and one forward; model in ``eval()`` mode.
    """
    from prefopt.logprobs import _check_inputs, token_logps
    from prefopt.masked import seq_sum

    mdl, _ = resolve_model(model)
    check_tensor("completion_mask", completion_mask, ndim=2, floating=False)
    _check_inputs(input_ids, attention_mask, completion_mask)
    eta = _check_number("eta", eta, lo=0.0)
    if bool((~completion_mask.any(dim=1)).any()):
        raise ValueError("completion_mask has a row with no completion token")
    named = resolve_params(mdl, params)
    ps = [p for _, p in named]
    saved = [p.detach().clone() for p in ps]
    b = input_ids.shape[0]
    sel = completion_mask[:, 1:]
    y_next = input_ids[:, 1:].long()
    fields: dict[str, list[Tensor]] = {k: [] for k in ("am", "ab", "aa", "tb", "ta")}
    try:
        with eval_mode(mdl):
            for i in range(b):
                ids_i, cm_i = input_ids[i : i + 1], completion_mask[i : i + 1]
                am_i = None if attention_mask is None else attention_mask[i : i + 1]
                with torch.no_grad():
                    before = _probs(mdl, ids_i, am_i)[0, :-1]
                with torch.enable_grad():
                    s = seq_sum(token_logps(mdl, ids_i, am_i, cm_i), cm_i)  # type: ignore[arg-type]
                    grads = torch.autograd.grad(s.sum(), ps, allow_unused=True)
                with torch.no_grad():
                    for p, g in zip(ps, grads, strict=True):
                        if g is not None:
                            p.add_(g.to(p.dtype), alpha=-eta)
                    after = _probs(mdl, ids_i, am_i)[0, :-1]
                    for p, keep in zip(ps, saved, strict=True):
                        p.copy_(keep)
                am_ = before.argmax(-1)
                yi = y_next[i]
                fields["am"].append(am_)
                fields["ab"].append(before.gather(-1, am_[:, None])[:, 0])
                fields["aa"].append(after.gather(-1, am_[:, None])[:, 0])
                fields["tb"].append(before.gather(-1, yi[:, None])[:, 0])
                fields["ta"].append(after.gather(-1, yi[:, None])[:, 0])
    finally:
        with torch.no_grad():
            for p, keep in zip(ps, saved, strict=True):
                p.copy_(keep)

    def dense(key: str, fill: float | int) -> Tensor:
        x = torch.stack(fields[key])  # (b, t-1)
        x = torch.where(sel, x, torch.full_like(x, fill))
        return torch.cat([torch.full_like(x[:, :1], fill), x], dim=1)

    argmax = dense("am", -1)
    ab, aa, tb, ta = dense("ab", 0.0), dense("aa", 0.0), dense("tb", 0.0), dense("ta", 0.0)
    return SqueezeReport(
        argmax=argmax,
        argmax_prob_before=ab,
        argmax_prob_after=aa,
        target_prob_before=tb,
        target_prob_after=ta,
        moved_to_argmax=aa - ab,
        argmax_is_target=completion_mask & (argmax == input_ids),
        eta=eta,
    )


# ----------------------------------------------------------------------------------------------------------
# one-token gradient inner products (closed forms)
# ----------------------------------------------------------------------------------------------------------


def _probs_and_tokens(probs: Tensor, names: tuple[str, ...], tokens: tuple[Tensor, ...]) -> list[Tensor]:
    check_tensor("probs", probs)
    if probs.ndim < 1:
        raise ValueError("probs must have at least one dimension (the vocabulary)")
    return [
        _check_target_named(n, tk, tuple(probs.shape[:-1]), probs.shape[-1]) for n, tk in zip(names, tokens)
    ]


def _check_target_named(name: str, tk: Any, lead: tuple[int, ...], vocab: int) -> Tensor:
    try:
        return _check_target(tk, lead, vocab)
    except (TypeError, ValueError) as e:
        raise type(e)(str(e).replace("target", name, 1)) from None


def tabular_grad_inner(probs: Tensor, chosen: Tensor, rejected: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    r"""``(⟨g_w, g_l⟩, ‖g_w‖², ‖g_l‖²)`` for ``g_a = ∇_z log softmax(z)_a = e_a − π`` (logits as parameters,
    one context):

    $$
    ⟨g_w, g_l⟩ = \lVert π\rVert^2 - π_w - π_l + 1[w=l], \qquad \lVert g_w\rVert^2 = 1 - 2π_w + \lVert π\rVert^2.
    $$

    For ``w ≠ l``, ``⟨g_w,g_l⟩ − ‖g_w‖² = π_w − π_l − 1 < 0``: a DPO step on such a one-token pair can never
    lower ``π_w`` (the entanglement condition of Yuan et al. 2024, arXiv 2410.13828, never fires).

    Args:
        probs: ``(..., V)`` probabilities ``π``.
        chosen: ``(...)`` token ids ``w``.
        rejected: ``(...)`` token ids ``l``.

    Returns:
        Three ``(...)`` tensors in the dtype of ``probs``.
    """
    w, lt = _probs_and_tokens(probs, ("chosen", "rejected"), (chosen, rejected))
    sq = (probs * probs).sum(-1)
    pw = probs.gather(-1, w.unsqueeze(-1))[..., 0]
    pl = probs.gather(-1, lt.unsqueeze(-1))[..., 0]
    inner = sq - pw - pl + (w == lt).to(probs.dtype)
    return inner, 1 - 2 * pw + sq, 1 - 2 * pl + sq


def unembedding_grad_inner(
    probs_a: Tensor, token_a: Tensor, hidden_a: Tensor, probs_b: Tensor, token_b: Tensor, hidden_b: Tensor
) -> Tensor:
    r"""``⟨∇_W log π(a|h), ∇_W log π(b|h')⟩_F`` for a shared unembedding, logits ``= W h``:

    $$
    ∇_W \log π(a|h) = (e_a - π) h^\top \;\Rightarrow\;
    ⟨·,·⟩_F = ⟨e_a - π, e_b - π'⟩ \, ⟨h, h'⟩,
    $$

    with ``⟨e_a − π, e_b − π'⟩ = 1[a=b] − π'_a − π_b + ⟨π, π'⟩`` (derived here; cf. the token-unembedding view
    of Razin et al. 2024, arXiv 2410.08847). Same context (``h = h'``) gives
    [`tabular_grad_inner`][prefopt.diagnostics.displacement.tabular_grad_inner] times ``‖h‖²``.

    Args:
        probs_a: ``(..., V)`` ``π = softmax(W h)``.
        token_a: ``(...)`` token ids ``a``.
        hidden_a: ``(..., d)`` ``h``.
        probs_b: ``(..., V)`` ``π' = softmax(W h')``.
        token_b: ``(...)`` token ids ``b``.
        hidden_b: ``(..., d)`` ``h'``.

    Returns:
        ``(...)``.
    """
    (a,) = _probs_and_tokens(probs_a, ("token_a",), (token_a,))
    (bb,) = _probs_and_tokens(probs_b, ("token_b",), (token_b,))
    if probs_a.shape != probs_b.shape:
        raise ValueError(f"probs_a {tuple(probs_a.shape)} and probs_b {tuple(probs_b.shape)} differ in shape")
    for name, h in (("hidden_a", hidden_a), ("hidden_b", hidden_b)):
        check_tensor(name, h)
        if tuple(h.shape[:-1]) != tuple(probs_a.shape[:-1]):
            raise ValueError(
                f"{name} must have shape {tuple(probs_a.shape[:-1])} + (d,), got {tuple(h.shape)}"
            )
    if hidden_a.shape != hidden_b.shape:
        raise ValueError("hidden_a and hidden_b must have the same shape")
    cross = (probs_a * probs_b).sum(-1)
    pa_b = probs_b.gather(-1, a.unsqueeze(-1))[..., 0]
    pb_a = probs_a.gather(-1, bb.unsqueeze(-1))[..., 0]
    e = (a == bb).to(probs_a.dtype) - pa_b - pb_a + cross
    return e * (hidden_a * hidden_b).sum(-1)


def hidden_grad_inner(
    unembedding: Tensor, probs: Tensor, chosen: Tensor, rejected: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    r"""``(⟨g_w, g_l⟩, ‖g_w‖², ‖g_l‖²)`` for ``g_a = ∇_h log softmax(W h)_a`` (hidden state as the parameter,
    ``W`` fixed — derived here; the unconstrained-features view of Razin et al. 2024, arXiv 2410.08847):

    $$
    g_a = W_a - W^\top π = W_a - \bar W,\qquad ⟨g_w, g_l⟩ = ⟨W_w - \bar W, W_l - \bar W⟩.
    $$

    A DPO step on ``h`` alone lowers ``log π(y_w)`` to first order iff ``⟨g_w, g_l⟩ > ‖g_w‖²``.

    Args:
        unembedding: ``(V, d)`` ``W``.
        probs: ``(..., V)`` ``π = softmax(W h)``.
        chosen: ``(...)`` token ids ``w``.
        rejected: ``(...)`` token ids ``l``.

    Returns:
        Three ``(...)`` tensors.
    """
    check_tensor("unembedding", unembedding, ndim=2)
    w, lt = _probs_and_tokens(probs, ("chosen", "rejected"), (chosen, rejected))
    if probs.shape[-1] != unembedding.shape[0]:
        raise ValueError(
            f"probs has {probs.shape[-1]} entries in its last dim but unembedding has {unembedding.shape[0]} rows"
        )
    wbar = probs @ unembedding  # (..., d)
    gw = unembedding[w] - wbar
    gl = unembedding[lt] - wbar
    return (gw * gl).sum(-1), (gw * gw).sum(-1), (gl * gl).sum(-1)
