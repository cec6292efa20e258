"""Griffe extension for the docs build: render the reStructuredText markup of prefopt docstrings as Markdown.

Some docstrings were written with Sphinx in mind. Markdown would show that markup raw, so at render time
(the source files are not changed) this rewrites, in every docstring of the package:

- cross-reference roles (``:class:``, ``:func:``, ``:meth:``, ``:mod:``, ``:attr:``, ``:data:``, ``:obj:``,
  ``:exc:``, ``:const:``) to mkdocstrings cross-references ``[`X`][full.path]``. The target is resolved with
  griffe in the scope of the documented object (``LoraPolicy`` inside ``prefopt.policy``), then, failing
  that, as the unique public object whose path ends with the name (``dpo`` -> ``prefopt.losses.margin.dpo``).
  Only targets that a ``::: module`` directive of ``docs/api/*.md`` renders become links; everything else
  (ambiguous, external, private, undocumented names) becomes a plain code span, so ``mkdocs build --strict``
  never meets an unresolved reference. ``~a.b.C`` shows ``C`` and ``Title <a.b.C>`` shows ``Title``, as in
  Sphinx;
- inline ``:math:`…``` to ``\\( … \\)`` (MathJax through ``pymdownx.arithmatex``);
- the literal-block marker ``text::`` (before an indented block) to ``text:`` (a lone ``::`` is dropped), as
  Sphinx shows it; the indented block stays a code block;
- RST *simple* tables (``=====  =====`` borders, optional header, continuation lines with an empty first
  column) to Markdown tables; a two-column table without a header becomes a definition list (``def_list``).

Loaded by ``mkdocs.yml`` (``extensions: [docs/api/griffe_rst_markup.py:RstMarkup]``).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from griffe import Extension

API_DIR = Path(__file__).parent

_ROLE = re.compile(
    r":(?:py:)?(?P<role>class|func|meth|mod|attr|data|obj|exc|const):`(?P<content>[^`]+)`(?:\\ )?"
)
_MATH_ROLE = re.compile(r":math:`(?P<body>[^`]+)`")
_BORDER = re.compile(r"^(?P<indent>[ \t]*)=+(?:[ ]+=+)+[ \t]*$")
_EXPLICIT_TITLE = re.compile(r"^(?P<title>.+?)\s*<(?P<target>[^<>]+)>$", re.S)
_CODE_SPAN = re.compile(r"(`+).+?\1", re.S)
# ``text::`` / ``text ::`` / ``::`` ending a paragraph line, then a blank line and an indented line
_LITERAL_MARKER = re.compile(
    r"^(?P<indent>[ \t]*)(?P<text>(?!\.\. )\S.*?)?(?P<sp>[ \t]*)::[ \t]*\n(?=[ \t]*\n(?P=indent)[ \t]+\S)",
    re.M,
)


# ---------------------------------------------------------------------------------------------- roles


def role_parts(content: str) -> tuple[str, str]:
    """``(title, target)`` of a role's content: ``~a.b.C`` -> ``("C", "a.b.C")``, ``T <a.b>`` -> ``("T", "a.b")``."""
    content = " ".join(content.split())
    explicit = _EXPLICIT_TITLE.match(content)
    if explicit:
        return explicit["title"], explicit["target"].lstrip("~!.")
    target = content.lstrip("!")
    if target.startswith("~"):
        target = target[1:].lstrip(".")
        return target.rsplit(".", 1)[-1], target
    target = target.lstrip(".")
    return target, target


def rst_roles_to_markdown(text: str, resolve: Callable[[str], str | None]) -> str:
    """Rewrite every ``:role:`target``` to ``[`title`][path]`` where ``resolve(target)`` gives a path, else ``title``
    as a code span. ``resolve`` returns the identifier to link to, or ``None`` when there is nothing to link."""

    def repl(m: re.Match[str]) -> str:
        title, target = role_parts(m["content"])
        path = resolve(target)
        code = f"`{title}`" if "`" not in title else f"`` {title} ``"
        return f"[{code}][{path}]" if path else code

    return _ROLE.sub(repl, text)


def rst_inline_math(text: str) -> str:
    """``:math:`x^2``` -> ``\\(x^2\\)``."""
    return _MATH_ROLE.sub(lambda m: "\\(" + m["body"] + "\\)", text)


