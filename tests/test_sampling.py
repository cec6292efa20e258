"""Tests for prefopt.sampling: EOS cut, packing, the HF sampler and its log-probs.

Oracles: a Python loop for the EOS mask; per-prompt unpadded greedy generation for left-padded batches;
``log_softmax(logits / τ)`` of the logits that ``generate`` itself returned (KV cache, left padding) for the
recomputed behaviour log-probs; a deep copy of the base model taken before wrapping for reference log-probs.
"""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from prefopt.logprobs import token_logps
from prefopt.policy import LoraPolicy
from prefopt.sampling import (
    HFSampler,
    Rollout,
    Sampler,
    completion_mask_after_eos,
    pack_rollout,
    score_rollout,
)
from prefopt.testing import char_tokenizer, tiny_causal_lm

VOCAB = 128
EOS = 1
PAD = 0


def lora_cfg() -> peft.LoraConfig:
    return peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0, bias="none")


def perturbed_policy(seed: int = 0, dtype: torch.dtype = torch.float32) -> tuple[LoraPolicy, torch.nn.Module]:
    """A LoraPolicy whose adapter is non-zero (policy != reference) and a deep copy of its base model."""
    base = tiny_causal_lm("llama", vocab_size=VOCAB, seed=seed).to(dtype)
    base_copy = copy.deepcopy(base)
    policy = LoraPolicy(base, lora_cfg())
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return policy, base_copy


def left_padded(rows: list[list[int]]) -> dict[str, torch.Tensor]:
    t = max(map(len, rows))
    ids = torch.full((len(rows), t), PAD, dtype=torch.long)
    mask = torch.zeros((len(rows), t), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, t - len(r) :] = torch.tensor(r)
        mask[i, t - len(r) :] = 1
    return {"input_ids": ids, "attention_mask": mask}


PROMPTS = [[5, 9, 17, 33, 40, 41], [7, 8], [60, 61, 62, 10], [99]]


# --------------------------------------------------------------------------------------------- EOS mask


def mask_oracle(ids: list[list[int]], eos: set[int]) -> list[list[bool]]:
    out = []
    for row in ids:
        seen, m = False, []
        for tok in row:
            m.append(not seen)
            seen = seen or tok in eos
        out.append(m)
    return out


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.lists(st.integers(0, 5), min_size=4, max_size=4), min_size=1, max_size=5),
    st.sets(st.integers(0, 5), max_size=2),
)
def test_completion_mask_after_eos_matches_loop(rows, eos):
    ids = torch.tensor(rows)
    got = completion_mask_after_eos(ids, sorted(eos) or None)
    assert got.dtype == torch.bool
    assert got.tolist() == mask_oracle(rows, eos)


def test_completion_mask_hand_example():
    ids = torch.tensor([[4, 1, 1, 3], [4, 4, 4, 4], [1, 0, 0, 0]])
    assert completion_mask_after_eos(ids, 1).tolist() == [
        [True, True, False, False],
        [True, True, True, True],
        [True, False, False, False],
    ]


def test_completion_mask_bad_input():
    with pytest.raises(ValueError, match="completion_ids"):
        completion_mask_after_eos(torch.tensor([1, 2]), 1)
    with pytest.raises(ValueError, match="eos_token_id"):
        completion_mask_after_eos(torch.tensor([[1, 2]]), -3)


# --------------------------------------------------------------------------------------------- packing


