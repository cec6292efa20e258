r"""Scalar reward models on a (LoRA) causal-LM backbone: \(r(x, y) = w^\top h_{\text{last}} + c\).

\(h_{\text{last}}\) is the backbone's final hidden state (after the last norm) at the last non-pad token of the
sequence \(x \oplus y\) — with the collators' `add_eos=True` that is the EOS token, which has read the whole
text. The head is a [`ValueHead`][prefopt.value_head.ValueHead] (float32; float64 for a float64 backbone).
Train it with [`bradley_terry`][prefopt.losses.reward.bradley_terry] on pairs (Ouyang et al. 2022, Eq. 1) or
with [`reward_classification`][prefopt.losses.reward.reward_classification] (BCE) on pointwise labels
(PE-RLHF, Sidahmed et al. 2024, arXiv 2403.10704, §3 — both reward-model losses are theirs).

Two variants with one interface (`forward(input_ids, attention_mask) -> (b,)`):

* [`RewardModel.lora`][prefopt.reward_model.RewardModel.lora] — **reuses**
  [`LoraPolicy`][prefopt.policy.LoraPolicy] with `value_head=True, anchor=False`: the LoRA "policy" adapter
  is the reward model's adapter and [`LoraPolicy.values`][prefopt.policy.LoraPolicy.values] is the
  per-position head, read here at the last token. Only the adapter and the head train; the backbone stays
  frozen (so the same base weights can also serve a policy elsewhere). No anchor adapter is added.
* [`RewardModel.full`][prefopt.reward_model.RewardModel.full] — full fine-tuning: every backbone parameter
  trains, plus the head.

Padding may be on either side: the last non-pad position is found from `attention_mask`. Position ids come
from the mask, so left-padded rows see their natural positions; the project's collators pad on the RIGHT,
with which every row starts at position 0.
"""

from __future__ import annotations

import os
from typing import Any

import peft
import torch
from torch import Tensor, nn

from prefopt.policy import LoraPolicy
from prefopt.value_head import ValueHead, final_hidden_states, last_token_index

__all__ = ["RewardModel", "last_token_index"]  # last_token_index: re-exported from prefopt.value_head


