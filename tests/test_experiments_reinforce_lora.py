"""Reduced run of the lab experiment "LoRA against full REINFORCE" (experiments/reinforce_lora_full.py): the tiny
lab, one seed, a few steps. Asserts the direction of the headline with a statistical margin (never a wall-clock
time) and the memory count against a hand count."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _script():
    spec = importlib.util.spec_from_file_location(
        "reinforce_lora_full", ROOT / "experiments" / "reinforce_lora_full.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_reinforce_lora_full_reduced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("matplotlib", reason="the figure needs matplotlib (dev/plot extra)")
    out = tmp_path / "out.json"
    monkeypatch.setenv("PREFOPT_CACHE", str(tmp_path / "cache"))  # pre-trains the tiny lab (seconds)
    # in-process (the script's main) rather than a subprocess: saves a second interpreter's imports
    rc = _script().main(
        [
            "--lab", "tiny", "--seeds", "1", "--threads", "1", "--steps", "8", "--eval-every", "8",
            "--batch", "32", "--eval-prompts", "8", "--eval-samples", "32", "--pool", "256",
            "--rss-steps", "0", "--json", str(out), "--plot", str(tmp_path / "out.png"),
        ]
    )  # fmt: skip
    assert rc == 0
    res = json.loads(out.read_text())
    runs = {r["variant"]: r for r in res["runs"]}
    assert set(runs) == {"lora", "full"}
    lora, full = runs["lora"], runs["full"]
    # step 0: both policies are the reference (LoRA's B = 0; full's copy is exact) and are evaluated on the same
    # samples (same evaluation seed): KL exactly 0 and the same gold reward
    assert lora["evals"][0]["kl"] == 0.0 and full["evals"][0]["kl"] == 0.0
    assert lora["evals"][0]["reward"] == pytest.approx(full["evals"][0]["reward"], abs=1e-12)
    for r in (lora, full):
        first, last = r["evals"][0], r["evals"][-1]
        assert last["step"] == 8
        # the headline's direction: REINFORCE raises the gold reward by more than 4 standard errors
        se = (first["reward_se"] ** 2 + last["reward_se"] ** 2) ** 0.5
        assert last["reward"] - first["reward"] > 4 * se, (r["variant"], first, last)
    # the memory count, by hand: the tiny lab's Llama has 2 layers of width h = 48 and MLP width 2h = 96; rank-8
    # LoRA on every linear layer of a block (q, k, v, o: h→h; gate, up: h→2h; down: 2h→h) holds r·(in + out)
    h, r = 48, 8
    assert lora["trainable_params"] == 2 * r * (4 * (h + h) + 3 * (h + 2 * h))
    assert full["trainable_params"] == res["reference"]["num_parameters"]
    for run in (lora, full):
        m = run["memory_bytes"]
        assert (
            m["trainable_state"] == 4 * 4 * run["trainable_params"]
        )  # float32 weights, grads, 2 Adam moments
        assert m["activations"] > 0
    assert lora["memory_bytes"]["reference_copy"] == 0
    # LoraPolicy's unused EMA-anchor adapter has rank 2r on the same layers: twice the policy adapter's bytes
    assert lora["memory_bytes"]["anchor_adapter"] == 2 * lora["memory_bytes"]["trainable_weights"]
    assert full["memory_bytes"]["anchor_adapter"] == 0
    assert full["memory_bytes"]["reference_copy"] == full["memory_bytes"]["weights"]
    assert lora["memory_bytes"]["trainable_state"] < full["memory_bytes"]["trainable_state"]
    assert (tmp_path / "out.png").stat().st_size > 10_000