def test_pack_rollout_layout_and_eos_cut():
    r = pack_rollout(
        [[5, 6, 7], [5, 6, 7], [8], [8]],
        [[10, 1, 11, 12], [10, 11, 12, 13], [1, 0, 0, 0], [20, 21]],
        eos_token_id=1,
        pad_token_id=0,
        num_samples=2,
    )
    assert r.input_ids.tolist() == [
        [5, 6, 7, 10, 1, 0, 0],
        [5, 6, 7, 10, 11, 12, 13],
        [8, 1, 0, 0, 0, 0, 0],
        [8, 20, 21, 0, 0, 0, 0],
    ]
    assert r.completion_mask.tolist() == [
        [False, False, False, True, True, False, False],
        [False, False, False, True, True, True, True],
        [False, True, False, False, False, False, False],
        [False, True, True, False, False, False, False],
    ]
    assert r.attention_mask.tolist() == [
        [1, 1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1, 1, 1],
        [1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0],
    ]
    assert r.finished.tolist() == [True, False, True, False]
    assert r.completion_len.tolist() == [2, 4, 1, 2]
    assert r.prompt_len.tolist() == [3, 3, 1, 1]
    assert r.prompt_index.tolist() == [0, 0, 1, 1]
    assert r.num_prompts == 2 and r.batch_size == 4
    assert r.completion_ids() == [[10, 1], [10, 11, 12, 13], [1], [20, 21]]
    assert r.prompt_ids() == [[5, 6, 7], [5, 6, 7], [8], [8]]
    assert r.grouped(torch.arange(4.0)).tolist() == [[0.0, 1.0], [2.0, 3.0]]
    assert r.logp is None and r.ref_logp is None


def test_pack_rollout_pad_equal_to_eos_and_tensor_input():
    # generate pads finished rows with pad_token_id; pad == eos (SmolLM2) must still cut at the FIRST eos
    r = pack_rollout([[3, 4]], torch.tensor([[9, 2, 2, 2]]), eos_token_id=2, pad_token_id=2)
    assert r.completion_ids() == [[9, 2]]
    assert r.input_ids.tolist() == [[3, 4, 9, 2]]
    assert r.completion_mask.tolist() == [[False, False, True, True]]


def test_pack_rollout_bad_input_names_argument():
    with pytest.raises(ValueError, match="completion_ids has 1 rows"):
        pack_rollout([[1], [2]], [[3]], eos_token_id=1, pad_token_id=0)
    with pytest.raises(ValueError, match=r"prompt_ids\[1\] is empty"):
        pack_rollout([[1], []], [[3], [4]], eos_token_id=1, pad_token_id=0)
    with pytest.raises(ValueError, match=r"completion_ids\[0\] has no token"):
        pack_rollout([[1]], [[]], eos_token_id=1, pad_token_id=0)
    with pytest.raises(ValueError, match="multiple of num_samples"):
        pack_rollout([[1], [2], [3]], [[3], [4], [5]], eos_token_id=1, pad_token_id=0, num_samples=2)
    with pytest.raises(ValueError, match="num_samples"):
        pack_rollout([[1]], [[3]], eos_token_id=1, pad_token_id=0, num_samples=0)
    with pytest.raises(ValueError, match="pad_token_id"):
        pack_rollout([[1]], [[3]], eos_token_id=1, pad_token_id=-1)
    r = pack_rollout([[1]], [[3]], eos_token_id=1, pad_token_id=0)
    with pytest.raises(ValueError, match="leading dimension 1"):
        r.grouped(torch.zeros(2))


# --------------------------------------------------------------------------------------------- HF sampler


def test_sampler_satisfies_protocol_and_validates():
    model = tiny_causal_lm("llama", vocab_size=VOCAB)
    sampler = HFSampler(model, max_new_tokens=3, eos_token_id=EOS, pad_token_id=PAD)
    assert isinstance(sampler, Sampler)
    with pytest.raises(ValueError, match="temperature"):
        HFSampler(model, temperature=0.0, pad_token_id=PAD)
    with pytest.raises(ValueError, match="top_p"):
        HFSampler(model, top_p=1.5, pad_token_id=PAD)
    with pytest.raises(ValueError, match="max_new_tokens"):
        HFSampler(model, max_new_tokens=0, pad_token_id=PAD)
    with pytest.raises(ValueError, match="top_k"):
        HFSampler(model, top_k=-1, pad_token_id=PAD)
    with pytest.raises(ValueError, match="n must be"):
        sampler.generate(left_padded(PROMPTS), n=0)
    right = left_padded(PROMPTS)
    right = {k: v.flip(1) for k, v in right.items()}
    with pytest.raises(ValueError, match="LEFT-padded"):
        sampler.generate(right)
    with pytest.raises(ValueError, match="tokenizer"):
        sampler.generate(["hello"])


