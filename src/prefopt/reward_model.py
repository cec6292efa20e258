r"""Scalar reward models on a (LoRA) causal-LM backbone: ``r(x, y) = w·h_last + c``.

``h_last`` is the backbone's final hidden state (after the last norm) at the last non-pad token of the
sequence ``x ⊕ y`` — with the collators' ``add_eos=True`` that is the EOS token, which has read the whole text.
Train it with :func:`prefopt.losses.reward.bradley_terry` on pairs (Ouyang et al. 2022, Eq. 1) or with
:func:`prefopt.losses.reward.reward_classification` (BCE) on pointwise labels (PE-RLHF, Sidahmed et al. 2024,
arXiv 2403.10704, §3 — both reward-model losses are theirs).

Two variants with one interface (``forward(input_ids, attention_mask) -> (b,)``):

* :meth:`RewardModel.lora` — **reuses** :class:`prefopt.policy.LoraPolicy` with ``value_head=True``: the
  LoRA "policy" adapter is the reward model's adapter and ``LoraPolicy.values`` is the per-position head, read
  here at the last token. Only the adapter and the head train; the backbone stays frozen (so the same base
  weights can also serve a policy elsewhere). The anchor adapter that LoraPolicy always adds is kept at
  rank 1 (unused here; a few thousand parameters).
* :meth:`RewardModel.full` — full fine-tuning: every backbone parameter trains, plus a float32 head.

Padding may be on either side: the last non-pad position is found from ``attention_mask``. Position ids are
the backbone's default (``0..T−1`` over the padded row), so prefer RIGHT padding (the project's collators),
with which every row sees its natural positions; with left padding a RoPE model gives the same result only up
to float error, and an absolute-position model would not.
"""

from __future__ import annotations

import os
from typing import Any

import peft
import torch
from torch import Tensor, nn

from prefopt.logprobs import position_kwargs
from prefopt.policy import LoraPolicy, config_hidden_size
from prefopt.rl import last_valid_index

__all__ = ["RewardModel", "last_token_index"]


def last_token_index(attention_mask: Tensor) -> Tensor:
    """``(b,)`` long: the index of the last non-pad position (``attention_mask != 0``) of each row.

    Works for left and right padding. Raises ``ValueError`` naming ``attention_mask`` for a row of padding
    only, ``TypeError``/``ValueError`` for a non-tensor, float or non-2-D mask.
    """
    if not isinstance(attention_mask, Tensor):
        raise TypeError(f"attention_mask must be a torch.Tensor, got {type(attention_mask).__name__}")
    if attention_mask.ndim != 2:
        raise ValueError(f"attention_mask must be 2-D (b, t), got shape {tuple(attention_mask.shape)}")
    if torch.is_floating_point(attention_mask) or attention_mask.is_complex():
        raise TypeError(f"attention_mask must be an integer or bool tensor, got dtype {attention_mask.dtype}")
    return last_valid_index(attention_mask != 0, name="attention_mask")


class RewardModel(nn.Module):
    """A scalar reward model; build it with :meth:`lora` or :meth:`full`.

    ``forward(input_ids (b, t), attention_mask (b, t)) -> (b,)`` float32 rewards with grad.

    Attributes: ``kind`` (``"lora"`` or ``"full"``), ``policy`` (the :class:`LoraPolicy`, LoRA variant) or
    ``backbone`` and ``head`` (full variant).
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
        self.head: nn.Linear | None = None
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
            device = next(backbone.parameters()).device
            self.head = nn.Linear(config_hidden_size(model.config), 1, device=device, dtype=torch.float32)
            nn.init.zeros_(self.head.bias)
            for p in self.parameters():
                p.requires_grad_(True)
        elif policy is None or policy.value_head is None:
            raise ValueError("kind='lora' needs a LoraPolicy with value_head=True")

    # ---------------------------------------------------------------------------------------- builders
    @classmethod
    def lora(cls, model: nn.Module, lora_config: peft.LoraConfig | None = None) -> RewardModel:
        """LoRA reward model: ``LoraPolicy(model, lora_config, value_head=True, anchor_rank=1)``; ``model`` is
        wrapped in place (see :class:`LoraPolicy`); ``lora_config=None`` → its default (r=8, all-linear)."""
        policy = LoraPolicy(model, lora_config, value_head=True, anchor_rank=1)
        assert policy.value_head is not None
        with torch.no_grad():
            policy.value_head.bias.zero_()
        return cls(kind="lora", policy=policy)

    @classmethod
    def full(cls, model: nn.Module) -> RewardModel:
        """Fully fine-tuned reward model: the backbone of ``model`` (all parameters trainable) + a head."""
        return cls(kind="full", model=model)

    # ---------------------------------------------------------------------------------------- forward
    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Rewards ``(b,)`` float32: the head applied to the final hidden state at each row's last non-pad token."""
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
        last = last_token_index(attention_mask)
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        if self.policy is not None:
            return self.policy.values(input_ids, attention_mask)[rows, last]
        assert self.backbone is not None and self.head is not None
        pos = position_kwargs(self.backbone, attention_mask)
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask, **pos).last_hidden_state
        return self.head(hidden[rows, last].float()).squeeze(-1)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters to optimize (LoRA: the adapter and the head; full: everything)."""
        return [p for p in self.parameters() if p.requires_grad]

    # ---------------------------------------------------------------------------------------- persistence
    def save(self, directory: str | os.PathLike[str]) -> None:
        """Save a LoRA reward model (adapter + head, via :meth:`LoraPolicy.save`, atomic). Full models: use
        ``torch.save(rm.state_dict(), path)``."""
        if self.policy is None:
            raise NotImplementedError(
                "save() is for LoRA reward models; use torch.save(rm.state_dict()) for full ones"
            )
        self.policy.save(directory)

    @classmethod
    def load(
        cls, base_model: nn.Module, directory: str | os.PathLike[str], *, check_base: bool = True
    ) -> RewardModel:
        """Rebuild a LoRA reward model saved with :meth:`save` on ``base_model`` (same base weights, checked
        unless ``check_base=False``; see :meth:`LoraPolicy.load`, whose errors and clean-up on failure apply)."""
        policy = LoraPolicy.load(base_model, directory, check_base=check_base)
        if policy.value_head is None:
            tuner: Any = policy.model.base_model
            tuner.unload()  # give the caller back an un-wrapped model
            raise ValueError(f"{directory} holds a LoraPolicy without a value head, not a reward model")
        return cls(kind="lora", policy=policy)
