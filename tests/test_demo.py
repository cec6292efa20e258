"""`prefopt demo`: its pieces by hand (chance bound, derived pairs, Best-of-N interpolation, data lookup) and
the whole pipeline on a tiny random model and a tiny lab (fast smoke mode, deterministic for a seed)."""

from __future__ import annotations

import csv
import json
import math
from fractions import Fraction

import pytest

from prefopt.cli import main
from prefopt.demo import (
    JBondResult,
    binomial_threshold,
    derive_shuffled_pairs,
    find_data,
    run_demo,
    shuffle_words,
)


def _tail(n: int, k: int) -> Fraction:
    """P(X >= k) for X ~ Binomial(n, 1/2), by summing the probabilities one by one."""
    total = Fraction(0)
    for j in range(k, n + 1):
        total += Fraction(math.comb(n, j), 2**n)
    return total


@pytest.mark.parametrize("n", [1, 6, 7, 9, 20, 64, 100])
def test_binomial_threshold_is_the_smallest_count_a_fair_coin_reaches_with_at_most_1_percent(n):
    k = binomial_threshold(n)
    assert _tail(n, k) <= Fraction(1, 100)
    assert k == 0 or _tail(n, k - 1) > Fraction(1, 100)


def test_binomial_threshold_of_the_issue():
    assert binomial_threshold(64) == 42  # ≥ 42 of 64 held-out pairs, i.e. ≥ 0.656
    assert binomial_threshold(7) == 7  # 7 of 7: probability 1/128 < 1%
    assert binomial_threshold(6) == 7  # no count out of 6 is that unlikely (6 of 6: 1/64 > 1%)


@pytest.mark.parametrize(("n", "level"), [(0, 0.01), (10, 0.0), (10, 1.0)])
def test_binomial_threshold_rejects_bad_input(n, level):
    with pytest.raises(ValueError, match=r"n must|level must"):
        binomial_threshold(n, level)


def test_derived_pairs_are_the_reply_and_a_scramble_of_its_own_words():
    items = [
        ("Q1\n\nAssistant:", " one two three four five six seven"),
        ("Q2\n\nAssistant:", " too short"),  # fewer than 4 words: skipped
        ("Q3\n\nAssistant:", " a a a a a"),  # no order differs: skipped
        ("Q4\n\nAssistant:", " alpha beta gamma delta epsilon"),
    ]
    pairs = derive_shuffled_pairs(items, words=5, seed=3)
    assert [p["prompt"] for p in pairs] == ["Q1\n\nAssistant:", "Q4\n\nAssistant:"]
    assert pairs[0]["chosen"] == " one two three four five"  # the first 5 words, with a leading space
    for p in pairs:
        assert p["rejected"].startswith(" ")
        assert sorted(p["rejected"].split()) == sorted(p["chosen"].split())
        assert p["rejected"] != p["chosen"]
    assert derive_shuffled_pairs(items, words=5, seed=3) == pairs  # same seed, same pairs
    assert shuffle_words(" x y z w", 1) == shuffle_words(" x y z w", 1)


def test_best_of_n_frontier_interpolation_by_hand():
    j = JBondResult(best_of_n=[(1, 0.5, 0.0), (2, 0.7, 0.2), (4, 0.8, 0.6)])
    assert j.best_of_n_quantile_at(0.0) == pytest.approx(0.5)
    assert j.best_of_n_quantile_at(0.1) == pytest.approx(0.6)
    assert j.best_of_n_quantile_at(0.4) == pytest.approx(0.75)
    assert j.best_of_n_quantile_at(5.0) == pytest.approx(0.8)  # flat past the last exact point


def test_find_data(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="helpful-base"):
        find_data(tmp_path)
    f = tmp_path / "hh-rlhf" / "helpful-base.test.jsonl.gz"
    f.parent.mkdir()
    f.write_bytes(b"")
    assert find_data(tmp_path) == f
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PREFOPT_DATA", str(tmp_path))
    assert find_data(None) == f


