"""Tests for prefopt.shared_prefix: the shared-prompt forward against the duplicated forward and a per-row loop."""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import Tensor

from prefopt.data import SharedPromptCollator, split_shared_prompt
from prefopt.logprobs import pair_logps, pair_seq_logps, token_logps
from prefopt.policy import LoraPolicy
from prefopt.shared_prefix import (
    SUPPORTED_MODEL_TYPES,
    shared_prompt_pair_logps,
    shared_prompt_token_logps,
    unsplit_shared_prompt,
)
from prefopt.testing import char_tokenizer, tiny_causal_lm
from prefopt.types import PairBatch, PairLogps, SharedPromptBatch

peft = pytest.importorskip("peft")

DATA = Path(__file__).parents[1] / "../shared/data"
METHODS = ["packed", "cache"]

ROWS = [  # uneven prompts and completions: the padding hole differs per row
    {
        "prompt": "Human: Hello there, how do you do?\n\nAssistant:",
        "chosen": " Fine, thanks.",
        "rejected": " Go away",
    },
    {"prompt": "Q: 2+2?\nA:", "chosen": " 4", "rejected": " five, or maybe six"},
    {"prompt": "Hi", "chosen": " there! How can I help you today?", "rejected": " no"},
]


@functools.lru_cache(maxsize=1)
def _tok() -> Any:
    return char_tokenizer()


def _batch(rows: list[dict[str, str]] = ROWS) -> tuple[SharedPromptBatch, PairBatch]:
    """(shared batch, duplicated batch) from ONE collator call."""
    out = SharedPromptCollator(_tok(), keep_duplicated=True)(rows)
    assert out.duplicated is not None
    return out, out.duplicated


def _lora_policy(arch: str = "llama", dtype: torch.dtype = torch.float32, seed: int = 0) -> LoraPolicy:
    """Tiny model + LoRA whose B factors are random (a zero-initialized B would make the adapter invisible)."""
    model = tiny_causal_lm(arch, vocab_size=len(_tok()), seed=seed).to(dtype)
    policy = LoraPolicy(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in policy.model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return policy


def _shared_tokens(model: Any, shared: SharedPromptBatch, **kw: Any) -> Tensor:
    return shared_prompt_token_logps(
        model,
        shared.prompt_ids,
        shared.prompt_mask,
        shared.completion_ids,
        shared.completion_mask,
        completion_attention_mask=shared.completion_attention_mask,
        **kw,
    )


def _naive_tokens(
    model: Any, ids: Tensor, am: Tensor | None, cm: Tensor | None, temperature: float = 1.0
) -> Tensor:
    """Oracle: the model's full logits, ``log_softmax`` in the model's dtype, gathered; 0 where not counted."""
    logits = model(input_ids=ids, attention_mask=am).logits / temperature
    lp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None])[..., 0]
    lp = torch.cat([lp.new_zeros(ids.shape[0], 1), lp], dim=1)
    return lp if cm is None else lp * cm


def _grads(model: Any) -> dict[str, Tensor]:
    out = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


# ------------------------------------------------------------------------------------------------------------
# layout
# ------------------------------------------------------------------------------------------------------------


def test_split_layout_matches_a_python_loop() -> None:
    shared, dup = _batch()
    b = len(ROWS)
    assert shared.prompt_ids.shape[0] == b and shared.completion_ids.shape[0] == 2 * b
    for r in range(2 * b):
        p, c = int(dup.prompt_len[r]), int(dup.completion_len[r])
        ids = dup.input_ids[r]
        assert int(shared.prompt_len[r % b]) == p
        assert shared.prompt_ids[r % b, :p].tolist() == ids[:p].tolist()
        assert shared.prompt_mask[r % b].tolist() == [1] * p + [0] * (shared.prompt_ids.shape[1] - p)
        assert shared.completion_ids[r, :c].tolist() == ids[p : p + c].tolist()
        assert shared.completion_mask[r, :c].tolist() == dup.completion_mask[r, p : p + c].tolist()
        assert shared.completion_mask[r, :c].all() and not shared.completion_mask[r, c:].any()
    # and back: unsplit of the completion ids gives the duplicated ids on completion positions
    back = unsplit_shared_prompt(shared, shared.completion_ids)
    t = min(back.shape[1], dup.input_ids.shape[1])
    assert torch.equal(
        back[:, :t] * dup.completion_mask[:, :t], dup.input_ids[:, :t] * dup.completion_mask[:, :t]
    )