def test_greedy_left_padded_batch_equals_unpadded_prompts():
    policy, _ = perturbed_policy()
    sampler = HFSampler(policy, max_new_tokens=8, do_sample=False, eos_token_id=EOS, pad_token_id=PAD)
    batch = sampler.generate(left_padded(PROMPTS))
    for k, prompt in enumerate(PROMPTS):
        alone = sampler.generate(left_padded([prompt]))
        assert alone.completion_ids()[0] == batch.completion_ids()[k]
        assert alone.prompt_ids()[0] == prompt == batch.prompt_ids()[k]
        n = int(alone.completion_len[0])
        lp_alone = alone.logp[0, len(prompt) : len(prompt) + n]
        lp_batch = batch.logp[k, len(prompt) : len(prompt) + n]
        torch.testing.assert_close(lp_batch, lp_alone, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_behaviour_logps_equal_generate_logits(temperature):
    """Recomputed behaviour log-probs == log_softmax(generate's logits / τ) at the sampled tokens."""
    policy, _ = perturbed_policy(seed=3)
    prompts = left_padded(PROMPTS)
    eos = list(range(1, 30))  # many stop tokens: most rows finish early, exercising the EOS cut
    sampler = HFSampler(
        policy, max_new_tokens=10, temperature=temperature, eos_token_id=eos, pad_token_id=PAD
    )
    torch.manual_seed(11)
    rollout = sampler.generate(prompts, n=3)
    # same RNG stream through generate directly, keeping its logits
    from transformers import GenerationConfig

    torch.manual_seed(11)
    ids = prompts["input_ids"].repeat_interleave(3, 0)
    mask = prompts["attention_mask"].repeat_interleave(3, 0)
    cfg = GenerationConfig(
        max_new_tokens=10,
        do_sample=True,
        temperature=temperature,
        top_k=0,
        top_p=1.0,
        pad_token_id=PAD,
        eos_token_id=eos,
    )
    with torch.no_grad():
        out = policy.model.generate(
            input_ids=ids,
            attention_mask=mask,
            generation_config=cfg,
            output_logits=True,
            return_dict_in_generate=True,
        )
    new = out.sequences[:, ids.shape[1] :]
    logits = torch.stack(out.logits, dim=1).float()  # (b, c, V) raw logits, before temperature
    oracle = torch.log_softmax(logits / temperature, -1).gather(-1, new[..., None]).squeeze(-1)
    cmask = completion_mask_after_eos(new, eos)
    assert rollout.completion_ids() == [row[m].tolist() for row, m in zip(new, cmask)]
    assert any(rollout.finished.tolist()) and rollout.num_samples == 3
    for i in range(rollout.batch_size):
        p, n = int(rollout.prompt_len[i]), int(rollout.completion_len[i])
        torch.testing.assert_close(rollout.logp[i, p : p + n], oracle[i, :n], rtol=1e-4, atol=1e-4)
        assert rollout.logp[i, :p].abs().sum() == 0 and rollout.logp[i, p + n :].abs().sum() == 0
        # at most one EOS, and only as the last counted token
        comp = rollout.completion_ids()[i]
        assert sum(t in eos for t in comp) == int(rollout.finished[i])
        if rollout.finished[i]:
            assert comp[-1] in eos
        else:
            assert n == 10


def test_reference_logps_equal_deep_copied_base_model():
    policy, base_copy = perturbed_policy(seed=5)
    sampler = HFSampler(policy, max_new_tokens=6, eos_token_id=EOS, pad_token_id=PAD)
    torch.manual_seed(0)
    r = sampler.generate(left_padded(PROMPTS), n=2)
    assert r.ref_logp is not None and r.logp is not None
    oracle = token_logps(base_copy, r.input_ids, r.attention_mask, r.completion_mask)
    torch.testing.assert_close(r.ref_logp, oracle, rtol=1e-5, atol=1e-5)
    # and the policy really differs from the reference (the test above could not pass by accident)
    assert (r.logp - r.ref_logp).abs().max() > 1e-2
    # a separate reference model gives the same numbers; reference=None gives none
    r2 = score_rollout(r, policy, reference=base_copy)
    torch.testing.assert_close(r2.ref_logp, oracle, rtol=1e-5, atol=1e-5)
    assert score_rollout(r, policy, reference=None).ref_logp is None
    # chunked scoring equals whole-batch scoring
    r3 = score_rollout(r, policy, batch_size=3)
    torch.testing.assert_close(r3.logp, r.logp, rtol=1e-5, atol=1e-6)
    # the sampler leaves train/eval flags and adapter mode as they were
    assert policy.mode == "policy"


def test_sampler_restores_training_mode_and_chunks_with_progress():
    policy, _ = perturbed_policy(seed=7)
    policy.train()
    sampler = HFSampler(
        policy,
        max_new_tokens=4,
        do_sample=False,
        eos_token_id=EOS,
        pad_token_id=PAD,
        batch_size=2,
        progress=True,
    )
    whole = HFSampler(policy, max_new_tokens=4, do_sample=False, eos_token_id=EOS, pad_token_id=PAD)
    a = sampler.generate(left_padded(PROMPTS))
    b = whole.generate(left_padded(PROMPTS))
    assert a.completion_ids() == b.completion_ids()
    assert policy.model.training


def test_string_prompts_with_char_tokenizer():
    tok = char_tokenizer()
    model = tiny_causal_lm("llama", vocab_size=VOCAB)
    sampler = HFSampler(model, tok, max_new_tokens=5)
    torch.manual_seed(0)
    r = sampler.generate(["ab", "hello"], n=2)
    assert isinstance(r, Rollout) and r.batch_size == 4
    assert r.prompt_ids()[0] == tok("ab")["input_ids"] and r.prompt_ids()[2] == tok("hello")["input_ids"]
    assert r.ref_logp is None  # a plain model has no reference unless one is given
    assert all(isinstance(s, str) for s in r.completions(tok))


def sampled_ranks(policy: LoraPolicy, r: Rollout) -> torch.Tensor:
    """Rank (0 = most likely) of every counted completion token under the policy's logits."""
    with torch.no_grad():
        logits = policy.model(input_ids=r.input_ids, attention_mask=r.attention_mask).logits[:, :-1]
    tok = r.input_ids[:, 1:]
    chosen = logits.gather(-1, tok[..., None])
    ranks = (logits > chosen).sum(-1)
    return ranks[r.completion_mask[:, 1:]]


@pytest.mark.parametrize("top_k", [0, 5])
def test_top_k_zero_means_off_and_top_k_truncates(top_k):
    """transformers fills an unset top_k with 50; the sampler's top_k=0 must really turn it off."""
    policy, _ = perturbed_policy(seed=9)
    sampler = HFSampler(
        policy, max_new_tokens=10, temperature=5.0, top_k=top_k, eos_token_id=EOS, pad_token_id=PAD
    )
    torch.manual_seed(1)
    ranks = sampled_ranks(policy, sampler.generate(left_padded(PROMPTS), n=4))
    if top_k == 0:
        assert int(ranks.max()) >= 50  # near-uniform sampling over 128 tokens, ~160 draws
    else:
        assert int(ranks.max()) < top_k


def test_sampling_inside_the_anchor_context_scores_the_anchor_without_a_reference():
    """J-BOND samples from the anchor: ``reference="auto"`` must not try to nest ``reference()`` there."""
    policy, _ = perturbed_policy(seed=7)
    policy.update_anchor_(0.5)  # anchor halfway between reference and policy: a third distribution
    sampler = HFSampler(policy, max_new_tokens=5, eos_token_id=EOS, pad_token_id=PAD)
    torch.manual_seed(0)
    with policy.anchor():
        r = sampler.generate(left_padded(PROMPTS), n=2)
        assert policy.mode == "anchor"
        oracle = token_logps(policy.model, r.input_ids, r.attention_mask, r.completion_mask)
    assert r.ref_logp is None and r.logp is not None
    torch.testing.assert_close(r.logp, oracle, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        policy_logp = token_logps(policy.model, r.input_ids, r.attention_mask, r.completion_mask)
    assert (policy_logp - r.logp).abs().max() > 1e-3  # the anchor's numbers, not the policy's
    assert policy.mode == "policy"


def test_merged_sampling_draws_the_same_tokens_and_scores_unmerged():
    """``merged=True`` samples the same distribution (float64: the same tokens for the same seed) and the
    behaviour log-probs still come from the unmerged policy — the function the losses train."""
    policy, _ = perturbed_policy(seed=3, dtype=torch.float64)
    kw = {"max_new_tokens": 8, "eos_token_id": EOS, "pad_token_id": PAD}
    torch.manual_seed(0)
    plain = HFSampler(policy, **kw).generate(left_padded(PROMPTS), n=3)
    torch.manual_seed(0)
    fast = HFSampler(policy, merged=True, **kw).generate(left_padded(PROMPTS), n=3)
    assert fast.completion_ids() == plain.completion_ids()
    assert fast.logp is not None and plain.logp is not None and fast.ref_logp is not None
    oracle = token_logps(policy.model, fast.input_ids, fast.attention_mask, fast.completion_mask)
    assert torch.equal(fast.logp, oracle.to(fast.logp.dtype))  # unmerged: bit for bit the training forward
    assert (fast.logp - fast.ref_logp).abs().max() > 1e-2  # and the policy is not the reference
    assert policy.mode == "policy"


def test_merged_sampling_validates():
    base = tiny_causal_lm("llama", vocab_size=VOCAB, seed=3)
    with pytest.raises(ValueError, match=r"merged=True needs a prefopt\.LoraPolicy"):
        HFSampler(base, merged=True, eos_token_id=EOS, pad_token_id=PAD)
    with pytest.raises(TypeError, match="merged must be a bool"):
        HFSampler(LoraPolicy(base, lora_cfg()), merged=1, eos_token_id=EOS, pad_token_id=PAD)
    policy, _ = perturbed_policy(seed=7)
    sampler = HFSampler(policy, merged=True, max_new_tokens=2, eos_token_id=EOS, pad_token_id=PAD)
    with policy.anchor(), pytest.raises(RuntimeError, match=r"inside policy\.anchor"):
        sampler.generate(left_padded(PROMPTS))


@pytest.mark.parametrize("method", ["packed", "cache"])
def test_shared_prompt_rollout_logps_equals_token_logps(method: str) -> None:
    """A rollout of G = 3 completions per prompt (uneven prompts, EOS-shortened completions): the prompt run
    once gives the duplicated forward's per-token log-probs (values and LoRA gradients), in the rollout's
    layout, 0 outside the completion mask."""
    from prefopt.shared_prefix import shared_prompt_rollout_logps

    policy, _ = perturbed_policy(seed=4)
    sampler = HFSampler(policy, max_new_tokens=5, eos_token_id=EOS, pad_token_id=PAD, temperature=1.3)
    torch.manual_seed(0)
    roll = sampler.generate(left_padded(PROMPTS), n=3)
    assert roll.num_samples == 3
    params = policy.trainable_parameters()
    want = token_logps(
        policy.model, roll.input_ids, roll.attention_mask, roll.completion_mask, temperature=1.3
    )
    g_want = torch.autograd.grad(want.sum(), params)
    got = shared_prompt_rollout_logps(policy.model, roll, temperature=1.3, method=method)
    g_got = torch.autograd.grad(got.sum(), params)
    assert got.shape == want.shape
    assert bool((got[~roll.completion_mask] == 0).all())
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("batch_size", [None, 6])
def test_sampler_shared_prompt_scoring_equals_the_duplicated_forward(batch_size: int | None) -> None:
    """``HFSampler(shared_prompt=True)``: the same samples (same seed) and the same behaviour (τ = 1.3) and
    reference log-probs as the duplicated forward, in float64 to rounding; ``score_rollout`` in row batches
    of whole groups gives the same again."""
    policy, _ = perturbed_policy(seed=5, dtype=torch.float64)
    kw = {"max_new_tokens": 6, "eos_token_id": EOS, "pad_token_id": PAD, "temperature": 1.3}
    torch.manual_seed(0)
    plain = HFSampler(policy, **kw).generate(left_padded(PROMPTS), n=3)
    torch.manual_seed(0)
    shared = HFSampler(policy, shared_prompt=True, **kw).generate(left_padded(PROMPTS), n=3)
    assert shared.completion_ids() == plain.completion_ids()
    assert plain.logp is not None and shared.logp is not None
    assert plain.ref_logp is not None and shared.ref_logp is not None
    torch.testing.assert_close(shared.logp, plain.logp, atol=1e-12, rtol=0)
    torch.testing.assert_close(shared.ref_logp, plain.ref_logp, atol=1e-12, rtol=0)
    assert (plain.logp - plain.ref_logp).abs().max() > 1e-2  # the policy is not the reference
    rescored = score_rollout(plain, policy, temperature=1.3, batch_size=batch_size, shared_prompt=True)
    assert rescored.logp is not None and rescored.ref_logp is not None
    torch.testing.assert_close(rescored.logp, plain.logp, atol=1e-12, rtol=0)
    torch.testing.assert_close(rescored.ref_logp, plain.ref_logp, atol=1e-12, rtol=0)


def test_shared_prompt_scoring_validates() -> None:
    policy, _ = perturbed_policy(seed=8)
    with pytest.raises(TypeError, match="shared_prompt must be a bool"):
        HFSampler(policy, shared_prompt="yes", eos_token_id=EOS, pad_token_id=PAD)
    torch.manual_seed(0)
    roll = HFSampler(policy, max_new_tokens=2, eos_token_id=EOS, pad_token_id=PAD).generate(
        left_padded(PROMPTS), n=3
    )
    with pytest.raises(ValueError, match=r"batch_size to be a multiple of rollout\.num_samples"):
        score_rollout(roll, policy, batch_size=4, shared_prompt=True)
    with pytest.raises(TypeError, match="shared_prompt must be a bool"):
        score_rollout(roll, policy, shared_prompt=1)


def test_prompt_tensors_accepts_every_prompt_form_and_names_bad_input() -> None:
    """The one prompt normaliser of HFSampler and VLLMSampler: PromptBatch, dict (mask defaults to ones),
    strings (through PromptCollator); bad forms raise errors naming ``prompts`` and the sampler."""
    from prefopt.data import PromptCollator
    from prefopt.sampling import prompt_tensors

    tok = char_tokenizer()
    batch = PromptCollator(tok)(["ab", "abcd"])
    ids, mask = prompt_tensors(batch)
    assert torch.equal(ids, batch.input_ids) and torch.equal(mask, batch.attention_mask.long())
    ids2, mask2 = prompt_tensors(["ab", "abcd"], tok)
    assert torch.equal(ids2, ids) and torch.equal(mask2, mask)
    ids3, mask3 = prompt_tensors({"input_ids": ids})
    assert ids3 is ids
    assert mask3.dtype == torch.long and bool((mask3 == 1).all())
    with pytest.raises(ValueError, match=r"need VLLMSampler\(\.\.\., tokenizer=\.\.\.\)"):
        prompt_tensors(["ab"], None, sampler="VLLMSampler")
    with pytest.raises(TypeError, match="prompts must be"):
        prompt_tensors(42)
    with pytest.raises(ValueError, match=r"prompts\['input_ids'\]"):
        prompt_tensors({"input_ids": ids.float()})
    with pytest.raises(ValueError, match=r"prompts\['attention_mask'\]"):
        prompt_tensors({"input_ids": ids, "attention_mask": mask[:, :1]})
