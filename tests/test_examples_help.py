"""The examples behave like tools: ``--help`` explains every flag and shows its default."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted(p.name for p in (ROOT / "examples").glob("*.py"))


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"example_help_{name[:-3]}", ROOT / "examples" / name)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses need the module registered
    spec.loader.exec_module(mod)
    return mod


def _option_entries(text: str) -> dict[str, str]:
    """``{"--flag": "its help text"}`` for every entry of the options section of an argparse help text."""
    body = text.split("options:\n", 1)[1]
    entries: dict[str, str] = {}
    current = None
    for line in body.splitlines():
        if not line.strip():
            current = None
            continue
        m = re.match(r"^  (-\S+)", line)
        if m:
            flags = re.findall(r"(--?[\w-]+)", line.split("  ", 2)[1] if "  " in line.strip() else line)
            current = max(flags, key=len)
            entries[current] = line
        elif current is not None:
            entries[current] += "\n" + line
    return entries


def test_the_list_of_examples_is_complete() -> None:
    assert {"dpo_lora.py", "grpo_lora.py", "jbond.py", "ppo_lora.py", "reinforce_lora.py"} <= set(EXAMPLES)


@pytest.mark.parametrize("name", EXAMPLES)
def test_help_explains_every_flag_with_its_default(
    name: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    mod = _load(name)
    monkeypatch.setattr(sys, "argv", [name, "--help"])
    with pytest.raises(SystemExit) as exc:
        mod.main()
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage:") and (mod.__doc__ or "").splitlines()[0] in text
    entries = _option_entries(text)
    assert "--help" in entries and len(entries) >= 4, entries
    for flag, entry in entries.items():
        if flag == "--help":
            continue
        assert "(default:" in entry, f"{name} {flag}: no default shown:\n{entry}"
        words = entry.split("(default:")[0].split()
        described = [w for w in words if not w.startswith("-") and not w.isupper() and not w.startswith("{")]
        assert described, f"{name} {flag}: no help text:\n{entry}"


@pytest.mark.parametrize("name", ["dpo_lora.py", "grpo_lora.py", "ppo_lora.py", "reinforce_lora.py"])
def test_report_to_tensorboard_without_the_package_is_a_clear_error(name: str, tmp_path: Path) -> None:
    if importlib.util.find_spec("tensorboard") is not None:
        pytest.skip("tensorboard is installed here")
    mod = _load(name)
    with pytest.raises(
        SystemExit, match=r"needs the tensorboard package: pip install 'prefopt-rlhf\[tensorboard\]'"
    ):
        mod.main(["--smoke", "--out", str(tmp_path / "out"), "--report-to", "tensorboard"])


@pytest.mark.parametrize(
    "name", ["dpo_lora.py", "grpo_lora.py", "ppo_lora.py", "reinforce_lora.py", "jbond.py"]
)
def test_a_non_empty_out_is_refused_without_overwrite(name: str, tmp_path: Path) -> None:
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    mod = _load(name)
    with pytest.raises(SystemExit, match="--overwrite"):
        mod.main(["--smoke", "--out", str(tmp_path)])
    assert (tmp_path / "metrics.jsonl").read_text() == "{}\n"


@pytest.mark.parametrize("name", ["dpo_lora.py", "grpo_lora.py", "ppo_lora.py", "reinforce_lora.py"])
def test_resume_without_a_checkpoint_is_a_clear_error(name: str, tmp_path: Path) -> None:
    mod = _load(name)
    with pytest.raises(SystemExit, match="nothing to resume"):
        mod.main(["--smoke", "--out", str(tmp_path / "out"), "--resume", str(tmp_path)])
