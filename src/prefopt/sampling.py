r"""Rollouts for online RL: sample completions from the policy and score them (behaviour and reference log-probs).

The flow of one rollout (PE-RLHF, Sidahmed et al. 2024, arXiv 2403.10704, §3: policy, reference and value on
one LoRA backbone):

    prompts (LEFT-padded, prefopt.data.PromptCollator)
       └─► generate (HF ``generate``: KV cache, temperature, top-p / top-k, max_new_tokens, EOS)
             └─► pack_rollout: cut each completion after its first EOS (the EOS itself counts), re-pack every
                   row as ``[prompt, completion, pad…]`` (RIGHT padding), bool completion_mask
                   └─► score_rollout: behaviour log-probs ``token_logps(policy, …, temperature=τ)`` and
                         reference log-probs under ``policy.reference()`` (adapters off, same backbone)

Why re-pack to the right: after re-packing every row starts at position 0, so positions are the natural ones
for every architecture (absolute position embeddings included) and the same tensors can be fed to
``token_logps``, ``LoraPolicy.values`` and a reward model without any left-padding bookkeeping.

Behaviour log-probs are **recomputed** with [`token_logps`][prefopt.logprobs.token_logps] at the sampling
temperature — the same function the training step uses, so at the first update ``logp == old_logp`` and the
PPO/GRPO ratio is exactly 1. They are the log-probs of the temperature-scaled distribution
``softmax(z/τ)``, *not* of the top-p/top-k truncated one (as TRL and vLLM report them); with ``top_p < 1``
the sampled tokens come from a slightly different distribution than ``old_logp`` describes, the usual
(small) off-policyness of nucleus sampling. The test suite checks the recomputation against the logits
``generate`` returns.

**Plugging in another engine** (vLLM, SGLang, a server): anything with a method
``generate(prompts, n=1) -> Rollout`` satisfies [`Sampler`][prefopt.sampling.Sampler]. The easy way to write one: produce token ids
with the engine, then call [`pack_rollout`][prefopt.sampling.pack_rollout] (EOS cut, masks, layout) and [`score_rollout`][prefopt.sampling.score_rollout]
(log-probs recomputed by the training model, so that the ratio starts at 1 even if the engine's numerics
differ); the engine's weights must be synced from the policy after each update (e.g. merge the LoRA
adapter and load it into the engine — ``LoraPolicy.merged_model()``, or vLLM's LoRA support):

    class VLLMSampler:                       # sketch; vLLM is not a dependency of prefopt
        def __init__(self, llm, policy, *, eos_token_id, pad_token_id, max_new_tokens=64, temperature=1.0):
            ...
        def generate(self, prompts, n=1):
            ids = [row[m.bool()].tolist() for row, m in zip(prompts.input_ids, prompts.attention_mask)]
            outs = self.llm.generate(prompt_token_ids=ids, sampling_params=SamplingParams(n=n, ...))
            completions = [list(c.token_ids) for o in outs for c in o.outputs]
            prompt_ids = [p for p in ids for _ in range(n)]
            r = pack_rollout(prompt_ids, completions, eos_token_id=..., pad_token_id=..., num_samples=n)
            return score_rollout(r, self.policy, temperature=self.temperature)
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import numbers
import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from prefopt.bon import check_n
from prefopt.logprobs import token_logps
from prefopt.policy import eval_mode, is_lora_policy
from prefopt.shared_prefix import shared_prompt_rollout_logps
from prefopt.types import PromptBatch

__all__ = [
    "BestOfN",
    "HFSampler",
    "Rollout",
    "Sampler",
    "best_of_n",
    "completion_mask_after_eos",
    "pack_rollout",
    "prompt_tensors",
    "score_rollout",
]


# ----------------------------------------------------------------------------------------------------------
# the rollout
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rollout:
    """A batch of ``b = prompts · num_samples`` sampled sequences, RIGHT-padded: row ``i`` is
    ``[prompt_i, completion_i, pad…]``; rows ``k·n … k·n + n − 1`` are the ``n`` samples of prompt ``k``.

    Attributes:
        input_ids: ``(b, T)`` long, prompt + completion tokens, then ``pad_token_id``.
        attention_mask: ``(b, T)`` long, 1 on prompt and completion tokens.
        completion_mask: ``(b, T)`` bool, True on the completion tokens up to and including the first EOS
            (``completion_mask[:, i]`` refers to ``input_ids[:, i]``; never True at position 0).
        prompt_len: ``(b,)`` long, prompt tokens per row (the completion starts at column ``prompt_len``).
        completion_len: ``(b,)`` long, ``completion_mask.sum(1)`` (≥ 1).
        finished: ``(b,)`` bool, True where the completion ended with an EOS (False: cut at
            ``max_new_tokens``, a truncated answer; RLHF recipes often penalize it).
        prompt_index: ``(b,)`` long, which prompt of the input batch each row belongs to (``i // n``).
        num_samples: ``n``, completions per prompt.
        logp: ``(b, T)`` float32 behaviour log-probs ``log π_old(y_t | ·)`` at the sampling temperature, 0
            outside ``completion_mask``; None until [`score_rollout`][prefopt.sampling.score_rollout].
        ref_logp: ``(b, T)`` float32 reference log-probs (temperature 1), same layout; None if not computed.
        sampler_logp: ``(b, T)`` float32 log-probs of the sampled tokens as the *sampling engine* reported
            them (e.g. vLLM's, see ``prefopt.vllm_sampler``), same layout, 0 outside ``completion_mask``; the
            behaviour log-probs for rollout correction when the engine's numerics differ from ``logp``'s.
            None when the sampler does not report them (``HFSampler``: its ``logp`` is already the
            training model's own).
    """

    input_ids: Tensor
    attention_mask: Tensor
    completion_mask: Tensor
    prompt_len: Tensor
    completion_len: Tensor
    finished: Tensor
    prompt_index: Tensor
    num_samples: int
    logp: Tensor | None = None
    ref_logp: Tensor | None = None
    sampler_logp: Tensor | None = None

    @property
    def batch_size(self) -> int:
        """``b``, the number of sequences (prompts × num_samples)."""
        return int(self.input_ids.shape[0])

    @property
    def num_prompts(self) -> int:
        """Number of prompts (``b / num_samples``)."""
        return self.batch_size // self.num_samples

    def completion_ids(self) -> list[list[int]]:
        """The counted completion tokens of each row (EOS included when present)."""
        return [row[m].tolist() for row, m in zip(self.input_ids, self.completion_mask)]

    def prompt_ids(self) -> list[list[int]]:
        """The prompt tokens of each row (no padding)."""
        return [row[: int(n)].tolist() for row, n in zip(self.input_ids, self.prompt_len)]

    def completions(self, tokenizer: Any, *, skip_special_tokens: bool = True) -> list[str]:
        """Decoded completions (EOS and other special tokens dropped by default)."""
        return [
            tokenizer.decode(ids, skip_special_tokens=skip_special_tokens) for ids in self.completion_ids()
        ]

    def grouped(self, x: Tensor) -> Tensor:
        """Reshape a per-sequence ``(b,)`` tensor to ``(prompts, num_samples)`` (for RLOO / GRPO advantages)."""
        if not isinstance(x, Tensor) or x.shape[:1] != (self.batch_size,):
            raise ValueError(
                f"x must have leading dimension {self.batch_size} (one value per sequence), "
                f"got shape {tuple(getattr(x, 'shape', ()))}"
            )
        return x.reshape(self.num_prompts, self.num_samples, *x.shape[1:])

    def _map_tensors(self, fn: Callable[[Tensor], Tensor]) -> Rollout:
        """A copy with ``fn`` applied to every tensor field (``num_samples`` kept)."""
        changes: dict[str, Any] = {
            f.name: fn(getattr(self, f.name))
            for f in dataclasses.fields(self)
            if isinstance(getattr(self, f.name), Tensor)
        }
        return dataclasses.replace(self, **changes)

    def to(self, device: torch.device | str) -> Rollout:
        """A copy with every tensor moved to ``device``."""
        return self._map_tensors(lambda v: v.to(device))


@runtime_checkable
class Sampler(Protocol):
    """What the RL examples need from a rollout engine: ``generate(prompts, n) -> Rollout``.

    ``prompts`` is a LEFT-padded [`PromptBatch`][prefopt.types.PromptBatch] (``input_ids``, ``attention_mask``
    ``(B, P)`` long) as produced by ``prefopt.data.PromptCollator``; the result has ``B · n`` rows, the ``n``
    samples of prompt ``k`` in rows ``k·n … k·n + n − 1``. See the module docstring for a vLLM sketch.
    """

    def generate(self, prompts: PromptBatch | Mapping[str, Any], n: int = 1) -> Rollout: ...


# ----------------------------------------------------------------------------------------------------------
# pure helpers: EOS cut and packing
# ----------------------------------------------------------------------------------------------------------


def _eos_set(eos_token_id: int | Sequence[int] | None) -> list[int]:
    if eos_token_id is None:
        return []
    ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    for e in ids:
        if isinstance(e, bool) or not isinstance(e, int) or e < 0:
            raise ValueError(
                f"eos_token_id must be a non-negative int or a list of them, got {eos_token_id!r}"
            )
    return ids


def completion_mask_after_eos(completion_ids: Tensor, eos_token_id: int | Sequence[int] | None) -> Tensor:
    """``(b, c)`` bool mask of generated tokens that count: every token up to and including the first EOS.

    ``mask[i, j] = (no EOS among completion_ids[i, :j])``. Tokens after the first EOS (padding that
    ``generate`` writes once a row is done, or anything an engine emits past the stop) are False; the EOS
    itself is True, so the model is trained to stop. A row without EOS counts all ``c`` tokens.
    ``eos_token_id`` may be a list (any of them stops); None means no EOS (all True).
    """
    if not isinstance(completion_ids, Tensor) or completion_ids.ndim != 2:
        raise ValueError(
            f"completion_ids must be a (b, c) tensor, got {type(completion_ids).__name__} "
            f"with shape {tuple(getattr(completion_ids, 'shape', ()))}"
        )
    eos = _eos_set(eos_token_id)
    if not eos:
        return torch.ones_like(completion_ids, dtype=torch.bool)
    is_eos = torch.isin(completion_ids, torch.tensor(eos, device=completion_ids.device))
    # number of EOS strictly before position j
    before = torch.cumsum(is_eos.long(), dim=1) - is_eos.long()
    return before == 0


def pack_rollout(
    prompt_ids: Sequence[Sequence[int]],
    completion_ids: Sequence[Sequence[int]] | Tensor,
    *,
    eos_token_id: int | Sequence[int] | None,
    pad_token_id: int,
    num_samples: int = 1,
) -> Rollout:
    """Build a [`Rollout`][prefopt.sampling.Rollout] (no log-probs yet) from per-row prompt and completion tokens.

    Each completion is cut after its first EOS (kept, counted); rows are RIGHT-padded with ``pad_token_id``.
    ``prompt_ids[i]`` and ``completion_ids[i]`` belong to row ``i``; rows ``k·n … k·n + n − 1`` must be the
    ``n = num_samples`` samples of prompt ``k`` (the prompts are not checked for equality).

    Args:
        prompt_ids: ``b`` lists of prompt token ids, no padding, each non-empty.
        completion_ids: ``b`` lists of generated ids, or a ``(b, c)`` tensor (e.g. ``generate``'s new tokens,
            padded after EOS).
        eos_token_id: int, list of ints, or None (no EOS: every generated token counts).
        pad_token_id: id written into the padding (masked everywhere; may equal the EOS id).
        num_samples: ``n ≥ 1``; ``b`` must be a multiple of it.

    Raises:
        ValueError: lengths differ, an empty prompt, a completion with no token, or ``b`` not a multiple of
            ``num_samples`` (naming the argument).
    """
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
    if isinstance(pad_token_id, bool) or not isinstance(pad_token_id, int) or pad_token_id < 0:
        raise ValueError(f"pad_token_id must be a non-negative int, got {pad_token_id!r}")
    eos = _eos_set(eos_token_id)
    comp_rows = [
        list(map(int, c))
        for c in (completion_ids.tolist() if isinstance(completion_ids, Tensor) else completion_ids)
    ]
    prompt_rows = [list(map(int, p)) for p in prompt_ids]
    b = len(prompt_rows)
    if len(comp_rows) != b:
        raise ValueError(f"completion_ids has {len(comp_rows)} rows but prompt_ids has {b}")
    if b == 0:
        raise ValueError("prompt_ids is empty: nothing to pack")
    if b % num_samples:
        raise ValueError(f"the number of rows ({b}) must be a multiple of num_samples ({num_samples})")
    cut: list[list[int]] = []
    finished: list[bool] = []
    for i, (p, c) in enumerate(zip(prompt_rows, comp_rows)):
        if not p:
            raise ValueError(f"prompt_ids[{i}] is empty: a completion needs a prompt token to condition on")
        stop = next((j for j, tok in enumerate(c) if tok in eos), None)
        c = c if stop is None else c[: stop + 1]
        if not c:
            raise ValueError(
                f"completion_ids[{i}] has no token (every row needs at least one generated token)"
            )
        cut.append(c)
        finished.append(stop is not None)
    t = max(len(p) + len(c) for p, c in zip(prompt_rows, cut))
    input_ids = torch.full((b, t), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((b, t), dtype=torch.long)
    completion_mask = torch.zeros((b, t), dtype=torch.bool)
    for i, (p, c) in enumerate(zip(prompt_rows, cut)):
        lp, lc = len(p), len(c)
        input_ids[i, : lp + lc] = torch.tensor(p + c, dtype=torch.long)
        attention_mask[i, : lp + lc] = 1
        completion_mask[i, lp : lp + lc] = True
    return Rollout(
        input_ids=input_ids,
        attention_mask=attention_mask,
        completion_mask=completion_mask,
        prompt_len=torch.tensor([len(p) for p in prompt_rows], dtype=torch.long),
        completion_len=torch.tensor([len(c) for c in cut], dtype=torch.long),
        finished=torch.tensor(finished, dtype=torch.bool),
        prompt_index=torch.arange(b, dtype=torch.long) // num_samples,
        num_samples=num_samples,
    )


# ----------------------------------------------------------------------------------------------------------
# scoring
# ----------------------------------------------------------------------------------------------------------


def score_rollout(
    rollout: Rollout,
    model: Any,
    *,
    reference: Any = "auto",
    temperature: float = 1.0,
    batch_size: int | None = None,
    behaviour: bool = True,
    shared_prompt: bool = False,
) -> Rollout:
    """Fill ``logp`` (behaviour, at ``temperature``) and ``ref_logp`` (temperature 1) of a rollout, no grad.

    Args:
        rollout: from [`pack_rollout`][prefopt.sampling.pack_rollout] or a sampler.
        model: a [`LoraPolicy`][prefopt.policy.LoraPolicy] or a transformers causal LM (peft models too).
        reference: ``"auto"`` (default): ``policy.reference()`` — the same backbone with adapters off — for a
            ``LoraPolicy`` in its policy mode, none otherwise (inside ``policy.anchor()`` the contexts cannot
            nest, so scoring the anchor's samples gives ``ref_logp=None``); a model (a separate frozen
            reference copy, e.g. for full fine-tuning); or None (no reference log-probs).
        temperature: the sampling temperature ``τ`` (``log softmax(z/τ)``); the reference is scored at 1,
            the distribution the KL is taken against (as TRL does).
        batch_size: rows per forward (default: all at once).
        behaviour: compute ``logp`` (default True). False skips that forward and leaves ``logp`` None: for
            one update per rollout, where the behaviour log-probs equal the policy's own detached ones
            (pass ``old_logp=None`` to the loss; TRL skips them too when ``num_iterations = 1``).
        shared_prompt: run each prompt once for its ``num_samples`` completions
            ([`shared_prompt_rollout_logps`][prefopt.shared_prefix.shared_prompt_rollout_logps]; the same
            values up to float rounding, less work when prompts are long against completions). Default False.
            With ``batch_size`` it must be a multiple of ``rollout.num_samples`` (a group stays in one forward).

    Returns:
        a new [`Rollout`][prefopt.sampling.Rollout] with ``logp`` and ``ref_logp`` set (float32, 0 outside ``completion_mask``).
    """
    if not isinstance(behaviour, bool):
        raise TypeError(f"behaviour must be a bool, got {type(behaviour).__name__}")
    if not isinstance(shared_prompt, bool):
        raise TypeError(f"shared_prompt must be a bool, got {type(shared_prompt).__name__}")
    if not isinstance(rollout, Rollout):
        raise TypeError(f"rollout must be a Rollout, got {type(rollout).__name__}")
    if batch_size is not None and (
        isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1
    ):
        raise ValueError(f"batch_size must be a positive int or None, got {batch_size!r}")
    is_policy = is_lora_policy(model)
    lm = model.model if is_policy else model
    if isinstance(reference, str):
        if reference != "auto":
            raise ValueError(f'reference must be "auto", None or a model, got {reference!r}')
        reference = model if is_policy and getattr(model, "mode", "policy") == "policy" else None
    step = batch_size or rollout.batch_size
    if shared_prompt and step % rollout.num_samples:
        raise ValueError(
            f"shared_prompt=True needs batch_size to be a multiple of rollout.num_samples "
            f"({rollout.num_samples}), got {batch_size}"
        )

    def run(m: Any) -> Tensor:
        parts = []
        for s in range(0, rollout.batch_size, step):
            sl = slice(s, s + step)
            if shared_prompt:  # whole groups: step is a multiple of num_samples
                part = rollout._map_tensors(operator.itemgetter(sl))
                parts.append(shared_prompt_rollout_logps(m, part, temperature=tau))
                continue
            lp = token_logps(
                m,
                rollout.input_ids[sl],
                rollout.attention_mask[sl],
                rollout.completion_mask[sl],
                temperature=tau,
            )
            parts.append(lp)
        return torch.cat(parts)

    tau = temperature
    with torch.no_grad(), eval_mode(model if isinstance(model, nn.Module) else lm):
        logp = run(lm) if behaviour else None
        ref_logp = None
        tau = 1.0
        if reference is not None and reference is model and is_policy:
            with model.reference():
                ref_logp = run(lm)
        elif reference is not None:
            ref_lm = reference.model if is_lora_policy(reference) else reference
            with eval_mode(ref_lm):
                ref_logp = run(ref_lm)
    return dataclasses.replace(rollout, logp=logp, ref_logp=ref_logp)


# ----------------------------------------------------------------------------------------------------------
# the Hugging Face sampler
# ----------------------------------------------------------------------------------------------------------


def _check_number(name: str, value: Any, *, low: float, high: float, low_open: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    ok = (value > low if low_open else value >= low) and value <= high
    if not ok:
        bracket = "(" if low_open else "["
        raise ValueError(f"{name} must be in {bracket}{low}, {high}], got {value!r}")
    return float(value)


def prompt_tensors(
    prompts: Any, tokenizer: Any = None, *, sampler: str = "the sampler"
) -> tuple[Tensor, Tensor]:
    """``(input_ids, attention_mask)`` ``(B, P)`` (the mask as long) from the prompts a sampler accepts: a
    [`PromptBatch`][prefopt.types.PromptBatch], a dict ``{"input_ids", "attention_mask"}`` (mask optional:
    all ones), or a list of strings (tokenized with ``prefopt.data.PromptCollator``, which needs
    ``tokenizer``). Raises ``TypeError``/``ValueError`` naming ``prompts``; ``sampler`` names the class in the
    missing-tokenizer error."""
    if (
        isinstance(prompts, Sequence)
        and not isinstance(prompts, str)
        and prompts
        and all(isinstance(p, str) for p in prompts)
    ):
        if tokenizer is None:
            raise ValueError(f"prompts given as strings need {sampler}(..., tokenizer=...)")
        from prefopt.data import PromptCollator

        prompts = PromptCollator(tokenizer, strict=True)(list(prompts))
    if isinstance(prompts, PromptBatch):
        prompts = {"input_ids": prompts.input_ids, "attention_mask": prompts.attention_mask}
    if not isinstance(prompts, Mapping) or "input_ids" not in prompts:
        raise TypeError(
            "prompts must be a PromptBatch, a dict with 'input_ids' (and 'attention_mask'), e.g. from "
            "prefopt.data.PromptCollator, or a list of strings"
        )
    ids = prompts["input_ids"]
    if (
        not isinstance(ids, Tensor)
        or ids.ndim != 2
        or ids.dtype == torch.bool
        or torch.is_floating_point(ids)
    ):
        raise ValueError(
            f"prompts['input_ids'] must be a (B, P) integer tensor, got {getattr(ids, 'shape', ids)!r}"
        )
    mask = prompts.get("attention_mask")
    if mask is None:
        mask = torch.ones_like(ids)
    if not isinstance(mask, Tensor) or mask.shape != ids.shape:
        raise ValueError("prompts['attention_mask'] must be a tensor with the shape of input_ids")
    return ids, mask.long()


class HFSampler:
    """Batched sampling with Hugging Face ``generate`` (KV cache), then [`pack_rollout`][prefopt.sampling.pack_rollout] and
    [`score_rollout`][prefopt.sampling.score_rollout]. Satisfies [`Sampler`][prefopt.sampling.Sampler].

    Args:
        model: a [`LoraPolicy`][prefopt.policy.LoraPolicy] (sampled with the policy adapter; reference log-probs
            from ``policy.reference()``) or a transformers causal LM.
        tokenizer: optional; supplies ``eos_token_id`` / ``pad_token_id`` when they are not given, and lets
            [`generate`][prefopt.sampling.HFSampler.generate] take a list of prompt strings.
        reference: see [`score_rollout`][prefopt.sampling.score_rollout] (default ``"auto"``).
        max_new_tokens: cap on generated tokens per completion (default 64).
        temperature: ``τ > 0`` (default 1.0). Behaviour log-probs are of ``softmax(z/τ)``.
        top_p: nucleus mass in (0, 1] (default 1.0 = off). top_k: 0 = off (default; note that
            ``transformers``' own default would be 50).
        do_sample: False → greedy decoding (temperature/top-p/top-k ignored for the choice of tokens).
        eos_token_id: int or list of ints that end a completion (default: tokenizer's, else the model's
            generation config).
        pad_token_id: default: tokenizer's pad, else its EOS, else the model config's.
        batch_size: sequences per ``generate`` call (after repeating prompts ``n`` times); default all.
        progress: tqdm bar over ``generate`` calls: True, False, or None (default: shown when there are at
            least 4 calls).
        merged: sample inside [`LoraPolicy.merged`][prefopt.policy.LoraPolicy.merged] (``LoraPolicy`` in its policy mode
            only): one merged weight per adapted layer instead of base + adapter matmuls at every decode
            step — faster, one extra copy of the adapted weights during ``generate``, and samples from the
            policy up to float rounding. Behaviour and reference log-probs are computed unmerged as always,
            so the losses see exactly the trained function. Default False.
        behaviour_logps: compute the behaviour log-probs (default True); False leaves ``Rollout.logp`` None
            and saves one forward per rollout when each rollout feeds exactly one update (see
            [`score_rollout`][prefopt.sampling.score_rollout]).
        shared_prompt: score the behaviour and reference log-probs with each prompt run once for its ``n``
            completions (see [`score_rollout`][prefopt.sampling.score_rollout]; same values up to float
            rounding). Default False. With ``batch_size`` it must be a multiple of ``n``.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any = None,
        *,
        reference: Any = "auto",
        max_new_tokens: int = 64,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        do_sample: bool = True,
        eos_token_id: int | Sequence[int] | None = None,
        pad_token_id: int | None = None,
        batch_size: int | None = None,
        progress: bool | None = None,
        merged: bool = False,
        behaviour_logps: bool = True,
        shared_prompt: bool = False,
    ) -> None:
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
        self.temperature = _check_number(
            "temperature", temperature, low=0.0, high=float("inf"), low_open=True
        )
        if temperature == float("inf"):
            raise ValueError("temperature must be finite")
        self.top_p = _check_number("top_p", top_p, low=0.0, high=1.0, low_open=True)
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0 = off), got {top_k!r}")
        if not isinstance(do_sample, bool):
            raise TypeError(f"do_sample must be a bool, got {type(do_sample).__name__}")
        if batch_size is not None and (
            isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1
        ):
            raise ValueError(f"batch_size must be a positive int or None, got {batch_size!r}")
        if progress is not None and not isinstance(progress, bool):
            raise TypeError(f"progress must be a bool or None, got {type(progress).__name__}")
        if not isinstance(merged, bool):
            raise TypeError(f"merged must be a bool, got {type(merged).__name__}")
        if merged and not is_lora_policy(model):
            raise ValueError("merged=True needs a prefopt.LoraPolicy (it merges the policy adapter)")
        if not isinstance(behaviour_logps, bool):
            raise TypeError(f"behaviour_logps must be a bool, got {type(behaviour_logps).__name__}")
        if not isinstance(shared_prompt, bool):
            raise TypeError(f"shared_prompt must be a bool, got {type(shared_prompt).__name__}")
        self.behaviour_logps = behaviour_logps
        self.shared_prompt = shared_prompt
        self.merged = merged
        self.model = model
        self.tokenizer = tokenizer
        self.reference = reference
        self.max_new_tokens = max_new_tokens
        self.top_k = top_k
        self.do_sample = do_sample
        self.batch_size = batch_size
        self.progress = progress
        lm = model.model if is_lora_policy(model) else model
        gen_cfg = getattr(lm, "generation_config", None)
        if eos_token_id is None:
            eos_token_id = getattr(tokenizer, "eos_token_id", None)
        if eos_token_id is None and gen_cfg is not None:
            eos_token_id = gen_cfg.eos_token_id
        self.eos_token_id: list[int] = _eos_set(eos_token_id)
        if pad_token_id is None and tokenizer is not None:
            pad_token_id = (
                tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
            )
        if pad_token_id is None and gen_cfg is not None:
            pad_token_id = gen_cfg.pad_token_id
        if pad_token_id is None and self.eos_token_id:
            pad_token_id = self.eos_token_id[0]
        if pad_token_id is None:
            raise ValueError("pad_token_id could not be inferred; pass pad_token_id= (or a tokenizer)")
        self.pad_token_id = int(pad_token_id)

    def _generation_config(self) -> Any:
        from transformers import GenerationConfig

        kwargs: dict[str, Any] = {
            "max_new_tokens": self.max_new_tokens,
            "do_sample": self.do_sample,
            "pad_token_id": self.pad_token_id,
            "eos_token_id": self.eos_token_id or None,
            "use_cache": True,
        }
        if self.do_sample:
            kwargs.update(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
        return GenerationConfig(**kwargs)

    def _prompt_batch(self, prompts: Any) -> tuple[Tensor, Tensor]:
        ids, mask = prompt_tensors(prompts, self.tokenizer, sampler="HFSampler")
        if ids.shape[1] and bool((mask[:, -1] == 0).any()):
            raise ValueError(
                "prompts must be LEFT-padded (attention_mask[:, -1] is 0 in some row); use "
                "prefopt.data.PromptCollator"
            )
        if bool((mask.sum(1) == 0).any()):
            raise ValueError("prompts has a row with no token (attention_mask all 0)")
        return ids, mask

    def generate(self, prompts: Any, n: int = 1) -> Rollout:
        """Sample ``n`` completions per prompt and score them.

        Args:
            prompts: a LEFT-padded [`PromptBatch`][prefopt.types.PromptBatch] (PromptCollator output), a dict
                ``{"input_ids": (B, P), "attention_mask": (B, P)}``, or a list of strings (needs ``tokenizer``).
            n: completions per prompt (rows ``k·n … k·n + n − 1`` belong to prompt ``k``).

        Returns:
            a scored [`Rollout`][prefopt.sampling.Rollout] with ``B·n`` rows. Uses the global torch RNG (seed with
            ``torch.manual_seed`` for reproducible samples).
        """
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive int, got {n!r}")
        ids, mask = self._prompt_batch(prompts)
        lm = self.model.model if is_lora_policy(self.model) else self.model
        device = next(lm.parameters()).device
        ids = ids.repeat_interleave(n, dim=0).to(device)
        mask = mask.repeat_interleave(n, dim=0).to(device)
        b, p = ids.shape
        step = self.batch_size or b
        starts = list(range(0, b, step))
        show = self.progress if self.progress is not None else len(starts) >= 4
        cfg = self._generation_config()
        completions: list[list[int]] = []
        iterator: Any = starts
        if show:
            from tqdm.auto import tqdm

            iterator = tqdm(starts, desc="sampling", unit="batch")
        if self.merged and self.model.mode != "policy":
            raise RuntimeError(
                f"HFSampler(merged=True) samples the policy adapter; called inside policy.{self.model.mode}() "
                "(use merged=False there)"
            )
        merge = self.model.merged() if self.merged else contextlib.nullcontext()
        with torch.no_grad(), eval_mode(lm), merge:
            for s in iterator:
                out = lm.generate(
                    input_ids=ids[s : s + step], attention_mask=mask[s : s + step], generation_config=cfg
                )
                seqs = out if isinstance(out, Tensor) else out.sequences
                completions.extend(seqs[:, p:].cpu().tolist())
        prompt_rows = [row[m.bool()].tolist() for row, m in zip(ids.cpu(), mask.cpu())]
        rollout = pack_rollout(
            prompt_rows,
            completions,
            eos_token_id=self.eos_token_id,
            pad_token_id=self.pad_token_id,
            num_samples=n,
        ).to(device)
        return score_rollout(
            rollout,
            self.model,
            reference=self.reference,
            temperature=self.temperature,
            behaviour=self.behaviour_logps,
            shared_prompt=self.shared_prompt and n > 1,
        )

    def greedy(self, prompts: Any) -> Rollout:
        """The greedy (argmax) completion of each prompt: [`generate`][prefopt.sampling.HFSampler.generate] with ``do_sample=False`` and
        ``n = 1``, every other setting of this sampler kept (``max_new_tokens``, EOS, ``merged``, the
        reference). This is ReMax's baseline response (see [`remax_advantages`][prefopt.rl.remax_advantages]);
        the sampler itself is not changed.

        Returns:
            a scored [`Rollout`][prefopt.sampling.Rollout] with one row per prompt (behaviour log-probs at this sampler's
            temperature, as for sampled rows).
        """
        greedy = copy.copy(self)
        greedy.do_sample = False
        return greedy.generate(prompts, n=1)


# ----------------------------------------------------------------------------------------------------------
# Best-of-N
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BestOfN:
    """Result of [`best_of_n`][prefopt.sampling.best_of_n] for ``B`` prompts and ``N`` samples each.

    Attributes:
        samples: all samples, prompt-major: a tensor ``(B, N, ...)`` if the sampler returned a tensor,
            else a list of ``B`` lists of ``N`` samples.
        rewards: ``(B, N)`` rewards of every sample (reuse them as the quantile pool ``ref_rewards``).
        index: ``(B,)`` long, position of the kept sample (first occurrence among tied maxima).
        best_reward: ``(B,)`` reward of the kept sample.
        best: the kept samples, a tensor ``(B, ...)`` or a list of ``B`` samples.
    """

    samples: Any
    rewards: Tensor
    index: Tensor
    best_reward: Tensor
    best: Any


def best_of_n(
    sample_fn: Callable[[list[Any]], Any],
    reward_fn: Callable[[list[Any], Any], Any],
    prompts: Sequence[Any],
    n: int,
) -> BestOfN:
    """Draw ``n`` samples per prompt, score them and keep the best (first occurrence among tied maxima).

    Model-agnostic: ``sample_fn`` is whatever produces samples from the reference or the anchor policy
    (e.g. a wrapper of ``generate`` with ``do_sample=True``), ``reward_fn`` is a reward function or model.

    Args:
        sample_fn: called once as ``sample_fn(repeated)`` where ``repeated`` is the list of prompts, each
            repeated ``n`` times in a row (``[p0]*n + [p1]*n + ...``); it must return ``B·n`` samples in that
            order, as a list/sequence or as a tensor with leading dim ``B·n``.
        reward_fn: called once as ``reward_fn(repeated, samples)``; must return ``B·n`` real rewards
            (tensor or sequence of numbers).
        prompts: ``B >= 1`` prompts (any objects).
        n: samples per prompt, ``>= 1``.

    Returns:
        [`BestOfN`][prefopt.sampling.BestOfN].

    Raises:
        ValueError: ``n < 1``, no prompts, a sampler/reward function that returns the wrong number of
            items, or NaN rewards.
        TypeError: ``reward_fn`` returns something other than real numbers (strings, ``None``, bools,
            complex values, nested lists); the message names the first bad item's index.
    """
    check_n(n)
    prompts = list(prompts)
    if not prompts:
        raise ValueError("prompts must contain at least one prompt")
    b = len(prompts)
    repeated = [p for p in prompts for _ in range(n)]
    samples = sample_fn(repeated)
    if len(samples) != b * n:
        raise ValueError(f"sample_fn returned {len(samples)} samples, expected len(prompts)·n = {b * n}")
    raw = reward_fn(repeated, samples)
    if isinstance(raw, Tensor):
        rewards = raw
    else:
        try:
            items = list(raw)
        except TypeError:
            raise TypeError(
                f"reward_fn must return a tensor or a sequence of real numbers, got {type(raw).__name__}"
            ) from None
        wrong = [
            (i, x)
            for i, x in enumerate(items)
            if isinstance(x, bool)
            or not isinstance(x, (numbers.Real, Tensor))
            or (isinstance(x, Tensor) and (x.numel() != 1 or x.is_complex() or x.dtype == torch.bool))
        ]
        if wrong:
            i, x = wrong[0]
            raise TypeError(
                f"reward_fn must return real numbers; item {i} is {type(x).__name__} {x!r:.60} "
                f"({len(wrong)} such item(s))"
            )
        rewards = torch.as_tensor(items)
    if rewards.is_complex() or rewards.dtype == torch.bool:
        raise TypeError(f"reward_fn returned a tensor of dtype {rewards.dtype}; expected real numbers")
    if rewards.numel() != b * n:
        raise ValueError(f"reward_fn returned {rewards.numel()} rewards, expected len(prompts)·n = {b * n}")
    rewards = rewards.reshape(b, n)
    if torch.is_floating_point(rewards) and bool(torch.isnan(rewards).any()):
        raise ValueError(f"rewards (from reward_fn) has {int(torch.isnan(rewards).sum())} NaN value(s)")
    index = rewards.argmax(dim=-1)  # first occurrence of the maximum
    rows = torch.arange(b, device=rewards.device)
    best_reward = rewards[rows, index]
    if isinstance(samples, Tensor):
        grid = samples.reshape(b, n, *samples.shape[1:])
        best: Any = grid[rows.to(grid.device), index.to(grid.device)]
        all_samples: Any = grid
    else:
        flat = list(samples)
        all_samples = [flat[i * n : (i + 1) * n] for i in range(b)]
        best = [all_samples[i][int(index[i])] for i in range(b)]
    return BestOfN(samples=all_samples, rewards=rewards, index=index, best_reward=best_reward, best=best)
