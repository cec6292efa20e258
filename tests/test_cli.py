"""The `prefopt` command line: argument errors, help text, `diagnose` wiring (the demo itself: test_demo.py)."""

import pytest

from prefopt.cli import main


def test_cli_rejects_unknown_loss(tmp_path, capsys):
    assert (
        main(["demo", "--tiny", "--steps", "1", "--out", str(tmp_path), "--losses", "nope", "--threads", "1"])
        == 2
    )
    assert "unknown loss" in capsys.readouterr().err


def test_cli_rejects_bad_steps(tmp_path, capsys):
    assert main(["demo", "--tiny", "--steps", "0", "--out", str(tmp_path)]) == 2
    assert "steps" in capsys.readouterr().err


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