def rst_literal_markers(text: str) -> str:
    """``see::`` -> ``see:``, ``see ::`` -> ``see``, a line ``::`` -> nothing, where an indented block follows."""

    def repl(m: re.Match[str]) -> str:
        if not m["text"]:
            return ""
        return m["indent"] + m["text"] + ("" if m["sp"] else ":") + "\n"

    return _LITERAL_MARKER.sub(repl, text)


# --------------------------------------------------------------------------------------------- tables


def _escape_cell(cell: str) -> str:
    """Escape ``|`` outside code spans so that it does not split a Markdown table cell."""
    out, pos = [], 0
    for m in _CODE_SPAN.finditer(cell):
        out.append(cell[pos : m.start()].replace("|", "\\|"))
        out.append(m.group(0))
        pos = m.end()
    out.append(cell[pos:].replace("|", "\\|"))
    return "".join(out)


def _columns(border: str) -> list[int]:
    return [m.start() for m in re.finditer(r"=+", border)]


def _split_row(line: str, starts: list[int]) -> list[str]:
    """Cells of one table line. Text is cut at runs of two or more spaces and each piece goes to the last
    column starting at or before it, so that text running a little past a column border stays in its cell."""
    cells = [""] * len(starts)
    for piece in re.finditer(r"\S+(?: \S+)*", line):
        col = max((i for i, s in enumerate(starts) if s <= piece.start()), default=0)
        cells[col] = f"{cells[col]} {piece.group(0)}".strip()
    return cells


def _rows(lines: list[str], starts: list[int]) -> list[list[str]]:
    """Logical rows: a line whose first column is empty continues the row above (RST simple-table rule)."""
    rows: list[list[str]] = []
    for line in lines:
        if not line.strip():
            continue
        cells = _split_row(line, starts)
        if rows and not cells[0]:
            rows[-1] = [f"{a} {b}".strip() for a, b in zip(rows[-1], cells, strict=True)]
        else:
            rows.append(cells)
    return rows


def _markdown_table(indent: str, header: list[list[str]], body: list[list[str]], ncols: int) -> list[str]:
    head = [" ".join(c).strip() for c in zip(*header, strict=True)] if header else [""] * ncols

    def fmt(cells: list[str]) -> str:
        return indent + "| " + " | ".join(_escape_cell(c) for c in cells) + " |"

    return [fmt(head), indent + "|" + "|".join("---" for _ in range(ncols)) + "|", *(fmt(r) for r in body)]


def rst_simple_tables_to_markdown(text: str) -> str:
    """Rewrite every RST simple table (``===`` borders with at least two columns) as a Markdown table (a
    headerless two-column one as a definition list), keeping its indentation, with a blank line around it."""
    lines = text.split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        top = _BORDER.match(lines[i])
        if not top:
            out.append(lines[i])
            i += 1
            continue
        indent, starts = top["indent"], _columns(lines[i])
        borders = [i]
        j = i + 1
        # a table has 2 borders (no header) or 3 (header, body); it ends at a blank line after a border
        while j < len(lines) and len(borders) < 3:
            if _BORDER.match(lines[j]) and _columns(lines[j]) == starts:
                borders.append(j)
                if j + 1 >= len(lines) or not lines[j + 1].strip():
                    break
            elif lines[j].strip() and not lines[j].startswith(indent):
                break
            j += 1
        if len(borders) < 2:  # not a table after all
            out.append(lines[i])
            i += 1
            continue
        if len(borders) == 3:
            header = _rows(lines[borders[0] + 1 : borders[1]], starts)
            body = _rows(lines[borders[1] + 1 : borders[2]], starts)
        else:
            header, body = [], _rows(lines[borders[0] + 1 : borders[1]], starts)
        if out and out[-1].strip():
            out.append("")
        if not header and len(starts) == 2:  # a headerless two-column table is a list of definitions
            for k, (term, definition) in enumerate(body):
                out.extend([""] * (k > 0) + [indent + term, indent + ":   " + definition])
        else:
            out.extend(_markdown_table(indent, header, body, len(starts)))
        i = borders[-1] + 1
        if i < len(lines) and lines[i].strip():
            out.append("")
    return "\n".join(out)


# ------------------------------------------------------------------------------------------ resolving


def rendered_modules(api_dir: Path = API_DIR) -> set[str]:
    """The modules that the ``::: module`` directives of the API pages render with the global options. A
    directive with its own options (an indented block under it, e.g. ``members:``) may show fewer members, so
    its module does not count: names in it stay code spans rather than risk an unresolved link."""
    found: set[str] = set()
    for page in api_dir.glob("*.md"):
        found.update(re.findall(r"^:::[ \t]+([\w.]+)[ \t]*$(?!\n[ \t]+\S)", page.read_text(), flags=re.M))
    return found


