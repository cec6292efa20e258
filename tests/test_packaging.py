"""The distribution builds, carries the right metadata, and its wheel works without the source tree.

The distribution name is ``prefopt-rlhf`` (``prefopt`` on PyPI is an unrelated project); the import name is
``prefopt``. The sdist and wheel are built from a copy of the tree (no build isolation: setuptools, wheel and
build come with the dev extra), the wheel is installed with ``pip install --no-deps --target`` into an empty
folder, and a fresh interpreter imports ``prefopt`` from there (its dependencies from this environment).
"""

from __future__ import annotations

import email
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def dists(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    pytest.importorskip("build", reason="the dev extra installs `build`")
    tree = tmp_path_factory.mktemp("tree")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, tree / name)
    shutil.copytree(ROOT / "src", tree / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    out = tmp_path_factory.mktemp("dist")
    proc = subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(tree)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    wheels, sdists = list(out.glob("*.whl")), list(out.glob("*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1, sorted(p.name for p in out.iterdir())
    return {"wheel": wheels[0], "sdist": sdists[0]}


def test_wheel_metadata(dists: dict[str, Path]) -> None:
    import prefopt

    with zipfile.ZipFile(dists["wheel"]) as z:
        names = z.namelist()
        meta_name = next(n for n in names if n.endswith(".dist-info/METADATA"))
        meta = email.message_from_bytes(z.read(meta_name))
    assert meta["Name"] == "prefopt-rlhf"
    assert meta["Version"] == prefopt.__version__
    assert meta["License-Expression"] == "Apache-2.0"
    requires = meta.get_all("Requires-Dist") or []
    base = [r for r in requires if "extra ==" not in r]
    assert any(r.startswith("torch") for r in base)
    assert not any(r.startswith("trl") for r in base), "TRL must never be a runtime dependency"
    assert any(n.endswith("/licenses/LICENSE") for n in names)
    assert "prefopt/py.typed" in names and "prefopt/data/builtin/pairs.jsonl" in names
    assert not any(n.startswith(("tests/", "examples/", "benchmarks/")) for n in names)
    entry = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    with zipfile.ZipFile(dists["wheel"]) as z:
        assert "prefopt = prefopt.cli:main" in z.read(entry).decode()


def test_sdist_contents(dists: dict[str, Path]) -> None:
    with tarfile.open(dists["sdist"]) as t:
        names = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
    assert {"LICENSE", "README.md", "pyproject.toml", "src/prefopt/__init__.py"} <= names


def test_wheel_installs_and_imports_without_the_source_tree(dists: dict[str, Path], tmp_path: Path) -> None:
    target = tmp_path / "site"
    pip = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--target",
            str(target),
            str(dists["wheel"]),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert pip.returncode == 0, pip.stderr[-3000:]
    code = (
        "import prefopt, prefopt.cli, pathlib;"
        "from prefopt.data import load_builtin_pairs;"
        "print(prefopt.__file__);"
        "print(len(load_builtin_pairs()));"
        "print(len(prefopt.available_losses()))"
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    file, n_pairs, n_losses = proc.stdout.split()
    assert Path(file).resolve().is_relative_to(target.resolve()), file  # not the editable source tree
    assert int(n_pairs) > 0 and int(n_losses) > 30
    version = subprocess.run(
        [sys.executable, "-m", "prefopt.cli", "--version"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=300,
    )
    import prefopt

    assert version.returncode == 0 and version.stdout.strip() == f"prefopt {prefopt.__version__}"
