"""Griffe extension for the docs build: render reStructuredText ``.. math::`` blocks in docstrings as MathJax.

Several prefopt docstrings hold display math as an RST directive (an indented block after ``.. math::``).
Markdown would show it as a code block; this rewrites each such block to ``$$ … $$``, which
``pymdownx.arithmatex`` (``generic: true``) hands to MathJax. Loaded by ``mkdocs.yml``
(``extensions: [docs/api/griffe_rst_math.py:RstMath]``); the source files are not changed.
"""

from __future__ import annotations

import re
from typing import Any

from griffe import Extension

_BLOCK = re.compile(r"^(?P<indent>[ \t]*)\.\. math::[ \t]*\n(?P<body>(?:(?:(?P=indent)[ \t]+.*)?\n)+)", re.M)


def rst_math_to_dollars(text: str) -> str:
    """Replace every ``.. math::`` block (its indented body) with a ``$$`` display block, same indentation."""

    def repl(m: re.Match[str]) -> str:
        indent = m.group("indent")
        lines = [ln.strip() for ln in m.group("body").splitlines()]
        body = "\n".join(ln for ln in lines if ln)
        return f"{indent}$$\n{indent}" + body.replace("\n", "\n" + indent) + f"\n{indent}$$\n\n"

    return _BLOCK.sub(repl, text)


class RstMath(Extension):
    def on_object(self, *, obj: Any, **kwargs: Any) -> None:
        doc = getattr(obj, "docstring", None)
        if doc is not None and ".. math::" in doc.value:
            doc.value = rst_math_to_dollars(doc.value)