def test_split_rejects_mismatched_prompts_and_bad_padding() -> None:
    _, dup = _batch()
    bad = dataclasses.replace(dup, input_ids=dup.input_ids.clone())
    bad.input_ids[len(ROWS), 0] += 1  # rejected twin of row 0 gets another first prompt token
    with pytest.raises(ValueError, match="share the same prompt ids"):
        split_shared_prompt(bad)
    left = dataclasses.replace(dup, attention_mask=dup.attention_mask.flip(1))
    with pytest.raises(ValueError, match="right-padded"):
        split_shared_prompt(left)
    with pytest.raises(KeyError, match="prompt_len"):
        split_shared_prompt({k: v for k, v in vars(dup).items() if k != "prompt_len"})
    odd = {k: v[:3] if v.shape[0] == 2 * len(ROWS) else v for k, v in vars(dup).items()}
    with pytest.raises(ValueError, match="even"):
        split_shared_prompt(odd)


# ------------------------------------------------------------------------------------------------------------
# exactness
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_fp32_lora_tokens_and_gradients_match_duplicated_forward(method: str) -> None:
    """The issue's bar: ≤ 1e-5 on per-token log-probs and on every LoRA gradient (fp32, uneven prompts)."""
    shared, dup = _batch()
    policy = _lora_policy()
    model = policy.model
    w = torch.randn(len(ROWS) * 2, generator=torch.Generator().manual_seed(3))

    ref = token_logps(model, dup.input_ids, dup.attention_mask, dup.completion_mask)
    assert isinstance(ref, Tensor)
    (ref.sum(1) * w).sum().backward()
    g_ref = _grads(model)

    mine = _shared_tokens(model, shared, method=method)
    (mine.sum(1) * w).sum().backward()
    g_mine = _grads(model)

    placed = unsplit_shared_prompt(shared, mine)
    t = dup.input_ids.shape[1]
    assert placed.shape[1] >= t and placed[:, t:].abs().max() == 0 if placed.shape[1] > t else True
    assert (ref != 0).sum() == dup.completion_mask.sum()  # the oracle scores every completion token
    torch.testing.assert_close(placed[:, :t], ref, rtol=0, atol=1e-5)
    assert set(g_ref) == set(g_mine) and all("lora_" in n for n in g_ref) and len(g_ref) > 0
    for name in g_ref:
        scale = max(1.0, float(g_ref[name].abs().max()))
        assert float((g_ref[name] - g_mine[name]).abs().max()) <= 1e-5 * scale, name
    # a real signal: the adapters get a non-trivial gradient
    assert max(float(g.abs().max()) for g in g_ref.values()) > 1e-3


