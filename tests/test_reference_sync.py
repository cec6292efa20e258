"""TR-DPO's moving reference on one backbone: the anchor adapter as the reference, synced by reference_sync_.

Properties: never synced == frozen reference bitwise; a hard sync makes the reference log-probs equal the
policy's; a soft sync is the closed-form EMA of the adapters' low-rank updates; sync steps follow TRL's
``global_step % ref_model_sync_steps == 0``.
"""

from __future__ import annotations

import peft
import pytest
import torch

from prefopt.data import PreferenceCollator
from prefopt.logprobs import pair_logps
from prefopt.policy import LoraPolicy, reference_sync_
from prefopt.registry import get_loss
from prefopt.testing import char_tokenizer, tiny_causal_lm

ROWS = [
    {"prompt": "Q: two plus two?", "chosen": " four", "rejected": " five, surely"},
    {"prompt": "Q: colour of sky?", "chosen": " blue", "rejected": " green"},
]


def _setup(seed: int = 0) -> tuple[LoraPolicy, object]:
    tok = char_tokenizer()
    model = tiny_causal_lm("llama", vocab_size=len(tok), seed=seed).double()
    policy = LoraPolicy(
        model, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "up_proj"])
    )
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    batch = PreferenceCollator(tok, max_length=64)(ROWS)
    return policy, batch


def test_never_synced_anchor_reference_is_the_frozen_reference_bitwise() -> None:
    policy, batch = _setup()
    for step in range(1, 5):
        assert reference_sync_(policy, step, every=None) is None
    frozen = pair_logps(policy, batch)
    moving = pair_logps(policy, batch, reference="anchor")
    assert torch.equal(frozen.ref_chosen, moving.ref_chosen)
    assert torch.equal(frozen.ref_rejected, moving.ref_rejected)
    dpo = get_loss("dpo", beta=0.1)
    assert torch.equal(dpo(frozen).loss, dpo(moving).loss)


def test_hard_sync_reference_equals_policy() -> None:
    policy, batch = _setup()
    up = reference_sync_(policy, 3, alpha=1.0, every=3)
    assert up is not None and up.max_relative_error == 0.0
    moving = pair_logps(policy, batch, reference="anchor")
    torch.testing.assert_close(moving.ref_chosen, moving.chosen.detach(), atol=1e-10, rtol=0)
    torch.testing.assert_close(moving.ref_rejected, moving.rejected.detach(), atol=1e-10, rtol=0)
    assert float((moving.chosen - pair_logps(policy, batch).ref_chosen).abs().max()) > 1e-3  # not vacuous


def test_soft_sync_is_the_closed_form_ema_and_follows_trl_step_rule() -> None:
    policy, _ = _setup()
    before = {k: v.clone() for k, v in policy.delta_weights("anchor").items()}
    assert all(float(v.abs().max()) == 0.0 for v in before.values())
    assert reference_sync_(policy, 5, alpha=0.6, every=4) is None  # 5 % 4 != 0: no sync
    assert all(torch.equal(policy.delta_weights("anchor")[k], v) for k, v in before.items())
    up = reference_sync_(policy, 8, alpha=0.6, every=4)
    assert up is not None
    pol = policy.delta_weights("default")
    after = policy.delta_weights("anchor")
    for k in pol:
        # the low-rank EMA is formed by an SVD in float32 (ema_low_rank): equal to float32 precision
        torch.testing.assert_close(after[k], 0.4 * before[k] + 0.6 * pol[k], atol=1e-6, rtol=1e-5)
    # a second soft sync after the policy moved: still the EMA (rank 2r fits in the default anchor_rank)
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p.mul_(-0.5)
    prev = {k: v.clone() for k, v in after.items()}
    reference_sync_(policy, 12, alpha=0.6, every=4)
    pol2 = policy.delta_weights("default")
    for k in pol2:
        torch.testing.assert_close(
            policy.delta_weights("anchor")[k], 0.4 * prev[k] + 0.6 * pol2[k], atol=1e-6, rtol=1e-5
        )


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"step": 0}, "step"),
        ({"step": 1, "alpha": 0.0}, "alpha"),
        ({"step": 1, "alpha": 1.5}, "alpha"),
        ({"step": 1, "every": 0}, "every"),
        ({"step": 1, "every": True}, "every"),
    ],
)
def test_bad_arguments_name_themselves(kwargs: dict, needle: str) -> None:
    policy, _ = _setup()
    with pytest.raises(ValueError, match=needle):
        reference_sync_(policy, **kwargs)


def test_anchor_reference_needs_a_lora_policy() -> None:
    policy, batch = _setup()
    with pytest.raises(TypeError, match="anchor"):
        pair_logps(policy.model, batch, reference="anchor")
