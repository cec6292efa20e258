"""Tests for prefopt.reward_model.

Oracles: the backbone run on each row sliced to its tokens (no padding) with the head applied by hand; the
base model deep-copied before wrapping; a Python loop for the last non-pad index; a tiny synthetic preference
task whose held-out accuracy must rise from chance.
"""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from prefopt.losses.reward import bradley_terry, reward_classification
from prefopt.reward_model import RewardModel, last_token_index
from prefopt.testing import tiny_causal_lm
from prefopt.value_head import ValueHead

VOCAB = 128


def cfg() -> peft.LoraConfig:
    return peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0, bias="none")


def right_padded(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    t = max(map(len, rows))
    ids = torch.zeros((len(rows), t), dtype=torch.long)
    mask = torch.zeros((len(rows), t), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return ids, mask


ROWS = [[3, 4, 5, 6, 7], [9, 10], [11, 12, 13], [20]]


@settings(max_examples=50, deadline=None)
@given(st.lists(st.lists(st.booleans(), min_size=5, max_size=5).filter(any), min_size=1, max_size=4))
def test_last_token_index_matches_loop(rows):
    mask = torch.tensor(rows)
    expected = [max(j for j, v in enumerate(r) if v) for r in rows]
    assert last_token_index(mask).tolist() == expected
    assert last_token_index(mask.long()).tolist() == expected


def test_last_token_index_bad_input():
    with pytest.raises(ValueError, match="attention_mask has rows with no valid token: \\[1\\]"):
        last_token_index(torch.tensor([[1, 0], [0, 0]]))
    with pytest.raises(TypeError, match="attention_mask"):
        last_token_index(torch.ones(2, 2))
    with pytest.raises(ValueError, match="attention_mask must be 2-D"):
        last_token_index(torch.ones(2, dtype=torch.long))


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_reward_equals_per_row_oracle(kind):
    base = tiny_causal_lm("llama", vocab_size=VOCAB, seed=1)
    oracle_model = copy.deepcopy(base)
    rm = RewardModel.lora(base, cfg()) if kind == "lora" else RewardModel.full(base)
    head = rm.policy.value_head if kind == "lora" else rm.head
    with torch.no_grad():
        head.weight.normal_()
        head.bias.fill_(0.25)
    ids, mask = right_padded(ROWS)
    got = rm(ids, mask)
    assert got.shape == (len(ROWS),) and got.dtype == torch.float32
    for i, r in enumerate(ROWS):
        h = oracle_model.model(input_ids=torch.tensor([r])).last_hidden_state[0, -1]
        expected = h @ head.weight[0] + head.bias[0]
        torch.testing.assert_close(got[i], expected, rtol=1e-5, atol=1e-5)


def test_lora_reward_model_trains_adapter_and_head_only():
    base = tiny_causal_lm("llama", vocab_size=VOCAB, seed=2)
    rm = RewardModel.lora(base, cfg())
    names = {n for n, p in rm.named_parameters() if p.requires_grad}
    assert names and all(("lora_" in n and ".default." in n) or "value_head" in n for n in names)
    ids, mask = right_padded(ROWS)
    rm(ids, mask).sum().backward()
    assert all(p.grad is None for n, p in rm.named_parameters() if n not in names)
    assert rm.policy.value_head.weight.grad.abs().sum() > 0
    full = RewardModel.full(tiny_causal_lm("llama", vocab_size=VOCAB, seed=2))
    assert all(p.requires_grad for p in full.parameters())
    n_full = sum(p.numel() for p in full.trainable_parameters())
    assert n_full > 5 * sum(p.numel() for p in rm.trainable_parameters())


def test_forward_bad_input_names_argument():
    rm = RewardModel.full(tiny_causal_lm("llama", vocab_size=VOCAB))
    with pytest.raises(ValueError, match="input_ids"):
        rm(torch.ones(3, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask must have the shape"):
        rm(torch.ones(2, 3, dtype=torch.long), torch.ones(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="kind"):
        RewardModel(kind="other")


def test_save_load_roundtrip(tmp_path):
    rm = RewardModel.lora(tiny_causal_lm("llama", vocab_size=VOCAB, seed=4), cfg())
    with torch.no_grad():
        for p in rm.trainable_parameters():
            p.add_(0.1 * torch.randn_like(p))
    ids, mask = right_padded(ROWS)
    before = rm(ids, mask).detach()
    rm.save(tmp_path)
    again = RewardModel.load(tiny_causal_lm("llama", vocab_size=VOCAB, seed=4), tmp_path)
    torch.testing.assert_close(again(ids, mask).detach(), before, rtol=0, atol=0)


def synthetic_pairs(n: int, seed: int) -> tuple[list[list[int]], list[list[int]]]:
    """Chosen completions are made of tokens 40..49, rejected of 50..59; the prompt is shared random tokens."""
    g = torch.Generator().manual_seed(seed)
    chosen, rejected = [], []
    for _ in range(n):
        prompt = torch.randint(60, 100, (3,), generator=g).tolist()
        length = int(torch.randint(2, 5, (1,), generator=g))
        chosen.append(prompt + torch.randint(40, 50, (length,), generator=g).tolist() + [1])
        rejected.append(prompt + torch.randint(50, 60, (length,), generator=g).tolist() + [1])
    return chosen, rejected


@pytest.mark.parametrize("loss", ["bt", "bce"])
def test_lora_reward_model_learns_synthetic_preference(loss):
    torch.manual_seed(0)
    rm = RewardModel.lora(tiny_causal_lm("llama", vocab_size=VOCAB, seed=0), cfg())
    opt = torch.optim.Adam(rm.trainable_parameters(), lr=1e-2)
    train_c, train_r = synthetic_pairs(32, seed=1)
    test_c, test_r = synthetic_pairs(64, seed=2)

    def accuracy() -> float:
        with torch.no_grad():
            ids, mask = right_padded(test_c + test_r)
            r = rm(ids, mask)
            return float((r[:64] > r[64:]).float().mean())

    acc0 = accuracy()
    for _ in range(30):
        ids, mask = right_padded(train_c + train_r)
        r = rm(ids, mask)
        if loss == "bt":
            out = bradley_terry(r[:32], r[32:])
        else:
            out = reward_classification(r, torch.cat([torch.ones(32), torch.zeros(32)]))
        opt.zero_grad()
        out.loss.mean().backward()
        opt.step()
    acc1 = accuracy()
    assert acc1 >= 0.9, (acc0, acc1)
    assert acc1 > acc0 + 0.2, (acc0, acc1)


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_left_padded_rows_score_like_unpadded_rows_on_gpt2(kind):
    """Absolute position embeddings (GPT-2): the reward and the values of a left-padded row equal those of the
    same sequence alone (positions come from the attention mask)."""
    torch.manual_seed(0)
    model = tiny_causal_lm("gpt2", vocab_size=50).float()
    rm = RewardModel.lora(model) if kind == "lora" else RewardModel.full(model)
    rm.eval()
    seq = torch.randint(2, 50, (1, 7))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), seq], dim=1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 7, dtype=torch.long)], dim=1)
    with torch.no_grad():
        alone = rm(seq, torch.ones_like(seq))
        left = rm(padded, mask)
    torch.testing.assert_close(left, alone, rtol=0, atol=1e-5)
    if kind == "lora":
        policy = rm.policy
        policy.value_head = ValueHead(model.config.n_embd)
        with torch.no_grad():
            v_alone = policy.values(seq, torch.ones_like(seq))
            v_left = policy.values(padded, mask)
        torch.testing.assert_close(v_left[:, 3:], v_alone, rtol=0, atol=1e-5)


