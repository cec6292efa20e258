"""Reduced run of ``experiments/entanglement_lab.py``: one seed, a smaller lab, DPO and DPOP only. Asserts the
direction of the headline with a statistical margin (never a wall-clock time): DPO lowers the chosen log-prob
while the margin grows on most pairs, DPOP keeps it up, and the entanglement report's first-order prediction
ranks the one-step change it predicts."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def test_entanglement_lab_reduced(tmp_path: Path) -> None:
    out = tmp_path / "res.json"
    cmd = [
        sys.executable,
        str(ROOT / "experiments" / "entanglement_lab.py"),
        "--tiny",
        "--seeds",
        "1",
        "--pairs",
        "64",
        "--steps",
        "40",
        "--lr",
        "3e-3",
        "--methods",
        "dpo,dpop",
        "--eval-prompts",
        "8",
        "--eval-samples",
        "32",
        "--pool",
        "256",
        "--bootstrap",
        "200",
        "--threads",
        "1",
        "--json",
        str(out),
    ]
    env = {**os.environ, "PREFOPT_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    runs = {r["method"]: r for r in res["runs"]}
    assert set(runs) == {"dpo", "dpop"}
    n = len(res["pairs"]["kind"])
    assert n == 128 and res["pairs"]["kind"].count("shared") == 64

    # the pairs: shared pairs share most tokens, distinct pairs few
    shared = [f for f, k in zip(res["pairs"]["shared"], res["pairs"]["kind"], strict=True) if k == "shared"]
    distinct = [
        f for f, k in zip(res["pairs"]["shared"], res["pairs"]["kind"], strict=True) if k == "distinct"
    ]
    assert min(shared) >= 1 - 1 / 6 - 1e-9 and sum(distinct) / len(distinct) < 0.5

    # headline 1: DPO lowers the chosen log-prob while the margin grows, on most pairs (binomial, 3 s.e.)
    p = runs["dpo"]["stats"]["all/all"]["displaced"]
    assert p - 3 * math.sqrt(p * (1 - p) / n) > 0.5, runs["dpo"]["stats"]
    assert runs["dpo"]["stats"]["all/all"]["margin"] > 0

    # headline 2: DPOP keeps the chosen log-prob up: per-pair paired difference to DPO, 3 s.e. above 0
    diff = [a - b for a, b in zip(runs["dpop"]["end_dchosen"], runs["dpo"]["end_dchosen"], strict=True)]
    mean = sum(diff) / n
    se = math.sqrt(sum((d - mean) ** 2 for d in diff) / (n - 1) / n)
    assert mean - 3 * se > 0, (mean, se)

    # headline 3: the report's first-order δS_w ranks the measured one-step change (bootstrap lower bound)
    row = next(
        r
        for r in res["predictors"]
        if r["subset"] == "all" and r["target"] == "one step" and r["predictor"].startswith("first-order")
    )
    assert row["spearman_lo"] > 0.9, row
    # every predictor row is a well-formed interval around its value
    for r in res["predictors"]:
        if not math.isnan(r["auc"]):
            assert r["auc_lo"] <= r["auc"] + 1e-9 and r["auc"] <= r["auc_hi"] + 1e-9
