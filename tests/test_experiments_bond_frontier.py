"""experiments/bond_frontier.py without training: ``--merge`` (runs of several invocations into one summary)
and the continuous Best-of-N column of the summary."""

from __future__ import annotations

import importlib.util
import itertools
import json
import math
import statistics
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from prefopt.lab import best_of_n_frontier

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "experiments" / "bond_frontier.py"


@pytest.fixture(scope="module")
def bf() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bond_frontier_script", SCRIPT)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


BON = [{"n": 1, "quantile": 0.5, "kl": 0.0}, {"n": 4, "quantile": 0.7999996, "kl": 0.6362934}]
REF = {"loaded": True, "seconds": 0.0, "nll_per_token": 1.34, "num_parameters": 1000}


def _result(runs: list[tuple[str, int, list[tuple[float, float]]]], **settings: Any) -> dict[str, Any]:
    base = {"tiny": False, "steps": 2, "batch": 8, "eval_every": 1, "eval_prompts": 4, "eval_samples": 8,
            "pool": 64, "rank": 8, "lr": 3e-3, "eta": 0.1, "jeffreys_beta": 0.5, "rloo_k": 4}  # fmt: skip
    base.update(settings)
    out = []
    for label, seed, points in runs:
        evals = [{"step": i, "quantile": q, "quantile_se": 0.01, "kl": k, "kl_se": 0.01} for i, (q, k) in
                 enumerate(points)]  # fmt: skip
        out.append({"method": label, "label": label, "kl_coef": None, "seed": seed, "evals": evals})
    return {"settings": base, "reference": dict(REF), "best_of_n": [dict(p) for p in BON], "runs": out,
            "summary": {}, "wall_seconds": 10.0}  # fmt: skip


def _write(path: Path, res: dict[str, Any]) -> str:
    path.write_text(json.dumps(res))
    return str(path)


def test_merge_joins_runs_and_recomputes_the_summary(bf: ModuleType, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib", reason="the figure needs matplotlib (dev/plot extra)")
    # the old invocation has no "tiny" setting (absent counts as False) and seeds 0, 1 of bond4
    old = _result([("bond4", 0, [(0.5, 0.0), (0.70, 0.5)]), ("bond4", 1, [(0.5, 0.0), (0.76, 0.7)])])
    del old["settings"]["tiny"]
    new = _result([("bond4", 2, [(0.5, 0.0), (0.79, 0.6)]), ("qrpo", 0, [(0.5, 0.0), (0.9, 3.0)])], ref_k=16)
    a, b = _write(tmp_path / "a.json", old), _write(tmp_path / "b.json", new)
    assert bf.main(["--merge", f"{a},{b}", "--out", str(tmp_path / "m")]) == 0
    res = json.loads((tmp_path / "m" / "results.json").read_text())
    assert (tmp_path / "m" / "frontier.png").stat().st_size > 10_000
    assert [(r["label"], r["seed"]) for r in res["runs"]] == [
        ("bond4", 0),
        ("bond4", 1),
        ("bond4", 2),
        ("qrpo", 0),
    ]
    assert res["wall_seconds"] == 20.0 and [s["file"] for s in res["sources"]] == [a, b]
    assert res["runs"][3]["settings"] == {"ref_k": 16, "qrpo_beta": None}
    last = res["summary"]["bond4"][-1]
    qs, kls = [0.70, 0.76, 0.79], [0.5, 0.7, 0.6]
    assert last["seeds"] == 3 and last["step"] == 1
    assert last["quantile"] == pytest.approx(statistics.mean(qs), abs=1e-12)
    # 95% t-interval with 2 degrees of freedom: t = 4.303
    assert last["quantile_ci"] == pytest.approx(4.303 * statistics.stdev(qs) / math.sqrt(3), rel=1e-9)
    assert last["kl"] == pytest.approx(0.6, abs=1e-12)
    assert last["kl_ci"] == pytest.approx(4.303 * statistics.stdev(kls) / math.sqrt(3), rel=1e-9)
    n, q = best_of_n_frontier(0.6)
    assert last["frontier_n"] == pytest.approx(n) and last["frontier_quantile"] == pytest.approx(q)
    assert 3.8 < n < 4.0  # KL 0.6 is just below Best-of-4's 0.636
    one = res["summary"]["qrpo"][-1]
    assert one["seeds"] == 1 and math.isnan(one["quantile_ci"])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda r: r["settings"].update(steps=3), "steps=3"),
        (lambda r: r["settings"].update(tiny=True), "tiny=True"),
        (lambda r: r["reference"].update(nll_per_token=1.35), "different reference LM"),
        (lambda r: r["best_of_n"][1].update(quantile=0.8), "different pool"),
        (lambda r: r["runs"][0].update(seed=0), "bond4 seed 0 is in both"),
    ],
)
def test_merge_refuses_results_that_do_not_belong_together(
    bf: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str], change: Any, message: str
) -> None:
    a = _result([("bond4", 0, [(0.5, 0.0), (0.7, 0.5)])])
    b = _result([("bond4", 1, [(0.5, 0.0), (0.7, 0.5)])])
    change(b)
    pa, pb = _write(tmp_path / "a.json", a), _write(tmp_path / "b.json", b)
    with pytest.raises(SystemExit):
        bf.main(["--merge", f"{pa},{pb}", "--out", str(tmp_path / "m")])
    assert message in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


