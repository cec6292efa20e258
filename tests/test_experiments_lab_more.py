"""Reduced runs of lab experiments 3 (LoRA vs full reward models) and 4 (pairwise-loss shoot-out): one seed, a
smaller lab, fewer pairs and steps; each asserts the direction of its headline with a statistical margin
(never a wall-clock time)."""

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


def _run(script: str, args: list[str], tmp_path: Path) -> dict:
    out = tmp_path / "out.json"
    cmd = [sys.executable, str(ROOT / "experiments" / script), "--tiny", "--seeds", "1", "--threads", "1"]
    env = {**os.environ, "PREFOPT_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run(
        [*cmd, *args, "--json", str(out)], capture_output=True, text=True, timeout=900, env=env, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_reward_lora_reduced(tmp_path: Path) -> None:
    res = _run(
        "reward_lora.py",
        ["--variants", "full,lora16", "--train-pairs", "1536", "--held-out", "1024", "--epochs", "3"],
        tmp_path,
    )
    runs = {r["variant"]: r for r in res["runs"]}
    n = res["held_out_pairs"]
    assert n == 1024
    for r in runs.values():
        # both reward models learn the gold preference: accuracy above chance by more than 4 standard errors
        se = math.sqrt(r["accuracy"] * (1 - r["accuracy"]) / n)
        assert r["accuracy"] - 0.5 > 4 * se, r
    lora, full = runs["lora16"], runs["full"]
    # the headline: a rank-16 LoRA reward model is not worse than full fine-tuning beyond the sampling error of
    # the paired difference over held-out pairs (4 standard errors), with fewer trainable parameters
    diff = [a - b for a, b in zip(lora["correct"], full["correct"], strict=True)]
    mean = sum(diff) / n
    se = math.sqrt(sum((d - mean) ** 2 for d in diff) / (n - 1) / n)
    assert mean > -4 * se, (lora["accuracy"], full["accuracy"], se)
    assert lora["trainable_params"] < 0.6 * full["trainable_params"]
    assert lora["memory_bytes"]["gradients"] < 0.6 * full["memory_bytes"]["gradients"]


def test_pairwise_shootout_reduced(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib", reason="the figure needs matplotlib (dev/plot extra)")
    res = _run(
        "pairwise_shootout.py",
        [
            "--losses",
            "dpo,sft",
            "--train-pairs",
            "512",
            "--steps",
            "32",
            "--eval-every",
            "32",
            "--eval-prompts",
            "8",
            "--eval-samples",
            "64",
            "--pool",
            "512",
            "--lr",
            "1e-3",
        ],
        tmp_path,
    )
    assert (tmp_path / "out.png").stat().st_size > 10_000
    runs = {r["loss"]: r for r in res["runs"]}
    for r in runs.values():
        first, last = r["evals"][0], r["evals"][-1]
        # the untrained adapter is the reference: KL exactly 0, win-rate ½ within 4 standard errors
        assert first["kl"] == 0.0 and abs(first["quantile"] - 0.5) < 4 * first["quantile_se"]
        # every loss learns from the gold-labelled pairs: win-rate up by > 4 standard errors, at a positive KL
        se = math.hypot(first["quantile_se"], last["quantile_se"])
        assert last["quantile"] - first["quantile"] > 4 * se, (r["loss"], first, last)
        assert last["kl"] > 4 * last["kl_se"]
    # the headline's direction: the preference loss beats imitation of the chosen completions
    dpo, sft = runs["dpo"]["evals"][-1], runs["sft"]["evals"][-1]
    se = math.hypot(dpo["quantile_se"], sft["quantile_se"])
    assert dpo["quantile"] - sft["quantile"] > 4 * se, (dpo, sft)