def _walk(obj: Any) -> Iterator[Any]:
    """Every non-alias object under ``obj`` (itself included)."""
    yield obj
    for member in obj.members.values():
        if not member.is_alias:
            yield from _walk(member)


class _Resolver:
    def __init__(self, pkg: Any, rendered: set[str]) -> None:
        self.pkg = pkg
        self.rendered = rendered
        self.objects = list(_walk(pkg))
        self.by_suffix: dict[str, list[str]] = {}
        for obj in self.objects:
            parts = obj.path.split(".")
            for k in range(1, len(parts) + 1):
                self.by_suffix.setdefault(".".join(parts[-k:]), []).append(obj.path)

    def lookup(self, path: str) -> Any | None:
        root, _, rest = path.partition(".")
        if root != self.pkg.name:
            return None
        try:
            obj = self.pkg[rest] if rest else self.pkg
            return obj.final_target if obj.is_alias else obj
        except Exception:  # KeyError, alias resolution errors (external targets)
            return None

    def is_rendered(self, obj: Any) -> bool:
        if obj.is_module:
            return obj.path in self.rendered
        module = obj.module.path
        if module not in self.rendered:
            return False
        inner = obj.path[len(module) + 1 :].split(".")
        if any(part.startswith("_") for part in inner):
            return False
        node = obj
        while node is not None and not node.is_module:  # it and its parents are shown (show_if_no_docstring)
            if not node.has_docstrings:
                return False
            node = node.parent
        return True

    def in_scope(self, scope: Any, name: str) -> str | None:
        return self(name, scope)

    def __call__(self, name: str, scope: Any) -> str | None:
        candidates: list[str] = []
        first, _, rest = name.partition(".")
        try:
            base = scope.resolve(first)
            candidates.append(base + ("." + rest if rest else ""))
        except Exception:  # NameResolutionError
            pass
        candidates.append(name)
        for path in candidates:
            obj = self.lookup(path)
            if obj is not None:
                return obj.path if self.is_rendered(obj) else None
        # a unique object whose path ends with the name (``prefopt.LoraPolicy`` is a lazy attribute)
        parts = name.split(".")
        # ``prefopt.a.b`` may name a lazily imported ``b``: try ``a.b``, then ``b``
        suffixes = [".".join(parts[k:]) for k in range(len(parts))] if first == self.pkg.name else [name]
        for suffix in suffixes:
            matches = self.by_suffix.get(suffix, [])
            if len(matches) == 1:
                obj = self.lookup(matches[0])
                return obj.path if obj is not None and self.is_rendered(obj) else None
        return None


# fenced code blocks and doctest blocks (``>>>`` lines and their output, up to a blank line) are left alone
_CODE_BLOCK = re.compile(
    r"^(?P<indent>[ \t]*)(?P<fence>```+|~~~+).*?^(?P=indent)(?P=fence)[ \t]*$|^[ \t]*>>>.*?(?=^[ \t]*$|\Z)",
    re.M | re.S,
)


def rewrite_docstring(text: str, resolve: Callable[[str], str | None]) -> str:
    """Tables first (their cells may hold roles), then literal-block markers, inline math and cross-reference
    roles; code blocks (fenced or doctest) are not changed."""

    def rewrite(part: str) -> str:
        if "==" in part:
            part = rst_simple_tables_to_markdown(part)
        if "::" in part:
            part = rst_literal_markers(part)
        if ":math:" in part:
            part = rst_inline_math(part)
        if ":`" in part:
            part = rst_roles_to_markdown(part, resolve)
        return part

    out, pos = [], 0
    for m in _CODE_BLOCK.finditer(text):
        out += [rewrite(text[pos : m.start()]), m.group(0)]
        pos = m.end()
    out.append(rewrite(text[pos:]))
    return "".join(out)


class RstMarkup(Extension):
    """Rewrites the docstrings of a package once it is completely loaded (names then resolve everywhere)."""

    def on_package(self, *, pkg: Any, **kwargs: Any) -> None:
        resolver = _Resolver(pkg, rendered_modules())
        for obj in resolver.objects:
            doc = obj.docstring
            if doc is not None:
                doc.value = rewrite_docstring(doc.value, functools.partial(resolver.in_scope, obj))
