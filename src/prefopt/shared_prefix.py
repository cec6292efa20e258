r"""Shared-prompt forward: each prompt runs once for all of its completions, exactly.

In a preference batch the chosen and the rejected sequence of a pair start with the same prompt, and HH-RLHF
prompts are often longer than the answers. The duplicated layout of
[`prefopt.data.PreferenceCollator`][prefopt.data.collate.PreferenceCollator] (``2B`` rows
``prompt ++ completion``) runs every prompt twice. Here every prompt ``x_i`` is run once for its ``k``
completions (``k = 2`` for pairs: chosen rows ``0..B-1``, rejected rows ``B..2B-1``) and the result is the
same function of the parameters (completion row \(r\), completion token \(j\)):

$$
\ell_{r,j} = \log p\big(c_{r,j} \mid x_{r \bmod B},\, c_{r,<j}\big)
$$

The first completion token (``j = 0``) is predicted from the hidden state of the prompt's LAST real token; token
``j ≥ 1`` from the completion's own position ``j − 1``. Log-probs go through
[`prefopt.logprobs.chunked_head_logps`][prefopt.logprobs.chunked_head_logps] (the model's logit scaling,
soft-capping and a temperature are honoured), so no ``(rows, tokens, V)`` logits are kept. Two methods:

* ``"packed"`` (default): ONE row per prompt, ``x_i ++ c_i ++ c_{B+i} ++ …`` (real tokens only, right-padded
  to the longest row), position ids restarting at ``len(x_i)`` for each completion, and a 4-D additive
  attention mask under which a token sees the prompt and the earlier tokens of its own completion only. Token
  slots = real tokens + one padding run per row, so it never costs more slots than the duplicated layout.
* ``"cache"``: the ``B`` prompts once with ``use_cache=True``, the key/value tensors repeated ``k`` times, the
  ``kB`` completion rows on that cache (mask ``[prompt_mask ; completion_mask]``, ``position_ids = len(x_i) +
  j``). Gradients reach the prompt forward through the cached tensors. Prompts are padded to the longest prompt
  and completions to the longest completion, so with uneven lengths (HH-RLHF) it can cost MORE token slots than
  the duplicated layout (first 4 helpful-base pairs: 2,136 slots vs 1,776 duplicated vs 1,020 packed, for 979 real tokens).

In both, inputs are RIGHT-padded and no query row is ever fully masked (no NaNs from padding).

Exactness (``tests/test_shared_prefix.py``, tiny Llama / Qwen2 / Mistral / Gemma / GPT-2 / GPT-NeoX, LoRA
included, uneven prompts): float32 per-token log-probs and LoRA gradients within 1e-5 of
[`prefopt.logprobs.token_logps`][prefopt.logprobs.token_logps] on the duplicated batch; float64 log-probs
within 1e-10 of the naive full-logits oracle; float64 gradients within 1e-12 (relative) for GPT-2 / GPT-NeoX
and ~3e-8 for the RMSNorm models, whose transformers implementation normalizes in float32 even in a float64
model, so gradients merging in a different order (the prompt's, summed through the repeated cache instead of
over duplicated rows) round differently there.

Limits (checked, with a clear error): only model types in `SUPPORTED_MODEL_TYPES` (each tested); a model
with a sliding attention window shorter than ``prompt length + completion length`` is refused ("cache" applies
the window to cache indices, which the padding hole shifts; the custom mask of "packed" bypasses the window).
Nothing here is from a paper: causal attention restricted to (prompt, own completion) is the same computation
as the duplicated forward; used for the sequence log-likelihoods of DPO
(Rafailov et al. 2023, arXiv 2305.18290, Eq. 7).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from prefopt.logprobs import (
    DEFAULT_CHUNK_SIZE,
    backbone_and_head,
    check_token_ids,
    head_stats,
    logit_transform,
)
from prefopt.masked import seq_len, seq_sum
from prefopt.types import PairLogps, SharedPromptBatch, check_mask, check_tensor

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "shared_prompt_pair_logps",
    "shared_prompt_rollout_logps",
    "shared_prompt_token_logps",
    "unsplit_shared_prompt",
]

#: Model types whose shared-prompt forward is tested exact against the duplicated forward.
SUPPORTED_MODEL_TYPES: frozenset[str] = frozenset({"llama", "mistral", "qwen2", "gemma", "gpt2", "gpt_neox"})


# --------------------------------------------------------------------------------------------------------------
# Layout conversion
# --------------------------------------------------------------------------------------------------------------


def _is_right_padded(mask: Tensor) -> Tensor:
    """Per row: True if the 0/1 mask is ones then zeros (no 1 after a 0)."""
    m = mask.long()
    return (
        (m[:, 1:] <= m[:, :-1]).all(dim=1) if m.shape[1] > 1 else torch.ones_like(m[:, 0], dtype=torch.bool)
    )


def unsplit_shared_prompt(shared: SharedPromptBatch | Mapping[str, Tensor], values: Tensor) -> Tensor:
    """Place ``(kB, C)`` completion-coordinate values into the duplicated ``(kB, P + C)`` layout.

    Row ``r``'s value at completion column ``j`` goes to column ``prompt_len[r mod B] + j``; everything else is 0.
    This is the inverse of the column shift done by [`split_shared_prompt`][prefopt.data.collate.split_shared_prompt]
    (used to compare with [`token_logps`][prefopt.logprobs.token_logps] on the duplicated batch).
    """
    plen = (shared.prompt_len if isinstance(shared, SharedPromptBatch) else shared["prompt_len"]).long()
    n, c = values.shape
    b = plen.shape[0]
    if n % b:
        raise ValueError(f"values has {n} rows, not a multiple of the {b} prompts")
    p = int(plen.max())
    shift = plen.repeat(n // b)
    out = values.new_zeros(n, p + c)
    cols = shift[:, None] + torch.arange(c, device=values.device)[None]
    return out.scatter(1, cols, values)


# --------------------------------------------------------------------------------------------------------------
# The forward
# --------------------------------------------------------------------------------------------------------------


def _check_ids(name: str, x: Any, ndim: int = 2) -> Tensor:
    check_tensor(name, x, ndim=ndim, floating=False)
    if x.dtype == torch.bool or torch.is_floating_point(x) or torch.is_complex(x):
        raise TypeError(f"{name} must be an integer tensor, got dtype {x.dtype}")
    return x


def _check_mask01(name: str, x: Any, shape: torch.Size) -> Tensor:
    check_tensor(name, x, ndim=2, floating=False)
    if torch.is_complex(x):
        raise TypeError(f"{name} must be an integer or bool 0/1 tensor, got dtype {x.dtype}")
    if x.shape != shape:
        raise ValueError(f"{name} has shape {tuple(x.shape)} but expected {tuple(shape)}")
    if x.dtype != torch.bool and bool(((x != 0) & (x != 1)).any()):
        raise ValueError(f"{name} must hold only 0 and 1")
    if not bool(_is_right_padded(x).all()):
        raise ValueError(f"{name} must be right-padded (ones then zeros in every row)")
    return x.long()


def _sliding_window(config: Any) -> int | None:
    window = getattr(config, "sliding_window", None)
    if window is None:
        return None
    if getattr(config, "use_sliding_window", True) is False:  # Qwen2 keeps the attribute but turns it off
        return None
    return int(window)


def _pred_hidden_cache(
    backbone: nn.Module, prompt_ids: Tensor, pm: Tensor, completion_ids: Tensor, cam: Tensor, k: int
) -> Tensor:
    """``(kB, C, d)`` hidden states predicting each completion token: prompt once with ``use_cache=True``, then
    the completion rows on the prompt's key/value cache repeated ``k`` times."""
    b, p = prompt_ids.shape
    c = completion_ids.shape[1]
    dev = prompt_ids.device
    plen = pm.sum(1)  # (B,)
    out_p = backbone(
        input_ids=prompt_ids,
        attention_mask=pm,
        position_ids=torch.arange(p, device=dev)[None].expand(b, p),
        use_cache=True,
    )
    cache = out_p.past_key_values
    if cache is None:
        raise ValueError(
            f"{type(backbone).__name__} returned no key/value cache; cannot share the prompt forward"
        )
    from transformers.cache_utils import DynamicCache

    repeated = DynamicCache(
        ddp_cache_data=[(kk.repeat(k, 1, 1, 1), vv.repeat(k, 1, 1, 1)) for kk, vv, *_ in cache]
    )
    out_c = backbone(
        input_ids=completion_ids,
        attention_mask=torch.cat([pm.repeat(k, 1), cam], dim=1),
        position_ids=plen.repeat(k)[:, None] + torch.arange(c, device=dev)[None],
        past_key_values=repeated,
        use_cache=True,
    )
    h_last = out_p.last_hidden_state[torch.arange(b, device=dev), plen - 1]  # (B, d): predicts token 0
    # token j = 0 is predicted by the prompt's last position, token j >= 1 by completion position j - 1
    return torch.cat([h_last.repeat(k, 1)[:, None], out_c.last_hidden_state[:, :-1]], dim=1)