# Llama/Qwen2/Mistral/Gemma compute RMSNorm in float32 even in a float64 model (``hidden.to(torch.float32)``), so
# their backward rounds gradients to float32 where gradient paths merge; the prompt's gradient is summed in another
# order here (once through the repeated cache instead of twice through duplicated rows): ~3e-8 relative (measured),
# bounded at 1e-6. GPT-2 and GPT-NeoX are float64 throughout: exact to 1e-12.
GRAD_RTOL = {"llama": 1e-6, "qwen2": 1e-6, "mistral": 1e-6, "gemma": 1e-6, "gpt2": 1e-12, "gpt_neox": 1e-12}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch", sorted(SUPPORTED_MODEL_TYPES))
def test_float64_every_supported_arch(arch: str, method: str) -> None:
    shared, dup = _batch()
    model = tiny_causal_lm(arch, vocab_size=len(_tok()), seed=1, tie_word_embeddings=arch == "gemma").double()
    ref = _naive_tokens(model, dup.input_ids, dup.attention_mask, dup.completion_mask)
    ref.sum().backward()
    g_ref = _grads(model)
    mine = _shared_tokens(model, shared, method=method)
    assert mine.dtype == torch.float64
    mine.sum().backward()
    g_mine = _grads(model)
    t = dup.input_ids.shape[1]
    torch.testing.assert_close(unsplit_shared_prompt(shared, mine)[:, :t], ref, rtol=0, atol=1e-10)
    assert set(g_ref) == set(g_mine) and len(g_ref) > 0
    for name in g_ref:  # full fine-tuning: every backbone/head weight, tied embeddings too for gemma
        scale = float(g_ref[name].abs().max())
        err = float((g_mine[name] - g_ref[name]).abs().max())
        assert err <= GRAD_RTOL[arch] * max(scale, 1e-3), (name, err, scale)


@pytest.mark.parametrize("method", METHODS)
def test_k_completions_per_prompt_against_unpadded_row_loop(method: str) -> None:
    """Slow obvious oracle: row r = prompt (r mod B) ++ completion r, ONE unpadded sequence per forward."""
    gen = torch.Generator().manual_seed(7)
    model = tiny_causal_lm("llama", vocab_size=50, seed=2).double()
    p_lens, b, k = [4, 1, 6], 3, 3
    c_lens = [int(x) for x in torch.randint(1, 6, (k * b,), generator=gen)]
    prompts = [torch.randint(3, 50, (n,), generator=gen) for n in p_lens]
    comps = [torch.randint(3, 50, (n,), generator=gen) for n in c_lens]
    pid = torch.zeros(b, max(p_lens), dtype=torch.long)
    pm = torch.zeros_like(pid)
    for i, x in enumerate(prompts):
        pid[i, : len(x)], pm[i, : len(x)] = x, 1
    cid = torch.zeros(k * b, max(c_lens), dtype=torch.long)
    cm = torch.zeros_like(cid, dtype=torch.bool)
    for r, x in enumerate(comps):
        cid[r, : len(x)], cm[r, : len(x)] = x, True
    mine = shared_prompt_token_logps(model, pid, pm, cid, cm, method=method)
    for r in range(k * b):
        seq = torch.cat([prompts[r % b], comps[r]])[None]
        want = _naive_tokens(model, seq, None, None)[0, len(prompts[r % b]) :]
        torch.testing.assert_close(mine[r, : len(comps[r])], want, rtol=0, atol=1e-10)
        assert mine[r, len(comps[r]) :].abs().max() == 0 if len(comps[r]) < mine.shape[1] else True