def test_lora_reward_model_has_no_anchor_adapter(tmp_path):
    rm = RewardModel.lora(tiny_causal_lm("llama", vocab_size=VOCAB, seed=5), cfg())
    assert rm.policy.has_anchor is False
    assert not any(".anchor." in n for n, _ in rm.named_parameters())
    # every weight outside the frozen backbone is trainable: adapter and head, nothing else
    backbone = sum(p.numel() for n, p in rm.named_parameters() if "lora_" not in n and "value_head" not in n)
    assert rm.policy.parameter_counts().total == backbone + sum(p.numel() for p in rm.trainable_parameters())
    rm.save(tmp_path)
    again = RewardModel.load(tiny_causal_lm("llama", vocab_size=VOCAB, seed=5), tmp_path)
    assert again.policy.has_anchor is False
    assert rm.state_dict().keys() == again.state_dict().keys()


def test_reward_model_checkpoint_of_old_format_with_dummy_anchor_loads(tmp_path):
    """Reward models saved before anchor=False carried a rank-1 anchor: they load (anchor kept)."""
    from prefopt.policy import LoraPolicy

    policy = LoraPolicy(
        tiny_causal_lm("llama", vocab_size=VOCAB, seed=6), cfg(), value_head=True, anchor_rank=1
    )
    policy.save(tmp_path)
    rm = RewardModel.load(tiny_causal_lm("llama", vocab_size=VOCAB, seed=6), tmp_path)
    assert rm.policy.has_anchor and rm.policy.anchor_rank == 1


def test_training_checkpoint_of_a_policy_without_anchor(tmp_path):
    from prefopt.checkpoint import load_training_state, save_training_state
    from prefopt.policy import LoraPolicy

    policy = LoraPolicy(tiny_causal_lm("llama", vocab_size=VOCAB, seed=7), cfg(), anchor=False)
    opt = torch.optim.Adam(policy.trainable_parameters(), lr=1e-2)
    ids, mask = right_padded(ROWS)
    policy(input_ids=ids, attention_mask=mask).logits.square().mean().backward()
    opt.step()
    save_training_state(tmp_path, policy=policy, optimizer=opt, step=1)
    state = load_training_state(tmp_path, tiny_causal_lm("llama", vocab_size=VOCAB, seed=7))
    assert state.step == 1 and state.policy.has_anchor is False
    assert all(
        torch.equal(a, b) for a, b in zip(policy.state_dict().values(), state.policy.state_dict().values())
    )


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_full_reward_model_on_float64_model_has_float64_head(arch):
    base = tiny_causal_lm(arch, vocab_size=VOCAB, seed=8).double()
    oracle_model = copy.deepcopy(base)
    rm = RewardModel.full(base)
    assert (
        rm.head is not None and rm.head.weight.dtype == torch.float64 and float(rm.head.bias.detach()) == 0.0
    )
    with torch.no_grad():
        rm.head.weight.normal_()
        rm.head.bias.fill_(0.25)
    ids, mask = right_padded(ROWS)
    got = rm(ids, mask).detach()
    assert got.dtype == torch.float64
    for i, r in enumerate(ROWS):
        h = oracle_model.base_model(input_ids=torch.tensor([r])).last_hidden_state[0, -1]
        expected = float(h @ rm.head.weight[0]) + 0.25
        assert abs(float(got[i]) - expected) < 1e-10 * (1 + abs(expected))
    assert RewardModel.full(tiny_causal_lm(arch, vocab_size=VOCAB)).head.weight.dtype == torch.float32
