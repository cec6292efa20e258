"""`prefopt demo` on a tiny random model: runs end to end, prints the table, writes the figure."""

import math

import pytest

from prefopt.cli import main
from prefopt.demo import run_demo


@pytest.mark.slow
def test_demo_tiny_end_to_end(tmp_path, capsys):
    results = run_demo(tmp_path, steps=2, tiny=True, progress=False, losses=["dpo", "ipo"])
    assert [r.loss for r in results] == ["dpo", "ipo"]
    for r in results:
        assert len(r.chosen) == len(r.margin) == 3  # before training + 2 steps
        assert r.margin[0] == 0.0  # policy == reference before training
        assert all(math.isfinite(v) for v in r.chosen + r.rejected + r.margin + r.train_loss)
    assert results[0].train_loss[0] == pytest.approx(math.log(2), abs=1e-6)  # DPO at policy == reference
    assert (tmp_path / "demo_logps.png").stat().st_size > 1000
    out = capsys.readouterr().out
    assert "held-out results" in out and "dpo" in out


def test_cli_rejects_unknown_loss(tmp_path, capsys):
    assert main(["demo", "--tiny", "--steps", "1", "--out", str(tmp_path), "--losses", "nope"]) == 2
    assert "unknown loss" in capsys.readouterr().err


def test_cli_rejects_bad_steps(tmp_path, capsys):
    assert main(["demo", "--tiny", "--steps", "0", "--out", str(tmp_path)]) == 2
    assert "steps" in capsys.readouterr().err