def _pred_hidden_packed(
    backbone: nn.Module, prompt_ids: Tensor, pm: Tensor, completion_ids: Tensor, cam: Tensor, k: int
) -> Tensor:
    """``(kB, C, d)`` hidden states predicting each completion token, from ONE packed row per prompt.

    Row ``i`` is ``prompt_i ++ c_i ++ c_{B+i} ++ … ++ c_{(k-1)B+i}`` (real tokens only, right-padded to the
    longest row), position ids restart at ``len(prompt_i)`` for every completion, and a 4-D additive mask lets
    a token see the prompt and the earlier tokens of its OWN completion only (causal within segments). Padding
    slots see only themselves, so no query row is fully masked.
    """
    b = prompt_ids.shape[0]
    n, c = completion_ids.shape
    dev = prompt_ids.device
    plen = pm.sum(1).tolist()
    clen = cam.sum(1).tolist()
    total = max(plen[i] + sum(clen[j * b + i] for j in range(k)) for i in range(b))
    ids = torch.zeros(b, total, dtype=torch.long, device=dev)
    pos = torch.zeros(b, total, dtype=torch.long, device=dev)
    seg = torch.full((b, total), -1, dtype=torch.long, device=dev)  # 0 prompt, j + 1 completion j, -1 pad
    src = torch.zeros(n, c, dtype=torch.long, device=dev)  # packed column of the state predicting token j
    for i in range(b):
        p_i = plen[i]
        ids[i, :p_i] = prompt_ids[i, :p_i]
        pos[i, :p_i] = torch.arange(p_i, device=dev)
        seg[i, :p_i] = 0
        col = p_i
        for j in range(k):
            r = j * b + i
            m = clen[r]
            ids[i, col : col + m] = completion_ids[r, :m]
            pos[i, col : col + m] = p_i + torch.arange(m, device=dev)
            seg[i, col : col + m] = j + 1
            src[r, 0] = p_i - 1
            src[r, 1:] = (col + torch.arange(c - 1, device=dev)).clamp(max=total - 1)
            col += m
    q = torch.arange(total, device=dev)
    causal = q[:, None] >= q[None, :]  # (L, L): query row, key column
    key_seg, query_seg = seg[:, None, :], seg[:, :, None]
    allowed = causal[None] & (key_seg >= 0) & ((key_seg == 0) | (key_seg == query_seg))
    allowed = allowed | torch.eye(total, dtype=torch.bool, device=dev)[None]
    dtype = next((p.dtype for p in backbone.parameters() if p.is_floating_point()), torch.float32)
    mask = torch.zeros(b, 1, total, total, dtype=dtype, device=dev)
    mask.masked_fill_(~allowed[:, None], torch.finfo(dtype).min)
    out = backbone(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False)
    hidden = out.last_hidden_state  # (B, L, d)
    pair = torch.arange(n, device=dev) % b
    return hidden[pair[:, None], src]


