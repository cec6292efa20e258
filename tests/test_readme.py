"""The README's test command and .ci/run must stay identical (CI runs the README's command verbatim)."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _bash_blocks(text: str) -> list[str]:
    blocks, inside, current = [], False, []
    for line in text.splitlines():
        if line.strip().startswith("```bash"):
            inside, current = True, []
        elif line.strip().startswith("```") and inside:
            inside = False
            blocks.append("\n".join(current).strip())
        elif inside:
            current.append(line)
    return blocks


def test_ci_runs_the_readme_test_command_verbatim():
    readme = (ROOT / "README.md").read_text()
    commands = [b for b in _bash_blocks(readme) if "pytest" in b]
    assert len(commands) == 1, commands
    ci = (ROOT / ".ci" / "run").read_text()
    assert commands[0] in ci.splitlines()


def test_readme_has_exactly_two_setup_commands():
    blocks = _bash_blocks((ROOT / "README.md").read_text())
    assert len(blocks) == 2
    assert any(b.endswith("prefopt demo") for b in blocks)


def test_quickstart_install_line_is_the_readmes():
    readme = [b for b in _bash_blocks((ROOT / "README.md").read_text()) if "pytest" in b]
    quick = _bash_blocks((ROOT / "docs" / "quickstart.md").read_text())
    assert len(readme) == 1 and quick, "README test command or quickstart install block missing"
    assert readme[0].startswith(quick[0]), "the quickstart's install line must be the README's set-up command"
