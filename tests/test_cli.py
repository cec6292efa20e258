"""`prefopt demo` on a tiny random model: runs end to end, prints the table, writes the figure."""

import csv
import math

import pytest

from prefopt.cli import main
from prefopt.demo import run_demo


@pytest.mark.slow
def test_demo_tiny_end_to_end(tmp_path, capsys):
    results, jres = run_demo(
        tmp_path,
        steps=2,
        tiny=True,
        progress=False,
        losses=["dpo", "pairwise_normalized"],
        jbond_steps=2,
        threads=1,
    )
    assert [r.loss for r in results] == ["dpo", "pairwise_normalized"]
    for r in results:
        assert len(r.chosen) == len(r.margin) == 2  # before training + after step 2 (eval_every=2)
        assert r.eval_steps == [0, 2]
        assert r.margin[0] == 0.0  # policy == reference before training
        assert all(math.isfinite(v) for v in r.chosen + r.rejected + r.margin + r.train_loss)
    # both losses have DPO's value, log 2 at policy == reference, on the first step
    assert results[0].train_loss[0] == pytest.approx(math.log(2), abs=1e-6)
    assert results[1].train_loss[0] == pytest.approx(math.log(2), abs=1e-6)
    assert jres is not None and len(jres.loss) == 2 and len(jres.reward) == 2
    assert all(math.isfinite(v) for v in jres.loss + jres.reward)
    assert (tmp_path / "token_correlation.png").stat().st_size > 1000
    with open(tmp_path / "entanglement.csv", newline="") as f:
        csv_rows = list(csv.DictReader(f))
    assert len(csv_rows) == 8  # the 8 held-out pairs
    assert all(-1.0 - 1e-6 <= float(r["cosine"]) <= 1.0 + 1e-6 for r in csv_rows)
    assert (tmp_path / "demo_training.png").stat().st_size > 1000
    out = capsys.readouterr().out
    assert "summary" in out and "pairwise_normalized" in out and "entanglement report" in out


def test_cli_rejects_unknown_loss(tmp_path, capsys):
    assert (
        main(["demo", "--tiny", "--steps", "1", "--out", str(tmp_path), "--losses", "nope", "--threads", "1"])
        == 2
    )
    assert "unknown loss" in capsys.readouterr().err


def test_cli_rejects_bad_steps(tmp_path, capsys):
    assert main(["demo", "--tiny", "--steps", "0", "--out", str(tmp_path)]) == 2
    assert "steps" in capsys.readouterr().err


def test_brevity_reward_by_hand():
    from prefopt.demo import brevity_reward

    r = brevity_reward(["Paris.", "it is a city in France", "  Yes!  "])
    assert r.tolist() == pytest.approx([-0.1 + 1.0, -0.6, -0.1 + 1.0])


@pytest.mark.slow
def test_cli_diagnose_is_wired(tmp_path):
    out = tmp_path / "diag"
    code = main(
        [
            "diagnose",
            "--tiny",
            "--limit",
            "4",
            "--pairs",
            "2",
            "--heatmaps",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert code == 0
    assert (out / "pairs.csv").exists() and (out / "pairs.json").exists()
    assert list(out.glob("*.png"))


def test_cli_diagnose_unknown_loss(tmp_path, capsys):
    assert main(["diagnose", "--tiny", "--loss", "nope", "--out", str(tmp_path)]) == 2
    assert "nope" in capsys.readouterr().err


@pytest.mark.parametrize(("load", "expected"), [(0.0, 2), (0.6, 1), (1.2, 1), (7.5, 1)])
def test_auto_threads_leaves_busy_cores_alone(monkeypatch, load, expected):
    import os

    from prefopt.demo import auto_threads

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(os, "getloadavg", lambda: (load, 0.0, 0.0))
    assert auto_threads() == expected


# ------------------------------------------------------------------------------------------- user errors
def _one_error_line(capsys, command: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"prefopt {command}: error: "), err
    return err[0]


@pytest.mark.parametrize("command", ["demo", "diagnose"])
def test_out_that_is_a_file_is_one_error_line(tmp_path, capsys, command):
    f = tmp_path / "taken"
    f.write_text("x")
    assert main([command, "--tiny", "--out", str(f)]) == 2
    assert "--out" in _one_error_line(capsys, command)
    assert f.read_text() == "x"


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        (None, "holds no"),  # an empty folder
        (["null"], "none of them a JSON object"),
        (["null", "[1, 2]"], "none of them a JSON object"),
        (['{"prompt": "p", '], "not valid JSON"),
    ],
)
def test_diagnose_bad_data_is_one_error_line(tmp_path, capsys, rows, message):
    data = tmp_path / "data"
    data.mkdir()
    if rows is not None:
        (data / "d.jsonl").write_text("\n".join(rows) + "\n")
    code = main(["diagnose", "--tiny", "--data", str(data), "--out", str(tmp_path / "o"), "--no-progress"])
    assert code == 2
    assert message in _one_error_line(capsys, "diagnose")


def test_debug_env_gives_the_traceback(tmp_path, monkeypatch):
    f = tmp_path / "taken"
    f.write_text("x")
    monkeypatch.setenv("PREFOPT_DEBUG", "1")
    with pytest.raises(NotADirectoryError, match="--out"):
        main(["demo", "--tiny", "--out", str(f)])


def test_help_is_plain_text_and_describes_every_demo_flag(capsys):
    import re

    from prefopt.cli import _parser

    parser = _parser()
    top = parser.format_help()
    assert "``" not in top and ":class:" not in top and ":func:" not in top
    demo = next(a for a in parser._subparsers._group_actions[0].choices.items() if a[0] == "demo")[1]
    text = demo.format_help()
    assert "offline tour" in text
    flags = [a for a in demo._actions if a.option_strings and a.dest != "help"]
    for action in flags:
        assert action.help, f"demo flag {action.option_strings} has no help"
    assert re.search(r"--seed SEED\s+seed of data order", text)
    diagnose = parser._subparsers._group_actions[0].choices["diagnose"].format_help()
    assert "``" not in diagnose and ":class:" not in diagnose and ":func:" not in diagnose
    assert "prefopt.diagnostics.EntanglementReport" in diagnose
