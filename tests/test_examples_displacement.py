"""examples/displacement_study.py: its statistics against loop oracles, and the smoke run."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from types import ModuleType

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "displacement_study.py"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("displacement_study", SCRIPT)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_auc_and_spearman_against_loops():
    ex = _load()
    g = torch.Generator().manual_seed(0)
    s = torch.randint(0, 6, (40,), generator=g).double()  # many ties
    y = torch.rand(40, generator=g) < 0.4
    num = 0.0
    pos = [float(a) for a, lab in zip(s, y) if lab]
    neg = [float(a) for a, lab in zip(s, y) if not lab]
    for a in pos:
        for b in neg:
            num += 1.0 if a > b else 0.5 if a == b else 0.0
    assert ex.auc(s, y) == pytest.approx(num / (len(pos) * len(neg)), rel=1e-12)
    assert math.isnan(ex.auc(s, torch.zeros(40, dtype=torch.bool)))
    x = torch.randn(30, generator=g, dtype=torch.float64)
    z = x + 0.5 * torch.randn(30, generator=g, dtype=torch.float64)
    rx = [1 + sum(1 for b in x if b < a) for a in x]  # no ties: rank = 1 + #smaller
    rz = [1 + sum(1 for b in z if b < a) for a in z]
    d2 = sum((a - b) ** 2 for a, b in zip(rx, rz))
    assert ex.spearman(x, z) == pytest.approx(1 - 6 * d2 / (30 * (30**2 - 1)), rel=1e-12)
    assert ex.ranks(torch.tensor([3.0, 1.0, 3.0, 2.0])).tolist() == [3.5, 1.0, 3.5, 2.0]


def test_smoke_run(tmp_path):
    ex = _load()
    res = ex.main(["--smoke", "--out", str(tmp_path), "--threads", "0"])
    assert res["n_pairs"] == 8 and (tmp_path / "results.json").is_file()
    pp = {k: torch.tensor(v, dtype=torch.float64) for k, v in res["per_pair"].items()}
    assert all(len(v) == 8 and torch.isfinite(v).all() for v in pp.values())
    displaced = pp["measured_dchosen"] < 0
    assert res["predictors"]["alone/ches"]["auc"] == ex.auc(pp["ches"], displaced)