def shared_prompt_token_logps(
    model: Any,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    completion_ids: Tensor,
    completion_mask: Tensor,
    *,
    completion_attention_mask: Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    temperature: float = 1.0,
    method: str = "packed",
) -> Tensor:
    """Per-token completion log-probs with each prompt run once: ``ℓ[r, j] = log p(c[r,j] | x_{r mod B}, c[r,<j])``.

    Args:
        model: a transformers causal LM of a type in `SUPPORTED_MODEL_TYPES`, or a peft model wrapping one.
        prompt_ids: ``(B, P)`` integer ids, right-padded.
        prompt_mask: ``(B, P)`` 0/1 (int or bool), ones then zeros, at least one real token per row.
        completion_ids: ``(kB, C)`` integer ids, right-padded; row ``r`` continues prompt ``r mod B``
            (pairs: ``k = 2``, rows ``0..B-1`` chosen, ``B..2B-1`` rejected).
        completion_mask: ``(kB, C)`` bool, True where a completion token counts (must be a real token).
        completion_attention_mask: ``(kB, C)`` 0/1, the real completion tokens (default: ``completion_mask``,
            which must then be right-padded).
        chunk_size: completion tokens per LM-head chunk (default `prefopt.logprobs.DEFAULT_CHUNK_SIZE`).
        temperature: ``τ > 0`` dividing the final logits (default 1).
        method: ``"packed"`` (default): one row per prompt, ``prompt ++ c_1 ++ … ++ c_k``, with a 4-D mask that
            hides the other completions and position ids restarting after the prompt — the fewest token slots
            (no padding between prompt and completion); ``"cache"``: the prompt once with ``use_cache=True``,
            then the ``kB`` completion rows on its key/value cache repeated ``k`` times. Both are exact.

    Returns:
        ``(kB, C)`` log-probs, 0 where ``completion_mask`` is False: float32, or float64 for a float64 model
        (as [`prefopt.logprobs.token_logps`][prefopt.logprobs.token_logps]). Differentiable w.r.t. every
        parameter that the prompt or the completion forward uses.

    Raises:
        TypeError: a wrong type or dtype, naming the argument.
        ValueError: bad shapes, padding or ids (naming the argument), an unsupported model type, or a sliding
            attention window shorter than ``P + C``.
    """
    prompt_ids = _check_ids("prompt_ids", prompt_ids)
    completion_ids = _check_ids("completion_ids", completion_ids)
    b, p = prompt_ids.shape
    n, c = completion_ids.shape
    if b == 0 or p == 0:
        raise ValueError(f"prompt_ids must have at least one row and one column, got shape {(b, p)}")
    if n == 0 or n % b:
        raise ValueError(
            f"completion_ids has {n} rows, which is not a positive multiple of the {b} prompt rows "
            "(row r continues prompt r mod B)"
        )
    if c == 0:
        raise ValueError(f"completion_ids must have at least one column, got shape {(n, c)}")
    pm = _check_mask01("prompt_mask", prompt_mask, prompt_ids.shape)
    if bool((pm[:, 0] == 0).any()):
        raise ValueError("prompt_mask has a row with no real token (every prompt needs at least one)")
    check_tensor("completion_mask", completion_mask, ndim=2, floating=False)
    check_mask("completion_mask", completion_mask, tuple(completion_ids.shape), "completion_ids")
    if completion_attention_mask is None:
        cam = _check_mask01("completion_mask", completion_mask, completion_ids.shape)
    else:
        cam = _check_mask01("completion_attention_mask", completion_attention_mask, completion_ids.shape)
        if bool((completion_mask & (cam == 0)).any()):
            raise ValueError("completion_mask is True where completion_attention_mask is 0 (a padding token)")

    backbone, head, config = backbone_and_head(model)
    model_type = str(getattr(config, "model_type", ""))
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"shared_prompt_token_logps does not support model_type={model_type!r} (tested: "
            f"{sorted(SUPPORTED_MODEL_TYPES)}); use prefopt.logprobs.token_logps on the duplicated batch"
        )
    window = _sliding_window(config)
    if window is not None and p + c > window:
        raise ValueError(
            f"the model's sliding attention window ({window}) is shorter than prompt_ids.shape[1] + "
            f"completion_ids.shape[1] = {p + c}; the shared-prompt forward would not be exact"
        )
    if method not in ("packed", "cache"):
        raise ValueError(f"method must be 'packed' or 'cache', got {method!r}")
    tr = logit_transform(config)
    check_token_ids(head, prompt_ids=prompt_ids, completion_ids=completion_ids)

    k = n // b
    if method == "packed":
        pred = _pred_hidden_packed(backbone, prompt_ids, pm, completion_ids, cam, k)
    else:
        pred = _pred_hidden_cache(backbone, prompt_ids, pm, completion_ids, cam, k)
    idx = completion_mask.reshape(-1).nonzero().squeeze(1)
    h_sel = pred.reshape(-1, pred.shape[-1]).index_select(0, idx)
    y_sel = completion_ids.reshape(-1).index_select(0, idx).long()
    lp = head_stats(
        head, h_sel, y_sel, transform=tr, temperature=temperature, chunk_size=chunk_size, validate=False
    ).logp
    if lp.dtype != torch.float64:
        lp = lp.float()
    dense = lp.new_zeros(n * c).index_put((idx,), lp)
    return dense.view(n, c)


