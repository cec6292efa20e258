r"""Per-token log-probabilities of a causal LM with a chunked LM head, and sequence reductions.

The naive way to get per-token log-probs, ``log_softmax(model(ids).logits).gather(-1, ids[:, 1:])``, keeps a
``(rows, tokens, vocab)`` float32 tensor alive for backward (several, in fact: the logits, the log-softmax
output and their gradients). For 8 × 512 tokens and a 128k vocabulary that is 2 GB *per copy*.
[`token_logps`][prefopt.logprobs.token_logps] instead runs the model's **backbone** only, gathers the hidden
states of the positions that count (``completion_mask``), and applies the LM head chunk by chunk inside a
custom `torch.autograd.Function` that saves for backward only the hidden states and the targets (head
trainable) or one ``d``-vector per token (head frozen) — never a vocabulary-sized tensor.

For a chunk of hidden states ``h`` (``(c, d)``), head weight ``W`` (``(V, d)``), bias ``b`` and targets ``y``:

| step | what it is |
|---|---|
| \(a = h W^\top + b\) | raw head output, ``(c, V)`` |
| \(s = \kappa\, a\) | the model's logit scale \(\kappa\) (Cohere ``logit_scale``, 1/Granite ``logits_scaling``) |
| \(z = \sigma \tanh(s / \sigma)\) | soft-capping, if the model has it (Gemma-2/3 ``final_logit_softcapping`` \(\sigma\)) |
| \(z \leftarrow z / \tau\) | sampling temperature \(\tau\) |
| \(\ell = z_y - \operatorname{logsumexp}(z)\) | \(\log p(y \mid \text{prefix})\), computed in float32 (float64 for float64 models) |
| \(H = \operatorname{logsumexp}(z) - \sum_v p_v z_v\) | entropy of the predicting distribution (optional) |

Backward uses ``∂ℓ/∂z = e_y − p`` and ``∂H/∂z = −p ⊙ (log p + H)``, then the chain rule
``∂z/∂a = (κ/τ)·(1 − tanh²(s/σ))`` (``κ/τ`` without a softcap). When the head weight needs a gradient
(tied embeddings being trained, full fine-tuning) the chunk's logits are recomputed in backward. When it does
not (LoRA on the backbone, the common case here), the per-token vectors ``u = (∂ℓ/∂z ⊙ ∂z/∂a) W`` (and the
entropy analogue) are formed in the forward pass, so backward is just ``grad_h = g·u`` and no logits are ever
recomputed: the price is one ``(n, d)`` float32 buffer.

Reference for the quantity itself: the sequence log-likelihood ``log π(y|x) = Σ_t log π(y_t | x, y_<t)`` of
DPO (Rafailov et al., 2023, arXiv 2305.18290, Eq. 7 uses it through the log-ratio). The chunked head is an
engineering device (cf. "fused linear cross-entropy" in Liger-Kernel, Hsu et al., 2024, arXiv 2410.10989),
not a change of the quantity: results equal the naive path up to float rounding.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, overload

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from prefopt.masked import seq_len, seq_sum
from prefopt.types import PairBatch, PairLogps, SharedPromptBatch, check_mask, check_tensor, unpack_pair_batch

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "HeadStats",
    "LogitTransform",
    "backbone_and_head",
    "check_token_ids",
    "chunked_head_kl",
    "chunked_head_logps",
    "head_stats",
    "logit_transform",
    "pair_logps",
    "pair_seq_logps",
    "position_kwargs",
    "token_kl_to_reference",
    "token_logps",
    "token_logps_and_entropy",
    "token_stats",
]

#: Default number of completion tokens per LM-head chunk (tuned by ``benchmarks/logprobs.py``, see
#: ``docs/logprobs.md``): one chunk of a 128k-vocabulary head is ``1024 × 128000 × 4 B ≈ 0.5 GB`` of fp32.
DEFAULT_CHUNK_SIZE = 1024


# --------------------------------------------------------------------------------------------------------------
# Logit scaling / soft-capping declared by a model's config
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LogitTransform:
    """The map from the raw LM-head output ``a`` to the model's logits: ``z = softcap(scale · a)``.

    Attributes:
        scale: multiplies the raw head output (``1.0`` = none).
        softcap: ``σ`` of ``σ·tanh(x/σ)`` applied after the scale, or ``None`` for no soft-capping.
    """

    scale: float = 1.0
    softcap: float | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.scale) and self.scale > 0):
            raise ValueError(f"LogitTransform.scale must be a finite positive number, got {self.scale}")
        if self.softcap is not None and not (math.isfinite(self.softcap) and self.softcap > 0):
            raise ValueError(
                f"LogitTransform.softcap must be a finite positive number or None, got {self.softcap}"
            )


_GRANITE_LIKE = {
    "granite",
    "granitemoe",
    "granitemoeshared",
    "granitemoehybrid",
    "granite_swa",
    "granitemoe_swa",
    "minicpm3",  # divides the hidden state before a bias-free head: the same thing
}
# attribute -> {model_type: +1 (multiply) | -1 (divide)}; read from transformers 5.23's modeling_*.py files.
_SCALE_RULES: dict[str, dict[str, int]] = {
    "logit_scale": {"cohere": 1, "cohere2": 1, "cohere2_moe": 1, "cohere_compass": 1},
    "logits_scaling": {**dict.fromkeys(_GRANITE_LIKE, -1), "hyperclovax": 1},
    "lm_head_multiplier": {"falcon_h1": 1},
    "output_multiplier": {"muse_spark": 1},
}
_SOFTCAP_ATTR = "final_logit_softcapping"
# names that look like an output-logit scale/cap but are about attention, routers, initialisation, ...
_LOOKALIKE = re.compile(r"attn|attention|router|init|contrastive|time|max_|aux")
_SUSPICIOUS = re.compile(r"(logit.*(scal|cap|mult|temp))|(lm_head.*mult)|(^output_multiplier$)")


def _is_identity(value: Any) -> bool:
    return value is None or value is False or (isinstance(value, (int, float)) and float(value) == 1.0)


def logit_transform(config: Any) -> LogitTransform:
    """The [`LogitTransform`][prefopt.logprobs.LogitTransform] a Hugging Face model ``config`` declares for its final logits.

    Handled (each checked against the model's own forward in ``tests/test_logprobs.py``):
    ``final_logit_softcapping`` (Gemma-2/3, any model type: ``σ·tanh(z/σ)``), ``logit_scale`` (Cohere:
    ``z·s``), ``logits_scaling`` (Granite / MiniCPM3: ``z/s``; HyperCLOVA X: ``z·s``), ``lm_head_multiplier``
    (Falcon-H1: ``z·m``), ``output_multiplier`` (MuseSpark: ``z·m`` before the soft-cap).

    Raises:
        ValueError: if the config declares a non-trivial logit scale/cap this function does not know how
            the model applies (an unknown attribute, or a known one on an unknown ``model_type``), rather
            than return log-probs of the wrong distribution.
    """
    configs = [config]
    get_text = getattr(config, "get_text_config", None)
    if callable(get_text):
        text = get_text()
        if text is not None and text is not config:
            configs.append(text)
    model_type = str(getattr(config, "model_type", ""))
    scale = 1.0
    softcap: float | None = None
    seen: set[str] = set()
    for cfg in configs:
        attrs = dict(vars(cfg)) if hasattr(cfg, "__dict__") else {}
        for name, value in attrs.items():
            if name in seen:
                continue
            if name == _SOFTCAP_ATTR:
                seen.add(name)
                if value is not None:
                    softcap = float(value)
                continue
            if name in _SCALE_RULES:
                seen.add(name)
                if _is_identity(value):
                    continue
                types = _SCALE_RULES[name]
                if model_type not in types:
                    raise ValueError(
                        f"model config (model_type={model_type!r}) declares {name}={value!r}, but prefopt does "
                        f"not know how this model type applies it (known for {sorted(types)}); refusing to "
                        "return log-probs of a possibly wrong distribution"
                    )
                scale = scale * float(value) if types[model_type] > 0 else scale / float(value)
                continue
            if _SUSPICIOUS.search(name) and not _LOOKALIKE.search(name) and not _is_identity(value):
                raise ValueError(
                    f"model config (model_type={model_type!r}) declares {name}={value!r}, which looks like a "
                    "scaling or soft-capping of the output logits that prefopt.logprobs does not handle"
                )
    return LogitTransform(scale=scale, softcap=softcap)


# --------------------------------------------------------------------------------------------------------------
# The chunked LM head as a custom autograd function
# --------------------------------------------------------------------------------------------------------------


def _acc_dtype(h: Tensor) -> torch.dtype:
    """Accumulation dtype: float64 for float64 inputs (exact gradchecks), float32 otherwise (bf16/fp16/fp32)."""
    return torch.float64 if h.dtype == torch.float64 else torch.float32


def _chunk_pass(
    h: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    y: Tensor,
    scale: float,
    softcap: float | None,
    tau: float,
    want_entropy: bool,
    g_logp: Tensor | None = None,
    g_ent: Tensor | None = None,
    split: bool = False,
    known: tuple[Tensor, Tensor | None] | None = None,
    sumsq_out: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor | None, list[Tensor]]:
    """One chunk: log-probs, entropies and (optionally) gradients w.r.t. the raw head output ``a``.

    Works in place on as few ``(c, V)`` buffers as possible (one without soft-cap or entropy). Returns
    ``(logp, lse, entropy or None, dz_list)`` where ``dz_list`` is ``[]`` (no gradient wanted), ``[∂(g_logp·ℓ +
    g_ent·H)/∂a]`` or, with ``split=True``, the unit-weight directions ``[∂ℓ/∂a (, ∂H/∂a)]``.
    ``known=(lse, entropy)`` (from the forward pass) skips recomputing them; ``logp`` is then not computed.
    ``sumsq_out`` (forward pass only): a ``(c,)`` buffer that receives ``log Σ_v p_v²`` (WPO's normaliser).
    """
    acc = _acc_dtype(h)
    a = nn.functional.linear(h, weight, bias)
    if a.dtype != acc:
        a = a.to(acc)
    const = scale / tau  # ∂z/∂a without the soft-cap factor
    chain: Tensor | None = None
    if softcap is None:
        z = a.mul_(const) if const != 1.0 else a
    else:
        t = a.mul_(scale / softcap).tanh_()
        z = t * (softcap / tau)
        chain = t.mul_(t).neg_().add_(1.0)  # 1 − tanh², reusing the buffer
    ent: Tensor | None = None
    logp_all: Tensor | None = None
    if known is None:
        zy = z.gather(1, y[:, None]).squeeze(1)
        m = z.amax(1, keepdim=True)
        z.sub_(m)
        e = z.exp() if want_entropy else z.exp_()
        s = e.sum(1, keepdim=True)
        log_s = s.log()
        lse = (m + log_s).squeeze(1)
        logp = zy - lse
        p = e.div_(s)
        if sumsq_out is not None:  # Σ_v p_v² ≥ max_v p_v² ≥ 1/V²: no underflow to 0
            sumsq_out.copy_(torch.bmm(p[:, None, :], p[:, :, None]).reshape(-1).log_())
        if want_entropy:
            logp_all = z.sub_(log_s)
            ent = -torch.bmm(p[:, None, :], logp_all[:, :, None]).reshape(-1)
    else:  # backward recompute: log-sum-exp (and entropy) saved by the forward pass; fewer passes over (c, V)
        lse, ent = known
        logp = lse  # placeholder: not needed in backward
        z.sub_(lse[:, None])
        if want_entropy:
            logp_all = z
            p = z.exp()
        else:
            p = z.exp_()
    want = split or g_logp is not None or (want_entropy and g_ent is not None)
    if not want:
        return logp, lse, ent, []

    def finish(dz: Tensor) -> Tensor:
        if chain is not None:
            dz.mul_(chain)
        return dz.mul_(const) if const != 1.0 else dz

    q: Tensor | None = None  # −∂H/∂z = p ⊙ (log p + H), in the log-prob buffer
    if want_entropy and logp_all is not None and ent is not None and (split or g_ent is not None):
        q = logp_all.add_(ent[:, None]).mul_(p)
    if split:
        ones = torch.ones_like(logp)
        dz_lp = p.neg_().scatter_add_(1, y[:, None], ones[:, None])
        out = [finish(dz_lp)]
        if q is not None:
            out.append(finish(q.neg_()))
        return logp, lse, ent, out
    if g_logp is not None:
        g = g_logp.to(acc)
        dz = p.mul_(-g[:, None]).scatter_add_(1, y[:, None], g[:, None])
        if q is not None and g_ent is not None:
            dz.addcmul_(q, g_ent.to(acc)[:, None], value=-1.0)
    else:
        assert q is not None and g_ent is not None
        dz = q.mul_(-g_ent.to(acc)[:, None])
    return logp, lse, ent, [finish(dz)]


class _ChunkedHeadLogps(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        h: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        targets: Tensor,
        scale: float,
        softcap: float | None,
        tau: float,
        chunk_size: int,
        want_entropy: bool,
        want_sumsq: bool = False,
    ) -> tuple[Tensor, Tensor, Tensor]:
        n = h.shape[0]
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        # Head frozen and only h needs a gradient: form grad_h's directions now, backward is then g·u.
        precompute = need_h and not need_w and not need_b
        acc = _acc_dtype(h)
        logp = h.new_empty(n, dtype=acc)
        lse = h.new_empty(0 if precompute else n, dtype=acc)
        ent = h.new_empty(n if want_entropy else 0, dtype=acc)
        u = h.new_empty((n, h.shape[1]) if precompute else (0,), dtype=acc)
        v = h.new_empty((n, h.shape[1]) if (precompute and want_entropy) else (0,), dtype=acc)
        sumsq = h.new_empty(n if want_sumsq else 0, dtype=acc)
        for start in range(0, n, chunk_size):
            sl = slice(start, min(start + chunk_size, n))
            lp_c, lse_c, ent_c, dzs = _chunk_pass(
                h[sl],
                weight,
                bias,
                targets[sl],
                scale,
                softcap,
                tau,
                want_entropy,
                split=precompute,
                sumsq_out=sumsq[sl] if want_sumsq else None,
            )
            logp[sl] = lp_c
            if not precompute:
                lse[sl] = lse_c
            if ent_c is not None:
                ent[sl] = ent_c
            if precompute:
                u[sl] = dzs[0].to(weight.dtype) @ weight
                if want_entropy:
                    v[sl] = dzs[1].to(weight.dtype) @ weight
            del dzs
        ctx.meta = (scale, softcap, tau, chunk_size, want_entropy, precompute)
        if precompute:
            ctx.save_for_backward(u, v)
        else:
            ctx.save_for_backward(h, weight, bias, targets, lse, ent)
        if not want_entropy:
            ctx.mark_non_differentiable(ent)
        ctx.mark_non_differentiable(sumsq)  # WPO uses it as a constant weight
        return logp, ent, sumsq

    @staticmethod
    def backward(ctx: Any, g_logp: Tensor | None, g_ent: Tensor | None, _g_sumsq: Tensor | None):  # type: ignore[override]
        scale, softcap, tau, chunk_size, want_entropy, precompute = ctx.meta
        if not want_entropy:
            g_ent = None
        nones = (None,) * 7
        if precompute:
            u, v = ctx.saved_tensors
            grad = torch.zeros_like(u)
            if g_logp is not None:
                grad.addcmul_(u, g_logp.to(u.dtype)[:, None])
            if g_ent is not None:
                grad.addcmul_(v, g_ent.to(v.dtype)[:, None])
            return grad, None, None, *nones
        h, weight, bias, targets, lse, ent = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        acc = _acc_dtype(h)
        grad_h = torch.zeros_like(h) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if need_b else None
        if g_logp is None and g_ent is None:
            return grad_h, grad_w, grad_b, *nones
        n = h.shape[0]
        for start in range(0, n, chunk_size):
            sl = slice(start, min(start + chunk_size, n))
            _, _, _, dzs = _chunk_pass(
                h[sl],
                weight,
                bias,
                targets[sl],
                scale,
                softcap,
                tau,
                want_entropy,
                g_logp=None if g_logp is None else g_logp[sl],
                g_ent=None if g_ent is None else g_ent[sl],
                known=(lse[sl], ent[sl] if want_entropy else None),
            )
            dz = dzs[0]
            if grad_h is not None:
                grad_h[sl] = dz.to(weight.dtype) @ weight
            if grad_w is not None:
                grad_w.addmm_(dz.t(), h[sl].to(acc))
            if grad_b is not None:
                grad_b.add_(dz.sum(0))
            del dz, dzs
        return (
            grad_h,
            None if grad_w is None else grad_w.to(weight.dtype),
            None if grad_b is None or bias is None else grad_b.to(bias.dtype),
            *nones,
        )


def _check_chunk_size(chunk_size: Any) -> int:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    return chunk_size


def _check_temperature(temperature: Any) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a float, got {type(temperature).__name__}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be finite and > 0, got {temperature}")
    return float(temperature)


@overload
def chunked_head_logps(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    bias: Tensor | None = ...,
    *,
    transform: LogitTransform | None = ...,
    temperature: float = ...,
    chunk_size: int = ...,
    return_entropy: Literal[False] = ...,
) -> Tensor: ...


@overload
def chunked_head_logps(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    bias: Tensor | None = ...,
    *,
    transform: LogitTransform | None = ...,
    temperature: float = ...,
    chunk_size: int = ...,
    return_entropy: Literal[True],
) -> tuple[Tensor, Tensor]: ...


def chunked_head_logps(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    bias: Tensor | None = None,
    *,
    transform: LogitTransform | None = None,
    temperature: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    return_entropy: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """``ℓ_i = log softmax(z_i)[y_i]`` with ``z_i = softcap(κ·(W h_i + b))/τ``, without keeping ``(n, V)`` logits.

    Args:
        hidden: ``(n, d)`` hidden states (any float dtype; gradients flow back to it).
        weight: ``(V, d)`` LM-head weight (gets a gradient if it requires one, e.g. tied embeddings).
        targets: ``(n,)`` integer token ids in ``[0, V)``.
        bias: optional ``(V,)`` head bias.
        transform: the model's [`LogitTransform`][prefopt.logprobs.LogitTransform] (default: none).
        temperature: ``τ > 0`` dividing the final logits (default 1).
        chunk_size: rows of ``hidden`` per head chunk (default `DEFAULT_CHUNK_SIZE`).
        return_entropy: also return ``H_i = −Σ_v p_iv log p_iv`` (differentiable).

    Returns:
        ``(n,)`` log-probs (float32; float64 for float64 ``hidden``), or ``(logp, entropy)``.
    """
    logp, ent, _ = _linear_head(
        hidden, weight, targets, bias, transform, temperature, chunk_size, return_entropy, validate=True
    )
    return (logp, ent) if return_entropy else logp  # float32, or float64 for float64 hidden


def _linear_head(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    bias: Tensor | None,
    transform: LogitTransform | None,
    temperature: float,
    chunk_size: int,
    return_entropy: bool,
    *,
    validate: bool,
    log_sum_sq: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """Shape/dtype checks (no synchronisation), the token-id range (one, if ``validate``), the chunked head."""
    check_tensor("hidden", hidden, ndim=2)
    check_tensor("weight", weight, ndim=2)
    check_tensor("targets", targets, ndim=1, floating=False)
    if targets.dtype == torch.bool or torch.is_floating_point(targets) or torch.is_complex(targets):
        raise TypeError(f"targets must be an integer tensor, got dtype {targets.dtype}")
    if hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden has width {hidden.shape[1]} but weight has shape {tuple(weight.shape)}")
    if targets.shape[0] != hidden.shape[0]:
        raise ValueError(f"targets has {targets.shape[0]} entries but hidden has {hidden.shape[0]} rows")
    if bias is not None:
        check_tensor("bias", bias, ndim=1)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias has shape {tuple(bias.shape)} but weight has {weight.shape[0]} rows")
    chunk_size = _check_chunk_size(chunk_size)
    tau = _check_temperature(temperature)
    tr = transform or LogitTransform()
    if validate:
        _raise_first(_id_range_check("targets", targets, weight.shape[0]))
    logp, ent, sumsq = _ChunkedHeadLogps.apply(
        hidden,
        weight,
        bias,
        targets.long(),
        tr.scale,
        tr.softcap,
        tau,
        chunk_size,
        return_entropy,
        log_sum_sq,
    )
    return logp, ent, sumsq


def _module_head_logps(
    head: nn.Module,
    hidden: Tensor,
    targets: Tensor,
    tr: LogitTransform,
    tau: float,
    chunk_size: int,
    return_entropy: bool,
    log_sum_sq: bool = False,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Fallback for heads that are not a plain ``nn.Linear`` (LoRA-wrapped, modules_to_save, ...).

    Calls the head module on chunks under non-reentrant activation checkpointing, so each chunk's logits are
    freed after the forward and recomputed during backward. Slower (a second head forward) but generic.
    """

    def one(h: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        a = head(h).to(_acc_dtype(h))
        s = a * tr.scale if tr.scale != 1.0 else a
        if tr.softcap is not None:
            s = torch.tanh(s / tr.softcap) * tr.softcap
        z = s / tau if tau != 1.0 else s
        lsm = torch.log_softmax(z, dim=-1)
        lp = lsm.gather(1, y[:, None]).squeeze(1)
        ent = -(lsm.exp() * lsm).sum(-1) if return_entropy else lp.new_zeros(0)
        lss = torch.logsumexp(2 * lsm.detach(), dim=-1) if log_sum_sq else lp.new_zeros(0)
        return lp, ent, lss

    parts: list[tuple[Tensor, Tensor, Tensor]] = []
    for start in range(0, hidden.shape[0], chunk_size):
        sl = slice(start, start + chunk_size)
        if torch.is_grad_enabled():
            parts.append(checkpoint(one, hidden[sl], targets[sl], use_reentrant=False))
        else:
            parts.append(one(hidden[sl], targets[sl]))
    if not parts:  # nothing counts: still connect the (empty) result to the head's parameters
        parts.append(one(hidden[:0], targets[:0]))
    lp_all, ent_all, lss_all = (torch.cat([p[i] for p in parts]) for i in range(3))
    return lp_all, (ent_all if return_entropy else None), (lss_all.detach() if log_sum_sq else None)


@dataclass(frozen=True)
class HeadStats:
    """Per-token statistics from an LM head, in the layout of the log-probs (``(n,)`` from [`head_stats`][prefopt.logprobs.head_stats],
    ``(b, t)`` from [`token_stats`][prefopt.logprobs.token_stats]), each present when asked for:

    - ``logp``: ``log π(y_i)``, differentiable;
    - ``entropy``: ``H_i = −Σ_v π_v log π_v``, differentiable;
    - ``log_sum_sq_probs``: ``log Σ_v π_v²``, WPO's per-token normaliser (Zhou et al. 2024, arXiv 2406.11827,
      Eq. (2); see [`wpo_weights`][prefopt.losses.weighted.wpo_weights]), detached (WPO's weight is a constant).
    """

    logp: Tensor
    entropy: Tensor | None = None
    log_sum_sq_probs: Tensor | None = None


def head_stats(
    head: nn.Module,
    hidden: Tensor,
    targets: Tensor,
    *,
    transform: LogitTransform | None = None,
    temperature: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    entropy: bool = False,
    log_sum_sq_probs: bool = False,
    validate: bool = True,
) -> HeadStats:
    r"""Hidden states → per-token log-probs (and entropy) through an LM head, without keeping ``(n, V)`` logits.

    ``z_i = softcap(κ·head(h_i))/τ``, ``logp_i = log softmax(z_i)[y_i]``, ``H_i = −Σ_v p_iv log p_iv``. The one
    seam between a forward strategy and the head: [`token_logps`][prefopt.logprobs.token_logps] and the
    shared-prompt forward ([`prefopt.shared_prefix`][prefopt.shared_prefix]) both select the hidden states
    that count and call this. A plain ``nn.Linear`` head goes through
    [`chunked_head_logps`][prefopt.logprobs.chunked_head_logps] (a custom backward; no logits kept); any other
    head module (LoRA on ``lm_head``, ``modules_to_save``) is called chunk by chunk under activation
    checkpointing (slower, same values).

    Args:
        head: the LM head module (``model.get_output_embeddings()``).
        hidden: ``(n, d)`` hidden states.
        targets: ``(n,)`` integer token ids.
        transform: the model's [`LogitTransform`][prefopt.logprobs.LogitTransform] (default: none).
        temperature: ``τ > 0`` (default 1).
        chunk_size: rows per head chunk (default `DEFAULT_CHUNK_SIZE`).
        entropy: also compute the (differentiable) entropy.
        log_sum_sq_probs: also compute ``log Σ_v π_v²`` (WPO), in the same pass over each chunk of logits.
        validate: check that ``targets`` lie in ``[0, V)`` (one device synchronisation). ``False`` when the
            caller has checked the token ids already, as both forward strategies do.

    Returns:
        [`HeadStats`][prefopt.logprobs.HeadStats] with float32 tensors (float64 for float64 ``hidden``).
    """
    for flag_name, flag in (("entropy", entropy), ("log_sum_sq_probs", log_sum_sq_probs)):
        if not isinstance(flag, bool):
            raise TypeError(f"{flag_name} must be a bool, got {type(flag).__name__}")
    if not isinstance(validate, bool):
        raise TypeError(f"validate must be a bool, got {type(validate).__name__}")
    if type(head) is nn.Linear:
        lp, ent, lss = _linear_head(
            hidden,
            head.weight,
            targets,
            head.bias,
            transform,
            temperature,
            chunk_size,
            entropy,
            validate=validate,
            log_sum_sq=log_sum_sq_probs,
        )
        return HeadStats(lp, ent if entropy else None, lss if log_sum_sq_probs else None)
    check_tensor("targets", targets, ndim=1, floating=False)
    if validate:
        _raise_first(_id_range_check("targets", targets, _head_vocab(head)))
    chunk_size = _check_chunk_size(chunk_size)
    tau = _check_temperature(temperature)
    lp, ent_or_none, lss_or_none = _module_head_logps(
        head,
        hidden,
        targets.long(),
        transform or LogitTransform(),
        tau,
        chunk_size,
        entropy,
        log_sum_sq_probs,
    )
    return HeadStats(lp, ent_or_none, lss_or_none)


# --------------------------------------------------------------------------------------------------------------
# token_logps on a model
# --------------------------------------------------------------------------------------------------------------


def _unwrap(model: Any) -> nn.Module:
    get_base = getattr(model, "get_base_model", None)
    # a peft PeftModel: unwrap to the transformers model; the LoRA layers stay injected in it
    if callable(get_base) and type(model).__module__.startswith("peft"):
        model = get_base()
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"model must be a torch.nn.Module (a transformers causal LM), got {type(model).__name__}"
        )
    if not hasattr(model, "base_model_prefix") or not callable(getattr(model, "get_output_embeddings", None)):
        raise TypeError(
            f"model must be a transformers PreTrainedModel with an LM head (or a peft model wrapping one); "
            f"{type(model).__name__} has no base_model_prefix/get_output_embeddings"
        )
    return model


def backbone_and_head(model: Any) -> tuple[nn.Module, nn.Module, Any]:
    """``(backbone, lm_head, config)`` of a transformers causal LM, a peft model or a ``LoraPolicy``.

    The backbone (``model.<base_model_prefix>``) returns the final hidden states; the head maps them to
    logits. Raises ``TypeError`` naming the model class when the split is not possible.
    """
    base: Any = _unwrap(model)
    backbone = getattr(base, str(base.base_model_prefix), None)
    head = base.get_output_embeddings()
    if backbone is None or backbone is base or head is None:
        raise TypeError(
            f"cannot split {type(base).__name__} into backbone and LM head "
            f"(base_model_prefix={base.base_model_prefix!r}, output embeddings={type(head).__name__})"
        )
    return backbone, head, base.config


def position_kwargs(backbone: nn.Module, attention_mask: Tensor | None) -> dict[str, Tensor]:
    """``{"position_ids": ...}`` for a forward of ``backbone`` on possibly left-padded rows, else ``{}``.

    Positions are ``cumsum(attention_mask) − 1`` on attended tokens (see ``_position_ids``), given only when
    there is a mask and ``backbone.forward`` accepts ``position_ids``; ``token_logps``, ``LoraPolicy.values``
    and ``RewardModel`` call their backbones with it.
    """
    if attention_mask is None or not _accepts_position_ids(backbone):
        return {}
    return {"position_ids": _position_ids(attention_mask)}


def _accepts_position_ids(backbone: nn.Module) -> bool:
    """Whether ``backbone.forward`` takes a ``position_ids`` argument by name (all transformers decoders do)."""
    try:
        params = inspect.signature(backbone.forward).parameters
    except (TypeError, ValueError):
        return False
    return "position_ids" in params


def _position_ids(attention_mask: Tensor) -> Tensor:
    """``(b, t)`` positions: ``cumsum(mask) − 1`` on attended tokens, the default ``arange(t)`` on padding.

    With left padding (or a padding gap inside a row) every real token gets its position in the unpadded
    sequence; models with absolute position embeddings (GPT-2, ...) would otherwise see positions shifted by
    the padding length. Padding tokens keep the backbone's default position: no real token attends to them,
    and a row without left padding or gaps gets exactly the default ``0, 1, 2, …`` everywhere.
    """
    mask = attention_mask.bool()
    default = torch.arange(mask.shape[-1], device=mask.device).expand_as(mask)
    return torch.where(mask, mask.long().cumsum(-1) - 1, default)


def _raise_first(checks: list[tuple[Tensor, str]]) -> None:
    """Raise ``ValueError`` with the message of the first check whose 0-d bool tensor is True.

    All the value checks of one call are read back with a single device synchronisation (``tolist`` of the
    stacked flags) instead of one ``bool(...)`` each: on a GPU every read-back stalls the stream.
    """
    if not checks:
        return
    flags = torch.stack([flag.to(checks[0][0].device) for flag, _ in checks]).tolist()
    for failed, (_, message) in zip(flags, checks):
        if failed:
            raise ValueError(message)


def _id_range_check(name: str, ids: Tensor, vocab: int | None) -> list[tuple[Tensor, str]]:
    """The (deferred) check that integer ``ids`` lie in ``[0, vocab)``."""
    if vocab is None or not ids.numel():
        return []
    bad = (ids.min() < 0) | (ids.max() >= vocab)
    return [(bad, f"{name} must lie in [0, {vocab}) (the model's vocabulary size)")]


def check_token_ids(head: nn.Module, **ids: Tensor) -> None:
    """Raise ``ValueError`` naming the argument if any token id lies outside ``[0, V)``, ``V`` the head's
    vocabulary size; every tensor is checked with one device synchronisation in all."""
    vocab = _head_vocab(head)
    _raise_first([c for name, x in ids.items() for c in _id_range_check(name, x, vocab)])


def _head_vocab(head: nn.Module) -> int | None:
    vocab = getattr(head, "out_features", None) or getattr(getattr(head, "weight", None), "shape", [None])[0]
    return None if vocab is None else int(vocab)


def _check_inputs(
    input_ids: Any, attention_mask: Any, completion_mask: Any, *, vocab: int | None = None
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Types and shapes (no synchronisation), then every value check at once (one synchronisation)."""
    check_tensor("input_ids", input_ids, ndim=2, floating=False)
    if input_ids.dtype == torch.bool or torch.is_floating_point(input_ids) or torch.is_complex(input_ids):
        raise TypeError(f"input_ids must be an integer tensor, got dtype {input_ids.dtype}")
    if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise ValueError(
            f"input_ids must have at least one row and one column, got shape {tuple(input_ids.shape)}"
        )
    if attention_mask is not None:
        check_tensor("attention_mask", attention_mask, ndim=2, floating=False)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)} but input_ids has shape "
                f"{tuple(input_ids.shape)}"
            )
        if torch.is_floating_point(attention_mask) or torch.is_complex(attention_mask):
            raise TypeError(
                f"attention_mask must be an integer or bool tensor, got dtype {attention_mask.dtype}"
            )
    checks = _id_range_check("input_ids", input_ids, vocab)
    if completion_mask is not None:
        check_tensor("completion_mask", completion_mask, ndim=2, floating=False)
        check_mask("completion_mask", completion_mask, tuple(input_ids.shape), "input_ids")
        if completion_mask.shape[1]:
            checks.append(
                (
                    completion_mask[:, 0].any(),
                    "completion_mask is True at position 0, which has no prefix to be predicted from; "
                    "completion_mask[:, i] refers to input_ids[:, i] and position 0 is always a prompt token",
                )
            )
        if attention_mask is not None:
            checks.append(
                (
                    (completion_mask & ~attention_mask.bool()).any(),
                    "completion_mask is True where attention_mask is 0 (a padding token)",
                )
            )
    _raise_first(checks)
    return input_ids, attention_mask, completion_mask


def token_logps(
    model: Any,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    completion_mask: Tensor | None = None,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    temperature: float = 1.0,
) -> Tensor:
    """Per-token log-probs ``ℓ[:, i] = log p(input_ids[:, i] | input_ids[:, :i])`` of a causal LM.

    Runs the model's backbone once, then its LM head (with the config's logit scaling / soft-capping and
    ``temperature``) over the positions that count only, in chunks of ``chunk_size`` tokens, through
    [`chunked_head_logps`][prefopt.logprobs.chunked_head_logps] — no ``(b, t, V)`` logits tensor is kept for
    backward. Gradients reach the backbone (LoRA adapters included) and the head weight when it requires grad
    (tied embeddings). If the head is not a plain ``nn.Linear`` (e.g. LoRA on ``lm_head``), a slower generic
    path calls the head module per chunk under activation checkpointing; the results are the same.

    Args:
        model: a transformers causal LM (``PreTrainedModel`` with ``base_model_prefix`` and
            ``get_output_embeddings()``), or a peft ``PeftModel`` wrapping one.
        input_ids: ``(b, t)`` integer token ids, ``b ≥ 1`` and ``t ≥ 1`` (an empty batch raises
            ``ValueError`` naming ``input_ids`` before the model runs).
        attention_mask: ``(b, t)`` 0/1 (int or bool) or None (all ones); passed to the backbone as is, with
            ``position_ids = cumsum(attention_mask) − 1`` on the attended tokens when the backbone accepts
            them, so a left-padded row gets the positions of its unpadded sequence (this matters for absolute
            position embeddings such as GPT-2's; rotary models are unaffected up to float rounding).
        completion_mask: ``(b, t)`` bool, True where token ``i`` counts; must be False at ``i = 0``.
            None: every position ``i ≥ 1`` counts.
        chunk_size: completion tokens per head chunk (default `DEFAULT_CHUNK_SIZE`).
        temperature: ``τ > 0``; the final logits are divided by it (sampling log-probs). Default 1.

    Returns:
        ``(b, t)`` log-probs (float32; float64 for a float64 model), 0 at ``i = 0`` and where
        ``completion_mask`` is False. For the per-token entropy as well, use
        [`token_logps_and_entropy`][prefopt.logprobs.token_logps_and_entropy].
    """
    return _token_stats(model, input_ids, attention_mask, completion_mask, chunk_size, temperature).logp


def token_logps_and_entropy(
    model: Any,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    completion_mask: Tensor | None = None,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    temperature: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """[`token_logps`][prefopt.logprobs.token_logps] and the per-token entropy ``H[:, i] = −Σ_v p(v | input_ids[:, :i]) log p(v | …)``.

    Same arguments, one forward. Both ``(b, t)`` in the same layout (0 at ``i = 0`` and where
    ``completion_mask`` is False); the entropy is differentiable (an entropy bonus, the high-entropy token
    mask) and, like the log-probs, no ``(b, t, V)`` tensor is kept for backward.
    """
    st = _token_stats(
        model, input_ids, attention_mask, completion_mask, chunk_size, temperature, entropy=True
    )
    assert st.entropy is not None  # entropy=True always computes it
    return st.logp, st.entropy


def token_stats(
    model: Any,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    completion_mask: Tensor | None = None,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    temperature: float = 1.0,
    entropy: bool = False,
    log_sum_sq_probs: bool = False,
) -> HeadStats:
    """[`token_logps`][prefopt.logprobs.token_logps] plus the per-token statistics asked for, from one forward and one pass of the head.

    Returns a [`HeadStats`][prefopt.logprobs.HeadStats] whose fields are ``(b, t)`` in the layout of
    [`token_logps`][prefopt.logprobs.token_logps] (0 at ``i = 0`` and where ``completion_mask`` is False):
    ``logp``, ``entropy`` (if ``entropy``) and ``log_sum_sq_probs`` (if asked: ``log Σ_v π_v²``, WPO's
    normaliser, detached). No ``(b, t, V)`` tensor is kept for backward. Same other arguments as
    [`token_logps`][prefopt.logprobs.token_logps].
    """
    return _token_stats(
        model,
        input_ids,
        attention_mask,
        completion_mask,
        chunk_size,
        temperature,
        entropy=entropy,
        log_sum_sq_probs=log_sum_sq_probs,
    )


def _token_stats(
    model: Any,
    input_ids: Tensor,
    attention_mask: Tensor | None,
    completion_mask: Tensor | None,
    chunk_size: int,
    temperature: float,
    *,
    entropy: bool = False,
    log_sum_sq_probs: bool = False,
) -> HeadStats:
    chunk_size = _check_chunk_size(chunk_size)
    tau = _check_temperature(temperature)
    backbone, head, config = backbone_and_head(model)
    input_ids, attention_mask, completion_mask = _check_inputs(
        input_ids, attention_mask, completion_mask, vocab=_head_vocab(head)
    )
    tr = logit_transform(config)
    b, t = input_ids.shape

    kwargs = position_kwargs(backbone, attention_mask)
    out = backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    if t < 2:
        zero = hidden.new_zeros(b, t, dtype=_acc_dtype(hidden)) + 0.0 * hidden.sum()
        return HeadStats(
            zero,
            zero.clone() if entropy else None,
            zero.detach().clone() if log_sum_sq_probs else None,
        )
    sel = (
        torch.ones(b, t - 1, dtype=torch.bool, device=input_ids.device)
        if completion_mask is None
        else completion_mask[:, 1:]
    )
    flat = sel.reshape(-1)
    idx = flat.nonzero().squeeze(1)
    h_sel = hidden[:, :-1].reshape(-1, hidden.shape[-1]).index_select(0, idx)
    y_sel = input_ids[:, 1:].reshape(-1).index_select(0, idx).long()

    stats = head_stats(
        head,
        h_sel,
        y_sel,
        transform=tr,
        temperature=tau,
        chunk_size=chunk_size,
        entropy=entropy,
        log_sum_sq_probs=log_sum_sq_probs,
        validate=False,  # input_ids were checked above, with the masks, in one synchronisation
    )

    def scatter(vals: Tensor) -> Tensor:
        dense = vals.new_zeros(b * (t - 1)).index_put((idx,), vals)
        return torch.cat([vals.new_zeros(b, 1), dense.view(b, t - 1)], dim=1)

    acc = _acc_dtype(hidden)  # float32, or float64 for a float64 model
    return HeadStats(
        scatter(stats.logp.to(acc)),
        None if stats.entropy is None else scatter(stats.entropy.to(acc)),
        None if stats.log_sum_sq_probs is None else scatter(stats.log_sum_sq_probs.to(acc)),
    )


# --------------------------------------------------------------------------------------------------------------
# Per-token KL(π_ref ‖ π_θ) over the vocabulary (TDPO), chunked
# --------------------------------------------------------------------------------------------------------------


def _head_logits(
    h: Tensor, weight: Tensor, bias: Tensor | None, scale: float, softcap: float | None, tau: float
) -> tuple[Tensor, Tensor | float]:
    """``z = softcap(κ·(W h + b))/τ`` in the accumulation dtype (in place on one ``(c, V)`` buffer; a second one
    only with a soft-cap) and ``∂z/∂a`` (a tensor, or a constant)."""
    a = nn.functional.linear(h, weight, bias)
    if a.dtype != _acc_dtype(h):
        a = a.to(_acc_dtype(h))
    if softcap is None:
        return (a.mul_(scale / tau) if scale != tau else a), scale / tau
    t = a.mul_(scale / softcap).tanh_()
    chain = (t * t).neg_().add_(1.0).mul_(scale / tau)
    return t.mul_(softcap / tau), chain


def _kl_chunk(
    h: Tensor,
    h_ref: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    ref_weight: Tensor,
    ref_bias: Tensor | None,
    meta: tuple[float, float | None, float],
    g: Tensor | None,
) -> tuple[Tensor, Tensor | None]:
    """One chunk: ``KL(π_ref ‖ π_θ)`` per row and, with upstream ``g``, ``∂(g·KL)/∂a = g·(π_θ − π_ref)·∂z/∂a``.

    At most three ``(c, V)`` buffers live at once (four with a soft-cap): the policy's log-probs (then its
    probabilities, then the gradient), the reference's log-probs and the reference's probabilities.
    """
    scale, softcap, tau = meta
    with torch.no_grad():
        log_q, dz_da = _head_logits(h, weight, bias, scale, softcap, tau)
        log_q.sub_(torch.logsumexp(log_q, dim=1, keepdim=True))
        log_p, _ = _head_logits(h_ref, ref_weight, ref_bias, scale, softcap, tau)
        log_p.sub_(torch.logsumexp(log_p, dim=1, keepdim=True))
        p = log_p.exp()
        kl = (
            torch.bmm(p[:, None, :], log_p[:, :, None]) - torch.bmm(p[:, None, :], log_q[:, :, None])
        ).reshape(-1)
        del log_p
        if g is None:
            return kl, None
        da = log_q.exp_().sub_(p).mul_(g.to(log_q.dtype)[:, None])
        del p
        return kl, da.mul_(dz_da)


class _ChunkedHeadKL(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        h: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        h_ref: Tensor,
        ref_weight: Tensor,
        ref_bias: Tensor | None,
        scale: float,
        softcap: float | None,
        tau: float,
        chunk_size: int,
    ) -> Tensor:
        n = h.shape[0]
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        precompute = need_h and not need_w and not need_b  # frozen head: grad_h's direction now, g·u later
        meta = (scale, softcap, tau)
        kl = h.new_empty(n, dtype=_acc_dtype(h))
        u = h.new_empty((n, h.shape[1]) if precompute else (0,), dtype=_acc_dtype(h))
        ones = h.new_ones(n, dtype=_acc_dtype(h))
        for start in range(0, n, chunk_size):
            sl = slice(start, min(start + chunk_size, n))
            kl_c, da = _kl_chunk(
                h[sl], h_ref[sl], weight, bias, ref_weight, ref_bias, meta, ones[sl] if precompute else None
            )
            kl[sl] = kl_c
            if precompute:
                assert da is not None
                u[sl] = da.to(weight.dtype) @ weight
        ctx.meta = (meta, chunk_size, precompute)
        if precompute:
            ctx.save_for_backward(u)
        else:
            ctx.save_for_backward(h, weight, bias, h_ref, ref_weight, ref_bias)
        return kl

    @staticmethod
    def backward(ctx: Any, g: Tensor):  # type: ignore[override]
        meta, chunk_size, precompute = ctx.meta
        nones = (None,) * 7
        if precompute:
            (u,) = ctx.saved_tensors
            return u * g.to(u.dtype)[:, None], None, None, *nones
        h, weight, bias, h_ref, ref_weight, ref_bias = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        acc = _acc_dtype(h)
        grad_h = torch.zeros_like(h) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if need_b else None
        for start in range(0, h.shape[0], chunk_size):
            sl = slice(start, min(start + chunk_size, h.shape[0]))
            _, da = _kl_chunk(h[sl], h_ref[sl], weight, bias, ref_weight, ref_bias, meta, g[sl])
            assert da is not None
            if grad_h is not None:
                grad_h[sl] = da.to(weight.dtype) @ weight
            if grad_w is not None:
                grad_w.addmm_(da.t(), h[sl].to(acc))
            if grad_b is not None:
                grad_b.add_(da.sum(0))
        return (
            grad_h,
            None if grad_w is None else grad_w.to(weight.dtype),
            None if grad_b is None or bias is None else grad_b.to(bias.dtype),
            *nones,
        )


def chunked_head_kl(
    hidden: Tensor,
    ref_hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    ref_weight: Tensor | None = None,
    ref_bias: Tensor | None = None,
    transform: LogitTransform | None = None,
    temperature: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Tensor:
    r"""``KL(π_ref,i ‖ π_θ,i) = Σ_v π_ref(v)·(log π_ref(v) − log π_θ(v))`` per row, without keeping ``(n, V)`` logits.

    ``π_θ,i = softmax(z(h_i))`` from the policy head (``weight``, ``bias``) and ``π_ref,i`` from ``ref_hidden``
    through the reference head (``ref_weight``/``ref_bias``, default: the policy head, as with LoRA on the
    backbone), both with the same logit ``transform`` and ``temperature``. TDPO's sequential KL term (Zeng et
    al. 2024, arXiv 2404.11999); ``∂KL/∂z = π_θ − π_ref``. Gradients reach ``hidden`` (and ``weight``/``bias``
    when they require one), never the reference side. With a frozen head the gradient directions are formed in
    the forward pass (one extra ``(n, d)`` buffer) and backward costs no head matmul.

    Args:
        hidden: ``(n, d)`` policy hidden states (gradients flow back to it).
        ref_hidden: ``(n, d)`` reference hidden states at the same positions (treated as constants).
        weight: the policy's LM head, ``(V, d)`` and ``(V,)`` or ``None``.
        bias: the policy's LM head, ``(V, d)`` and ``(V,)`` or ``None``.
        ref_weight: the reference's LM head (default: ``weight``/``bias``, detached).
        ref_bias: the reference's LM head (default: ``weight``/``bias``, detached).
        transform: as in [`chunked_head_logps`][prefopt.logprobs.chunked_head_logps].
        temperature: as in [`chunked_head_logps`][prefopt.logprobs.chunked_head_logps].
        chunk_size: as in [`chunked_head_logps`][prefopt.logprobs.chunked_head_logps].

    Returns:
        ``(n,)`` KL values ``≥ 0`` (float32; float64 for float64 ``hidden``), differentiable.
    """
    check_tensor("hidden", hidden, ndim=2)
    check_tensor("ref_hidden", ref_hidden, ndim=2)
    check_tensor("weight", weight, ndim=2)
    if ref_hidden.shape != hidden.shape:
        raise ValueError(
            f"ref_hidden has shape {tuple(ref_hidden.shape)} but hidden has shape {tuple(hidden.shape)}"
        )
    if hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden has width {hidden.shape[1]} but weight has shape {tuple(weight.shape)}")
    if bias is not None:
        check_tensor("bias", bias, ndim=1)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias has shape {tuple(bias.shape)} but weight has {weight.shape[0]} rows")
    if ref_weight is None:
        ref_weight, ref_bias = weight, bias
    check_tensor("ref_weight", ref_weight, ndim=2)
    if ref_weight.shape != weight.shape:
        raise ValueError(
            f"ref_weight has shape {tuple(ref_weight.shape)} but weight has shape {tuple(weight.shape)}"
        )
    if ref_bias is not None:
        check_tensor("ref_bias", ref_bias, ndim=1)
    chunk_size = _check_chunk_size(chunk_size)
    tau = _check_temperature(temperature)
    tr = transform or LogitTransform()
    return _ChunkedHeadKL.apply(
        hidden,
        weight,
        bias,
        ref_hidden.detach(),
        ref_weight.detach(),
        None if ref_bias is None else ref_bias.detach(),
        tr.scale,
        tr.softcap,
        tau,
        chunk_size,
    )


def _module_head_kl(
    head: nn.Module,
    ref_head: nn.Module,
    hidden: Tensor,
    ref_hidden: Tensor,
    tr: LogitTransform,
    tau: float,
    chunk_size: int,
) -> Tensor:
    """Generic head modules (LoRA on ``lm_head``): full logits per chunk under activation checkpointing."""

    def logits(m: nn.Module, h: Tensor) -> Tensor:
        a = m(h).to(_acc_dtype(h)) * tr.scale
        if tr.softcap is not None:
            a = torch.tanh(a / tr.softcap) * tr.softcap
        return a / tau

    def one(h: Tensor, hr: Tensor) -> Tensor:
        log_q = torch.log_softmax(logits(head, h), dim=-1)
        with torch.no_grad():
            log_p = torch.log_softmax(logits(ref_head, hr), dim=-1)
        return (log_p.exp() * (log_p - log_q)).sum(-1)

    parts = []
    for start in range(0, hidden.shape[0], chunk_size):
        sl = slice(start, start + chunk_size)
        if torch.is_grad_enabled():
            parts.append(checkpoint(one, hidden[sl], ref_hidden[sl], use_reentrant=False))
        else:
            parts.append(one(hidden[sl], ref_hidden[sl]))
    return torch.cat(parts) if parts else one(hidden[:0], ref_hidden[:0])


def token_kl_to_reference(
    policy: Any,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    completion_mask: Tensor | None = None,
    *,
    reference: Any = True,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    temperature: float = 1.0,
) -> Tensor:
    r"""Per-position ``KL(π_ref(·|x, y_<i) ‖ π_θ(·|x, y_<i))`` over the vocabulary along given sequences.

    TDPO's per-token KL (Zeng et al. 2024, arXiv 2404.11999) — the ``token_kl`` input of the ``tdpo`` loss —
    from one reference forward (no grad) and one policy forward, through
    [`chunked_head_kl`][prefopt.logprobs.chunked_head_kl]: no ``(b, t, V)`` tensor is formed for either model.
    Layout of [`token_logps`][prefopt.logprobs.token_logps]: ``(b, t)``, position ``i`` holds the KL of the
    distributions that predict token ``i``; 0 at ``i = 0`` and where ``completion_mask`` is False.

    Args:
        policy: a [`LoraPolicy`][prefopt.policy.LoraPolicy] or a plain causal LM.
        input_ids: as in [`token_logps`][prefopt.logprobs.token_logps].
        attention_mask: as in [`token_logps`][prefopt.logprobs.token_logps].
        completion_mask: as in [`token_logps`][prefopt.logprobs.token_logps].
        reference: ``True`` (default): the ``LoraPolicy``'s adapters-off view; otherwise the reference model
            (a plain causal LM or a ``LoraPolicy``, whose policy view is used).
        chunk_size: as in [`token_logps`][prefopt.logprobs.token_logps].
        temperature: as in [`token_logps`][prefopt.logprobs.token_logps].

    Returns:
        ``(b, t)`` KL values (float32; float64 for a float64 model), differentiable in the policy.
    """
    is_policy = _is_lora_policy(policy)
    if reference is True and not is_policy:
        raise TypeError(
            f"reference=True needs a LoraPolicy (its adapters-off view is the reference); {type(policy).__name__} "
            "is not one: pass the reference model as reference=..."
        )
    if reference is None or reference is False:
        raise TypeError("reference must be True (a LoraPolicy's own reference) or a reference model")
    chunk_size = _check_chunk_size(chunk_size)
    tau = _check_temperature(temperature)
    model = policy.model if is_policy else policy
    backbone, head, config = backbone_and_head(model)
    input_ids, attention_mask, completion_mask = _check_inputs(
        input_ids, attention_mask, completion_mask, vocab=_head_vocab(head)
    )
    b, t = input_ids.shape
    kwargs = position_kwargs(backbone, attention_mask)

    def hidden_of(bb: nn.Module) -> Tensor:
        out = bb(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs)
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]

    if reference is True:
        with policy.reference():
            ref_backbone, ref_head, _ = backbone_and_head(policy.model)
            ref_hidden = hidden_of(ref_backbone)
            # a plain nn.Linear head has no adapter: the same weights serve both views (detached below)
            ref_w = ref_head.weight if type(ref_head) is nn.Linear else None
            ref_b = ref_head.bias if type(ref_head) is nn.Linear else None
    else:
        ref_model = reference.model if _is_lora_policy(reference) else reference
        ref_backbone, ref_head, _ = backbone_and_head(ref_model)
        with torch.no_grad():
            ref_hidden = hidden_of(ref_backbone)
        ref_w = ref_head.weight if type(ref_head) is nn.Linear else None
        ref_b = ref_head.bias if type(ref_head) is nn.Linear else None
    hidden = hidden_of(backbone)
    acc = _acc_dtype(hidden)
    if t < 2:
        return hidden.new_zeros(b, t, dtype=acc) + 0.0 * hidden.sum()
    sel = (
        torch.ones(b, t - 1, dtype=torch.bool, device=input_ids.device)
        if completion_mask is None
        else completion_mask[:, 1:]
    )
    idx = sel.reshape(-1).nonzero().squeeze(1)
    h_sel = hidden[:, :-1].reshape(-1, hidden.shape[-1]).index_select(0, idx)
    hr_sel = ref_hidden[:, :-1].reshape(-1, ref_hidden.shape[-1]).index_select(0, idx).to(h_sel.dtype)
    tr = logit_transform(config)
    if type(head) is nn.Linear and ref_w is not None:
        kl = chunked_head_kl(
            h_sel,
            hr_sel,
            head.weight,
            head.bias,
            ref_weight=ref_w,
            ref_bias=ref_b,
            transform=tr,
            temperature=tau,
            chunk_size=chunk_size,
        )
    else:  # a LoRA-wrapped head: the reference head is the same module with its adapters off
        if reference is True:
            raise NotImplementedError(
                "token_kl_to_reference with reference=True needs a plain nn.Linear LM head (no LoRA on lm_head); "
                "pass a separate reference model instead"
            )
        kl = _module_head_kl(head, ref_head, h_sel, hr_sel, tr, tau, chunk_size)
    dense = kl.to(acc).new_zeros(b * (t - 1)).index_put((idx,), kl.to(acc))
    return torch.cat([dense.new_zeros(b, 1), dense.view(b, t - 1)], dim=1)


# --------------------------------------------------------------------------------------------------------------
# Pairs of sequence log-probs (the reductions themselves live in prefopt.masked)
# --------------------------------------------------------------------------------------------------------------


def pair_seq_logps(
    model: Any,
    batch: PairBatch | Mapping[str, Tensor],
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    temperature: float = 1.0,
) -> PairLogps:
    """Chosen / rejected sequence log-probs and lengths of a collated preference batch, in one forward.

    ``batch`` is a [`PairBatch`][prefopt.types.PairBatch] (or a dict with its keys ``input_ids`` ``(2B, T)``,
    optional ``attention_mask`` ``(2B, T)`` and bool ``completion_mask`` ``(2B, T)``); rows ``0..B-1`` are the
    chosen sequences and ``B..2B-1`` the rejected ones. [`pair_logps`][prefopt.logprobs.pair_logps] adds the
    reference log-probs.

    Returns:
        [`PairLogps`][prefopt.types.PairLogps] with ``chosen``/``rejected`` ``= S(y)`` (float32 ``(B,)``; float64
        for a float64 model) and ``chosen_len``/``rejected_len`` ``= |y|`` (int64), no reference fields.
    """
    attention_mask: Tensor | None
    ids, attention_mask, mask = unpack_pair_batch(batch)
    if not isinstance(batch, PairBatch):  # a PairBatch checked its shapes when it was built
        check_tensor("batch.input_ids", ids, ndim=2, floating=False)
        if ids.shape[0] % 2 or ids.shape[0] == 0:
            raise ValueError(
                f"batch.input_ids must have an even, non-zero number of rows (B chosen then B rejected), "
                f"got {ids.shape[0]}"
            )
    logp = token_logps(model, ids, attention_mask, mask, chunk_size=chunk_size, temperature=temperature)
    s = seq_sum(logp, mask)
    n = seq_len(mask)
    half = ids.shape[0] // 2
    return PairLogps(chosen=s[:half], rejected=s[half:], chosen_len=n[:half], rejected_len=n[half:])


def _is_lora_policy(model: Any) -> bool:
    from prefopt.policy import is_lora_policy  # lazy: prefopt.policy imports this module

    return is_lora_policy(model)


def pair_logps(
    policy: Any,
    batch: PairBatch | SharedPromptBatch,
    *,
    reference: Any = True,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    temperature: float = 1.0,
    method: str = "packed",
) -> PairLogps:
    """The [`PairLogps`][prefopt.types.PairLogps] of a preference batch — policy log-probs with gradient, and
    the reference's without — whichever forward the batch's layout calls for.

    A [`PairBatch`][prefopt.types.PairBatch] (duplicated layout) goes through
    [`pair_seq_logps`][prefopt.logprobs.pair_seq_logps]; a [`SharedPromptBatch`][prefopt.types.SharedPromptBatch]
    through ``prefopt.shared_prefix.shared_prompt_pair_logps`` (each prompt run
    once). The reference forward runs under ``torch.no_grad()`` and FIRST, so that its transient buffers are
    freed before the policy's activations are held for backward.

    Args:
        policy: a [`LoraPolicy`][prefopt.policy.LoraPolicy] (its ``model`` is the policy, its
            ``reference()`` context the reference), or a plain causal LM (a transformers model or a peft model
            wrapping one).
        batch: the collated batch, ``B`` pairs.
        reference: ``True`` (default): the ``LoraPolicy``'s own reference (adapters off); ``"anchor"``: its
            EMA anchor adapter as the reference (TR-DPO's moving reference, see
            [`reference_sync_`][prefopt.policy.reference_sync_]); for a plain model
            ``True`` is an error — pass the reference model itself (any model ``policy`` may be, a
            ``LoraPolicy`` included, whose policy view is then used). ``False`` / ``None``: no reference
            (``ref_chosen``/``ref_rejected`` are ``None``, for reference-free losses).
        chunk_size: completion tokens per LM-head chunk (default ``DEFAULT_CHUNK_SIZE``).
        temperature: ``τ > 0`` dividing the final logits of both the policy and the reference (default 1).
        method: the shared-prompt forward, ``"packed"`` (default) or ``"cache"``; ignored for a ``PairBatch``.

    Returns:
        ``PairLogps`` with ``chosen``/``rejected`` ``= S(y)`` ``(B,)`` (float32; float64 for a float64 model),
        ``ref_chosen``/``ref_rejected`` ``= S_ref(y)`` (detached, the policy's dtype) or ``None``, and
        ``chosen_len``/``rejected_len`` ``= |y|`` (int64). ``S(y) = Σ_t m_t log π(y_t | x, y_<t)``, the sequence
        log-likelihood of DPO (Rafailov et al., 2023, arXiv 2305.18290, Eq. 7).

    Raises:
        TypeError: ``batch`` is neither batch type, or ``reference=True`` for a model that is not a ``LoraPolicy``.
    """
    if isinstance(batch, PairBatch):

        def run(model: Any) -> PairLogps:
            return pair_seq_logps(model, batch, chunk_size=chunk_size, temperature=temperature)

    elif isinstance(batch, SharedPromptBatch):
        from prefopt.shared_prefix import shared_prompt_pair_logps  # lazy: shared_prefix imports this module

        def run(model: Any) -> PairLogps:
            return shared_prompt_pair_logps(
                model, batch, chunk_size=chunk_size, temperature=temperature, method=method
            )

    else:
        raise TypeError(f"batch must be a PairBatch or a SharedPromptBatch, got {type(batch).__name__}")
    is_policy = _is_lora_policy(policy)
    if reference is True and not is_policy:
        raise TypeError(
            f"reference=True needs a LoraPolicy (its adapters-off view is the reference); {type(policy).__name__} "
            "is not one: pass the reference model as reference=..., or reference=False"
        )
    if reference == "anchor" and not is_policy:
        raise TypeError(f'reference="anchor" needs a LoraPolicy, got {type(policy).__name__}')
    ref: PairLogps | None = None
    if reference is True:
        with policy.reference():
            ref = run(policy.model)
    elif isinstance(reference, str) and reference == "anchor":  # TR-DPO: the moving reference
        with policy.anchor():
            ref = run(policy.model)
    elif reference is not None and reference is not False:
        with torch.no_grad():
            ref = run(reference.model if _is_lora_policy(reference) else reference)
    pol = run(policy.model if is_policy else policy)
    if ref is None:
        return pol
    return dataclasses.replace(
        pol,
        ref_chosen=ref.chosen.detach().to(pol.chosen.dtype),
        ref_rejected=ref.rejected.detach().to(pol.chosen.dtype),
    )