def test_merge_needs_two_files_and_runs_on_the_same_steps(bf: ModuleType, tmp_path: Path) -> None:
    pa = _write(tmp_path / "a.json", _result([("bond4", 0, [(0.5, 0.0)])]))
    with pytest.raises(SystemExit):
        bf.main(["--merge", pa, "--out", str(tmp_path / "m")])
    b = _result([("bond4", 1, [(0.5, 0.0), (0.7, 0.5)])])
    with pytest.raises(ValueError, match="different steps"):
        bf.merge([Path(pa), Path(_write(tmp_path / "b.json", b))])


def test_continuous_curve_spans_the_plot(bf: ModuleType) -> None:
    kl, q = bf.continuous_curve(6.5)
    assert kl[0] == 0.0 and q[0] == 0.5
    assert kl[-1] == pytest.approx(6.5, rel=1e-9)
    assert all(x < y for x, y in itertools.pairwise(q)) and all(x < y for x, y in itertools.pairwise(kl))


def test_merge_tolerance_accepts_a_re_pretrained_reference_and_records_the_difference(
    bf: ModuleType, tmp_path: Path
) -> None:
    pytest.importorskip("matplotlib", reason="the figure needs matplotlib (dev/plot extra)")
    a = _result([("bond4", 0, [(0.5, 0.0), (0.7, 0.5)])])
    b = _result([("vbon", 0, [(0.5, 0.0), (0.7, 0.5)])])
    b["reference"]["nll_per_token"] += 2e-7
    b["best_of_n"][1]["kl"] += 3e-6
    pa, pb = Path(_write(tmp_path / "a.json", a)), Path(_write(tmp_path / "b.json", b))
    with pytest.raises(ValueError, match="differs by 2e-07 > --merge-tol 0"):
        bf.merge([pa, pb])
    with pytest.raises(ValueError, match=r"differ by 3e-06 > --merge-tol 1e-06"):
        bf.merge([pa, pb], tol=1e-6)
    res = bf.merge([pa, pb], tol=1e-5)
    assert res["merge_check"]["tolerance"] == 1e-5
    assert res["merge_check"]["nll_per_token"] == pytest.approx(2e-7, rel=1e-6)
    assert res["merge_check"]["best_of_n"] == pytest.approx(3e-6, rel=1e-6)
    assert res["best_of_n"] == a["best_of_n"] and res["sources"][1]["best_of_n"] == b["best_of_n"]
    with pytest.raises(ValueError, match="--merge-tol must be"):
        bf.merge([pa, pb], tol=-1.0)
