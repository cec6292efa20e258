"""examples/entanglement.py: the smoke run in process, its numbers against hand-derived values.

Oracles: at policy == reference DPO's weights are d_w = d_l = β·σ(0) = β/2, so the first-order changes are
η·β/2·(‖∇_w‖² − ⟨∇_w,∇_l⟩) and η·β/2·(⟨∇_w,∇_l⟩ − ‖∇_l‖²); cosine and ratio recomputed from the saved inner
products and norms; the measured one-step change close to the prediction (a small step on a tiny model).
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "entanglement.py"


def _load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("entanglement_example", SCRIPT)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["entanglement_example"] = mod
    spec.loader.exec_module(mod)
    return mod


ex = _load_example()


def test_smoke_run_numbers_match_hand_derivation(tmp_path, capsys):
    result = ex.main(["--smoke", "--out", str(tmp_path), "--beta", "0.2", "--eta", "1e-3"])
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["pairs"] == result["pairs"] and len(saved["pairs"]) == 4
    d = 0.2 * 0.5  # β·σ(0): the policy equals the reference before any step
    for r in saved["pairs"]:
        nw, nl, inner = r["chosen_sqnorm"], r["rejected_sqnorm"], r["inner"]
        assert nw > 0 and nl > 0
        assert r["cosine"] == pytest.approx(inner / math.sqrt(nw * nl), rel=1e-9)
        assert r["ratio"] == pytest.approx(inner / min(nw, nl), rel=1e-9)
        assert r["pred_dchosen"] == pytest.approx(1e-3 * d * (nw - inner), rel=1e-6, abs=1e-12)
        assert r["pred_drejected"] == pytest.approx(1e-3 * d * (inner - nl), rel=1e-6, abs=1e-12)
        for side in ("dchosen", "drejected"):
            pred, meas = r[f"pred_{side}"], r[f"measured_{side}"]
            assert abs(meas - pred) <= 0.05 * abs(pred) + 2e-6, (side, pred, meas)
    summary = saved["summary"]
    falls = sum(r["pred_dchosen"] < 0 for r in saved["pairs"]) / 4
    assert summary["chosen_falls/frac"] == pytest.approx(falls)
    png = (tmp_path / "entanglement.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    out = capsys.readouterr().out
    assert "pred δS_w" in out and out.count("\n   ") >= 4


def test_bad_arguments_name_the_flag(tmp_path, capsys):
    for argv, flag in (
        (["--pairs", "0"], "--pairs"),
        (["--eta", "0"], "--eta"),
        (["--loss", "nope"], "--loss"),
    ):
        with pytest.raises(SystemExit):
            ex.parse_args(argv)
        assert flag in capsys.readouterr().err
    args = ex.parse_args(["--data", str(tmp_path / "nope.jsonl.gz")])
    with pytest.raises(SystemExit, match="--data: no such file"):
        ex.load(args)
