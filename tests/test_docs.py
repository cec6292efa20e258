"""The documentation site: ``mkdocs build --strict``, the nav, the quickstart's code, and the doctests.

Needs the docs packages (``mkdocs``, ``mkdocs-material``, ``mkdocstrings[python]``) for the build test; the
other tests need only prefopt.
"""

from __future__ import annotations

import doctest
import importlib
import importlib.util
import os
import pkgutil
import re
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).parents[1]
DOCS = ROOT / "docs"
MKDOCS_YML = ROOT / "mkdocs.yml"

# modules whose import needs an optional extra: skipped by the doctest run when the extra is missing
OPTIONAL = {"prefopt.integrations.trl": "trl"}


def _missing_docs_packages() -> list[str]:
    needed = {
        "mkdocs": "mkdocs",
        "material": "mkdocs-material",
        "mkdocstrings_handlers.python": "mkdocstrings[python]",
    }
    missing = []
    for mod, pkg in needed.items():
        try:
            found = importlib.util.find_spec(mod) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            missing.append(pkg)
    return missing


def _nav_files(nav: Any) -> list[str]:
    """Every ``*.md`` path named in a mkdocs ``nav`` (nested lists / dicts)."""
    if isinstance(nav, str):
        return [nav] if nav.endswith(".md") else []
    if isinstance(nav, dict):
        return [f for v in nav.values() for f in _nav_files(v)]
    if isinstance(nav, list):
        return [f for v in nav for f in _nav_files(v)]
    return []


def _load_nav() -> list[str]:
    yaml = pytest.importorskip("yaml")
    text = MKDOCS_YML.read_text()
    # mkdocs.yml may hold !!python/name tags in other projects; this one is plain YAML
    return _nav_files(yaml.safe_load(text)["nav"])


