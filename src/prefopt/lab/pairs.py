r"""Gold-labelled preference pairs in the lab: two reference completions per prompt, ordered by the gold reward.

For each prompt ``x`` (drawn from the lab's language) two completions ``y_1, y_2`` are sampled from the
reference LM at temperature 1, and the pair is labelled with the lab's gold reward ``r``:

* ``labels="gold"`` (default) — deterministic: the completion with the higher gold reward is chosen. A pair
  whose rewards are exactly equal (a *tie*: equal token multisets and bigram counts, or two identical
  completions) carries no preference and is dropped; prompts are drawn until ``n`` untied pairs are kept.
* ``labels="bradley_terry"`` — sampled: ``y_1`` is chosen with probability
  ``σ((r(y_1) − r(y_2)) / τ)`` (Bradley & Terry 1952; the preference model of RLHF, Ouyang et al. 2022,
  arXiv 2203.02155, Eq. 1), ``τ = temperature``; ties are dropped as above (they would be coin flips). Some
  pairs then disagree with the gold order (``LabPairs.agrees_with_gold``), like real annotator noise.

The result, [`LabPairs`][prefopt.lab.pairs.LabPairs], holds token ids and gold rewards and collates itself into
the project's duplicated-layout [`PairBatch`][prefopt.types.PairBatch] (``batch``), ready for
[`pair_logps`][prefopt.logprobs.pair_logps] and every pairwise loss in the registry, or for a
[`RewardModel`][prefopt.reward_model.RewardModel] (``input_ids``/``attention_mask``; chosen rows first).
Lab sequences have one fixed length, so there is no padding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from prefopt.lab.measure import lab_sampler
from prefopt.lab.testbed import Lab
from prefopt.types import PairBatch

__all__ = ["LabPairs", "gold_pairs"]

_LABELS = ("gold", "bradley_terry")


@dataclass(frozen=True)
class LabPairs:
    """``n`` lab preference pairs with their gold rewards.

    Attributes:
        prompts: ``(n, 1 + P)`` prompt ids (``BOS, x_1 … x_P``).
        chosen: ``(n, L)`` completion ids of the preferred completion.
        rejected: ``(n, L)`` completion ids of the other one.
        chosen_reward: ``(n,)`` float64 gold reward of ``chosen``.
        rejected_reward: ``(n,)`` float64 gold reward of ``rejected``.
    """

    prompts: Tensor
    chosen: Tensor
    rejected: Tensor
    chosen_reward: Tensor
    rejected_reward: Tensor

    def __post_init__(self) -> None:
        n = self.prompts.shape[0]
        for name in ("chosen", "rejected", "chosen_reward", "rejected_reward"):
            value = getattr(self, name)
            if value.shape[0] != n:
                raise ValueError(f"{name} has {value.shape[0]} rows but prompts has {n}")
        if self.chosen.shape != self.rejected.shape:
            raise ValueError(
                f"chosen {tuple(self.chosen.shape)} and rejected {tuple(self.rejected.shape)} differ in shape"
            )

    def __len__(self) -> int:
        return int(self.prompts.shape[0])

    @property
    def agrees_with_gold(self) -> Tensor:
        """``(n,)`` bool: the label agrees with the gold order (``r(chosen) > r(rejected)``)."""
        return self.chosen_reward > self.rejected_reward

    def select(self, index: Tensor | slice | list[int]) -> LabPairs:
        """The pairs at ``index`` (a slice, a list or a tensor of positions, or a bool mask)."""
        return LabPairs(
            self.prompts[index],
            self.chosen[index],
            self.rejected[index],
            self.chosen_reward[index],
            self.rejected_reward[index],
        )

    def batch(self, index: Tensor | slice | list[int] | None = None) -> PairBatch:
        """The pairs (all, or those at ``index``) as a duplicated-layout [`PairBatch`][prefopt.types.PairBatch]:
        ``2B`` rows ``prompt ++ completion``, chosen rows ``0..B−1``, their rejected twins ``B..2B−1``; the
        completion mask covers the ``L`` completion tokens; ``row_index`` is the position in this
        ``LabPairs`` (or in ``index``'s selection)."""
        sel = self if index is None else self.select(index)
        b = len(sel)
        if b == 0:
            raise ValueError("batch: no pairs selected")
        prompts = torch.cat([sel.prompts, sel.prompts])
        ids = torch.cat([prompts, torch.cat([sel.chosen, sel.rejected])], dim=1).long()
        p, c = sel.prompts.shape[1], sel.chosen.shape[1]
        mask = torch.zeros_like(ids, dtype=torch.bool)
        mask[:, p:] = True
        return PairBatch(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            completion_mask=mask,
            prompt_len=torch.full((2 * b,), p, dtype=torch.long),
            completion_len=torch.full((2 * b,), c, dtype=torch.long),
            row_index=torch.arange(b),
        )


def gold_pairs(
    lab: Lab,
    reference: Any,
    n: int,
    *,
    seed: int = 0,
    labels: str = "gold",
    temperature: float = 0.1,
    batch_size: int = 2048,
) -> LabPairs:
    """``n`` untied gold-labelled pairs of reference completions (see the module docstring).

    Args:
        lab: the lab (its language for prompts, its gold reward for labels).
        reference: the model the completions are sampled from (the reference LM, or a ``LoraPolicy`` — then
            its current policy view).
        n: number of pairs (``>= 1``).
        seed: seeds the prompts (``lab.sample_prompts``), the sampling and the Bradley–Terry labels; the same
            seed gives the same pairs. Use different seeds for training and held-out pairs.
        labels: ``"gold"`` (higher gold reward is chosen) or ``"bradley_terry"`` (sampled, temperature ``τ``).
        temperature: ``τ > 0`` of the Bradley–Terry labels (ignored for ``"gold"``). In the experiments'
            small lab (``experiments/reward_lora.py``) two reference completions differ in gold reward by
            0.36 (median ``|Δr|``), and ``τ = 0.1`` (default) leaves about 90% of labels agreeing with the
            gold order: the close pairs are the ones flipped.
        batch_size: prompts per sampling call.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    if labels not in _LABELS:
        raise ValueError(f"labels must be one of {_LABELS}, got {labels!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"temperature must be a number > 0, got {temperature!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    g = torch.Generator().manual_seed(seed)
    label_g = torch.Generator().manual_seed(seed + 7919)
    sampler = lab_sampler(lab, reference, reference=None)
    parts: list[LabPairs] = []
    kept = 0
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        while kept < n:
            # draw ~10% more than still needed: ties are rare, so one round almost always suffices
            m = min(batch_size, n - kept + (n - kept) // 10 + 8)
            prompts = lab.sample_prompts(m, generator=g)
            with torch.no_grad():
                roll = sampler.generate(
                    {"input_ids": prompts, "attention_mask": torch.ones_like(prompts)}, n=2
                )
            comp = lab.completions_of(roll.input_ids, roll.prompt_len).view(m, 2, -1)
            r = lab.gold_reward(comp.reshape(2 * m, -1)).view(m, 2)
            first, second = comp[:, 0], comp[:, 1]
            untied = r[:, 0] != r[:, 1]
            if labels == "gold":
                first_wins = r[:, 0] > r[:, 1]
            else:
                p = torch.sigmoid((r[:, 0] - r[:, 1]) / temperature)
                first_wins = torch.rand(m, generator=label_g, dtype=torch.float64) < p
            fw = first_wins.unsqueeze(1)
            part = LabPairs(
                prompts=prompts,
                chosen=torch.where(fw, first, second),
                rejected=torch.where(fw, second, first),
                chosen_reward=torch.where(first_wins, r[:, 0], r[:, 1]),
                rejected_reward=torch.where(first_wins, r[:, 1], r[:, 0]),
            ).select(untied)
            parts.append(part)
            kept += len(part)
    finally:
        torch.random.set_rng_state(state)
    out = LabPairs(*(torch.cat([getattr(p, f) for p in parts]) for f in LabPairs.__dataclass_fields__))
    return out.select(slice(0, n))
