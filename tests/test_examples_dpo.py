"""CI smoke test of examples/dpo_lora.py (tiny random model + char tokenizer + built-in pairs, 2 steps)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "dpo_lora.py"

pytestmark = pytest.mark.slow


def _run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"},
    )
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _metrics(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = {}
    for name, extra in (("dup", []), ("shared", ["--shared-prompt"])):
        path = tmp_path_factory.mktemp(name)
        proc = _run("--smoke", "--out", str(path), *extra)
        assert "smoke ok" in proc.stdout
        out[name] = path
    return out


def test_smoke_writes_adapter_metrics_and_summary(runs: dict[str, Path]) -> None:
    import peft

    from prefopt.testing import char_tokenizer, tiny_causal_lm

    out = runs["dup"]
    recs = _metrics(out)
    assert [r["step"] for r in recs] == [0, 1, 2, 2]  # before, 2 steps, after
    first = recs[1]
    # step 1: the adapter's B factors start at 0, so policy == reference and the DPO loss is exactly log 2
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    for key in ("rewards/chosen", "rewards/accuracies", "logps/chosen", "logps/rejected", "grad_norm"):
        assert math.isfinite(first[key])
    assert first["logps/chosen"] < 0 and first["grad_norm"] > 0
    # before training the held-out reward accuracy is 0 (all ties); the adapter then moved (margin != 0)
    assert recs[0]["eval/reward_accuracy"] == 0.0 and recs[0]["eval/margin"] == 0.0
    assert recs[-1]["eval/margin"] != 0.0 and recs[-1]["eval/pairs"] == 4
    summary = json.loads((out / "summary.json").read_text())
    assert summary["args"]["loss"] == "dpo" and summary["after"] == {
        k: v for k, v in recs[-1].items() if k != "step"
    }
    # the saved adapter loads with peft onto the same base model and is not zero
    tok = char_tokenizer()
    model = peft.PeftModel.from_pretrained(tiny_causal_lm("llama", vocab_size=len(tok), seed=0), str(out))
    b_norm = sum(float(p.abs().sum()) for n, p in model.named_parameters() if "lora_B" in n)
    assert b_norm > 0


def test_shared_prompt_run_matches_duplicated_run(runs: dict[str, Path]) -> None:
    """Same seed, same data: the exact shared-prompt forward gives the same training curve (fp32 rounding)."""
    dup, shared = _metrics(runs["dup"]), _metrics(runs["shared"])
    assert len(dup) == len(shared)
    for a, b in zip(dup, shared):
        for key, value in a.items():
            if key in ("seconds",) or not isinstance(value, float):
                continue
            assert b[key] == pytest.approx(value, rel=1e-4, abs=1e-4), key


def test_bad_loss_and_bad_hyperparameter_fail_clearly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In-process (argument errors happen before any model is built): a non-pairwise loss, a bad --hp."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("dpo_lora_example", SCRIPT)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert "dpo" in mod.pairwise_losses() and "simpo" in mod.pairwise_losses()
    assert "kto" not in mod.pairwise_losses() and "grpo" not in mod.pairwise_losses()
    assert mod.parse_hp(["beta=0.5", "f_divergence=forward_kl"]) == {
        "beta": 0.5,
        "f_divergence": "forward_kl",
    }
    monkeypatch.setattr(sys, "argv", ["dpo_lora.py", "--smoke", "--out", str(tmp_path), "--loss", "kto"])
    with pytest.raises(SystemExit, match="--loss must be a pairwise loss"):
        mod.main()
    monkeypatch.setattr(sys, "argv", ["dpo_lora.py", "--smoke", "--out", str(tmp_path), "--hp", "beta=-1"])
    with pytest.raises(ValueError, match="beta"):
        mod.main()
    monkeypatch.setattr(sys, "argv", ["dpo_lora.py", "--smoke", "--out", str(tmp_path), "--hp", "beta"])
    with pytest.raises(SystemExit, match="key=value"):
        mod.main()