def test_cli_missing_data_is_one_error_line(tmp_path, capsys):
    code = main(["demo", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o"), "--threads", "1"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--data" in err[0] and "helpful-base" in err[0]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"held_out": 1}, "held_out"),
        ({"words": 2}, "words"),
        ({"lr": 0.0}, "lr"),
        ({"losses": ["orpo"]}, "reference-based pairwise"),
        ({"losses": ["kto"]}, "reference-based pairwise"),
        ({"losses": []}, "at least one"),
    ],
)
def test_run_demo_rejects_bad_settings(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        run_demo(tmp_path, tiny=True, threads=1, progress=False, **kwargs)


def _smoke(out, monkeypatch, seed=0):
    monkeypatch.setenv("PREFOPT_CACHE", str(out.parent / "cache"))
    return run_demo(
        out, steps=4, eval_every=2, tiny=True, progress=False, jbond_steps=2, threads=1, seed=seed
    )


@pytest.mark.slow
def test_demo_tiny_end_to_end_and_deterministic(tmp_path, capsys, monkeypatch):
    results, jres = _smoke(tmp_path / "a", monkeypatch)
    assert [r.loss for r in results] == ["dpo", "dpop"]
    n_held = json.loads((tmp_path / "a" / "demo.json").read_text())["held_out"]
    for r in results:
        assert r.eval_steps == [0, 2, 4]
        assert r.margin[0] == 0.0 and r.accuracy[0] == 0.5 and r.wins[0] == 0  # policy == reference at step 0
        assert all(math.isfinite(v) for v in r.chosen + r.rejected + r.margin + r.train_loss)
        assert all(0 <= w <= n_held for w in r.wins)
    # both losses have DPO's value, log 2, at policy == reference on the first step
    assert results[0].train_loss[0] == pytest.approx(math.log(2), abs=1e-6)
    assert results[1].train_loss[0] == pytest.approx(math.log(2), abs=1e-6)
    assert jres is not None and jres.steps == [0, 2] and len(jres.loss) == 2
    assert jres.kl[0] == 0.0  # the untrained adapter is the reference
    assert [n for n, _, _ in jres.best_of_n] == [1, 2, 4, 8, 16]
    assert jres.best_of_n[0][1:] == (pytest.approx(0.5, abs=0.05), 0.0)
    for name in ("demo.png", "token_correlation.png"):
        assert (tmp_path / "a" / name).stat().st_size > 1000
    with open(tmp_path / "a" / "entanglement.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == min(8, n_held)
    assert all(-1.0 - 1e-6 <= float(r["cosine"]) <= 1.0 + 1e-6 for r in rows)
    out = capsys.readouterr().out
    assert out.count("verdict: ") == 4  # one per section: learning, entanglement, diagnosis, J-BOND
    assert "DERIVED" in out and "summary" in out and "ratio" in out and "`*`" in out
    # the same seed gives the same numbers
    again, jres2 = _smoke(tmp_path / "b", monkeypatch)
    assert [(r.chosen, r.rejected, r.train_loss) for r in again] == [
        (r.chosen, r.rejected, r.train_loss) for r in results
    ]
    assert jres2 is not None and (jres2.quantile, jres2.kl) == (jres.quantile, jres.kl)


def _res(name, chosen, margin, wins, n=64):
    from prefopt.demo import DemoResult

    k = len(margin)
    return DemoResult(
        loss=name,
        eval_steps=list(range(k)),
        chosen=chosen,
        rejected=[c - m for c, m in zip(chosen, margin)],
        margin=margin,
        accuracy=[w / n for w in wins],
        wins=wins,
    )


def test_learning_verdict_needs_the_binomial_bound_and_a_rising_margin():
    from prefopt.demo import _verdict_learning

    assert _verdict_learning(_res("dpo", [0, -1, -2], [0, 1, 2], [0, 30, 42]), 64).startswith("dpo LEARNED")
    assert "did NOT" in _verdict_learning(_res("dpo", [0, -1, -2], [0, 1, 2], [0, 30, 41]), 64)
    flat = _verdict_learning(_res("dpo", [0, -1, -2], [0, 2, 1], [0, 50, 60]), 64)
    assert "did NOT" in flat and "not rising" in flat


def test_entanglement_verdict_by_hand():
    from prefopt.demo import _verdict_entanglement

    base = _res("dpo", [0.0, -3.0], [0.0, 5.0], [0, 60])
    text = _verdict_entanglement(
        base,
        [
            _res("dpop", [0.0, 0.5], [0.0, 1.0], [0, 50]),
            _res("a", [0.0, -1.0], [0.0, 1.0], [0, 50]),
            _res("b", [0.0, -4.0], [0.0, 1.0], [0, 50]),
        ],
        64,
    )
    assert text.startswith("under dpo the held-out chosen log-prob FELL (-3.00 nats)")
    assert "dpop HELD it (Δ chosen +0.50" in text and "accuracy 50/64" in text
    assert "a reduced the fall" in text and "b did NOT hold it" in text
    assert "did not fall" in _verdict_entanglement(_res("dpo", [0.0, 1.0], [0.0, 5.0], [0, 60]), [], 64)


def test_jbond_verdict_by_hand():
    from prefopt.demo import _verdict_jbond

    bon = [(1, 0.5, 0.0), (2, 0.7, 0.2), (4, 0.8, 0.6)]
    j = JBondResult(quantile=[0.5, 0.75], quantile_se=[0.01, 0.01], kl=[0.0, 0.4], best_of_n=bon)
    assert _verdict_jbond(j).startswith("J-BOND RAISED") and "lies on it" in _verdict_jbond(j)
    j = JBondResult(quantile=[0.5, 0.6], quantile_se=[0.01, 0.01], kl=[0.0, 0.4], best_of_n=bon)
    assert "lies below it" in _verdict_jbond(j)
    j = JBondResult(quantile=[0.5, 0.51], quantile_se=[0.01, 0.01], kl=[0.0, 0.05], best_of_n=bon)
    assert "did not clearly raise" in _verdict_jbond(j)