def test_nav_points_at_existing_pages_and_lists_every_page() -> None:
    nav = _load_nav()
    assert nav, "mkdocs.yml has an empty nav"
    missing = [f for f in nav if not (DOCS / f).is_file()]
    assert not missing, f"nav entries without a page: {missing}"
    assert len(nav) == len(set(nav)), "a page is listed twice in the nav"
    pages = sorted(str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md"))
    not_in_nav = [p for p in pages if p not in nav]
    if not_in_nav:  # new pages from other work land here first; the build still passes
        warnings.warn(f"docs pages not in the mkdocs.yml nav: {not_in_nav}", stacklevel=1)
    for required in ("index.md", "quickstart.md", "distributed.md", "trl.md", "api/index.md"):
        assert required in nav


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The site built once per test module by ``mkdocs build --strict`` (skipped without the docs packages)."""
    missing = _missing_docs_packages()
    if missing:
        pytest.skip(
            f"docs packages not installed: {', '.join(missing)} (pip install them, see docs/index.md)"
        )
    out = tmp_path_factory.mktemp("docs") / "site"
    cmd = [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(MKDOCS_YML), "-d", str(out)]
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, (
        f"mkdocs build --strict failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    )
    return out


def _text(html: str) -> str:
    """The visible text of an HTML page, roughly: tags removed, entities of ``<>&`` decoded."""
    text = re.sub(r"<script\b.*?</script>|<style\b.*?</style>", " ", html, flags=re.S)
    text = re.sub(r"<[^>]+>", "", text)
    return text.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&").replace("&#39;", "'")


@pytest.mark.slow
def test_mkdocs_build_strict(site: Path) -> None:
    api_losses = (site / "api" / "losses" / "index.html").read_text()
    assert "prefopt.losses.margin.dpo" in api_losses  # the API reference is generated from the docstrings
    # ``$$`` display math of the docstrings is typeset by MathJax (arithmatex)
    assert 'class="arithmatex"' in (site / "api" / "policy" / "index.html").read_text()
    assert ".. math::" not in api_losses
    # every public module has a place in the API reference
    for module, page in [
        ("prefopt.models.load_smollm2", "policy"),
        ("prefopt.shared_prefix.shared_prompt_pair_logps", "logprobs"),
        ("prefopt.reward_model.RewardModel", "rl"),
    ]:
        assert f'id="{module}"' in (site / "api" / page / "index.html").read_text(), module


@pytest.mark.slow
def test_api_pages_have_no_raw_rst(site: Path) -> None:
    """No Sphinx role, ``.. math::`` block, RST table or literal-block marker shows raw on an API page
    (the docstrings are Markdown; tests/test_docs_notation.py checks the sources)."""
    pages = sorted((site / "api").glob("*/index.html"))
    assert len(pages) >= 10
    raw = re.compile(
        r":(?:py:)?(?:class|func|meth|mod|attr|data|obj|exc|const|math):`?|\.\. math::|={4,} +={4,}"
        r"|[\w)]::(?=\s)"  # a literal-block marker ``text::``
    )
    leftovers = {}
    for page in pages:
        found = sorted(set(raw.findall(_text(page.read_text()))))
        if found:
            leftovers[str(page.relative_to(site))] = found
    assert not leftovers, f"raw reST left in the API pages: {leftovers}"
    # roles became links to the objects they name
    data = (site / "api" / "data" / "index.html").read_text()
    assert 'href="#prefopt.data.formats.load_preferences"' in data
    assert "<table>" in data and "<th>loader</th>" in data  # the RST table of prefopt.data.formats


@pytest.mark.slow
def test_loss_family_pages_typeset_math(site: Path) -> None:
    """The loss-family pages write their formulas as math (MathJax), not as Unicode in code spans."""
    for name in ("margin", "reference_free", "kto"):
        html = (site / "losses" / name / "index.html").read_text()
        assert html.count('class="arithmatex"') >= 3, name
        codes = re.findall(r"<code>(.*?)</code>", html, flags=re.S)
        formulas = [c for c in codes if re.search(r"σ\(|log σ|ρ_|Ā_", c)]
        assert not formulas, f"losses/{name}: formulas left in code spans: {formulas[:5]}"
        widest = max(
            (len(re.findall(r"<th\b", t)) for t in re.findall(r"<thead>.*?</thead>", html, re.S)), default=0
        )
        assert widest <= 5, f"losses/{name}: a table with {widest} columns"


def _python_blocks(md: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", md, flags=re.S | re.M)


def test_quickstart_code_runs() -> None:
    blocks = _python_blocks((DOCS / "quickstart.md").read_text())
    assert len(blocks) >= 4
    namespace: dict[str, Any] = {"__name__": "quickstart"}
    for i, block in enumerate(blocks):
        try:
            exec(compile(block, f"docs/quickstart.md[block {i}]", "exec"), namespace)
        except Exception as err:  # show which block failed
            raise AssertionError(
                f"quickstart block {i} failed: {type(err).__name__}: {err}\n{block}"
            ) from err
    assert namespace["after"] < namespace["loss"].item()  # the step lowered the DPO loss


def _modules() -> list[str]:
    import prefopt

    names = ["prefopt"]
    for info in pkgutil.walk_packages(prefopt.__path__, prefix="prefopt."):
        names.append(info.name)
    return sorted(names)


def test_docstring_examples_pass() -> None:
    """Every ``>>>`` example in ``src/prefopt`` (the equivalent of ``pytest --doctest-modules src/prefopt``)."""
    finder = doctest.DocTestFinder()
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    failures: list[str] = []
    skipped: list[str] = []
    examples = 0
    for name in _modules():
        try:
            module = importlib.import_module(name)
        except ImportError as err:
            if name in OPTIONAL and importlib.util.find_spec(OPTIONAL[name]) is None:
                skipped.append(name)
                continue
            raise AssertionError(f"cannot import {name}: {err}") from err
        for test in finder.find(module, name):
            if not test.examples:
                continue
            examples += len(test.examples)
            result = runner.run(test, out=lambda s: failures.append(s))
            assert result.failed == 0 or failures
    assert not failures, "".join(failures)
    assert examples >= 1  # there is at least the prefopt package example
