"""Docstring notation: the docstrings of ``src/prefopt`` are Markdown for mkdocstrings, not reStructuredText.

Every module, class, function and attribute docstring (found with ``ast``) is scanned for markup that the docs
site would show raw or that a strict build cannot resolve: Sphinx roles (``:func:`x```; write the
mkdocstrings cross-reference ``[`x`][prefopt.module.x]`` or a code span), RST directives (``.. math::``; write
``$$ … $$`` for MathJax), RST simple or grid tables (write a Markdown table), the RST literal-block marker
``text::`` (write ``text:`` and keep the indented block), and citations of notes that are not part of the
repository (cite the paper and the equation number instead). Inline math has one notation too: ``\\( … \\)``,
not ``$…$``.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
SRC = ROOT / "src" / "prefopt"

# Files allowed to keep RST markup: none (every docstring is Markdown). Keep it empty.
ALLOWED: set[str] = set()

CHECKS: dict[str, re.Pattern[str]] = {
    "Sphinx role": re.compile(
        r":(?:py:)?(?:class|func|meth|mod|attr|data|obj|exc|const|math|ref|doc|term|cite):`"
    ),
    "RST directive": re.compile(r"^[ \t]*\.\. [a-zA-Z-]+::", re.M),
    "RST simple table": re.compile(r"^[ \t]*=+(?:[ ]+=+)+[ \t]*$", re.M),
    "RST grid table": re.compile(r"^[ \t]*\+(?:[-=]+\+){2,}[ \t]*$", re.M),
    "RST literal-block marker": re.compile(r"^(?![ \t]*\.\. ).*\S?::[ \t]*$", re.M),
    "citation of a file outside the repository": re.compile(
        r"\b(?:ALGORITHMS|FRONTIER|DESIGN|PEERS)\.md\b|shared/reference"
    ),
}
# inline math is written \( … \) (display math $$ … $$); checked outside code spans and $$ blocks
SINGLE_DOLLAR = re.compile(r"(?<![\\$])\$(?!\$)\S(?:[^$]*?\S)?(?<!\\)\$(?!\$)")
_CODE_OR_DISPLAY = re.compile(r"(`+).+?\1|\$\$.+?\$\$", re.S)


def notation_problems(text: str) -> list[str]:
    """``"<check>: <offending line>"`` for every problem in one docstring (empty when it is clean)."""
    problems = []
    for name, pattern in CHECKS.items():
        for m in pattern.finditer(text):
            start = text.rfind("\n", 0, m.start()) + 1
            end = text.find("\n", m.end())
            line = text[start : end if end >= 0 else len(text)].strip()
            problems.append(f"{name}: {line[:120]}")
    for m in SINGLE_DOLLAR.finditer(_CODE_OR_DISPLAY.sub(" ", text)):
        problems.append(f"single-dollar inline math: {m.group(0)[:120]}")
    return problems


def _docstrings(tree: ast.Module) -> list[tuple[int, str]]:
    """``(line, text)`` of the module, class, function and attribute docstrings (a string statement right
    after an assignment in a module or class body, as griffe reads them)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=False)
            if doc is not None:
                found.append((node.body[0].lineno, doc))
        if isinstance(node, (ast.Module, ast.ClassDef)):
            for prev, stmt in zip(node.body, node.body[1:]):
                if (
                    isinstance(prev, (ast.Assign, ast.AnnAssign))
                    and isinstance(stmt, ast.Expr)
                    and isinstance(stmt.value, ast.Constant)
                    and isinstance(stmt.value.value, str)
                ):
                    found.append((stmt.lineno, stmt.value.value))
    return found


def _source_files() -> list[Path]:
    files = sorted(SRC.rglob("*.py"))
    assert len(files) > 30, f"expected the prefopt sources under {SRC}"
    return files


def test_docstrings_have_no_rst_markup_or_outside_citations() -> None:
    problems = []
    for path in _source_files():
        rel = path.relative_to(ROOT).as_posix()
        if rel in ALLOWED:
            continue
        for line, doc in _docstrings(ast.parse(path.read_text(), filename=rel)):
            problems += [f"{rel}:{line}: {p}" for p in notation_problems(doc)]
    assert not problems, "docstring notation (see this test's module docstring):\n" + "\n".join(problems)


def test_allowed_files_exist() -> None:
    """A renamed or deleted file must leave ALLOWED too (the set only lists files that still need work)."""
    missing = sorted(rel for rel in ALLOWED if not (ROOT / rel).is_file())
    assert not missing, f"ALLOWED names files that do not exist: {missing}"


@pytest.mark.parametrize(
    ("text", "check"),
    [
        ("Returns a :class:`Rollout`.", "Sphinx role"),
        ("see :func:`prefopt.losses.margin.dpo`", "Sphinx role"),
        ("inline :math:`x^2` here", "Sphinx role"),
        ("Summary.\n\n    .. math::\n\n        x = 1\n", "RST directive"),
        ("Table:\n\n=====  =====\na      b\n=====  =====\n", "RST simple table"),
        ("+-----+-----+\n| a   | b   |\n+=====+=====+\n", "RST grid table"),
        ("The formula::\n\n    x = 1\n", "RST literal-block marker"),
        ("Derived in ALGORITHMS.md §3.", "citation of a file outside the repository"),
        ("see /work/shared/reference/FRONTIER.md", "citation of a file outside the repository"),
        ("the ratio $\\rho_t$ of token $t$", "single-dollar inline math"),
        ("a bound $x\n+ y$ across a line", "single-dollar inline math"),
    ],
)
def test_scanner_flags_rst(text: str, check: str) -> None:
    assert any(p.startswith(check + ":") for p in notation_problems(text)), notation_problems(text)