def shared_prompt_pair_logps(
    model: Any,
    batch: SharedPromptBatch | Mapping[str, Tensor],
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    temperature: float = 1.0,
    method: str = "packed",
) -> PairLogps:
    """Chosen / rejected sequence log-probs of a shared-prompt batch (each prompt run once).

    ``batch`` is a [`SharedPromptBatch`][prefopt.types.SharedPromptBatch] (from
    [`SharedPromptCollator`][prefopt.data.collate.SharedPromptCollator] or
    [`split_shared_prompt`][prefopt.data.collate.split_shared_prompt]), or a dict with its keys ``prompt_ids`` /
    ``prompt_mask`` ``(B, P)``, ``completion_ids`` / ``completion_mask`` (and optionally
    ``completion_attention_mask``) ``(2B, C)``, chosen rows first. Same result as
    [`pair_seq_logps`][prefopt.logprobs.pair_seq_logps] on the duplicated batch, up to float rounding.
    [`pair_logps`][prefopt.logprobs.pair_logps] adds the reference log-probs.

    Returns:
        [`PairLogps`][prefopt.types.PairLogps] with ``chosen``/``rejected`` ``= S(y)`` (float32 ``(B,)``, float64
        for a float64 model) and ``chosen_len``/``rejected_len`` ``= |y|`` (int64).
    """
    if isinstance(batch, SharedPromptBatch):
        prompt_ids, prompt_mask = batch.prompt_ids, batch.prompt_mask
        completion_ids, mask = batch.completion_ids, batch.completion_mask
        cam: Tensor | None = batch.completion_attention_mask
    elif isinstance(batch, Mapping):
        for key in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask"):
            if key not in batch:
                raise KeyError(f"batch is missing {key!r} (has {sorted(batch)})")
        prompt_ids, prompt_mask = batch["prompt_ids"], batch["prompt_mask"]
        completion_ids, mask = batch["completion_ids"], batch["completion_mask"]
        cam = batch.get("completion_attention_mask")
    else:
        raise TypeError(
            f"batch must be a SharedPromptBatch (or a dict of tensors), got {type(batch).__name__}"
        )
    b = prompt_ids.shape[0]
    if completion_ids.shape[0] != 2 * b:
        raise ValueError(
            f"batch.completion_ids must have 2 × {b} rows (chosen then rejected), got {completion_ids.shape[0]}"
        )
    logp = shared_prompt_token_logps(
        model,
        prompt_ids,
        prompt_mask,
        completion_ids,
        mask,
        completion_attention_mask=cam,
        chunk_size=chunk_size,
        temperature=temperature,
        method=method,
    )
    s = seq_sum(logp, mask)
    n = seq_len(mask)
    return PairLogps(chosen=s[:b], rejected=s[b:], chosen_len=n[:b], rejected_len=n[b:])


