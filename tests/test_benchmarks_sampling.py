"""benchmarks/sampling.py: the whole-step summary, ratios and plot on hand-made records, and a tiny end-to-end
run of the HF worker with ``--step grpo`` (``--tiny``: a tiny random Llama, 2 prompts × 2 completions × 4
tokens)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


bench = _load("benchmarks_sampling", ROOT / "benchmarks" / "sampling.py")


def _record(total: float, sync: float, gen: float, score: float, reward: float, tokens: int = 8) -> dict:
    return {
        "total_s": total,
        "sync_s": sync,
        "gen_s": gen,
        "score_s": score,
        "reward_s": reward,
        "loss_backward_s": total - sync - gen - score - reward,
        "tokens": tokens,
        "gen_tok_per_s": tokens / gen,
    }


def test_step_summary_and_ratios_hand_computed(tmp_path):
    hf = [_record(10, 0, 4, 3, 0.5), _record(12, 0, 6, 3, 0.5), _record(20, 0, 8, 5, 1.0)]
    vl = [_record(9, 2, 2, 3, 0.5), _record(7, 1, 1, 3, 0.5)]
    s = {"hf": bench.step_summary(hf), "vllm-merged": bench.step_summary(vl)}
    # medians by hand: hf totals 10, 12, 20 -> 12; gens 4, 6, 8 -> 6; vllm (two steps) -> midpoints
    assert s["hf"]["total_s"] == 12 and s["hf"]["gen_s"] == 6 and s["hf"]["steps"] == 3
    assert s["hf"]["loss_backward_s"] == 2.5  # parts 2.5, 2.5, 6.0
    assert s["vllm-merged"]["total_s"] == 8 and s["vllm-merged"]["sync_s"] == 1.5
    assert s["vllm-merged"]["gen_tok_per_s"] == (8 / 2 + 8 / 1) / 2
    r = bench.step_ratios(s)
    assert r["hf"] == {"step_time_vs_hf": 1.0, "gen_time_vs_hf": 1.0, "gen_tok_per_s_vs_hf": 1.0}
    assert r["vllm-merged"]["step_time_vs_hf"] == pytest.approx(8 / 12)
    assert r["vllm-merged"]["gen_time_vs_hf"] == pytest.approx(1.5 / 6)
    assert r["vllm-merged"]["gen_tok_per_s_vs_hf"] == pytest.approx(6.0 / (8 / 6))
    result = {
        "step": {"summary": s, "ratios": r},
        "config": {"prompts": 1, "n": 2, "max_new_tokens": 4},
        "machine": {"cpus": 2},
        "workers": [{"load_before": [3.0, 2.0, 1.0], "load_after": [4.0, 2.0, 1.0]}],
    }
    (tmp_path / "s.json").write_text(json.dumps(result))
    bench.main(["--replot", str(tmp_path / "s.json"), "--plot", str(tmp_path / "s.png")])
    assert (tmp_path / "s.png").stat().st_size > 10_000


def test_diversity_reward_hand_computed():
    assert bench.diversity_reward(["a b a", "", "x"]) == [2 / 4, 0.0, 1 / 2]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--skip-gen"], "--skip-gen needs --step grpo"),
        (["--plot", "x.png"], "--plot needs --step grpo"),
        (["--step", "grpo", "--n", "1"], "--n >= 2"),
        (["--replot", "x.json"], "--replot needs --plot PATH"),
        (["--tiny"], "--tiny needs --skip-vllm"),
    ],
)
def test_flags_that_need_step_are_refused(extra, message, capsys):
    with pytest.raises(SystemExit) as err:
        bench.main([*extra] if extra == ["--tiny"] else ["--skip-vllm", *extra])
    assert err.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_tiny_grpo_step_run_writes_every_field(tmp_path):
    out, png = tmp_path / "s.json", tmp_path / "s.png"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "benchmarks/sampling.py", "--skip-vllm", "--tiny", "--step", "grpo"]
    cmd += ["--prompts", "2", "--n", "2", "--max-new-tokens", "4", "--steps", "2", "--warmup", "0"]
    cmd += ["--rounds", "1", "--json", str(out), "--plot", str(png)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    res = json.loads(out.read_text())
    assert res["complete"] is True and res["sequences_per_call"] == 4 and res["config"]["tiny"] is True
    # generation timing: both HF modes, two timed calls each (the random model may hit the stop id early)
    assert set(res["summary"]) == {"hf", "hf-merged"}
    assert all(len(res["records"][m]) == 2 for m in ("hf", "hf-merged"))
    assert 0 < res["summary"]["hf"]["mean_completion_len"] <= 4
    # whole steps: two per HF sampler, parts that add up to the step's wall time
    step = res["step"]
    assert step["kind"] == "grpo" and set(step["summary"]) == {"hf", "hf-merged"}
    for mode, recs in step["records"].items():
        assert len(recs) == 2
        for r in recs:
            assert 4 <= r["tokens"] <= 4 * 4 and r["sync_s"] == 0.0  # nothing to sync for HF
            parts = sum(r[k] for k in bench.STEP_PARTS)
            assert parts == pytest.approx(r["total_s"], rel=1e-9, abs=1e-9), mode
            assert all(r[k] >= 0 for k in bench.STEP_PARTS)
            assert r["score_s"] > 0 and r["loss_backward_s"] > 0
            assert r["loss"] == r["loss"]  # finite, not NaN
    assert step["ratios"]["hf"]["step_time_vs_hf"] == 1.0
    assert step["ratios"]["hf-merged"]["step_time_vs_hf"] == pytest.approx(
        step["summary"]["hf-merged"]["total_s"] / step["summary"]["hf"]["total_s"]
    )
    assert res["versions"]["torch"] and res["machine"]["cpus"] == os.cpu_count()
    (w,) = res["workers"]
    assert w["kind"] == "hf" and len(w["load_before"]) == 3 and len(w["load_after"]) == 3
    assert png.stat().st_size > 10_000
