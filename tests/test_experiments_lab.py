"""Reduced runs of the lab experiments: one seed, few steps, a smaller lab; each asserts the direction of its
headline with a statistical margin (never a wall-clock time)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def test_bond_frontier_reduced(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib", reason="the figure needs matplotlib (dev/plot extra)")
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        str(ROOT / "experiments" / "bond_frontier.py"),
        "--tiny",
        "--seeds",
        "1",
        "--steps",
        "25",
        "--batch",
        "32",
        "--eval-every",
        "25",
        "--eval-prompts",
        "8",
        "--eval-samples",
        "32",
        "--pool",
        "512",
        "--methods",
        "jbond,bond4",
        "--threads",
        "1",
        "--out",
        str(out),
    ]
    env = {**os.environ, "PREFOPT_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert (out / "frontier.png").stat().st_size > 10_000
    bon = {p["n"]: p for p in res["best_of_n"]}
    assert bon[1]["kl"] == 0.0 and bon[1]["quantile"] == pytest.approx(0.5, abs=0.02)
    for run in res["runs"]:
        first, last = run["evals"][0], run["evals"][-1]
        # the untrained adapter is the reference: KL exactly 0, quantile ½ within 4 standard errors
        assert first["kl"] == 0.0 and abs(first["quantile"] - 0.5) < 4 * first["quantile_se"]
        # the headline's direction: distillation moves the quantile up, at a positive KL
        gain = last["quantile"] - first["quantile"]
        se = (last["quantile_se"] ** 2 + first["quantile_se"] ** 2) ** 0.5
        assert gain > 4 * se, (run["label"], first, last)
        assert last["kl"] > 4 * last["kl_se"]


def test_bon_family_frontier_reduced(tmp_path: Path) -> None:
    """BoNBoN, vBoN and QRPO (N = 4; QRPO at the registry's β = 0.1) from the tiny lab's reference samples, in
    one invocation: each raises the quantile by more than 4 standard errors at a positive KL, from an
    exact-reference start (measured: 12 to 21 standard errors at seeds 3 and 4)."""
    pytest.importorskip("matplotlib", reason="the figure needs matplotlib (dev/plot extra)")
    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "experiments" / "bond_frontier.py"), "--tiny", "--seeds", "1",
           "--first-seed", "3", "--steps", "15", "--batch", "32", "--eval-every", "15", "--eval-prompts", "8",
           "--eval-samples", "32", "--pool", "256", "--ref-k", "16", "--methods", "bonbon,vbon,qrpo",
           "--threads", "1", "--out", str(out)]  # fmt: skip
    env = {**os.environ, "PREFOPT_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert [(r["method"], r["seed"]) for r in res["runs"]] == [("bonbon", 3), ("vbon", 3), ("qrpo", 3)]
    for run in res["runs"]:
        first, last = run["evals"][0], run["evals"][-1]
        assert first["kl"] == 0.0 and abs(first["quantile"] - 0.5) < 4 * first["quantile_se"]
        gain = last["quantile"] - first["quantile"]
        se = (last["quantile_se"] ** 2 + first["quantile_se"] ** 2) ** 0.5
        assert gain > 4 * se, (run["label"], first, last)
        assert last["kl"] > 4 * last["kl_se"]
        # the summary places the run against the continuous Best-of-N curve at its KL
        row = res["summary"][run["label"]][-1]
        assert row["kl"] == last["kl"] and row["frontier_quantile"] > 0.5
        assert row["frontier_quantile"] == pytest.approx(row["frontier_n"] / (row["frontier_n"] + 1))
