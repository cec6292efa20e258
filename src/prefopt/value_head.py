r"""A scalar head on a causal LM's final hidden state, shared by value models and reward models.

[`ValueHead`][prefopt.value_head.ValueHead] is one linear map from the backbone's final hidden state (after the
last norm) to a number,

$$
v_i = w^\top h_i + c, \qquad h_i \in \mathbb{R}^{d},
$$

where \(h_i\) has read the tokens \(0..i\). [`LoraPolicy`][prefopt.policy.LoraPolicy] with `value_head=True`
reads it at every position (PPO's value \(V(s_i)\), Schulman et al. 2017, arXiv 1707.06347, Eq. 9; PE-RLHF,
Sidahmed et al. 2024, arXiv 2403.10704, §3, puts it on the same LoRA backbone);
[`RewardModel`][prefopt.reward_model.RewardModel] reads it at the last non-pad token of the sequence
\(x \oplus y\), \(r(x, y) = w^\top h_{\text{last}} + c\) (Ouyang et al. 2022, arXiv 2203.02155, §3.5).

The head's dtype is float32, or float64 for a float64 backbone (`torch.promote_types(backbone dtype,
float32)`): hidden states of a bfloat16 model are cast up before the head, so the value or reward is never
rounded to bfloat16.

The helpers here are the one copy of each piece the two models share:
[`config_hidden_size`][prefopt.value_head.config_hidden_size] (the width \(d\)),
[`last_token_index`][prefopt.value_head.last_token_index] (the last non-pad position of each row) and
[`final_hidden_states`][prefopt.value_head.final_hidden_states] (one backbone forward, LM head skipped).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from prefopt.logprobs import position_kwargs
from prefopt.rl import last_valid_index

__all__ = ["ValueHead", "config_hidden_size", "final_hidden_states", "last_token_index"]


def config_hidden_size(config: Any, *, why: str = "a value or reward head") -> int:
    """The width of a transformers model's final hidden state.

    Args:
        config: a transformers `PretrainedConfig` (or anything with one of the attributes below).
        why: what needs the width, for the error message.

    Returns:
        `config.hidden_size`, else `config.n_embd` (GPT-2), else `config.d_model`.

    Raises:
        ValueError: none of the three is an int.
    """
    for key in ("hidden_size", "n_embd", "d_model"):
        value = getattr(config, key, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    raise ValueError(f"{why} needs model.config.hidden_size (or n_embd / d_model)")


def last_token_index(attention_mask: Tensor) -> Tensor:
    """The index of the last non-pad position (`attention_mask != 0`) of each row.

    Works for left and right padding.

    Args:
        attention_mask: `(b, t)` integer or bool mask.

    Returns:
        `(b,)` long tensor.

    Raises:
        ValueError: a row of padding only, or a mask that is not 2-D (the message names `attention_mask`).
        TypeError: a non-tensor or a float mask.
    """
    if not isinstance(attention_mask, Tensor):
        raise TypeError(f"attention_mask must be a torch.Tensor, got {type(attention_mask).__name__}")
    if attention_mask.ndim != 2:
        raise ValueError(f"attention_mask must be 2-D (b, t), got shape {tuple(attention_mask.shape)}")
    if torch.is_floating_point(attention_mask) or attention_mask.is_complex():
        raise TypeError(f"attention_mask must be an integer or bool tensor, got dtype {attention_mask.dtype}")
    return last_valid_index(attention_mask != 0, name="attention_mask")


def final_hidden_states(model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None) -> Tensor:
    """The final hidden states `(b, t, d)` (after the last norm) of a causal LM or of its backbone.

    A causal LM with a separate backbone (`model.base_model is not model`, e.g. `LlamaForCausalLM.model`)
    runs the backbone only, so no logits are computed; a backbone itself (no output embeddings) is run
    as is; any other model is run with `output_hidden_states=True` and its last hidden state is taken.
    Position ids come from the mask ([`position_kwargs`][prefopt.logprobs.position_kwargs]), so left-padded
    rows see their natural positions.

    Args:
        model: a transformers causal LM or backbone (a peft-wrapped model's `get_base_model()` works).
        input_ids: `(b, t)` token ids.
        attention_mask: `(b, t)` mask or `None` (every token attended).

    Returns:
        `(b, t, d)` in the model's dtype, with grad if grad is enabled.
    """
    backbone = getattr(model, "base_model", model)
    if not isinstance(backbone, nn.Module):
        backbone = model
    get_out = getattr(model, "get_output_embeddings", None)
    is_backbone = backbone is model and callable(get_out) and get_out() is None
    if backbone is not model or is_backbone:
        pos = position_kwargs(backbone, attention_mask)
        out = backbone(input_ids=input_ids, attention_mask=attention_mask, **pos)
        hidden: Tensor = out.last_hidden_state
        return hidden
    pos = position_kwargs(model, attention_mask)
    out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, **pos)
    last: Tensor = out.hidden_states[-1]
    return last


class ValueHead(nn.Linear):
    r"""`nn.Linear(hidden_size, 1)` read as a scalar: \(v = w^\top h + c\) on final hidden states.

    Being an `nn.Linear`, its parameters are `weight (1, d)` and `bias (1,)` (checkpoints keep those names).
    Calling it casts the hidden states to the head's dtype and drops the trailing unit dimension.

    Args:
        hidden_size: the width \(d\) of the hidden states.
        dtype: a floating dtype; float32 unless the backbone is float64 (see
            [`ValueHead.for_model`][prefopt.value_head.ValueHead.for_model]).
        device: where the parameters live.
        zero_bias: start with \(c = 0\) (reward models) instead of `nn.Linear`'s uniform initialization.
    """

    def __init__(
        self,
        hidden_size: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        zero_bias: bool = False,
    ) -> None:
        if isinstance(hidden_size, bool) or not isinstance(hidden_size, int) or hidden_size < 1:
            raise ValueError(f"hidden_size must be a positive int, got {hidden_size!r}")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
        super().__init__(hidden_size, 1, device=device, dtype=dtype)
        if zero_bias:
            with torch.no_grad():
                self.bias.zero_()

    @classmethod
    def for_model(
        cls, model: nn.Module, *, why: str = "a value or reward head", zero_bias: bool = False
    ) -> ValueHead:
        """A head sized for `model` (width from `model.config`), on its device, in float32 — float64 for a
        float64 model (`torch.promote_types(parameter dtype, float32)`).

        Args:
            model: a transformers model (its `config` gives the width; its first parameter the dtype and device).
            why: what needs the head, for the error message of a config without a hidden size.
            zero_bias: start with bias 0.

        Returns:
            a new trainable `ValueHead`.
        """
        hidden = config_hidden_size(getattr(model, "config", None), why=why)
        ref = next(model.parameters())
        dtype = torch.promote_types(ref.dtype, torch.float32)
        return cls(hidden, dtype=dtype, device=ref.device, zero_bias=zero_bias)

    def forward(self, hidden: Tensor) -> Tensor:
        """Values \\(w^\\top h + c\\) at every position.

        Args:
            hidden: `(..., d)` hidden states (any floating dtype; cast to the head's).

        Returns:
            `(...)` in the head's dtype.
        """
        return super().forward(hidden.to(self.weight.dtype)).squeeze(-1)

    def at_last_token(self, hidden: Tensor, attention_mask: Tensor) -> Tensor:
        """The head at each row's last non-pad token (a reward model's score).

        Args:
            hidden: `(b, t, d)` final hidden states.
            attention_mask: `(b, t)` mask of the same rows (left or right padding).

        Returns:
            `(b,)` in the head's dtype: `self(hidden[i, last_token_index(attention_mask)[i]])`.
        """
        last = last_token_index(attention_mask)
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        return self(hidden[rows, last.to(hidden.device)])