class RewardModel(nn.Module):
    """A scalar reward model; build it with [`lora`][prefopt.reward_model.RewardModel.lora] or
    [`full`][prefopt.reward_model.RewardModel.full].

    `forward(input_ids (b, t), attention_mask (b, t)) -> (b,)` rewards with grad, in the head's dtype (float32;
    float64 for a float64 backbone).

    Args:
        kind: `"lora"` or `"full"`.
        policy: the [`LoraPolicy`][prefopt.policy.LoraPolicy] with a value head (`kind="lora"`).
        model: the causal LM whose backbone is trained (`kind="full"`).

    Attributes: `kind`, `policy` (LoRA variant) or `backbone` and `head` (full variant, a
    [`ValueHead`][prefopt.value_head.ValueHead]).
    """

    def __init__(
        self, *, kind: str, policy: LoraPolicy | None = None, model: nn.Module | None = None
    ) -> None:
        super().__init__()
        if kind not in ("lora", "full"):
            raise ValueError(f'kind must be "lora" or "full", got {kind!r}')
        self.kind = kind
        self.policy = policy
        self.backbone: nn.Module | None = None
        self.head: ValueHead | None = None
        if kind == "full":
            if model is None:
                raise ValueError("kind='full' needs model")
            prefix = getattr(model, "base_model_prefix", None)
            backbone = getattr(model, str(prefix), None) if prefix else None
            if not isinstance(backbone, nn.Module) or backbone is model:
                raise TypeError(
                    f"model must be a transformers causal LM with a base_model_prefix backbone, got {type(model).__name__}"
                )
            # keep the backbone only: the LM head is not used by a reward model
            self.backbone = backbone
            self.head = ValueHead.for_model(model, zero_bias=True)  # float32, float64 for a float64 model
            for p in self.parameters():
                p.requires_grad_(True)
        elif policy is None or policy.value_head is None:
            raise ValueError("kind='lora' needs a LoraPolicy with value_head=True")

    # ---------------------------------------------------------------------------------------- builders
    @classmethod
    def lora(cls, model: nn.Module, lora_config: peft.LoraConfig | None = None) -> RewardModel:
        """LoRA reward model: `LoraPolicy(model, lora_config, value_head=True, anchor=False)`, head bias 0.

        Args:
            model: a transformers causal LM, wrapped in place (see [`LoraPolicy`][prefopt.policy.LoraPolicy]).
            lora_config: the adapter's config; `None` → the policy default (r=8, all-linear).

        Returns:
            the reward model; its trainable parameters are the adapter and the head.
        """
        policy = LoraPolicy(model, lora_config, value_head=True, anchor=False)
        assert policy.value_head is not None
        with torch.no_grad():
            policy.value_head.bias.zero_()
        return cls(kind="lora", policy=policy)

    @classmethod
    def full(cls, model: nn.Module) -> RewardModel:
        """Fully fine-tuned reward model: the backbone of `model` (all parameters trainable) and a head.

        Args:
            model: a transformers causal LM with a `base_model_prefix` backbone; its LM head is dropped.

        Returns:
            the reward model; the head is float32 (float64 for a float64 `model`) with bias 0.
        """
        return cls(kind="full", model=model)

    # ---------------------------------------------------------------------------------------- forward
    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Rewards: the head applied to the final hidden state at each row's last non-pad token.

        Args:
            input_ids: `(b, t)` token ids.
            attention_mask: `(b, t)` mask (left or right padding); `None` → no padding.

        Returns:
            `(b,)` in the head's dtype, with grad.
        """
        if not isinstance(input_ids, Tensor) or input_ids.ndim != 2:
            raise ValueError(
                f"input_ids must be a (b, t) tensor, got {getattr(input_ids, 'shape', input_ids)!r}"
            )
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if not isinstance(attention_mask, Tensor) or attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, "
                f"got {tuple(getattr(attention_mask, 'shape', ()))}"
            )
        if self.policy is not None:
            last = last_token_index(attention_mask)
            rows = torch.arange(input_ids.shape[0], device=input_ids.device)
            return self.policy.values(input_ids, attention_mask)[rows, last]
        assert self.backbone is not None and self.head is not None
        return self.head.at_last_token(
            final_hidden_states(self.backbone, input_ids, attention_mask), attention_mask
        )

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters to optimize (LoRA: the adapter and the head; full: everything).

        Returns:
            the parameters with `requires_grad`, in `named_parameters` order.
        """
        return [p for p in self.parameters() if p.requires_grad]

    # ---------------------------------------------------------------------------------------- persistence
    def save(self, directory: str | os.PathLike[str]) -> None:
        """Save a LoRA reward model (adapter and head, via [`LoraPolicy.save`][prefopt.policy.LoraPolicy.save],
        atomic). Full models: use `torch.save(rm.state_dict(), path)`.

        Args:
            directory: the folder to write (created if missing).
        """
        if self.policy is None:
            raise NotImplementedError(
                "save() is for LoRA reward models; use torch.save(rm.state_dict()) for full ones"
            )
        self.policy.save(directory)

    @classmethod
    def load(
        cls, base_model: nn.Module, directory: str | os.PathLike[str], *, check_base: bool = True
    ) -> RewardModel:
        """Rebuild a LoRA reward model saved with [`save`][prefopt.reward_model.RewardModel.save].

        The errors and the clean-up on failure of [`LoraPolicy.load`][prefopt.policy.LoraPolicy.load] apply.

        Args:
            base_model: the backbone the reward model was trained on (wrapped in place).
            directory: the folder written by `save`.
            check_base: compare `base_model` with the fingerprint saved with the checkpoint.

        Returns:
            the reward model, every saved tensor restored exactly.
        """
        policy = LoraPolicy.load(base_model, directory, check_base=check_base)
        if policy.value_head is None:
            tuner: Any = policy.model.base_model
            tuner.unload()  # give the caller back an un-wrapped model
            raise ValueError(f"{directory} holds a LoraPolicy without a value head, not a reward model")
        return cls(kind="lora", policy=policy)