@pytest.mark.parametrize("method", METHODS)
def test_pair_logps_equals_pair_seq_logps_and_grads_reach_prompt_forward(method: str) -> None:
    shared, dup = _batch()
    policy = _lora_policy(dtype=torch.float64, seed=4)
    a = pair_seq_logps(policy.model, dup)
    s = shared_prompt_pair_logps(policy.model, shared, method=method)
    # both paths keep float64 for a float64 model
    assert a.chosen.dtype == torch.float64 and s.chosen.dtype == torch.float64
    torch.testing.assert_close(s.chosen, a.chosen, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(s.rejected, a.rejected, rtol=1e-9, atol=1e-9)
    naive = _naive_tokens(policy.model, dup.input_ids, dup.attention_mask, dup.completion_mask).sum(1)
    torch.testing.assert_close(torch.cat([s.chosen, s.rejected]), naive, rtol=0, atol=1e-10)
    assert s.chosen_len is not None and a.chosen_len is not None
    assert s.rejected_len is not None and a.rejected_len is not None
    assert torch.equal(s.chosen_len, a.chosen_len) and torch.equal(s.rejected_len, a.rejected_len)
    # reference (adapters off) under no_grad equals the base model
    with policy.reference():
        ref_s = shared_prompt_pair_logps(policy.model, shared, method=method)
        ref_a = pair_seq_logps(policy.model, dup)
    assert not ref_s.chosen.requires_grad
    torch.testing.assert_close(ref_s.chosen, ref_a.chosen.double(), rtol=1e-6, atol=1e-6)
    assert float((ref_s.chosen - s.chosen).abs().max()) > 1e-3  # the adapter matters


def _naive_pair(model: Any, ref_model: Any, dup: PairBatch, ref_ctx: Any) -> PairLogps:
    """Oracle: the hand-built PairLogps (full logits, per-row sums) with its reference under no_grad."""
    b = dup.num_pairs
    s = _naive_tokens(model, dup.input_ids, dup.attention_mask, dup.completion_mask).sum(1)
    with ref_ctx():
        s_ref = _naive_tokens(ref_model, dup.input_ids, dup.attention_mask, dup.completion_mask).sum(1)
    n = dup.completion_mask.sum(1)
    return PairLogps(s[:b], s[b:], s_ref[:b], s_ref[b:], n[:b], n[b:])


def _check_pair_logps(got: PairLogps, want: PairLogps, params: list[Tensor]) -> None:
    for name in ("chosen", "rejected", "ref_chosen", "ref_rejected"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=0, atol=1e-10)
    assert got.chosen_len is not None and want.chosen_len is not None
    assert got.rejected_len is not None and want.rejected_len is not None
    assert torch.equal(got.chosen_len, want.chosen_len) and torch.equal(got.rejected_len, want.rejected_len)
    assert got.ref_chosen is not None and got.ref_rejected is not None
    assert not got.ref_chosen.requires_grad and not got.ref_rejected.requires_grad
    # a loss that weighs every field differently; the reference never carries gradient
    w = torch.linspace(0.5, 1.5, got.chosen.shape[0], dtype=torch.float64)

    def loss(x: PairLogps) -> Tensor:
        assert x.ref_chosen is not None and x.ref_rejected is not None
        return (w * (x.chosen - 0.7 * x.rejected + x.ref_chosen * x.chosen - x.ref_rejected)).sum()

    g_got = torch.autograd.grad(loss(got), params)
    g_want = torch.autograd.grad(loss(want), params)
    assert any(float(g.abs().max()) > 0 for g in g_want)
    for a, b in zip(g_got, g_want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("layout", ["duplicated", "packed", "cache"])
def test_pair_logps_lora_policy_equals_hand_built(layout: str) -> None:
    """pair_logps(LoraPolicy, batch) == the hand-built PairLogps (policy forward + reference() forward), value
    and gradient, for the duplicated batch and both shared-prompt forwards."""
    shared, dup = _batch()
    policy = _lora_policy(arch="gpt2", dtype=torch.float64, seed=6)
    batch: PairBatch | SharedPromptBatch = dup if layout == "duplicated" else shared
    got = pair_logps(policy, batch, chunk_size=3, method="cache" if layout == "cache" else "packed")
    want = _naive_pair(policy.model, policy.model, dup, policy.reference)
    assert float((want.chosen - want.ref_chosen).abs().max()) > 1e-3  # the adapter matters  # type: ignore[operator]
    params = [p for p in policy.parameters() if p.requires_grad]
    _check_pair_logps(got, want, params)
    # reference=False: the same policy fields and no reference
    bare = pair_logps(policy, batch, reference=False)
    assert not bare.has_reference
    torch.testing.assert_close(bare.chosen, want.chosen, rtol=0, atol=1e-10)


@pytest.mark.parametrize("layout", ["duplicated", "packed"])
def test_pair_logps_plain_model_with_separate_reference(layout: str) -> None:
    shared, dup = _batch()
    model = tiny_causal_lm("gpt2", vocab_size=len(_tok()), seed=7).double()
    ref_model = tiny_causal_lm("gpt2", vocab_size=len(_tok()), seed=8).double()
    batch: PairBatch | SharedPromptBatch = dup if layout == "duplicated" else shared
    got = pair_logps(model, batch, reference=ref_model, temperature=1.0)
    want = _naive_pair(model, ref_model, dup, torch.no_grad)
    _check_pair_logps(got, want, [p for p in model.parameters() if p.requires_grad])
    assert all(p.grad is None for p in ref_model.parameters())
    # temperature reaches both forwards
    hot = pair_logps(model, batch, reference=ref_model, temperature=2.0)
    b = dup.num_pairs
    s = _naive_tokens(ref_model, dup.input_ids, dup.attention_mask, dup.completion_mask, 2.0).sum(1)
    torch.testing.assert_close(hot.ref_chosen, s[:b].detach(), rtol=0, atol=1e-10)
    with pytest.raises(TypeError, match="reference=True needs a LoraPolicy"):
        pair_logps(model, batch)
    with pytest.raises(TypeError, match="PairBatch or a SharedPromptBatch"):
        pair_logps(model, vars(dup), reference=ref_model)  # type: ignore[arg-type]


@pytest.mark.parametrize("method", METHODS)
def test_gradcheck_float64_through_prompt_cache(method: str) -> None:
    """torch.autograd.gradcheck w.r.t. one LoRA factor on the attention projection of every token.

    GPT-2 is float64 throughout (the Llama family computes RMSNorm in float32, which makes finite differences
    meaningless at float64 step sizes)."""
    model = tiny_causal_lm("gpt2", vocab_size=40, hidden_size=16, num_layers=2, seed=5).double()
    cfg = peft.LoraConfig(r=2, lora_alpha=2, target_modules=["c_attn"], fan_in_fan_out=True)
    policy = LoraPolicy(model, cfg)
    name = next(n for n, _ in policy.model.named_parameters() if "h.0.attn.c_attn.lora_B" in n)
    a0 = dict(policy.model.named_parameters())[name].detach().clone().normal_(0, 0.5).requires_grad_(True)
    pid = torch.tensor([[5, 6, 7, 8], [9, 10, 0, 0]])
    pm = (pid != 0).long()
    cid = torch.tensor([[11, 12, 0], [13, 14, 15], [16, 0, 0], [17, 18, 19]])
    cm = cid != 0

    class Wrapper(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = policy.model

        def forward(self) -> Tensor:
            return shared_prompt_token_logps(self.inner, pid, pm, cid, cm, method=method)

    wrapper = Wrapper()

    def f(param: Tensor) -> Tensor:
        out = torch.func.functional_call(wrapper, {f"inner.{name}": param}, ())
        assert isinstance(out, Tensor)
        return out

    assert torch.autograd.gradcheck(f, (a0,), eps=1e-6, atol=1e-7)
    # only keys/values of the PROMPT can carry this gradient to completion token 0 of each row
    g = torch.autograd.grad(f(a0)[:, 0].sum(), a0)[0]
    assert float(g.abs().max()) > 1e-4


def test_temperature_and_extreme_logits_match() -> None:
    shared, dup = _batch()
    model = tiny_causal_lm("llama", vocab_size=len(_tok()), seed=6).double()
    with torch.no_grad():
        model.lm_head.weight.mul_(3000.0)  # log-probs of order −1e4
    for tau in (1.0, 0.7):
        ref = _naive_tokens(model, dup.input_ids, dup.attention_mask, dup.completion_mask, tau)
        mine = _shared_tokens(model, shared, temperature=tau)
        t = dup.input_ids.shape[1]
        assert float(ref.min()) < -1e3
        torch.testing.assert_close(unsplit_shared_prompt(shared, mine)[:, :t], ref, rtol=1e-12, atol=1e-10)


@pytest.mark.parametrize("method", METHODS)
def test_bf16_model_close_to_duplicated_forward(method: str) -> None:
    shared, dup = _batch()
    model = tiny_causal_lm("llama", vocab_size=len(_tok()), seed=8).to(torch.bfloat16)
    ref = token_logps(model, dup.input_ids, dup.attention_mask, dup.completion_mask)
    assert isinstance(ref, Tensor)
    mine = _shared_tokens(model, shared, method=method)
    assert mine.dtype == torch.float32 and bool(torch.isfinite(mine).all())
    t = dup.input_ids.shape[1]
    # bf16 (8 bits of mantissa): the two paths round differently; measured max |diff| 4e-6 .. 5e-4 over seeds
    # 8, 1, 2 on log-probs of about −4.9 (uniform over 106 tokens); bound 5e-3 (0.1 %)
    torch.testing.assert_close(unsplit_shared_prompt(shared, mine)[:, :t], ref, rtol=0, atol=5e-3)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    p_lens=st.lists(st.integers(1, 7), min_size=1, max_size=3),
    c_extra=st.lists(st.integers(1, 6), min_size=6, max_size=6),
    seed=st.integers(0, 2**16),
    method=st.sampled_from(METHODS),
)
def test_property_random_lengths_match_duplicated(
    p_lens: list[int], c_extra: list[int], seed: int, method: str
) -> None:
    gen = torch.Generator().manual_seed(seed)
    model = _hyp_model()
    b = len(p_lens)
    c_lens = c_extra[: 2 * b]
    prompts = [torch.randint(3, 50, (n,), generator=gen) for n in p_lens]
    comps = [torch.randint(3, 50, (n,), generator=gen) for n in c_lens]
    t = max(p_lens[r % b] + c_lens[r] for r in range(2 * b))
    ids = torch.zeros(2 * b, t, dtype=torch.long)
    am, cmask = torch.zeros_like(ids), torch.zeros(2 * b, t, dtype=torch.bool)
    for r in range(2 * b):
        p, c = prompts[r % b], comps[r]
        ids[r, : len(p)], ids[r, len(p) : len(p) + len(c)] = p, c
        am[r, : len(p) + len(c)], cmask[r, len(p) : len(p) + len(c)] = 1, True
    dup = {
        "input_ids": ids,
        "attention_mask": am,
        "completion_mask": cmask,
        "prompt_len": torch.tensor([p_lens[r % b] for r in range(2 * b)]),
    }
    shared = split_shared_prompt(dup)
    ref = _naive_tokens(model, ids, am, cmask)
    mine = _shared_tokens(model, shared, chunk_size=3, method=method)
    placed = unsplit_shared_prompt(shared, mine)
    torch.testing.assert_close(placed[:, :t], ref, rtol=0, atol=1e-10)
    assert placed.shape[1] == t or float(placed[:, t:].abs().max()) == 0


@functools.lru_cache(maxsize=1)
def _hyp_model() -> Any:
    return tiny_causal_lm("qwen2", vocab_size=50, seed=9).double()


# ------------------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------------------


def test_bad_inputs_name_the_argument() -> None:
    model = tiny_causal_lm("llama", vocab_size=50, seed=0)
    pid = torch.tensor([[5, 6, 7], [8, 9, 0]])
    pm = (pid != 0).long()
    cid = torch.tensor([[5, 6], [7, 0], [8, 9], [9, 0]])
    cm = cid != 0

    def call(**kw: Any) -> Tensor:
        args: dict[str, Any] = {
            "prompt_ids": pid,
            "prompt_mask": pm,
            "completion_ids": cid,
            "completion_mask": cm,
        }
        args.update(kw)
        return shared_prompt_token_logps(model, **args)

    assert call().shape == (4, 2)
    cases: list[tuple[dict[str, Any], type[Exception], str]] = [
        ({"prompt_ids": pid.float()}, TypeError, "prompt_ids"),
        ({"prompt_ids": pid[0]}, ValueError, "prompt_ids"),
        ({"completion_ids": cid[:3]}, ValueError, "multiple of the 2 prompt rows"),
        ({"prompt_mask": pm.flip(1)}, ValueError, "prompt_mask must be right-padded"),
        ({"prompt_mask": pm[:, :2]}, ValueError, "prompt_mask has shape"),
        ({"prompt_mask": pm * 2}, ValueError, "prompt_mask must hold only 0 and 1"),
        ({"prompt_mask": torch.tensor([[1, 1, 1], [0, 0, 0]])}, ValueError, "no real token"),
        ({"completion_mask": cm.long()}, TypeError, "completion_mask must be a bool"),
        ({"completion_mask": cm.flip(1)}, ValueError, "completion_mask must be right-padded"),
        (
            {"completion_attention_mask": torch.tensor([[1, 1], [1, 0], [1, 1], [0, 0]])},
            ValueError,
            "completion_attention_mask is 0",
        ),
        ({"completion_ids": cid + 100}, ValueError, "completion_ids must lie in"),
        ({"prompt_ids": pid - 1}, ValueError, "prompt_ids must lie in"),
        ({"chunk_size": 0}, ValueError, "chunk_size"),
        ({"temperature": 0.0}, ValueError, "temperature"),
        ({"method": "fast"}, ValueError, "method must be 'packed' or 'cache'"),
    ]
    for kw, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            call(**kw)
    with pytest.raises(TypeError, match=r"torch\.nn\.Module"):
        shared_prompt_token_logps("not a model", pid, pm, cid, cm)
    with pytest.raises(KeyError, match="completion_ids"):
        shared_prompt_pair_logps(model, {"prompt_ids": pid, "prompt_mask": pm, "completion_mask": cm})
    with pytest.raises(ValueError, match="2 × 2 rows"):
        shared_prompt_pair_logps(
            model,
            {"prompt_ids": pid, "prompt_mask": pm, "completion_ids": cid[:2], "completion_mask": cm[:2]},
        )


def test_unsupported_model_and_short_sliding_window_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    pid = torch.tensor([[5, 6, 7, 8, 9]])
    pm = torch.ones_like(pid)
    cid = torch.tensor([[5, 6, 7], [8, 9, 10]])
    cm = torch.ones_like(cid, dtype=torch.bool)
    model = tiny_causal_lm("llama", vocab_size=50, seed=0)
    monkeypatch.setattr(model.config, "model_type", "bloom", raising=False)
    with pytest.raises(ValueError, match="does not support model_type='bloom'"):
        shared_prompt_token_logps(model, pid, pm, cid, cm)
    mistral = tiny_causal_lm("mistral", vocab_size=50, seed=0, sliding_window=4)
    for method in METHODS:
        with pytest.raises(ValueError, match="sliding attention window \\(4\\)"):
            shared_prompt_token_logps(mistral, pid, pm, cid, cm, method=method)
    wide = tiny_causal_lm("mistral", vocab_size=50, seed=0, sliding_window=64)
    assert shared_prompt_token_logps(wide, pid, pm, cid, cm).shape == (2, 3)


# ------------------------------------------------------------------------------------------------------------
# real data
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.data
@pytest.mark.parametrize("method", METHODS)
def test_hh_rlhf_rows_exact_fp32(method: str) -> None:
    """HH-RLHF helpful-base pairs (long prompts), char tokenizer, tiny Llama + LoRA: exact as above."""
    path = DATA / "hh-rlhf" / "helpful-base.test.jsonl.gz"
    if not path.exists():
        pytest.skip(f"{path} not found (../shared/data is not part of the repo)")
    from prefopt.data import load_preferences

    ds = load_preferences(str(path))
    rows = [ds[i] for i in range(4)]
    out = SharedPromptCollator(_tok(), keep_duplicated=True, max_length=192, max_prompt_length=128)(rows)
    dup, shared = out.duplicated, out
    assert dup is not None
    assert int(shared.prompt_len.min()) > 20  # a real shared prefix
    policy = _lora_policy(seed=10)
    with torch.no_grad():
        ref = token_logps(policy.model, dup.input_ids, dup.attention_mask, dup.completion_mask)
        mine = _shared_tokens(policy.model, shared, method=method)
    assert isinstance(ref, Tensor)
    t = dup.input_ids.shape[1]
    torch.testing.assert_close(unsplit_shared_prompt(shared, mine)[:, :t], ref, rtol=0, atol=1e-5)
