"""prefopt.lab: the language, its gold reward, the exact Best-of-N points and the cached reference LM."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from prefopt.bon import bon_distribution
from prefopt.lab import (
    BOS,
    Lab,
    LabConfig,
    ReferencePool,
    best_of_n_frontier,
    best_of_n_point,
    continuous_best_of_n,
    evaluate_policy,
    mid_rank_quantile,
    reference_pool,
)

TINY = LabConfig(
    vocab=3, prompt_len=1, completion_len=3, branching=2, hidden_size=32, num_layers=1, num_heads=2
)


def test_config_validation_names_the_field() -> None:
    with pytest.raises(ValueError, match=r"LabConfig\.vocab"):
        LabConfig(vocab=0)
    with pytest.raises(ValueError, match="branching <= vocab"):
        LabConfig(vocab=3, branching=4)
    with pytest.raises(ValueError, match=r"LabConfig\.floor"):
        LabConfig(floor=0.0)
    with pytest.raises(ValueError, match="divisible by num_heads"):
        LabConfig(hidden_size=30, num_heads=4)
    assert LabConfig().key() == LabConfig().key() != LabConfig(seed=1).key()


def test_language_is_a_seeded_markov_chain() -> None:
    lab = Lab(TINY)
    torch.testing.assert_close(lab.transition.sum(1), torch.ones(3, dtype=torch.float64))
    assert bool((lab.transition >= TINY.floor / TINY.vocab).all())
    again = Lab(TINY)
    torch.testing.assert_close(again.transition, lab.transition, rtol=0, atol=0)
    a, b = lab.sample_sequences(5, seed=3), again.sample_sequences(5, seed=3)
    assert torch.equal(a, b) and a.shape == (5, TINY.seq_len) and bool((a[:, 0] == BOS).all())
    assert lab.sample_prompts(4, seed=0).shape == (4, 1 + TINY.prompt_len)


def _all_sequences(lab: Lab) -> torch.Tensor:
    cfg = lab.config
    rows = itertools.product(range(cfg.vocab), repeat=cfg.prompt_len + cfg.completion_len)
    content = torch.tensor(list(rows)) + 3
    return torch.cat([torch.full((content.shape[0], 1), BOS), content], dim=1)


def test_entropy_per_token_is_exact_by_enumeration() -> None:
    lab = Lab(TINY)
    seqs = _all_sequences(lab)
    x = seqs[:, 1:] - 3
    p = TINY.prompt_len
    log_prompt = torch.log(lab.start[x[:, 0]]) + torch.log(lab.transition[x[:, : p - 1], x[:, 1:p]]).sum(1)
    log_comp = lab.language_logp(seqs)
    joint = torch.exp(log_prompt + log_comp)
    torch.testing.assert_close(joint.sum(), torch.tensor(1.0, dtype=torch.float64))
    exact = float(-(joint * log_comp).sum()) / TINY.completion_len
    assert lab.entropy_per_token() == pytest.approx(exact, rel=1e-12)
    # and sampling agrees with the chain: the empirical mean of −log p / L is within 4 standard errors
    big = Lab(LabConfig(vocab=8, prompt_len=2, completion_len=6, branching=3))
    nll = -big.language_logp(big.sample_sequences(20000, seed=1)) / 6
    se = float(nll.std() / math.sqrt(nll.numel()))
    assert abs(float(nll.mean()) - big.entropy_per_token()) < 4 * se


def test_gold_reward_matches_a_loop_and_penalises_special_tokens() -> None:
    lab = Lab(LabConfig(vocab=6, completion_len=5))
    comps = lab.sample_sequences(50, seed=2)[:, -5:]
    comps[0, 2] = 0  # a PAD sampled inside a completion
    a, b = lab.bigram
    want = []
    for row in comps.tolist():
        tok = [t - 3 for t in row]
        w = [float(lab.token_weights[t]) if t >= 0 else float(lab.token_weights.min()) - 1 for t in tok]
        hits = sum(1 for u, v in itertools.pairwise(tok) if (u, v) == (a, b))
        want.append((sum(w) + lab.config.bigram_bonus * hits) / 5)
    torch.testing.assert_close(lab.gold_reward(comps), torch.tensor(want, dtype=torch.float64))
    with pytest.raises(ValueError, match="completions must be a"):
        lab.gold_reward(comps[:, :3])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        lab.gold_reward(torch.full((1, 5), 99))


def _pool(rewards: list[list[float]]) -> ReferencePool:
    r = torch.tensor(rewards, dtype=torch.float64).sort(dim=1).values
    return ReferencePool(prompts=torch.zeros(r.shape[0], 2, dtype=torch.long), rewards=r)


def test_mid_rank_quantile_matches_a_loop() -> None:
    pool = _pool([[0.0, 1.0, 1.0, 2.0, 5.0], [3.0, 3.0, 3.0, 3.0, 4.0]])
    idx = torch.tensor([0, 0, 0, 1, 1, 1])
    r = torch.tensor([1.0, -1.0, 9.0, 3.0, 3.5, 4.0])
    want = []
    for i, v in zip(idx.tolist(), r.tolist()):
        row = pool.rewards[i].tolist()
        want.append((sum(x < v for x in row) + 0.5 * sum(x == v for x in row)) / len(row))
    torch.testing.assert_close(mid_rank_quantile(pool, idx, r), torch.tensor(want, dtype=torch.float64))


@pytest.mark.parametrize("n", [1, 2, 3, 7])
def test_best_of_n_point_is_exact_with_ties(n: int) -> None:
    rows = [[0.0, 1.0, 1.0, 2.0, 5.0, 5.0, 5.0], [3.0, 3.0, 3.0, 3.0, 4.0, 0.5, 1.5]]
    pool = _pool(rows)
    point = best_of_n_point(pool, n)
    qs, kls = [], []
    for row in pool.rewards:
        m = row.numel()
        ref = torch.full((m,), 1.0 / m, dtype=torch.float64)
        bon = bon_distribution(ref, row, n)  # the library's exact oracle (Thm. 1 with ties)
        q = torch.tensor(
            [(float((row < v).sum()) + 0.5 * float((row == v).sum())) / m for v in row.tolist()],
            dtype=torch.float64,
        )
        qs.append(float((bon * q).sum()))
        kls.append(float((bon * torch.log(bon / ref)).sum()))
    assert point.quantile == pytest.approx(sum(qs) / 2, rel=1e-12)
    assert point.kl == pytest.approx(sum(kls) / 2, rel=1e-12, abs=1e-15)


def test_best_of_n_point_tends_to_the_continuous_values() -> None:
    g = torch.Generator().manual_seed(0)
    pool = ReferencePool(
        torch.zeros(1, 2, dtype=torch.long), torch.rand(1, 20000, generator=g).double().sort(1).values
    )
    for n in (2, 4, 8):
        p = best_of_n_point(pool, n)
        assert p.quantile == pytest.approx(n / (n + 1), abs=1e-4)
        assert p.kl == pytest.approx(math.log(n) - (n - 1) / n, abs=2e-3)


def test_continuous_best_of_n_curve_by_hand_and_by_quadrature() -> None:
    assert continuous_best_of_n(1) == (0.0, 0.5)
    kl, q = continuous_best_of_n(4)
    assert kl == pytest.approx(math.log(4) - 3 / 4, abs=1e-15) and q == pytest.approx(0.8, abs=1e-15)
    # real N: the quantile density N u^{N-1} on (0, 1), integrated by the midpoint rule (float64)
    u = (torch.arange(200_000, dtype=torch.float64) + 0.5) / 200_000
    for n in (1.37, 2.5, 11.0):
        dens = n * u ** (n - 1)
        kl, q = continuous_best_of_n(n)
        assert q == pytest.approx(float((u * dens).mean()), abs=1e-8)
        assert kl == pytest.approx(float((dens * torch.log(dens)).mean()), abs=1e-5)
    with pytest.raises(ValueError, match="n must be"):
        continuous_best_of_n(0.5)
    with pytest.raises(ValueError, match="n must be"):
        continuous_best_of_n(float("nan"))


def test_best_of_n_frontier_inverts_the_curve() -> None:
    assert best_of_n_frontier(0.0) == (1.0, 0.5)
    for n in (1.0001, 1.4, 2.0, 4.0, 16.0, 560.0, 1e5):
        kl, q = continuous_best_of_n(n)
        n_back, q_back = best_of_n_frontier(kl)
        assert n_back == pytest.approx(n, rel=1e-9) and q_back == pytest.approx(q, abs=1e-12)
    # increasing in KL
    qs = [best_of_n_frontier(k)[1] for k in (0.01, 0.1, 1.0, 3.0, 7.0)]
    assert qs == sorted(qs) and len(set(qs)) == len(qs)
    with pytest.raises(ValueError, match="kl must be"):
        best_of_n_frontier(-0.1)
    with pytest.raises(ValueError, match="kl must be"):
        best_of_n_frontier(True)


def test_exact_pool_points_lie_on_the_continuous_curve() -> None:
    """A pool of distinct rewards: the exact Best-of-N points are on the continuous curve (measured: within
    3e-9 in quantile at M = 20,000, i.e. O(1/M²))."""
    g = torch.Generator().manual_seed(1)
    pool = ReferencePool(
        torch.zeros(2, 2, dtype=torch.long), torch.rand(2, 20000, generator=g).double().sort(1).values
    )
    for n in (2, 4, 8, 16):
        p = best_of_n_point(pool, n)
        assert best_of_n_frontier(p.kl)[1] == pytest.approx(p.quantile, abs=1e-7)


@pytest.mark.slow
def test_reference_lm_pretrains_caches_and_evaluates(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("PREFOPT_CACHE", str(tmp_path))
    cfg = LabConfig(
        vocab=6,
        prompt_len=2,
        completion_len=4,
        branching=2,
        hidden_size=32,
        num_layers=1,
        num_heads=2,
        pretrain_steps=150,
        pretrain_batch=64,
        pretrain_lr=1e-2,
    )
    lab = Lab(cfg)
    model, rep = lab.reference()
    assert not rep.loaded and (tmp_path / "lab" / cfg.key() / "config.json").exists()
    uniform = math.log(cfg.vocab_size)
    # it learned the language: most of the way from uniform guessing to the language's entropy
    assert rep.nll_per_token < rep.entropy_per_token + 0.25 * (uniform - rep.entropy_per_token)
    again, rep2 = lab.reference()
    assert rep2.loaded and rep2.nll_per_token == pytest.approx(rep.nll_per_token, rel=1e-9)
    for p, q in zip(model.parameters(), again.parameters()):
        assert torch.equal(p, q)

    from prefopt.policy import LoraPolicy

    prompts = lab.sample_prompts(4, seed=5)
    pool = reference_pool(lab, model, prompts, samples_per_prompt=256, seed=0)
    assert pool.rewards.shape == (4, 256) and bool((pool.rewards.diff(dim=1) >= 0).all())
    ev = evaluate_policy(lab, LoraPolicy(again), pool, samples_per_prompt=128, seed=1)
    assert ev.kl == 0.0 and ev.kl_se == 0.0  # a fresh adapter is the reference exactly (B = 0)
    assert abs(ev.quantile - 0.5) < 4 * ev.quantile_se  # reference samples have mean quantile ½


def test_t_quantile_and_mean_ci95_against_known_values() -> None:
    """The 95% t-interval of the lab's multi-seed figures: Student-t 0.975 quantiles against standard table
    values (df 1, 2, 9, 30) and the Cornish–Fisher tail against known quantiles (df 40, 60, 120), and
    mean_ci95 against the hand formula."""
    from prefopt.lab import mean_ci95, t_quantile_975

    for df, want in [(1, 12.706), (2, 4.303), (9, 2.262), (30, 2.042)]:
        assert t_quantile_975(df) == want
    for df, want in [(40, 2.0211), (60, 2.0003), (120, 1.9799)]:
        assert abs(t_quantile_975(df) - want) < 2e-4
    m, h = mean_ci95([1.0, 2.0, 3.0, 6.0])
    assert m == 3.0 and abs(h - 3.182 * math.sqrt(14 / 3) / 2) < 1e-12
    assert math.isnan(mean_ci95([5.0])[1])
    with pytest.raises(ValueError, match="df"):
        t_quantile_975(0)
