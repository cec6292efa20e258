"""prefopt.lab.pairs: gold-labelled pairs of reference completions, and their collated batches."""

from __future__ import annotations

import math

import pytest
import torch

from prefopt.lab import Lab, LabConfig, LabPairs, gold_pairs
from prefopt.logprobs import pair_logps
from prefopt.policy import LoraPolicy
from prefopt.registry import get_loss
from prefopt.reward_model import RewardModel
from prefopt.types import PairBatch

SMALL = LabConfig(
    vocab=6, prompt_len=2, completion_len=4, branching=3, hidden_size=32, num_layers=1, num_heads=2
)
# two content tokens and three completion tokens: many completions share a reward (ties are common)
TIES = LabConfig(
    vocab=2, prompt_len=1, completion_len=3, branching=2, hidden_size=16, num_layers=1, num_heads=2
)


@pytest.fixture(scope="module")
def small() -> tuple[Lab, torch.nn.Module]:
    lab = Lab(SMALL)
    return lab, lab.build_model().eval()  # an untrained model samples a spread of completions


def test_gold_labels_order_by_gold_reward(small: tuple[Lab, torch.nn.Module]) -> None:
    lab, model = small
    pairs = gold_pairs(lab, model, 300, seed=1)
    p, length = SMALL.prompt_len, SMALL.completion_len
    assert len(pairs) == 300
    assert pairs.prompts.shape == (300, 1 + p) and pairs.chosen.shape == pairs.rejected.shape == (300, length)
    torch.testing.assert_close(pairs.chosen_reward, lab.gold_reward(pairs.chosen), rtol=0, atol=0)
    torch.testing.assert_close(pairs.rejected_reward, lab.gold_reward(pairs.rejected), rtol=0, atol=0)
    assert bool(pairs.agrees_with_gold.all())
    # an untrained model may sample a special token: it is scored (below every content token), not dropped
    assert bool(((pairs.chosen >= 0) & (pairs.chosen < SMALL.vocab_size)).all())
    # prompts are drawn from the language: BOS then content tokens
    assert bool((pairs.prompts[:, 0] == 1).all())


def test_same_seed_same_pairs_and_caller_rng_untouched(small: tuple[Lab, torch.nn.Module]) -> None:
    lab, model = small
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    a = gold_pairs(lab, model, 50, seed=4)
    after = torch.rand(3)
    torch.testing.assert_close(before, after, rtol=0, atol=0)
    b = gold_pairs(lab, model, 50, seed=4)
    c = gold_pairs(lab, model, 50, seed=5)
    for f in ("prompts", "chosen", "rejected"):
        assert torch.equal(getattr(a, f), getattr(b, f))
    assert not torch.equal(a.chosen, c.chosen)


def test_ties_are_dropped_and_n_is_kept() -> None:
    lab = Lab(TIES)
    model = lab.build_model().eval()
    pairs = gold_pairs(lab, model, 200, seed=0, batch_size=64)
    assert len(pairs) == 200
    assert bool((pairs.chosen_reward > pairs.rejected_reward).all())
    # the draw had ties to drop: count them directly for the same language
    every = torch.tensor([[a, b, c] for a in range(2) for b in range(2) for c in range(2)]) + 3
    r = lab.gold_reward(every)
    assert len(set(r.tolist())) < len(r)


def test_bradley_terry_labels_agree_at_the_model_rate(small: tuple[Lab, torch.nn.Module]) -> None:
    lab, model = small
    tau = 0.1
    pairs = gold_pairs(lab, model, 1500, seed=2, labels="bradley_terry", temperature=tau)
    gap = (pairs.chosen_reward - pairs.rejected_reward).abs()
    # each kept pair agrees with the gold order with probability σ(|Δr|/τ), independently
    p = torch.sigmoid(gap / tau)
    agree = pairs.agrees_with_gold.double()
    se = math.sqrt(float((p * (1 - p)).sum())) / len(pairs)
    assert abs(float(agree.mean() - p.mean())) < 4 * se
    assert 0.6 < float(agree.mean()) < 0.99  # some labels flipped, most kept
    # a huge temperature is a coin flip; labels="gold" never disagrees
    coin = gold_pairs(lab, model, 1000, seed=3, labels="bradley_terry", temperature=1e6)
    assert abs(float(coin.agrees_with_gold.double().mean()) - 0.5) < 4 * 0.5 / math.sqrt(1000)


def test_batch_layout_and_log_probs_match_a_loop(small: tuple[Lab, torch.nn.Module]) -> None:
    lab, model = small
    pairs = gold_pairs(lab, model, 6, seed=0)
    batch = pairs.batch([1, 3, 4])
    assert isinstance(batch, PairBatch) and batch.num_pairs == 3
    p = 1 + SMALL.prompt_len
    assert torch.equal(batch.input_ids[:3, p:], pairs.chosen[[1, 3, 4]])
    assert torch.equal(batch.input_ids[3:, p:], pairs.rejected[[1, 3, 4]])
    assert torch.equal(batch.input_ids[:3, :p], batch.input_ids[3:, :p])
    assert torch.equal(batch.row_index, torch.arange(3))
    assert batch.completion_mask.sum(1).tolist() == [SMALL.completion_len] * 6
    # the sequence log-probs pair_logps computes from the batch equal a per-token loop over the completion
    logps = pair_logps(model, batch, reference=model)
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids).logits.double().log_softmax(-1)
    for row in range(6):
        total = sum(
            float(logits[row, t - 1, batch.input_ids[row, t]]) for t in range(p, batch.input_ids.shape[1])
        )
        got = (logps.chosen[row] if row < 3 else logps.rejected[row - 3]).detach()
        assert float(got) == pytest.approx(total, abs=1e-4)
    assert logps.chosen_len is not None and logps.chosen_len.tolist() == [SMALL.completion_len] * 3


def test_batch_feeds_pairwise_losses_and_reward_models(small: tuple[Lab, torch.nn.Module]) -> None:
    lab, model = small
    pairs = gold_pairs(lab, model, 8, seed=0)
    batch = pairs.batch()
    policy = LoraPolicy(lab.build_model())
    logps = pair_logps(policy, batch)
    for name in ("dpo", "ipo", "simpo", "orpo"):
        loss = get_loss(name)(logps).loss.mean()
        assert torch.isfinite(loss)
    # a fresh adapter is the reference: DPO's loss is exactly log 2
    assert float(get_loss("dpo")(logps).loss.mean()) == pytest.approx(math.log(2), abs=1e-6)
    rm = RewardModel.full(lab.build_model())
    r = rm(batch.input_ids, batch.attention_mask)
    assert r.shape == (16,)


def test_bad_arguments_are_named(small: tuple[Lab, torch.nn.Module]) -> None:
    lab, model = small
    with pytest.raises(ValueError, match="n must be"):
        gold_pairs(lab, model, 0)
    with pytest.raises(ValueError, match="labels must be"):
        gold_pairs(lab, model, 4, labels="noisy")
    with pytest.raises(ValueError, match="temperature must be"):
        gold_pairs(lab, model, 4, labels="bradley_terry", temperature=0.0)
    with pytest.raises(ValueError, match="batch_size must be"):
        gold_pairs(lab, model, 4, batch_size=0)
    pairs = gold_pairs(lab, model, 4, seed=0)
    with pytest.raises(ValueError, match="no pairs selected"):
        pairs.batch([])
    with pytest.raises(ValueError, match="rows but prompts has"):
        LabPairs(pairs.prompts, pairs.chosen[:2], pairs.rejected, pairs.chosen_reward, pairs.rejected_reward)