def test_scanner_accepts_markdown() -> None:
    text = (
        "Returns a [`Rollout`][prefopt.sampling.Rollout] (see ``prefopt.sampling``).\n\n"
        "$$\nL = -\\log \\sigma(\\beta h)\n$$\n\n"
        "with \\( h = \\rho_w - \\rho_l \\) (Rafailov et al. 2023, arXiv 2305.18290, Eq. 7):\n\n"
        "| loss | input kind |\n|---|---|\n| ``dpo`` | ``pairs`` |\n\n"
        "The flow:\n\n    a ─► b\n\n"
        "Cached under ``$PREFOPT_CACHE/lab``; $$ x = 1 $$ and\n$$\ny = 2\n$$\n\n"
        "Args:\n    x: ``x[::2]`` every other row; a dict ``{'a': 1}``.\n"
    )
    assert notation_problems(text) == []


def test_scanner_reads_every_kind_of_docstring() -> None:
    source = (
        '"""Module :func:`a`."""\n'
        'X = 1\n"""Attribute :data:`X`."""\n'
        'class C:\n    """Class :class:`C`."""\n'
        '    def f(self):\n        """Method :meth:`f`."""\n'
        'async def g():\n    """Coroutine :func:`g`."""\n'
    )
    docs = _docstrings(ast.parse(source))
    assert sorted(line for line, _ in docs) == [1, 3, 5, 7, 9]
    assert all(notation_problems(doc) for _, doc in docs)


def rendering_problems(html: str) -> list[str]:
    """Math or list markup that Markdown (with ``pymdownx.arithmatex``) left as text in one rendered docstring."""
    text = re.sub(r'<(span|div) class="arithmatex">.*?</\1>', "", html, flags=re.S)
    text = re.sub(r"<code>.*?</code>|<pre>.*?</pre>", "", text, flags=re.S)
    problems = []
    if "$$" in text:
        problems.append("display math $$ not rendered (inside a list item it needs 4 spaces of indentation)")
    if re.search(r"\\[(\[]|\\(?:frac|log|sum|sigma|beta|mathrm)\b", text):
        problems.append("raw LaTeX outside math")
    if re.search(r"<p>(?:(?!</p>).)*\n\s*- ", text, flags=re.S):
        problems.append("a '- ' bullet swallowed by the paragraph above (leave a blank line before it)")
    return problems


def test_rendering_check_can_fail() -> None:
    assert rendering_problems('<p>a</p><div class="arithmatex">\\[ x \\]</div><p>b <code>$$</code></p>') == []
    assert rendering_problems("<p>$$\nx = 1\n$$</p>")
    assert rendering_problems("<p>with \\(x\\) inline</p>")
    assert rendering_problems("<p>first bullet text\n- second bullet</p>")


def test_docstring_math_and_lists_render() -> None:
    """Every text part of every docstring (description, Args/Returns entries), rendered with the docs site's
    Markdown extensions: math becomes MathJax input, no ``$$`` or LaTeX is left as text, no bullet is lost."""
    griffe = pytest.importorskip("griffe")
    markdown = pytest.importorskip("markdown")
    pytest.importorskip("pymdownx.arithmatex")
    md = markdown.Markdown(
        extensions=[
            "admonition",
            "attr_list",
            "def_list",
            "footnotes",
            "tables",
            "pymdownx.superfences",
            "pymdownx.arithmatex",
        ],
        extension_configs={"pymdownx.arithmatex": {"generic": True}},
    )
    pkg = griffe.load("prefopt", search_paths=[str(ROOT / "src")])

    def walk(obj: object) -> list[object]:
        out = [obj]
        for member in obj.members.values():  # type: ignore[attr-defined]
            if not member.is_alias:
                out += walk(member)
        return out

    problems, seen = [], 0
    for obj in walk(pkg):
        doc = obj.docstring  # type: ignore[attr-defined]
        rel = Path(obj.filepath).resolve().relative_to(ROOT).as_posix()  # type: ignore[attr-defined]
        if doc is None or rel in ALLOWED:
            continue
        texts = []
        for section in doc.parse("google"):
            value = section.value
            if isinstance(value, str):
                texts.append(value)
            elif isinstance(value, list):
                texts += [getattr(item, "description", "") or "" for item in value]
            else:
                texts.append(getattr(value, "description", "") or "")
        for text in texts:
            md.reset()
            problems += [f"{obj.path}: {p}" for p in rendering_problems(md.convert(text))]  # type: ignore[attr-defined]
        seen += 1
    assert seen > 300, f"only {seen} docstrings found"
    assert not problems, "\n".join(problems)
