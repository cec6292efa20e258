"""Tests for prefopt.value_head.

Oracles: the head computed by hand in float64 (a Python loop finds each row's last non-pad token, a sum of
products gives w·h + c); the hidden states a model returns with output_hidden_states=True; the old import paths.
"""

from __future__ import annotations

import types

import pytest
import torch

import prefopt.policy
import prefopt.reward_model
import prefopt.value_head
from prefopt.testing import tiny_causal_lm
from prefopt.value_head import ValueHead, config_hidden_size, final_hidden_states, last_token_index


def test_value_head_at_last_token_equals_hand_computation():
    torch.manual_seed(0)
    d = 5
    head = ValueHead(d)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[0.5, -1.0, 2.0, 0.25, -0.125]]))
        head.bias.fill_(0.75)
    hidden = torch.randn(3, 4, d, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 1], [1, 0, 0, 0]])  # right, left padding, one token
    got = head.at_last_token(hidden, mask).detach()
    assert got.shape == (3,) and got.dtype == torch.float32
    w = [0.5, -1.0, 2.0, 0.25, -0.125]
    for i in range(3):
        last = max(j for j in range(4) if mask[i, j])
        want = sum(w[k] * float(hidden[i, last, k]) for k in range(d)) + 0.75
        assert abs(float(got[i]) - want) < 1e-5 * (1 + abs(want))
    assert (
        [max(j for j in range(4) if mask[i, j]) for i in range(3)]
        == last_token_index(mask).tolist()
        == [1, 3, 0]
    )
    # every position: (b, t) values, cast to the head's dtype
    every = head(hidden)
    assert every.shape == (3, 4) and every.dtype == torch.float32
    want_all = hidden.float() @ head.weight[0] + head.bias[0]
    torch.testing.assert_close(every, want_all, rtol=0, atol=1e-6)


def test_value_head_is_a_linear_with_the_checkpoint_names():
    head = ValueHead(4, dtype=torch.float64, zero_bias=True)
    assert isinstance(head, torch.nn.Linear)
    assert set(head.state_dict()) == {"weight", "bias"}
    assert head.weight.shape == (1, 4) and head.weight.dtype == torch.float64
    assert float(head.bias) == 0.0
    # same random draws as nn.Linear(4, 1) (a seeded policy keeps its value head)
    torch.manual_seed(3)
    plain = torch.nn.Linear(4, 1)
    torch.manual_seed(3)
    ours = ValueHead(4)
    assert torch.equal(plain.weight, ours.weight) and torch.equal(plain.bias, ours.bias)


@pytest.mark.parametrize(
    ("dtype", "want"),
    [(torch.float32, torch.float32), (torch.bfloat16, torch.float32), (torch.float64, torch.float64)],
)
def test_for_model_dtype_and_width(dtype, want):
    model = tiny_causal_lm("gpt2", hidden_size=16).to(dtype)
    head = ValueHead.for_model(model)
    assert head.weight.dtype == want and head.in_features == 16


def test_bad_input_names_argument():
    with pytest.raises(ValueError, match="hidden_size"):
        ValueHead(0)
    with pytest.raises(TypeError, match="dtype"):
        ValueHead(4, dtype=torch.long)
    with pytest.raises(ValueError, match=r"value_head=True needs model\.config\.hidden_size"):
        config_hidden_size(types.SimpleNamespace(), why="value_head=True")
    with pytest.raises(ValueError, match="attention_mask"):
        ValueHead(2).at_last_token(torch.zeros(1, 2, 2), torch.zeros(1, 2, dtype=torch.long))


def test_config_hidden_size_keys():
    assert config_hidden_size(types.SimpleNamespace(hidden_size=7)) == 7
    assert config_hidden_size(types.SimpleNamespace(n_embd=9)) == 9
    assert config_hidden_size(types.SimpleNamespace(d_model=11, hidden_size=True)) == 11  # a bool is no width


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_final_hidden_states_equal_the_models_last_hidden_state(arch):
    model = tiny_causal_lm(arch, seed=1)
    ids = torch.randint(2, 100, (2, 6))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
        from_lm = final_hidden_states(model, ids, mask)  # runs the backbone only
        from_backbone = final_hidden_states(model.base_model, ids, mask)
    torch.testing.assert_close(from_lm, want, rtol=0, atol=1e-6)
    torch.testing.assert_close(from_backbone, want, rtol=0, atol=1e-6)


def test_old_import_paths_still_work():
    assert prefopt.policy.config_hidden_size is prefopt.value_head.config_hidden_size
    assert prefopt.reward_model.last_token_index is prefopt.value_head.last_token_index