def shared_prompt_rollout_logps(
    model: Any,
    rollout: Any,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    temperature: float = 1.0,
    method: str = "packed",
) -> Tensor:
    """Per-token log-probs of a [`Rollout`][prefopt.sampling.Rollout] with each prompt run once for its ``n``
    completions (the ``G`` completions of a GRPO group), in the rollout's own layout.

    The same values as ``token_logps(model, rollout.input_ids, rollout.attention_mask,
    rollout.completion_mask, temperature=...)`` — ``(b, T)``, 0 outside the completion mask — from
    [`shared_prompt_token_logps`][prefopt.shared_prefix.shared_prompt_token_logps]: the rollout's prompt-major
    rows (``k·n + j``: sample ``j`` of prompt ``k``) are split at ``prompt_len`` into ``B`` right-padded
    prompts and ``nB`` completion rows (row ``j·B + k``), and the result is put back. Worth it when prompts
    are long against completions.

    Args:
        model: as in [`shared_prompt_token_logps`][prefopt.shared_prefix.shared_prompt_token_logps] (a
            ``LoraPolicy``'s ``.model``, or a plain model).
        rollout: a ``Rollout`` (right-padded rows ``[prompt, completion, pad]``; the ``n`` rows of a prompt
            share its tokens).
        chunk_size: completion tokens per LM-head chunk.
        temperature: ``τ > 0`` dividing the final logits.
        method: ``"packed"`` (default) or ``"cache"``.

    Returns:
        ``(b, T)`` log-probs, float32 (float64 for a float64 model).
    """
    ids, am, cm = rollout.input_ids, rollout.attention_mask, rollout.completion_mask
    n = int(rollout.num_samples)
    b, t = ids.shape
    if n < 1 or b % n:
        raise ValueError(f"rollout has {b} rows, not a multiple of num_samples = {n}")
    n_prompts = b // n
    plen = rollout.prompt_len.long()
    first = torch.arange(n_prompts, device=ids.device) * n  # one row per prompt
    p_len = plen[first]
    p_max = int(p_len.max())
    cols = torch.arange(p_max, device=ids.device)
    p_mask = cols[None, :] < p_len[:, None]
    zero = torch.zeros((), dtype=ids.dtype, device=ids.device)
    prompt_ids = torch.where(p_mask, ids[first][:, :p_max], zero)
    # the completion part of every row, shifted left by its prompt length, rows reordered to j·B + k
    c_len = (am.long().sum(1) - plen).clamp(min=0)
    c_cols = torch.arange(max(int(c_len.max()), 1), device=ids.device)
    src = (plen[:, None] + c_cols[None, :]).clamp(max=t - 1)
    inside = c_cols[None, :] < c_len[:, None]
    order = (first[None, :] + torch.arange(n, device=ids.device)[:, None]).reshape(
        -1
    )  # row j·B + k ← k·n + j
    lp = shared_prompt_token_logps(
        model,
        prompt_ids,
        p_mask.long(),
        torch.where(inside, ids.gather(1, src), zero)[order],
        (cm.gather(1, src) & inside)[order],
        completion_attention_mask=inside[order].long(),
        chunk_size=chunk_size,
        temperature=temperature,
        method=method,
    )
    back = torch.empty_like(order)
    back[order] = torch.arange(order.numel(), device=ids.device)
    vals = torch.where(inside, lp[back], lp.new_zeros(()))
    return lp.new_zeros(b, t).scatter_add(1, src, vals)
