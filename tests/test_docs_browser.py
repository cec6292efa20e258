"""The built docs site typesets its formulas in a real browser, offline.

Headless Chromium (the Debian package ``chromium``) opens pages of a freshly built site from ``file://`` (no
network: MathJax is served from the site itself), runs their JavaScript, and dumps the DOM. Each page must hold
typeset formulas (``<mjx-container>`` elements, one per ``arithmatex`` span) and no raw TeX delimiters or reST
roles in its visible text. Skipped with a reason where Chromium or the docs toolchain is absent.
"""

from __future__ import annotations

import html
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = next(
    (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        CHROMIUM is None, reason="headless Chromium is not installed (Debian: apt install chromium)"
    ),
]

# (page, minimum number of typeset formulas)
PAGES = [
    ("losses/margin/index.html", 20),
    ("losses/kto/index.html", 5),
    ("api/losses/index.html", 1),
    ("distributed/index.html", 1),
]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("mkdocs", reason="the docs toolchain (dev extra) is not installed")
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def _render(page: Path, tmp: Path) -> str:
    proc = subprocess.run(
        [
            str(CHROMIUM),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            f"--user-data-dir={tmp}",
            "--virtual-time-budget=20000",
            "--dump-dom",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def _visible_text(dom: str) -> str:
    text = re.sub(r"<(script|style)\b[^>]*>.*?</\1>", " ", dom, flags=re.S)
    text = re.sub(r"<mjx-container\b.*?</mjx-container>", " ", text, flags=re.S)
    return html.unescape(re.sub(r"<[^>]+>", " ", text))


def test_mathjax_is_served_by_the_site(site: Path) -> None:
    config = (ROOT / "mkdocs.yml").read_text()
    assert "cdn." not in config and "https://" not in config.split("extra_javascript:")[1].split("\n\n")[0]
    assert (site / "javascripts/vendor/mathjax/tex-svg-full.js").stat().st_size > 1_000_000


@pytest.mark.parametrize(("page", "minimum"), PAGES)
def test_formulas_are_typeset_offline(site: Path, tmp_path: Path, page: str, minimum: int) -> None:
    source = (site / page).read_text()
    spans = source.count('class="arithmatex"')
    assert spans >= minimum, f"{page} has {spans} formulas; expected at least {minimum}"
    dom = _render(site / page, tmp_path)
    typeset = dom.count("<mjx-container")
    assert typeset >= spans, f"{page}: {typeset} of {spans} formulas were typeset"
    text = _visible_text(dom)
    for raw in ("\\(", "\\[", "$$", ":class:", ":func:", ":mod:"):
        assert raw not in text, f"{page} shows raw markup {raw!r}"
